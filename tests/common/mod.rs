//! What the integration tests with real PostgreSQL share. Each test binary uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use raftmgr_jepsen::cluster::{LocalCluster, Options};
use raftmgr_raft::NodeId;
use tokio_postgres::NoTls;

pub const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Three nodes, node1 the primary, a table `acked` with rows 1..=100, every standby streaming.
pub async fn replicated_cluster() -> LocalCluster {
    replicated_cluster_with(Options::default()).await
}

pub async fn replicated_cluster_with(options: Options) -> LocalCluster {
    let options = Options {
        postgres: true,
        ..options
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
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    cluster
}

pub async fn sql(
    cluster: &LocalCluster,
    id: NodeId,
    query: &str,
) -> anyhow::Result<Vec<tokio_postgres::Row>> {
    let (client, connection) = tokio_postgres::connect(&cluster.pg_conninfo(id), NoTls).await?;
    tokio::spawn(connection);
    Ok(client.query(query, &[]).await?)
}
