//! `ha-agent` processes against a real `ha-monitor` (one monitor, `--dev`) and real PostgreSQL
//! 15 servers on loopback: the first node bootstraps as primary, the second becomes a streaming
//! standby; then the primary's postmaster and its agent are killed with SIGKILL and the standby
//! must be promoted under a new epoch. The time from the kill to the first acknowledged write on
//! the new primary is printed. Then the new primary's agent is stopped with SIGTERM (PostgreSQL
//! keeps serving), restarted (it adopts the server), and the monitor is killed: the agent must
//! fence its primary once the lease has passed. A bad config file exits 64.
//!
//! Every process is started by this test and ended by PID from a guard, even on failure; on
//! failure the guard prints the tail of every log.
#![allow(clippy::unwrap_used)]

use ha_tests::{free_port, is_postgres, postmaster_pid, stop_postmasters};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ha_agent::run::state::StateFile;
use ha_proto::v1::operator_service_client::OperatorServiceClient;
use ha_proto::v1::{self, CreateJoinTokenRequest, EventsRequest, StatusRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};
use tokio::time::Instant;
use tonic::transport::Channel;

/// The `ha-monitor` binary of this workspace, built on demand next to this test's binary.
fn monitor_binary() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "ha-monitor", "--bin", "ha-monitor"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .status()
        .unwrap();
    assert!(status.success(), "building ha-monitor failed");
    // target/debug/deps/agent_loop-HASH -> target/debug/ha-monitor
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("ha-monitor");
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

struct Agent {
    name: String,
    child: Option<Child>,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
}

/// Owns every process and the temporary directory.
struct Cluster {
    root: tempfile::TempDir,
    monitor_addr: String,
    monitor: Child,
    agents: Vec<Agent>,
    postmasters_seen: Vec<i32>,
    logs: Vec<PathBuf>,
}

