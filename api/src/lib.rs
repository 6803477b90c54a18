//! The agent's HTTP API (axum): the only crate that speaks HTTP/JSON to operators.
//!
//! Reads are open; every mutating request needs `Authorization: Bearer <api_token>`. Errors are
//! JSON objects `{"error": "..."}` with a 4xx status for requests that cannot be carried out as
//! asked and a 5xx status when the cluster could not answer.

mod follow;
mod history;
pub mod pace;
mod promotions;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use openraft::error::{InitializeError, RaftError};
use raftmgr_raft::decide::{self, CandidateProbe, DecideConfig};
use raftmgr_raft::forward::{self, ForwardError, Proposer, Reply, Request};
use raftmgr_raft::state::RecordedEvent;
use raftmgr_raft::{ClusterState, Event, Member, NodeId, NodeSummary, Outcome, Raft};
use raftmgr_storage::{AtOpen, StoreView};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use follow::Selection;
pub use history::{history, HistoryEntry, HistoryKind};
pub use promotions::{track as track_promotions, PromotionClock, PromotionStats};

/// The status page served at `GET /`: one HTML file with its script, no build step.
const STATUS_PAGE: &str = include_str!("../status.html");

/// The OpenAPI 3 description of every route of [`router`], served at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Everything the API handlers need, cheap to clone.
#[derive(Clone)]
pub struct Api {
    pub node_id: NodeId,
    pub node_name: String,
    pub raft: Raft,
    pub store: StoreView,
    pub proposer: Proposer,
    pub api_token: Arc<str>,
    /// The members `POST /cluster/init` starts the cluster with (this node included).
    pub initial_members: BTreeMap<NodeId, Member>,
    /// Operators' requests for this node's PostgreSQL (`POST /rejoin`, `/restart`,
    /// `/reinitialize`), carried out by the agent's executor at its next step. `None` when the
    /// agent manages no PostgreSQL.
    pub requests: Option<tokio::sync::mpsc::Sender<LocalRequest>>,
    /// The failover settings, for `POST /failover`'s checks of its candidate (the same checks
    /// the leader's `decide` makes).
    pub decide_config: DecideConfig,
    /// Failovers and switchovers as this agent saw them applied, for `GET /metrics`.
    pub promotions: Arc<PromotionClock>,
    /// What the agent last measured of its own PostgreSQL; `None` without `[postgres]`.
    pub local: Option<Arc<std::sync::RwLock<LocalPostgres>>>,
    /// This node's effective configuration for `GET /config`, rendered by the binary with its
    /// secrets already redacted.
    pub config: Arc<serde_json::Value>,
    /// Becomes `true` when the agent shuts down: open event streams end then.
    pub shutdown: watch::Receiver<bool>,
}

/// What an operator asked of this node's PostgreSQL.
#[derive(Debug)]
pub enum LocalRequest {
    /// pg_rewind from the primary, then start as its standby (`POST /rejoin`).
    Rejoin,
    /// A fresh clone from the primary, the old data directory kept aside
    /// (`POST /reinitialize`).
    Reinitialize,
    /// Stop PostgreSQL cleanly and start it again in its role (`POST /restart`); `done` gets
    /// the outcome.
    Restart {
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

/// How many operator requests may wait for the executor; more are refused (409).
pub const LOCAL_REQUESTS_MAX: usize = 4;

/// The agent's latest measurement of its PostgreSQL, for the load-balancer checks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LocalPostgres {
    pub running: bool,
    /// `pg_is_in_recovery()`; `None` when it did not answer.
    pub in_recovery: Option<bool>,
    /// The agent holds a live lease for the current generation.
    pub lease_held: bool,
    pub timeline: Option<u32>,
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route(
            "/cluster",
            get(cluster).layer(Extension(Arc::new(ClusterAnswers::default()))),
        )
        .route("/history", get(history_list))
        .route("/config", get(config))
        .route("/cluster/init", post(init))
        .route("/events", post(propose).get(events))
        .route("/switchover", post(switchover))
        .route("/failover", post(failover))
        .route("/pause", post(pause))
        .route("/rejoin", post(rejoin))
        .route("/restart", post(restart))
        .route("/reinitialize", post(reinitialize))
        .route("/resume", post(resume))
        .route("/members", post(add_member))
        .route("/members/{node_id}", delete(remove_member))
        .route(
            "/liveness",
            get(|| async { Json(serde_json::json!({"alive": true})) }),
        )
        .route("/metrics", get(metrics))
        .route("/primary", get(check_primary))
        .route("/leader", get(check_primary))
        .route("/read-write", get(check_primary))
        .route("/replica", get(check_replica))
        .route("/read-only", get(check_read_only))
        .route("/health", get(check_health))
        .route("/readiness", get(check_readiness))
        .route("/openapi.json", get(openapi))
        .fallback(no_such_path)
        .method_not_allowed_fallback(no_such_method)
        // Shared, not cloned per request: a clone of `Api` per request, and the `/cluster`
        // answers' extension on every route, took a quarter of a check's CPU (30 µs a check,
        // 22 without; BENCHMARKS.md, Dec 1).
        .with_state(Arc::new(api))
}

/// Any path the router does not know: a JSON 404 like every other error.
async fn no_such_path(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such path: {}; see GET /openapi.json", uri.path()),
    )
}

/// A known path with a method it does not serve: a JSON 405 (axum adds the `Allow` header).
async fn no_such_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not answer {method}", uri.path()),
    )
}

