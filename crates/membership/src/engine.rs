//! The membership engine: foca plus rumors, RTT and leave notices, with no
//! I/O. Events in, [`Output`]s out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, Member, Message, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::rumor::{Rumor, RumorHandler, MAX_FACTS};
use crate::view::{pecking_order, ClusterState, MemberState, MemberView};
use crate::{NodeId, Rtt};

/// First byte of a plaintext packet: a SWIM packet for foca.
const TAG_SWIM: u8 = 1;
/// First byte of a plaintext packet: a direct leave notice.
const TAG_LEAVING: u8 = 2;
/// Outstanding probes older than this are forgotten (no RTT sample).
const PING_MEMORY: Duration = Duration::from_secs(5);

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send `packet` (plaintext; the shell seals it) to `to`.
    Send {
        /// Destination SWIM address.
        to: SocketAddr,
        /// The plaintext packet.
        packet: Vec<u8>,
    },
    /// Call [`Engine::handle_timer`] with `timer` after `after`.
    Schedule {
        /// Delay from now.
        after: Duration,
        /// The timer to hand back.
        timer: Timer<NodeId>,
    },
    /// A change worth logging or reacting to.
    Event(Event),
}

/// A membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member became active.
    Up(NodeId),
    /// A member was declared down.
    Down(NodeId),
    /// A member left on purpose.
    Left(NodeId),
    /// This node was declared down, and rejoined with a new identity.
    Rejoined(NodeId),
    /// This node is out of the cluster and cannot rejoin by itself (after
    /// a leave, or when renewing its identity failed).
    Defunct,
    /// This node has no active member left (it should re-announce).
    Isolated,
    /// This node has active members again.
    Connected,
}

/// Why a packet was refused. None of these changes the membership state.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Empty packet or unknown leading tag.
    #[error("malformed packet (tag {0:?})")]
    Malformed(Option<u8>),
    /// A leave notice whose identity is not the sender's address.
    #[error("leave notice for {claimed} sent from {from}")]
    SpoofedLeave {
        /// Address the notice names.
        claimed: SocketAddr,
        /// Address it came from.
        from: SocketAddr,
    },
    /// A leave notice that does not decode.
    #[error("undecodable leave notice: {0}")]
    Decode(#[from] postcard::Error),
    /// foca refused the packet or operation.
    #[error("swim: {0}")]
    Swim(#[from] foca::Error),
    /// A facts payload over the size that fits a datagram.
    #[error("facts payload of {0} bytes exceeds {MAX_FACTS}")]
    FactsTooLarge(usize),
}

/// Counters of refused input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Packets refused by the engine or foca.
    pub packets_rejected: u64,
    /// Rumors refused by the rumor handler.
    pub rumors_rejected: u64,
}

/// The membership state machine of one node.
pub struct Engine {
    foca: Foca<NodeId, PostcardCodec, StdRng, RumorHandler>,
    rumors: RumorHandler,
    rt: AccumulatingRuntime<NodeId>,
    out: Vec<Output>,
    rtt: HashMap<SocketAddr, Rtt>,
    pings: HashMap<(SocketAddr, u8), Duration>,
    facts_version: u64,
    facts: Option<Vec<u8>>,
    left: bool,
    expect: usize,
    packets_rejected: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("id", self.foca.identity())
            .field("members", &self.foca.num_members())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A node with identity `id`, foca `config`, `expect` members for the
    /// cluster to count as formed, and a `seed` for foca's randomness.
    pub fn new(id: NodeId, config: foca::Config, expect: usize, seed: u64) -> Self {
        let rumors = RumorHandler::default();
        let foca = Foca::with_custom_broadcast(
            id,
            config,
            StdRng::seed_from_u64(seed),
            PostcardCodec,
            rumors.clone(),
        );
        Self {
            foca,
            rumors,
            rt: AccumulatingRuntime::new(),
            out: Vec::new(),
            rtt: HashMap::new(),
            pings: HashMap::new(),
            facts_version: 0,
            facts: None,
            left: false,
            expect,
            packets_rejected: 0,
        }
    }

