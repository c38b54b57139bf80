//! The agent's ejabberd role: report ejabberd's health and the database target it applied,
//! and point ejabberd at the primary of every new epoch the monitors assign (goal FOLLOW).
//!
//! Invariants:
//! - a goal with an epoch lower than the persisted one is refused (logged and reported); a
//!   higher epoch is persisted before it is acted upon (the shared agent state file);
//! - the applied target (epoch, primary, address, time) is persisted after ejabberd verifiably
//!   uses it, and seeds the controller at start, so a restarted agent still refuses an older
//!   epoch; at start the current goal is re-asserted once whatever the record says (ejabberd
//!   may have been restarted with another file meanwhile);
//! - an apply runs in its own task: reporting never waits for it; a failed apply leaves the
//!   last good file in place (the controller restores it), is reported as `last_error`, and is
//!   retried after [`RETRY_APPLY`];
//! - MAINTENANCE and REMOVED change nothing in ejabberd: the node keeps its last target.
//! - every [`HEALTH_EVERY`] ejabberd's health is read and published; beside it (its own task,
//!   so a slow check never delays the health) the managed file is compared with the
//!   controller's last good copy (persisted as [`LAST_GOOD_FILE`]) and repaired when it
//!   differs, and every `sql_check_interval`, and as soon as ejabberd is seen (re)started, an
//!   uncached write through ejabberd's pool must reach the applied target, else ejabberd is
//!   reported not running and the target is applied again. A repair or failure stays in
//!   `last_error` until the next clean check.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ha_proto::convert::Goal;
use ha_proto::types::{Endpoint, Epoch, GoalState};
use ha_proto::{NodeId, v1};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::monitors::Monitors;
use super::state::{AgentState, StateFile};
use super::{ReportResult, RunError, accept_goal, watch_goals};
use crate::config::{AgentConfig, EjabberdRole};
use crate::ejabberd::sql_tls::SqlTls;
use crate::ejabberd::{ApplyReport, EjabberdController, FileCheck, SqlCheck, controller::Applied};

/// Pause before an apply that failed is tried again for the same goal.
pub const RETRY_APPLY: Duration = Duration::from_secs(2);
/// How often ejabberd's health and cluster membership are read (each costs an `erl_call`).
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// Name of the applied-target record in the state directory.
const APPLIED_FILE: &str = "ejabberd-applied.json";
/// Name of the last good copy of the managed file in the state directory (mode 0600).
pub const LAST_GOOD_FILE: &str = "ejabberd-last-good.yml";

/// The last target ejabberd verifiably used, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRecord {
    pub epoch: u64,
    pub node: String,
    pub host: String,
    pub port: u16,
    pub at_unix_ms: u64,
}

impl AppliedRecord {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: self.host.clone(),
            port: self.port,
        }
    }

    fn applied(&self) -> Applied {
        Applied {
            epoch: Epoch(self.epoch),
            target: self.endpoint(),
            at: UNIX_EPOCH + Duration::from_millis(self.at_unix_ms),
        }
    }
}

/// Reads and writes [`AppliedRecord`] (JSON, replaced atomically).
#[derive(Debug, Clone)]
pub struct AppliedFile {
    path: PathBuf,
}

impl AppliedFile {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(APPLIED_FILE),
        }
    }

    /// The record, or `None` before the first apply; a corrupt record is an error (the agent
    /// must not forget which epoch it applied).
    pub fn load(&self) -> Result<Option<AppliedRecord>, RunError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| RunError::Applied(format!("{} is corrupt: {e}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RunError::Applied(format!(
                "cannot read {}: {e}",
                self.path.display()
            ))),
        }
    }

    pub fn store(&self, record: &AppliedRecord) -> Result<(), RunError> {
        let bytes = serde_json::to_vec(record)
            .map_err(|e| RunError::Applied(format!("cannot encode the record: {e}")))?;
        ha_pki::write_public_file(&self.path, &bytes)
            .map_err(|e| RunError::Applied(format!("cannot write {}: {e}", self.path.display())))
    }
}

/// ejabberd as last read over Erlang distribution, and what the checks found.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// ejabberd runs and, at the last SQL check, its pool reached the applied target.
    pub running: bool,
    pub members: Vec<String>,
    /// Why ejabberd could not be read, if it could not.
    pub problem: Option<String>,
    /// Repairs and failures of the file and SQL checks, until their next clean check.
    pub notes: Vec<String>,
}

