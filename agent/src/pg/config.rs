//! What the controller needs to know about its server, and the text it renders from it: the
//! managed include file (`postgresql.ha.conf`), `pg_hba.conf`, `pg_ident.conf`, and libpq
//! connection strings.
//!
//! Invariants: every value written into a PostgreSQL configuration file or a connection string
//! goes through one quoting function ([`guc_quote`], [`ConnInfo::render`]), so a node name or a
//! path can never inject a setting. Rendering is deterministic: the same inputs give the same
//! bytes, which lets the controller skip rewrites and reloads that would change nothing. With
//! TLS configured ([`PgConfig::tls`]) every replication connection is TLS: outgoing connection
//! strings say `sslmode=verify-full` with the node's certificate and no password; `pg_hba.conf`
//! admits exactly the configured peers by address with `hostssl ... cert map=ha`, the `ha` ident
//! map names exactly those peers' certificate names, and [`PgConfig::validate`] refuses any
//! plaintext `host` replication rule. Without TLS the `ssl` setting is left to the user.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ha_pki::TlsFiles;
use ha_proto::NodeId;
use ha_proto::types::Endpoint;

use super::PgError;

/// Name of the include file the agent owns inside the data directory.
pub const MANAGED_CONF: &str = "postgresql.ha.conf";

/// Custom setting recording whom a standby streams from, readable with `current_setting`.
pub const UPSTREAM_GUC: &str = "ha.upstream_node";

/// The `pg_ident.conf` map that turns a peer's certificate name into the replication role.
pub const IDENT_MAP: &str = "ha";
/// The `pg_ident.conf` map of the superuser's local (unix socket, `peer`) logins: only the OS
/// users in [`LOCAL_OS_USERS`] and the server's own OS user may log in as the superuser.
pub const LOCAL_MAP: &str = "ha_local";
/// The OS users besides the server's own that may log in as the superuser over the socket: the
/// agent when it runs as root.
pub const LOCAL_OS_USERS: [&str; 1] = ["root"];

/// How the walsender-side `synchronous_commit` behaves while standbys are synchronous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncCommit {
    RemoteWrite,
    On,
    RemoteApply,
}

impl SyncCommit {
    fn as_str(self) -> &'static str {
        match self {
            SyncCommit::RemoteWrite => "remote_write",
            SyncCommit::On => "on",
            SyncCommit::RemoteApply => "remote_apply",
        }
    }
}

/// The role this node uses to reach an upstream for streaming, base backups and `pg_rewind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationAuth {
    /// A role with `REPLICATION` and the `pg_rewind` function grants (created by bootstrap).
    pub user: String,
}

/// A client that logs in with a certificate of the cluster CA: from `address` (CIDR), to
/// `database`, as `user`, which the certificate's name maps to through [`IDENT_MAP`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertClient {
    pub certificate: String,
    pub user: String,
    pub database: String,
    pub address: String,
}

/// Another PostgreSQL node of the group, allowed to stream, take base backups and rewind from
/// this one when TLS is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationPeer {
    /// Also the name in the peer's certificate (its common name), which the ident map checks.
    pub node: NodeId,
    /// The address its connections come from.
    pub address: IpAddr,
}

/// A structured libpq connection string; TLS parts are fields, not string surgery. It holds
/// paths, never secrets, so it may appear on a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: Option<String>,
    pub application_name: Option<String>,
    /// libpq's `connect_timeout` in seconds (its minimum is 2). `None`: wait as long as TCP.
    pub connect_timeout: Option<u32>,
    /// libpq's `tcp_user_timeout` in milliseconds: how long sent data (a SYN included) may stay
    /// unacknowledged before the kernel drops the connection. The WAL receiver connects with
    /// libpq's asynchronous calls, which ignore `connect_timeout`; without this an attempt
    /// whose SYN a cut link dropped waits for TCP's doubling retransmissions (1, 2, 4, 8, 16 s)
    /// and streams again up to 16 s after the link's return. `None`: the kernel's default.
    pub tcp_user_timeout_ms: Option<u32>,
    /// Client certificate, key and trusted CAs: `sslmode=verify-full` (the server's certificate
    /// must chain to the CA and name `host`). `None`: `sslmode=disable`.
    pub tls: Option<TlsFiles>,
}

