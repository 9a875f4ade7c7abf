//! cgroup v2: one unified hierarchy.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{
    check_cpus, check_name, io_err, keyed, procs, quota_us, read, rmdir, settle, write,
    CgroupError, CgroupManager, CgroupVersion, GuestClass, Limits, Usage, CPU_PERIOD_US,
};

/// A cgroup v2 manager.
#[derive(Debug, Clone)]
pub struct V2 {
    parent: PathBuf,
}

/// Enables the cpu, memory and pids controllers for the children of `dir`,
/// where not yet (a level already delegated is not written). A missing
/// control file reads as none enabled; any other read error is one.
pub(super) fn delegate(dir: &Path) -> Result<(), CgroupError> {
    let ctl = dir.join("cgroup.subtree_control");
    let enabled = match fs::read_to_string(&ctl) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(&ctl)(e)),
    };
    for c in ["cpu", "memory", "pids"] {
        if !enabled.split_whitespace().any(|w| w == c) {
            write(&ctl, &format!("+{c}"))?;
        }
    }
    Ok(())
}

impl V2 {
    /// Groups under `root/<parent>/`; makes the parent and delegates the
    /// controllers to it.
    ///
    /// # Errors
    /// The parent cannot be made or the controllers cannot be enabled.
    pub fn new(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        // Every group from the root down to the parent hands the
        // controllers on (those above a delegated subtree already do).
        let mut at = root.to_owned();
        delegate(&at)?;
        for c in parent.split('/') {
            at.push(c);
            if !at.is_dir() {
                fs::create_dir(&at).map_err(io_err(&at))?;
            }
            delegate(&at)?;
        }
        Ok(Self { parent: at })
    }

