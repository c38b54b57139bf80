//! A whole cluster of real processes on loopback: N `ha-monitor`s, M PostgreSQL nodes (each an
//! `ha-agent` driving its own PostgreSQL 15 in a temporary directory), with the operator API,
//! status polling and fault injection (SIGKILL, SIGSTOP/SIGCONT) that drills need.
//!
//! Security is the production one unless a test asks for plaintext
//! ([`ClusterBuilder::plaintext`]): a cluster CA made in the cluster's directory ([`Pki`]);
//! monitors with `monitor-<id>` certificates and the CA key, so the leader signs join CSRs;
//! every agent gets only the CA bundle and a join token, generates its key and CSR, joins over
//! TLS and then reports with the certificate it got, which its PostgreSQL also uses for
//! replication, base backups and rewinds (verify-full, certificate authentication, `hostssl`
//! rules for exactly the peers); the operator API, `haclt` and the TLS mode of the writer use
//! certificates of their own. `--dev` is passed only where a daemon demands it: to a single
//! monitor (no fault tolerance), or to everything in a plaintext cluster. The whole CA rotates
//! under load in three steps ([`Cluster::rotation_trust_new_ca`],
//! [`Cluster::rotation_reissue_certificates`], [`Cluster::rotation_retire_old_ca`]), each
//! returning once every daemon and every PostgreSQL server has reloaded.
//!
//! Invariants: every port is chosen at run time; every process is started here and ended by PID
//! when the [`Cluster`] drops (frozen ones are continued first), even when a test panics, and
//! then the tail of every log is printed. Configuration files are generated in one place
//! ([`Cluster::monitor_config`], [`Cluster::agent_config`], [`Cluster::haclt`]'s file).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_pki::{Ca, ClientTls, Reload as _, Role, TlsFiles};
use ha_proto::v1::operator_service_client::OperatorServiceClient;
use ha_proto::v1::{self, CreateJoinTokenRequest, EventsRequest, StatusRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::bins::binaries;
use crate::pki::{LOOPBACK, PgClientTls, Pki};
use crate::writer::TABLES;
use crate::{ChildGuard, free_port, postmaster_pid, stop_postmasters};

/// The database user of the writer's TLS sessions, and its certificate's name (`pg_hba.conf`
/// admits it with `cert`, which compares the two).
pub const WRITER_USER: &str = "writer";
/// The primary's lease under the default timings the monitors run with (monitor/README.md, `[timings]`).
pub const LEASE: Duration = Duration::from_secs(3);
/// The one group of PostgreSQL nodes.
pub const GROUP: &str = "main";

/// Tables the [`crate::writer::Writer`] commits to and the split-brain watch probes, and the
/// role of the writer's TLS sessions, created on the first primary before any standby is
/// cloned.
fn schema() -> String {
    format!(
        "{TABLES}
CREATE ROLE {WRITER_USER} LOGIN;
GRANT SELECT, INSERT ON ha_drill TO {WRITER_USER}"
    )
}
/// How long a rotation step may take to be picked up by every daemon and server.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How a cluster is shaped.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    monitors: usize,
    postgres: usize,
    /// Nodes whose agents refuse drill orders (every other agent, and every monitor, accepts
    /// them: a test cluster is where drills run).
    drills_refused: Vec<String>,
    /// Extra `pg_hba.conf` rules of every PostgreSQL node (TOML inline tables).
    hba: Vec<String>,
    /// Plaintext gRPC and replication with `--dev` everywhere ([`ClusterBuilder::plaintext`]).
    plaintext: bool,
    /// The monitors' `tls.node_certificate_lifetime` (their default when `None`).
    node_certificate_lifetime: Option<Duration>,
    /// Every PostgreSQL agent serves the agent port ([`ClusterBuilder::agent_ports`]).
    agent_ports: bool,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            monitors: 3,
            postgres: 3,
            drills_refused: Vec::new(),
            hba: Vec::new(),
            plaintext: false,
            node_certificate_lifetime: None,
            agent_ports: false,
        }
    }
}

impl ClusterBuilder {
    /// Number of monitors: 1, 3 or 5.
    pub fn monitors(mut self, n: usize) -> Self {
        assert!(matches!(n, 1 | 3 | 5), "1, 3 or 5 monitors, not {n}");
        self.monitors = n;
        self
    }

    /// Number of PostgreSQL nodes (at least 1): `psql1` bootstraps as primary, the others
    /// join as standbys.
    pub fn postgres(mut self, n: usize) -> Self {
        assert!(n >= 1, "at least one PostgreSQL node");
        self.postgres = n;
        self
    }

    /// An extra `pg_hba.conf` rule for every PostgreSQL node, as a TOML inline table
    /// (`{ type = "host", database = "db", user = "u", address = "127.0.0.1/32", method = "scram-sha-256" }`).
    pub fn hba(mut self, rule: &str) -> Self {
        self.hba.push(rule.to_owned());
        self
    }

    /// The agent of `node` runs with `allow_drills = false`.
    pub fn drills_refused_by(mut self, node: &str) -> Self {
        self.drills_refused.push(node.to_owned());
        self
    }

