//! Replication over TLS with certificate authentication, against real PostgreSQL 15 servers run
//! as the `postgres` user on loopback, with certificates from `ha-pki`'s CA.
//!
//! - A standby joins (base backup and streaming) through a recording TCP proxy: with TLS none of
//!   the distinctive row payloads appear in the captured bytes; the same run in plaintext shows
//!   every one of them (so the capture really sees the traffic and the test can fail).
//! - The primary refuses a certificate whose name is not in its ident map and a certificate from
//!   another CA (which the agent installs only once its own bundle trusts that CA; otherwise it
//!   refuses it before PostgreSQL sees it), and then accepts the real peer.
//! - A rotated server certificate (same CA) is served after a reload, with no restart, and the
//!   standby reconnects and keeps streaming.
//! - After a failover the old primary is rewound from the new one over TLS (`pg_rewind`'s
//!   ordinary session needs its own `hostssl postgres` rule).
//!
//! A [`PgScratch`] stops every postmaster it started (by PID) before its directory is removed, and
//! a [`Proxy`] aborts its tasks when dropped, even when an assertion fails.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_agent::pg::{
    HbaRule, PgConfig, PgController, PgError, RejoinPath, ReplicationPeer, ServerRole, SyncConfig,
    Upstream,
};
use ha_pki::{Ca, Role, TlsFiles, Validity};
use ha_proto::NodeId;
use ha_proto::types::Endpoint;
use ha_tests::{PgScratch, free_port};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(60);

/// A cluster CA and the TLS file sets issued from it, written like an agent's own files (key
/// 0600, owned by root), outside every PostgreSQL directory.
struct Pki {
    ca: Ca,
    validity: Validity,
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str, dir: PathBuf) -> Self {
        let validity = Validity::starting_now(Duration::from_secs(3600)).unwrap();
        std::fs::create_dir(&dir).unwrap();
        Self {
            ca: Ca::create(name, validity).unwrap(),
            validity,
            dir,
        }
    }

    /// A postgres-role certificate for `name`, valid for 127.0.0.1, trusting `trust`'s CA.
    fn issue(&self, name: &str, trust: &Pki) -> TlsFiles {
        let issued = self
            .ca
            .issue(name, Role::Postgres, &[LOOPBACK.to_string()], self.validity)
            .unwrap();
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            ca_bundle: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        ha_pki::write_public_file(&files.ca_bundle, trust.ca.cert_pem().as_bytes()).unwrap();
        write_identity(&files, &issued.cert_pem, &issued.key_pem);
        files
    }

    /// A new certificate and key for the same name, written over `files` (rotation).
    fn reissue(&self, name: &str, files: &TlsFiles) -> String {
        let issued = self
            .ca
            .issue(name, Role::Postgres, &[LOOPBACK.to_string()], self.validity)
            .unwrap();
        write_identity(files, &issued.cert_pem, &issued.key_pem);
        issued.cert_pem
    }
}

fn write_identity(files: &TlsFiles, cert_pem: &str, key_pem: &str) {
    ha_pki::write_public_file(&files.cert, cert_pem.as_bytes()).unwrap();
    ha_pki::write_key_file(&files.key, key_pem.as_bytes()).unwrap();
}

/// The servers' directory (stopped on drop, see [`PgScratch`]) with the tests' logging.
struct Harness {
    scratch: PgScratch,
    /// Nodes made so far: numbers their directories.
    nodes: usize,
}

impl Harness {
    fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("ha_agent=debug")
            .try_init();
        Self {
            scratch: PgScratch::new(),
            nodes: 0,
        }
    }

    fn path(&self) -> &Path {
        self.scratch.path()
    }

    /// A node named `name`; with `tls`, replication to it is limited to `peers` by certificate,
    /// without it (the plaintext control) replication from loopback is trusted.
    fn node(&mut self, name: &str, tls: Option<TlsFiles>, peers: &[&str]) -> Node {
        // Numbered: a test may run two nodes of the same name (a rogue and the real one).
        let dir = self.scratch.node_dir(&format!("{name}-{}", self.nodes));
        self.nodes += 1;
        let port = free_port();
        let id = NodeId::new(name).unwrap();
        let mut cfg = PgConfig::new(id.clone(), dir.join("data"), port, dir.clone());
        cfg.listen_addresses = vec![LOOPBACK.to_string()];
        if tls.is_none() {
            cfg.hba.extend([
                HbaRule::host("replication", "replicator", "127.0.0.1/32", "trust"),
                HbaRule::host("postgres", "replicator", "127.0.0.1/32", "trust"),
            ]);
        }
        cfg.tls = tls;
        cfg.peers = peers
            .iter()
            .map(|p| ReplicationPeer {
                node: NodeId::new(*p).unwrap(),
                address: LOOPBACK,
            })
            .collect();
        for (k, v) in [("shared_buffers", "16MB"), ("max_connections", "20")] {
            cfg.extra_settings.insert(k.into(), v.into());
        }
        cfg.start_timeout = Duration::from_secs(30);
        cfg.stop_timeout = Duration::from_secs(20);
        self.scratch.track(cfg.data_dir.clone());
        Node {
            port,
            ctl: PgController::new(cfg).unwrap(),
            id,
        }
    }
}

