//! What the agent reports about its server: [`PgObservation`], read over the unix socket from a
//! running server or from `pg_controldata` when it is stopped, and its wire form.
//!
//! Invariants: LSNs are read as text and parsed into [`Lsn`] (one parser for every source);
//! a value the server does not have (a standby that never received WAL) is `None`, never zero
//! dressed up as a position.

use ha_proto::types::Lsn;
use ha_proto::v1;
use ha_proto::{NodeId, Timeline};
use tokio_postgres::Client;

use super::PgError;
use super::config::UPSTREAM_GUC;
use super::files::{ClusterState, ControlData};
use super::plan::{Local, Stopped, WasRole};

/// The server's role as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerRole {
    Empty,
    Stopped(Stopped),
    Primary,
    Standby,
}

/// `pg_stat_replication.sync_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    Async,
    Potential,
    Sync,
    Quorum,
}

/// One `pg_stat_replication` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub application_name: String,
    pub state: String,
    pub sync_state: Option<SyncState>,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
}

/// Everything the agent knows about its server at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgObservation {
    pub role: ServerRole,
    pub timeline: Option<Timeline>,
    pub system_identifier: Option<u64>,
    /// Primary: `pg_current_wal_lsn`; standby: WAL written by the receiver; stopped: the last
    /// checkpoint (for a clean stop, the end of WAL).
    pub write_lsn: Option<Lsn>,
    /// Primary: `pg_current_wal_flush_lsn`; standby: the end of the WAL it holds durably,
    /// `pg_last_wal_receive_lsn` or `pg_last_wal_replay_lsn` when that is further: a WAL
    /// receiver (re)starts at the beginning of a segment, behind WAL already on disk and
    /// replayed (after a restart or a rewind), and reports that start until new WAL arrives.
    pub flush_lsn: Option<Lsn>,
    /// Primary: as flush; standby: `pg_last_wal_replay_lsn`.
    pub replay_lsn: Option<Lsn>,
    /// Not in recovery but `default_transaction_read_only` is on.
    pub read_only: bool,
    pub replicas: Vec<Replica>,
    pub synchronous_standby_names: String,
    /// Standby: the WAL receiver reports `streaming`.
    pub streaming: bool,
    /// Standby: the upstream named in the managed settings.
    pub upstream_node: Option<NodeId>,
    /// `server_version_num`, 0 when stopped.
    pub server_version: u32,
    /// The postmaster started less than [`RECENT_START`] ago.
    pub recently_started: bool,
    /// Standby: bytes between the end of WAL its upstream last reported (`latest_end_lsn` of
    /// the WAL receiver) and what it has replayed; `None` when not receiving.
    pub lag_bytes: Option<u64>,
}

/// How long after its start a postmaster counts as just started: long enough for a standby's
/// WAL receiver to reconnect (it retries every `wal_retrieve_retry_interval`, 1 s, and gives up
/// on a connection after 2 s), as long as the replication timeout (5 s), so a restarted primary
/// makes commits wait no longer than a cut link does.
pub const RECENT_START: &str = "5 seconds";

impl PgObservation {
    fn blank(role: ServerRole) -> Self {
        Self {
            role,
            timeline: None,
            system_identifier: None,
            write_lsn: None,
            flush_lsn: None,
            replay_lsn: None,
            read_only: false,
            replicas: Vec::new(),
            synchronous_standby_names: String::new(),
            streaming: false,
            upstream_node: None,
            server_version: 0,
            recently_started: false,
            lag_bytes: None,
        }
    }

    pub fn empty() -> Self {
        Self::blank(ServerRole::Empty)
    }

    /// A stopped server, from its control file; `fenced_primary` (the agent's fence marker)
    /// overrides what the control file says about its last role.
    pub fn stopped(control: &ControlData, standby_signal: bool, fenced_primary: bool) -> Self {
        let (was, clean) = match &control.state {
            ClusterState::ShutDown => (WasRole::Primary, true),
            ClusterState::InProduction => (WasRole::Primary, false),
            ClusterState::ShutDownInRecovery => (WasRole::Standby, true),
            ClusterState::InArchiveRecovery => (WasRole::Standby, false),
            // Crashed while starting or stopping: standby.signal is the best hint left.
            ClusterState::Other(_) if standby_signal => (WasRole::Standby, false),
            ClusterState::Other(_) => (WasRole::Primary, false),
        };
        let was = if fenced_primary {
            WasRole::Primary
        } else {
            was
        };
        Self {
            timeline: Some(control.checkpoint_timeline),
            system_identifier: Some(control.system_identifier),
            write_lsn: Some(control.checkpoint_lsn),
            flush_lsn: Some(control.checkpoint_lsn),
            replay_lsn: Some(control.checkpoint_lsn),
            ..Self::blank(ServerRole::Stopped(Stopped {
                was,
                clean,
                standby_signal,
            }))
        }
    }

