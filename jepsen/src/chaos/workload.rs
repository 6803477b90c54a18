//! The clients and the observer of a chaos run.
//!
//! Two writers insert unique ids, each the way a real client would find the primary: one through
//! libpq's multi-host conninfo with `target_session_attrs=read-write`, one through the node whose
//! `GET /primary` answers 200 (what HAProxy does). Every attempt is recorded with its outcome.
//! The observer polls every agent's committed state and events, recording each new generation and
//! every applied event by event index.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftmgr_api::ClusterView;
use raftmgr_raft::state::RecordedEvent;
use raftmgr_raft::NodeId;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

use super::history::{GenerationSeen, Outcome, Write};
use crate::cluster::LocalCluster;

/// How often each writer inserts while it has a connection.
const WRITE_INTERVAL: Duration = Duration::from_millis(20);
/// A statement or a connection without an answer in this long is given up on.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the observer polls every agent.
const OBSERVE_INTERVAL: Duration = Duration::from_millis(100);
/// How long one poll of one agent may take.
const POLL_TIMEOUT: Duration = Duration::from_millis(400);

pub const CREATE_TABLE: &str = "CREATE TABLE jepsen (id bigint PRIMARY KEY)";
/// The insert returns who acknowledged it and on which timeline (the first 8 hex digits of the
/// current WAL file's name).
const INSERT: &str = "INSERT INTO jepsen (id) VALUES ($1) \
    RETURNING current_setting('cluster_name'), \
    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int";

/// Where each node's PostgreSQL and API are, copied out of the cluster for the tasks.
#[derive(Debug, Clone)]
pub struct Addresses {
    pub pg: BTreeMap<NodeId, String>,
    pub api: BTreeMap<NodeId, String>,
}

impl Addresses {
    pub fn of(cluster: &LocalCluster) -> Addresses {
        let ids = cluster.ids();
        Addresses {
            pg: ids
                .iter()
                .map(|id| (*id, cluster.pg_conninfo(*id)))
                .collect(),
            api: ids
                .iter()
                .map(|id| (*id, cluster.node(*id).api_addr.clone()))
                .collect(),
        }
    }

    /// libpq's failover conninfo over every node.
    fn multi_host(&self, cluster_hosts: &[(String, u16)]) -> String {
        let hosts: Vec<&str> = cluster_hosts.iter().map(|(h, _)| h.as_str()).collect();
        let ports: Vec<String> = cluster_hosts.iter().map(|(_, p)| p.to_string()).collect();
        format!(
            "host={} port={} user=postgres dbname=postgres target_session_attrs=read-write \
             connect_timeout=1",
            hosts.join(","),
            ports.join(",")
        )
    }
}

/// What the writers and the observer share with the run.
pub struct Recorder {
    origin: Instant,
    stop: AtomicBool,
    next_id: AtomicI64,
    pub writes: Mutex<Vec<Write>>,
    pub observed: Mutex<Observed>,
}

#[derive(Debug, Default)]
pub struct Observed {
    pub generations: Vec<GenerationSeen>,
    pub primary: Option<NodeId>,
    /// The newest generation's committed sync set is not empty.
    pub sync_set_named: bool,
    pub leader: Option<NodeId>,
    pub logs: BTreeMap<String, BTreeMap<u64, String>>,
    pub log_rewrites: Vec<String>,
}

impl Recorder {
    pub fn new(origin: Instant) -> Arc<Recorder> {
        Arc::new(Recorder {
            origin,
            stop: AtomicBool::new(false),
            next_id: AtomicI64::new(1),
            writes: Mutex::new(Vec::new()),
            observed: Mutex::new(Observed::default()),
        })
    }

    pub fn ms(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.origin).as_secs_f64() * 1000.0
    }

    pub fn now_ms(&self) -> f64 {
        self.ms(Instant::now())
    }

    /// Acknowledged writes that started after `after_ms`.
    pub fn acked_since(&self, after_ms: f64) -> usize {
        let writes = self.writes.lock().expect("writes");
        writes
            .iter()
            .filter(|w| w.outcome == Outcome::Ok && w.start_ms >= after_ms)
            .count()
    }

    pub fn last_error(&self) -> Option<String> {
        let writes = self.writes.lock().expect("writes");
        writes.iter().rev().find_map(|w| w.error.clone())
    }
}

/// The background tasks of a run; [`Tasks::stop`] ends them.
pub struct Tasks {
    recorder: Arc<Recorder>,
    handles: Vec<JoinHandle<()>>,
}

impl Tasks {
    pub fn start(
        recorder: Arc<Recorder>,
        addresses: Addresses,
        libpq_hosts: Vec<(String, u16)>,
    ) -> Tasks {
        let conninfo = addresses.multi_host(&libpq_hosts);
        let handles = vec![
            tokio::spawn(write_loop(
                recorder.clone(),
                "libpq",
                Route::Libpq(conninfo),
            )),
            tokio::spawn(write_loop(
                recorder.clone(),
                "api",
                Route::Api(addresses.clone()),
            )),
            tokio::spawn(observe_loop(recorder.clone(), addresses)),
        ];
        Tasks { recorder, handles }
    }