    /// A manager over an existing directory without touching the root
    /// (tests over a plain directory).
    pub fn at(parent: &Path) -> Self {
        Self {
            parent: parent.to_owned(),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.parent.join(name)
    }

    fn create_inner(&self, d: &Path, limits: &Limits) -> Result<(), CgroupError> {
        if let Some(q) = limits.cpu_quota_us() {
            write(&d.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
        }
        if let Some(w) = limits.cpu_weight {
            write(&d.join("cpu.weight"), &w.to_string())?;
        }
        if let Some(m) = limits.memory_bytes {
            write(&d.join("memory.max"), &m.to_string())?;
            let swap = d.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        if let Some(p) = limits.pids {
            write(&d.join("pids.max"), &p.to_string())?;
        }
        Ok(())
    }
}

impl CgroupManager for V2 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        check_name(name)?;
        limits.validate()?;
        let d = self.dir(name);
        match fs::create_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CgroupError::Exists(name.to_owned()))
            }
            Err(e) => return Err(io_err(&d)(e)),
        }
        let r = self.create_inner(&d, limits);
        if r.is_err() {
            let _ = fs::remove_dir(&d);
        }
        r
    }

    fn attach(&self, name: &str, pid: u32) -> Result<(), CgroupError> {
        check_name(name)?;
        write(&self.dir(name).join("cgroup.procs"), &pid.to_string())
    }

    fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), CgroupError> {
        check_name(name)?;
        let d = self.dir(name);
        write(&d.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
        let want = if frozen { 1 } else { 0 };
        let events = d.join("cgroup.events");
        if settle(|| Ok(keyed(&read(&events)?, "frozen") == Some(want)))? {
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
        procs(&self.dir(name).join("cgroup.procs"))
    }

    fn kill_all(&self, name: &str) -> Result<(), CgroupError> {
        check_name(name)?;
        let d = self.dir(name);
        let killer = d.join("cgroup.kill");
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let pids = self.pids(name)?;
            if pids.is_empty() {
                return Ok(());
            }
            if killer.exists() {
                write(&killer, "1")?;
            } else {
                for p in pids {
                    let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
                }
            }
            if Instant::now() > end {
                return Err(CgroupError::Busy(name.to_owned()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn usage(&self, name: &str) -> Result<Usage, CgroupError> {
        check_name(name)?;
        let d = self.dir(name);
        let cpu = read(&d.join("cpu.stat"))
            .ok()
            .and_then(|s| keyed(&s, "usage_usec"))
            .unwrap_or(0);
        let peak = read(&d.join("memory.peak"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let oom = read(&d.join("memory.events"))
            .ok()
            .and_then(|s| keyed(&s, "oom_kill"))
            .unwrap_or(0);
        Ok(Usage {
            cpu_usec: cpu,
            memory_peak_bytes: peak,
            oom_kills: oom,
        })
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        check_name(name)?;
        let d = self.dir(name);
        if !d.exists() {
            return Ok(());
        }
        self.kill_all(name)?;
        rmdir(&d)
    }

    fn remove_parent(&self) -> Result<(), CgroupError> {
        rmdir(&self.parent)
    }

    fn set_cpus(&self, name: &str, cpus: Option<f64>) -> Result<(), CgroupError> {
        check_name(name)?;
        check_cpus(cpus)?;
        let q = cpus.map_or_else(|| "max".to_owned(), |c| quota_us(c).to_string());
        write(
            &self.dir(name).join("cpu.max"),
            &format!("{q} {CPU_PERIOD_US}"),
        )
    }

    fn guest_class(&self) -> Result<GuestClass, CgroupError> {
        fs::create_dir_all(&self.parent).map_err(io_err(&self.parent))?;
        let idle = self.parent.join("cpu.idle");
        if idle.exists() {
            write(&idle, "1")?;
            Ok(GuestClass::CpuIdle)
        } else {
            write(&self.parent.join("cpu.weight"), "1")?;
            Ok(GuestClass::MinWeight)
        }
    }

    fn parent_cpu_usec(&self) -> Result<u64, CgroupError> {
        Ok(read(&self.parent.join("cpu.stat"))
            .ok()
            .and_then(|s| keyed(&s, "usage_usec"))
            .unwrap_or(0))
    }

    fn procs_files(&self, name: &str) -> Vec<PathBuf> {
        vec![self.dir(name).join("cgroup.procs")]
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        let rd = fs::read_dir(&self.parent).map_err(io_err(&self.parent))?;
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over a plain directory the manager writes the files a v2 kernel
    /// would read.
    #[test]
    fn throttle_idle_class_and_guest_cpu_land_in_the_v2_files() {
        let base = std::env::temp_dir().join(format!("shoal-v2c-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("t")).unwrap();
        let m = V2::at(&base);
        let r = |f: &str| fs::read_to_string(base.join(f)).unwrap();
        m.set_cpus("t", Some(0.5)).unwrap();
        assert_eq!(r("t/cpu.max"), "50000 100000");
        m.set_cpus("t", None).unwrap();
        assert_eq!(r("t/cpu.max"), "max 100000");
        assert!(m.set_cpus("t", Some(-1.0)).is_err());
        // No cpu.idle file (an older kernel): the smallest weight.
        assert_eq!(m.guest_class().unwrap(), GuestClass::MinWeight);
        assert_eq!(r("cpu.weight"), "1");
        fs::write(base.join("cpu.idle"), "0").unwrap();
        assert_eq!(m.guest_class().unwrap(), GuestClass::CpuIdle);
        assert_eq!(r("cpu.idle"), "1");
        fs::write(
            base.join("cpu.stat"),
            "usage_usec 1234
user_usec 1000
",
        )
        .unwrap();
        assert_eq!(m.parent_cpu_usec().unwrap(), 1234);
        fs::remove_dir_all(&base).unwrap();
    }

    /// A parent several levels down (a delegated subtree): each level is
    /// made where missing and hands the controllers on, and one that
    /// already has them is not written.
    #[test]
    fn a_nested_parent_is_made_and_delegated_level_by_level() {
        let base = std::env::temp_dir().join(format!("shoal-v2n-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("user.slice")).unwrap();
        let ctl = "cgroup.subtree_control";
        fs::write(base.join(ctl), "cpu memory pids\n").unwrap();
        fs::write(base.join("user.slice").join(ctl), "cpu memory pids\n").unwrap();
        let m = V2::new(&base, "user.slice/alice/shoal").unwrap();
        assert_eq!(m.parent, base.join("user.slice/alice/shoal"));
        // Already delegated: left as it was (a plain file here would keep
        // only the last write).
        assert_eq!(
            fs::read_to_string(base.join("user.slice").join(ctl)).unwrap(),
            "cpu memory pids\n"
        );
        for level in ["user.slice/alice", "user.slice/alice/shoal"] {
            assert!(base.join(level).join(ctl).exists(), "{level} was delegated");
        }
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn limits_land_in_the_v2_files() {
        let base = std::env::temp_dir().join(format!("shoal-v2-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let m = V2::at(&base);
        m.create(
            "t1",
            &Limits {
                cpus: Some(0.5),
                cpu_weight: Some(1),
                memory_bytes: Some(64 << 20),
                pids: Some(32),
            },
        )
        .unwrap();
        let r = |f: &str| fs::read_to_string(base.join("t1").join(f)).unwrap();
        assert_eq!(r("cpu.max"), "50000 100000");
        assert_eq!(r("cpu.weight"), "1");
        assert_eq!(r("memory.max"), (64u64 << 20).to_string());
        assert_eq!(r("pids.max"), "32");
        assert!(matches!(
            m.create("t1", &Limits::default()),
            Err(CgroupError::Exists(_))
        ));
        assert_eq!(m.list().unwrap(), vec!["t1".to_owned()]);
        fs::write(base.join("t1/cpu.stat"), "usage_usec 42\nuser_usec 40\n").unwrap();
        fs::write(
            base.join("t1/memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        let u = m.usage("t1").unwrap();
        assert_eq!((u.cpu_usec, u.oom_kills), (42, 1));
        assert!(m.create("../escape", &Limits::default()).is_err());
        fs::remove_dir_all(&base).unwrap();
    }
}