impl ConnInfo {
    /// `key='value'` pairs separated by spaces, values quoted as libpq expects.
    pub fn render(&self) -> String {
        let mut pairs: Vec<(&str, String)> = vec![
            ("host", self.host.clone()),
            ("port", self.port.to_string()),
            ("user", self.user.clone()),
        ];
        if let Some(db) = &self.dbname {
            pairs.push(("dbname", db.clone()));
        }
        if let Some(app) = &self.application_name {
            pairs.push(("application_name", app.clone()));
        }
        if let Some(secs) = self.connect_timeout {
            pairs.push(("connect_timeout", secs.to_string()));
        }
        if let Some(ms) = self.tcp_user_timeout_ms {
            pairs.push(("tcp_user_timeout", ms.to_string()));
        }
        match &self.tls {
            Some(tls) => {
                pairs.push(("sslmode", "verify-full".to_owned()));
                pairs.push(("sslcert", tls.cert.display().to_string()));
                pairs.push(("sslkey", tls.key.display().to_string()));
                pairs.push(("sslrootcert", tls.ca_bundle.display().to_string()));
            }
            None => pairs.push(("sslmode", "disable".to_owned())),
        }
        pairs
            .iter()
            .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Which connection type a `pg_hba.conf` line matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaConnType {
    Local,
    Host,
    HostSsl,
}

/// One `pg_hba.conf` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbaRule {
    pub conn_type: HbaConnType,
    /// `all`, `replication`, or a database name.
    pub database: String,
    pub user: String,
    /// CIDR address; ignored for `Local`.
    pub address: Option<String>,
    /// `trust`, `scram-sha-256`, `cert`, ...
    pub method: String,
}

impl HbaRule {
    /// Trust for `user` over the unix socket: anyone who can reach the socket (tests only).
    pub fn local_trust(user: &str) -> Self {
        Self {
            conn_type: HbaConnType::Local,
            database: "all".into(),
            user: user.into(),
            address: None,
            method: "trust".into(),
        }
    }

    /// `user` over the unix socket for the OS users [`LOCAL_MAP`] names (`peer`: the kernel
    /// says who is connecting): the agent's own connections. Any other local user is refused,
    /// whatever the socket directory's mode.
    pub fn local_peer(user: &str) -> Self {
        Self {
            conn_type: HbaConnType::Local,
            database: "all".into(),
            user: user.into(),
            address: None,
            method: format!("peer map={LOCAL_MAP}"),
        }
    }

    /// `address` alone, as a CIDR network.
    pub fn single(address: IpAddr) -> String {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        format!("{address}/{prefix}")
    }

    /// Certificate authentication over TLS for `user` from `address` (CIDR), the certificate's
    /// name mapped through [`IDENT_MAP`].
    pub fn cert(database: &str, user: &str, address: &str) -> Self {
        Self {
            conn_type: HbaConnType::HostSsl,
            database: database.into(),
            user: user.into(),
            address: Some(address.into()),
            method: format!("cert map={IDENT_MAP}"),
        }
    }

    /// A TCP rule for `database` (`replication` for streaming and base backups).
    pub fn host(database: &str, user: &str, address: &str, method: &str) -> Self {
        Self {
            conn_type: HbaConnType::Host,
            database: database.into(),
            user: user.into(),
            address: Some(address.into()),
            method: method.into(),
        }
    }

    fn render(&self) -> String {
        let kind = match self.conn_type {
            HbaConnType::Local => "local",
            HbaConnType::Host => "host",
            HbaConnType::HostSsl => "hostssl",
        };
        let address = match (self.conn_type, &self.address) {
            (HbaConnType::Local, _) | (_, None) => String::new(),
            (_, Some(a)) => format!("{a} "),
        };
        format!(
            "{kind} {} {} {address}{}",
            quote_hba(&self.database),
            quote_hba(&self.user),
            self.method
        )
    }
}

/// Quotes a name for `pg_hba.conf` or `pg_ident.conf` (which cannot escape a double quote:
/// one is dropped, and node and role names never contain one).
fn quote_hba(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('"', ""))
    }
}

