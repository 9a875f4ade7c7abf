//! Builds `shoal nodes` from the membership view: a pure function.

use shoal_control::{ClusterInfo, NodeInfo, NodesReport, RejectedInfo};
use shoal_facts::NodeFacts;
use shoal_membership::{ClusterState, MemberView, NodeId};

/// Everything the report is made from.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// Cluster name.
    pub cluster: &'a str,
    /// Expected size.
    pub expect: u32,
    /// Forming or formed.
    pub state: ClusterState,
    /// Members, self first.
    pub members: &'a [MemberView],
    /// Active members in pecking order.
    pub order: &'a [NodeId],
    /// Refusal counters.
    pub rejected: RejectedInfo,
}

/// The report `shoal nodes` shows.
pub fn build(s: &Snapshot<'_>) -> NodesReport {
    let alive = match s.state {
        ClusterState::Forming { alive, .. } | ClusterState::Formed { alive } => alive as u32,
    };
    let mut nodes: Vec<NodeInfo> = s
        .members
        .iter()
        .map(|m| {
            let facts = m.facts.as_deref().and_then(|b| NodeFacts::decode(b).ok());
            let rank = s
                .order
                .iter()
                .position(|o| o.addr == m.id.addr && m.state.is_active());
            NodeInfo {
                name: m.id.name.clone(),
                addr: m.id.addr.to_string(),
                state: m.state.as_str().to_owned(),
                cores: facts.as_ref().map(|f| f.cores),
                mem_total_bytes: facts.as_ref().map(|f| f.mem_total_bytes),
                mem_avail_bytes: facts.as_ref().map(|f| f.mem_avail_bytes),
                cpu_score: facts.as_ref().map(|f| f.cpu_score),
                load1: facts.as_ref().map(|f| f.load[0]),
                load5: facts.as_ref().map(|f| f.load[1]),
                load15: facts.as_ref().map(|f| f.load[2]),
                owner_idle_s: facts.as_ref().and_then(|f| f.owner_idle_s),
                rtt_ms: m.rtt.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
                checks: facts.as_ref().map(|f| f.checks.summary()),
                role: if rank == Some(0) {
                    "coordinator"
                } else {
                    "member"
                }
                .to_owned(),
                slots_free: facts
                    .as_ref()
                    .map(|f| if m.state.is_active() { f.slots_free } else { 0 }),
                guests: facts.as_ref().map(|f| {
                    if m.state.is_active() {
                        f.slot_states.summary()
                    } else {
                        "-".to_owned()
                    }
                }),
                slots_lent: facts.as_ref().map(|f| {
                    if m.state.is_active() {
                        f.slot_states.lent()
                    } else {
                        0
                    }
                }),
                is_self: m.is_self,
                rank: rank.map(|r| r as u32),
                checks_failed: facts
                    .as_ref()
                    .map(|f| f.checks.failed.clone())
                    .unwrap_or_default(),
                version: facts.as_ref().map(|f| f.version.clone()),
                bandwidth_mbps: None,
            }
        })
        .collect();
    nodes.sort_by(|a, b| (&a.name, &a.addr).cmp(&(&b.name, &b.addr)));
    NodesReport {
        cluster: ClusterInfo {
            name: s.cluster.to_owned(),
            state: s.state.to_string(),
            expect: s.expect,
            alive,
        },
        nodes,
        rejected: s.rejected,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shoal_membership::MemberState;

    use super::*;

    fn id(n: u8, started: u64) -> NodeId {
        NodeId::new(
            format!("10.0.0.{n}:7946").parse().unwrap(),
            format!("n{n}"),
            started,
        )
    }

    #[test]
    fn roles_states_and_facts() {
        let facts = NodeFacts {
            cores: 4,
            slots_free: 4,
            cpu_score: 900,
            ..NodeFacts::default()
        };
        let members = vec![
            MemberView {
                id: id(1, 20),
                state: MemberState::Alive,
                is_self: true,
                rtt: None,
                facts: Some(facts.encode()),
            },
            MemberView {
                id: id(2, 10),
                state: MemberState::Alive,
                is_self: false,
                rtt: Some(Duration::from_micros(1234)),
                facts: None,
            },
            MemberView {
                id: id(3, 5),
                state: MemberState::Down,
                is_self: false,
                rtt: None,
                facts: Some(facts.encode()),
            },
        ];
        let order = vec![id(2, 10), id(1, 20)];
        let r = build(&Snapshot {
            cluster: "lab",
            expect: 3,
            state: ClusterState::new(2, 3),
            members: &members,
            order: &order,
            rejected: RejectedInfo::default(),
        });
        assert_eq!(r.cluster.state, "forming (2/3)");
        assert_eq!(r.cluster.alive, 2);
        assert_eq!(r.nodes[0].role, "member");
        assert_eq!(r.nodes[0].cores, Some(4));
        assert_eq!(r.nodes[1].role, "coordinator");
        assert_eq!(r.nodes[1].rtt_ms, Some(1.234));
        assert_eq!(r.nodes[1].cores, None);
        assert_eq!(r.nodes[2].state, "down");
        assert_eq!(r.nodes[2].slots_free, Some(0), "a down node offers nothing");
        assert_eq!(r.nodes[2].rank, None);
        let json = serde_json::to_value(&r).unwrap();
        for k in [
            "name",
            "addr",
            "state",
            "cores",
            "mem_total_bytes",
            "mem_avail_bytes",
            "cpu_score",
            "load1",
            "owner_idle_s",
            "rtt_ms",
            "checks",
            "role",
            "slots_free",
            "guests",
        ] {
            assert!(json["nodes"][0].get(k).is_some(), "missing {k}");
        }
        for k in ["name", "state", "expect", "alive"] {
            assert!(json["cluster"].get(k).is_some(), "missing cluster.{k}");
        }
    }
}
