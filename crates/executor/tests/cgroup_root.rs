//! The cgroup managers on this machine's real hierarchy (root only; elsewhere
//! each test prints why it skipped). Every test removes what it made, also
//! when it fails.

#![allow(clippy::unwrap_used)] // tests panic on purpose

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_executor::cgroup::{self, spawn_into, CgroupManager, Limits};

/// A manager under a parent unique to this test process, removed on drop
/// with everything in it.
struct Scratch {
    mgr: Box<dyn CgroupManager>,
    kids: Vec<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for k in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        if let Err(e) = self.mgr.destroy() {
            eprintln!("cleanup failed: {e}");
        }
    }
}

fn scratch(test: &str) -> Option<Scratch> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: cgroups need root");
        return None;
    }
    let root = Path::new("/sys/fs/cgroup");
    match cgroup::open(root, &format!("shoal-test-{}-{test}", std::process::id())) {
        Ok(mgr) => Some(Scratch {
            mgr,
            kids: Vec::new(),
        }),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// [`scratch`] on cgroup v1 only: elsewhere the test is skipped, saying
/// that `what` is for v1.
fn scratch_v1(test: &str, what: &str) -> Option<Scratch> {
    let s = scratch(test)?;
    if s.mgr.version() != cgroup::CgroupVersion::V1 {
        eprintln!("skipped: {what} on cgroup v1 only");
        return None;
    }
    Some(s)
}

fn spawn(s: &mut Scratch, name: &str, script: &str) -> u32 {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    spawn_into(&mut c, s.mgr.as_ref(), name).unwrap();
    let child = c.spawn().unwrap();
    let pid = child.id();
    s.kids.push(child);
    pid
}

#[test]
fn freeze_stops_cpu_time_and_thaw_resumes_it() {
    let Some(mut s) = scratch("freeze") else {
        return;
    };
    s.mgr.create("spin", &Limits::default()).unwrap();
    let pid = spawn(&mut s, "spin", "while :; do :; done");
    assert_eq!(
        s.mgr.pids("spin").unwrap(),
        vec![pid],
        "the child moved itself in before exec"
    );
    std::thread::sleep(Duration::from_millis(200));
    s.mgr.set_frozen("spin", true).unwrap();
    let a = s.mgr.usage("spin").unwrap().cpu_usec;
    std::thread::sleep(Duration::from_millis(300));
    let b = s.mgr.usage("spin").unwrap().cpu_usec;
    assert!(a > 0);
    assert_eq!(a, b, "CPU time advanced while frozen");
    s.mgr.set_frozen("spin", false).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.mgr.usage("spin").unwrap().cpu_usec > b,
        "thawed task did not run"
    );
    s.mgr.remove("spin").unwrap();
    assert!(s.mgr.list().unwrap().is_empty());
}

#[test]
fn memory_limit_oom_kills_and_is_reported() {
    let Some(s) = scratch("oom") else { return };
    s.mgr
        .create(
            "hog",
            &Limits {
                memory_bytes: Some(32 << 20),
                ..Limits::default()
            },
        )
        .unwrap();
    // `tail` buffers the one endless line of /dev/zero: memory grows until
    // the group's limit.
    let mut c = Command::new("tail");
    c.arg("/dev/zero")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    spawn_into(&mut c, s.mgr.as_ref(), "hog").unwrap();
    let mut child = c.spawn().unwrap();
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(9), "killed by the OOM killer: {st:?}");
    let u = s.mgr.usage("hog").unwrap();
    assert!(u.oom_kills >= 1, "{u:?}");
    // Counters held open (cgroup v1) read the same.
    if let Ok(held) = s.mgr.open_counters("hog") {
        let h = held.usage().unwrap();
        assert_eq!(h.oom_kills, u.oom_kills, "{h:?} {u:?}");
        assert_eq!(h.memory_peak_bytes, u.memory_peak_bytes, "{h:?} {u:?}");
        drop(held);
    }
    s.mgr.remove("hog").unwrap();
}

#[test]
fn pids_limit_stops_a_fork_bomb_and_kill_all_empties_the_group() {
    let Some(mut s) = scratch("pids") else { return };
    s.mgr
        .create(
            "bomb",
            &Limits {
                pids: Some(16),
                cpus: Some(0.2),
                ..Limits::default()
            },
        )
        .unwrap();
    spawn(
        &mut s,
        "bomb",
        "i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done; wait",
    );
    std::thread::sleep(Duration::from_millis(500));
    let n = s.mgr.pids("bomb").unwrap().len();
    assert!((2..=16).contains(&n), "{n} processes with pids.max 16");
    let t = Instant::now();
    s.mgr.kill_all("bomb").unwrap();
    assert!(s.mgr.pids("bomb").unwrap().is_empty());
    assert!(t.elapsed() < Duration::from_secs(2));
    s.mgr.remove("bomb").unwrap();
}

