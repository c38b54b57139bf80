//! `ha-agent --config PATH`: the TOML file, parsed strictly (`deny_unknown_fields`: a mistyped
//! key is an error, never a silent default) and validated into [`AgentConfig`] before anything
//! starts. `main` prints a [`ConfigError`] and exits 64.
//!
//! Invariants: a validated config names a valid node and group, at least one well-formed monitor
//! address, absolute paths, an existing PostgreSQL bin dir and OS user; secrets (the join token)
//! live in files that only their owner can read, never on a command line. The role section maps
//! onto the controller's [`PgConfig`] in one place ([`PostgresRole::pg_config`]); the
//! `[ejabberd]` table of `role = "ejabberd"` onto the ejabberd controller's configuration
//! ([`EjabberdRole`], documented with an example in `agent/README.md`).
//!
//! ```toml
//! role = "postgres"
//! node = "psql1server"
//! group = "main"
//! monitors = ["10.0.0.21:7400", "10.0.0.22:7400", "10.0.0.23:7400"]
//! join_token_file = "/etc/ha/join-token"      # mode 0600; read only until the node joined
//! state_dir = "/var/lib/ha-agent"
//! # dev = true                                # plaintext gRPC without [tls] (also needs --dev)
//! # allow_drills = false, report_interval = "500ms", rpc_timeout = "1s",
//! # stop_postgres_on_shutdown = false
//! listen = "10.0.0.10:7410"                   # the agent port: other agents call it (vouches
//!                                             # for the primary while no monitor answers); needs
//!                                             # [tls] and the postgres role; none: no failsafe
//!
//! [tls]                                       # mutual TLS to the monitors and for replication
//! ca = "/etc/ha/ca.pem"                       # must exist: it authenticates the monitors
//! cert = "/etc/ha/node.pem"                   # missing: generated with a CSR at join
//! key = "/etc/ha/node.key"                    # mode 0600
//!
//! [postgres]
//! data_dir = "/var/lib/postgresql/15/ha"
//! port = 5432
//! listen_addresses = ["10.0.0.10"]
//! advertise_host = "10.0.0.10"                # what peers and monitors connect to
//! socket_dir = "/run/postgresql"
//! # bin_dir = "/usr/lib/postgresql/15/bin", os_user = "postgres",
//! # replication_user = "replicator", log_file, start_timeout, stop_timeout,
//! # replication_timeout = "5s"   (wal_sender_timeout and wal_receiver_timeout)
//! settings = { shared_buffers = "128MB" }     # keys the agent manages are refused
//! # With [tls]: the other PostgreSQL nodes that may replicate from this one (certificate name
//! # and source address); they get `hostssl ... cert` rules and an ident map entry.
//! peers = [{ node = "psql2server", address = "10.0.0.11" }]
//! # With [tls]: clients that log in with a certificate of the cluster CA, from an address,
//! # as the role their certificate's name maps to (`hostssl ... cert` + an ident map entry).
//! clients = [{ certificate = "operator", user = "postgres", database = "postgres",
//!              address = "10.0.0.0/24" }]
//!
//! [[postgres.hba]]                            # besides the agent's own local (peer) login
//! type = "host"
//! database = "replication"
//! user = "replicator"
//! address = "10.0.0.11/32"
//! method = "scram-sha-256"
//! ```

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_proto::NodeId;
use ha_proto::types::{Endpoint, NodeKind};
use serde::Deserialize;

use crate::ejabberd::controller::ControllerConfig;
use crate::ejabberd::erl::ErlNode;
use crate::pg::{CertClient, HbaConnType, HbaRule, PgConfig, ReplicationPeer};

