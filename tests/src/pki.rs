//! The TLS material of a test cluster: a cluster CA made with `ha_pki` in the cluster's
//! directory, the files of every party (monitor, node, operator, SQL client), the CA rotation
//! steps (a new CA trusted beside the old one and issuing from then on, then the old one
//! retired), and [`PgClientTls`], a PostgreSQL client's verify-full TLS with a client
//! certificate, reloadable like the daemons' own.
//!
//! Invariants: a party's files are `<dir>/<party>.ca` (its trust bundle), `.pem` and `.key`
//! (mode 0600), written atomically by `ha_pki`; every certificate issued here names 127.0.0.1
//! (every server of a test cluster listens on loopback, and clients verify the address); the
//! CA that issues is always the newest one, and every bundle written holds every CA still
//! trusted, so during a rotation old and new certificates are accepted everywhere.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use ha_pki::{Ca, Role, TlsError, TlsFiles, Validity};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where every server of a test cluster listens and what its certificates name.
pub const LOOPBACK: &str = "127.0.0.1";
/// How long a test CA is valid (certificates it issues end earlier).
const CA_LIFETIME: Duration = Duration::from_secs(30 * 86_400);
/// How long a certificate issued here is valid.
const CERT_LIFETIME: Duration = Duration::from_secs(86_400);

/// A cluster's CAs and the directory of every party's files.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    /// Every CA still trusted, oldest first; the last one issues.
    cas: Vec<Ca>,
    /// CAs created so far (names them `cluster-ca`, `cluster-ca-2`, ...).
    created: usize,
}

impl Pki {
    /// A new cluster CA in `dir` (created), its key written to [`Pki::ca_key_path`].
    pub fn create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("creating the PKI directory");
        let mut pki = Self {
            dir: dir.to_owned(),
            cas: Vec::new(),
            created: 0,
        };
        pki.add_ca();
        pki.write_ca_key();
        pki
    }

    /// The CA key file the monitors sign join CSRs with (the newest CA's, once
    /// [`Pki::write_ca_key`] ran after [`Pki::add_ca`]).
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The CA that issues now.
    pub fn current(&self) -> &Ca {
        self.cas.last().expect("a Pki always holds a CA")
    }

    /// The paths of `party`'s files (nothing is written).
    pub fn files(&self, party: &str) -> TlsFiles {
        TlsFiles {
            ca_bundle: self.dir.join(format!("{party}.ca")),
            cert: self.dir.join(format!("{party}.pem")),
            key: self.dir.join(format!("{party}.key")),
        }
    }

    /// Writes the bundle of every CA still trusted into `files.ca_bundle`.
    pub fn write_bundle(&self, files: &TlsFiles) {
        let pems: Vec<&str> = self.cas.iter().map(Ca::cert_pem).collect();
        let bundle = ha_pki::merge_ca_bundle(&pems, SystemTime::now())
            .expect("the harness's CAs are valid CA certificates");
        ha_pki::write_public_file(&files.ca_bundle, bundle.as_bytes())
            .expect("writing a CA bundle");
    }

    /// A new key and certificate for `name` in `role` from the current CA, into `files` (the key
    /// first: a reload between the two writes fails on the mismatch and keeps the old pair).
    pub fn issue(&self, files: &TlsFiles, role: Role, name: &str) {
        Self::issue_by(self.current(), files, role, name);
    }

    /// Like [`Pki::issue`], from `ca` (a retired CA, to show its certificates are refused).
    pub fn issue_by(ca: &Ca, files: &TlsFiles, role: Role, name: &str) {
        let validity = Validity::starting_now(CERT_LIFETIME).expect("a positive lifetime");
        let issued = ca
            .issue(name, role, &[LOOPBACK.to_owned()], validity)
            .unwrap_or_else(|e| panic!("issuing a certificate for {name}: {e}"));
        ha_pki::write_key_file(&files.key, issued.key_pem.as_bytes()).expect("writing a key");
        ha_pki::write_public_file(&files.cert, issued.cert_pem.as_bytes())
            .expect("writing a certificate");
    }

    /// Writes `party`'s bundle and a certificate for `name` in `role`; returns its files.
    pub fn party(&self, party: &str, role: Role, name: &str) -> TlsFiles {
        let files = self.files(party);
        self.write_bundle(&files);
        self.issue(&files, role, name);
        files
    }

    /// Rotation, first step: a new CA, trusted beside the old ones, issues from now on. Nothing
    /// is written: write every party's bundle, then [`Pki::write_ca_key`].
    pub fn add_ca(&mut self) {
        self.created += 1;
        let name = match self.created {
            1 => "cluster-ca".to_owned(),
            n => format!("cluster-ca-{n}"),
        };
        let validity = Validity::starting_now(CA_LIFETIME).expect("a positive lifetime");
        self.cas
            .push(Ca::create(&name, validity).expect("creating a CA"));
    }

    /// Writes the current CA's key to [`Pki::ca_key_path`]. A monitor accepts it only when its
    /// bundle holds the matching certificate, so bundles go first.
    pub fn write_ca_key(&self) {
        ha_pki::write_key_file(&self.ca_key_path(), self.current().key_pem().as_bytes())
            .expect("writing the CA key");
    }

    /// Rotation, last step: only the current CA stays trusted (write the bundles again).
    /// Returns the retired CAs, which can still issue certificates nobody trusts.
    pub fn retire_old_cas(&mut self) -> Vec<Ca> {
        let current = self.cas.pop().expect("a Pki always holds a CA");
        std::mem::replace(&mut self.cas, vec![current])
    }
}