/// `GET /cluster`: this member's view of Raft and the applied cluster state.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterView {
    pub node: NodeView,
    /// One row per registered database node, derived from the committed state.
    pub nodes: Vec<NodeRow>,
    pub raft: RaftView,
    pub store: StoreStats,
    pub state: ClusterState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRow {
    #[serde(flatten)]
    pub summary: NodeSummary,
    /// `leader`, `follower`, `learner`, or `none` when the node is not a Raft member.
    pub raft_role: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct RaftView {
    /// `Leader`, `Follower`, `Candidate`, `Learner` or `Shutdown`.
    pub state: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    pub members: BTreeMap<NodeId, Member>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    pub log_entries_on_disk: usize,
    pub snapshots_built: u64,
    pub snapshots_installed: u64,
    /// What this member's own store held when the agent started.
    pub at_open: AtOpen,
}

#[derive(Debug, Default, Deserialize)]
pub struct ClusterQuery {
    /// Read only after this member has applied everything committed before the request.
    #[serde(default)]
    pub consistent: bool,
}

async fn cluster(
    State(api): State<Arc<Api>>,
    Extension(answers): Extension<Arc<ClusterAnswers>>,
    query: Result<Query<ClusterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if query.consistent {
        api.proposer.read_barrier().await?;
    }
    let metrics = api.raft.metrics().borrow().clone();
    let (voters, members) = forward::members(&api.raft);
    let learners = members
        .keys()
        .filter(|id| !voters.contains(id))
        .copied()
        .collect();
    let stats = api.store.stats();
    let key = ClusterKey {
        raft: RaftView {
            state: format!("{:?}", metrics.state),
            leader: metrics.current_leader,
            term: metrics.current_term,
            voters,
            learners,
            members,
            last_log_index: metrics.last_log_index,
            last_applied_index: metrics.last_applied.map(|id| id.index),
            snapshot_index: metrics.snapshot.map(|id| id.index),
            purged_index: metrics.purged.map(|id| id.index),
        },
        store: StoreStats {
            log_entries_on_disk: api.store.log_entries_on_disk(),
            snapshots_built: stats.snapshots_built.load(Ordering::Relaxed),
            snapshots_installed: stats.snapshots_installed.load(Ordering::Relaxed),
            at_open: api.store.at_open(),
        },
        state_applied_index: api.store.last_applied_index(),
    };
    let body = answers.get(key, |key| {
        let (state_applied_index, state) = api.store.applied_state();
        let ClusterKey { raft, store, .. } = key;
        let nodes = state
            .node_summaries()
            .into_iter()
            .map(|summary| NodeRow {
                raft_role: raft_role(&raft, summary.id).into(),
                summary,
            })
            .collect();
        let view = ClusterView {
            node: NodeView {
                id: api.node_id,
                name: api.node_name.clone(),
            },
            nodes,
            raft,
            store,
            state,
        };
        let body = serde_json::to_vec(&view).expect("the view serializes to JSON");
        let ClusterView { raft, store, .. } = view;
        let key = ClusterKey {
            raft,
            store,
            state_applied_index,
        };
        (key, Bytes::from(body))
    });
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// A member's role in Raft, as `GET /cluster` shows it for each node.
fn raft_role(raft: &RaftView, id: NodeId) -> &'static str {
    if raft.leader == Some(id) {
        "leader"
    } else if raft.voters.contains(&id) {
        "follower"
    } else if raft.members.contains_key(&id) {
        "learner"
    } else {
        "none"
    }
}

/// `GET /cluster`'s answer, serialized once for each change of what it shows. A flood of
/// requests (a status page or a monitor polling too often, a benchmark) then neither copies and
/// serializes the applied state for each request, nor holds its lock meanwhile.
#[derive(Default)]
struct ClusterAnswers {
    last: std::sync::Mutex<Option<(ClusterKey, Bytes)>>,
}

/// Everything `GET /cluster` shows but the node's own name: the state is known by the index of
/// the last log entry applied to it.
#[derive(PartialEq)]
struct ClusterKey {
    raft: RaftView,
    store: StoreStats,
    state_applied_index: Option<u64>,
}

impl ClusterAnswers {
    /// The answer for `key`: the last one when it was built for the same key, else a new one
    /// from `build`, which returns it with the key it was actually built for (the state may
    /// have moved on since `key` was read).
    fn get(&self, key: ClusterKey, build: impl FnOnce(ClusterKey) -> (ClusterKey, Bytes)) -> Bytes {
        if let Some((last_key, body)) = &*self.last() {
            if *last_key == key {
                return body.clone();
            }
        }
        let (built_for, body) = build(key);
        *self.last() = Some((built_for, body.clone()));
        body
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Option<(ClusterKey, Bytes)>> {
        self.last.lock().expect("never poisoned: no panics inside")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// Only events about this node (name or id).
    pub node: Option<String>,
    /// Only events of this type (`NodeRegistered`, `HealthObserved`, ...).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// `1`: keep the answer open and stream each newly applied event (Server-Sent Events).
    pub follow: Option<String>,
}

/// `GET /events[?node=NAME][&type=TYPE][&follow=1]`: the recent events the state keeps, oldest
/// first, optionally filtered; with `follow`, an SSE stream of them and then of each new one.
async fn events(
    State(api): State<Arc<Api>>,
    filter: Result<Query<EventFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(filter) =
        filter.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let follow = flag("follow", filter.follow.as_deref())?;
    let selection = api.store.with(|state| select(state, &filter))?;
    if follow {
        let stream = follow::stream(&api, selection)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        return Ok(stream.into_response());
    }
    let events: Vec<RecordedEvent> = api.store.with(|state| {
        state
            .recent
            .iter()
            .filter(|e| selection.matches(e))
            .cloned()
            .collect()
    });
    Ok(Json(events).into_response())
}

/// Resolves an event filter's node (name or id) and checks its type.
fn select(state: &ClusterState, filter: &EventFilter) -> Result<Selection, ApiError> {
    let node = match &filter.node {
        None => None,
        Some(name) => Some(
            name.parse::<NodeId>()
                .ok()
                .filter(|id| state.nodes.contains_key(id))
                .or_else(|| state.node_by_name(name).map(|n| n.registration.node_id))
                .or_else(|| name.parse::<NodeId>().ok())
                .ok_or_else(|| {
                    ApiError::new(StatusCode::NOT_FOUND, format!("no node is called {name:?}"))
                })?,
        ),
    };
    if let Some(kind) = &filter.kind {
        if !raftmgr_raft::event::EVENT_KINDS.contains(&kind.as_str()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "type={kind:?} is not an event type; one of {}",
                    raftmgr_raft::event::EVENT_KINDS.join(", ")
                ),
            ));
        }
    }
    Ok(Selection {
        node,
        kind: filter.kind.clone(),
    })
}

