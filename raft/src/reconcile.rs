//! The reconciler, run on every node: compares what the committed state says this node must be
//! with what its PostgreSQL is, and returns the next action. Pure: the executor measures, this
//! decides, the executor acts and reports the outcome as events.
//!
//! Invariant 5: the only actions that make PostgreSQL writable — `Promote` and `StartAsPrimary`
//! — are returned only when the committed state names this node the primary of the current
//! generation *and* it holds the lease.

use serde::{Deserialize, Serialize};

use crate::state::ClusterState;
use crate::types::NodeId;

/// What the executor measured of the local PostgreSQL and the lease.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Local {
    /// A postmaster of the data directory runs.
    pub running: bool,
    /// What `pg_is_in_recovery()` answered; `None` when it does not answer.
    pub in_recovery: Option<bool>,
    /// This agent holds an unexpired lease for the current generation.
    pub lease_held: bool,
    /// It ran and then died (not a clean shutdown by someone else).
    pub crashed: bool,
    /// Someone shut it down cleanly while the agent watched: leave it alone.
    pub stopped_by_hand: bool,
    /// The control file says it last ran as a primary (it may hold WAL the new primary lacks).
    pub was_primary: bool,
    /// The control file says it was shut down cleanly.
    pub clean_shutdown: bool,
    /// The node its `primary_conninfo` points at.
    pub following: Option<NodeId>,
    /// A standby that follows the right primary but has not streamed for a while: its history
    /// diverged, it needs pg_rewind.
    pub stuck: bool,
    /// This node's `[failover] synchronous_mode` is `on` or `strict`.
    pub synchronous_mode: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Primary without a lease: renew it before anything else.
    AcquireLease,
    /// Replay what was received, then `pg_promote()`.
    Promote,
    /// Report `PromotionCompleted`.
    ReportPromoted,
    StartAsPrimary,
    /// Our PostgreSQL died and we are the primary: commit `PrimaryResigned`.
    Resign,
    /// Writable without being the primary with a lease: stop it at once.
    Fence,
    /// A switchover was requested: shut down cleanly (the WAL senders send everything first).
    StopForSwitchover,
    StartAsStandby {
        primary: NodeId,
    },
    /// pg_rewind from the primary, then start as its standby.
    Rewind {
        primary: NodeId,
    },
    /// Repoint primary_conninfo at the primary and reload.
    Follow {
        primary: NodeId,
    },
}

