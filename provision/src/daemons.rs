//! What runs on a node of a netns stand, as `status` reports it.
//!
//! The supervisor records its programs in `S/nodes/<node>/programs.json` whenever one starts,
//! exits or cannot start ([`ProgramRecord`]); `status` reads that record and checks every PID
//! it names against `/proc` ([`node_daemons`]), so a report never says running for a process
//! that has died, even when the supervisor itself has died or is frozen and can no longer
//! update its record. PostgreSQL is started by the agent, not the supervisor: its postmaster
//! is found through `postmaster.pid` in the node's data directory.
//!
//! Invariants: a daemon is `running` only if a live (not stopped, not zombie) process holds
//! its PID (for supervised programs: any live process of its process group, as ejabberd's
//! start script may exit before the Erlang VM it started); the record is replaced atomically
//! (written beside, then renamed), so a reader never sees half a file.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::material::Material;
use crate::topology::Role;

/// One supervised program as its supervisor last recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramRecord {
    /// The program's name (`ha-monitor`, `ha-agent`, `epmd`, `ejabberd`, `haproxy`).
    pub name: String,
    /// The PID of its process group leader while it runs.
    pub pid: Option<u32>,
    /// How often it was restarted since the supervisor started.
    pub restarts: u32,
    /// How its last run ended (`exit status: 1`, `signal: 9 (SIGKILL)`, or why it could not
    /// start).
    pub last_exit: Option<String>,
    /// When the supervisor starts it again (Unix milliseconds), while it waits out a backoff.
    pub restart_at_unix_ms: Option<u64>,
}

/// The record file of `node`.
pub fn record_path(material: &Material<'_>, node: &str) -> PathBuf {
    material.node_dir(node).join("programs.json")
}

/// Replaces the record at `path` atomically.
pub fn write_record(path: &Path, programs: &[ProgramRecord]) -> Result<(), ha_files::FileError> {
    let json = serde_json::to_vec_pretty(programs)
        .expect("the records hold only strings, numbers and enums, which always serialize");
    ha_files::write(path, &json, ha_files::WriteOptions::mode(0o644))
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A daemon's state in a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    /// A live process holds it.
    Running,
    /// Its processes exist but are stopped (SIGSTOP): they serve nothing.
    Frozen,
    /// Not running; its supervisor starts it again after a backoff.
    Restarting,
    /// Not running and nobody is about to start it (its process died unnoticed, or it was
    /// never started).
    Down,
}

impl std::fmt::Display for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Self::Running => "running",
            Self::Frozen => "frozen",
            Self::Restarting => "restarting",
            Self::Down => "down",
        })
    }
}

/// One daemon of a node in a report.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonReport {
    /// `supervisor`, a program's name, or `postgres`.
    pub name: String,
    /// What `/proc` says now.
    pub state: DaemonState,
    /// The PID checked, if any.
    pub pid: Option<i32>,
    /// Why it is not running, or how often it was restarted.
    pub detail: Option<String>,
}

/// The state of a process from `/proc/<pid>/stat`: `None` if it is gone or a zombie.
fn process_state(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the `(comm)` field: state, ppid, pgrp.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    (state != 'Z' && state != 'X').then_some((state, pgrp))
}

fn stopped(state: char) -> bool {
    matches!(state, 'T' | 't')
}

/// The state of process group `pgid`: running if any member is live and not stopped, frozen
/// if every live member is stopped, `None` if it has no live member.
pub fn group_state(pgid: u32) -> Option<DaemonState> {
    let pgid = i32::try_from(pgid).ok()?;
    let mut frozen = false;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        match process_state(pid) {
            Some((state, pgrp)) if pgrp == pgid => {
                if !stopped(state) {
                    return Some(DaemonState::Running);
                }
                frozen = true;
            }
            _ => {}
        }
    }
    frozen.then_some(DaemonState::Frozen)
}

fn single_state(pid: i32) -> Option<DaemonState> {
    process_state(pid).map(|(state, _)| {
        if stopped(state) {
            DaemonState::Frozen
        } else {
            DaemonState::Running
        }
    })
}