/// Renders the whole `pg_hba.conf` (PostgreSQL 15 has no include there, so the agent owns it).
pub fn render_hba(rules: &[HbaRule]) -> String {
    let mut out = String::from("# Managed by ha-agent: rewritten on every configuration step.\n");
    for rule in rules {
        out.push_str(&rule.render());
        out.push('\n');
    }
    out
}

/// Quorum synchronous replication: `quorum` of `standbys` must confirm each commit.
/// No standbys (or a zero quorum) means asynchronous replication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncConfig {
    pub standbys: Vec<NodeId>,
    pub quorum: u32,
}

impl SyncConfig {
    pub fn is_async(&self) -> bool {
        self.standbys.is_empty() || self.quorum == 0
    }

    /// The `synchronous_standby_names` value: `ANY k ("a", "b")`, or empty when asynchronous.
    pub fn standby_names(&self) -> String {
        if self.is_async() {
            return String::new();
        }
        let names: Vec<String> = self
            .standbys
            .iter()
            .map(|n| format!("\"{}\"", n.as_str()))
            .collect();
        format!("ANY {} ({})", self.quorum, names.join(", "))
    }
}

/// Whom a standby streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub node: NodeId,
    pub endpoint: Endpoint,
}

/// The role-dependent part of the managed settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleSettings {
    Primary(SyncConfig),
    /// A standby; `None` means replication is cut (no `primary_conninfo`).
    Standby(Option<Upstream>),
}

/// Restart policy after the postmaster died without being asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartLimit {
    /// Crash restarts allowed at once within `window`; beyond, one attempt per `retry_after`.
    pub max_restarts: u32,
    pub window: Duration,
    /// Past the limit, restarts are spaced this far apart instead of stopping for the rest of
    /// the window: a node whose cause was fixed (a bad setting, a full disk) comes back by
    /// itself within this bound, while a crash loop costs one attempt per bound.
    pub retry_after: Duration,
    /// A server that ran this long before it crashed was not in a crash loop: the crash count
    /// starts afresh (as the stand's supervisor and systemd's start limit do), so crashes
    /// spread over a long window never hold a healthy node back.
    pub stable_after: Duration,
}

/// Everything the controller needs to run one local PostgreSQL server.
#[derive(Debug, Clone)]
pub struct PgConfig {
    pub node: NodeId,
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Where the postmaster's stdout and stderr go (kept outside the data directory so base
    /// backups and rewinds neither copy nor delete it).
    pub log_file: PathBuf,
    pub port: u16,
    pub listen_addresses: Vec<String>,
    pub socket_dir: PathBuf,
    /// OS user PostgreSQL runs as; the agent switches to it when it runs as root.
    pub os_user: String,
    /// Superuser created by `initdb`, used by the agent over the unix socket.
    pub superuser: String,
    pub replication: ReplicationAuth,
    /// `pg_hba.conf` rules from the configuration (local trust for the agent by default). With
    /// TLS on, the rules for [`Self::peers`] are generated before these.
    pub hba: Vec<HbaRule>,
    /// The agent's TLS files (cluster CA bundle, node certificate with role postgres and the
    /// node's name, its key). `None`: plaintext replication (`--dev` configurations).
    pub tls: Option<TlsFiles>,
    /// Where the controller installs the copies of [`Self::tls`] that PostgreSQL reads (mode
    /// 0600, owned by `os_user`). Outside the data directory on purpose: a base backup would
    /// copy a primary's private key to every standby, `pg_rewind` would overwrite a node's
    /// copies with its source's, and wiping the data directory for a base backup would delete
    /// them.
    pub tls_dir: PathBuf,
    /// The other PostgreSQL nodes of the group: with TLS on, exactly these may replicate from
    /// this server (this node's own entry, if listed, is skipped).
    pub peers: Vec<ReplicationPeer>,
    /// Clients admitted by certificate (TLS only; the configuration refuses them without).
    pub clients: Vec<CertClient>,
    pub sync_commit: SyncCommit,
    pub max_wal_senders: u32,
    pub max_replication_slots: u32,
    /// `wal_keep_size` in MiB. Besides sparing lagging standbys, it keeps a primary's own WAL
    /// back to the last checkpoint it shared with a standby, which `pg_rewind` must read after a
    /// failover; without it the old primary usually needs a full base backup.
    pub wal_keep_size_mb: u32,
    /// Further settings written into the managed file (e.g. `shared_buffers`); a key the agent
    /// manages itself is refused by [`Self::validate`].
    pub extra_settings: BTreeMap<String, String>,
    /// `wal_sender_timeout` and `wal_receiver_timeout`: a replication connection that carries
    /// nothing this long is given up on both sides, so a cut link between a primary and its
    /// synchronous standby is noticed (and the monitors can switch synchronous replication
    /// off) within this bound instead of PostgreSQL's default minute, while commits wait.
    pub replication_timeout: Duration,
    /// `wal_retrieve_retry_interval`: how soon a standby tries its upstream again after a
    /// lost connection (PostgreSQL's default is 5 s).
    pub reconnect_interval: Duration,
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
    pub restart_limit: RestartLimit,
}

