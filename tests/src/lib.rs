//! `ha-tests`: support shared by the integration tests of every crate (and, later, the
//! multi-process drills and chaos tests that live here): loopback ports and child processes
//! that are always reaped.
//!
//! Tests run in parallel with other tests on the same machine, so every server a test starts
//! listens on a port chosen at run time, and every process it starts is killed by PID when the
//! guard drops, even when an assertion fails.

use std::net::TcpListener;
use std::process::Child;

/// A loopback TCP port that was free a moment ago (bound, read, released). The caller binds it
/// again soon after; collisions with other tests are unlikely, not impossible, so callers that
/// can bind `127.0.0.1:0` themselves should.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the loopback interface accepts an ephemeral bind")
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
