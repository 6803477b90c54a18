//! `raftmgr demo`: a local cluster on loopback — node1 the primary, the others cloned standbys,
//! an agent for each — that runs until Ctrl-C or SIGTERM and then stops everything it started.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::client::{render_cluster, Client};
use crate::config::{self, NodeConfig};
use crate::pg::{Pg, RunState};
use crate::{commands, shutdown_signal};

/// How long the whole cluster may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where to put the nodes' configs and data (default: a fresh folder under /tmp).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Node N uses ports base + 10·(N−1) (PostgreSQL), +1 (Raft) and +2 (API).
    #[arg(long, default_value_t = 15400)]
    pub base_port: u16,
    /// How many nodes (node1 is the primary).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=9))]
    pub nodes: u16,
    /// Remove the folder when the demo stops.
    #[arg(long)]
    pub clean: bool,
}

struct DemoNode {
    name: String,
    config_path: PathBuf,
    config: NodeConfig,
    agent: Option<Child>,
}

/// What `DIR/cluster.json` holds for each node, for scripts and tests.
#[derive(Serialize)]
struct NodeInfo {
    name: String,
    config: PathBuf,
    api: String,
    pg_host: String,
    pg_port: u16,
    data_directory: PathBuf,
    /// A libpq conninfo with which a superuser on this machine reaches the node's PostgreSQL.
    conninfo: String,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(dir) => {
            if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
                bail!(
                    "{} is not empty; choose another --dir or remove it",
                    dir.display()
                );
            }
            std::fs::create_dir_all(dir)?;
            dir.canonicalize()?
        }
        None => tempfile::Builder::new()
            .prefix("raftmgr-demo-")
            .tempdir()?
            .keep(),
    };
    println!("demo folder: {}", dir.display());
    let mut nodes = Vec::new();
    // Installed before anything starts, so that a signal during bring-up still tears down.
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let result = async {
        nodes = write_configs(&dir, &args)?;
        tokio::select! {
            up = bring_up(&dir, &mut nodes) => up?,
            () = &mut signal => anyhow::bail!("interrupted while starting"),
        }
        println!("\nRunning. Press Ctrl-C (or send SIGTERM) to stop.");
        signal.await;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
    }
    println!("\nstopping ...");
    tear_down(&mut nodes);
    if args.clean {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("removed {}", dir.display());
    } else {
        println!(
            "stopped; the data is in {} (remove it, or run with --clean)",
            dir.display()
        );
    }
    result.map_err(|_| anyhow::anyhow!("the demo did not come up"))
}

fn write_configs(dir: &Path, args: &DemoArgs) -> anyhow::Result<Vec<DemoNode>> {
    // The postgres OS user must reach the data folders below this one.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let count = args.nodes;
    let port = |node: u16, offset: u16| -> anyhow::Result<u16> {
        args.base_port
            .checked_add(10 * (node - 1) + offset)
            .context("--base-port is too high for that many nodes")
    };
    for node in 1..=count {
        for (offset, what) in [(0, "PostgreSQL"), (1, "Raft"), (2, "API")] {
            let p = port(node, offset)?;
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_err() {
                bail!("port {p} ({what} of node{node}) is taken; choose another --base-port");
            }
        }
    }
    let cluster_secret = random_hex(16)?;
    let api_token = random_hex(16)?;
    let replication_password = random_hex(16)?;
    let mut nodes = Vec::new();
    for node in 1..=count {
        let node_dir = dir.join(format!("node{node}"));
        std::fs::create_dir_all(&node_dir)?;
        let mut text = format!(
            "# raftmgr demo node {node}\n\
             node_id = {node}\nname = \"node{node}\"\ndata_dir = \"{data}\"\n\
             cluster_secret = \"{cluster_secret}\"\napi_token = \"{api_token}\"\n\n\
             [raft]\nlisten = \"127.0.0.1:{raft}\"\n\n[api]\nlisten = \"127.0.0.1:{api}\"\n\n\
             [postgres]\ndata_directory = \"{pgdata}\"\nport = {pg}\n\
             replication_password = \"{replication_password}\"\n",
            data = node_dir.display(),
            raft = port(node, 1)?,
            api = port(node, 2)?,
            pgdata = node_dir.join("pgdata").display(),
            pg = port(node, 0)?,
        );
        for peer in (1..=count).filter(|p| *p != node) {
            text += &format!(
                "\n[[peers]]\nnode_id = {peer}\nraft_addr = \"127.0.0.1:{}\"\napi_addr = \"127.0.0.1:{}\"\n",
                port(peer, 1)?,
                port(peer, 2)?
            );
        }
        let config_path = node_dir.join("node.toml");
        std::fs::write(&config_path, text)?;
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))?;
        let config = config::load(&config_path)?;
        nodes.push(DemoNode {
            name: format!("node{node}"),
            config_path,
            config,
            agent: None,
        });
    }
    Ok(nodes)
}

