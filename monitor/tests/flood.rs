//! A flood of the leader's port against real processes on loopback (the `ha-tests` harness: 3
//! `ha-monitor`s, 3 `ha-agent`s driving PostgreSQL 15, mutual TLS): connections without a
//! client certificate past their bound, streams of one node certificate and of one operator
//! certificate past theirs, an oversized request, and TCP connections that never start TLS: from
//! one address past that address's handshake bound (a new client from another address still
//! connects and is answered), then from many addresses past the global bound, kept topped up. Each refusal is checked (closed connections, or
//! `RESOURCE_EXHAUSTED` / `OUT_OF_RANGE` naming the limit). While the flood holds, for longer
//! than the primary's lease: every agent keeps reporting, no failover happens (same primary,
//! same epoch, no failover or promotion event), Raft commits a setting change, and a status
//! call is timed against the same call without a flood. The figures are printed.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ha_monitor::limits;
use ha_pki::{ClientTls, MtlsConnector, Role, transport};
use ha_proto::v1::agent_service_client::AgentServiceClient;
use ha_proto::v1::operator_service_client::OperatorServiceClient;
use ha_proto::v1::{self, EventsRequest, StatusRequest, WatchGoalRequest};
use ha_tests::cluster::{Cluster, LEASE, group, primary_of};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject as _;
use std::net::{Ipv4Addr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};
use tonic::Code;
use tonic::transport::Channel;

const CONVERGE: Duration = Duration::from_secs(90);
/// Silent TCP connections opened and kept open (more than the handshake bound).
const SILENT: usize = transport::MAX_HANDSHAKES + 72;
/// Source addresses the silent connections come from, enough that together they can fill the
/// handshake bound, which one alone cannot.
const SILENT_ADDRESSES: u8 = 13;
/// TLS connections without a client certificate (more than their bound).
const ANONYMOUS: usize = transport::MAX_ANONYMOUS_CONNECTIONS + 16;

/// Whether the server closed `tcp` (end of stream or reset); never waits.
fn closed(tcp: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match tcp.try_read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// A TCP connection to `addr` from the loopback address `from` (any 127.0.0.0/8 address is
/// local on Linux).
async fn connect_from(from: Ipv4Addr, addr: &str) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.into(), 0))?;
    socket
        .connect(addr.parse().expect("a monitor address"))
        .await
}

/// `n` silent TCP connections spread over `from`, each with the address it came from.
async fn silent(addr: &str, from: &[Ipv4Addr], n: usize) -> Vec<(Ipv4Addr, TcpStream)> {
    let mut out = Vec::new();
    for i in 0..n {
        let ip = from[i % from.len()];
        out.push((ip, connect_from(ip, addr).await.unwrap()));
    }
    out
}

