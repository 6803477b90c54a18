//! Synchronous mode: no acknowledged commit is lost by a failover.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use raftmgr_jepsen::cluster::{LocalCluster, Options};
use raftmgr_jepsen::wait;
use raftmgr_raft::NodeId;
use tokio_postgres::NoTls;

const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");
const TIMEOUT: Duration = Duration::from_secs(60);

async fn sync_cluster() -> LocalCluster {
    sync_cluster_with(Options::default()).await
}

async fn sync_cluster_with(options: Options) -> LocalCluster {
    let options = Options {
        postgres: true,
        failover_settings: vec!["synchronous_mode = \"on\"".into()],
        ..options
    };
    let cluster = LocalCluster::start(Path::new(BINARY), &options)
        .await
        .unwrap();
    cluster.setup_replication(&[1, 2, 3]).await.unwrap();
    let client = connect(&cluster, 1).await.unwrap();
    client
        .batch_execute("CREATE TABLE acked (id int primary key)")
        .await
        .unwrap();
    cluster
}

async fn connect(cluster: &LocalCluster, id: NodeId) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&cluster.pg_conninfo(id), NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Waits until the committed sync set names a standby and the primary's PostgreSQL waits for it.
async fn wait_for_sync_standby(cluster: &LocalCluster, primary: NodeId) -> NodeId {
    wait::until("a synchronous standby", TIMEOUT, || async {
        let view = cluster.view(primary).await.map_err(|e| e.to_string())?;
        let member = *view.state.sync_set.iter().next().ok_or("empty sync set")?;
        let client = connect(cluster, primary).await.map_err(|e| e.to_string())?;
        let rows = client
            .query(
                "SELECT application_name FROM pg_stat_replication WHERE sync_state = 'sync'",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let sync: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if sync == [format!("node{member}")] {
            Ok(member)
        } else {
            Err(format!(
                "sync set {{{member}}}, PostgreSQL's sync standbys {sync:?}"
            ))
        }
    })
    .await
    .unwrap()
}

/// Writes rows to `primary` until it stops answering; returns the ids it acknowledged.
async fn write_until_fault(
    cluster: &LocalCluster,
    primary: NodeId,
    fault: impl FnOnce(),
) -> BTreeSet<i32> {
    let client = connect(cluster, primary).await.unwrap();
    let mut acked = BTreeSet::new();
    let mut fault = Some(fault);
    for id in 0..i32::MAX {
        if id == 200 {
            (fault.take().unwrap())();
        }
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
        let insert = client.execute("INSERT INTO acked VALUES ($1)", &params);
        match tokio::time::timeout(Duration::from_secs(2), insert).await {
            Ok(Ok(_)) => {
                acked.insert(id);
            }
            // Failed or unknown: the client was not told it committed.
            _ => break,
        }
    }
    assert!(fault.is_none(), "the writer stopped before the fault");
    acked
}

async fn assert_all_present(cluster: &LocalCluster, primary: NodeId, acked: &BTreeSet<i32>) {
    let client = connect(cluster, primary).await.unwrap();
    let rows = client.query("SELECT id FROM acked", &[]).await.unwrap();
    let present: BTreeSet<i32> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {lost:?}",
        lost.len()
    );
    eprintln!(
        "{} acknowledged writes, all present on node {primary}",
        acked.len()
    );
}

