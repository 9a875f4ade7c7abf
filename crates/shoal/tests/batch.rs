//! Batch jobs on real agents in network namespaces (root; elsewhere each
//! test prints why it skipped): a DAG in order, bad job files refused,
//! 1,000 tasks while executors are killed and restarted, the submitting
//! agent killed mid-batch, a partitioned executor, a full disk.

#![allow(clippy::unwrap_used)] // tests panic on purpose

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use shoal_netns::{wait_for, Lab};

/// Starts `n` hosts (h0 lending no slots when `h0_executes` is false),
/// waits for the cluster and every node's facts; returns a work directory.
fn formed(lab: &mut Lab, n: usize, h0_executes: bool) -> PathBuf {
    let all: Vec<usize> = (0..n).collect();
    for &i in &all {
        let extra: &[&str] = if i == 0 && !h0_executes {
            &["--slots", "0"]
        } else {
            &[]
        };
        lab.start_agent(i, extra).expect("starting an agent");
    }
    wait_alive(lab, &all, &all, Duration::from_secs(20));
    lab.wait_ready(0, n, Duration::from_secs(10))
        .expect("facts from every node");
    let dir = lab.dir.join("work");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn submit(lab: &Lab, dir: &Path, args: &[&str]) -> Vec<u64> {
    let mut a = vec!["submit"];
    a.extend_from_slice(args);
    let o = shoal(lab, dir, &a);
    assert!(o.status.success(), "submit: {}", text(&o.stderr));
    text(&o.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

fn job(lab: &Lab, dir: &Path, id: u64) -> Option<Value> {
    let o = shoal(lab, dir, &["jobs", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v["jobs"]
        .as_array()?
        .iter()
        .find(|j| j["id"] == id)
        .cloned()
}

fn wait_done(lab: &Lab, dir: &Path, id: u64, timeout: Duration) -> Value {
    wait_for(timeout, || {
        let j = job(lab, dir, id)?;
        matches!(j["state"].as_str(), Some("done" | "failed" | "cancelled")).then_some(j)
    })
    .unwrap_or_else(|| {
        let s = shoal(lab, dir, &["status", &id.to_string()]);
        panic!("job {id} did not end:\n{}", text(&s.stdout))
    })
}

/// Every task's landed outputs: index → (stdout, status.json).
fn landed(out: &Path) -> Vec<(u32, String, Value)> {
    let mut v: Vec<(u32, String, Value)> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let i: u32 = e.file_name().to_str()?.parse().ok()?;
            let so = std::fs::read_to_string(e.path().join("stdout")).ok()?;
            let st =
                serde_json::from_slice(&std::fs::read(e.path().join("status.json")).ok()?).ok()?;
            Some((i, so, st))
        })
        .collect();
    v.sort_by_key(|x| x.0);
    v
}

fn leftovers(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".shoal-"))
        .collect()
}

#[test]
fn a_dag_runs_in_order_and_bad_jobs_are_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("bat1", 44, 2) else {
        return;
    };
    let dir = formed(&mut lab, 2, true);
    std::fs::write(
        dir.join("dag.toml"),
        r#"
[[job]]
name = "c"
command = ["sh", "-c", "set -e; cat out/b/0/files/b > c; echo c >> c"]
inputs = ["out"]
output = "out/c"
after = ["b"]

[[job]]
name = "a"
command = ["sh", "-c", "echo a > a"]
output = "out/a"

[[job]]
name = "b"
command = ["sh", "-c", "set -e; cat out/a/0/files/a > b; echo b >> b"]
output = "out/b"
after = ["a"]
"#,
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let ids = submit(&lab, &dir, &["dag.toml"]);
    assert_eq!(ids.len(), 3);
    let c = wait_done(&lab, &dir, ids[0], Duration::from_secs(60));
    assert_eq!(c["state"], "done", "{c}");
    // b read a's output, c read b's: they ran in order.
    assert_eq!(
        std::fs::read_to_string(dir.join("out/c/0/files/c")).unwrap(),
        "a\nb\nc\n"
    );

    for (file, want) in [
        ("name = \"x\"\ncommand = [\"true\"]\ncount = \"many\"\n", "line 3, column 9"),
        ("name = \"x\"\ncommand = [\"true\"]\ncuont = 3\n", "cuont"),
        (
            "[[job]]\nname = \"p\"\ncommand = [\"true\"]\nafter = [\"q\"]\n[[job]]\nname = \"q\"\ncommand = [\"true\"]\nafter = [\"p\"]\n",
            "cycle",
        ),
        ("name = \"x\"\ncommand = [\"true\"]\nafter = [\"nope\"]\n", "nope"),
        ("name = \"x\"\ncommand = [\"true\"]\nmem = \"100T\"\n", "no node has"),
    ] {
        std::fs::write(dir.join("bad.toml"), file).unwrap();
        let o = shoal(&lab, &dir, &["submit", "bad.toml"]);
        assert_eq!(o.status.code(), Some(2), "{file}");
        assert!(text(&o.stderr).contains(want), "{file}: {}", text(&o.stderr));
    }
    let o = shoal(&lab, &dir, &["jobs", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["jobs"].as_array().unwrap().len(),
        3,
        "nothing else was queued"
    );
}

#[test]
fn a_thousand_tasks_land_once_while_executors_die_and_come_back() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("bat2", 45, 4) else {
        return;
    };
    let dir = formed(&mut lab, 4, true);
    let ids = submit(
        &lab,
        &dir,
        &[
            "--count",
            "1000",
            "--name",
            "k",
            "--",
            "sh",
            "-c",
            // (50 ms each: on 8 slots the batch lasts 6 s at the least,
            // however fast the executors, so that they are disturbed.)
            "sleep 0.05; echo $SHOAL_TASK_INDEX; echo $SHOAL_TASK_INDEX > out",
        ],
    );
    let id = ids[0];
    let t0 = Instant::now();
    let mut victim = 1;
    let mut kills = 0;
    while t0.elapsed() < Duration::from_secs(240) {
        std::thread::sleep(Duration::from_millis(1000));
        let j = job(&lab, &dir, id).unwrap();
        if j["state"] == "done" {
            break;
        }
        // A random executor (h1..h3) dies mid-batch and comes back.
        victim = 1 + (victim + (t0.elapsed().as_millis() as usize % 2)) % 3;
        lab.signal(victim, nix::sys::signal::Signal::SIGKILL);
        kills += 1;
        std::thread::sleep(Duration::from_millis(300));
        lab.start_agent(victim, &[]).unwrap();
    }
    assert!(
        kills >= 2,
        "the batch ended before the executors were disturbed"
    );
    let j = wait_done(&lab, &dir, id, Duration::from_secs(120));
    eprintln!(
        "1000 tasks in {:.1} s with {kills} executor kills",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["done"], 1000);
    let out = dir.join("shoal-out/k");
    let l = landed(&out);
    assert_eq!(l.len(), 1000, "every output present");
    for (i, so, st) in &l {
        assert_eq!(so, &format!("{i}\n"), "task {i}'s stdout, once");
        assert_eq!(st["status"], 0);
        assert_eq!(
            std::fs::read_to_string(out.join(i.to_string()).join("files/out")).unwrap(),
            format!("{i}\n")
        );
    }
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}

#[test]
fn the_submitting_agent_killed_mid_batch_finishes_it_after_a_restart() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("bat3", 46, 3) else {
        return;
    };
    let dir = formed(&mut lab, 3, true);
    let ids = submit(
        &lab,
        &dir,
        &[
            "--count",
            "60",
            "--name",
            "s",
            "--",
            "sh",
            "-c",
            "sleep 0.2; echo $SHOAL_TASK_INDEX",
        ],
    );
    wait_for(Duration::from_secs(30), || {
        let j = job(&lab, &dir, ids[0])?;
        (j["done"].as_u64()? >= 5).then_some(())
    })
    .expect("the batch is under way");
    lab.signal(0, nix::sys::signal::Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent(0, &[]).unwrap();
    let j = wait_done(&lab, &dir, ids[0], Duration::from_secs(120));
    assert_eq!(j["state"], "done", "{j}");
    let out = dir.join("shoal-out/s");
    let l = landed(&out);
    assert_eq!(l.len(), 60);
    for (i, so, _) in &l {
        assert_eq!(so, &format!("{i}\n"));
    }
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}

#[test]
fn a_partitioned_executor_never_commits_twice() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("bat4", 47, 3) else {
        return;
    };
    // Only h1 and h2 execute.
    let dir = formed(&mut lab, 3, false);
    let ids = submit(
        &lab,
        &dir,
        &[
            "--count",
            "4",
            "--name",
            "p",
            "--",
            "sh",
            "-c",
            "sleep 3; echo $SHOAL_NODE",
        ],
    );
    wait_for(Duration::from_secs(20), || {
        let j = job(&lab, &dir, ids[0])?;
        (j["running"].as_u64()? == 4).then_some(())
    })
    .expect("all four running");
    lab.partition(&[1]).unwrap();
    let j = wait_done(&lab, &dir, ids[0], Duration::from_secs(60));
    lab.heal().unwrap();
    // Give the cut-off executor's attempts time to end and try to report.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(j["state"], "done", "{j}");
    let out = dir.join("shoal-out/p");
    let l = landed(&out);
    assert_eq!(l.len(), 4);
    for (_, so, st) in &l {
        assert_eq!(so, "h2\n", "only the reachable executor's results land");
        assert_eq!(st["node"], "h2");
    }
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}