impl PgConfig {
    /// Defaults for PostgreSQL 15 from Debian's packages, running as `postgres`, replicating as
    /// `replicator`, with local trust for the agent's superuser and nothing else in `pg_hba`.
    /// The log file and the TLS directory sit next to the data directory (`<data>.log`,
    /// `<data>.tls`).
    pub fn new(node: NodeId, data_dir: PathBuf, port: u16, socket_dir: PathBuf) -> Self {
        let sibling = |suffix: &str| {
            let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
            name.push(suffix);
            data_dir.with_file_name(name)
        };
        Self {
            log_file: sibling(".log"),
            tls_dir: sibling(".tls"),
            node,
            bin_dir: PathBuf::from("/usr/lib/postgresql/15/bin"),
            data_dir,
            port,
            listen_addresses: vec!["localhost".into()],
            socket_dir,
            os_user: "postgres".into(),
            superuser: "postgres".into(),
            replication: ReplicationAuth {
                user: "replicator".into(),
            },
            hba: vec![HbaRule::local_peer("postgres")],
            tls: None,
            peers: Vec::new(),
            clients: Vec::new(),
            sync_commit: SyncCommit::On,
            max_wal_senders: 10,
            max_replication_slots: 10,
            wal_keep_size_mb: 1024,
            extra_settings: BTreeMap::new(),
            replication_timeout: Duration::from_secs(5),
            reconnect_interval: Duration::from_secs(1),
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(60),
            restart_limit: RestartLimit {
                max_restarts: 3,
                window: Duration::from_secs(600),
                retry_after: Duration::from_secs(30),
                stable_after: Duration::from_secs(60),
            },
        }
    }

    /// Refuses combinations that would weaken TLS: a plaintext `host` rule for replication next
    /// to TLS, or the TLS copies inside the data directory.
    pub fn validate(&self) -> Result<(), PgError> {
        // Written after the managed keys, a user setting would silently win over them (for
        // example `synchronous_commit = off` under a synchronous set, or a `primary_conninfo`
        // naming another upstream).
        let managed = self.managed_keys();
        if let Some(key) = self
            .extra_settings
            .keys()
            .find(|k| managed.contains(k.as_str()))
        {
            return Err(PgError::Config(format!(
                "setting {key:?} is managed by the agent and cannot be set in `settings` \
                 (managed: {})",
                managed.iter().copied().collect::<Vec<_>>().join(", ")
            )));
        }
        if self.replication_timeout < Duration::from_secs(1) {
            return Err(PgError::Config(format!(
                "replication_timeout {:?} is too short: at least 1s (keepalives go every half of it)",
                self.replication_timeout
            )));
        }
        if self.tls.is_none() {
            return Ok(());
        }
        // `all` does not match replication connections in pg_hba.conf; only this keyword does.
        if let Some(rule) = self
            .hba
            .iter()
            .find(|r| r.conn_type == HbaConnType::Host && r.database == "replication")
        {
            return Err(PgError::Config(format!(
                "TLS is on but pg_hba rule {:?} admits plaintext connections",
                rule.render()
            )));
        }
        if self.tls_dir.starts_with(&self.data_dir) {
            return Err(PgError::Config(format!(
                "the TLS directory {} must be outside the data directory",
                self.tls_dir.display()
            )));
        }
        Ok(())
    }

