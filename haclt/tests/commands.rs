//! Every operator command of the real `haclt` binary against a real cluster on loopback (the
//! `ha-tests` harness: three `ha-monitor`s, five `ha-agent`s driving PostgreSQL 15, mutual TLS
//! with an operator certificate). Effects are checked through `status --json` and
//! `events --json`; refusals through the exit code and the one-line reason on stderr:
//!
//! - `status --json` (and how long it takes: printed, median of 10), `events --json [--after]`,
//!   `events --node --count`, `--json` of a setting, a switchover and a membership change;
//! - `token create --json` for one node and address, `token revoke` (twice: the second is not
//!   found, 66), a token for a reserved name (64);
//! - a wrong monitor address (69), an unknown node (66, also as a switchover target), a bad
//!   setting or one out of range (64), an unknown flag (64, not clap's 2), a certificate of
//!   another CA and a CA bundle without the cluster's (77, each named), a switchover to a
//!   node with candidate priority 0 and a failover with no eligible standby (65), a wait that
//!   runs out (75);
//! - `node set` (both settings), `switchover --to`, `maintenance enable|disable`, `failover`,
//!   `node remove`, `monitor add` and `monitor remove`, each followed by the state it promised.

#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::{Duration, Instant};

use ha_pki::{Role, TlsFiles};
use ha_tests::cluster::Cluster;
use ha_tests::free_port;
use ha_tests::pki::Pki;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(90);

