//! The reference lab stand (`examples/xmpp-lab.toml`) on network namespaces, built by the real
//! `ha-provision` from the workspace's binaries, for the tests that fault it (`chaos`,
//! `liveness`): a [`Stand`] taken down on drop, faults that cut nodes off with nftables inside
//! their namespaces ([`cut`], [`partition`]), and the convergence check run after a fault
//! ([`wait_converged`]).
//!
//! Needs root, iproute2, nftables, PostgreSQL 15 and ejabberd; every address exists only inside
//! the namespaces the stand creates, which `down` removes even when the test fails.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ha_provision::lab::{Haclt, frontends_applied, one_erlang_cluster};
use ha_provision::material::Material;
use ha_provision::netns::Layout;
use ha_provision::topology::Topology;
use tokio::time::Instant;

use crate::cluster::PgAddr;
use crate::stand::{namespace_pids_named, state_tempdir, unique_prefix};
use crate::writer::{TABLES, Watch, Writer};

/// The ejabberd frontends of the reference stand.
pub const FRONTENDS: [&str; 2] = ["e1server", "e2server"];
/// The PostgreSQL nodes of the reference stand.
pub const POSTGRES: [&str; 2] = ["psql1server", "psql2server"];
/// The monitors of the reference stand.
pub const MONITORS: [&str; 3] = ["mon1server", "mon2server", "mon3server"];

/// Bound for the stand to converge after a fault is undone ([`wait_converged`]).
pub const CONVERGE: Duration = Duration::from_secs(120);

/// How often [`Stand::wait_status`] asks for the status.
const POLL: Duration = Duration::from_millis(100);

/// The stand under test, taken down on drop (also when the test fails).
#[derive(Debug)]
pub struct Stand {
    pub topology: Topology,
    /// The namespace prefix, unique to this stand.
    pub prefix: String,
    /// `ha-provision --state-dir`: the material and every node's files.
    pub state_dir: PathBuf,
    /// Where `ha-provision`, `haclt` and the other binaries are ([`build`]).
    pub bin_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Stand {
    /// Brings the stand up with the binaries in `bin_dir`; `daemons` may change how `up` runs
    /// (where the daemons come from, their environment). Blocks: call it off the async workers.
    pub fn up(bin_dir: PathBuf, daemons: impl FnOnce(&mut Command)) -> Self {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/xmpp-lab.toml");
        let text = std::fs::read_to_string(&example).expect("reading the reference stand");
        let topology = Topology::parse(&text).expect("the reference stand parses");
        let prefix = unique_prefix("hcx");
        let tmp = state_tempdir();
        let stand = Self {
            topology,
            prefix,
            state_dir: tmp.path().join("state"),
            bin_dir,
            _tmp: tmp,
        };
        let mut up = stand.cli();
        up.arg("up")
            .arg(&example)
            .arg("--prefix")
            .arg(&stand.prefix);
        daemons(&mut up);
        let out = up.output().expect("running ha-provision up");
        assert!(
            out.status.success(),
            "up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stand
    }

    /// `ha-provision --state-dir S`, to add a command to.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("ha-provision"));
        cmd.arg("--state-dir").arg(&self.state_dir);
        cmd
    }

    /// Where the stand's files are.
    pub fn material(&self) -> Material<'_> {
        Material::new(&self.topology, &self.state_dir)
    }

    /// The network namespace of `node`.
    pub fn ns(&self, node: &str) -> String {
        Layout::new(&self.topology, &self.prefix).namespace(node)
    }

    /// `haclt` in the fabric namespace with the operator config.
    pub fn haclt(&self) -> Haclt {
        Haclt {
            binary: self.bin_dir.join("haclt"),
            fabric: Some(Layout::new(&self.topology, &self.prefix).fabric()),
            config: self.material().haclt_config(),
        }
    }

