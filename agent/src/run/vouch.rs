//! The failsafe: a primary keeps serving past its lease while no monitor leader answers, as long
//! as every synchronous standby vouches for it (the argument: docs/design.md, "Failsafe").
//!
//! Standby side ([`Vouching`], served on the agent port by [`serve`]): a vouch is granted to the
//! primary's agent (its node certificate, checked by mutual TLS) only while this standby's goal
//! is to follow exactly that primary at exactly that epoch, its PostgreSQL streams from it, its
//! own last answered report is older than two report intervals (it cannot reach a monitor
//! leader either: a call to a stopped monitor takes a whole RPC timeout to fail, so silence is
//! noticed sooner than a failure) and at most the group's failsafe bound old. A grant is a promise: until it ends (plus [`HOLD_MARGIN`]) the agent acts on no
//! other goal, so it cannot stop replicating (the monitors' failover waits for that) or be
//! promoted while the primary may still count on it. The promise's end is recorded like the
//! lease (boot clock, [`LeaseRecord`]), so a restarted agent keeps it; not knowing for whom,
//! it then holds every goal until the end.
//!
//! Primary side ([`Vouchers`]): once no report was answered for two report intervals, the
//! primary's agent asks every
//! voucher its goal names, in parallel, for the current lease length; only if all of them grant
//! does its writable deadline move to the send time of that round plus the shortest grant.
//!
//! Invariants: a standby never grants while it could be told by the monitors to stop (its
//! reports are answered), never for another goal than the one it follows, never for longer than
//! the lease it was last granted itself, and never past `last answered report + failsafe +
//! lease` (the monitors' bound for a silent standby: `decide`'s `vouch_over`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ha_pki::{ClientTls, MtlsConnector, PeerIdentity, Role, ServerTls};
use ha_proto::convert::Goal;
use ha_proto::types::{Endpoint, Epoch, GoalState};
use ha_proto::{NodeId, v1};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::lease::LeaseRecord;
use v1::agent_peer_service_client::AgentPeerServiceClient;
use v1::agent_peer_service_server::{AgentPeerService, AgentPeerServiceServer};

const VOUCH_FILE: &str = "vouch";
/// Added to a vouch's end before the standby acts on another goal: the primary counts its end
/// from when it sent the request (earlier than the grant), so this covers only a difference in
/// the two hosts' clock rates, generously.
pub const HOLD_MARGIN: Duration = Duration::from_millis(200);

/// A standby's promise not to act on another goal before `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Promise {
    /// The primary and epoch it was given for; `None` when inherited from a previous run.
    to: Option<(NodeId, Epoch)>,
    until: Instant,
}

/// What the standby side knows, shared between the reconcile loop and the agent port.
#[derive(Debug, Default)]
struct Shared {
    /// The goal being followed: primary and epoch, for a standby goal only.
    following: Option<(NodeId, Epoch)>,
    failsafe: Duration,
    streaming_from: Option<NodeId>,
    /// Send time of the last answered report, and the lease that answer granted.
    answered: Option<(Instant, Duration)>,
    /// No answered report for this long: the monitors are out of reach.
    quiet: Duration,
    promise: Option<Promise>,
    /// Whether the last request was granted (logged on change only).
    granting: Option<bool>,
}

/// The standby side of the failsafe (see the module documentation).
#[derive(Debug, Clone)]
pub struct Vouching {
    shared: Arc<Mutex<Shared>>,
    record: LeaseRecord,
}

