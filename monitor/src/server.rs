//! The running monitor: the Raft node with the catalog, the gRPC services for agents, operators
//! and peer monitors, and the leader's loops (probes and decisions).
//!
//! Soft state (agent reports, probe results, pending drill orders) lives only in the leader's
//! memory, never in the Raft log. A monitor that becomes leader starts with empty observations
//! and `leader_since = now`, so it judges no node on silence before one full detection window.
//! Only the leader accepts reports and writes; followers answer `UNAVAILABLE` with the leader's
//! address in the `x-ha-leader` metadata.
//!
//! Security (unless dev mode runs plaintext): the single port serves TLS with optional client
//! certificates against the cluster CA, and every call checks its caller before it reads or
//! changes anything. `AgentService/Join` alone needs no certificate (the join token authorizes
//! it); `Report`/`WatchGoal` need the node agent certificate (role postgres or ejabberd) named
//! like the node in the request; every operator call needs role operator; Raft needs role
//! monitor with the name `monitor-<from>`. A refusal is `UNAUTHENTICATED` (no certificate) or
//! `PERMISSION_DENIED` (wrong role or name), logged with the caller's identity. When the `[tls]`
//! section names `ca_key`, the leader signs the CSR a joining node sends, for the role its token
//! grants, its node name, and its endpoint host as a subject alternative name (standbys verify
//! the primary's host name). The CA key, the bundle, the certificate and its key are reloaded on
//! SIGHUP or when a file changes ([`crate::signer`], `ha_pki::ReloadWatcher`), so every one of
//! them, the CA included, rotates without a restart.
//!
//! Node certificates are signed for `tls.node_certificate_lifetime`; `AgentService/Renew` signs a
//! new CSR for the caller's own node (name, role and address from its certificate and the
//! catalog). The catalog records every signed serial until it expires: a serial revoked by
//! `RemoveNode` or `RevokeCertificate` is refused on every call (`PERMISSION_DENIED` naming the
//! serial, the node and the time), as is every call acting for a removed node. A follower
//! checks against its own copy of the catalog, which may lag the leader's by the replication
//! delay.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ha_proto::convert;
use ha_proto::types::{NodeId, NodeKind};
use ha_proto::v1::{self, agent_service_server, operator_service_server, peer_service_server};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, error, info, warn};

use ha_pki::{ClientAuth, ClientTls, PeerIdentity, Reload, ReloadWatcher, Role, ServerTls};

use crate::catalog::{
    self, Applied, Catalog, Command, IssuedCertificate, Op, Registration, Rejected, TokenError,
};
use crate::config::{self, MonitorConfig};
use crate::consensus::{self, ProposeError, RaftHandle, RaftSettings};
use crate::decide::{self, Observations, ProbeResult, Report};
use crate::incarnation::{self, Incarnations};
use crate::limits;

use crate::machine::{self, CatalogMachine};
use crate::signer::CaSigner;
use crate::storage::RaftStore;
use crate::transport::{self, GrpcTransport};

/// The group a join token names when the operator names none and no group exists yet.
pub const DEFAULT_GROUP: &str = "main";
/// How long a request waits for its proposal to be committed and applied.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the leader runs `decide` (it is cheap and pure; faster than reports on purpose,
/// so a failure is acted upon as soon as the evidence is complete).
const DECIDE_EVERY: Duration = Duration::from_millis(100);
/// The shortest time between two decision passes woken by news rather than by the tick.
const MIN_DECIDE_GAP: Duration = Duration::from_millis(5);
/// The report interval asked of a group's agents during a switchover or failover.
const OPERATION_REPORT_INTERVAL: Duration = Duration::from_millis(50);
/// How often the leader probes the PostgreSQL ports of nodes whose agents are silent.
const PROBE_EVERY: Duration = Duration::from_millis(100);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Maps a consensus error to the status a client acts upon.
fn raft_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { leader } => not_leader(leader),
        ProposeError::Dropped => {
            Status::unavailable("leadership changed before the request was applied; retry")
        }
        ProposeError::Stopped => Status::unavailable("this monitor is shutting down"),
        ProposeError::Rejected(why) => Status::failed_precondition(why),
    }
}

fn not_leader(leader: Option<(u64, String)>) -> Status {
    let mut status = Status::unavailable("this monitor is not the leader");
    if let Some((id, addr)) = leader {
        let md = status.metadata_mut();
        if let Ok(v) = addr.parse() {
            md.insert(ha_proto::LEADER_ADDR_METADATA, v);
        }
        if let Ok(v) = id.to_string().parse() {
            md.insert(ha_proto::LEADER_ID_METADATA, v);
        }
    }
    status
}

/// Maps a catalog rejection to a status code an operator can act upon.
fn rejected_status(r: Rejected) -> Status {
    let msg = r.to_string();
    match r {
        Rejected::UnknownNode(_) | Rejected::UnknownGroup(_) => Status::not_found(msg),
        Rejected::Token { .. } => Status::permission_denied(msg),
        Rejected::MissingRequestId | Rejected::Invalid(_) => Status::invalid_argument(msg),
        Rejected::NodeExists(_) | Rejected::TokenExists(_) => Status::already_exists(msg),
        Rejected::StaleDecision { .. } | Rejected::OperationInProgress { .. } => {
            Status::aborted(msg)
        }
        Rejected::NotEligible(_) | Rejected::Unsafe(_) => Status::failed_precondition(msg),
    }
}

fn refusal_status(r: decide::Refusal) -> Status {
    match r {
        decide::Refusal::UnknownGroup(_) => Status::not_found(r.to_string()),
        decide::Refusal::NotPossible(_) => Status::failed_precondition(r.to_string()),
    }
}

/// How often certificate files are checked for changes (SIGHUP reloads at once).
const TLS_RELOAD_POLL: Duration = Duration::from_secs(5);

/// Whether calls are checked, and with what the leader signs join CSRs.
#[derive(Debug)]
enum Security {
    /// Dev mode: plaintext, no caller is checked.
    Plaintext,
    Tls {
        /// The CA bundle, returned to joining nodes as it is on disk at that moment.
        ca_bundle: std::path::PathBuf,
        /// The cluster CA, when `ca_key` is configured (reloaded with the other TLS files).
        signer: Option<Arc<CaSigner>>,
        /// How long a node certificate signed at join or renewal is valid (capped at the CA's
        /// own expiry).
        node_cert_lifetime: Duration,
    },
}

/// Who may make a call.
#[derive(Debug, Clone, Copy)]
enum Caller<'a> {
    Operator,
    /// An operator or an observer: reads that change nothing (status, events).
    Reader,
    /// The agent of this node.
    Node(&'a str),
    /// The monitor with this Raft id.
    Monitor(u64),
    /// Any monitor of the cluster (a follower relaying an agent's report it authenticated).
    AnyMonitor,
}

/// The certificate name of the monitor with Raft id `id`.
pub fn monitor_name(id: u64) -> String {
    format!("monitor-{id}")
}

fn role_for(kind: NodeKind) -> Role {
    match kind {
        NodeKind::Postgres => Role::Postgres,
        NodeKind::Ejabberd => Role::Ejabberd,
    }
}

/// Whom a per-caller limit counts: the certificate identity, or in dev mode the address.
fn caller<T>(request: &Request<T>) -> String {
    ha_pki::peer_identity(request).map_or_else(|| remote(request), |p| p.to_string())
}

fn remote<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<ha_pki::PeerInfo>()
        .map_or_else(|| "?".to_owned(), |i| i.remote_addr.to_string())
}

/// What the leader holds in memory only.
#[derive(Debug)]
struct Soft {
    /// The term in which `obs` was started; a new term starts over.
    term: u64,
    obs: Observations,
    /// Each node's last report as sent, for the status screen.
    raw: BTreeMap<NodeId, v1::ObservedState>,
    drills: BTreeMap<NodeId, v1::DrillOrder>,
}

/// State shared by the services and the leader loops.
#[derive(Debug)]
pub struct Monitor {
    id: u64,
    incarnations: incarnation::Shared,
    raft: RaftHandle,
    catalog: watch::Receiver<Arc<Catalog>>,
    soft: Mutex<Soft>,
    /// Wakes the decide loop before its next tick: a report said something new, or a probe
    /// result changed.
    decide_soon: tokio::sync::Notify,
    started: Instant,
    allow_drills: bool,
    security: Security,
    shutdown: CancellationToken,
    relay: Relay,
    /// Open `WatchGoal` and `FollowEvents` streams per caller ([`limits`]).
    streams: limits::Streams,
    /// What `/metrics` counts (`crate::metrics`).
    metrics: crate::metrics::Counters,
}

