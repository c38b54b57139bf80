//! Mutual TLS through real `ha-monitor` processes on loopback (no `--dev`): a 3-monitor cluster
//! whose peers speak Raft over mutual TLS, a node that joins with a CSR and reports with the
//! certificate it got, every kind of refused caller (each refused, and the catalog unchanged as
//! an operator's Status and Events show), and a live rotation of the monitor certificates and of
//! the CA (with the overlap bundle) while a client keeps calling, with zero failed calls.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ha_pki::{Ca, ClientTls, Role, TlsFiles, Validity, write_key_file, write_public_file};
use ha_proto::v1::agent_service_client::AgentServiceClient;
use ha_proto::v1::operator_service_client::OperatorServiceClient;
use ha_proto::v1::peer_service_client::PeerServiceClient;
use ha_proto::v1::{
    CreateJoinTokenRequest, Endpoint, EventsRequest, JoinRequest, NodeKind, ObservedState,
    RaftBatch, RemoveNodeRequest, RenewRequest, ReportRequest, RevokeCertificateRequest,
    SetMaintenanceRequest, SetNodeSettingsRequest, StatusRequest, SwitchoverRequest,
    WatchGoalRequest,
};
use ha_tests::{ChildGuard, free_port};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

const DAY: Duration = Duration::from_secs(86_400);
const DEADLINE: Duration = Duration::from_secs(30);

fn valid() -> Validity {
    Validity::starting_now(DAY).unwrap()
}

fn write_bundle(path: &Path, cas: &[&Ca]) {
    let pems: Vec<&str> = cas.iter().map(|c| c.cert_pem()).collect();
    let bundle = ha_pki::merge_ca_bundle(&pems, SystemTime::now()).unwrap();
    write_public_file(path, bundle.as_bytes()).unwrap();
}

/// A directory of TLS material and three monitor processes using it.
struct Cluster {
    dir: tempfile::TempDir,
    ca: Ca,
    addrs: BTreeMap<u64, String>,
    children: BTreeMap<u64, ChildGuard>,
}

