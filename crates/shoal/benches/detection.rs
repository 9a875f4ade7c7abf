//! Failure detection on a real 5-host netns cluster.
//!
//! `cargo bench -p shoal --bench detection` (root): for each SWIM profile
//! (ours, `fast`, and memberlist's LAN defaults as the peer), SIGKILL an
//! agent and time until every survivor shows it `down`, over TRIALS
//! trials; then run 10 % random loss on every host for LOSS_S seconds and
//! count false `down`s. Prints a Markdown table for BENCHMARKS.md.
//! `SHOAL_BENCH_TRIALS` and `SHOAL_BENCH_LOSS_S` override the counts;
//! `SHOAL_BENCH_PROFILES=fast` runs one profile only.

#![allow(clippy::unwrap_used)] // a benchmark aborts on setup failure

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use shoal_control::{Request, Response};
use shoal_netns::{bench_gate, env_or, wait_for, Lab};

const HOSTS: usize = 5;

/// name → state seen by host `i`, straight over the control socket.
fn states(lab: &Lab, i: usize) -> Vec<(String, String)> {
    match shoal_control::call(
        &lab.hosts[i].socket(),
        &Request::Nodes { bandwidth: false },
        Duration::from_secs(2),
    ) {
        Ok(Response::Nodes(r)) => r.nodes.into_iter().map(|n| (n.name, n.state)).collect(),
        _ => Vec::new(),
    }
}

fn state_of(lab: &Lab, i: usize, name: &str) -> Option<String> {
    states(lab, i)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
}

fn all_alive(lab: &Lab) -> bool {
    (0..HOSTS).all(|i| {
        let s = states(lab, i);
        s.len() == HOSTS && s.iter().all(|(_, st)| st == "alive")
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run_profile(profile: &str, subnet: u8, trials: u64, loss_s: u64) -> (Vec<f64>, usize) {
    let bin = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let mut lab = Lab::new(&format!("b{profile}"), subnet, HOSTS, bin).unwrap();
    let cfg = lab.dir.join(format!("{profile}.toml"));
    std::fs::write(&cfg, format!("swim_profile = \"{profile}\"\n")).unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    for i in 0..HOSTS {
        lab.start_agent(i, &["--config", &cfg]).unwrap();
    }
    wait_for(Duration::from_secs(30), || all_alive(&lab).then_some(())).expect("cluster formed");
    let mut times = Vec::new();
    for t in 0..trials {
        let victim = 1 + (t as usize % (HOSTS - 1));
        let name = format!("h{victim}");
        let survivors: Vec<usize> = (0..HOSTS).filter(|&i| i != victim).collect();
        let start = Instant::now();
        lab.signal(victim, Signal::SIGKILL);
        loop {
            if survivors
                .iter()
                .all(|&i| state_of(&lab, i, &name).as_deref() == Some("down"))
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} never detected"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!("{profile}: trial {t}: {name} down everywhere after {secs:.3} s");
        times.push(secs);
        lab.start_agent(victim, &["--config", &cfg]).unwrap();
        wait_for(Duration::from_secs(30), || all_alive(&lab).then_some(())).expect("re-formed");
        std::thread::sleep(Duration::from_secs(1));
    }
    let before: usize = (0..HOSTS)
        .map(|i| lab.log(i).matches("member down").count())
        .sum();
    lab.loss(0.10).unwrap();
    std::thread::sleep(Duration::from_secs(loss_s));
    lab.heal().unwrap();
    let after: usize = (0..HOSTS)
        .map(|i| lab.log(i).matches("member down").count())
        .sum();
    (times, after - before)
}

fn main() {
    if !bench_gate("detection") {
        return;
    }
    let trials = env_or("SHOAL_BENCH_TRIALS", 10u64);
    let loss_s = env_or("SHOAL_BENCH_LOSS_S", 60u64);
    println!("| SWIM profile | trials | detection median | detection max | false downs, 10 % loss for {loss_s} s |");
    println!("|---|---|---|---|---|");
    let only = std::env::var("SHOAL_BENCH_PROFILES").unwrap_or_default();
    for (profile, subnet) in [("fast", 60u8), ("memberlist", 61)] {
        if !only.is_empty() && !only.split(',').any(|p| p == profile) {
            continue;
        }
        let (mut t, false_downs) = run_profile(profile, subnet, trials, loss_s);
        let max = t.iter().copied().fold(0.0, f64::max);
        let med = median(&mut t);
        println!("| {profile} | {trials} | {med:.3} s | {max:.3} s | {false_downs} |");
    }
}
