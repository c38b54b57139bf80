//! The node's own TLS files (CA bundle, certificate, key), read and checked as one piece before
//! a copy of them is handed to a server the agent drives: PostgreSQL ([`crate::pg::tls`]) and
//! ejabberd's SQL connections ([`crate::ejabberd::sql_tls`]).
//!
//! Invariants: a copy is only written from material that passed [`Material::check`] (every PEM
//! parses, the certificate chains to the CA bundle and is valid now, names this node with its
//! role, and the key belongs to it), so neither a half-written renewal nor a foreign, expired or
//! misnamed certificate reaches a server; key material never appears in a log line or an error
//! message (errors name paths only).

use std::path::{Path, PathBuf};

use ha_pki::{PeerIdentity, TlsFiles};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;

/// The texts of the agent's own TLS files.
pub struct Material {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Material {
    // The key must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material").finish_non_exhaustive()
    }
}

impl Material {
    /// Reads the three files; refuses a key file that group or others can read (the agent's
    /// copy must be private before any copy of it is made).
    pub fn read(source: &TlsFiles) -> Result<Self, String> {
        let text = |r: Result<String, ha_pki::FileError>| r.map_err(|e| e.to_string());
        Ok(Self {
            ca: text(ha_pki::read_public_file(&source.ca_bundle))?,
            cert: text(ha_pki::read_public_file(&source.cert))?,
            key: text(ha_pki::read_key_file(&source.key))?,
        })
    }

    /// The checks a server and its peers would otherwise only make at the next connection:
    /// the same as the agent's own link to the monitors makes
    /// ([`ha_pki::check_own_certificate`]), plus the key match.
    pub fn check(&self, me: &PeerIdentity, source: &TlsFiles) -> Result<(), String> {
        let roots =
            ha_pki::certs_from_pem(&self.ca, &source.ca_bundle).map_err(|e| e.to_string())?;
        let chain = ha_pki::certs_from_pem(&self.cert, &source.cert).map_err(|e| e.to_string())?;
        ha_pki::check_own_certificate(&roots, &chain, Some(me), source)
            .map_err(|e| e.to_string())?;
        // Only the path goes into the message: a parse error must not quote the key.
        let key_der = PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .map_err(|_| format!("{}: not a PEM private key", source.key.display()))?;
        rustls::sign::CertifiedKey::from_der(
            chain,
            key_der,
            &rustls::crypto::ring::default_provider(),
        )
        .map_err(|e| {
            format!(
                "{} and {}: {e}",
                source.cert.display(),
                source.key.display()
            )
        })?;
        Ok(())
    }
}

/// The copies among `wanted` (path, text) whose file is missing or holds another text.
pub fn stale(wanted: Vec<(PathBuf, String)>) -> Result<Vec<(PathBuf, String)>, String> {
    let mut out = Vec::new();
    for (path, text) in wanted {
        if read_optional(&path)?.as_deref() != Some(text.as_str()) {
            out.push((path, text));
        }
    }
    Ok(out)
}

/// Reads a copy the agent may have written, `None` when absent.
fn read_optional(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}
