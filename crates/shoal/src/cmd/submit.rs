//! `shoal submit`: queue a batch job; prints its id at once.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use shoal_control::{Request, Response};

use crate::AgentAddr;

/// Flags of `shoal submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    agent: AgentAddr,
    /// Tasks in the job; each sees `$SHOAL_TASK_INDEX` from 0 to N−1.
    #[arg(long, value_name = "N")]
    count: Option<u32>,
    /// The job's name (default: the command's).
    #[arg(long)]
    name: Option<String>,
    /// CPUs per task.
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory per task (e.g. 512M).
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// Processes per task.
    #[arg(long)]
    pids: Option<u32>,
    /// Re-runs of a task that fails by itself (default 2).
    #[arg(long)]
    retries: Option<u32>,
    /// A rootfs directory or tarball to run in.
    #[arg(long, value_name = "PATH")]
    image: Option<String>,
    /// Files or directories shipped to every task (default: the whole
    /// directory); repeatable.
    #[arg(long = "input", value_name = "PATH")]
    inputs: Vec<String>,
    /// Where each task's outputs land: DIR/INDEX/ (default
    /// shoal-out/NAME).
    #[arg(long, value_name = "DIR")]
    output: Option<String>,
    /// A job (by name) that must succeed first; repeatable.
    #[arg(long, value_name = "NAME")]
    after: Vec<String>,
    /// `job.toml`, or `-- CMD ARGS…`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// The job(s) described by the flags, or read from a job file.
fn jobs(a: &SubmitArgs) -> anyhow::Result<Vec<shoal_jobs::JobSpec>> {
    let flags_used = a.count.is_some()
        || a.name.is_some()
        || a.cpus.is_some()
        || a.mem.is_some()
        || a.pids.is_some()
        || a.retries.is_some()
        || a.image.is_some()
        || !a.inputs.is_empty()
        || a.output.is_some()
        || !a.after.is_empty();
    if let [one] = a.command.as_slice() {
        let p = Path::new(one);
        if p.extension().is_some_and(|e| e == "toml") && p.is_file() {
            if flags_used {
                bail!("give a job file or flags, not both");
            }
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let stem = p
                .file_stem()
                .map_or_else(|| "job".into(), |s| s.to_string_lossy().into_owned());
            return shoal_jobs::spec::parse(&text, &stem)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
        }
    }
    let argv: Vec<String> = a
        .command
        .iter()
        .map(|s| {
            s.to_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("{s:?}: a command must be UTF-8"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut t = toml::Table::new();
    t.insert("command".into(), argv.clone().into());
    let name = a.name.clone().unwrap_or_else(|| {
        Path::new(&argv[0])
            .file_name()
            .map_or_else(|| "job".into(), |n| n.to_string_lossy().into_owned())
    });
    t.insert("name".into(), name.into());
    if let Some(v) = a.count {
        t.insert("count".into(), i64::from(v).into());
    }
    if let Some(v) = a.cpus {
        t.insert("cpus".into(), v.into());
    }
    if let Some(v) = &a.mem {
        t.insert("mem".into(), v.clone().into());
    }
    if let Some(v) = a.pids {
        t.insert("pids".into(), i64::from(v).into());
    }
    if let Some(v) = a.retries {
        t.insert("retries".into(), i64::from(v).into());
    }
    if let Some(v) = &a.image {
        t.insert("image".into(), v.clone().into());
    }
    if !a.inputs.is_empty() {
        t.insert("inputs".into(), a.inputs.clone().into());
    }
    if let Some(v) = &a.output {
        t.insert("output".into(), v.clone().into());
    }
    if !a.after.is_empty() {
        t.insert("after".into(), a.after.clone().into());
    }
    let text = toml::to_string(&t)?;
    shoal_jobs::spec::parse(&text, "job").map_err(|e| match e {
        shoal_jobs::SpecError::Invalid { key, message, .. } => {
            anyhow::anyhow!("--{key}: {message}")
        }
        other => anyhow::anyhow!("{other}"),
    })
}

/// Queues the job(s) and prints their ids, one per line. A job that
/// cannot be run (bad file, bad value) exits 2 and queues nothing.
pub fn run(a: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let jobs = match jobs(a) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let dir = std::env::current_dir().context("the current directory")?;
    // The agent reads the image when the job starts; a path that names
    // nothing is refused now.
    for j in &jobs {
        if let Some(i) = &j.image {
            if let Err(e) = std::fs::metadata(dir.join(i)) {
                eprintln!("shoal: job {}: image {i}: {e}", j.name);
                return Ok(ExitCode::from(2));
            }
        }
    }
    let req = Request::Submit {
        jobs,
        dir,
        env: crate::cmd::run::forwarded_env(),
    };
    match shoal_control::call(&a.agent.socket(), &req, Duration::from_secs(60))? {
        Response::Submitted { ids } => {
            for id in ids {
                println!("{id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { message } => {
            eprintln!("shoal: {message}");
            Ok(ExitCode::from(2))
        }
        other => bail!("unexpected answer: {other:?}"),
    }
}