    /// This node's current identity.
    pub fn identity(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Whether this node has left.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Takes the outputs accumulated so far.
    pub fn drain(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// Handles a plaintext packet received from `from`.
    ///
    /// # Errors
    /// The packet is refused and counted; membership state is unchanged
    /// beyond what foca had applied before it found the fault.
    pub fn handle_packet(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        now: Duration,
    ) -> Result<(), EngineError> {
        let result = self.handle_packet_inner(from, data, now);
        if result.is_err() {
            self.packets_rejected += 1;
        }
        self.flush(now);
        result
    }

    fn handle_packet_inner(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        _now: Duration,
    ) -> Result<(), EngineError> {
        if self.left {
            return Ok(());
        }
        match data.split_first() {
            Some((&TAG_SWIM, rest)) => {
                self.foca.handle_data(rest, &mut self.rt)?;
                Ok(())
            }
            Some((&TAG_LEAVING, rest)) => {
                let id: NodeId = postcard::from_bytes(rest)?;
                if id.addr != from {
                    return Err(EngineError::SpoofedLeave {
                        claimed: id.addr,
                        from,
                    });
                }
                // Pass the leave on as a rumor too, so that it travels with
                // the down update we are about to gossip.
                let rumor = postcard::to_stdvec(&Rumor::Left { id: id.clone() })?;
                self.foca.add_broadcast(&rumor)?;
                self.foca
                    .apply_many(std::iter::once(Member::down(id)), true, &mut self.rt)?;
                Ok(())
            }
            Some((tag, _)) => Err(EngineError::Malformed(Some(*tag))),
            None => Err(EngineError::Malformed(None)),
        }
    }

    /// Handles a timer previously asked for with [`Output::Schedule`].
    pub fn handle_timer(&mut self, timer: Timer<NodeId>, now: Duration) {
        if !self.left {
            if let Err(e) = self.foca.handle_timer(timer, &mut self.rt) {
                tracing::debug!(error = %e, "timer");
            }
        }
        self.flush(now);
    }

    /// Asks the member at `addr` (known only by address) to let us in.
    pub fn join(&mut self, addr: SocketAddr, now: Duration) {
        self.announce(NodeId::placeholder(addr), now);
    }

    /// A peer announced itself (a discovery beacon): ask it to let us in,
    /// unless it is already an active member.
    pub fn discovered(&mut self, id: NodeId, now: Duration) {
        if id.addr == self.identity().addr {
            return;
        }
        let known = self.foca.iter_members().any(|m| {
            m.id() == &id || (m.id().addr == id.addr && m.id().generation() > id.generation())
        });
        if !known {
            self.announce(id, now);
        }
    }

    fn announce(&mut self, dst: NodeId, now: Duration) {
        if self.left {
            return;
        }
        if let Err(e) = self.foca.announce(dst, &mut self.rt) {
            tracing::debug!(error = %e, "announce");
        }
        self.flush(now);
    }

    /// Publishes a new version of this node's facts.
    ///
    /// # Errors
    /// The payload is too large for one datagram; nothing is published.
    pub fn set_facts(&mut self, payload: Vec<u8>, now: Duration) -> Result<(), EngineError> {
        if payload.len() > MAX_FACTS {
            return Err(EngineError::FactsTooLarge(payload.len()));
        }
        self.facts = Some(payload);
        self.publish_facts();
        self.flush(now);
        Ok(())
    }

    fn publish_facts(&mut self) {
        let Some(payload) = self.facts.clone() else {
            return;
        };
        self.facts_version += 1;
        let rumor = Rumor::Facts {
            id: self.identity().clone(),
            version: self.facts_version,
            payload,
        };
        match postcard::to_stdvec(&rumor) {
            Ok(bytes) => {
                if let Err(e) = self.foca.add_broadcast(&bytes) {
                    tracing::warn!(error = %e, "publishing facts");
                }
            }
            Err(e) => tracing::warn!(error = %e, "encoding facts"),
        }
    }

    /// Leaves the cluster: tells every active member directly, gossips the
    /// leave as a rumor and as foca's own down update, then stops answering.
    pub fn leave(&mut self, now: Duration) {
        if self.left {
            return;
        }
        let id = self.identity().clone();
        if let Ok(bytes) = postcard::to_stdvec(&Rumor::Left { id: id.clone() }) {
            if let Err(e) = self.foca.add_broadcast(&bytes) {
                tracing::debug!(error = %e, "leave rumor");
            }
        }
        if let Ok(notice) = postcard::to_stdvec(&id) {
            let mut packet = Vec::with_capacity(notice.len() + 1);
            packet.push(TAG_LEAVING);
            packet.extend_from_slice(&notice);
            let active: Vec<SocketAddr> = self.foca.iter_members().map(|m| m.id().addr).collect();
            for to in active {
                self.out.push(Output::Send {
                    to,
                    packet: packet.clone(),
                });
            }
        }
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!(error = %e, "leave");
        }
        self.flush(now);
        self.left = true;
    }

    /// Counters of refused input.
    pub fn stats(&self) -> Stats {
        Stats {
            packets_rejected: self.packets_rejected,
            rumors_rejected: self.rumors.store().rejected,
        }
    }

    /// Every member this node knows of, itself included (first).
    pub fn members(&self) -> Vec<MemberView> {
        let store = self.rumors.store();
        let facts_of = |id: &NodeId| {
            store
                .facts
                .get(&id.addr)
                .filter(|f| f.id.started_ms == id.started_ms)
                .map(|f| f.payload.clone())
        };
        let me = self.identity();
        let mut v = vec![MemberView {
            id: me.clone(),
            state: if self.left {
                MemberState::Left
            } else {
                MemberState::Alive
            },
            is_self: true,
            rtt: None,
            facts: facts_of(me),
        }];
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            let state = match m.state() {
                foca::State::Alive => MemberState::Alive,
                foca::State::Suspect => MemberState::Suspect,
                foca::State::Down => match store.left.get(&id.addr) {
                    Some(l) if l.started_ms == id.started_ms => MemberState::Left,
                    _ => MemberState::Down,
                },
            };
            v.push(MemberView {
                id: id.clone(),
                state,
                is_self: false,
                rtt: self.rtt.get(&id.addr).map(Rtt::smoothed),
                facts: facts_of(id),
            });
        }
        v
    }

