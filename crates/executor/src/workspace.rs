//! Workspaces: a task's own mount, pid, uts, ipc and (by default) network
//! namespaces, a root filesystem assembled from read-only system
//! directories plus the task's files on an overlay, an unprivileged uid,
//! and (through [`crate::cgroup::spawn_into`]) its cgroup.
//!
//! ```text
//!  agent ──fork──▶ [supervisor]   old pid ns: forwards signals, mirrors the
//!                      │            command's end, dies with the agent
//!                      └─fork──▶ [pid 1]  new ns: mounts, pivot_root, uid;
//!                                  │      then init: forwards, reaps, reports
//!                                  └─fork──▶ [pid 2]  execs the command
//! ```
//!
//! Everything the child does between fork and exec is prepared before the
//! fork ([`Plan`]): paths as C strings, a list of mount steps. The child
//! only makes system calls.
//!
//! An agent that is not root gets the same workspace inside a user
//! namespace of its own: the child maps the agent's ids to the guest's
//! (one line each, after giving up `setgroups`), then mounts as before; the
//! overlay keeps its marks in `user.` attributes (`userxattr`). The guest
//! runs as the agent's user outside, keeps the agent's supplementary
//! groups (the kernel allows no other way without a setuid helper), and
//! cannot do more than that user could.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Gid, Uid};

/// Why a workspace could not be prepared. Nothing was mounted.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// A path that cannot be passed to the kernel (NUL byte).
    #[error("path with a NUL byte: {0}")]
    Nul(String),
    /// The run directory could not be made.
    #[error("{path}: {source}")]
    Io {
        /// What was being made.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An image root that is not a directory with a usable /bin or /usr.
    #[error("image {0} is not a root filesystem (no bin/ or usr/ directory)")]
    NotARootfs(PathBuf),
    /// A path that must be absolute.
    #[error("{0} must be an absolute path")]
    Relative(PathBuf),
    /// A tree with no lower layer.
    #[error("the tree at {0} has no lower layer")]
    NoLower(PathBuf),
}

/// The software environment: where the read-only system directories come
/// from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Root {
    /// This machine's own `/usr`, `/bin`, `/lib*`, `/sbin`, `/etc`.
    Host,
    /// An unpacked image (a rootfs directory), mounted read-only.
    Image(PathBuf),
}

/// The task's own files: `lower` (read-only layers, the submitter's tree)
/// under a writable `upper`, seen at `at` inside the workspace. What the
/// task changes lands in `upper` only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tree {
    /// The submitter's files, read-only: directories stacked top first
    /// (a tree made as a thin layer over a close one).
    pub lower: Vec<PathBuf>,
    /// Where the task's writes go.
    pub upper: PathBuf,
    /// Overlayfs' work directory (same filesystem as `upper`).
    pub work: PathBuf,
    /// The path inside the workspace (the submitter's directory).
    pub at: PathBuf,
}

/// Network of the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Net {
    /// A new network namespace with only loopback, up.
    Loopback,
    /// The machine's network.
    Host,
    /// The creator's network namespace, as it is (a warm slot's spawner
    /// passes on its own loopback-only namespace, made once).
    Inherit,
}

/// Everything about one workspace.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Spec {
    /// Host directory for this workspace's mount points (made if absent,
    /// emptied by [`cleanup`]).
    pub run_dir: PathBuf,
    /// System directories.
    pub root: Root,
    /// The task's files, if any.
    pub tree: Option<Tree>,
    /// Working directory inside the workspace.
    pub cwd: PathBuf,
    /// Host name inside.
    pub hostname: String,
    /// Unprivileged user and group the command runs as.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Network.
    pub net: Net,
    /// A guest: `SCHED_IDLE` and the idle I/O class for its command,
    /// inherited by every process it starts (the owner's work always comes
    /// first). The workspace's own set-up and teardown (its pid 1, the
    /// agent's work) stay in the ordinary class.
    pub idle: bool,
    /// The command's stdin is a terminal: it becomes the controlling
    /// terminal of a new session led by the command.
    pub tty: bool,
}