    /// Every daemon runs with `--dev`: plaintext gRPC, no caller checks, plaintext replication
    /// trusted from loopback. Only for a test that must see plaintext (none of the drills).
    pub fn plaintext(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// How long the node certificates the monitors sign are valid (the agents renew them at
    /// about two thirds of it).
    pub fn node_certificate_lifetime(mut self, lifetime: Duration) -> Self {
        self.node_certificate_lifetime = Some(lifetime);
        self
    }

    /// Every PostgreSQL agent serves the agent port (`listen`, mutual TLS) on a loopback port
    /// of its own ([`PgNode::agent_port`]): the vouches and the health endpoints.
    pub fn agent_ports(mut self) -> Self {
        self.agent_ports = true;
        self
    }

    /// Starts the monitors, waits for a leader, starts `psql1` and waits for it to be primary
    /// (creating the drill tables), then starts the others and waits until the cluster is
    /// converged ([`Cluster::wait_converged`]).
    pub async fn start(self) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("ha-cluster-")
            .tempdir()
            .expect("a temporary directory");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the cluster directory");
        let monitors: Vec<MonitorProc> = (1..=self.monitors as u64)
            .map(|id| MonitorProc {
                id,
                addr: format!("{LOOPBACK}:{}", free_port()),
                child: None,
            })
            .collect();
        let node_names: Vec<String> = (1..=self.postgres).map(|i| format!("psql{i}")).collect();
        let tls = (!self.plaintext).then(|| Tls::create(root.path(), &monitors, &node_names));
        let channels = monitors
            .iter()
            .map(|m| operator_channel(&m.addr, tls.as_ref().map(|t| t.operator.clone())))
            .collect();
        let nodes = node_names
            .iter()
            .map(|name| {
                let allow_drills = !self.drills_refused.contains(name);
                let agent_port = (self.agent_ports && tls.is_some()).then(free_port);
                PgNode::new(root.path(), name, allow_drills, agent_port)
            })
            .collect();
        let mut cluster = Cluster {
            monitors,
            nodes,
            channels,
            leader_hint: Mutex::new(0),
            frozen: Mutex::new(Vec::new()),
            postmasters_seen: Mutex::new(Vec::new()),
            hba: self.hba,
            tls,
            node_certificate_lifetime: self.node_certificate_lifetime,
            root,
        };
        cluster.write_haclt_config();
        for id in 1..=self.monitors as u64 {
            cluster.start_monitor(id);
        }
        cluster.status().await;

        let first = cluster.nodes[0].name.clone();
        cluster.join_node(&first).await;
        cluster
            .wait_for(
                "psql1 bootstraps as primary",
                Duration::from_secs(60),
                |s| {
                    reached(s, "psql1", v1::GoalState::Single)
                        || reached(s, "psql1", v1::GoalState::Primary)
                },
            )
            .await;
        cluster
            .session("psql1")
            .await
            .expect("psql1 accepts sessions once it reached its goal")
            .batch_execute(&schema())
            .await
            .expect("creating the drill tables");
        let others: Vec<String> = cluster.nodes[1..].iter().map(|n| n.name.clone()).collect();
        for name in &others {
            cluster.join_node(name).await;
        }
        cluster
            .wait_converged("psql1", Duration::from_secs(120))
            .await;
        cluster
    }
}

/// One monitor process.
#[derive(Debug)]
struct MonitorProc {
    id: u64,
    addr: String,
    child: Option<ChildGuard>,
}

/// One PostgreSQL node: its agent process and the paths and port of its server.
#[derive(Debug)]
pub struct PgNode {
    pub name: String,
    pub port: u16,
    /// Directory of the server's Unix socket (sessions connect there as `postgres`).
    pub socket_dir: PathBuf,
    pub data_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The agent port on loopback, when the cluster has them ([`ClusterBuilder::agent_ports`]).
    pub agent_port: Option<u16>,
    allow_drills: bool,
    agent: Option<ChildGuard>,
}

impl PgNode {
    fn new(root: &Path, name: &str, allow_drills: bool, agent_port: Option<u16>) -> Self {
        let dir = root.join(name);
        Self {
            name: name.to_owned(),
            port: free_port(),
            data_dir: dir.join("data"),
            socket_dir: dir,
            state_dir: root.join(format!("{name}-state")),
            agent_port,
            allow_drills,
            agent: None,
        }
    }

    /// Where the writer and the watch connect.
    pub fn addr(&self) -> PgAddr {
        PgAddr {
            name: self.name.clone(),
            socket_dir: self.socket_dir.clone(),
            port: self.port,
        }
    }
}

/// How to open a session on one node's PostgreSQL (Unix socket, user `postgres`).
#[derive(Debug, Clone)]
pub struct PgAddr {
    pub name: String,
    pub socket_dir: PathBuf,
    pub port: u16,
}

impl PgAddr {
    /// A session, connected within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<tokio_postgres::Client, String> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(timeout);
        let (client, conn) = tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(client)
    }
}

/// Owns every process and file of one cluster.
#[derive(Debug)]
pub struct Cluster {
    monitors: Vec<MonitorProc>,
    nodes: Vec<PgNode>,
    /// Operator channels, one per monitor (same order), reconnecting on their own.
    channels: Vec<Channel>,
    /// Index of the monitor that answered last as leader: asked first.
    leader_hint: Mutex<usize>,
    /// PIDs stopped with SIGSTOP and not continued yet.
    frozen: Mutex<Vec<i32>>,
    /// Postmasters killed or replaced during the test (all are stopped on drop).
    postmasters_seen: Mutex<Vec<i32>>,
    /// Extra `pg_hba.conf` rules ([`ClusterBuilder::hba`]).
    hba: Vec<String>,
    /// [`ClusterBuilder::node_certificate_lifetime`].
    node_certificate_lifetime: Option<Duration>,
    /// `None` in a plaintext cluster.
    tls: Option<Tls>,
    /// Dropped last: the directory outlives every process using it.
    root: tempfile::TempDir,
}

/// What an agent started by a test needs to reach this cluster's monitors
/// ([`Cluster::agent_security`]).
#[derive(Debug, Clone)]
pub struct AgentSecurity {
    /// Lines for its config file, before its role table.
    pub toml: String,
    /// Arguments besides `--config`.
    pub args: Vec<&'static str>,
}

/// A secured cluster's CA and the harness's own clients.
#[derive(Debug)]
struct Tls {
    pki: Pki,
    /// The client of [`Cluster::operator`] (reloaded by the rotation steps).
    operator: Arc<ClientTls>,
    /// The writer's SQL client ([`Cluster::writer_tls`]).
    writer: Arc<PgClientTls>,
}

