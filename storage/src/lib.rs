//! The sled-backed store openraft runs on: the Raft log, the vote, the committed log id, and
//! state-machine snapshots. The only crate that knows sled.
//!
//! **Crash safety.** A vote, appended entries, a truncation or a purge is flushed (fsync) before
//! openraft is told it is durable. The state machine itself lives in memory; it is persisted only
//! as snapshots. On start it is rebuilt from the newest snapshot, and openraft re-applies the
//! committed entries after it (they are never purged before a snapshot covers them).
//!
//! **How the log store flushes.** Every log-store write ([`LogStore`]: `save_vote`, `append`,
//! `truncate`, `purge`) writes to sled and then calls sled's synchronous `flush` on the calling
//! task, before it returns (`append`: before it reports the entries to openraft's `LogFlushed`
//! callback, which it does before returning). sled's flush is database-wide, so it also persists
//! anything written before it (e.g. the committed log id, which is never flushed on its own). So
//! all log IO is durable in the order openraft issued it, and nothing is reported durable early:
//!
//! * A vote is on disk before `save_vote` returns; entries are on disk before the callback says
//!   so, and openraft counts the leader's own copy towards a quorum only after that callback.
//! * A truncation or purge is on disk before it returns, so a restart never sees truncated
//!   entries come back, or a purge pointer beyond the entries that exist.
//! * A failed flush is returned as a `StorageError` (and, for `append`, also given to the
//!   callback); openraft treats it as fatal and stops the node.
//!
//! (Caveat, unchanged by the above: on Linux sled 0.34's flush ends in `sync_file_range`, not
//! `fsync`. That covers a crash of the process, not necessarily a power loss: file metadata and
//! the device's write cache are synced by sled's periodic flusher, every 500 ms.)
//!
//! Why not return from `append` before the flush and let one background flusher complete the
//! callbacks of several appends with one flush (group commit)? The v2 contract allows it, but
//! openraft 0.9.25's `RaftCore::append_to_log` awaits each append's callback before it does
//! anything else, so there is never more than one append in flight: such a flusher would never
//! have two callbacks to coalesce and would only add a hand-off. (openraft 0.10 makes the append
//! non-blocking; revisit then.) What the hot path does gain is doing the flush on the calling
//! thread instead of `flush_async`, which hands it to sled's thread pool (whose `spawn` wakes
//! every idle pool thread) and wakes the task again afterwards; the Raft core waits for the
//! flush either way. The cost is that the tokio worker running the Raft core is blocked for one
//! sync (about 0.2 ms on the benchmark machine); other tasks run on the other workers (the agent
//! has one per CPU, so on a single-CPU host they wait for the sync too).
//! Snapshots, which are larger and rare, still use `flush_async`.
//!
//! **Format.** Every value is a versioned record: one byte [`FORMAT_VERSION`], then bincode.

// openraft's trait signatures fix the error type (`StorageError`, large); helpers return it too.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageIOError, Vote,
};
use raftmgr_raft::codec;
use raftmgr_raft::types::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership};
use raftmgr_raft::{Applied, ClusterState, NodeId, TypeConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The version byte in front of every stored record. 2: `PromotionDecision.lease_log_index`,
/// `Event::FailoverRequested` and `ClusterState.failover_request`. 3: an entry carries a list of
/// events, numbered by their own event index (`ClusterState.last_event_index`). A store of another version is
/// refused with an error naming both versions (no upgrade chain yet: raftmgr is pre-release, and
/// a cluster is upgraded by re-initialising its agents' stores; PostgreSQL is untouched).
pub const FORMAT_VERSION: u8 = 3;

/// sled's page cache; the data is small (a compacted log of cluster events).
const CACHE_CAPACITY_BYTES: u64 = 8 * 1024 * 1024;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"current";

type StorageResult<T> = Result<T, StorageError>;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the Raft store at {path}: {source}")]
    Sled {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("the Raft store at {path} is unreadable: {message}")]
    Corrupt { path: String, message: String },
}

/// A store just opened: the halves openraft takes, and a read-only view for everyone else.
pub struct Opened {
    pub log: LogStore,
    pub state_machine: StateMachineStore,
    pub view: StoreView,
}

/// What the store held when it was opened, before any peer was contacted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtOpen {
    pub last_log_index: Option<u64>,
    pub snapshot_index: Option<u64>,
}

