//! The PostgreSQL controller against real PostgreSQL 15 servers run as the `postgres` user on
//! loopback: bootstrap, standbys, quorum synchronous replication, failover with fencing, rewind
//! and its base-backup fallback (also for a base backup that never started), crash detection
//! and the restart limit; symbolic links planted by the `postgres` user are never followed.
//!
//! Every server lives under one temporary directory ([`PgScratch`]), which stops every postmaster
//! it knows (by PID) before the directory is removed, even on panic.
#![allow(clippy::unwrap_used)]

use ha_tests::{PgScratch, free_port};
use std::time::Duration;

use ha_agent::pg::{
    Exit, HbaRule, Local, Outcome, PgConfig, PgController, PgError, PostmasterState, RejoinPath,
    RestartLimit, ServerRole, Stopped, SyncConfig, SyncState, Upstream, WasRole, plan,
};
use ha_proto::NodeId;
use ha_proto::convert::Goal;
use ha_proto::types::{Endpoint, Epoch, GoalState};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

/// The servers' directory (stopped on drop, see [`PgScratch`]) with the tests' logging.
struct Harness {
    scratch: PgScratch,
}

impl Harness {
    fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("ha_agent=debug")
            .try_init();
        Self {
            scratch: PgScratch::new(),
        }
    }

    fn node(&mut self, name: &str, tweak: impl FnOnce(&mut PgConfig)) -> Node {
        let dir = self.scratch.node_dir(name);
        let port = free_port();
        let id = NodeId::new(name).unwrap();
        let mut cfg = PgConfig::new(id.clone(), dir.join("data"), port, dir.clone());
        cfg.listen_addresses = vec!["127.0.0.1".into()];
        cfg.hba = vec![
            HbaRule::local_trust("postgres"),
            HbaRule::host("replication", "replicator", "127.0.0.1/32", "trust"),
            HbaRule::host("postgres", "replicator", "127.0.0.1/32", "trust"),
        ];
        for (k, v) in [("shared_buffers", "16MB"), ("max_connections", "20")] {
            cfg.extra_settings.insert(k.into(), v.into());
        }
        cfg.start_timeout = Duration::from_secs(30);
        cfg.stop_timeout = Duration::from_secs(20);
        tweak(&mut cfg);
        self.scratch.track(cfg.data_dir.clone());
        Node {
            upstream: Upstream {
                node: id,
                endpoint: Endpoint {
                    host: "127.0.0.1".into(),
                    port,
                },
            },
            ctl: PgController::new(cfg).unwrap(),
        }
    }
}

struct Node {
    ctl: PgController,
    upstream: Upstream,
}

impl Node {
    async fn exec(&self, sql: &str) {
        let client = self.ctl.connect().await.unwrap();
        client.batch_execute(sql).await.unwrap();
    }

