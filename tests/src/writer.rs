//! Drill workload and safety checks: a [`Writer`] that commits uniquely numbered rows through
//! whichever node is primary (reconnecting after every failure) and records each acknowledged
//! id with the node and the instant; a [`Watch`] that polls every node for writability
//! (`pg_is_in_recovery()` and a write probe) and records any moment two nodes acknowledged a
//! write in the same round; and [`missing_acknowledged`], the check that every acknowledged id
//! is on the final primary.
//!
//! The writer opens its sessions either as `postgres` over each node's Unix socket
//! ([`Writer::start`]) or like an application on another host ([`Writer::start_tls`]): TCP to
//! the node's address, TLS verify-full against the cluster CA, a client certificate for the
//! `cert` rule, with the files re-read whenever the test reloads them (a rotation); it then
//! opens a new session every [`TLS_SESSION_WRITES`] writes, so new handshakes run all along a
//! rotation. The watch always uses the Unix sockets.
//!
//! An acknowledgement is a COMMIT the server answered with success; a write whose answer never
//! came (timeout, broken connection) is recorded as uncertain and may or may not be present.
//! Neither task ever cancels a statement: PostgreSQL reports a commit whose synchronous
//! replication wait was cancelled as a success (with a warning), which would count a write the
//! standbys never confirmed as acknowledged. A timed-out session is dropped instead.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::cluster::PgAddr;
use crate::pki::PgClientTls;

/// How long a write may wait for its acknowledgement before the writer gives up on the session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long finding a primary may wait on one node.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Pause before trying again when no node accepted a write.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Writes per session in TLS mode: then the session is closed and a new one opened.
pub const TLS_SESSION_WRITES: u64 = 20;

/// The tables the writer commits to and the watch probes (create them on the first primary).
pub const TABLES: &str = "CREATE TABLE ha_drill (id bigint PRIMARY KEY, node text NOT NULL);
CREATE TABLE ha_drill_probe (node text NOT NULL, at timestamptz NOT NULL DEFAULT now());";

/// One acknowledged write.
#[derive(Debug, Clone)]
pub struct Ack {
    pub id: i64,
    pub node: String,
    pub at: Instant,
}

/// What the writer saw.
#[derive(Debug, Clone, Default)]
pub struct WriterLog {
    pub acks: Vec<Ack>,
    /// Ids sent without an answer: they may or may not have been committed.
    pub uncertain: Vec<i64>,
    /// Ids the server refused with an error (read-only, shutting down): not committed.
    pub refused: Vec<i64>,
    /// Sessions that could not be opened (refused, timed out, TLS failed).
    pub failed_connects: u64,
    /// Sessions opened.
    pub sessions: u64,
}

impl WriterLog {
    /// The first acknowledgement at or after `t` by a node other than `except`.
    pub fn first_ack_after(&self, t: Instant, except: Option<&str>) -> Option<&Ack> {
        self.acks
            .iter()
            .find(|a| a.at >= t && except.is_none_or(|e| a.node != e))
    }

    /// The longest gap between consecutive acknowledgements in `[from, to]`.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let times: Vec<Instant> = std::iter::once(from)
            .chain(
                self.acks
                    .iter()
                    .map(|a| a.at)
                    .filter(|&t| t > from && t < to),
            )
            .chain(std::iter::once(to))
            .collect();
        times
            .windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]))
            .max()
            .unwrap_or_default()
    }
}

/// A background task committing `INSERT INTO ha_drill (id, node)` one row at a time.
#[derive(Debug)]
pub struct Writer {
    log: Arc<Mutex<WriterLog>>,
    /// Cancels the task when the writer is dropped without [`Writer::stop`] (a failing test).
    stop: DropGuard,
    task: JoinHandle<()>,
}

/// How the writer opens a session.
#[derive(Debug, Clone)]
enum Sessions {
    /// As `postgres` over the node's Unix socket.
    Local,
    /// Over TCP with verified TLS and a client certificate.
    Tls(Arc<PgClientTls>),
}

impl Sessions {
    /// How many writes a session makes before it is replaced (`None`: until it fails).
    fn writes_per_session(&self) -> Option<u64> {
        match self {
            Sessions::Local => None,
            Sessions::Tls(_) => Some(TLS_SESSION_WRITES),
        }
    }

