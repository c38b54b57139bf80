//! The processes of a stand, once its nodes exist: `up` writes the material
//! ([`crate::material`]), starts each node's daemons in dependency order and issues the agents'
//! join tokens. One sequence for both backends; a [`Fleet`] says how the nodes are reached:
//! [`Supervisors`] start one supervisor per namespace ([`crate::supervise`]; `down` stops them
//! first), [`crate::guests::GuestFleet`] places files and starts the packaged systemd units
//! on libvirt guests over SSH.
//!
//! Order of `up` (each step timed and printed):
//! 1. material (CA, certificates, configs), recorded in the state before it is written, and
//!    placed on the nodes with its owners and modes (guests);
//! 2. the monitors, then wait until `haclt status` shows every monitor and a leader;
//! 3. a join token per agent (postgres and ejabberd nodes) that has none, created with
//!    `haclt token create` as the operator (the fabric namespace on a netns stand, this
//!    machine on the management network of a libvirt stand) with the stand's operator config;
//! 4. the first postgres node, waiting until a primary exists (on a new stand the first node,
//!    the reference stand's psql1server), then the other postgres nodes;
//! 5. ejabberd's SQL role, database and schema, and the XMPP load accounts, on that primary
//!    (idempotent, `psql` as `postgres` over the primary's socket; passwords travel on stdin,
//!    never in argv);
//! 6. the ejabberd nodes, waiting until every ejabberd agent has verified the primary at the
//!    current epoch (a write through ejabberd seen there) and reports every ejabberd node in
//!    its Erlang cluster (joining restarts ejabberd on the joining node: sessions opened
//!    before that would be dropped).
//!
//! Invariants: daemons already running are left alone (a supervisor whose PID file names a
//! live `ha-provision ... supervise` process; a systemd unit that is active), so `up` is
//! idempotent and resumes; processes are only ever signalled by the PIDs this module recorded.
//! Binaries (`ha-monitor`, `ha-agent`, `haclt`) are looked up in one directory: by default the
//! one holding the running `ha-provision` (`--bin-dir` overrides).

use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{info, warn};

use crate::material::{EJABBERD_DB, GROUP, LOAD_USERS, Material, MaterialError, Placed};
use crate::netns::{Layout, as_node};
use crate::state::{Resource, StateError, StateFile};
use crate::topology::{Node, Role, Topology};

/// How long `up` waits for the monitors to elect a leader.
const MONITORS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `up` waits for the first PostgreSQL node to become primary (initdb included).
const PRIMARY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `up` waits for the ejabberd agents to verify the primary: two ejabberd boots on
/// a loaded 2-core machine take up to a minute, the agent's first apply a few seconds more.
const EJABBERD_TIMEOUT: Duration = Duration::from_secs(180);
/// ejabberd's SQL schema for PostgreSQL (Debian's ejabberd package).
const EJABBERD_SCHEMA: &str = "/usr/share/ejabberd/sql/pg.sql";
/// How long `down` waits for a supervisor after SIGTERM (it gives its programs
/// [`crate::supervise::STOP_GRACE`]).
const SUPERVISOR_GRACE: Duration = Duration::from_secs(40);

/// Errors of the process layer.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Generating the material failed.
    #[error(transparent)]
    Material(#[from] MaterialError),
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] StateError),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A binary is missing from the bin dir.
    #[error("{0} not found: build the workspace binaries or pass --bin-dir")]
    MissingBinary(PathBuf),
    /// The packages for libvirt guests are missing or ambiguous.
    #[error("{0}")]
    Packages(String),
    /// A command on a node failed (libvirt guests: over SSH).
    #[error("{node}: {what}: {detail}")]
    Remote {
        /// The node.
        node: String,
        /// What was done.
        what: String,
        /// Why it failed.
        detail: String,
    },
    /// `psql` failed while preparing ejabberd's database.
    #[error("preparing ejabberd's database on {node}: {detail}")]
    Database {
        /// The primary.
        node: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// `haclt` failed.
    #[error("haclt {args}: {detail}")]
    Haclt {
        /// Its arguments.
        args: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// A condition was not reached in time.
    #[error("{what} not reached within {timeout:?}; last status: {last}")]
    Timeout {
        /// The condition.
        what: String,
        /// How long `up` waited.
        timeout: Duration,
        /// The last answer seen.
        last: String,
    },
}

/// Where the processes' binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// Directory of `ha-monitor`, `ha-agent` and `haclt`.
    pub bin_dir: PathBuf,
    /// The `ha-provision` executable the supervisors run (`supervise`).
    pub provision: PathBuf,
}

