//! Cgroups: the resource quantum of a task (CPU, memory, pids), its
//! freezer, its kill switch and its accounting, on cgroup v1 and v2.
//!
//! ```text
//!  v1: /sys/fs/cgroup/{cpu,cpuacct,memory,pids,freezer}/<parent>/<name>/
//!  v2: /sys/fs/cgroup/<parent>/<name>/
//! ```
//!
//! Every task's cgroup lives under one parent group (`shoal` in the agent),
//! so that an agent restarting finds and removes what its previous life left
//! ([`CgroupManager::list`]). The rest of the agent sees only the
//! [`CgroupManager`] trait; [`fake::Recording`] stands in for it in tests
//! that run without root.

pub mod fake;
mod probe;
mod v1;
mod v2;

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use probe::{detect, probe_cgroups, CgroupVersion};
pub use v1::V1;
pub use v2::V2;

/// Why a cgroup operation failed. A failed `create` removes what it made;
/// other failures leave the cgroup as it was.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a usable v2 nor the v1 controllers were found.
    #[error("no usable cgroup hierarchy under {0}")]
    NotFound(PathBuf),
    /// A directory or control file could not be created, read or written.
    #[error("{path}: {source}")]
    Io {
        /// What was being touched.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A name with a path separator or other character we do not allow.
    #[error("invalid cgroup name {0:?} (letters, digits, '-', '_', '.' only)")]
    BadName(String),
    /// A limit outside what the kernel accepts.
    #[error("invalid limit: {0}")]
    BadLimit(String),
    /// The cgroup already exists.
    #[error("cgroup {0} already exists")]
    Exists(String),
    /// Processes were still alive after the kill and the wait.
    #[error("cgroup {0} still has processes after SIGKILL")]
    Busy(String),
    /// The freezer did not reach the wanted state in time.
    #[error("cgroup {0} did not {1} in time")]
    Freeze(String, &'static str),
    /// This hierarchy cannot do that.
    #[error("{0} is not supported on this cgroup hierarchy")]
    Unsupported(&'static str),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// Reads `key value` lines (cpu.stat, memory.events, memory.oom_control).
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// Process ids listed in a `cgroup.procs` file.
pub(crate) fn procs(path: &Path) -> Result<Vec<u32>, CgroupError> {
    Ok(read(path)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Removes a cgroup directory, retrying while the kernel still reports it
/// busy (processes that were just killed are reaped asynchronously).
pub(crate) fn rmdir(path: &Path) -> Result<(), CgroupError> {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < end && e.raw_os_error() == Some(nix::libc::EBUSY) => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(io_err(path)(e)),
        }
    }
}

/// Checks a cgroup name: one path component of safe characters.
pub fn check_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_owned()))
    }
}

/// A parent group: one or more safe names joined by `/` (a subtree
/// delegated to the agent's user, say `shoal/alice`).
///
/// # Errors
/// An empty, absolute or unsafe path.
pub fn check_parent(parent: &str) -> Result<(), CgroupError> {
    if parent.split('/').all(|c| check_name(c).is_ok()) {
        Ok(())
    } else {
        Err(CgroupError::BadName(parent.to_owned()))
    }
}

/// The resource quantum of one task. `None` means no limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// CPUs' worth of time (1.5 = one and a half cores), as a CFS quota
    /// over a 100 ms period.
    pub cpus: Option<f64>,
    /// Relative CPU weight, 1–10000 (cgroup v2's scale, 100 = default).
    pub cpu_weight: Option<u32>,
    /// Memory limit, bytes; the kernel OOM-kills inside the group past it.
    pub memory_bytes: Option<u64>,
    /// Most processes and threads at once.
    pub pids: Option<u32>,
}

/// CFS period for the CPU quota.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The CFS quota of `cpus` CPUs over [`CPU_PERIOD_US`].
pub(crate) fn quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

/// Checks a CPU count for [`CgroupManager::set_cpus`].
pub(crate) fn check_cpus(cpus: Option<f64>) -> Result<(), CgroupError> {
    Limits {
        cpus,
        ..Limits::default()
    }
    .validate()
}

impl Limits {
    /// Checks the values against what the kernel accepts.
    ///
    /// # Errors
    /// A value out of range, naming it.
    pub fn validate(&self) -> Result<(), CgroupError> {
        if let Some(c) = self.cpus {
            if !(c.is_finite() && (0.01..=4096.0).contains(&c)) {
                return Err(CgroupError::BadLimit(format!("cpus {c} (0.01 to 4096)")));
            }
        }
        if let Some(w) = self.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return Err(CgroupError::BadLimit(format!(
                    "cpu weight {w} (1 to 10000)"
                )));
            }
        }
        if let Some(m) = self.memory_bytes {
            if m < 1 << 20 {
                return Err(CgroupError::BadLimit(format!(
                    "memory {m} bytes (at least 1 MiB)"
                )));
            }
        }
        if let Some(p) = self.pids {
            if p == 0 {
                return Err(CgroupError::BadLimit("pids 0 (at least 1)".into()));
            }
        }
        Ok(())
    }

    /// The CFS quota for [`CPU_PERIOD_US`], if any.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        self.cpus.map(quota_us)
    }
}

