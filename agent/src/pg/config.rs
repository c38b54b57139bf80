//! What the controller needs to know about its server, and the text it renders from it: the
//! managed include file (`postgresql.ha.conf`), `pg_hba.conf`, and libpq connection strings.
//!
//! Invariants: every value written into a PostgreSQL configuration file or a connection string
//! goes through one quoting function ([`guc_quote`], [`ConnInfo::render`]), so a node name or a
//! path can never inject a setting. Rendering is deterministic: the same inputs give the same
//! bytes, which lets the controller skip rewrites and reloads that would change nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use ha_proto::NodeId;
use ha_proto::types::Endpoint;

/// Name of the include file the agent owns inside the data directory.
pub const MANAGED_CONF: &str = "postgresql.ha.conf";

/// Custom setting recording whom a standby streams from, readable with `current_setting`.
pub const UPSTREAM_GUC: &str = "ha.upstream_node";

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

/// TLS parameters of an outgoing replication connection (libpq `sslmode`, `sslcert`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnTls {
    /// `require`, `verify-ca` or `verify-full`.
    pub mode: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub root_cert: PathBuf,
}

/// The role and transport this node uses to reach an upstream for streaming, base backups and
/// `pg_rewind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationAuth {
    /// A role with `REPLICATION` and the `pg_rewind` function grants (created by bootstrap).
    pub user: String,
    pub tls: Option<ConnTls>,
}

/// A structured libpq connection string; TLS parts are fields, not string surgery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: Option<String>,
    pub application_name: Option<String>,
    pub tls: Option<ConnTls>,
}

impl ConnInfo {
    /// Connection parameters for `auth` to `endpoint`.
    pub fn to(endpoint: &Endpoint, auth: &ReplicationAuth) -> Self {
        Self {
            host: endpoint.host.clone(),
            port: endpoint.port,
            user: auth.user.clone(),
            dbname: None,
            application_name: None,
            tls: auth.tls.clone(),
        }
    }

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
        match &self.tls {
            Some(tls) => {
                pairs.push(("sslmode", tls.mode.clone()));
                pairs.push(("sslcert", tls.cert.display().to_string()));
                pairs.push(("sslkey", tls.key.display().to_string()));
                pairs.push(("sslrootcert", tls.root_cert.display().to_string()));
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
    /// Trust for `user` over the unix socket: the agent's own connections.
    pub fn local_trust(user: &str) -> Self {
        Self {
            conn_type: HbaConnType::Local,
            database: "all".into(),
            user: user.into(),
            address: None,
            method: "trust".into(),
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
        let quote = |s: &str| {
            if s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                s.to_owned()
            } else {
                format!("\"{}\"", s.replace('"', ""))
            }
        };
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
            quote(&self.database),
            quote(&self.user),
            self.method
        )
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
    /// Crash restarts allowed within `window`; one more is refused.
    pub max_restarts: u32,
    pub window: Duration,
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
    pub hba: Vec<HbaRule>,
    pub sync_commit: SyncCommit,
    pub max_wal_senders: u32,
    pub max_replication_slots: u32,
    /// `wal_keep_size` in MiB. Besides sparing lagging standbys, it keeps a primary's own WAL
    /// back to the last checkpoint it shared with a standby, which `pg_rewind` must read after a
    /// failover; without it the old primary usually needs a full base backup.
    pub wal_keep_size_mb: u32,
    /// Further settings written into the managed file (e.g. `shared_buffers`).
    pub extra_settings: BTreeMap<String, String>,
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
    pub restart_limit: RestartLimit,
}

impl PgConfig {
    /// Defaults for PostgreSQL 15 from Debian's packages, running as `postgres`, replicating as
    /// `replicator`, with local trust for the agent's superuser and nothing else in `pg_hba`.
    pub fn new(node: NodeId, data_dir: PathBuf, port: u16, socket_dir: PathBuf) -> Self {
        let mut log_name = data_dir.file_name().unwrap_or_default().to_os_string();
        log_name.push(".log");
        Self {
            log_file: data_dir.with_file_name(log_name),
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
                tls: None,
            },
            hba: vec![HbaRule::local_trust("postgres")],
            sync_commit: SyncCommit::On,
            max_wal_senders: 10,
            max_replication_slots: 10,
            wal_keep_size_mb: 1024,
            extra_settings: BTreeMap::new(),
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(60),
            restart_limit: RestartLimit {
                max_restarts: 3,
                window: Duration::from_secs(600),
            },
        }
    }

    /// Connection string this node uses to stream from `upstream`.
    pub fn primary_conninfo(&self, upstream: &Upstream) -> ConnInfo {
        ConnInfo {
            application_name: Some(self.node.to_string()),
            ..ConnInfo::to(&upstream.endpoint, &self.replication)
        }
    }

    /// The text of [`MANAGED_CONF`] for `role`.
    pub fn render_managed(&self, role: &RoleSettings) -> String {
        let mut s: Vec<(&str, String)> = vec![
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
        ];
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

        let mut out = String::from(
            "# Managed by ha-agent: rewritten on every role change. Do not edit; put your own\n\
             # settings in postgresql.conf (this file is included last and wins).\n",
        );
        for (k, v) in &s {
            let _ = writeln!(out, "{k} = {v}");
        }
        for (k, v) in &self.extra_settings {
            let _ = writeln!(out, "{k} = {}", guc_quote(v));
        }
        out
    }
}

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
            tls: None,
        };
        assert_eq!(
            c.render(),
            r"host='10.0.0.1' port='5432' user='o\'brien' dbname='postgres' sslmode='disable'"
        );
        c.tls = Some(ConnTls {
            mode: "verify-full".into(),
            cert: "/etc/ha/node.crt".into(),
            key: "/etc/ha/node.key".into(),
            root_cert: "/etc/ha/ca.crt".into(),
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
             application_name=''psql-2'' sslmode=''disable'''\n"
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
        assert_eq!(c.log_file, PathBuf::from("/var/lib/ha/data.log"));
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
}
