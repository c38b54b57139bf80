//! The leader's soft state, as the decision function reads it: the last report of each agent
//! with when it arrived, and the leader's own probe of each PostgreSQL port.
//!
//! Times are `Duration`s on one monotonic clock chosen by the leader (for example
//! `tokio::time::Instant` minus the process start), so tests construct them directly. Nothing
//! here is replicated: a new leader starts with empty observations and its own `leader_since`.

use std::time::Duration;

use ha_proto::convert::{self, WireError};
use ha_proto::types::{Epoch, GoalState, Lsn, NodeId, Timeline};
use ha_proto::v1;

/// What the leader holds about all nodes.
///
/// The map is persistent (`imbl`): the decide loop takes a copy every tick while reports keep
/// arriving, and a copy costs O(1) instead of duplicating every node's last report under the
/// lock the report handlers wait on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    /// When this monitor became leader: no node is judged on silence before a full
    /// `unhealthy_after` has passed since.
    pub leader_since: Duration,
    pub nodes: imbl::OrdMap<NodeId, NodeObservation>,
}

impl Observations {
    pub fn new(leader_since: Duration) -> Self {
        Self {
            leader_since,
            nodes: imbl::OrdMap::new(),
        }
    }

    pub fn node(&self, id: &NodeId) -> Option<&NodeObservation> {
        self.nodes.get(id)
    }

    /// Records a report that arrived at `at`; true when it says something new (not only that
    /// the agent is alive).
    pub fn record_report(&mut self, report: Report, at: Duration) -> bool {
        let entry = self.nodes.entry(report.node.clone()).or_default();
        entry.report_at = Some(at);
        entry.down_since = match (report.pg_down(), entry.down_since) {
            (false, _) => None,
            (true, since) => since.or(Some(at)),
        };
        entry.not_streaming_since =
            match (report.standby_not_streaming(), entry.not_streaming_since) {
                (false, _) => None,
                (true, since) => since.or(Some(at)),
            };
        let changed = entry.report.as_ref() != Some(&report);
        if changed {
            entry.report = Some(report);
            entry.revision += 1;
        }
        changed
    }

