//! PostgreSQL under the agent, shown with real PostgreSQL 15 and real agent processes.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::sql;
use raftmgr_api::ClusterView;
use raftmgr_jepsen::cluster::{LocalCluster, Options};
use raftmgr_jepsen::wait;
use tokio_postgres::NoTls;

const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");
const TIMEOUT: Duration = Duration::from_secs(30);

async fn start_cluster() -> LocalCluster {
    let options = Options {
        postgres: true,
        ..Options::default()
    };
    LocalCluster::start(Path::new(BINARY), &options)
        .await
        .unwrap()
}

async fn count_rows(cluster: &LocalCluster, id: u64) -> Result<i64, String> {
    let rows = sql(cluster, id, "SELECT count(*) FROM demo")
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows[0].get(0))
}

fn registrations(view: &ClusterView) -> usize {
    view.state
        .recent
        .iter()
        .filter(|e| e.event.kind() == "NodeRegistered")
        .count()
}

#[tokio::test]
async fn init_clone_and_register_give_streaming_standbys_and_refusals_change_nothing() {
    let cluster = start_cluster().await;
    cluster.setup_replication(&[1, 2, 3]).await.unwrap();

    sql(&cluster, 1, "CREATE TABLE demo (id int primary key)")
        .await
        .unwrap();
    sql(
        &cluster,
        1,
        "INSERT INTO demo SELECT generate_series(1, 1000)",
    )
    .await
    .unwrap();
    for id in [2, 3] {
        wait::until(
            &format!("node {id} to replay the rows"),
            TIMEOUT,
            || async {
                match count_rows(&cluster, id).await? {
                    1000 => Ok(()),
                    n => Err(format!("{n} rows")),
                }
            },
        )
        .await
        .unwrap();
    }

    // `cluster show --json` from a standby's config: one primary, two standbys streaming.
    let json = cluster
        .raftmgr_ok(2, &["cluster", "show", "--json"])
        .unwrap();
    let show: serde_json::Value = serde_json::from_str(&json).unwrap();
    let nodes = show["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for node in nodes {
        assert_eq!(node["timeline"], 1, "{node}");
        assert!(
            node["lsn"].as_str().is_some_and(|l| l.contains('/')),
            "{node}"
        );
        if node["name"] == "node1" {
            assert_eq!(
                (node["role"].as_str(), node["status"].as_str()),
                (Some("primary"), Some("running"))
            );
        } else {
            assert_eq!(node["role"], "standby", "{node}");
            assert_eq!(node["status"], "streaming", "{node}");
            assert_eq!(node["upstream"], "node1", "{node}");
            let lag = node["lag_bytes"].as_u64().unwrap();
            assert!(lag < 16 * 1024 * 1024, "lag {lag} B");
        }
    }
    let status = cluster.raftmgr_ok(2, &["node", "status"]).unwrap();
    assert!(
        status.contains("node2: replica (PostgreSQL running"),
        "{status}"
    );
    let status: serde_json::Value = serde_json::from_str(
        &cluster
            .raftmgr_ok(1, &["node", "status", "--json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (status["role"].as_str(), status["lease_held"].as_bool()),
        (Some("primary"), Some(true))
    );
    let table = cluster.raftmgr_ok(3, &["cluster", "show"]).unwrap();
    assert!(
        table.contains("streaming") && table.contains("node1"),
        "{table}"
    );

    // The load-balancer checks, as HAProxy would ask them.
    let status = |id: u64, path: &'static str| {
        let url = format!("http://{}{path}", cluster.node(id).api_addr);
        let http = cluster.http().clone();
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(1, "/primary").await, 200);
    assert_eq!(status(1, "/leader").await, 200);
    assert_eq!(status(2, "/primary").await, 503);
    assert_eq!(status(1, "/replica").await, 503);
    assert_eq!(status(2, "/replica").await, 200);
    assert_eq!(status(3, "/replica?lag=16MB").await, 200);
    assert_eq!(status(3, "/replica?lag=ten").await, 400);
    let metrics = cluster
        .http()
        .get(format!("http://{}/metrics", cluster.node(1).api_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "raftmgr_generation{node=\"node1\"} 1",
        "raftmgr_primary{node=\"node1\"} 1",
        "raftmgr_postgres_in_recovery{node=\"node1\"} 0",
        "raftmgr_lease_held{node=\"node1\"} 1",
        "raftmgr_replication_lag_bytes{node=\"node2\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    for id in [1, 2, 3] {
        assert_eq!(status(id, "/read-only").await, 200);
        assert_eq!(status(id, "/health").await, 200);
        assert_eq!(status(id, "/readiness").await, 200);
    }

    // Refusals: each clear, nothing changed.
    let before = cluster.view(1).await.unwrap();
    let pid = cluster.postmaster_pid(2).unwrap();
    let refusals: [(u64, &[&str], &str); 4] = [
        (2, &["standby", "clone", "--from", "node1"], "is not empty"),
        (2, &["standby", "register"], "already registered"),
        (3, &["primary", "init"], "already registered"),
        (
            2,
            &["standby", "clone", "--from", "node9"],
            "no registered node is called \"node9\"",
        ),
    ];
    for (id, args, expected) in refusals {
        let out = cluster.raftmgr(id, args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let bad_config = cluster.dir().join("bad-bindir.toml");
    let text = std::fs::read_to_string(&cluster.node(2).config).unwrap();
    std::fs::write(
        &bad_config,
        text.replace(
            "[postgres]\n",
            "[postgres]\nbin_dir = \"/nonexistent/bin\"\n",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BINARY)
        .args(["standby", "register", "-c"])
        .arg(&bad_config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("postgres.bin_dir: /nonexistent/bin has no initdb"),
        "{stderr}"
    );

    assert_eq!(
        cluster.postmaster_pid(2),
        Some(pid),
        "the standby kept running"
    );
    assert_eq!(count_rows(&cluster, 2).await.unwrap(), 1000);
    let after = cluster.view(1).await.unwrap();
    assert_eq!(registrations(&after), registrations(&before));
    let registered = |v: &ClusterView| {
        let nodes: Vec<_> = v
            .state
            .nodes
            .values()
            .map(|n| n.registration.clone())
            .collect();
        (nodes, v.state.generation, v.state.primary)
    };
    assert_eq!(registered(&after), registered(&before));
}

#[tokio::test]
async fn agents_restart_without_touching_postgres_and_a_hand_stopped_standby_shows_down() {
    let mut cluster = start_cluster().await;
    cluster.setup_replication(&[1, 2, 3]).await.unwrap();
    sql(&cluster, 1, "CREATE TABLE demo (id int)")
        .await
        .unwrap();

    // An agent killed and restarted: PostgreSQL keeps serving, nothing is registered twice.
    let pid = cluster.postmaster_pid(2).unwrap();
    let registered = registrations(&cluster.view(1).await.unwrap());
    cluster.kill(2).unwrap();
    sql(&cluster, 1, "INSERT INTO demo VALUES (1)")
        .await
        .unwrap();
    wait::until(
        "node 2 to replay while its agent is down",
        TIMEOUT,
        || async {
            match count_rows(&cluster, 2).await? {
                1 => Ok(()),
                n => Err(format!("{n} rows")),
            }
        },
    )
    .await
    .unwrap();
    cluster.start_node(2).unwrap();
    cluster.wait_api(2, TIMEOUT).await.unwrap();
    let view = cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
    assert_eq!(
        cluster.postmaster_pid(2),
        Some(pid),
        "the agent restart did not restart PostgreSQL"
    );
    assert_eq!(registrations(&view), registered);
    assert!(cluster.read_log(2).matches("opened the Raft store").count() == 2);

    // The log does not flood: count the events of an idle stretch.
    let idle = Duration::from_secs(10);
    let start_index = cluster.view(1).await.unwrap().raft.last_log_index.unwrap();
    let started = Instant::now();
    tokio::time::sleep(idle).await;
    let end_index = cluster.view(1).await.unwrap().raft.last_log_index.unwrap();
    let per_second = (end_index - start_index) as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "idle: {} events in {:?} ({per_second:.2}/s)",
        end_index - start_index,
        started.elapsed()
    );
    // The budget: the primary's lease renewals (every 400 ms by default: 2.5/s) plus at most one
    // observation per second across the cluster.
    let budget = 1000.0 / 400.0 + 1.0;
    assert!(
        per_second <= budget,
        "{per_second:.2} events/s while idle (budget {budget}/s)"
    );

    // A standby stopped by hand: the committed state shows it down (by a majority), and the
    // agent leaves it stopped; started again by hand, it streams again.
    let out = cluster.pg_ctl(3, &["stop", "-m", "fast", "-w"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let stopped_at = Instant::now();
    wait::until("node 3 to show down", TIMEOUT, || async {
        let view = cluster.view(2).await.map_err(|e| e.to_string())?;
        let row = view
            .nodes
            .iter()
            .find(|n| n.summary.id == 3)
            .ok_or("no row")?;
        if row.summary.status == "down" && row.summary.observed_down >= 2 {
            Ok(())
        } else {
            Err(format!("{:?}", row.summary))
        }
    })
    .await
    .unwrap();
    eprintln!("node 3 shown down after {:?}", stopped_at.elapsed());
    assert_eq!(
        cluster.postmaster_pid(3),
        None,
        "the agent must not restart a hand-stopped PostgreSQL"
    );
    // The agent's own measurement follows at its next step (a moment later on a busy machine).
    let out = wait::until(
        "node status to fail while PostgreSQL is down",
        TIMEOUT,
        || async {
            let out = cluster
                .raftmgr(3, &["node", "status"])
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Err(String::from_utf8_lossy(&out.stdout).to_string())
            } else {
                Ok(out)
            }
        },
    )
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not running"),
        "{out:?}"
    );

    let log = cluster.node(3).pg_data.join("log/by-hand.log");
    let out = cluster
        .pg_ctl(3, &["start", "-w", "-l", log.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    cluster.wait_streaming(1, &[2, 3], TIMEOUT).await.unwrap();
}

#[tokio::test]
async fn the_demo_comes_up_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let base_port = demo_base_port();
    let mut demo = std::process::Command::new(BINARY)
        .args([
            "demo",
            "--clean",
            "--base-port",
            &base_port.to_string(),
            "--dir",
        ])
        .arg(&demo_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(demo.id());

    let info_path = demo_dir.join("cluster.json");
    let info: serde_json::Value = wait::until(
        "the demo's cluster.json",
        Duration::from_secs(120),
        || async {
            let text = std::fs::read_to_string(&info_path).map_err(|e| e.to_string())?;
            serde_json::from_str(&text).map_err(|e| e.to_string())
        },
    )
    .await
    .unwrap();
    let nodes = info.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let mut postmasters = Vec::new();
    for node in nodes {
        for key in [
            "name",
            "config",
            "api",
            "pg_host",
            "pg_port",
            "data_directory",
            "conninfo",
        ] {
            assert!(!node[key].is_null(), "{key} missing in {node}");
        }
        let (client, connection) =
            tokio_postgres::connect(node["conninfo"].as_str().unwrap(), NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(in_recovery, node["name"] != "node1", "{node}");
        let data = Path::new(node["data_directory"].as_str().unwrap());
        postmasters.push(raftmgr_jepsen::cluster::postmaster_pid(data).unwrap());
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait::until("the demo to exit", Duration::from_secs(60), || {
        let status = demo.try_wait();
        async move {
            match status {
                Ok(Some(status)) => Ok(status),
                _ => Err("running".to_string()),
            }
        }
    })
    .await
    .unwrap();
    std::mem::forget(guard);
    assert!(status.success(), "{status}");
    assert!(!demo_dir.exists(), "--clean removes the folder");
    // pg_ctl stop returns when postmaster.pid is gone, a moment before the process is reaped.
    wait::until(
        "the demo's postmasters to exit",
        Duration::from_secs(10),
        || async {
            let alive: Vec<_> = postmasters
                .iter()
                .filter(|pid| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(**pid), None).is_ok()
                })
                .collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("still running: {alive:?}"))
            }
        },
    )
    .await
    .unwrap();
    for offset in 0..30 {
        let port = base_port + offset;
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is still taken"
        );
    }
}

/// A base port with the demo's 30 ports (3 nodes × 10) free.
fn demo_base_port() -> u16 {
    for _ in 0..100 {
        let base = raftmgr_jepsen::cluster::free_ports(1).unwrap()[0] / 10 * 10;
        if base < 60_000
            && (0..30).all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok())
        {
            return base;
        }
    }
    panic!("no free range of 30 ports");
}

/// Sends SIGTERM to the demo (by its pid) if the test fails before stopping it, so that the demo
/// still tears down what it started.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// A test process killed by a signal (nextest's timeout, a killed run) runs no destructor: its
/// lab's agents, PostgreSQL servers, network namespaces and folder stay. The next lab to start
/// removes them, and leaves alone a lab whose test process runs.
#[tokio::test]
async fn the_next_lab_removes_a_lab_whose_test_process_died() {
    use raftmgr_jepsen::cluster::{postmaster_pid, process_alive};
    use raftmgr_jepsen::orphans::{ProcessId, OWNER_FILE};
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: the lab it leaves behind has network namespaces"
    );
    let options = Options {
        network: true,
        ..Options::default()
    };
    let orphan = common::replicated_cluster_with(options).await;
    let dir = orphan.dir().to_path_buf();
    let ids = orphan.ids();
    let agents: Vec<i32> = ids
        .iter()
        .map(|id| orphan.pid(*id).unwrap() as i32)
        .collect();
    let postmasters: Vec<i32> = ids
        .iter()
        .map(|id| postmaster_pid(&orphan.node(*id).pg_data).unwrap())
        .collect();
    let lab = orphan.network().unwrap();
    let namespaces: Vec<String> = ids.iter().map(|id| lab.namespace(*id)).collect();

    // Its test process runs: another lab leaves it alone.
    let beside = LocalCluster::new(Path::new(BINARY), &Options::default()).unwrap();
    assert!(dir.exists());
    assert!(agents.iter().chain(&postmasters).all(|p| process_alive(*p)));

    // Its test process dies: the owner file names one that has exited, and nothing drops it.
    let mut exited = std::process::Command::new("true").spawn().unwrap();
    let dead = ProcessId::of(exited.id() as i32).unwrap();
    exited.wait().unwrap();
    dead.write(&dir.join(OWNER_FILE)).unwrap();
    std::mem::forget(orphan);

    let next = LocalCluster::new(Path::new(BINARY), &Options::default()).unwrap();
    assert!(!dir.exists(), "{} is still there", dir.display());
    for pid in agents.iter().chain(&postmasters) {
        assert!(
            !process_alive(*pid),
            "process {pid} of the dead lab still runs"
        );
    }
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    for ns in &namespaces {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "namespace {ns} is still there: {listed}"
        );
    }
    drop((beside, next));
}
