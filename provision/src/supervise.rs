//! The per-node supervisor of a netns stand: `ha-provision supervise NODE`, started detached by
//! `up` inside the node's namespace (`ip netns exec`), its PID in `S/nodes/<node>/supervisor.pid`.
//!
//! It runs the node's programs, each in its own process group with its output appended to
//! `S/nodes/<node>/<program>.log`:
//! - monitor: `ha-monitor --config monitor.toml` (mutual TLS, see `material`);
//! - postgres: `ha-agent --config agent.toml` (the agent runs PostgreSQL as `postgres`);
//! - ejabberd: `epmd`, then, once it answers, `ejabberdctl foreground` as the `ejabberd` user
//!   with the node's own config dir, and `ha-agent --config agent.toml` in the ejabberd role
//!   (it points ejabberd's `sql_server` at the current primary); every ejabberd node but the
//!   first joins the first one's Erlang cluster (`join_cluster`, retried until `list_cluster`
//!   shows both).
//!
//! Invariants: a program that exits is restarted after a backoff (5 s doubling to 30 s, reset
//! once it ran for a minute), every exit and restart is logged and recorded in
//! `S/nodes/<node>/programs.json` (see [`crate::daemons`], read by `status`); SIGTERM or SIGINT is forwarded
//! to every program's process group, the supervisor waits for them (SIGKILL after
//! [`STOP_GRACE`]) and exits. It never signals anything it did not start.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, User};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::daemons::{self, ProgramRecord};
use crate::material::{EJABBERDCTL, Material};
use crate::topology::{Role, Topology};

/// How long programs get to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(30);
/// First restart delay, like a host coming back: above failure detection (about 1 s on a
/// crash with positive evidence, `unhealthy_after` = 1.5 s otherwise), so that a crash drill
/// shows the failover a dead machine causes. Restarting sooner would be safe too (an agent
/// acts on a writable goal only under a lease granted in its current run), but the node would
/// simply come back as primary before anyone noticed.
const BACKOFF_MIN: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A program that ran this long is considered healthy again: its backoff resets.
const STABLE_AFTER: Duration = Duration::from_secs(60);
const EPMD: &str = "/usr/bin/epmd";
const HAPROXY: &str = "/usr/sbin/haproxy";

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The node is not in the stand.
    #[error("node `{0}` is not a node of the stand")]
    NothingToRun(String),
    /// A program's log could not be opened, or signal handlers could not be installed.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The `ejabberd` user is missing.
    #[error("system user `ejabberd` does not exist")]
    NoUser,
}

/// One supervised program.
#[derive(Debug, Clone)]
struct Program {
    name: &'static str,
    argv: Vec<OsString>,
    /// Run as this user (uid, gid, home) instead of root.
    user: Option<(u32, u32, PathBuf)>,
    /// Start only once this loopback TCP port answers (ejabberd waits for our epmd, else
    /// `erl` would start an unsupervised `epmd -daemon` of its own).
    after_port: Option<u16>,
}

/// The programs of `node`, in start order.
fn programs(
    topology: &Topology,
    material: &Material<'_>,
    bin_dir: &Path,
    node: &str,
) -> Result<Vec<Program>, SuperviseError> {
    let n = topology
        .node(node)
        .ok_or_else(|| SuperviseError::NothingToRun(node.to_owned()))?;
    let daemon = |name: &'static str, binary: &str, config: PathBuf| Program {
        name,
        argv: vec![
            bin_dir.join(binary).into(),
            "--config".into(),
            config.into(),
        ],
        user: None,
        after_port: None,
    };
    Ok(match n.role {
        Role::Monitor => vec![daemon(
            "ha-monitor",
            "ha-monitor",
            material.monitor_config(node),
        )],
        Role::Postgres => vec![daemon("ha-agent", "ha-agent", material.agent_config(node))],
        Role::Ejabberd => {
            let as_ejabberd = Some(as_ejabberd(material, node)?);
            vec![
                Program {
                    name: "epmd",
                    argv: vec![
                        EPMD.into(),
                        "-port".into(),
                        topology.ports.epmd.to_string().into(),
                    ],
                    user: as_ejabberd.clone(),
                    after_port: None,
                },
                Program {
                    name: "ejabberd",
                    argv: ejabberdctl_argv(material, node, &["foreground"]),
                    user: as_ejabberd,
                    after_port: Some(topology.ports.epmd),
                },
                daemon("ha-agent", "ha-agent", material.agent_config(node)),
            ]
        }
        // In the foreground (`-db`), logging to stdout: the supervisor keeps its log.
        Role::Gateway => vec![Program {
            name: "haproxy",
            argv: vec![
                HAPROXY.into(),
                "-db".into(),
                "-f".into(),
                material.haproxy_config(node).into(),
            ],
            user: None,
            after_port: None,
        }],
    })
}

