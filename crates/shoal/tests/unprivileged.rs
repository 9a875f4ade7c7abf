//! An agent that is not root (root runs the test, to build the lab and
//! delegate a cgroup subtree; elsewhere it prints why it skipped): its
//! tasks run in user namespaces of their own, under the cgroup subtree the
//! administrator gave its user, with the same isolation, limits and
//! commits as a root agent's.

#![allow(clippy::unwrap_used)] // tests panic on purpose

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const NOBODY: u32 = 65534;

/// A cgroup subtree made by root and given to `nobody` (what an
/// administrator does for an agent that is not root), removed with
/// whatever was made under it.
struct Delegated {
    dirs: Vec<PathBuf>,
}

impl Delegated {
    fn new(name: &str) -> Option<Self> {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = root.join("cgroup.controllers").exists()
            && std::fs::read_to_string(root.join("cgroup.controllers"))
                .is_ok_and(|c| c.contains("memory") && c.contains("pids"));
        let parents: Vec<PathBuf> = if v2 {
            vec![root.to_owned()]
        } else {
            ["cpu", "cpuacct", "memory", "pids", "freezer"]
                .iter()
                .map(|c| root.join(c))
                .filter(|p| p.is_dir())
                .collect()
        };
        if parents.is_empty() {
            eprintln!("skipped: no cgroup hierarchy here");
            return None;
        }
        let mut d = Self { dirs: Vec::new() };
        for p in parents {
            let dir = p.join(name);
            if d.dirs.iter().any(|x| x == &dir) || dir.exists() {
                continue;
            }
            std::fs::create_dir(&dir).unwrap();
            d.dirs.push(dir.clone());
            // The directory and its files, as systemd's `Delegate=yes`
            // does on v2.
            let own = |p: &Path| {
                std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
            };
            own(&dir);
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                own(&e.path());
            }
        }
        Some(d)
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        fn rm(dir: &Path) {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        rm(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        for d in &self.dirs {
            rm(d);
        }
    }
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn an_agent_that_is_not_root_runs_tasks_in_user_namespaces_under_its_cgroups() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: building the lab and delegating cgroups need root");
        return;
    }
    let parent = format!("shoal-deleg-{}", std::process::id());
    // Declared first: dropped after the lab has stopped the agent.
    let Some(_deleg) = Delegated::new(&parent) else {
        return;
    };
    let Some(mut lab) = lab("unpriv", 52, 1) else {
        return;
    };
    // (A scratch in memory needs a mount it cannot make: on disk, said.)
    lab.configs[0] = format!(
        "cgroup_parent = \"{parent}\"\nscratch = \"memory\"\n{}",
        lab.configs[0]
    );
    lab.start_agent_as(0, NOBODY, NOBODY, &[]).unwrap();
    lab.wait_ready(0, 1, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the agent did not come up: {}", lab.log(0)));
    let log = lab.log(0);
    assert!(!log.contains("check failed"), "start-up checks pass: {log}");
    assert!(
        log.contains("task scratch stays on disk") && log.contains("mounting a tmpfs"),
        "{log}"
    );

    // The submitter is `nobody` too, in a tree it owns.
    let (tree, home) = (lab.dir.join("tree"), lab.dir.join("home"));
    for d in [&tree, &home] {
        std::fs::create_dir_all(d).unwrap();
        std::os::unix::fs::chown(d, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::fs::write(tree.join("in.txt"), "input\n").unwrap();
    let bin = lab.user_shoal().unwrap();
    let run = |args: &[&str]| -> Output {
        Command::new(&bin)
            .arg("run")
            .arg("--data-dir")
            .arg(&lab.hosts[0].data_dir)
            .args(args)
            .current_dir(&tree)
            .env("HOME", &home)
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    let o = run(&[
        "--",
        "sh",
        "-c",
        "echo uid=$(id -u) host=$(hostname) pid=$$; cat in.txt; \
         echo shadow=$(cat /etc/shadow 2>/dev/null | wc -c); cat /proc/self/cgroup; \
         echo made > new.txt; rm in.txt; exit 0",
    ]);
    let (out, err) = (s(&o.stdout), s(&o.stderr));
    assert!(o.status.success(), "{out}{err}\n{}", lab.log(0));
    assert!(out.contains("uid=65534 host=h0 pid=2"), "{out}");
    assert!(out.contains("input"), "{out}");
    assert!(out.contains("shadow=0"), "/etc/shadow is masked: {out}");
    assert!(
        out.lines()
            .any(|l| l.contains(&format!("pids:/{parent}/task-"))),
        "under the delegated subtree: {out}"
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("new.txt")).unwrap(),
        "made\n"
    );
    assert!(!tree.join("in.txt").exists(), "the deletion came back");

    // The cgroup's limits hold: an out-of-memory kill is reported.
    let o = run(&["--mem", "64M", "--", "tail", "/dev/zero"]);
    assert_eq!(o.status.code(), Some(137), "{}", s(&o.stderr));
    assert!(s(&o.stderr).contains("out of memory"), "{}", s(&o.stderr));
    let o = run(&["--", "sh", "-c", "exit 42"]);
    assert_eq!(o.status.code(), Some(42));

    // Nothing of the tasks stays behind on the executor: their
    // directories (the overlay's work directory is left at mode 0) and
    // their cgroups.
    let tasks = lab.hosts[0].data_dir.join("tasks");
    let left = shoal_netns::wait_for(Duration::from_secs(5), || {
        shoal_netns::task_leftovers(&tasks).is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "task directories left: {:?}",
        shoal_netns::task_leftovers(&tasks)
    );
    // Stopped, it removes its groups and leaves the delegated subtree.
    lab.signal(0, nix::sys::signal::Signal::SIGTERM);
    assert!(lab.wait_exit(0, Duration::from_secs(10)).is_some());
    let log = lab.log(0);
    assert!(!log.contains("not fully removed"), "{log}");
    let groups = Path::new("/sys/fs/cgroup/pids").join(&parent);
    if groups.is_dir() {
        let left: Vec<_> = std::fs::read_dir(&groups)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "cgroups left: {left:?}");
    }
}
