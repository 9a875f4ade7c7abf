//! Probe: can we create the namespaces of a workspace?

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::sched::CloneFlags;
use nix::unistd::Uid;

/// Why the namespace probe failed.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// The probe child could not be started (unshare refused, no /bin/true).
    #[error("cannot start a child in new namespaces: {0}")]
    Spawn(#[source] io::Error),
    /// The child started but did not exit cleanly.
    #[error("probe child in new namespaces exited with {0}")]
    Child(std::process::ExitStatus),
}

/// The namespaces a workspace uses: mount, pid, uts, ipc and net; plus a
/// user namespace when not root.
pub fn workspace_flags(is_root: bool) -> CloneFlags {
    let mut f = crate::workspace::TASK_NAMESPACES | CloneFlags::CLONE_NEWNET;
    if !is_root {
        f |= CloneFlags::CLONE_NEWUSER;
    }
    f
}

/// Starts `/bin/true` in fresh mount, pid, uts, ipc and net namespaces (and
/// a user namespace when not root) and waits for it.
///
/// # Errors
/// The kernel refused the namespaces or the child failed.
pub fn probe_namespaces() -> Result<(), NamespaceError> {
    let flags = workspace_flags(Uid::effective().is_root());
    let mut cmd = Command::new("/bin/true");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec. It only
    // calls unshare(2), which is async-signal-safe, allocates nothing and
    // takes no lock; on failure it returns the errno as an io::Error.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || nix::sched::unshare(flags).map_err(io::Error::from));
    }
    let status = cmd.status().map_err(NamespaceError::Spawn)?;
    if status.success() {
        Ok(())
    } else {
        Err(NamespaceError::Child(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_namespace_only_when_unprivileged() {
        assert!(workspace_flags(false).contains(CloneFlags::CLONE_NEWUSER));
        assert!(!workspace_flags(true).contains(CloneFlags::CLONE_NEWUSER));
    }

    #[test]
    fn probe_runs_as_root() {
        if !Uid::effective().is_root() {
            eprintln!(
                "skipped: namespace probe as root needs root (this is uid {})",
                Uid::effective()
            );
            return;
        }
        probe_namespaces().unwrap();
    }
}
