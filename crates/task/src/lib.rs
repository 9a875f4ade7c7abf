//! The task protocol of `shoal run`.
//!
//! ```text
//!  shoal run ──unix──▶ local agent ──Noise/TCP──▶ executor agent
//!     Start(spec + manifest) ─────────────────────▶
//!     ◀──────────────────────────────── Need(hashes)
//!     Blob… ──────────────────────────────────────▶   (only what its cache lacks)
//!     ◀──────────────────── Started, Stdout/Stderr…
//!     Stdin…, Signal ─────────────────────────────▶
//!     ◀────────────────────── Changes (on success), Exit
//! ```
//!
//! The same messages cross both links; the local agent relays them (or
//! executes them itself). [`link`] carries messages of any size over a
//! transport of bounded frames.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cas;
pub mod hashcache;
pub mod image;
pub mod link;
pub mod proto;
pub mod tree;
