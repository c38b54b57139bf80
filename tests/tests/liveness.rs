//! Liveness on the reference lab stand (`examples/xmpp-lab.toml` on network namespaces, built
//! by the real `ha-provision`, see [`ha_tests::lab_stand`]): one test per operator scenario,
//! each with a writer committing one row at a time through the current primary. Each test
//! prints its figures on one line (`liveness: <scenario>: ...`: the write gap, the longest time
//! between two acknowledged writes, and the times to detection, failover and recovery that
//! apply) and asserts the bounds below.
//!
//! - `primary_that_cannot_start_is_failed_over`: the primary's `postgresql.conf` gets a line
//!   PostgreSQL cannot parse and its postmaster is killed (the agent lives on): the standby
//!   is promoted, the old primary is shown unhealthy; once the line is gone, the old primary
//!   rejoins as a streaming standby by itself and the group is synchronous again.
//! - `replication_link_cut_does_not_block_commits_for_long`: every packet between the two
//!   PostgreSQL nodes dropped for 20 s (both still reach the monitors): synchronous
//!   replication is turned off soon enough for commits to go on, without a failover, and
//!   back on after the cut.
//! - `a_frozen_agent_is_shown_unhealthy_and_does_not_fence_its_primary`: the primary's agent
//!   alone stopped (SIGSTOP) for 15 s while PostgreSQL runs: the status shows the node
//!   unhealthy at once, no failover, and the resumed agent does not interrupt the writes.
//!
//! - `a_cut_link_to_the_monitor_leader_does_not_fence_the_primary`: every packet between the
//!   primary and the monitor leader dropped for 15 s (both reach everything else): the
//!   primary's agent reports through another monitor, which relays to the leader, so the
//!   primary keeps its lease: no failover, no write gap beyond one report's timeout.
//! - `monitor_quorum_loss_costs_no_writes`: two of the three monitors stopped (SIGSTOP) for
//!   20 s, so no leader can exist: the synchronous standby, cut off from the monitors too,
//!   vouches for the primary on the agent port (the failsafe), which keeps serving past its
//!   lease; nothing is promoted, and once the monitors are back the group is as before.
//!
//! Needs root, iproute2, nftables, PostgreSQL 15 and ejabberd, like the chaos test.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ha_provision::lab::node_status;
use ha_tests::lab_stand::{
    Direction, MONITORS, POSTGRES, Stand, build, converged, cut, epoch, leader_node, primary,
    streams, wait_converged,
};
use ha_tests::stand::Stopped;
use ha_tests::writer::Writer;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::time::Instant;