/// A follower's way to the leader for agents' reports: an agent that cannot reach the leader
/// (one cut link, one rack switch) still renews its lease through any monitor that can, so a
/// healthy primary is not fenced for a fault between it and one monitor.
struct Relay {
    channels: transport::ChannelFactory,
    /// The channel to the leader last relayed to, kept while the leader stays the same.
    leader: Mutex<Option<(String, tonic::transport::Channel)>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
}

impl Relay {
    fn channel(&self, address: &str) -> Result<tonic::transport::Channel, Status> {
        let mut slot = self.leader.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((a, ch)) = slot.as_ref()
            && a == address
        {
            return Ok(ch.clone());
        }
        let ch = (self.channels)(address).map_err(|e| {
            Status::unavailable(format!("cannot relay to the leader at {address}: {e}"))
        })?;
        *slot = Some((address.to_owned(), ch.clone()));
        Ok(ch)
    }
}

impl Monitor {
    /// Relays an agent's report (already authorized) to the leader and returns its answer.
    /// The agent's lease runs from its own send time, so the extra hop only shortens it.
    async fn relay_report(
        &self,
        req: v1::ReportRequest,
        node: &str,
    ) -> Result<Response<v1::ReportResponse>, Status> {
        let leader = self.raft.status().leader_address();
        let Some((leader_id, address)) = leader.clone() else {
            return Err(not_leader(None));
        };
        let channel = self.relay.channel(&address)?;
        let mut request = Request::new(req);
        if let Ok(v) = self.id.to_string().parse() {
            request
                .metadata_mut()
                .insert(ha_proto::RELAYED_BY_METADATA, v);
        }
        let answer = ha_proto::v1::agent_service_client::AgentServiceClient::new(channel)
            .report(request)
            .await;
        match answer {
            Ok(r) => {
                debug!(node, leader = leader_id, "report relayed to the leader");
                Ok(r)
            }
            // The leader's own answer (a node not registered, a refusal): the agent's.
            Err(e)
                if !matches!(
                    e.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                ) =>
            {
                Err(e)
            }
            Err(e) => {
                // The agent tries the leader (or another monitor) itself next.
                warn!(node, leader = leader_id, code = ?e.code(), error = %e.message(), "report not relayed");
                self.relay
                    .leader
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                Err(not_leader(leader))
            }
        }
    }