/// A yes/no query parameter: `1`, `true` or empty for yes; `0` or `false` for no.
fn flag(name: &str, value: Option<&str>) -> Result<bool, ApiError> {
    match value {
        None | Some("0" | "false") => Ok(false),
        Some("" | "1" | "true") => Ok(true),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{name}={other:?}: say 1 or 0 (true or false)"),
        )),
    }
}

/// `GET /history`: the cluster's generations — the first primary, then each promotion with
/// its kind, reason, timeline and LSN — oldest first, as far as the committed state keeps them.
async fn history_list(State(api): State<Arc<Api>>) -> Json<Vec<HistoryEntry>> {
    Json(api.store.with(history::history))
}

/// `GET /config`: this node's effective configuration, secrets redacted.
async fn config(State(api): State<Arc<Api>>) -> Json<serde_json::Value> {
    Json(api.config.as_ref().clone())
}

/// `GET /`: the status page; its script reads `/cluster`, `/history` and `/events`.
async fn status_page() -> Html<&'static str> {
    Html(STATUS_PAGE)
}

/// `GET /openapi.json`: the API's description.
async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}

/// A JSON error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text())
    }
}

/// An optional JSON body: an empty one means `T::default()`; any other must be JSON (and say
/// so in its `Content-Type`) of the shape of `T`, else a 400 naming the problem.
fn optional_json<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence != "application/json" && !essence.ends_with("+json") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "a body needs Content-Type: application/json (got {content_type:?}); or send none"
            ),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the JSON body does not fit: {e}"),
        )
    })
}

impl From<ForwardError> for ApiError {
    fn from(e: ForwardError) -> Self {
        let status = match &e {
            ForwardError::Refused(_) => StatusCode::CONFLICT,
            ForwardError::NotLeader { .. } | ForwardError::Failed(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        ApiError::new(status, e.to_string())
    }
}

fn authorize(api: &Api, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this request changes the cluster: send Authorization: Bearer <api_token>",
        )),
        Some(token) if !same_bytes(token.as_bytes(), api.api_token.as_bytes()) => {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong API token"))
        }
        Some(_) => Ok(()),
    }
}

fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProposeAnswer {
    /// The Raft log entry that carried the event.
    pub log_index: u64,
    /// The event's own index (as in `GET /events`).
    pub event_index: u64,
    pub outcome: Outcome,
}

/// `POST /events`: append an event to the log (low level: tests, benchmarks, repair).
async fn propose(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Json<Event>, JsonRejection>,
) -> Result<Json<ProposeAnswer>, ApiError> {
    authorize(&api, &headers)?;
    let Json(event) = body?;
    let applied = api.proposer.propose(event).await?;
    Ok(Json(ProposeAnswer {
        log_index: applied.log_index,
        event_index: applied.event_index,
        outcome: applied.outcome,
    }))
}

/// `POST /cluster/init`: start a new cluster with this node and its configured peers.
async fn init(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&api, &headers)?;
    match api.raft.initialize(api.initial_members.clone()).await {
        Ok(()) => Ok(Json(serde_json::json!({
            "initialized": api.initial_members.keys().collect::<Vec<_>>()
        }))),
        Err(RaftError::APIError(InitializeError::NotAllowed(e))) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("this node is already part of a cluster: {e}"),
        )),
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    pub node_id: NodeId,
    pub raft_addr: String,
    pub api_addr: String,
    /// `false` keeps the new member a learner (it replicates but does not vote).
    #[serde(default = "yes")]
    pub voter: bool,
}

fn yes() -> bool {
    true
}

/// `HOST:PORT` as a member's address: a DNS name or IPv4 address (letters, digits, `.`, `-`)
/// or a bracketed IPv6 address, and a port from 1 to 65535 — what openapi.json's pattern says.
pub fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && !port.starts_with('0')
        && port.parse::<u16>().is_ok();
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    port_ok && host_ok
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MembershipAnswer {
    pub log_index: u64,
}

/// `POST /members`: add a member (as a learner until it has caught up, then as a voter).
async fn add_member(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Json<AddMember>, JsonRejection>,
) -> Result<Json<MembershipAnswer>, ApiError> {
    authorize(&api, &headers)?;
    let Json(add) = body?;
    if add.node_id == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "node_id must be positive",
        ));
    }
    for (field, addr) in [("raft_addr", &add.raft_addr), ("api_addr", &add.api_addr)] {
        if !is_host_port(addr) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{field}={addr:?} is not HOST:PORT (a name, an IPv4 address or [IPv6], and a port 1-65535)"),
            ));
        }
    }
    membership_change(
        &api,
        Request::AddMember {
            node_id: add.node_id,
            member: Member {
                raft_addr: add.raft_addr,
                api_addr: add.api_addr,
            },
            voter: add.voter,
        },
    )
    .await
}

