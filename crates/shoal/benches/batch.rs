//! Batch throughput on a 3-host netns cluster (root): `cargo bench -p shoal
//! --bench batch`. `SHOAL_BENCH_TASKS` (10000) tiny tasks (`true`) in one
//! job, from `shoal submit` to every output committed; submit latency of a
//! one-task job (median of 20); and, where a one-node Slurm answers
//! (`scripts/slurm-peer up`), `sbatch --wrap true` for
//! `SHOAL_BENCH_PEER_TASKS` (100) jobs as the peer.

#![allow(clippy::unwrap_used)] // a benchmark aborts on setup failure

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_netns::{bench_gate, env_or, wait_for, Lab};

fn main() {
    if !bench_gate("batch") {
        return;
    }
    let n: u32 = env_or("SHOAL_BENCH_TASKS", 10_000);
    let bin = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let mut lab = Lab::new("bbat", 64, 3, bin).unwrap();
    for i in 0..3 {
        lab.start_agent(i, &[]).unwrap();
    }
    let data0 = lab.hosts[0].data_dir.clone();
    lab.wait_ready(0, 3, Duration::from_secs(30))
        .expect("cluster formed");
    let dir = lab.dir.join("work");
    std::fs::create_dir_all(&dir).unwrap();
    let submit = |args: &[&str]| -> (u64, Duration) {
        let t = Instant::now();
        let o = Command::new(bin)
            .arg("submit")
            .arg("--data-dir")
            .arg(&data0)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let d = t.elapsed();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stdout).trim().parse().unwrap(),
            d,
        )
    };
    let state = |id: u64| -> Option<(String, u64)> {
        let o = Command::new(bin)
            .args(["jobs", "--json", "--data-dir"])
            .arg(&data0)
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let j = v["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["id"] == id)?
            .clone();
        Some((j["state"].as_str()?.to_owned(), j["done"].as_u64()?))
    };
    // Submit latency: one-task jobs, each waited for so the queue is idle.
    let mut lat = Vec::new();
    for k in 0..20 {
        let (id, d) = submit(&["--name", &format!("l{k}"), "--", "true"]);
        lat.push(d);
        wait_for(Duration::from_secs(30), || {
            (state(id)?.0 == "done").then_some(())
        })
        .expect("one-task job done");
    }
    lat.sort();
    // Throughput.
    let t0 = Instant::now();
    let (id, big_submit) = submit(&["--count", &n.to_string(), "--name", "tiny", "--", "true"]);
    wait_for(Duration::from_secs(3600), || {
        let (s, _) = state(id)?;
        (s == "done" || s == "failed").then_some(())
    })
    .expect("batch done");
    let total = t0.elapsed();
    let (s, done) = state(id).unwrap();
    drop(lab);

    // Slurm finishes jobs far more slowly here: a smaller count.
    let pn: u32 = env_or("SHOAL_BENCH_PEER_TASKS", 100);
    // The peer, where a one-node Slurm answers.
    let slurm = pn > 0
        && Command::new("sinfo")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let peer = if slurm {
        let t = Instant::now();
        let mut ok = 0u32;
        for _ in 0..pn {
            if Command::new("sbatch")
                .args(["--wrap", "true", "-o", "/dev/null"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                ok += 1;
            }
        }
        let sub = t.elapsed();
        while Command::new("squeue")
            .args(["-h", "-t", "PD,R"])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        let all = t.elapsed();
        format!(
            "{ok} jobs: {:.0} jobs/s submitted, {:.0} jobs/s to all finished",
            f64::from(ok) / sub.as_secs_f64(),
            f64::from(ok) / all.as_secs_f64()
        )
    } else {
        "not measured: no one-node Slurm answers here (`scripts/slurm-peer up` starts one)"
            .to_owned()
    };

    println!("| measure | shoal | peer (same run) |");
    println!("|---|---|---|");
    println!(
        "| {n} tiny tasks (`true`), submit to every output committed | {:.1} s: **{:.0} tasks/s** ({s}, {done} done) | Slurm `sbatch --wrap true`: {peer} |",
        total.as_secs_f64(),
        f64::from(n) / total.as_secs_f64()
    );
    println!(
        "| submit latency, one-task job (median of 20; max) | {:.1} ms ({:.1} ms) | |",
        lat[10].as_secs_f64() * 1e3,
        lat[19].as_secs_f64() * 1e3
    );
    println!(
        "| submit latency, the {n}-task job | {:.1} ms | |",
        big_submit.as_secs_f64() * 1e3
    );
}