    /// Runs `haclt ARGS` (blocking, off the async workers) and returns its exit code (`None`
    /// when killed by a signal) and stdout, whatever the code.
    pub fn haclt_exit(&self, args: &[&str]) -> Result<(Option<i32>, String), String> {
        let h = self.haclt();
        let fabric = Layout::new(&self.topology, &self.prefix).fabric();
        let out = tokio::task::block_in_place(|| {
            Command::new("ip")
                .args(["netns", "exec", &fabric])
                .arg(&h.binary)
                .arg("--config")
                .arg(&h.config)
                .args(args)
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .output()
        })
        .map_err(|e| format!("running haclt: {e}"))?;
        if out.stdout.is_empty() && !out.status.success() {
            return Err(format!(
                "haclt {}: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// `haclt status --json`, whatever its exit code says of the cluster's health (a degraded
    /// cluster still prints its status).
    pub fn status(&self) -> Result<serde_json::Value, String> {
        let (_, out) = self.haclt_exit(&["status", "--json"])?;
        serde_json::from_str(&out).map_err(|e| format!("haclt status --json: {e}: {out}"))
    }

    /// Polls [`Stand::status`] until `ok` holds; returns that status and how long it took, or
    /// after `timeout` what did not hold with the last answer.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(serde_json::Value, Duration), String> {
        let started = Instant::now();
        loop {
            let last = match self.status() {
                Ok(s) if ok(&s) => return Ok((s, started.elapsed())),
                Ok(s) => s.to_string(),
                Err(e) => e,
            };
            if started.elapsed() >= timeout {
                return Err(format!(
                    "{what}: not within {timeout:?}; last status: {last}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `haclt events --json` after sequence number `after`, one JSON object per event.
    pub fn events(&self, after: u64) -> Result<Vec<serde_json::Value>, String> {
        let (code, out) = self.haclt_exit(&["events", "--json", "--after", &after.to_string()])?;
        if code != Some(0) {
            return Err(format!("haclt events exited with {code:?}"));
        }
        out.lines()
            .map(|l| serde_json::from_str(l).map_err(|e| format!("an event line: {e}: {l}")))
            .collect()
    }

    /// The events as `haclt events` prints them, or why they could not be read.
    pub fn events_text(&self) -> String {
        self.haclt()
            .run(&["events"])
            .unwrap_or_else(|e| format!("(haclt events failed: {e})"))
    }

    /// Prints (stderr) the last 40 lines of every node's agent, monitor, PostgreSQL, ejabberd
    /// and supervisor log: the stand and its logs are removed when a failing test unwinds.
    pub fn print_log_tails(&self) {
        for node in POSTGRES.iter().chain(&FRONTENDS).chain(&MONITORS) {
            let dir = self.material().node_dir(node);
            for log in [
                "ha-agent.log",
                "ha-monitor.log",
                "pg/postgresql.log",
                "ejabberd.log",
                "supervisor.log",
            ] {
                let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                    eprintln!("===== {node} {log} =====\n{tail}");
                }
            }
        }
    }

    /// How to reach `node`'s PostgreSQL as `postgres` over its Unix socket.
    pub fn pg(&self, node: &str) -> PgAddr {
        PgAddr {
            name: node.to_owned(),
            socket_dir: self.material().node_dir(node).join("pg"),
            port: self.topology.ports.postgres,
        }
    }

    /// The live processes in `node`'s namespace whose command name is `comm`.
    pub fn pids_named(&self, node: &str, comm: &str) -> Vec<i32> {
        namespace_pids_named(&self.ns(node), comm)
    }

    /// `nft -f -` inside `node`'s namespace.
    pub fn nft(&self, node: &str, script: &str) -> Result<(), String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(node), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(script.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// Creates the writer's tables on the primary, then starts a [`Writer`] committing one row
    /// at a time through whichever PostgreSQL node is primary (Unix sockets, which the
    /// partitions do not cut).
    pub async fn start_writer(&self) -> Writer {
        let s = self.status().expect("the status before the writer starts");
        let first = primary(&s).expect("a primary before the writer starts");
        let client = self
            .pg(&first)
            .connect(Duration::from_secs(5))
            .await
            .expect("a session on the primary");
        client
            .batch_execute(TABLES)
            .await
            .expect("creating the writer's tables");
        drop(client);
        Writer::start(self.pg_nodes())
    }

    /// Every PostgreSQL node.
    pub fn pg_nodes(&self) -> Vec<PgAddr> {
        POSTGRES.iter().map(|n| self.pg(n)).collect()
    }
}

impl Drop for Stand {
    fn drop(&mut self) {
        let _ = self.cli().arg("down").status();
    }
}

/// The group's primary in a status.
pub fn primary(s: &serde_json::Value) -> Option<String> {
    s["groups"][0]["primary"].as_str().map(str::to_owned)
}

/// The group's epoch in a status.
pub fn epoch(s: &serde_json::Value) -> Option<u64> {
    s["groups"][0]["epoch"].as_u64()
}

/// Which way a partition cuts.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Both,
    Inbound,
    Outbound,
}

/// A partition table inside a node's namespace, deleted on drop.
#[derive(Debug)]
pub struct Partitioned<'a> {
    stand: &'a Stand,
    node: String,
}

impl Drop for Partitioned<'_> {
    fn drop(&mut self) {
        let _ = self.stand.nft(&self.node, "delete table inet ha_chaos\n");
    }
}

/// Cuts `node` off in `direction` until the returned guard drops: from everything but
/// loopback, or only from `peer`'s addresses (a single link: the rest of the stand still
/// reaches both).
pub fn cut<'a>(
    stand: &'a Stand,
    node: &str,
    direction: Direction,
    peer: Option<&str>,
) -> Result<Partitioned<'a>, String> {
    let peer_set = match peer {
        None => None,
        Some(p) => {
            let n = stand.topology.node(p).ok_or(format!("no node {p}"))?;
            let list: Vec<String> = n.addresses.values().map(ToString::to_string).collect();
            Some(list.join(", "))
        }
    };
    let rule = |hook: &str, iface: &str, addr: &str| {
        let only = peer_set
            .as_ref()
            .map_or_else(String::new, |set| format!(" ip {addr} {{ {set} }}"));
        format!(
            "  chain {hook} {{ type filter hook {hook} priority -50; policy accept; {iface} != \"lo\"{only} drop; }}\n"
        )
    };
    let mut script = String::from("table inet ha_chaos {\n");
    if matches!(direction, Direction::Both | Direction::Inbound) {
        script.push_str(&rule("input", "iifname", "saddr"));
    }
    if matches!(direction, Direction::Both | Direction::Outbound) {
        script.push_str(&rule("output", "oifname", "daddr"));
    }
    script.push_str("}\n");
    stand.nft(node, &script)?;
    Ok(Partitioned {
        stand,
        node: node.to_owned(),
    })
}

/// [`cut`] held for `hold`, then undone. Returns what was done, for a fault log (nothing).
pub async fn partition(
    stand: &Stand,
    node: &str,
    direction: Direction,
    peer: Option<&str>,
    hold: Duration,
) -> Result<String, String> {
    let cut = cut(stand, node, direction, peer)?;
    tokio::time::sleep(hold).await;
    drop(cut);
    Ok(String::new())
}

/// Healthy since `since`: every node reported after it (a status from before the fault was
/// noticed would look healthy), every monitor reachable, a primary with a synchronous standby
/// (unless `sync` is false), every node healthy, both frontends on the primary at the current
/// epoch, running ejabberd in one Erlang cluster.
pub fn converged(s: &serde_json::Value, since: std::time::Instant, sync: bool) -> bool {
    let fresh = |n: &serde_json::Value| {
        n["last_report_age_ms"]
            .as_u64()
            .is_some_and(|age| u128::from(age) < since.elapsed().as_millis())
    };
    let monitors = s["monitors"].as_array().map_or(&[][..], Vec::as_slice);
    let group = &s["groups"][0];
    let nodes = s["nodes"].as_array().map_or(&[][..], Vec::as_slice);
    let standby_ok = POSTGRES.iter().any(|n| {
        nodes
            .iter()
            .any(|x| x["name"] == *n && x["state"] == "standby" && x["healthy"] == true)
    });
    (group["synchronous"] == true || !sync)
        && standby_ok
        && nodes.len() == POSTGRES.len() + FRONTENDS.len()
        && nodes.iter().all(|n| n["healthy"] == true && fresh(n))
        && monitors.len() == MONITORS.len()
        && monitors.iter().all(|m| m["reachable"] == true)
        && frontends_applied(s, &FRONTENDS)
        && one_erlang_cluster(s, &FRONTENDS)
}

/// Waits up to [`CONVERGE`] from now for [`converged`] (fresh reports counted from now) and
/// for the primary to stream to a standby (its `pg_stat_replication`: the monitors' view of a
/// standby can be healthy while its WAL receiver waits to reconnect, 5 s after the primary's
/// postmaster restarted). Returns the last status.
pub async fn wait_converged(stand: &Stand, sync: bool) -> Result<serde_json::Value, String> {
    let since = std::time::Instant::now();
    let deadline = Instant::now() + CONVERGE;
    let haclt = stand.haclt();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = tokio::task::block_in_place(|| {
            haclt.wait_for("converged after the fault", left, |s| {
                converged(s, since, sync)
            })
        })
        .map_err(|e| e.to_string())?;
        let p = primary(&s).ok_or("no primary in the status")?;
        if streams(&stand.pg(&p)).await {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{p} streams to no standby {CONVERGE:?} after the fault"
            ));
        }
        tokio::time::sleep(Watch::EVERY).await;
    }
}