/// `DELETE /members/{node_id}`: remove a member.
async fn remove_member(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    node_id: Result<Path<NodeId>, PathRejection>,
) -> Result<Json<MembershipAnswer>, ApiError> {
    authorize(&api, &headers)?;
    let Path(node_id) = node_id?;
    membership_change(&api, Request::RemoveMember { node_id }).await
}

async fn membership_change(
    api: &Api,
    request: Request,
) -> Result<Json<MembershipAnswer>, ApiError> {
    match api.proposer.submit(request).await? {
        Reply::MembershipChanged { log_index } => Ok(Json(MembershipAnswer { log_index })),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected answer {other:?}"),
        )),
    }
}

/// `POST /switchover` (Patroni's field names): `candidate` is the node to promote (default: the
/// best standby), `leader` if given must name the current primary.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    pub leader: Option<String>,
    pub candidate: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SwitchoverAnswer {
    /// The index of the `SwitchoverRequested` event.
    pub event_index: u64,
    /// The generation being switched over from; the new primary's is the next one.
    pub generation: u64,
    pub from: String,
    pub candidate: Option<String>,
}

async fn switchover(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SwitchoverAnswer>, ApiError> {
    authorize(&api, &headers)?;
    let request: SwitchoverRequest = optional_json(&headers, &body?)?;
    api.proposer.read_barrier().await?;
    let state = api.store.cluster_state();
    let refuse = |message: String| ApiError::new(StatusCode::CONFLICT, message);
    let primary = state
        .primary
        .ok_or_else(|| refuse("there is no primary".into()))?;
    let name_of = |id: NodeId| {
        state
            .nodes
            .get(&id)
            .map(|n| n.registration.name.clone())
            .unwrap_or_default()
    };
    if state.primary_resigned || !state.primary_ready {
        return Err(refuse(format!(
            "the primary {} is not running; that is a failover, not a switchover",
            name_of(primary)
        )));
    }
    if let Some(leader) = &request.leader {
        if *leader != name_of(primary) {
            return Err(refuse(format!(
                "{leader} is not the primary; {} is",
                name_of(primary)
            )));
        }
    }
    let summaries = state.node_summaries();
    let streaming = |id: NodeId| {
        summaries
            .iter()
            .any(|s| s.id == id && s.status == "streaming")
    };
    let candidate = match &request.candidate {
        Some(name) => {
            let node = state.node_by_name(name).ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, format!("no node is called {name:?}"))
            })?;
            let id = node.registration.node_id;
            if id == primary {
                return Err(refuse(format!("{name} is already the primary")));
            }
            if node.registration.nofailover {
                return Err(refuse(format!("{name} is tagged nofailover")));
            }
            if !streaming(id) {
                return Err(refuse(format!(
                    "{name} is not streaming from the primary; it cannot catch up"
                )));
            }
            Some(id)
        }
        None => {
            let any = state.nodes.values().any(|n| {
                n.registration.node_id != primary
                    && !n.registration.nofailover
                    && streaming(n.registration.node_id)
            });
            if !any {
                return Err(refuse(
                    "no standby is streaming and eligible; refusing to stop the primary".into(),
                ));
            }
            None
        }
    };
    let event = Event::SwitchoverRequested {
        primary,
        generation: state.generation,
        candidate,
    };
    let applied = api.proposer.propose(event).await?;
    if let Outcome::NoOp { reason } = applied.outcome {
        return Err(refuse(reason));
    }
    Ok(Json(SwitchoverAnswer {
        event_index: applied.event_index,
        generation: state.generation,
        from: name_of(primary),
        candidate: candidate.map(name_of),
    }))
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PauseAnswer {
    pub paused: bool,
    /// The index of the `Paused` or `Resumed` event.
    pub event_index: u64,
}

/// `POST /pause`: maintenance mode, no automatic failover until `POST /resume`.
async fn pause(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PauseAnswer>, ApiError> {
    authorize(&api, &headers)?;
    let request: PauseRequest = optional_json(&headers, &body?)?;
    let reason = request.reason.unwrap_or_else(|| "maintenance".into());
    set_paused(&api, Event::Paused { reason }, true).await
}

/// `POST /resume`: automatic failover again.
async fn resume(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<PauseAnswer>, ApiError> {
    authorize(&api, &headers)?;
    set_paused(&api, Event::Resumed, false).await
}

async fn set_paused(api: &Api, event: Event, paused: bool) -> Result<Json<PauseAnswer>, ApiError> {
    let applied = api.proposer.propose(event).await?;
    // Pausing twice is fine: the answer says how things are. `apply` refuses a pause while a
    // switchover is under way (its promotion would wait, the old primary already stopped).
    if let Outcome::NoOp { reason } = applied.outcome {
        if api.store.cluster_state().paused != paused {
            return Err(ApiError::new(StatusCode::CONFLICT, reason));
        }
    }
    Ok(Json(PauseAnswer {
        paused,
        event_index: applied.event_index,
    }))
}

/// The request channel of this node's executor and the committed state (read linearizably),
/// once this node is known to manage a registered PostgreSQL.
async fn this_node(
    api: &Api,
) -> Result<(tokio::sync::mpsc::Sender<LocalRequest>, ClusterState), ApiError> {
    let Some(requests) = &api.requests else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this agent manages no PostgreSQL",
        ));
    };
    api.proposer.read_barrier().await?;
    let state = api.store.cluster_state();
    if !state.nodes.contains_key(&api.node_id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{} is not registered", api.node_name),
        ));
    }
    Ok((requests.clone(), state))
}

/// Hands `request` to the executor, or refuses when too many wait already.
fn hand_over(
    requests: &tokio::sync::mpsc::Sender<LocalRequest>,
    request: LocalRequest,
) -> Result<(), ApiError> {
    requests.try_send(request).map_err(|_| {
        ApiError::new(
            StatusCode::CONFLICT,
            "other requests for this node are still waiting; try again when they are done",
        )
    })
}

