//! The executor: runs a task received over a link (from the local client
//! or from another agent) in a workspace, streams its output, and returns
//! its file changes.
//!
//! ```text
//!  Start ─▶ validate ─▶ Need/Blob (fill the cache) ─▶ materialize lower
//!        ─▶ cgroup + workspace ─▶ Started ─▶ stream ─▶ Changes? ─▶ Exit
//!  (any failure: Failed{code, message}; always: kill, unmount, remove)
//! ```

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shoal_executor::cgroup::{spawn_into, CgroupManager, Limits};
use shoal_executor::warm::{self, KeptTree, Pool, Slot, WarmError};
use shoal_executor::workspace::{self, Net, Plan, Root, Spec, Tree};
use shoal_files::ChangeSet;
use shoal_task::cas::{Cas, Lookup, Lower};
use shoal_task::image::{id_of, ImageEntry, ImageNode};
use shoal_task::link::{self, FrameSink, FrameSource, LinkError};
use shoal_task::proto::{Commit, FromExec, Node, Status, TaskSpec, ToExec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The guest user and group (nobody/nogroup).
pub const GUEST_ID: u32 = 65534;
/// Default process limit of a task.
pub const DEFAULT_PIDS: u32 = 4096;

/// What the executor needs: where to work, the cache, the cgroups.
#[derive(Debug)]
pub struct ExecEnv {
    /// This node's name (`SHOAL_NODE`).
    pub node: String,
    /// Where task directories go.
    pub tasks_dir: PathBuf,
    /// Task directories kept between tasks (under `tasks_dir`).
    pub scratch: Arc<crate::scratch::Scratch>,
    /// The content cache.
    pub cas: Cas,
    /// The cgroup manager; `None` when the start-up checks failed (then no
    /// task is accepted).
    pub cgroups: Option<Arc<dyn CgroupManager>>,
    /// Tasks running now (published as used guest slots).
    pub running: std::sync::atomic::AtomicU32,
    /// The owner's policy and every task here.
    pub owner: Arc<crate::owner::Owner>,
    /// Lower layers shared by tasks with the same tree.
    pub lowers: Arc<shoal_task::cas::Lowers>,
    /// Unpacked images (`--image`), by id.
    pub images: Arc<shoal_task::cas::Lowers>,
    /// Detached batch attempts (running or ended) their submitter may come
    /// back for.
    pub detached: Detached,
    /// The thread every task is forked from.
    pub forker: Forker,
    /// Warm slots (cgroup v1): tasks start in a cgroup made ahead of time.
    pub warm: Option<Arc<Pool>>,
    /// The tmpfs task directories and spools are on (`scratch =
    /// "memory"`), unmounted at shutdown.
    pub memory_scratch: Option<PathBuf>,
}

/// The thread every task is forked from, alive as long as the agent.
///
/// A workspace's supervisor asks the kernel to SIGKILL it when its parent
/// dies (`PR_SET_PDEATHSIG`), so that nothing outlives a crashed agent; and
/// the kernel takes "parent" to mean the forking *thread*. Forked from
/// tokio's blocking pool, whose idle threads exit after 10 s, a task that
/// ran longer than that on a quiet agent was killed with its thread.
#[derive(Debug)]
pub struct Forker {
    tx: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl Default for Forker {
    fn default() -> Self {
        Self::new()
    }
}

impl Forker {
    /// Starts the thread. Should that fail, every task fails to start,
    /// naming the cause.
    pub fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let started = std::thread::Builder::new()
            .name("shoal-fork".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "no fork thread: this node can start no task");
        }
        Self { tx }
    }

    /// Runs `f` on the thread (inside the current tokio runtime, so that
    /// a `tokio::process::Command` can be spawned there) and returns its
    /// result.
    ///
    /// # Errors
    /// The thread is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let (otx, orx) = tokio::sync::oneshot::channel();
        let rt = tokio::runtime::Handle::current();
        let job = Box::new(move || {
            let _in = rt.enter();
            let _ = otx.send(f());
        });
        self.tx
            .send(job)
            .map_err(|_| std::io::Error::other("the fork thread is gone"))?;
        orx.await
            .map_err(|_| std::io::Error::other("the fork thread is gone"))
    }
}

/// How long a detached attempt's result waits for its submitter to come
/// back and collect it (HTCondor's job lease is 40 minutes).
pub const KEEP: Duration = Duration::from_secs(20 * 60);

/// What a detached attempt left for its submitter: its output spooled
/// (in memory, or on disk when large), and the messages that end it
/// (changes and exit status, or the failure or eviction).
#[derive(Debug)]
pub struct Kept {
    stdout: Spooled,
    stderr: Spooled,
    /// Its upper layer, for the contents of the change set's streamed
    /// files.
    upper: Option<PathBuf>,
    end: Vec<FromExec>,
}

/// Output a detached attempt's spool holds in memory, per stream, before
/// it goes to a file. Most tasks print less: their spool then costs no
/// file (on this machine kind, each file made and removed per task slows
/// every later inode allocation). The spools held at once are those of
/// the batch attempts running (one per guest slot at most) and of those
/// that ended after their submitter went away (until collected, or
/// `KEEP`), so this bounds the memory too.
const SPOOL_IN_MEMORY: usize = 256 << 10;

/// Detached batch attempts by task id: a watch that holds their result
/// once they end.
#[derive(Debug)]
pub struct Detached {
    dir: PathBuf,
    map: std::sync::Mutex<
        std::collections::HashMap<String, tokio::sync::watch::Receiver<Option<Arc<Kept>>>>,
    >,
}

impl Detached {
    /// Spools under `dir` (emptied: an earlier life's attempts are gone).
    pub fn new(dir: &Path) -> Self {
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::create_dir_all(dir);
        Self {
            dir: dir.to_owned(),
            map: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<String, tokio::sync::watch::Receiver<Option<Arc<Kept>>>>,
    > {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{id}.stdout")),
            self.dir.join(format!("{id}.stderr")),
        )
    }

    /// Registers attempt `id` and starts its spool (files only once it
    /// outgrows memory).
    fn register(&self, id: &str) -> Spool {
        let (o, e) = self.paths(id);
        let (tx, rx) = tokio::sync::watch::channel(None);
        self.lock().insert(id.to_owned(), rx);
        Spool {
            out: Stream::new(o),
            err: Stream::new(e),
            tx,
        }
    }

    /// Where a detached attempt's upper layer is kept until collected.
    fn upper(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.upper"))
    }

    /// Drops attempt `id`, and its files when its spool or upper layer
    /// went to disk.
    fn forget(&self, id: &str, on_disk: bool) {
        self.lock().remove(id);
        if on_disk {
            let (o, e) = self.paths(id);
            let _ = std::fs::remove_file(o);
            let _ = std::fs::remove_file(e);
            let u = self.upper(id);
            if u.exists() {
                let _ = workspace::remove_all(&u);
            }
        }
    }
}

/// One stream of a detached attempt's output while it runs.
#[derive(Debug)]
enum Stream {
    /// All of it so far, and where it goes once it outgrows memory.
    Mem(Vec<u8>, PathBuf),
    /// On disk.
    File(std::fs::File, PathBuf),
    /// A write failed (a full disk): the result cannot be collected, and
    /// the submitter runs the task again.
    Broken,
}

impl Stream {
    fn new(path: PathBuf) -> Self {
        Self::Mem(Vec::new(), path)
    }

    fn write(&mut self, data: &[u8]) {
        use std::io::Write;
        let next = match std::mem::replace(self, Self::Broken) {
            Self::Mem(mut held, path) if held.len() + data.len() <= SPOOL_IN_MEMORY => {
                held.extend_from_slice(data);
                Self::Mem(held, path)
            }
            Self::Mem(held, path) => {
                let spilled = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&path)
                    .and_then(|mut f| {
                        f.write_all(&held)?;
                        f.write_all(data)?;
                        Ok(f)
                    });
                match spilled {
                    Ok(f) => Self::File(f, path),
                    Err(_) => Self::Broken,
                }
            }
            Self::File(mut f, path) => match f.write_all(data) {
                Ok(()) => Self::File(f, path),
                Err(_) => Self::Broken,
            },
            Self::Broken => Self::Broken,
        };
        *self = next;
    }

