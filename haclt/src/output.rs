//! What `haclt status` and `haclt events` print: a stable JSON schema for scripts
//! (documented in `haclt/README.md`; fields are only ever added) and tables for people.

use ha_proto::types::{Epoch, Lsn};
use ha_proto::v1;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Status {
    /// True when no quorum confirmed this answer (a follower's copy, or no leader).
    pub stale: bool,
    pub answered_by: u64,
    pub groups: Vec<Group>,
    pub nodes: Vec<Node>,
    pub monitors: Vec<Monitor>,
}

#[derive(Debug, Serialize)]
pub struct Group {
    pub name: String,
    pub primary: Option<String>,
    pub epoch: u64,
    pub synchronous: bool,
    /// The operation in progress (failover, switchover) or the group's notice, if any.
    pub pending: Option<String>,
    pub sync_quorum: u32,
    pub max_sync_lag_bytes: u64,
    /// `async` or `wait`: what happens when a synchronous standby stops streaming.
    pub on_standby_loss: String,
    /// How long a primary cut off from the monitors may serve on its standbys' vouches (0: off).
    pub failsafe_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Node {
    pub name: String,
    /// `postgres` or `ejabberd`.
    pub kind: String,
    pub group: String,
    pub host: String,
    pub port: u32,
    /// The goal state the node reports having reached (`unknown` before its first report).
    pub state: String,
    /// The goal state the monitors assigned.
    pub goal: String,
    pub epoch: u64,
    pub healthy: bool,
    /// Why the node is not healthy (a silent agent, PostgreSQL not running, a standby not
    /// streaming, ejabberd down); `null` when healthy.
    pub unhealthy: Option<String>,
    pub last_report_age_ms: Option<u64>,
    pub candidate_priority: u32,
    pub replication_quorum: bool,
    pub maintenance: bool,
    pub last_error: Option<String>,
    pub postgres: Option<Postgres>,
    pub ejabberd: Option<Ejabberd>,
}

#[derive(Debug, Serialize)]
pub struct Postgres {
    /// `primary`, `standby`, `stopped` or `empty`.
    pub role: String,
    pub timeline: u32,
    /// Flush LSN in PostgreSQL form (`0/3000060`).
    pub lsn: Lsn,
    pub lag_bytes: u64,
    pub synchronous_standby_names: String,
}

#[derive(Debug, Serialize)]
pub struct Ejabberd {
    pub running: bool,
    pub applied_epoch: u64,
    pub applied_node: Option<String>,
    pub applied_target: Option<String>,
    pub applied_at_unix_ms: Option<u64>,
    pub cluster_members: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Monitor {
    pub id: u64,
    pub address: String,
    pub leader: bool,
    pub term: u64,
    pub commit_index: u64,
    pub reachable: bool,
}

fn goal_name(raw: i32) -> String {
    match ha_proto::convert::goal_state(raw, "goal") {
        Ok(g) => g.to_string(),
        Err(_) => "unknown".into(),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn pg_role(raw: i32) -> String {
    match v1::PgRole::try_from(raw) {
        Ok(v1::PgRole::Primary) => "primary",
        Ok(v1::PgRole::Standby) => "standby",
        Ok(v1::PgRole::Stopped) => "stopped",
        Ok(v1::PgRole::Empty) => "empty",
        _ => "unknown",
    }
    .into()
}

impl From<v1::StatusResponse> for Status {
    fn from(s: v1::StatusResponse) -> Self {
        Status {
            stale: s.stale,
            answered_by: s.answered_by,
            groups: s
                .groups
                .into_iter()
                .map(|g| Group {
                    name: g.name,
                    primary: non_empty(g.primary),
                    epoch: g.epoch,
                    synchronous: g.synchronous,
                    pending: non_empty(g.pending),
                    sync_quorum: g.sync_quorum,
                    max_sync_lag_bytes: g.max_sync_lag_bytes,
                    on_standby_loss: g.on_standby_loss,
                    failsafe_ms: g.failsafe_ms,
                })
                .collect(),
            nodes: s
                .nodes
                .into_iter()
                .map(|n| {
                    let endpoint = n.endpoint.unwrap_or_default();
                    Node {
                        kind: match v1::NodeKind::try_from(n.kind) {
                            Ok(v1::NodeKind::Ejabberd) => "ejabberd",
                            Ok(v1::NodeKind::Postgres) => "postgres",
                            _ => "unknown",
                        }
                        .into(),
                        state: if n.reached == 0 {
                            "unknown".into()
                        } else {
                            goal_name(n.reached)
                        },
                        goal: goal_name(n.goal),
                        name: n.name,
                        group: n.group,
                        host: endpoint.host,
                        port: endpoint.port,
                        epoch: n.epoch,
                        healthy: n.healthy,
                        unhealthy: non_empty(n.unhealthy),
                        last_report_age_ms: n.last_report_age_ms,
                        candidate_priority: n.candidate_priority,
                        replication_quorum: n.replication_quorum,
                        maintenance: n.maintenance,
                        last_error: non_empty(n.last_error),
                        postgres: n.postgres.map(|p| Postgres {
                            role: pg_role(p.role),
                            timeline: p.timeline,
                            lsn: Lsn(p.flush_lsn),
                            lag_bytes: n.lag_bytes,
                            synchronous_standby_names: p.synchronous_standby_names,
                        }),
                        ejabberd: n.ejabberd.map(|e| Ejabberd {
                            running: e.running,
                            applied_epoch: e.applied_epoch,
                            applied_node: non_empty(e.applied_node),
                            applied_target: e
                                .applied_target
                                .map(|t| format!("{}:{}", t.host, t.port)),
                            applied_at_unix_ms: (e.applied_at_unix_ms > 0)
                                .then_some(e.applied_at_unix_ms),
                            cluster_members: e.cluster_members,
                        }),
                    }
                })
                .collect(),
            monitors: s
                .monitors
                .into_iter()
                .map(|m| Monitor {
                    id: m.id,
                    address: m.address,
                    leader: m.leader,
                    term: m.term,
                    commit_index: m.commit_index,
                    reachable: m.reachable,
                })
                .collect(),
        }
    }
}

/// Why the cluster is degraded, one line each; empty when every group has a primary with a
/// synchronous standby (where it has standbys), nothing is pending and every node not in
/// maintenance is healthy. `haclt status` exits 3 when this is not empty.
pub fn degraded(s: &Status) -> Vec<String> {
    let mut why = Vec::new();
    if s.stale {
        why.push("answer not confirmed by a quorum of monitors".to_owned());
    }
    for g in &s.groups {
        let standbys = s
            .nodes
            .iter()
            .filter(|n| n.group == g.name && n.kind == "postgres" && !n.maintenance)
            .count()
            > 1;
        match &g.primary {
            None => why.push(format!("group {}: no primary", g.name)),
            Some(_) if standbys && !g.synchronous => {
                why.push(format!("group {}: no synchronous standby", g.name));
            }
            Some(_) => {}
        }
        if let Some(p) = &g.pending {
            why.push(format!("group {}: {p}", g.name));
        }
    }
    for n in s.nodes.iter().filter(|n| !n.healthy && !n.maintenance) {
        why.push(format!(
            "{} unhealthy: {}",
            n.name,
            n.unhealthy.as_deref().unwrap_or("no detail")
        ));
    }
    why
}

fn age(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 10_000 => format!("{ms}ms"),
        Some(ms) => format!("{}s", ms / 1000),
    }
}

/// The status as tables, for a terminal.
pub fn status_table(s: &Status, now_unix_ms: u64) -> String {
    use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
    let mut out = String::new();
    if s.stale {
        out.push_str(&format!(
            "(stale: answered by monitor {} without a quorum read)\n",
            s.answered_by
        ));
    }
    for g in &s.groups {
        out.push_str(&format!(
            "group {}: primary {} at {}, {} (on standby loss: {}, failsafe: {}){}\n",
            g.name,
            g.primary.as_deref().unwrap_or("(none)"),
            Epoch(g.epoch),
            if g.synchronous {
                "synchronous"
            } else {
                "asynchronous"
            },
            g.on_standby_loss,
            match g.failsafe_ms {
                0 => "off".to_owned(),
                ms => humantime::format_duration(std::time::Duration::from_millis(ms)).to_string(),
            },
            g.pending
                .as_ref()
                .map(|p| format!(", pending: {p}"))
                .unwrap_or_default()
        ));
    }
    let mut nodes = Table::new();
    nodes.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "node",
        "kind",
        "address",
        "state",
        "goal",
        "epoch",
        "tl:lsn",
        "lag",
        "healthy",
        "report",
        "db target",
    ]);
    for n in &s.nodes {
        let tl_lsn = n
            .postgres
            .as_ref()
            .map(|p| format!("{}:{}", p.timeline, p.lsn))
            .unwrap_or_else(|| "-".into());
        let lag = n
            .postgres
            .as_ref()
            .map(|p| p.lag_bytes.to_string())
            .unwrap_or_else(|| "-".into());
        let target = n
            .ejabberd
            .as_ref()
            .map(|e| {
                let since = e
                    .applied_at_unix_ms
                    .map(|at| format!(" ({} ago)", age(Some(now_unix_ms.saturating_sub(at)))))
                    .unwrap_or_default();
                format!(
                    "{} {}{since}",
                    e.applied_node.as_deref().unwrap_or("-"),
                    Epoch(e.applied_epoch)
                )
            })
            .unwrap_or_else(|| "-".into());
        let mut state = n.state.clone();
        if n.maintenance {
            state.push_str(" [maint]");
        }
        if let Some(err) = &n.last_error {
            state.push_str(&format!(" ! {err}"));
        }
        nodes.add_row(vec![
            n.name.clone(),
            n.kind.clone(),
            format!("{}:{}", n.host, n.port),
            state,
            n.goal.clone(),
            Epoch(n.epoch).to_string(),
            tl_lsn,
            lag,
            match (&n.unhealthy, n.healthy) {
                (_, true) => "yes".into(),
                (Some(why), false) => format!("NO: {why}"),
                (None, false) => "NO".into(),
            },
            age(n.last_report_age_ms),
            target,
        ]);
    }
    out.push_str(&nodes.to_string());
    out.push('\n');
    let mut monitors = Table::new();
    monitors.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "monitor",
        "address",
        "role",
        "term",
        "commit",
        "reachable",
    ]);
    for m in &s.monitors {
        monitors.add_row(vec![
            m.id.to_string(),
            m.address.clone(),
            if m.leader { "leader" } else { "follower" }.into(),
            m.term.to_string(),
            m.commit_index.to_string(),
            if m.reachable { "yes" } else { "?" }.into(),
        ]);
    }
    out.push_str(&monitors.to_string());
    out.push('\n');
    out
}

