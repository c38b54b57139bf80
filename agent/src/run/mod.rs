//! The agent daemon: join once, then the reconcile loop (report, take the goal, converge one
//! step at a time) until shutdown.
//!
//! Invariants:
//! - a goal with an epoch lower than the persisted one is refused (logged and reported); a
//!   higher epoch is persisted before the goal is acted upon;
//! - while the goal is writable, PostgreSQL is fenced (fast stop at once, then the controller's
//!   fence step) as soon as `lease` has passed since the send time of the last answered report,
//!   and stays fenced until a report is answered again;
//! - reporting never waits for a controller step: steps run in the worker task and the loop
//!   reports the step in progress meanwhile;
//! - every transition (goal, reached goal, step, error, lease, monitor reachability) is logged
//!   once at info or warn, with its reason.

pub mod commit_check;
pub mod drill;
pub mod ejabberd;
pub mod health;
pub mod lease;
pub mod monitors;
pub mod renew;
pub mod state;
pub mod vouch;
pub mod worker;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ha_proto::convert::Goal;
use ha_proto::types::{Endpoint, GoalState, NodeKind};
use ha_proto::{NodeId, v1};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{debug, error, info, warn};

use crate::config::{self, AgentConfig, ConfigError, PostgresRole, RoleConfig};
use crate::pg::{Action, PgController, PgError, StopMode};
use lease::{Lease, LeaseRecord};
use monitors::{MonitorLink, Monitors};
use state::{AgentState, EpochCheck, StateError, StateFile};
use vouch::{VouchRound, Vouchers, Vouching};
use worker::{Job, WorkerEvent};

/// Pause between attempts when no monitor answers (join, goal stream).
const RETRY: Duration = Duration::from_millis(300);
/// How often the agent's certificate files are checked for changes (SIGHUP reloads at once).
const TLS_RELOAD_POLL: Duration = Duration::from_secs(5);
/// How long shutdown waits for a controller step in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// The shortest staleness bound of the health endpoints (otherwise three report intervals): an
/// observation or loop iteration older than that counts as unknown.
const HEALTH_STALE_MIN: Duration = Duration::from_secs(2);

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("agent state: {0}")]
    State(#[from] StateError),
    #[error("PostgreSQL: {0}")]
    Pg(#[from] PgError),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("the node has not joined yet and no join_token_file is configured")]
    NoToken,
    #[error("the monitors refused the join: {0}")]
    JoinRefused(String),
    #[error("the PostgreSQL worker task ended unexpectedly")]
    WorkerGone,
    #[error("ejabberd: {0}")]
    Applied(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("agent port: {0}")]
    AgentPort(String),
    /// The agent's own certificate failed its check at start and no checked copy was there to
    /// use instead: a configuration error (exit 64).
    #[error("TLS: {0}")]
    Certificate(String),
}

fn tls_error(e: impl std::fmt::Display) -> RunError {
    RunError::Tls(e.to_string())
}

/// Runs the agent until `shutdown` is cancelled: joins once, then drives its role. PostgreSQL
/// is left running at the end unless the config says `stop_postgres_on_shutdown`; ejabberd
/// always keeps running with its last target.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let state_file = StateFile::new(&config.state_dir);
    let mut state = state_file.load()?;
    info!(node = %config.node, epoch = %state.highest_epoch, joined = state.joined, "agent starting");
    if config.tls.is_none() {
        warn!(node = %config.node, "DEV MODE: plaintext gRPC to the monitors and plaintext replication; never use this in production");
    }
    // A node without its certificate yet must join (with a CSR) before it can open a
    // certificate-authenticated link.
    let needs_certificate = config.tls.as_ref().is_some_and(|t| !t.cert.exists());
    if !state.joined || needs_certificate {
        tokio::select! {
            r = join(&config) => r?,
            () = shutdown.cancelled() => return Ok(()),
        }
        state.joined = true;
        state_file.store(&state)?;
    }
    let link_tls = match &config.tls {
        Some(files) => {
            renew::recover(files, &own_identity(&config)?)
                .map_err(|e| RunError::Certificate(format!("finishing a renewal: {e}")))?;
            let tls = Arc::new(own_client_tls(&config, files)?);
            let watcher = ha_pki::ReloadWatcher::new(
                vec![tls.clone() as Arc<dyn ha_pki::Reload>],
                TLS_RELOAD_POLL,
            )
            .map_err(tls_error)?;
            tokio::spawn(watcher.run(shutdown.clone().cancelled_owned()));
            Some(tls)
        }
        None => None,
    };
    let monitors = Monitors::new(
        config.monitors.clone(),
        config.rpc_timeout,
        link_tls.clone(),
    );
    if let (Some(files), Some(tls)) = (&config.tls, &link_tls) {
        tokio::spawn(renew::run(
            config.node.clone(),
            files.clone(),
            monitors.clone(),
            tls.clone(),
            shutdown.child_token(),
        ));
    }
    match &config.role {
        RoleConfig::Postgres(role) => {
            let failsafe = match link_tls {
                Some(tls) => Some(agent_port(&config, tls, &shutdown).await?),
                None => None,
            };
            run_postgres(
                &config, role, state, state_file, monitors, failsafe, shutdown,
            )
            .await
        }
        RoleConfig::Ejabberd(role) => {
            let sql_tls = match (&role.controller.sql_tls_dir, &config.tls, link_tls) {
                (Some(dir), Some(source), Some(probe)) => {
                    Some((ejabberd_sql_tls(dir, source, &config)?, probe))
                }
                _ => None,
            };
            ejabberd::run(
                &config, role, sql_tls, state, state_file, monitors, shutdown,
            )
            .await
        }
    }
}

/// The agent's client TLS for the monitors, checked like the copies for PostgreSQL (chain to the
/// CA bundle, validity, this node's name and role: [`ha_pki::ClientTls::load_checked`], also at
/// every reload). A certificate that fails at start is not presented: a PostgreSQL agent uses
/// the copies it installed for PostgreSQL instead (they passed the same checks; the reload
/// watcher then follows them, so the agent's own files reach the link once they pass and are
/// installed); without such copies the agent stops with the reason (exit 64).
fn own_client_tls(
    config: &AgentConfig,
    files: &ha_pki::TlsFiles,
) -> Result<ha_pki::ClientTls, RunError> {
    let me = own_identity(config)?;
    let refused = match ha_pki::ClientTls::load_checked(files.clone(), me.clone()) {
        Ok(tls) => return Ok(tls),
        Err(e) => e.to_string(),
    };
    let installed = match &config.role {
        RoleConfig::Postgres(pg) => pg.pg_config(Some(files)).installed_tls(),
        RoleConfig::Ejabberd(_) => None,
    };
    // Without a usable copy the one line is `main`'s: the reason and exit 64.
    let Some(installed) = installed.filter(crate::pg::tls_copies_present) else {
        return Err(RunError::Certificate(refused));
    };
    match ha_pki::ClientTls::load_checked(installed.clone(), me) {
        Ok(tls) => {
            warn!(node = %config.node, cert = %installed.cert.display(),
                  "{refused}; using the copy installed for PostgreSQL for the monitors instead");
            Ok(tls)
        }
        Err(e) => Err(RunError::Certificate(format!(
            "{refused}; the copy installed for PostgreSQL fails too: {e}"
        ))),
    }
}

/// The identity this node's certificate must carry.
fn own_identity(config: &AgentConfig) -> Result<ha_pki::PeerIdentity, RunError> {
    let role = match config.role.kind() {
        NodeKind::Postgres => ha_pki::Role::Postgres,
        NodeKind::Ejabberd => ha_pki::Role::Ejabberd,
    };
    ha_pki::PeerIdentity::new(role, config.node.as_str())
        .map_err(|e| RunError::Certificate(format!("node name {}: {e}", config.node)))
}

/// Where and from what the agent keeps ejabberd's copies of the node's certificate.
fn ejabberd_sql_tls(
    dir: &std::path::Path,
    source: &ha_pki::TlsFiles,
    config: &AgentConfig,
) -> Result<crate::ejabberd::sql_tls::SqlTls, RunError> {
    Ok(crate::ejabberd::sql_tls::SqlTls {
        dir: dir.to_owned(),
        source: source.clone(),
        me: own_identity(config)?,
    })
}

