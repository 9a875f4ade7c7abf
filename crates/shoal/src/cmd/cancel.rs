//! `shoal cancel JOB`.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use shoal_control::{Request, Response};

use crate::AgentAddr;

/// Flags of `shoal cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The job id.
    job: u64,
    #[command(flatten)]
    agent: AgentAddr,
}

/// Cancels a job: nothing more starts, and running attempts do not commit.
pub fn run(a: &CancelArgs) -> anyhow::Result<()> {
    match shoal_control::call(
        &a.agent.socket(),
        &Request::Cancel { job: a.job },
        Duration::from_secs(10),
    )? {
        Response::Ok => {
            eprintln!("job {} cancelled", a.job);
            Ok(())
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}
