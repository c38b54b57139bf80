//! The ejabberd controller against the real thing: a private ejabberd 23.01 and two real
//! PostgreSQL 15 servers (run as `postgres`, loopback, free ports), the ejabberd schema
//! loaded into both. One scenario, in order, because each ejabberd start costs seconds on
//! this 2-core machine: move A -> B (timed), prove writes land in B and nothing is left on A,
//! keep an XMPP session across the move, refuse an older epoch, fail cleanly on a dead
//! target, move back B -> A; with a file broken by hand, a failed apply restores the last
//! good copy (not the broken file) and the next apply starts from that copy.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ha_agent::ejabberd::{
    ApplyReport, ControllerError, EjabberdController, PrivateInstance, Source,
};
use ha_proto::types::{Endpoint, Epoch};
use ha_tests::free_port;
use ha_tests::xmpp::XmppUser;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, chown};
use std::os::unix::process::CommandExt;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const SCHEMA: &str = "/usr/share/ejabberd/sql/pg.sql";
const DB: &str = "ejabberd-domain-local";
const VHOST: &str = "domain.local";
/// Bound on an XMPP login or ping.
const XMPP: Duration = Duration::from_secs(10);

/// A PostgreSQL 15 server in a tempdir, stopped (fast shutdown, by PID) on drop.
struct Pg {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Pg {
    fn start() -> Pg {
        let postgres = User::from_name("postgres").unwrap().unwrap();
        let dir = tempfile::Builder::new()
            .prefix("ha-ejb-pg-")
            .tempdir()
            .unwrap();
        chown(dir.path(), Some(postgres.uid), Some(postgres.gid)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let data = dir.path().join("data");
        let as_postgres = |program: &str| {
            let mut cmd = Command::new(Path::new(PG_BIN).join(program));
            cmd.uid(postgres.uid.as_raw())
                .gid(postgres.gid.as_raw())
                .current_dir(dir.path());
            cmd
        };
        let out = as_postgres("initdb")
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        chown(
            &dir.path().join("postgres.log"),
            Some(postgres.uid),
            Some(postgres.gid),
        )
        .unwrap();
        let child = as_postgres("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=60",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pg = Pg { dir, port, child };
        pg.wait_ready();
        pg.psql(
            "postgres",
            &["-c", "CREATE ROLE ejabberd LOGIN PASSWORD 'ejb-pw'"],
        );
        pg.psql(
            "postgres",
            &["-c", &format!("CREATE DATABASE \"{DB}\" OWNER ejabberd")],
        );
        pg.psql_as("ejabberd", DB, &["-q", "-f", SCHEMA]);
        pg
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn psql(&self, db: &str, args: &[&str]) -> String {
        self.psql_as("postgres", db, args)
    }

    fn psql_as(&self, user: &str, db: &str, args: &[&str]) -> String {
        let out = Command::new(Path::new(PG_BIN).join("psql"))
            .arg("-h")
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
            ])
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

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(Path::new(PG_BIN).join("pg_isready"))
                .arg("-h")
                .arg(self.socket_dir())
                .args(["-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success();
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres on {} not ready",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn count(&self, sql: &str) -> i64 {
        self.psql(DB, &["-c", sql]).parse().unwrap()
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    /// ejabberd's sessions on this server (the controller's own checks run as the same role
    /// but have ended by the time this is called).
    fn ejabberd_sessions(&self) -> i64 {
        self.count("SELECT count(*) FROM pg_stat_activity WHERE usename = 'ejabberd'")
    }

    fn users(&self, name: &str) -> i64 {
        self.count(&format!(
            "SELECT count(*) FROM users WHERE username = '{name}'"
        ))
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let _ = self.child.wait();
    }
}

fn ejabberd_yml(c2s: u16, pg: &Pg) -> String {
    format!(
        r#"### ejabberd configuration in the reference stand's layout
hosts:
  - {VHOST}

loglevel: info
default_db: sql

listen:
  -
    port: {c2s}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls_required: false

acl:
  admin:
    user: admin@{VHOST}

modules:
  mod_private: {{}}
  mod_ping: {{}}
  mod_admin_extra: {{}}

host_config:
  {VHOST}:
    sql_type: pgsql
    sql_server: 127.0.0.1   # psql1server
    sql_port: {port}
    sql_database: "{DB}"
    sql_username: ejabberd
    sql_password: 'ejb-pw'
    auth_method: [sql]
"#,
        port = pg.port
    )
}

fn print_report(label: &str, report: &ApplyReport) {
    println!(
        "{label}: first write on target after {:?}, total {:?}, file changed: {}",
        report.first_write, report.total, report.file_changed
    );
    for s in &report.steps {
        println!(
            "  {:<17} {:<13} {:?}",
            s.step.to_string(),
            s.vhost.as_deref().unwrap_or("-"),
            s.elapsed
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_moves_a_real_ejabberd_between_two_postgres_servers() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("ha_agent=info")
        .try_init();
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(Pg::start),
        tokio::task::spawn_blocking(Pg::start)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let c2s = free_port();
    let ejabberd = PrivateInstance::start(&ejabberd_yml(c2s, &a), free_port())
        .await
        .unwrap();
    let config_path = ejabberd.config_path();
    let controller =
        EjabberdController::new(ejabberd.controller_config(vec![VHOST.into()]), None).unwrap();

    let health = controller.health().await;
    assert!(health.running, "{health:?}");
    let members = controller.cluster_members().await.unwrap();
    assert_eq!(members, vec![ejabberd.node().node.clone()]);

    ejabberd
        .ctl(&["register", "alice", VHOST, "alice-pw"])
        .await
        .unwrap();
    assert_eq!(
        (a.users("alice"), b.users("alice")),
        (1, 0),
        "registration is stored in A"
    );
    assert!(
        a.ejabberd_sessions() > 0,
        "ejabberd's pool is connected to A"
    );
    let mut session = XmppUser::login(&format!("alice@{VHOST}"), "alice-pw", c2s, XMPP)
        .await
        .unwrap();
    let bound = session.bound_jid();
    session.ping(XMPP).await.unwrap();

    // A -> B.
    let report = controller.apply(&b.endpoint(), Epoch(2)).await.unwrap();
    print_report("A -> B", &report);
    assert!(report.file_changed);
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(
        text.contains(&format!(
            "    sql_server: 127.0.0.1   # psql1server\n    sql_port: {}\n",
            b.port
        )),
        "{text}"
    );
    let meta = std::fs::metadata(&config_path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640, "mode kept");
    assert_eq!(a.ejabberd_sessions(), 0, "no ejabberd connection left on A");
    assert!(
        b.ejabberd_sessions() > 0,
        "ejabberd's pool is connected to B"
    );

    session.ping(XMPP).await.unwrap();
    println!("XMPP session opened before the move still answers pings after it");

    // A user-level, uncached write goes to B and only B.
    ejabberd
        .ctl(&["register", "bob", VHOST, "bob-pw"])
        .await
        .unwrap();
    assert_eq!((a.users("bob"), b.users("bob")), (0, 1));
    ejabberd
        .ctl(&[
            "private_set",
            "alice",
            VHOST,
            "<q xmlns='ha:test'>after</q>",
        ])
        .await
        .unwrap();
    assert_eq!(
        b.count("SELECT count(*) FROM private_storage WHERE namespace = 'ha:test'"),
        1
    );
    assert_eq!(
        a.count("SELECT count(*) FROM private_storage WHERE namespace = 'ha:test'"),
        0
    );

    // An older epoch is refused and changes nothing.
    let before = std::fs::read(&config_path).unwrap();
    let stale = controller.apply(&a.endpoint(), Epoch(1)).await.unwrap_err();
    assert!(
        matches!(stale, ControllerError::StaleEpoch { .. }),
        "{stale}"
    );
    assert_eq!(std::fs::read(&config_path).unwrap(), before);

    // A dead target: clear error, the file stays the last good one, ejabberd stays on B.
    let dead = Endpoint {
        host: "127.0.0.1".into(),
        port: free_port(),
    };
    let err = controller.apply(&dead, Epoch(3)).await.unwrap_err();
    println!("dead target refused: {err}");
    assert!(
        matches!(err, ControllerError::TargetUnreachable { .. }),
        "{err}"
    );
    assert_eq!(std::fs::read(&config_path).unwrap(), before);
    ejabberd
        .ctl(&["register", "carol", VHOST, "carol-pw"])
        .await
        .unwrap();
    assert_eq!((a.users("carol"), b.users("carol")), (0, 1));
    assert_eq!(controller.applied().await.unwrap().epoch, Epoch(2));

    // B -> A with a newer epoch; the session survives a second move too.
    let report = controller.apply(&a.endpoint(), Epoch(4)).await.unwrap();
    print_report("B -> A", &report);
    assert_eq!(b.ejabberd_sessions(), 0, "no ejabberd connection left on B");
    session.ping(XMPP).await.unwrap();
    assert_eq!(
        (session.interruptions().await, session.bound_jid()),
        (0, bound),
        "the same XMPP session all along"
    );
    ejabberd
        .ctl(&["register", "dave", VHOST, "dave-pw"])
        .await
        .unwrap();
    assert_eq!((a.users("dave"), b.users("dave")), (1, 0));

    // A failure after the file was written (B takes only one ejabberd connection: ours, so
    // ejabberd's pool cannot connect) restores the last good file and points ejabberd back.
    b.psql(DB, &["-c", "ALTER ROLE ejabberd CONNECTION LIMIT 1"]);
    let good = std::fs::read(&config_path).unwrap();
    let mut short = ejabberd.controller_config(vec![VHOST.into()]);
    short.verify_timeout = Duration::from_secs(3);
    let impatient = EjabberdController::new(short, controller.applied().await).unwrap();
    let err = impatient.apply(&b.endpoint(), Epoch(5)).await.unwrap_err();
    println!("unusable target refused: {err}");
    assert!(
        matches!(err, ControllerError::VerifyTimeout { .. }),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&config_path).unwrap(),
        good,
        "last good file restored"
    );
    assert_eq!(impatient.applied().await.unwrap().epoch, Epoch(4));
    ejabberd
        .ctl(&["register", "erin", VHOST, "erin-pw"])
        .await
        .unwrap();
    assert_eq!(
        (a.users("erin"), b.users("erin")),
        (1, 0),
        "ejabberd is back on A"
    );
    b.psql(DB, &["-c", "ALTER ROLE ejabberd CONNECTION LIMIT -1"]);

    // Re-asserting the same epoch and target is idempotent.
    let again = controller.apply(&a.endpoint(), Epoch(4)).await.unwrap();
    assert!(!again.file_changed);
    print_report("re-assert", &again);

    // A file broken by hand (ejabberd refuses it) and a failing apply: the restore writes the
    // controller's last good copy, not the broken file.
    let good = std::fs::read_to_string(&config_path).unwrap();
    assert_eq!(controller.last_good().await.as_deref(), Some(good.as_str()));
    let broken = format!("{good}loglevel: not-a-level\n");
    std::fs::write(&config_path, &broken).unwrap();
    b.psql(DB, &["-c", "ALTER ROLE ejabberd CONNECTION LIMIT 1"]);
    let err = controller.apply(&b.endpoint(), Epoch(5)).await.unwrap_err();
    println!("unusable target with a broken file refused: {err}");
    assert!(
        matches!(err, ControllerError::VerifyTimeout { .. }),
        "the broken file was replaced and the good copy reached the verify step: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(&config_path).unwrap(),
        good,
        "the last good copy was restored, not the broken file"
    );
    b.psql(DB, &["-c", "ALTER ROLE ejabberd CONNECTION LIMIT -1"]);

    // The same broken file at the next epoch: the apply falls back to the good copy.
    std::fs::write(&config_path, &broken).unwrap();
    let report = controller.apply(&b.endpoint(), Epoch(6)).await.unwrap();
    print_report("A -> B over a broken file", &report);
    assert_eq!(report.source, Source::LastGood);
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(!text.contains("not-a-level"), "{text}");
    assert_eq!(controller.last_good().await.as_deref(), Some(text.as_str()));
    ejabberd
        .ctl(&["register", "frank", VHOST, "frank-pw"])
        .await
        .unwrap();
    assert_eq!((a.users("frank"), b.users("frank")), (0, 1));

    session.logout().await;
    ejabberd.stop().await;
}
