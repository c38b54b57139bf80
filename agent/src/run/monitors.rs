//! The agent's connection to the monitor group: calls go to the leader, found by trying the
//! last known leader first, then every configured monitor, following the `x-ha-leader` hint a
//! follower returns with `UNAVAILABLE`.
//!
//! Invariants: every call is bounded by the configured RPC timeout (connect included), so a
//! silent monitor delays a report by at most that much; a channel is cached only for the
//! monitor that last answered as leader, and dropped when it stops answering. With a
//! [`ClientTls`] every connection is mutual TLS (the monitor must present a monitor
//! certificate); each new connection takes the config current then, so reloaded certificates
//! apply at the next reconnect. Without one the link is plaintext (dev mode only).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ha_pki::{ClientTls, MtlsConnector};
use ha_proto::v1;
use ha_proto::v1::agent_service_client::AgentServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, info};

/// What the reconcile loop needs from the monitors (a trait so that the loop's timing can be
/// tested with paused time and a scripted monitor).
pub trait MonitorLink: Clone + Send + Sync + 'static {
    fn report(
        &self,
        observed: v1::ObservedState,
    ) -> impl Future<Output = Result<v1::ReportResponse, Status>> + Send;
}

/// A leader-following gRPC client of the agent service.
#[derive(Debug, Clone)]
pub struct Monitors {
    addresses: Arc<Vec<String>>,
    timeout: Duration,
    /// `None`: plaintext (dev mode).
    tls: Option<Arc<ClientTls>>,
    leader: Arc<Mutex<Option<(String, Channel)>>>,
}

impl Monitors {
    pub fn new(addresses: Vec<String>, timeout: Duration, tls: Option<Arc<ClientTls>>) -> Self {
        Self {
            addresses: Arc::new(addresses),
            timeout,
            tls,
            leader: Arc::new(Mutex::new(None)),
        }
    }

    fn cached(&self) -> Option<(String, Channel)> {
        self.leader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn remember(&self, leader: Option<(String, Channel)>) {
        let mut slot = self.leader.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = slot.as_ref().map(|(a, _)| a) != leader.as_ref().map(|(a, _)| a);
        if changed && let Some((addr, _)) = &leader {
            info!(monitor = %addr, "monitor leader found");
        }
        *slot = leader;
    }

    /// Forgets the cached leader channel: the next call opens a new connection, with the TLS
    /// config current then (after the certificate was renewed).
    pub fn reconnect(&self) {
        *self.leader.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    async fn connect(&self, address: &str) -> Result<Channel, Status> {
        let endpoint = match &self.tls {
            Some(_) => ha_pki::endpoint(&format!("https://{address}"))
                .map_err(|e| Status::invalid_argument(format!("{address}: {e}")))?,
            None => Endpoint::from_shared(format!("http://{address}"))
                .map_err(|e| Status::invalid_argument(format!("{address}: {e}")))?,
        }
        .connect_timeout(self.timeout)
        .timeout(self.timeout);
        let connected = match &self.tls {
            Some(tls) => {
                endpoint
                    .connect_with_connector(MtlsConnector::new(tls.clone()))
                    .await
            }
            None => endpoint.connect().await,
        };
        // tonic's own message is only "transport error": the cause (refused certificate,
        // unknown CA, expired, connection refused) is in the source chain.
        connected
            .map_err(|e| Status::unavailable(format!("{address}: {}", ha_pki::error_chain(&e))))
    }

    /// Calls `f` on the leader. Gives up with the last error once every monitor (and every
    /// hint) was tried; errors other than `UNAVAILABLE` come from the leader and are final.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(AgentServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut queue: Vec<(String, Option<Channel>)> = Vec::new();
        if let Some((addr, ch)) = self.cached() {
            queue.push((addr, Some(ch)));
        }
        queue.extend(self.addresses.iter().map(|a| (a.clone(), None)));
        let mut tried: Vec<String> = Vec::new();
        let mut last = Status::unavailable("no monitor configured");
        while !queue.is_empty() {
            let (addr, channel) = queue.remove(0);
            if tried.contains(&addr) {
                continue;
            }
            tried.push(addr.clone());
            let channel = match channel {
                Some(c) => c,
                None => match self.connect(&addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(monitor = %addr, error = %e.message(), "monitor unreachable");
                        last = e;
                        continue;
                    }
                },
            };
            match f(AgentServiceClient::new(channel.clone())).await {
                Ok(r) => {
                    self.remember(Some((addr, channel)));
                    return Ok(r.into_inner());
                }
                Err(s) => {
                    let s = with_cause(s);
                    if matches!(
                        s.code(),
                        Code::Unavailable
                            | Code::DeadlineExceeded
                            | Code::Cancelled
                            | Code::Unknown
                    ) {
                        debug!(monitor = %addr, code = ?s.code(), error = %s.message(), "not the leader or unreachable");
                        if let Some(hint) = s
                            .metadata()
                            .get(ha_proto::LEADER_ADDR_METADATA)
                            .and_then(|v| v.to_str().ok())
                        {
                            queue.insert(0, (hint.to_owned(), None));
                        }
                        last = s;
                    } else {
                        self.remember(Some((addr, channel)));
                        return Err(s);
                    }
                }
            }
        }
        self.remember(None);
        Err(last)
    }
}

/// `status` with its source chain appended to the message: a call that failed on the
/// connection (a TLS alert from the monitor after the handshake, such as an unknown or expired
/// certificate) carries only "transport error" as its message, and every log line and report
/// prints the message.
fn with_cause(status: Status) -> Status {
    let Some(source) = std::error::Error::source(&status) else {
        return status;
    };
    let message = format!("{}: {}", status.message(), ha_pki::error_chain(source));
    Status::with_metadata(status.code(), message, status.metadata().clone())
}

impl MonitorLink for Monitors {
    async fn report(&self, observed: v1::ObservedState) -> Result<v1::ReportResponse, Status> {
        self.call(|mut c| {
            let req = v1::ReportRequest {
                observed: Some(observed.clone()),
            };
            async move { c.report(req).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transport_failure_names_its_cause() {
        let alert = std::io::Error::other("received fatal alert: CertificateExpired");
        let mut status = Status::new(Code::Unavailable, "transport error");
        status.set_source(std::sync::Arc::new(alert));
        let status = with_cause(status);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().starts_with("transport error: "));
        assert!(
            status.message().contains("CertificateExpired"),
            "{}",
            status.message()
        );
    }
}
