//! `raftmgr-jepsen`: the lab's command line.

use clap::{Parser, Subcommand};
use raftmgr_jepsen::bench;

#[derive(Parser)]
#[command(
    name = "raftmgr-jepsen",
    about = "Real raftmgr clusters on this machine: benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Commit throughput, commit latency and agent memory of a three-node cluster on loopback.
    BenchRaft(bench::BenchRaftArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BenchRaft(args) => bench::bench_raft(args).await,
    }
}
