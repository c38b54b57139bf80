//! The operator's one screen: the catalog, the leader's observations and the Raft status folded
//! into a `StatusResponse`. Pure, so its rules (health, lag) are tested without a cluster.

use std::time::Duration;

use std::collections::BTreeMap;

use ha_proto::types::{Lsn, NodeId};
use ha_proto::v1;

use crate::catalog::{Catalog, Event};
use crate::consensus::RaftStatus;
use crate::decide::{self, Observations, PgRole};

pub fn event(e: &Event) -> v1::Event {
    v1::Event {
        seq: e.seq,
        at_unix_ms: e.at_unix_ms,
        kind: e.kind.clone(),
        node: e.node.as_ref().map(ToString::to_string).unwrap_or_default(),
        group: e.group.clone().unwrap_or_default(),
        epoch: e.epoch.get(),
        message: e.message.clone(),
    }
}

/// While ejabberd nodes have not applied the group's epoch, the failover is not complete for
/// the XMPP service: say which. Only the leader holds reports (`stale` answers say nothing).
fn ejabberd_pending(
    catalog: &Catalog,
    obs: &Observations,
    group: &str,
    epoch: ha_proto::Epoch,
    stale: bool,
) -> Option<String> {
    if stale {
        return None;
    }
    let behind = decide::ejabberd_behind(catalog, obs, group);
    (!behind.is_empty()).then(|| {
        let names: Vec<String> = behind.iter().map(ToString::to_string).collect();
        format!(
            "ejabberd not yet on the primary of {epoch}: {}",
            names.join(", ")
        )
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Builds the status answer. `obs` is empty on a follower (it holds no reports), which shows
/// as unknown report ages rather than as failures; `raw` holds each node's last report as sent
/// (for the details the decision function does not need).
pub fn build(
    catalog: &Catalog,
    obs: &Observations,
    raw: &BTreeMap<NodeId, v1::ObservedState>,
    now: Duration,
    raft: &RaftStatus,
    stale: bool,
) -> v1::StatusResponse {
    let groups = catalog
        .groups()
        .map(|g| v1::GroupStatus {
            name: g.name.clone(),
            primary: g
                .primary
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            epoch: g.epoch.get(),
            synchronous: g.synchronous(),
            pending: g
                .operation
                .as_ref()
                .map(|op| op.describe())
                .or_else(|| g.notice.clone())
                .or_else(|| ejabberd_pending(catalog, obs, &g.name, g.epoch, stale))
                .unwrap_or_default(),
            sync_quorum: g.settings.sync_quorum,
            max_sync_lag_bytes: g.settings.max_sync_lag_bytes,
            on_standby_loss: g.settings.on_standby_loss.as_str().into(),
            failsafe_ms: g.settings.failsafe_ms,
        })
        .collect();

    let primary_flush = |group: &str| -> Option<Lsn> {
        let primary = catalog.group(group)?.primary.as_ref()?;
        let report = obs.node(primary)?.report.as_ref()?;
        report.pg().map(|p| p.flush_lsn)
    };

    let nodes = catalog
        .nodes()
        .filter(|n| !n.removed)
        .map(|n| {
            let o = obs.node(&n.name);
            let report = o.and_then(|o| o.report.as_ref());
            let wire = raw.get(&n.name);
            let pg = report.and_then(|r| r.pg());
            let lag_bytes = match (pg, primary_flush(&n.group)) {
                (Some(p), Some(primary)) if p.role == PgRole::Standby => {
                    p.flush_lsn.bytes_behind(primary)
                }
                _ => 0,
            };
            let goal = n.goal.as_ref();
            let unhealthy = decide::node_unhealthy(catalog, obs, now, &n.name);
            v1::NodeStatus {
                name: n.name.to_string(),
                kind: v1::NodeKind::from(n.kind).into(),
                group: n.group.clone(),
                endpoint: Some(n.endpoint.clone().into()),
                goal: goal.map_or(0, |g| v1::GoalState::from(g.state).into()),
                reached: report
                    .and_then(|r| r.reached)
                    .map_or(0, |s| v1::GoalState::from(s).into()),
                epoch: goal.map_or(0, |g| g.epoch.get()),
                healthy: unhealthy.is_none(),
                unhealthy: unhealthy.unwrap_or_default(),
                last_report_age_ms: o
                    .and_then(|o| o.report_at)
                    .map(|at| millis(now.saturating_sub(at))),
                candidate_priority: n.candidate_priority,
                replication_quorum: n.replication_quorum,
                maintenance: n.maintenance,
                step: wire.map(|w| w.step.clone()).unwrap_or_default(),
                last_error: report.map(|r| r.last_error.clone()).unwrap_or_default(),
                postgres: match wire.and_then(|w| w.detail.as_ref()) {
                    Some(v1::observed_state::Detail::Postgres(p)) => Some(p.clone()),
                    _ => None,
                },
                ejabberd: match wire.and_then(|w| w.detail.as_ref()) {
                    Some(v1::observed_state::Detail::Ejabberd(e)) => Some(e.clone()),
                    _ => None,
                },
                lag_bytes,
            }
        })
        .collect();

    let monitors = raft
        .members
        .iter()
        .map(|(id, address)| v1::MonitorStatus {
            id: *id,
            address: address.clone(),
            leader: *id == raft.leader_id,
            term: raft.term,
            commit_index: if *id == raft.id {
                raft.commit_index
            } else {
                raft.matched.get(id).copied().unwrap_or_default()
            },
            applied_index: if *id == raft.id {
                raft.applied_index
            } else {
                0
            },
            reachable: *id == raft.id || raft.matched.contains_key(id),
        })
        .collect();

    v1::StatusResponse {
        nodes,
        monitors,
        groups,
        stale,
        answered_by: raft.id,
    }
}
