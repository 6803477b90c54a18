//! `GET /history`: the generations of the cluster — who became primary, how, and on which
//! timeline — derived from the committed state alone (Patroni's `/history`, with what raftmgr
//! records). A pure function of [`ClusterState`], so every member answers the same.
//!
//! What the state keeps bounds the answer: the first primary's registration (while that node is
//! registered), the last [`DECISIONS_MAX`] promotion decisions, and, for the timeline, LSN and
//! kind of a promotion, the events that are still among the last [`RECENT_EVENTS_MAX`] applied.
//!
//! [`DECISIONS_MAX`]: raftmgr_raft::state::DECISIONS_MAX
//! [`RECENT_EVENTS_MAX`]: raftmgr_raft::state::RECENT_EVENTS_MAX

use raftmgr_raft::summary::format_lsn;
use raftmgr_raft::{ClusterState, Event, NodeId, PgRole};
use serde::{Deserialize, Serialize};

/// How a generation got its primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryKind {
    /// The first primary, registered with `raftmgr primary init` or `primary register`.
    Registered,
    /// Promoted after the primary resigned (its PostgreSQL died) or its lease ran out.
    Failover,
    /// Promoted after a requested switchover.
    Switchover,
}

/// One generation, oldest first in `GET /history`. There is no wall-clock time: the state is
/// deterministic and has none; the event index orders the entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The generation this entry opened.
    pub generation: u64,
    pub primary_id: NodeId,
    /// The new primary's name; `None` if it has been unregistered since.
    pub primary: Option<String>,
    /// `None` when the state no longer holds the switchover request or the resignation that
    /// tells a switchover from a failover.
    pub kind: Option<HistoryKind>,
    /// The leader's reason for the promotion (or "registered as the primary").
    pub reason: String,
    /// The event index of the promotion decision (or of the registration).
    pub event_index: u64,
    /// The timeline and LSN the new primary reported in `PromotionCompleted`, and that event's
    /// event index. `None` while the promotion is under way, for the registered first primary, and
    /// once that event has left the recent events.
    pub timeline: Option<u32>,
    pub lsn: Option<String>,
    pub completed_event_index: Option<u64>,
}

/// The cluster's generations as far as `state` remembers them, oldest first.
pub fn history(state: &ClusterState) -> Vec<HistoryEntry> {
    let name = |id: NodeId| state.nodes.get(&id).map(|n| n.registration.name.clone());
    let mut entries = Vec::new();
    // Only the first primary is registered as one: later primaries are promoted.
    if let Some(first) = state
        .nodes
        .values()
        .find(|n| n.registration.role == PgRole::Primary)
    {
        entries.push(HistoryEntry {
            generation: 1,
            primary_id: first.registration.node_id,
            primary: Some(first.registration.name.clone()),
            kind: Some(HistoryKind::Registered),
            reason: "registered as the primary".into(),
            event_index: first.registered_at_event_index,
            timeline: None,
            lsn: None,
            completed_event_index: None,
        });
    }
    for record in &state.decisions {
        let decision = &record.decision;
        let completed = state.recent.iter().find_map(|e| match &e.event {
            Event::PromotionCompleted {
                node_id,
                generation,
                timeline,
                lsn,
            } if e.outcome.is_applied()
                && *generation == record.new_generation
                && *node_id == decision.candidate =>
            {
                Some((*timeline, *lsn, e.event_index))
            }
            _ => None,
        });
        entries.push(HistoryEntry {
            generation: record.new_generation,
            primary_id: decision.candidate,
            primary: name(decision.candidate),
            kind: kind(state, decision.decided_for_generation, &decision.reason),
            reason: decision.reason.clone(),
            event_index: record.event_index,
            timeline: completed.and_then(|c| c.0),
            lsn: completed.and_then(|c| c.1).map(format_lsn),
            completed_event_index: completed.map(|c| c.2),
        });
    }
    entries
}

