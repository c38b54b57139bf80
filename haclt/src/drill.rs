//! `haclt drill SCENARIO`: runs a fault against the live cluster while a writer commits rows
//! through the current primary, then measures what the clients saw: the longest time without
//! an acknowledged write, how many writes were acknowledged, how many of those the final
//! primary lacks, the old and new primary, and when each ejabberd node served the new primary.
//! Writers on other ways to the primary (`--via-proxy HOST:PORT`: a proxy such as HAProxy with
//! the agents' `/primary` checks; `--via-uri`: the multi-host URI of `haclt show uri`) run beside
//! the direct writer, each measured the same way.
//!
//! Invariants:
//! - a write counts as acknowledged only when its COMMIT returned success; an attempt that timed
//!   out or failed is not counted (its outcome is unknown, so it can be neither lost nor kept);
//! - every acknowledged row is looked up on the final primary before the verdict: a missing row
//!   is a lost write and makes the command fail, whatever else happened;
//! - the faults themselves are injected by the target's agent (or the monitor leader) and undone
//!   by them after `--duration`: if this command dies, the cluster still recovers;
//! - with an operator certificate (`[tls]`), every database session is TLS with full
//!   verification (the server's certificate chains to the cluster CA and names the address
//!   connected to) and presents that certificate for `cert` authentication: no password exists,
//!   and nothing falls back to plaintext. Plaintext sessions are for `--dev` clusters only.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use ha_proto::v1;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::tls::MakeTlsConnect;

use crate::client::{Failure, Monitors};
use ha_pki::error_chain;

/// Pause between two writes: enough resolution for the unavailability figure without
/// saturating the small machines the drills run on.
const WRITE_PACE: Duration = Duration::from_millis(5);
/// Writes acknowledged before the fault is injected (the writer demonstrably works).
const BASELINE_WRITES: u64 = 20;
const POLL: Duration = Duration::from_millis(100);
/// Allowance for an order to reach its agent (with the next report, every 500 ms by default).
const ORDER_DELIVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// A planned switchover to the best standby.
    Switchover,
    /// kill -9 of the primary's postmaster and of its agent.
    CrashPrimary,
    /// SIGSTOP of the primary's PostgreSQL and agent for `--duration`.
    FreezePrimary,
    /// The primary's node cut off from monitors and peers for `--duration`.
    PartitionPrimary,
    /// The monitor leader exits abruptly (monitors need `allow_drills = true`).
    KillMonitorLeader,
}

impl Scenario {
    /// The name on the command line (and in the JSON report).
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

/// The command's options besides the scenario.
#[derive(Debug, Clone)]
pub struct Options {
    pub group: String,
    /// How long a freeze or partition lasts.
    pub duration: Duration,
    /// Bound on the whole drill after the fault (convergence included).
    pub wait: Duration,
    pub db_user: String,
    pub database: String,
    /// The operator certificate the writer presents (verify-full TLS); `None`: plaintext.
    pub tls: Option<Arc<ha_pki::ClientTls>>,
    /// Bound on one connect or one INSERT: a frozen or cut-off primary must not hold the
    /// writer (`--write-timeout`).
    pub write_timeout: Duration,
    /// Other ways to the primary, each with a writer of its own.
    pub via: Vec<Via>,
}

/// A way to the primary other than its endpoint in the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A proxy that forwards to the primary (HAProxy with the agents' `/primary` checks).
    Proxy { host: String, port: u16 },
    /// The read-write URI `haclt show uri` prints: the client tries the group's nodes in turn
    /// and keeps the first that accepts writes (`target_session_attrs=read-write`).
    Uri,
}

impl Via {
    /// `HOST:PORT` of a proxy (`--via-proxy`).
    pub fn proxy(text: &str) -> Result<Self, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?}: expected HOST:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("{text:?}: the port must be a number from 1 to 65535"))?;
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() || port == 0 {
            return Err(format!("{text:?}: expected HOST:PORT"));
        }
        Ok(Via::Proxy {
            host: host.to_owned(),
            port,
        })
    }

    fn name(&self) -> String {
        match self {
            Via::Proxy { host, port } => format!("proxy {host}:{port}"),
            Via::Uri => "uri".to_owned(),
        }
    }
}

/// What a writer on another way to the primary saw (fields as in [`Report`]).
#[derive(Debug, Clone, Serialize)]
pub struct ViaReport {
    pub via: String,
    pub write_unavailable_ms: u64,
    pub acknowledged_writes: u64,
    pub lost_writes: u64,
}

