//! `bench-failover`: write unavailability during automatic failover, as a client sees it, lost
//! acknowledged writes, and the time the old primary takes to come back as a standby.
//!
//! Each run starts a fresh three-node cluster with real PostgreSQL, creates a table on the
//! primary and starts a writer: one tokio task inserting one row every 20 ms through a multi-host
//! conninfo (`host=<every node's socket folder> … target_session_attrs=read-write`) that finds the
//! primary on its own, reconnecting after any error. After 3 s the fault is injected:
//!
//! * `kill-postmaster`: `kill -9` of the primary's postmaster; its agent lives and resigns.
//! * `kill-node`: `kill -9` of the primary's agent and then of its postmaster; failover waits for
//!   the lease to run out. 2 s after the new primary is up the old node's agent is restarted.
//! * `switchover`: no fault; `POST /switchover` with `{"candidate": "node2"}` (sent to node 3's
//!   API). The "fault" instant is the moment the request is sent.
//!
//! Write unavailability is the longest gap between consecutive acknowledged inserts from the last
//! acknowledgement before the fault on (normally the one gap that contains the fault time).
//! Rejoin time runs from the promotion (kill-postmaster), the agent's restart (kill-node) or the
//! request (switchover) until the new primary's view shows the old node and the other standby
//! streaming from it.
//!
//! `rewind-vs-reclone` is different (see [`rejoin_bench`]): no writer; about 1 GB of data, which
//! the standbys replay and write to disk (a restartpoint each, unless `--crash-unsettled`), a
//! node crash of the primary, a few MB written on the new primary, then the old primary's agent
//! is restarted and rejoins by pg_rewind, or (in separate runs, its pg_wal emptied first) by a
//! re-clone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use raftmgr_api::ClusterView;
use raftmgr_raft::{Event, NodeId, RejoinMethod};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_postgres::{Client, NoTls, Statement};

use crate::bench::{default_binary, Stat};
use crate::cluster::{LocalCluster, Options};
use crate::wait;

/// The writer sends one insert this often (and retries this often after an error).
const WRITE_INTERVAL: Duration = Duration::from_millis(20);
/// An insert unanswered this long counts as "unknown".
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);
/// The whole multi-host connect (each host's socket connect has `connect_timeout=1`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the writer runs before the fault.
const WARM_UP: Duration = Duration::from_secs(3);
/// How long the writer must have been acknowledged after the promotion before it stops.
const WRITES_AFTER_PROMOTION: Duration = Duration::from_secs(3);
/// kill-node: how long after the promotion the old node's agent is restarted.
const RESTART_DELAY: Duration = Duration::from_secs(2);
const PROMOTION_TIMEOUT: Duration = Duration::from_secs(60);
const REJOIN_TIMEOUT: Duration = Duration::from_secs(120);
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How many error messages a run keeps for the report.
const ERRORS_KEPT: usize = 4;

const INSERT: &str = "INSERT INTO bench(id, at) VALUES ($1, now())";

