//! repmgr's verbs: `primary init`, `primary register`, `standby clone`, `standby register`,
//! `node unregister`. Each checks its preconditions first and refuses with the reason; each
//! registration is an event committed through the node's agent.

use anyhow::{bail, Context};
use raftmgr_api::{
    ClusterView, FailoverAnswer, FailoverRequest, ProposeAnswer, SwitchoverAnswer,
    SwitchoverRequest,
};
use raftmgr_raft::{Event, NodeId, NodeRegistration, Outcome, PgRole, RejoinMethod};

use crate::client::Client;
use crate::config::{NodeConfig, PgSettings};
use crate::pg::probe;
use crate::pg::{slot_name, Pg, Upstream};

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn postgres(node: &NodeConfig) -> anyhow::Result<(&PgSettings, Pg)> {
    let settings = node
        .postgres
        .as_ref()
        .context("this node's configuration has no [postgres] section")?;
    Ok((settings, Pg::new(settings)?))
}

fn refuse_if_registered(view: &ClusterView, node: &NodeConfig) -> anyhow::Result<()> {
    let id = node.file.node_id;
    if let Some(existing) = view.state.nodes.get(&id) {
        bail!(
            "node {id} is already registered (as {:?}); unregister it first",
            existing.registration.name
        );
    }
    if let Some(other) = view.state.node_by_name(&node.file.name) {
        bail!(
            "the name {:?} is already registered by node {}",
            node.file.name,
            other.registration.node_id
        );
    }
    Ok(())
}

/// Finds a registered node by name or id.
fn find_node<'a>(view: &'a ClusterView, name_or_id: &str) -> anyhow::Result<&'a NodeRegistration> {
    let state = &view.state;
    let by_id = name_or_id
        .parse::<NodeId>()
        .ok()
        .and_then(|id| state.nodes.get(&id));
    by_id
        .or_else(|| state.node_by_name(name_or_id))
        .map(|n| &n.registration)
        .with_context(|| format!("no registered node is called {name_or_id:?}"))
}

async fn propose(client: &Client, event: &Event) -> anyhow::Result<u64> {
    let answer: ProposeAnswer = client.post("/events", event).await?;
    match answer.outcome {
        Outcome::Applied => Ok(answer.event_index),
        Outcome::NoOp { reason } => bail!("refused by the cluster: {reason}"),
    }
}

async fn register(
    client: &Client,
    node: &NodeConfig,
    settings: &PgSettings,
    role: PgRole,
    upstream: Option<NodeId>,
) -> anyhow::Result<u64> {
    let section = &settings.section;
    let event = Event::NodeRegistered(NodeRegistration {
        node_id: node.file.node_id,
        name: node.file.name.clone(),
        role,
        upstream,
        api_addr: node.api_advertise(),
        pg_conninfo: settings.conninfo.clone(),
        priority: section.priority,
        nofailover: section.nofailover,
        nosync: section.nosync,
    });
    propose(client, &event).await
}

/// `raftmgr primary init`: a new primary, configured for replication, started and registered.
pub async fn primary_init(node: &NodeConfig) -> anyhow::Result<()> {
    let (settings, pg) = postgres(node)?;
    let client = Client::for_node(node)?;
    let view = client.cluster_consistent().await?;
    refuse_if_registered(&view, node)?;
    if let Some(primary) = view.state.primary.and_then(|id| view.state.nodes.get(&id)) {
        bail!(
            "{} is already the primary; clone a standby from it instead",
            primary.registration.name
        );
    }
    pg.require_empty_data_dir()?;

    println!("initializing {} ...", pg.data_dir().display());
    run_blocking({
        let pg = pg.clone();
        let name = node.file.name.clone();
        move || {
            pg.prepare_dirs()?;
            pg.initdb()?;
            pg.write_config(&name, None)?;
            pg.start()
        }
    })
    .await?;
    let local = probe::connect(&pg.local_conninfo(), CONNECT_TIMEOUT).await?;
    ensure_replication_role(&local, settings).await?;
    let index = register(&client, node, settings, PgRole::Primary, None).await?;
    println!(
        "{} is the primary (registered as event {index})",
        node.file.name
    );
    Ok(())
}

