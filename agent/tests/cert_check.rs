//! A node's certificate is checked before the agent uses it, against real processes: one
//! `ha-monitor`, a primary and its synchronous standby (each an `ha-agent` driving its own
//! PostgreSQL 15 as user `postgres`), all on mutual TLS from the cluster CA (the `ha-tests`
//! cluster harness; the agents join with a CSR).
//!
//! Each test replaces the standby's certificate and key with a bad pair (another CA's
//! certificate named like the node; an expired one of the cluster CA; one of the cluster CA for
//! another node), then either restarts the standby's agent (the operator's report: the agent
//! started on the bad files) or lets the running agent notice the change. In every case: the
//! copies installed for PostgreSQL stay byte-identical, a row written on the primary reaches
//! the standby, and `status` shows the reason in the standby's `last_error` (which needs the
//! agent to keep reporting over its last good certificate). After the expired case the files
//! are fixed and the error clears.
//!
//! Every process is started by the harness and ended by PID from its guards, even on failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use ha_agent::pg::PgConfig;
use ha_pki::{Ca, Role, TlsFiles, Validity};
use ha_proto::NodeId;
use ha_tests::ChildGuard;
use ha_tests::cluster::{Cluster, node};
use ha_tests::pki::LOOPBACK;
use tokio::time::Instant;

const STANDBY: &str = "psql2";
const WAIT: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// The standby's TLS copies for PostgreSQL, as the agent names them.
fn installed(cluster: &Cluster) -> TlsFiles {
    let n = cluster.node(STANDBY);
    let mut cfg = PgConfig::new(
        NodeId::new(STANDBY).unwrap(),
        n.data_dir.clone(),
        n.port,
        n.socket_dir.clone(),
    );
    cfg.tls = Some(cluster.pki().files(STANDBY));
    cfg.installed_tls().unwrap()
}

fn contents(files: &TlsFiles) -> [Vec<u8>; 3] {
    [&files.ca_bundle, &files.cert, &files.key].map(|p| std::fs::read(p).unwrap())
}

/// Writes a certificate `ca` issues for `name` (role postgres) over the standby's own files.
fn replace_standby_certificate(cluster: &Cluster, ca: &Ca, name: &str, validity: Validity) {
    let files = cluster.pki().files(STANDBY);
    let issued = ca
        .issue(name, Role::Postgres, &[LOOPBACK.to_owned()], validity)
        .unwrap();
    ha_pki::write_key_file(&files.key, issued.key_pem.as_bytes()).unwrap();
    ha_pki::write_public_file(&files.cert, issued.cert_pem.as_bytes()).unwrap();
}

fn standby_error(s: &ha_proto::v1::StatusResponse) -> String {
    node(s, STANDBY)
        .map(|n| n.last_error.clone())
        .unwrap_or_default()
}

/// A row written on the primary now reaches the standby.
async fn standby_replicates(cluster: &Cluster, tag: &str) {
    let primary = cluster.session("psql1").await.unwrap();
    primary
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS cert_check (v text); INSERT INTO cert_check VALUES ('{tag}')"
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(standby) = cluster.session(STANDBY).await
            && let Ok(Some(_)) = standby
                .query_opt("SELECT 1 FROM cert_check WHERE v = $1", &[&tag])
                .await
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "row {tag} written on psql1 did not reach {STANDBY} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replaces the standby's certificate (restarting its agent when `restart`) and checks that the
/// copies are kept, replication goes on and `status` shows an error containing `reason`.
/// Returns the cluster and the copies for more checks.
async fn refused_and_reported(
    bad: impl FnOnce(&Cluster),
    restart: bool,
    reason: &str,
) -> (Cluster, TlsFiles, [Vec<u8>; 3]) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut cluster = Cluster::builder().monitors(1).postgres(2).start().await;
    let copies = installed(&cluster);
    let before = contents(&copies);
    standby_replicates(&cluster, "before").await;

    if restart {
        let status = cluster.terminate_agent(STANDBY).await;
        assert!(status.success(), "agent exit: {status}");
        bad(&cluster);
        cluster.start_agent(STANDBY);
    } else {
        bad(&cluster);
    }
    let cert = cluster.pki().files(STANDBY).cert.display().to_string();
    let s = cluster
        .wait_for(&format!("{STANDBY} reports {reason:?}"), WAIT, |s| {
            let e = standby_error(s);
            e.contains(reason) && e.contains(&cert)
        })
        .await;
    println!("{STANDBY} last_error: {}", standby_error(&s));
    assert!(cluster.agent_running(STANDBY));
    // One clear line in the agent's log (the harness writes it as `<root>/psql2-agent.log`,
    // next to the node's directory), and at a restart the link's fallback.
    let log = cluster
        .node(STANDBY)
        .socket_dir
        .with_file_name(format!("{STANDBY}-agent.log"));
    let log = std::fs::read_to_string(log).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(reason) && l.contains("keeping the installed copy"))
        .collect();
    println!("{}", lines.join("\n"));
    assert!(
        !lines.is_empty(),
        "no warning naming {reason:?} in the log:\n{log}"
    );
    if restart {
        assert!(
            log.lines().any(
                |l| l.contains(reason) && l.contains("using the copy installed for PostgreSQL")
            ),
            "no fallback line in the log:\n{log}"
        );
    }
    assert_eq!(
        contents(&copies),
        before,
        "the copies installed for PostgreSQL are unchanged"
    );
    standby_replicates(&cluster, "after").await;
    assert_eq!(contents(&copies), before);
    (cluster, copies, before)
}

