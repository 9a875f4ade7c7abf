//! `shoal run`: run one command on the best node, as if it ran here.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use shoal_control::{Request, Response};
use shoal_task::hashcache::HashCache;
use shoal_task::image::{self, Image};
use shoal_task::link::{self, Plain};
use shoal_task::proto::{Commit, FromExec, ImageRef, Resources, Status, TaskSpec, ToExec};
use shoal_task::tree;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::AgentAddr;

mod fast;

/// `shoal run`'s arguments from the whole command line without clap, in
/// the forms a build gives them; `None` where clap is to parse it (see
/// [`fast`]).
pub(crate) fn args_without_clap(args: &[OsString]) -> Option<RunArgs> {
    fast::parse(args, |name| std::env::var_os(name))
}

/// The environment a task gets: ours, minus what stays on this machine.
pub(crate) fn forwarded_env() -> Vec<(Vec<u8>, Vec<u8>)> {
    std::env::vars_os()
        .filter(|(k, _)| !ENV_DENY.iter().any(|d| k.as_bytes() == d.as_bytes()))
        .map(|(k, v)| (k.into_vec(), v.into_vec()))
        .collect()
}

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

/// `--net`'s values.
const NET_MODES: [&str; 2] = ["host", "loopback"];
/// `--retries` when not given.
const DEFAULT_RETRIES: u32 = 2;

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
    #[arg(long, value_name = "MODE", value_parser = NET_MODES)]
    net: Option<String>,
    /// Run again elsewhere this many times when an executor is lost
    /// mid-task (output already shown is not repeated; files are committed
    /// once).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RETRIES)]
    retries: u32,
    /// Say where the task runs, and why when it falls back to this node.
    #[arg(short, long)]
    verbose: bool,
    /// Give the command a pseudo-terminal (as `ssh -t`): this terminal
    /// goes raw, every keystroke (Ctrl-C included) reaches the command,
    /// and window size changes follow. stdout and stderr are one stream.
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// Run in this software environment: a root filesystem as a
    /// directory or a tarball (debootstrap, `docker export`; gzip or
    /// not). Its system directories replace the executor's; it is shipped
    /// by content and kept on each executor under its hash.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
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

/// Finishes (or undoes) the commits a crash interrupted in the tree at
/// `cwd`, so that the command sees the tree as they leave it.
fn recover(cwd: &Path) -> Result<(), String> {
    match shoal_files::recover(cwd) {
        Ok(0) => Ok(()),
        Ok(n) => {
            eprintln!(
                "shoal: finished {n} interrupted commit(s) in {}",
                cwd.display()
            );
            Ok(())
        }
        Err(e) => Err(format!(
            "recovering an interrupted commit in {}: {e}",
            cwd.display()
        )),
    }
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

/// Runs `shoal run`. The process is to exit right after: the runtime
/// this makes is not torn down.
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
    let socket = a.agent.socket();
    // Sockets, pipes and signals; no timer (the client sets none), whose
    // driver would be made for nothing on every run.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let code = rt.block_on(async move {
        let first = match tokio::net::UnixStream::connect(&socket).await {
            Ok(s) => s,
            Err(e) => {
                if a.image.is_some() {
                    // Without the agent there is no workspace to put it in.
                    eprintln!(
                        "shoal: no agent at {} ({e}); --image needs one",
                        socket.display()
                    );
                    return Ok(ExitCode::from(125));
                }
                if a.verbose {
                    eprintln!(
                        "shoal: running locally: no agent at {} ({e})",
                        socket.display()
                    );
                }
                // Here the tree is not scanned: whatever a crash left is
                // looked for directly.
                if let Err(e) = recover(&cwd) {
                    eprintln!("shoal: {e}");
                    return Ok(ExitCode::from(2));
                }
                return run_plain(&a.command);
            }
        };
        session(a, &socket, &cwd, first).await
    });
    // The process ends now (the terminal, if it was raw, is restored by
    // then): the runtime's teardown, its tasks dropped and its descriptors
    // closed one by one, is left to the kernel's exit.
    std::mem::forget(rt);
    code
}

/// How one attempt ended.
enum Outcome {
    /// The task ended (or was refused): exit with this.
    Done(ExitCode),
    /// The executor (or the way to it) was lost before the end.
    Lost {
        /// Where it ran.
        node: String,
        /// What broke.
        why: String,
    },
    /// The executor's owner took the machine back: run it elsewhere.
    Evicted {
        /// Where it ran.
        node: String,
        /// Why.
        why: String,
    },
}

