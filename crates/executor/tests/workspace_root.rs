//! Workspaces on this machine (root only; elsewhere each test prints why it
//! skipped): isolation, identity, files, exit status, resource limits.

#![allow(clippy::unwrap_used)] // tests panic on purpose

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{
    assert_isolated, assert_tree_changes, guest_spec, text, with_tree, Dir, ISOLATION_PROBE,
};
use shoal_executor::cgroup::{self, spawn_into, Limits};
use shoal_executor::workspace::{cleanup, Net, Plan, Root, Spec};

fn scratch(name: &str) -> Option<Dir> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: workspaces need root here (user namespaces come later)");
        return None;
    }
    let d = std::env::temp_dir().join(format!("shoal-ws-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Some(Dir(d))
}

fn spec(dir: &Path) -> Spec {
    guest_spec(dir)
}

fn run(spec: &Spec, script: &str) -> Output {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", script])
        .stdin(Stdio::null())
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    Plan::new(spec).unwrap().apply(&mut c);
    let out = c.output().unwrap();
    cleanup(spec).unwrap();
    out
}

#[test]
fn guest_is_isolated() {
    let Some(d) = scratch("iso") else { return };
    let out = run(&spec(&d.0), ISOLATION_PROBE);
    let t = text(&out.stdout);
    assert!(out.status.success(), "{t}\n{}", text(&out.stderr));
    assert_isolated(&t);
    assert!(!d.0.join("run").exists(), "run dir removed");
}

#[test]
fn loopback_is_up_and_host_net_is_there_on_request() {
    let Some(d) = scratch("net") else { return };
    if Path::new("/usr/sbin/ip").exists() || Path::new("/sbin/ip").exists() {
        let out = run(&spec(&d.0), "ip -o link show lo");
        let t = text(&out.stdout);
        assert!(
            t.contains(",UP"),
            "loopback is up inside: {t} {}",
            text(&out.stderr)
        );
    } else {
        eprintln!("(no `ip` here: loopback state not checked)");
    }
    let mut host = spec(&d.0);
    host.net = Net::Host;
    let out = run(&host, "tail -n +3 /proc/net/dev | wc -l");
    let n: usize = text(&out.stdout).parse().unwrap();
    let here = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .count()
        - 2;
    assert_eq!(n, here, "--net host sees the host's interfaces");
}

#[test]
fn exit_codes_and_signals_come_back() {
    let Some(d) = scratch("exit") else { return };
    let s = spec(&d.0);
    for code in [0, 1, 42] {
        assert_eq!(run(&s, &format!("exit {code}")).status.code(), Some(code));
    }
    let st = run(&s, "kill -KILL $$").status;
    assert_eq!(st.signal(), Some(9), "{st:?}");
    let st = run(&s, "kill -TERM $$; sleep 1; exit 3").status;
    assert_eq!(st.signal(), Some(15), "{st:?}");
    // A signal sent to the supervisor from outside reaches the command.
    let mut c = Command::new("/bin/sh");
    c.args(["-c", "echo ready; sleep 30"])
        .stdout(Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    Plan::new(&s).unwrap().apply(&mut c);
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(2));
    // SIGKILL of the supervisor takes the whole workspace down.
    let mut c = Command::new("/bin/sleep");
    c.arg("30").env_clear();
    Plan::new(&s).unwrap().apply(&mut c);
    let mut child = c.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    cleanup(&s).unwrap();
}

/// Reads a supervisor's two-byte early report; `None` at end of file.
fn report(fd: &std::os::fd::OwnedFd) -> Option<[u8; 2]> {
    let mut b = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(fd), &mut b[got..]).unwrap() {
            0 => return None,
            n => got += n,
        }
    }
    Some(b)
}