impl Tls {
    /// The cluster CA in `<root>/pki`, the monitors' certificates, the bundles the agents join
    /// with (they make their own keys), and the operator's and writer's certificates.
    fn create(root: &Path, monitors: &[MonitorProc], nodes: &[String]) -> Self {
        ha_pki::install_crypto();
        let pki = Pki::create(&root.join("pki"));
        for m in monitors {
            pki.party(&monitor_party(m.id), Role::Monitor, &monitor_name(m.id));
        }
        for name in nodes {
            pki.write_bundle(&pki.files(name));
        }
        let operator = ClientTls::load(pki.party(OPERATOR, Role::Operator, OPERATOR))
            .expect("the operator's files were just written");
        let writer = PgClientTls::load(
            pki.party(WRITER_USER, Role::Operator, WRITER_USER),
            WRITER_USER,
        )
        .expect("the writer's files were just written");
        Self {
            pki,
            operator: Arc::new(operator),
            writer: Arc::new(writer),
        }
    }
}

/// Name of the operator certificate of the harness (and of `haclt`).
const OPERATOR: &str = "operator";

/// A monitor's certificate name.
fn monitor_name(id: u64) -> String {
    format!("monitor-{id}")
}

/// The name of a monitor's files in the PKI directory.
fn monitor_party(id: u64) -> String {
    format!("monitor{id}")
}

/// An operator channel to one monitor, reconnecting on its own: mutual TLS with `tls`, or
/// plaintext.
fn operator_channel(addr: &str, tls: Option<Arc<ClientTls>>) -> Channel {
    let endpoint = match &tls {
        Some(_) => {
            ha_pki::endpoint(&format!("https://{addr}")).expect("a loopback address is a valid URI")
        }
        None => Channel::from_shared(format!("http://{addr}"))
            .expect("a loopback address is a valid URI"),
    }
    .connect_timeout(Duration::from_millis(300))
    .timeout(Duration::from_secs(2));
    match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(ha_pki::MtlsConnector::new(tls)),
        None => endpoint.connect_lazy(),
    }
}

/// The `[tls]` section of a daemon's config file.
fn tls_section(files: &TlsFiles, ca_key: Option<&Path>) -> String {
    let mut s = format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        files.ca_bundle.display(),
        files.cert.display(),
        files.key.display()
    );
    if let Some(ca_key) = ca_key {
        s.push_str(&format!("ca_key = \"{}\"\n", ca_key.display()));
    }
    s
}

/// `haclt --config config ARGS`, with none of haclt's environment variables.
async fn run_haclt(config: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(&binaries().haclt)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("HACLT_CONFIG")
        .env_remove("HACLT_MONITORS")
        .env_remove("HACLT_DEV")
        .output()
        .await
        .expect("haclt runs")
}

/// The node's status row.
pub fn node<'a>(s: &'a v1::StatusResponse, name: &str) -> Option<&'a v1::NodeStatus> {
    s.nodes.iter().find(|n| n.name == name)
}

/// Whether `name` reported reaching `state`.
pub fn reached(s: &v1::StatusResponse, name: &str, state: v1::GoalState) -> bool {
    node(s, name).is_some_and(|n| n.reached == i32::from(state))
}

/// Whether `name` reports itself a standby streaming from its upstream.
pub fn streaming(s: &v1::StatusResponse, name: &str) -> bool {
    node(s, name)
        .and_then(|n| n.postgres.as_ref())
        .is_some_and(|p| p.streaming && p.role == i32::from(v1::PgRole::Standby))
}

/// The group's primary in the catalog, if any.
pub fn primary_of(s: &v1::StatusResponse) -> Option<&str> {
    s.groups
        .iter()
        .find(|g| g.name == GROUP)
        .map(|g| g.primary.as_str())
        .filter(|p| !p.is_empty())
}

