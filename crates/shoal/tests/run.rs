//! `shoal run` on real agents in network namespaces (root; elsewhere each
//! test prints why it skipped): behaviour as if local, files, limits,
//! isolation, cleanup, and a distributed `make -j4`.

#![allow(clippy::unwrap_used)] // tests panic on purpose

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use shoal_netns::{wait_for, Lab};

/// A cluster of `n` formed hosts and a scratch tree to run from.
fn cluster(tag: &str, subnet: u8, n: usize) -> Option<(Lab, Tree)> {
    let mut lab = lab(tag, subnet, n)?;
    let all: Vec<usize> = (0..n).collect();
    start_all(&mut lab, &all, &[]);
    wait_alive(&lab, &all, &all, Duration::from_secs(20));
    wait_facts(&lab);
    let tree = Tree::new(&lab.dir.join("tree"));
    Some((lab, tree))
}

/// Waits until host 0 has every node's facts (checks, slots): placement
/// needs them.
fn wait_facts(lab: &Lab) {
    lab.wait_ready(0, lab.hosts.len(), Duration::from_secs(10))
        .expect("facts from every node");
}

struct Tree(PathBuf);

impl Tree {
    fn new(p: &Path) -> Self {
        std::fs::create_dir_all(p).unwrap();
        Self(p.to_owned())
    }
    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).unwrap();
    }
    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.0.join(name)).ok()
    }
}

/// `shoal run ARGS` from `tree`, through host 0's agent.
fn run(lab: &Lab, tree: &Tree, args: &[&str]) -> Command {
    let mut c = Command::new(shoal_bin());
    c.arg("run")
        .arg("--data-dir")
        .arg(&lab.hosts[0].data_dir)
        .args(args)
        .current_dir(&tree.0)
        .stdin(Stdio::null());
    c
}

/// `sh -c SCRIPT` run on h1 through h0's agent, to its end.
fn sh_on_h1(lab: &Lab, tree: &Tree, script: &str) -> Output {
    out(run(lab, tree, &["--node", "h1", "--", "sh", "-c", script]))
}

/// Reads the child's stderr up to "shoal: started on NODE" (`-v`) and
/// returns the node and the rest of stderr.
fn until_started(
    child: &mut std::process::Child,
) -> (String, BufReader<std::process::ChildStderr>) {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        if let Some(n) = line.trim().strip_prefix("shoal: started on ") {
            return (n.to_owned(), err);
        }
        line.clear();
    }
    panic!("the task never started");
}

/// How long the tests' long tasks sleep: a duration no other process on
/// the machine is likely to sleep (a plain `sleep 300` waiting in a shell
/// beside the tests was once taken for a task left behind), since the
/// checks find a task's process by its command line.
const TASK_SLEEP: &str = "300.0173";

/// `sleep SECS`'s command line, as in /proc/PID/cmdline.
fn sleep_cmdline(secs: &str) -> Vec<u8> {
    format!("sleep\x00{secs}\x00").into_bytes()
}

/// Whether some process on this machine has exactly this command line
/// (NUL-separated, as in /proc/PID/cmdline).
fn any_process_with_cmdline(want: &[u8]) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
}

