//! Moving a running ejabberd to a new PostgreSQL primary, and proving it moved.
//!
//! One [`EjabberdController::apply`] does, in order: rewrite `sql_server`/`sql_port` in
//! memory; connect to the target as ejabberd's own SQL user and `LISTEN` on a fresh channel;
//! replace the file atomically; `reload_config`; restart each vhost's SQL pool (a reload alone
//! keeps existing connections on the old server); then send, through ejabberd's pool, an
//! uncached write (`pg_notify` plus `txid_current()`, which fails on a standby) until its
//! notification arrives on the target; finally check on the old server, when reachable, that
//! no connection of ours is left there.
//!
//! The controller keeps its own last good copy of the managed file: the exact text it last
//! wrote and verified, with its SHA-256, in memory and (with [`EjabberdController::with_last_good`])
//! in the agent's state directory, mode 0600 (it holds the SQL password). An apply rewrites
//! from the sources [`sources`] picks: the last good copy, or first an operator's edit of the
//! file when the agent can read it (sql_server/sql_port are re-pointed, every other line is
//! kept). [`EjabberdController::check_file`] repairs a file that differs from the last good
//! copy by applying again; [`EjabberdController::check_sql`] proves the pool still reaches the
//! applied target.
//!
//! Invariants:
//! - The file on disk is always the last one that was verified: a failure before the switch
//!   leaves it untouched, a failure during the switch writes back the last good copy (never
//!   the file being repaired) and points ejabberd back.
//! - An epoch older than the applied one is refused; the same epoch with another target too.
//! - The SQL password is read from the managed file and never logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use ha_pki::ClientTls;
use ha_proto::types::{Endpoint, Epoch};
use sha2::{Digest as _, Sha256};
use tokio::sync::{Mutex, mpsc};
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use super::config::{self, ConfigError, DbParams, SqlSettings, SqlTarget};
use super::erl::{self, ErlError, ErlNode};
use super::sql_tls::SqlTls;

/// One step of an apply, for timings and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Rewrite,
    TargetConnect,
    WriteFile,
    ReloadConfig,
    RestartPool,
    VerifyWrite,
    OldServerCheck,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Rewrite => "rewrite",
            Step::TargetConnect => "target_connect",
            Step::WriteFile => "write_file",
            Step::ReloadConfig => "reload_config",
            Step::RestartPool => "restart_pool",
            Step::VerifyWrite => "verify_write",
            Step::OldServerCheck => "old_server_check",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("invalid controller configuration: {0}")]
    Invalid(String),
    #[error("epoch {requested} is older than the applied epoch {applied}")]
    StaleEpoch { requested: Epoch, applied: Epoch },
    #[error("epoch {epoch} was applied with target {applied}, refusing target {requested}")]
    EpochConflict {
        epoch: Epoch,
        applied: Endpoint,
        requested: Endpoint,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot rewrite {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("vhost {vhost}: no sql_server applies to it in the managed file")]
    NoSqlFor { vhost: String },
    #[error("vhost {vhost}: sql_type is {sql_type:?}, only pgsql is supported")]
    NotPgsql {
        vhost: String,
        sql_type: Option<String>,
    },
    #[error("vhost {vhost}: cannot reach the target database at {target}: {detail}")]
    TargetUnreachable {
        vhost: String,
        target: String,
        detail: String,
    },
    #[error(transparent)]
    Write(#[from] ha_files::FileError),
    #[error("{step}: {source}")]
    Erl {
        step: Step,
        #[source]
        source: ErlError,
    },
    #[error("asking ejabberd for {what}: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: ErlError,
    },
    #[error("ejabberd refused the new configuration: {0}")]
    ReloadRefused(String),
    #[error("vhost {vhost}: restarting the SQL pool failed: {detail}")]
    PoolRestart { vhost: String, detail: String },
    #[error(
        "vhost {vhost}: no write through ejabberd reached {target} within {waited:?}; last: {last}"
    )]
    VerifyTimeout {
        vhost: String,
        target: String,
        waited: Duration,
        last: String,
    },
    #[error("vhost {vhost}: {count} ejabberd connection(s) still open on the old server {old}")]
    OldConnections {
        vhost: String,
        old: String,
        count: i64,
    },
    #[error("{what}: {source}")]
    Db {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("blocking file task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What the controller manages and how long it may wait.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The `ejabberd.yml` ejabberd loads (the one given by `--config-dir`).
    pub config_path: PathBuf,
    /// The ejabberd node.
    pub node: ErlNode,
    /// Virtual hosts whose SQL pools are restarted and verified (`hosts:` with SQL storage).
    pub vhosts: Vec<String>,
    /// Bound for connecting to a database (target or old server).
    pub db_connect_timeout: Duration,
    /// Bound from the pool restart to the first write landing on the target.
    pub verify_timeout: Duration,
    /// Bound for ejabberd's connections on the old server to disappear.
    pub old_connections_timeout: Duration,
    /// How often the agent proves, with an uncached write, that ejabberd's pool reaches the
    /// applied target ([`EjabberdController::check_sql`]).
    pub sql_check_interval: Duration,
    /// Where the agent keeps the copies ejabberd's `sql_ssl_cafile` and `sql_ssl_certfile`
    /// name ([`super::sql_tls`]); set, the agent's own probes use TLS with the node's
    /// certificate too. Needs the agent's `[tls]`.
    pub sql_tls_dir: Option<PathBuf>,
}

impl ControllerConfig {
    pub fn validate(&self) -> Result<(), ControllerError> {
        if self.vhosts.is_empty() {
            return Err(ControllerError::Invalid("no vhost to manage".into()));
        }
        if let Some(bad) = self.vhosts.iter().find(|v| {
            v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }) {
            return Err(ControllerError::Invalid(format!(
                "vhost {bad:?} is not a domain name"
            )));
        }
        Ok(())
    }
}

/// The last target written, reloaded and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub epoch: Epoch,
    pub target: Endpoint,
    pub at: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTiming {
    pub step: Step,
    pub vhost: Option<String>,
    pub elapsed: Duration,
}

/// What an apply did and how long each step took.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    pub epoch: Epoch,
    pub target: Endpoint,
    /// False when the file already held the applied text (ejabberd is still re-pointed).
    pub file_changed: bool,
    /// What the written text was rewritten from.
    pub source: Source,
    pub steps: Vec<StepTiming>,
    /// From the start of the apply to the first probe write seen on the target.
    pub first_write: Duration,
    pub total: Duration,
}

