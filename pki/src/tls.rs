//! Reloadable rustls configurations for mutual TLS against the cluster CA bundle.
//!
//! [`ServerTls`] verifies client certificates (`WebPkiClientVerifier`): it requires one
//! ([`ClientAuth::Required`]) or, for a port that must also admit a node joining before it has a
//! certificate, accepts connections without one ([`ClientAuth::Optional`]; a certificate that is
//! presented must still verify, and services then check the identity per call);
//! [`ClientTls`] presents its certificate and verifies the server's, server name included. Both
//! hold the current config behind `RwLock<Arc<_>>`: [`Reload::reload`] re-reads the three files
//! and swaps the `Arc` only when everything parsed and matched, so a half-rotated set of files
//! never replaces a working config. Connections take the `Arc` when they start, so existing ones
//! continue with the config they began with and new ones use the new config.
//!
//! [`ReloadWatcher`] reloads on SIGHUP and when any file's identity (inode, size, mtime) changes.
//!
//! A holder that knows who it is ([`ClientTls::load_checked`], the agents) also checks its own
//! certificate before using it, at load and at every reload ([`check_own_certificate`]): it must
//! chain to the CA bundle and be valid now (the webpki verification the monitors run on every
//! peer's certificate) and name the expected identity. A certificate that fails is never
//! presented: peers would refuse it at every connection, with nothing but an alert to show why.
//!
//! The ring provider is passed explicitly to every builder, so these configs do not depend on
//! the process default; [`crate::install_crypto`] is still needed for other rustls users
//! (tokio-postgres-rustls).

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::files::{FileError, read_key_file, read_public_file};
use crate::identity::{IdentityError, PeerIdentity, Role};

/// ALPN for gRPC (HTTP/2).
const ALPN_H2: &[u8] = b"h2";
/// Also offered by servers, after HTTP/2: load balancers' health checks and Prometheus may speak
/// HTTP/1.1 only (the agent port's endpoints, `/metrics` of agents and monitors; gRPC stays on
/// HTTP/2).
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: invalid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate has no usable ha:// identity: {source}")]
    Identity {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("rustls refused the configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(String),
    #[error("cannot listen for SIGHUP: {0}")]
    Signal(std::io::Error),
    /// The certificate does not verify against the CA bundle now (foreign CA, expired, not
    /// valid yet, ...).
    #[error("certificate {} {}", .cert.display(), untrusted_reason(.error, .ca_bundle))]
    Untrusted {
        cert: PathBuf,
        ca_bundle: PathBuf,
        error: rustls::Error,
    },
    #[error("certificate {} is the certificate of {found}, not of {expected}", .cert.display())]
    WrongIdentity {
        cert: PathBuf,
        found: PeerIdentity,
        expected: PeerIdentity,
    },
}

/// Why a certificate failed the webpki verification, in the operator's terms.
fn untrusted_reason(error: &rustls::Error, ca_bundle: &Path) -> String {
    use rustls::CertificateError as C;
    let ca = ca_bundle.display();
    match error {
        rustls::Error::InvalidCertificate(e @ (C::UnknownIssuer | C::BadSignature)) => {
            format!("is not signed by the cluster CA in {ca}: {e}")
        }
        rustls::Error::InvalidCertificate(e @ (C::Expired | C::ExpiredContext { .. })) => {
            format!("has expired: {e}")
        }
        rustls::Error::InvalidCertificate(e @ (C::NotValidYet | C::NotValidYetContext { .. })) => {
            format!("is not valid yet: {e}")
        }
        rustls::Error::InvalidCertificate(e) => {
            format!("does not verify against the cluster CA in {ca}: {e}")
        }
        e => format!("does not verify against the cluster CA in {ca}: {e}"),
    }
}

/// Where a daemon's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM bundle of trusted CA certificates (old and new during a CA rotation).
    pub ca_bundle: PathBuf,
    /// PEM certificate chain, end-entity first.
    pub cert: PathBuf,
    /// PEM private key, mode 0600.
    pub key: PathBuf,
}

