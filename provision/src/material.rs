//! Per-node material of a netns stand: the cluster CA and certificates, and every daemon's
//! configuration file, written under the stand's state directory. This is the only module that
//! knows the daemons' configuration formats.
//!
//! Layout (`S` = state directory):
//! ```text
//! S/pki/ca.pem, ca.key (0600)               cluster CA (created once, reused by later `up`s)
//! S/haclt.toml, S/pki/operator.pem, .key    operator identity and haclt config
//! S/nodes/<node>/node.pem, node.key (0600)  `monitor-<id>` for monitors, else the node name
//! S/nodes/<node>/monitor.toml               monitors: `ha-monitor --config`
//! S/nodes/<node>/agent.toml                 postgres and ejabberd nodes: `ha-agent --config`
//! S/nodes/<node>/join-token (0600)          written by `up` from a token the monitors issue
//! S/nodes/<node>/pg/                        owned by postgres: data, socket, server log
//! S/nodes/<node>/ejabberd/{conf,spool,logs} ejabberd nodes, owned by ejabberd
//! S/nodes/<node>/ejabberd-sql/ca.pem, client.pem
//!                                           ejabberd nodes: CA and certificate with key for
//!                                           ejabberd's TLS to PostgreSQL (0640, group
//!                                           ejabberd; the agent keeps them current)
//! S/nodes/<node>/agent-home/.erlang.cookie  ejabberd nodes: the cookie `erl_call` reads (0600)
//! S/nodes/<node>/ejabberd/home/.erlang.cookie
//!                                           ejabberd nodes: the cookie of ejabberd and of
//!                                           `ejabberdctl` run as ejabberd (0400)
//! S/pki/erlang.cookie, xmpp-load.password
//!                                           the stand's secrets (0600, random, created once)
//! ```
//!
//! Invariants: keys, certificates and secrets are created only when missing, so a repeated
//! `up` keeps every identity; configuration files are rewritten from the topology on every
//! `up` (deterministic), except `ejabberd.yml`: it is written once, and from then on its
//! `sql_server` belongs to the node's ejabberd agent, which points it at the current primary
//! (rewriting it would point ejabberd back at the first PostgreSQL node after a failover). Every daemon speaks mutual TLS against the stand's CA ([`tls_section`]):
//! gRPC between agents, monitors and the operator, and PostgreSQL replication, base backups
//! and rewinds between the PostgreSQL peers (verify-full, `hostssl ... cert` rules the agent
//! generates for exactly those peers), and ejabberd's SQL pool (TLS with the frontend's node
//! certificate, mapped to the `ejabberd` role; no password anywhere). Nodes get pre-issued certificates whose SANs name every
//! address of the node, because peers dial each other by address on different networks.

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_pki::{Ca, Role as CertRole, Validity};
use nix::unistd::{Group, User, chown};
use tracing::info;

use crate::topology::{Node, Role, Topology};

/// Replication group of the stand's PostgreSQL nodes.
pub const GROUP: &str = "main";
/// Lifetime of the lab's certificates; the CA lives ten times longer (a certificate may not
/// outlive its issuer).
const LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// PostgreSQL binaries (Debian's postgresql-15).
/// The operator certificate's name (haclt's identity, and the drill writer's database login).
const OPERATOR: &str = "operator";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// ejabberd's SQL database (the name the reference stand's hand-written playbooks use).
pub const EJABBERD_DB: &str = "ejabberd-domain-local";
/// The lab's XMPP load accounts, `load1..=load4@<domain>` (`ha-xmpp-load`'s defaults), created
/// by `up` with the password in [`Material::xmpp_load_password_file`].
pub const LOAD_USERS: u32 = 4;
/// ejabberd's control script.
pub const EJABBERDCTL: &str = "/usr/sbin/ejabberdctl";

/// Errors generating the material.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// Writing, reading or changing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The CA or a certificate could not be made or loaded.
    #[error("certificates")]
    Pki(#[from] ha_pki::CaError),
    /// A key file could not be written or read.
    #[error("key file")]
    KeyFile(#[from] ha_pki::FileError),
    /// A system user the daemons run as is missing.
    #[error("system user `{0}` does not exist (install postgresql-15 and ejabberd)")]
    NoUser(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MaterialError + '_ {
    move |source| MaterialError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a stand's nodes keep their files, and so what their configuration files say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Every node is a network namespace of this machine (the netns backend): its files stay
    /// under `S/nodes/<node>/`, where its daemons, run by a supervisor as root, read them.
    Shared,
    /// Every node is a machine of its own with the Debian packages installed (the libvirt
    /// backend): each file is where the packaged units expect it (`/etc/ha`, `/var/lib/...`,
    /// Debian's PostgreSQL and ejabberd paths), owned by the user its daemon runs as. They are
    /// written here under `S/files/nodes/<node>/<path on the node>` and pushed by `up`
    /// following [`Material::generate`]'s list.
    Guest,
}

/// One file (or directory) of a node's material as it must be on the node: `up` copies it
/// there from [`Material::local`] and sets its owner and mode (guests; on a shared machine
/// `generate` has done both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Path on the node.
    pub path: PathBuf,
    /// Owning user and group on the node.
    pub owner: &'static str,
    /// Owning group.
    pub group: &'static str,
    /// Exact mode.
    pub mode: u32,
    /// A directory to create (no content), rather than a file.
    pub dir: bool,
    /// Written only when missing on the node: after that the file belongs to the node's
    /// agent (`ejabberd.yml`, whose `sql_server` follows the primary).
    pub once: bool,
}

/// What [`Material::generate`] wrote: per node, the files and directories to place.
pub type Manifest = std::collections::BTreeMap<String, Vec<Placed>>;

/// Paths of the material of one stand.
#[derive(Debug, Clone)]
pub struct Material<'a> {
    topology: &'a Topology,
    dir: &'a Path,
    placement: Placement,
}

/// The configuration directory of a guest (the packages' units read it).
const ETC_HA: &str = "/etc/ha";

impl<'a> Material<'a> {
    /// The material of `topology` under state directory `dir`, for a netns stand.
    pub fn new(topology: &'a Topology, dir: &'a Path) -> Self {
        Self::placed(topology, dir, Placement::Shared)
    }

    /// The material of `topology` under state directory `dir`, placed as `placement` says.
    pub fn placed(topology: &'a Topology, dir: &'a Path, placement: Placement) -> Self {
        Self {
            topology,
            dir,
            placement,
        }
    }

