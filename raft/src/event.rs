//! The events of the replicated log. The log is the audit trail: every fact a failover depends on
//! is one of these, committed by a majority before any node acts on it.
//!
//! **On-disk API.** Entries are stored and shipped with bincode, which identifies an enum variant
//! by its position. Only ever *append* variants (and fields only in a new variant); never reorder,
//! rename into a different meaning, or remove one. `storage` wraps every record in a versioned
//! envelope so that a future format change has somewhere to go.

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// The role a node is registered with. Which node *is* the primary is decided by the committed
/// state (`ClusterState::primary`), not by this field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgRole {
    Primary,
    Standby,
}

/// A database node joining the cluster (repmgr's `primary register` / `standby register`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub node_id: NodeId,
    pub name: String,
    pub role: PgRole,
    /// The node this standby streams from, if any.
    pub upstream: Option<NodeId>,
    /// The node agent's HTTP API, `host:port`.
    pub api_addr: String,
    /// The libpq conninfo peers use to reach this node's PostgreSQL.
    pub pg_conninfo: String,
    /// Higher wins among candidates with the same LSN.
    pub priority: u32,
    /// Never promote this node.
    pub nofailover: bool,
    /// Never make this node a synchronous standby.
    pub nosync: bool,
}

impl NodeRegistration {
    /// A registration with made-up addresses, for tests and benchmarks: `node{id}`, priority
    /// 100, no tags.
    pub fn for_tests(node_id: NodeId, role: PgRole) -> Self {
        NodeRegistration {
            node_id,
            name: format!("node{node_id}"),
            role,
            upstream: None,
            api_addr: String::new(),
            pg_conninfo: String::new(),
            priority: 100,
            nofailover: false,
            nosync: false,
        }
    }
}

/// What one agent saw of one node's PostgreSQL. Recorded when something changes and as a bounded
/// periodic summary, never on every probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub observer: NodeId,
    pub subject: NodeId,
    pub reachable: bool,
    pub in_recovery: Option<bool>,
    pub timeline: Option<u32>,
    /// On a primary its current WAL insert LSN; on a standby the last LSN received.
    pub lsn: Option<u64>,
    pub replayed_lsn: Option<u64>,
    pub lag_bytes: Option<u64>,
    /// On a standby, the WAL receiver's status (`streaming`, `catchup`, ...).
    pub wal_receiver: Option<String>,
    /// The standbys streaming from the subject, as its own `pg_stat_replication` shows them.
    /// Only in a node's observation of itself.
    pub replicas: Vec<ReplicaStatus>,
}

/// One row of `pg_stat_replication`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The standby's `application_name`: raftmgr sets it to the node's name.
    pub name: String,
    pub state: String,
    pub sync_state: String,
    pub replay_lsn: Option<u64>,
    pub replay_lag_ms: Option<u64>,
}

/// How the decision engine judged one candidate for promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateAssessment {
    pub node_id: NodeId,
    pub lsn: Option<u64>,
    pub priority: u32,
    pub eligible: bool,
    /// Why it won, lost or was not eligible.
    pub why: String,
}