/// A PostgreSQL client's TLS: `sslmode=verify-full` against the party's bundle (the server's
/// certificate must chain to a trusted CA and name the address connected to) with the party's
/// certificate, whose name the `cert` rules of `pg_hba.conf` compare with the database user.
/// [`PgClientTls::reload`] re-reads the files; sessions opened afterwards use them.
#[derive(Debug)]
pub struct PgClientTls {
    files: TlsFiles,
    user: String,
    current: RwLock<Arc<rustls::ClientConfig>>,
}

impl PgClientTls {
    /// Loads `files` for database user `user` (the certificate's name).
    pub fn load(files: TlsFiles, user: &str) -> Result<Self, TlsError> {
        let config = client_config(&files)?;
        Ok(Self {
            files,
            user: user.to_owned(),
            current: RwLock::new(config),
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads the files; on error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = client_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// What a new session connects with.
    pub fn connector(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_postgres_rustls::MakeRustlsConnect::new((*config).clone())
    }

    /// A session as [`PgClientTls::user`] on database `postgres` of the server at
    /// `127.0.0.1:port`, TLS required, within `timeout`.
    pub async fn connect(
        &self,
        port: u16,
        timeout: Duration,
    ) -> Result<tokio_postgres::Client, String> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(LOOPBACK)
            .port(port)
            .user(&self.user)
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(timeout);
        let (client, conn) = tokio::time::timeout(timeout, config.connect(self.connector()))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            // Debug: tokio-postgres keeps the TLS alert in the cause, which Display omits.
            .map_err(|e| format!("{e:?}"))?;
        tokio::spawn(conn);
        Ok(client)
    }
}

/// The first certificate of a PEM file, DER; `None` when there is none.
pub fn first_certificate(path: &Path) -> Option<Vec<u8>> {
    let pem = std::fs::read_to_string(path).ok()?;
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    Some(der.to_vec())
}

/// The certificate the PostgreSQL server at `127.0.0.1:port` presents to a new TLS session
/// (its SSLRequest, then a handshake verifying the server against `ca_bundle`), DER; `None`
/// when no verified session opens.
pub async fn served_certificate(port: u16, ca_bundle: &Path) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read_to_string(ca_bundle).ok()?;
    for ca in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(ca.ok()?).ok()?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let session = async {
        let mut tcp = tokio::net::TcpStream::connect((LOOPBACK, port))
            .await
            .ok()?;
        tcp.write_all(&SSL_REQUEST).await.ok()?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.ok()?;
        if answer[0] != b'S' {
            return None;
        }
        let name = rustls::pki_types::ServerName::try_from(LOOPBACK).ok()?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .ok()?;
        Some(tls.get_ref().1.peer_certificates()?.first()?.to_vec())
    };
    tokio::time::timeout(Duration::from_secs(2), session)
        .await
        .ok()
        .flatten()
}

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let pem_error = |path: &Path| {
        let path = path.to_owned();
        move |e: rustls::pki_types::pem::Error| TlsError::Pem {
            path: path.clone(),
            reason: e.to_string(),
        }
    };
    let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let pem = ha_pki::read_public_file(path)?;
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_error(path))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(&files.ca_bundle)? {
        roots.add(ca)?;
    }
    let chain = certs(&files.cert)?;
    let key_pem = ha_pki::read_key_file(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_error(&files.key))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cas_in(path: &Path) -> usize {
        let pem = std::fs::read_to_string(path).unwrap();
        CertificateDer::pem_slice_iter(pem.as_bytes()).count()
    }

    #[test]
    fn rotation_trusts_both_then_only_the_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = Pki::create(dir.path());
        let files = pki.party("op", Role::Operator, "op");
        assert_eq!(cas_in(&files.ca_bundle), 1);
        let first_key = std::fs::read_to_string(pki.ca_key_path()).unwrap();

        pki.add_ca();
        pki.write_bundle(&files);
        pki.write_ca_key();
        assert_eq!(cas_in(&files.ca_bundle), 2);
        let second_key = std::fs::read_to_string(pki.ca_key_path()).unwrap();
        assert_ne!(first_key, second_key, "the new CA's key replaced the old");
        let bundle = std::fs::read_to_string(&files.ca_bundle).unwrap();
        Ca::load_from_bundle(&bundle, &second_key).unwrap();

        let retired = pki.retire_old_cas();
        assert_eq!(retired.len(), 1);
        pki.write_bundle(&files);
        assert_eq!(cas_in(&files.ca_bundle), 1);
        let bundle = std::fs::read_to_string(&files.ca_bundle).unwrap();
        assert!(Ca::load_from_bundle(&bundle, &first_key).is_err());
        Ca::load_from_bundle(&bundle, &second_key).unwrap();

        // The SQL client's configuration loads from the same files, and reloads.
        let tls = PgClientTls::load(files, "op").unwrap();
        pki.issue(tls.files(), Role::Operator, "op");
        tls.reload().unwrap();
        assert_eq!(tls.user(), "op");
    }
}
