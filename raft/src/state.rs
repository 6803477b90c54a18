//! The cluster state every replica builds by applying the committed log, and its `apply`.
//!
//! `apply` is deterministic: no clock, no I/O, no randomness, no iteration over unordered
//! collections. Replicas that apply the same log hold equal states. Preconditions are checked here,
//! so a stale or repeated proposal becomes a recorded no-op with its reason — never a second
//! promotion.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::event::{Event, NodeRegistration, Observation, PgRole, PromotionDecision, RejoinMethod};
use crate::types::NodeId;

/// How many recent events and decisions the state keeps for display. The log itself is compacted.
pub const RECENT_EVENTS_MAX: usize = 256;
pub const DECISIONS_MAX: usize = 64;

/// What applying one event did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    /// The event was committed but changed nothing; `reason` says why.
    NoOp {
        reason: String,
    },
}

impl Outcome {
    fn no_op(reason: impl Into<String>) -> Self {
        Outcome::NoOp {
            reason: reason.into(),
        }
    }

    pub fn is_applied(&self) -> bool {
        matches!(self, Outcome::Applied)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub registration: NodeRegistration,
    pub registered_at_event_index: u64,
    /// The latest observation of this node by each observer.
    pub health: BTreeMap<NodeId, HealthRecord>,
    /// A rejoin planned and not completed yet.
    #[serde(default)]
    pub rejoining: Option<RejoinRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejoinRecord {
    pub generation: u64,
    pub method: RejoinMethod,
    pub event_index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub observation: Observation,
    pub event_index: u64,
}

/// The last committed lease renewal. How long it is good for is measured on each node's own
/// monotonic clock, never here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: NodeId,
    pub generation: u64,
    pub event_index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRecord {
    pub from: NodeId,
    pub generation: u64,
    pub candidate: Option<NodeId>,
    pub event_index: u64,
}

/// An operator's manual failover (`POST /failover`), pending while its generation is current
/// and no renewal of the primary's lease has been applied since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub generation: u64,
    pub candidate: NodeId,
    pub event_index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub event_index: u64,
    pub new_generation: u64,
    pub decision: PromotionDecision,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub event_index: u64,
    pub event: Event,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Only grows. Each generation names at most one primary.
    pub generation: u64,
    /// The primary of `generation`, if any.
    pub primary: Option<NodeId>,
    /// The primary of `generation` resigned: failover may start at once.
    pub primary_resigned: bool,
    /// The primary of `generation` reported its PostgreSQL promoted (or was registered as a
    /// running primary).
    pub primary_ready: bool,
    /// Maintenance mode: no automatic failover.
    #[serde(default)]
    pub paused: bool,
    /// The synchronous standbys of `generation`'s primary (empty at each new generation).
    #[serde(default)]
    pub sync_set: std::collections::BTreeSet<NodeId>,
    /// The latest switchover request; it concerns `generation` while pending, and tells the old
    /// primary in the next generation that it stopped cleanly for it.
    #[serde(default)]
    pub switchover: Option<SwitchoverRecord>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub lease: Option<LeaseRecord>,
    /// The newest promotion decisions, oldest first, at most [`DECISIONS_MAX`].
    pub decisions: VecDeque<DecisionRecord>,
    /// The newest events with their outcomes, oldest first, at most [`RECENT_EVENTS_MAX`].
    pub recent: VecDeque<RecordedEvent>,
    /// Events applied in total, and how many of them were no-ops.
    pub events_applied: u64,
    pub events_no_op: u64,
    /// The index of the last event applied. Events are numbered 1, 2, 3, … in the order they
    /// are applied (the storage passes `last_event_index + 1`), whichever log entries carry them:
    /// the index orders and names events here and in the API.
    pub last_event_index: u64,
    /// The latest manual failover request; see [`ClusterState::pending_failover`].
    #[serde(default)]
    pub failover_request: Option<FailoverRecord>,
}

impl ClusterState {
    /// Applies one committed event, numbered `event_index` (greater than any applied before).
    pub fn apply(&mut self, event: &Event, event_index: u64) -> Outcome {
        assert!(
            event_index > self.last_event_index,
            "events must be applied in log order: {event_index} after {}",
            self.last_event_index
        );
        let generation_before = self.generation;

        let outcome = match event {
            Event::NodeRegistered(registration) => self.register(registration, event_index),
            Event::NodeUnregistered { node_id, .. } => self.unregister(*node_id),
            Event::HealthObserved(observation) => self.observe(observation, event_index),
            Event::LeaseRenewed {
                primary,
                generation,
            } => self.renew_lease(*primary, *generation, event_index),
            Event::PromotionDecided(decision) => self.promote(decision, event_index),
            Event::PrimaryResigned {
                primary,
                generation,
                ..
            } => self.resign(*primary, *generation),
            Event::PromotionCompleted {
                node_id,
                generation,
                ..
            } => self.promotion_completed(*node_id, *generation),
            Event::RejoinPlanned {
                node_id,
                generation,
                method,
                ..
            } => self.rejoin_planned(*node_id, *generation, *method, event_index),
            Event::RejoinCompleted {
                node_id,
                generation,
                ..
            } => self.rejoin_completed(*node_id, *generation),
            Event::SwitchoverRequested {
                primary,
                generation,
                candidate,
            } => self.request_switchover(*primary, *generation, *candidate, event_index),
            Event::Paused { .. } => self.set_paused(true),
            Event::Resumed => self.set_paused(false),
            Event::SyncSetChanged {
                generation,
                members,
            } => self.change_sync_set(*generation, members),
            Event::FailoverRequested {
                generation,
                candidate,
                ..
            } => self.request_failover(*generation, *candidate, event_index),
        };

        assert!(self.generation >= generation_before, "generation went back");
        assert!(
            self.primary.is_none_or(|p| self.nodes.contains_key(&p)),
            "the primary must be a registered node"
        );

        self.events_applied += 1;
        if !outcome.is_applied() {
            self.events_no_op += 1;
        }
        self.last_event_index = event_index;
        push_bounded(
            &mut self.recent,
            RecordedEvent {
                event_index,
                event: event.clone(),
                outcome: outcome.clone(),
            },
            RECENT_EVENTS_MAX,
        );
        outcome
    }

