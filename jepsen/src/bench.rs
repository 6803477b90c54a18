//! `bench-raft`: commit throughput, commit latency and agent memory of a three-node cluster of
//! real agents on loopback.
//!
//! Each run starts a fresh cluster, registers node 1 (so that observations of it apply), reads
//! every agent's idle RSS, then measures two phases against the leader's `POST /events`:
//!
//! * throughput: `concurrency` proposers in a closed loop (each sends its next event when the
//!   previous one is acknowledged), counting acknowledged events, with every agent's RSS sampled;
//! * latency: an open loop at a fixed rate, each request on its own task, its latency measured from
//!   its *scheduled* send time, so that a slow answer cannot hide the requests queued behind it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use raftmgr_api::ProposeAnswer;
use raftmgr_raft::{Event, NodeId, NodeRegistration, Observation, Outcome, PgRole};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cluster::{LocalCluster, Options, API_TOKEN};
use crate::procfs;

/// How long the cluster sits idle before its idle RSS is read.
const IDLE_WAIT: Duration = Duration::from_secs(3);
/// How often every agent's RSS is sampled under load.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// Lead time before the first scheduled request of the latency phase.
const SCHEDULE_LEAD: Duration = Duration::from_millis(20);
/// How many error messages a phase keeps for the report.
const ERRORS_KEPT: usize = 3;

/// The targets from the issue, shown next to the summary.
const TARGET_EVENTS_PER_S: f64 = 5_000.0;
const TARGET_P99_MS: f64 = 15.0;
const TARGET_IDLE_RSS_MB: f64 = 30.0;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchRaftArgs {
    /// The raftmgr binary [default: `raftmgr` next to this executable].
    #[arg(long)]
    pub raftmgr: Option<PathBuf>,
    /// How many runs, each on a fresh cluster.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// How long each phase (throughput, latency) lasts.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Concurrent closed-loop proposers in the throughput phase.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Events per second sent in the latency phase.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Print the runs and the summary as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and prints its results.
pub async fn bench_raft(args: BenchRaftArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let binary = match &args.raftmgr {
        Some(path) => path.clone(),
        None => default_binary()?,
    };
    let mut runs = Vec::new();
    for number in 1..=args.runs {
        eprintln!("run {number}/{}: starting a three-node cluster", args.runs);
        let run = one_run(&binary, &args)
            .await
            .with_context(|| format!("run {number}"))?;
        if !args.json {
            print_run(number, &run, &args);
        }
        runs.push(run);
    }
    let summary = Summary::of(&runs);
    if args.json {
        let report =
            serde_json::json!({ "settings": settings(&args), "runs": runs, "summary": summary });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&summary, runs.len());
    }
    let errors: u64 = runs.iter().map(RunResult::errors).sum();
    if errors > 0 {
        bail!("{errors} proposals failed; the figures above are not valid");
    }
    Ok(())
}

fn validate(args: &BenchRaftArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(
        args.duration_secs >= 1,
        "--duration-secs must be at least 1"
    );
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(args.rate >= 1, "--rate must be at least 1");
    Ok(())
}

/// `raftmgr` in the folder of the current executable.
pub(crate) fn default_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the current executable")?;
    let dir = exe
        .parent()
        .with_context(|| format!("{} has no parent folder", exe.display()))?;
    Ok(dir.join("raftmgr"))
}

fn settings(args: &BenchRaftArgs) -> serde_json::Value {
    serde_json::json!({
        "runs": args.runs,
        "duration_secs": args.duration_secs,
        "concurrency": args.concurrency,
        "rate_per_s": args.rate,
    })
}

// ---------------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct RunResult {
    pub leader: NodeId,
    /// Whether the leader was the same at the end of the run.
    pub leader_unchanged: bool,
    pub idle_rss_kib: Vec<u64>,
    pub throughput: ThroughputResult,
    pub latency: LatencyResult,
    /// Every agent's RSS after both phases.
    pub after_rss_kib: Vec<u64>,
    /// `events_applied` in the leader's state at the end (registration included).
    pub events_applied: u64,
}

