//! The health endpoints of the agent port, as a load balancer sees them: `curl` with an
//! `observer` certificate of the cluster CA against a live cluster (three monitors, two
//! PostgreSQL 15 nodes with their agents, mutual TLS everywhere).
//!
//! Shown: the codes of every endpoint on the primary and the standby (HTTP/1.1 and HTTP/2,
//! `GET` and HAProxy's default `OPTIONS`), refusals (no certificate, an unknown path, a bad
//! `lag`, `POST`), the endpoints following a switchover (time printed), and a primary that can
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
async fn endpoints_follow_roles_switchover_and_a_lease_that_runs_out() {
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