/// Evictions after which `shoal run` gives up (each one excludes a node,
/// so this is only reached on a very large cluster of busy owners).
const MAX_EVICTIONS: u32 = 64;

/// What earlier attempts already did, so a retry neither repeats output
/// nor commits twice.
#[derive(Debug, Default)]
struct Progress {
    /// Bytes of stdout already written here.
    out: u64,
    /// Bytes of stderr already written here.
    err: u64,
    /// Input was forwarded (it cannot be replayed).
    stdin_sent: Arc<AtomicBool>,
    /// The file changes were applied.
    committed: bool,
    /// This terminal in raw mode for `-t` (restored on drop).
    raw: Option<RawMode>,
}

/// The terminal on stdin in raw mode, as it was before restored on drop.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Option<Self> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
        Some(Self(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

impl std::fmt::Debug for RawMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawMode")
    }
}

/// The size of the terminal on stdout (or stdin), rows and columns.
fn window() -> Option<(u16, u16)> {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()
        .filter(|w| w.ws_row > 0 && w.ws_col > 0)
        .map(|w| (w.ws_row, w.ws_col))
}

/// Writes the part of `chunk` (at `offset` in its stream, in this attempt)
/// that earlier attempts have not written yet.
fn write_new(
    w: &mut impl Write,
    chunk: &[u8],
    offset: &mut u64,
    written: &mut u64,
) -> std::io::Result<()> {
    let start = *offset;
    *offset += chunk.len() as u64;
    if *offset > *written {
        let skip = usize::try_from(written.saturating_sub(start))
            .unwrap_or(usize::MAX)
            .min(chunk.len());
        w.write_all(&chunk[skip..])?;
        w.flush()?;
        *written = *offset;
    }
    Ok(())
}

