//! SSH client for the guests (russh): pinned host keys, key authentication, remote commands
//! and file upload.
//!
//! Invariants: a connection succeeds only if the server proves possession of exactly the host
//! key the provisioner generated for that guest and pinned before the guest first booted;
//! any other key ends the handshake with [`SshError::HostKeyMismatch`], naming both
//! fingerprints (no trust on first use, no known_hosts prompt). Uploads go through
//! `cat > tmp` on the remote side and a rename, so a reader never sees a half-written file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use tracing::{debug, info};

/// Errors of the SSH client.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The TCP connection failed or timed out.
    #[error("ssh {addr}: connect: {source}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The server presented another host key than the pinned one.
    #[error(
        "ssh: host key mismatch: expected pinned {expected}, server presented {presented}; refusing to connect"
    )]
    HostKeyMismatch {
        /// Fingerprint of the pinned key.
        expected: String,
        /// Fingerprint of the presented key.
        presented: String,
    },
    /// The server refused our key.
    #[error("ssh {addr}: the server refused key authentication as {user}")]
    AuthRejected {
        /// The server.
        addr: SocketAddr,
        /// The user.
        user: String,
    },
    /// Protocol or transport error.
    #[error("ssh: {0}")]
    Protocol(#[from] russh::Error),
    /// The channel closed without an exit status.
    #[error("ssh: `{command}` ended without an exit status")]
    NoExitStatus {
        /// The command.
        command: String,
    },
    /// The command was killed by a signal.
    #[error("ssh: `{command}` was killed by signal {signal}")]
    Signal {
        /// The command.
        command: String,
        /// The signal's name.
        signal: String,
    },
    /// A remote command exited with a non-zero status.
    #[error("ssh: `{command}` exited with status {status}: {stderr}")]
    Failed {
        /// The command.
        command: String,
        /// Its exit status.
        status: u32,
        /// Its standard error, lossily decoded.
        stderr: String,
    },
    /// A key could not be generated, read, parsed or written.
    #[error("ssh key {path}: {message}")]
    Key {
        /// The key file (or `<generated>`).
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// Quotes `s` for a POSIX shell: single quotes, with embedded ones closed and escaped.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A fresh ed25519 key pair from the operating system's random source.
pub fn generate_key(comment: &str) -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ));
    key.set_comment(comment);
    key
}

fn key_err(path: &Path) -> impl FnOnce(String) -> SshError {
    let path = path.display().to_string();
    move |message| SshError::Key { path, message }
}

/// Writes `key` in OpenSSH format with mode 0600 (and `<path>.pub` with 0644), atomically:
/// a file left with other permissions is replaced, never reused with them.
pub fn write_private_key(path: &Path, key: &PrivateKey) -> Result<(), SshError> {
    let pem = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| key_err(path)(e.to_string()))?;
    ha_pki::write_key_file(path, pem.as_bytes()).map_err(|e| key_err(path)(e.to_string()))?;
    let public = public_openssh(key.public_key())?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = Path::new(&pub_path);
    ha_pki::write_public_file(pub_path, format!("{public}\n").as_bytes())
        .map_err(|e| key_err(pub_path)(e.to_string()))
}

/// Reads an OpenSSH private key.
pub fn read_private_key(path: &Path) -> Result<PrivateKey, SshError> {
    let text = std::fs::read_to_string(path).map_err(|e| key_err(path)(e.to_string()))?;
    PrivateKey::from_openssh(text).map_err(|e| key_err(path)(e.to_string()))
}

/// The public key in `authorized_keys` / `known_hosts` format (`ssh-ed25519 AAAA... comment`).
pub fn public_openssh(key: &PublicKey) -> Result<String, SshError> {
    key.to_openssh()
        .map_err(|e| key_err(Path::new("<public key>"))(e.to_string()))
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The russh handler: accepts exactly the pinned host key.
#[derive(Debug)]
struct PinnedHostKey {
    expected: PublicKey,
}

impl client::Handler for PinnedHostKey {
    type Error = SshError;

    async fn check_server_key(
        &mut self,
        presented: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match presented {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. }
                if key.key_data() == self.expected.key_data() =>
            {
                Ok(true)
            }
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                Err(SshError::HostKeyMismatch {
                    expected: fingerprint(&self.expected),
                    presented: fingerprint(key),
                })
            }
            russh::keys::PublicKeyOrCertificate::Certificate(cert) => {
                Err(SshError::HostKeyMismatch {
                    expected: fingerprint(&self.expected),
                    presented: format!(
                        "a certificate for {}",
                        cert.public_key().fingerprint(HashAlg::Sha256)
                    ),
                })
            }
        }
    }
}

/// What a remote command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status.
    pub status: u32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

/// An authenticated SSH connection to one guest.
pub struct SshSession {
    addr: SocketAddr,
    handle: Handle<PinnedHostKey>,
}

