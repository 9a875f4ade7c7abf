//! Warm slots: a task cgroup with a spawner process already inside it.
//!
//! Moving a process into a cgroup v1 (a write to `cgroup.procs`) waits for
//! an RCU grace period: 10 to 30 ms on an idle machine (measured here with
//! `strace -T`), most of a short task's start. A child, though, is born in
//! its parent's cgroup at no such cost. So a warm slot pays the move once,
//! ahead of time: a spawner (`shoal` run again, [`serve`]) moves into the
//! slot's cgroup when the slot is made, and forks every task of that slot
//! from there. A slot serves one task at a time and many in turn: when a
//! task has ended its counters are restarted ([`CgroupManager::restart`]),
//! and before the next its limits are set ([`CgroupManager::reuse`]).
//!
//! ```text
//!  agent ── Request + stdin/stdout/stderr + end pipe (SCM_RIGHTS) ──▶ spawner (in cgroup warm-N)
//!        ◀── Started{pid} | Failed{errno} ──                 └─fork─▶ workspace (crate::workspace)
//!        ◀═══ end pipe: the wait status, from pid 1 itself (a workspace made ahead)
//!        ◀── Exited{wait status} ──  (the workspace's processes are gone)
//!        ◀── Gone ──                 (and its namespaces and mounts too)
//! ```
//!
//! `Exited` comes as soon as the spawner knows how the command ended (from
//! the supervisor, [`Plan::report_end_to`], or pid 1): the task's files
//! are final then, and the namespaces' teardown (the overlay's unmount
//! syncs the upper layer, about a millisecond) is off the task's path.
//! pid 1 of a workspace made ahead tells the end on the agent's end pipe
//! before that (no supervisor, spawner or agent thread between). The slot
//! serves again after `Gone`.
//!
//! Before `Ready`, and when the pool takes a slot back (`MakeSpare`, while
//! the slot waits for its next task), the spawner makes the next task's
//! workspace ahead (`Prefork`): it clones pid 1 into new namespaces (no
//! supervisor between), which mounts `/proc` and `/tmp`, pivots into the
//! slot's root and waits.
//! A request for the slot's own root and network goes to that pid 1, which
//! mounts the tree, finishes the root and identity, and starts the command
//! as pid 2; any other request (`--net host`) gets its workspace made for it
//! as before, and the spare is dropped. `Ready` and `Spare` name the spare's
//! process, the only other the pool accepts in an idle slot's cgroup.
//!
//! The spawner dies with the thread that made it (`PR_SET_PDEATHSIG`) and
//! when its socket closes; its task dies with it. Where the counters cannot
//! be restarted (cgroup v2) there are no warm slots: every task gets a
//! fresh cgroup.

use std::ffi::{CString, OsString};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};

use crate::cgroup::{spawn_into, CgroupError, CgroupManager, Limits, Usage};
use crate::workspace::{Net, Plan, Root, Spec};

/// Why a warm slot could not be made or used. The caller falls back to a
/// fresh cgroup, except for [`WarmError::Task`].
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// Talking to the spawner failed (it died, or took too long).
    #[error("warm slot {slot}: {source}")]
    Link {
        /// The slot.
        slot: String,
        /// The OS error.
        source: io::Error,
    },
    /// The request does not fit in one message.
    #[error("the task's request is too large for a warm slot")]
    TooLarge,
    /// The spawner said something that is not a reply.
    #[error("warm slot {0}: malformed reply from the spawner")]
    Malformed(String),
    /// The spawner could not make the slot ready (its root).
    #[error("warm slot {slot}: {message}")]
    Spawner {
        /// The slot.
        slot: String,
        /// What the spawner said.
        message: String,
    },
    /// The slot's cgroup could not be made, set or restarted.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The task itself could not be started (its workspace, or the
    /// command's exec): not the slot's fault.
    #[error("{message}")]
    Task {
        /// The OS error number, when there is one (ENOENT: no such
        /// command).
        errno: Option<i32>,
        /// What failed.
        message: String,
    },
}

/// What the agent asks a spawner to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The workspace.
    pub spec: Spec,
    /// The command and its arguments.
    pub argv: Vec<Vec<u8>>,
    /// The command's whole environment.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Request {
    /// The command with exactly this environment and these descriptors
    /// as its stdin, stdout and stderr (`None`: an empty argv). The
    /// workspace is for the caller to apply.
    pub fn command(self, stdio: [OwnedFd; 3]) -> Option<Command> {
        let mut argv = self.argv.into_iter().map(OsString::from_vec);
        let mut cmd = Command::new(argv.next()?);
        let [i, o, e] = stdio;
        cmd.args(argv)
            .env_clear()
            .envs(
                self.env
                    .into_iter()
                    .map(|(k, v)| (OsString::from_vec(k), OsString::from_vec(v))),
            )
            .stdin(Stdio::from(i))
            .stdout(Stdio::from(o))
            .stderr(Stdio::from(e));
        Some(cmd)
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    /// The slot is ready; `spare` as in `Spare`.
    Ready {
        spare: Vec<u32>,
    },
    Started {
        pid: u32,
    },
    Failed {
        errno: Option<i32>,
        message: String,
    },
    Exited {
        status: i32,
    },
    /// After `Exited`: the workspace is gone (its supervisor or pid 1
    /// reaped, its namespaces and mounts torn down); the slot may serve
    /// again.
    Gone,
    /// Answer to `MakeSpare`: the processes of the next task's workspace,
    /// made ahead (`Prefork`; none when it could not be).
    Spare {
        spare: Vec<u32>,
    },
    /// First answer to a `MakeSpare` with `confirm`: the trees it was to
    /// drop are unmounted (their directories may be emptied or reused).
    Dropped,
}

/// What the agent sends a spawner.
#[derive(Debug, Deserialize)]
enum ToSpawner {
    /// Start this task.
    Task(Box<Request>),
    /// Make the next task's workspace ahead (sent when the slot is back in
    /// the pool, so that the time it takes keeps no task waiting). First
    /// unmount the trees no longer kept, and the kept one too unless
    /// `keep_tree` (its last task changed it); with `confirm`, say so
    /// (`Dropped`) before making the workspace.
    MakeSpare { keep_tree: bool, confirm: bool },
}

/// [`ToSpawner`] as the agent writes it (the same encoding, borrowed).
#[derive(Debug, Serialize)]
enum ToSpawnerRef<'a> {
    Task(&'a Request),
    MakeSpare { keep_tree: bool, confirm: bool },
}

/// The tree a spawner keeps mounted in its own mount namespace between
/// the slot's tasks, while they leave it unchanged: each task attaches a
/// copy ([`crate::workspace::clone_tree`]) instead of mounting an overlay
/// of its own. The mount, made once, is what costs: the overlay makes and
/// removes test files in its work directory (inode allocations, slow on a
/// busy disk) and syncs the upper file system when it goes.
#[derive(Debug)]
struct KeptMount {
    /// Its layers, upper and work directories.
    key: (Vec<PathBuf>, PathBuf, PathBuf),
    /// Where it is mounted (`mnt` beside its work directory).
    at: PathBuf,
}