#[test]
fn the_end_is_reported_before_the_supervisor_exits_and_output_ends_with_the_command() {
    use std::io::Read;
    use std::os::fd::AsFd;
    let Some(d) = scratch("early") else { return };
    let s = spec(&d.0);
    let spawn = |script: &str| {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
        Plan::new(&s)
            .unwrap()
            .report_end_to(w.as_fd())
            .apply(&mut c);
        let child = c.spawn().unwrap();
        drop(w);
        (child, r)
    };
    // An exit code, then the same from wait(2).
    let (mut child, r) = spawn("exit 42");
    assert_eq!(report(&r), Some([0, 42]));
    assert_eq!(child.wait().unwrap().code(), Some(42));
    // Output ends when the command closes it, not when the workspace's
    // supervisors exit: the command is still running (no report yet).
    let (mut child, r) = spawn("echo bye; exec >/dev/null 2>&1; sleep 30");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "bye\n");
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&r),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut b = [0u8; 2];
    assert_eq!(
        nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&r), &mut b),
        Err(nix::errno::Errno::EAGAIN),
        "no end reported while the command runs"
    );
    // A signal forwarded to it: reported as the signal.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&r),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .unwrap();
    assert_eq!(report(&r), Some([1, 15]));
    assert_eq!(child.wait().unwrap().signal(), Some(15));
    // A supervisor killed outright reports nothing: end of file.
    let (mut child, r) = spawn("sleep 30");
    child.kill().unwrap();
    assert_eq!(report(&r), None);
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    cleanup(&s).unwrap();
}

#[test]
fn missing_command_fails_to_spawn_with_not_found() {
    let Some(d) = scratch("missing") else { return };
    let s = spec(&d.0);
    let mut c = Command::new("no-such-command-anywhere");
    c.env_clear().env("PATH", "/usr/bin:/bin");
    Plan::new(&s).unwrap().apply(&mut c);
    let e = c.output().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    cleanup(&s).unwrap();
}

#[test]
fn writes_land_in_upper_and_lower_is_untouched() {
    // The second: layers whose paths hold the overlay's separators.
    for name in ["tree", "odd:dir,with\\seps"] {
        writes_land_in_upper_of(name);
    }
}