/// Whether `primary` streams WAL to at least one standby now.
pub async fn streams(primary: &PgAddr) -> bool {
    let Ok(client) = primary.connect(Duration::from_secs(1)).await else {
        return false;
    };
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .await
        .is_ok_and(|row| row.get::<_, i64>(0) > 0)
}

/// `cargo build` in the workspace with `args`.
pub fn cargo_build(args: &[&str]) {
    let status = Command::new(env!("CARGO"))
        .arg("build")
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// Builds every binary the stand and the load run, and returns their directory (the one that
/// holds the running test's `deps`). Blocks: call it off the async workers.
pub fn build() -> PathBuf {
    let mut args = vec!["--bins"];
    for package in [
        "ha-provision",
        "ha-monitor",
        "ha-agent",
        "haclt",
        "ha-tests",
    ] {
        args.extend(["-p", package]);
    }
    cargo_build(&args);
    // target/debug/deps/<test>-<hash> -> target/debug
    let dir = std::env::current_exe()
        .expect("the test's executable")
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .to_owned();
    assert!(dir.join("ha-provision").is_file(), "{}", dir.display());
    dir
}

/// The monitor node whose id the status shows as leader.
pub fn leader_node(stand: &Stand, s: &serde_json::Value) -> Option<String> {
    let id = s["monitors"]
        .as_array()?
        .iter()
        .find(|m| m["leader"] == true)?["id"]
        .as_u64()?;
    MONITORS
        .iter()
        .find(|m| stand.material().monitor_id(m) == Some(id))
        .map(|m| (*m).to_owned())
}
