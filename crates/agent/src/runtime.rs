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

use crate::checks::Verified;
use crate::config::{AgentConfig, SwimProfile};
use crate::discovery::{self, Beacon, Discovery};
use crate::report::{self, Snapshot};
use crate::{bandwidth, checks};

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

type ControlMsg = (Request, oneshot::Sender<Response>);

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
            slots_free: if self.verified.checks.ok() {
                self.cores
            } else {
                0
            },
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
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    Ok((l, path))
}

async fn serve_control(
    listener: UnixListener,
    tx: mpsc::Sender<ControlMsg>,
    key: ClusterKey,
    cluster: String,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        let key = key.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            if let Err(e) = control_conn(stream, tx, key, cluster).await {
                tracing::debug!(error = %e, "control connection");
            }
        });
    }
}

async fn control_conn(
    stream: UnixStream,
    tx: mpsc::Sender<ControlMsg>,
    key: ClusterKey,
    cluster: String,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
        Ok(req) => {
            let want_bw = matches!(req, Request::Nodes { bandwidth: true });
            let (otx, orx) = oneshot::channel();
            if tx.send((req, otx)).await.is_err() {
                return Ok(());
            }
            match orx.await {
                Ok(Response::Nodes(mut rep)) if want_bw => {
                    measure_all(&mut rep, &key, &cluster).await;
                    Response::Nodes(rep)
                }
                Ok(r) => r,
                Err(_) => Response::Error {
                    message: "the agent is shutting down".into(),
                },
            }
        }
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await
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
        let dir = cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || checks::verify(&dir, Path::new("/sys/fs/cgroup")))
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
    tokio::spawn(serve_control(
        control,
        ctl_tx,
        key.clone(),
        cfg.cluster.clone(),
    ));
    tokio::spawn(bandwidth::serve(tcp, key.clone(), cfg.cluster.clone()));

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
}
