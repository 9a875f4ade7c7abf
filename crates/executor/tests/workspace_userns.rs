//! Workspaces of an agent that is not root: a user namespace of the
//! workspace's own, in which the agent's ids are the guest's. Run as a
//! user, these tests use that user; run as root (CI), the workspace's
//! process first becomes `nobody` (`Command::uid`), as an unprivileged
//! agent's would be. Where the kernel refuses unprivileged user
//! namespaces, each test says so and skips.

#![allow(clippy::unwrap_used)] // tests panic on purpose

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{
    assert_isolated, assert_tree_changes, guest_spec, text, with_tree, Dir, ISOLATION_PROBE,
};
use shoal_executor::workspace::{cleanup, Plan, Spec};

const NOBODY: u32 = 65534;

/// The ids the workspace's process runs as outside: ours, or `nobody`'s
/// when we are root.
fn outside() -> (u32, u32) {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        (NOBODY, NOBODY)
    } else {
        (uid.as_raw(), nix::unistd::getegid().as_raw())
    }
}

/// A scratch directory the outside ids own.
fn scratch(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("shoal-uns-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    own(&d);
    Dir(d)
}

fn own(p: &Path) {
    let (u, g) = outside();
    nix::unistd::chown(
        p,
        Some(nix::unistd::Uid::from_raw(u)),
        Some(nix::unistd::Gid::from_raw(g)),
    )
    .unwrap();
}

/// As at the idle class (what a guest gets from another node).
fn spec(dir: &Path) -> Spec {
    Spec {
        uid: NOBODY,
        gid: NOBODY,
        idle: true,
        ..guest_spec(dir)
    }
}

/// Why this kernel refuses user namespaces to users, if it does (its
/// settings say so).
fn refused() -> Option<String> {
    for (knob, off) in [
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/user/max_user_namespaces", "0"),
        (
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            "1",
        ),
    ] {
        if std::fs::read_to_string(knob).is_ok_and(|v| v.trim() == off) {
            return Some(format!("{knob} is {off}"));
        }
    }
    None
}

/// Runs `script` in a workspace as the outside ids; `None` when this
/// kernel refuses unprivileged user namespaces (said on stderr).
fn run(spec: &Spec, script: &str) -> Option<Output> {
    let (u, g) = outside();
    if let Some(why) = refused() {
        eprintln!("skipped: no user namespaces for users here ({why})");
        return None;
    }
    let mut c = Command::new("/bin/sh");
    c.args(["-c", script])
        .stdin(Stdio::null())
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    let plan = if nix::unistd::geteuid().is_root() {
        c.uid(u).gid(g);
        Plan::as_user(spec, u, g).unwrap()
    } else {
        Plan::new(spec).unwrap()
    };
    plan.apply(&mut c);
    let out = c.output();
    cleanup(spec).unwrap();
    match out {
        Ok(o) => Some(o),
        Err(e) => panic!("the workspace did not start as uid {u}: {e}"),
    }
}

#[test]
fn an_unprivileged_guest_is_isolated() {
    let d = scratch("iso");
    let Some(out) = run(&spec(&d.0), &format!("{ISOLATION_PROBE}; exit 42")) else {
        return;
    };
    let t = text(&out.stdout);
    assert_eq!(out.status.code(), Some(42), "{t}\n{}", text(&out.stderr));
    assert_isolated(&t);
}

#[test]
fn an_unprivileged_guests_tree_is_an_overlay_whose_changes_stay_in_upper() {
    let d = scratch("tree");
    let lower = d.0.join("lower");
    let (upper, work) = (d.0.join("upper"), d.0.join("work"));
    for p in [&lower, &upper, &work, &lower.join("sub")] {
        std::fs::create_dir_all(p).unwrap();
        own(p);
    }
    for (f, body) in [("a.txt", "original\n"), ("gone.txt", "x"), ("sub/old", "o")] {
        std::fs::write(lower.join(f), body).unwrap();
        own(&lower.join(f));
    }
    let mut s = spec(&d.0);
    with_tree(&mut s, &lower, &upper, work, "/home/alice/project");
    // A directory replaced whole needs the overlay's "opaque" mark, which
    // in a user namespace lives in a `user.` attribute.
    let Some(out) = run(
        &s,
        "pwd; cat a.txt; echo changed > a.txt; echo new > b.txt; rm gone.txt; \
         rm -r sub && mkdir sub && echo g > sub/new && echo sub=$(ls sub | tr '\\n' ,)",
    ) else {
        return;
    };
    let t = text(&out.stdout);
    assert!(out.status.success(), "{t} {}", text(&out.stderr));
    assert!(
        t.contains("sub=new,"),
        "only the new file in the new sub: {t}"
    );
    assert_tree_changes(&t, &lower, &upper);
    assert!(lower.join("sub/old").exists());
    assert!(!upper.join("sub/old").exists());
    assert_eq!(
        std::fs::read_to_string(upper.join("sub/new")).unwrap(),
        "g\n"
    );
}
