//! End-to-end tests of the netns backend on the reference stand (`examples/xmpp-lab.toml`).
//!
//! `example_stand_routes_filters_resumes_and_cleans_up` builds its networks only (library
//! `netns::up`) under a unique prefix, proves routing and the generated firewall with real TCP
//! connections between namespaces, proves `up` is idempotent and resumes after a namespace is
//! deleted by hand, and that `down` leaves no namespace, `/etc/netns` entry, link or process
//! behind.
//!
//! `full_stand_fails_over_and_cleans_up` runs the `ha-provision` binary: `up` starts every
//! process (3 monitors, 2 PostgreSQL agents, 2 clustered ejabberd nodes with their agents, one
//! supervisor per node) and returns once both ejabberd agents verified the primary; the test
//! waits for a synchronous primary/standby pair, checks PostgreSQL's reachability through the
//! gateway, the ejabberd cluster, then crashes the primary: its supervisor frozen (SIGSTOP),
//! its postmaster and agent killed with SIGKILL inside its namespace. The standby must be
//! promoted and both ejabberd agents must verify it, while four XMPP users (`ha-xmpp-load`, two
//! per frontend) keep their sessions and lose none of their acknowledged writes through
//! ejabberd; once the supervisor continues it restarts the agent, and the killed node must
//! come back as a standby. `down` must leave no namespace and none of the processes seen. Up and failover
//! times are printed.
//!
//! Needs root, iproute2, nftables, python3 (listeners and clients run as `python3 -c` inside
//! `ip netns exec`), PostgreSQL 15 and ejabberd. Every address used exists only inside the
//! namespaces these tests create. Stands are torn down by drop guards even when an assertion
//! fails.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ha_provision::lab::{Haclt, frontends_applied, node_status};
use ha_provision::material::Material;
use ha_provision::netns::{self, Layout};
use ha_provision::state::{BackendKind, StateFile};
use ha_provision::topology::Topology;
use ha_tests::stand::{Stopped, alive, namespace_pids_named, state_tempdir, unique_prefix};
use ha_tests::xmpp::LoadRun;

const LISTEN: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"#;

const CONNECT: &str = r#"
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()
    print("connected")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e)
"#;

/// The stand under test; `down` runs on drop if a state file is left.
struct Stand {
    topology: Topology,
    text: String,
    prefix: String,
    state_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Stand {
    fn new() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/xmpp-lab.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let topology = Topology::parse(&text).unwrap();
        let prefix = unique_prefix("hpt");
        let tmp = state_tempdir();
        let state_dir = tmp.path().join("state");
        Self {
            topology,
            text,
            prefix,
            state_dir,
            _tmp: tmp,
        }
    }

    fn up(&self) -> StateFile {
        let mut state = StateFile::open_for_up(
            &self.state_dir,
            &self.text,
            &self.topology,
            BackendKind::Netns,
            &self.prefix,
            None,
        )
        .unwrap();
        netns::up(&self.topology, &mut state).unwrap();
        state
    }

    fn ns(&self, node: &str) -> String {
        Layout::new(&self.topology, &self.prefix).namespace(node)
    }

    /// The fabric namespace, which holds the host's management address 192.168.121.1.
    fn host(&self) -> String {
        Layout::new(&self.topology, &self.prefix).fabric()
    }

