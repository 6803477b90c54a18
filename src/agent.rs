//! The agent daemon: opens the store, starts Raft, serves the Raft RPC and the HTTP API (over TLS
//! with a `[tls]` section), and stops cleanly when `shutdown` resolves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::SnapshotPolicy;
use raftmgr_api::pace::Pace;
use raftmgr_raft::forward::{Leader, Proposer};
use raftmgr_raft::network::RpcClient;
use raftmgr_raft::{Member, NodeId, Raft};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::tls::TlsListener;

/// How long the HTTP servers may take to finish in-flight requests on shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// snapshot chunks stay well under the RPC server's body limit.
const SNAPSHOT_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

pub fn raft_config(config: &NodeConfig) -> anyhow::Result<openraft::Config> {
    let r = &config.file.raft;
    let raft = openraft::Config {
        cluster_name: "raftmgr".into(),
        heartbeat_interval: r.heartbeat_interval_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        // A snapshot of the cluster state is small; give it time to cross a busy host.
        install_snapshot_timeout: r.election_timeout_max_ms.max(1000),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: r.logs_to_keep_after_snapshot,
        purge_batch_size: 64,
        max_payload_entries: raftmgr_raft::forward::PAYLOAD_ENTRIES_MAX,
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        ..Default::default()
    };
    raft.validate().context("invalid Raft timing settings")
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let node_id = config.file.node_id;
    let store_dir = config.file.data_dir.join("raft");
    std::fs::create_dir_all(&store_dir)
        .with_context(|| format!("creating the Raft store folder {}", store_dir.display()))?;
    let store = raftmgr_storage::open(&store_dir)?;
    let at_open = store.view.at_open();
    tracing::info!(
        last_log_index = ?at_open.last_log_index,
        snapshot_index = ?at_open.snapshot_index,
        "opened the Raft store at {}",
        store_dir.display()
    );

    let raft_listener = bind(config.file.raft.listen, "raft.listen").await?;
    let api_listener = bind(config.file.api.listen, "api.listen").await?;

    let rpc = RpcClient::new(
        config.cluster_secret.as_str(),
        config.tls.as_ref().map(|tls| tls.client.clone()),
    )
    .context("building the Raft RPC client")?;
    let raft = Raft::new(
        node_id,
        Arc::new(raft_config(&config)?),
        rpc.clone(),
        store.log,
        store.state_machine,
    )
    .await
    .context("starting Raft")?;
    let leader = Leader::new(raft.clone());
    let proposer = Proposer::new(leader.clone(), rpc, config.proposal_timeout());

    let mut initial_members: std::collections::BTreeMap<NodeId, Member> = config
        .file
        .peers
        .iter()
        .map(|p| {
            (
                p.node_id,
                Member {
                    raft_addr: p.raft_addr.clone(),
                    api_addr: p.api_addr.clone(),
                },
            )
        })
        .collect();
    initial_members.insert(node_id, config.member());

    let (stop_tx, stop_rx) = watch::channel(false);
    let (requests, requests_rx) =
        tokio::sync::mpsc::channel::<raftmgr_api::LocalRequest>(raftmgr_api::LOCAL_REQUESTS_MAX);
    let local = config
        .postgres
        .as_ref()
        .map(|_| Arc::new(std::sync::RwLock::new(raftmgr_api::LocalPostgres::default())));
    if let Some(settings) = &config.postgres {
        let supervisor = crate::supervisor::Supervisor {
            node_id,
            node_name: config.file.name.clone(),
            pg: crate::pg::Pg::new(settings)?,
            raft: raft.clone(),
            proposer: proposer.clone(),
            store: store.view.clone(),
            timing: config.file.failover.clone(),
            agent_data_dir: config.file.data_dir.clone(),
            requests: Arc::new(std::sync::Mutex::new(requests_rx)),
            local: local.clone().expect("set with [postgres]"),
        };
        tokio::spawn(supervisor.run(stop_rx.clone()));
    }

    let promotions = raftmgr_api::PromotionClock::new(&store.view.cluster_state());
    tokio::spawn(raftmgr_api::track_promotions(
        promotions.clone(),
        store.view.clone(),
        raft.metrics(),
        stop_rx.clone(),
    ));
    let api = raftmgr_api::Api {
        node_id,
        node_name: config.file.name.clone(),
        raft: raft.clone(),
        store: store.view,
        proposer,
        api_token: config.api_token.as_str().into(),
        initial_members,
        requests: config.postgres.as_ref().map(|_| requests),
        decide_config: crate::failover::decide_config(&config.file.failover),
        promotions: promotions.clone(),
        local,
        config: Arc::new(config.redacted_json()),
        shutdown: stop_rx.clone(),
    };

    let raft_router = raftmgr_raft::server::router(leader, config.cluster_secret.as_str());
    let api_router = match Pace::per_second(config.file.api.max_requests_per_s) {
        Some(pace) => raftmgr_api::router(api).layer(axum::middleware::from_fn_with_state(
            pace,
            raftmgr_api::pace::paced,
        )),
        None => raftmgr_api::router(api),
    };
    let raft_server = match &config.tls {
        None => tokio::spawn(serve(raft_listener, raft_router, stop_rx.clone())),
        Some(tls) => {
            let raft_listener = TlsListener::new(raft_listener, tls.raft_server.clone(), "raft")?;
            tokio::spawn(serve(raft_listener, raft_router, stop_rx.clone()))
        }
    };
    let api_tls = config.tls.as_ref().map(|tls| tls.api_server.clone());
    let api_server = serve_api(api_listener.into_std()?, api_router, api_tls, stop_rx)?;
    tracing::info!(
        raft = %config.file.raft.listen,
        api = %config.file.api.listen,
        scheme = config.scheme(),
        "agent running"
    );

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let api_server = async { api_server.await.map_err(|_| "its thread died".to_string()) };
    let raft_server = async { raft_server.await.map_err(|e| e.to_string()) };
    let drained = tokio::time::timeout(
        DRAIN_TIMEOUT,
        futures::future::join(api_server, raft_server),
    )
    .await;
    match drained {
        Ok((api, raft)) => {
            for server in [api, raft] {
                match server {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("HTTP server stopped with an error: {e}"),
                    Err(e) => tracing::warn!("HTTP server task failed: {e}"),
                }
            }
        }
        Err(_) => tracing::warn!("the HTTP servers did not drain within {DRAIN_TIMEOUT:?}"),
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!("Raft did not shut down cleanly: {e}");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn bind(addr: std::net::SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{key} = {addr}: cannot listen there"))
}

/// The API answers load balancers' health checks, which may come by the ten thousand a second;
/// they must never slow down a failover. So the API runs on a thread of its own, with its own
/// runtime, at a lower CPU priority (nice +`API_NICE`) than Raft, the supervisor and PostgreSQL.
/// The listener is registered with that runtime, so its connections are driven there too.
fn serve_api(
    listener: std::net::TcpListener,
    router: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<std::io::Result<()>>> {
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the API's runtime")?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            lower_priority(API_NICE);
            let served = runtime.block_on(async move {
                let listener = TcpListener::from_std(listener)?;
                match tls {
                    None => serve(listener, router, stop).await,
                    Some(tls) => serve(TlsListener::new(listener, tls, "api")?, router, stop).await,
                }
            });
            let _ = done_tx.send(served);
        })
        .context("starting the API's thread")?;
    Ok(done)
}

/// How much lower the API thread's CPU priority is than the rest of the agent.
const API_NICE: i32 = 5;

/// Raises the calling thread's nice value by `by` (on Linux nice values are per thread).
fn lower_priority(by: i32) {
    let me = Some(rustix::thread::gettid());
    let lowered = rustix::process::getpriority_process(me)
        .and_then(|nice| rustix::process::setpriority_process(me, nice + by));
    if let Err(e) = lowered {
        tracing::warn!("cannot lower the API thread's priority: {e}");
    }
}

async fn serve<L>(
    listener: L,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await
}
