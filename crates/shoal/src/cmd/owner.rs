//! `shoal owner`: the owner's side of this machine.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, ValueEnum};
use shoal_control::{OwnerReport, Request, Response};

use crate::AgentAddr;

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Action {
    /// Act as if the owner were at the machine: freeze guests, start none.
    Busy,
    /// Act as if the owner were away: guests start and run unthrottled.
    Idle,
    /// Follow the policy again (the default).
    Auto,
    /// Re-read the policy from the config file (as SIGHUP does).
    Reload,
}

/// Flags of `shoal owner`.
#[derive(Debug, Args)]
pub struct OwnerArgs {
    /// Force a state, go back to the policy, or reload it; without an
    /// action, show the owner's state, the figures and the policy.
    action: Option<Action>,
    #[command(flatten)]
    agent: AgentAddr,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Shows or sets the owner's state.
pub fn run(a: &OwnerArgs) -> anyhow::Result<()> {
    let req = match a.action {
        None => Request::Owner { force: None },
        Some(Action::Reload) => Request::Reload,
        Some(f) => Request::Owner {
            force: Some(
                match f {
                    Action::Busy => "busy",
                    Action::Idle => "idle",
                    _ => "auto",
                }
                .to_owned(),
            ),
        },
    };
    let rep = match shoal_control::call(&a.agent.socket(), &req, Duration::from_secs(10))? {
        Response::Owner(r) => r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print!("{}", text(&rep));
    }
    Ok(())
}

fn text(r: &OwnerReport) -> String {
    let v = r.verdict;
    let mut s = format!(
        "owner: {} (override: {}); guests: {}\n",
        r.state,
        r.force,
        if r.slots.is_empty() {
            "no slots".to_owned()
        } else {
            r.slots.join(" ")
        }
    );
    s += &format!(
        "verdict: start={} throttle={} suspend={} continue={}\n",
        v.start, v.throttle, v.suspend, v.cont
    );
    let figures: Vec<String> = r
        .vars
        .iter()
        .map(|(k, x)| {
            if k == "owner_cpu" || k == "load1" {
                format!("{k}={x:.2}")
            } else {
                format!("{k}={x:.0}")
            }
        })
        .collect();
    s += &format!("figures: {}\n", figures.join(" "));
    if !r.guest_class.is_empty() {
        s += &format!("guest class: {}\n", r.guest_class);
    }
    s += "policy:\n";
    for (k, e) in &r.policy {
        s += &format!("  {k} = {e}\n");
    }
    if let Some(e) = &r.reload_error {
        s += &format!("last reload refused (the policy above stays): {e}\n");
    }
    s
}