/// The secrets of `/etc` that a guest never sees: shadow files, the agent's
/// own configuration and key, SSH host keys.
const MASKED_FILES: &[&str] = &["etc/shadow", "etc/shadow-", "etc/gshadow", "etc/gshadow-"];
const MASKED_DIRS: &[&str] = &["etc/shoal", "etc/ssh", "etc/sudoers.d"];
const SYSTEM: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
];
/// An image's own system directories: the host's set and `/opt`.
const IMAGE_SYSTEM: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt",
];
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// One step of the child's set-up, prepared before the fork.
#[derive(Debug)]
enum Step {
    Mkdir(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Touch(CString),
    Mount {
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: MsFlags,
        data: Option<CString>,
    },
}

/// The prepared set-up of one workspace.
#[derive(Debug)]
pub struct Plan {
    new_root: CString,
    steps: Vec<Step>,
    old_root: CString,
    old_root_rel: CString,
    cwd: CString,
    hostname: OsString,
    uid: u32,
    gid: u32,
    flags: CloneFlags,
    net: Net,
    idle: bool,
    tty: bool,
    /// On a root shared with other workspaces (a warm slot's).
    shared_root: bool,
    /// An agent that is not root: the workspace gets a user namespace of
    /// its own, in which the agent's identity is the guest's.
    user_ns: Option<IdMaps>,
    /// Where the supervisor writes how the command ended as soon as it
    /// knows (see [`Plan::report_end_to`]).
    early: Option<i32>,
    /// Which of `steps` mounts the task's tree (replaced by a mount made
    /// elsewhere in [`Plan::finish_prepared`]).
    tree_step: Option<usize>,
}

/// The one-line id maps of a workspace's user namespace, written by the
/// child itself (an unprivileged process may map its own ids, once it
/// gave up `setgroups`).
#[derive(Debug)]
struct IdMaps {
    uid_map: CString,
    gid_map: CString,
}

impl IdMaps {
    /// `inside` ids as the ids `(ou, og)` of the process outside.
    fn new(uid: u32, gid: u32, (ou, og): (u32, u32)) -> Self {
        Self {
            // A formatted integer holds no NUL.
            uid_map: CString::new(format!("{uid} {ou} 1\n")).unwrap_or_default(),
            gid_map: CString::new(format!("{gid} {og} 1\n")).unwrap_or_default(),
        }
    }

    /// Maps the ids of the calling process, which has just entered a new
    /// user namespace. System calls on prepared strings only.
    fn write(&self) -> io::Result<()> {
        fn put(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
            let fd = nix::fcntl::open(
                path,
                nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            // SAFETY: `fd` was just opened here and is closed only below.
            #[allow(unsafe_code)]
            let written =
                nix::unistd::write(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, data);
            nix::unistd::close(fd)?;
            if written? != data.len() {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            Ok(())
        }
        // A process whose ids were just changed (a root parent's
        // `Command::uid`) is not dumpable, which makes its /proc files
        // root's; it is the caller's own identity either way.
        nix::sys::prctl::set_dumpable(true)?;
        put(c"/proc/self/setgroups", b"deny")?;
        put(c"/proc/self/uid_map", self.uid_map.as_bytes())?;
        put(c"/proc/self/gid_map", self.gid_map.as_bytes())
    }
}

fn c(p: impl AsRef<OsStr>) -> Result<CString, WorkspaceError> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| WorkspaceError::Nul(p.as_ref().to_string_lossy().into_owned()))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WorkspaceError + '_ {
    move |source| WorkspaceError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Plan {
    /// Prepares `spec`: makes its run directory and computes every step.
    ///
    /// # Errors
    /// A bad path or image, or the run directory cannot be made.
    pub fn new(spec: &Spec) -> Result<Self, WorkspaceError> {
        Self::build(spec, None, unprivileged())
    }

    /// As [`Plan::new`], for a child that will run as `uid`/`gid` (not
    /// root) before the plan is carried out (`Command::uid`): the
    /// workspace gets a user namespace in which those ids are the guest's.
    /// This is what an agent that is not root gets from [`Plan::new`];
    /// with it, a root process can try that path.
    ///
    /// # Errors
    /// As [`Plan::new`].
    pub fn as_user(spec: &Spec, uid: u32, gid: u32) -> Result<Self, WorkspaceError> {
        Self::build(spec, None, Some((uid, gid)))
    }

    /// As [`Plan::new`], on a root assembled already at `base` by
    /// [`assemble_base`] in the calling process's mount namespace (a warm
    /// slot's spawner): only `/proc`, `/tmp` and the tree are mounted per
    /// workspace, and the caller removes the directories [`tree_dirs`]
    /// made on the shared root once the task ended. A spec with an image
    /// of its own gets a whole plan.
    ///
    /// # Errors
    /// As [`Plan::new`].
    pub fn on_base(spec: &Spec, base: &Path) -> Result<Self, WorkspaceError> {
        match spec.root {
            Root::Host => Self::build(spec, Some(base), unprivileged()),
            Root::Image(_) => Self::build(spec, None, unprivileged()),
        }
    }

    /// `outside`: the ids the child runs as when they are not root.
    fn build(
        spec: &Spec,
        base: Option<&Path>,
        outside: Option<(u32, u32)>,
    ) -> Result<Self, WorkspaceError> {
        let unprivileged = outside.is_some();
        for p in [&spec.cwd, &spec.run_dir] {
            if !p.is_absolute() {
                return Err(WorkspaceError::Relative(p.clone()));
            }
        }
        let root_dir = match base {
            Some(b) => b.to_owned(),
            None => {
                let r = spec.run_dir.join("root");
                std::fs::create_dir_all(&r).map_err(io_err(&r))?;
                r
            }
        };
        let nr = |rel: &str| root_dir.join(rel);
        let mut steps = match base {
            Some(_) => Vec::new(),
            None => base_steps(&spec.root, &root_dir)?,
        };
        steps.extend(task_mounts(&root_dir)?);
        if let Some(t) = &spec.tree {
            for dir in tree_dirs(&root_dir, &t.at)? {
                steps.push(Step::Mkdir(c(dir)?));
            }
            let at = root_dir.join(t.at.strip_prefix("/").unwrap_or(&t.at));
            steps.push(tree_mount(t, &at, unprivileged)?);
        }
        let tree_step = spec.tree.as_ref().map(|_| steps.len() - 1);
        let mut flags = TASK_NAMESPACES;
        if spec.net == Net::Loopback {
            flags |= CloneFlags::CLONE_NEWNET;
        }
        // Without root, the namespaces and mounts are made inside a user
        // namespace of the workspace's own (overlay, tmpfs, proc and bind
        // mounts are allowed there since Linux 5.11).
        let user_ns = outside.map(|o| {
            flags |= CloneFlags::CLONE_NEWUSER;
            IdMaps::new(spec.uid, spec.gid, o)
        });
        Ok(Self {
            new_root: c(&root_dir)?,
            steps,
            old_root: c(nr(".oldroot"))?,
            old_root_rel: c("/.oldroot")?,
            cwd: c(&spec.cwd)?,
            hostname: OsString::from(&spec.hostname),
            uid: spec.uid,
            gid: spec.gid,
            flags,
            net: spec.net,
            idle: spec.idle,
            tty: spec.tty,
            shared_root: base.is_some(),
            user_ns,
            early: None,
            tree_step,
        })
    }

    /// Has the supervisor write how the command ended to `fd` (two bytes:
    /// 0 and the exit code, or 1 and the signal) as soon as every process
    /// of the workspace is gone, before it exits itself. Its own exit
    /// tears the namespaces down (the overlay's unmount syncs the upper
    /// file system), which takes about a millisecond that the task's
    /// submitter need not wait for; the files are final by then. The
    /// descriptor should be close-on-exec (the command must not inherit
    /// it) and stay open in the caller until the child is spawned.
    #[must_use]
    pub fn report_end_to(mut self, fd: BorrowedFd<'_>) -> Self {
        self.early = Some(fd.as_raw_fd());
        self
    }

    /// Makes `cmd` run inside this workspace. Register it after
    /// [`crate::cgroup::spawn_into`] so the cgroup is joined first.
    pub fn apply(self, cmd: &mut Command) {
        // SAFETY: the closure runs in the forked child before exec. It makes
        // only system calls on data prepared before the fork (C strings,
        // flags), forks once more, and in the intermediate process only
        // waits, forwards signals through an atomic and exits; nothing
        // allocates or takes a lock.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || self.enter());
        }
    }