    /// Reads a running server.
    pub async fn query(client: &Client) -> Result<Self, PgError> {
        let sql = |what: &'static str| move |e| PgError::Sql { what, source: e };
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int, \
                 current_setting('synchronous_standby_names'), \
                 current_setting('default_transaction_read_only') = 'on', \
                 (SELECT system_identifier FROM pg_control_system()), \
                 coalesce(current_setting($1, true), ''), \
                 pg_postmaster_start_time() > now() - $2::text::interval",
                &[&UPSTREAM_GUC, &RECENT_START],
            )
            .await
            .map_err(sql("reading the server state"))?;
        let in_recovery: bool = row.get(0);
        let version: i32 = row.get(1);
        let upstream: String = row.get(5);
        let mut obs = Self {
            read_only: !in_recovery && row.get::<_, bool>(3),
            synchronous_standby_names: row.get(2),
            system_identifier: Some(row.get::<_, i64>(4).cast_unsigned()),
            server_version: u32::try_from(version).unwrap_or_default(),
            upstream_node: NodeId::new(upstream).ok(),
            recently_started: row.get(6),
            ..Self::blank(if in_recovery {
                ServerRole::Standby
            } else {
                ServerRole::Primary
            })
        };
        if in_recovery {
            let row = client
                .query_one(
                    "SELECT r.written_lsn::text, pg_last_wal_receive_lsn()::text, \
                     pg_last_wal_replay_lsn()::text, coalesce(r.status = 'streaming', false), \
                     coalesce(r.received_tli, c.timeline_id)::bigint, r.latest_end_lsn::text \
                     FROM pg_control_checkpoint() c LEFT JOIN pg_stat_wal_receiver r ON true",
                    &[],
                )
                .await
                .map_err(sql("reading the standby positions"))?;
            obs.replay_lsn = lsn(row.get(2))?;
            obs.flush_lsn = lsn(row.get(1))?.max(obs.replay_lsn);
            obs.write_lsn = lsn(row.get(0))?.max(obs.flush_lsn);
            obs.streaming = row.get(3);
            obs.timeline = timeline(row.get(4));
            obs.lag_bytes = lsn(row.get(5))?
                .zip(obs.replay_lsn)
                .map(|(end, replayed)| end.0.saturating_sub(replayed.0));
        } else {
            let row = client
                .query_one(
                    "SELECT pg_current_wal_lsn()::text, pg_current_wal_flush_lsn()::text, \
                     ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint",
                    &[],
                )
                .await
                .map_err(sql("reading the primary positions"))?;
            obs.write_lsn = lsn(row.get(0))?;
            obs.flush_lsn = lsn(row.get(1))?;
            obs.replay_lsn = obs.flush_lsn;
            obs.timeline = timeline(row.get(2));
            // A primary has no upstream, whatever a stale setting says.
            obs.upstream_node = None;
        }
        let rows = client
            .query(
                "SELECT application_name, coalesce(state, ''), sync_state, write_lsn::text, \
                 flush_lsn::text, replay_lsn::text FROM pg_stat_replication \
                 ORDER BY application_name",
                &[],
            )
            .await
            .map_err(sql("reading pg_stat_replication"))?;
        for r in rows {
            obs.replicas.push(Replica {
                application_name: r.get(0),
                state: r.get(1),
                sync_state: match r.get::<_, Option<&str>>(2) {
                    Some("async") => Some(SyncState::Async),
                    Some("potential") => Some(SyncState::Potential),
                    Some("sync") => Some(SyncState::Sync),
                    Some("quorum") => Some(SyncState::Quorum),
                    _ => None,
                },
                write_lsn: lsn(r.get(3))?,
                flush_lsn: lsn(r.get(4))?,
                replay_lsn: lsn(r.get(5))?,
            });
        }
        Ok(obs)
    }

    /// The input of [`super::plan::plan`].
    pub fn local(&self) -> Local {
        match self.role {
            ServerRole::Empty => Local::Empty,
            ServerRole::Stopped(s) => Local::Stopped(s),
            ServerRole::Primary => Local::Primary {
                synchronous_standby_names: self.synchronous_standby_names.clone(),
            },
            ServerRole::Standby => Local::Standby {
                upstream: self.upstream_node.clone(),
                streaming: self.streaming,
            },
        }
    }
}

