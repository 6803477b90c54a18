//! The Raft RPC client: append-entries, vote and install-snapshot as HTTP POSTs with bincode
//! bodies, over TLS when the node has a `[tls]` section (then with this node's certificate as
//! its client identity). Each request carries the cluster secret and a deadline; connections are
//! pooled and re-established by reqwest on demand, so a peer that restarts is simply reached
//! again.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::types::{Member, NodeId, TypeConfig};
use crate::SECRET_HEADER;

pub const PATH_APPEND_ENTRIES: &str = "/raft/append-entries";
pub const PATH_VOTE: &str = "/raft/vote";
pub const PATH_INSTALL_SNAPSHOT: &str = "/raft/install-snapshot";
pub const PATH_FORWARD: &str = "/raft/forward";

/// How long to wait for a TCP connection to a peer before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long replication to an unreachable peer waits before trying again. openraft's default,
/// 500 ms, is what a crashed node's restarted agent waited for the log (and so for its rejoin);
/// a refused connection costs next to nothing, and a dropped one waits `CONNECT_TIMEOUT` anyway.
const UNREACHABLE_RETRY: Duration = Duration::from_millis(100);

/// An HTTP client for Raft RPCs to any member, holding the cluster secret.
#[derive(Clone)]
pub struct RpcClient {
    http: reqwest::Client,
    /// `http`, or `https` when the client was built with TLS: peers' addresses are `host:port`,
    /// and every member of a cluster speaks the same.
    scheme: &'static str,
    secret: Arc<str>,
}

/// Why an RPC got no answer from the peer's Raft.
#[derive(Debug, thiserror::Error)]
pub enum RpcFailure {
    /// No connection could be made: the peer is down or cut off.
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    /// A connection was made but the exchange failed (timeout, refusal, bad body).
    #[error("{0}")]
    Failed(String),
}

impl RpcClient {
    /// A client for plain HTTP (`tls: None`) or for HTTPS with `tls`, a rustls configuration
    /// that trusts the cluster's CA and presents this node's certificate.
    pub fn new(
        secret: impl Into<Arc<str>>,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self, reqwest::Error> {
        let builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30));
        let (builder, scheme) = match tls {
            Some(config) => (builder.use_preconfigured_tls(config), "https"),
            None => (builder, "http"),
        };
        Ok(RpcClient {
            http: builder.build()?,
            scheme,
            secret: secret.into(),
        })
    }

    /// POSTs `body` (bincode) to `{scheme}://{addr}{path}` and decodes the bincode answer. A
    /// failed TLS handshake is a connection that could not be made: the request was not sent.
    pub async fn post<Req, Resp>(
        &self,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcFailure>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let url = format!("{}://{addr}{path}", self.scheme);
        let response = self
            .http
            .post(&url)
            .header(SECRET_HEADER, &*self.secret)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(codec::encode(body))
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| {
                if source.is_connect() {
                    RpcFailure::Unreachable {
                        addr: addr.to_string(),
                        source,
                    }
                } else {
                    RpcFailure::Failed(format!("POST {url}: {}", with_causes(&source)))
                }
            })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| RpcFailure::Failed(format!("POST {url}: reading the answer: {e}")))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            return Err(RpcFailure::Failed(format!(
                "POST {url}: {status}: {}",
                text.trim()
            )));
        }
        codec::decode("RPC answer", &bytes)
            .map_err(|e| RpcFailure::Failed(format!("POST {url}: {e}")))
    }
}

/// `error: cause: cause ...`: reqwest's own message ("error sending request") says little.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text = format!("{text}: {e}");
        cause = e.source();
    }
    text
}

impl RaftNetworkFactory<TypeConfig> for RpcClient {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerConnection {
        PeerConnection {
            client: self.clone(),
            target,
            addr: node.raft_addr.clone(),
        }
    }
}

/// The connection openraft uses to replicate to one member.
pub struct PeerConnection {
    client: RpcClient,
    target: NodeId,
    addr: String,
}

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<NodeId, E>> = self
            .client
            .post(&self.addr, path, request, option.hard_ttl())
            .await
            .map_err(|failure| match &failure {
                RpcFailure::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&failure)),
                RpcFailure::Failed(_) => RPCError::Network(NetworkError::new(&failure)),
            })?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(PATH_APPEND_ENTRIES, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(PATH_INSTALL_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(PATH_VOTE, &rpc, &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(UNREACHABLE_RETRY))
    }
}