impl std::fmt::Debug for SshSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSession")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SshSession {
    /// Connects to `addr` within `timeout`, checks the host key against `host_key` and
    /// authenticates as `user` with `key`.
    pub async fn connect(
        addr: SocketAddr,
        host_key: &PublicKey,
        user: &str,
        key: Arc<PrivateKey>,
        timeout: Duration,
    ) -> Result<Self, SshError> {
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(Duration::from_secs(300)),
            ..client::Config::default()
        });
        let handler = PinnedHostKey {
            expected: host_key.clone(),
        };
        let mut handle = match tokio::time::timeout(timeout, client::connect(config, addr, handler))
            .await
        {
            Ok(result) => result.map_err(|e| match e {
                SshError::Protocol(russh::Error::IO(source)) => SshError::Connect { addr, source },
                other => other,
            })?,
            Err(_) => {
                return Err(SshError::Connect {
                    addr,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no SSH handshake within {timeout:?}"),
                    ),
                });
            }
        };
        let auth = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, None))
            .await?;
        if !auth.success() {
            return Err(SshError::AuthRejected {
                addr,
                user: user.to_owned(),
            });
        }
        debug!(%addr, user, "ssh session authenticated");
        Ok(Self { addr, handle })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs `command` with `stdin` as its standard input and collects its output.
    pub async fn exec_with_stdin(
        &self,
        command: &str,
        stdin: &[u8],
    ) -> Result<ExecOutput, SshError> {
        let mut channel = self.handle.channel_open_session().await?;
        channel.exec(true, command).await?;
        if !stdin.is_empty() {
            channel.data(stdin).await?;
        }
        channel.eof().await?;
        let mut out = ExecOutput {
            status: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        let mut status = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    return Err(SshError::Signal {
                        command: command.to_owned(),
                        signal: format!("{signal_name:?}"),
                    });
                }
                _ => {}
            }
        }
        out.status = status.ok_or_else(|| SshError::NoExitStatus {
            command: command.to_owned(),
        })?;
        debug!(addr = %self.addr, command, status = out.status, "remote command ran");
        Ok(out)
    }

    /// Runs `command` and collects its output; a non-zero status is not an error here.
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, SshError> {
        self.exec_with_stdin(command, &[]).await
    }

    /// Runs `command` and fails unless it exits with status 0.
    pub async fn run(&self, command: &str) -> Result<ExecOutput, SshError> {
        let out = self.exec(command).await?;
        if out.status != 0 {
            return Err(SshError::Failed {
                command: command.to_owned(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(out)
    }

    /// Writes `data` to the absolute `path` on the server with permission bits `mode`,
    /// creating parent directories; the file is replaced atomically.
    pub async fn upload(&self, path: &str, data: &[u8], mode: u32) -> Result<(), SshError> {
        self.upload_owned(path, data, mode, None).await
    }

    /// [`Self::upload`], the file owned by `owner` (`user:group`) when given. The content is
    /// never readable by others on the way: the temporary file is created 0600 and gets its
    /// owner and mode before it is renamed into place.
    pub async fn upload_owned(
        &self,
        path: &str,
        data: &[u8],
        mode: u32,
        owner: Option<&str>,
    ) -> Result<(), SshError> {
        let parent = Path::new(path)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "/".to_owned());
        let tmp = format!("{path}.ha-upload");
        let chown = owner.map_or_else(String::new, |o| {
            format!("chown {} {} && ", shell_quote(o), shell_quote(&tmp))
        });
        let command = format!(
            "mkdir -p {parent} && (umask 077 && cat > {tmp}) && {chown}chmod {mode:o} {tmp} && mv -f {tmp} {dst}",
            parent = shell_quote(&parent),
            tmp = shell_quote(&tmp),
            dst = shell_quote(path),
        );
        let out = self.exec_with_stdin(&command, data).await?;
        if out.status != 0 {
            return Err(SshError::Failed {
                command,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        info!(addr = %self.addr, path, bytes = data.len(), owner, "uploaded file");
        Ok(())
    }

    /// Closes the connection politely.
    pub async fn close(self) -> Result<(), SshError> {
        self.handle
            .disconnect(russh::Disconnect::ByApplication, "done", "en")
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_quotes_and_spaces() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn generated_keys_round_trip_through_openssh_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = generate_key("test@ha");
        let other = generate_key("other");
        assert_ne!(key.public_key().key_data(), other.public_key().key_data());
        let path = dir.path().join("id_ed25519");
        // A file left world-readable (by hand, by an older version) does not keep its mode.
        std::fs::write(&path, "old").expect("old key file");
        std::fs::write(dir.path().join("id_ed25519.pub"), "old").expect("old public file");
        write_private_key(&path, &key).expect("write");
        let back = read_private_key(&path).expect("read");
        assert_eq!(back.public_key().key_data(), key.public_key().key_data());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let public = std::fs::read_to_string(dir.path().join("id_ed25519.pub")).expect("pub");
        assert!(public.starts_with("ssh-ed25519 AAAA"), "{public}");
        assert!(public.trim_end().ends_with("test@ha"), "{public}");
    }
}
