//! What a chaos run records: every write attempt with its outcome, every fault, the generations
//! the lab saw committed, every agent's applied event log, and the databases after healing. The
//! checkers judge this record alone, so a run can be re-judged from its `history.json`.
//!
//! Times are milliseconds since the start of the run, on the lab's monotonic clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub seed: u64,
    pub nodes: usize,
    /// `off`, `on` or `strict`.
    pub synchronous_mode: String,
    /// `namespaces` (faults drop real packets) or `loopback` (process faults only).
    pub network: String,
    pub writes: Vec<Write>,
    pub faults: Vec<Fault>,
    /// Each new generation, the first time the lab saw it in any node's committed state.
    pub generations: Vec<GenerationSeen>,
    /// Every agent's applied events by log index, gathered from `GET /events` during the run.
    pub logs: BTreeMap<String, BTreeMap<u64, String>>,
    /// An agent reported two different events for one log index at different times.
    pub log_rewrites: Vec<String>,
    /// When the last fault was healed.
    pub healed_ms: Option<f64>,
    /// The cluster after healing: `None` when it did not converge within the bound.
    pub converged_ms: Option<f64>,
    pub convergence_error: Option<String>,
    pub finals: Vec<NodeFinal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged: the commit returned success.
    Ok,
    /// Definitely not committed: no connection, or refused before it could commit.
    Failed,
    /// No answer, or the connection broke during the statement: may or may not have committed.
    Unknown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Write {
    pub id: i64,
    /// `libpq` (multi-host conninfo, `target_session_attrs=read-write`) or `api` (the node whose
    /// `GET /primary` answers 200).
    pub client: String,
    pub start_ms: f64,
    pub end_ms: f64,
    pub outcome: Outcome,
    /// The node (`cluster_name`) that answered, when known.
    pub node: Option<String>,
    /// The PostgreSQL timeline the row was written on, when acknowledged.
    pub timeline: Option<u32>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    /// The nemesis, e.g. `kill-postgres`, `partition-primary`.
    pub kind: String,
    /// The nodes it hit, by name.
    pub targets: Vec<String>,
    pub start_ms: f64,
    /// When it was healed (the process restarted or resumed, the partition removed).
    pub end_ms: Option<f64>,
    pub note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationSeen {
    pub generation: u64,
    /// The primary the committed state names for it.
    pub primary: Option<String>,
    pub seen_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeFinal {
    pub name: String,
    /// PostgreSQL answered.
    pub running: bool,
    pub in_recovery: Option<bool>,
    /// The timeline it writes (a primary) or replays (a standby).
    pub timeline: Option<u32>,
    /// `pg_stat_wal_receiver.status`, on a standby.
    pub receiver_status: Option<String>,
    /// The node its WAL receiver streams from (`application_name`'s upstream, by name).
    pub upstream: Option<String>,
    /// The committed state's primary and generation, as this node's agent reports them.
    pub committed_primary: Option<String>,
    pub generation: Option<u64>,
    /// Every id in the test table, sorted.
    pub ids: Vec<i64>,
}

impl History {
    /// The node the committed state names as primary after healing, if all agents agree and
    /// its PostgreSQL answered.
    pub fn final_primary(&self) -> Option<&NodeFinal> {
        let named = self.finals.first()?.committed_primary.clone()?;
        if self
            .finals
            .iter()
            .any(|f| f.committed_primary.as_ref() != Some(&named))
        {
            return None;
        }
        self.finals.iter().find(|f| f.name == named && f.running)
    }
}
