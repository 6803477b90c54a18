//! Automatic failover and rejoin, with real PostgreSQL 15 and real agent processes.

use std::time::{Duration, Instant};

use raftmgr_api::{ClusterView, HistoryEntry, HistoryKind};
use raftmgr_jepsen::cluster::{LocalCluster, Options};
use raftmgr_jepsen::wait;
use raftmgr_raft::{Event, NodeId};
use tokio_postgres::NoTls;

mod common;

use common::{replicated_cluster, replicated_cluster_with, sql, TIMEOUT};

/// Waits until every other node streams from `primary`; returns that view.
async fn wait_all_follow(cluster: &LocalCluster, primary: NodeId) -> ClusterView {
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != primary).collect();
    cluster
        .wait_streaming(primary, &others, TIMEOUT)
        .await
        .unwrap()
}

/// Waits until node `id`'s table `acked` holds `expected` rows.
async fn wait_rows(cluster: &LocalCluster, id: NodeId, expected: i64) {
    wait::until(
        &format!("node {id} to hold {expected} rows"),
        TIMEOUT,
        || async {
            match rows(cluster, id).await? {
                n if n == expected => Ok(()),
                n => Err(format!("{n} rows")),
            }
        },
    )
    .await
    .unwrap();
}

async fn rows(cluster: &LocalCluster, id: NodeId) -> Result<i64, String> {
    let rows = sql(cluster, id, "SELECT count(*) FROM acked")
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows[0].get(0))
}

/// A returning former primary's lease file names it primary, with a lease long run out, until
/// its agent learns otherwise: meanwhile its guard must not stop what the rejoin runs (the crash
/// recovery in single-user mode, the rewound standby). Only the log since the agent's last
/// start counts: before the crash, a primary whose renewals a busy disk delayed may have been
/// fenced, rightly.
fn assert_guard_stopped_nothing(cluster: &LocalCluster, id: NodeId) {
    let log = cluster.read_log(id);
    let (_, since_restart) = log
        .rsplit_once("opened the Raft store")
        .expect("the agent logs each start");
    assert!(
        !since_restart.contains("lease-guard: the lease ran out"),
        "node {id}'s guard stopped a PostgreSQL process during the rejoin"
    );
}

/// A process started by the test, killed when dropped.
struct Bystander(std::process::Child);

impl Bystander {
    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Points the lock files that node `id`'s crashed postmaster left (postmaster.pid and its
/// socket's) at a live process that is not PostgreSQL: its pid was reused, as happens soon in a
/// fresh VM or a container.
fn reuse_postmaster_pid(cluster: &LocalCluster, id: NodeId) -> Bystander {
    let bystander = Bystander(
        std::process::Command::new("sleep")
            .arg("600")
            .current_dir("/")
            .spawn()
            .unwrap(),
    );
    let node = cluster.node(id);
    let socket_lock = node
        .pg_socket_dir
        .join(format!(".s.PGSQL.{}.lock", node.pg_port.unwrap()));
    for lock in [node.pg_data.join("postmaster.pid"), socket_lock] {
        let text = std::fs::read_to_string(&lock).unwrap();
        let (_, rest) = text.split_once('\n').unwrap();
        std::fs::write(&lock, format!("{}\n{rest}", bystander.0.id())).unwrap();
    }
    bystander
}

/// Waits until some node reports a promoted primary of a generation after `generation`.
async fn wait_for_new_primary(
    cluster: &LocalCluster,
    ask: NodeId,
    generation: u64,
) -> (NodeId, ClusterView) {
    wait::until("a new primary to be promoted", TIMEOUT, || async {
        let view = cluster.view(ask).await.map_err(|e| e.to_string())?;
        let s = &view.state;
        match s.primary {
            Some(p) if s.generation > generation && s.primary_ready => Ok((p, view)),
            _ => Err(format!(
                "generation {}, primary {:?}, ready {}",
                s.generation, s.primary, s.primary_ready
            )),
        }
    })
    .await
    .unwrap()
}

fn kinds(view: &ClusterView) -> Vec<&'static str> {
    view.state.recent.iter().map(|e| e.event.kind()).collect()
}