    async fn count(&self, sql: &str) -> i64 {
        let client = self.ctl.connect().await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    fn name(&self) -> &NodeId {
        &self.upstream.node
    }
}

/// Evaluates `check` (an expression that may `.await`) every 100 ms until it holds; panics
/// naming `what` after `timeout`.
macro_rules! eventually {
    ($what:expr, $timeout:expr, $check:expr) => {{
        let deadline = Instant::now() + $timeout;
        while !$check {
            assert!(
                Instant::now() < deadline,
                "not reached within {:?}: {}",
                $timeout,
                $what
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

async fn streaming_from(node: &mut Node, upstream: &NodeId) -> bool {
    match node.ctl.observe().await {
        Ok(o) => {
            o.role == ServerRole::Standby
                && o.streaming
                && o.upstream_node.as_ref() == Some(upstream)
        }
        Err(_) => false,
    }
}

/// Waits until `standby` has replayed everything `primary` has flushed.
async fn caught_up(primary: &mut Node, standby: &mut Node) {
    let target = primary.ctl.observe().await.unwrap().flush_lsn.unwrap();
    eventually!(
        "standby replay catches up",
        Duration::from_secs(20),
        standby
            .ctl
            .observe()
            .await
            .unwrap()
            .replay_lsn
            .is_some_and(|l| l >= target)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_commit_waits_for_one_of_two_standbys() {
    let mut h = Harness::new();
    let mut a = h.node("a", |_| {});
    let mut b = h.node("b", |_| {});
    let mut c = h.node("c", |_| {});

    // The plan drives the first steps, as the agent would.
    let single = Goal {
        node: a.name().clone(),
        state: GoalState::Single,
        epoch: Epoch(1),
        upstream: None,
        synchronous_standbys: vec![],
        synchronous_quorum: 0,
    };
    let obs = a.ctl.observe().await.unwrap();
    assert_eq!(obs.role, ServerRole::Empty);
    let action = plan(&obs.local(), &single);
    assert_eq!(a.ctl.apply(&action).await.unwrap(), Outcome::Done);
    let obs = a.ctl.observe().await.unwrap();
    assert_eq!(obs.role, ServerRole::Primary);
    assert!(obs.system_identifier.is_some());
    assert_eq!(plan(&obs.local(), &single), ha_agent::pg::Action::Nothing);
    // Bootstrapping again is harmless.
    a.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    h.scratch.saw_postmaster(a.ctl.postmaster_pid().unwrap());
    a.exec("CREATE TABLE t (x int)").await;

    b.ctl.join_standby(&a.upstream).await.unwrap();
    // c's data directory holds the remains of an interrupted base backup: it must be redone.
    let c_data = c.ctl.config().data_dir.clone();
    std::fs::create_dir_all(c_data.join("base")).unwrap();
    std::fs::write(c_data.join("PG_VERSION"), "15\n").unwrap();
    let goal_c = Goal {
        node: c.name().clone(),
        state: GoalState::Standby,
        epoch: Epoch(1),
        upstream: Some((a.name().clone(), a.upstream.endpoint.clone())),
        synchronous_standbys: vec![],
        synchronous_quorum: 0,
    };
    let obs_c = c.ctl.observe().await.unwrap();
    assert_eq!(
        obs_c.local(),
        Local::Empty,
        "a partial copy is not a cluster"
    );
    let action = plan(&obs_c.local(), &goal_c);
    c.ctl.apply(&action).await.unwrap();

    for s in [&mut b, &mut c] {
        let up = a.name().clone();
        eventually!(
            "standby streams from a",
            Duration::from_secs(20),
            streaming_from(s, &up).await
        );
    }
    // Both walsenders exist on a, and the standbys hold their slots.
    eventually!("two streaming replicas on a", Duration::from_secs(10), {
        let o = a.ctl.observe().await.unwrap();
        o.replicas.iter().filter(|r| r.state == "streaming").count() == 2
    });
    assert_eq!(
        a.count("SELECT count(*) FROM pg_replication_slots WHERE active")
            .await,
        2
    );

    let sync = SyncConfig {
        standbys: vec![b.name().clone(), c.name().clone()],
        quorum: 1,
    };
    a.ctl.set_synchronous(&sync).await.unwrap();
    let obs = a.ctl.observe().await.unwrap();
    assert_eq!(obs.synchronous_standby_names, r#"ANY 1 ("b", "c")"#);
    eventually!(
        "both standbys are quorum candidates",
        Duration::from_secs(10),
        {
            let o = a.ctl.observe().await.unwrap();
            o.replicas.len() == 2
                && o.replicas
                    .iter()
                    .all(|r| r.sync_state == Some(SyncState::Quorum))
        }
    );
    a.exec("INSERT INTO t VALUES (1)").await;

    // Both standbys down: a commit must wait.
    b.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
    c.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
    let writer = a.ctl.connect().await.unwrap();
    let mut commit =
        tokio::spawn(async move { writer.batch_execute("INSERT INTO t VALUES (2)").await });
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut commit)
            .await
            .is_err(),
        "a commit returned while no synchronous standby was up"
    );
    // One standby back is a quorum of one.
    b.ctl.start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), commit)
        .await
        .expect("the commit returns once a standby is back")
        .unwrap()
        .unwrap();
    assert_eq!(a.count("SELECT count(*) FROM t").await, 2);

    // Back to async: commits no longer wait for the (stopped) standbys.
    a.ctl.set_synchronous(&SyncConfig::default()).await.unwrap();
    b.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), a.exec("INSERT INTO t VALUES (3)"))
        .await
        .expect("an asynchronous commit does not wait");
    let obs = a.ctl.observe().await.unwrap();
    assert_eq!(obs.synchronous_standby_names, "");
    a.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
}

/// A fenced former primary: stopped cleanly, `standby.signal` in place.
const FENCED_PRIMARY: ServerRole = ServerRole::Stopped(Stopped {
    was: WasRole::Primary,
    clean: true,
    standby_signal: true,
});

/// Applies `rejoin` on the fenced a after b promoted (see [`diverge`]): a is rewound, streams
/// from b on timeline 2, and its diverged rows are gone. Returns a's observation.
async fn rewound_onto(
    a: &mut Node,
    b: &mut Node,
    rejoin: &ha_agent::pg::Action,
) -> ha_agent::pg::PgObservation {
    assert_eq!(
        a.ctl.apply(rejoin).await.unwrap(),
        Outcome::Rejoined(RejoinPath::Rewound)
    );
    let up = b.name().clone();
    eventually!(
        "a streams from b",
        Duration::from_secs(20),
        streaming_from(a, &up).await
    );
    caught_up(b, a).await;
    let obs = a.ctl.observe().await.unwrap();
    assert_eq!(obs.timeline.unwrap().get(), 2);
    assert_eq!(a.count("SELECT count(*) FROM t WHERE x >= 100").await, 0);
    obs
}

/// Builds a diverged pair: b (was a standby of a) promoted after its stream was cut, a fenced
/// after a write b never received. Returns the rows only a has.
async fn diverge(a: &mut Node, b: &mut Node) {
    cut_and_fence(a, b).await;
    promote(b).await;
}

/// b (a standby of a) has its stream cut, a writes what b never receives and is fenced; b is
/// not promoted yet.
async fn cut_and_fence(a: &mut Node, b: &mut Node) {
    a.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    a.exec("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await;
    b.ctl.join_standby(&a.upstream).await.unwrap();
    let up = a.name().clone();
    eventually!(
        "b streams from a",
        Duration::from_secs(20),
        streaming_from(b, &up).await
    );
    caught_up(a, b).await;

    // Failover step 1 on the candidate: cut the stream.
    let out = b.ctl.stop_replication().await.unwrap();
    let Outcome::ReplicationStopped { received, replayed } = out else {
        panic!("unexpected outcome {out:?}");
    };
    assert!(received.is_some() && replayed.is_some());
    let obs = b.ctl.observe().await.unwrap();
    assert!(!obs.streaming);
    assert_eq!(obs.upstream_node, None);
    assert_eq!(
        obs.local(),
        Local::Standby {
            upstream: None,
            streaming: false
        }
    );
    // The old primary keeps writing: it diverges from b.
    a.exec("INSERT INTO t VALUES (100); CHECKPOINT; INSERT INTO t VALUES (101)")
        .await;

    // Fence a: stopped, and it never accepts writes again.
    a.ctl.fence().await.unwrap();
    a.ctl.fence().await.unwrap();
    let obs = a.ctl.observe().await.unwrap();
    assert_eq!(obs.role, FENCED_PRIMARY);
    assert!(a.ctl.connect().await.is_err());
}

/// Promotes b (twice: the second is refused) and writes a row on it.
async fn promote(b: &mut Node) {
    b.ctl.promote().await.unwrap();
    assert!(matches!(
        b.ctl.promote().await,
        Err(PgError::WrongRole {
            expected: "standby"
        })
    ));
    let obs = b.ctl.observe().await.unwrap();
    assert_eq!(obs.role, ServerRole::Primary);
    assert_eq!(obs.timeline.unwrap().get(), 2);
    b.exec("INSERT INTO t VALUES (2)").await;
}

/// The monitor orders the old primary's rejoin as it orders the promotion: a rejoin that runs
/// before the new primary promoted (and checkpointed) must wait. pg_rewind then finds the
/// source on the former primary's own timeline ("no rewind required"); streaming from it would
/// follow the old timeline, and once it promotes, its new timeline forks before the former
/// primary's WAL end: a standby stuck for good (found by the chaos test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_waits_until_the_upstream_promoted() {
    let mut h = Harness::new();
    let mut a = h.node("a", |_| {});
    let mut b = h.node("b", |_| {});
    cut_and_fence(&mut a, &mut b).await;
    let rejoin = ha_agent::pg::Action::Rejoin(b.upstream.clone());
    let early = a.ctl.apply(&rejoin).await;
    assert!(
        matches!(early, Err(PgError::UpstreamNotPromoted { .. })),
        "{early:?}"
    );
    // Nothing changed: still a stopped, read-only former primary.
    assert_eq!(a.ctl.observe().await.unwrap().role, FENCED_PRIMARY);
    promote(&mut b).await;
    rewound_onto(&mut a, &mut b, &rejoin).await;
    a.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
    b.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_fences_old_primary_and_rewinds_it() {
    let mut h = Harness::new();
    let mut a = h.node("a", |_| {});
    let mut b = h.node("b", |_| {});
    diverge(&mut a, &mut b).await;

    // Even if someone starts the fenced server, it comes up read-only.
    a.ctl.start().await.unwrap();
    h.scratch.saw_postmaster(a.ctl.postmaster_pid().unwrap());
    let client = a.ctl.connect().await.unwrap();
    let err = client
        .batch_execute("INSERT INTO t VALUES (666)")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err:?}"
    );
    drop(client);
    a.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
    // It is still known as a former primary: the plan rejoins it rather than starting it.
    let goal = Goal {
        node: a.name().clone(),
        state: GoalState::Standby,
        epoch: Epoch(2),
        upstream: Some((b.name().clone(), b.upstream.endpoint.clone())),
        synchronous_standbys: vec![],
        synchronous_quorum: 0,
    };
    let action = plan(&a.ctl.observe().await.unwrap().local(), &goal);
    assert_eq!(action, ha_agent::pg::Action::Rejoin(b.upstream.clone()));

    let obs = rewound_onto(&mut a, &mut b, &action).await;
    // The new primary's row arrived.
    assert_eq!(a.count("SELECT count(*) FROM t WHERE x = 2").await, 1);
    assert_eq!(plan(&obs.local(), &goal), ha_agent::pg::Action::Nothing);
    a.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
    b.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
}

/// A base backup that never started (its first start failed, or the agent died right after
/// it) is replaced on rejoin, not rewound: pg_rewind's single-user crash recovery would end its
/// recovery and write WAL of its own on the primary's timeline, and the standby could never
/// stream again ("record with incorrect prev-link").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_replaces_a_base_backup_that_never_started() {
    let mut h = Harness::new();
    let mut a = h.node("a", |_| {});
    let mut b = h.node("b", |_| {});
    a.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    h.scratch.saw_postmaster(a.ctl.postmaster_pid().unwrap());
    a.exec("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await;

    let data = b.ctl.config().data_dir.clone();
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(b.ctl.config().bin_dir.join("pg_basebackup"))
        .args(["-h", "127.0.0.1", "-U", "replicator", "-X", "stream", "-p"])
        .arg(a.upstream.endpoint.port.to_string())
        .arg("-D")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_basebackup: {out:?}");
    assert!(data.join("backup_label").exists());
    // The primary moves on: any WAL b wrote of its own would now conflict with a's.
    a.exec("INSERT INTO t SELECT generate_series(2, 1000)")
        .await;

    assert_eq!(
        b.ctl.rejoin(&a.upstream).await.unwrap(),
        RejoinPath::BaseBackup
    );
    h.scratch.saw_postmaster(b.ctl.postmaster_pid().unwrap());
    let up = a.name().clone();
    eventually!(
        "b streams from a",
        Duration::from_secs(20),
        streaming_from(&mut b, &up).await
    );
    a.exec("INSERT INTO t VALUES (1001)").await;
    caught_up(&mut a, &mut b).await;
    assert_eq!(b.count("SELECT count(*) FROM t").await, 1001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_falls_back_to_base_backup_when_rewind_is_impossible() {
    let mut h = Harness::new();
    let mut a = h.node("a", |_| {});
    let mut b = h.node("b", |_| {});
    diverge(&mut a, &mut b).await;

    // Without its WAL, a cannot find the divergence point: pg_rewind must fail.
    let wal = a.ctl.config().data_dir.join("pg_wal");
    for entry in std::fs::read_dir(&wal).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::remove_file(p).unwrap();
        }
    }
    assert_eq!(
        a.ctl.rejoin(&b.upstream).await.unwrap(),
        RejoinPath::BaseBackup
    );
    h.scratch.saw_postmaster(a.ctl.postmaster_pid().unwrap());
    let up = b.name().clone();
    eventually!(
        "a streams from b",
        Duration::from_secs(20),
        streaming_from(&mut a, &up).await
    );
    caught_up(&mut b, &mut a).await;
    assert_eq!(a.count("SELECT count(*) FROM t WHERE x >= 100").await, 0);
    assert_eq!(a.count("SELECT count(*) FROM t WHERE x = 2").await, 1);

    // Drain the new primary for a switchover: a clean stop with its final checkpoint.
    let before = b.ctl.observe().await.unwrap().flush_lsn.unwrap();
    let checkpoint = b.ctl.drain().await.unwrap();
    assert!(checkpoint >= before, "{checkpoint} < {before}");
    let obs = b.ctl.observe().await.unwrap();
    assert_eq!(obs.flush_lsn, Some(checkpoint));
    a.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
}

/// How far apart restarts past the limit are in the crash test.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a server runs before a crash no longer counts against the limit, in the crash test
/// (below `RETRY_AFTER`, so a start it allows is not one the retry would allow anyway).
const STABLE_AFTER: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_crash_is_detected_and_restarts_are_limited() {
    let mut h = Harness::new();
    let mut a = h.node("a", |cfg| {
        cfg.restart_limit = RestartLimit {
            max_restarts: 2,
            window: Duration::from_secs(600),
            retry_after: RETRY_AFTER,
            stable_after: STABLE_AFTER,
        };
    });
    a.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    for round in 0..3 {
        let pid = a.ctl.postmaster_pid().unwrap();
        h.scratch.saw_postmaster(pid);
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        let state = a.ctl.wait_postmaster_exit(Duration::from_secs(10)).await;
        assert_eq!(
            state,
            PostmasterState::Crashed {
                pid,
                exit: Exit::Signal(9)
            }
        );
        assert_eq!(a.ctl.postmaster_pid(), None);
        let obs = a.ctl.observe().await.unwrap();
        assert_eq!(
            obs.role,
            ServerRole::Stopped(Stopped {
                was: WasRole::Primary,
                clean: false,
                standby_signal: false
            })
        );
        let restarted = a.ctl.start().await;
        if round < 2 {
            restarted.unwrap();
            let new_pid = a.ctl.postmaster_pid().unwrap();
            assert_ne!(new_pid, pid);
            assert_eq!(a.count("SELECT 1::bigint").await, 1);
        } else {
            assert!(
                matches!(restarted, Err(PgError::RestartLimit { restarts: 2, .. })),
                "{restarted:?}"
            );
            assert_eq!(a.ctl.postmaster_pid(), None);
        }
    }
    // Past the limit the next attempt comes `retry_after` after the last one, not at the end
    // of the window: a fixed node comes back by itself.
    let limited = std::time::Instant::now();
    let deadline = limited + RETRY_AFTER * 3;
    loop {
        match a.ctl.start().await {
            Ok(()) => break,
            Err(PgError::RestartLimit { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no restart within {:?} of the limit: {e}", RETRY_AFTER * 3),
        }
    }
    assert!(limited.elapsed() < RETRY_AFTER * 3);
    assert_eq!(a.count("SELECT 1::bigint").await, 1);
    // A deliberate stop is not a crash.
    a.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
    a.ctl.start().await.unwrap();
    // Nor is a clean shutdown asked for outside the controller (the run loop's SIGINT when the
    // lease runs out), however often: the limit (2, reached above) does not stop the start.
    for _ in 0..3 {
        let pid = a.ctl.postmaster_pid().unwrap();
        h.scratch.saw_postmaster(pid);
        kill(Pid::from_raw(pid), Signal::SIGINT).unwrap();
        let state = a.ctl.wait_postmaster_exit(Duration::from_secs(10)).await;
        assert_eq!(state, PostmasterState::Stopped);
        a.ctl.start().await.unwrap();
    }
    let pid = a.ctl.postmaster_pid().unwrap();
    h.scratch.saw_postmaster(pid);

    // A crash after a stable run is not part of a crash loop: the count starts afresh, so two
    // crashes in a row restart at once although the limit (2) was reached less than
    // `RETRY_AFTER` ago. Waiting is the point here: the server must run `STABLE_AFTER`.
    tokio::time::sleep(STABLE_AFTER).await;
    assert!(limited.elapsed() < RETRY_AFTER * 3);
    for _ in 0..2 {
        let pid = a.ctl.postmaster_pid().unwrap();
        h.scratch.saw_postmaster(pid);
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        let state = a.ctl.wait_postmaster_exit(Duration::from_secs(10)).await;
        assert!(
            matches!(state, PostmasterState::Crashed { .. }),
            "{state:?}"
        );
        a.ctl.start().await.unwrap();
    }
    let pid = a.ctl.postmaster_pid().unwrap();
    h.scratch.saw_postmaster(pid);

    // The agent itself restarts: a new controller adopts the running postmaster.
    let cfg = a.ctl.config().clone();
    drop(a);
    let mut again = PgController::new(cfg).unwrap();
    assert_eq!(again.postmaster_pid(), Some(pid));
    assert_eq!(again.observe().await.unwrap().role, ServerRole::Primary);
    again.start().await.unwrap();
    assert_eq!(again.postmaster_pid(), Some(pid));
    again.stop(ha_agent::pg::StopMode::Smart).await.unwrap();
    assert_eq!(again.check_postmaster(), PostmasterState::Stopped);
    assert!(again.connect().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_check_reports_commits_that_hang() {
    use ha_agent::run::commit_check::{CommitCheck, run};
    let mut h = Harness::new();
    let mut a = h.node("a", |_| {});
    a.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    h.scratch.saw_postmaster(a.ctl.postmaster_pid().unwrap());
    let check = CommitCheck::default();
    check.set_writable(true);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(run(a.ctl.config().clone(), check.clone(), stop.clone()));
    eventually!(
        "two checks commit",
        Duration::from_secs(10),
        check.completed() >= 2
    );
    assert!(!check.blocked(), "a healthy primary's commits complete");

    // A synchronous standby that does not exist: every commit waits for it, a client's too.
    let nobody = SyncConfig {
        standbys: vec![NodeId::new("nobody").unwrap()],
        quorum: 1,
    };
    a.ctl.set_synchronous(&nobody).await.unwrap();
    let blocked_at = Instant::now();
    eventually!(
        "commits reported blocked",
        Duration::from_secs(10),
        check.blocked()
    );
    println!(
        "commit check: blocked reported {:?} after the change",
        blocked_at.elapsed()
    );
    let done = check.completed();
    a.ctl.set_synchronous(&SyncConfig::default()).await.unwrap();
    eventually!(
        "commits complete again",
        Duration::from_secs(10),
        !check.blocked()
    );
    assert!(check.completed() > done);
    check.set_writable(false);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_agent_logs_in_as_the_superuser_over_the_socket() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut h = Harness::new();
    // The agent's own local rule (the default), not the tests' trust.
    let mut a = h.node("a", |cfg| {
        cfg.hba[0] = HbaRule::local_peer("postgres");
    });
    a.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    h.scratch.saw_postmaster(a.ctl.postmaster_pid().unwrap());
    // The agent (root here) still logs in.
    assert_eq!(a.count("SELECT 1::bigint").await, 1);
    // A socket directory any local user can reach, as a shared /run/postgresql would be.
    let socket_dir = a.ctl.config().socket_dir.clone();
    std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let port = a.upstream.endpoint.port.to_string();
    let attempt = |os_user: &str| {
        std::process::Command::new("runuser")
            .args([
                "-u",
                os_user,
                "--",
                "/usr/lib/postgresql/15/bin/psql",
                "-X",
                "-A",
                "-t",
            ])
            .arg("-h")
            .arg(&socket_dir)
            .args([
                "-p", &port, "-U", "postgres", "-d", "postgres", "-c", "SELECT 1",
            ])
            .output()
            .unwrap()
    };
    let intruder = attempt("nobody");
    let said = String::from_utf8_lossy(&intruder.stderr).into_owned();
    assert!(
        !intruder.status.success() && said.contains("Peer authentication failed"),
        "a local user other than the agent's logged in as the superuser: {said}"
    );
    let server = attempt("postgres");
    assert!(
        server.status.success(),
        "the server's own OS user: {}",
        String::from_utf8_lossy(&server.stderr)
    );
}

/// A local `postgres` user owns the data directory and its parent (as in Debian's layout) and
/// plants symbolic links to root's files where the root agent writes: the managed settings
/// file, the server log, the data directory itself. Each is refused or replaced without
/// touching the target: no content, owner or mode of root's files changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_postgres_user_cannot_turn_the_root_agent_against_the_host() {
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::fs::PermissionsExt as _;
    let mut h = Harness::new();
    let mut a = h.node("a", |_| {});
    a.ctl.bootstrap(&SyncConfig::default()).await.unwrap();
    h.scratch.saw_postmaster(a.ctl.postmaster_pid().unwrap());

    // Root's files, out of the postgres user's reach.
    let root_only = tempfile::tempdir().unwrap();
    let victim = root_only.path().join("shadow");
    std::fs::write(&victim, "root only\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let victim_dir = root_only.path().join("etc");
    std::fs::create_dir(&victim_dir).unwrap();
    std::fs::write(victim_dir.join("passwd"), "root:x:0:0\n").unwrap();
    std::fs::set_permissions(&victim_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let untouched = || {
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root only\n");
        let m = std::fs::metadata(&victim).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o600));
        assert_eq!(
            std::fs::read_to_string(victim_dir.join("passwd")).unwrap(),
            "root:x:0:0\n"
        );
        let m = std::fs::metadata(&victim_dir).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o755));
    };
    let as_postgres = |script: &str| {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", "sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let data = a.ctl.config().data_dir.clone();
    let log = a.ctl.config().log_file.clone();

    // 1. The managed settings file, and the fixed temporary name earlier versions wrote
    // through, are links to root's file: the write replaces the link and follows neither.
    let managed = data.join("postgresql.ha.conf");
    as_postgres(&format!(
        "ln -sfn '{v}' '{m}' && ln -sfn '{v}' '{m}.ha-tmp'",
        v = victim.display(),
        m = managed.display()
    ));
    a.ctl
        .set_synchronous(&SyncConfig {
            standbys: vec![NodeId::new("b").unwrap()],
            quorum: 1,
        })
        .await
        .unwrap();
    untouched();
    assert!(
        !managed.is_symlink(),
        "the link was replaced by the agent's file"
    );
    let m = std::fs::metadata(&managed).unwrap();
    assert_ne!(m.uid(), 0, "the managed file belongs to the server's user");
    assert!(
        std::fs::read_to_string(&managed)
            .unwrap()
            .contains("synchronous_standby_names"),
        "the agent's settings are in place"
    );

    // 2. The server log is a link to root's file: the start is refused, naming the link.
    a.ctl.stop(ha_agent::pg::StopMode::Fast).await.unwrap();
    as_postgres(&format!(
        "rm -f '{}' && ln -s '{}' '{}'",
        log.display(),
        victim.display(),
        log.display()
    ));
    let err = a.ctl.start().await.expect_err("a linked server log");
    assert!(matches!(err, PgError::File(_)), "{err:?}");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    untouched();

    // 3. The data directory itself is a link to root's directory: a new cluster is refused
    // before anything in it is removed, chmodded or given away.
    as_postgres(&format!(
        "rm -f '{log}' && mv '{d}' '{d}.real' && ln -s '{v}' '{d}'",
        log = log.display(),
        d = data.display(),
        v = victim_dir.display()
    ));
    let err = a
        .ctl
        .bootstrap(&SyncConfig::default())
        .await
        .expect_err("a linked data directory");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    untouched();
}