fn out(mut c: Command) -> Output {
    c.output().unwrap()
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exit_status_streams_and_stdin_as_if_local() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = cluster("run1", 20, 3) else {
        return;
    };
    for code in [0, 1, 42] {
        let o = out(run(
            &lab,
            &tree,
            &["--node", "h1", "--", "sh", "-c", &format!("exit {code}")],
        ));
        assert_eq!(o.status.code(), Some(code), "{}", s(&o.stderr));
    }
    let o = sh_on_h1(&lab, &tree, "kill -KILL $$");
    assert_eq!(
        o.status.code(),
        Some(137),
        "death by SIGKILL is $? 137: {}",
        s(&o.stderr)
    );
    let o = out(run(
        &lab,
        &tree,
        &[
            "--node",
            "h2",
            "--",
            "sh",
            "-c",
            "echo o1; echo e1 >&2; echo o2; echo e2 >&2; echo $SHOAL_NODE",
        ],
    ));
    assert_eq!(s(&o.stdout), "o1\no2\nh2\n");
    assert_eq!(
        s(&o.stderr),
        "e1\ne2\n",
        "nothing of shoal's own without -v"
    );
    let mut c = run(&lab, &tree, &["--node", "h1", "--", "sort", "-r"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"a\nc\nb\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(s(&o.stdout), "c\nb\na\n");
    // No input here (stdin /dev/null): the task's stdin is /dev/null too,
    // here and relayed, not a pipe that ends at once.
    for node in ["h0", "h1"] {
        let stat = ["stat", "-L", "-c", "%F %t,%T", "/proc/self/fd/0"];
        let args: Vec<&str> = ["--node", node, "--"].into_iter().chain(stat).collect();
        let o = out(run(&lab, &tree, &args));
        assert_eq!(
            s(&o.stdout),
            "character special file 1,3\n",
            "{}",
            s(&o.stderr)
        );
    }
    let o = out(run(&lab, &tree, &["--", "no-such-command-here"]));
    assert_eq!(o.status.code(), Some(127));
    assert!(
        s(&o.stderr).contains("no-such-command-here: command not found"),
        "{}",
        s(&o.stderr)
    );
    // A file that is not executable: the shell's 126.
    std::fs::write(tree.0.join("not-a-program"), "data\n").unwrap();
    let o = out(run(&lab, &tree, &["--", "./not-a-program"]));
    assert_eq!(o.status.code(), Some(126), "{}", s(&o.stderr));
    assert!(
        s(&o.stderr).contains("./not-a-program: permission denied"),
        "{}",
        s(&o.stderr)
    );
    let o = out(run(&lab, &tree, &["--mem", "lots", "--", "true"]));
    assert_eq!(o.status.code(), Some(2));
    // An environment too large for one message to a warm slot's spawner
    // (256 KiB) starts in a fresh cgroup instead, whole.
    let big = "x".repeat(100_000);
    let mut c = run(
        &lab,
        &tree,
        &[
            "--node",
            "h1",
            "--",
            "sh",
            "-c",
            "echo ${#BIG1} ${#BIG2} ${#BIG3}; grep pids: /proc/self/cgroup | grep -c /task-",
        ],
    );
    c.env("BIG1", &big).env("BIG2", &big).env("BIG3", &big);
    let o = out(c);
    assert_eq!(
        s(&o.stdout),
        "100000 100000 100000\n1\n",
        "{}",
        s(&o.stderr)
    );
    // Longer than tokio's idle blocking threads live (10 s): a task forked
    // from one of them was SIGKILLed with it (PR_SET_PDEATHSIG follows the
    // forking thread).
    let o = out(run(&lab, &tree, &["--node", "h2", "--", "sleep", "12"]));
    assert_eq!(o.status.code(), Some(0), "{}", s(&o.stderr));
    let o = out(run(&lab, &tree, &["--node", "nowhere", "--", "true"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(s(&o.stderr).contains("unknown node"), "{}", s(&o.stderr));
}

#[test]
fn file_changes_come_back_only_on_success() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = cluster("run2", 21, 2) else {
        return;
    };
    tree.write("a.txt", "one\n");
    tree.write("gone.txt", "bye\n");
    std::fs::create_dir_all(tree.0.join("sub")).unwrap();
    tree.write("sub/keep.txt", "k\n");
    let o = sh_on_h1(&lab, &tree, "echo two >> a.txt; rm gone.txt; mkdir -p out; echo built > out/x; ln -s out/x latest; cat sub/keep.txt");
    assert!(o.status.success(), "{}", s(&o.stderr));
    assert_eq!(s(&o.stdout), "k\n", "the tree was shipped");
    assert_eq!(tree.read("a.txt").as_deref(), Some("one\ntwo\n"));
    assert_eq!(tree.read("gone.txt"), None, "deletion propagated");
    assert_eq!(tree.read("out/x").as_deref(), Some("built\n"));
    assert_eq!(
        std::fs::read_link(tree.0.join("latest")).unwrap(),
        PathBuf::from("out/x")
    );
    let o = sh_on_h1(&lab, &tree, "echo no > failed.txt; rm a.txt; exit 3");
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        tree.read("failed.txt"),
        None,
        "nothing applied from a failed task"
    );
    assert!(tree.read("a.txt").is_some());
    let o = out(run(
        &lab,
        &tree,
        &[
            "--node",
            "h1",
            "--commit",
            "always",
            "--",
            "sh",
            "-c",
            "echo yes > failed.txt; exit 3",
        ],
    ));
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(tree.read("failed.txt").as_deref(), Some("yes\n"));
    // Outputs larger than what a change set holds in memory (4 MiB): a
    // 12 MiB file and the second of two 3 MiB ones are streamed after it,
    // staged as they come, committed with the rest.
    let o = out(run(
        &lab,
        &tree,
        &[
            "--node",
            "h1",
            "--",
            "sh",
            "-c",
            "mkdir -p big && cd big && head -c 12582912 /dev/urandom > a.bin && \
             head -c 3145728 /dev/urandom > b.bin && head -c 3145728 /dev/urandom > c.bin && \
             : > empty && echo small > d.txt && sha256sum a.bin b.bin c.bin d.txt empty",
        ],
    ));
    assert!(o.status.success(), "{}", s(&o.stderr));
    let here = Command::new("sha256sum")
        .args(["a.bin", "b.bin", "c.bin", "d.txt", "empty"])
        .current_dir(tree.0.join("big"))
        .output()
        .unwrap();
    assert_eq!(s(&here.stdout), s(&o.stdout), "the large files came whole");
    let leftovers: Vec<_> = std::fs::read_dir(&tree.0)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".shoal-"))
        .collect();
    assert!(leftovers.is_empty(), "no staging left in the tree");
}

#[test]
fn limits_and_isolation() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("run3", 22, 3) else {
        return;
    };
    // h1 starts its tasks in warm slots (the default), h2 in fresh cgroups.
    lab.configs[2] = format!("warm_slots = 0\n{}", lab.configs[2]);
    start_all(&mut lab, &[0, 1, 2], &[]);
    wait_alive(&lab, &[0, 1, 2], &[0, 1, 2], Duration::from_secs(20));
    wait_facts(&lab);
    let tree = Tree::new(&lab.dir.join("tree"));
    {
        // A warm slot's root is shared by its tasks one after another: the
        // mount points a task's tree needed there go with the task.
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let outside = Path::new("/var/tmp").join(format!("shoal-run-{}", std::process::id()));
        let _gone = Gone(outside.clone());
        let far = Tree::new(&outside.join("proj"));
        let o = out(run(
            &lab,
            &far,
            &["--node", "h1", "--", "sh", "-c", "pwd; ls /"],
        ));
        let o = s(&o.stdout);
        assert!(o.lines().any(|l| l == "var"), "{o}");
        assert!(o.starts_with(&format!("{}\n", far.0.display())), "{o}");
        // The slot that ran it is the first one taken next (and so are
        // the others, soon): none shows it.
        for _ in 0..4 {
            let o = out(run(&lab, &tree, &["--node", "h1", "--", "ls", "/"]));
            assert!(
                !s(&o.stdout).lines().any(|l| l == "var"),
                "{}",
                s(&o.stdout)
            );
        }
    }
    for (node, cgroup) in [("h1", "/warm-"), ("h2", "/task-")] {
        // (h1's slots are made in the background after its start: until
        // one is ready, its tasks get fresh cgroups too.)
        let mut seen = String::new();
        let found = wait_for(Duration::from_secs(10), || {
            let o = out(run(
                &lab,
                &tree,
                &["--node", node, "--", "cat", "/proc/self/cgroup"],
            ));
            seen = s(&o.stdout);
            seen.contains(&format!("pids:/shoal-{node}{cgroup}"))
                .then_some(())
        });
        assert!(found.is_some(), "{node}: {seen}");
        let o = out(run(
            &lab,
            &tree,
            &["--node", node, "--mem", "64M", "--", "tail", "/dev/zero"],
        ));
        assert_eq!(o.status.code(), Some(137), "{node}");
        assert!(s(&o.stderr).contains("out of memory"), "{}", s(&o.stderr));
        let o = out(run(
            &lab,
            &tree,
            &[
                "--node",
                node,
                "--pids",
                "24",
                "--",
                "sh",
                "-c",
                "i=0; while [ $i -lt 100 ]; do sleep 5 & i=$((i+1)); done; wait",
            ],
        ));
        assert!(
            s(&o.stderr).to_lowercase().contains("fork"),
            "{node}: the fork bomb hit the pids limit: {}",
            s(&o.stderr)
        );
        assert!(nodes(&lab, 1).is_some(), "the executor is still there");
        // Only loopback, unless asked for the host's network.
        let o = out(run(
            &lab,
            &tree,
            &["--node", node, "--", "cat", "/proc/net/dev"],
        ));
        let devs = s(&o.stdout);
        assert!(
            devs.contains("lo:") && !devs.contains("veth") && !devs.contains("eth"),
            "{node}: {devs}"
        );
        let o = out(run(
            &lab,
            &tree,
            &[
                "--node",
                node,
                "--net",
                "host",
                "--",
                "cat",
                "/proc/net/dev",
            ],
        ));
        assert!(s(&o.stdout).lines().count() > 3, "{node}: {}", s(&o.stdout));
        let key = lab.dir.join("cluster.key");
        let script = format!(
            "cat /etc/shadow | wc -c; cat {} 2>&1 | head -c 200; ls /root 2>&1 | head -1; id -u",
            key.display()
        );
        let o = out(run(
            &lab,
            &tree,
            &["--node", node, "--", "sh", "-c", &script],
        ));
        let t = s(&o.stdout);
        let host_key = std::fs::read_to_string(&key).unwrap();
        assert!(t.starts_with("0\n"), "no /etc/shadow content: {t}");
        assert!(!t.contains(host_key.trim()), "the agent key leaked: {t}");
        assert!(t.contains("No such file"), "{t}");
        assert!(t.trim_end().ends_with("65534"), "{t}");
        // The end is reported before the workspace's teardown, on both
        // paths: the status, the output and the changes are all there.
        let o = out(run(
            &lab,
            &tree,
            &[
                "--node",
                node,
                "--",
                "sh",
                "-c",
                &format!("echo {node} > by-{node}.txt; echo out; exit 42"),
            ],
        ));
        assert_eq!(o.status.code(), Some(42), "{node}: {}", s(&o.stderr));
        assert_eq!(s(&o.stdout), "out\n", "{node}");
        let o = out(run(
            &lab,
            &tree,
            &[
                "--node",
                node,
                "--commit",
                "always",
                "--",
                "sh",
                "-c",
                &format!("echo {node} > by-{node}.txt; kill -KILL $$"),
            ],
        ));
        // Death by a signal is 128 + the signal, as a shell's `$?`.
        assert_eq!(o.status.code(), Some(137), "{node}: {}", s(&o.stderr));
        assert_eq!(
            tree.read(&format!("by-{node}.txt")).as_deref(),
            Some(format!("{node}\n").as_str()),
            "{node}: committed"
        );
        // And the workspace is gone afterwards: no task directory, and
        // no task cgroup (h2) or nothing but the spawners (h1).
        let host = if node == "h1" { 1 } else { 2 };
        let tasks = lab.hosts[host].data_dir.join("tasks");
        let clean = wait_for(Duration::from_secs(10), || {
            let no_dirs = shoal_netns::task_leftovers(&tasks).is_empty();
            let cg = Path::new("/sys/fs/cgroup/pids").join(format!("shoal-{node}"));
            let no_tasks = std::fs::read_dir(&cg).map_or(true, |d| {
                d.flatten()
                    .all(|e| !e.file_name().to_string_lossy().starts_with("task-"))
            });
            (no_dirs && no_tasks).then_some(())
        });
        assert!(
            clean.is_some(),
            "{node}: a task's directory or cgroup was left"
        );
    }
}

