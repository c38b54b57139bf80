//! The primary's lease, as the agent keeps it (agent/README.md; the monitors' side: monitor/README.md).
//!
//! The monitor renews a writable node's lease with every answered report. The agent counts the
//! lease from when the answered request was SENT (not when its answer arrived): the monitor may
//! have recorded the report at any instant in between, so only the send time is a bound the
//! agent can trust. Invariant: once `last_ok_send + lease` has passed without a newer successful
//! round trip, the lease is expired, and the agent fences a writable PostgreSQL; the monitor
//! waits lease + margin before promoting another node. Times are `tokio::time::Instant`, so
//! tests pause and advance the clock.
//!
//! The lease also outlives the agent process: every renewal records its end in `lease` in the
//! state directory, on the kernel's boot clock (which keeps counting while the agent is down).
//! A restarted agent that finds its PostgreSQL writable keeps it until that end or for
//! [`RESTART_GRACE`] after its start, whichever is later, and fences it then unless a report of
//! the new run has been answered. Without this, an agent restarted behind a partition would hold
//! a writable primary for ever while the monitors promote another node. The grace lets the
//! first report of a restart be answered when the recorded lease is over (the agent was down
//! longer than the lease, its PostgreSQL unfenced all along: fencing a primary the monitors still
//! back would be an outage for nothing). It is shorter than the monitors' margin (1 s by
//! default), so a restart inside a running lease still fences before they could promote. The
//! record is written without fsync: it matters only while the machine stays up (a reboot takes
//! PostgreSQL down too), and a missing, corrupt or other-boot record counts as an ended lease.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};
use tokio::time::Instant;
use tracing::warn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Send time of the newest request whose answer arrived, and the lease it granted.
    renewed: Option<(Instant, Duration)>,
}

impl Lease {
    pub fn new() -> Self {
        Self { renewed: None }
    }

    /// A report sent at `sent_at` was answered with `length`. An answer to an older request
    /// (arriving late) never moves the lease backwards.
    pub fn renew(&mut self, sent_at: Instant, length: Duration) {
        match self.renewed {
            Some((t, _)) if t > sent_at => {}
            _ => self.renewed = Some((sent_at, length)),
        }
    }

    /// When the lease runs out; `None` while no report has been answered in this run.
    pub fn expires_at(&self) -> Option<Instant> {
        self.renewed.map(|(t, len)| t + len)
    }

    /// True once `now` has reached the end of the lease.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at().is_some_and(|end| now >= end)
    }

    /// When the last successful round trip was sent.
    pub fn last_ok_send(&self) -> Option<Instant> {
        self.renewed.map(|(t, _)| t)
    }
}

impl Default for Lease {
    fn default() -> Self {
        Self::new()
    }
}

const LEASE_FILE: &str = "lease";
/// How long a restarted agent waits for its first answered report before fencing a writable
/// PostgreSQL whose recorded lease has ended.
pub const RESTART_GRACE: Duration = Duration::from_millis(500);
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The lease end as kept across agent restarts (see the module documentation).
#[derive(Debug, Clone)]
pub struct LeaseRecord {
    path: PathBuf,
}

/// The kernel's boot identity and its boot clock now, in nanoseconds.
fn boot_clock() -> Result<(String, u128), String> {
    let boot = std::fs::read_to_string(BOOT_ID).map_err(|e| format!("{BOOT_ID}: {e}"))?;
    let now = clock_gettime(ClockId::CLOCK_BOOTTIME).map_err(|e| format!("CLOCK_BOOTTIME: {e}"))?;
    let nanos = Duration::from(now).as_nanos();
    Ok((boot.trim().to_owned(), nanos))
}

impl LeaseRecord {
    pub fn new(state_dir: &Path) -> Self {
        Self::named(state_dir, LEASE_FILE)
    }

    /// A record of the same kind under another name (a standby's vouch, `vouch.rs`).
    pub fn named(state_dir: &Path, file: &str) -> Self {
        Self {
            path: state_dir.join(file),
        }
    }

