//! `raftmgr-jepsen`: the lab's command line.

use clap::{Parser, Subcommand};
use raftmgr_jepsen::{api_bench, bench, chaos, failover_bench};

#[derive(Parser)]
#[command(
    name = "raftmgr-jepsen",
    about = "Real raftmgr clusters on this machine: chaos tests and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A chaos run: clients recording every write, seeded faults (kill, pause, partition, ...),
    /// and checkers for lost writes, split brain, convergence and log agreement; writes a report.
    Test(chaos::ChaosArgs),
    /// Judges a chaos run's recorded history again and rewrites its report.
    Check(chaos::CheckArgs),
    /// Commit throughput, commit latency and agent memory of a three-node cluster on loopback.
    BenchRaft(bench::BenchRaftArgs),
    /// Write unavailability, lost writes and rejoin time of automatic failover and switchover,
    /// as a client writing every 20 ms sees them, and pg_rewind versus re-clone (real
    /// PostgreSQL).
    BenchFailover(failover_bench::BenchFailoverArgs),
    /// Requests/s and latency of `GET /primary` and `GET /cluster` under wrk, and failover time
    /// with and without that load (real PostgreSQL; needs Debian's wrk).
    BenchApi(api_bench::BenchApiArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Test(args) => chaos::test(args).await,
        Command::Check(args) => chaos::check(args),
        Command::BenchRaft(args) => bench::bench_raft(args).await,
        Command::BenchFailover(args) => failover_bench::bench_failover(args).await,
        Command::BenchApi(args) => api_bench::bench_api(args).await,
    }
}