#[test]
fn warm_slots_serve_task_after_task_with_their_workspaces_made_ahead() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = cluster("run13", 32, 2) else {
        return;
    };
    let pids = Path::new("/sys/fs/cgroup/pids/shoal-h1");
    // Each idle slot: its spawner and the next task's workspace (its
    // supervisor and pid 1), made ahead.
    let slots = || -> Vec<(String, usize)> {
        let mut v: Vec<_> = std::fs::read_dir(pids)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("warm-"))
                    .map(|e| {
                        let n = std::fs::read_to_string(e.path().join("cgroup.procs"))
                            .unwrap_or_default()
                            .lines()
                            .count();
                        (e.file_name().to_string_lossy().into_owned(), n)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let ready = wait_for(Duration::from_secs(20), || {
        let s = slots();
        (s.len() >= 4 && s.iter().all(|(_, n)| *n == 2)).then_some(s)
    })
    .unwrap_or_else(|| panic!("slots with their spares: {:?}", slots()));
    // Tasks that end every way: exit codes, a signal, a command that does
    // not exist, output and input.
    for (script, code) in [
        ("exit 0", 0),
        ("echo out; echo err >&2; exit 7", 7),
        ("kill -TERM $$", 143),
        ("read x; test \"$x\" = hi", 0),
    ] {
        let mut c = run(&lab, &tree, &["--node", "h1", "--", "sh", "-c", script]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"hi\n").unwrap();
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(code), "{script}: {}", s(&o.stderr));
        if code == 7 {
            assert_eq!(s(&o.stdout), "out\n");
            assert_eq!(s(&o.stderr), "err\n");
        }
    }
    let o = out(run(&lab, &tree, &["--node", "h1", "--", "no-such-command"]));
    assert_eq!(o.status.code(), Some(127), "{}", s(&o.stderr));
    assert!(
        s(&o.stderr).contains("command not found"),
        "{}",
        s(&o.stderr)
    );
    // A guest's command runs at the idle class; its workspace's pid 1
    // (set-up and teardown, the agent's work) does not.
    let o = sh_on_h1(
        &lab,
        &tree,
        "echo $(cut -d' ' -f41 /proc/self/stat) $(cut -d' ' -f41 /proc/1/stat)",
    );
    assert_eq!(s(&o.stdout), "5 0\n", "{}", s(&o.stderr));
    // What a command leaves running when it ends dies with it: it neither
    // writes into the change set nor lands later.
    let o = out(run(
        &lab,
        &tree,
        &[
            "--node",
            "h1",
            "--commit",
            "always",
            "--",
            "sh",
            "-c",
            "(sleep 0.3; echo late > late.txt) >/dev/null 2>&1 & echo early > early.txt",
        ],
    ));
    assert_eq!(o.status.code(), Some(0), "{}", s(&o.stderr));
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        tree.0.join("early.txt").exists(),
        "the command's own change"
    );
    assert!(
        !tree.0.join("late.txt").exists(),
        "a process the command left wrote after it ended"
    );
    std::fs::remove_file(tree.0.join("early.txt")).unwrap();
    // The same slots, none replaced, each with a spare again (the one
    // whose spare the missing command used makes its next one after its
    // next task).
    let after = wait_for(Duration::from_secs(10), || {
        let s = slots();
        (s.iter().filter(|(_, n)| *n == 2).count() >= ready.len() - 1).then_some(s)
    })
    .unwrap_or_else(|| panic!("after: {:?}", slots()));
    let names = |v: &[(String, usize)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&after), names(&ready), "no slot was replaced");
}