#[tokio::test]
async fn a_killed_primary_postmaster_fails_over_and_the_old_primary_rejoins() {
    let cluster = replicated_cluster().await;
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();

    cluster.kill_postmaster(1).unwrap();
    let killed = Instant::now();
    let (new_primary, view) = wait_for_new_primary(&cluster, 2, 1).await;
    eprintln!(
        "node {new_primary} promoted {:?} after the kill",
        killed.elapsed()
    );
    assert_ne!(new_primary, 1);
    let decision = view.state.decisions.back().unwrap();
    assert!(
        decision.decision.reason.contains("resigned"),
        "{:?}",
        decision.decision
    );
    assert!(kinds(&view).contains(&"PrimaryResigned"));
    let history: Vec<HistoryEntry> = cluster.get(2, "/history").await.unwrap();
    let last = history.last().unwrap();
    assert_eq!(
        (last.generation, last.primary_id, last.kind, last.timeline),
        (2, new_primary, Some(HistoryKind::Failover), Some(2)),
        "{history:?}"
    );

    let in_recovery: bool = sql(&cluster, new_primary, "SELECT pg_is_in_recovery()")
        .await
        .unwrap()[0]
        .get(0);
    assert!(!in_recovery, "the new primary takes writes");
    assert_eq!(
        rows(&cluster, new_primary).await.unwrap(),
        100,
        "acknowledged rows survive"
    );
    sql(
        &cluster,
        new_primary,
        "INSERT INTO acked SELECT generate_series(101, 150)",
    )
    .await
    .unwrap();

    // The old primary comes back as a standby of the new one, and so does the other standby.
    wait_all_follow(&cluster, new_primary).await;
    wait::until("node 1's rejoin to be reported", TIMEOUT, || async {
        let view = cluster.view(new_primary).await.map_err(|e| e.to_string())?;
        let reported = view
            .state
            .recent
            .iter()
            .any(|e| matches!(e.event, Event::RejoinCompleted { node_id: 1, .. }));
        if reported && view.state.nodes[&1].rejoining.is_none() {
            Ok(())
        } else {
            Err(format!("{:?}", kinds(&view)))
        }
    })
    .await
    .unwrap();
    for id in [1, 2, 3].into_iter().filter(|id| *id != new_primary) {
        wait_rows(&cluster, id, 150).await;
    }
    let timeline: i32 = sql(&cluster, 1, "SELECT received_tli FROM pg_stat_wal_receiver")
        .await
        .unwrap()[0]
        .get(0);
    assert_eq!(timeline, 2, "the old primary streams on the new timeline");
}

#[tokio::test]
async fn a_crashed_primary_node_fails_over_by_lease_and_is_rewound_on_return() {
    let mut cluster = replicated_cluster().await;
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    // Some hundreds of pages, left dirty on the standbys by replay: a checkpoint spread over
    // time (PostgreSQL's own after a promotion) writes one every 0.1 s.
    sql(
        &cluster,
        1,
        "CREATE TABLE filler AS SELECT g FROM generate_series(1, 100000) g",
    )
    .await
    .unwrap();

    // The whole node: agent and postmaster together.
    cluster.kill(1).unwrap();
    cluster.kill_postmaster(1).unwrap();
    let killed = Instant::now();
    let mut pid_reused = reuse_postmaster_pid(&cluster, 1);
    let (new_primary, view) = wait_for_new_primary(&cluster, 2, 1).await;
    eprintln!(
        "node {new_primary} promoted {:?} after the node crash",
        killed.elapsed()
    );
    let decision = &view.state.decisions.back().unwrap().decision;
    assert!(decision.reason.contains("no lease renewal"), "{decision:?}");
    assert!(
        !kinds(&view).contains(&"PrimaryResigned"),
        "a dead agent cannot resign"
    );
    assert_eq!(rows(&cluster, new_primary).await.unwrap(), 100);
    sql(
        &cluster,
        new_primary,
        "INSERT INTO acked SELECT generate_series(101, 120)",
    )
    .await
    .unwrap();
    wait_checkpoint_on_new_timeline(&cluster, new_primary).await;

    // The node returns: its agent must not start the old primary writable; it rewinds it.
    let returned = Instant::now();
    cluster.start_node(1).unwrap();
    let view = wait_all_follow(&cluster, new_primary).await;
    eprintln!("node 1 streaming {:?} after its return", returned.elapsed());
    let rejoined = view.state.recent.iter().find_map(|e| match &e.event {
        Event::RejoinCompleted {
            node_id: 1,
            duration_ms,
            ..
        } => Some(*duration_ms),
        _ => None,
    });
    assert!(
        rejoined.is_some(),
        "node 1 rejoined through pg_rewind: {:?}",
        kinds(&view)
    );
    let in_recovery: bool = sql(&cluster, 1, "SELECT pg_is_in_recovery()")
        .await
        .unwrap()[0]
        .get(0);
    assert!(in_recovery, "the old primary came back as a standby");
    assert!(
        pid_reused.alive(),
        "the process that took the crashed postmaster's pid was not signalled"
    );
    assert_guard_stopped_nothing(&cluster, 1);
    wait_rows(&cluster, 1, 120).await;
}