    /// Runs in the child between fork and exec.
    ///
    /// Three processes: this one stays in the agent's pid namespace and
    /// supervises; its child is pid 1 of the new namespace, sets up the
    /// filesystem and identity and then supervises in turn (as an init
    /// that forwards signals and reaps orphans); its child, pid 2, execs
    /// the command, so the command has ordinary signal semantics (pid 1
    /// ignores signals it has no handler for). pid 1 reports how pid 2
    /// ended through a pipe, because pid 1 itself cannot die of a signal
    /// sent from inside its own namespace.
    fn enter(&self) -> io::Result<()> {
        nix::sched::unshare(self.flags)?;
        if let Some(maps) = &self.user_ns {
            maps.write()?;
        }
        let (status_r, status_w) = nix::unistd::pipe()?;
        // SAFETY: we are in a forked child that runs no other thread; the
        // parent side of this fork only supervises (see `supervise`).
        #[allow(unsafe_code)]
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Parent { child } => {
                drop(status_w);
                supervise(child, false, Report::Read(status_r.as_raw_fd()), self.early)
            }
            ForkResult::Child => drop(status_r),
        }
        self.set_up()?;
        // SAFETY: as above; this process is pid 1 of the new namespace.
        #[allow(unsafe_code)]
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Parent { child } => {
                supervise(child, true, Report::Write(status_w.as_raw_fd()), None)
            }
            ForkResult::Child => {
                drop(status_w);
                if self.tty {
                    // A session of its own with the terminal as its
                    // controlling tty: Ctrl-C, job control and window
                    // sizes work as at a local terminal.
                    nix::unistd::setsid()?;
                    // SAFETY: TIOCSCTTY takes an integer argument (0: do
                    // not steal); fd 0 is the pty slave set up by the
                    // parent; no memory of ours is passed.
                    #[allow(unsafe_code)]
                    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else {
                    // Its own process group, so that a forwarded Ctrl-C
                    // reaches the command's children as it would at a
                    // terminal.
                    nix::unistd::setpgid(
                        nix::unistd::Pid::from_raw(0),
                        nix::unistd::Pid::from_raw(0),
                    )?;
                }
                // A guest's command (and all it starts) at the idle class;
                // its workspace's set-up and teardown, the agent's own
                // work, are not.
                if self.idle {
                    idle_class()?;
                }
                Ok(())
            }
        }
    }

    fn set_up(&self) -> io::Result<()> {
        keep_mounts_private()?;
        self.set_up_after(0)
    }

