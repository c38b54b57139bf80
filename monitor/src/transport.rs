//! How raft messages travel between monitors.
//!
//! [`GrpcTransport`] sends them over the `PeerService` of the other monitors, through channels
//! from [`tls_channels`] (mutual TLS: the peer must present a monitor certificate, and it checks
//! ours names `monitor-<from>`) or, in dev mode only, [`plaintext_channels`]; one task and one
//! bounded queue per peer, so a slow or dead peer never blocks the raft thread or the other
//! peers (a full queue drops the batch and reports the peer unreachable; Raft retries).
//! [`sim::SimNetwork`] delivers them in-process and can cut chosen links, for tests and
//! benchmarks of the consensus layer without sockets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ha_pki::{ClientTls, MtlsConnector};
use ha_proto::v1::RaftBatch;
use ha_proto::v1::peer_service_client::PeerServiceClient;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::{debug, warn};

use crate::consensus::{Feedback, FeedbackSender, Members, Transport};
use crate::incarnation;

/// Makes a (lazily connecting) channel to a peer address; TLS is decided by the caller.
pub type ChannelFactory = Arc<dyn Fn(&str) -> Result<Channel, String> + Send + Sync>;

/// How long a peer connection may take to open, and a raft call to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Plaintext channels to peers (dev mode only).
pub fn plaintext_channels() -> ChannelFactory {
    Arc::new(|addr: &str| {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map(|e| {
                e.connect_timeout(CONNECT_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .connect_lazy()
            })
            .map_err(|e| e.to_string())
    })
}

/// Mutual-TLS channels to peers: each (re)connection takes the [`ClientTls`] config current at
/// that moment, so reloaded certificates apply without a restart, and refuses a server whose
/// certificate is not a monitor's.
pub fn tls_channels(tls: Arc<ClientTls>) -> ChannelFactory {
    Arc::new(move |addr: &str| {
        ha_pki::endpoint(&format!("https://{addr}"))
            .map(|e| {
                e.connect_timeout(CONNECT_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .connect_with_connector_lazy(MtlsConnector::new(tls.clone()))
            })
            .map_err(|e| e.to_string())
    })
}

/// Encodes raft messages for the wire (rust-protobuf, as raft-rs defines them).
pub fn encode(messages: &[Message]) -> Vec<Vec<u8>> {
    messages
        .iter()
        .map(|m| {
            m.write_to_bytes()
                .expect("raft messages built by raft-rs always encode")
        })
        .collect()
}

/// Decodes raft messages from a peer; a malformed message is an error, never a panic.
pub fn decode(batch: &[Vec<u8>]) -> Result<Vec<Message>, protobuf::ProtobufError> {
    batch.iter().map(|b| Message::parse_from_bytes(b)).collect()
}

const PEER_QUEUE: usize = 64;

/// Raft over the monitors' `PeerService`.
pub struct GrpcTransport {
    from: u64,
    incarnations: incarnation::Shared,
    runtime: tokio::runtime::Handle,
    channels: ChannelFactory,
    /// Addresses known before the replicated member list has them (a member being added).
    seeds: Members,
    peers: HashMap<u64, Peer>,
}

struct Peer {
    address: String,
    queue: mpsc::Sender<Vec<Message>>,
}

impl std::fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransport")
            .field("from", &self.from)
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl GrpcTransport {
    pub fn new(
        from: u64,
        incarnations: incarnation::Shared,
        runtime: tokio::runtime::Handle,
        channels: ChannelFactory,
        seeds: Members,
    ) -> Self {
        Self {
            from,
            incarnations,
            runtime,
            channels,
            seeds,
            peers: HashMap::new(),
        }
    }

    fn peer(&mut self, to: u64, address: &str, feedback: &FeedbackSender) -> Option<&Peer> {
        let stale = self.peers.get(&to).is_some_and(|p| p.address != address);
        if stale || !self.peers.contains_key(&to) {
            // Channels spawn their connection task on the runtime; the raft thread is not in it.
            let _runtime = self.runtime.enter();
            let channel = match (self.channels)(address) {
                Ok(c) => c,
                Err(e) => {
                    warn!(to, %address, error = %e, "cannot create a channel to this monitor");
                    return None;
                }
            };
            let (queue, rx) = mpsc::channel(PEER_QUEUE);
            let sender = Sender {
                from: self.from,
                incarnations: self.incarnations.clone(),
                to,
            };
            let fb = feedback.clone();
            self.runtime
                .spawn(deliver(sender, PeerServiceClient::new(channel), rx, fb));
            self.peers.insert(
                to,
                Peer {
                    address: address.to_owned(),
                    queue,
                },
            );
        }
        self.peers.get(&to)
    }
}

impl Transport for GrpcTransport {
    fn send(&mut self, messages: Vec<Message>, members: &Members, feedback: &FeedbackSender) {
        let mut by_peer: HashMap<u64, Vec<Message>> = HashMap::new();
        for m in messages {
            by_peer.entry(m.to).or_default().push(m);
        }
        // Forget peers that left the group (their task ends when the queue closes).
        self.peers
            .retain(|id, _| members.contains_key(id) || self.seeds.contains_key(id));
        for (to, batch) in by_peer {
            let Some(address) = members.get(&to).or_else(|| self.seeds.get(&to)).cloned() else {
                debug!(to, "no address for this monitor yet; message dropped");
                feedback.report(Feedback::Unreachable(to));
                continue;
            };
            let Some(peer) = self.peer(to, &address, feedback) else {
                feedback.report(Feedback::Unreachable(to));
                continue;
            };
            if let Err(mpsc::error::TrySendError::Full(batch)) = peer.queue.try_send(batch) {
                report_failure(to, &batch, feedback);
            }
        }
    }
}

fn report_failure(to: u64, batch: &[Message], feedback: &FeedbackSender) {
    feedback.report(Feedback::Unreachable(to));
    if batch
        .iter()
        .any(|m| m.get_msg_type() == MessageType::MsgSnapshot)
    {
        feedback.report(Feedback::SnapshotDone { to, ok: false });
    }
}

/// Who sends a batch, and to whom.
#[derive(Debug, Clone)]
struct Sender {
    from: u64,
    incarnations: incarnation::Shared,
    to: u64,
}

async fn deliver(
    sender: Sender,
    mut client: PeerServiceClient<Channel>,
    mut rx: mpsc::Receiver<Vec<Message>>,
    feedback: FeedbackSender,
) {
    while let Some(mut batch) = rx.recv().await {
        // Coalesce whatever queued up while the previous call was in flight.
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
        }
        let has_snapshot = batch
            .iter()
            .any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let Sender {
            from,
            ref incarnations,
            to,
        } = sender;
        let mut request = tonic::Request::new(RaftBatch {
            from,
            messages: encode(&batch),
        });
        let (own, known) = {
            let records = incarnation::lock(incarnations);
            (records.own(), records.known(to))
        };
        let md = request.metadata_mut();
        if let Ok(v) = own.to_string().parse() {
            md.insert(incarnation::METADATA, v);
        }
        if let Some(Ok(v)) = known.map(|k| k.to_string().parse()) {
            md.insert(incarnation::PEER_METADATA, v);
        }
        match client.raft(request).await {
            Ok(answer) => {
                let theirs = answer
                    .metadata()
                    .get(incarnation::METADATA)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if let Some(theirs) = theirs
                    && let Err(why) = incarnation::lock(incarnations).check(to, theirs)
                {
                    warn!(to, %why, "a peer came back with wiped data; it will stop by itself");
                }
                if has_snapshot {
                    feedback.report(Feedback::SnapshotDone { to, ok: true });
                }
            }
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition
                    && incarnation::is_refusal(status.message()) =>
            {
                feedback.report(Feedback::Refused(status.message().to_owned()));
            }
            Err(status) => {
                debug!(to, code = ?status.code(), message = status.message(), "raft batch not delivered");
                report_failure(to, &batch, &feedback);
            }
        }
    }
}

pub mod sim {
    //! An in-process network for consensus tests: delivery is immediate unless a link is cut.
    //! Links are directed, so one-way partitions can be modelled.

    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex, PoisonError};

    use raft::eraftpb::{Message, MessageType};

    use crate::consensus::{Feedback, FeedbackSender, Members, RaftHandle, Transport};

    #[derive(Debug, Default)]
    struct State {
        nodes: HashMap<u64, RaftHandle>,
        cut: HashSet<(u64, u64)>,
    }

    /// The shared network; clone it freely.
    #[derive(Debug, Clone, Default)]
    pub struct SimNetwork(Arc<Mutex<State>>);

    impl SimNetwork {
        fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
            f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
        }

        pub fn transport(&self, id: u64) -> SimTransport {
            SimTransport {
                id,
                net: self.clone(),
            }
        }

        /// Makes `id` reachable through `handle` (replaces an earlier registration).
        pub fn register(&self, id: u64, handle: RaftHandle) {
            self.with(|s| s.nodes.insert(id, handle));
        }

        pub fn unregister(&self, id: u64) {
            self.with(|s| s.nodes.remove(&id));
        }

        /// Drops every message from `from` to `to` (one direction).
        pub fn cut(&self, from: u64, to: u64) {
            self.with(|s| s.cut.insert((from, to)));
        }

        /// Cuts `id` off from every other registered node, both directions.
        pub fn isolate(&self, id: u64, others: &[u64]) {
            for &o in others {
                if o != id {
                    self.cut(id, o);
                    self.cut(o, id);
                }
            }
        }

        pub fn heal(&self) {
            self.with(|s| s.cut.clear());
        }
    }

    /// One member's view of the [`SimNetwork`].
    #[derive(Debug)]
    pub struct SimTransport {
        id: u64,
        net: SimNetwork,
    }

    impl Transport for SimTransport {
        fn send(&mut self, messages: Vec<Message>, _: &Members, feedback: &FeedbackSender) {
            for m in messages {
                let to = m.to;
                let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
                let target = self.net.with(|s| {
                    if s.cut.contains(&(self.id, to)) {
                        None
                    } else {
                        s.nodes.get(&to).cloned()
                    }
                });
                let delivered = target.is_some_and(|h| h.step(m).is_ok());
                if !delivered {
                    feedback.report(Feedback::Unreachable(to));
                }
                if snapshot {
                    feedback.report(Feedback::SnapshotDone { to, ok: delivered });
                }
            }
        }
    }
}