/// The loop's state; handlers are synchronous, [`run`] does the I/O.
#[derive(Debug)]
pub struct Follower {
    node: NodeId,
    state: AgentState,
    state_file: StateFile,
    record_file: AppliedFile,
    applied: Option<AppliedRecord>,
    goal: Option<Goal>,
    /// The epoch being applied now.
    applying: Option<Epoch>,
    /// The current goal was applied (or re-asserted) in this run.
    asserted: bool,
    /// No apply before this instant (after a failure).
    retry_at: Option<Instant>,
    last_error: String,
    report_interval: Duration,
    report_in_flight: bool,
}

impl Follower {
    pub fn new(
        cfg: &AgentConfig,
        state: AgentState,
        state_file: StateFile,
        record_file: AppliedFile,
        applied: Option<AppliedRecord>,
    ) -> Self {
        Self {
            node: cfg.node.clone(),
            state,
            state_file,
            record_file,
            applied,
            goal: None,
            applying: None,
            asserted: false,
            retry_at: None,
            last_error: String::new(),
            report_interval: cfg.report_interval,
            report_in_flight: false,
        }
    }

    fn set_error(&mut self, error: String) {
        if error != self.last_error {
            warn!(node = %self.node, %error, "error");
            self.last_error = error;
        }
    }

    /// The target to apply now, if any: a FOLLOW goal not yet asserted in this run (a newer
    /// epoch, or the first goal after start), when no apply runs and no retry is pending.
    pub fn next_apply(&self, now: Instant) -> Option<(Epoch, NodeId, Endpoint)> {
        let goal = self.goal.as_ref()?;
        if goal.state != GoalState::Follow
            || self.asserted
            || self.applying.is_some()
            || self.retry_at.is_some_and(|t| now < t)
        {
            return None;
        }
        let (node, endpoint) = goal.upstream.clone()?;
        Some((goal.epoch, node, endpoint))
    }

    pub fn on_goal(&mut self, wire: v1::Goal, source: &'static str) {
        if wire.drill.is_some() {
            warn!(node = %self.node, "drill orders are injected on PostgreSQL nodes only; ignored");
        }
        let goal = match accept_goal(&self.node, wire, &mut self.state, &self.state_file) {
            Ok(g) => g,
            Err(e) => return self.set_error(e),
        };
        if self.goal.as_ref() != Some(&goal) {
            info!(node = %self.node, goal = %goal.state, epoch = %goal.epoch, source,
                  target = ?goal.upstream.as_ref().map(|(n, e)| format!("{n} at {e}")),
                  "goal changed");
            let same_target = self.goal.as_ref().is_some_and(|g| {
                g.state == goal.state && g.epoch == goal.epoch && g.upstream == goal.upstream
            });
            if !same_target {
                self.asserted = false;
                self.retry_at = None;
            }
            self.goal = Some(goal);
        }
    }

    pub fn on_applied(&mut self, epoch: Epoch, node: NodeId, result: Result<ApplyReport, String>) {
        self.applying = None;
        match result {
            Ok(report) => {
                let record = AppliedRecord {
                    epoch: report.epoch.get(),
                    node: node.to_string(),
                    host: report.target.host.clone(),
                    port: report.target.port,
                    at_unix_ms: unix_ms(SystemTime::now()),
                };
                info!(node = %self.node, epoch = %epoch, primary = %node, target = %report.target,
                      file_changed = report.file_changed,
                      first_write_ms = report.first_write.as_millis(),
                      total_ms = report.total.as_millis(), "ejabberd uses the new primary");
                if let Err(e) = self.record_file.store(&record) {
                    // ejabberd uses the target; only the record is missing. Report it: a
                    // restart would re-assert the current goal anyway.
                    self.set_error(e.to_string());
                } else if !self.last_error.is_empty() {
                    info!(node = %self.node, previous = %self.last_error, "error cleared");
                    self.last_error.clear();
                }
                self.applied = Some(record);
                if self.goal.as_ref().is_some_and(|g| g.epoch == epoch) {
                    self.asserted = true;
                }
            }
            Err(e) => {
                self.set_error(format!("applying epoch {epoch} ({node}): {e}"));
                self.retry_at = Some(Instant::now() + RETRY_APPLY);
            }
        }
    }

