//! Mutual TLS for tonic: a server-side incoming stream that completes the handshake and attaches
//! the verified [`PeerIdentity`] to every request, a client-side connector, and the checks a
//! service runs on the caller's identity.
//!
//! Server: [`tls_incoming`] accepts TCP from a listener, runs each handshake in its own task
//! (bounded by [`HANDSHAKE_TIMEOUT`], so one slow or hostile peer never blocks the others) with
//! the [`ServerTls`] config current at accept time, and yields only connections whose client
//! certificate verified against the CA bundle and carries an `ha://` identity, or, when the
//! config's client authentication is [`ClientAuth::Optional`], that presented no certificate at
//! all (their requests have no identity and only calls that need none succeed). A failed
//! handshake is logged and dropped; the accept loop goes on. tonic stores the connection's [`PeerInfo`] in
//! each request's extensions: read it with [`peer_identity`], [`require_role`] or
//! [`require_node`].
//!
//! What one client can hold is bounded: at most [`MAX_HANDSHAKES`] handshakes at a time (of
//! which [`MAX_HANDSHAKES_PER_ADDRESS`] from one source address), at
//! most [`MAX_ANONYMOUS_CONNECTIONS`] connections without a certificate, each closed after
//! [`ANONYMOUS_LIFETIME`], and at most [`MAX_CONNECTIONS_PER_IDENTITY`] connections per
//! certificate identity. A connection beyond a bound is closed at once, never queued, and the
//! refusal is logged at warn at most once per [`REFUSAL_LOG_INTERVAL`] per kind, with the count
//! of the ones not logged.
//!
//! Why these bounds keep Raft and lease renewals working under a flood: the monitors' Raft
//! channels and the agents' report channels are long-lived HTTP/2 connections, opened once and
//! reused for every call, and they authenticate with a certificate. So (1) an established
//! connection is never closed to make room, the bounds only refuse new ones; (2) connections
//! without a certificate have their own bound, which a flood of them fills without touching the
//! certificate holders' connections; (3) certificate holders are bounded per identity, not all
//! together, so one stolen or misbehaving node certificate exhausts only its own share. Only
//! handshakes are bounded per source address (monitors, agents and `haclt` may share one
//! address, a NAT or one host running several of them, but each holds a handshake for
//! milliseconds): one address alone cannot fill [`MAX_HANDSHAKES`]. What a flood from many
//! addresses can still delay is a *new* connection's handshake while [`MAX_HANDSHAKES`] silent
//! connections hold the slots, for at most [`HANDSHAKE_TIMEOUT`] each; tonic channels reconnect
//! by themselves, and a peer with an open connection needs none.
//!
//! Client: [`MtlsConnector`] dials TCP and runs the handshake with the [`ClientTls`] config
//! current at connect time (so a reconnect after a reload uses the new files), verifies the
//! server's name, and requires the server certificate's role to be [`SERVER_ROLE`] (a node
//! certificate can never pose as a monitor), or, for a call to one node's agent on the agent port
//! ([`MtlsConnector::to_agent`]), exactly that node's identity. tonic must
//! not try its own TLS on top, so the channel's endpoint is given the `http://` form of the
//! `https://` URL (see [`endpoint`]); the bytes on the wire are TLS all the same.

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::codegen::http::Uri;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use tracing::{debug, info, warn};

use crate::identity::{IdentityError, PeerIdentity, Role};
use crate::tls::{ClientAuth, ClientTls, ServerTls};

/// Longest a TLS handshake may take on the server before the connection is dropped (a real
/// client finishes in milliseconds, a few round trips; this only bounds how long a silent
/// connection holds a handshake slot).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most TLS handshakes in progress at once; a connection accepted beyond it is closed at once.
pub const MAX_HANDSHAKES: usize = 128;

/// Most TLS handshakes in progress at once from one source address: one address alone cannot
/// fill [`MAX_HANDSHAKES`] (a real client holds one for a few milliseconds).
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 16;

/// Most established connections without a client certificate (on a [`ClientAuth::Optional`]
/// server: joiners), all addresses together.
pub const MAX_ANONYMOUS_CONNECTIONS: usize = 32;

/// How long a connection without a client certificate may stay open: its only use is one
/// `Join` call.
pub const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(30);

/// Most established connections of one certificate identity (`ha://<role>/<name>`). A monitor
/// holds two or three to each peer, an agent one or two to each monitor, every `haclt` command
/// one while it runs; operators sharing one certificate share this bound.
pub const MAX_CONNECTIONS_PER_IDENTITY: usize = 64;

