//! Failovers and switchovers as this agent saw them applied, for `GET /metrics`: how many, and
//! how long the last of each took — from the moment this agent applied the `PromotionDecided`
//! to the moment it applied the new primary's `PromotionCompleted`, on its own monotonic clock.
//!
//! The counts cover what this agent applied since it started (Prometheus counters reset with
//! the process); events already applied when it started are not counted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftmgr_raft::{ClusterState, Event};
use raftmgr_storage::StoreView;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::history::{self, HistoryKind};

/// The counts and last durations; see the module's documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PromotionStats {
    pub failovers: u64,
    pub switchovers: u64,
    pub last_failover: Option<Duration>,
    pub last_switchover: Option<Duration>,
}

/// A promotion decided and not completed yet, as this agent saw it.
#[derive(Debug, Clone, Copy)]
struct Started {
    new_generation: u64,
    kind: HistoryKind,
    at: Instant,
}

#[derive(Debug)]
struct Clock {
    seen_event_index: u64,
    started: Option<Started>,
    stats: PromotionStats,
}

/// Shared by the tracking task and the metrics handler.
#[derive(Debug)]
pub struct PromotionClock(Mutex<Clock>);

impl PromotionClock {
    /// Starts after everything `state` has applied already.
    pub fn new(state: &ClusterState) -> Arc<PromotionClock> {
        Arc::new(PromotionClock(Mutex::new(Clock {
            seen_event_index: state.last_event_index,
            started: None,
            stats: PromotionStats::default(),
        })))
    }

    pub fn stats(&self) -> PromotionStats {
        self.0.lock().expect("promotion clock lock").stats
    }

    /// Notes the promotion events `state` applied since the last look, as seen at `now`.
    pub fn observe(&self, state: &ClusterState, now: Instant) {
        let mut clock = self.0.lock().expect("promotion clock lock");
        let seen = clock.seen_event_index;
        for e in state.recent.iter().filter(|e| e.event_index > seen) {
            if !e.outcome.is_applied() {
                continue;
            }
            match &e.event {
                Event::PromotionDecided(d) => {
                    let kind = history::kind(state, d.decided_for_generation, &d.reason)
                        .unwrap_or(HistoryKind::Failover);
                    match kind {
                        HistoryKind::Switchover => clock.stats.switchovers += 1,
                        _ => clock.stats.failovers += 1,
                    }
                    clock.started = Some(Started {
                        new_generation: d.decided_for_generation + 1,
                        kind,
                        at: now,
                    });
                }
                Event::PromotionCompleted { generation, .. } => {
                    let Some(started) = clock.started else {
                        continue;
                    };
                    if started.new_generation != *generation {
                        continue;
                    }
                    let took = now.saturating_duration_since(started.at);
                    match started.kind {
                        HistoryKind::Switchover => clock.stats.last_switchover = Some(took),
                        _ => clock.stats.last_failover = Some(took),
                    }
                    clock.started = None;
                }
                _ => {}
            }
        }
        clock.seen_event_index = clock.seen_event_index.max(state.last_event_index);
    }
}

/// Looks at the state each time Raft applies something, until the agent shuts down.
pub async fn track(
    clock: Arc<PromotionClock>,
    store: StoreView,
    mut raft_news: watch::Receiver<raftmgr_raft::types::RaftMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            news = raft_news.changed() => {
                if news.is_err() {
                    return;
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let now = Instant::now();
        store.with(|state| clock.observe(state, now));
    }
}

#[cfg(test)]
mod tests {
    use raftmgr_raft::event::{NodeRegistration, PromotionDecision};
    use raftmgr_raft::PgRole;

    use super::*;

    fn decision(for_generation: u64, candidate: u64) -> Event {
        Event::PromotionDecided(PromotionDecision {
            decided_for_generation: for_generation,
            lease_event_index: None,
            candidate,
            reason: "no lease renewal from node 1".into(),
            candidates: vec![],
        })
    }

    fn completed(node_id: u64, generation: u64) -> Event {
        Event::PromotionCompleted {
            node_id,
            generation,
            timeline: Some(generation as u32),
            lsn: None,
        }
    }

    #[test]
    fn a_failover_and_a_switchover_are_counted_and_timed() {
        let mut state = ClusterState::default();
        state.apply(
            &Event::NodeRegistered(NodeRegistration::for_tests(1, PgRole::Primary)),
            1,
        );
        state.apply(
            &Event::NodeRegistered(NodeRegistration::for_tests(2, PgRole::Standby)),
            2,
        );
        let clock = PromotionClock::new(&state);
        let t0 = Instant::now();

        state.apply(&decision(1, 2), 3);
        clock.observe(&state, t0);
        state.apply(&completed(2, 2), 4);
        clock.observe(&state, t0 + Duration::from_millis(350));
        let stats = clock.stats();
        assert_eq!((stats.failovers, stats.switchovers), (1, 0));
        assert_eq!(stats.last_failover, Some(Duration::from_millis(350)));

        // A switchover back, decided and completed between two looks.
        let request = Event::SwitchoverRequested {
            primary: 2,
            generation: 2,
            candidate: Some(1),
        };
        state.apply(&request, 5);
        state.apply(&decision(2, 1), 6);
        clock.observe(&state, t0 + Duration::from_secs(1));
        state.apply(&completed(1, 3), 7);
        // A look that finds nothing new changes nothing.
        clock.observe(&state, t0 + Duration::from_millis(1200));
        clock.observe(&state, t0 + Duration::from_secs(5));
        let stats = clock.stats();
        assert_eq!((stats.failovers, stats.switchovers), (1, 1));
        assert_eq!(stats.last_switchover, Some(Duration::from_millis(200)));
        assert_eq!(stats.last_failover, Some(Duration::from_millis(350)));
    }
}
