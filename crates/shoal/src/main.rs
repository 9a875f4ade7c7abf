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
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `shoal run` starts once per command of a build: its usual forms are
    // read without building clap's parser.
    if let Some(a) = cmd::run::args_without_clap(&args) {
        return run(a);
    }
    let cli = match Cli::try_parse_from(args) {
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
        Command::Run(Lazy(a)) => return run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {}", message(&e));
            ExitCode::from(1)
        }
    }
}

/// `shoal run`: its exit status is the command's (125 when shoal failed).
fn run(a: cmd::run::RunArgs) -> ExitCode {
    match cmd::run::run(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal: {}", message(&e));
            ExitCode::from(125)
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

    /// `shoal run`'s command line read without clap, or `None`; and as
    /// clap reads it, or its error.
    fn both_ways(argv: &[&str]) -> (Option<String>, Result<String, String>) {
        let os: Vec<std::ffi::OsString> = argv.iter().map(Into::into).collect();
        let fast = cmd::run::args_without_clap(&os).map(|a| format!("{a:?}"));
        let clap = match Cli::try_parse_from(&os) {
            Ok(Cli {
                command: Command::Run(Lazy(a)),
            }) => Ok(format!("{a:?}")),
            Ok(other) => Err(format!("not run: {other:?}")),
            Err(e) => Err(e.to_string()),
        };
        (fast, clap)
    }

    #[test]
    fn run_read_without_clap_is_what_clap_reads() {
        // Flags, alone or two at a time, before a command: well formed,
        // and each way clap refuses or treats apart.
        let groups: &[&[&str]] = &[
            &[],
            &["--local"],
            &["--node", "h1"],
            &["--node=h1"],
            &["--node="],
            &["--node"],
            &["-v"],
            &["--verbose"],
            &["--verbose=true"],
            &["-t"],
            &["--tty"],
            &["-vt"],
            &["--cpus", "1.5"],
            &["--cpus", "abc"],
            &["--cpus", "inf"],
            &["--cpus", "1e3"],
            &["--cpus", "+2"],
            &["--mem", "512M"],
            &["--mem", "0"],
            &["--mem", "12Q"],
            &["--mem=2g"],
            &["--pids", "256"],
            &["--pids", "+5"],
            &["--pids", "-1"],
            &["--pids", "4294967296"],
            &["--pids", "007"],
            &["--retries", "0"],
            &["--retries", " 1"],
            &["--commit", "always"],
            &["--commit", "Always"],
            &["--commit=never"],
            &["--net", "host"],
            &["--net", "none"],
            &["--net", "loopback"],
            &["--image", "/x"],
            &["--image="],
            &["--data-dir", "/d"],
            &["--data-dir=/d"],
            &["--data-dir", ""],
            &["--agent", "/s"],
            &["--agent", "-"],
            &["--bogus"],
            &["--loc"],
            &["--help"],
            &["-h"],
            &["--version"],
            &["-V"],
        ];
        let commands: &[&[&str]] = &[
            &["--", "true"],
            &["true"],
            &["gcc", "-c", "x.c", "-o", "x.o"],
            &["--"],
            &[],
            &["--", "-x"],
            &["--", "a", "--", "b"],
            &["a", "--", "b"],
            &["-x"],
            &["--", "--local"],
            &["make", "-j4"],
            &["--", ""],
            &[""],
        ];
        let mut lines: Vec<Vec<&str>> = Vec::new();
        for g in groups {
            for c in commands {
                lines.push([&["shoal", "run"][..], g, c].concat());
            }
            for h in groups {
                for c in &commands[..3] {
                    lines.push([&["shoal", "run"][..], g, h, c].concat());
                }
            }
        }
        // Not `run`, or `run` not first.
        lines.push(vec!["shoal", "nodes"]);
        lines.push(vec!["shoal", "--data-dir", "/d", "run", "true"]);
        let mut read = 0;
        for argv in &lines {
            let (fast, clap) = both_ways(argv);
            if let Some(f) = fast {
                assert_eq!(Ok(f), clap, "{argv:?}");
                read += 1;
            }
        }
        eprintln!("{read} of {} lines read without clap", lines.len());
        // The test means something only if many lines take the fast path.
        assert!(read > lines.len() / 4, "{read} of {}", lines.len());
    }

    #[test]
    fn the_usual_forms_of_run_are_read_without_clap() {
        for argv in [
            &["shoal", "run", "--", "gcc", "-c", "x.c"][..],
            &["shoal", "run", "--data-dir", "/d", "--local", "--", "true"],
            &["shoal", "run", "-v", "--node", "h1", "make", "-j4"],
            &[
                "shoal",
                "run",
                "--cpus",
                "1.5",
                "--mem=512M",
                "--",
                "sh",
                "-c",
                "x",
            ],
        ] {
            let (fast, clap) = both_ways(argv);
            assert!(fast.is_some(), "{argv:?}");
            assert_eq!(Ok(fast.unwrap()), clap, "{argv:?}");
        }
        // Help and errors are clap's.
        for argv in [
            &["shoal", "run", "--help"][..],
            &["shoal", "run", "--local", "--node", "h1", "true"],
            &["shoal", "run", "--pids", "x", "true"],
            &["shoal", "run", "--"],
        ] {
            let (fast, clap) = both_ways(argv);
            assert!(fast.is_none() && clap.is_err(), "{argv:?}: {clap:?}");
        }
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
