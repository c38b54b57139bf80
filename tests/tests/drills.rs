//! Failover drills against real processes: 3 `ha-monitor`s, one primary and two synchronous
//! standbys (each an `ha-agent` driving its own PostgreSQL 15), with a writer committing rows
//! through whichever node is primary and a watch probing every node for writability during the
//! whole test. After every drill the old primary must be back as a streaming standby and every
//! acknowledged write must be on the new primary; at the end no round of the watch may have
//! seen two writable nodes. A monitor leader change and a dead agent beside a live database
//! must cause no failover. Times are printed (see the `drill_bench` example for figures over
//! many runs).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_tests::cluster::{Cluster, LEASE, group, primary_of};
use ha_tests::drill::{self, Outcome};
use ha_tests::writer::{Watch, Writer};
use tokio::time::Instant;

fn report(what: &str, o: &Outcome) {
    println!(
        "{what}: {} -> {}, fault to first acknowledged write {:?}, writes unavailable {:?}",
        o.old_primary, o.new_primary, o.fault_to_write, o.unavailable
    );
}

async fn start() -> (Cluster, Writer, Watch) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let cluster = Cluster::builder().monitors(3).postgres(3).start().await;
    let writer = Writer::start(cluster.addrs());
    let watch = Watch::start(cluster.addrs());
    writer
        .wait_ack_after(Instant::now(), None, Duration::from_secs(10))
        .await;
    (cluster, writer, watch)
}

/// Stops the workload: nothing acknowledged is missing on the final primary, and the watch
/// never saw two writable nodes in one round.
async fn finish(cluster: &Cluster, writer: Writer, watch: Watch) {
    let log = writer.stop().await;
    let seen = watch.stop().await;
    assert!(
        seen.rounds > 10,
        "the watch hardly ran: {} rounds",
        seen.rounds
    );
    assert!(
        seen.split_brains.is_empty(),
        "two writable primaries: {:?}",
        seen.split_brains
    );
    let p = cluster.primary().await.unwrap();
    drill::assert_nothing_lost(cluster, &log, &p).await;
    println!(
        "{} writes acknowledged, {} uncertain, {} watch rounds",
        log.acks.len(),
        log.uncertain.len(),
        seen.rounds
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_freeze_and_two_failovers_in_a_row() {
    let (mut cluster, writer, watch) = start().await;

    let o = drill::crash_primary(&mut cluster, &writer).await;
    report("crash (kill -9 of PostgreSQL and agent)", &o);
    drill::recover(&mut cluster, &writer, &o.new_primary).await;

    let o = drill::freeze_primary(&mut cluster, &writer).await;
    report(
        "freeze (SIGSTOP of PostgreSQL and agent, beyond the lease)",
        &o,
    );
    drill::recover(&mut cluster, &writer, &o.new_primary).await;

    // Two failovers in a row: the second primary crashes as soon as it has a synchronous
    // standby again, before the first one rejoined.
    let first = drill::crash_primary(&mut cluster, &writer).await;
    report("first of two crashes", &first);
    cluster
        .wait_synchronous(&first.new_primary, Duration::from_secs(30))
        .await;
    let second = drill::crash_primary(&mut cluster, &writer).await;
    report("second of two crashes", &second);
    assert_ne!(
        second.new_primary, first.old_primary,
        "the first crashed node is down"
    );
    drill::recover(&mut cluster, &writer, &second.new_primary).await;

    finish(&cluster, writer, watch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failover_for_a_monitor_leader_change_or_a_dead_agent() {
    let (mut cluster, writer, watch) = start().await;
    let s = cluster.status().await;
    let primary = primary_of(&s).unwrap().to_owned();
    let epoch = group(&s).unwrap().epoch;

    // The monitor leader hangs longer than an election: another monitor takes over and must
    // not judge any node before a full detection window.
    let leader = cluster.leader_id().await;
    cluster.freeze(&[cluster.monitor_pid(leader)]);
    drill::assert_no_failover(&cluster, &writer, &primary, epoch, 2 * LEASE).await;
    let new_leader = cluster.leader_id().await;
    assert_ne!(new_leader, leader, "a new monitor leads");
    cluster.thaw();

    // The primary's agent dies; PostgreSQL lives on and answers the leader's probe.
    cluster.kill_agent(&primary);
    drill::assert_no_failover(&cluster, &writer, &primary, epoch, 2 * LEASE).await;
    drill::recover(&mut cluster, &writer, &primary).await;

    finish(&cluster, writer, watch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_standbys_switchover_and_maintenance() {
    let (mut cluster, writer, watch) = start().await;
    let primary = cluster.primary().await.unwrap();
    let standbys: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| *n != primary)
        .collect();

    // One standby lost: ANY 1 of the two still holds, the primary keeps acknowledging.
    cluster.crash(&standbys[0]);
    let t = Instant::now();
    let ack = writer.wait_ack_after(t, None, Duration::from_secs(5)).await;
    assert_eq!(ack.node, primary);
    println!(
        "one standby lost: next acknowledged write after {:?}",
        ack.at - t
    );

    // Both lost: commits wait until the monitor drops the primary to asynchronous.
    cluster.crash(&standbys[1]);
    let t = Instant::now();
    let ack = writer
        .wait_ack_after(t, None, Duration::from_secs(15))
        .await;
    assert_eq!(ack.node, primary, "no failover for lost standbys");
    println!("both standbys lost: writes resumed after {:?}", ack.at - t);
    let events = cluster.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "sync" && e.message.contains("dropped to asynchronous")),
        "an event records the drop to asynchronous: {events:#?}"
    );
    drill::recover(&mut cluster, &writer, &primary).await;

    let o = drill::switchover(&mut cluster, &writer).await;
    report("planned switchover", &o);
    drill::recover(&mut cluster, &writer, &o.new_primary).await;

    let o = drill::maintenance_on_primary(&mut cluster, &writer).await;
    report("maintenance on the primary", &o);
    drill::end_maintenance(&mut cluster, &o.old_primary).await;
    drill::recover(&mut cluster, &writer, &o.new_primary).await;

    finish(&cluster, writer, watch).await;
}