    /// Admits the caller of `rpc` or refuses it (logged, with the caller's identity), before the
    /// call reads or changes anything. Dev mode admits everyone.
    fn authorize<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
        caller: Caller<'_>,
    ) -> Result<(), Status> {
        if matches!(self.security, Security::Plaintext) {
            return Ok(());
        }
        let Some(peer) = ha_pki::peer_identity(request) else {
            warn!(rpc, remote = %remote(request), "refused: no client certificate");
            return Err(Status::unauthenticated(format!(
                "{rpc} needs a client certificate from the cluster CA"
            )));
        };
        self.refuse_revoked(request, rpc)?;
        let refused = |why: String| {
            warn!(rpc, %peer, remote = %remote(request), %why, "refused");
            Err(Status::permission_denied(format!("{rpc}: {why}")))
        };
        let removed = |node: &str| {
            NodeId::new(node)
                .ok()
                .and_then(|id| self.catalog().node(&id).map(|n| n.removed))
                .unwrap_or(false)
        };
        match caller {
            Caller::Operator if peer.role() != Role::Operator => {
                refused(format!("{peer} is not an operator certificate"))
            }
            Caller::Reader if !matches!(peer.role(), Role::Operator | Role::Observer) => refused(
                format!("{peer} is neither an operator nor an observer certificate"),
            ),
            Caller::Node(_) if !peer.role().is_node() => {
                refused(format!("{peer} is not a node agent certificate"))
            }
            Caller::Node(node) if peer.name() != node => {
                refused(format!("{peer} may not act for node {node}"))
            }
            Caller::Node(node) if removed(node) => refused(format!(
                "node {node} was removed: its certificates are refused until it joins again with a new token made for it"
            )),
            Caller::Monitor(_) | Caller::AnyMonitor if peer.role() != Role::Monitor => {
                refused(format!("{peer} is not a monitor certificate"))
            }
            Caller::Monitor(id) if peer.name() != monitor_name(id) => refused(format!(
                "{peer} may not speak for monitor {id} (expected {})",
                monitor_name(id)
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a caller whose certificate serial the catalog lists as revoked.
    fn refuse_revoked<T>(&self, request: &Request<T>, rpc: &str) -> Result<(), Status> {
        match self.revoked(request.extensions().get::<ha_pki::PeerInfo>()) {
            None => Ok(()),
            Some((node, serial, why)) => {
                warn!(rpc, %node, serial, remote = %remote(request), "refused: revoked certificate");
                Err(Status::permission_denied(format!("{rpc}: {why}")))
            }
        }
    }

    /// Node, serial and why, when the caller's certificate serial is listed as revoked.
    fn revoked(&self, peer: Option<&ha_pki::PeerInfo>) -> Option<(NodeId, String, String)> {
        let serial = peer.and_then(|i| i.serial.as_deref())?;
        let catalog = self.catalog();
        let (node, at) = catalog
            .certificate(serial)
            .and_then(|c| Some((&c.node, c.revoked_at_unix_ms?)))?;
        let why = format!(
            "certificate serial {serial} of node {node} was revoked at {}",
            catalog::unix_ms_text(at)
        );
        Some((node.clone(), serial.to_owned(), why))
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }

    /// A goal as sent: with the group's failsafe bound and, for a primary, the agent endpoint
    /// of every synchronous standby (none at all unless each one's agent port is known from
    /// its reports: the primary needs a vouch from every one of them).
    fn wire_goal(&self, catalog: &Catalog, goal: convert::Goal) -> v1::Goal {
        let group = catalog
            .node(&goal.node)
            .and_then(|n| catalog.group(&n.group));
        let (failsafe_ms, revision) =
            group.map_or((0, 0), |g| (g.settings.failsafe_ms, g.revision));
        let vouchers: Option<Vec<v1::Voucher>> =
            if goal.state == ha_proto::types::GoalState::Primary {
                self.soft(|s| {
                    goal.synchronous_standbys
                        .iter()
                        .map(|standby| {
                            let port = s.raw.get(standby).map(|o| o.agent_port)?;
                            let node = catalog.node(standby)?;
                            (port > 0).then(|| v1::Voucher {
                                node: standby.to_string(),
                                endpoint: Some(v1::Endpoint {
                                    host: node.endpoint.host.clone(),
                                    port,
                                }),
                            })
                        })
                        .collect()
                })
            } else {
                None
            };
        let mut wire = v1::Goal::from(goal);
        wire.failsafe_ms = failsafe_ms;
        wire.revision = revision;
        wire.vouchers = vouchers.unwrap_or_default();
        wire
    }

    fn soft<R>(&self, f: impl FnOnce(&mut Soft) -> R) -> R {
        f(&mut self.soft.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The certificate a joining node gets, checked before its token is consumed. With a CSR,
    /// the CA (if this monitor holds its key) signs it for the token's role, the node name and
    /// the endpoint host. Without one, the caller must already hold that node's certificate
    /// (a re-join, or a cluster whose monitors keep no CA key); the answer then carries none.
    fn join_certificate(
        &self,
        csr_pem: &str,
        caller: Option<&PeerIdentity>,
        remote: &str,
        node: &NodeId,
        endpoint: &ha_proto::types::Endpoint,
        kind: NodeKind,
    ) -> Result<Option<(String, IssuedCertificate)>, Status> {
        if matches!(self.security, Security::Plaintext) {
            return Ok(None);
        }
        let refuse = |status: Status| {
            warn!(%node, peer = ?caller.map(ToString::to_string), remote, reason = status.message(), "join refused");
            Err(status)
        };
        if csr_pem.is_empty() {
            return match caller {
                None => refuse(Status::unauthenticated(
                    "join refused: send a CSR or connect with the node's certificate",
                )),
                Some(peer) if !peer.role().is_node() || peer.name() != node.as_str() => {
                    refuse(Status::permission_denied(format!(
                        "join refused: {peer} is not the certificate of node {node}"
                    )))
                }
                Some(_) => Ok(None),
            };
        }
        self.sign_node_csr(csr_pem, kind, node, &endpoint.host, "join")
            .map(Some)
            .or_else(refuse)
    }

    /// Signs a node's CSR (for `what`: join or renewal) with the cluster CA, for the role of
    /// `kind`, the name `node` and `host` as subject alternative name, valid for the configured
    /// node certificate lifetime (capped at the CA's expiry). Returns the certificate and what
    /// the catalog records of it.
    fn sign_node_csr(
        &self,
        csr_pem: &str,
        kind: NodeKind,
        node: &NodeId,
        host: &str,
        what: &str,
    ) -> Result<(String, IssuedCertificate), Status> {
        let Security::Tls {
            signer,
            node_cert_lifetime,
            ..
        } = &self.security
        else {
            return Err(Status::failed_precondition(format!(
                "{what} refused: this cluster runs without TLS (dev mode) and has no certificates"
            )));
        };
        let Some(signer) = signer else {
            return Err(Status::failed_precondition(format!(
                "{what} refused: this cluster signs no CSR (no CA key on the monitors); use a pre-issued certificate and an empty CSR"
            )));
        };
        let ca = signer.current();
        let now = SystemTime::now();
        let validity = ha_pki::Validity::new(
            now - ha_pki::CLOCK_SKEW_ALLOWANCE,
            (now + *node_cert_lifetime).min(ca.not_after()),
        )
        .map_err(|e| Status::failed_precondition(format!("the cluster CA cannot sign: {e}")))?;
        let pem = ca
            .sign_csr(
                csr_pem,
                role_for(kind),
                node.as_str(),
                &[host.to_owned()],
                validity,
            )
            .map_err(|e| Status::invalid_argument(format!("{what} refused: CSR: {e}")))?;
        let info = ha_pki::CertInfo::from_pem(&pem).map_err(|e| {
            Status::internal(format!("the certificate just signed is unreadable: {e}"))
        })?;
        let not_after_unix_ms = info
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        info!(%node, role = %role_for(kind), san = host, serial = %info.serial,
              valid_until = %catalog::unix_ms_text(not_after_unix_ms), "signed the node's CSR ({what})");
        Ok((
            pem,
            IssuedCertificate {
                serial: info.serial,
                not_after_unix_ms,
                public_key_sha256: info.public_key_sha256,
            },
        ))
    }

    /// The CA bundle as on disk now (old and new CA during a rotation), for joining nodes.
    fn ca_bundle_pem(&self) -> Result<String, Status> {
        match &self.security {
            Security::Plaintext => Ok(String::new()),
            Security::Tls { ca_bundle, .. } => ha_pki::read_public_file(ca_bundle).map_err(|e| {
                warn!(error = %e, "cannot read the CA bundle for a joining node");
                Status::internal("the monitor cannot read its CA bundle")
            }),
        }
    }

    /// Fails with the leader hint unless this monitor leads; resets soft state on a new term.
    fn require_leader(&self) -> Result<(), Status> {
        let status = self.raft.status();
        if !status.is_leader {
            return Err(not_leader(status.leader_address()));
        }
        let now = self.now();
        self.soft(|s| {
            if s.term != status.term {
                info!(term = status.term, "leading: observations start over, no node is judged before one detection window");
                s.term = status.term;
                s.obs = Observations::new(now);
                s.raw.clear();
                s.drills.clear();
            }
        });
        Ok(())
    }

    /// Proposes a catalog command and waits until it is applied here.
    async fn propose(&self, request_id: &str, op: Op) -> Result<Applied, Status> {
        if request_id.is_empty() {
            return Err(Status::invalid_argument(
                "request_id is required (retries reuse it)",
            ));
        }
        let cmd = Command {
            request_id: request_id.to_owned(),
            at_unix_ms: unix_ms(),
            op,
        };
        let fut = self.raft.propose(machine::encode_command(&cmd));
        let started = Instant::now();
        let committed = tokio::time::timeout(PROPOSE_TIMEOUT, fut)
            .await
            .map_err(|_| Status::deadline_exceeded("the proposal was not committed in time"))
            .and_then(|r| r.map_err(raft_status));
        let outcome = committed
            .and_then(|(_, output)| machine::decode_outcome(&output).map_err(rejected_status));
        let result = match &outcome {
            Ok(_) => "committed",
            Err(s) if s.code() == tonic::Code::Aborted => "rejected",
            Err(_) => "failed",
        };
        self.metrics
            .proposal(result, started.elapsed().as_secs_f64());
        outcome
    }

    /// The catalog as of a linearizable read: the raft node answers the read barrier only after
    /// applying up to the read index, and the catalog is published before that answer.
    async fn linearizable_catalog(&self) -> Result<Arc<Catalog>, Status> {
        tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.read_index())
            .await
            .map_err(|_| Status::deadline_exceeded("the read barrier was not reached in time"))?
            .map_err(raft_status)?;
        Ok(self.catalog())
    }

    fn lease_ms(&self, catalog: &Catalog) -> u64 {
        u64::try_from(catalog.timings().lease.as_millis()).unwrap_or(u64::MAX)
    }
}

// ------------------------------------------------------------------------------------------
// Agent service
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct AgentApi(Arc<Monitor>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl agent_service_server::AgentService for AgentApi {
    async fn join(
        &self,
        request: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinResponse>, Status> {
        let m = &self.0;
        m.require_leader()?;
        let caller = ha_pki::peer_identity(&request);
        if caller.is_some() {
            m.refuse_revoked(&request, "AgentService/Join")?;
        }
        let remote = remote(&request);
        let req = request.into_inner();
        let node = convert::node_id(&req.node, "node")?;
        let kind = convert::node_kind(req.kind, "kind")?;
        let endpoint: ha_proto::types::Endpoint =
            convert::required(req.endpoint, "endpoint")?.try_into()?;
        let catalog = m.catalog();
        let refused = |e: TokenError| {
            warn!(%node, reason = %e, "join refused");
            Status::permission_denied(format!("join refused: {e}"))
        };
        // A used token is a retry when it comes from the node it admitted, with the key that
        // node joined with (checked below, once the CSR is signed): its first answer may have
        // been lost (a timeout, a leader change), and without this the node could never join.
        let now = unix_ms();
        let (grant, retry) = match catalog.verify_token(&req.token, now) {
            Ok(grant) => (grant, false),
            Err(TokenError::Used) => (
                catalog
                    .verify_used_token(&req.token, now)
                    .map_err(refused)?,
                true,
            ),
            Err(e) => return Err(refused(e)),
        };
        if grant.node != node {
            warn!(%node, token_node = %grant.node, "join refused: the token is for another node");
            return Err(Status::permission_denied(format!(
                "join refused: the token is for node {}, not {node}",
                grant.node
            )));
        }
        if grant.address != endpoint.host {
            warn!(%node, address = %endpoint.host, token_address = %grant.address,
                  "join refused: the token is for another address");
            return Err(Status::permission_denied(format!(
                "join refused: the token is for address {}, not {}",
                grant.address, endpoint.host
            )));
        }
        if grant.kind != kind {
            warn!(%node, "join refused: token is for another kind of node");
            return Err(Status::permission_denied(format!(
                "join refused: the token is for a {} node",
                grant.kind
            )));
        }
        let group = if req.group.is_empty() {
            grant.group.clone()
        } else if req.group == grant.group {
            req.group
        } else {
            return Err(Status::permission_denied(format!(
                "join refused: the token is for group {}",
                grant.group
            )));
        };
        let signed = m.join_certificate(
            &req.csr_pem,
            caller.as_ref(),
            &remote,
            &node,
            &endpoint,
            kind,
        )?;
        let ca_pem = m.ca_bundle_pem()?;
        if retry {
            let registered = catalog.node(&node).is_some_and(|n| {
                !n.removed && n.kind == kind && n.group == group && n.endpoint == endpoint
            });
            let same_key = match &signed {
                Some((_, issued)) => catalog.holds_key(&node, &issued.public_key_sha256, now),
                // Plaintext (dev) mode, or the node's own certificate presented (checked).
                None => true,
            };
            if !registered || !same_key {
                warn!(%node, registered, same_key, "join refused: the token was used, and this is not a retry of that join");
                return Err(Status::permission_denied(format!(
                    "join refused: {}",
                    TokenError::Used
                )));
            }
            info!(%node, token = %grant.id, "join retried with the same key: answered again");
        } else {
            // Token id and node name make the request id: the same node retrying its join
            // while the first is in flight applies once, while another node presenting a used
            // token is a new request, which the catalog refuses even if this leader's copy
            // does not show the token as used yet.
            m.propose(
                &format!("join-{}-{node}", grant.id),
                Op::RegisterNode {
                    node: node.clone(),
                    kind,
                    group,
                    endpoint,
                    source: Registration::JoinToken { token_id: grant.id },
                    certificate: signed.as_ref().map(|(_, c)| c.clone()),
                },
            )
            .await?;
        }
        // A certificate signed for a retry (or for a request that found its twin applied
        // already) is recorded on its own, so removing the node revokes it too.
        if let Some((_, issued)) = &signed
            && m.catalog().certificate(&issued.serial).is_none()
        {
            m.propose(
                &format!("join-certificate-{}", issued.serial),
                Op::RecordCertificate {
                    node: node.clone(),
                    certificate: issued.clone(),
                },
            )
            .await?;
        }
        let certificate_pem = signed.map(|(pem, _)| pem).unwrap_or_default();
        info!(%node, %kind, certificate_signed = !certificate_pem.is_empty(), "node joined");
        let status = m.raft.status();
        Ok(Response::new(v1::JoinResponse {
            certificate_pem,
            ca_pem,
            monitors: status
                .members
                .iter()
                .map(|(id, address)| v1::MonitorMember {
                    id: *id,
                    address: address.clone(),
                })
                .collect(),
        }))
    }

    async fn report(
        &self,
        request: Request<v1::ReportRequest>,
    ) -> Result<Response<v1::ReportResponse>, Status> {
        let m = &self.0;
        let node = request
            .get_ref()
            .observed
            .as_ref()
            .map(|o| o.node.clone())
            .unwrap_or_default();
        let relayed_by = request
            .metadata()
            .get(ha_proto::RELAYED_BY_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let caller = match relayed_by {
            Some(_) => Caller::AnyMonitor,
            None => Caller::Node(&node),
        };
        m.authorize(&request, "AgentService/Report", caller)?;
        if !m.raft.status().is_leader && relayed_by.is_none() {
            return m.relay_report(request.into_inner(), &node).await;
        }
        m.require_leader()?;
        let observed = convert::required(request.into_inner().observed, "observed")?;
        let report = Report::try_from(observed.clone())?;
        let catalog = m.catalog();
        let node = catalog
            .node(&report.node)
            .filter(|n| !n.removed)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "node {} is not registered: join with a token first",
                    report.node
                ))
            })?;
        let name = node.name.clone();
        let now = m.now();
        let (changed, drill) = m.soft(|s| {
            let changed = s.obs.record_report(report, now);
            s.raw.insert(name.clone(), observed);
            // Handed out once: an agent restarted by a crash drill must not see it again.
            (changed, s.drills.remove(&name))
        });
        if changed {
            // A new fact (a goal reached, a role changed) may allow the next step at once.
            m.decide_soon.notify_one();
        }
        let goal = catalog.goal(&name).map(|g| {
            let mut wire = m.wire_goal(&catalog, g);
            wire.drill = drill;
            wire
        });
        Ok(Response::new(v1::ReportResponse {
            goal,
            lease_ms: m.lease_ms(&catalog),
            report_interval_ms: u64::try_from(report_interval(&catalog, &node.group).as_millis())
                .unwrap_or(u64::MAX),
        }))
    }

    async fn renew(
        &self,
        request: Request<v1::RenewRequest>,
    ) -> Result<Response<v1::RenewResponse>, Status> {
        let m = &self.0;
        let name = request.get_ref().node.clone();
        m.authorize(&request, "AgentService/Renew", Caller::Node(&name))?;
        m.require_leader()?;
        let peer = ha_pki::peer_identity(&request);
        let node = convert::node_id(&name, "node")?;
        let catalog = m.catalog();
        let registered = catalog.node(&node).filter(|n| !n.removed).ok_or_else(|| {
            Status::not_found(format!(
                "renewal refused: node {node} is not registered: join with a token first"
            ))
        })?;
        // The identity comes from the caller's certificate and the catalog: the request names
        // only the node (checked against the certificate) and carries the new public key.
        if let Some(peer) = &peer
            && peer.role() != role_for(registered.kind)
        {
            warn!(%node, %peer, "renewal refused: the certificate's role is not the node's");
            return Err(Status::permission_denied(format!(
                "renewal refused: {peer} is not the certificate of the {} node {node}",
                registered.kind
            )));
        }
        let (certificate_pem, issued) = m
            .sign_node_csr(
                &request.get_ref().csr_pem,
                registered.kind,
                &node,
                &registered.endpoint.host,
                "renewal",
            )
            .inspect_err(|e| warn!(%node, reason = e.message(), "renewal refused"))?;
        m.propose(
            &format!("renew-{}", issued.serial),
            Op::RecordCertificate {
                node: node.clone(),
                certificate: issued,
            },
        )
        .await?;
        info!(%node, "certificate renewed");
        Ok(Response::new(v1::RenewResponse {
            certificate_pem,
            ca_pem: m.ca_bundle_pem()?,
        }))
    }

    type WatchGoalStream = BoxStream<v1::Goal>;

    async fn watch_goal(
        &self,
        request: Request<v1::WatchGoalRequest>,
    ) -> Result<Response<Self::WatchGoalStream>, Status> {
        let m = &self.0;
        m.authorize(
            &request,
            "AgentService/WatchGoal",
            Caller::Node(&request.get_ref().node),
        )?;
        m.require_leader()?;
        let slot = m.streams.open(
            "AgentService/WatchGoal",
            caller(&request),
            limits::MAX_WATCH_GOAL_PER_IDENTITY,
        )?;
        let node = convert::node_id(&request.into_inner().node, "node")?;
        if m.catalog().node(&node).is_none() {
            return Err(Status::not_found(format!("node {node} is not registered")));
        }
        let mut catalog = m.catalog.clone();
        let shutdown = m.shutdown.clone();
        let monitor = self.0.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = None;
            loop {
                // The goal, and the report interval of the node's group: a switchover or
                // failover starting or ending pushes the goal again with the new interval.
                let current = {
                    let c = catalog.borrow_and_update();
                    c.node(&node)
                        .map(|n| report_interval(&c, &n.group))
                        .zip(c.goal(&node))
                };
                if current != last {
                    if let Some((interval, g)) = current.clone() {
                        let mut wire = monitor.wire_goal(&catalog.borrow(), g);
                        wire.report_interval_ms =
                            u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
                        if tx.send(Ok(wire)).await.is_err() {
                            return;
                        }
                    }
                    last = current;
                }
                tokio::select! {
                    changed = catalog.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

// ------------------------------------------------------------------------------------------
// Operator service
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct OperatorApi(Arc<Monitor>);

fn group_of(catalog: &Catalog, group: &str) -> Result<String, Status> {
    if !group.is_empty() {
        return Ok(group.to_owned());
    }
    let mut groups = catalog.groups();
    match (groups.next(), groups.next()) {
        (Some(g), None) => Ok(g.name.clone()),
        (None, _) => Err(Status::failed_precondition("no group exists yet")),
        (Some(_), Some(_)) => Err(Status::invalid_argument(
            "several groups exist: name the group",
        )),
    }
}

/// The registered (not removed) node `node`, or NOT_FOUND naming it.
fn live_node<'c>(catalog: &'c Catalog, node: &NodeId) -> Result<&'c catalog::Node, Status> {
    catalog
        .node(node)
        .filter(|n| !n.removed)
        .ok_or_else(|| Status::not_found(format!("node {node} is not registered")))
}

/// The highest candidate priority (`haclt node set NODE candidate-priority`).
pub const MAX_CANDIDATE_PRIORITY: u32 = 100;

fn operation(applied: Applied) -> Response<v1::OperationResponse> {
    Response::new(v1::OperationResponse {
        committed_index: applied.index,
        epoch: applied.epoch.get(),
        message: applied.message,
    })
}

impl OperatorApi {
    fn status_response(&self, catalog: &Catalog, stale: bool) -> v1::StatusResponse {
        let m = &self.0;
        let raft = m.raft.status();
        let now = m.now();
        let (obs, raw) = m.soft(|s| {
            if raft.is_leader && s.term == raft.term {
                (s.obs.clone(), s.raw.clone())
            } else {
                (Observations::new(now), BTreeMap::new())
            }
        });
        crate::status::build(catalog, &obs, &raw, now, &raft, stale)
    }
}

#[tonic::async_trait]
impl operator_service_server::OperatorService for OperatorApi {
    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.0
            .authorize(&request, "OperatorService/Status", Caller::Reader)?;
        let m = &self.0;
        let (catalog, stale) = if request.into_inner().linearizable {
            m.require_leader()?;
            (m.linearizable_catalog().await?, false)
        } else {
            (m.catalog(), !m.raft.status().is_leader)
        };
        Ok(Response::new(self.status_response(&catalog, stale)))
    }

    async fn events(
        &self,
        request: Request<v1::EventsRequest>,
    ) -> Result<Response<v1::EventsResponse>, Status> {
        self.0
            .authorize(&request, "OperatorService/Events", Caller::Reader)?;
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit as usize
        };
        let catalog = self.0.catalog();
        Ok(Response::new(v1::EventsResponse {
            events: catalog
                .events_after(req.after_seq, limit)
                .map(crate::status::event)
                .collect(),
        }))
    }

    type FollowEventsStream = BoxStream<v1::Event>;

    async fn follow_events(
        &self,
        request: Request<v1::EventsRequest>,
    ) -> Result<Response<Self::FollowEventsStream>, Status> {
        self.0
            .authorize(&request, "OperatorService/FollowEvents", Caller::Reader)?;
        let slot = self.0.streams.open(
            "OperatorService/FollowEvents",
            caller(&request),
            limits::MAX_FOLLOW_EVENTS_PER_IDENTITY,
        )?;
        let mut after = request.into_inner().after_seq;
        let mut catalog = self.0.catalog.clone();
        let shutdown = self.0.shutdown.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let _slot = slot;
            loop {
                let fresh: Vec<v1::Event> = catalog
                    .borrow_and_update()
                    .events_after(after, usize::MAX)
                    .map(crate::status::event)
                    .collect();
                for e in fresh {
                    after = e.seq;
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = catalog.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn switchover(
        &self,
        request: Request<v1::SwitchoverRequest>,
    ) -> Result<Response<v1::OperationResponse>, Status> {
        self.0
            .authorize(&request, "OperatorService/Switchover", Caller::Operator)?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let catalog = m.catalog();
        let group = group_of(&catalog, &req.group)?;
        let to = if req.to_node.is_empty() {
            None
        } else {
            let to = convert::node_id(&req.to_node, "to_node")?;
            live_node(&catalog, &to)?;
            Some(to)
        };
        let now = m.now();
        let target = m
            .soft(|s| decide::check_switchover(&catalog, &s.obs, now, &group, to.as_ref()))
            .map_err(refusal_status)?;
        info!(%group, %target, "operator asked for a switchover");
        m.propose(&req.request_id, Op::Switchover { group, target })
            .await
            .map(operation)
    }

    async fn failover(
        &self,
        request: Request<v1::FailoverRequest>,
    ) -> Result<Response<v1::OperationResponse>, Status> {
        self.0
            .authorize(&request, "OperatorService/Failover", Caller::Operator)?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let catalog = m.catalog();
        let group = group_of(&catalog, &req.group)?;
        let now = m.now();
        m.soft(|s| decide::check_failover(&catalog, &s.obs, now, &group, req.allow_data_loss))
            .map_err(refusal_status)?;
        info!(%group, allow_data_loss = req.allow_data_loss, "operator asked for a failover");
        m.propose(
            &req.request_id,
            Op::Failover {
                group,
                allow_data_loss: req.allow_data_loss,
            },
        )
        .await
        .map(operation)
    }

    async fn set_maintenance(
        &self,
        request: Request<v1::SetMaintenanceRequest>,
    ) -> Result<Response<v1::OperationResponse>, Status> {
        self.0
            .authorize(&request, "OperatorService/SetMaintenance", Caller::Operator)?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let node = convert::node_id(&req.node, "node")?;
        let catalog = m.catalog();
        let n = catalog
            .node(&node)
            .ok_or_else(|| Status::not_found(format!("unknown node {node}")))?;
        let is_primary = catalog
            .group(&n.group)
            .is_some_and(|g| g.primary.as_ref() == Some(&node));
        let switchover_to = if req.enabled && is_primary {
            let now = m.now();
            Some(
                m.soft(|s| decide::check_switchover(&catalog, &s.obs, now, &n.group, None))
                    .map_err(refusal_status)?,
            )
        } else {
            None
        };
        m.propose(
            &req.request_id,
            Op::SetMaintenance {
                node,
                enabled: req.enabled,
                switchover_to,
            },
        )
        .await
        .map(operation)
    }

    async fn set_node_settings(
        &self,
        request: Request<v1::SetNodeSettingsRequest>,
    ) -> Result<Response<v1::OperationResponse>, Status> {
        self.0.authorize(
            &request,
            "OperatorService/SetNodeSettings",
            Caller::Operator,
        )?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let node = convert::node_id(&req.node, "node")?;
        if let Some(p) = req.candidate_priority
            && p > MAX_CANDIDATE_PRIORITY
        {
            return Err(Status::invalid_argument(format!(
                "candidate priority must be 0 to {MAX_CANDIDATE_PRIORITY}, got {p}"
            )));
        }
        if live_node(&m.catalog(), &node)?.kind != NodeKind::Postgres {
            return Err(Status::failed_precondition(format!(
                "{node} is an ejabberd node: candidate priority and replication quorum apply to PostgreSQL nodes"
            )));
        }
        m.propose(
            &req.request_id,
            Op::SetNodeSettings {
                node,
                candidate_priority: req.candidate_priority,
                replication_quorum: req.replication_quorum,
            },
        )
        .await
        .map(operation)
    }

    async fn set_group_settings(
        &self,
        request: Request<v1::SetGroupSettingsRequest>,
    ) -> Result<Response<v1::OperationResponse>, Status> {
        self.0.authorize(
            &request,
            "OperatorService/SetGroupSettings",
            Caller::Operator,
        )?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let catalog = m.catalog();
        let group = group_of(&catalog, &req.group)?;
        let mut settings = catalog
            .group(&group)
            .ok_or_else(|| Status::not_found(format!("unknown group {group:?}")))?
            .settings
            .clone();
        if let Some(k) = req.sync_quorum {
            settings.sync_quorum = k;
        }
        if let Some(bytes) = req.max_sync_lag_bytes {
            settings.max_sync_lag_bytes = bytes;
        }
        if let Some(policy) = &req.on_standby_loss {
            settings.on_standby_loss = policy.parse().map_err(Status::invalid_argument)?;
        }
        if let Some(ms) = req.failsafe_ms {
            settings.failsafe_ms = ms;
        }
        m.propose(&req.request_id, Op::SetGroupSettings { group, settings })
            .await
            .map(operation)
    }

    async fn remove_node(
        &self,
        request: Request<v1::RemoveNodeRequest>,
    ) -> Result<Response<v1::OperationResponse>, Status> {
        self.0
            .authorize(&request, "OperatorService/RemoveNode", Caller::Operator)?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let node = convert::node_id(&req.node, "node")?;
        m.propose(&req.request_id, Op::RemoveNode { node })
            .await
            .map(operation)
    }

    async fn create_join_token(
        &self,
        request: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreateJoinTokenResponse>, Status> {
        self.0.authorize(
            &request,
            "OperatorService/CreateJoinToken",
            Caller::Operator,
        )?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let kind = convert::node_kind(req.kind, "kind")?;
        if req.ttl_ms == 0 {
            return Err(Status::invalid_argument("ttl_ms must be above zero"));
        }
        let node = token_node(&req.node)?;
        let address = token_address(&req.address)?;
        let catalog = m.catalog();
        let group = if req.group.is_empty() {
            catalog
                .groups()
                .next()
                .map_or_else(|| DEFAULT_GROUP.to_owned(), |g| g.name.clone())
        } else {
            req.group
        };
        let token = catalog::token::generate();
        let expires_at_unix_ms = unix_ms().saturating_add(req.ttl_ms);
        let applied = m
            .propose(
                &req.request_id,
                Op::CreateToken {
                    token_id: token.id.clone(),
                    secret_sha256_hex: token.secret_sha256_hex,
                    kind,
                    group,
                    expires_at_unix_ms,
                    node: Some(node),
                    address: Some(address),
                },
            )
            .await?;
        // A retried request id returns the earlier outcome, for a token whose secret was
        // generated (and shown) by the earlier call: this call's secret was never stored.
        if applied.message != format!("token {} created", token.id) {
            return Err(Status::already_exists(format!(
                "request {} was applied earlier ({}); its token was shown once",
                req.request_id, applied.message
            )));
        }
        Ok(Response::new(v1::CreateJoinTokenResponse {
            token: token.plaintext,
            token_id: token.id,
            expires_at_unix_ms,
        }))
    }

    async fn revoke_join_token(
        &self,
        request: Request<v1::RevokeJoinTokenRequest>,
    ) -> Result<Response<v1::OperationResponse>, Status> {
        self.0.authorize(
            &request,
            "OperatorService/RevokeJoinToken",
            Caller::Operator,
        )?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        m.propose(
            &req.request_id,
            Op::RevokeToken {
                token_id: req.token_id,
            },
        )
        .await
        .map(operation)
        // A token rejection means "denied" to a joining node; to the operator revoking it, it
        // means there is no such usable token.
        .map_err(|s| match s.code() {
            tonic::Code::PermissionDenied => Status::not_found(s.message()),
            _ => s,
        })
    }

    async fn revoke_certificate(
        &self,
        request: Request<v1::RevokeCertificateRequest>,
    ) -> Result<Response<v1::OperationResponse>, Status> {
        self.0.authorize(
            &request,
            "OperatorService/RevokeCertificate",
            Caller::Operator,
        )?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let serial = req.serial.trim().to_ascii_lowercase().replace(':', "");
        if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "serial {:?} is not a hexadecimal serial number",
                req.serial
            )));
        }
        m.propose(&req.request_id, Op::RevokeCertificate { serial })
            .await
            .map(operation)
    }

    async fn add_monitor(
        &self,
        request: Request<v1::AddMonitorRequest>,
    ) -> Result<Response<v1::MembershipResponse>, Status> {
        self.0
            .authorize(&request, "OperatorService/AddMonitor", Caller::Operator)?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        if req.address.is_empty() {
            return Err(Status::invalid_argument("address is required"));
        }
        let status = m.raft.status();
        if let Some(existing) = status.members.get(&req.id) {
            if *existing == req.address {
                return Ok(membership(&status.members, status.commit_index));
            }
            return Err(Status::already_exists(format!(
                "monitor {} is already a member at {existing}; a wiped monitor rejoins under a new id",
                req.id
            )));
        }
        info!(id = req.id, address = %req.address, "adding a monitor");
        let members = m
            .raft
            .add_member(req.id, req.address)
            .await
            .map_err(raft_status)?;
        Ok(membership(&members, m.raft.status().commit_index))
    }

    async fn remove_monitor(
        &self,
        request: Request<v1::RemoveMonitorRequest>,
    ) -> Result<Response<v1::MembershipResponse>, Status> {
        self.0
            .authorize(&request, "OperatorService/RemoveMonitor", Caller::Operator)?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let status = m.raft.status();
        if !status.members.contains_key(&req.id) {
            return Ok(membership(&status.members, status.commit_index));
        }
        if status.members.len() <= 1 {
            return Err(Status::failed_precondition(
                "cannot remove the last monitor",
            ));
        }
        info!(id = req.id, "removing a monitor");
        let members = m.raft.remove_member(req.id).await.map_err(raft_status)?;
        Ok(membership(&members, m.raft.status().commit_index))
    }

    async fn start_drill(
        &self,
        request: Request<v1::StartDrillRequest>,
    ) -> Result<Response<v1::OperationResponse>, Status> {
        self.0
            .authorize(&request, "OperatorService/StartDrill", Caller::Operator)?;
        let m = &self.0;
        m.require_leader()?;
        let req = request.into_inner();
        let fault = v1::Fault::try_from(req.fault)
            .ok()
            .filter(|f| *f != v1::Fault::Unspecified)
            .ok_or_else(|| Status::invalid_argument("fault is required"))?;
        if req.request_id.is_empty() {
            return Err(Status::invalid_argument("request_id is required"));
        }
        if fault == v1::Fault::KillMonitorLeader {
            if !m.allow_drills {
                return Err(Status::permission_denied(
                    "drills are disabled in this monitor's configuration (allow_drills)",
                ));
            }
            warn!(id = m.id, "drill: the monitor leader exits abruptly now");
            let shutdown = m.shutdown.clone();
            tokio::spawn(async move {
                // Let the answer reach the operator, then die without any cleanup, like kill -9.
                tokio::time::sleep(Duration::from_millis(100)).await;
                drop(shutdown);
                std::process::abort();
            });
            return Ok(Response::new(v1::OperationResponse {
                message: format!("monitor {} is exiting", m.id),
                ..Default::default()
            }));
        }
        let node = convert::node_id(&req.target, "target")?;
        if m.catalog().node(&node).is_none() {
            return Err(Status::not_found(format!("unknown node {node}")));
        }
        let duration_ms = req.duration_ms.max(1);
        let order = v1::DrillOrder {
            id: req.request_id.clone(),
            fault: fault.into(),
            duration_ms,
            not_after_unix_ms: unix_ms() + 5_000,
        };
        info!(%node, fault = ?fault, duration_ms, "drill order queued for the node's agent");
        m.soft(|s| s.drills.insert(node.clone(), order));
        Ok(Response::new(v1::OperationResponse {
            message: format!("drill {} queued for {node}", req.request_id),
            ..Default::default()
        }))
    }
}

fn membership(members: &consensus::Members, index: u64) -> Response<v1::MembershipResponse> {
    Response::new(v1::MembershipResponse {
        members: members
            .iter()
            .map(|(id, address)| v1::MonitorMember {
                id: *id,
                address: address.clone(),
            })
            .collect(),
        committed_index: index,
    })
}

// ------------------------------------------------------------------------------------------
// Peer service
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct PeerApi(Arc<Monitor>);

#[tonic::async_trait]
impl peer_service_server::PeerService for PeerApi {
    async fn raft(&self, request: Request<v1::RaftBatch>) -> Result<Response<v1::RaftAck>, Status> {
        self.0.authorize(
            &request,
            "PeerService/Raft",
            Caller::Monitor(request.get_ref().from),
        )?;
        let incarnation = request
            .metadata()
            .get(incarnation::METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| Status::invalid_argument("raft batch without a valid incarnation"))?;
        let claimed = request
            .metadata()
            .get(incarnation::PEER_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let batch = request.into_inner();
        // A removed monitor that missed its own removal keeps campaigning: tell it to stop.
        let members = self.0.raft.status().members;
        if !members.is_empty() && !members.contains_key(&batch.from) {
            return Err(Status::failed_precondition(format!(
                "{}: monitor {} was removed (members: {:?}); add it back under a new id",
                incarnation::NOT_A_MEMBER,
                batch.from,
                members.keys().collect::<Vec<_>>()
            )));
        }
        let own = {
            let mut records = incarnation::lock(&self.0.incarnations);
            if let Some(claimed) = claimed
                && let Err(why) = records.check_claim(self.0.id, batch.from, claimed)
            {
                // This member is the wiped one: stop before stepping anything of the group.
                self.0.raft.refuse(why.clone());
                return Err(Status::failed_precondition(why));
            }
            if let Err(why) = records.check(batch.from, incarnation) {
                warn!(from = batch.from, %why, "raft batch refused");
                return Err(Status::failed_precondition(why));
            }
            records.own()
        };
        let messages = transport::decode(&batch.messages)
            .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))?;
        for msg in messages {
            if msg.from != batch.from || msg.to != self.0.id {
                return Err(Status::invalid_argument(format!(
                    "raft message from {} to {} in a batch from {} to {}",
                    msg.from, msg.to, batch.from, self.0.id
                )));
            }
            self.0.raft.step(msg).map_err(raft_status)?;
        }
        let mut answer = Response::new(v1::RaftAck {});
        if let Ok(v) = own.to_string().parse() {
            answer.metadata_mut().insert(incarnation::METADATA, v);
        }
        Ok(answer)
    }
}

// ------------------------------------------------------------------------------------------
// Leader loops
// ------------------------------------------------------------------------------------------

/// Runs `decide` while leading and proposes its decisions.
async fn decide_loop(m: Arc<Monitor>) {
    let mut tick = tokio::time::interval(DECIDE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counter = 0u64;
    let mut memo = decide::Memo::default();
    let mut committed = m.catalog.clone();
    let mut next_pass = tokio::time::Instant::now();
    loop {
        // Besides the tick (time passing is what turns silence into failure), a pass runs as
        // soon as a report says something new or the catalog changes (an operator request, or
        // this loop's own decision committed): each step of a switchover or failover then
        // waits for the fact it needs, not for the next tick.
        tokio::select! {
            _ = tick.tick() => {}
            () = m.decide_soon.notified() => {}
            changed = committed.changed() => if changed.is_err() { return },
            () = m.shutdown.cancelled() => return,
        }
        // Early passes are spaced by four times the last pass's duration, so that under a
        // stream of changing reports deciding takes at most a fifth of a core.
        tokio::time::sleep_until(next_pass).await;
        let started = tokio::time::Instant::now();
        if m.require_leader().is_err() {
            continue;
        }
        let catalog = committed.borrow_and_update().clone();
        let now = m.now();
        // Decide on a copy: reports must not wait for the decision function.
        let obs = m.soft(|s| s.obs.clone());
        // A pass over thousands of groups takes milliseconds of CPU: run it on a blocking
        // thread, so the report handlers queued behind it on this worker do not wait for it.
        // While the copy lives, every report copies the path to its entry: it is dropped at
        // the end of the pass.
        let mut pass_memo = std::mem::take(&mut memo);
        let decided = tokio::task::spawn_blocking(move || {
            let decisions = pass_memo.decide(&catalog, &obs, now);
            (decisions, pass_memo)
        });
        let decisions = match decided.await {
            Ok((decisions, used)) => {
                memo = used;
                decisions
            }
            Err(e) => {
                error!(error = %e, "the decision pass failed");
                continue;
            }
        };
        next_pass = started + (started.elapsed() * 4).clamp(MIN_DECIDE_GAP, DECIDE_EVERY);
        let term = m.raft.status().term;
        // Decisions concern different groups, so they are proposed together: raft carries
        // them in the same batches and one disk write, where one at a time a mass event
        // (a rack of nodes gone at once) would be decided at the pace of one commit per group.
        let proposals = decisions.into_iter().map(|d| {
            counter += 1;
            let request_id = format!("decide-m{}-t{term}-{counter}", m.id);
            let m = &m;
            async move {
                let group = d.group.clone();
                let kinds: Vec<String> = d.events.iter().map(|e| e.kind.clone()).collect();
                match m.propose(&request_id, Op::Decide(d)).await {
                    Ok(a) => {
                        for kind in &kinds {
                            m.metrics.decision(kind);
                        }
                        debug!(%group, index = a.index, "decision committed");
                    }
                    Err(s) if s.code() == tonic::Code::Aborted => {
                        debug!(%group, reason = s.message(), "decision superseded")
                    }
                    Err(s) => {
                        warn!(%group, code = ?s.code(), reason = s.message(), "decision not committed")
                    }
                }
            }
        });
        futures::future::join_all(proposals).await;
    }
}

/// Probes the port of every PostgreSQL node whose agent is silent, while leading, every
/// [`PROBE_EVERY`]: often, because a refused probe after two missed reports is what lets
/// `decide` act on a crash without waiting for `unhealthy_after`, and cheap, because only
/// silent nodes are probed.
async fn probe_loop(m: Arc<Monitor>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = m.shutdown.cancelled() => return,
        }
        if m.require_leader().is_err() {
            continue;
        }
        let catalog = m.catalog();
        let interval = catalog.timings().report_interval;
        let now = m.now();
        // Only a node whose agent went quiet needs the leader's own look: the probe tells a
        // dead agent beside a live database from a dead database, and reporting nodes would
        // cost a connection each per interval for nothing. Quiet means one and a half
        // intervals: a report merely late by jitter is not worth a probe, and `decide` needs
        // the probe only once two reports are missing.
        let quiet = interval * 3 / 2;
        // One O(1) copy of the observations: the scan below must not hold the lock that every
        // report handler takes.
        let obs = m.soft(|s| s.obs.clone());
        let silent = |n: &NodeId| {
            obs.node(n)
                .and_then(|o| o.report_at)
                .is_none_or(|at| now.saturating_sub(at) >= quiet)
        };
        let targets: Vec<(NodeId, String)> = catalog
            .nodes()
            .filter(|n| n.kind == NodeKind::Postgres && !n.removed && silent(&n.name))
            .map(|n| (n.name.clone(), n.endpoint.to_string()))
            .collect();
        drop(obs);
        let probes = targets.into_iter().map(|(node, addr)| async move {
            let result = probe_postgres(&addr, interval).await;
            debug!(%node, %addr, ?result, "probed a silent node's PostgreSQL port");
            (node, result)
        });
        let results = futures::future::join_all(probes).await;
        let now = m.now();
        let news = m.soft(|s| {
            results.into_iter().fold(false, |news, (node, result)| {
                s.obs.record_probe(node, result, now) || news
            })
        });
        if news {
            // A port that stopped answering may complete the evidence of a crash.
            m.decide_soon.notify_one();
        }
    }
}

/// Names a node may not take: they are roles of certificates (an operator's certificate named
/// `operator` logs into PostgreSQL as its superuser through the certificate mapping) or of the
/// database (the agent's roles).
const RESERVED_NODE_NAMES: [&str; 7] = [
    "operator",
    "observer",
    "monitor",
    "postgres",
    "replicator",
    "ejabberd",
    "root",
];

/// The node a new join token admits: a valid node name that is not reserved.
fn token_node(name: &str) -> Result<NodeId, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(
            "a join token is made for one node: name it (node)",
        ));
    }
    let node = convert::node_id(name, "node")?;
    if RESERVED_NODE_NAMES.contains(&name) {
        return Err(Status::invalid_argument(format!(
            "{name:?} is reserved (a certificate or database role), not a node name"
        )));
    }
    Ok(node)
}

