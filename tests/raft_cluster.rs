//! The replicated event log, shown with real agent processes on loopback.

use std::path::Path;
use std::time::{Duration, Instant};

use raftmgr_jepsen::cluster::{LocalCluster, Options, API_TOKEN, CLUSTER_SECRET};
use raftmgr_raft::{Event, NodeId, NodeRegistration, Observation, Outcome, PgRole};

const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");
const TIMEOUT: Duration = Duration::from_secs(30);

fn binary() -> &'static Path {
    Path::new(BINARY)
}

fn registration(id: NodeId, role: PgRole) -> Event {
    Event::NodeRegistered(NodeRegistration::for_tests(id, role))
}

fn observation(observer: NodeId, subject: NodeId, lsn: u64) -> Event {
    Event::HealthObserved(Observation {
        observer,
        subject,
        reachable: true,
        in_recovery: Some(subject != 1),
        timeline: Some(1),
        lsn: Some(lsn),
        replayed_lsn: Some(lsn),
        lag_bytes: Some(0),
        wal_receiver: None,
        replicas: vec![],
    })
}

/// Registers node 1 as the primary, so that observations of it apply.
async fn register_primary(cluster: &LocalCluster) -> u64 {
    let answer = cluster
        .propose(1, &registration(1, PgRole::Primary))
        .await
        .unwrap();
    assert_eq!(answer.outcome, Outcome::Applied);
    answer.log_index
}

/// Proposes `count` observations of node 1 through the nodes in `via`, `parallel` at a time; returns the
/// highest log index acknowledged.
async fn propose_many(cluster: &LocalCluster, via: &[NodeId], count: u64, parallel: u64) -> u64 {
    let mut highest = 0;
    for batch in 0..count.div_ceil(parallel) {
        let proposals = (0..parallel)
            .map(|i| batch * parallel + i)
            .filter(|n| *n < count)
            .map(|n| {
                let node = via[n as usize % via.len()];
                async move { cluster.propose(node, &observation(node, 1, n)).await }
            });
        for answer in futures::future::join_all(proposals).await {
            let answer = answer.expect("proposal acknowledged");
            assert_eq!(answer.outcome, Outcome::Applied);
            highest = highest.max(answer.log_index);
        }
    }
    highest
}

#[tokio::test]
async fn three_agents_elect_a_leader_and_apply_identically() {
    let cluster = LocalCluster::start(binary(), &Options::default())
        .await
        .unwrap();
    let ids = cluster.ids();

    for id in &ids {
        let role = if *id == 1 {
            PgRole::Primary
        } else {
            PgRole::Standby
        };
        let answer = cluster
            .propose(*id, &registration(*id, role))
            .await
            .unwrap();
        assert_eq!(answer.outcome, Outcome::Applied);
    }
    let last = propose_many(&cluster, &ids, 30, 3).await;

    let views = cluster.wait_converged(&ids, last, TIMEOUT).await.unwrap();
    let state = &views[0].state;
    assert_eq!(state.nodes.len(), 3);
    assert_eq!((state.generation, state.primary), (1, Some(1)));
    assert_eq!(state.events_applied, 33);
    assert_eq!(state.events_no_op, 0);
    // Every node saw its own 10 observations of node 1; the last one of each observer is kept.
    assert_eq!(state.nodes[&1].health.len(), 3);
    let leaders: Vec<_> = views.iter().map(|v| v.raft.leader).collect();
    assert!(
        leaders.iter().all(|l| *l == leaders[0] && l.is_some()),
        "{leaders:?}"
    );

    // The API answers from a thread of its own, at a lower CPU priority than Raft's threads.
    let pid = cluster.pid(1).unwrap();
    let nice = thread_nice_values(pid);
    let api = nice.iter().find(|(name, _)| name == "api").map(|(_, n)| *n);
    let main = nice[0].1;
    assert_eq!(api, Some(main + 5), "{nice:?}");
}