/// What a cgroup consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time, microseconds (user + system).
    pub cpu_usec: u64,
    /// Peak memory, bytes, where the kernel records it.
    pub memory_peak_bytes: Option<u64>,
    /// Processes the kernel OOM-killed inside the group.
    pub oom_kills: u64,
}

/// A group's usage counters held open: read again with one `pread` each,
/// without the path walks of opening them (a warm slot's, read at the end
/// of each of its tasks, on the way to telling the submitter). Only cgroup
/// v1 has them (its files are read whole); they are opened and read there.
#[derive(Debug)]
pub struct Counters {
    cpu_ns: fs::File,
    peak: Option<fs::File>,
    oom_control: Option<fs::File>,
}

/// The narrow interface the rest of shoal uses for cgroups.
pub trait CgroupManager: fmt::Debug + Send + Sync {
    /// v1 or v2.
    fn version(&self) -> CgroupVersion;
    /// Creates cgroup `name` with `limits`.
    ///
    /// # Errors
    /// Bad name or limits, exists already, or the kernel refused.
    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError>;
    /// Moves process `pid` into `name`.
    ///
    /// # Errors
    /// No such cgroup or process.
    fn attach(&self, name: &str, pid: u32) -> Result<(), CgroupError>;
    /// Freezes (true) or thaws (false) every process in `name`, waiting until
    /// the kernel reports it done.
    ///
    /// # Errors
    /// No freezer, or it did not settle within a second.
    fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), CgroupError>;
    /// The processes in `name`.
    ///
    /// # Errors
    /// No such cgroup.
    fn pids(&self, name: &str) -> Result<Vec<u32>, CgroupError>;
    /// SIGKILLs every process in `name` (frozen ones too) and waits until
    /// the group is empty.
    ///
    /// # Errors
    /// Processes survived.
    fn kill_all(&self, name: &str) -> Result<(), CgroupError>;
    /// What `name` consumed so far.
    ///
    /// # Errors
    /// No such cgroup.
    fn usage(&self, name: &str) -> Result<Usage, CgroupError>;
    /// Kills what is left in `name` and removes it. Removing a cgroup that
    /// does not exist succeeds.
    ///
    /// # Errors
    /// Processes survived, or the kernel refused the removal.
    fn remove(&self, name: &str) -> Result<(), CgroupError>;
    /// The names of the cgroups under this manager's parent.
    ///
    /// # Errors
    /// The parent cannot be read.
    fn list(&self) -> Result<Vec<String>, CgroupError>;
    /// Removes every cgroup under the parent, then the parent itself.
    ///
    /// # Errors
    /// A group could not be emptied or removed.
    fn destroy(&self) -> Result<(), CgroupError> {
        for n in self.list()? {
            self.remove(&n)?;
        }
        self.remove_parent()
    }
    /// Removes the (empty) parent directory.
    ///
    /// # Errors
    /// The kernel refused.
    fn remove_parent(&self) -> Result<(), CgroupError>;
    /// The `cgroup.procs` files a process writes `0` to in order to move
    /// itself into `name` (one per hierarchy).
    fn procs_files(&self, name: &str) -> Vec<PathBuf>;
    /// Sets `name`'s CPU quota to `cpus` (`None`: no quota). Throttling
    /// and its end.
    ///
    /// # Errors
    /// Out of range, no such cgroup, or the kernel refused.
    fn set_cpus(&self, name: &str, cpus: Option<f64>) -> Result<(), CgroupError>;
    /// Puts every guest at the idle class, on the parent group (so guests
    /// yield to everything outside it): `cpu.idle` where the kernel has
    /// it, else the smallest weight; on v1 also a memory soft limit of 0,
    /// so reclaim takes from guests first.
    ///
    /// # Errors
    /// The parent cannot be made or written.
    fn guest_class(&self) -> Result<GuestClass, CgroupError>;
    /// CPU time used by every guest together (the parent group), µs.
    ///
    /// # Errors
    /// The parent's counter cannot be read.
    fn parent_cpu_usec(&self) -> Result<u64, CgroupError>;
    /// Sets every limit of `name`, a group that already has processes in
    /// it (a warm slot's spawner), for its next task (`None`: none).
    /// `last`: the limits the group has now (set by its creation or the
    /// last `reuse`), when known; the memory, pids and weight limits equal
    /// to those are not written again (the CPU quota always is: the
    /// owner's policy changes it while a task runs).
    ///
    /// # Errors
    /// Bad limits, no such cgroup, the kernel refused (a memory limit below
    /// what cannot be reclaimed), or a hierarchy whose groups are not
    /// reused (cgroup v2).
    fn reuse(&self, name: &str, limits: &Limits, last: Option<&Limits>) -> Result<(), CgroupError> {
        let _ = (name, limits, last);
        Err(CgroupError::Unsupported("reusing a group"))
    }
    /// Restarts the CPU and peak-memory counters of `name` (a warm slot
    /// between two tasks), and returns its OOM kills so far, a counter the
    /// kernel cannot restart.
    ///
    /// # Errors
    /// No such cgroup, or a hierarchy whose counters cannot be restarted
    /// (cgroup v2).
    fn restart(&self, name: &str) -> Result<u64, CgroupError> {
        let _ = name;
        Err(CgroupError::Unsupported("restarting a group's counters"))
    }
    /// `name`'s usage counters, held open ([`Counters`]), where this
    /// hierarchy has them in files read whole (cgroup v1).
    ///
    /// # Errors
    /// No such cgroup, or not supported here.
    fn open_counters(&self, name: &str) -> Result<Counters, CgroupError> {
        let _ = name;
        Err(CgroupError::Unsupported("counters held open"))
    }
    /// Sends `signal` to every process in `name` (SIGTERM on eviction).
    ///
    /// # Errors
    /// No such cgroup.
    fn signal_all(&self, name: &str, signal: nix::sys::signal::Signal) -> Result<(), CgroupError> {
        for p in self.pids(name)? {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), signal);
        }
        Ok(())
    }
}