/// The address a new join token admits: an IP address or a host name (letters, digits, `-`
/// and `.`), the host of the node's endpoint and the name in its certificate.
fn token_address(address: &str) -> Result<String, Status> {
    let host_name = !address.is_empty()
        && address.len() <= 253
        && address
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if address.parse::<std::net::IpAddr>().is_ok() || host_name {
        Ok(address.to_owned())
    } else {
        Err(Status::invalid_argument(format!(
            "address must be the node's IP address or host name, not {address:?}"
        )))
    }
}

/// How often the nodes of `group` are asked to report: [`OPERATION_REPORT_INTERVAL`] while
/// a switchover or failover is under way, since its next step may wait for a fact only a
/// periodic report carries (a switchover's target holding the drained primary's last LSN),
/// and the configured interval otherwise.
fn report_interval(catalog: &Catalog, group: &str) -> Duration {
    let timings = catalog.timings();
    if catalog.group(group).is_some_and(|g| g.operation.is_some()) {
        OPERATION_REPORT_INTERVAL.min(timings.report_interval)
    } else {
        timings.report_interval
    }
}

/// PostgreSQL's SSLRequest: length 8, code 80877103. Any server answers it with one byte
/// (`S` or `N`) before authentication, so no credentials are needed.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// One probe of a PostgreSQL port: Ok when the server answers an SSLRequest, Refused when
/// nothing listens, Timeout otherwise. A bare TCP connect is not enough: the kernel completes
/// the handshake for a frozen (SIGSTOPped) postmaster, which must not look alive.
async fn probe_postgres(addr: &str, timeout: Duration) -> ProbeResult {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => ProbeResult::Ok,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => ProbeResult::Refused,
        Ok(Err(_)) | Err(_) => ProbeResult::Timeout,
    }
}

