//! `ha-tests`: support shared by the integration tests of every crate, and the multi-process
//! drills: loopback ports and child processes that are always reaped (this file), the
//! workspace binaries ([`bins`]), a whole cluster of real processes ([`cluster`]) secured with
//! mutual TLS from its own CA ([`pki`]), the drill workload with its safety checks ([`writer`]),
//! the named drills ([`drill`]), a real XMPP client ([`xmpp`]), helpers for tests on a netns
//! stand ([`stand`]), the reference lab stand that the chaos and liveness tests fault
//! ([`lab_stand`]) and `systemd-analyze verify` for unit files ([`systemd`]).
//!
//! Tests run in parallel with other tests on the same machine, so every server a test starts
//! listens on a port chosen at run time, and every process it starts is killed by PID when the
//! guard drops, even when an assertion fails.

pub mod bins;
pub mod cluster;
pub mod drill;
pub mod lab_stand;
pub mod pki;
pub mod stand;
pub mod systemd;
pub mod writer;
pub mod xmpp;

use std::net::TcpListener;
use std::path::Path;
use std::process::Child;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A loopback TCP port that was free a moment ago, for a server the caller starts soon after.
///
/// It lies below the kernel's ephemeral range: a port from that range (what binding port 0
/// gives) can be taken by any outgoing connection before the server binds it, which made a
/// PostgreSQL node of a five-node cluster fail to start with "Address already in use". This
/// process never hands out a port twice, and starts at an offset drawn from its PID and the
/// clock so that tests running in parallel processes rarely try the same ports; each port is
/// checked free by binding it. Callers that can bind `127.0.0.1:0` themselves should.
pub fn free_port() -> u16 {
    static PORTS: OnceLock<(u16, u16, AtomicU32)> = OnceLock::new();
    let (low, high, next) = PORTS.get_or_init(|| {
        let (low, high) = ports_below_ephemeral();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let start = std::process::id().wrapping_mul(7919).wrapping_add(nanos);
        (low, high, AtomicU32::new(start))
    });
    let (low, high) = (*low, *high);
    let span = u32::from(high - low);
    for _ in 0..span {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let port = low + u16::try_from(n % span).expect("below span, which fits in u16");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// `[10000, first ephemeral port)`, from `/proc/sys/net/ipv4/ip_local_port_range`; the default
/// range starts at 32768.
fn ports_below_ephemeral() -> (u16, u16) {
    const LOW: u16 = 10_000;
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    assert!(
        first_ephemeral > LOW + 1000,
        "the ephemeral port range starts at {first_ephemeral}: too low to keep test ports out of it"
    );
    (LOW, first_ephemeral)
}

/// Kills (SIGKILL) and reaps a child process when dropped.
#[derive(Debug)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// The child, for `try_wait` and the like.
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("the child is only taken by drop")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether `pid` is a live (not zombie) process named `postgres`: a guard must never signal a
/// PID that was reused by something else.
pub fn is_postgres(pid: i32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    comm.trim() == "postgres" && stand::alive(pid)
}

/// The postmaster PID recorded in a data directory, if any.
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
}

/// Stops the given postmasters: immediate shutdown (SIGQUIT: the postmaster stops its children,
/// each in its own session, before it exits), then SIGKILL for any still alive after 10 s.
pub fn stop_postmasters(pids: &[i32]) {
    for &pid in pids {
        if is_postgres(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| is_postgres(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in pids {
        if is_postgres(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A temporary directory for PostgreSQL servers that a test runs as the `postgres` user through
/// the agent's controller. On drop it stops every postmaster whose data directory it tracks,
/// and every postmaster PID it was told about (a crashed one may have left children behind),
/// before the directory is removed, even when the test panics.
#[derive(Debug)]
pub struct PgScratch {
    data_dirs: Vec<std::path::PathBuf>,
    seen: Vec<i32>,
    /// Dropped last: the directory outlives the servers using it.
    root: tempfile::TempDir,
}

impl PgScratch {
    /// A fresh directory, traversable by the `postgres` user.
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().expect("a temporary directory");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temporary directory");
        Self {
            data_dirs: Vec::new(),
            seen: Vec::new(),
            root,
        }
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// Creates the directory `name` under the root, owned by `postgres` (a node's socket
    /// directory and the parent of its data directory).
    pub fn node_dir(&self, name: &str) -> std::path::PathBuf {
        let pg = nix::unistd::User::from_name("postgres")
            .expect("reading the user database")
            .expect("the postgres user exists");
        let dir = self.root.path().join(name);
        std::fs::create_dir(&dir).expect("creating a node directory");
        std::os::unix::fs::chown(&dir, Some(pg.uid.as_raw()), Some(pg.gid.as_raw()))
            .expect("chown a node directory to postgres");
        dir
    }

    /// Stops the postmaster of `data_dir` on drop, whichever PID it has by then.
    pub fn track(&mut self, data_dir: std::path::PathBuf) {
        self.data_dirs.push(data_dir);
    }

    /// Stops this postmaster on drop too (one that crashed or was replaced).
    pub fn saw_postmaster(&mut self, pid: i32) {
        self.seen.push(pid);
    }
}

impl Default for PgScratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PgScratch {
    fn drop(&mut self) {
        let mut pids = self.seen.clone();
        pids.extend(self.data_dirs.iter().filter_map(|d| postmaster_pid(d)));
        stop_postmasters(&pids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn free_ports_can_be_bound() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }

    #[test]
    fn the_guard_kills_and_reaps() {
        let guard = ChildGuard::new(Command::new("sleep").arg("600").spawn().unwrap());
        let pid = guard.id();
        drop(guard);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty(), "process {pid} still exists: {stat}");
    }
}
