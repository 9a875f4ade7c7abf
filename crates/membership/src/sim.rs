//! A deterministic, seeded simulation of many [`Engine`]s on an in-memory
//! network with latency, random loss and cuttable links.
//!
//! Nothing here reads a clock: virtual time advances from event to event,
//! so a 200-node, 30-second scenario runs in a few seconds and the same
//! seed always gives the same history.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::{Engine, Event, MemberState, NodeId, Output, Timer};

enum Item {
    Packet {
        to: usize,
        from: SocketAddr,
        data: Vec<u8>,
    },
    Timer {
        node: usize,
        life: u32,
        timer: Timer<NodeId>,
    },
}

struct SimNode {
    engine: Engine,
    up: bool,
    life: u32,
}

/// One logged membership event.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Virtual time.
    pub at: Duration,
    /// The node that saw it.
    pub node: usize,
    /// What it saw.
    pub event: Event,
}

/// The simulated cluster.
pub struct Sim {
    now: Duration,
    nodes: Vec<SimNode>,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    items: HashMap<u64, Item>,
    seq: u64,
    rng: StdRng,
    loss: f64,
    latency_us: (u64, u64),
    cut: HashSet<(usize, usize)>,
    index: HashMap<SocketAddr, usize>,
    config: foca::Config,
    /// Every membership event, in order.
    pub log: Vec<Logged>,
    /// Packets delivered so far.
    pub delivered: u64,
    next_refresh: Duration,
}

/// How often simulated nodes republish their facts.
pub const FACTS_REFRESH: Duration = Duration::from_secs(2);

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("now", &self.now)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// The address of simulated node `i`.
pub fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250 + 1) as u8], 7946))
}

impl Sim {
    /// `n` nodes with foca `config`, not yet joined, seeded with `seed`.
    /// Latency is uniform in 100–500 µs.
    pub fn new(n: usize, config: foca::Config, seed: u64) -> Self {
        let mut sim = Self {
            now: Duration::ZERO,
            nodes: Vec::with_capacity(n),
            queue: BinaryHeap::new(),
            items: HashMap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            loss: 0.0,
            latency_us: (100, 500),
            cut: HashSet::new(),
            index: HashMap::new(),
            config,
            log: Vec::new(),
            delivered: 0,
            next_refresh: FACTS_REFRESH,
        };
        for i in 0..n {
            let engine = sim.make_engine(i, 1_000 + i as u64);
            sim.index.insert(addr_of(i), i);
            sim.nodes.push(SimNode {
                engine,
                up: true,
                life: 0,
            });
        }
        sim
    }

    fn make_engine(&mut self, i: usize, started_ms: u64) -> Engine {
        let id = NodeId::new(addr_of(i), format!("n{i}"), started_ms);
        let seed = self.rng.random::<u64>();
        let mut e = Engine::new(id, self.config.clone(), self.nodes.len(), seed);
        let _ = e.set_facts(format!("facts of n{i}").into_bytes(), self.now);
        e
    }

    /// Current virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s engine.
    pub fn engine(&self, i: usize) -> &Engine {
        &self.nodes[i].engine
    }

    /// Whether node `i` is running.
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].up
    }

    /// Random loss probability for every packet.
    pub fn set_loss(&mut self, p: f64) {
        self.loss = p;
    }

    /// Every node announces itself to `seed`.
    pub fn join_all(&mut self, seed: usize) {
        for i in 0..self.nodes.len() {
            if i != seed {
                self.nodes[i].engine.join(addr_of(seed), self.now);
                self.pump(i);
            }
        }
    }

    /// Crashes node `i`: it stops sending and receiving, timers included.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].up = false;
    }

    /// Restarts node `i` as a new life (later start time) joining `seed`.
    pub fn restart(&mut self, i: usize, seed: usize) {
        let started = 1_000_000 + self.now.as_millis() as u64;
        let engine = self.make_engine(i, started);
        let node = &mut self.nodes[i];
        node.engine = engine;
        node.up = true;
        node.life += 1;
        self.nodes[i].engine.join(addr_of(seed), self.now);
        self.pump(i);
    }

    /// Node `i` leaves gracefully.
    pub fn leave(&mut self, i: usize) {
        self.nodes[i].engine.leave(self.now);
        self.pump(i);
    }

    /// Cuts every link between `side` and the other nodes, both ways.
    pub fn partition(&mut self, side: &[usize]) {
        let a: HashSet<usize> = side.iter().copied().collect();
        for &i in &a {
            for j in 0..self.nodes.len() {
                if !a.contains(&j) {
                    self.cut.insert((i, j));
                    self.cut.insert((j, i));
                }
            }
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Runs until `d` of virtual time has passed. Every node republishes
    /// its facts every [`FACTS_REFRESH`], as the agent does.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.next_refresh <= end {
            let at = self.next_refresh;
            self.run_until(at);
            for i in self.up_nodes() {
                let facts = self.nodes[i].engine.identity().name.clone().into_bytes();
                let _ = self.nodes[i].engine.set_facts(facts, at);
                self.pump(i);
            }
            self.next_refresh += FACTS_REFRESH;
        }
        self.run_until(end);
    }

    fn run_until(&mut self, end: Duration) {
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > end {
                break;
            }
            self.queue.pop();
            self.now = at;
            let Some(item) = self.items.remove(&seq) else {
                continue;
            };
            match item {
                Item::Packet { to, from, data } => {
                    if !self.nodes[to].up {
                        continue;
                    }
                    self.delivered += 1;
                    let _ = self.nodes[to].engine.handle_packet(from, &data, at);
                    self.pump(to);
                }
                Item::Timer { node, life, timer } => {
                    if !self.nodes[node].up || self.nodes[node].life != life {
                        continue;
                    }
                    self.nodes[node].engine.handle_timer(timer, at);
                    self.pump(node);
                }
            }
        }
        self.now = end;
    }

    fn push(&mut self, at: Duration, item: Item) {
        self.seq += 1;
        self.items.insert(self.seq, item);
        self.queue.push(Reverse((at, self.seq)));
    }

    fn pump(&mut self, i: usize) {
        let from = addr_of(i);
        for out in self.nodes[i].engine.drain() {
            match out {
                Output::Send { to, packet } => {
                    let Some(&j) = self.index.get(&to) else {
                        continue;
                    };
                    if self.cut.contains(&(i, j)) || self.rng.random::<f64>() < self.loss {
                        continue;
                    }
                    let lat = self.rng.random_range(self.latency_us.0..=self.latency_us.1);
                    let at = self.now + Duration::from_micros(lat);
                    self.push(
                        at,
                        Item::Packet {
                            to: j,
                            from,
                            data: packet,
                        },
                    );
                }
                Output::Schedule { after, timer } => {
                    let life = self.nodes[i].life;
                    self.push(
                        self.now + after,
                        Item::Timer {
                            node: i,
                            life,
                            timer,
                        },
                    );
                }
                Output::Event(event) => self.log.push(Logged {
                    at: self.now,
                    node: i,
                    event,
                }),
            }
        }
    }

    /// How node `viewer` sees node `target` (by address), if it knows it.
    pub fn state_of(&self, viewer: usize, target: usize) -> Option<MemberState> {
        self.nodes[viewer]
            .engine
            .members()
            .into_iter()
            .find(|m| m.id.addr == addr_of(target))
            .map(|m| m.state)
    }

    /// Number of members `viewer` counts as active, itself included.
    pub fn active_count(&self, viewer: usize) -> usize {
        self.nodes[viewer].engine.active_ids().len()
    }

    /// Nodes that are up.
    pub fn up_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .collect()
    }
}