fn lsn(text: Option<String>) -> Result<Option<Lsn>, PgError> {
    text.map(|t| t.parse().map_err(PgError::Parse)).transpose()
}

fn timeline(raw: Option<i64>) -> Option<Timeline> {
    raw.and_then(|t| u32::try_from(t).ok()).map(Timeline)
}

impl From<&PgObservation> for v1::PostgresObservation {
    fn from(o: &PgObservation) -> Self {
        let role = match o.role {
            ServerRole::Empty => v1::PgRole::Empty,
            ServerRole::Stopped(_) => v1::PgRole::Stopped,
            ServerRole::Primary => v1::PgRole::Primary,
            ServerRole::Standby => v1::PgRole::Standby,
        };
        let raw = |l: Option<Lsn>| l.map_or(0, |l| l.0);
        v1::PostgresObservation {
            role: role.into(),
            timeline: o.timeline.map_or(0, Timeline::get),
            system_identifier: o.system_identifier.unwrap_or_default(),
            write_lsn: raw(o.write_lsn),
            flush_lsn: raw(o.flush_lsn),
            replay_lsn: raw(o.replay_lsn),
            read_only: o.read_only,
            replicas: o
                .replicas
                .iter()
                .map(|r| v1::ReplicationPeer {
                    application_name: r.application_name.clone(),
                    state: r.state.clone(),
                    sync_state: match r.sync_state {
                        None => v1::SyncState::Unspecified,
                        Some(SyncState::Async) => v1::SyncState::Async,
                        Some(SyncState::Potential) => v1::SyncState::Potential,
                        Some(SyncState::Sync) => v1::SyncState::Sync,
                        Some(SyncState::Quorum) => v1::SyncState::Quorum,
                    }
                    .into(),
                    write_lsn: raw(r.write_lsn),
                    flush_lsn: raw(r.flush_lsn),
                    replay_lsn: raw(r.replay_lsn),
                })
                .collect(),
            synchronous_standby_names: o.synchronous_standby_names.clone(),
            streaming: o.streaming,
            upstream_node: o
                .upstream_node
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            server_version: o.server_version,
            recently_started: o.recently_started,
            // The reconcile loop's commit check fills this in.
            commits_blocked: false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stopped_observation_and_wire_form() {
        let control = ControlData {
            state: ClusterState::ShutDown,
            system_identifier: u64::MAX - 1,
            checkpoint_lsn: Lsn(0x300_0060),
            checkpoint_timeline: Timeline(3),
        };
        let obs = PgObservation::stopped(&control, true, false);
        assert_eq!(
            obs.local(),
            Local::Stopped(Stopped {
                was: WasRole::Primary,
                clean: true,
                standby_signal: true
            })
        );
        let restarted_after_fence = ControlData {
            state: ClusterState::ShutDownInRecovery,
            ..control.clone()
        };
        assert!(matches!(
            PgObservation::stopped(&restarted_after_fence, true, true).local(),
            Local::Stopped(Stopped {
                was: WasRole::Primary,
                ..
            })
        ));
        let wire = v1::PostgresObservation::from(&obs);
        assert_eq!(wire.role, i32::from(v1::PgRole::Stopped));
        assert_eq!(wire.timeline, 3);
        assert_eq!(wire.system_identifier, u64::MAX - 1);
        assert_eq!(wire.flush_lsn, 0x300_0060);
        let empty = v1::PostgresObservation::from(&PgObservation::empty());
        assert_eq!(empty.role, i32::from(v1::PgRole::Empty));
        assert_eq!(empty.flush_lsn, 0);
    }
}
