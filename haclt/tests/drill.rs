//! `haclt drill` against a real cluster on loopback: one `ha-monitor` (`--dev`) and two
//! `ha-agent`s driving real PostgreSQL 15 servers. psql1's agent allows drills, psql2's does not.
//!
//! 1. `drill switchover --json`: psql1 -> psql2, no acknowledged write lost, some unavailability;
//! 2. `drill crash-primary` aimed at psql2: its agent refuses (exit 65, `allow_drills` named),
//!    and nothing happens: same primary, same postmaster, agent still running;
//! 3. `drill switchover` back to psql1, then `drill crash-primary --json`: psql1's agent kills
//!    its postmaster and itself with SIGKILL, psql2 is promoted, no acknowledged write lost;
//! 4. psql1's agent restarted (as a supervisor would), back to psql1 by switchover, then
//!    `drill freeze-primary` for less than the lease (no failover, nothing lost) and
//!    `drill partition-primary` for more (psql2 promoted, psql1 returns as a standby). On
//!    loopback the partition cuts psql1's PostgreSQL port and its agent's monitor traffic.
//!
//! Every process is started here and ended by PID from a guard, even on failure; on failure the
//! guard prints the tail of every log. (This cluster is meant to move onto the shared harness
//! of `ha-tests` once it exists.)

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ha_tests::{free_port, is_postgres, postmaster_pid, stop_postmasters};
use nix::unistd::User;
use serde_json::Value;

/// `ha-monitor` and `ha-agent` of this workspace, built on demand next to `haclt`.
fn daemon_binaries() -> (PathBuf, PathBuf) {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "ha-monitor", "-p", "ha-agent"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .status()
        .unwrap();
    assert!(status.success(), "building the daemons failed");
    let dir = Path::new(env!("CARGO_BIN_EXE_haclt")).parent().unwrap();
    (dir.join("ha-monitor"), dir.join("ha-agent"))
}

struct Cluster {
    root: tempfile::TempDir,
    /// `host:port` of every monitor, comma separated (as `--monitors` takes them).
    monitor_addrs: String,
    agent_bin: PathBuf,
    monitors: Vec<Child>,
    agents: Vec<(String, Option<Child>)>,
    postmasters_seen: Vec<i32>,
}

impl Cluster {
    /// `monitors` monitors (drills allowed in them), no node yet.
    fn start(monitors: u64) -> Self {
        let (monitor_bin, agent_bin) = daemon_binaries();
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let addrs: Vec<(u64, String)> = (1..=monitors)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let members: Vec<String> = addrs
            .iter()
            .map(|(id, a)| format!("{{ id = {id}, address = \"{a}\" }}"))
            .collect();
        let children = addrs
            .iter()
            .map(|(id, addr)| {
                let config = root.path().join(format!("m{id}.toml"));
                std::fs::write(
                    &config,
                    format!(
                        "id = {id}\ndev = true\nallow_drills = true\ndata_dir = \"{}\"\nlisten = \"{addr}\"\nmembers = [{}]\n",
                        root.path().join(format!("m{id}")).display(),
                        members.join(", ")
                    ),
                )
                .unwrap();
                let log = std::fs::File::create(root.path().join(format!("m{id}.log"))).unwrap();
                Command::new(&monitor_bin)
                    .arg("--config")
                    .arg(&config)
                    .arg("--dev")
                    .env("RUST_LOG", "info")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap()
            })
            .collect();
        Self {
            root,
            monitor_addrs: addrs
                .iter()
                .map(|(_, a)| a.as_str())
                .collect::<Vec<_>>()
                .join(","),
            agent_bin,
            monitors: children,
            agents: Vec::new(),
            postmasters_seen: Vec::new(),
        }
    }

