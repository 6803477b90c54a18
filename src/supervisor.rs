//! The agent's care of its PostgreSQL: probe it often and the peers' less often, record what is
//! seen in the log (on change, and as a bounded periodic summary), and keep it running — as a
//! standby unless the committed state names this node the primary.
//!
//! A PostgreSQL that someone shut down cleanly while the agent watched is left stopped (an
//! operator's `pg_ctl stop` is a decision, as under repmgr); one that crashed, or that is down
//! when the agent starts, is started again.

use std::collections::BTreeMap;
use std::time::Duration;

use raftmgr_raft::forward::Proposer;
use raftmgr_raft::{ClusterState, Event, NodeId, Observation};
use raftmgr_storage::StoreView;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::pg::probe::{self, PgStatus};
use crate::pg::{Pg, RunState};

/// How long one probe (connect + queries) may take before the server counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Observations waiting to be recorded; more are dropped (the next probe sends a fresh one).
const RECORDER_QUEUE: usize = 64;

pub struct Supervisor {
    pub node_id: NodeId,
    pub pg: Pg,
    pub proposer: Proposer,
    pub store: StoreView,
}

impl Supervisor {
    fn interval(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    pub async fn run(self, stop: watch::Receiver<bool>) {
        let section = &self.pg.settings.section;
        let probe_interval = Self::interval(section.probe_interval_ms);
        let peer_interval = Self::interval(section.peer_probe_interval_ms);
        let summary_interval = Self::interval(section.health_summary_interval_ms);

        let (tx, rx) = mpsc::channel(RECORDER_QUEUE);
        let recorder = Recorder {
            proposer: self.proposer.clone(),
            summary_interval,
            last: recorded_by(&self.store.cluster_state(), self.node_id),
        };
        tokio::spawn(recorder.run(rx, stop.clone()));
        tokio::spawn(probe_peers(
            self.node_id,
            self.pg.clone(),
            self.store.clone(),
            tx.clone(),
            peer_interval,
            stop.clone(),
        ));
        self.watch_local(tx, probe_interval, stop).await;
    }

    async fn watch_local(
        self,
        tx: mpsc::Sender<Observation>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut seen_running = false;
        let mut leave_stopped = false;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let state = self.store.cluster_state();
            if !state.nodes.contains_key(&self.node_id) {
                continue; // Not registered (yet): nothing to look after.
            }
            match self.probe_local(&mut client).await {
                Ok(status) => {
                    if !seen_running || leave_stopped {
                        tracing::info!(in_recovery = status.in_recovery, "PostgreSQL is running");
                    }
                    seen_running = true;
                    leave_stopped = false;
                    let _ = tx.try_send(status.observation(self.node_id, self.node_id));
                }
                Err(e) => {
                    client = None;
                    let _ = tx.try_send(probe::unreachable(self.node_id, self.node_id));
                    if leave_stopped {
                        continue;
                    }
                    match self.pg.run_state() {
                        RunState::Running { pid } => {
                            tracing::warn!("PostgreSQL (pid {pid}) does not answer: {e:#}");
                        }
                        RunState::Stopped => {
                            leave_stopped = self.stopped_by_hand(seen_running).await;
                            if !leave_stopped {
                                self.start(&state).await;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn probe_local(
        &self,
        client: &mut Option<tokio_postgres::Client>,
    ) -> anyhow::Result<PgStatus> {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            *client = Some(probe::connect(&self.pg.local_conninfo(), PROBE_TIMEOUT).await?);
        }
        let connected = client.as_ref().expect("connected above");
        probe::status(connected, true, PROBE_TIMEOUT).await
    }

    /// A clean shutdown seen while the agent was watching: someone stopped it on purpose.
    async fn stopped_by_hand(&self, seen_running: bool) -> bool {
        if !seen_running {
            return false;
        }
        let pg = self.pg.clone();
        let state = tokio::task::spawn_blocking(move || pg.control_state()).await;
        match state {
            Ok(Ok(state)) if state.starts_with("shut down") => {
                tracing::warn!(
                    "PostgreSQL was shut down cleanly ({state}) by someone else; leaving it stopped. \
                     Start it with pg_ctl when the maintenance is done."
                );
                true
            }
            _ => false,
        }
    }

    /// Starts PostgreSQL: read-write only if the committed state names this node the primary.
    async fn start(&self, state: &ClusterState) {
        let as_primary = state.primary == Some(self.node_id);
        let pg = self.pg.clone();
        let result = tokio::task::spawn_blocking(move || {
            if !as_primary && !pg.has_standby_signal() {
                pg.write_standby_signal()?;
            }
            pg.start()
        })
        .await;
        let role = if as_primary { "primary" } else { "standby" };
        match result {
            Ok(Ok(())) => tracing::info!("started PostgreSQL as a {role}"),
            Ok(Err(e)) => tracing::error!("cannot start PostgreSQL as a {role}: {e:#}"),
            Err(e) => tracing::error!("starting PostgreSQL panicked: {e}"),
        }
    }
}

/// Probes every other registered node's PostgreSQL every `interval`.
async fn probe_peers(
    me: NodeId,
    pg: Pg,
    store: StoreView,
    tx: mpsc::Sender<Observation>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let state = store.cluster_state();
        if !state.nodes.contains_key(&me) {
            continue;
        }
        let peers: Vec<(NodeId, String)> = state
            .nodes
            .values()
            .filter(|n| n.registration.node_id != me)
            .map(|n| {
                (
                    n.registration.node_id,
                    pg.peer_conninfo(&n.registration.pg_conninfo, "postgres"),
                )
            })
            .collect();
        let probes = peers.into_iter().map(|(subject, conninfo)| async move {
            let status = async {
                let client = probe::connect(&conninfo, PEER_CONNECT_TIMEOUT).await?;
                probe::status(&client, false, PROBE_TIMEOUT).await
            };
            match status.await {
                Ok(status) => status.observation(me, subject),
                Err(_) => probe::unreachable(me, subject),
            }
        });
        for observation in futures::future::join_all(probes).await {
            let _ = tx.try_send(observation);
        }
    }
}

/// The part of an observation whose change is worth an event at once; LSNs and lag only go into
/// the periodic summary.
fn significant(o: &Observation) -> impl PartialEq + '_ {
    (
        o.reachable,
        o.in_recovery,
        o.timeline,
        o.wal_receiver.as_deref(),
        o.replicas
            .iter()
            .map(|r| {
                let lag_known = r.replay_lsn.is_some();
                (
                    r.name.as_str(),
                    r.state.as_str(),
                    r.sync_state.as_str(),
                    lag_known,
                )
            })
            .collect::<Vec<_>>(),
    )
}

/// This node's committed observations, so that a restarted agent does not record them again.
fn recorded_by(state: &ClusterState, me: NodeId) -> BTreeMap<NodeId, (Observation, Instant)> {
    state
        .nodes
        .iter()
        .filter_map(|(id, node)| {
            Some((
                *id,
                (node.health.get(&me)?.observation.clone(), Instant::now()),
            ))
        })
        .collect()
}

/// Turns observations into `HealthObserved` events: on a significant change at once, otherwise
/// once per summary interval.
struct Recorder {
    proposer: Proposer,
    summary_interval: Duration,
    last: BTreeMap<NodeId, (Observation, Instant)>,
}

impl Recorder {
    async fn run(mut self, mut rx: mpsc::Receiver<Observation>, mut stop: watch::Receiver<bool>) {
        loop {
            let first = tokio::select! {
                o = rx.recv() => match o { Some(o) => o, None => return },
                _ = stop.wait_for(|s| *s) => return,
            };
            // Coalesce: keep only the newest observation of each subject.
            let mut newest = BTreeMap::from([(first.subject, first)]);
            while let Ok(o) = rx.try_recv() {
                newest.insert(o.subject, o);
            }
            for observation in newest.into_values() {
                if self.is_due(&observation) {
                    self.record(observation).await;
                }
            }
        }
    }

    fn is_due(&self, o: &Observation) -> bool {
        match self.last.get(&o.subject) {
            None => true,
            Some((last, at)) => {
                significant(last) != significant(o)
                    || (at.elapsed() >= self.summary_interval && last != o)
            }
        }
    }

    async fn record(&mut self, observation: Observation) {
        let subject = observation.subject;
        match self
            .proposer
            .propose(Event::HealthObserved(observation.clone()))
            .await
        {
            Ok(_) => {
                self.last.insert(subject, (observation, Instant::now()));
            }
            Err(e) => tracing::warn!("cannot record an observation of node {subject}: {e}"),
        }
    }
}