/// Polls `held` (how many of ours the server still holds) until it is at most `bound`.
async fn wait_held_at_most(what: &str, bound: usize, mut held: impl FnMut() -> usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = held();
        if n <= bound {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the monitor still holds {n} connections, the bound is {bound}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// TLS connections with no client certificate (a joiner's), handshakes finished.
async fn anonymous(addr: &str, ca_bundle: &std::path::Path, n: usize) -> Vec<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_file_iter(ca_bundle).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut streams = Vec::new();
    for _ in 0..n {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        // The server may close one past the bound right after the handshake; either way we
        // keep the TCP stream to see which.
        let tls = connector.connect(name, tcp).await.unwrap();
        streams.push(tls.into_inner().0);
    }
    streams
}

/// A channel to `addr` with the certificate in `files`.
async fn channel(addr: &str, files: ha_pki::TlsFiles) -> Channel {
    let tls = Arc::new(ClientTls::load(files).unwrap());
    ha_pki::endpoint(&format!("https://{addr}"))
        .unwrap()
        .connect_with_connector(MtlsConnector::new(tls))
        .await
        .unwrap()
}

/// Opens streams until one is refused; returns those held and the refusal.
async fn streams_until_refused<S, F>(
    max: usize,
    mut open: impl FnMut() -> F,
) -> (Vec<S>, tonic::Status)
where
    F: std::future::Future<Output = Result<S, tonic::Status>>,
{
    let mut held = Vec::new();
    for _ in 0..=max {
        match open().await {
            Ok(s) => held.push(s),
            Err(status) => return (held, status),
        }
    }
    panic!("{} streams opened, the limit is {max}", held.len());
}

/// Median time of 10 status calls on `client`.
async fn status_latency(client: &mut OperatorServiceClient<Channel>) -> Duration {
    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        client
            .status(StatusRequest { linearizable: true })
            .await
            .unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times[5]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_the_leader_is_refused_and_no_failover_happens() {
    let cluster = Cluster::builder().start().await;
    let before = cluster.wait_converged("psql1", CONVERGE).await;
    let epoch = group(&before).unwrap().epoch;
    let lease = LEASE;
    let leader = usize::try_from(cluster.leader_id().await).unwrap() - 1;
    let addr = cluster.monitor_addrs()[leader].clone();
    let events_before = cluster.events().await.len();
    let mut api = cluster.operator().await;
    let quiet = status_latency(&mut api).await;

    // Connections without a certificate: past the bound each is closed after its handshake.
    let ca_bundle = cluster.pki().files("flood-anonymous").ca_bundle;
    cluster
        .pki()
        .write_bundle(&cluster.pki().files("flood-anonymous"));
    let anon = anonymous(&addr, &ca_bundle, ANONYMOUS).await;
    let anon_held = wait_held_at_most(
        "without a certificate",
        transport::MAX_ANONYMOUS_CONNECTIONS,
        || anon.iter().filter(|t| !closed(t)).count(),
    )
    .await;

    // A standby's node certificate: WatchGoal streams past the bound (its agent holds one).
    let standby = "psql2";
    let node = channel(
        &addr,
        cluster.pki().party("flood-node", Role::Postgres, standby),
    )
    .await;
    let (goals, refused_goal) = streams_until_refused(limits::MAX_WATCH_GOAL_PER_IDENTITY, || {
        let mut client = AgentServiceClient::new(node.clone());
        async move {
            client
                .watch_goal(WatchGoalRequest {
                    node: standby.into(),
                })
                .await
        }
    })
    .await;
    assert!(
        goals.len() < limits::MAX_WATCH_GOAL_PER_IDENTITY,
        "its agent holds one"
    );
    assert_eq!(
        refused_goal.code(),
        Code::ResourceExhausted,
        "{refused_goal:?}"
    );
    assert!(
        refused_goal.message().contains(&format!(
            "{} open streams, the limit per certificate",
            limits::MAX_WATCH_GOAL_PER_IDENTITY
        )),
        "{refused_goal:?}"
    );

    // An operator certificate: FollowEvents streams past the bound.
    let operator = channel(
        &addr,
        cluster
            .pki()
            .party("flood-operator", Role::Operator, "flood-operator"),
    )
    .await;
    let (follows, refused_follow) =
        streams_until_refused(limits::MAX_FOLLOW_EVENTS_PER_IDENTITY, || {
            let mut client = OperatorServiceClient::new(operator.clone());
            async move { client.follow_events(EventsRequest::default()).await }
        })
        .await;
    assert_eq!(follows.len(), limits::MAX_FOLLOW_EVENTS_PER_IDENTITY);
    assert_eq!(
        refused_follow.code(),
        Code::ResourceExhausted,
        "{refused_follow:?}"
    );
    assert!(
        refused_follow
            .message()
            .contains("the limit per certificate"),
        "{refused_follow:?}"
    );

    // A request past the size bound is refused before it is decoded.
    let oversized = OperatorServiceClient::new(operator.clone())
        .create_join_token(v1::CreateJoinTokenRequest {
            request_id: "flood-oversized".into(),
            node: "n".repeat(limits::MAX_REQUEST_BYTES + 1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Code::OutOfRange, "{oversized:?}");
    assert!(oversized.message().contains("too large"), "{oversized:?}");

    // TCP connections that never start TLS from one address: past that address's handshake
    // bound each is closed at once, and a new client from another address still connects.
    let one = silent(&addr, &[Ipv4Addr::new(127, 0, 0, 2)], SILENT).await;
    let one_held = wait_held_at_most(
        "silent from one address",
        transport::MAX_HANDSHAKES_PER_ADDRESS,
        || one.iter().filter(|(_, t)| !closed(t)).count(),
    )
    .await;
    let fresh = tokio::time::timeout(
        Duration::from_secs(5),
        channel(
            &addr,
            cluster
                .pki()
                .party("flood-fresh", Role::Operator, "flood-fresh"),
        ),
    )
    .await
    .expect("a new client's handshake beside a flood from one address");
    OperatorServiceClient::new(fresh)
        .status(StatusRequest { linearizable: true })
        .await
        .expect("a new client is answered beside a flood from one address");
    drop(one);

    // From many addresses: past the global bound each is closed at once; a task keeps them
    // topped up (the server drops them after its handshake timeout) while the flood lasts.
    let from: Vec<Ipv4Addr> = (3..3 + SILENT_ADDRESSES)
        .map(|i| Ipv4Addr::new(127, 0, 0, i))
        .collect();
    let mut silent = silent(&addr, &from, SILENT).await;
    let silent_held = wait_held_at_most("silent", transport::MAX_HANDSHAKES, || {
        silent.iter().filter(|(_, t)| !closed(t)).count()
    })
    .await;
    let flooding = Arc::new(AtomicBool::new(true));
    let refill = tokio::spawn({
        let flooding = flooding.clone();
        let addr = addr.clone();
        async move {
            let mut reopened = 0usize;
            while flooding.load(Ordering::Relaxed) {
                for (ip, tcp) in &mut silent {
                    if closed(tcp)
                        && let Ok(new) = connect_from(*ip, &addr).await
                    {
                        *tcp = new;
                        reopened += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            reopened
        }
    });

    // Under the flood, for three leases: reports keep arriving, the primary and its epoch stay.
    let flooded = status_latency(&mut api).await;
    let until = Instant::now() + 3 * lease;
    let mut oldest_report = Duration::ZERO;
    while Instant::now() < until {
        let s = api
            .status(StatusRequest { linearizable: true })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(primary_of(&s), Some("psql1"), "the primary changed: {s:?}");
        assert_eq!(group(&s).unwrap().epoch, epoch, "the epoch changed: {s:?}");
        for n in &s.nodes {
            let age = Duration::from_millis(n.last_report_age_ms.unwrap_or(u64::MAX));
            assert!(age < lease, "{} has not reported for {age:?}", n.name);
            oldest_report = oldest_report.max(age);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api.set_node_settings(v1::SetNodeSettingsRequest {
        request_id: "flood-setting".into(),
        node: standby.into(),
        candidate_priority: Some(7),
        replication_quorum: None,
    })
    .await
    .expect("Raft commits a setting change under the flood");
    flooding.store(false, Ordering::Relaxed);
    let reopened = refill.await.unwrap();

    let after = cluster.status().await;
    assert_eq!(primary_of(&after), Some("psql1"));
    assert_eq!(group(&after).unwrap().epoch, epoch);
    let new_events: Vec<_> = cluster.events().await.split_off(events_before);
    assert!(
        !new_events
            .iter()
            .any(|e| e.kind.starts_with("failover") || e.kind == "promoted"),
        "no failover: {new_events:?}"
    );
    println!(
        "flood of monitor {}: held {one_held} of {SILENT} silent TCP connections from one address \
         (bound {}, a new client from another connected and was answered), {silent_held} of \
         {SILENT} from {SILENT_ADDRESSES} addresses (bound {}, {reopened} reopened after the \
         server closed them), {anon_held} of {ANONYMOUS} without \
         a certificate (bound {}), {} WatchGoal streams of {standby} beside its agent's (bound {}), \
         {} FollowEvents streams (bound {}); an oversized request refused: {}",
        leader + 1,
        transport::MAX_HANDSHAKES_PER_ADDRESS,
        transport::MAX_HANDSHAKES,
        transport::MAX_ANONYMOUS_CONNECTIONS,
        goals.len(),
        limits::MAX_WATCH_GOAL_PER_IDENTITY,
        follows.len(),
        limits::MAX_FOLLOW_EVENTS_PER_IDENTITY,
        oversized.message()
    );
    println!(
        "no failover over {:?} (3 leases): primary psql1, epoch {epoch}, oldest report {oldest_report:?}; \
         a setting committed; status median {quiet:?} without a flood, {flooded:?} under it",
        3 * lease
    );
    drop((anon, goals, follows));
}