    /// What is kept of it, or `None` when a write failed.
    fn kept(self) -> Option<Spooled> {
        match self {
            Self::Mem(d, _) => Some(Spooled::Mem(d)),
            Self::File(_, p) => Some(Spooled::File(p)),
            Self::Broken => None,
        }
    }
}

/// One stream of an ended detached attempt's output.
#[derive(Debug)]
enum Spooled {
    Mem(Vec<u8>),
    File(PathBuf),
}

impl Kept {
    fn on_disk(&self) -> bool {
        matches!(self.stdout, Spooled::File(_))
            || matches!(self.stderr, Spooled::File(_))
            || self.upper.is_some()
    }
}

impl Spooled {
    /// Its bytes from offset `from` on (none past its end).
    fn read_from(&self, from: u64) -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        match self {
            Self::Mem(d) => {
                let from = usize::try_from(from).unwrap_or(usize::MAX).min(d.len());
                Ok(d[from..].to_vec())
            }
            Self::File(p) => {
                let mut f = std::fs::File::open(p)?;
                f.seek(SeekFrom::Start(from))?;
                let mut d = Vec::new();
                f.read_to_end(&mut d)?;
                Ok(d)
            }
        }
    }
}

/// A detached attempt's output while it runs.
struct Spool {
    out: Stream,
    err: Stream,
    tx: tokio::sync::watch::Sender<Option<Arc<Kept>>>,
}

impl Spool {
    /// Some of it went to disk (or failed to).
    fn on_disk(&self) -> bool {
        !matches!((&self.out, &self.err), (Stream::Mem(..), Stream::Mem(..)))
    }

    fn write(&mut self, stdout: bool, data: &[u8]) {
        if stdout {
            self.out.write(data);
        } else {
            self.err.write(data);
        }
    }
}

/// Passes on one piece of output: to the spool of a detached attempt,
/// and to the submitter while its link is up. A broken link ends a plain
/// attempt (the error) and leaves a detached one running.
async fn emit<W: FrameSink>(
    tx: &mut W,
    spool: Option<&mut Spool>,
    link_up: &mut bool,
    m: FromExec,
) -> Result<(), LinkError> {
    let detach = spool.is_some();
    if let Some(sp) = spool {
        match &m {
            FromExec::Stdout(d) => sp.write(true, d),
            FromExec::Stderr(d) => sp.write(false, d),
            _ => {}
        }
    }
    if *link_up {
        if let Err(e) = link::send(tx, &m).await {
            if !detach {
                return Err(e);
            }
            *link_up = false;
        }
    }
    Ok(())
}

