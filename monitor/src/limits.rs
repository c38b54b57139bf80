//! What one client may hold on the monitor port, besides the connection bounds of
//! `ha_pki::tls_incoming` (handshakes in progress, connections without a certificate and their
//! lifetime, connections per certificate identity; its module documentation says why those
//! bounds keep Raft and lease renewals alive under a flood).
//!
//! - HTTP/2 ([`server_builder`]): at most [`MAX_CONCURRENT_STREAMS`] calls at once on one
//!   connection, a keepalive ping every [`KEEPALIVE_INTERVAL`] that closes a connection whose
//!   peer does not answer within [`KEEPALIVE_TIMEOUT`], and hyper's bound on streams reset
//!   before they were answered (the "rapid reset" attack).
//! - Message sizes: a request to the agent or operator service is at most [`MAX_REQUEST_BYTES`]
//!   and a response at most [`MAX_RESPONSE_BYTES`]; a Raft batch between monitors at most
//!   [`MAX_RAFT_BATCH_BYTES`]. The `PeerService` refuses any caller without a monitor
//!   certificate before reading the body (an interceptor in `server::run`), so only monitors
//!   may send the large messages. The sizes are measured in this module's tests on a catalog far
//!   bigger than a real one.
//! - Streams per identity ([`Streams`]): at most [`MAX_WATCH_GOAL_PER_IDENTITY`] open
//!   `WatchGoal` streams per node certificate and [`MAX_FOLLOW_EVENTS_PER_IDENTITY`]
//!   `FollowEvents` streams per operator certificate; the next is refused with
//!   `RESOURCE_EXHAUSTED` naming the limit.
//!
//! These are constants, not configuration: they bound abuse, far above what the daemons and
//! `haclt` use, and no deployment of this system needs others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Status;
use tracing::warn;

/// Calls in flight on one HTTP/2 connection. An agent uses two (a report, its goal stream); a
/// follower relays the reports of its agents to the leader over one connection, one call each.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// How often the server pings an idle connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Agent and operator requests: a report, a settings change, a CSR; all well under 16 KiB.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Responses: the largest is the status or the event history of a big catalog (see the tests).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Raft batches: up to raft's 1 MiB of entries per message, or a snapshot of the catalog.
pub const MAX_RAFT_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Open `WatchGoal` streams of one node certificate: an agent holds one, and a second for a
/// moment when it reconnects before the monitor has noticed the first is gone.
pub const MAX_WATCH_GOAL_PER_IDENTITY: usize = 4;
/// Open `FollowEvents` streams of one operator certificate (`haclt events --follow`, dashboards).
pub const MAX_FOLLOW_EVENTS_PER_IDENTITY: usize = 16;

/// The tonic server with the HTTP/2 limits above.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_pending_accept_reset_streams(Some(
            usize::try_from(MAX_CONCURRENT_STREAMS).unwrap_or(usize::MAX),
        ))
}