    /// How the nodes keep their files.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The state directory `S`.
    pub fn dir(&self) -> &'a Path {
        self.dir
    }

    /// `S/pki`.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// `S/nodes`.
    pub fn nodes_dir(&self) -> PathBuf {
        self.dir.join("nodes")
    }

    /// `S/nodes/<node>`: the node's files on a shared machine, and this machine's records of
    /// the node (supervisor PID and log) in both placements.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.nodes_dir().join(node)
    }

    /// `S/files`: the guests' files as written here ([`Placement::Guest`]).
    pub fn files_dir(&self) -> PathBuf {
        self.dir.join("files")
    }

    /// Where this machine keeps `path`, a path on `node`: the path itself on a shared
    /// machine, `S/files/nodes/<node>/<path>` for a guest.
    pub fn local(&self, node: &str, path: &Path) -> PathBuf {
        match self.placement {
            Placement::Shared => path.to_owned(),
            Placement::Guest => self
                .files_dir()
                .join("nodes")
                .join(node)
                .join(path.strip_prefix("/").unwrap_or(path)),
        }
    }

    /// The haclt configuration (`status --json` prints it as `haclt_config`). haclt runs on
    /// this machine in both placements.
    pub fn haclt_config(&self) -> PathBuf {
        crate::state::StateFile::haclt_config_path(self.dir)
    }

    /// A file of `node`'s own: `S/nodes/<node>/<shared>` or `/etc/ha/<guest>`.
    fn node_file(&self, node: &str, shared: &str, guest: &str) -> PathBuf {
        match self.placement {
            Placement::Shared => self.node_dir(node).join(shared),
            Placement::Guest => Path::new(ETC_HA).join(guest),
        }
    }

    /// A directory of `node`: `S/nodes/<node>/<shared>` or `guest`.
    fn node_path(&self, node: &str, shared: &str, guest: &str) -> PathBuf {
        match self.placement {
            Placement::Shared => self.node_dir(node).join(shared),
            Placement::Guest => PathBuf::from(guest),
        }
    }

    /// Where an ejabberd node's agent keeps the CA and the node's certificate with its key for
    /// ejabberd's TLS connections to PostgreSQL (`sql_ssl_cafile`, `sql_ssl_certfile`).
    pub fn ejabberd_sql_tls_dir(&self, node: &str) -> PathBuf {
        self.node_path(node, "ejabberd-sql", "/var/lib/ha-agent/ejabberd-sql")
    }

    /// `ha-monitor --config` of a monitor node.
    pub fn monitor_config(&self, node: &str) -> PathBuf {
        self.node_file(node, "monitor.toml", "monitor.toml")
    }

    /// `ha-agent --config` of a postgres or ejabberd node (on a guest, the file of the
    /// packaged unit of its role: `ha-agent.service` or `ha-agent-ejabberd.service`).
    pub fn agent_config(&self, node: &str) -> PathBuf {
        let ejabberd = self
            .topology
            .node(node)
            .is_some_and(|n| n.role == Role::Ejabberd);
        let guest = if ejabberd {
            "agent-ejabberd.toml"
        } else {
            "agent.toml"
        };
        self.node_file(node, "agent.toml", guest)
    }

    /// The systemd unit of `role`'s daemon on a guest (the packages install it).
    pub fn unit(role: Role) -> Option<&'static str> {
        match role {
            Role::Monitor => Some("ha-monitor.service"),
            Role::Postgres => Some("ha-agent.service"),
            Role::Ejabberd => Some("ha-agent-ejabberd.service"),
            Role::Gateway => None,
        }
    }

    /// The join token file of an agent.
    pub fn join_token(&self, node: &str) -> PathBuf {
        self.node_file(node, "join-token", "join-token")
    }

    /// The PostgreSQL data directory of a postgres node.
    pub fn pg_data(&self, node: &str) -> PathBuf {
        self.node_path(node, "pg/data", "/var/lib/postgresql/15/ha")
    }

    /// PostgreSQL's socket directory on a postgres node.
    pub fn pg_socket_dir(&self, node: &str) -> PathBuf {
        self.node_path(node, "pg", "/run/postgresql")
    }

    /// The ejabberd user's `HOME` on an ejabberd node: its `.erlang.cookie` is the stand's
    /// cookie (run `ejabberdctl` as `ejabberd` with this `HOME`).
    pub fn ejabberd_home(&self, node: &str) -> PathBuf {
        self.node_path(node, "ejabberd/home", "/var/lib/ejabberd")
    }

    /// The ejabberd config directory (`ejabberdctl --config-dir`) of an ejabberd node.
    pub fn ejabberd_conf(&self, node: &str) -> PathBuf {
        self.node_path(node, "ejabberd/conf", "/etc/ejabberd")
    }

    /// The directory whose `.erlang.cookie` the ejabberd agent's `erl_call` reads: its own on
    /// a shared machine (the agent runs as root there), ejabberd's on a guest (the agent runs
    /// as `ejabberd`).
    fn agent_home(&self, node: &str) -> PathBuf {
        self.node_path(node, "agent-home", "/var/lib/ejabberd")
    }

    /// The agent's state directory.
    fn agent_state(&self, node: &str) -> PathBuf {
        self.node_path(node, "agent-state", "/var/lib/ha-agent")
    }

    /// The user a daemon of `role` runs as on its node: root under the netns supervisor, the
    /// packaged unit's user on a guest.
    fn daemon_user(&self, role: Role) -> &'static str {
        match (self.placement, role) {
            (Placement::Shared, _) | (Placement::Guest, Role::Gateway) => "root",
            (Placement::Guest, Role::Monitor) => "ha-monitor",
            (Placement::Guest, Role::Postgres) => "postgres",
            (Placement::Guest, Role::Ejabberd) => "ejabberd",
        }
    }

    /// The Erlang node name of an ejabberd node.
    pub fn erlang_node(node: &str) -> String {
        format!("ejabberd@{node}")
    }

    /// The ejabberd node every other one joins (the first in the file).
    pub fn first_ejabberd(&self) -> Option<&'a Node> {
        self.topology.nodes_with_role(Role::Ejabberd).next()
    }

    /// Monitor ids: 1, 2, 3... in file order.
    pub fn monitor_id(&self, node: &str) -> Option<u64> {
        self.topology
            .nodes_with_role(Role::Monitor)
            .position(|n| n.name == node)
            .and_then(|i| u64::try_from(i + 1).ok())
    }

    /// `address:port` of every monitor on its service network (what agents and peers use).
    pub fn monitor_service_addresses(&self) -> Vec<String> {
        self.monitor_addresses(|n| self.service_address(n))
    }

    /// `address:port` of every monitor on the management network (what operators use).
    pub fn monitor_management_addresses(&self) -> Vec<String> {
        self.monitor_addresses(|n| self.management_address(n))
    }

    fn monitor_addresses(&self, pick: impl Fn(&Node) -> Option<Ipv4Addr>) -> Vec<String> {
        self.topology
            .nodes_with_role(Role::Monitor)
            .filter_map(pick)
            .map(|a| format!("{a}:{}", self.topology.ports.monitor_api))
            .collect()
    }

    fn service_address(&self, node: &Node) -> Option<Ipv4Addr> {
        self.topology.service_addresses(node).first().copied()
    }

    /// Where a node's agent says it serves (its `advertise_host`), and so the address its join
    /// token admits: its first service address.
    pub fn advertise_address(&self, node: &Node) -> Ipv4Addr {
        self.service_address(node).unwrap_or(Ipv4Addr::LOCALHOST)
    }

    fn management_address(&self, node: &Node) -> Option<Ipv4Addr> {
        let net = self.topology.management_network()?;
        node.addresses.get(&net.name).copied()
    }

    /// Writes everything (see the module docs) and returns, per node, what must be on it
    /// with which owner and mode: on a shared machine that is done already; `up` places a
    /// guest's list on the guest. Idempotent.
    pub fn generate(&self) -> Result<Manifest, MaterialError> {
        // On a shared machine the daemons run as postgres and ejabberd and must traverse to
        // their directories.
        for dir in [self.dir.to_owned(), self.nodes_dir()] {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(io(&dir))?;
        }
        let pki = self.pki_dir();
        fs::create_dir_all(&pki).map_err(io(&pki))?;
        fs::set_permissions(&pki, fs::Permissions::from_mode(0o700)).map_err(io(&pki))?;
        let ca = self.ca()?;
        self.certificate(
            &ca,
            &pki.join(format!("{OPERATOR}.pem")),
            &pki.join(format!("{OPERATOR}.key")),
            OPERATOR,
            CertRole::Operator,
            None,
        )?;
        write(
            &self.haclt_config(),
            &haclt_toml(&self.monitor_management_addresses(), &pki),
            0o600,
        )?;
        let mut manifest = Manifest::new();
        for node in &self.topology.nodes {
            if node.role == Role::Gateway {
                // HAProxy runs on the gateways of a netns stand (not on libvirt guests yet).
                if self.placement == Placement::Shared {
                    self.haproxy_files(&ca, node)?;
                }
                continue;
            }
            let dir = self.node_dir(&node.name);
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(io(&dir))?;
            let mut files = NodeFiles {
                material: self,
                node: &node.name,
                placed: Vec::new(),
            };
            self.node_files(&ca, node, &mut files)?;
            manifest.insert(node.name.clone(), files.placed);
        }
        info!(dir = %self.dir.display(), placement = ?self.placement, "stand material written");
        Ok(manifest)
    }

    /// Writes `node`'s join token (owner-only, for the user its agent runs as) and returns
    /// what to place on the node.
    pub fn write_join_token(&self, node: &Node, token: &str) -> Result<Vec<Placed>, MaterialError> {
        let mut files = NodeFiles {
            material: self,
            node: &node.name,
            placed: Vec::new(),
        };
        files.put(
            &self.join_token(&node.name),
            token,
            self.daemon_user(node.role),
            0o600,
        )?;
        Ok(files.placed)
    }

    /// The files of one monitor, postgres or ejabberd node.
    fn node_files(
        &self,
        ca: &Ca,
        node: &Node,
        files: &mut NodeFiles<'_>,
    ) -> Result<(), MaterialError> {
        let user = self.daemon_user(node.role);
        let (cert_name, cert_role) = match node.role {
            Role::Monitor => (
                format!(
                    "monitor-{}",
                    self.monitor_id(&node.name)
                        .expect("a monitor node has an id")
                ),
                CertRole::Monitor,
            ),
            Role::Postgres => (node.name.clone(), CertRole::Postgres),
            _ => (node.name.clone(), CertRole::Ejabberd),
        };
        let tls = self.tls_files(node);
        if self.placement == Placement::Guest {
            // The daemon's own: the agent replaces its certificate there when it renews it.
            files.dir(Path::new(ETC_HA), user, user, 0o755)?;
            files.copy(&self.pki_dir().join("ca.pem"), &tls.ca, "root", 0o644)?;
            if let Some(ca_key) = &tls.ca_key {
                files.copy(&self.pki_dir().join("ca.key"), ca_key, user, 0o600)?;
            }
        }
        self.certificate(
            ca,
            &self.local(&node.name, &tls.cert),
            &self.local(&node.name, &tls.key),
            &cert_name,
            cert_role,
            Some(node),
        )?;
        files.place(&tls.cert, user, user, 0o644, false, false)?;
        files.place(&tls.key, user, user, 0o600, false, false)?;
        match node.role {
            Role::Monitor => {
                files.put(
                    &self.monitor_config(&node.name),
                    &self.monitor_toml(node),
                    user,
                    0o600,
                )?;
            }
            Role::Postgres => {
                match self.placement {
                    Placement::Shared => {
                        files.dir(
                            &self.pg_socket_dir(&node.name),
                            "postgres",
                            "postgres",
                            0o700,
                        )?;
                    }
                    // The parent of the data directory: the unit may write only there, so it
                    // must exist before the agent starts (no cluster of the package made it).
                    Placement::Guest => {
                        let data = self.pg_data(&node.name);
                        let parent = data.parent().expect("an absolute data directory");
                        files.dir(parent, "postgres", "postgres", 0o755)?;
                    }
                }
                files.put(
                    &self.agent_config(&node.name),
                    &self.agent_toml(node),
                    user,
                    0o600,
                )?;
            }
            Role::Ejabberd => {
                self.ejabberd_files(node, files)?;
                files.put(
                    &self.agent_config(&node.name),
                    &self.ejabberd_agent_toml(node),
                    user,
                    0o600,
                )?;
            }
            Role::Gateway => {}
        }
        Ok(())
    }

    /// The directory of a gateway's HAProxy files (netns stands).
    fn haproxy_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("haproxy")
    }

    /// The configuration of a gateway's HAProxy (netns stands).
    pub fn haproxy_config(&self, node: &str) -> PathBuf {
        self.haproxy_dir(node).join("haproxy.cfg")
    }

    /// A gateway's HAProxy: an `observer` certificate for its checks of the agents' `/primary`
    /// endpoint (certificate and key in one file, as HAProxy reads them), the CA, and the
    /// configuration.
    fn haproxy_files(&self, ca: &Ca, node: &Node) -> Result<(), MaterialError> {
        let dir = self.haproxy_dir(&node.name);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        let (cert, key) = (dir.join("observer.pem"), dir.join("observer.key"));
        self.certificate(ca, &cert, &key, &node.name, CertRole::Observer, None)?;
        let mut both = fs::read_to_string(&cert).map_err(io(&cert))?;
        both.push_str(&fs::read_to_string(&key).map_err(io(&key))?);
        write(&dir.join("check.pem"), &both, 0o600)?;
        let ca_pem = self.pki_dir().join("ca.pem");
        let ca_text = fs::read_to_string(&ca_pem).map_err(io(&ca_pem))?;
        write(&dir.join("ca.pem"), &ca_text, 0o644)?;
        write(
            &self.haproxy_config(&node.name),
            &self.haproxy_cfg(node, &dir),
            0o600,
        )
    }

    /// HAProxy in TCP mode on every service address of the gateway: each session goes to the
    /// PostgreSQL node whose agent answers 200 on `/primary` (mutual TLS with the observer
    /// certificate, the agent's certificate verified against the CA). A node is taken out
    /// after two failed checks 500 ms apart (a crashed primary, or one whose lease ran out:
    /// 503 before it is fenced) and its open sessions are ended; the new primary is taken in
    /// at its first good check.
    fn haproxy_cfg(&self, node: &Node, dir: &Path) -> String {
        let t = self.topology;
        let binds: String = t
            .service_addresses(node)
            .iter()
            .map(|a| format!("    bind {a}:{}\n", t.ports.proxy))
            .collect();
        let servers: String = t
            .nodes_with_role(Role::Postgres)
            .filter_map(|n| {
                self.service_address(n).map(|a| {
                    format!(
                        "    server {name} {a}:{pg} check port {agent} check-ssl verify required \
                         ca-file {ca} crt {crt}\n",
                        name = n.name,
                        pg = t.ports.postgres,
                        agent = t.ports.agent,
                        ca = dir.join("ca.pem").display(),
                        crt = dir.join("check.pem").display(),
                    )
                })
            })
            .collect();
        format!(
            "# HAProxy of {name} (generated by ha-provision; rewritten by every `up`).\n\
             global\n\
             \x20   log stdout format raw local0 info\n\
             \x20   maxconn 512\n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   log global\n\
             \x20   timeout connect 2s\n\
             \x20   timeout client 30m\n\
             \x20   timeout server 30m\n\
             \x20   timeout check 1s\n\
             listen postgres_rw\n\
             {binds}\
             \x20   option httpchk OPTIONS /primary\n\
             \x20   http-check expect status 200\n\
             \x20   default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n\
             {servers}",
            name = node.name,
        )
    }

    /// The CA, created on the first `up` and loaded afterwards.
    fn ca(&self) -> Result<Ca, MaterialError> {
        let cert = self.pki_dir().join("ca.pem");
        let key = self.pki_dir().join("ca.key");
        if cert.exists() && key.exists() {
            let cert_pem = fs::read_to_string(&cert).map_err(io(&cert))?;
            return Ok(Ca::load(&cert_pem, &ha_pki::read_key_file(&key)?)?);
        }
        let ca = Ca::create(
            &format!("{}-ca", self.topology.name),
            Validity::starting_now(LIFETIME * 10)?,
        )?;
        ha_pki::write_key_file(&key, ca.key_pem().as_bytes())?;
        ha_pki::write_public_file(&cert, ca.cert_pem().as_bytes())?;
        info!(path = %cert.display(), "created the stand's CA");
        Ok(ca)
    }

    /// The certificate `cert` and key `key` for `name` in `role`, unless both exist.
    /// `node`'s certificate carries its host names and every address as SANs: peers connect
    /// to a monitor or PostgreSQL by address.
    fn certificate(
        &self,
        ca: &Ca,
        cert: &Path,
        key: &Path,
        name: &str,
        role: CertRole,
        node: Option<&Node>,
    ) -> Result<(), MaterialError> {
        if cert.exists() && key.exists() {
            return Ok(());
        }
        let sans: Vec<String> = node
            .map(|n| {
                let mut sans = vec![
                    n.name.clone(),
                    format!("{}.{}", n.name, self.topology.domain),
                ];
                sans.extend(n.addresses.values().map(ToString::to_string));
                sans
            })
            .unwrap_or_default();
        let issued = ca.issue(name, role, &sans, Validity::starting_now(LIFETIME)?)?;
        for file in [cert, key] {
            if let Some(dir) = file.parent() {
                fs::create_dir_all(dir).map_err(io(dir))?;
            }
        }
        ha_pki::write_key_file(key, issued.key_pem.as_bytes())?;
        ha_pki::write_public_file(cert, issued.cert_pem.as_bytes())?;
        Ok(())
    }

    /// The Erlang cookie every ejabberd node of the stand shares (created once).
    fn erlang_cookie(&self) -> Result<String, MaterialError> {
        self.secret("erlang.cookie")
    }

    /// The password of the XMPP load accounts ([`LOAD_USERS`]), created once per stand.
    pub fn xmpp_load_password(&self) -> Result<String, MaterialError> {
        self.secret("xmpp-load.password")
    }

    /// The file holding [`Material::xmpp_load_password`] (`ha-xmpp-load --password-file`).
    pub fn xmpp_load_password_file(&self) -> PathBuf {
        self.pki_dir().join("xmpp-load.password")
    }

    /// A random 32-letter secret kept in `S/pki/<file>` (0600), created when missing. Letters
    /// only: it is written into YAML, Erlang arguments and SQL literals unquoted or quoted.
    fn secret(&self, file: &str) -> Result<String, MaterialError> {
        let path = self.pki_dir().join(file);
        if path.exists() {
            return Ok(ha_pki::read_key_file(&path)?.trim().to_owned());
        }
        let secret: String = (0..32)
            .map(|_| char::from(b'A' + rand::random_range(0..26u8)))
            .collect();
        ha_pki::write_key_file(&path, secret.as_bytes())?;
        Ok(secret)
    }

    /// The TLS files of `node`'s daemon; a monitor's include the CA key (the leader signs the
    /// CSRs of nodes that join without a certificate).
    fn tls_files(&self, node: &Node) -> TlsPaths {
        let (ca, ca_key) = match self.placement {
            Placement::Shared => (self.pki_dir().join("ca.pem"), self.pki_dir().join("ca.key")),
            Placement::Guest => (
                Path::new(ETC_HA).join("ca.pem"),
                Path::new(ETC_HA).join("ca.key"),
            ),
        };
        TlsPaths {
            ca,
            cert: self.node_file(&node.name, "node.pem", "node.pem"),
            key: self.node_file(&node.name, "node.key", "node.key"),
            ca_key: (node.role == Role::Monitor).then_some(ca_key),
        }
    }

    fn monitor_toml(&self, node: &Node) -> String {
        let id = self
            .monitor_id(&node.name)
            .expect("a monitor node has an id");
        let port = self.topology.ports.monitor_api;
        let advertise = self
            .service_address(node)
            .map_or_else(String::new, |a| format!("{a}:{port}"));
        let mut out = format!(
            "# ha-monitor of {name} (generated by ha-provision; rewritten by every `up`).\n\
             # One port serves agents, operators (management network) and the other monitors.\n\
             id = {id}\n\
             data_dir = {data:?}\n\
             listen = \"0.0.0.0:{port}\"\n\
             advertise = {advertise:?}\n\
             # A lab stand is where `haclt drill kill-monitor-leader` runs.\n\
             allow_drills = true\n\
             members = [\n",
            name = node.name,
            data = self.node_path(&node.name, "monitor-data", "/var/lib/ha-monitor"),
        );
        for (i, m) in self.monitor_service_addresses().iter().enumerate() {
            let _ = writeln!(out, "  {{ id = {}, address = {m:?} }},", i + 1);
        }
        out.push_str("]\n");
        out.push_str(&tls_section(&self.tls_files(node)));
        out
    }

    fn agent_toml(&self, node: &Node) -> String {
        let t = self.topology;
        let me = self.advertise_address(node);
        // Replication, base backups and rewinds: the agent generates `hostssl ... cert` rules
        // for exactly these peers (itself excluded) from their certificate names.
        let peers: Vec<String> = t
            .nodes_with_role(Role::Postgres)
            .filter_map(|n| {
                self.service_address(n)
                    .map(|a| format!("{{ node = {:?}, address = \"{a}\" }}", n.name))
            })
            .collect();
        let mut clients = Vec::new();
        for (name, frontend) in t
            .nodes_with_role(Role::Ejabberd)
            .filter_map(|n| self.service_address(n).map(|a| (&n.name, a)))
        {
            // ejabberd's SQL pool: TLS with the frontend's node certificate, no password.
            clients.push(format!(
                "{{ certificate = \"{name}\", user = \"ejabberd\", database = \"{EJABBERD_DB}\", address = \"{frontend}\" }}"
            ));
            // The writer of `haclt drill`, which the demo runs on a frontend (a lab stand is
            // for drills): TLS with the operator certificate, mapped to `postgres`.
            clients.push(format!(
                "{{ certificate = \"{OPERATOR}\", user = \"postgres\", database = \"postgres\", address = \"{frontend}\" }}"
            ));
        }
        // The drill writer through a gateway's HAProxy, seen from the gateway's address on the
        // node's networks.
        for address in t.gateway_neighbours(node) {
            clients.push(format!(
                "{{ certificate = \"{OPERATOR}\", user = \"postgres\", database = \"postgres\", address = \"{address}\" }}"
            ));
        }
        // The drill writer of an operator host on one of the node's service networks.
        for host in t.operator_hosts(node) {
            clients.push(format!(
                "{{ certificate = \"{OPERATOR}\", user = \"postgres\", database = \"postgres\", address = \"{host}\" }}"
            ));
        }
        let table = format!(
            "[postgres]\n\
             data_dir = {data:?}\n\
             port = {port}\n\
             listen_addresses = [\"{me}\", \"127.0.0.1\"]\n\
             advertise_host = \"{me}\"\n\
             socket_dir = {pg:?}\n\
             bin_dir = \"{PG_BIN}\"\n\
             log_file = {log:?}\n\
             settings = {{ shared_buffers = \"32MB\", max_connections = \"50\" }}\n\
             peers = [{peers}]\n\
             clients = [{clients}]\n",
            peers = peers.join(", "),
            clients = clients.join(", "),
            data = self.pg_data(&node.name),
            pg = self.pg_socket_dir(&node.name),
            port = t.ports.postgres,
            log = self.node_path(
                &node.name,
                "pg/postgresql.log",
                "/var/lib/postgresql/15/ha.log"
            ),
        );
        // On a shared machine `down` stops PostgreSQL through the agent rather than by
        // signal; under systemd an agent restart must leave it running (the default).
        let stop = match self.placement {
            Placement::Shared => {
                "# `down` stops PostgreSQL through the agent rather than by signal.\n\
                                  stop_postgres_on_shutdown = true\n"
            }
            Placement::Guest => "",
        };
        self.agent_config_text(
            node,
            "postgres",
            &format!(
                "{stop}\
                 # A lab stand is where `haclt drill` runs (off by default elsewhere).\n\
                 allow_drills = true\n\
                 # The agent port: the PostgreSQL peers ask this agent to vouch for their primary\n\
                 # while no monitor answers (the failsafe).\n\
                 listen = \"{me}:{agent_port}\"\n",
                agent_port = t.ports.agent,
            ),
            &table,
        )
    }

    /// An agent config: the keys every agent has, `extra` top-level lines, the `[tls]` table
    /// (a table: after every top-level key) and the role's `table`.
    fn agent_config_text(&self, node: &Node, role: &str, extra: &str, table: &str) -> String {
        format!(
            "# ha-agent of {name} (generated by ha-provision; rewritten by every `up`).\n\
             role = \"{role}\"\n\
             node = {name:?}\n\
             group = \"{GROUP}\"\n\
             monitors = {monitors:?}\n\
             join_token_file = {token:?}\n\
             state_dir = {state:?}\n\
             {extra}\n\
             {tls}\n\
             {table}",
            name = node.name,
            monitors = self.monitor_service_addresses(),
            token = self.join_token(&node.name),
            state = self.agent_state(&node.name),
            tls = tls_section(&self.tls_files(node)),
        )
    }

    fn ejabberd_agent_toml(&self, node: &Node) -> String {
        let t = self.topology;
        let me = self.advertise_address(node);
        let table = format!(
            "[ejabberd]\n\
             config_file = {yml:?}\n\
             erlang_node = \"{erl}\"\n\
             cookie_home = {home:?}\n\
             epmd_port = {epmd}\n\
             vhosts = [\"{domain}\"]\n\
             advertise_host = \"{me}\"\n\
             xmpp_port = {c2s}\n\
             sql_tls_dir = {sql_tls:?}\n",
            yml = self.ejabberd_conf(&node.name).join("ejabberd.yml"),
            sql_tls = self.ejabberd_sql_tls_dir(&node.name),
            erl = Self::erlang_node(&node.name),
            home = self.agent_home(&node.name),
            epmd = t.ports.epmd,
            domain = t.domain,
            c2s = c2s_port(t),
        );
        self.agent_config_text(
            node,
            "ejabberd",
            "# It keeps ejabberd's `sql_server` on the current primary and proves each move.\n",
            &table,
        )
    }

    /// ejabberd's own files on an ejabberd node: the stand's Erlang cookie, `ejabberdctl.cfg`
    /// (node name, distribution interface and ports), `inetrc`, and the first `ejabberd.yml`.
    fn ejabberd_files(&self, node: &Node, files: &mut NodeFiles<'_>) -> Result<(), MaterialError> {
        let cookie = self.erlang_cookie()?;
        let name = &node.name;
        let conf = self.ejabberd_conf(name);
        let spool = self.node_path(name, "ejabberd/spool", "/var/lib/ejabberd/spool");
        let logs = self.node_path(name, "ejabberd/logs", "/var/log/ejabberd");
        let home = self.ejabberd_home(name);
        match self.placement {
            Placement::Shared => {
                for dir in [
                    &self.node_dir(name).join("ejabberd"),
                    &conf,
                    &spool,
                    &logs,
                    &home,
                ] {
                    files.dir(dir, "ejabberd", "ejabberd", 0o750)?;
                }
            }
            // The packages made the others. The agent, running as ejabberd, replaces
            // ejabberd.yml in /etc/ejabberd by a rename: the directory must be its own. The
            // spool is new: the Mnesia database the package's first start made belongs to
            // the node name it had then.
            Placement::Guest => {
                files.dir(&conf, "ejabberd", "ejabberd", 0o750)?;
                files.dir(&spool, "ejabberd", "ejabberd", 0o750)?;
            }
        }
        // The cookie is only ever in `$HOME/.erlang.cookie` files, never on a command line
        // (readable by every local user in /proc). ejabberd and every `ejabberdctl` run as
        // `ejabberd` with the node's ejabberd home; the agent's `erl_call` reads the agent's
        // home: its own under the netns supervisor (as root), ejabberd's on a guest.
        let agent_home = self.agent_home(name);
        if agent_home != home {
            files.dir(&agent_home, "root", "root", 0o700)?;
            files.put_with(
                &agent_home.join(".erlang.cookie"),
                cookie.as_bytes(),
                "root",
                "root",
                0o600,
                false,
            )?;
        }
        files.put_with(
            &home.join(".erlang.cookie"),
            cookie.as_bytes(),
            "ejabberd",
            "ejabberd",
            0o400,
            false,
        )?;
        let me = self.advertise_address(node);
        let d = self.topology.ports.erlang_dist;
        // Sourced by ejabberdctl, run as ejabberd with the node's home (see above).
        let ctl = format!(
            "# generated by ha-provision\n\
             ERLANG_NODE={erl}\n\
             SPOOL_DIR={spool}\n\
             LOGS_DIR={logs}\n\
             FIREWALL_WINDOW={first}-{last}\n\
             export ERL_EPMD_PORT={epmd}\n\
             INET_DIST_INTERFACE={me}\n\
             ERL_OPTIONS=\"-env ERL_CRASH_DUMP_BYTES 0\"\n\
             {debian}",
            debian = match self.placement {
                Placement::Shared => "",
                // The rest of the file Debian's package installs (its unit relies on them).
                Placement::Guest =>
                    "EJABBERD_PID_PATH=/run/ejabberd/ejabberd.pid\n\
                                     EJABBERD_CONFIG_PATH=/etc/ejabberd/ejabberd.yml\n\
                                     CONTRIB_MODULES_CONF_DIR=/etc/ejabberd/modules.d\n",
            },
            erl = Self::erlang_node(name),
            spool = spool.display(),
            logs = logs.display(),
            first = d.first,
            last = d.last,
            epmd = self.topology.ports.epmd,
        );
        files.put_with(
            &conf.join("ejabberdctl.cfg"),
            ctl.as_bytes(),
            "root",
            "ejabberd",
            0o640,
            false,
        )?;
        files.put_with(
            &conf.join("inetrc"),
            b"{lookup,[\"file\",\"native\"]}.\n",
            "root",
            "root",
            0o644,
            false,
        )?;
        let sql_tls = self.ejabberd_sql_tls_dir(name);
        let yml = self.ejabberd_yml(&sql_tls);
        let owner = self.daemon_user(Role::Ejabberd);
        files.put_with(
            &conf.join("ejabberd.yml"),
            yml.as_bytes(),
            owner,
            "ejabberd",
            0o640,
            true,
        )?;
        // The first copies of what the agent keeps there (ejabberd checks both files when it
        // loads its configuration, which may be before the agent runs), owned like
        // ejabberd.yml: the agent gives its later copies that file's owner and group.
        let tls = self.tls_files(node);
        let cert = fs::read_to_string(self.local(name, &tls.cert)).map_err(io(&tls.cert))?;
        let key = ha_pki::read_key_file(&self.local(name, &tls.key))?;
        files.dir(&sql_tls, owner, "ejabberd", 0o750)?;
        files.copy(
            &self.pki_dir().join("ca.pem"),
            &sql_tls.join("ca.pem"),
            owner,
            0o644,
        )?;
        files.put_with(
            &sql_tls.join("client.pem"),
            format!("{cert}{key}").as_bytes(),
            owner,
            "ejabberd",
            0o640,
            false,
        )
    }

    /// The first `ejabberd.yml`: SQL storage on the first PostgreSQL node (the one `up`
    /// bootstraps), with the SQL settings `agent/README.md` recommends for failover.
    fn ejabberd_yml(&self, sql_tls: &Path) -> String {
        let t = self.topology;
        let primary = t
            .nodes_with_role(Role::Postgres)
            .next()
            .and_then(|n| self.service_address(n).map(|a| (n.name.clone(), a)));
        let mut out = format!(
            "# ejabberd of the reference stand (generated once by ha-provision; the node's\n\
             # ha-agent rewrites sql_server and sql_port to follow the PostgreSQL primary).\n\
             hosts:\n  - {domain}\n\n\
             loglevel: info\n\n\
             default_db: sql\n\
             auth_method: [sql]\n\n\
             listen:\n  -\n    port: {c2s}\n    ip: \"0.0.0.0\"\n    module: ejabberd_c2s\n    starttls_required: false\n\n\
             acl:\n  admin:\n    user: admin@{domain}\n\n\
             modules:\n  mod_ping: {{}}\n  mod_admin_extra: {{}}\n  mod_private:\n    # reads come from SQL: ha-xmpp-load checks its writes on the current primary\n    use_cache: false\n  mod_offline: {{}}\n  mod_roster: {{}}\n",
            domain = t.domain,
            c2s = c2s_port(t),
        );
        if let Some((name, address)) = primary {
            let _ = write!(
                out,
                "\nhost_config:\n  {domain}:\n    sql_type: pgsql\n    sql_server: {address}   # {name}\n    sql_port: {port}\n    sql_database: \"{EJABBERD_DB}\"\n    sql_username: ejabberd\n    # TLS with this node's certificate (ha-agent keeps the copies), no password\n    sql_ssl: true\n    sql_ssl_verify: true\n    sql_ssl_cafile: {ca:?}\n    sql_ssl_certfile: {certfile:?}\n    sql_pool_size: 5\n    sql_start_interval: 1\n    sql_keepalive_interval: 10\n    sql_query_timeout: 5\n    sql_connect_timeout: 2\n",
                domain = t.domain,
                port = t.ports.postgres,
                ca = sql_tls.join("ca.pem"),
                certfile = sql_tls.join("client.pem"),
            );
        }
        out
    }
}