/// The project's targets, shown next to the summary (medians, in ms).
const TARGET_FAST_PATH_MS: f64 = 500.0;
const TARGET_LEASE_PATH_MS: f64 = 2000.0;
const TARGET_REJOIN_MS: f64 = 1500.0;
const TARGET_SWITCHOVER_MS: f64 = 1000.0;
/// rewind-vs-reclone: the re-clone of ~1 GB may take a while.
const RECLONE_TIMEOUT: Duration = Duration::from_secs(900);
/// The switchover's candidate.
const SWITCHOVER_CANDIDATE: NodeId = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// `kill -9` of the primary's postmaster; its agent stays up and resigns (fast path).
    KillPostmaster,
    /// `kill -9` of the primary's agent and postmaster (lease path); the agent is restarted.
    KillNode,
    /// A planned switchover to node 2 through `POST /switchover`.
    Switchover,
    /// Rejoin of a crashed primary with ~1 GB of data: pg_rewind versus re-clone (slow; not run
    /// unless named).
    RewindVsReclone,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::KillPostmaster => "kill-postmaster",
            Scenario::KillNode => "kill-node",
            Scenario::Switchover => "switchover",
            Scenario::RewindVsReclone => "rewind-vs-reclone",
        }
    }

    fn target_ms(self) -> f64 {
        match self {
            Scenario::KillPostmaster => TARGET_FAST_PATH_MS,
            Scenario::KillNode => TARGET_LEASE_PATH_MS,
            Scenario::Switchover => TARGET_SWITCHOVER_MS,
            Scenario::RewindVsReclone => f64::NAN,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchFailoverArgs {
    /// The raftmgr binary [default: `raftmgr` next to this executable].
    #[arg(long)]
    pub raftmgr: Option<PathBuf>,
    /// Which scenario [default: kill-postmaster, kill-node and switchover; rewind-vs-reclone only
    /// when named].
    #[arg(long, value_enum)]
    pub scenario: Option<Scenario>,
    /// How many runs per scenario, each on a fresh cluster [default: 5; rewind-vs-reclone: 3
    /// per path].
    #[arg(long)]
    pub runs: Option<usize>,
    /// rewind-vs-reclone: the size of the table created on the primary before the crash, MiB.
    #[arg(long, default_value_t = 1024)]
    pub data_mb: u64,
    /// rewind-vs-reclone: how much to write on the new primary before the rejoin, MiB (heap).
    #[arg(long, default_value_t = 5)]
    pub divergence_mb: u64,
    /// rewind-vs-reclone: run each node in its own network namespace (root only) and limit what
    /// each sends to this many Mbit/s, e.g. 1000 for a gigabit LAN [default: loopback, no limit].
    #[arg(long)]
    pub link_mbit: Option<u32>,
    /// rewind-vs-reclone: crash the primary as soon as the standbys have replayed the load,
    /// without first letting them write it to disk (a restartpoint, `CHECKPOINT` on each). The
    /// promoted standby's first checkpoint, which pg_rewind and pg_basebackup both wait for,
    /// then flushes the whole load: a crash seconds after 1 GB was written, rather than of a
    /// 1 GB database.
    #[arg(long)]
    pub crash_unsettled: bool,
    /// Copy every node's agent log of every run into this folder (`<scenario>-run<N>-node<id>.log`).
    #[arg(long)]
    pub keep_logs: Option<PathBuf>,
    /// Print the runs and the summary as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// A `key = value` line for every agent's `[raft]` section, e.g. `--raft-setting
    /// 'election_timeout_min_ms = 300'` (repeatable): timing experiments without a rebuild.
    #[arg(long = "raft-setting")]
    pub raft_settings: Vec<String>,
    /// A `key = value` line for every agent's `[failover]` section, e.g. `--failover-setting
    /// 'lease_ttl_ms = 800'` (repeatable).
    #[arg(long = "failover-setting")]
    pub failover_settings: Vec<String>,
    /// A `key = value` line for every agent's `[postgres]` section, e.g. `--postgres-setting
    /// 'bin_dir = "/opt/pg-wrapped"'` (repeatable).
    #[arg(long = "postgres-setting")]
    pub postgres_settings: Vec<String>,
}

/// Runs the benchmark and prints its results.
pub async fn bench_failover(args: BenchFailoverArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs != Some(0), "--runs must be at least 1");
    let binary = match &args.raftmgr {
        Some(path) => path.clone(),
        None => default_binary()?,
    };
    if let Some(dir) = &args.keep_logs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let scenarios = match args.scenario {
        Some(s) => vec![s],
        None => vec![
            Scenario::KillPostmaster,
            Scenario::KillNode,
            Scenario::Switchover,
        ],
    };
    let mut reports = Vec::new();
    for scenario in scenarios {
        if scenario == Scenario::RewindVsReclone {
            reports.push(rejoin_bench(&binary, &args).await);
            continue;
        }
        let total = args.runs.unwrap_or(5);
        let mut runs = Vec::new();
        let mut failures = Vec::new();
        for number in 1..=total {
            eprintln!(
                "{} run {number}/{total}: starting a three-node cluster with PostgreSQL",
                scenario.name(),
            );
            match one_run(&binary, scenario, number, &args).await {
                Ok(run) => {
                    if !args.json {
                        print_run(&run);
                    }
                    runs.push(run);
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    eprintln!("{} run {number} FAILED: {message}", scenario.name());
                    if !args.json {
                        println!("\n{} run {number}: FAILED: {message}", scenario.name());
                    }
                    failures.push(serde_json::json!({ "run": number, "error": message }));
                }
            }
        }
        let summary = ScenarioSummary::of(scenario, &runs, failures.len());
        if !args.json {
            print_summary(&summary);
        }
        reports.push(serde_json::json!({
            "scenario": scenario,
            "runs": runs,
            "failures": failures,
            "summary": summary,
        }));
    }
    if args.json {
        let report = serde_json::json!({ "settings": settings(&args), "scenarios": reports });
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    let failed: usize = reports
        .iter()
        .map(|r| r["failures"].as_array().map_or(0, Vec::len))
        .sum();
    if failed > 0 {
        bail!("{failed} runs failed; see above");
    }
    Ok(())
}

fn settings(args: &BenchFailoverArgs) -> serde_json::Value {
    serde_json::json!({
        "runs_per_scenario": args.runs,
        "data_mb": args.data_mb,
        "divergence_mb": args.divergence_mb,
        "crash_unsettled": args.crash_unsettled,
        "write_interval_ms": millis(WRITE_INTERVAL),
        "statement_timeout_ms": millis(STATEMENT_TIMEOUT),
        "warm_up_ms": millis(WARM_UP),
        "writes_after_promotion_ms": millis(WRITES_AFTER_PROMOTION),
        "kill_node_restart_delay_ms": millis(RESTART_DELAY),
        "raft_settings": args.raft_settings,
        "postgres_settings": args.postgres_settings,
        "failover_settings": args.failover_settings,
    })
}

// ---------------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct RunResult {
    pub scenario: Scenario,
    pub run: usize,
    /// Wall-clock (UTC) time of the fault, to find it in the agents' logs.
    pub fault_utc: String,
    pub old_primary: NodeId,
    pub new_primary: NodeId,
    pub new_generation: u64,
    /// The reason of the promotion decision.
    pub decision: String,
    /// From the fault until the bench first saw the new primary promoted and ready.
    pub promotion_seen_ms: f64,
    /// The longest gap between consecutive acknowledgements from the last one before the fault.
    pub unavailability_ms: f64,
    /// The gap between consecutive acknowledgements that contains the fault time.
    pub gap_at_fault_ms: f64,
    /// Last acknowledgement before the fault, relative to it (≤ 0).
    pub last_ack_before_fault_ms: f64,
    /// First acknowledgement after the fault, relative to it, and the node that gave it.
    pub first_ack_after_fault_ms: f64,
    pub first_ack_after_fault_node: Option<NodeId>,
    /// Acknowledgements after the fault that came from the old primary (expected: 0).
    pub acks_from_old_primary_after_fault: u64,
    /// When the agent's exit was seen (kill-node) and when SIGKILL was sent to the postmaster,
    /// relative to the fault instant (taken just before the first signal).
    pub agent_killed_ms: Option<f64>,
    pub postmaster_killed_ms: Option<f64>,
    /// switchover: how long `POST /switchover` took to answer (the request is committed then;
    /// `promotion_seen_ms` is when the new primary was ready).
    pub switchover_answer_ms: Option<f64>,
    /// The agent restart (kill-node), relative to the fault.
    pub restart_ms: Option<f64>,
    /// The killed postmaster's parent pid while it was a zombie, and when its pid was gone
    /// (reaped), relative to the fault; None if not seen / not gone by the end of the run.
    pub killed_postmaster_parent: Option<i32>,
    pub killed_postmaster_reaped_ms: Option<f64>,
    /// From the promotion (kill-postmaster) or the agent restart (kill-node) until the new
    /// primary's view shows the old node and the other standby streaming from it.
    pub rejoin_ms: f64,
    /// Same start, until the new primary's `pg_stat_replication` shows the old node streaming.
    pub rejoin_pg_ms: Option<f64>,
    /// From the committed `RejoinCompleted` of the old node, if still in the recent events.
    pub rejoin_method: Option<String>,
    pub rejoin_agent_duration_ms: Option<u64>,
    pub writes: WriteTally,
    /// Acknowledged ids missing on the new primary at the end.
    pub lost_writes: u64,
    pub lost_ids: Vec<i64>,
    /// Ids whose insert timed out (unknown) / failed but that are on the new primary.
    pub unknown_committed: u64,
    pub errored_committed: u64,
    /// First error messages after the fault: (ms relative to the fault, message).
    pub error_samples: Vec<(f64, String)>,
}

#[derive(Debug, Default, Serialize)]
pub struct WriteTally {
    pub attempts: u64,
    pub acked: u64,
    pub errors: u64,
    pub unknown: u64,
}

async fn one_run(
    binary: &Path,
    scenario: Scenario,
    number: usize,
    args: &BenchFailoverArgs,
) -> anyhow::Result<RunResult> {
    let options = Options {
        postgres: true,
        raft_settings: args.raft_settings.clone(),
        failover_settings: args.failover_settings.clone(),
        postgres_settings: args.postgres_settings.clone(),
        ..Options::default()
    };
    let mut cluster = LocalCluster::start(binary, &options)
        .await
        .context("starting a three-node cluster")?;
    let result = run_on(&mut cluster, scenario, number).await;
    if let Some(dir) = &args.keep_logs {
        for id in cluster.ids() {
            let to = dir.join(format!("{}-run{number}-node{id}.log", scenario.name()));
            if let Err(e) = std::fs::copy(&cluster.node(id).log, &to) {
                eprintln!("  could not copy node {id}'s log to {}: {e}", to.display());
            }
        }
    }
    result
    // `cluster` is dropped here: agents killed by pid, PostgreSQL stopped, folder removed.
}

async fn run_on(
    cluster: &mut LocalCluster,
    scenario: Scenario,
    number: usize,
) -> anyhow::Result<RunResult> {
    cluster
        .setup_replication(&[1, 2, 3])
        .await
        .context("setting up replication")?;
    let view = cluster.view(1).await.context("reading node 1's view")?;
    let old = view.state.primary.context("no primary after setup")?;
    let old_generation = view.state.generation;
    let others: Vec<NodeId> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    sql(
        cluster,
        old,
        "CREATE TABLE bench (id bigint PRIMARY KEY, at timestamptz NOT NULL)",
    )
    .await
    .context("creating the table")?;
    cluster
        .wait_streaming(old, &others, SETUP_TIMEOUT)
        .await
        .context("standbys streaming before the fault")?;

    let writer = Writer::start(cluster);
    sleep(WARM_UP).await;
    anyhow::ensure!(
        writer.acked_between(Instant::now() - WARM_UP, Instant::now()) > 0,
        "the writer had no acknowledged insert before the fault: {:?}",
        writer.last_error()
    );

    eprintln!("  primary node {old}: {}", scenario.name());
    let fault_utc = utc(SystemTime::now());
    let fault = Instant::now();
    let (postmaster, agent_killed_ms, switchover_answer_ms) = match scenario {
        Scenario::KillPostmaster => (Some(cluster.kill_postmaster(old)?), None, None),
        Scenario::KillNode => {
            cluster.kill(old)?;
            let agent_killed = millis(fault.elapsed());
            (
                Some(cluster.kill_postmaster(old)?),
                Some(agent_killed),
                None,
            )
        }
        Scenario::Switchover => {
            let candidate = if others.contains(&SWITCHOVER_CANDIDATE) {
                SWITCHOVER_CANDIDATE
            } else {
                others[0]
            };
            let via = others
                .iter()
                .copied()
                .find(|id| *id != candidate)
                .unwrap_or(candidate);
            let body = serde_json::json!({ "candidate": format!("node{candidate}") });
            let answer: serde_json::Value = cluster
                .post(via, "/switchover", &body)
                .await
                .context("POST /switchover")?;
            let answered = millis(fault.elapsed());
            eprintln!("  switchover answered after {answered:.0} ms: {answer}");
            (None, None, Some(answered))
        }
        Scenario::RewindVsReclone => bail!("rewind-vs-reclone has its own procedure"),
    };
    let postmaster_killed_ms = postmaster.map(|_| millis(fault.elapsed()));
    let reaped = postmaster.map(|pid| tokio::spawn(watch_reaped(pid, fault)));
    let promotion = wait_promoted(cluster, &others, old, old_generation).await?;
    let new = promotion.primary;
    let other = *others
        .iter()
        .find(|id| **id != new)
        .context("no other standby")?;
    eprintln!(
        "  node {new} promoted, seen {:.0} ms after the fault",
        millis(promotion.at - fault)
    );

    let (rejoin_start, restart_ms) = match scenario {
        Scenario::KillPostmaster => (promotion.at, None),
        Scenario::Switchover | Scenario::RewindVsReclone => (fault, None),
        Scenario::KillNode => {
            sleep_until(promotion.at + RESTART_DELAY).await;
            let restart = Instant::now();
            cluster.start_node(old)?;
            (restart, Some(millis(restart - fault)))
        }
    };
    let rejoin = measure_rejoin(cluster, new, old, other, rejoin_start, REJOIN_TIMEOUT).await?;
    eprintln!("  node {old} streaming again after {:.0} ms", rejoin.ms);

    // Enough acknowledged writes after the promotion.
    wait::until(
        "3 s of acknowledged writes after the promotion",
        RECOVERY_TIMEOUT,
        || async {
            match writer.ack_span_after(promotion.at) {
                Some(span) if span >= WRITES_AFTER_PROMOTION => Ok(()),
                span => Err(format!(
                    "acknowledged for {span:?}; last error {:?}",
                    writer.last_error()
                )),
            }
        },
    )
    .await?;
    let attempts = writer.stop().await?;
    let reaped = match reaped {
        Some(handle) => {
            handle.abort();
            handle.await.ok()
        }
        None => None,
    };

    let present = committed_ids(cluster, new)
        .await
        .context("reading the ids on the new primary")?;
    let view = cluster.view(new).await.ok();
    let rejoined = view
        .as_ref()
        .and_then(|v| rejoin_event(v, old, promotion.generation));

    let analysis = analyse(&attempts, fault, old);
    let acked: Vec<i64> = attempts
        .iter()
        .filter(|a| a.outcome == WriteOutcome::Ok)
        .map(|a| a.id)
        .collect();
    let lost_ids: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    let committed_with = |outcome: WriteOutcome| {
        attempts
            .iter()
            .filter(|a| a.outcome == outcome && present.contains(&a.id))
            .count() as u64
    };
    let error_samples = attempts
        .iter()
        .filter(|a| a.sent >= fault)
        .filter_map(|a| Some((signed_ms(a.sent, fault), a.error.clone()?)))
        .take(ERRORS_KEPT)
        .collect();
    Ok(RunResult {
        scenario,
        run: number,
        fault_utc,
        old_primary: old,
        new_primary: new,
        new_generation: promotion.generation,
        decision: promotion.reason,
        promotion_seen_ms: millis(promotion.at - fault),
        unavailability_ms: analysis.longest_gap_ms,
        gap_at_fault_ms: analysis.gap_at_fault_ms,
        last_ack_before_fault_ms: analysis.last_before_ms,
        first_ack_after_fault_ms: analysis.first_after_ms,
        first_ack_after_fault_node: analysis.first_after_node,
        acks_from_old_primary_after_fault: analysis.acks_from_old_after,
        agent_killed_ms,
        postmaster_killed_ms,
        switchover_answer_ms,
        restart_ms,
        killed_postmaster_parent: reaped.as_ref().and_then(|r| r.parent),
        killed_postmaster_reaped_ms: reaped.as_ref().and_then(|r| r.gone_ms),
        rejoin_ms: rejoin.ms,
        rejoin_pg_ms: rejoin.pg_ms,
        rejoin_method: rejoined.as_ref().map(|r| r.0.clone()),
        rejoin_agent_duration_ms: rejoined.map(|r| r.1),
        writes: tally(&attempts),
        lost_writes: lost_ids.len() as u64,
        lost_ids: lost_ids.into_iter().take(20).collect(),
        unknown_committed: committed_with(WriteOutcome::Unknown),
        errored_committed: committed_with(WriteOutcome::Error),
        error_samples,
    })
}

async fn sql(cluster: &LocalCluster, id: NodeId, query: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(&cluster.pg_conninfo(id), NoTls).await?;
    let task = tokio::spawn(connection);
    client.batch_execute(query).await?;
    drop(client);
    let _ = task.await;
    Ok(())
}

async fn committed_ids(cluster: &LocalCluster, id: NodeId) -> anyhow::Result<HashSet<i64>> {
    let (client, connection) = tokio_postgres::connect(&cluster.pg_conninfo(id), NoTls).await?;
    let task = tokio::spawn(connection);
    let rows = client.query("SELECT id FROM bench", &[]).await?;
    drop(client);
    let _ = task.await;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

struct Reaped {
    parent: Option<i32>,
    gone_ms: Option<f64>,
}

/// Polls `/proc/<pid>/stat` of the killed postmaster every 10 ms until the pid is gone: a killed
/// process stays a zombie (and its pid in use) until its parent reaps it. Runs until aborted;
/// an aborted watch returns nothing, so the result is taken through [`JoinHandle::await`] only
/// when it finished.
async fn watch_reaped(pid: i32, fault: Instant) -> Reaped {
    let mut parent = None;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace().collect())
                    .unwrap_or_default();
                if fields.first() == Some(&"Z") {
                    parent = fields.get(1).and_then(|p| p.parse().ok());
                }
            }
            Err(_) => {
                return Reaped {
                    parent,
                    gone_ms: Some(millis(fault.elapsed())),
                }
            }
        }
        sleep(Duration::from_millis(10)).await;
    }
}

