//! Helpers for tests that run a netns stand (`ha-provision`): a unique namespace prefix, a
//! state directory the daemons' users can traverse, the live processes of a namespace, and a
//! guard that keeps processes stopped (SIGSTOP) until it drops.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A namespace prefix `<tag><hex>` unlikely to collide with another test's stand.
pub fn unique_prefix(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .subsec_nanos();
    format!("{tag}{:x}", (std::process::id() ^ nanos) & 0xff_ffff)
}

/// A temporary directory for a stand's state, mode 0755: the daemons run as `postgres` and
/// `ejabberd` and must traverse to their own directories under it.
pub fn state_tempdir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("creating a temporary directory");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod 0755 the stand's directory");
    tmp
}

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The live processes in network namespace `ns`, with their command names.
pub fn namespace_processes(ns: &str) -> Vec<(i32, String)> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("running ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| alive(*p))
        .filter_map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
            Some((p, comm.trim().to_owned()))
        })
        .collect()
}

/// The live processes in `ns` whose command name is `comm`.
pub fn namespace_pids_named(ns: &str, comm: &str) -> Vec<i32> {
    namespace_processes(ns)
        .into_iter()
        .filter(|(_, c)| c == comm)
        .map(|(p, _)| p)
        .collect()
}

/// Processes stopped with SIGSTOP, continued (SIGCONT) on drop, also when a test fails.
#[derive(Debug)]
pub struct Stopped(Vec<i32>);

impl Stopped {
    pub fn new(pids: Vec<i32>) -> Self {
        for p in &pids {
            let _ = kill(Pid::from_raw(*p), Signal::SIGSTOP);
        }
        Self(pids)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
        }
    }
}
