//! The imperative shell around `decide` and `reconcile`: the primary's lease (renewal and
//! fencing), the Raft leader's decision loop, and the executor that carries out the reconciler's
//! actions on the local PostgreSQL and reports them as events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use raftmgr_api::LocalRequest;
use raftmgr_raft::decide::{self, CandidateProbe, DecideConfig, LeaderView};
use raftmgr_raft::forward::Proposer;
use raftmgr_raft::reconcile::{self, Action, Local};
use raftmgr_raft::{ClusterState, Event, NodeId, Outcome, Raft, RejoinMethod};
use raftmgr_storage::StoreView;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::{FailoverSection, SynchronousMode};
use crate::guard::{self, GuardMode};
use crate::pg::probe::{self, PgStatus};
use crate::pg::{Pg, RunState, Upstream};
use crate::wake::Wake;

/// How often the fencing watchdog looks at the lease.
const WATCHDOG_INTERVAL: Duration = Duration::from_millis(25);
/// Fence this long before the lease runs out, to cover the time the fence takes.
const FENCE_MARGIN: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const CANDIDATE_PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// The decision runs every `decide_interval_ms` and soon after each applied entry (a
/// resignation is acted on at once), but never sooner than this after its previous run.
const DECIDE_SPACING: Duration = Duration::from_millis(5);
/// How long a candidate may take to replay what it received before it promotes anyway.
const REPLAY_WAIT: Duration = Duration::from_secs(10);
/// Replay that has not moved for this long has replayed every complete record it received.
const REPLAY_SETTLE: Duration = Duration::from_millis(200);
/// How long a promotion may take, and how often the executor asks whether it is done.
const PROMOTE_WAIT: Duration = Duration::from_secs(60);
const PROMOTE_POLL: Duration = Duration::from_millis(2);
/// How long a promotion may take before the executor asks for it again (see `promote`): a
/// promotion on this machine takes 20–60 ms.
const PROMOTE_ASK_AGAIN: Duration = Duration::from_millis(25);
/// How often a candidate asks whether it has replayed what it received.
const REPLAY_POLL: Duration = Duration::from_millis(5);
/// How long a rejoined node's start is retried: a killed postmaster's backends can hold its
/// shared memory for a moment, and PostgreSQL refuses to start until they are gone.
const REJOIN_START_WAIT: Duration = Duration::from_secs(15);

/// This agent's lease, shared by the renewer, the watchdog and the executor, and mirrored to the
/// lease guard's file (`guard`).
#[derive(Debug)]
pub struct Lease {
    state: Mutex<LeaseState>,
    /// Where the lease guard reads the expiry; `None` in tests of the lease alone.
    guard_file: Option<std::path::PathBuf>,
    /// How long a node that just became primary may run writable before its first renewal.
    grace: Duration,
    /// Wakes the renewer at once (a promotion needs a lease before anything else).
    pub wake: Notify,
    /// Ticks at every change of `state`, for `wait_renewed`.
    changed: watch::Sender<()>,
    /// Set by the executor from its probes: the local PostgreSQL accepts writes.
    writable: Mutex<bool>,
    /// The watchdog fenced PostgreSQL since the executor last looked.
    fenced: Mutex<bool>,
    /// The generation this agent last saw itself primary of.
    primary_of: Mutex<Option<u64>>,
}

#[derive(Debug, Clone, Copy)]
enum LeaseState {
    /// No renewal has committed since this agent saw itself primary (at `since`).
    Unknown {
        since: Instant,
    },
    Held {
        until: Instant,
        generation: u64,
    },
    /// A renewal came back a no-op: another generation owns the cluster.
    Lost,
    /// The committed state does not name this node primary.
    NotPrimary,
}

impl Lease {
    pub fn new(guard_file: Option<std::path::PathBuf>, timing: &FailoverSection) -> Arc<Lease> {
        Arc::new(Lease {
            state: Mutex::new(LeaseState::Unknown {
                since: Instant::now(),
            }),
            guard_file,
            grace: Duration::from_millis(timing.lease_ttl_ms - timing.lease_renew_interval_ms),
            wake: Notify::new(),
            changed: watch::Sender::new(()),
            writable: Mutex::new(false),
            fenced: Mutex::new(false),
            primary_of: Mutex::new(None),
        })
    }

    /// Whether a committed renewal for `generation` still covers now.
    pub fn held_for(&self, generation: u64) -> bool {
        matches!(*self.state.lock().unwrap(), LeaseState::Held { until, generation: g }
            if g == generation && Instant::now() + FENCE_MARGIN < until)
    }

