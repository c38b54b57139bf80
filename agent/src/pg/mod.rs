//! The agent's PostgreSQL half: one [`PgController`] owns one local PostgreSQL 15 server, and
//! [`plan`] maps what the agent observes and the goal the monitor assigned to the next step.
//!
//! Invariants: every controller step is idempotent (repeating it after the agent crashed midway
//! is safe); a server the agent fenced never accepts writes again until it is promoted; an
//! old primary only comes back as a standby (rewind, else a fresh base backup). The agent owns
//! `postgresql.ha.conf` (included last from `postgresql.conf`), `pg_hba.conf`, `pg_ident.conf`,
//! `standby.signal` and, with TLS, the copies of the node's certificate, key and CA bundle that
//! PostgreSQL uses (refreshed when the agent's files change, picked up by a reload); every other
//! line of the user's configuration is left alone.

mod config;
mod controller;
mod files;
mod observe;
mod plan;
mod process;
mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use config::{
    CertClient, ConnInfo, HbaConnType, HbaRule, IDENT_MAP, MANAGED_CONF, PgConfig, ReplicationAuth,
    ReplicationPeer, RestartLimit, RoleSettings, SyncCommit, SyncConfig, Upstream,
};
pub use controller::{Outcome, PgController, PostmasterState, RejoinPath, StopMode, connect_local};
pub use files::{ClusterState, ControlData, DataDirState};
pub use observe::{PgObservation, Replica, ServerRole, SyncState};
pub use plan::{Action, Local, Stopped, WasRole, plan};
pub use process::Exit;
pub use tls::copies_present as tls_copies_present;

/// Why a controller step failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] ha_files::FileError),
    #[error("OS user {user:?}: {reason}")]
    User { user: String, reason: String },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("signalling PID {pid}: {reason}")]
    Signal { pid: i32, reason: String },
    #[error("PostgreSQL did not start: {reason}")]
    Start { reason: String },
    #[error("PostgreSQL did not stop within {0:?}")]
    StopTimeout(Duration),
    #[error("connecting over the unix socket: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("{what}: {source}")]
    Sql {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("pg_controldata output lacks a valid {field:?}")]
    ControlData { field: &'static str },
    #[error("unexpected value from PostgreSQL: {0}")]
    Parse(#[from] ha_proto::ParseError),
    #[error("the data directory holds no initialised cluster")]
    NoData,
    #[error("pg_promote could not signal the postmaster (see the server log)")]
    PromoteNotSignalled,
    #[error(
        "{upstream} is still on this former primary's timeline (not promoted, or its \
         checkpoint after the promotion is not done): waiting before rewinding from it"
    )]
    UpstreamNotPromoted { upstream: String },
    #[error("the server must be running as a {expected} for this step")]
    WrongRole { expected: &'static str },
    #[error("{what} not reached within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error(
        "postmaster crashed {restarts} times within {window:?}: one restart attempt every {retry_after:?}"
    )]
    RestartLimit {
        restarts: usize,
        window: Duration,
        retry_after: Duration,
    },
    #[error("the clean stop left the cluster in state {0:?}")]
    NotClean(ClusterState),
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("invalid PostgreSQL configuration: {0}")]
    Config(String),
    #[error("TLS material: {0}")]
    Tls(String),
}

impl PgError {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}
