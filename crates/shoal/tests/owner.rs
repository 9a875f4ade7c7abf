//! The owner comes first, on real agents in network namespaces (root;
//! elsewhere each test prints why it skipped): `shoal owner busy` freezes
//! guests and `idle` thaws them, a busy owner gets no new guests, eviction
//! re-runs the task elsewhere and commits it once, and a bad policy is
//! refused while the old one stays in force.

#![allow(clippy::unwrap_used)] // tests panic on purpose

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use shoal_netns::{wait_for, Lab, LAB_CONFIG};

fn formed(lab: &mut Lab, n: usize) -> PathBuf {
    let all: Vec<usize> = (0..n).collect();
    start_all(lab, &all, &[]);
    wait_alive(lab, &all, &all, Duration::from_secs(20));
    wait_for(Duration::from_secs(10), || {
        let v = nodes(lab, 0)?;
        v["nodes"]
            .as_array()?
            .iter()
            .all(|n| n["checks"] == "ok" && n["slots_free"].as_u64() > Some(0))
            .then_some(())
    })
    .expect("facts and free slots from every node");
    let tree = lab.dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    tree
}

/// `shoal run ARGS` from `tree` through host 0's agent.
fn run(lab: &Lab, tree: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(shoal_bin());
    c.arg("run")
        .arg("--data-dir")
        .arg(&lab.hosts[0].data_dir)
        .args(args)
        .current_dir(tree)
        .stdin(Stdio::null());
    c
}

fn json(lab: &Lab, i: usize, args: &[&str]) -> Option<Value> {
    let mut a = args.to_vec();
    a.push("--json");
    let out = lab.shoal(i, &a).ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The only task on host `i`: its state and CPU seconds.
fn task(lab: &Lab, i: usize) -> Option<(String, f64)> {
    let v = json(lab, i, &["ps"])?;
    let t = v["tasks"].as_array()?.first()?.clone();
    Some((t["state"].as_str()?.to_owned(), t["cpu_s"].as_f64()?))
}

/// A CPU-bound guest sent from h0 to h1.
fn spin_on_h1(lab: &Lab, tree: &Path) -> std::process::Child {
    run(
        lab,
        tree,
        &["--node", "h1", "--", "sh", "-c", "while :; do :; done"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap()
}

/// Kills the guest's submitter; the guest must be gone from h1 soon after.
fn end_spin(lab: &Lab, mut spin: std::process::Child) {
    let _ = spin.kill();
    let _ = spin.wait();
    wait_for(Duration::from_secs(10), || {
        json(lab, 1, &["ps"])?["tasks"]
            .as_array()?
            .is_empty()
            .then_some(())
    })
    .expect("the guest is gone once its submitter is");
}

fn owner(lab: &Lab, i: usize, action: &str) -> Value {
    json(lab, i, &["owner", action]).unwrap_or_else(|| panic!("shoal owner {action} on h{i}"))
}

#[test]
fn busy_freezes_guests_idle_thaws_them_and_a_busy_owner_gets_no_new_guests() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("own1", 40, 2) else {
        return;
    };
    let tree = formed(&mut lab, 2);
    let spin = spin_on_h1(&lab, &tree);
    wait_for(Duration::from_secs(15), || {
        task(&lab, 1).filter(|(_, cpu)| *cpu > 0.05)
    })
    .expect("the guest runs on h1");

    let o = owner(&lab, 1, "busy");
    assert_eq!(o["force"], "busy");
    assert_eq!(o["state"], "owner");
    let (state, a) = task(&lab, 1).unwrap();
    assert_eq!(state, "suspended");
    std::thread::sleep(Duration::from_millis(500));
    let (_, b) = task(&lab, 1).unwrap();
    assert!(b - a < 0.02, "a frozen guest used {:.3} s of CPU", b - a);
    // The cluster hears it: no free slot on h1.
    wait_for(Duration::from_secs(10), || {
        let v = nodes(&lab, 0)?;
        let h1 = v["nodes"].as_array()?.iter().find(|n| n["name"] == "h1")?;
        (h1["slots_free"] == 0 && h1["guests"].as_str()?.contains("1 suspended")).then_some(())
    })
    .expect("h0 sees h1 lend nothing while its owner is busy");
    // A new guest asked of h1 goes elsewhere.
    let out = run(
        &lab,
        &tree,
        &["-v", "--node", "h1", "--", "sh", "-c", "echo $SHOAL_NODE"],
    )
    .output()
    .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so} {se}");
    assert_eq!(so.trim(), "h0", "{se}");
    assert!(se.contains("evicted from h1"), "{se}");

    let o = owner(&lab, 1, "idle");
    assert_eq!(o["state"], "lending");
    let (state, c) = task(&lab, 1).unwrap();
    assert_eq!(state, "claimed");
    // At the idle class it runs when nothing else wants the CPU: allow
    // for other work on this machine.
    wait_for(Duration::from_secs(10), || {
        task(&lab, 1).filter(|(_, d)| d - c > 0.1)
    })
    .expect("a thawed guest runs again");
    owner(&lab, 1, "auto");

    end_spin(&lab, spin);
}

#[test]
fn eviction_reruns_the_task_elsewhere_and_commits_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("own2", 41, 2) else {
        return;
    };
    // Evict after a second frozen; the task ignores SIGTERM, so it is the
    // SIGKILL after the one-second grace that ends it.
    lab.configs[1] = LAB_CONFIG.replace(
        "evict = \"false\"",
        "evict = \"suspended_s >= 1\"\nevict_grace_s = 1",
    );
    let tree = formed(&mut lab, 2);
    let script = "trap '' TERM; echo x > partial-$SHOAL_NODE; echo begin; sleep 3; \
                  echo end; echo ok-$SHOAL_NODE >> result";
    let child = run(
        &lab,
        &tree,
        &["-v", "--node", "h1", "--", "sh", "-c", script],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for(Duration::from_secs(15), || task(&lab, 1)).expect("the guest runs on h1");
    owner(&lab, 1, "busy");
    let out = child.wait_with_output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so} {se}");
    assert_eq!(so, "begin\nend\n", "one clean result: {se}");
    assert!(se.contains("evicted from h1"), "{se}");
    assert_eq!(
        std::fs::read_to_string(tree.join("result")).unwrap(),
        "ok-h0\n",
        "committed once, by the re-run"
    );
    assert!(tree.join("partial-h0").exists());
    assert!(
        !tree.join("partial-h1").exists(),
        "the evicted attempt's changes are discarded"
    );
    let ps = json(&lab, 1, &["ps"]).unwrap();
    assert_eq!(ps["tasks"].as_array().map(Vec::len), Some(0), "{ps}");
    let o = owner(&lab, 1, "auto");
    assert!(
        o["slots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s == "unclaimed"),
        "{o}"
    );
}

#[test]
fn a_bad_policy_is_refused_and_the_old_one_stays() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("own3", 42, 1) else {
        return;
    };
    start_all(&mut lab, &[0], &[]);
    wait_for(Duration::from_secs(10), || nodes(&lab, 0)).expect("agent up");
    let cfg = lab.config_path(0);
    // SIGHUP with a syntax error: refused, named, the old policy stays.
    std::fs::write(
        &cfg,
        "[policy]\nstart = \"true\"\nsuspend = \"owner_idle_s <\"\n",
    )
    .unwrap();
    lab.signal(0, nix::sys::signal::Signal::SIGHUP);
    let o = wait_for(Duration::from_secs(5), || {
        let o = json(&lab, 0, &["owner"])?;
        o["reload_error"].is_string().then_some(o)
    })
    .expect("the refusal is shown");
    let e = o["reload_error"].as_str().unwrap();
    assert!(e.contains("policy.suspend, line 3"), "{e}");
    assert_eq!(o["policy"]["suspend"], "false", "the old policy stays");
    // The same through `shoal owner reload`: exit 1 and the reason.
    std::fs::write(&cfg, "[policy]\nstrat = \"true\"\n").unwrap();
    let out = lab.shoal(0, &["owner", "reload"]).unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(se.contains("line 2") && se.contains("strat"), "{se}");
    std::fs::write(
        &cfg,
        "[policy]\nstart = \"owner_idle_s / 60 >= 5\"\nevict = \"running_s > 3600\"\n",
    )
    .unwrap();
    let o = owner(&lab, 0, "reload");
    assert_eq!(o["policy"]["start"], "owner_idle_s / 60 >= 5");
    assert!(o["reload_error"].is_null(), "{o}");
    // An agent never starts with a bad policy.
    let bad = lab.dir.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\n[policy]\nevict = \"suspended_s + 1\"\n",
    )
    .unwrap();
    let out = Command::new(shoal_bin())
        .args(["agent", "--config"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(lab.dir.join("never"))
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        se.contains("policy.evict, line 3") && se.contains("true or false"),
        "{se}"
    );
}

