//! `ha-agent`: the daemon on every PostgreSQL and ejabberd node.
//!
//! It reports what it observes to the monitor leader and converges its node to the goal the
//! monitor assigns, one idempotent step at a time. [`config`] validates the TOML file before
//! anything starts; [`run::run`] is the daemon (join, reconcile loop, lease self-fencing);
//! [`pg`] drives the local PostgreSQL server and [`ejabberd`] a local ejabberd;
//! [`notify`] tells systemd when the agent is ready and feeds its watchdog.

pub mod cli;
pub mod config;
pub mod ejabberd;
pub mod material;
pub mod notify;
pub mod pg;
pub mod run;