    fn haclt(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_haclt"))
            .args(["--dev", "--monitors", &self.monitor_addrs])
            .args(args)
            .env_remove("HACLT_CONFIG")
            .output()
            .unwrap();
        if args.first() == Some(&"drill") {
            eprintln!(
                "haclt {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    fn status(&self) -> Option<Value> {
        let out = self.haclt(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Polls `haclt status --json` until `ok` holds.
    fn wait_for(&self, what: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if let Some(s) = s.as_ref().filter(|s| ok(s)) {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not reached within {timeout:?}; last status: {s:#?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn add_node(&mut self, name: &str, allow_drills: bool) {
        let token = self.haclt(&["token", "create", "--role", "postgres", "--json"]);
        assert!(token.status.success(), "{token:?}");
        let token: Value = serde_json::from_slice(&token.stdout).unwrap();
        let token_file = self.root.path().join(format!("{name}.token"));
        std::fs::write(&token_file, token["token"].as_str().unwrap()).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pg = User::from_name("postgres").unwrap().unwrap();
        let dir = self.root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(pg.uid.as_raw()), Some(pg.gid.as_raw())).unwrap();
        let trust = |db: &str, user: &str| {
            format!(
                "{{ type = \"host\", database = \"{db}\", user = \"{user}\", address = \"127.0.0.1/32\", method = \"trust\" }}"
            )
        };
        let config = format!(
            r#"
role = "postgres"
node = "{name}"
group = "main"
monitors = [{monitors}]
join_token_file = "{token}"
state_dir = "{dir}/state"
dev = true
allow_drills = {allow_drills}

[postgres]
data_dir = "{dir}/data"
port = {port}
listen_addresses = ["127.0.0.1"]
advertise_host = "127.0.0.1"
socket_dir = "{dir}"
start_timeout = "30s"
stop_timeout = "20s"
settings = {{ shared_buffers = "16MB", max_connections = "30" }}
hba = [{repl}, {rewind}, {writer}]
"#,
            monitors = self
                .monitor_addrs
                .split(',')
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", "),
            token = token_file.display(),
            dir = dir.display(),
            port = free_port(),
            repl = trust("replication", "replicator"),
            rewind = trust("postgres", "replicator"),
            writer = trust("postgres", "postgres"),
        );
        std::fs::write(self.root.path().join(format!("{name}.toml")), config).unwrap();
        let child = self.spawn_agent(name);
        self.agents.push((name.to_owned(), Some(child)));
    }

    /// Starts the agent of `name` (again: the log is appended to).
    fn spawn_agent(&self, name: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join(format!("{name}-agent.log")))
            .unwrap();
        Command::new(&self.agent_bin)
            .arg("--config")
            .arg(self.root.path().join(format!("{name}.toml")))
            .arg("--dev")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// What a supervisor does for an agent that died: start it again.
    fn restart_agent(&mut self, name: &str) {
        let child = self.spawn_agent(name);
        let slot = self.agents.iter_mut().find(|(n, _)| n == name).unwrap();
        if let Some(mut old) = slot.1.replace(child) {
            assert!(
                old.try_wait().unwrap().is_some(),
                "{name}'s agent still runs"
            );
        }
    }

    fn data_dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name).join("data")
    }

    fn postmaster(&mut self, name: &str) -> i32 {
        let pid = postmaster_pid(&self.data_dir(name)).expect("the postmaster runs");
        self.postmasters_seen.push(pid);
        pid
    }

    fn agent(&mut self, name: &str) -> &mut Child {
        self.agents
            .iter_mut()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c.as_mut())
            .unwrap()
    }

    /// Runs a drill that must succeed; returns its JSON report.
    fn drill(&self, scenario: &str) -> Value {
        let out = self.haclt(&["drill", scenario, "--json", "--wait", "60s"]);
        assert_eq!(out.status.code(), Some(0), "haclt drill {scenario} failed");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `primary` leads with `standby` as its caught-up synchronous standby.
    fn wait_synchronous(&self, primary: &str, standby: &str) {
        self.wait_for(
            &format!("{primary} primary with {standby} as its synchronous standby"),
            Duration::from_secs(90),
            |s| {
                let g = &s["groups"][0];
                g["primary"] == primary
                    && g["synchronous"] == true
                    && g["pending"].is_null()
                    && node(s, primary)["state"] == "primary"
                    && node(s, standby)["state"] == "standby"
                    && node(s, standby)["postgres"]["role"] == "standby"
                    && node(s, standby)["postgres"]["lag_bytes"] == 0
            },
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.agents {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for m in &mut self.monitors {
            let _ = m.kill();
            let _ = m.wait();
        }
        let mut pids = self.postmasters_seen.clone();
        pids.extend(
            self.agents
                .iter()
                .filter_map(|(n, _)| postmaster_pid(&self.root.path().join(n).join("data"))),
        );
        stop_postmasters(&pids);
        if std::thread::panicking() {
            let mut logs: Vec<PathBuf> = (1..=self.monitors.len())
                .map(|id| self.root.path().join(format!("m{id}.log")))
                .collect();
            for (n, _) in &self.agents {
                logs.push(self.root.path().join(format!("{n}-agent.log")));
                logs.push(self.root.path().join(n).join("data.log"));
            }
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                eprintln!("===== {} =====\n{tail}", log.display());
            }
        }
    }
}

fn node<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == name))
        .unwrap_or(&Value::Null)
}