// ------------------------------------------------------------------------------------------
// Start and stop
// ------------------------------------------------------------------------------------------

/// Why the monitor could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("raft storage at {path}: {source}")]
    Storage {
        path: String,
        source: crate::storage::StorageError,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] consensus::StartError),
    #[error("incarnation records: {0}")]
    Incarnation(#[from] crate::incarnation::IncarnationError),
    #[error("{0}")]
    Refused(String),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[from] ha_pki::TlsError),
    #[error("CA key {path}: {reason}")]
    CaKey { path: String, reason: String },
}

/// TLS state of a running monitor: what the server, the peer clients and the CSR signer use
/// (all reloaded together), and the security the services apply.
struct TlsSetup {
    server: Arc<ServerTls>,
    peers: Arc<ClientTls>,
    signer: Option<Arc<CaSigner>>,
    security: Security,
}

impl TlsSetup {
    /// Everything the reload watcher re-reads on SIGHUP or a changed file.
    fn reloadable(&self) -> Vec<Arc<dyn Reload>> {
        let mut targets: Vec<Arc<dyn Reload>> = vec![self.server.clone(), self.peers.clone()];
        targets.extend(self.signer.clone().map(|s| s as Arc<dyn Reload>));
        targets
    }
}

/// Loads certificates (and the CA key, refused unless mode 0600) before anything starts, so a
/// bad file stops the monitor at once rather than at the first connection.
fn load_tls(files: &config::TlsFiles) -> Result<TlsSetup, ServeError> {
    let tls_files = files.tls();
    let server = Arc::new(ServerTls::load_with(
        tls_files.clone(),
        ClientAuth::Optional,
    )?);
    let peers = Arc::new(ClientTls::load(tls_files)?);
    let signer = match &files.ca_key {
        None => None,
        Some(path) => Some(Arc::new(CaSigner::load(&files.ca, path).map_err(|e| {
            ServeError::CaKey {
                path: path.display().to_string(),
                reason: e.to_string(),
            }
        })?)),
    };
    Ok(TlsSetup {
        server,
        peers,
        security: Security::Tls {
            ca_bundle: files.ca.clone(),
            signer: signer.clone(),
            node_cert_lifetime: files.node_certificate_lifetime,
        },
        signer,
    })
}