struct Promotion {
    primary: NodeId,
    generation: u64,
    reason: String,
    /// When the bench saw it.
    at: Instant,
}

/// Polls the survivors' views until one shows a ready primary of a newer generation.
async fn wait_promoted(
    cluster: &LocalCluster,
    survivors: &[NodeId],
    old: NodeId,
    old_generation: u64,
) -> anyhow::Result<Promotion> {
    let mut ask = survivors.iter().cycle();
    wait::until("a new primary to be promoted", PROMOTION_TIMEOUT, || {
        let via = *ask.next().expect("survivors");
        async move {
            let view = cluster
                .view(via)
                .await
                .map_err(|e| format!("node {via}: {e}"))?;
            let at = Instant::now();
            let s = &view.state;
            match s.primary {
                Some(p) if s.generation > old_generation && s.primary_ready && p != old => {
                    let reason = s
                        .decisions
                        .iter()
                        .rev()
                        .find(|d| d.new_generation == s.generation)
                        .map(|d| d.decision.reason.clone())
                        .unwrap_or_default();
                    Ok(Promotion {
                        primary: p,
                        generation: s.generation,
                        reason,
                        at,
                    })
                }
                _ => Err(format!(
                    "node {via}: generation {}, primary {:?}, ready {}",
                    s.generation, s.primary, s.primary_ready
                )),
            }
        }
    })
    .await
}

struct Rejoin {
    ms: f64,
    pg_ms: Option<f64>,
}

