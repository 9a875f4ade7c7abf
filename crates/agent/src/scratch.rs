//! Task directories kept between tasks.
//!
//! Each task's overlay needs an upper and a work directory on the same
//! file system. Made and removed per task, they were three directories
//! created and four removed for every task; on an ext4 without a journal
//! (this project's machines), every inode freed makes each later inode
//! allocation on the disk scan past it for a while, so a busy executor
//! paid for that churn over and over. A task hands its directory to the
//! next task instead: its upper layer emptied of what the task wrote (a
//! compile's object file), the directories themselves kept, unless
//! something else of the task's is left in them.
//!
//! A directory is taken only by one task at a time, and given back only
//! once its overlay is unmounted (the task's namespaces are gone).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Clean task directories ready for the next task.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    /// At most this many are kept; the rest are removed.
    cap: usize,
}

impl Scratch {
    /// Directories under `dir` (the agent's `tasks`), at most `cap` kept.
    pub fn new(dir: &Path, cap: usize) -> Self {
        Self {
            dir: dir.to_owned(),
            free: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            cap,
        }
    }

    /// A directory for one task: a kept one, or the name of a new one
    /// (made by the caller with its `upper` and `work`). Names have a dot,
    /// which task ids never have.
    pub fn take(&self) -> PathBuf {
        if let Some(d) = self.lock().pop() {
            return d;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("scratch.{n}"))
    }

    /// Gives a task's directory back once its overlay is unmounted: kept
    /// when, its upper layer emptied, nothing of the task is left in it,
    /// else removed.
    pub fn give_back(&self, d: PathBuf) {
        empty_upper(&d);
        if clean(&d, None) {
            let mut free = self.lock();
            if free.len() < self.cap {
                free.push(d);
                return;
            }
        }
        let _ = shoal_executor::workspace::remove_all(&d);
    }

    /// Gives a warm slot back to its pool (see
    /// [`shoal_executor::warm::Pool::give_back`]), and here the
    /// directories of the trees its spawner no longer keeps.
    pub fn give_back_slot(
        &self,
        pool: &shoal_executor::warm::Pool,
        slot: shoal_executor::warm::Slot,
        keep_tree: bool,
    ) {
        for k in pool.give_back(slot, keep_tree) {
            self.give_back(k.dir);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes what a task left in `d`'s upper layer (the files it wrote,
/// its whiteouts, the directories it made or changed), not the layer's
/// top directory: a task whose changes were read (or moved away) leaves
/// its directory ready for the next one, at the cost of its own files
/// only. What cannot be removed stays, and the directory then goes whole.
fn empty_upper(d: &Path) {
    let Ok(rd) = std::fs::read_dir(d.join("upper")) else {
        return;
    };
    for e in rd.flatten() {
        let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
            shoal_executor::workspace::remove_all(&e.path())
        } else {
            std::fs::remove_file(e.path())
        };
    }
}

/// Nothing of a task in `d`: an empty upper layer without attributes of
/// the task's (a `user.` attribute set on the tree's top directory would
/// be there), an empty (or absent) overlay scratch `work/work`, an empty
/// mount point `mnt` (where a warm slot's spawner mounts the tree in its
/// own namespace) or none, and nothing else beside them. With `owner`,
/// the upper layer's top must also still be as made (mode 0755, that
/// owner): a tree kept mounted is not set back before its next task.
pub fn clean(d: &Path, owner: Option<(u32, u32)>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let empty = |p: &Path| std::fs::read_dir(p).is_ok_and(|mut r| r.next().is_none());
    let only = |p: &Path, names: &[&str]| {
        std::fs::read_dir(p).is_ok_and(|r| {
            r.flatten()
                .all(|e| names.iter().any(|n| e.file_name() == *n))
        })
    };
    let upper = d.join("upper");
    let work = d.join("work");
    let no_user_attrs =
        || xattr_names(&upper).is_some_and(|names| names.iter().all(|n| !n.starts_with(b"user.")));
    let as_made = || {
        owner.is_none_or(|(u, g)| {
            std::fs::symlink_metadata(&upper)
                .is_ok_and(|m| m.mode() & 0o7777 == 0o755 && m.uid() == u && m.gid() == g)
        })
    };
    let mnt = d.join("mnt");
    only(d, &["upper", "work", "mnt"])
        && empty(&upper)
        && as_made()
        && (!mnt.exists() || empty(&mnt))
        && no_user_attrs()
        && only(&work, &["work"])
        && (!work.join("work").exists() || empty(&work.join("work")))
}

/// The names of `p`'s extended attributes, `None` when unreadable (or
/// too many to be the overlay's own).
fn xattr_names(p: &Path) -> Option<Vec<Vec<u8>>> {
    let mut buf = [0u8; 4096];
    let n = rustix::fs::listxattr(p, &mut buf).ok()?;
    Some(
        buf[..n]
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(<[u8]>::to_vec)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(s: &Scratch) -> PathBuf {
        let d = s.take();
        std::fs::create_dir_all(d.join("upper")).unwrap();
        std::fs::create_dir_all(d.join("work/work")).unwrap();
        d
    }

    #[test]
    fn a_directory_the_task_left_clean_serves_the_next_and_any_other_goes() {
        let root = crate::test_dir("scratch-reuse");
        let s = Scratch::new(&root, 2);
        let a = made(&s);
        s.give_back(a.clone());
        assert!(a.exists());
        assert_eq!(s.take(), a, "the clean one is taken again");

        // What the task wrote in its upper layer (files, a directory it
        // made, even read-only, a whiteout): emptied, and the directory
        // serves again.
        std::fs::write(a.join("upper/out.o"), b"x").unwrap();
        std::fs::create_dir_all(a.join("upper/sub/deeper")).unwrap();
        std::fs::write(a.join("upper/sub/deeper/f"), b"y").unwrap();
        std::fs::set_permissions(
            a.join("upper/sub"),
            std::os::unix::fs::PermissionsExt::from_mode(0o500),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", a.join("upper/link")).unwrap();
        s.give_back(a.clone());
        assert!(a.join("upper").is_dir(), "the directory is kept");
        assert_eq!(std::fs::read_dir(a.join("upper")).unwrap().count(), 0);
        assert!(
            Path::new("/etc/passwd").exists(),
            "a link is removed, not followed"
        );
        assert_eq!(s.take(), a, "the emptied one is taken again");
        let b = made(&s);
        assert_ne!(b, a);

        // Leftover copy-up scratch, and anything beside upper and work:
        // removed whole.
        for dirty in ["work/work/#1", "run"] {
            let d = made(&s);
            std::fs::create_dir_all(d.join(dirty).parent().unwrap()).unwrap();
            std::fs::write(d.join(dirty), b"").unwrap();
            s.give_back(d.clone());
            assert!(!d.exists(), "{dirty}: removed");
        }

        // A user attribute on the tree's top directory stays with it.
        let d = made(&s);
        if rustix::fs::setxattr(
            d.join("upper"),
            "user.shoal-test",
            b"1",
            rustix::fs::XattrFlags::empty(),
        )
        .is_ok()
        {
            s.give_back(d.clone());
            assert!(!d.exists(), "an attribute of the task's: removed");
        }

        // No more than `cap` are kept.
        let (x, y, z) = (made(&s), made(&s), made(&s));
        for d in [&x, &y, &z] {
            s.give_back(d.clone());
        }
        assert_eq!([&x, &y, &z].iter().filter(|d| d.exists()).count(), 2);
        let _ = std::fs::remove_dir_all(&root);
    }
}
