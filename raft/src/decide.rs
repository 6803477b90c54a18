//! The decision engine, run on the Raft leader: given the committed state and what the leader
//! measured itself (how long since it applied a lease renewal, the candidates' WAL positions just
//! now), which promotion to propose. Pure: no clock, no I/O.
//!
//! Invariant 3: a promotion is proposed only when the primary resigned (committed) or the leader
//! has seen no renewal for the lease timeout (`lease_ttl × (1 + drift) + margin`, computed by the
//! caller), so the old primary's lease is dead on its own clock.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{CandidateAssessment, Event, PromotionDecision};
use crate::state::ClusterState;
use crate::summary::format_lsn;
use crate::types::NodeId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecideConfig {
    /// No promotion before this long without a lease renewal.
    pub lease_timeout_ms: u64,
    /// A candidate this far behind the old primary's last known LSN is not promoted.
    pub maximum_lag_on_failover_bytes: u64,
    /// Synchronous mode (`on` or `strict`): only members of the committed sync set are promoted.
    pub synchronous: bool,
}

/// What a candidate's PostgreSQL answered when the leader asked just now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateProbe {
    pub in_recovery: bool,
    pub received_lsn: Option<u64>,
    pub replayed_lsn: Option<u64>,
}

impl CandidateProbe {
    /// What it will have replayed once it has replayed all it received.
    pub fn lsn(&self) -> Option<u64> {
        self.received_lsn.max(self.replayed_lsn)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeaderView {
    /// Milliseconds, on the leader's monotonic clock, since it applied the current generation's
    /// latest lease renewal (or the generation's start, or its own start, whichever is latest).
    pub lease_silence_ms: u64,
    /// The candidates that answered a probe; absent ones are unreachable.
    pub probes: BTreeMap<NodeId, CandidateProbe>,
    /// Automatic failover is paused (maintenance).
    pub paused: bool,
}

/// Why failover is due, if it is. While paused only a manual failover request
/// ([`ClusterState::pending_failover`]) makes it due, and it too waits for the old primary's
/// lease to be dead.
pub fn failover_reason(
    state: &ClusterState,
    view: &LeaderView,
    config: &DecideConfig,
) -> Option<String> {
    let primary = state.primary?;
    let manual = state.pending_failover();
    if (view.paused || state.paused) && manual.is_none() {
        return None;
    }
    let why = if state.primary_resigned {
        format!("node {primary} resigned in generation {}", state.generation)
    } else if view.lease_silence_ms >= config.lease_timeout_ms {
        format!(
            "no lease renewal from node {primary} for {} ms (timeout {} ms)",
            view.lease_silence_ms, config.lease_timeout_ms
        )
    } else {
        return None;
    };
    Some(match manual {
        Some(m) => format!(
            "{why}; manual failover to node {} requested at event index {}",
            m.candidate, m.event_index
        ),
        None => why,
    })
}

/// The old primary's last LSN as it reported it itself.
pub fn primary_lsn(state: &ClusterState) -> Option<u64> {
    let primary = state.primary?;
    state
        .nodes
        .get(&primary)
        .and_then(|n| n.health.get(&primary))
        .and_then(|h| h.observation.lsn)
}

/// Why node `id` may not be promoted now, or `None` when it may. `probe` is what its
/// PostgreSQL answered (`None`: unreachable); `primary_lsn` the old primary's last known LSN.
/// The API's `POST /failover` asks the same question before it files a request.
pub fn ineligibility(
    state: &ClusterState,
    id: NodeId,
    probe: Option<&CandidateProbe>,
    primary_lsn: Option<u64>,
    config: &DecideConfig,
) -> Option<String> {
    let Some(node) = state.nodes.get(&id) else {
        return Some("not registered".to_string());
    };
    let lsn = probe.and_then(|p| p.lsn());
    if state.primary == Some(id) {
        Some("the primary".to_string())
    } else if node.registration.nofailover {
        Some("tagged nofailover".to_string())
    } else if config.synchronous && !state.sync_set.contains(&id) {
        Some("not in the synchronous set (it may lack acknowledged commits)".to_string())
    } else if probe.is_none() {
        Some("unreachable".to_string())
    } else if probe.is_some_and(|p| !p.in_recovery) {
        Some("not in recovery".to_string())
    } else if lsn.is_none() {
        Some("no WAL position".to_string())
    } else {
        match (primary_lsn, lsn) {
            (Some(p), Some(c)) if p.saturating_sub(c) > config.maximum_lag_on_failover_bytes => {
                Some(format!(
                    "{} bytes behind the old primary's last known LSN (limit {})",
                    p - c,
                    config.maximum_lag_on_failover_bytes
                ))
            }
            _ => None,
        }
    }
}

/// The promotion to propose now, if any.
pub fn decide(state: &ClusterState, view: &LeaderView, config: &DecideConfig) -> Option<Event> {
    let reason = failover_reason(state, view, config)?;
    let primary = state.primary?;
    let primary_lsn = primary_lsn(state);

    let mut eligible: Vec<(NodeId, u64, u32)> = Vec::new();
    let mut assessments: BTreeMap<NodeId, CandidateAssessment> = BTreeMap::new();
    for (id, node) in &state.nodes {
        if *id == primary {
            continue;
        }
        let r = &node.registration;
        let probe = view.probes.get(id);
        let lsn = probe.and_then(|p| p.lsn());
        let not_eligible = ineligibility(state, *id, probe, primary_lsn, config);
        if let (None, Some(lsn)) = (&not_eligible, lsn) {
            eligible.push((*id, lsn, r.priority));
        }
        assessments.insert(
            *id,
            CandidateAssessment {
                node_id: *id,
                lsn,
                priority: r.priority,
                eligible: not_eligible.is_none(),
                why: not_eligible.unwrap_or_default(),
            },
        );
    }
    // Highest LSN, then highest priority, then lowest id; a switchover's named candidate first
    // when it is eligible (it has replayed the old primary's final WAL if it streamed), and so
    // a manual failover's. While paused, a manual failover promotes its candidate or nobody.
    let manual = state.pending_failover().map(|f| f.candidate);
    let target = state
        .pending_switchover()
        .and_then(|s| s.candidate)
        .or(manual);
    let only_target = manual.is_some() && (view.paused || state.paused);
    if only_target {
        eligible.retain(|(id, _, _)| Some(*id) == target);
    }
    let requested = if manual.is_some() {
        "the manual failover's"
    } else {
        "the switchover's"
    };
    eligible.sort_by_key(|(id, lsn, priority)| {
        (Some(*id) != target, Reverse(*lsn), Reverse(*priority), *id)
    });
    let &(winner, winner_lsn, winner_priority) = eligible.first()?;
    for (id, lsn, priority) in &eligible {
        let why = if *id == winner && Some(winner) == target {
            format!("won: {requested} candidate, LSN {}", format_lsn(*lsn))
        } else if Some(winner) == target {
            format!("lost: node {winner} is {requested} candidate")
        } else if *id == winner {
            format!("won: LSN {}, priority {priority}", format_lsn(*lsn))
        } else if *lsn < winner_lsn {
            format!(
                "lost: LSN {} is behind {}",
                format_lsn(*lsn),
                format_lsn(winner_lsn)
            )
        } else if *priority < winner_priority {
            format!("lost: same LSN, priority {priority} < {winner_priority}")
        } else {
            format!("lost: same LSN and priority, node id {id} > {winner}")
        };
        assessments.get_mut(id).expect("assessed above").why = why;
    }
    if only_target {
        for a in assessments
            .values_mut()
            .filter(|a| a.eligible && a.node_id != winner)
        {
            a.why = format!("lost: paused; only {requested} candidate node {winner} may win");
        }
    }
    Some(Event::PromotionDecided(PromotionDecision {
        decided_for_generation: state.generation,
        lease_event_index: state.lease.as_ref().map(|l| l.event_index),
        candidate: winner,
        reason,
        candidates: assessments.into_values().collect(),
    }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::event::{NodeRegistration, PgRole};

    const CONFIG: DecideConfig = DecideConfig {
        lease_timeout_ms: 1500,
        maximum_lag_on_failover_bytes: 1 << 20,
        synchronous: false,
    };

    fn cluster(nodes: &[(NodeId, u32, bool)], resigned: bool) -> ClusterState {
        let mut state = ClusterState::default();
        for (i, (id, priority, nofailover)) in nodes.iter().enumerate() {
            let role = if i == 0 {
                PgRole::Primary
            } else {
                PgRole::Standby
            };
            state.apply(
                &Event::NodeRegistered(NodeRegistration {
                    priority: *priority,
                    nofailover: *nofailover,
                    ..NodeRegistration::for_tests(*id, role)
                }),
                i as u64 + 1,
            );
        }
        if resigned {
            let primary = state.primary.unwrap();
            let resign = Event::PrimaryResigned {
                primary,
                generation: state.generation,
                reason: "test".into(),
            };
            state.apply(&resign, 100);
        }
        state
    }

    fn probe(lsn: u64) -> CandidateProbe {
        CandidateProbe {
            in_recovery: true,
            received_lsn: Some(lsn),
            replayed_lsn: Some(lsn),
        }
    }

    fn decided(event: Option<Event>) -> PromotionDecision {
        match event {
            Some(Event::PromotionDecided(d)) => d,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    #[test]
    fn no_promotion_while_the_lease_may_live() {
        let state = cluster(&[(1, 100, false), (2, 100, false)], false);
        let view = LeaderView {
            lease_silence_ms: 1499,
            probes: BTreeMap::from([(2, probe(10))]),
            paused: false,
        };
        assert_eq!(decide(&state, &view, &CONFIG), None);
        let expired = LeaderView {
            lease_silence_ms: 1500,
            ..view.clone()
        };
        let d = decided(decide(&state, &expired, &CONFIG));
        assert_eq!((d.candidate, d.decided_for_generation), (2, 1));
        assert!(d.reason.contains("no lease renewal"), "{}", d.reason);
        let paused = LeaderView {
            paused: true,
            ..expired
        };
        assert_eq!(decide(&state, &paused, &CONFIG), None);
    }

    #[test]
    fn a_resignation_starts_failover_at_once_and_the_best_candidate_wins() {
        let state = cluster(
            &[
                (1, 100, false),
                (2, 100, false),
                (3, 100, false),
                (4, 200, true),
                (5, 50, false),
            ],
            true,
        );
        let view = LeaderView {
            lease_silence_ms: 0,
            probes: BTreeMap::from([
                (2, probe(100)),
                (3, probe(120)),
                (4, probe(500)),
                (5, probe(120)),
            ]),
            paused: false,
        };
        let d = decided(decide(&state, &view, &CONFIG));
        assert_eq!(d.candidate, 3, "{d:?}");
        assert!(d.reason.contains("resigned"));
        let why = |id: NodeId| {
            d.candidates
                .iter()
                .find(|c| c.node_id == id)
                .unwrap()
                .why
                .clone()
        };
        assert!(why(2).contains("behind"), "{}", why(2));
        assert!(why(4).contains("nofailover"), "{}", why(4));
        assert!(why(5).contains("priority"), "{}", why(5));
    }

    #[test]
    fn in_synchronous_mode_only_the_sync_set_is_promoted() {
        let mut state = cluster(&[(1, 100, false), (2, 100, false), (3, 100, false)], false);
        let sync = Event::SyncSetChanged {
            generation: 1,
            members: [3].into(),
        };
        assert!(state.apply(&sync, 200).is_applied());
        let view = LeaderView {
            lease_silence_ms: 10_000,
            // Node 2 has more WAL, but only node 3 acknowledged every commit.
            probes: BTreeMap::from([(2, probe(500)), (3, probe(400))]),
            paused: false,
        };
        let config = DecideConfig {
            synchronous: true,
            ..CONFIG
        };
        let d = decided(decide(&state, &view, &config));
        assert_eq!(d.candidate, 3);
        let why2 = &d.candidates.iter().find(|c| c.node_id == 2).unwrap().why;
        assert!(why2.contains("synchronous"), "{why2}");
        // Without a sync member reachable, nobody is promoted.
        let only_2 = LeaderView {
            probes: BTreeMap::from([(2, probe(500))]),
            ..view
        };
        assert_eq!(decide(&state, &only_2, &config), None);
    }

    #[test]
    fn a_manual_failover_acts_while_paused_but_only_on_a_dead_lease_and_its_candidate() {
        let mut state = cluster(&[(1, 100, false), (2, 100, false), (3, 100, false)], false);
        state.apply(
            &Event::Paused {
                reason: "test".into(),
            },
            200,
        );
        let request = Event::FailoverRequested {
            generation: 1,
            candidate: 3,
            reason: "test".into(),
        };
        assert!(state.apply(&request, 201).is_applied());
        let view = LeaderView {
            lease_silence_ms: 0,
            probes: BTreeMap::from([(2, probe(500)), (3, probe(400))]),
            paused: false,
        };
        assert_eq!(
            decide(&state, &view, &CONFIG),
            None,
            "the old primary's lease may live"
        );
        let expired = LeaderView {
            lease_silence_ms: 1500,
            ..view.clone()
        };
        let d = decided(decide(&state, &expired, &CONFIG));
        assert_eq!(
            d.candidate, 3,
            "the requested node, not the one with most WAL"
        );
        assert!(
            d.reason.contains("manual failover to node 3"),
            "{}",
            d.reason
        );

        // Paused, the requested candidate or nobody.
        let unreachable_3 = LeaderView {
            probes: BTreeMap::from([(2, probe(500))]),
            ..expired
        };
        assert_eq!(decide(&state, &unreachable_3, &CONFIG), None);
        // Not paused, automatic failover picks another.
        state.apply(&Event::Resumed, 202);
        assert_eq!(
            decided(decide(&state, &unreachable_3, &CONFIG)).candidate,
            2
        );
    }

    #[test]
    fn no_candidate_no_decision() {
        let state = cluster(&[(1, 100, false), (2, 100, true)], true);
        let view = LeaderView {
            lease_silence_ms: 10_000,
            probes: BTreeMap::from([(2, probe(1))]),
            paused: false,
        };
        assert_eq!(decide(&state, &view, &CONFIG), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn decisions_keep_the_invariants(
            nodes in prop::collection::btree_map(1u64..8, (0u32..3, any::<bool>()), 1..6),
            resigned in any::<bool>(),
            silence in 0u64..3000,
            paused in any::<bool>(),
            probes in prop::collection::btree_map(1u64..8, (any::<bool>(), prop::option::of(0u64..1000)), 0..8),
        ) {
            let nodes: Vec<_> = nodes.into_iter().map(|(id, (p, nf))| (id, p, nf)).collect();
            let state = cluster(&nodes, resigned);
            let view = LeaderView {
                lease_silence_ms: silence,
                probes: probes.into_iter().map(|(id, (rec, lsn))| (id, CandidateProbe {
                    in_recovery: rec, received_lsn: lsn, replayed_lsn: None,
                })).collect(),
                paused,
            };
            let Some(event) = decide(&state, &view, &CONFIG) else { return Ok(()) };
            let Event::PromotionDecided(d) = &event else { panic!("only promotions") };
            prop_assert!(!paused);
            prop_assert!(resigned || silence >= CONFIG.lease_timeout_ms, "promoted while the lease may live");
            prop_assert_eq!(d.decided_for_generation, state.generation);
            prop_assert_ne!(Some(d.candidate), state.primary);
            let node = &state.nodes[&d.candidate].registration;
            prop_assert!(!node.nofailover);
            let probe = view.probes[&d.candidate];
            prop_assert!(probe.in_recovery);
            for (id, other) in &view.probes {
                let eligible = state.nodes.get(id).is_some_and(|n| !n.registration.nofailover)
                    && Some(*id) != state.primary && other.in_recovery;
                if eligible {
                    prop_assert!(other.lsn() <= probe.lsn(), "a candidate with more WAL lost");
                }
            }
            let mut next = state.clone();
            prop_assert!(next.apply(&event, 1000).is_applied());
            prop_assert!(next.sync_set.is_empty(), "a new generation starts without a sync set");
            prop_assert_eq!(next.generation, state.generation + 1);
            prop_assert_eq!(next.primary, Some(d.candidate));
            // The same decision again is a recorded no-op.
            prop_assert!(!next.apply(&event, 1001).is_applied());
        }
    }
}
