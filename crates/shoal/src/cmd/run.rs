//! `shoal run`: run one command on the best node, as if it ran here.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use shoal_control::{Request, Response};
use shoal_task::link::{self, FrameSink, Plain};
use shoal_task::proto::{Commit, FromExec, Resources, Status, TaskSpec, ToExec};
use shoal_task::tree;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::AgentAddr;

/// Environment variables that stay on the submitting machine.
const ENV_DENY: &[&str] = &[
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "SSH_CONNECTION",
    "SSH_CLIENT",
    "SSH_TTY",
    "DISPLAY",
    "XAUTHORITY",
    "WAYLAND_DISPLAY",
    "DBUS_SESSION_BUS_ADDRESS",
    "XDG_RUNTIME_DIR",
    "SHOAL_AGENT",
    "SHOAL_DATA_DIR",
    "SHOAL_NODE",
    "SHOAL_TASK_ID",
    "LD_PRELOAD",
    "MAKEFLAGS",
    "MFLAGS",
    "GPG_AGENT_INFO",
];

/// `--commit`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum CommitArg {
    Always,
    Success,
    Never,
}

/// Flags of `shoal run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    agent: AgentAddr,
    /// CPUs' worth of time (e.g. 1.5).
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// Memory limit (e.g. 512M, 2G); the task is OOM-killed past it.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    mem: Option<u64>,
    /// Most processes and threads at once.
    #[arg(long, value_name = "N")]
    pids: Option<u32>,
    /// Run on this node.
    #[arg(long, value_name = "NAME", conflicts_with = "local")]
    node: Option<String>,
    /// Run on this machine (still in a workspace).
    #[arg(long)]
    local: bool,
    /// When the task's file changes come back.
    #[arg(long, value_enum, default_value = "success")]
    commit: CommitArg,
    /// `host` gives the task this machine's network (default: loopback only).
    #[arg(long, value_name = "MODE", value_parser = ["host", "loopback"])]
    net: Option<String>,
    /// Say where the task runs, and why when it falls back to this node.
    #[arg(short, long)]
    verbose: bool,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

/// Parses `512M`, `2G`, `1048576`, `64k`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_lowercase();
            let m: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M)"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("{s:?} is not a positive size"));
    }
    Ok((n * mult as f64) as u64)
}

fn task_id() -> String {
    use rand::TryRng;
    let mut b = [0u8; 8];
    let _ = rand::rngs::SysRng.try_fill_bytes(&mut b);
    hex::encode(b)
}

/// Runs the command right here, without the cluster (the agent is not
/// reachable): distcc's fallback.
fn run_plain(command: &[OsString]) -> anyhow::Result<ExitCode> {
    let st = match std::process::Command::new(&command[0])
        .args(&command[1..])
        .status()
    {
        Ok(st) => st,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("shoal: {}: command not found", command[0].to_string_lossy());
            return Ok(ExitCode::from(127));
        }
        Err(e) => bail!("{}: {e}", command[0].to_string_lossy()),
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(exit_code(match (st.code(), st.signal()) {
        (Some(c), _) => Status::Code(c),
        (None, Some(s)) => Status::Signal(s),
        _ => Status::Code(125),
    }))
}

/// The shell's `$?` for a status: the code, or 128 + the signal.
fn exit_code(s: Status) -> ExitCode {
    let v = match s {
        Status::Code(c) => c,
        Status::Signal(n) => 128 + n,
    };
    ExitCode::from(u8::try_from(v & 0xff).unwrap_or(125))
}

/// Runs `shoal run`.
pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    if let Some(c) = a.cpus {
        if !(c.is_finite() && (0.01..=4096.0).contains(&c)) {
            eprintln!("shoal: --cpus {c}: must be between 0.01 and 4096");
            return Ok(ExitCode::from(2));
        }
    }
    if a.pids == Some(0) {
        eprintln!("shoal: --pids 0: must be at least 1");
        return Ok(ExitCode::from(2));
    }
    let cwd = std::env::current_dir().context("the current directory")?;
    match shoal_files::recover(&cwd) {
        Ok(0) => {}
        Ok(n) => eprintln!(
            "shoal: finished {n} interrupted commit(s) in {}",
            cwd.display()
        ),
        Err(e) => bail!("recovering an interrupted commit in {}: {e}", cwd.display()),
    }
    let socket = a.agent.socket();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stream = match tokio::net::UnixStream::connect(&socket).await {
            Ok(s) => s,
            Err(e) => {
                if a.verbose {
                    eprintln!(
                        "shoal: running locally: no agent at {} ({e})",
                        socket.display()
                    );
                }
                return run_plain(&a.command);
            }
        };
        remote(a, stream, &cwd).await
    })
}

