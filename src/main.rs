//! `raftmgr`: the agent daemon and the command-line tool.

#![forbid(unsafe_code)]

mod agent;
mod client;
mod commands;
mod config;
mod demo;
mod failover;
mod guard;
mod logging;
mod pg;
mod supervisor;
mod tls;
mod wake;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use raftmgr_api::{AddMember, MembershipAnswer};

#[derive(Debug, Parser)]
#[command(
    name = "raftmgr",
    version,
    about = "PostgreSQL high availability on a Raft group of agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent daemon for one node.
    Agent {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Inspect or start the cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Change the Raft membership.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Set up or register this node's PostgreSQL as the primary.
    #[command(subcommand)]
    Primary(PrimaryCommand),
    /// Set up or register this node's PostgreSQL as a standby.
    #[command(subcommand)]
    Standby(StandbyCommand),
    /// Manage a node's registration.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Run a local cluster on this machine: node1 primary, the others streaming standbys.
    Demo(demo::DemoArgs),
    /// Switch the primary over to another node (planned, clean: no rewind needed).
    Switchover {
        #[command(flatten)]
        target: client::Target,
        /// The node to promote (default: the best streaming standby).
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
        /// Return once requested instead of waiting for the new primary.
        #[arg(long)]
        no_wait: bool,
    },
    /// Manual failover to a named standby, when automatic failover cannot act: the cluster is
    /// paused, or the primary is down or resigned. Waits for the new primary.
    Failover {
        #[command(flatten)]
        target: client::Target,
        /// The node to promote.
        #[arg(long, value_name = "NODE")]
        to: String,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Maintenance mode: no automatic failover until `resume`.
    Pause {
        #[command(flatten)]
        target: client::Target,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Turn automatic failover back on.
    Resume {
        #[command(flatten)]
        target: client::Target,
    },
    /// The agent's fencing sidecar (started by the agent; not for direct use).
    #[command(hide = true)]
    LeaseGuard {
        #[arg(long)]
        lease_file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// The node's configuration file.
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum PrimaryCommand {
    /// initdb, configure for replication, start and register a new primary.
    Init(ConfigArg),
    /// Register this node's running PostgreSQL as the primary.
    Register(ConfigArg),
}

#[derive(Debug, Subcommand)]
enum StandbyCommand {
    /// Promote this standby by a planned switchover (repmgr's verb).
    Switchover(ConfigArg),
    /// Clone a standby from a registered node with pg_basebackup.
    Clone {
        #[command(flatten)]
        config: ConfigArg,
        /// The node to clone from (name or id).
        #[arg(long, value_name = "NODE")]
        from: String,
    },
    /// Register this node as a standby; its agent then starts it.
    Register {
        #[command(flatten)]
        config: ConfigArg,
        /// The node it streams from (default: the primary).
        #[arg(long, value_name = "NODE")]
        upstream: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// This node's role, PostgreSQL state, lease and lag, and its Raft role. Exit code 0 while
    /// its PostgreSQL runs, 1 otherwise.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Rewind this node's PostgreSQL from the current primary and start it as a standby (its
    /// agent does it, and reports RejoinPlanned/RejoinCompleted).
    Rejoin(ConfigArg),
    /// Restart this node's PostgreSQL (stop cleanly, start again in its role; the primary in
    /// place, without a failover).
    Restart(ConfigArg),
    /// Clone this standby afresh from the primary (its data directory is kept aside) and start
    /// it as a standby. Refused on the primary.
    Reinitialize(ConfigArg),
    /// Remove a node's registration (default: this node). The primary cannot be unregistered.
    Unregister {
        #[command(flatten)]
        config: ConfigArg,
        /// The node to unregister (name or id).
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Start a new cluster from this node and the peers in its configuration (once, on one node).
    Init {
        #[command(flatten)]
        target: client::Target,
    },
    /// Show the registered nodes (role, status, upstream, timeline, LSN, lag) and Raft members.
    Show {
        #[command(flatten)]
        target: client::Target,
        /// Print JSON (`nodes`, `raft`, `state`) instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// List the recent events of the log, oldest first.
    Events {
        #[command(flatten)]
        target: client::Target,
        /// Only events about this node (name or id).
        #[arg(long)]
        node: Option<String>,
        /// Only events of this type, e.g. NodeRegistered, HealthObserved.
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// Print JSON (with --follow: one object per line).
        #[arg(long)]
        json: bool,
        /// Keep printing new events as they are applied, until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum MemberCommand {
    /// Add a member: it joins as a learner, catches up, then becomes a voter.
    Add {
        #[command(flatten)]
        target: client::Target,
        #[arg(long)]
        node_id: u64,
        #[arg(long, value_name = "HOST:PORT")]
        raft_addr: String,
        #[arg(long, value_name = "HOST:PORT")]
        api_addr: String,
        /// Keep it a learner (replicates, does not vote).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member from the Raft group.
    Remove {
        #[command(flatten)]
        target: client::Target,
        #[arg(long)]
        node_id: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config } => run_agent(&config),
        Command::LeaseGuard {
            lease_file,
            data_dir,
        } => match guard::run(&lease_file, &data_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lease-guard: {e:#}");
                ExitCode::FAILURE
            }
        },
        command => {
            logging::init(None);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            match runtime.block_on(run_command(command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// How long the agent's exit waits for blocking work still running.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn run_agent(path: &std::path::Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(config::EXIT_INVALID_CONFIG as u8);
        }
    };
    logging::init(Some(&config.file.name));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(async { agent::run(config, shutdown_signal()).await });
    // A blocking call in flight (`pg_ctl start -w`, pg_basebackup) would otherwise hold the exit
    // until it ends; its child process goes on without us, and the next agent takes it from there.
    runtime.shutdown_timeout(EXIT_WAIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent { .. } | Command::LeaseGuard { .. } => unreachable!("handled in main"),
        Command::Cluster(ClusterCommand::Init { target }) => {
            let answer: serde_json::Value = client::Client::new(&target)?
                .post("/cluster/init", &serde_json::json!({}))
                .await?;
            println!("cluster initialized with members {}", answer["initialized"]);
        }
        Command::Cluster(ClusterCommand::Show { target, json }) => {
            let view = client::Client::new(&target)?.cluster().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", client::render_cluster(&view));
            }
        }
        Command::Cluster(ClusterCommand::Events {
            target,
            node,
            kind,
            json,
            follow,
        }) => {
            let mut query = Vec::new();
            if let Some(node) = node {
                query.push(format!("node={node}"));
            }
            if let Some(kind) = kind {
                query.push(format!("type={kind}"));
            }
            if follow {
                query.push("follow=1".into());
            }
            let path = format!("/events?{}", query.join("&"));
            let client = client::Client::new(&target)?;
            if follow {
                client.follow(&path, |m| print_followed(&m, json)).await?;
                anyhow::bail!("the agent ended the event stream (it is shutting down)");
            }
            let events: Vec<raftmgr_raft::state::RecordedEvent> = client.get(&path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                print!("{}", client::render_events(&events));
            }
        }
        Command::Member(MemberCommand::Add {
            target,
            node_id,
            raft_addr,
            api_addr,
            learner,
        }) => {
            let answer: MembershipAnswer = client::Client::new(&target)?
                .post(
                    "/members",
                    &AddMember {
                        node_id,
                        raft_addr,
                        api_addr,
                        voter: !learner,
                    },
                )
                .await?;
            let role = if learner { "learner" } else { "voter" };
            println!(
                "node {node_id} is a {role} (log index {})",
                answer.log_index
            );
        }
        Command::Member(MemberCommand::Remove { target, node_id }) => {
            let answer: MembershipAnswer = client::Client::new(&target)?
                .delete(&format!("/members/{node_id}"))
                .await?;
            println!("node {node_id} removed (log index {})", answer.log_index);
        }
        Command::Primary(PrimaryCommand::Init(c)) => commands::primary_init(&load(&c)?).await?,
        Command::Primary(PrimaryCommand::Register(c)) => {
            commands::primary_register(&load(&c)?).await?
        }
        Command::Standby(StandbyCommand::Clone { config, from }) => {
            commands::standby_clone(&load(&config)?, &from).await?
        }
        Command::Standby(StandbyCommand::Register { config, upstream }) => {
            commands::standby_register(&load(&config)?, upstream.as_deref()).await?
        }
        Command::Demo(args) => demo::run(args).await?,
        Command::Pause { target, reason } => {
            let body = raftmgr_api::PauseRequest { reason };
            let _: raftmgr_api::PauseAnswer =
                client::Client::new(&target)?.post("/pause", &body).await?;
            println!("paused: no automatic failover until `raftmgr resume`");
        }
        Command::Resume { target } => {
            let _: raftmgr_api::PauseAnswer = client::Client::new(&target)?
                .post("/resume", &serde_json::json!({}))
                .await?;
            println!("resumed: automatic failover is on");
        }
        Command::Switchover {
            target,
            to,
            no_wait,
        } => {
            let client = client::Client::new(&target)?;
            commands::switchover(&client, to, !no_wait).await?
        }
        Command::Standby(StandbyCommand::Switchover(c)) => {
            let node = load(&c)?;
            let client = client::Client::for_node(&node)?;
            commands::switchover(&client, Some(node.file.name.clone()), true).await?
        }
        Command::Node(NodeCommand::Rejoin(c)) => commands::node_rejoin(&load(&c)?).await?,
        Command::Node(NodeCommand::Restart(c)) => commands::node_restart(&load(&c)?).await?,
        Command::Node(NodeCommand::Reinitialize(c)) => {
            commands::node_reinitialize(&load(&c)?).await?
        }
        Command::Failover { target, to, json } => {
            let client = client::Client::new(&target)?;
            commands::failover(&client, to, json).await?
        }
        Command::Node(NodeCommand::Status { config, json }) => {
            commands::node_status(&load(&config)?, json).await?
        }
        Command::Node(NodeCommand::Unregister { config, node }) => {
            commands::node_unregister(&load(&config)?, node.as_deref()).await?
        }
    }
    Ok(())
}

/// One message of `cluster events --follow`: an event on stdout, a gap on stderr.
fn print_followed(message: &client::SseMessage, json: bool) -> anyhow::Result<()> {
    if message.event.as_deref() == Some("missed") {
        let missed: serde_json::Value = serde_json::from_str(&message.data)?;
        eprintln!(
            "({} events were applied too fast to be shown)",
            missed["missed"]
        );
        return Ok(());
    }
    let event: raftmgr_raft::state::RecordedEvent = serde_json::from_str(&message.data)
        .with_context(|| format!("unexpected event from the agent: {}", message.data))?;
    if json {
        println!("{}", serde_json::to_string(&event)?);
    } else {
        println!("{}", client::render_event_line(&event));
    }
    Ok(())
}

fn load(arg: &ConfigArg) -> anyhow::Result<config::NodeConfig> {
    config::load(&arg.config).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}
