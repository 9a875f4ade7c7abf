//! `shoal agent`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use shoal_agent::config::{self, Flags};

/// Flags of `shoal agent`; each overrides its key in the config file.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file (TOML); the default may be absent.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Address and port of the SWIM (UDP) and bandwidth (TCP) sockets.
    #[arg(long, value_name = "ADDR:PORT")]
    bind: Option<SocketAddr>,
    /// A member to join (repeatable); works across routed networks.
    #[arg(long, value_name = "ADDR:PORT")]
    join: Vec<SocketAddr>,
    /// Data dir: control socket and state.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Cluster name; clusters with different names never merge.
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// Cluster key file (from `shoal keygen`).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Members expected: `forming (k/N)` until N are alive.
    #[arg(long, value_name = "N")]
    expect: Option<u32>,
    /// No multicast discovery (use --join only).
    #[arg(long)]
    no_discovery: bool,
    /// Guest slots this machine lends (default: one per core; 0 lends none).
    #[arg(long, value_name = "N")]
    slots: Option<u32>,
}

/// Runs the agent until SIGTERM, SIGINT or `shoal leave`.
pub fn run(a: AgentArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let file = config::load_file(a.config.as_deref())?;
    let cfg = config::resolve(
        file,
        Flags {
            name: a.name,
            bind: a.bind,
            join: a.join,
            data_dir: a.data_dir,
            cluster: a.cluster,
            key: a.key,
            expect: a.expect,
            no_discovery: a.no_discovery,
            slots: a.slots,
            config_path: a.config,
        },
    )?;
    // One thread for the event loop and every task's I/O (the lowest
    // latency per message); what blocks (forks, mounts, cleanup, the
    // journal's large writes) goes to the blocking pool.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM: leaving"),
                        _ = int.recv() => tracing::info!("SIGINT: leaving"),
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        shoal_agent::run(cfg, shutdown).await
    })?;
    Ok(())
}
