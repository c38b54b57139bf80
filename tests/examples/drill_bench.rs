//! Drill benchmark, on demand: one cluster (3 monitors, a primary and two synchronous standbys,
//! a writer committing rows all along), then `RUNS` rounds (default 10; first argument) of
//! crash-primary, freeze-primary and planned switchover, each followed by the full recovery.
//! Prints, per drill, the median and maximum time from the fault (or the request) to the first
//! write acknowledged by the new primary. Asserts safety (nothing acknowledged lost, never two
//! writable nodes), never times.
//!
//! `cargo run -p ha-tests --release --example drill_bench -- 10`

use std::time::Duration;

use ha_tests::cluster::Cluster;
use ha_tests::drill::{self, Outcome};
use ha_tests::writer::{Watch, Writer};

fn summary(name: &str, times: &mut [Duration]) {
    times.sort();
    let median = times[times.len() / 2];
    let max = times[times.len() - 1];
    let min = times[0];
    println!(
        "{name:<12} runs {:>3}  median {median:>10.3?}  max {max:>10.3?}  min {min:>10.3?}",
        times.len()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("the first argument is a number of runs"))
        .unwrap_or(10);
    let mut cluster = Cluster::builder().monitors(3).postgres(3).start().await;
    let writer = Writer::start(cluster.addrs());
    let watch = Watch::start(cluster.addrs());
    let (mut crash, mut freeze, mut switch) = (Vec::new(), Vec::new(), Vec::new());
    let show = |what: &str, i: usize, o: &Outcome| {
        println!(
            "run {i:>2} {what:<10} {} -> {}: {:?}",
            o.old_primary, o.new_primary, o.fault_to_write
        );
    };
    for i in 1..=runs {
        let o = drill::crash_primary(&mut cluster, &writer).await;
        show("crash", i, &o);
        crash.push(o.fault_to_write);
        drill::recover(&mut cluster, &writer, &o.new_primary).await;

        let o = drill::freeze_primary(&mut cluster, &writer).await;
        show("freeze", i, &o);
        freeze.push(o.fault_to_write);
        drill::recover(&mut cluster, &writer, &o.new_primary).await;

        let o = drill::switchover(&mut cluster, &writer).await;
        show("switchover", i, &o);
        switch.push(o.fault_to_write);
        drill::recover(&mut cluster, &writer, &o.new_primary).await;
    }
    let log = writer.stop().await;
    let seen = watch.stop().await;
    assert!(
        seen.split_brains.is_empty(),
        "two writable primaries: {:?}",
        seen.split_brains
    );
    let primary = cluster.primary().await.expect("the group has a primary");
    drill::assert_nothing_lost(&cluster, &log, &primary).await;
    println!(
        "fault to first acknowledged write on the new primary ({} writes acknowledged, none lost; {} watch rounds, never two writable nodes)",
        log.acks.len(),
        seen.rounds
    );
    summary("crash", &mut crash);
    summary("freeze", &mut freeze);
    summary("switchover", &mut switch);
}