    fn our_namespaces(&self) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Stand {
    fn drop(&mut self) {
        if let Ok(Some(state)) = StateFile::load(&self.state_dir)
            && let Err(e) = netns::down(state)
        {
            eprintln!("cleanup of stand {} failed: {e}", self.prefix);
        }
    }
}

/// A TCP listener inside a namespace; killed by PID on drop.
struct Listener {
    child: Child,
}

impl Listener {
    fn start(ns: &str, port: u16) -> Self {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "python3",
                "-c",
                LISTEN,
                &port.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        // Blocks until the socket is listening; EOF (python failed) fails the assertion.
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "listener on {ns}:{port} did not start"
        );
        Self { child }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects from `ns` to `addr:port`: "connected", "refused" (RST) or "timeout" (dropped).
fn connect(ns: &str, addr: &str, port: u16) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "python3",
            "-c",
            CONNECT,
            addr,
            &port.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn root_links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let mut links: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .collect();
    links.sort();
    links
}

#[test]
fn example_stand_routes_filters_resumes_and_cleans_up() {
    let links_before = root_links();
    let stand = Stand::new();
    let e1 = stand.ns("e1server");
    let psql1 = stand.ns("psql1server");
    let psql2 = stand.ns("psql2server");
    let mon1 = stand.ns("mon1server");

    // Up twice: the second run creates nothing new and records nothing twice.
    let first = stand.up().state().created.clone();
    let second = stand.up().state().created.clone();
    assert_eq!(first, second);
    assert_eq!(
        stand.our_namespaces().len(),
        stand.topology.nodes.len() + 1,
        "one namespace per node plus the fabric"
    );
    assert!(netns::namespace_exists(&stand.host()));
    let hosts = std::fs::read_to_string(format!("/etc/netns/{e1}/hosts")).unwrap();
    assert!(hosts.contains("192.168.1.10\tpsql1server.domain.local psql1server"));

    {
        let _pg = Listener::start(&psql1, 5432);
        let _ssh = Listener::start(&psql1, 22);
        // A frontend reaches PostgreSQL on the backend network through the gateway.
        assert_eq!(connect(&e1, "192.168.1.10", 5432), "connected");
        // ...and so does the PostgreSQL peer, and a monitor (health probe).
        assert_eq!(connect(&psql2, "192.168.1.10", 5432), "connected");
        assert_eq!(connect(&mon1, "192.168.1.10", 5432), "connected");
        // A DMZ node cannot reach a backend port it has no business with (SSH is for the
        // management network), although the listener is up:
        assert_eq!(connect(&e1, "192.168.1.10", 22), "timeout");
        assert_eq!(connect(&stand.host(), "192.168.121.14", 22), "connected");
        // PostgreSQL is not reachable from the management network, neither from the
        // operator host nor from a frontend's management interface.
        assert_eq!(connect(&stand.host(), "192.168.121.14", 5432), "timeout");
        assert_eq!(connect(&e1, "192.168.121.14", 5432), "timeout");
    }

    // Partial failure: a node's namespace vanishes; `up` rebuilds it and its links.
    let status = Command::new("ip")
        .args(["netns", "del", &psql1])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!netns::namespace_exists(&psql1));
    let resumed = stand.up().state().created.clone();
    assert_eq!(resumed, first);
    let stray = Listener::start(&psql1, 5432);
    assert_eq!(connect(&e1, "192.168.1.10", 5432), "connected");

    // Down ends the process left inside a namespace, then removes everything.
    let stray_pid = stray.pid();
    netns::down(StateFile::load(&stand.state_dir).unwrap().unwrap()).unwrap();
    let mut stray = stray;
    let exited = stray.child.try_wait().unwrap();
    assert!(
        exited.is_some(),
        "process {stray_pid} in {psql1} survived down"
    );
    assert!(
        stand.our_namespaces().is_empty(),
        "{:?}",
        stand.our_namespaces()
    );
    assert!(!netns::namespace_exists(&stand.host()));
    for node in &stand.topology.nodes {
        assert!(!Path::new(&format!("/etc/netns/{}", stand.ns(&node.name))).exists());
    }
    assert!(StateFile::load(&stand.state_dir).unwrap().is_none());
    // Other tests may add links to the root namespace meanwhile: check that none of ours
    // (fabric veth ends `v<n>-<i>`, bridges `br<k>`) ever appeared there.
    let ours = |l: &str| {
        let l = l.split('@').next().unwrap_or(l);
        let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
        l.strip_prefix("br").is_some_and(numeric)
            || l.strip_prefix('v')
                .and_then(|r| r.split_once('-'))
                .is_some_and(|(a, b)| numeric(a) && numeric(b))
    };
    let new: Vec<String> = root_links()
        .into_iter()
        .filter(|l| !links_before.contains(l) && ours(l))
        .collect();
    assert!(new.is_empty(), "links left in the root namespace: {new:?}");
}

