//! The agent's event loop.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_control::{NodesReport, RejectedInfo, Request, Response};
use shoal_facts::NodeFacts;
use shoal_membership::{lan_config, memberlist_lan_config, Engine, Event, NodeId, Output, Timer};
use shoal_transport::{Channel, ClusterKey, KeyError, Kind, OpenError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UdpSocket, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use shoal_task::link::{Boundaries, FrameSink, FrameSource, Plain};
use shoal_task::proto::FromExec;

use crate::checks::Verified;
use crate::config::{AgentConfig, SwimProfile};
use crate::discovery::{self, Beacon, Discovery};
use crate::exec::{self, ExecEnv};
use crate::owner::Owner;
use crate::report::{self, Snapshot};
use crate::{bandwidth, checks, peer, place};

/// Bytes moved per peer by `shoal nodes --bandwidth`.
const BANDWIDTH_BYTES: u64 = 16 << 20;

/// Why the agent could not start. Nothing was left behind.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The cluster key could not be read.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Where.
        addr: String,
        /// The OS error (e.g. address in use).
        source: std::io::Error,
    },
    /// The data dir could not be created.
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another agent already serves this data dir.
    #[error("another agent is already running with control socket {0}")]
    AlreadyRunning(PathBuf),
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) type ControlMsg = (Request, oneshot::Sender<Response>);

/// Everything the event loop owns.
struct Shell {
    cfg: AgentConfig,
    engine: Engine,
    channel: Channel,
    swim: UdpSocket,
    discovery: Option<Discovery>,
    timers: mpsc::UnboundedSender<Timer<NodeId>>,
    epoch: Instant,
    verified: Verified,
    cores: u32,
    exec: Arc<ExecEnv>,
}