/// ejabberd's state as seen over Erlang distribution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The node answers and the ejabberd application is running.
    pub running: bool,
    /// `{InitStatus,EjabberdRunning,OsPid}` as printed by the node, or why it did not answer.
    pub status: String,
    /// The node's operating-system process id: a new one means ejabberd was restarted.
    pub os_pid: Option<u32>,
}

/// Where the text an apply writes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The agent's last good copy.
    LastGood,
    /// The file on disk, edited by hand since the last good copy (sql_server/sql_port are
    /// re-pointed, the rest is kept when ejabberd accepts it).
    OperatorEdit,
    /// The file on disk, before the agent has any good copy (first apply).
    Disk,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::LastGood => "last good copy",
            Source::OperatorEdit => "operator's edit",
            Source::Disk => "file on disk",
        })
    }
}

/// The sources an apply tries, in order: the file on disk when there is no good copy yet; the
/// good copy when the disk holds it (or cannot be read by the agent); otherwise the operator's
/// edit first and the good copy if that fails.
pub fn sources<'a>(disk: Option<&'a str>, good: Option<&'a str>) -> Vec<(Source, &'a str)> {
    match (disk, good) {
        (Some(disk), None) => vec![(Source::Disk, disk)],
        (None, None) => Vec::new(),
        (None, Some(good)) => vec![(Source::LastGood, good)],
        (Some(disk), Some(good)) if disk == good || SqlSettings::parse(disk).is_err() => {
            vec![(Source::LastGood, good)]
        }
        (Some(disk), Some(good)) => vec![(Source::OperatorEdit, disk), (Source::LastGood, good)],
    }
}

/// How the managed file differs from the last good copy (for logs and status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The agent's scanner cannot read it (or it cannot be read at all).
    Unparsable(String),
    /// `sql_server`/`sql_port` of a vhost point elsewhere.
    SqlServer { vhost: String, found: String },
    /// Another SQL setting (database, user, password, type) changed.
    SqlSettings,
    /// Other settings changed.
    Other,
}

impl Difference {
    pub fn between(disk: &str, good: &str) -> Self {
        let disk = match SqlSettings::parse(disk) {
            Ok(s) => s,
            Err(e) => return Difference::Unparsable(e.to_string()),
        };
        let Ok(good) = SqlSettings::parse(good) else {
            return Difference::Other;
        };
        let vhosts = good.vhosts.keys().chain(disk.vhosts.keys());
        for vhost in std::iter::once("").chain(vhosts.map(String::as_str)) {
            let (d, g) = (disk.effective(vhost), good.effective(vhost));
            let addr = |p: &Option<DbParams>| p.as_ref().map(|p| (p.host.clone(), p.port));
            if addr(&d) != addr(&g) {
                let found =
                    d.map_or_else(|| "none".to_owned(), |d| format!("{}:{}", d.host, d.port));
                return Difference::SqlServer {
                    vhost: if vhost.is_empty() {
                        "(top level)".into()
                    } else {
                        vhost.into()
                    },
                    found,
                };
            }
        }
        if disk != good {
            Difference::SqlSettings
        } else {
            Difference::Other
        }
    }
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Unparsable(e) => write!(f, "unparsable ({e})"),
            Difference::SqlServer { vhost, found } => {
                write!(f, "sql_server/sql_port of {vhost} changed to {found}")
            }
            Difference::SqlSettings => f.write_str("SQL settings other than the server changed"),
            Difference::Other => f.write_str("settings other than SQL changed"),
        }
    }
}

