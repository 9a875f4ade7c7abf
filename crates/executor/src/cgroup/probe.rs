//! Probe: can we create a cgroup with a CPU, memory and pids limit?

use std::fs;
use std::path::{Path, PathBuf};

use super::{io_err, CgroupError};

/// Which cgroup hierarchy the machine offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Separate controller hierarchies under `/sys/fs/cgroup/<controller>`.
    V1,
    /// The unified hierarchy at `/sys/fs/cgroup`.
    V2,
}

impl CgroupVersion {
    /// `v1` or `v2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

const V1_LIMITS: &[(&str, &str, &str)] = &[
    ("cpu", "cpu.cfs_quota_us", "50000"),
    ("memory", "memory.limit_in_bytes", "67108864"),
    ("pids", "pids.max", "16"),
    ("freezer", "freezer.state", "THAWED"),
];
const V2_LIMITS: &[(&str, &str)] = &[
    ("cpu.max", "50000 100000"),
    ("memory.max", "67108864"),
    ("pids.max", "16"),
];

/// Which hierarchy `root` (normally `/sys/fs/cgroup`) holds: pure v2 when
/// it has `cgroup.controllers` offering cpu, memory and pids; v1 when the
/// controller directories exist (hybrid machines count as v1).
pub fn detect(root: &Path) -> Option<CgroupVersion> {
    if let Ok(c) = fs::read_to_string(root.join("cgroup.controllers")) {
        let has = |n| c.split_whitespace().any(|w| w == n);
        if has("cpu") && has("memory") && has("pids") {
            return Some(CgroupVersion::V2);
        }
    }
    V1_LIMITS
        .iter()
        .all(|(c, _, _)| root.join(c).is_dir())
        .then_some(CgroupVersion::V1)
}

/// Creates a cgroup named `check-<pid>` under `parent` (made if absent:
/// `shoal-<node>` for a root agent, a delegated subtree for another user)
/// in every controller needed, sets a CPU quota, a memory limit and a pids
/// limit, and removes what it made.
///
/// # Errors
/// No usable hierarchy, a bad parent, or a group or limit the kernel (or
/// the permissions) refused, named.
pub fn probe_cgroups(root: &Path, parent: &str) -> Result<CgroupVersion, CgroupError> {
    super::check_parent(parent)?;
    let version = detect(root).ok_or_else(|| CgroupError::NotFound(root.to_owned()))?;
    let name = format!("check-{}", std::process::id());
    // Every directory made here, removed again (innermost first).
    let mut made: Vec<PathBuf> = Vec::new();
    let mkdir = |d: &Path, made: &mut Vec<PathBuf>| -> Result<(), CgroupError> {
        fs::create_dir(d).map_err(io_err(d))?;
        made.push(d.to_owned());
        Ok(())
    };
    let r = match version {
        CgroupVersion::V1 => (|| {
            for (ctrl, file, value) in V1_LIMITS {
                let mut at = root.join(ctrl);
                for c in parent.split('/') {
                    at.push(c);
                    if !at.is_dir() {
                        mkdir(&at, &mut made)?;
                    }
                }
                let dir = at.join(&name);
                mkdir(&dir, &mut made)?;
                let f = dir.join(file);
                fs::write(&f, value).map_err(io_err(&f))?;
            }
            Ok(())
        })(),
        CgroupVersion::V2 => (|| {
            let mut at = root.to_owned();
            super::v2::delegate(&at)?;
            for c in parent.split('/') {
                at.push(c);
                if !at.is_dir() {
                    mkdir(&at, &mut made)?;
                }
                super::v2::delegate(&at)?;
            }
            let dir = at.join(&name);
            mkdir(&dir, &mut made)?;
            V2_LIMITS.iter().try_for_each(|(file, value)| {
                let f = dir.join(file);
                fs::write(&f, value).map_err(io_err(&f))
            })?;
            // The freezer: guests we cannot stop must not run.
            let f = dir.join("cgroup.freeze");
            fs::metadata(&f).map(|_| ()).map_err(io_err(&f))
        })(),
    };
    for d in made.iter().rev() {
        let _ = fs::remove_dir(d);
    }
    r.map(|()| version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v1_and_v2_layouts() {
        let base = std::env::temp_dir().join(format!("shoal-cg-{}", std::process::id()));
        let v1 = base.join("v1");
        for c in ["cpu", "memory", "pids", "freezer"] {
            fs::create_dir_all(v1.join(c)).unwrap();
        }
        assert_eq!(detect(&v1), Some(CgroupVersion::V1));
        // Without a freezer, guests could not be stopped for their owner:
        // no usable hierarchy, so the start-up checks fail and the node
        // lends no slots.
        let nofreeze = base.join("nofreeze");
        for c in ["cpu", "memory", "pids"] {
            fs::create_dir_all(nofreeze.join(c)).unwrap();
        }
        assert_eq!(detect(&nofreeze), None);
        let v2 = base.join("v2");
        fs::create_dir_all(&v2).unwrap();
        fs::write(v2.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        assert_eq!(detect(&v2), Some(CgroupVersion::V2));
        let none = base.join("none");
        fs::create_dir_all(&none).unwrap();
        assert_eq!(detect(&none), None);
        assert!(matches!(
            probe_cgroups(&v1, "../escape"),
            Err(CgroupError::BadName(_))
        ));
        assert!(matches!(
            probe_cgroups(&none, "shoal-x"),
            Err(CgroupError::NotFound(_))
        ));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn probe_on_this_machine_leaves_nothing() {
        let root = Path::new("/sys/fs/cgroup");
        if !nix::unistd::Uid::effective().is_root() || detect(root).is_none() {
            eprintln!("skipped: the cgroup probe needs root and a cgroup hierarchy");
            return;
        }
        let parent = format!("shoal-probe-{}", std::process::id());
        probe_cgroups(root, &parent).unwrap();
        assert!(!root.join("cpu").join(&parent).exists(), "parent removed");
        assert!(!root.join("memory").join(&parent).exists());
        assert!(!root.join(&parent).exists());
    }
}
