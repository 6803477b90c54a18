//! The chaos lab's smoke runs: real nodes in network namespaces, seeded faults, the checkers.
//! Longer runs are in the README (`raftmgr-jepsen test`).

use std::path::PathBuf;

use raftmgr_jepsen::chaos::{self, ChaosArgs, RunReport};

const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");

fn args(nemesis: &str, time: u64, seed: u64, out: &tempfile::TempDir) -> ChaosArgs {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it puts each node in its own network namespace"
    );
    ChaosArgs {
        raftmgr: Some(PathBuf::from(BINARY)),
        nemesis: nemesis.parse().expect("a nemesis set"),
        time,
        rate: 6.0,
        fault_min_s: 2,
        fault_max_s: 6,
        nodes: 3,
        seed: Some(seed),
        synchronous_mode: "on".into(),
        out: Some(out.path().to_path_buf()),
        unsafe_no_fencing: false,
        raft_settings: Vec::new(),
        failover_settings: Vec::new(),
    }
}

/// The checkers' verdicts and, when one failed, the end of every node's log (the run writes
/// them beside its report, in a folder that goes with the test).
fn verdicts(report: &RunReport) -> String {
    let mut text = serde_json::to_string_pretty(&report.verdicts).unwrap_or_default();
    if !report.passed() {
        for id in 1..=3 {
            let log = std::fs::read_to_string(report.out.join(format!("node{id}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            text += &format!("\n---- node {id} log (last {} lines) ----\n", tail.len());
            text += &tail.join("\n");
        }
    }
    text
}

/// Kill, pause and partition faults for a minute in synchronous mode: every checker passes, and
/// the run really injected faults and acknowledged writes.
#[tokio::test(flavor = "multi_thread")]
async fn smoke_run_in_synchronous_mode_passes_every_checker() {
    let out = tempfile::tempdir().unwrap();
    let report = chaos::run(&args("kill,pause,partition", 60, 11, &out))
        .await
        .unwrap();
    assert!(report.passed(), "{}", verdicts(&report));
    let numbers = chaos::report::numbers(&report.history, 0);
    assert!(numbers.faults >= 4, "only {} faults", numbers.faults);
    assert!(numbers.writes_acknowledged > 1000, "{numbers:?}");
    assert_eq!(numbers.writes_lost, Some(0));
    assert!(numbers.promotions >= 1, "{numbers:?}");
    for file in ["history.json", "results.json", "report.html"] {
        assert!(out.path().join(file).exists(), "no {file}");
    }
}

/// With fencing switched off (a test-only setting) and asynchronous replication, a primary cut
/// off from the others keeps acknowledging writes after the majority promoted: the split-brain
/// checker must say so.
#[tokio::test(flavor = "multi_thread")]
async fn without_fencing_the_split_brain_checker_fails() {
    let out = tempfile::tempdir().unwrap();
    let args = ChaosArgs {
        synchronous_mode: "off".into(),
        unsafe_no_fencing: true,
        raft_settings: Vec::new(),
        failover_settings: Vec::new(),
        fault_min_s: 8,
        fault_max_s: 8,
        ..args("partition-primary", 12, 3, &out)
    };
    let report = chaos::run(&args).await.unwrap();
    let split_brain = report.verdict("split-brain");
    assert!(!split_brain.ok, "{}", verdicts(&report));
    assert!(
        split_brain.details.iter().all(|d| d.contains("yet node")
            || d.contains("older timeline")
            || d.contains("was written by")),
        "{:?}",
        split_brain.details
    );
}
