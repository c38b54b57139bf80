//! Renewal of the node's certificate before it expires: at about two thirds of its lifetime the
//! agent makes a new key and CSR, calls `AgentService/Renew` with its current certificate, and
//! installs the answer without a restart: the new certificate and key replace the files of
//! `[tls]`, the link to the monitors reloads them and reconnects, and the PostgreSQL controller
//! installs the new copies and reloads the server (`pg_reload_conf`) at its next tick, as for
//! any rotated certificate. The old certificate stays valid until it expires, so nothing is
//! refused meanwhile. A failed attempt is logged and retried with a doubling pause.
//!
//! Crash safety: the new key is first written beside the key file (`<key>.renew`, mode 0600),
//! then the certificate replaces its file, then the pending key is renamed over the key file,
//! each step atomic. [`recover`], at start, finishes or undoes an interrupted renewal: if the
//! certificate matches the pending key, the key is put in place; otherwise the pending key is
//! deleted (the old pair is still whole).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ha_pki::{CertInfo, ClientTls, PeerIdentity, Reload as _, TlsFiles};
use ha_proto::{NodeId, v1};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::monitors::Monitors;

/// The first pause after a failed attempt; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Where the new key waits while its certificate is written.
pub fn pending_key(files: &TlsFiles) -> PathBuf {
    let mut name = files.key.as_os_str().to_owned();
    name.push(".renew");
    PathBuf::from(name)
}

/// When a certificate is due for renewal: two thirds into its lifetime, counted from when it
/// was signed (`not_before` plus the clock-skew allowance the signer dates it back by).
pub fn due(info: &CertInfo) -> SystemTime {
    let signed = (info.not_before + ha_pki::CLOCK_SKEW_ALLOWANCE).min(info.not_after);
    let lifetime = info.not_after.duration_since(signed).unwrap_or_default();
    signed + lifetime * 2 / 3
}

/// Finishes or undoes a renewal a crash interrupted (see the module documentation).
pub fn recover(files: &TlsFiles, me: &PeerIdentity) -> Result<(), ha_files::FileError> {
    let pending = pending_key(files);
    if !pending.exists() {
        return Ok(());
    }
    let candidate = TlsFiles {
        key: pending.clone(),
        ..files.clone()
    };
    if ClientTls::load_checked(candidate, me.clone()).is_ok() {
        warn!(key = %files.key.display(), "an interrupted certificate renewal is completed: the new key is put in place");
        ha_files::rename(&pending, &files.key)
    } else {
        warn!(key = %pending.display(), "an interrupted certificate renewal is undone: the pending key is deleted");
        ha_files::remove(&pending).map(drop)
    }
}