/// Kill of a primary whose PostgreSQL cannot start to the standby's promotion: the agent
/// reports its stopped server on its next round (1 s) and the monitors decide on that report;
/// no silence or lease has to run out.
const PROMOTION: Duration = Duration::from_secs(10);
/// Longest write gap across that failover: the promotion plus the writer finding the new
/// primary, with margin for a loaded 2-core machine.
const FAILOVER_GAP: Duration = Duration::from_secs(15);
/// The old primary's rejoin as a standby after its configuration is fixed: the agent's next
/// start attempt, a rewind and the WAL receiver's connection.
const REJOIN: Duration = Duration::from_secs(60);
/// Longest commit gap while the replication link is cut: PostgreSQL's replication timeouts
/// (5 s) plus the monitors' decision to drop the synchronous standby and the primary's reload.
const LINK_CUT_GAP: Duration = Duration::from_secs(10);
/// How long the replication link stays cut: several times the replication timeouts.
const LINK_CUT: Duration = Duration::from_secs(20);
/// From the cut to the event dropping synchronous replication: commits wait meanwhile, so
/// it is the same bound as the commit gap.
const SYNC_DROPPED: Duration = LINK_CUT_GAP;
/// From the fix of a broken primary to the group synchronous again: its restart (retried
/// every 30 s past the restart limit), rewind, catch-up, the monitors' decision and the reload.
const SYNC_AGAIN: Duration = Duration::from_secs(30);
/// From the end of a cut link to the group synchronous again: a connection attempt of the WAL
/// receiver gives up after 2 s (`tcp_user_timeout`) and the next follows 1 s later, then the
/// catch-up, the monitors' decision and the reload (1.2 s measured; 4.5-5.6 s when the
/// attempt waited for TCP's doubling SYN retransmissions).
const SYNC_AGAIN_AFTER_CUT: Duration = Duration::from_secs(8);
/// How long the primary's agent stays frozen: longer than its lease (so a resumed agent finds
/// it expired) and than any silence bound of the monitors.
const FREEZE: Duration = Duration::from_secs(15);
/// From the freeze (or the failover away from a primary whose PostgreSQL cannot start) to the
/// status showing the node unhealthy: a few missed report rounds (1 s each).
const UNHEALTHY_SHOWN: Duration = Duration::from_secs(3);
/// Longest write gap across the freeze and the agent's resumption: PostgreSQL never stopped,
/// and the agent must ask the monitors before fencing a primary whose lease they renewed; one
/// second is the writer's own timeout for a commit.
const FREEZE_GAP: Duration = Duration::from_secs(1);
/// The resumed agent reports again (its node healthy in the status).
const RESUMED: Duration = Duration::from_secs(30);
/// How long the link between the primary and the monitor leader stays cut: several leases.
const LEADER_CUT: Duration = Duration::from_secs(15);
/// Longest write gap with that link cut: none is expected (the primary is never fenced); one
/// second is the writer's own timeout for a commit, the rest margin for a loaded machine.
const LEADER_CUT_GAP: Duration = Duration::from_secs(2);
/// How long two of the three monitors stay stopped: several leases.
const QUORUM_LOSS: Duration = Duration::from_secs(20);
/// Longest write gap while no monitor leader can exist: none is expected (the primary serves on
/// its standby's vouches); one second is the writer's own timeout for a commit, the rest margin
/// for a loaded machine.
const QUORUM_LOSS_GAP: Duration = Duration::from_secs(2);
/// From the monitors' resumption to the group converged again (a leader elected, every agent
/// reporting to it).
const QUORUM_BACK: Duration = Duration::from_secs(30);
/// How often the tests poll the status while a fault is held.
const POLL: Duration = Duration::from_millis(100);
/// The first write after the stand is up.
const FIRST_WRITE: Duration = Duration::from_secs(30);

/// One scenario's figures and failed checks; fails the test with both and the stand's
/// events and logs.
struct Run<'a> {
    name: &'static str,
    stand: &'a Stand,
    figures: Vec<String>,
    failures: Vec<String>,
}

impl<'a> Run<'a> {
    fn new(name: &'static str, stand: &'a Stand) -> Self {
        Self {
            name,
            stand,
            figures: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn figure(&mut self, f: String) {
        self.figures.push(f);
    }

    /// Records a check that did not hold; the test goes on and fails at [`Run::finish`].
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(what());
        }
    }

    /// Records a wait that did not succeed, with what was waited for.
    fn check_waited<T>(&mut self, waited: &Result<T, String>, what: impl FnOnce() -> String) {
        if let Err(e) = waited {
            self.failures.push(format!("{}: {e}", what()));
        }
    }

    /// Records a write gap of `longest` that was not within `bound`; `during` names the fault
    /// and what the gap means.
    fn check_gap(&mut self, longest: Duration, bound: Duration, during: &str) {
        self.check(longest < bound, || {
            format!("writes stopped for {longest:?} (bound {bound:?}) {during}")
        });
    }

    fn line(&self) -> String {
        format!("liveness: {}: {}", self.name, self.figures.join(", "))
    }

    /// Fails now: what follows depends on what did not happen.
    fn fatal(&mut self, what: String) -> ! {
        self.failures.push(what);
        self.fail()
    }

    fn fail(&self) -> ! {
        println!("{}", self.line());
        let events = self.stand.events_text();
        self.stand.print_log_tails();
        panic!(
            "{}\n{}\nevents:\n{events}",
            self.line(),
            self.failures.join("\n")
        );
    }

    /// No failover: none seen while `fault` was held (`during`), and the primary and epoch
    /// are still `was` now.
    fn no_failover(&mut self, was: (&str, u64), during: Option<Changed>, fault: &str) {
        let (p, e) = was;
        self.check(during.is_none(), || {
            format!("a failover during {fault}: {p} at epoch {e} became {during:?} (time, primary, epoch)")
        });
        let now = self.stand.status().unwrap();
        self.check(
            primary(&now).as_deref() == Some(p) && epoch(&now) == Some(e),
            || {
                format!(
                    "a failover after {fault}: {p} at epoch {e} became {:?} at epoch {:?}",
                    primary(&now),
                    epoch(&now)
                )
            },
        );
    }