#[test]
fn a_full_disk_fails_the_task_there_and_it_runs_elsewhere() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("bat5", 48, 3) else {
        return;
    };
    // h1's data dir (its task directories) is a 4 MiB disk.
    let _disk = Tmpfs::mount(&lab.hosts[1].data_dir, "4m");
    let dir = formed(&mut lab, 3, false);
    let ids = submit(
        &lab,
        &dir,
        &[
            "--count",
            "4",
            "--name",
            "big",
            "--retries",
            "1",
            "--",
            "sh",
            "-c",
            "head -c 6000000 /dev/zero > blob && echo wrote on $SHOAL_NODE",
        ],
    );
    let j = wait_done(&lab, &dir, ids[0], Duration::from_secs(60));
    assert_eq!(j["state"], "done", "{j}");
    let st = shoal(&lab, &dir, &["status", &ids[0].to_string(), "--json"]);
    let v: Value = serde_json::from_slice(&st.stdout).unwrap();
    for t in v["tasks"].as_array().unwrap() {
        assert_eq!(t["node"], "h2", "{t}");
    }
    let out = dir.join("shoal-out/big");
    let l = landed(&out);
    assert_eq!(l.len(), 4);
    for (_, so, _) in &l {
        assert_eq!(so, "wrote on h2\n");
    }
    // Where it failed, the reason is on record: the node and the task's
    // own last word.
    let tried: Vec<&Value> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["attempts"].as_u64() > Some(1))
        .collect();
    assert!(!tried.is_empty(), "some task was tried on h1 first: {v}");
    for t in tried {
        let why = t["why"].as_str().unwrap_or("");
        assert!(
            why.contains("on h1") && why.contains("No space left on device"),
            "{t}"
        );
    }
}