/// Why a configuration (or a secret file it names) was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RoleName {
    Postgres,
    Ejabberd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    role: RoleName,
    node: String,
    group: String,
    /// `host:port` of every monitor; the agent follows the leader among them.
    monitors: Vec<String>,
    /// File holding the single-use join token (mode 0600); needed until the node has joined.
    join_token_file: Option<PathBuf>,
    /// Where the agent keeps its state file (highest epoch seen, joined flag).
    state_dir: PathBuf,
    #[serde(default)]
    allow_drills: bool,
    /// Plaintext gRPC to the monitors; needs the `--dev` flag too.
    #[serde(default)]
    dev: bool,
    /// Report period until the monitor's first answer sets it.
    #[serde(default = "default_report_interval", with = "humantime_serde")]
    report_interval: Duration,
    /// Bound on every call to a monitor (connect included).
    #[serde(default = "default_rpc_timeout", with = "humantime_serde")]
    rpc_timeout: Duration,
    /// Stop PostgreSQL (fast) when the agent shuts down; by default it is left running and
    /// adopted by the next agent process.
    #[serde(default)]
    stop_postgres_on_shutdown: bool,
    /// The agent port (`address:port`), served to the other agents of the group.
    listen: Option<std::net::SocketAddr>,
    tls: Option<TlsSection>,
    postgres: Option<PostgresFile>,
    ejabberd: Option<EjabberdFile>,
}

/// `[tls]`: the cluster CA bundle, this node's certificate (name = node, role postgres) and key.
/// A missing certificate is obtained at join: the agent generates the key (0600) and a CSR.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn default_report_interval() -> Duration {
    Duration::from_millis(500)
}

fn default_rpc_timeout() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostgresFile {
    data_dir: PathBuf,
    port: u16,
    #[serde(default = "default_listen")]
    listen_addresses: Vec<String>,
    /// The host peers and monitors use to reach this server (sent when joining).
    advertise_host: String,
    socket_dir: PathBuf,
    #[serde(default = "default_bin_dir")]
    bin_dir: PathBuf,
    #[serde(default = "default_os_user")]
    os_user: String,
    #[serde(default = "default_replication_user")]
    replication_user: String,
    /// Server log (default: next to the data directory).
    log_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    start_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    stop_timeout: Option<Duration>,
    /// Extra settings for the managed include file (`shared_buffers = "128MB"`, ...); keys the
    /// agent manages are refused.
    #[serde(default)]
    settings: BTreeMap<String, String>,
    /// `wal_sender_timeout` and `wal_receiver_timeout` (default 5s): how soon a dead
    /// replication link is given up on.
    #[serde(default, with = "humantime_serde")]
    replication_timeout: Option<Duration>,
    /// `pg_hba.conf` rules besides the local `peer` login of the agent's superuser.
    #[serde(default)]
    hba: Vec<HbaFile>,
    /// The group's other PostgreSQL nodes, until the monitor hands them to the agent.
    #[serde(default)]
    peers: Vec<PeerFile>,
    /// Clients admitted by certificate (needs `[tls]`).
    #[serde(default)]
    clients: Vec<ClientFile>,
}

/// `[ejabberd]`: the ejabberd node this agent re-points at the current primary.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EjabberdFile {
    /// The `ejabberd.yml` ejabberd loads (given to it with `--config-dir`); rewritten in place.
    config_file: PathBuf,
    /// Erlang node name, `ejabberd@e1server`.
    erlang_node: String,
    /// Directory holding the cluster's `.erlang.cookie` (mode 0400 or 0600).
    cookie_home: PathBuf,
    #[serde(default = "default_erl_call")]
    erl_call: PathBuf,
    /// epmd's port when it is not 4369.
    epmd_port: Option<u16>,
    /// Virtual hosts whose SQL pools are restarted and verified.
    vhosts: Vec<String>,
    /// Where XMPP clients reach this node (sent when joining; shown in status).
    advertise_host: String,
    #[serde(default = "default_xmpp_port")]
    xmpp_port: u16,
    /// Bound for one Erlang evaluation (`erl_call`).
    #[serde(default = "default_erl_timeout", with = "humantime_serde")]
    erl_timeout: Duration,
    /// Bound for connecting to a database (the new primary, or the old one to check it).
    #[serde(default = "default_db_connect_timeout", with = "humantime_serde")]
    db_connect_timeout: Duration,
    /// Bound from the pool restart to the first write seen on the new primary.
    #[serde(default = "default_verify_timeout", with = "humantime_serde")]
    verify_timeout: Duration,
    /// Bound for ejabberd's connections to the old server to disappear.
    #[serde(default = "default_verify_timeout", with = "humantime_serde")]
    old_connections_timeout: Duration,
    /// How often an uncached write through ejabberd's pool must reach the applied target.
    #[serde(default = "default_verify_timeout", with = "humantime_serde")]
    sql_check_interval: Duration,
    /// ejabberd reaches PostgreSQL over TLS with this node's certificate: the agent keeps the
    /// copies `sql_ssl_cafile` (`ca.pem`) and `sql_ssl_certfile` (`client.pem`) name here.
    sql_tls_dir: Option<PathBuf>,
}

