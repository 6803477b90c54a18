//! The openraft type configuration.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::state::Outcome;

pub type NodeId = u64;

/// What the Raft membership knows of a member: where to reach its Raft RPC and its HTTP API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of the member's Raft RPC listener.
    pub raft_addr: String,
    /// `host:port` of the member's HTTP API.
    pub api_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

/// What one Raft log entry carries: one or more events, applied in order. The leader puts the
/// events proposed while an earlier entry is being written into one entry (see
/// [`crate::forward::Leader`]), so that many events share one disk sync.
pub type Events = Vec<Event>;

/// The result of applying one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The Raft log entry that carried the event.
    pub log_index: u64,
    /// The event's own index: events are numbered 1, 2, 3, … in the order they are applied,
    /// whichever entries carry them. It orders and names events in the state and the API.
    pub event_index: u64,
    pub outcome: Outcome,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Events,
        R = Vec<Applied>,
        NodeId = NodeId,
        Node = Member,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Member>;