/// At most one warning per kind of refused connection in this interval.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The role every gRPC server certificate must carry.
pub const SERVER_ROLE: Role = Role::Monitor;

/// Pause after a failed `accept` (for example out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Connections whose handshake finished but that tonic has not picked up yet.
const READY_QUEUE: usize = 64;

/// What the server knows about the peer of a connection; tonic inserts it into the extensions of
/// every request on that connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// `None` only for a client without a certificate on a [`ClientAuth::Optional`] server.
    pub identity: Option<PeerIdentity>,
    /// The serial of the client certificate ([`crate::serial_hex`]), when there is one: the
    /// server refuses revoked serials.
    pub serial: Option<String>,
}

/// An accepted, authenticated server-side connection.
#[derive(Debug)]
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    /// When a connection without a certificate is closed ([`ANONYMOUS_LIFETIME`]).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Its place under [`MAX_ANONYMOUS_CONNECTIONS`] or [`MAX_CONNECTIONS_PER_IDENTITY`],
    /// given back when tonic drops the connection.
    _slot: Slot,
}

impl TlsConn {
    /// An error once the connection outlived its deadline; polling registers the timer, so an
    /// idle connection is woken and closed too.
    fn expired(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection without a client certificate outlived its lifetime",
            )),
            _ => Ok(()),
        }
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.expired(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.expired(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.expired(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The stream of authenticated connections to hand to
/// `Server::builder()...serve_with_incoming_shutdown`. Dropping it stops the accept loop and
/// closes the listener.
#[derive(Debug)]
pub struct TlsIncoming {
    ready: mpsc::Receiver<TlsConn>,
    accept_loop: JoinHandle<()>,
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = Result<TlsConn, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready.poll_recv(cx).map(|conn| conn.map(Ok))
    }
}

/// Accepts mutual-TLS connections on `listener` within the bounds of [`IncomingLimits`]. Must be
/// called inside a tokio runtime.
pub fn tls_incoming(listener: TcpListener, tls: Arc<ServerTls>) -> TlsIncoming {
    let (tx, ready) = mpsc::channel(READY_QUEUE);
    let accept_loop = tokio::spawn(accept_loop(listener, tls, tx));
    TlsIncoming { ready, accept_loop }
}

/// What the bounds of [`tls_incoming`] hold now.
#[derive(Debug, Default)]
struct IncomingLimits {
    handshakes: Counter,
    per_address: Keyed<IpAddr>,
    anonymous: Counter,
    per_identity: Keyed<String>,
    refusals: Mutex<HashMap<&'static str, Throttle>>,
}

#[derive(Debug, Default)]
struct Counter(AtomicUsize);

impl Counter {
    fn take(&self, max: usize) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn give(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A count per key (source address, certificate identity); a key at zero takes no memory.
#[derive(Debug)]
struct Keyed<K>(Mutex<HashMap<K, usize>>);

impl<K> Default for Keyed<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq> Keyed<K> {
    fn take(&self, key: K, max: usize) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key).or_default();
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn give(&self, key: &K) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                map.remove(key);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

/// A place under one of the bounds, given back on drop.
#[derive(Debug)]
enum Slot {
    Handshake(Arc<IncomingLimits>),
    Address(Arc<IncomingLimits>, IpAddr),
    Anonymous(Arc<IncomingLimits>),
    Identity(Arc<IncomingLimits>, String),
}

impl Drop for Slot {
    fn drop(&mut self) {
        match self {
            Slot::Handshake(l) => l.handshakes.give(),
            Slot::Address(l, ip) => l.per_address.give(ip),
            Slot::Anonymous(l) => l.anonymous.give(),
            Slot::Identity(l, who) => l.per_identity.give(who),
        }
    }
}

impl IncomingLimits {
    fn handshake(self: &Arc<Self>) -> Option<Slot> {
        self.handshakes
            .take(MAX_HANDSHAKES)
            .then(|| Slot::Handshake(self.clone()))
    }

    fn address(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        self.per_address
            .take(ip, MAX_HANDSHAKES_PER_ADDRESS)
            .then(|| Slot::Address(self.clone(), ip))
    }

    fn anonymous(self: &Arc<Self>) -> Option<Slot> {
        self.anonymous
            .take(MAX_ANONYMOUS_CONNECTIONS)
            .then(|| Slot::Anonymous(self.clone()))
    }

    fn identity(self: &Arc<Self>, who: &PeerIdentity) -> Option<Slot> {
        let who = who.to_string();
        self.per_identity
            .take(who.clone(), MAX_CONNECTIONS_PER_IDENTITY)
            .then(|| Slot::Identity(self.clone(), who))
    }

    /// Logs a refused connection at warn, at most once per [`REFUSAL_LOG_INTERVAL`] per `kind`.
    fn refused(&self, kind: &'static str, remote_addr: SocketAddr, detail: &dyn std::fmt::Display) {
        let mut map = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let t = map.entry(kind).or_default();
        let now = Instant::now();
        if t.last
            .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_INTERVAL)
        {
            t.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut t.suppressed);
        t.last = Some(now);
        warn!(%remote_addr, %detail, suppressed, interval = ?REFUSAL_LOG_INTERVAL, "{kind}; connection closed (the count of others not logged since the last such warning: suppressed)");
    }
}

async fn accept_loop(listener: TcpListener, tls: Arc<ServerTls>, tx: mpsc::Sender<TlsConn>) {
    let limits = Arc::new(IncomingLimits::default());
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        // The address's own bound first, so one address refused takes no global slot.
        let Some(address_slot) = limits.address(remote_addr.ip()) else {
            limits.refused(
                "too many TLS handshakes in progress from one address",
                remote_addr,
                &format_args!("limit {MAX_HANDSHAKES_PER_ADDRESS}"),
            );
            continue;
        };
        let Some(slot) = limits.handshake() else {
            limits.refused(
                "too many TLS handshakes in progress",
                remote_addr,
                &format_args!("limit {MAX_HANDSHAKES}"),
            );
            continue;
        };
        // gRPC sends small frames; Nagle would add latency to every report.
        if let Err(error) = tcp.set_nodelay(true) {
            debug!(%remote_addr, %error, "cannot set TCP_NODELAY");
        }
        let acceptor = TlsAcceptor::from(tls.current());
        let client_auth = tls.client_auth();
        let tx = tx.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let conn = handshake(acceptor, client_auth, tcp, remote_addr, &limits).await;
            drop((slot, address_slot));
            if let Some(conn) = conn {
                // The receiver is gone only when the server stopped; the connection just closes.
                let _ = tx.send(conn).await;
            }
        });
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    client_auth: ClientAuth,
    tcp: TcpStream,
    remote_addr: SocketAddr,
    limits: &Arc<IncomingLimits>,
) -> Option<TlsConn> {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Err(_) => {
            limits.refused(
                "TLS handshake timed out",
                remote_addr,
                &format_args!("after {HANDSHAKE_TIMEOUT:?}"),
            );
            return None;
        }
        Ok(Err(error)) => {
            limits.refused("TLS handshake failed", remote_addr, &error);
            return None;
        }
        Ok(Ok(stream)) => stream,
    };
    let certs = stream.get_ref().1.peer_certificates();
    if certs.is_none_or(<[_]>::is_empty) && client_auth == ClientAuth::Optional {
        let Some(slot) = limits.anonymous() else {
            limits.refused(
                "too many connections without a client certificate",
                remote_addr,
                &format_args!("limit {MAX_ANONYMOUS_CONNECTIONS}"),
            );
            return None;
        };
        debug!(%remote_addr, "TLS connection without a client certificate accepted");
        return Some(TlsConn {
            stream,
            info: PeerInfo {
                remote_addr,
                identity: None,
                serial: None,
            },
            deadline: Some(Box::pin(tokio::time::sleep(ANONYMOUS_LIFETIME))),
            _slot: slot,
        });
    }
    let serial = certs
        .and_then(|c| c.first())
        .and_then(|der| crate::serial_hex(der).ok());
    match end_entity_identity(certs) {
        Ok(identity) => {
            let Some(slot) = limits.identity(&identity) else {
                limits.refused(
                    "too many connections of one certificate identity",
                    remote_addr,
                    &format_args!("{identity}, limit {MAX_CONNECTIONS_PER_IDENTITY}"),
                );
                return None;
            };
            debug!(%remote_addr, peer = %identity, "mutual TLS connection accepted");
            Some(TlsConn {
                stream,
                info: PeerInfo {
                    remote_addr,
                    identity: Some(identity),
                    serial,
                },
                deadline: None,
                _slot: slot,
            })
        }
        Err(error) => {
            limits.refused(
                "client certificate has no usable identity",
                remote_addr,
                &error,
            );
            None
        }
    }
}

