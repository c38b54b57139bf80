//! The ejabberd side of the agent: keep ejabberd's SQL storage on the current primary.
//!
//! - [`config`]: pure, line-preserving rewrite of `sql_server` / `sql_port` in `ejabberd.yml`.
//! - the file is replaced atomically keeping owner, group and mode, never through a link (`ha_files`).
//! - [`erl`]: expressions evaluated in the ejabberd node through `erl_call`.
//! - [`controller`]: [`EjabberdController::apply`] rewrites, reloads, restarts the SQL pools and
//!   proves with an uncached write that ejabberd now writes to the target; the last good copy
//!   of the file, its periodic comparison and repair, the periodic check that the pool reaches
//!   the target; health and cluster membership.
//! - [`sql_tls`]: the node's certificate as ejabberd's SQL connections need it (TLS with
//!   certificate authentication to PostgreSQL).
//! - [`instance`]: a private ejabberd (own directory, node name and epmd) for tests and drills.
//!
//! Invariant: ejabberd is reported as following an epoch only after a write through ejabberd
//! was seen on that epoch's primary.

pub mod config;
pub mod controller;
pub mod erl;
pub mod instance;
pub mod sql_tls;

pub use config::{ConfigError, SqlSettings, SqlTarget, rewrite};
pub use controller::{
    Applied, ApplyReport, ControllerConfig, ControllerError, Difference, EjabberdController,
    FileCheck, Health, Source, SqlCheck, Step, StepTiming, sources,
};
pub use erl::{ErlError, ErlNode};
pub use instance::{InstanceError, PrivateInstance};