/// Renews the certificate in `files` whenever it is due, until `shutdown`. `link` is the client
/// TLS of the monitor link, reloaded after each renewal.
pub async fn run(
    node: NodeId,
    files: TlsFiles,
    monitors: Monitors,
    link: Arc<ClientTls>,
    shutdown: CancellationToken,
) {
    let mut retry = FIRST_RETRY;
    loop {
        let info = match ha_pki::read_public_file(&files.cert)
            .map_err(|e| e.to_string())
            .and_then(|pem| CertInfo::from_pem(&pem).map_err(|e| e.to_string()))
        {
            Ok(info) => info,
            Err(e) => {
                warn!(%node, cert = %files.cert.display(), error = %e, "cannot read the certificate to renew; trying again later");
                if pause(&shutdown, MAX_RETRY).await {
                    return;
                }
                continue;
            }
        };
        let wait = due(&info)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if !wait.is_zero() {
            info!(%node, serial = %info.serial, renew_in = %humantime::format_duration(round(wait)), "certificate renewal scheduled");
            if pause(&shutdown, wait).await {
                return;
            }
            continue;
        }
        match renew(&node, &files, &monitors, &link).await {
            Ok(serial) => {
                info!(%node, old = %info.serial, new = %serial, "certificate renewed and installed");
                retry = FIRST_RETRY;
            }
            Err(e) => {
                let left = info
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                warn!(%node, serial = %info.serial, error = %e,
                      expires_in = %humantime::format_duration(round(left)),
                      retry_in = %humantime::format_duration(retry),
                      "certificate renewal failed; retrying");
                if pause(&shutdown, retry).await {
                    return;
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Sleeps `d`; true when shutdown came first.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// One renewal: new key and CSR, the call, the files written in the crash-safe order, the
/// link reloaded. Returns the new serial.
async fn renew(
    node: &NodeId,
    files: &TlsFiles,
    monitors: &Monitors,
    link: &ClientTls,
) -> Result<String, String> {
    let (csr_pem, key_pem) = ha_pki::generate_csr(node.as_str()).map_err(|e| e.to_string())?;
    let request = v1::RenewRequest {
        node: node.to_string(),
        csr_pem,
    };
    let answer = monitors
        .call(|mut c| {
            let r = request.clone();
            async move { c.renew(r).await }
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    let info = CertInfo::from_pem(&answer.certificate_pem)
        .map_err(|e| format!("the monitor's answer is not a certificate: {e}"))?;
    if info.identity.as_ref().map(PeerIdentity::name) != Some(node.as_str()) {
        return Err(format!(
            "the monitor's certificate is for {:?}, not {node}",
            info.identity
        ));
    }
    let pending = pending_key(files);
    ha_pki::write_key_file(&pending, key_pem.as_bytes()).map_err(|e| e.to_string())?;
    ha_pki::write_public_file(&files.cert, answer.certificate_pem.as_bytes())
        .map_err(|e| e.to_string())?;
    ha_files::rename(&pending, &files.key).map_err(|e| e.to_string())?;
    if let Err(e) = link.reload() {
        // The reload watcher tries again when the files change; the old link stays meanwhile.
        warn!(%node, error = %e, "the monitor link did not take the renewed certificate yet");
    }
    monitors.reconnect();
    Ok(info.serial)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::Path;

    #[test]
    fn due_two_thirds_into_the_lifetime_from_signing() {
        let signed = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let info = CertInfo {
            not_before: signed - ha_pki::CLOCK_SKEW_ALLOWANCE,
            not_after: signed + Duration::from_secs(300),
            is_ca: false,
            identity: None,
            serial: String::new(),
            public_key_sha256: String::new(),
        };
        assert_eq!(due(&info), signed + Duration::from_secs(200));
    }

    /// A node's files with a certificate from `ca` and its key, plus a second key and a
    /// certificate for it (what a renewal writes).
    fn files_with_renewal(dir: &Path) -> (TlsFiles, PeerIdentity, ha_pki::IssuedCert) {
        ha_pki::install_crypto();
        let ca = ha_pki::Ca::create(
            "ca",
            ha_pki::Validity::starting_now(Duration::from_secs(86_400)).unwrap(),
        )
        .unwrap();
        let files = TlsFiles {
            ca_bundle: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        ha_pki::write_public_file(&files.ca_bundle, ca.cert_pem().as_bytes()).unwrap();
        let validity = || ha_pki::Validity::starting_now(Duration::from_secs(3_600)).unwrap();
        let old = ca
            .issue("n1", ha_pki::Role::Postgres, &[], validity())
            .unwrap();
        ha_pki::write_public_file(&files.cert, old.cert_pem.as_bytes()).unwrap();
        ha_pki::write_key_file(&files.key, old.key_pem.as_bytes()).unwrap();
        let new = ca
            .issue("n1", ha_pki::Role::Postgres, &[], validity())
            .unwrap();
        ha_pki::write_key_file(&pending_key(&files), new.key_pem.as_bytes()).unwrap();
        let me = PeerIdentity::new(ha_pki::Role::Postgres, "n1").unwrap();
        (files, me, new)
    }

    #[test]
    fn a_renewal_cut_after_the_certificate_is_completed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (files, me, new) = files_with_renewal(dir.path());
        ha_pki::write_public_file(&files.cert, new.cert_pem.as_bytes()).unwrap();
        recover(&files, &me).unwrap();
        assert!(!pending_key(&files).exists());
        assert_eq!(std::fs::read_to_string(&files.key).unwrap(), new.key_pem);
        ClientTls::load_checked(files, me).unwrap();
    }

    #[test]
    fn a_renewal_cut_before_the_certificate_is_undone_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (files, me, new) = files_with_renewal(dir.path());
        recover(&files, &me).unwrap();
        assert!(!pending_key(&files).exists());
        assert_ne!(std::fs::read_to_string(&files.key).unwrap(), new.key_pem);
        ClientTls::load_checked(files, me).unwrap();
    }
}
