//! Task scratch in memory: a tmpfs the agent mounts under its data
//! directory for its task directories (each task's overlay upper and work
//! layers) and spools, when its owner sets `scratch = "memory"`.
//!
//! Why: an overlay mount creates and removes a few inodes in its work
//! directory (its `work/work` directory, and its probes for `O_TMPFILE`
//! and rename-whiteout), its unmount syncs the upper
//! file system, and a task's own writes make inodes too. On ext4 that is
//! bitmap searches (and, without a journal, a read of the inode table for
//! each recently freed inode passed over) and writeback; on tmpfs it is
//! memory only. Bazel's `--sandbox_base=/dev/shm` makes the same trade.
//! What the task writes then lives in memory until it is committed or
//! dropped, charged to the task's memory cgroup, and capped by the tmpfs
//! size.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What went wrong with the scratch file system.
#[derive(Debug, thiserror::Error)]
pub enum MemfsError {
    /// Its mount point could not be made or looked at.
    #[error("scratch {path}: {source}")]
    Dir {
        /// The mount point.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The tmpfs could not be mounted (not root, say).
    #[error("scratch {path}: mounting a tmpfs: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The tmpfs kept from an earlier life could not be given its size.
    #[error("scratch {path}: resizing the tmpfs: {source}")]
    Resize {
        /// The mount point.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The tmpfs could not be unmounted.
    #[error("scratch {path}: unmounting: {source}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// `TMPFS_MAGIC`, statfs's `f_type` of a tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `path` is itself a tmpfs mount (not a directory on one).
///
/// # Errors
/// `path` or its parent cannot be looked at.
pub fn is_tmpfs_mount(path: &Path) -> io::Result<bool> {
    let fs = rustix::fs::statfs(path)?;
    #[allow(clippy::useless_conversion)] // its type differs by target
    if i64::from(fs.f_type) != TMPFS_MAGIC {
        return Ok(false);
    }
    let here = std::fs::metadata(path)?;
    let parent = std::fs::metadata(path.join(".."))?;
    Ok(here.dev() != parent.dev() || here.ino() == parent.ino())
}

/// Makes `path` a tmpfs (`size` bytes at most; `None`: tmpfs's default,
/// half of memory), or keeps the one an earlier life of the agent left
/// there, given that size (its contents are the caller's to empty).
/// Returns whether it was mounted now. `path` is the agent's own: a tmpfs
/// found there is taken for its own.
///
/// # Errors
/// The directory cannot be made, the mount fails, or the kept one cannot
/// be resized.
pub fn ensure(path: &Path, size: Option<u64>) -> Result<bool, MemfsError> {
    let dir = |source| MemfsError::Dir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(dir)?;
    let size = match size {
        Some(b) => format!("size={b}"),
        None => "size=50%".to_owned(),
    };
    if is_tmpfs_mount(path).map_err(dir)? {
        rustix::mount::mount_remount(path, rustix::mount::MountFlags::NOSUID, size.as_str())
            .map_err(|e| MemfsError::Resize {
                path: path.to_owned(),
                source: e.into(),
            })?;
        return Ok(false);
    }
    let data = std::ffi::CString::new(format!("mode=0755,{size}")).unwrap_or_default();
    rustix::mount::mount(
        "shoal-scratch",
        path,
        "tmpfs",
        rustix::mount::MountFlags::NOSUID,
        data.as_c_str(),
    )
    .map_err(|e| MemfsError::Mount {
        path: path.to_owned(),
        source: e.into(),
    })?;
    Ok(true)
}

/// Unmounts the tmpfs at `path` (lazily: a workspace's mount namespace
/// that still holds a copy lets it go when it ends).
///
/// # Errors
/// The unmount fails (not a mount point, say).
pub fn release(path: &Path) -> Result<(), MemfsError> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
        MemfsError::Unmount {
            path: path.to_owned(),
            source: e.into(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_is_mounted_once_kept_by_a_second_call_and_released() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let d = std::env::temp_dir().join(format!("shoal-memfs-{}", std::process::id()));
        let at = d.join("mem");
        std::fs::create_dir_all(&d).unwrap();
        assert!(!is_tmpfs_mount(&at).unwrap_or(false));
        let r = std::panic::catch_unwind(|| {
            assert!(ensure(&at, Some(1 << 20)).unwrap(), "mounted now");
            assert!(is_tmpfs_mount(&at).unwrap());
            std::fs::write(at.join("f"), "x").unwrap();
            // A second life keeps it, with what it holds, at its size.
            let bytes = || {
                let s = rustix::fs::statfs(&at).unwrap();
                s.f_blocks as u64 * s.f_bsize as u64
            };
            assert_eq!(bytes(), 1 << 20);
            assert!(!ensure(&at, Some(2 << 20)).unwrap(), "kept");
            assert_eq!(std::fs::read(at.join("f")).unwrap(), b"x");
            assert_eq!(bytes(), 2 << 20, "resized");
            assert!(!ensure(&at, Some(1 << 20)).unwrap());
            assert_eq!(bytes(), 1 << 20);
            // Its size is capped.
            let big = std::fs::write(at.join("big"), vec![0u8; 2 << 20]);
            assert_eq!(
                big.map_err(|e| e.raw_os_error()),
                Err(Some(nix::libc::ENOSPC))
            );
        });
        let released = release(&at);
        let gone = !is_tmpfs_mount(&at).unwrap_or(true);
        let _ = std::fs::remove_dir_all(&d);
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
        released.unwrap();
        assert!(gone, "still mounted");
    }
}
