//! Node facts: what a node tells the cluster about itself, and how it
//! reads them from the machine.
//!
//! The [`NodeFacts`] value is what gossip carries (postcard-encoded, well
//! under 512 bytes). The readers in [`probe`] are thin: each parses a
//! `/proc` file through a pure function that the unit tests feed with
//! fixtures. The CPU score comes from [`bench`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bench;
pub mod probe;

use serde::{Deserialize, Serialize};

/// Start-up self-verification results. A node with any failed check stays
/// a member, shows what failed, and offers no guest slots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checks {
    /// Names of the failed checks (`namespaces`, `cgroups`, `data-dir`,
    /// `cpu-bench`), each with a short reason after a colon.
    pub failed: Vec<String>,
    /// The cgroup hierarchy found: `v1`, `v2`, or empty when none works.
    pub cgroup: String,
}

impl Checks {
    /// True when every check passed.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }

    /// `ok`, or the failed check names joined with commas.
    pub fn summary(&self) -> String {
        if self.ok() {
            "ok".to_owned()
        } else {
            self.failed
                .iter()
                .map(|f| f.split(':').next().unwrap_or(f))
                .collect::<Vec<_>>()
                .join(",")
        }
    }
}

/// How many guest slots are in each state of the owner's policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotCounts {
    /// The owner's: no guest may start.
    pub owner: u16,
    /// Free for a guest.
    pub unclaimed: u16,
    /// Running a guest.
    pub claimed: u16,
    /// Running a guest under a CPU cap.
    pub throttled: u16,
    /// Holding a frozen guest.
    pub suspended: u16,
    /// Evicting a guest.
    pub evicting: u16,
}

impl SlotCounts {
    /// Counts one slot in state `name` (as `shoal-owner` names them).
    pub fn add(&mut self, name: &str) {
        let c = match name {
            "owner" => &mut self.owner,
            "unclaimed" => &mut self.unclaimed,
            "claimed" => &mut self.claimed,
            "throttled" => &mut self.throttled,
            "suspended" => &mut self.suspended,
            "evicting" => &mut self.evicting,
            _ => return,
        };
        *c = c.saturating_add(1);
    }

    /// Slots lent to guests: every slot but the owner's.
    pub fn lent(&self) -> u32 {
        u32::from(self.unclaimed)
            + u32::from(self.claimed)
            + u32::from(self.throttled)
            + u32::from(self.suspended)
            + u32::from(self.evicting)
    }

    /// `2 unclaimed, 1 suspended`, or `-` for a node without slots.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            ("unclaimed", self.unclaimed),
            ("claimed", self.claimed),
            ("throttled", self.throttled),
            ("suspended", self.suspended),
            ("evicting", self.evicting),
            ("owner", self.owner),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// What one node tells the others about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeFacts {
    /// Logical CPUs usable by this process.
    pub cores: u32,
    /// Physical memory, bytes.
    pub mem_total_bytes: u64,
    /// Memory available without swapping (`MemAvailable`), bytes.
    pub mem_avail_bytes: u64,
    /// CPU score from the start-up benchmark (higher is faster; one unit
    /// is one million benchmark operations per second on one core).
    pub cpu_score: u32,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f32; 3],
    /// Seconds since the owner last touched a keyboard, mouse or terminal;
    /// `None` when no such device could be read.
    pub owner_idle_s: Option<u64>,
    /// Guest slots this node offers now.
    pub slots_free: u32,
    /// How many guest slots are in each state of the owner's policy.
    pub slot_states: SlotCounts,
    /// Start-up checks.
    pub checks: Checks,
    /// Agent version.
    pub version: String,
}

/// Why facts bytes could not be decoded. Nothing is changed: the node is
/// shown without facts.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    /// Not a facts payload of this version.
    #[error("undecodable facts: {0}")]
    Decode(#[from] postcard::Error),
}

impl NodeFacts {
    /// The gossip encoding.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes what [`NodeFacts::encode`] produced.
    ///
    /// # Errors
    /// Bytes that are not facts.
    pub fn decode(bytes: &[u8]) -> Result<Self, FactsError> {
        Ok(postcard::from_bytes(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_roundtrips_and_fits_a_rumor() {
        let f = NodeFacts {
            cores: 64,
            mem_total_bytes: 1 << 40,
            mem_avail_bytes: 1 << 39,
            cpu_score: 1234,
            load: [1.5, 2.0, 0.25],
            owner_idle_s: Some(300),
            slots_free: 64,
            slot_states: SlotCounts {
                unclaimed: 63,
                suspended: 1,
                ..SlotCounts::default()
            },
            checks: Checks {
                failed: vec!["namespaces: unshare: Operation not permitted".into()],
                cgroup: "v1".into(),
            },
            version: "0.1.0".into(),
        };
        let b = f.encode();
        assert!(b.len() < 200, "{}", b.len());
        assert_eq!(NodeFacts::decode(&b).unwrap(), f);
        assert!(NodeFacts::decode(&b[..b.len() / 2]).is_err());
        assert_eq!(f.checks.summary(), "namespaces");
        assert_eq!(f.slot_states.summary(), "63 unclaimed, 1 suspended");
        assert_eq!(SlotCounts::default().summary(), "-");
    }
}
