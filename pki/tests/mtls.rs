//! Mutual TLS end to end: a real tonic server (`PeerService` from `ha_proto::v1`) behind
//! `tls_incoming`, real clients through `MtlsConnector`, certificates from real CAs on disk.
//! Shows who is accepted, who is refused (and that refusals never stop the server), live
//! rotation with no failed call, CSR joins, and the SIGHUP / file-change reloads.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ha_pki::{
    Ca, ClientAuth, ClientTls, FileError, PeerIdentity, Reload, ReloadWatcher, Role, ServerTls,
    TlsError, TlsFiles, Validity, connect, generate_csr, require_role, tls_incoming,
    write_key_file, write_public_file,
};
use ha_proto::v1::peer_service_client::PeerServiceClient;
use ha_proto::v1::peer_service_server::{PeerService, PeerServiceServer};
use ha_proto::v1::{RaftAck, RaftBatch};
use rustls_pki_types::pem::PemObject;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const DAY: Duration = Duration::from_secs(86_400);
const DEADLINE: Duration = Duration::from_secs(20);

/// Records the identity of every caller, then admits monitors only (as the real Raft service).
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<PeerIdentity>>>,
}

#[tonic::async_trait]
impl PeerService for Recorder {
    async fn raft(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        if let Some(id) = ha_pki::peer_identity(&request) {
            self.seen.lock().unwrap().push(id);
        }
        require_role(&request, &[Role::Monitor])?;
        Ok(Response::new(RaftAck {}))
    }
}

struct TestServer {
    url: String,
    tls: Arc<ServerTls>,
    seen: Arc<Mutex<Vec<PeerIdentity>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start(files: TlsFiles) -> Self {
        Self::start_with(files, ClientAuth::Required).await
    }

    async fn start_with(files: TlsFiles, client_auth: ClientAuth) -> Self {
        let tls = Arc::new(ServerTls::load_with(files, client_auth).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let recorder = Recorder::default();
        let seen = recorder.seen.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = tls_incoming(listener, tls.clone());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(PeerServiceServer::new(recorder))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            tls,
            seen,
            stop: Some(stop),
            task,
        }
    }

    fn seen(&self) -> Vec<PeerIdentity> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A directory of TLS material.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        ha_pki::install_crypto();
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `prefix.{ca,crt,key}` for a certificate `ca` issues, trusting `bundle`.
    fn files(
        &self,
        prefix: &str,
        ca: &Ca,
        bundle: &[&Ca],
        role: Role,
        name: &str,
        validity: Validity,
    ) -> TlsFiles {
        let issued = ca
            .issue(name, role, &["127.0.0.1".to_owned()], validity)
            .unwrap();
        let files = TlsFiles {
            ca_bundle: self.path(&format!("{prefix}.ca")),
            cert: self.path(&format!("{prefix}.crt")),
            key: self.path(&format!("{prefix}.key")),
        };
        write_bundle(&files.ca_bundle, bundle);
        write_public_file(&files.cert, issued.cert_pem.as_bytes()).unwrap();
        write_key_file(&files.key, issued.key_pem.as_bytes()).unwrap();
        files
    }
}

fn write_bundle(path: &Path, cas: &[&Ca]) {
    let pems: Vec<&str> = cas.iter().map(|c| c.cert_pem()).collect();
    let bundle = ha_pki::merge_ca_bundle(&pems, SystemTime::now()).unwrap();
    write_public_file(path, bundle.as_bytes()).unwrap();
}

fn new_ca(name: &str) -> Ca {
    Ca::create(name, Validity::starting_now(30 * DAY).unwrap()).unwrap()
}

fn valid() -> Validity {
    Validity::starting_now(DAY).unwrap()
}

async fn raft(channel: Channel) -> Result<(), Status> {
    PeerServiceClient::new(channel)
        .raft(RaftBatch {
            from: 1,
            messages: vec![b"m".to_vec()],
        })
        .await
        .map(|_| ())
}

/// Connects and makes one call; the error of whichever step failed.
async fn call(url: &str, files: TlsFiles) -> Result<(), String> {
    let tls = Arc::new(ClientTls::load(files).unwrap());
    let channel = connect(url, tls).await.map_err(|e| e.to_string())?;
    raft(channel).await.map_err(|s| format!("{s:?}"))
}