    /// The rest of a workspace whose namespaces, private mounts, `/proc`
    /// and `/tmp` were made ahead, and which is in its root already
    /// ([`prepare_on_base`]): its tree, the root made read-only, host name,
    /// directory and identity. For a plan on a slot's shared
    /// root ([`Plan::on_base`]) only. `tree`: the task's tree mounted
    /// already, detached ([`clone_tree`]), attached here instead of a new
    /// overlay mount.
    ///
    /// # Errors
    /// Not such a plan, or a step failed.
    pub(crate) fn finish_prepared(&self, tree: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if !self.shared_root || self.user_ns.is_some() {
            return Err(io::Error::other("not a plan on a shared root"));
        }
        // pid 1 is in the slot's root already (`prepare_on_base`): the
        // plan's paths, the host's, are seen from it.
        let steps = self.steps.get(TASK_MOUNTS..).unwrap_or_default();
        match (tree, self.tree_step) {
            (Some(fd), Some(i)) if i >= TASK_MOUNTS => {
                let (before, rest) = steps.split_at(i - TASK_MOUNTS);
                for step in before {
                    let Step::Mkdir(p) = step else {
                        return Err(io::Error::other(
                            "a step before the tree is not a directory",
                        ));
                    };
                    run_steps(&[Step::Mkdir(self.in_root(p)?)])?;
                }
                let Some((Step::Mount { target, .. }, [])) = rest.split_first() else {
                    return Err(io::Error::other("the tree's step is not the last mount"));
                };
                rustix::mount::move_mount(
                    fd,
                    c"",
                    rustix::fs::CWD,
                    self.in_root(target)?.as_c_str(),
                    rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
                )?;
            }
            (Some(_), _) => return Err(io::Error::other("a tree for a plan without one")),
            (None, None) => {}
            (None, Some(_)) => {
                // (Its layers are host paths, which it no longer sees.)
                return Err(io::Error::other(
                    "a workspace made ahead needs its tree mounted for it",
                ));
            }
        }
        self.settle_in()
    }

    /// A host path under the plan's root as seen once in that root.
    fn in_root(&self, p: &CStr) -> io::Result<CString> {
        let rest = p
            .to_bytes()
            .strip_prefix(self.new_root.to_bytes())
            .filter(|r| r.is_empty() || r.starts_with(b"/"))
            .ok_or_else(|| io::Error::other(format!("{p:?} is not under the slot's root")))?;
        let rest = if rest.is_empty() {
            b"/".as_slice()
        } else {
            rest
        };
        CString::new(rest).map_err(io::Error::other)
    }

    /// [`Plan::set_up`] from step `first` on.
    fn set_up_after(&self, first: usize) -> io::Result<()> {
        run_steps(self.steps.get(first..).unwrap_or_default())?;
        self.enter_root()
    }

    /// Once everything is mounted: the root, host name, directory and
    /// identity.
    fn enter_root(&self) -> io::Result<()> {
        pivot_into(self.new_root.as_c_str(), self.old_root.as_c_str())?;
        if !self.shared_root {
            // (A shared root keeps its mount point for the next task.)
            nix::unistd::unlinkat(
                None,
                self.old_root_rel.as_c_str(),
                nix::unistd::UnlinkatFlags::RemoveDir,
            )?;
        }
        self.settle_in()
    }

    /// In the root: the root made read-only, the host name, directory and
    /// identity.
    fn settle_in(&self) -> io::Result<()> {
        // The assembled root itself is read-only; /tmp and the tree are not.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )?;
        nix::unistd::sethostname(&self.hostname)?;
        if self.net == Net::Loopback {
            loopback_up()?;
        }
        nix::unistd::chdir(self.cwd.as_c_str())?;
        if self.user_ns.is_none() {
            // (In a user namespace `setgroups` was given up; the agent's
            // own supplementary groups stay, as the kernel requires.)
            nix::unistd::setgroups(&[])?;
        }
        let (g, u) = (Gid::from_raw(self.gid), Uid::from_raw(self.uid));
        nix::unistd::setresgid(g, g, g)?;
        nix::unistd::setresuid(u, u, u)?;
        Ok(())
    }
}

/// How many steps [`task_mounts`] makes: where a plan on a shared root
/// goes on in a workspace made ahead ([`Plan::finish_prepared`]).
const TASK_MOUNTS: usize = 2;

/// The namespaces of every workspace (a new network one too, unless it
/// inherits its creator's; a user one too, for an agent that is not
/// root).
pub(crate) const TASK_NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWNS
    .union(CloneFlags::CLONE_NEWPID)
    .union(CloneFlags::CLONE_NEWUTS)
    .union(CloneFlags::CLONE_NEWIPC);

/// The mounts every task makes for itself on its root: its `/proc` and
/// its `/tmp` (the first steps of a plan on a slot's shared root, which a
/// pre-made workspace has made already: [`prepare_on_base`]).
fn task_mounts(root_dir: &Path) -> Result<[Step; TASK_MOUNTS], WorkspaceError> {
    Ok([
        Step::Mount {
            src: Some(c("proc")?),
            target: c(root_dir.join("proc"))?,
            fstype: Some(c("proc")?),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            data: None,
        },
        Step::Mount {
            src: Some(c("shoal-tmp")?),
            target: c(root_dir.join("tmp"))?,
            fstype: Some(c("tmpfs")?),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some(c("mode=1777,size=256m")?),
        },
    ])
}

