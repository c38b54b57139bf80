//! [`PgController`]: the life-cycle steps of one local PostgreSQL 15 server.
//!
//! Invariants: each public step checks where the server is before acting, so repeating a step
//! (after an agent crash, or because the plan asked twice) converges instead of failing or
//! doing damage. The controller is the only writer of the files it manages and the only one
//! that starts or stops its postmaster (except the run loop's fast-shutdown signal when the
//! lease runs out); it is used from one task (`&mut self`). A postmaster that exits without
//! being asked, other than by a clean shutdown (exit 0), counts as a crash; restarts after
//! crashes are limited by [`super::RestartLimit`].

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_proto::types::Lsn;
use nix::sys::signal::Signal;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};
use tracing::{debug, info, warn};

use super::config::{ConnInfo, MANAGED_CONF, PgConfig, RoleSettings, SyncConfig, Upstream};
use super::files::{self, ClusterState, ControlData, DataDirState};
use super::observe::PgObservation;
use super::plan::Action;
use super::process::{Exit, Postmaster, RunAs};
use super::{PgError, config::render_hba, tls};

const INCLUDE_LINE: &str = "include = 'postgresql.ha.conf'";
/// How often a wait on the local server looks again (settings reloaded, WAL receiver gone,
/// promotion done, accepting connections). Each look is one local query; these waits sit in
/// the failover and switchover paths, where every interval is write unavailability.
const POLL: Duration = Duration::from_millis(20);

/// PostgreSQL's three shutdown modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for sessions to end (SIGTERM).
    Smart,
    /// Disconnect sessions, clean shutdown checkpoint (SIGINT).
    Fast,
    /// Abort without checkpoint; crash recovery on the next start (SIGQUIT).
    Immediate,
}

impl StopMode {
    fn signal(self) -> Signal {
        match self {
            StopMode::Smart => Signal::SIGTERM,
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }
}

/// What the controller knows about its postmaster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostmasterState {
    Stopped,
    Running {
        pid: i32,
    },
    /// Exited without being asked and not restarted yet.
    Crashed {
        pid: i32,
        exit: Exit,
    },
}

/// How an old primary came back as a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejoinPath {
    Rewound,
    BaseBackup,
}

/// The result of [`PgController::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    ReplicationStopped {
        received: Option<Lsn>,
        replayed: Option<Lsn>,
    },
    Rejoined(RejoinPath),
    Drained {
        checkpoint: Lsn,
    },
}

/// Owns and drives one local PostgreSQL server.
#[derive(Debug)]
pub struct PgController {
    cfg: PgConfig,
    run_as: RunAs,
    postmaster: Option<Postmaster>,
    /// Set while the controller itself is stopping the postmaster: that exit is not a crash.
    stopping: bool,
    /// The unhandled crash, cleared by a successful start or a deliberate stop.
    crashed: Option<(i32, Exit)>,
    crash_restarts: VecDeque<Instant>,
    /// When the running server last became ready (started or adopted by this controller).
    ready_since: Option<Instant>,
    /// TLS copies were replaced and the running server has not been reloaded since.
    tls_pending: bool,
    /// Why the TLS material was last refused, until it passes again (logged once, reported).
    tls_error: Option<String>,
}

impl PgController {
    /// Validates the configuration, resolves the OS user and adopts a postmaster a previous
    /// agent run left running.
    pub fn new(cfg: PgConfig) -> Result<Self, PgError> {
        cfg.validate()?;
        let run_as = RunAs::resolve(&cfg.os_user)?;
        let postmaster = Postmaster::find_running(&cfg.data_dir).map(|pid| {
            info!(node = %cfg.node, pid = pid.as_raw(), "adopting running postmaster");
            Postmaster::adopt(pid)
        });
        Ok(Self {
            cfg,
            run_as,
            // An adopted server's age is unknown: counted from now.
            ready_since: postmaster.is_some().then(Instant::now),
            postmaster,
            stopping: false,
            crashed: None,
            crash_restarts: VecDeque::new(),
            tls_pending: false,
            tls_error: None,
        })
    }

    pub fn config(&self) -> &PgConfig {
        &self.cfg
    }

    /// The postmaster's PID while it runs.
    pub fn postmaster_pid(&mut self) -> Option<i32> {
        match self.check_postmaster() {
            PostmasterState::Running { pid } => Some(pid),
            PostmasterState::Stopped | PostmasterState::Crashed { .. } => None,
        }
    }

