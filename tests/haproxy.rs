//! HAProxy in front of the cluster, configured as the README shows (`option httpchk GET
//! /primary`): a client writing through it reaches the new primary after a failover. Needs
//! Debian's `haproxy` package (`scripts/test` installs it).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use raftmgr_jepsen::cluster::{free_ports, LocalCluster, Options, REPLICATION_PASSWORD};
use raftmgr_jepsen::wait;
use raftmgr_raft::NodeId;
use tokio_postgres::NoTls;

const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");
const TIMEOUT: Duration = Duration::from_secs(60);

/// HAProxy run by the test in the foreground (`-db`), ended by pid when dropped.
struct HaProxy {
    child: Child,
    port: u16,
}

impl HaProxy {
    /// The README's `listen` section, with checks every 100 ms so that the test is quick.
    fn start(cluster: &LocalCluster, ids: &[NodeId]) -> anyhow::Result<HaProxy> {
        let port = free_ports(1)?[0];
        let mut config = format!(
            "global\n    maxconn 100\n\n\
             defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 30s\n    \
             timeout server 30s\n\n\
             listen postgres\n    bind 127.0.0.1:{port}\n    option httpchk GET /primary\n    \
             http-check expect status 200\n    \
             default-server inter 100ms fall 2 rise 1 on-marked-down shutdown-sessions\n"
        );
        for id in ids {
            let node = cluster.node(*id);
            let api_port = node.api_addr.rsplit_once(':').unwrap().1;
            config += &format!(
                "    server node{id} 127.0.0.1:{} check port {api_port}\n",
                node.pg_port.unwrap()
            );
        }
        let path = cluster.dir().join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(cluster.dir().join("haproxy.log"))?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(HaProxy { child, port })
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=raftmgr_replication password={REPLICATION_PASSWORD} \
             dbname=postgres connect_timeout=2",
            self.port
        )
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn sql(conninfo: &str, query: &str) -> anyhow::Result<Vec<tokio_postgres::Row>> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(connection);
    let rows = tokio::time::timeout(Duration::from_secs(2), client.query(query, &[])).await??;
    Ok(rows)
}

/// Writes one row through HAProxy; returns the port of the PostgreSQL that took it.
async fn write_through(haproxy: &HaProxy, id: i32) -> anyhow::Result<u16> {
    let rows = sql(
        &haproxy.conninfo(),
        &format!("INSERT INTO acked VALUES ({id}) RETURNING inet_server_port()"),
    )
    .await?;
    Ok(rows[0].get::<_, i32>(0) as u16)
}

#[tokio::test]
async fn writes_through_haproxy_reach_the_new_primary_after_a_failover() {
    if Command::new("haproxy").arg("-v").output().is_err() {
        panic!("haproxy is not installed: run scripts/test, or apt-get install haproxy");
    }
    let options = Options {
        postgres: true,
        ..Options::default()
    };
    let cluster = LocalCluster::start(Path::new(BINARY), &options)
        .await
        .unwrap();
    cluster.setup_replication(&[1, 2, 3]).await.unwrap();
    for statement in [
        "CREATE TABLE acked (id int primary key)",
        "GRANT SELECT, INSERT ON acked TO raftmgr_replication",
    ] {
        sql(&cluster.pg_conninfo(1), statement).await.unwrap();
    }
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    let haproxy = HaProxy::start(&cluster, &[1, 2, 3]).unwrap();
    let port_of = |id: NodeId| cluster.node(id).pg_port.unwrap();

    // A fresh id for every attempt: a write whose answer was lost may still have committed.
    let next = std::sync::atomic::AtomicI32::new(1);
    let write = || async {
        let id = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        write_through(&haproxy, id).await.map_err(|e| e.to_string())
    };
    let first = wait::until("a write through HAProxy", TIMEOUT, write)
        .await
        .unwrap();
    assert_eq!(first, port_of(1), "HAProxy sends writes to the primary");

    cluster.kill_postmaster(1).unwrap();
    let killed = std::time::Instant::now();
    // The client keeps writing, a new connection each time, until a write is taken again.
    let taken_by = wait::until("a write through HAProxy after the failover", TIMEOUT, write)
        .await
        .unwrap();
    eprintln!(
        "writes through HAProxy resumed {:?} after the kill",
        killed.elapsed()
    );
    let view = cluster.view(2).await.unwrap();
    let new_primary = view.state.primary.unwrap();
    assert_ne!(new_primary, 1);
    assert_eq!(
        taken_by,
        port_of(new_primary),
        "the write went to the new primary"
    );
    // Every write HAProxy takes from now on lands on the new primary. (One may still fail while
    // the cluster settles — a rejoin, a fence under load — and is simply not counted.)
    let mut taken = 0;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while taken < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {taken} writes taken"
        );
        match write().await {
            Ok(port) => {
                assert_eq!(port, port_of(new_primary), "a write went to another node");
                taken += 1;
            }
            Err(_) => tokio::time::sleep(wait::POLL).await,
        }
    }
    let rows = sql(
        &cluster.pg_conninfo(new_primary),
        "SELECT count(*) FROM acked",
    )
    .await
    .unwrap();
    assert!(rows[0].get::<_, i64>(0) >= 20);
}