    pub fn node_by_name(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.registration.name == name)
    }

    fn register(&mut self, registration: &NodeRegistration, event_index: u64) -> Outcome {
        let id = registration.node_id;
        if let Some(existing) = self.nodes.get(&id) {
            return Outcome::no_op(format!(
                "node {id} is already registered as {:?}",
                existing.registration.name
            ));
        }
        if let Some(other) = self.node_by_name(&registration.name) {
            return Outcome::no_op(format!(
                "the name {:?} is already taken by node {}",
                registration.name, other.registration.node_id
            ));
        }
        if registration.role == PgRole::Primary {
            if let Some(primary) = self.primary {
                return Outcome::no_op(format!(
                    "node {primary} is already the primary of generation {}",
                    self.generation
                ));
            }
            // The first primary opens a new generation, exactly as a promotion does.
            self.open_generation(id);
            self.primary_ready = true;
        }
        self.nodes.insert(
            id,
            NodeRecord {
                registration: registration.clone(),
                registered_at_event_index: event_index,
                health: BTreeMap::new(),
                rejoining: None,
            },
        );
        Outcome::Applied
    }

    fn unregister(&mut self, node_id: NodeId) -> Outcome {
        if !self.nodes.contains_key(&node_id) {
            return Outcome::no_op(format!("node {node_id} is not registered"));
        }
        if self.primary == Some(node_id) {
            return Outcome::no_op(format!(
                "node {node_id} is the primary of generation {}; switch over first",
                self.generation
            ));
        }
        self.nodes.remove(&node_id);
        for node in self.nodes.values_mut() {
            node.health.remove(&node_id);
        }
        Outcome::Applied
    }

