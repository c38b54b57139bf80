//! `ha-monitor`: one member of the Raft group that replicates the HA catalog.
//!
//! The leader judges health from agent reports (soft state, never Raft writes) and its own
//! probes, runs the pure decision function, and proposes goal changes; a change takes effect only
//! once committed. Followers answer with the leader's address.

pub mod broken;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod consensus;
pub mod decide;
pub mod incarnation;
pub mod limits;
pub mod logging;
pub mod machine;
pub mod metrics;
pub mod server;
pub mod signer;
pub mod status;
pub mod storage;
pub mod transport;
