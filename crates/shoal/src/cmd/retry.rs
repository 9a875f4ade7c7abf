//! `shoal retry JOB --failed`.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use shoal_control::{Request, Response};

use crate::AgentAddr;

/// Flags of `shoal retry`.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// The job id.
    job: u64,
    /// Queue the failed tasks again, with fresh retries (required: the
    /// only kind of retry there is).
    #[arg(long, required = true)]
    failed: bool,
    #[command(flatten)]
    agent: AgentAddr,
}

/// Queues a job's failed tasks again.
pub fn run(a: &RetryArgs) -> anyhow::Result<()> {
    match shoal_control::call(
        &a.agent.socket(),
        &Request::Retry { job: a.job },
        Duration::from_secs(10),
    )? {
        Response::Submitted { ids } => {
            eprintln!(
                "job {}: {} failed task(s) queued again",
                a.job,
                ids.first().copied().unwrap_or(0)
            );
            Ok(())
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}