/// Counts a running task for as long as it lives.
struct Running<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> Running<'a> {
    fn new(c: &'a std::sync::atomic::AtomicU32) -> Self {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ExecEnv {
    /// At shutdown: kills whatever still runs and removes every task
    /// cgroup, this agent's parent cgroup, and the task directories.
    pub fn shutdown(&self) {
        if let Some(p) = &self.warm {
            p.close();
        }
        if let Some(m) = &self.cgroups {
            // A root agent's parent group is its own; another agent's is
            // the subtree its administrator gave it, which stays.
            let r = if nix::unistd::geteuid().is_root() {
                m.destroy()
            } else {
                m.list()
                    .unwrap_or_default()
                    .iter()
                    .try_for_each(|n| m.remove(n))
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cgroups not fully removed");
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.tasks_dir) {
            for e in rd.flatten() {
                let _ = workspace::remove_all(&e.path());
            }
        }
        if let Some(at) = &self.memory_scratch {
            // (Detached attempts' spools go with it, as they would at the
            // next start.)
            if let Err(e) = shoal_executor::memfs::release(at) {
                tracing::warn!(error = %e, "task scratch in memory not released");
            }
        }
    }

    /// Removes what a previous life of the agent left: task directories
    /// and cgroups.
    pub fn clean_leftovers(&self) {
        if let Some(m) = &self.cgroups {
            for n in m.list().unwrap_or_default() {
                match m.remove(&n) {
                    Ok(()) => {
                        tracing::info!(cgroup = %n, "removed a task cgroup left by a previous run")
                    }
                    Err(e) => {
                        tracing::warn!(cgroup = %n, error = %e, "cannot remove leftover cgroup")
                    }
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.tasks_dir) {
            for e in rd.flatten() {
                let p = e.path();
                match workspace::remove_all(&p) {
                    Ok(()) => {
                        tracing::info!(dir = %p.display(), "removed a task directory left by a previous run")
                    }
                    Err(e) => {
                        tracing::warn!(dir = %p.display(), error = %e, "cannot remove a task directory left by a previous run")
                    }
                }
            }
        }
    }
}

/// Everything one task made on this machine, removed on drop, whatever
/// happened.
struct TaskGuard {
    /// The task's directory (its upper and work directories), given back
    /// to `scratch` at the end; empty until chosen.
    dir: PathBuf,
    /// `dir` is the tree its warm slot keeps mounted: it stays with the
    /// slot if the task left it unchanged.
    in_slot: bool,
    scratch: Arc<crate::scratch::Scratch>,
    lower: Option<shoal_task::cas::Lower>,
    image: Option<shoal_task::cas::Lower>,
    cgroup: Option<(Arc<dyn CgroupManager>, String)>,
    /// The cgroup is a warm slot's: it stays (the slot goes back to its
    /// pool once the task has ended).
    warm: bool,
    slot: Option<(Arc<Pool>, Slot)>,
    spec: Option<Spec>,
}

/// A task cgroup whose processes would not die at once is tried again
/// this often, this many times.
const REMOVE_EVERY: Duration = Duration::from_secs(1);
const REMOVE_TRIES: u32 = 60;

/// Removes task cgroup `name` once its last process has died: tries every
/// `every`, `tries` times, and gives the last error.
fn remove_later(
    m: &dyn CgroupManager,
    name: &str,
    every: Duration,
    tries: u32,
) -> Result<(), shoal_executor::cgroup::CgroupError> {
    let mut r = Ok(());
    for _ in 0..tries {
        std::thread::sleep(every);
        r = m.remove(name);
        if r.is_ok() {
            break;
        }
    }
    r
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some((pool, slot)) = self.slot.take() {
            // The tree stays mounted for the slot's next task only as it
            // was: else its spawner unmounts it and the directory goes.
            let keep_tree = !self.in_slot || crate::scratch::clean(&self.dir, guest_owner());
            self.scratch.give_back_slot(&pool, slot, keep_tree);
        } else if let (Some((m, name)), false) = (&self.cgroup, self.warm) {
            if let Err(e) = m.remove(name) {
                // Its processes, at the guests' idle class, may take a
                // while to die of their SIGKILL on a busy machine (seen:
                // over 2 s with both cores taken), and their workspace's
                // mounts and files are still theirs meanwhile: the cgroup
                // is tried again, and the rest done after, off this thread.
                tracing::info!(cgroup = %name, error = %e, "task cgroup not removed yet: trying again");
                let (m, name) = (m.clone(), name.clone());
                let rest = self.rest();
                std::thread::spawn(move || {
                    if let Err(e) = remove_later(m.as_ref(), &name, REMOVE_EVERY, REMOVE_TRIES) {
                        tracing::warn!(cgroup = %name, error = %e, "task cgroup not removed");
                    }
                    rest.finish();
                });
                return;
            }
        }
        self.rest().finish();
    }
}

/// What a task's guard cleans up once no process of the task is left.
struct Rest {
    spec: Option<Spec>,
    lower: Option<shoal_task::cas::Lower>,
    image: Option<shoal_task::cas::Lower>,
    /// The task's directory, unless it is its slot's.
    dir: Option<PathBuf>,
    scratch: Arc<crate::scratch::Scratch>,
}

impl TaskGuard {
    fn rest(&mut self) -> Rest {
        // (A slot's tree directory is the slot's: it went with the slot,
        // or back to `scratch` already.)
        let dir = (!self.in_slot && !self.dir.as_os_str().is_empty())
            .then(|| std::mem::take(&mut self.dir));
        Rest {
            spec: self.spec.take(),
            lower: self.lower.take(),
            image: self.image.take(),
            dir,
            scratch: self.scratch.clone(),
        }
    }
}

impl Rest {
    fn finish(mut self) {
        if let Some(s) = &self.spec {
            let _ = workspace::cleanup(s);
        }
        // Unmounted: its shared lower layer and image may go.
        self.lower = None;
        self.image = None;
        if let Some(d) = self.dir.take() {
            self.scratch.give_back(d);
        }
    }
}

fn failed(code: i32, message: impl Into<String>) -> FromExec {
    FromExec::Failed {
        code,
        message: message.into(),
    }
}

/// The submitter's `TERM` if it sent one, else a safe default.
fn term_of(spec: &TaskSpec) -> OsString {
    spec.env.iter().find(|(k, _)| k == b"TERM").map_or_else(
        || OsString::from("xterm"),
        |(_, v)| OsString::from_vec(v.clone()),
    )
}

fn safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Serves a link: one task until it ends, and on a kept link
/// (`sequential`: a batch runner's, or an agent relaying `shoal run`s)
/// each next one it sends. Never panics on input; every refusal is a
/// `Failed` message naming the cause. `guest`: from another
/// node (under the owner's policy); `batch`: from another agent's batch
/// runner, the only one that may detach an attempt or `Reattach`.
///
/// # Errors
/// The link broke (the task, if running, is killed and cleaned up).
pub async fn serve<R, W>(
    env: Arc<ExecEnv>,
    guest: bool,
    batch: bool,
    sequential: bool,
    rx: R,
    mut tx: W,
) -> Result<(), LinkError>
where
    R: FrameSource + 'static,
    W: FrameSink,
{
    let mut inbox = Inbox::new(rx);
    let first = tokio::time::timeout(FIRST_MESSAGE, inbox.recv())
        .await
        .map_err(|_| LinkError::Closed)??;
    serve_one(&env, guest, batch, first, &mut inbox, &mut tx).await?;
    // A kept link serves its next task too (no new connection, no new
    // handshake), until it is closed or left idle.
    if !sequential {
        return Ok(());
    }
    loop {
        let next = match tokio::time::timeout(IDLE_LINK, inbox.recv()).await {
            Ok(Ok(m)) => m,
            Ok(Err(_)) | Err(_) => return Ok(()),
        };
        if !matches!(next, ToExec::Start(_) | ToExec::Reattach { .. }) {
            // Sent by the last task's submitter before it saw the end
            // (input, a signal, a window size), relayed after it: that
            // task is over.
            continue;
        }
        serve_one(&env, guest, batch, next, &mut inbox, &mut tx).await?;
    }
}

/// How long a link may take to say what it wants.
const FIRST_MESSAGE: Duration = Duration::from_secs(30);

/// How long a batch runner's link is kept, idle, for its next attempt
/// (the runner reuses a link only while it has been idle for less).
pub const IDLE_LINK: Duration = Duration::from_secs(60);

/// A link's incoming messages: read directly until a task runs, then by a
/// task of its own for the rest of the link's life (a running task's input
/// may come at any time, and receiving is not cancel-safe).
struct Inbox<R> {
    link: Option<R>,
    rx: Option<mpsc::Receiver<Result<ToExec, LinkError>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl<R: FrameSource + 'static> Inbox<R> {
    fn new(link: R) -> Self {
        Self {
            link: Some(link),
            rx: None,
            reader: None,
        }
    }

    /// The messages from now on, read ahead by a task of their own.
    fn read_ahead(&mut self) -> &mut mpsc::Receiver<Result<ToExec, LinkError>> {
        let (tx, rx) = mpsc::channel::<Result<ToExec, LinkError>>(16);
        if let Some(mut link) = self.link.take() {
            self.reader = Some(tokio::spawn(async move {
                loop {
                    let m = link::recv::<ToExec, _>(&mut link).await;
                    let end = m.is_err();
                    if tx.send(m).await.is_err() || end {
                        return;
                    }
                }
            }));
        }
        // (Without a link, a channel whose sender is gone: closed.)
        self.rx.get_or_insert(rx)
    }

    async fn recv(&mut self) -> Result<ToExec, LinkError> {
        match (&mut self.rx, &mut self.link) {
            (Some(rx), _) => rx.recv().await.unwrap_or(Err(LinkError::Closed)),
            (None, Some(link)) => link::recv::<ToExec, _>(link).await,
            (None, None) => Err(LinkError::Closed),
        }
    }
}

impl<R> Drop for Inbox<R> {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

/// One task, from its first message (`Start` or `Reattach`) to its end.
async fn serve_one<R: FrameSource + 'static, W: FrameSink>(
    env: &Arc<ExecEnv>,
    guest: bool,
    batch: bool,
    first: ToExec,
    inbox: &mut Inbox<R>,
    tx: &mut W,
) -> Result<(), LinkError> {
    let t0 = std::time::Instant::now();
    let spec = match first {
        // Only another agent's batch runner may detach an attempt or
        // collect one: a client (even relayed) may not read another's.
        ToExec::Start(mut spec) => {
            spec.detach &= batch;
            spec
        }
        ToExec::Reattach {
            task_id,
            stdout_from,
            stderr_from,
        } if batch => return reattach(env, &task_id, stdout_from, stderr_from, tx).await,
        _ => {
            let m = failed(2, "protocol: the first message must be Start or Reattach");
            return link::send(tx, &m).await;
        }
    };
    if let Err(m) = validate(env, &spec) {
        return link::send(tx, &failed(2, m)).await;
    }
    // The image, held from now on (not evicted under the task); its
    // manifest is asked for only when it is not unpacked here yet.
    let mut image: Option<(Lower, Option<Vec<ImageEntry>>)> = None;
    if let Some(r) = &spec.image {
        let held = env.images.hold(&hex::encode(r.id));
        let manifest = if held.ready() {
            None
        } else {
            link::send(tx, &FromExec::NeedImage).await?;
            match inbox.recv().await? {
                ToExec::Image(entries) if id_of(&entries) == r.id => Some(entries),
                ToExec::Image(_) => {
                    let m = format!("the manifest of image {} does not match its id", r.name);
                    return link::send(tx, &failed(2, m)).await;
                }
                other => {
                    let m = format!("protocol: expected an image manifest, got {other:?}");
                    return link::send(tx, &failed(2, m)).await;
                }
            }
        };
        image = Some((held, manifest));
    }
    // Fill the cache with what it lacks.
    let wanted = spec.tree.iter().filter_map(|e| match &e.node {
        Node::File { hash, .. } => Some(*hash),
        _ => None,
    });
    let image_files = image
        .iter()
        .filter_map(|(_, m)| m.as_ref())
        .flatten()
        .filter_map(|e| match &e.node {
            ImageNode::File { hash, .. } => Some(*hash),
            _ => None,
        });
    let mut missing = env.cas.missing(wanted.chain(image_files));
    if !missing.is_empty() {
        // (A tree the cache holds whole, most runs', goes on to `Started`
        // without a message and a wake of the submitter's.)
        link::send(tx, &FromExec::Need(missing.clone())).await?;
    }
    while !missing.is_empty() {
        match inbox.recv().await? {
            ToExec::Blob { hash, data } => {
                let cas = env.cas.clone();
                let r = tokio::task::spawn_blocking(move || cas.put(&hash, &data))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                if let Err(e) = r {
                    return link::send(tx, &failed(125, format!("{}: {e}", env.node))).await;
                }
                missing.retain(|h| h != &hash);
            }
            other => {
                let m = format!("protocol: expected file contents, got {other:?}");
                return link::send(tx, &failed(2, m)).await;
            }
        }
    }
    // A guest claims a slot under the owner's policy (late binding: the
    // owner may have come back since the submitter chose this node).
    let command = spec
        .argv
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let claim = match env
        .owner
        .claim(&spec.task_id, guest, spec.resources.cpus, command)
    {
        Ok(c) => c,
        Err(r) => {
            let m = FromExec::Evicted {
                node: env.node.clone(),
                reason: r.to_string(),
            };
            return link::send(tx, &m).await;
        }
    };
    let _running = Running::new(&env.running);
    let mut guard = TaskGuard {
        dir: PathBuf::new(),
        in_slot: false,
        scratch: env.scratch.clone(),
        lower: None,
        image: None,
        cgroup: None,
        warm: false,
        slot: None,
        spec: None,
    };
    let prepared = prepare(env, &spec, image, guest, &mut guard).await;
    let Started {
        proc: mut child,
        mut stdin,
        mut stdout,
        mut stderr,
        winfd,
        upper,
    } = match prepared {
        Ok(x) => x,
        Err(f) => return link::send(tx, &f).await,
    };
    if let Some((_, cg)) = &guard.cgroup {
        claim.attach(cg).await;
    }
    let t_started = t0.elapsed();
    link::send(
        tx,
        &FromExec::Started {
            node: env.node.clone(),
        },
    )
    .await?;
    // A batch attempt outlives its submitter's link: its output is also
    // spooled, and its result kept for the submitter to collect.
    let mut spool = spec.detach.then(|| env.detached.register(&spec.task_id));
    let detach = spool.is_some();

    let (mut obuf, mut ebuf) = (vec![0u8; 32 * 1024], vec![0u8; 32 * 1024]);
    let pid = child.id();
    let mut link_up = true;
    let input = inbox.read_ahead();
    let status = loop {
        tokio::select! {
            n = async { stdout.as_mut().expect("checked").read(&mut obuf).await }, if stdout.is_some() => {
                match n {
                    Ok(0) | Err(_) => stdout = None,
                    Ok(n) => emit(tx, spool.as_mut(), &mut link_up, FromExec::Stdout(obuf[..n].to_vec())).await?,
                }
            }
            n = async { stderr.as_mut().expect("checked").read(&mut ebuf).await }, if stderr.is_some() => {
                match n {
                    Ok(0) | Err(_) => stderr = None,
                    Ok(n) => emit(tx, spool.as_mut(), &mut link_up, FromExec::Stderr(ebuf[..n].to_vec())).await?,
                }
            }
            m = input.recv(), if link_up => match m {
                Some(Ok(ToExec::Stdin(data))) => {
                    if let Some(s) = stdin.as_mut() {
                        if s.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(Ok(ToExec::StdinEof)) => stdin = None,
                Some(Ok(ToExec::Resize(rows, cols))) => {
                    if let Some(fd) = &winfd {
                        let ws = rustix::termios::Winsize {
                            ws_row: rows,
                            ws_col: cols,
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        let _ = rustix::termios::tcsetwinsize(fd, ws);
                    }
                }
                Some(Ok(ToExec::Signal(sig))) => {
                    if let (Some(p), Ok(s)) = (pid, nix::sys::signal::Signal::try_from(sig)) {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), s);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    link_up = false;
                    if detach {
                        // A batch attempt runs on; its submitter may come
                        // back for the result.
                        tracing::info!(task = %spec.task_id, "submitter gone; the attempt runs on, detached");
                    } else {
                        // The submitter is gone: the task dies with it.
                        tracing::info!(task = %spec.task_id, "submitter gone; killing the task");
                        child.start_kill();
                        // A warm slot's task dies with its pid namespace;
                        // its spawner stays.
                        if let (Some((m, n)), false) = (&guard.cgroup, guard.warm) {
                            let _ = m.kill_all(n);
                        }
                    }
                }
            },
            st = child.wait(), if stdout.is_none() && stderr.is_none() => break st?,
        }
    };
    let Ended {
        status,
        usage: measured,
        slot,
    } = status;
    guard.slot = slot;
    if !link_up && !detach {
        reap(&mut child, &mut guard).await;
        return Err(LinkError::Closed);
    }
    let mut end = Vec::new();
    if claim.finish() == shoal_owner::Released::Evicted {
        // Its partial changes go with the task directory.
        tracing::info!(task = %spec.task_id, "evicted; the submitter runs it elsewhere");
        end.push(FromExec::Evicted {
            node: env.node.clone(),
            reason: "the owner's policy evicted it".into(),
        });
    } else {
        let usage = measured
            .or_else(|| guard.cgroup.as_ref().and_then(|(m, n)| m.usage(n).ok()))
            .unwrap_or_default();
        let oom = usage.oom_kills > 0;
        let status = match (status.code(), status.signal()) {
            (Some(c), _) => Status::Code(c),
            (None, Some(s)) => Status::Signal(s),
            _ => Status::Code(125),
        };
        let commit = match spec.commit {
            Commit::Always => true,
            Commit::Success => status == Status::Code(0),
            Commit::Never => false,
        };
        if commit {
            // Large files are read and sent after the change set, piece by
            // piece (a detached attempt's upper layer is kept for that until
            // its result is collected).
            // (An empty upper layer, most tasks of a batch, is one read
            // here; any other is read off the runtime's threads.)
            let cs = if std::fs::read_dir(&upper).is_ok_and(|mut d| d.next().is_none()) {
                Ok(ChangeSet::default())
            } else {
                let up = upper.clone();
                tokio::task::spawn_blocking(move || {
                    ChangeSet::from_upper_within(&up, INLINE_CHANGES)
                })
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
            };
            match cs {
                Ok(cs) => end.push(FromExec::Changes(cs)),
                Err(e) => end.push(failed(
                    125,
                    format!("{}: reading the task's changes: {e}", env.node),
                )),
            }
        }
        if !matches!(end.last(), Some(FromExec::Failed { .. })) {
            end.push(FromExec::Exit {
                status,
                oom,
                cpu_s: usage.cpu_usec as f64 / 1e6,
                mem_peak_bytes: usage.memory_peak_bytes,
            });
        }
    }
    // Whether large files follow the change set, read from the upper layer.
    let streams = end.iter().any(|m| match m {
        FromExec::Changes(cs) => cs.streamed().next().is_some(),
        _ => false,
    });
    let mut delivered = Err(LinkError::Closed);
    if link_up {
        delivered = Ok(());
        if !streams {
            // (Changes and the exit status in one write: the submitter
            // wakes once for its task's end.)
            let all: Vec<&FromExec> = end.iter().collect();
            delivered = link::send_small(tx, &all).await;
        } else {
            for m in &end {
                let mut sent = link::send(tx, m).await;
                if let (Ok(()), FromExec::Changes(cs)) = (&sent, m) {
                    sent = send_streamed(tx, &upper, cs, &env.node).await;
                }
                if let Err(e) = sent {
                    delivered = Err(e);
                    break;
                }
            }
        }
    }
    if delivered.is_err() {
        // Reaped before the guard removes the task's cgroup and files.
        reap(&mut child, &mut guard).await;
    }
    match spool.take() {
        None => delivered?,
        Some(sp) if delivered.is_ok() => env.detached.forget(&spec.task_id, sp.on_disk()),
        Some(Spool { out, err, tx }) => {
            match (out.kept(), err.kept()) {
                (Some(stdout), Some(stderr)) => {
                    // The large files its changes did not hold stay on
                    // disk, beside its spool, until collected.
                    let kept_upper = env.detached.upper(&spec.task_id);
                    let moved = !streams || std::fs::rename(&upper, &kept_upper).is_ok();
                    if moved {
                        tracing::info!(task = %spec.task_id, "the attempt ended detached; its result is kept");
                        tx.send_replace(Some(Arc::new(Kept {
                            stdout,
                            stderr,
                            upper: streams.then_some(kept_upper),
                            end,
                        })));
                    } else {
                        tracing::warn!(task = %spec.task_id, "its changes could not be kept: the result is not kept");
                        env.detached.forget(&spec.task_id, true);
                    }
                }
                _ => {
                    tracing::warn!(task = %spec.task_id, "spool incomplete: the result is not kept");
                    env.detached.forget(&spec.task_id, true);
                }
            }
            let (env, id) = (env.clone(), spec.task_id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(KEEP).await;
                env.detached.forget(&id, true);
            });
        }
    }
    let t_exit = t0.elapsed();
    reap(&mut child, &mut guard).await;
    // Unmounting and removing the cgroup take a while on cgroup v1: not on
    // the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || drop(guard)).await;
    tracing::debug!(
        task = %spec.task_id,
        started_ms = t_started.as_secs_f64() * 1e3,
        exit_ms = t_exit.as_secs_f64() * 1e3,
        cleaned_ms = t0.elapsed().as_secs_f64() * 1e3,
        "task timings"
    );
    // Keep the cache under its cap (running tasks keep their hard links).
    let (cas, lowers, images) = (env.cas.clone(), env.lowers.clone(), env.images.clone());
    tokio::task::spawn_blocking(move || {
        lowers.evict();
        images.evict();
        cas.evict();
    });
    Ok(())
}

/// [`Proc::reap`], the slot it gives back going to the task's guard.
async fn reap(child: &mut Proc, guard: &mut TaskGuard) {
    if let Some(s) = child.reap().await {
        guard.slot = Some(s);
    }
}

/// The most entries a task's tree may have for its layer to be looked up
/// on the event loop (`Lowers::lookup` serializes and hashes the whole
/// tree: a few hundred kilobytes for this many; a larger tree's lookup
/// goes to a thread with the rest of its preparation).
const INLINE_TREE: usize = 4096;

/// File content a change set holds before its files are streamed
/// instead ([`ChangeSet::from_upper_within`]): what either side holds in
/// memory of a task's changes.
const INLINE_CHANGES: u64 = 4 << 20;
/// The largest piece of a streamed file in one message.
const CONTENT_PIECE: usize = 256 << 10;

/// Sends the contents of `cs`'s streamed files from the task's upper
/// layer, in order, piece by piece. A file that no longer has the length
/// the change set gave it ends the task with `Failed` (the submitter then
/// applies nothing).
async fn send_streamed<W: FrameSink>(
    tx: &mut W,
    upper: &Path,
    cs: &ChangeSet,
    node: &str,
) -> Result<(), LinkError> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; CONTENT_PIECE];
    for (rel, size) in cs.streamed() {
        let unreadable = |e: &dyn std::fmt::Display| {
            failed(
                125,
                format!("{node}: reading the task's changes: {}: {e}", rel.display()),
            )
        };
        let mut f = match tokio::fs::File::open(upper.join(rel)).await {
            Ok(f) => f,
            Err(e) => return link::send(tx, &unreadable(&e)).await,
        };
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            let n = match f.read(&mut buf[..want]).await {
                Ok(0) => {
                    return link::send(tx, &unreadable(&"shorter than when it was listed")).await
                }
                Ok(n) => n,
                Err(e) => return link::send(tx, &unreadable(&e)).await,
            };
            link::send(tx, &FromExec::Content(buf[..n].to_vec())).await?;
            left -= n as u64;
        }
    }
    Ok(())
}

