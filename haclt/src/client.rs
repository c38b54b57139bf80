//! The connection to the monitor group: tries the monitors in turn, follows the leader hint a
//! follower returns (`x-ha-leader`), and remembers the leader for the next call. Connections are
//! mutual TLS with the operator certificate of the `[tls]` config section, or plaintext for
//! clusters started with `--dev`.
//!
//! Errors are classified into [`Failure`] so that every command exits with a code a script can
//! act upon (see `exit_code`).

use std::sync::Arc;
use std::time::Duration;

use ha_pki::{ClientTls, MtlsConnector, error_chain};
use ha_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// How a command failed; each maps to a documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad arguments or configuration (64).
    #[error("{0}")]
    Usage(String),
    /// No monitor answered, or none knows a leader (69).
    #[error("cannot reach the monitors: {0}")]
    Unreachable(String),
    /// The request was accepted but the cluster did not converge before the deadline (75).
    #[error("not converged in time: {0}")]
    NotConverged(String),
    /// The monitors refused the request as unsafe or impossible now (65).
    #[error("refused: {0}")]
    Refused(String),
    /// A node, group or monitor named on the command line does not exist (66).
    #[error("not found: {0}")]
    NotFound(String),
    /// The monitors refused our credentials (77).
    #[error("permission denied: {0}")]
    Denied(String),
    /// `status` answered, and the cluster is degraded (3): the reasons, one per line.
    #[error("degraded: {}", .0.join("; "))]
    Degraded(Vec<String>),
    /// Anything else (1).
    #[error("{0}")]
    Other(String),
}

impl Failure {
    /// Exit codes follow sysexits(3) where one fits.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 64,
            Failure::Unreachable(_) => 69,
            Failure::NotConverged(_) => 75,
            Failure::Refused(_) => 65,
            Failure::NotFound(_) => 66,
            Failure::Denied(_) => 77,
            Failure::Degraded(_) => 3,
            Failure::Other(_) => 1,
        }
    }

    pub fn from_status(s: &Status) -> Self {
        if let Some(refused) = tls_refusal(s) {
            return refused;
        }
        let msg = s.message().to_owned();
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => Failure::Usage(msg),
            Code::NotFound => Failure::NotFound(msg),
            Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => Failure::Refused(msg),
            Code::PermissionDenied | Code::Unauthenticated => Failure::Denied(msg),
            Code::Unavailable | Code::DeadlineExceeded => Failure::Unreachable(msg),
            _ => Failure::Other(format!("{:?}: {}", s.code(), error_chain(s))),
        }
    }
}

/// How channels to the monitors are secured.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plaintext gRPC, for clusters started with `--dev`.
    Plaintext,
    /// Mutual TLS with an operator certificate; the monitor must present a monitor certificate.
    Tls(Arc<ClientTls>),
}

/// A leader-following client of the operator service.
pub struct Monitors {
    addresses: Vec<String>,
    transport: Transport,
    leader: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Monitors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitors")
            .field("addresses", &self.addresses)
            .field("leader", &self.leader)
            .finish()
    }
}

impl Monitors {
    pub fn new(
        addresses: Vec<String>,
        transport: Transport,
        timeout: Duration,
    ) -> Result<Self, Failure> {
        if addresses.is_empty() {
            return Err(Failure::Usage(
                "no monitor addresses: set `monitors` in the config or HACLT_MONITORS".into(),
            ));
        }
        Ok(Self {
            addresses,
            transport,
            leader: None,
            timeout,
        })
    }

    /// The operator certificate of mutual TLS; `None` for plaintext (`--dev`).
    pub fn client_tls(&self) -> Option<Arc<ClientTls>> {
        match &self.transport {
            Transport::Plaintext => None,
            Transport::Tls(tls) => Some(tls.clone()),
        }
    }

    async fn connect(&self, address: &str) -> Result<OperatorServiceClient<Channel>, Failure> {
        let endpoint = match &self.transport {
            Transport::Plaintext => Endpoint::from_shared(format!("http://{address}"))
                .map_err(|e| Failure::Usage(format!("{address}: {e}")))?,
            Transport::Tls(_) => ha_pki::endpoint(&format!("https://{address}"))
                .map_err(|e| Failure::Usage(format!("{address}: {e}")))?,
        }
        .connect_timeout(self.timeout.min(Duration::from_secs(2)))
        .timeout(self.timeout);
        let channel = match &self.transport {
            Transport::Plaintext => endpoint.connect().await,
            Transport::Tls(tls) => {
                endpoint
                    .connect_with_connector(MtlsConnector::new(tls.clone()))
                    .await
            }
        };
        channel.map(OperatorServiceClient::new).map_err(|e| {
            tls_refusal(&e)
                .unwrap_or_else(|| Failure::Unreachable(format!("{address}: {}", error_chain(&e))))
        })
    }

