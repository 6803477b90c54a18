//! `raftmgr-jepsen test`: a real cluster, clients that record every write, a seeded nemesis, and
//! checkers that judge the record (see `check.rs` for what each one proves).
//!
//! A run: start the nodes (each in its own network namespace as root, on loopback otherwise, with
//! process faults only), set up replication, start the writers and the observer, inject faults on
//! the seeded schedule until the time is up, heal everything, let the clients write a little
//! longer, stop them, wait for the cluster to converge, read every node, judge, and write
//! `history.json`, `results.json` and `report.html` to `--out`.

pub mod check;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use raftmgr_raft::NodeId;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_postgres::NoTls;

use crate::cluster::{LocalCluster, Options};
use crate::wait;
use check::Verdict;
use history::{Fault, History, NodeFinal};
use nemesis::{NemesisSet, Roles};
use workload::{Addresses, Recorder, Tasks};

/// How long the cluster may take to come back after a fault is healed before the next one.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(45);
/// How long the clients keep writing after the last fault healed.
const WRITES_AFTER_HEAL: Duration = Duration::from_secs(5);
/// The bound on convergence after the clients stop.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(120);
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// The raftmgr binary [default: `raftmgr` next to this executable].
    #[arg(long)]
    pub raftmgr: Option<PathBuf>,
    /// Comma-separated nemeses or groups: kill, pause, partition, loss, restart, all; or single
    /// ones such as kill-postgres, pause-agent, partition-leader.
    #[arg(long, default_value = "kill,pause,partition")]
    pub nemesis: NemesisSet,
    /// Seconds of faults (setup, healing and convergence come on top).
    #[arg(long, default_value_t = 120)]
    pub time: u64,
    /// Faults started per minute, at most (each waits for the cluster to recover from the last).
    #[arg(long, default_value_t = 6.0)]
    pub rate: f64,
    /// The shortest fault, in seconds.
    #[arg(long, default_value_t = 2)]
    pub fault_min_s: u64,
    /// The longest fault, in seconds.
    #[arg(long, default_value_t = 8)]
    pub fault_max_s: u64,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    pub nodes: u64,
    /// The schedule's seed [default: from the clock; printed, so that the run can be replayed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// `synchronous_mode` of every agent: off, on or strict.
    #[arg(long, default_value = "on")]
    pub synchronous_mode: String,
    /// Where the report and the history go [default: chaos-<seed> in the current folder].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Test only: agents that never fence their PostgreSQL, to show that the checkers catch
    /// what fencing prevents.
    #[arg(long, hide = true)]
    pub unsafe_no_fencing: bool,
    /// A `key = value` line for every agent's `[raft]` section (repeatable).
    #[arg(long = "raft-setting")]
    pub raft_settings: Vec<String>,
    /// A `key = value` line for every agent's `[failover]` section (repeatable).
    #[arg(long = "failover-setting")]
    pub failover_settings: Vec<String>,
}

/// A finished run: the record, the verdicts and where the report is.
pub struct RunReport {
    pub history: History,
    pub verdicts: Vec<Verdict>,
    pub out: PathBuf,
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.ok)
    }

    pub fn verdict(&self, checker: &str) -> &Verdict {
        self.verdicts
            .iter()
            .find(|v| v.checker == checker)
            .expect("every checker has a verdict")
    }
}

/// The command line's entry: runs, prints, and fails when a checker failed.
pub async fn test(args: ChaosArgs) -> anyhow::Result<()> {
    let report = tokio::select! {
        report = run(&args) => report?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the lab was torn down"),
    };
    judged(report)
}

#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// A run's folder (its `--out`), holding `history.json`.
    pub dir: PathBuf,
}

/// `raftmgr-jepsen check DIR`: judges a recorded history again (after a checker changed, say)
/// and rewrites the run's `results.json` and `report.html`.
pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    let path = args.dir.join("history.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let history: History =
        serde_json::from_str(&text).with_context(|| format!("decoding {}", path.display()))?;
    let verdicts = check::check_all(&history);
    let report = RunReport {
        history,
        verdicts,
        out: args.dir,
    };
    report::write(&report).context("writing the report")?;
    judged(report)
}

fn judged(report: RunReport) -> anyhow::Result<()> {
    report::print(&report);
    if !report.passed() {
        let failed: Vec<&str> = report
            .verdicts
            .iter()
            .filter(|v| !v.ok)
            .map(|v| v.checker)
            .collect();
        bail!("checkers failed: {}", failed.join(", "));
    }
    Ok(())
}