/// Polls every [`wait::POLL`] until the new primary's view shows `old` and `other` streaming from
/// it; also notes when its `pg_stat_replication` first shows `old` streaming.
async fn measure_rejoin(
    cluster: &LocalCluster,
    new: NodeId,
    old: NodeId,
    other: NodeId,
    start: Instant,
    limit: Duration,
) -> anyhow::Result<Rejoin> {
    let deadline = start + limit;
    let mut replication = ReplicationWatch::new(cluster.pg_conninfo(new), format!("node{old}"));
    let mut pg_at = None;
    loop {
        if pg_at.is_none() && replication.streaming().await {
            pg_at = Some(Instant::now());
        }
        let last = match cluster.view(new).await {
            Ok(view) => match streaming(&view, new, &[old, other]) {
                Ok(()) => {
                    let ms = millis(Instant::now().saturating_duration_since(start));
                    let pg_ms = pg_at.map(|at| millis(at.saturating_duration_since(start)));
                    return Ok(Rejoin { ms, pg_ms });
                }
                Err(reason) => reason,
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!("node {old} did not stream from node {new} within {limit:?}; last: {last}");
        }
        sleep(wait::POLL).await;
    }
}

/// The same condition as [`LocalCluster::wait_streaming`], on one view.
fn streaming(view: &ClusterView, primary: NodeId, standbys: &[NodeId]) -> Result<(), String> {
    let primary_name = format!("node{primary}");
    let row = |id: NodeId| view.nodes.iter().find(|n| n.summary.id == id);
    let p = row(primary).ok_or("primary not registered")?;
    if (p.summary.role.as_str(), p.summary.status.as_str()) != ("primary", "running") {
        return Err(format!("primary row: {:?}", p.summary));
    }
    for id in standbys {
        let s = row(*id).ok_or(format!("node {id} not registered"))?;
        let ok = s.summary.status == "streaming"
            && s.summary.upstream.as_ref() == Some(&primary_name)
            && s.summary.lag_bytes.is_some();
        if !ok {
            return Err(format!(
                "node {id}: {} {} upstream {:?}",
                s.summary.role, s.summary.status, s.summary.upstream
            ));
        }
    }
    Ok(())
}

/// Watches the new primary's `pg_stat_replication` for one standby, on one connection.
struct ReplicationWatch {
    conninfo: String,
    name: String,
    conn: Option<(Client, JoinHandle<()>)>,
}

impl ReplicationWatch {
    fn new(conninfo: String, name: String) -> ReplicationWatch {
        ReplicationWatch {
            conninfo,
            name,
            conn: None,
        }
    }

    async fn streaming(&mut self) -> bool {
        if self.conn.is_none() {
            let connect = timeout(
                STATEMENT_TIMEOUT,
                tokio_postgres::connect(&self.conninfo, NoTls),
            );
            if let Ok(Ok((client, connection))) = connect.await {
                let task = tokio::spawn(async move {
                    let _ = connection.await;
                });
                self.conn = Some((client, task));
            }
        }
        let Some((client, _)) = &self.conn else {
            return false;
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.name];
        let query = client.query_one(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE application_name = $1 AND state = 'streaming'",
            &params,
        );
        match timeout(STATEMENT_TIMEOUT, query).await {
            Ok(Ok(row)) => row.get::<_, i64>(0) > 0,
            _ => {
                if let Some((_, task)) = self.conn.take() {
                    task.abort();
                }
                false
            }
        }
    }
}

impl Drop for ReplicationWatch {
    fn drop(&mut self) {
        if let Some((_, task)) = self.conn.take() {
            task.abort();
        }
    }
}

/// The method and agent-measured duration of `old`'s rejoin in `generation`, if recorded.
fn rejoin_event(view: &ClusterView, old: NodeId, generation: u64) -> Option<(String, u64)> {
    view.state.recent.iter().rev().find_map(|e| match &e.event {
        Event::RejoinCompleted {
            node_id,
            generation: g,
            method,
            duration_ms,
        } if *node_id == old && *g == generation => {
            let method = match method {
                RejoinMethod::Rewind => "rewind",
                RejoinMethod::Follow => "follow",
                RejoinMethod::Reclone => "reclone",
            };
            Some((method.to_string(), *duration_ms))
        }
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOutcome {
    Ok,
    /// A connect failure or an error answer.
    Error,
    /// No answer within [`STATEMENT_TIMEOUT`]: may or may not have committed.
    Unknown,
}

#[derive(Debug, Clone)]
struct Attempt {
    id: i64,
    sent: Instant,
    outcome: WriteOutcome,
    ack: Option<Instant>,
    /// The node the connection was on, when connected.
    node: Option<NodeId>,
    error: Option<String>,
}

/// The client: inserts one row every [`WRITE_INTERVAL`] on its own task, following the primary.
struct Writer {
    log: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Writer {
    fn start(cluster: &LocalCluster) -> Writer {
        let ids = cluster.ids();
        let hosts: Vec<String> = ids
            .iter()
            .map(|id| cluster.node(*id).pg_socket_dir.display().to_string())
            .collect();
        let ports: Vec<u16> = ids
            .iter()
            .map(|id| cluster.node(*id).pg_port.unwrap_or(5432))
            .collect();
        let conninfo = multi_host_conninfo(&hosts, &ports);
        let nodes: Vec<(u16, NodeId)> = ports.into_iter().zip(ids).collect();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(write_loop(conninfo, nodes, log.clone(), stop.clone()));
        Writer { log, stop, task }
    }

    fn acked_between(&self, from: Instant, to: Instant) -> usize {
        let log = self.log.lock().expect("writer log");
        log.iter()
            .filter_map(|a| a.ack)
            .filter(|ack| *ack >= from && *ack <= to)
            .count()
    }

    /// From the first acknowledgement after `after` to the latest one.
    fn ack_span_after(&self, after: Instant) -> Option<Duration> {
        let log = self.log.lock().expect("writer log");
        let first = log.iter().filter_map(|a| a.ack).find(|ack| *ack > after)?;
        let last = log.iter().rev().find_map(|a| a.ack).unwrap_or(first);
        Some(last - first)
    }

    fn last_error(&self) -> Option<String> {
        let log = self.log.lock().expect("writer log");
        log.iter().rev().find_map(|a| a.error.clone())
    }

    async fn stop(self) -> anyhow::Result<Vec<Attempt>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.context("the writer task failed")?;
        let log = self.log.lock().expect("writer log");
        Ok(log.clone())
    }
}

fn multi_host_conninfo(hosts: &[String], ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "host={} port={} user=postgres dbname=postgres \
         target_session_attrs=read-write connect_timeout=1",
        hosts.join(","),
        ports.join(",")
    )
}

/// A connection of the writer: its client, the prepared insert, the node it reached.
struct Conn {
    client: Client,
    insert: Statement,
    node: Option<NodeId>,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(conninfo: &str, nodes: &[(u16, NodeId)]) -> Result<Conn, String> {
    let attempt = async {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
            .await
            .map_err(|e| format!("connect: {}", chain(e)))?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        // `SHOW port` is read only to know which node answered.
        let port = match client.simple_query("SHOW port").await {
            Ok(messages) => messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            }),
            Err(e) => {
                task.abort();
                return Err(format!("SHOW port: {}", chain(e)));
            }
        };
        let node = port
            .and_then(|p| p.parse::<u16>().ok())
            .and_then(|p| nodes.iter().find(|(port, _)| *port == p).map(|n| n.1));
        let insert = match client.prepare(INSERT).await {
            Ok(statement) => statement,
            Err(e) => {
                task.abort();
                return Err(format!("prepare: {}", chain(e)));
            }
        };
        Ok(Conn {
            client,
            insert,
            node,
            task,
        })
    };
    timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("connect: no answer within {CONNECT_TIMEOUT:?}")))
}

async fn write_loop(
    conninfo: String,
    nodes: Vec<(u16, NodeId)>,
    log: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
) {
    let mut conn: Option<Conn> = None;
    let mut id: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        id += 1;
        let sent = Instant::now();
        let (outcome, node, error) = write_once(&mut conn, id, &conninfo, &nodes).await;
        let ack = (outcome == WriteOutcome::Ok).then(Instant::now);
        log.lock().expect("writer log").push(Attempt {
            id,
            sent,
            outcome,
            ack,
            node,
            error,
        });
        if outcome == WriteOutcome::Ok {
            sleep_until(sent + WRITE_INTERVAL).await;
        } else {
            conn = None;
            sleep(WRITE_INTERVAL).await;
        }
    }
}

