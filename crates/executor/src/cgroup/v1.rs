//! cgroup v1: one directory per controller hierarchy.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{
    check_cpus, check_name, io_err, keyed, procs, quota_us, read, rmdir, settle, write,
    CgroupError, CgroupManager, CgroupVersion, Counters, GuestClass, Limits, Usage, CPU_PERIOD_US,
};

/// A v1 group's counters: CPU time (ns), peak memory (bytes), and the
/// OOM state with its `oom_kill` count.
const CPU_USAGE: &str = "cpuacct.usage";
const MEM_PEAK: &str = "memory.max_usage_in_bytes";
const OOM_CONTROL: &str = "memory.oom_control";

/// The controllers a task's group is made in (`cpuacct` is often the same
/// hierarchy as `cpu`; making it twice is harmless).
const CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "freezer"];

/// A cgroup v1 manager.
#[derive(Debug, Clone)]
pub struct V1 {
    root: PathBuf,
    parent: String,
}

impl V1 {
    /// Groups under `root/<controller>/<parent>/`.
    pub fn new(root: &Path, parent: &str) -> Self {
        Self {
            root: root.to_owned(),
            parent: parent.to_owned(),
        }
    }

    fn dir(&self, controller: &str, name: &str) -> PathBuf {
        self.root.join(controller).join(&self.parent).join(name)
    }

    /// Controller directories of `name`, one per distinct hierarchy.
    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for c in CONTROLLERS {
            let base = self.root.join(c);
            let real = fs::canonicalize(&base).unwrap_or(base);
            if !seen.contains(&real) {
                seen.push(real);
                out.push(self.dir(c, name));
            }
        }
        out
    }

    fn create_inner(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        for d in self.dirs(name) {
            if let Some(p) = d.parent() {
                fs::create_dir_all(p).map_err(io_err(p))?;
            }
            match fs::create_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(CgroupError::Exists(name.to_owned()))
                }
                Err(e) => return Err(io_err(&d)(e)),
            }
        }
        let cpu = self.dir("cpu", name);
        if let Some(q) = limits.cpu_quota_us() {
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&cpu.join("cpu.cfs_quota_us"), &q.to_string())?;
        }
        if let Some(w) = limits.cpu_weight {
            // v2 weight 100 = v1 shares 1024.
            let shares = (u64::from(w) * 1024 / 100).clamp(2, 262_144);
            write(&cpu.join("cpu.shares"), &shares.to_string())?;
        }
        if let Some(m) = limits.memory_bytes {
            let mem = self.dir("memory", name);
            write(&mem.join("memory.limit_in_bytes"), &m.to_string())?;
            // Swap would let a task run past its quantum.
            let memsw = mem.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &m.to_string())?;
            }
        }
        if let Some(p) = limits.pids {
            write(&self.dir("pids", name).join("pids.max"), &p.to_string())?;
        }
        Ok(())
    }
}

/// At most this many processes of a task being killed are moved out of
/// the guests' idle group (see [`V1::lift_idle`]).
const LIFT_AT_MOST: usize = 16;

impl V1 {
    /// Dying takes CPU (a process gives back its memory, its namespaces'
    /// mounts go), which a task's processes, at the guests' idle class, may
    /// wait seconds for on a machine whose cores are all taken (seen: a
    /// SIGKILLed `sleep` still there 10 s later, with its workspace). So,
    /// before they are killed, each thread's policy goes back to the
    /// ordinary one and each process leaves the guests' idle group for the
    /// cpu hierarchy's root (the other hierarchies keep it, so the kill
    /// still finds it). Before: a process already exiting can no longer be
    /// moved. A move costs an RCU grace period here, so a task with many
    /// processes has only its first few moved.
    fn lift_idle(&self, name: &str) {
        let freezer = self.dir("freezer", name);
        for tid in procs(&freezer.join("tasks")).unwrap_or_default() {
            let _ = crate::workspace::ordinary_class(tid);
        }
        let root = self.root.join("cpu").join("cgroup.procs");
        for pid in procs(&freezer.join("cgroup.procs"))
            .unwrap_or_default()
            .into_iter()
            .take(LIFT_AT_MOST)
        {
            let _ = write(&root, &pid.to_string());
        }
    }
}