impl Binaries {
    /// The running `ha-provision` and, unless `bin_dir` is given, its directory.
    pub fn locate(bin_dir: Option<PathBuf>) -> Result<Self, LabError> {
        let provision = std::env::current_exe().map_err(|source| LabError::Io {
            what: "locating the ha-provision executable".into(),
            source,
        })?;
        let bin_dir = match bin_dir {
            Some(d) => d,
            None => provision
                .parent()
                .expect("an executable's path has a parent directory")
                .to_owned(),
        };
        let found = Self { bin_dir, provision };
        for name in ["ha-monitor", "ha-agent", "haclt"] {
            let path = found.bin_dir.join(name);
            if !path.is_file() {
                return Err(LabError::MissingBinary(path));
            }
        }
        Ok(found)
    }
}

/// One timed step of `up`, for the printed summary.
#[derive(Debug, Clone)]
pub struct Step {
    /// What was done.
    pub what: String,
    /// How long it took.
    pub took: Duration,
}

/// How `up` reaches the nodes of a stand.
pub trait Fleet {
    /// Puts `files` of `node` (written by the material at [`Material::local`]) on the node
    /// with their owners and modes.
    fn place(
        &mut self,
        material: &Material<'_>,
        node: &str,
        files: &[Placed],
    ) -> Result<(), LabError>;
    /// Starts `node`'s daemons unless they run.
    fn start(&mut self, material: &Material<'_>, node: &Node) -> Result<(), LabError>;
    /// Runs `argv` on `node` as the `postgres` user with `stdin` as its input.
    fn as_postgres(&mut self, node: &str, argv: &[String], stdin: &[u8]) -> Result<(), LabError>;
    /// `haclt` as the stand's operator.
    fn haclt(&self) -> &Haclt;
}

/// The nodes of a netns stand: a supervisor per namespace.
#[derive(Debug)]
pub struct Supervisors<'a> {
    topology: &'a Topology,
    prefix: String,
    bins: &'a Binaries,
    haclt: Haclt,
}

impl<'a> Supervisors<'a> {
    /// The nodes of the netns stand `topology` with namespace prefix `prefix`, whose state
    /// directory is `dir`.
    pub fn new(topology: &'a Topology, prefix: &str, dir: &Path, bins: &'a Binaries) -> Self {
        Self {
            topology,
            prefix: prefix.to_owned(),
            bins,
            haclt: Haclt {
                binary: bins.bin_dir.join("haclt"),
                fabric: Some(Layout::new(topology, prefix).fabric()),
                config: StateFile::haclt_config_path(dir),
            },
        }
    }
}