fn assert_no_loss(report: &Value, scenario: &str, old: &str, new: &str) {
    assert_eq!(report["scenario"], scenario);
    assert_eq!(report["converged"], true);
    assert_eq!(report["lost_writes"], 0, "no acknowledged write lost");
    assert_eq!(report["old_primary"], old);
    assert_eq!(report["new_primary"], new);
    assert_ne!(report["old_primary"], report["new_primary"]);
    assert!(
        report["acknowledged_writes"].as_u64().unwrap() > 20,
        "{report}"
    );
    assert!(
        report["write_unavailable_ms"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(report["new_epoch"].as_u64() > report["old_epoch"].as_u64());
    assert_eq!(
        report["ejabberd"],
        Value::Array(vec![]),
        "no ejabberd node here"
    );
}

#[test]
fn switchover_refusal_crash_freeze_and_partition_drills() {
    let mut cluster = Cluster::start(1);
    cluster.wait_for("the monitor leads", Duration::from_secs(20), |_| true);
    cluster.add_node("psql1", true);
    cluster.wait_for("psql1 bootstraps", Duration::from_secs(60), |s| {
        s["groups"][0]["primary"] == "psql1"
    });
    cluster.add_node("psql2", false);
    cluster.wait_synchronous("psql1", "psql2");

    let report = cluster.drill("switchover");
    assert_no_loss(&report, "switchover", "psql1", "psql2");
    println!("switchover: {report}");
    cluster.wait_synchronous("psql2", "psql1");

    // psql2's agent does not allow drills: the order is refused and nothing happens.
    let postmaster = cluster.postmaster("psql2");
    let out = cluster.haclt(&["drill", "crash-primary", "--json", "--wait", "20s"]);
    assert_eq!(out.status.code(), Some(65), "a refused drill exits 65");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused") && stderr.contains("allow_drills"),
        "{stderr}"
    );
    assert!(is_postgres(postmaster), "psql2's postmaster still runs");
    assert_eq!(postmaster_pid(&cluster.data_dir("psql2")), Some(postmaster));
    assert!(
        cluster.agent("psql2").try_wait().unwrap().is_none(),
        "psql2's agent still runs"
    );
    let s = cluster.status().unwrap();
    assert_eq!(s["groups"][0]["primary"], "psql2");
    assert_eq!(node(&s, "psql2")["healthy"], true);

    let report = cluster.drill("switchover");
    assert_no_loss(&report, "switchover", "psql2", "psql1");
    cluster.wait_synchronous("psql1", "psql2");

    let postmaster = cluster.postmaster("psql1");
    let report = cluster.drill("crash-primary");
    assert_no_loss(&report, "crash-primary", "psql1", "psql2");
    println!("crash-primary: {report}");
    let exit = cluster.agent("psql1").wait().unwrap();
    assert_eq!(
        exit.signal(),
        Some(9),
        "psql1's agent killed itself: {exit}"
    );
    assert!(!is_postgres(postmaster), "psql1's postmaster was killed");

    // The restarted agent brings psql1 back as a standby; then psql1 leads again.
    cluster.restart_agent("psql1");
    cluster.wait_synchronous("psql2", "psql1");
    let report = cluster.drill("switchover");
    assert_no_loss(&report, "switchover", "psql2", "psql1");
    cluster.wait_synchronous("psql1", "psql2");

    // A freeze shorter than the lease: PostgreSQL and the agent stop, then resume by
    // themselves; no failover, no write lost, the writes waited for the freeze.
    let postmaster = cluster.postmaster("psql1");
    let out = cluster.haclt(&["drill", "freeze-primary", "--json", "--duration", "1500ms"]);
    assert_eq!(out.status.code(), Some(0), "freeze drill failed");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("freeze-primary: {report}");
    assert_eq!(report["lost_writes"], 0);
    assert_eq!(report["converged"], true);
    assert_eq!(
        report["new_primary"], "psql1",
        "no failover for a short freeze"
    );
    assert!(
        report["write_unavailable_ms"].as_u64().unwrap() >= 1000,
        "{report}"
    );
    assert_eq!(postmaster_pid(&cluster.data_dir("psql1")), Some(postmaster));
    assert!(cluster.agent("psql1").try_wait().unwrap().is_none());

    // A partition longer than the lease (on loopback: psql1's PostgreSQL port, and its agent's
    // monitor traffic): psql2 is promoted, psql1 fences itself and returns as a standby after it.
    let out = cluster.haclt(&["drill", "partition-primary", "--json", "--duration", "6s"]);
    assert_eq!(out.status.code(), Some(0), "partition drill failed");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("partition-primary: {report}");
    assert_eq!(report["lost_writes"], 0);
    assert_eq!(report["converged"], true);
    assert_eq!(
        report["new_primary"], "psql2",
        "the cut-off primary was replaced"
    );
    cluster.wait_synchronous("psql2", "psql1");
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("ha_drill_psql1"),
        "the partition's table was removed after the drill"
    );
}