/// The XMPP client-to-server port: the first of the topology's XMPP ports.
fn c2s_port(t: &Topology) -> u16 {
    t.ports.xmpp.first().copied().unwrap_or(5222)
}

/// TLS file paths of one daemon.
#[derive(Debug, Clone)]
struct TlsPaths {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca_key: Option<PathBuf>,
}

/// The `[tls]` table of every daemon config (a table: it goes after the top-level keys).
fn tls_section(tls: &TlsPaths) -> String {
    let mut out = format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        tls.ca, tls.cert, tls.key
    );
    if let Some(ca_key) = &tls.ca_key {
        // The leader signs the CSRs of nodes that join without a pre-issued certificate.
        let _ = writeln!(out, "ca_key = {ca_key:?}");
    }
    out
}

fn haclt_toml(monitors: &[String], pki: &Path) -> String {
    format!(
        "# haclt for this stand: run it in the fabric namespace (the operator host), e.g.\n\
         # ip netns exec <prefix>--fabric haclt --config <this file> status\n\
         monitors = {monitors:?}\n{}",
        tls_section(&TlsPaths {
            ca: pki.join("ca.pem"),
            cert: pki.join(format!("{OPERATOR}.pem")),
            key: pki.join(format!("{OPERATOR}.key")),
            ca_key: None,
        })
    )
}