    fn observe(&mut self, observation: &Observation, event_index: u64) -> Outcome {
        let Some(node) = self.nodes.get_mut(&observation.subject) else {
            return Outcome::no_op(format!(
                "observed node {} is not registered",
                observation.subject
            ));
        };
        node.health.insert(
            observation.observer,
            HealthRecord {
                observation: observation.clone(),
                event_index,
            },
        );
        Outcome::Applied
    }

    fn renew_lease(&mut self, primary: NodeId, generation: u64, event_index: u64) -> Outcome {
        if generation != self.generation || self.primary != Some(primary) {
            return Outcome::no_op(format!(
                "stale lease renewal by node {primary} for generation {generation}; \
                 generation {} belongs to {}",
                self.generation,
                describe_primary(self.primary)
            ));
        }
        self.lease = Some(LeaseRecord {
            holder: primary,
            generation,
            event_index,
        });
        // A primary that renews its lease is alive: a manual failover does not apply to it.
        if !self.primary_resigned {
            self.failover_request = None;
        }
        Outcome::Applied
    }

    fn promote(&mut self, decision: &PromotionDecision, event_index: u64) -> Outcome {
        if decision.decided_for_generation != self.generation {
            return Outcome::no_op(format!(
                "stale decision: made for generation {}, but the cluster is at generation {}",
                decision.decided_for_generation, self.generation
            ));
        }
        let lease = self.lease.as_ref().map(|l| l.event_index);
        if decision.lease_event_index != lease {
            return Outcome::no_op(format!(
                "overtaken: decided on the lease renewal at event index {:?}, but the newest \
                 applied is at {:?} (the primary is alive)",
                decision.lease_event_index, lease
            ));
        }
        if !self.nodes.contains_key(&decision.candidate) {
            return Outcome::no_op(format!(
                "candidate node {} is not registered",
                decision.candidate
            ));
        }
        self.open_generation(decision.candidate);
        push_bounded(
            &mut self.decisions,
            DecisionRecord {
                event_index,
                new_generation: self.generation,
                decision: decision.clone(),
            },
            DECISIONS_MAX,
        );
        Outcome::Applied
    }
}

impl ClusterState {
    fn open_generation(&mut self, primary: NodeId) {
        self.generation += 1;
        self.primary = Some(primary);
        self.primary_resigned = false;
        self.primary_ready = false;
        self.lease = None;
        // The new primary starts with no synchronous standby; it adds one as they attach.
        self.sync_set.clear();
    }

    fn is_current_primary(&self, node: NodeId, generation: u64) -> Result<(), Outcome> {
        if generation != self.generation || self.primary != Some(node) {
            return Err(Outcome::no_op(format!(
                "stale: node {node} for generation {generation}, but generation {} belongs to {}",
                self.generation,
                describe_primary(self.primary)
            )));
        }
        Ok(())
    }

    fn change_sync_set(
        &mut self,
        generation: u64,
        members: &std::collections::BTreeSet<NodeId>,
    ) -> Outcome {
        if generation != self.generation {
            return Outcome::no_op(format!("stale sync set for generation {generation}"));
        }
        if let Some(bad) = members
            .iter()
            .find(|id| Some(**id) == self.primary || !self.nodes.contains_key(id))
        {
            return Outcome::no_op(format!("node {bad} cannot be a synchronous standby"));
        }
        self.sync_set = members.clone();
        Outcome::Applied
    }

    fn set_paused(&mut self, paused: bool) -> Outcome {
        if self.paused == paused {
            let already = if paused { "paused" } else { "not paused" };
            return Outcome::no_op(format!("automatic failover is already {already}"));
        }
        // Paused, the promotion that ends a switchover would wait with the old primary stopped.
        if let Some(switchover) = self.pending_switchover().filter(|_| paused) {
            return Outcome::no_op(format!(
                "a switchover is under way (event index {}); pause once it is done",
                switchover.event_index
            ));
        }
        self.paused = paused;
        Outcome::Applied
    }