/// Whether the promotion that ended `generation` was a switchover or a failover, when the state
/// still says.
pub(crate) fn kind(state: &ClusterState, generation: u64, reason: &str) -> Option<HistoryKind> {
    let requested = state
        .switchover
        .as_ref()
        .is_some_and(|s| s.generation == generation)
        || state.recent.iter().any(|e| {
            e.outcome.is_applied()
                && matches!(e.event, Event::SwitchoverRequested { generation: g, .. } if g == generation)
        });
    if requested {
        return Some(HistoryKind::Switchover);
    }
    if reason.starts_with("no lease renewal") {
        return Some(HistoryKind::Failover);
    }
    // A primary resigning for a switchover says so in its reason.
    state.recent.iter().find_map(|e| match &e.event {
        Event::PrimaryResigned {
            generation: g,
            reason,
            ..
        } if *g == generation && e.outcome.is_applied() => {
            Some(if reason.starts_with("switchover") {
                HistoryKind::Switchover
            } else {
                HistoryKind::Failover
            })
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use raftmgr_raft::{CandidateAssessment, NodeRegistration, PromotionDecision};

    use raftmgr_raft::state::RECENT_EVENTS_MAX;

    use super::*;

    fn promote(for_generation: u64, candidate: NodeId, reason: &str) -> Event {
        Event::PromotionDecided(PromotionDecision {
            decided_for_generation: for_generation,
            lease_event_index: None,
            candidate,
            reason: reason.into(),
            candidates: vec![CandidateAssessment {
                node_id: candidate,
                lsn: Some(1),
                priority: 100,
                eligible: true,
                why: "won".into(),
            }],
        })
    }

    fn completed(node_id: NodeId, generation: u64, timeline: u32, lsn: u64) -> Event {
        Event::PromotionCompleted {
            node_id,
            generation,
            timeline: Some(timeline),
            lsn: Some(lsn),
        }
    }

    /// node1 registered, a failover to node2 (node1 died), a switchover back to node1.
    fn two_promotions() -> ClusterState {
        let mut state = ClusterState::default();
        let events = [
            Event::NodeRegistered(NodeRegistration::for_tests(1, PgRole::Primary)),
            Event::NodeRegistered(NodeRegistration::for_tests(2, PgRole::Standby)),
            Event::PrimaryResigned {
                primary: 1,
                generation: 1,
                reason: "its PostgreSQL died and no postmaster of its data directory runs".into(),
            },
            promote(1, 2, "node 1 resigned in generation 1"),
            completed(2, 2, 2, 0x5000060),
            Event::SwitchoverRequested {
                primary: 2,
                generation: 2,
                candidate: Some(1),
            },
            Event::PrimaryResigned {
                primary: 2,
                generation: 2,
                reason: "switchover: its PostgreSQL shut down cleanly after sending all WAL".into(),
            },
            promote(2, 1, "node 2 resigned in generation 2"),
        ];
        for (i, event) in events.iter().enumerate() {
            assert!(state.apply(event, i as u64 + 1).is_applied(), "{event:?}");
        }
        state
    }

    #[test]
    fn generations_with_their_kind_timeline_and_lsn() {
        let state = two_promotions();
        let rows: Vec<_> = history(&state)
            .into_iter()
            .map(|e| {
                (
                    e.generation,
                    e.primary,
                    e.kind,
                    e.event_index,
                    e.timeline,
                    e.lsn,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    1,
                    Some("node1".into()),
                    Some(HistoryKind::Registered),
                    1,
                    None,
                    None
                ),
                (
                    2,
                    Some("node2".into()),
                    Some(HistoryKind::Failover),
                    4,
                    Some(2),
                    Some("0/5000060".into())
                ),
                // Under way: no PromotionCompleted yet.
                (
                    3,
                    Some("node1".into()),
                    Some(HistoryKind::Switchover),
                    8,
                    None,
                    None
                ),
            ]
        );
    }

    #[test]
    fn what_left_the_recent_events_is_unknown_not_guessed() {
        let mut state = two_promotions();
        // Lease renewals push everything else out of the recent events.
        let mut index = state.last_event_index;
        for _ in 0..RECENT_EVENTS_MAX {
            index += 1;
            let renew = Event::LeaseRenewed {
                primary: 1,
                generation: 3,
            };
            state.apply(&renew, index);
        }
        let entries = history(&state);
        assert_eq!(entries.len(), 3);
        let failover = &entries[1];
        assert_eq!(
            (failover.kind, failover.timeline, &failover.lsn),
            (None, None, &None)
        );
        // The latest switchover stays in the state.
        assert_eq!(entries[2].kind, Some(HistoryKind::Switchover));
    }

    #[test]
    fn a_lease_timeout_is_a_failover() {
        let mut state = ClusterState::default();
        state.apply(
            &Event::NodeRegistered(NodeRegistration::for_tests(1, PgRole::Primary)),
            1,
        );
        state.apply(
            &Event::NodeRegistered(NodeRegistration::for_tests(2, PgRole::Standby)),
            2,
        );
        state.apply(
            &promote(
                1,
                2,
                "no lease renewal from node 1 for 1500 ms (timeout 1470 ms)",
            ),
            3,
        );
        assert_eq!(history(&state)[1].kind, Some(HistoryKind::Failover));
    }
}