/// The files of one node being written, and the list of what must be on it.
struct NodeFiles<'m> {
    material: &'m Material<'m>,
    node: &'m str,
    placed: Vec<Placed>,
}

impl NodeFiles<'_> {
    /// Writes `text` as `path` of the node, owned by `owner` and its group, with `mode`.
    fn put(
        &mut self,
        path: &Path,
        text: &str,
        owner: &'static str,
        mode: u32,
    ) -> Result<(), MaterialError> {
        self.put_with(path, text.as_bytes(), owner, owner, mode, false)
    }

    /// Writes `bytes` as `path` of the node (when `once`, only if it was never written).
    fn put_with(
        &mut self,
        path: &Path,
        bytes: &[u8],
        owner: &'static str,
        group: &'static str,
        mode: u32,
        once: bool,
    ) -> Result<(), MaterialError> {
        let local = self.material.local(self.node, path);
        if !(once && local.exists()) {
            if let Some(dir) = local.parent() {
                fs::create_dir_all(dir).map_err(io(dir))?;
            }
            ha_pki::write_file(&local, bytes, mode)?;
        }
        self.place(path, owner, group, mode, false, once)
    }

    /// Copies this machine's `from` to `path` of the node.
    fn copy(
        &mut self,
        from: &Path,
        path: &Path,
        owner: &'static str,
        mode: u32,
    ) -> Result<(), MaterialError> {
        let bytes = fs::read(from).map_err(io(from))?;
        self.put_with(path, &bytes, owner, owner, mode, false)
    }

    /// The directory `path` of the node.
    fn dir(
        &mut self,
        path: &Path,
        owner: &'static str,
        group: &'static str,
        mode: u32,
    ) -> Result<(), MaterialError> {
        if self.material.placement == Placement::Shared {
            fs::create_dir_all(path).map_err(io(path))?;
        }
        self.place(path, owner, group, mode, true, false)
    }

    /// Gives `path` its owner and mode: now on a shared machine, listed for a guest.
    fn place(
        &mut self,
        path: &Path,
        owner: &'static str,
        group: &'static str,
        mode: u32,
        dir: bool,
        once: bool,
    ) -> Result<(), MaterialError> {
        match self.material.placement {
            Placement::Shared => {
                if (owner, group) != ("root", "root") {
                    let uid = system_user(owner)?.uid;
                    let gid = Group::from_name(group)
                        .ok()
                        .flatten()
                        .ok_or_else(|| MaterialError::NoUser(group.to_owned()))?
                        .gid;
                    chown(path, Some(uid), Some(gid)).map_err(|e| MaterialError::Io {
                        path: path.to_owned(),
                        source: e.into(),
                    })?;
                }
                fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))
            }
            Placement::Guest => {
                self.placed.push(Placed {
                    path: path.to_owned(),
                    owner,
                    group,
                    mode,
                    dir,
                    once,
                });
                Ok(())
            }
        }
    }
}

