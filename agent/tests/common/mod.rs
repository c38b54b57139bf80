//! What the ejabberd end-to-end tests share: the ejabberd configuration they run, the database
//! ejabberd uses (role, database, Debian's schema) on the first primary, and an `ha-agent` in
//! the ejabberd role driving one private ejabberd node, ended by PID when dropped (its log is
//! printed when the test fails).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use ha_agent::ejabberd::PrivateInstance;
use ha_proto::v1;
use ha_tests::ChildGuard;
use ha_tests::bins::binaries;
use ha_tests::cluster::{Cluster, ClusterBuilder, node};

pub const SCHEMA: &str = "/usr/share/ejabberd/sql/pg.sql";
pub const DB: &str = "ejabberd-domain-local";
pub const VHOST: &str = "domain.local";

/// A cluster builder whose PostgreSQL nodes admit ejabberd's role from loopback.
pub fn cluster_for_ejabberd() -> ClusterBuilder {
    Cluster::builder().monitors(1).postgres(2).hba(&format!(
        "{{ type = \"host\", database = \"{DB}\", user = \"ejabberd\", address = \"127.0.0.1/32\", method = \"scram-sha-256\" }}"
    ))
}

/// `ejabberd.yml` for one node: c2s on `c2s`, the vhost's SQL on `sql_port`, message archive
/// (every chat message is an SQL write) and offline storage in SQL.
pub fn ejabberd_yml(c2s: u16, sql_port: u16) -> String {
    format!(
        r#"hosts:
  - {VHOST}
loglevel: info
default_db: sql
listen:
  -
    port: {c2s}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls_required: false
modules:
  mod_private: {{}}
  mod_admin_extra: {{}}
  mod_offline: {{}}
  mod_mam:
    default: always
host_config:
  {VHOST}:
    sql_type: pgsql
    sql_server: 127.0.0.1
    sql_port: {sql_port}
    sql_database: "{DB}"
    sql_username: ejabberd
    sql_password: 'ejb-pw'
    auth_method: [sql]
"#
    )
}

/// `psql` as `postgres` on `name`'s server, database `db`; returns the trimmed output.
pub fn psql(cluster: &Cluster, name: &str, db: &str, args: &[&str]) -> String {
    let n = cluster.node(name);
    let out = Command::new("/usr/lib/postgresql/15/bin/psql")
        .arg("-h")
        .arg(&n.socket_dir)
        .args(["-p", &n.port.to_string(), "-U", "postgres", "-d", db])
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// How many users named `user` ejabberd's database on `name` holds.
#[allow(dead_code)] // not every test binary counts users
pub fn users(cluster: &Cluster, name: &str, user: &str) -> String {
    psql(
        cluster,
        name,
        DB,
        &[
            "-c",
            &format!("SELECT count(*) FROM users WHERE username = '{user}'"),
        ],
    )
}

/// ejabberd's role, database and schema on `primary` (standbys get them by replication).
pub fn prepare_database(cluster: &Cluster, primary: &str) {
    psql(
        cluster,
        primary,
        "postgres",
        &[
            "-c",
            "CREATE ROLE ejabberd LOGIN PASSWORD 'ejb-pw'",
            "-c",
            &format!("CREATE DATABASE \"{DB}\" OWNER ejabberd"),
        ],
    );
    psql(
        cluster,
        primary,
        DB,
        &["-c", "SET ROLE ejabberd", "-q", "-f", SCHEMA],
    );
}

/// The ejabberd node `name`'s applied (node, epoch) and error in a status (empty before it
/// joined).
pub fn applied(s: &v1::StatusResponse, name: &str) -> (String, u64, String) {
    let Some(n) = node(s, name) else {
        return (String::new(), 0, String::new());
    };
    let e = n.ejabberd.clone().unwrap_or_default();
    (e.applied_node, e.applied_epoch, n.last_error.clone())
}

pub fn epoch(s: &v1::StatusResponse) -> u64 {
    s.groups.first().map_or(0, |g| g.epoch)
}

/// An `ha-agent` in the ejabberd role for `instance`, joined as `name` with a token and a CSR
/// (mutual TLS like every agent of the cluster).
pub struct EjabberdAgent {
    _process: ChildGuard,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl EjabberdAgent {
    pub async fn start(
        cluster: &Cluster,
        name: &str,
        instance: &PrivateInstance,
        c2s: u16,
    ) -> Self {
        let erl = instance.node();
        let dir = tempfile::tempdir().unwrap();
        let token = cluster.join_token(name, v1::NodeKind::Ejabberd).await;
        let security = cluster.agent_security(name);
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"role = "ejabberd"
node = "{name}"
group = "main"
monitors = {monitors:?}
join_token_file = "{token}"
state_dir = "{state}"
{security}
[ejabberd]
config_file = "{file}"
erlang_node = "{erl_node}"
cookie_home = "{cookie}"
{epmd}vhosts = ["{VHOST}"]
advertise_host = "127.0.0.1"
xmpp_port = {c2s}
"#,
                monitors = cluster.monitor_addrs(),
                token = token.display(),
                state = dir.path().join("state").display(),
                security = security.toml,
                file = instance.config_path().display(),
                erl_node = erl.node,
                cookie = erl.cookie_home.display(),
                epmd = erl
                    .epmd_port
                    .map(|p| format!("epmd_port = {p}\n"))
                    .unwrap_or_default(),
            ),
        )
        .unwrap();
        let log = dir.path().join(format!("{name}-agent.log"));
        let process = ChildGuard::new(
            Command::new(&binaries().agent)
                .arg("--config")
                .arg(&config)
                .args(&security.args)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        Self {
            _process: process,
            log,
            _dir: dir,
        }
    }
}

impl EjabberdAgent {
    /// The agent's PID (to stop it with SIGSTOP for a while).
    #[allow(dead_code)] // not every test binary stops its agent
    pub fn pid(&self) -> i32 {
        i32::try_from(self._process.id()).unwrap()
    }
}

impl Drop for EjabberdAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("===== {} =====\n{text}", self.log.display());
        }
    }
}