impl Fleet for Supervisors<'_> {
    fn place(&mut self, _: &Material<'_>, _: &str, _: &[Placed]) -> Result<(), LabError> {
        // The namespaces share this machine's files: the material is in place.
        Ok(())
    }

    fn start(&mut self, material: &Material<'_>, node: &Node) -> Result<(), LabError> {
        start_supervisor(self.topology, &self.prefix, material, self.bins, &node.name)
    }

    fn as_postgres(&mut self, node: &str, argv: &[String], stdin: &[u8]) -> Result<(), LabError> {
        let ns = Layout::new(self.topology, &self.prefix).namespace(node);
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| LabError::Io { what, source }
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, "runuser", "-u", "postgres", "--"])
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(&format!("running {}", argv[0])))?;
        let written = child.stdin.take().expect("stdin is piped").write_all(stdin);
        let out = child
            .wait_with_output()
            .map_err(io(&format!("running {}", argv[0])))?;
        written.map_err(io(&format!("sending the input of {}", argv[0])))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LabError::Remote {
                node: node.to_owned(),
                what: argv[0].clone(),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            })
        }
    }

    fn haclt(&self) -> &Haclt {
        &self.haclt
    }
}

/// Starts the stand's processes (see the module docs); the nodes and their networks must
/// exist.
pub fn up(
    topology: &Topology,
    state: &mut StateFile,
    material: &Material<'_>,
    fleet: &mut dyn Fleet,
) -> Result<Vec<Step>, LabError> {
    let mut steps = Vec::new();
    let mut timed = |what: &str, started: Instant| {
        let step = Step {
            what: what.to_owned(),
            took: started.elapsed(),
        };
        info!(step = %step.what, ms = step.took.as_millis(), "up step done");
        steps.push(step);
    };

    let t = Instant::now();
    for path in [
        material.pki_dir(),
        material.nodes_dir(),
        material.files_dir(),
        material.haclt_config(),
    ] {
        state.record(Resource::Files { path })?;
    }
    let manifest = material.generate()?;
    for (node, files) in &manifest {
        fleet.place(material, node, files)?;
    }
    timed("material (CA, certificates, configs)", t);

    let t = Instant::now();
    let monitors: Vec<&Node> = topology.nodes_with_role(Role::Monitor).collect();
    for node in &monitors {
        fleet.start(material, node)?;
    }
    let want = monitors.len();
    fleet
        .haclt()
        .wait_for("monitors elect a leader", MONITORS_TIMEOUT, |s| {
            let ms = s["monitors"].as_array().map_or(&[][..], Vec::as_slice);
            ms.len() == want && ms.iter().any(|m| m["leader"] == true)
        })?;
    timed("monitors up, leader elected", t);

    let t = Instant::now();
    for node in &topology.nodes {
        let role = match node.role {
            Role::Postgres => "postgres",
            Role::Ejabberd => "ejabberd",
            Role::Monitor | Role::Gateway => continue,
        };
        let path = material.local(&node.name, &material.join_token(&node.name));
        if !path.exists() {
            let address = material.advertise_address(node).to_string();
            let token = fleet.haclt().run(&[
                "token",
                "create",
                "--role",
                role,
                "--node",
                &node.name,
                "--address",
                &address,
                "--group",
                GROUP,
            ])?;
            let placed = material.write_join_token(node, token.trim())?;
            fleet.place(material, &node.name, &placed)?;
            info!(node = %node.name, role, path = %path.display(), "join token written");
        }
    }
    timed("join tokens", t);

    let postgres: Vec<&Node> = topology.nodes_with_role(Role::Postgres).collect();
    let Some((first, rest)) = postgres.split_first() else {
        return Ok(steps);
    };
    let t = Instant::now();
    fleet.start(material, first)?;
    let s = fleet
        .haclt()
        .wait_for("a primary", PRIMARY_TIMEOUT, |s| primary_of(s).is_some())?;
    let primary = primary_of(&s).expect("waited for it");
    timed(&format!("{primary} primary"), t);
    let t = Instant::now();
    for node in rest {
        fleet.start(material, node)?;
    }
    timed("other postgres nodes started", t);

    // The gateways' HAProxy (netns; a libvirt gateway runs nothing yet).
    let t = Instant::now();
    let gateways: Vec<&Node> = topology.nodes_with_role(Role::Gateway).collect();
    for node in &gateways {
        fleet.start(material, node)?;
    }
    if !gateways.is_empty() {
        timed("gateways started (HAProxy)", t);
    }

    let frontends: Vec<&Node> = topology.nodes_with_role(Role::Ejabberd).collect();
    if frontends.is_empty() {
        return Ok(steps);
    }
    let t = Instant::now();
    let primary = prepare_ejabberd_database_on_primary(material, fleet, topology.ports.postgres)?;
    timed(&format!("ejabberd database on {primary}"), t);
    let t = Instant::now();
    for node in &frontends {
        fleet.start(material, node)?;
    }
    let names: Vec<&str> = frontends.iter().map(|n| n.name.as_str()).collect();
    // The Erlang cluster too: joining restarts ejabberd on the joining node, which would
    // drop the XMPP sessions of whoever connected right after `up`.
    fleet.haclt().wait_for(
        "every ejabberd agent verifies the primary, one Erlang cluster",
        EJABBERD_TIMEOUT,
        |s| frontends_applied(s, &names) && one_erlang_cluster(s, &names),
    )?;
    timed("ejabberd nodes on the primary", t);
    Ok(steps)
}

