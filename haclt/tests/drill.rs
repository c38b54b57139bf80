//! `haclt drill` against a real cluster on loopback (the `ha-tests` harness: `ha-monitor`s and
//! `ha-agent`s driving real PostgreSQL 15 servers). psql1's agent allows drills, psql2's does not.
//! The writer's sessions are TLS with the operator certificate, which the agents map to the
//! `postgres` role (no other TCP rule admits `postgres`, so every drill proves it).
//!
//! 0. the writer as another role (`--db-user replicator`): refused by PostgreSQL before any
//!    fault, exit 1, nothing changes; a `--via-proxy` that leads to the standby: its writer
//!    cannot commit, exit 75 naming it, nothing changes;
//! 1. `drill switchover --json`: psql1 -> psql2, no acknowledged write lost, some unavailability;
//! 2. `drill crash-primary` aimed at psql2: its agent refuses (exit 65, `allow_drills` named),
//!    and nothing happens: same primary, same postmaster, agent still running;
//! 3. `drill switchover` back to psql1, then `drill crash-primary --json --via-uri`: psql1's
//!    agent kills its postmaster and itself with SIGKILL, psql2 is promoted, no acknowledged
//!    write lost, also not by the second writer on the `haclt show uri` URI, which found psql2
//!    by itself;
//! 4. psql1's agent restarted (as a supervisor would), back to psql1 by switchover, then
//!    `drill freeze-primary` for 500 ms, well inside failure detection (no failover, nothing
//!    lost), and `drill partition-primary` for longer than the lease (psql2 promoted, psql1
//!    returns as a standby). On
//!    loopback the partition cuts psql1's PostgreSQL port and its agent's monitor traffic.
//!
//! The harness ends every process by PID, even on failure, and then prints the tail of every log.

#![allow(clippy::unwrap_used)]

use std::os::unix::process::ExitStatusExt as _;
use std::process::Output;
use std::time::Duration;

use ha_tests::cluster::Cluster;
use ha_tests::is_postgres;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(90);

