//! Bad input at the command line and on the wire, on loopback (no root
//! needed): each is a clear error, and the agent never falls over.

#![allow(clippy::unwrap_used)] // tests panic on purpose

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

/// A scratch directory, removed when the test ends (also when it fails).
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("shoal-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn keygen(dir: &Path) -> PathBuf {
    let k = dir.join("key");
    let o = shoal().arg("keygen").arg("--out").arg(&k).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    k
}

/// A free loopback UDP+TCP port.
fn free_port() -> u16 {
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.local_addr().unwrap().port()
}

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM first: the agent removes its cgroups as it leaves.
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        // What a killed agent could not remove (its guests' parent group).
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in rd.flatten() {
                let _ = std::fs::remove_dir(c.path().join("shoal-solo"));
            }
        }
    }
}

fn agent(dir: &Path, key: &Path, port: u16, extra: &[&str]) -> Command {
    let mut c = shoal();
    c.arg("agent")
        .args([
            "--name",
            "solo",
            "--no-discovery",
            "--bind",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--config")
        .arg(dir.join("none.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--key")
        .arg(key)
        .args(extra)
        .stdin(Stdio::null());
    std::fs::write(dir.join("none.toml"), "").unwrap();
    c
}

fn nodes_json(dir: &Path) -> Option<serde_json::Value> {
    let o = shoal()
        .args(["nodes", "--json", "--data-dir"])
        .arg(dir.join("data"))
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

fn wait_nodes(dir: &Path) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = nodes_json(dir) {
            return v;
        }
        assert!(Instant::now() < end, "agent never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn keygen_writes_0600_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let d = scratch("keygen");
    let k = keygen(&d);
    assert_eq!(
        std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let o = shoal().arg("keygen").arg("--out").arg(&k).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains(k.to_str().unwrap()), "{}", stderr(&o));
}

#[test]
fn malformed_config_names_file_line_and_key() {
    let d = scratch("config");
    let k = keygen(&d);
    let cfg = d.join("bad.toml");
    std::fs::write(&cfg, "name = \"x\"\nexpect = \"three\"\n").unwrap();
    let o = shoal()
        .arg("agent")
        .arg("--config")
        .arg(&cfg)
        .arg("--key")
        .arg(&k)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("bad.toml") && e.contains("line 2") && e.contains("expect"),
        "{e}"
    );
    std::fs::write(&cfg, "[discovery]\nenable = true\n").unwrap();
    let o = shoal()
        .arg("agent")
        .arg("--config")
        .arg(&cfg)
        .arg("--key")
        .arg(&k)
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(e.contains("line 2") && e.contains("enable"), "{e}");
    let o = shoal()
        .arg("agent")
        .arg("--config")
        .arg(d.join("absent.toml"))
        .output()
        .unwrap();
    assert!(stderr(&o).contains("absent.toml"), "{}", stderr(&o));
}

#[test]
fn missing_or_open_key_file_is_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let d = scratch("nokey");
    let port = free_port();
    let o = agent(&d, &d.join("missing.key"), port, &[])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot read key file") && stderr(&o).contains("missing.key"),
        "{}",
        stderr(&o)
    );
    let k = keygen(&d);
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = agent(&d, &k, port, &[]).output().unwrap();
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
}

#[test]
fn port_in_use_says_which() {
    let d = scratch("port");
    let k = keygen(&d);
    let held = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let o = agent(&d, &k, port, &[]).output().unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("in use"),
        "{e}"
    );
}

#[test]
fn no_agent_is_a_clear_error_and_usage_errors_exit_2() {
    let d = scratch("noagent");
    let o = shoal()
        .args(["nodes", "--data-dir"])
        .arg(&d)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot reach the agent"),
        "{}",
        stderr(&o)
    );
    let o = shoal().arg("no-such-command").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = shoal()
        .args(["agent", "--bind", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn garbage_datagrams_are_counted_and_ignored() {
    let d = scratch("garbage");
    let k = keygen(&d);
    let port = free_port();
    let _a = Agent(
        agent(&d, &k, port, &[])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_nodes(&d);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = format!("127.0.0.1:{port}");
    let mut x: u32 = 12345;
    for len in 0..300usize {
        let mut g: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        if len % 3 == 0 && len >= 5 {
            g[..4].copy_from_slice(b"SHL1");
            g[4] = 1;
        }
        s.send_to(&g, &to).unwrap();
        if len % 50 == 49 {
            // Stay within the agent's socket buffer.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The agent reads its socket in its own time: wait until it has.
    let end = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let r = wait_nodes(&d)["rejected"].clone();
        if r["total"].as_u64().unwrap() >= 300 || Instant::now() > end {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        before["total"].as_u64().unwrap(),
        300,
        "every garbage datagram is counted: {before}"
    );
    // A second agent of another cluster knocks with valid frames under
    // another key.
    let d2 = scratch("garbage2");
    let k2 = keygen(&d2);
    let port2 = free_port();
    let _b = Agent(
        agent(&d2, &k2, port2, &["--join", &to])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_nodes(&d2);
    std::thread::sleep(Duration::from_millis(1500));
    let v = wait_nodes(&d);
    let r = &v["rejected"];
    assert!(r["malformed"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["auth"].as_u64().unwrap() > before["auth"].as_u64().unwrap(),
        "{before} then {r}"
    );
    assert_eq!(
        v["nodes"].as_array().unwrap().len(),
        1,
        "nobody was admitted: {v}"
    );
    assert_eq!(v["nodes"][0]["state"], "alive");
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused() {
    let d = scratch("twice");
    let k = keygen(&d);
    let _a = Agent(
        agent(&d, &k, free_port(), &[])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_nodes(&d);
    let o = agent(&d, &k, free_port(), &[]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));
}
