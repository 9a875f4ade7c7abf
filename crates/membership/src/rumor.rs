//! Custom broadcasts carried by foca's gossip: node facts and leave notices.
//!
//! foca owns the [`BroadcastHandler`] it is given and exposes no accessor,
//! so the handler and the [`Engine`](crate::Engine) share one
//! [`RumorStore`] behind a mutex that is only ever taken on the engine's
//! own thread.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use foca::{BroadcastHandler, Invalidates};
use serde::{Deserialize, Serialize};

use crate::NodeId;

/// A rumor as it travels in a foca packet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Rumor {
    /// The latest facts of `id`, opaque to this crate (the agent encodes
    /// `shoal_facts::NodeFacts` in them).
    Facts {
        id: NodeId,
        version: u64,
        payload: Vec<u8>,
    },
    /// `id` left the cluster on purpose.
    Left { id: NodeId },
}

/// Why a rumor was refused. foca drops the rumor and keeps processing the
/// rest of the packet; the membership state is unaffected.
#[derive(Debug, thiserror::Error)]
pub enum RumorError {
    /// The bytes are not a rumor of this protocol version.
    #[error("undecodable rumor: {0}")]
    Decode(#[from] postcard::Error),
    /// A facts rumor larger than we accept.
    #[error("facts rumor of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// Largest facts payload we disseminate.
pub(crate) const MAX_FACTS: usize = 512;

/// Identifies a rumor so that foca stops disseminating stale versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RumorKey {
    addr: SocketAddr,
    kind: u8,
    order: (u64, u32, u64),
}

impl Invalidates for RumorKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.addr == other.addr && self.kind == other.kind && self.order >= other.order
    }
}

/// Facts as last heard for one address.
#[derive(Debug, Clone)]
pub(crate) struct FactsEntry {
    pub(crate) id: NodeId,
    pub(crate) version: u64,
    pub(crate) payload: Vec<u8>,
}

/// What gossip has told us beyond liveness.
#[derive(Debug, Default)]
pub(crate) struct RumorStore {
    pub(crate) facts: HashMap<SocketAddr, FactsEntry>,
    pub(crate) left: HashMap<SocketAddr, NodeId>,
    pub(crate) rejected: u64,
}

impl RumorStore {
    /// Records that `id` left; true if this is news.
    pub(crate) fn record_left(&mut self, id: &NodeId) -> bool {
        match self.left.get(&id.addr) {
            Some(known) if known.generation() >= id.generation() => false,
            _ => {
                self.left.insert(id.addr, id.clone());
                true
            }
        }
    }
}

/// The handle foca calls for every rumor it receives or is given.
#[derive(Debug, Clone, Default)]
pub(crate) struct RumorHandler {
    store: Arc<Mutex<RumorStore>>,
}

impl RumorHandler {
    pub(crate) fn store(&self) -> MutexGuard<'_, RumorStore> {
        // A poisoned lock means a panic on this same thread mid-update; the
        // maps are still structurally valid, so keep going with them.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BroadcastHandler<NodeId> for RumorHandler {
    type Key = RumorKey;
    type Error = RumorError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeId>,
    ) -> Result<Option<RumorKey>, RumorError> {
        let rumor: Rumor = match postcard::from_bytes(data) {
            Ok(r) => r,
            Err(e) => {
                self.store().rejected += 1;
                return Err(e.into());
            }
        };
        let mut store = self.store();
        match rumor {
            Rumor::Facts {
                id,
                version,
                payload,
            } => {
                if payload.len() > MAX_FACTS {
                    store.rejected += 1;
                    return Err(RumorError::TooLarge(payload.len()));
                }
                let (s, b) = id.generation();
                let key = RumorKey {
                    addr: id.addr,
                    kind: 0,
                    order: (s, b, version),
                };
                let newer = match store.facts.get(&id.addr) {
                    Some(old) => {
                        let (os, ob) = old.id.generation();
                        (s, b, version) > (os, ob, old.version)
                    }
                    None => true,
                };
                if !newer {
                    return Ok(None);
                }
                store.facts.insert(
                    id.addr,
                    FactsEntry {
                        id,
                        version,
                        payload,
                    },
                );
                Ok(Some(key))
            }
            Rumor::Left { id } => {
                let (s, b) = id.generation();
                let key = RumorKey {
                    addr: id.addr,
                    kind: 1,
                    order: (s, b, 0),
                };
                Ok(store.record_left(&id).then_some(key))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(started: u64) -> NodeId {
        NodeId::new("10.0.0.2:7946".parse().unwrap(), "b", started)
    }

    fn facts(id: NodeId, version: u64) -> Vec<u8> {
        postcard::to_stdvec(&Rumor::Facts {
            id,
            version,
            payload: vec![1, 2, 3],
        })
        .unwrap()
    }

    #[test]
    fn newer_facts_replace_older_and_stale_are_dropped() {
        let mut h = RumorHandler::default();
        assert!(h.receive_item(&facts(id(1), 2), None).unwrap().is_some());
        assert!(h.receive_item(&facts(id(1), 1), None).unwrap().is_none());
        assert!(h.receive_item(&facts(id(1), 2), None).unwrap().is_none());
        // A restarted agent (later start) starts its versions again at 1.
        assert!(h.receive_item(&facts(id(2), 1), None).unwrap().is_some());
        assert_eq!(h.store().facts.len(), 1);
    }

    #[test]
    fn garbage_and_oversized_are_rejected_and_counted() {
        let mut h = RumorHandler::default();
        assert!(h.receive_item(&[0xff, 0xff, 0xff], None).is_err());
        let big = postcard::to_stdvec(&Rumor::Facts {
            id: id(1),
            version: 1,
            payload: vec![0; MAX_FACTS + 1],
        })
        .unwrap();
        assert!(matches!(
            h.receive_item(&big, None),
            Err(RumorError::TooLarge(_))
        ));
        assert_eq!(h.store().rejected, 2);
    }

    #[test]
    fn key_invalidation_is_per_address_and_kind() {
        let a = RumorKey {
            addr: "10.0.0.1:1".parse().unwrap(),
            kind: 0,
            order: (1, 0, 2),
        };
        let older = RumorKey {
            order: (1, 0, 1),
            ..a.clone()
        };
        let other_kind = RumorKey {
            kind: 1,
            ..a.clone()
        };
        assert!(a.invalidates(&older));
        assert!(!older.invalidates(&a));
        assert!(!a.invalidates(&other_kind));
    }
}