/// Runs one monitor until `shutdown` is cancelled or this member is removed from the group.
/// The listener is bound by the caller (tests bind `127.0.0.1:0`).
pub async fn run(
    config: MonitorConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let db_path = config.data_dir.join("raft.redb");
    let fresh_log = !db_path.exists();
    let store = open_store(&db_path)?;
    let incarnations = Arc::new(Mutex::new(Incarnations::open(&config.data_dir, fresh_log)?));
    let (security, tls) = match config.tls.as_ref().map(load_tls).transpose()? {
        Some(t) => {
            let reloadable = t.reloadable();
            (t.security, Some((t.server, t.peers, reloadable)))
        }
        None => (Security::Plaintext, None),
    };
    let (machine, catalog) = CatalogMachine::new();
    let channels = match &tls {
        Some((_, peers, _)) => transport::tls_channels(peers.clone()),
        None => transport::plaintext_channels(),
    };
    let transport = GrpcTransport::new(
        config.id,
        incarnations.clone(),
        tokio::runtime::Handle::current(),
        channels.clone(),
        config.members.clone(),
    );
    let settings = RaftSettings {
        tick: config.timings.raft_tick,
        election_ticks: config.timings.election_ticks as usize,
        ..RaftSettings::new(config.id)
    };
    let bootstrap = (!config.join).then(|| config.members.clone());
    let (raft, raft_thread) = consensus::spawn(settings, store, machine, transport, bootstrap)?;
    let monitor = Arc::new(Monitor {
        id: config.id,
        incarnations,
        raft: raft.clone(),
        catalog,
        soft: Mutex::new(Soft {
            term: 0,
            obs: Observations::default(),
            raw: BTreeMap::new(),
            drills: BTreeMap::new(),
        }),
        decide_soon: tokio::sync::Notify::new(),
        started: Instant::now(),
        allow_drills: config.allow_drills,
        security,
        shutdown: shutdown.clone(),
        relay: Relay {
            channels: channels.clone(),
            leader: Mutex::new(None),
        },
        streams: limits::Streams::default(),
        metrics: crate::metrics::Counters::default(),
    });
    info!(id = config.id, listen = %config.listen, advertise = %config.advertise, members = ?config.members, "monitor starting");

    tokio::spawn(decide_loop(monitor.clone()));
    tokio::spawn(probe_loop(monitor.clone()));
    tokio::spawn(timings_loop(monitor.clone(), config.timings.catalog()));
    tokio::spawn(count_leader_changes(monitor.clone()));
    // The process lives as long as its raft thread: a removed or refused member stops, and so
    // does one whose raft thread died (raft-rs panics on a broken invariant).
    let stop_with_raft = shutdown.clone();
    let raft_exit = tokio::task::spawn_blocking(move || {
        let result = raft_thread.join();
        stop_with_raft.cancel();
        result.is_err()
    });

    // Only monitors may send Raft's large batches: anyone else is refused before the body is
    // read (the call itself checks the monitor's name).
    let plaintext = matches!(monitor.security, Security::Plaintext);
    let monitors_only = move |request: Request<()>| {
        if !plaintext {
            ha_pki::require_role(&request, &[Role::Monitor])?;
        }
        Ok(request)
    };
    let grpc = tonic::service::Routes::new(
        agent_service_server::AgentServiceServer::new(AgentApi(monitor.clone()))
            .max_decoding_message_size(limits::MAX_REQUEST_BYTES)
            .max_encoding_message_size(limits::MAX_RESPONSE_BYTES),
    )
    .add_service(
        operator_service_server::OperatorServiceServer::new(OperatorApi(monitor.clone()))
            .max_decoding_message_size(limits::MAX_REQUEST_BYTES)
            .max_encoding_message_size(limits::MAX_RESPONSE_BYTES),
    )
    .add_service(tonic::service::interceptor::InterceptedService::new(
        peer_service_server::PeerServiceServer::new(PeerApi(monitor.clone()))
            .max_decoding_message_size(limits::MAX_RAFT_BATCH_BYTES)
            .max_encoding_message_size(limits::MAX_RESPONSE_BYTES),
        monitors_only,
    ));
    // `/metrics` beside the gRPC services, for Prometheus (HTTP/1.1 too).
    let page = monitor.clone();
    let routes = grpc.into_axum_router().route(
        "/metrics",
        axum::routing::get(move |request: axum::extract::Request| {
            let page = page.clone();
            async move { metrics_page(&page, &request) }
        }),
    );
    let router = limits::server_builder()
        .accept_http1(true)
        .add_routes(routes.into());
    let served = match tls {
        None => {
            router
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    shutdown.cancelled(),
                )
                .await
        }
        Some((server_tls, _, reloadable)) => {
            // SIGHUP or changed files reload both sides and the CA key; new connections use
            // the new files, the next CSR is signed by the CA the key file holds.
            let watcher = ReloadWatcher::new(reloadable, TLS_RELOAD_POLL)?;
            tokio::spawn(watcher.run(shutdown.clone().cancelled_owned()));
            router
                .serve_with_incoming_shutdown(
                    ha_pki::tls_incoming(listener, server_tls),
                    shutdown.cancelled(),
                )
                .await
        }
    };
    shutdown.cancel();
    raft.stop();
    let panicked = raft_exit.await.unwrap_or(true);
    info!(id = config.id, "monitor stopped");
    served.map_err(ServeError::from)?;
    match raft.status().refused {
        Some(why) => Err(ServeError::Refused(why)),
        None if panicked => Err(ServeError::Refused(
            "the raft thread died on a broken invariant (see the panic above); the data directory may be inconsistent with the group".into(),
        )),
        None => Ok(()),
    }
}