async fn bring_up(dir: &Path, nodes: &mut [DemoNode]) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    for node in nodes.iter_mut() {
        let log = std::fs::File::create(node.config.file.data_dir.join("agent.log"))?;
        let child = Command::new(&exe)
            .arg("agent")
            .arg("-c")
            .arg(&node.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Ctrl-C reaches the demo, which stops the agents in order.
            .process_group(0)
            .spawn()
            .context("starting an agent")?;
        node.agent = Some(child);
    }
    let first = Client::for_node(&nodes[0].config)?;
    for node in nodes.iter() {
        let client = Client::for_node(&node.config)?;
        wait_for(
            &format!("{}'s agent", node.name),
            Duration::from_secs(20),
            || async { client.cluster().await.map(|_| ()) },
        )
        .await?;
    }
    let _: serde_json::Value = first.post("/cluster/init", &serde_json::json!({})).await?;
    wait_for("a Raft leader", Duration::from_secs(20), || async {
        first
            .cluster()
            .await?
            .raft
            .leader
            .map(|_| ())
            .context("no leader yet")
    })
    .await?;

    commands::primary_init(&nodes[0].config).await?;
    for node in &nodes[1..] {
        commands::standby_clone(&node.config, &nodes[0].name).await?;
        commands::standby_register(&node.config, None).await?;
    }
    let standbys = nodes.len() - 1;
    let view = wait_for("the standbys to stream", READY_TIMEOUT, || async {
        let view = first.cluster().await?;
        let streaming = view
            .nodes
            .iter()
            .filter(|n| n.summary.status == "streaming")
            .count();
        let primary = view
            .nodes
            .iter()
            .filter(|n| n.summary.role == "primary" && n.summary.status == "running")
            .count();
        if primary == 1 && streaming == standbys {
            Ok(view)
        } else {
            bail!("{primary} running primary, {streaming} of {standbys} standbys streaming")
        }
    })
    .await?;

    let info: Vec<NodeInfo> = nodes.iter().map(node_info).collect();
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_string_pretty(&info)?,
    )?;
    println!("\n{}", render_cluster(&view));
    for node in &info {
        println!(
            "{}: API http://{}  PostgreSQL 127.0.0.1:{}  psql \"{}\"",
            node.name, node.api, node.pg_port, node.conninfo
        );
    }
    println!(
        "\nconfigs and data: {}; for scripts: {}",
        dir.display(),
        dir.join("cluster.json").display()
    );
    Ok(())
}

fn node_info(node: &DemoNode) -> NodeInfo {
    let pg = node
        .config
        .postgres
        .as_ref()
        .expect("demo nodes have [postgres]");
    let section = &pg.section;
    NodeInfo {
        name: node.name.clone(),
        config: node.config_path.clone(),
        api: node.config.api_advertise(),
        pg_host: section.listen_address.clone(),
        pg_port: section.port,
        data_directory: section.data_directory.clone(),
        conninfo: format!(
            "host={} port={} user={} dbname=postgres",
            pg.socket_dir.display(),
            section.port,
            section.superuser
        ),
    }
}

/// Stops the agents (SIGTERM, then SIGKILL after a deadline), then each PostgreSQL.
fn tear_down(nodes: &mut [DemoNode]) {
    for node in nodes.iter_mut() {
        if let Some(mut child) = node.agent.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    for node in nodes.iter() {
        let Some(settings) = &node.config.postgres else {
            continue;
        };
        let Ok(pg) = Pg::new(settings) else { continue };
        if let RunState::Running { .. } = pg.run_state() {
            match pg.stop("fast") {
                Ok(()) => println!("stopped {}'s PostgreSQL", node.name),
                Err(e) => eprintln!("cannot stop {}'s PostgreSQL: {e:#}", node.name),
            }
        }
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                bail!("timed out after {timeout:?} waiting for {what}: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