/// `raftmgr primary register`: registers a running primary.
pub async fn primary_register(node: &NodeConfig) -> anyhow::Result<()> {
    let (settings, pg) = postgres(node)?;
    let client = Client::for_node(node)?;
    let view = client.cluster_consistent().await?;
    refuse_if_registered(&view, node)?;
    let local = probe::connect(&pg.local_conninfo(), CONNECT_TIMEOUT)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the local PostgreSQL ({})",
                pg.local_conninfo()
            )
        })?;
    let status = probe::status(&local, false, CONNECT_TIMEOUT).await?;
    if status.in_recovery {
        bail!("the local PostgreSQL is in recovery (a standby); use `standby register`");
    }
    ensure_replication_role(&local, settings).await?;
    let index = register(&client, node, settings, PgRole::Primary, None).await?;
    println!(
        "{} registered as the primary (event {index})",
        node.file.name
    );
    Ok(())
}

/// `raftmgr standby clone --from NODE`: a base backup of NODE, configured to stream from it.
pub async fn standby_clone(node: &NodeConfig, from: &str) -> anyhow::Result<()> {
    let (_, pg) = postgres(node)?;
    let client = Client::for_node(node)?;
    let view = client.cluster_consistent().await?;
    let upstream = find_node(&view, from)?.clone();
    if upstream.node_id == node.file.node_id {
        bail!("a node cannot be cloned from itself");
    }
    pg.require_empty_data_dir()?;

    let conninfo = pg.peer_conninfo(&upstream.pg_conninfo, "postgres");
    let remote = probe::connect(&conninfo, CONNECT_TIMEOUT)
        .await
        .with_context(|| {
            format!(
                "upstream {} ({}) is unreachable",
                upstream.name, upstream.pg_conninfo
            )
        })?;
    let version: String = remote
        .query_one("SHOW server_version_num", &[])
        .await?
        .get(0);
    let upstream_major = version.parse::<u32>().context("server_version_num")? / 10_000;
    let local_major = pg.binaries_major_version()?;
    if upstream_major != local_major {
        bail!(
            "{} runs PostgreSQL {upstream_major}, but {} holds PostgreSQL {local_major}",
            upstream.name,
            pg.settings.bin_dir.display()
        );
    }
    let slot = slot_name(&node.file.name);
    let slot_exists = !remote
        .query(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_empty();

    println!(
        "cloning {} into {} ...",
        upstream.name,
        pg.data_dir().display()
    );
    let started = std::time::Instant::now();
    run_blocking({
        let pg = pg.clone();
        let name = node.file.name.clone();
        let upstream_conninfo = upstream.pg_conninfo.clone();
        let upstream_id = upstream.node_id;
        move || {
            pg.prepare_dirs()?;
            pg.basebackup(&upstream_conninfo, &slot, !slot_exists)?;
            let upstream = Upstream {
                node_id: upstream_id,
                conninfo: &upstream_conninfo,
            };
            pg.write_config(&name, Some(upstream))?;
            pg.write_standby_signal()
        }
    })
    .await?;
    println!(
        "cloned in {:.1} s; now run `raftmgr standby register` (the agent then starts it)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `raftmgr standby register`: registers this node as a standby of `upstream` (default: the
/// primary). The agent starts it as a standby.
pub async fn standby_register(node: &NodeConfig, upstream: Option<&str>) -> anyhow::Result<()> {
    let (settings, pg) = postgres(node)?;
    let client = Client::for_node(node)?;
    let view = client.cluster_consistent().await?;
    refuse_if_registered(&view, node)?;
    if !pg.is_initialized() {
        bail!(
            "{} holds no PostgreSQL data; run `raftmgr standby clone` first",
            pg.data_dir().display()
        );
    }
    if !pg.has_standby_signal() {
        bail!(
            "{} has no standby.signal; it is not set up as a standby",
            pg.data_dir().display()
        );
    }
    let upstream = match upstream {
        Some(name) => Some(find_node(&view, name)?.node_id),
        None => view.state.primary,
    };
    let index = register(&client, node, settings, PgRole::Standby, upstream).await?;
    println!("{} registered as a standby (event {index})", node.file.name);
    Ok(())
}

/// `raftmgr node unregister [--node NAME]`.
pub async fn node_unregister(node: &NodeConfig, which: Option<&str>) -> anyhow::Result<()> {
    let client = Client::for_node(node)?;
    let view = client.cluster_consistent().await?;
    let target = match which {
        Some(name) => find_node(&view, name)?.clone(),
        None => view
            .state
            .nodes
            .get(&node.file.node_id)
            .map(|n| n.registration.clone())
            .with_context(|| format!("node {} is not registered", node.file.name))?,
    };
    let event = Event::NodeUnregistered {
        node_id: target.node_id,
        reason: "raftmgr node unregister".into(),
    };
    let index = propose(&client, &event).await?;
    println!("{} unregistered (event {index})", target.name);
    Ok(())
}

/// Creates the replication role if it is missing, with what pg_rewind needs later.
async fn ensure_replication_role(
    client: &tokio_postgres::Client,
    settings: &PgSettings,
) -> anyhow::Result<()> {
    let user = &settings.section.replication_user;
    let exists = !client
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[user])
        .await?
        .is_empty();
    let password = settings.replication_password.replace('\'', "''");
    let verb = if exists { "ALTER" } else { "CREATE" };
    client
        .batch_execute(&format!(
            "{verb} ROLE \"{user}\" WITH LOGIN REPLICATION PASSWORD '{password}';
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO \"{user}\";
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO \"{user}\";
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO \"{user}\";
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO \"{user}\";
             GRANT pg_checkpoint TO \"{user}\";"
        ))
        .await
        .with_context(|| format!("creating the replication role {user}"))?;
    Ok(())
}

async fn run_blocking(
    f: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a blocking task panicked")?
}

/// How long `switchover` waits for the new primary.
const SWITCHOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `raftmgr switchover [--to NODE]`: requests it, then (with `wait`) waits for the new primary.
pub async fn switchover(
    client: &Client,
    candidate: Option<String>,
    wait: bool,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let request = SwitchoverRequest {
        leader: None,
        candidate,
    };
    let answer: SwitchoverAnswer = client.post("/switchover", &request).await?;
    println!(
        "switchover from {} to {} requested (event {})",
        answer.from,
        answer.candidate.as_deref().unwrap_or("the best standby"),
        answer.event_index
    );
    if !wait {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + SWITCHOVER_TIMEOUT;
    loop {
        let view = client.cluster().await?;
        let state = &view.state;
        if state.generation > answer.generation && state.primary_ready {
            let name = state
                .primary
                .and_then(|p| state.nodes.get(&p))
                .map_or("?".to_string(), |n| n.registration.name.clone());
            println!(
                "{name} is the primary (generation {}) after {:.2} s",
                state.generation,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("no new primary within {SWITCHOVER_TIMEOUT:?}; see `raftmgr cluster events`");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `raftmgr failover --to NODE`: requests a manual failover, then waits for the new primary.
/// Fails when the request lapses (the primary renewed its lease: it is alive).
pub async fn failover(client: &Client, candidate: String, json: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let request = FailoverRequest {
        leader: None,
        candidate: Some(candidate),
    };
    let answer: FailoverAnswer = client.post("/failover", &request).await?;
    if !json {
        println!(
            "failover from {} to {} requested (event {})",
            answer.from, answer.candidate, answer.event_index
        );
    }
    let deadline = std::time::Instant::now() + SWITCHOVER_TIMEOUT;
    loop {
        let view = client.cluster().await?;
        let state = &view.state;
        if state.generation > answer.generation && state.primary_ready {
            let name = state
                .primary
                .and_then(|p| state.nodes.get(&p))
                .map_or("?".to_string(), |n| n.registration.name.clone());
            let seconds = started.elapsed().as_secs_f64();
            if json {
                let outcome = serde_json::json!({
                    "from": answer.from,
                    "candidate": answer.candidate,
                    "requested_at_event_index": answer.event_index,
                    "primary": name,
                    "generation": state.generation,
                    "seconds": seconds,
                });
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                println!(
                    "{name} is the primary (generation {}) after {seconds:.2} s",
                    state.generation
                );
            }
            return Ok(());
        }
        // Judged only once this member has applied the request (it asked the leader to).
        let lapsed = state.generation == answer.generation
            && state.last_event_index >= answer.event_index
            && state
                .pending_failover()
                .is_none_or(|f| f.event_index != answer.event_index);
        if lapsed {
            bail!(
                "the failover request lapsed: the primary {} renewed its lease, so it is alive; \
                 use `raftmgr switchover` (see `raftmgr cluster events`)",
                answer.from
            );
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "no new primary within {SWITCHOVER_TIMEOUT:?}; the request is still pending (the \
                 old primary's lease may live, or {} is not eligible): see `raftmgr cluster \
                 events` and the leader's log",
                answer.candidate
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `raftmgr node restart`: this node's PostgreSQL stopped cleanly and started again; returns
/// once it runs.
pub async fn node_restart(node: &NodeConfig) -> anyhow::Result<()> {
    let client = Client::for_node(node)?;
    let started = std::time::Instant::now();
    let _: serde_json::Value = client.post("/restart", &serde_json::json!({})).await?;
    println!(
        "{}: PostgreSQL restarted in {:.1} s",
        node.file.name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `raftmgr node rejoin`: asks this node's agent to rewind its PostgreSQL from the current
/// primary and start it as a standby, then waits for the `RejoinCompleted` event.
pub async fn node_rejoin(node: &NodeConfig) -> anyhow::Result<()> {
    rejoin_by(node, "/rejoin", "rejoin").await
}

/// `raftmgr node reinitialize`: asks this node's agent to clone it afresh from the primary,
/// then waits for the `RejoinCompleted` event.
pub async fn node_reinitialize(node: &NodeConfig) -> anyhow::Result<()> {
    rejoin_by(node, "/reinitialize", "reinitialize").await
}

async fn rejoin_by(node: &NodeConfig, path: &str, what: &str) -> anyhow::Result<()> {
    let client = Client::for_node(node)?;
    let before = client.cluster_consistent().await?.state.last_event_index;
    let _: serde_json::Value = client.post(path, &serde_json::json!({})).await?;
    println!("{}: {what} requested", node.file.name);
    let deadline = std::time::Instant::now() + SWITCHOVER_TIMEOUT;
    loop {
        let view = client.cluster().await?;
        let done = view.state.recent.iter().rev().find_map(|e| match &e.event {
            Event::RejoinCompleted {
                node_id,
                duration_ms,
                method,
                ..
            } if *node_id == node.file.node_id && e.event_index > before => {
                Some((*duration_ms, *method))
            }
            _ => None,
        });
        if let Some((ms, method)) = done {
            println!(
                "{} rejoined as a standby ({} and start took {ms} ms)",
                node.file.name,
                match method {
                    RejoinMethod::Reclone => "a fresh clone",
                    RejoinMethod::Rewind => "pg_rewind",
                    RejoinMethod::Follow => "repointing",
                }
            );
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("no RejoinCompleted within {SWITCHOVER_TIMEOUT:?}; see the agent's log and `raftmgr cluster events`");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `raftmgr node status`: fails (exit code 1) when this node's PostgreSQL does not run.
pub async fn node_status(node: &NodeConfig, json: bool) -> anyhow::Result<()> {
    let client = Client::for_node(node)?;
    let (health, running): (raftmgr_api::CheckAnswer, bool) = client.get_check("/health").await?;
    let view = client.cluster().await?;
    let raft_role = view
        .nodes
        .iter()
        .find(|n| n.summary.id == node.file.node_id)
        .map_or("none".to_string(), |n| n.raft_role.clone());
    if json {
        let status = serde_json::json!({
            "name": node.file.name,
            "role": health.role,
            "running": health.running,
            "timeline": health.timeline,
            "lease_held": health.lease_held,
            "lag_bytes": health.lag_bytes,
            "generation": health.generation,
            "raft_role": raft_role,
            "raft_leader": view.raft.leader,
            "paused": view.state.paused,
        });
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        let lag = health
            .lag_bytes
            .map_or(String::new(), |b| format!(", lag {b} B"));
        let lease = if health.lease_held {
            ", holds the lease"
        } else {
            ""
        };
        let timeline = health.timeline.map_or("-".to_string(), |t| t.to_string());
        println!(
            "{}: {} (PostgreSQL {}, timeline {timeline}{lag}{lease}); Raft {raft_role}, leader {}; generation {}{}",
            node.file.name,
            health.role,
            if health.running { "running" } else { "not running" },
            view.raft.leader.map_or("none".to_string(), |l| format!("node {l}")),
            health.generation,
            if view.state.paused { "; PAUSED" } else { "" },
        );
    }
    if !running {
        bail!("{}'s PostgreSQL is not running", node.file.name);
    }
    Ok(())
}
