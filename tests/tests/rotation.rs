//! Rotation of every certificate and of the CA itself under load, against real processes: 3
//! `ha-monitor`s, a primary and its synchronous standby (each an `ha-agent` driving its own
//! PostgreSQL 15), all on mutual TLS from the cluster CA, and a writer committing through TLS
//! (verify-full, client certificate) that opens a new session every few writes, so handshakes
//! run all along the rotation.
//!
//! The rotation (each step returns once every daemon and every PostgreSQL server reloaded, see
//! `Cluster::rotation_*`): a new CA trusted beside the old one everywhere (and the monitors'
//! CA key replaced by the new one's); every certificate re-issued by the new CA (monitors, each
//! node's certificate used by its agent and its PostgreSQL, operator, writer); the old CA
//! dropped from every bundle. Then: no commit of the writer failed or went unanswered and no
//! session failed to open; no failover (same primary, same epoch, no failover or promotion
//! event); the standby streams and the group is synchronous; every acknowledged row is on the
//! primary; a client presenting a certificate of the old CA is refused by every monitor and
//! every PostgreSQL server while the same client with a new certificate is admitted; a
//! restarted agent reports and a restarted monitor acknowledges new Raft entries (new
//! connections with the new files); and a node joining afterwards gets a certificate of the new
//! CA (the monitors reloaded the CA key without a restart). The time each step took is printed.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use ha_pki::{ClientTls, Role};
use ha_proto::v1::agent_service_client::AgentServiceClient;
use ha_proto::v1::operator_service_client::OperatorServiceClient;
use ha_proto::v1::{self, JoinRequest, StatusRequest};
use ha_tests::cluster::{Cluster, group, node, primary_of};
use ha_tests::drill;
use ha_tests::pki::PgClientTls;
use ha_tests::writer::Writer;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::time::Instant;

/// Whether a fresh connection with `tls` gets a status from the monitor at `addr`.
async fn monitor_admits(addr: &str, tls: &Arc<ClientTls>) -> Result<(), String> {
    let channel = ha_pki::endpoint(&format!("https://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect_with_connector(ha_pki::MtlsConnector::new(tls.clone()))
        .await
        .map_err(|e| e.to_string())?;
    OperatorServiceClient::new(channel)
        .status(StatusRequest {
            linearizable: false,
        })
        .await
        .map(|_| ())
        .map_err(|s| s.to_string())
}

/// Monitor `id`'s row in a status (as the leader sees it: `commit_index` is its matched index).
fn monitor(s: &v1::StatusResponse, id: u64) -> &v1::MonitorStatus {
    s.monitors.iter().find(|m| m.id == id).unwrap()
}

/// Whether `leaf_pem` chains to one of the CAs in `bundle_pem` (as a client certificate).
fn signed_by(leaf_pem: &str, bundle_pem: &str) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let leaf = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).unwrap();
    verifier
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .is_ok()
}

