//! The agent's care of its PostgreSQL: probe it often and the peers' less often, record what is
//! seen in the log (on change, and as a bounded periodic summary), and let the executor
//! (`failover`) reconcile it with the committed state: start, follow, promote, fence, rewind.
//!
//! A PostgreSQL that someone shut down cleanly while the agent watched is left stopped (an
//! operator's `pg_ctl stop` is a decision, as under repmgr); a standby that crashed, or any node
//! down when the agent starts, is started again; a primary that crashed resigns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use raftmgr_raft::forward::Proposer;
use raftmgr_raft::{ClusterState, Event, NodeId, Observation, Raft};
use raftmgr_storage::StoreView;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use crate::config::FailoverSection;
use crate::failover::{self, Executor, ExecutorMemory, Lease};
use crate::pg::probe::{self, PgStatus};
use crate::pg::{Pg, RunState};
use crate::wake::Wake;

/// How long one probe (connect + queries) may take before the server counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Observations waiting to be recorded; more are dropped (the next probe sends a fresh one).
const RECORDER_QUEUE: usize = 64;

pub struct Supervisor {
    pub node_id: NodeId,
    pub node_name: String,
    pub pg: Pg,
    pub raft: Raft,
    pub proposer: Proposer,
    pub store: StoreView,
    pub timing: FailoverSection,
    /// The agent's own folder (the lease guard's files live there).
    pub agent_data_dir: std::path::PathBuf,
    /// Operators' requests from the API (`POST /rejoin`, `/restart`, `/reinitialize`).
    pub requests: std::sync::Arc<std::sync::Mutex<mpsc::Receiver<raftmgr_api::LocalRequest>>>,
    /// Published for the API's load-balancer checks.
    pub local: Arc<std::sync::RwLock<raftmgr_api::LocalPostgres>>,
}