/// Refuses a rejoin or reinitialize of the primary, or when no primary runs to copy from.
fn standby_with_a_primary(api: &Api, state: &ClusterState, verb: &str) -> Result<(), ApiError> {
    if state.primary == Some(api.node_id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{} is the primary; it does not {verb}", api.node_name),
        ));
    }
    if !state.primary_ready || state.primary_resigned {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("there is no running primary to {verb} from"),
        ));
    }
    Ok(())
}

/// `POST /rejoin` (this node): rewind this node's PostgreSQL from the current primary and start
/// it as its standby, as `raftmgr node rejoin` does. Answered at once (202); the rejoin is
/// reported as RejoinPlanned and RejoinCompleted events.
async fn rejoin(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    authorize(&api, &headers)?;
    let (requests, state) = this_node(&api).await?;
    standby_with_a_primary(&api, &state, "rejoin")?;
    hand_over(&requests, LocalRequest::Rejoin)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "rejoin": api.node_name, "generation": state.generation })),
    ))
}

/// `POST /reinitialize` (this node, Patroni's name): clone this standby afresh from the primary
/// (its data directory is renamed aside, not deleted) and start it as its standby. Refused on
/// the primary. Answered at once (202); reported as RejoinPlanned and RejoinCompleted with the
/// method `reclone`.
async fn reinitialize(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    authorize(&api, &headers)?;
    let (requests, state) = this_node(&api).await?;
    standby_with_a_primary(&api, &state, "reinitialize")?;
    hand_over(&requests, LocalRequest::Reinitialize)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "reinitialize": api.node_name, "generation": state.generation })),
    ))
}

/// How long `POST /restart` waits for PostgreSQL to be stopped and started again.
const RESTART_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// `POST /restart` (this node, Patroni's meaning): stop PostgreSQL cleanly and start it again
/// in its role — the primary in place, as Patroni does: its agent keeps renewing the lease
/// meanwhile and does not take a stop it made itself for a crash, so no failover follows (write
/// unavailability lasts as long as the restart). Answered when PostgreSQL runs again.
async fn restart(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&api, &headers)?;
    let (requests, state) = this_node(&api).await?;
    if state.primary == Some(api.node_id) && (!state.primary_ready || state.primary_resigned) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{} is the primary of generation {} but not a running one (being promoted, or \
                 resigned); not restarting it now",
                api.node_name, state.generation
            ),
        ));
    }
    let (done, outcome) = tokio::sync::oneshot::channel();
    hand_over(&requests, LocalRequest::Restart { done })?;
    match tokio::time::timeout(RESTART_TIMEOUT, outcome).await {
        Ok(Ok(Ok(()))) => Ok(Json(serde_json::json!({ "restarted": api.node_name }))),
        Ok(Ok(Err(e))) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("restart failed: {e}"),
        )),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("PostgreSQL did not run again within {RESTART_TIMEOUT:?}; see the agent's log"),
        )),
    }
}

/// `POST /failover` (Patroni's field names): `candidate` is the node to promote (required);
/// `leader`, if given, must name the current primary.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    pub leader: Option<String>,
    pub candidate: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FailoverAnswer {
    /// The index of the `FailoverRequested` event.
    pub event_index: u64,
    /// The generation failed over from; the new primary's is the next one.
    pub generation: u64,
    pub from: String,
    pub candidate: String,
}

/// `POST /failover`: a manual failover to a named standby, for when automatic failover cannot
/// act — the cluster is paused, or the primary is down or resigned. It commits a
/// `FailoverRequested` event; the Raft leader's `decide` carries it out once the old primary's
/// lease is dead (never before), if the candidate is still eligible on its fresh probe.
/// Refused, with nothing changed, when the primary runs (use `/switchover`) or the candidate
/// cannot be promoted (`decide::ineligibility`, judged here from the committed observations).
async fn failover(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Json<FailoverRequest>, JsonRejection>,
) -> Result<Json<FailoverAnswer>, ApiError> {
    authorize(&api, &headers)?;
    let Json(request) = body?;
    let Some(name) = request.candidate else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "say which node to promote: {\"candidate\": \"node2\"}",
        ));
    };
    api.proposer.read_barrier().await?;
    let state = api.store.cluster_state();
    let refuse = |message: String| ApiError::new(StatusCode::CONFLICT, message);
    let primary = state
        .primary
        .ok_or_else(|| refuse("there is no primary to fail over from".into()))?;
    let name_of = |id: NodeId| {
        state
            .nodes
            .get(&id)
            .map(|n| n.registration.name.clone())
            .unwrap_or_default()
    };
    let candidate = state
        .node_by_name(&name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no node is called {name:?}")))?
        .registration
        .node_id;
    if let Some(leader) = &request.leader {
        if *leader != name_of(primary) {
            return Err(refuse(format!(
                "{leader} is not the primary; {} is",
                name_of(primary)
            )));
        }
    }
    if candidate == primary {
        return Err(refuse(format!("{name} is the primary")));
    }
    let summaries = state.node_summaries();
    let status = |id: NodeId| {
        summaries
            .iter()
            .find(|s| s.id == id)
            .map_or("unknown", |s| s.status.as_str())
    };
    if !state.primary_resigned && state.primary_ready && status(primary) == "running" {
        return Err(refuse(format!(
            "the primary {} runs and holds its lease; use /switchover (raftmgr switchover) \
             for a planned change of primary",
            name_of(primary)
        )));
    }
    let probe = if status(candidate) == "down" {
        None // A majority of observers cannot reach it, whatever its last own probe said.
    } else {
        observed_probe(&state, candidate)
    };
    if let Some(why) = decide::ineligibility(
        &state,
        candidate,
        probe.as_ref(),
        decide::primary_lsn(&state),
        &api.decide_config,
    ) {
        return Err(refuse(format!("{name} cannot be promoted: {why}")));
    }
    let event = Event::FailoverRequested {
        generation: state.generation,
        candidate,
        reason: format!(
            "POST /failover to {} on {}: the primary {} is {}",
            name,
            api.node_name,
            name_of(primary),
            if state.primary_resigned {
                "resigned".to_string()
            } else {
                status(primary).to_string()
            }
        ),
    };
    let applied = api.proposer.propose(event).await?;
    if let Outcome::NoOp { reason } = applied.outcome {
        return Err(refuse(reason));
    }
    Ok(Json(FailoverAnswer {
        event_index: applied.event_index,
        generation: state.generation,
        from: name_of(primary),
        candidate: name,
    }))
}