impl TlsFiles {
    fn paths(&self) -> [&Path; 3] {
        [&self.ca_bundle, &self.cert, &self.key]
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_error(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem(&read_public_file(path)?, path)
}

/// Every certificate of a PEM text read from `path` (named in errors); at least one.
pub fn certs_from_pem(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(path))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The check a holder runs on its own certificate before using it (presenting it, or handing
/// it to PostgreSQL): `chain` (end-entity first, read from `files.cert`) must verify against
/// the CA certificates `ca` (read from `files.ca_bundle`) now, with the same webpki client
/// verifier the servers run on every peer (issuer, signatures, validity period, client-auth
/// usage), and carry an `ha://` identity, equal to `expected` when given. Returns the identity.
pub fn check_own_certificate(
    ca: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    expected: Option<&PeerIdentity>,
    files: &TlsFiles,
) -> Result<PeerIdentity, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    verify_chain(Arc::new(roots), chain, files)?;
    own_identity(chain, expected, files)
}

fn verify_chain(
    roots: Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    files: &TlsFiles,
) -> Result<(), TlsError> {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    verifier
        .verify_client_cert(end_entity, intermediates, UnixTime::now())
        .map_err(|error| TlsError::Untrusted {
            cert: files.cert.clone(),
            ca_bundle: files.ca_bundle.clone(),
            error,
        })?;
    Ok(())
}

fn own_identity(
    chain: &[CertificateDer<'static>],
    expected: Option<&PeerIdentity>,
    files: &TlsFiles,
) -> Result<PeerIdentity, TlsError> {
    let end_entity = chain.first().ok_or_else(|| TlsError::NoCertificate {
        path: files.cert.clone(),
    })?;
    let identity =
        PeerIdentity::from_cert_der(end_entity).map_err(|source| TlsError::Identity {
            path: files.cert.clone(),
            source,
        })?;
    match expected {
        Some(expected) if *expected != identity => Err(TlsError::WrongIdentity {
            cert: files.cert.clone(),
            found: identity,
            expected: expected.clone(),
        }),
        _ => Ok(identity),
    }
}

/// The parsed contents of a [`TlsFiles`] set.
struct Material {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: PeerIdentity,
}

fn read_roots(ca_bundle: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs(ca_bundle)? {
        roots.add(ca)?;
    }
    Ok(roots)
}

/// How much of its own certificate a holder checks when loading it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OwnCheck {
    /// It must carry an `ha://` identity (any).
    Identity,
    /// It must pass [`check_own_certificate`] for this identity.
    Verified(PeerIdentity),
}

impl Material {
    fn load(files: &TlsFiles, check: &OwnCheck) -> Result<Self, TlsError> {
        let roots = Arc::new(read_roots(&files.ca_bundle)?);
        let chain = read_certs(&files.cert)?;
        // Our own certificate must carry an identity: peers will refuse it otherwise, and a
        // daemon should fail at start (or keep its old config) rather than at every connection.
        let identity = match check {
            OwnCheck::Identity => own_identity(&chain, None, files)?,
            OwnCheck::Verified(expected) => {
                verify_chain(roots.clone(), &chain, files)?;
                own_identity(&chain, Some(expected), files)?
            }
        };
        let key_pem = read_key_file(&files.key)?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_error(&files.key))?;
        Ok(Self {
            roots,
            chain,
            key,
            identity,
        })
    }
}

/// Something whose TLS configuration can be re-read from its files.
pub trait Reload: Send + Sync {
    /// Re-reads the files and swaps the config; on error the previous config stays in use.
    fn reload(&self) -> Result<(), TlsError>;
    fn files(&self) -> &TlsFiles;
}

/// Whether a [`ServerTls`] demands a client certificate during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Refuse the handshake without a certificate from the CA bundle.
    Required,
    /// Also admit clients without a certificate (their requests carry no identity). A presented
    /// certificate must still verify against the CA bundle.
    Optional,
}