#[test]
fn a_throttled_guest_is_held_to_its_cap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("own4", 43, 2) else {
        return;
    };
    // h1 throttles while its override says so: `idle` lifts it.
    lab.configs[1] = LAB_CONFIG.replace(
        "throttle = \"false\"",
        "throttle = \"true\"\nthrottle_cpus = 0.2",
    );
    let tree = formed(&mut lab, 2);
    let spin = spin_on_h1(&lab, &tree);
    wait_for(Duration::from_secs(15), || {
        task(&lab, 1).filter(|(state, cpu)| state == "throttled" && *cpu > 0.01)
    })
    .expect("the guest runs, throttled, on h1");
    let (_, a) = task(&lab, 1).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let (_, b) = task(&lab, 1).unwrap();
    assert!(
        b - a < 0.35,
        "a guest capped at 0.2 CPU used {:.3} s in 1 s",
        b - a
    );
    // The override `idle` means no throttle: the cap goes.
    owner(&lab, 1, "idle");
    let (state, _) = task(&lab, 1).unwrap();
    assert_eq!(state, "claimed");
    // Above the old cap in some 1 s window of five (the guest is at the
    // idle class: other work on this machine comes first).
    let mut best = 0.0f64;
    for _ in 0..5 {
        let (_, c) = task(&lab, 1).unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        let (_, d) = task(&lab, 1).unwrap();
        best = best.max(d - c);
        if best > 0.5 {
            break;
        }
    }
    assert!(
        best > 0.5,
        "an unthrottled guest used at most {best:.3} s in 1 s"
    );
    end_spin(&lab, spin);
}