    /// Waits until a renewal for `generation` holds the lease (true), is refused, or `timeout`
    /// passes (false).
    pub async fn wait_renewed(&self, generation: u64, timeout: Duration) -> bool {
        let mut changed = self.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if self.held_for(generation) {
                return true;
            }
            if matches!(*self.state.lock().unwrap(), LeaseState::Lost) {
                return false;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    fn set(&self, state: LeaseState) {
        *self.state.lock().unwrap() = state;
        self.changed.send_replace(());
        let Some(path) = &self.guard_file else { return };
        let now = Instant::now();
        let now_ns = guard::monotonic_ns();
        let until_ns =
            |until: Instant| now_ns + until.saturating_duration_since(now).as_nanos() as u64;
        let mode = match state {
            LeaseState::Held { until, .. } => GuardMode::Primary {
                until_ns: until_ns(until),
            },
            LeaseState::Unknown { since } => GuardMode::Primary {
                until_ns: until_ns(since + self.grace),
            },
            LeaseState::Lost => GuardMode::Primary { until_ns: 0 },
            LeaseState::NotPrimary => GuardMode::Standby,
        };
        if let Err(e) = guard::write_lease_file(path, mode) {
            tracing::error!(
                "cannot write the lease guard's file {}: {e}",
                path.display()
            );
        }
    }

    fn set_writable(&self, writable: bool) {
        *self.lock_writable() = writable;
    }

    fn lock_writable(&self) -> std::sync::MutexGuard<'_, bool> {
        self.writable.lock().unwrap()
    }

    /// Called by whoever first sees the committed state name this node primary of `generation`:
    /// the grace for the first renewal starts then.
    ///
    /// The grace is the one place a writable PostgreSQL runs without a proven lease: a new agent
    /// beside a running primary (an agent restart) or a just-registered primary. It is safe as
    /// long as no promotion commits meanwhile. The leader promotes only after the lease timeout
    /// without an applied renewal; if that happened while the agent was away, the first renewal
    /// comes back a no-op and the watchdog fences at once (`LeaseState::Lost`). The residual risk
    /// is a promotion that commits while the first renewal is in flight: then writes acknowledged
    /// in that window (a renewal's commit time) may be lost in asynchronous mode; synchronous
    /// mode still loses none, since the standbys stop acknowledging the old primary.
    pub fn note_primary(&self, generation: u64) {
        let mut primary_of = self.primary_of.lock().unwrap();
        if *primary_of != Some(generation) {
            *primary_of = Some(generation);
            self.set(LeaseState::Unknown {
                since: Instant::now(),
            });
        }
    }

    /// Whether the watchdog or the lease guard fenced PostgreSQL since the last call: a stop
    /// that is not a crash (a fenced primary with its lease back starts again, it does not
    /// resign).
    pub fn take_fenced(&self) -> bool {
        let by_guard = self
            .guard_file
            .as_deref()
            .is_some_and(guard::take_fenced_marker);
        std::mem::take(&mut *self.fenced.lock().unwrap()) | by_guard
    }

    /// Whether a writable PostgreSQL must be fenced now. A node that just became primary in
    /// this agent's eyes (a registration, an agent restart beside a running primary) gets until
    /// its first renewal could have committed.
    fn must_fence(&self) -> bool {
        match *self.state.lock().unwrap() {
            LeaseState::Unknown { since } => since.elapsed() > self.grace,
            LeaseState::Held { until, .. } => Instant::now() + FENCE_MARGIN >= until,
            LeaseState::Lost | LeaseState::NotPrimary => true,
        }
    }
}

/// Renews the lease while the committed state names this node the primary.
pub async fn keep_lease(
    me: NodeId,
    lease: Arc<Lease>,
    proposer: Proposer,
    store: StoreView,
    timing: FailoverSection,
    mut stop: watch::Receiver<bool>,
) {
    let ttl = Duration::from_millis(timing.lease_ttl_ms);
    let interval = Duration::from_millis(timing.lease_renew_interval_ms);
    let names_me = |state: &ClusterState| state.primary == Some(me) && !state.primary_resigned;
    loop {
        let state = store.cluster_state();
        if names_me(&state) {
            let generation = state.generation;
            lease.note_primary(generation);
            let started = Instant::now();
            let renewal = Event::LeaseRenewed {
                primary: me,
                generation,
            };
            match tokio::time::timeout(ttl, proposer.propose(renewal)).await {
                Ok(Ok(applied)) => match applied.outcome {
                    Outcome::Applied => lease.set(LeaseState::Held {
                        until: started + ttl,
                        generation,
                    }),
                    Outcome::NoOp { reason } => {
                        tracing::warn!("lease renewal refused: {reason}");
                        lease.set(LeaseState::Lost);
                        // Once this node has applied the refusal too, its state names the
                        // primary of the generation, and the next turn tells the guard at once
                        // that this node is not it: the guard stops any postmaster of a lost
                        // lease, such as the standby a rejoin starts meanwhile.
                        if applied_here(&store, applied.log_index, ttl).await
                            && !names_me(&store.cluster_state())
                        {
                            continue;
                        }
                    }
                },
                Ok(Err(e)) => tracing::warn!("cannot renew the lease: {e}"),
                Err(_) => tracing::warn!("lease renewal not committed within {ttl:?}"),
            }
        } else if state.nodes.contains_key(&me)
            && !matches!(*lease.state.lock().unwrap(), LeaseState::NotPrimary)
        {
            lease.set(LeaseState::NotPrimary);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = lease.wake.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Waits until the local state has applied log entry `index`; false after `timeout`.
async fn applied_here(store: &StoreView, index: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while store.last_applied_index() < Some(index) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Fences the local PostgreSQL (immediate stop) when it is writable without a live lease.
pub async fn watchdog(pg: Pg, lease: Arc<Lease>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(WATCHDOG_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !*lease.lock_writable() || !lease.must_fence() {
            continue;
        }
        tracing::warn!("fencing: PostgreSQL is writable but this node holds no lease");
        fence(&pg, &lease).await;
    }
}

async fn fence(pg: &Pg, lease: &Lease) {
    let stopping = pg.clone();
    match tokio::task::spawn_blocking(move || stopping.stop("immediate")).await {
        Ok(Ok(())) => {
            lease.set_writable(false);
            *lease.fenced.lock().unwrap() = true;
            tracing::warn!("fenced: PostgreSQL stopped (immediate)");
        }
        // The lease guard got there first.
        Ok(Err(_)) if !matches!(pg.run_state(), RunState::Running { .. }) => {
            lease.set_writable(false);
            *lease.fenced.lock().unwrap() = true;
            tracing::warn!("fenced: PostgreSQL was already stopped");
        }
        Ok(Err(e)) => tracing::error!("fencing failed: {e:#}"),
        Err(e) => tracing::error!("fencing panicked: {e}"),
    }
}

/// `decide`'s settings from the `[failover]` section.
pub fn decide_config(timing: &FailoverSection) -> DecideConfig {
    DecideConfig {
        lease_timeout_ms: timing.lease_timeout_ms(),
        maximum_lag_on_failover_bytes: timing.maximum_lag_on_failover_bytes,
        synchronous: timing.synchronous_mode != SynchronousMode::Off,
    }
}

/// On the Raft leader: watches the lease and proposes a promotion when `decide` says so.
pub async fn decide_loop(
    raft: Raft,
    pg: Pg,
    proposer: Proposer,
    store: StoreView,
    timing: FailoverSection,
    mut stop: watch::Receiver<bool>,
) {
    let config = decide_config(&timing);
    let every = Duration::from_millis(timing.decide_interval_ms);
    let mut wake = Wake::new(&raft, every, DECIDE_SPACING);
    let mut last_key = None;
    let mut last_change = Instant::now();
    let candidates = CandidateClients::default();
    tokio::spawn(
        candidates
            .clone()
            .keep(raft.clone(), pg.clone(), store.clone(), stop.clone()),
    );
    while wake.next(&mut stop).await {
        let state = store.cluster_state();
        // Silence is measured from when this agent saw the newest renewal (or generation)
        // applied: never earlier than the primary proposed it.
        let key = (
            state.generation,
            state.lease.as_ref().map(|l| l.event_index),
        );
        if last_key != Some(key) {
            last_key = Some(key);
            last_change = Instant::now();
        }
        if !is_leader(&raft) {
            continue;
        }
        let mut view = LeaderView {
            lease_silence_ms: last_change.elapsed().as_millis() as u64,
            probes: Default::default(),
            paused: false,
        };
        if decide::failover_reason(&state, &view, &config).is_none() {
            continue;
        }
        let probing = Instant::now();
        view.probes = candidates.probe(&pg, &state).await;
        let Some(event) = decide::decide(&state, &view, &config) else {
            tracing::warn!("failover is due but no candidate is eligible");
            continue;
        };
        if let Event::PromotionDecided(d) = &event {
            tracing::warn!(
                candidate = d.candidate,
                "deciding a failover: {} (candidates probed in {} ms)",
                d.reason,
                probing.elapsed().as_millis()
            );
        }
        match proposer.propose(event).await {
            Ok(applied) => tracing::info!("promotion decision committed: {:?}", applied.outcome),
            Err(e) => tracing::warn!("cannot commit the promotion decision: {e}"),
        }
    }
}

fn is_leader(raft: &Raft) -> bool {
    raft.metrics().borrow().state == openraft::ServerState::Leader
}

/// How often the leader makes sure it has a connection to every standby's PostgreSQL.
const CANDIDATE_CONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// The Raft leader's connections to the standbys' PostgreSQL, for the failover decision's
/// probes, opened ahead of a failover and kept: a new connection costs the standby a backend's
/// start and both sides a SCRAM exchange, tens of milliseconds of a failover on a busy host.
#[derive(Clone, Default)]
struct CandidateClients(Arc<Mutex<std::collections::BTreeMap<NodeId, KeptClient>>>);

struct KeptClient {
    conninfo: String,
    client: Arc<tokio_postgres::Client>,
}

impl CandidateClients {
    /// While this node leads: connects to every standby that has no open connection, every
    /// `CANDIDATE_CONNECT_INTERVAL`, and closes those to nodes that are not standbys any more;
    /// otherwise holds none.
    async fn keep(self, raft: Raft, pg: Pg, store: StoreView, mut stop: watch::Receiver<bool>) {
        loop {
            if is_leader(&raft) {
                let state = store.cluster_state();
                let standbys: Vec<_> = standby_conninfos(&pg, &state).collect();
                self.0
                    .lock()
                    .unwrap()
                    .retain(|id, _| standbys.iter().any(|(s, _)| s == id));
                for (id, conninfo) in standbys {
                    if self.kept(id, &conninfo).is_none() {
                        if let Ok(client) = probe::connect(&conninfo, PROBE_TIMEOUT).await {
                            self.put(id, conninfo, client);
                        }
                    }
                }
            } else {
                self.0.lock().unwrap().clear();
            }
            tokio::select! {
                _ = tokio::time::sleep(CANDIDATE_CONNECT_INTERVAL) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// The open connection to node `id` at `conninfo`, if there is one.
    fn kept(&self, id: NodeId, conninfo: &str) -> Option<Arc<tokio_postgres::Client>> {
        let clients = self.0.lock().unwrap();
        let kept = clients.get(&id)?;
        (kept.conninfo == conninfo && !kept.client.is_closed()).then(|| kept.client.clone())
    }

    fn put(&self, id: NodeId, conninfo: String, client: tokio_postgres::Client) {
        let client = Arc::new(client);
        self.0
            .lock()
            .unwrap()
            .insert(id, KeptClient { conninfo, client });
    }

    /// Asks every standby's PostgreSQL for its WAL position now: over the kept connection, or
    /// a new one when there is none or it failed.
    async fn probe(
        &self,
        pg: &Pg,
        state: &ClusterState,
    ) -> std::collections::BTreeMap<NodeId, CandidateProbe> {
        let probes = standby_conninfos(pg, state).map(|(id, conninfo)| async move {
            let kept = match self.kept(id, &conninfo) {
                Some(client) => probe::status(&client, false, CANDIDATE_PROBE_TIMEOUT)
                    .await
                    .ok(),
                None => None,
            };
            let status = match kept {
                Some(status) => Some(status),
                None => async {
                    let client = probe::connect(&conninfo, CANDIDATE_PROBE_TIMEOUT).await?;
                    let status = probe::status(&client, false, CANDIDATE_PROBE_TIMEOUT).await;
                    self.put(id, conninfo, client);
                    status
                }
                .await
                .ok(),
            };
            status.map(|s| {
                (
                    id,
                    CandidateProbe {
                        in_recovery: s.in_recovery,
                        received_lsn: s.lsn,
                        replayed_lsn: s.replayed_lsn,
                    },
                )
            })
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Every node but the primary, with how to reach its PostgreSQL.
fn standby_conninfos<'a>(
    pg: &'a Pg,
    state: &'a ClusterState,
) -> impl Iterator<Item = (NodeId, String)> + 'a {
    state
        .nodes
        .values()
        .filter(|n| Some(n.registration.node_id) != state.primary)
        .map(|n| {
            (
                n.registration.node_id,
                pg.peer_conninfo(&n.registration.pg_conninfo, "postgres"),
            )
        })
}

/// What the executor remembers between ticks.
#[derive(Debug, Default)]
pub struct ExecutorMemory {
    pub seen_running: bool,
    /// raftmgr itself stopped PostgreSQL (a fence, a rewind): not a crash, not an operator.
    pub expected_down: bool,
    pub not_streaming_since: Option<Instant>,
    /// After a failed action, no new action before this time (doubling up to a limit).
    pub retry_at: Option<Instant>,
    pub failures: u32,
    /// The primary's WAL position after PostgreSQL began to wait for a new sync standby: the
    /// standby joins the committed sync set once it has replayed up to here.
    pub sync_switch_lsn: Option<u64>,
}

/// Backoff after a failed action: 500 ms, doubling, at most 10 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64 << failures.min(5)).min(Duration::from_secs(10))
}

/// One step of the executor: measure, reconcile, act.
pub struct Executor {
    pub me: NodeId,
    pub name: String,
    pub pg: Pg,
    pub proposer: Proposer,
    pub lease: Arc<Lease>,
    pub timing: FailoverSection,
    /// Operators' requests (`POST /rejoin`, `/restart`, `/reinitialize`).
    pub requests: Arc<Mutex<tokio::sync::mpsc::Receiver<LocalRequest>>>,
    /// What this step measured, for the API's load-balancer checks.
    pub local: Arc<std::sync::RwLock<raftmgr_api::LocalPostgres>>,
}

impl Executor {
    /// True when the next step is due at once (see `act`). `client` is the supervisor's open
    /// connection to the local PostgreSQL, if it has one.
    pub async fn step(
        &self,
        state: &ClusterState,
        status: Option<&PgStatus>,
        client: Option<&tokio_postgres::Client>,
        memory: &mut ExecutorMemory,
    ) -> bool {
        if self.lease.take_fenced() {
            memory.expected_down = true;
        }
        if state.primary == Some(self.me) && !state.primary_resigned {
            self.lease.note_primary(state.generation);
        }
        let running = matches!(self.pg.run_state(), RunState::Running { .. });
        let writable = status.is_some_and(|s| !s.in_recovery);
        self.lease.set_writable(writable);
        if status.is_some() {
            memory.seen_running = true;
            memory.expected_down = false;
        }
        let control = if running { None } else { self.control_state() };
        let clean = control.is_some_and(|c| c.starts_with("shut down"));
        // A fresh base backup carries the primary's control file ("in production") and a
        // backup_label; only without the label did this data directory run as a primary.
        // A data directory left empty by an interrupted re-clone takes the same road: pg_rewind
        // cannot work on it, so the node is cloned again.
        let was_primary = (matches!(control, Some("in production" | "shut down"))
            && !self.pg.data_dir().join("backup_label").exists())
            || (!running && !self.pg.is_initialized());
        let following = self.pg.following();
        let streaming = status.is_some_and(|s| s.wal_receiver.as_deref() == Some("streaming"));
        if status.is_some_and(|s| s.in_recovery) && !streaming && following == state.primary {
            memory.not_streaming_since.get_or_insert_with(Instant::now);
        } else {
            memory.not_streaming_since = None;
        }
        let rewind_after = Duration::from_millis(self.timing.rewind_after_ms);
        let local = Local {
            running,
            in_recovery: status.map(|s| s.in_recovery),
            lease_held: self.lease.held_for(state.generation),
            crashed: memory.seen_running && !running && !clean && !memory.expected_down,
            stopped_by_hand: memory.seen_running && !running && clean && !memory.expected_down,
            was_primary,
            clean_shutdown: clean,
            following,
            stuck: memory
                .not_streaming_since
                .is_some_and(|t| t.elapsed() >= rewind_after),
            synchronous_mode: self.timing.synchronous_mode != SynchronousMode::Off,
        };
        *self.local.write().expect("local status lock") = raftmgr_api::LocalPostgres {
            running: local.running && status.is_some(),
            in_recovery: local.in_recovery,
            lease_held: local.lease_held,
            timeline: status.and_then(|s| s.timeline),
        };
        let request = self.requests.lock().expect("requests lock").try_recv().ok();
        let action = match (request, state.primary) {
            (Some(LocalRequest::Rejoin), Some(primary)) if primary != self.me => {
                Some(Action::Rewind { primary })
            }
            (Some(LocalRequest::Restart { done }), _) => {
                let restarted = self.restart(state, memory).await;
                if let Err(e) = &restarted {
                    tracing::error!("restart failed: {e:#}");
                }
                let _ = done.send(restarted.map_err(|e| format!("{e:#}")));
                return false;
            }
            (Some(LocalRequest::Reinitialize), _) => {
                if let Err(e) = self.reinitialize(state, memory).await {
                    tracing::error!("reinitialize failed: {e:#}");
                }
                return false;
            }
            _ => reconcile::reconcile(state, self.me, &local),
        };
        let Some(action) = action else {
            // Nothing to reconcile: a primary in steady state looks after its sync standby.
            if let (Some(status), true) = (status, writable && local.lease_held) {
                if let Err(e) = self.manage_sync(state, status, memory).await {
                    tracing::warn!("synchronous standby management: {e:#}");
                }
            }
            return false;
        };
        if memory.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        tracing::info!(?action, "reconciling");
        match self.act(state, status, client, &action, memory).await {
            Ok(again) => {
                memory.failures = 0;
                memory.retry_at = None;
                again
            }
            Err(e) => {
                let wait = backoff(memory.failures);
                memory.failures += 1;
                memory.retry_at = Some(Instant::now() + wait);
                tracing::error!(?action, "failed (next try in {wait:?}): {e:#}");
                false
            }
        }
    }

    fn control_state(&self) -> Option<&'static str> {
        self.pg.control_state().ok()
    }

    async fn act(
        &self,
        state: &ClusterState,
        status: Option<&PgStatus>,
        client: Option<&tokio_postgres::Client>,
        action: &Action,
        memory: &mut ExecutorMemory,
    ) -> anyhow::Result<bool> {
        let generation = state.generation;
        match action {
            // Where the next action of a failover or switchover is due as soon as this one is
            // done, the executor steps again at once.
            Action::AcquireLease => {
                self.lease.wake.notify_one();
                let ttl = Duration::from_millis(self.timing.lease_ttl_ms);
                return Ok(self.lease.wait_renewed(generation, ttl).await);
            }
            Action::Promote => {
                self.promote(state, client).await?;
                return Ok(true);
            }
            Action::ReportPromoted => {
                let event = Event::PromotionCompleted {
                    node_id: self.me,
                    generation,
                    timeline: status.and_then(|s| s.timeline),
                    lsn: status.and_then(|s| s.lsn),
                };
                self.proposer.propose_here(event).await?;
            }
            Action::StartAsPrimary => {
                let (pg, name) = (self.pg.clone(), self.name.clone());
                // Waiting for the committed sync set from the first commit: started without it,
                // a primary acknowledged writes its promotable standby never got (chaos lab,
                // partition-halves: a fenced primary restarted just before it was cut off).
                let sync = sync_names(state, &state.sync_set, self.timing.synchronous_mode);
                blocking(move || {
                    pg.remove_standby_signal()?;
                    pg.write_config(&name, None)?;
                    pg.write_sync_names(&sync)?;
                    pg.start()
                })
                .await?;
            }
            Action::Resign => {
                let clean = self
                    .control_state()
                    .is_some_and(|c| c.starts_with("shut down"));
                let reason = if state.pending_switchover().is_some() {
                    "switchover: its PostgreSQL shut down cleanly after sending all WAL"
                } else if clean {
                    "its PostgreSQL was shut down by hand outside maintenance mode"
                } else {
                    "its PostgreSQL died and no postmaster of its data directory runs"
                };
                let event = Event::PrimaryResigned {
                    primary: self.me,
                    generation,
                    reason: reason.into(),
                };
                self.proposer.propose_here(event).await?;
            }
            Action::StopForSwitchover => {
                memory.expected_down = true;
                let pg = self.pg.clone();
                blocking(move || pg.stop("fast")).await?;
                self.lease.set_writable(false);
                tracing::warn!("switchover: PostgreSQL shut down cleanly");
                return Ok(true); // resign at once
            }
            Action::Fence => {
                memory.expected_down = true;
                fence(&self.pg, &self.lease).await;
            }
            Action::StartAsStandby { primary } => {
                self.point_at(state, *primary, |pg| {
                    pg.write_standby_signal()?;
                    pg.start()
                })
                .await?;
            }
            Action::Follow { primary } => {
                self.point_at(state, *primary, Pg::reload).await?;
                tracing::info!("following node {primary}");
            }
            Action::Rewind { primary } => {
                memory.expected_down = true;
                self.rewind(state, *primary).await?;
            }
        }
        Ok(false)
    }

    /// A fresh clone from the primary, the data directory kept aside as `<dir>.<aside>-<time>`
    /// (used when pg_rewind cannot work, and by `POST /reinitialize`); planned as a
    /// `RejoinPlanned` event with `reason`. PostgreSQL must be stopped.
    async fn reclone(
        &self,
        generation: u64,
        conninfo: &str,
        reason: String,
        aside: &'static str,
    ) -> anyhow::Result<()> {
        let plan = Event::RejoinPlanned {
            node_id: self.me,
            generation,
            method: RejoinMethod::Reclone,
            reason,
        };
        self.proposer.propose(plan).await?;
        let (pg, name, upstream) = (self.pg.clone(), self.name.clone(), conninfo.to_string());
        blocking(move || {
            let aside = pg.move_data_aside(aside)?;
            tracing::warn!(
                "the old data directory is kept at {}; remove it once it is no longer needed",
                aside.display()
            );
            pg.prepare_dirs()?;
            pg.basebackup(&upstream, &crate::pg::slot_name(&name), false)
        })
        .await
    }

    /// `POST /restart`: stops PostgreSQL cleanly and starts it again in its role. Not a crash
    /// and not a stop by hand (`expected_down`), so a primary neither resigns nor fails over:
    /// its lease is renewed meanwhile, and it starts writable again only while it holds it
    /// (invariant 8). Anything else starts with standby.signal, so never writable.
    async fn restart(
        &self,
        state: &ClusterState,
        memory: &mut ExecutorMemory,
    ) -> anyhow::Result<()> {
        let primary = state.primary == Some(self.me) && !state.primary_resigned;
        anyhow::ensure!(
            !primary || state.primary_ready,
            "this node is being promoted; not restarting it now"
        );
        tracing::warn!("restarting PostgreSQL as asked (POST /restart)");
        memory.expected_down = true;
        let pg = self.pg.clone();
        blocking(move || pg.stop_if_running()).await?;
        self.lease.set_writable(false);
        let pg = self.pg.clone();
        if primary {
            anyhow::ensure!(
                self.lease.held_for(state.generation),
                "stopped, but this node no longer holds the primary's lease: not starting it \
                 writable (the executor takes over)"
            );
            if let Err(e) = blocking(move || pg.start()).await {
                // It stopped cleanly and cannot start: from now on that is a primary stopped
                // outside the agent's plan, which resigns unless the cluster is paused.
                memory.expected_down = false;
                return Err(e.context("starting the primary again"));
            }
        } else {
            blocking(move || {
                pg.write_standby_signal()?;
                pg.start()
            })
            .await?;
        }
        tracing::warn!("PostgreSQL restarted");
        Ok(())
    }

    /// `POST /reinitialize`: a fresh clone of this standby from the primary, then start it as
    /// its standby; reported as RejoinPlanned and RejoinCompleted (method `reclone`).
    async fn reinitialize(
        &self,
        state: &ClusterState,
        memory: &mut ExecutorMemory,
    ) -> anyhow::Result<()> {
        let primary = state
            .primary
            .filter(|p| *p != self.me && state.primary_ready && !state.primary_resigned)
            .context("there is no running primary to clone from, or this node is it")?;
        let started = Instant::now();
        let conninfo = self.conninfo_of(state, primary)?;
        self.ensure_slot(&conninfo).await?;
        memory.expected_down = true;
        let pg = self.pg.clone();
        blocking(move || pg.stop_if_running()).await?;
        self.lease.set_writable(false);
        let reason = "reinitialize requested by an operator (POST /reinitialize)".to_string();
        self.reclone(state.generation, &conninfo, reason, "reinitialized")
            .await?;
        self.start_rejoined(
            state.generation,
            primary,
            conninfo,
            RejoinMethod::Reclone,
            started,
        )
        .await
    }

    /// Synchronous mode on the primary. The order keeps invariant 4: a standby is named in
    /// `synchronous_standby_names` only after the sync set naming it is committed, and removed
    /// from PostgreSQL before its removal is committed; so every commit PostgreSQL acknowledged
    /// waited for a member of the committed set, the only nodes that may be promoted.
    /// Keeps the committed sync set a subset of the standbys PostgreSQL waits for, so that every
    /// member holds every acknowledged commit (invariant 4), in Patroni's order: a member leaves
    /// the committed set *before* PostgreSQL stops waiting for it; a standby joins it only
    /// *after* PostgreSQL waits for it and it has replayed everything written up to the switch.
    /// (The reverse order for a removal lost acknowledged writes in the chaos lab: PostgreSQL
    /// acknowledged without a standby while the committed set still made one promotable.)
    async fn manage_sync(
        &self,
        state: &ClusterState,
        status: &PgStatus,
        memory: &mut ExecutorMemory,
    ) -> anyhow::Result<()> {
        let mode = self.timing.synchronous_mode;
        if mode == SynchronousMode::Off || state.primary != Some(self.me) || !state.primary_ready {
            return Ok(());
        }
        let mut streaming: Vec<&raftmgr_raft::state::NodeRecord> = status
            .replicas
            .iter()
            .filter(|r| r.state == "streaming")
            .filter_map(|r| state.node_by_name(&r.name))
            .filter(|n| n.registration.node_id != self.me && !n.registration.nosync)
            .collect();
        streaming.sort_by_key(|n| {
            (
                std::cmp::Reverse(n.registration.priority),
                n.registration.node_id,
            )
        });
        let is_streaming = |id: &NodeId| streaming.iter().any(|n| n.registration.node_id == *id);
        let committed = &state.sync_set;
        let target: std::collections::BTreeSet<NodeId> =
            match committed.iter().find(|m| is_streaming(m)) {
                Some(member) => [*member].into(),
                None => match streaming.first() {
                    Some(best) => [best.registration.node_id].into(),
                    // strict: keep waiting for the member rather than acknowledge unprotected writes.
                    None if mode == SynchronousMode::Strict => committed.clone(),
                    None => Default::default(),
                },
            };
        // 1. Members leaving: out of the committed set first, while PostgreSQL still waits.
        if !committed.is_subset(&target) {
            let members = committed.intersection(&target).copied().collect();
            let event = Event::SyncSetChanged {
                generation: state.generation,
                members,
            };
            self.proposer.propose(event).await?;
            return Ok(()); // PostgreSQL follows on the next step, once committed.
        }
        // 2. PostgreSQL waits for the target.
        let wanted = sync_names(state, &target, mode);
        if self.pg.sync_names() != wanted {
            self.set_sync_names(&wanted).await?;
            tracing::info!("synchronous_standby_names = '{wanted}'");
            memory.sync_switch_lsn = None;
            return Ok(());
        }
        if target.is_subset(committed) {
            return Ok(());
        }
        // 3. A member joining: once PostgreSQL names it sync and it has replayed what was
        //    written up to then, it holds every acknowledged commit.
        let Some(switch_lsn) = memory.sync_switch_lsn.or(status.lsn) else {
            return Ok(());
        };
        memory.sync_switch_lsn = Some(switch_lsn);
        let caught_up = target.iter().all(|id| {
            let name = state.nodes.get(id).map(|n| n.registration.name.as_str());
            status.replicas.iter().any(|r| {
                Some(r.name.as_str()) == name
                    && r.sync_state == "sync"
                    && r.replay_lsn.is_some_and(|lsn| lsn >= switch_lsn)
            })
        });
        if caught_up {
            let event = Event::SyncSetChanged {
                generation: state.generation,
                members: target,
            };
            self.proposer.propose(event).await?;
            memory.sync_switch_lsn = None;
        }
        Ok(())
    }

    /// Writes `synchronous_standby_names`, reloads, and waits until PostgreSQL uses it.
    async fn set_sync_names(&self, names: &str) -> anyhow::Result<()> {
        let (pg, value) = (self.pg.clone(), names.to_string());
        blocking(move || pg.write_sync_names(&value)).await?;
        let client = probe::connect(&self.pg.local_conninfo(), PROBE_TIMEOUT).await?;
        client.batch_execute("SELECT pg_reload_conf()").await?;
        let deadline = Instant::now() + PROBE_TIMEOUT;
        loop {
            let now: String = client
                .query_one("SHOW synchronous_standby_names", &[])
                .await?
                .get(0);
            if now == names {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "PostgreSQL did not take synchronous_standby_names = '{names}' (it has '{now}')"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Makes sure this node's slot exists on `primary`, points `primary_conninfo` at it, then
    /// runs `then` (start or reload).
    async fn point_at(
        &self,
        state: &ClusterState,
        primary: NodeId,
        then: impl FnOnce(&Pg) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let conninfo = self.conninfo_of(state, primary)?;
        self.ensure_slot(&conninfo).await?;
        let (pg, name) = (self.pg.clone(), self.name.clone());
        blocking(move || {
            let upstream = Upstream {
                node_id: primary,
                conninfo: &conninfo,
            };
            pg.write_config(&name, Some(upstream))?;
            then(&pg)
        })
        .await
    }

    fn conninfo_of(&self, state: &ClusterState, node: NodeId) -> anyhow::Result<String> {
        state
            .nodes
            .get(&node)
            .map(|n| n.registration.pg_conninfo.clone())
            .ok_or_else(|| anyhow::anyhow!("node {node} is not registered"))
    }

    /// Replays what was received (bounded), then promotes.
    async fn promote(
        &self,
        state: &ClusterState,
        client: Option<&tokio_postgres::Client>,
    ) -> anyhow::Result<()> {
        let connected;
        let client = match client {
            Some(client) if !client.is_closed() => client,
            _ => {
                connected = probe::connect(&self.pg.local_conninfo(), PROBE_TIMEOUT).await?;
                &connected
            }
        };
        // Replay everything received. The received position can lie past the last complete
        // record (the dead primary's torn last record), which replay never reaches: so stop
        // waiting once replay has stopped moving, not only once it reaches that position.
        let deadline = Instant::now() + REPLAY_WAIT;
        let mut replayed: Option<String> = None;
        let mut still_since = Instant::now();
        loop {
            let row = probe::one_row(
                client,
                "SELECT pg_last_wal_receive_lsn() IS NULL \
                 OR pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn(), \
                 pg_last_wal_replay_lsn()::text",
            )
            .await?;
            let now = row.get(1).map(str::to_string);
            if now != replayed {
                replayed = now;
                still_since = Instant::now();
            }
            let settled = still_since.elapsed() >= REPLAY_SETTLE;
            if probe::boolean(row.get(0))? || settled || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(REPLAY_POLL).await;
        }
        // pg_promote(wait => true) looks only every 100 ms; ask without waiting and watch.
        let ask = "SELECT pg_promote(false)";
        let asked = probe::boolean(probe::one_row(client, ask).await?.get(0))?;
        anyhow::ensure!(asked, "pg_promote returned false");
        let deadline = Instant::now() + PROMOTE_WAIT;
        let mut asked_at = Instant::now();
        let in_recovery = "SELECT pg_is_in_recovery()";
        while probe::boolean(probe::one_row(client, in_recovery).await?.get(0))? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "PostgreSQL still in recovery {PROMOTE_WAIT:?} after pg_promote"
            );
            // PostgreSQL 15's startup process, when the request finds it waiting for a new WAL
            // receiver (its stream from the dead primary just broke), takes the request and then
            // sleeps out `wal_retrieve_retry_interval` (5 s) before acting on it; asking again
            // wakes it. Once recovery has ended, pg_promote fails, which changes nothing.
            if asked_at.elapsed() >= PROMOTE_ASK_AGAIN {
                let _ = probe::one_row(client, ask).await;
                asked_at = Instant::now();
            }
            tokio::time::sleep(PROMOTE_POLL).await;
        }
        // A request that came after the startup process took the first leaves its signal file
        // (harmless: PostgreSQL removes it when it starts; removed here to leave no trace).
        let _ = std::fs::remove_file(self.pg.data_dir().join("promote"));
        tracing::warn!("promoted PostgreSQL to primary");
        tokio::spawn(after_promotion(
            self.pg.local_conninfo(),
            self.slots_to_keep(state),
        ));
        let (pg, name) = (self.pg.clone(), self.name.clone());
        blocking(move || pg.write_config(&name, None)).await
    }

    /// A slot for every other node, after this node's promotion: each keeps WAL from the
    /// position the promotion decision saw the node at, or, for nodes it did not assess (the
    /// former primary), from the fork.
    fn slots_to_keep(&self, state: &ClusterState) -> Vec<SlotToKeep> {
        let decision = state
            .decisions
            .back()
            .filter(|d| d.new_generation == state.generation && d.decision.candidate == self.me);
        state
            .nodes
            .values()
            .filter(|n| n.registration.node_id != self.me)
            .map(|n| SlotToKeep {
                name: crate::pg::slot_name(&n.registration.name),
                from_lsn: decision.and_then(|d| {
                    d.decision
                        .candidates
                        .iter()
                        .find(|c| c.node_id == n.registration.node_id)
                        .and_then(|c| c.lsn)
                }),
            })
            .collect()
    }

    /// Creates this node's replication slot on the primary if it is missing (slots are not
    /// replicated, so a new primary has none).
    async fn ensure_slot(&self, primary_conninfo: &str) -> anyhow::Result<()> {
        let conninfo = self.pg.peer_conninfo(primary_conninfo, "postgres");
        let client = probe::connect(&conninfo, PROBE_TIMEOUT).await?;
        create_slot(&client, &crate::pg::slot_name(&self.name)).await
    }

    /// pg_rewind from the primary, then start as its standby; reported as RejoinPlanned and
    /// RejoinCompleted.
    async fn rewind(&self, state: &ClusterState, primary: NodeId) -> anyhow::Result<()> {
        let started = Instant::now();
        let generation = state.generation;
        let plan = Event::RejoinPlanned {
            node_id: self.me,
            generation,
            method: RejoinMethod::Rewind,
            reason: format!("its history may have diverged from node {primary}'s"),
        };
        self.proposer.propose(plan).await?;
        let conninfo = self.conninfo_of(state, primary)?;
        let source =
            probe::connect(&self.pg.peer_conninfo(&conninfo, "postgres"), PROBE_TIMEOUT).await?;
        ensure_checkpoint_on_current_timeline(&source).await?;
        create_slot(&source, &crate::pg::slot_name(&self.name)).await?;
        drop(source);
        let (pg, upstream) = (self.pg.clone(), conninfo.clone());
        let rewound = blocking(move || {
            pg.stop_if_running()?;
            pg.rewind(&upstream)
        })
        .await;
        let method = match rewound {
            Ok(output) => {
                tracing::warn!(
                    "rewound from node {primary}: {}",
                    output.trim().replace('\n', "; ")
                );
                RejoinMethod::Rewind
            }
            Err(e) if self.timing.reclone_on_rewind_failure => {
                let why = format!("{e:#}");
                tracing::error!("pg_rewind failed: {why}; cloning again from node {primary}");
                let reason = format!("pg_rewind failed: {}", telling_line(&why));
                self.reclone(generation, &conninfo, reason, "rewind-failed")
                    .await?;
                RejoinMethod::Reclone
            }
            Err(e) => return Err(e.context("pg_rewind failed (reclone_on_rewind_failure is off)")),
        };
        self.start_rejoined(generation, primary, conninfo, method, started)
            .await
    }

    /// Points a rewound or cloned data directory at `primary`, starts it as its standby, and
    /// reports `RejoinCompleted`.
    async fn start_rejoined(
        &self,
        generation: u64,
        primary: NodeId,
        conninfo: String,
        method: RejoinMethod,
        started: Instant,
    ) -> anyhow::Result<()> {
        let (pg, name) = (self.pg.clone(), self.name.clone());
        blocking(move || {
            pg.write_config(
                &name,
                Some(Upstream {
                    node_id: primary,
                    conninfo: &conninfo,
                }),
            )?;
            pg.write_standby_signal()?;
            let deadline = std::time::Instant::now() + REJOIN_START_WAIT;
            loop {
                match pg.start() {
                    Ok(()) => return Ok(()),
                    Err(e) if std::time::Instant::now() < deadline => {
                        tracing::info!("start after rejoin failed, retrying: {e:#}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .await?;
        let done = Event::RejoinCompleted {
            node_id: self.me,
            generation,
            method,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        self.proposer.propose(done).await?;
        Ok(())
    }
}

/// A replication slot a new primary makes for another node.
#[derive(Debug)]
struct SlotToKeep {
    name: String,
    /// Keep WAL from here (or from the fork, if that comes first; None: from the fork).
    from_lsn: Option<u64>,
}

/// What a new primary does at once, in the background:
///
/// - A replication slot for every other node, so that the WAL each needs to follow stays. A
///   slot made now would hold WAL from the last restartpoint on (a physical slot reserves from
///   the redo point), possibly gigabytes that a former primary's pg_rewind would then copy
///   whole; so each is moved up to the fork, or to where the promotion decision saw that
///   standby, if it was behind. A former primary needs nothing from before the fork: its own
///   WAL has it (see `pg::wal`).
/// - `CHECKPOINT`, as Patroni does, after the slots, so that it removes what they do not hold.
///   pg_rewind reads the source's timeline from its control file, which names the old timeline
///   until the first checkpoint after a promotion; before it, pg_rewind decides that nothing
///   needs rewinding. PostgreSQL's own is spread over minutes; a returning old primary finds
///   this one done instead of waiting for it.
async fn after_promotion(conninfo: String, slots: Vec<SlotToKeep>) {
    let client = match probe::connect(&conninfo, PROBE_TIMEOUT).await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!("after promotion: cannot connect to PostgreSQL: {e:#}");
            return;
        }
    };
    let fork = match fork_lsn(&client).await {
        Ok(fork) => Some(fork),
        Err(e) => {
            tracing::warn!("could not read where this timeline forked: {e:#}");
            None
        }
    };
    for slot in &slots {
        let from = match (fork, slot.from_lsn) {
            (Some(fork), Some(seen)) => Some(fork.min(seen)),
            (fork, _) => fork,
        };
        if let Err(e) = keep_slot(&client, &slot.name, from).await {
            tracing::warn!("could not create replication slot {}: {e:#}", slot.name);
        }
    }
    let started = Instant::now();
    match client.batch_execute("CHECKPOINT").await {
        Ok(()) => tracing::info!(
            "checkpoint after promotion done in {} ms",
            started.elapsed().as_millis()
        ),
        Err(e) => tracing::warn!("checkpoint after promotion failed: {e}"),
    }
}

/// Where the current timeline begins: the last switch point in its history file.
async fn fork_lsn(client: &tokio_postgres::Client) -> anyhow::Result<u64> {
    let history: String = client
        .query_one(
            "SELECT pg_read_file('pg_wal/' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) \
             || '.history')",
            &[],
        )
        .await?
        .get(0);
    switch_point(&history).context("no switch point in the timeline history file")
}

/// The last switch point of a timeline history file (lines of parent timeline, switch LSN,
/// reason; `#` comments).
fn switch_point(history: &str) -> Option<u64> {
    history
        .lines()
        .rev()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| l.split_whitespace().nth(1))
        .and_then(raftmgr_raft::summary::parse_lsn)
}

/// Creates `slot` unless it exists, and moves it up to `from` when it holds WAL from before
/// (never back, never while a standby streams through it).
async fn keep_slot(
    client: &tokio_postgres::Client,
    slot: &str,
    from: Option<u64>,
) -> anyhow::Result<()> {
    create_slot(client, slot).await?;
    if let Some(from) = from {
        let from = raftmgr_raft::summary::format_lsn(from);
        client
            .execute(
                "SELECT pg_replication_slot_advance(slot_name, $2::text::pg_lsn) \
                 FROM pg_replication_slots \
                 WHERE slot_name = $1 AND NOT active AND restart_lsn < $2::text::pg_lsn",
                &[&slot, &from],
            )
            .await?;
    }
    Ok(())
}

/// Creates a physical replication slot that reserves WAL at once, unless it exists (made
/// meanwhile by another session included: a new primary makes its standbys' slots while they
/// make their own).
async fn create_slot(client: &tokio_postgres::Client, slot: &str) -> anyhow::Result<()> {
    let created = client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await;
    match created {
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => Ok(()),
        other => other.map(|_| ()).map_err(Into::into),
    }
}

/// Checkpoints `source` (a primary) unless its last checkpoint is already on its current
/// timeline; see [`after_promotion`].
async fn ensure_checkpoint_on_current_timeline(
    source: &tokio_postgres::Client,
) -> anyhow::Result<()> {
    let row = source
        .query_one(
            "SELECT (SELECT timeline_id FROM pg_control_checkpoint()), \
                    pg_walfile_name(pg_current_wal_lsn())",
            &[],
        )
        .await?;
    let checkpoint_timeline = row.get::<_, Option<i32>>(0).map(|t| t as u32);
    let walfile: String = row.get(1);
    let current_timeline = probe::timeline_of_walfile(&walfile);
    if current_timeline.is_some() && current_timeline == checkpoint_timeline {
        tracing::info!("the source's last checkpoint is on its timeline {walfile:.8}");
        return Ok(());
    }
    let started = Instant::now();
    source.batch_execute("CHECKPOINT").await?;
    tracing::info!(
        "checkpointed the source, whose last checkpoint was on timeline {checkpoint_timeline:?}, \
         in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// `synchronous_standby_names` for `members` (none: '' — or '*' in strict mode, which then
/// blocks writes until a standby is named).
fn sync_names(
    state: &ClusterState,
    members: &std::collections::BTreeSet<NodeId>,
    mode: SynchronousMode,
) -> String {
    if mode == SynchronousMode::Off {
        return String::new();
    }
    let names: Vec<String> = members
        .iter()
        .filter_map(|id| state.nodes.get(id))
        .map(|n| format!("\"{}\"", n.registration.name))
        .collect();
    match (names.is_empty(), mode) {
        (true, SynchronousMode::Strict) => "*".to_string(),
        _ => names.join(","),
    }
}

/// The line of a failed program's output that says why: its first error (pg_rewind's own, or
/// PostgreSQL's FATAL/PANIC from the crash recovery it runs), else the last line.
fn telling_line(output: &str) -> &str {
    let lines = || output.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| l.contains("error:") || l.contains("FATAL") || l.contains("PANIC"))
        .or_else(|| lines().next_back())
        .unwrap_or(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_telling_line_of_a_failed_rewind_is_its_error() {
        let output = "pg_rewind: executing postgres for target server to complete crash recovery\n\
                      2026-11-30 LOG:  database system was interrupted\n\
                      2026-11-30 PANIC:  could not locate a valid checkpoint record\n\
                      backend>\n";
        assert_eq!(
            telling_line(output),
            "2026-11-30 PANIC:  could not locate a valid checkpoint record"
        );
        assert_eq!(telling_line("one\ntwo\n"), "two");
    }

    #[test]
    fn a_timeline_begins_at_the_last_switch_point_of_its_history() {
        let history = "1\t0/3000000\tno recovery target specified\n\
                       \n\
                       2\t1/57B19050\tno recovery target specified\n";
        assert_eq!(switch_point(history), Some(0x1_57B1_9050));
        assert_eq!(switch_point("# only a comment\n"), None);
    }
}