/// The workspace binaries `up` starts, built on demand next to `ha-provision`.
fn build_daemons() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        // `--bins`: with `--bin ha-xmpp-load` cargo would build that one binary only and
        // leave the daemons as an earlier build made them.
        .args([
            "build",
            "--bins",
            "-p",
            "ha-monitor",
            "-p",
            "ha-agent",
            "-p",
            "haclt",
        ])
        .args(["-p", "ha-tests"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .status()
        .unwrap();
    assert!(status.success(), "building the daemons failed");
    let dir = Path::new(env!("CARGO_BIN_EXE_ha-provision"))
        .parent()
        .unwrap()
        .to_owned();
    for bin in ["ha-monitor", "ha-agent", "haclt", "ha-xmpp-load"] {
        assert!(
            dir.join(bin).is_file(),
            "{bin} missing in {}",
            dir.display()
        );
    }
    dir
}

/// A full stand run through the `ha-provision` binary; `down` runs on drop, and on failure
/// the tail of every process log is printed.
struct FullStand {
    inner: Stand,
}

impl FullStand {
    fn cli(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ha-provision"));
        cmd.arg("--state-dir").arg(&self.inner.state_dir);
        cmd
    }

    fn material(&self) -> Material<'_> {
        Material::new(&self.inner.topology, &self.inner.state_dir)
    }

    fn haclt(&self, bin_dir: &Path) -> Haclt {
        Haclt {
            binary: bin_dir.join("haclt"),
            fabric: Some(self.inner.host()),
            config: self.material().haclt_config(),
        }
    }

    fn down(&self) {
        let out = self.cli().arg("down").output().unwrap();
        assert!(
            out.status.success(),
            "down failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for FullStand {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.inner.topology.nodes {
                let dir = self.material().node_dir(&node.name);
                for log in [
                    "supervisor.log",
                    "ha-monitor.log",
                    "ha-agent.log",
                    "ejabberd.log",
                ] {
                    let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    if !lines.is_empty() {
                        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                        eprintln!("===== {} {log} =====\n{tail}", node.name);
                    }
                }
            }
        }
        if StateFile::load(&self.inner.state_dir)
            .ok()
            .flatten()
            .is_some()
        {
            let _ = self.cli().arg("down").status();
        }
    }
}

fn node_state<'a>(s: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    node_status(s, name).map(|n| &n["state"])
}