fn default_erl_call() -> PathBuf {
    PathBuf::from("/usr/lib/erlang/bin/erl_call")
}

fn default_xmpp_port() -> u16 {
    5222
}

fn default_erl_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_db_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_verify_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    /// The name in the client's certificate (its common name).
    certificate: String,
    /// The role it logs in as.
    user: String,
    database: String,
    /// Where its connections come from: an address or a network (CIDR).
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerFile {
    node: String,
    address: std::net::IpAddr,
}

fn default_listen() -> Vec<String> {
    vec!["localhost".into()]
}

fn default_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

fn default_os_user() -> String {
    "postgres".into()
}

fn default_replication_user() -> String {
    "replicator".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HbaFile {
    #[serde(rename = "type")]
    conn_type: HbaType,
    database: String,
    user: String,
    address: Option<String>,
    method: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum HbaType {
    Local,
    Host,
    Hostssl,
}

/// The validated configuration of one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: NodeId,
    pub group: String,
    pub monitors: Vec<String>,
    pub join_token_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub allow_drills: bool,
    pub dev: bool,
    pub report_interval: Duration,
    pub rpc_timeout: Duration,
    pub stop_postgres_on_shutdown: bool,
    /// Where this agent serves its peers (the standby side of the failsafe); `None`: nowhere,
    /// so it never vouches and its primary has no failsafe.
    pub listen: Option<std::net::SocketAddr>,
    /// Mutual TLS to the monitors (and for replication); `None` only in dev mode.
    pub tls: Option<ha_pki::TlsFiles>,
    pub role: RoleConfig,
}

/// What the agent drives.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "built once per process; boxing would only add indirection"
)]
pub enum RoleConfig {
    Postgres(PostgresRole),
    Ejabberd(EjabberdRole),
}

impl RoleConfig {
    pub fn kind(&self) -> NodeKind {
        match self {
            RoleConfig::Postgres(_) => NodeKind::Postgres,
            RoleConfig::Ejabberd(_) => NodeKind::Ejabberd,
        }
    }

    /// Where peers (PostgreSQL) or clients (XMPP) reach this node: sent when joining.
    pub fn advertise(&self) -> &Endpoint {
        match self {
            RoleConfig::Postgres(r) => &r.advertise,
            RoleConfig::Ejabberd(r) => &r.advertise,
        }
    }
}

/// The ejabberd role: the controller's configuration and the XMPP endpoint.
#[derive(Debug, Clone)]
pub struct EjabberdRole {
    pub controller: ControllerConfig,
    pub advertise: Endpoint,
}

/// The PostgreSQL role: the controller's configuration and the endpoint peers use.
#[derive(Debug, Clone)]
pub struct PostgresRole {
    pub pg: PgConfig,
    pub advertise: Endpoint,
}

impl PostgresRole {
    /// The controller configuration; `tls` (the agent's `[tls]` files) turns on TLS with
    /// certificate authentication for replication, `None` keeps it plaintext (`--dev`).
    pub fn pg_config(&self, tls: Option<&ha_pki::TlsFiles>) -> PgConfig {
        PgConfig {
            tls: tls.cloned(),
            ..self.pg.clone()
        }
    }
}