/// One run; everything it started is torn down when it returns, also on error or when dropped.
pub async fn run(args: &ChaosArgs) -> anyhow::Result<RunReport> {
    anyhow::ensure!(
        matches!(args.synchronous_mode.as_str(), "off" | "on" | "strict"),
        "--synchronous-mode must be off, on or strict, not {:?}",
        args.synchronous_mode
    );
    anyhow::ensure!(
        args.fault_min_s >= 1 && args.fault_min_s <= args.fault_max_s,
        "--fault-min-s must be at least 1 and at most --fault-max-s"
    );
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let namespaces = nix::unistd::geteuid().is_root();
    let mut set = args.nemesis.clone();
    if !namespaces {
        set.0.retain(|n| !n.needs_network());
        anyhow::ensure!(
            !set.0.is_empty(),
            "every nemesis asked for drops packets, which needs root (network namespaces)"
        );
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("chaos-{seed}")));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let binary = match &args.raftmgr {
        Some(path) => path.clone(),
        None => crate::bench::default_binary()?,
    };
    eprintln!(
        "chaos: seed {seed}, {} nodes, synchronous_mode {}, nemeses {}, {} s, network {}",
        args.nodes,
        args.synchronous_mode,
        set.0.iter().map(|n| n.name()).collect::<Vec<_>>().join(","),
        args.time,
        if namespaces {
            "namespaces"
        } else {
            "loopback (process faults only)"
        }
    );

    let mut failover_settings = vec![format!("synchronous_mode = \"{}\"", args.synchronous_mode)];
    failover_settings.extend(args.failover_settings.iter().cloned());
    if args.unsafe_no_fencing {
        failover_settings.push("unsafe_no_fencing = true".into());
    }
    let options = Options {
        voters: args.nodes as usize,
        postgres: true,
        network: namespaces,
        failover_settings,
        raft_settings: args.raft_settings.clone(),
        ..Options::default()
    };
    let mut cluster = LocalCluster::start(&binary, &options).await?;
    let ids = cluster.ids();
    cluster
        .setup_replication(&ids)
        .await
        .context("setting up replication")?;
    sql(&cluster, ids[0], workload::CREATE_TABLE).await?;
    cluster
        .wait_streaming(ids[0], &ids[1..], SETUP_TIMEOUT)
        .await
        .context("standbys streaming before the first fault")?;

    let origin = Instant::now();
    let recorder = Recorder::new(origin);
    let libpq_hosts = ids
        .iter()
        .map(|id| {
            let node = cluster.node(*id);
            (
                node.pg_socket_dir.display().to_string(),
                node.pg_port.unwrap_or(5432),
            )
        })
        .collect();
    let tasks = Tasks::start(recorder.clone(), Addresses::of(&cluster), libpq_hosts);
    let synchronous = args.synchronous_mode != "off";
    recovered(&recorder, 0.0, synchronous)
        .await
        .context("the clients never wrote")?;
    wait::until("the observer to see the primary", SETUP_TIMEOUT, || async {
        let observed = recorder.observed.lock().expect("observed");
        observed
            .primary
            .map(|_| ())
            .ok_or("no primary seen".to_string())
    })
    .await?;

    let mut history = History {
        seed,
        nodes: ids.len(),
        synchronous_mode: args.synchronous_mode.clone(),
        network: if namespaces { "namespaces" } else { "loopback" }.into(),
        ..History::default()
    };
    let interval = Duration::from_secs_f64(60.0 / args.rate);
    let end = origin + Duration::from_secs(args.time);
    let schedule = nemesis::plan(seed, &set, 10_000, args.fault_min_s, args.fault_max_s);
    let mut next_start = Instant::now();
    for planned in &schedule {
        sleep_until(next_start).await;
        if Instant::now() + planned.duration > end {
            break;
        }
        next_start = Instant::now() + interval;
        let roles = {
            let observed = recorder.observed.lock().expect("observed");
            Roles {
                primary: observed.primary,
                leader: observed.leader,
            }
        };
        let start_ms = recorder.now_ms();
        let mut active = match nemesis::inject(&mut cluster, planned, &roles).await {
            Ok(Some(active)) => active,
            Ok(None) => {
                eprintln!(
                    "  {:>7.1} s {}: skipped, no primary known",
                    start_ms / 1000.0,
                    planned.nemesis
                );
                continue;
            }
            Err(e) => {
                eprintln!(
                    "  {:>7.1} s {}: not injected: {e:#}",
                    start_ms / 1000.0,
                    planned.nemesis
                );
                continue;
            }
        };
        let targets: Vec<String> = active
            .targets
            .iter()
            .map(|id| format!("node{id}"))
            .collect();
        eprintln!(
            "  {:>7.1} s {} on {} for {:.1} s {}",
            start_ms / 1000.0,
            planned.nemesis,
            targets.join(","),
            planned.duration.as_secs_f64(),
            active.note
        );
        sleep(planned.duration).await;
        let healed = nemesis::heal(&mut cluster, &mut active);
        let end_ms = recorder.now_ms();
        let mut note = active.note.clone();
        if let Err(e) = healed {
            note += &format!("; healing failed: {e:#}");
        }
        history.faults.push(Fault {
            kind: planned.nemesis.name().into(),
            targets,
            start_ms,
            end_ms: Some(end_ms),
            note,
        });
        if let Err(e) = recovered(&recorder, end_ms, synchronous).await {
            eprintln!("  the cluster did not recover: {e:#}");
            break;
        }
    }

    history.healed_ms = Some(recorder.now_ms());
    let _ = recovered(&recorder, recorder.now_ms(), synchronous).await;
    sleep(WRITES_AFTER_HEAL).await;
    tasks.stop().await;

    let started = Instant::now();
    let mut last_problem = String::new();
    let mut finals = Vec::new();
    while started.elapsed() < CONVERGENCE_TIMEOUT {
        finals = read_finals(&cluster).await;
        let problems = check::convergence_problems(&finals);
        if problems.is_empty() {
            history.converged_ms = Some(recorder.now_ms());
            break;
        }
        last_problem = problems.join("; ");
        sleep(Duration::from_millis(500)).await;
    }
    if history.converged_ms.is_none() {
        history.convergence_error = Some(last_problem);
    }
    history.finals = finals;
    history.writes = std::mem::take(&mut *recorder.writes.lock().expect("writes"));
    let observed = std::mem::take(&mut *recorder.observed.lock().expect("observed"));
    history.generations = observed.generations;
    history.logs = observed.logs;
    history.log_rewrites = observed.log_rewrites;

    let verdicts = check::check_all(&history);
    let report = RunReport {
        history,
        verdicts,
        out,
    };
    report::write(&report).context("writing the report")?;
    if !report.passed() {
        for id in &ids {
            let log = cluster.read_log(*id);
            std::fs::write(report.out.join(format!("node{id}.log")), log)?;
        }
    }
    Ok(report)
}