/// The figures, printed as a table or as JSON (`--json`; fields are only ever added).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub group: String,
    /// False when the cluster did not recover within `--wait` (the figures are partial).
    pub converged: bool,
    /// The longest time between two consecutive acknowledged writes.
    pub write_unavailable_ms: u64,
    pub acknowledged_writes: u64,
    pub lost_writes: u64,
    pub old_primary: String,
    pub new_primary: String,
    pub old_epoch: u64,
    pub new_epoch: u64,
    pub ejabberd: Vec<EjabberdRecovery>,
    /// The writers of `--via-proxy` and `--via-uri`, in the order given.
    pub via: Vec<ViaReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EjabberdRecovery {
    pub node: String,
    /// From the fault to the moment the node's agent verified the final primary; 0 when it
    /// already used it before the fault; null when it did not within `--wait`.
    pub recovered_ms: Option<u64>,
}

/// A database endpoint (the primary's, from the status).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
}

/// Where a writer connects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// One server: the primary's endpoint (followed through the status).
    Server(Target),
    /// A TCP proxy in front of the PostgreSQL nodes: with TLS, the server certificate must be
    /// a PostgreSQL node's of the cluster CA (the proxy's name is in none of them).
    Proxy(Target),
    /// A multi-host URI; the client finds the writable server itself (`hosts` of them).
    Uri { uri: String, hosts: u32 },
}

/// What the writer reports while it runs.
#[derive(Debug, Clone, Default)]
struct Progress {
    acked: u64,
    last_ack: Option<(Instant, Route)>,
}

/// What the writer hands back when stopped.
#[derive(Debug, Default)]
struct Written {
    acked: BTreeSet<i64>,
    max_gap: Duration,
    last_ack: Option<Instant>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn group_of<'a>(s: &'a v1::StatusResponse, name: &str) -> Result<&'a v1::GroupStatus, Failure> {
    let g = if name.is_empty() {
        s.groups.first()
    } else {
        s.groups.iter().find(|g| g.name == name)
    };
    g.ok_or_else(|| Failure::NotFound(format!("group {name:?}")))
}

fn target_of(s: &v1::StatusResponse, node: &str) -> Option<Target> {
    let n = s.nodes.iter().find(|n| n.name == node)?;
    let e = n.endpoint.as_ref()?;
    Some(Target {
        host: e.host.clone(),
        port: u16::try_from(e.port).ok()?,
    })
}

fn leader_of(s: &v1::StatusResponse) -> Option<u64> {
    s.monitors.iter().find(|m| m.leader).map(|m| m.id)
}

/// A session on the server at `t` (TLS with the operator certificate when there is one).
async fn connect(t: &Target, o: &Options) -> Result<tokio_postgres::Client, String> {
    connect_route(&Route::Server(t.clone()), o).await
}

/// A session through `route`. A URI's own `connect_timeout` bounds each of its hosts, so its
/// whole attempt gets that much per host on top of `--write-timeout`.
async fn connect_route(route: &Route, o: &Options) -> Result<tokio_postgres::Client, String> {
    let (mut config, bound) = match route {
        Route::Server(t) | Route::Proxy(t) => {
            let mut config = tokio_postgres::Config::new();
            config
                .host(&t.host)
                .port(t.port)
                .user(&o.db_user)
                .dbname(&o.database)
                .connect_timeout(o.write_timeout);
            (config, o.write_timeout)
        }
        Route::Uri { uri, hosts } => {
            let config: tokio_postgres::Config = uri
                .parse()
                .map_err(|e| format!("{uri}: {}", error_chain(&e)))?;
            let per_host = config.get_connect_timeout().copied().unwrap_or_default();
            (config, o.write_timeout + per_host * *hosts)
        }
    };
    config.application_name("haclt-drill");
    let t = route.label();
    match &o.tls {
        Some(tls) => {
            let mut rustls = match route {
                Route::Proxy(_) => (*tls
                    .through_proxy(ha_pki::Role::Postgres)
                    .map_err(|e| format!("{t}: {e}"))?)
                .clone(),
                Route::Server(_) | Route::Uri { .. } => (*tls.current()).clone(),
            };
            // The monitors' config offers HTTP/2; PostgreSQL 15 negotiates no ALPN.
            rustls.alpn_protocols.clear();
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            open(
                &config,
                tokio_postgres_rustls::MakeRustlsConnect::new(rustls),
                &t,
                bound,
            )
            .await
        }
        None => open(&config, tokio_postgres::NoTls, &t, bound).await,
    }
}

