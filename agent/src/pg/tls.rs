//! The node's TLS material as PostgreSQL needs it: the agent's own files (owned by the agent,
//! key mode 0600) are checked and copied into [`super::PgConfig::tls_dir`], owned by the
//! PostgreSQL OS user with mode 0600 (PostgreSQL refuses a server key others can read, and libpq
//! a client key).
//!
//! Invariants: a copy is only replaced by material that passed [`Material::check`] with role
//! postgres, so neither a half-written rotation nor a foreign, expired or misnamed certificate
//! reaches PostgreSQL; copies are written atomically; key material never appears in a log line
//! or an error message (errors name paths only).

use std::path::Path;

use ha_pki::{PeerIdentity, Role, TlsFiles};
use ha_proto::NodeId;
use tracing::info;

use super::PgError;
use super::files::{self, Owner};
use crate::material::{self, Material};

/// Checks the material in `source` and installs it as `installed` (all three paths in one
/// directory). Returns whether any copy changed, i.e. whether PostgreSQL must reload.
pub fn install(
    source: &TlsFiles,
    installed: &TlsFiles,
    node: &NodeId,
    owner: Owner,
) -> Result<bool, PgError> {
    let own = Material::read(source).map_err(PgError::Tls)?;
    let stale = material::stale(vec![
        (installed.ca_bundle.clone(), own.ca.clone()),
        (installed.cert.clone(), own.cert.clone()),
        (installed.key.clone(), own.key.clone()),
    ])
    .map_err(PgError::Tls)?;
    if stale.is_empty() {
        return Ok(false);
    }
    let me = PeerIdentity::new(Role::Postgres, node.as_str())
        .map_err(|e| PgError::Tls(format!("node name {node}: {e}")))?;
    own.check(&me, source).map_err(PgError::Tls)?;
    if let Some(dir) = installed.key.parent() {
        files::prepare_dir(dir, owner)?;
    }
    for (path, text) in &stale {
        files::write_atomic(path, text, owner)?;
    }
    info!(node = %node, dir = %installed.key.parent().unwrap_or(Path::new("")).display(),
          files = stale.len(), "TLS material installed for PostgreSQL");
    Ok(true)
}

/// Whether every installed copy exists (they passed [`check`] when they were written).
pub fn copies_present(installed: &TlsFiles) -> bool {
    [&installed.ca_bundle, &installed.cert, &installed.key]
        .iter()
        .all(|p| p.exists())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    use ha_pki::{Ca, Validity};

    use super::*;

    fn me() -> Owner {
        Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    fn write(dir: &Path, ca: &Ca, cert: &str, key: &str) -> TlsFiles {
        let files = TlsFiles {
            ca_bundle: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        ha_pki::write_public_file(&files.ca_bundle, ca.cert_pem().as_bytes()).unwrap();
        ha_pki::write_public_file(&files.cert, cert.as_bytes()).unwrap();
        ha_pki::write_key_file(&files.key, key.as_bytes()).unwrap();
        files
    }

    #[test]
    fn installs_checked_copies_once_and_refuses_bad_material() {
        let tmp = tempfile::tempdir().unwrap();
        let validity = Validity::starting_now(Duration::from_secs(3600)).unwrap();
        let ca = Ca::create("test-ca", validity).unwrap();
        let node = NodeId::new("psql1").unwrap();
        let issued = ca.issue("psql1", Role::Postgres, &[], validity).unwrap();
        let src = write(tmp.path(), &ca, &issued.cert_pem, &issued.key_pem);
        let dst_dir = tmp.path().join("pg.tls");
        let dst = TlsFiles {
            ca_bundle: dst_dir.join("ca.pem"),
            cert: dst_dir.join("node.crt"),
            key: dst_dir.join("node.key"),
        };
        assert!(install(&src, &dst, &node, me()).unwrap());
        assert!(
            !install(&src, &dst, &node, me()).unwrap(),
            "nothing changed"
        );
        let mode = std::fs::metadata(&dst.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&dst.cert).unwrap(), issued.cert_pem);

        // A rotation that so far replaced only the certificate: refused, old copies kept.
        let next = ca.issue("psql1", Role::Postgres, &[], validity).unwrap();
        ha_pki::write_public_file(&src.cert, next.cert_pem.as_bytes()).unwrap();
        let err = install(&src, &dst, &node, me()).unwrap_err().to_string();
        assert!(err.contains("node.pem"), "{err}");
        assert!(!err.contains("PRIVATE KEY"), "{err}");
        assert_eq!(std::fs::read_to_string(&dst.cert).unwrap(), issued.cert_pem);
        ha_pki::write_key_file(&src.key, next.key_pem.as_bytes()).unwrap();
        assert!(install(&src, &dst, &node, me()).unwrap());
        assert_eq!(std::fs::read_to_string(&dst.key).unwrap(), next.key_pem);

        // Another node's (or an operator's) certificate is not this node's identity; another
        // CA's certificate named like the node, or an expired one, does not verify. Each is
        // refused with its reason, and the copies stay as they were.
        let now = std::time::SystemTime::now();
        let day = Duration::from_secs(86_400);
        let expired = Validity::new(now - 2 * day, now - day).unwrap();
        let rogue = Ca::create("rogue-ca", validity).unwrap();
        let refused = [
            (
                &ca,
                "psql2",
                Role::Postgres,
                validity,
                "not of postgres/psql1",
            ),
            (
                &ca,
                "psql1",
                Role::Operator,
                validity,
                "not of postgres/psql1",
            ),
            (
                &rogue,
                "psql1",
                Role::Postgres,
                validity,
                "is not signed by the cluster CA",
            ),
            (&ca, "psql1", Role::Postgres, expired, "has expired"),
        ];
        for (issuer, name, role, validity, reason) in refused {
            let bad = issuer.issue(name, role, &[], validity).unwrap();
            let src = write(tmp.path(), &ca, &bad.cert_pem, &bad.key_pem);
            let err = install(&src, &dst, &node, me()).unwrap_err().to_string();
            assert!(err.contains(reason), "{name} {role}: {err}");
            assert!(err.contains("node.pem"), "{err}");
            assert_eq!(std::fs::read_to_string(&dst.cert).unwrap(), next.cert_pem);
        }
        assert!(copies_present(&dst));

        // A key others can read is refused before anything is copied.
        std::fs::set_permissions(&src.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(install(&src, &dst, &node, me()).is_err());
        assert_eq!(std::fs::read_to_string(&dst.key).unwrap(), next.key_pem);
    }
}