/// The trees a spawner has mounted: the one it keeps, and those it no
/// longer does but has not unmounted yet. Unmounting the last mount of an
/// overlay tears it down and syncs its upper file system: that waits until
/// the slot is back in the pool (`MakeSpare`), off every task's path.
#[derive(Debug, Default)]
struct Trees {
    kept: Option<KeptMount>,
    stale: Vec<KeptMount>,
}

impl Trees {
    /// The kept tree for `t`, mounted now if another (or none) is kept;
    /// returns a detached copy of it for the task's namespace.
    fn copy_for(&mut self, t: &crate::workspace::Tree) -> io::Result<OwnedFd> {
        let key = (t.lower.clone(), t.upper.clone(), t.work.clone());
        if self.kept.as_ref().map(|k| &k.key) != Some(&key) {
            self.retire();
            let at = t.work.with_file_name("mnt");
            std::fs::create_dir_all(&at)?;
            crate::workspace::mount_tree(t, &at)?;
            self.kept = Some(KeptMount { key, at });
        }
        match &self.kept {
            Some(k) => crate::workspace::clone_tree(&k.at),
            None => Err(io::Error::other("no tree kept")),
        }
    }

    /// The kept tree is no longer kept (unmounted later, by `drop_stale`).
    fn retire(&mut self) {
        self.stale.extend(self.kept.take());
    }