async fn new_primary(cluster: &LocalCluster, ask: NodeId) -> NodeId {
    wait::until("a new primary", TIMEOUT, || async {
        let s = cluster.view(ask).await.map_err(|e| e.to_string())?.state;
        match s.primary {
            Some(p) if s.generation > 1 && s.primary_ready => Ok(p),
            _ => Err(format!("generation {}", s.generation)),
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_crashed_primary_loses_no_acknowledged_write_and_the_sync_standby_takes_over() {
    let mut cluster = sync_cluster().await;
    let sync = wait_for_sync_standby(&cluster, 1).await;
    let table = cluster.raftmgr_ok(2, &["cluster", "show"]).unwrap();
    assert!(table.contains("standby (sync)"), "{table}");

    let acked = write_until_fault(&cluster, 1, || {
        cluster.kill_postmaster(1).unwrap();
    })
    .await;
    cluster.kill(1).unwrap();
    let promoted = new_primary(&cluster, 2).await;
    assert_eq!(
        promoted, sync,
        "only the synchronous standby may be promoted"
    );
    assert_all_present(&cluster, promoted, &acked).await;

    // The new primary picks a new synchronous standby among those left.
    let other = [2, 3].into_iter().find(|id| *id != promoted).unwrap();
    wait::until("the other standby to follow", TIMEOUT, || async {
        let view = cluster.view(promoted).await.map_err(|e| e.to_string())?;
        if view.state.sync_set.contains(&other) {
            Ok(())
        } else {
            Err(format!("{:?}", view.state.sync_set))
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_paused_primary_agent_loses_no_acknowledged_write() {
    let cluster = sync_cluster().await;
    wait_for_sync_standby(&cluster, 1).await;
    let agent = nix::unistd::Pid::from_raw(cluster.pid(1).unwrap() as i32);
    let acked = write_until_fault(&cluster, 1, || {
        nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    })
    .await;
    let promoted = new_primary(&cluster, 2).await;
    assert_all_present(&cluster, promoted, &acked).await;
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).unwrap();
}

#[tokio::test]
async fn a_partitioned_primary_loses_no_acknowledged_write() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it puts each node in its own network namespace"
    );
    let cluster = sync_cluster_with(Options {
        network: true,
        ..Options::default()
    })
    .await;
    wait_for_sync_standby(&cluster, 1).await;
    let lab = cluster.network().unwrap();
    let acked = write_until_fault(&cluster, 1, || lab.partition(1, &[2, 3]).unwrap()).await;
    let promoted = new_primary(&cluster, 2).await;
    assert_all_present(&cluster, promoted, &acked).await;
    lab.heal().unwrap();
}

#[tokio::test]
async fn a_switchover_loses_no_acknowledged_write() {
    let cluster = sync_cluster().await;
    let sync = wait_for_sync_standby(&cluster, 1).await;
    let target = format!("node{sync}");
    let acked = write_until_fault(&cluster, 1, || {
        let out = cluster
            .raftmgr(2, &["switchover", "--to", &target, "--no-wait"])
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    })
    .await;
    let promoted = new_primary(&cluster, 2).await;
    assert_eq!(promoted, sync);
    assert_all_present(&cluster, promoted, &acked).await;
}

/// With no synchronous standby no one may be promoted, so a primary whose PostgreSQL dies
/// starts it again in place rather than resigning and leaving the cluster without a primary.
#[tokio::test]
async fn with_an_empty_sync_set_a_crashed_primary_restarts_in_place() {
    let cluster = sync_cluster().await;
    wait_for_sync_standby(&cluster, 1).await;
    for id in [2, 3] {
        let out = cluster.pg_ctl(id, &["stop", "-m", "fast"]).unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    wait::until("the sync set to empty", TIMEOUT, || async {
        let view = cluster.view(1).await.map_err(|e| e.to_string())?;
        if view.state.sync_set.is_empty() {
            Ok(())
        } else {
            Err(format!("{:?}", view.state.sync_set))
        }
    })
    .await
    .unwrap();
    // Synchronous mode `on`: the primary takes writes alone now.
    let client = connect(&cluster, 1).await.unwrap();
    let insert = client.execute("INSERT INTO acked VALUES (1)", &[]);
    tokio::time::timeout(Duration::from_secs(10), insert)
        .await
        .expect("a write without a sync standby hung")
        .unwrap();

    let killed = cluster.kill_postmaster(1).unwrap();
    let restarted = wait::until("node 1 to take writes again", TIMEOUT, || async {
        let pid = cluster.postmaster_pid(1).ok_or("no postmaster")?;
        let client = connect(&cluster, 1).await.map_err(|e| e.to_string())?;
        client
            .execute("INSERT INTO acked VALUES (2)", &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok(pid)
    })
    .await
    .unwrap();
    assert_ne!(restarted, killed);
    let state = cluster.view(2).await.unwrap().state;
    assert_eq!(
        (state.generation, state.primary, state.primary_resigned),
        (1, Some(1), false),
        "the primary resigned or was replaced"
    );
    assert_all_present(&cluster, 1, &[1, 2].into()).await;
}