    /// Notices an exit of the postmaster; an exit nobody asked for is logged as a crash once.
    pub fn check_postmaster(&mut self) -> PostmasterState {
        if let Some(pm) = &self.postmaster {
            let pid = pm.pid().as_raw();
            match pm.exit() {
                None => return PostmasterState::Running { pid },
                Some(exit) => {
                    self.postmaster = None;
                    if self.stopping {
                        self.stopping = false;
                    } else if exit == Exit::Code(0) {
                        // A shutdown someone asked for outside this controller: the run
                        // loop's SIGINT when the lease runs out (the lease may be renewed
                        // before the fence step runs), or an operator's `pg_ctl stop`. Not a
                        // crash: counted as one, a primary fenced by a few short partitions
                        // hit the restart limit and stayed down for good (chaos run).
                        info!(node = %self.cfg.node, pid, "postmaster shut down cleanly from outside the agent's steps");
                    } else {
                        warn!(node = %self.cfg.node, pid, ?exit, "postmaster exited unexpectedly");
                        self.crashed = Some((pid, exit));
                    }
                }
            }
        }
        match self.crashed {
            Some((pid, exit)) => PostmasterState::Crashed { pid, exit },
            None => PostmasterState::Stopped,
        }
    }

    /// Waits up to `timeout` for the postmaster to end on its own (a crash), then reports.
    pub async fn wait_postmaster_exit(&mut self, timeout: Duration) -> PostmasterState {
        if let Some(pm) = self.postmaster.as_mut() {
            pm.wait_exit(timeout).await;
        }
        self.check_postmaster()
    }

    /// A session as the superuser over the unix socket.
    pub async fn connect(&self) -> Result<Client, PgError> {
        connect_local(&self.cfg).await
    }

    /// Reads the server (running) or its control file (stopped). First it brings the TLS copies
    /// up to date ([`Self::refresh_tls`]): the agent observes every tick, so a rotated
    /// certificate reaches PostgreSQL within one report interval without a plan step. Material
    /// that fails the checks is refused (see [`Self::tls_error`]) and looked at again next time;
    /// the server keeps its previous material.
    pub async fn observe(&mut self) -> Result<PgObservation, PgError> {
        match self.refresh_tls().await {
            // Refused material: recorded and logged by `install_tls`.
            Ok(_) | Err(PgError::Tls(_)) => {}
            Err(e) => {
                warn!(node = %self.cfg.node, error = %e, "reloading PostgreSQL for new TLS material failed; retried next time");
            }
        }
        let state = self.check_postmaster();
        if files::inspect(&self.cfg.data_dir)? != DataDirState::Initialized {
            return Ok(PgObservation::empty());
        }
        if let PostmasterState::Running { .. } = state {
            let client = self.connect().await?;
            return PgObservation::query(&client).await;
        }
        let control = self.controldata().await?;
        Ok(PgObservation::stopped(
            &control,
            self.standby_signal().exists(),
            self.fenced_marker().exists(),
        ))
    }

    /// Installs the node's TLS files for PostgreSQL when they changed (first install or
    /// rotation) and, when the server runs, reloads it: PostgreSQL re-reads its certificate, key
    /// and CA on reload, and the WAL receiver reads the client files at its next connection.
    /// Returns whether anything changed. Without TLS it does nothing.
    pub async fn refresh_tls(&mut self) -> Result<bool, PgError> {
        self.install_tls()?;
        if !self.tls_pending {
            return Ok(false);
        }
        if let PostmasterState::Running { .. } = self.check_postmaster() {
            self.reload_conf().await?;
            info!(node = %self.cfg.node, "reloaded for new TLS material");
        }
        // A stopped server reads the new files when it starts.
        self.tls_pending = false;
        Ok(true)
    }

    /// Connection parameters for a client tool (`pg_receivewal`, `pg_basebackup`, `pg_rewind`)
    /// to `upstream`, with the TLS files it names installed first (a new standby has no copies
    /// before its first base backup).
    fn client_conn(&mut self, upstream: &Upstream) -> Result<ConnInfo, PgError> {
        self.install_tls()?;
        Ok(self.cfg.conn_to(&upstream.endpoint))
    }

