//! `shoal run` on a 3-host netns cluster (root): `cargo bench -p shoal
//! --bench run`. Per-run latency of `true` beside a plain fork+exec of
//! `/bin/true`, bytes shipped on a second run of an unchanged tree, and a
//! 200-file C build with `make -j4 CC="shoal run -- gcc"` beside the same
//! `make -j4` run locally. All hosts share this machine's 2 cores, so the
//! build figure is pure overhead, not speed-up. `SHOAL_BENCH_N` (200) sets
//! the latency sample count; `SHOAL_BENCH_SCRATCH=memory` puts the agents'
//! task scratch on a tmpfs.

#![allow(clippy::unwrap_used)] // a benchmark aborts on setup failure

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_netns::{bench_gate, env_or, median, ms, Lab};

fn main() {
    if !bench_gate("run") {
        return;
    }
    let n: usize = env_or("SHOAL_BENCH_N", 200);
    let bin = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let mut lab = Lab::new("brun", 62, 3, bin).unwrap();
    // `SHOAL_BENCH_WARM=0`: every task in a fresh cgroup, for comparison.
    if let Ok(w) = std::env::var("SHOAL_BENCH_WARM") {
        for c in &mut lab.configs {
            *c = format!("warm_slots = {w}\n{c}");
        }
    }
    // `SHOAL_BENCH_SCRATCH=memory`: the agents' task scratch on a tmpfs.
    if let Ok(w) = std::env::var("SHOAL_BENCH_SCRATCH") {
        for c in &mut lab.configs {
            *c = format!("scratch = {w:?}\n{c}");
        }
    }
    for i in 0..3 {
        lab.start_agent(i, &[]).unwrap();
    }
    let data0 = lab.hosts[0].data_dir.clone();
    lab.wait_ready(0, 3, Duration::from_secs(30))
        .expect("cluster formed");
    let shoal_run = |dir: &Path, args: &[&str]| {
        let mut c = Command::new(bin);
        c.arg("run")
            .arg("--data-dir")
            .arg(&data0)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null());
        c
    };
    let empty = lab.dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let time = |mut f: Box<dyn FnMut()>| {
        for _ in 0..5 {
            f();
        }
        median(
            (0..n)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .collect(),
        )
    };
    // The peer is started as `shoal run` is, in the same directory: this
    // static binary's std forks a command given a directory (it cannot
    // find glibc's posix_spawn_file_actions_addchdir_np) and vforks one
    // without, about 0.05 ms apart here.
    let peer = time(Box::new(|| {
        assert!(Command::new("/bin/true")
            .current_dir(&empty)
            .stdin(Stdio::null())
            .status()
            .unwrap()
            .success())
    }));
    let local = time(Box::new(|| {
        assert!(shoal_run(&empty, &["--local", "--", "true"])
            .status()
            .unwrap()
            .success())
    }));
    let remote = time(Box::new(|| {
        assert!(shoal_run(&empty, &["--node", "h1", "--", "true"])
            .status()
            .unwrap()
            .success())
    }));

    // The same with the machine idle between runs (as between the
    // commands a person types): what an idle machine's slow RCU grace
    // periods cost a task that moves between cgroups.
    let gapped = median(
        (0..n / 4)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(200));
                let t = Instant::now();
                assert!(shoal_run(&empty, &["--local", "--", "true"])
                    .status()
                    .unwrap()
                    .success());
                t.elapsed()
            })
            .collect(),
    );

    // Where the time goes, when the agents log at debug level
    // (`SHOAL_LAB_LOG=info,shoal_agent=debug`): the executor's own timings.
    if std::env::var("SHOAL_LAB_LOG").is_ok_and(|v| v.contains("debug")) {
        for (i, label) in [(0, "local"), (1, "remote")] {
            let log = lab.log(i);
            for l in log.lines().filter(|l| l.contains("WARN")) {
                println!("h{i}: {l}");
            }
            for key in [
                "start_ms",
                "setup_ms",
                "spawn_ms",
                "started_ms",
                "exit_ms",
                "cleaned_ms",
            ] {
                let mut v: Vec<f64> = log
                    .lines()
                    .filter_map(|l| l.split(&format!("{key}=")).nth(1))
                    .filter_map(|t| t.split_whitespace().next()?.parse().ok())
                    .collect();
                v.sort_by(f64::total_cmp);
                if let Some(m) = v.get(v.len() / 2) {
                    println!(
                        "executor phase ({label}, h{i}): {key} median {m:.2} of {}",
                        v.len()
                    );
                }
            }
        }
    }

    // Shipping: 200 files of 8 KiB, run twice.
    let tree = lab.dir.join("ship");
    std::fs::create_dir_all(&tree).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..200 {
        let data: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(tree.join(format!("f{i}.dat")), data).unwrap();
    }
    let shipped = |_: ()| -> (u64, u64) {
        let o = shoal_run(&tree, &["-v", "--node", "h2", "--", "true"])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        let l = e
            .lines()
            .find(|l| l.starts_with("shoal: shipped "))
            .unwrap_or("")
            .to_owned();
        let nums: Vec<u64> = l
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|t| t.parse().ok())
            .collect();
        (
            nums.first().copied().unwrap_or(0),
            nums.get(2).copied().unwrap_or(0),
        )
    };
    let (first, total) = shipped(());
    let (second, _) = shipped(());

    // The build: 200 small C files.
    let proj = lab.dir.join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    let mut objs = Vec::new();
    for i in 0..200 {
        std::fs::write(
            proj.join(format!("f{i}.c")),
            format!(
                "#include <string.h>\nint f{i}(const char *s) {{ return (int)strlen(s) + {i}; }}\n"
            ),
        )
        .unwrap();
        objs.push(format!("f{i}.o"));
    }
    std::fs::write(
        proj.join("Makefile"),
        format!(
            "all: {}\n%.o: %.c\n\t$(CC) -O2 -c $< -o $@\n",
            objs.join(" ")
        ),
    )
    .unwrap();
    let clean = || {
        for o in &objs {
            let _ = std::fs::remove_file(proj.join(o));
        }
    };
    let build = |cc: &str| {
        clean();
        let t = Instant::now();
        let o = Command::new("make")
            .args(["-s", "-j4", &format!("CC={cc}")])
            .current_dir(&proj)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "make failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        t.elapsed()
    };
    let make_local = build("gcc");
    let cc = format!(
        "{} run --data-dir {} -- gcc",
        bin.display(),
        data0.display()
    );
    let make_shoal = build(&cc);
    let make_local2 = build("gcc");
    let make_shoal2 = build(&cc);
    let l = (make_local + make_local2) / 2;
    let s = (make_shoal + make_shoal2) / 2;
    drop(lab);

    println!("| measure | shoal | peer (same run) |");
    println!("|---|---|---|");
    println!("| `true`, median of {n} runs, peer fork+exec of /bin/true | local workspace {:.2} ms; on another host {:.2} ms | {:.2} ms |", ms(local), ms(remote), ms(peer));
    println!(
        "| `true` with 200 ms idle before each run, median of {} | local workspace {:.2} ms | |",
        n / 4,
        ms(gapped)
    );
    println!(
        "| added per run over the peer | local {:.2} ms; remote {:.2} ms | |",
        ms(local) - ms(peer),
        ms(remote) - ms(peer)
    );
    println!("| bytes shipped, tree of 200 × 8 KiB ({total} bytes) | first run {first}; second run {second} ({:.2} %) | |", 100.0 * second as f64 / total.max(1) as f64);
    println!("| 200-file C build, `make -j4` (mean of 2) | {:.2} s | local `make -j4`: {:.2} s; ratio {:.2}× |", s.as_secs_f64(), l.as_secs_f64(), s.as_secs_f64() / l.as_secs_f64());
}