fn writes_land_in_upper_of(name: &str) {
    let Some(d) = scratch(name) else { return };
    let lower = d.0.join("lower");
    let (upper, work) = (d.0.join("upper"), d.0.join("work"));
    for p in [&lower, &upper, &work] {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(lower.join("a.txt"), "original\n").unwrap();
    std::fs::write(lower.join("gone.txt"), "x").unwrap();
    // The guest user must be able to write into the upper layer.
    nix::unistd::chown(
        &upper,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .unwrap();
    let mut s = spec(&d.0);
    with_tree(&mut s, &lower, &upper, work, "/home/alice/project");
    s.uid = 0; // overlay copy-up of root-owned files needs it; the fs is still isolated
    s.gid = 0;
    let out = run(
        &s,
        "pwd; cat a.txt; echo changed > a.txt; echo new > b.txt; rm gone.txt; ls",
    );
    let t = text(&out.stdout);
    assert!(out.status.success(), "{t} {}", text(&out.stderr));
    assert_tree_changes(&t, &lower, &upper);
}

#[test]
fn memory_limit_inside_a_workspace_oom_kills() {
    let Some(d) = scratch("oom") else { return };
    let mgr = match cgroup::open(
        Path::new("/sys/fs/cgroup"),
        &format!("shoal-wstest-{}", std::process::id()),
    ) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    mgr.create(
        "t",
        &Limits {
            memory_bytes: Some(32 << 20),
            pids: Some(64),
            ..Limits::default()
        },
    )
    .unwrap();
    let s = spec(&d.0);
    let mut c = Command::new("tail");
    c.arg("/dev/zero")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::null());
    spawn_into(&mut c, mgr.as_ref(), "t").unwrap();
    Plan::new(&s).unwrap().apply(&mut c);
    let st = c.status().unwrap();
    let oom = mgr.usage("t").unwrap().oom_kills;
    mgr.destroy().unwrap();
    cleanup(&s).unwrap();
    assert_eq!(st.signal(), Some(9), "{st:?}");
    assert!(oom >= 1);
}

#[test]
fn an_image_that_is_not_a_rootfs_is_refused() {
    let Some(d) = scratch("img") else { return };
    let mut s = spec(&d.0);
    s.root = Root::Image(d.0.clone());
    let e = Plan::new(&s).unwrap_err();
    assert!(e.to_string().contains("not a root filesystem"), "{e}");
}

/// The whole file path of a task: the guest changes its tree in a
/// workspace; the overlay's upper layer is read as a change set and applied
/// to the submitter's tree, which then looks exactly as the guest saw it.
#[test]
fn a_tasks_changes_read_from_upper_and_applied_match_what_it_saw() {
    let Some(d) = scratch("roundtrip") else {
        return;
    };
    let lower = d.0.join("tree");
    let (upper, work) = (d.0.join("upper"), d.0.join("work"));
    for p in [&upper, &work] {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::create_dir_all(lower.join("src/old")).unwrap();
    std::fs::write(lower.join("src/main.c"), "int main(void){return 0;}\n").unwrap();
    std::fs::write(lower.join("src/old/a.c"), "a\n").unwrap();
    std::fs::write(lower.join("README"), "readme\n").unwrap();
    std::fs::write(lower.join("obsolete"), "x\n").unwrap();
    let mut s = spec(&d.0);
    with_tree(&mut s, &lower, &upper, work, "/work/proj");
    s.uid = 0;
    s.gid = 0;
    let script = "set -e; echo more >> README; rm obsolete; mkdir -p build; echo obj > build/main.o; \
                  chmod 755 build/main.o; ln -s build/main.o latest; rm -r src/old; mkdir src/old; \
                  echo b > src/old/b.c; \
                  find . -print | sort | while read f; do \
                    if [ -L \"$f\" ]; then echo \"$f -> $(readlink \"$f\")\"; \
                    elif [ -f \"$f\" ]; then echo \"$f $(stat -c %a \"$f\") $(cat \"$f\" | tr '\\n' '|')\"; \
                    else echo \"$f/\"; fi; done";
    let out = run(&s, script);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen_inside = text(&out.stdout);
    for want in [
        "./latest -> build/main.o",
        "./build/main.o 755 obj|",
        "./src/old/b.c 644 b|",
        "./README 644 readme|more|",
    ] {
        assert!(seen_inside.contains(want), "{want} in {seen_inside}");
    }
    assert!(
        !seen_inside.contains("a.c") && !seen_inside.contains("obsolete"),
        "{seen_inside}"
    );
    let cs = shoal_files::ChangeSet::from_upper(&upper).unwrap();
    assert!(
        cs.entries
            .iter()
            .any(|e| e.change == shoal_files::Change::Delete),
        "the deletion is a whiteout: {cs:?}"
    );
    shoal_files::apply(&lower, &cs).unwrap();
    let mut c = Command::new("/bin/sh");
    c.args(["-c", &script[script.find("find").unwrap()..]])
        .current_dir(&lower);
    let seen_outside = text(&c.output().unwrap().stdout);
    assert_eq!(seen_outside, seen_inside);
}

#[test]
fn a_guest_runs_at_the_idle_cpu_and_io_class() {
    let Some(d) = scratch("idle") else { return };
    // Field 41 of /proc/PID/stat is the scheduling policy (5 = SCHED_IDLE);
    // `ionice -p` prints the I/O class.
    let script = "cut -d' ' -f41 /proc/self/stat; ionice -p $$ 2>/dev/null || echo no-ionice; echo pid1 $(cut -d' ' -f41 /proc/1/stat)";
    let mut s = spec(&d.0);
    let plain = text(&run(&s, script).stdout);
    assert!(
        plain.starts_with('0'),
        "an ordinary task is SCHED_OTHER: {plain}"
    );
    s.idle = true;
    let out = run(&s, script);
    let t = text(&out.stdout);
    assert!(out.status.success(), "{t} {}", text(&out.stderr));
    assert!(t.starts_with('5'), "a guest is SCHED_IDLE: {t}");
    assert!(t.contains("idle") || t.contains("no-ionice"), "{t}");
    // Its workspace's pid 1 (set-up, teardown: the agent's work) is not.
    assert!(t.contains("pid1 0"), "pid 1 stays SCHED_OTHER: {t}");
}