/// Events proposed together, on every member, commit in fewer log entries than events (the
/// leader groups those that arrive while earlier entries are being written), each with its own
/// event index, and every replica numbers and applies them alike.
#[tokio::test]
async fn concurrent_proposals_share_log_entries_and_keep_their_own_event_index() {
    const EVENTS: u64 = 300;
    let cluster = LocalCluster::start(binary(), &Options::default())
        .await
        .unwrap();
    let ids = cluster.ids();
    register_primary(&cluster).await;

    let cluster = &cluster;
    let proposals = (0..EVENTS).map(|n| {
        let node = ids[n as usize % ids.len()];
        async move { cluster.propose(node, &observation(node, 1, n)).await }
    });
    let answers: Vec<_> = futures::future::join_all(proposals)
        .await
        .into_iter()
        .map(|answer| answer.expect("proposal acknowledged"))
        .collect();

    assert!(answers.iter().all(|a| a.outcome == Outcome::Applied));
    let event_indexes: std::collections::BTreeSet<u64> =
        answers.iter().map(|a| a.event_index).collect();
    // The registration is event 1; the observations are 2 ..= EVENTS + 1, each once.
    assert_eq!(
        event_indexes,
        (2..=EVENTS + 1).collect(),
        "every event has an index of its own"
    );
    let entries: std::collections::BTreeSet<u64> = answers.iter().map(|a| a.log_index).collect();
    eprintln!("{EVENTS} events in {} log entries", entries.len());
    assert!(
        entries.len() < EVENTS as usize,
        "{EVENTS} concurrent events took {} entries: none were grouped",
        entries.len()
    );

    let last = *entries.last().unwrap();
    let views = cluster.wait_converged(&ids, last, TIMEOUT).await.unwrap();
    let state = &views[0].state;
    assert_eq!(
        (state.events_applied, state.last_event_index),
        (EVENTS + 1, EVENTS + 1)
    );
    // The state records each observation under the index its proposer was told.
    for answer in &answers {
        let recorded = state
            .recent
            .iter()
            .find(|e| e.event_index == answer.event_index);
        if let Some(recorded) = recorded {
            assert!(
                matches!(recorded.event, Event::HealthObserved(_)),
                "{recorded:?}"
            );
        }
    }
}

/// (name, nice value) of every thread of process `pid`, the main thread first.
fn thread_nice_values(pid: u32) -> Vec<(String, i64)> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    tids.sort();
    tids.iter()
        .map(|tid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
            // "tid (comm) state ppid ...": nice is the 19th field, the 17th after the comm.
            let (name, rest) = stat.split_once(" (").unwrap().1.rsplit_once(") ").unwrap();
            let nice = rest.split(' ').nth(16).unwrap().parse().unwrap();
            (name.to_string(), nice)
        })
        .collect()
}

#[tokio::test]
async fn a_killed_leader_is_replaced_and_catches_up_from_its_own_store() {
    let mut cluster = LocalCluster::start(binary(), &Options::default())
        .await
        .unwrap();
    let ids = cluster.ids();
    register_primary(&cluster).await;
    let before = propose_many(&cluster, &ids, 20, 4).await;
    cluster.wait_converged(&ids, before, TIMEOUT).await.unwrap();

    let old_leader = cluster.wait_for_leader(&ids, TIMEOUT).await.unwrap();
    let own_log_index = cluster
        .view(old_leader)
        .await
        .unwrap()
        .raft
        .last_log_index
        .unwrap();
    cluster.kill(old_leader).unwrap();
    let killed_at = Instant::now();

    let survivors: Vec<NodeId> = ids.iter().copied().filter(|id| *id != old_leader).collect();
    // "A few election timeouts": the default maximum is 1 s.
    let new_leader = cluster
        .wait_for_leader(&survivors, Duration::from_secs(5))
        .await
        .unwrap();
    assert_ne!(new_leader, old_leader);
    eprintln!("new leader {new_leader} after {:?}", killed_at.elapsed());

    let survivor_view = cluster.view(new_leader).await.unwrap();
    assert_eq!(
        survivor_view.state.events_applied, 21,
        "committed events survive the leader"
    );
    let after = propose_many(&cluster, &survivors, 10, 2).await;

    cluster.start_node(old_leader).unwrap();
    cluster.wait_api(old_leader, TIMEOUT).await.unwrap();
    let restarted = cluster.view(old_leader).await.unwrap();
    assert!(
        restarted.store.at_open.last_log_index >= Some(own_log_index),
        "the restarted node opened its store at {:?}, but had {own_log_index} before the kill",
        restarted.store.at_open.last_log_index
    );
    let views = cluster.wait_converged(&ids, after, TIMEOUT).await.unwrap();
    assert_eq!(views[0].state.events_applied, 31);
    let rejoined = views.iter().find(|v| v.node.id == old_leader).unwrap();
    assert_eq!(
        rejoined.store.snapshots_installed, 0,
        "caught up from its log, not a snapshot"
    );
}