/// Opens (or creates) the store in `dir`.
pub fn open(dir: &Path) -> Result<Opened, OpenError> {
    let path = dir.display().to_string();
    let sled_error = |source| OpenError::Sled {
        path: path.clone(),
        source,
    };
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_CAPACITY_BYTES)
        .open()
        .map_err(sled_error)?;
    let logs = db.open_tree("logs").map_err(sled_error)?;
    let meta = db.open_tree("meta").map_err(sled_error)?;
    let snapshots = db.open_tree("snapshots").map_err(sled_error)?;

    let current: Option<StoredSnapshot> = snapshots
        .get(KEY_SNAPSHOT)
        .map_err(sled_error)?
        .map(|bytes| read_record("snapshot", &bytes))
        .transpose()
        .map_err(|message| OpenError::Corrupt {
            path: path.clone(),
            message,
        })?;
    let machine = match &current {
        Some(snapshot) => Machine {
            last_applied: snapshot.meta.last_log_id,
            last_membership: snapshot.meta.last_membership.clone(),
            state: codec::decode("snapshot data", &snapshot.data).map_err(|e| {
                OpenError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?,
        },
        None => Machine::default(),
    };

    let last_log_index = logs
        .last()
        .map_err(sled_error)?
        .map(|(key, _)| index_of(&key));
    let at_open = AtOpen {
        last_log_index: last_log_index.or(machine.last_applied.map(|id| id.index)),
        snapshot_index: current
            .as_ref()
            .and_then(|s| s.meta.last_log_id)
            .map(|id| id.index),
    };
    let stats = Arc::new(Stats::default());
    let machine = Arc::new(RwLock::new(machine));
    let view = StoreView {
        machine: machine.clone(),
        stats: stats.clone(),
        logs: logs.clone(),
        at_open,
    };
    let log = LogStore {
        db: db.clone(),
        logs,
        meta,
    };
    let state_machine = StateMachineStore {
        db,
        snapshots,
        machine,
        stats,
    };
    Ok(Opened {
        log,
        state_machine,
        view,
    })
}

fn index_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().expect("log keys are 8 bytes"))
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

fn write_record<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = vec![FORMAT_VERSION];
    bytes.extend(codec::encode(value));
    bytes
}

fn read_record<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => codec::decode(what, body).map_err(|e| e.to_string()),
        Some((version, _)) => Err(format!(
            "{what} has format version {version}; this build reads version {FORMAT_VERSION}"
        )),
        None => Err(format!("{what} is empty")),
    }
}