async fn remote(
    a: RunArgs,
    stream: tokio::net::UnixStream,
    cwd: &Path,
) -> anyhow::Result<ExitCode> {
    let manifest = match tokio::task::spawn_blocking({
        let cwd = cwd.to_owned();
        move || tree::scan(&cwd)
    })
    .await?
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("shoal: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let req = Request::Run {
        node: a.node.clone(),
        local: a.local,
        memory_bytes: a.mem,
    };
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut answer = String::new();
    r.read_line(&mut answer).await?;
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Run { node, fallback }) => {
            if a.verbose {
                match fallback {
                    Some(why) => eprintln!("shoal: running on {node} (this node): {why}"),
                    None => eprintln!("shoal: running on {node}"),
                }
            }
        }
        Ok(Response::Error { message }) => {
            eprintln!("shoal: {message}");
            return Ok(ExitCode::from(2));
        }
        Ok(other) => bail!("unexpected answer from the agent: {other:?}"),
        Err(e) => bail!("unexpected answer from the agent ({e}): {answer:?}"),
    }
    let spec = TaskSpec {
        task_id: task_id(),
        argv: a.command.iter().map(|s| s.as_bytes().to_vec()).collect(),
        env: std::env::vars_os()
            .filter(|(k, _)| !ENV_DENY.iter().any(|d| k.as_bytes() == d.as_bytes()))
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .collect(),
        cwd: cwd.to_owned(),
        tree: manifest.entries.clone(),
        resources: Resources {
            cpus: a.cpus,
            memory_bytes: a.mem,
            pids: a.pids,
        },
        net_host: a.net.as_deref() == Some("host"),
        commit: match a.commit {
            CommitArg::Always => Commit::Always,
            CommitArg::Success => Commit::Success,
            CommitArg::Never => Commit::Never,
        },
    };
    // One writer task owns the sending half.
    let (out_tx, mut out_rx) = mpsc::channel::<ToExec>(32);
    let writer = tokio::spawn(async move {
        let mut w = Plain(w);
        while let Some(m) = out_rx.recv().await {
            if link::send(&mut w, &m).await.is_err() {
                break;
            }
        }
        let _ = w.send_frame(&[]).await.ok();
    });
    out_tx.send(ToExec::Start(spec)).await?;
    let mut r = Plain(r);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut started = false;
    loop {
        let msg = match link::recv::<FromExec, _>(&mut r).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("shoal: lost the task: {e}");
                return Ok(ExitCode::from(125));
            }
        };
        match msg {
            FromExec::Need(hashes) => {
                let mut shipped = 0u64;
                let count = hashes.len();
                for h in hashes {
                    let Some(path) = manifest.sources.get(&h) else {
                        bail!("the executor asked for a content this tree does not have");
                    };
                    let data = tokio::fs::read(path)
                        .await
                        .with_context(|| format!("reading {}", path.display()))?;
                    if tree::hash(&data) != h {
                        eprintln!(
                            "shoal: {} changed while it was being sent; run again",
                            path.display()
                        );
                        return Ok(ExitCode::from(2));
                    }
                    shipped += data.len() as u64;
                    out_tx.send(ToExec::Blob { hash: h, data }).await?;
                }
                if a.verbose {
                    eprintln!(
                        "shoal: shipped {shipped} bytes ({count} contents) of a {}-byte tree",
                        manifest.bytes
                    );
                }
            }
            FromExec::Started { node } => {
                if a.verbose {
                    eprintln!("shoal: started on {node}");
                }
                if !started {
                    started = true;
                    forward_stdin(out_tx.clone());
                    forward_signals(out_tx.clone());
                }
            }
            FromExec::Stdout(d) => {
                stdout.write_all(&d)?;
                stdout.flush()?;
            }
            FromExec::Stderr(d) => {
                stderr.write_all(&d)?;
                stderr.flush()?;
            }
            FromExec::Changes(cs) => {
                let root: PathBuf = cwd.to_owned();
                let n = cs.len();
                let res =
                    tokio::task::spawn_blocking(move || shoal_files::apply(&root, &cs)).await?;
                if let Err(e) = res {
                    eprintln!("shoal: the task's file changes were not applied: {e}");
                    return Ok(ExitCode::from(125));
                }
                if a.verbose {
                    eprintln!("shoal: applied {n} change(s)");
                }
            }
            FromExec::Exit { status, oom } => {
                if oom {
                    let limit = a
                        .mem
                        .map_or_else(String::new, |m| format!(" of {} MiB", m >> 20));
                    eprintln!(
                        "shoal: {}: killed: out of memory (memory limit{limit})",
                        a.command[0].to_string_lossy()
                    );
                }
                writer.abort();
                return Ok(exit_code(status));
            }
            FromExec::Failed { code, message } => {
                eprintln!("shoal: {message}");
                writer.abort();
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(125)));
            }
        }
    }
}

/// Sends stdin to the task when it is a pipe or a file; a terminal is not
/// read (so that `make -j` jobs do not fight over it) and the task sees
/// end of input.
fn forward_stdin(tx: mpsc::Sender<ToExec>) {
    if std::io::stdin().is_terminal() {
        let _ = tx.try_send(ToExec::StdinEof);
        return;
    }
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        let mut input = std::io::stdin().lock();
        loop {
            match input.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(ToExec::StdinEof);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(ToExec::Stdin(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Forwards SIGINT, SIGTERM and SIGHUP to the task.
fn forward_signals(tx: mpsc::Sender<ToExec>) {
    use tokio::signal::unix::{signal, SignalKind};
    for (kind, n) in [
        (SignalKind::interrupt(), 2),
        (SignalKind::terminate(), 15),
        (SignalKind::hangup(), 1),
    ] {
        let tx = tx.clone();
        if let Ok(mut s) = signal(kind) {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if tx.send(ToExec::Signal(n)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    let _ = Duration::ZERO;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(Status::Code(42)), ExitCode::from(42));
        assert_eq!(exit_code(Status::Signal(9)), ExitCode::from(137));
    }
}