/// A submitter back for a detached attempt: waits for it to end, then
/// sends the output it lacks, the changes and the exit status, and
/// forgets the attempt. `Unknown` when there is no such attempt (or its
/// result could not be kept).
async fn reattach<W: FrameSink>(
    env: &ExecEnv,
    task_id: &str,
    stdout_from: u64,
    stderr_from: u64,
    tx: &mut W,
) -> Result<(), LinkError> {
    let rx = env.detached.lock().get(task_id).cloned();
    let Some(mut rx) = rx else {
        return link::send(tx, &FromExec::Unknown).await;
    };
    tracing::info!(task = %task_id, "submitter back for a detached attempt");
    let kept = loop {
        let now = rx.borrow_and_update().clone();
        if let Some(k) = now {
            break k;
        }
        if rx.changed().await.is_err() {
            // Its result was not kept (an incomplete spool).
            return link::send(tx, &FromExec::Unknown).await;
        }
    };
    for (from, out) in [(stdout_from, true), (stderr_from, false)] {
        let k = kept.clone();
        let data = tokio::task::spawn_blocking(move || {
            if out { &k.stdout } else { &k.stderr }.read_from(from)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        for chunk in data.chunks(link::CHUNK) {
            let m = if out {
                FromExec::Stdout(chunk.to_vec())
            } else {
                FromExec::Stderr(chunk.to_vec())
            };
            link::send(tx, &m).await?;
        }
    }
    for m in &kept.end {
        link::send(tx, m).await?;
        if let (FromExec::Changes(cs), Some(upper)) = (m, &kept.upper) {
            send_streamed(tx, upper, cs, &env.node).await?;
        }
    }
    env.detached.forget(task_id, kept.on_disk());
    Ok(())
}

fn validate(env: &ExecEnv, spec: &TaskSpec) -> Result<(), String> {
    if env.cgroups.is_none() {
        return Err(format!(
            "{} offers no guest slots (its start-up checks failed)",
            env.node
        ));
    }
    if !safe_id(&spec.task_id) {
        return Err("invalid task id".into());
    }
    if spec.argv.is_empty() || spec.argv[0].is_empty() {
        return Err("no command given".into());
    }
    if !spec.cwd.is_absolute() {
        return Err(format!(
            "working directory {} is not absolute",
            spec.cwd.display()
        ));
    }
    limits(spec).validate().map_err(|e| e.to_string())
}

fn limits(spec: &TaskSpec) -> Limits {
    Limits {
        cpus: spec.resources.cpus,
        cpu_weight: None,
        memory_bytes: spec.resources.memory_bytes,
        pids: Some(spec.resources.pids.unwrap_or(DEFAULT_PIDS)),
    }
}

/// Builds the task's tree, cgroup and workspace, and starts the command.
async fn prepare(
    env: &ExecEnv,
    spec: &TaskSpec,
    image: Option<(Lower, Option<Vec<ImageEntry>>)>,
    guest: bool,
    guard: &mut TaskGuard,
) -> Result<Started, FromExec> {
    let err125 =
        |what: &str, e: &dyn std::fmt::Display| failed(125, format!("{}: {what}: {e}", env.node));
    // A task on the slot's own root and network can use a tree its warm
    // slot keeps mounted (see `warm::Slot::send`).
    let eligible = spec.image.is_none() && !spec.net_host;
    let Prepared {
        lower,
        slot,
        dir,
        reuse,
        key,
    } = {
        let (pool, scratch) = (env.warm.clone(), env.scratch.clone());
        let at = spec.cwd.clone();
        // A tree made already (the same tree as an earlier task's) is
        // prepared here on the event loop: a few small file operations. One
        // to make, or one so large that hashing it would hold up the event
        // loop, goes to a thread.
        let found = if spec.tree.len() <= INLINE_TREE {
            env.lowers.lookup(&spec.tree)
        } else {
            // (Named on the thread.)
            Ok(Lookup::ToMake(env.lowers.to_make(spec.tree.clone())))
        };
        let r = match found {
            Ok(Lookup::Made(lower)) => take_slot(lower, at, eligible, pool, &scratch, true),
            Ok(Lookup::ToMake(m)) => {
                let cas = env.cas.clone();
                tokio::task::spawn_blocking(move || -> Result<_, String> {
                    let lower = m.make(&cas, guest_owner()).map_err(|e| e.to_string())?;
                    take_slot(lower, at, eligible, pool, &scratch, false)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
            }
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(p) => p,
            Err(e) => return Err(err125("preparing the task's files", &e)),
        }
    };
    guard.dir = dir.clone();
    guard.in_slot = reuse;
    guard.slot = slot;
    let (mut upper, work) = (dir.join("upper"), dir.join("work"));
    let lower_stack = lower.stack();
    guard.lower = Some(lower);
    let lower = lower_stack;
    let root = match image {
        None => Root::Host,
        Some((held, manifest)) => {
            let path = held.path.clone();
            let (cas, images) = (env.cas.clone(), env.images.clone());
            let r = tokio::task::spawn_blocking(move || {
                let r = images.fill(&held, |tmp| match &manifest {
                    Some(m) => cas.materialize_image(m, tmp),
                    // Evicted between the check and now cannot happen
                    // (it is held); a layer that vanished is a failure.
                    None => Err(shoal_task::cas::CasError::Missing("image".into())),
                });
                (held, r)
            })
            .await;
            match r {
                Ok((held, Ok(()))) => {
                    guard.image = Some(held);
                    Root::Image(path)
                }
                Ok((_, Err(e))) => return Err(err125("unpacking the image", &e)),
                Err(e) => return Err(err125("unpacking the image", &e)),
            }
        }
    };
    let ws = Spec {
        run_dir: dir.join("run"),
        root,
        tree: Some(Tree {
            lower,
            upper: upper.clone(),
            work,
            at: spec.cwd.clone(),
        }),
        cwd: spec.cwd.clone(),
        hostname: env.node.clone(),
        uid: GUEST_ID,
        gid: GUEST_ID,
        net: if spec.net_host {
            Net::Host
        } else {
            Net::Loopback
        },
        idle: guest,
        tty: spec.tty.is_some(),
    };
    guard.spec = Some(ws.clone());
    let mgr = env
        .cgroups
        .clone()
        .ok_or_else(|| failed(125, "no cgroups"))?;
    let io = TaskIo::new(spec.tty, spec.no_input).map_err(|e| err125("pipes", &e))?;
    let argv0 = OsString::from_vec(spec.argv[0].clone());
    let not_started = |errno: Option<i32>, e: &dyn std::fmt::Display| match errno {
        Some(nix::libc::ENOENT) => failed(
            127,
            format!("{}: command not found", argv0.to_string_lossy()),
        ),
        Some(nix::libc::EACCES) => failed(
            126,
            format!("{}: permission denied", argv0.to_string_lossy()),
        ),
        _ => err125("starting the command", e),
    };
    let t = std::time::Instant::now();
    let mut req = warm::Request {
        spec: ws,
        argv: spec.argv.clone(),
        env: task_env(env, spec),
    };
    // A warm slot when one is ready: nothing moves between cgroups on the
    // task's path.
    let ready = guard.slot.take().or_else(|| {
        env.warm
            .as_ref()
            .filter(|_| !eligible)
            .and_then(|p| Some((p.clone(), p.take()?)))
    });
    if let Some((pool, slot)) = ready {
        let fds = io.theirs().map_err(|e| err125("pipes", &e))?;
        let (m, l) = (mgr.clone(), limits(spec));
        // A new tree for the slot to keep: the task's, with its own hold
        // on its lower layers.
        let keep = (eligible && !reuse).then(|| KeptTree {
            dir: dir.clone(),
            key,
            hold: Box::new(guard.lower.clone()),
        });
        let mut slot = slot;
        let [a, b, c] = &fds;
        let stdio = [a.as_fd(), b.as_fd(), c.as_fd()];
        // Sent from here when the slot's spawner is free to take it (a few
        // small cgroup writes and one `sendmsg`): the request reaches the
        // spawner without a thread's wake first. A thread waits for its
        // answer meanwhile, or does both when the spawner is still making
        // the slot's workspace ahead.
        let started = if slot.ready_now() {
            match slot.send(m.as_ref(), &l, &req, stdio, keep) {
                Ok(sent) => {
                    drop(fds);
                    tokio::task::spawn_blocking(move || {
                        let r = slot.started(sent);
                        (slot, req, r)
                    })
                    .await
                }
                Err(e) => Ok((slot, req, Err(e))),
            }
        } else {
            tokio::task::spawn_blocking(move || {
                let [a, b, c] = &fds;
                let stdio = [a.as_fd(), b.as_fd(), c.as_fd()];
                let r = slot
                    .send(m.as_ref(), &l, &req, stdio, keep)
                    .and_then(|sent| slot.started(sent));
                (slot, req, r)
            })
            .await
        };
        let Ok((slot, req_back, r)) = started else {
            return Err(err125(
                "starting the command",
                &"the starting thread failed",
            ));
        };
        if r.is_ok() || matches!(r, Err(WarmError::Task { .. })) {
            // The slot keeps the task's tree now (or still).
            guard.in_slot |= eligible;
        }
        match (slot, req_back, r) {
            (slot, _, Ok((pid, end))) => {
                tracing::debug!(
                    start_ms = t.elapsed().as_secs_f64() * 1e3,
                    slot = slot.cgroup(),
                    "started in a warm slot"
                );
                guard.cgroup = Some((mgr.clone(), slot.cgroup().to_owned()));
                guard.warm = true;
                let proc = Proc::Warm(WarmProc::new(pool, mgr, slot, pid, end));
                return io.started(proc, upper).map_err(|e| err125("pipes", &e));
            }
            (slot, _, Err(WarmError::Task { errno, message })) => {
                // (Given back by the guard, which knows whether the tree
                // is as it was.)
                guard.slot = Some((pool, slot));
                return Err(not_started(errno, &message));
            }
            (slot, r, Err(e)) => {
                // The slot's directory stays the slot's: a request too large
                // was never sent, but any other failure may have come after
                // the spawner took the tree (its directory then goes with
                // the discarded slot).
                let too_large = matches!(e, WarmError::TooLarge);
                let own_dir = guard.in_slot || (eligible && !too_large);
                if too_large {
                    // The slot is fine; the request (a huge environment)
                    // is not for it.
                    let scratch = env.scratch.clone();
                    tokio::task::spawn_blocking(move || scratch.give_back_slot(&pool, slot, true));
                } else {
                    tracing::warn!(error = %e, "warm slot failed; starting the task in a fresh cgroup");
                    tokio::task::spawn_blocking(move || pool.discard(slot));
                }
                req = r;
                if own_dir {
                    // That directory is the slot's (its spawner may keep it
                    // mounted, or remove it with the slot): the task gets
                    // one of its own.
                    let d = env.scratch.take();
                    fresh_dirs(&d).map_err(|e| err125("preparing the task's files", &e))?;
                    upper = d.join("upper");
                    if let Some(t) = req.spec.tree.as_mut() {
                        t.upper.clone_from(&upper);
                        t.work = d.join("work");
                    }
                    req.spec.run_dir = d.join("run");
                    guard.in_slot = false;
                    guard.dir = d;
                    guard.spec = Some(req.spec.clone());
                }
            }
        }
    }
    let cg_name = format!("task-{}", spec.task_id);
    mgr.create(&cg_name, &limits(spec))
        .map_err(|e| err125("cgroup", &e))?;
    guard.cgroup = Some((mgr.clone(), cg_name.clone()));
    let plan = Plan::new(&req.spec).map_err(|e| err125("workspace", &e))?;
    let stdio = io.theirs().map_err(|e| err125("pipes", &e))?;
    let mut cmd = req
        .command(stdio)
        .ok_or_else(|| failed(2, "an empty command"))?;
    spawn_into(&mut cmd, mgr.as_ref(), &cg_name).map_err(|e| err125("cgroup", &e))?;
    // The end as soon as the supervisor knows it, before its namespaces'
    // teardown (as in a warm slot).
    let (early_r, early_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| err125("pipes", &e))?;
    plan.report_end_to(early_w.as_fd()).apply(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let t_setup = t.elapsed();
    // The fork waits for the child's exec (after its mounts): not on the
    // runtime's thread, and from the thread that lives as long as we do.
    let spawned = env.forker.run(move || cmd.spawn()).await.and_then(|r| r);
    tracing::debug!(
        setup_ms = t_setup.as_secs_f64() * 1e3,
        spawn_ms = (t.elapsed() - t_setup).as_secs_f64() * 1e3,
        "cgroup and plan, then spawn"
    );
    drop(early_w);
    match spawned {
        Ok(child) => {
            let early = tokio::net::unix::pipe::Receiver::from_owned_fd(early_r).ok();
            io.started(Proc::Cold(Box::new(ColdProc { child, early })), upper)
                .map_err(|e| err125("pipes", &e))
        }
        Err(e) => Err(not_started(e.raw_os_error(), &e)),
    }
}

/// With the task's lower layer: a warm slot for it (the one keeping this
/// tree, if any) and its directory. `inline`: called on the event loop
/// (what may block goes to a thread).
fn take_slot(
    lower: Lower,
    at: PathBuf,
    eligible: bool,
    pool: Option<Arc<Pool>>,
    scratch: &Arc<crate::scratch::Scratch>,
    inline: bool,
) -> Result<Prepared, String> {
    let mut key = lower.stack();
    key.push(at);
    let matches = |s: &Slot| s.kept_tree().is_some_and(|k| k.key == key);
    // (Taken now only for a tree it may keep: another task, with an
    // image to unpack, say, takes one when it is ready to start.)
    let slot = pool
        .as_ref()
        .filter(|_| eligible)
        .and_then(|p| Some((p.clone(), p.take_preferring(matches)?)));
    let reuse = eligible && slot.as_ref().is_some_and(|(_, s)| matches(s));
    let dir = match slot.as_ref().and_then(|(_, s)| s.kept_tree()) {
        Some(k) if reuse => k.dir.clone(),
        _ => {
            let d = scratch.take();
            if let Err(e) = fresh_dirs(&d) {
                // (A full disk, say: the slot and the directory go back,
                // on a thread when this is the event loop: a slot's give
                // back waits for its spawner.)
                let scratch = scratch.clone();
                let back = move || {
                    if let Some((p, s)) = slot {
                        scratch.give_back_slot(&p, s, true);
                    }
                    scratch.give_back(d);
                };
                if inline {
                    tokio::task::spawn_blocking(back);
                } else {
                    back();
                }
                return Err(e);
            }
            d
        }
    };
    Ok(Prepared {
        lower,
        slot,
        dir,
        reuse,
        key,
    })
}

/// What `prepare` finds or makes: the tree's lower layer, made off the
/// runtime's threads when it is new.
struct Prepared {
    lower: Lower,
    /// A warm slot, if one is ready (the one keeping this tree, if any).
    slot: Option<(Arc<Pool>, Slot)>,
    /// The task's directory: the slot's kept tree's (`reuse`) or a fresh
    /// one with its `upper` and `work`.
    dir: PathBuf,
    reuse: bool,
    /// What identifies the tree: its layers and where it is seen.
    key: Vec<PathBuf>,
}

/// Who owns a task's tree on this node: a root agent hands it to the
/// guest; another agent's own uid is the guest's inside the workspace's
/// user namespace, so its files stay its own (`None`).
fn guest_owner() -> Option<(u32, u32)> {
    nix::unistd::geteuid()
        .is_root()
        .then_some((GUEST_ID, GUEST_ID))
}

/// Makes (or, in a directory kept from an earlier task, sets back) a task
/// directory's `upper` and `work`: the upper layer's top as a new one is.
fn fresh_dirs(dir: &Path) -> Result<(), String> {
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    if let Some((u, g)) = guest_owner() {
        std::os::unix::fs::chown(&upper, Some(u), Some(g)).map_err(|e| e.to_string())?;
    }
    std::fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| e.to_string())
}

/// The command's environment: the submitter's, and where and what it is.
fn task_env(env: &ExecEnv, spec: &TaskSpec) -> Vec<(Vec<u8>, Vec<u8>)> {
    let tty = spec.tty.is_some();
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = spec
        .env
        .iter()
        .filter(|(k, _)| !(k == b"SHOAL_NODE" || k == b"SHOAL_TASK_ID" || (tty && k == b"TERM")))
        .cloned()
        .collect();
    out.push((b"SHOAL_NODE".to_vec(), env.node.clone().into_bytes()));
    out.push((b"SHOAL_TASK_ID".to_vec(), spec.task_id.clone().into_bytes()));
    if tty {
        out.push((b"TERM".to_vec(), term_of(spec).into_vec()));
    }
    out
}

type In = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
type Out = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

/// A started task: its process, our ends of its stdio, the pty (for window
/// sizes), and its upper layer.
struct Started {
    proc: Proc,
    stdin: Option<In>,
    stdout: Option<Out>,
    stderr: Option<Out>,
    winfd: Option<std::os::fd::OwnedFd>,
    upper: PathBuf,
}

/// The task's stdin, stdout and stderr: three pipes, or (`-t`) one
/// pseudo-terminal for all three whose master stays here.
enum TaskIo {
    Pty {
        master: std::os::fd::OwnedFd,
        slave: std::os::fd::OwnedFd,
    },
    Pipes {
        /// Our end of its stdin; none when the task gets no input (its
        /// stdin is `/dev/null`).
        input: Option<std::os::fd::OwnedFd>,
        /// Our ends of its stdout and stderr.
        output: [std::os::fd::OwnedFd; 2],
        theirs: [std::os::fd::OwnedFd; 3],
    },
}

impl TaskIo {
    fn new(tty: Option<(u16, u16)>, no_input: bool) -> std::io::Result<Self> {
        use nix::fcntl::OFlag;
        Ok(match tty {
            Some((rows, cols)) => {
                let ws = nix::pty::Winsize {
                    ws_row: rows,
                    ws_col: cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                let pty = nix::pty::openpty(Some(&ws), None)?;
                for fd in [&pty.master, &pty.slave] {
                    nix::fcntl::fcntl(
                        fd.as_raw_fd(),
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                    )?;
                }
                Self::Pty {
                    master: pty.master,
                    slave: pty.slave,
                }
            }
            None => {
                let (ir, iw) = if no_input {
                    let null = std::fs::File::open("/dev/null")?;
                    (std::os::fd::OwnedFd::from(null), None)
                } else {
                    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                    (r, Some(w))
                };
                let (or, ow) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                let (er, ew) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                Self::Pipes {
                    input: iw,
                    output: [or, er],
                    theirs: [ir, ow, ew],
                }
            }
        })
    }

    /// The task's ends (copies: ours are closed when the task has started).
    fn theirs(&self) -> std::io::Result<[std::os::fd::OwnedFd; 3]> {
        Ok(match self {
            Self::Pty { slave, .. } => [slave.try_clone()?, slave.try_clone()?, slave.try_clone()?],
            Self::Pipes { theirs, .. } => [
                theirs[0].try_clone()?,
                theirs[1].try_clone()?,
                theirs[2].try_clone()?,
            ],
        })
    }

    /// Our ends, ready for async I/O; the task's are closed here.
    fn started(self, proc: Proc, upper: PathBuf) -> std::io::Result<Started> {
        use tokio::net::unix::pipe;
        match self {
            Self::Pty { master, slave } => {
                drop(slave);
                let w = master.try_clone()?;
                let size = master.try_clone()?;
                let reader = tokio::fs::File::from_std(std::fs::File::from(master));
                let writer = tokio::fs::File::from_std(std::fs::File::from(w));
                Ok(Started {
                    proc,
                    stdin: Some(Box::new(writer)),
                    stdout: Some(Box::new(reader)),
                    stderr: None,
                    winfd: Some(size),
                    upper,
                })
            }
            Self::Pipes {
                input,
                output: [o, e],
                theirs,
            } => {
                drop(theirs);
                let stdin: Option<In> = match input {
                    Some(i) => Some(Box::new(pipe::Sender::from_owned_fd(i)?)),
                    None => None,
                };
                Ok(Started {
                    proc,
                    stdin,
                    stdout: Some(Box::new(pipe::Receiver::from_owned_fd(o)?)),
                    stderr: Some(Box::new(pipe::Receiver::from_owned_fd(e)?)),
                    winfd: None,
                    upper,
                })
            }
        }
    }
}

/// How a task ended: its status, what it used when a warm slot measured
/// it, and the slot to give back.
struct Ended {
    status: std::process::ExitStatus,
    usage: Option<shoal_executor::Usage>,
    slot: Option<(Arc<Pool>, Slot)>,
}

/// A task's process: forked here into a fresh cgroup (with the read end of
/// its supervisor's early report, [`Plan::report_end_to`]), or by a warm
/// slot's spawner.
enum Proc {
    Cold(Box<ColdProc>),
    Warm(WarmProc),
}

/// A task forked here: its supervisor, and the read end of its early
/// report until read.
struct ColdProc {
    child: tokio::process::Child,
    early: Option<tokio::net::unix::pipe::Receiver>,
}

impl Proc {
    /// The pid to signal (the workspace's supervisor), while it runs.
    fn id(&self) -> Option<u32> {
        match self {
            Self::Cold(c) => c.child.id(),
            Self::Warm(w) => (w.wait.is_some() && !w.ended).then_some(w.pid),
        }
    }

    /// Kills the task (and with its supervisor, its whole pid namespace).
    fn start_kill(&mut self) {
        match self {
            Self::Cold(c) => {
                let _ = c.child.start_kill();
            }
            Self::Warm(w) => w.kill(),
        }
    }

    /// After an early report of the end: waits until a supervisor forked
    /// here has exited (its namespaces torn down), or until a warm slot's
    /// spawner has told the end too, and returns the slot to give back.
    async fn reap(&mut self) -> Option<(Arc<Pool>, Slot)> {
        match self {
            Self::Cold(c) => {
                let _ = c.child.wait().await;
                None
            }
            Self::Warm(w) => {
                let h = w.wait.take()?;
                let (slot, _, _) = h.await.ok()?;
                Some((w.pool.clone(), slot))
            }
        }
    }

    /// Waits for the end. Cancel-safe.
    async fn wait(&mut self) -> std::io::Result<Ended> {
        match self {
            Self::Cold(c) => {
                let ColdProc { child, early } = c.as_mut();
                if let Some(r) = early.as_mut() {
                    let raw = read_end(r).await;
                    *early = None;
                    if let Some(raw) = raw {
                        // The supervisor is still exiting: reaped by
                        // `reap` before the task's cgroup and files go.
                        return Ok(Ended {
                            status: std::process::ExitStatus::from_raw(raw),
                            usage: None,
                            slot: None,
                        });
                    }
                }
                Ok(Ended {
                    status: child.wait().await?,
                    usage: None,
                    slot: None,
                })
            }
            Self::Warm(w) => {
                if let Some(r) = w.end.as_mut() {
                    // As for a task forked here: pid 1 tells the end, and
                    // its processes are gone then (the spawner's report,
                    // which the slot's thread waits for, comes later).
                    let raw = read_end(r).await;
                    w.end = None;
                    if let Some(raw) = raw {
                        w.ended = true;
                        return Ok(Ended {
                            status: std::process::ExitStatus::from_raw(raw),
                            usage: Some(w.meter.usage(w.mgr.as_ref())),
                            // (Given back once the spawner has told it too:
                            // see `reap`.)
                            slot: None,
                        });
                    }
                }
                let Some(h) = w.wait.as_mut() else {
                    return Err(std::io::Error::other("waited twice"));
                };
                let r = h.await;
                w.wait = None;
                let (slot, status, usage) = r.map_err(|e| std::io::Error::other(e.to_string()))?;
                Ok(Ended {
                    status,
                    usage: Some(usage),
                    slot: Some((w.pool.clone(), slot)),
                })
            }
        }
    }
}

/// Reads an early report of a task's end (`Plan::report_end_to`, or pid 1
/// of a warm slot's workspace) as a wait status. Written in one write(2) of
/// two bytes: one read gets both (and is cancel-safe); `None` at end of
/// file, when the writer died without reporting.
async fn read_end(r: &mut tokio::net::unix::pipe::Receiver) -> Option<i32> {
    let mut b = [0u8; 2];
    let n = tokio::io::AsyncReadExt::read(r, &mut b).await.unwrap_or(0);
    (n == 2).then(|| workspace::end_status(b)).flatten()
}

/// A task a warm slot started: the pid its spawner gave (the workspace's
/// pid 1, or its supervisor), the read end of its pid 1's report of the
/// end (`Slot::started`), and the wait for the spawner's (a blocking read,
/// which also gets the slot back).
struct WarmProc {
    pid: u32,
    pool: Arc<Pool>,
    mgr: Arc<dyn CgroupManager>,
    meter: shoal_executor::warm::Meter,
    end: Option<tokio::net::unix::pipe::Receiver>,
    /// pid 1 told the end: nothing of the task runs any more.
    ended: bool,
    #[allow(clippy::type_complexity)]
    wait: Option<tokio::task::JoinHandle<(Slot, std::process::ExitStatus, shoal_executor::Usage)>>,
}

impl WarmProc {
    fn new(
        pool: Arc<Pool>,
        mgr: Arc<dyn CgroupManager>,
        mut slot: Slot,
        pid: u32,
        end: std::os::fd::OwnedFd,
    ) -> Self {
        let meter = slot.meter();
        let m = mgr.clone();
        let wait = tokio::task::spawn_blocking(move || {
            let (status, usage) = slot.wait(m.as_ref());
            (slot, status, usage)
        });
        Self {
            pid,
            pool,
            mgr,
            meter,
            // (Without it, the spawner's report alone tells the end.)
            end: tokio::net::unix::pipe::Receiver::from_owned_fd(end).ok(),
            ended: false,
            wait: Some(wait),
        }
    }

    fn kill(&self) {
        // Not yet known to have ended, so the pid is still this task's
        // pid 1 or supervisor (its spawner reaps it only after reporting
        // the end; a kill between the two reaches an exiting process).
        if self.wait.is_some() && !self.ended {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for WarmProc {
    fn drop(&mut self) {
        // Abandoned while running (the link broke): the task dies, and the
        // slot goes back once its spawner has seen it end.
        self.kill();
        if let Some(h) = self.wait.take() {
            let pool = self.pool.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Ok((slot, _, _)) = h.await {
                        // Its tree (if the slot kept it) may have been
                        // changed: unmounted and removed.
                        let _ = tokio::task::spawn_blocking(move || {
                            for k in pool.give_back(slot, false) {
                                let _ = workspace::remove_all(&k.dir);
                            }
                        })
                        .await;
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_cgroup_whose_processes_are_slow_to_die_is_removed_later() {
        use shoal_executor::cgroup::{fake::Recording, Limits};
        let m = Recording::default();
        m.create("task-slow", &Limits::default()).unwrap();
        // Busy three times (its processes still dying), then gone.
        m.refuse_removes(3);
        assert!(m.remove("task-slow").is_err());
        let every = Duration::from_millis(1);
        assert!(remove_later(&m, "task-slow", every, 5).is_ok());
        assert!(!m.exists("task-slow"));
        // One that never empties: the last error, after every try.
        m.create("task-stuck", &Limits::default()).unwrap();
        m.refuse_removes(100);
        assert!(remove_later(&m, "task-stuck", every, 5).is_err());
        assert!(m.exists("task-stuck"));
    }

    #[test]
    fn a_small_spool_stays_in_memory_and_a_large_one_goes_whole_to_its_file() {
        let d = crate::test_dir("spool-spill");
        let det = Detached::new(&d);
        let mut sp = det.register("t1");
        sp.write(true, b"hello ");
        sp.write(false, b"oops\n");
        sp.write(true, b"world\n");
        assert!(!sp.on_disk());
        assert!(!d.join("t1.stdout").exists(), "no file for a small spool");
        let big: Vec<u8> = (0..SPOOL_IN_MEMORY + 1000)
            .map(|i| (i % 251) as u8)
            .collect();
        sp.write(true, &big);
        assert!(sp.on_disk());
        let Spool { out, err, .. } = sp;
        let (out, err) = (out.kept().unwrap(), err.kept().unwrap());
        let mut all = b"hello world\n".to_vec();
        all.extend_from_slice(&big);
        assert_eq!(
            out.read_from(0).unwrap(),
            all,
            "memory then the rest, in order"
        );
        assert_eq!(out.read_from(6).unwrap(), all[6..]);
        assert_eq!(std::fs::read(d.join("t1.stdout")).unwrap(), all);
        assert_eq!(err.read_from(0).unwrap(), b"oops\n");
        assert_eq!(err.read_from(4).unwrap(), b"\n");
        assert!(
            err.read_from(99).unwrap().is_empty(),
            "past its end: nothing"
        );
        let k = Kept {
            stdout: out,
            stderr: err,
            upper: None,
            end: Vec::new(),
        };
        assert!(k.on_disk());
        det.forget("t1", k.on_disk());
        assert!(!d.join("t1.stdout").exists(), "forgotten with its file");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_spool_that_cannot_reach_its_disk_is_not_kept() {
        let d = crate::test_dir("spool-broken");
        let det = Detached::new(&d.join("gone"));
        std::fs::remove_dir_all(d.join("gone")).unwrap();
        let mut sp = det.register("t2");
        sp.write(false, &vec![7u8; SPOOL_IN_MEMORY]);
        assert!(!sp.on_disk(), "still in memory: nothing written yet");
        sp.write(false, b"x");
        assert!(sp.on_disk());
        let Spool { out, err, .. } = sp;
        assert!(out.kept().is_some());
        assert!(err.kept().is_none(), "a spill that failed loses the result");
        let _ = std::fs::remove_dir_all(&d);
    }
}