#[tokio::test]
async fn snapshots_compact_the_log_and_a_new_member_catches_up_through_one() {
    let options = Options {
        voters: 3,
        spares: 1,
        raft_settings: vec![
            "snapshot_logs_since_last = 50".into(),
            "logs_to_keep_after_snapshot = 10".into(),
        ],
        ..Options::default()
    };
    let mut cluster = LocalCluster::start(binary(), &options).await.unwrap();
    let voters = [1, 2, 3];
    register_primary(&cluster).await;
    // One at a time, so that each event is a log entry of its own.
    let last = propose_many(&cluster, &voters, 300, 1).await;
    cluster
        .wait_converged(&voters, last, TIMEOUT)
        .await
        .unwrap();
    for id in voters {
        raftmgr_jepsen::wait::until(
            &format!("node {id} to compact its log"),
            TIMEOUT,
            || async {
                let view = cluster.view(id).await.map_err(|e| e.to_string())?;
                let compacted = view.raft.snapshot_index.unwrap_or(0) >= 200
                    && view.raft.purged_index.unwrap_or(0) >= 200
                    && view.store.log_entries_on_disk < 120;
                if compacted {
                    Ok(())
                } else {
                    Err(format!(
                        "{:?}, {} entries on disk",
                        view.raft, view.store.log_entries_on_disk
                    ))
                }
            },
        )
        .await
        .unwrap();
    }

    cluster.start_node(4).unwrap();
    cluster.wait_api(4, TIMEOUT).await.unwrap();
    cluster.add_member(2, 4, true).await.unwrap();
    let all = [1, 2, 3, 4];
    let views = cluster.wait_converged(&all, last, TIMEOUT).await.unwrap();
    let newcomer = views.iter().find(|v| v.node.id == 4).unwrap();
    assert!(
        newcomer.store.snapshots_installed >= 1,
        "{:?}",
        newcomer.store
    );
    assert_eq!(newcomer.state.events_applied, 301);
    assert!(newcomer.raft.voters.contains(&4));
}

