//! Renewal of the node certificates in a running cluster, against real processes: 3
//! `ha-monitor`s signing node certificates valid for 40 seconds only, a primary and its
//! synchronous standby (each an `ha-agent` driving its own PostgreSQL 15), all on mutual TLS.
//!
//! Each agent renews its certificate with `AgentService/Renew` at about two thirds of its
//! lifetime, writes it and reloads its link and its PostgreSQL server. The test waits until
//! every certificate the nodes held at the start has expired, then checks: each node renewed
//! (new serial, same identity, a `certificate_renewed` event), its PostgreSQL serves the new
//! certificate, no failover happened (same primary, same epoch, no failover or promotion
//! event), the standby still streams, and after the leader monitor is killed every agent
//! reports to the new leader over new connections, which only the new certificates can open.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use ha_pki::CertInfo;
use ha_tests::cluster::{Cluster, group, node, primary_of};
use tokio::time::Instant;

const LIFETIME: Duration = Duration::from_secs(40);

fn cert_info(path: &Path) -> CertInfo {
    CertInfo::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Whether every node reports (within two seconds) and is healthy in `s`.
fn all_healthy(s: &ha_proto::v1::StatusResponse, names: &[String]) -> bool {
    names.iter().all(|n| {
        node(s, n).is_some_and(|n| {
            n.healthy && n.unhealthy.is_empty() && n.last_report_age_ms.is_some_and(|a| a < 2_000)
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_renew_their_certificates_and_keep_working_past_the_old_ones_expiry() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut cluster = Cluster::builder()
        .monitors(3)
        .postgres(2)
        .node_certificate_lifetime(LIFETIME)
        .start()
        .await;
    let s = cluster.status().await;
    let primary = primary_of(&s).unwrap().to_owned();
    let standby = if primary == "psql1" { "psql2" } else { "psql1" };
    let epoch = group(&s).unwrap().epoch;
    let last_event = cluster.events().await.last().map_or(0, |e| e.seq);
    let names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let first: Vec<CertInfo> = names
        .iter()
        .map(|n| cert_info(&cluster.pki().files(n).cert))
        .collect();
    for info in &first {
        // Signed for the configured lifetime (dated back by the clock-skew allowance).
        let lifetime = info
            .not_after
            .duration_since(info.not_before + ha_pki::CLOCK_SKEW_ALLOWANCE)
            .unwrap();
        assert!(lifetime <= LIFETIME, "{lifetime:?}");
    }
    let expiry = first.iter().map(|i| i.not_after).max().unwrap();

    // Poll until every certificate held at the start has expired, the cluster healthy and
    // every node on a certificate of its own that is not the first one.
    let renewed = |names: &[String]| {
        names.iter().zip(&first).all(|(n, old)| {
            let now = cert_info(&cluster.pki().files(n).cert);
            now.serial != old.serial && now.identity == old.identity
        })
    };
    cluster
        .wait_for(
            "every node renewed and the first certificates expired",
            LIFETIME * 3,
            |s| {
                SystemTime::now() > expiry + Duration::from_secs(1)
                    && renewed(&names)
                    && all_healthy(s, &names)
            },
        )
        .await;

    // Every PostgreSQL server presents its node's current certificate.
    for n in cluster.nodes() {
        let files = cluster.pki().files(&n.name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let wanted = ha_tests::pki::first_certificate(&files.cert);
            if ha_tests::pki::served_certificate(n.port, &files.ca_bundle).await == wanted {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not serve its renewed certificate",
                n.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // New connections to a new leader: only the renewed certificates can open them.
    let leader = cluster.leader_id().await;
    cluster.kill_monitor(leader);
    cluster
        .wait_for(
            "every agent reports to the new leader",
            Duration::from_secs(30),
            |s| s.answered_by != leader && all_healthy(s, &names),
        )
        .await;
    cluster.start_monitor(leader);

    // No failover, still synchronous, one renewal event per node at least.
    let events = cluster
        .assert_no_failover_since(&primary, epoch, standby, last_event)
        .await;
    for n in &names {
        assert!(
            events
                .iter()
                .any(|e| e.kind == "certificate_renewed" && e.node == *n),
            "no renewal event for {n}"
        );
    }
}