/// Joins an ejabberd node `name` with a CSR and no client certificate (as an agent does) and
/// returns the certificate the leader signed.
async fn join_with_csr(cluster: &Cluster, name: &str) -> String {
    let token_file = cluster.join_token(name, v1::NodeKind::Ejabberd).await;
    let token = std::fs::read_to_string(token_file).unwrap();
    let (csr_pem, _key) = ha_pki::generate_csr(name).unwrap();
    let bundle = cluster.pki().files("operator").ca_bundle;
    let anonymous = Arc::new(ClientTls::without_certificate(bundle).unwrap());
    let mut refusals = Vec::new();
    for addr in cluster.monitor_addrs() {
        let channel = ha_pki::connect(&format!("https://{addr}"), anonymous.clone())
            .await
            .unwrap();
        let answer = AgentServiceClient::new(channel)
            .join(JoinRequest {
                token: token.trim().to_owned(),
                node: name.to_owned(),
                kind: v1::NodeKind::Ejabberd.into(),
                endpoint: Some(v1::Endpoint {
                    host: "127.0.0.1".into(),
                    port: 5222,
                }),
                csr_pem: csr_pem.clone(),
                group: ha_tests::cluster::GROUP.into(),
            })
            .await;
        match answer {
            Ok(a) => return a.into_inner().certificate_pem,
            // Followers point at the leader; the token is consumed only by the leader.
            Err(s) => refusals.push(format!("{addr}: {s:?}")),
        }
    }
    panic!("no monitor accepted the join: {refusals:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_certificate_and_the_ca_rotate_under_a_tls_writer_without_failure_or_failover() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut cluster = Cluster::builder().monitors(3).postgres(2).start().await;
    let s = cluster.status().await;
    let primary = primary_of(&s).unwrap().to_owned();
    let standby = if primary == "psql1" { "psql2" } else { "psql1" };
    let epoch = group(&s).unwrap().epoch;
    // Replication runs over TLS with the standby's certificate (verify-full, cert auth).
    let walsender = cluster
        .session(&primary)
        .await
        .unwrap()
        .query_one(
            "SELECT s.ssl, s.client_dn FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (walsender.get::<_, bool>(0), walsender.get::<_, String>(1)),
        (true, format!("/CN={standby}"))
    );
    let last_event = cluster.events().await.last().map_or(0, |e| e.seq);
    // A client certificate of the first CA, kept to show it is refused at the end.
    let stale = cluster.pki().files("stale-operator");
    cluster.pki().write_bundle(&stale);
    cluster
        .pki()
        .issue(&stale, Role::Operator, "stale-operator");
    let stale_writer = cluster.pki().files("stale-writer");
    cluster.pki().write_bundle(&stale_writer);
    cluster.pki().issue(
        &stale_writer,
        Role::Operator,
        ha_tests::cluster::WRITER_USER,
    );

    let writer = Writer::start_tls(cluster.addrs(), cluster.writer_tls());
    writer
        .wait_ack_after(Instant::now(), None, Duration::from_secs(10))
        .await;
    let before = writer.snapshot();

    let t0 = Instant::now();
    cluster.rotation_trust_new_ca().await;
    let t1 = Instant::now();
    cluster.rotation_reissue_certificates().await;
    let t2 = Instant::now();
    let retired = cluster.rotation_retire_old_ca().await;
    let t3 = Instant::now();
    // Writes go on after the rotation, in new sessions with the new certificates.
    writer
        .wait_ack_after(Instant::now(), None, Duration::from_secs(10))
        .await;
    let log = writer.stop().await;

    let during = log.acks.len() - before.acks.len();
    println!(
        "rotation took {:?}: trust the new CA {:?}, re-issue every certificate {:?}, retire the old CA {:?}; \
         {during} writes acknowledged and {} TLS sessions opened meanwhile, longest gap between acknowledgements {:?}",
        t3 - t0,
        t1 - t0,
        t2 - t1,
        t3 - t2,
        log.sessions - before.sessions,
        log.longest_gap(t0, t3),
    );
    assert!(
        log.uncertain.is_empty() && log.refused.is_empty() && log.failed_connects == 0,
        "commits failed: {} unanswered, {} refused, {} sessions not opened",
        log.uncertain.len(),
        log.refused.len(),
        log.failed_connects
    );
    assert!(
        during > 50,
        "the writer hardly ran during the rotation: {during}"
    );
    assert!(
        log.sessions - before.sessions > 5,
        "new TLS sessions during the rotation"
    );

    // No failover: same primary and epoch, no failover or promotion event; still synchronous.
    cluster
        .assert_no_failover_since(&primary, epoch, standby, last_event)
        .await;
    let s = cluster.status().await;
    assert!(group(&s).unwrap().synchronous, "still synchronous: {s:#?}");
    drill::assert_nothing_lost(&cluster, &log, &primary).await;

    // The old CA is gone: its certificates are refused by every monitor and every PostgreSQL,
    // while the same clients with new certificates are admitted. The stale clients trust the
    // new CA, so the refusal is the server's.
    cluster.pki().write_bundle(&stale);
    let stale = Arc::new(ClientTls::load(stale).unwrap());
    let current = Arc::new(ClientTls::load(cluster.pki().files("operator")).unwrap());
    for addr in cluster.monitor_addrs() {
        let refused = monitor_admits(&addr, &stale).await;
        assert!(refused.is_err(), "monitor {addr} admitted an old-CA client");
        monitor_admits(&addr, &current).await.unwrap();
    }
    cluster.pki().write_bundle(&stale_writer);
    let stale_writer = PgClientTls::load(stale_writer, ha_tests::cluster::WRITER_USER).unwrap();
    for n in cluster.nodes() {
        let refused = stale_writer.connect(n.port, Duration::from_secs(2)).await;
        assert!(
            refused.is_err(),
            "{} admitted an old-CA client certificate",
            n.name
        );
        cluster
            .writer_tls()
            .connect(n.port, Duration::from_secs(2))
            .await
            .unwrap();
    }

    // Daemons' own connections opened after the rotation use the new files too: a restarted
    // agent reports again, and a restarted monitor acknowledges new Raft entries.
    cluster.kill_agent(standby);
    let silent = |s: &v1::StatusResponse| {
        node(s, standby)
            .and_then(|n| n.last_report_age_ms)
            .is_some_and(|age| age > 1000)
    };
    cluster
        .wait_for(
            "the killed agent is silent",
            Duration::from_secs(10),
            silent,
        )
        .await;
    cluster.start_agent(standby);
    cluster
        .wait_for(
            "the restarted agent reports with its new certificate",
            Duration::from_secs(30),
            |s| !silent(s),
        )
        .await;
    let leader = cluster.leader_id().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.kill_monitor(follower);
    cluster.start_monitor(follower);
    // A Raft entry written after the restart: the follower's acknowledgement must reach the
    // leader over a new connection.
    cluster
        .join_token("raft-probe", v1::NodeKind::Postgres)
        .await;
    let s = cluster.status().await;
    let committed = monitor(&s, s.answered_by).commit_index;
    cluster
        .wait_for(
            "the restarted monitor acknowledges new entries",
            Duration::from_secs(30),
            |s| monitor(s, follower).commit_index >= committed,
        )
        .await;

    // The monitors sign joins with the new CA now (no restart).
    let cert = join_with_csr(&cluster, "e9").await;
    let new_bundle = std::fs::read_to_string(cluster.pki().files("operator").ca_bundle).unwrap();
    assert!(
        signed_by(&cert, &new_bundle),
        "the joining node's certificate is signed by the new CA"
    );
    assert!(!signed_by(&cert, retired[0].cert_pem()));
}
