//! End-to-end test of the netns backend on the reference stand (`examples/xmpp-lab.toml`):
//! builds its networks as namespaces under a unique prefix, proves routing and the generated
//! firewall with real TCP connections between namespaces, proves `up` is idempotent and
//! resumes after a namespace is deleted by hand, and that `down` leaves no namespace,
//! `/etc/netns` entry, link or process behind.
//!
//! Needs root, iproute2, nftables and python3 (listeners and clients run as `python3 -c`
//! inside `ip netns exec`). Every address used exists only inside the namespaces this test
//! creates. The stand is torn down by a drop guard even when an assertion fails.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use ha_provision::netns::{self, Layout};
use ha_provision::state::{BackendKind, StateFile};
use ha_provision::topology::Topology;

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
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let prefix = format!("hpt{:x}", (std::process::id() ^ nanos) & 0xff_ffff);
        let tmp = tempfile::tempdir().unwrap();
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
