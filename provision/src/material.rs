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
//! S/nodes/<node>/agent-home/.erlang.cookie  ejabberd nodes: the cookie `erl_call` reads (0600)
//! S/nodes/<node>/ejabberd/home/.erlang.cookie
//!                                           ejabberd nodes: the cookie of ejabberd and of
//!                                           `ejabberdctl` run as ejabberd (0400)
//! S/pki/erlang.cookie, ejabberd-sql.password, xmpp-load.password
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
//! generates for exactly those peers). Nodes get pre-issued certificates whose SANs name every
//! address of the node, because peers dial each other by address on different networks.

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_pki::{Ca, Role as CertRole, Validity};
use nix::unistd::{Uid, User, chown};
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

/// Paths of the material of one stand.
#[derive(Debug, Clone)]
pub struct Material<'a> {
    topology: &'a Topology,
    dir: &'a Path,
}

impl<'a> Material<'a> {
    /// The material of `topology` under state directory `dir`.
    pub fn new(topology: &'a Topology, dir: &'a Path) -> Self {
        Self { topology, dir }
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

    /// `S/nodes/<node>`.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.nodes_dir().join(node)
    }

    /// The haclt configuration (`status --json` prints it as `haclt_config`).
    pub fn haclt_config(&self) -> PathBuf {
        crate::state::StateFile::haclt_config_path(self.dir)
    }

    /// `ha-monitor --config` of a monitor node.
    pub fn monitor_config(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("monitor.toml")
    }

    /// `ha-agent --config` of a postgres or ejabberd node.
    pub fn agent_config(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.toml")
    }

    /// The join token file of an agent.
    pub fn join_token(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("join-token")
    }

    /// The PostgreSQL data directory of a postgres node.
    pub fn pg_data(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("pg/data")
    }

    /// The ejabberd user's `HOME` on an ejabberd node: its `.erlang.cookie` is the stand's
    /// cookie (run `ejabberdctl` as `ejabberd` with this `HOME`).
    pub fn ejabberd_home(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("ejabberd/home")
    }

    /// The ejabberd config directory (`ejabberdctl --config-dir`) of an ejabberd node.
    pub fn ejabberd_conf(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("ejabberd/conf")
    }