    /// Prints the figures; fails with every check that did not hold.
    fn finish(self) {
        if !self.failures.is_empty() {
            self.fail();
        }
        println!("{}", self.line());
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn unix_ms() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(d.as_millis()).unwrap()
}

/// A scenario's starting point: the stand converged, the writer writing.
struct Started {
    stand: Stand,
    writer: Writer,
    /// The writer's first acknowledgement.
    first: Instant,
    primary: String,
    epoch: u64,
}

/// The stand up, converged with a synchronous standby the primary streams to, and a writer
/// that has committed once.
async fn start() -> Started {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let stand = tokio::task::block_in_place(|| Stand::up(build(), |_| {}));
    let s = wait_converged(&stand, true).await.unwrap();
    let writer = stand.start_writer().await;
    let first = writer
        .wait_ack_after(Instant::now(), None, FIRST_WRITE)
        .await
        .at;
    Started {
        primary: primary(&s).unwrap(),
        epoch: epoch(&s).unwrap(),
        stand,
        writer,
        first,
    }
}

/// The sequence number of the last event so far.
fn last_seq(stand: &Stand) -> u64 {
    stand
        .events(0)
        .unwrap()
        .last()
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or(0)
}

/// The node's entry in a status (`Null` when absent).
fn node<'s>(s: &'s Value, name: &str) -> &'s Value {
    node_status(s, name).unwrap_or(&Value::Null)
}

