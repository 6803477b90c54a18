//! `bench-api`: how many load-balancer checks and cluster reads an agent answers, measured by
//! wrk (Debian's package) from another process against a three-node cluster with real
//! PostgreSQL, and whether a failover under that load takes longer than without it.
//!
//! Each run starts a fresh cluster, then: wrk on `GET /primary` of the primary's agent, as fast
//! as it can and paced at the target's 10,000 requests/s, and wrk on `GET /cluster` of the same
//! agent, each for `duration_secs`; then the time from `kill -9` of the primary's postmaster
//! until a standby's PostgreSQL answers that it left recovery (asked every 2 ms over a kept
//! connection to each standby), once without load and once with
//! wrk loading `GET /primary` on every agent, as fast as it can or at `--load-rate` requests/s
//! per agent. Load balancers check at a rate; a flood takes both of this machine's cores and
//! shows what the CPU left costs a failover. `--wrk-nice` runs wrk at a lower CPU priority,
//! which stands for a load balancer on another host: on one 2-core machine wrk at full speed
//! otherwise takes CPU the failover needs.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::ValueEnum as _;
use raftmgr_raft::NodeId;
use serde::Serialize;
use tokio::time::Instant;

use crate::bench::Stat;
use crate::cluster::{LocalCluster, Options};
use crate::wait;

const TARGET_PRIMARY_REQUESTS_PER_S: f64 = 10_000.0;
const TARGET_PRIMARY_P99_MS: f64 = 5.0;
/// What a paced wrk connection spends per request besides its `delay()`: the answer, and its
/// event loop's timer firing late. Measured here: 32 connections waiting 3 ms each sent 8,700
/// requests/s, a cycle of 3.7 ms.
const WRK_CYCLE_OVERHEAD_MS: f64 = 0.7;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchApiArgs {
    /// The raftmgr binary [default: `raftmgr` next to this executable].
    #[arg(long)]
    pub raftmgr: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds of load per endpoint.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// wrk's open connections.
    #[arg(long, default_value_t = 32)]
    pub connections: u32,
    /// wrk's threads.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// The nice value wrk runs at (0: the same priority as the cluster).
    #[arg(long, default_value_t = 0)]
    pub wrk_nice: i32,
    /// What wrk asks each loaded agent during the loaded failover.
    #[arg(long, default_value = "/primary")]
    pub load_path: String,
    /// Requests per second wrk sends each loaded agent during the loaded failover, paced by its
    /// `delay()` hook over `--connections` (0: as fast as it can: a flood, which on this
    /// machine takes every core).
    #[arg(long, default_value_t = 0)]
    pub load_rate: u32,
    /// Which agents wrk loads during the loaded failover.
    #[arg(long, value_enum, default_value_t = LoadOn::Every)]
    pub load_on: LoadOn,
    /// Instead of wrk on every agent, run this many busy loops (at `--wrk-nice`) during the
    /// loaded failover: CPU taken from the cluster without one API request, which tells what
    /// serving the API costs a failover from what sharing the CPU costs it.
    #[arg(long, default_value_t = 0)]
    pub cpu_hogs: usize,
    /// A `key = value` line for every agent's `[api]` section, e.g. `--api-setting
    /// 'max_requests_per_s = 10000'` (repeatable).
    #[arg(long = "api-setting")]
    pub api_settings: Vec<String>,
    /// Copy each run's agent and PostgreSQL logs here (`runN-nodeI.log`, `runN-nodeI-pg.log`),
    /// with the instants of its two faults (`runN-faults.txt`), to see where a failover's time
    /// went.
    #[arg(long)]
    pub keep_logs: Option<PathBuf>,
}

/// The agents under load during the loaded failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadOn {
    /// All three.
    Every,
    /// Only the primary's, whose PostgreSQL is then killed: its agent must see the death and
    /// resign while it serves the load.
    Primary,
    /// Only the standbys': one of them decides or is promoted while it serves the load.
    Standbys,
    /// Only the standby with the lowest id: node 1, the first primary, whose agent has usually
    /// led Raft since the start and so decides the failover.
    OneStandby,
}

#[derive(Debug, Clone, Serialize)]
pub struct WrkResult {
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-2xx/3xx answers and socket errors.
    pub errors: u64,
}

#[derive(Debug, Serialize)]
pub struct ApiRun {
    /// As many requests as wrk gets answered.
    pub primary: WrkResult,
    /// Paced at the target rate: the latency a load balancer sees at that rate.
    pub primary_at_target: WrkResult,
    pub cluster: WrkResult,
    /// `kill -9` of the primary's postmaster until a standby left recovery.
    pub failover_idle_ms: f64,
    pub failover_loaded_ms: f64,
    /// What the loaded agents answered together meanwhile (requests/s).
    pub loaded_requests_per_s: f64,
}

