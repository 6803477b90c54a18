//! raftmgr's Raft layer: the openraft type config, the replicated [`Event`]s, the deterministic
//! [`ClusterState`] they build, and the Raft RPC network (bincode bodies over HTTP).
//!
//! `event` and `state` are pure: no clock, no I/O, no randomness. Everything that talks to the
//! network lives in `network`, `server` and `forward`.

pub mod codec;
pub mod decide;
pub mod event;
pub mod forward;
pub mod network;
pub mod reconcile;
pub mod server;
pub mod state;
pub mod types;

pub mod summary;

pub use event::{
    CandidateAssessment, Event, NodeRegistration, Observation, PgRole, PromotionDecision,
    RejoinMethod, ReplicaStatus,
};
pub use state::{ClusterState, Outcome};
pub use summary::NodeSummary;
pub use types::{Applied, Member, NodeId, Raft, TypeConfig};

/// The HTTP header that carries the cluster secret on every Raft RPC.
pub const SECRET_HEADER: &str = "x-raftmgr-cluster-secret";