fn end_entity_identity(
    certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
) -> Result<PeerIdentity, ConnectError> {
    let cert = certs
        .and_then(|c| c.first())
        .ok_or(ConnectError::NoPeerCertificate)?;
    Ok(PeerIdentity::from_cert_der(cert)?)
}

/// The verified identity of the caller, if the request came through [`tls_incoming`].
pub fn peer_identity<T>(request: &Request<T>) -> Option<PeerIdentity> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|info| info.identity.clone())
}

/// Admits the caller only if its certificate's role is one of `allowed`:
/// `Unauthenticated` without a verified identity, `PermissionDenied` for another role.
pub fn require_role<T>(request: &Request<T>, allowed: &[Role]) -> Result<PeerIdentity, Status> {
    let identity = peer_identity(request)
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
    if allowed.contains(&identity.role()) {
        Ok(identity)
    } else {
        let allowed: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        warn!(peer = %identity, ?allowed, "denied: role not allowed for this call");
        Err(Status::permission_denied(format!(
            "{identity} may not make this call (allowed roles: {})",
            allowed.join(", ")
        )))
    }
}

/// Admits the caller only if it is the node agent (PostgreSQL or ejabberd) named `node`: an agent
/// may act for its own node only.
pub fn require_node<T>(request: &Request<T>, node: &str) -> Result<PeerIdentity, Status> {
    let identity = require_role(request, &[Role::Postgres, Role::Ejabberd])?;
    if identity.name() == node {
        Ok(identity)
    } else {
        warn!(peer = %identity, node, "denied: agent acting for another node");
        Err(Status::permission_denied(format!(
            "{identity} may not act for node {node}"
        )))
    }
}

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid URL {0:?}: expected https://host:port")]
    InvalidUrl(String),
    #[error("cannot connect to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error("server {found} is not a {SERVER_ROLE}")]
    WrongServerRole { found: PeerIdentity },
    #[error("server {found} is not {expected}")]
    WrongPeer {
        expected: PeerIdentity,
        found: PeerIdentity,
    },
    /// tonic's own message is only "transport error"; the cause chain is what an operator needs.
    #[error("{}", error_chain(.0))]
    Transport(#[from] tonic::transport::Error),
}

