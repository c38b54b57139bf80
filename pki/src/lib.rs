//! `ha-pki`: the cluster CA, certificates and mutual TLS for every gRPC connection. (Join
//! tokens live in the monitor's catalog, which alone issues and consumes them.)
//!
//! - [`identity`]: how a certificate encodes its holder's [`Role`] and name (CN = name plus one
//!   `ha://<role>/<name>` URI SAN), and [`PeerIdentity`].
//! - [`ca`]: [`Ca`] creates/loads the CA, issues certificates, signs CSRs; [`generate_csr`] for a
//!   joining node; [`CertInfo`] and [`merge_ca_bundle`] for rotation with an overlap window.
//! - [`files`]: atomic 0600 key writes and permission-checked key reads.
//! - [`tls`]: reloadable rustls server/client configs ([`ServerTls`], [`ClientTls`]), the
//!   [`ReloadWatcher`] (SIGHUP and file changes) and [`check_own_certificate`] (chain to the CA
//!   bundle, validity, identity) that a holder runs before using its certificate.
//! - [`transport`]: tonic integration: [`tls_incoming`] for servers, [`connect`] /
//!   [`MtlsConnector`] for clients, [`require_role`] / [`require_node`] in services.
//!
//! Every binary's `main` must call [`install_crypto`] (or
//! `rustls::crypto::ring::default_provider().install_default()`) before anything touches rustls:
//! this crate's configs name the ring provider explicitly, but other rustls users in the process
//! (tokio-postgres-rustls) take the process default.
//!
//! Wiring a server and a client (the same calls the monitor, agents and `haclt` make):
//!
//! ```no_run
//! # async fn demo(files: ha_pki::TlsFiles, shutdown: impl std::future::Future<Output = ()>)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use ha_pki::{ClientTls, Reload, ReloadWatcher, ServerTls};
//! # #[derive(Default)] struct Svc;
//! # #[tonic::async_trait]
//! # impl ha_proto::v1::peer_service_server::PeerService for Svc {
//! #     async fn raft(&self, request: tonic::Request<ha_proto::v1::RaftBatch>)
//! #         -> Result<tonic::Response<ha_proto::v1::RaftAck>, tonic::Status> {
//! // Inside a service method: only monitors may speak Raft.
//! let peer = ha_pki::require_role(&request, &[ha_pki::Role::Monitor])?;
//! # let _ = peer; Ok(tonic::Response::new(ha_proto::v1::RaftAck {})) } }
//!
//! ha_pki::install_crypto();
//! let server_tls = Arc::new(ServerTls::load(files.clone())?);
//! let client_tls = Arc::new(ClientTls::load(files)?);
//! // SIGHUP or a changed file reloads both; new connections use the new files.
//! let watcher = ReloadWatcher::new(
//!     vec![server_tls.clone() as Arc<dyn Reload>, client_tls.clone()],
//!     Duration::from_secs(5),
//! )?;
//! tokio::spawn(watcher.run(std::future::pending()));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7400").await?;
//! let incoming = ha_pki::tls_incoming(listener, server_tls);
//! let server = tonic::transport::Server::builder()
//!     .add_service(ha_proto::v1::peer_service_server::PeerServiceServer::new(Svc))
//!     .serve_with_incoming_shutdown(incoming, shutdown);
//!
//! let channel = ha_pki::connect_lazy("https://m2.domain.local:7400", client_tls)?;
//! let mut peer = ha_proto::v1::peer_service_client::PeerServiceClient::new(channel);
//! # let _ = (&mut peer, server);
//! # Ok(()) }
//! ```

pub mod ca;
pub mod files;
pub mod identity;
pub mod tls;
pub mod transport;

pub use ca::{
    CLOCK_SKEW_ALLOWANCE, Ca, CaError, CertInfo, IssuedCert, Validity, csr_for_key, generate_csr,
    merge_ca_bundle, serial_hex,
};
pub use files::{
    FileError, read_key_file, read_public_file, write_file, write_key_file, write_public_file,
};
pub use identity::{IdentityError, PeerIdentity, Role};
pub use tls::{
    ClientAuth, ClientTls, Reload, ReloadWatcher, ServerTls, TlsError, TlsFiles, certs_from_pem,
    check_own_certificate,
};
pub use transport::{
    ConnectError, MtlsConnector, PeerInfo, TlsConn, TlsIncoming, connect, connect_lazy, endpoint,
    error_chain, peer_identity, require_node, require_role, tls_incoming,
};

/// Installs ring as the process-wide rustls crypto provider. Idempotent: a provider already
/// installed (by an earlier call or by another library) is kept.
pub fn install_crypto() {
    // Err only means a default is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
