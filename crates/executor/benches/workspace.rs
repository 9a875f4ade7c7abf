//! What a workspace costs, step by step (root): `cargo bench -p
//! shoal-executor --bench workspace`. Medians over `SHOAL_BENCH_N` (200)
//! runs of `/bin/true`, beside the peer: a plain fork+exec+wait.
//! `SHOAL_BENCH_GAP_MS=20` idles between runs, as between real tasks.

#![allow(clippy::unwrap_used)] // a benchmark aborts on setup failure

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_executor::cgroup::{self, spawn_into, Limits};
use shoal_executor::workspace::{cleanup, Net, Plan, Root, Spec};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(n: usize, mut f: impl FnMut(usize)) -> Duration {
    let gap = std::env::var("SHOAL_BENCH_GAP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    for i in 0..5 {
        f(usize::MAX - i); // warm-up
    }
    median(
        (0..n)
            .map(|i| {
                if let Some(g) = gap {
                    std::thread::sleep(g);
                }
                let t = Instant::now();
                f(i);
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("workspace: run with `cargo bench -p shoal-executor --bench workspace` (0 passed, 0 failed)");
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let n: usize = std::env::var("SHOAL_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let run_dir = std::env::temp_dir().join(format!("shoal-wsbench-{}", std::process::id()));
    let spec = |net| Spec {
        run_dir: run_dir.clone(),
        root: Root::Host,
        tree: None,
        cwd: PathBuf::from("/"),
        hostname: "bench".into(),
        uid: 65534,
        gid: 65534,
        net,
        idle: false,
        tty: false,
    };
    let mgr = cgroup::open(
        Path::new("/sys/fs/cgroup"),
        &format!("shoal-bench-{}", std::process::id()),
    )
    .unwrap();
    let limits = Limits {
        cpus: Some(1.0),
        memory_bytes: Some(256 << 20),
        pids: Some(256),
        ..Limits::default()
    };

    let plain = time(n, |_| {
        assert!(Command::new("/bin/true").status().unwrap().success());
    });
    let ws_host = time(n, |_| {
        let s = spec(Net::Host);
        let mut c = Command::new("/bin/true");
        Plan::new(&s).unwrap().apply(&mut c);
        assert!(c.status().unwrap().success());
    });
    let ws = time(n, |_| {
        let s = spec(Net::Loopback);
        let mut c = Command::new("/bin/true");
        Plan::new(&s).unwrap().apply(&mut c);
        assert!(c.status().unwrap().success());
    });
    let cg = time(n, |i| {
        let name = format!("c{i}");
        mgr.create(&name, &limits).unwrap();
        mgr.remove(&name).unwrap();
    });
    let attach = time(n, |i| {
        let name = format!("a{i}");
        mgr.create(&name, &limits).unwrap();
        let mut c = Command::new("/bin/true");
        spawn_into(&mut c, mgr.as_ref(), &name).unwrap();
        assert!(c.status().unwrap().success());
        mgr.remove(&name).unwrap();
    });
    let full = time(n, |i| {
        let name = format!("f{i}");
        mgr.create(&name, &limits).unwrap();
        let s = spec(Net::Loopback);
        let mut c = Command::new("/bin/true");
        spawn_into(&mut c, mgr.as_ref(), &name).unwrap();
        Plan::new(&s).unwrap().apply(&mut c);
        assert!(c.status().unwrap().success());
        mgr.remove(&name).unwrap();
    });
    let _ = cleanup(&spec(Net::Host));
    mgr.destroy().unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| step (median of {n}) | time |");
    println!("|---|---|");
    println!(
        "| peer: fork + exec + wait of /bin/true | {:.2} ms |",
        ms(plain)
    );
    println!("| workspace, host network (mount/pid/uts/ipc ns, assembled root, pivot_root, uid) | {:.2} ms |", ms(ws_host));
    println!(
        "| workspace with its own loopback-only network namespace | {:.2} ms |",
        ms(ws)
    );
    println!(
        "| cgroup v1/v2 set: create with cpu/memory/pids limits, remove | {:.2} ms |",
        ms(cg)
    );
    println!(
        "| cgroup set + /bin/true moving itself into it before exec + removal | {:.2} ms |",
        ms(attach)
    );
    println!(
        "| all of it: cgroup + workspace + /bin/true + removal | {:.2} ms |",
        ms(full)
    );
}
