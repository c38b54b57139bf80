//! `ha-agent` processes against a real `ha-monitor` (one monitor, `--dev`) and real PostgreSQL
//! 15 servers on loopback, started by the `ha-tests` cluster harness: the first node bootstraps
//! as primary, the second becomes its synchronous standby; then the primary's PostgreSQL and
//! its agent are killed with SIGKILL while a writer commits rows, and the standby must be
//! promoted under a new epoch (persisted by its agent) with every acknowledged row. The time from
//! the kill to the first acknowledged write on the new primary is printed. Then the new
//! primary's agent is stopped with SIGTERM (PostgreSQL keeps serving), restarted (it adopts the
//! server and renews the lease), and the monitor is killed; the agent is restarted once more
//! with no monitor to answer it, and must still fence its primary once the lease granted to the
//! previous run has passed. A bad config file exits 64.
//!
//! Every process is started by the harness and ended by PID from its guards, even on failure;
//! on failure the harness prints the tail of every log.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use ha_agent::run::state::StateFile;
use ha_proto::v1;
use ha_tests::cluster::{Cluster, LEASE, group, node};
use ha_tests::drill;
use ha_tests::is_postgres;
use ha_tests::writer::Writer;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_standby_then_failover_after_primary_crash() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut cluster = Cluster::builder().monitors(1).postgres(2).start().await;
    let before = cluster.status().await;
    let epoch_before = group(&before).unwrap().epoch;
    let writer = Writer::start(cluster.addrs());
    writer
        .wait_ack_after(Instant::now(), Some("psql2"), Duration::from_secs(10))
        .await;

    let o = drill::crash_primary(&mut cluster, &writer).await;
    assert_eq!(
        (o.old_primary.as_str(), o.new_primary.as_str()),
        ("psql1", "psql2")
    );
    println!(
        "primary crash (kill -9 of PostgreSQL and agent) to first acknowledged write on the new primary: {:?}",
        o.fault_to_write
    );
    let log = writer.stop().await;
    drill::assert_nothing_lost(&cluster, &log, "psql2").await;
    let after = cluster.status().await;
    let epoch = group(&after).unwrap().epoch;
    assert!(
        epoch > epoch_before,
        "promotion carries a new epoch: {epoch_before} -> {epoch}"
    );
    let n = node(&after, "psql2").unwrap();
    assert_eq!(n.goal, i32::from(v1::GoalState::Primary), "{n:#?}");
    let persisted = StateFile::new(&cluster.node("psql2").state_dir)
        .load()
        .unwrap();
    assert_eq!(
        persisted.highest_epoch.get(),
        epoch,
        "the agent persisted the new epoch"
    );

    // SIGTERM: the agent stops reporting and exits cleanly, leaving PostgreSQL running.
    let pid = cluster.postmaster("psql2").unwrap();
    let status = cluster.terminate_agent("psql2").await;
    assert!(status.success(), "agent exit: {status}");
    assert!(
        is_postgres(pid),
        "PostgreSQL keeps running after the agent stops"
    );
    cluster
        .session("psql2")
        .await
        .unwrap()
        .execute("INSERT INTO ha_drill (id, node) VALUES (-1, 'psql2')", &[])
        .await
        .unwrap();

    // A restarted agent adopts the running server and renews its lease. The lease record is
    // removed first: the agent writes it again only when a report of the new run is answered
    // (the monitor's status alone could still show the previous run's last report).
    let record = cluster.node("psql2").state_dir.join("lease");
    std::fs::remove_file(&record).unwrap();
    cluster.start_agent("psql2");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !record.exists() {
        assert!(
            Instant::now() < deadline,
            "the restarted agent never had a report answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster
        .wait_for(
            "the restarted agent reports",
            Duration::from_secs(30),
            |s| {
                node(s, "psql2").is_some_and(|n| {
                    n.last_report_age_ms.is_some_and(|ms| ms < 400)
                        && n.reached == i32::from(v1::GoalState::Primary)
                })
            },
        )
        .await;
    assert_eq!(cluster.postmaster("psql2"), Some(pid));

    // Lease self-fencing across a restart: with the monitor gone, the agent is restarted and
    // can renew nothing, yet it stops PostgreSQL once the lease has passed since the previous
    // run's last answered report (sent at most ~0.5 s before the kill), and before the
    // monitor's lease + margin could allow a promotion.
    let lost = Instant::now();
    cluster.kill_monitor(1);
    let status = cluster.terminate_agent("psql2").await;
    assert!(status.success(), "agent exit: {status}");
    cluster.start_agent("psql2");
    let fence_deadline = lost + Duration::from_secs(10);
    while is_postgres(pid) {
        assert!(
            Instant::now() < fence_deadline,
            "the primary never fenced itself"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fenced = lost.elapsed();
    println!("monitor lost to primary stopped by its own agent: {fenced:?}");
    assert!(
        fenced >= LEASE - Duration::from_millis(1000) && fenced < LEASE + Duration::from_secs(1),
        "fenced after {fenced:?}: expected once the {LEASE:?} lease passed, before lease + margin"
    );
}

#[test]
fn a_bad_config_exits_64_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "role = \"postgres\"\nnode = \"Bad Name\"\n").unwrap();
    for args in [vec!["--dev"], vec![]] {
        let out = Command::new(env!("CARGO_BIN_EXE_ha-agent"))
            .arg("--config")
            .arg(&config)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("invalid configuration"), "{stderr}");
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_ha-agent"))
        .args(["--config", "/nonexistent/agent.toml", "--dev"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(64));
    assert!(
        dir.path().read_dir().unwrap().count() == 1,
        "nothing was created"
    );
}
