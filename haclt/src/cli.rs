//! The `haclt` command line: argument parsing, configuration, and one function per command.
//! Every mutating command sends a fresh request id (retried calls reuse it), then waits until
//! the cluster shows the result or the `--wait` deadline passes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use ha_proto::v1;
use serde::Deserialize;
use tokio::time::Instant;

use crate::client::{Failure, Monitors, Transport};
use crate::output;

/// Operator CLI for the XMPP/PostgreSQL high-availability cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Configuration file (monitor addresses, credentials). Default: /etc/ha/haclt.toml, then
    /// $XDG_CONFIG_HOME/ha/haclt.toml (~/.config/ha/haclt.toml), the first that exists.
    #[arg(long, env = "HACLT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Monitor addresses (host:port), comma separated; overrides the file.
    #[arg(long, env = "HACLT_MONITORS", value_delimiter = ',', global = true)]
    pub monitors: Vec<String>,
    /// Talk plaintext gRPC to monitors started with `--dev` (never in production).
    #[arg(long, env = "HACLT_DEV", global = true)]
    pub dev: bool,
    /// Print what the command reports as JSON on stdout (`events`: one object per line);
    /// progress and errors stay on stderr, the exit codes are the same.
    #[arg(long, global = true)]
    pub json: bool,
    /// Per-call timeout.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, global = true)]
    pub timeout: Duration,
    #[command(flatten)]
    pub log: ha_log::LogArgs,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Every node, role, goal, epoch, LSN, lag and health, and the monitors.
    Status {
        /// Redraw every interval until interrupted.
        #[arg(long, value_parser = humantime::parse_duration, num_args = 0..=1, default_missing_value = "1s")]
        watch: Option<Duration>,
        /// Accept an answer from a follower's copy when no leader is reachable.
        #[arg(long)]
        stale_ok: bool,
    },
    /// The decision history with reasons.
    Events {
        /// Keep printing new events.
        #[arg(long)]
        follow: bool,
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Only the events about this node.
        #[arg(long)]
        node: Option<String>,
        /// Only the last N of the events asked for (with --follow: the last N, then every new
        /// one).
        #[arg(long)]
        count: Option<usize>,
    },
    /// Planned switchover to NODE (or the best standby).
    Switchover {
        /// The standby to promote (default: the best one, as for a failover).
        #[arg(long)]
        to: Option<String>,
        /// The group (default: the only one).
        #[arg(long, default_value = "")]
        group: String,
        /// How long to wait for the new primary; exit 75 when exceeded (the switchover
        /// goes on).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Promote a standby now (the primary is fenced first).
    Failover {
        /// Promote even a standby not known to hold every acknowledged write.
        #[arg(long)]
        allow_data_loss: bool,
        /// The group (default: the only one).
        #[arg(long, default_value = "")]
        group: String,
        /// How long to wait for the new primary; exit 75 when exceeded (the failover goes on).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Maintenance on or off for a node (on the primary: switchover first).
    Maintenance {
        action: OnOff,
        node: String,
        /// How long to wait for the node to reach (or leave) maintenance; exit 75 when
        /// exceeded (the change goes on).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Node settings and removal.
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// Group settings: the synchronous quorum, the lag a standby may have to join the
    /// synchronous set, and what happens when a synchronous standby stops streaming.
    Group {
        #[command(subcommand)]
        command: GroupCmd,
    },
    /// Monitor membership.
    Monitor {
        #[command(subcommand)]
        command: MonitorCmd,
    },
    /// Single-use join tokens for new nodes.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// What applications need to reach the cluster.
    Show {
        #[command(subcommand)]
        command: ShowCmd,
    },
    /// Node certificates the monitors signed.
    Cert {
        #[command(subcommand)]
        command: CertCmd,
    },
    /// The cluster CA and certificates (local files only; no monitor is contacted).
    Pki {
        #[command(subcommand)]
        command: crate::pki::PkiCmd,
    },
    /// Run a fault against the live cluster under a write load and measure what clients saw
    /// (write unavailability, acknowledged and lost writes, ejabberd recovery).
    Drill {
        scenario: crate::drill::Scenario,
        /// How long a freeze or partition lasts (the agent undoes it by itself).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The group whose primary is the target (default: the first group).
        #[arg(long, default_value = "")]
        group: String,
        /// Bound on the drill from the fault to a recovered cluster; exit 75 when exceeded.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: Duration,
        /// PostgreSQL role the writer connects as (TCP to the primary's endpoint; with `[tls]`,
        /// verify-full TLS presenting the operator certificate, which the agents' `clients`
        /// setting maps to this role).
        #[arg(long, default_value = "postgres")]
        db_user: String,
        /// Database holding the `haclt_drill` table the writer fills.
        #[arg(long, default_value = "postgres")]
        database: String,
        /// Bound on one connect or one INSERT of the writer: a frozen or cut-off primary must
        /// not hold it; the baseline writes before the fault get ten of them. Raise it where
        /// a TLS connection or a synchronous commit takes longer (software-emulated guests:
        /// about 2 s and 0.6 s).
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        write_timeout: Duration,
        /// Also write through a proxy at HOST:PORT that forwards to the primary (HAProxy with
        /// the agents' `/primary` checks) and measure it beside the direct writer; repeatable.
        #[arg(long, value_name = "HOST:PORT", value_parser = crate::drill::Via::proxy)]
        via_proxy: Vec<crate::drill::Via>,
        /// Also write through the read-write URI `haclt show uri` prints (the client finds the
        /// writable node itself) and measure it beside the direct writer.
        #[arg(long)]
        via_uri: bool,
    },
    /// Print a systemd unit file.
    Systemd {
        unit: crate::systemd::Unit,
        /// The daemon's configuration: the unit passes it to the daemon, and the agent's unit
        /// is derived from it (user, writable paths). Default: /etc/ha/monitor.toml or
        /// /etc/ha/agent.toml (`--role ejabberd`: /etc/ha/agent-ejabberd.toml).
        #[arg(long)]
        config_path: Option<PathBuf>,
        /// Where the binary is installed.
        #[arg(long, default_value = "/usr/local/bin")]
        bin_dir: PathBuf,
        /// Agent only: write the unit for this role's default paths without reading the
        /// configuration (the packages' units).
        #[arg(long)]
        role: Option<crate::systemd::Role>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    Enable,
    Disable,
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Set a PostgreSQL node's candidate priority (0: never promote, to 100) or replication
    /// quorum membership.
    Set {
        /// The PostgreSQL node.
        node: String,
        setting: Setting,
        /// candidate-priority: 0 to 100; replication-quorum: true or false.
        value: String,
    },
    /// Remove a node from its group.
    Remove { node: String },
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Set one setting of a group (`status` shows them all).
    Set {
        setting: GroupSetting,
        /// sync-quorum: 1 or more; max-sync-lag-bytes: bytes; on-standby-loss: async (commits
        /// go on without a standby that stopped streaming; failover to it is refused until it
        /// is synchronous again) or wait (commits wait for it); failsafe: a duration such as
        /// 60s or 5m, at most 1h, 0 for off (how long a primary cut off from the monitors keeps
        /// serving while its synchronous standbys vouch for it).
        value: String,
        /// The group (default: the only one).
        #[arg(long, default_value = "")]
        group: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GroupSetting {
    SyncQuorum,
    MaxSyncLagBytes,
    OnStandbyLoss,
    Failsafe,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Setting {
    CandidatePriority,
    ReplicationQuorum,
}

#[derive(Debug, Subcommand)]
pub enum MonitorCmd {
    /// Add a monitor (start it with `join = true` and this id first).
    Add { id: u64, address: String },
    /// Remove a monitor; it stops by itself.
    Remove { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum ShowCmd {
    /// A multi-host libpq URI of the group's PostgreSQL nodes: with
    /// `target_session_attrs=read-write` libpq connects to whichever node is the writable
    /// primary, so an application follows a failover by reconnecting.
    Uri {
        /// The group.
        #[arg(long, default_value = "main")]
        group: String,
        /// A URI for reads that may lag: a standby if one answers, else the primary
        /// (`target_session_attrs=prefer-standby`).
        #[arg(long)]
        standby: bool,
        /// The database.
        #[arg(long, default_value = "postgres")]
        dbname: String,
        /// The database user (default: libpq's, the OS user or the certificate's).
        #[arg(long)]
        user: Option<String>,
        /// The cluster CA bundle: `sslmode=verify-full` checks each node's certificate and
        /// host name against it. Without it the URI says `sslmode=require`.
        #[arg(long)]
        sslrootcert: Option<PathBuf>,
        /// A client certificate for `cert` authentication (its name is the database user).
        #[arg(long, requires = "sslkey")]
        sslcert: Option<PathBuf>,
        /// The key of `--sslcert`.
        #[arg(long, requires = "sslcert")]
        sslkey: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a single-use join token for one node; it is printed once. The joining node can
    /// choose neither its name nor its address: both come from the token.
    Create {
        /// What the node runs.
        #[arg(long)]
        role: Role,
        /// The node's name (its certificate's name); operator, observer, monitor and the
        /// database roles are reserved.
        #[arg(long)]
        node: String,
        /// The address the node serves on (its endpoint's host and its certificate's name).
        #[arg(long)]
        address: String,
        /// How long the token admits its node.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The group the node joins (default: the only one).
        #[arg(long, default_value = "")]
        group: String,
    },
    /// Revoke an unused token by id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Revoke a node certificate by serial (hexadecimal, as the certificate_renewed and
    /// node_removed events show it): every monitor refuses it from then on, until it expires.
    /// `node remove` revokes all of a node's certificates by itself.
    Revoke { serial: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    Postgres,
    Ejabberd,
}

/// `haclt --config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub monitors: Vec<String>,
    /// Plaintext gRPC (clusters started with `--dev`).
    #[serde(default)]
    pub dev: bool,
    /// Mutual TLS with an operator certificate.
    pub tls: Option<TlsSection>,
}

/// `[tls]` of the haclt config: the cluster CA bundle and an operator certificate and key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Plaintext with `--dev` or `dev = true`; mutual TLS with a `[tls]` section; else a usage error.
fn transport(file: &ConfigFile, dev_flag: bool) -> Result<Transport, Failure> {
    if file.dev || dev_flag {
        return Ok(Transport::Plaintext);
    }
    let Some(tls) = &file.tls else {
        return Err(Failure::Usage(
            "no [tls] section in the --config file (operator certificate); pass --dev for a cluster started with --dev".into(),
        ));
    };
    ha_pki::install_crypto();
    let files = ha_pki::TlsFiles {
        ca_bundle: tls.ca.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
    };
    let client =
        ha_pki::ClientTls::load(files).map_err(|e| Failure::Usage(format!("[tls]: {e}")))?;
    Ok(Transport::Tls(std::sync::Arc::new(client)))
}

/// The system-wide configuration, looked for first when `--config` is not given.
pub const SYSTEM_CONFIG: &str = "/etc/ha/haclt.toml";

/// Where `haclt` looks for its configuration without `--config`, in order: the system file,
/// then the user's (`$XDG_CONFIG_HOME/ha/haclt.toml`, else `~/.config/ha/haclt.toml`).
pub fn config_candidates(
    xdg_config_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Vec<PathBuf> {
    let mut places = vec![PathBuf::from(SYSTEM_CONFIG)];
    let user = xdg_config_home
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            home.filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        });
    if let Some(dir) = user {
        places.push(dir.join("ha/haclt.toml"));
    }
    places
}

/// The first of `places` that exists.
pub fn find_config(places: &[PathBuf]) -> Option<&PathBuf> {
    places.iter().find(|p| p.exists())
}

/// `--config` when given (it must be readable); else the first file of [`config_candidates`];
/// else, with monitors on the command line, no file (today's `--monitors ... --dev`); else an
/// error naming every place tried.
fn load_config(cli: &Cli) -> Result<ConfigFile, Failure> {
    let places;
    let path = match &cli.config {
        Some(path) => path,
        None => {
            places = config_candidates(
                std::env::var_os("XDG_CONFIG_HOME"),
                std::env::var_os("HOME"),
            );
            match find_config(&places) {
                Some(p) => p,
                None if !cli.monitors.is_empty() => return Ok(ConfigFile::default()),
                None => {
                    let tried: Vec<String> =
                        places.iter().map(|p| p.display().to_string()).collect();
                    return Err(Failure::Usage(format!(
                        "no haclt configuration: tried {}; pass --config FILE (or --monitors)",
                        tried.join(", ")
                    )));
                }
            }
        }
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

fn request_id(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("haclt-{what}-{}-{nanos:x}", std::process::id())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Progress lines: a spinner on a terminal, plain lines otherwise.
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(100));
            Progress(Some(bar))
        } else {
            Progress(None)
        }
    }

    fn step(&self, msg: &str) {
        match &self.0 {
            Some(bar) => bar.set_message(msg.to_owned()),
            None => eprintln!("haclt: {msg}"),
        }
    }

    fn done(self, msg: &str) {
        match self.0 {
            Some(bar) => bar.finish_with_message(msg.to_owned()),
            None => eprintln!("haclt: {msg}"),
        }
    }
}

/// What a waiting command reached: its last line on stderr, and with `--json` one object
/// on stdout.
fn print_done(json: bool, done: &str) -> Result<(), Failure> {
    if json {
        println!("{}", serde_json::json!({ "done": done }));
    }
    Ok(())
}

/// An operation the monitors committed: its message, or with `--json` the message, the Raft
/// index it was committed at and the group's epoch after it.
fn print_operation(json: bool, r: &v1::OperationResponse) -> Result<(), Failure> {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "message": r.message,
                "committed_index": r.committed_index,
                "epoch": r.epoch,
            })
        );
    } else {
        println!("{}", r.message);
    }
    Ok(())
}

/// Prints one status answer; `redraw` clears the terminal first (only when stdout is one).
fn print_status(s: &output::Status, json: bool, redraw: bool) -> Result<(), Failure> {
    if json {
        let text = serde_json::to_string_pretty(s).map_err(|e| Failure::Other(e.to_string()))?;
        println!("{text}");
    } else {
        if redraw && std::io::stdout().is_terminal() {
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", output::status_table(s, unix_ms()));
    }
    Ok(())
}

async fn status(m: &mut Monitors, stale_ok: bool) -> Result<v1::StatusResponse, Failure> {
    match m
        .call(|mut c| async move { c.status(v1::StatusRequest { linearizable: true }).await })
        .await
    {
        Err(Failure::Unreachable(_)) if stale_ok => {
            m.call(|mut c| async move {
                c.status(v1::StatusRequest {
                    linearizable: false,
                })
                .await
            })
            .await
        }
        other => other,
    }
}

/// Polls the status until `done` says the goal is reached (returning its message) or `wait`
/// passes; prints each new step.
async fn converge(
    m: &mut Monitors,
    wait: Duration,
    progress: Progress,
    mut done: impl FnMut(&v1::StatusResponse) -> Result<String, String>,
) -> Result<String, Failure> {
    let deadline = Instant::now() + wait;
    let mut last_step = String::new();
    loop {
        let s = m
            .call_until(deadline, |mut c| async move {
                c.status(v1::StatusRequest { linearizable: true }).await
            })
            .await?;
        match done(&s) {
            Ok(msg) => {
                progress.done(&msg);
                return Ok(msg);
            }
            Err(step) => {
                if step != last_step {
                    progress.step(&step);
                    last_step = step;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Failure::NotConverged(last_step));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn group_named<'a>(s: &'a v1::StatusResponse, name: &str) -> Option<&'a v1::GroupStatus> {
    if name.is_empty() {
        s.groups.first()
    } else {
        s.groups.iter().find(|g| g.name == name)
    }
}

/// A new primary is in charge and nothing is pending.
fn promoted(
    s: &v1::StatusResponse,
    group: &str,
    old_epoch: u64,
    to: Option<&str>,
) -> Result<String, String> {
    let g = group_named(s, group).ok_or("group not found")?;
    if g.epoch <= old_epoch {
        return Err(format!(
            "waiting for promotion (epoch {}){}",
            g.epoch,
            if g.pending.is_empty() {
                String::new()
            } else {
                format!(": {}", g.pending)
            }
        ));
    }
    if let Some(t) = to
        && g.primary != t
    {
        return Err(format!("primary is {}, waiting for {t}", g.primary));
    }
    if !g.pending.is_empty() {
        return Err(format!("new primary {}: {}", g.primary, g.pending));
    }
    Ok(format!("{} is primary at epoch {}", g.primary, g.epoch))
}

/// Runs the parsed command; returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    if let Cmd::Pki { command } = &cli.command {
        return crate::pki::run(command, cli.json, SystemTime::now());
    }
    if let Cmd::Systemd {
        unit,
        config_path,
        bin_dir,
        role,
    } = &cli.command
    {
        let text = crate::systemd::render(*unit, config_path.as_deref(), bin_dir, *role)
            .map_err(Failure::Usage)?;
        print!("{text}");
        return Ok(());
    }
    let file = load_config(&cli)?;
    let addresses = if cli.monitors.is_empty() {
        file.monitors.clone()
    } else {
        cli.monitors.clone()
    };
    let mut m = Monitors::new(addresses, transport(&file, cli.dev)?, cli.timeout)?;
    let json = cli.json;
    match cli.command {
        Cmd::Systemd { .. } | Cmd::Pki { .. } => Ok(()),
        Cmd::Status { watch, stale_ok } => loop {
            let answer = status(&mut m, stale_ok).await;
            let Some(every) = watch else {
                let s = output::Status::from(answer?);
                print_status(&s, json, false)?;
                let degraded = output::degraded(&s);
                return if degraded.is_empty() {
                    Ok(())
                } else {
                    Err(Failure::Degraded(degraded))
                };
            };
            // Watching outlives a monitor election or an unreachable monitor: the failure is
            // printed with the time and the next round tries again.
            match answer {
                Ok(s) => print_status(&output::Status::from(s), json, true)?,
                Err(e) => eprintln!(
                    "haclt: {}: {e}",
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                ),
            }
            tokio::time::sleep(every).await;
        },
        Cmd::Events {
            follow,
            after,
            node,
            count,
        } => {
            let about = |e: &v1::Event| node.as_ref().is_none_or(|n| e.node == *n);
            let print = |e: v1::Event| {
                let e = output::Event::from(e);
                if json {
                    println!("{}", serde_json::to_string(&e).unwrap_or_default());
                } else {
                    println!("{}", output::event_line(&e));
                }
            };
            let r = m
                .call(|mut c| async move {
                    c.events(v1::EventsRequest {
                        after_seq: after,
                        limit: 0,
                    })
                    .await
                })
                .await?;
            // The stream goes on after everything read so far, printed or filtered out.
            let from = r.events.last().map_or(after, |e| e.seq);
            let mut backlog: Vec<v1::Event> = r.events.into_iter().filter(about).collect();
            if let Some(n) = count {
                backlog.drain(..backlog.len().saturating_sub(n));
            }
            backlog.into_iter().for_each(print);
            if !follow {
                return Ok(());
            }
            let mut stream = m
                .call(|mut c| async move {
                    c.follow_events(v1::EventsRequest {
                        after_seq: from,
                        limit: 0,
                    })
                    .await
                })
                .await?;
            while let Some(e) = stream
                .message()
                .await
                .map_err(|s| Failure::from_status(&s))?
            {
                if about(&e) {
                    print(e);
                }
            }
            Err(Failure::Unreachable("the event stream ended".into()))
        }
        Cmd::Switchover { to, group, wait } => {
            let before = status(&mut m, false).await?;
            let old_epoch = group_named(&before, &group).map_or(0, |g| g.epoch);
            let req = v1::SwitchoverRequest {
                request_id: request_id("switchover"),
                group: group.clone(),
                to_node: to.clone().unwrap_or_default(),
            };
            let progress = Progress::new();
            progress.step("asking the monitors for a switchover");
            m.call(|mut c| {
                let req = req.clone();
                async move { c.switchover(req).await }
            })
            .await?;
            let done = converge(&mut m, wait, progress, |s| {
                promoted(s, &group, old_epoch, to.as_deref())
            })
            .await?;
            print_done(json, &done)
        }
        Cmd::Failover {
            allow_data_loss,
            group,
            wait,
        } => {
            let before = status(&mut m, false).await?;
            let old_epoch = group_named(&before, &group).map_or(0, |g| g.epoch);
            let req = v1::FailoverRequest {
                request_id: request_id("failover"),
                group: group.clone(),
                allow_data_loss,
            };
            let progress = Progress::new();
            progress.step("asking the monitors for a failover");
            m.call(|mut c| {
                let req = req.clone();
                async move { c.failover(req).await }
            })
            .await?;
            let done = converge(&mut m, wait, progress, |s| {
                promoted(s, &group, old_epoch, None)
            })
            .await?;
            print_done(json, &done)
        }
        Cmd::Maintenance { action, node, wait } => {
            let enabled = matches!(action, OnOff::Enable);
            let req = v1::SetMaintenanceRequest {
                request_id: request_id("maintenance"),
                node: node.clone(),
                enabled,
            };
            let progress = Progress::new();
            m.call(|mut c| {
                let req = req.clone();
                async move { c.set_maintenance(req).await }
            })
            .await?;
            let done = converge(&mut m, wait, progress, |s| {
                let n = s
                    .nodes
                    .iter()
                    .find(|n| n.name == node)
                    .ok_or("node vanished")?;
                let primary = s.groups.iter().any(|g| g.primary == node);
                // Converged once the agent reports the goal reached, not when the flag is set.
                let in_maintenance = n.reached == v1::GoalState::Maintenance as i32;
                let at_goal = n.reached == n.goal;
                match (enabled, n.maintenance, primary) {
                    (true, true, false) if in_maintenance => {
                        Ok(format!("{node} is in maintenance"))
                    }
                    (false, false, _) if at_goal && !in_maintenance => {
                        Ok(format!("{node} left maintenance"))
                    }
                    (true, _, true) => Err(format!("switching over away from {node}")),
                    (true, true, false) => Err(format!("waiting for {node} to stop")),
                    (false, false, _) => Err(format!("waiting for {node} to rejoin")),
                    _ => Err(format!("waiting for {node}")),
                }
            })
            .await?;
            print_done(json, &done)
        }
        Cmd::Group {
            command:
                GroupCmd::Set {
                    setting,
                    value,
                    group,
                },
        } => {
            let mut req = v1::SetGroupSettingsRequest {
                request_id: request_id("group-set"),
                group,
                ..Default::default()
            };
            let number = |what: &str| {
                value.parse::<u64>().map_err(|_| {
                    Failure::Usage(format!("{what} must be a whole number, got {value:?}"))
                })
            };
            match setting {
                GroupSetting::SyncQuorum => {
                    let k = u32::try_from(number("sync-quorum")?)
                        .ok()
                        .filter(|k| *k >= 1)
                        .ok_or_else(|| {
                            Failure::Usage(format!("sync-quorum must be 1 or more, got {value:?}"))
                        })?;
                    req.sync_quorum = Some(k);
                }
                GroupSetting::MaxSyncLagBytes => {
                    req.max_sync_lag_bytes = Some(number("max-sync-lag-bytes")?);
                }
                GroupSetting::Failsafe => {
                    let d = if value == "0" {
                        std::time::Duration::ZERO
                    } else {
                        humantime::parse_duration(&value).map_err(|e| {
                            Failure::Usage(format!(
                                "failsafe is a duration such as 60s or 5m (0: off), got {value:?}: {e}"
                            ))
                        })?
                    };
                    if d > std::time::Duration::from_secs(3600) {
                        return Err(Failure::Usage(format!(
                            "failsafe must be at most 1h, got {value:?}"
                        )));
                    }
                    req.failsafe_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                }
                GroupSetting::OnStandbyLoss => {
                    if !matches!(value.as_str(), "async" | "wait") {
                        return Err(Failure::Usage(format!(
                            "on-standby-loss is async or wait, got {value:?}"
                        )));
                    }
                    req.on_standby_loss = Some(value);
                }
            }
            let r = m
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.set_group_settings(req).await }
                })
                .await?;
            print_operation(json, &r)
        }
        Cmd::Node { command } => match command {
            NodeCmd::Set {
                node,
                setting,
                value,
            } => {
                let mut req = v1::SetNodeSettingsRequest {
                    request_id: request_id("node-set"),
                    node,
                    ..Default::default()
                };
                match setting {
                    Setting::CandidatePriority => {
                        // The monitors check the same bound; refusing it here names the
                        // mistake without a round trip.
                        let priority = value.parse::<u32>().ok().filter(|p| *p <= 100);
                        req.candidate_priority = Some(priority.ok_or_else(|| {
                            Failure::Usage(format!(
                                "candidate priority must be 0 to 100, got {value:?}"
                            ))
                        })?);
                    }
                    Setting::ReplicationQuorum => {
                        req.replication_quorum = Some(value.parse().map_err(|_| {
                            Failure::Usage(format!(
                                "replication quorum is true or false, got {value:?}"
                            ))
                        })?);
                    }
                }
                let r = m
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.set_node_settings(req).await }
                    })
                    .await?;
                print_operation(json, &r)
            }
            NodeCmd::Remove { node } => {
                let req = v1::RemoveNodeRequest {
                    request_id: request_id("node-remove"),
                    node,
                };
                let r = m
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.remove_node(req).await }
                    })
                    .await?;
                print_operation(json, &r)
            }
        },
        Cmd::Monitor { command } => {
            let r = match command {
                MonitorCmd::Add { id, address } => {
                    let req = v1::AddMonitorRequest {
                        request_id: request_id("monitor-add"),
                        id,
                        address,
                    };
                    m.call(|mut c| {
                        let req = req.clone();
                        async move { c.add_monitor(req).await }
                    })
                    .await?
                }
                MonitorCmd::Remove { id } => {
                    let req = v1::RemoveMonitorRequest {
                        request_id: request_id("monitor-remove"),
                        id,
                    };
                    m.call(|mut c| {
                        let req = req.clone();
                        async move { c.remove_monitor(req).await }
                    })
                    .await?
                }
            };
            if json {
                let members: Vec<serde_json::Value> = r
                    .members
                    .iter()
                    .map(|m| serde_json::json!({ "id": m.id, "address": m.address }))
                    .collect();
                println!("{}", serde_json::json!({ "members": members }));
            } else {
                for member in r.members {
                    println!("{}\t{}", member.id, member.address);
                }
            }
            Ok(())
        }
        Cmd::Drill {
            scenario,
            duration,
            group,
            wait,
            db_user,
            database,
            write_timeout,
            mut via_proxy,
            via_uri,
        } => {
            if via_uri {
                via_proxy.push(crate::drill::Via::Uri);
            }
            let options = crate::drill::Options {
                group,
                duration,
                wait,
                db_user,
                database,
                tls: m.client_tls(),
                write_timeout,
                via: via_proxy,
            };
            let outcome =
                crate::drill::run(&mut m, scenario, &options, request_id("drill"), unix_ms).await;
            let (report, result) = match outcome {
                Ok(r) => (Some(r), Ok(())),
                Err((r, f)) => (r, Err(f)),
            };
            if let Some(r) = report {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&r)
                            .map_err(|e| Failure::Other(e.to_string()))?
                    );
                } else {
                    print!("{}", crate::drill::table(&r));
                }
            }
            result
        }
        Cmd::Show {
            command:
                ShowCmd::Uri {
                    group,
                    standby,
                    dbname,
                    user,
                    sslrootcert,
                    sslcert,
                    sslkey,
                },
        } => {
            let s = output::Status::from(status(&mut m, false).await?);
            let opts = crate::uri::UriOptions {
                group: &group,
                target: if standby {
                    crate::uri::Target::Standby
                } else {
                    crate::uri::Target::Primary
                },
                dbname: &dbname,
                user: user.as_deref(),
                sslrootcert: sslrootcert.as_deref(),
                sslcert: sslcert.as_deref(),
                sslkey: sslkey.as_deref(),
            };
            let uri = crate::uri::uri(&s, &opts)?;
            if json {
                println!("{}", serde_json::json!({ "uri": uri }));
            } else {
                println!("{uri}");
            }
            Ok(())
        }
        Cmd::Token { command } => match command {
            TokenCmd::Create {
                role,
                node,
                address,
                ttl,
                group,
            } => {
                let kind = match role {
                    Role::Postgres => v1::NodeKind::Postgres,
                    Role::Ejabberd => v1::NodeKind::Ejabberd,
                };
                let req = v1::CreateJoinTokenRequest {
                    request_id: request_id("token"),
                    kind: kind.into(),
                    ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                    group,
                    node,
                    address,
                };
                let r = m
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.create_join_token(req).await }
                    })
                    .await?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "token": r.token, "token_id": r.token_id,
                            "expires_at_unix_ms": r.expires_at_unix_ms
                        })
                    );
                } else {
                    println!("{}", r.token);
                    eprintln!(
                        "haclt: token {} expires in {}; it is shown only once",
                        r.token_id,
                        humantime::format_duration(ttl)
                    );
                }
                Ok(())
            }
            TokenCmd::Revoke { id } => {
                let req = v1::RevokeJoinTokenRequest {
                    request_id: request_id("token-revoke"),
                    token_id: id,
                };
                let r = m
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.revoke_join_token(req).await }
                    })
                    .await?;
                print_operation(json, &r)
            }
        },
        Cmd::Cert { command } => match command {
            CertCmd::Revoke { serial } => {
                let req = v1::RevokeCertificateRequest {
                    request_id: request_id("cert-revoke"),
                    serial,
                };
                let r = m
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.revoke_certificate(req).await }
                    })
                    .await?;
                print_operation(json, &r)
            }
        },
    }
}