impl RunResult {
    fn errors(&self) -> u64 {
        self.throughput.tally.errors + self.latency.tally.errors
    }
}

async fn one_run(binary: &Path, args: &BenchRaftArgs) -> anyhow::Result<RunResult> {
    let cluster = LocalCluster::start(binary, &Options::default())
        .await
        .context("starting a three-node cluster")?;
    register_primary(&cluster).await?;
    let pids = agent_pids(&cluster)?;
    tokio::time::sleep(IDLE_WAIT).await;
    let idle_rss_kib = read_rss_kib(&pids)?;

    let leader = leader_of(&cluster).await?;
    let target = Target::new(&cluster, leader);
    let duration = Duration::from_secs(args.duration_secs);
    eprintln!("  leader is node {leader}; throughput phase ({duration:?})");
    let throughput = throughput_phase(&target, &pids, args.concurrency, duration).await?;
    eprintln!("  latency phase ({} events/s for {duration:?})", args.rate);
    let latency = latency_phase(&target, &pids, args.rate, duration).await?;
    let after_rss_kib = read_rss_kib(&pids)?;

    let view = cluster
        .view(leader)
        .await
        .context("reading the leader's view")?;
    Ok(RunResult {
        leader,
        leader_unchanged: view.raft.leader == Some(leader),
        idle_rss_kib,
        throughput,
        latency,
        after_rss_kib,
        events_applied: view.state.events_applied,
    })
    // `cluster` is dropped here: its agents are killed by PID and its folder removed.
}

async fn register_primary(cluster: &LocalCluster) -> anyhow::Result<()> {
    let registration = Event::NodeRegistered(NodeRegistration::for_tests(1, PgRole::Primary));
    let answer = cluster
        .propose(1, &registration)
        .await
        .context("registering node 1")?;
    anyhow::ensure!(
        answer.outcome == Outcome::Applied,
        "registering node 1 did not apply: {:?}",
        answer.outcome
    );
    Ok(())
}

fn agent_pids(cluster: &LocalCluster) -> anyhow::Result<Vec<u32>> {
    cluster
        .ids()
        .into_iter()
        .map(|id| {
            cluster
                .pid(id)
                .with_context(|| format!("node {id} is not running"))
        })
        .collect()
}

async fn leader_of(cluster: &LocalCluster) -> anyhow::Result<NodeId> {
    let view = cluster.view(1).await.context("reading node 1's view")?;
    view.raft.leader.context("node 1 knows no leader")
}

fn read_rss_kib(pids: &[u32]) -> anyhow::Result<Vec<u64>> {
    pids.iter().map(|pid| procfs::rss_kib(*pid)).collect()
}

