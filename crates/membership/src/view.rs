//! What a node knows of the cluster: member states, cluster formation and
//! the pecking order.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// A member's state as shown to people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; has a short time to refute before it is declared down.
    Suspect,
    /// Declared failed.
    Down,
    /// Left on purpose (`shoal leave`, SIGTERM).
    Left,
}

impl MemberState {
    /// Alive or suspect: still counted as a member (SWIM treats a suspect
    /// as alive until the suspicion times out).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Alive | Self::Suspect)
    }

    /// The lowercase name used in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Suspect => "suspect",
            Self::Down => "down",
            Self::Left => "left",
        }
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone)]
pub struct MemberView {
    /// Its identity.
    pub id: NodeId,
    /// Its state.
    pub state: MemberState,
    /// True for this node itself.
    pub is_self: bool,
    /// Smoothed round-trip time from this node, if probed yet.
    pub rtt: Option<Duration>,
    /// Its latest facts payload, if gossip has delivered one.
    pub facts: Option<Vec<u8>>,
}

/// Whether the cluster has reached the size it expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// Fewer than `expect` members alive.
    Forming {
        /// Members alive now (this node included).
        alive: usize,
        /// Members expected (`expect` in the config).
        expect: usize,
    },
    /// At least `expect` members alive (always, when `expect` is 0 or 1).
    Formed {
        /// Members alive now.
        alive: usize,
    },
}

impl ClusterState {
    /// Derives the state from the number of active members.
    pub fn new(alive: usize, expect: usize) -> Self {
        if alive >= expect {
            Self::Formed { alive }
        } else {
            Self::Forming { alive, expect }
        }
    }
}

impl std::fmt::Display for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Forming { alive, expect } => write!(f, "forming ({alive}/{expect})"),
            Self::Formed { .. } => f.write_str("formed"),
        }
    }
}

/// The pecking order of the active members: most senior first (earliest
/// start), ties broken by name and address, so that every node that sees
/// the same members derives the same order. The first is the coordinator
/// for duties that need no consensus.
pub fn pecking_order<'a>(members: impl IntoIterator<Item = &'a NodeId>) -> Vec<&'a NodeId> {
    let mut v: Vec<&NodeId> = members.into_iter().collect();
    v.sort_by(|a, b| {
        (a.started_ms, &a.name, a.addr, a.bump).cmp(&(b.started_ms, &b.name, b.addr, b.bump))
    });
    v
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn forming_until_expected() {
        assert_eq!(ClusterState::new(2, 3).to_string(), "forming (2/3)");
        assert_eq!(ClusterState::new(3, 3).to_string(), "formed");
        assert_eq!(ClusterState::new(1, 0).to_string(), "formed");
    }

    proptest! {
        /// Every permutation of the same members gives the same order, and
        /// the first is the earliest started.
        #[test]
        fn order_is_independent_of_input_order(
            starts in proptest::collection::vec(0u64..5, 1..12),
            seed in any::<u64>(),
        ) {
            let ids: Vec<NodeId> = starts.iter().enumerate().map(|(i, s)| {
                NodeId::new(format!("10.0.0.{}:7946", i + 1).parse().unwrap(), format!("n{}", i % 3), *s)
            }).collect();
            let mut shuffled = ids.clone();
            // A deterministic shuffle from the seed.
            let n = shuffled.len();
            for i in 0..n {
                let j = ((seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64)) % n as u64) as usize;
                shuffled.swap(i, j);
            }
            let a: Vec<NodeId> = pecking_order(&ids).into_iter().cloned().collect();
            let b: Vec<NodeId> = pecking_order(&shuffled).into_iter().cloned().collect();
            prop_assert_eq!(&a, &b);
            let min = starts.iter().min().copied().unwrap();
            prop_assert_eq!(a[0].started_ms, min);
        }
    }
}
