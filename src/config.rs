//! The node's TOML configuration: parsing and validation are pure functions, so every rule is
//! unit-tested. Unknown keys are refused with their name; bad values with the key that holds them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raftmgr_raft::{Member, NodeId};
use serde::Deserialize;

/// The exit code for an invalid configuration (sysexits EX_USAGE).
pub const EXIT_INVALID_CONFIG: i32 = 64;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's Raft id: a positive integer, unique in the cluster.
    pub node_id: NodeId,
    /// This node's name, unique in the cluster (used in logs, tables and the API).
    pub name: String,
    /// Where the agent keeps its state; the Raft store is `data_dir/raft`.
    pub data_dir: PathBuf,
    /// The secret every Raft RPC carries. Give this or `cluster_secret_file`.
    #[serde(default)]
    pub cluster_secret: Option<String>,
    #[serde(default)]
    pub cluster_secret_file: Option<PathBuf>,
    /// The token mutating API requests must present (`Authorization: Bearer ...`).
    /// Give this or `api_token_file`.
    #[serde(default)]
    pub api_token: Option<String>,
    #[serde(default)]
    pub api_token_file: Option<PathBuf>,
    pub raft: RaftSection,
    pub api: ApiSection,
    /// The other members of the initial cluster, used by `raftmgr cluster init`.
    #[serde(default)]
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftSection {
    /// `host:port` the Raft RPC server listens on.
    pub listen: SocketAddr,
    /// `host:port` peers use to reach it (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    #[serde(default = "defaults::heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "defaults::election_timeout_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "defaults::election_timeout_max_ms")]
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many new log entries.
    #[serde(default = "defaults::snapshot_logs_since_last")]
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind a snapshot (for slow followers) before they are purged.
    #[serde(default = "defaults::logs_to_keep_after_snapshot")]
    pub logs_to_keep_after_snapshot: u64,
    /// How long a proposal may wait for a leader and a commit.
    #[serde(default = "defaults::proposal_timeout_ms")]
    pub proposal_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// `host:port` the HTTP API listens on.
    pub listen: SocketAddr,
    /// `host:port` others use to reach it (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub node_id: NodeId,
    pub raft_addr: String,
    pub api_addr: String,
}

pub mod defaults {
    pub fn heartbeat_interval_ms() -> u64 {
        100
    }
    pub fn election_timeout_min_ms() -> u64 {
        500
    }
    pub fn election_timeout_max_ms() -> u64 {
        1000
    }
    pub fn snapshot_logs_since_last() -> u64 {
        5000
    }
    pub fn logs_to_keep_after_snapshot() -> u64 {
        1000
    }
    pub fn proposal_timeout_ms() -> u64 {
        10_000
    }
}

/// A configuration that could not be used, with the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: &'static str,
        message: String,
    },
}

/// A validated configuration with its secrets resolved.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub file: Config,
    pub cluster_secret: String,
    pub api_token: String,
}

impl NodeConfig {
    pub fn raft_advertise(&self) -> String {
        self.file
            .raft
            .advertise
            .clone()
            .unwrap_or_else(|| self.file.raft.listen.to_string())
    }

    pub fn api_advertise(&self) -> String {
        self.file
            .api
            .advertise
            .clone()
            .unwrap_or_else(|| self.file.api.listen.to_string())
    }

    pub fn member(&self) -> Member {
        Member {
            raft_addr: self.raft_advertise(),
            api_addr: self.api_advertise(),
        }
    }

    pub fn proposal_timeout(&self) -> Duration {
        Duration::from_millis(self.file.raft.proposal_timeout_ms)
    }
}

/// Reads, parses and validates the configuration in `path`, and reads the secret files it names.
pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let file = parse(&shown, &text)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let cluster_secret = secret(
        &shown,
        base,
        "cluster_secret",
        &file.cluster_secret,
        &file.cluster_secret_file,
    )?;
    let api_token = secret(
        &shown,
        base,
        "api_token",
        &file.api_token,
        &file.api_token_file,
    )?;
    Ok(NodeConfig {
        file,
        cluster_secret,
        api_token,
    })
}

/// Parses and validates a configuration's text; `path` is only for messages.
pub fn parse(path: &str, text: &str) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    validate(&config).map_err(|(key, message)| ConfigError::Invalid {
        path: path.to_string(),
        key,
        message,
    })?;
    Ok(config)
}

