//! `shoal jobs`: every batch job submitted from this node.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use shoal_control::{JobsReport, Request, Response};

use crate::AgentAddr;

/// Flags of `shoal jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    agent: AgentAddr,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Asks the local agent for its jobs.
pub fn fetch(agent: &AgentAddr) -> anyhow::Result<JobsReport> {
    match shoal_control::call(&agent.socket(), &Request::Jobs, Duration::from_secs(10))? {
        Response::Jobs(r) => Ok(r),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// Lists the jobs.
pub fn run(a: &JobsArgs) -> anyhow::Result<()> {
    let r = fetch(&a.agent)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.name.clone(),
                j.state.clone(),
                format!("{}/{}", j.done, j.tasks),
                j.running.to_string(),
                j.queued.to_string(),
                j.failed.to_string(),
                j.output.display().to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        crate::cmd::table(
            &["ID", "NAME", "STATE", "DONE", "RUNNING", "QUEUED", "FAILED", "OUTPUT"],
            &rows
        )
    );
    Ok(())
}
