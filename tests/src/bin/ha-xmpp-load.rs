//! `ha-xmpp-load`: XMPP users that keep writing through ejabberd while a drill runs, then
//! check that every write ejabberd acknowledged is still there.
//!
//! Each user logs in to one of the `--server`s (user i to server i mod n), then, every
//! `--interval` until `--duration` passes or SIGTERM/SIGINT arrives, stores a fresh key in its
//! private XML storage (XEP-0049). With ejabberd's SQL backend an acknowledged store is a row
//! committed in PostgreSQL, so the figures are those of the service users see: acknowledged
//! writes, failed attempts, the longest time between two acknowledged writes (the service's
//! write unavailability), whether the XMPP session stayed up (no stream end, the same bound
//! JID; `tokio-xmpp` logs a dropped stream in again, counted as interruptions), whether the
//! service works at the end (after the stop, each user retries one last write for up to
//! [`FINAL_WRITE`]) and, read back through ejabberd at the end, acknowledged writes that are
//! missing (a read that gets no answer ends a user's reading: the rest count as unread).
//! Reads must reach SQL: run ejabberd with `mod_private: {use_cache: false}`.
//!
//! Once every user has tried to log in it prints `ha-xmpp-load: writing` on stderr (a script
//! starting a drill waits for that line).
//!
//! Exit status: 0 when every user logged in, kept its session, wrote at the end, lost nothing
//! and read everything back; 1 otherwise;
//! 64 on bad arguments. `--json` prints one object with `users[]` and the totals.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ha_tests::xmpp::XmppUser;
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::{Barrier, watch};
use tokio::time::Instant;

/// Bound on a login.
const LOGIN: Duration = Duration::from_secs(10);
/// How long the last write after the stop is retried.
const FINAL_WRITE: Duration = Duration::from_secs(20);

#[derive(Debug, Parser)]
#[command(version, about = "XMPP users writing through ejabberd during a drill")]
struct Args {
    /// An ejabberd c2s address, `ip:port`; repeat for every frontend.
    #[arg(long = "server", required = true)]
    servers: Vec<String>,
    /// The XMPP domain of the accounts.
    #[arg(long)]
    domain: String,
    /// Accounts are `<prefix><i>@<domain>`, i = 1..=users; they must exist.
    #[arg(long, default_value = "load")]
    prefix: String,
    #[arg(long, default_value_t = 4)]
    users: u32,
    /// File whose first line is the accounts' password.
    #[arg(long)]
    password_file: PathBuf,
    /// How long to write (SIGTERM or SIGINT ends it sooner).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time between the end of one write and the start of the next.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Bound on one write or read.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct UserReport {
    user: String,
    server: String,
    logged_in: bool,
    error: Option<String>,
    acknowledged_writes: u64,
    failed_writes: u64,
    longest_gap_ms: u64,
    /// Stream interruptions (disconnects and logins again: `tokio-xmpp` reconnects on its own).
    interruptions: u32,
    session_kept: bool,
    /// The write retried after the stop was acknowledged.
    wrote_at_end: bool,
    lost_writes: u64,
    /// Acknowledged writes not read back: a read got no answer (see `error`).
    unread_writes: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    users: Vec<UserReport>,
    acknowledged_writes: u64,
    failed_writes: u64,
    lost_writes: u64,
    unread_writes: u64,
    longest_gap_ms: u64,
    sessions_kept: usize,
    interruptions: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let password = match std::fs::read_to_string(&args.password_file) {
        Ok(text) => text.lines().next().unwrap_or_default().to_owned(),
        Err(e) => {
            eprintln!(
                "ha-xmpp-load: cannot read {}: {e}",
                args.password_file.display()
            );
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ha-xmpp-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(run(&args, &password));
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("the report serializes")
        );
    } else {
        print_table(&report);
    }
    let ok = report
        .users
        .iter()
        .all(|u| u.logged_in && u.session_kept && u.wrote_at_end)
        && report.lost_writes == 0
        && report.unread_writes == 0;
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run(args: &Args, password: &str) -> Report {
    let (stop_tx, stop) = watch::channel(false);
    let deadline = Instant::now() + args.duration;
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop_tx.send(true);
    });
    // Keys are unique per run, so a second run never reads the first one's rows.
    let run_id: u32 = rand::random();
    let logins = Arc::new(Barrier::new(args.users as usize));
    let tasks: Vec<_> = (1..=args.users)
        .map(|i| {
            let user = format!("{}{i}@{}", args.prefix, args.domain);
            let server = args.servers[(i as usize - 1) % args.servers.len()].clone();
            let password = password.to_owned();
            let stop = stop.clone();
            let (interval, timeout) = (args.interval, args.timeout);
            let logins = Arc::clone(&logins);
            tokio::spawn(async move {
                let mut client = XmppUser::login_at(&user, &password, &server, LOGIN).await;
                if logins.wait().await.is_leader() {
                    eprintln!("ha-xmpp-load: writing");
                }
                let mut report = UserReport {
                    user,
                    server,
                    ..UserReport::default()
                };
                match client.as_mut() {
                    Ok(client) => {
                        let keys = Keys { run_id, user: i };
                        load(client, &mut report, keys, stop, interval, timeout).await;
                    }
                    Err(e) => report.error = Some(e.clone()),
                }
                if let Ok(client) = client {
                    client.logout().await;
                }
                report
            })
        })
        .collect();
    let mut users = Vec::new();
    for task in tasks {
        users.push(task.await.unwrap_or_else(|e| UserReport {
            error: Some(format!("the user's task failed: {e}")),
            ..UserReport::default()
        }));
    }
    Report {
        acknowledged_writes: users.iter().map(|u| u.acknowledged_writes).sum(),
        failed_writes: users.iter().map(|u| u.failed_writes).sum(),
        lost_writes: users.iter().map(|u| u.lost_writes).sum(),
        unread_writes: users.iter().map(|u| u.unread_writes).sum(),
        longest_gap_ms: users.iter().map(|u| u.longest_gap_ms).max().unwrap_or(0),
        sessions_kept: users.iter().filter(|u| u.session_kept).count(),
        interruptions: users.iter().map(|u| u.interruptions).sum(),
        users,
    }
}

