//! The agent's HTTP API (axum): the only crate that speaks HTTP/JSON to operators.
//!
//! Reads are open; every mutating request needs `Authorization: Bearer <api_token>`. Errors are
//! JSON objects `{"error": "..."}` with a 4xx status for requests that cannot be carried out as
//! asked and a 5xx status when the cluster could not answer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use openraft::error::{InitializeError, RaftError};
use raftmgr_raft::forward::{self, ForwardError, Proposer, Reply, Request};
use raftmgr_raft::{ClusterState, Event, Member, NodeId, Outcome, Raft};
use raftmgr_storage::{AtOpen, StoreView};
use serde::{Deserialize, Serialize};

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
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/cluster", get(cluster))
        .route("/cluster/init", post(init))
        .route("/events", post(propose))
        .route("/members", post(add_member))
        .route("/members/{node_id}", delete(remove_member))
        .route(
            "/liveness",
            get(|| async { Json(serde_json::json!({"alive": true})) }),
        )
        .with_state(api)
}

/// `GET /cluster`: this member's view of Raft and the applied cluster state.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterView {
    pub node: NodeView,
    pub raft: RaftView,
    pub store: StoreStats,
    pub state: ClusterState,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
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

#[derive(Debug, Serialize, Deserialize)]
pub struct StoreStats {
    pub log_entries_on_disk: usize,
    pub snapshots_built: u64,
    pub snapshots_installed: u64,
    /// What this member's own store held when the agent started.
    pub at_open: AtOpen,
}

async fn cluster(State(api): State<Api>) -> Json<ClusterView> {
    let metrics = api.raft.metrics().borrow().clone();
    let (voters, members) = forward::members(&api.raft);
    let learners = members
        .keys()
        .filter(|id| !voters.contains(id))
        .copied()
        .collect();
    let stats = api.store.stats();
    Json(ClusterView {
        node: NodeView {
            id: api.node_id,
            name: api.node_name.clone(),
        },
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
        state: api.store.cluster_state(),
    })
}

/// A JSON error answer.
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
    pub log_index: u64,
    pub outcome: Outcome,
}

/// `POST /events`: append an event to the log (low level: tests, benchmarks, repair).
async fn propose(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Json<Event>, JsonRejection>,
) -> Result<Json<ProposeAnswer>, ApiError> {
    authorize(&api, &headers)?;
    let Json(event) = body?;
    let applied = api.proposer.propose(event).await?;
    Ok(Json(ProposeAnswer {
        log_index: applied.log_index,
        outcome: applied.outcome,
    }))
}

/// `POST /cluster/init`: start a new cluster with this node and its configured peers.
async fn init(
    State(api): State<Api>,
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

#[derive(Debug, Serialize, Deserialize)]
pub struct MembershipAnswer {
    pub log_index: u64,
}

/// `POST /members`: add a member (as a learner until it has caught up, then as a voter).
async fn add_member(
    State(api): State<Api>,
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
    State(api): State<Api>,
    headers: HeaderMap,
    Path(node_id): Path<NodeId>,
) -> Result<Json<MembershipAnswer>, ApiError> {
    authorize(&api, &headers)?;
    membership_change(&api, Request::RemoveMember { node_id }).await
}

async fn membership_change(
    api: &Api,
    request: Request,
) -> Result<Json<MembershipAnswer>, ApiError> {
    match api.proposer.submit(request).await? {
        Reply::MembershipChanged { log_index } => Ok(Json(MembershipAnswer { log_index })),
        Reply::Applied(applied) => Ok(Json(MembershipAnswer {
            log_index: applied.log_index,
        })),
    }
}
