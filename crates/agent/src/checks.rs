//! Start-up self-verification: the seed's "verification of function".

use std::path::Path;

use shoal_facts::Checks;

/// Results of the start-up checks plus the CPU score.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The checks, for the facts.
    pub checks: Checks,
    /// CPU score from the benchmark (0 if it failed).
    pub cpu_score: u32,
}

/// Writes and removes a probe file in the data dir.
fn check_data_dir(dir: &Path) -> Result<(), String> {
    let p = dir.join(".shoal-write-check");
    std::fs::write(&p, b"ok").map_err(|e| format!("{}: {e}", p.display()))?;
    std::fs::remove_file(&p).map_err(|e| format!("{}: {e}", p.display()))
}

/// Runs every check (blocking: a few tens of milliseconds).
pub fn verify(data_dir: &Path, cgroup_root: &Path, cgroup_parent: &str) -> Verified {
    // The benchmark first, before the probes fork and write.
    let cpu_score = shoal_facts::bench::run(15);
    let mut checks = Checks::default();
    if let Err(e) = shoal_executor::probe_namespaces() {
        checks.failed.push(format!("namespaces: {e}"));
    }
    match shoal_executor::probe_cgroups(cgroup_root, cgroup_parent) {
        Ok(v) => checks.cgroup = v.as_str().to_owned(),
        Err(e) if !nix::unistd::geteuid().is_root() => checks.failed.push(format!(
            "cgroups: {e} (an agent that is not root needs a cgroup subtree its \
             user owns, named by `cgroup_parent`)"
        )),
        Err(e) => checks.failed.push(format!("cgroups: {e}")),
    }
    if let Err(e) = check_data_dir(data_dir) {
        checks.failed.push(format!("data-dir: {e}"));
    }
    if cpu_score == 0 {
        checks
            .failed
            .push("cpu-bench: the benchmark measured no time".to_owned());
    }
    for f in &checks.failed {
        tracing::warn!(check = %f, "start-up check failed: this node offers no guest slots");
    }
    Verified { checks, cpu_score }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritable_data_dir_and_missing_cgroups_are_reported() {
        let v = verify(
            Path::new("/nonexistent/shoal"),
            Path::new("/nonexistent/cgroup"),
            "shoal-test",
        );
        let names = v.checks.summary();
        assert!(names.contains("data-dir"), "{names}");
        assert!(names.contains("cgroups"), "{names}");
        assert!(v.cpu_score > 0);
    }
}