/// The first part of a workspace on a slot's shared root `base`, made
/// before its task is known (in a process that has unshared the
/// namespaces): its mounts kept private, `/proc` and `/tmp`. The rest is
/// [`Plan::finish_prepared`].
///
/// # Errors
/// A mount failed.
pub(crate) fn prepare_on_base(base: &Path) -> io::Result<()> {
    let steps = task_mounts(base).map_err(io::Error::other)?;
    keep_mounts_private()?;
    run_steps(&steps)?;
    // Into the slot's root now, off the task's path: `pivot_root` waits
    // for an RCU grace period, and the host's mounts are detached here.
    let new_root = c(base).map_err(io::Error::other)?;
    let old_root = c(base.join(".oldroot")).map_err(io::Error::other)?;
    pivot_into(&new_root, &old_root)
}

/// `pivot_root` into `new_root`, the old root put at `old_root` (a
/// directory in it) and detached.
fn pivot_into(new_root: &CStr, old_root: &CStr) -> io::Result<()> {
    nix::unistd::pivot_root(new_root, old_root)?;
    nix::unistd::chdir("/")?;
    let rel = old_root
        .to_bytes()
        .strip_prefix(new_root.to_bytes())
        .ok_or_else(|| io::Error::other("the old root is not in the new one"))?;
    umount2(
        CString::new(rel).map_err(io::Error::other)?.as_c_str(),
        MntFlags::MNT_DETACH,
    )?;
    Ok(())
}

/// In a new mount namespace: what is mounted here stays here.
fn keep_mounts_private() -> io::Result<()> {
    Ok(mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?)
}

/// The effective ids of this process when they are not root's: its
/// workspaces need a user namespace.
fn unprivileged() -> Option<(u32, u32)> {
    let uid = nix::unistd::geteuid();
    (!uid.is_root()).then(|| (uid.as_raw(), nix::unistd::getegid().as_raw()))
}

/// The directories to make under `root_dir` for a tree seen at `at`
/// (absolute), outermost first.
///
/// # Errors
/// `at` is not absolute.
pub fn tree_dirs(root_dir: &Path, at: &Path) -> Result<Vec<PathBuf>, WorkspaceError> {
    if !at.is_absolute() {
        return Err(WorkspaceError::Relative(at.to_owned()));
    }
    let mut acc = root_dir.to_owned();
    Ok(at
        .components()
        .skip(1)
        .map(|comp| {
            acc.push(comp);
            acc.clone()
        })
        .collect())
}

/// The steps that assemble a root at `root_dir` with everything but
/// `/proc`, `/tmp` and the task's tree: a tmpfs with the system
/// directories bound read-only, `/etc`'s secrets masked, a `/dev` of its
/// own, and the mount points for the rest.
fn base_steps(root: &Root, root_dir: &Path) -> Result<Vec<Step>, WorkspaceError> {
    let sys = match root {
        Root::Host => PathBuf::from("/"),
        Root::Image(p) => {
            if !(p.join("bin").exists() || p.join("usr").is_dir()) {
                return Err(WorkspaceError::NotARootfs(p.clone()));
            }
            p.clone()
        }
    };
    let nr = |rel: &str| root_dir.join(rel);
    let mut steps = vec![Step::Mount {
        src: Some(c("shoal-root")?),
        target: c(root_dir)?,
        fstype: Some(c("tmpfs")?),
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        data: Some(c("mode=0755,size=16m")?),
    }];
    let dirs = match root {
        Root::Host => SYSTEM,
        Root::Image(_) => IMAGE_SYSTEM,
    };
    for d in dirs {
        let src = sys.join(d);
        let Ok(meta) = std::fs::symlink_metadata(&src) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&src).map_err(io_err(&src))?;
            steps.push(Step::Symlink {
                target: c(&target)?,
                link: c(nr(d))?,
            });
        } else if meta.is_dir() {
            steps.push(Step::Mkdir(c(nr(d))?));
            bind_ro(&mut steps, c(&src)?, c(nr(d))?);
        }
    }
    for f in MASKED_FILES {
        if sys.join(f).exists() {
            steps.push(Step::Mount {
                src: Some(c("/dev/null")?),
                target: c(nr(f))?,
                fstype: None,
                flags: MsFlags::MS_BIND,
                data: None,
            });
        }
    }
    for d in MASKED_DIRS {
        if sys.join(d).is_dir() {
            steps.push(Step::Mount {
                src: Some(c("masked")?),
                target: c(nr(d))?,
                fstype: Some(c("tmpfs")?),
                flags: MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                data: Some(c("size=4k")?),
            });
        }
    }
    steps.push(Step::Mkdir(c(nr("proc"))?));
    steps.push(Step::Mkdir(c(nr("dev"))?));
    steps.push(Step::Mount {
        src: Some(c("shoal-dev")?),
        target: c(nr("dev"))?,
        fstype: Some(c("tmpfs")?),
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        data: Some(c("mode=0755,size=64k")?),
    });
    for d in DEVICES {
        let host = Path::new("/dev").join(d);
        if host.exists() {
            steps.push(Step::Touch(c(nr(&format!("dev/{d}")))?));
            steps.push(Step::Mount {
                src: Some(c(&host)?),
                target: c(nr(&format!("dev/{d}")))?,
                fstype: None,
                flags: MsFlags::MS_BIND,
                data: None,
            });
        }
    }
    for (link, target) in [
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ] {
        steps.push(Step::Symlink {
            target: c(target)?,
            link: c(nr(link))?,
        });
    }
    steps.push(Step::Mkdir(c(nr("dev/shm"))?));
    steps.push(Step::Mkdir(c(nr("tmp"))?));
    steps.push(Step::Mkdir(c(nr(".oldroot"))?));
    Ok(steps)
}

