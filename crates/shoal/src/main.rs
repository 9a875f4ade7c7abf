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

/// A subcommand's arguments, defined only when it is the one given
/// (`clap::Command::defer`). Defining every subcommand's arguments was a
/// quarter of `shoal --version`'s CPU (0.56 → 0.42 ms), and `shoal run`
/// starts once per command of a build.
#[derive(Debug)]
struct Lazy<T>(T);

impl<T: clap::FromArgMatches> clap::FromArgMatches for Lazy<T> {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches(m).map(Self)
    }
    fn from_arg_matches_mut(m: &mut clap::ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches_mut(m).map(Self)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }
    fn update_from_arg_matches_mut(&mut self, m: &mut clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches_mut(m)
    }
}

impl<T: Args> Args for Lazy<T> {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.defer(deferred::<T, false>)
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        cmd.defer(deferred::<T, true>)
    }
}

/// A subcommand's arguments, defined once it is the one given. Its
/// description stays the one set before (the variant's doc comment), not
/// that of its arguments' struct.
fn deferred<T: Args, const UPDATE: bool>(cmd: clap::Command) -> clap::Command {
    let about = cmd.get_about().cloned();
    let long_about = cmd.get_long_about().cloned();
    let cmd = if UPDATE {
        T::augment_args_for_update(cmd)
    } else {
        T::augment_args(cmd)
    };
    let cmd = match about {
        Some(a) => cmd.about(a),
        None => cmd.about(None::<&str>),
    };
    match long_about {
        Some(a) => cmd.long_about(a),
        None => cmd.long_about(None::<&str>),
    }
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
    Agent(Lazy<cmd::agent::AgentArgs>),
    /// Write a new cluster key (mode 0600).
    Keygen(Lazy<cmd::keygen::KeygenArgs>),
    /// List the cluster's nodes as this machine's agent sees them.
    Nodes(Lazy<cmd::nodes::NodesArgs>),
    /// Make the local agent leave the cluster gracefully and stop.
    Leave(Lazy<cmd::leave::LeaveArgs>),
    /// Run a command on the best node, as if it ran here.
    Run(Lazy<cmd::run::RunArgs>),
    /// Show the owner's state and policy, force busy/idle, or reload it.
    Owner(Lazy<cmd::owner::OwnerArgs>),
    /// List the tasks running on this node and their states.
    Ps(Lazy<cmd::ps::PsArgs>),
    /// Queue a batch job (`-- CMD` or a job.toml); prints its id.
    Submit(Lazy<cmd::submit::SubmitArgs>),
    /// List the batch jobs submitted from this node.
    Jobs(Lazy<cmd::jobs::JobsArgs>),
    /// Show a job's tasks and why the waiting ones wait.
    Status(Lazy<cmd::status::StatusArgs>),
    /// Wait for a job, with a progress bar.
    Wait(Lazy<cmd::wait::WaitArgs>),
    /// Print a task's stdout (or stderr), optionally following it.
    Logs(Lazy<cmd::logs::LogsArgs>),
    /// Cancel a job.
    Cancel(Lazy<cmd::cancel::CancelArgs>),
    /// Queue a job's failed tasks again.
    Retry(Lazy<cmd::retry::RetryArgs>),
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
        Command::Agent(Lazy(a)) => cmd::agent::run(a),
        Command::Keygen(Lazy(a)) => cmd::keygen::run(&a),
        Command::Nodes(Lazy(a)) => cmd::nodes::run(&a),
        Command::Leave(Lazy(a)) => cmd::leave::run(&a),
        Command::Owner(Lazy(a)) => cmd::owner::run(&a),
        Command::Ps(Lazy(a)) => cmd::ps::run(&a),
        Command::Jobs(Lazy(a)) => cmd::jobs::run(&a),
        Command::Status(Lazy(a)) => cmd::status::run(&a),
        Command::Logs(Lazy(a)) => cmd::logs::run(&a),
        Command::Cancel(Lazy(a)) => cmd::cancel::run(&a),
        Command::Retry(Lazy(a)) => cmd::retry::run(&a),
        Command::Spawner { root } => cmd::spawner::run(root.as_deref()),
        Command::Submit(Lazy(a)) => match cmd::submit::run(&a) {
            Ok(code) => return code,
            Err(e) => {
                eprintln!("shoal: {}", message(&e));
                return ExitCode::from(1);
            }
        },
        Command::Wait(Lazy(a)) => match cmd::wait::run(&a) {
            Ok(code) => return code,
            Err(e) => {
                eprintln!("shoal: {}", message(&e));
                return ExitCode::from(1);
            }
        },
        Command::Run(Lazy(a)) => match cmd::run::run(a) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_deferred_subcommand_parses_and_keeps_its_description() {
        let cli =
            Cli::try_parse_from(["shoal", "run", "--cpus", "1.5", "--", "gcc", "-c"]).unwrap();
        let Command::Run(Lazy(a)) = cli.command else {
            panic!("not run");
        };
        let a = format!("{a:?}");
        assert!(a.contains("cpus: Some(1.5)"), "{a}");
        assert!(a.contains(r#"command: ["gcc", "-c"]"#), "{a}");
        let e = Cli::try_parse_from(["shoal", "run", "--help"]).unwrap_err();
        let help = e.to_string();
        assert!(
            help.starts_with("Run a command on the best node, as if it ran here"),
            "{help}"
        );
        assert!(help.contains("--cpus <N>"), "{help}");
        // Errors name the subcommand's own arguments.
        let e = Cli::try_parse_from(["shoal", "nodes", "--no-such-flag"]).unwrap_err();
        assert!(e.to_string().contains("--no-such-flag"), "{e}");
    }
}