/// An error and its sources, joined with ": " (tonic's own message is only "transport error").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A tower connector doing TCP plus client-side mutual TLS, for
/// `Endpoint::connect_with_connector`.
#[derive(Debug, Clone)]
pub struct MtlsConnector {
    tls: Arc<ClientTls>,
    /// `None`: any monitor ([`SERVER_ROLE`]); otherwise exactly this agent.
    peer: Option<PeerIdentity>,
}

impl MtlsConnector {
    /// Connects to a monitor: the server must present a monitor certificate.
    pub fn new(tls: Arc<ClientTls>) -> Self {
        Self { tls, peer: None }
    }

    /// Connects to one node's agent (the agent port): the server must present exactly `peer`'s
    /// certificate, so neither a monitor nor another node can answer in its place.
    pub fn to_agent(tls: Arc<ClientTls>, peer: PeerIdentity) -> Self {
        Self {
            tls,
            peer: Some(peer),
        }
    }
}

impl MtlsConnector {
    /// Whether the server refuses this client. Under TLS 1.3 a server checks the client's
    /// certificate only after the client has finished its side of the handshake, so a refusal
    /// reaches the client as an alert on its first read; a channel whose first request races the
    /// server's close reports only "transport error" or "operation was canceled". This opens a
    /// connection of its own, sends the HTTP/2 client preface and waits up to `wait` for the
    /// server's first bytes: `Err` when the connection or the handshake failed or the server
    /// answered with an alert (its text names it, see [`error_chain`]); `Ok` when the server
    /// answered or stayed silent.
    pub async fn probe(&self, address: &str, wait: Duration) -> Result<(), ConnectError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let uri: Uri = format!("http://{address}")
            .parse()
            .map_err(|_| ConnectError::InvalidUrl(address.to_owned()))?;
        let mut stream = tower::Service::call(&mut self.clone(), uri)
            .await?
            .into_inner();
        let failed = |source| ConnectError::Handshake {
            addr: address.to_owned(),
            source,
        };
        // The client preface, then an empty SETTINGS frame (length 0, type 4, stream 0).
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        stream.write_all(&preface).await.map_err(failed)?;
        let mut first = [0u8; 1];
        match tokio::time::timeout(wait, stream.read(&mut first)).await {
            Ok(Err(e)) => Err(failed(e)),
            Ok(Ok(0)) => Err(failed(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection without answering",
            ))),
            Ok(Ok(_)) | Err(_) => Ok(()),
        }
    }
}

type ConnectFuture = Pin<
    Box<
        dyn Future<
                Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, ConnectError>,
            > + Send,
    >,
>;