impl AgentConfig {
    /// Reads and validates `path`; `dev_flag` is the command line's `--dev`.
    pub fn load(path: &Path, dev_flag: bool) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, dev_flag)
    }

    /// Validates the text of a configuration file (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path, dev_flag: bool) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        let node = NodeId::new(file.node).map_err(|e| invalid(format!("node: {e}")))?;
        NodeId::new(file.group.clone()).map_err(|e| invalid(format!("group: {e}")))?;
        let tls = match file.tls {
            Some(t) => {
                absolute("tls.ca", &t.ca)?;
                absolute("tls.cert", &t.cert)?;
                absolute("tls.key", &t.key)?;
                Some(ha_pki::TlsFiles {
                    ca_bundle: t.ca,
                    cert: t.cert,
                    key: t.key,
                })
            }
            None if file.dev && dev_flag => None,
            None => {
                return Err(invalid(
                    "no [tls] section (plaintext gRPC): allowed only with `dev = true` and --dev",
                ));
            }
        };
        if file.monitors.is_empty() {
            return Err(invalid("monitors: list at least one monitor address"));
        }
        for m in &file.monitors {
            check_address(m)?;
        }
        absolute("state_dir", &file.state_dir)?;
        if let Some(t) = &file.join_token_file {
            absolute("join_token_file", t)?;
            if t.exists() {
                check_secret_mode(t)?;
            }
        }
        check_duration("report_interval", file.report_interval, 50, 60_000)?;
        if let Some(addr) = file.listen {
            if tls.is_none() {
                return Err(invalid(
                    "listen: the agent port is served with mutual TLS only: add the [tls] section",
                ));
            }
            if addr.port() == 0 {
                return Err(invalid("listen: the port must not be 0"));
            }
        }
        check_duration("rpc_timeout", file.rpc_timeout, 50, 60_000)?;
        let role = match file.role {
            RoleName::Postgres => {
                let pg = file
                    .postgres
                    .ok_or_else(|| invalid("role = \"postgres\" needs a [postgres] section"))?;
                let role = postgres_role(&node, pg)?;
                if tls.is_none() && !role.pg.clients.is_empty() {
                    return Err(invalid(
                        "postgres.clients: certificate logins need the [tls] section",
                    ));
                }
                RoleConfig::Postgres(role)
            }
            RoleName::Ejabberd if file.listen.is_some() => {
                return Err(invalid(
                    "listen: only a PostgreSQL node's agent serves the agent port",
                ));
            }
            RoleName::Ejabberd => {
                let e = file
                    .ejabberd
                    .ok_or_else(|| invalid("role = \"ejabberd\" needs an [ejabberd] section"))?;
                let role = ejabberd_role(e)?;
                if tls.is_none() && role.controller.sql_tls_dir.is_some() {
                    return Err(invalid(
                        "ejabberd.sql_tls_dir: ejabberd's TLS to PostgreSQL uses the node's certificate: add the [tls] section",
                    ));
                }
                RoleConfig::Ejabberd(role)
            }
        };
        Ok(Self {
            node,
            group: file.group,
            monitors: file.monitors,
            join_token_file: file.join_token_file,
            state_dir: file.state_dir,
            allow_drills: file.allow_drills,
            dev: file.dev,
            report_interval: file.report_interval,
            rpc_timeout: file.rpc_timeout,
            stop_postgres_on_shutdown: file.stop_postgres_on_shutdown,
            listen: file.listen,
            tls,
            role,
        })
    }
}