impl Route {
    /// How errors name it.
    fn label(&self) -> String {
        match self {
            Route::Server(t) | Route::Proxy(t) => format!("{}:{}", t.host, t.port),
            Route::Uri { uri, .. } => uri.clone(),
        }
    }
}

async fn open<T>(
    config: &tokio_postgres::Config,
    tls: T,
    t: &str,
    timeout: Duration,
) -> Result<tokio_postgres::Client, String>
where
    T: MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, conn) = tokio::time::timeout(timeout, config.connect(tls))
        .await
        .map_err(|_| format!("{t}: connect timed out"))?
        .map_err(|e| format!("{t}: {}", error_chain(&e)))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Commits one row per attempt through whatever `targets` names (the primary of the moment,
/// or a fixed route), until `stop` is set.
async fn writer(
    run: String,
    options: Options,
    mut targets: watch::Receiver<Option<Route>>,
    progress: watch::Sender<Progress>,
    stop: watch::Receiver<bool>,
) -> Written {
    let mut out = Written::default();
    let mut session: Option<(Route, tokio_postgres::Client)> = None;
    let mut seq: i64 = 0;
    while !*stop.borrow() {
        let target = targets.borrow_and_update().clone();
        let Some(target) = target else {
            tokio::time::sleep(WRITE_PACE).await;
            continue;
        };
        if session.as_ref().is_some_and(|(t, _)| *t != target) {
            session = None;
        }
        if session.is_none() {
            match connect_route(&target, &options).await {
                Ok(c) => session = Some((target.clone(), c)),
                Err(e) => {
                    tracing::debug!(error = %e, "writer cannot connect");
                    tokio::time::sleep(WRITE_PACE * 4).await;
                    continue;
                }
            }
        }
        let Some((_, client)) = &session else {
            continue;
        };
        seq += 1;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&run, &seq];
        let insert = client.execute(
            "INSERT INTO haclt_drill (run, seq) VALUES ($1, $2)",
            &params,
        );
        match tokio::time::timeout(options.write_timeout, insert).await {
            Ok(Ok(_)) => {
                let now = Instant::now();
                if let Some(last) = out.last_ack {
                    out.max_gap = out.max_gap.max(now - last);
                }
                out.last_ack = Some(now);
                out.acked.insert(seq);
                progress.send_modify(|p| {
                    p.acked += 1;
                    p.last_ack = Some((now, target.clone()));
                });
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, seq, "write refused");
                session = None;
            }
            Err(_) => {
                tracing::debug!(seq, "write timed out");
                session = None;
            }
        }
        tokio::time::sleep(WRITE_PACE).await;
    }
    out
}

/// The running writer: where it writes, what it acknowledged so far, how to stop it.
struct Writer {
    target: watch::Sender<Option<Route>>,
    progress: watch::Receiver<Progress>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Written>,
}

impl Writer {
    fn start(run: &str, o: &Options, first: Route) -> Self {
        let (target, targets) = watch::channel(Some(first));
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(writer(
            run.to_owned(),
            o.clone(),
            targets,
            progress_tx,
            stop_rx,
        ));
        Self {
            target,
            progress,
            stop,
            task,
        }
    }

    /// Whether a write was acknowledged by `target` after `after`.
    fn acked_by_since(&self, target: Option<&Target>, after: Instant) -> bool {
        self.progress
            .borrow()
            .last_ack
            .as_ref()
            .is_some_and(|(at, r)| {
                *at > after && target.is_some_and(|t| *r == Route::Server(t.clone()))
            })
    }

    /// Whether any write was acknowledged after `after`.
    fn acked_since(&self, after: Instant) -> bool {
        self.progress
            .borrow()
            .last_ack
            .as_ref()
            .is_some_and(|(at, _)| *at > after)
    }