fn validate(c: &Config) -> Result<(), (&'static str, String)> {
    if c.node_id == 0 {
        return Err(("node_id", "must be a positive integer".into()));
    }
    if c.name.is_empty()
        || !c
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
    {
        return Err((
            "name",
            format!("{:?} must be non-empty letters, digits, '-' or '_'", c.name),
        ));
    }
    if c.data_dir.as_os_str().is_empty() {
        return Err(("data_dir", "must not be empty".into()));
    }
    match (&c.cluster_secret, &c.cluster_secret_file) {
        (None, None) => {
            return Err((
                "cluster_secret",
                "is required (or cluster_secret_file)".into(),
            ))
        }
        (Some(_), Some(_)) => {
            return Err((
                "cluster_secret",
                "give cluster_secret or cluster_secret_file, not both".into(),
            ))
        }
        (Some(s), None) if s.len() < 16 => {
            return Err(("cluster_secret", "must be at least 16 characters".into()))
        }
        _ => {}
    }
    match (&c.api_token, &c.api_token_file) {
        (None, None) => return Err(("api_token", "is required (or api_token_file)".into())),
        (Some(_), Some(_)) => {
            return Err((
                "api_token",
                "give api_token or api_token_file, not both".into(),
            ))
        }
        (Some(s), None) if s.len() < 16 => {
            return Err(("api_token", "must be at least 16 characters".into()))
        }
        _ => {}
    }
    let r = &c.raft;
    if r.heartbeat_interval_ms == 0 {
        return Err(("raft.heartbeat_interval_ms", "must be positive".into()));
    }
    if r.election_timeout_min_ms < 3 * r.heartbeat_interval_ms {
        return Err((
            "raft.election_timeout_min_ms",
            format!(
                "({}) must be at least 3 × raft.heartbeat_interval_ms ({}), \
                 or followers call elections while the leader is healthy",
                r.election_timeout_min_ms, r.heartbeat_interval_ms
            ),
        ));
    }
    if r.election_timeout_max_ms <= r.election_timeout_min_ms {
        return Err((
            "raft.election_timeout_max_ms",
            format!(
                "({}) must be greater than raft.election_timeout_min_ms ({})",
                r.election_timeout_max_ms, r.election_timeout_min_ms
            ),
        ));
    }
    if r.snapshot_logs_since_last == 0 {
        return Err(("raft.snapshot_logs_since_last", "must be positive".into()));
    }
    if r.proposal_timeout_ms < r.election_timeout_max_ms {
        return Err((
            "raft.proposal_timeout_ms",
            format!(
                "({}) must be at least raft.election_timeout_max_ms ({}), \
                 or a proposal gives up during an ordinary election",
                r.proposal_timeout_ms, r.election_timeout_max_ms
            ),
        ));
    }
    if c.raft.listen == c.api.listen {
        return Err((
            "api.listen",
            format!("({}) is also raft.listen", c.api.listen),
        ));
    }
    let mut seen = std::collections::BTreeSet::from([c.node_id]);
    for peer in &c.peers {
        if !seen.insert(peer.node_id) {
            return Err((
                "peers.node_id",
                format!("node {} appears twice (or is this node)", peer.node_id),
            ));
        }
        if peer.node_id == 0 {
            return Err(("peers.node_id", "must be a positive integer".into()));
        }
    }
    Ok(())
}

fn secret(
    path: &str,
    base: &Path,
    key: &'static str,
    inline: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<String, ConfigError> {
    if let Some(value) = inline {
        return Ok(value.clone());
    }
    let file = base.join(file.as_ref().expect("validated: one of the two is set"));
    let value = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
        path: file.display().to_string(),
        source,
    })?;
    let value = value.trim().to_string();
    if value.len() < 16 {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            key,
            message: format!(
                "the secret in {} must be at least 16 characters",
                file.display()
            ),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_id = 1
name = "node1"
data_dir = "/tmp/raftmgr/node1"
cluster_secret = "0123456789abcdef"
api_token = "fedcba9876543210"

[raft]
listen = "127.0.0.1:7001"

[api]
listen = "127.0.0.1:8001"

[[peers]]
node_id = 2
raft_addr = "127.0.0.1:7002"
api_addr = "127.0.0.1:8002"
"#;

    fn error_of(text: &str) -> String {
        parse("node.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = parse("node.toml", GOOD).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(
            c.raft.heartbeat_interval_ms,
            defaults::heartbeat_interval_ms()
        );
        assert_eq!(c.peers.len(), 1);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = error_of(&GOOD.replace("[api]", "[api]\nlisten_port = 3"));
        assert!(e.contains("unknown field `listen_port`"), "{e}");
        let e = error_of(&format!("colour = \"blue\"\n{GOOD}"));
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = error_of(&GOOD.replace("node_id = 1", "node_id = 0"));
        assert!(e.contains("node_id: must be a positive integer"), "{e}");
        let e = error_of(&GOOD.replace("127.0.0.1:7001", "127.0.0.1:notaport"));
        assert!(e.contains("listen"), "{e}");
        let e = error_of(&GOOD.replace("[raft]", "[raft]\nheartbeat_interval_ms = 400"));
        assert!(e.contains("raft.election_timeout_min_ms"), "{e}");
        let e = error_of(&GOOD.replace("0123456789abcdef", "short"));
        assert!(e.contains("cluster_secret: must be at least 16"), "{e}");
        let e = error_of(&GOOD.replace("api_token = \"fedcba9876543210\"", ""));
        assert!(e.contains("api_token: is required"), "{e}");
        let e = error_of(&GOOD.replace("node_id = 2", "node_id = 1"));
        assert!(e.contains("peers.node_id"), "{e}");
        let e = error_of(&GOOD.replace("name = \"node1\"", "name = \"node 1\""));
        assert!(e.contains("name:"), "{e}");
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "0123456789abcdef0123\n").unwrap();
        let text = GOOD.replace(
            "cluster_secret = \"0123456789abcdef\"",
            "cluster_secret_file = \"secret\"",
        );
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        let config = load(&path).unwrap();
        assert_eq!(config.cluster_secret, "0123456789abcdef0123");

        std::fs::remove_file(dir.path().join("secret")).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("secret"), "{e}");
    }
}