/// `shoal run --node h1 -- sleep SECS`, started, its process visible here
/// (with the client's stderr, kept open).
/// The trees mounted (by any process, in any mount namespace) at the
/// mount points a warm slot's spawner keeps under `tasks`.
/// A 1-host lab whose agent has one warm slot (every task runs in it, one
/// after another), up and with its facts, and a tree holding `a.txt`.
fn one_slot_lab(tag: &str, subnet: u8, a_txt: &str) -> Option<(Lab, Tree)> {
    let mut lab = lab(tag, subnet, 1)?;
    lab.configs[0] = format!("warm_slots = 1\n{}", lab.configs[0]);
    start_all(&mut lab, &[0], &[]);
    wait_alive(&lab, &[0], &[0], Duration::from_secs(20));
    wait_facts(&lab);
    let tree = Tree::new(&lab.dir.join("tree"));
    tree.write("a.txt", a_txt);
    Some((lab, tree))
}

/// Waits until one of h0's warm slots is back in its pool with the next
/// task's workspace made ahead (a task's end reaches its submitter before
/// that): its spawner and that workspace's pid 1 in its cgroup. The
/// workspace must be a new one: the last task's pid 1, on its way out, is
/// two with the spawner too.
fn warm_slot_ready() {
    // The workspaces made ahead seen ready so far (the spawner's pid is
    // seen again: a new pid beside it makes a new workspace).
    static SEEN: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let ready = wait_for(Duration::from_secs(20), || {
        let d = std::fs::read_dir("/sys/fs/cgroup/pids/shoal-h0").ok()?;
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("warm-"))
            .find_map(|e| {
                let procs = std::fs::read_to_string(e.path().join("cgroup.procs")).ok()?;
                let pids: BTreeSet<u32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
                (pids.len() == 2 && pids.difference(&seen).count() >= 1).then_some(pids)
            })
    });
    let Some(pids) = ready else {
        panic!("h0's warm slot");
    };
    seen.extend(pids);
}

fn kept_tree_mounts(tasks: &Path) -> std::collections::BTreeSet<String> {
    let prefix = tasks.to_string_lossy().into_owned();
    let mut out = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(e.path().join("mountinfo")) else {
            continue;
        };
        for line in info.lines() {
            let Some((head, tail)) = line.split_once(" - ") else {
                continue;
            };
            let at = head.split(' ').nth(4).unwrap_or_default();
            if tail.starts_with("overlay shoal-tree ") && at.starts_with(&prefix) {
                // A task directory serves task after task: a tree's mount is
                // told by its layers too, not its place alone (the copies
                // of it in other namespaces show the same).
                out.insert(format!("{at} {tail}"));
            }
        }
    }
    out
}

#[test]
fn a_warm_slot_keeps_a_tree_mounted_only_while_its_tasks_leave_it_as_it_was() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = one_slot_lab("run14", 33, "hi\n") else {
        return;
    };
    let tasks = lab.hosts[0].data_dir.join("tasks");
    let sh = |commit: &str, script: &str| {
        warm_slot_ready();
        let o = out(run(
            &lab,
            &tree,
            &["--local", "--commit", commit, "--", "sh", "-c", script],
        ));
        assert!(o.status.success(), "{script}: {}", s(&o.stderr));
        s(&o.stdout)
    };
    let kept = || {
        wait_for(Duration::from_secs(5), || {
            let m = kept_tree_mounts(&tasks);
            (m.len() == 1).then_some(m)
        })
        .unwrap_or_else(|| panic!("one kept tree: {:?}", kept_tree_mounts(&tasks)))
    };
    let none_kept = || {
        wait_for(Duration::from_secs(5), || {
            kept_tree_mounts(&tasks).is_empty().then_some(())
        })
        .unwrap_or_else(|| panic!("no kept tree: {:?}", kept_tree_mounts(&tasks)))
    };

    // A task that only reads leaves its tree mounted for the next, which
    // is served from it.
    assert_eq!(sh("success", "cat a.txt"), "hi\n");
    let first = kept();
    assert_eq!(sh("success", "cat a.txt; ls"), "hi\na.txt\n");
    assert_eq!(kept(), first, "the same mount served the second task");

    // A task that changes the tree (files made and removed, nothing
    // committed): the mount goes, and the next task sees the tree as it is.
    assert_eq!(sh("never", "echo x > junk; rm a.txt; ls"), "junk\n");
    none_kept();
    assert_eq!(sh("success", "ls"), "a.txt\n");
    kept();
    // So does one that changes the tree's top directory itself.
    assert_eq!(sh("never", "chmod 700 .; stat -c %a ."), "700\n");
    none_kept();
    assert_eq!(sh("success", "stat -c %a ."), "755\n");
    // A task whose changes are committed changes the submitter's tree: the
    // next task has that tree, in a mount of its own.
    let before = kept();
    assert_eq!(sh("success", "echo new > b.txt"), "");
    assert_eq!(tree.read("b.txt").as_deref(), Some("new\n"));
    assert_eq!(sh("success", "cat b.txt"), "new\n");
    let after = kept();
    assert_eq!(after.len(), 1);
    assert_ne!(after, before, "a new tree, a new mount");
    // A kept tree that a new tree replaces (the submitter's files changed
    // between two runs that change nothing) is unmounted once the slot is
    // back, and the new one kept.
    tree.write("c.txt", "c\n");
    assert_eq!(sh("success", "cat c.txt b.txt"), "c\nnew\n");
    let last = kept();
    assert_ne!(last, after, "the replaced tree is unmounted");
    assert_eq!(sh("success", "cat c.txt"), "c\n");
    assert_eq!(kept(), last, "and the new one serves the next task");
    // Nothing of any task is left beside the kept tree's clean directory.
    assert!(
        shoal_netns::task_leftovers(&tasks).is_empty(),
        "{:?}",
        shoal_netns::task_leftovers(&tasks)
    );
}

fn sleeping_on_h1(
    lab: &Lab,
    tree: &Tree,
    secs: &str,
) -> (std::process::Child, BufReader<std::process::ChildStderr>) {
    let mut c = run(lab, tree, &["-v", "--node", "h1", "--", "sleep", secs]);
    c.stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let (_, err) = until_started(&mut child);
    // `Started` is told once the command's exec has let pid 1 go on, which
    // is before the kernel has set the new program's arguments: a guest at
    // the idle class on a busy machine can take a while to get there.
    let want = sleep_cmdline(secs);
    assert!(
        wait_for(Duration::from_secs(10), || {
            any_process_with_cmdline(&want).then_some(())
        })
        .is_some(),
        "the checks can see the task's process"
    );
    (child, err)
}

