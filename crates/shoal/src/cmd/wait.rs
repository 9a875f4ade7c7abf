//! `shoal wait JOB`: a progress bar until the job ends.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use crate::AgentAddr;

/// Flags of `shoal wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The job id.
    job: u64,
    #[command(flatten)]
    agent: AgentAddr,
}

fn bar(done: u32, total: u32, width: usize) -> String {
    let filled = (done as usize * width)
        .checked_div(total as usize)
        .unwrap_or(width);
    format!(
        "[{}{}]",
        "#".repeat(filled),
        ".".repeat(width - filled.min(width))
    )
}

/// Waits for the job: exit 0 when every task is done, 1 when it ended
/// otherwise (failed tasks, cancelled).
pub fn run(a: &WaitArgs) -> anyhow::Result<ExitCode> {
    let tty = std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let mut first_done: Option<u32> = None;
    let mut last_line = String::new();
    let mut last_print = Instant::now() - Duration::from_secs(60);
    loop {
        let r = crate::cmd::jobs::fetch(&a.agent)?;
        let Some(j) = r.jobs.into_iter().find(|j| j.id == a.job) else {
            anyhow::bail!("no job {}", a.job);
        };
        let base = *first_done.get_or_insert(j.done);
        let secs = t0.elapsed().as_secs_f64().max(0.001);
        let rate = f64::from(j.done - base.min(j.done)) / secs;
        let left = j.tasks - j.done - j.failed - j.cancelled;
        let eta = if rate > 0.0 {
            format!("{:.0}s", f64::from(left) / rate)
        } else {
            "-".into()
        };
        let line = format!(
            "job {} {}: {}/{} done, {} running, {} queued, {} failed, {rate:.1}/s, ETA {eta}",
            j.id, j.name, j.done, j.tasks, j.running, j.queued, j.failed
        );
        let ended = matches!(j.state.as_str(), "done" | "failed" | "cancelled");
        let mut err = std::io::stderr();
        if tty {
            let _ = write!(err, "\r\x1b[2K{} {line}", bar(j.done, j.tasks, 30));
            let _ = err.flush();
        } else if line != last_line && (last_print.elapsed() >= Duration::from_secs(1) || ended) {
            let _ = writeln!(err, "{line}");
            last_print = Instant::now();
        }
        last_line = line;
        if ended {
            if tty {
                let _ = writeln!(err);
            }
            eprintln!("job {} {}", j.id, j.state);
            return Ok(if j.state == "done" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
