//! `ha-pki`: the cluster CA, certificates, join tokens and mutual TLS for every gRPC connection.
//!
//! - [`identity`]: how a certificate encodes its holder's [`Role`] and name (CN = name plus one
//!   `ha://<role>/<name>` URI SAN), and [`PeerIdentity`].
//! - [`ca`]: [`Ca`] creates/loads the CA, issues certificates, signs CSRs; [`generate_csr`] for a
//!   joining node; [`CertInfo`] and [`merge_ca_bundle`] for rotation with an overlap window.
//! - [`files`]: atomic 0600 key writes and permission-checked key reads.
//! - [`token`]: join tokens `hajt_<id>_<secret>`, stored as SHA-256, verified in constant time.
//! - [`tls`]: reloadable rustls server/client configs ([`ServerTls`], [`ClientTls`]) and the
//!   [`ReloadWatcher`] (SIGHUP and file changes).
//! - [`transport`]: tonic integration: [`tls_incoming`] for servers, [`connect`] /
//!   [`MtlsConnector`] for clients, [`require_role`] / [`require_node`] in services.
//!
//! Every binary's `main` must call [`install_crypto`] (or
//! `rustls::crypto::ring::default_provider().install_default()`) before anything touches rustls:
//! this crate's configs name the ring provider explicitly, but other rustls users in the process
//! (tokio-postgres-rustls) take the process default.

pub mod ca;
pub mod files;
pub mod identity;
pub mod tls;
pub mod token;
pub mod transport;

pub use ca::{
    CLOCK_SKEW_ALLOWANCE, Ca, CaError, CertInfo, IssuedCert, Validity, generate_csr,
    merge_ca_bundle,
};
pub use files::{FileError, read_key_file, read_public_file, write_key_file, write_public_file};
pub use identity::{IdentityError, PeerIdentity, Role};
pub use tls::{ClientTls, Reload, ReloadWatcher, ServerTls, TlsError, TlsFiles};
pub use token::{JoinToken, TokenError, TokenHash};
pub use transport::{
    ConnectError, MtlsConnector, PeerInfo, TlsConn, TlsIncoming, connect, connect_lazy, endpoint,
    peer_identity, require_node, require_role, tls_incoming,
};

/// Installs ring as the process-wide rustls crypto provider. Idempotent: a provider already
/// installed (by an earlier call or by another library) is kept.
pub fn install_crypto() {
    // Err only means a default is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