#[test]
fn a_killed_submitter_leaves_nothing_behind_on_the_executor() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = cluster("run4", 23, 2) else {
        return;
    };
    let (mut child, _err) = sleeping_on_h1(&lab, &tree, TASK_SLEEP);
    let tasks = lab.hosts[1].data_dir.join("tasks");
    assert_eq!(
        std::fs::read_dir(&tasks).unwrap().count(),
        1,
        "the task is running"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let clean = wait_for(Duration::from_secs(10), || {
        let no_dirs = shoal_netns::task_leftovers(&tasks).is_empty();
        // No task cgroup left, and the warm slots' hold nothing but their
        // spawners.
        let cg = Path::new("/sys/fs/cgroup/pids/shoal-h1");
        let no_cgroups = std::fs::read_dir(cg)
            .map(|d| {
                d.flatten().all(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with("warm-") {
                        std::fs::read_to_string(e.path().join("cgroup.procs"))
                            .unwrap_or_default()
                            .lines()
                            .all(|p| {
                                std::fs::read(format!("/proc/{p}/cmdline"))
                                    .is_ok_and(|c| c.windows(11).any(|w| w == b"\x00__spawner\x00"))
                            })
                    } else {
                        !n.starts_with("task-")
                    }
                })
            })
            .unwrap_or(true);
        let no_proc = !any_process_with_cmdline(&sleep_cmdline(TASK_SLEEP));
        (no_dirs && no_cgroups && no_proc).then_some(())
    });
    assert!(
        clean.is_some(),
        "the executor kept the task's process ({}), cgroup or files ({:?}); h1's groups: {:?}",
        describe_process(&sleep_cmdline(TASK_SLEEP)),
        shoal_netns::task_leftovers(&tasks),
        std::fs::read_dir("/sys/fs/cgroup/pids/shoal-h1")
            .map(|d| d
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("task-") || n.starts_with("warm-"))
                .collect::<Vec<_>>())
            .unwrap_or_default()
    );
}

/// What the kernel says of the process with this command line, if any (for
/// a failure's message): its state, where it waits, its cgroups and their
/// freezer's state.
fn describe_process(want: &[u8]) -> String {
    let Some(pid) = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        let ok = n.chars().all(|c| c.is_ascii_digit())
            && std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want);
        ok.then_some(n)
    }) else {
        return "none".into();
    };
    let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
    let status = read("status");
    let line = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_default()
            .to_owned()
    };
    let cgroups = read("cgroup");
    let freezer = cgroups
        .lines()
        .find_map(|l| l.split_once(":freezer:").map(|(_, p)| p.to_owned()))
        .unwrap_or_default();
    let state = std::fs::read_to_string(format!("/sys/fs/cgroup/freezer{freezer}/freezer.state"))
        .unwrap_or_default();
    // Its age, to tell a process of this test's from one left by another.
    let ticks: f64 = read("stat")
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().nth(19))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0.0);
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    format!(
        "pid {pid}, started {:.1} s ago, {}, {}, {}, wchan {}, sched policy {}, freezer {freezer} {}, cgroups {:?}",
        uptime - ticks / hz,
        line("State:"),
        line("SigPnd:"),
        line("ShdPnd:"),
        read("wchan"),
        read("stat")
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(38))
            .unwrap_or("?")
            .to_owned(),
        state.trim(),
        cgroups.lines().collect::<Vec<_>>()
    )
}

#[test]
fn a_warm_start_that_fails_leaves_no_directory_behind() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = one_slot_lab("run15", 34, "1\n") else {
        return;
    };
    let tasks = lab.hosts[0].data_dir.join("tasks");
    let cat = || {
        let o = out(run(&lab, &tree, &["--local", "--", "cat", "a.txt"]));
        assert!(o.status.success(), "{}", s(&o.stderr));
        s(&o.stdout)
    };
    // The one slot keeps this tree mounted in a directory of its own.
    warm_slot_ready();
    assert_eq!(cat(), "1\n");
    warm_slot_ready();
    // Its spawner (and the spare workspace it made ahead) dies while the
    // slot waits in the pool...
    let data_dir = lab.hosts[0].data_dir.to_string_lossy().into_owned();
    let mut killed = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(c) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&c);
        if c.contains("\0__spawner\0") && c.contains(&data_dir) {
            let pid: i32 = e.file_name().to_string_lossy().parse().unwrap();
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed.push(pid);
        }
    }
    assert!(!killed.is_empty(), "the slot's spawner was found");
    // Dead, its socket closed (a zombie until the agent reaps it): the
    // start fails before its request is sent.
    let dead = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
            st.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    assert!(
        wait_for(Duration::from_secs(5), || killed
            .iter()
            .all(dead)
            .then_some(()))
        .is_some(),
        "the slot's processes died"
    );
    // ... and the next task, with a new tree (so a new directory made for
    // the slot to keep), is given it: the start fails before the request
    // is sent, the task runs in a fresh cgroup and a directory of its own.
    tree.write("a.txt", "2\n");
    assert_eq!(cat(), "2\n");
    assert!(
        lab.log(0).contains("warm slot failed"),
        "the task was given the dead slot: {}",
        lab.log(0)
    );
    // Left: the directory it ran in (kept for a next task). Not the dead
    // slot's, nor the one made for the failed start.
    let dirs = || {
        std::fs::read_dir(&tasks)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        wait_for(Duration::from_secs(10), || (dirs().len() == 1)
            .then_some(()))
        .is_some(),
        "task directories left: {:?}",
        dirs()
    );
}

#[test]
fn a_task_whose_submitter_is_cut_off_dies_on_the_executor() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = cluster("run12", 31, 2) else {
        return;
    };
    let (mut child, _err) = sleeping_on_h1(&lab, &tree, TASK_SLEEP);
    // The submitter's machine vanishes: nothing it sends (its agent's FIN
    // when the client dies) reaches the executor, whose link stays
    // half-open. Only the link's own probes can tell.
    lab.partition(&[1]).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let gone = wait_for(Duration::from_secs(60), || {
        (!any_process_with_cmdline(&sleep_cmdline(TASK_SLEEP))).then_some(())
    });
    lab.heal().unwrap();
    assert!(
        gone.is_some(),
        "the executor kept running a task whose submitter is gone"
    );
}