fn postgres_role(node: &NodeId, f: PostgresFile) -> Result<PostgresRole, ConfigError> {
    if f.port == 0 {
        return Err(invalid("postgres.port must not be 0"));
    }
    absolute("postgres.data_dir", &f.data_dir)?;
    absolute("postgres.socket_dir", &f.socket_dir)?;
    absolute("postgres.bin_dir", &f.bin_dir)?;
    if !f.bin_dir.join("postgres").is_file() {
        return Err(invalid(format!(
            "postgres.bin_dir: {} holds no `postgres` binary",
            f.bin_dir.display()
        )));
    }
    if f.data_dir.parent().is_none_or(|p| p == Path::new("/")) {
        return Err(invalid(
            "postgres.data_dir must not be / or directly under it",
        ));
    }
    if f.listen_addresses.is_empty() {
        return Err(invalid("postgres.listen_addresses must not be empty"));
    }
    if f.advertise_host.is_empty() {
        return Err(invalid("postgres.advertise_host must not be empty"));
    }
    match nix::unistd::User::from_name(&f.os_user) {
        Ok(Some(_)) => {}
        Ok(None) | Err(_) => {
            return Err(invalid(format!(
                "postgres.os_user: no OS user {:?}",
                f.os_user
            )));
        }
    }
    let mut pg = PgConfig::new(node.clone(), f.data_dir, f.port, f.socket_dir);
    pg.bin_dir = f.bin_dir;
    pg.listen_addresses = f.listen_addresses;
    pg.os_user = f.os_user;
    pg.replication.user = f.replication_user;
    if let Some(log) = f.log_file {
        absolute("postgres.log_file", &log)?;
        pg.log_file = log;
    }
    if let Some(t) = f.start_timeout {
        pg.start_timeout = t;
    }
    if let Some(t) = f.stop_timeout {
        pg.stop_timeout = t;
    }
    pg.extra_settings = f.settings;
    if let Some(t) = f.replication_timeout {
        pg.replication_timeout = t;
    }
    for (i, rule) in f.hba.into_iter().enumerate() {
        let conn_type = match rule.conn_type {
            HbaType::Local => HbaConnType::Local,
            HbaType::Host => HbaConnType::Host,
            HbaType::Hostssl => HbaConnType::HostSsl,
        };
        if conn_type != HbaConnType::Local && rule.address.is_none() {
            return Err(invalid(format!(
                "postgres.hba[{i}]: a TCP rule needs an address"
            )));
        }
        pg.hba.push(HbaRule {
            conn_type,
            database: rule.database,
            user: rule.user,
            address: rule.address,
            method: rule.method,
        });
    }
    for (i, c) in f.clients.into_iter().enumerate() {
        pg.clients
            .push(client(c).map_err(|e| invalid(format!("postgres.clients[{i}]: {e}")))?);
    }
    for (i, peer) in f.peers.into_iter().enumerate() {
        let node =
            NodeId::new(peer.node).map_err(|e| invalid(format!("postgres.peers[{i}]: {e}")))?;
        pg.peers.push(ReplicationPeer {
            node,
            address: peer.address,
        });
    }
    // Refuses here, before anything runs, what the controller would refuse at start (the
    // TLS rules are checked again there, once the material is known).
    pg.validate()
        .map_err(|e| invalid(format!("postgres: {e}")))?;
    Ok(PostgresRole {
        pg,
        advertise: Endpoint {
            host: f.advertise_host,
            port: f.port,
        },
    })
}

/// A certificate login, checked: a valid certificate name, a role and a database that are
/// not empty, and an address or network (a bare address admits that address only).
fn client(c: ClientFile) -> Result<CertClient, String> {
    ha_pki::identity::validate_name(&c.certificate).map_err(|e| format!("certificate: {e}"))?;
    if c.user.is_empty() || c.database.is_empty() {
        return Err("user and database must not be empty".into());
    }
    let (ip, prefix) = match c.address.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (c.address.as_str(), None),
    };
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| format!("address {:?} is not an IP address or network", c.address))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("address {:?}: bad prefix length", c.address))?,
    };
    Ok(CertClient {
        certificate: c.certificate,
        user: c.user,
        database: c.database,
        address: format!("{ip}/{prefix}"),
    })
}