async fn session(
    a: RunArgs,
    socket: &Path,
    cwd: &Path,
    first: tokio::net::UnixStream,
) -> anyhow::Result<ExitCode> {
    // The connection that found the agent serves the first attempt.
    let mut first = Some(first);
    // Nothing else runs yet: the scan blocks this (only) runtime thread
    // rather than start a thread of its own.
    let scanned = ({
        let cwd = cwd.to_owned();
        let image = a.image.clone();
        move || -> Result<_, String> {
            // Files unchanged since an earlier run are not read again.
            let mut cache = HashCache::for_root(&cwd);
            let mut m = tree::scan_with(&cwd, &mut cache).map_err(|e| e.to_string())?;
            if m.internal {
                // A commit a crash interrupted is finished (or undone)
                // first: the task sees the tree as it ends up.
                recover(&cwd)?;
                m = tree::scan_with(&cwd, &mut cache).map_err(|e| e.to_string())?;
            }
            if let Err(e) = cache.save() {
                tracing::debug!(error = %e, "hash cache not saved");
            }
            let img = match image {
                Some(p) => {
                    let mut cache = HashCache::for_root(&p);
                    let img = image::scan(&p, &mut cache).map_err(|e| e.to_string())?;
                    if let Err(e) = cache.save() {
                        tracing::debug!(error = %e, "hash cache not saved");
                    }
                    Some(img)
                }
                None => None,
            };
            Ok((m, img.map(Arc::new)))
        }
    })();
    let (manifest, image) = match scanned {
        Ok(x) => x,
        Err(e) => {
            eprintln!("shoal: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let spec = TaskSpec {
        task_id: task_id(),
        argv: a.command.iter().map(|s| s.as_bytes().to_vec()).collect(),
        env: forwarded_env(),
        cwd: cwd.to_owned(),
        tree: manifest.entries.clone(),
        resources: Resources {
            cpus: a.cpus,
            memory_bytes: a.mem,
            pids: a.pids,
        },
        net_host: a.net.as_deref() == Some("host"),
        tty: a.tty.then(|| window().unwrap_or((24, 80))),
        commit: match a.commit {
            CommitArg::Always => Commit::Always,
            CommitArg::Success => Commit::Success,
            CommitArg::Never => Commit::Never,
        },
        image: image.as_ref().map(|i| ImageRef {
            id: i.id,
            name: i.origin.display().to_string(),
        }),
        detach: false,
        no_input: no_input(a.tty),
    };
    let mut progress = Progress::default();
    let mut exclude: Vec<String> = Vec::new();
    let mut pin = a.node.clone();
    let mut evictions = 0u32;
    let mut attempt = 0u32;
    loop {
        let connected = match first.take() {
            Some(s) => Ok(s),
            None => tokio::net::UnixStream::connect(socket).await,
        };
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                eprintln!("shoal: lost the agent at {} ({e})", socket.display());
                return Ok(ExitCode::from(125));
            }
        };
        let once = attempt_once(
            &a,
            pin.as_deref(),
            stream,
            &spec,
            &manifest,
            image.as_ref(),
            cwd,
            &exclude,
            &mut progress,
        )
        .await?;
        match once {
            Outcome::Done(code) => return Ok(code),
            Outcome::Evicted { node, why } => {
                // Not a failure: no retry is spent, and a `--node` pin gives
                // way (the owner of that node wants it back).
                if progress.stdin_sent.load(Ordering::Relaxed) {
                    eprintln!("shoal: evicted from {node} ({why}); its input cannot be sent again");
                    return Ok(ExitCode::from(125));
                }
                evictions += 1;
                if evictions > MAX_EVICTIONS {
                    eprintln!("shoal: evicted {MAX_EVICTIONS} times; giving up");
                    return Ok(ExitCode::from(125));
                }
                if a.verbose {
                    eprintln!("shoal: evicted from {node} ({why}); running it elsewhere");
                }
                exclude.push(node);
                pin = None;
            }
            Outcome::Lost { node, why } => {
                if progress.committed {
                    // Changes are sent just before the exit status; with the
                    // default policy they mean success.
                    if matches!(a.commit, CommitArg::Success) {
                        return Ok(ExitCode::SUCCESS);
                    }
                    eprintln!(
                        "shoal: lost the task on {node} after its changes were applied ({why})"
                    );
                    return Ok(ExitCode::from(125));
                }
                if progress.stdin_sent.load(Ordering::Relaxed) {
                    eprintln!(
                        "shoal: lost the task on {node} ({why}); its input cannot be sent again"
                    );
                    return Ok(ExitCode::from(125));
                }
                if attempt == a.retries {
                    eprintln!("shoal: lost the task on {node} ({why}); no retries left");
                    return Ok(ExitCode::from(125));
                }
                attempt += 1;
                if a.verbose {
                    eprintln!("shoal: lost the task on {node} ({why}); running it again elsewhere");
                }
                exclude.push(node);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)] // one attempt's whole context
async fn attempt_once(
    a: &RunArgs,
    pin: Option<&str>,
    stream: tokio::net::UnixStream,
    spec: &TaskSpec,
    manifest: &tree::Manifest,
    image: Option<&Arc<Image>>,
    cwd: &Path,
    exclude: &[String],
    progress: &mut Progress,
) -> anyhow::Result<Outcome> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let req = Request::Run {
        node: pin.map(str::to_owned),
        local: a.local,
        memory_bytes: a.mem,
        exclude: exclude.to_vec(),
    };
    let mut out = serde_json::to_vec(&req)?;
    out.push(b'\n');
    // The task goes with the request, in the same write (the agent wakes
    // once), not after the answer (one round trip less): the agent reads
    // it once it has placed the task, here or on the node it relays to. A
    // refusal leaves it unread (and may close the link before it is all
    // written: the refusal is read first).
    link::send(&mut Plain(&mut out), &ToExec::Start(spec.clone())).await?;
    let sent = w.write_all(&out).await;
    let mut answer = String::new();
    r.read_line(&mut answer).await?;
    let node = match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Run { node, fallback }) => {
            if a.verbose {
                match &fallback {
                    Some(why) => eprintln!("shoal: running on {node} (this node): {why}"),
                    None => eprintln!("shoal: running on {node}"),
                }
            }
            node
        }
        Ok(Response::Error { message }) => {
            eprintln!("shoal: {message}");
            return Ok(Outcome::Done(ExitCode::from(2)));
        }
        Ok(other) => bail!("unexpected answer from the agent: {other:?}"),
        Err(e) => bail!("unexpected answer from the agent ({e}): {answer:?}"),
    };
    if let Err(e) = sent {
        return Ok(Outcome::Lost {
            node,
            why: format!("sending the task: {e}"),
        });
    }
    // One writer task owns the sending half.
    let (out_tx, mut out_rx) = mpsc::channel::<ToExec>(32);
    let writer = tokio::spawn(async move {
        let mut w = Plain(w);
        while let Some(m) = out_rx.recv().await {
            if link::send(&mut w, &m).await.is_err() {
                break;
            }
        }
    });
    let mut r = Plain(r);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let (mut out_at, mut err_at) = (0u64, 0u64);
    let mut started = false;
    // The executor asked for contents (it does only when it lacks any).
    let mut needed = false;
    // A commit whose large files are still coming, and its size.
    let mut streaming: Option<(shoal_files::Commit, usize)> = None;
    let outcome = loop {
        let msg = match link::recv::<FromExec, _>(&mut r).await {
            Ok(m) => m,
            Err(e) => {
                break Outcome::Lost {
                    node: node.clone(),
                    why: e.to_string(),
                }
            }
        };
        match msg {
            FromExec::NeedImage => {
                let Some(img) = image else {
                    bail!("the executor asked for an image this task does not have");
                };
                out_tx.send(ToExec::Image(img.entries.clone())).await?;
            }
            FromExec::Need(hashes) => {
                let mut shipped = 0u64;
                let count = hashes.len();
                let (of_tree, of_image): (Vec<_>, Vec<_>) = hashes
                    .into_iter()
                    .partition(|h| manifest.sources.contains_key(h));
                if !of_image.is_empty() {
                    let Some(img) = image.cloned() else {
                        bail!("the executor asked for a content this tree does not have");
                    };
                    let tx = out_tx.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        let mut n = 0u64;
                        img.contents(&of_image, |hash, data| {
                            n += data.len() as u64;
                            tx.blocking_send(ToExec::Blob { hash, data })
                                .map_err(|_| std::io::Error::other("the link closed"))
                        })
                        .map(|()| n)
                    })
                    .await?;
                    match r {
                        Ok(n) => shipped += n,
                        Err(e) => {
                            eprintln!("shoal: {e}");
                            writer.abort();
                            return Ok(Outcome::Done(ExitCode::from(2)));
                        }
                    }
                }
                for h in of_tree {
                    let Some(path) = manifest.sources.get(&h) else {
                        bail!("the executor asked for a content this tree does not have");
                    };
                    // Read on this (only) runtime thread, as the scan was:
                    // the task has not started, nothing else waits, and a
                    // blocking-pool thread (`tokio::fs`) cost a thread's
                    // start and exit per run that ships anything.
                    let data = std::fs::read(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    if tree::hash(&data) != h {
                        eprintln!(
                            "shoal: {} changed while it was being sent; run again",
                            path.display()
                        );
                        writer.abort();
                        return Ok(Outcome::Done(ExitCode::from(2)));
                    }
                    shipped += data.len() as u64;
                    out_tx.send(ToExec::Blob { hash: h, data }).await?;
                }
                needed = true;
                if a.verbose {
                    say_shipped(shipped, count, manifest, image);
                }
            }
            FromExec::Started { node } => {
                if a.verbose && !needed {
                    // (An executor that lacks nothing says nothing.)
                    say_shipped(0, 0, manifest, image);
                }
                if !started {
                    started = true;
                    forward_signals(out_tx.clone(), a.tty);
                    if a.tty && std::io::stdin().is_terminal() {
                        progress.raw = RawMode::enter();
                    }
                    forward_stdin(out_tx.clone(), progress.stdin_sent.clone(), spec.no_input);
                }
                if a.verbose {
                    eprintln!("shoal: started on {node}");
                }
            }
            FromExec::Stdout(d) => write_new(&mut stdout, &d, &mut out_at, &mut progress.out)?,
            FromExec::Stderr(d) => write_new(&mut stderr, &d, &mut err_at, &mut progress.err)?,
            FromExec::Changes(cs) => {
                let n = cs.len();
                // On this (only) runtime thread: the task has ended, nothing
                // else is waiting but signals, which may wait for the commit;
                // a thread of its own would cost more than most commits.
                let r = if cs.streamed().next().is_some() {
                    // Large files follow: staged as they come, committed
                    // when the last byte is there (at once when they are
                    // all empty).
                    shoal_files::Commit::begin(cwd, &cs).and_then(|c| {
                        streaming = Some((c, n));
                        finish_when_complete(&mut streaming, progress, a.verbose)
                    })
                } else {
                    shoal_files::apply(cwd, &cs).map(|()| {
                        progress.committed = true;
                        if a.verbose {
                            eprintln!("shoal: applied {n} change(s)");
                        }
                    })
                };
                if let Err(e) = r {
                    eprintln!("shoal: the task's file changes were not applied: {e}");
                    break Outcome::Done(ExitCode::from(125));
                }
            }
            FromExec::Content(d) => {
                let Some((c, _)) = streaming.as_mut() else {
                    eprintln!("shoal: protocol: file contents without changes");
                    break Outcome::Done(ExitCode::from(125));
                };
                let r = c
                    .feed(&d)
                    .and_then(|()| finish_when_complete(&mut streaming, progress, a.verbose));
                if let Err(e) = r {
                    // (A commit dropped unfinished leaves nothing behind.)
                    eprintln!("shoal: the task's file changes were not applied: {e}");
                    break Outcome::Done(ExitCode::from(125));
                }
            }
            FromExec::Exit { status, oom, .. } => {
                if streaming.is_some() {
                    eprintln!(
                        "shoal: the task's file changes were not applied: their contents ended early"
                    );
                    break Outcome::Done(ExitCode::from(125));
                }
                if oom {
                    let limit = a
                        .mem
                        .map_or_else(String::new, |m| format!(" of {} MiB", m >> 20));
                    eprintln!(
                        "shoal: {}: killed: out of memory (memory limit{limit})",
                        a.command[0].to_string_lossy()
                    );
                }
                break Outcome::Done(exit_code(status));
            }
            FromExec::Evicted { node, reason } => {
                break Outcome::Evicted { node, why: reason };
            }
            FromExec::Unknown => {
                break Outcome::Lost {
                    node: node.clone(),
                    why: "the executor lost the task".into(),
                }
            }
            FromExec::Failed { code, message } => {
                eprintln!("shoal: {message}");
                break Outcome::Done(ExitCode::from(u8::try_from(code).unwrap_or(125)));
            }
        }
    };
    writer.abort();
    Ok(outcome)
}