    /// Installs changed TLS copies and remembers that the server must reload for them. Material
    /// that fails the checks (or cannot be copied) is refused: with installed copies (which
    /// passed the checks) the server keeps them and this succeeds, so the steps go on with
    /// the old certificate; the reason is kept for the agent's report ([`Self::tls_error`]) and
    /// logged once while it lasts. Without copies there is nothing to keep: the error.
    fn install_tls(&mut self) -> Result<(), PgError> {
        let (Some(source), Some(installed)) = (&self.cfg.tls, self.cfg.installed_tls()) else {
            return Ok(());
        };
        match tls::install(source, &installed, &self.cfg.node, self.run_as.owner) {
            Ok(changed) => {
                self.tls_pending |= changed;
                if let Some(previous) = self.tls_error.take() {
                    info!(node = %self.cfg.node, %previous, "TLS material usable again");
                }
                Ok(())
            }
            Err(e) => {
                let keep = tls::copies_present(&installed);
                let e = e.to_string();
                if self.tls_error.as_ref() != Some(&e) {
                    let dir = installed.cert.parent().unwrap_or(Path::new("")).display();
                    if keep {
                        warn!(node = %self.cfg.node, %dir, "{e}; keeping the installed copy");
                    } else {
                        warn!(node = %self.cfg.node, %dir, "{e}; nothing installed to keep");
                    }
                    self.tls_error = Some(e.clone());
                }
                if keep { Ok(()) } else { Err(PgError::Tls(e)) }
            }
        }
    }

    /// Why the node's TLS material was last refused (the server keeps its installed copies),
    /// until material passes the checks again. The agent reports it.
    pub fn tls_error(&self) -> Option<&str> {
        self.tls_error.as_deref()
    }

    pub async fn controldata(&self) -> Result<ControlData, PgError> {
        let out = self
            .run_as
            .run_tool(&self.tool("pg_controldata"), [&self.cfg.data_dir])
            .await?;
        ControlData::parse(&out)
    }

