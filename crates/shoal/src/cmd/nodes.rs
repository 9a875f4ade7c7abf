//! `shoal nodes`.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use shoal_control::{NodeInfo, NodesReport, Request, Response};

use crate::AgentAddr;

/// Flags of `shoal nodes`.
#[derive(Debug, Args)]
pub struct NodesArgs {
    #[command(flatten)]
    agent: AgentAddr,
    /// Print JSON (shape documented in README).
    #[arg(long)]
    json: bool,
    /// Also measure bandwidth from this node to every alive peer.
    #[arg(long)]
    bandwidth: bool,
}

/// Prints the cluster as the local agent sees it.
pub fn run(a: &NodesArgs) -> anyhow::Result<()> {
    if a.bandwidth && !a.json {
        eprintln!("measuring bandwidth to every alive peer…");
    }
    let req = Request::Nodes {
        bandwidth: a.bandwidth,
    };
    let timeout = if a.bandwidth {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(10)
    };
    let rep = match shoal_control::call(&a.agent.socket(), &req, timeout)? {
        Response::Nodes(r) => r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print!("{}", table(&rep, a.bandwidth));
    }
    Ok(())
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| x.to_string())
}

fn gib(b: Option<u64>) -> String {
    b.map_or_else(
        || "-".to_owned(),
        |b| format!("{:.1}G", b as f64 / f64::from(1u32 << 30)),
    )
}

fn idle(s: Option<u64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 7200 => format!("{}m", s / 60),
        Some(s) if s < 172_800 => format!("{}h", s / 3600),
        Some(s) => format!("{}d", s / 86400),
    }
}

fn row(n: &NodeInfo, bw: bool) -> Vec<String> {
    let mut r = vec![
        if n.is_self {
            format!("{} *", n.name)
        } else {
            n.name.clone()
        },
        n.addr.clone(),
        n.state.clone(),
        opt(n.cores),
        format!("{}/{}", gib(n.mem_avail_bytes), gib(n.mem_total_bytes)),
        opt(n.cpu_score),
        n.load1.map_or_else(|| "-".into(), |l| format!("{l:.2}")),
        idle(n.owner_idle_s),
        n.rtt_ms.map_or_else(|| "-".into(), |r| format!("{r:.2}ms")),
        n.checks.clone().unwrap_or_else(|| "-".into()),
        n.role.clone(),
        opt(n.slots_free),
        n.guests.clone().unwrap_or_else(|| "-".into()),
    ];
    if bw {
        r.push(
            n.bandwidth_mbps
                .map_or_else(|| "-".into(), |b| format!("{b:.0}MB/s")),
        );
    }
    r
}

/// The human table.
fn table(rep: &NodesReport, bw: bool) -> String {
    let mut head: Vec<String> = [
        "NAME",
        "ADDR",
        "STATE",
        "CORES",
        "MEM AVAIL/TOTAL",
        "CPU",
        "LOAD",
        "IDLE",
        "RTT",
        "CHECKS",
        "ROLE",
        "SLOTS",
        "GUESTS",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if bw {
        head.push("BANDWIDTH".into());
    }
    let rows: Vec<Vec<String>> = std::iter::once(head)
        .chain(rep.nodes.iter().map(|n| row(n, bw)))
        .collect();
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let x = &rep.rejected;
    out.push_str(&format!(
        "cluster {}: {}, {} alive{}; rejected datagrams: {} (auth {}, replay {}, malformed {}, stale {}, protocol {})\n",
        rep.cluster.name,
        rep.cluster.state,
        rep.cluster.alive,
        if rep.cluster.expect > 0 { format!(" (expect {})", rep.cluster.expect) } else { String::new() },
        x.total, x.auth, x.replay, x.malformed, x.stale, x.protocol
    ));
    for n in rep.nodes.iter().filter(|n| !n.checks_failed.is_empty()) {
        for f in &n.checks_failed {
            out.push_str(&format!("{}: check failed: {f}\n", n.name));
        }
    }
    out
}