/// An observation of node 1 by `observer`: applies as a real event once node 1 is registered.
fn observation(observer: NodeId, lsn: u64) -> Event {
    Event::HealthObserved(Observation {
        observer,
        subject: 1,
        reachable: true,
        in_recovery: Some(false),
        timeline: Some(1),
        lsn: Some(lsn),
        replayed_lsn: Some(lsn),
        lag_bytes: Some(0),
        wal_receiver: None,
        replicas: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Proposing over HTTP
// ---------------------------------------------------------------------------------------------

/// `POST /events` on one agent, with the lab's HTTP client (cheap to clone: it shares the pool).
#[derive(Clone)]
struct Target {
    http: reqwest::Client,
    url: String,
}

impl Target {
    fn new(cluster: &LocalCluster, id: NodeId) -> Target {
        Target {
            http: cluster.http().clone(),
            url: format!("http://{}/events", cluster.node(id).api_addr),
        }
    }

    async fn propose(&self, event: &Event) -> anyhow::Result<ProposeAnswer> {
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(API_TOKEN)
            .json(event)
            .send()
            .await
            .context("sending POST /events")?;
        let status = response.status();
        let body = response.text().await.context("reading the answer")?;
        if !status.is_success() {
            bail!("{status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("decoding the answer {body}"))
    }
}

/// What came back for a set of proposals.
#[derive(Debug, Default, Serialize)]
pub struct Tally {
    /// Committed and applied, acknowledged with a 2xx answer.
    pub acked: u64,
    /// Acknowledged, but the state machine judged the event a no-op (expected: 0).
    pub no_ops: u64,
    /// No acknowledgement: an HTTP error, a timeout, a bad answer.
    pub errors: u64,
    /// The first few error messages.
    pub error_samples: Vec<String>,
}

impl Tally {
    fn record(&mut self, answer: &anyhow::Result<ProposeAnswer>) {
        match answer {
            Ok(answer) => {
                self.acked += 1;
                if answer.outcome != Outcome::Applied {
                    self.no_ops += 1;
                }
            }
            Err(e) => {
                self.errors += 1;
                if self.error_samples.len() < ERRORS_KEPT {
                    self.error_samples.push(format!("{e:#}"));
                }
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.acked += other.acked;
        self.no_ops += other.no_ops;
        self.errors += other.errors;
        for sample in other.error_samples {
            if self.error_samples.len() < ERRORS_KEPT {
                self.error_samples.push(sample);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resource use during a phase
// ---------------------------------------------------------------------------------------------

/// Samples every agent's RSS on its own task until stopped; keeps each agent's maximum.
struct RssSampler {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<Vec<u64>>>,
}

impl RssSampler {
    fn start(pids: &[u32]) -> RssSampler {
        let (stop, mut stopped) = oneshot::channel();
        let pids = pids.to_vec();
        let task = tokio::spawn(async move {
            let mut max_kib = vec![0; pids.len()];
            let mut ticks = tokio::time::interval(RSS_SAMPLE_INTERVAL);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticks.tick() => {
                        for (max, rss) in max_kib.iter_mut().zip(read_rss_kib(&pids)?) {
                            *max = (*max).max(rss);
                        }
                    }
                }
            }
            // One last sample, so that even a phase shorter than the interval is covered.
            for (max, rss) in max_kib.iter_mut().zip(read_rss_kib(&pids)?) {
                *max = (*max).max(rss);
            }
            Ok(max_kib)
        });
        RssSampler { stop, task }
    }

    /// Stops sampling; returns each agent's maximum RSS.
    async fn finish(self) -> anyhow::Result<Vec<u64>> {
        let _ = self.stop.send(());
        self.task.await.context("the RSS sampler task failed")?
    }
}

/// CPU time used by the agents and by this process (the HTTP client) over a phase.
#[derive(Debug, Serialize)]
pub struct CpuUse {
    /// Per agent, in cores (CPU seconds per wall-clock second).
    pub agents_cores: Vec<f64>,
    /// This process: the load generator and its HTTP client, in cores.
    pub client_cores: f64,
}

struct CpuMeter {
    pids: Vec<u32>,
    agents_secs: Vec<f64>,
    client_secs: f64,
    start: Instant,
}

impl CpuMeter {
    fn start(pids: &[u32]) -> anyhow::Result<CpuMeter> {
        Ok(CpuMeter {
            pids: pids.to_vec(),
            agents_secs: cpu_secs_of(pids)?,
            client_secs: procfs::own_cpu_secs()?,
            start: Instant::now(),
        })
    }

    fn finish(self) -> anyhow::Result<CpuUse> {
        let wall_secs = self.start.elapsed().as_secs_f64();
        let agents_now = cpu_secs_of(&self.pids)?;
        let client_now = procfs::own_cpu_secs()?;
        Ok(CpuUse {
            agents_cores: agents_now
                .iter()
                .zip(&self.agents_secs)
                .map(|(now, before)| (now - before) / wall_secs)
                .collect(),
            client_cores: (client_now - self.client_secs) / wall_secs,
        })
    }
}

fn cpu_secs_of(pids: &[u32]) -> anyhow::Result<Vec<f64>> {
    pids.iter().map(|pid| procfs::cpu_secs(*pid)).collect()
}

// ---------------------------------------------------------------------------------------------
// Throughput phase: closed loop
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct ThroughputResult {
    pub concurrency: usize,
    pub tally: Tally,
    /// From the first send until the last proposer's final answer.
    pub elapsed_secs: f64,
    pub events_per_s: f64,
    /// Each agent's highest RSS sampled during the phase.
    pub load_rss_kib: Vec<u64>,
    pub cpu: CpuUse,
}

async fn throughput_phase(
    target: &Target,
    pids: &[u32],
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<ThroughputResult> {
    let sampler = RssSampler::start(pids);
    let cpu = CpuMeter::start(pids)?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut proposers = JoinSet::new();
    for worker in 0..concurrency {
        proposers.spawn(closed_loop(target.clone(), worker, deadline));
    }
    let mut tally = Tally::default();
    while let Some(joined) = proposers.join_next().await {
        tally.merge(joined.context("a proposer task failed")?);
    }
    let elapsed_secs = start.elapsed().as_secs_f64();
    let cpu = cpu.finish()?;
    let load_rss_kib = sampler.finish().await?;
    Ok(ThroughputResult {
        concurrency,
        events_per_s: tally.acked as f64 / elapsed_secs,
        tally,
        elapsed_secs,
        load_rss_kib,
        cpu,
    })
}

/// One proposer: sends its next event as soon as the previous one is answered, until `deadline`.
async fn closed_loop(target: Target, worker: usize, deadline: Instant) -> Tally {
    let observer = (worker % 3) as NodeId + 1;
    let mut tally = Tally::default();
    let mut lsn = 0;
    while Instant::now() < deadline {
        lsn += 1;
        let answer = target.propose(&observation(observer, lsn)).await;
        tally.record(&answer);
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// Latency phase: open loop at a fixed rate
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct LatencyResult {
    pub rate_per_s: u64,
    pub sent: u64,
    pub tally: Tally,
    /// Latency from each request's scheduled send time to its acknowledgement.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// How late the generator spawned a request at worst (timer granularity, a busy runtime).
    pub max_send_lag_ms: f64,
    /// Each agent's highest RSS sampled during the phase.
    pub load_rss_kib: Vec<u64>,
    pub cpu: CpuUse,
}

/// One request's answer and its latency from its scheduled send time.
struct Timed {
    answer: anyhow::Result<ProposeAnswer>,
    latency: Duration,
}

async fn latency_phase(
    target: &Target,
    pids: &[u32],
    rate_per_s: u64,
    duration: Duration,
) -> anyhow::Result<LatencyResult> {
    let sampler = RssSampler::start(pids);
    let cpu = CpuMeter::start(pids)?;
    let count = rate_per_s * duration.as_secs();
    let start = Instant::now() + SCHEDULE_LEAD;
    let mut requests = JoinSet::new();
    let mut latencies = Vec::with_capacity(count as usize);
    let mut tally = Tally::default();
    let mut max_send_lag = Duration::ZERO;
    for n in 0..count {
        let scheduled = start + scheduled_offset(n, rate_per_s);
        tokio::time::sleep_until(scheduled).await;
        max_send_lag = max_send_lag.max(Instant::now().saturating_duration_since(scheduled));
        let target = target.clone();
        let observer = (n % 3) as NodeId + 1;
        requests.spawn(async move {
            let answer = target.propose(&observation(observer, n + 1)).await;
            Timed {
                answer,
                latency: scheduled.elapsed(),
            }
        });
        while let Some(joined) = requests.try_join_next() {
            collect(joined, &mut tally, &mut latencies)?;
        }
    }
    while let Some(joined) = requests.join_next().await {
        collect(joined, &mut tally, &mut latencies)?;
    }
    let cpu = cpu.finish()?;
    let load_rss_kib = sampler.finish().await?;
    latencies.sort_unstable();
    Ok(LatencyResult {
        rate_per_s,
        sent: count,
        tally,
        p50_ms: percentile_ms(&latencies, 0.50),
        p90_ms: percentile_ms(&latencies, 0.90),
        p99_ms: percentile_ms(&latencies, 0.99),
        max_ms: percentile_ms(&latencies, 1.0),
        max_send_lag_ms: millis(max_send_lag),
        load_rss_kib,
        cpu,
    })
}

/// When the `n`-th request is due, from the start of the phase.
fn scheduled_offset(n: u64, rate_per_s: u64) -> Duration {
    Duration::from_nanos(n * 1_000_000_000 / rate_per_s)
}

fn collect(
    joined: Result<Timed, tokio::task::JoinError>,
    tally: &mut Tally,
    latencies: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    let timed = joined.context("a request task failed")?;
    if timed.answer.is_ok() {
        latencies.push(timed.latency);
    }
    tally.record(&timed.answer);
    Ok(())
}

/// The nearest-rank percentile `p` (0..=1) of `sorted`, in milliseconds; 0 when empty.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    millis(sorted[rank.min(sorted.len()) - 1])
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Summary across runs
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub max: f64,
}

impl Stat {
    pub(crate) fn of(values: impl IntoIterator<Item = f64>) -> Stat {
        let mut values: Vec<f64> = values.into_iter().collect();
        values.sort_by(f64::total_cmp);
        Stat {
            median: median(&values),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

/// The median of sorted `values`: the mean of the two middle ones when their number is even.
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub events_per_s: Stat,
    pub latency_p50_ms: Stat,
    pub latency_p99_ms: Stat,
    pub latency_max_ms: Stat,
    /// The largest agent's idle RSS.
    pub idle_rss_kib: Stat,
    /// The largest agent's RSS sampled during the throughput phase.
    pub load_rss_kib: Stat,
    pub errors: u64,
}

impl Summary {
    fn of(runs: &[RunResult]) -> Summary {
        let max_of = |kib: &[u64]| kib.iter().copied().max().unwrap_or(0) as f64;
        Summary {
            events_per_s: Stat::of(runs.iter().map(|r| r.throughput.events_per_s)),
            latency_p50_ms: Stat::of(runs.iter().map(|r| r.latency.p50_ms)),
            latency_p99_ms: Stat::of(runs.iter().map(|r| r.latency.p99_ms)),
            latency_max_ms: Stat::of(runs.iter().map(|r| r.latency.max_ms)),
            idle_rss_kib: Stat::of(runs.iter().map(|r| max_of(&r.idle_rss_kib))),
            load_rss_kib: Stat::of(runs.iter().map(|r| max_of(&r.throughput.load_rss_kib))),
            errors: runs.iter().map(RunResult::errors).sum(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

fn print_run(number: usize, run: &RunResult, args: &BenchRaftArgs) {
    let t = &run.throughput;
    let l = &run.latency;
    println!(
        "\nrun {number}: leader node {}{}",
        run.leader,
        if run.leader_unchanged {
            ""
        } else {
            " (leader changed during the run!)"
        }
    );
    println!(
        "  throughput  {} proposers, {} s: {} acked, {} no-op, {} errors in {:.2} s = {:.0} events/s",
        t.concurrency,
        args.duration_secs,
        t.tally.acked,
        t.tally.no_ops,
        t.tally.errors,
        t.elapsed_secs,
        t.events_per_s
    );
    println!("              CPU {}", describe_cpu(&t.cpu));
    println!(
        "  latency     {}/s for {} s: {} sent, {} acked, {} errors; \
         p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (max send lag {:.2} ms)",
        l.rate_per_s,
        args.duration_secs,
        l.sent,
        l.tally.acked,
        l.tally.errors,
        l.p50_ms,
        l.p90_ms,
        l.p99_ms,
        l.max_ms,
        l.max_send_lag_ms
    );
    println!("              CPU {}", describe_cpu(&l.cpu));
    println!("  RSS (MiB)   {:>8} {:>8} {:>8}", "node1", "node2", "node3");
    print_rss_row("idle", &run.idle_rss_kib);
    print_rss_row("throughput", &t.load_rss_kib);
    print_rss_row("latency", &l.load_rss_kib);
    print_rss_row("after", &run.after_rss_kib);
    println!(
        "  events applied on the leader: {} (acked + registration: {})",
        run.events_applied,
        t.tally.acked + l.tally.acked + 1
    );
    for sample in t.tally.error_samples.iter().chain(&l.tally.error_samples) {
        println!("  error: {sample}");
    }
}

fn describe_cpu(cpu: &CpuUse) -> String {
    let agents: Vec<String> = cpu
        .agents_cores
        .iter()
        .map(|cores| format!("{cores:.2}"))
        .collect();
    let total: f64 = cpu.agents_cores.iter().sum::<f64>() + cpu.client_cores;
    format!(
        "(cores) agents {}, client {:.2}, total {:.2}",
        agents.join(" / "),
        cpu.client_cores,
        total
    )
}

fn print_rss_row(label: &str, kib: &[u64]) {
    let cells: Vec<String> = kib.iter().map(|k| format!("{:>8.1}", mib(*k))).collect();
    println!("    {label:<10}{}", cells.join(" "));
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_summary(summary: &Summary, runs: usize) {
    println!("\nsummary over {runs} runs");
    println!("  {:<30} {:>10} {:>10}   target", "metric", "median", "max");
    let row = |name: &str, stat: &Stat, target: &str| {
        println!(
            "  {name:<30} {:>10.2} {:>10.2}   {target}",
            stat.median, stat.max
        );
    };
    let as_mib = |stat: &Stat| Stat {
        median: stat.median / 1024.0,
        max: stat.max / 1024.0,
    };
    row(
        "events/s (closed loop)",
        &summary.events_per_s,
        &format!(">= {TARGET_EVENTS_PER_S}"),
    );
    row("latency p50 (ms)", &summary.latency_p50_ms, "");
    row(
        "latency p99 (ms)",
        &summary.latency_p99_ms,
        &format!("< {TARGET_P99_MS}"),
    );
    row("latency max (ms)", &summary.latency_max_ms, "");
    row(
        "idle RSS, largest agent (MiB)",
        &as_mib(&summary.idle_rss_kib),
        &format!(
            "< {TARGET_IDLE_RSS_MB} MB ({:.1} MiB)",
            mb_in_mib(TARGET_IDLE_RSS_MB)
        ),
    );
    row(
        "load RSS, largest agent (MiB)",
        &as_mib(&summary.load_rss_kib),
        "",
    );
    println!("  errors: {}", summary.errors);
}

fn mb_in_mib(mb: f64) -> f64 {
    mb * 1_000_000.0 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&sorted, 0.50), 50.0);
        assert_eq!(percentile_ms(&sorted, 0.99), 99.0);
        assert_eq!(percentile_ms(&sorted, 1.0), 100.0);
        assert_eq!(percentile_ms(&sorted[..1], 0.5), 1.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(Stat::of([3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Stat::of([4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(Stat::of([4.0, 1.0]).max, 4.0);
    }

    #[test]
    fn requests_are_spread_evenly_over_each_second() {
        assert_eq!(scheduled_offset(0, 500), Duration::ZERO);
        assert_eq!(scheduled_offset(1, 500), Duration::from_millis(2));
        assert_eq!(scheduled_offset(500, 500), Duration::from_secs(1));
        assert_eq!(scheduled_offset(1, 3), Duration::from_nanos(333_333_333));
    }
}