/// The group's primary in the status, once that node reports itself primary (or single).
/// The group's record, not the node states: a crashed primary's last report still says
/// primary after the failover.
fn primary_of(s: &serde_json::Value) -> Option<String> {
    let name = s["groups"][0]["primary"].as_str()?;
    s["nodes"].as_array()?.iter().find_map(|n| {
        (n["name"] == name && (n["state"] == "primary" || n["state"] == "single"))
            .then(|| name.to_owned())
    })
}

/// Whether every node of `frontends` has verified the primary at its group's current epoch.
pub fn frontends_applied(s: &serde_json::Value, frontends: &[&str]) -> bool {
    let (Some(epoch), Some(primary)) = (s["groups"][0]["epoch"].as_u64(), primary_of(s)) else {
        return false;
    };
    frontends.iter().all(|name| {
        ejabberd_status(s, name).is_some_and(|e| {
            e["applied_epoch"].as_u64() == Some(epoch)
                && e["applied_node"].as_str() == Some(primary.as_str())
        })
    })
}

/// Whether every node of `frontends` runs ejabberd and reports all of them as members of its
/// Erlang cluster.
pub fn one_erlang_cluster(s: &serde_json::Value, frontends: &[&str]) -> bool {
    frontends.iter().all(|name| {
        ejabberd_status(s, name).is_some_and(|e| {
            let members = e["cluster_members"]
                .as_array()
                .map_or(&[][..], Vec::as_slice);
            e["running"] == true
                && frontends
                    .iter()
                    .all(|f| members.iter().any(|m| *m == Material::erlang_node(f)))
        })
    })
}

/// Node `name` in a status (`haclt status --json`).
pub fn node_status<'a>(s: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    s["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

/// The `ejabberd` part of node `name` in a status.
pub fn ejabberd_status<'a>(s: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    node_status(s, name).map(|n| &n["ejabberd"])
}