/// The private-storage key of one write (an XML namespace).
#[derive(Debug, Clone, Copy)]
struct Keys {
    run_id: u32,
    user: u32,
}

impl Keys {
    fn key(self, seq: u64) -> String {
        format!("urn:ha-xmpp-load:{:08x}:{}:{seq}", self.run_id, self.user)
    }
}

/// Writes until `stop`, then reads every acknowledged write back, into `report`.
async fn load(
    client: &mut XmppUser,
    report: &mut UserReport,
    keys: Keys,
    mut stop: watch::Receiver<bool>,
    interval: Duration,
    timeout: Duration,
) {
    report.logged_in = true;
    let bound = client.bound_jid();
    let mut acknowledged = Vec::new();
    let mut last_ack = Instant::now();
    let mut seq = 0u64;
    // Set at the stop: from then on, writes are retried until one is acknowledged.
    let mut stopped: Option<Instant> = None;
    loop {
        if stopped.is_none() && *stop.borrow() {
            stopped = Some(Instant::now());
        }
        if stopped.is_some_and(|at| report.wrote_at_end || at.elapsed() >= FINAL_WRITE) {
            break;
        }
        seq += 1;
        match client
            .store_private(&keys.key(seq), &seq.to_string(), timeout)
            .await
        {
            Ok(()) => {
                report.longest_gap_ms = report.longest_gap_ms.max(millis(last_ack.elapsed()));
                last_ack = Instant::now();
                acknowledged.push(seq);
                report.wrote_at_end = stopped.is_some();
            }
            Err(e) => {
                report.failed_writes += 1;
                report.error = Some(e);
            }
        }
        if stopped.is_none() {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {}
            }
        } else if !report.wrote_at_end {
            tokio::time::sleep(interval).await;
        }
    }
    report.longest_gap_ms = report.longest_gap_ms.max(millis(last_ack.elapsed()));
    report.acknowledged_writes = acknowledged.len() as u64;
    // A read that gets no answer ends the reading: on a session that stopped answering every
    // further read would wait its own `timeout`, hundreds of them. The rest count as unread,
    // which fails the run like a lost write but says why.
    for (i, seq) in acknowledged.iter().enumerate() {
        match client.load_private(&keys.key(*seq), timeout).await {
            Ok(Some(v)) if v == seq.to_string() => {}
            Ok(_) => report.lost_writes += 1,
            Err(e) => {
                report.unread_writes = (acknowledged.len() - i) as u64;
                report.error = Some(format!(
                    "reading back write {seq}: {e}; {} acknowledged writes left unread",
                    report.unread_writes
                ));
                break;
            }
        }
    }
    report.interruptions = client.interruptions().await;
    report.session_kept = report.interruptions == 0 && client.bound_jid() == bound;
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn print_table(r: &Report) {
    println!(
        "{:<28} {:<20} {:>6} {:>6} {:>9} {:>5} {:>8}",
        "user", "server", "acked", "failed", "gap max", "lost", "session"
    );
    for u in &r.users {
        println!(
            "{:<28} {:<20} {:>6} {:>6} {:>7}ms {:>5} {:>8}",
            u.user,
            u.server,
            u.acknowledged_writes,
            u.failed_writes,
            u.longest_gap_ms,
            u.lost_writes,
            if !u.logged_in {
                "no login"
            } else if u.session_kept {
                "kept"
            } else {
                "dropped"
            }
        );
        if let Some(e) = &u.error {
            println!("    last error: {e}");
        }
    }
    println!(
        "total: {} acknowledged XMPP writes, {} failed attempts, {} lost, {} unread, longest gap {} ms, {}/{} sessions kept, {} interruptions",
        r.acknowledged_writes,
        r.failed_writes,
        r.lost_writes,
        r.unread_writes,
        r.longest_gap_ms,
        r.sessions_kept,
        r.users.len(),
        r.interruptions
    );
}
