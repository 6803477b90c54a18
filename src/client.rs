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
    /// The API's `host:port`, instead of reading it from a configuration.
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<String>,
    /// The API token, instead of reading it from a configuration.
    #[arg(long, env = "RAFTMGR_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(target: &Target) -> anyhow::Result<Client> {
        let (addr, config_token) = match (&target.api, &target.config) {
            (Some(api), _) => (api.clone(), None),
            (None, Some(path)) => {
                let node = config::load(path)?;
                (node.api_advertise(), Some(node.api_token))
            }
            (None, None) => bail!("say which node to ask: --config FILE or --api HOST:PORT"),
        };
        Ok(Client {
            base: format!("http://{addr}"),
            token: target.token.clone().or(config_token),
            http: reqwest::Client::new(),
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

    pub async fn cluster(&self) -> anyhow::Result<ClusterView> {
        self.get("/cluster").await
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
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(body);
            bail!("{status}: {}", message.trim());
        }
        serde_json::from_str(&body)
            .with_context(|| format!("unexpected answer from {}: {body}", self.base))
    }
}

/// `raftmgr cluster show`: the Raft members and the registered nodes as tables.
pub fn render_cluster(view: &ClusterView) -> String {
    let raft = &view.raft;
    let state = &view.state;
    let mut out = format!(
        "Raft: term {}, leader {}, last log index {}, applied {}\n",
        raft.term,
        raft.leader
            .map_or("none".to_string(), |id| format!("node {id}")),
        show(raft.last_log_index),
        show(raft.last_applied_index),
    );
    out += &format!(
        "Generation {}, primary {}\n\n",
        state.generation,
        state
            .primary
            .and_then(|id| state.nodes.get(&id))
            .map_or("none".to_string(), |n| n.registration.name.clone())
    );
    let mut rows = vec![vec![
        "ID".to_string(),
        "Raft role".into(),
        "Raft address".into(),
        "API address".into(),
        "Name".into(),
        "PG role".into(),
    ]];
    for (id, member) in &raft.members {
        let raft_role = if raft.leader == Some(*id) {
            "leader"
        } else if raft.voters.contains(id) {
            "follower"
        } else {
            "learner"
        };
        let node = state.nodes.get(id);
        rows.push(vec![
            id.to_string(),
            raft_role.into(),
            member.raft_addr.clone(),
            member.api_addr.clone(),
            node.map_or("-".into(), |n| n.registration.name.clone()),
            match (node, state.primary == Some(*id)) {
                (None, _) => "-".into(),
                (Some(_), true) => "primary".into(),
                (Some(_), false) => "standby".into(),
            },
        ]);
    }
    out += &table(&rows);
    out
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
