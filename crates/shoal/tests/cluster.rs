//! Multi-host tests: each host a network namespace on a bridge, a real
//! `shoal agent` in each. They need root; elsewhere they skip with the
//! reason printed. They run one at a time (a 2-core machine running
//! several 5-host clusters at once would measure the machine, not shoal).

#![allow(clippy::unwrap_used)] // tests panic on purpose

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use shoal_netns::wait_for;

#[test]
fn five_hosts_form_by_multicast_without_join() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("form", 1, 5) else {
        return;
    };
    let all = [0, 1, 2, 3, 4];
    // h0 starts first: the most senior member, so the coordinator.
    lab.start_agent(0, &["--expect", "5"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    start_all(&mut lab, &[1, 2, 3, 4], &["--expect", "5"]);
    wait_alive(&lab, &all, &all, Duration::from_secs(20));
    // Facts and RTTs arrive by gossip and probes.
    let v = wait_for(Duration::from_secs(10), || {
        let v = nodes(&lab, 0)?;
        let ok = v["nodes"].as_array()?.iter().all(|n| {
            n["cores"].as_u64().is_some_and(|c| c >= 1)
                && n["cpu_score"].as_u64().is_some_and(|c| c > 0)
                && n["mem_total_bytes"].as_u64().is_some_and(|m| m > 0)
                && (n["self"] == true || n["rtt_ms"].as_f64().is_some())
        });
        ok.then_some(v)
    })
    .expect("facts and RTTs from every node");
    assert_eq!(v["cluster"]["state"], "formed");
    assert_eq!(v["cluster"]["alive"], 5);
    assert_eq!(v["cluster"]["name"], "lab");
    // Every node derives the same coordinator: the senior member.
    let coordinator = |i| -> Option<String> {
        let v = nodes(&lab, i)?;
        v["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["role"] == "coordinator")
            .map(|n| n["name"].as_str().unwrap_or("").to_owned())
    };
    let c0 = coordinator(0).expect("a coordinator");
    assert_eq!(c0, "h0");
    for i in 1..5 {
        assert_eq!(coordinator(i).as_deref(), Some(c0.as_str()), "h{i}");
    }
    // The human table renders too.
    let out = lab.shoal(2, &["nodes"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("coordinator") && text.contains("formed"),
        "{text}"
    );
}

#[test]
fn three_hosts_with_join_and_bandwidth_on_demand() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("join", 2, 3) else {
        return;
    };
    let seed = lab.hosts[0].addr();
    lab.start_agent(0, &["--no-discovery", "--expect", "3"])
        .unwrap();
    start_all(&mut lab, &[1, 2], &["--no-discovery", "--join", &seed]);
    wait_alive(&lab, &[0, 1, 2], &[0, 1, 2], Duration::from_secs(20));
    for i in 0..3 {
        let v = nodes(&lab, i).unwrap();
        assert_eq!(v["cluster"]["alive"], 3);
        assert_eq!(v["nodes"].as_array().unwrap().len(), 3);
    }
    let out = lab.shoal(1, &["nodes", "--json", "--bandwidth"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let peers: Vec<&Value> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["self"] == false)
        .collect();
    assert_eq!(peers.len(), 2);
    for p in peers {
        assert!(p["bandwidth_mbps"].as_f64().is_some_and(|b| b > 0.0), "{p}");
    }
}

#[test]
fn sigkilled_agent_is_down_on_every_survivor() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("kill", 3, 5) else {
        return;
    };
    let all = [0, 1, 2, 3, 4];
    start_all(&mut lab, &all, &[]);
    wait_alive(&lab, &all, &all, Duration::from_secs(20));
    lab.signal(3, Signal::SIGKILL);
    let survivors = [0, 1, 2, 4];
    let ok = wait_for(Duration::from_secs(10), || {
        survivors
            .iter()
            .all(|&i| states(&lab, i).get("h3").map(String::as_str) == Some("down"))
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "h3 not down everywhere: {:?}",
        survivors.map(|i| states(&lab, i))
    );
    wait_alive(&lab, &survivors, &survivors, Duration::from_secs(5));
}

#[test]
fn ten_percent_loss_for_a_minute_gives_no_false_down() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("loss", 4, 5) else {
        return;
    };
    let all = [0, 1, 2, 3, 4];
    start_all(&mut lab, &all, &[]);
    wait_alive(&lab, &all, &all, Duration::from_secs(20));
    lab.loss(0.10).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        for i in all {
            let s = states(&lab, i);
            assert!(
                !s.values().any(|st| st == "down"),
                "false down under loss, seen by h{i}: {s:?}"
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    for i in all {
        assert!(
            !lab.log(i).contains("member down"),
            "h{i} logged a member down:\n{}",
            lab.log(i)
        );
    }
    lab.heal().unwrap();
    wait_alive(&lab, &all, &all, Duration::from_secs(5));
}

#[test]
fn partition_then_heal_remerges_into_one_cluster() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("part", 5, 5) else {
        return;
    };
    let all = [0, 1, 2, 3, 4];
    start_all(&mut lab, &all, &[]);
    wait_alive(&lab, &all, &all, Duration::from_secs(20));
    lab.partition(&[0, 1]).unwrap();
    wait_alive(&lab, &[0, 1], &[0, 1], Duration::from_secs(15));
    wait_alive(&lab, &[2, 3, 4], &[2, 3, 4], Duration::from_secs(15));
    lab.heal().unwrap();
    wait_alive(&lab, &all, &all, Duration::from_secs(30));
}

#[test]
fn agent_with_the_wrong_key_is_never_listed_and_counted() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("key", 6, 4) else {
        return;
    };
    let good = [0, 1, 2];
    start_all(&mut lab, &good, &[]);
    let wrong = lab.keygen("wrong.key").unwrap();
    let seed = lab.hosts[0].addr();
    lab.start_agent(3, &["--key", wrong.to_str().unwrap(), "--join", &seed])
        .unwrap();
    wait_alive(&lab, &good, &good, Duration::from_secs(20));
    // Give the intruder time to beacon and knock.
    std::thread::sleep(Duration::from_secs(3));
    for i in good {
        assert!(
            !states(&lab, i).contains_key("h3"),
            "h{i} lists the intruder"
        );
    }
    assert_eq!(
        alive_names(&lab, 3),
        names(&[3]),
        "the intruder sees only itself"
    );
    let v = nodes(&lab, 0).unwrap();
    assert!(
        v["rejected"]["auth"].as_u64().unwrap() > 0,
        "{}",
        v["rejected"]
    );
}

#[test]
fn two_clusters_on_one_bridge_stay_apart() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("two", 7, 4) else {
        return;
    };
    start_all(&mut lab, &[0, 1], &["--cluster", "red"]);
    start_all(&mut lab, &[2, 3], &["--cluster", "blue"]);
    wait_alive(&lab, &[0, 1], &[0, 1], Duration::from_secs(20));
    wait_alive(&lab, &[2, 3], &[2, 3], Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(3));
    wait_alive(&lab, &[0, 1], &[0, 1], Duration::from_secs(1));
    wait_alive(&lab, &[2, 3], &[2, 3], Duration::from_secs(1));
    assert_eq!(nodes(&lab, 0).unwrap()["cluster"]["name"], "red");
    assert!(
        nodes(&lab, 2).unwrap()["rejected"]["auth"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn leave_and_sigterm_show_left_never_down() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("leave", 8, 4) else {
        return;
    };
    let all = [0, 1, 2, 3];
    start_all(&mut lab, &all, &[]);
    wait_alive(&lab, &all, &all, Duration::from_secs(20));
    let out = lab.shoal(3, &["leave"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lab.wait_exit(3, Duration::from_secs(5))
            .is_some_and(|s| s.success()),
        "agent did not exit after leave"
    );
    lab.signal(2, Signal::SIGTERM);
    assert!(
        lab.wait_exit(2, Duration::from_secs(5))
            .is_some_and(|s| s.success()),
        "agent did not exit on SIGTERM"
    );
    let ok = wait_for(Duration::from_secs(3), || {
        [0, 1]
            .iter()
            .all(|&i| {
                let s = states(&lab, i);
                s.get("h3").map(String::as_str) == Some("left")
                    && s.get("h2").map(String::as_str) == Some("left")
            })
            .then_some(())
    });
    assert!(ok.is_some(), "{:?} {:?}", states(&lab, 0), states(&lab, 1));
    // Stay left: no suspicion turns into a down later.
    std::thread::sleep(Duration::from_secs(3));
    for i in [0, 1] {
        let s = states(&lab, i);
        assert_eq!(s.get("h3").map(String::as_str), Some("left"));
        assert_eq!(s.get("h2").map(String::as_str), Some("left"));
        assert!(!lab.log(i).contains("member down"), "{}", lab.log(i));
    }
}