    /// Unmounts the kept tree now: a task is to mount an overlay of its
    /// own on its directories.
    fn drop_kept(&mut self) {
        if let Some(k) = self.kept.take() {
            let _ = nix::mount::umount2(&k.at, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Unmounts the trees no longer kept.
    fn drop_stale(&mut self) {
        for k in self.stale.drain(..) {
            let _ = nix::mount::umount2(&k.at, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Signals a spawner ignores (its tasks do not).
const SPARED: [nix::sys::signal::Signal; 3] = [
    nix::sys::signal::Signal::SIGTERM,
    nix::sys::signal::Signal::SIGINT,
    nix::sys::signal::Signal::SIGHUP,
];

/// Gives the signals a spawner ignores ([`SPARED`]), and `also`, their
/// default dispositions back (in its children: a workspace's processes).
/// Async-signal-safe.
fn default_dispositions(also: &[nix::sys::signal::Signal]) -> nix::Result<()> {
    for &sig in SPARED.iter().chain(also) {
        // SAFETY: restoring a default disposition installs no handler and
        // touches nothing shared.
        #[allow(unsafe_code)]
        unsafe {
            nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl)?;
        }
    }
    Ok(())
}

/// The largest request a spawner reads (the kernel's default socket
/// buffer caps a message at about 200 KiB anyway).
const MAX_REQUEST: usize = 256 * 1024;

fn send(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message and the descriptors that came with it. `Ok(None)`:
/// the other end closed.
fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    recv_flags(fd, buf, MsgFlags::empty())
}

/// [`recv`] with these flags too (`MSG_DONTWAIT`: `WouldBlock` when no
/// message is there).
fn recv_flags(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    // At most five: a task's stdin, stdout, stderr, its end pipe, and its
    // tree (to pid 1). More is an error (`MSG_CTRUNC`), not a loss.
    let mut space = nix::cmsg_space!([i32; 5]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC | flags,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for f in raw {
                // SAFETY: the kernel has just installed this descriptor in
                // our table for this message; nothing else owns it.
                #[allow(unsafe_code)]
                fds.push(unsafe { OwnedFd::from_raw_fd(f) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message larger than the buffer",
        ));
    }
    if msg.bytes == 0 {
        return Ok(None);
    }
    Ok(Some((msg.bytes, fds)))
}

fn reply(fd: BorrowedFd<'_>, r: &Reply) -> io::Result<()> {
    let bytes = postcard::to_stdvec(r).map_err(io::Error::other)?;
    send(fd, &bytes, &[])
}

/// The spawner's life, in a fresh process whose stdin is its socket to
/// the agent: says it is ready, then starts one task per request and
/// reports its end, until the agent closes the socket.
///
/// # Errors
/// The socket failed.
pub fn serve(sock: BorrowedFd<'_>, root: Option<&Path>) -> io::Result<()> {
    // Every task's pid 1 (and supervisor, if it has one) is forked from
    // here, and copies whatever heap page it writes. With glibc's fast
    // bins, a child's first larger allocation walks and merges every small
    // chunk this process freed (`malloc_consolidate`), writing to pages
    // all over the heap. Without them, a child writes only the chunks it uses (with
    // pid 2's stack made once, below: about a third fewer page faults in
    // a task's processes, BENCHMARKS.md, session 10).
    // SAFETY: `mallopt` only sets the allocator's parameters (merging the
    // fast bins it had); no other thread runs in this process.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0);
    }
    SPAWN_STACK_MEM
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .resize(SPAWN_STACK, 0);
    // Die with the agent's thread that made us, and stay out of its
    // terminal's process group (a Ctrl-C to the agent is not for us).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    let _ = nix::unistd::setsid();
    // The owner's policy ends a task by SIGTERM to every process of its
    // cgroup, this one included: it is not for us. (Reset to the default
    // in every task, see `start`.)
    for sig in SPARED {
        // SAFETY: setting a disposition to SIG_IGN installs no handler; no
        // other thread runs in this process.
        #[allow(unsafe_code)]
        unsafe {
            nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn)?;
        }
    }
    // One network namespace with only loopback, up, for every task of the
    // slot that asks for none (made once: making and tearing one down per
    // task costs about 1.5 ms); the host's is kept for `--net host`.
    let host_net = std::fs::File::open("/proc/self/ns/net")?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
    crate::workspace::loopback_up()?;
    // The system part of every task's root, assembled once in a mount
    // namespace of our own: a task then mounts only /proc, /tmp and its
    // tree (and its exit unmounts only those).
    let base = match root {
        Some(r) => match crate::workspace::assemble_base(r) {
            Ok(()) => Some(r.to_owned()),
            Err(e) => {
                let m = format!("assembling the slot's root at {}: {e}", r.display());
                reply(
                    sock,
                    &Reply::Failed {
                        errno: None,
                        message: m.clone(),
                    },
                )?;
                return Err(io::Error::other(m));
            }
        },
        None => None,
    };
    // The next task's workspace, made ahead when it can be.
    let mut spare = base.as_deref().and_then(|b| Prefork::make(b).ok());
    let mut trees = Trees::default();
    let pids = spare.as_ref().map_or_else(Vec::new, Prefork::pids);
    reply(sock, &Reply::Ready { spare: pids })?;
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let Some((n, fds)) = recv(sock, &mut buf)? else {
            return Ok(());
        };
        let r = match postcard::from_bytes::<ToSpawner>(&buf[..n]) {
            Ok(ToSpawner::MakeSpare { keep_tree, confirm }) => {
                if !keep_tree {
                    trees.retire();
                }
                trees.drop_stale();
                if confirm {
                    reply(sock, &Reply::Dropped)?;
                }
                if spare.is_none() {
                    spare = base.as_deref().and_then(|b| Prefork::make(b).ok());
                }
                let pids = spare.as_ref().map_or_else(Vec::new, Prefork::pids);
                reply(sock, &Reply::Spare { spare: pids })?;
                continue;
            }
            Ok(ToSpawner::Task(req)) => start(
                *req,
                fds,
                host_net.as_fd(),
                base.as_deref(),
                &mut spare,
                &mut trees,
            ),
            Err(e) => (
                Err(Reply::Failed {
                    errno: None,
                    message: format!("malformed request: {e}"),
                }),
                Vec::new(),
                None,
            ),
        };
        // The mount points of its tree, made on the shared root: the next
        // task of the slot sees nothing of this one. (What they lead into
        // on the host is bound read-only, so only the root's own
        // directories can go.)
        let forget = |made: &[PathBuf]| {
            for d in made.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        };
        match r {
            (Ok((mut child, early)), made, end) => {
                reply(sock, &Reply::Started { pid: child.id() })?;
                // How it ended, as soon as the supervisor knows; then its
                // exit (the namespaces' teardown) is waited for.
                let told = read_end(early.as_fd());
                drop(early);
                if let Some(status) = told {
                    if let Some(e) = &end {
                        // (A workspace made ahead tells the agent itself.)
                        tell_end(e.as_fd(), status);
                    }
                    reply(sock, &Reply::Exited { status })?;
                }
                drop(end);
                let status = loop {
                    match child.wait() {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        r => break r?,
                    }
                };
                forget(&made);
                if told.is_none() {
                    reply(
                        sock,
                        &Reply::Exited {
                            status: status.into_raw(),
                        },
                    )?;
                }
                reply(sock, &Reply::Gone)?;
            }
            (Err(f), made, _) => {
                forget(&made);
                reply(sock, &f)?;
            }
        }
    }
}

/// The workspace of a slot's next task, made before the task is known:
/// its pid 1, cloned straight into new mount, pid, uts and ipc namespaces
/// (`/proc` and `/tmp` mounted on the slot's root), waiting for the
/// request. About half a millisecond of a clone and mounts off the task's
/// path.
///
/// No supervisor stands between it and the spawner: pid 1 forwards the
/// signals sent to it (as a namespace's init, it gets only those it
/// handles, and SIGKILL) and writes the command's end to a pipe the
/// spawner reads. A process of the agent's namespace in between (as a
/// task made for its request has, [`start_in`]) cost each task a fork, its
/// page faults and its exit.
#[derive(Debug)]
struct Prefork {
    /// Its pid 1, as this namespace sees it.
    init: nix::unistd::Pid,
    /// To pid 1: the request and its descriptors; back: `Started` or
    /// `Failed`.
    link: OwnedFd,
    /// pid 1's report of the end.
    early: OwnedFd,
}

impl Prefork {
    /// Makes one on the slot's root `base`.
    fn make(base: &Path) -> io::Result<Self> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let (early_r, early_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let flags = crate::workspace::TASK_NAMESPACES.bits() | libc::SIGCHLD;
        // SAFETY: clone(2) without CLONE_VM and without a stack of its
        // own is fork(2) into new namespaces: the child runs on a copy of
        // this process's memory. The spawner runs no other thread, so no
        // lock is held; the child only makes system calls until it has its
        // request, then allocates (as a fork of a single-threaded process
        // may). glibc's record of the thread's id is the parent's in the
        // child: nothing pid 1 calls reads it (`raise` asks the kernel).
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone,
                flags as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        match r {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                drop((ours, early_r));
                init_ahead(base, theirs, early_w)
            }
            pid => Ok(Self {
                init: nix::unistd::Pid::from_raw(pid as i32),
                link: ours,
                early: early_r,
            }),
        }
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.init.as_raw() as u32]
    }

    /// Kills it (with its namespace) and reaps it.
    fn discard(self) {
        let _ = nix::sys::signal::kill(self.init, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.init, None);
    }
}

/// pid 1 of a workspace made ahead: mounts `/proc` and `/tmp`, waits for
/// the request, finishes the workspace, starts the command as pid 2, says
/// whether it started, and supervises it.
fn init_ahead(base: &Path, link: OwnedFd, status_w: OwnedFd) -> ! {
    use crate::workspace::{exit_now, supervise, Report};
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    // The spawner's own dispositions (it ignores the owner's SIGTERM) are
    // not pid 1's: it forwards what it handles, once the command runs.
    let _ = default_dispositions(&[]);
    crate::workspace::forward_signals();
    let ready = crate::workspace::prepare_on_base(base);
    let mut buf = vec![0u8; MAX_REQUEST];
    let Ok(Some((n, fds))) = recv(link.as_fd(), &mut buf) else {
        exit_now(0);
    };
    let fail = |errno: Option<i32>, message: String| -> ! {
        let _ = reply(link.as_fd(), &Reply::Failed { errno, message });
        exit_now(125)
    };
    if let Err(e) = ready {
        fail(e.raw_os_error(), format!("workspace: {e}"));
    }
    let Ok(req) = postcard::from_bytes::<Request>(&buf[..n]) else {
        fail(None, "malformed request".into());
    };
    // stdin, stdout, stderr, the agent's end of the task (see
    // `Slot::send`), and a fifth: the task's tree, mounted already by the
    // spawner.
    let mut fds = fds;
    let tree = if fds.len() == 5 { fds.pop() } else { None };
    let Ok([stdin, stdout, stderr, end]) = <[OwnedFd; 4]>::try_from(fds) else {
        fail(None, "a request without its four descriptors".into());
    };
    let plan = match Plan::on_base(&req.spec, base) {
        Ok(p) => p,
        Err(e) => fail(None, format!("workspace: {e}")),
    };
    if let Err(e) = plan.finish_prepared(tree.as_ref().map(AsFd::as_fd)) {
        fail(e.raw_os_error(), format!("workspace: {e}"));
    }
    let argv: Vec<CString> = req
        .argv
        .iter()
        .filter_map(|a| CString::new(a.clone()).ok())
        .collect();
    let envp: Vec<CString> = req
        .env
        .iter()
        .filter_map(|(k, v)| CString::new([k.as_slice(), b"=", v.as_slice()].concat()).ok())
        .collect();
    if argv.len() != req.argv.len() || argv.is_empty() {
        fail(None, "a command with a NUL byte, or none".into());
    }
    let path = req.env.iter().find(|(k, _)| k == b"PATH").map_or_else(
        || b"/usr/local/bin:/usr/bin:/bin".to_vec(),
        |(_, v)| v.clone(),
    );
    match spawn_command(
        &argv,
        &envp,
        &path,
        [&stdin, &stdout, &stderr],
        req.spec.tty,
        req.spec.idle,
    ) {
        Ok(child) => {
            drop((stdin, stdout, stderr));
            // Signals for the task go to its process group from now on
            // (the agent learns where to send them from this reply).
            crate::workspace::forward_to(-child.as_raw());
            let _ = reply(link.as_fd(), &Reply::Started { pid: 0 });
            drop(link);
            // The end is told to the agent directly too: no supervisor,
            // spawner or thread of the agent's between.
            supervise(
                child,
                true,
                Report::Write(status_w.as_raw_fd()),
                Some(end.as_raw_fd()),
            )
        }
        Err(errno) => {
            let m = std::io::Error::from_raw_os_error(errno);
            fail(Some(errno), format!("starting the command: {m}"))
        }
    }
}

/// The stack of pid 2 until its exec: it makes only system calls.
const SPAWN_STACK: usize = 64 * 1024;

/// That stack, made (and written) once in the spawner: each task's pid 1,
/// a fork of it, shares its pages and copies only the one or two pid 2
/// writes, where a stack of its own was 64 KiB zeroed, sixteen page faults,
/// per task. Only ever locked in a process with no other thread.
static SPAWN_STACK_MEM: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Starts pid 2 as the command, as `posix_spawn` does: a child that shares
/// this process's memory until it execs (`CLONE_VM | CLONE_VFORK`), so no
/// page table is copied for it and none torn down at its exec; this
/// process waits, suspended, meanwhile. Everything the child uses is made
/// here first (it allocates nothing). Returns the child, or the errno it
/// could not start with (reaped).
fn spawn_command(
    argv: &[CString],
    envp: &[CString],
    path: &[u8],
    stdio: [&OwnedFd; 3],
    tty: bool,
    idle: bool,
) -> Result<nix::unistd::Pid, i32> {
    use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
    use std::os::raw::c_char;
    let name = argv.first().map_or(&[][..], |a| a.as_bytes());
    let by_path = !name.contains(&b'/');
    // As a shell searches: each directory of PATH in turn ("" is ".").
    let candidates: Vec<CString> = if by_path {
        path.split(|&b| b == b':')
            .filter_map(|dir| {
                let dir = if dir.is_empty() { b".".as_slice() } else { dir };
                CString::new([dir, b"/", name].concat()).ok()
            })
            .collect()
    } else {
        argv.first().cloned().into_iter().collect()
    };
    let nul = std::ptr::null::<c_char>();
    let cands: Vec<*const c_char> = candidates.iter().map(|c| c.as_ptr()).collect();
    let argv_p: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).chain([nul]).collect();
    let envp_p: Vec<*const c_char> = envp.iter().map(|e| e.as_ptr()).chain([nul]).collect();
    let fds = stdio.map(AsRawFd::as_raw_fd);
    // Written by the child when it cannot exec, read once it is gone.
    let mut failed: i32 = 0;
    let failed_at = std::ptr::addr_of_mut!(failed);
    let mut kept = SPAWN_STACK_MEM.lock().unwrap_or_else(|e| e.into_inner());
    let mut own = Vec::new();
    let stack: &mut [u8] = if kept.len() >= SPAWN_STACK {
        &mut kept[..]
    } else {
        own.resize(SPAWN_STACK, 0);
        &mut own
    };
    let child = move || -> isize {
        // SAFETY: runs in the child, on its own stack, while this process
        // is suspended (CLONE_VFORK): only async-signal-safe calls, on
        // descriptors and strings made before the clone and alive until
        // it returns; `failed_at` points at a local of the suspended
        // parent's frame.
        #[allow(unsafe_code)]
        unsafe {
            let give_up = |e: i32| -> ! {
                *failed_at = e;
                libc::_exit(127)
            };
            let errno = || *libc::__errno_location();
            for (i, fd) in fds.iter().enumerate() {
                if libc::dup2(*fd, i as libc::c_int) < 0 {
                    give_up(errno());
                }
            }
            if tty {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    give_up(errno());
                }
            } else if libc::setpgid(0, 0) != 0 {
                give_up(errno());
            }
            // A guest's command (and all it starts) at the idle class; its
            // workspace's set-up and teardown, the agent's own work, not.
            if idle {
                if let Err(e) = crate::workspace::idle_class() {
                    give_up(e.raw_os_error().unwrap_or(libc::EPERM));
                }
            }
            // What the spawner ignores, and what Rust's runtime ignores, is
            // the command's to decide (ignored signals survive exec). The
            // child has a handler table of its own (no CLONE_SIGHAND).
            let _ = default_dispositions(&[nix::sys::signal::Signal::SIGPIPE]);
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // The first that runs; else the most telling failure
            // (permission denied over not found).
            let mut last = libc::ENOENT;
            for c in &cands {
                libc::execve(*c, argv_p.as_ptr(), envp_p.as_ptr());
                match errno() {
                    e if !by_path => last = e,
                    libc::EACCES => last = libc::EACCES,
                    libc::ENOENT | libc::ENOTDIR => {}
                    e => last = e,
                }
            }
            give_up(last)
        }
    };
    // No handler of ours may run in the child while it shares our memory.
    let mut old = SigSet::empty();
    sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )
    .map_err(|e| e as i32)?;
    // SAFETY: the child runs `child` above on `stack` (64 KiB for a few
    // system calls) and then execs or exits; CLONE_VFORK keeps this
    // process, and so every buffer the child reads, suspended until then.
    #[allow(unsafe_code)]
    let pid = unsafe {
        nix::sched::clone(
            Box::new(child),
            stack,
            nix::sched::CloneFlags::CLONE_VM | nix::sched::CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    let pid = pid.map_err(|e| e as i32)?;
    // SAFETY: `failed` is a plain local; the child that may have written
    // it has exec'd or exited (CLONE_VFORK).
    #[allow(unsafe_code)]
    let e = unsafe { std::ptr::read_volatile(failed_at) };
    if e != 0 {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(e);
    }
    Ok(pid)
}

/// Reads a supervisor's early report (see [`Plan::report_end_to`]) as a
/// wait status; `None` when it ended without one (killed).
fn read_end(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut buf = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
    crate::workspace::end_status(buf)
}

/// Tells a task's end (a wait status) on `fd` as a supervisor's early
/// report does: two bytes in one write.
fn tell_end(fd: BorrowedFd<'_>, status: i32) {
    let st = ExitStatus::from_raw(status);
    let b = match (st.code(), st.signal()) {
        (Some(c), _) => [0, c as u8],
        (None, Some(s)) => [1, s as u8],
        _ => return,
    };
    let _ = nix::unistd::write(fd, &b);
}

/// A started task: the spawner's child in its workspace and the read end
/// of its early report.
type Spawned = (Supervisor, OwnedFd);

/// The spawner's child in a task's workspace.
enum Supervisor {
    /// The supervisor forked for the request.
    Spawned(std::process::Child),
    /// pid 1 of a workspace made ahead of it ([`Prefork`]).
    Ahead(nix::unistd::Pid),
}

impl Supervisor {
    fn id(&self) -> u32 {
        match self {
            Self::Spawned(c) => c.id(),
            Self::Ahead(p) => p.as_raw() as u32,
        }
    }

    fn wait(&mut self) -> io::Result<ExitStatus> {
        use nix::sys::wait::WaitStatus;
        match self {
            Self::Spawned(c) => c.wait(),
            Self::Ahead(p) => loop {
                match nix::sys::wait::waitpid(*p, None) {
                    Ok(WaitStatus::Exited(_, code)) => break Ok(ExitStatus::from_raw(code << 8)),
                    Ok(WaitStatus::Signaled(_, sig, core)) => {
                        break Ok(ExitStatus::from_raw(
                            sig as i32 | if core { 0x80 } else { 0 },
                        ))
                    }
                    Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
                    Err(e) => break Err(e.into()),
                }
            },
        }
    }
}

/// Starts one task; returns it (or why not) with the directories its
/// workspace makes on the slot's shared root, to remove once it ended, and
/// the agent's end pipe when the spawner is to tell the end on it (pid 1
/// of a workspace made ahead tells it itself).
fn start(
    req: Request,
    fds: Vec<OwnedFd>,
    host_net: BorrowedFd<'_>,
    base: Option<&Path>,
    spare: &mut Option<Prefork>,
    trees: &mut Trees,
) -> (Result<Spawned, Reply>, Vec<PathBuf>, Option<OwnedFd>) {
    let mut fds = fds;
    // stdin, stdout, stderr and the agent's end pipe.
    let end = if fds.len() == 4 { fds.pop() } else { None };
    let Some(end) = end.filter(|_| fds.len() == 3) else {
        let f = Reply::Failed {
            errno: None,
            message: "a request without its four descriptors".into(),
        };
        return (Err(f), Vec::new(), None);
    };
    let made = match (&req.spec.tree, base, &req.spec.root) {
        // Those the root lacks now (its own mount points stay).
        (Some(t), Some(b), Root::Host) => crate::workspace::tree_dirs(b, &t.at)
            .unwrap_or_default()
            .into_iter()
            .filter(|d| std::fs::symlink_metadata(d).is_err())
            .collect(),
        _ => Vec::new(),
    };
    // A workspace made ahead serves a task on the slot's own root and
    // network; any other is made for it (and the spare is not kept: its
    // processes would count against the task's pids).
    let ahead = base.is_some() && req.spec.root == Root::Host && req.spec.net != Net::Host;
    match spare.take() {
        Some(p) if ahead => {
            // (The network is the slot's own, as the spawner's tasks have.)
            let mut req = req;
            req.spec.net = Net::Inherit;
            // Its tree as the kept mount's copy.
            let tree = match &req.spec.tree {
                Some(t) => match trees.copy_for(t) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        // (Never two overlays on one upper directory.)
                        trees.drop_kept();
                        tracing::debug!(error = %e, "no kept tree");
                        // pid 1 of a workspace made ahead is in the slot's
                        // root already, where the layers' host paths are
                        // not: this task gets a workspace made for it.
                        p.discard();
                        return (start_in(req, fds, host_net, base), made, Some(end));
                    }
                },
                None => None,
            };
            // The end pipe goes to pid 1, which tells the end on it; then
            // the tree.
            fds.push(end);
            fds.extend(tree);
            (start_ahead(p, &req, &fds), made, None)
        }
        other => {
            if let Some(p) = other {
                p.discard();
            }
            // The task mounts its tree itself (in directories of its own:
            // the agent never gives it the kept tree's). The kept one is
            // kept no longer: unmounted when the slot is back.
            trees.retire();
            (start_in(req, fds, host_net, base), made, Some(end))
        }
    }
}

