//! The node's TOML configuration: parsing and validation are pure functions, so every rule is
//! unit-tested. Unknown keys are refused with their name; bad values with the key that holds them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raftmgr_raft::{Member, NodeId};
use serde::{Deserialize, Serialize};

/// The exit code for an invalid configuration (sysexits EX_USAGE).
pub const EXIT_INVALID_CONFIG: i32 = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The PostgreSQL instance this agent manages. Without it the agent is a Raft member only
    /// (it votes and stores the log, like a witness).
    #[serde(default)]
    pub postgres: Option<PostgresSection>,
    /// Lease and failover timing; the same on every node.
    #[serde(default)]
    pub failover: FailoverSection,
    /// TLS for the API and Raft ports, and for every call between agents. Without it both
    /// ports speak plain HTTP. Every node of a cluster must have it, or none.
    #[serde(default)]
    pub tls: Option<TlsSection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// This node's certificate (PEM; the chain after it may follow), served on both ports and
    /// presented to peers as its client certificate on Raft calls. It must name the host of
    /// `raft.advertise` and `api.advertise` (DNS or IP subject alternative name).
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The CA bundle (PEM) that peers' certificates, server and client, are checked against;
    /// the CLI trusts it too when it reads this file.
    pub ca_file: PathBuf,
    /// Client certificates on the Raft port: `required` (mutual TLS between agents, the
    /// default), `optional` (checked when presented) or `none`.
    #[serde(default = "defaults::raft_verify_client")]
    pub raft_verify_client: VerifyClient,
    /// Client certificates on the API port (Patroni's `restapi.verify_client`): `none` (the
    /// default), `optional` or `required`.
    #[serde(default = "defaults::api_verify_client")]
    pub api_verify_client: VerifyClient,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyClient {
    None,
    Optional,
    Required,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverSection {
    /// How long a committed lease renewal lets the primary take writes, on its own clock.
    pub lease_ttl_ms: u64,
    /// How often the primary renews its lease; at most half the TTL.
    pub lease_renew_interval_ms: u64,
    /// Clock-rate difference allowed between nodes, in percent of the TTL.
    pub lease_drift_percent: u64,
    /// Added to the drift-adjusted TTL before the leader may promote.
    pub lease_margin_ms: u64,
    /// A candidate further than this behind the old primary's last known LSN is not promoted.
    pub maximum_lag_on_failover_bytes: u64,
    /// How often the Raft leader checks whether a failover is due.
    pub decide_interval_ms: u64,
    /// A standby that follows the primary but has not streamed for this long is rewound.
    pub rewind_after_ms: u64,
    /// `off`, `on` or `strict` (Patroni's meanings): with `on`, the primary waits for one
    /// synchronous standby when one streams, and only it may be promoted; `strict` also blocks
    /// writes while no standby can be synchronous.
    pub synchronous_mode: SynchronousMode,
    /// When pg_rewind fails, move the data directory aside and clone the node again from the
    /// primary (nothing is deleted); otherwise retry pg_rewind and wait for a human.
    pub reclone_on_rewind_failure: bool,
    /// Test only: never fence on a lost lease (no watchdog, no lease guard). It exists so that
    /// the chaos lab can show its split-brain checker catching what fencing prevents.
    pub unsafe_no_fencing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynchronousMode {
    Off,
    On,
    Strict,
}

impl Default for FailoverSection {
    fn default() -> Self {
        FailoverSection {
            lease_ttl_ms: 1200,
            lease_renew_interval_ms: 400,
            lease_drift_percent: 10,
            lease_margin_ms: 150,
            maximum_lag_on_failover_bytes: 16 * 1024 * 1024,
            decide_interval_ms: 100,
            rewind_after_ms: 5000,
            synchronous_mode: SynchronousMode::Off,
            reclone_on_rewind_failure: true,
            unsafe_no_fencing: false,
        }
    }
}

impl FailoverSection {
    /// How long the leader waits without a renewal before it may promote:
    /// `ttl × (1 + drift) + margin`.
    pub fn lease_timeout_ms(&self) -> u64 {
        self.lease_ttl_ms
            + self.lease_ttl_ms * self.lease_drift_percent / 100
            + self.lease_margin_ms
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// The PostgreSQL data directory.
    pub data_directory: PathBuf,
    /// Where initdb, pg_ctl, pg_basebackup, pg_rewind live (default: `pg_config --bindir`, else
    /// /usr/lib/postgresql/15/bin).
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// `listen_addresses` (default 127.0.0.1).
    #[serde(default = "defaults::pg_listen_address")]
    pub listen_address: String,
    #[serde(default = "defaults::pg_port")]
    pub port: u16,
    /// The Unix socket folder (default: `<data_dir>/socket`); one per node, since nodes on one
    /// machine share the filesystem.
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
    /// `host=... port=...` other nodes use to reach this PostgreSQL (default: listen_address and
    /// port).
    #[serde(default)]
    pub conninfo: Option<String>,
    /// The OS user that owns the data and runs PostgreSQL's programs when the agent runs as root
    /// (PostgreSQL refuses root). Ignored when the agent is not root: it runs them as itself.
    #[serde(default = "defaults::pg_os_user")]
    pub os_user: String,
    /// The database superuser the agent connects as (over the Unix socket, peer authentication).
    #[serde(default = "defaults::pg_superuser")]
    pub superuser: String,
    /// The role standbys replicate with (and peers probe with); the same on every node.
    #[serde(default = "defaults::pg_replication_user")]
    pub replication_user: String,
    /// Its password: give this or `replication_password_file`.
    #[serde(default)]
    pub replication_password: Option<String>,
    #[serde(default)]
    pub replication_password_file: Option<PathBuf>,
    /// Addresses (CIDR) allowed to connect for replication and probes, written to pg_hba.conf.
    #[serde(default = "defaults::pg_allowed_cidrs")]
    pub allowed_cidrs: Vec<String>,
    /// Higher wins among failover candidates with the same LSN.
    #[serde(default = "defaults::pg_priority")]
    pub priority: u32,
    /// Never promote this node.
    #[serde(default)]
    pub nofailover: bool,
    /// Never make this node a synchronous standby.
    #[serde(default)]
    pub nosync: bool,
    /// PostgreSQL's `archive_command` (with `%p`/`%f`); sets `archive_mode = on`. The primary
    /// archives its WAL, so that a former primary can be rewound after its own WAL is gone.
    #[serde(default)]
    pub archive_command: Option<String>,
    /// PostgreSQL's `restore_command` (with `%f` and `%p`), fetching WAL from that archive. When
    /// set, pg_rewind runs with `--restore-target-wal`: WAL the former primary no longer has in
    /// pg_wal comes from the archive instead of forcing a re-clone.
    #[serde(default)]
    pub restore_command: Option<String>,
    /// The most WAL, in MiB, the primary keeps for a node that does not stream
    /// (`max_slot_wal_keep_size`; 0: no limit). Every node has a replication slot on the
    /// primary, made at the latest when the primary is promoted, so that a node that returns
    /// (a former primary to be rewound included) finds the WAL it needs. A node away for longer
    /// loses its slot and must be cloned again (`raftmgr node reinitialize`).
    #[serde(default = "defaults::max_slot_wal_keep_size_mb")]
    pub max_slot_wal_keep_size_mb: u64,
    /// How often the agent probes its own PostgreSQL.
    #[serde(default = "defaults::probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// How often it probes the other nodes' PostgreSQL.
    #[serde(default = "defaults::peer_probe_interval_ms")]
    pub peer_probe_interval_ms: u64,
    /// An unchanged observation is still recorded this often (LSNs, lag), so the log shows
    /// progress without recording every probe.
    #[serde(default = "defaults::health_summary_interval_ms")]
    pub health_summary_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// `host:port` the HTTP API listens on.
    pub listen: SocketAddr,
    /// `host:port` others use to reach it (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Requests the API serves per second on average; more wait for their turn (0: no limit).
    /// A flood of checks must not take the CPU a failover needs.
    #[serde(default = "defaults::api_max_requests_per_s")]
    pub max_requests_per_s: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub node_id: NodeId,
    pub raft_addr: String,
    pub api_addr: String,
}

pub mod defaults {
    use super::VerifyClient;

    pub fn raft_verify_client() -> VerifyClient {
        VerifyClient::Required
    }
    pub fn api_verify_client() -> VerifyClient {
        VerifyClient::None
    }
    pub fn api_max_requests_per_s() -> u32 {
        20_000
    }
    pub fn heartbeat_interval_ms() -> u64 {
        100
    }
    /// A follower that knows a leader starts an election only after openraft's leader lease
    /// (= the max) plus its random timeout: 0.9–1.2 s after the last heartbeat with these. That
    /// keeps a lost Raft leader's replacement inside the primary's lease timeout (1.47 s), so a
    /// lost node that led both is replaced on the lease, not on the election (500/1000 took
    /// 1.5–2.0 s).
    pub fn election_timeout_min_ms() -> u64 {
        300
    }
    pub fn election_timeout_max_ms() -> u64 {
        600
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
    pub fn pg_listen_address() -> String {
        "127.0.0.1".into()
    }
    pub fn pg_port() -> u16 {
        5432
    }
    pub fn pg_os_user() -> String {
        "postgres".into()
    }
    pub fn pg_superuser() -> String {
        "postgres".into()
    }
    pub fn pg_replication_user() -> String {
        "raftmgr_replication".into()
    }
    pub fn pg_allowed_cidrs() -> Vec<String> {
        vec!["127.0.0.1/32".into()]
    }
    pub fn pg_priority() -> u32 {
        100
    }
    pub fn max_slot_wal_keep_size_mb() -> u64 {
        4096
    }
    pub fn probe_interval_ms() -> u64 {
        250
    }
    pub fn peer_probe_interval_ms() -> u64 {
        2000
    }
    pub fn health_summary_interval_ms() -> u64 {
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
    pub postgres: Option<PgSettings>,
    /// The `[tls]` section's files, loaded and checked.
    pub tls: Option<crate::tls::NodeTls>,
}

/// The `[postgres]` section with defaults resolved and the password read.
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub section: PostgresSection,
    pub bin_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub conninfo: String,
    pub replication_password: String,
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

    /// `https` with a `[tls]` section, else `http`: the scheme of both ports, on every node.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn proposal_timeout(&self) -> Duration {
        Duration::from_millis(self.file.raft.proposal_timeout_ms)
    }

    /// The effective configuration for `GET /config`: the file with its defaults and derived
    /// values filled in, and every secret replaced by [`REDACTED`] — wherever it appears, so
    /// that a password pasted into a conninfo is hidden too.
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut file = self.file.clone();
        file.raft.advertise = Some(self.raft_advertise());
        file.api.advertise = Some(self.api_advertise());
        if let (Some(section), Some(pg)) = (&mut file.postgres, &self.postgres) {
            section.bin_dir = Some(pg.bin_dir.clone());
            section.socket_dir = Some(pg.socket_dir.clone());
            section.conninfo = Some(pg.conninfo.clone());
        }
        let mut value =
            serde_json::to_value(&file).expect("the configuration's types serialize to JSON");
        let mut secrets = vec![self.cluster_secret.as_str(), self.api_token.as_str()];
        if let Some(pg) = &self.postgres {
            secrets.push(&pg.replication_password);
        }
        redact(&mut value, &secrets);
        value
    }
}

/// What `GET /config` shows in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// Replaces every string that contains one of `secrets` with [`REDACTED`].
fn redact(value: &mut serde_json::Value, secrets: &[&str]) {
    match value {
        serde_json::Value::String(text)
            if secrets.iter().any(|s| !s.is_empty() && text.contains(s)) =>
        {
            *text = REDACTED.into();
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| redact(v, secrets)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|v| redact(v, secrets)),
        _ => {}
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
    let postgres = match &file.postgres {
        None => None,
        Some(pg) => Some(PgSettings {
            bin_dir: resolve_bin_dir(&shown, pg)?,
            socket_dir: pg
                .socket_dir
                .clone()
                .unwrap_or_else(|| file.data_dir.join("socket")),
            conninfo: pg
                .conninfo
                .clone()
                .unwrap_or_else(|| format!("host={} port={}", pg.listen_address, pg.port)),
            replication_password: secret(
                &shown,
                base,
                "postgres.replication_password",
                &pg.replication_password,
                &pg.replication_password_file,
            )?,
            section: pg.clone(),
        }),
    };
    let tls = match &file.tls {
        None => None,
        Some(section) => {
            Some(
                crate::tls::load(base, section).map_err(|e| ConfigError::Invalid {
                    path: shown.clone(),
                    key: e.key,
                    message: e.message,
                })?,
            )
        }
    };
    Ok(NodeConfig {
        file,
        cluster_secret,
        api_token,
        postgres,
        tls,
    })
}

/// The configured bin_dir, else `pg_config --bindir`, else Debian's PostgreSQL 15 folder; it must
/// hold the programs the agent runs.
fn resolve_bin_dir(path: &str, pg: &PostgresSection) -> Result<PathBuf, ConfigError> {
    let dir = match &pg.bin_dir {
        Some(dir) => dir.clone(),
        None => std::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin")),
    };
    for program in ["initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_rewind"] {
        if !dir.join(program).is_file() {
            return Err(ConfigError::Invalid {
                path: path.to_string(),
                key: "postgres.bin_dir",
                message: format!("{} has no {program}", dir.display()),
            });
        }
    }
    Ok(dir)
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
    if let Some(pg) = &c.postgres {
        validate_postgres(pg)?;
    }
    let f = &c.failover;
    if f.lease_ttl_ms < 100 {
        return Err((
            "failover.lease_ttl_ms",
            format!("({}) must be at least 100", f.lease_ttl_ms),
        ));
    }
    if f.lease_renew_interval_ms == 0 || f.lease_renew_interval_ms * 2 > f.lease_ttl_ms {
        return Err((
            "failover.lease_renew_interval_ms",
            format!(
                "({}) must be positive and at most half of failover.lease_ttl_ms ({}), \
                 so that one lost renewal does not fence the primary",
                f.lease_renew_interval_ms, f.lease_ttl_ms
            ),
        ));
    }
    if f.lease_renew_interval_ms < r.heartbeat_interval_ms {
        return Err((
            "failover.lease_renew_interval_ms",
            format!(
                "({}) must be at least raft.heartbeat_interval_ms ({})",
                f.lease_renew_interval_ms, r.heartbeat_interval_ms
            ),
        ));
    }
    if f.decide_interval_ms == 0 || f.decide_interval_ms > f.lease_ttl_ms {
        return Err((
            "failover.decide_interval_ms",
            format!(
                "({}) must be positive and at most failover.lease_ttl_ms",
                f.decide_interval_ms
            ),
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

fn validate_postgres(pg: &PostgresSection) -> Result<(), (&'static str, String)> {
    if pg.data_directory.as_os_str().is_empty() || !pg.data_directory.is_absolute() {
        return Err((
            "postgres.data_directory",
            format!("{} must be an absolute path", pg.data_directory.display()),
        ));
    }
    if pg.port == 0 {
        return Err(("postgres.port", "must be a port number, 1-65535".into()));
    }
    match (&pg.replication_password, &pg.replication_password_file) {
        (None, None) => {
            return Err((
                "postgres.replication_password",
                "is required (or postgres.replication_password_file)".into(),
            ))
        }
        (Some(_), Some(_)) => {
            return Err((
                "postgres.replication_password",
                "give replication_password or replication_password_file, not both".into(),
            ))
        }
        _ => {}
    }
    for (key, value) in [
        ("postgres.superuser", &pg.superuser),
        ("postgres.replication_user", &pg.replication_user),
        ("postgres.os_user", &pg.os_user),
    ] {
        if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((key, format!("{value:?} must be letters, digits or '_'")));
        }
    }
    if let Some(command) = &pg.archive_command {
        if !command.contains("%p") && !command.contains("%f") {
            return Err((
                "postgres.archive_command",
                format!("{command:?} names neither %p (the file's path) nor %f (its name)"),
            ));
        }
    }
    if let Some(command) = &pg.restore_command {
        if !command.contains("%p") || !command.contains("%f") {
            return Err((
                "postgres.restore_command",
                format!("{command:?} must name %f (the file wanted) and %p (where to copy it)"),
            ));
        }
    }
    for cidr in &pg.allowed_cidrs {
        let (address, bits) = cidr.split_once('/').unwrap_or((cidr, ""));
        let ok = address.parse::<std::net::IpAddr>().is_ok() && bits.parse::<u8>().is_ok();
        if !ok {
            return Err((
                "postgres.allowed_cidrs",
                format!("{cidr:?} is not an address/bits range like 10.0.0.0/24"),
            ));
        }
    }
    for (key, value) in [
        ("postgres.probe_interval_ms", pg.probe_interval_ms),
        ("postgres.peer_probe_interval_ms", pg.peer_probe_interval_ms),
        (
            "postgres.health_summary_interval_ms",
            pg.health_summary_interval_ms,
        ),
    ] {
        if value < 50 {
            return Err((key, format!("({value}) must be at least 50")));
        }
    }
    if pg.max_slot_wal_keep_size_mb > i32::MAX as u64 {
        return Err((
            "postgres.max_slot_wal_keep_size_mb",
            format!(
                "({}) is more than PostgreSQL takes ({}); 0 means no limit",
                pg.max_slot_wal_keep_size_mb,
                i32::MAX
            ),
        ));
    }
    if pg.health_summary_interval_ms < pg.probe_interval_ms {
        return Err((
            "postgres.health_summary_interval_ms",
            format!(
                "({}) must be at least postgres.probe_interval_ms ({})",
                pg.health_summary_interval_ms, pg.probe_interval_ms
            ),
        ));
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
    fn the_tuned_profile_in_the_configuration_reference_is_valid() {
        let reference = include_str!("../docs/configuration.md");
        let profile = reference
            .split("### Faster failover on a quiet LAN")
            .nth(1)
            .and_then(|section| section.split("```toml").nth(1))
            .and_then(|block| block.split("```").next())
            .expect("the reference has the profile as a toml block");
        let mut config: toml::Table = GOOD.parse().unwrap();
        for (name, values) in profile.parse::<toml::Table>().unwrap() {
            let section = config
                .entry(name)
                .or_insert_with(|| toml::Table::new().into())
                .as_table_mut()
                .unwrap();
            section.extend(values.as_table().unwrap().clone());
        }
        let c = parse("node.toml", &config.to_string()).unwrap();
        assert_eq!(c.failover.lease_timeout_ms(), 760, "as the reference says");
        assert_eq!(c.raft.heartbeat_interval_ms, 50);
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = parse("node.toml", GOOD).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(
            c.raft.heartbeat_interval_ms,
            defaults::heartbeat_interval_ms()
        );
        assert_eq!(c.api.max_requests_per_s, 20_000);
        assert_eq!(c.peers.len(), 1);
        let unlimited = GOOD.replace("[api]", "[api]\nmax_requests_per_s = 0");
        assert_eq!(
            parse("node.toml", &unlimited)
                .unwrap()
                .api
                .max_requests_per_s,
            0
        );
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
        let e = error_of(&GOOD.replace("[api]", "[api]\nmax_requests_per_s = -1"));
        assert!(e.contains("max_requests_per_s"), "{e}");
    }

    const PG: &str = r#"
[postgres]
data_directory = "/tmp/raftmgr/node1/pgdata"
port = 5433
replication_password = "secret-password"
"#;

    #[test]
    fn the_postgres_section_is_checked() {
        let c = parse("node.toml", &format!("{GOOD}{PG}")).unwrap();
        let pg = c.postgres.unwrap();
        assert_eq!(pg.replication_user, "raftmgr_replication");
        assert_eq!(pg.probe_interval_ms, defaults::probe_interval_ms());

        let e = error_of(&format!(
            "{GOOD}{}",
            PG.replace("port = 5433", "port = 5433\nwal_level = 1")
        ));
        assert!(e.contains("unknown field `wal_level`"), "{e}");
        let e = error_of(&format!(
            "{GOOD}{}",
            PG.replace("/tmp/raftmgr/node1/pgdata", "pgdata")
        ));
        assert!(e.contains("postgres.data_directory"), "{e}");
        let e = error_of(&format!(
            "{GOOD}{}",
            PG.replace("replication_password = \"secret-password\"", "")
        ));
        assert!(
            e.contains("postgres.replication_password: is required"),
            "{e}"
        );
        let e = error_of(&format!("{GOOD}{PG}allowed_cidrs = [\"10.0.0.0\"]\n"));
        assert!(e.contains("postgres.allowed_cidrs"), "{e}");
        let e = error_of(&format!("{GOOD}{PG}restore_command = \"cp /a/%f\"\n"));
        assert!(e.contains("postgres.restore_command"), "{e}");
        let e = error_of(&format!("{GOOD}{PG}archive_command = \"true\"\n"));
        assert!(e.contains("postgres.archive_command"), "{e}");
        assert_eq!(pg.max_slot_wal_keep_size_mb, 4096);
        let e = error_of(&format!(
            "{GOOD}{PG}max_slot_wal_keep_size_mb = 4294967296\n"
        ));
        assert!(
            e.contains("postgres.max_slot_wal_keep_size_mb: (4294967296) is more than"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_bindir_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, format!("{GOOD}{PG}bin_dir = \"/nonexistent/bin\"\n")).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("postgres.bin_dir: /nonexistent/bin has no initdb"),
            "{e}"
        );
    }

    #[test]
    fn the_effective_configuration_hides_every_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "token-from-a-file-0123\n").unwrap();
        let text = format!(
            "{}{PG}conninfo = \"host=10.0.0.1 password=secret-password\"\n",
            GOOD.replace(
                "api_token = \"fedcba9876543210\"",
                "api_token_file = \"token\""
            )
        );
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        let config = load(&path).unwrap();

        let json = config.redacted_json();
        let text = json.to_string();
        for secret in [
            "0123456789abcdef",
            "token-from-a-file-0123",
            "secret-password",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(json["cluster_secret"], REDACTED);
        assert_eq!(json["api_token"], serde_json::Value::Null);
        assert_eq!(json["api_token_file"], "token");
        assert_eq!(json["postgres"]["replication_password"], REDACTED);
        assert_eq!(json["postgres"]["conninfo"], REDACTED);
        // Defaults and derived values are filled in.
        assert_eq!(json["raft"]["advertise"], "127.0.0.1:7001");
        assert_eq!(json["raft"]["heartbeat_interval_ms"], 100);
        assert_eq!(json["failover"]["synchronous_mode"], "off");
        assert_eq!(json["postgres"]["port"], 5433);
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

    const TLS: &str = r#"
[tls]
cert_file = "node1.crt"
key_file = "node1.key"
ca_file = "ca.crt"
"#;

    #[test]
    fn the_tls_section_asks_for_client_certificates_on_the_raft_port_only() {
        let c = parse("node.toml", &format!("{GOOD}{TLS}")).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.raft_verify_client, VerifyClient::Required);
        assert_eq!(tls.api_verify_client, VerifyClient::None);
        assert!(parse("node.toml", GOOD).unwrap().tls.is_none());

        let e = error_of(&format!("{GOOD}{TLS}api_verify_client = \"yes\"\n"));
        assert!(
            e.contains("api_verify_client") && e.contains("unknown variant `yes`"),
            "{e}"
        );
        let e = error_of(&format!(
            "{GOOD}{}",
            TLS.replace("ca_file = \"ca.crt\"\n", "")
        ));
        assert!(e.contains("missing field `ca_file`"), "{e}");
    }

    #[test]
    fn tls_files_are_read_relative_to_the_configuration_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = raftmgr_jepsen::tls::TestCa::new("test CA").unwrap();
        let issued = ca.issue("node1", &["127.0.0.1".parse().unwrap()]).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("node1.crt"), &issued.cert_pem).unwrap();
        std::fs::write(dir.path().join("node1.key"), &issued.key_pem).unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, format!("{GOOD}{TLS}")).unwrap();
        let config = load(&path).unwrap();
        assert!(config.tls.is_some());
        assert_eq!(config.scheme(), "https");
        assert_eq!(
            config.redacted_json()["tls"]["raft_verify_client"],
            "required"
        );

        // The key file holds the certificate, not a key.
        std::fs::write(dir.path().join("node1.key"), &issued.cert_pem).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("tls.key_file") && e.contains("node1.key"), "{e}");
        std::fs::remove_file(dir.path().join("node1.key")).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("tls.key_file: cannot read"), "{e}");
    }
}