impl Cluster {
    fn start_monitor() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let config = root.path().join("monitor.toml");
        std::fs::write(
            &config,
            format!(
                "id = 1\ndev = true\ndata_dir = \"{}\"\nlisten = \"{addr}\"\nmembers = [{{ id = 1, address = \"{addr}\" }}]\n",
                root.path().join("monitor").display()
            ),
        )
        .unwrap();
        let log = root.path().join("monitor.log");
        let monitor = Command::new(monitor_binary())
            .arg("--config")
            .arg(&config)
            .arg("--dev")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self {
            root,
            monitor_addr: addr,
            monitor,
            agents: Vec::new(),
            postmasters_seen: Vec::new(),
            logs: vec![log],
        }
    }

    async fn operator(&self) -> OperatorServiceClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ch) = Channel::from_shared(format!("http://{}", self.monitor_addr))
                .unwrap()
                .connect_timeout(Duration::from_millis(300))
                .timeout(Duration::from_secs(5))
                .connect()
                .await
            {
                let mut c = OperatorServiceClient::new(ch);
                if c.status(StatusRequest { linearizable: true }).await.is_ok() {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "the monitor never led");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn token(&self, op: &mut OperatorServiceClient<Channel>, name: &str) -> PathBuf {
        let token = op
            .create_join_token(CreateJoinTokenRequest {
                request_id: format!("token-{name}"),
                kind: v1::NodeKind::Postgres.into(),
                ttl_ms: 600_000,
                group: "main".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let path = self.root.path().join(format!("{name}.token"));
        std::fs::write(&path, token).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn start_agent(&mut self, name: &str, token: &Path) {
        let pg = User::from_name("postgres").unwrap().unwrap();
        let dir = self.root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(pg.uid.as_raw()), Some(pg.gid.as_raw())).unwrap();
        let port = free_port();
        let config = format!(
            r#"
role = "postgres"
node = "{name}"
group = "main"
monitors = ["{monitor}"]
join_token_file = "{token}"
state_dir = "{state}"
dev = true

[postgres]
data_dir = "{dir}/data"
port = {port}
listen_addresses = ["127.0.0.1"]
advertise_host = "127.0.0.1"
socket_dir = "{dir}"
start_timeout = "30s"
stop_timeout = "20s"
settings = {{ shared_buffers = "16MB", max_connections = "20" }}
hba = [
  {{ type = "host", database = "replication", user = "replicator", address = "127.0.0.1/32", method = "trust" }},
  {{ type = "host", database = "postgres", user = "replicator", address = "127.0.0.1/32", method = "trust" }},
]
"#,
            monitor = self.monitor_addr,
            token = token.display(),
            state = self.root.path().join(format!("{name}-state")).display(),
            dir = dir.display(),
        );
        let config_path = self.root.path().join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let child = self.spawn_agent(name);
        self.logs.push(dir.join("data.log"));
        self.agents.push(Agent {
            name: name.into(),
            child: Some(child),
            data_dir: dir.join("data"),
            socket_dir: dir,
            port,
        });
    }

    /// Starts (or restarts) the agent process of `name` with its config file.
    fn spawn_agent(&mut self, name: &str) -> Child {
        let log = self.root.path().join(format!("{name}-agent.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        if !self.logs.contains(&log) {
            self.logs.push(log);
        }
        Command::new(env!("CARGO_BIN_EXE_ha-agent"))
            .arg("--config")
            .arg(self.root.path().join(format!("{name}.toml")))
            .arg("--dev")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap()
    }

    fn restart_agent(&mut self, name: &str) {
        let child = self.spawn_agent(name);
        let agent = self.agents.iter_mut().find(|a| a.name == name).unwrap();
        assert!(agent.child.is_none(), "{name}'s agent still runs");
        agent.child = Some(child);
    }

    fn agent(&self, name: &str) -> &Agent {
        self.agents.iter().find(|a| a.name == name).unwrap()
    }

    /// SIGKILL of the node's agent and of its postmaster, as a machine crash would.
    fn crash(&mut self, name: &str) {
        let agent = self.agents.iter_mut().find(|a| a.name == name).unwrap();
        let pid = postmaster_pid(&agent.data_dir).expect("the primary's postmaster runs");
        self.postmasters_seen.push(pid);
        let mut child = agent.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    }

    /// SIGTERM to the node's agent; waits (polling) for it to exit.
    async fn terminate(&mut self, name: &str) -> std::process::ExitStatus {
        let agent = self.agents.iter_mut().find(|a| a.name == name).unwrap();
        let child = agent.child.as_mut().unwrap();
        kill(
            Pid::from_raw(i32::try_from(child.id()).unwrap()),
            Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                agent.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "the agent ignored SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn status(&self, op: &mut OperatorServiceClient<Channel>) -> v1::StatusResponse {
        op.status(StatusRequest { linearizable: true })
            .await
            .unwrap()
            .into_inner()
    }

    async fn events(&self, op: &mut OperatorServiceClient<Channel>) -> String {
        let events = op
            .events(EventsRequest {
                after_seq: 0,
                limit: 200,
            })
            .await
            .map(|r| r.into_inner().events)
            .unwrap_or_default();
        events
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

    /// Polls the status until `ok` holds, or fails with the last status and the events.
    async fn wait_for(
        &self,
        op: &mut OperatorServiceClient<Channel>,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&v1::StatusResponse) -> bool,
    ) -> v1::StatusResponse {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(op).await;
            if ok(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                let events = self.events(op).await;
                panic!("{what}: not reached within {timeout:?}\nstatus: {s:#?}\nevents:\n{events}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = self.monitor.kill();
        let _ = self.monitor.wait();
        let mut pids = self.postmasters_seen.clone();
        pids.extend(
            self.agents
                .iter()
                .filter_map(|a| postmaster_pid(&a.data_dir)),
        );
        stop_postmasters(&pids);
        if std::thread::panicking() {
            for log in &self.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(60)..].join("\n");
                eprintln!("===== {} =====\n{tail}", log.display());
            }
        }
    }
}

fn node<'a>(s: &'a v1::StatusResponse, name: &str) -> Option<&'a v1::NodeStatus> {
    s.nodes.iter().find(|n| n.name == name)
}

fn reached(s: &v1::StatusResponse, name: &str, state: v1::GoalState) -> bool {
    node(s, name).is_some_and(|n| n.reached == i32::from(state))
}

fn streaming(s: &v1::StatusResponse, name: &str) -> bool {
    node(s, name)
        .and_then(|n| n.postgres.as_ref())
        .is_some_and(|p| p.streaming && p.role == i32::from(v1::PgRole::Standby))
}

async fn session(agent: &Agent) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(&agent.socket_dir)
        .port(agent.port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(1))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// One write, acknowledged (committed) by the server, within `timeout`.
async fn write(agent: &Agent, value: i32, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let c = session(agent).await.map_err(|e| e.to_string())?;
        c.execute("INSERT INTO ha_probe VALUES ($1)", &[&value])
            .await
            .map_err(|e| {
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned())
            })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_standby_then_failover_after_primary_crash() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut cluster = Cluster::start_monitor();
    let mut op = cluster.operator().await;

    let t1 = cluster.token(&mut op, "psql1").await;
    cluster.start_agent("psql1", &t1);
    cluster
        .wait_for(
            &mut op,
            "psql1 bootstraps as the primary",
            Duration::from_secs(60),
            |s| {
                reached(s, "psql1", v1::GoalState::Single)
                    || reached(s, "psql1", v1::GoalState::Primary)
            },
        )
        .await;
    let primary = session(cluster.agent("psql1")).await.unwrap();
    primary
        .batch_execute("CREATE TABLE ha_probe (v int); INSERT INTO ha_probe VALUES (1)")
        .await
        .unwrap();

    let t2 = cluster.token(&mut op, "psql2").await;
    cluster.start_agent("psql2", &t2);
    let before = cluster
        .wait_for(
            &mut op,
            "psql2 streams as psql1's confirmed synchronous standby",
            Duration::from_secs(90),
            |s| {
                reached(s, "psql2", v1::GoalState::Standby)
                    && streaming(s, "psql2")
                    && reached(s, "psql1", v1::GoalState::Primary)
                    && s.groups
                        .iter()
                        .any(|g| g.primary == "psql1" && g.synchronous)
            },
        )
        .await;
    let epoch_before = before.groups[0].epoch;
    // Acknowledged by the primary only once psql2 confirmed it (synchronous replication).
    write(cluster.agent("psql1"), 2, Duration::from_secs(10))
        .await
        .unwrap();
    drop(primary);
    let standby = session(cluster.agent("psql2")).await.unwrap();
    let replicated = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = standby
            .query_one("SELECT count(*) FROM ha_probe", &[])
            .await
            .unwrap()
            .get(0);
        if n == 2 {
            break;
        }
        assert!(
            Instant::now() < replicated,
            "rows did not reach the standby"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(standby);

    let killed = Instant::now();
    cluster.crash("psql1");
    let deadline = killed + Duration::from_secs(60);
    let took = loop {
        let error = match write(cluster.agent("psql2"), 3, Duration::from_secs(2)).await {
            Ok(()) => break killed.elapsed(),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            let s = cluster.status(&mut op).await;
            let events = cluster.events(&mut op).await;
            panic!(
                "no write accepted by psql2 within 60 s (last error: {error})\nstatus: {s:#?}\nevents:\n{events}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "primary crash (kill -9 of postmaster and agent) to first acknowledged write on the new primary: {took:?}"
    );

    let after = cluster
        .wait_for(
            &mut op,
            "psql2 is the group's primary",
            Duration::from_secs(10),
            |s| s.groups.iter().any(|g| g.primary == "psql2"),
        )
        .await;
    assert!(
        after.groups[0].epoch > epoch_before,
        "promotion carries a new epoch: {} -> {}",
        epoch_before,
        after.groups[0].epoch
    );
    let n = node(&after, "psql2").unwrap();
    assert_eq!(n.goal, i32::from(v1::GoalState::Primary), "{n:#?}");
    let persisted = StateFile::new(&cluster.root.path().join("psql2-state"))
        .load()
        .unwrap();
    assert_eq!(
        persisted.highest_epoch.get(),
        after.groups[0].epoch,
        "the agent persisted the new epoch"
    );
    let new_primary = session(cluster.agent("psql2")).await.unwrap();
    let rows: Vec<i32> = new_primary
        .query("SELECT v FROM ha_probe ORDER BY v", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![1, 2, 3], "no acknowledged write lost");
    drop(new_primary);

    // SIGTERM: the agent stops reporting and exits cleanly, leaving PostgreSQL running.
    let pid = postmaster_pid(&cluster.agent("psql2").data_dir).unwrap();
    let status = cluster.terminate("psql2").await;
    assert!(status.success(), "agent exit: {status}");
    assert!(
        is_postgres(pid),
        "PostgreSQL keeps running after the agent stops"
    );
    write(cluster.agent("psql2"), 4, Duration::from_secs(5))
        .await
        .unwrap();

    // A restarted agent adopts the running server and renews its lease.
    cluster.restart_agent("psql2");
    cluster
        .wait_for(
            &mut op,
            "the restarted agent reports",
            Duration::from_secs(30),
            |s| {
                node(s, "psql2").is_some_and(|n| {
                    n.last_report_age_ms.is_some_and(|ms| ms < 400)
                        && n.reached == i32::from(v1::GoalState::Primary)
                })
            },
        )
        .await;
    assert_eq!(postmaster_pid(&cluster.agent("psql2").data_dir), Some(pid));

    // Lease self-fencing: with the monitor gone, the primary's agent stops PostgreSQL once the
    // 3 s lease has passed since its last answered report (sent at most ~0.5 s before the
    // kill), and before the monitor's lease + margin (4 s) could allow a promotion.
    let lost = Instant::now();
    let _ = cluster.monitor.kill();
    let _ = cluster.monitor.wait();
    let fence_deadline = lost + Duration::from_secs(10);
    while is_postgres(pid) {
        assert!(
            Instant::now() < fence_deadline,
            "the primary never fenced itself"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fenced = lost.elapsed();
    println!("monitor lost to primary stopped by its own agent: {fenced:?}");
    assert!(
        fenced >= Duration::from_millis(2000) && fenced < Duration::from_secs(4),
        "fenced after {fenced:?}: expected once the 3 s lease passed, before lease + margin"
    );
}

#[test]
fn a_bad_config_exits_64_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "role = \"postgres\"\nnode = \"Bad Name\"\n").unwrap();
    for args in [vec!["--dev"], vec![]] {
        let out = Command::new(env!("CARGO_BIN_EXE_ha-agent"))
            .arg("--config")
            .arg(&config)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("invalid configuration"), "{stderr}");
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_ha-agent"))
        .args(["--config", "/nonexistent/agent.toml", "--dev"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(64));
    assert!(
        dir.path().read_dir().unwrap().count() == 1,
        "nothing was created"
    );
}