/// The daemons of a netns node with `role`: its supervisor (`supervisor` = the PID of a live
/// supervisor, see `lab::supervisor_pid`), every program of its record, and for a PostgreSQL
/// node the postmaster.
pub fn node_daemons(
    material: &Material<'_>,
    node: &str,
    role: Role,
    supervisor: Option<i32>,
) -> Vec<DaemonReport> {
    let supervisor_state = supervisor.and_then(single_state);
    let mut daemons = vec![DaemonReport {
        name: "supervisor".into(),
        state: supervisor_state.unwrap_or(DaemonState::Down),
        pid: supervisor,
        detail: supervisor_state
            .is_none()
            .then(|| "not running: nothing restarts this node's programs".into()),
    }];
    let supervising = supervisor_state == Some(DaemonState::Running);
    let records: Vec<ProgramRecord> = fs::read(record_path(material, node))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let now = unix_ms(SystemTime::now());
    for p in records {
        let live = p.pid.and_then(group_state);
        let (state, detail) = match live {
            Some(state) => (state, (p.restarts > 0).then(|| restarts(&p))),
            None => {
                let why = p.last_exit.clone().unwrap_or_else(|| "exited".into());
                match p.restart_at_unix_ms {
                    Some(_) if supervising && p.last_exit.is_none() => {
                        (DaemonState::Restarting, Some("starting".into()))
                    }
                    Some(at) if supervising => (
                        DaemonState::Restarting,
                        Some(format!(
                            "{why}; restart in {:.1} s ({})",
                            at.saturating_sub(now) as f64 / 1000.0,
                            restarts(&p)
                        )),
                    ),
                    // Recorded running, but its process is gone: it died while the
                    // supervisor could not notice (frozen or dead itself).
                    _ if p.pid.is_some() => (
                        DaemonState::Down,
                        Some("its process is gone and its supervisor has not noticed".into()),
                    ),
                    _ => (DaemonState::Down, Some(why)),
                }
            }
        };
        daemons.push(DaemonReport {
            pid: p.pid.and_then(|pid| i32::try_from(pid).ok()),
            name: p.name,
            state,
            detail,
        });
    }
    if role == Role::Postgres {
        let pid = fs::read_to_string(material.pg_data(node).join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        let state = pid.filter(|&p| is_postgres(p)).and_then(single_state);
        daemons.push(DaemonReport {
            name: "postgres".into(),
            state: state.unwrap_or(DaemonState::Down),
            pid,
            detail: state.is_none().then(|| {
                if pid.is_some() {
                    "postmaster.pid names no live postmaster".into()
                } else {
                    "no postmaster.pid: not started".into()
                }
            }),
        });
    }
    daemons
}

fn restarts(p: &ProgramRecord) -> String {
    format!("restarted {} times", p.restarts)
}

/// Whether `pid` is a PostgreSQL process (a reused PID is not).
fn is_postgres(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn this_process_runs_and_an_unused_pid_does_not() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(single_state(me), Some(DaemonState::Running));
        // PIDs are below pid_max (at most 2^22).
        assert_eq!(single_state(1 << 23), None);
        assert_eq!(group_state(1 << 23), None);
    }

    #[test]
    fn a_stopped_group_is_frozen_and_a_reaped_one_is_gone() {
        use std::os::unix::process::CommandExt as _;
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let raw = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        assert_eq!(group_state(pid), Some(DaemonState::Running));
        nix::sys::signal::kill(raw, nix::sys::signal::Signal::SIGSTOP).unwrap();
        // The stop is asynchronous: wait for the kernel to report it (waitpid WUNTRACED).
        nix::sys::wait::waitpid(raw, Some(nix::sys::wait::WaitPidFlag::WUNTRACED)).unwrap();
        assert_eq!(group_state(pid), Some(DaemonState::Frozen));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(group_state(pid), None);
    }

    #[test]
    fn a_record_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("programs.json");
        let records = vec![ProgramRecord {
            name: "ha-agent".into(),
            pid: Some(42),
            restarts: 2,
            last_exit: Some("signal: 9 (SIGKILL)".into()),
            restart_at_unix_ms: None,
        }];
        write_record(&path, &records).unwrap();
        let back: Vec<ProgramRecord> = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, records);
        assert!(!path.with_extension("json.tmp").exists());
    }
}
