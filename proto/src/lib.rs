//! The `ha.v1` wire contract and the domain types every crate shares.
//!
//! `v1` is the code generated from `proto/ha/v1/ha.proto` by `tonic-prost-build`. It is checked
//! in so that ordinary builds never need `protoc`; the `generated_code_is_fresh` test regenerates
//! it and fails on any difference (run it with `HA_PROTO_BLESS=1` to rewrite the file after
//! editing the `.proto`).
//!
//! The domain types (`NodeId`, `Epoch`, `Lsn`, ...) are what crosses crate boundaries; the wire
//! types stay at the gRPC edge. Conversions from wire to domain validate (unknown enum values,
//! missing required fields, malformed names) and never panic.

pub mod convert;
pub mod types;

/// Generated messages, clients and servers of package `ha.v1`.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    missing_docs,
    unreachable_pub
)]
pub mod v1 {
    include!("gen/ha.v1.rs");
}

pub use convert::WireError;
pub use types::{Epoch, Lsn, MonitorId, NodeId, NodeKind, ParseError, Term, Timeline};

/// Response metadata key carrying the leader's address on `UNAVAILABLE` answers from followers.
pub const LEADER_ADDR_METADATA: &str = "x-ha-leader";
/// Response metadata key carrying the leader's Raft id on `UNAVAILABLE` answers from followers.
pub const LEADER_ID_METADATA: &str = "x-ha-leader-id";
/// Request metadata key a follower monitor sets (to its Raft id) when it relays an agent's
/// report to the leader; the leader accepts such a report only from a monitor certificate.
pub const RELAYED_BY_METADATA: &str = "x-ha-relayed-by";
