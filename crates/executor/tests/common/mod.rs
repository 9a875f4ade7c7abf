//! What the workspace tests share.

#![allow(clippy::unwrap_used, dead_code)] // tests panic on purpose; each file uses part

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use shoal_executor::workspace::{Net, Root, Spec, Tree};

/// A scratch directory, removed when the test ends (also when it fails).
pub struct Dir(pub PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Gives `s` the tree `lower` (one layer) with `upper` and `work`, seen at
/// `at`, which becomes the working directory.
/// A guest's workspace under `dir` (nobody, host name `guest`, loopback
/// only, the host's system directories, no tree).
pub fn guest_spec(dir: &Path) -> Spec {
    Spec {
        run_dir: dir.join("run"),
        root: Root::Host,
        tree: None,
        cwd: PathBuf::from("/"),
        hostname: "guest".into(),
        uid: 65534,
        gid: 65534,
        net: Net::Loopback,
        idle: false,
        tty: false,
    }
}

pub fn with_tree(s: &mut Spec, lower: &Path, upper: &Path, work: PathBuf, at: &str) {
    s.tree = Some(Tree {
        lower: vec![lower.to_owned()],
        upper: upper.to_owned(),
        work,
        at: PathBuf::from(at),
    });
    s.cwd = PathBuf::from(at);
}

/// A script that prints what a guest can see and do, for
/// [`assert_isolated`].
pub const ISOLATION_PROBE: &str =
    "echo pid=$$; echo host=$(cat /proc/sys/kernel/hostname); echo uid=$(id -u); \
     echo nets=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,); \
     echo shadow=$(cat /etc/shadow 2>/dev/null | wc -c); ls /root /home /var 2>/dev/null | wc -l; \
     touch /usr/x 2>/dev/null && echo wrote-usr; touch /x 2>/dev/null && echo wrote-root; \
     touch /tmp/ok && echo tmp-ok";

/// What [`ISOLATION_PROBE`] must print in a workspace named `guest`: the
/// command under a small init, the guest's uid, loopback only, no
/// secrets, read-only system directories, nothing of the host's homes,
/// a writable `/tmp`.
pub fn assert_isolated(t: &str) {
    assert!(
        t.contains("pid=2"),
        "the command runs under a small init: {t}"
    );
    assert!(t.contains("host=guest"), "{t}");
    assert!(t.contains("uid=65534"), "the guest's uid inside: {t}");
    assert!(t.contains("nets=lo,"), "only loopback: {t}");
    assert!(t.contains("shadow=0"), "{t}");
    assert!(!t.contains("wrote-usr") && !t.contains("wrote-root"), "{t}");
    assert!(t.contains("tmp-ok"), "{t}");
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines.contains(&"0"), "no /root, /home or /var inside: {t}");
}

/// A command's output as trimmed text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

/// What a tree test's script (`pwd; cat a.txt; echo changed > a.txt; echo
/// new > b.txt; rm gone.txt; …`, run at `/home/alice/project` over a lower
/// layer holding `a.txt` and `gone.txt`) must leave: the lower layer
/// untouched, the changes in the upper one, the deletion as a whiteout (a
/// 0:0 character device).
pub fn assert_tree_changes(stdout: &str, lower: &Path, upper: &Path) {
    assert!(
        stdout.starts_with("/home/alice/project\noriginal"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(lower.join("a.txt")).unwrap(),
        "original\n"
    );
    assert!(lower.join("gone.txt").exists());
    assert_eq!(
        std::fs::read_to_string(upper.join("a.txt")).unwrap(),
        "changed\n"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("b.txt")).unwrap(),
        "new\n"
    );
    assert!(std::fs::symlink_metadata(upper.join("gone.txt"))
        .unwrap()
        .file_type()
        .is_char_device());
}
