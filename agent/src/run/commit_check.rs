//! The primary's commit check: what a client sees, not what the server says. While PostgreSQL
//! was last observed as a writable primary, the agent commits a transaction of its own every
//! [`EVERY`] on a session of its own: a transactional logical message (`pg_logical_emit_message`,
//! no table needed) is WAL written by a transaction with an id, so its commit waits for the
//! synchronous standbys exactly like a client's (a transaction that only takes an id writes no
//! WAL before its commit record, and PostgreSQL does not make such a commit wait). One that does not complete within [`BOUND`] is cancelled and the node is
//! reported with `commits_blocked` (shown unhealthy by the monitors) until a commit completes
//! again. A failed commit (the session lost, the server going read-only) counts as blocked too
//! unless the server stopped being a writable primary meanwhile.
//!
//! Invariant: at most one check runs at a time, and a check never outlives its bound by more
//! than the cancel request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pg::{PgConfig, connect_local};

/// How often the primary commits its check transaction.
pub const EVERY: Duration = Duration::from_secs(1);
/// How long a commit may take before the node is reported with its commits blocked: longer than
/// any commit on a healthy pair of servers, shorter than the replication timeout (5 s) after
/// which a lost synchronous standby is dropped.
pub const BOUND: Duration = Duration::from_secs(2);

/// The check transaction: a little WAL in a transaction of its own.
const CHECK: &str = "SELECT pg_logical_emit_message(true, 'ha-agent', 'commit check')";

/// What the reconcile loop and the check share.
#[derive(Debug, Clone, Default)]
pub struct CommitCheck {
    /// The last observation saw a writable primary.
    writable: Arc<AtomicBool>,
    blocked: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
}

impl CommitCheck {
    pub fn set_writable(&self, writable: bool) {
        self.writable.store(writable, Ordering::Relaxed);
        if !writable {
            self.blocked.store(false, Ordering::Relaxed);
        }
    }

    /// The last check did not complete within [`BOUND`] (and the server is still a writable
    /// primary).
    pub fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// How many check commits completed in time so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    fn writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    /// Records the outcome of one check; logs a change.
    fn record(&self, node: &str, outcome: Result<Duration, String>) {
        if outcome.is_ok() {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
        let blocked = outcome.is_err() && self.writable();
        let was = self.blocked.swap(blocked, Ordering::Relaxed);
        match (&outcome, was, blocked) {
            (Err(why), false, true) => {
                warn!(node, reason = %why, "the primary's commit check did not complete: clients' commits hang too");
            }
            (Ok(took), true, false) => {
                info!(
                    node,
                    took_ms = took.as_millis(),
                    "the primary's commits complete again"
                );
            }
            _ => {}
        }
    }
}

/// One check on `client`: the commit, or why it did not complete within [`BOUND`].
async fn check(client: &Client) -> Result<Duration, String> {
    let started = Instant::now();
    match tokio::time::timeout(BOUND, client.simple_query(CHECK)).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(format!("commit failed: {e}")),
        Err(_) => {
            // The backend keeps waiting for its standbys unless told: cancel it (it then
            // commits locally with a warning, which is harmless for an empty transaction).
            let _ = client.cancel_token().cancel_query(NoTls).await;
            Err(format!("no commit within {BOUND:?}"))
        }
    }
}

/// Runs the check until `shutdown`.
pub async fn run(cfg: PgConfig, shared: CommitCheck, shutdown: CancellationToken) {
    let node = cfg.node.to_string();
    let mut session: Option<Client> = None;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !shared.writable() {
            session = None;
            continue;
        }
        let client = match session.take() {
            Some(c) if !c.is_closed() => c,
            _ => match connect_local(&cfg).await {
                Ok(c) => c,
                Err(e) => {
                    shared.record(&node, Err(format!("no session: {e}")));
                    continue;
                }
            },
        };
        let outcome = check(&client).await;
        if outcome.is_ok() {
            session = Some(client);
        }
        shared.record(&node, outcome);
    }
}
