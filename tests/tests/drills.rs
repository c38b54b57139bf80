//! Failover drills against real processes: 3 `ha-monitor`s, one primary and two synchronous
//! standbys (each an `ha-agent` driving its own PostgreSQL 15), with a writer committing rows
//! through whichever node is primary and a watch probing every node for writability during the
//! whole test. After every drill the old primary must be back as a streaming standby and every
//! acknowledged write must be on the new primary; at the end no round of the watch may have
//! seen two writable nodes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_tests::cluster::Cluster;
use ha_tests::drill::{self, Outcome};
use ha_tests::writer::{Watch, WatchReport, Writer};

fn report(what: &str, o: &Outcome) {
    println!(
        "{what}: {} -> {}, fault to first acknowledged write {:?}",
        o.old_primary, o.new_primary, o.fault_to_write
    );
}

fn assert_one_writable(watch: &WatchReport) {
    assert!(watch.rounds > 0, "the watch never ran");
    assert!(
        watch.split_brains.is_empty(),
        "two writable primaries: {:?}",
        watch.split_brains
    );
}

async fn start() -> (Cluster, Writer, Watch) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let cluster = Cluster::builder().monitors(3).postgres(3).start().await;
    let writer = Writer::start(cluster.addrs());
    let watch = Watch::start(cluster.addrs());
    writer
        .wait_ack_after(tokio::time::Instant::now(), None, Duration::from_secs(10))
        .await;
    (cluster, writer, watch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplanned_failures() {
    let (mut cluster, writer, watch) = start().await;

    let o = drill::crash_primary(&mut cluster, &writer).await;
    report("crash (kill -9 of postmaster, backends and agent)", &o);
    drill::recover(&mut cluster, &writer, &o).await;

    let o = drill::freeze_primary(&mut cluster, &writer).await;
    report("freeze (SIGSTOP of PostgreSQL and agent)", &o);
    drill::recover(&mut cluster, &writer, &o).await;

    let last = writer.stop().await;
    assert_one_writable(&watch.stop().await);
    let p = cluster.primary().await.unwrap();
    drill::assert_nothing_lost(&cluster, &last, &p).await;
}
