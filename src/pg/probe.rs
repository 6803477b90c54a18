//! Probing PostgreSQL with tokio-postgres: the local instance over its Unix socket (everything:
//! role, timeline, LSNs, WAL receiver, replicas), peers over TCP as the replication user (whether
//! they answer, their role and LSN). Every probe has a deadline: a hung server is "unreachable",
//! never a stuck agent.

use std::time::Duration;

use anyhow::Context;
use raftmgr_raft::summary::parse_lsn;
use raftmgr_raft::{NodeId, Observation, ReplicaStatus};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, SimpleQueryRow};

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgStatus {
    pub in_recovery: bool,
    pub timeline: Option<u32>,
    pub lsn: Option<u64>,
    pub replayed_lsn: Option<u64>,
    pub wal_receiver: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
}

impl PgStatus {
    pub fn observation(&self, observer: NodeId, subject: NodeId) -> Observation {
        Observation {
            observer,
            subject,
            reachable: true,
            in_recovery: Some(self.in_recovery),
            timeline: self.timeline,
            lsn: self.lsn,
            replayed_lsn: self.replayed_lsn,
            lag_bytes: None,
            wal_receiver: self.wal_receiver.clone(),
            replicas: self.replicas.clone(),
        }
    }
}

pub fn unreachable(observer: NodeId, subject: NodeId) -> Observation {
    Observation {
        observer,
        subject,
        reachable: false,
        in_recovery: None,
        timeline: None,
        lsn: None,
        replayed_lsn: None,
        lag_bytes: None,
        wal_receiver: None,
        replicas: vec![],
    }
}

/// Connects with `conninfo` within `timeout`.
pub async fn connect(conninfo: &str, timeout: Duration) -> anyhow::Result<Client> {
    let mut config: tokio_postgres::Config = conninfo.parse().context("bad conninfo")?;
    config.connect_timeout(timeout);
    let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .context("connecting timed out")??;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

const STATUS_SQL: &str = "\
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       (SELECT timeline_id FROM pg_control_checkpoint()),
       (SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1),
       (SELECT status FROM pg_stat_wal_receiver LIMIT 1)";

const REPLICAS_SQL: &str = "\
SELECT application_name, state, sync_state, replay_lsn::text,
       (EXTRACT(EPOCH FROM replay_lag) * 1000)::bigint
FROM pg_stat_replication ORDER BY application_name";

/// The timeline a WAL file name starts with (eight hex digits), e.g. 2 for
/// `000000020000000000000003`.
pub fn timeline_of_walfile(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(0..8)?, 16).ok()
}

/// The full status of a PostgreSQL, including `pg_stat_replication` when `with_replicas`.
pub async fn status(
    client: &Client,
    with_replicas: bool,
    timeout: Duration,
) -> anyhow::Result<PgStatus> {
    tokio::time::timeout(timeout, query_status(client, with_replicas))
        .await
        .context("probe query timed out")?
}

async fn query_status(client: &Client, with_replicas: bool) -> anyhow::Result<PgStatus> {
    let row = one_row(client, STATUS_SQL).await?;
    let in_recovery = boolean(row.get(0)).context("pg_is_in_recovery()")?;
    let number = |i: usize| row.get(i).and_then(|t| t.parse::<u32>().ok());
    let checkpoint_timeline = number(5);
    let receiver_timeline = number(6);

    let timeline = if in_recovery {
        receiver_timeline.or(checkpoint_timeline)
    } else {
        // The WAL file name starts with the timeline in hex; the checkpoint's can lag behind a
        // promotion until the next checkpoint.
        row.get(2)
            .and_then(timeline_of_walfile)
            .or(checkpoint_timeline)
    };
    let (current, received, replayed) = (row.get(1), row.get(3), row.get(4));
    let lsn = if in_recovery {
        received.or(replayed)
    } else {
        current
    };
    let mut status = PgStatus {
        in_recovery,
        timeline,
        lsn: lsn.and_then(parse_lsn),
        replayed_lsn: replayed.and_then(parse_lsn),
        wal_receiver: row.get(7).map(str::to_string),
        replicas: Vec::new(),
    };
    if with_replicas {
        for row in rows(client, REPLICAS_SQL).await? {
            let text = |i: usize| row.get(i).unwrap_or_default().to_string();
            status.replicas.push(ReplicaStatus {
                name: text(0),
                state: text(1),
                sync_state: text(2),
                replay_lsn: row.get(3).and_then(parse_lsn),
                replay_lag_ms: row
                    .get(4)
                    .and_then(|ms| ms.parse::<i64>().ok())
                    .map(|ms| ms.max(0) as u64),
            });
        }
    }
    Ok(status)
}

/// The rows `sql` returns, in one round trip: the simple query protocol, columns as text. (A
/// query with parameters, or `query` with a string, first prepares the statement: a second
/// round trip, which on a busy host costs a failover milliseconds at every question.)
async fn rows(client: &Client, sql: &str) -> anyhow::Result<Vec<SimpleQueryRow>> {
    let messages = client.simple_query(sql).await?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .collect())
}

/// The first row `sql` returns, in one round trip (see `rows`).
pub async fn one_row(client: &Client, sql: &str) -> anyhow::Result<SimpleQueryRow> {
    rows(client, sql)
        .await?
        .into_iter()
        .next()
        .with_context(|| format!("no row from {sql:?}"))
}

/// A boolean column as the simple query protocol sends it: `t` or `f`.
pub fn boolean(text: Option<&str>) -> anyhow::Result<bool> {
    match text {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        other => anyhow::bail!("expected a boolean, got {other:?}"),
    }
}
