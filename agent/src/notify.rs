//! systemd's notification protocol (`sd_notify`), for `Type=notify` units with a watchdog.
//!
//! A message is one datagram of `KEY=VALUE` lines to the socket named by `$NOTIFY_SOCKET` (a path,
//! or an abstract name when it starts with `@`). Without `$NOTIFY_SOCKET` (not started by
//! systemd, tests) every call does nothing. The agent sends `READY=1` once it has joined and
//! observed its server for the first time, and `WATCHDOG=1` from its main loop at most every
//! half of `$WATCHDOG_USEC` (systemd restarts the agent when a whole period passes without one:
//! a hung loop). `$WATCHDOG_PID`, when set, must name this process, as in `sd_watchdog_enabled`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Where notifications go, and the watchdog period; built once per loop.
#[derive(Debug)]
pub struct Notifier {
    target: Option<SocketAddr>,
    /// Half of `WATCHDOG_USEC`: the longest gap between two `WATCHDOG=1`.
    feed_every: Option<Duration>,
    last_fed: Option<Instant>,
    ready: bool,
    /// A failed send is logged once, not at every tick.
    failed: bool,
}

impl Notifier {
    /// From the environment systemd gives the service (nothing set: a notifier that does nothing).
    pub fn from_env() -> Self {
        Self::new(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// `socket`, `watchdog_usec` and `watchdog_pid` as systemd sets them; `pid` is this process.
    pub fn new(
        socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> Self {
        let target = socket.and_then(|s| match address(s) {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(socket = ?s, error = %e, "NOTIFY_SOCKET is not usable: no notifications to systemd");
                None
            }
        });
        let for_me = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>().ok() == Some(pid));
        let feed_every = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && for_me && target.is_some())
            .map(|u| Duration::from_micros(u) / 2);
        if let Some(every) = feed_every {
            info!(every = ?every, "systemd watchdog enabled: fed from the main loop");
        }
        Self {
            target,
            feed_every,
            last_fed: None,
            ready: false,
            failed: false,
        }
    }

    /// Sends one message (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, ...); `Ok` without a socket.
    pub fn send(&self, message: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound()?;
        let sent = socket.send_to_addr(message.as_bytes(), target)?;
        if sent == message.len() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "short write: {sent} of {} bytes",
                message.len()
            )))
        }
    }

    /// Called from every turn of the main loop: `READY=1` the first time `observed` is true, and
    /// `WATCHDOG=1` when half the watchdog period has passed since the last one.
    pub fn tick(&mut self, observed: bool) {
        if self.target.is_none() {
            return;
        }
        if observed && !self.ready {
            self.ready = true;
            info!("joined and observed the server: READY=1 to systemd");
            self.report(self.send("READY=1"));
        }
        if let Some(every) = self.feed_every {
            let now = Instant::now();
            if self.last_fed.is_none_or(|t| now.duration_since(t) >= every) {
                self.last_fed = Some(now);
                self.report(self.send("WATCHDOG=1"));
            }
        }
    }

    fn report(&mut self, result: io::Result<()>) {
        match result {
            Ok(()) => self.failed = false,
            Err(e) if !self.failed => {
                self.failed = true;
                warn!(error = %e, "cannot notify systemd (retried at the next turn)");
            }
            Err(_) => {}
        }
    }
}

/// `@name` is an abstract socket, anything else a path.
fn address(socket: &OsStr) -> io::Result<SocketAddr> {
    match socket.as_bytes() {
        [] => Err(io::Error::new(io::ErrorKind::InvalidInput, "empty")),
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name)
        }
        _ => SocketAddr::from_pathname(socket),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn pending(socket: &UnixDatagram) -> Option<String> {
        socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        let got = socket
            .recv(&mut buf)
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
        socket.set_nonblocking(false).unwrap();
        got
    }

    #[test]
    fn ready_once_after_the_first_observation_and_the_watchdog_at_half_its_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        // 2 s watchdog: fed at most every second.
        let mut n = Notifier::new(Some(path.as_os_str()), Some("2000000"), None, 1);
        n.tick(false);
        assert_eq!(
            receive(&systemd),
            "WATCHDOG=1",
            "first turn feeds the watchdog"
        );
        assert_eq!(pending(&systemd), None, "no READY=1 before an observation");
        n.tick(true);
        assert_eq!(receive(&systemd), "READY=1");
        assert_eq!(
            pending(&systemd),
            None,
            "the watchdog was fed less than 1 s ago"
        );
        n.last_fed = Instant::now().checked_sub(Duration::from_secs(1));
        n.tick(true);
        assert_eq!(receive(&systemd), "WATCHDOG=1", "half the period passed");
        assert_eq!(pending(&systemd), None, "READY=1 is sent only once");
    }

    #[test]
    fn abstract_sockets_are_supported() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("ha-agent-notify-test-{}", std::process::id());
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let mut n = Notifier::new(Some(OsStr::new(&format!("@{name}"))), None, None, 1);
        n.tick(true);
        assert_eq!(receive(&systemd), "READY=1");
        assert_eq!(pending(&systemd), None, "no watchdog configured");
    }

    #[test]
    fn nothing_without_a_socket_or_for_another_process() {
        let mut n = Notifier::new(None, Some("2000000"), None, 1);
        n.tick(true);
        assert!(n.send("READY=1").is_ok());
        assert_eq!(n.feed_every, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let _systemd = UnixDatagram::bind(&path).unwrap();
        let other = Notifier::new(Some(path.as_os_str()), Some("2000000"), Some("7"), 1);
        assert_eq!(other.feed_every, None, "WATCHDOG_PID names another process");
        let mine = Notifier::new(Some(path.as_os_str()), Some("2000000"), Some("1"), 1);
        assert_eq!(mine.feed_every, Some(Duration::from_secs(1)));
    }
}