/// The open streams of each kind per caller.
#[derive(Debug, Default)]
pub struct Streams {
    open: Arc<Mutex<HashMap<(&'static str, String), usize>>>,
}

/// One open stream; dropping it (when the stream's task ends) frees its place.
#[derive(Debug)]
pub struct StreamSlot {
    open: Arc<Mutex<HashMap<(&'static str, String), usize>>>,
    key: (&'static str, String),
}

impl Streams {
    /// A place for one more `rpc` stream of `caller`, or `RESOURCE_EXHAUSTED` naming the limit.
    pub fn open(
        &self,
        rpc: &'static str,
        caller: String,
        max: usize,
    ) -> Result<StreamSlot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = (rpc, caller);
        let n = open.entry(key.clone()).or_default();
        if *n >= max {
            warn!(rpc, caller = %key.1, limit = max, "refused: too many open streams");
            return Err(Status::resource_exhausted(format!(
                "{rpc}: {} already has {max} open streams, the limit per certificate; close one first",
                key.1
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            open: self.open.clone(),
            key,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use ha_proto::types::{Endpoint, NodeId, NodeKind};
    use ha_proto::v1;
    use prost::Message as _;

    use super::*;
    use crate::catalog::{Catalog, Command, Op, Registration};
    use crate::consensus::RaftStatus;
    use crate::decide::Observations;

    /// 20 groups of 10 nodes with long names, a full event history of long messages, a full
    /// memory of request ids: far beyond a real deployment (a few groups of three to five).
    fn big_catalog() -> Catalog {
        let mut catalog = Catalog::new();
        let mut index = 0;
        let mut apply = |catalog: &mut Catalog, op: Op| {
            index += 1;
            let cmd = Command {
                request_id: format!("request-{index:06}-{}", "r".repeat(40)),
                at_unix_ms: 1_700_000_000_000,
                op,
            };
            catalog.apply(index, &cmd).unwrap();
        };
        for g in 0..20 {
            for n in 0..10 {
                let name = format!("postgres-node-{g:02}-{n:02}-{}", "x".repeat(30));
                let op = Op::RegisterNode {
                    node: NodeId::new(&name).unwrap(),
                    kind: NodeKind::Postgres,
                    group: format!("group-{g:02}-{}", "g".repeat(30)),
                    endpoint: Endpoint {
                        host: format!("{name}.db.example.internal"),
                        port: 5432,
                    },
                    source: Registration::Config,
                    // A 20-byte serial in hex, valid long after the test's clock.
                    certificate: Some(crate::catalog::IssuedCertificate {
                        serial: "ab".repeat(20),
                        not_after_unix_ms: u64::MAX,
                        public_key_sha256: "cd".repeat(32),
                    }),
                };
                apply(&mut catalog, op);
            }
        }
        for i in 0..crate::catalog::EVENT_HISTORY + crate::catalog::REQUEST_MEMORY {
            let op = Op::RecordEvent {
                kind: "drill".into(),
                node: None,
                group: None,
                message: format!("event {i}: {}", "m".repeat(200)),
            };
            apply(&mut catalog, op);
        }
        catalog
    }

    #[test]
    fn the_biggest_messages_of_a_big_catalog_fit_four_times_over() {
        let catalog = big_catalog();
        let status = crate::status::build(
            &catalog,
            &Observations::new(Duration::ZERO),
            &BTreeMap::new(),
            Duration::ZERO,
            &RaftStatus::default(),
            false,
        )
        .encoded_len();
        let events = v1::EventsResponse {
            events: catalog
                .events_after(0, usize::MAX)
                .map(crate::status::event)
                .collect(),
        }
        .encoded_len();
        let snapshot = catalog.to_bytes().len();
        eprintln!(
            "big catalog: status {status} B, event history {events} B, snapshot {snapshot} B; \
             limits: response {MAX_RESPONSE_BYTES} B, raft batch {MAX_RAFT_BATCH_BYTES} B"
        );
        assert!(status.max(events) * 4 <= MAX_RESPONSE_BYTES);
        assert!(snapshot * 4 <= MAX_RAFT_BATCH_BYTES);
    }

    #[test]
    fn a_stream_past_the_limit_is_refused_until_one_closes() {
        let streams = Streams::default();
        let held: Vec<_> = (0..2)
            .map(|_| {
                streams
                    .open("WatchGoal", "ha://postgres/p1".into(), 2)
                    .unwrap()
            })
            .collect();
        let refused = streams
            .open("WatchGoal", "ha://postgres/p1".into(), 2)
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("2 open streams"), "{refused:?}");
        // Another caller, or another kind of stream, has its own count.
        streams
            .open("WatchGoal", "ha://postgres/p2".into(), 2)
            .unwrap();
        streams
            .open("FollowEvents", "ha://postgres/p1".into(), 2)
            .unwrap();
        drop(held);
        streams
            .open("WatchGoal", "ha://postgres/p1".into(), 2)
            .unwrap();
    }
}
