// openraft fixes the error type of the storage traits.
#![allow(clippy::result_large_err)]

//! What the log store reports as durable survives the process dying right afterwards.
//!
//! A child process (this test binary, run again with [`CHILD_ENV`] set) writes through the store
//! and then ends at once with `std::process::exit`, which runs no destructors: sled gets no
//! flush on drop, and its periodic flusher (every 500 ms) is unlikely to run in between. The
//! parent reopens the store and checks that every vote, append (once its callback reported it),
//! truncation and purge is there. The control case shows that this harness does lose a sled
//! write that was never flushed, so the checks catch a missing flush (with the flush removed,
//! at least the last appended batch is lost).
//!
//! This is a process crash, not a power loss: it shows that the data left sled's in-memory
//! buffers before openraft was told, not what the disk kept.

use std::path::Path;
use std::process::Command;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::testing::log_id;
use openraft::{EntryPayload, RaftLogReader, Vote};
use raftmgr_raft::types::{Entry, LogId};

/// Set in the child: `<step>:<store folder>`.
const CHILD_ENV: &str = "RAFTMGR_STORAGE_CRASH_CHILD";
const ENTRIES: u64 = 100;
const BATCH: u64 = 10;
const TRUNCATE_AT: u64 = 51;
const PURGE_UPTO: u64 = 20;

fn vote() -> Vote<u64> {
    Vote::new_committed(3, 1)
}

fn entry(index: u64) -> Entry {
    Entry {
        log_id: log_id(3, 1, index),
        payload: EntryPayload::Blank,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Runs `step` in a child process that exits without flushing or dropping anything.
fn crash_after(step: &str, dir: &Path) {
    let status = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "child_writes_then_crashes",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, format!("{step}:{}", dir.display()))
        .status()
        .expect("the child process starts");
    assert_eq!(status.code(), Some(0), "the child's {step} step failed");
}

/// The child: one step, then `exit(0)` before anything is dropped.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn child_writes_then_crashes() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (step, dir) = spec.split_once(':').expect("<step>:<dir>");
    let dir = Path::new(dir);
    if step == "unflushed-control" {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .open()
            .expect("sled opens");
        db.insert(b"unflushed", b"value".as_slice())
            .expect("sled insert");
        std::process::exit(0);
    }
    let mut log = raftmgr_storage::open(dir).expect("the store opens").log;
    runtime().block_on(async {
        match step {
            "append" => {
                log.save_vote(&vote()).await.expect("save_vote");
                // Batches of entries (a follower's appends), then the last BATCH entries one
                // at a time (the leader's; the store writes those differently). Each call
                // returns only once the callback reported its entries as flushed.
                let singles_from = ENTRIES - BATCH + 1;
                for first in (1..singles_from).step_by(BATCH as usize) {
                    log.blocking_append((first..first + BATCH).map(entry))
                        .await
                        .expect("append");
                }
                for index in singles_from..=ENTRIES {
                    log.blocking_append([entry(index)]).await.expect("append");
                }
            }
            "truncate" => log
                .truncate(log_id(3, 1, TRUNCATE_AT))
                .await
                .expect("truncate"),
            "purge" => log.purge(log_id(3, 1, PURGE_UPTO)).await.expect("purge"),
            other => panic!("unknown step {other}"),
        }
    });
    std::process::exit(0);
}

/// Reopens the store after a crash: its log, and the indexes of the entries it holds (which
/// the API's count of entries on disk agrees with).
fn reopen(dir: &Path) -> (raftmgr_storage::LogStore, Vec<u64>) {
    let opened = raftmgr_storage::open(dir).expect("reopens");
    let mut log = opened.log;
    let indexes: Vec<u64> = runtime()
        .block_on(log.try_get_log_entries(0..))
        .expect("entries read")
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(opened.view.log_entries_on_disk(), indexes.len());
    (log, indexes)
}

#[test]
fn votes_appends_truncations_and_purges_survive_a_crash() {
    let dir = tempfile::tempdir().expect("a temporary directory");

    crash_after("append", dir.path());
    let (mut log, indexes) = reopen(dir.path());
    let rt = runtime();
    assert_eq!(rt.block_on(log.read_vote()).expect("vote"), Some(vote()));
    assert_eq!(indexes, (1..=ENTRIES).collect::<Vec<_>>());
    let state = rt.block_on(log.get_log_state()).expect("log state");
    assert_eq!(state.last_log_id, Some(log_id(3, 1, ENTRIES)));
    drop(log);

    crash_after("truncate", dir.path());
    let (log, indexes) = reopen(dir.path());
    assert_eq!(indexes, (1..TRUNCATE_AT).collect::<Vec<_>>());
    drop(log);

    crash_after("purge", dir.path());
    let (mut log, indexes) = reopen(dir.path());
    assert_eq!(indexes, (PURGE_UPTO + 1..TRUNCATE_AT).collect::<Vec<_>>());
    let state = rt.block_on(log.get_log_state()).expect("log state");
    let purged: Option<LogId> = Some(log_id(3, 1, PURGE_UPTO));
    assert_eq!(state.last_purged_log_id, purged);
    assert_eq!(state.last_log_id, Some(log_id(3, 1, TRUNCATE_AT - 1)));
}

#[test]
fn the_harness_loses_a_write_that_was_never_flushed() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    crash_after("unflushed-control", dir.path());
    let db = sled::open(dir.path()).expect("sled reopens");
    assert_eq!(
        db.get(b"unflushed").expect("sled get"),
        None,
        "an unflushed write survived the child's exit, so this harness cannot tell a missing \
         flush from a present one"
    );
}