pub fn reconcile(state: &ClusterState, me: NodeId, local: &Local) -> Option<Action> {
    state.nodes.get(&me)?;
    let writable = local.running && local.in_recovery == Some(false);
    let am_primary = state.primary == Some(me) && !state.primary_resigned;

    if am_primary && state.pending_switchover().is_some() {
        return Some(if local.running {
            Action::StopForSwitchover
        } else {
            Action::Resign
        });
    }
    if am_primary {
        if writable {
            return (!state.primary_ready && local.lease_held).then_some(Action::ReportPromoted);
        }
        if !local.lease_held {
            return Some(Action::AcquireLease);
        }
        if local.running && local.in_recovery == Some(true) {
            return Some(Action::Promote);
        }
        if !local.running {
            // A primary that crashed, or that someone stopped by hand outside maintenance mode,
            // hands over: the cluster must not sit without a writable primary. Unless nobody
            // may take over: in synchronous mode with an empty sync set every standby may lack
            // acknowledged commits, so none is promoted, and resigning would leave the cluster
            // without a primary for good. Then a crashed primary starts again in place (as
            // Patroni's does) and one stopped by hand stays stopped.
            let successor_possible = !local.synchronous_mode || !state.sync_set.is_empty();
            if successor_possible && (local.crashed || (local.stopped_by_hand && !state.paused)) {
                return Some(Action::Resign);
            }
            if !local.stopped_by_hand {
                return Some(Action::StartAsPrimary);
            }
        }
        return None;
    }

    if writable {
        return Some(Action::Fence);
    }
    // Standbys need a primary that is up before they can follow it.
    let primary = state
        .primary
        .filter(|_| state.primary_ready && !state.primary_resigned)?;
    if primary == me {
        return None;
    }
    if !local.running {
        if local.stopped_by_hand {
            return None;
        }
        // A primary that shut down cleanly for a switchover streamed all its WAL to the
        // standbys first: its history is a prefix of the new timeline, no rewind needed.
        let switched_over = state
            .switchover
            .as_ref()
            .is_some_and(|s| s.from == me && s.generation + 1 == state.generation)
            && local.clean_shutdown;
        return Some(if local.was_primary && !switched_over {
            Action::Rewind { primary }
        } else {
            Action::StartAsStandby { primary }
        });
    }
    if local.in_recovery != Some(true) {
        // Running but not answering: a standby short of a consistent state — say, started after
        // a rewind whose source then died — waits for WAL from the node it points at. Pointing
        // it at the current primary is a reload, safe whatever it is doing; nothing else is.
        let stale = local.following.is_some_and(|f| f != primary);
        return stale.then_some(Action::Follow { primary });
    }
    if local.following != Some(primary) {
        return Some(Action::Follow { primary });
    }
    local.stuck.then_some(Action::Rewind { primary })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::event::{Event, NodeRegistration, PgRole, PromotionDecision};

    fn state(primary_ready: bool, promoted_to: Option<NodeId>) -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            let role = if id == 1 {
                PgRole::Primary
            } else {
                PgRole::Standby
            };
            s.apply(
                &Event::NodeRegistered(NodeRegistration::for_tests(id, role)),
                id,
            );
        }
        if let Some(candidate) = promoted_to {
            s.apply(
                &Event::PromotionDecided(PromotionDecision {
                    decided_for_generation: 1,
                    lease_event_index: None,
                    candidate,
                    reason: "test".into(),
                    candidates: vec![],
                }),
                10,
            );
            if primary_ready {
                let done = Event::PromotionCompleted {
                    node_id: candidate,
                    generation: 2,
                    timeline: Some(2),
                    lsn: None,
                };
                s.apply(&done, 11);
            }
        }
        s
    }

    #[test]
    fn a_deposed_primary_is_fenced_then_rewound() {
        let s = state(true, Some(2));
        let writable = Local {
            running: true,
            in_recovery: Some(false),
            lease_held: true,
            ..Local::default()
        };
        assert_eq!(reconcile(&s, 1, &writable), Some(Action::Fence));
        let fenced = Local {
            was_primary: true,
            ..Local::default()
        };
        assert_eq!(
            reconcile(&s, 1, &fenced),
            Some(Action::Rewind { primary: 2 })
        );
    }

    #[test]
    fn a_standby_that_does_not_answer_yet_is_repointed_at_a_new_primary() {
        let s = state(true, Some(2));
        let starting = Local {
            running: true,
            in_recovery: None,
            following: Some(1),
            ..Local::default()
        };
        assert_eq!(
            reconcile(&s, 3, &starting),
            Some(Action::Follow { primary: 2 })
        );
        let on_the_primary = Local {
            following: Some(2),
            ..starting.clone()
        };
        assert_eq!(reconcile(&s, 3, &on_the_primary), None);
        // Not known to be a standby at all: hands off.
        let unknown = Local {
            following: None,
            ..starting
        };
        assert_eq!(reconcile(&s, 3, &unknown), None);
    }

    #[test]
    fn the_candidate_takes_the_lease_then_promotes_then_reports() {
        let s = state(false, Some(2));
        let standby = Local {
            running: true,
            in_recovery: Some(true),
            ..Local::default()
        };
        assert_eq!(reconcile(&s, 2, &standby), Some(Action::AcquireLease));
        let leased = Local {
            lease_held: true,
            ..standby.clone()
        };
        assert_eq!(reconcile(&s, 2, &leased), Some(Action::Promote));
        let promoted = Local {
            in_recovery: Some(false),
            ..leased
        };
        assert_eq!(reconcile(&s, 2, &promoted), Some(Action::ReportPromoted));
        // Node 3 waits for the new primary to be up, then follows it.
        assert_eq!(reconcile(&s, 3, &standby), None);
        let ready = state(true, Some(2));
        let following_1 = Local {
            following: Some(1),
            ..standby
        };
        assert_eq!(
            reconcile(&ready, 3, &following_1),
            Some(Action::Follow { primary: 2 })
        );
    }

    #[test]
    fn a_primary_stopped_by_hand_resigns_unless_paused() {
        let mut s = state(true, None);
        let stopped = Local {
            stopped_by_hand: true,
            lease_held: true,
            ..Local::default()
        };
        assert_eq!(reconcile(&s, 1, &stopped), Some(Action::Resign));
        s.apply(
            &Event::Paused {
                reason: "maintenance".into(),
            },
            50,
        );
        assert_eq!(
            reconcile(&s, 1, &stopped),
            None,
            "maintenance: leave it stopped"
        );
        // A standby stopped by hand is left alone either way.
        assert_eq!(reconcile(&s, 2, &stopped), None);
    }

    #[test]
    fn a_crashed_primary_resigns_and_a_rebooted_one_starts() {
        let s = state(true, None);
        let crashed = Local {
            crashed: true,
            lease_held: true,
            ..Local::default()
        };
        assert_eq!(reconcile(&s, 1, &crashed), Some(Action::Resign));
        let rebooted = Local {
            lease_held: true,
            ..Local::default()
        };
        assert_eq!(reconcile(&s, 1, &rebooted), Some(Action::StartAsPrimary));
    }

    #[test]
    fn in_synchronous_mode_a_crashed_primary_hands_over_only_to_the_sync_set() {
        let mut s = state(true, None);
        let crashed = Local {
            crashed: true,
            lease_held: true,
            synchronous_mode: true,
            ..Local::default()
        };
        let stopped = Local {
            crashed: false,
            stopped_by_hand: true,
            ..crashed.clone()
        };
        // No sync standby: no one may be promoted, so it starts again in place.
        assert_eq!(reconcile(&s, 1, &crashed), Some(Action::StartAsPrimary));
        assert_eq!(
            reconcile(&s, 1, &stopped),
            None,
            "left stopped, not resigned"
        );
        s.apply(
            &Event::SyncSetChanged {
                generation: s.generation,
                members: [2].into(),
            },
            60,
        );
        assert_eq!(reconcile(&s, 1, &crashed), Some(Action::Resign));
        assert_eq!(reconcile(&s, 1, &stopped), Some(Action::Resign));
    }

    fn arb_local() -> impl Strategy<Value = Local> {
        (
            any::<bool>(),
            prop::option::of(any::<bool>()),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            prop::option::of(1u64..4),
            (any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    running,
                    in_recovery,
                    lease_held,
                    crashed,
                    stopped_by_hand,
                    was_primary,
                    following,
                    (stuck, clean_shutdown, synchronous_mode),
                )| Local {
                    running,
                    in_recovery,
                    lease_held,
                    crashed,
                    stopped_by_hand,
                    was_primary,
                    clean_shutdown,
                    following,
                    stuck,
                    synchronous_mode,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn only_the_leased_primary_of_the_generation_is_made_writable(
            ready in any::<bool>(),
            promoted in prop::option::of(1u64..4),
            me in 1u64..4,
            local in arb_local(),
        ) {
            let s = state(ready, promoted);
            let action = reconcile(&s, me, &local);
            if matches!(action, Some(Action::Promote | Action::StartAsPrimary | Action::ReportPromoted)) {
                prop_assert_eq!(s.primary, Some(me));
                prop_assert!(local.lease_held);
                prop_assert!(!s.primary_resigned);
            }
            let writable = local.running && local.in_recovery == Some(false);
            if writable && s.primary != Some(me) {
                prop_assert_eq!(action, Some(Action::Fence), "a writable non-primary must be fenced");
            }
        }
    }
}