#[test]
fn make_j4_with_shoal_run_as_cc_across_three_hosts() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if Command::new("make").arg("--version").output().is_err()
        || Command::new("gcc").arg("--version").output().is_err()
    {
        eprintln!("skipped: make and gcc are needed");
        return;
    }
    let Some((lab, tree)) = cluster("run5", 24, 3) else {
        return;
    };
    let mut objs = Vec::new();
    let mut decls = String::new();
    let mut calls = String::new();
    for i in 0..8 {
        tree.write(
            &format!("f{i}.c"),
            &format!("int f{i}(void) {{ return {}; }}\n", i * 10 + 1),
        );
        decls.push_str(&format!("int f{i}(void);\n"));
        calls.push_str(&format!(" + f{i}()"));
        objs.push(format!("f{i}.o"));
    }
    tree.write("main.c", &format!("#include <stdio.h>\n{decls}int main(void) {{ printf(\"%d\\n\", 0{calls}); return 0; }}\n"));
    tree.write(
        "Makefile",
        &format!(
            "prog: main.o {objs}\n\t$(CC) -o prog main.o {objs}\n%.o: %.c\n\t$(CC) -c $< -o $@\n",
            objs = objs.join(" ")
        ),
    );
    let cc = format!(
        "{} run -v --data-dir {} --",
        shoal_bin().display(),
        lab.hosts[0].data_dir.display()
    );
    let o = Command::new("make")
        .args(["-j4", &format!("CC={cc} gcc")])
        .current_dir(&tree.0)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", s(&o.stdout), s(&o.stderr));
    let prog = Command::new(tree.0.join("prog")).output().unwrap();
    let expected: i32 = (0..8).map(|i| i * 10 + 1).sum();
    assert_eq!(s(&prog.stdout).trim(), expected.to_string());
    let err = s(&o.stderr);
    let mut used: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("shoal: started on "))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(
        used.len() >= 2,
        "the compiles were spread over the cluster: {used:?}\n{err}"
    );
}

/// Three hosts, h0 lending no slots, and `sh -c SCRIPT` started with `-v`
/// from h0 on h1 or h2: the lab, the tree, the client, where it started
/// and the rest of its stderr.
fn started_on_h1_or_h2(
    tag: &str,
    subnet: u8,
    script: &str,
) -> Option<(
    Lab,
    Tree,
    std::process::Child,
    String,
    BufReader<std::process::ChildStderr>,
)> {
    let mut lab = lab(tag, subnet, 3)?;
    lab.start_agent(0, &["--slots", "0"]).unwrap();
    start_all(&mut lab, &[1, 2], &[]);
    wait_alive(&lab, &[0, 1, 2], &[0, 1, 2], Duration::from_secs(20));
    wait_facts(&lab);
    let tree = Tree::new(&lab.dir.join("tree"));
    let mut c = run(&lab, &tree, &["-v", "--", "sh", "-c", script]);
    c.stderr(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let (first, err) = until_started(&mut child);
    assert!(first == "h1" || first == "h2", "started on {first}");
    Some((lab, tree, child, first, err))
}

#[test]
fn an_executor_killed_mid_task_is_replaced_and_the_result_lands_once() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((mut lab, tree, child, first, mut err)) = started_on_h1_or_h2(
        "run6",
        25,
        "echo begin; sleep 2; echo finished > done.txt; echo end",
    ) else {
        return;
    };
    let victim: usize = first.trim_start_matches('h').parse().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.signal(victim, nix::sys::signal::Signal::SIGKILL);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{rest}");
    assert_eq!(
        s(&o.stdout),
        "begin\nend\n",
        "output once, not repeated: {rest}"
    );
    assert_eq!(tree.read("done.txt").as_deref(), Some("finished\n"));
    assert!(rest.contains("running it again elsewhere"), "{rest}");
    let second: Vec<&str> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("shoal: started on "))
        .collect();
    assert_eq!(second.len(), 1, "{rest}");
    assert_ne!(second[0], first, "{rest}");
}

#[test]
fn ctrl_c_at_the_submitter_reaches_the_remote_task() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = cluster("run7", 26, 2) else {
        return;
    };
    let mut c = run(&lab, &tree, &["-v", "--node", "h1", "--", "sleep", "30"]);
    c.stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let (_node, _err) = until_started(&mut child);
    let t = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "the task died of SIGINT: {st:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// Task connections h1's agent holds open, as `ss` sees them in h1's
