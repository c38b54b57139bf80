//! Guest bootstrap of the libvirt backend: per-guest disks and keys before boot, then SSH to
//! push each node's files and start its units.
//!
//! Before a guest first boots, the provisioner generates its ed25519 SSH host key and pins the
//! public half; the private half reaches the guest only through its seed disk, a small
//! read-only ext4 image (`vdb`, see [`crate::image`]) holding a tree copied onto `/` at boot:
//! `/etc/systemd/network/10-ha-<network>.network` (static address per interface, matched by
//! the MAC derived from the address; default route via the gateway; forwarding on gateways),
//! `/etc/nftables.conf` (the node's generated firewall), `/etc/hostname`, `/etc/hosts`, the
//! host key and `/root/.ssh/authorized_keys` with the stand's client key.
//!
//! State directory layout: `ssh/id_ed25519` (client key), `ssh/known_hosts` (the pinned keys,
//! for an operator's `ssh -o UserKnownHostsFile=...`), and `guests/<node>/` with
//! `ssh_host_ed25519_key`, `seed.img`, `disk.qcow2` (overlay on the base image) and
//! `console.log`. Keys are generated once and reused, so the pins survive a second `up`; the
//! overlay is created only when missing, so a second `up` keeps the guest's disk.
//!
//! Files to push come from a directory laid out by the caller: `roles/<role>/` and
//! `nodes/<node>/`, each a tree mirrored onto the guest's `/` (modes kept). Every pushed
//! `etc/systemd/system/*.service` unit is then enabled and started.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::{PrivateKey, PublicKey};
use tracing::{debug, info, warn};

use crate::firewall::node_firewall;
use crate::image::{BaseImage, KERNEL_CMDLINE};
use crate::libvirt::GuestMedia;
use crate::ssh::{SshError, SshSession, generate_key, public_openssh, read_private_key};
use crate::topology::{Node, Role, Topology, mac_address};

/// User the provisioner logs in as.
pub const SSH_USER: &str = "root";

/// Errors of the guest bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A helper program failed.
    #[error("`{command}` failed: {message}")]
    Tool {
        /// The command line.
        command: String,
        /// Its exit status and standard error.
        message: String,
    },
    /// SSH failed for a node.
    #[error("{node}: {source}")]
    Ssh {
        /// The node.
        node: String,
        /// The cause.
        source: SshError,
    },
    /// A key of the stand is missing or unreadable (`exec` and `status` need the keys `up`
    /// made).
    #[error("{path}: cannot read the key (was the stand brought up with --image?)")]
    Keys {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: SshError,
    },
    /// A node has no management address (validation guarantees one; a stored state might not).
    #[error("{0}: no management address to reach it over SSH")]
    NoManagementAddress(String),
    /// A guest did not answer SSH in time.
    #[error("{node}: no SSH at {addr} after {waited:?} (last error: {last})")]
    Timeout {
        /// The node.
        node: String,
        /// Where we tried.
        addr: SocketAddr,
        /// How long.
        waited: Duration,
        /// The last connection error.
        last: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let path = path.to_owned();
    move |source| BootstrapError::Io { path, source }
}

/// Runs a helper program, failing with its stderr.
fn tool(cmd: &mut Command) -> Result<(), BootstrapError> {
    let line = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| BootstrapError::Tool {
        command: line.clone(),
        message: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(BootstrapError::Tool {
            command: line,
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// The directory of every guest's files in the state directory.
pub fn guests_root(state_dir: &Path) -> PathBuf {
    state_dir.join("guests")
}

/// The directory of one guest's files in the state directory.
pub fn guest_dir(state_dir: &Path, node: &str) -> PathBuf {
    guests_root(state_dir).join(node)
}

/// The stand's SSH directory in the state directory.
pub fn ssh_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh")
}

/// Loads the key at `path`, or generates and writes it when absent.
fn load_or_generate(path: &Path, comment: &str) -> Result<PrivateKey, BootstrapError> {
    let ssh = |source| BootstrapError::Ssh {
        node: comment.to_owned(),
        source,
    };
    if path.exists() {
        return read_private_key(path).map_err(ssh);
    }
    let key = generate_key(comment);
    crate::ssh::write_private_key(path, &key).map_err(ssh)?;
    info!(key = %path.display(), "generated ssh key");
    Ok(key)
}

/// Creates `dir` (and parents) with mode 0755: qemu runs as its own user under
/// `qemu:///system` and must traverse to the disks.
fn open_dir(dir: &Path) -> Result<(), BootstrapError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io_err(dir))
}

/// One guest ready to boot: its media and how to reach it.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The node.
    pub node: String,
    /// Its role.
    pub role: Role,
    /// Management address and SSH port.
    pub ssh_addr: SocketAddr,
    /// The pinned host key.
    pub host_key: PublicKey,
    /// Disks, kernel and console of its domain (known while `up` prepares them; `None` for a
    /// stand reached again by [`reach`]).
    pub media: Option<GuestMedia>,
}

