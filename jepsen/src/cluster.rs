//! A raftmgr cluster of real agent processes on loopback, each with its own config, ports and
//! data folder under one temporary directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use raftmgr_api::{AddMember, ClusterView, MembershipAnswer, ProposeAnswer};
use raftmgr_raft::{Event, NodeId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wait;

pub const CLUSTER_SECRET: &str = "lab-cluster-secret-0123456789";
pub const API_TOKEN: &str = "lab-api-token-0123456789";

/// How long an agent may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Options {
    /// The members the cluster is initialised with (node ids 1..=voters).
    pub voters: usize,
    /// Further nodes with a config and ports, not started: for joining later.
    pub spares: usize,
    /// Extra `key = value` lines for every node's `[raft]` section.
    pub raft_settings: Vec<String>,
    /// Give every node a `[postgres]` section (real PostgreSQL, run as the `postgres` OS user
    /// when the lab runs as root).
    pub postgres: bool,
    /// Extra `key = value` lines for every node's `[failover]` section.
    pub failover_settings: Vec<String>,
    /// Extra `key = value` lines for every node's `[postgres]` section.
    pub postgres_settings: Vec<String>,
    /// Extra `key = value` lines for every node's `[api]` section.
    pub api_settings: Vec<String>,
    /// Run each node in its own network namespace (root only), so that partitions drop real
    /// packets; otherwise everything is on 127.0.0.1.
    pub network: bool,
    /// Give every node a `[tls]` section: a fresh CA in `DIR/tls/ca.crt` and, per node, a
    /// certificate for its address (`DIR/tls/nodeN.crt`, `nodeN.key`); the lab's own HTTP
    /// client then speaks HTTPS, trusting that CA.
    pub tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            voters: 3,
            spares: 0,
            raft_settings: Vec::new(),
            postgres: false,
            failover_settings: Vec::new(),
            postgres_settings: Vec::new(),
            api_settings: Vec::new(),
            network: false,
            tls: false,
        }
    }
}

pub const REPLICATION_PASSWORD: &str = "lab-replication-password";