    async fn stop(self) -> Written {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// Runs one drill; returns its figures, or the failure to exit with. The figures are printed
/// by the caller in both cases: a drill that lost writes or did not converge still says how
/// far it got.
pub async fn run(
    m: &mut Monitors,
    scenario: Scenario,
    o: &Options,
    request_id: String,
    now_unix_ms: impl Fn() -> u64,
) -> Result<Report, (Option<Report>, Failure)> {
    let bare = |f: Failure| (None, f);
    let before = status(m, Instant::now() + o.wait).await.map_err(bare)?;
    let group = group_of(&before, &o.group).map_err(bare)?.clone();
    if group.primary.is_empty() {
        return Err(bare(Failure::Refused(format!(
            "group {} has no primary",
            group.name
        ))));
    }
    let old_primary = group.primary.clone();
    let old_target = target_of(&before, &old_primary).ok_or_else(|| {
        bare(Failure::Other(format!(
            "no endpoint known for {old_primary}"
        )))
    })?;

    let setup = async {
        let c = connect(&old_target, o).await?;
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS haclt_drill (run text NOT NULL, seq bigint NOT NULL, \
             at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run, seq))",
        )
        .await
        .map_err(|e| e.to_string())
    };
    setup.await.map_err(|e| {
        bare(Failure::Other(format!(
            "cannot prepare the drill table on {old_primary}: {e}"
        )))
    })?;

    let mut writer = Writer::start(&request_id, o, Route::Server(old_target.clone()));
    let mut vias = Vec::new();
    for (i, via) in o.via.iter().enumerate() {
        let route = via_route(via, &before, &group.name, o).map_err(bare)?;
        let run = format!("{request_id}-via{i}");
        let w = Writer::start(&run, o, route);
        vias.push(ViaWriter {
            name: via.name(),
            run,
            writer: w,
        });
    }
    // Ten write timeouts (10 s by default): a slower machine that needs a longer timeout per
    // write gets a proportionally longer baseline.
    let baseline_bound = o.write_timeout * 10;
    let mut slow = None;
    for (name, w) in std::iter::once((old_primary.clone(), &mut writer))
        .chain(vias.iter_mut().map(|v| (v.name.clone(), &mut v.writer)))
    {
        let ok = matches!(
            tokio::time::timeout(
                baseline_bound,
                w.progress.wait_for(|p| p.acked >= BASELINE_WRITES),
            )
            .await,
            Ok(Ok(_))
        );
        if !ok {
            slow = Some(name);
            break;
        }
    }
    if let Some(name) = slow {
        writer.stop().await;
        for v in vias {
            v.writer.stop().await;
        }
        return Err(bare(Failure::NotConverged(format!(
            "the writer could not commit {BASELINE_WRITES} rows through {name} within {baseline_bound:?}"
        ))));
    }

    let fault_at = Instant::now();
    let fault_unix_ms = now_unix_ms();
    let deadline = fault_at + o.wait;
    tracing::info!(scenario = %scenario.name(), %old_primary, "injecting the fault");
    if let Err(f) = inject(m, scenario, o, &group, &old_primary, &request_id).await {
        writer.stop().await;
        return Err(bare(f));
    }
    let fault = Injected {
        scenario,
        group: &group.name,
        old_primary: &old_primary,
        old_leader: leader_of(&before),
        request_id: &request_id,
        at: fault_at,
        duration: o.duration,
    };
    let waited = await_recovery(m, &fault, &writer, &vias, deadline).await;
    let written = writer.stop().await;
    let mut via_written = Vec::new();
    for v in vias {
        via_written.push((v.name, v.run, v.writer.stop().await));
    }
    let (recovered, mut last_wait) = match waited {
        Ok(Ok(s)) => (Some(s), String::new()),
        Ok(Err(why)) => (None, why),
        Err(refusal) => return Err(bare(refusal)),
    };

