//! `shoal logs JOB[.INDEX] [--follow]`: a task's stdout, exactly as it
//! printed it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::AgentAddr;

/// Flags of `shoal logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// `JOB` (every task, in index order) or `JOB.INDEX`.
    which: String,
    /// Keep printing as the task prints, until it ends.
    #[arg(long, short)]
    follow: bool,
    /// Print stderr instead of stdout.
    #[arg(long)]
    stderr: bool,
    #[command(flatten)]
    agent: AgentAddr,
}

/// The file of the task's current attempt (`.shoal-INDEX-FENCE`, newest
/// fence) or of its landed outputs.
fn current(out: &Path, index: u32, name: &str) -> Option<PathBuf> {
    let fin = out.join(index.to_string()).join(name);
    if fin.exists() {
        return Some(fin);
    }
    let prefix = format!(".shoal-{index}-");
    std::fs::read_dir(out)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(&prefix)?
                .parse::<u64>()
                .ok()
                .map(|f| (f, e.path()))
        })
        .max_by_key(|(f, _)| *f)
        .map(|(_, p)| p.join(name))
}

/// Prints the logs. A reader that stops early (`| head`) is not an error.
pub fn run(a: &LogsArgs) -> anyhow::Result<()> {
    match print(a) {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn print(a: &LogsArgs) -> anyhow::Result<()> {
    let (job, index) = match a.which.split_once('.') {
        Some((j, i)) => (
            j.parse::<u64>().context("JOB.INDEX")?,
            Some(i.parse::<u32>().context("JOB.INDEX")?),
        ),
        None => (a.which.parse::<u64>().context("JOB")?, None),
    };
    let jobs = crate::cmd::jobs::fetch(&a.agent)?;
    let Some(j) = jobs.jobs.into_iter().find(|j| j.id == job) else {
        bail!("no job {job}");
    };
    let name = if a.stderr { "stderr" } else { "stdout" };
    let indices: Vec<u32> = match index {
        Some(i) if i < j.tasks => vec![i],
        Some(i) => bail!("job {job} has tasks 0 to {}, not {i}", j.tasks - 1),
        None => (0..j.tasks).collect(),
    };
    let mut out = std::io::stdout().lock();
    for i in indices {
        let mut at = 0u64;
        loop {
            if let Some(p) = current(&j.output, i, name) {
                if let Ok(mut f) = std::fs::File::open(&p) {
                    // A retry writes from the start again: print only what
                    // is new beyond what was shown.
                    if f.seek(SeekFrom::Start(at)).is_ok() {
                        let mut buf = Vec::new();
                        let _ = f.read_to_end(&mut buf);
                        out.write_all(&buf)?;
                        at += buf.len() as u64;
                    }
                }
            }
            if !a.follow {
                break;
            }
            let st = crate::cmd::status::fetch(&a.agent, job)?;
            let t = st.tasks.iter().find(|t| t.index == i);
            let ended =
                t.is_none_or(|t| matches!(t.state.as_str(), "done" | "failed" | "cancelled"));
            if ended
                && current(&j.output, i, name)
                    .is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| m.len() <= at))
            {
                break;
            }
            if ended && current(&j.output, i, name).is_none() {
                break;
            }
            out.flush()?;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    out.flush()?;
    Ok(())
}
