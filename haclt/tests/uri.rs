//! `haclt show uri` against a live cluster (the `ha-tests` harness: three monitors, three
//! PostgreSQL agents, mutual TLS), used by a real libpq client (`psql`) with the writer's
//! client certificate: the read-write URI reaches the primary, the standby URI a standby, and
//! after a crash of the primary the same read-write URI reaches the promoted node by itself.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_tests::cluster::{Cluster, WRITER_USER};

const CONVERGE: Duration = Duration::from_secs(90);

/// `haclt show uri ARGS` with the writer's TLS files; exit 0 and one line.
async fn show_uri(c: &Cluster, extra: &[&str]) -> String {
    let tls = c.writer_tls();
    let files = tls.files();
    let (ca, cert, key) = (
        files.ca_bundle.to_str().unwrap(),
        files.cert.to_str().unwrap(),
        files.key.to_str().unwrap(),
    );
    let mut args = vec![
        "show",
        "uri",
        "--user",
        WRITER_USER,
        "--sslrootcert",
        ca,
        "--sslcert",
        cert,
        "--sslkey",
        key,
    ];
    args.extend_from_slice(extra);
    let out = c.haclt(&args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "haclt {args:?}: {stderr}");
    let uri = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    println!("haclt show uri {extra:?}: {uri}");
    uri
}

/// The port and recovery state of the server libpq picks for `uri` (`psql`, one attempt).
async fn server_of(uri: &str) -> Result<(u16, bool), String> {
    let out = tokio::process::Command::new("psql")
        .arg(uri)
        .args(["-XAtc", "SELECT inet_server_port(), pg_is_in_recovery()"])
        .output()
        .await
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let (port, recovery) = text.split_once('|').ok_or_else(|| text.clone())?;
    Ok((port.parse().map_err(|_| text.clone())?, recovery == "t"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_write_uri_follows_a_failover() {
    let mut c = Cluster::builder().monitors(3).postgres(3).start().await;
    c.wait_synchronous("psql1", CONVERGE).await;
    let port_of = |c: &Cluster, name: &str| c.node(name).port;

    let writes = show_uri(&c, &[]).await;
    assert!(
        writes.contains("target_session_attrs=read-write"),
        "{writes}"
    );
    assert_eq!(
        server_of(&writes).await.unwrap(),
        (port_of(&c, "psql1"), false),
        "the read-write URI reaches the primary"
    );
    let reads = show_uri(&c, &["--standby"]).await;
    let (port, recovery) = server_of(&reads).await.unwrap();
    assert!(
        recovery && port != port_of(&c, "psql1"),
        "a standby: {port}"
    );

    // Unknown group: not found (66), nothing printed.
    let out = c.haclt(&["show", "uri", "--group", "nosuch"]).await;
    assert_eq!(out.status.code(), Some(66));
    assert!(out.stdout.is_empty());

    c.crash("psql1");
    let s = c
        .wait_for("a standby promoted", CONVERGE, |s| {
            ha_tests::cluster::primary_of(s).is_some_and(|p| p != "psql1")
        })
        .await;
    let new = ha_tests::cluster::primary_of(&s).unwrap().to_owned();
    // The URI printed before the crash, unchanged: libpq skips the dead node and the
    // read-only ones. The promotion is visible to the monitors a moment before the new
    // primary accepts writes, so a refused attempt is retried until the bound.
    let end = tokio::time::Instant::now() + CONVERGE;
    let reached = loop {
        match server_of(&writes).await {
            Ok((port, false)) => break port,
            other => {
                assert!(
                    tokio::time::Instant::now() < end,
                    "the old URI reaches no writable node: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(reached, port_of(&c, &new), "the new primary {new}");
    println!("after the crash of psql1 the same URI reaches {new}");
}