/// The failsafe's two sides for a PostgreSQL agent with TLS: the client that asks the vouchers
/// (the same certificate as for the monitors), and, with `listen`, the agent port bound now (a
/// port that cannot be bound stops the agent with the reason) and served until shutdown.
struct Failsafe {
    peers: Vouchers,
    /// The agent port's listener, served once the reconciler exists.
    listener: Option<(tokio::net::TcpListener, Arc<ha_pki::ServerTls>)>,
}

async fn agent_port(
    config: &AgentConfig,
    tls: Arc<ha_pki::ClientTls>,
    shutdown: &CancellationToken,
) -> Result<Failsafe, RunError> {
    use ha_pki::Reload as _;
    let listener = match config.listen {
        Some(addr) => {
            let server_tls =
                Arc::new(ha_pki::ServerTls::load(tls.files().clone()).map_err(tls_error)?);
            let watcher = ha_pki::ReloadWatcher::new(
                vec![server_tls.clone() as Arc<dyn ha_pki::Reload>],
                TLS_RELOAD_POLL,
            )
            .map_err(tls_error)?;
            tokio::spawn(watcher.run(shutdown.clone().cancelled_owned()));
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::AgentPort(format!("{addr}: {e}")))?;
            Some((listener, server_tls))
        }
        None => {
            info!(node = %config.node, "no agent port (listen): this node never vouches for a primary");
            None
        }
    };
    Ok(Failsafe {
        peers: Vouchers::new(tls, config.rpc_timeout),
        listener,
    })
}

/// The PostgreSQL role: the reconcile loop with its worker, until shutdown.
async fn run_postgres(
    config: &AgentConfig,
    role: &PostgresRole,
    state: AgentState,
    state_file: StateFile,
    monitors: Monitors,
    failsafe: Option<Failsafe>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let ctl = PgController::new(role.pg_config(config.tls.as_ref()))?;

    let (job_tx, job_rx) = mpsc::channel(1);
    let (event_tx, event_rx) = mpsc::channel(16);
    let worker = tokio::spawn(worker::run(ctl, job_rx, event_tx));
    let (goal_tx, goal_rx) = mpsc::channel(8);
    let watcher = tokio::spawn(watch_goals(
        monitors.clone(),
        config.node.clone(),
        goal_tx,
        shutdown.child_token(),
    ));
    let mut core = Reconciler::new(config, state, state_file, monitors);
    if let Some(f) = failsafe {
        let port = f
            .listener
            .as_ref()
            .map_or(Ok(0), |(l, _)| l.local_addr().map(|a| a.port()));
        core = core.with_failsafe(
            f.peers,
            port.map_err(|e| RunError::AgentPort(e.to_string()))?,
        );
        if let Some((listener, tls)) = f.listener {
            let (vouching, health) = (core.vouching(), core.health());
            let stop = shutdown.child_token();
            tokio::spawn(async move {
                if let Err(e) = vouch::serve(listener, tls, vouching, health, stop).await {
                    error!(error = %e, "the agent port stopped: this node no longer vouches");
                }
            });
        }
    }
    tokio::spawn(commit_check::run(
        role.pg_config(config.tls.as_ref()),
        core.commit_check(),
        shutdown.child_token(),
    ));
    let result = reconcile(core, goal_rx, job_tx, event_rx, shutdown).await;
    watcher.abort();
    info!(node = %config.node, "reporting stopped");
    // The job channel is closed: the worker ends after the step in progress.
    match tokio::time::timeout(SHUTDOWN_GRACE, worker).await {
        Ok(Ok(mut ctl)) if config.stop_postgres_on_shutdown => {
            info!(node = %config.node, "stopping PostgreSQL as configured");
            ctl.stop(StopMode::Fast).await?;
        }
        Ok(Ok(_)) => info!(node = %config.node, "leaving PostgreSQL running"),
        Ok(Err(e)) => warn!(node = %config.node, error = %e, "worker task failed"),
        Err(_) => warn!(node = %config.node, "a controller step outlived the shutdown grace"),
    }
    result
}

/// Registers the node with its join token, retrying while no monitor leads. With `[tls]` and
/// no certificate yet: generates the key (written 0600) and a CSR, joins over TLS without a
/// client certificate (the CA bundle authenticates the monitor), and writes the certificate the
/// leader signed (atomically). With a certificate already there, joins with it and no CSR.
/// The least time a join may take before it is retried (see [`join`]).
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The CSR to join with: for the key a previous start left (its join may have been answered,
/// and lost, so only that key gets a certificate for this token), or for a new key.
fn join_csr(cfg: &AgentConfig, key_path: &Path) -> Result<String, RunError> {
    if let Ok(key) = std::fs::read_to_string(key_path) {
        match ha_pki::csr_for_key(cfg.node.as_str(), &key) {
            Ok(csr) => {
                info!(node = %cfg.node, key = %key_path.display(), "joining with the existing key (of an earlier start)");
                return Ok(csr);
            }
            Err(e) => {
                warn!(node = %cfg.node, key = %key_path.display(), error = %e, "the key file is unusable: making a new key");
            }
        }
    }
    let (csr, key) = ha_pki::generate_csr(cfg.node.as_str()).map_err(tls_error)?;
    ha_pki::write_key_file(key_path, key.as_bytes()).map_err(tls_error)?;
    Ok(csr)
}

async fn join(cfg: &AgentConfig) -> Result<(), RunError> {
    let path = cfg.join_token_file.as_ref().ok_or(RunError::NoToken)?;
    // A join commits through Raft and signs a certificate: on a slow machine it can take longer
    // than a report. A join that times out anyway is retried, and the monitor answers the
    // retry again (same token, same node, same key).
    let join_timeout = cfg.rpc_timeout.max(JOIN_TIMEOUT);
    let (monitors, csr_pem) = match &cfg.tls {
        None => (
            Monitors::new(cfg.monitors.clone(), join_timeout, None),
            String::new(),
        ),
        Some(files) if files.cert.exists() => {
            let tls = own_client_tls(cfg, files)?;
            info!(node = %cfg.node, cert = %files.cert.display(), "joining with the existing certificate");
            (
                Monitors::new(cfg.monitors.clone(), join_timeout, Some(Arc::new(tls))),
                String::new(),
            )
        }
        Some(files) => {
            let csr = join_csr(cfg, &files.key)?;
            let tls = ha_pki::ClientTls::without_certificate(files.ca_bundle.clone())
                .map_err(tls_error)?;
            info!(node = %cfg.node, key = %files.key.display(), "no certificate yet: joining with a CSR");
            (
                Monitors::new(cfg.monitors.clone(), join_timeout, Some(Arc::new(tls))),
                csr,
            )
        }
    };
    let mut last_error = String::new();
    loop {
        let request = v1::JoinRequest {
            token: config::read_token(path)?,
            node: cfg.node.to_string(),
            kind: v1::NodeKind::from(cfg.role.kind()).into(),
            endpoint: Some(cfg.role.advertise().clone().into()),
            csr_pem: csr_pem.clone(),
            group: cfg.group.clone(),
        };
        let answer = monitors
            .call(|mut c| {
                let r = request.clone();
                async move { c.join(r).await }
            })
            .await;
        match answer {
            Ok(resp) => {
                if let Some(files) = &cfg.tls
                    && !csr_pem.is_empty()
                {
                    if resp.certificate_pem.is_empty() {
                        return Err(RunError::JoinRefused(
                            "the monitor signed no certificate for the CSR".into(),
                        ));
                    }
                    ha_pki::write_public_file(&files.cert, resp.certificate_pem.as_bytes())
                        .map_err(tls_error)?;
                    info!(node = %cfg.node, cert = %files.cert.display(), "certificate received and written");
                }
                info!(node = %cfg.node, group = %cfg.group, monitors = resp.monitors.len(), "joined the cluster");
                return Ok(());
            }
            Err(s) if s.code() == Code::AlreadyExists && csr_pem.is_empty() => {
                // A previous run joined but crashed before persisting it.
                warn!(node = %cfg.node, reason = %s.message(), "already registered: treating the node as joined");
                return Ok(());
            }
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                if s.message() != last_error {
                    warn!(node = %cfg.node, error = %s.message(), "no monitor leader to join yet; retrying");
                    last_error = s.message().to_owned();
                }
                tokio::time::sleep(RETRY).await;
            }
            Err(s) => {
                return Err(RunError::JoinRefused(format!(
                    "{:?}: {}",
                    s.code(),
                    s.message()
                )));
            }
        }
    }
}

