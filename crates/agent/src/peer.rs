//! The agent's TCP service (on the SWIM port number): every connection is
//! an authenticated Noise stream whose first message says what it is for.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_transport::stream::{self, Reader, Writer};
use shoal_transport::ClusterKey;
use tokio::net::{TcpListener, TcpStream};

use crate::exec::{self, ExecEnv};

/// The first message on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hello {
    /// Stream back this many bytes.
    Bandwidth {
        /// How many.
        bytes: u64,
    },
    /// Run a task (the task protocol follows): `shoal run`, relayed.
    Task,
    /// A batch attempt from another agent's runner: it may be detached
    /// and collected later (`Reattach`). Never relayed from a client.
    Batch,
    /// Tasks of `shoal run`, relayed, one after another on the same link
    /// (kept between them by the relaying agent, [`LinkPool`]): no
    /// connection and no handshake per task.
    Runs,
}

/// A kept link is used again only while it has been idle for less than
/// this (its executor keeps it for [`crate::exec::IDLE_LINK`]).
pub const LINK_REUSE: Duration = Duration::from_secs(20);

/// The most idle links kept per executor.
const MAX_IDLE_LINKS: usize = 16;

/// The receiving half of a task link to an executor.
pub type LinkRx = Reader<TcpStream>;
/// The sending half of a task link to an executor.
pub type LinkTx = Writer<TcpStream>;

/// A link between two tasks.
struct IdleLink {
    since: std::time::Instant,
    rx: LinkRx,
    tx: LinkTx,
}

/// Task links to executors kept between tasks, by executor address.
#[derive(Default)]
pub struct LinkPool {
    links: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Vec<IdleLink>>>,
}

impl std::fmt::Debug for LinkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkPool").finish_non_exhaustive()
    }
}

impl LinkPool {
    /// A link kept for `addr`, if one is: used only while it has been
    /// idle for less than [`LINK_REUSE`] and is still open and quiet (an
    /// executor that restarted or closed it is never sent a task on it).
    pub fn take(&self, addr: std::net::SocketAddr) -> Option<(LinkRx, LinkTx)> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let idle = links.get_mut(&addr)?;
        while let Some(mut l) = idle.pop() {
            if l.since.elapsed() < LINK_REUSE && l.rx.idle_and_open() {
                return Some((l.rx, l.tx));
            }
        }
        None
    }

    /// Keeps a link whose task ended cleanly, for the next task to the
    /// same executor (at most [`MAX_IDLE_LINKS`] there).
    pub fn keep(&self, addr: std::net::SocketAddr, rx: LinkRx, tx: LinkTx) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let idle = links.entry(addr).or_default();
        idle.retain(|l| l.since.elapsed() < LINK_REUSE);
        if idle.len() < MAX_IDLE_LINKS {
            idle.push(IdleLink {
                since: std::time::Instant::now(),
                rx,
                tx,
            });
        }
    }
}

/// Serves connections until the listener fails. Without an executor
/// (`None`), task requests are refused.
pub async fn serve(
    listener: TcpListener,
    key: ClusterKey,
    cluster: String,
    exec: Option<Arc<ExecEnv>>,
) {
    loop {
        let Ok((s, peer)) = listener.accept().await else {
            continue;
        };
        let key = key.clone();
        let cluster = cluster.clone();
        let exec = exec.clone();
        tokio::spawn(async move {
            if let Err(e) = conn(s, &key, &cluster, exec).await {
                tracing::debug!(%peer, error = %e, "peer connection ended");
            }
        });
    }
}

/// How long a task link may be silent before the kernel probes the peer,
/// and how often it probes then.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_PROBES: u32 = 3;
/// How long the peer may leave data or probes unacknowledged before the
/// link is dead: a peer whose machine vanished (powered off, cut off, its
/// FIN lost) is noticed in 15 to 20 s, and its task killed (a batch
/// attempt runs on, detached). Without it a half-open link, and its task,
/// would last as long as the task.
const USER_TIMEOUT: Duration = Duration::from_secs(15);

/// Small frames go at once; a dead peer is noticed without traffic.
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!(error = %e, "TCP user timeout not set");
    }
}

async fn conn(
    s: TcpStream,
    key: &ClusterKey,
    cluster: &str,
    exec: Option<Arc<ExecEnv>>,
) -> Result<(), String> {
    tune(&s);
    let (mut r, w): (Reader<TcpStream>, Writer<TcpStream>) =
        tokio::time::timeout(Duration::from_secs(10), stream::accept(s, key, cluster))
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| e.to_string())?;
    let hello: Hello = postcard::from_bytes(&r.recv().await.map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    match hello {
        Hello::Bandwidth { bytes } => crate::bandwidth::answer(w, bytes)
            .await
            .map_err(|e| e.to_string()),
        Hello::Task | Hello::Batch | Hello::Runs => match exec {
            Some(env) => exec::serve(env, true, hello == Hello::Batch, hello != Hello::Task, r, w)
                .await
                .map_err(|e| e.to_string()),
            None => {
                let mut w = w;
                let f = shoal_task::proto::FromExec::Failed {
                    code: 125,
                    message: "this node runs no tasks".into(),
                };
                shoal_task::link::send(&mut w, &f)
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    }
}

/// Opens a task connection to the agent at `addr`.
///
/// # Errors
/// Connection or handshake failure.
pub async fn connect_task(
    addr: std::net::SocketAddr,
    key: &ClusterKey,
    cluster: &str,
    hello: Hello,
) -> Result<(Reader<TcpStream>, Writer<TcpStream>), String> {
    let s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    tune(&s);
    let (r, mut w) = stream::connect(s, key, cluster)
        .await
        .map_err(|e| e.to_string())?;
    let hello = postcard::to_stdvec(&hello).map_err(|e| e.to_string())?;
    w.send(&hello).await.map_err(|e| e.to_string())?;
    Ok((r, w))
}