async fn poll_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_certificate_from_the_ca_is_accepted_and_its_role_enforced() {
    let d = Dir::new();
    let ca = new_ca("cluster-ca");
    let server = TestServer::start(d.files("srv", &ca, &[&ca], Role::Monitor, "m1", valid())).await;

    let m2 = d.files("m2", &ca, &[&ca], Role::Monitor, "m2", valid());
    call(&server.url, m2).await.unwrap();
    assert_eq!(
        server.seen(),
        vec![PeerIdentity::new(Role::Monitor, "m2").unwrap()]
    );

    // A valid certificate with the wrong role reaches the service and is denied there.
    let op = d.files("op", &ca, &[&ca], Role::Operator, "alice", valid());
    let tls = Arc::new(ClientTls::load(op).unwrap());
    let status = raft(connect(&server.url, tls).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        server.seen().last().unwrap(),
        &PeerIdentity::new(Role::Operator, "alice").unwrap()
    );
}

#[tokio::test]
async fn clients_without_a_valid_certificate_are_refused_and_the_server_goes_on() {
    let d = Dir::new();
    let ca = new_ca("cluster-ca");
    let server = TestServer::start(d.files("srv", &ca, &[&ca], Role::Monitor, "m1", valid())).await;

    // No client certificate at all: a raw TLS client that trusts the CA but offers nothing.
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::CertificateDer::pem_file_iter(server.tls.files().ca_bundle.clone())
            .unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.url.trim_start_matches("https://"))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let refused = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Err(_) => true,
        // TLS 1.3: the client finishes first; the server's refusal arrives as an alert.
        Ok(mut stream) => {
            let mut buf = [0u8; 16];
            matches!(
                tokio::time::timeout(DEADLINE, stream.read(&mut buf))
                    .await
                    .unwrap(),
                Err(_) | Ok(0)
            )
        }
    };
    assert!(refused, "a client without a certificate got a session");

    // A certificate from another CA, an expired one from the right CA.
    let rogue = new_ca("rogue-ca");
    let other_ca = d.files("rogue", &rogue, &[&ca], Role::Monitor, "m2", valid());
    let err = call(&server.url, other_ca).await.unwrap_err();
    assert!(!err.is_empty());
    let now = SystemTime::now();
    let expired = Validity::new(now - 2 * DAY, now - DAY).unwrap();
    let expired = d.files("expired", &ca, &[&ca], Role::Monitor, "m3", expired);
    call(&server.url, expired).await.unwrap_err();

    // None of them reached the service, and the accept loop still serves good clients.
    assert!(server.seen().is_empty(), "{:?}", server.seen());
    let good = d.files("good", &ca, &[&ca], Role::Monitor, "m2", valid());
    call(&server.url, good).await.unwrap();
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn an_optional_client_auth_server_admits_anonymous_clients_without_an_identity() {
    let d = Dir::new();
    let ca = new_ca("cluster-ca");
    let srv = d.files("srv", &ca, &[&ca], Role::Monitor, "m1", valid());
    let server = TestServer::start_with(srv.clone(), ClientAuth::Optional).await;

    // No certificate: the session opens, the call reaches the service without an identity.
    let anonymous = Arc::new(ClientTls::without_certificate(srv.ca_bundle.clone()).unwrap());
    let status = raft(connect(&server.url, anonymous).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(server.seen().is_empty());

    // A certificate from another CA is still refused in the handshake.
    let rogue = new_ca("rogue-ca");
    let other_ca = d.files("rogue", &rogue, &[&ca], Role::Monitor, "m2", valid());
    call(&server.url, other_ca).await.unwrap_err();
    assert!(server.seen().is_empty());

    // A good certificate is identified as before.
    call(
        &server.url,
        d.files("m2", &ca, &[&ca], Role::Monitor, "m2", valid()),
    )
    .await
    .unwrap();
    assert_eq!(
        server.seen(),
        vec![PeerIdentity::new(Role::Monitor, "m2").unwrap()]
    );
}

#[tokio::test]
async fn a_server_that_is_not_a_monitor_is_refused_by_clients() {
    let d = Dir::new();
    let ca = new_ca("cluster-ca");
    let server =
        TestServer::start(d.files("srv", &ca, &[&ca], Role::Postgres, "psql1", valid())).await;
    let m2 = d.files("m2", &ca, &[&ca], Role::Monitor, "m2", valid());
    let tls = Arc::new(ClientTls::load(m2).unwrap());
    match connect(&server.url, tls).await {
        Err(e) => assert!(e.to_string().contains("not a monitor"), "{e}"),
        Ok(_) => panic!("connected to a postgres certificate posing as a monitor"),
    }
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn rotation_to_a_new_ca_fails_no_call() {
    let d = Dir::new();
    let old = new_ca("ca-2026");
    let new = new_ca("ca-2027");
    let server =
        TestServer::start(d.files("srv", &old, &[&old], Role::Monitor, "m1", valid())).await;
    let client_files = d.files("m2", &old, &[&old], Role::Monitor, "m2", valid());
    let client = Arc::new(ClientTls::load(client_files.clone()).unwrap());

    // A caller that keeps going: each round one call on a long-lived channel (an existing
    // connection) and one on a brand-new connection (the configs current at that moment).
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let caller = {
        let (stop, ok, failures, client, url) = (
            stop.clone(),
            ok.clone(),
            failures.clone(),
            client.clone(),
            server.url.clone(),
        );
        tokio::spawn(async move {
            let long_lived = connect(&url, client.clone()).await.unwrap();
            while !stop.load(Ordering::SeqCst) {
                let fresh = match connect(&url, client.clone()).await {
                    Ok(ch) => raft(ch).await.map_err(|s| format!("fresh call: {s:?}")),
                    Err(e) => Err(format!("fresh connect: {e}")),
                };
                let results = [
                    raft(long_lived.clone())
                        .await
                        .map_err(|s| format!("long-lived: {s:?}")),
                    fresh,
                ];
                for r in results {
                    match r {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                }
            }
        })
    };
    let wait_for_more = |n: u64| {
        let target = ok.load(Ordering::SeqCst) + n;
        let ok = ok.clone();
        async move { poll_until("calls to succeed", || ok.load(Ordering::SeqCst) >= target).await }
    };
    wait_for_more(10).await;

    // Step 1: everyone trusts both CAs. The client first, then the server.
    write_bundle(&client_files.ca_bundle, &[&old, &new]);
    client.reload().unwrap();
    wait_for_more(10).await;
    // Step 2: the server switches to a certificate from the new CA and trusts both.
    let rotated = d.files("srv2", &new, &[&old, &new], Role::Monitor, "m1", valid());
    for (from, to) in [
        (&rotated.ca_bundle, &server.tls.files().ca_bundle),
        (&rotated.cert, &server.tls.files().cert),
        (&rotated.key, &server.tls.files().key),
    ] {
        std::fs::rename(from, to).unwrap();
    }
    server.tls.reload().unwrap();
    wait_for_more(10).await;

    // New connections now see the new server certificate: a client trusting only the new CA
    // gets in, and so does a client with a certificate from the new CA.
    let new_only = d.files("m3", &new, &[&new], Role::Monitor, "m3", valid());
    call(&server.url, new_only).await.unwrap();
    // Step 3: the client moves to a certificate from the new CA while still calling.
    let client_new = d.files("m2new", &new, &[&old, &new], Role::Monitor, "m2", valid());
    std::fs::rename(&client_new.cert, &client_files.cert).unwrap();
    std::fs::rename(&client_new.key, &client_files.key).unwrap();
    client.reload().unwrap();
    wait_for_more(10).await;

    stop.store(true, Ordering::SeqCst);
    caller.await.unwrap();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "failed calls during rotation: {failures:?}"
    );
    assert!(
        server
            .seen()
            .contains(&PeerIdentity::new(Role::Monitor, "m3").unwrap())
    );
}

#[tokio::test]
async fn a_joining_node_gets_a_certificate_for_its_csr_name_only() {
    let d = Dir::new();
    let ca = new_ca("cluster-ca");
    let server = TestServer::start(d.files("srv", &ca, &[&ca], Role::Monitor, "m1", valid())).await;

    let (csr, key) = generate_csr("e1server").unwrap();
    match ca.sign_csr(&csr, Role::Ejabberd, "e2server", &[], valid()) {
        Err(ha_pki::CaError::CsrNameMismatch { expected, found }) => {
            assert_eq!(
                (expected.as_str(), found.as_str()),
                ("e2server", "e1server")
            );
        }
        other => panic!("mismatched CSR not refused: {other:?}"),
    }
    // Renaming the subject inside a CSR breaks its signature: refused too.
    let tampered = rename_in_csr(&csr, b"e1server", b"e2server");
    match ca.sign_csr(&tampered, Role::Ejabberd, "e2server", &[], valid()) {
        Err(ha_pki::CaError::InvalidCsr(_)) => {}
        other => panic!("tampered CSR not refused: {other:?}"),
    }

    let cert = ca
        .sign_csr(
            &csr,
            Role::Ejabberd,
            "e1server",
            &["192.0.2.2".to_owned()],
            valid(),
        )
        .unwrap();
    let files = TlsFiles {
        ca_bundle: d.path("e1.ca"),
        cert: d.path("e1.crt"),
        key: d.path("e1.key"),
    };
    write_bundle(&files.ca_bundle, &[&ca]);
    write_public_file(&files.cert, cert.as_bytes()).unwrap();
    write_key_file(&files.key, key.as_bytes()).unwrap();
    let err = call(&server.url, files).await.unwrap_err();
    assert!(err.contains("PermissionDenied"), "{err}");
    assert_eq!(
        server.seen(),
        vec![PeerIdentity::new(Role::Ejabberd, "e1server").unwrap()]
    );
}

fn rename_in_csr(csr_pem: &str, from: &[u8], to: &[u8]) -> String {
    use base64::Engine as _;
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
    let mut der = der.as_ref().to_vec();
    let at = der.windows(from.len()).position(|w| w == from).unwrap();
    der[at..at + to.len()].copy_from_slice(to);
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n")
}

#[tokio::test]
async fn a_world_readable_key_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new();
    let ca = new_ca("cluster-ca");
    let files = d.files("srv", &ca, &[&ca], Role::Monitor, "m1", valid());
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    match ServerTls::load(files.clone()) {
        Err(TlsError::File(FileError::InsecurePermissions { mode, .. })) => {
            assert_eq!(mode, 0o644)
        }
        other => panic!("0644 key accepted: {other:?}"),
    }
    assert!(matches!(
        ClientTls::load(files),
        Err(TlsError::File(FileError::InsecurePermissions { .. }))
    ));
}

#[tokio::test]
async fn the_watcher_reloads_on_file_change_and_on_sighup() {
    let d = Dir::new();
    let ca = new_ca("cluster-ca");
    let files = d.files("srv", &ca, &[&ca], Role::Monitor, "m1", valid());
    let tls = Arc::new(ServerTls::load(files.clone()).unwrap());
    let watcher = ReloadWatcher::new(
        vec![tls.clone() as Arc<dyn Reload>],
        Duration::from_millis(50),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(watcher.run(async {
        let _ = stopped.await;
    }));

    let before = tls.current();
    let renewed = ca.issue("m1", Role::Monitor, &[], valid()).unwrap();
    // Key first, then certificate: the watcher may see a mismatched pair in between and must
    // keep the old config until the pair matches.
    write_key_file(&files.key, renewed.key_pem.as_bytes()).unwrap();
    write_public_file(&files.cert, renewed.cert_pem.as_bytes()).unwrap();
    poll_until("file-change reload", || {
        !Arc::ptr_eq(&before, &tls.current())
    })
    .await;

    let before = tls.current();
    nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGHUP).unwrap();
    poll_until("SIGHUP reload", || !Arc::ptr_eq(&before, &tls.current())).await;

    let _ = stop.send(());
    task.await.unwrap();
}

/// The check a holder runs on its own certificate: chain to the bundle, validity, identity. A
/// checked client refuses such a certificate at load and keeps its config when one is written
/// over a good one; the unchecked `load` (what the refusal tests above present) takes it.
#[tokio::test]
async fn a_checked_client_refuses_a_foreign_expired_or_misnamed_certificate() {
    let d = Dir::new();
    let ca = new_ca("cluster-ca");
    let rogue = new_ca("rogue-ca");
    let me = PeerIdentity::new(Role::Postgres, "psql1").unwrap();
    let now = SystemTime::now();
    let expired = Validity::new(now - 2 * DAY, now - DAY).unwrap();
    let not_yet = Validity::new(now + DAY, now + 2 * DAY).unwrap();
    let cases = [
        (
            "foreign",
            &rogue,
            "psql1",
            valid(),
            "is not signed by the cluster CA in",
        ),
        ("expired", &ca, "psql1", expired, "has expired"),
        ("not-yet", &ca, "psql1", not_yet, "is not valid yet"),
        (
            "misnamed",
            &ca,
            "psql2",
            valid(),
            "is the certificate of postgres/psql2, not of postgres/psql1",
        ),
    ];
    for (prefix, issuer, name, validity, reason) in cases {
        let files = d.files(prefix, issuer, &[&ca], Role::Postgres, name, validity);
        let err = ClientTls::load_checked(files.clone(), me.clone())
            .unwrap_err()
            .to_string();
        let cert = files.cert.display().to_string();
        assert!(err.starts_with(&format!("certificate {cert} ")), "{err}");
        assert!(err.contains(reason), "{prefix}: {err}");
        ClientTls::load(files).unwrap();
    }

    let good = d.files("good", &ca, &[&ca], Role::Postgres, "psql1", valid());
    let tls = ClientTls::load_checked(good.clone(), me.clone()).unwrap();
    let before = tls.current();
    let foreign = rogue.issue("psql1", Role::Postgres, &[], valid()).unwrap();
    write_key_file(&good.key, foreign.key_pem.as_bytes()).unwrap();
    write_public_file(&good.cert, foreign.cert_pem.as_bytes()).unwrap();
    assert!(matches!(tls.reload(), Err(TlsError::Untrusted { .. })));
    assert!(Arc::ptr_eq(&before, &tls.current()), "the old config stays");
    let renewed = ca.issue("psql1", Role::Postgres, &[], valid()).unwrap();
    write_key_file(&good.key, renewed.key_pem.as_bytes()).unwrap();
    write_public_file(&good.cert, renewed.cert_pem.as_bytes()).unwrap();
    tls.reload().unwrap();
    assert!(!Arc::ptr_eq(&before, &tls.current()));
}

/// One TLS handshake with `client` against a server presenting `server` (its own CA bundle
/// and the server side's usual client verification), the client asking for `name`.
async fn handshake_as(
    server: &TlsFiles,
    client: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<(), String> {
    let acceptor =
        tokio_rustls::TlsAcceptor::from(ServerTls::load(server.clone()).unwrap().current());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // The client's view is what is checked; the server side may fail with it.
        let _ = acceptor.accept(tcp).await;
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let outcome = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    accept.await.unwrap();
    outcome
}

/// Through a TCP proxy the name connected to is the proxy's: the usual config refuses the
/// server for it, the proxy config accepts any PostgreSQL node of the CA instead, and still
/// refuses a monitor's certificate and a certificate of another CA.
#[tokio::test]
async fn through_a_proxy_any_postgres_node_of_the_ca_and_nothing_else() {
    let d = Dir::new();
    let ca = new_ca("cluster-ca");
    let other = new_ca("other-ca");
    let operator = d.files("op", &ca, &[&ca], Role::Operator, "alice", valid());
    let tls = ClientTls::load(operator).unwrap();
    let psql1 = d.files("psql1", &ca, &[&ca], Role::Postgres, "psql1", valid());
    let m1 = d.files("m1", &ca, &[&ca], Role::Monitor, "m1", valid());
    let foreign = d.files(
        "foreign",
        &other,
        &[&other, &ca],
        Role::Postgres,
        "psql1",
        valid(),
    );
    let proxy = tls.through_proxy(Role::Postgres).unwrap();

    let direct = handshake_as(&psql1, tls.current(), "proxy.invalid").await;
    let direct = direct.unwrap_err();
    assert!(
        direct.contains("not valid for name"),
        "the name is checked: {direct}"
    );
    handshake_as(&psql1, proxy.clone(), "proxy.invalid")
        .await
        .unwrap();
    let monitor = handshake_as(&m1, proxy.clone(), "proxy.invalid").await;
    let monitor = monitor.unwrap_err();
    assert!(
        monitor.contains("not a postgres certificate"),
        "a monitor's certificate is not a PostgreSQL node's: {monitor}"
    );
    let stranger = handshake_as(&foreign, proxy, "proxy.invalid").await;
    let stranger = stranger.unwrap_err();
    assert!(
        stranger.contains("UnknownIssuer"),
        "the chain is checked: {stranger}"
    );
}