/// How guests were put at the idle class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestClass {
    /// The parent group has `cpu.idle = 1` (SCHED_IDLE for the group).
    CpuIdle,
    /// No `cpu.idle` here: the parent has the smallest weight, and each
    /// guest also runs under `SCHED_IDLE`.
    MinWeight,
}

/// Makes `cmd`'s child move itself into cgroup `name` before it execs, so
/// that nothing it does escapes the quantum (not even its first
/// allocation).
///
/// # Errors
/// A path with a NUL byte (impossible for names that pass [`check_name`]).
pub fn spawn_into(
    cmd: &mut std::process::Command,
    manager: &dyn CgroupManager,
    name: &str,
) -> Result<(), CgroupError> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    check_name(name)?;
    let files = manager.procs_files(name);
    // SAFETY: the closure runs in the child between fork and exec. It only
    // opens, writes and closes files whose paths were prepared before the
    // fork (std converts paths under 384 bytes to C strings on the stack,
    // and cgroup paths are far shorter); it takes no lock.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            for f in &files {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(f)?
                    .write_all(b"0")?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// The manager for the hierarchy at `root` (normally `/sys/fs/cgroup`),
/// with every group under `parent`.
///
/// # Errors
/// No usable hierarchy, or a bad parent name.
pub fn open(root: &Path, parent: &str) -> Result<Box<dyn CgroupManager>, CgroupError> {
    check_parent(parent)?;
    match detect(root) {
        Some(CgroupVersion::V1) => Ok(Box::new(V1::new(root, parent))),
        Some(CgroupVersion::V2) => Ok(Box::new(V2::new(root, parent)?)),
        None => Err(CgroupError::NotFound(root.to_owned())),
    }
}

/// Waits up to a second for `done` to hold, polling every millisecond.
pub(crate) fn settle(
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<bool, CgroupError> {
    let end = Instant::now() + Duration::from_secs(1);
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() > end {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_safe_component() {
        assert!(check_name("task-12_a.b").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "../x", "é"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_validate_and_quota() {
        let l = Limits {
            cpus: Some(1.5),
            ..Limits::default()
        };
        assert_eq!(l.cpu_quota_us(), Some(150_000));
        assert!(l.validate().is_ok());
        for bad in [
            Limits {
                cpus: Some(0.0),
                ..Limits::default()
            },
            Limits {
                cpus: Some(f64::NAN),
                ..Limits::default()
            },
            Limits {
                cpu_weight: Some(0),
                ..Limits::default()
            },
            Limits {
                memory_bytes: Some(4096),
                ..Limits::default()
            },
            Limits {
                pids: Some(0),
                ..Limits::default()
            },
        ] {
            let e = bad.validate().unwrap_err();
            assert!(matches!(e, CgroupError::BadLimit(_)), "{e}");
        }
    }

    #[test]
    fn keyed_reads_kernel_stat_files() {
        let t = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(keyed(t, "usage_usec"), Some(1234));
        assert_eq!(
            keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"),
            Some(2)
        );
        assert_eq!(keyed(t, "nope"), None);
    }
}