fn open_store(path: &Path) -> Result<RaftStore, ServeError> {
    RaftStore::open(path).map_err(|source| ServeError::Storage {
        path: path.display().to_string(),
        source,
    })
}

/// Counts every change of the Raft leader this monitor sees (`ha_monitor_raft_leader_changes`).
async fn count_leader_changes(m: Arc<Monitor>) {
    let mut status = m.raft.watch_status();
    let mut leader = status.borrow().leader_id;
    loop {
        tokio::select! {
            r = status.changed() => if r.is_err() { return },
            () = m.shutdown.cancelled() => return,
        }
        let now = status.borrow().leader_id;
        if now != leader && now != 0 {
            m.metrics.leader_changed();
        }
        leader = now;
    }
}

/// `GET /metrics` (`crate::metrics`): for any certificate of the cluster CA that is not revoked
/// (none with `--dev`); a connection without one (a joiner's) is answered 403.
fn metrics_page(m: &Arc<Monitor>, request: &axum::extract::Request) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    let peer = request.extensions().get::<ha_pki::PeerInfo>();
    let identified = peer.is_some_and(|p| p.identity.is_some());
    let (code, body) = if let Some((_, _, why)) = m.revoked(peer) {
        (StatusCode::FORBIDDEN, format!("{why}\n"))
    } else if identified || matches!(m.security, Security::Plaintext) {
        let raft = m.raft.status();
        let status = OperatorApi(m.clone()).status_response(&m.catalog(), !raft.is_leader);
        (
            StatusCode::OK,
            crate::metrics::render(&raft, &status, &m.metrics),
        )
    } else {
        (
            StatusCode::FORBIDDEN,
            "a client certificate of the cluster CA is required (an observer one will do)\n"
                .to_owned(),
        )
    };
    let mut response = axum::response::Response::new(axum::body::Body::from(body));
    *response.status_mut() = code;
    if code == StatusCode::OK {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(crate::metrics::OPENMETRICS),
        );
    }
    response
}

/// Makes the replicated timings match this monitor's configuration once it leads (the
/// configuration files of all monitors are expected to agree; the last leader's wins).
async fn timings_loop(m: Arc<Monitor>, wanted: catalog::Timings) {
    let mut status = m.raft.watch_status();
    loop {
        tokio::select! {
            r = status.wait_for(|s| s.is_leader) => if r.is_err() { return },
            () = m.shutdown.cancelled() => return,
        }
        if *m.catalog().timings() != wanted {
            let id = format!("timings-m{}-t{}", m.id, m.raft.status().term);
            match m.propose(&id, Op::SetTimings(wanted.clone())).await {
                Ok(_) => {
                    info!(timings = ?wanted, "replicated timings set from this monitor's configuration")
                }
                Err(s) => warn!(reason = s.message(), "could not set the replicated timings"),
            }
        }
        tokio::select! {
            r = status.wait_for(|s| !s.is_leader) => if r.is_err() { return },
            () = m.shutdown.cancelled() => return,
        }
    }
}
