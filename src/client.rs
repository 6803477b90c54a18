//! The CLI's side of the HTTP API: finds the node's API from its config (or `--api`), sends the
//! token for mutating requests, and turns JSON errors into messages.

use std::path::PathBuf;

use anyhow::{bail, Context};
use raftmgr_api::ClusterView;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config;

/// Where to reach an agent's API, from the command line.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The node's configuration file (its API address and token are read from it).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The API's `host:port` (plain HTTP, or HTTPS with `--ca-file`) or `https://host:port`,
    /// instead of reading it from a configuration.
    #[arg(long, value_name = "[https://]HOST:PORT")]
    pub api: Option<String>,
    /// The API token, instead of reading it from a configuration.
    #[arg(long, env = "RAFTMGR_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With `--api`: the CA bundle (PEM) to check the agent's certificate against (default: the
    /// built-in web roots). With `--config`, the file's `tls.ca_file` is used.
    #[arg(long, env = "RAFTMGR_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// With `--api`: a client certificate (PEM) for an API with `tls.api_verify_client =
    /// "required"`. With `--config`, the node's own certificate is presented.
    #[arg(long, value_name = "FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// The private key of `--cert-file` (PEM).
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(target: &Target) -> anyhow::Result<Client> {
        match (&target.api, &target.config) {
            (Some(api), _) => {
                let tls = crate::tls::cli_client_config(
                    target.ca_file.as_ref(),
                    target.cert_file.as_ref().zip(target.key_file.as_ref()),
                )?;
                let base = match api.split_once("://") {
                    Some(("http" | "https", _)) => api.trim_end_matches('/').to_string(),
                    Some((scheme, _)) => {
                        bail!("--api {api}: the scheme must be http or https, not {scheme}")
                    }
                    None if tls.is_some() => format!("https://{api}"),
                    None => format!("http://{api}"),
                };
                Ok(Client {
                    base,
                    token: target.token.clone(),
                    http: http_client(tls)?,
                })
            }
            (None, Some(path)) => {
                let node = config::load(path)?;
                let mut client = Client::for_node(&node)?;
                client.token = target.token.clone().or(client.token);
                Ok(client)
            }
            (None, None) => bail!("say which node to ask: --config FILE or --api HOST:PORT"),
        }
    }

    /// A client for the agent named in a loaded configuration: HTTPS with its `[tls]` section
    /// (trusting its CA, presenting its certificate), else plain HTTP.
    pub fn for_node(node: &config::NodeConfig) -> anyhow::Result<Client> {
        Ok(Client {
            base: format!("{}://{}", node.scheme(), node.api_advertise()),
            token: Some(node.api_token.clone()),
            http: http_client(node.tls.as_ref().map(|tls| tls.client.clone()))?,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.authorized(self.http.post(self.url(path))).json(body))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.authorized(self.http.delete(self.url(path))))
            .await
    }

    /// A load-balancer check: its answer, and whether it said 200 (503 is an answer, not an
    /// error).
    pub async fn get_check(&self, path: &str) -> anyhow::Result<(raftmgr_api::CheckAnswer, bool)> {
        let response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .with_context(|| format!("cannot reach the agent at {}", self.base))?;
        let ok = response.status().is_success();
        let answer = response
            .json()
            .await
            .context("reading the agent's answer")?;
        Ok((answer, ok))
    }

    pub async fn cluster(&self) -> anyhow::Result<ClusterView> {
        self.get("/cluster").await
    }

    /// The cluster as of now: the agent first applies everything committed before the call.
    pub async fn cluster_consistent(&self) -> anyhow::Result<ClusterView> {
        self.get("/cluster?consistent=true").await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the agent at {}", self.base))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .context("reading the agent's answer")?;
        if !status.is_success() {
            bail!(error_message(status, body));
        }
        serde_json::from_str(&body)
            .with_context(|| format!("unexpected answer from {}: {body}", self.base))
    }

    /// Reads the Server-Sent Events stream at `path`, handing each message to `each`, until
    /// the agent ends it (it shuts down) or `each` fails.
    pub async fn follow(
        &self,
        path: &str,
        mut each: impl FnMut(SseMessage) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .with_context(|| format!("cannot reach the agent at {}", self.base))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!(error_message(status, body));
        }
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .context("reading the agent's event stream")?
        {
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = buffer.drain(..end + 2).collect();
                if let Some(message) = SseMessage::parse(&String::from_utf8_lossy(&block)) {
                    each(message)?;
                }
            }
        }
        Ok(())
    }
}

fn http_client(tls: Option<rustls::ClientConfig>) -> anyhow::Result<reqwest::Client> {
    let builder = reqwest::Client::builder();
    let builder = match tls {
        Some(config) => builder.use_preconfigured_tls(config),
        None => builder,
    };
    builder.build().context("building the HTTP client")
}

/// The message of a JSON error answer (`{"error": ...}`), else its body.
fn error_message(status: reqwest::StatusCode, body: String) -> String {
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or(body);
    format!("{status}: {}", message.trim())
}

/// One message of a Server-Sent Events stream.
#[derive(Debug, PartialEq, Eq)]
pub struct SseMessage {
    /// The `event:` name; `None` for plain messages.
    pub event: Option<String>,
    pub data: String,
}