impl Vouching {
    /// Loads a promise a previous run left unfinished.
    pub fn new(state_dir: &Path, node: &NodeId) -> Self {
        let record = LeaseRecord::named(state_dir, VOUCH_FILE);
        let now = Instant::now();
        let inherited = record.inherited(now);
        let mut shared = Shared::default();
        if inherited > now {
            warn!(%node, left_ms = (inherited - now).as_millis(),
                  "a vouch of the previous run still binds this standby: holding every goal until it ends");
            shared.promise = Some(Promise {
                to: None,
                until: inherited,
            });
        }
        Self {
            shared: Arc::new(Mutex::new(shared)),
            record,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The goal now followed (any goal: only a standby goal makes vouches possible).
    pub fn set_goal(&self, goal: &Goal, failsafe: Duration) {
        let mut s = self.lock();
        s.following = match (&goal.state, &goal.upstream) {
            (GoalState::Standby, Some((primary, _))) => Some((primary.clone(), goal.epoch)),
            _ => None,
        };
        s.failsafe = failsafe;
    }

    /// What the last observation saw: the node PostgreSQL streams from, if it does.
    pub fn set_streaming(&self, from: Option<NodeId>) {
        self.lock().streaming_from = from;
    }

    /// A report sent at `sent_at` was answered with a lease of `lease` (0: none given).
    pub fn report_answered(&self, sent_at: Instant, lease: Duration) {
        let mut s = self.lock();
        if s.answered.is_none_or(|(t, _)| t <= sent_at) {
            s.answered = Some((sent_at, lease));
        }
    }

    /// How long without an answered report means the monitors are out of reach.
    pub fn set_quiet(&self, quiet: Duration) {
        self.lock().quiet = quiet;
    }

    /// Grants a vouch to `primary` for `epoch`, or says why not. `length` is capped at the
    /// lease this standby was last granted itself.
    pub fn grant(
        &self,
        primary: &NodeId,
        epoch: Epoch,
        length: Duration,
        now: Instant,
    ) -> Result<Duration, String> {
        let mut s = self.lock();
        let result = Self::check(&s, primary, epoch, length, now);
        let granted = result.is_ok();
        if s.granting != Some(granted) {
            match &result {
                Ok(len) => warn!(%primary, %epoch, length_ms = len.as_millis(),
                                 "no monitor leader answers: vouching for the primary (failsafe)"),
                Err(why) => info!(%primary, %epoch, reason = %why, "vouch refused"),
            }
            s.granting = Some(granted);
        }
        let length = result?;
        let until = now + length;
        let end = s.promise.as_ref().map_or(until, |p| p.until.max(until));
        s.promise = Some(Promise {
            to: Some((primary.clone(), epoch)),
            until: end,
        });
        // Recorded before the answer leaves: a restart must find it.
        self.record.store(end);
        Ok(length)
    }

    fn check(
        s: &Shared,
        primary: &NodeId,
        epoch: Epoch,
        length: Duration,
        now: Instant,
    ) -> Result<Duration, String> {
        if s.failsafe.is_zero() {
            return Err("the failsafe is off for this group".into());
        }
        match &s.following {
            Some((p, e)) if p == primary && *e == epoch => {}
            Some((p, e)) => {
                return Err(format!(
                    "this standby follows {p} at {e}, not {primary} at {epoch}"
                ));
            }
            None => return Err("this node is not a standby".into()),
        }
        if let Some(p) = &s.promise
            && now < p.until
            && p.to.as_ref() != Some(&(primary.clone(), epoch))
        {
            return Err("still bound by another vouch".into());
        }
        if s.streaming_from.as_ref() != Some(primary) {
            return Err(format!("this standby does not stream from {primary}"));
        }
        let (last, lease) = s
            .answered
            .ok_or("no report of this agent's run was answered yet")?;
        let since = now.saturating_duration_since(last);
        if since < s.quiet {
            return Err(format!(
                "the monitor leader answered this standby's report sent {since:?} ago"
            ));
        }
        if since > s.failsafe {
            return Err(format!(
                "no answered report for {since:?}, past the failsafe bound {:?}",
                s.failsafe
            ));
        }
        let length = length.min(lease);
        if length.is_zero() {
            return Err("nothing to grant: no lease length known".into());
        }
        Ok(length)
    }

    /// When `goal` may be acted upon, if a promise holds it back: every goal but following the
    /// primary the promise was given to, at its epoch.
    pub fn hold_until(&self, goal: &Goal, now: Instant) -> Option<Instant> {
        let s = self.lock();
        let p = s.promise.as_ref()?;
        let end = p.until + HOLD_MARGIN;
        if now >= end {
            return None;
        }
        let following = match (&goal.state, &goal.upstream) {
            (GoalState::Standby, Some((primary, _))) => Some((primary.clone(), goal.epoch)),
            _ => None,
        };
        (p.to.is_none() || following != p.to).then_some(end)
    }

    /// How long the current promise still binds, for the report.
    pub fn left(&self, now: Instant) -> Duration {
        self.lock().promise.as_ref().map_or(Duration::ZERO, |p| {
            (p.until + HOLD_MARGIN).saturating_duration_since(now)
        })
    }

    /// The primary the promise was given to, for log lines.
    pub fn promised_to(&self) -> Option<NodeId> {
        self.lock()
            .promise
            .as_ref()
            .and_then(|p| p.to.as_ref().map(|(n, _)| n.clone()))
    }
}

struct PeerApi {
    vouching: Vouching,
}

#[tonic::async_trait]
impl AgentPeerService for PeerApi {
    async fn vouch(
        &self,
        request: Request<v1::VouchRequest>,
    ) -> Result<Response<v1::VouchResponse>, Status> {
        let identity = ha_pki::require_role(&request, &[Role::Postgres])?;
        let req = request.into_inner();
        let primary = ha_proto::convert::node_id(&req.primary, "primary")?;
        if identity.name() != primary.as_str() {
            warn!(peer = %identity, %primary, "vouch denied: asked for another node");
            return Err(Status::permission_denied(format!(
                "{identity} may not ask a vouch for {primary}"
            )));
        }
        if req.length_ms == 0 {
            return Err(Status::invalid_argument("length_ms must not be 0"));
        }
        let length = Duration::from_millis(req.length_ms);
        match self
            .vouching
            .grant(&primary, Epoch(req.epoch), length, Instant::now())
        {
            Ok(granted) => Ok(Response::new(v1::VouchResponse {
                length_ms: u64::try_from(granted.as_millis()).unwrap_or(u64::MAX),
            })),
            Err(why) => Err(Status::failed_precondition(why)),
        }
    }
}

/// Serves the agent port on `listener` until `shutdown`: mutual TLS; the vouches (gRPC, node
/// certificates only) and the health endpoints (HTTP/1.1 or HTTP/2, any certificate of the
/// cluster CA, [`super::health`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<ServerTls>,
    vouching: Vouching,
    health: super::health::Health,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let addr = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    info!(%addr, "serving the agent port (vouches for the primary, health endpoints)");
    let grpc = tonic::service::Routes::new(AgentPeerServiceServer::new(PeerApi { vouching }));
    let routes = super::health::add_routes(grpc.into_axum_router(), &health);
    Server::builder()
        .accept_http1(true)
        .add_routes(routes.into())
        .serve_with_incoming_shutdown(ha_pki::tls_incoming(listener, tls), shutdown.cancelled())
        .await
        .map_err(|e| format!("agent port {addr}: {}", ha_pki::error_chain(&e)))
}

/// The primary side: asks the vouchers its goal names (see the module documentation).
#[derive(Debug, Clone)]
pub struct Vouchers {
    tls: Arc<ClientTls>,
    timeout: Duration,
    channels: Arc<Mutex<HashMap<(NodeId, Endpoint), Channel>>>,
}

/// The outcome of one round of vouch requests.
#[derive(Debug)]
pub struct VouchRound {
    pub sent_at: Instant,
    pub epoch: Epoch,
    /// The shortest grant, or every refusal and failure.
    pub result: Result<Duration, String>,
}

impl Vouchers {
    pub fn new(tls: Arc<ClientTls>, timeout: Duration) -> Self {
        Self {
            tls,
            timeout,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    async fn channel(&self, node: &NodeId, at: &Endpoint) -> Result<Channel, String> {
        let key = (node.clone(), at.clone());
        if let Some(c) = self
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(c.clone());
        }
        let peer = PeerIdentity::new(Role::Postgres, node.as_str()).map_err(|e| e.to_string())?;
        let channel = ha_pki::endpoint(&format!("https://{at}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .connect_with_connector(MtlsConnector::to_agent(self.tls.clone(), peer))
            .await
            .map_err(|e| ha_pki::error_chain(&e))?;
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, channel.clone());
        Ok(channel)
    }

    fn forget(&self, node: &NodeId, at: &Endpoint) {
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(node.clone(), at.clone()));
    }

    async fn ask(
        &self,
        me: &NodeId,
        epoch: Epoch,
        length: Duration,
        node: &NodeId,
        at: &Endpoint,
    ) -> Result<Duration, String> {
        let channel = self.channel(node, at).await?;
        let request = v1::VouchRequest {
            primary: me.to_string(),
            epoch: epoch.get(),
            length_ms: u64::try_from(length.as_millis()).unwrap_or(u64::MAX),
        };
        match AgentPeerServiceClient::new(channel).vouch(request).await {
            // Never trust a grant longer than asked for.
            Ok(r) => Ok(Duration::from_millis(r.into_inner().length_ms).min(length)),
            Err(s) => {
                if s.code() != tonic::Code::FailedPrecondition {
                    self.forget(node, at);
                }
                Err(s.message().to_owned())
            }
        }
    }

    /// Asks every voucher at once; all must grant.
    pub async fn round(
        &self,
        me: NodeId,
        epoch: Epoch,
        length: Duration,
        vouchers: Vec<(NodeId, Endpoint)>,
    ) -> VouchRound {
        let sent_at = Instant::now();
        let mut asks = JoinSet::new();
        for (node, at) in vouchers {
            let this = self.clone();
            let me = me.clone();
            asks.spawn(async move {
                let r = this.ask(&me, epoch, length, &node, &at).await;
                (node, r)
            });
        }
        let mut shortest: Option<Duration> = None;
        let mut refusals = Vec::new();
        while let Some(joined) = asks.join_next().await {
            match joined {
                Ok((_, Ok(len))) => shortest = Some(shortest.map_or(len, |s| s.min(len))),
                Ok((node, Err(why))) => refusals.push(format!("{node}: {why}")),
                Err(e) => refusals.push(format!("vouch request failed: {e}")),
            }
        }
        refusals.sort();
        let result = match (refusals.is_empty(), shortest) {
            (true, Some(len)) => Ok(len),
            (true, None) => Err("no voucher".into()),
            (false, _) => Err(refusals.join("; ")),
        };
        debug!(?result, "vouch round");
        VouchRound {
            sent_at,
            epoch,
            result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_proto::types::Endpoint;

    const LEASE: Duration = Duration::from_secs(3);
    const FAILSAFE: Duration = Duration::from_secs(60);

    fn id(s: &str) -> NodeId {
        NodeId::new(s.to_owned()).unwrap()
    }

    fn standby_goal(primary: &str, epoch: u64) -> Goal {
        Goal {
            node: id("s1"),
            state: GoalState::Standby,
            epoch: Epoch(epoch),
            upstream: Some((
                id(primary),
                Endpoint {
                    host: "10.0.0.1".into(),
                    port: 5432,
                },
            )),
            synchronous_standbys: vec![],
            synchronous_quorum: 0,
        }
    }

    const QUIET: Duration = Duration::from_secs(1);

    /// A standby of p1 at epoch 3 that streams from it and whose monitors stopped answering
    /// after a report sent at `t0` was answered; ready to vouch from `t0 + QUIET`.
    fn cut_off_standby(dir: &Path, t0: Instant) -> Vouching {
        let v = Vouching::new(dir, &id("s1"));
        v.set_goal(&standby_goal("p1", 3), FAILSAFE);
        v.set_streaming(Some(id("p1")));
        v.set_quiet(QUIET);
        v.report_answered(t0, LEASE);
        v
    }

    #[tokio::test(start_paused = true)]
    async fn grants_only_what_the_rule_allows() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let v = cut_off_standby(dir.path(), t0);
        let (p1, e3) = (id("p1"), Epoch(3));
        let now = t0 + QUIET;
        assert!(
            v.grant(&p1, e3, LEASE, now - Duration::from_millis(1))
                .unwrap_err()
                .contains("answered"),
            "a standby the monitors answered lately never vouches"
        );
        assert_eq!(
            v.grant(&p1, e3, Duration::from_secs(10), now),
            Ok(LEASE),
            "capped at the standby's own lease"
        );
        assert!(
            v.grant(&p1, Epoch(2), LEASE, now)
                .unwrap_err()
                .contains("not p1 at e2")
        );
        assert!(
            v.grant(&id("p2"), e3, LEASE, now)
                .unwrap_err()
                .contains("not p2")
        );
        v.set_streaming(None);
        assert!(
            v.grant(&p1, e3, LEASE, now)
                .unwrap_err()
                .contains("does not stream")
        );
        v.set_streaming(Some(id("p1")));
        v.report_answered(now, LEASE);
        assert!(
            v.grant(&p1, e3, LEASE, now)
                .unwrap_err()
                .contains("answered"),
            "answered again"
        );
        let late = now + FAILSAFE + Duration::from_millis(1);
        assert!(
            v.grant(&p1, e3, LEASE, late)
                .unwrap_err()
                .contains("past the failsafe bound")
        );
        assert_eq!(v.grant(&p1, e3, LEASE, now + FAILSAFE), Ok(LEASE));
        v.set_goal(&standby_goal("p1", 3), Duration::ZERO);
        assert!(
            v.grant(&p1, e3, LEASE, now + QUIET)
                .unwrap_err()
                .contains("off")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_vouch_holds_every_other_goal_until_it_ends_even_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let v = cut_off_standby(dir.path(), t0);
        let now = t0 + QUIET;
        let following = standby_goal("p1", 3);
        let mut stop = following.clone();
        stop.state = GoalState::StopReplication;
        stop.upstream = None;
        assert_eq!(v.hold_until(&stop, now), None, "no vouch given: no hold");
        assert_eq!(v.left(now), Duration::ZERO);

        v.grant(&id("p1"), Epoch(3), LEASE, now).unwrap();
        let end = now + LEASE + HOLD_MARGIN;
        assert_eq!(v.hold_until(&following, now), None, "the vouched goal runs");
        assert_eq!(v.hold_until(&stop, now), Some(end));
        assert_eq!(v.hold_until(&standby_goal("p1", 4), now), Some(end));
        assert_eq!(v.left(now), LEASE + HOLD_MARGIN);
        assert_eq!(v.promised_to(), Some(id("p1")));
        // Once the goal changed, no further vouch for the old primary.
        v.set_goal(&stop, FAILSAFE);
        assert!(v.grant(&id("p1"), Epoch(3), LEASE, now).is_err());
        assert_eq!(v.hold_until(&stop, end), None, "over at its end");

        // A restart inherits the promise (boot clock) and holds even the vouched goal.
        let real_now = Instant::now();
        v.record.store(real_now + Duration::from_secs(2));
        let again = Vouching::new(dir.path(), &id("s1"));
        let held = again.hold_until(&following, real_now).expect("held");
        assert!(held > real_now + Duration::from_secs(1), "{held:?}");
        assert!(again.grant(&id("p1"), Epoch(3), LEASE, real_now).is_err());
    }
}