#[tokio::test]
async fn membership_goes_three_to_five_to_three_while_events_commit() {
    let options = Options {
        voters: 3,
        spares: 2,
        ..Options::default()
    };
    let mut cluster = LocalCluster::start(binary(), &options).await.unwrap();
    cluster.start_node(4).unwrap();
    cluster.start_node(5).unwrap();
    cluster.wait_api(4, TIMEOUT).await.unwrap();
    cluster.wait_api(5, TIMEOUT).await.unwrap();
    register_primary(&cluster).await;

    let stop = tokio::sync::watch::channel(false);
    let committed = std::sync::atomic::AtomicU64::new(0);
    let writer = {
        let cluster = &cluster;
        let committed = &committed;
        let mut stop_rx = stop.1.clone();
        async move {
            let mut acked = Vec::new();
            let mut n = 0;
            while !*stop_rx.borrow_and_update() {
                let answer = cluster.propose(3, &observation(3, 1, n)).await;
                if answer.is_ok() {
                    committed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                acked.push(answer.map(|a| a.log_index).map_err(|e| e.to_string()));
                n += 1;
            }
            acked
        }
    };
    // After each membership step, more events must commit before the next one.
    let more_events_commit = || async {
        let from = committed.load(std::sync::atomic::Ordering::SeqCst);
        raftmgr_jepsen::wait::until("three more events to commit", TIMEOUT, || async {
            let now = committed.load(std::sync::atomic::Ordering::SeqCst);
            if now >= from + 3 {
                Ok(())
            } else {
                Err(format!("{} committed", now - from))
            }
        })
        .await
        .unwrap();
    };
    let changes = async {
        more_events_commit().await;
        for id in [4, 5] {
            cluster.add_member(3, id, true).await.unwrap();
            more_events_commit().await;
        }
        let five = cluster.view(3).await.unwrap();
        assert_eq!(five.raft.voters, [1, 2, 3, 4, 5].into());
        for id in [1, 2] {
            cluster.remove_member(3, id).await.unwrap();
            more_events_commit().await;
        }
        let three = cluster.view(3).await.unwrap();
        assert_eq!(three.raft.voters, [3, 4, 5].into());
        stop.0.send(true).unwrap();
    };
    let (acked, ()) = tokio::join!(writer, changes);

    let failures: Vec<_> = acked.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "proposals failed during membership changes: {failures:?}"
    );
    let highest = acked
        .iter()
        .filter_map(|a| a.as_ref().ok())
        .max()
        .copied()
        .unwrap();

    cluster.stop(1).await.unwrap();
    cluster.stop(2).await.unwrap();
    let remaining = [3, 4, 5];
    cluster.wait_for_leader(&remaining, TIMEOUT).await.unwrap();
    let views = cluster
        .wait_converged(&remaining, highest, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(views[0].state.events_applied, acked.len() as u64 + 1);
    for view in &views {
        assert_eq!(view.raft.voters, [3, 4, 5].into());
    }
}

#[tokio::test]
async fn bad_inputs_are_refused_clearly_and_change_nothing() {
    // Configurations: refused with exit code 64 and the key at fault.
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown_key", "node_id = 1\nname = \"n\"\ncolour = \"blue\"\n", "unknown field `colour`"),
        (
            "bad_address",
            "node_id = 1\nname = \"n1\"\ndata_dir = \"/tmp/x\"\ncluster_secret = \"0123456789abcdef\"\n\
             api_token = \"0123456789abcdef\"\n[raft]\nlisten = \"nowhere\"\n[api]\nlisten = \"127.0.0.1:1\"\n",
            "listen",
        ),
        ("not_toml", "node_id = = 1", "node_id"),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new(BINARY)
            .arg("agent")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
    let missing = std::process::Command::new(BINARY)
        .args(["agent", "-c", "/nonexistent/node.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/node.toml"));

    // A running cluster: bad RPCs and API requests are refused and change nothing.
    let mut cluster = LocalCluster::start(binary(), &Options::default())
        .await
        .unwrap();
    let ids = cluster.ids();
    let index = cluster
        .propose(1, &registration(1, PgRole::Primary))
        .await
        .unwrap()
        .log_index;
    let before = cluster.wait_converged(&ids, index, TIMEOUT).await.unwrap();

    let http = cluster.http().clone();
    let raft_url = |path: &str| format!("http://{}{path}", cluster.node(2).raft_addr);
    let paths = [
        "/raft/append-entries",
        "/raft/vote",
        "/raft/install-snapshot",
        "/raft/forward",
    ];
    for path in paths {
        let no_secret = http.post(raft_url(path)).body("x").send().await.unwrap();
        assert_eq!(no_secret.status(), 401);
        assert!(no_secret
            .text()
            .await
            .unwrap()
            .contains("header is missing"));

        let wrong = http
            .post(raft_url(path))
            .header(raftmgr_raft::SECRET_HEADER, "not-the-secret")
            .body(vec![0u8; 64])
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
        assert!(wrong.text().await.unwrap().contains("wrong cluster secret"));

        for garbage in [
            b"garbage".to_vec(),
            u64::MAX.to_le_bytes().repeat(8),
            vec![0xff; 4096],
        ] {
            let answer = http
                .post(raft_url(path))
                .header(raftmgr_raft::SECRET_HEADER, CLUSTER_SECRET)
                .body(garbage)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 400, "{path}");
            assert!(
                answer.text().await.unwrap().contains("cannot decode"),
                "{path}"
            );
        }
    }

    let api_url = |path: &str| format!("http://{}{path}", cluster.node(3).api_addr);
    let event = serde_json::to_string(&observation(3, 1, 1)).unwrap();
    let no_token = http
        .post(api_url("/events"))
        .body(event.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    let wrong_token = http
        .post(api_url("/events"))
        .bearer_auth("wrong-token")
        .header("content-type", "application/json")
        .body(event)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_token.status(), 401);
    for body in ["{", "{\"NoSuchEvent\":{}}", "[]"] {
        let answer = http
            .post(api_url("/events"))
            .bearer_auth(API_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(
            answer.status().is_client_error(),
            "{body}: {}",
            answer.status()
        );
        let json: serde_json::Value = answer.json().await.unwrap();
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{json}"
        );
    }
    let remove_stranger = http
        .delete(api_url("/members/42"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(remove_stranger.status(), 409);
    assert!(remove_stranger
        .text()
        .await
        .unwrap()
        .contains("node 42 is not a member"));

    for id in &ids {
        assert!(cluster.is_running(*id), "node {id} died");
    }
    let after = cluster.wait_converged(&ids, index, TIMEOUT).await.unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            a.raft.last_log_index, b.raft.last_log_index,
            "node {}",
            a.node.id
        );
        assert_eq!(a.state, b.state);
    }
    assert_eq!(
        cluster.stop(2).await.unwrap(),
        Some(0),
        "SIGTERM stops the agent cleanly"
    );
    assert!(
        cluster.read_log(2).contains("node=node2"),
        "log lines carry the node name"
    );
}