    pub async fn stop(mut self) {
        self.recorder.stop.store(true, Ordering::Relaxed);
        for handle in std::mem::take(&mut self.handles) {
            let _ = handle.await;
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for handle in &self.handles {
            handle.abort();
        }
    }
}

enum Route {
    Libpq(String),
    Api(Addresses),
}

struct Conn {
    client: Client,
    insert: Statement,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(conninfo: &str) -> Result<Conn, String> {
    let attempt = async {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
            .await
            .map_err(|e| format!("connect: {}", chain(&e)))?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        match client.prepare(INSERT).await {
            Ok(insert) => Ok(Conn {
                client,
                insert,
                task,
            }),
            Err(e) => {
                task.abort();
                Err(format!("prepare: {}", chain(&e)))
            }
        }
    };
    timeout(ANSWER_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("connect: no answer within {ANSWER_TIMEOUT:?}")))
}

/// The conninfo of the node whose `GET /primary` answers 200, asking each in turn.
async fn primary_by_api(http: &reqwest::Client, addresses: &Addresses) -> Result<String, String> {
    for (id, api) in &addresses.api {
        let answer = http.get(format!("http://{api}/primary")).send().await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            return Ok(addresses.pg[id].clone());
        }
    }
    Err("no node answers 200 to GET /primary".into())
}

async fn write_loop(recorder: Arc<Recorder>, client: &'static str, route: Route) {
    let http = reqwest::Client::builder()
        .timeout(POLL_TIMEOUT)
        .build()
        .expect("an HTTP client");
    let mut conn: Option<Conn> = None;
    while !recorder.stop.load(Ordering::Relaxed) {
        let id = recorder.next_id.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let mut write = Write {
            id,
            client: client.into(),
            start_ms: recorder.ms(start),
            end_ms: 0.0,
            outcome: Outcome::Failed,
            node: None,
            timeline: None,
            error: None,
        };
        if conn.is_none() {
            let conninfo = match &route {
                Route::Libpq(conninfo) => Ok(conninfo.clone()),
                Route::Api(addresses) => primary_by_api(&http, addresses).await,
            };
            match conninfo {
                Ok(conninfo) => match connect(&conninfo).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => write.error = Some(e),
                },
                Err(e) => write.error = Some(e),
            }
        }
        if let Some(c) = &conn {
            match timeout(ANSWER_TIMEOUT, c.client.query_one(&c.insert, &[&id])).await {
                Ok(Ok(row)) => {
                    write.outcome = Outcome::Ok;
                    write.node = row.try_get::<_, String>(0).ok();
                    write.timeline = row.try_get::<_, i32>(1).ok().map(|t| t as u32);
                }
                Ok(Err(e)) => {
                    // Refused before it could commit, or broken off: may have committed.
                    let refused = e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION);
                    write.outcome = if refused {
                        Outcome::Failed
                    } else {
                        Outcome::Unknown
                    };
                    write.error = Some(format!("insert: {}", chain(&e)));
                }
                Err(_) => {
                    write.outcome = Outcome::Unknown;
                    write.error = Some(format!("insert: no answer within {ANSWER_TIMEOUT:?}"));
                }
            }
        }
        write.end_ms = recorder.now_ms();
        let ok = write.outcome == Outcome::Ok;
        if !ok {
            conn = None;
        }
        recorder.writes.lock().expect("writes").push(write);
        if ok {
            tokio::time::sleep_until(start + WRITE_INTERVAL).await;
        } else {
            sleep(WRITE_INTERVAL).await;
        }
    }
}

fn chain(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

async fn observe_loop(recorder: Arc<Recorder>, addresses: Addresses) {
    let http = reqwest::Client::builder()
        .timeout(POLL_TIMEOUT)
        .build()
        .expect("an HTTP client");
    while !recorder.stop.load(Ordering::Relaxed) {
        let next = Instant::now() + OBSERVE_INTERVAL;
        let polls = addresses.api.iter().map(|(id, api)| {
            let http = http.clone();
            async move {
                let view = get::<ClusterView>(&http, api, "/cluster").await;
                let events = get::<Vec<RecordedEvent>>(&http, api, "/events").await;
                (*id, view, events)
            }
        });
        let answers = futures::future::join_all(polls).await;
        let seen_ms = recorder.now_ms();
        {
            let mut observed = recorder.observed.lock().expect("observed");
            for (id, view, events) in answers {
                if let Some(view) = view {
                    note_view(&mut observed, &view, seen_ms);
                }
                if let Some(events) = events {
                    note_events(&mut observed, &format!("node{id}"), &events);
                }
            }
        }
        tokio::time::sleep_until(next).await;
    }
}

async fn get<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    api: &str,
    path: &str,
) -> Option<T> {
    let answer = http.get(format!("http://{api}{path}")).send().await.ok()?;
    answer.json().await.ok()
}

fn note_view(observed: &mut Observed, view: &ClusterView, seen_ms: f64) {
    let generation = view.state.generation;
    let newest = observed.generations.last().map(|g| g.generation);
    if newest.is_none_or(|n| generation > n) {
        observed.generations.push(GenerationSeen {
            generation,
            primary: view.state.primary.map(|p| format!("node{p}")),
            seen_ms,
        });
    }
    if newest.is_none_or(|n| generation >= n) {
        observed.primary = view.state.primary;
        observed.sync_set_named = !view.state.sync_set.is_empty();
    }
    if view.raft.state == "Leader" {
        observed.leader = Some(view.node.id);
    }
}

fn note_events(observed: &mut Observed, node: &str, events: &[RecordedEvent]) {
    let log = observed.logs.entry(node.to_string()).or_default();
    let mut rewrites = Vec::new();
    for e in events {
        let text = serde_json::to_string(&(&e.event, &e.outcome)).unwrap_or_default();
        match log.get(&e.event_index) {
            Some(before) if *before != text => rewrites.push(format!(
                "{node} applied {before} at event index {}, later {text}",
                e.event_index
            )),
            Some(_) => {}
            None => {
                log.insert(e.event_index, text);
            }
        }
    }
    observed.log_rewrites.extend(rewrites);
}