pub async fn bench_api(args: BenchApiArgs) -> anyhow::Result<()> {
    let binary = match &args.raftmgr {
        Some(path) => path.clone(),
        None => crate::bench::default_binary()?,
    };
    let mut runs = Vec::new();
    for number in 1..=args.runs {
        let run = one_run(&binary, &args, number)
            .await
            .with_context(|| format!("run {number}"))?;
        println!(
            "run {number}: /primary {:.0} req/s p50 {:.2} ms p99 {:.2} ms ({} errors), paced \
             {:.0} req/s p99 {:.2} ms; /cluster {:.0} req/s p99 {:.2} ms; failover {:.0} ms \
             idle, {:.0} ms under load ({:.0} req/s, load on: {})",
            run.primary.requests_per_s,
            run.primary.p50_ms,
            run.primary.p99_ms,
            run.primary.errors,
            run.primary_at_target.requests_per_s,
            run.primary_at_target.p99_ms,
            run.cluster.requests_per_s,
            run.cluster.p99_ms,
            run.failover_idle_ms,
            run.failover_loaded_ms,
            run.loaded_requests_per_s,
            args.load_on
                .to_possible_value()
                .expect("no variant is skipped")
                .get_name()
        );
        runs.push(run);
    }
    let stat = |f: fn(&ApiRun) -> f64| Stat::of(runs.iter().map(f));
    let summary = serde_json::json!({
        "primary_requests_per_s": stat(|r| r.primary.requests_per_s),
        "primary_p99_ms": stat(|r| r.primary.p99_ms),
        "primary_at_target_requests_per_s": stat(|r| r.primary_at_target.requests_per_s),
        "primary_at_target_p99_ms": stat(|r| r.primary_at_target.p99_ms),
        "cluster_requests_per_s": stat(|r| r.cluster.requests_per_s),
        "cluster_p99_ms": stat(|r| r.cluster.p99_ms),
        "failover_idle_ms": stat(|r| r.failover_idle_ms),
        "failover_loaded_ms": stat(|r| r.failover_loaded_ms),
        "loaded_requests_per_s": stat(|r| r.loaded_requests_per_s),
        "wrk_nice": args.wrk_nice,
        "cpu_hogs": args.cpu_hogs,
        "load_path": args.load_path,
        "load_rate_per_agent": args.load_rate,
        "load_on": args.load_on,
        "targets": {
            "primary_requests_per_s": TARGET_PRIMARY_REQUESTS_PER_S,
            "primary_p99_ms": TARGET_PRIMARY_P99_MS,
        },
        "runs": runs,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

async fn one_run(
    binary: &std::path::Path,
    args: &BenchApiArgs,
    number: usize,
) -> anyhow::Result<ApiRun> {
    let options = Options {
        postgres: true,
        api_settings: args.api_settings.clone(),
        ..Options::default()
    };
    let cluster = LocalCluster::start(binary, &options).await?;
    let ids = cluster.ids();
    cluster.setup_replication(&ids).await?;
    let url = |id: NodeId, path: &str| format!("http://{}{path}", cluster.node(id).api_addr);
    let seconds = args.duration_secs;
    let primary = wrk(&url(1, "/primary"), args, seconds, 0).await?;
    let target_rate = TARGET_PRIMARY_REQUESTS_PER_S as u32;
    let primary_at_target = wrk(&url(1, "/primary"), args, seconds, target_rate).await?;
    let cluster_read = wrk(&url(1, "/cluster"), args, seconds, 0).await?;

    let (failover_idle_ms, idle_fault) = failover(&cluster, 1).await?;
    let new_primary = primary_of(&cluster).await?;
    let old: Vec<NodeId> = ids
        .iter()
        .copied()
        .filter(|id| *id != new_primary)
        .collect();
    cluster
        .wait_streaming(new_primary, &old, Duration::from_secs(60))
        .await
        .context("the old primary rejoining")?;
    let hogs = CpuHogs::start(args.cpu_hogs, args.wrk_nice)?;
    let wrk_on = ids.iter().filter(|id| match args.load_on {
        _ if args.cpu_hogs > 0 => false,
        LoadOn::Every => true,
        LoadOn::Primary => **id == new_primary,
        LoadOn::Standbys => **id != new_primary,
        LoadOn::OneStandby => Some(**id) == ids.iter().copied().find(|s| *s != new_primary),
    });
    let loads: Vec<_> = wrk_on
        .map(|id| {
            let url = url(*id, &args.load_path);
            let args = args.clone();
            tokio::spawn(async move { wrk(&url, &args, seconds + 5, args.load_rate).await })
        })
        .collect();
    // Let the load settle before the fault.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (failover_loaded_ms, loaded_fault) = failover(&cluster, new_primary).await?;
    drop(hogs);
    let mut loaded_requests_per_s = 0.0;
    for load in loads {
        loaded_requests_per_s += load.await??.requests_per_s;
    }
    if let Some(dir) = &args.keep_logs {
        let faults = format!(
            "idle fault (node 1) at unix {:.3}\nloaded fault (node {new_primary}) at unix {:.3}\n",
            unix_seconds(idle_fault),
            unix_seconds(loaded_fault)
        );
        keep_logs(&cluster, dir, number, &faults)?;
    }
    Ok(ApiRun {
        primary,
        primary_at_target,
        cluster: cluster_read,
        failover_idle_ms,
        failover_loaded_ms,
        loaded_requests_per_s,
    })
}

fn unix_seconds(at: std::time::SystemTime) -> f64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Copies every node's agent log and PostgreSQL logs into `dir`, and writes `faults` beside them.
fn keep_logs(
    cluster: &LocalCluster,
    dir: &std::path::Path,
    number: usize,
    faults: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(format!("run{number}-faults.txt")), faults)?;
    for id in cluster.ids() {
        let node = cluster.node(id);
        std::fs::copy(&node.log, dir.join(format!("run{number}-node{id}.log")))?;
        let mut pg_log = String::new();
        let mut files: Vec<_> = std::fs::read_dir(node.pg_data.join("log"))?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            pg_log += &std::fs::read_to_string(&file).unwrap_or_default();
        }
        std::fs::write(dir.join(format!("run{number}-node{id}-pg.log")), pg_log)?;
    }
    Ok(())
}

/// Busy-loop processes, killed by pid when dropped.
struct CpuHogs(Vec<std::process::Child>);

impl CpuHogs {
    fn start(count: usize, nice: i32) -> anyhow::Result<CpuHogs> {
        let mut hogs = CpuHogs(Vec::new());
        for _ in 0..count {
            let child = std::process::Command::new("nice")
                .args(["-n", &nice.to_string(), "sh", "-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()
                .context("starting a busy loop")?;
            hogs.0.push(child);
        }
        Ok(hogs)
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn primary_of(cluster: &LocalCluster) -> anyhow::Result<NodeId> {
    let view = cluster.view(cluster.ids()[1]).await?;
    view.state.primary.context("no primary")
}

/// How often the failover's watcher asks each standby whether it left recovery. The watcher
/// keeps one connection per standby: a fresh connection per question costs a backend's start,
/// which grows under load and would be counted as the failover's.
const WATCH_EVERY: Duration = Duration::from_millis(2);

/// `kill -9` of `old`'s postmaster; the milliseconds until another node's PostgreSQL is out of
/// recovery (asked directly, not through the loaded API), then that it is the ready primary of
/// a newer generation; and the wall-clock instant of the kill.
async fn failover(
    cluster: &LocalCluster,
    old: NodeId,
) -> anyhow::Result<(f64, std::time::SystemTime)> {
    let others: Vec<NodeId> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    let generation = cluster.view(others[0]).await?.state.generation;
    let mut standbys = Vec::new();
    for id in &others {
        standbys.push(Standby::connect(cluster, *id).await?);
    }
    let (fault, fault_at) = (Instant::now(), std::time::SystemTime::now());
    cluster.kill_postmaster(old)?;
    let deadline = fault + Duration::from_secs(60);
    'watch: loop {
        for standby in &mut standbys {
            if standby.writable().await {
                break 'watch;
            }
        }
        if Instant::now() >= deadline {
            bail!("no standby left recovery within 60 s of the fault");
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
    let elapsed = fault.elapsed();
    wait::until(
        "the new primary's committed report",
        Duration::from_secs(60),
        || async {
            let view = cluster.view(others[0]).await.map_err(|e| e.to_string())?;
            let s = &view.state;
            match s.primary {
                Some(p) if p != old && s.generation > generation && s.primary_ready => Ok(()),
                _ => Err(format!(
                    "generation {} primary {:?}",
                    s.generation, s.primary
                )),
            }
        },
    )
    .await?;
    Ok((elapsed.as_secs_f64() * 1000.0, fault_at))
}

/// A kept connection to a standby's PostgreSQL, opened again when it breaks.
struct Standby {
    conninfo: String,
    client: Option<tokio_postgres::Client>,
}

impl Standby {
    async fn connect(cluster: &LocalCluster, id: NodeId) -> anyhow::Result<Standby> {
        let mut standby = Standby {
            conninfo: format!("{} connect_timeout=1", cluster.pg_conninfo(id)),
            client: None,
        };
        standby.reconnect().await;
        anyhow::ensure!(
            standby.client.is_some(),
            "cannot connect to node {id}'s PostgreSQL"
        );
        Ok(standby)
    }

    async fn reconnect(&mut self) {
        self.client = match tokio_postgres::connect(&self.conninfo, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                Some(client)
            }
            Err(_) => None,
        };
    }

    /// Whether this PostgreSQL answers that it is not in recovery.
    async fn writable(&mut self) -> bool {
        if self.client.is_none() {
            self.reconnect().await;
        }
        let Some(client) = &self.client else {
            return false;
        };
        // The simple query protocol: one round trip (a prepared query takes two).
        match client.simple_query("SELECT pg_is_in_recovery()").await {
            Ok(messages) => messages.iter().any(|m| {
                matches!(m, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("f"))
            }),
            Err(_) => {
                self.client = None;
                false
            }
        }
    }
}

/// Runs wrk against `url` and reads its summary: `rate` requests/s, or as many as it can (0).
async fn wrk(url: &str, args: &BenchApiArgs, seconds: u64, rate: u32) -> anyhow::Result<WrkResult> {
    // wrk waits `delay()` whole ms on each connection before its next request; fractions are
    // carried over to the next call.
    let mut script = tempfile::Builder::new().suffix(".lua").tempfile()?;
    if rate > 0 {
        let cycle_ms = f64::from(args.connections) * 1000.0 / f64::from(rate);
        let delay_ms = (cycle_ms - WRK_CYCLE_OVERHEAD_MS).max(0.0);
        use std::io::Write;
        writeln!(
            script,
            "local owed = 0\n\
             function delay()\n\
             \x20 owed = owed + {delay_ms}\n\
             \x20 local whole = math.floor(owed)\n\
             \x20 owed = owed - whole\n\
             \x20 return whole\n\
             end"
        )?;
    }
    let out = tokio::process::Command::new("nice")
        .args(["-n", &args.wrk_nice.to_string(), "wrk", "--latency", "-s"])
        .arg(script.path())
        .arg("-t")
        .arg(args.threads.to_string())
        .arg("-c")
        .arg(args.connections.to_string())
        .arg("-d")
        .arg(format!("{seconds}s"))
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk (Debian package wrk)")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// Reads requests/s, the 50 % and 99 % latencies and the errors from wrk's `--latency` output.
pub fn parse_wrk(text: &str) -> anyhow::Result<WrkResult> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let requests_per_s: f64 = field("Requests/sec:")
        .context("no Requests/sec in wrk's output")?
        .parse()?;
    let p50_ms = latency_ms(field("50%").context("no 50% latency in wrk's output")?)?;
    let p99_ms = latency_ms(field("99%").context("no 99% latency in wrk's output")?)?;
    let non_2xx: u64 = field("Non-2xx or 3xx responses:").map_or(Ok(0), str::parse)?;
    let socket_errors: u64 = field("Socket errors:")
        .map(|rest| {
            rest.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Ok(WrkResult {
        requests_per_s,
        p50_ms,
        p99_ms,
        errors: non_2xx + socket_errors,
    })
}

fn latency_ms(text: &str) -> anyhow::Result<f64> {
    let (number, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))
        .with_context(|| format!("no unit in latency {text:?}"))?;
    let value: f64 = number.trim().parse()?;
    Ok(match unit.trim() {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        other => bail!("unknown latency unit {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrks_summary() {
        let text = "Running 10s test @ http://127.0.0.1:8001/primary\n\
  1 threads and 32 connections\n\
  Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
    Latency     1.21ms  310.50us   9.80ms   88.00%\n\
    Req/Sec    26.51k     1.20k   28.10k    70.00%\n\
  Latency Distribution\n\
     50%    1.15ms\n\
     75%    1.30ms\n\
     90%    1.55ms\n\
     99%  850.00us\n\
  263812 requests in 10.00s, 40.25MB read\n\
  Socket errors: connect 0, read 2, write 0, timeout 1\n\
  Non-2xx or 3xx responses: 5\n\
Requests/sec:  26380.12\n\
Transfer/sec:      4.02MB\n";
        let r = parse_wrk(text).expect("parses");
        assert_eq!(r.requests_per_s, 26380.12);
        assert_eq!(r.p50_ms, 1.15);
        assert_eq!(r.p99_ms, 0.85);
        assert_eq!(r.errors, 8);
        assert!(parse_wrk("garbage").is_err());
    }
}