    /// Alive members (this node included, unless it left).
    pub fn active_ids(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        if !self.left {
            v.push(self.identity().clone());
        }
        v
    }

    /// Forming or formed, against the expected size.
    pub fn cluster_state(&self) -> ClusterState {
        ClusterState::new(self.active_ids().len(), self.expect)
    }

    /// The active members in pecking order; the first is the coordinator.
    pub fn order(&self) -> Vec<NodeId> {
        let ids = self.active_ids();
        pecking_order(&ids).into_iter().cloned().collect()
    }

    /// Moves what foca accumulated into [`Output`]s.
    fn flush(&mut self, now: Duration) {
        let mut republish = false;
        while let Some((to, data)) = self.rt.to_send() {
            let mut packet = Vec::with_capacity(data.len() + 1);
            packet.push(TAG_SWIM);
            packet.extend_from_slice(&data);
            self.out.push(Output::Send {
                to: to.addr,
                packet,
            });
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            self.out.push(Output::Schedule { after, timer });
        }
        while let Some(n) = self.rt.to_notify() {
            let event = match n {
                OwnedNotification::MemberUp(id) => Event::Up(id),
                OwnedNotification::MemberDown(id) => {
                    let left = self
                        .rumors
                        .store()
                        .left
                        .get(&id.addr)
                        .is_some_and(|l| l.started_ms == id.started_ms);
                    if left {
                        Event::Left(id)
                    } else {
                        Event::Down(id)
                    }
                }
                OwnedNotification::Rejoin(id) => {
                    republish = true;
                    Event::Rejoined(id)
                }
                OwnedNotification::Defunct => Event::Defunct,
                OwnedNotification::Idle => Event::Isolated,
                OwnedNotification::Active => Event::Connected,
                OwnedNotification::DataSent(h) => {
                    if let Message::Ping(n) = h.message {
                        self.pings.insert((h.dst.addr, n), now);
                    }
                    continue;
                }
                OwnedNotification::DataReceived(h) => {
                    if let Message::Ack(n) = h.message {
                        if let Some(sent) = self.pings.remove(&(h.src.addr, n)) {
                            let sample = now.saturating_sub(sent);
                            self.rtt
                                .entry(h.src.addr)
                                .and_modify(|r| r.update(sample))
                                .or_insert_with(|| Rtt::new(sample));
                        }
                    }
                    continue;
                }
                OwnedNotification::Rename(..) | OwnedNotification::ProbeFailed(..) => continue,
            };
            self.out.push(Output::Event(event));
        }
        if self.pings.len() > 64 {
            self.pings
                .retain(|_, sent| now.saturating_sub(*sent) < PING_MEMORY);
        }
        if republish {
            self.publish_facts();
            self.flush(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lan_config;

    fn id(n: u8) -> NodeId {
        NodeId::new(
            format!("10.0.0.{n}:7946").parse().unwrap(),
            format!("n{n}"),
            n.into(),
        )
    }

    fn sends(out: &[Output]) -> Vec<(SocketAddr, Vec<u8>)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { to, packet } => Some((*to, packet.clone())),
                _ => None,
            })
            .collect()
    }

    /// Delivers every packet between two engines, firing periodic gossip
    /// at once (probe timers are left alone), for a bounded number of rounds.
    fn pump(a: &mut Engine, b: &mut Engine, now: Duration) {
        fn step(x: &mut Engine, y: &mut Engine, now: Duration) {
            for o in x.drain() {
                match o {
                    Output::Send { to, packet } if to == y.identity().addr => {
                        let _ = y.handle_packet(x.identity().addr, &packet, now);
                    }
                    Output::Schedule {
                        timer: timer @ Timer::PeriodicGossip(_),
                        ..
                    } => x.handle_timer(timer, now),
                    _ => {}
                }
            }
        }
        for _ in 0..6 {
            step(a, b, now);
            step(b, a, now);
        }
    }