    pub fn on_report(&mut self, r: ReportResult) {
        self.report_in_flight = false;
        match r.result {
            Ok(resp) => {
                let interval = Duration::from_millis(resp.report_interval_ms.clamp(50, 60_000));
                if resp.report_interval_ms != 0 && interval != self.report_interval {
                    info!(node = %self.node, interval_ms = interval.as_millis(), "report interval set by the monitor");
                    self.report_interval = interval;
                }
                if let Some(goal) = resp.goal {
                    self.on_goal(goal, "report");
                }
            }
            Err(s) => {
                warn!(node = %self.node, code = ?s.code(), error = %s.message(), "report not answered")
            }
        }
    }

    /// The report to send now.
    pub fn observed_state(&self, seen: &Seen) -> v1::ObservedState {
        let reached = match &self.goal {
            Some(g) if g.state != GoalState::Follow => Some(g.state),
            Some(g)
                if self.asserted
                    && self
                        .applied
                        .as_ref()
                        .is_some_and(|a| a.epoch == g.epoch.get()) =>
            {
                Some(GoalState::Follow)
            }
            _ => None,
        };
        let last_error = std::iter::once(&self.last_error)
            .chain(&seen.problem)
            .chain(&seen.notes)
            .filter(|e| !e.is_empty())
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("; ");
        let a = self.applied.as_ref();
        v1::ObservedState {
            node: self.node.to_string(),
            kind: v1::NodeKind::Ejabberd.into(),
            epoch: self.state.highest_epoch.get(),
            reached: reached.map_or(0, |s| v1::GoalState::from(s).into()),
            step: if self.applying.is_some() {
                "apply".into()
            } else {
                String::new()
            },
            last_error,
            detail: Some(v1::observed_state::Detail::Ejabberd(
                v1::EjabberdObservation {
                    running: seen.running,
                    applied_epoch: a.map_or(0, |a| a.epoch),
                    applied_node: a.map(|a| a.node.clone()).unwrap_or_default(),
                    applied_target: a.map(|a| a.endpoint().into()),
                    applied_at_unix_ms: a.map_or(0, |a| a.at_unix_ms),
                    cluster_members: seen.members.clone(),
                },
            )),
            drill: None,
            agent_port: 0,
            vouch_left_ms: 0,
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the slow checks last found (each may apply the target again, which takes seconds), read
/// by the health loop at every publication.
#[derive(Debug, Default)]
struct Findings {
    file_note: Option<String>,
    sql_note: Option<String>,
    /// The last SQL check did not reach the applied target (cleared by a clean one).
    sql_failing: bool,
    tls_note: Option<String>,
}

/// Shared between the health loop and the checks.
struct Shared {
    findings: std::sync::Mutex<Findings>,
    /// ejabberd answered and ran at the last health read.
    running: std::sync::atomic::AtomicBool,
    /// Wakes the health loop to publish a new finding at once.
    publish_now: tokio::sync::Notify,
}

impl Shared {
    fn findings(&self) -> std::sync::MutexGuard<'_, Findings> {
        self.findings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a finding and has it published now.
    fn update(&self, change: impl FnOnce(&mut Findings)) {
        change(&mut self.findings());
        self.publish_now.notify_one();
    }
}

/// Reads ejabberd's health and cluster membership every [`HEALTH_EVERY`] and publishes them with
/// what the checks found. The checks (the managed file against the last good copy, every
/// `sql_every` and right after ejabberd was seen (re)started an uncached write through its pool
/// to the applied target; each repairs by applying the target again) run in their own task: a
/// slow check or repair never delays the health reading, so a killed ejabberd is reported
/// within one interval whatever a check was doing.
async fn watch_health(
    node: NodeId,
    ctl: Arc<EjabberdController>,
    sql_every: Duration,
    tx: watch::Sender<Seen>,
    stop: CancellationToken,
) {
    let shared = Arc::new(Shared {
        findings: std::sync::Mutex::new(Findings::default()),
        running: std::sync::atomic::AtomicBool::new(false),
        publish_now: tokio::sync::Notify::new(),
    });
    let (restarted_tx, restarted) = watch::channel(());
    let checks = tokio::spawn(run_checks(
        node.clone(),
        ctl.clone(),
        sql_every,
        shared.clone(),
        restarted,
        stop.clone(),
    ));
    // Before the first read, a running ejabberd is not a restart (the agent just started).
    let mut was_running: Option<bool> = None;
    let mut last_pid: Option<u32> = None;
    loop {
        // First: a renewed certificate reaches ejabberd's next SQL connection.
        let tls = ctl.install_sql_tls();
        {
            let mut f = shared.findings();
            match tls {
                Ok(_) => {
                    if let Some(previous) = f.tls_note.take() {
                        info!(%node, %previous, "TLS material for ejabberd's SQL connections usable again");
                    }
                }
                Err(e) => {
                    if f.tls_note.is_none() {
                        warn!(%node, error = %e, "TLS material for ejabberd's SQL connections refused; ejabberd keeps the copies it has");
                    }
                    f.tls_note = Some(format!(
                        "TLS material for ejabberd's SQL connections refused: {e}"
                    ));
                }
            }
        }
        let health = ctl.health().await;
        shared
            .running
            .store(health.running, std::sync::atomic::Ordering::Relaxed);
        if health.running {
            let restarted = was_running == Some(false)
                || matches!((last_pid, health.os_pid), (Some(a), Some(b)) if a != b);
            if restarted {
                warn!(%node, old_pid = ?last_pid, new_pid = ?health.os_pid,
                      "ejabberd was (re)started; checking its file and SQL pool now");
                restarted_tx.send_replace(());
            }
            last_pid = health.os_pid.or(last_pid);
        }
        was_running = Some(health.running);
        let mut seen = match (health.running, ctl.cluster_members().await) {
            (true, Ok(members)) => Seen {
                running: true,
                members,
                ..Seen::default()
            },
            (true, Err(e)) => Seen {
                running: true,
                problem: Some(format!("cluster membership: {e}")),
                ..Seen::default()
            },
            (false, _) => Seen {
                problem: Some(format!("ejabberd is not running: {}", health.status)),
                ..Seen::default()
            },
        };
        {
            let f = shared.findings();
            seen.running = health.running && !f.sql_failing;
            seen.notes = [&f.file_note, &f.sql_note, &f.tls_note]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
        }
        if tx.send(seen).is_err() {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(HEALTH_EVERY) => {}
            () = shared.publish_now.notified() => {}
        }
    }
    checks.abort();
}

/// The file and SQL checks of [`watch_health`], until `stop`.
async fn run_checks(
    node: NodeId,
    ctl: Arc<EjabberdController>,
    sql_every: Duration,
    shared: Arc<Shared>,
    mut restarted: watch::Receiver<()>,
    stop: CancellationToken,
) {
    let mut next_sql = Instant::now() + sql_every;
    loop {
        match ctl.check_file().await {
            FileCheck::Skipped => {}
            FileCheck::Clean => {
                if let Some(previous) = shared.findings().file_note.take() {
                    info!(%node, %previous, "managed file clean at this check");
                }
            }
            FileCheck::Repaired { difference, report } => shared.update(|f| {
                f.file_note = Some(format!(
                    "managed file repaired: it was {difference}; rewritten from the {} and verified",
                    report.source
                ));
            }),
            FileCheck::RepairFailed { difference, error } => shared.update(|f| {
                f.file_note = Some(format!("managed file {difference}; repair failed: {error}"));
            }),
        }

        let due = Instant::now() >= next_sql || restarted.has_changed().unwrap_or(false);
        if due && shared.running.load(std::sync::atomic::Ordering::Relaxed) {
            restarted.mark_unchanged();
            next_sql = Instant::now() + sql_every;
            check_sql(&node, &ctl, &shared).await;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(HEALTH_EVERY) => {}
            changed = restarted.changed() => {
                if changed.is_err() {
                    return; // the health loop ended
                }
            }
        }
    }
}

/// One SQL check; a pool that does not reach the applied target is reported at once, then
/// the target is applied again.
async fn check_sql(node: &NodeId, ctl: &EjabberdController, shared: &Shared) {
    match ctl.check_sql().await {
        SqlCheck::Skipped => {}
        SqlCheck::Reached { target, elapsed } => {
            let mut f = shared.findings();
            if f.sql_failing || f.sql_note.is_some() {
                info!(%node, %target, elapsed_ms = elapsed.as_millis() as u64,
                      "ejabberd's SQL pool reaches the applied target at this check");
            }
            f.sql_failing = false;
            f.sql_note = None;
        }
        SqlCheck::Failed { target, error } => {
            warn!(%node, %target, %error,
                  "ejabberd's SQL pool does not reach the applied target; reporting ejabberd not running and applying the target again");
            shared.update(|f| {
                f.sql_failing = true;
                f.sql_note = Some(format!("SQL pool does not reach {target}: {error}"));
            });
            match ctl.reassert().await {
                Some(Ok(report)) => {
                    info!(%node, %target, total_ms = report.total.as_millis() as u64,
                          "ejabberd's SQL pool repaired: target applied again and verified");
                    shared.update(|f| {
                        f.sql_failing = false;
                        f.sql_note = Some(format!(
                            "SQL pool did not reach {target} ({error}); applied again and verified"
                        ));
                    });
                }
                Some(Err(e)) => {
                    warn!(%node, %target, error = %e, "applying the target again failed; retried at the next SQL check");
                    shared.update(|f| {
                        f.sql_note = Some(format!(
                            "SQL pool does not reach {target} ({error}); applying again failed: {e}"
                        ));
                    });
                }
                None => {}
            }
        }
    }
}

/// Runs the ejabberd role until `shutdown` is cancelled (the node has joined already).
pub async fn run(
    cfg: &AgentConfig,
    role: &EjabberdRole,
    sql_tls: Option<(SqlTls, Arc<ha_pki::ClientTls>)>,
    state: AgentState,
    state_file: StateFile,
    monitors: Monitors,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let record_file = AppliedFile::new(&cfg.state_dir);
    let applied = record_file.load()?;
    let ctl = Arc::new(
        EjabberdController::new(
            role.controller.clone(),
            applied.as_ref().map(AppliedRecord::applied),
        )
        .and_then(|c| c.with_last_good(cfg.state_dir.join(LAST_GOOD_FILE)))
        .map(|c| match sql_tls {
            Some((sql, probe)) => c.with_sql_tls(sql, probe),
            None => c,
        })
        .map_err(|e| RunError::Applied(format!("ejabberd controller: {e}")))?,
    );
    info!(node = %cfg.node, applied = ?applied, "ejabberd role starting");
    let (goal_tx, mut goals) = mpsc::channel(8);
    let watcher = tokio::spawn(watch_goals(
        monitors.clone(),
        cfg.node.clone(),
        goal_tx,
        shutdown.child_token(),
    ));
    let (seen_tx, seen_rx) = watch::channel(Seen::default());
    let health = tokio::spawn(watch_health(
        cfg.node.clone(),
        ctl.clone(),
        role.controller.sql_check_interval,
        seen_tx,
        shutdown.child_token(),
    ));
    let (report_tx, mut reports) = mpsc::channel::<ReportResult>(1);
    let (done_tx, mut done) = mpsc::channel(1);
    let mut f = Follower::new(cfg, state, state_file, record_file, applied);
    let mut next_report = Instant::now();
    let mut systemd = crate::notify::Notifier::from_env();
    loop {
        systemd.tick(seen_rx.has_changed().unwrap_or(true));
        if let Some((epoch, node, endpoint)) = f.next_apply(Instant::now()) {
            f.applying = Some(epoch);
            let ctl = ctl.clone();
            let tx = done_tx.clone();
            tokio::spawn(async move {
                let result = ctl.apply(&endpoint, epoch).await.map_err(|e| e.to_string());
                let _ = tx.send((epoch, node, result)).await;
            });
        }
        let retry = f.retry_at;
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(r) = reports.recv() => f.on_report(r),
            Some(g) = goals.recv() => f.on_goal(g, "watch"),
            Some((epoch, node, result)) = done.recv() => f.on_applied(epoch, node, result),
            () = super::sleep_until_some(retry) => f.retry_at = None,
            () = tokio::time::sleep_until(next_report) => {
                next_report = Instant::now() + f.report_interval;
                if !f.report_in_flight {
                    f.report_in_flight = true;
                    let observed = f.observed_state(&seen_rx.borrow());
                    super::spawn_report(monitors.clone(), observed, report_tx.clone());
                }
            }
        }
    }
    watcher.abort();
    health.abort();
    info!(node = %cfg.node, "ejabberd role stopped; ejabberd keeps its last target");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(state_dir: &Path) -> AgentConfig {
        let text = format!(
            r#"
role = "ejabberd"
node = "e1"
group = "main"
monitors = ["127.0.0.1:1"]
state_dir = "{}"
dev = true
[ejabberd]
config_file = "/etc/ejabberd/ejabberd.yml"
erlang_node = "ejabberd@localhost"
cookie_home = "/nonexistent-cookie-home"
vhosts = ["example.org"]
advertise_host = "127.0.0.1"
"#,
            state_dir.display()
        );
        AgentConfig::parse(&text, Path::new("unit.toml"), true).unwrap()
    }

    fn follower(dir: &Path, highest: u64) -> Follower {
        let file = StateFile::new(dir);
        let state = AgentState {
            highest_epoch: Epoch(highest),
            joined: true,
        };
        file.store(&state).unwrap();
        Follower::new(&config(dir), state, file, AppliedFile::new(dir), None)
    }

    fn follow(epoch: u64, primary: &str, port: u32) -> v1::Goal {
        v1::Goal {
            node: "e1".into(),
            state: v1::GoalState::Follow.into(),
            epoch,
            upstream: Some(v1::Endpoint {
                host: "127.0.0.1".into(),
                port,
            }),
            upstream_node: primary.into(),
            ..Default::default()
        }
    }

    fn report(epoch: u64, port: u16) -> ApplyReport {
        ApplyReport {
            epoch: Epoch(epoch),
            target: Endpoint {
                host: "127.0.0.1".into(),
                port,
            },
            file_changed: true,
            source: crate::ejabberd::Source::LastGood,
            steps: Vec::new(),
            first_write: Duration::from_millis(300),
            total: Duration::from_millis(400),
        }
    }

    #[tokio::test]
    async fn follows_new_epochs_once_and_refuses_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = follower(dir.path(), 1);
        let now = Instant::now();
        assert_eq!(f.next_apply(now), None, "nothing before a goal");
        f.on_goal(follow(2, "psql1", 5432), "test");
        let (epoch, node, endpoint) = f.next_apply(now).unwrap();
        assert_eq!(
            (epoch, node.as_str(), endpoint.port),
            (Epoch(2), "psql1", 5432)
        );
        f.applying = Some(epoch);
        assert_eq!(f.next_apply(now), None, "one apply at a time");
        f.on_applied(epoch, node, Ok(report(2, 5432)));
        assert_eq!(f.next_apply(now), None, "applied: nothing more to do");
        let obs = f.observed_state(&Seen::default());
        assert_eq!(obs.reached, i32::from(v1::GoalState::Follow));
        assert_eq!(
            AppliedFile::new(dir.path()).load().unwrap().unwrap().epoch,
            2
        );

        f.on_goal(follow(1, "psql2", 5433), "test");
        assert!(f.last_error.contains("stale epoch"), "{}", f.last_error);
        assert_eq!(f.next_apply(now), None, "an older epoch is never applied");

        f.on_goal(follow(3, "psql2", 5433), "test");
        assert_eq!(f.next_apply(now).unwrap().0, Epoch(3));
        assert_eq!(
            StateFile::new(dir.path()).load().unwrap().highest_epoch,
            Epoch(3)
        );
    }

    #[tokio::test]
    async fn a_failed_apply_is_reported_and_retried_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = follower(dir.path(), 1);
        f.on_goal(follow(2, "psql1", 5432), "test");
        let (epoch, node, _) = f.next_apply(Instant::now()).unwrap();
        f.applying = Some(epoch);
        f.on_applied(epoch, node, Err("ejabberd refused the reload".into()));
        let obs = f.observed_state(&Seen::default());
        assert!(
            obs.last_error.contains("refused the reload"),
            "{}",
            obs.last_error
        );
        assert_eq!(obs.reached, 0, "not reached");
        assert_eq!(f.next_apply(Instant::now()), None, "not at once");
        assert!(
            f.next_apply(Instant::now() + RETRY_APPLY).is_some(),
            "after the pause"
        );
        assert_eq!(
            AppliedFile::new(dir.path()).load().unwrap(),
            None,
            "nothing recorded"
        );
    }

    #[tokio::test]
    async fn a_restart_reasserts_the_current_goal_once() {
        let dir = tempfile::tempdir().unwrap();
        let record = AppliedRecord {
            epoch: 2,
            node: "psql1".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            at_unix_ms: 1,
        };
        AppliedFile::new(dir.path()).store(&record).unwrap();
        let file = StateFile::new(dir.path());
        let state = AgentState {
            highest_epoch: Epoch(2),
            joined: true,
        };
        file.store(&state).unwrap();
        let loaded = AppliedFile::new(dir.path()).load().unwrap();
        let mut f = Follower::new(
            &config(dir.path()),
            state,
            file,
            AppliedFile::new(dir.path()),
            loaded,
        );
        f.on_goal(follow(2, "psql1", 5432), "test");
        assert!(
            f.next_apply(Instant::now()).is_some(),
            "re-asserted after a restart"
        );
    }

    #[test]
    fn a_corrupt_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(APPLIED_FILE), b"{not json").unwrap();
        assert!(AppliedFile::new(dir.path()).load().is_err());
    }
}