fn system_user(name: &str) -> Result<User, MaterialError> {
    User::from_name(name)
        .ok()
        .flatten()
        .ok_or_else(|| MaterialError::NoUser(name.to_owned()))
}

/// Writes `text` with exactly `mode`, atomically (never briefly readable by others).
fn write(path: &Path, text: &str, mode: u32) -> Result<(), MaterialError> {
    Ok(ha_pki::write_file(path, text.as_bytes(), mode)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::topology::tests::example;

    #[test]
    fn configs_name_the_stand_addresses_and_one_monitor_port() {
        let t = example();
        let dir = Path::new("/run/ha-provision/xmpp-lab");
        let m = Material::new(&t, dir);
        assert_eq!(
            m.monitor_service_addresses(),
            [
                "192.168.1.18:7400",
                "192.168.1.19:7400",
                "192.168.1.20:7400"
            ]
        );
        assert_eq!(m.monitor_id("mon2server"), Some(2));
        let mon = m.monitor_toml(t.node("mon2server").unwrap());
        assert!(mon.contains("id = 2\n"), "{mon}");
        assert!(mon.contains("advertise = \"192.168.1.19:7400\""), "{mon}");
        assert!(mon.contains("listen = \"0.0.0.0:7400\""), "{mon}");
        assert!(!mon.contains("dev ="), "{mon}");
        let parsed: toml::Value = toml::from_str(&mon).unwrap();
        assert_eq!(
            parsed["tls"]["ca_key"].as_str(),
            Some("/run/ha-provision/xmpp-lab/pki/ca.key")
        );
        let agent = m.agent_toml(t.node("psql2server").unwrap());
        assert!(
            agent.contains("advertise_host = \"192.168.1.11\""),
            "{agent}"
        );
        let parsed: toml::Value = toml::from_str(&agent).unwrap();
        assert_eq!(parsed["postgres"]["port"].as_integer(), Some(5432));
        // Top-level keys stay top-level: `[tls]` comes after them.
        assert_eq!(parsed["node"].as_str(), Some("psql2server"));
        assert_eq!(
            parsed["tls"]["cert"].as_str(),
            Some("/run/ha-provision/xmpp-lab/nodes/psql2server/node.pem")
        );
        let peers = parsed["postgres"]["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 2, "{agent}");
        assert_eq!(peers[0]["address"].as_str(), Some("192.168.1.10"));
        // No replication rule by address and password or trust: certificates only.
        assert!(!agent.contains("\"replicator\""), "{agent}");
        assert!(!agent.contains("trust"), "{agent}");
        let clients = parsed["postgres"]["clients"].as_array().unwrap();
        assert_eq!(
            clients.len(),
            5,
            "ejabberd and the drill writer on each frontend, the writer through HAProxy: {agent}"
        );
        assert_eq!(clients[4]["certificate"].as_str(), Some("operator"));
        assert_eq!(
            clients[4]["address"].as_str(),
            Some("192.168.1.9"),
            "the gateway's backend address"
        );
        let cfg = m.haproxy_cfg(t.node("gw1server").unwrap(), Path::new("/h"));
        for line in [
            "    bind 192.168.1.1:5000\n",
            "    bind 192.168.1.9:5000\n",
            "    option httpchk OPTIONS /primary\n",
            "    server psql2server 192.168.1.11:5432 check port 7410 check-ssl verify required ca-file /h/ca.pem crt /h/check.pem\n",
        ] {
            assert!(cfg.contains(line), "{line:?} in {cfg}");
        }
        assert!(!cfg.contains("192.168.121."), "not on management: {cfg}");
        // ejabberd logs in with its node certificate: no password rule at all.
        assert_eq!(clients[0]["certificate"].as_str(), Some("e1server"));
        assert_eq!(clients[0]["user"].as_str(), Some("ejabberd"));
        assert_eq!(clients[0]["address"].as_str(), Some("192.168.1.2"));
        assert_eq!(clients[1]["certificate"].as_str(), Some("operator"));
        assert!(
            !agent.contains("scram") && !agent.contains("hba"),
            "{agent}"
        );
        let haclt: toml::Value =
            toml::from_str(&haclt_toml(&m.monitor_management_addresses(), dir)).unwrap();
        assert_eq!(haclt["monitors"][0].as_str(), Some("192.168.121.21:7400"));
        let yml = m.ejabberd_yml(&m.ejabberd_sql_tls_dir("e1server"));
        assert!(yml.contains("sql_server: 192.168.1.10"), "{yml}");
        assert!(!yml.contains("sql_password"), "{yml}");
        assert!(
            yml.contains("sql_ssl: true\n    sql_ssl_verify: true"),
            "{yml}"
        );
        assert!(
            yml.contains("sql_ssl_certfile: \"/run/ha-provision/xmpp-lab/nodes/e1server/ejabberd-sql/client.pem\""),
            "{yml}"
        );
        assert!(yml.contains("sql_start_interval: 1"), "{yml}");
        let agent = m.ejabberd_agent_toml(t.node("e2server").unwrap());
        let parsed: toml::Value = toml::from_str(&agent).unwrap();
        assert_eq!(parsed["role"].as_str(), Some("ejabberd"));
        assert_eq!(parsed["node"].as_str(), Some("e2server"));
        let e = &parsed["ejabberd"];
        assert_eq!(e["erlang_node"].as_str(), Some("ejabberd@e2server"));
        assert_eq!(e["epmd_port"].as_integer(), Some(4369));
        assert_eq!(e["advertise_host"].as_str(), Some("192.168.1.3"));
        assert_eq!(e["vhosts"][0].as_str(), Some("domain.local"));
        assert_eq!(
            e["config_file"].as_str(),
            Some("/run/ha-provision/xmpp-lab/nodes/e2server/ejabberd/conf/ejabberd.yml")
        );
    }

    #[test]
    fn identities_are_named_per_role_private_and_kept_across_runs() {
        let t = example();
        let tmp = tempfile::tempdir().unwrap();
        let m = Material::new(&t, tmp.path());
        m.generate().unwrap();
        let identity = |path: PathBuf| {
            let pem = fs::read_to_string(path).unwrap();
            let id = ha_pki::CertInfo::from_pem(&pem).unwrap().identity.unwrap();
            (id.role(), id.name().to_owned())
        };
        assert_eq!(
            identity(m.node_dir("mon3server").join("node.pem")),
            (CertRole::Monitor, "monitor-3".into())
        );
        assert_eq!(
            identity(m.node_dir("psql1server").join("node.pem")),
            (CertRole::Postgres, "psql1server".into())
        );
        assert_eq!(
            identity(m.node_dir("e2server").join("node.pem")),
            (CertRole::Ejabberd, "e2server".into())
        );
        assert_eq!(
            identity(m.pki_dir().join("operator.pem")),
            (CertRole::Operator, "operator".into())
        );
        assert!(!m.node_dir("gw1server").join("node.pem").exists());
        for key in [
            m.pki_dir().join("ca.key"),
            m.pki_dir().join("operator.key"),
            m.node_dir("psql2server").join("node.key"),
            m.join_token("psql2server").with_file_name("agent.toml"),
            m.agent_config("e1server"),
            m.agent_home("e1server").join(".erlang.cookie"),
        ] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        // Every agent config is one the agent itself accepts (paths, secret modes, roles).
        for node in ["psql1server", "e1server"] {
            let config = ha_agent::config::AgentConfig::load(&m.agent_config(node), false)
                .unwrap_or_else(|e| panic!("{node}: {e}"));
            assert_eq!(config.node.as_str(), node);
        }
        // ejabberd.yml belongs to the node's agent once written: a later run keeps it.
        let yml = m.ejabberd_conf("e1server").join("ejabberd.yml");
        let moved = fs::read_to_string(&yml)
            .unwrap()
            .replace("sql_server: 192.168.1.10", "sql_server: 192.168.1.11");
        fs::write(&yml, &moved).unwrap();
        let before = fs::read(m.node_dir("mon1server").join("node.pem")).unwrap();
        m.generate().unwrap();
        let after = fs::read(m.node_dir("mon1server").join("node.pem")).unwrap();
        assert_eq!(before, after, "a second run keeps every identity");
        assert_eq!(fs::read_to_string(&yml).unwrap(), moved);
    }

    /// Guests get the packaged units' paths (`/etc/ha`, Debian's PostgreSQL and ejabberd
    /// directories), every file owned by the user its daemon runs as, and nothing written
    /// here that is not on the list to place (nor the other way round).
    #[test]
    fn guests_get_packaged_paths_and_owners() {
        let t = example();
        let tmp = tempfile::tempdir().unwrap();
        let m = Material::placed(&t, tmp.path(), Placement::Guest);
        let manifest = m.generate().unwrap();
        assert!(!manifest.contains_key("gw1server"));
        let find = |node: &str, path: &str| {
            manifest[node]
                .iter()
                .find(|p| p.path == Path::new(path))
                .unwrap_or_else(|| panic!("{node}: {path} in {:#?}", manifest[node]))
                .clone()
        };
        for (node, path, owner, mode, once) in [
            (
                "mon2server",
                "/etc/ha/monitor.toml",
                "ha-monitor",
                0o600,
                false,
            ),
            ("mon2server", "/etc/ha/ca.key", "ha-monitor", 0o600, false),
            (
                "psql1server",
                "/etc/ha/agent.toml",
                "postgres",
                0o600,
                false,
            ),
            ("psql1server", "/etc/ha/node.key", "postgres", 0o600, false),
            ("psql1server", "/etc/ha/ca.pem", "root", 0o644, false),
            (
                "e1server",
                "/etc/ha/agent-ejabberd.toml",
                "ejabberd",
                0o600,
                false,
            ),
            (
                "e1server",
                "/etc/ejabberd/ejabberd.yml",
                "ejabberd",
                0o640,
                true,
            ),
            (
                "e1server",
                "/var/lib/ejabberd/.erlang.cookie",
                "ejabberd",
                0o400,
                false,
            ),
        ] {
            let p = find(node, path);
            assert_eq!(
                (p.owner, p.group, p.mode, p.once),
                (owner, owner, mode, once),
                "{node}: {path}"
            );
        }
        assert!(
            manifest["psql1server"]
                .iter()
                .all(|p| !p.path.ends_with("ca.key")),
            "only monitors sign"
        );
        assert!(find("e1server", "/etc/ejabberd").dir);
        // Directories come before the files in them.
        let e1: Vec<&Path> = manifest["e1server"]
            .iter()
            .map(|p| p.path.as_path())
            .collect();
        let pos = |p: &str| e1.iter().position(|x| *x == Path::new(p)).unwrap();
        assert!(pos("/etc/ejabberd") < pos("/etc/ejabberd/ejabberd.yml"));

        let agent: toml::Value = toml::from_str(
            &fs::read_to_string(m.local("psql1server", Path::new("/etc/ha/agent.toml"))).unwrap(),
        )
        .unwrap();
        let pg = &agent["postgres"];
        assert_eq!(pg["data_dir"].as_str(), Some("/var/lib/postgresql/15/ha"));
        assert_eq!(pg["socket_dir"].as_str(), Some("/run/postgresql"));
        assert_eq!(agent["tls"]["key"].as_str(), Some("/etc/ha/node.key"));
        assert_eq!(
            agent["join_token_file"].as_str(),
            Some("/etc/ha/join-token")
        );
        assert_eq!(agent["state_dir"].as_str(), Some("/var/lib/ha-agent"));
        // Under systemd an agent restart leaves PostgreSQL running.
        assert!(agent.get("stop_postgres_on_shutdown").is_none(), "{agent}");
        let mon: toml::Value = toml::from_str(
            &fs::read_to_string(m.local("mon1server", &m.monitor_config("mon1server"))).unwrap(),
        )
        .unwrap();
        assert_eq!(mon["data_dir"].as_str(), Some("/var/lib/ha-monitor"));
        assert_eq!(mon["tls"]["ca_key"].as_str(), Some("/etc/ha/ca.key"));
        let ctl =
            fs::read_to_string(m.local("e2server", Path::new("/etc/ejabberd/ejabberdctl.cfg")))
                .unwrap();
        assert!(ctl.contains("ERLANG_NODE=ejabberd@e2server\n"), "{ctl}");
        assert!(ctl.contains("SPOOL_DIR=/var/lib/ejabberd/spool\n"), "{ctl}");

        // Written here == listed to place, node by node.
        for (node, placed) in &manifest {
            let root = m.files_dir().join("nodes").join(node);
            let mut written = Vec::new();
            let mut dirs = vec![root.clone()];
            while let Some(d) = dirs.pop() {
                for e in fs::read_dir(&d).unwrap().flatten() {
                    if e.file_type().unwrap().is_dir() {
                        dirs.push(e.path());
                    } else {
                        written.push(Path::new("/").join(e.path().strip_prefix(&root).unwrap()));
                    }
                }
            }
            written.sort();
            let mut listed: Vec<PathBuf> = placed
                .iter()
                .filter(|p| !p.dir)
                .map(|p| p.path.clone())
                .collect();
            listed.sort();
            assert_eq!(written, listed, "{node}");
        }
        // The join token: for the agent's user, owner-only.
        let token = m
            .write_join_token(t.node("psql2server").unwrap(), "T")
            .unwrap();
        assert_eq!(token.len(), 1);
        assert_eq!((token[0].owner, token[0].mode), ("postgres", 0o600));
        assert_eq!(
            fs::read_to_string(m.local("psql2server", &token[0].path)).unwrap(),
            "T"
        );
    }
}
