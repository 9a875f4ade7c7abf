//! File work done as a user, by an agent that runs as root.
//!
//! A batch job's inputs are read, and its outputs written, in the
//! submitting user's directories. Done as root, a user could point the
//! agent at files they may not read (another user's home, through a path
//! or a symbolic link swapped in later) or make it write, or `chown`,
//! through a link into `/etc`. HTCondor's schedd switches to the user for
//! such work; so does this: [`as_user`] runs a closure on a thread of its
//! own whose credentials (user, group, supplementary groups) are the
//! user's. Linux keeps credentials per thread; the raw system calls below
//! change only the calling thread (glibc's wrappers would change every
//! thread of the agent), and the thread ends with the closure.

use std::io;

/// A user to act as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl User {
    /// The user `uid` as the password and group databases have it: its
    /// primary group and supplementary groups. A uid without an entry gets
    /// its own number as group and no supplementary groups.
    pub fn lookup(uid: u32) -> Self {
        use nix::unistd::{getgrouplist, Uid, User as PwUser};
        match PwUser::from_uid(Uid::from_raw(uid)) {
            Ok(Some(u)) => {
                let name = std::ffi::CString::new(u.name.as_bytes()).unwrap_or_default();
                let groups = getgrouplist(&name, u.gid)
                    .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                    .unwrap_or_default();
                Self {
                    uid,
                    gid: u.gid.as_raw(),
                    groups,
                }
            }
            _ => Self {
                uid,
                gid: uid,
                groups: Vec::new(),
            },
        }
    }
}

/// Why [`as_user`] could not run the closure.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    /// The thread could not take the user's credentials (the agent is not
    /// root, say).
    #[error("cannot act as uid {uid}: {source}")]
    Switch {
        /// The user.
        uid: u32,
        /// The OS error.
        source: io::Error,
    },
    /// The thread could not be started, or the closure panicked.
    #[error("worker thread: {0}")]
    Thread(String),
}

/// Runs `f` as `user` on a thread of its own and returns its result.
/// When the process already runs as that user, `f` runs on a thread all
/// the same, with nothing to change.
///
/// # Errors
/// The credentials could not be taken (nothing of `f` ran), or the thread
/// failed.
pub fn as_user<R: Send + 'static>(
    user: &User,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, CredsError> {
    let user = user.clone();
    let t = std::thread::Builder::new()
        .name(format!("as-uid-{}", user.uid))
        .spawn(move || -> Result<R, CredsError> {
            if nix::unistd::geteuid().as_raw() != user.uid {
                switch(&user).map_err(|source| CredsError::Switch {
                    uid: user.uid,
                    source,
                })?;
            }
            Ok(f())
        })
        .map_err(|e| CredsError::Thread(e.to_string()))?;
    t.join()
        .map_err(|_| CredsError::Thread("the closure panicked".into()))?
}

/// Sets this thread's groups, group and user (in that order: once the user
/// is changed the rest may no longer be).
#[allow(unsafe_code)]
fn switch(user: &User) -> io::Result<()> {
    let groups: Vec<libc::gid_t> = user.groups.clone();
    let check = |r: libc::c_long| {
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: raw setgroups(2) with a pointer to `groups.len()` valid gid_t
    // values that outlive the call; it changes this thread's credentials
    // only (the kernel's credentials are per thread).
    check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })?;
    let g = user.gid;
    // SAFETY: raw setresgid(2) with plain integers; this thread only.
    check(unsafe { libc::syscall(libc::SYS_setresgid, g, g, g) })?;
    let u = user.uid;
    // SAFETY: raw setresuid(2) with plain integers; this thread only.
    check(unsafe { libc::syscall(libc::SYS_setresuid, u, u, u) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closure_runs_with_the_users_credentials_and_the_agent_keeps_its_own() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root to change credentials");
            return;
        }
        let d = std::env::temp_dir().join(format!("shoal-creds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("rootonly"), "secret").unwrap();
        std::fs::set_permissions(
            d.join("rootonly"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let u = User {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        };
        let (p, made) = (d.join("rootonly"), d.join("made"));
        let (read, wrote, ids) = as_user(&u, move || {
            (
                std::fs::read(&p).map_err(|e| e.kind()),
                std::fs::write(&made, "x").map_err(|e| e.kind()),
                (
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                ),
            )
        })
        .unwrap();
        assert_eq!(read, Err(io::ErrorKind::PermissionDenied));
        assert_eq!(wrote, Err(io::ErrorKind::PermissionDenied));
        assert_eq!(ids, (65534, 65534));
        assert!(nix::unistd::geteuid().is_root(), "only that thread changed");
        assert!(std::fs::read(d.join("rootonly")).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