    async fn connect(&self, node: &PgAddr) -> Result<tokio_postgres::Client, String> {
        match self {
            Sessions::Local => node.connect(PROBE_TIMEOUT).await,
            Sessions::Tls(tls) => tls.connect(node.port, PROBE_TIMEOUT).await,
        }
    }
}

impl Writer {
    /// Starts writing through whichever of `nodes` is primary, as `postgres` over the nodes'
    /// Unix sockets.
    pub fn start(nodes: Vec<PgAddr>) -> Self {
        Self::start_with(nodes, Sessions::Local)
    }

    /// Starts writing through whichever of `nodes` is primary, over TCP with TLS verify-full
    /// and `tls`'s client certificate (as its user). Reload `tls` to rotate what new sessions
    /// use; open sessions keep theirs.
    pub fn start_tls(nodes: Vec<PgAddr>, tls: Arc<PgClientTls>) -> Self {
        Self::start_with(nodes, Sessions::Tls(tls))
    }

    fn start_with(nodes: Vec<PgAddr>, sessions: Sessions) -> Self {
        let log = Arc::new(Mutex::new(WriterLog::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(write_loop(nodes, sessions, log.clone(), stop.clone()));
        Self {
            log,
            stop: stop.drop_guard(),
            task,
        }
    }

    /// A copy of what was recorded so far.
    pub fn snapshot(&self) -> WriterLog {
        self.log
            .lock()
            .expect("no panic while holding this lock")
            .clone()
    }

    /// Waits (polling) until a write is acknowledged after `t`, by a node other than `except`,
    /// and returns it; panics after `timeout`.
    pub async fn wait_ack_after(&self, t: Instant, except: Option<&str>, timeout: Duration) -> Ack {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.snapshot().first_ack_after(t, except).cloned() {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "no write acknowledged within {timeout:?} (except by {except:?})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the writer and returns everything it recorded.
    pub async fn stop(self) -> WriterLog {
        self.stop.disarm().cancel();
        self.task.await.expect("the writer task does not panic");
        self.log
            .lock()
            .expect("no panic while holding this lock")
            .clone()
    }
}

/// A session on the first of `nodes` (starting at `prefer`) that is not in recovery; counts
/// the sessions opened and those that failed in `log`.
async fn find_primary(
    nodes: &[PgAddr],
    sessions: &Sessions,
    prefer: usize,
    log: &Mutex<WriterLog>,
) -> Option<(usize, tokio_postgres::Client)> {
    for i in (0..nodes.len()).map(|k| (prefer + k) % nodes.len()) {
        let connected = sessions.connect(&nodes[i]).await;
        {
            let mut log = log.lock().expect("no panic while holding this lock");
            match connected {
                Ok(_) => log.sessions += 1,
                Err(_) => log.failed_connects += 1,
            }
        }
        let Ok(client) = connected else {
            continue;
        };
        let recovery = tokio::time::timeout(
            PROBE_TIMEOUT,
            client.query_one("SELECT pg_is_in_recovery()", &[]),
        )
        .await;
        if let Ok(Ok(row)) = recovery
            && !row.get::<_, bool>(0)
        {
            return Some((i, client));
        }
    }
    None
}

async fn write_loop(
    nodes: Vec<PgAddr>,
    sessions: Sessions,
    log: Arc<Mutex<WriterLog>>,
    stop: CancellationToken,
) {
    let mut session: Option<(usize, tokio_postgres::Client)> = None;
    let mut prefer = 0;
    let mut next_id: i64 = 1;
    let mut session_writes = 0;
    while !stop.is_cancelled() {
        if sessions
            .writes_per_session()
            .is_some_and(|n| session_writes >= n)
        {
            session = None;
        }
        let Some((i, client)) = session.take() else {
            session_writes = 0;
            session = find_primary(&nodes, &sessions, prefer, &log).await;
            if session.is_none() {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            continue;
        };
        prefer = i;
        let id = next_id;
        next_id += 1;
        let node = nodes[i].name.as_str();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &node];
        let insert = client.execute("INSERT INTO ha_drill (id, node) VALUES ($1, $2)", &params);
        let result = tokio::time::timeout(WRITE_TIMEOUT, insert).await;
        let at = Instant::now();
        session_writes += 1;
        let mut log = log.lock().expect("no panic while holding this lock");
        match result {
            Ok(Ok(_)) => {
                log.acks.push(Ack {
                    id,
                    node: node.to_owned(),
                    at,
                });
                session = Some((i, client));
            }
            // A refused write (read-only, shutting down) was not committed; anything else
            // may have been.
            Ok(Err(e)) if e.as_db_error().is_some() => log.refused.push(id),
            Ok(Err(_)) | Err(_) => log.uncertain.push(id),
        }
    }
}

/// Every id acknowledged in `log` that the node at `primary` does not hold, in order.
pub async fn missing_acknowledged(primary: &PgAddr, log: &WriterLog) -> Result<Vec<i64>, String> {
    let client = primary.connect(Duration::from_secs(5)).await?;
    let present: BTreeSet<i64> = client
        .query("SELECT id FROM ha_drill", &[])
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(log
        .acks
        .iter()
        .map(|a| a.id)
        .filter(|id| !present.contains(id))
        .collect())
}

/// A round of the watch in which more than one node acknowledged a write.
#[derive(Debug, Clone)]
pub struct SplitBrain {
    pub at: Instant,
    pub nodes: Vec<String>,
}

/// Polls every node, every [`Watch::EVERY`], for writability: a node is writable in a round when
/// it says it is not in recovery and acknowledges a write probe.
#[derive(Debug)]
pub struct Watch {
    report: Arc<Mutex<WatchReport>>,
    /// Cancels the task when the watch is dropped without [`Watch::stop`] (a failing test).
    stop: DropGuard,
    task: JoinHandle<()>,
}

/// What the watch saw.
#[derive(Debug, Clone, Default)]
pub struct WatchReport {
    pub rounds: u64,
    /// Rounds with two or more writable nodes: must stay empty.
    pub split_brains: Vec<SplitBrain>,
}

impl Watch {
    pub const EVERY: Duration = Duration::from_millis(100);

    pub fn start(nodes: Vec<PgAddr>) -> Self {
        let report = Arc::new(Mutex::new(WatchReport::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch_loop(nodes, report.clone(), stop.clone()));
        Self {
            report,
            stop: stop.drop_guard(),
            task,
        }
    }

    /// Stops the watch and returns what it saw.
    pub async fn stop(self) -> WatchReport {
        self.stop.disarm().cancel();
        self.task.await.expect("the watch task does not panic");
        self.report
            .lock()
            .expect("no panic while holding this lock")
            .clone()
    }
}

/// Whether `node` is writable now; keeps (or drops) its session in `slot`.
async fn writable(node: &PgAddr, slot: &mut Option<tokio_postgres::Client>) -> bool {
    if slot.is_none() {
        *slot = node.connect(PROBE_TIMEOUT).await.ok();
    }
    let Some(client) = slot.take() else {
        return false;
    };
    let probe = async {
        let primary = !client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get::<_, bool>(0);
        if primary {
            client
                .execute(
                    "INSERT INTO ha_drill_probe (node) VALUES ($1)",
                    &[&node.name],
                )
                .await?;
        }
        Ok::<bool, tokio_postgres::Error>(primary)
    };
    match tokio::time::timeout(WRITE_TIMEOUT, probe).await {
        Ok(Ok(w)) => {
            *slot = Some(client);
            w
        }
        Ok(Err(e)) if e.as_db_error().is_some() => {
            *slot = Some(client);
            false
        }
        Ok(Err(_)) | Err(_) => false,
    }
}

async fn watch_loop(nodes: Vec<PgAddr>, report: Arc<Mutex<WatchReport>>, stop: CancellationToken) {
    let mut sessions: Vec<Option<tokio_postgres::Client>> = nodes.iter().map(|_| None).collect();
    let mut tick = tokio::time::interval(Watch::EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let at = Instant::now();
        let probes = nodes
            .iter()
            .zip(sessions.iter_mut())
            .map(|(n, slot)| writable(n, slot));
        let results = futures::future::join_all(probes).await;
        let writable: Vec<String> = nodes
            .iter()
            .zip(results)
            .filter(|(_, w)| *w)
            .map(|(n, _)| n.name.clone())
            .collect();
        let mut r = report.lock().expect("no panic while holding this lock");
        r.rounds += 1;
        if writable.len() > 1 {
            r.split_brains.push(SplitBrain {
                at,
                nodes: writable,
            });
        }
    }
}
