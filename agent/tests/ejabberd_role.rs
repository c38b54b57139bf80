//! The ejabberd role of `ha-agent` end to end, with real processes: one `ha-monitor`, two
//! PostgreSQL nodes with their agents (the `ha-tests` harness), a private ejabberd 23.01 whose
//! SQL backend is the primary, and an `ha-agent` in the ejabberd role driving it.
//!
//! 1. The ejabberd agent joins, follows the primary (psql1) and reports the applied target;
//!    a user registered through ejabberd lands on psql1.
//! 2. kill -9 of psql1's postmaster and agent: psql2 is promoted, the ejabberd agent applies
//!    the new epoch, status shows psql2 as the applied target, and a user registered through
//!    ejabberd afterwards lands on psql2 (an uncached write). The time from status showing
//!    psql2 writable to status showing the target applied is printed (both seen by polling).
//! 3. ejabberd refuses its next reload (a broken option added to its file): after a switchover
//!    the agent reports the error in status, ejabberd stays on the old target with the file
//!    as it was; once the file is fixed the agent's retry applies the new epoch.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ha_agent::ejabberd::{PrivateInstance, free_loopback_port};
use ha_proto::v1;
use ha_tests::ChildGuard;
use ha_tests::bins::binaries;
use ha_tests::cluster::{Cluster, node, primary_of};
use tokio::time::Instant;

const SCHEMA: &str = "/usr/share/ejabberd/sql/pg.sql";
const DB: &str = "ejabberd-domain-local";
const VHOST: &str = "domain.local";
const CONVERGE: Duration = Duration::from_secs(90);

fn ejabberd_yml(c2s: u16, sql_port: u16) -> String {
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
fn psql(cluster: &Cluster, name: &str, db: &str, args: &[&str]) -> String {
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

fn users(cluster: &Cluster, name: &str, user: &str) -> String {
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

/// The ejabberd node's applied (node, epoch) and error in a status (empty before it joined).
fn applied(s: &v1::StatusResponse) -> (String, u64, String) {
    let Some(n) = node(s, "e1") else {
        return (String::new(), 0, String::new());
    };
    let e = n.ejabberd.clone().unwrap_or_default();
    (e.applied_node, e.applied_epoch, n.last_error.clone())
}

/// Prints the ejabberd agent's log when the test fails.
struct LogOnPanic(PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("===== {} =====\n{text}", self.0.display());
        }
    }
}

fn epoch(s: &v1::StatusResponse) -> u64 {
    s.groups.first().map_or(0, |g| g.epoch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ejabberd_agent_follows_the_primary_and_reports_a_refused_reload() {
    let mut cluster = Cluster::builder()
        .monitors(1)
        .postgres(2)
        .hba(&format!(
            "{{ type = \"host\", database = \"{DB}\", user = \"ejabberd\", address = \"127.0.0.1/32\", method = \"scram-sha-256\" }}"
        ))
        .start()
        .await;
    psql(
        &cluster,
        "psql1",
        "postgres",
        &[
            "-c",
            "CREATE ROLE ejabberd LOGIN PASSWORD 'ejb-pw'",
            "-c",
            &format!("CREATE DATABASE \"{DB}\" OWNER ejabberd"),
        ],
    );
    psql(
        &cluster,
        "psql1",
        DB,
        &["-c", "SET ROLE ejabberd", "-q", "-f", SCHEMA],
    );

    let c2s = free_loopback_port().unwrap();
    let instance = PrivateInstance::start(&ejabberd_yml(c2s, cluster.node("psql1").port))
        .await
        .unwrap();
    let erl = instance.node();
    let dir = tempfile::tempdir().unwrap();
    let token = cluster.join_token("e1", v1::NodeKind::Ejabberd).await;
    // Mutual TLS like every agent of the cluster: it joins with a CSR for its certificate.
    let security = cluster.agent_security("e1");
    let config = dir.path().join("e1.toml");
    std::fs::write(
        &config,
        format!(
            r#"role = "ejabberd"
node = "e1"
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
    let log = std::fs::File::create(dir.path().join("e1-agent.log")).unwrap();
    let _agent = ChildGuard::new(
        Command::new(&binaries().agent)
            .arg("--config")
            .arg(&config)
            .args(&security.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let _log = LogOnPanic(dir.path().join("e1-agent.log"));

    // 1. It follows psql1.
    let s = cluster
        .wait_for("e1 applied psql1", CONVERGE, |s| {
            let (n, e, _) = applied(s);
            n == "psql1" && e == epoch(s)
        })
        .await;
    let e1 = node(&s, "e1").unwrap();
    assert_eq!(e1.reached, i32::from(v1::GoalState::Follow));
    assert_eq!(
        e1.ejabberd
            .as_ref()
            .unwrap()
            .applied_target
            .as_ref()
            .unwrap()
            .port,
        u32::from(cluster.node("psql1").port)
    );
    instance
        .ctl(&["register", "alice", VHOST, "pw-a"])
        .await
        .unwrap();
    assert_eq!(users(&cluster, "psql1", "alice"), "1");

    // 2. kill -9 of the primary: the ejabberd agent moves ejabberd to psql2.
    let before = epoch(&cluster.status().await);
    cluster.crash("psql1");
    let s = cluster
        .wait_for("psql2 promoted and writable", CONVERGE, |s| {
            primary_of(s) == Some("psql2")
                && epoch(s) > before
                && node(s, "psql2").is_some_and(|n| {
                    n.reached == i32::from(v1::GoalState::Primary)
                        || n.reached == i32::from(v1::GoalState::Single)
                })
        })
        .await;
    let promoted_seen = Instant::now();
    let new_epoch = epoch(&s);
    cluster
        .wait_for("e1 applied psql2", CONVERGE, |s| {
            let (n, e, _) = applied(s);
            n == "psql2" && e == new_epoch
        })
        .await;
    println!(
        "ejabberd re-pointed {} ms after status showed psql2 writable",
        promoted_seen.elapsed().as_millis()
    );
    instance
        .ctl(&["register", "bob", VHOST, "pw-b"])
        .await
        .unwrap();
    assert_eq!(
        users(&cluster, "psql2", "bob"),
        "1",
        "bob is on the new primary"
    );
    assert_eq!(
        users(&cluster, "psql2", "alice"),
        "1",
        "alice survived the failover"
    );

    // 3. ejabberd refuses the next reload: the error reaches status, the file stays as it was.
    cluster.start_agent("psql1");
    cluster.wait_converged("psql2", CONVERGE).await;
    let path = instance.config_path();
    let good = std::fs::read_to_string(&path).unwrap();
    let broken = format!("{good}loglevel: not-a-level\n");
    std::fs::write(&path, &broken).unwrap();
    cluster.switchover(Some("psql1")).await.unwrap();
    let s = cluster
        .wait_for("e1 reports the refused reload", CONVERGE, |s| {
            let (n, _, error) = applied(s);
            primary_of(s) == Some("psql1") && n == "psql2" && !error.is_empty()
        })
        .await;
    let error = applied(&s).2;
    println!("reported error: {error}");
    assert!(error.contains("refused the new configuration"), "{error}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        broken,
        "the refused file was put back as it was"
    );
    std::fs::write(&path, &good).unwrap();
    let switched = epoch(&s);
    let s = cluster
        .wait_for("e1 applied psql1 after the fix", CONVERGE, |s| {
            let (n, e, error) = applied(s);
            n == "psql1" && e == switched && error.is_empty()
        })
        .await;
    assert_eq!(applied(&s).1, switched);
    instance.stop().await;
}
