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
//! Invariants:
//! - The file on disk is always the last one that was verified: a failure before the switch
//!   leaves it untouched, a failure during the switch restores it (and points ejabberd back).
//! - An epoch older than the applied one is refused; the same epoch with another target too.
//! - The SQL password is read from the managed file and never logged.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use ha_proto::types::{Endpoint, Epoch};
use tokio::sync::{Mutex, mpsc};
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use tracing::{info, warn};

use super::config::{self, ConfigError, DbParams, SqlSettings, SqlTarget};
use super::erl::{self, ErlError, ErlNode};
use super::files::{self, WriteError};

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
    Write(#[from] WriteError),
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
    /// False when the file already pointed at the target (ejabberd is still re-pointed).
    pub file_changed: bool,
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
    /// `{InitStatus,EjabberdRunning}` as printed by the node, or why it did not answer.
    pub status: String,
}

/// Points one ejabberd node at the current primary. Applies are serialized.
#[derive(Debug)]
pub struct EjabberdController {
    config: ControllerConfig,
    applied: Mutex<Option<Applied>>,
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
            applied: Mutex::new(applied),
        })
    }

    pub async fn applied(&self) -> Option<Applied> {
        self.applied.lock().await.clone()
    }

    /// Moves ejabberd to `target` for `epoch` and verifies it; see the module docs.
    pub async fn apply(
        &self,
        target: &Endpoint,
        epoch: Epoch,
    ) -> Result<ApplyReport, ControllerError> {
        let mut applied = self.applied.lock().await;
        if let Some(prev) = applied.as_ref() {
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
        info!(epoch = %epoch, target = %target, "applying ejabberd SQL target");
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
        let old_text =
            tokio::fs::read_to_string(path)
                .await
                .map_err(|source| ControllerError::Read {
                    path: path.clone(),
                    source,
                })?;
        let config_err = |source| ControllerError::Config {
            path: path.clone(),
            source,
        };
        let sql_target = SqlTarget::new(target.host.clone(), target.port).map_err(config_err)?;
        let rewritten = config::rewrite(&old_text, &sql_target).map_err(config_err)?;
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
        if rewritten.changed {
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
                warn!(epoch = %epoch, target = %target, error = %err, "apply failed, restoring the last good configuration");
                if rewritten.changed {
                    self.restore(path.clone(), old_text, &plans).await;
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

        *applied = Some(Applied {
            epoch,
            target: target.clone(),
            at: SystemTime::now(),
        });
        let report = ApplyReport {
            epoch,
            target: target.clone(),
            file_changed: rewritten.changed,
            steps,
            first_write,
            total: start.elapsed(),
        };
        info!(
            epoch = %epoch,
            target = %target,
            file_changed = report.file_changed,
            first_write_ms = report.first_write.as_millis() as u64,
            total_ms = report.total.as_millis() as u64,
            "ejabberd moved to the new primary and verified"
        );
        Ok(report)
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
            self.verify(plan, listener, token).await?;
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
        let (client, mut connection) =
            self.connect(&plan.new)
                .await
                .map_err(|detail| ControllerError::TargetUnreachable {
                    vhost: plan.vhost.clone(),
                    target: target.clone(),
                    detail,
                })?;
        let (tx, notes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    // The receiver is gone once the apply is over; nothing left to tell.
                    let _ = tx.send(n);
                }
            }
        });
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
    ) -> Result<(), ControllerError> {
        let sql = format!(
            "SELECT pg_notify('{}', '{token}'), txid_current()",
            listener.channel
        );
        let sql = erl::binary_literal(&sql)
            .ok_or_else(|| ControllerError::Invalid(format!("probe statement {sql:?}")))?;
        let expr = format!("ejabberd_sql:sql_query({}, [{sql}]).", plan.vhost_literal);
        let started = Instant::now();
        let deadline = started + self.config.verify_timeout;
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
        let client = match self.connect(old).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
            }
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
    async fn connect(
        &self,
        params: &DbParams,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        String,
    > {
        let timeout = self.config.db_connect_timeout;
        match tokio::time::timeout(timeout, self.db_config(params).connect(NoTls)).await {
            Ok(Ok(session)) => Ok(session),
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

/// Whether `node` answers and runs the ejabberd application.
pub(super) async fn node_health(node: &ErlNode) -> Health {
    let expr = "{element(1, init:get_status()), \
                lists:keymember(ejabberd, 1, application:which_applications())}.";
    match node.eval(expr).await {
        Ok(status) => Health {
            running: status == "{started,true}",
            status,
        },
        Err(e) => Health {
            running: false,
            status: e.to_string(),
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
    tokio::task::spawn_blocking(move || files::replace_file(&path, text.as_bytes())).await??;
    Ok(())
}