/// Says, for `--verbose`, what this attempt shipped.
fn say_shipped(shipped: u64, count: usize, manifest: &tree::Manifest, image: Option<&Arc<Image>>) {
    let of_image = image.map_or_else(String::new, |i| format!(" and a {}-byte image", i.bytes));
    eprintln!(
        "shoal: shipped {shipped} bytes ({count} contents) of a {}-byte tree{of_image}",
        manifest.bytes
    );
}

/// Finishes a streaming commit once all its contents have come.
fn finish_when_complete(
    streaming: &mut Option<(shoal_files::Commit, usize)>,
    progress: &mut Progress,
    verbose: bool,
) -> Result<(), shoal_files::ApplyError> {
    if streaming.as_ref().is_some_and(|(c, _)| c.missing() == 0) {
        if let Some((c, n)) = streaming.take() {
            c.finish()?;
            progress.committed = true;
            if verbose {
                eprintln!("shoal: applied {n} change(s)");
            }
        }
    }
    Ok(())
}

/// Sends stdin to the task when it is a pipe or a file; a terminal is not
/// read (so that `make -j` jobs do not fight over it) and the task sees
/// end of input.
fn forward_stdin(tx: mpsc::Sender<ToExec>, sent: Arc<AtomicBool>, no_input: bool) {
    if no_input {
        // (The spec said so: the task's stdin is /dev/null.)
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
                    sent.store(true, Ordering::Relaxed);
                    if tx.blocking_send(ToExec::Stdin(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Whether the task gets no input from here: stdin is `/dev/null` (as for
/// most commands a build runs), or a terminal without `-t` (what is typed
/// is this shell's, not the task's).
fn no_input(tty: bool) -> bool {
    !tty && (std::io::stdin().is_terminal() || stdin_is_null())
}

/// Whether stdin is `/dev/null` (as for most commands a build runs): its
/// end is known without a thread to read it.
fn stdin_is_null() -> bool {
    let Ok(st) = rustix::fs::fstat(std::io::stdin()) else {
        return false;
    };
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::CharacterDevice
        && rustix::fs::major(st.st_rdev) == 1
        && rustix::fs::minor(st.st_rdev) == 3
}

/// Forwards SIGINT, SIGTERM and SIGHUP to the task, and with `-t` the
/// terminal's size changes.
fn forward_signals(tx: mpsc::Sender<ToExec>, tty: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    if tty {
        if let Ok(mut s) = signal(SignalKind::window_change()) {
            let tx = tx.clone();
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if let Some((r, c)) = window() {
                        if tx.send(ToExec::Resize(r, c)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }
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
    fn retried_output_is_not_repeated() {
        let mut written = 0u64;
        let mut out = Vec::new();
        let mut at = 0u64;
        write_new(&mut out, b"hello ", &mut at, &mut written).unwrap();
        // The executor dies; the next attempt prints everything again.
        let mut at = 0u64;
        write_new(&mut out, b"hel", &mut at, &mut written).unwrap();
        write_new(&mut out, b"lo world", &mut at, &mut written).unwrap();
        assert_eq!(out, b"hello world");
        assert_eq!(written, 11);
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(Status::Code(42)), ExitCode::from(42));
        assert_eq!(exit_code(Status::Signal(9)), ExitCode::from(137));
    }
}
