//! Fault injection for drills (`haclt drill`): the agent executes a [`v1::DrillOrder`] the
//! monitor delivers with its goal, on its own node only.
//!
//! Invariants:
//! - nothing is injected unless the config says `allow_drills = true` (off by default); a
//!   refused, expired or duplicate order injects nothing and is logged once;
//! - an order is executed at most once per agent process (dedupe by id) and never after its
//!   `not_after` time (a late delivery must not inject a stale fault); the monitor hands each
//!   order out once, so a restarted agent does not see it again either;
//! - every timed fault has its undo armed before the fault itself, outside this process: a
//!   detached `sh -c 'sleep N; kill -CONT ...'` for a freeze, element timeouts in the kernel's
//!   nftables sets for a partition. Whatever happens to the agent or to the operator's `haclt`,
//!   the fault ends after its duration;
//! - a refusal or a failed injection is reported in the node's `last_error` until the order
//!   expires, so the operator's `haclt drill` sees it.
//!
//! Faults:
//! - crash: SIGKILL of the postmaster, then SIGKILL of the agent itself (what a machine crash
//!   looks like to the cluster: no shutdown path runs); whatever supervises the agent restarts it;
//! - freeze: SIGSTOP of the postmaster, of its children (each backend is a process of its own:
//!   stopping only the postmaster would leave open sessions committing), and of the agent itself,
//!   then SIGCONT to all of them at the undo time;
//! - partition: drop all traffic between this node and its monitors and replication peers (the
//!   hosts of `monitors`, the addresses of the `replication` rules in `postgres.hba`, and the
//!   upstream of a standby) in a table the agent owns, `inet ha_drill_<node>`. On loopback (tests,
//!   one host for every node) dropping by address would cut every node and the monitors from each
//!   other, so for loopback peers the cut is by port instead: every packet to or from this node's
//!   PostgreSQL port (replication, monitor probes and clients alike), while the agent, when a
//!   monitor is on loopback, cuts itself off from the monitors for the duration (no report sent,
//!   no pushed goal taken). A detached helper
//!   deletes the emptied table one second after the end; a second partition of the same node
//!   started before that would be lifted early by it (drills run one at a time).

use std::collections::VecDeque;
use std::net::{IpAddr, ToSocketAddrs};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ha_proto::{NodeId, v1};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::{AgentConfig, RoleConfig};

/// How many recent order ids are remembered for deduplication.
const REMEMBERED: usize = 32;
/// How long a refusal stays visible at least, when the order's own expiry is sooner.
const MIN_NOTICE_MS: u64 = 2_000;

/// Why a fault could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("PostgreSQL is not running: nothing to {0}")]
    NoPostmaster(&'static str),
    #[error("cannot signal process {pid}: {source}")]
    Signal { pid: i32, source: nix::Error },
    #[error("cannot start the undo helper: {0}")]
    Undo(std::io::Error),
    #[error("nft: {0}")]
    Nft(String),
    #[error("{0}")]
    Address(String),
}

/// A fault this agent can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Crash,
    Freeze(Duration),
    Partition(Duration),
}

/// What [`Drills::admit`] decided about one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Inject(Fault),
    /// Already seen by this process.
    Duplicate,
    /// Delivered after its `not_after` time.
    Expired {
        late_ms: u64,
    },
    Refused(String),
}

/// The addresses a partition cuts: hosts (IPv4/IPv6 with prefix) and local ports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cut {
    pub hosts4: Vec<String>,
    pub hosts6: Vec<String>,
    pub ports: Vec<u16>,
    /// The agent must cut itself off from the monitors (no report sent, no pushed goal taken):
    /// a monitor shares the loopback with this node, where no rule can single its traffic out.
    pub cut_monitors_in_agent: bool,
}

/// A message shown in `last_error` until `until_unix_ms`.
#[derive(Debug, Clone)]
struct Notice {
    text: String,
    until_unix_ms: u64,
}