#[derive(Debug, Serialize)]
pub struct Event {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub kind: String,
    pub node: Option<String>,
    pub group: Option<String>,
    pub epoch: u64,
    pub message: String,
}

impl From<v1::Event> for Event {
    fn from(e: v1::Event) -> Self {
        Event {
            seq: e.seq,
            at_unix_ms: e.at_unix_ms,
            kind: e.kind,
            node: non_empty(e.node),
            group: non_empty(e.group),
            epoch: e.epoch,
            message: e.message,
        }
    }
}

pub fn event_line(e: &Event) -> String {
    format!(
        "#{:<5} {} {:<22} {:<12} {} {}",
        e.seq,
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at_unix_ms)
        ),
        e.kind,
        e.node.as_deref().unwrap_or("-"),
        Epoch(e.epoch),
        e.message
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> v1::StatusResponse {
        v1::StatusResponse {
            nodes: vec![v1::NodeStatus {
                name: "psql1".into(),
                kind: v1::NodeKind::Postgres.into(),
                group: "main".into(),
                endpoint: Some(v1::Endpoint {
                    host: "127.0.0.1".into(),
                    port: 5432,
                }),
                goal: v1::GoalState::Primary.into(),
                reached: v1::GoalState::Primary.into(),
                epoch: 3,
                healthy: true,
                last_report_age_ms: Some(120),
                postgres: Some(v1::PostgresObservation {
                    role: v1::PgRole::Primary.into(),
                    timeline: 2,
                    flush_lsn: 0x300_0060,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            monitors: vec![v1::MonitorStatus {
                id: 1,
                address: "127.0.0.1:7400".into(),
                leader: true,
                term: 4,
                ..Default::default()
            }],
            groups: vec![],
            stale: false,
            answered_by: 1,
        }
    }

    #[test]
    fn json_schema_has_the_documented_fields() {
        let v = serde_json::to_value(Status::from(sample())).unwrap();
        let n = &v["nodes"][0];
        assert_eq!(n["name"], "psql1");
        assert_eq!(n["kind"], "postgres");
        assert_eq!(n["state"], "primary");
        assert_eq!(n["goal"], "primary");
        assert_eq!(n["epoch"], 3);
        assert_eq!(n["healthy"], true);
        assert_eq!(n["postgres"]["lsn"], "0/3000060");
        let m = &v["monitors"][0];
        assert_eq!(
            (m["id"].as_u64(), m["leader"].as_bool()),
            (Some(1), Some(true))
        );
        assert_eq!(m["address"], "127.0.0.1:7400");
    }

    fn with_group(synchronous: bool, primary: &str) -> v1::StatusResponse {
        let mut s = sample();
        s.groups.push(v1::GroupStatus {
            name: "main".into(),
            primary: primary.into(),
            epoch: 3,
            synchronous,
            on_standby_loss: "async".into(),
            ..Default::default()
        });
        let mut standby = s.nodes[0].clone();
        standby.name = "psql2".into();
        standby.group = "main".into();
        s.nodes[0].group = "main".into();
        s.nodes.push(standby);
        s
    }

    #[test]
    fn degraded_names_every_reason_and_nothing_when_healthy() {
        assert_eq!(
            degraded(&Status::from(with_group(true, "psql1"))),
            Vec::<String>::new()
        );
        let mut s = with_group(false, "");
        s.nodes[1].healthy = false;
        s.nodes[1].unhealthy = "agent silent: no report for 15s, probe answers".into();
        let why = degraded(&Status::from(s.clone()));
        assert_eq!(
            why,
            vec![
                "group main: no primary".to_owned(),
                "psql2 unhealthy: agent silent: no report for 15s, probe answers".to_owned(),
            ]
        );
        let table = status_table(&Status::from(s.clone()), 0);
        assert!(table.contains("NO: agent silent"), "{table}");
        // A node in maintenance is expected to be down.
        s.nodes[1].maintenance = true;
        s.groups[0].primary = "psql1".into();
        assert_eq!(degraded(&Status::from(s)), Vec::<String>::new());
        let why = degraded(&Status::from(with_group(false, "psql1")));
        assert_eq!(why, vec!["group main: no synchronous standby".to_owned()]);
    }

    #[test]
    fn table_shows_nodes_and_monitors() {
        let t = status_table(&Status::from(sample()), 0);
        assert!(
            t.contains("psql1") && t.contains("2:0/3000060") && t.contains("leader"),
            "{t}"
        );
    }
}