impl Shell {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    async fn flush(&mut self) {
        for out in self.engine.drain() {
            match out {
                Output::Send { to, packet } => {
                    let sealed = self.channel.seal(Kind::Swim, &packet, unix_now_s());
                    if let Err(e) = self.swim.send_to(&sealed, to).await {
                        tracing::debug!(%to, error = %e, "send");
                    }
                }
                Output::Schedule { after, timer } => {
                    let tx = self.timers.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = tx.send(timer);
                    });
                }
                Output::Event(Event::Defunct) if self.engine.has_left() => {}
                Output::Event(e) => log_event(&e),
            }
        }
    }

    fn on_datagram(&mut self, data: &[u8], from: SocketAddr) {
        match self.channel.open(data, unix_now_s()) {
            Ok((Kind::Swim, plain)) => {
                let now = self.now();
                if let Err(e) = self.engine.handle_packet(from, &plain, now) {
                    tracing::debug!(%from, error = %e, "packet refused");
                }
            }
            Ok((Kind::Beacon, plain)) => match postcard::from_bytes::<Beacon>(&plain) {
                Ok(b) if b.cluster == self.cfg.cluster => {
                    let now = self.now();
                    self.engine.discovered(b.id, now);
                }
                Ok(b) => tracing::debug!(cluster = %b.cluster, "beacon of another cluster"),
                Err(e) => tracing::debug!(%from, error = %e, "undecodable beacon"),
            },
            Err(e) => log_refusal(from, &e),
        }
    }

    fn facts(&self) -> NodeFacts {
        let (mem_total_bytes, mem_avail_bytes) = shoal_facts::probe::memory().unwrap_or((0, 0));
        NodeFacts {
            cores: self.cores,
            mem_total_bytes,
            mem_avail_bytes,
            cpu_score: self.verified.cpu_score,
            load: shoal_facts::probe::load().unwrap_or([0.0; 3]),
            owner_idle_s: shoal_facts::probe::owner_idle(),
            // Unclaimed guest slots (none while the owner is busy), less
            // the tasks this node's own users run here.
            slots_free: if self.verified.checks.ok() {
                let local = self
                    .exec
                    .running
                    .load(Ordering::Relaxed)
                    .saturating_sub(self.exec.owner.guests());
                self.exec.owner.slots_free().saturating_sub(local)
            } else {
                0
            },
            slot_states: self.exec.owner.slot_states(),
            checks: self.verified.checks.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    fn publish_facts(&mut self) {
        let bytes = self.facts().encode();
        let now = self.now();
        if let Err(e) = self.engine.set_facts(bytes, now) {
            tracing::warn!(error = %e, "facts not published");
        }
    }

    async fn beacon(&mut self) {
        let Some(d) = &self.discovery else { return };
        let b = Beacon {
            cluster: self.cfg.cluster.clone(),
            id: self.engine.identity().clone(),
        };
        let Ok(plain) = postcard::to_stdvec(&b) else {
            return;
        };
        let sealed = self.channel.seal(Kind::Beacon, &plain, unix_now_s());
        let mut sent = false;
        if let Some(g) = d.group {
            match d.socket.send_to(&sealed, g).await {
                Ok(_) => sent = true,
                Err(e) => tracing::debug!(error = %e, "multicast beacon"),
            }
        }
        if !sent {
            if let Some(bc) = d.broadcast {
                if let Err(e) = d.socket.send_to(&sealed, bc).await {
                    tracing::debug!(error = %e, "broadcast beacon");
                }
            }
        }
    }

    fn report(&self) -> NodesReport {
        let members = self.engine.members();
        let order = self.engine.order();
        let r = self.channel.rejected();
        let protocol = self.engine.stats().packets_rejected + self.engine.stats().rumors_rejected;
        report::build(&Snapshot {
            cluster: &self.cfg.cluster,
            expect: self.cfg.expect,
            state: self.engine.cluster_state(),
            members: &members,
            order: &order,
            rejected: RejectedInfo {
                total: r.total() + protocol,
                auth: r.auth,
                replay: r.replay,
                malformed: r.malformed,
                stale: r.stale,
                protocol,
            },
        })
    }
}

fn log_event(e: &Event) {
    match e {
        Event::Up(id) => tracing::info!(member = %id.name, addr = %id.addr, "member up"),
        Event::Down(id) => tracing::warn!(member = %id.name, addr = %id.addr, "member down"),
        Event::Left(id) => tracing::info!(member = %id.name, addr = %id.addr, "member left"),
        Event::Rejoined(id) => tracing::warn!(bump = id.bump, "we were declared down; rejoined"),
        Event::Defunct => tracing::warn!("out of the cluster"),
        Event::Isolated => tracing::info!("no other member reachable"),
        Event::Connected => tracing::info!("connected to the cluster"),
    }
}

fn log_refusal(from: SocketAddr, e: &OpenError) {
    // Garbage and strangers are counted (see `shoal nodes`); logging each
    // at debug keeps a flood from filling the log.
    tracing::debug!(%from, error = %e, "datagram refused");
}

/// Prepares the control socket: refuses to run twice on one data dir and
/// removes a socket left by a crashed agent.
fn control_socket(data_dir: &Path) -> Result<(UnixListener, PathBuf), AgentError> {
    std::fs::create_dir_all(data_dir).map_err(|source| AgentError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join(shoal_control::SOCKET_NAME);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(AgentError::AlreadyRunning(path));
        }
        let _ = std::fs::remove_file(&path);
    }
    let l = UnixListener::bind(&path).map_err(|source| AgentError::Bind {
        what: "control socket",
        addr: path.display().to_string(),
        source,
    })?;
    // Anyone on this machine may ask for nodes and run tasks (as the
    // guest user, in a workspace); only root or the agent's user may make
    // it leave (checked by peer credentials).
    // An agent that is not root serves its own user only: it can run
    // tasks, and act on files, as no one else.
    let mode = if nix::unistd::geteuid().is_root() {
        0o666
    } else {
        0o600
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
    Ok((l, path))
}

/// What the control connections share.
#[derive(Clone)]
struct Ctx {
    key: ClusterKey,
    cluster: String,
    exec: Arc<ExecEnv>,
    /// Tasks this node has sent to each node and not seen end.
    inflight: Arc<Mutex<HashMap<String, u32>>>,
    /// Batch jobs submitted here.
    batch: Arc<crate::batch::Batch>,
    /// Links to executors kept between relayed `shoal run`s.
    run_links: Arc<peer::LinkPool>,
}

async fn serve_control(listener: UnixListener, tx: mpsc::Sender<ControlMsg>, ctx: Ctx) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = control_conn(stream, tx, ctx).await {
                tracing::debug!(error = %e, "control connection");
            }
        });
    }
}