/// Polls the writer until a node other than `except` acknowledges a write after `t`; `None`
/// once `timeout` after `t` has passed.
async fn wait_write(
    writer: &Writer,
    t: Instant,
    except: Option<&str>,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = t + timeout;
    loop {
        if let Some(a) = writer.snapshot().first_ack_after(t, except) {
            return Some(a.at);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A failover seen while a fault was held: when (into the fault), the primary and the epoch.
type Changed = (Duration, Option<String>, Option<u64>);

/// Holds a fault from `started` until `hold` has passed, reading the status every [`POLL`]:
/// `each` sees every status with its time into the fault. Returns the first status whose
/// primary or epoch differed from `was`.
async fn hold_watching(
    stand: &Stand,
    started: Instant,
    hold: Duration,
    was: (&str, u64),
    mut each: impl FnMut(&Value, Duration),
) -> Option<Changed> {
    let mut failover = None;
    while started.elapsed() < hold {
        if let Ok(s) = stand.status() {
            let t = started.elapsed();
            each(&s, t);
            if failover.is_none()
                && (primary(&s).as_deref() != Some(was.0) || epoch(&s) != Some(was.1))
            {
                failover = Some((t, primary(&s), epoch(&s)));
            }
        }
        tokio::time::sleep(POLL).await;
    }
    failover
}

/// Scenario 1: the primary's postmaster is killed while its configuration keeps PostgreSQL
/// from starting again; its agent stays alive and reports the server stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_that_cannot_start_is_failed_over() {
    let Started {
        stand,
        writer,
        first,
        primary: old,
        ..
    } = start().await;
    let mut run = Run::new("primary_that_cannot_start_is_failed_over", &stand);
    let seq = last_seq(&stand);

    let conf = stand.material().pg_data(&old).join("postgresql.conf");
    let original = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{original}this is not a setting\n")).unwrap();
    let postmaster = ha_tests::postmaster_pid(&stand.material().pg_data(&old)).unwrap();
    let _ = kill(Pid::from_raw(postmaster), Signal::SIGKILL);
    let killed = Instant::now();

    let promoted = stand
        .wait_status("the standby promoted", PROMOTION, |s| {
            primary(s).is_some_and(|p| p != old)
        })
        .await;
    let (s, took) = promoted.unwrap_or_else(|e| {
        run.fatal(format!(
            "no failover within {PROMOTION:?} of the kill of {old}'s postmaster (its postgresql.conf cannot be parsed): {e}"
        ))
    });
    let new = primary(&s).unwrap();
    run.figure(format!("failover {} ms ({old} -> {new})", ms(took)));

    let resumed = wait_write(&writer, killed, Some(&old), FAILOVER_GAP).await;
    let Some(resumed) = resumed else {
        run.fatal(format!(
            "no write acknowledged by {new} within {FAILOVER_GAP:?} of the kill"
        ))
    };
    let failover_gap = writer.snapshot().longest_gap(first, resumed);
    run.figure(format!(
        "gap {} ms, writes on {new} {} ms after the kill",
        ms(failover_gap),
        ms(resumed - killed)
    ));
    run.check_gap(failover_gap, FAILOVER_GAP, "across the failover");

    let events = stand.events(seq).unwrap_or_default();
    let reason = events.iter().find(|e| {
        let message = e["message"].as_str().unwrap_or_default().to_lowercase();
        e["kind"] == "failover"
            && e["node"] == old.as_str()
            && message.contains("postgres")
            && (message.contains("not running") || message.contains("stopped"))
    });
    run.check(reason.is_some(), || {
        format!(
            "no failover event for {old} saying PostgreSQL is not running/stopped; events: {}",
            events
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });

    let unhealthy = stand
        .wait_status("the old primary shown unhealthy", UNHEALTHY_SHOWN, |s| {
            node(s, &old)["healthy"] == false
        })
        .await;
    run.check_waited(&unhealthy, || {
        format!("{old} is not shown healthy: false while its PostgreSQL cannot start")
    });

    std::fs::write(&conf, &original).unwrap();
    let fixed = Instant::now();
    let rejoined = stand
        .wait_status("the old primary rejoins as a standby", REJOIN, |s| {
            let n = node(s, &old);
            n["state"] == "standby" && n["postgres"]["role"] == "standby" && n["healthy"] == true
        })
        .await;
    match rejoined {
        Ok((_, took)) => run.figure(format!("rejoined {} ms after the fix", ms(took))),
        Err(e) => run.fatal(format!(
            "{old} did not rejoin as a standby within {REJOIN:?} of its configuration fixed: {e}"
        )),
    }
    let left = (REJOIN + SYNC_AGAIN).saturating_sub(fixed.elapsed());
    let sync = stand
        .wait_status("synchronous again", left, |s| {
            s["groups"][0]["synchronous"] == true && primary(s).as_deref() == Some(new.as_str())
        })
        .await;
    match sync {
        Ok(_) => run.figure(format!(
            "synchronous {} ms after the fix",
            ms(fixed.elapsed())
        )),
        Err(e) => run.check(false, || format!("not synchronous again: {e}")),
    }
    run.check(streams(&stand.pg(&new)).await, || {
        format!("{new} streams to no standby after {old} rejoined")
    });
    let log = writer.stop().await;
    run.figure(format!(
        "whole-run gap {} ms",
        ms(log.longest_gap(first, Instant::now()))
    ));
    run.finish();
}

/// Scenario 2: the link between the two PostgreSQL nodes is cut for [`LINK_CUT`]; both keep
/// reaching the monitors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_link_cut_does_not_block_commits_for_long() {
    let Started {
        stand,
        writer,
        first,
        primary: p,
        epoch: e,
    } = start().await;
    let mut run = Run::new(
        "replication_link_cut_does_not_block_commits_for_long",
        &stand,
    );
    let standby = POSTGRES.iter().find(|n| **n != p).unwrap();
    let seq = last_seq(&stand);

    let cut_at = unix_ms();
    let started = Instant::now();
    let guard = cut(&stand, &p, Direction::Both, Some(standby)).unwrap();
    let mut async_shown = None;
    let failover = hold_watching(&stand, started, LINK_CUT, (&p, e), |s, t| {
        if async_shown.is_none() && s["groups"][0]["synchronous"] == false {
            async_shown = Some(t);
        }
    })
    .await;
    drop(guard);
    let restored = Instant::now();
    if let Some(t) = async_shown {
        run.figure(format!("status asynchronous {} ms into the cut", ms(t)));
    }

    let sync = stand
        .wait_status("synchronous again", SYNC_AGAIN_AFTER_CUT, |s| {
            s["groups"][0]["synchronous"] == true
        })
        .await;
    let log = writer.stop().await;
    let longest = log.longest_gap(first, Instant::now());
    run.figure(format!("gap {} ms", ms(longest)));

    let events = stand.events(seq).unwrap_or_default();
    let dropped = events.iter().find(|ev| {
        let message = ev["message"].as_str().unwrap_or_default();
        ev["kind"] == "sync"
            && (message.contains("asynchronous") || message.contains("not streaming"))
    });
    let dropped_after = dropped
        .and_then(|ev| ev["at_unix_ms"].as_u64())
        .map(|at| Duration::from_millis(at.saturating_sub(cut_at)));
    if let Some(d) = dropped_after {
        run.figure(format!(
            "synchronous standby dropped {} ms after the cut",
            ms(d)
        ));
    }
    if let Ok((_, took)) = &sync {
        run.figure(format!(
            "synchronous again {} ms after the cut ended",
            ms(*took)
        ));
    }

    run.check_gap(longest, LINK_CUT_GAP, "with the replication link cut");
    run.check(dropped_after.is_some_and(|d| d < SYNC_DROPPED), || {
        format!(
            "no sync event dropping the synchronous standby within {SYNC_DROPPED:?} of the cut (found {dropped_after:?}); events: {}",
            events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
        )
    });
    run.no_failover((&p, e), failover, "the cut");
    run.check_waited(&sync, || {
        format!(
            "not synchronous again within {SYNC_AGAIN_AFTER_CUT:?} of the cut's end ({:?} ago)",
            restored.elapsed()
        )
    });
    run.finish();
}

/// Scenario 3: the primary's agent alone is frozen (SIGSTOP) for [`FREEZE`]; PostgreSQL keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_is_shown_unhealthy_and_does_not_fence_its_primary() {
    let st = start().await;
    let (stand, writer, first) = (&st.stand, st.writer, st.first);
    let (p, e) = (st.primary.as_str(), st.epoch);
    let mut run = Run::new(
        "a_frozen_agent_is_shown_unhealthy_and_does_not_fence_its_primary",
        stand,
    );
    let agent = stand.pids_named(p, "ha-agent");
    assert!(!agent.is_empty(), "no ha-agent process on {p}");

    let frozen = Stopped::new(agent.clone());
    let started = Instant::now();
    let mut unhealthy = None;
    let mut exit_nonzero = None;
    let failover = hold_watching(stand, started, FREEZE, (p, e), |s, t| {
        if unhealthy.is_none() && node(s, p)["healthy"] == false {
            unhealthy = Some(t);
        }
        if exit_nonzero.is_none()
            && let Ok((code, _)) = stand.haclt_exit(&["status"])
            && code != Some(0)
        {
            exit_nonzero = Some((t, code));
        }
    })
    .await;
    drop(frozen);
    let resumed = Instant::now();
    let detection = match (unhealthy, exit_nonzero) {
        (Some(a), Some((b, _))) => Some(a.max(b)),
        _ => None,
    };
    run.figure(format!(
        "detection {} (healthy: false at {:?}, haclt status exit {:?})",
        detection.map_or("none".to_owned(), |d| format!("{} ms", ms(d))),
        unhealthy.map(ms),
        exit_nonzero.map(|(t, c)| (ms(t), c)),
    ));

    // The resumed agent reports again; then a write after that report shows whether it fenced.
    let back = stand
        .wait_status("the agent reports again", RESUMED, |s| {
            let n = node(s, p);
            n["healthy"] == true
                && n["last_report_age_ms"]
                    .as_u64()
                    .is_some_and(|age| u128::from(age) < resumed.elapsed().as_millis())
        })
        .await;
    if let Ok((_, took)) = &back {
        run.figure(format!("reports again {} ms after SIGCONT", ms(*took)));
    }
    let Some(wrote) = wait_write(&writer, Instant::now(), None, FIRST_WRITE).await else {
        run.fatal(format!(
            "no write acknowledged within {FIRST_WRITE:?} after {p}'s agent resumed"
        ))
    };
    let log = writer.stop().await;
    let longest = log.longest_gap(first, wrote);
    run.figure(format!("gap {} ms", ms(longest)));

    run.check(unhealthy.is_some_and(|t| t <= UNHEALTHY_SHOWN), || {
        format!("{p} not shown healthy: false within {UNHEALTHY_SHOWN:?} of its agent frozen (at {unhealthy:?})")
    });
    run.check(
        exit_nonzero.is_some_and(|(t, _)| t <= UNHEALTHY_SHOWN),
        || {
            format!("haclt status did not exit non-zero within {UNHEALTHY_SHOWN:?} of {p}'s agent frozen (first: {exit_nonzero:?})")
        },
    );
    run.no_failover((p, e), failover, &format!("{p}'s agent frozen"));
    run.check_waited(&back, || {
        format!("{p}'s agent did not report again within {RESUMED:?} of SIGCONT")
    });
    run.check_gap(
        longest,
        FREEZE_GAP,
        "around the frozen agent: the resumed agent fenced its primary (lease expired while frozen) without first checking with the monitors, which kept it primary",
    );
    run.finish();
}

/// Scenario 4: the link between the primary and the monitor leader is cut for [`LEADER_CUT`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_to_the_monitor_leader_does_not_fence_the_primary() {
    let Started {
        stand,
        writer,
        first,
        primary: p,
        epoch: e,
    } = start().await;
    let mut run = Run::new(
        "a_cut_link_to_the_monitor_leader_does_not_fence_the_primary",
        &stand,
    );
    let leader = leader_node(&stand, &stand.status().unwrap())
        .unwrap_or_else(|| run.fatal("no monitor leader in the status".into()));
    let started = Instant::now();
    let guard = cut(&stand, &p, Direction::Both, Some(leader.as_str())).unwrap();
    let mut leaders = Vec::new();
    let failover = hold_watching(&stand, started, LEADER_CUT, (&p, e), |s, _| {
        if let Some(l) = leader_node(&stand, s)
            && leaders.last() != Some(&l)
        {
            leaders.push(l);
        }
    })
    .await;
    drop(guard);
    let log = writer.stop().await;
    let longest = log.longest_gap(first, Instant::now());
    run.figure(format!(
        "cut {p} <-> {leader} for {} ms, leaders seen {leaders:?}, gap {} ms",
        ms(LEADER_CUT),
        ms(longest)
    ));
    run.no_failover((&p, e), failover, "the cut");
    run.check_gap(longest, LEADER_CUT_GAP, "with the link to the leader cut");
    run.finish();
}