/// Hands a request to a workspace made ahead.
fn start_ahead(p: Prefork, req: &Request, fds: &[OwnedFd]) -> Result<Spawned, Reply> {
    let fail = |errno: Option<i32>, message: String| Reply::Failed { errno, message };
    let bytes = postcard::to_stdvec(req).map_err(|e| fail(None, e.to_string()))?;
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let sent = send(p.link.as_fd(), &bytes, &borrowed);
    let mut buf = [0u8; 4096];
    let answer = sent.and_then(|()| recv(p.link.as_fd(), &mut buf));
    let r = match answer {
        Ok(Some((n, _))) => postcard::from_bytes::<Reply>(&buf[..n]).ok(),
        _ => None,
    };
    match r {
        Some(Reply::Started { .. }) => Ok((Supervisor::Ahead(p.init), p.early)),
        Some(f @ Reply::Failed { .. }) => {
            p.discard();
            Err(f)
        }
        _ => {
            p.discard();
            Err(fail(None, "the workspace made ahead failed".into()))
        }
    }
}

fn start_in(
    mut req: Request,
    fds: Vec<OwnedFd>,
    host_net: BorrowedFd<'_>,
    base: Option<&Path>,
) -> Result<Spawned, Reply> {
    let fail = |errno: Option<i32>, message: String| Reply::Failed { errno, message };
    let [stdin, stdout, stderr]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| fail(None, "a request without its three descriptors".into()))?;
    let host = req.spec.net == Net::Host;
    req.spec.net = Net::Inherit;
    let plan = match base {
        Some(b) => Plan::on_base(&req.spec, b),
        None => Plan::new(&req.spec),
    }
    .map_err(|e| fail(None, format!("workspace: {e}")))?;
    let Some(mut cmd) = req.command([stdin, stdout, stderr]) else {
        return Err(fail(None, "an empty command".into()));
    };
    // SAFETY: runs in the forked child before exec (and before the
    // workspace's own hook): resetting dispositions is async-signal-safe
    // and touches nothing shared.
    #[allow(unsafe_code)]
    unsafe {
        let host_net = host_net.as_raw_fd();
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            default_dispositions(&[])?;
            if host {
                // SAFETY: the descriptor is the spawner's open
                // /proc/self/ns/net, alive for its whole life.
                let fd = BorrowedFd::borrow_raw(host_net);
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            }
            Ok(())
        });
    }
    let (early_r, early_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| fail(Some(e as i32), format!("a pipe: {e}")))?;
    plan.report_end_to(early_w.as_fd()).apply(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(|e| fail(e.raw_os_error(), format!("starting the command: {e}")))?;
    // Ours closed: the report ends (EOF) when the supervisor does.
    drop(early_w);
    Ok((Supervisor::Spawned(child), early_r))
}