impl SseMessage {
    /// Parses one block of `field: value` lines; `None` for a block without data (a
    /// keep-alive comment).
    pub fn parse(block: &str) -> Option<SseMessage> {
        let mut event = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_string()),
                "data" => data.push(value),
                _ => {}
            }
        }
        (!data.is_empty()).then(|| SseMessage {
            event,
            data: data.join("\n"),
        })
    }
}

/// `raftmgr cluster show`: the registered nodes, then the Raft members.
pub fn render_cluster(view: &ClusterView) -> String {
    let raft = &view.raft;
    let state = &view.state;
    let mut out = format!(
        "Generation {}, primary {}; Raft term {}, leader {}, applied index {}\n\n",
        state.generation,
        state
            .primary
            .and_then(|id| state.nodes.get(&id))
            .map_or("none".to_string(), |n| n.registration.name.clone()),
        raft.term,
        raft.leader
            .map_or("none".to_string(), |id| format!("node {id}")),
        show(raft.last_applied_index),
    );
    if state.paused {
        out += "PAUSED: automatic failover is off (raftmgr resume turns it on)\n\n";
    }
    if view.nodes.is_empty() {
        out += "No database node is registered yet.\n\n";
    } else {
        let mut rows = vec![[
            "ID", "Name", "Role", "Status", "Upstream", "TL", "LSN", "Lag", "Prio", "Raft",
        ]
        .map(String::from)
        .to_vec()];
        for row in &view.nodes {
            let n = &row.summary;
            rows.push(vec![
                n.id.to_string(),
                n.name.clone(),
                if n.sync {
                    format!("{} (sync)", n.role)
                } else {
                    n.role.clone()
                },
                n.status.clone(),
                n.upstream.clone().unwrap_or_else(|| "-".into()),
                n.timeline.map_or("-".into(), |t| t.to_string()),
                n.lsn.clone().unwrap_or_else(|| "-".into()),
                lag(n.lag_bytes, n.lag_ms),
                n.priority.to_string(),
                row.raft_role.clone(),
            ]);
        }
        out += &table(&rows);
        out += "\n";
    }
    let mut rows = vec![["Raft member", "Role", "Raft address", "API address"]
        .map(String::from)
        .to_vec()];
    for (id, member) in &raft.members {
        let role = if raft.leader == Some(*id) {
            "leader"
        } else if raft.voters.contains(id) {
            "follower"
        } else {
            "learner"
        };
        rows.push(vec![
            id.to_string(),
            role.into(),
            member.raft_addr.clone(),
            member.api_addr.clone(),
        ]);
    }
    out += &table(&rows);
    out
}

fn lag(bytes: Option<u64>, ms: Option<u64>) -> String {
    match (bytes, ms) {
        (None, None) => "-".into(),
        (Some(b), None) => format!("{b} B"),
        (None, Some(ms)) => format!("{ms} ms"),
        (Some(b), Some(ms)) => format!("{b} B, {ms} ms"),
    }
}

/// `raftmgr cluster events`: one line per event, oldest first.
pub fn render_events(events: &[raftmgr_raft::state::RecordedEvent]) -> String {
    let mut rows = vec![["Index", "Event", "Node", "Outcome", "Details"]
        .map(String::from)
        .to_vec()];
    rows.extend(events.iter().map(event_cells));
    table(&rows)
}

/// `raftmgr cluster events --follow`: one line per event, as it arrives.
pub fn render_event_line(e: &raftmgr_raft::state::RecordedEvent) -> String {
    let [index, kind, node, outcome, details] =
        event_cells(e).try_into().expect("five cells per event");
    format!("{index:>8}  {kind:<19} {node:<4} {outcome:<8} {details}")
}

/// Index, event, node, outcome, details.
fn event_cells(e: &raftmgr_raft::state::RecordedEvent) -> Vec<String> {
    let outcome = match &e.outcome {
        raftmgr_raft::Outcome::Applied => "applied".to_string(),
        raftmgr_raft::Outcome::NoOp { reason } => format!("no-op: {reason}"),
    };
    let details = serde_json::to_string(&e.event)
        .unwrap_or_default()
        .chars()
        .take(100)
        .collect();
    vec![
        e.event_index.to_string(),
        e.event.kind().into(),
        e.event.subject().map_or("-".into(), |id| id.to_string()),
        outcome,
        details,
    ]
}

fn show(value: Option<u64>) -> String {
    value.map_or("-".to_string(), |v| v.to_string())
}

/// Left-aligned columns separated by " | ", with a rule under the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!(" {cell:<width$} "))
            .collect();
        out += cells.join("|").trim_end();
        out += "\n";
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(w + 2)).collect();
            out += &rule.join("+");
            out += "\n";
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::SseMessage;

    #[test]
    fn sse_blocks_parse() {
        assert_eq!(
            SseMessage::parse("id: 7\ndata: {\"a\":1}\n\n"),
            Some(SseMessage {
                event: None,
                data: "{\"a\":1}".into()
            })
        );
        assert_eq!(
            SseMessage::parse("event: missed\ndata: {\"missed\":3}\n"),
            Some(SseMessage {
                event: Some("missed".into()),
                data: "{\"missed\":3}".into()
            })
        );
        assert_eq!(SseMessage::parse(":\n\n"), None);
    }
}