    #[test]
    fn join_by_address_then_leave_shows_left() {
        let mut a = Engine::new(id(1), lan_config(2), 2, 1);
        let mut b = Engine::new(id(2), lan_config(2), 2, 2);
        let t = Duration::from_secs(1);
        assert_eq!(
            a.cluster_state(),
            ClusterState::Forming {
                alive: 1,
                expect: 2
            }
        );
        b.join(id(1).addr, t);
        pump(&mut a, &mut b, t);
        assert_eq!(a.cluster_state(), ClusterState::Formed { alive: 2 });
        assert_eq!(b.order()[0], id(1), "the earlier start is the coordinator");
        b.set_facts(vec![7, 7], t).unwrap();
        b.leave(t);
        let out = b.drain();
        assert!(sends(&out).iter().any(|(_, p)| p[0] == TAG_LEAVING));
        for (_, p) in sends(&out) {
            let _ = a.handle_packet(id(2).addr, &p, t);
        }
        let events = a.drain();
        assert!(
            events.contains(&Output::Event(Event::Left(id(2)))),
            "{events:?}"
        );
        let view = a.members();
        let bv = view.iter().find(|m| m.id.addr == id(2).addr).unwrap();
        assert_eq!(bv.state, MemberState::Left);
    }

    proptest::proptest! {
        /// No byte string crashes the engine, and none is admitted as a
        /// member unless it is a well-formed SWIM packet.
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let mut a = Engine::new(id(1), lan_config(2), 2, 1);
            let _ = a.handle_packet(id(2).addr, &data, Duration::ZERO);
            let mut tagged = vec![TAG_SWIM];
            tagged.extend_from_slice(&data);
            let _ = a.handle_packet(id(2).addr, &tagged, Duration::ZERO);
        }

        /// Real packets with bytes flipped never crash the engine.
        #[test]
        fn mutated_real_packets_never_panic(pos in 0usize..2000, byte in proptest::num::u8::ANY) {
            let mut a = Engine::new(id(1), lan_config(2), 2, 1);
            let mut b = Engine::new(id(2), lan_config(2), 2, 2);
            let t = Duration::from_secs(1);
            b.set_facts(vec![1, 2, 3], t).unwrap();
            b.join(id(1).addr, t);
            pump(&mut a, &mut b, t);
            b.leave(t);
            for (_, mut p) in sends(&b.drain()) {
                let i = pos % p.len();
                p[i] ^= byte | 1;
                let _ = a.handle_packet(id(2).addr, &p, t);
            }
        }
    }

    #[test]
    fn garbage_is_counted_and_ignored() {
        let mut a = Engine::new(id(1), lan_config(2), 2, 1);
        let t = Duration::ZERO;
        assert!(a.handle_packet(id(2).addr, &[], t).is_err());
        assert!(a.handle_packet(id(2).addr, &[9, 1, 2], t).is_err());
        assert!(a
            .handle_packet(id(2).addr, &[TAG_SWIM, 0xff, 0xff, 0xff], t)
            .is_err());
        assert!(a
            .handle_packet(id(2).addr, &[TAG_LEAVING, 0xff], t)
            .is_err());
        assert_eq!(a.stats().packets_rejected, 4);
        assert_eq!(a.members().len(), 1);
    }

    #[test]
    fn leave_notice_from_another_address_is_refused() {
        let mut a = Engine::new(id(1), lan_config(2), 2, 1);
        let mut b = Engine::new(id(2), lan_config(2), 2, 2);
        let t = Duration::from_secs(1);
        b.join(id(1).addr, t);
        pump(&mut a, &mut b, t);
        let mut forged = vec![TAG_LEAVING];
        forged.extend(postcard::to_stdvec(&id(2)).unwrap());
        let err = a.handle_packet(id(3).addr, &forged, t).unwrap_err();
        assert!(matches!(err, EngineError::SpoofedLeave { .. }));
        assert!(a.members().iter().all(|m| m.state == MemberState::Alive));
    }

    #[test]
    fn facts_are_gossiped() {
        let mut a = Engine::new(id(1), lan_config(2), 2, 1);
        let mut b = Engine::new(id(2), lan_config(2), 2, 2);
        let t = Duration::from_secs(1);
        b.set_facts(vec![42], t).unwrap();
        b.join(id(1).addr, t);
        pump(&mut a, &mut b, t);
        let view = a.members();
        let bv = view.iter().find(|m| m.id.addr == id(2).addr).unwrap();
        assert_eq!(bv.facts.as_deref(), Some(&[42u8][..]));
        assert!(a.set_facts(vec![0; MAX_FACTS + 1], t).is_err());
    }
}
