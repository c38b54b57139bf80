//! `GET /metrics` on the monitor port (HTTP/1.1 or HTTP/2, the same TLS; a client certificate
//! of the cluster CA is required, an `observer` one for Prometheus): the Prometheus text format,
//! every name prefixed `ha_monitor_`.
//!
//! Raft as this monitor sees it (term, commit and applied index, leader or not, members, leader
//! changes seen), its proposals (by result, and how long they took to commit), the decisions it
//! committed as leader by kind, and per group what `haclt status` shows (epoch, whether there is
//! a primary and a synchronous standby, healthy and unhealthy nodes). Counters count from the
//! process start; the group figures come from the catalog this monitor holds, so every monitor
//! shows them and the leader's are the current ones (`ha_monitor_raft_leader == 1`).

use std::sync::atomic::AtomicU64;

use ha_proto::v1;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::consensus::RaftStatus;

/// The content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// What the monitor counts over the life of the process (shared by clones).
#[derive(Debug, Clone)]
pub struct Counters {
    leader_changes: Counter,
    proposals: Family<Labels, Counter>,
    proposal_seconds: Histogram,
    decisions: Family<Labels, Counter>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            leader_changes: Counter::default(),
            proposals: Family::default(),
            // 0.5 ms to about 4 s.
            proposal_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            decisions: Family::default(),
        }
    }
}

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_owned(), value.to_owned())]
}

impl Counters {
    /// The Raft leader this monitor sees changed.
    pub fn leader_changed(&self) {
        self.leader_changes.inc();
    }

    /// A proposal ended with `result` (`committed`, `rejected`, `failed`) after `seconds`.
    pub fn proposal(&self, result: &str, seconds: f64) {
        self.proposals.get_or_create(&label("result", result)).inc();
        self.proposal_seconds.observe(seconds);
    }

    /// The leader committed a decision with an event of `kind` (`goal`, `promoted`, ...).
    pub fn decision(&self, kind: &str) {
        self.decisions.get_or_create(&label("kind", kind)).inc();
    }
}

/// The exposition of `raft`, the groups and nodes of `status` and the `counters`.
pub fn render(raft: &RaftStatus, status: &v1::StatusResponse, counters: &Counters) -> String {
    let mut registry = Registry::with_prefix("ha_monitor");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let g = Gauge::<f64, AtomicU64>::default();
        #[allow(clippy::cast_precision_loss)]
        g.set(value as f64);
        registry.register(name, help, g);
    };
    gauge(&mut registry, "raft_term", "Raft term", raft.term);
    gauge(
        &mut registry,
        "raft_commit_index",
        "Raft commit index",
        raft.commit_index,
    );
    gauge(
        &mut registry,
        "raft_applied_index",
        "Raft index applied to the catalog",
        raft.applied_index,
    );
    gauge(
        &mut registry,
        "raft_leader",
        "1 when this monitor is the Raft leader",
        u64::from(raft.is_leader),
    );
    gauge(
        &mut registry,
        "raft_has_leader",
        "1 when this monitor knows a Raft leader",
        u64::from(raft.leader_id != 0),
    );
    gauge(
        &mut registry,
        "raft_members",
        "Members of the Raft group",
        raft.members.len() as u64,
    );
    registry.register(
        "raft_leader_changes",
        "Changes of the Raft leader this monitor saw",
        counters.leader_changes.clone(),
    );
    registry.register(
        "proposals",
        "Proposals by result",
        counters.proposals.clone(),
    );
    registry.register(
        "proposal_seconds",
        "Time from a proposal to its commit (or failure)",
        counters.proposal_seconds.clone(),
    );
    registry.register(
        "decisions",
        "Decisions this monitor committed as leader, by event kind",
        counters.decisions.clone(),
    );

    let per_group =
        |registry: &mut Registry, name: &str, help: &str, f: &dyn Fn(&v1::GroupStatus) -> u64| {
            let family = Family::<Labels, Gauge>::default();
            for g in &status.groups {
                family
                    .get_or_create(&label("group", &g.name))
                    .set(i64::try_from(f(g)).unwrap_or(i64::MAX));
            }
            registry.register(name, help, family);
        };
    per_group(&mut registry, "group_epoch", "The group's epoch", &|g| {
        g.epoch
    });
    per_group(
        &mut registry,
        "group_has_primary",
        "1 when the group has a primary",
        &|g| u64::from(!g.primary.is_empty()),
    );
    per_group(
        &mut registry,
        "group_synchronous",
        "1 when the group's primary has its synchronous standbys",
        &|g| u64::from(g.synchronous),
    );
    let nodes = Family::<Labels, Gauge>::default();
    for g in &status.groups {
        for healthy in [true, false] {
            let n = status
                .nodes
                .iter()
                .filter(|n| n.group == g.name && n.healthy == healthy)
                .count();
            nodes
                .get_or_create(&vec![
                    ("group".to_owned(), g.name.clone()),
                    (
                        "health".to_owned(),
                        if healthy { "healthy" } else { "unhealthy" }.to_owned(),
                    ),
                ])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    registry.register("nodes", "Nodes of each group by health", nodes);
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn raft_groups_and_counters_are_exposed() {
        let raft = RaftStatus {
            id: 1,
            leader_id: 1,
            term: 3,
            is_leader: true,
            commit_index: 42,
            applied_index: 41,
            ..RaftStatus::default()
        };
        let status = v1::StatusResponse {
            groups: vec![v1::GroupStatus {
                name: "main".into(),
                primary: "psql1".into(),
                epoch: 2,
                synchronous: true,
                ..Default::default()
            }],
            nodes: vec![
                v1::NodeStatus {
                    name: "psql1".into(),
                    group: "main".into(),
                    healthy: true,
                    ..Default::default()
                },
                v1::NodeStatus {
                    name: "psql2".into(),
                    group: "main".into(),
                    healthy: false,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let counters = Counters::default();
        counters.leader_changed();
        counters.proposal("committed", 0.002);
        counters.decision("promoted");
        let text = render(&raft, &status, &counters);
        for line in [
            "ha_monitor_raft_term 3.0\n",
            "ha_monitor_raft_commit_index 42.0\n",
            "ha_monitor_raft_leader 1.0\n",
            "ha_monitor_raft_leader_changes_total 1\n",
            "ha_monitor_proposals_total{result=\"committed\"} 1\n",
            "ha_monitor_proposal_seconds_count 1\n",
            "ha_monitor_decisions_total{kind=\"promoted\"} 1\n",
            "ha_monitor_group_epoch{group=\"main\"} 2\n",
            "ha_monitor_group_has_primary{group=\"main\"} 1\n",
            "ha_monitor_group_synchronous{group=\"main\"} 1\n",
            "ha_monitor_nodes{group=\"main\",health=\"healthy\"} 1\n",
            "ha_monitor_nodes{group=\"main\",health=\"unhealthy\"} 1\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }
}
