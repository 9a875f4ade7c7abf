//! Sealing and opening datagrams.

use std::collections::HashMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand::TryRng;
use serde::Serialize;
use sha2::Sha256;

use crate::window::Window;
use crate::ClusterKey;

const MAGIC: &[u8; 4] = b"SHL1";
const HEADER: usize = 4 + 1 + 24;
const TAG: usize = 16;
/// Bytes a sealed datagram adds to its plaintext.
pub const OVERHEAD: usize = HEADER + TAG;
/// Largest clock difference accepted between sender and receiver, seconds.
pub const MAX_SKEW_S: u64 = 120;
/// Sender sessions remembered for replay protection.
const MAX_SESSIONS: usize = 4096;

/// What a datagram carries; authenticated with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A membership packet.
    Swim = 1,
    /// A discovery beacon.
    Beacon = 2,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Swim),
            2 => Some(Self::Beacon),
            _ => None,
        }
    }
}

/// Why a datagram was refused. Refusals never change the channel's state
/// except the counters (and never the replay window).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// Too short, wrong magic or unknown kind: not a shoal datagram.
    #[error("malformed datagram ({0})")]
    Malformed(&'static str),
    /// Authentication failed: another key, another cluster name, or
    /// tampered bytes.
    #[error("authentication failed (wrong cluster key or name, or tampered)")]
    Auth,
    /// A (session, counter) already seen.
    #[error("replayed datagram")]
    Replay,
    /// Sent too long ago (or the clocks disagree by more than MAX_SKEW_S).
    #[error("stale datagram ({0} s off)")]
    Stale(u64),
}

/// Counts of refused datagrams, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// Not a shoal datagram.
    pub malformed: u64,
    /// Failed authentication.
    pub auth: u64,
    /// Replays.
    pub replay: u64,
    /// Outside the clock window.
    pub stale: u64,
}

impl Rejected {
    /// All refusals.
    pub fn total(&self) -> u64 {
        self.malformed + self.auth + self.replay + self.stale
    }
}

/// One agent's end of the cluster's sealed channel: seals what it sends,
/// opens (and de-duplicates) what it receives.
pub struct Channel {
    cipher: XChaCha20Poly1305,
    session: [u8; 8],
    counter: u64,
    windows: HashMap<[u8; 8], Window>,
    rejected: Rejected,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("sessions", &self.windows.len())
            .field("rejected", &self.rejected)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// A channel for cluster `name` under `key`, with a random session id.
    pub fn new(key: &ClusterKey, cluster: &str) -> Self {
        let mut session = [0u8; 8];
        if rand::rngs::SysRng.try_fill_bytes(&mut session).is_err() {
            // Without OS randomness, fall back to something that still
            // differs between runs; the counter keeps nonces unique within
            // this life.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            session = (t ^ u64::from(std::process::id())).to_be_bytes();
        }
        Self::with_session(key, cluster, session)
    }

