//! `shoal run`'s arguments read without clap, in the forms a build gives
//! them (`make CC="shoal run -- gcc"` starts one client per compile).
//!
//! Building clap's definition of `run` and parsing with it was about a
//! sixth of the client's CPU, much of it page faults in clap's code
//! (BENCHMARKS.md, session 14). This reads the flags [`RunArgs`] defines,
//! each at most once, each value as clap's parser for it would take it,
//! then the command. On anything else (help, `--version`, an unknown or
//! repeated flag, grouped short flags, a value clap would refuse or that
//! starts with `-`, `--node` with `--local`, no command, a `--` inside the
//! command, an empty `SHOAL_DATA_DIR`) it gives up, and clap parses the
//! whole line as before, with its messages. A test checks that whatever is
//! read here, clap reads the same.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::ValueEnum;

use super::{parse_size, CommitArg, RunArgs, DEFAULT_RETRIES, NET_MODES};
use crate::AgentAddr;

/// The flags with a value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Valued {
    DataDir,
    Agent,
    Cpus,
    Mem,
    Pids,
    Node,
    Commit,
    Net,
    Retries,
    Image,
}

/// What a token before the command is.
enum Flag {
    Valued(Valued),
    Local,
    Verbose,
    Tty,
}

fn flag(name: &str) -> Option<Flag> {
    Some(match name {
        "--data-dir" => Flag::Valued(Valued::DataDir),
        "--agent" => Flag::Valued(Valued::Agent),
        "--cpus" => Flag::Valued(Valued::Cpus),
        "--mem" => Flag::Valued(Valued::Mem),
        "--pids" => Flag::Valued(Valued::Pids),
        "--node" => Flag::Valued(Valued::Node),
        "--commit" => Flag::Valued(Valued::Commit),
        "--net" => Flag::Valued(Valued::Net),
        "--retries" => Flag::Valued(Valued::Retries),
        "--image" => Flag::Valued(Valued::Image),
        "--local" => Flag::Local,
        "-v" | "--verbose" => Flag::Verbose,
        "-t" | "--tty" => Flag::Tty,
        _ => return None,
    })
}

/// `RunArgs` from `args` (the whole command line, `shoal run ...`), or
/// `None` where clap is to parse it. `env` reads an environment variable
/// (`SHOAL_DATA_DIR`, `SHOAL_AGENT`), as clap does when the flag is absent.
pub(crate) fn parse(args: &[OsString], env: impl Fn(&str) -> Option<OsString>) -> Option<RunArgs> {
    if args.get(1).map(OsString::as_os_str) != Some(OsStr::new("run")) {
        return None;
    }
    let mut a = RunArgs {
        agent: AgentAddr {
            data_dir: None,
            agent: None,
        },
        cpus: None,
        mem: None,
        pids: None,
        node: None,
        local: false,
        commit: CommitArg::Success,
        net: None,
        retries: DEFAULT_RETRIES,
        verbose: false,
        tty: false,
        image: None,
        command: Vec::new(),
    };
    let mut seen: Vec<Valued> = Vec::new();
    let mut i = 2;
    while i < args.len() {
        // Only UTF-8 flags and values here.
        let tok = args[i].to_str()?;
        if tok == "--" {
            i += 1;
            break;
        }
        if !tok.starts_with('-') {
            // The command starts (everything from here is its own).
            break;
        }
        let (name, attached) = match tok.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (tok, None),
        };
        match flag(name)? {
            Flag::Local if attached.is_none() && !a.local => a.local = true,
            Flag::Verbose if attached.is_none() && !a.verbose => a.verbose = true,
            Flag::Tty if attached.is_none() && !a.tty => a.tty = true,
            Flag::Valued(v) if !seen.contains(&v) => {
                seen.push(v);
                let value = match attached {
                    Some(s) => s,
                    None => {
                        i += 1;
                        args.get(i)?.to_str()?
                    }
                };
                if value.is_empty() || value.starts_with('-') {
                    return None;
                }
                set(&mut a, v, value)?;
            }
            _ => return None,
        }
        i += 1;
    }
    let command = args.get(i..).unwrap_or_default();
    if command.is_empty() || command.iter().any(|c| c == "--") {
        return None;
    }
    if a.local && a.node.is_some() {
        return None;
    }
    a.command = command.to_vec();
    if !seen.contains(&Valued::DataDir) {
        a.agent.data_dir = from_env(&env, "SHOAL_DATA_DIR")?;
    }
    if !seen.contains(&Valued::Agent) {
        a.agent.agent = from_env(&env, "SHOAL_AGENT")?;
    }
    Some(a)
}

/// A path flag's value from the environment: `Some(None)` when unset,
/// `None` (clap's to judge) when set but empty.
fn from_env(env: &impl Fn(&str) -> Option<OsString>, name: &str) -> Option<Option<PathBuf>> {
    match env(name) {
        None => Some(None),
        Some(v) if v.is_empty() => None,
        Some(v) => Some(Some(PathBuf::from(v))),
    }
}

/// Sets flag `v` to `value` as clap's parser for it would, or `None`.
fn set(a: &mut RunArgs, v: Valued, value: &str) -> Option<()> {
    match v {
        Valued::DataDir => a.agent.data_dir = Some(PathBuf::from(value)),
        Valued::Agent => a.agent.agent = Some(PathBuf::from(value)),
        Valued::Cpus => a.cpus = Some(value.parse().ok()?),
        Valued::Mem => a.mem = Some(parse_size(value).ok()?),
        Valued::Pids => a.pids = Some(value.parse().ok()?),
        Valued::Node => a.node = Some(value.to_owned()),
        // (As clap matches a value enum: by name, case and all.)
        Valued::Commit => a.commit = CommitArg::from_str(value, false).ok()?,
        Valued::Net => {
            if !NET_MODES.contains(&value) {
                return None;
            }
            a.net = Some(value.to_owned());
        }
        Valued::Retries => a.retries = value.parse().ok()?,
        Valued::Image => a.image = Some(PathBuf::from(value)),
    }
    Some(())
}
