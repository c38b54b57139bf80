//! ejabberd failover figures, on demand: one cluster (a monitor, a primary and its synchronous
//! standby), two private ejabberd 23.01 nodes in one Erlang cluster, each driven by an
//! `ha-agent` in the ejabberd role; then `RUNS` rounds (default 10; first argument) of kill -9
//! of the primary's PostgreSQL and agent, each followed by the old primary's return as a
//! standby. For each ejabberd node it prints the median, maximum and minimum time from the
//! promotion (the monitors' decision, from the event history) to the node's agent having
//! verified a write through ejabberd's own SQL pool on the new primary (the applied time its
//! agent reports), and from the kill to that moment. Both clocks are this machine's.
//!
//! `cargo run -p ha-agent --release --example ejabberd_drill -- 10`

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/frontends.rs"]
mod frontends;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::epoch;
use frontends::{FRONTENDS, Frontends, frontends_on};
use ha_tests::cluster::{node, primary_of};

const CONVERGE: Duration = Duration::from_secs(90);

fn unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn summary(what: &str, mut ms: Vec<u64>) {
    ms.sort_unstable();
    println!(
        "{what:<40} runs {:>3}  median {:>6} ms  max {:>6} ms  min {:>6} ms",
        ms.len(),
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        ms[0]
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
    let mut cluster = common::cluster_for_ejabberd().start().await;
    let frontends = Frontends::start(&cluster).await;
    cluster
        .wait_for("both frontends on psql1", CONVERGE, |s| {
            frontends_on(s, "psql1")
        })
        .await;
    println!(
        "ejabberd nodes up, XMPP on 127.0.0.1 ports {:?}; {runs} crash drills",
        frontends.c2s
    );

    let mut from_promotion: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut from_kill: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=runs {
        let s = cluster.status().await;
        let old = primary_of(&s).unwrap().to_owned();
        let before = epoch(&s);
        let killed = unix_ms();
        cluster.crash(&old);
        let s = cluster
            .wait_for("a new primary and both frontends on it", CONVERGE, |s| {
                epoch(s) > before && primary_of(s).is_some_and(|p| p != old && frontends_on(s, p))
            })
            .await;
        let new = primary_of(&s).unwrap().to_owned();
        let promoted = cluster
            .events()
            .await
            .into_iter()
            .find(|e| e.kind == "promoted" && e.epoch == epoch(&s))
            .expect("the promotion is in the event history")
            .at_unix_ms;
        let mut line = format!("run {run:>2} {old} -> {new}:");
        for (i, name) in FRONTENDS.iter().enumerate() {
            let at = node(&s, name)
                .and_then(|n| n.ejabberd.as_ref())
                .map(|e| e.applied_at_unix_ms)
                .unwrap();
            from_promotion[i].push(at.saturating_sub(promoted));
            from_kill[i].push(at.saturating_sub(killed));
            line.push_str(&format!(
                "  {name} verified {} ms after the promotion ({} ms after the kill)",
                at.saturating_sub(promoted),
                at.saturating_sub(killed)
            ));
        }
        println!("{line}");
        cluster.start_agent(&old);
        cluster.wait_converged(&new, CONVERGE).await;
    }
    for (i, name) in FRONTENDS.iter().enumerate() {
        summary(
            &format!("{name}: promotion to verified write"),
            from_promotion[i].clone(),
        );
        summary(
            &format!("{name}: kill to verified write"),
            from_kill[i].clone(),
        );
    }
    frontends.stop().await;
}