/// Three monitors and one primary: the monitor leader exits abruptly, another one leads, and
/// the primary keeps its role (a leader change is not a database failure).
#[test]
fn killing_the_monitor_leader_fails_nothing_over() {
    let mut cluster = Cluster::start(3);
    cluster.wait_for("a monitor leads", Duration::from_secs(30), |s| {
        s["monitors"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["leader"] == true))
    });
    cluster.add_node("solo1", false);
    cluster.wait_for("solo1 bootstraps", Duration::from_secs(60), |s| {
        s["groups"][0]["primary"] == "solo1" && node(s, "solo1")["state"] != "unknown"
    });
    let before = cluster.status().unwrap();
    let leader = before["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["leader"] == true)
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let report = cluster.drill("kill-monitor-leader");
    println!("kill-monitor-leader: {report}");
    assert_eq!(report["lost_writes"], 0);
    assert_eq!(
        (
            report["old_primary"].as_str(),
            report["new_primary"].as_str()
        ),
        (Some("solo1"), Some("solo1"))
    );
    assert_eq!(report["old_epoch"], report["new_epoch"], "no failover");
    let dead = cluster.monitors[usize::try_from(leader - 1).unwrap()]
        .wait()
        .unwrap();
    assert!(!dead.success(), "the old leader died abruptly: {dead}");
    let after = cluster.status().unwrap();
    let new_leader = after["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["leader"] == true)
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    assert_ne!(new_leader, leader);
}