/// What the committed observations say a candidate's PostgreSQL answered last: its own probe
/// if it was reachable, else a peer's; `None` when no observer reached it.
fn observed_probe(state: &ClusterState, id: NodeId) -> Option<CandidateProbe> {
    let node = state.nodes.get(&id)?;
    let reachable = |o: &&raftmgr_raft::Observation| o.reachable;
    let observation = node
        .health
        .get(&id)
        .map(|h| &h.observation)
        .filter(reachable)
        .or_else(|| node.health.values().map(|h| &h.observation).find(reachable))?;
    Some(CandidateProbe {
        in_recovery: observation.in_recovery?,
        received_lsn: observation.lsn,
        replayed_lsn: observation.replayed_lsn,
    })
}

/// The body of the load-balancer checks (Patroni-like).
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckAnswer {
    /// `primary`, `replica`, `fenced` (writable but not allowed to be), `stopped` or `unknown`.
    pub role: String,
    pub running: bool,
    pub generation: u64,
    pub timeline: Option<u32>,
    pub lease_held: bool,
    pub lag_bytes: Option<u64>,
}

fn check(api: &Api) -> (CheckAnswer, bool) {
    let local = api
        .local
        .as_ref()
        .map(|l| l.read().expect("local status lock").clone())
        .unwrap_or_default();
    // Read in place, and as little as possible: these checks are polled by every load
    // balancer, and while this low-priority thread holds the state's read lock, Raft cannot
    // apply an entry; preempted inside it, the thread holds up the failover. (A copy of the
    // state per request cost most of their time; summarizing every node under the lock made a
    // failover under wrk take 480 ms instead of 285, BENCHMARKS.md, Dec 1.)
    let (named_primary, generation, lag_bytes) = api.store.with(|state| {
        let named =
            state.primary == Some(api.node_id) && !state.primary_resigned && state.primary_ready;
        (named, state.generation, state.lag_bytes_of(api.node_id))
    });
    let writable = local.running && local.in_recovery == Some(false);
    let is_primary = named_primary && writable && local.lease_held;
    let role = match (local.running, local.in_recovery) {
        (true, Some(true)) => "replica",
        (true, Some(false)) if is_primary => "primary",
        (true, Some(false)) => "fenced",
        (false, _) => "stopped",
        (true, None) => "unknown",
    };
    let answer = CheckAnswer {
        role: role.into(),
        running: local.running,
        generation,
        timeline: local.timeline,
        lease_held: local.lease_held,
        lag_bytes,
    };
    (answer, is_primary)
}

fn answer(ok: bool, body: CheckAnswer) -> (StatusCode, Json<CheckAnswer>) {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// `GET /primary` (`/leader`, `/read-write`): 200 only on the writable primary of the current
/// generation that holds the lease; 503 everywhere else, a fenced or deposed primary included.
async fn check_primary(State(api): State<Arc<Api>>) -> (StatusCode, Json<CheckAnswer>) {
    let (body, is_primary) = check(&api);
    answer(is_primary, body)
}

#[derive(Debug, Default, Deserialize)]
pub struct ReplicaQuery {
    /// Maximum replication lag, e.g. `10MB`, `512kB`, `1000` (bytes).
    pub lag: Option<String>,
}

/// Parses PostgreSQL-style sizes: `1000`, `512kB`, `10MB`, `1GB` — up to 18 digits, then
/// optionally `B`, `kB`, `MB` or `GB` (powers of 1024, any case), nothing else (openapi.json's
/// pattern for `lag`). A size beyond `u64::MAX` bytes is `u64::MAX`: no lag is that large.
pub fn parse_size_bytes(text: &str) -> Option<u64> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    if number.is_empty() || number.len() > 18 {
        return None;
    }
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        _ => return None,
    };
    Some(number.saturating_mul(factor))
}

/// `GET /replica[?lag=10MB]`: 200 on a running standby (within the lag limit, when given).
async fn check_replica(
    State(api): State<Arc<Api>>,
    query: Result<Query<ReplicaQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<CheckAnswer>), ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = match &query.lag {
        None => None,
        Some(text) => Some(parse_size_bytes(text).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("lag={text:?} is not a size like 10MB"),
            )
        })?),
    };
    let (body, _) = check(&api);
    let within = match (limit, body.lag_bytes) {
        (None, _) => true,
        (Some(limit), Some(lag)) => lag <= limit,
        (Some(_), None) => false,
    };
    let ok = body.role == "replica" && within;
    Ok(answer(ok, body))
}

/// `GET /read-only`: 200 on a node that serves reads (the primary or a standby).
async fn check_read_only(State(api): State<Arc<Api>>) -> (StatusCode, Json<CheckAnswer>) {
    let (body, is_primary) = check(&api);
    let ok = is_primary || body.role == "replica";
    answer(ok, body)
}