fn valid() -> Validity {
    Validity::starting_now(DAY).unwrap()
}

/// The operator's report: another CA's certificate named like the node, and the agent restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_ca_certificate_named_like_the_node_is_refused_at_agent_start() {
    let rogue = Ca::create("rogue-ca", Validity::starting_now(30 * DAY).unwrap()).unwrap();
    refused_and_reported(
        move |c| replace_standby_certificate(c, &rogue, STANDBY, valid()),
        true,
        "is not signed by the cluster CA in",
    )
    .await;
}

/// An expired certificate of the cluster CA, written while the agent runs; then a good one,
/// which is installed and clears the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_while_running_and_a_good_one_then_installed() {
    let now = SystemTime::now();
    let expired = Validity::new(now - 2 * DAY, now - DAY).unwrap();
    let (cluster, copies, _) = refused_and_reported(
        |c| replace_standby_certificate(c, c.pki().current(), STANDBY, expired),
        false,
        "has expired",
    )
    .await;

    let own = cluster.pki().files(STANDBY);
    cluster.pki().issue(&own, Role::Postgres, STANDBY);
    let cert = own.cert.display().to_string();
    cluster
        .wait_for("the error clears", WAIT, |s| {
            !standby_error(s).contains(&cert)
        })
        .await;
    assert_eq!(
        std::fs::read(&copies.cert).unwrap(),
        std::fs::read(&own.cert).unwrap(),
        "the good certificate is installed"
    );
    standby_replicates(&cluster, "fixed").await;
}

/// A certificate of the cluster CA for another node (the primary's name), and the agent
/// restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_node_is_refused_at_agent_start() {
    refused_and_reported(
        |c| replace_standby_certificate(c, c.pki().current(), "psql1", valid()),
        true,
        "is the certificate of postgres/psql1, not of postgres/psql2",
    )
    .await;
}

/// With no checked copy to use instead (nothing installed for PostgreSQL yet), an agent whose
/// certificate fails its check stops at start: one line naming the file and the reason, exit
/// 64 (without the check it would retry its join with the certificate forever: nothing listens
/// at the configured monitor address).
#[test]
fn a_refused_certificate_with_nothing_to_fall_back_on_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let ca_validity = Validity::starting_now(30 * DAY).unwrap();
    let ca = Ca::create("cluster-ca", ca_validity).unwrap();
    let rogue = Ca::create("rogue-ca", ca_validity).unwrap();
    let issued = rogue
        .issue("psql1", Role::Postgres, &[LOOPBACK.to_owned()], valid())
        .unwrap();
    let path = |name: &str| dir.path().join(name);
    ha_pki::write_public_file(&path("ca.pem"), ca.cert_pem().as_bytes()).unwrap();
    ha_pki::write_public_file(&path("node.pem"), issued.cert_pem.as_bytes()).unwrap();
    ha_pki::write_key_file(&path("node.key"), issued.key_pem.as_bytes()).unwrap();
    ha_pki::write_key_file(&path("token"), b"unused").unwrap();
    let config = path("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"role = "postgres"
node = "psql1"
group = "main"
monitors = ["127.0.0.1:1"]
join_token_file = "{dir}/token"
state_dir = "{dir}/state"
[tls]
ca = "{dir}/ca.pem"
cert = "{dir}/node.pem"
key = "{dir}/node.key"
[postgres]
data_dir = "{dir}/data"
port = 5432
advertise_host = "127.0.0.1"
socket_dir = "{dir}"
"#,
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let stderr_path = path("stderr");
    // Killed when dropped: an agent that does not stop (it retries the join) fails the test.
    let mut agent = ChildGuard::new(
        std::process::Command::new(env!("CARGO_BIN_EXE_ha-agent"))
            .arg("--config")
            .arg(&config)
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = agent.child().try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not stop: {}",
            std::fs::read_to_string(&stderr_path).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(status.code(), Some(64), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    let cert = path("node.pem").display().to_string();
    assert!(
        last.starts_with(&format!(
            "ha-agent: TLS: certificate {cert} is not signed by the cluster CA in "
        )),
        "{stderr}"
    );
}