/// Every guest of a stand and the client key that logs into them.
#[derive(Debug, Clone)]
pub struct Guests {
    /// The client key (its public half is in every guest's `authorized_keys`).
    pub client_key: Arc<PrivateKey>,
    /// Guests by node name.
    pub guests: BTreeMap<String, Guest>,
}

impl Guests {
    /// The media of every guest, for [`crate::libvirt::LibvirtBackend::up`].
    pub fn media(&self) -> BTreeMap<String, GuestMedia> {
        self.guests
            .iter()
            .filter_map(|(k, g)| Some((k.clone(), g.media.clone()?)))
            .collect()
    }
}

/// The seed tree of `node`: relative path, mode, content.
pub fn seed_files(
    topology: &Topology,
    node: &Node,
    host_key: &PrivateKey,
    client_key: &PublicKey,
) -> Result<Vec<(String, u32, Vec<u8>)>, BootstrapError> {
    let ssh = |source| BootstrapError::Ssh {
        node: node.name.clone(),
        source,
    };
    let gateway = topology.default_gateway(node);
    let mut files = Vec::new();
    for a in topology.attachments(node) {
        let mut unit = format!(
            "[Match]\nMACAddress={}\n\n[Network]\nAddress={}/{}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
            mac_address(a.address),
            a.address,
            a.network.cidr.prefix()
        );
        if let Some(gw) = gateway.filter(|gw| a.network.cidr.contains(*gw)) {
            unit.push_str(&format!("Gateway={gw}\n"));
        }
        if node.role == Role::Gateway && !a.network.management {
            unit.push_str("IPForward=ipv4\n");
        }
        files.push((
            format!("etc/systemd/network/10-ha-{}.network", a.network.name),
            0o644,
            unit.into_bytes(),
        ));
    }
    files.push((
        "etc/nftables.conf".to_owned(),
        0o755,
        format!(
            "#!/usr/sbin/nft -f\n{}",
            node_firewall(topology, node).to_nft()
        )
        .into_bytes(),
    ));
    files.push((
        "etc/hostname".to_owned(),
        0o644,
        format!("{}\n", node.name).into_bytes(),
    ));
    files.push((
        "etc/hosts".to_owned(),
        0o644,
        topology.hosts_file().into_bytes(),
    ));
    let pem = host_key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| {
            ssh(SshError::Key {
                path: "<host key>".into(),
                message: e.to_string(),
            })
        })?;
    files.push((
        "etc/ssh/ssh_host_ed25519_key".to_owned(),
        0o600,
        pem.as_bytes().to_vec(),
    ));
    files.push((
        "etc/ssh/ssh_host_ed25519_key.pub".to_owned(),
        0o644,
        format!("{}\n", public_openssh(host_key.public_key()).map_err(ssh)?).into_bytes(),
    ));
    files.push((
        "root/.ssh/authorized_keys".to_owned(),
        0o600,
        format!("{}\n", public_openssh(client_key).map_err(ssh)?).into_bytes(),
    ));
    Ok(files)
}

/// Writes the seed tree under `tree/files` and packs it into the ext4 image `out`.
fn write_seed(
    files: &[(String, u32, Vec<u8>)],
    tree: &Path,
    out: &Path,
) -> Result<(), BootstrapError> {
    if tree.exists() {
        std::fs::remove_dir_all(tree).map_err(io_err(tree))?;
    }
    let root = tree.join("files");
    for (rel, mode, content) in files {
        let path = root.join(rel);
        let parent = path.parent().expect("seed paths are relative files");
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        std::fs::write(&path, content).map_err(io_err(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
            .map_err(io_err(&path))?;
    }
    // `cp -a files/. /` also copies directory modes: /root and its .ssh stay private, every
    // other directory (including `files` itself, which lands on `/`) is 0755.
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        let mode = if dir.starts_with(root.join("root")) {
            0o700
        } else {
            0o755
        };
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(&dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if entry.file_type().map_err(io_err(&dir))?.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    if out.exists() {
        std::fs::remove_file(out).map_err(io_err(out))?;
    }
    tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "ha-seed", "-d"])
            .arg(tree)
            .arg(out)
            .arg("8M"),
    )
}