async fn write_once(
    conn: &mut Option<Conn>,
    id: i64,
    conninfo: &str,
    nodes: &[(u16, NodeId)],
) -> (WriteOutcome, Option<NodeId>, Option<String>) {
    if conn.is_none() {
        match connect(conninfo, nodes).await {
            Ok(c) => *conn = Some(c),
            Err(e) => return (WriteOutcome::Error, None, Some(e)),
        }
    }
    let c = conn.as_ref().expect("connected");
    match timeout(STATEMENT_TIMEOUT, c.client.execute(&c.insert, &[&id])).await {
        Ok(Ok(_)) => (WriteOutcome::Ok, c.node, None),
        Ok(Err(e)) => (
            WriteOutcome::Error,
            c.node,
            Some(format!("insert: {}", chain(e))),
        ),
        Err(_) => (
            WriteOutcome::Unknown,
            c.node,
            Some(format!("insert: no answer within {STATEMENT_TIMEOUT:?}")),
        ),
    }
}

/// An error with its sources (tokio-postgres puts the server's message in the source).
fn chain(e: tokio_postgres::Error) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

fn tally(attempts: &[Attempt]) -> WriteTally {
    let count = |o: WriteOutcome| attempts.iter().filter(|a| a.outcome == o).count() as u64;
    WriteTally {
        attempts: attempts.len() as u64,
        acked: count(WriteOutcome::Ok),
        errors: count(WriteOutcome::Error),
        unknown: count(WriteOutcome::Unknown),
    }
}

// ---------------------------------------------------------------------------------------------
// Gaps
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Analysis {
    longest_gap_ms: f64,
    gap_at_fault_ms: f64,
    last_before_ms: f64,
    first_after_ms: f64,
    first_after_node: Option<NodeId>,
    acks_from_old_after: u64,
}