fn shown(args: &[&str], out: &Output) {
    eprintln!(
        "haclt {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs haclt, which must succeed; returns its stdout.
async fn ok(c: &Cluster, args: &[&str]) -> String {
    let out = c.haclt(args).await;
    shown(args, &out);
    assert_eq!(out.status.code(), Some(0), "haclt {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs haclt, which must fail with `code`, print nothing on stdout, and end its stderr (after
/// the progress lines of a waiting command) with one line naming `reason`.
async fn fails(c: &Cluster, args: &[&str], code: i32, reason: &str) {
    let out = c.haclt(args).await;
    shown(args, &out);
    assert_eq!(out.status.code(), Some(code), "haclt {args:?}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(last.contains(reason), "{last:?} names {reason:?}");
}

/// `status` with other TLS files than the operator's: refused with exit 77 and `reason`.
async fn refused_tls(c: &Cluster, files: &TlsFiles, reason: &str) {
    let args = ["status"];
    let out = c.haclt_as(files, &args).await;
    shown(&args, &out);
    assert_eq!(out.status.code(), Some(77), "{files:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains(reason), "{stderr:?} names {reason:?}");
}

/// `status --json`: exit 0, or 3 when the cluster is degraded (both print the whole answer).
async fn status(c: &Cluster) -> Value {
    let args = ["status", "--json"];
    let out = c.haclt(&args).await;
    shown(&args, &out);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "haclt status failed"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn node<'a>(s: &'a Value, name: &str) -> Option<&'a Value> {
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
}

fn monitors(s: &Value) -> &Vec<Value> {
    s["monitors"].as_array().unwrap()
}

fn epoch(s: &Value) -> u64 {
    s["groups"][0]["epoch"].as_u64().unwrap()
}

fn primary(s: &Value) -> String {
    s["groups"][0]["primary"].as_str().unwrap_or("").to_owned()
}

/// Polls `status --json` until `cond` holds.
async fn until(c: &Cluster, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + CONVERGE;
    loop {
        let s = status(c).await;
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < end,
            "{what}: not within {CONVERGE:?}\n{s:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn events(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_against_a_live_cluster() {
    let mut c = Cluster::builder().monitors(3).postgres(5).start().await;
    c.wait_synchronous("psql1", CONVERGE).await;

    // status: the documented schema, and how long one call takes.
    let s = status(&c).await;
    assert_eq!(primary(&s), "psql1");
    const NODES: [&str; 5] = ["psql1", "psql2", "psql3", "psql4", "psql5"];
    for name in NODES {
        let n = node(&s, name).unwrap();
        assert_eq!(n["kind"], "postgres");
        assert_eq!(n["healthy"], true, "{n}");
        assert!(n["epoch"].as_u64().unwrap() >= 1);
        assert!(n["goal"].is_string() && n["state"].is_string());
    }
    assert_eq!(node(&s, "psql1").unwrap()["state"], "primary");
    let members = monitors(&s);
    assert_eq!(members.len(), 3);
    assert_eq!(members.iter().filter(|m| m["leader"] == true).count(), 1);
    assert!(
        members
            .iter()
            .all(|m| m["id"].is_u64() && m["address"].is_string())
    );
    let mut took = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        ok(&c, &["status", "--json"]).await;
        took.push(t.elapsed());
    }
    took.sort();
    eprintln!(
        "haclt status --json (3 monitors, 5 nodes, process start to exit): median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );

    // events: one JSON object per line, sequence numbers rising, --after filters.
    let all = events(&ok(&c, &["events", "--json"]).await);
    assert!(all.iter().any(|e| e["kind"] == "goal"), "{all:?}");
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let last = seqs[seqs.len() - 1];
    let after = (last - 1).to_string();
    let tail = events(&ok(&c, &["events", "--json", "--after", &after]).await);
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0]["seq"], last);

    // Tokens: created once, revoked once.
    let t: Value = serde_json::from_str(
        &ok(
            &c,
            &[
                "token",
                "create",
                "--role",
                "postgres",
                "--node",
                "psql9",
                "--address",
                "10.0.0.9",
                "--ttl",
                "1h",
                "--json",
            ],
        )
        .await,
    )
    .unwrap();
    let id = t["token_id"].as_str().unwrap().to_owned();
    assert!(!t["token"].as_str().unwrap().is_empty());
    assert!(t["expires_at_unix_ms"].as_u64().unwrap() > 0);
    ok(&c, &["token", "revoke", &id]).await;
    fails(&c, &["token", "revoke", &id], 66, &id).await;
    fails(
        &c,
        &[
            "token",
            "create",
            "--role",
            "postgres",
            "--node",
            "replicator",
            "--address",
            "10.0.0.9",
        ],
        64,
        "reserved",
    )
    .await;

    // Refusals: nothing changes, each with its own exit code.
    fails(
        &c,
        &["--monitors", "127.0.0.1:1", "status"],
        69,
        "127.0.0.1:1",
    )
    .await;
    fails(&c, &["maintenance", "enable", "nosuch"], 66, "nosuch").await;
    fails(&c, &["switchover", "--to", "nosuch"], 66, "nosuch").await;
    fails(
        &c,
        &["node", "set", "psql3", "candidate-priority", "lots"],
        64,
        "lots",
    )
    .await;
    fails(
        &c,
        &["node", "set", "psql3", "candidate-priority", "1000"],
        64,
        "0 to 100",
    )
    .await;
    // A usage error is 64, as documented, not clap's 2.
    let out = c.haclt(&["status", "--no-such-flag"]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'--no-such-flag'"));
    // A certificate of another CA, or a bundle without the cluster's CA: named, exit 77.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = Pki::create(foreign_dir.path());
    let operator = c.pki().files("operator");
    let mut other = foreign.files("operator");
    foreign.issue(&other, Role::Operator, "operator");
    other.ca_bundle = operator.ca_bundle.clone();
    refused_tls(&c, &other, "refused this client's certificate").await;
    let mut untrusting = foreign.files("operator");
    foreign.write_bundle(&untrusting);
    untrusting.cert = operator.cert;
    untrusting.key = operator.key;
    refused_tls(&c, &untrusting, "does not trust the monitor's certificate").await;
    let priority = node(&s, "psql3").unwrap()["candidate_priority"]
        .as_u64()
        .unwrap()
        .to_string();
    ok(&c, &["node", "set", "psql3", "candidate-priority", "0"]).await;
    fails(
        &c,
        &["switchover", "--to", "psql3"],
        65,
        "candidate priority",
    )
    .await;
    for n in &NODES[1..] {
        ok(&c, &["node", "set", n, "candidate-priority", "0"]).await;
    }
    fails(&c, &["failover"], 65, "promot").await;
    let s = status(&c).await;
    assert_eq!(primary(&s), "psql1", "a refused request changed nothing");
    assert_eq!(node(&s, "psql2").unwrap()["candidate_priority"], 0);
    for n in &NODES[1..] {
        let set: Value = serde_json::from_str(
            &ok(
                &c,
                &["node", "set", n, "candidate-priority", &priority, "--json"],
            )
            .await,
        )
        .unwrap();
        assert!(set["committed_index"].as_u64().unwrap() > 0, "{set}");
        assert!(
            set["message"]
                .as_str()
                .unwrap()
                .contains("candidate_priority")
        );
    }
    // The events about one node (its settings among them), and the last one alone.
    let about = events(&ok(&c, &["events", "--json", "--node", "psql3"]).await);
    assert!(about.iter().all(|e| e["node"] == "psql3"), "{about:?}");
    assert!(
        about.iter().any(|e| e["kind"] == "node_settings"),
        "{about:?}"
    );
    let last = events(&ok(&c, &["events", "--json", "--node", "psql3", "--count", "1"]).await);
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0]["node"], "psql3");
    assert!(last[0]["seq"].as_u64() >= about.last().unwrap()["seq"].as_u64());

    // Switchover to a named node.
    let before = epoch(&s);
    let done: Value = serde_json::from_str(
        &ok(
            &c,
            &["--json", "switchover", "--to", "psql2", "--wait", "60s"],
        )
        .await,
    )
    .unwrap();
    assert!(done["done"].as_str().unwrap().contains("psql2"), "{done}");
    let s = status(&c).await;
    assert_eq!(primary(&s), "psql2");
    assert!(epoch(&s) > before);
    c.wait_synchronous("psql2", CONVERGE).await;

    // Maintenance on a standby: a wait that runs out (75) is not a refusal; then back.
    fails(
        &c,
        &["maintenance", "enable", "psql3", "--wait", "10ms"],
        75,
        "psql3",
    )
    .await;
    until(&c, "psql3 in maintenance", |s| {
        node(s, "psql3").is_some_and(|n| n["maintenance"] == true && n["state"] == "maintenance")
    })
    .await;
    ok(&c, &["maintenance", "disable", "psql3", "--wait", "60s"]).await;
    c.wait_converged("psql2", CONVERGE).await;

    // Operator failover: another node leads at a new epoch, the old primary rejoins.
    let before = epoch(&status(&c).await);
    ok(&c, &["failover", "--wait", "60s"]).await;
    let s = status(&c).await;
    let new = primary(&s);
    assert!(new != "psql2" && NODES.contains(&new.as_str()), "{new}");
    assert!(epoch(&s) > before);
    c.wait_converged(&new, CONVERGE).await;

    // Node settings show in the status; a removed node leaves the group.
    let standby = NODES
        .into_iter()
        .find(|&n| n != new && n != "psql2")
        .unwrap();
    ok(&c, &["node", "set", standby, "replication-quorum", "false"]).await;
    assert_eq!(
        node(&status(&c).await, standby).unwrap()["replication_quorum"],
        false
    );
    ok(&c, &["node", "remove", standby]).await;
    until(&c, "the removed node is gone or marked removed", |s| {
        node(s, standby).is_none_or(|n| n["goal"] == "removed")
    })
    .await;

    // Monitor membership: add a member that is not running yet (the majority still commits),
    // then remove it; then remove a running one, which stops.
    let spare_addr = format!("127.0.0.1:{}", free_port());
    let added: Value =
        serde_json::from_str(&ok(&c, &["monitor", "add", "4", &spare_addr, "--json"]).await)
            .unwrap();
    assert_eq!(
        added["members"].as_array().map(Vec::len),
        Some(4),
        "{added}"
    );
    let s = until(&c, "four members", |s| monitors(s).len() == 4).await;
    assert!(
        monitors(&s)
            .iter()
            .any(|m| m["id"] == 4 && m["address"] == spare_addr.as_str())
    );
    ok(&c, &["monitor", "remove", "4"]).await;
    let leader = c.leader_id().await;
    let other = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    ok(&c, &["monitor", "remove", &other.to_string()]).await;
    let exit = c.wait_monitor_exit(other).await;
    eprintln!("removed monitor {other} exited: {exit}");
    let s = until(&c, "two members", |s| monitors(s).len() == 2).await;
    assert!(monitors(&s).iter().all(|m| m["id"] != other));
    assert_eq!(primary(&s), new, "membership changes moved no primary");
}