/// The agent's drill state: what it was ordered, what it did, what the monitor should see.
#[derive(Debug)]
pub struct Drills {
    node: NodeId,
    allowed: bool,
    /// `host:port` of every monitor.
    monitors: Vec<String>,
    /// Addresses (CIDR) of the replication peers from the config: the `replication` hba rules and,
    /// with TLS (where no such rule is written by hand), the `postgres.peers` list.
    peers: Vec<String>,
    /// The local PostgreSQL port (postgres nodes).
    pg_port: Option<u16>,
    seen: VecDeque<String>,
    status: Option<v1::DrillStatus>,
    notice: Option<Notice>,
    cut_off_until: Option<Instant>,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Drills {
    pub fn from_config(cfg: &AgentConfig) -> Self {
        let (peers, pg_port) = match &cfg.role {
            RoleConfig::Postgres(role) => (
                role.pg
                    .hba
                    .iter()
                    .filter(|r| r.database == "replication")
                    .filter_map(|r| r.address.clone())
                    .chain(role.pg.peers.iter().map(|p| p.address.to_string()))
                    .collect(),
                Some(role.pg.port),
            ),
            // ejabberd nodes take no drill orders (`run::ejabberd` ignores them).
            RoleConfig::Ejabberd(_) => (Vec::new(), None),
        };
        Self {
            node: cfg.node.clone(),
            allowed: cfg.allow_drills,
            monitors: cfg.monitors.clone(),
            peers,
            pg_port,
            seen: VecDeque::new(),
            status: None,
            notice: None,
            cut_off_until: None,
        }
    }

    /// Decides what to do with `order` and remembers its id (pure: no fault is injected).
    pub fn admit(&mut self, order: &v1::DrillOrder, now_unix_ms: u64) -> Verdict {
        if self.seen.contains(&order.id) {
            return Verdict::Duplicate;
        }
        if self.seen.len() == REMEMBERED {
            self.seen.pop_front();
        }
        self.seen.push_back(order.id.clone());
        if now_unix_ms > order.not_after_unix_ms {
            return Verdict::Expired {
                late_ms: now_unix_ms - order.not_after_unix_ms,
            };
        }
        if !self.allowed {
            return Verdict::Refused("allow_drills is false in this agent's configuration".into());
        }
        let duration = Duration::from_millis(order.duration_ms);
        match v1::Fault::try_from(order.fault) {
            Ok(v1::Fault::Crash) => Verdict::Inject(Fault::Crash),
            Ok(v1::Fault::Freeze) if order.duration_ms > 0 => {
                Verdict::Inject(Fault::Freeze(duration))
            }
            Ok(v1::Fault::Partition) if order.duration_ms > 0 => {
                Verdict::Inject(Fault::Partition(duration))
            }
            Ok(f @ (v1::Fault::Freeze | v1::Fault::Partition)) => {
                Verdict::Refused(format!("{} needs a duration", f.as_str_name()))
            }
            Ok(f) => Verdict::Refused(format!(
                "{} is not a fault an agent injects",
                f.as_str_name()
            )),
            Err(_) => Verdict::Refused(format!("unknown fault {}", order.fault)),
        }
    }

    /// Handles an order delivered with the goal: admits it, injects the fault, logs and
    /// remembers the outcome. A crash does not return.
    pub fn on_order(
        &mut self,
        order: &v1::DrillOrder,
        postmaster: Option<i32>,
        upstream: Option<&str>,
    ) {
        let now = unix_ms();
        let id = order.id.as_str();
        let fault = match self.admit(order, now) {
            Verdict::Duplicate => return,
            Verdict::Expired { late_ms } => {
                warn!(node = %self.node, drill = id, late_ms, "drill order ignored: it arrived after its deadline");
                return;
            }
            Verdict::Refused(why) => {
                warn!(node = %self.node, drill = id, reason = %why, "drill order refused");
                self.notify(order, format!("drill {id} refused: {why}"), now);
                self.status = Some(v1::DrillStatus {
                    id: id.to_owned(),
                    active: false,
                    undo_at_unix_ms: 0,
                });
                return;
            }
            Verdict::Inject(f) => f,
        };
        info!(node = %self.node, drill = id, fault = ?fault, "drill: injecting the fault");
        let result = match fault {
            Fault::Crash => Err(crash(postmaster)),
            Fault::Freeze(d) => postmaster
                .ok_or(DrillError::NoPostmaster("freeze"))
                .and_then(|pm| freeze(pm, d)),
            Fault::Partition(d) => self.partition(upstream, d),
        };
        match result {
            Ok(duration) => {
                let undo_at =
                    now.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
                info!(node = %self.node, drill = id, undo_at_unix_ms = undo_at, "drill: fault injected; its undo is armed");
                self.status = Some(v1::DrillStatus {
                    id: id.to_owned(),
                    active: true,
                    undo_at_unix_ms: undo_at,
                });
            }
            Err(e) => {
                error!(node = %self.node, drill = id, error = %e, "drill: the fault could not be injected");
                self.notify(order, format!("drill {id} failed: {e}"), now);
            }
        }
    }

    fn notify(&mut self, order: &v1::DrillOrder, text: String, now_unix_ms: u64) {
        self.notice = Some(Notice {
            text,
            until_unix_ms: order
                .not_after_unix_ms
                .max(now_unix_ms.saturating_add(MIN_NOTICE_MS)),
        });
    }

    /// The drill part of the next report.
    pub fn status(&self, now_unix_ms: u64) -> Option<v1::DrillStatus> {
        self.status.clone().map(|mut s| {
            s.active = s.active && now_unix_ms < s.undo_at_unix_ms;
            s
        })
    }

    /// A refusal or failure the operator must see, while it is recent.
    pub fn notice(&self, now_unix_ms: u64) -> Option<&str> {
        self.notice
            .as_ref()
            .filter(|n| now_unix_ms <= n.until_unix_ms)
            .map(|n| n.text.as_str())
    }

    /// Whether a loopback partition cuts the agent off from the monitors now: it sends no
    /// report and ignores pushed goals, as if their packets were dropped.
    pub fn monitors_cut_off(&self, now: Instant) -> bool {
        self.cut_off_until.is_some_and(|t| now < t)
    }

    fn table(&self) -> String {
        table_name(&self.node)
    }

    /// Cuts this node off for `duration`; the kernel undoes it (set element timeouts).
    fn partition(
        &mut self,
        upstream: Option<&str>,
        duration: Duration,
    ) -> Result<Duration, DrillError> {
        let mut monitors = Vec::new();
        for m in &self.monitors {
            monitors.extend(resolve(m)?);
        }
        let mut peers = Vec::new();
        for p in self.peers.iter().map(String::as_str).chain(upstream) {
            peers.push(cidr(p)?);
        }
        let cut = plan_cut(&monitors, &peers, self.pg_port);
        let table = self.table();
        run_nft(&nft_script(&table, &cut, duration))?;
        // The kernel already removes the elements; the helper only tidies the empty table.
        let slack = Duration::from_secs(1);
        arm_undo(duration + slack, &format!("nft delete table inet {table}"))?;
        if cut.cut_monitors_in_agent {
            self.cut_off_until = Some(Instant::now() + duration);
        }
        info!(node = %self.node, %table, hosts4 = ?cut.hosts4, hosts6 = ?cut.hosts6, ports = ?cut.ports,
              cut_monitors_in_agent = cut.cut_monitors_in_agent, "drill: partition rules installed");
        Ok(duration)
    }
}

/// The nftables table of a node's partition drill (names are `[a-z0-9._-]`).
pub fn table_name(node: &NodeId) -> String {
    let safe: String = node
        .as_str()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("ha_drill_{safe}")
}

/// The IP addresses of a monitor's `host:port`.
fn resolve(address: &str) -> Result<Vec<IpAddr>, DrillError> {
    let bad = |why: String| DrillError::Address(format!("monitor {address}: {why}"));
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| bad("not host:port".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let port: u16 = port.parse().map_err(|_| bad("bad port".into()))?;
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?;
    Ok(addrs.map(|a| a.ip()).collect())
}

/// An address with its prefix length (`10.0.0.11/32`, `fd00::/64`, or a bare address).
fn cidr(text: &str) -> Result<(IpAddr, u8), DrillError> {
    let bad = || DrillError::Address(format!("{text:?} is not an address or CIDR"));
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (text, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        None => max,
    };
    Ok((ip, prefix))
}

/// What a partition drops. Loopback addresses are never cut by address (that would cut every
/// process on the host); their presence makes the cut go by this node's PostgreSQL port.
pub fn plan_cut(monitors: &[IpAddr], peers: &[(IpAddr, u8)], pg_port: Option<u16>) -> Cut {
    let mut cut = Cut::default();
    let all = monitors
        .iter()
        .map(|ip| (*ip, if ip.is_ipv4() { 32 } else { 128 }))
        .chain(peers.iter().copied());
    let mut loopback = false;
    for (ip, prefix) in all {
        if ip.is_loopback() {
            loopback = true;
            continue;
        }
        let text = format!("{ip}/{prefix}");
        let set = if ip.is_ipv4() {
            &mut cut.hosts4
        } else {
            &mut cut.hosts6
        };
        if !set.contains(&text) {
            set.push(text);
        }
    }
    if loopback {
        cut.ports.extend(pg_port);
    }
    cut.cut_monitors_in_agent = monitors.iter().any(IpAddr::is_loopback);
    cut
}

/// The nft script: a fresh table whose sets hold the cut with element timeouts of `duration`.
pub fn nft_script(table: &str, cut: &Cut, duration: Duration) -> String {
    let ms = duration.as_millis();
    let mut s = format!(
        "add table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n\
         \tset hosts4 {{ type ipv4_addr; flags interval, timeout; }}\n\
         \tset hosts6 {{ type ipv6_addr; flags interval, timeout; }}\n\
         \tset ports {{ type inet_service; flags timeout; }}\n\
         \tchain input {{ type filter hook input priority -10; policy accept;\n\
         \t\tip saddr @hosts4 drop\n\t\tip6 saddr @hosts6 drop\n\
         \t\ttcp dport @ports drop\n\t\ttcp sport @ports drop\n\t}}\n\
         \tchain output {{ type filter hook output priority -10; policy accept;\n\
         \t\tip daddr @hosts4 drop\n\t\tip6 daddr @hosts6 drop\n\
         \t\ttcp dport @ports drop\n\t\ttcp sport @ports drop\n\t}}\n}}\n"
    );
    let mut elements = |set: &str, items: Vec<String>| {
        if !items.is_empty() {
            let list: Vec<String> = items
                .iter()
                .map(|i| format!("{i} timeout {ms}ms"))
                .collect();
            s.push_str(&format!(
                "add element inet {table} {set} {{ {} }}\n",
                list.join(", ")
            ));
        }
    };
    elements("hosts4", cut.hosts4.clone());
    elements("hosts6", cut.hosts6.clone());
    elements("ports", cut.ports.iter().map(u16::to_string).collect());
    s
}

fn run_nft(script: &str) -> Result<(), DrillError> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DrillError::Nft(format!("cannot run nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| DrillError::Nft(format!("writing the script: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| DrillError::Nft(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DrillError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Starts `sleep <after>; <command>` detached from the agent (its own process group, so a
/// signal to the agent's group does not reach it). A thread reaps it.
pub fn arm_undo(after: Duration, command: &str) -> Result<(), DrillError> {
    let script = format!(
        "sleep {}.{:03}; {command}",
        after.as_secs(),
        after.subsec_millis()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(DrillError::Undo)?;
    std::thread::spawn(move || child.wait());
    Ok(())
}

fn signal(pid: i32, sig: Signal) -> Result<(), DrillError> {
    kill(Pid::from_raw(pid), sig).map_err(|source| DrillError::Signal { pid, source })
}

/// The direct children of `pid` (from `/proc/*/stat`).
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Stops `pid` and then its children (stopped first, it forks no new ones), each after its
/// SIGCONT was armed for `duration` from now. Returns the stopped children.
pub fn freeze_tree(pid: i32, duration: Duration) -> Result<Vec<i32>, DrillError> {
    let undo_at = std::time::Instant::now() + duration;
    arm_undo(duration, &format!("kill -CONT {pid}"))?;
    signal(pid, Signal::SIGSTOP)?;
    let children = children_of(pid);
    if !children.is_empty() {
        let list: Vec<String> = children.iter().map(i32::to_string).collect();
        let left = undo_at.saturating_duration_since(std::time::Instant::now());
        arm_undo(left, &format!("kill -CONT {}", list.join(" ")))?;
        for &c in &children {
            // A child that exited meanwhile has nothing left to freeze.
            if let Err(e) = signal(c, Signal::SIGSTOP) {
                warn!(pid = c, error = %e, "drill: a PostgreSQL child could not be stopped");
            }
        }
    }
    Ok(children)
}

/// Freezes PostgreSQL and then this agent; returns once SIGCONT woke the agent up.
fn freeze(postmaster: i32, duration: Duration) -> Result<Duration, DrillError> {
    let me = Pid::this().as_raw();
    let undo_at = std::time::Instant::now() + duration;
    arm_undo(duration, &format!("kill -CONT {me}"))?;
    let children = freeze_tree(postmaster, duration)?;
    warn!(
        postmaster,
        children = children.len(),
        "drill: PostgreSQL frozen; freezing the agent"
    );
    signal(me, Signal::SIGSTOP)?;
    let overslept = std::time::Instant::now().saturating_duration_since(undo_at);
    info!(
        overslept_ms = overslept.as_millis(),
        "drill: the agent resumed after the freeze"
    );
    Ok(duration)
}

/// kill -9 of the postmaster, then of this agent. SIGKILL to ourselves rather than `exit` or
/// `abort`: no destructor, no shutdown path, no core file, exactly like `kill -9` from outside.
/// Returns only if the postmaster could not be killed.
fn crash(postmaster: Option<i32>) -> DrillError {
    if let Some(pm) = postmaster {
        if let Err(e) = signal(pm, Signal::SIGKILL) {
            return e;
        }
        warn!(postmaster = pm, "drill: postmaster killed with SIGKILL");
    }
    warn!("drill: the agent kills itself with SIGKILL now");
    match kill(Pid::this(), Signal::SIGKILL) {
        // SIGKILL to oneself is delivered before kill(2) returns: this line is never reached,
        // and if it were, aborting is the same abrupt end.
        Ok(()) => std::process::abort(),
        Err(source) => DrillError::Signal {
            pid: Pid::this().as_raw(),
            source,
        },
    }
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    use super::*;

    fn drills(allowed: bool) -> Drills {
        Drills {
            node: NodeId::new("psql1".to_owned()).unwrap(),
            allowed,
            monitors: vec!["127.0.0.1:7400".into()],
            peers: vec![],
            pg_port: Some(5432),
            seen: VecDeque::new(),
            status: None,
            notice: None,
            cut_off_until: None,
        }
    }

    fn order(id: &str, fault: v1::Fault, not_after: u64) -> v1::DrillOrder {
        v1::DrillOrder {
            id: id.into(),
            fault: fault.into(),
            duration_ms: 3000,
            not_after_unix_ms: not_after,
        }
    }

    #[test]
    fn orders_are_deduplicated_and_expire() {
        let mut d = drills(true);
        let o = order("a", v1::Fault::Freeze, 1_000);
        assert_eq!(
            d.admit(&o, 900),
            Verdict::Inject(Fault::Freeze(Duration::from_secs(3)))
        );
        assert_eq!(d.admit(&o, 950), Verdict::Duplicate);
        let late = order("b", v1::Fault::Crash, 1_000);
        assert_eq!(d.admit(&late, 1_250), Verdict::Expired { late_ms: 250 });
        assert_eq!(
            d.admit(&late, 900),
            Verdict::Duplicate,
            "an expired id stays seen"
        );
        // The memory is bounded; the oldest ids are forgotten first.
        for i in 0..REMEMBERED {
            d.admit(&order(&format!("x{i}"), v1::Fault::Crash, 0), 1);
        }
        assert_eq!(d.seen.len(), REMEMBERED);
        assert!(!d.seen.contains(&"a".to_owned()));
    }

    #[test]
    fn refusals_inject_nothing_and_are_reported() {
        let mut d = drills(false);
        let o = order("r1", v1::Fault::Crash, u64::MAX);
        assert!(matches!(d.admit(&o, 0), Verdict::Refused(why) if why.contains("allow_drills")));
        // Through on_order: a crash order refused here must not kill the test process.
        let o2 = order("r2", v1::Fault::Crash, unix_ms() + 5_000);
        d.on_order(&o2, None, None);
        let now = unix_ms();
        let text = d.notice(now).unwrap();
        assert!(
            text.contains("drill r2 refused") && text.contains("allow_drills"),
            "{text}"
        );
        let status = d.status(now).unwrap();
        assert_eq!((status.id.as_str(), status.active), ("r2", false));
        assert!(
            d.notice(now + 60_000).is_none(),
            "the notice ends with the order"
        );

        let mut allowed = drills(true);
        let leader = order("k", v1::Fault::KillMonitorLeader, u64::MAX);
        assert!(matches!(allowed.admit(&leader, 0), Verdict::Refused(_)));
        let mut zero = order("z", v1::Fault::Partition, u64::MAX);
        zero.duration_ms = 0;
        assert!(matches!(allowed.admit(&zero, 0), Verdict::Refused(w) if w.contains("duration")));
        let mut unknown = order("u", v1::Fault::Crash, u64::MAX);
        unknown.fault = 99;
        assert!(matches!(allowed.admit(&unknown, 0), Verdict::Refused(_)));
    }

    #[test]
    fn cuts_by_address_off_loopback_and_by_port_on_it() {
        let m = [IpAddr::from([10, 0, 0, 21]), IpAddr::from([10, 0, 0, 22])];
        let peers = [
            cidr("10.0.0.11/32").unwrap(),
            cidr("fd00::/64").unwrap(),
            cidr("10.0.0.21").unwrap(),
        ];
        let cut = plan_cut(&m, &peers, Some(5432));
        assert_eq!(cut.hosts4, ["10.0.0.21/32", "10.0.0.22/32", "10.0.0.11/32"]);
        assert_eq!(cut.hosts6, ["fd00::/64"]);
        assert!(cut.ports.is_empty() && !cut.cut_monitors_in_agent);

        let lo = plan_cut(
            &[IpAddr::from(Ipv4Addr::LOCALHOST)],
            &[cidr("127.0.0.1/32").unwrap()],
            Some(6543),
        );
        assert_eq!(lo.ports, [6543]);
        assert!(lo.hosts4.is_empty() && lo.cut_monitors_in_agent);
        assert!(cidr("10.0.0.1/33").is_err() && cidr("a; flush ruleset").is_err());

        let script = nft_script("ha_drill_psql1", &cut, Duration::from_millis(2500));
        assert!(
            script
                .contains("add element inet ha_drill_psql1 hosts4 { 10.0.0.21/32 timeout 2500ms,"),
            "{script}"
        );
        assert!(
            !script.contains("ports {  }") && !script.contains("element inet ha_drill_psql1 ports")
        );
        assert_eq!(
            table_name(&NodeId::new("psql-1.a".to_owned()).unwrap()),
            "ha_drill_psql_1_a"
        );
    }

    /// Polls until `f` holds, for at most `limit`.
    pub(in crate::run) fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        f()
    }

    fn connects(port: u16) -> bool {
        TcpStream::connect_timeout(
            &(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
    }

    /// Deletes the test's nftables table, even when an assertion fails.
    struct TableGuard(String);

    impl Drop for TableGuard {
        fn drop(&mut self) {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &self.0])
                .output();
        }
    }

    #[test]
    fn a_loopback_partition_drops_the_port_and_the_kernel_lifts_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let node = format!("drilltest{}{}", std::process::id(), port);
        let mut d = drills(true);
        d.node = NodeId::new(node.clone()).unwrap();
        d.pg_port = Some(port);
        let _guard = TableGuard(table_name(&d.node));
        assert!(connects(port));
        let started = std::time::Instant::now();
        d.partition(None, Duration::from_millis(1500)).unwrap();
        assert!(
            d.monitors_cut_off(Instant::now()),
            "a loopback monitor: the agent cuts itself off"
        );
        assert!(!connects(port), "the port is cut");
        assert!(
            eventually(Duration::from_secs(10), || connects(port)),
            "the cut never ended"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "lifted too early: {:?}",
            started.elapsed()
        );
        assert!(!d.monitors_cut_off(Instant::now() + Duration::from_millis(1500)));
    }

    /// The process state letter of `pid` (`T`: stopped), `?` when it is gone.
    pub(in crate::run) fn state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next())
            .unwrap_or('?')
    }

    #[test]
    fn a_frozen_tree_is_resumed_by_the_armed_helper() {
        // A parent with two children, like a postmaster with its backends.
        let parent = Command::new("sh")
            .args(["-c", "sleep 60 & sleep 60 & wait"])
            .spawn()
            .unwrap();
        let mut guard = ha_tests::ChildGuard::new(parent);
        let pid = i32::try_from(guard.id()).unwrap();
        assert!(eventually(Duration::from_secs(5), || children_of(pid)
            .len()
            == 2));
        let kids = freeze_tree(pid, Duration::from_millis(1200)).unwrap();
        assert_eq!(kids.len(), 2);
        let all: Vec<u32> = std::iter::once(pid)
            .chain(kids.iter().copied())
            .map(|p| p.try_into().unwrap())
            .collect();
        // Stopping is asynchronous (delivered when each process is next scheduled); the undo
        // comes 1.2 s later.
        assert!(
            eventually(Duration::from_millis(800), || all
                .iter()
                .all(|p| state(*p) == 'T')),
            "every process is stopped"
        );
        assert!(
            eventually(Duration::from_secs(10), || all
                .iter()
                .all(|p| state(*p) == 'S')),
            "the helper resumed them: {:?}",
            all.iter().map(|p| state(*p)).collect::<Vec<_>>()
        );
        for k in kids {
            let _ = kill(Pid::from_raw(k), Signal::SIGKILL);
        }
        let _ = guard.child().kill();
    }
}