    /// The copies of [`Self::tls`] PostgreSQL reads (server side) and presents (client side).
    pub fn installed_tls(&self) -> Option<TlsFiles> {
        self.tls.as_ref().map(|_| TlsFiles {
            ca_bundle: self.tls_dir.join("ca.pem"),
            cert: self.tls_dir.join("node.crt"),
            key: self.tls_dir.join("node.key"),
        })
    }

    /// Replication connection parameters to `endpoint` (no database: add one for `pg_rewind`).
    pub fn conn_to(&self, endpoint: &Endpoint) -> ConnInfo {
        ConnInfo {
            host: endpoint.host.clone(),
            port: endpoint.port,
            user: self.replication.user.clone(),
            dbname: None,
            application_name: None,
            connect_timeout: None,
            tcp_user_timeout_ms: None,
            tls: self.installed_tls(),
        }
    }

    /// Connection string this node uses to stream from `upstream`.
    /// A connection attempt that hangs (its SYN dropped by a cut link) is given up after 2 s
    /// (`tcp_user_timeout`: the WAL receiver ignores `connect_timeout`), so the WAL receiver
    /// tries again `reconnect_interval` later and streams again within about 3 s of the
    /// link's return, instead of whenever TCP's own retransmissions land. On an established
    /// stream the same bound drops a connection whose data stays unacknowledged for 2 s; the
    /// receiver then reconnects at once, and `wal_receiver_timeout` (5 s) stays the bound for
    /// a silent one.
    pub fn primary_conninfo(&self, upstream: &Upstream) -> ConnInfo {
        ConnInfo {
            application_name: Some(self.node.to_string()),
            connect_timeout: Some(2),
            tcp_user_timeout_ms: Some(2000),
            ..self.conn_to(&upstream.endpoint)
        }
    }

    /// The peers that may connect: [`Self::peers`] without this node.
    fn other_peers(&self) -> impl Iterator<Item = &ReplicationPeer> {
        self.peers.iter().filter(|p| p.node != self.node)
    }

    /// Every `pg_hba.conf` rule: with TLS, certificate rules for each peer's address for
    /// streaming and base backups (`replication`) and for `pg_rewind`, which reads files
    /// through an ordinary session (`postgres`), and one for each certificate client; then the
    /// configured rules.
    pub fn hba_rules(&self) -> Vec<HbaRule> {
        let user = &self.replication.user;
        let mut rules = Vec::new();
        if self.tls.is_some() {
            for peer in self.other_peers() {
                let address = HbaRule::single(peer.address);
                rules.push(HbaRule::cert("replication", user, &address));
                rules.push(HbaRule::cert("postgres", user, &address));
            }
            for c in &self.clients {
                rules.push(HbaRule::cert(&c.database, &c.user, &c.address));
            }
        }
        rules.extend(self.hba.iter().cloned());
        rules
    }

    /// The whole `pg_ident.conf`: map [`LOCAL_MAP`] from the OS users allowed to log in as the
    /// superuser over the socket; with TLS, map [`IDENT_MAP`] from each peer's certificate name
    /// to the replication role, and from each certificate client's name to its role; literal
    /// names only (a name never starts with `/`, which would make it a regular expression).
    pub fn render_ident(&self) -> String {
        let mut out =
            String::from("# Managed by ha-agent: rewritten on every configuration step.\n");
        let superuser = quote_hba(&self.superuser);
        for os_user in LOCAL_OS_USERS
            .iter()
            .copied()
            .chain([self.os_user.as_str()])
        {
            let _ = writeln!(out, "{LOCAL_MAP} {} {superuser}", quote_hba(os_user));
        }
        if self.tls.is_some() {
            let peers = self
                .other_peers()
                .map(|p| (p.node.as_str(), self.replication.user.as_str()));
            let clients = self
                .clients
                .iter()
                .map(|c| (c.certificate.as_str(), c.user.as_str()));
            for (certificate, user) in peers.chain(clients) {
                let _ = writeln!(out, "{IDENT_MAP} {certificate} {}", quote_hba(user));
            }
        }
        out
    }

