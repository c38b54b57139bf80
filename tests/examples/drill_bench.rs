//! Drill benchmark, on demand: one cluster (3 monitors, a primary and two synchronous standbys,
//! a writer committing rows all along), then `RUNS` rounds (default 10; first argument) of
//! crash-primary, freeze-primary and planned switchover, each followed by the full recovery.
//! Prints, per drill, the median and maximum time from the fault (or the request) to the first
//! write acknowledged by the new primary, and of the write unavailability (the longest time
//! without any acknowledged write in that interval: for a switchover the old primary keeps
//! acknowledging until it drains). Asserts safety (nothing acknowledged lost, never two
//! writable nodes), never times.
//!
//! `cargo run -p ha-tests --release --example drill_bench -- 10`

use std::time::Duration;

use ha_tests::cluster::Cluster;
use ha_tests::drill::{self, Outcome};
use ha_tests::writer::{Watch, Writer};

fn summary(name: &str, outcomes: &[Outcome]) {
    let line = |what: &str, mut times: Vec<Duration>| {
        times.sort();
        println!(
            "{name:<11} {what:<24} runs {:>3}  median {:>9.3?}  max {:>9.3?}  min {:>9.3?}",
            times.len(),
            times[times.len() / 2],
            times[times.len() - 1],
            times[0]
        );
    };
    line(
        "fault to first write",
        outcomes.iter().map(|o| o.fault_to_write).collect(),
    );
    line(
        "writes unavailable",
        outcomes.iter().map(|o| o.unavailable).collect(),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args().nth(1).map_or(10, |a| {
        a.parse()
            .ok()
            .filter(|&n| n > 0)
            .expect("the first argument is a positive number of runs")
    });
    let mut cluster = Cluster::builder().monitors(3).postgres(3).start().await;
    let writer = Writer::start(cluster.addrs());
    let watch = Watch::start(cluster.addrs());
    let (mut crash, mut freeze, mut switch) = (Vec::new(), Vec::new(), Vec::new());
    let show = |what: &str, i: usize, o: &Outcome| {
        println!(
            "run {i:>2} {what:<10} {} -> {}: first write after {:?}, unavailable {:?}",
            o.old_primary, o.new_primary, o.fault_to_write, o.unavailable
        );
    };
    for i in 1..=runs {
        let o = drill::crash_primary(&mut cluster, &writer).await;
        show("crash", i, &o);
        crash.push(o.clone());
        drill::recover(&mut cluster, &writer, &o.new_primary).await;

        let o = drill::freeze_primary(&mut cluster, &writer).await;
        show("freeze", i, &o);
        freeze.push(o.clone());
        drill::recover(&mut cluster, &writer, &o.new_primary).await;

        let o = drill::switchover(&mut cluster, &writer).await;
        show("switchover", i, &o);
        switch.push(o.clone());
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
        "{} writes acknowledged, none lost; {} watch rounds, never two writable nodes",
        log.acks.len(),
        seen.rounds
    );
    summary("crash", &crash);
    summary("freeze", &freeze);
    summary("switchover", &switch);
}