    /// Records that the lease runs until `end`. A failure is logged and otherwise ignored: a
    /// restart then finds no lease and fences at once, which is safe.
    pub fn store(&self, end: Instant) {
        if let Err(e) = self.try_store(end) {
            warn!(path = %self.path.display(), error = %e,
                  "cannot record the lease: a restarted agent would fence at once");
        }
    }

    /// Not fsynced, on purpose: the record only counts within the boot that wrote it (its boot
    /// id is checked), and within one boot the page cache outlives any crash of the agent. A
    /// crash of the machine loses the file's newest content and the boot with it; the new
    /// boot ignores the record anyway. An fsync every report interval would buy nothing.
    fn try_store(&self, end: Instant) -> Result<(), String> {
        let (boot, now) = boot_clock()?;
        let left = end.saturating_duration_since(Instant::now()).as_nanos();
        let record = format!("{boot} {}\n", now + left);
        let options = ha_files::WriteOptions::mode(0o600).not_durable();
        ha_files::write(&self.path, record.as_bytes(), options).map_err(|e| e.to_string())
    }

    /// When the lease recorded by a previous run ends, as seen from `now`: `now` itself when
    /// there is no valid record of this boot, or when it has already passed.
    pub fn inherited(&self, now: Instant) -> Instant {
        match self.read() {
            Ok(Some(left)) => now + left,
            Ok(None) => now,
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "lease record unusable: treated as expired");
                now
            }
        }
    }

    /// What is left of the recorded lease; `None` when nothing is left or nothing was recorded.
    fn read(&self) -> Result<Option<Duration>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let (boot, end) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("malformed record {text:?}"))?;
        let end: u128 = end
            .parse()
            .map_err(|_| format!("malformed record {text:?}"))?;
        let (this_boot, now) = boot_clock()?;
        if boot != this_boot {
            return Ok(None);
        }
        let left = end.saturating_sub(now);
        Ok((left > 0).then(|| Duration::from_nanos(u64::try_from(left).unwrap_or(u64::MAX))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(3);

    #[test]
    fn late_answers_never_shorten_the_lease() {
        let t0 = Instant::now();
        let mut l = Lease::new();
        assert_eq!(l.expires_at(), None);
        assert!(!l.expired(t0 + LEASE * 10), "no lease was ever granted");
        l.renew(t0 + Duration::from_secs(1), LEASE);
        l.renew(t0, LEASE);
        assert_eq!(l.expires_at(), Some(t0 + Duration::from_secs(4)));
        assert_eq!(l.last_ok_send(), Some(t0 + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn expires_exactly_at_send_time_plus_lease() {
        let t0 = Instant::now();
        let mut l = Lease::new();
        // The request left at t0; its answer took 400 ms.
        tokio::time::sleep(Duration::from_millis(400)).await;
        l.renew(t0, LEASE);
        let end = l.expires_at().expect("granted");
        tokio::time::sleep_until(end - Duration::from_millis(1)).await;
        assert!(!l.expired(Instant::now()), "not before the lease passes");
        tokio::time::sleep_until(end).await;
        assert!(l.expired(Instant::now()));
        assert_eq!(
            Instant::now() - t0,
            LEASE,
            "counted from the send, not the answer"
        );
    }

    #[tokio::test]
    async fn a_recorded_lease_survives_a_restart_on_the_same_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let record = LeaseRecord::new(dir.path());
        let now = Instant::now();
        assert_eq!(record.inherited(now), now, "nothing recorded: expired");

        record.store(now + LEASE);
        let left = LeaseRecord::new(dir.path()).inherited(now) - now;
        assert!(
            left <= LEASE && left > LEASE - Duration::from_secs(1),
            "what is left of the lease: {left:?}"
        );

        record.store(now);
        assert_eq!(record.inherited(now), now, "an ended lease gives nothing");

        let path = dir.path().join(LEASE_FILE);
        let (_, clock) = boot_clock().unwrap();
        std::fs::write(&path, format!("another-boot {}\n", clock + 10_000_000_000)).unwrap();
        assert_eq!(record.inherited(now), now, "a lease of another boot");
        for junk in ["", "garbage", "a b c", "x 12q"] {
            std::fs::write(&path, junk).unwrap();
            assert_eq!(record.inherited(now), now, "corrupt record {junk:?}");
        }
    }
}
