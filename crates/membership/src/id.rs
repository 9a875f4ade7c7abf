//! Node identity as seen by SWIM.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The identity of one agent's life in the cluster.
///
/// `addr` is where its SWIM socket listens and is the key foca uses to
/// resolve conflicts: a restarted agent on the same address has a later
/// `started_ms`, and one that was declared down and rejoins bumps `bump`,
/// so the newer identity always wins ([`foca::Identity::win_addr_conflict`]).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeId {
    /// Address of the agent's SWIM (UDP) socket.
    pub addr: SocketAddr,
    /// Human name of the node (`--name`, default the host name).
    pub name: String,
    /// Wall-clock milliseconds since the Unix epoch when the agent started:
    /// its seniority in the pecking order.
    pub started_ms: u64,
    /// Rejoin counter, bumped each time this life is declared down and
    /// comes back.
    pub bump: u32,
}

impl NodeId {
    /// A new identity for an agent that just started.
    pub fn new(addr: SocketAddr, name: impl Into<String>, started_ms: u64) -> Self {
        Self {
            addr,
            name: name.into(),
            started_ms,
            bump: 0,
        }
    }

    /// A stand-in identity for a peer known only by address (`--join`):
    /// foca accepts an announce addressed to any identity with its address.
    pub fn placeholder(addr: SocketAddr) -> Self {
        Self {
            addr,
            name: String::new(),
            started_ms: 0,
            bump: 0,
        }
    }

    /// Ordering key of this identity's life: later lives sort higher.
    pub fn generation(&self) -> (u64, u32) {
        (self.started_ms, self.bump)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}#{}.{}",
            self.name, self.addr, self.started_ms, self.bump
        )
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation() > adversary.generation()
    }
}

#[cfg(test)]
mod tests {
    use foca::Identity;

    use super::*;

    #[test]
    fn renewed_identity_wins_over_old() {
        let a = NodeId::new("10.0.0.1:7946".parse().unwrap(), "a", 5);
        let b = a.renew().unwrap();
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
        let restarted = NodeId::new(a.addr, "a", 6);
        assert!(restarted.win_addr_conflict(&b));
    }
}