/// One warm slot: its cgroup and the spawner inside it.
#[derive(Debug)]
pub struct Slot {
    name: String,
    /// Where its spawner assembled the slot's root, if it did.
    root: Option<PathBuf>,
    sock: OwnedFd,
    spawner: std::process::Child,
    oom_base: u64,
    /// Its usage counters held open (cgroup v1), when they could be.
    counters: Option<Arc<crate::cgroup::Counters>>,
    /// Its counters were restarted (and `oom_base` read) since its last
    /// task: done when it came back, off the next task's path.
    restarted: bool,
    /// The limits its cgroup has now, when known (unknown after a failed
    /// reuse): those unchanged are not written again.
    applied: Option<Limits>,
    /// Its last task's end was reported and its workspace's teardown
    /// (`Gone`) is still to come.
    tearing_down: bool,
    /// The processes of the workspace its spawner made ahead for the next
    /// task (in its cgroup beside the spawner).
    spare: Vec<u32>,
    /// A `MakeSpare` was sent and its answer is still to be read.
    spare_asked: bool,
    /// The tree its spawner keeps mounted between tasks, as the agent
    /// knows it (the spawner may have unmounted it since, never kept
    /// another).
    kept_tree: Option<KeptTree>,
    /// Trees kept before a request replaced them: their spawner unmounts
    /// them when the slot comes back (`give_back` returns them then).
    released: Vec<KeptTree>,
}