/// Scenario 5: two of the three monitors stopped for [`QUORUM_LOSS`]: no leader, no lease
/// renewal for anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_quorum_loss_costs_no_writes() {
    let Started {
        stand,
        writer,
        first,
        primary: p,
        epoch: e,
    } = start().await;
    let mut run = Run::new("monitor_quorum_loss_costs_no_writes", &stand);
    let leader = leader_node(&stand, &stand.status().unwrap())
        .unwrap_or_else(|| run.fatal("no monitor leader in the status".into()));
    // The leader and one follower: the third alone is no majority.
    let follower = MONITORS.iter().find(|m| **m != leader).unwrap();
    let mut pids = stand.pids_named(&leader, "ha-monitor");
    pids.extend(stand.pids_named(follower, "ha-monitor"));
    assert_eq!(
        pids.len(),
        2,
        "one ha-monitor on {leader} and on {follower}"
    );
    let stopped = Stopped::new(pids);
    let started = Instant::now();
    // The remaining monitor answers stale statuses at best; a primary or epoch seen to change
    // would be a promotion nobody could have decided.
    let failover = hold_watching(&stand, started, QUORUM_LOSS, (&p, e), |_, _| {}).await;
    drop(stopped);
    let resumed = Instant::now();
    let back = stand
        .wait_status("the monitors decide again", QUORUM_BACK, |s| {
            converged(s, resumed.into_std(), true)
        })
        .await;
    let Some(wrote) = wait_write(&writer, Instant::now(), None, FIRST_WRITE).await else {
        run.fatal(format!(
            "no write acknowledged within {FIRST_WRITE:?} after the monitors resumed"
        ))
    };
    let log = writer.stop().await;
    let during = log.longest_gap(started, resumed);
    let longest = log.longest_gap(first, wrote);
    run.figure(format!(
        "stopped {leader} and {follower} for {} ms, gap during {} ms, gap overall {} ms{}",
        ms(QUORUM_LOSS),
        ms(during),
        ms(longest),
        back.as_ref()
            .map(|(_, took)| format!(", converged {} ms after SIGCONT", ms(*took)))
            .unwrap_or_default()
    ));
    run.no_failover((&p, e), failover, "the monitors' quorum loss");
    run.check_waited(&back, || {
        format!("not converged within {QUORUM_BACK:?} of the monitors' resumption")
    });
    run.check_gap(
        longest,
        QUORUM_LOSS_GAP,
        "while no monitor leader could exist: the primary fenced itself at the end of its lease instead of serving on its standby's vouches",
    );
    run.finish();
}