fn ejabberd_role(f: EjabberdFile) -> Result<EjabberdRole, ConfigError> {
    absolute("ejabberd.config_file", &f.config_file)?;
    absolute("ejabberd.cookie_home", &f.cookie_home)?;
    absolute("ejabberd.erl_call", &f.erl_call)?;
    if let Some(dir) = &f.sql_tls_dir {
        absolute("ejabberd.sql_tls_dir", dir)?;
    }
    if !f.erl_call.is_file() {
        return Err(invalid(format!(
            "ejabberd.erl_call: {} does not exist (Debian: erlang-base)",
            f.erl_call.display()
        )));
    }
    // The cookie is the cluster's only credential over Erlang distribution: like the token,
    // it must be readable by its owner only.
    let cookie = f.cookie_home.join(".erlang.cookie");
    if cookie.exists() {
        check_secret_mode(&cookie)?;
    }
    if !f.erlang_node.contains('@') {
        return Err(invalid(format!(
            "ejabberd.erlang_node: {:?} is not name@host",
            f.erlang_node
        )));
    }
    if f.advertise_host.is_empty() || f.xmpp_port == 0 {
        return Err(invalid(
            "ejabberd.advertise_host must not be empty and ejabberd.xmpp_port not 0",
        ));
    }
    for (key, d) in [
        ("ejabberd.erl_timeout", f.erl_timeout),
        ("ejabberd.db_connect_timeout", f.db_connect_timeout),
        ("ejabberd.verify_timeout", f.verify_timeout),
        (
            "ejabberd.old_connections_timeout",
            f.old_connections_timeout,
        ),
        ("ejabberd.sql_check_interval", f.sql_check_interval),
    ] {
        check_duration(key, d, 100, 600_000)?;
    }
    let controller = ControllerConfig {
        config_path: f.config_file,
        node: ErlNode {
            erl_call: f.erl_call,
            node: f.erlang_node,
            cookie_home: f.cookie_home,
            epmd_port: f.epmd_port,
            timeout: f.erl_timeout,
        },
        vhosts: f.vhosts,
        db_connect_timeout: f.db_connect_timeout,
        verify_timeout: f.verify_timeout,
        old_connections_timeout: f.old_connections_timeout,
        sql_check_interval: f.sql_check_interval,
        sql_tls_dir: f.sql_tls_dir,
    };
    controller
        .validate()
        .map_err(|e| invalid(format!("ejabberd: {e}")))?;
    Ok(EjabberdRole {
        controller,
        advertise: Endpoint {
            host: f.advertise_host,
            port: f.xmpp_port,
        },
    })
}

fn absolute(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(invalid(format!(
            "{key}: {} must be an absolute path",
            path.display()
        )))
    }
}

fn check_duration(key: &str, d: Duration, min_ms: u64, max_ms: u64) -> Result<(), ConfigError> {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if (min_ms..=max_ms).contains(&ms) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{key}: {d:?} is outside {min_ms}ms..={max_ms}ms"
        )))
    }
}

/// `host:port` with a non-zero port (IPv6 hosts in brackets).
fn check_address(address: &str) -> Result<(), ConfigError> {
    let bad = || {
        invalid(format!(
            "monitors: {address:?} is not host:port (e.g. 10.0.0.5:7400)"
        ))
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains('/') {
        return Err(bad());
    }
    Ok(())
}

/// A secret file must not be readable or writable by group or others.
fn check_secret_mode(path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(format!(
            "{}: mode {mode:o} lets others read a secret; chmod 600 it",
            path.display()
        )));
    }
    Ok(())
}

