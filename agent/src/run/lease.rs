//! The primary's lease, as the agent keeps it (DESIGN.md, safety rules).
//!
//! The monitor renews a writable node's lease with every answered report. The agent counts the
//! lease from when the answered request was SENT (not when its answer arrived): the monitor may
//! have recorded the report at any instant in between, so only the send time is a bound the
//! agent can trust. Invariant: once `last_ok_send + lease` has passed without a newer successful
//! round trip, the lease is expired, and the agent fences a writable PostgreSQL; the monitor
//! waits lease + margin before promoting another node. Times are `tokio::time::Instant`, so
//! tests pause and advance the clock.

use std::time::Duration;

use tokio::time::Instant;

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
}