#[test]
fn wait_logs_retry_cancel_and_a_corrupt_journal() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("bat6", 49, 2) else {
        return;
    };
    let dir = formed(&mut lab, 2, true);
    // Task 1 fails until the file `fixed` exists; no retries.
    let ids = submit(
        &lab,
        &dir,
        &[
            "--count",
            "3",
            "--retries",
            "0",
            "--name",
            "w",
            "--",
            "sh",
            "-c",
            "echo one $SHOAL_TASK_INDEX; sleep 0.3; echo two; \
             [ $SHOAL_TASK_INDEX != 1 ] || [ -f fixed ] || { echo broken >&2; exit 3; }",
        ],
    );
    let id = ids[0].to_string();
    let w = shoal(&lab, &dir, &["wait", &id]);
    assert_eq!(w.status.code(), Some(1), "{}", text(&w.stderr));
    assert!(text(&w.stderr).contains("failed"), "{}", text(&w.stderr));
    let l = shoal(&lab, &dir, &["logs", &format!("{id}.2")]);
    assert_eq!(text(&l.stdout), "one 2\ntwo\n");
    let all = shoal(&lab, &dir, &["logs", &id]);
    assert_eq!(text(&all.stdout), "one 0\ntwo\none 1\ntwo\none 2\ntwo\n");
    let e = shoal(&lab, &dir, &["logs", &format!("{id}.1"), "--stderr"]);
    assert_eq!(text(&e.stdout), "broken\n");
    let st = shoal(&lab, &dir, &["status", &id, "--json"]);
    let v: Value = serde_json::from_slice(&st.stdout).unwrap();
    let t1 = &v["tasks"][1];
    assert_eq!(t1["state"], "failed");
    assert!(
        t1["why"].as_str().unwrap().contains("exit status 3")
            && t1["why"].as_str().unwrap().contains("broken"),
        "{t1}"
    );
    // Fixed: `retry --failed` runs task 1 again, and only it.
    std::fs::write(dir.join("fixed"), "").unwrap();
    let r = shoal(&lab, &dir, &["retry", &id, "--failed"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let w = shoal(&lab, &dir, &["wait", &id]);
    assert_eq!(w.status.code(), Some(0), "{}", text(&w.stderr));
    let l = landed(&dir.join("shoal-out/w"));
    assert_eq!(l.len(), 3);
    assert_eq!(l[0].2["attempts"], 1);
    assert_eq!(l[1].2["attempts"], 2);
    assert_eq!(l[1].2["status"], 0);

    // --follow prints as the task prints, and ends with it.
    let ids = submit(
        &lab,
        &dir,
        &[
            "--name",
            "f",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3; do echo $i; sleep 0.4; done",
        ],
    );
    let f = shoal(&lab, &dir, &["logs", &format!("{}.0", ids[0]), "--follow"]);
    assert_eq!(text(&f.stdout), "1\n2\n3\n");

    // Cancel: nothing more starts, nothing of it lands.
    let ids = submit(
        &lab,
        &dir,
        &["--count", "30", "--name", "c", "--", "sleep", "1"],
    );
    let c = shoal(&lab, &dir, &["cancel", &ids[0].to_string()]);
    assert!(c.status.success(), "{}", text(&c.stderr));
    let w = shoal(&lab, &dir, &["wait", &ids[0].to_string()]);
    assert_eq!(w.status.code(), Some(1));
    std::thread::sleep(Duration::from_secs(2));
    let out = dir.join("shoal-out/c");
    let n = std::fs::read_dir(&out).map_or(0, |r| r.count());
    assert_eq!(n, 0, "a cancelled job lands nothing");

    // A corrupt journal is reported at start-up and kept as it is.
    lab.signal(0, nix::sys::signal::Signal::SIGKILL);
    let j = lab.hosts[0].data_dir.join("jobs.redb");
    std::fs::write(&j, vec![0x42; 16384]).unwrap();
    lab.start_agent(0, &[]).unwrap();
    wait_for(Duration::from_secs(10), || nodes(&lab, 0)).expect("agent up");
    let o = shoal(&lab, &dir, &["jobs"]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("jobs.redb") && e.contains("corrupt"), "{e}");
    assert_eq!(
        std::fs::read(&j).unwrap(),
        vec![0x42; 16384],
        "kept as it was"
    );
}

/// `shoal ARGS --data-dir h0` from `dir`, as uid/gid 65534.
fn shoal_as_nobody(lab: &Lab, dir: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(shoal_bin())
        .arg(args[0])
        .arg("--data-dir")
        .arg(&lab.hosts[0].data_dir)
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn the_agent_reads_and_writes_a_users_job_files_with_that_users_rights() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("bat7", 50, 2) else {
        return;
    };
    formed(&mut lab, 2, true);
    let user = lab.dir.join("nobodys");
    std::fs::create_dir_all(&user).unwrap();
    std::os::unix::fs::chown(&user, Some(65534), Some(65534)).unwrap();
    std::fs::write(user.join("ok.txt"), "fine\n").unwrap();
    std::os::unix::fs::chown(user.join("ok.txt"), Some(65534), Some(65534)).unwrap();
    // A file root left in the user's directory, which the user may not read.
    std::fs::write(user.join("secret.txt"), "root's\n").unwrap();
    std::fs::set_permissions(
        user.join("secret.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let ended = |id: &str| -> Value {
        wait_for(Duration::from_secs(60), || {
            let o = shoal(&lab, &user, &["status", id, "--json"]);
            let v: Value = serde_json::from_slice(&o.stdout).ok()?;
            let t = v["tasks"].as_array()?.first()?.clone();
            matches!(t["state"].as_str(), Some("done" | "failed")).then_some(t)
        })
        .unwrap_or_else(|| panic!("job {id} did not end"))
    };

    // Its own file: the job runs and the outputs are the user's.
    let o = shoal_as_nobody(
        &lab,
        &user,
        &[
            "submit", "--name", "mine", "--input", "ok.txt", "--", "cat", "ok.txt",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let t = ended(text(&o.stdout).trim());
    assert_eq!(t["state"], "done", "{t}");
    let out = user.join("shoal-out/mine/0");
    assert_eq!(
        std::fs::read_to_string(out.join("stdout")).unwrap(),
        "fine\n"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&out).unwrap().uid(), 65534);
    assert_eq!(
        std::fs::metadata(out.join("status.json")).unwrap().uid(),
        65534
    );
    // A task that changed no file lands an empty stderr and no `files/`.
    assert_eq!(std::fs::read(out.join("stderr")).unwrap(), b"");
    assert!(!out.join("files").exists(), "files/ without changes");

    // The root-only file: refused, named; never shipped to a task.
    let o = shoal_as_nobody(
        &lab,
        &user,
        &[
            "submit",
            "--name",
            "peek",
            "--retries",
            "0",
            "--input",
            "secret.txt",
            "--",
            "cat",
            "secret.txt",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let t = ended(text(&o.stdout).trim());
    assert_eq!(t["state"], "failed", "{t}");
    let why = t["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("secret.txt") && why.contains("ermission denied"),
        "{t}"
    );
    assert!(
        !user.join("shoal-out/peek/0/stdout").exists()
            || !std::fs::read_to_string(user.join("shoal-out/peek/0/stdout"))
                .unwrap()
                .contains("root's")
    );

    // Outputs pointed through a link at a directory of root's: the agent
    // writes nothing there and changes no owner.
    let rootdir = lab.dir.join("roots");
    std::fs::create_dir_all(&rootdir).unwrap();
    std::os::unix::fs::symlink(&rootdir, user.join("evil")).unwrap();
    std::os::unix::fs::lchown(user.join("evil"), Some(65534), Some(65534)).unwrap();
    let o = shoal_as_nobody(
        &lab,
        &user,
        &[
            "submit",
            "--name",
            "sneak",
            "--retries",
            "0",
            "--input",
            "ok.txt",
            "--output",
            "evil/sneak",
            "--",
            "cat",
            "ok.txt",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let t = ended(text(&o.stdout).trim());
    assert_eq!(t["state"], "failed", "{t}");
    assert!(
        std::fs::read_dir(&rootdir).unwrap().next().is_none(),
        "nothing written in root's directory"
    );
    assert_eq!(std::fs::metadata(&rootdir).unwrap().uid(), 0);
}

#[test]
fn attempts_running_when_the_submitting_agent_dies_are_adopted_not_run_again() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("bat8", 51, 3) else {
        return;
    };
    // h2's task scratch is in memory: the upper layers it keeps for the
    // submitter's return are on its tmpfs, h1's on its disk.
    lab.configs[2] = format!("scratch = \"memory\"\n{}", lab.configs[2]);
    // Only h1 and h2 execute: two slots each, four tasks at once.
    let dir = formed(&mut lab, 3, false);
    let ids = submit(
        &lab,
        &dir,
        &[
            "--count",
            "4",
            "--name",
            "a",
            "--",
            "sh",
            "-c",
            // (`big`: more than a change set holds, so it is streamed
            // after it, from the upper layer the executor keeps for the
            // submitter's return.)
            "echo start $SHOAL_TASK_INDEX; sleep 4; echo end $SHOAL_TASK_INDEX > f; \
             yes $SHOAL_TASK_INDEX | head -c 5242880 > big; echo $SHOAL_NODE",
        ],
    );
    wait_for(Duration::from_secs(20), || {
        let j = job(&lab, &dir, ids[0])?;
        (j["running"].as_u64()? == 4).then_some(())
    })
    .expect("all four running");
    // Some output has reached the stage before the submitter dies.
    std::thread::sleep(Duration::from_millis(800));
    lab.signal(0, nix::sys::signal::Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent(0, &[]).unwrap();
    let j = wait_done(&lab, &dir, ids[0], Duration::from_secs(60));
    assert_eq!(j["state"], "done", "{j}");
    let out = dir.join("shoal-out/a");
    let l = landed(&out);
    assert_eq!(l.len(), 4);
    for (i, so, st) in &l {
        let node = st["node"].as_str().unwrap().to_owned();
        assert_eq!(
            so,
            &format!("start {i}\n{node}\n"),
            "each byte once, in order"
        );
        assert_eq!(st["attempts"], 1, "adopted, not run again: {st}");
        assert_eq!(
            std::fs::read_to_string(out.join(format!("{i}/files/f"))).unwrap(),
            format!("end {i}\n")
        );
        let big = std::fs::read(out.join(format!("{i}/files/big"))).unwrap();
        assert_eq!(big.len(), 5_242_880, "task {i}'s large file came whole");
        assert!(
            big.chunks(2).all(|c| c == format!("{i}\n").as_bytes()),
            "task {i}'s large file is its own"
        );
    }
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
    // Collected: no kept upper layer is left on the executors.
    for (h, spool) in [(1, "spool"), (2, "mem/spool")] {
        let spool = lab.hosts[h].data_dir.join(spool);
        assert!(spool.is_dir(), "{}", spool.display());
        let kept: Vec<_> = std::fs::read_dir(&spool)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(kept.is_empty(), "h{h} kept {kept:?}");
    }
}

/// TCP connections accepted so far in host `i`'s network namespace.
fn passive_opens(lab: &Lab, i: usize) -> u64 {
    let o = lab.cmd(i, "cat").arg("/proc/net/snmp").output().unwrap();
    let t = text(&o.stdout);
    let mut rows = t.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "PassiveOpens")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

#[test]
fn attempts_reuse_their_links_to_an_executor() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("bat9", 53, 2) else {
        return;
    };
    let dir = formed(&mut lab, 2, true);
    let before: u64 = (0..2).map(|i| passive_opens(&lab, i)).sum();
    let n = 60;
    let ids = submit(
        &lab,
        &dir,
        &[
            "--count",
            &n.to_string(),
            "--name",
            "l",
            "--",
            "sh",
            "-c",
            "echo $SHOAL_TASK_INDEX",
        ],
    );
    let j = wait_done(&lab, &dir, ids[0], Duration::from_secs(120));
    assert_eq!(j["done"], n, "{j}");
    let opened = (0..2).map(|i| passive_opens(&lab, i)).sum::<u64>() - before;
    // One connection per attempt without reuse; with it, about one per
    // attempt running at once (and the odd bandwidth probe).
    assert!(opened < n / 2, "{opened} connections for {n} attempts");
    let out = dir.join("shoal-out/l");
    let l = landed(&out);
    assert_eq!(l.len(), n as usize);
    for (i, so, st) in &l {
        assert_eq!(so, &format!("{i}\n"), "task {i}'s own stdout");
        assert_eq!(st["status"], 0);
    }
}
