//! Named faults against a running [`Cluster`] with a [`Writer`] running, each measured from the
//! fault to the first write acknowledged by the new primary, and the recovery that must follow
//! every drill: the old primary back as a streaming standby of the new one, the group
//! synchronous again. Shared by the drill tests and the drill benchmark.
//!
//! A drill asserts what must hold whatever the timing (the primary changes, under a new epoch;
//! a frozen primary is not replaced before its lease ran out); times are returned, not judged.

use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::{Cluster, LEASE, group, node, primary_of};
use crate::writer::{Writer, WriterLog, missing_acknowledged};

/// How long a failover may take before a drill fails.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// How long an old primary may take to come back as a streaming standby.
const REJOIN_DEADLINE: Duration = Duration::from_secs(120);

/// What one drill measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub old_primary: String,
    pub new_primary: String,
    /// From the fault (or the operator's request) to the first write the new primary
    /// acknowledged.
    pub fault_to_write: Duration,
    /// The longest time without any acknowledged write in that interval: the write
    /// unavailability (for a switchover the old primary keeps acknowledging until it drains).
    pub unavailable: Duration,
}

async fn current_primary(c: &Cluster) -> (String, u64) {
    let s = c.status().await;
    let p = primary_of(&s).expect("the group has a primary").to_owned();
    (p, group(&s).map_or(0, |g| g.epoch))
}

/// Waits for the first write acknowledged by another node than `old` after `t0`, then checks
/// that the catalog names that node primary under a newer epoch.
async fn measure(c: &Cluster, w: &Writer, old: &str, epoch: u64, t0: Instant) -> Outcome {
    let ack = w.wait_ack_after(t0, Some(old), FAILOVER_DEADLINE).await;
    let fault_to_write = ack.at.duration_since(t0);
    let s = c
        .wait_for(
            "the catalog names the new primary",
            Duration::from_secs(10),
            |s| primary_of(s) == Some(ack.node.as_str()),
        )
        .await;
    let new_epoch = group(&s).map_or(0, |g| g.epoch);
    assert!(
        new_epoch > epoch,
        "a new primary carries a new epoch: {epoch} -> {new_epoch}"
    );
    Outcome {
        old_primary: old.to_owned(),
        new_primary: ack.node,
        fault_to_write,
        unavailable: w.snapshot().longest_gap(t0, ack.at),
    }
}

/// SIGKILL of the primary's agent and every PostgreSQL process (a machine crash).
pub async fn crash_primary(c: &mut Cluster, w: &Writer) -> Outcome {
    let (old, epoch) = current_primary(c).await;
    let t0 = Instant::now();
    c.crash(&old);
    measure(c, w, &old, epoch, t0).await
}

/// SIGSTOP of the primary's agent and PostgreSQL until a standby was promoted (necessarily
/// longer than the lease), then SIGCONT: the old primary must fence itself and rejoin.
pub async fn freeze_primary(c: &mut Cluster, w: &Writer) -> Outcome {
    let (old, epoch) = current_primary(c).await;
    let t0 = Instant::now();
    c.freeze_node(&old);
    let outcome = measure(c, w, &old, epoch, t0).await;
    c.thaw();
    assert!(
        outcome.fault_to_write >= LEASE,
        "a frozen primary was replaced after {:?}, before its {LEASE:?} lease ran out",
        outcome.fault_to_write
    );
    outcome
}

/// A planned switchover to the best standby, measured from the request.
pub async fn switchover(c: &mut Cluster, w: &Writer) -> Outcome {
    let (old, epoch) = current_primary(c).await;
    let t0 = Instant::now();
    c.switchover(None)
        .await
        .unwrap_or_else(|e| panic!("switchover refused: {e}"));
    measure(c, w, &old, epoch, t0).await
}

/// Maintenance on the primary: the monitor first switches over to the best standby. Measured
/// from the request; the old primary stays in maintenance until [`end_maintenance`].
pub async fn maintenance_on_primary(c: &mut Cluster, w: &Writer) -> Outcome {
    let (old, epoch) = current_primary(c).await;
    let t0 = Instant::now();
    c.set_maintenance(&old, true)
        .await
        .unwrap_or_else(|e| panic!("maintenance refused: {e}"));
    let outcome = measure(c, w, &old, epoch, t0).await;
    c.wait_for("the old primary is in maintenance", REJOIN_DEADLINE, |s| {
        node(s, &old).is_some_and(|n| n.maintenance)
    })
    .await;
    outcome
}

/// Ends the maintenance of `name`: it must rejoin as a streaming standby.
pub async fn end_maintenance(c: &mut Cluster, name: &str) {
    c.set_maintenance(name, false)
        .await
        .unwrap_or_else(|e| panic!("ending maintenance refused: {e}"));
}

/// After a drill: every agent the drill killed runs again, every node streams from
/// `primary`, the group is synchronous, and every write acknowledged so far is on `primary`.
pub async fn recover(c: &mut Cluster, w: &Writer, primary: &str) {
    let stopped: Vec<String> = c
        .nodes()
        .iter()
        .filter(|n| !c.agent_running(&n.name))
        .map(|n| n.name.clone())
        .collect();
    for name in stopped {
        c.start_agent(&name);
    }
    c.wait_converged(primary, REJOIN_DEADLINE).await;
    assert_nothing_lost(c, &w.snapshot(), primary).await;
}

/// Polls the status for `window`: `primary` must stay the group's primary at `epoch` (no
/// failover), and the writer must keep getting acknowledgements from it.
pub async fn assert_no_failover(
    c: &Cluster,
    w: &Writer,
    primary: &str,
    epoch: u64,
    window: Duration,
) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        let s = c.status().await;
        let g = group(&s).expect("the group exists");
        assert_eq!(
            (g.primary.as_str(), g.epoch),
            (primary, epoch),
            "the primary changed: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ack = w.wait_ack_after(end, None, Duration::from_secs(5)).await;
    assert_eq!(ack.node, primary, "writes go to the same primary");
}

/// Every write acknowledged in `log` is on `primary`.
pub async fn assert_nothing_lost(c: &Cluster, log: &WriterLog, primary: &str) {
    let missing = missing_acknowledged(&c.node(primary).addr(), log)
        .await
        .unwrap_or_else(|e| panic!("reading {primary}: {e}"));
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes missing on {primary}: {missing:?}",
        missing.len(),
        log.acks.len()
    );
}
