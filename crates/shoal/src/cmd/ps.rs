//! `shoal ps`: the tasks running on this node.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use shoal_control::{PsReport, Request, Response};

use crate::AgentAddr;

/// Flags of `shoal ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    #[command(flatten)]
    agent: AgentAddr,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Lists the tasks running on this node, guests and local alike.
pub fn run(a: &PsArgs) -> anyhow::Result<()> {
    let rep = match shoal_control::call(&a.agent.socket(), &Request::Ps, Duration::from_secs(10))? {
        Response::Ps(r) => r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print!("{}", table(&rep));
    }
    Ok(())
}

fn table(r: &PsReport) -> String {
    let rows: Vec<Vec<String>> = r
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.origin.clone(),
                t.state.clone(),
                format!("{:.0}s", t.age_s),
                t.cpu_s.map_or_else(|| "-".into(), |c| format!("{c:.2}s")),
                t.command.clone(),
            ]
        })
        .collect();
    let mut out = crate::cmd::table(&["TASK", "ORIGIN", "STATE", "AGE", "CPU", "COMMAND"], &rows);
    out += &format!("{}: {} task(s)\n", r.node, r.tasks.len());
    out
}
