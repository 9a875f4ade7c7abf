//! Helpers shared by the multi-host test files.

#![allow(dead_code)] // each test file uses its own subset

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use shoal_netns::{unavailable, wait_for, Lab};

pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn shoal_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shoal"))
}

/// A lab of `n` hosts, or `None` (with the reason printed) where netns
/// tests cannot run.
pub fn lab(tag: &str, subnet: u8, n: usize) -> Option<Lab> {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(Lab::new(tag, subnet, n, shoal_bin()).expect("building the lab"))
}

/// `shoal ARGS…` from `dir` through host 0's agent: `--data-dir` right
/// after the subcommand, since `submit` and `run` take everything after
/// their command as the command's.
pub fn shoal(lab: &Lab, dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(shoal_bin())
        .arg(args[0])
        .arg("--data-dir")
        .arg(&lab.hosts[0].data_dir)
        .args(&args[1..])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running shoal")
}

pub fn nodes(lab: &Lab, i: usize) -> Option<Value> {
    lab.nodes_json(i)
}

/// name → state as host `i` sees it.
pub fn states(lab: &Lab, i: usize) -> BTreeMap<String, String> {
    nodes(lab, i)
        .map(|v| {
            v["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or("").to_owned(),
                        n["state"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn alive_names(lab: &Lab, i: usize) -> Vec<String> {
    states(lab, i)
        .into_iter()
        .filter(|(_, s)| s == "alive" || s == "suspect")
        .map(|(n, _)| n)
        .collect()
}

pub fn names(hosts: &[usize]) -> Vec<String> {
    let mut v: Vec<String> = hosts.iter().map(|i| format!("h{i}")).collect();
    v.sort();
    v
}

/// Waits until every host in `viewers` sees exactly `expected` alive.
pub fn wait_alive(lab: &Lab, viewers: &[usize], expected: &[usize], timeout: Duration) {
    let want = names(expected);
    let ok = wait_for(timeout, || {
        viewers
            .iter()
            .all(|&i| alive_names(lab, i) == want)
            .then_some(())
    });
    if ok.is_none() {
        for &i in viewers {
            eprintln!("h{i} sees {:?}", states(lab, i));
        }
        panic!("hosts {viewers:?} did not all see {want:?} alive within {timeout:?}");
    }
}

pub fn start_all(lab: &mut Lab, hosts: &[usize], extra: &[&str]) {
    for &i in hosts {
        lab.start_agent(i, extra).expect("starting an agent");
    }
}

/// A small tmpfs mounted over a directory (made if absent) for the test's
/// life: a disk that fills up.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `4m`) at `dir`.
    pub fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("making the mount point");
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mounting a tmpfs");
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}
