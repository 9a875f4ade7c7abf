//! `shoal status JOB`: each task's state, and why the waiting ones wait.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use shoal_control::{Request, Response, StatusReport};

use crate::AgentAddr;

/// Flags of `shoal status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The job id (from `shoal submit` or `shoal jobs`).
    job: u64,
    #[command(flatten)]
    agent: AgentAddr,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Asks the local agent for one job's status.
pub fn fetch(agent: &AgentAddr, job: u64) -> anyhow::Result<StatusReport> {
    match shoal_control::call(
        &agent.socket(),
        &Request::Status { job },
        Duration::from_secs(30),
    )? {
        Response::Status(r) => Ok(r),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// Prints one job's tasks.
pub fn run(a: &StatusArgs) -> anyhow::Result<()> {
    let r = fetch(&a.agent, a.job)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let j = &r.job;
    println!(
        "job {} ({}): {}; {}/{} done, {} running, {} queued, {} failed; outputs in {}",
        j.id,
        j.name,
        j.state,
        j.done,
        j.tasks,
        j.running,
        j.queued,
        j.failed,
        j.output.display()
    );
    let rows: Vec<Vec<String>> = r
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.index.to_string(),
                t.state.clone(),
                t.node.clone().unwrap_or_else(|| "-".into()),
                t.attempts.to_string(),
                t.status.map_or_else(|| "-".into(), |s| s.to_string()),
                t.why.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        crate::cmd::table(
            &["INDEX", "STATE", "NODE", "ATTEMPTS", "STATUS", "WHY"],
            &rows
        )
    );
    Ok(())
}
