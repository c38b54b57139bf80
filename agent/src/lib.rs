//! `ha-agent`: the daemon on every PostgreSQL and ejabberd node.
//!
//! It reports what it observes to the monitor leader and converges its node to the goal the
//! monitor assigns, one idempotent step at a time.

pub mod ejabberd;
pub mod pg;
