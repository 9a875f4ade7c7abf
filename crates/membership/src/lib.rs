//! Sans-IO membership for shoal.
//!
//! ```text
//!   datagrams, timers, facts, leave           sends, timers to arm, events
//!  ───────────────────────────────▶ Engine ───────────────────────────────▶
//!            (now passed in)        │  foca (SWIM) + rumor store + RTT
//! ```
//!
//! The [`Engine`] wraps [`foca`]: it never reads a clock, never touches a
//! socket and never spawns anything. Every entry point takes `now` (a
//! monotonic [`Duration`](std::time::Duration) since an arbitrary epoch) and
//! appends [`Output`]s that the caller drains with [`Engine::drain`]. The
//! tokio shell in `shoal-agent` moves those bytes over UDP; the simulator in
//! [`sim`] moves them through an in-memory network with cuttable links.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod config;
mod engine;
mod id;
mod rtt;
mod rumor;
pub mod sim;
mod view;

pub use config::{lan_config, memberlist_lan_config};
pub use engine::{Engine, EngineError, Event, Output, Stats};
pub use foca::Timer;
pub use id::NodeId;
pub use rtt::Rtt;
pub use rumor::RumorError;
pub use view::{pecking_order, ClusterState, MemberState, MemberView};