/// Primary + synchronous standby among `nodes`: returns (primary, standby).
fn pair(s: &serde_json::Value, nodes: &[&str]) -> Option<(String, String)> {
    let with = |state: &str| {
        nodes
            .iter()
            .find(|n| node_state(s, n).is_some_and(|v| v == state))
            .map(|n| (*n).to_owned())
    };
    let synchronous = s["groups"]
        .as_array()?
        .iter()
        .any(|g| g["synchronous"] == true);
    Some((with("primary")?, with("standby")?)).filter(|_| synchronous)
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

#[test]
fn full_stand_fails_over_and_cleans_up() {
    let bin_dir = build_daemons();
    let stand = FullStand {
        inner: Stand::new(),
    };
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/xmpp-lab.toml");

    let started = Instant::now();
    let out = stand
        .cli()
        .arg("up")
        .arg(&example)
        .arg("--prefix")
        .arg(&stand.inner.prefix)
        .output()
        .unwrap();
    let up_time = started.elapsed();
    assert!(
        out.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "up (every process started, psql1server primary, both frontends on it): {up_time:.2?}"
    );

    let out = stand.cli().args(["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "every daemon runs: {status}");
    let daemons_of = |status: &serde_json::Value, node: &str| -> Vec<(String, String)> {
        node_status(status, node).unwrap()["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().unwrap().to_owned(),
                    d["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let running = |names: &[&str]| -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| ((*n).to_owned(), "running".to_owned()))
            .collect()
    };
    assert_eq!(
        daemons_of(&status, "psql1server"),
        running(&["supervisor", "ha-agent", "postgres"])
    );
    assert_eq!(
        daemons_of(&status, "e1server"),
        running(&["supervisor", "epmd", "ejabberd", "ha-agent"])
    );
    let haclt_config = stand.material().haclt_config();
    assert_eq!(status["haclt_config"], haclt_config.to_str().unwrap());
    assert!(haclt_config.is_file());
    let supervised = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["supervisor_pid"].as_i64().is_some())
        .count();
    assert_eq!(supervised, 8, "every node, the gateway too: {status}");
    assert_eq!(
        daemons_of(&status, "gw1server"),
        running(&["supervisor", "haproxy"])
    );

    let haclt = stand.haclt(&bin_dir);
    let pg_nodes = ["psql1server", "psql2server"];
    let s = haclt
        .wait_for(
            "3 monitors, a leader, primary + sync standby",
            Duration::from_secs(120),
            |s| {
                let monitors = s["monitors"].as_array().map_or(0, Vec::len);
                let leader = s["monitors"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["leader"] == true));
                monitors == 3 && leader && pair(s, &pg_nodes).is_some()
            },
        )
        .unwrap();
    let (primary, standby) = pair(&s, &pg_nodes).unwrap();
    assert_eq!(primary, "psql1server", "the first postgres node bootstraps");
    let ready_time = started.elapsed();
    println!("primary {primary} + synchronous standby {standby}: {ready_time:.2?} after up began");

    // Replication runs over TLS with the standby's certificate (the lab has no password or
    // trust rule for it): the primary's walsender session says so.
    let on_primary = |sql: &str| -> String {
        let socket = stand.material().node_dir(&primary).join("pg");
        let out = Command::new("ip")
            .args(["netns", "exec", &stand.inner.ns(&primary)])
            .args(["runuser", "-u", "postgres", "--", "psql", "-h"])
            .arg(&socket)
            .args(["-p", "5432", "-d", "postgres", "-Atc", sql])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    let sessions = on_primary(
        "SELECT s.ssl, s.client_dn FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
    );
    assert_eq!(sessions, format!("t|/CN={standby}"), "replication session");

    // A second `up` changes nothing: the same supervisors keep running.
    let supervisors = || -> Vec<String> {
        stand
            .inner
            .topology
            .nodes
            .iter()
            .map(|n| {
                std::fs::read_to_string(stand.material().node_dir(&n.name).join("supervisor.pid"))
                    .unwrap_or_default()
            })
            .collect()
    };
    let before = supervisors();
    let again = Instant::now();
    let out = stand
        .cli()
        .arg("up")
        .arg(&example)
        .arg("--prefix")
        .arg(&stand.inner.prefix)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "second up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(supervisors(), before);
    println!("second up (nothing to do): {:.2?}", again.elapsed());

    // The firewall with the real servers: a frontend reaches the primary's PostgreSQL through
    // the gateway; the management network cannot.
    let e1 = stand.inner.ns("e1server");
    assert_eq!(connect(&e1, "192.168.1.10", 5432), "connected");
    assert_eq!(
        connect(&stand.inner.host(), "192.168.121.14", 5432),
        "timeout"
    );
    assert_eq!(connect(&e1, "192.168.121.14", 5432), "timeout");

    // Both ejabberd nodes in one Erlang cluster.
    let conf = stand.material().ejabberd_conf("e1server");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = stand
            .cli()
            .args([
                "exec", "e1server", "--", "runuser", "-u", "ejabberd", "--", "env",
            ])
            .arg(format!(
                "HOME={}",
                stand.material().ejabberd_home("e1server").display()
            ))
            .args(["/usr/sbin/ejabberdctl", "--config-dir"])
            .arg(&conf)
            .arg("list_cluster")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("ejabberd@e1server") && text.contains("ejabberd@e2server") {
            println!("ejabberd cluster: {}", text.trim().replace('\n', ", "));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ejabberd cluster not formed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // ejabberd's SQL pools (and its agent's probes) log in over TLS with the frontend's node
    // certificate; no password gets in, with or without TLS.
    // (e2server's ejabberd restarted when it joined the cluster: its pool may still be
    // connecting.)
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sessions = on_primary(
            "SELECT DISTINCT s.ssl || ' ' || s.client_dn FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'ejabberd' ORDER BY 1",
        );
        let both = "true /CN=e1server\ntrue /CN=e2server";
        if sessions == both {
            break;
        }
        assert!(
            sessions.lines().all(|l| both.lines().any(|b| b == l)) && Instant::now() < deadline,
            "ejabberd's sessions on the primary: {sessions}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for sslmode in ["disable", "require"] {
        let out = Command::new("ip")
            .args(["netns", "exec", &e1, "psql"])
            .arg(format!(
                "host=192.168.1.10 port=5432 user=ejabberd dbname=ejabberd sslmode={sslmode}"
            ))
            .args(["-Atc", "SELECT 1"])
            .env("PGPASSWORD", "guess")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a password login as ejabberd ({sslmode}): {err}"
        );
        assert!(
            err.contains("no pg_hba.conf entry") || err.contains("certificate"),
            "refused by the rules, not by chance ({sslmode}): {err}"
        );
    }
    // The cookie is in no process's command line (every local user can read those).
    let cookie = std::fs::read_to_string(stand.inner.state_dir.join("pki/erlang.cookie")).unwrap();
    let cookie = cookie.trim();
    assert!(cookie.len() >= 16, "a real cookie");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(cookie),
            "the Erlang cookie is on the command line of {:?}",
            entry.file_name()
        );
    }

    // The gateway's HAProxy forwards a session from a frontend to the primary (it checks the
    // agents' /primary endpoint with its observer certificate); the writer's rule for the
    // gateway's address admits the operator certificate.
    let pki = stand.inner.state_dir.join("pki");
    let through_proxy = || -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &e1, "psql"])
            .arg(format!(
                "host=192.168.1.1 port=5000 user=postgres dbname=postgres sslmode=require \
                 sslcert={cert} sslkey={key} connect_timeout=2",
                cert = pki.join("operator.pem").display(),
                key = pki.join("operator.key").display(),
            ))
            .args(["-XAtc", "SELECT inet_server_addr()"])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    // Polls until a session through HAProxy lands on `node` (30 s at most).
    let proxy_leads_to = |node: &str| {
        let want = stand
            .material()
            .advertise_address(stand.inner.topology.node(node).unwrap())
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = through_proxy();
            if seen == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy does not lead to {node} ({want}): {seen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    proxy_leads_to(&primary);

    // XMPP users on both frontends keep writing through ejabberd across the crash.
    let mut exec = stand.cli();
    exec.args(["exec", "e1server", "--"])
        .arg(bin_dir.join("ha-xmpp-load"));
    let load = LoadRun::start(exec, &stand.material().xmpp_load_password_file());

    // Crash the primary as a machine crash would: its supervisor is frozen first (a crashed
    // machine restarts nothing; left running, it restarts the agent within a second, which
    // restarts PostgreSQL before the monitors even see the node unhealthy), then its agent
    // and postmaster are killed with SIGKILL inside its namespace. The supervisor resumes
    // after the promotion, like the machine booting again.
    let primary_ns = stand.inner.ns(&primary);
    let supervisor: i32 =
        std::fs::read_to_string(stand.material().node_dir(&primary).join("supervisor.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let frozen = Stopped::new(vec![supervisor]);
    let agents = namespace_pids_named(&primary_ns, "ha-agent");
    assert_eq!(agents.len(), 1, "one agent in {primary_ns}: {agents:?}");
    let postmaster = ha_tests::postmaster_pid(&stand.material().pg_data(&primary))
        .expect("the primary's postmaster runs");
    let mut seen = vec![agents[0], postmaster];
    let killed = Instant::now();
    for pid in [agents[0], postmaster] {
        signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
    haclt
        .wait_for(
            &format!("{standby} promoted"),
            Duration::from_secs(60),
            |s| node_state(s, &standby).is_some_and(|v| v == "primary"),
        )
        .unwrap();
    let failover = killed.elapsed();
    println!("failover: {standby} primary {failover:.2?} after SIGKILL of {primary}");
    // HAProxy follows by its checks alone: the promoted node answers 200 on /primary.
    proxy_leads_to(&standby);
    println!(
        "HAProxy on the gateway leads to {standby} {:.2?} after the kill",
        killed.elapsed()
    );
    // `ha-provision status` tells what died although the frozen supervisor cannot record it.
    let out = stand.cli().args(["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert_eq!(out.status.code(), Some(3), "a node does not run: {text}");
    let out = stand.cli().args(["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        daemons_of(&status, &primary),
        [
            ("supervisor", "frozen"),
            ("ha-agent", "down"),
            ("postgres", "down")
        ]
        .map(|(n, s)| (n.to_owned(), s.to_owned()))
    );
    assert_eq!(node_status(&status, &primary).unwrap()["running"], false);
    assert_eq!(node_status(&status, &standby).unwrap()["running"], true);
    // Both frontends follow: their agents verified a write through ejabberd on the new
    // primary at the new epoch.
    let frontends = ["e1server", "e2server"];
    let s = haclt
        .wait_for(
            "both ejabberd agents on the new primary",
            Duration::from_secs(60),
            |s| frontends_applied(s, &frontends),
        )
        .unwrap();
    assert_eq!(node_state(&s, &standby).unwrap(), "primary");
    println!(
        "ejabberd frontends verified {standby} {:.2?} after the kill",
        killed.elapsed()
    );
    let xmpp = load.finish();
    println!(
        "XMPP load across the crash: {} acknowledged writes through ejabberd, {} failed attempts, longest gap {} ms, {} lost, {}/4 sessions kept",
        xmpp["acknowledged_writes"],
        xmpp["failed_writes"],
        xmpp["longest_gap_ms"],
        xmpp["lost_writes"],
        xmpp["sessions_kept"]
    );
    assert_eq!(xmpp["lost_writes"], 0, "{xmpp}");
    assert_eq!(xmpp["unread_writes"], 0, "{xmpp}");
    assert_eq!(xmpp["sessions_kept"], 4, "{xmpp}");
    assert!(
        xmpp["users"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["wrote_at_end"] == true),
        "every user writes through ejabberd after the failover: {xmpp}"
    );
    drop(frozen);
    haclt
        .wait_for(
            &format!("{primary} back as a synchronous standby"),
            Duration::from_secs(180),
            |s| pair(s, &pg_nodes) == Some((standby.clone(), primary.clone())),
        )
        .unwrap();
    println!(
        "{primary} rejoined as standby {:.2?} after the kill",
        killed.elapsed()
    );
    let restarted = namespace_pids_named(&primary_ns, "ha-agent");
    assert_eq!(restarted.len(), 1, "the supervisor restarted the agent");
    assert_ne!(restarted[0], agents[0]);
    seen.extend(restarted);
    for node in &stand.inner.topology.nodes {
        let pid: Option<i32> =
            std::fs::read_to_string(stand.material().node_dir(&node.name).join("supervisor.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok());
        seen.extend(pid);
    }
    seen.extend(namespace_pids_named(
        &stand.inner.ns("e1server"),
        "beam.smp",
    ));
    seen.extend(namespace_pids_named(
        &stand.inner.ns("e2server"),
        "ha-agent",
    ));
    seen.extend(namespace_pids_named(
        &stand.inner.ns("mon1server"),
        "ha-monitor",
    ));

    let t = Instant::now();
    stand.down();
    println!("down: {:.2?}", t.elapsed());
    assert!(
        stand.inner.our_namespaces().is_empty(),
        "{:?}",
        stand.inner.our_namespaces()
    );
    let survivors: Vec<i32> = seen.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        survivors.is_empty(),
        "processes survived down: {survivors:?}"
    );
    assert!(!stand.material().nodes_dir().exists());
    assert!(!haclt_config.exists());
    assert!(StateFile::load(&stand.inner.state_dir).unwrap().is_none());
}