/// The outcome of [`EjabberdController::check_file`].
#[derive(Debug)]
pub enum FileCheck {
    /// An apply runs, or nothing was applied yet.
    Skipped,
    /// The file is the last good copy.
    Clean,
    Repaired {
        difference: Difference,
        report: ApplyReport,
    },
    RepairFailed {
        difference: Difference,
        error: String,
    },
}

/// The outcome of [`EjabberdController::check_sql`].
#[derive(Debug)]
pub enum SqlCheck {
    /// An apply runs, or nothing was applied yet.
    Skipped,
    Reached {
        target: Endpoint,
        elapsed: Duration,
    },
    Failed {
        target: Endpoint,
        error: String,
    },
}

/// The text last written and verified, and its SHA-256.
#[derive(Debug, Clone)]
struct GoodCopy {
    text: String,
    sum: [u8; 32],
}

impl GoodCopy {
    fn new(text: String) -> Self {
        Self {
            sum: checksum(&text),
            text,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    applied: Option<Applied>,
    good: Option<GoodCopy>,
}

fn checksum(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// The first 8 bytes of a checksum in hex, for logs.
fn hex8(sum: &[u8; 32]) -> String {
    sum[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Points one ejabberd node at the current primary. Applies are serialized.
#[derive(Debug)]
pub struct EjabberdController {
    config: ControllerConfig,
    state: Mutex<State>,
    /// Where the last good copy is persisted, if anywhere.
    last_good_path: Option<PathBuf>,
    /// The copies for ejabberd's TLS connections to PostgreSQL and the client configuration
    /// of the agent's own probes (the node's certificate), when the database is reached so.
    sql_tls: Option<(SqlTls, Arc<ClientTls>)>,
}

/// A connection to the target that receives the probe notifications.
struct Listener {
    channel: String,
    notes: mpsc::UnboundedReceiver<Notification>,
    // Kept so the session (and its LISTEN) lives as long as the listener.
    _client: Client,
}

/// Per-vhost facts computed before anything is changed.
struct Plan {
    vhost: String,
    vhost_literal: String,
    new: DbParams,
    old: Option<DbParams>,
}

impl EjabberdController {
    /// `applied` seeds the epoch record (e.g. from the agent's persisted state).
    pub fn new(
        config: ControllerConfig,
        applied: Option<Applied>,
    ) -> Result<Self, ControllerError> {
        config.validate()?;
        Ok(Self {
            config,
            state: Mutex::new(State {
                applied,
                good: None,
            }),
            last_good_path: None,
            sql_tls: None,
        })
    }

    /// ejabberd reaches PostgreSQL over TLS with the node's certificate: `sql` keeps its
    /// copies, and the agent's probes present `probe` (the agent's own client TLS).
    #[must_use]
    pub fn with_sql_tls(mut self, sql: SqlTls, probe: Arc<ClientTls>) -> Self {
        self.sql_tls = Some((sql, probe));
        self
    }

    /// Writes the copies for ejabberd that differ from the agent's files (after a renewal);
    /// `Ok(false)` when nothing changed or ejabberd does not use TLS.
    pub fn install_sql_tls(&self) -> Result<bool, String> {
        match &self.sql_tls {
            Some((sql, _)) => sql.install(&self.config.config_path),
            None => Ok(false),
        }
    }

    /// Persists the last good copy at `path` (mode 0600) and loads the copy stored there by a
    /// previous run, if any.
    pub fn with_last_good(mut self, path: PathBuf) -> Result<Self, ControllerError> {
        let loaded = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            _ => Some(ha_pki::read_key_file(&path).map_err(|e| {
                ControllerError::Invalid(format!("last good copy {}: {e}", path.display()))
            })?),
        };
        let state = self.state.get_mut();
        if let Some(text) = loaded {
            let good = GoodCopy::new(text);
            info!(path = %path.display(), sha256 = %hex8(&good.sum), "last good copy of the managed file loaded");
            state.good = Some(good);
        }
        self.last_good_path = Some(path);
        Ok(self)
    }

    pub async fn applied(&self) -> Option<Applied> {
        self.state.lock().await.applied.clone()
    }

    /// The last good copy of the managed file, if any.
    pub async fn last_good(&self) -> Option<String> {
        self.state
            .lock()
            .await
            .good
            .as_ref()
            .map(|g| g.text.clone())
    }

    /// Moves ejabberd to `target` for `epoch` and verifies it; see the module docs.
    pub async fn apply(
        &self,
        target: &Endpoint,
        epoch: Epoch,
    ) -> Result<ApplyReport, ControllerError> {
        let mut state = self.state.lock().await;
        if let Some(prev) = state.applied.as_ref() {
            if epoch < prev.epoch {
                warn!(requested = %epoch, applied = %prev.epoch, "refusing an older epoch");
                return Err(ControllerError::StaleEpoch {
                    requested: epoch,
                    applied: prev.epoch,
                });
            }
            if epoch == prev.epoch && prev.target != *target {
                warn!(epoch = %epoch, applied = %prev.target, requested = %target, "refusing a second target for one epoch");
                return Err(ControllerError::EpochConflict {
                    epoch,
                    applied: prev.target.clone(),
                    requested: target.clone(),
                });
            }
        }
        self.apply_locked(&mut state, target, epoch).await
    }

    /// Applies the target last applied again (rewrite from the sources, reload, pool restart,
    /// verified write); `None` before anything was applied.
    pub async fn reassert(&self) -> Option<Result<ApplyReport, ControllerError>> {
        let mut state = self.state.lock().await;
        let applied = state.applied.clone()?;
        info!(node = %self.config.node.node, epoch = %applied.epoch, target = %applied.target, "re-asserting the applied target");
        Some(
            self.apply_locked(&mut state, &applied.target, applied.epoch)
                .await,
        )
    }

    /// Compares the managed file with the last good copy and, when they differ, repairs it by
    /// applying the applied target again from the sources [`sources`] picks. Skipped while an
    /// apply runs (it writes the file itself) and before anything was applied.
    pub async fn check_file(&self) -> FileCheck {
        let Ok(mut state) = self.state.try_lock() else {
            return FileCheck::Skipped;
        };
        let (Some(good), Some(applied)) = (state.good.clone(), state.applied.clone()) else {
            return FileCheck::Skipped;
        };
        let path = &self.config.config_path;
        let disk = tokio::fs::read_to_string(path).await;
        let difference = match &disk {
            Ok(text) if checksum(text) == good.sum => return FileCheck::Clean,
            Ok(text) => Difference::between(text, &good.text),
            Err(e) => Difference::Unparsable(format!("cannot read it: {e}")),
        };
        warn!(node = %self.config.node.node, path = %path.display(), %difference,
              good_sha256 = %hex8(&good.sum),
              "the managed file differs from the last good copy; repairing");
        let result = self
            .apply_locked(&mut state, &applied.target, applied.epoch)
            .await;
        match result {
            Ok(report) => {
                info!(node = %self.config.node.node, path = %path.display(), %difference,
                      source = %report.source, total_ms = report.total.as_millis() as u64,
                      "managed file repaired, ejabberd reloaded and verified on the target");
                FileCheck::Repaired { difference, report }
            }
            Err(e) => {
                warn!(node = %self.config.node.node, path = %path.display(), %difference,
                      error = %e, "repairing the managed file failed");
                FileCheck::RepairFailed {
                    difference,
                    error: e.to_string(),
                }
            }
        }
    }

    /// An uncached write through ejabberd's SQL pool (the apply's verify step) must reach the
    /// applied target within `min(verify_timeout, sql_check_interval)`. Skipped while an apply
    /// runs and before anything was applied.
    pub async fn check_sql(&self) -> SqlCheck {
        let (good, applied) = {
            let Ok(state) = self.state.try_lock() else {
                return SqlCheck::Skipped;
            };
            match (state.good.clone(), state.applied.clone()) {
                (Some(good), Some(applied)) => (good, applied),
                _ => return SqlCheck::Skipped,
            }
        };
        let failed = |e: ControllerError| SqlCheck::Failed {
            target: applied.target.clone(),
            error: e.to_string(),
        };
        let settings = match SqlSettings::parse(&good.text) {
            Ok(s) => s,
            Err(source) => {
                return failed(ControllerError::Config {
                    path: self.config.config_path.clone(),
                    source,
                });
            }
        };
        let plans = match self.plan(&settings, &settings) {
            Ok(p) => p,
            Err(e) => return failed(e),
        };
        let started = Instant::now();
        let bound = self
            .config
            .verify_timeout
            .min(self.config.sql_check_interval);
        let token = format!("check-{:016x}", rand::random::<u64>());
        for plan in &plans {
            let mut listener = match self.listen(plan).await {
                Ok(l) => l,
                Err(e) => return failed(e),
            };
            if let Err(e) = self.verify(plan, &mut listener, &token, bound).await {
                return failed(e);
            }
        }
        SqlCheck::Reached {
            target: applied.target,
            elapsed: started.elapsed(),
        }
    }

    /// One apply with the lock held: tries each source [`sources`] picks, in order, until one
    /// is written, reloaded and verified; a failed try restores the last good copy.
    async fn apply_locked(
        &self,
        state: &mut State,
        target: &Endpoint,
        epoch: Epoch,
    ) -> Result<ApplyReport, ControllerError> {
        info!(epoch = %epoch, target = %target, "applying ejabberd SQL target");
        let path = &self.config.config_path;
        let disk = tokio::fs::read_to_string(path).await;
        let disk = match (disk, &state.good) {
            (Ok(text), _) => Some(text),
            (Err(e), Some(_)) => {
                warn!(path = %path.display(), error = %e, "cannot read the managed file; the last good copy replaces it");
                None
            }
            (Err(source), None) => {
                return Err(ControllerError::Read {
                    path: path.clone(),
                    source,
                });
            }
        };
        let good = state.good.as_ref().map(|g| g.text.as_str());
        let picked = sources(disk.as_deref(), good);
        // What a failed try puts back: the last good copy, or (before any) the file as it was.
        let restore_text = good.or(disk.as_deref()).unwrap_or_default().to_owned();
        let mut last_error = None;
        for (i, (source, text)) in picked.iter().enumerate() {
            if i > 0 {
                info!(source = %source, "trying the next source");
            }
            match self
                .try_apply(target, epoch, *source, text, disk.as_deref(), &restore_text)
                .await
            {
                Ok((report, written)) => {
                    state.applied = Some(Applied {
                        epoch,
                        target: target.clone(),
                        at: SystemTime::now(),
                    });
                    self.keep_good(state, written);
                    return Ok(report);
                }
                // ejabberd uses the target: another source would change nothing.
                Err(e @ ControllerError::OldConnections { .. }) => return Err(e),
                Err(e) => {
                    warn!(epoch = %epoch, target = %target, source = %source, error = %e, "apply from this source failed");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ControllerError::Invalid("no source to apply".into())))
    }

    /// Remembers `text` as the last good copy, in memory and (when configured) in the state
    /// directory, mode 0600: it holds the SQL password.
    fn keep_good(&self, state: &mut State, text: String) {
        let good = GoodCopy::new(text);
        if state.good.as_ref().is_some_and(|g| g.sum == good.sum) {
            return;
        }
        if let Some(store) = &self.last_good_path {
            match ha_pki::write_key_file(store, good.text.as_bytes()) {
                Ok(()) => {
                    info!(path = %store.display(), sha256 = %hex8(&good.sum), "last good copy of the managed file stored")
                }
                // Kept in memory; the next apply tries again.
                Err(e) => {
                    warn!(path = %store.display(), error = %e, "cannot store the last good copy")
                }
            }
        }
        state.good = Some(good);
    }

    /// Rewrites `text` for `target`, writes it (when the disk differs), reloads, restarts the
    /// pools and verifies; returns the report and the text now on disk.
    async fn try_apply(
        &self,
        target: &Endpoint,
        epoch: Epoch,
        source: Source,
        text: &str,
        disk: Option<&str>,
        restore_text: &str,
    ) -> Result<(ApplyReport, String), ControllerError> {
        let start = Instant::now();
        let mut steps = Vec::new();
        let mut timed = |step, vhost: Option<&str>, since: Instant| {
            steps.push(StepTiming {
                step,
                vhost: vhost.map(str::to_owned),
                elapsed: since.elapsed(),
            });
        };

        let t = Instant::now();
        let path = &self.config.config_path;
        let config_err = |source| ControllerError::Config {
            path: path.clone(),
            source,
        };
        let sql_target = SqlTarget::new(target.host.clone(), target.port).map_err(config_err)?;
        let rewritten = config::rewrite(text, &sql_target).map_err(config_err)?;
        let plans = self.plan(
            &SqlSettings::parse(&rewritten.text).map_err(config_err)?,
            &rewritten.before,
        )?;
        timed(Step::Rewrite, None, t);

        // Connect to the target before touching anything: an unreachable target leaves the
        // file and ejabberd as they are.
        let mut listeners = Vec::with_capacity(plans.len());
        for plan in &plans {
            let t = Instant::now();
            let listener = self.listen(plan).await?;
            timed(Step::TargetConnect, Some(&plan.vhost), t);
            listeners.push(listener);
        }

        let t = Instant::now();
        let file_changed = disk != Some(rewritten.text.as_str());
        if file_changed {
            replace(path.clone(), rewritten.text.clone()).await?;
        }
        timed(Step::WriteFile, None, t);

        let nonce = format!("{:016x}", rand::random::<u64>());
        let token = format!("{}-{nonce}", epoch.get());
        let switched = self
            .switch(&plans, &mut listeners, &token, &mut timed, start)
            .await;
        let first_write = match switched {
            Ok(first) => first,
            Err(err) => {
                warn!(epoch = %epoch, target = %target, source = %source, error = %err, "apply failed, restoring the last good configuration");
                if rewritten.text != restore_text {
                    self.restore(path.clone(), restore_text.to_owned(), &plans)
                        .await;
                }
                return Err(err);
            }
        };
        drop(listeners);

        for plan in &plans {
            let t = Instant::now();
            self.check_old_server(plan).await?;
            timed(Step::OldServerCheck, Some(&plan.vhost), t);
        }

        let report = ApplyReport {
            epoch,
            target: target.clone(),
            file_changed,
            source,
            steps,
            first_write,
            total: start.elapsed(),
        };
        info!(
            epoch = %epoch,
            target = %target,
            source = %source,
            file_changed = report.file_changed,
            first_write_ms = report.first_write.as_millis() as u64,
            total_ms = report.total.as_millis() as u64,
            "ejabberd moved to the new primary and verified"
        );
        Ok((report, rewritten.text))
    }

    /// Whether the node answers and runs ejabberd. Never fails: unreachable is "not running".
    pub async fn health(&self) -> Health {
        node_health(&self.config.node).await
    }

    /// The Erlang nodes of ejabberd's cluster, this one included.
    pub async fn cluster_members(&self) -> Result<Vec<String>, ControllerError> {
        let expr = "string:join([atom_to_list(N) || N <- ejabberd_cluster:get_nodes()], \" \").";
        let what = "cluster members";
        let term = (self.config.node.eval(expr).await)
            .map_err(|source| ControllerError::Query { what, source })?;
        let joined = erl::parse_string(&term).ok_or_else(|| ControllerError::Query {
            what,
            source: ErlError::Eval {
                node: self.config.node.node.clone(),
                detail: term.clone(),
            },
        })?;
        Ok(joined.split_whitespace().map(str::to_owned).collect())
    }

    fn plan(&self, new: &SqlSettings, before: &SqlSettings) -> Result<Vec<Plan>, ControllerError> {
        self.config
            .vhosts
            .iter()
            .map(|vhost| {
                let params = new
                    .effective(vhost)
                    .ok_or_else(|| ControllerError::NoSqlFor {
                        vhost: vhost.clone(),
                    })?;
                if params.sql_type.as_deref() != Some("pgsql") {
                    return Err(ControllerError::NotPgsql {
                        vhost: vhost.clone(),
                        sql_type: params.sql_type,
                    });
                }
                let vhost_literal = erl::binary_literal(vhost)
                    .ok_or_else(|| ControllerError::Invalid(format!("vhost {vhost:?}")))?;
                Ok(Plan {
                    vhost: vhost.clone(),
                    vhost_literal,
                    old: before
                        .effective(vhost)
                        .filter(|old| (&old.host, old.port) != (&params.host, params.port)),
                    new: params,
                })
            })
            .collect()
    }

    /// Reload, restart pools, verify; returns the time from `start` to the first verified write.
    async fn switch(
        &self,
        plans: &[Plan],
        listeners: &mut [Listener],
        token: &str,
        timed: &mut impl FnMut(Step, Option<&str>, Instant),
        start: Instant,
    ) -> Result<Duration, ControllerError> {
        let t = Instant::now();
        self.reload().await?;
        timed(Step::ReloadConfig, None, t);
        for plan in plans {
            let t = Instant::now();
            self.restart_pool(plan).await?;
            timed(Step::RestartPool, Some(&plan.vhost), t);
        }
        let mut first = None;
        for (plan, listener) in plans.iter().zip(listeners.iter_mut()) {
            let t = Instant::now();
            self.verify(plan, listener, token, self.config.verify_timeout)
                .await?;
            timed(Step::VerifyWrite, Some(&plan.vhost), t);
            first.get_or_insert(start.elapsed());
        }
        Ok(first.unwrap_or_else(|| start.elapsed()))
    }

    async fn reload(&self) -> Result<(), ControllerError> {
        let term = self
            .config
            .node
            .eval("ejabberd_admin:reload_config().")
            .await
            .map_err(|source| ControllerError::Erl {
                step: Step::ReloadConfig,
                source,
            })?;
        if term != "ok" {
            return Err(ControllerError::ReloadRefused(term));
        }
        info!(node = %self.config.node.node, "ejabberd reloaded its configuration");
        Ok(())
    }

    /// Stops and starts the vhost's pool so every connection is opened anew from the
    /// reloaded `sql_server` (ejabberd keeps existing connections across a reload).
    async fn restart_pool(&self, plan: &Plan) -> Result<(), ControllerError> {
        let expr = format!(
            "H = {h}, case ejabberd_sql_sup:stop(H) of ok -> ok; {{error, not_found}} -> ok; \
             E -> exit({{stop_failed, E}}) end, ejabberd_sql_sup:start(H).",
            h = plan.vhost_literal
        );
        let term = self
            .config
            .node
            .eval(&expr)
            .await
            .map_err(|source| ControllerError::Erl {
                step: Step::RestartPool,
                source,
            })?;
        if term != "ok" {
            return Err(ControllerError::PoolRestart {
                vhost: plan.vhost.clone(),
                detail: term,
            });
        }
        info!(vhost = %plan.vhost, "SQL pool restarted from the reloaded configuration");
        Ok(())
    }

    async fn listen(&self, plan: &Plan) -> Result<Listener, ControllerError> {
        let target = format!("{}:{}", plan.new.host, plan.new.port);
        let unreachable = |e: tokio_postgres::Error| ControllerError::TargetUnreachable {
            vhost: plan.vhost.clone(),
            target: target.clone(),
            detail: with_causes(&e),
        };
        let (tx, notes) = mpsc::unbounded_channel();
        let client = self.connect(&plan.new, Some(tx)).await.map_err(|detail| {
            ControllerError::TargetUnreachable {
                vhost: plan.vhost.clone(),
                target: target.clone(),
                detail,
            }
        })?;
        let channel = format!("ha_probe_{:016x}", rand::random::<u64>());
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(unreachable)?;
        Ok(Listener {
            channel,
            notes,
            _client: client,
        })
    }

    /// Sends the probe through ejabberd's pool until its notification arrives on the target.
    async fn verify(
        &self,
        plan: &Plan,
        listener: &mut Listener,
        token: &str,
        bound: Duration,
    ) -> Result<(), ControllerError> {
        let sql = format!(
            "SELECT pg_notify('{}', '{token}'), txid_current()",
            listener.channel
        );
        let sql = erl::binary_literal(&sql)
            .ok_or_else(|| ControllerError::Invalid(format!("probe statement {sql:?}")))?;
        let expr = format!("ejabberd_sql:sql_query({}, [{sql}]).", plan.vhost_literal);
        let started = Instant::now();
        let deadline = started + bound;
        let mut attempts = 0u32;
        let last = loop {
            attempts += 1;
            // One probe may hang on a pool that cannot connect; the deadline bounds it too.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let probe = tokio::time::timeout(
                remaining.max(Duration::from_millis(200)),
                self.config.node.eval(&expr),
            );
            let outcome = match probe.await {
                Err(_) => "the probe write did not complete".to_owned(),
                Ok(Ok(term)) if term.starts_with("{selected,") => {
                    // Delivery follows the commit at once; a missing one means another server.
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .clamp(Duration::from_millis(200), Duration::from_secs(1));
                    match tokio::time::timeout(wait, listener.wait_for(token)).await {
                        Ok(true) => {
                            info!(vhost = %plan.vhost, attempts, elapsed_ms = started.elapsed().as_millis() as u64, "write through ejabberd landed on the target");
                            return Ok(());
                        }
                        _ => "a write succeeded but did not reach the target: ejabberd still writes elsewhere".to_owned(),
                    }
                }
                Ok(Ok(term)) => term,
                Ok(Err(e)) => e.to_string(),
            };
            if Instant::now() >= deadline {
                break outcome;
            }
            // ejabberd's fresh pool connects asynchronously; retry shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Err(ControllerError::VerifyTimeout {
            vhost: plan.vhost.clone(),
            target: format!("{}:{}", plan.new.host, plan.new.port),
            waited: started.elapsed(),
            last,
        })
    }

    /// Waits for ejabberd's sessions on the old server to end. An unreachable old server has
    /// nothing to check (it is down or cut off).
    async fn check_old_server(&self, plan: &Plan) -> Result<(), ControllerError> {
        let Some(old) = &plan.old else { return Ok(()) };
        let old_name = format!("{}:{}", old.host, old.port);
        let client = match self.connect(old, None).await {
            Ok(client) => client,
            Err(error) => {
                info!(vhost = %plan.vhost, old = %old_name, %error, "old server unreachable, no leftover connection to check");
                return Ok(());
            }
        };
        // Same role, same database, same client address as ours: ejabberd on this host.
        let query = "SELECT count(*) FROM pg_stat_activity WHERE usename = current_user \
                     AND datname = current_database() AND pid <> pg_backend_pid() \
                     AND client_addr IS NOT DISTINCT FROM inet_client_addr()";
        let deadline = Instant::now() + self.config.old_connections_timeout;
        loop {
            // A server that stops answering (frozen, cut off) serves nobody: nothing to wait for.
            let Ok(row) =
                tokio::time::timeout(self.config.db_connect_timeout, client.query_one(query, &[]))
                    .await
            else {
                info!(vhost = %plan.vhost, old = %old_name, "old server stopped answering, no leftover connection to check");
                return Ok(());
            };
            let count: i64 = row
                .map_err(|source| ControllerError::Db {
                    what: "counting sessions on the old server",
                    source,
                })?
                .get(0);
            if count == 0 {
                info!(vhost = %plan.vhost, old = %old_name, "no ejabberd connection left on the old server");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ControllerError::OldConnections {
                    vhost: plan.vhost.clone(),
                    old: old_name,
                    count,
                });
            }
            // Backends exit shortly after ejabberd closes its sockets.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Best effort after a failed switch: put the last good file back and point ejabberd at it.
    async fn restore(&self, path: PathBuf, old_text: String, plans: &[Plan]) {
        if let Err(e) = replace(path, old_text).await {
            warn!(error = %e, "could not restore the last good configuration");
            return;
        }
        if let Err(e) = self.reload().await {
            warn!(error = %e, "reload after restoring the configuration failed");
            return;
        }
        for plan in plans {
            if let Err(e) = self.restart_pool(plan).await {
                warn!(vhost = %plan.vhost, error = %e, "pool restart after restoring the configuration failed");
            }
        }
        info!("last good configuration restored and reloaded");
    }

    /// A session on `params`' server, within `db_connect_timeout` for the whole of it: the TCP
    /// connect and the startup exchange (a frozen server accepts TCP and then never answers).
    /// TLS with the node's certificate when ejabberd uses it. The session's notifications go
    /// to `notes` when given.
    async fn connect(
        &self,
        params: &DbParams,
        notes: Option<mpsc::UnboundedSender<Notification>>,
    ) -> Result<Client, String> {
        let timeout = self.config.db_connect_timeout;
        let mut config = self.db_config(params);
        let session = match &self.sql_tls {
            Some((_, probe)) => {
                let mut rustls = (*probe.current()).clone();
                // The monitor link offers HTTP/2; PostgreSQL 15 negotiates no ALPN.
                rustls.alpn_protocols.clear();
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let connect = config.connect(MakeRustlsConnect::new(rustls));
                tokio::time::timeout(timeout, connect)
                    .await
                    .map(|r| r.map(|(client, connection)| drive(client, connection, notes)))
            }
            None => tokio::time::timeout(timeout, config.connect(NoTls))
                .await
                .map(|r| r.map(|(client, connection)| drive(client, connection, notes))),
        };
        match session {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(with_causes(&e)),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    fn db_config(&self, params: &DbParams) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&params.host)
            .port(params.port)
            .dbname(&params.database)
            .user(&params.username)
            .password(&params.password)
            .application_name("ha-agent-ejabberd")
            .connect_timeout(self.config.db_connect_timeout);
        cfg
    }
}

/// Runs a session's connection in its own task, handing its notifications to `notes` (the
/// receiver is gone once the apply is over: nothing left to tell then), and returns the client.
fn drive<S, T>(
    client: Client,
    mut connection: tokio_postgres::Connection<S, T>,
    notes: Option<mpsc::UnboundedSender<Notification>>,
) -> Client
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let (AsyncMessage::Notification(n), Some(tx)) = (message, &notes) {
                let _ = tx.send(n);
            }
        }
    });
    client
}