impl Cluster {
    fn start() -> Self {
        ha_pki::install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("cluster-ca", Validity::starting_now(30 * DAY).unwrap()).unwrap();
        let addrs: BTreeMap<u64, String> = (1..=3)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut c = Cluster {
            dir,
            ca,
            addrs,
            children: BTreeMap::new(),
        };
        write_key_file(&c.path("ca.key"), c.ca.key_pem().as_bytes()).unwrap();
        for id in 1..=3 {
            let files = c.monitor_files(id);
            write_bundle(&files.ca_bundle, &[&c.ca]);
            c.issue_into(&c.ca, &files, Role::Monitor, &format!("monitor-{id}"));
            c.spawn(id);
        }
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn files(&self, prefix: &str) -> TlsFiles {
        TlsFiles {
            ca_bundle: self.path(&format!("{prefix}.ca")),
            cert: self.path(&format!("{prefix}.pem")),
            key: self.path(&format!("{prefix}.key")),
        }
    }

    fn monitor_files(&self, id: u64) -> TlsFiles {
        self.files(&format!("m{id}"))
    }

    /// Writes a certificate `ca` issues for `name` in `role` (valid for 127.0.0.1) into `files`.
    fn issue_into(&self, ca: &Ca, files: &TlsFiles, role: Role, name: &str) {
        self.issue_with(ca, files, role, name, valid());
    }

    fn issue_with(&self, ca: &Ca, files: &TlsFiles, role: Role, name: &str, validity: Validity) {
        let issued = ca
            .issue(name, role, &["127.0.0.1".to_owned()], validity)
            .unwrap();
        write_key_file(&files.key, issued.key_pem.as_bytes()).unwrap();
        write_public_file(&files.cert, issued.cert_pem.as_bytes()).unwrap();
    }

    /// Client files for a certificate of `ca`, trusting the cluster CA bundle.
    fn client(&self, prefix: &str, ca: &Ca, role: Role, name: &str) -> Arc<ClientTls> {
        let files = self.files(prefix);
        write_bundle(&files.ca_bundle, &[&self.ca]);
        self.issue_into(ca, &files, role, name);
        Arc::new(ClientTls::load(files).unwrap())
    }

    fn spawn(&mut self, id: u64) {
        let members: Vec<String> = self
            .addrs
            .iter()
            .map(|(i, a)| format!("{{ id = {i}, address = \"{a}\" }}"))
            .collect();
        let files = self.monitor_files(id);
        let config = format!(
            "id = {id}\ndata_dir = \"{}\"\nlisten = \"{}\"\nmembers = [{}]\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nca_key = \"{}\"\n",
            self.path(&format!("m{id}")).display(),
            self.addrs[&id],
            members.join(", "),
            files.ca_bundle.display(),
            files.cert.display(),
            files.key.display(),
            self.path("ca.key").display(),
        );
        let config_path = self.path(&format!("m{id}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(self.path(&format!("m{id}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ha-monitor"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.insert(id, ChildGuard::new(child));
    }

    /// Asks every monitor to reload its certificates now (the file watcher would, later).
    fn sighup_all(&self) {
        for child in self.children.values() {
            let ok = Command::new("kill")
                .arg("-HUP")
                .arg(child.id().to_string())
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot signal monitor pid {}", child.id());
        }
    }

    fn url(&self, id: u64) -> String {
        format!("https://{}", self.addrs[&id])
    }

    fn channel(&self, id: u64, tls: &Arc<ClientTls>) -> Channel {
        ha_pki::endpoint(&self.url(id))
            .unwrap()
            .timeout(Duration::from_secs(3))
            .connect_with_connector_lazy(ha_pki::MtlsConnector::new(tls.clone()))
    }

    /// The leader's id, as answered to a linearizable status by `operator`.
    async fn leader(&self, operator: &Arc<ClientTls>) -> u64 {
        let end = Instant::now() + DEADLINE;
        loop {
            for id in self.addrs.keys() {
                let mut c = OperatorServiceClient::new(self.channel(*id, operator));
                if let Ok(s) = c.status(StatusRequest { linearizable: true }).await {
                    return s.into_inner().answered_by;
                }
            }
            assert!(Instant::now() < end, "no leader within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The registered nodes and every event (linearizable reads of the leader).
async fn nodes_and_events(channel: Channel) -> (Vec<String>, Vec<ha_proto::v1::Event>) {
    let mut op = OperatorServiceClient::new(channel);
    let status = op
        .status(StatusRequest { linearizable: true })
        .await
        .unwrap()
        .into_inner();
    let events = op
        .events(EventsRequest {
            after_seq: 0,
            limit: 10_000,
        })
        .await
        .unwrap()
        .into_inner();
    (
        status.nodes.into_iter().map(|n| n.name).collect(),
        events.events,
    )
}

/// The registered nodes and the event log as (seq, node). The leader's own decisions about
/// psql1 may add events meanwhile; a refused call must add no node and no event naming another.
async fn catalog_view(channel: Channel) -> (Vec<String>, Vec<(u64, String)>) {
    let (nodes, events) = nodes_and_events(channel).await;
    (nodes, events.into_iter().map(|e| (e.seq, e.node)).collect())
}

fn join_request(token: &str, node: &str, csr_pem: &str) -> JoinRequest {
    JoinRequest {
        token: token.to_owned(),
        node: node.to_owned(),
        kind: NodeKind::Postgres.into(),
        endpoint: Some(Endpoint {
            host: "127.0.0.1".to_owned(),
            port: 5432,
        }),
        csr_pem: csr_pem.to_owned(),
        group: String::new(),
    }
}

fn report(node: &str) -> ReportRequest {
    ReportRequest {
        observed: Some(ObservedState {
            node: node.to_owned(),
            kind: NodeKind::Postgres.into(),
            ..Default::default()
        }),
    }
}

fn token_request(id: &str, node: &str, ttl_ms: u64) -> CreateJoinTokenRequest {
    CreateJoinTokenRequest {
        request_id: id.to_owned(),
        kind: NodeKind::Postgres.into(),
        ttl_ms,
        group: String::new(),
        node: node.to_owned(),
        address: "127.0.0.1".to_owned(),
    }
}

async fn token(
    op: &mut OperatorServiceClient<Channel>,
    id: &str,
    node: &str,
    ttl_ms: u64,
) -> (String, u64) {
    let t = op
        .create_join_token(token_request(id, node, ttl_ms))
        .await
        .unwrap()
        .into_inner();
    (t.token, t.expires_at_unix_ms)
}

fn assert_code<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>, code: Code) {
    match result {
        Ok(v) => panic!("{what}: accepted ({v:?})"),
        Err(s) => assert_eq!(s.code(), code, "{what}: {s:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_a_csr_and_every_unauthorized_caller_is_refused() {
    let cluster = Cluster::start();
    let operator = cluster.client("alice", &cluster.ca, Role::Operator, "alice");
    let leader = cluster.leader(&operator).await;
    let mut op = OperatorServiceClient::new(cluster.channel(leader, &operator));

    // Happy path: join without a certificate, with a CSR; get a certificate; report with it.
    let (secret, _) = token(&mut op, "t-psql1", "psql1", 3_600_000).await;
    let anonymous = Arc::new(
        ClientTls::without_certificate(cluster.monitor_files(1).ca_bundle.clone()).unwrap(),
    );
    let mut joiner = AgentServiceClient::new(cluster.channel(leader, &anonymous));
    let (csr, key) = ha_pki::generate_csr("psql1").unwrap();
    let joined = joiner
        .join(join_request(&secret, "psql1", &csr))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.monitors.len(), 3);
    let info = ha_pki::CertInfo::from_pem(&joined.certificate_pem).unwrap();
    assert_eq!(
        info.identity,
        Some(ha_pki::PeerIdentity::new(Role::Postgres, "psql1").unwrap())
    );
    let psql1_files = cluster.files("psql1");
    write_public_file(&psql1_files.ca_bundle, joined.ca_pem.as_bytes()).unwrap();
    write_public_file(&psql1_files.cert, joined.certificate_pem.as_bytes()).unwrap();
    write_key_file(&psql1_files.key, key.as_bytes()).unwrap();
    let psql1 = Arc::new(ClientTls::load(psql1_files).unwrap());
    let mut agent = AgentServiceClient::new(cluster.channel(leader, &psql1));
    agent.report(report("psql1")).await.unwrap();

    // The join's answer lost (a timeout, a leader change): the same request again is answered
    // again, with a new certificate for the same key, recorded like the first ...
    let again = joiner
        .join(join_request(&secret, "psql1", &csr))
        .await
        .unwrap()
        .into_inner();
    let again_info = ha_pki::CertInfo::from_pem(&again.certificate_pem).unwrap();
    assert_eq!(again_info.identity, info.identity);
    assert_eq!(again_info.public_key_sha256, info.public_key_sha256);
    assert_ne!(again_info.serial, info.serial);
    let (_, events) = nodes_and_events(cluster.channel(leader, &operator)).await;
    assert!(
        events
            .iter()
            .any(|e| e.message.contains(&again_info.serial) && e.node == "psql1"),
        "the retried join's certificate is not recorded: {events:?}"
    );
    // ... while the used token with another key, or the same key and another address, is
    // refused: only the node that joined can ask again.
    let (other_csr, _) = ha_pki::generate_csr("psql1").unwrap();
    assert_refused(
        "join with the used token and another key",
        joiner
            .join(join_request(&secret, "psql1", &other_csr))
            .await,
        Code::PermissionDenied,
        "join token was already used",
    );
    let mut moved = join_request(&secret, "psql1", &csr);
    moved.endpoint = Some(Endpoint {
        host: "127.0.0.2".to_owned(),
        port: 5432,
    });
    assert_refused(
        "join with the used token from another address",
        joiner.join(moved).await,
        Code::PermissionDenied,
        "the token is for address 127.0.0.1",
    );

    // A second token, for the refused joins below, and a short-lived one that will expire.
    let (spare, _) = token(&mut op, "t-spare", "psql2", 3_600_000).await;
    let (short, expires_at) = token(&mut op, "t-short", "psql2", 1).await;
    let before = catalog_view(cluster.channel(leader, &operator)).await;
    assert_eq!(before.0, vec!["psql1".to_owned()]);

    // No client certificate on anything but Join.
    assert_code(
        "report without a certificate",
        joiner.report(report("psql1")).await,
        Code::Unauthenticated,
    );
    let mut anon_op = OperatorServiceClient::new(cluster.channel(leader, &anonymous));
    assert_code(
        "status without a certificate",
        anon_op
            .status(StatusRequest {
                linearizable: false,
            })
            .await,
        Code::Unauthenticated,
    );
    // A certificate from another CA, and an expired one: the handshake fails.
    let rogue = Ca::create("rogue-ca", Validity::starting_now(30 * DAY).unwrap()).unwrap();
    let rogue_op = cluster.client("rogue", &rogue, Role::Operator, "mallory");
    assert!(
        OperatorServiceClient::new(cluster.channel(leader, &rogue_op))
            .status(StatusRequest {
                linearizable: false
            })
            .await
            .is_err()
    );
    let expired_files = cluster.files("expired");
    write_bundle(&expired_files.ca_bundle, &[&cluster.ca]);
    let now = SystemTime::now();
    cluster.issue_with(
        &cluster.ca,
        &expired_files,
        Role::Operator,
        "old",
        Validity::new(now - 2 * DAY, now - DAY).unwrap(),
    );
    let expired = Arc::new(ClientTls::load(expired_files).unwrap());
    assert!(
        OperatorServiceClient::new(cluster.channel(leader, &expired))
            .status(StatusRequest {
                linearizable: false
            })
            .await
            .is_err()
    );
    // An agent reporting for another node, or calling an operator command.
    assert_code(
        "psql1 reporting for psql2",
        agent.report(report("psql2")).await,
        Code::PermissionDenied,
    );
    // A follower relays a node's report to the leader and hands back the leader's lease (one
    // cut link between a primary and the leader does not fence it) ...
    let follower = *cluster.addrs.keys().find(|id| **id != leader).unwrap();
    let relayed = AgentServiceClient::new(cluster.channel(follower, &psql1))
        .report(report("psql1"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        relayed.lease_ms > 0,
        "no lease through the follower: {relayed:?}"
    );
    // ... but a node cannot pass a report off as relayed, to the leader or to a follower.
    for (id, whom) in [(leader, "the leader"), (follower, "a follower")] {
        let mut forged = tonic::Request::new(report("psql2"));
        forged
            .metadata_mut()
            .insert(ha_proto::RELAYED_BY_METADATA, "2".parse().unwrap());
        assert_code(
            &format!("psql1 forging a relayed report for psql2 to {whom}"),
            AgentServiceClient::new(cluster.channel(id, &psql1))
                .report(forged)
                .await,
            Code::PermissionDenied,
        );
    }
    let mut agent_as_op = OperatorServiceClient::new(cluster.channel(leader, &psql1));
    assert_code(
        "an agent asking for a switchover",
        agent_as_op
            .switchover(SwitchoverRequest {
                request_id: "sw-by-agent".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
    );
    // Raft from a non-monitor certificate, and from a monitor speaking for another.
    let batch = || RaftBatch {
        from: 2,
        messages: vec![],
    };
    assert_code(
        "raft from an operator",
        PeerServiceClient::new(cluster.channel(leader, &operator))
            .raft(batch())
            .await,
        Code::PermissionDenied,
    );
    let impostor = cluster.client("m9", &cluster.ca, Role::Monitor, "monitor-9");
    assert_code(
        "raft from monitor-9 claiming to be monitor 2",
        PeerServiceClient::new(cluster.channel(leader, &impostor))
            .raft(batch())
            .await,
        Code::PermissionDenied,
    );
    // Tokens: reused, forged, expired.
    let (csr2, _) = ha_pki::generate_csr("psql2").unwrap();
    assert_code(
        "a reused token",
        joiner.join(join_request(&secret, "psql2", &csr2)).await,
        Code::PermissionDenied,
    );
    let last = if spare.ends_with('x') { 'y' } else { 'x' };
    let forged = format!("{}{last}", &spare[..spare.len() - 1]);
    assert_code(
        "a forged token",
        joiner.join(join_request(&forged, "psql2", &csr2)).await,
        Code::PermissionDenied,
    );
    let wait = expires_at.saturating_sub(
        u64::try_from(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(wait + 10)).await;
    assert_code(
        "an expired token",
        joiner.join(join_request(&short, "psql2", &csr2)).await,
        Code::PermissionDenied,
    );
    // A CSR naming another node than the join, with a good token.
    let (csr3, _) = ha_pki::generate_csr("psql3").unwrap();
    assert_code(
        "a CSR for another name",
        joiner.join(join_request(&spare, "psql2", &csr3)).await,
        Code::InvalidArgument,
    );
    // The token names the node and its address: a joiner can choose neither. A token for a
    // frontend or a database node never yields an `operator` certificate, whose name logs into
    // PostgreSQL as its superuser.
    let (csr_operator, _) = ha_pki::generate_csr("operator").unwrap();
    assert_code(
        "psql2's token used by a joiner calling itself operator",
        joiner
            .join(join_request(&spare, "operator", &csr_operator))
            .await,
        Code::PermissionDenied,
    );
    let mut elsewhere = join_request(&spare, "psql2", &csr2);
    elsewhere.endpoint = Some(Endpoint {
        host: "127.0.0.2".to_owned(),
        port: 5432,
    });
    assert_code(
        "psql2's token used with another address (the primary's, to impersonate it)",
        joiner.join(elsewhere).await,
        Code::PermissionDenied,
    );
    for (node, what) in [
        ("operator", "a token for a node named operator"),
        ("monitor", "a token for a node named monitor"),
        ("", "a token for no node in particular"),
    ] {
        assert_code(
            what,
            op.create_join_token(token_request(&format!("t-{what}"), node, 60_000))
                .await,
            Code::InvalidArgument,
        );
    }
    let mut bad_address = token_request("t-bad-address", "psql3", 60_000);
    bad_address.address = "10.0.0.1/8".into();
    assert_code(
        "a token with a malformed address",
        op.create_join_token(bad_address).await,
        Code::InvalidArgument,
    );

    let after = catalog_view(cluster.channel(leader, &operator)).await;
    assert_eq!(after.0, before.0, "a refused call registered a node");
    let last_seq = before.1.last().map_or(0, |e| e.0);
    let foreign: Vec<_> = after
        .1
        .iter()
        .filter(|(seq, node)| *seq > last_seq && !node.is_empty() && node != "psql1")
        .collect();
    assert!(
        foreign.is_empty(),
        "a refused call left events: {foreign:?}"
    );
    // haclt over TLS with the operator certificate from its config file.
    let alice = cluster.files("alice");
    let haclt_config = cluster.path("haclt.toml");
    std::fs::write(
        &haclt_config,
        format!(
            "monitors = [{}]\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            cluster
                .addrs
                .values()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", "),
            alice.ca_bundle.display(),
            alice.cert.display(),
            alice.key.display()
        ),
    )
    .unwrap();
    let out = Command::new(&ha_tests::bins::binaries().haclt)
        .arg("--config")
        .arg(&haclt_config)
        .args(["status", "--json"])
        .output()
        .unwrap();
    // 3: answered, and degraded (psql1 has no agent running here).
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "haclt status over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status.to_string().contains("psql1"),
        "haclt status shows no psql1: {status}"
    );

    // The good token still works after all that.
    joiner
        .join(join_request(&spare, "psql2", &csr2))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_certificates_and_the_ca_rotate_without_a_failed_call() {
    let cluster = Cluster::start();
    let client_files = cluster.files("alice");
    let operator = cluster.client("alice", &cluster.ca, Role::Operator, "alice");
    cluster.leader(&operator).await;

    // A client that opens a new connection for every call, so every call runs a handshake
    // against the configs current at that moment, round robin over the monitors.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let urls: Vec<String> = (1..=3).map(|id| cluster.url(id)).collect();
    let caller = {
        let (stop, calls, failures, tls) = (
            stop.clone(),
            calls.clone(),
            failures.clone(),
            operator.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let url = &urls[i % urls.len()];
                let outcome = match ha_pki::connect(url, tls.clone()).await {
                    Ok(ch) => OperatorServiceClient::new(ch)
                        .status(StatusRequest {
                            linearizable: false,
                        })
                        .await
                        .map(|_| ())
                        .map_err(|s| format!("{s:?}")),
                    Err(e) => Err(e.to_string()),
                };
                calls.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = outcome {
                    eprintln!("call to {url} failed: {e}");
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Succeeds on every monitor with a fresh connection.
    let all_accept = |tls: Arc<ClientTls>| {
        let urls: Vec<String> = (1..=3).map(|id| cluster.url(id)).collect();
        async move {
            for url in urls {
                let Ok(ch) = ha_pki::connect(&url, tls.clone()).await else {
                    return false;
                };
                if OperatorServiceClient::new(ch)
                    .status(StatusRequest {
                        linearizable: false,
                    })
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            true
        }
    };
    async fn poll(what: &str, mut cond: impl AsyncFnMut() -> bool) {
        let end = Instant::now() + DEADLINE;
        while !cond().await {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // 1. Every party trusts the old and the new CA.
    let new_ca = Ca::create("cluster-ca-2", Validity::starting_now(30 * DAY).unwrap()).unwrap();
    for id in 1..=3 {
        write_bundle(
            &cluster.monitor_files(id).ca_bundle,
            &[&cluster.ca, &new_ca],
        );
    }
    write_bundle(&client_files.ca_bundle, &[&cluster.ca, &new_ca]);
    ha_pki::Reload::reload(operator.as_ref()).unwrap();
    cluster.sighup_all();
    let new_client = cluster.client("bob", &new_ca, Role::Operator, "bob");
    poll("monitors trusting the new CA", async || {
        all_accept(new_client.clone()).await
    })
    .await;

    // 2. Monitors get certificates from the new CA.
    for id in 1..=3 {
        let files = cluster.monitor_files(id);
        cluster.issue_into(&new_ca, &files, Role::Monitor, &format!("monitor-{id}"));
    }
    cluster.sighup_all();
    let new_only_files = cluster.files("carol");
    write_bundle(&new_only_files.ca_bundle, &[&new_ca]);
    cluster.issue_into(&new_ca, &new_only_files, Role::Operator, "carol");
    let new_only = Arc::new(ClientTls::load(new_only_files).unwrap());
    poll("monitors presenting new certificates", async || {
        all_accept(new_only.clone()).await
    })
    .await;

    // 3. The client moves to the new CA; then the old CA is dropped everywhere.
    cluster.issue_into(&new_ca, &client_files, Role::Operator, "alice");
    ha_pki::Reload::reload(operator.as_ref()).unwrap();
    for id in 1..=3 {
        write_bundle(&cluster.monitor_files(id).ca_bundle, &[&new_ca]);
    }
    write_bundle(&client_files.ca_bundle, &[&new_ca]);
    ha_pki::Reload::reload(operator.as_ref()).unwrap();
    cluster.sighup_all();
    let old_client = cluster.client("dave", &cluster.ca, Role::Operator, "dave");
    poll("monitors refusing the old CA", async || {
        !all_accept(old_client.clone()).await
    })
    .await;

    // Raft between the monitors still works over the new certificates.
    let before = calls.load(Ordering::SeqCst);
    poll("more calls after the rotation", async || {
        calls.load(Ordering::SeqCst) > before + 10
    })
    .await;
    cluster.leader(&operator).await;
    stop.store(true, Ordering::SeqCst);
    caller.await.unwrap();
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "calls failed during rotation (of {})",
        calls.load(Ordering::SeqCst)
    );
}

/// The registered nodes and every event about registrations and certificates, as text: what a
/// refused call must leave as it was (the leader's own decisions add other events meanwhile).
async fn registrations(channel: Channel) -> (Vec<String>, Vec<String>) {
    let (nodes, events) = nodes_and_events(channel).await;
    (
        nodes,
        events
            .into_iter()
            .filter(|e| e.kind.starts_with("certificate_") || e.kind.starts_with("node_r"))
            .map(|e| format!("{} {} {}", e.seq, e.kind, e.message))
            .collect(),
    )
}

/// Client files `prefix` holding `cert_pem` and `key_pem`, trusting the cluster CA.
fn node_client(cluster: &Cluster, prefix: &str, cert_pem: &str, key_pem: &str) -> Arc<ClientTls> {
    let files = cluster.files(prefix);
    write_bundle(&files.ca_bundle, &[&cluster.ca]);
    write_public_file(&files.cert, cert_pem.as_bytes()).unwrap();
    write_key_file(&files.key, key_pem.as_bytes()).unwrap();
    Arc::new(ClientTls::load(files).unwrap())
}

/// Joins `node` with a fresh token and CSR; returns its certificate, its key and the token.
async fn join_node(
    cluster: &Cluster,
    leader: u64,
    op: &mut OperatorServiceClient<Channel>,
    token_id: &str,
    node: &str,
) -> (String, String, String) {
    let (secret, _) = token(op, token_id, node, 3_600_000).await;
    let anonymous = Arc::new(
        ClientTls::without_certificate(cluster.monitor_files(1).ca_bundle.clone()).unwrap(),
    );
    let (csr, key) = ha_pki::generate_csr(node).unwrap();
    let joined = AgentServiceClient::new(cluster.channel(leader, &anonymous))
        .join(join_request(&secret, node, &csr))
        .await
        .unwrap()
        .into_inner();
    (joined.certificate_pem, key, secret)
}

fn serial(pem: &str) -> String {
    ha_pki::CertInfo::from_pem(pem).unwrap().serial
}

fn renew_request(node: &str, csr_pem: &str) -> RenewRequest {
    RenewRequest {
        node: node.to_owned(),
        csr_pem: csr_pem.to_owned(),
    }
}

/// Asserts that `result` is a refusal with `code` whose message contains `text`.
fn assert_refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, tonic::Status>,
    code: Code,
    text: &str,
) {
    match result {
        Ok(v) => panic!("{what}: accepted ({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            assert!(
                s.message().contains(text),
                "{what}: {:?} lacks {text:?}",
                s.message()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_the_identity_and_a_removed_nodes_certificates_are_refused() {
    let cluster = Cluster::start();
    let operator = cluster.client("alice", &cluster.ca, Role::Operator, "alice");
    let leader = cluster.leader(&operator).await;
    let mut op = OperatorServiceClient::new(cluster.channel(leader, &operator));
    // psql1 bootstraps the group (its primary); psql2 is the node renewed and removed.
    let (cert1, key1, _) = join_node(&cluster, leader, &mut op, "t-psql1", "psql1").await;
    let psql1 = node_client(&cluster, "psql1", &cert1, &key1);
    let (old_pem, old_key, used_token) =
        join_node(&cluster, leader, &mut op, "t-psql2", "psql2").await;
    let old = node_client(&cluster, "psql2-old", &old_pem, &old_key);
    let mut old_agent = AgentServiceClient::new(cluster.channel(leader, &old));
    old_agent.report(report("psql2")).await.unwrap();

    // Renewal for another identity: refused, nothing recorded.
    let before = registrations(cluster.channel(leader, &operator)).await;
    let (csr_other, _) = ha_pki::generate_csr("psql1").unwrap();
    assert_refused(
        "psql2 renewing for psql1",
        old_agent.renew(renew_request("psql1", &csr_other)).await,
        Code::PermissionDenied,
        "may not act for node psql1",
    );
    assert_refused(
        "psql2 renewing with a CSR named psql1",
        old_agent.renew(renew_request("psql2", &csr_other)).await,
        Code::InvalidArgument,
        "renewal refused: CSR",
    );
    let (csr_new, key_new) = ha_pki::generate_csr("psql2").unwrap();
    assert_refused(
        "the operator renewing psql2",
        AgentServiceClient::new(cluster.channel(leader, &operator))
            .renew(renew_request("psql2", &csr_new))
            .await,
        Code::PermissionDenied,
        "is not a node agent certificate",
    );
    assert_refused(
        "psql1 renewing for psql2",
        AgentServiceClient::new(cluster.channel(leader, &psql1))
            .renew(renew_request("psql2", &csr_new))
            .await,
        Code::PermissionDenied,
        "may not act for node psql2",
    );
    assert_eq!(
        registrations(cluster.channel(leader, &operator)).await,
        before,
        "a refused renewal changed the catalog"
    );

    // The real renewal: same name, role and address; the old certificate stays valid.
    let renewed = old_agent
        .renew(renew_request("psql2", &csr_new))
        .await
        .unwrap()
        .into_inner();
    let info = ha_pki::CertInfo::from_pem(&renewed.certificate_pem).unwrap();
    assert_eq!(
        info.identity,
        Some(ha_pki::PeerIdentity::new(Role::Postgres, "psql2").unwrap())
    );
    assert_ne!(info.serial, serial(&old_pem));
    let new = node_client(&cluster, "psql2-new", &renewed.certificate_pem, &key_new);
    let mut new_agent = AgentServiceClient::new(cluster.channel(leader, &new));
    new_agent.report(report("psql2")).await.unwrap();
    old_agent.report(report("psql2")).await.unwrap();

    // Removal revokes both; every call with either is refused with the reason.
    let removed = op
        .remove_node(RemoveNodeRequest {
            request_id: "remove-psql2".into(),
            node: "psql2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        removed.message.contains(&serial(&old_pem)) && removed.message.contains(&info.serial),
        "{}",
        removed.message
    );
    let before = registrations(cluster.channel(leader, &operator)).await;
    let (csr_again, _) = ha_pki::generate_csr("psql2").unwrap();
    for (name, tls, pem) in [
        ("old", &old, &old_pem),
        ("new", &new, &renewed.certificate_pem),
    ] {
        let revoked = format!(
            "certificate serial {} of node psql2 was revoked at",
            serial(pem)
        );
        // A fresh connection and the one already open are both refused.
        for mut agent in [
            AgentServiceClient::new(cluster.channel(leader, tls)),
            if name == "old" {
                old_agent.clone()
            } else {
                new_agent.clone()
            },
        ] {
            assert_refused(
                &format!("report with the {name} certificate"),
                agent.report(report("psql2")).await,
                Code::PermissionDenied,
                &revoked,
            );
            assert_refused(
                &format!("goal watch with the {name} certificate"),
                agent
                    .watch_goal(WatchGoalRequest {
                        node: "psql2".into(),
                    })
                    .await,
                Code::PermissionDenied,
                &revoked,
            );
            assert_refused(
                &format!("renewal with the {name} certificate"),
                agent.renew(renew_request("psql2", &csr_again)).await,
                Code::PermissionDenied,
                &revoked,
            );
            // Join again presenting the certificate, without a CSR.
            assert_refused(
                &format!("re-join with the {name} certificate"),
                agent.join(join_request("", "psql2", "")).await,
                Code::PermissionDenied,
                &revoked,
            );
        }
        // Nor read the metrics (which any certificate of the CA may).
        let files = cluster.files(&format!("psql2-{name}"));
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "3", "-o", "-", "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(&files.ca_bundle)
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .arg(format!("{}/metrics", cluster.url(leader)))
            .output()
            .unwrap();
        let page = String::from_utf8_lossy(&out.stdout);
        assert!(
            page.ends_with("\n403") && page.contains(&revoked),
            "metrics with the {name} certificate: {page}"
        );
        // The same certificate cannot act as any other node either.
        assert_refused(
            &format!("report for psql1 with the {name} certificate"),
            AgentServiceClient::new(cluster.channel(leader, tls))
                .report(report("psql1"))
                .await,
            Code::PermissionDenied,
            &revoked,
        );
    }
    // The name comes back only with a new token made for it.
    let anonymous = Arc::new(
        ClientTls::without_certificate(cluster.monitor_files(1).ca_bundle.clone()).unwrap(),
    );
    let mut joiner = AgentServiceClient::new(cluster.channel(leader, &anonymous));
    assert_refused(
        "re-join with the token psql2 joined with",
        joiner
            .join(join_request(&used_token, "psql2", &csr_again))
            .await,
        Code::PermissionDenied,
        "join token was already used",
    );
    let (old_token, _) = token(&mut op, "t-psql2-unused", "psql2", 1).await;
    assert_refused(
        "re-join with an expired token",
        joiner
            .join(join_request(&old_token, "psql2", &csr_again))
            .await,
        Code::PermissionDenied,
        "join refused",
    );
    let (psql1_spare, _) = token(&mut op, "t-psql1-spare", "psql1", 3_600_000).await;
    assert_refused(
        "re-join with a token made for another node",
        joiner
            .join(join_request(&psql1_spare, "psql2", &csr_again))
            .await,
        Code::PermissionDenied,
        "the token is for node psql1",
    );
    let after = registrations(cluster.channel(leader, &operator)).await;
    assert_eq!(after, before, "a refused call changed the catalog");

    let (back_pem, back_key, _) =
        join_node(&cluster, leader, &mut op, "t-psql2-back", "psql2").await;
    let back = node_client(&cluster, "psql2-back", &back_pem, &back_key);
    let mut back_agent = AgentServiceClient::new(cluster.channel(leader, &back));
    back_agent.report(report("psql2")).await.unwrap();
    assert_refused(
        "report with the old certificate after the re-join",
        AgentServiceClient::new(cluster.channel(leader, &old))
            .report(report("psql2"))
            .await,
        Code::PermissionDenied,
        "was revoked at",
    );

    // The operator revokes one certificate by serial (haclt cert revoke).
    assert_refused(
        "revoking an unknown serial",
        op.revoke_certificate(RevokeCertificateRequest {
            request_id: "revoke-unknown".into(),
            serial: "0123abcd".into(),
        })
        .await,
        Code::InvalidArgument,
        "no certificate with serial 0123abcd is recorded",
    );
    op.revoke_certificate(RevokeCertificateRequest {
        request_id: "revoke-back".into(),
        serial: serial(&back_pem).to_uppercase(),
    })
    .await
    .unwrap();
    assert_refused(
        "report after the operator revoked the certificate",
        back_agent.report(report("psql2")).await,
        Code::PermissionDenied,
        &format!(
            "certificate serial {} of node psql2 was revoked at",
            serial(&back_pem)
        ),
    );
    // psql1 is untouched.
    AgentServiceClient::new(cluster.channel(leader, &psql1))
        .report(report("psql1"))
        .await
        .unwrap();
}

/// An observer certificate reads the status and the events (also as a stream) and is refused
/// every call that changes something, each with PERMISSION_DENIED naming it, and nothing
/// changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_reads_and_changes_nothing() {
    let cluster = Cluster::start();
    let operator = cluster.client("alice", &cluster.ca, Role::Operator, "alice");
    let leader = cluster.leader(&operator).await;
    let mut op = OperatorServiceClient::new(cluster.channel(leader, &operator));
    token(&mut op, "t-observer-setup", "psql1", 3_600_000).await;
    let before = catalog_view(cluster.channel(leader, &operator)).await;

    let observer = cluster.client("grafana", &cluster.ca, Role::Observer, "grafana");
    let mut obs = OperatorServiceClient::new(cluster.channel(leader, &observer));
    let status = obs
        .status(StatusRequest { linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.answered_by, leader);
    let events = obs
        .events(EventsRequest {
            after_seq: 0,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(!events.is_empty(), "the token creation is an event");
    let mut stream = obs
        .follow_events(EventsRequest {
            after_seq: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.seq, events[0].seq);
    drop(stream);

    let refused = "observer/grafana is not an operator certificate";
    assert_refused(
        "an observer's switchover",
        obs.switchover(SwitchoverRequest {
            request_id: "obs-1".into(),
            group: "main".into(),
            to_node: String::new(),
        })
        .await,
        Code::PermissionDenied,
        refused,
    );
    assert_refused(
        "an observer's maintenance",
        obs.set_maintenance(SetMaintenanceRequest {
            request_id: "obs-2".into(),
            node: "psql1".into(),
            enabled: true,
        })
        .await,
        Code::PermissionDenied,
        refused,
    );
    assert_refused(
        "an observer's join token",
        obs.create_join_token(token_request("obs-3", "psql2", 60_000))
            .await,
        Code::PermissionDenied,
        refused,
    );
    assert_refused(
        "an observer's node removal",
        obs.remove_node(RemoveNodeRequest {
            request_id: "obs-4".into(),
            node: "psql1".into(),
        })
        .await,
        Code::PermissionDenied,
        refused,
    );
    // Nor is an observer a node or a monitor.
    assert_refused(
        "an observer reporting for a node",
        AgentServiceClient::new(cluster.channel(leader, &observer))
            .report(report("grafana"))
            .await,
        Code::PermissionDenied,
        "not a node agent certificate",
    );
    assert_eq!(
        catalog_view(cluster.channel(leader, &operator)).await,
        before,
        "nothing changed"
    );
}

/// Node settings are checked before anything is proposed: a priority out of range, settings
/// for an ejabberd node (they mean nothing there) and an unknown node are refused with their
/// own codes, and no `node_settings` event is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_settings_are_checked_before_anything_is_proposed() {
    let cluster = Cluster::start();
    let operator = cluster.client("alice", &cluster.ca, Role::Operator, "alice");
    let leader = cluster.leader(&operator).await;
    let mut op = OperatorServiceClient::new(cluster.channel(leader, &operator));
    join_node(&cluster, leader, &mut op, "t-settings-pg", "psql1").await;
    let ejabberd = op
        .create_join_token(CreateJoinTokenRequest {
            kind: NodeKind::Ejabberd.into(),
            ..token_request("t-settings-ej", "e1", 3_600_000)
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let anonymous = Arc::new(
        ClientTls::without_certificate(cluster.monitor_files(1).ca_bundle.clone()).unwrap(),
    );
    let (csr, _) = ha_pki::generate_csr("e1").unwrap();
    AgentServiceClient::new(cluster.channel(leader, &anonymous))
        .join(JoinRequest {
            kind: NodeKind::Ejabberd.into(),
            ..join_request(&ejabberd, "e1", &csr)
        })
        .await
        .unwrap();

    let set = |node: &str, priority: u32| SetNodeSettingsRequest {
        request_id: format!("set-{node}-{priority}"),
        node: node.to_owned(),
        candidate_priority: Some(priority),
        replication_quorum: None,
    };
    for (what, request, code, message) in [
        (
            "out of range",
            set("psql1", 1000),
            Code::InvalidArgument,
            "0 to 100",
        ),
        (
            "an ejabberd node",
            set("e1", 50),
            Code::FailedPrecondition,
            "ejabberd node",
        ),
        (
            "an unknown node",
            set("nosuch", 50),
            Code::NotFound,
            "nosuch",
        ),
    ] {
        assert_refused(what, op.set_node_settings(request).await, code, message);
    }
    op.set_node_settings(set("psql1", 100)).await.unwrap();
    let (_, events) = nodes_and_events(cluster.channel(leader, &operator)).await;
    let settings: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "node_settings")
        .map(|e| e.node.as_str())
        .collect();
    assert_eq!(settings, ["psql1"], "only the valid request was applied");
}