    /// A channel with a chosen session id (tests, simulations).
    pub fn with_session(key: &ClusterKey, cluster: &str, session: [u8; 8]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(b"shoal/v1"), &key.0);
        let mut okm = [0u8; 32];
        let info = format!("datagram:{cluster}");
        // 32 bytes is far below HKDF-SHA256's limit of 255 × 32.
        let _ = hk.expand(info.as_bytes(), &mut okm);
        Self {
            cipher: XChaCha20Poly1305::new(&okm.into()),
            session,
            counter: 0,
            windows: HashMap::new(),
            rejected: Rejected::default(),
        }
    }

    /// Refusal counters so far.
    pub fn rejected(&self) -> Rejected {
        self.rejected
    }

    /// Seals `plaintext` as a datagram of `kind`, stamped with `now_s`
    /// (Unix seconds).
    pub fn seal(&mut self, kind: Kind, plaintext: &[u8], now_s: u64) -> Vec<u8> {
        self.counter += 1;
        let mut nonce = [0u8; 24];
        nonce[..8].copy_from_slice(&self.session);
        nonce[8..16].copy_from_slice(&self.counter.to_be_bytes());
        nonce[16..].copy_from_slice(&now_s.to_be_bytes());
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        out.extend_from_slice(MAGIC);
        out.push(kind as u8);
        out.extend_from_slice(&nonce);
        let aad = [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], kind as u8];
        match self.cipher.encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        ) {
            Ok(ct) => out.extend_from_slice(&ct),
            // XChaCha20-Poly1305 fails only on plaintexts over 256 GiB.
            Err(_) => out.truncate(0),
        }
        out
    }

    /// Opens a datagram received at `now_s` (Unix seconds).
    ///
    /// # Errors
    /// The datagram is refused and counted; see [`OpenError`].
    pub fn open(&mut self, datagram: &[u8], now_s: u64) -> Result<(Kind, Vec<u8>), OpenError> {
        let r = self.open_inner(datagram, now_s);
        if let Err(e) = &r {
            match e {
                OpenError::Malformed(_) => self.rejected.malformed += 1,
                OpenError::Auth => self.rejected.auth += 1,
                OpenError::Replay => self.rejected.replay += 1,
                OpenError::Stale(_) => self.rejected.stale += 1,
            }
        }
        r
    }

    fn open_inner(&mut self, d: &[u8], now_s: u64) -> Result<(Kind, Vec<u8>), OpenError> {
        if d.len() < OVERHEAD {
            return Err(OpenError::Malformed("too short"));
        }
        if &d[..4] != MAGIC {
            return Err(OpenError::Malformed("bad magic"));
        }
        let kind = Kind::from_u8(d[4]).ok_or(OpenError::Malformed("unknown kind"))?;
        let nonce = &d[5..HEADER];
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: &d[HEADER..],
                    aad: &d[..5],
                },
            )
            .map_err(|_| OpenError::Auth)?;
        let mut session = [0u8; 8];
        session.copy_from_slice(&nonce[..8]);
        let counter = u64::from_be_bytes(nonce[8..16].try_into().map_err(|_| OpenError::Auth)?);
        let sent = u64::from_be_bytes(nonce[16..24].try_into().map_err(|_| OpenError::Auth)?);
        let off = sent.abs_diff(now_s);
        if off > MAX_SKEW_S {
            return Err(OpenError::Stale(off));
        }
        if !self.windows.contains_key(&session) && self.windows.len() >= MAX_SESSIONS {
            // Forget the session heard from least recently.
            if let Some(oldest) = self
                .windows
                .iter()
                .min_by_key(|(_, w)| w.last_seen)
                .map(|(s, _)| *s)
            {
                self.windows.remove(&oldest);
            }
        }
        let w = self.windows.entry(session).or_insert_with(Window::new);
        if !w.accept(counter) {
            return Err(OpenError::Replay);
        }
        w.last_seen = now_s;
        Ok((kind, plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes([b; 32])
    }

    #[test]
    fn roundtrip_and_kind_is_authenticated() {
        let mut a = Channel::with_session(&key(1), "lab", [1; 8]);
        let mut b = Channel::with_session(&key(1), "lab", [2; 8]);
        let d = a.seal(Kind::Swim, b"hello", 1000);
        assert_eq!(d.len(), 5 + OVERHEAD);
        assert_eq!(b.open(&d, 1000).unwrap(), (Kind::Swim, b"hello".to_vec()));
        let mut relabelled = a.seal(Kind::Swim, b"x", 1000);
        relabelled[4] = Kind::Beacon as u8;
        assert_eq!(b.open(&relabelled, 1000), Err(OpenError::Auth));
    }

    #[test]
    fn wrong_key_or_cluster_name_is_refused() {
        let mut a = Channel::with_session(&key(1), "lab", [1; 8]);
        let mut other_key = Channel::with_session(&key(2), "lab", [2; 8]);
        let mut other_name = Channel::with_session(&key(1), "office", [3; 8]);
        let d = a.seal(Kind::Swim, b"hello", 1000);
        assert_eq!(other_key.open(&d, 1000), Err(OpenError::Auth));
        assert_eq!(other_name.open(&d, 1000), Err(OpenError::Auth));
        assert_eq!(other_key.rejected().auth, 1);
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let mut a = Channel::with_session(&key(1), "lab", [1; 8]);
        let d = a.seal(Kind::Swim, b"payload!", 1000);
        for i in 0..d.len() {
            for bit in 0..8 {
                let mut b = Channel::with_session(&key(1), "lab", [2; 8]);
                let mut t = d.clone();
                t[i] ^= 1 << bit;
                assert!(
                    b.open(&t, 1000).is_err(),
                    "flip of byte {i} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn replay_and_stale_are_refused() {
        let mut a = Channel::with_session(&key(1), "lab", [1; 8]);
        let mut b = Channel::with_session(&key(1), "lab", [2; 8]);
        let d1 = a.seal(Kind::Swim, b"1", 1000);
        let d2 = a.seal(Kind::Swim, b"2", 1000);
        assert!(b.open(&d2, 1000).is_ok());
        assert!(b.open(&d1, 1000).is_ok(), "reordering is fine");
        assert_eq!(b.open(&d1, 1000), Err(OpenError::Replay));
        let old = a.seal(Kind::Swim, b"3", 1000);
        assert_eq!(
            b.open(&old, 1000 + MAX_SKEW_S + 1),
            Err(OpenError::Stale(MAX_SKEW_S + 1))
        );
        assert_eq!(
            b.rejected(),
            Rejected {
                replay: 1,
                stale: 1,
                ..Rejected::default()
            }
        );
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        let mut b = Channel::with_session(&key(1), "lab", [2; 8]);
        for len in 0..100 {
            let g: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            assert!(b.open(&g, 0).is_err());
        }
        let mut fake = b"SHL1".to_vec();
        fake.push(9);
        fake.extend([0; 60]);
        assert_eq!(b.open(&fake, 0), Err(OpenError::Malformed("unknown kind")));
    }
}