    /// A switchover requested for the current generation and not carried out yet.
    pub fn pending_switchover(&self) -> Option<&SwitchoverRecord> {
        self.switchover
            .as_ref()
            .filter(|s| s.generation == self.generation)
    }

    fn request_switchover(
        &mut self,
        primary: NodeId,
        generation: u64,
        candidate: Option<NodeId>,
        event_index: u64,
    ) -> Outcome {
        if let Err(stale) = self.is_current_primary(primary, generation) {
            return stale;
        }
        if self.primary_resigned || !self.primary_ready {
            return Outcome::no_op(format!(
                "node {primary} is not a running primary; nothing to switch over"
            ));
        }
        // The primary would stop, and the promotion that ends a switchover waits for the resume.
        if self.paused {
            return Outcome::no_op(
                "automatic failover is paused, and the promotion that ends a switchover waits \
                 for the resume: resume first",
            );
        }
        if let Some(pending) = self.pending_switchover() {
            return Outcome::no_op(format!(
                "a switchover is already under way (event index {})",
                pending.event_index
            ));
        }
        if let Some(c) = candidate {
            if c == primary || !self.nodes.contains_key(&c) {
                return Outcome::no_op(format!("node {c} cannot be the switchover candidate"));
            }
        }
        self.switchover = Some(SwitchoverRecord {
            from: primary,
            generation,
            candidate,
            event_index,
        });
        Outcome::Applied
    }

    /// A manual failover requested for the current generation and not carried out or overtaken
    /// yet: no promotion since, and no lease renewal by a primary that has not resigned.
    pub fn pending_failover(&self) -> Option<&FailoverRecord> {
        self.failover_request
            .as_ref()
            .filter(|f| f.generation == self.generation)
    }

    fn request_failover(
        &mut self,
        generation: u64,
        candidate: NodeId,
        event_index: u64,
    ) -> Outcome {
        if generation != self.generation {
            return Outcome::no_op(format!(
                "stale failover request for generation {generation}; the cluster is at {}",
                self.generation
            ));
        }
        let Some(primary) = self.primary else {
            return Outcome::no_op("there is no primary to fail over from");
        };
        if candidate == primary {
            return Outcome::no_op(format!("node {candidate} is the primary"));
        }
        match self.nodes.get(&candidate) {
            None => return Outcome::no_op(format!("node {candidate} is not registered")),
            Some(n) if n.registration.nofailover => {
                return Outcome::no_op(format!("node {candidate} is tagged nofailover"))
            }
            Some(_) => {}
        }
        self.failover_request = Some(FailoverRecord {
            generation,
            candidate,
            event_index,
        });
        Outcome::Applied
    }

    fn resign(&mut self, primary: NodeId, generation: u64) -> Outcome {
        if let Err(stale) = self.is_current_primary(primary, generation) {
            return stale;
        }
        self.primary_resigned = true;
        self.primary_ready = false;
        self.lease = None;
        Outcome::Applied
    }

    fn promotion_completed(&mut self, node: NodeId, generation: u64) -> Outcome {
        if let Err(stale) = self.is_current_primary(node, generation) {
            return stale;
        }
        if self.primary_resigned {
            return Outcome::no_op(format!("node {node} resigned in generation {generation}"));
        }
        self.primary_ready = true;
        Outcome::Applied
    }

    fn rejoin_planned(
        &mut self,
        node: NodeId,
        generation: u64,
        method: RejoinMethod,
        event_index: u64,
    ) -> Outcome {
        if generation != self.generation {
            return Outcome::no_op(format!("stale rejoin plan for generation {generation}"));
        }
        if self.primary == Some(node) {
            return Outcome::no_op(format!("node {node} is the primary; it does not rejoin"));
        }
        let Some(record) = self.nodes.get_mut(&node) else {
            return Outcome::no_op(format!("node {node} is not registered"));
        };
        record.rejoining = Some(RejoinRecord {
            generation,
            method,
            event_index,
        });
        Outcome::Applied
    }