    /// Starts the existing data directory and waits until it accepts connections. After a crash
    /// this is a restart, refused once the restart limit is reached.
    pub async fn start(&mut self) -> Result<(), PgError> {
        match self.check_postmaster() {
            PostmasterState::Running { .. } => return Ok(()),
            PostmasterState::Crashed { pid, exit } => {
                let limit = self.cfg.restart_limit;
                let now = Instant::now();
                if let Some(ran) = self.ready_since.map(|t| now.duration_since(t))
                    && ran >= limit.stable_after
                    && !self.crash_restarts.is_empty()
                {
                    info!(node = %self.cfg.node, ran_ms = ran.as_millis(),
                          "server ran stable before this crash: crash count starts afresh");
                    self.crash_restarts.clear();
                }
                self.ready_since = None;
                while self
                    .crash_restarts
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > limit.window)
                {
                    self.crash_restarts.pop_front();
                }
                if self.crash_restarts.len() >= limit.max_restarts as usize {
                    let next = self
                        .crash_restarts
                        .back()
                        .map_or(now, |last| *last + limit.retry_after);
                    if now < next {
                        // Logged once by the run loop (its error changes only with the count).
                        debug!(node = %self.cfg.node, pid, ?exit,
                               retry_in_ms = (next - now).as_millis(), "restart limit reached");
                        return Err(PgError::RestartLimit {
                            restarts: self.crash_restarts.len(),
                            window: limit.window,
                            retry_after: limit.retry_after,
                        });
                    }
                }
                self.crash_restarts.push_back(now);
                info!(node = %self.cfg.node, pid, ?exit, restarts = self.crash_restarts.len(),
                      "restarting after crash");
            }
            PostmasterState::Stopped => {
                if let Some(pid) = Postmaster::find_running(&self.cfg.data_dir) {
                    info!(node = %self.cfg.node, pid = pid.as_raw(), "adopting running postmaster");
                    self.postmaster = Some(Postmaster::adopt(pid));
                    self.wait_ready(Instant::now() + self.cfg.start_timeout)
                        .await?;
                    self.ready_since = Some(Instant::now());
                    return Ok(());
                }
            }
        }
        // Not `inspect`: bootstrap starts the server before it removes its marker.
        if !files::has_cluster(&self.cfg.data_dir) {
            return Err(PgError::NoData);
        }
        self.ensure_socket_dir()?;
        let deadline = Instant::now() + self.cfg.start_timeout;
        loop {
            let log_offset = std::fs::metadata(&self.cfg.log_file).map_or(0, |m| m.len());
            let pm = Postmaster::spawn(
                &self.run_as,
                &self.cfg.bin_dir,
                &self.cfg.data_dir,
                &self.cfg.log_file,
            )?;
            info!(node = %self.cfg.node, pid = pm.pid().as_raw(), "postmaster started");
            self.postmaster = Some(pm);
            self.stopping = false;
            match self.wait_ready(deadline).await {
                Ok(()) => {
                    self.crashed = None;
                    self.ready_since = Some(Instant::now());
                    return Ok(());
                }
                // Children of a killed postmaster may still hold its shared memory for a moment.
                Err(PgError::Start { reason })
                    if Instant::now() < deadline
                        && self
                            .log_since(log_offset)
                            .contains("pre-existing shared memory") =>
                {
                    debug!(reason, "old shared memory still attached; retrying start");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let text = std::fs::read(&self.cfg.log_file).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(text.len());
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    async fn wait_ready(&mut self, deadline: Instant) -> Result<(), PgError> {
        loop {
            let exited = self.postmaster.as_ref().and_then(Postmaster::exit);
            if let Some(exit) = exited {
                self.postmaster = None;
                return Err(PgError::Start {
                    reason: format!(
                        "postmaster exited with {exit:?}; see {}",
                        self.cfg.log_file.display()
                    ),
                });
            }
            match self.connect().await {
                Ok(client) if client.simple_query("SELECT 1").await.is_ok() => {
                    info!(node = %self.cfg.node, "accepting connections");
                    return Ok(());
                }
                Ok(_) | Err(_) if Instant::now() >= deadline => {
                    return Err(PgError::Timeout {
                        what: "accepting connections",
                        timeout: self.cfg.start_timeout,
                    });
                }
                Ok(_) | Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Stops the server; a mode that does not finish within `stop_timeout` escalates to
    /// immediate. Stopping a stopped server succeeds.
    pub async fn stop(&mut self, mode: StopMode) -> Result<(), PgError> {
        self.check_postmaster();
        self.crashed = None;
        if self.postmaster.is_none()
            && let Some(pid) = Postmaster::find_running(&self.cfg.data_dir)
        {
            self.postmaster = Some(Postmaster::adopt(pid));
        }
        let timeout = self.cfg.stop_timeout;
        let Some(pm) = self.postmaster.as_mut() else {
            return Ok(());
        };
        self.stopping = true;
        let pid = pm.pid().as_raw();
        info!(node = %self.cfg.node, pid, ?mode, "stopping postmaster");
        pm.signal(mode.signal())?;
        if pm.wait_exit(timeout).await.is_none() {
            if mode == StopMode::Immediate {
                return Err(PgError::StopTimeout(timeout));
            }
            warn!(node = %self.cfg.node, pid, ?mode, "stop timed out; escalating to immediate");
            pm.signal(Signal::SIGQUIT)?;
            if pm.wait_exit(timeout).await.is_none() {
                return Err(PgError::StopTimeout(timeout));
            }
        }
        self.postmaster = None;
        self.stopping = false;
        info!(node = %self.cfg.node, pid, "postmaster stopped");
        Ok(())
    }

    /// New primary: initdb (when there is no cluster yet), primary settings, start, and the
    /// replication role with the grants `pg_rewind` needs on a source. The incomplete marker
    /// stays until the role exists, so a bootstrap cut short anywhere is redone from scratch
    /// (a new group holds no data worth keeping before it is bootstrapped).
    pub async fn bootstrap(&mut self, sync: &SyncConfig) -> Result<(), PgError> {
        let marker = files::incomplete_marker(&self.cfg.data_dir);
        if files::inspect(&self.cfg.data_dir)? != DataDirState::Initialized {
            self.stop(StopMode::Immediate).await?;
            files::write_atomic(&marker, "bootstrap\n", self.run_as.owner)?;
            files::reset_dir(&self.cfg.data_dir, self.run_as.owner)?;
            let mut args: Vec<OsString> = vec!["-D".into(), self.cfg.data_dir.clone().into()];
            for a in [
                "-U",
                &self.cfg.superuser,
                "--data-checksums",
                // Never live: the agent writes its own pg_hba.conf before the first start.
                "--auth-local=peer",
                "--auth-host=reject",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ] {
                args.push(a.into());
            }
            self.run_as.run_tool(&self.tool("initdb"), args).await?;
            info!(node = %self.cfg.node, "initdb done");
        }
        self.configure(&RoleSettings::Primary(sync.clone())).await?;
        self.start().await?;
        let client = self.connect().await?;
        let user = &self.cfg.replication.user;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[user])
            .await
            .map_err(|e| PgError::Sql {
                what: "looking up the replication role",
                source: e,
            })?
            .is_some();
        let role = quote_ident(user);
        let mut sql = String::new();
        if !exists {
            sql.push_str(&format!("CREATE ROLE {role} LOGIN REPLICATION;"));
        }
        sql.push_str(&format!(
            "GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO {role};\
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO {role};\
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO {role};\
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {role};"
        ));
        client.batch_execute(&sql).await.map_err(|e| PgError::Sql {
            what: "creating the replication role",
            source: e,
        })?;
        files::remove_optional(&marker)?;
        info!(node = %self.cfg.node, role = %user, "primary bootstrapped");
        Ok(())
    }

    /// New standby: a fresh base backup from `upstream` unless a complete cluster is already
    /// here (an interrupted copy is wiped and redone), then stream from it.
    pub async fn join_standby(&mut self, upstream: &Upstream) -> Result<(), PgError> {
        if files::inspect(&self.cfg.data_dir)? != DataDirState::Initialized {
            self.stop(StopMode::Immediate).await?;
            self.base_backup(upstream).await?;
        }
        self.start_standby(Some(upstream)).await
    }

    /// Writes standby settings (streaming from `upstream`, or not at all) and starts.
    pub async fn start_standby(&mut self, upstream: Option<&Upstream>) -> Result<(), PgError> {
        if let Some(up) = upstream {
            self.ensure_slot(up).await?;
        }
        self.configure(&RoleSettings::Standby(upstream.cloned()))
            .await?;
        self.start().await
    }

    async fn base_backup(&mut self, upstream: &Upstream) -> Result<(), PgError> {
        let marker = files::incomplete_marker(&self.cfg.data_dir);
        files::write_atomic(&marker, "base backup\n", self.run_as.owner)?;
        files::reset_dir(&self.cfg.data_dir, self.run_as.owner)?;
        self.ensure_slot(upstream).await?;
        info!(node = %self.cfg.node, upstream = %upstream.node, "base backup started");
        let conn = self.client_conn(upstream)?;
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.cfg.data_dir.clone().into(),
            "-d".into(),
            conn.render().into(),
            "-X".into(),
            "stream".into(),
            "--checkpoint=fast".into(),
            "-S".into(),
            self.cfg.node.slot_name().into(),
            "--no-password".into(),
        ];
        self.run_as
            .run_tool(&self.tool("pg_basebackup"), args)
            .await?;
        files::sync_dir(&self.cfg.data_dir)?;
        // The copy carries the upstream's primary settings: it only counts as complete once it
        // is configured as a standby, or a crash here would leave what looks like a primary.
        self.configure(&RoleSettings::Standby(Some(upstream.clone())))
            .await?;
        files::remove_optional(&marker)?;
        info!(node = %self.cfg.node, upstream = %upstream.node, "base backup complete");
        Ok(())
    }

    /// Creates this node's physical slot on `upstream` unless it exists (over a replication
    /// connection, so the replication role needs no database access).
    async fn ensure_slot(&mut self, upstream: &Upstream) -> Result<(), PgError> {
        let conn = self.client_conn(upstream)?;
        let args: Vec<OsString> = vec![
            "--create-slot".into(),
            "--if-not-exists".into(),
            "-S".into(),
            self.cfg.node.slot_name().into(),
            "-d".into(),
            conn.render().into(),
            "--no-password".into(),
        ];
        self.run_as
            .run_tool(&self.tool("pg_receivewal"), args)
            .await?;
        debug!(node = %self.cfg.node, upstream = %upstream.node, "replication slot present");
        Ok(())
    }

    /// Writes the managed files for `role` and, when running, reloads and waits until the
    /// server uses them. Nothing is rewritten or reloaded when nothing changes.
    pub async fn configure(&mut self, role: &RoleSettings) -> Result<(), PgError> {
        // Before the files that name the copies, so PostgreSQL never reads a missing file.
        self.install_tls()?;
        let owner = self.run_as.owner;
        let dir = &self.cfg.data_dir;
        let mut changed = false;
        let mut put = |name: &str, text: &str| -> Result<(), PgError> {
            let path = dir.join(name);
            if files::read_optional(&path)?.as_deref() != Some(text) {
                files::write_atomic(&path, text, owner)?;
                changed = true;
            }
            Ok(())
        };
        put(MANAGED_CONF, &self.cfg.render_managed(role))?;
        put("pg_hba.conf", &render_hba(&self.cfg.hba_rules()))?;
        put("pg_ident.conf", &self.cfg.render_ident())?;
        let conf_path = dir.join("postgresql.conf");
        let conf = files::read_optional(&conf_path)?.ok_or(PgError::NoData)?;
        if !conf.lines().any(|l| l.trim() == INCLUDE_LINE) {
            let mut text = conf;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!(
                "# Added by ha-agent: its managed settings.\n{INCLUDE_LINE}\n"
            ));
            files::write_atomic(&conf_path, &text, owner)?;
            changed = true;
        }
        match role {
            RoleSettings::Standby(_) => {
                if !self.standby_signal().exists() {
                    files::write_atomic(&self.standby_signal(), "", owner)?;
                }
            }
            // A running standby leaves recovery only by promotion, which removes the file.
            RoleSettings::Primary(_) => {
                if self.check_postmaster() == PostmasterState::Stopped {
                    files::remove_optional(&self.standby_signal())?;
                }
            }
        }
        if changed || self.tls_pending {
            info!(node = %self.cfg.node, ?role, tls = self.tls_pending, "managed settings written");
            if let PostmasterState::Running { .. } = self.check_postmaster() {
                self.reload(role).await?;
            }
            // Reloaded, or a stopped server reads everything when it starts.
            self.tls_pending = false;
        }
        Ok(())
    }

    /// `pg_reload_conf()`: the postmaster re-reads its files (configuration, hba, ident, TLS).
    async fn reload_conf(&self) -> Result<(), PgError> {
        let client = self.connect().await?;
        client
            .simple_query("SELECT pg_reload_conf()")
            .await
            .map_err(|e| PgError::Sql {
                what: "reloading",
                source: e,
            })?;
        Ok(())
    }

    /// Reloads, then waits until new sessions see the role's replication settings.
    async fn reload(&self, role: &RoleSettings) -> Result<(), PgError> {
        self.reload_conf().await?;
        let (name, want) = match role {
            RoleSettings::Primary(sync) => ("synchronous_standby_names", sync.standby_names()),
            RoleSettings::Standby(up) => (
                "primary_conninfo",
                up.as_ref()
                    .map(|u| self.cfg.primary_conninfo(u).render())
                    .unwrap_or_default(),
            ),
        };
        self.poll("the reloaded settings", Duration::from_secs(10), || async {
            let client = self.connect().await?;
            let row = client
                .query_one("SELECT current_setting($1)", &[&name])
                .await
                .map_err(|e| PgError::Sql {
                    what: "reading a setting",
                    source: e,
                })?;
            Ok(row.get::<_, String>(0) == want)
        })
        .await
    }

    async fn poll<F, Fut>(
        &self,
        what: &'static str,
        timeout: Duration,
        mut check: F,
    ) -> Result<(), PgError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool, PgError>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if check().await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PgError::Timeout { what, timeout });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn require_running(&mut self, standby: bool) -> Result<Client, PgError> {
        let expected = if standby { "standby" } else { "primary" };
        let PostmasterState::Running { .. } = self.check_postmaster() else {
            return Err(PgError::WrongRole { expected });
        };
        let client = self.connect().await?;
        if in_recovery(&client, "checking recovery").await? == standby {
            Ok(client)
        } else {
            Err(PgError::WrongRole { expected })
        }
    }

    /// Sets the synchronous standbys of a running primary (empty: asynchronous).
    pub async fn set_synchronous(&mut self, sync: &SyncConfig) -> Result<(), PgError> {
        self.require_running(false).await?;
        self.configure(&RoleSettings::Primary(sync.clone())).await?;
        info!(node = %self.cfg.node, names = %sync.standby_names(), "synchronous standbys set");
        Ok(())
    }

    /// A running standby streams from `upstream` from now on.
    pub async fn follow(&mut self, upstream: &Upstream) -> Result<(), PgError> {
        self.require_running(true).await?;
        self.ensure_slot(upstream).await?;
        self.configure(&RoleSettings::Standby(Some(upstream.clone())))
            .await?;
        info!(node = %self.cfg.node, upstream = %upstream.node, "following");
        Ok(())
    }

    /// Cuts the stream of a running standby, waits until its WAL receiver is gone, and returns
    /// the last received and replayed LSN.
    pub async fn stop_replication(&mut self) -> Result<Outcome, PgError> {
        self.require_running(true).await?;
        self.configure(&RoleSettings::Standby(None)).await?;
        self.poll(
            "the WAL receiver to stop",
            Duration::from_secs(15),
            || async {
                let client = self.connect().await?;
                let rows = client
                    .query("SELECT 1 FROM pg_stat_wal_receiver", &[])
                    .await
                    .map_err(|e| PgError::Sql {
                        what: "reading pg_stat_wal_receiver",
                        source: e,
                    })?;
                Ok(rows.is_empty())
            },
        )
        .await?;
        let obs = PgObservation::query(&self.connect().await?).await?;
        info!(node = %self.cfg.node, received = ?obs.flush_lsn, replayed = ?obs.replay_lsn,
              "replication stopped");
        Ok(Outcome::ReplicationStopped {
            received: obs.flush_lsn,
            replayed: obs.replay_lsn,
        })
    }

    /// Promotes a running standby and checkpoints, so the control file (read by `pg_rewind` on
    /// the old primary) shows the new timeline at once.
    pub async fn promote(&mut self) -> Result<(), PgError> {
        let client = self.require_running(true).await?;
        // `pg_promote(wait => true)` looks for the end of recovery only every 100 ms; the
        // writers wait for this step, so it is polled here more often.
        let signalled: bool = client
            .query_one("SELECT pg_promote(wait => false)", &[])
            .await
            .map_err(|e| PgError::Sql {
                what: "promoting",
                source: e,
            })?
            .get(0);
        if !signalled {
            return Err(PgError::PromoteNotSignalled);
        }
        self.poll("promotion", Duration::from_secs(60), || async {
            Ok(!in_recovery(&client, "waiting for the promotion").await?)
        })
        .await?;
        client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(|e| PgError::Sql {
                what: "checkpoint after promotion",
                source: e,
            })?;
        self.configure(&RoleSettings::Primary(SyncConfig::default()))
            .await?;
        files::remove_optional(&self.fenced_marker())?;
        info!(node = %self.cfg.node, "promoted");
        Ok(())
    }

    /// Stops the server fast and leaves `standby.signal`, so a later start (by anyone) comes up
    /// read-only. A fenced primary is also marked (`ha.fenced`), so that even after such a start
    /// it is still known as a former primary that must be rewound before it can stream.
    /// Idempotent.
    pub async fn fence(&mut self) -> Result<(), PgError> {
        self.stop(StopMode::Fast).await?;
        if files::inspect(&self.cfg.data_dir)? == DataDirState::Initialized {
            if matches!(
                self.controldata().await?.state,
                ClusterState::ShutDown | ClusterState::InProduction
            ) {
                files::write_atomic(&self.fenced_marker(), "", self.run_as.owner)?;
            }
            self.configure(&RoleSettings::Standby(None)).await?;
        }
        info!(node = %self.cfg.node, "fenced");
        Ok(())
    }

    /// Brings a former primary back as a standby of `upstream`: `pg_rewind` from it, or a fresh
    /// base backup when rewinding is impossible.
    pub async fn rejoin(&mut self, upstream: &Upstream) -> Result<RejoinPath, PgError> {
        self.stop(StopMode::Fast).await?;
        // A `backup_label` means a base backup that never finished its recovery (its first
        // start failed, or the agent died before it). pg_rewind would run crash recovery on it
        // in single-user mode, which ends recovery and writes WAL of its own on the timeline
        // it shares with the primary: a standby that can never stream again. It is replaced.
        let unfinished_backup = self.cfg.data_dir.join("backup_label").exists();
        if unfinished_backup {
            warn!(node = %self.cfg.node, upstream = %upstream.node,
                  "the data directory is an unfinished base backup; taking a fresh one");
        }
        let path = if files::inspect(&self.cfg.data_dir)? == DataDirState::Initialized
            && !unfinished_backup
        {
            // pg_rewind may run single-user crash recovery first, which standby.signal forbids.
            files::remove_optional(&self.standby_signal())?;
            match self.rewind(upstream).await {
                Ok(()) => RejoinPath::Rewound,
                Err(e @ PgError::UpstreamNotPromoted { .. }) => {
                    // Nothing was changed: read-only again, and the step is retried.
                    self.configure(&RoleSettings::Standby(None)).await?;
                    return Err(e);
                }
                Err(e) => {
                    warn!(node = %self.cfg.node, upstream = %upstream.node, error = %e,
                          "rewind impossible; taking a fresh base backup");
                    self.base_backup(upstream).await?;
                    RejoinPath::BaseBackup
                }
            }
        } else {
            self.base_backup(upstream).await?;
            RejoinPath::BaseBackup
        };
        files::remove_optional(&self.fenced_marker())?;
        self.start_standby(Some(upstream)).await?;
        info!(node = %self.cfg.node, upstream = %upstream.node, ?path, "rejoined as standby");
        Ok(path)
    }

    async fn rewind(&mut self, upstream: &Upstream) -> Result<(), PgError> {
        let source = ConnInfo {
            dbname: Some("postgres".into()),
            ..self.client_conn(upstream)?
        };
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.cfg.data_dir.clone().into(),
            format!("--source-server={}", source.render()).into(),
        ];
        let (out, messages) = self
            .run_as
            .run_tool_with_messages(&self.tool("pg_rewind"), args)
            .await?;
        info!(node = %self.cfg.node, upstream = %upstream.node, output = out.trim(),
              messages = messages.trim(), "pg_rewind done");
        // "No rewind required" because the source is still on this former primary's timeline
        // means the source has not promoted yet (or has not checkpointed since, so its control
        // file still names the old timeline). Streaming from it now would follow the old
        // timeline, and once it promotes, a timeline that forked before this node's own WAL
        // end: a standby stuck for good. The rejoin waits instead (found by the chaos test:
        // the monitor orders the rejoin as it orders the promotion).
        if messages.contains("on the same timeline") && self.fenced_marker().exists() {
            return Err(PgError::UpstreamNotPromoted {
                upstream: upstream.node.to_string(),
            });
        }
        Ok(())
    }

    /// Switchover step: clean fast stop, returning the final checkpoint LSN.
    pub async fn drain(&mut self) -> Result<Lsn, PgError> {
        self.stop(StopMode::Fast).await?;
        let control = self.controldata().await?;
        if control.state != ClusterState::ShutDown
            && control.state != ClusterState::ShutDownInRecovery
        {
            return Err(PgError::NotClean(control.state));
        }
        info!(node = %self.cfg.node, checkpoint = %control.checkpoint_lsn, "drained");
        Ok(control.checkpoint_lsn)
    }

    /// Performs one planned step.
    pub async fn apply(&mut self, action: &Action) -> Result<Outcome, PgError> {
        info!(node = %self.cfg.node, ?action, "applying");
        match action {
            Action::Nothing => {}
            Action::Bootstrap(sync) => self.bootstrap(sync).await?,
            Action::Start => self.start().await?,
            Action::JoinStandby(up) => self.join_standby(up).await?,
            Action::StartStandby(up) => self.start_standby(up.as_ref()).await?,
            Action::Follow(up) => self.follow(up).await?,
            Action::StopReplication => return self.stop_replication().await,
            Action::Promote => self.promote().await?,
            Action::SetSynchronous(sync) => self.set_synchronous(sync).await?,
            Action::Fence => self.fence().await?,
            Action::Rejoin(up) => return Ok(Outcome::Rejoined(self.rejoin(up).await?)),
            Action::Drain => {
                return Ok(Outcome::Drained {
                    checkpoint: self.drain().await?,
                });
            }
            Action::Stop => self.stop(StopMode::Fast).await?,
            Action::Refuse(reason) => return Err(PgError::Refused(reason)),
        }
        Ok(Outcome::Done)
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.cfg.bin_dir.join(name)
    }

    fn standby_signal(&self) -> PathBuf {
        self.cfg.data_dir.join("standby.signal")
    }

    fn fenced_marker(&self) -> PathBuf {
        self.cfg.data_dir.join("ha.fenced")
    }

    /// The socket directory must exist and be writable by PostgreSQL; an existing one (such as
    /// a shared /run/postgresql) is left as it is.
    fn ensure_socket_dir(&self) -> Result<(), PgError> {
        if !self.cfg.socket_dir.exists() {
            files::prepare_dir(&self.cfg.socket_dir, self.run_as.owner)?;
        }
        Ok(())
    }
}

/// Whether the server is in recovery (a standby, or a primary still being promoted).
async fn in_recovery(client: &Client, what: &'static str) -> Result<bool, PgError> {
    Ok(client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(|e| PgError::Sql { what, source: e })?
        .get(0))
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A session as the superuser over the unix socket of the server `cfg` describes.
pub async fn connect_local(cfg: &PgConfig) -> Result<Client, PgError> {
    let mut c = tokio_postgres::Config::new();
    c.host_path(&cfg.socket_dir)
        .port(cfg.port)
        .user(&cfg.superuser)
        .dbname("postgres")
        .application_name("ha-agent")
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = c.connect(NoTls).await.map_err(PgError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "agent session ended");
        }
    });
    Ok(client)
}