    /// The keys [`Self::render_managed`] writes, whatever the role (TLS keys always, so a
    /// configuration does not become invalid when TLS is turned on).
    fn managed_keys(&self) -> BTreeSet<&'static str> {
        let mut keys: BTreeSet<&'static str> = self
            .managed_settings(&RoleSettings::Standby(None))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        keys.extend(TLS_KEYS);
        keys
    }

    /// The text of [`MANAGED_CONF`] for `role`.
    pub fn render_managed(&self, role: &RoleSettings) -> String {
        let mut out = String::from(
            "# Managed by ha-agent: rewritten on every role change. Do not edit; put your own\n\
             # settings in postgresql.conf (this file is included last and wins).\n",
        );
        for (k, v) in &self.managed_settings(role) {
            let _ = writeln!(out, "{k} = {v}");
        }
        for (k, v) in &self.extra_settings {
            let _ = writeln!(out, "{k} = {}", guc_quote(v));
        }
        out
    }

    fn managed_settings(&self, role: &RoleSettings) -> Vec<(&'static str, String)> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut s: Vec<(&'static str, String)> = vec![
            (
                "listen_addresses",
                guc_quote(&self.listen_addresses.join(",")),
            ),
            ("port", self.port.to_string()),
            (
                "unix_socket_directories",
                guc_quote(&self.socket_dir.display().to_string()),
            ),
            ("cluster_name", guc_quote(self.node.as_str())),
            ("application_name", guc_quote(self.node.as_str())),
            ("wal_level", "replica".into()),
            ("max_wal_senders", self.max_wal_senders.to_string()),
            (
                "max_replication_slots",
                self.max_replication_slots.to_string(),
            ),
            (
                "wal_keep_size",
                guc_quote(&format!("{}MB", self.wal_keep_size_mb)),
            ),
            ("hot_standby", "on".into()),
            ("wal_log_hints", "on".into()),
            ("recovery_target_timeline", guc_quote("latest")),
            ("wal_sender_timeout", ms(self.replication_timeout)),
            ("wal_receiver_timeout", ms(self.replication_timeout)),
            ("wal_retrieve_retry_interval", ms(self.reconnect_interval)),
        ];
        if let Some(tls) = self.installed_tls() {
            let path = |p: &PathBuf| guc_quote(&p.display().to_string());
            let [on, cert, key, ca, min] = TLS_KEYS;
            s.push((on, "on".into()));
            s.push((cert, path(&tls.cert)));
            s.push((key, path(&tls.key)));
            // Client certificates (the `cert` rules) are verified against this bundle.
            s.push((ca, path(&tls.ca_bundle)));
            // PostgreSQL's default, pinned here because this file wins over a weaker value
            // in the user's postgresql.conf.
            s.push((min, guc_quote("TLSv1.2")));
        }
        // Without TLS nothing is written: the user's own `ssl` settings (for applications) stay.
        let (sync, upstream) = match role {
            RoleSettings::Primary(sync) => (sync.clone(), None),
            RoleSettings::Standby(up) => (SyncConfig::default(), up.as_ref()),
        };
        s.push((
            "synchronous_standby_names",
            guc_quote(&sync.standby_names()),
        ));
        let commit = if sync.is_async() {
            "local"
        } else {
            self.sync_commit.as_str()
        };
        s.push(("synchronous_commit", commit.into()));
        let (conninfo, slot, up_name) = match upstream {
            Some(up) => (
                self.primary_conninfo(up).render(),
                self.node.slot_name(),
                up.node.to_string(),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        s.push(("primary_conninfo", guc_quote(&conninfo)));
        s.push(("primary_slot_name", guc_quote(&slot)));
        s.push((UPSTREAM_GUC, guc_quote(&up_name)));
        s
    }
}