    fn rejoin_completed(&mut self, node: NodeId, generation: u64) -> Outcome {
        let Some(record) = self.nodes.get_mut(&node) else {
            return Outcome::no_op(format!("node {node} is not registered"));
        };
        if record.rejoining.as_ref().map(|r| r.generation) != Some(generation) {
            return Outcome::no_op(format!(
                "node {node} had no rejoin planned in generation {generation}"
            ));
        }
        record.rejoining = None;
        Outcome::Applied
    }
}

fn describe_primary(primary: Option<NodeId>) -> String {
    match primary {
        Some(id) => format!("node {id}"),
        None => "no primary".to_string(),
    }
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, max: usize) {
    if queue.len() == max {
        queue.pop_front();
    }
    queue.push_back(item);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::codec;
    use crate::event::CandidateAssessment;

    fn registration(id: NodeId, role: PgRole) -> NodeRegistration {
        NodeRegistration::for_tests(id, role)
    }

    /// A decision made on `state` as it is: on its newest lease renewal.
    fn decided_on(state: &ClusterState, for_generation: u64, candidate: NodeId) -> Event {
        Event::PromotionDecided(PromotionDecision {
            lease_event_index: state.lease.as_ref().map(|l| l.event_index),
            ..decision(for_generation, candidate)
        })
    }

    fn decision(for_generation: u64, candidate: NodeId) -> PromotionDecision {
        PromotionDecision {
            decided_for_generation: for_generation,
            lease_event_index: None,
            candidate,
            reason: "test".into(),
            candidates: vec![CandidateAssessment {
                node_id: candidate,
                lsn: Some(1),
                priority: 100,
                eligible: true,
                why: "highest LSN".into(),
            }],
        }
    }

    #[test]
    fn a_repeated_promotion_is_a_recorded_no_op() {
        let mut state = ClusterState::default();
        state.apply(&Event::NodeRegistered(registration(1, PgRole::Primary)), 1);
        state.apply(&Event::NodeRegistered(registration(2, PgRole::Standby)), 2);
        assert_eq!((state.generation, state.primary), (1, Some(1)));

        let promote = Event::PromotionDecided(decision(1, 2));
        assert_eq!(state.apply(&promote, 3), Outcome::Applied);
        assert_eq!((state.generation, state.primary), (2, Some(2)));

        let again = state.apply(&promote, 4);
        assert!(
            matches!(&again, Outcome::NoOp { reason } if reason.contains("stale decision")),
            "{again:?}"
        );
        assert_eq!((state.generation, state.primary), (2, Some(2)));
        assert_eq!(state.decisions.len(), 1);
        assert_eq!(state.recent.back().unwrap().outcome, again);
        assert_eq!(state.events_no_op, 1);
    }

    #[test]
    fn a_failover_request_lasts_until_a_promotion_or_a_live_primary_renews() {
        let mut state = ClusterState::default();
        state.apply(&Event::NodeRegistered(registration(1, PgRole::Primary)), 1);
        state.apply(&Event::NodeRegistered(registration(2, PgRole::Standby)), 2);
        let request = |generation, candidate| Event::FailoverRequested {
            generation,
            candidate,
            reason: "test".into(),
        };
        assert!(!state.apply(&request(1, 1), 3).is_applied(), "the primary");
        assert!(!state.apply(&request(1, 9), 4).is_applied(), "unknown");
        assert!(!state.apply(&request(0, 2), 5).is_applied(), "stale");
        assert!(state.pending_failover().is_none());

        assert!(state.apply(&request(1, 2), 6).is_applied());
        assert_eq!(state.pending_failover().map(|f| f.candidate), Some(2));
        let renew = Event::LeaseRenewed {
            primary: 1,
            generation: 1,
        };
        state.apply(&renew, 7);
        assert!(state.pending_failover().is_none(), "the primary is alive");

        state.apply(&request(1, 2), 8);
        let resign = Event::PrimaryResigned {
            primary: 1,
            generation: 1,
            reason: "test".into(),
        };
        state.apply(&resign, 9);
        state.apply(&renew, 10); // late, from before the resignation
        assert!(state.pending_failover().is_some());
        state.apply(&decided_on(&state, 1, 2), 11);
        assert!(state.pending_failover().is_none(), "carried out");
    }

    #[test]
    fn a_switchover_and_a_pause_exclude_each_other() {
        let mut state = ClusterState::default();
        state.apply(&Event::NodeRegistered(registration(1, PgRole::Primary)), 1);
        state.apply(&Event::NodeRegistered(registration(2, PgRole::Standby)), 2);
        let switchover = Event::SwitchoverRequested {
            primary: 1,
            generation: 1,
            candidate: Some(2),
        };
        let pause = Event::Paused {
            reason: "test".into(),
        };
        assert_eq!(state.apply(&switchover, 3), Outcome::Applied);
        let refused = state.apply(&pause, 4);
        assert!(
            matches!(&refused, Outcome::NoOp { reason } if reason.contains("switchover is under way")),
            "{refused:?}"
        );
        assert!(!state.paused);

        state.apply(&Event::PromotionDecided(decision(1, 2)), 5);
        let completed = Event::PromotionCompleted {
            node_id: 2,
            generation: 2,
            timeline: None,
            lsn: None,
        };
        state.apply(&completed, 6);
        assert!(state.pending_switchover().is_none(), "carried out");
        assert_eq!(state.apply(&pause, 7), Outcome::Applied);
        let back = Event::SwitchoverRequested {
            primary: 2,
            generation: 2,
            candidate: Some(1),
        };
        let refused = state.apply(&back, 8);
        assert!(
            matches!(&refused, Outcome::NoOp { reason } if reason.contains("paused")),
            "{refused:?}"
        );
        assert!(state.pending_switchover().is_none());
    }

    #[test]
    fn a_lease_for_an_old_generation_is_refused() {
        let mut state = ClusterState::default();
        state.apply(&Event::NodeRegistered(registration(1, PgRole::Primary)), 1);
        state.apply(&Event::NodeRegistered(registration(2, PgRole::Standby)), 2);
        let renew = |generation| Event::LeaseRenewed {
            primary: 1,
            generation,
        };
        assert_eq!(state.apply(&renew(1), 3), Outcome::Applied);
        // A decision made before that renewal is overtaken by it; one made after it applies.
        let overtaken = state.apply(&Event::PromotionDecided(decision(1, 2)), 4);
        assert!(!overtaken.is_applied(), "{overtaken:?}");
        assert_eq!(state.generation, 1);
        state.apply(&decided_on(&state, 1, 2), 5);
        assert_eq!(state.generation, 2);
        assert!(state.lease.is_none());
        assert!(!state.apply(&renew(1), 6).is_applied());
        assert!(state.lease.is_none());
    }

    #[test]
    fn the_primary_cannot_be_unregistered_and_a_name_cannot_be_reused() {
        let mut state = ClusterState::default();
        state.apply(&Event::NodeRegistered(registration(1, PgRole::Primary)), 1);
        let unregister = Event::NodeUnregistered {
            node_id: 1,
            reason: "test".into(),
        };
        assert!(!state.apply(&unregister, 2).is_applied());
        let mut same_name = registration(2, PgRole::Standby);
        same_name.name = "node1".into();
        assert!(!state
            .apply(&Event::NodeRegistered(same_name), 3)
            .is_applied());
        assert_eq!(state.nodes.len(), 1);
    }

    /// Events over a small id space, so that collisions (re-registration, stale decisions,
    /// unregistering the primary) happen often.
    fn arb_event() -> impl Strategy<Value = Event> {
        let id = 1u64..5;
        prop_oneof![
            (id.clone(), any::<bool>()).prop_map(|(id, primary)| Event::NodeRegistered(
                registration(
                    id,
                    if primary {
                        PgRole::Primary
                    } else {
                        PgRole::Standby
                    }
                )
            )),
            id.clone().prop_map(|node_id| Event::NodeUnregistered {
                node_id,
                reason: "test".into()
            }),
            (id.clone(), id.clone(), any::<bool>(), 0u64..1000).prop_map(
                |(observer, subject, reachable, lsn)| Event::HealthObserved(Observation {
                    observer,
                    subject,
                    reachable,
                    in_recovery: Some(true),
                    timeline: Some(1),
                    lsn: Some(lsn),
                    replayed_lsn: Some(lsn),
                    lag_bytes: None,
                    wal_receiver: None,
                    replicas: vec![],
                })
            ),
            (id.clone(), 0u64..6).prop_map(|(primary, generation)| Event::LeaseRenewed {
                primary,
                generation
            }),
            (0u64..6, id.clone()).prop_map(|(generation, candidate)| Event::PromotionDecided(
                decision(generation, candidate)
            )),
            (id.clone(), 0u64..6).prop_map(|(primary, generation)| Event::PrimaryResigned {
                primary,
                generation,
                reason: "test".into()
            }),
            (id.clone(), 0u64..6).prop_map(|(node_id, generation)| Event::PromotionCompleted {
                node_id,
                generation,
                timeline: None,
                lsn: None
            }),
            (id.clone(), 0u64..6, prop::option::of(id.clone())).prop_map(
                |(primary, generation, candidate)| Event::SwitchoverRequested {
                    primary,
                    generation,
                    candidate
                }
            ),
            (0u64..6, id.clone()).prop_map(|(generation, candidate)| Event::FailoverRequested {
                generation,
                candidate,
                reason: "test".into()
            }),
            any::<bool>().prop_map(|pause| if pause {
                Event::Paused {
                    reason: "test".into(),
                }
            } else {
                Event::Resumed
            }),
        ]
    }

    fn apply_all(state: &mut ClusterState, events: &[Event], first_index: u64) {
        for (i, event) in events.iter().enumerate() {
            state.apply(event, first_index + i as u64);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn replicas_applying_the_same_log_are_equal(events in prop::collection::vec(arb_event(), 0..200)) {
            let mut a = ClusterState::default();
            let mut b = ClusterState::default();
            apply_all(&mut a, &events, 1);
            apply_all(&mut b, &events, 1);
            prop_assert_eq!(codec::encode(&a), codec::encode(&b));
            prop_assert_eq!(a, b);
        }

        #[test]
        fn generation_never_decreases_and_names_one_primary(events in prop::collection::vec(arb_event(), 0..200)) {
            let mut state = ClusterState::default();
            let mut primary_of_generation: BTreeMap<u64, NodeId> = BTreeMap::new();
            for (i, event) in events.iter().enumerate() {
                let before = state.generation;
                state.apply(event, i as u64 + 1);
                prop_assert!(state.generation >= before);
                prop_assert!(state.generation <= before + 1, "a generation is skipped");
                if let Some(primary) = state.primary {
                    let named = *primary_of_generation.entry(state.generation).or_insert(primary);
                    prop_assert_eq!(named, primary, "two primaries in generation {}", state.generation);
                }
            }
        }

        #[test]
        fn never_paused_with_a_switchover_under_way(events in prop::collection::vec(arb_event(), 0..200)) {
            let mut state = ClusterState::default();
            for (i, event) in events.iter().enumerate() {
                state.apply(event, i as u64 + 1);
                prop_assert!(
                    !(state.paused && state.pending_switchover().is_some()),
                    "paused with a switchover under way after {:?}", event
                );
            }
        }

        #[test]
        fn snapshot_then_rest_of_log_equals_whole_log(
            events in prop::collection::vec(arb_event(), 0..200),
            cut in any::<prop::sample::Index>(),
        ) {
            let cut = if events.is_empty() { 0 } else { cut.index(events.len() + 1) };
            let mut whole = ClusterState::default();
            apply_all(&mut whole, &events, 1);

            let mut before = ClusterState::default();
            apply_all(&mut before, &events[..cut], 1);
            let mut restored: ClusterState =
                codec::decode("snapshot", &codec::encode(&before)).unwrap();
            apply_all(&mut restored, &events[cut..], cut as u64 + 1);
            prop_assert_eq!(restored, whole);
        }
    }
}