async fn write_line(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> std::io::Result<()> {
    w.write_all(&line(resp)).await
}

/// An answer as it goes on the control socket: one JSON line.
fn line(resp: &Response) -> Vec<u8> {
    let mut out = serde_json::to_vec(resp).unwrap_or_default();
    out.push(b'\n');
    out
}

pub(crate) async fn ask_main(tx: &mpsc::Sender<ControlMsg>, req: Request) -> Response {
    let (otx, orx) = oneshot::channel();
    if tx.send((req, otx)).await.is_err() {
        return Response::Error {
            message: "the agent is shutting down".into(),
        };
    }
    orx.await.unwrap_or(Response::Error {
        message: "the agent is shutting down".into(),
    })
}

async fn control_conn(
    stream: UnixStream,
    tx: mpsc::Sender<ControlMsg>,
    ctx: Ctx,
) -> std::io::Result<()> {
    let peer_uid = stream.peer_cred().map(|c| c.uid()).ok();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let req = match serde_json::from_str::<Request>(&line) {
        Ok(req) => req,
        Err(e) => {
            let message = format!("bad request: {e}");
            return write_line(&mut w, &Response::Error { message }).await;
        }
    };
    let resp = match req {
        Request::Nodes { bandwidth } => match ask_main(&tx, Request::Nodes { bandwidth }).await {
            Response::Nodes(mut rep) if bandwidth => {
                measure_all(&mut rep, &ctx.key, &ctx.cluster).await;
                Response::Nodes(rep)
            }
            other => other,
        },
        Request::Leave => {
            if owner_or_root(peer_uid) {
                ask_main(&tx, Request::Leave).await
            } else {
                Response::Error {
                    message: "only root or the agent's user may make it leave".into(),
                }
            }
        }
        Request::Owner { force } => {
            let force = match force.as_deref() {
                None => None,
                Some("busy") => Some(shoal_owner::Force::Busy),
                Some("idle") => Some(shoal_owner::Force::Idle),
                Some("auto") => Some(shoal_owner::Force::Auto),
                Some(other) => {
                    let message = format!("{other:?} is not one of busy, idle, auto");
                    return write_line(&mut w, &Response::Error { message }).await;
                }
            };
            if let Some(f) = force {
                if !owner_or_root(peer_uid) {
                    let message = "only root or the agent's user may set the owner's state".into();
                    return write_line(&mut w, &Response::Error { message }).await;
                }
                ctx.exec.owner.set_force(f).await;
            }
            Response::Owner(ctx.exec.owner.report())
        }
        Request::Reload => {
            if !owner_or_root(peer_uid) {
                let message = "only root or the agent's user may reload the policy".into();
                return write_line(&mut w, &Response::Error { message }).await;
            }
            match ctx.exec.owner.reload() {
                Ok(()) => {
                    ctx.exec.owner.tick().await;
                    Response::Owner(ctx.exec.owner.report())
                }
                Err(message) => Response::Error {
                    message: format!("policy refused, the one in force stays: {message}"),
                },
            }
        }
        Request::Ps => Response::Ps(ctx.exec.owner.ps()),
        Request::Submit { jobs, dir, env } => {
            let report = match ask_main(&tx, Request::Nodes { bandwidth: false }).await {
                Response::Nodes(r) => r,
                other => return write_line(&mut w, &other).await,
            };
            let Some(uid) = peer_uid else {
                let message = "the submitting user is unknown (no peer credentials)".into();
                return write_line(&mut w, &Response::Error { message }).await;
            };
            let b = ctx.batch.clone();
            let r = tokio::task::spawn_blocking(move || b.submit(jobs, dir, env, uid, &report))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            match r {
                Ok(ids) => Response::Submitted { ids },
                Err(message) => Response::Error { message },
            }
        }
        Request::Jobs => match ctx.batch.jobs() {
            Ok(r) => Response::Jobs(r),
            Err(message) => Response::Error { message },
        },
        Request::Status { job } => {
            let report = match ask_main(&tx, Request::Nodes { bandwidth: false }).await {
                Response::Nodes(r) => r,
                other => return write_line(&mut w, &other).await,
            };
            match ctx.batch.status(job, &report) {
                Ok(r) => Response::Status(r),
                Err(message) => Response::Error { message },
            }
        }
        Request::Cancel { job } => match ctx.batch.cancel(job) {
            Ok(()) => Response::Ok,
            Err(message) => Response::Error { message },
        },
        Request::Retry { job } => match ctx.batch.retry(job) {
            Ok(n) => Response::Submitted {
                ids: vec![n as u64],
            },
            Err(message) => Response::Error { message },
        },
        Request::Run {
            node,
            local,
            memory_bytes,
            exclude,
        } => {
            let report = match ask_main(&tx, Request::Nodes { bandwidth: false }).await {
                Response::Nodes(r) => r,
                other => return write_line(&mut w, &other).await,
            };
            let ask = place::Ask {
                node,
                local,
                memory_bytes,
                exclude,
            };
            return run_task(r, w, &ctx, &tx, &report, &ask).await;
        }
    };
    write_line(&mut w, &resp).await
}

/// Whether the client is root or the agent's own user.
fn owner_or_root(peer_uid: Option<u32>) -> bool {
    let me = nix::unistd::Uid::effective().as_raw();
    peer_uid.is_some_and(|u| u == 0 || u == me)
}

/// Places a task and then runs it here or relays it to the chosen peer.
async fn run_task(
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
    ctx: &Ctx,
    main: &mpsc::Sender<ControlMsg>,
    report: &NodesReport,
    ask: &place::Ask,
) -> std::io::Result<()> {
    let me = report
        .nodes
        .iter()
        .find(|n| n.is_self)
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let choice = {
        let inflight = ctx
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        place::place(&report.nodes, &inflight, ask)
    };
    let (name, addr) = match choice {
        place::Choice::Refuse(message) => {
            return write_line(&mut w, &Response::Error { message }).await
        }
        place::Choice::Local { fallback } => return run_here(r, w, ctx, &me, fallback).await,
        place::Choice::Remote { name, addr } => (name, addr),
    };
    // A link kept from an earlier task there when there is one: no
    // connection and no handshake (about half a millisecond).
    let to = addr.parse::<SocketAddr>();
    let remote = match &to {
        Ok(a) => match ctx.run_links.take(*a) {
            Some(kept) => Ok(kept),
            None => peer::connect_task(*a, &ctx.key, &ctx.cluster, peer::Hello::Runs).await,
        },
        Err(e) => Err(e.to_string()),
    };
    let (mut rr, mut rw) = match remote {
        Ok(x) => x,
        Err(e) => {
            let fallback = Some(format!("{name} unreachable ({e})"));
            return run_here(r, w, ctx, &me, fallback).await;
        }
    };
    write_line(
        &mut w,
        &Response::Run {
            node: name.clone(),
            fallback: None,
        },
    )
    .await?;
    bump(&ctx.inflight, &name, 1);
    // Relay frames both ways, untouched, until either side ends or the
    // task's last message has gone down.
    let mut local_r = Plain(r);
    let mut local_w = Plain(w);
    // What went up: a frame half sent, or a message half relayed, leaves
    // the link unfit for another task.
    let mut up_at = Boundaries::default();
    let mut sending = false;
    let up = async {
        while let Ok(f) = local_r.recv_frame().await {
            up_at.next(&f);
            sending = true;
            if rw.send_frame(&f).await.is_err() {
                break;
            }
            sending = false;
        }
    };
    // True once the task's last message (`Exit`, `Failed`, `Evicted`)
    // went down: the executor then waits for the link's next task.
    // The frames that have come together go on together (a task's last
    // messages, say): the submitter wakes once for them.
    let down = async {
        let mut at = Boundaries::default();
        loop {
            let (mut frames, mut last, mut broken) = (Vec::new(), false, false);
            while frames.is_empty() || (!last && rr.frame_ready()) {
                match rr.recv_frame().await {
                    Ok(f) => {
                        last = at.next(&f).is_some_and(FromExec::encoded_ends_task);
                        frames.push(f);
                    }
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            let sent = frames.is_empty() || local_w.send_frames(&frames).await.is_ok();
            if last {
                return true;
            }
            if broken || !sent {
                return false;
            }
        }
    };
    // A partitioned executor's TCP connection can stay half-open for
    // minutes: membership says sooner. When the executor is declared down
    // (or leaves), the relay drops both sides, so the client sees the task
    // lost and runs it elsewhere (the stale executor's result can no longer
    // reach it, and it kills the task when its link breaks).
    let gone = crate::batch::gone(main, &name);
    let ended = tokio::select! {
        biased;
        ended = down => ended,
        // The submitter went first: the link is dropped, and with it the
        // task.
        () = up => false,
        state = gone => {
            tracing::warn!(node = %name, %state, "executor lost from the membership; dropping its task");
            false
        }
    };
    bump(&ctx.inflight, &name, -1);
    if let (true, false, true, Ok(a)) = (ended, sending, up_at.between_messages(), to) {
        // (Whatever the submitter sent after the end and was relayed, the
        // executor passes by: that task is over.)
        ctx.run_links.keep(a, rr, rw);
    }
    Ok(())
}

/// Answers that the task runs on this node (saying why, for a fallback)
/// and serves it here.
async fn run_here(
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
    ctx: &Ctx,
    me: &str,
    fallback: Option<String>,
) -> std::io::Result<()> {
    let node = me.to_owned();
    let mut tx = AnswerFirst {
        answer: Some(line(&Response::Run { node, fallback })),
        w: Plain(w),
    };
    bump(&ctx.inflight, me, 1);
    let res = exec::serve(ctx.exec.clone(), false, false, false, Plain(r), &mut tx).await;
    bump(&ctx.inflight, me, -1);
    if let Err(e) = res {
        tracing::debug!(error = %e, "local task link ended");
    }
    if let Some(answer) = tx.answer.take() {
        // Nothing was sent: the client still learns where its task was,
        // and then that it was lost.
        tx.w.0.write_all(&answer).await?;
    }
    Ok(())
}

/// A local task's link to its client, the agent's answer (where the task
/// runs) not yet written: it goes in the write of the first frames (the
/// task's `Started`, or what it needs first), so that the client wakes
/// once for both.
struct AnswerFirst<W> {
    answer: Option<Vec<u8>>,
    w: Plain<W>,
}

impl<W: tokio::io::AsyncWrite + Unpin + Send> FrameSink for AnswerFirst<W> {
    async fn send_frame(&mut self, f: &[u8]) -> Result<(), shoal_task::link::LinkError> {
        if self.answer.is_some() {
            self.send_frames(&[f.to_vec()]).await
        } else {
            self.w.send_frame(f).await
        }
    }

    async fn send_frames(&mut self, frames: &[Vec<u8>]) -> Result<(), shoal_task::link::LinkError> {
        let Some(mut out) = self.answer.take() else {
            return self.w.send_frames(frames).await;
        };
        Plain(&mut out).send_frames(frames).await?;
        self.w.0.write_all(&out).await?;
        Ok(())
    }
}

fn bump(m: &Mutex<HashMap<String, u32>>, name: &str, by: i32) {
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    let v = g.entry(name.to_owned()).or_insert(0);
    *v = v.saturating_add_signed(by);
}

async fn measure_all(rep: &mut NodesReport, key: &ClusterKey, cluster: &str) {
    for n in rep
        .nodes
        .iter_mut()
        .filter(|n| !n.is_self && n.state == "alive")
    {
        let Ok(addr) = n.addr.parse::<SocketAddr>() else {
            continue;
        };
        match bandwidth::measure(addr, key, cluster, BANDWIDTH_BYTES, Duration::from_secs(10)).await
        {
            Ok(mbps) => n.bandwidth_mbps = Some((mbps * 10.0).round() / 10.0),
            Err(e) => tracing::warn!(peer = %n.name, error = %e, "bandwidth"),
        }
    }
}

/// The executor's environment: task directories, the content cache, and
/// the cgroups (only when the start-up checks passed). Cleans up what a
/// previous life of the agent left.
async fn exec_env(cfg: &AgentConfig, verified: &Verified) -> ExecEnv {
    let parent = cfg.cgroup_parent.clone();
    let cgroups = if verified.checks.ok() {
        match shoal_executor::cgroup::open(Path::new("/sys/fs/cgroup"), &parent) {
            Ok(m) => Some(Arc::from(m)),
            Err(e) => {
                tracing::warn!(error = %e, "no cgroups: this node runs no tasks");
                None
            }
        }
    } else {
        None
    };
    let memory_scratch = memory_scratch(cfg);
    let cas_dir = cfg.data_dir.join("cas");
    let (cas, cgroups) = match shoal_task::cas::Cas::open(&cas_dir, cfg.cache_bytes) {
        Ok(c) => (c, cgroups),
        Err(e) => {
            tracing::warn!(error = %e, "content cache unavailable: this node runs no tasks");
            (shoal_task::cas::Cas::at(&cas_dir, cfg.cache_bytes), None)
        }
    };
    // A node that cannot run guests (failed checks, no cgroups, no cache)
    // lends no slots.
    let slots = if cgroups.is_some() {
        cfg.slots.unwrap_or_else(shoal_facts::probe::cores) as usize
    } else {
        0
    };
    let owner = Owner::new(
        &cfg.name,
        slots,
        cfg.policy.clone(),
        cgroups.clone(),
        cfg.config_path.clone(),
    );
    // Emptying the layer, image and spool directories of an earlier life
    // and the leftovers' clean-up are not for the runtime's thread.
    let env = {
        let (cfg, owner, memory_scratch) = (cfg.clone(), owner.clone(), memory_scratch.clone());
        tokio::task::spawn_blocking(move || {
            let mut env = exec_env_with(&cfg, memory_scratch, cas, cgroups, owner);
            env.clean_leftovers();
            // Warm slots, once the leftovers (an earlier life's slots too)
            // are gone: twice as many as cores, so that a `make -j` keeps
            // finding one ready.
            let size = cfg.warm_slots.map_or_else(
                || (2 * shoal_facts::probe::cores() as usize).max(4),
                |n| n as usize,
            );
            // (Warm slots need root: each spawner makes a mount namespace
            // of its own for the slot's root.)
            env.warm = env
                .cgroups
                .clone()
                .filter(|_| nix::unistd::geteuid().is_root())
                .and_then(|m| {
                    shoal_executor::warm::Pool::new(
                        m,
                        vec!["/proc/self/exe".into(), "__spawner".into()],
                        size,
                        Some(cfg.data_dir.join("warm")),
                    )
                })
                .map(Arc::new);
            env
        })
        .await
    };
    match env {
        Ok(e) => e,
        Err(_) => exec_env_with(
            cfg,
            memory_scratch,
            shoal_task::cas::Cas::at(&cfg.data_dir.join("cas"), cfg.cache_bytes),
            None,
            owner,
        ),
    }
}

/// The tmpfs of `scratch = "memory"`, mounted (or kept from an earlier
/// life); `None` for a scratch on disk, and, with a warning, where it
/// cannot be mounted (an agent that is not root).
fn memory_scratch(cfg: &AgentConfig) -> Option<PathBuf> {
    let at = cfg.memory_scratch_dir();
    if cfg.scratch != crate::config::ScratchKind::Memory {
        // A killed earlier life's, when the scratch was in memory then.
        if shoal_executor::memfs::is_tmpfs_mount(&at).unwrap_or(false) {
            match shoal_executor::memfs::release(&at) {
                Ok(()) => {
                    tracing::info!(at = %at.display(), "unmounted an earlier life's task scratch in memory")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "an earlier life's task scratch in memory is still mounted")
                }
            }
        }
        return None;
    }
    match shoal_executor::memfs::ensure(&at, cfg.scratch_bytes) {
        Ok(now) => {
            tracing::info!(at = %at.display(), kept = !now, "task scratch in memory");
            Some(at)
        }
        Err(e) => {
            tracing::warn!(error = %e, "task scratch stays on disk");
            None
        }
    }
}

/// The executor's environment over `cas` and `cgroups` (none: no task is
/// accepted), with fresh layer, image and spool directories; task
/// directories and spools on the tmpfs `memory_scratch`, if any, else in
/// the data directory.
fn exec_env_with(
    cfg: &AgentConfig,
    memory_scratch: Option<PathBuf>,
    cas: shoal_task::cas::Cas,
    cgroups: Option<Arc<dyn shoal_executor::CgroupManager>>,
    owner: Arc<Owner>,
) -> ExecEnv {
    let scratch_root = memory_scratch.as_deref().unwrap_or(&cfg.data_dir);
    let _ = std::fs::create_dir_all(scratch_root.join("tasks"));
    ExecEnv {
        node: cfg.name.clone(),
        tasks_dir: scratch_root.join("tasks"),
        scratch: Arc::new(crate::scratch::Scratch::new(
            &scratch_root.join("tasks"),
            16,
        )),
        cas,
        cgroups,
        running: std::sync::atomic::AtomicU32::new(0),
        owner,
        // (Up to 64 evicted layers' directories kept for new layers.)
        lowers: Arc::new(shoal_task::cas::Lowers::for_trees(
            &cfg.data_dir.join("lowers"),
            16,
            64,
        )),
        images: Arc::new(shoal_task::cas::Lowers::new(
            &cfg.data_dir.join("images"),
            4,
        )),
        detached: crate::exec::Detached::new(&scratch_root.join("spool")),
        forker: crate::exec::Forker::new(),
        warm: None,
        memory_scratch,
    }
}

/// The SWIM socket, with a receive buffer large enough for a burst of
/// gossip from a few hundred members (the kernel caps it at rmem_max).
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = s.set_recv_buffer_size(4 << 20) {
        tracing::debug!(error = %e, "SO_RCVBUF");
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

fn advertised_ip(cfg: &AgentConfig) -> IpAddr {
    if !cfg.bind.ip().is_unspecified() {
        return cfg.bind.ip();
    }
    cfg.advertise
        .or_else(|| discovery::local_ipv4().map(|(ip, _)| IpAddr::V4(ip)))
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// Runs the agent until `shutdown` completes or `shoal leave` is received;
/// both leave the cluster gracefully.
///
/// # Errors
/// Start-up failures (key, sockets, data dir).
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    // Seniority in the pecking order counts from here, not from the end of
    // the start-up checks.
    let started_ms = unix_now_ms();
    let key = ClusterKey::load(&cfg.key_file)?;
    let (control, sock_path) = control_socket(&cfg.data_dir)?;
    let result = run_inner(cfg, key, control, started_ms, shutdown).await;
    let _ = std::fs::remove_file(&sock_path);
    result
}

async fn run_inner(
    cfg: AgentConfig,
    key: ClusterKey,
    control: UnixListener,
    started_ms: u64,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let bind_err = |what, addr: SocketAddr| {
        move |source| AgentError::Bind {
            what,
            addr: addr.to_string(),
            source,
        }
    };
    let sock = bind_udp(cfg.bind).map_err(bind_err("the SWIM socket (udp)", cfg.bind))?;
    let bound = sock
        .local_addr()
        .map_err(bind_err("the SWIM socket (udp)", cfg.bind))?;
    let tcp_addr = SocketAddr::new(cfg.bind.ip(), bound.port());
    let tcp = TcpListener::bind(tcp_addr)
        .await
        .map_err(bind_err("the bandwidth socket (tcp)", tcp_addr))?;
    let ip = advertised_ip(&cfg);
    let me = SocketAddr::new(ip, bound.port());
    let discovery = if cfg.discovery {
        match discovery::open(cfg.group, ip, cfg.broadcast) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(error = %e, group = %cfg.group, "discovery disabled: cannot bind");
                None
            }
        }
    } else {
        None
    };

    let verified = {
        let (dir, parent) = (cfg.data_dir.clone(), cfg.cgroup_parent.clone());
        tokio::task::spawn_blocking(move || {
            checks::verify(&dir, Path::new("/sys/fs/cgroup"), &parent)
        })
        .await
        .unwrap_or_else(|_| Verified {
            checks: shoal_facts::Checks {
                failed: vec!["checks: the check task panicked".into()],
                cgroup: String::new(),
            },
            cpu_score: 0,
        })
    };

    let id = NodeId::new(me, cfg.name.clone(), started_ms);
    let seed = unix_now_ms() ^ (u64::from(std::process::id()) << 32);
    let expect = cfg.expect as usize;
    let swim = match cfg.swim_profile {
        SwimProfile::Fast => lan_config(cfg.expect.max(8)),
        SwimProfile::Memberlist => memberlist_lan_config(cfg.expect.max(8)),
    };
    let engine = Engine::new(id, swim, expect, seed);
    let (timer_tx, mut timer_rx) = mpsc::unbounded_channel();
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlMsg>(64);
    let exec_env = Arc::new(exec_env(&cfg, &verified).await);
    exec_env.owner.start();
    let batch = {
        let (path, key, cluster) = (
            cfg.data_dir.join("jobs.redb"),
            key.clone(),
            cfg.cluster.clone(),
        );
        tokio::task::spawn_blocking(move || crate::batch::Batch::open(&path, key, &cluster))
            .await
            .map_err(|e| AgentError::DataDir {
                path: cfg.data_dir.join("jobs.redb"),
                source: std::io::Error::other(e.to_string()),
            })?
    };
    tokio::spawn(batch.clone().run(ctl_tx.clone()));
    tokio::spawn(serve_control(
        control,
        ctl_tx,
        Ctx {
            key: key.clone(),
            cluster: cfg.cluster.clone(),
            exec: exec_env.clone(),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            batch,
            run_links: Arc::new(peer::LinkPool::default()),
        },
    ));
    tokio::spawn(peer::serve(
        tcp,
        key.clone(),
        cfg.cluster.clone(),
        Some(exec_env.clone()),
    ));

    tracing::info!(
        name = %cfg.name, cluster = %cfg.cluster, addr = %me,
        discovery = discovery.as_ref().map(|d| d.group.is_some()).unwrap_or(false),
        cpu_score = verified.cpu_score, checks = %verified.checks.summary(),
        "agent started"
    );

    let mut sh = Shell {
        channel: Channel::new(&key, &cfg.cluster),
        cfg,
        engine,
        swim: sock,
        discovery,
        timers: timer_tx,
        epoch: Instant::now(),
        verified,
        cores: shoal_facts::probe::cores(),
        exec: exec_env,
    };
    sh.publish_facts();
    for j in sh.cfg.join.clone() {
        let now = sh.now();
        sh.engine.join(j, now);
    }
    sh.flush().await;

    let mut facts_tick = tokio::time::interval(Duration::from_millis(sh.cfg.facts_refresh_ms));
    // Beacon quickly at first so a fresh cluster forms in well under a
    // second, then settle to the configured interval.
    let mut beacons_sent = 0u32;
    let beacon_interval = Duration::from_millis(sh.cfg.beacon_interval_ms);
    let beacon_sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(beacon_sleep);
    tokio::pin!(shutdown);
    let mut buf = vec![0u8; 2048];
    let mut dbuf = vec![0u8; 2048];

    loop {
        tokio::select! {
            r = sh.swim.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    let data = buf[..n].to_vec();
                    sh.on_datagram(&data, from);
                }
            }
            r = async {
                match &sh.discovery {
                    Some(d) => d.socket.recv_from(&mut dbuf).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Ok((n, from)) = r {
                    let data = dbuf[..n].to_vec();
                    sh.on_datagram(&data, from);
                }
            }
            Some(t) = timer_rx.recv() => {
                let now = sh.now();
                sh.engine.handle_timer(t, now);
            }
            _ = facts_tick.tick() => sh.publish_facts(),
            () = &mut beacon_sleep => {
                sh.beacon().await;
                // Alone? Knock again on the configured doors.
                if sh.engine.active_ids().len() <= 1 {
                    for j in sh.cfg.join.clone() {
                        let now = sh.now();
                        sh.engine.join(j, now);
                    }
                }
                beacons_sent += 1;
                let next = if beacons_sent < 5 { beacon_interval.min(Duration::from_millis(200)) } else { beacon_interval };
                beacon_sleep.as_mut().reset(tokio::time::Instant::now() + next);
            }
            Some((req, reply)) = ctl_rx.recv() => {
                match req {
                    Request::Nodes { .. } => { let _ = reply.send(Response::Nodes(sh.report())); }
                    Request::Run { .. } | Request::Owner { .. } | Request::Reload | Request::Ps
                    | Request::Submit { .. } | Request::Jobs | Request::Status { .. }
                    | Request::Cancel { .. } | Request::Retry { .. } => {
                        let _ = reply.send(Response::Error { message: "internal: not a request for the event loop".into() });
                    }
                    Request::Leave => {
                        leave(&mut sh).await;
                        let _ = reply.send(Response::Ok);
                        // Let the control task write the answer before the
                        // runtime (and with it that task) goes away.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return Ok(());
                    }
                }
            }
            () = &mut shutdown => {
                leave(&mut sh).await;
                return Ok(());
            }
        }
        sh.flush().await;
    }
}

