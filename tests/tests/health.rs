//! The health endpoints of the agent port, as a load balancer sees them: `curl` with an
//! `observer` certificate of the cluster CA against a live cluster (three monitors, two
//! PostgreSQL 15 nodes with their agents, mutual TLS everywhere).
//!
//! Shown: the codes of every endpoint on the primary and the standby (HTTP/1.1 and HTTP/2,
//! `GET` and HAProxy's default `OPTIONS`), refusals (no certificate, an unknown path, a bad
//! `lag`, `POST`, a monitor's `/metrics` without a certificate), the endpoints and the `/metrics`
//! of an agent and of the monitor leader following a switchover (time printed), and a primary that can
//! no longer renew its lease (monitors and its standby's agent gone, so no vouch either):
//! `/primary` turns 503 within the lease (time printed) and never answers 200 again once
//! PostgreSQL is fenced, while `/liveness` shows the agent itself still answers.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use ha_pki::{Role, TlsFiles};
use ha_tests::cluster::Cluster;

/// One request with `curl`, verifying the server against `lb`'s CA bundle and presenting
/// `lb`'s certificate when `with_cert`; `(status code, body)`, code 0 when no HTTP answer came.
fn request(
    lb: &TlsFiles,
    with_cert: bool,
    port: u16,
    method: &str,
    path: &str,
    http2: bool,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "3", "-o", "-", "-w", "\n%{http_code}"])
        .arg(if http2 { "--http2" } else { "--http1.1" })
        .args(["-X", method])
        .arg("--cacert")
        .arg(&lb.ca_bundle);
    if with_cert {
        cmd.arg("--cert").arg(&lb.cert).arg("--key").arg(&lb.key);
    }
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("running curl (scripts/install-deps.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `GET path` with the observer's certificate over HTTP/1.1.
fn get(lb: &TlsFiles, port: u16, path: &str) -> u16 {
    request(lb, true, port, "GET", path, false).0
}

/// The codes of /primary, /replica, /read-only, /health, /liveness.
fn codes(lb: &TlsFiles, port: u16) -> [u16; 5] {
    ["/primary", "/replica", "/read-only", "/health", "/liveness"].map(|p| get(lb, port, p))
}

/// The value of the sample `series` (name and labels exactly as exposed) in a `/metrics` page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `GET /metrics` from `host:port` with the observer's certificate: the page, which must be
/// answered 200.
fn scrape(lb: &TlsFiles, address: &str) -> String {
    let port: u16 = address.rsplit_once(':').unwrap().1.parse().unwrap();
    let (code, page) = request(lb, true, port, "GET", "/metrics", false);
    assert_eq!(code, 200, "/metrics of {address}: {page}");
    page
}

/// Polls until `cond` holds; the time it took.
async fn until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_metrics_follow_roles_a_switchover_and_a_lease_that_runs_out() {
    let mut c = Cluster::builder().postgres(2).agent_ports().start().await;
    c.wait_synchronous("psql1", Duration::from_secs(60)).await;
    let lb = c.pki().party("lb", Role::Observer, "lb");
    let p1 = c.node("psql1").agent_port.unwrap();
    let p2 = c.node("psql2").agent_port.unwrap();

    // Roles: the standby streams, so it is a replica at once.
    assert_eq!(codes(&lb, p1), [200, 503, 200, 200, 200], "primary psql1");
    until(
        "psql2 is a streaming replica",
        Duration::from_secs(10),
        || codes(&lb, p2) == [503, 200, 200, 200, 200],
    )
    .await;
    let (code, body) = request(&lb, true, p1, "GET", "/primary", false);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    eprintln!("GET /primary on psql1: {code} {body}");
    assert_eq!(
        (v["node"].as_str(), v["role"].as_str()),
        (Some("psql1"), Some("primary"))
    );
    assert!(
        v["lease_left_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{body}"
    );
    // HAProxy's default check method, HTTP/2, the lag bound.
    assert_eq!(request(&lb, true, p1, "OPTIONS", "/primary", false).0, 200);
    assert_eq!(request(&lb, true, p2, "OPTIONS", "/replica", true).0, 200);
    assert_eq!(get(&lb, p2, "/replica?lag=1GB"), 200);
    let (_, body) = request(&lb, true, p2, "GET", "/replica", false);
    eprintln!("GET /replica on psql2: {body}");

    // Refusals: no certificate, an unknown (mistyped) path, a bad lag, another method.
    let (code, _) = request(&lb, false, p1, "GET", "/primary", false);
    assert_eq!(code, 0, "a client without a certificate gets no answer");
    assert_eq!(get(&lb, p1, "/primry"), 404);
    let (code, body) = request(&lb, true, p2, "GET", "/replica?lag=lots", false);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("expected bytes"), "{body}");
    assert_eq!(request(&lb, true, p1, "POST", "/primary", false).0, 405);

    // Metrics of the agents and of the monitor leader, before the switchover.
    let leader = c.monitor_addrs()[usize::try_from(c.leader_id().await).unwrap() - 1].clone();
    let monitor_before = scrape(&lb, &leader);
    let agent_before = scrape(&lb, &format!("127.0.0.1:{p2}"));
    let primary_role = "ha_agent_postgres_role{role=\"primary\"}";
    let epoch = "ha_monitor_group_epoch{group=\"main\"}";
    let promoted = "ha_monitor_decisions_total{kind=\"promoted\"}";
    assert_eq!(
        sample(&agent_before, primary_role),
        Some(0.0),
        "{agent_before}"
    );
    assert_eq!(sample(&agent_before, "ha_agent_streaming"), Some(1.0));
    assert_eq!(sample(&monitor_before, "ha_monitor_raft_leader"), Some(1.0));
    assert_eq!(
        sample(
            &monitor_before,
            "ha_monitor_group_has_primary{group=\"main\"}"
        ),
        Some(1.0),
        "{monitor_before}"
    );
    assert!(
        sample(
            &monitor_before,
            "ha_monitor_proposals_total{result=\"committed\"}"
        )
        .is_some_and(|n| n > 0.0),
        "{monitor_before}"
    );
    // The monitor port admits joiners without a certificate, but not to its metrics.
    let port: u16 = leader.rsplit_once(':').unwrap().1.parse().unwrap();
    let (code, body) = request(&lb, false, port, "GET", "/metrics", false);
    assert_eq!(code, 403, "{body}");

    // A switchover: the endpoints follow.
    let t0 = Instant::now();
    c.switchover(Some("psql2"))
        .await
        .expect("switchover to psql2");
    until("psql2 answers /primary", Duration::from_secs(30), || {
        get(&lb, p2, "/primary") == 200
    })
    .await;
    let new_primary = t0.elapsed();
    until("psql1 answers /replica", Duration::from_secs(60), || {
        get(&lb, p1, "/replica") == 200
    })
    .await;
    let old_primary = t0.elapsed();
    eprintln!(
        "switchover: psql2 /primary 200 after {new_primary:?}, psql1 /replica 200 after {old_primary:?} (from the switchover call)"
    );
    assert_eq!(get(&lb, p1, "/primary"), 503);
    // The metrics moved with it.
    let agent_after = scrape(&lb, &format!("127.0.0.1:{p2}"));
    assert_eq!(
        sample(&agent_after, primary_role),
        Some(1.0),
        "{agent_after}"
    );
    assert_eq!(sample(&agent_after, "ha_agent_writable"), Some(1.0));
    assert!(
        sample(&agent_after, "ha_agent_lease_remaining_seconds").is_some_and(|s| s > 0.0),
        "{agent_after}"
    );
    let leader = c.monitor_addrs()[usize::try_from(c.leader_id().await).unwrap() - 1].clone();
    let monitor_after = scrape(&lb, &leader);
    assert_eq!(
        sample(&monitor_after, epoch),
        sample(&monitor_before, epoch).map(|e| e + 1.0),
        "{monitor_after}"
    );
    assert!(
        sample(&monitor_after, promoted).unwrap_or(0.0)
            > sample(&monitor_before, promoted).unwrap_or(0.0),
        "{monitor_after}"
    );
    // Every series the shipped alert rules and dashboard use is exposed.
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring");
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(docs.join(file)).unwrap();
        let names: std::collections::BTreeSet<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| t.starts_with("ha_agent_") || t.starts_with("ha_monitor_"))
            .collect();
        assert!(names.len() > 5, "{file}: {names:?}");
        for name in names {
            let exposed = [&agent_after, &monitor_after].iter().any(|page| {
                page.lines().any(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
            });
            assert!(
                exposed,
                "{file} uses {name}, which no /metrics page exposes"
            );
        }
    }
    eprintln!(
        "metrics: agent psql2 {} lines, monitor leader {} lines; epoch {:?} -> {:?}",
        agent_after.lines().count(),
        monitor_after.lines().count(),
        sample(&monitor_before, epoch),
        sample(&monitor_after, epoch)
    );

    // The primary can renew its lease no more: no monitor, and its standby's agent, which
    // would vouch for it, is gone. /primary turns 503 when the lease ends, before the fence.
    c.kill_agent("psql1");
    let t_cut = Instant::now();
    for id in 1..=3 {
        c.kill_monitor(id);
    }
    let to_503 = until("psql2 /primary turns 503", Duration::from_secs(15), || {
        get(&lb, p2, "/primary") == 503
    })
    .await;
    eprintln!("monitors and the voucher gone: psql2 /primary 503 after {to_503:?}");
    // The fence stops PostgreSQL (or leaves it read-only): either way no write is accepted.
    let t_fenced = Instant::now();
    loop {
        let writable = match c.session("psql2").await {
            Ok(s) => s
                .query_one("SHOW default_transaction_read_only", &[])
                .await
                .is_ok_and(|r| r.get::<_, String>(0) == "off"),
            Err(_) => false,
        };
        if !writable {
            break;
        }
        assert!(
            t_fenced.elapsed() < Duration::from_secs(15),
            "psql2 was not fenced after its lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("psql2 fenced {:?} after the cut", t_cut.elapsed());
    // Fenced: never primary again on its own; the agent itself still answers.
    for _ in 0..5 {
        let [primary, replica, read_only, _, liveness] = codes(&lb, p2);
        assert_eq!(
            (primary, replica, read_only, liveness),
            (503, 503, 503, 200)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