/// A request [`Slot::send`] sent, whose answer [`Slot::started`] reads:
/// the read end of the task's end pipe.
#[derive(Debug)]
pub struct Sent {
    end: OwnedFd,
}

/// What the agent keeps with a slot whose spawner keeps a task's tree
/// mounted for the next task with the same tree (given with the request,
/// [`Slot::send`]): the directory of its upper and work directories, what
/// identifies the tree, and whatever must live as long as the mount (its
/// lower layers, held).
pub struct KeptTree {
    /// The task directory (`upper`, `work` and the spawner's `mnt`).
    pub dir: PathBuf,
    /// What a task's tree must match to use it.
    pub key: Vec<PathBuf>,
    /// Held until the tree is unmounted.
    pub hold: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for KeptTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptTree")
            .field("dir", &self.dir)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Slot {
    /// The slot's cgroup (the task's cgroup while it runs).
    pub fn cgroup(&self) -> &str {
        &self.name
    }

    /// The tree its spawner keeps mounted, as last set.
    pub fn kept_tree(&self) -> Option<&KeptTree> {
        self.kept_tree.as_ref()
    }

    fn link_err(&self) -> impl FnOnce(io::Error) -> WarmError + '_ {
        |source| WarmError::Link {
            slot: self.name.clone(),
            source,
        }
    }

    fn read_reply(&self, timeout: Option<Duration>) -> Result<Reply, WarmError> {
        let tv = timeout.map_or_else(
            || TimeVal::new(0, 0),
            |t| TimeVal::new(t.as_secs() as i64, 0),
        );
        setsockopt(&self.sock, sockopt::ReceiveTimeout, &tv)
            .map_err(|e| self.link_err()(e.into()))?;
        let mut buf = [0u8; 4096];
        match recv(self.sock.as_fd(), &mut buf) {
            Ok(Some((n, _))) => {
                postcard::from_bytes(&buf[..n]).map_err(|_| WarmError::Malformed(self.name.clone()))
            }
            Ok(None) => Err(self.link_err()(io::ErrorKind::UnexpectedEof.into())),
            Err(e) => Err(self.link_err()(e)),
        }
    }