    let end = match &recovered {
        Some(s) => s.clone(),
        None => status(m, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap_or_else(|_| before.clone()),
    };
    let g = group_of(&end, &group.name).map_err(bare)?.clone();
    let ejabberd = if recovered.is_some() {
        ejabberd_recovery(m, &group.name, &g, deadline, fault_unix_ms).await
    } else {
        ejabberd_nodes(&end, &group.name)
            .map(|n| EjabberdRecovery {
                node: n.name.clone(),
                recovered_ms: None,
            })
            .collect()
    };
    if let Some(e) = ejabberd.iter().find(|e| e.recovered_ms.is_none()) {
        last_wait = format!("ejabberd {} does not serve {} yet", e.node, g.primary);
    }
    let converged = recovered.is_some() && ejabberd.iter().all(|e| e.recovered_ms.is_some());
    let unavailable = |w: &Written| {
        let mut gap = w.max_gap;
        if recovered.is_none()
            && let Some(last) = w.last_ack
        {
            gap = gap.max(Instant::now() - last);
        }
        millis(gap)
    };
    let final_target = target_of(&end, &g.primary);
    let verify_by = deadline.max(Instant::now() + Duration::from_secs(10));
    let lost_of = |run: &str, w: &Written| {
        let t = final_target.clone();
        let run = run.to_owned();
        let acked = w.acked.clone();
        async move {
            match t {
                Some(t) => count_lost(&t, o, &run, &acked, verify_by).await,
                None => Err("no primary to verify the rows on".to_owned()),
            }
        }
    };
    // Every writer's rows are looked up; any missing row fails the drill.
    let mut checks = vec![(
        "the direct writer".to_owned(),
        lost_of(&request_id, &written).await,
    )];
    let mut via = Vec::new();
    for (name, run, w) in &via_written {
        let n = lost_of(run, w).await;
        via.push(ViaReport {
            via: name.clone(),
            write_unavailable_ms: unavailable(w),
            acknowledged_writes: u64::try_from(w.acked.len()).unwrap_or(u64::MAX),
            lost_writes: *n.as_ref().unwrap_or(&0),
        });
        checks.push((format!("the writer through {name}"), n));
    }
    let report = Report {
        scenario,
        group: group.name.clone(),
        converged,
        write_unavailable_ms: unavailable(&written),
        acknowledged_writes: u64::try_from(written.acked.len()).unwrap_or(u64::MAX),
        lost_writes: *checks[0].1.as_ref().unwrap_or(&0),
        old_primary,
        new_primary: g.primary.clone(),
        old_epoch: group.epoch,
        new_epoch: g.epoch,
        ejabberd,
        via,
    };
    let missing: Vec<String> = checks
        .iter()
        .filter_map(|(who, n)| match n {
            Ok(0) => None,
            Ok(n) => Some(format!("{n} of {who}")),
            Err(e) => Some(format!("{who}: cannot verify the rows: {e}")),
        })
        .collect();
    if checks.iter().any(|(_, n)| matches!(n, Ok(1..))) {
        return Err((
            Some(report),
            Failure::Other(format!(
                "acknowledged writes are missing on {}: {}",
                g.primary,
                missing.join("; ")
            )),
        ));
    }
    if !missing.is_empty() {
        return Err((Some(report), Failure::NotConverged(missing.join("; "))));
    }
    if report.converged {
        Ok(report)
    } else {
        Err((Some(report), Failure::NotConverged(last_wait)))
    }
}

/// A writer on another way to the primary.
struct ViaWriter {
    name: String,
    /// Its rows' `run` in the drill table.
    run: String,
    writer: Writer,
}

/// The route of `via` for the group's state in `status`.
fn via_route(
    via: &Via,
    status: &v1::StatusResponse,
    group: &str,
    o: &Options,
) -> Result<Route, Failure> {
    match via {
        Via::Proxy { host, port } => Ok(Route::Proxy(Target {
            host: host.clone(),
            port: *port,
        })),
        Via::Uri => {
            let hosts = status
                .nodes
                .iter()
                .filter(|n| n.group == group && n.kind() == v1::NodeKind::Postgres)
                .count();
            let uri = crate::uri::uri(
                &crate::output::Status::from(status.clone()),
                &crate::uri::UriOptions {
                    group,
                    target: crate::uri::Target::Primary,
                    dbname: &o.database,
                    user: Some(&o.db_user),
                    sslrootcert: None,
                    sslcert: None,
                    sslkey: None,
                },
            )?;
            Ok(Route::Uri {
                uri,
                hosts: u32::try_from(hosts).unwrap_or(u32::MAX),
            })
        }
    }
}

/// The fault just injected, as `await_recovery` needs it.
struct Injected<'a> {
    scenario: Scenario,
    group: &'a str,
    old_primary: &'a str,
    old_leader: Option<u64>,
    request_id: &'a str,
    at: Instant,
    duration: Duration,
}