    /// The directory whose `.erlang.cookie` the ejabberd agent's `erl_call` reads.
    fn agent_home(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent-home")
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

    /// Writes everything (see the module docs). Idempotent.
    pub fn generate(&self) -> Result<(), MaterialError> {
        let postgres = system_user("postgres")?;
        let ejabberd = system_user("ejabberd")?;
        // The daemons run as postgres and ejabberd and must traverse to their directories.
        for dir in [self.dir.to_owned(), self.nodes_dir()] {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(io(&dir))?;
        }
        let pki = self.pki_dir();
        fs::create_dir_all(&pki).map_err(io(&pki))?;
        fs::set_permissions(&pki, fs::Permissions::from_mode(0o700)).map_err(io(&pki))?;
        let ca = self.ca()?;
        self.certificate(&ca, &pki.join(OPERATOR), OPERATOR, CertRole::Operator, None)?;
        write(
            &self.haclt_config(),
            &haclt_toml(&self.monitor_management_addresses(), &pki),
            0o600,
        )?;
        let cookie = self.erlang_cookie()?;
        let sql_password = self.ejabberd_sql_password()?;
        for node in &self.topology.nodes {
            let dir = self.node_dir(&node.name);
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(io(&dir))?;
            let cert_name = match node.role {
                Role::Gateway => continue,
                Role::Monitor => format!(
                    "monitor-{}",
                    self.monitor_id(&node.name)
                        .expect("a monitor node has an id")
                ),
                Role::Postgres | Role::Ejabberd => node.name.clone(),
            };
            let role = match node.role {
                Role::Monitor => CertRole::Monitor,
                Role::Postgres => CertRole::Postgres,
                _ => CertRole::Ejabberd,
            };
            self.certificate(&ca, &dir.join("node"), &cert_name, role, Some(node))?;
            match node.role {
                Role::Monitor => write(
                    &self.monitor_config(&node.name),
                    &self.monitor_toml(node),
                    0o600,
                )?,
                Role::Postgres => {
                    let pg = dir.join("pg");
                    fs::create_dir_all(&pg).map_err(io(&pg))?;
                    own(&pg, &postgres, 0o700)?;
                    write(
                        &self.agent_config(&node.name),
                        &self.agent_toml(node),
                        0o600,
                    )?;
                }
                Role::Ejabberd => {
                    self.ejabberd_files(node, &ejabberd, &cookie, &sql_password)?;
                    write(
                        &self.agent_config(&node.name),
                        &self.ejabberd_agent_toml(node),
                        0o600,
                    )?;
                }
                Role::Gateway => {}
            }
        }
        info!(dir = %self.dir.display(), "stand material written");
        Ok(())
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

    /// `<base>.pem` and `<base>.key` for `name` in `role`, unless both exist.
    /// `node`'s certificate carries its host names and every address as SANs: peers connect
    /// to a monitor or PostgreSQL by address.
    fn certificate(
        &self,
        ca: &Ca,
        base: &Path,
        name: &str,
        role: CertRole,
        node: Option<&Node>,
    ) -> Result<(), MaterialError> {
        let cert = base.with_extension("pem");
        let key = base.with_extension("key");
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
        ha_pki::write_key_file(&key, issued.key_pem.as_bytes())?;
        ha_pki::write_public_file(&cert, issued.cert_pem.as_bytes())?;
        Ok(())
    }

    /// The Erlang cookie every ejabberd node of the stand shares (created once).
    fn erlang_cookie(&self) -> Result<String, MaterialError> {
        self.secret("erlang.cookie")
    }

    /// The password of ejabberd's SQL role (`ejabberd`), created once per stand: `up` sets it
    /// on the role, ejabberd and its agent read it from `ejabberd.yml`.
    pub fn ejabberd_sql_password(&self) -> Result<String, MaterialError> {
        self.secret("ejabberd-sql.password")
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

    fn tls_files(&self, node: &str) -> TlsPaths {
        let dir = self.node_dir(node);
        TlsPaths {
            ca: self.pki_dir().join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
            ca_key: None,
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
            data = self.node_dir(&node.name).join("monitor-data"),
        );
        for (i, m) in self.monitor_service_addresses().iter().enumerate() {
            let _ = writeln!(out, "  {{ id = {}, address = {m:?} }},", i + 1);
        }
        out.push_str("]\n");
        let mut tls = self.tls_files(&node.name);
        tls.ca_key = Some(self.pki_dir().join("ca.key"));
        out.push_str(&tls_section(&tls));
        out
    }

    fn agent_toml(&self, node: &Node) -> String {
        let t = self.topology;
        let pg = self.node_dir(&node.name).join("pg");
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
        let mut hba = String::new();
        let mut clients = Vec::new();
        for frontend in t
            .nodes_with_role(Role::Ejabberd)
            .filter_map(|n| self.service_address(n))
        {
            let _ = writeln!(
                hba,
                "  {{ type = \"host\", database = \"{EJABBERD_DB}\", user = \"ejabberd\", address = \"{frontend}/32\", method = \"scram-sha-256\" }},"
            );
            // The writer of `haclt drill`, which the demo runs on a frontend (a lab stand is
            // for drills): TLS with the operator certificate, mapped to `postgres`.
            clients.push(format!(
                "{{ certificate = \"{OPERATOR}\", user = \"postgres\", database = \"postgres\", address = \"{frontend}\" }}"
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
             clients = [{clients}]\n\
             hba = [\n{hba}]\n",
            peers = peers.join(", "),
            clients = clients.join(", "),
            data = self.pg_data(&node.name),
            port = t.ports.postgres,
            log = pg.join("postgresql.log"),
        );
        self.agent_config_text(
            node,
            "postgres",
            &format!(
                "# `down` stops PostgreSQL through the agent rather than by signal.\n\
                 stop_postgres_on_shutdown = true\n\
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
            state = self.node_dir(&node.name).join("agent-state"),
            tls = tls_section(&self.tls_files(&node.name)),
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
             xmpp_port = {c2s}\n",
            yml = self.ejabberd_conf(&node.name).join("ejabberd.yml"),
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

    fn ejabberd_files(
        &self,
        node: &Node,
        user: &User,
        cookie: &str,
        sql_password: &str,
    ) -> Result<(), MaterialError> {
        let root = self.node_dir(&node.name).join("ejabberd");
        for sub in ["", "conf", "spool", "logs", "home"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            own(&dir, user, 0o750)?;
        }
        // The cookie is only ever in `$HOME/.erlang.cookie` files, never on a command line
        // (readable by every local user in /proc): the agent runs as root and its `erl_call`
        // reads the agent's home; ejabberd and every `ejabberdctl` run as `ejabberd` with the
        // node's ejabberd home.
        let home = self.agent_home(&node.name);
        fs::create_dir_all(&home).map_err(io(&home))?;
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).map_err(io(&home))?;
        ha_pki::write_key_file(&home.join(".erlang.cookie"), cookie.as_bytes())?;
        let cookie_file = self.ejabberd_home(&node.name).join(".erlang.cookie");
        ha_pki::write_key_file(&cookie_file, cookie.as_bytes())?;
        own(&cookie_file, user, 0o400)?;
        let conf = self.ejabberd_conf(&node.name);
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
             ERL_OPTIONS=\"-env ERL_CRASH_DUMP_BYTES 0\"\n",
            erl = Self::erlang_node(&node.name),
            spool = root.join("spool").display(),
            logs = root.join("logs").display(),
            first = d.first,
            last = d.last,
            epmd = self.topology.ports.epmd,
        );
        let ctl_path = conf.join("ejabberdctl.cfg");
        write(&ctl_path, &ctl, 0o640)?;
        chown_group(&ctl_path, user)?;
        let inetrc = conf.join("inetrc");
        write(&inetrc, "{lookup,[\"file\",\"native\"]}.\n", 0o644)?;
        let yml = conf.join("ejabberd.yml");
        if !yml.exists() {
            write(&yml, &self.ejabberd_yml(sql_password), 0o640)?;
            chown_group(&yml, user)?;
        }
        Ok(())
    }

    /// The first `ejabberd.yml`: SQL storage on the first PostgreSQL node (the one `up`
    /// bootstraps), with the SQL settings `agent/README.md` recommends for failover.
    fn ejabberd_yml(&self, sql_password: &str) -> String {
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
                "\nhost_config:\n  {domain}:\n    sql_type: pgsql\n    sql_server: {address}   # {name}\n    sql_port: {port}\n    sql_database: \"{EJABBERD_DB}\"\n    sql_username: ejabberd\n    sql_password: \"{sql_password}\"\n    sql_pool_size: 5\n    sql_start_interval: 1\n    sql_keepalive_interval: 10\n    sql_query_timeout: 5\n    sql_connect_timeout: 2\n",
                domain = t.domain,
                port = t.ports.postgres,
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

fn own(path: &Path, user: &User, mode: u32) -> Result<(), MaterialError> {
    chown(path, Some(user.uid), Some(user.gid)).map_err(|e| MaterialError::Io {
        path: path.to_owned(),
        source: e.into(),
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))
}

/// Debian's layout for ejabberd's files: root owns them, the ejabberd group reads them.
fn chown_group(path: &Path, user: &User) -> Result<(), MaterialError> {
    chown(path, Some(Uid::from_raw(0)), Some(user.gid)).map_err(|e| MaterialError::Io {
        path: path.to_owned(),
        source: e.into(),
    })
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
            2,
            "the drill writer on each frontend: {agent}"
        );
        assert_eq!(clients[0]["certificate"].as_str(), Some("operator"));
        let haclt: toml::Value =
            toml::from_str(&haclt_toml(&m.monitor_management_addresses(), dir)).unwrap();
        assert_eq!(haclt["monitors"][0].as_str(), Some("192.168.121.21:7400"));
        let yml = m.ejabberd_yml("SECRET");
        assert!(yml.contains("sql_server: 192.168.1.10"), "{yml}");
        assert!(yml.contains("sql_password: \"SECRET\""), "{yml}");
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
            m.pki_dir().join("ejabberd-sql.password"),
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
}
