//! The Raft RPC server: the axum routes that receive append-entries, vote, install-snapshot and
//! forwarded leader requests. Every request must carry the cluster secret and a body that decodes;
//! otherwise it is refused with a clear error before Raft sees it.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::forward::{Leader, Request};
use crate::network::{PATH_APPEND_ENTRIES, PATH_FORWARD, PATH_INSTALL_SNAPSHOT, PATH_VOTE};
use crate::SECRET_HEADER;

/// Largest RPC body accepted. openraft's snapshot chunks are configured well below it.
pub const BODY_LIMIT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone)]
struct RpcState {
    leader: Leader,
    secret: Arc<str>,
}

/// `leader` carries out the requests other members forward here when this member leads.
pub fn router(leader: Leader, secret: impl Into<Arc<str>>) -> Router {
    let state = RpcState {
        leader,
        secret: secret.into(),
    };
    Router::new()
        .route(PATH_APPEND_ENTRIES, post(append_entries))
        .route(PATH_VOTE, post(vote))
        .route(PATH_INSTALL_SNAPSHOT, post(install_snapshot))
        .route(PATH_FORWARD, post(forward))
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .with_state(state)
}

async fn append_entries(State(s): State<RpcState>, headers: HeaderMap, body: Bytes) -> Response {
    serve(&s, &headers, &body, "append-entries request", |rpc| {
        s.leader.raft().append_entries(rpc)
    })
    .await
}

async fn vote(State(s): State<RpcState>, headers: HeaderMap, body: Bytes) -> Response {
    serve(&s, &headers, &body, "vote request", |rpc| {
        s.leader.raft().vote(rpc)
    })
    .await
}

async fn install_snapshot(State(s): State<RpcState>, headers: HeaderMap, body: Bytes) -> Response {
    serve(&s, &headers, &body, "install-snapshot request", |rpc| {
        s.leader.raft().install_snapshot(rpc)
    })
    .await
}

async fn forward(State(s): State<RpcState>, headers: HeaderMap, body: Bytes) -> Response {
    serve(
        &s,
        &headers,
        &body,
        "forwarded request",
        |request: Request| s.leader.execute(request),
    )
    .await
}

async fn serve<Req, Resp, Fut>(
    state: &RpcState,
    headers: &HeaderMap,
    body: &[u8],
    what: &'static str,
    handle: impl FnOnce(Req) -> Fut,
) -> Response
where
    Req: DeserializeOwned,
    Resp: Serialize,
    Fut: Future<Output = Resp>,
{
    let presented = headers.get(SECRET_HEADER).map(|v| v.as_bytes());
    match presented {
        None => {
            tracing::warn!("refused a {what}: no cluster secret");
            return refuse(
                StatusCode::UNAUTHORIZED,
                format!("refused {what}: the {SECRET_HEADER} header is missing"),
            );
        }
        Some(secret) if !same_bytes(secret, state.secret.as_bytes()) => {
            tracing::warn!("refused a {what}: wrong cluster secret");
            return refuse(
                StatusCode::UNAUTHORIZED,
                format!("refused {what}: wrong cluster secret"),
            );
        }
        Some(_) => {}
    }
    let request = match codec::decode::<Req>(what, body) {
        Ok(request) => request,
        Err(e) => {
            tracing::warn!("refused a {what}: {e}");
            return refuse(StatusCode::BAD_REQUEST, format!("refused {what}: {e}"));
        }
    };
    let answer = handle(request).await;
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        codec::encode(&answer),
    )
        .into_response()
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, message + "\n").into_response()
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