/// The `ejabberd` user with `node`'s ejabberd home, whose `.erlang.cookie` holds the stand's
/// cookie: every `ejabberdctl` runs so (as root, `ejabberdctl` would switch user with `su`,
/// which resets `HOME` to the system's ejabberd home and its other cookie).
fn as_ejabberd(material: &Material<'_>, node: &str) -> Result<(u32, u32, PathBuf), SuperviseError> {
    let user = User::from_name("ejabberd")
        .ok()
        .flatten()
        .ok_or(SuperviseError::NoUser)?;
    let home = material.ejabberd_home(node);
    Ok((user.uid.as_raw(), user.gid.as_raw(), home))
}

impl Program {
    /// The program's command: its argv, as its user with its `HOME` and working directory.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]);
        if let Some((uid, gid, home)) = &self.user {
            cmd.uid(*uid).gid(*gid).env("HOME", home).current_dir(home);
        }
        cmd
    }
}

/// `ejabberdctl` for `node`'s own config dir followed by `args`.
pub fn ejabberdctl_argv(material: &Material<'_>, node: &str, args: &[&str]) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        EJABBERDCTL.into(),
        "--config-dir".into(),
        material.ejabberd_conf(node).into(),
    ];
    argv.extend(args.iter().map(OsString::from));
    argv
}

/// A running program and its restart bookkeeping.
struct Slot {
    program: Program,
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
    /// Starts after the first one.
    restarts: u32,
    /// How the last run ended, or why the program could not start.
    last_exit: Option<String>,
}

impl Slot {
    fn record(&self) -> ProgramRecord {
        let now = Instant::now();
        ProgramRecord {
            name: self.program.name.to_owned(),
            pid: self.child.as_ref().and_then(Child::id),
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
            restart_at_unix_ms: self.restart_at.map(|at| {
                daemons::unix_ms(std::time::SystemTime::now() + at.saturating_duration_since(now))
            }),
        }
    }
}