/// Creates keys, seed disks and overlays for every node of `topology` under `state_dir`.
pub fn prepare(
    topology: &Topology,
    state_dir: &Path,
    image: &BaseImage,
) -> Result<Guests, BootstrapError> {
    let ssh = ssh_dir(state_dir);
    std::fs::create_dir_all(&ssh).map_err(io_err(&ssh))?;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700)).map_err(io_err(&ssh))?;
    let client_key = load_or_generate(
        &ssh.join("id_ed25519"),
        &format!("ha-provision@{}", topology.name),
    )?;
    let mut known_hosts = String::new();
    let mut guests = BTreeMap::new();
    open_dir(state_dir)?;
    for node in &topology.nodes {
        let dir = guest_dir(state_dir, &node.name);
        open_dir(&dir)?;
        let host_key = load_or_generate(&dir.join("ssh_host_ed25519_key"), &node.name)?;
        let ssh_addr = ssh_address(topology, node)?;
        let files = seed_files(topology, node, &host_key, client_key.public_key())?;
        let seed = dir.join("seed.img");
        write_seed(&files, &dir.join("seed"), &seed)?;
        let disk = dir.join("disk.qcow2");
        if !disk.exists() {
            tool(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(image.disk())
                    .arg(&disk),
            )?;
            info!(node = %node.name, disk = %disk.display(), "created guest overlay");
        }
        let console_log = dir.join("console.log");
        // Created here so qemu, running as another user, only has to open it.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_log)
            .map_err(io_err(&console_log))?;
        let line = public_openssh(host_key.public_key()).map_err(|source| BootstrapError::Ssh {
            node: node.name.clone(),
            source,
        })?;
        // OpenSSH writes the default port without brackets and would not match `[ip]:22`.
        let mgmt = ssh_addr.ip();
        if ssh_addr.port() == 22 {
            known_hosts.push_str(&format!("{mgmt} {line}\n"));
        } else {
            known_hosts.push_str(&format!("[{mgmt}]:{} {line}\n", ssh_addr.port()));
        }
        guests.insert(
            node.name.clone(),
            Guest {
                node: node.name.clone(),
                role: node.role,
                ssh_addr,
                host_key: host_key.public_key().clone(),
                media: Some(GuestMedia {
                    kernel: image.kernel(),
                    initrd: image.initrd(),
                    cmdline: KERNEL_CMDLINE.to_owned(),
                    disk,
                    seed,
                    console_log,
                }),
            },
        );
    }
    let kh = ssh.join("known_hosts");
    std::fs::write(&kh, known_hosts).map_err(io_err(&kh))?;
    Ok(Guests {
        client_key: Arc::new(client_key),
        guests,
    })
}

/// Where `node` answers SSH: its management address and the first management port.
fn ssh_address(topology: &Topology, node: &Node) -> Result<SocketAddr, BootstrapError> {
    let port = topology.ports.management.first().copied().unwrap_or(22);
    let mgmt: Ipv4Addr = topology
        .attachments(node)
        .find(|a| a.network.management)
        .map(|a| a.address)
        .ok_or_else(|| BootstrapError::NoManagementAddress(node.name.clone()))?;
    Ok(SocketAddr::new(mgmt.into(), port))
}

/// The guests of a stand that [`prepare`] made before (`exec`, `status`): the client key and
/// every pinned host key from the state directory, nothing generated or changed.
pub fn reach(topology: &Topology, state_dir: &Path) -> Result<Guests, BootstrapError> {
    let read = |path: PathBuf| {
        read_private_key(&path).map_err(|source| BootstrapError::Keys {
            path: path.clone(),
            source,
        })
    };
    let client_key = read(ssh_dir(state_dir).join("id_ed25519"))?;
    let mut guests = BTreeMap::new();
    for node in &topology.nodes {
        let host_key = read(guest_dir(state_dir, &node.name).join("ssh_host_ed25519_key"))?;
        guests.insert(
            node.name.clone(),
            Guest {
                node: node.name.clone(),
                role: node.role,
                ssh_addr: ssh_address(topology, node)?,
                host_key: host_key.public_key().clone(),
                media: None,
            },
        );
    }
    Ok(Guests {
        client_key: Arc::new(client_key),
        guests,
    })
}

