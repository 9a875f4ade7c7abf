//! The shoal agent: a thin tokio shell around the pure cores.
//!
//! ```text
//!            ┌───────────────── shoal agent ──────────────────┐
//!  UDP 7946 ─┤ open (transport) ─▶ Engine (membership) ─▶ seal ├─ UDP 7946
//!  UDP 7947 ─┤ beacons ──────────▶ discovered()                │
//!  timers  ──┤ tokio sleeps ─────▶ handle_timer()              │
//!  /proc   ──┤ facts every 2 s ──▶ set_facts()                 │
//!  unix sock─┤ nodes / leave ────▶ members(), leave()          │
//!  TCP 7946 ─┤ bandwidth probes (Noise stream)                 │
//!            └─────────────────────────────────────────────────┘
//! ```
//!
//! Every decision (who is alive, what to send, when) is the membership
//! engine's; this crate only moves bytes, arms timers and reads the
//! machine.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bandwidth;
pub mod batch;
pub mod checks;
pub mod config;
pub mod discovery;
pub mod exec;
pub mod owner;
pub mod peer;
pub mod place;
pub mod report;
mod runtime;
pub mod scratch;

pub use config::{AgentConfig, ConfigError, Flags};
pub use runtime::{run, AgentError};

/// A fresh directory for a unit test, named after it (emptied if an
/// earlier run left it).
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-agent-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    d
}
