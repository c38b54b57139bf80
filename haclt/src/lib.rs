//! `haclt`: the operator's CLI. It follows the monitor leader, prints tables for people and a
//! stable JSON schema for scripts, waits for every change to converge, and exits with a code
//! that says why it failed (see [`client::Failure::exit_code`]).

pub mod cli;
pub mod client;
pub mod drill;
pub mod output;
pub mod pki;
pub mod systemd;
pub mod uri;