/// Forwards every goal the leader pushes; reconnects (to the new leader) when the stream ends.
async fn watch_goals(
    monitors: Monitors,
    node: NodeId,
    goals: mpsc::Sender<v1::Goal>,
    shutdown: CancellationToken,
) {
    loop {
        let request = v1::WatchGoalRequest {
            node: node.to_string(),
        };
        let stream = monitors
            .call(|mut c| {
                let r = request.clone();
                async move { c.watch_goal(r).await }
            })
            .await;
        match stream {
            Ok(mut stream) => loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    item = stream.message() => match item {
                        Ok(Some(goal)) => if goals.send(goal).await.is_err() { return },
                        Ok(None) => { debug!("goal stream ended"); break }
                        Err(e) => { debug!(error = %e.message(), "goal stream failed"); break }
                    },
                }
            },
            Err(e) => debug!(error = %e.message(), "cannot watch the goal"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// The answer to one report, with the instant its request was sent.
#[derive(Debug)]
pub struct ReportResult {
    pub sent_at: Instant,
    pub result: Result<v1::ReportResponse, Status>,
}

/// The loop's state; each event handler is synchronous, the driver ([`reconcile`]) does I/O.
#[derive(Debug)]
pub struct Reconciler<L> {
    node: NodeId,
    kind: NodeKind,
    drill: drill::Drills,
    link: L,
    state: AgentState,
    state_file: StateFile,
    goal: Option<Goal>,
    reached: Option<GoalState>,
    step: String,
    last_error: String,
    /// Why PostgreSQL keeps its installed TLS copies, from the last observation: reported
    /// beside `last_error` for as long as it lasts (steps that succeed do not clear it).
    tls_error: Option<String>,
    observed: Option<v1::PostgresObservation>,
    /// What the health endpoints of the agent port answer from.
    health: health::Health,
    postmaster_pid: Option<i32>,
    lease: Lease,
    /// The lease's end kept across restarts, and the end inherited from the previous run
    /// (which binds a PostgreSQL found writable until a report of this run is answered).
    lease_record: LeaseRecord,
    inherited_lease: Instant,
    lease_fenced: bool,
    report_interval: Duration,
    report_in_flight: bool,
    monitor_ok: Option<bool>,
    worker_busy: bool,
    want_job: bool,
    /// A goal was just reached: report it now rather than at the next tick (the monitors'
    /// next decision, e.g. promoting after a drain, waits for this report).
    report_soon: bool,
    /// PostgreSQL paused while the monitors are asked about a lease that ran out while this
    /// agent was not running (see [`Reconciler::on_lease_expired`]).
    paused: Option<Paused>,
    /// A report must go out now, even with an older one still unanswered.
    report_urgent: bool,
    /// How long PostgreSQL may stay paused waiting for the monitors' answer.
    pause_bound: Duration,
    /// The standby side of the failsafe, shared with the agent port.
    vouching: Vouching,
    /// The primary side: how to ask the vouchers (`None`: no agent port, no TLS, or a test).
    peers: Option<Vouchers>,
    /// The agent port served, for the report (0: none).
    agent_port: u16,
    /// From the last goal: the standbys to ask for vouches, and the group's failsafe bound.
    vouchers: Vec<(NodeId, Endpoint)>,
    failsafe: Duration,
    /// The lease length the monitors last granted: the length a vouch is asked for.
    lease_length: Duration,
    /// Until when every voucher vouched for this primary (send time of the round + grant).
    failsafe_until: Option<Instant>,
    vouch_in_flight: bool,
    /// The last round's outcome, logged on change.
    vouch_outcome: Option<Result<(), String>>,
    /// A vouch given as a standby holds the goal back until then.
    hold: Option<Instant>,
    /// Epoch and catalog revision of the newest goal taken: an older one is ignored.
    goal_revision: (u64, u64),
    /// The primary's own commits, checked beside the loop ([`commit_check`]).
    commit_check: commit_check::CommitCheck,
}

/// A lease that ran out more than this late was not watched: the agent was frozen (SIGSTOP,
/// a stalled VM) or starved, and did not notice the expiry on time.
const LATE_EXPIRY: Duration = Duration::from_millis(250);

/// PostgreSQL's processes stopped (SIGSTOP) while the monitors are asked.
#[derive(Debug)]
struct Paused {
    /// The postmaster and its children.
    pids: Vec<i32>,
    since: Instant,
    until: Instant,
}

impl Paused {
    fn resume(&self) {
        for &pid in &self.pids {
            // A process that exited meanwhile has nothing to resume.
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }
}

impl<L: MonitorLink> Reconciler<L> {
    pub fn new(cfg: &AgentConfig, state: AgentState, state_file: StateFile, link: L) -> Self {
        let lease_record = LeaseRecord::new(&cfg.state_dir);
        let now = Instant::now();
        let recorded = lease_record.inherited(now);
        if recorded > now {
            info!(node = %cfg.node, left_ms = (recorded - now).as_millis(),
                  "the previous run's lease is still running");
        }
        let inherited_lease = recorded.max(now + lease::RESTART_GRACE);
        Self {
            node: cfg.node.clone(),
            kind: cfg.role.kind(),
            drill: drill::Drills::from_config(cfg),
            link,
            state,
            state_file,
            goal: None,
            reached: None,
            step: String::new(),
            last_error: String::new(),
            tls_error: None,
            observed: None,
            health: health::Health::new(
                cfg.node.as_str(),
                (cfg.report_interval * 3).max(HEALTH_STALE_MIN),
            ),
            postmaster_pid: None,
            lease: Lease::new(),
            lease_record,
            inherited_lease,
            lease_fenced: false,
            report_interval: cfg.report_interval,
            report_in_flight: false,
            monitor_ok: None,
            worker_busy: false,
            want_job: true,
            report_soon: false,
            paused: None,
            report_urgent: false,
            // One RPC timeout per monitor tried, capped: longer, a refusal costs more than the
            // fence it replaces.
            pause_bound: (cfg.rpc_timeout * 2).min(cfg.report_interval * 8),
            vouching: {
                let v = Vouching::new(&cfg.state_dir, &cfg.node);
                v.set_quiet(cfg.report_interval * 2);
                v
            },
            peers: None,
            agent_port: 0,
            vouchers: Vec::new(),
            failsafe: Duration::ZERO,
            lease_length: Duration::ZERO,
            failsafe_until: None,
            vouch_in_flight: false,
            vouch_outcome: None,
            hold: None,
            goal_revision: (0, 0),
            commit_check: commit_check::CommitCheck::default(),
        }
    }

    /// Serves the failsafe: `peers` asks the vouchers as a primary; `agent_port` is where this
    /// agent's own [`Vouching`] is served (the caller serves it).
    pub fn with_failsafe(mut self, peers: Vouchers, agent_port: u16) -> Self {
        self.peers = Some(peers);
        self.agent_port = agent_port;
        self
    }

    pub fn vouching(&self) -> Vouching {
        self.vouching.clone()
    }

    pub fn health(&self) -> health::Health {
        self.health.clone()
    }

    pub fn commit_check(&self) -> commit_check::CommitCheck {
        self.commit_check.clone()
    }

    fn writable_goal(&self) -> bool {
        self.goal.as_ref().is_some_and(|g| g.state.is_writable())
    }

    /// PostgreSQL was last seen accepting writes.
    fn observed_writable(&self) -> bool {
        self.observed
            .as_ref()
            .is_some_and(|o| o.role() == v1::PgRole::Primary && !o.read_only)
    }

    /// When the lease must be enforced, unless already fenced: while the goal is writable,
    /// the lease of this run; before any report of this run is answered, what is left of the
    /// previous run's lease if PostgreSQL is found writable.
    pub fn lease_deadline(&self) -> Option<Instant> {
        match &self.paused {
            Some(p) => Some(p.until),
            None => self.writable_until(),
        }
    }

    /// Until when PostgreSQL may accept writes by this agent's own rule (the lease or failsafe
    /// of a writable goal, or the previous run's lease); `None` once fenced or without one.
    fn writable_until(&self) -> Option<Instant> {
        if self.lease_fenced {
            return None;
        }
        match self.lease.expires_at() {
            Some(end) => self
                .writable_goal()
                .then_some(self.failsafe_until.map_or(end, |f| f.max(end))),
            None => self.observed_writable().then_some(self.inherited_lease),
        }
    }

    /// Whether a round of vouch requests should go out now: a primary under a lease of this
    /// run, still unfenced, with no report answered for two report intervals (a call to a
    /// stopped monitor fails only after a whole RPC timeout), with a voucher for every
    /// synchronous standby of its goal and the failsafe on.
    fn wants_vouch(&self) -> bool {
        let Some(goal) = &self.goal else {
            return false;
        };
        self.peers.is_some()
            && !self.vouch_in_flight
            && goal.state == GoalState::Primary
            && !goal.synchronous_standbys.is_empty()
            && goal
                .synchronous_standbys
                .iter()
                .all(|s| self.vouchers.iter().any(|(v, _)| v == s))
            && !self.failsafe.is_zero()
            && self
                .lease
                .last_ok_send()
                .is_some_and(|t| t.elapsed() >= self.report_interval * 2)
            && !self.lease_fenced
            && self.paused.is_none()
            && self.lease.expires_at().is_some()
            && !self.lease_length.is_zero()
            && self.observed_writable()
    }

    /// A round of vouch requests came back: all granted moves the writable deadline to its
    /// send time plus the shortest grant, if the goal is still the primary goal it was for.
    pub fn on_vouched(&mut self, round: VouchRound) {
        self.vouch_in_flight = false;
        let current = self
            .goal
            .as_ref()
            .is_some_and(|g| g.state == GoalState::Primary && g.epoch == round.epoch);
        let outcome = round.result.as_ref().map(|_| ()).map_err(Clone::clone);
        if self.vouch_outcome.as_ref() != Some(&outcome) {
            match &outcome {
                Ok(()) => {
                    warn!(node = %self.node, vouchers = ?self.vouchers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                                "no monitor leader answers: every synchronous standby vouches for this primary (failsafe); serving on")
                }
                Err(why) => warn!(node = %self.node, reason = %why,
                                  "failsafe refused: the primary fences when its lease runs out"),
            }
            self.vouch_outcome = Some(outcome);
        }
        if let (Ok(length), true) = (round.result, current)
            && !self.lease_fenced
        {
            let end = round.sent_at + length;
            if self.failsafe_until.is_none_or(|f| f < end) {
                self.failsafe_until = Some(end);
                if let Some(lease_end) = self.lease.expires_at() {
                    self.lease_record.store(end.max(lease_end));
                }
            }
        }
    }

    /// Whether a vouch given as a standby holds the current goal back (and until when).
    fn held(&mut self) -> bool {
        let now = Instant::now();
        self.hold = self
            .goal
            .as_ref()
            .and_then(|g| self.vouching.hold_until(g, now));
        if let Some(until) = self.hold {
            let to = self.vouching.promised_to().map_or_else(
                || "the previous run's primary".to_owned(),
                |n| n.to_string(),
            );
            let step = format!("held: vouched for {to}");
            if self.step != step {
                info!(node = %self.node, left_ms = until.saturating_duration_since(now).as_millis(),
                      goal = ?self.goal.as_ref().map(|g| g.state),
                      "goal held back: this standby vouched for {to} and keeps that promise");
                self.step = step;
            }
        }
        self.hold.is_some()
    }

    fn set_error(&mut self, error: String) {
        if error != self.last_error {
            warn!(node = %self.node, %error, "error");
            self.last_error = error;
        }
    }

    fn clear_error(&mut self) {
        if !self.last_error.is_empty() {
            info!(node = %self.node, previous = %self.last_error, "error cleared");
            self.last_error.clear();
        }
    }

    /// The report to send now.
    pub fn observed_state(&self) -> v1::ObservedState {
        let now_ms = drill::unix_ms();
        // A refused or failed drill and refused TLS material must reach the operator whatever
        // else the agent reports.
        let last_error = [
            self.drill.notice(now_ms),
            self.tls_error.as_deref(),
            Some(self.last_error.as_str()),
        ]
        .into_iter()
        .flatten()
        .filter(|e| !e.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
        v1::ObservedState {
            node: self.node.to_string(),
            kind: v1::NodeKind::from(self.kind).into(),
            epoch: self.state.highest_epoch.get(),
            reached: self.reached.map_or(0, |s| v1::GoalState::from(s).into()),
            step: self.step.clone(),
            last_error,
            detail: self.observed.clone().map(|mut o| {
                o.commits_blocked = self.commit_check.blocked();
                v1::observed_state::Detail::Postgres(o)
            }),
            drill: self.drill.status(now_ms),
            agent_port: u32::from(self.agent_port),
            vouch_left_ms: u64::try_from(self.vouching.left(Instant::now()).as_millis())
                .unwrap_or(u64::MAX),
        }
    }

    /// The next worker job.
    fn job(&mut self) -> Job {
        if self.held() {
            return Job {
                goal: None,
                fence: false,
            };
        }
        let writable = self.writable_goal();
        if writable && self.lease.expires_at().is_none() {
            // Writable goals are acted upon only under a lease granted in this run.
            debug!(node = %self.node, "holding the writable goal until a report is answered");
            return Job {
                goal: None,
                fence: false,
            };
        }
        Job {
            goal: self.goal.clone(),
            fence: self.lease_fenced && writable,
        }
    }

    /// The lease ran out: stop accepting writes at once, then let the worker fence properly.
    ///
    /// Noticed late (this agent was frozen or starved past the expiry), the lease may well
    /// have been renewable all along: a frozen agent alone leaves its PostgreSQL answering the
    /// monitors' probes, and the monitors never promote away from a port that answers. So
    /// PostgreSQL is paused instead (SIGSTOP of the postmaster and every backend: nothing is
    /// served, nothing acknowledged) and a report goes out at once. If the monitors renew the
    /// lease with the writable goal, PostgreSQL resumes unfenced; any other answer, or none
    /// within the bound, fences it as before. A detached `kill -CONT` armed for the bound
    /// resumes PostgreSQL even if this agent dies meanwhile.
    pub fn on_lease_expired(&mut self, now: Instant) {
        if let Some(p) = self.paused.take() {
            warn!(node = %self.node, paused_ms = now.saturating_duration_since(p.since).as_millis(),
                  "no answer from the monitors while PostgreSQL was paused: fencing it");
            self.fence_now();
            p.resume();
            return;
        }
        let late = self
            .lease_deadline()
            .map_or(Duration::ZERO, |d| now.saturating_duration_since(d));
        if late >= LATE_EXPIRY
            && self.lease.expires_at().is_some()
            && self.writable_goal()
            && let Some(pid) = self.postmaster_pid
        {
            match drill::freeze_tree(pid, self.pause_bound) {
                Ok(children) => {
                    warn!(node = %self.node, late_ms = late.as_millis(), pid,
                          children = children.len(), bound_ms = self.pause_bound.as_millis(),
                          "the lease ran out while this agent was not running: PostgreSQL paused \
                           while the monitors are asked");
                    let mut pids = vec![pid];
                    pids.extend(children);
                    self.paused = Some(Paused {
                        pids,
                        since: now,
                        until: now + self.pause_bound,
                    });
                    self.report_urgent = true;
                    return;
                }
                Err(e) => {
                    warn!(node = %self.node, error = %e, "PostgreSQL could not be paused: fencing it");
                }
            }
        }
        match self.lease.last_ok_send() {
            Some(t) => warn!(node = %self.node,
                             since_last_ok_send_ms = now.saturating_duration_since(t).as_millis(),
                             "lease expired without a successful report: fencing PostgreSQL"),
            None => warn!(node = %self.node,
                          "PostgreSQL is writable, no report of this run was answered and both \
                           the previous run's lease and the restart grace are over: fencing PostgreSQL"),
        }
        self.fence_now();
    }

    /// Fast shutdown of the postmaster now (it refuses new connections and ends sessions at
    /// once; a paused one acts on it when continued); the worker's fence step, which waits for
    /// the exit, follows.
    fn fence_now(&mut self) {
        if let Some(pid) = self.postmaster_pid
            && let Err(e) = kill(Pid::from_raw(pid), Signal::SIGINT)
        {
            warn!(node = %self.node, pid, error = %e, "could not signal the postmaster");
        }
        self.lease_fenced = true;
        self.want_job = true;
        self.health.fenced();
        self.set_error("lease expired: PostgreSQL fenced".into());
    }

    /// The answer to the report sent after pausing PostgreSQL decides: resume or fence.
    fn settle_pause(&mut self, answered: bool) {
        let Some(p) = self.paused.take() else {
            return;
        };
        let paused_ms = p.since.elapsed().as_millis();
        if answered && !self.lease.expired(Instant::now()) && self.writable_goal() {
            info!(node = %self.node, paused_ms,
                  "the monitors renewed the lease with the writable goal: PostgreSQL resumes unfenced");
        } else {
            warn!(node = %self.node, paused_ms, answered,
                  "the monitors did not renew the writable lease: fencing PostgreSQL");
            self.fence_now();
        }
        p.resume();
    }

    pub fn on_report(&mut self, r: ReportResult) {
        self.report_in_flight = false;
        // Only a report sent after PostgreSQL was paused says anything about now.
        let settles = self.paused.as_ref().is_some_and(|p| r.sent_at >= p.since);
        let answered = r.result.is_ok();
        self.health.report(answered, r.sent_at.elapsed());
        self.take_report(r);
        if settles {
            self.settle_pause(answered);
        }
    }

    fn take_report(&mut self, r: ReportResult) {
        match r.result {
            Ok(resp) => {
                if self.monitor_ok != Some(true) {
                    info!(node = %self.node, "reports answered by the monitor leader");
                    self.monitor_ok = Some(true);
                }
                self.vouching
                    .report_answered(r.sent_at, Duration::from_millis(resp.lease_ms));
                // A zero lease would be a monitor bug; it grants nothing rather than fencing.
                if resp.lease_ms > 0 {
                    self.lease_length = Duration::from_millis(resp.lease_ms);
                    let before = self.lease.expires_at();
                    self.lease
                        .renew(r.sent_at, Duration::from_millis(resp.lease_ms));
                    if let Some(end) = self.lease.expires_at()
                        && Some(end) != before
                    {
                        self.lease_record.store(end);
                    }
                }
                if self.lease_fenced && !self.lease.expired(Instant::now()) {
                    info!(node = %self.node, "lease renewed after fencing: resuming the goal");
                    self.lease_fenced = false;
                    self.want_job = true;
                }
                self.set_report_interval(resp.report_interval_ms);
                if let Some(goal) = resp.goal {
                    self.on_goal(goal, "report");
                }
            }
            Err(s) => {
                if self.monitor_ok != Some(false) {
                    warn!(node = %self.node, code = ?s.code(), error = %s.message(), "report not answered");
                    self.monitor_ok = Some(false);
                }
                if s.code() == Code::NotFound {
                    self.set_error(format!("monitor: {}", s.message()));
                }
            }
        }
    }

    /// Takes the report interval the monitor asks for (0: keep the current one). A shorter
    /// one starts with a report now, not at the end of the longer one.
    fn set_report_interval(&mut self, ms: u64) {
        let interval = Duration::from_millis(ms.clamp(50, 60_000));
        if ms == 0 || interval == self.report_interval {
            return;
        }
        info!(node = %self.node, interval_ms = interval.as_millis(), "report interval set by the monitor");
        self.vouching.set_quiet(interval * 2);
        if interval < self.report_interval {
            self.report_soon = true;
        }
        self.report_interval = interval;
    }

    pub fn on_goal(&mut self, wire: v1::Goal, source: &'static str) {
        self.set_report_interval(wire.report_interval_ms);
        if let Some(order) = &wire.drill
            && wire.node == self.node.as_str()
        {
            let upstream = wire.upstream.as_ref().map(|e| e.host.as_str());
            self.drill.on_order(order, self.postmaster_pid, upstream);
        }
        let revision = (wire.epoch, wire.revision);
        if wire.node == self.node.as_str() && revision < self.goal_revision {
            debug!(node = %self.node, ?revision, newest = ?self.goal_revision, source,
                   "goal older than the one already taken: ignored");
            return;
        }
        let failsafe = Duration::from_millis(wire.failsafe_ms);
        let vouchers = voucher_list(&wire.vouchers);
        let goal = match accept_goal(&self.node, wire, &mut self.state, &self.state_file) {
            Ok(g) => g,
            Err(e) => return self.set_error(e),
        };
        self.goal_revision = revision;
        self.vouching.set_goal(&goal, failsafe);
        self.failsafe = failsafe;
        self.vouchers = vouchers;
        if self.goal.as_ref() != Some(&goal) {
            info!(node = %self.node, goal = %goal.state, epoch = %goal.epoch, source,
                  previous = ?self.goal.as_ref().map(|g| g.state), "goal changed");
            if !goal.state.is_writable() && self.lease_fenced {
                self.lease_fenced = false;
            }
            self.goal = Some(goal);
            self.want_job = true;
        }
    }

    pub fn on_event(&mut self, event: WorkerEvent) {
        match event {
            WorkerEvent::Observed {
                obs,
                postmaster_pid,
                tls_error,
            } => {
                self.postmaster_pid = postmaster_pid;
                self.tls_error = tls_error;
                self.health.observed(obs.as_ref().ok(), Instant::now());
                match obs {
                    Ok(o) => {
                        let o = v1::PostgresObservation::from(&o);
                        self.vouching.set_streaming(
                            o.streaming
                                .then(|| NodeId::new(o.upstream_node.clone()).ok())
                                .flatten(),
                        );
                        self.observed = Some(o);
                        self.commit_check.set_writable(self.observed_writable());
                    }
                    Err(e) => self.set_error(format!("observing PostgreSQL: {e}")),
                }
            }
            WorkerEvent::Applying(action) => {
                self.step = step_name(&action).to_owned();
                info!(node = %self.node, step = %self.step, goal = ?self.goal.as_ref().map(|g| g.state),
                      lease_fenced = self.lease_fenced, "step started");
            }
            WorkerEvent::Finished {
                job,
                action,
                result,
            } => {
                self.worker_busy = false;
                self.step.clear();
                match (result, action) {
                    (Err(e), _) => self.set_error(e),
                    (Ok(()), Some(Action::Nothing)) => {
                        self.clear_error_unless_fenced();
                        let target = match &job.goal {
                            Some(_) if job.fence => Some(GoalState::Fenced),
                            Some(g) if Some(g) == self.goal.as_ref() => Some(g.state),
                            _ => None,
                        };
                        if let Some(t) = target
                            && self.reached != Some(t)
                        {
                            info!(node = %self.node, reached = %t, "goal reached");
                            self.reached = Some(t);
                            self.report_soon = true;
                        }
                    }
                    (Ok(()), Some(_)) => {
                        self.clear_error_unless_fenced();
                        // Converge without waiting for the next tick.
                        self.want_job = true;
                    }
                    (Ok(()), None) => {}
                }
            }
        }
    }

    fn clear_error_unless_fenced(&mut self) {
        if !self.lease_fenced {
            self.clear_error();
        }
    }
}

/// Decodes a goal the monitors sent to `node` and applies the epoch rule: another node's goal
/// and an older epoch are refused (the error says why); a newer epoch is persisted before the
/// goal is returned, so it is never acted upon unrecorded.
fn accept_goal(
    node: &NodeId,
    wire: v1::Goal,
    state: &mut AgentState,
    file: &StateFile,
) -> Result<Goal, String> {
    let goal = Goal::try_from(wire).map_err(|e| format!("invalid goal from the monitor: {e}"))?;
    if goal.node != *node {
        return Err(format!("goal for another node ({}) ignored", goal.node));
    }
    match state.check(goal.epoch) {
        EpochCheck::Stale { highest } => Err(format!(
            "refused goal {} with stale epoch {} (highest seen {highest})",
            goal.state, goal.epoch
        )),
        EpochCheck::Newer => {
            let next = AgentState {
                highest_epoch: goal.epoch,
                ..*state
            };
            if let Err(e) = file.store(&next) {
                error!(%node, error = %e, "cannot persist the new epoch");
                return Err(format!("cannot persist epoch {}: {e}", goal.epoch));
            }
            info!(%node, epoch = %goal.epoch, previous = %state.highest_epoch, "new epoch persisted");
            *state = next;
            Ok(goal)
        }
        EpochCheck::Current => Ok(goal),
    }
}

/// The vouchers of a goal; an entry that does not parse is left out (and with it the failsafe,
/// which needs every synchronous standby).
fn voucher_list(wire: &[v1::Voucher]) -> Vec<(NodeId, Endpoint)> {
    wire.iter()
        .filter_map(|v| {
            let node = NodeId::new(v.node.clone()).ok()?;
            let at = Endpoint::try_from(v.endpoint.clone()?).ok()?;
            Some((node, at))
        })
        .collect()
}

fn step_name(action: &Action) -> &'static str {
    match action {
        Action::Nothing => "",
        Action::Bootstrap(_) => "bootstrap",
        Action::Start => "start",
        Action::JoinStandby(_) => "basebackup",
        Action::StartStandby(_) => "start_standby",
        Action::Follow(_) => "follow",
        Action::StopReplication => "stop_replication",
        Action::Promote => "promote",
        Action::SetSynchronous(_) => "set_synchronous",
        Action::Fence => "fence",
        Action::Rejoin(_) => "rejoin",
        Action::Drain => "drain",
        Action::Stop => "stop",
        Action::Refuse(_) => "refused",
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Drives a [`Reconciler`]: ticks, reports, pushed goals, worker events and the lease timer.
pub async fn reconcile<L: MonitorLink>(
    mut core: Reconciler<L>,
    mut goals: mpsc::Receiver<v1::Goal>,
    jobs: mpsc::Sender<Job>,
    mut events: mpsc::Receiver<WorkerEvent>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (report_tx, mut reports) = mpsc::channel::<ReportResult>(1);
    let (vouch_tx, mut vouched) = mpsc::channel::<VouchRound>(1);
    let mut next_report = Instant::now();
    let mut systemd = crate::notify::Notifier::from_env();
    loop {
        systemd.tick(core.observed.is_some());
        if core.report_soon && !core.report_in_flight {
            core.report_soon = false;
            next_report = Instant::now();
        }
        if core.want_job && !core.worker_busy {
            let job = core.job();
            core.want_job = false;
            core.worker_busy = true;
            jobs.send(job).await.map_err(|_| RunError::WorkerGone)?;
        }
        let deadline = core.lease_deadline();
        let epoch = core.goal.as_ref().map_or(0, |g| g.epoch.0);
        core.health
            .tick(core.writable_until(), epoch, Instant::now());
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            // Before anything else: an expired lease is acted upon at once.
            () = sleep_until_some(deadline) => core.on_lease_expired(Instant::now()),
            Some(r) = reports.recv() => core.on_report(r),
            Some(v) = vouched.recv() => core.on_vouched(v),
            () = sleep_until_some(core.hold) => {
                core.hold = None;
                core.want_job = true;
            }
            Some(g) = goals.recv() => if !core.drill.monitors_cut_off(Instant::now()) {
                core.on_goal(g, "watch");
            },
            event = events.recv() => match event {
                Some(e) => core.on_event(e),
                None => return Err(RunError::WorkerGone),
            },
            () = tokio::time::sleep_until(next_report) => {
                next_report = Instant::now() + core.report_interval;
                core.want_job = true;
                if !core.report_in_flight {
                    send_report(&mut core, &report_tx);
                }
                if core.wants_vouch() {
                    ask_vouchers(&mut core, &vouch_tx);
                }
            }
        }
        if std::mem::take(&mut core.report_urgent) {
            // Not waiting for a report sent before the agent stopped running.
            send_report(&mut core, &report_tx);
        }
    }
}

/// Sends a report of the PostgreSQL role unless a drill cut the monitors off.
fn send_report<L: MonitorLink>(core: &mut Reconciler<L>, tx: &mpsc::Sender<ReportResult>) {
    if core.drill.monitors_cut_off(Instant::now()) {
        return;
    }
    core.report_in_flight = true;
    spawn_report(core.link.clone(), core.observed_state(), tx.clone());
}

/// Asks every voucher of the goal in a task of its own; the round comes back on `tx`.
fn ask_vouchers<L: MonitorLink>(core: &mut Reconciler<L>, tx: &mpsc::Sender<VouchRound>) {
    let (Some(peers), Some(goal)) = (core.peers.clone(), core.goal.as_ref()) else {
        return;
    };
    core.vouch_in_flight = true;
    let (me, epoch, length) = (core.node.clone(), goal.epoch, core.lease_length);
    let vouchers = core.vouchers.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let round = peers.round(me, epoch, length, vouchers).await;
        let _ = tx.send(round).await;
    });
}

/// Sends `observed` in a task of its own; the answer comes back on `tx` with its send time.
fn spawn_report<L: MonitorLink>(
    link: L,
    observed: v1::ObservedState,
    tx: mpsc::Sender<ReportResult>,
) {
    tokio::spawn(async move {
        let sent_at = Instant::now();
        let result = link.report(observed).await;
        let _ = tx.send(ReportResult { sent_at, result }).await;
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    use ha_proto::Epoch;

    use super::*;
    use crate::pg::{PgObservation, ServerRole};

    /// A monitor that answers every report sent before `silent_after` with a writable goal,
    /// and never answers later ones (a partition: the request hangs).
    #[derive(Debug, Clone)]
    struct ScriptedMonitor {
        silent_after: Instant,
        epoch: u64,
    }

    impl MonitorLink for ScriptedMonitor {
        async fn report(&self, _: v1::ObservedState) -> Result<v1::ReportResponse, Status> {
            if Instant::now() >= self.silent_after {
                std::future::pending::<()>().await;
            }
            Ok(v1::ReportResponse {
                goal: Some(goal_wire(GoalState::Primary, self.epoch)),
                lease_ms: 3000,
                report_interval_ms: 500,
            })
        }
    }

    fn goal_wire(state: GoalState, epoch: u64) -> v1::Goal {
        v1::Goal {
            node: "psql1".into(),
            state: v1::GoalState::from(state).into(),
            epoch,
            ..Default::default()
        }
    }

    fn config(state_dir: &Path) -> AgentConfig {
        let text = format!(
            r#"
role = "postgres"
node = "psql1"
group = "main"
monitors = ["127.0.0.1:1"]
state_dir = "{}"
dev = true
[postgres]
data_dir = "/tmp/ha-agent-unit/data"
port = 5432
advertise_host = "127.0.0.1"
socket_dir = "/tmp/ha-agent-unit"
"#,
            state_dir.display()
        );
        AgentConfig::parse(&text, Path::new("unit.toml"), true).unwrap()
    }

    fn core<L: MonitorLink>(dir: &Path, link: L, highest: u64) -> Reconciler<L> {
        let cfg = config(dir);
        let file = StateFile::new(dir);
        let state = AgentState {
            highest_epoch: Epoch(highest),
            joined: true,
        };
        file.store(&state).unwrap();
        Reconciler::new(&cfg, state, file, link)
    }

    /// Plays the worker: answers every job at once and returns when a fencing job arrives.
    async fn fencing_job_time(silent_after: Duration) -> (Instant, Instant) {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let link = ScriptedMonitor {
            silent_after: t0 + silent_after,
            epoch: 2,
        };
        let c = core(dir.path(), link, 1);
        let (_goal_tx, goal_rx) = mpsc::channel(1);
        let (job_tx, mut job_rx) = mpsc::channel(1);
        let (event_tx, event_rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let driver = tokio::spawn(reconcile(c, goal_rx, job_tx, event_rx, shutdown.clone()));
        let mut writable_jobs = 0;
        let fenced_at = loop {
            let job = job_rx.recv().await.unwrap();
            if job.fence {
                break Instant::now();
            }
            if job
                .goal
                .as_ref()
                .is_some_and(|g| g.state == GoalState::Primary)
            {
                writable_jobs += 1;
            }
            event_tx
                .send(WorkerEvent::Observed {
                    obs: Ok(PgObservation::empty()),
                    postmaster_pid: None,
                    tls_error: None,
                })
                .await
                .unwrap();
            event_tx
                .send(WorkerEvent::Finished {
                    job,
                    action: Some(Action::Nothing),
                    result: Ok(()),
                })
                .await
                .unwrap();
        };
        assert!(
            writable_jobs > 0,
            "the primary goal was acted upon under the lease"
        );
        shutdown.cancel();
        driver.await.unwrap().unwrap();
        assert_eq!(
            StateFile::new(dir.path()).load().unwrap().highest_epoch,
            Epoch(2)
        );
        (t0, fenced_at)
    }

    #[tokio::test(start_paused = true)]
    async fn fences_exactly_when_the_lease_passes_without_an_answer() {
        // Only the very first report (sent at t0) is answered.
        let (t0, fenced) = fencing_job_time(Duration::from_millis(1)).await;
        assert_eq!(fenced - t0, Duration::from_secs(3));
        // Reports sent at 0, 0.5, 1.0 and 1.5 s are answered; the lease runs from 1.5 s.
        let (t0, fenced) = fencing_job_time(Duration::from_millis(1600)).await;
        assert_eq!(fenced - t0, Duration::from_millis(4500));
    }

    #[tokio::test]
    async fn stale_epochs_are_refused_and_newer_ones_persisted_first() {
        let dir = tempfile::tempdir().unwrap();
        let link = ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 0,
        };
        let mut c = core(dir.path(), link, 5);
        c.on_goal(goal_wire(GoalState::Primary, 4), "report");
        assert!(c.goal.is_none(), "a stale goal is not taken");
        let report = c.observed_state();
        assert!(
            report.last_error.contains("stale epoch e4"),
            "{}",
            report.last_error
        );
        assert_eq!(report.epoch, 5);

        c.on_goal(goal_wire(GoalState::Fenced, 7), "watch");
        assert_eq!(c.goal.as_ref().map(|g| g.epoch), Some(Epoch(7)));
        assert_eq!(
            StateFile::new(dir.path()).load().unwrap().highest_epoch,
            Epoch(7)
        );
        assert_eq!(c.observed_state().epoch, 7);
        // An older epoch after that is refused again, and the goal stays.
        c.on_goal(goal_wire(GoalState::Primary, 6), "watch");
        assert_eq!(c.goal.as_ref().map(|g| g.state), Some(GoalState::Fenced));
    }

    #[tokio::test]
    async fn a_drill_order_is_refused_without_allow_drills_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let link = ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 0,
        };
        let mut c = core(dir.path(), link, 1);
        let mut wire = goal_wire(GoalState::Primary, 1);
        wire.drill = Some(v1::DrillOrder {
            id: "d1".into(),
            fault: v1::Fault::Crash.into(),
            duration_ms: 1,
            not_after_unix_ms: drill::unix_ms() + 5_000,
        });
        // A crash order executed here would kill the test process.
        c.on_goal(wire, "report");
        assert_eq!(c.goal.as_ref().map(|g| g.state), Some(GoalState::Primary));
        let report = c.observed_state();
        assert!(
            report.last_error.contains("drill d1 refused"),
            "{}",
            report.last_error
        );
        let status = report.drill.unwrap();
        assert_eq!((status.id.as_str(), status.active), ("d1", false));
    }

    #[tokio::test]
    async fn refused_tls_material_is_reported_until_an_observation_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let link = ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 0,
        };
        let mut c = core(dir.path(), link, 1);
        let refused = "certificate /x/node.pem is not signed by the cluster CA in /x/ca.pem";
        let observed = |tls_error: Option<&str>| WorkerEvent::Observed {
            obs: Ok(PgObservation::empty()),
            postmaster_pid: None,
            tls_error: tls_error.map(str::to_owned),
        };
        c.on_event(observed(Some(refused)));
        c.on_goal(goal_wire(GoalState::Primary, 0), "report");
        assert_eq!(
            c.observed_state().last_error,
            format!("{refused}; refused goal primary with stale epoch e0 (highest seen e1)")
        );
        // A step that succeeds clears the step's error, not the refusal.
        let job = c.job();
        c.on_event(WorkerEvent::Finished {
            job,
            action: Some(Action::Nothing),
            result: Ok(()),
        });
        assert_eq!(c.observed_state().last_error, refused);
        c.on_event(observed(None));
        assert_eq!(c.observed_state().last_error, "");
    }

    #[tokio::test]
    async fn writable_goal_waits_for_a_lease() {
        let dir = tempfile::tempdir().unwrap();
        let link = ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 0,
        };
        let mut c = core(dir.path(), link, 1);
        c.on_goal(goal_wire(GoalState::Primary, 1), "watch");
        assert_eq!(c.lease_deadline(), None);
        assert_eq!(c.job().goal, None, "no lease granted yet: observe only");
        c.on_report(ReportResult {
            sent_at: Instant::now(),
            result: Ok(v1::ReportResponse {
                goal: Some(goal_wire(GoalState::Primary, 1)),
                lease_ms: 3000,
                report_interval_ms: 500,
            }),
        });
        assert!(c.lease_deadline().is_some());
        assert_eq!(c.job().goal.map(|g| g.state), Some(GoalState::Primary));
    }

    fn observe(c: &mut Reconciler<ScriptedMonitor>, role: ServerRole, read_only: bool) {
        c.on_event(WorkerEvent::Observed {
            obs: Ok(PgObservation {
                role,
                read_only,
                ..PgObservation::empty()
            }),
            postmaster_pid: None,
            tls_error: None,
        });
    }

    #[tokio::test]
    async fn a_writable_postgres_found_at_start_keeps_only_the_previous_runs_lease() {
        let dir = tempfile::tempdir().unwrap();
        let silent = || ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 0,
        };
        // Nothing recorded: a writable server is fenced once the restart grace has passed.
        let start = Instant::now();
        let mut c = core(dir.path(), silent(), 1);
        assert_eq!(c.lease_deadline(), None, "nothing observed yet");
        observe(&mut c, ServerRole::Primary, false);
        let now = Instant::now();
        let grace = c.lease_deadline().unwrap();
        assert!(
            grace >= start + lease::RESTART_GRACE && grace <= now + lease::RESTART_GRACE,
            "{:?}",
            grace - start
        );
        c.on_lease_expired(now);
        assert_eq!(c.lease_deadline(), None, "fenced");
        assert!(c.observed_state().last_error.contains("fenced"));

        // A previous run's lease with 2 s left binds the new run for those 2 s.
        let now = Instant::now();
        LeaseRecord::new(dir.path()).store(now + Duration::from_secs(2));
        let mut c = core(dir.path(), silent(), 1);
        observe(&mut c, ServerRole::Standby, false);
        assert_eq!(c.lease_deadline(), None, "a standby needs no lease");
        observe(&mut c, ServerRole::Primary, true);
        assert_eq!(
            c.lease_deadline(),
            None,
            "a read-only primary needs no lease"
        );
        observe(&mut c, ServerRole::Primary, false);
        let left = c.lease_deadline().unwrap() - now;
        assert!(
            left > Duration::from_secs(1) && left <= Duration::from_secs(2),
            "{left:?}"
        );

        // An answered report of this run replaces the inherited lease, and is recorded.
        let sent_at = Instant::now();
        c.on_report(ReportResult {
            sent_at,
            result: Ok(v1::ReportResponse {
                goal: Some(goal_wire(GoalState::Primary, 1)),
                lease_ms: 3000,
                report_interval_ms: 500,
            }),
        });
        assert_eq!(c.lease_deadline(), Some(sent_at + Duration::from_secs(3)));
        let left = LeaseRecord::new(dir.path()).inherited(sent_at) - sent_at;
        assert!(left > Duration::from_secs(2), "recorded: {left:?}");
    }

    /// A reconciler whose lease of this run ran out `ago`, primary goal, and a stand-in
    /// postmaster (a `sleep` process) it would pause or fence.
    fn lapsed_primary(
        dir: &Path,
        ago: Duration,
    ) -> (Reconciler<ScriptedMonitor>, ha_tests::ChildGuard, u32) {
        let link = ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 1,
        };
        let mut c = core(dir, link, 1);
        c.on_report(answer(
            Instant::now() - Duration::from_secs(3) - ago,
            GoalState::Primary,
            1,
        ));
        assert!(c.writable_goal());
        let pm = ha_tests::ChildGuard::new(
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap(),
        );
        let pid = pm.id();
        c.postmaster_pid = Some(i32::try_from(pid).unwrap());
        (c, pm, pid)
    }

    fn answer(sent_at: Instant, state: GoalState, epoch: u64) -> ReportResult {
        ReportResult {
            sent_at,
            result: Ok(v1::ReportResponse {
                goal: Some(goal_wire(state, epoch)),
                lease_ms: 3000,
                report_interval_ms: 500,
            }),
        }
    }

    #[tokio::test]
    async fn a_lease_found_expired_on_resuming_pauses_postgres_until_the_monitors_answer() {
        use drill::tests::{eventually, state};
        let dir = tempfile::tempdir().unwrap();
        let stopped = |pid: u32| eventually(Duration::from_secs(5), || state(pid) == 'T');
        let gone =
            |pid: u32| eventually(Duration::from_secs(5), || matches!(state(pid), 'Z' | '?'));

        // Frozen for 10 s: the lease ran out long ago. PostgreSQL is paused, not fenced, and a
        // report goes out at once.
        let (mut c, _pm, pid) = lapsed_primary(dir.path(), Duration::from_secs(10));
        c.on_lease_expired(Instant::now());
        assert!(stopped(pid), "PostgreSQL is paused");
        assert!(!c.lease_fenced && c.report_urgent);
        // An answer to a report sent before the pause settles nothing.
        c.on_report(answer(
            Instant::now() - Duration::from_secs(5),
            GoalState::Primary,
            1,
        ));
        assert!(c.paused.is_some());
        // The monitors renew the lease with the writable goal: it resumes, unfenced.
        c.on_report(answer(Instant::now(), GoalState::Primary, 1));
        assert!(c.paused.is_none() && !c.lease_fenced);
        assert!(eventually(Duration::from_secs(5), || state(pid) == 'S'));

        // Meanwhile the monitors failed over: the answer's goal is fenced at a newer epoch.
        let (mut c, _pm, pid) = lapsed_primary(dir.path(), Duration::from_secs(10));
        c.on_lease_expired(Instant::now());
        assert!(stopped(pid));
        c.on_report(answer(Instant::now(), GoalState::Fenced, 2));
        assert!(c.lease_fenced, "fenced");
        assert!(
            gone(pid),
            "the stand-in postmaster got its SIGINT once resumed"
        );

        // No answer within the bound: fenced.
        let (mut c, _pm, pid) = lapsed_primary(dir.path(), Duration::from_secs(10));
        c.on_lease_expired(Instant::now());
        assert!(stopped(pid));
        let until = c.lease_deadline().unwrap();
        assert!(until > Instant::now() && until <= Instant::now() + c.pause_bound);
        c.on_lease_expired(until);
        assert!(c.lease_fenced);
        assert!(gone(pid));

        // Noticed on time (monitors unreachable, agent running): fenced at once, as always.
        let (mut c, _pm, pid) = lapsed_primary(dir.path(), Duration::ZERO);
        c.on_lease_expired(Instant::now());
        assert!(c.lease_fenced && c.paused.is_none());
        assert!(gone(pid));
    }

    #[tokio::test]
    async fn a_reached_goal_is_reported_at_once_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let link = ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 0,
        };
        let mut c = core(dir.path(), link, 1);
        c.on_goal(goal_wire(GoalState::Single, 1), "watch");
        let job = Job {
            goal: c.goal.clone(),
            fence: false,
        };
        let finished = |job: Job| WorkerEvent::Finished {
            job,
            action: Some(Action::Nothing),
            result: Ok(()),
        };
        assert!(!c.report_soon);
        c.on_event(finished(job.clone()));
        assert_eq!(c.reached, Some(GoalState::Single));
        assert!(c.report_soon, "the monitors learn of a reached goal now");
        c.report_soon = false;
        c.on_event(finished(job));
        assert!(!c.report_soon, "staying at a goal is not news");
    }

    fn answered(c: &mut Reconciler<ScriptedMonitor>, sent_at: Instant, goal: v1::Goal) {
        c.on_report(ReportResult {
            sent_at,
            result: Ok(v1::ReportResponse {
                goal: Some(goal),
                lease_ms: 3000,
                report_interval_ms: 500,
            }),
        });
    }

    fn unanswered(c: &mut Reconciler<ScriptedMonitor>) {
        c.on_report(ReportResult {
            sent_at: Instant::now(),
            result: Err(Status::unavailable("no leader")),
        });
    }

    fn primary_with_voucher(epoch: u64) -> v1::Goal {
        v1::Goal {
            synchronous_standbys: vec!["psql2".into()],
            synchronous_quorum: 1,
            vouchers: vec![v1::Voucher {
                node: "psql2".into(),
                endpoint: Some(v1::Endpoint {
                    host: "127.0.0.2".into(),
                    port: 7410,
                }),
            }],
            failsafe_ms: 60_000,
            ..goal_wire(GoalState::Primary, epoch)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_primary_serves_past_its_lease_only_on_granted_vouches_for_its_goal() {
        let dir = tempfile::tempdir().unwrap();
        let link = ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 0,
        };
        let mut c = core(dir.path(), link, 1);
        observe(&mut c, ServerRole::Primary, false);
        let t0 = Instant::now();
        answered(&mut c, t0, primary_with_voucher(1));
        assert_eq!(c.vouchers.len(), 1);
        let lease_end = t0 + Duration::from_secs(3);
        assert_eq!(c.lease_deadline(), Some(lease_end));
        unanswered(&mut c);
        let round = |at: Duration, epoch: u64, result: Result<Duration, String>| VouchRound {
            sent_at: t0 + at,
            epoch: Epoch(epoch),
            result,
        };
        c.on_vouched(round(Duration::from_secs(2), 1, Ok(Duration::from_secs(3))));
        let vouched_end = t0 + Duration::from_secs(5);
        assert_eq!(c.lease_deadline(), Some(vouched_end), "send time + grant");
        let recorded = LeaseRecord::new(dir.path()).inherited(Instant::now());
        assert!(
            recorded > lease_end && recorded <= vouched_end,
            "recorded for a restart: {recorded:?}"
        );
        c.on_vouched(round(
            Duration::from_secs(3),
            1,
            Err("psql2: does not stream".into()),
        ));
        assert_eq!(
            c.lease_deadline(),
            Some(vouched_end),
            "a refusal extends nothing"
        );
        c.on_vouched(round(Duration::from_secs(4), 0, Ok(Duration::from_secs(3))));
        assert_eq!(
            c.lease_deadline(),
            Some(vouched_end),
            "a round for another epoch counts for nothing"
        );
        c.on_lease_expired(vouched_end);
        assert_eq!(c.lease_deadline(), None, "fenced when the vouches end");
        c.on_vouched(round(Duration::from_secs(5), 1, Ok(Duration::from_secs(3))));
        assert_eq!(c.lease_deadline(), None, "a vouch never lifts a fence");
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_that_vouched_acts_on_no_other_goal_until_the_vouch_ends() {
        let dir = tempfile::tempdir().unwrap();
        let link = ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 0,
        };
        let mut c = core(dir.path(), link, 1);
        let standby = v1::Goal {
            upstream: Some(v1::Endpoint {
                host: "127.0.0.2".into(),
                port: 5432,
            }),
            upstream_node: "psql2".into(),
            failsafe_ms: 60_000,
            ..goal_wire(GoalState::Standby, 1)
        };
        answered(&mut c, Instant::now(), standby);
        c.on_event(WorkerEvent::Observed {
            obs: Ok(PgObservation {
                role: ServerRole::Standby,
                streaming: true,
                upstream_node: Some(NodeId::new("psql2").unwrap()),
                ..PgObservation::empty()
            }),
            postmaster_pid: None,
            tls_error: None,
        });
        unanswered(&mut c);
        // Two report intervals without an answer: the monitors are out of reach.
        tokio::time::advance(Duration::from_secs(1)).await;
        let psql2 = NodeId::new("psql2").unwrap();
        let length = c
            .vouching()
            .grant(&psql2, Epoch(1), Duration::from_secs(10), Instant::now())
            .unwrap();
        assert_eq!(length, Duration::from_secs(3), "capped at the lease");
        assert!(c.observed_state().vouch_left_ms > 3000);
        c.on_goal(goal_wire(GoalState::StopReplication, 1), "watch");
        assert_eq!(c.job().goal, None, "held while the vouch binds");
        assert_eq!(c.step, "held: vouched for psql2");
        let until = c.hold.expect("a wake-up at the vouch's end");
        assert!(
            c.vouching()
                .grant(&psql2, Epoch(1), length, Instant::now())
                .is_err(),
            "no new vouch once the goal left the primary"
        );
        tokio::time::sleep_until(until).await;
        assert_eq!(
            c.job().goal.map(|g| g.state),
            Some(GoalState::StopReplication)
        );
        assert_eq!(c.observed_state().vouch_left_ms, 0);
    }

    #[tokio::test]
    async fn a_goal_older_than_the_one_taken_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let link = ScriptedMonitor {
            silent_after: Instant::now(),
            epoch: 0,
        };
        let mut c = core(dir.path(), link, 1);
        let at = |state, epoch, revision| v1::Goal {
            revision,
            ..goal_wire(state, epoch)
        };
        c.on_goal(at(GoalState::Fenced, 1, 7), "watch");
        c.on_goal(at(GoalState::Primary, 1, 6), "report");
        assert_eq!(c.goal.as_ref().map(|g| g.state), Some(GoalState::Fenced));
        c.on_goal(at(GoalState::Maintenance, 2, 1), "report");
        assert_eq!(
            c.goal.as_ref().map(|g| (g.state, g.epoch)),
            Some((GoalState::Maintenance, Epoch(2))),
            "a newer epoch counts whatever its revision"
        );
    }
}