/// Assembles the host-system root of [`base_steps`] at `root_dir` once,
/// in a mount namespace of the calling process's own (a warm slot's
/// spawner, which then starts every task of the slot on it with
/// [`Plan::on_base`]). Mounts made on the host later still reach it; its
/// own never reach the host, and go with the process.
///
/// # Errors
/// A namespace or mount the kernel refused, or a bad path.
pub fn assemble_base(root_dir: &Path) -> Result<(), WorkspaceError> {
    let steps = base_steps(&Root::Host, root_dir)?;
    let sys = |e: nix::errno::Errno| io_err(root_dir)(e.into());
    std::fs::create_dir_all(root_dir).map_err(io_err(root_dir))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(sys)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(sys)?;
    run_steps(&steps).map_err(io_err(root_dir))
}

/// The step that mounts tree `t`'s overlay at `at`.
///
/// # Errors
/// A tree without a lower layer, or a path with a NUL byte.
fn tree_mount(t: &Tree, at: &Path, unprivileged: bool) -> Result<Step, WorkspaceError> {
    if t.lower.is_empty() {
        return Err(WorkspaceError::NoLower(t.at.clone()));
    }
    let mut data = b"lowerdir=".to_vec();
    for (i, l) in t.lower.iter().enumerate() {
        if i > 0 {
            data.push(b':');
        }
        overlay_escape(&mut data, l);
    }
    data.extend_from_slice(b",upperdir=");
    overlay_escape(&mut data, &t.upper);
    data.extend_from_slice(b",workdir=");
    overlay_escape(&mut data, &t.work);
    if unprivileged {
        // In a user namespace the overlay keeps its marks (opaque
        // directories) in `user.` attributes.
        data.extend_from_slice(b",userxattr");
    }
    Ok(Step::Mount {
        src: Some(c("shoal-tree")?),
        target: c(at)?,
        fstype: Some(c("overlay")?),
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        data: Some(c(OsStr::from_bytes(&data))?),
    })
}

/// Mounts the overlay of tree `t` at `at` in the calling process's mount
/// namespace (a warm slot's spawner keeps a tree mounted this way between
/// tasks: each task attaches a copy of it, [`clone_tree`], instead of
/// mounting an overlay of its own, which makes and removes test files in
/// the work directory and syncs the upper file system when it goes).
///
/// # Errors
/// A bad path, or the kernel refused the mount.
pub(crate) fn mount_tree(t: &Tree, at: &Path) -> io::Result<()> {
    let step = tree_mount(t, at, unprivileged().is_some()).map_err(io::Error::other)?;
    run_steps(&[step])
}

/// A detached copy of the mount at `at`, for another mount namespace to
/// attach ([`Plan::finish_prepared`]).
///
/// # Errors
/// The kernel refused (`open_tree` is Linux 5.2 and later).
pub(crate) fn clone_tree(at: &Path) -> io::Result<OwnedFd> {
    use rustix::mount::OpenTreeFlags;
    Ok(rustix::mount::open_tree(
        rustix::fs::CWD,
        at,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )?)
}

