//! `shoal`: one binary, one module per subcommand.
#![forbid(unsafe_code)]

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// A self-forming compute cluster for ordinary Linux machines.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where client commands find the local agent.
#[derive(Debug, Clone, Args)]
pub struct AgentAddr {
    /// The agent's data dir (its control socket is DIR/agent.sock).
    #[arg(long, value_name = "DIR", env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The agent's control socket, overriding --data-dir.
    #[arg(long, value_name = "SOCKET", env = "SHOAL_AGENT")]
    pub agent: Option<PathBuf>,
}

impl AgentAddr {
    /// The control socket path.
    pub fn socket(&self) -> PathBuf {
        shoal_control::resolve_socket(self.agent.as_deref(), self.data_dir.as_deref(), |_| None)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: discover peers, form the cluster, serve client commands.
    #[command(args_override_self = true)]
    Agent(cmd::agent::AgentArgs),
    /// Write a new cluster key (mode 0600).
    Keygen(cmd::keygen::KeygenArgs),
    /// List the cluster's nodes as this machine's agent sees them.
    Nodes(cmd::nodes::NodesArgs),
    /// Make the local agent leave the cluster gracefully and stop.
    Leave(cmd::leave::LeaveArgs),
    /// Run a command on the best node, as if it ran here.
    Run(cmd::run::RunArgs),
    /// Show the owner's state and policy, force busy/idle, or reload it.
    Owner(cmd::owner::OwnerArgs),
    /// List the tasks running on this node and their states.
    Ps(cmd::ps::PsArgs),
    /// Queue a batch job (`-- CMD` or a job.toml); prints its id.
    Submit(cmd::submit::SubmitArgs),
    /// List the batch jobs submitted from this node.
    Jobs(cmd::jobs::JobsArgs),
    /// Show a job's tasks and why the waiting ones wait.
    Status(cmd::status::StatusArgs),
    /// Wait for a job, with a progress bar.
    Wait(cmd::wait::WaitArgs),
    /// Print a task's stdout (or stderr), optionally following it.
    Logs(cmd::logs::LogsArgs),
    /// Cancel a job.
    Cancel(cmd::cancel::CancelArgs),
    /// Queue a job's failed tasks again.
    Retry(cmd::retry::RetryArgs),
    /// A warm slot's spawner, started by the agent (internal).
    #[command(name = "__spawner", hide = true)]
    Spawner {
        /// Where to assemble the slot's root (in a mount namespace of its
        /// own).
        root: Option<std::path::PathBuf>,
    },
}

/// The error and its causes, each cause only when the text so far does
/// not already say it (our error types quote their OS errors).
fn message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !msg.contains(&c) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&c);
        }
    }
    msg
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Agent(a) => cmd::agent::run(a),
        Command::Keygen(a) => cmd::keygen::run(&a),
        Command::Nodes(a) => cmd::nodes::run(&a),
        Command::Leave(a) => cmd::leave::run(&a),
        Command::Owner(a) => cmd::owner::run(&a),
        Command::Ps(a) => cmd::ps::run(&a),
        Command::Jobs(a) => cmd::jobs::run(&a),
        Command::Status(a) => cmd::status::run(&a),
        Command::Logs(a) => cmd::logs::run(&a),
        Command::Cancel(a) => cmd::cancel::run(&a),
        Command::Retry(a) => cmd::retry::run(&a),
        Command::Spawner { root } => cmd::spawner::run(root.as_deref()),
        Command::Submit(a) => match cmd::submit::run(&a) {
            Ok(code) => return code,
            Err(e) => {
                eprintln!("shoal: {}", message(&e));
                return ExitCode::from(1);
            }
        },
        Command::Wait(a) => match cmd::wait::run(&a) {
            Ok(code) => return code,
            Err(e) => {
                eprintln!("shoal: {}", message(&e));
                return ExitCode::from(1);
            }
        },
        Command::Run(a) => match cmd::run::run(a) {
            Ok(code) => return code,
            Err(e) => {
                eprintln!("shoal: {}", message(&e));
                return ExitCode::from(125);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {}", message(&e));
            ExitCode::from(1)
        }
    }
}