/// The server side: a `ServerConfig` that verifies client certificates against the CA bundle.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    client_auth: ClientAuth,
    current: RwLock<Arc<ServerConfig>>,
}

fn build_server_config(
    files: &TlsFiles,
    client_auth: ClientAuth,
) -> Result<(Arc<ServerConfig>, PeerIdentity), TlsError> {
    let m = Material::load(files, &OwnCheck::Identity)?;
    let builder = WebPkiClientVerifier::builder_with_provider(m.roots, provider());
    let builder = match client_auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain, m.key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok((Arc::new(config), m.identity))
}

impl ServerTls {
    /// A server that requires a client certificate.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Self::load_with(files, ClientAuth::Required)
    }

    pub fn load_with(files: TlsFiles, client_auth: ClientAuth) -> Result<Self, TlsError> {
        let (config, identity) = build_server_config(&files, client_auth)?;
        info!(identity = %identity, cert = %files.cert.display(), ?client_auth, "server TLS loaded");
        Ok(Self {
            files,
            client_auth,
            current: RwLock::new(config),
        })
    }

    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth
    }

    /// The config new connections use.
    pub fn current(&self) -> Arc<ServerConfig> {
        // A poisoned lock only means a writer panicked between swaps; the Arc inside is whole.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Reload for ServerTls {
    fn reload(&self) -> Result<(), TlsError> {
        let (config, identity) = build_server_config(&self.files, self.client_auth)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        info!(identity = %identity, cert = %self.files.cert.display(), "server TLS reloaded");
        Ok(())
    }

    fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// The client side: a `ClientConfig` presenting our certificate and verifying the server against
/// the CA bundle (server name included). A client built with [`ClientTls::without_certificate`]
/// presents none: the only use is a node's first `Join`, before it has a certificate.
#[derive(Debug)]
pub struct ClientTls {
    files: TlsFiles,
    /// `None`: presents no certificate.
    own: Option<OwnCheck>,
    current: RwLock<Arc<ClientConfig>>,
}

fn build_client_config(
    files: &TlsFiles,
    own: Option<&OwnCheck>,
) -> Result<(Arc<ClientConfig>, Option<PeerIdentity>), TlsError> {
    let (roots, own) = if let Some(check) = own {
        let m = Material::load(files, check)?;
        (m.roots, Some((m.chain, m.key, m.identity)))
    } else {
        (Arc::new(read_roots(&files.ca_bundle)?), None)
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(verifier);
    let (mut config, identity) = match own {
        Some((chain, key, identity)) => {
            (builder.with_client_auth_cert(chain, key)?, Some(identity))
        }
        None => (builder.with_no_client_auth(), None),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((Arc::new(config), identity))
}

fn describe(identity: Option<&PeerIdentity>) -> String {
    identity.map_or_else(|| "<no certificate>".to_owned(), ToString::to_string)
}

impl ClientTls {
    /// Presents the certificate in `files` if it carries any `ha://` identity, without checking
    /// it further (tests use this to show that servers refuse bad certificates).
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Self::build(files, Some(OwnCheck::Identity))
    }

    /// Presents the certificate in `files` only if it passes [`check_own_certificate`] for
    /// `identity`, now and at every reload (a reload that fails keeps the previous config).
    pub fn load_checked(files: TlsFiles, identity: PeerIdentity) -> Result<Self, TlsError> {
        Self::build(files, Some(OwnCheck::Verified(identity)))
    }

    /// A client that verifies the server against `ca_bundle` but presents no certificate. Its
    /// [`Reload::files`] name the bundle for all three paths (only the bundle is read).
    pub fn without_certificate(ca_bundle: PathBuf) -> Result<Self, TlsError> {
        let files = TlsFiles {
            cert: ca_bundle.clone(),
            key: ca_bundle.clone(),
            ca_bundle,
        };
        Self::build(files, None)
    }

    fn build(files: TlsFiles, own: Option<OwnCheck>) -> Result<Self, TlsError> {
        let (config, identity) = build_client_config(&files, own.as_ref())?;
        info!(identity = %describe(identity.as_ref()), cert = %files.cert.display(),
              verified = matches!(own, Some(OwnCheck::Verified(_))), "client TLS loaded");
        Ok(Self {
            files,
            own,
            current: RwLock::new(config),
        })
    }

    /// The config new connections use.
    pub fn current(&self) -> Arc<ClientConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current config for a connection through a TCP proxy (HAProxy in front of the
    /// PostgreSQL nodes) to whichever server of `role` it forwards to: the name connected to
    /// is the proxy's, which no server certificate carries, so instead of the name the
    /// server's certificate must carry `role` (any node of it), besides chaining to the CA
    /// bundle and being valid now. The client certificate is presented as usual.
    pub fn through_proxy(&self, role: Role) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = (*self.current()).clone();
        let verifier = RoleVerifier {
            roots: Arc::new(read_roots(&self.files.ca_bundle)?),
            role,
            algorithms: provider().signature_verification_algorithms,
        };
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(verifier));
        Ok(Arc::new(config))
    }
}

/// See [`ClientTls::through_proxy`].
#[derive(Debug)]
struct RoleVerifier {
    roots: Arc<RootCertStore>,
    role: Role,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let identity = PeerIdentity::from_cert_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if identity.role() != self.role {
            return Err(rustls::Error::General(format!(
                "the server presented {identity}, not a {} certificate",
                self.role
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl Reload for ClientTls {
    fn reload(&self) -> Result<(), TlsError> {
        let (config, identity) = build_client_config(&self.files, self.own.as_ref())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        info!(identity = %describe(identity.as_ref()), cert = %self.files.cert.display(), "client TLS reloaded");
        Ok(())
    }

    fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// Identity of a file's current contents as far as change detection needs: a rename over it
/// changes the inode, an in-place rewrite the size or mtime.
type Stamp = Option<(u64, u64, u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.modified().ok()?))
}

fn stamps(files: &TlsFiles) -> [Stamp; 3] {
    files.paths().map(stamp)
}

/// Reloads TLS configs on SIGHUP and when their files change.
pub struct ReloadWatcher {
    targets: Vec<(Arc<dyn Reload>, [Stamp; 3])>,
    poll: Duration,
    sighup: tokio::signal::unix::Signal,
}

impl std::fmt::Debug for ReloadWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadWatcher")
            .field("targets", &self.targets.len())
            .field("poll", &self.poll)
            .finish()
    }
}

impl ReloadWatcher {
    /// Registers the SIGHUP handler at once (so a SIGHUP sent after this returns is never lost
    /// or fatal) and records the files' current state. Must be called inside a tokio runtime.
    pub fn new(targets: Vec<Arc<dyn Reload>>, poll: Duration) -> Result<Self, TlsError> {
        let sighup = signal(SignalKind::hangup()).map_err(TlsError::Signal)?;
        let targets = targets
            .into_iter()
            .map(|t| {
                let s = stamps(t.files());
                (t, s)
            })
            .collect();
        Ok(Self {
            targets,
            poll,
            sighup,
        })
    }

    /// Runs until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = self.sighup.recv() => {
                    info!("SIGHUP: reloading every TLS config");
                    for (target, last) in &mut self.targets {
                        *last = stamps(target.files());
                        reload_logged(target.as_ref(), "sighup");
                    }
                }
                _ = tick.tick() => {
                    for (target, last) in &mut self.targets {
                        let now = stamps(target.files());
                        if now != *last {
                            // Recorded even if the reload fails: a cert written before its key
                            // fails once, and the key's own change triggers the next attempt.
                            *last = now;
                            reload_logged(target.as_ref(), "files changed");
                        }
                    }
                }
            }
        }
    }
}

fn reload_logged(target: &dyn Reload, reason: &'static str) {
    if let Err(error) = target.reload() {
        warn!(
            cert = %target.files().cert.display(),
            reason,
            %error,
            "TLS reload failed; keeping the previous configuration"
        );
    }
}
