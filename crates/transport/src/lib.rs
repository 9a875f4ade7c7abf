//! Sealed datagrams: every byte shoal sends between agents goes through
//! here.
//!
//! ```text
//!  0      4     5                 29                        n
//!  ┌──────┬─────┬─────────────────┬─────────────────────────┐
//!  │ SHL1 │kind │ nonce (24 B)    │ ciphertext ‖ tag (16 B) │
//!  └──────┴─────┴─────────────────┴─────────────────────────┘
//!  nonce = sender session (8) ‖ counter (8, BE) ‖ unix seconds (8, BE)
//! ```
//!
//! The cipher is XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`) under a
//! key derived with HKDF-SHA256 from the cluster key file and the cluster
//! name, so two clusters that share a key file but not a name cannot read
//! each other. The header (magic and kind) is authenticated as associated
//! data and the nonce by the AEAD itself. After authentication the receiver
//! refuses a datagram whose (session, counter) it has seen (a 1024-packet
//! sliding window per sender session, as IPsec and WireGuard do) or whose
//! timestamp is more than [`MAX_SKEW_S`] away from its own clock, which bounds
//! replays of sessions it has forgotten. Time is passed in: nothing here
//! reads a clock.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod key;
mod seal;
pub mod stream;
mod window;

pub use key::{ClusterKey, KeyError};
pub use seal::{Channel, Kind, OpenError, Rejected, MAX_SKEW_S, OVERHEAD};
