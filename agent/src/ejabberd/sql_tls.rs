//! The node's certificate for ejabberd's connections to PostgreSQL: TLS with certificate
//! authentication from the cluster CA instead of a password (`hostssl ... cert` on the
//! PostgreSQL nodes, the node name mapped to ejabberd's SQL role).
//!
//! ejabberd reads one PEM file holding certificate and key (`sql_ssl_certfile`; Erlang's `ssl`
//! takes the key from the certificate file) and the CA bundle (`sql_ssl_cafile`). The agent
//! keeps both in [`SqlTls::dir`] as copies of its own `[tls]` files: [`CA_FILE`] (mode 0644)
//! and [`CLIENT_FILE`] (mode 0640), the directory 0750, all with the owner and group of the
//! managed `ejabberd.yml` when the agent runs as root (the file ejabberd already reads), the
//! agent's own otherwise (the packaged unit runs the agent as ejabberd's user).
//!
//! Invariants: a copy is only written from material that passed [`Material::check`] with role
//! ejabberd (a renewal reaches ejabberd's next connection; a half-written or foreign one never
//! does); nothing is followed through a symbolic link (`ha_files`); key material never appears
//! in a log line or an error message.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use ha_files::{Owner, WriteOptions};
use ha_pki::{PeerIdentity, TlsFiles};
use tracing::info;

use crate::material::{self, Material};

/// The CA bundle ejabberd checks the server with (`sql_ssl_cafile`).
pub const CA_FILE: &str = "ca.pem";
/// Certificate and key in one file (`sql_ssl_certfile`).
pub const CLIENT_FILE: &str = "client.pem";

/// Where and from what the copies for ejabberd are made.
#[derive(Debug, Clone)]
pub struct SqlTls {
    /// The directory `ejabberd.yml` names in `sql_ssl_cafile` and `sql_ssl_certfile`.
    pub dir: PathBuf,
    /// The agent's own files.
    pub source: TlsFiles,
    /// This node, role ejabberd: the certificate must name it.
    pub me: PeerIdentity,
}

impl SqlTls {
    /// Checks the agent's files and writes the copies that differ, owned like `owner_of`
    /// (see the module docs). Returns whether anything changed.
    pub fn install(&self, owner_of: &Path) -> Result<bool, String> {
        let own = Material::read(&self.source)?;
        let client = format!("{}{}", with_newline(&own.cert), own.key);
        let ca = self.dir.join(CA_FILE);
        let certfile = self.dir.join(CLIENT_FILE);
        let stale = material::stale(vec![(ca.clone(), own.ca.clone()), (certfile, client)])?;
        if stale.is_empty() {
            return Ok(false);
        }
        own.check(&self.me, &self.source)?;
        let owner = owner_like(owner_of)?;
        ha_files::prepare_dir(&self.dir, 0o750, owner).map_err(|e| e.to_string())?;
        for (path, text) in &stale {
            let mode = if *path == ca { 0o644 } else { 0o640 };
            ha_files::write(
                path,
                text.as_bytes(),
                WriteOptions::mode(mode).maybe_owned_by(owner),
            )
            .map_err(|e| e.to_string())?;
        }
        info!(node = %self.me.name(), dir = %self.dir.display(), files = stale.len(),
              "TLS material installed for ejabberd's SQL connections");
        Ok(true)
    }
}

/// A PEM text followed by a line break, so that the next one starts on its own line.
fn with_newline(pem: &str) -> String {
    if pem.ends_with('\n') {
        pem.to_owned()
    } else {
        format!("{pem}\n")
    }
}

/// The owner and group of `path` when this process may give files away (root), else none:
/// the copies are then the agent's own.
fn owner_like(path: &Path) -> Result<Option<Owner>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(Owner {
        uid: meta.uid(),
        gid: meta.gid(),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    use ha_pki::{Ca, Role, Validity};

    use super::*;

    fn node_files(dir: &Path, ca: &Ca, name: &str, role: Role) -> TlsFiles {
        let files = TlsFiles {
            ca_bundle: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        let validity = Validity::starting_now(Duration::from_secs(3600)).unwrap();
        let issued = ca.issue(name, role, &[], validity).unwrap();
        ha_pki::write_public_file(&files.ca_bundle, ca.cert_pem().as_bytes()).unwrap();
        ha_pki::write_public_file(&files.cert, issued.cert_pem.as_bytes()).unwrap();
        ha_pki::write_key_file(&files.key, issued.key_pem.as_bytes()).unwrap();
        files
    }

    fn test_ca() -> Ca {
        Ca::create(
            "test-ca",
            Validity::starting_now(Duration::from_secs(7200)).unwrap(),
        )
        .unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn copies_hold_certificate_and_key_and_change_only_with_the_source() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = test_ca();
        let source = node_files(tmp.path(), &ca, "e1server", Role::Ejabberd);
        let yml = tmp.path().join("ejabberd.yml");
        std::fs::write(&yml, "hosts: []\n").unwrap();
        let sql = SqlTls {
            dir: tmp.path().join("sql"),
            source: source.clone(),
            me: PeerIdentity::new(Role::Ejabberd, "e1server").unwrap(),
        };
        assert!(sql.install(&yml).unwrap());
        let client = std::fs::read_to_string(sql.dir.join(CLIENT_FILE)).unwrap();
        let cert = std::fs::read_to_string(&source.cert).unwrap();
        let key = std::fs::read_to_string(&source.key).unwrap();
        assert!(
            client.starts_with(cert.trim_end()) && client.ends_with(&key),
            "{client}"
        );
        assert_eq!(mode(&sql.dir.join(CLIENT_FILE)), 0o640);
        assert_eq!(mode(&sql.dir.join(CA_FILE)), 0o644);
        assert_eq!(mode(&sql.dir), 0o750);
        assert!(
            !sql.install(&yml).unwrap(),
            "nothing changed: nothing written"
        );

        // A renewal: new certificate and key in the agent's files reach the copy.
        let renewed = node_files(tmp.path(), &ca, "e1server", Role::Ejabberd);
        assert!(sql.install(&yml).unwrap());
        let client = std::fs::read_to_string(sql.dir.join(CLIENT_FILE)).unwrap();
        assert!(client.ends_with(&std::fs::read_to_string(&renewed.key).unwrap()));
    }

    #[test]
    fn a_certificate_for_another_node_or_role_is_never_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = test_ca();
        let yml = tmp.path().join("ejabberd.yml");
        std::fs::write(&yml, "hosts: []\n").unwrap();
        for (name, role) in [("e2server", Role::Ejabberd), ("e1server", Role::Postgres)] {
            let source = node_files(tmp.path(), &ca, name, role);
            let sql = SqlTls {
                dir: tmp.path().join("sql"),
                source,
                me: PeerIdentity::new(Role::Ejabberd, "e1server").unwrap(),
            };
            let err = sql.install(&yml).unwrap_err();
            assert!(err.contains("node.pem"), "{name} {role:?}: {err}");
            assert!(!sql.dir.join(CLIENT_FILE).exists());
            assert!(!err.contains("PRIVATE KEY"), "{err}");
        }
    }
}
