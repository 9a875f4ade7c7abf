//! `shoal leave`.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use shoal_control::{Request, Response};

use crate::AgentAddr;

/// Flags of `shoal leave`.
#[derive(Debug, Args)]
pub struct LeaveArgs {
    #[command(flatten)]
    agent: AgentAddr,
}

/// Asks the local agent to leave the cluster and stop.
pub fn run(a: &LeaveArgs) -> anyhow::Result<()> {
    match shoal_control::call(&a.agent.socket(), &Request::Leave, Duration::from_secs(10))? {
        Response::Ok => {
            eprintln!("left the cluster");
            Ok(())
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}
