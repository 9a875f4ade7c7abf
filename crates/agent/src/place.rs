//! Placement of one `shoal run` task: a pure function from what this node
//! knows (the `shoal nodes` report and its own tasks in flight) to a node.

use std::collections::HashMap;

use shoal_control::NodeInfo;

/// What the task asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ask {
    /// Pinned node (`--node`).
    pub node: Option<String>,
    /// Run here (`--local`).
    pub local: bool,
    /// Memory limit asked, bytes.
    pub memory_bytes: Option<u64>,
    /// Nodes not to use (an earlier attempt of this task was lost there).
    pub exclude: Vec<String>,
}

/// Where to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// On this node.
    Local {
        /// Why, when it was not the best node's choice (for `--verbose`).
        fallback: Option<String>,
    },
    /// On this peer.
    Remote {
        /// Its name.
        name: String,
        /// Its address.
        addr: String,
    },
    /// Nowhere: the request cannot be met (an unknown `--node`).
    Refuse(String),
}

/// Owner idle time under which a node counts as in use.
const OWNER_BUSY_S: u64 = 300;

/// The score of a candidate: free slots (minus what this node already sent
/// it) × CPU score, divided by (1 + RTT in ms), halved while its owner is
/// at the keyboard. `None` when it cannot take the task.
pub fn score(n: &NodeInfo, inflight: u32, ask: &Ask) -> Option<f64> {
    if n.state != "alive" || n.checks.as_deref() != Some("ok") {
        return None;
    }
    let free = n.slots_free?.saturating_sub(inflight);
    if free == 0 {
        return None;
    }
    if let (Some(want), Some(avail)) = (ask.memory_bytes, n.mem_avail_bytes) {
        if want > avail {
            return None;
        }
    }
    let cpu = f64::from(n.cpu_score.unwrap_or(1).max(1));
    let rtt = n.rtt_ms.unwrap_or(0.0).max(0.0);
    let owner = if n.owner_idle_s.is_some_and(|s| s < OWNER_BUSY_S) {
        0.5
    } else {
        1.0
    };
    Some(f64::from(free) * cpu / (1.0 + rtt) * owner)
}

/// Chooses a node for one task.
pub fn place(nodes: &[NodeInfo], inflight: &HashMap<String, u32>, ask: &Ask) -> Choice {
    if ask.local {
        return Choice::Local { fallback: None };
    }
    let load = |n: &NodeInfo| inflight.get(&n.name).copied().unwrap_or(0);
    if let Some(want) = &ask.node {
        if ask.exclude.contains(want) {
            return Choice::Refuse(format!("node {want:?} lost this task already"));
        }
        return match nodes.iter().find(|n| &n.name == want) {
            None => Choice::Refuse(format!("unknown node {want:?} (see `shoal nodes`)")),
            Some(n) if n.is_self => Choice::Local { fallback: None },
            Some(n) if n.state != "alive" => {
                Choice::Refuse(format!("node {want:?} is {}", n.state))
            }
            Some(n) => Choice::Remote {
                name: n.name.clone(),
                addr: n.addr.clone(),
            },
        };
    }
    let best = nodes
        .iter()
        .filter(|n| !ask.exclude.contains(&n.name))
        .filter_map(|n| score(n, load(n), ask).map(|s| (s, n)))
        .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.name.cmp(&a.1.name)));
    match best {
        Some((_, n)) if n.is_self => Choice::Local { fallback: None },
        Some((_, n)) => Choice::Remote {
            name: n.name.clone(),
            addr: n.addr.clone(),
        },
        None => Choice::Local {
            fallback: Some("no node can take the task now".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, is_self: bool, slots: u32, cpu: u32, rtt: f64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            addr: format!("{name}:7946"),
            state: "alive".into(),
            cores: Some(slots),
            mem_total_bytes: Some(8 << 30),
            mem_avail_bytes: Some(4 << 30),
            cpu_score: Some(cpu),
            load1: Some(0.0),
            load5: Some(0.0),
            load15: Some(0.0),
            owner_idle_s: Some(3600),
            rtt_ms: if is_self { None } else { Some(rtt) },
            checks: Some("ok".into()),
            role: "member".into(),
            slots_free: Some(slots),
            guests: None,
            slots_lent: None,
            is_self,
            rank: Some(0),
            checks_failed: vec![],
            version: None,
            bandwidth_mbps: None,
        }
    }

    #[test]
    fn prefers_free_fast_near_nodes_and_spreads_in_flight_work() {
        let nodes = vec![
            node("me", true, 2, 300, 0.0),
            node("big", false, 8, 300, 0.2),
        ];
        let none = HashMap::new();
        assert_eq!(
            place(&nodes, &none, &Ask::default()),
            Choice::Remote {
                name: "big".into(),
                addr: "big:7946".into()
            }
        );
        let busy: HashMap<String, u32> = [("big".to_owned(), 7)].into();
        assert_eq!(
            place(&nodes, &busy, &Ask::default()),
            Choice::Local { fallback: None }
        );
        let lost = Ask {
            exclude: vec!["big".into()],
            ..Ask::default()
        };
        assert_eq!(
            place(&nodes, &none, &lost),
            Choice::Local { fallback: None }
        );
        let full: HashMap<String, u32> = [("big".to_owned(), 8), ("me".to_owned(), 2)].into();
        assert!(matches!(
            place(&nodes, &full, &Ask::default()),
            Choice::Local { fallback: Some(_) }
        ));
    }

    #[test]
    fn pins_local_memory_checks_owner_and_refusals() {
        let mut nodes = vec![node("me", true, 2, 300, 0.0), node("a", false, 2, 300, 0.1)];
        let none = HashMap::new();
        let pin = |n: &str| Ask {
            node: Some(n.into()),
            ..Ask::default()
        };
        assert!(matches!(
            place(&nodes, &none, &pin("a")),
            Choice::Remote { .. }
        ));
        assert!(matches!(
            place(&nodes, &none, &pin("zz")),
            Choice::Refuse(_)
        ));
        assert_eq!(
            place(
                &nodes,
                &none,
                &Ask {
                    local: true,
                    ..Ask::default()
                }
            ),
            Choice::Local { fallback: None }
        );
        let huge = Ask {
            memory_bytes: Some(64 << 30),
            ..Ask::default()
        };
        assert!(matches!(
            place(&nodes, &none, &huge),
            Choice::Local { fallback: Some(_) }
        ));
        nodes[1].owner_idle_s = Some(5);
        let s_busy = score(&nodes[1], 0, &Ask::default()).unwrap();
        nodes[1].owner_idle_s = Some(5000);
        assert!(score(&nodes[1], 0, &Ask::default()).unwrap() > s_busy);
        nodes[1].checks = Some("cgroups".into());
        assert!(score(&nodes[1], 0, &Ask::default()).is_none());
        nodes[1].state = "down".into();
        assert!(matches!(place(&nodes, &none, &pin("a")), Choice::Refuse(_)));
    }
}
