//! Test hosts as network namespaces on a bridge.
//!
//! ```text
//!   netns shoal-<tag>-br:  br0 ─┬─ vh0 ══ eth0 (netns shoal-<tag>-h0, 10.77.S.1/24)
//!                               ├─ vh1 ══ eth0 (netns shoal-<tag>-h1, 10.77.S.2/24)
//!                               └─ …
//! ```
//!
//! The bridge lives in a namespace of its own, so nothing touches the
//! machine's own network. Links are cut and made lossy with iptables rules
//! inside the hosts (`tc netem` is missing on these kernels). [`Lab`]'s
//! `Drop` stops every agent it started (SIGTERM, then SIGKILL), removes the
//! cgroups that killed agents leave, and deletes every namespace, also when
//! a test panics; a new lab with the same tag first removes what a killed
//! run left behind.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The port agents bind in the lab.
pub const PORT: u16 = 7946;

/// Why the lab could not be built or driven.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// A command could not be started.
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file in the lab's directory.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why netns tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "iptables", "nsenter"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 iptables)"
            ));
        }
    }
    None
}

fn run(cmd: &mut Command) -> Result<Output, LabError> {
    let line = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| LabError::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: line,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output, LabError> {
    run(Command::new("ip").args(args))
}

/// One test host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace.
    pub netns: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
    /// Its agent's data dir.
    pub data_dir: PathBuf,
    /// Its agent's log.
    pub log: PathBuf,
}

impl Host {
    /// The agent's SWIM address.
    pub fn addr(&self) -> String {
        format!("{}:{PORT}", self.ip)
    }

    /// The agent's control socket.
    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("agent.sock")
    }
}

/// A set of hosts on one bridge, with the agents started in them.
#[derive(Debug)]
pub struct Lab {
    tag: String,
    bridge: String,
    /// The hosts.
    pub hosts: Vec<Host>,
    /// Scratch directory: keys, data dirs, logs.
    pub dir: PathBuf,
    shoal: PathBuf,
    agents: Vec<Option<Child>>,
    /// Each host's config file text (written at every `start_agent`),
    /// [`LAB_CONFIG`] unless a test sets its own.
    pub configs: Vec<String>,
}

/// The test hosts' config: they share one machine, so the owner's figures
/// (input, CPU) are the machine's and not a host's. The lab lends its
/// slots always; tests drive the owner's state with `shoal owner`.
pub const LAB_CONFIG: &str = r#"[policy]
start = "true"
throttle = "false"
suspend = "false"
continue = "true"
evict = "false"
"#;

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    ip(&["netns", "list"])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with(prefix))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