/// `GET /health`: 200 while PostgreSQL runs.
async fn check_health(State(api): State<Arc<Api>>) -> (StatusCode, Json<CheckAnswer>) {
    let (body, _) = check(&api);
    let ok = body.running;
    answer(ok, body)
}

/// `GET /readiness`: 200 when this member knows a Raft leader and its PostgreSQL (if any) runs.
async fn check_readiness(State(api): State<Arc<Api>>) -> (StatusCode, Json<CheckAnswer>) {
    let (body, _) = check(&api);
    let leader = api.raft.metrics().borrow().current_leader.is_some();
    let ok = leader && (api.local.is_none() || body.running);
    answer(ok, body)
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(api): State<Arc<Api>>) -> impl IntoResponse {
    use std::fmt::Write;
    let raft = api.raft.metrics().borrow().clone();
    let state = api.store.cluster_state();
    let local = api
        .local
        .as_ref()
        .map(|l| l.read().expect("local status lock").clone());
    let node = format!("node=\"{}\"", api.node_name);
    let mut out = String::new();
    let mut metric = |kind: &str, name: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(
            out,
            "# HELP raftmgr_{name} {help}\n# TYPE raftmgr_{name} {kind}"
        );
        for (labels, value) in samples {
            let _ = writeln!(out, "raftmgr_{name}{{{labels}}} {value}");
        }
    };
    let mut gauge =
        |name: &str, help: &str, samples: Vec<(String, f64)>| metric("gauge", name, help, samples);
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    gauge(
        "raft_term",
        "Current Raft term.",
        vec![(node.clone(), raft.current_term as f64)],
    );
    gauge(
        "raft_leader",
        "1 if this member is the Raft leader.",
        vec![(node.clone(), flag(raft.current_leader == Some(api.node_id)))],
    );
    gauge(
        "raft_last_log_index",
        "Index of the last entry in this member's log.",
        vec![(node.clone(), raft.last_log_index.unwrap_or(0) as f64)],
    );
    gauge(
        "raft_applied_index",
        "Index of the last entry applied to the state machine.",
        vec![(
            node.clone(),
            raft.last_applied.map_or(0, |l| l.index) as f64,
        )],
    );
    gauge(
        "generation",
        "Committed generation (grows by one per promotion).",
        vec![(node.clone(), state.generation as f64)],
    );
    gauge(
        "promotions_total",
        "Promotions since the first primary registered (generation - 1).",
        vec![(node.clone(), state.generation.saturating_sub(1) as f64)],
    );
    gauge(
        "primary",
        "1 if the committed state names this node the primary.",
        vec![(node.clone(), flag(state.primary == Some(api.node_id)))],
    );
    gauge(
        "paused",
        "1 while automatic failover is paused.",
        vec![(node.clone(), flag(state.paused))],
    );
    gauge(
        "events_applied_total",
        "Events applied, no-ops included.",
        vec![(node.clone(), state.events_applied as f64)],
    );
    if let Some(local) = local {
        gauge(
            "postgres_running",
            "1 while this node's PostgreSQL answers.",
            vec![(node.clone(), flag(local.running))],
        );
        gauge(
            "postgres_in_recovery",
            "1 if this node's PostgreSQL is a standby.",
            vec![(node.clone(), flag(local.in_recovery == Some(true)))],
        );
        gauge(
            "postgres_timeline",
            "This node's PostgreSQL timeline.",
            vec![(node.clone(), local.timeline.unwrap_or(0) as f64)],
        );
        gauge(
            "lease_held",
            "1 while this node holds the primary's lease.",
            vec![(node.clone(), flag(local.lease_held))],
        );
    }
    let lag: Vec<(String, f64)> = state
        .node_summaries()
        .into_iter()
        .filter_map(|s| Some((format!("node=\"{}\"", s.name), s.lag_bytes? as f64)))
        .collect();
    gauge(
        "replication_lag_bytes",
        "Replay lag of each standby as its upstream last reported it.",
        lag,
    );
    let promotions = api.promotions.stats();
    metric(
        "counter",
        "failovers_total",
        "Failovers (automatic or manual) this agent saw decided since it started.",
        vec![(node.clone(), promotions.failovers as f64)],
    );
    metric(
        "counter",
        "switchovers_total",
        "Switchovers this agent saw decided since it started.",
        vec![(node.clone(), promotions.switchovers as f64)],
    );
    let last: Vec<(String, f64)> = [
        ("failover", promotions.last_failover),
        ("switchover", promotions.last_switchover),
    ]
    .into_iter()
    .filter_map(|(kind, took)| Some((format!("{node},kind=\"{kind}\""), took?.as_secs_f64())))
    .collect();
    metric(
        "gauge",
        "last_promotion_duration_seconds",
        "The last failover's and switchover's duration, from applying PromotionDecided to \
         applying PromotionCompleted, on this agent's monotonic clock.",
        last,
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::http::StatusCode;

    use super::{
        is_host_port, optional_json, parse_size_bytes, Bytes, ClusterAnswers, ClusterKey,
        PauseRequest, RaftView, StoreStats, OPENAPI,
    };

    fn key(term: u64, state_applied_index: u64) -> ClusterKey {
        ClusterKey {
            raft: RaftView {
                state: "Leader".into(),
                leader: Some(1),
                term,
                voters: BTreeSet::from([1]),
                learners: BTreeSet::new(),
                members: Default::default(),
                last_log_index: Some(state_applied_index),
                last_applied_index: Some(state_applied_index),
                snapshot_index: None,
                purged_index: None,
            },
            store: StoreStats {
                log_entries_on_disk: 1,
                snapshots_built: 0,
                snapshots_installed: 0,
                at_open: Default::default(),
            },
            state_applied_index: Some(state_applied_index),
        }
    }

    #[test]
    fn the_cluster_answer_is_built_again_only_when_what_it_shows_changed() {
        let answers = ClusterAnswers::default();
        let built = std::cell::Cell::new(0);
        let get = |key| {
            answers.get(key, |key| {
                built.set(built.get() + 1);
                let body = format!("{} {:?}", key.raft.term, key.state_applied_index);
                (key, Bytes::from(body))
            })
        };
        assert_eq!(get(key(1, 5)), "1 Some(5)");
        assert_eq!(get(key(1, 5)), "1 Some(5)");
        assert_eq!(built.get(), 1, "the same view is served again");
        assert_eq!(get(key(2, 5)), "2 Some(5)", "a new term is shown");
        assert_eq!(get(key(2, 6)), "2 Some(6)", "a newer state is shown");
        assert_eq!(built.get(), 3);
    }

    #[test]
    fn a_cluster_answer_is_kept_for_the_state_it_was_built_from() {
        let answers = ClusterAnswers::default();
        // Asked for index 5, built from index 6 (an entry was applied meanwhile).
        let newer = answers.get(key(1, 5), |_| (key(1, 6), Bytes::from("6")));
        assert_eq!(newer, "6");
        let again = answers.get(key(1, 6), |_| panic!("already built for index 6"));
        assert_eq!(again, "6");
        let rebuilt = answers.get(key(1, 5), |key| (key, Bytes::from("5")));
        assert_eq!(
            rebuilt, "5",
            "a key that differs is built again, never served stale"
        );
    }

    /// `(method, path)` of every `.route(...)` in `router()`, read from this file's source.
    fn routes_in_router() -> BTreeSet<(String, String)> {
        let source = include_str!("lib.rs");
        let start = source.find("pub fn router(").expect("router() in lib.rs");
        let end = start + source[start..].find(".with_state(").expect("its end");
        let mut routes = BTreeSet::new();
        for call in source[start..end].split(".route(").skip(1) {
            let path = call.split('"').nth(1).expect("a path literal");
            for method in ["get", "post", "put", "patch", "delete"] {
                let named = call
                    .match_indices(&format!("{method}("))
                    .any(|(i, _)| !call[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'));
                if named {
                    routes.insert((method.to_string(), path.to_string()));
                }
            }
        }
        routes
    }

    #[test]
    fn the_openapi_document_describes_every_route_and_no_other() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                    .map(move |method| (method.clone(), path.clone()))
            })
            .collect();
        let served = routes_in_router();
        assert!(served.len() > 20, "{served:?}");
        assert!(served.contains(&("post".into(), "/events".into())));
        assert!(served.contains(&("get".into(), "/liveness".into())));
        let missing: Vec<_> = served.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&served).collect();
        assert!(
            missing.is_empty(),
            "routes missing from openapi.json: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "openapi.json describes no such route: {extra:?}"
        );
    }

    /// `POST /events` takes the `Event` schema and the fuzz run checks answers against it: a new
    /// event variant must be described there too.
    #[test]
    fn the_event_schema_describes_every_event_kind() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let variants = doc["components"]["schemas"]["Event"]["oneOf"]
            .as_array()
            .expect("Event is a oneOf");
        let described: BTreeSet<String> = variants
            .iter()
            .flat_map(|v| {
                let tags = v["required"].as_array().cloned().unwrap_or_default();
                let unit = v["enum"].as_array().cloned().unwrap_or_default();
                tags.into_iter().chain(unit)
            })
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect();
        let kinds: BTreeSet<String> = raftmgr_raft::event::EVENT_KINDS
            .iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(described, kinds);
    }

    #[test]
    fn member_addresses_are_host_and_port() {
        for good in [
            "10.0.0.1:7001",
            "db-1.example.com:8001",
            "[::1]:7001",
            "h:65535",
        ] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "",
            "10.0.0.1",
            ":7001",
            "h:0",
            "h:65536",
            "h:07001",
            "h:+1",
            "a b:1",
            "h\u{92}:1",
            "[zz]:1",
            "a:b:1",
            "h:",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn an_optional_body_is_empty_or_json_of_its_shape() {
        use axum::http::{header, HeaderMap, HeaderValue};
        let mut json = HeaderMap::new();
        json.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let none = HeaderMap::new();
        let empty: PauseRequest = optional_json(&none, b"").unwrap();
        assert_eq!(empty.reason, None);
        let given: PauseRequest = optional_json(&json, br#"{"reason": "x"}"#).unwrap();
        assert_eq!(given.reason.as_deref(), Some("x"));
        for (headers, body) in [
            (&json, &br#"{"reason": {}}"#[..]),
            (&json, b"\x00"),
            (&json, b" "),
            (&json, br#"{"colour": "blue"}"#),
            (&none, br#"{"reason": "x"}"#),
        ] {
            let e = optional_json::<PauseRequest>(headers, body).err().unwrap();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn sizes_parse_like_postgres() {
        assert_eq!(parse_size_bytes("1000"), Some(1000));
        assert_eq!(parse_size_bytes("512kB"), Some(512 * 1024));
        assert_eq!(parse_size_bytes("10MB"), Some(10 << 20));
        assert_eq!(parse_size_bytes("1GB"), Some(1 << 30));
        assert_eq!(parse_size_bytes("ten"), None);
        assert_eq!(parse_size_bytes("10XB"), None);
        assert_eq!(parse_size_bytes("10mb"), Some(10 << 20));
        assert_eq!(parse_size_bytes("999999999999999999GB"), Some(u64::MAX));
        for bad in [
            "",
            "MB",
            " 10MB",
            "10 MB",
            "10MB\n",
            "0.5",
            "-1",
            "1234567890123456789",
        ] {
            assert_eq!(parse_size_bytes(bad), None, "{bad:?}");
        }
    }
}