    /// Whether [`Slot::send`] would not wait for the spawner: the answer
    /// to the slot's last `MakeSpare` (its workspace made ahead) has come,
    /// or none is awaited. Never blocks: an event loop may ask, and send
    /// when it is true (a few small writes to the cgroup and one
    /// `sendmsg`), leaving only [`Slot::started`] to a thread: the
    /// request then reaches the spawner without a thread's wake first.
    pub fn ready_now(&self) -> bool {
        if !self.spare_asked {
            return true;
        }
        // Looked at, not taken: `send` reads it as it always does.
        let mut buf = [0u8; 4096];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK;
        !matches!(
            recv_flags(self.sock.as_fd(), &mut buf, flags),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Sets the slot's limits for its next task and sends it `req`, with
    /// these descriptors as its stdin, stdout and stderr; [`Slot::started`]
    /// then waits for its start. Blocks only while the spawner still makes
    /// the slot's workspace ahead (not at all once [`Slot::ready_now`] said
    /// so).
    ///
    /// `keep`: the request's tree (its directory, what identifies it, what
    /// must live as long as its mount), for the spawner to keep mounted
    /// after the task; the tree kept before is returned by
    /// [`Pool::give_back`] once unmounted. A request on the slot's own
    /// root and network is served with the kept tree's mount (made now if
    /// it is another tree's); any other request leaves it kept no longer
    /// (unmounted when the slot is back).
    ///
    /// # Errors
    /// [`WarmError::Task`] when the task itself cannot start; any other
    /// error means the slot is unusable (start the task elsewhere).
    pub fn send(
        &mut self,
        mgr: &dyn CgroupManager,
        limits: &Limits,
        req: &Request,
        stdio: [BorrowedFd<'_>; 3],
        keep: Option<KeptTree>,
    ) -> Result<Sent, WarmError> {
        let (end_r, end_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| self.link_err()(e.into()))?;
        let [a, b, c] = stdio;
        let sent = self.send_task(mgr, limits, req, [a, b, c, end_w.as_fd()]);
        // Only the workspace holds the write end now.
        drop(end_w);
        match sent {
            Ok(()) => self
                .released
                .extend(keep.and_then(|k| self.kept_tree.replace(k))),
            Err(e) => {
                // Not sent. Unless the request alone was at fault (the
                // caller then runs the task in that tree's directory, and
                // gives the slot back), the caller gives the task another
                // directory and discards this slot: with it goes the tree's.
                if !matches!(e, WarmError::TooLarge) {
                    self.released.extend(keep);
                }
                return Err(e);
            }
        }
        Ok(Sent { end: end_r })
    }

    /// Waits for the spawner's answer to the request [`Slot::send`] sent.
    /// Returns the pid of the workspace's supervisor or pid 1 (signals
    /// sent to it reach the command), and the read end of a pipe on which
    /// the task's end comes as soon as it is known, before [`Slot::wait`]
    /// has it: two bytes ([`crate::workspace::end_status`]), or end of file
    /// when the workspace died without telling (then [`Slot::wait`] says
    /// how).
    ///
    /// # Errors
    /// As [`Slot::send`].
    pub fn started(&mut self, sent: Sent) -> Result<(u32, OwnedFd), WarmError> {
        let end_r = sent.end;
        match self.read_reply(Some(Duration::from_secs(30)))? {
            Reply::Started { pid } => Ok((pid, end_r)),
            Reply::Failed { errno, message } => Err(WarmError::Task { errno, message }),
            _ => Err(WarmError::Malformed(self.name.clone())),
        }
    }

    /// The part of [`Slot::send`] before the spawner has the request.
    fn send_task(
        &mut self,
        mgr: &dyn CgroupManager,
        limits: &Limits,
        req: &Request,
        fds: [BorrowedFd<'_>; 4],
    ) -> Result<(), WarmError> {
        if self.spare_asked {
            // (Made while the slot waited in the pool.)
            match self.read_reply(Some(Duration::from_secs(10)))? {
                Reply::Spare { spare } => self.spare = spare,
                _ => return Err(WarmError::Malformed(self.name.clone())),
            }
            self.spare_asked = false;
        }
        // The spawner is one more process in the group.
        let limits = Limits {
            pids: limits.pids.map(|p| p.saturating_add(1)),
            ..*limits
        };
        let last = self.applied.take();
        mgr.reuse(&self.name, &limits, last.as_ref())?;
        self.applied = Some(limits);
        if !std::mem::take(&mut self.restarted) {
            // (Its first task, or one whose slot came back unrestarted.)
            self.oom_base = mgr.restart(&self.name)?;
        }
        let bytes =
            postcard::to_stdvec(&ToSpawnerRef::Task(req)).map_err(|_| WarmError::TooLarge)?;
        if bytes.len() > MAX_REQUEST {
            return Err(WarmError::TooLarge);
        }
        match send(self.sock.as_fd(), &bytes, &fds) {
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => Err(WarmError::TooLarge),
            r => r.map_err(self.link_err()),
        }
    }

    /// Waits for the task started last to end, and returns how it ended
    /// and what it used. A spawner killed meanwhile (with its whole cgroup,
    /// say on eviction) is reported as death by SIGKILL.
    pub fn wait(&mut self, mgr: &dyn CgroupManager) -> (ExitStatus, Usage) {
        let status = match self.read_reply(None) {
            Ok(Reply::Exited { status }) => {
                self.tearing_down = true;
                ExitStatus::from_raw(status)
            }
            _ => ExitStatus::from_raw(libc::SIGKILL),
        };
        (status, self.meter().usage(mgr))
    }

    /// What measures its task's use of the slot's cgroup, for a caller
    /// that learns of the end before [`Slot::wait`] (the slot then being
    /// on another thread).
    pub fn meter(&self) -> Meter {
        Meter {
            name: self.name.clone(),
            oom_base: self.oom_base,
            counters: self.counters.clone(),
        }
    }

    /// Restarts its counters for its next task, while it waits for one.
    /// A task's CPU time then also holds the making of its workspace
    /// ahead (`MakeSpare`, about half a millisecond), work done for it.
    fn restart(&mut self, mgr: &dyn CgroupManager) -> bool {
        match mgr.restart(&self.name) {
            Ok(base) => {
                self.oom_base = base;
                self.restarted = true;
                true
            }
            Err(_) => false,
        }
    }

    /// Waits until the last task's workspace is gone (reported right
    /// after its end, once its namespaces are torn down). False when the
    /// spawner did not say so in time: the slot is not to be reused.
    fn settle(&mut self) -> bool {
        if !self.tearing_down {
            return true;
        }
        self.tearing_down = false;
        matches!(
            self.read_reply(Some(Duration::from_secs(30))),
            Ok(Reply::Gone)
        )
    }

    /// Asks the spawner to make the next task's workspace ahead, after
    /// unmounting the trees it no longer keeps, and its kept tree too
    /// unless `keep_tree`. When that unmounts any, waits until it has, and
    /// moves their records to `released`.
    fn ask_spare(&mut self, keep_tree: bool, released: &mut Vec<KeptTree>) -> bool {
        let dropping = !keep_tree && self.kept_tree.is_some();
        let confirm = dropping || !self.released.is_empty();
        let m = ToSpawnerRef::MakeSpare { keep_tree, confirm };
        let Ok(bytes) = postcard::to_stdvec(&m) else {
            return false;
        };
        if send(self.sock.as_fd(), &bytes, &[]).is_err() {
            return false;
        }
        if confirm {
            match self.read_reply(Some(Duration::from_secs(10))) {
                Ok(Reply::Dropped) => {
                    released.append(&mut self.released);
                    if dropping {
                        released.extend(self.kept_tree.take());
                    }
                }
                _ => return false,
            }
        }
        self.spare_asked = true;
        true
    }

    fn kill(mut self, mgr: &dyn CgroupManager) {
        let _ = self.spawner.kill();
        let _ = self.spawner.wait();
        for k in self
            .kept_tree
            .take()
            .into_iter()
            .chain(self.released.drain(..))
        {
            // Its mount went with the spawner.
            if let Err(e) = crate::workspace::remove_all(&k.dir) {
                tracing::warn!(dir = %k.dir.display(), error = %e, "a discarded slot's tree directory not removed");
            }
        }
        if let Some(r) = &self.root {
            // Empty here: its root was mounted in the spawner's namespace.
            let _ = std::fs::remove_dir(r);
        }
        if let Err(e) = mgr.remove(&self.name) {
            tracing::warn!(slot = %self.name, error = %e, "warm slot's cgroup not removed");
        }
    }
}

/// Which of the free slots `free` (in the order they came back) a task
/// takes: the first for which `prefer` holds, else the first that keeps no
/// tree, else the first.
fn pick<T>(
    free: &[T],
    prefer: impl Fn(&T) -> bool,
    keeps_tree: impl Fn(&T) -> bool,
) -> Option<usize> {
    free.iter()
        .position(prefer)
        .or_else(|| free.iter().position(|s| !keeps_tree(s)))
        .or_else(|| (!free.is_empty()).then_some(0))
}

/// Measures a slot's task: its cgroup's counters, restarted for it.
#[derive(Debug, Clone)]
pub struct Meter {
    name: String,
    oom_base: u64,
    counters: Option<Arc<crate::cgroup::Counters>>,
}

impl Meter {
    /// What the task used (zero where the counters cannot be read). Its
    /// OOM kills are those since the task started.
    pub fn usage(&self, mgr: &dyn CgroupManager) -> Usage {
        let held = self.counters.as_ref().and_then(|c| c.usage().ok());
        let mut usage = held
            .or_else(|| mgr.usage(&self.name).ok())
            .unwrap_or_default();
        usage.oom_kills = usage.oom_kills.saturating_sub(self.oom_base);
        usage
    }
}

/// Warm slots ready for tasks, kept full by a thread of their own (the
/// spawners die with the thread that made them, so it lives as long as the
/// pool's owner).
#[derive(Debug)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    mgr: Arc<dyn CgroupManager>,
    /// The spawner's command line: the agent's binary and its hidden
    /// subcommand.
    command: Vec<OsString>,
    /// Where each spawner assembles its slot's root (`ROOTS/warm-N`,
    /// passed as its last argument), if the spawners assemble one.
    roots: Option<PathBuf>,
    size: usize,
    state: Mutex<State>,
    wake: Condvar,
    next: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    free: Vec<Slot>,
    /// Slots handed out and not yet back.
    out: usize,
    /// Set when the pool is dropped.
    closed: bool,
    /// Set when making slots kept failing: no more are made.
    gave_up: bool,
}

impl Pool {
    /// A pool of `size` slots under `mgr`, whose spawners run `command`
    /// (which must call [`serve`] with its stdin). Makes them in the
    /// background. `None` where slots cannot be reused (cgroup v2).
    pub fn new(
        mgr: Arc<dyn CgroupManager>,
        command: Vec<OsString>,
        size: usize,
        roots: Option<PathBuf>,
    ) -> Option<Self> {
        if mgr.version() != crate::cgroup::CgroupVersion::V1 || size == 0 || command.is_empty() {
            return None;
        }
        if let Some(r) = &roots {
            // Mount points of an earlier life's spawners (their mounts
            // went with them).
            let _ = std::fs::remove_dir_all(r);
        }
        let inner = Arc::new(Inner {
            mgr,
            command,
            roots,
            size,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            next: AtomicU64::new(0),
        });
        let filler = inner.clone();
        std::thread::Builder::new()
            .name("shoal-warm".into())
            .spawn(move || filler.fill())
            .ok()?;
        Some(Self { inner })
    }

    /// A free slot, if one is ready.
    pub fn take(&self) -> Option<Slot> {
        self.take_preferring(|_| false)
    }

    /// A free slot, if one is ready: one for which `prefer` holds if
    /// there is such, else one that keeps no tree, else any; of those, the
    /// one that came back longest ago. The slot that came back last is
    /// still making its next workspace ahead (`MakeSpare`): a task sent to
    /// it right away, as tasks back to back are, would wait for that.
    pub fn take_preferring(&self, prefer: impl Fn(&Slot) -> bool) -> Option<Slot> {
        let mut st = self.inner.lock();
        let i = pick(&st.free, prefer, |s| s.kept_tree.is_some())?;
        // (Kept in the order they came back.)
        let slot = st.free.remove(i);
        // Free and handed out together are as many as before: nothing for
        // the pool's thread to make (it is not woken on the task's path).
        st.out += 1;
        Some(slot)
    }

    /// Returns a slot whose task has ended: kept if only its spawner is
    /// left in its cgroup and it is thawed, else removed (and replaced).
    /// Its spawner unmounts the trees it no longer keeps, and the kept one
    /// too unless `keep_tree` (the last task changed it); their records
    /// are returned, their directories the caller's again. Blocks briefly
    /// (cgroup reads and writes, the unmounts).
    pub fn give_back(&self, mut slot: Slot, keep_tree: bool) -> Vec<KeptTree> {
        // Kept: its spawner makes the next task's workspace while it waits.
        let mut released = Vec::new();
        let keep = slot.settle()
            && self.inner.clean(&slot)
            && slot.restart(self.inner.mgr.as_ref())
            && slot.ask_spare(keep_tree, &mut released);
        let mut st = self.inner.lock();
        st.out = st.out.saturating_sub(1);
        if keep && !st.closed {
            st.free.push(slot);
            return released;
        }
        drop(st);
        slot.kill(self.inner.mgr.as_ref());
        self.inner.wake.notify_one();
        released
    }

    /// Throws away a slot that failed (its spawner is killed, its cgroup
    /// removed); the pool makes another.
    pub fn discard(&self, slot: Slot) {
        slot.kill(self.inner.mgr.as_ref());
        let mut st = self.inner.lock();
        st.out = st.out.saturating_sub(1);
        drop(st);
        self.inner.wake.notify_one();
    }

    /// How many slots are ready now.
    pub fn ready(&self) -> usize {
        self.inner.lock().free.len()
    }
}

impl Pool {
    /// Makes no more slots, and removes the free ones (their spawners are
    /// killed, their cgroups removed). Slots handed out are removed when
    /// they come back.
    pub fn close(&self) {
        let free = {
            let mut st = self.inner.lock();
            st.closed = true;
            std::mem::take(&mut st.free)
        };
        self.inner.wake.notify_all();
        for s in free {
            s.kill(self.inner.mgr.as_ref());
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `size` slots free or handed out, until closed. Stops making
    /// them after a few failures in a row (tasks then get fresh cgroups),
    /// but lives on until closed: the spawners die with this thread.
    fn fill(&self) {
        let mut failures = 0u32;
        loop {
            {
                let mut st = self.lock();
                while !st.closed && (st.gave_up || st.free.len() + st.out >= self.size) {
                    st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.closed {
                    return;
                }
            }
            match self.make() {
                Ok(slot) => {
                    failures = 0;
                    let mut st = self.lock();
                    if st.closed {
                        drop(st);
                        slot.kill(self.mgr.as_ref());
                        return;
                    }
                    st.free.push(slot);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "a warm slot could not be made");
                    if failures >= 3 {
                        tracing::warn!("no more warm slots: tasks get fresh cgroups");
                        self.lock().gave_up = true;
                        continue;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn make(&self) -> Result<Slot, WarmError> {
        let name = format!("warm-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let link = |source: io::Error| WarmError::Link {
            slot: name.clone(),
            source,
        };
        self.mgr.create(&name, &Limits::default())?;
        let made = (|| {
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| link(e.into()))?;
            let mut cmd = Command::new(&self.command[0]);
            cmd.args(&self.command[1..])
                .stdin(Stdio::from(theirs))
                .stdout(Stdio::null());
            let root = self.roots.as_ref().map(|r| r.join(&name));
            if let Some(r) = &root {
                std::fs::create_dir_all(r).map_err(link)?;
                cmd.arg(r);
            }
            spawn_into(&mut cmd, self.mgr.as_ref(), &name)?;
            // The slow move into the cgroup happens here, off every task's
            // path.
            let spawner = cmd.spawn().map_err(link)?;
            let slot = Slot {
                name: name.clone(),
                root,
                sock: ours,
                spawner,
                oom_base: 0,
                counters: self.mgr.open_counters(&name).ok().map(Arc::new),
                restarted: false,
                // What a group made without limits has.
                applied: Some(Limits::default()),
                tearing_down: false,
                spare: Vec::new(),
                spare_asked: false,
                kept_tree: None,
                released: Vec::new(),
            };
            match slot.read_reply(Some(Duration::from_secs(10))) {
                Ok(Reply::Ready { spare }) => Ok(Slot { spare, ..slot }),
                Ok(Reply::Failed { message, .. }) => {
                    // Its root could not be assembled: say why.
                    slot.kill(self.mgr.as_ref());
                    Err(WarmError::Spawner {
                        slot: name.clone(),
                        message,
                    })
                }
                Ok(_) => {
                    let e = WarmError::Malformed(name.clone());
                    slot.kill(self.mgr.as_ref());
                    Err(e)
                }
                Err(e) => {
                    slot.kill(self.mgr.as_ref());
                    Err(e)
                }
            }
        })();
        if made.is_err() {
            let _ = self.mgr.remove(&name);
        }
        made
    }

    /// Whether a slot whose task ended can serve another: its spawner is
    /// alive and alone in its thawed cgroup.
    fn clean(&self, slot: &Slot) -> bool {
        let spawner = slot.spawner.id();
        // The spawner, and the workspace it made ahead for the next task.
        let alone = |pids: &[u32]| {
            pids.iter().all(|p| *p == spawner || slot.spare.contains(p)) && pids.contains(&spawner)
        };
        let Ok(pids) = self.mgr.pids(&slot.name) else {
            return false;
        };
        if !alone(&pids) {
            // A task's processes all die with its pid namespace; anything
            // else here is not to be trusted with the next task.
            return false;
        }
        self.mgr.set_frozen(&slot.name, false).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn a_task_takes_the_slot_that_came_back_longest_ago_among_the_best() {
        // (name, keeps the task's tree, keeps some tree), oldest first.
        let free = [
            ("a", false, true),
            ("b", true, true),
            ("c", false, false),
            ("d", true, true),
            ("e", false, false),
        ];
        let name = |i: Option<usize>| i.map(|i| free[i].0);
        // One that keeps the task's tree, the oldest of those.
        assert_eq!(name(pick(&free, |s| s.1, |s| s.2)), Some("b"));
        // Else one that keeps no tree (the last one back is still making
        // its next workspace ahead).
        assert_eq!(name(pick(&free, |_| false, |s| s.2)), Some("c"));
        // Else the oldest.
        assert_eq!(name(pick(&free, |_| false, |_| true)), Some("a"));
        assert_eq!(pick(&[] as &[(&str, bool, bool)], |_| true, |_| true), None);
    }
}