pub struct Node {
    pub id: NodeId,
    pub raft_addr: String,
    pub api_addr: String,
    /// The PostgreSQL port, when the lab runs PostgreSQL.
    pub pg_port: Option<u16>,
    pub pg_data: PathBuf,
    pub pg_socket_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// The last `lines` lines of this node's agent log, and of its PostgreSQL's newest log file
    /// (a third as many): what a failing test prints.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut text = String::new();
        let newest_pg_log = std::fs::read_dir(self.pg_data.join("log"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .max()
            .map(|(_, path)| path);
        let logs = [(self.log.clone(), lines, "agent")]
            .into_iter()
            .chain(newest_pg_log.map(|path| (path, lines / 3, "PostgreSQL")));
        for (path, lines, whose) in logs {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            text += &format!(
                "---- node {} {whose} log {} (last {} lines) ----\n",
                self.id,
                path.display(),
                tail.len()
            );
            for line in tail.iter().rev() {
                text += line;
                text.push('\n');
            }
        }
        text
    }
}

pub struct LocalCluster {
    /// Dropped after the nodes are stopped (fields drop after `Drop::drop`).
    network: Option<crate::netns::LabNetwork>,
    dir: tempfile::TempDir,
    binary: PathBuf,
    nodes: Vec<Node>,
    http: reqwest::Client,
    /// The lab CA's certificate (PEM) when the nodes run with TLS.
    ca_pem: Option<String>,
}

impl LocalCluster {
    /// Writes every node's configuration; starts nothing.
    pub fn new(binary: &Path, options: &Options) -> anyhow::Result<LocalCluster> {
        anyhow::ensure!(binary.exists(), "no raftmgr binary at {}", binary.display());
        crate::orphans::sweep();
        let dir = tempfile::Builder::new()
            .prefix(crate::orphans::LAB_PREFIX)
            .tempdir()?;
        crate::orphans::ProcessId::me().write(&dir.path().join(crate::orphans::OWNER_FILE))?;
        if options.postgres {
            // PostgreSQL's OS user must reach the data folders below it.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let total = options.voters + options.spares;
        let network = if options.network {
            let lab = crate::netns::LabNetwork::create(total as u64)?;
            let names: String = lab
                .created()
                .iter()
                .map(|(kind, name)| format!("{kind} {name}\n"))
                .collect();
            std::fs::write(dir.path().join(crate::orphans::NETWORK_FILE), names)?;
            Some(lab)
        } else {
            None
        };
        // On loopback every node needs its own ports; in namespaces each has its own address.
        let ports = match &network {
            Some(_) => (0..total).flat_map(|_| [7001, 8001, 5432]).collect(),
            None => free_ports(3 * total)?,
        };
        let host = |id: NodeId| match &network {
            Some(lab) => lab.address(id),
            None => "127.0.0.1".to_string(),
        };
        let mut nodes = Vec::new();
        for i in 0..total {
            let id = i as NodeId + 1;
            let node_dir = dir.path().join(format!("node{id}"));
            nodes.push(Node {
                id,
                raft_addr: format!("{}:{}", host(id), ports[3 * i]),
                api_addr: format!("{}:{}", host(id), ports[3 * i + 1]),
                pg_port: options.postgres.then_some(ports[3 * i + 2]),
                pg_data: node_dir.join("pgdata"),
                pg_socket_dir: node_dir.join("socket"),
                config: dir.path().join(format!("node{id}.toml")),
                log: dir.path().join(format!("node{id}.log")),
                child: None,
            });
        }
        let ca = if options.tls {
            Some(crate::tls::TestCa::new("raftmgr lab CA")?)
        } else {
            None
        };
        let tls_dir = dir.path().join("tls");
        if let Some(ca) = &ca {
            std::fs::create_dir(&tls_dir)?;
            std::fs::write(tls_dir.join("ca.crt"), ca.cert_pem())?;
        }
        for node in &nodes {
            let mut text = format!(
                "node_id = {id}\nname = \"node{id}\"\ndata_dir = \"{data}\"\n\
                 cluster_secret = \"{CLUSTER_SECRET}\"\napi_token = \"{API_TOKEN}\"\n\n\
                 [raft]\nlisten = \"{raft}\"\n{extra}\n[api]\nlisten = \"{api}\"\n{api_extra}",
                id = node.id,
                data = dir.path().join(format!("node{}", node.id)).display(),
                raft = node.raft_addr,
                api = node.api_addr,
                extra = lines(&options.raft_settings),
                api_extra = lines(&options.api_settings),
            );
            if let Some(port) = node.pg_port {
                text += &format!(
                    "\n[postgres]\ndata_directory = \"{}\"\nport = {port}\n\
                     replication_password = \"{REPLICATION_PASSWORD}\"\n\
                     probe_interval_ms = 250\npeer_probe_interval_ms = 1000\n",
                    node.pg_data.display()
                );
                text += &lines(&options.postgres_settings);
                if let Some(lab) = &network {
                    text += &format!(
                        "listen_address = \"{}\"\nallowed_cidrs = [\"{}\"]\n",
                        lab.address(node.id),
                        lab.cidr()
                    );
                }
            }
            if let Some(ca) = &ca {
                let ip: std::net::IpAddr = host(node.id).parse()?;
                let issued = ca.issue(&format!("node{}", node.id), &[ip])?;
                let cert = tls_dir.join(format!("node{}.crt", node.id));
                let key = tls_dir.join(format!("node{}.key", node.id));
                std::fs::write(&cert, issued.cert_pem)?;
                write_private(&key, &issued.key_pem)?;
                text += &format!(
                    "\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
                    cert.display(),
                    key.display(),
                    tls_dir.join("ca.crt").display()
                );
            }
            if !options.failover_settings.is_empty() {
                text += "\n[failover]\n";
                text += &lines(&options.failover_settings);
            }
            for peer in nodes
                .iter()
                .take(options.voters)
                .filter(|p| p.id != node.id)
            {
                text += &format!(
                    "\n[[peers]]\nnode_id = {}\nraft_addr = \"{}\"\napi_addr = \"{}\"\n",
                    peer.id, peer.raft_addr, peer.api_addr
                );
            }
            std::fs::write(&node.config, text)?;
        }
        let ca_pem = ca.as_ref().map(|ca| ca.cert_pem());
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(15));
        if let Some(pem) = &ca_pem {
            http = http
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes())?);
        }
        Ok(LocalCluster {
            network,
            dir,
            binary: binary.to_path_buf(),
            nodes,
            http: http.build()?,
            ca_pem,
        })
    }

    /// Starts the voters, initialises the cluster on node 1, and waits for an agreed leader.
    pub async fn start(binary: &Path, options: &Options) -> anyhow::Result<LocalCluster> {
        let mut cluster = LocalCluster::new(binary, options)?;
        for id in 1..=options.voters as NodeId {
            cluster.start_node(id)?;
        }
        for id in 1..=options.voters as NodeId {
            cluster.wait_api(id, Duration::from_secs(20)).await?;
        }
        let _: serde_json::Value = cluster
            .post(1, "/cluster/init", &serde_json::json!({}))
            .await
            .context("initialising the cluster")?;
        let voters: Vec<NodeId> = (1..=options.voters as NodeId).collect();
        cluster
            .wait_for_leader(&voters, Duration::from_secs(20))
            .await?;
        Ok(cluster)
    }

    /// The lab network, when the nodes run in namespaces.
    pub fn network(&self) -> Option<&crate::netns::LabNetwork> {
        self.network.as_ref()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `https` when the nodes run with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The lab CA's certificate (PEM) when the nodes run with TLS; its file is
    /// `dir()/tls/ca.crt`, beside each node's `nodeN.crt` and `nodeN.key`.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize - 1]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn pid(&self, id: NodeId) -> Option<u32> {
        self.node(id).child.as_ref().map(Child::id)
    }

    /// Starts node `id`'s agent (its log goes to `nodeN.log`, appended across restarts).
    pub fn start_node(&mut self, id: NodeId) -> anyhow::Result<()> {
        // `ip netns exec` execs the agent in place: the child's pid is the agent's.
        let mut command = self.on_node(id);
        let node = self.node_mut(id);
        anyhow::ensure!(node.child.is_none(), "node {id} is already running");
        let log = File::options().create(true).append(true).open(&node.log)?;
        let child = command
            .arg("agent")
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting an agent")?;
        let agent = crate::orphans::ProcessId::of(child.id() as i32);
        node.child = Some(child);
        if let Some(agent) = agent {
            agent.write(&node.config.with_extension(crate::orphans::AGENT_EXTENSION))?;
        }
        Ok(())
    }

    /// A command running the raftmgr binary on node `id`.
    fn on_node(&self, id: NodeId) -> Command {
        match &self.network {
            Some(lab) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &lab.namespace(id)])
                    .arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        }
    }

    /// `kill -9` of node `id`'s agent.
    pub fn kill(&mut self, id: NodeId) -> anyhow::Result<()> {
        let mut child = self
            .node_mut(id)
            .child
            .take()
            .context("node is not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM to node `id`'s agent; waits for it to exit and returns its exit code.
    pub async fn stop(&mut self, id: NodeId) -> anyhow::Result<Option<i32>> {
        let mut child = self
            .node_mut(id)
            .child
            .take()
            .context("node is not running")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if tokio::time::Instant::now() >= deadline {
                child.kill()?;
                child.wait()?;
                bail!("node {id} did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed");
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    /// Whether node `id`'s agent process is still running.
    pub fn is_running(&mut self, id: NodeId) -> bool {
        match self.node_mut(id).child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs `raftmgr ARGS -c nodeN.toml` on node `id` (in its namespace, if it has one) and
    /// returns its output.
    pub fn raftmgr(&self, id: NodeId, args: &[&str]) -> anyhow::Result<std::process::Output> {
        self.on_node(id)
            .args(args)
            .arg("-c")
            .arg(&self.node(id).config)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running raftmgr {args:?}"))
    }

    /// Like [`raftmgr`](Self::raftmgr), failing with its output unless it succeeds.
    pub fn raftmgr_ok(&self, id: NodeId, args: &[&str]) -> anyhow::Result<String> {
        let out = self.raftmgr(id, args)?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!(
                "raftmgr {args:?} on node {id} failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// node1 `primary init`, the others `standby clone --from node1` and `standby register`;
    /// then waits until the committed state shows every standby streaming.
    pub async fn setup_replication(&self, ids: &[NodeId]) -> anyhow::Result<ClusterView> {
        let (primary, standbys) = ids.split_first().context("no nodes")?;
        self.raftmgr_ok(*primary, &["primary", "init"])?;
        let from = format!("node{primary}");
        for id in standbys {
            self.raftmgr_ok(*id, &["standby", "clone", "--from", &from])?;
            self.raftmgr_ok(*id, &["standby", "register"])?;
        }
        self.wait_streaming(*primary, standbys, Duration::from_secs(60))
            .await
    }

    /// Waits until node `via`'s view shows `primary` running as the primary and every one of
    /// `standbys` streaming from it.
    pub async fn wait_streaming(
        &self,
        primary: NodeId,
        standbys: &[NodeId],
        timeout: Duration,
    ) -> anyhow::Result<ClusterView> {
        let primary_name = format!("node{primary}");
        wait::until("the standbys to stream", timeout, || async {
            let view = self.view(primary).await.map_err(|e| e.to_string())?;
            let row = |id: NodeId| view.nodes.iter().find(|n| n.summary.id == id).cloned();
            let p = row(primary).ok_or("primary not registered")?;
            if (p.summary.role.as_str(), p.summary.status.as_str()) != ("primary", "running") {
                return Err(format!("primary row: {:?}", p.summary));
            }
            for id in standbys {
                let s = row(*id).ok_or(format!("node {id} not registered"))?;
                let streaming = s.summary.status == "streaming"
                    && s.summary.upstream.as_ref() == Some(&primary_name)
                    && s.summary.lag_bytes.is_some();
                if !streaming {
                    return Err(format!("node {id}: {:?}", s.summary));
                }
            }
            Ok(view)
        })
        .await
        // Where CI's output is cut short, a test's panic message still shows.
        .map_err(|e| {
            let tails: Vec<String> = standbys
                .iter()
                .map(|id| self.node(*id).log_tails(25))
                .collect();
            anyhow::anyhow!("{e:#}\n{}", tails.concat())
        })
    }

    /// A libpq conninfo for node `id`'s PostgreSQL as the superuser, over its Unix socket.
    pub fn pg_conninfo(&self, id: NodeId) -> String {
        let node = self.node(id);
        format!(
            "host={} port={} user=postgres dbname=postgres",
            node.pg_socket_dir.display(),
            node.pg_port.unwrap_or(5432)
        )
    }

    /// Runs `pg_ctl ARGS -D <node id's data>` as PostgreSQL's OS user: for tests that act as a
    /// DBA would by hand.
    pub fn pg_ctl(&self, id: NodeId, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let data = self.node(id).pg_data.clone();
        pg_command("pg_ctl")
            .args(args)
            .arg("-D")
            .arg(&data)
            .output()
            .context("running pg_ctl")
    }

    /// `kill -9` of node `id`'s postmaster (started by our agent); returns its pid.
    pub fn kill_postmaster(&self, id: NodeId) -> anyhow::Result<i32> {
        let pid = self
            .postmaster_pid(id)
            .context("PostgreSQL is not running")?;
        kill(Pid::from_raw(pid), Signal::SIGKILL)?;
        Ok(pid)
    }

    /// The pid in node `id`'s postmaster.pid, if PostgreSQL runs.
    pub fn postmaster_pid(&self, id: NodeId) -> Option<i32> {
        postmaster_pid(&self.node(id).pg_data)
    }

    pub fn read_log(&self, id: NodeId) -> String {
        std::fs::read_to_string(&self.node(id).log).unwrap_or_default()
    }

    /// The URL of `path` on node `id`'s API, with the cluster's scheme.
    pub fn api_url(&self, id: NodeId, path: &str) -> String {
        format!("{}://{}{path}", self.scheme(), self.node(id).api_addr)
    }

    pub async fn get<T: DeserializeOwned>(&self, id: NodeId, path: &str) -> anyhow::Result<T> {
        let response = self.http.get(self.api_url(id, path)).send().await?;
        decode(response).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        id: NodeId,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let response = self
            .http
            .post(self.api_url(id, path))
            .bearer_auth(API_TOKEN)
            .json(body)
            .send()
            .await?;
        decode(response).await
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub async fn view(&self, id: NodeId) -> anyhow::Result<ClusterView> {
        self.get(id, "/cluster").await
    }

    /// Proposes `event` through node `id` (which forwards it to the leader).
    pub async fn propose(&self, id: NodeId, event: &Event) -> anyhow::Result<ProposeAnswer> {
        self.post(id, "/events", event).await
    }

    pub async fn add_member(
        &self,
        via: NodeId,
        id: NodeId,
        voter: bool,
    ) -> anyhow::Result<MembershipAnswer> {
        let node = self.node(id);
        let body = AddMember {
            node_id: id,
            raft_addr: node.raft_addr.clone(),
            api_addr: node.api_addr.clone(),
            voter,
        };
        self.post(via, "/members", &body).await
    }

    pub async fn remove_member(&self, via: NodeId, id: NodeId) -> anyhow::Result<MembershipAnswer> {
        let response = self
            .http
            .delete(self.api_url(via, &format!("/members/{id}")))
            .bearer_auth(API_TOKEN)
            .send()
            .await?;
        decode(response).await
    }

    pub async fn wait_api(&self, id: NodeId, timeout: Duration) -> anyhow::Result<()> {
        wait::until(&format!("node {id}'s API"), timeout, || async {
            self.view(id).await.map(|_| ()).map_err(|e| e.to_string())
        })
        .await
    }

    /// Waits until every node in `ids` names the same leader, which is one of them; returns it.
    pub async fn wait_for_leader(
        &self,
        ids: &[NodeId],
        timeout: Duration,
    ) -> anyhow::Result<NodeId> {
        wait::until("an agreed Raft leader", timeout, || async {
            let mut leaders = Vec::new();
            for id in ids {
                let view = self
                    .view(*id)
                    .await
                    .map_err(|e| format!("node {id}: {e}"))?;
                leaders.push(view.raft.leader);
            }
            match leaders[0] {
                Some(leader)
                    if ids.contains(&leader) && leaders.iter().all(|l| *l == Some(leader)) =>
                {
                    Ok(leader)
                }
                _ => Err(format!("leaders seen: {leaders:?}")),
            }
        })
        .await
    }

    /// Waits until every node in `ids` has applied at least `index`, and all their cluster
    /// states are equal; returns the views.
    pub async fn wait_converged(
        &self,
        ids: &[NodeId],
        index: u64,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ClusterView>> {
        wait::until(
            &format!("nodes {ids:?} to apply index {index} and agree"),
            timeout,
            || async {
                let mut views = Vec::new();
                for id in ids {
                    let view = self
                        .view(*id)
                        .await
                        .map_err(|e| format!("node {id}: {e}"))?;
                    let applied = view.raft.last_applied_index.unwrap_or(0);
                    if applied < index {
                        return Err(format!("node {id} has applied {applied}"));
                    }
                    views.push(view);
                }
                let applied: Vec<_> = views.iter().map(|v| v.raft.last_applied_index).collect();
                if applied.iter().any(|a| *a != applied[0]) {
                    return Err(format!("applied indexes differ: {applied:?}"));
                }
                if views.iter().any(|v| v.state != views[0].state) {
                    return Err("states differ at the same applied index".into());
                }
                Ok(views)
            },
        )
        .await
    }
}

async fn decode<T: DeserializeOwned>(response: reqwest::Response) -> anyhow::Result<T> {
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("decoding {body}"))
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            stop_postgres_of(&node.pg_data);
            if panicking {
                eprintln!("{}", node.log_tails(40));
            }
        }
    }
}

/// Stops the PostgreSQL of `data`, if it runs: our agents started it; it outlives them by design.
pub fn stop_postgres_of(data: &Path) {
    if postmaster_pid(data).is_some() {
        let _ = pg_command("pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(data)
            .output();
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// The pid of the live postmaster of `data`, from its postmaster.pid: a process working in
/// `data`. A crashed one leaves the file, and its pid may be another process's by now, which
/// the lab must not signal.
pub fn postmaster_pid(data: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    (process_alive(pid) && cwd == std::fs::canonicalize(data).ok()?).then_some(pid)
}

/// Whether `pid` is a live process (a zombie is not: `kill(pid, 0)` would say it is).
pub fn process_alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(crate::procfs::after_name(&stat)?.next()? != "Z"))
        .unwrap_or(false)
}

/// A PostgreSQL program from `pg_config --bindir`, run as the `postgres` OS user when root.
pub fn pg_command(program: &str) -> Command {
    let bindir = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into());
    let path = Path::new(&bindir).join(program);
    let mut command = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    };
    command.current_dir("/").stdin(Stdio::null());
    command
}

/// `count` distinct free TCP ports on 127.0.0.1, picked outside the ephemeral range (where the
/// kernel picks client ports) and checked by binding them.
pub fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let mut state = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64;
    let mut ports = Vec::new();
    for _ in 0..10_000 {
        if ports.len() == count {
            return Ok(ports);
        }
        // xorshift: good enough to spread parallel test processes over the range.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = 10_000 + (state % 20_000) as u16;
        if !ports.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    bail!("found only {} free ports of {count}", ports.len())
}

/// `key = value` settings as lines of a TOML section.
fn lines(settings: &[String]) -> String {
    settings.iter().map(|line| format!("{line}\n")).collect()
}