/// The new primary checkpoints at once, so that its control file names its new timeline when
/// the old primary returns: PostgreSQL's own checkpoint after a promotion is spread over minutes,
/// and pg_rewind would wait for it (or wrongly find nothing to rewind).
async fn wait_checkpoint_on_new_timeline(cluster: &LocalCluster, id: NodeId) {
    wait::until(
        "the new primary's checkpoint on its new timeline",
        Duration::from_secs(5),
        || async {
            let row = sql(
                cluster,
                id,
                "SELECT (SELECT timeline_id FROM pg_control_checkpoint()), \
                        pg_walfile_name(pg_current_wal_lsn())",
            )
            .await
            .map_err(|e| e.to_string())?;
            let (checkpoint, walfile): (i32, String) = (row[0].get(0), row[0].get(1));
            if walfile.starts_with(&format!("{checkpoint:08X}")) {
                Ok(())
            } else {
                Err(format!(
                    "last checkpoint on timeline {checkpoint}, WAL file {walfile}"
                ))
            }
        },
    )
    .await
    .unwrap();
}

/// Recovery after a rewind starts at the redo point of the last checkpoint both servers share.
/// A checkpoint spread over a stretch of writes (any but `CHECKPOINT`'s) puts that point
/// segments before the checkpoint's record; PostgreSQL 15's pg_rewind removes those segments
/// from the target, and the new primary no longer has them either (it keeps WAL for its slots,
/// from the fork on). The agent links the old primary's own segments back: it rejoins by rewind,
/// without an archive.
#[tokio::test]
async fn a_crashed_primary_is_rewound_from_its_own_wal_before_a_spread_checkpoint() {
    let mut cluster = replicated_cluster().await;
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    for statement in [
        "ALTER SYSTEM SET max_wal_size = '32MB'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE spread AS SELECT g, repeat('x', 100) AS filler \
         FROM generate_series(1, 100000) g",
    ] {
        sql(&cluster, 1, statement).await.unwrap();
    }
    // Dirty pages to write and segments switched while they are written: WAL volume starts
    // checkpoints, which run while the loop goes on. Each round waits until the standbys have
    // replayed everything, so the fork comes after the checkpoint it finds.
    let checkpoint =
        "SELECT redo_wal_file, pg_walfile_name(checkpoint_lsn) FROM pg_control_checkpoint()";
    wait::until(
        "a checkpoint whose record lies segments after its redo point",
        Duration::from_secs(120),
        || async {
            for statement in [
                "UPDATE spread SET filler = filler WHERE g % 10 = 0",
                "SELECT pg_switch_wal()",
            ] {
                sql(&cluster, 1, statement)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            wait_replayed(&cluster, 1, &[2, 3]).await;
            let row = sql(&cluster, 1, checkpoint)
                .await
                .map_err(|e| e.to_string())?;
            let (redo, record): (String, String) = (row[0].get(0), row[0].get(1));
            // Segment names sort in WAL order within a timeline.
            if redo[8..] < record[8..] {
                Ok(())
            } else {
                Err(format!("redo point and record both in {record}"))
            }
        },
    )
    .await
    .unwrap();

    cluster.kill(1).unwrap();
    // The loop's WAL and checkpoints load the disk: node 1's renewals can lag, and its lease
    // guard may have stopped PostgreSQL already (immediately: the same crashed data directory).
    if cluster.postmaster_pid(1).is_some() {
        let _ = cluster.kill_postmaster(1);
    }
    // A checkpoint still running may have completed since the query: the control file says
    // which one the crash left.
    let segment = |key| lsn(&controldata_value(&cluster, 1, key)) / WAL_SEGMENT_BYTES;
    assert!(
        segment("Latest checkpoint's REDO location") < segment("Latest checkpoint location"),
        "the crash left a checkpoint whose record lies segments after its redo point"
    );
    let redo = controldata_value(&cluster, 1, "Latest checkpoint's REDO WAL file");
    let (new_primary, _) = wait_for_new_primary(&cluster, 2, 1).await;
    wait_checkpoint_on_new_timeline(&cluster, new_primary).await;
    // The checkpoint names the new timeline in the control file before it removes old segments.
    let redo_kept = format!("SELECT count(*) FROM pg_ls_waldir() WHERE name = '{redo}'");
    wait::until(
        &format!("the new primary to remove {redo}"),
        TIMEOUT,
        || async {
            let row = sql(&cluster, new_primary, &redo_kept)
                .await
                .map_err(|e| e.to_string())?;
            match row[0].get::<_, i64>(0) {
                0 => Ok(()),
                _ => Err("still there".to_string()),
            }
        },
    )
    .await
    .unwrap();

    cluster.start_node(1).unwrap();
    let view = wait_all_follow(&cluster, new_primary).await;
    let method = view.state.recent.iter().find_map(|e| match &e.event {
        Event::RejoinCompleted {
            node_id: 1, method, ..
        } => Some(*method),
        _ => None,
    });
    assert_eq!(
        method,
        Some(raftmgr_raft::RejoinMethod::Rewind),
        "node 1 was rewound: {:?}",
        kinds(&view)
    );
    let log = std::fs::read_to_string(&cluster.node(1).log).unwrap();
    assert!(
        log.contains("crash recovery keeping every WAL segment"),
        "node 1's agent ran the crash recovery itself, before pg_rewind"
    );
    assert!(
        log.contains("of its own WAL from before the fork"),
        "node 1's agent linked its own segments back after pg_rewind"
    );
    assert_guard_stopped_nothing(&cluster, 1);
    wait_rows(&cluster, 1, 100).await;
}

/// Inserts into node `id` until stopped; returns the acknowledgement times of the rows written.
async fn write_until(
    cluster: &LocalCluster,
    id: NodeId,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Instant> {
    let mut acked = Vec::new();
    let mut next: i32 = 1_000;
    while !*stop.borrow() {
        let attempt = async {
            let (client, connection) =
                tokio_postgres::connect(&cluster.pg_conninfo(id), NoTls).await?;
            tokio::spawn(connection);
            loop {
                if *stop.borrow() {
                    return anyhow::Ok(());
                }
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&next];
                let insert = client.execute("INSERT INTO acked VALUES ($1)", &params);
                tokio::time::timeout(Duration::from_secs(1), insert).await??;
                acked.push(Instant::now());
                next += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        if attempt.await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    acked
}

/// Polls the standbys every 10 ms until one of them has left recovery; returns when it saw it.
async fn first_seen_promoted(cluster: &LocalCluster, candidates: &[NodeId]) -> (NodeId, Instant) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        for id in candidates {
            if let Ok(rows) = sql(cluster, *id, "SELECT pg_is_in_recovery()").await {
                if !rows[0].get::<_, bool>(0) {
                    return (*id, Instant::now());
                }
            }
        }
        assert!(Instant::now() < deadline, "no standby was promoted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The old primary must stop acknowledging writes before the new one is promoted.
async fn assert_fenced_before_promotion(cluster: &LocalCluster, fault: impl FnOnce()) -> NodeId {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = write_until(cluster, 1, stop_rx);
    let observe = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        fault();
        let seen = first_seen_promoted(cluster, &[2, 3]).await;
        stop_tx.send(true).unwrap();
        seen
    };
    let (acked, (new_primary, promoted_seen)) = tokio::join!(writer, observe);
    let last_ack = *acked
        .last()
        .expect("writes were acknowledged before the fault");
    // The poll sees a promotion at most ~30 ms after it happened: keep a margin beyond that.
    assert!(
        last_ack + Duration::from_millis(50) < promoted_seen,
        "the old primary acknowledged a write {:?} before the new primary was seen promoted",
        promoted_seen.saturating_duration_since(last_ack)
    );
    eprintln!(
        "last write acknowledged by the old primary {:?} before node {new_primary} was seen promoted",
        promoted_seen - last_ack
    );
    new_primary
}

#[tokio::test]
async fn a_paused_primary_agent_is_fenced_before_the_new_primary_takes_writes() {
    let cluster = replicated_cluster().await;
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    let agent = nix::unistd::Pid::from_raw(cluster.pid(1).unwrap() as i32);

    let new_primary = assert_fenced_before_promotion(&cluster, || {
        nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    })
    .await;
    assert!(
        cluster
            .read_log(1)
            .contains("lease-guard: the lease ran out"),
        "the guard fenced"
    );

    // Resumed, the agent sees it is no longer the primary and rejoins.
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_all_follow(&cluster, new_primary).await;
    let in_recovery: bool = sql(&cluster, 1, "SELECT pg_is_in_recovery()")
        .await
        .unwrap()[0]
        .get(0);
    assert!(in_recovery);
}

#[tokio::test]
async fn a_killed_primary_agent_is_fenced_by_its_guard_and_rejoins_when_restarted() {
    let mut cluster = replicated_cluster().await;
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    let agent_pid = cluster.pid(1).unwrap();

    let new_primary = assert_fenced_before_promotion(&cluster, || {
        let agent = nix::unistd::Pid::from_raw(agent_pid as i32);
        nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGKILL).unwrap();
    })
    .await;
    cluster.kill(1).ok(); // reap the killed agent
    assert_eq!(
        cluster.postmaster_pid(1),
        None,
        "the guard stopped the old primary"
    );

    cluster.start_node(1).unwrap();
    wait_all_follow(&cluster, new_primary).await;
    // The restarted agent has a guard again (one once read the dead agent's pid from the lease
    // file and left at once, so the next kill went unfenced).
    let pid_file = cluster.dir().join("node1").join("lease-guard.pid");
    let guard: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        raftmgr_jepsen::cluster::process_alive(guard),
        "the lease guard {guard} of the restarted agent is running"
    );
}

#[tokio::test]
async fn switchover_to_a_named_node_and_back_swaps_roles_without_rewind() {
    let cluster = replicated_cluster().await;
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();

    // Refusals first: nothing changes.
    for (args, expected) in [
        (vec!["switchover", "--to", "node1"], "already the primary"),
        (vec!["switchover", "--to", "node9"], "no node is called"),
    ] {
        let out = cluster.raftmgr(1, &args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
    }
    let no_token = cluster
        .http()
        .post(format!("http://{}/switchover", cluster.node(2).api_addr))
        .json(&serde_json::json!({"candidate": "node2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    assert_eq!(cluster.view(2).await.unwrap().state.generation, 1);

    let started = Instant::now();
    let out = cluster
        .raftmgr_ok(3, &["switchover", "--to", "node2"])
        .unwrap();
    eprintln!("{out}switchover took {:?}", started.elapsed());
    let view = cluster.wait_streaming(2, &[1, 3], TIMEOUT).await.unwrap();
    assert_eq!((view.state.generation, view.state.primary), (2, Some(2)));
    assert_eq!(rows(&cluster, 2).await.unwrap(), 100);
    sql(
        &cluster,
        2,
        "INSERT INTO acked SELECT generate_series(101, 110)",
    )
    .await
    .unwrap();

    // And back, with repmgr's verb on the node to promote.
    cluster.raftmgr_ok(1, &["standby", "switchover"]).unwrap();
    let view = cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    assert_eq!((view.state.generation, view.state.primary), (3, Some(1)));
    let rewinds = view
        .state
        .recent
        .iter()
        .filter(|e| matches!(e.event, Event::RejoinPlanned { .. }))
        .count();
    assert_eq!(
        rewinds,
        0,
        "a switchover needs no rewind: {:?}",
        kinds(&view)
    );
    wait_rows(&cluster, 1, 110).await;
    let history = wait::until("node1's promotion in the history", TIMEOUT, || async {
        let history: Vec<HistoryEntry> = cluster
            .get(1, "/history")
            .await
            .map_err(|e| e.to_string())?;
        match history.last() {
            Some(h) if h.generation == 3 && h.timeline.is_some() => Ok(history),
            _ => Err(format!("{history:?}")),
        }
    })
    .await
    .unwrap();
    let generations: Vec<_> = history
        .iter()
        .map(|h| (h.generation, h.primary_id, h.kind, h.timeline))
        .collect();
    assert_eq!(
        generations,
        [
            (1, 1, Some(HistoryKind::Registered), None),
            (2, 2, Some(HistoryKind::Switchover), Some(2)),
            (3, 1, Some(HistoryKind::Switchover), Some(3)),
        ]
    );

    // By hand, repmgr's `node rejoin`: refused on the primary; on a standby, its agent rewinds
    // it from the primary and starts it again.
    let out = cluster.raftmgr(1, &["node", "rejoin"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("is the primary"),
        "{stderr}"
    );
    let out = cluster.raftmgr_ok(3, &["node", "rejoin"]).unwrap();
    assert!(out.contains("rejoined as a standby"), "{out}");
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    assert_eq!(rows(&cluster, 3).await.unwrap(), 110);
}

#[tokio::test]
async fn while_paused_no_failover_happens_and_resume_lets_it_proceed() {
    let cluster = replicated_cluster().await;
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    cluster
        .raftmgr_ok(2, &["pause", "--reason", "test"])
        .unwrap();
    // The pause is committed when the command returns; node 3 applies it a heartbeat later.
    wait::until("node 3 to show the pause", TIMEOUT, || async {
        let table = cluster
            .raftmgr_ok(3, &["cluster", "show"])
            .map_err(|e| e.to_string())?;
        if table.contains("PAUSED") {
            Ok(())
        } else {
            Err(table)
        }
    })
    .await
    .unwrap();
    // A switchover would stop the primary and wait for the resume to promote: refused.
    let refused = cluster.raftmgr(3, &["switchover"]).unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("paused"),
        "{stderr}"
    );
    assert!(cluster.view(3).await.unwrap().state.switchover.is_none());

    cluster.kill_postmaster(1).unwrap();
    wait::until("the primary to resign", TIMEOUT, || async {
        let view = cluster.view(2).await.map_err(|e| e.to_string())?;
        if view.state.primary_resigned {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await
    .unwrap();
    // Well past the lease timeout (1.47 s by default): still no promotion.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let view = cluster.view(2).await.unwrap();
    assert_eq!(view.state.generation, 1, "a failover happened while paused");
    assert!(view.state.decisions.is_empty());

    cluster.raftmgr_ok(3, &["resume"]).unwrap();
    let (new_primary, _) = wait_for_new_primary(&cluster, 2, 1).await;
    assert_ne!(new_primary, 1);
}

#[tokio::test]
async fn a_primary_cut_off_by_a_partition_is_fenced_before_the_majority_promotes() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it puts each node in its own network namespace"
    );
    let cluster = replicated_cluster_with(Options {
        network: true,
        ..Options::default()
    })
    .await;
    let lab = cluster.network().unwrap();

    // Meanwhile, ask every node's /primary as a load balancer would.
    let checks = async {
        let mut old_last_ok = None;
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            for id in [1, 2, 3] {
                let url = format!("http://{}/primary", cluster.node(id).api_addr);
                let ok = cluster
                    .http()
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                match (ok, id) {
                    (true, 1) => old_last_ok = Some(Instant::now()),
                    (true, _) => return (old_last_ok, Instant::now()),
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no new primary answered /primary with 200");
    };
    let fenced = assert_fenced_before_promotion(&cluster, || {
        lab.partition(1, &[2, 3]).unwrap();
    });
    let (new_primary, (old_last_ok, new_first_ok)) = tokio::join!(fenced, checks);
    let old_last_ok = old_last_ok.expect("node 1 answered 200 before the partition");
    assert!(
        old_last_ok < new_first_ok,
        "GET /primary: the old primary answered 200 after the new one did"
    );
    eprintln!(
        "GET /primary: old primary's last 200 {:?} before the new primary's first",
        new_first_ok - old_last_ok
    );
    assert!(cluster.read_log(1).contains("fenc"), "node 1 fenced itself");

    // Healed, the old primary is rewound and follows the new one.
    lab.heal().unwrap();
    let view = wait_all_follow(&cluster, new_primary).await;
    let rejoined = view
        .state
        .recent
        .iter()
        .any(|e| matches!(e.event, Event::RejoinCompleted { node_id: 1, .. }));
    assert!(
        rejoined,
        "node 1 rejoined through pg_rewind: {:?}",
        kinds(&view)
    );
}

#[tokio::test]
async fn when_pg_rewind_cannot_work_the_old_primary_is_cloned_again() {
    let mut cluster = replicated_cluster().await;
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    cluster.kill(1).unwrap();
    cluster.kill_postmaster(1).unwrap();
    let (new_primary, _) = wait_for_new_primary(&cluster, 2, 1).await;
    sql(
        &cluster,
        new_primary,
        "INSERT INTO acked SELECT generate_series(101, 130)",
    )
    .await
    .unwrap();

    // The WAL pg_rewind (and crash recovery) would need is gone.
    let wal = cluster.node(1).pg_data.join("pg_wal");
    for entry in std::fs::read_dir(&wal).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    cluster.start_node(1).unwrap();
    let view = wait_all_follow(&cluster, new_primary).await;
    let recloned = view.state.recent.iter().any(|e| {
        matches!(
            e.event,
            Event::RejoinCompleted {
                node_id: 1,
                method: raftmgr_raft::RejoinMethod::Reclone,
                ..
            }
        )
    });
    assert!(recloned, "node 1 was cloned again: {:?}", kinds(&view));
    let reason = view.state.recent.iter().find_map(|e| match &e.event {
        Event::RejoinPlanned {
            node_id: 1,
            method: raftmgr_raft::RejoinMethod::Reclone,
            reason,
            ..
        } => Some(reason.clone()),
        _ => None,
    });
    assert!(
        reason.is_some_and(|r| r.contains("pg_rewind failed")),
        "the plan says why"
    );
    let data = &cluster.node(1).pg_data;
    let kept = std::fs::read_dir(data.parent().unwrap()).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("pgdata.rewind-failed-")
    });
    assert!(kept, "the old data directory is kept aside, not deleted");
    wait_rows(&cluster, 1, 130).await;
}

/// A former primary whose own WAL since the fork is gone from pg_wal is still rewound, not
/// cloned again: pg_rewind fetches the missing segments with the `restore_command` from the
/// archive the primary kept. To diverge for long enough, node1 runs with fencing switched off
/// (a test-only setting): its agent is killed, the others fail over, and node1 keeps taking
/// writes on its own timeline, checkpoints and recycles WAL before it is stopped.
#[tokio::test]
async fn a_former_primary_whose_wal_is_gone_is_rewound_from_the_archive() {
    use std::os::unix::fs::PermissionsExt;
    let archive = tempfile::tempdir().unwrap();
    std::fs::set_permissions(archive.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let dir = archive.path().display();
    let mut cluster = replicated_cluster_with(Options {
        postgres_settings: vec![
            format!("archive_command = \"test ! -f {dir}/%f && cp %p {dir}/%f\""),
            format!("restore_command = \"cp {dir}/%f %p\""),
        ],
        failover_settings: vec!["unsafe_no_fencing = true".into()],
        ..Options::default()
    })
    .await;
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();

    cluster.kill(1).unwrap();
    let (new_primary, _) = wait_for_new_primary(&cluster, 2, 1).await;
    // Node1 diverges over several WAL segments and a checkpoint, all archived.
    for round in 0..3 {
        let first = 1000 + round * 100;
        let insert = format!(
            "INSERT INTO acked SELECT generate_series({first}, {})",
            first + 99
        );
        sql(&cluster, 1, &insert).await.unwrap();
        sql(&cluster, 1, "SELECT pg_switch_wal()").await.unwrap();
    }
    sql(&cluster, 1, "CHECKPOINT").await.unwrap();
    sql(&cluster, 1, "SELECT pg_switch_wal()").await.unwrap();
    let current: String = sql(&cluster, 1, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        .await
        .unwrap()[0]
        .get(0);
    wait::until("node1's WAL archived", TIMEOUT, || async {
        let rows = sql(
            &cluster,
            1,
            "SELECT last_archived_wal FROM pg_stat_archiver",
        )
        .await
        .map_err(|e| e.to_string())?;
        let archived: Option<String> = rows[0].get(0);
        // Segment names sort in WAL order within a timeline.
        match archived {
            Some(name) if name.len() == 24 && name[8..] >= current[8..] => Ok(()),
            other => Err(format!("last archived {other:?}, current {current}")),
        }
    })
    .await
    .unwrap();
    let stopped = cluster
        .pg_ctl(1, &["stop", "-m", "immediate", "-w"])
        .unwrap();
    assert!(stopped.status.success(), "{stopped:?}");

    // Everything before the segment crash recovery starts from is gone, the fork point with it.
    let redo = controldata_value(&cluster, 1, "Latest checkpoint's REDO WAL file");
    let wal = cluster.node(1).pg_data.join("pg_wal");
    let mut removed = 0;
    for entry in std::fs::read_dir(&wal).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_file() && name.len() == 24 && name[8..] < redo[8..] {
            std::fs::remove_file(&path).unwrap();
            removed += 1;
        }
    }
    assert!(removed >= 3, "only {removed} segments before {redo}");

    cluster.start_node(1).unwrap();
    let view = wait_all_follow(&cluster, new_primary).await;
    let method = view.state.recent.iter().find_map(|e| match &e.event {
        Event::RejoinCompleted {
            node_id: 1, method, ..
        } => Some(*method),
        _ => None,
    });
    assert_eq!(
        method,
        Some(raftmgr_raft::RejoinMethod::Rewind),
        "node 1 was rewound with WAL from the archive: {:?}",
        kinds(&view)
    );
    // Its divergent rows are gone; the new primary's history is its own.
    wait_rows(&cluster, 1, 100).await;
}

/// Waits until `standbys` have replayed all the WAL `primary` has written so far.
async fn wait_replayed(cluster: &LocalCluster, primary: NodeId, standbys: &[NodeId]) {
    let end: String = sql(cluster, primary, "SELECT pg_current_wal_lsn()::text")
        .await
        .unwrap()[0]
        .get(0);
    let replayed = format!("SELECT pg_last_wal_replay_lsn() >= '{end}'");
    for &id in standbys {
        wait::until(
            &format!("node {id} to replay up to {end}"),
            TIMEOUT,
            || async {
                let row = sql(cluster, id, &replayed)
                    .await
                    .map_err(|e| e.to_string())?;
                row[0]
                    .get::<_, bool>(0)
                    .then_some(())
                    .ok_or("behind".to_string())
            },
        )
        .await
        .unwrap();
    }
}

/// A WAL position in PostgreSQL's `X/Y` notation, as a byte offset.
fn lsn(text: &str) -> u64 {
    raftmgr_raft::summary::parse_lsn(text).unwrap_or_else(|| panic!("not an LSN: {text:?}"))
}

/// The lab's clusters are initialized with PostgreSQL's default WAL segment size.
const WAL_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

fn controldata_value(cluster: &LocalCluster, id: NodeId, key: &str) -> String {
    let out = raftmgr_jepsen::cluster::pg_command("pg_controldata")
        .arg("-D")
        .arg(&cluster.node(id).pg_data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim_start_matches(':').trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {key:?} in pg_controldata: {text}"))
}