/// Reads the join token from its file, checking its permissions first.
pub fn read_token(path: &Path) -> Result<String, ConfigError> {
    check_secret_mode(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid(format!(
            "{}: the join token file is empty",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"
role = "postgres"
node = "psql1"
group = "main"
monitors = ["127.0.0.1:7400", "[::1]:7401"]
join_token_file = "/etc/ha/join-token"
state_dir = "/var/lib/ha-agent"
dev = true
report_interval = "250ms"

[postgres]
data_dir = "/var/lib/ha/pg/data"
port = 5433
listen_addresses = ["127.0.0.1"]
advertise_host = "127.0.0.1"
socket_dir = "/run/ha"
start_timeout = "30s"
settings = { shared_buffers = "16MB" }
peers = [{ node = "psql2", address = "127.0.0.2" }]

[[postgres.hba]]
type = "host"
database = "replication"
user = "replicator"
address = "127.0.0.1/32"
method = "trust"
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("agent.toml"), true)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn good_config_maps_onto_the_controller() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node.as_str(), "psql1");
        assert_eq!(c.report_interval, Duration::from_millis(250));
        assert_eq!(c.rpc_timeout, Duration::from_secs(1));
        assert!(!c.allow_drills && !c.stop_postgres_on_shutdown);
        let RoleConfig::Postgres(pg) = &c.role else {
            panic!("a postgres role");
        };
        assert_eq!(c.role.kind(), NodeKind::Postgres);
        let p = pg.pg_config(None);
        assert_eq!(p.port, 5433);
        assert!(p.tls.is_none());
        assert_eq!(p.peers.len(), 1);
        assert_eq!(p.peers[0].node.as_str(), "psql2");
        let files = ha_pki::TlsFiles {
            ca_bundle: "/etc/ha/ca.pem".into(),
            cert: "/etc/ha/node.pem".into(),
            key: "/etc/ha/node.key".into(),
        };
        assert_eq!(pg.pg_config(Some(&files)).tls, Some(files));
        assert_eq!(p.start_timeout, Duration::from_secs(30));
        assert_eq!(p.extra_settings["shared_buffers"], "16MB");
        assert_eq!(
            p.hba.len(),
            2,
            "the local peer login plus the configured rule"
        );
        assert_eq!(pg.advertise.to_string(), "127.0.0.1:5433");
    }

    #[test]
    fn bad_configs_are_refused_with_a_clear_message() {
        let cases = [
            (
                GOOD.replace("node = \"psql1\"", "node = \"Psql 1\""),
                "node:",
            ),
            (
                GOOD.replace("report_interval", "report_intervall"),
                "unknown field",
            ),
            (GOOD.replace("\"250ms\"", "\"fast\""), "report_interval"),
            (GOOD.replace("\"127.0.0.2\"", "\"psql2\""), "address"),
            (GOOD.replace("\"250ms\"", "\"10ms\""), "outside"),
            (
                GOOD.replace(r#"["127.0.0.1:7400", "[::1]:7401"]"#, "[]"),
                "at least one",
            ),
            (GOOD.replace("127.0.0.1:7400", "127.0.0.1"), "host:port"),
            (
                GOOD.replace("/var/lib/ha-agent", "var/lib/ha-agent"),
                "absolute",
            ),
            (GOOD.replace("dev = true", "dev = false"), "--dev"),
            (GOOD.replace("port = 5433", "port = 0"), "port"),
            (
                GOOD.replace("advertise_host = \"127.0.0.1\"", "advertise_host = \"\""),
                "advertise_host",
            ),
            (
                GOOD.replace(
                    "socket_dir = \"/run/ha\"",
                    "socket_dir = \"/run/ha\"\nbin_dir = \"/nonexistent\"",
                ),
                "no `postgres` binary",
            ),
            (
                GOOD.replace(
                    "socket_dir = \"/run/ha\"",
                    "socket_dir = \"/run/ha\"\nos_user = \"no-such-user-x\"",
                ),
                "no OS user",
            ),
            (
                GOOD.replace("address = \"127.0.0.1/32\"\n", ""),
                "needs an address",
            ),
            (
                GOOD.replace("start_timeout", "start_timout"),
                "unknown field",
            ),
            // Keys the agent manages cannot be overridden through `settings`.
            (
                GOOD.replace("shared_buffers", "synchronous_commit"),
                "\"synchronous_commit\" is managed by the agent",
            ),
            (
                GOOD.replace("shared_buffers", "ssl_key_file"),
                "\"ssl_key_file\" is managed by the agent",
            ),
            (
                GOOD.replace(
                    "socket_dir = \"/run/ha\"",
                    "socket_dir = \"/run/ha\"\nreplication_timeout = \"100ms\"",
                ),
                "replication_timeout",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "expected {want:?} in {e:?}");
        }
        let no_section: String = GOOD.split("[postgres]").next().unwrap().to_owned();
        assert!(err(&no_section).contains("[postgres] section"));
        let flag_missing = AgentConfig::parse(GOOD, Path::new("a.toml"), false).unwrap_err();
        assert!(flag_missing.to_string().contains("--dev"));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let source = include_str!("config.rs");
        let example: String = source
            .lines()
            .skip_while(|l| *l != "//! ```toml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let c = parse(&example).unwrap();
        assert_eq!(c.monitors.len(), 3);
        assert_eq!(
            c.tls.unwrap().cert,
            std::path::PathBuf::from("/etc/ha/node.pem")
        );
        let RoleConfig::Postgres(pg) = &c.role else {
            panic!("a postgres role");
        };
        assert_eq!(pg.advertise.to_string(), "10.0.0.10:5432");
        assert_eq!(pg.pg.hba.len(), 2);
        assert_eq!(pg.pg.clients[0].address, "10.0.0.0/24");
    }

    #[test]
    fn certificate_clients_need_tls_and_are_checked() {
        let tls =
            "[tls]\nca = \"/etc/ha/ca.pem\"\ncert = \"/etc/ha/n.pem\"\nkey = \"/etc/ha/n.key\"\n";
        let with = |client: &str, secure: bool| {
            let text = GOOD.replace(
                "peers = [",
                &format!("clients = [{{ {client} }}]\npeers = ["),
            );
            if secure {
                format!("{}\n{tls}", text.replace("dev = true", ""))
            } else {
                text
            }
        };
        let ok = r#"certificate = "operator", user = "postgres", database = "postgres", address"#;
        let c = parse(&with(&format!("{ok} = \"10.0.0.7\""), true)).unwrap();
        let RoleConfig::Postgres(pg) = &c.role else {
            panic!("a postgres role");
        };
        assert_eq!(
            pg.pg.clients[0].address, "10.0.0.7/32",
            "a bare address admits itself"
        );
        assert!(err(&with(&format!("{ok} = \"10.0.0.0/24\""), false)).contains("need the [tls]"));
        for (client, want) in [
            (format!("{ok} = \"10.0.0.0/33\""), "prefix"),
            (format!("{ok} = \"fd00::/129\""), "prefix"),
            (format!("{ok} = \"e1server\""), "not an IP"),
            (
                r#"certificate = "Operator X", user = "postgres", database = "postgres", address = "10.0.0.1""#.into(),
                "certificate",
            ),
            (
                r#"certificate = "operator", user = "", database = "postgres", address = "10.0.0.1""#.into(),
                "must not be empty",
            ),
            (format!("{ok} = \"10.0.0.1\", method = \"trust\""), "unknown field"),
        ] {
            let e = err(&with(&client, true));
            assert!(e.contains(want), "{client}: expected {want:?} in {e:?}");
        }
    }

    #[test]
    fn a_tls_section_replaces_the_dev_switches() {
        let tls =
            "[tls]\nca = \"/etc/ha/ca.pem\"\ncert = \"/etc/ha/n.pem\"\nkey = \"/etc/ha/n.key\"\n";
        let secure = format!("{}\n{tls}", GOOD.replace("dev = true", ""));
        let c = AgentConfig::parse(&secure, Path::new("a.toml"), false).unwrap();
        assert_eq!(
            c.tls.unwrap().ca_bundle,
            std::path::PathBuf::from("/etc/ha/ca.pem")
        );
        let relative = secure.replace("/etc/ha/n.key", "n.key");
        let e = AgentConfig::parse(&relative, Path::new("a.toml"), false).unwrap_err();
        assert!(e.to_string().contains("tls.key"), "{e}");
    }

    #[test]
    fn token_file_permissions_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "secret-token\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            read_token(&path)
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
        let text = GOOD.replace("/etc/ha/join-token", path.to_str().unwrap());
        assert!(err(&text).contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&path).unwrap(), "secret-token");
        assert!(parse(&text).is_ok());
        std::fs::write(&path, "  \n").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("empty"));
    }
}
