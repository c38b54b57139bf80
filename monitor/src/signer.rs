//! The cluster CA the leader signs join CSRs with (`[tls] ca_key`), reloaded like the other TLS
//! files: a CA rotation replaces the key file (and adds the new CA certificate to the bundle)
//! and the monitor signs with the new CA from its next reload on, without a restart.
//!
//! Invariants: the key is read only from a file that group and others cannot access; the CA in
//! use is always one whose certificate is in the bundle and whose key is the key file's (the
//! first certificate of the bundle the key matches); a reload that fails (a key written before
//! the bundle that holds its certificate, a widened mode) keeps the previous CA, and the file
//! watcher retries when either file changes again.

use std::path::Path;
use std::sync::{Arc, RwLock};

use ha_pki::{Ca, FileError, Reload, TlsError, TlsFiles};
use tracing::info;

/// The CA a leader signs with, swapped whole on reload.
#[derive(Debug)]
pub struct CaSigner {
    /// What the reload watcher stamps: the bundle (as `ca_bundle` and `cert`) and the CA key.
    files: TlsFiles,
    current: RwLock<Arc<Ca>>,
}

impl CaSigner {
    /// Loads the CA whose key is `ca_key` from `bundle`.
    pub fn load(bundle: &Path, ca_key: &Path) -> Result<Self, TlsError> {
        let files = TlsFiles {
            ca_bundle: bundle.to_owned(),
            cert: bundle.to_owned(),
            key: ca_key.to_owned(),
        };
        let ca = read(&files)?;
        info!(ca_key = %ca_key.display(), "CA key loaded: the leader signs join CSRs");
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(ca)),
        })
    }

    /// The CA to sign with now.
    pub fn current(&self) -> Arc<Ca> {
        // A poisoned lock only means a writer panicked between swaps; the Arc inside is whole.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn read(files: &TlsFiles) -> Result<Ca, TlsError> {
    let key = ha_pki::read_key_file(&files.key)?;
    let bundle = ha_pki::read_public_file(&files.ca_bundle)?;
    // Only paths go into the error: the key's text must never reach a log line.
    Ca::load_from_bundle(&bundle, &key).map_err(|e| {
        TlsError::File(FileError::Io {
            path: files.key.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not the key of a CA certificate in {}: {e}",
                    files.ca_bundle.display()
                ),
            ),
        })
    })
}

impl Reload for CaSigner {
    fn reload(&self) -> Result<(), TlsError> {
        let ca = read(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ca);
        info!(ca_key = %self.files.key.display(), "CA key reloaded: join CSRs are signed with it");
        Ok(())
    }

    fn files(&self) -> &TlsFiles {
        &self.files
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, SystemTime};

    use ha_pki::Validity;

    use super::*;

    fn ca(name: &str) -> Ca {
        Ca::create(
            name,
            Validity::starting_now(Duration::from_secs(86_400)).unwrap(),
        )
        .unwrap()
    }

    /// Whether `signer` signs with `ca` now (PEM compared without its line breaks).
    fn signs_with(signer: &CaSigner, ca: &Ca) -> bool {
        let flat = |pem: &str| pem.split_whitespace().collect::<String>();
        flat(signer.current().cert_pem()) == flat(ca.cert_pem())
    }

    #[test]
    fn a_rotated_key_is_used_after_reload_and_a_bad_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (bundle, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        let old = ca("cluster-ca");
        ha_pki::write_public_file(&bundle, old.cert_pem().as_bytes()).unwrap();
        ha_pki::write_key_file(&key, old.key_pem().as_bytes()).unwrap();
        let signer = CaSigner::load(&bundle, &key).unwrap();
        assert!(signs_with(&signer, &old));

        // The new key before the bundle holds its certificate: refused, the old CA signs on.
        let new = ca("cluster-ca-2");
        ha_pki::write_key_file(&key, new.key_pem().as_bytes()).unwrap();
        let err = signer.reload().unwrap_err().to_string();
        assert!(
            err.contains("ca.key") && !err.contains("PRIVATE KEY"),
            "{err}"
        );
        assert!(signs_with(&signer, &old));

        let both =
            ha_pki::merge_ca_bundle(&[old.cert_pem(), new.cert_pem()], SystemTime::now()).unwrap();
        ha_pki::write_public_file(&bundle, both.as_bytes()).unwrap();
        signer.reload().unwrap();
        assert!(signs_with(&signer, &new));
    }
}