impl CgroupManager for V1 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        check_name(name)?;
        limits.validate()?;
        let r = self.create_inner(name, limits);
        if r.is_err() && !matches!(r, Err(CgroupError::Exists(_))) {
            for d in self.dirs(name) {
                let _ = fs::remove_dir(d);
            }
        }
        r
    }

    fn attach(&self, name: &str, pid: u32) -> Result<(), CgroupError> {
        check_name(name)?;
        for d in self.dirs(name) {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn reuse(&self, name: &str, limits: &Limits, last: Option<&Limits>) -> Result<(), CgroupError> {
        check_name(name)?;
        limits.validate()?;
        // (Each write costs tens of microseconds on the task's path.)
        let cpu = self.dir("cpu", name);
        if last.is_none() {
            // (Whoever writes it writes this same period.)
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        }
        let quota = limits
            .cpu_quota_us()
            .map_or_else(|| "-1".to_owned(), |q| q.to_string());
        write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
        if last.is_none_or(|l| l.cpu_weight != limits.cpu_weight) {
            let shares = limits
                .cpu_weight
                .map_or(1024, |w| (u64::from(w) * 1024 / 100).clamp(2, 262_144));
            write(&cpu.join("cpu.shares"), &shares.to_string())?;
        }
        let mem = self.dir("memory", name);
        if last.is_none_or(|l| l.memory_bytes != limits.memory_bytes) {
            // memory+swap may never be below memory: lift it first.
            let memsw = mem.join("memory.memsw.limit_in_bytes");
            let has_memsw = memsw.exists();
            if has_memsw {
                write(&memsw, "-1")?;
            }
            let m = limits
                .memory_bytes
                .map_or_else(|| "-1".to_owned(), |m| m.to_string());
            write(&mem.join("memory.limit_in_bytes"), &m)?;
            if has_memsw && limits.memory_bytes.is_some() {
                write(&memsw, &m)?;
            }
        }
        if last.is_none_or(|l| l.pids != limits.pids) {
            let pids = limits
                .pids
                .map_or_else(|| "max".to_owned(), |p| p.to_string());
            write(&self.dir("pids", name).join("pids.max"), &pids)?;
        }
        Ok(())
    }

    fn restart(&self, name: &str) -> Result<u64, CgroupError> {
        check_name(name)?;
        let mem = self.dir("memory", name);
        write(&self.dir("cpuacct", name).join(CPU_USAGE), "0")?;
        write(&mem.join(MEM_PEAK), "0")?;
        Ok(read(&mem.join(OOM_CONTROL)).map_or(0, |s| oom_kills(&s)))
    }

    fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), CgroupError> {
        check_name(name)?;
        let state = self.dir("freezer", name).join("freezer.state");
        let want = if frozen { "FROZEN" } else { "THAWED" };
        write(&state, want)?;
        if settle(|| Ok(read(&state)?.trim() == want))? {
            Ok(())
        } else {
            Err(CgroupError::Freeze(
                name.to_owned(),
                if frozen { "freeze" } else { "thaw" },
            ))
        }
    }

    fn pids(&self, name: &str) -> Result<Vec<u32>, CgroupError> {
        check_name(name)?;
        procs(&self.dir("freezer", name).join("cgroup.procs"))
    }

    fn kill_all(&self, name: &str) -> Result<(), CgroupError> {
        check_name(name)?;
        // v1 has no cgroup.kill: freeze so nothing forks while we kill,
        // SIGKILL every member, thaw so the kills are delivered.
        let start = Instant::now();
        // (Once, before the first kill; nothing to move in an empty group.)
        self.lift_idle(name);
        loop {
            let pids = self.pids(name)?;
            if pids.is_empty() {
                return Ok(());
            }
            let _ = self.set_frozen(name, true);
            for p in self.pids(name)? {
                let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
            }
            self.set_frozen(name, false)?;
            if start.elapsed() > Duration::from_secs(2) {
                return Err(CgroupError::Busy(name.to_owned()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn usage(&self, name: &str) -> Result<Usage, CgroupError> {
        check_name(name)?;
        let acct = self.dir("cpuacct", name).join(CPU_USAGE);
        let cpu = read(&acct)?;
        let mem = self.dir("memory", name);
        let peak = read(&mem.join(MEM_PEAK)).ok();
        let oom = read(&mem.join(OOM_CONTROL)).ok();
        Ok(usage_from(&cpu, peak.as_deref(), oom.as_deref()))
    }

    fn open_counters(&self, name: &str) -> Result<Counters, CgroupError> {
        check_name(name)?;
        Counters::open_v1(&self.dir("cpuacct", name), &self.dir("memory", name))
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        check_name(name)?;
        if !self.dir("freezer", name).exists() {
            for d in self.dirs(name) {
                rmdir(&d)?;
            }
            return Ok(());
        }
        self.kill_all(name)?;
        for d in self.dirs(name) {
            rmdir(&d)?;
        }
        Ok(())
    }

    fn remove_parent(&self) -> Result<(), CgroupError> {
        for c in CONTROLLERS {
            rmdir(&self.root.join(c).join(&self.parent))?;
        }
        Ok(())
    }

    fn set_cpus(&self, name: &str, cpus: Option<f64>) -> Result<(), CgroupError> {
        check_name(name)?;
        check_cpus(cpus)?;
        let q = cpus.map_or_else(|| "-1".to_owned(), |c| quota_us(c).to_string());
        let cpu = self.dir("cpu", name);
        write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        write(&cpu.join("cpu.cfs_quota_us"), &q)
    }

    fn guest_class(&self) -> Result<GuestClass, CgroupError> {
        for c in CONTROLLERS {
            let d = self.root.join(c).join(&self.parent);
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let cpu = self.root.join("cpu").join(&self.parent);
        let class = if cpu.join("cpu.idle").exists() {
            write(&cpu.join("cpu.idle"), "1")?;
            GuestClass::CpuIdle
        } else {
            write(&cpu.join("cpu.shares"), "2")?;
            GuestClass::MinWeight
        };
        let soft = self
            .root
            .join("memory")
            .join(&self.parent)
            .join("memory.soft_limit_in_bytes");
        if soft.exists() {
            write(&soft, "0")?;
        }
        Ok(class)
    }

    fn parent_cpu_usec(&self) -> Result<u64, CgroupError> {
        let acct = self.root.join("cpuacct").join(&self.parent).join(CPU_USAGE);
        Ok(cpu_usec(&read(&acct)?))
    }

    fn procs_files(&self, name: &str) -> Vec<PathBuf> {
        self.dirs(name)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = Vec::new();
        for c in ["freezer", "memory", "cpu", "pids"] {
            let dir = self.root.join(c).join(&self.parent);
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

/// A v1 group's usage from the text of its `cpuacct.usage` and, where read,
/// `memory.max_usage_in_bytes` and `memory.oom_control`.
fn usage_from(cpu_ns: &str, peak: Option<&str>, oom_control: Option<&str>) -> Usage {
    Usage {
        cpu_usec: cpu_usec(cpu_ns),
        memory_peak_bytes: peak.and_then(|s| s.trim().parse().ok()),
        oom_kills: oom_control.map_or(0, oom_kills),
    }
}

/// Microseconds from the text of a `cpuacct.usage` (nanoseconds).
fn cpu_usec(cpu_ns: &str) -> u64 {
    cpu_ns.trim().parse::<u64>().unwrap_or(0) / 1000
}

/// The `oom_kill` count from the text of a `memory.oom_control`.
fn oom_kills(oom_control: &str) -> u64 {
    keyed(oom_control, "oom_kill").unwrap_or(0)
}

impl Counters {
    /// Opens `memory.max_usage_in_bytes` and `memory.oom_control` of a v1
    /// memory group (where present) and `cpuacct.usage`.
    fn open_v1(cpuacct: &Path, memory: &Path) -> Result<Self, CgroupError> {
        let acct = cpuacct.join(CPU_USAGE);
        Ok(Self {
            cpu_ns: fs::File::open(&acct).map_err(io_err(&acct))?,
            peak: fs::File::open(memory.join(MEM_PEAK)).ok(),
            oom_control: fs::File::open(memory.join(OOM_CONTROL)).ok(),
        })
    }

    /// What they say now.
    ///
    /// # Errors
    /// `cpuacct.usage` could not be read (its group is gone).
    pub fn usage(&self) -> io::Result<Usage> {
        fn text(f: &fs::File) -> io::Result<String> {
            use std::os::unix::fs::FileExt;
            // (Each is a line or three: a number, or `oom_kill N` among
            // two other keys.)
            let mut buf = [0u8; 512];
            let n = f.read_at(&mut buf, 0)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
        let cpu = text(&self.cpu_ns)?;
        let peak = self.peak.as_ref().and_then(|f| text(f).ok());
        let oom = self.oom_control.as_ref().and_then(|f| text(f).ok());
        Ok(usage_from(&cpu, peak.as_deref(), oom.as_deref()))
    }
}