impl Lab {
    /// Builds `n` hosts named `shoal-<tag>-h<i>` on subnet 10.77.`subnet`.0/24
    /// and writes a cluster key with `shoal keygen`.
    ///
    /// # Errors
    /// A namespace, link or address could not be made (what was made is
    /// removed).
    pub fn new(tag: &str, subnet: u8, n: usize, shoal: &Path) -> Result<Self, LabError> {
        let prefix = format!("shoal-{tag}-");
        for ns in namespaces_with_prefix(&prefix) {
            let _ = ip(&["netns", "del", &ns]);
        }
        let dir = std::env::temp_dir().join(format!("shoal-lab-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut lab = Self {
            tag: tag.to_owned(),
            bridge: format!("{prefix}br"),
            hosts: Vec::new(),
            dir,
            shoal: shoal.to_owned(),
            agents: Vec::new(),
            configs: Vec::new(),
        };
        lab.build(n, subnet)?;
        lab.keygen("cluster.key")?;
        Ok(lab)
    }

    fn build(&mut self, n: usize, subnet: u8) -> Result<(), LabError> {
        let br = self.bridge.clone();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("shoal-{}-h{i}", self.tag);
            ip(&["netns", "add", &ns])?;
            let v = format!("vh{i}");
            ip(&[
                "link", "add", &v, "netns", &br, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &br, "link", "set", &v, "master", "br0", "up"])?;
            let ipv4 = Ipv4Addr::new(10, 77, subnet, (i + 1) as u8);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ipv4}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.hosts.push(Host {
                netns: ns,
                ip: ipv4,
                data_dir: self.dir.join(format!("h{i}")),
                log: self.dir.join(format!("h{i}.log")),
            });
            self.agents.push(None);
            self.configs.push(LAB_CONFIG.to_owned());
        }
        Ok(())
    }

    /// Writes a new key file in the lab directory; returns its path.
    ///
    /// # Errors
    /// `shoal keygen` failed.
    pub fn keygen(&self, name: &str) -> Result<PathBuf, LabError> {
        let p = self.dir.join(name);
        let _ = fs::remove_file(&p);
        run(Command::new(&self.shoal).arg("keygen").arg("--out").arg(&p))?;
        Ok(p)
    }

    /// Host `i`'s config file.
    pub fn config_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("h{i}.toml"))
    }

    /// A command run inside host `i`'s network namespace.
    ///
    /// It enters only the network namespace (`nsenter --net`), not the
    /// fresh mount namespace and `/sys` that `ip netns exec` would give it:
    /// there the cgroup hierarchies are not mounted, and an agent's start-up
    /// checks would rightly fail.
    pub fn cmd(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.hosts[i].netns))
            .arg("--")
            .arg(program);
        c
    }

    /// Starts an agent on host `i` named `h<i>` with the lab key, cluster
    /// `lab`, and `extra` arguments (later flags override earlier ones).
    ///
    /// # Errors
    /// The agent could not be started.
    pub fn start_agent(&mut self, i: usize, extra: &[&str]) -> Result<(), LabError> {
        self.start(i, extra, None)
    }

    /// As [`Lab::start_agent`], the agent running as `uid`/`gid` (not
    /// root): its data directory and a copy of the key are made theirs,
    /// and it runs a link to the binary in the lab directory (which any
    /// user can reach). [`Lab::user_shoal`] is that binary.
    ///
    /// # Errors
    /// The files could not be prepared or the agent not started.
    pub fn start_agent_as(
        &mut self,
        i: usize,
        uid: u32,
        gid: u32,
        extra: &[&str],
    ) -> Result<(), LabError> {
        self.start(i, extra, Some((uid, gid)))
    }

    /// The shoal binary as every user can run it: a link (or copy) in the
    /// lab directory.
    ///
    /// # Errors
    /// Neither a link nor a copy could be made.
    pub fn user_shoal(&self) -> Result<PathBuf, LabError> {
        let p = self.dir.join("shoal");
        if !p.exists() && fs::hard_link(&self.shoal, &p).is_err() {
            fs::copy(&self.shoal, &p).map_err(|source| LabError::Io {
                path: p.clone(),
                source,
            })?;
        }
        Ok(p)
    }

    fn start(
        &mut self,
        i: usize,
        extra: &[&str],
        user: Option<(u32, u32)>,
    ) -> Result<(), LabError> {
        let h = self.hosts[i].clone();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)
            .map_err(|source| LabError::Io {
                path: h.log.clone(),
                source,
            })?;
        let config = self.config_path(i);
        fs::write(&config, &self.configs[i]).map_err(|source| LabError::Io {
            path: config.clone(),
            source,
        })?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LabError::Io { path, source }
        };
        let mut key = self.dir.join("cluster.key");
        let mut c = match user {
            None => self.cmd(i, &self.shoal),
            Some((uid, gid)) => {
                let own =
                    |p: &Path| std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(io(p));
                fs::create_dir_all(&h.data_dir).map_err(io(&h.data_dir))?;
                own(&h.data_dir)?;
                let k = self.dir.join(format!("h{i}.key"));
                fs::copy(&key, &k).map_err(io(&k))?;
                own(&k)?;
                key = k;
                let mut c = self.cmd(i, "setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(self.user_shoal()?);
                c
            }
        };
        c.arg("agent")
            .args([
                "--name",
                &format!("h{i}"),
                "--bind",
                &h.addr(),
                "--cluster",
                "lab",
            ])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&h.data_dir)
            .arg("--key")
            .arg(&key)
            .args(extra)
            .env(
                "SHOAL_LOG",
                std::env::var("SHOAL_LAB_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = c.spawn().map_err(|source| LabError::Spawn {
            cmd: format!("{c:?}"),
            source,
        })?;
        if let Some(mut old) = self.agents[i].replace(child) {
            let _ = old.kill();
            let _ = old.wait();
        }
        Ok(())
    }

    /// Sends `signal` (e.g. `SIGKILL`, `SIGTERM`) to host `i`'s agent and,
    /// for SIGKILL, reaps it.
    pub fn signal(&mut self, i: usize, signal: nix::sys::signal::Signal) {
        if let Some(child) = &mut self.agents[i] {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
            if signal == nix::sys::signal::Signal::SIGKILL {
                let _ = child.wait();
                self.agents[i] = None;
            }
        }
    }

    /// Waits up to `timeout` for host `i`'s agent to exit; its status.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(child) = &mut self.agents[i] {
                if let Ok(Some(st)) = child.try_wait() {
                    self.agents[i] = None;
                    return Some(st);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Runs `shoal ARGS` on host `i` (client commands reach the agent by
    /// its data dir).
    ///
    /// # Errors
    /// The command could not be started (a non-zero exit is returned, not
    /// an error).
    pub fn shoal(&self, i: usize, args: &[&str]) -> Result<Output, LabError> {
        let mut c = self.cmd(i, &self.shoal);
        c.args(args).arg("--data-dir").arg(&self.hosts[i].data_dir);
        c.output().map_err(|source| LabError::Spawn {
            cmd: format!("{c:?}"),
            source,
        })
    }

    /// `shoal nodes --json` as host `i` sees the cluster, if it answers.
    pub fn nodes_json(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.shoal(i, &["nodes", "--json"]).ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until host `i` sees `n` nodes, every one alive with its facts
    /// and start-up checks passed (placement needs them); `None` on timeout.
    pub fn wait_ready(&self, i: usize, n: usize, timeout: Duration) -> Option<()> {
        wait_for(timeout, || {
            let v = self.nodes_json(i)?;
            let ns = v["nodes"].as_array()?;
            (ns.len() == n
                && ns
                    .iter()
                    .all(|x| x["checks"] == "ok" && x["state"] == "alive"))
            .then_some(())
        })
    }

    fn iptables(&self, i: usize, args: &[&str]) -> Result<(), LabError> {
        run(self.cmd(i, "iptables").arg("-w").args(args)).map(|_| ())
    }

    /// Drops all traffic between hosts `a` and `b`, both ways.
    ///
    /// # Errors
    /// iptables failed.
    pub fn cut(&self, a: usize, b: usize) -> Result<(), LabError> {
        for (x, y) in [(a, b), (b, a)] {
            let peer = self.hosts[y].ip.to_string();
            self.iptables(x, &["-I", "INPUT", "-s", &peer, "-j", "DROP"])?;
            self.iptables(x, &["-I", "OUTPUT", "-d", &peer, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Cuts every link between `side` and the other hosts.
    ///
    /// # Errors
    /// iptables failed.
    pub fn partition(&self, side: &[usize]) -> Result<(), LabError> {
        for &a in side {
            for b in 0..self.hosts.len() {
                if !side.contains(&b) {
                    self.cut(a, b)?;
                }
            }
        }
        Ok(())
    }

    /// Drops each packet arriving at every host with probability `p`
    /// (iptables' statistic match).
    ///
    /// # Errors
    /// iptables failed.
    pub fn loss(&self, p: f64) -> Result<(), LabError> {
        for i in 0..self.hosts.len() {
            self.iptables(
                i,
                &[
                    "-A",
                    "INPUT",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &format!("{p}"),
                    "-j",
                    "DROP",
                ],
            )?;
        }
        Ok(())
    }

    /// Removes every cut and every loss rule.
    ///
    /// # Errors
    /// iptables failed.
    pub fn heal(&self) -> Result<(), LabError> {
        for i in 0..self.hosts.len() {
            self.iptables(i, &["-F", "INPUT"])?;
            self.iptables(i, &["-F", "OUTPUT"])?;
        }
        Ok(())
    }

    /// The text of host `i`'s agent log.
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(&self.hosts[i].log).unwrap_or_default()
    }
}

/// Removes the (empty) cgroups that agents named `h<i>` leave when they are
/// SIGKILLed: `shoal-h<i>` and its task groups, in every hierarchy.
fn remove_agent_cgroups(n: usize) {
    let Ok(roots) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut dirs: Vec<PathBuf> = roots.flatten().map(|e| e.path()).collect();
    dirs.push(PathBuf::from("/sys/fs/cgroup"));
    for root in dirs {
        for i in 0..n {
            let parent = root.join(format!("shoal-h{i}"));
            if let Ok(rd) = fs::read_dir(&parent) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = fs::remove_dir(e.path());
                    }
                }
                let _ = fs::remove_dir(&parent);
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SIGTERM first: an agent that leaves removes its own cgroups and
        // task directories. Whatever has not gone after 3 s is killed.
        for child in self.agents.iter().flatten() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(3);
        for child in self.agents.iter_mut().flatten() {
            while Instant::now() < end && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_agent_cgroups(self.hosts.len());
        // A killed agent's task scratch in memory (`scratch = "memory"`;
        // one that left unmounted it, and elsewhere this fails harmlessly).
        for h in &self.hosts {
            let _ = nix::mount::umount2(&h.data_dir.join("mem"), nix::mount::MntFlags::MNT_DETACH);
        }
        if std::thread::panicking() {
            for (i, h) in self.hosts.iter().enumerate() {
                let log = self.log(i);
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                eprintln!("--- last lines of {} (h{i}):", h.log.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for ns in namespaces_with_prefix(&format!("shoal-{}-", self.tag)) {
            let _ = ip(&["netns", "del", &ns]);
        }
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether benchmark `name` is to run now: only under `cargo bench` (which
/// passes `--bench`; `cargo test --all-targets` runs bench targets too, and
/// a measurement takes minutes), and only where the test hosts can be made
/// (else it says why it skipped).
pub fn bench_gate(name: &str) -> bool {
    if !std::env::args().any(|a| a == "--bench") {
        println!("{name}: run with `cargo bench -p shoal --bench {name}` (0 passed, 0 failed)");
        return false;
    }
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return false;
    }
    true
}

/// The number in environment variable `key`, else `default` (benchmark
/// sizes such as `SHOAL_BENCH_N`).
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (the upper one of an even count), for benchmarks.
///
/// # Panics
/// On an empty `v`.
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `d` in milliseconds, for benchmark tables.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Polls `f` every 100 ms until it returns `Some`, or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What tasks left in an agent's task directory (`DATA_DIR/tasks`): every
/// entry but the clean directories an executor keeps for its next tasks
/// (`scratch.N` holding only an empty `upper`, a `work` with at most an
/// empty `work`, and maybe an empty `mnt`: a warm slot's mount point).
pub fn task_leftovers(tasks: &std::path::Path) -> Vec<std::path::PathBuf> {
    let empty = |p: &std::path::Path| std::fs::read_dir(p).is_ok_and(|mut r| r.next().is_none());
    let names = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(p)
            .map(|r| {
                let mut v: Vec<String> = r
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default()
    };
    std::fs::read_dir(tasks)
        .map(|r| r.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|d| {
            let kept = d
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("scratch."))
                && (names(d) == ["upper", "work"] || names(d) == ["mnt", "upper", "work"])
                && (!d.join("mnt").exists() || empty(&d.join("mnt")))
                && empty(&d.join("upper"))
                && (empty(&d.join("work"))
                    || (names(&d.join("work")) == ["work"] && empty(&d.join("work/work"))));
            !kept
        })
        .collect()
}