/// An error message as an `std::error::Error`, for openraft's error constructors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    logs: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        let bytes = self.meta.get(key).map_err(|e| StorageIOError::read(&e))?;
        bytes
            .map(|b| read_record("log metadata", &b))
            .transpose()
            .map_err(|e| StorageIOError::read(&Message(e)).into())
    }

    /// Writes sled's dirty buffers and syncs them, on the calling thread (see the module docs
    /// for why not `flush_async`). Everything written before the call is durable after it.
    fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush().map(|_| ())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        for item in self.logs.range(log_key(start)..) {
            let (key, bytes) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = index_of(&key);
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = read_record("log entry", &bytes)
                .map_err(|e| StorageIOError::read_log_at_index(index, &Message(e)))?;
            assert_eq!(
                entry.log_id.index, index,
                "log entry stored under the wrong key"
            );
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last = self
            .logs
            .last()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last_log_id = match last {
            Some((_, bytes)) => {
                let entry: Entry = read_record("log entry", &bytes)
                    .map_err(|e| StorageIOError::read_logs(&Message(e)))?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.meta
            .insert(KEY_VOTE, write_record(vote))
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.flush().map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StorageResult<()> {
        // Not flushed here: the entries it points at are, and openraft re-derives the committed
        // index from a quorum after a crash. The next flush persists it.
        self.meta
            .insert(KEY_COMMITTED, write_record(&committed))
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId>> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut records: Vec<_> = entries
            .into_iter()
            .map(|entry| (log_key(entry.log_id.index), write_record(&entry)))
            .collect();
        // One entry (always so on the leader: openraft 0.9 appends each client write on its
        // own) is a plain insert: sled writes a batch's manifest as a record of its own, which
        // cost the leader a second write and sync per event. Several entries (a follower's
        // append) stay one atomic batch.
        let written = if records.len() == 1 {
            let (key, value) = records.remove(0);
            self.logs.insert(key, value).map(drop)
        } else {
            let mut batch = sled::Batch::default();
            for (key, value) in records {
                batch.insert(&key, value);
            }
            self.logs.apply_batch(batch)
        };
        written.map_err(|e| StorageIOError::write_logs(&e))?;
        // Durable before openraft hears of it; the callback is completed before returning, so
        // no append is ever left pending (also not on shutdown).
        let flushed = self.flush();
        let result = flushed
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(result);
        flushed.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> StorageResult<()> {
        tracing::debug!("truncating the log from index {}", log_id.index);
        self.remove_logs(log_key(log_id.index)..)
    }

    async fn purge(&mut self, log_id: LogId) -> StorageResult<()> {
        tracing::debug!("purging the log up to index {}", log_id.index);
        self.meta
            .insert(KEY_LAST_PURGED, write_record(&log_id))
            .map_err(|e| StorageIOError::write(&e))?;
        self.remove_logs(..=log_key(log_id.index))
    }
}

impl LogStore {
    fn remove_logs<R: RangeBounds<[u8; 8]>>(&self, range: R) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for item in self.logs.range(range) {
            let (key, _) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            batch.remove(key);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush().map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

/// The state machine: the [`ClusterState`] plus what openraft needs to know about it.
#[derive(Debug, Default, Clone)]
struct Machine {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    state: ClusterState,
}

/// Counters about snapshots, for status and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub snapshots_built: AtomicU64,
    pub snapshots_installed: AtomicU64,
}

#[derive(Clone)]
pub struct StateMachineStore {
    db: sled::Db,
    snapshots: sled::Tree,
    machine: Arc<RwLock<Machine>>,
    stats: Arc<Stats>,
}

/// A read-only handle on the store, for the API.
#[derive(Clone)]
pub struct StoreView {
    machine: Arc<RwLock<Machine>>,
    stats: Arc<Stats>,
    logs: sled::Tree,
    at_open: AtOpen,
}

impl StoreView {
    pub fn cluster_state(&self) -> ClusterState {
        self.machine.read().expect("state lock").state.clone()
    }

    /// The index of the last log entry applied to the state: the state changes only with it.
    pub fn last_applied_index(&self) -> Option<u64> {
        let machine = self.machine.read().expect("state lock");
        machine.last_applied.map(|id| id.index)
    }

    /// A copy of the applied state, with the index of the last log entry applied to it.
    pub fn applied_state(&self) -> (Option<u64>, ClusterState) {
        let machine = self.machine.read().expect("state lock");
        (
            machine.last_applied.map(|id| id.index),
            machine.state.clone(),
        )
    }

    /// Runs `f` on the applied state without copying it.
    pub fn with<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.machine.read().expect("state lock").state)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// How many entries the log holds on disk, after purging: from its first key to its last,
    /// since a Raft log has no gaps (sled's `len` would read every entry).
    pub fn log_entries_on_disk(&self) -> usize {
        let index = |entry: sled::Result<Option<(sled::IVec, sled::IVec)>>| {
            entry.ok().flatten().map(|(key, _)| index_of(&key))
        };
        match (index(self.logs.first()), index(self.logs.last())) {
            (Some(first), Some(last)) => (last - first + 1) as usize,
            _ => 0,
        }
    }

    pub fn at_open(&self) -> AtOpen {
        self.at_open
    }
}

impl StateMachineStore {
    /// Stores `snapshot` as the current one and flushes: durable before openraft hears of it.
    async fn persist_snapshot(&self, snapshot: &StoredSnapshot) -> StorageResult<()> {
        let failed =
            |e: &sled::Error| StorageIOError::write_snapshot(Some(snapshot.meta.signature()), e);
        self.snapshots
            .insert(KEY_SNAPSHOT, write_record(snapshot))
            .map_err(|e| failed(&e))?;
        self.db.flush_async().await.map_err(|e| failed(&e))?;
        Ok(())
    }

    fn current_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        let bytes = self
            .snapshots
            .get(KEY_SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        bytes
            .map(|b| read_record("snapshot", &b))
            .transpose()
            .map_err(|e| StorageIOError::read_snapshot(None, &Message(e)).into())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot> {
        let (last_applied, last_membership, data) = {
            let machine = self.machine.read().expect("state lock");
            (
                machine.last_applied,
                machine.last_membership.clone(),
                codec::encode(&machine.state),
            )
        };
        let sequence = self.stats.snapshots_built.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{sequence}", id.leader_id, id.index),
            None => format!("none-{sequence}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.persist_snapshot(&stored).await?;
        tracing::info!(snapshot = %meta.snapshot_id, "built a snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId>, StoredMembership)> {
        let machine = self.machine.read().expect("state lock");
        Ok((machine.last_applied, machine.last_membership.clone()))
    }

    /// One reply per entry: the result of each event it carries (none for a blank or a
    /// membership entry). Events are numbered on from the last one applied, so replicas number
    /// them alike however the leader grouped them into entries.
    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Vec<Applied>>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut machine = self.machine.write().expect("state lock");
        let mut replies = Vec::new();
        for entry in entries {
            let log_index = entry.log_id.index;
            machine.last_applied = Some(entry.log_id);
            let applied = match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(events) => events
                    .iter()
                    .map(|event| {
                        let event_index = machine.state.last_event_index + 1;
                        let outcome = machine.state.apply(event, event_index);
                        Applied {
                            log_index,
                            event_index,
                            outcome,
                        }
                    })
                    .collect(),
                EntryPayload::Membership(membership) => {
                    machine.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    Vec::new()
                }
            };
            replies.push(applied);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let state: ClusterState = codec::decode("snapshot data", &data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.persist_snapshot(&stored).await?;
        *self.machine.write().expect("state lock") = Machine {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            state,
        };
        self.stats
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(snapshot = %meta.snapshot_id, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot>> {
        Ok(self.current_snapshot()?.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