/// Waits until a write that started after `after_ms` was acknowledged and, in synchronous
/// mode, the committed state names a synchronous standby again (until then no standby may be
/// promoted, so a fault in that window only shows that, again).
async fn recovered(
    recorder: &Arc<Recorder>,
    after_ms: f64,
    synchronous: bool,
) -> anyhow::Result<()> {
    wait::until("an acknowledged write", RECOVERY_TIMEOUT, || async {
        if recorder.acked_since(after_ms) == 0 {
            return Err(format!("last error: {:?}", recorder.last_error()));
        }
        let named = recorder.observed.lock().expect("observed").sync_set_named;
        if synchronous && !named {
            return Err("no synchronous standby in the committed state yet".into());
        }
        Ok(())
    })
    .await
}

async fn sql(cluster: &LocalCluster, id: NodeId, query: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(&cluster.pg_conninfo(id), NoTls).await?;
    let task = tokio::spawn(connection);
    let result = client.batch_execute(query).await;
    task.abort();
    result.with_context(|| format!("running {query} on node {id}"))
}

async fn read_finals(cluster: &LocalCluster) -> Vec<NodeFinal> {
    let mut finals = Vec::new();
    for id in cluster.ids() {
        let mut f = NodeFinal {
            name: format!("node{id}"),
            ..NodeFinal::default()
        };
        if let Ok(Ok(view)) = timeout(Duration::from_secs(2), cluster.view(id)).await {
            f.committed_primary = view.state.primary.map(|p| format!("node{p}"));
            f.generation = Some(view.state.generation);
        }
        if let Ok(Ok(())) =
            timeout(Duration::from_secs(3), read_postgres(cluster, id, &mut f)).await
        {
            f.running = true;
        }
        finals.push(f);
    }
    finals
}

/// Fills in what node `id`'s PostgreSQL says of itself.
async fn read_postgres(
    cluster: &LocalCluster,
    id: NodeId,
    f: &mut NodeFinal,
) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(&cluster.pg_conninfo(id), NoTls).await?;
    let task = tokio::spawn(connection);
    let result = async {
        let in_recovery: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).await?.get(0);
        f.in_recovery = Some(in_recovery);
        if in_recovery {
            if let Some(row) = client
                .query_opt(
                    "SELECT status, received_tli, sender_host, sender_port FROM pg_stat_wal_receiver",
                    &[],
                )
                .await?
            {
                f.receiver_status = row.get(0);
                f.timeline = row.get::<_, Option<i32>>(1).map(|t| t as u32);
                let host: Option<String> = row.get(2);
                let port: Option<i32> = row.get(3);
                f.upstream = cluster
                    .ids()
                    .into_iter()
                    .find(|other| {
                        let node = cluster.node(*other);
                        let same_port = node.pg_port.map(i32::from) == port;
                        let same_host = match cluster.network() {
                            Some(lab) => host.as_deref() == Some(lab.address(*other).as_str()),
                            None => true,
                        };
                        same_port && same_host
                    })
                    .map(|other| format!("node{other}"));
            }
        } else {
            let row = client
                .query_one(
                    "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                    &[],
                )
                .await?;
            f.timeline = Some(row.get::<_, i32>(0) as u32);
        }
        f.ids = client
            .query("SELECT id FROM jepsen ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        anyhow::Ok(())
    }
    .await;
    task.abort();
    result
}