/// Polls the status, keeps the writer on the primary of the moment, and returns the status in
/// which the cluster is back: the scenario's condition holds and the primary of that moment
/// acknowledged a write after the fault. `Ok(Err(why))` when `deadline` passed first (with what
/// it was waiting for); `Err` when the target's agent refused the order.
async fn await_recovery(
    m: &mut Monitors,
    fault: &Injected<'_>,
    writer: &Writer,
    vias: &[ViaWriter],
    deadline: Instant,
) -> Result<Result<v1::StatusResponse, String>, Failure> {
    // A timed fault starts when the order reaches the agent, with its next report.
    let resumed_after = match fault.scenario {
        Scenario::FreezePrimary | Scenario::PartitionPrimary => {
            fault.at + fault.duration + ORDER_DELIVERY
        }
        Scenario::Switchover | Scenario::CrashPrimary | Scenario::KillMonitorLeader => fault.at,
    };
    let mut waiting = String::from("no status yet");
    while Instant::now() < deadline {
        let s = match status(m, deadline).await {
            Ok(s) => s,
            Err(f) => return Ok(Err(f.to_string())),
        };
        if let Some(refusal) = refused(&s, fault.old_primary, fault.request_id) {
            return Err(Failure::Refused(refusal));
        }
        let Ok(g) = group_of(&s, fault.group) else {
            waiting = format!("group {} is missing from the status", fault.group);
            tokio::time::sleep(POLL).await;
            continue;
        };
        let primary = target_of(&s, &g.primary);
        writer
            .target
            .send_replace(primary.clone().map(Route::Server));
        let settled = g.pending.is_empty() && !g.primary.is_empty();
        let condition = match fault.scenario {
            Scenario::Switchover | Scenario::CrashPrimary => {
                if settled && g.primary != fault.old_primary {
                    Ok(())
                } else {
                    Err(format!("waiting for a new primary: {}", g.pending))
                }
            }
            Scenario::FreezePrimary | Scenario::PartitionPrimary => {
                if Instant::now() < resumed_after {
                    Err("fault in progress".to_owned())
                } else if settled {
                    Ok(())
                } else {
                    Err(format!("waiting for the group to settle: {}", g.pending))
                }
            }
            Scenario::KillMonitorLeader => match leader_of(&s) {
                Some(l) if Some(l) != fault.old_leader => Ok(()),
                _ => Err("waiting for a new monitor leader".to_owned()),
            },
        };
        let behind = vias.iter().find(|v| !v.writer.acked_since(resumed_after));
        match (condition, behind) {
            (Ok(()), _) if !writer.acked_by_since(primary.as_ref(), resumed_after) => {
                waiting = format!("waiting for a write acknowledged by {}", g.primary);
            }
            (Ok(()), Some(v)) => waiting = format!("waiting for a write through {}", v.name),
            (Ok(()), None) => return Ok(Ok(s)),
            (Err(w), _) => waiting = w,
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(Err(waiting))
}

/// The status, retried while no leader answers (a leader change in progress).
async fn status(m: &mut Monitors, deadline: Instant) -> Result<v1::StatusResponse, Failure> {
    m.call_until(deadline, |mut c| async move {
        c.status(v1::StatusRequest { linearizable: true }).await
    })
    .await
}

async fn inject(
    m: &mut Monitors,
    scenario: Scenario,
    o: &Options,
    group: &v1::GroupStatus,
    primary: &str,
    request_id: &str,
) -> Result<(), Failure> {
    let (target, fault) = match scenario {
        Scenario::Switchover => {
            let req = v1::SwitchoverRequest {
                request_id: request_id.to_owned(),
                group: group.name.clone(),
                to_node: String::new(),
            };
            m.call(|mut c| {
                let req = req.clone();
                async move { c.switchover(req).await }
            })
            .await?;
            return Ok(());
        }
        Scenario::KillMonitorLeader => ("", v1::Fault::KillMonitorLeader),
        Scenario::CrashPrimary => (primary, v1::Fault::Crash),
        Scenario::FreezePrimary => (primary, v1::Fault::Freeze),
        Scenario::PartitionPrimary => (primary, v1::Fault::Partition),
    };
    let req = v1::StartDrillRequest {
        request_id: request_id.to_owned(),
        target: target.to_owned(),
        fault: fault.into(),
        duration_ms: millis(o.duration),
    };
    m.call(|mut c| {
        let req = req.clone();
        async move { c.start_drill(req).await }
    })
    .await?;
    Ok(())
}

/// The agent's refusal of this drill, as it reports it in `last_error`.
fn refused(s: &v1::StatusResponse, node: &str, id: &str) -> Option<String> {
    let n = s.nodes.iter().find(|n| n.name == node)?;
    let marker = format!("drill {id} ");
    n.last_error
        .split("; ")
        .find(|part| part.starts_with(&marker))
        .map(|part| format!("{node}: {part}"))
}

fn ejabberd_nodes<'a>(
    s: &'a v1::StatusResponse,
    group: &'a str,
) -> impl Iterator<Item = &'a v1::NodeStatus> {
    s.nodes.iter().filter(move |n| {
        n.kind == i32::from(v1::NodeKind::Ejabberd) && (n.group == group || n.group.is_empty())
    })
}