/// Runs the supervisor of `node` until SIGTERM or SIGINT.
pub async fn run(
    topology: &Topology,
    state_dir: &Path,
    bin_dir: &Path,
    node: &str,
) -> Result<(), SuperviseError> {
    let material = Material::new(topology, state_dir);
    let log_dir = material.node_dir(node);
    let mut slots: Vec<Slot> = programs(topology, &material, bin_dir, node)?
        .into_iter()
        .map(|program| Slot {
            program,
            child: None,
            started: Instant::now(),
            backoff: BACKOFF_MIN,
            restart_at: Some(Instant::now()),
            restarts: 0,
            last_exit: None,
        })
        .collect();
    let record_path = daemons::record_path(&material, node);
    let sig = |kind: SignalKind, what: &str| {
        signal(kind).map_err(|source| SuperviseError::Io {
            what: format!("installing the {what} handler"),
            source,
        })
    };
    let mut term = sig(SignalKind::terminate(), "SIGTERM")?;
    let mut int = sig(SignalKind::interrupt(), "SIGINT")?;
    // Each ejabberdctl call takes seconds: the join runs beside the restart loop.
    let joiner = cluster_join(&material, topology, node)?.map(|(first, ctl)| {
        let node = node.to_owned();
        tokio::spawn(async move {
            while !try_join(&ctl, &first, &node).await {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    });
    record(&slots, &record_path, node);
    info!(node, programs = slots.len(), "supervisor started");
    loop {
        let mut changed = false;
        for slot in &mut slots {
            changed |= tend(slot, &log_dir, node);
        }
        if changed {
            record(&slots, &record_path, node);
        }
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    if let Some(join) = joiner {
        join.abort();
    }
    info!(node, "supervisor stopping its programs");
    stop_all(&mut slots, node).await;
    for slot in &mut slots {
        slot.last_exit = Some("stopped with the supervisor".into());
    }
    record(&slots, &record_path, node);
    info!(node, "supervisor stopped");
    Ok(())
}

/// Replaces the node's program record; a failure is logged (`status` then reports from the
/// previous record, checked against `/proc`).
fn record(slots: &[Slot], path: &Path, node: &str) {
    let records: Vec<ProgramRecord> = slots.iter().map(Slot::record).collect();
    if let Err(e) = daemons::write_record(path, &records) {
        warn!(node, path = %path.display(), error = %e, "cannot record the programs' state");
    }
}

/// Reaps an exited program, schedules its restart with backoff, starts it when due. True if
/// the program started, exited or failed to start.
fn tend(slot: &mut Slot, log_dir: &Path, node: &str) -> bool {
    let name = slot.program.name;
    let mut changed = false;
    if let Some(child) = slot.child.as_mut() {
        match child.try_wait() {
            Ok(None) => return false,
            Ok(Some(status)) => {
                let ran = slot.started.elapsed();
                if ran >= STABLE_AFTER {
                    slot.backoff = BACKOFF_MIN;
                }
                warn!(node, program = name, %status, ran_ms = ran.as_millis(), restart_in_ms = slot.backoff.as_millis(), "program exited; restarting after backoff");
                slot.child = None;
                slot.last_exit = Some(status.to_string());
                slot.restart_at = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
                changed = true;
            }
            Err(e) => {
                warn!(node, program = name, error = %e, "cannot poll program");
                return false;
            }
        }
    }
    let ready = slot.program.after_port.is_none_or(|port| {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(100),
        )
        .is_ok()
    });
    if ready && slot.restart_at.is_some_and(|at| Instant::now() >= at) {
        match spawn(&slot.program, log_dir) {
            Ok(child) => {
                info!(node, program = name, pid = child.id(), "program started");
                if slot.last_exit.is_some() {
                    slot.restarts += 1;
                }
                slot.child = Some(child);
                slot.started = Instant::now();
                slot.restart_at = None;
            }
            Err(e) => {
                warn!(node, program = name, error = %e, retry_in_ms = slot.backoff.as_millis(), "cannot start program");
                slot.last_exit = Some(format!("cannot start: {e}"));
                slot.restart_at = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
            }
        }
        changed = true;
    }
    changed
}

fn spawn(program: &Program, log_dir: &Path) -> Result<Child, SuperviseError> {
    let log_path = log_dir.join(format!("{}.log", program.name));
    let io = |what: String| move |source| SuperviseError::Io { what, source };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(format!("opening {}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(io(format!("duplicating {}", log_path.display())))?;
    let mut cmd = program.command();
    cmd.env("RUST_LOG", "info")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    cmd.spawn().map_err(io(format!(
        "starting {}",
        program.argv[0].to_string_lossy()
    )))
}

/// For an ejabberd node other than the first: the first node's Erlang name and `ejabberdctl`
/// (its arguments follow).
fn cluster_join(
    material: &Material<'_>,
    topology: &Topology,
    node: &str,
) -> Result<Option<(String, Program)>, SuperviseError> {
    let (Some(n), Some(first)) = (topology.node(node), material.first_ejabberd()) else {
        return Ok(None);
    };
    if n.role != Role::Ejabberd || first.name == node {
        return Ok(None);
    }
    let ctl = Program {
        name: "ejabberdctl",
        argv: ejabberdctl_argv(material, node, &[]),
        user: Some(as_ejabberd(material, node)?),
        after_port: None,
    };
    Ok(Some((Material::erlang_node(&first.name), ctl)))
}

/// One attempt to join `first`'s cluster; true once `list_cluster` shows it.
async fn try_join(ctl: &Program, first: &str, node: &str) -> bool {
    let run = |args: &[&str]| {
        let mut cmd = ctl.command();
        cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
        async move { cmd.output().await }
    };
    match run(&["list_cluster"]).await {
        Ok(out) if out.status.success() => {
            if String::from_utf8_lossy(&out.stdout).contains(first) {
                info!(node, first, "in the ejabberd cluster");
                return true;
            }
        }
        // ejabberd is not running yet: try again later.
        _ => return false,
    }
    match run(&["join_cluster", first]).await {
        Ok(out) if out.status.success() => {
            info!(node, first, "joined the ejabberd cluster");
            false
        }
        Ok(out) => {
            warn!(node, first, output = %String::from_utf8_lossy(&out.stdout).trim(), "join_cluster failed; retrying");
            false
        }
        Err(e) => {
            warn!(node, first, error = %e, "cannot run ejabberdctl join_cluster");
            false
        }
    }
}

/// SIGTERM to every program's group (last started first), then SIGKILL after the grace.
async fn stop_all(slots: &mut [Slot], node: &str) {
    for slot in slots.iter().rev() {
        if let Some(pid) = slot.child.as_ref().and_then(Child::id) {
            info!(node, program = slot.program.name, pid, "sending SIGTERM");
            signal_group(pid, Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for slot in slots.iter_mut().rev() {
        let Some(child) = slot.child.as_mut() else {
            continue;
        };
        let Some(pid) = child.id() else {
            continue;
        };
        // The group leader (e.g. ejabberdctl's shell) may exit before its children (beam):
        // wait for the whole group.
        let exited = async {
            let _ = child.wait().await;
            while daemons::group_state(pid).is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        if tokio::time::timeout_at(deadline, exited).await.is_err() {
            warn!(
                node,
                program = slot.program.name,
                pid,
                "no exit after SIGTERM; SIGKILL"
            );
            signal_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
        slot.child = None;
    }
}

fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        // ESRCH: the group is already gone.
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::topology::tests::example;

    #[test]
    fn each_role_runs_its_programs() {
        let t = example();
        let dir = Path::new("/run/ha-provision/xmpp-lab");
        let m = Material::new(&t, dir);
        let bin = Path::new("/opt/ha/bin");
        let names = |node: &str| -> Vec<&'static str> {
            programs(&t, &m, bin, node)
                .unwrap()
                .iter()
                .map(|p| p.name)
                .collect()
        };
        assert_eq!(names("mon1server"), ["ha-monitor"]);
        assert_eq!(names("psql1server"), ["ha-agent"]);
        assert_eq!(names("e2server"), ["epmd", "ejabberd", "ha-agent"]);
        let agent = &programs(&t, &m, bin, "psql1server").unwrap()[0];
        assert_eq!(agent.argv[0], OsString::from("/opt/ha/bin/ha-agent"));
        assert_eq!(names("gw1server"), ["haproxy"]);
        assert!(programs(&t, &m, bin, "nosuch").is_err());
        assert!(
            cluster_join(&m, &t, "e1server").unwrap().is_none(),
            "first node"
        );
        let (first, ctl) = cluster_join(&m, &t, "e2server").unwrap().unwrap();
        assert_eq!(first, "ejabberd@e1server");
        // As ejabberd with the node's home, where its cookie is: never as root.
        let (_, _, home) = ctl.user.unwrap();
        assert_eq!(home, m.ejabberd_home("e2server"));
    }
}