fn node<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Prints a drill's output (its figures are what the test is for) and returns it.
fn shown(args: &[&str], out: Output) -> Output {
    eprintln!(
        "haclt {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `haclt drill ARGS --json --wait 60s`, which must succeed; returns its JSON report.
async fn drill(cluster: &Cluster, args: &[&str]) -> Value {
    let mut all = vec!["drill"];
    all.extend_from_slice(args);
    all.extend(["--json", "--wait", "60s"]);
    let out = shown(&all, cluster.haclt(&all).await);
    assert_eq!(out.status.code(), Some(0), "haclt {all:?} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `haclt ARGS`, which must exit with `code`; returns its stderr.
async fn fails(cluster: &Cluster, args: &[&str], code: i32) -> String {
    let out = shown(args, cluster.haclt(args).await);
    assert_eq!(out.status.code(), Some(code), "haclt {args:?}");
    String::from_utf8(out.stderr).unwrap()
}

/// `haclt status --json`.
async fn status(cluster: &Cluster) -> Value {
    let out = cluster.haclt(&["status", "--json"]).await;
    // 3: answered, the cluster is degraded (a drill leaves the old primary rejoining).
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "haclt status: {out:?}"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_no_loss(report: &Value, scenario: &str, old: &str, new: &str) {
    assert_eq!(report["scenario"], scenario);
    assert_eq!(report["converged"], true);
    assert_eq!(report["lost_writes"], 0, "no acknowledged write lost");
    assert_eq!(report["old_primary"], old);
    assert_eq!(report["new_primary"], new);
    assert_ne!(report["old_primary"], report["new_primary"]);
    assert!(
        report["acknowledged_writes"].as_u64().unwrap() > 20,
        "{report}"
    );
    assert!(
        report["write_unavailable_ms"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(report["new_epoch"].as_u64() > report["old_epoch"].as_u64());
    assert_eq!(
        report["ejabberd"],
        Value::Array(vec![]),
        "no ejabberd node here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_refusal_crash_freeze_and_partition_drills() {
    let mut cluster = Cluster::builder()
        .monitors(1)
        .postgres(2)
        .drills_refused_by("psql2")
        .start()
        .await;

    // The operator certificate maps to `postgres` only.
    let args = [
        "drill",
        "switchover",
        "--db-user",
        "replicator",
        "--wait",
        "20s",
    ];
    // Refused by PostgreSQL.
    let stderr = fails(&cluster, &args, 1).await;
    assert!(
        stderr.contains("cannot prepare the drill table")
            && stderr.contains("certificate authentication failed"),
        "{stderr}"
    );
    let s = status(&cluster).await;
    assert_eq!(s["groups"][0]["primary"], "psql1", "no fault was injected");

    // A "proxy" that leads to the standby: its writer cannot commit, so the drill stops before
    // the fault (exit 75), naming it.
    let standby = format!("127.0.0.1:{}", cluster.node("psql2").port);
    let args = [
        "drill",
        "switchover",
        "--via-proxy",
        &standby,
        "--wait",
        "20s",
    ];
    let stderr = fails(&cluster, &args, 75).await;
    assert!(
        stderr.contains(&format!("through proxy {standby}")),
        "{stderr}"
    );
    let s = status(&cluster).await;
    assert_eq!(s["groups"][0]["primary"], "psql1", "no fault was injected");

    let report = drill(&cluster, &["switchover"]).await;
    assert_no_loss(&report, "switchover", "psql1", "psql2");
    cluster.wait_synchronous("psql2", CONVERGE).await;

    // psql2's agent does not allow drills: the order is refused and nothing happens.
    let postmaster = cluster
        .postmaster("psql2")
        .expect("psql2's postmaster runs");
    let args = ["drill", "crash-primary", "--json", "--wait", "20s"];
    // A refused drill exits 65.
    let stderr = fails(&cluster, &args, 65).await;
    assert!(
        stderr.contains("refused") && stderr.contains("allow_drills"),
        "{stderr}"
    );
    assert!(is_postgres(postmaster), "psql2's postmaster still runs");
    assert_eq!(cluster.postmaster("psql2"), Some(postmaster));
    assert!(cluster.agent_running("psql2"), "psql2's agent still runs");
    let s = status(&cluster).await;
    assert_eq!(s["groups"][0]["primary"], "psql2");
    assert_eq!(node(&s, "psql2")["healthy"], true);

    let report = drill(&cluster, &["switchover"]).await;
    assert_no_loss(&report, "switchover", "psql2", "psql1");
    cluster.wait_converged("psql1", CONVERGE).await;

    let postmaster = cluster
        .postmaster("psql1")
        .expect("psql1's postmaster runs");
    // With a second writer on the URI of `haclt show uri`: it finds the new primary by itself.
    let report = drill(&cluster, &["crash-primary", "--via-uri"]).await;
    assert_no_loss(&report, "crash-primary", "psql1", "psql2");
    let via = &report["via"][0];
    assert_eq!(via["via"], "uri", "{report}");
    assert_eq!(via["lost_writes"], 0, "{report}");
    assert!(
        via["acknowledged_writes"].as_u64().unwrap() > 20,
        "{report}"
    );
    assert!(
        via["write_unavailable_ms"].as_u64().unwrap() > 0,
        "{report}"
    );
    let exit = cluster.wait_agent_exit("psql1").await;
    assert_eq!(
        exit.signal(),
        Some(9),
        "psql1's agent killed itself: {exit}"
    );
    assert!(!is_postgres(postmaster), "psql1's postmaster was killed");

    // The restarted agent brings psql1 back as a standby; then psql1 leads again.
    cluster.start_agent("psql1");
    cluster.wait_converged("psql2", CONVERGE).await;
    let report = drill(&cluster, &["switchover"]).await;
    assert_no_loss(&report, "switchover", "psql2", "psql1");
    cluster.wait_converged("psql1", CONVERGE).await;

    // A freeze well inside failure detection (1.5 s without a report and a probe that times
    // out; a freeze of 1.5 s raced it and sometimes started a failover the thawed primary
    // then completed by obeying its fenced goal): PostgreSQL and the agent stop, then resume by
    // themselves; no failover, no write lost, the writes waited for the freeze.
    let postmaster = cluster
        .postmaster("psql1")
        .expect("psql1's postmaster runs");
    let report = drill(&cluster, &["freeze-primary", "--duration", "500ms"]).await;
    assert_eq!(report["lost_writes"], 0);
    assert_eq!(report["converged"], true);
    assert_eq!(
        report["new_primary"], "psql1",
        "no failover for a short freeze"
    );
    assert!(
        report["write_unavailable_ms"].as_u64().unwrap() >= 400,
        "{report}"
    );
    assert_eq!(cluster.postmaster("psql1"), Some(postmaster));
    assert!(cluster.agent_running("psql1"));

    // A partition longer than the lease (on loopback: psql1's PostgreSQL port, and its agent's
    // monitor traffic): psql2 is promoted, psql1 fences itself and returns as a standby after it.
    let report = drill(&cluster, &["partition-primary", "--duration", "6s"]).await;
    assert_eq!(report["lost_writes"], 0);
    assert_eq!(report["converged"], true);
    assert_eq!(
        report["new_primary"], "psql2",
        "the cut-off primary was replaced"
    );
    cluster.wait_converged("psql2", CONVERGE).await;
    let tables = tokio::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("ha_drill_psql1"),
        "the partition's table was removed after the drill"
    );
}

/// Three monitors and one primary: the monitor leader exits abruptly, another one leads, and
/// the primary keeps its role (a leader change is not a database failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_monitor_leader_fails_nothing_over() {
    let mut cluster = Cluster::builder().monitors(3).postgres(1).start().await;
    let leader = cluster.leader_id().await;
    let report = drill(&cluster, &["kill-monitor-leader"]).await;
    assert_eq!(report["lost_writes"], 0);
    assert_eq!(
        (
            report["old_primary"].as_str(),
            report["new_primary"].as_str()
        ),
        (Some("psql1"), Some("psql1"))
    );
    assert_eq!(report["old_epoch"], report["new_epoch"], "no failover");
    let dead = cluster.wait_monitor_exit(leader).await;
    assert!(!dead.success(), "the old leader died abruptly: {dead}");
    let new_leader = cluster.leader_id().await;
    assert_ne!(new_leader, leader);
}