/// namespace (the agent's TCP service port is the lab's SWIM port).
fn task_links_on_h1(lab: &Lab) -> usize {
    let port = lab.hosts[1].addr().rsplit(':').next().unwrap().to_owned();
    let o = lab
        .cmd(1, "ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "ss: {}", s(&o.stderr));
    s(&o.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn relayed_runs_reuse_one_link_and_late_input_does_not_reach_the_next_task() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = cluster("run16", 35, 2) else {
        return;
    };
    assert_eq!(task_links_on_h1(&lab), 0, "no task yet");
    for i in 0..4 {
        let o = sh_on_h1(
            &lab,
            &tree,
            &format!("echo run {i} on $SHOAL_NODE; exit {i}"),
        );
        assert_eq!(o.status.code(), Some(i), "{}", s(&o.stderr));
        assert_eq!(s(&o.stdout), format!("run {i} on h1\n"));
    }
    // The relaying agent kept the link of each ended task and sent the
    // next one on it: one connection for four tasks.
    assert_eq!(task_links_on_h1(&lab), 1, "one kept link");
    // Input still coming after the task ended (`head` exits at once, `yes`
    // writes on): relayed after the end, the executor passes it by.
    let mut c = run(&lab, &tree, &["--node", "h1", "--", "head", "-c", "2"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let chunk = [b'y'; 4096];
        // (Until the client is gone: then the pipe breaks.)
        while stdin.write_all(&chunk).is_ok() {}
    });
    let o = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert_eq!(s(&o.stdout), "yy", "{}", s(&o.stderr));
    assert_eq!(o.status.code(), Some(0));
    for _ in 0..3 {
        let o = sh_on_h1(&lab, &tree, "cat; echo after");
        assert_eq!(s(&o.stdout), "after\n", "{}", s(&o.stderr));
        assert_eq!(o.status.code(), Some(0));
    }
    assert!(task_links_on_h1(&lab) <= 2, "links kept, not one per task");
    // A submitter killed mid-task: its link is dropped, and with it the
    // task (as before links were kept).
    let mut c = run(
        &lab,
        &tree,
        &["-v", "--node", "h1", "--", "sleep", TASK_SLEEP],
    );
    c.stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let (_node, _err) = until_started(&mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    let gone = shoal_netns::wait_for(Duration::from_secs(10), || {
        (!any_process_with_cmdline(&sleep_cmdline(TASK_SLEEP))).then_some(())
    });
    assert!(gone.is_some(), "the task died with its submitter's link");
    let o = sh_on_h1(&lab, &tree, "echo still");
    assert_eq!(s(&o.stdout), "still\n", "{}", s(&o.stderr));
}

#[test]
fn a_kept_link_passes_by_what_came_after_its_last_task_ended() {
    use shoal_task::link;
    use shoal_task::proto::{Commit, FromExec, Status, TaskSpec, ToExec};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = cluster("run17", 36, 2) else {
        return;
    };
    let key = shoal_transport::ClusterKey::load(&lab.dir.join("cluster.key")).unwrap();
    let netns = lab.hosts[0].netns.clone();
    let addr: std::net::SocketAddr = lab.hosts[1].addr().parse().unwrap();
    let cwd = tree.0.clone();
    // As h0's agent relaying `shoal run`s: one link, task after task, with
    // what a submitter may still send after its task's end in between.
    let outs = std::thread::spawn(move || {
        // (This thread only, into h0's network.)
        let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let hello = shoal_agent::peer::Hello::Runs;
            let (mut rx, mut tx) = shoal_agent::peer::connect_task(addr, &key, "lab", hello)
                .await
                .unwrap();
            let mut outs = Vec::new();
            for (i, script) in ["echo first", "echo second", "echo third"]
                .iter()
                .enumerate()
            {
                let spec = TaskSpec {
                    task_id: format!("late{i}"),
                    argv: vec![b"sh".to_vec(), b"-c".to_vec(), script.as_bytes().to_vec()],
                    env: vec![(b"PATH".to_vec(), b"/usr/bin:/bin".to_vec())],
                    cwd: cwd.clone(),
                    tree: Vec::new(),
                    resources: Default::default(),
                    net_host: false,
                    commit: Commit::Never,
                    tty: None,
                    image: None,
                    detach: false,
                    no_input: false,
                };
                link::send(&mut tx, &ToExec::Start(spec)).await.unwrap();
                let mut out = Vec::new();
                loop {
                    match link::recv::<FromExec, _>(&mut rx).await {
                        Ok(FromExec::Stdout(d)) => out.extend(d),
                        Ok(FromExec::Exit { status, .. }) => {
                            assert_eq!(status, Status::Code(0));
                            break;
                        }
                        Ok(FromExec::Failed { message, .. }) => panic!("task {i}: {message}"),
                        Ok(_) => {}
                        Err(e) => panic!("task {i}: the link broke: {e}"),
                    }
                }
                outs.push(String::from_utf8(out).unwrap());
                link::send(&mut tx, &ToExec::Stdin(b"late".to_vec()))
                    .await
                    .unwrap();
                link::send(&mut tx, &ToExec::StdinEof).await.unwrap();
                link::send(&mut tx, &ToExec::Signal(15)).await.unwrap();
            }
            outs
        })
    })
    .join()
    .unwrap();
    assert_eq!(outs, ["first\n", "second\n", "third\n"]);
}

#[test]
fn an_executor_cut_off_by_a_partition_is_replaced_and_the_result_lands_once() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree, child, first, mut err)) = started_on_h1_or_h2(
        "run9",
        27,
        "echo begin; sleep 3; echo $SHOAL_NODE >> done.txt; echo end",
    ) else {
        return;
    };
    let victim: usize = first.trim_start_matches('h').parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The executor's TCP connection stays half-open; only membership can
    // tell the submitter's agent that it is gone.
    lab.partition(&[victim]).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    lab.heal().unwrap();
    assert!(o.status.success(), "{rest}");
    assert_eq!(s(&o.stdout), "begin\nend\n", "{rest}");
    assert!(rest.contains("running it again elsewhere"), "{rest}");
    let other = if victim == 1 { "h2" } else { "h1" };
    // The cut-off executor's attempt never commits, even after the heal.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        tree.read("done.txt").as_deref(),
        Some(format!("{other}\n").as_str()),
        "committed once, by the replacement: {rest}"
    );
}

#[test]
fn dash_t_gives_the_command_a_terminal_of_this_size_and_forwards_keystrokes() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, tree)) = cluster("run10", 28, 2) else {
        return;
    };
    use std::io::Read;
    let ws = nix::pty::Winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).unwrap();
    let slave = |f: &std::os::fd::OwnedFd| Stdio::from(f.try_clone().unwrap());
    let mut c = run(
        &lab,
        &tree,
        &[
            "-t",
            "--node",
            "h1",
            "--",
            "sh",
            "-c",
            "test -t 0 && echo isatty; stty size; read x; echo got:$x; exit 7",
        ],
    );
    c.stdin(slave(&pty.slave))
        .stdout(slave(&pty.slave))
        .stderr(slave(&pty.slave));
    let mut child = c.spawn().unwrap();
    // Only the client may hold the terminal's slave side now: its end is
    // the end of the output.
    drop(c);
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    // A keystroke line, typed at this terminal (raw here, cooked there).
    std::io::Write::write_all(&mut master, b"hello\r").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(out);
    });
    let t0 = std::time::Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("shoal run -t did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let o = s(&out);
    eprintln!("terminal showed: {o:?}");
    assert_eq!(st.code(), Some(7), "{o}");
    assert!(o.contains("isatty"), "{o}");
    assert!(o.contains("30 100"), "the terminal's size: {o}");
    assert!(o.contains("got:hello"), "keystrokes reach the command: {o}");
}