/// After a state change the executor runs at once, but never sooner than this after its
/// previous step, however often the state changes. A failover's entries come a few
/// milliseconds apart, and each may be the one this node must act on.
const MIN_STEP_SPACING: Duration = Duration::from_millis(5);
/// How often the local postmaster's pid is checked while none runs (a file read and a look
/// at `/proc`).
const POSTMASTER_WATCH_INTERVAL: Duration = Duration::from_millis(10);

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
        let fencing = !self.timing.unsafe_no_fencing;
        let lease_file = if fencing {
            let (lease_file, guard_pid_file) = crate::guard::paths(&self.agent_data_dir);
            if let Err(e) =
                crate::guard::ensure_running(&lease_file, self.pg.data_dir(), &guard_pid_file)
            {
                tracing::error!("no lease guard: {e:#}; a paused or dead agent cannot be fenced");
            }
            Some(lease_file)
        } else {
            tracing::error!("unsafe_no_fencing is set: this node never fences (test only)");
            None
        };
        let lease = Lease::new(lease_file, &self.timing);
        tokio::spawn(failover::keep_lease(
            self.node_id,
            lease.clone(),
            self.proposer.clone(),
            self.store.clone(),
            self.timing.clone(),
            stop.clone(),
        ));
        if fencing {
            tokio::spawn(failover::watchdog(
                self.pg.clone(),
                lease.clone(),
                stop.clone(),
            ));
        }
        tokio::spawn(failover::decide_loop(
            self.raft.clone(),
            self.pg.clone(),
            self.proposer.clone(),
            self.store.clone(),
            self.timing.clone(),
            stop.clone(),
        ));
        let executor = Executor {
            me: self.node_id,
            name: self.node_name.clone(),
            pg: self.pg.clone(),
            proposer: self.proposer.clone(),
            lease,
            timing: self.timing.clone(),
            requests: self.requests.clone(),
            local: self.local.clone(),
        };
        self.watch_local(executor, tx, probe_interval, stop).await;
    }

    /// Probes the local PostgreSQL, records what it sees, and lets the executor reconcile —
    /// every probe interval, soon after the committed state changes, and at once when the
    /// postmaster dies.
    async fn watch_local(
        self,
        executor: Executor,
        tx: mpsc::Sender<Observation>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut memory = ExecutorMemory::default();
        let postmaster_died = Arc::new(Notify::new());
        tokio::spawn(watch_postmaster(
            self.pg.clone(),
            postmaster_died.clone(),
            stop.clone(),
        ));
        let mut wake = Wake::new(&self.raft, interval, MIN_STEP_SPACING).nudged_by(postmaster_died);
        while wake.next(&mut stop).await {
            let state = self.store.cluster_state();
            if !state.nodes.contains_key(&self.node_id) {
                continue; // Not registered (yet): nothing to look after.
            }
            // A dead postmaster is seen at once from its pid; probing through a backend that
            // survived it can hang until the probe times out.
            let postmaster_alive = matches!(self.pg.run_state(), RunState::Running { .. });
            if !postmaster_alive {
                client = None;
            }
            let probed = if postmaster_alive {
                self.probe_local(&mut client).await
            } else {
                Err(anyhow::anyhow!("no postmaster runs"))
            };
            let status = match probed {
                Ok(status) => {
                    let _ = tx.try_send(status.observation(self.node_id, self.node_id));
                    Some(status)
                }
                Err(_) => {
                    client = None;
                    let _ = tx.try_send(probe::unreachable(self.node_id, self.node_id));
                    None
                }
            };
            let step = executor.step(&state, status.as_ref(), client.as_ref(), &mut memory);
            if step.await {
                wake.again();
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
}

/// Notifies `died` when the local postmaster, seen running, is gone: the executor then steps at
/// once (a primary resigns) instead of at its next probe, up to `probe_interval_ms` later. A
/// running postmaster is watched through a pidfd, which wakes this task the moment it exits;
/// while none runs (or where pidfds are not available) the pid file is read every
/// `POSTMASTER_WATCH_INTERVAL`.
async fn watch_postmaster(pg: Pg, died: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let mut was_running = false;
    loop {
        let running = pg.run_state();
        if was_running && running == RunState::Stopped {
            died.notify_one();
        }
        was_running = running != RunState::Stopped;
        if let Some(exit) = exit_of_postmaster(&pg, running) {
            tokio::select! {
                _ = exit.readable() => continue,
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POSTMASTER_WATCH_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// A pidfd of the running postmaster, readable once it has exited. The pid is checked again
/// after the pidfd is open: by then it could have been another process's.
fn exit_of_postmaster(
    pg: &Pg,
    running: RunState,
) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    let RunState::Running { pid } = running else {
        return None;
    };
    let exit = exit_of(pid)?;
    (pg.run_state() == running).then_some(exit)
}

/// A pidfd of process `pid`, readable once it has exited; none for a negated pid (a standalone
/// backend's, initdb's or a crash recovery's, which is looked at every interval instead) or
/// where pidfds are not available.
fn exit_of(pid: i32) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    if pid <= 0 {
        return None; // `Pid::from_raw` panics on a negative pid.
    }
    let process = rustix::process::Pid::from_raw(pid)?;
    let fd = rustix::process::pidfd_open(process, rustix::process::PidfdFlags::empty()).ok()?;
    // Deprecated because a `T` whose raw fd could change would be unsound; an `OwnedFd`'s cannot,
    // and `register`, its replacement, is `unsafe`, which this crate forbids.
    #[allow(deprecated)]
    tokio::io::unix::AsyncFd::new(fd).ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `sleep`, killed when dropped.
    struct Sleep(std::process::Child);

    impl Drop for Sleep {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[tokio::test]
    async fn an_exit_is_seen_through_a_pidfd_and_a_negated_pid_has_none() {
        assert!(exit_of(-42).is_none());
        assert!(exit_of(0).is_none());
        let mut sleep = Sleep(
            std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .unwrap(),
        );
        let exit = exit_of(sleep.0.id() as i32).expect("a pidfd of a running process");
        let early = tokio::time::timeout(Duration::from_millis(50), exit.readable()).await;
        assert!(early.is_err(), "readable while the process runs");
        sleep.0.kill().unwrap();
        let readable = tokio::time::timeout(Duration::from_secs(10), exit.readable()).await;
        assert!(
            readable.expect("readable once the process exited").is_ok(),
            "polling the pidfd failed"
        );
    }
}