async fn leave(sh: &mut Shell) {
    let now = sh.now();
    sh.engine.leave(now);
    sh.flush().await;
    tracing::info!("left the cluster");
    let env = sh.exec.clone();
    let _ = tokio::task::spawn_blocking(move || env.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_task::link;

    #[tokio::test]
    async fn a_local_tasks_answer_waits_for_its_first_frames_and_goes_before_them() {
        let mut tx = AnswerFirst {
            answer: Some(b"{\"result\":\"run\"}\n".to_vec()),
            w: Plain(Vec::new()),
        };
        assert!(tx.w.0.is_empty(), "nothing written before a frame");
        link::send(&mut tx, &FromExec::Started { node: "h0".into() })
            .await
            .unwrap();
        let exit = FromExec::Exit {
            status: shoal_task::proto::Status::Code(0),
            oom: false,
            cpu_s: 0.0,
            mem_peak_bytes: None,
        };
        link::send_small(&mut tx, &[&exit]).await.unwrap();
        assert!(tx.answer.is_none());
        let bytes = tx.w.0;
        let mut r = tokio::io::BufReader::new(&bytes[..]);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "{\"result\":\"run\"}\n");
        let mut r = Plain(r);
        assert_eq!(
            link::recv::<FromExec, _>(&mut r).await.unwrap(),
            FromExec::Started { node: "h0".into() }
        );
        assert_eq!(link::recv::<FromExec, _>(&mut r).await.unwrap(), exit);
    }
}