#[test]
fn an_unreadable_tree_and_a_full_executor_disk_are_one_clear_line_each() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("run11", 29, 2) else {
        return;
    };
    // h1's data dir (cache and task directories) is a 4 MiB disk.
    let _disk = Tmpfs::mount(&lab.hosts[1].data_dir, "4m");
    start_all(&mut lab, &[0, 1], &[]);
    wait_alive(&lab, &[0, 1], &[0, 1], Duration::from_secs(20));
    wait_facts(&lab);

    // An unreadable file in the tree: exit 2, the file named, nothing run.
    let tree = Tree::new(&lab.dir.join("locked"));
    tree.write("ok.txt", "fine");
    tree.write("secret.txt", "no");
    std::os::unix::fs::chown(&tree.0, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(
        tree.0.join("secret.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(shoal_bin())
        .arg("run")
        .arg("--data-dir")
        .arg(&lab.hosts[0].data_dir)
        .args(["--", "touch", "ran"])
        .current_dir(&tree.0)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let e = s(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("secret.txt") && e.lines().count() == 1, "{e}");
    assert!(tree.read("ran").is_none());

    // A tree bigger than the executor's disk: one line naming the node and
    // the cause, exit 125, nothing applied here.
    let big = Tree::new(&lab.dir.join("big"));
    let data: Vec<u8> = (0..6_000_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761) as u8)
        .collect();
    std::fs::write(big.0.join("blob.bin"), &data).unwrap();
    let o = out(run(
        &lab,
        &big,
        &["--node", "h1", "--", "sh", "-c", "echo x > made"],
    ));
    let e = s(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{e}");
    assert!(
        e.contains("h1") && e.contains("No space left on device"),
        "{e}"
    );
    assert!(big.read("made").is_none(), "nothing half-applied");
    // A task that fills the executor's disk itself fails as it would here.
    let small = Tree::new(&lab.dir.join("small"));
    let o = out(run(
        &lab,
        &small,
        &[
            "--node",
            "h1",
            "--",
            "sh",
            "-c",
            "head -c 6000000 /dev/zero > f && echo x > made",
        ],
    ));
    let e = s(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{e}");
    assert!(e.contains("No space left on device"), "{e}");
    assert!(small.read("f").is_none() && small.read("made").is_none());
}

/// The lines of every process's mount table that mention `needle`.
fn mounts_mentioning(needle: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(info) = std::fs::read_to_string(e.path().join("mountinfo")) {
            out.extend(
                info.lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| l.split_once(' ').map_or(l, |(_, r)| r).to_owned()),
            );
        }
    }
    out
}

#[test]
fn a_scratch_in_memory_holds_the_tasks_writes_up_to_its_size_and_goes_with_the_agent() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("run18", 37, 2) else {
        return;
    };
    // h1's task scratch: a tmpfs of 8 MiB.
    lab.configs[1] = format!(
        "scratch = \"memory\"\nscratch_bytes = 8388608\n{}",
        lab.configs[1]
    );
    start_all(&mut lab, &[0, 1], &[]);
    wait_alive(&lab, &[0, 1], &[0, 1], Duration::from_secs(20));
    wait_facts(&lab);
    let mem = lab.hosts[1].data_dir.join("mem");
    let mem_s = mem.to_string_lossy().into_owned();
    // (In this mount namespace, the agent's: the workspaces' and warm
    // slots' namespaces hold copies while they live.)
    let tmpfs = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&format!(" {mem_s} ")) && l.contains(" - tmpfs "))
            .count()
    };
    assert_eq!(tmpfs(), 1, "h1 mounted its scratch: {}", lab.log(1));
    let tree = Tree::new(&lab.dir.join("tree"));
    tree.write("a.txt", "one\n");
    tree.write("gone.txt", "bye\n");
    // While the task runs, its overlay's upper layer is in the tmpfs.
    let mut c = run(
        &lab,
        &tree,
        &[
            "--node",
            "h1",
            "--",
            "sh",
            "-c",
            "echo two >> a.txt; rm gone.txt; head -c 2097152 /dev/urandom > r.bin; \
             sha256sum r.bin; sleep 1.5",
        ],
    );
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let upper = format!("upperdir={mem_s}/tasks/");
    let seen = wait_for(Duration::from_secs(10), || {
        mounts_mentioning(&upper)
            .iter()
            .any(|l| l.contains(" - overlay "))
            .then_some(())
    });
    let o = child.wait_with_output().unwrap();
    assert!(
        seen.is_some(),
        "no task overlay with its upper layer in {mem_s}"
    );
    assert!(o.status.success(), "{}", s(&o.stderr));
    // Its changes came back whole.
    assert_eq!(tree.read("a.txt").as_deref(), Some("one\ntwo\n"));
    assert_eq!(tree.read("gone.txt"), None);
    let here = Command::new("sha256sum")
        .arg("r.bin")
        .current_dir(&tree.0)
        .output()
        .unwrap();
    assert_eq!(s(&here.stdout), s(&o.stdout), "the written file came whole");
    // More than the scratch holds: the task fails as on a full disk, and
    // nothing is applied.
    let o = sh_on_h1(
        &lab,
        &tree,
        "head -c 12000000 /dev/zero > f && echo x > made",
    );
    let e = s(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{e}");
    assert!(e.contains("No space left on device"), "{e}");
    assert!(tree.read("f").is_none() && tree.read("made").is_none());
    // The scratch is emptied of the task (its memory given back), and
    // serves the next one.
    let o = sh_on_h1(&lab, &tree, "echo three >> a.txt");
    assert!(o.status.success(), "{}", s(&o.stderr));
    assert_eq!(tree.read("a.txt").as_deref(), Some("one\ntwo\nthree\n"));
    // An agent that leaves unmounts it.
    lab.signal(1, nix::sys::signal::Signal::SIGTERM);
    assert!(
        lab.wait_exit(1, Duration::from_secs(10)).is_some(),
        "h1 did not leave"
    );
    assert_eq!(tmpfs(), 0, "h1's scratch is still mounted");
    // One killed keeps it for its next life, which empties it and runs on.
    lab.start_agent(1, &[]).unwrap();
    wait_alive(&lab, &[0, 1], &[0, 1], Duration::from_secs(20));
    wait_facts(&lab);
    assert_eq!(tmpfs(), 1);
    std::fs::write(mem.join("tasks/stale"), "x").unwrap();
    lab.signal(1, nix::sys::signal::Signal::SIGKILL);
    assert_eq!(tmpfs(), 1, "kept after a kill");
    lab.start_agent(1, &[]).unwrap();
    wait_alive(&lab, &[0, 1], &[0, 1], Duration::from_secs(20));
    wait_facts(&lab);
    assert_eq!(tmpfs(), 1, "the same tmpfs, not a second one over it");
    assert!(
        wait_for(Duration::from_secs(5), || (!mem
            .join("tasks/stale")
            .exists())
        .then_some(()))
        .is_some(),
        "the earlier life's leftovers are removed"
    );
    let o = sh_on_h1(&lab, &tree, "echo four >> a.txt");
    assert!(o.status.success(), "{}", s(&o.stderr));
    assert_eq!(
        tree.read("a.txt").as_deref(),
        Some("one\ntwo\nthree\nfour\n")
    );
    // Killed again, and back with its scratch on disk: the tmpfs goes.
    lab.signal(1, nix::sys::signal::Signal::SIGKILL);
    assert_eq!(tmpfs(), 1);
    lab.configs[1] = lab.configs[1].replace("scratch = \"memory\"\n", "");
    lab.start_agent(1, &[]).unwrap();
    wait_alive(&lab, &[0, 1], &[0, 1], Duration::from_secs(20));
    wait_facts(&lab);
    assert_eq!(
        tmpfs(),
        0,
        "an earlier life's scratch in memory is unmounted"
    );
    let o = sh_on_h1(&lab, &tree, "echo five >> a.txt");
    assert!(o.status.success(), "{}", s(&o.stderr));
    assert_eq!(
        tree.read("a.txt").as_deref(),
        Some("one\ntwo\nthree\nfour\nfive\n")
    );
}
