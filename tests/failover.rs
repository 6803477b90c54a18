//! Automatic failover and rejoin, with real PostgreSQL 15 and real agent processes.

use std::path::Path;
use std::time::{Duration, Instant};

use raftmgr_api::ClusterView;
use raftmgr_jepsen::cluster::{LocalCluster, Options};
use raftmgr_jepsen::wait;
use raftmgr_raft::{Event, NodeId};
use tokio_postgres::NoTls;

const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");
const TIMEOUT: Duration = Duration::from_secs(60);

async fn replicated_cluster() -> LocalCluster {
    let options = Options {
        postgres: true,
        ..Options::default()
    };
    let cluster = LocalCluster::start(Path::new(BINARY), &options)
        .await
        .unwrap();
    cluster.setup_replication(&[1, 2, 3]).await.unwrap();
    sql(&cluster, 1, "CREATE TABLE acked (id int primary key)")
        .await
        .unwrap();
    sql(
        &cluster,
        1,
        "INSERT INTO acked SELECT generate_series(1, 100)",
    )
    .await
    .unwrap();
    cluster
}

async fn sql(
    cluster: &LocalCluster,
    id: NodeId,
    query: &str,
) -> anyhow::Result<Vec<tokio_postgres::Row>> {
    let (client, connection) = tokio_postgres::connect(&cluster.pg_conninfo(id), NoTls).await?;
    tokio::spawn(connection);
    Ok(client.query(query, &[]).await?)
}

async fn rows(cluster: &LocalCluster, id: NodeId) -> Result<i64, String> {
    let rows = sql(cluster, id, "SELECT count(*) FROM acked")
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows[0].get(0))
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
    let others: Vec<NodeId> = [1, 2, 3]
        .into_iter()
        .filter(|id| *id != new_primary)
        .collect();
    cluster
        .wait_streaming(new_primary, &others, TIMEOUT)
        .await
        .unwrap();
    for id in others {
        wait::until(
            &format!("node {id} to replay the new rows"),
            TIMEOUT,
            || async {
                match rows(&cluster, id).await? {
                    150 => Ok(()),
                    n => Err(format!("{n} rows")),
                }
            },
        )
        .await
        .unwrap();
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

    // The whole node: agent and postmaster together.
    cluster.kill(1).unwrap();
    cluster.kill_postmaster(1).unwrap();
    let killed = Instant::now();
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

    // The node returns: its agent must not start the old primary writable; it rewinds it.
    let returned = Instant::now();
    cluster.start_node(1).unwrap();
    let others: Vec<NodeId> = [1, 2, 3]
        .into_iter()
        .filter(|id| *id != new_primary)
        .collect();
    let view = cluster
        .wait_streaming(new_primary, &others, TIMEOUT)
        .await
        .unwrap();
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
    wait::until("node 1 to hold the new primary's rows", TIMEOUT, || async {
        match rows(&cluster, 1).await? {
            120 => Ok(()),
            n => Err(format!("{n} rows")),
        }
    })
    .await
    .unwrap();
}