/// The group's status row.
pub fn group(s: &v1::StatusResponse) -> Option<&v1::GroupStatus> {
    s.groups.iter().find(|g| g.name == GROUP)
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    pub fn nodes(&self) -> &[PgNode] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> &PgNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut PgNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Every node's session address (for the writer and the watch).
    pub fn addrs(&self) -> Vec<PgAddr> {
        self.nodes.iter().map(PgNode::addr).collect()
    }

    /// Monitor addresses, in id order (for an operator's `haclt` config).
    pub fn monitor_addrs(&self) -> Vec<String> {
        self.monitors.iter().map(|m| m.addr.clone()).collect()
    }

    // --------------------------------------------------------------------------------------
    // Configuration (the one place that knows the files' shape)
    // --------------------------------------------------------------------------------------

    /// Whether `ha-monitor` needs `dev = true` and `--dev`: plaintext, or fewer than three
    /// monitors (which the monitor refuses otherwise, TLS or not).
    fn monitor_dev(&self) -> bool {
        self.tls.is_none() || self.monitors.len() < 3
    }

    fn monitor_config(&self, id: u64) -> String {
        let me = &self.monitors[index_of(id)];
        let members: Vec<String> = self
            .monitors
            .iter()
            .map(|m| format!("{{ id = {}, address = \"{}\" }}", m.id, m.addr))
            .collect();
        let dev = if self.monitor_dev() {
            "dev = true\n"
        } else {
            ""
        };
        let tls = self.tls.as_ref().map_or_else(String::new, |t| {
            let mut section =
                tls_section(&t.pki.files(&monitor_party(id)), Some(&t.pki.ca_key_path()));
            if let Some(lifetime) = self.node_certificate_lifetime {
                section.push_str(&format!(
                    "node_certificate_lifetime = \"{}\"\n",
                    humantime::format_duration(lifetime)
                ));
            }
            section
        });
        format!(
            "id = {id}\n{dev}allow_drills = true\ndata_dir = \"{}\"\nlisten = \"{}\"\nmembers = [{}]\n{tls}",
            self.root.path().join(format!("monitor{id}")).display(),
            me.addr,
            members.join(", ")
        )
    }

    fn agent_config(&self, n: &PgNode, token: &Path) -> String {
        let monitors: Vec<String> = self
            .monitors
            .iter()
            .map(|m| format!("\"{}\"", m.addr))
            .collect();
        // With TLS, replication, base backups and rewinds are admitted by the agent's own
        // `hostssl ... cert` rules for `peers`; the writer's TLS sessions by certificate too,
        // and `haclt drill`'s writer by the operator certificate, mapped to `postgres`.
        let (security, peers, rules) = match &self.tls {
            Some(t) => (
                tls_section(&t.pki.files(&n.name), None),
                format!(
                    "peers = [{}]\nclients = [{{ certificate = \"{OPERATOR}\", user = \"postgres\", database = \"postgres\", address = \"{LOOPBACK}\" }}]\n",
                    self.nodes
                        .iter()
                        .map(|p| format!("{{ node = \"{}\", address = \"{LOOPBACK}\" }}", p.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                format!(
                    r#"  {{ type = "hostssl", database = "postgres", user = "{WRITER_USER}", address = "{LOOPBACK}/32", method = "cert" }},
"#
                ),
            ),
            None => (
                "dev = true\n".to_owned(),
                String::new(),
                format!(
                    r#"  {{ type = "host", database = "replication", user = "replicator", address = "{LOOPBACK}/32", method = "trust" }},
  {{ type = "host", database = "postgres", user = "replicator", address = "{LOOPBACK}/32", method = "trust" }},
  {{ type = "host", database = "postgres", user = "postgres", address = "{LOOPBACK}/32", method = "trust" }},
"#
                ),
            ),
        };
        // `dev` is a top-level key and `[tls]` a table: both go before `[postgres]`.
        format!(
            r#"role = "postgres"
node = "{name}"
group = "{GROUP}"
monitors = [{monitors}]
join_token_file = "{token}"
state_dir = "{state}"
allow_drills = {allow_drills}
{listen}{security}
[postgres]
data_dir = "{data}"
port = {port}
listen_addresses = ["{LOOPBACK}"]
advertise_host = "{LOOPBACK}"
socket_dir = "{socket}"
start_timeout = "30s"
stop_timeout = "20s"
settings = {{ shared_buffers = "16MB", max_connections = "100" }}
{peers}hba = [
{rules}{extra_hba}]
"#,
            name = n.name,
            monitors = monitors.join(", "),
            token = token.display(),
            state = n.state_dir.display(),
            data = n.data_dir.display(),
            port = n.port,
            socket = n.socket_dir.display(),
            allow_drills = n.allow_drills,
            listen = n
                .agent_port
                .map(|p| format!("listen = \"{LOOPBACK}:{p}\"\n"))
                .unwrap_or_default(),
            extra_hba = self
                .hba
                .iter()
                .map(|r| format!("  {r},\n"))
                .collect::<String>(),
        )
    }

    /// `haclt`'s config file: the monitors and, with TLS, the operator certificate.
    fn write_haclt_config(&self) {
        let files = self.tls.as_ref().map(|t| t.pki.files(OPERATOR));
        let text = self.haclt_config_text(files.as_ref());
        std::fs::write(self.haclt_config_path(), text).expect("writing haclt's config");
    }

    /// The monitors and `files` as haclt's TLS files (plaintext without).
    fn haclt_config_text(&self, files: Option<&TlsFiles>) -> String {
        let monitors: Vec<String> = self
            .monitors
            .iter()
            .map(|m| format!("\"{}\"", m.addr))
            .collect();
        let security = match files {
            Some(f) => tls_section(f, None),
            None => "dev = true\n".to_owned(),
        };
        format!("monitors = [{}]\n{security}", monitors.join(", "))
    }

    fn haclt_config_path(&self) -> PathBuf {
        self.root.path().join("haclt.toml")
    }

    fn log_path(&self, what: &str) -> PathBuf {
        self.root.path().join(format!("{what}.log"))
    }

    /// Starts `binary --config config` (plus `--dev` when `dev`), its stderr appended to `log`.
    fn spawn(&self, binary: &Path, config: &Path, log: &Path, dev: bool) -> ChildGuard {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("the log file can be created");
        let child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .args(dev.then_some("--dev"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        ChildGuard::new(child)
    }

    // --------------------------------------------------------------------------------------
    // Processes
    // --------------------------------------------------------------------------------------

    /// Starts (or restarts, keeping its data) monitor `id`.
    pub fn start_monitor(&mut self, id: u64) {
        let config = self.root.path().join(format!("monitor{id}.toml"));
        std::fs::write(&config, self.monitor_config(id)).expect("writing the monitor config");
        let log = self.log_path(&format!("monitor{id}"));
        let child = self.spawn(&binaries().monitor, &config, &log, self.monitor_dev());
        let m = &mut self.monitors[index_of(id)];
        assert!(m.child.is_none(), "monitor {id} already runs");
        m.child = Some(child);
    }

    /// SIGKILL of monitor `id` (its data stays for a restart).
    pub fn kill_monitor(&mut self, id: u64) {
        let m = &mut self.monitors[index_of(id)];
        drop(m.child.take().expect("the monitor runs"));
    }

    /// PID of monitor `id`, for SIGSTOP/SIGCONT with [`Cluster::freeze`].
    pub fn monitor_pid(&self, id: u64) -> i32 {
        pid_of(
            self.monitors[index_of(id)]
                .child
                .as_ref()
                .expect("the monitor runs"),
        )
    }

    /// Creates a join token, writes the config and starts the node's agent.
    pub async fn join_node(&mut self, name: &str) {
        let token = self.join_token(name, v1::NodeKind::Postgres).await;
        let n = self.node(name);
        std::fs::create_dir_all(&n.socket_dir).expect("creating the node directory");
        let pg = User::from_name("postgres")
            .expect("reading the user database")
            .expect("the postgres user exists");
        std::os::unix::fs::chown(&n.socket_dir, Some(pg.uid.as_raw()), Some(pg.gid.as_raw()))
            .expect("chown the node directory to postgres");
        let config = self.root.path().join(format!("{name}.toml"));
        std::fs::write(&config, self.agent_config(n, &token)).expect("writing the agent config");
        self.start_agent(name);
    }

    /// Starts (or restarts) the node's agent with its existing config.
    pub fn start_agent(&mut self, name: &str) {
        let config = self.root.path().join(format!("{name}.toml"));
        let log = self.log_path(&format!("{name}-agent"));
        let child = self.spawn(&binaries().agent, &config, &log, self.tls.is_none());
        let n = self.node_mut(name);
        assert!(n.agent.is_none(), "{name}'s agent already runs");
        n.agent = Some(child);
    }

    /// Whether the node's agent process runs (it was started and not killed by this cluster).
    pub fn agent_running(&self, name: &str) -> bool {
        self.node(name).agent.is_some()
    }

    /// SIGKILL of the node's agent (PostgreSQL keeps running).
    pub fn kill_agent(&mut self, name: &str) {
        drop(self.node_mut(name).agent.take().expect("the agent runs"));
    }

    /// SIGTERM to the node's agent; waits (polling) for it to exit and returns its status.
    pub async fn terminate_agent(&mut self, name: &str) -> std::process::ExitStatus {
        let guard = self.node_mut(name).agent.take().expect("the agent runs");
        signal(pid_of(&guard), Signal::SIGTERM);
        wait_exit(guard, &format!("{name}'s agent after SIGTERM")).await
    }

    /// Waits for the node's agent to exit by itself (a crash drill) and returns its status.
    pub async fn wait_agent_exit(&mut self, name: &str) -> std::process::ExitStatus {
        let guard = self
            .node_mut(name)
            .agent
            .take()
            .expect("the agent was started");
        wait_exit(guard, &format!("{name}'s agent")).await
    }

    /// Waits for monitor `id` to exit by itself (a drill) and returns its status.
    pub async fn wait_monitor_exit(&mut self, id: u64) -> std::process::ExitStatus {
        let m = &mut self.monitors[index_of(id)];
        let guard = m.child.take().expect("the monitor was started");
        wait_exit(guard, &format!("monitor {id}")).await
    }

    /// PID of the node's agent.
    pub fn agent_pid(&self, name: &str) -> i32 {
        pid_of(self.node(name).agent.as_ref().expect("the agent runs"))
    }

    /// The node's postmaster PID, if it runs.
    pub fn postmaster(&self, name: &str) -> Option<i32> {
        postmaster_pid(&self.node(name).data_dir).filter(|&p| crate::is_postgres(p))
    }

    /// The postmaster and all its children (backends, WAL sender, checkpointer...).
    fn postgres_processes(&self, name: &str) -> Vec<i32> {
        let Some(pm) = self.postmaster(name) else {
            return Vec::new();
        };
        self.postmasters_seen
            .lock()
            .expect("no panic while holding this lock")
            .push(pm);
        let mut pids = vec![pm];
        pids.extend(children_of(pm));
        pids
    }

    /// A machine crash of the node: SIGKILL of its agent, its postmaster and every PostgreSQL
    /// process. Returns when they are gone.
    pub fn crash(&mut self, name: &str) {
        let pids = self.postgres_processes(name);
        assert!(!pids.is_empty(), "{name}'s PostgreSQL does not run");
        drop(self.node_mut(name).agent.take());
        for &pid in &pids {
            signal_unless_gone(pid, Signal::SIGKILL);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&p| crate::is_postgres(p)) {
            assert!(
                std::time::Instant::now() < deadline,
                "{name}'s PostgreSQL survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL of the node's postmaster and its children only (the agent lives).
    pub fn kill_postgres(&self, name: &str) {
        for pid in self.postgres_processes(name) {
            signal_unless_gone(pid, Signal::SIGKILL);
        }
    }

    /// SIGSTOP of the node's agent and every PostgreSQL process: the node hangs, its ports
    /// still accept TCP connections but nothing answers. Undo with [`Cluster::thaw`].
    pub fn freeze_node(&self, name: &str) {
        let mut pids = vec![self.agent_pid(name)];
        pids.extend(self.postgres_processes(name));
        self.freeze(&pids);
        // A child forked between listing and stopping the postmaster escaped: stop it too.
        let late: Vec<i32> = self
            .postgres_processes(name)
            .into_iter()
            .filter(|p| !pids.contains(p))
            .collect();
        self.freeze(&late);
    }

    /// SIGSTOP of the given processes (started by this cluster).
    pub fn freeze(&self, pids: &[i32]) {
        let mut frozen = self
            .frozen
            .lock()
            .expect("no panic while holding this lock");
        for &pid in pids {
            if signal_unless_gone(pid, Signal::SIGSTOP) {
                frozen.push(pid);
            }
        }
    }

    /// SIGCONT of every process stopped with [`Cluster::freeze`] or [`Cluster::freeze_node`].
    pub fn thaw(&self) {
        let pids: Vec<i32> = std::mem::take(
            &mut *self
                .frozen
                .lock()
                .expect("no panic while holding this lock"),
        );
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }

    // --------------------------------------------------------------------------------------
    // Operator API
    // --------------------------------------------------------------------------------------

    /// Runs the workspace's `haclt` against this cluster's monitors (its config file names
    /// them and the operator certificate, or says `dev = true` in a plaintext cluster) and
    /// returns its output.
    pub async fn haclt(&self, args: &[&str]) -> std::process::Output {
        run_haclt(&self.haclt_config_path(), args).await
    }

    /// Like [`Cluster::haclt`], with `files` as haclt's TLS files (a certificate of another
    /// CA, a bundle that does not hold the cluster's CA).
    pub async fn haclt_as(&self, files: &TlsFiles, args: &[&str]) -> std::process::Output {
        let config = self.root.path().join("haclt-as.toml");
        std::fs::write(&config, self.haclt_config_text(Some(files)))
            .expect("writing haclt's other config");
        run_haclt(&config, args).await
    }

    /// An operator client connected to the current leader (retries for 30 s).
    pub async fn operator(&self) -> OperatorServiceClient<Channel> {
        self.leader().await.1
    }

    /// The leader's index and a client to it, with a linearizable status it answered.
    async fn leader(&self) -> (usize, OperatorServiceClient<Channel>, v1::StatusResponse) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        loop {
            let hint = *self
                .leader_hint
                .lock()
                .expect("no panic while holding this lock");
            let n = self.channels.len();
            for i in (0..n).map(|k| (hint + k) % n) {
                if self.monitors[i].child.is_none() {
                    continue;
                }
                let mut client = OperatorServiceClient::new(self.channels[i].clone());
                match client.status(StatusRequest { linearizable: true }).await {
                    Ok(s) => {
                        *self
                            .leader_hint
                            .lock()
                            .expect("no panic while holding this lock") = i;
                        return (i, client, s.into_inner());
                    }
                    Err(e) => last = format!("monitor {}: {}", i + 1, e.message()),
                }
            }
            assert!(
                Instant::now() < deadline,
                "no monitor leads after 30 s (last: {last})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A linearizable status from the leader.
    pub async fn status(&self) -> v1::StatusResponse {
        self.leader().await.2
    }

    /// Id of the leading monitor.
    pub async fn leader_id(&self) -> u64 {
        self.monitors[self.leader().await.0].id
    }

    /// The group's primary according to the leader.
    pub async fn primary(&self) -> Option<String> {
        primary_of(&self.status().await).map(str::to_owned)
    }

    /// The catalog's events, one per line, for failure messages and assertions.
    pub async fn events(&self) -> Vec<v1::Event> {
        self.operator()
            .await
            .events(EventsRequest {
                after_seq: 0,
                limit: 0,
            })
            .await
            .map(|r| r.into_inner().events)
            .unwrap_or_default()
    }

    /// Asserts that nothing failed over since event `after_seq`: `primary` is still the
    /// primary at `epoch`, `standby` still streams, and no failover or promotion event came.
    /// Returns every event, for further checks.
    pub async fn assert_no_failover_since(
        &self,
        primary: &str,
        epoch: u64,
        standby: &str,
        after_seq: u64,
    ) -> Vec<v1::Event> {
        let s = self.status().await;
        assert_eq!(primary_of(&s), Some(primary));
        assert_eq!(
            group(&s).map(|g| g.epoch),
            Some(epoch),
            "the epoch did not move"
        );
        assert!(streaming(&s, standby), "{standby} still streams: {s:#?}");
        let events = self.events().await;
        let failovers: Vec<_> = events
            .iter()
            .filter(|e| e.seq > after_seq && matches!(e.kind.as_str(), "failover" | "promoted"))
            .collect();
        assert!(failovers.is_empty(), "failovers: {failovers:#?}");
        events
    }

    async fn events_text(&self) -> String {
        self.events()
            .await
            .iter()
            .map(|e| {
                format!(
                    "#{} {} {} e{}: {}",
                    e.seq, e.kind, e.node, e.epoch, e.message
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls the status until `ok` holds; panics with the last status and the events when it
    /// does not within `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&v1::StatusResponse) -> bool,
    ) -> v1::StatusResponse {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await;
            if ok(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                let events = self.events_text().await;
                panic!("{what}: not reached within {timeout:?}\nstatus: {s:#?}\nevents:\n{events}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `primary` is the group's primary and reached it, every other node (not in
    /// maintenance) streams from it as a standby and is in the synchronous set the primary
    /// applied, and the set is confirmed (the last `sync` event says so: only then may a
    /// failover promote without `--allow-data-loss`).
    pub async fn wait_converged(&self, primary: &str, timeout: Duration) -> v1::StatusResponse {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await;
            let standbys: Vec<&String> = names
                .iter()
                .filter(|n| *n != primary && !node(&s, n).is_some_and(|r| r.maintenance))
                .collect();
            // A lone node stays SINGLE: there is nobody to replicate to.
            let primary_reached = reached(&s, primary, v1::GoalState::Primary)
                || (standbys.is_empty() && reached(&s, primary, v1::GoalState::Single));
            let streams = standbys.iter().all(|n| {
                reached(&s, n, v1::GoalState::Standby)
                    && streaming(&s, n)
                    && node(&s, n)
                        .and_then(|r| r.postgres.as_ref())
                        .is_some_and(|p| p.upstream_node == primary)
            });
            // Every standby in the synchronous set the primary applied: a failover right after
            // must not race a change of the set (it is refused until the change is confirmed).
            let in_sync_set = node(&s, primary)
                .and_then(|p| p.postgres.as_ref())
                .is_some_and(|p| {
                    standbys
                        .iter()
                        .all(|n| p.synchronous_standby_names.contains(&format!("\"{n}\"")))
                });
            let converged =
                primary_of(&s) == Some(primary) && primary_reached && streams && in_sync_set;
            if converged && (standbys.is_empty() || self.sync_confirmed(&s).await) {
                return s;
            }
            if Instant::now() >= deadline {
                let events = self.events_text().await;
                panic!(
                    "{primary} is not primary with every other node streaming and the synchronous set confirmed after {timeout:?}\nstatus: {s:#?}\nevents:\n{events}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the group is synchronous with its set confirmed applied by the primary: the
    /// last `sync` event says so (every change of the set is a `sync` event).
    async fn sync_confirmed(&self, s: &v1::StatusResponse) -> bool {
        group(s).is_some_and(|g| g.synchronous)
            && self
                .events()
                .await
                .iter()
                .rev()
                .find(|e| e.kind == "sync")
                .is_some_and(|e| e.message.contains("applied the synchronous set"))
    }

    /// Waits until `primary` is the group's primary with a confirmed synchronous set: a
    /// failover without data loss is possible from then on.
    pub async fn wait_synchronous(&self, primary: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await;
            if primary_of(&s) == Some(primary) && self.sync_confirmed(&s).await {
                return;
            }
            if Instant::now() >= deadline {
                let events = self.events_text().await;
                panic!(
                    "{primary} has no confirmed synchronous standby after {timeout:?}\nstatus: {s:#?}\nevents:\n{events}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A join token for a node of `kind`, written to a 0600 file in the cluster's directory.
    pub async fn join_token(&self, name: &str, kind: v1::NodeKind) -> PathBuf {
        let token = self
            .operator()
            .await
            .create_join_token(CreateJoinTokenRequest {
                request_id: unique_request_id(&format!("token-{name}")),
                kind: kind.into(),
                ttl_ms: 600_000,
                group: GROUP.into(),
                node: name.into(),
                address: LOOPBACK.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("creating a join token for {name}: {e}"))
            .into_inner()
            .token;
        let path = self.root.path().join(format!("{name}.token"));
        std::fs::write(&path, token).expect("writing the token file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the token file");
        path
    }

    /// Asks for a planned switchover (to `to`, or the best standby).
    pub async fn switchover(
        &self,
        to: Option<&str>,
    ) -> Result<v1::OperationResponse, tonic::Status> {
        self.operator()
            .await
            .switchover(v1::SwitchoverRequest {
                request_id: unique_request_id("switchover"),
                group: GROUP.into(),
                to_node: to.unwrap_or_default().into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Puts `name` into maintenance (or takes it out).
    pub async fn set_maintenance(
        &self,
        name: &str,
        enabled: bool,
    ) -> Result<v1::OperationResponse, tonic::Status> {
        self.operator()
            .await
            .set_maintenance(v1::SetMaintenanceRequest {
                request_id: unique_request_id("maintenance"),
                node: name.into(),
                enabled,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// A session on `name`'s PostgreSQL.
    pub async fn session(&self, name: &str) -> Result<tokio_postgres::Client, String> {
        self.node(name).addr().connect(Duration::from_secs(2)).await
    }

    // --------------------------------------------------------------------------------------
    // TLS and its rotation
    // --------------------------------------------------------------------------------------

    fn tls(&self) -> &Tls {
        self.tls
            .as_ref()
            .expect("a secured cluster (this one was built with ClusterBuilder::plaintext)")
    }

    /// The cluster's CA and every party's files (a secured cluster only).
    pub fn pki(&self) -> &Pki {
        &self.tls().pki
    }

    /// The writer's SQL client: verify-full against the cluster CA, with the certificate
    /// [`WRITER_USER`] (a secured cluster only). The rotation steps reload it; give it to
    /// [`crate::writer::Writer::start_tls`].
    pub fn writer_tls(&self) -> Arc<PgClientTls> {
        self.tls().writer.clone()
    }

    /// How an agent a test starts itself (an ejabberd node, say) joins this cluster: in a
    /// secured cluster the `[tls]` section (the CA bundle is written now; the agent makes its
    /// key and CSR and joins) and no arguments; in a plaintext one `dev = true` and `--dev`.
    /// The TOML goes before the agent's role table. The rotation steps do not cover such an
    /// agent.
    pub fn agent_security(&self, node: &str) -> AgentSecurity {
        match &self.tls {
            Some(t) => {
                let files = t.pki.files(node);
                t.pki.write_bundle(&files);
                AgentSecurity {
                    toml: tls_section(&files, None),
                    args: Vec::new(),
                }
            }
            None => AgentSecurity {
                toml: "dev = true\n".to_owned(),
                args: vec!["--dev"],
            },
        }
    }

    /// Every party's file set: monitors, nodes (agent and PostgreSQL), operator, writer.
    fn parties(&self) -> Vec<TlsFiles> {
        let pki = self.pki();
        let mut parties: Vec<TlsFiles> = self
            .monitors
            .iter()
            .map(|m| pki.files(&monitor_party(m.id)))
            .collect();
        parties.extend(self.nodes.iter().map(|n| pki.files(&n.name)));
        parties.extend([pki.files(OPERATOR), pki.files(WRITER_USER)]);
        parties
    }

    /// CA rotation, step 1 of 3: a new CA that issues from now on; every bundle (monitors,
    /// agents and through them PostgreSQL, operator, writer) trusts the old and the new CA, and
    /// the monitors' CA key becomes the new one's, so joins get certificates of the new CA.
    /// Returns once every daemon reloaded and every PostgreSQL server admits a client
    /// certificate of the new CA.
    pub async fn rotation_trust_new_ca(&mut self) {
        let mark = self.mark_logs();
        self.tls.as_mut().expect("a secured cluster").pki.add_ca();
        for files in self.parties() {
            self.pki().write_bundle(&files);
        }
        self.pki().write_ca_key();
        self.reload_everywhere(&mark).await;
        // The agents' reload of PostgreSQL only signals it: proof comes from a handshake.
        let probe = self
            .pki()
            .party("writer-probe", Role::Operator, WRITER_USER);
        let probe =
            PgClientTls::load(probe, WRITER_USER).expect("the probe's files were just written");
        self.wait_postgres_admits(&probe, true, "a certificate of the new CA")
            .await;
    }

    /// CA rotation, step 2 of 3: every certificate (monitors, each node's for its agent and its
    /// PostgreSQL, operator, writer) re-issued by the new CA. Returns once every daemon reloaded
    /// and every PostgreSQL server presents its new certificate.
    pub async fn rotation_reissue_certificates(&mut self) {
        let mark = self.mark_logs();
        let pki = self.pki();
        for m in &self.monitors {
            pki.issue(
                &pki.files(&monitor_party(m.id)),
                Role::Monitor,
                &monitor_name(m.id),
            );
        }
        for n in &self.nodes {
            pki.issue(&pki.files(&n.name), Role::Postgres, &n.name);
        }
        pki.issue(&pki.files(OPERATOR), Role::Operator, OPERATOR);
        pki.issue(&pki.files(WRITER_USER), Role::Operator, WRITER_USER);
        self.reload_everywhere(&mark).await;
        for n in &self.nodes {
            let files = pki.files(&n.name);
            let wanted = crate::pki::first_certificate(&files.cert);
            wait_until(
                &format!("{} serves its new certificate", n.name),
                async || crate::pki::served_certificate(n.port, &files.ca_bundle).await == wanted,
            )
            .await;
        }
    }

    /// CA rotation, step 3 of 3: the old CA is dropped from every bundle. Returns the retired
    /// CAs once every daemon reloaded and every PostgreSQL server refuses a client certificate
    /// of the old CA.
    pub async fn rotation_retire_old_ca(&mut self) -> Vec<Ca> {
        let mark = self.mark_logs();
        let retired = self
            .tls
            .as_mut()
            .expect("a secured cluster")
            .pki
            .retire_old_cas();
        for files in self.parties() {
            self.pki().write_bundle(&files);
        }
        self.reload_everywhere(&mark).await;
        let stale = self.pki().files("writer-stale");
        self.pki().write_bundle(&stale);
        for ca in &retired {
            Pki::issue_by(ca, &stale, Role::Operator, WRITER_USER);
        }
        let stale =
            PgClientTls::load(stale, WRITER_USER).expect("the stale files were just written");
        self.wait_postgres_admits(&stale, false, "a certificate of the old CA")
            .await;
        retired
    }

    /// Waits until every PostgreSQL server admits (or, with `admitted` false, refuses) a new
    /// session of `client`, whose certificate is `what`.
    async fn wait_postgres_admits(&self, client: &PgClientTls, admitted: bool, what: &str) {
        let verb = if admitted { "admits" } else { "refuses" };
        for n in &self.nodes {
            wait_until(&format!("{} {verb} {what}", n.name), async || {
                client.connect(n.port, Duration::from_secs(2)).await.is_ok() == admitted
            })
            .await;
        }
    }

    /// The length of every daemon's log now: what is logged later is what a step caused.
    fn mark_logs(&self) -> LogMark {
        LogMark(
            self.daemon_logs()
                .into_iter()
                .map(|p| {
                    let len = std::fs::metadata(&p).map_or(0, |m| m.len());
                    (p, len)
                })
                .collect(),
        )
    }

    fn daemon_logs(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = self
            .monitors
            .iter()
            .map(|m| self.log_path(&format!("monitor{}", m.id)))
            .collect();
        logs.extend(
            self.nodes
                .iter()
                .map(|n| self.log_path(&format!("{}-agent", n.name))),
        );
        logs
    }

    /// SIGHUP to every running monitor and agent (an agent handles it once it has joined, which
    /// every agent of a started cluster has) and a reload of the harness's own clients;
    /// then waits until each daemon logged, after the signal, that it reloaded (a monitor its
    /// server, its peer client and its CA key; an agent its client) and each agent, after
    /// `mark`, that it handed the new files to PostgreSQL.
    async fn reload_everywhere(&self, mark: &LogMark) {
        let mut expected: Vec<(PathBuf, &[&str])> = Vec::new();
        for m in &self.monitors {
            if let Some(child) = &m.child {
                signal(pid_of(child), Signal::SIGHUP);
                expected.push((
                    self.log_path(&format!("monitor{}", m.id)),
                    &[
                        "server TLS reloaded",
                        "client TLS reloaded",
                        "CA key reloaded",
                    ],
                ));
            }
        }
        for n in &self.nodes {
            if let Some(agent) = &n.agent {
                signal(pid_of(agent), Signal::SIGHUP);
                expected.push((
                    self.log_path(&format!("{}-agent", n.name)),
                    &["client TLS reloaded"],
                ));
            }
        }
        let tls = self.tls();
        tls.operator
            .reload()
            .expect("the operator's new files load");
        tls.writer.reload().expect("the writer's new files load");
        for (log, lines) in expected {
            wait_until(
                &format!("{} reloads after SIGHUP", log.display()),
                async || {
                    let text = mark.since(&log);
                    text.rsplit_once(SIGHUP_LOGGED)
                        .is_some_and(|(_, after)| lines.iter().all(|l| after.contains(l)))
                },
            )
            .await;
        }
        for n in self.nodes.iter().filter(|n| n.agent.is_some()) {
            let log = self.log_path(&format!("{}-agent", n.name));
            wait_until(
                &format!("{}'s agent reloads PostgreSQL", n.name),
                async || mark.since(&log).contains(PG_RELOAD_LOGGED),
            )
            .await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.thaw();
        for n in &mut self.nodes {
            drop(n.agent.take());
        }
        for m in &mut self.monitors {
            drop(m.child.take());
        }
        let mut pids = std::mem::take(
            &mut *self
                .postmasters_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        pids.extend(
            self.nodes
                .iter()
                .filter_map(|n| postmaster_pid(&n.data_dir)),
        );
        stop_postmasters(&pids);
        if std::thread::panicking() {
            let mut logs: Vec<PathBuf> = std::fs::read_dir(self.root.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            logs.extend(self.nodes.iter().map(|n| n.socket_dir.join("data.log")));
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(60)..].join("\n");
                eprintln!("===== {} =====\n{tail}", log.display());
            }
        }
    }
}

/// What a daemon logs when SIGHUP makes it reload every TLS configuration (`ha_pki`).
const SIGHUP_LOGGED: &str = "SIGHUP: reloading every TLS config";
/// What an agent logs once PostgreSQL was told to reload new TLS files.
const PG_RELOAD_LOGGED: &str = "reloaded for new TLS material";

/// Log lengths at a moment ([`Cluster::mark_logs`]).
#[derive(Debug)]
struct LogMark(Vec<(PathBuf, u64)>);

impl LogMark {
    /// What `log` gained since the mark.
    fn since(&self, log: &Path) -> String {
        use std::io::{Read as _, Seek as _};
        let from = self
            .0
            .iter()
            .find(|(p, _)| p == log)
            .map_or(0, |(_, len)| *len);
        let mut text = Vec::new();
        if let Ok(mut f) = std::fs::File::open(log)
            && f.seek(std::io::SeekFrom::Start(from)).is_ok()
        {
            let _ = f.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

/// Polls `ok` every 50 ms; panics naming `what` after [`RELOAD_TIMEOUT`].
async fn wait_until(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    while !ok().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {RELOAD_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn index_of(id: u64) -> usize {
    usize::try_from(id - 1).expect("monitor ids are small")
}

fn pid_of(guard: &ChildGuard) -> i32 {
    i32::try_from(guard.id()).expect("PIDs fit in i32")
}

/// Polls until the process exits (within 30 s) and returns its status; panics naming `what`.
async fn wait_exit(mut guard: ChildGuard, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = guard.child().try_wait().expect("waiting for a child") {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not exit within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `sig` to a process this cluster started; it must exist.
fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("{sig} to {pid}: {e}"));
}

/// Sends `sig` to a process listed a moment ago, which may have ended since (a PostgreSQL
/// backend, or a child whose postmaster was just killed): returns whether it was still there.
/// Any other failure is a bug in the test.
fn signal_unless_gone(pid: i32, sig: Signal) -> bool {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => panic!("{sig} to {pid}: {e}"),
    }
}

/// Direct children of `parent` (from `/proc/*/stat`).
fn children_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// A request id no other request of this process reuses.
fn unique_request_id(what: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{what}-{}-{n}", std::process::id())
}