#[test]
fn cpu_quota_caps_usage() {
    let Some(mut s) = scratch("quota") else {
        return;
    };
    s.mgr
        .create(
            "capped",
            &Limits {
                cpus: Some(0.25),
                ..Limits::default()
            },
        )
        .unwrap();
    spawn(&mut s, "capped", "while :; do :; done");
    let a = s.mgr.usage("capped").unwrap().cpu_usec;
    std::thread::sleep(Duration::from_millis(1000));
    let used = s.mgr.usage("capped").unwrap().cpu_usec - a;
    // A quarter of a CPU for a second is 250 ms; allow for period edges.
    assert!(
        used < 400_000,
        "used {used} µs in 1 s with a 0.25 CPU quota"
    );
    assert!(used > 100_000, "used {used} µs: the task barely ran");
    s.mgr.remove("capped").unwrap();
}

#[test]
fn existing_names_and_bad_input_are_refused() {
    let Some(s) = scratch("refuse") else { return };
    s.mgr.create("a", &Limits::default()).unwrap();
    assert!(matches!(
        s.mgr.create("a", &Limits::default()),
        Err(cgroup::CgroupError::Exists(_))
    ));
    assert!(s.mgr.create("../../etc", &Limits::default()).is_err());
    assert!(s
        .mgr
        .create(
            "b",
            &Limits {
                pids: Some(0),
                ..Limits::default()
            }
        )
        .is_err());
    assert_eq!(
        s.mgr.list().unwrap(),
        vec!["a".to_owned()],
        "a refused create leaves nothing"
    );
    s.mgr.remove("a").unwrap();
    s.mgr.remove("a").unwrap();
}

#[test]
fn throttle_caps_a_running_task_and_lifting_it_lets_it_run() {
    let Some(mut s) = scratch("throttle") else {
        return;
    };
    s.mgr.create("t", &Limits::default()).unwrap();
    spawn(&mut s, "t", "while :; do :; done");
    let over = |s: &Scratch| {
        let a = s.mgr.usage("t").unwrap().cpu_usec;
        std::thread::sleep(Duration::from_millis(600));
        s.mgr.usage("t").unwrap().cpu_usec - a
    };
    s.mgr.set_cpus("t", Some(0.1)).unwrap();
    let capped = over(&s);
    assert!(
        capped < 150_000,
        "used {capped} µs in 0.6 s capped at 0.1 CPU"
    );
    s.mgr.set_cpus("t", None).unwrap();
    let free = over(&s);
    assert!(
        free > 200_000,
        "used {free} µs in 0.6 s with the cap lifted"
    );
    assert!(s.mgr.set_cpus("t", Some(0.0)).is_err());
    s.mgr.remove("t").unwrap();
}