/// The Raft leader's decision to promote `candidate`. Compare-and-set: it takes effect only if the
/// cluster is still at `decided_for_generation` and no lease renewal was applied after the one
/// the decision saw (`lease_event_index`); then the generation becomes
/// `decided_for_generation + 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionDecision {
    pub decided_for_generation: u64,
    /// The event index of the newest lease renewal in the state the decision was made on (`None`:
    /// none in that generation). The leader decides on a state, probes the candidates, then
    /// proposes: a renewal committed meanwhile proves the primary alive, and the decision it
    /// overtook must not depose it (found by the chaos lab: writes acknowledged by a primary
    /// that had just renewed, lost to a promotion decided before the renewal).
    pub lease_event_index: Option<u64>,
    pub candidate: NodeId,
    pub reason: String,
    pub candidates: Vec<CandidateAssessment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    NodeRegistered(NodeRegistration),
    NodeUnregistered {
        node_id: NodeId,
        reason: String,
    },
    HealthObserved(Observation),
    /// The primary's agent renewing its lease for `generation`.
    LeaseRenewed {
        primary: NodeId,
        generation: u64,
    },
    PromotionDecided(PromotionDecision),
    /// The primary's agent saw its PostgreSQL die, made sure no postmaster of its data directory
    /// runs, and gives up the primary role: failover may start without waiting for the lease.
    PrimaryResigned {
        primary: NodeId,
        generation: u64,
        reason: String,
    },
    /// The candidate of `generation` has promoted its PostgreSQL.
    PromotionCompleted {
        node_id: NodeId,
        generation: u64,
        timeline: Option<u32>,
        lsn: Option<u64>,
    },
    /// A former primary (or a diverged standby) will be brought back as a standby.
    RejoinPlanned {
        node_id: NodeId,
        generation: u64,
        method: RejoinMethod,
        reason: String,
    },
    /// The node runs as a standby again: its PostgreSQL started and is consistent (its WAL
    /// receiver may still be connecting); `duration_ms` from the start of the rejoin.
    RejoinCompleted {
        node_id: NodeId,
        generation: u64,
        method: RejoinMethod,
        duration_ms: u64,
    },
    /// A planned switchover: the primary of `generation` stops cleanly and resigns, and the
    /// leader promotes `candidate` (or the best standby).
    SwitchoverRequested {
        primary: NodeId,
        generation: u64,
        candidate: Option<NodeId>,
    },
    /// Maintenance: no automatic failover until `Resumed`.
    Paused {
        reason: String,
    },
    Resumed,
    /// The standbys the primary of `generation` waits for (synchronous mode). Only these may be
    /// promoted while synchronous mode is on.
    SyncSetChanged {
        generation: u64,
        members: std::collections::BTreeSet<NodeId>,
    },
    /// An operator's manual failover to `candidate` (`POST /failover`), for the primary of
    /// `generation` that is down or resigned. The leader promotes `candidate` once the old
    /// primary's lease is dead — even while paused — and only if `candidate` is eligible.
    FailoverRequested {
        generation: u64,
        candidate: NodeId,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejoinMethod {
    /// pg_rewind against the new primary, then start as its standby.
    Rewind,
    /// Only repoint `primary_conninfo`: nothing diverged.
    Follow,
    /// pg_rewind could not work: a fresh base backup from the primary (the old data directory
    /// is kept aside, not deleted).
    Reclone,
}

/// Every [`Event::kind`], in the order of the variants: the values a type filter accepts.
pub const EVENT_KINDS: [&str; 14] = [
    "NodeRegistered",
    "NodeUnregistered",
    "HealthObserved",
    "LeaseRenewed",
    "PromotionDecided",
    "PrimaryResigned",
    "PromotionCompleted",
    "RejoinPlanned",
    "RejoinCompleted",
    "SwitchoverRequested",
    "Paused",
    "Resumed",
    "SyncSetChanged",
    "FailoverRequested",
];

impl Event {
    /// A short type name, for filters and tables. A new variant's name goes into [`EVENT_KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Event::NodeRegistered(_) => "NodeRegistered",
            Event::NodeUnregistered { .. } => "NodeUnregistered",
            Event::HealthObserved(_) => "HealthObserved",
            Event::LeaseRenewed { .. } => "LeaseRenewed",
            Event::PromotionDecided(_) => "PromotionDecided",
            Event::PrimaryResigned { .. } => "PrimaryResigned",
            Event::PromotionCompleted { .. } => "PromotionCompleted",
            Event::RejoinPlanned { .. } => "RejoinPlanned",
            Event::RejoinCompleted { .. } => "RejoinCompleted",
            Event::SwitchoverRequested { .. } => "SwitchoverRequested",
            Event::Paused { .. } => "Paused",
            Event::Resumed => "Resumed",
            Event::SyncSetChanged { .. } => "SyncSetChanged",
            Event::FailoverRequested { .. } => "FailoverRequested",
        }
    }

    /// The node the event is about, if it is about one.
    pub fn subject(&self) -> Option<NodeId> {
        Some(match self {
            Event::NodeRegistered(r) => r.node_id,
            Event::NodeUnregistered { node_id, .. } => *node_id,
            Event::HealthObserved(o) => o.subject,
            Event::LeaseRenewed { primary, .. } => *primary,
            Event::PromotionDecided(d) => d.candidate,
            Event::PrimaryResigned { primary, .. } | Event::SwitchoverRequested { primary, .. } => {
                *primary
            }
            Event::PromotionCompleted { node_id, .. }
            | Event::RejoinPlanned { node_id, .. }
            | Event::RejoinCompleted { node_id, .. } => *node_id,
            Event::FailoverRequested { candidate, .. } => *candidate,
            Event::Paused { .. } | Event::Resumed | Event::SyncSetChanged { .. } => return None,
        })
    }
}