/// Appends `path` to overlay mount options, its separators (`:` between
/// layers, `,` between options) and backslashes escaped with a backslash,
/// as the overlay reads them.
fn overlay_escape(out: &mut Vec<u8>, path: &Path) {
    for &b in path.as_os_str().as_bytes() {
        if matches!(b, b':' | b',' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Carries out prepared steps (between fork and exec: system calls on
/// data prepared before, nothing allocated).
fn run_steps(steps: &[Step]) -> io::Result<()> {
    for s in steps {
        match s {
            Step::Mkdir(p) => {
                match nix::unistd::mkdir(p.as_c_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Step::Symlink { target, link } => {
                nix::unistd::symlinkat(target.as_c_str(), None, link.as_c_str())?;
            }
            Step::Touch(p) => {
                let fd = nix::fcntl::open(
                    p.as_c_str(),
                    nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY,
                    Mode::from_bits_truncate(0o644),
                )?;
                nix::unistd::close(fd)?;
            }
            Step::Mount {
                src,
                target,
                fstype,
                flags,
                data,
            } => {
                mount(
                    src.as_deref(),
                    target.as_c_str(),
                    fstype.as_deref(),
                    *flags,
                    data.as_deref(),
                )?;
                if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
                    mount(
                        None::<&str>,
                        target.as_c_str(),
                        None::<&str>,
                        *flags | MsFlags::MS_REMOUNT,
                        None::<&str>,
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// Puts thread `tid` back in the ordinary scheduling class (from the
/// guests' idle class, so that a killed task can die promptly).
pub(crate) fn ordinary_class(tid: u32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    let tid =
        libc::pid_t::try_from(tid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `param` is a valid sched_param that outlives the call; the
    // call touches no other memory of ours.
    #[allow(unsafe_code)]
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling process (and, by inheritance, everything it starts)
/// under `SCHED_IDLE` and the idle I/O class. Two system calls, safe
/// between fork and exec.
pub(crate) fn idle_class() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0
    // is the calling process.
    #[allow(unsafe_code)]
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: ioprio_set takes three integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bind_ro(steps: &mut Vec<Step>, src: CString, target: CString) {
    steps.push(Step::Mount {
        src: Some(src),
        target,
        fstype: None,
        flags: MsFlags::MS_BIND
            | MsFlags::MS_REC
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        data: None,
    });
}

/// Where a supervisor forwards signals: a pid, or a process group when
/// negative.
static INNER: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: nix::libc::c_int) {
    let pid = INNER.load(Ordering::Relaxed);
    if pid != 0 {
        // SAFETY: kill(2) is async-signal-safe; the arguments are plain ints.
        #[allow(unsafe_code)]
        unsafe {
            nix::libc::kill(pid, sig);
        }
    }
}

/// Where the signals [`forward_signals`] handles go from now on: a pid,
/// or a process group when negative (none while 0).
pub(crate) fn forward_to(pid: i32) {
    INNER.store(pid, Ordering::Relaxed);
}

/// Handles the signals a supervisor passes on (to [`forward_to`]'s
/// target). A namespace's pid 1 gets no other signal than those it
/// handles, and SIGKILL.
pub(crate) fn forward_signals() {
    let act = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGCONT,
    ] {
        // SAFETY: `forward` is async-signal-safe (an atomic load and kill).
        #[allow(unsafe_code)]
        unsafe {
            let _ = signal::sigaction(s, &act);
        }
    }
}

/// How a supervisor learns or passes on the true end of the command.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Report {
    /// The outer supervisor reads pid 1's report from this pipe.
    Read(i32),
    /// pid 1 writes its report to this pipe.
    Write(i32),
}

/// The end a supervisor reports early ([`Plan::report_end_to`]) as a
/// wait status (`ExitStatus::from_raw`); `None` for bytes that are not
/// such a report.
pub fn end_status(report: [u8; 2]) -> Option<i32> {
    match report {
        // As wait(2) encodes them: the code in the second byte, or the
        // signal in the first.
        [0, code] => Some(i32::from(code) << 8),
        [1, sig] => Some(i32::from(sig)),
        _ => None,
    }
}

/// Closes every descriptor of this process but `keep` (at most two),
/// stdin, stdout and stderr included. Async-signal-safe.
fn close_all_but(keep: [Option<i32>; 2]) {
    let (a, b) = match keep {
        [Some(x), Some(y)] => (x.min(y), Some(x.max(y))),
        [Some(x), None] | [None, Some(x)] => (x, None),
        [None, None] => (-1, None),
    };
    let mut from = 0u32;
    for k in [Some(a), b].into_iter().flatten() {
        if let Ok(k) = u32::try_from(k) {
            if k > from {
                // SAFETY: close_range(2) only closes descriptors of this
                // process.
                #[allow(unsafe_code)]
                unsafe {
                    nix::libc::close_range(from, k - 1, 0);
                }
            }
            from = from.max(k + 1);
        }
    }
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::close_range(from, u32::MAX, 0);
    }
}

/// A supervisor: forwards signals to `child`, dies with its own parent
/// (`SIGKILL`), reaps (every orphan too, when `reap_all`), and ends as the
/// command ended, telling `early` first when given (pid 1 tells it beside
/// its report, the outer supervisor once it has read that report).
pub(crate) fn supervise(
    child: nix::unistd::Pid,
    reap_all: bool,
    report: Report,
    early: Option<i32>,
) -> ! {
    // The outer supervisor signals pid 1; pid 1 signals the command's
    // process group.
    let target_pid = if reap_all {
        -child.as_raw()
    } else {
        child.as_raw()
    };
    forward_to(target_pid);
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // Keep only the report pipes. The spawner's exec-status pipe then
    // sees the command's exec, not our lifetime, and the command's output
    // ends when the command's processes close it, not when we exit.
    let fd = match report {
        Report::Read(fd) | Report::Write(fd) => fd,
    };
    close_all_but([Some(fd), early]);
    forward_signals();
    let target = if reap_all {
        nix::unistd::Pid::from_raw(-1)
    } else {
        child
    };
    let wait_child = || loop {
        match waitpid(target, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => break (0u8, code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => break (1u8, sig as i32),
            Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
            Err(_) => exit_now(125),
        }
    };
    let tell = |fd: i32, kind: u8, value: i32| {
        let buf = [kind, value as u8];
        // SAFETY: write(2) on a descriptor we kept, from a local buffer.
        #[allow(unsafe_code)]
        unsafe {
            nix::libc::write(fd, buf.as_ptr().cast(), 2);
        }
    };
    let (kind, value) = match report {
        Report::Write(fd) => {
            let (kind, value) = wait_child();
            // (Only as pid 1 of a namespace of our own: there, -1 is the
            // task's processes and nothing else.)
            if reap_all && nix::unistd::getpid().as_raw() == 1 {
                let any = nix::unistd::Pid::from_raw(-1);
                // What the command left running dies now and is reaped,
                // before the end is told: once it is, nothing of the task
                // runs or writes. (Our own exit then only tears the
                // namespaces down, which nobody waits for.) Every process
                // of the namespace descends from us (its orphans are ours),
                // so with no child left there is none: kill(-1) walks
                // every process of the machine, and is spared then.
                let none_left = matches!(
                    waitpid(any, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
                    Err(nix::errno::Errno::ECHILD)
                );
                if !none_left {
                    let _ = signal::kill(any, Signal::SIGKILL);
                    while let Ok(_) | Err(nix::errno::Errno::EINTR) = waitpid(any, None) {}
                }
            }
            tell(fd, kind, value);
            if let Some(e) = early {
                tell(e, kind, value);
            }
            (kind, value)
        }
        Report::Read(fd) => {
            // Told as soon as pid 1 says it, not once it has exited (its
            // exit tears its namespaces down: mounts, /proc).
            let mut buf = [0u8; 2];
            let n = loop {
                // SAFETY: read(2) into a local buffer from our own pipe.
                #[allow(unsafe_code)]
                let n = unsafe { nix::libc::read(fd, buf.as_mut_ptr().cast(), 2) };
                if n >= 0 || nix::errno::Errno::last() != nix::errno::Errno::EINTR {
                    break n;
                }
            };
            let told = (n == 2).then(|| (buf[0], i32::from(buf[1])));
            // Killed before it could say (or it never ran): as it died.
            let end = told.unwrap_or_else(wait_child);
            if let Some(e) = early {
                tell(e, end.0, end.1);
            }
            if told.is_some() {
                wait_child();
            }
            end
        }
    };
    if kind == 1 {
        if let Ok(sig) = Signal::try_from(value) {
            // Die of the same signal, so our parent sees what happened.
            // SAFETY: resetting a disposition and raising are
            // async-signal-safe.
            #[allow(unsafe_code)]
            unsafe {
                let _ = signal::signal(sig, SigHandler::SigDfl);
            }
            let _ = signal::raise(sig);
        }
        exit_now(128 + value)
    }
    exit_now(value)
}

/// Ends this process at once, without running exit handlers (which belong
/// to the agent we were forked from).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) is async-signal-safe and never returns.
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::_exit(code)
    }
}

/// Brings up `lo` in the current network namespace.
pub(crate) fn loopback_up() -> io::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let s = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: `ifreq` is plain data, zero is a valid value for every field;
    // the ioctls read and write only that struct; the socket is ours.
    #[allow(unsafe_code)]
    unsafe {
        let mut ifr: nix::libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as nix::libc::c_char;
        ifr.ifr_name[1] = b'o' as nix::libc::c_char;
        if nix::libc::ioctl(s.as_raw_fd(), nix::libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= nix::libc::IFF_UP as nix::libc::c_short;
        if nix::libc::ioctl(s.as_raw_fd(), nix::libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Removes the run directory of a finished workspace. Its mounts lived in
/// the workspace's mount namespace and went with it.
///
/// # Errors
/// The directory could not be removed.
pub fn cleanup(spec: &Spec) -> io::Result<()> {
    remove_all(&spec.run_dir)
}

/// Removes the directory tree at `path`, or the file there (absent is
/// fine). An agent that is not root cannot list a directory without read
/// permission, and the overlay leaves its work directory at mode 0 (as a
/// task may leave its own): such directories, which the agent owns, are
/// opened up first.
///
/// # Errors
/// What could still not be removed.
pub fn remove_all(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            open_up(path);
            match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Gives the owner rwx on every directory under `dir` (not following
/// links).
fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                open_up(&e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn trees_with_closed_directories_are_removed() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("shoal-rmall-{}", std::process::id()));
        std::fs::create_dir_all(d.join("work/work/inner")).unwrap();
        std::fs::write(d.join("work/work/inner/f"), "x").unwrap();
        for p in ["work/work/inner", "work/work"] {
            std::fs::set_permissions(d.join(p), std::fs::Permissions::from_mode(0o000)).unwrap();
        }
        // As root (who reads any directory), as the user who owns the
        // tree, the way an agent that is not root removes it.
        let nobody = 65534;
        if nix::unistd::geteuid().is_root() {
            for e in [
                "",
                "work",
                "work/work",
                "work/work/inner",
                "work/work/inner/f",
            ] {
                let p = d.join(e);
                std::os::unix::fs::chown(&p, Some(nobody), Some(nobody)).unwrap();
            }
        }
        let (dd, plain) = (d.clone(), d.clone());
        let as_owner = |f: Box<dyn FnOnce() -> std::io::Result<()> + Send>| {
            if nix::unistd::geteuid().is_root() {
                crate::creds::as_user(nobody, f).unwrap()
            } else {
                f()
            }
        };
        // Plainly, it cannot list the closed directories.
        assert!(as_owner(Box::new(move || std::fs::remove_dir_all(&plain))).is_err());
        as_owner(Box::new(move || super::remove_all(&dd))).unwrap();
        assert!(!d.exists());
        super::remove_all(&d).unwrap();
        // A file is removed as a tree is.
        std::fs::write(&d, "x").unwrap();
        super::remove_all(&d).unwrap();
        assert!(std::fs::symlink_metadata(&d).is_err());
    }
}