/// Creates ejabberd's SQL role (with the stand's password), database and schema on the primary
/// unless they exist. Replication carries them to the standbys.
/// [`prepare_ejabberd_database`] on the primary of the moment, again until it succeeds or
/// [`PRIMARY_TIMEOUT`] passes: the script is idempotent, and a run can be cut short by the
/// primary being fenced or replaced meanwhile (on a slow stand, software-emulated guests, a
/// monitor election can outlast the lease). Returns the primary it succeeded on.
fn prepare_ejabberd_database_on_primary(
    material: &Material<'_>,
    fleet: &mut dyn Fleet,
    port: u16,
) -> Result<String, LabError> {
    let deadline = Instant::now() + PRIMARY_TIMEOUT;
    loop {
        let s = fleet
            .haclt()
            .wait_for("a primary", PRIMARY_TIMEOUT, |s| primary_of(s).is_some())?;
        let primary = primary_of(&s).expect("waited for it");
        match prepare_ejabberd_database(material, fleet, &primary, port) {
            Ok(()) => return Ok(primary),
            Err(e) if Instant::now() < deadline => {
                warn!(node = %primary, error = %e, "preparing ejabberd's database failed; again on the primary of the moment");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

fn prepare_ejabberd_database(
    material: &Material<'_>,
    fleet: &mut dyn Fleet,
    primary: &str,
    port: u16,
) -> Result<(), LabError> {
    let load_password = material.xmpp_load_password()?;
    let accounts: Vec<String> = (1..=LOAD_USERS)
        .map(|i| format!("('load{i}', '{load_password}')"))
        .collect();
    let db = EJABBERD_DB;
    // psql variables would put the passwords on the command line; stdin keeps them private.
    // The role is created, without a password (ejabberd logs in with its node certificate:
    // `hostssl ... cert`; an older stand's password is removed); the database and the schema
    // (owned by ejabberd: `SET ROLE`) only when missing; the XMPP load accounts
    // (`ha-xmpp-load`) are created or get their password back.
    let script = format!(
        "SELECT 'CREATE ROLE ejabberd LOGIN' WHERE NOT EXISTS \
           (SELECT 1 FROM pg_roles WHERE rolname = 'ejabberd') \\gexec\n\
         ALTER ROLE ejabberd LOGIN PASSWORD NULL;\n\
         SELECT format('CREATE DATABASE %I OWNER ejabberd', '{db}') WHERE NOT EXISTS \
           (SELECT 1 FROM pg_database WHERE datname = '{db}') \\gexec\n\
         \\connect {db}\n\
         SELECT to_regclass('public.users') IS NULL AS fresh \\gset\n\
         \\if :fresh\n\
         SET ROLE ejabberd;\n\
         \\i {EJABBERD_SCHEMA}\n\
         RESET ROLE;\n\
         \\endif\n\
         INSERT INTO users (username, password) VALUES {accounts} \
           ON CONFLICT (username) DO UPDATE SET password = EXCLUDED.password;\n",
        accounts = accounts.join(", "),
    );
    let argv: Vec<String> = [
        "psql",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        &material.pg_socket_dir(primary).display().to_string(),
        "-p",
        &port.to_string(),
        "-d",
        "postgres",
        "-f",
        "-",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    fleet
        .as_postgres(primary, &argv, script.as_bytes())
        .map_err(|e| LabError::Database {
            node: primary.to_owned(),
            detail: e.to_string(),
        })?;
    info!(node = primary, database = db, "ejabberd database ready");
    Ok(())
}

fn pid_file(material: &Material<'_>, node: &str) -> PathBuf {
    material.node_dir(node).join("supervisor.pid")
}

/// The PID of `node`'s running supervisor in the stand whose state directory is `dir`.
pub fn supervisor_pid(topology: &Topology, dir: &Path, node: &str) -> Option<i32> {
    running_supervisor(&Material::new(topology, dir), node)
}

/// The PID of `node`'s running supervisor, if its PID file names one.
fn running_supervisor(material: &Material<'_>, node: &str) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file(material, node))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_supervisor(pid, node).then_some(pid)
}

/// Whether `pid` is a live `ha-provision ... supervise ... <node>` (never a reused PID).
fn is_supervisor(pid: i32, node: &str) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    !zombie && args.contains(&&b"supervise"[..]) && args.contains(&node.as_bytes())
}

fn start_supervisor(
    topology: &Topology,
    prefix: &str,
    material: &Material<'_>,
    bins: &Binaries,
    node: &str,
) -> Result<(), LabError> {
    if let Some(pid) = running_supervisor(material, node) {
        info!(node, pid, "supervisor already running");
        return Ok(());
    }
    let log_path = material.node_dir(node).join("supervisor.log");
    let io = |what: String| move |source| LabError::Io { what, source };
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(format!("opening {}", log_path.display())))?;
    let log_err = log.try_clone().map_err(io("duplicating the log".into()))?;
    let ns = Layout::new(topology, prefix).namespace(node);
    // Exec'd in place: the child's PID is the supervisor's.
    let mut cmd = as_node(&ns, node);
    cmd.arg(&bins.provision)
        .arg("--state-dir")
        .arg(material.dir())
        .args(["supervise", "--bin-dir"])
        .arg(&bins.bin_dir)
        .arg(node)
        // Its own process group: a Ctrl-C aimed at `up` must not reach the stand.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    let child = cmd
        .spawn()
        .map_err(io(format!("starting the supervisor of {node}")))?;
    let pid = child.id();
    fs::write(pid_file(material, node), format!("{pid}\n"))
        .map_err(io(format!("writing the PID file of {node}")))?;
    info!(node, pid, namespace = %ns, "supervisor started");
    Ok(())
}

/// Stops every node's supervisor by its recorded PID (SIGTERM, then SIGKILL after
/// [`SUPERVISOR_GRACE`]) and removes the PID files. Nodes without one are skipped.
pub fn stop_supervisors(topology: &Topology, dir: &Path) {
    let material = Material::new(topology, dir);
    let running: Vec<(String, i32)> = topology
        .nodes
        .iter()
        .filter_map(|n| running_supervisor(&material, &n.name).map(|p| (n.name.clone(), p)))
        .collect();
    for (node, pid) in &running {
        info!(node, pid, "stopping supervisor");
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + SUPERVISOR_GRACE;
    for (node, pid) in &running {
        while is_supervisor(*pid, node) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if is_supervisor(*pid, node) {
            warn!(node, pid, "supervisor ignored SIGTERM; SIGKILL");
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
    for node in &topology.nodes {
        let _ = fs::remove_file(pid_file(&material, &node.name));
    }
}

/// `haclt` run as the stand's operator with its config: in the fabric namespace of a netns
/// stand, on this machine for a libvirt stand.
#[derive(Debug, Clone)]
pub struct Haclt {
    /// The binary.
    pub binary: PathBuf,
    /// The fabric namespace (the operator host of a netns stand).
    pub fabric: Option<String>,
    /// `S/haclt.toml`.
    pub config: PathBuf,
}

/// `haclt status`'s exit code for a cluster that answers but is degraded.
pub const DEGRADED: i32 = 3;

impl Haclt {
    /// Runs `haclt --config C ARGS` and returns its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, LabError> {
        self.run_accepting(args, &[])
    }

    /// [`Self::run`], also taking the exit codes in `accepted` as success (`status` exits 3
    /// when the cluster is degraded, with the full answer on stdout).
    fn run_accepting(&self, args: &[&str], accepted: &[i32]) -> Result<String, LabError> {
        let mut argv: Vec<OsString> = match &self.fabric {
            Some(ns) => vec!["ip".into(), "netns".into(), "exec".into(), ns.into()],
            None => Vec::new(),
        };
        argv.extend([
            self.binary.clone().into(),
            "--config".into(),
            self.config.clone().into(),
        ]);
        argv.extend(args.iter().map(OsString::from));
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| LabError::Io {
                what: "running haclt".into(),
                source,
            })?;
        if out.status.success() || out.status.code().is_some_and(|c| accepted.contains(&c)) {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(LabError::Haclt {
                args: args.join(" "),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            })
        }
    }

    /// `haclt status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value, LabError> {
        let text = self.run_accepting(&["status", "--json"], &[DEGRADED])?;
        serde_json::from_str(&text).map_err(|e| LabError::Haclt {
            args: "status --json".into(),
            detail: format!("unreadable output: {e}"),
        })
    }

    /// Polls the status until `ok` holds, or fails after `timeout` with the last answer.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status() {
                Ok(s) if ok(&s) => return Ok(s),
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: what.to_owned(),
                    timeout,
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