/// When each ejabberd node of `group` verified the primary and epoch of `g` (relative to the
/// fault; 0 when before it), or `None` while it has not.
fn ejabberd_figures(
    s: &v1::StatusResponse,
    group: &str,
    g: &v1::GroupStatus,
    fault_unix_ms: u64,
) -> Vec<EjabberdRecovery> {
    ejabberd_nodes(s, group)
        .map(|n| EjabberdRecovery {
            node: n.name.clone(),
            recovered_ms: n.ejabberd.as_ref().and_then(|e| {
                (e.applied_node == g.primary && e.applied_epoch >= g.epoch)
                    .then(|| e.applied_at_unix_ms.saturating_sub(fault_unix_ms))
            }),
        })
        .collect()
}

/// Waits (until `deadline`) for every ejabberd node to serve the final primary.
async fn ejabberd_recovery(
    m: &mut Monitors,
    group: &str,
    g: &v1::GroupStatus,
    deadline: Instant,
    fault_unix_ms: u64,
) -> Vec<EjabberdRecovery> {
    let mut out = Vec::new();
    loop {
        let Ok(s) = status(m, deadline).await else {
            return out;
        };
        out = ejabberd_figures(&s, group, g, fault_unix_ms);
        if out.iter().all(|e| e.recovered_ms.is_some()) || Instant::now() >= deadline {
            return out;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How many of `acked` the primary at `t` lacks (retried until `deadline`: it may still be
/// starting).
async fn count_lost(
    t: &Target,
    o: &Options,
    run: &str,
    acked: &BTreeSet<i64>,
    deadline: Instant,
) -> Result<u64, String> {
    loop {
        let attempt = async {
            let c = connect(t, o).await?;
            let rows = c
                .query("SELECT seq FROM haclt_drill WHERE run = $1", &[&run])
                .await
                .map_err(|e| e.to_string())?;
            let present: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
            Ok::<u64, String>(u64::try_from(acked.difference(&present).count()).unwrap_or(u64::MAX))
        };
        match attempt.await {
            Ok(n) => return Ok(n),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// The report for people.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "drill {} on group {}{}\n",
        r.scenario.name(),
        r.group,
        if r.converged { "" } else { " (NOT CONVERGED)" }
    );
    out.push_str(&format!(
        "  primary            {} -> {} (epoch {} -> {})\n",
        r.old_primary, r.new_primary, r.old_epoch, r.new_epoch
    ));
    out.push_str(&format!(
        "  write unavailable  {} ms\n  acknowledged       {} writes\n  lost               {}\n",
        r.write_unavailable_ms, r.acknowledged_writes, r.lost_writes
    ));
    for v in &r.via {
        out.push_str(&format!(
            "  through {}  write unavailable {} ms, acknowledged {}, lost {}\n",
            v.via, v.write_unavailable_ms, v.acknowledged_writes, v.lost_writes
        ));
    }
    for e in &r.ejabberd {
        match e.recovered_ms {
            Some(ms) => out.push_str(&format!(
                "  ejabberd {}  serving again after {ms} ms\n",
                e.node
            )),
            None => out.push_str(&format!(
                "  ejabberd {}  NOT serving the new primary\n",
                e.node
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node_status(name: &str, kind: v1::NodeKind, last_error: &str) -> v1::NodeStatus {
        v1::NodeStatus {
            name: name.into(),
            kind: kind.into(),
            group: "main".into(),
            last_error: last_error.into(),
            endpoint: Some(v1::Endpoint {
                host: "127.0.0.1".into(),
                port: 5432,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_refusal_is_found_in_the_targets_last_error() {
        let s = v1::StatusResponse {
            nodes: vec![
                node_status(
                    "psql1",
                    v1::NodeKind::Postgres,
                    "drill r1 refused: allow_drills is false; lease expired",
                ),
                node_status(
                    "psql2",
                    v1::NodeKind::Postgres,
                    "drill r2 refused: allow_drills is false",
                ),
            ],
            ..Default::default()
        };
        assert_eq!(
            refused(&s, "psql1", "r1").as_deref(),
            Some("psql1: drill r1 refused: allow_drills is false")
        );
        assert_eq!(refused(&s, "psql1", "r2"), None, "another drill's refusal");
        assert_eq!(refused(&s, "psql3", "r1"), None);
        assert_eq!(
            target_of(&s, "psql2"),
            Some(Target {
                host: "127.0.0.1".into(),
                port: 5432
            })
        );
    }

    #[test]
    fn ejabberd_recovery_counts_from_the_fault_to_the_verified_new_primary() {
        let follower = |name: &str, node: &str, epoch: u64, at: u64| {
            let mut n = node_status(name, v1::NodeKind::Ejabberd, "");
            n.ejabberd = Some(v1::EjabberdObservation {
                applied_node: node.into(),
                applied_epoch: epoch,
                applied_at_unix_ms: at,
                ..Default::default()
            });
            n
        };
        let s = v1::StatusResponse {
            nodes: vec![
                node_status("psql2", v1::NodeKind::Postgres, ""),
                follower("e1", "psql2", 4, 10_700),
                follower("e2", "psql1", 3, 9_000),
                follower("e3", "psql2", 4, 9_500),
                node_status("e4", v1::NodeKind::Ejabberd, ""),
            ],
            ..Default::default()
        };
        let g = v1::GroupStatus {
            name: "main".into(),
            primary: "psql2".into(),
            epoch: 4,
            ..Default::default()
        };
        let figures: Vec<(String, Option<u64>)> = ejabberd_figures(&s, "main", &g, 10_000)
            .into_iter()
            .map(|e| (e.node, e.recovered_ms))
            .collect();
        assert_eq!(
            figures,
            [
                ("e1".to_owned(), Some(700)),
                ("e2".to_owned(), None),
                ("e3".to_owned(), Some(0)),
                ("e4".to_owned(), None),
            ]
        );
    }

    #[test]
    fn a_proxy_is_host_and_port() {
        assert_eq!(
            Via::proxy("10.0.0.1:5000"),
            Ok(Via::Proxy {
                host: "10.0.0.1".into(),
                port: 5000
            })
        );
        assert_eq!(
            Via::proxy("[fd00::1]:5000"),
            Ok(Via::Proxy {
                host: "fd00::1".into(),
                port: 5000
            })
        );
        for bad in ["10.0.0.1", "10.0.0.1:", ":5000", "h:0", "h:70000", "h:x"] {
            assert!(Via::proxy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_json_report_has_the_documented_fields() {
        let r = Report {
            scenario: Scenario::CrashPrimary,
            group: "main".into(),
            converged: true,
            write_unavailable_ms: 2100,
            acknowledged_writes: 900,
            lost_writes: 0,
            old_primary: "psql1".into(),
            new_primary: "psql2".into(),
            old_epoch: 3,
            new_epoch: 4,
            ejabberd: vec![EjabberdRecovery {
                node: "e1".into(),
                recovered_ms: Some(2500),
            }],
            via: vec![ViaReport {
                via: "uri".into(),
                write_unavailable_ms: 2300,
                acknowledged_writes: 850,
                lost_writes: 0,
            }],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["via"][0]["via"], "uri");
        assert_eq!(v["via"][0]["write_unavailable_ms"], 2300);
        assert!(table(&r).contains("through uri  write unavailable 2300 ms"));
        assert_eq!(v["scenario"], "crash-primary");
        assert_eq!(v["write_unavailable_ms"], 2100);
        assert_eq!(v["acknowledged_writes"], 900);
        assert_eq!(v["lost_writes"], 0);
        assert_eq!(
            (v["old_primary"].as_str(), v["new_primary"].as_str()),
            (Some("psql1"), Some("psql2"))
        );
        assert_eq!(v["ejabberd"][0]["node"], "e1");
        assert_eq!(v["ejabberd"][0]["recovered_ms"], 2500);
        let t = table(&r);
        assert!(
            t.contains("psql1 -> psql2") && t.contains("2100 ms") && t.contains("e1"),
            "{t}"
        );
    }
}