impl tower::Service<Uri> for MtlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.current();
        let expected = self.peer.clone();
        Box::pin(async move {
            let (host, port) = host_port(&uri)?;
            let addr = format!("{host}:{port}");
            let server_name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|_| ConnectError::InvalidUrl(uri.to_string()))?;
            let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
                .await
                .map_err(|source| ConnectError::Io {
                    addr: addr.clone(),
                    source,
                })?;
            // See the server side: small gRPC frames must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
            let stream = TlsConnector::from(config)
                .connect(server_name, tcp)
                .await
                .map_err(|source| ConnectError::Handshake {
                    addr: addr.clone(),
                    source,
                })?;
            let server = end_entity_identity(stream.get_ref().1.peer_certificates())?;
            match expected {
                None if server.role() != SERVER_ROLE => {
                    warn!(%addr, peer = %server, "refusing server: not a monitor certificate");
                    return Err(ConnectError::WrongServerRole { found: server });
                }
                Some(expected) if server != expected => {
                    warn!(%addr, peer = %server, %expected, "refusing server: not the expected agent");
                    return Err(ConnectError::WrongPeer {
                        expected,
                        found: server,
                    });
                }
                _ => {}
            }
            debug!(%addr, peer = %server, "mutual TLS connection established");
            Ok(TokioIo::new(stream))
        })
    }
}

fn host_port(uri: &Uri) -> Result<(String, u16), ConnectError> {
    let invalid = || ConnectError::InvalidUrl(uri.to_string());
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(invalid)?;
    let port = uri.port_u16().ok_or_else(invalid)?;
    Ok((host.to_owned(), port))
}

/// Turns `https://host:port` into the tonic endpoint [`MtlsConnector`] expects (the `http://`
/// form: TLS is the connector's job, and tonic refuses `https` without its own TLS config).
/// Set timeouts on the result as needed.
pub fn endpoint(url: &str) -> Result<Endpoint, ConnectError> {
    let invalid = || ConnectError::InvalidUrl(url.to_owned());
    let uri: Uri = url.parse().map_err(|_| invalid())?;
    if uri.scheme_str() != Some("https") || uri.path() != "/" && !uri.path().is_empty() {
        return Err(invalid());
    }
    host_port(&uri).map_err(|_| invalid())?;
    let authority = uri.authority().ok_or_else(invalid)?;
    Endpoint::from_shared(format!("http://{authority}")).map_err(|_| invalid())
}

/// Connects now (fails if the first connection fails); later reconnects use the current
/// [`ClientTls`] config.
pub async fn connect(url: &str, tls: Arc<ClientTls>) -> Result<Channel, ConnectError> {
    let channel = endpoint(url)?
        .connect_with_connector(MtlsConnector::new(tls))
        .await?;
    info!(url, "connected");
    Ok(channel)
}

/// A channel that connects on first use and reconnects as needed.
pub fn connect_lazy(url: &str, tls: Arc<ClientTls>) -> Result<Channel, ConnectError> {
    Ok(endpoint(url)?.connect_with_connector_lazy(MtlsConnector::new(tls)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request_from(identity: Option<PeerIdentity>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(identity) = identity {
            request.extensions_mut().insert(PeerInfo {
                remote_addr: "127.0.0.1:1".parse().unwrap(),
                identity: Some(identity),
                serial: None,
            });
        }
        request
    }

    #[test]
    fn roles_are_enforced() {
        let op = request_from(Some(PeerIdentity::new(Role::Operator, "alice").unwrap()));
        assert_eq!(
            require_role(&op, &[Role::Operator]).unwrap().name(),
            "alice"
        );
        let denied = require_role(&op, &[Role::Monitor]).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        let anonymous = request_from(None);
        assert_eq!(
            require_role(&anonymous, &Role::ALL).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn an_agent_acts_only_for_its_own_node() {
        let psql1 = request_from(Some(PeerIdentity::new(Role::Postgres, "psql1").unwrap()));
        assert!(require_node(&psql1, "psql1").is_ok());
        assert_eq!(
            require_node(&psql1, "psql2").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // An operator or monitor named like the node is still not that node's agent.
        let op = request_from(Some(PeerIdentity::new(Role::Operator, "psql1").unwrap()));
        assert_eq!(
            require_node(&op, "psql1").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn endpoint_accepts_only_https_host_port() {
        let ep = endpoint("https://127.0.0.1:7400").unwrap();
        assert_eq!(ep.uri().to_string(), "http://127.0.0.1:7400/");
        assert!(endpoint("https://[::1]:7400").is_ok());
        for bad in [
            "http://127.0.0.1:7400",
            "https://127.0.0.1",
            "https://127.0.0.1:7400/x",
            "127.0.0.1:7400",
            "",
        ] {
            assert!(endpoint(bad).is_err(), "{bad} accepted");
        }
    }
}