    /// Calls `f` on the leader: tries the last known leader, then every monitor, following
    /// hints. `f` must be safe to retry (mutating requests carry a request id).
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, Failure>
    where
        F: FnMut(OperatorServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut queue: Vec<String> = self.leader.iter().cloned().collect();
        queue.extend(self.addresses.iter().cloned());
        let mut tried = Vec::new();
        let mut last = Failure::Unreachable("no monitor tried".into());
        while let Some(addr) = queue.first().cloned() {
            queue.remove(0);
            if tried.contains(&addr) {
                continue;
            }
            tried.push(addr.clone());
            let client = match self.connect(&addr).await {
                Ok(c) => c,
                // A refused handshake is worth more than an unreachable monitor: it is what
                // the operator must fix, whatever the other monitors answer.
                Err(e) => {
                    if !matches!(last, Failure::Denied(_)) || matches!(e, Failure::Denied(_)) {
                        last = e;
                    }
                    continue;
                }
            };
            let s = match f(client).await {
                Ok(r) => {
                    self.leader = Some(addr);
                    return Ok(r.into_inner());
                }
                Err(s) => s,
            };
            if let Some(refused) = self.refusal(&addr, &s).await {
                last = refused;
                continue;
            }
            match s {
                // A follower (with a hint), a monitor going away, or one that did not answer in
                // time (a leader killed or frozen mid-call): the next monitor is asked.
                s if passes_on(&s) => {
                    if self.leader.as_ref() == Some(&addr) {
                        self.leader = None;
                    }
                    if !matches!(last, Failure::Denied(_)) {
                        last = Failure::Unreachable(format!("{addr}: {}", s.message()));
                    }
                    if let Some(hint) = s
                        .metadata()
                        .get(ha_proto::LEADER_ADDR_METADATA)
                        .and_then(|v| v.to_str().ok())
                    {
                        queue.insert(0, hint.to_owned());
                    }
                }
                s => return Err(Failure::from_status(&s)),
            }
        }
        Err(last)
    }

    /// The monitor at `addr` refused this client's certificate, seen in the failed call `s`
    /// or, when the call failed in the transport (not answered by the monitor), found by a
    /// probe: under TLS 1.3 the refusal may have been lost in the race with the closing
    /// connection (see [`MtlsConnector::probe`]).
    async fn refusal(&self, addr: &str, s: &Status) -> Option<Failure> {
        if let Some(refused) = tls_refusal(s) {
            return Some(refused);
        }
        let Transport::Tls(tls) = &self.transport else {
            return None;
        };
        // A status the monitor sent has no source: it answered, so the handshake was fine.
        std::error::Error::source(s)?;
        let probe = MtlsConnector::new(tls.clone())
            .probe(addr, self.timeout)
            .await;
        tracing::debug!(%addr, ?probe, "the call failed in the transport: probed the handshake");
        probe.err().and_then(|e| tls_refusal(&e))
    }

    /// Like [`Monitors::call`], but keeps trying while no leader answers (an election in
    /// progress) until `deadline`.
    pub async fn call_until<T, F, Fut>(
        &mut self,
        deadline: tokio::time::Instant,
        mut f: F,
    ) -> Result<T, Failure>
    where
        F: FnMut(OperatorServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        loop {
            match self.call(&mut f).await {
                Err(Failure::Unreachable(why)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%why, "no leader answered; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }
}

/// Whether a failed call should be asked of the next monitor: it was not answered by a leader
/// (`Unavailable`), or not within the call's timeout (tonic reports its own timeout as
/// `Cancelled`). Every request is safe to repeat (mutations carry a request id).
fn passes_on(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// A TLS handshake refused by either side, named from the error's causes (the top-level error
/// says only "transport error"): the monitor refused this client's certificate (a TLS alert
/// came back), or this client refused the monitor's. `None` for any other error.
pub fn tls_refusal(error: &(dyn std::error::Error + 'static)) -> Option<Failure> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        let text = e.to_string();
        if text.contains("received fatal alert") {
            return Some(Failure::Denied(format!(
                "the monitor refused this client's certificate in the TLS handshake ({text}): \
                 `cert` and `key` in haclt's config must be an operator or observer certificate \
                 of the cluster's CA, valid now and not revoked"
            )));
        }
        if text.contains("invalid peer certificate") {
            return Some(Failure::Denied(format!(
                "this client does not trust the monitor's certificate ({text}): `ca` in haclt's \
                 config must be the cluster's CA bundle"
            )));
        }
        cause = e.source();
    }
    None
}