    /// Records the result of a probe of `node`'s PostgreSQL port finished at `at`.
    /// True when the result differs from the previous probe's.
    pub fn record_probe(&mut self, node: NodeId, result: ProbeResult, at: Duration) -> bool {
        let probe = &mut self.nodes.entry(node).or_default().probe;
        let changed = probe.is_none_or(|p| p.result != result);
        *probe = Some(Probe { result, at });
        changed
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeObservation {
    /// Bumped whenever `report` changes (an identical report only moves `report_at`), so the
    /// decide loop can tell an unchanged node without comparing reports. Probes and report
    /// times reach decisions only through the judgements of `Judge::time`, which the decide
    /// loop compares itself.
    pub revision: u64,
    pub report: Option<Report>,
    pub report_at: Option<Duration>,
    pub probe: Option<Probe>,
    /// Since when the agent's reports say its PostgreSQL is not running (see
    /// [`Report::pg_down`]); `None` while it runs. Reports change with this, so no revision
    /// is needed: `decide` reads it through `Judge::time`.
    pub down_since: Option<Duration>,
    /// Since when the agent's reports show a running standby whose WAL receiver is not
    /// streaming; `None` otherwise.
    pub not_streaming_since: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub result: ProbeResult,
    pub at: Duration,
}

/// The leader's own check of a PostgreSQL port (connect, then an SSLRequest answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    Ok,
    /// Connection refused: the host answers, nothing listens (PostgreSQL is down).
    Refused,
    /// No answer: host down, frozen or partitioned; says nothing about PostgreSQL.
    Timeout,
}

/// One agent report in domain form.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub node: NodeId,
    pub epoch: Epoch,
    pub reached: Option<GoalState>,
    pub last_error: String,
    pub detail: ReportDetail,
    /// A standby still bound by a vouch for its primary (the failsafe): it acts on no other
    /// goal until the vouch ends.
    pub vouching: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReportDetail {
    Postgres(PgReport),
    Ejabberd(EjabberdReport),
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgRole {
    Stopped,
    Primary,
    Standby,
    Empty,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PgReport {
    pub role: PgRole,
    pub timeline: Timeline,
    pub write_lsn: Lsn,
    pub flush_lsn: Lsn,
    pub replay_lsn: Lsn,
    pub read_only: bool,
    pub replicas: Vec<Replica>,
    pub synchronous_standby_names: String,
    pub streaming: bool,
    pub upstream_node: Option<NodeId>,
    /// The postmaster started a moment ago: its standbys are still reconnecting.
    pub recently_started: bool,
    /// Primary: the agent's own commit did not complete within its bound.
    pub commits_blocked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    Async,
    Potential,
    Sync,
    Quorum,
}

/// A row of the primary's `pg_stat_replication`; `name` is the standby's `application_name`.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub name: String,
    pub state: String,
    pub sync_state: SyncState,
    pub flush_lsn: Lsn,
}

impl Replica {
    pub fn is_streaming(&self) -> bool {
        self.state == "streaming"
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EjabberdReport {
    pub running: bool,
    pub applied_epoch: Epoch,
    pub applied_node: Option<NodeId>,
}

impl Report {
    /// The agent says its PostgreSQL does not run: stopped, or no usable data directory on a
    /// node that had reached a goal before (a node still being created has not).
    pub fn pg_down(&self) -> bool {
        self.pg().is_some_and(|pg| match pg.role {
            PgRole::Stopped => true,
            PgRole::Empty => self.reached.is_some(),
            PgRole::Primary | PgRole::Standby => false,
        })
    }

    /// The agent says its PostgreSQL runs as a standby whose WAL receiver does not stream.
    pub fn standby_not_streaming(&self) -> bool {
        self.pg()
            .is_some_and(|pg| pg.role == PgRole::Standby && !pg.streaming)
    }

    pub fn pg(&self) -> Option<&PgReport> {
        match &self.detail {
            ReportDetail::Postgres(p) => Some(p),
            _ => None,
        }
    }

    pub fn ejabberd(&self) -> Option<&EjabberdReport> {
        match &self.detail {
            ReportDetail::Ejabberd(e) => Some(e),
            _ => None,
        }
    }
}

fn optional_node(value: &str, field: &'static str) -> Result<Option<NodeId>, WireError> {
    if value.is_empty() {
        Ok(None)
    } else {
        convert::node_id(value, field).map(Some)
    }
}

fn sync_state(raw: i32) -> Result<SyncState, WireError> {
    match v1::SyncState::try_from(raw) {
        Ok(v1::SyncState::Async) => Ok(SyncState::Async),
        Ok(v1::SyncState::Potential) => Ok(SyncState::Potential),
        Ok(v1::SyncState::Sync) => Ok(SyncState::Sync),
        Ok(v1::SyncState::Quorum) => Ok(SyncState::Quorum),
        Ok(v1::SyncState::Unspecified) => Err(WireError::Missing {
            field: "replicas.sync_state",
        }),
        Err(_) => Err(WireError::UnknownEnum {
            field: "replicas.sync_state",
            value: raw,
        }),
    }
}

fn pg_role(raw: i32) -> Result<PgRole, WireError> {
    match v1::PgRole::try_from(raw) {
        Ok(v1::PgRole::Stopped) => Ok(PgRole::Stopped),
        Ok(v1::PgRole::Primary) => Ok(PgRole::Primary),
        Ok(v1::PgRole::Standby) => Ok(PgRole::Standby),
        Ok(v1::PgRole::Empty) => Ok(PgRole::Empty),
        Ok(v1::PgRole::Unspecified) => Err(WireError::Missing {
            field: "postgres.role",
        }),
        Err(_) => Err(WireError::UnknownEnum {
            field: "postgres.role",
            value: raw,
        }),
    }
}

impl TryFrom<v1::PostgresObservation> for PgReport {
    type Error = WireError;
    fn try_from(p: v1::PostgresObservation) -> Result<Self, Self::Error> {
        Ok(PgReport {
            role: pg_role(p.role)?,
            timeline: Timeline(p.timeline),
            write_lsn: Lsn(p.write_lsn),
            flush_lsn: Lsn(p.flush_lsn),
            replay_lsn: Lsn(p.replay_lsn),
            read_only: p.read_only,
            replicas: p
                .replicas
                .into_iter()
                .map(|r| {
                    Ok(Replica {
                        sync_state: sync_state(r.sync_state)?,
                        name: r.application_name,
                        state: r.state,
                        flush_lsn: Lsn(r.flush_lsn),
                    })
                })
                .collect::<Result<_, WireError>>()?,
            synchronous_standby_names: p.synchronous_standby_names,
            streaming: p.streaming,
            upstream_node: optional_node(&p.upstream_node, "postgres.upstream_node")?,
            recently_started: p.recently_started,
            commits_blocked: p.commits_blocked,
        })
    }
}

impl TryFrom<v1::ObservedState> for Report {
    type Error = WireError;
    fn try_from(o: v1::ObservedState) -> Result<Self, Self::Error> {
        let reached = if o.reached == 0 {
            None
        } else {
            Some(convert::goal_state(o.reached, "observed.reached")?)
        };
        let detail = match o.detail {
            Some(v1::observed_state::Detail::Postgres(p)) => ReportDetail::Postgres(p.try_into()?),
            Some(v1::observed_state::Detail::Ejabberd(e)) => {
                ReportDetail::Ejabberd(EjabberdReport {
                    running: e.running,
                    applied_epoch: Epoch(e.applied_epoch),
                    applied_node: optional_node(&e.applied_node, "ejabberd.applied_node")?,
                })
            }
            None => ReportDetail::None,
        };
        Ok(Report {
            node: convert::node_id(&o.node, "observed.node")?,
            epoch: Epoch(o.epoch),
            reached,
            last_error: o.last_error,
            detail,
            vouching: o.vouch_left_ms > 0,
        })
    }
}

/// The canonical `synchronous_standby_names` for a set: `ANY k ("a", "b")`, empty when
/// asynchronous. Agents should write exactly this.
pub fn sync_standby_names(standbys: &[NodeId], quorum: u32) -> String {
    if standbys.is_empty() {
        return String::new();
    }
    let names: Vec<String> = standbys.iter().map(|n| format!("\"{n}\"")).collect();
    format!("ANY {quorum} ({})", names.join(", "))
}

/// Parses PostgreSQL's `synchronous_standby_names` into (quorum, sorted names): accepts
/// `ANY k (...)`, `FIRST k (...)`, `k (...)` and a bare list (meaning `FIRST 1`), names quoted
/// or not. `None` when it cannot be understood, `Some((0, []))` when empty.
pub fn parse_sync_standby_names(text: &str) -> Option<(u32, Vec<String>)> {
    let t = text.trim();
    if t.is_empty() {
        return Some((0, Vec::new()));
    }
    let (quorum, list) = match t.find('(') {
        Some(open) => {
            let head = t[..open].trim();
            let body = t[open + 1..].strip_suffix(')')?;
            let number = head
                .strip_prefix("ANY")
                .or_else(|| head.strip_prefix("any"))
                .or_else(|| head.strip_prefix("FIRST"))
                .or_else(|| head.strip_prefix("first"))
                .unwrap_or(head)
                .trim();
            (number.parse().ok()?, body)
        }
        None => (1, t),
    };
    let mut names: Vec<String> = list
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_owned())
        .collect();
    if names.iter().any(String::is_empty) {
        return None;
    }
    names.sort();
    Some((quorum, names))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sync_names_round_trip_and_parse_postgres_forms() {
        let a = NodeId::new("b").unwrap();
        let b = NodeId::new("a").unwrap();
        let text = sync_standby_names(&[a, b], 1);
        assert_eq!(text, "ANY 1 (\"b\", \"a\")");
        assert_eq!(
            parse_sync_standby_names(&text),
            Some((1, vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            parse_sync_standby_names("FIRST 2 (x, y)"),
            Some((2, vec!["x".into(), "y".into()]))
        );
        assert_eq!(parse_sync_standby_names("x"), Some((1, vec!["x".into()])));
        assert_eq!(parse_sync_standby_names(""), Some((0, vec![])));
        assert_eq!(parse_sync_standby_names("ANY z (x)"), None);
        assert_eq!(parse_sync_standby_names("ANY 1 (x,)"), None);
    }

    #[test]
    fn wire_reports_convert_and_reject_bad_enums() {
        let wire = v1::ObservedState {
            node: "p1".into(),
            kind: v1::NodeKind::Postgres.into(),
            epoch: 3,
            reached: v1::GoalState::Primary.into(),
            detail: Some(v1::observed_state::Detail::Postgres(
                v1::PostgresObservation {
                    role: v1::PgRole::Primary.into(),
                    flush_lsn: 42,
                    replicas: vec![v1::ReplicationPeer {
                        application_name: "p2".into(),
                        state: "streaming".into(),
                        sync_state: v1::SyncState::Quorum.into(),
                        flush_lsn: 40,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let r = Report::try_from(wire.clone()).unwrap();
        assert_eq!(r.reached, Some(GoalState::Primary));
        let pg = r.pg().unwrap();
        assert_eq!(pg.flush_lsn, Lsn(42));
        assert!(pg.replicas[0].is_streaming());
        assert_eq!(pg.replicas[0].sync_state, SyncState::Quorum);

        let mut bad = wire;
        if let Some(v1::observed_state::Detail::Postgres(p)) = bad.detail.as_mut() {
            p.role = 99;
        }
        assert_eq!(
            Report::try_from(bad).unwrap_err(),
            WireError::UnknownEnum {
                field: "postgres.role",
                value: 99
            }
        );
    }
}