/// Whether `node` answers and runs the ejabberd application.
pub(super) async fn node_health(node: &ErlNode) -> Health {
    let expr = "{element(1, init:get_status()), \
                lists:keymember(ejabberd, 1, application:which_applications()), \
                list_to_integer(os:getpid())}.";
    match node.eval(expr).await {
        Ok(status) => Health {
            running: status.starts_with("{started,true,"),
            os_pid: status
                .rsplit(',')
                .next()
                .and_then(|p| p.trim_end_matches('}').parse().ok()),
            status,
        },
        Err(e) => Health {
            running: false,
            status: e.to_string(),
            os_pid: None,
        },
    }
}

impl Listener {
    /// True once a notification with `token` arrives; false if the session ended.
    async fn wait_for(&mut self, token: &str) -> bool {
        while let Some(note) = self.notes.recv().await {
            if note.channel() == self.channel && note.payload() == token {
                return true;
            }
        }
        false
    }
}

/// An error and its causes on one line (tokio-postgres puts the useful part in the causes).
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

async fn replace(path: PathBuf, text: String) -> Result<(), ControllerError> {
    tokio::task::spawn_blocking(move || ha_files::replace_keeping_owner(&path, text.as_bytes()))
        .await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = "hosts:\n  - example.org\nloglevel: info\nsql_type: pgsql\n\
                        sql_server: 127.0.0.1\nsql_port: 5432\nsql_password: 'pw'\n";

    #[test]
    fn an_apply_never_restores_from_the_file_it_repairs() {
        // Unreadable by the agent: only the last good copy is tried.
        let broken = GOOD.replace("'pw'", "'pw");
        assert_eq!(
            sources(Some(&broken), Some(GOOD)),
            vec![(Source::LastGood, GOOD)]
        );
        // Readable edit (ejabberd may still refuse it): tried first, the good copy after.
        let edited = format!("{GOOD}loglevel: not-a-level\n");
        assert_eq!(
            sources(Some(&edited), Some(GOOD)),
            vec![
                (Source::OperatorEdit, edited.as_str()),
                (Source::LastGood, GOOD)
            ]
        );
        assert_eq!(
            sources(Some(GOOD), Some(GOOD)),
            vec![(Source::LastGood, GOOD)]
        );
        assert_eq!(sources(None, Some(GOOD)), vec![(Source::LastGood, GOOD)]);
        // Before any verified apply the file on disk is all there is.
        assert_eq!(sources(Some(GOOD), None), vec![(Source::Disk, GOOD)]);
    }

    #[test]
    fn differences_are_named() {
        let unparsable = Difference::between(&GOOD.replace("'pw'", "'pw"), GOOD);
        assert!(
            matches!(unparsable, Difference::Unparsable(_)),
            "{unparsable}"
        );
        assert_eq!(
            Difference::between(&GOOD.replace("5432", "5999"), GOOD),
            Difference::SqlServer {
                vhost: "(top level)".into(),
                found: "127.0.0.1:5999".into()
            }
        );
        assert_eq!(
            Difference::between(&GOOD.replace("'pw'", "'other'"), GOOD),
            Difference::SqlSettings
        );
        let other = Difference::between(&GOOD.replace("info", "debug"), GOOD);
        assert_eq!(other, Difference::Other);
        assert!(!other.to_string().contains("pw"), "no secret in the text");
    }
}