#[test]
fn guests_at_the_idle_class_and_their_cpu_counted_on_the_parent() {
    let Some(mut s) = scratch("class") else {
        return;
    };
    let class = s.mgr.guest_class().unwrap();
    eprintln!("guest class here: {class:?}");
    s.mgr.create("g", &Limits::default()).unwrap();
    spawn(&mut s, "g", "while :; do :; done");
    let a = s.mgr.parent_cpu_usec().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let b = s.mgr.parent_cpu_usec().unwrap();
    assert!(b > a, "the parent counts its guests' CPU ({a} → {b})");
    // SIGTERM reaches every process of the group.
    s.mgr
        .signal_all("g", nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let end = Instant::now() + Duration::from_secs(2);
    while !s.mgr.pids("g").unwrap().is_empty() {
        assert!(Instant::now() < end, "SIGTERM did not end the task");
        std::thread::sleep(Duration::from_millis(10));
    }
    s.mgr.remove("g").unwrap();
}

#[test]
fn a_warm_group_is_reset_for_its_next_task_with_its_process_inside() {
    let Some(mut s) = scratch_v1("reuse", "counters are restarted") else {
        return;
    };
    s.mgr.create("slot", &Limits::default()).unwrap();
    // Held open from the start, as a warm slot holds them: read again, they
    // say what the files say now.
    let held = s.mgr.open_counters("slot").unwrap();
    assert!(held.usage().unwrap().cpu_usec < 50_000);
    // The first "task" uses CPU; the spawner stands in as a sleeping shell.
    spawn(
        &mut s,
        "slot",
        "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; exec sleep 60",
    );
    let busy = Instant::now() + Duration::from_secs(10);
    while s.mgr.usage("slot").unwrap().cpu_usec < 50_000 && Instant::now() < busy {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.mgr.usage("slot").unwrap().cpu_usec >= 50_000);
    assert!(
        held.usage().unwrap().cpu_usec >= 50_000,
        "held counters read anew"
    );
    let root = Path::new("/sys/fs/cgroup");
    let parent = format!("shoal-test-{}-reuse", std::process::id());
    let file = |c: &str, f: &str| {
        std::fs::read_to_string(root.join(c).join(&parent).join("slot").join(f))
            .unwrap()
            .trim()
            .to_owned()
    };
    let limited = Limits {
        cpus: Some(0.5),
        cpu_weight: Some(50),
        memory_bytes: Some(64 << 20),
        pids: Some(7),
    };
    s.mgr.reuse("slot", &limited, None).unwrap();
    assert!(
        s.mgr.usage("slot").unwrap().cpu_usec >= 50_000,
        "limits only: the counters run on"
    );
    assert_eq!(s.mgr.restart("slot").unwrap(), 0, "no OOM kills yet");
    assert!(
        s.mgr.usage("slot").unwrap().cpu_usec < 50_000,
        "CPU counter restarted"
    );
    assert!(held.usage().unwrap().cpu_usec < 50_000, "and read so held");
    assert_eq!(file("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(file("cpu", "cpu.shares"), "512");
    assert_eq!(
        file("memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(file("pids", "pids.max"), "7");
    // The next task asks for nothing: every limit is lifted again.
    s.mgr
        .reuse("slot", &Limits::default(), Some(&limited))
        .unwrap();
    let lifted = || {
        assert_eq!(file("cpu", "cpu.cfs_quota_us"), "-1");
        assert_eq!(file("cpu", "cpu.shares"), "1024");
        assert!(
            file("memory", "memory.limit_in_bytes")
                .parse::<u64>()
                .unwrap()
                > 1 << 40
        );
        assert_eq!(file("pids", "pids.max"), "max");
    };
    lifted();
    // Limits as they are now are not written again, except the CPU quota
    // (the owner's policy changes it while a task runs): marks put in the
    // files by hand stay, the quota is reset.
    let set = |c: &str, f: &str, v: &str| {
        std::fs::write(root.join(c).join(&parent).join("slot").join(f), v).unwrap();
    };
    set("pids", "pids.max", "9");
    set(
        "memory",
        "memory.limit_in_bytes",
        &(96u64 << 20).to_string(),
    );
    set("cpu", "cpu.shares", "700");
    set("cpu", "cpu.cfs_quota_us", "20000");
    let none = Limits::default();
    s.mgr.reuse("slot", &none, Some(&none)).unwrap();
    assert_eq!(file("pids", "pids.max"), "9");
    assert_eq!(
        file("memory", "memory.limit_in_bytes"),
        (96u64 << 20).to_string()
    );
    assert_eq!(file("cpu", "cpu.shares"), "700");
    assert_eq!(file("cpu", "cpu.cfs_quota_us"), "-1", "the quota always");
    // Unknown (after a failed reuse): everything is written.
    s.mgr.reuse("slot", &none, None).unwrap();
    lifted();
    assert_eq!(s.mgr.pids("slot").unwrap().len(), 1, "its process stayed");
}

#[test]
fn a_killed_guest_dies_at_once_though_every_core_is_taken() {
    let Some(mut s) = scratch_v1("starved", "the idle class is lifted") else {
        return;
    };
    s.mgr.guest_class().unwrap();
    s.mgr.create("starved", &Limits::default()).unwrap();
    // A guest at the idle class, in the guests' idle group, holding
    // 400 MB (which its death must give back: CPU it needs)...
    let pid = spawn(&mut s, "starved", "exec chrt -i 0 tail /dev/zero");
    let rss_kb = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap_or(0)
    };
    let end = Instant::now() + Duration::from_secs(30);
    while rss_kb() < 400_000 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(rss_kb() >= 400_000, "the guest grew");
    s.mgr.set_frozen("starved", true).unwrap();
    // ... and every core taken, twice over, by the owner's own work.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut hogs: Vec<Child> = (0..2 * cores)
        .map(|_| {
            Command::new("/bin/sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let removed = s.mgr.remove("starved");
    let took = t.elapsed();
    for h in &mut hogs {
        let _ = h.kill();
        let _ = h.wait();
    }
    assert!(
        removed.is_ok(),
        "the guest ({pid}) still there after {took:?}: {removed:?}"
    );
}