/// The acknowledgement gaps around `fault`. The writer is sequential, so acknowledgements come
/// in the order of the attempts.
fn analyse(attempts: &[Attempt], fault: Instant, old: NodeId) -> Analysis {
    let acks: Vec<(Instant, Option<NodeId>)> = attempts
        .iter()
        .filter_map(|a| Some((a.ack?, a.node)))
        .collect();
    let before = acks.iter().rposition(|(at, _)| *at <= fault);
    let after = acks.iter().position(|(at, _)| *at > fault);
    let (Some(before), Some(after)) = (before, after) else {
        return Analysis {
            longest_gap_ms: f64::NAN,
            gap_at_fault_ms: f64::NAN,
            last_before_ms: f64::NAN,
            first_after_ms: f64::NAN,
            first_after_node: None,
            acks_from_old_after: 0,
        };
    };
    let longest = acks[before..]
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    Analysis {
        longest_gap_ms: millis(longest),
        gap_at_fault_ms: millis(acks[after].0 - acks[before].0),
        last_before_ms: signed_ms(acks[before].0, fault),
        first_after_ms: signed_ms(acks[after].0, fault),
        first_after_node: acks[after].1,
        acks_from_old_after: acks[after..]
            .iter()
            .filter(|(_, node)| *node == Some(old))
            .count() as u64,
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `at − origin` in milliseconds, negative when `at` is earlier.
fn signed_ms(at: Instant, origin: Instant) -> f64 {
    if at >= origin {
        millis(at - origin)
    } else {
        -millis(origin - at)
    }
}

/// `2026-11-24T13:20:01.123Z`.
fn utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

// ---------------------------------------------------------------------------------------------
// Summary and tables
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct ScenarioSummary {
    pub scenario: Scenario,
    pub runs: usize,
    pub failed_runs: usize,
    pub unavailability_ms: Stat,
    pub rejoin_ms: Stat,
    pub rejoin_pg_ms: Stat,
    pub promotion_seen_ms: Stat,
    pub switchover_answer_ms: Option<Stat>,
    pub lost_writes: u64,
    pub target_unavailability_median_ms: f64,
    pub target_rejoin_median_ms: f64,
}

impl ScenarioSummary {
    fn of(scenario: Scenario, runs: &[RunResult], failed_runs: usize) -> ScenarioSummary {
        ScenarioSummary {
            scenario,
            runs: runs.len(),
            failed_runs,
            unavailability_ms: Stat::of(runs.iter().map(|r| r.unavailability_ms)),
            rejoin_ms: Stat::of(runs.iter().map(|r| r.rejoin_ms)),
            rejoin_pg_ms: Stat::of(runs.iter().filter_map(|r| r.rejoin_pg_ms)),
            promotion_seen_ms: Stat::of(runs.iter().map(|r| r.promotion_seen_ms)),
            switchover_answer_ms: (scenario == Scenario::Switchover)
                .then(|| Stat::of(runs.iter().filter_map(|r| r.switchover_answer_ms))),
            lost_writes: runs.iter().map(|r| r.lost_writes).sum(),
            target_unavailability_median_ms: scenario.target_ms(),
            target_rejoin_median_ms: TARGET_REJOIN_MS,
        }
    }
}

fn print_run(run: &RunResult) {
    let node = |n: Option<NodeId>| n.map_or("?".to_string(), |n| format!("node{n}"));
    println!(
        "\n{} run {}: node{} -> node{} (generation {}, \"{}\"), fault at {}",
        run.scenario.name(),
        run.run,
        run.old_primary,
        run.new_primary,
        run.new_generation,
        run.decision,
        run.fault_utc
    );
    println!(
        "  promotion seen +{:.0} ms; unavailability {:.0} ms (last ack {:.0} ms, first ack +{:.0} ms on {}; gap at fault {:.0} ms)",
        run.promotion_seen_ms,
        run.unavailability_ms,
        run.last_ack_before_fault_ms,
        run.first_ack_after_fault_ms,
        node(run.first_ack_after_fault_node),
        run.gap_at_fault_ms
    );
    let restart = run
        .restart_ms
        .map_or(String::new(), |ms| format!(", agent restarted +{ms:.0} ms"));
    println!(
        "  rejoin {:.0} ms (pg_stat_replication {}; method {}, agent-reported {}){restart}",
        run.rejoin_ms,
        run.rejoin_pg_ms
            .map_or("-".to_string(), |ms| format!("{ms:.0} ms")),
        run.rejoin_method.as_deref().unwrap_or("?"),
        run.rejoin_agent_duration_ms
            .map_or("-".to_string(), |ms| format!("{ms} ms")),
    );
    let agent = run
        .agent_killed_ms
        .map_or(String::new(), |ms| format!("agent gone +{ms:.1} ms, "));
    if let Some(ms) = run.switchover_answer_ms {
        println!(
            "  POST /switchover answered +{ms:.0} ms; new primary ready (seen) +{:.0} ms",
            run.promotion_seen_ms
        );
    }
    if let Some(killed) = run.postmaster_killed_ms {
        println!(
        "  {agent}postmaster SIGKILL +{killed:.1} ms; killed postmaster: parent while a zombie {}, pid gone {}",
        run.killed_postmaster_parent
            .map_or("-".to_string(), |p| p.to_string()),
        run.killed_postmaster_reaped_ms
            .map_or("not by the end of the run".to_string(), |ms| format!(
                "+{ms:.0} ms"
            )),
    );
    }
    let w = &run.writes;
    println!(
        "  writes: {} attempts, {} acked, {} errors, {} unknown; lost {} {:?}; \
         unknown committed {}, errored committed {}, acks from the old primary after the fault {}",
        w.attempts,
        w.acked,
        w.errors,
        w.unknown,
        run.lost_writes,
        run.lost_ids,
        run.unknown_committed,
        run.errored_committed,
        run.acks_from_old_primary_after_fault
    );
    for (ms, message) in &run.error_samples {
        println!("  error +{ms:.0} ms: {message}");
    }
}

fn print_summary(s: &ScenarioSummary) {
    println!(
        "\nsummary {}: {} runs ok, {} failed",
        s.scenario.name(),
        s.runs,
        s.failed_runs
    );
    println!(
        "  {:<36} {:>10} {:>10}   target",
        "metric (ms)", "median", "max"
    );
    let row = |name: &str, stat: &Stat, target: String| {
        println!(
            "  {name:<36} {:>10.0} {:>10.0}   {target}",
            stat.median, stat.max
        );
    };
    row(
        "write unavailability",
        &s.unavailability_ms,
        format!("median < {}", s.target_unavailability_median_ms),
    );
    if let Some(answer) = &s.switchover_answer_ms {
        row("POST /switchover answered", answer, String::new());
    }
    row(
        "new primary ready (seen) after fault",
        &s.promotion_seen_ms,
        String::new(),
    );
    row(
        "rejoin (view: streaming)",
        &s.rejoin_ms,
        format!("median < {}", s.target_rejoin_median_ms),
    );
    row(
        "rejoin (pg_stat_replication)",
        &s.rejoin_pg_ms,
        String::new(),
    );
    println!("  lost acknowledged writes in total: {}", s.lost_writes);
}

// ---------------------------------------------------------------------------------------------
// rewind-vs-reclone
// ---------------------------------------------------------------------------------------------

/// How the crashed primary is made to rejoin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejoinPath {
    /// Restart its agent as it is: pg_rewind.
    Rewind,
    /// Delete the files in its pg_wal first, so pg_rewind fails and the agent clones it again.
    Reclone,
}

impl RejoinPath {
    fn name(self) -> &'static str {
        match self {
            RejoinPath::Rewind => "rewind",
            RejoinPath::Reclone => "reclone",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RejoinRun {
    pub path: RejoinPath,
    pub run: usize,
    /// `pg_database_size('postgres')` on the primary after the load.
    pub database_bytes: i64,
    /// The table's own size (`pg_total_relation_size('big')`).
    pub table_bytes: i64,
    /// The load (one `INSERT … generate_series`), its WAL, then the `CHECKPOINT`.
    pub load_ms: f64,
    pub load_wal_bytes: i64,
    pub checkpoint_ms: f64,
    /// From the checkpoint's end until both standbys had replayed up to the primary's LSN.
    pub standbys_replayed_ms: f64,
    /// The standbys' restartpoints (`CHECKPOINT` on each, one after the other); `None` with
    /// `--crash-unsettled`.
    pub standbys_restartpoint_ms: Option<f64>,
    pub crash_utc: String,
    pub new_primary: NodeId,
    pub promotion_seen_ms: f64,
    /// Written on the new primary before the rejoin.
    pub divergence_rows: i64,
    pub divergence_table_bytes: i64,
    pub divergence_wal_bytes: i64,
    /// The new primary's pg_wal (`pg_ls_waldir()`) just before the restart: stock pg_rewind
    /// copies every file there in full, as it copies all files that are not relation data.
    pub source_wal_files: i64,
    pub source_wal_bytes: i64,
    /// The killed postmaster's pid was gone (reaped) this long after the crash; the agent is
    /// restarted only after that.
    pub postmaster_reaped_ms: Option<f64>,
    /// Files deleted from pg_wal (reclone path).
    pub wal_files_deleted: usize,
    pub restart_utc: String,
    /// From the agent's restart until the new primary's view shows it (and the other standby)
    /// streaming from the new primary.
    pub rejoin_ms: f64,
    /// Same start, until the new primary's `pg_stat_replication` shows it streaming.
    pub rejoin_pg_ms: Option<f64>,
    /// From the committed `RejoinCompleted` of the old node.
    pub method: Option<String>,
    pub agent_duration_ms: Option<u64>,
    /// From the restart until the rejoined node had every row written on the new primary.
    pub rows_present_ms: f64,
    /// `pgdata.rewind-failed-*` folders next to the old node's data folder.
    pub moved_aside: Vec<String>,
    /// The cluster's temporary folder no longer exists after the cluster was dropped.
    pub folder_removed: bool,
    /// The whole run, cluster start to cluster removed.
    pub total_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct RejoinSummary {
    pub path: RejoinPath,
    pub runs: usize,
    pub failed_runs: usize,
    pub rejoin_ms: Stat,
    pub rejoin_pg_ms: Stat,
    pub agent_duration_ms: Stat,
    pub database_bytes: Stat,
    pub divergence_wal_bytes: Stat,
}

/// `rewind-vs-reclone`: `runs` rounds, each one fresh-cluster run of the rewind path followed by
/// one of the re-clone path. Returns the JSON report (printing tables unless `--json`).
async fn rejoin_bench(binary: &Path, args: &BenchFailoverArgs) -> serde_json::Value {
    let total = args.runs.unwrap_or(3);
    let started = Instant::now();
    let mut runs: Vec<RejoinRun> = Vec::new();
    let mut failures = Vec::new();
    for number in 1..=total {
        for path in [RejoinPath::Rewind, RejoinPath::Reclone] {
            eprintln!(
                "rewind-vs-reclone {} run {number}/{total}: starting a three-node cluster",
                path.name()
            );
            match rejoin_run(binary, path, number, args).await {
                Ok(run) => {
                    if !args.json {
                        print_rejoin_run(&run);
                    }
                    runs.push(run);
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    eprintln!(
                        "rewind-vs-reclone {} run {number} FAILED: {message}",
                        path.name()
                    );
                    if !args.json {
                        println!(
                            "\nrewind-vs-reclone {} run {number}: FAILED: {message}",
                            path.name()
                        );
                    }
                    failures
                        .push(serde_json::json!({ "path": path, "run": number, "error": message }));
                }
            }
        }
    }
    let summary = |path: RejoinPath| {
        let of_path: Vec<&RejoinRun> = runs.iter().filter(|r| r.path == path).collect();
        let failed = failures.iter().filter(|f| f["path"] == path.name()).count();
        RejoinSummary {
            path,
            runs: of_path.len(),
            failed_runs: failed,
            rejoin_ms: Stat::of(of_path.iter().map(|r| r.rejoin_ms)),
            rejoin_pg_ms: Stat::of(of_path.iter().filter_map(|r| r.rejoin_pg_ms)),
            agent_duration_ms: Stat::of(
                of_path
                    .iter()
                    .filter_map(|r| r.agent_duration_ms.map(|d| d as f64)),
            ),
            database_bytes: Stat::of(of_path.iter().map(|r| r.database_bytes as f64)),
            divergence_wal_bytes: Stat::of(of_path.iter().map(|r| r.divergence_wal_bytes as f64)),
        }
    };
    let rewind = summary(RejoinPath::Rewind);
    let reclone = summary(RejoinPath::Reclone);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let ratios = serde_json::json!({
        "reclone_over_rewind_wall_median": ratio(reclone.rejoin_ms.median, rewind.rejoin_ms.median),
        "reclone_over_rewind_agent_median": ratio(
            reclone.agent_duration_ms.median,
            rewind.agent_duration_ms.median
        ),
        "target": ">= 10",
    });
    let elapsed_s = started.elapsed().as_secs_f64();
    if !args.json {
        print_rejoin_summary(&[&rewind, &reclone], &ratios, elapsed_s);
        match args.link_mbit {
            Some(mbit) => println!("  links: network namespaces, {mbit} Mbit/s out of each node"),
            None => println!("  links: loopback, unlimited"),
        }
    }
    serde_json::json!({
        "scenario": Scenario::RewindVsReclone,
        "link_mbit": args.link_mbit,
        "runs": runs,
        "failures": failures,
        "summary": { "rewind": rewind, "reclone": reclone, "ratios": ratios },
        "elapsed_s": elapsed_s,
    })
}

async fn rejoin_run(
    binary: &Path,
    path: RejoinPath,
    number: usize,
    args: &BenchFailoverArgs,
) -> anyhow::Result<RejoinRun> {
    let started = Instant::now();
    let options = Options {
        postgres: true,
        raft_settings: args.raft_settings.clone(),
        failover_settings: args.failover_settings.clone(),
        postgres_settings: args.postgres_settings.clone(),
        network: args.link_mbit.is_some(),
        ..Options::default()
    };
    let mut cluster = LocalCluster::start(binary, &options)
        .await
        .context("starting a three-node cluster")?;
    let folder = cluster.dir().to_path_buf();
    let limited = match (args.link_mbit, cluster.network()) {
        (Some(mbit), Some(network)) => network
            .limit_rate(mbit)
            .with_context(|| format!("limiting the links to {mbit} Mbit/s")),
        _ => Ok(()),
    };
    let result = match limited {
        Ok(()) => rejoin_run_on(&mut cluster, path, number, args).await,
        Err(e) => Err(e),
    };
    if let Some(dir) = &args.keep_logs {
        for id in cluster.ids() {
            let to = dir.join(format!(
                "rewind-vs-reclone-{}-run{number}-node{id}.log",
                path.name()
            ));
            if let Err(e) = std::fs::copy(&cluster.node(id).log, &to) {
                eprintln!("  could not copy node {id}'s log to {}: {e}", to.display());
            }
        }
    }
    // Agents killed by pid, PostgreSQL stopped, the folder (moved-aside data included) removed.
    drop(cluster);
    let folder_removed = !folder.exists();
    if !folder_removed {
        eprintln!("  WARNING: {} still exists", folder.display());
    }
    let mut run = result?;
    run.folder_removed = folder_removed;
    run.total_ms = millis(started.elapsed());
    Ok(run)
}

async fn rejoin_run_on(
    cluster: &mut LocalCluster,
    path: RejoinPath,
    number: usize,
    args: &BenchFailoverArgs,
) -> anyhow::Result<RejoinRun> {
    cluster
        .setup_replication(&[1, 2, 3])
        .await
        .context("setting up replication")?;
    let view = cluster.view(1).await.context("reading node 1's view")?;
    let old = view.state.primary.context("no primary after setup")?;
    let old_generation = view.state.generation;
    let others: Vec<NodeId> = cluster.ids().into_iter().filter(|id| *id != old).collect();

    // ~240 bytes a row on the heap (tuple header, bigint, 200-byte text).
    let rows = (args.data_mb * 1024 * 1024 / 240).max(1);
    eprintln!(
        "  loading {rows} rows (~{} MiB) on node {old}",
        args.data_mb
    );
    let primary = PgConn::open(cluster, old).await?;
    let lsn0 = primary.text("SELECT pg_current_wal_lsn()::text").await?;
    let load = Instant::now();
    primary
        .execute(&format!(
            "CREATE TABLE big (id bigint NOT NULL, filler text NOT NULL) \
             WITH (autovacuum_enabled = off); \
             INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, {rows}) g"
        ))
        .await
        .context("loading the table")?;
    let load_ms = millis(load.elapsed());
    let checkpoint = Instant::now();
    primary.execute("CHECKPOINT").await?;
    let checkpoint_ms = millis(checkpoint.elapsed());
    let caught_up = Instant::now();
    let target = primary.text("SELECT pg_current_wal_lsn()::text").await?;
    let load_wal_bytes = primary
        .int(&format!(
            "SELECT pg_wal_lsn_diff('{target}', '{lsn0}')::bigint"
        ))
        .await?;
    let database_bytes = primary.int("SELECT pg_database_size('postgres')").await?;
    let table_bytes = primary.int("SELECT pg_total_relation_size('big')").await?;
    drop(primary);
    eprintln!(
        "  loaded in {:.1} s (database {} MiB, WAL {} MiB), checkpoint {:.1} s",
        load_ms / 1000.0,
        database_bytes >> 20,
        load_wal_bytes >> 20,
        checkpoint_ms / 1000.0
    );
    for id in &others {
        let standby = PgConn::open(cluster, *id).await?;
        let query = format!("SELECT (pg_last_wal_replay_lsn() >= '{target}')::int::bigint");
        wait::until(
            &format!("node {id} to replay up to {target}"),
            RECLONE_TIMEOUT,
            || async {
                match standby.int(&query).await {
                    Ok(1) => Ok(()),
                    Ok(_) => Err("behind".to_string()),
                    Err(e) => Err(format!("{e:#}")),
                }
            },
        )
        .await?;
    }
    let standbys_replayed_ms = millis(caught_up.elapsed());
    let mut standbys_restartpoint_ms = None;
    if !args.crash_unsettled {
        let restartpoints = Instant::now();
        for id in &others {
            PgConn::open(cluster, *id)
                .await?
                .execute("CHECKPOINT")
                .await
                .with_context(|| format!("a restartpoint on node {id}"))?;
        }
        standbys_restartpoint_ms = Some(millis(restartpoints.elapsed()));
    }

    // The node crash.
    let crash_utc = utc(SystemTime::now());
    let crash = Instant::now();
    cluster.kill(old)?;
    let pid = cluster.kill_postmaster(old)?;
    let reaped = tokio::spawn(watch_reaped(pid, crash));
    let promotion = wait_promoted(cluster, &others, old, old_generation).await?;
    let new = promotion.primary;
    let other = *others
        .iter()
        .find(|id| **id != new)
        .context("no other standby")?;
    eprintln!(
        "  crash at {crash_utc}; node {new} promoted, seen {:.0} ms after",
        millis(promotion.at - crash)
    );

    // The divergence.
    let divergence_rows = (args.divergence_mb * 1024 * 1024 / 240).max(1) as i64;
    let primary = PgConn::open(cluster, new).await?;
    let before = primary.text("SELECT pg_current_wal_lsn()::text").await?;
    primary
        .execute(&format!(
            "CREATE TABLE diverged (id bigint NOT NULL, filler text NOT NULL) \
             WITH (autovacuum_enabled = off); \
             INSERT INTO diverged SELECT g, repeat('y', 200) FROM generate_series(1, {divergence_rows}) g; \
             UPDATE diverged SET filler = repeat('z', 200) WHERE id % 10 = 0"
        ))
        .await
        .context("writing on the new primary")?;
    let divergence_wal_bytes = primary
        .int(&format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{before}')::bigint"
        ))
        .await?;
    let divergence_table_bytes = primary
        .int("SELECT pg_total_relation_size('diverged')")
        .await?;
    let source_wal_files = primary.int("SELECT count(*) FROM pg_ls_waldir()").await?;
    let source_wal_bytes = primary
        .int("SELECT coalesce(sum(size), 0)::bigint FROM pg_ls_waldir()")
        .await?;
    drop(primary);

    // The killed postmaster's pid must be gone, or pg_rewind's single-user run refuses to start.
    let postmaster_reaped_ms = match timeout(RECOVERY_TIMEOUT, reaped).await {
        Ok(Ok(r)) => r.gone_ms,
        _ => None,
    };
    let mut wal_files_deleted = 0;
    if path == RejoinPath::Reclone {
        let wal = cluster.node(old).pg_data.join("pg_wal");
        for entry in
            std::fs::read_dir(&wal).with_context(|| format!("reading {}", wal.display()))?
        {
            let file = entry?.path();
            if file.is_file() {
                std::fs::remove_file(&file)
                    .with_context(|| format!("deleting {}", file.display()))?;
                wal_files_deleted += 1;
            }
        }
    }
    let restart_utc = utc(SystemTime::now());
    let restart = Instant::now();
    cluster.start_node(old)?;
    let rejoin = measure_rejoin(cluster, new, old, other, restart, RECLONE_TIMEOUT).await?;
    eprintln!(
        "  node {old} ({}) streaming again after {:.0} ms",
        path.name(),
        rejoin.ms
    );
    let rejoined = wait::until("the RejoinCompleted event", RECOVERY_TIMEOUT, || async {
        let view = cluster.view(new).await.map_err(|e| e.to_string())?;
        rejoin_event(&view, old, promotion.generation).ok_or("not yet".to_string())
    })
    .await
    .ok();
    let standby = PgConn::open(cluster, old).await?;
    wait::until(
        "the rejoined node to have every row",
        RECOVERY_TIMEOUT,
        || async {
            match standby.int("SELECT count(*) FROM diverged").await {
                Ok(n) if n == divergence_rows => Ok(()),
                Ok(n) => Err(format!("{n} rows")),
                Err(e) => Err(format!("{e:#}")),
            }
        },
    )
    .await?;
    let rows_present_ms = millis(restart.elapsed());
    drop(standby);
    let moved_aside = std::fs::read_dir(
        cluster
            .node(old)
            .pg_data
            .parent()
            .context("data folder's parent")?,
    )?
    .filter_map(|e| e.ok())
    .map(|e| e.file_name().to_string_lossy().to_string())
    .filter(|name| name.starts_with("pgdata.rewind-failed-"))
    .collect();
    Ok(RejoinRun {
        path,
        run: number,
        database_bytes,
        table_bytes,
        load_ms,
        load_wal_bytes,
        checkpoint_ms,
        standbys_replayed_ms,
        standbys_restartpoint_ms,
        crash_utc,
        new_primary: new,
        promotion_seen_ms: millis(promotion.at - crash),
        divergence_rows,
        divergence_table_bytes,
        divergence_wal_bytes,
        source_wal_files,
        source_wal_bytes,
        postmaster_reaped_ms,
        wal_files_deleted,
        restart_utc,
        rejoin_ms: rejoin.ms,
        rejoin_pg_ms: rejoin.pg_ms,
        method: rejoined.as_ref().map(|r| r.0.clone()),
        agent_duration_ms: rejoined.map(|r| r.1),
        rows_present_ms,
        moved_aside,
        folder_removed: false,
        total_ms: 0.0,
    })
}

/// One connection to a node's PostgreSQL over its Unix socket.
struct PgConn {
    client: Client,
    task: JoinHandle<()>,
}

impl PgConn {
    async fn open(cluster: &LocalCluster, id: NodeId) -> anyhow::Result<PgConn> {
        let (client, connection) = tokio_postgres::connect(&cluster.pg_conninfo(id), NoTls)
            .await
            .with_context(|| format!("connecting to node {id}'s PostgreSQL"))?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(PgConn { client, task })
    }

    async fn execute(&self, query: &str) -> anyhow::Result<()> {
        self.client.batch_execute(query).await?;
        Ok(())
    }

    async fn row(&self, query: &str) -> anyhow::Result<tokio_postgres::Row> {
        Ok(self.client.query_one(query, &[]).await?)
    }

    async fn text(&self, query: &str) -> anyhow::Result<String> {
        Ok(self.row(query).await?.get(0))
    }

    async fn int(&self, query: &str) -> anyhow::Result<i64> {
        Ok(self.row(query).await?.get(0))
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn print_rejoin_run(run: &RejoinRun) {
    let mib = |b: i64| b as f64 / 1_048_576.0;
    println!(
        "\nrewind-vs-reclone {} run {}: crash at {}, node{} promoted (+{:.0} ms)",
        run.path.name(),
        run.run,
        run.crash_utc,
        run.new_primary,
        run.promotion_seen_ms
    );
    println!(
        "  database {:.0} MiB (table {:.0} MiB); load {:.1} s, {:.0} MiB of WAL; checkpoint {:.1} s; standbys replayed {:.1} s later, {}",
        mib(run.database_bytes),
        mib(run.table_bytes),
        run.load_ms / 1000.0,
        mib(run.load_wal_bytes),
        run.checkpoint_ms / 1000.0,
        run.standbys_replayed_ms / 1000.0,
        run.standbys_restartpoint_ms.map_or("no restartpoints (--crash-unsettled)".to_string(), |ms| {
            format!("restartpoints {:.1} s", ms / 1000.0)
        })
    );
    println!(
        "  divergence: {} rows, table {:.1} MiB, {:.1} MiB of WAL; killed postmaster reaped {}; {} pg_wal files deleted",
        run.divergence_rows,
        mib(run.divergence_table_bytes),
        mib(run.divergence_wal_bytes),
        run.postmaster_reaped_ms
            .map_or("-".to_string(), |ms| format!("+{ms:.0} ms")),
        run.wal_files_deleted
    );
    println!(
        "  new primary's pg_wal before the restart: {} files, {:.0} MiB",
        run.source_wal_files,
        mib(run.source_wal_bytes)
    );
    println!(
        "  restart at {}: rejoin {:.0} ms (pg_stat_replication {}; rows present {:.0} ms); RejoinCompleted {} {}",
        run.restart_utc,
        run.rejoin_ms,
        run.rejoin_pg_ms
            .map_or("-".to_string(), |ms| format!("{ms:.0} ms")),
        run.rows_present_ms,
        run.method.as_deref().unwrap_or("?"),
        run.agent_duration_ms
            .map_or("-".to_string(), |ms| format!("{ms} ms")),
    );
    println!(
        "  moved aside {:?}; folder removed {}; run took {:.1} s",
        run.moved_aside,
        run.folder_removed,
        run.total_ms / 1000.0
    );
}

fn print_rejoin_summary(summaries: &[&RejoinSummary], ratios: &serde_json::Value, elapsed_s: f64) {
    println!("\nsummary rewind-vs-reclone (took {elapsed_s:.0} s in all)");
    println!(
        "  {:<8} {:>5} {:>7} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "path",
        "runs",
        "failed",
        "wall median",
        "wall max",
        "agent med",
        "agent max",
        "pg median",
        "div WAL MiB"
    );
    for s in summaries {
        println!(
            "  {:<8} {:>5} {:>7} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>12.1}",
            s.path.name(),
            s.runs,
            s.failed_runs,
            s.rejoin_ms.median,
            s.rejoin_ms.max,
            s.agent_duration_ms.median,
            s.agent_duration_ms.max,
            s.rejoin_pg_ms.median,
            s.divergence_wal_bytes.median / 1_048_576.0
        );
    }
    println!(
        "  re-clone / rewind, medians: wall {:.1}x, agent-reported {:.1}x (target >= 10x)",
        ratios["reclone_over_rewind_wall_median"]
            .as_f64()
            .unwrap_or(f64::NAN),
        ratios["reclone_over_rewind_agent_median"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(id: i64, base: Instant, ack_ms: Option<u64>, node: NodeId) -> Attempt {
        Attempt {
            id,
            sent: base,
            outcome: if ack_ms.is_some() {
                WriteOutcome::Ok
            } else {
                WriteOutcome::Error
            },
            ack: ack_ms.map(|ms| base + Duration::from_millis(ms)),
            node: Some(node),
            error: None,
        }
    }

    #[test]
    fn the_gap_around_the_fault_and_a_later_longer_one() {
        let base = Instant::now();
        let fault = base + Duration::from_millis(100);
        let attempts = vec![
            attempt(1, base, Some(50), 1),
            attempt(2, base, Some(90), 1),
            attempt(3, base, None, 1),
            // A late ack from the old primary, then the real outage.
            attempt(4, base, Some(110), 1),
            attempt(5, base, Some(900), 2),
            attempt(6, base, Some(920), 2),
        ];
        let a = analyse(&attempts, fault, 1);
        assert_eq!(a.gap_at_fault_ms.round(), 20.0);
        assert_eq!(a.longest_gap_ms.round(), 790.0);
        assert_eq!(a.last_before_ms.round(), -10.0);
        assert_eq!(a.first_after_ms.round(), 10.0);
        assert_eq!(a.first_after_node, Some(1));
        assert_eq!(a.acks_from_old_after, 1);
    }

    #[test]
    fn no_ack_after_the_fault_is_not_a_number() {
        let base = Instant::now();
        let attempts = vec![attempt(1, base, Some(5), 1)];
        let a = analyse(&attempts, base + Duration::from_millis(10), 1);
        assert!(a.longest_gap_ms.is_nan());
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_998_001_250);
        assert_eq!(utc(t), "2026-11-30T00:20:01.250Z");
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn the_conninfo_lists_every_socket_folder() {
        let conninfo = multi_host_conninfo(&["/a/s".into(), "/b/s".into()], &[5001, 5002]);
        assert_eq!(
            conninfo,
            "host=/a/s,/b/s port=5001,5002 user=postgres dbname=postgres \
             target_session_attrs=read-write connect_timeout=1"
        );
        let config: tokio_postgres::Config = conninfo.parse().unwrap();
        assert_eq!(config.get_hosts().len(), 2);
        assert!(matches!(
            config.get_hosts()[0],
            tokio_postgres::config::Host::Unix(_)
        ));
    }
}