struct Node {
    id: NodeId,
    port: u16,
    ctl: PgController,
}

impl Node {
    async fn exec(&self, sql: &str) {
        let client = self.ctl.connect().await.unwrap();
        client.batch_execute(sql).await.unwrap();
    }

    async fn text(&self, sql: &str) -> Option<String> {
        let client = self.ctl.connect().await.ok()?;
        let row = client.query_opt(sql, &[]).await.ok()??;
        row.get(0)
    }

    /// This node as an upstream reached at `port` (its own, or a proxy's).
    fn upstream_via(&self, port: u16) -> Upstream {
        Upstream {
            node: self.id.clone(),
            endpoint: Endpoint {
                host: LOOPBACK.to_string(),
                port,
            },
        }
    }

    async fn streaming(&mut self) -> bool {
        self.ctl
            .observe()
            .await
            .is_ok_and(|o| o.role == ServerRole::Standby && o.streaming)
    }
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `WAIT`.
macro_rules! eventually {
    ($what:expr, $check:expr) => {{
        let deadline = Instant::now() + WAIT;
        while !$check {
            assert!(
                Instant::now() < deadline,
                "not reached within {WAIT:?}: {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

/// The bytes one direction of one proxied connection carried.
type Record = Arc<Mutex<Vec<u8>>>;

/// A TCP proxy on loopback that forwards to `target` and records every byte, per connection
/// and direction (so a payload split across reads is still contiguous in its record).
struct Proxy {
    port: u16,
    streams: Arc<Mutex<Vec<Record>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let streams: Arc<Mutex<Vec<Record>>> = Arc::default();
        let registry = streams.clone();
        let task = tokio::spawn(async move {
            // Dropped (aborting every connection) when the proxy's task is aborted.
            let mut conns = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let registry = registry.clone();
                conns.spawn(async move {
                    let Ok(server) = TcpStream::connect((LOOPBACK, target)).await else {
                        return;
                    };
                    let record = || {
                        let r: Record = Arc::default();
                        registry.lock().unwrap().push(r.clone());
                        r
                    };
                    let (up, down) = (record(), record());
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, up), pump(sr, cw, down));
                });
            }
        });
        Self {
            port,
            streams,
            task,
        }
    }

    fn total_bytes(&self) -> usize {
        let streams = self.streams.lock().unwrap();
        streams.iter().map(|s| s.lock().unwrap().len()).sum()
    }

    fn saw(&self, needle: &[u8]) -> bool {
        let streams = self.streams.lock().unwrap();
        streams
            .iter()
            .any(|s| s.lock().unwrap().windows(needle.len()).any(|w| w == needle))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Record,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                record.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// The certificate PostgreSQL on `port` presents to a new TLS session (PostgreSQL's SSLRequest,
/// then a handshake verifying it against `ca_pem` for 127.0.0.1).
async fn served_certificate(port: u16, ca_pem: &str) -> Option<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = TcpStream::connect((LOOPBACK, port)).await.ok()?;
    // Length 8, SSLRequest code 80877103.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .ok()?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.ok()?;
    if answer[0] != b'S' {
        return None;
    }
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(LOOPBACK.into()), tcp)
        .await
        .ok()?;
    let der = tls.get_ref().1.peer_certificates()?.first()?.to_vec();
    Some(der)
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Bootstraps `psql1`, joins `psql2` through a recording proxy, writes rows before the base
/// backup and while streaming, and returns the proxy (with its capture) and the payloads.
async fn replicate_through_proxy(tls: bool) -> (Proxy, Vec<String>) {
    let mut h = Harness::new();
    let (t1, t2) = if tls {
        let pki = Pki::new("cluster-ca", h.path().join("pki"));
        (
            Some(pki.issue("psql1", &pki)),
            Some(pki.issue("psql2", &pki)),
        )
    } else {
        (None, None)
    };
    let mut primary = h.node("psql1", t1, &["psql1", "psql2"]);
    let mut standby = h.node("psql2", t2, &["psql1", "psql2"]);
    let tag: u64 = rand::random();
    let before = format!("copied-by-base-backup-{tag:016x}");
    let streamed = format!("streamed-in-wal-{tag:016x}");

    primary.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    primary
        .exec(&format!(
            "CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('{before}');"
        ))
        .await;
    let proxy = Proxy::start(primary.port).await;
    standby
        .ctl
        .join_standby(&primary.upstream_via(proxy.port))
        .await
        .unwrap();
    eventually!("psql2 streams", standby.streaming().await);
    primary
        .exec(&format!("INSERT INTO secrets VALUES ('{streamed}')"))
        .await;
    eventually!(
        "the streamed row reaches psql2",
        standby
            .text(&format!("SELECT v FROM secrets WHERE v = '{streamed}'"))
            .await
            .is_some()
    );
    let ssl = primary
        .text("SELECT format('%s %s', s.ssl, s.client_dn) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)")
        .await;
    if tls {
        assert_eq!(
            ssl.as_deref(),
            Some("t /CN=psql2"),
            "the walsender's session"
        );
    } else {
        assert_eq!(ssl.as_deref(), Some("f "), "the walsender's session");
    }
    drop(h);
    (proxy, vec![before, streamed])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_traffic_is_encrypted_while_the_plaintext_control_shows_the_rows() {
    let (plain, plain_payloads) = replicate_through_proxy(false).await;
    let (tls, tls_payloads) = replicate_through_proxy(true).await;
    // Both runs carried a whole base backup through the proxy.
    assert!(plain.total_bytes() > 1 << 20, "{}", plain.total_bytes());
    assert!(tls.total_bytes() > 1 << 20, "{}", tls.total_bytes());
    for p in &plain_payloads {
        assert!(plain.saw(p.as_bytes()), "plaintext control lacks {p}");
    }
    for p in &tls_payloads {
        assert!(!tls.saw(p.as_bytes()), "TLS capture shows {p}");
    }
    // The control's table name is visible too; under TLS even that is hidden.
    assert!(plain.saw(b"secrets") && !tls.saw(b"secrets"));
}

fn tool_stderr(result: Result<(), PgError>) -> String {
    match result {
        Err(PgError::Tool { stderr, .. }) => stderr,
        other => panic!("expected a refused client tool, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_refuses_unmapped_names_and_foreign_cas_and_accepts_its_peer() {
    let mut h = Harness::new();
    let pki = Pki::new("cluster-ca", h.path().join("pki"));
    let rogue_pki = Pki::new("rogue-ca", h.path().join("rogue-pki"));
    let mut primary = h.node("psql1", Some(pki.issue("psql1", &pki)), &["psql2"]);
    primary.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    let upstream = primary.upstream_via(primary.port);

    // A genuine cluster certificate, but its name is not in the primary's ident map.
    let mut intruder = h.node("intruder", Some(pki.issue("intruder", &pki)), &[]);
    let err = tool_stderr(intruder.ctl.join_standby(&upstream).await);
    assert!(err.contains("certificate authentication failed"), "{err}");

    // The right name, trusting the right CA, but issued by another CA: the agent refuses to
    // install it (it does not chain to the node's CA bundle), so it never reaches PostgreSQL.
    let rogue_files = rogue_pki.issue("psql2", &pki);
    let mut rogue = h.node("psql2", Some(rogue_files.clone()), &[]);
    match rogue.ctl.join_standby(&upstream).await {
        Err(PgError::Tls(e)) => assert!(e.contains("is not signed by the cluster CA"), "{e}"),
        other => panic!("expected the agent's refusal, got {other:?}"),
    }
    // A node whose bundle also trusts that CA installs it; the primary refuses it.
    let both = format!("{}{}", pki.ca.cert_pem(), rogue_pki.ca.cert_pem());
    ha_pki::write_public_file(&rogue_files.ca_bundle, both.as_bytes()).unwrap();
    let err = tool_stderr(rogue.ctl.join_standby(&upstream).await);
    assert!(err.contains("unknown ca"), "{err}");

    let slots = primary
        .text("SELECT count(*)::text FROM pg_replication_slots")
        .await;
    assert_eq!(
        slots.as_deref(),
        Some("0"),
        "no refused client created a slot"
    );

    // The same primary accepts the real psql2.
    let mut standby = h.node("psql2", Some(pki.issue("psql2", &pki)), &["psql1"]);
    standby.ctl.join_standby(&upstream).await.unwrap();
    eventually!("psql2 streams", standby.streaming().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_server_certificate_is_served_without_restart_and_streaming_resumes() {
    let mut h = Harness::new();
    let pki = Pki::new("cluster-ca", h.path().join("pki"));
    let primary_files = pki.issue("psql1", &pki);
    let mut primary = h.node("psql1", Some(primary_files.clone()), &["psql2"]);
    let mut standby = h.node("psql2", Some(pki.issue("psql2", &pki)), &["psql1"]);
    primary.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    standby
        .ctl
        .join_standby(&primary.upstream_via(primary.port))
        .await
        .unwrap();
    eventually!("psql2 streams", standby.streaming().await);
    let ca_pem = pki.ca.cert_pem().to_owned();
    let old = served_certificate(primary.port, &ca_pem).await.unwrap();
    assert_eq!(
        old,
        der_of(&std::fs::read_to_string(&primary_files.cert).unwrap())
    );
    let pid = primary.ctl.postmaster_pid().unwrap();

    let new_pem = pki.reissue("psql1", &primary_files);
    let new = der_of(&new_pem);
    assert_ne!(old, new);
    // The agent's tick: observing notices the new files, installs them and reloads.
    primary.ctl.observe().await.unwrap();
    assert!(
        !primary.ctl.refresh_tls().await.unwrap(),
        "already installed"
    );
    eventually!(
        "the new certificate is served",
        served_certificate(primary.port, &ca_pem).await.as_deref() == Some(&new[..])
    );
    assert_eq!(primary.ctl.postmaster_pid(), Some(pid), "no restart");

    // A new replication session (a fresh handshake, verifying the new certificate) streams.
    let walsender = "SELECT pid::text FROM pg_stat_replication WHERE state = 'streaming'";
    let before = primary.text(walsender).await.unwrap();
    primary
        .exec("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
        .await;
    eventually!(
        "psql2 reconnects",
        primary
            .text(walsender)
            .await
            .is_some_and(|pid| pid != before)
    );
    primary
        .exec("CREATE TABLE after_rotation AS SELECT 42 AS v")
        .await;
    eventually!(
        "the post-rotation row reaches psql2",
        standby
            .text("SELECT v::text FROM after_rotation")
            .await
            .as_deref()
            == Some("42")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_rewinds_the_old_primary_over_tls() {
    let mut h = Harness::new();
    let pki = Pki::new("cluster-ca", h.path().join("pki"));
    let mut a = h.node("psql1", Some(pki.issue("psql1", &pki)), &["psql1", "psql2"]);
    let mut b = h.node("psql2", Some(pki.issue("psql2", &pki)), &["psql1", "psql2"]);
    a.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    a.exec("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await;
    b.ctl.join_standby(&a.upstream_via(a.port)).await.unwrap();
    eventually!("psql2 streams", b.streaming().await);
    eventually!(
        "psql2 has the first row",
        b.text("SELECT x::text FROM t").await.as_deref() == Some("1")
    );

    // Failover: cut the stream, let the old primary diverge, fence it, promote psql2.
    b.ctl.stop_replication().await.unwrap();
    a.exec("INSERT INTO t VALUES (100); CHECKPOINT; INSERT INTO t VALUES (101)")
        .await;
    a.ctl.fence().await.unwrap();
    b.ctl.promote().await.unwrap();
    b.exec("INSERT INTO t VALUES (2)").await;

    // pg_rewind reads psql2's files through an ordinary session: the `hostssl postgres` rule.
    assert_eq!(
        a.ctl.rejoin(&b.upstream_via(b.port)).await.unwrap(),
        RejoinPath::Rewound
    );
    eventually!("psql1 streams from psql2", a.streaming().await);
    eventually!(
        "psql1 holds psql2's history only",
        a.text("SELECT string_agg(x::text, ',' ORDER BY x) FROM t")
            .await
            .as_deref()
            == Some("1,2")
    );
}