/// Connects to `guest` until it answers SSH with its pinned key or `deadline` passes. A
/// host-key mismatch or a refused login fails at once: waiting would not fix either.
pub async fn wait_for_ssh(
    guest: &Guest,
    client_key: Arc<PrivateKey>,
    deadline: Instant,
) -> Result<SshSession, BootstrapError> {
    let start = Instant::now();
    let mut last_report = start;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt_timeout = left.min(Duration::from_secs(10));
        match SshSession::connect(
            guest.ssh_addr,
            &guest.host_key,
            SSH_USER,
            client_key.clone(),
            attempt_timeout,
        )
        .await
        {
            Ok(session) => {
                info!(node = %guest.node, addr = %guest.ssh_addr, attempts, waited = ?start.elapsed(), "guest answers ssh");
                return Ok(session);
            }
            Err(e @ (SshError::Connect { .. } | SshError::Protocol(_))) => {
                if Instant::now() + Duration::from_secs(1) >= deadline {
                    return Err(BootstrapError::Timeout {
                        node: guest.node.clone(),
                        addr: guest.ssh_addr,
                        waited: start.elapsed(),
                        last: e.to_string(),
                    });
                }
                debug!(node = %guest.node, error = %e, "ssh not ready");
                if last_report.elapsed() >= Duration::from_secs(10) {
                    info!(node = %guest.node, addr = %guest.ssh_addr, waited = ?start.elapsed(), attempts, "waiting for guest ssh");
                    last_report = Instant::now();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(source) => {
                return Err(BootstrapError::Ssh {
                    node: guest.node.clone(),
                    source,
                });
            }
        }
    }
}

/// The files to push to `guest` from `files_dir`: (remote absolute path, mode, local path),
/// role files first, then node files (which win on the same path).
pub fn files_to_push(
    files_dir: &Path,
    guest: &Guest,
) -> Result<Vec<(String, u32, PathBuf)>, BootstrapError> {
    let mut out: BTreeMap<String, (u32, PathBuf)> = BTreeMap::new();
    for base in [
        files_dir.join("roles").join(guest.role.to_string()),
        files_dir.join("nodes").join(&guest.node),
    ] {
        if !base.is_dir() {
            continue;
        }
        let mut dirs = vec![base.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
                let entry = entry.map_err(io_err(&dir))?;
                let path = entry.path();
                let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
                if meta.is_dir() {
                    dirs.push(path);
                } else {
                    let rel = path
                        .strip_prefix(&base)
                        .expect("walked from base")
                        .display()
                        .to_string();
                    out.insert(
                        format!("/{rel}"),
                        (meta.permissions().mode() & 0o7777, path),
                    );
                }
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|(remote, (mode, local))| (remote, mode, local))
        .collect())
}

/// Pushes `guest`'s files from `files_dir` and enables and starts its pushed services.
/// Returns the units started.
pub async fn push_and_start(
    session: &SshSession,
    guest: &Guest,
    files_dir: &Path,
) -> Result<Vec<String>, BootstrapError> {
    let ssh = |source| BootstrapError::Ssh {
        node: guest.node.clone(),
        source,
    };
    let mut units = Vec::new();
    for (remote, mode, local) in files_to_push(files_dir, guest)? {
        let data = std::fs::read(&local).map_err(io_err(&local))?;
        session.upload(&remote, &data, mode).await.map_err(ssh)?;
        if let Some(unit) = remote.strip_prefix("/etc/systemd/system/")
            && !unit.contains('/')
            && unit.ends_with(".service")
        {
            units.push(unit.to_owned());
        }
    }
    if units.is_empty() {
        warn!(node = %guest.node, files = %files_dir.display(), "no units to start");
        return Ok(units);
    }
    let list = units
        .iter()
        .map(|u| crate::ssh::shell_quote(u))
        .collect::<Vec<_>>()
        .join(" ");
    session
        .run(&format!(
            "systemctl daemon-reload && systemctl enable --now {list}"
        ))
        .await
        .map_err(ssh)?;
    info!(node = %guest.node, units = ?units, "units started");
    Ok(units)
}

/// Waits for every guest's SSH, then pushes its files and starts its units, all guests at
/// once. Returns the units started per node.
pub async fn bootstrap_all(
    guests: &Guests,
    files_dir: Option<&Path>,
    timeout: Duration,
) -> Result<BTreeMap<String, Vec<String>>, BootstrapError> {
    let deadline = Instant::now() + timeout;
    let mut set = tokio::task::JoinSet::new();
    for guest in guests.guests.values() {
        let guest = guest.clone();
        let key = guests.client_key.clone();
        let files_dir = files_dir.map(Path::to_owned);
        set.spawn(async move {
            let session = wait_for_ssh(&guest, key, deadline).await?;
            let units = match &files_dir {
                Some(dir) => push_and_start(&session, &guest, dir).await?,
                None => Vec::new(),
            };
            let _ = session.close().await;
            Ok::<_, BootstrapError>((guest.node, units))
        });
    }
    let mut started = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let (node, units) = joined.expect("bootstrap tasks do not panic")?;
        started.insert(node, units);
    }
    Ok(started)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::example;

    fn text(files: &[(String, u32, Vec<u8>)], path: &str) -> (u32, String) {
        let (_, mode, content) = files
            .iter()
            .find(|(p, _, _)| p == path)
            .unwrap_or_else(|| panic!("{path} in seed"));
        (*mode, String::from_utf8_lossy(content).into_owned())
    }

    #[test]
    fn seed_carries_addresses_routes_firewall_and_keys() {
        let t = example();
        let host = generate_key("h");
        let client = generate_key("c");
        let e1 = t.node("e1server").expect("e1");
        let files = seed_files(&t, e1, &host, client.public_key()).expect("seed");
        let (_, dmz) = text(&files, "etc/systemd/network/10-ha-dmz.network");
        assert_eq!(
            dmz,
            "[Match]\nMACAddress=52:54:00:a8:01:02\n\n[Network]\nAddress=192.168.1.2/29\nLinkLocalAddressing=no\nIPv6AcceptRA=no\nGateway=192.168.1.1\n"
        );
        let (_, mgmt) = text(&files, "etc/systemd/network/10-ha-management.network");
        assert!(mgmt.contains("Address=192.168.121.12/24\n"), "{mgmt}");
        assert!(
            !mgmt.contains("Gateway"),
            "default route only via the gateway node"
        );
        let (_, nft) = text(&files, "etc/nftables.conf");
        assert!(
            nft.starts_with("#!/usr/sbin/nft -f\nadd table inet ha_provision"),
            "{nft}"
        );
        assert_eq!(text(&files, "etc/hostname").1, "e1server\n");
        assert!(
            text(&files, "etc/hosts")
                .1
                .contains("192.168.1.2\te1server.domain.local e1server")
        );
        let (mode, key) = text(&files, "etc/ssh/ssh_host_ed25519_key");
        assert_eq!(mode, 0o600);
        let parsed = PrivateKey::from_openssh(&key).expect("host key parses");
        assert_eq!(parsed.public_key().key_data(), host.public_key().key_data());
        let (mode, auth) = text(&files, "root/.ssh/authorized_keys");
        assert_eq!(mode, 0o600);
        assert_eq!(
            auth.trim_end(),
            public_openssh(client.public_key()).expect("pub")
        );

        let gw = t.node("gw1server").expect("gw");
        let files = seed_files(&t, gw, &host, client.public_key()).expect("seed");
        let (_, backend) = text(&files, "etc/systemd/network/10-ha-backend.network");
        assert!(
            backend.contains("IPForward=ipv4\n") && !backend.contains("Gateway"),
            "{backend}"
        );
        let (_, mgmt) = text(&files, "etc/systemd/network/10-ha-management.network");
        assert!(
            !mgmt.contains("IPForward"),
            "never forwards to or from management"
        );
    }

    #[test]
    fn files_are_layered_role_then_node_with_modes() {
        let t = example();
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |rel: &str, content: &str, mode: u32| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, content).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        put("roles/ejabberd/etc/ha/agent.toml", "role", 0o640);
        put("roles/ejabberd/usr/local/bin/ha-agent", "bin", 0o755);
        put("roles/monitor/etc/ha/monitor.toml", "other role", 0o644);
        put("nodes/e1server/etc/ha/agent.toml", "node", 0o600);
        let e1 = t.node("e1server").expect("e1");
        let guest = Guest {
            node: e1.name.clone(),
            role: e1.role,
            ssh_addr: "127.0.0.1:22".parse().expect("addr"),
            host_key: generate_key("h").public_key().clone(),
            media: None,
        };
        let files = files_to_push(dir.path(), &guest).expect("walk");
        let summary: Vec<(String, u32, String)> = files
            .iter()
            .map(|(r, m, l)| (r.clone(), *m, std::fs::read_to_string(l).expect("read")))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("/etc/ha/agent.toml".to_owned(), 0o600, "node".to_owned()),
                (
                    "/usr/local/bin/ha-agent".to_owned(),
                    0o755,
                    "bin".to_owned()
                ),
            ]
        );
    }
}