/// The TLS settings the managed file writes when the agent has TLS material, in the order
/// [`PgConfig::render_managed`] writes them.
const TLS_KEYS: [&str; 5] = [
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_ca_file",
    "ssl_min_protocol_version",
];

/// Quotes a value for `postgresql.conf`.
pub fn guc_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg() -> PgConfig {
        PgConfig::new(
            NodeId::new("psql-2").unwrap(),
            "/var/lib/ha/data".into(),
            5433,
            "/run/ha".into(),
        )
    }

    #[test]
    fn quorum_renders_any_k() {
        let sync = SyncConfig {
            standbys: vec![NodeId::new("a").unwrap(), NodeId::new("b-1").unwrap()],
            quorum: 1,
        };
        assert_eq!(sync.standby_names(), r#"ANY 1 ("a", "b-1")"#);
        assert!(SyncConfig::default().standby_names().is_empty());
        let zero = SyncConfig { quorum: 0, ..sync };
        assert!(zero.is_async());
    }

    #[test]
    fn conninfo_quotes_values_and_carries_tls() {
        let mut c = ConnInfo {
            host: "10.0.0.1".into(),
            port: 5432,
            user: "o'brien".into(),
            dbname: Some("postgres".into()),
            application_name: None,
            connect_timeout: None,
            tcp_user_timeout_ms: None,
            tls: None,
        };
        assert_eq!(
            c.render(),
            r"host='10.0.0.1' port='5432' user='o\'brien' dbname='postgres' sslmode='disable'"
        );
        c.tls = Some(TlsFiles {
            cert: "/etc/ha/node.crt".into(),
            key: "/etc/ha/node.key".into(),
            ca_bundle: "/etc/ha/ca.crt".into(),
        });
        assert!(c.render().ends_with(
            "sslmode='verify-full' sslcert='/etc/ha/node.crt' sslkey='/etc/ha/node.key' \
             sslrootcert='/etc/ha/ca.crt'"
        ));
    }

    #[test]
    fn managed_file_for_standby_and_primary() {
        let c = cfg();
        let up = Upstream {
            node: NodeId::new("psql1").unwrap(),
            endpoint: Endpoint {
                host: "127.0.0.1".into(),
                port: 5432,
            },
        };
        let standby = c.render_managed(&RoleSettings::Standby(Some(up)));
        assert!(
            standby.contains("primary_slot_name = 'ha_psql_2'\n"),
            "{standby}"
        );
        assert!(standby.contains(
            "primary_conninfo = 'host=''127.0.0.1'' port=''5432'' user=''replicator'' \
             application_name=''psql-2'' connect_timeout=''2'' tcp_user_timeout=''2000'' \
             sslmode=''disable'''\n"
        ));
        assert!(standby.contains("ha.upstream_node = 'psql1'\n"));
        assert!(standby.contains("synchronous_commit = local\n"));

        let sync = SyncConfig {
            standbys: vec![NodeId::new("a").unwrap()],
            quorum: 1,
        };
        let primary = c.render_managed(&RoleSettings::Primary(sync));
        assert!(primary.contains("primary_conninfo = ''\n"));
        assert!(primary.contains("synchronous_standby_names = 'ANY 1 (\"a\")'\n"));
        assert!(primary.contains("synchronous_commit = on\n"));
        assert!(primary.contains("wal_log_hints = on\n"));
        assert!(primary.contains("wal_keep_size = '1024MB'\n"));
        assert!(!primary.contains("ssl"), "{primary}");
        assert_eq!(c.log_file, PathBuf::from("/var/lib/ha/data.log"));
    }

    #[test]
    fn local_logins_are_the_agents_own() {
        let c = cfg();
        assert!(
            render_hba(&c.hba).contains("\nlocal all postgres peer map=ha_local\n"),
            "the superuser over the socket by peer authentication only"
        );
        let ident = c.render_ident();
        assert!(ident.contains("\nha_local root postgres\n"), "{ident}");
        assert!(ident.contains("\nha_local postgres postgres\n"), "{ident}");
        assert_eq!(ident.matches("ha_local").count(), 2, "nobody else: {ident}");
    }

    #[test]
    fn hba_rules_render() {
        let text = render_hba(&[
            HbaRule::local_trust("postgres"),
            HbaRule::host("replication", "replicator", "10.0.0.2/32", "scram-sha-256"),
        ]);
        assert!(text.contains("\nlocal all postgres trust\n"));
        assert!(text.contains("\nhost replication replicator 10.0.0.2/32 scram-sha-256\n"));
    }

    #[test]
    fn tls_renders_verify_full_cert_rules_and_an_exact_ident_map() {
        let mut c = cfg();
        c.tls = Some(TlsFiles {
            ca_bundle: "/etc/ha/ca.pem".into(),
            cert: "/etc/ha/node.pem".into(),
            key: "/etc/ha/node.key".into(),
        });
        let peer = |name: &str, ip: &str| ReplicationPeer {
            node: NodeId::new(name).unwrap(),
            address: ip.parse().unwrap(),
        };
        c.peers = vec![
            peer("psql-1", "10.0.0.10"),
            peer("psql-2", "10.0.0.11"),
            peer("psql-3", "fd00::12"),
        ];
        c.clients = vec![CertClient {
            certificate: "operator".into(),
            user: "postgres".into(),
            database: "postgres".into(),
            address: "10.0.1.0/24".into(),
        }];
        c.validate().unwrap();

        let up = Upstream {
            node: NodeId::new("psql-1").unwrap(),
            endpoint: Endpoint {
                host: "10.0.0.10".into(),
                port: 5432,
            },
        };
        let standby = c.render_managed(&RoleSettings::Standby(Some(up)));
        assert!(standby.contains("ssl = on\n"), "{standby}");
        assert!(standby.contains("ssl_cert_file = '/var/lib/ha/data.tls/node.crt'\n"));
        assert!(standby.contains("ssl_key_file = '/var/lib/ha/data.tls/node.key'\n"));
        assert!(standby.contains("ssl_ca_file = '/var/lib/ha/data.tls/ca.pem'\n"));
        assert!(standby.contains(
            "sslmode=''verify-full'' sslcert=''/var/lib/ha/data.tls/node.crt'' \
             sslkey=''/var/lib/ha/data.tls/node.key'' sslrootcert=''/var/lib/ha/data.tls/ca.pem'''"
        ));
        assert!(!standby.contains("password"));

        let hba = render_hba(&c.hba_rules());
        assert_eq!(
            hba.lines().skip(1).collect::<Vec<_>>(),
            [
                "hostssl replication replicator 10.0.0.10/32 cert map=ha",
                "hostssl postgres replicator 10.0.0.10/32 cert map=ha",
                "hostssl replication replicator fd00::12/128 cert map=ha",
                "hostssl postgres replicator fd00::12/128 cert map=ha",
                "hostssl postgres postgres 10.0.1.0/24 cert map=ha",
                "local all postgres peer map=ha_local",
            ],
            "this node (psql-2) gets no rule"
        );
        assert_eq!(
            c.render_ident().lines().skip(1).collect::<Vec<_>>(),
            [
                "ha_local root postgres",
                "ha_local postgres postgres",
                "ha psql-1 replicator",
                "ha psql-3 replicator",
                "ha operator postgres"
            ]
        );

        c.hba.push(HbaRule::host(
            "replication",
            "replicator",
            "10.0.0.0/8",
            "trust",
        ));
        assert!(matches!(c.validate(), Err(PgError::Config(_))));
        c.hba.pop();
        c.tls_dir = c.data_dir.join("tls");
        assert!(matches!(c.validate(), Err(PgError::Config(_))));

        // Without TLS: no generated rules, only the local logins in the map, the configured
        // rules as they are.
        let plain = cfg();
        assert_eq!(plain.hba_rules(), plain.hba);
        assert!(!plain.render_ident().contains("\nha "));
    }
}
