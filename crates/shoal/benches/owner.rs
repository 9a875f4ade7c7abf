//! Owner protection on a 2-host netns cluster (root): `cargo bench -p shoal
//! --bench owner`.
//!
//! 1. A fixed CPU-bound owner workload on every core, timed alone and then
//!    beside guests saturating every core: shoal's guests (sent from h0 to
//!    h1, so they run at the idle class), and in the same run plain busy
//!    loops under `nice -n 19` and at normal priority, for comparison.
//!    The figure is time alone / time with guests (1.0 = untouched).
//! 2. Time from owner input (a read on a pseudo-terminal after 9 s without
//!    input, as a shell reading the key of someone coming back) to every
//!    guest frozen, and from `shoal owner busy`.
//!
//! `SHOAL_BENCH_N` (7) sets the repetitions of each.

#![allow(clippy::unwrap_used)] // a benchmark aborts on setup failure

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_netns::{bench_gate, env_or, median, ms, wait_for, Lab, LAB_CONFIG};

/// The owner's workload: `threads` threads, each a fixed amount of integer
/// work; returns the wall time.
fn owner_work(threads: usize) -> Duration {
    let t = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|k| {
            std::thread::spawn(move || {
                let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ k as u64;
                for _ in 0..150_000_000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                }
                std::hint::black_box(x)
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    t.elapsed()
}

fn spinners(n: usize, nice: bool) -> Vec<Child> {
    (0..n)
        .map(|_| {
            let mut c = if nice {
                let mut c = Command::new("nice");
                c.args(["-n", "19", "sh", "-c", "while :; do :; done"]);
                c
            } else {
                let mut c = Command::new("sh");
                c.args(["-c", "while :; do :; done"]);
                c
            };
            c.stdin(Stdio::null()).spawn().unwrap()
        })
        .collect()
}

fn stop(v: Vec<Child>) {
    for mut c in v {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Every guest cgroup of agent `name`, and whether all are frozen.
fn all_frozen(name: &str) -> Option<bool> {
    let v1 = PathBuf::from(format!("/sys/fs/cgroup/freezer/shoal-{name}"));
    let v2 = PathBuf::from(format!("/sys/fs/cgroup/shoal-{name}"));
    let (dir, v1) = if v1.exists() { (v1, true) } else { (v2, false) };
    let mut n = 0;
    for e in std::fs::read_dir(&dir).ok()?.flatten() {
        if !e.path().is_dir() {
            continue;
        }
        n += 1;
        let frozen = if v1 {
            std::fs::read_to_string(e.path().join("freezer.state")).ok()? == "FROZEN\n"
        } else {
            std::fs::read_to_string(e.path().join("cgroup.events"))
                .ok()?
                .contains("frozen 1")
        };
        if !frozen {
            return Some(false);
        }
    }
    Some(n > 0)
}

fn wait_frozen(name: &str, want: bool, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if all_frozen(name) == Some(want) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

fn main() {
    if !bench_gate("owner") {
        return;
    }
    let n: usize = env_or("SHOAL_BENCH_N", 7);
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get());
    let bin = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let mut lab = Lab::new("bown", 63, 2, bin).unwrap();
    // h1 freezes at once on input and thaws two seconds later; its owner
    // CPU is not looked at (the owner workload is what we measure).
    lab.configs[1] = LAB_CONFIG
        .replace("suspend = \"false\"", "suspend = \"owner_idle_s < 1\"")
        .replace("continue = \"true\"", "continue = \"owner_idle_s >= 2\"");
    for i in 0..2 {
        lab.start_agent(i, &["--slots", &cores.to_string()])
            .unwrap();
    }
    let data0 = lab.hosts[0].data_dir.clone();
    let data1 = lab.hosts[1].data_dir.clone();
    lab.wait_ready(0, 2, Duration::from_secs(30))
        .expect("cluster formed");
    let dir = lab.dir.join("tree");
    std::fs::create_dir_all(&dir).unwrap();
    let guests = |k: usize| -> Vec<Child> {
        let v: Vec<Child> = (0..k)
            .map(|_| {
                Command::new(bin)
                    .arg("run")
                    .arg("--data-dir")
                    .arg(&data0)
                    .args(["--node", "h1", "--", "sh", "-c", "while :; do :; done"])
                    .current_dir(&dir)
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        wait_for(Duration::from_secs(20), || {
            let o = Command::new(bin)
                .args(["ps", "--json", "--data-dir"])
                .arg(&data1)
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            (v["tasks"].as_array()?.len() == k).then_some(())
        })
        .expect("guests running on h1");
        std::thread::sleep(Duration::from_millis(300));
        v
    };

    // 1. Owner protection, interleaved so drift hits every case alike.
    let (mut alone, mut with_shoal, mut with_nice, mut with_plain) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    owner_work(cores); // warm-up
    for _ in 0..n {
        alone.push(owner_work(cores));
        let g = guests(cores);
        with_shoal.push(owner_work(cores));
        stop(g);
        let s = spinners(cores, true);
        with_nice.push(owner_work(cores));
        stop(s);
        let s = spinners(cores, false);
        with_plain.push(owner_work(cores));
        stop(s);
    }
    let (a, s, ni, p) = (
        median(alone),
        median(with_shoal),
        median(with_nice),
        median(with_plain),
    );

    // 2. Owner input → every guest frozen.
    let g = guests(cores);
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut master = std::fs::File::from(pty.master);
    let mut slave = std::fs::File::from(pty.slave);
    let mut to_frozen = Vec::new();
    let mut last_read = Instant::now();
    for _ in 0..n {
        wait_frozen("h1", false, Duration::from_secs(15)).expect("thawed");
        // The kernel moves a terminal's access time at once only when its
        // last move is more than 8 s old (the owner coming back).
        std::thread::sleep(Duration::from_secs(9).saturating_sub(last_read.elapsed()));
        use std::io::{Read, Write};
        master.write_all(b"k\n").unwrap();
        let mut b = [0u8; 8];
        let t = Instant::now();
        let _ = slave.read(&mut b).unwrap();
        last_read = Instant::now();
        wait_frozen("h1", true, Duration::from_secs(5)).expect("frozen");
        to_frozen.push(t.elapsed());
    }
    // `shoal owner busy` → frozen, and back.
    let mut by_command = Vec::new();
    for _ in 0..n {
        wait_frozen("h1", false, Duration::from_secs(15)).expect("thawed");
        let t = Instant::now();
        assert!(Command::new(bin)
            .args(["owner", "busy", "--data-dir"])
            .arg(&data1)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success());
        wait_frozen("h1", true, Duration::from_secs(5)).expect("frozen");
        by_command.push(t.elapsed());
        let _ = Command::new(bin)
            .args(["owner", "auto", "--data-dir"])
            .arg(&data1)
            .stdout(Stdio::null())
            .status();
    }
    stop(g);
    drop(lab);

    println!("| measure (median of {n}, {cores} cores) | time | owner speed (alone / with) |");
    println!("|---|---|---|");
    println!("| owner workload alone | {:.0} ms | 1.000 |", ms(a));
    println!(
        "| beside shoal guests on every core (cpu.idle + SCHED_IDLE) | {:.0} ms | {:.3} |",
        ms(s),
        ms(a) / ms(s)
    );
    println!(
        "| peer: beside `nice -n 19` busy loops on every core | {:.0} ms | {:.3} |",
        ms(ni),
        ms(a) / ms(ni)
    );
    println!(
        "| peer: beside normal-priority busy loops on every core | {:.0} ms | {:.3} |",
        ms(p),
        ms(a) / ms(p)
    );
    println!();
    println!("| owner activity → every guest frozen ({cores} guests, median of {n}) | time |");
    println!("|---|---|");
    println!(
        "| a read on a terminal (its access time, polled every 50 ms) | {:.1} ms (max {:.1} ms) |",
        ms(median(to_frozen.clone())),
        ms(*to_frozen.iter().max().unwrap())
    );
    println!(
        "| `shoal owner busy` (client start to frozen) | {:.1} ms |",
        ms(median(by_command))
    );
}
