//! The ejabberd role of `ha-agent` end to end, with real processes: one `ha-monitor`, two
//! PostgreSQL nodes with their agents (the `ha-tests` harness), a private ejabberd 23.01 whose
//! SQL backend is the primary, and an `ha-agent` in the ejabberd role driving it.
//!
//! 1. The ejabberd agent joins, follows the primary (psql1) and reports the applied target;
//!    a user registered through ejabberd lands on psql1.
//! 2. kill -9 of psql1's postmaster and agent: psql2 is promoted, the ejabberd agent applies
//!    the new epoch, status shows psql2 as the applied target, and a user registered through
//!    ejabberd afterwards lands on psql2 (an uncached write). The time from status showing
//!    psql2 writable to status showing the target applied is printed (both seen by polling).
//! 3. An option ejabberd refuses, added by hand just before a switchover: the agent applies the
//!    new epoch from its last good copy and the broken option is gone; an edit ejabberd
//!    accepts (another loglevel) is kept (the rule in agent/README.md).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{EjabberdAgent, VHOST, applied, epoch, prepare_database, users};
use ha_agent::ejabberd::PrivateInstance;
use ha_proto::v1;
use ha_tests::cluster::{node, primary_of};
use ha_tests::free_port;
use tokio::time::Instant;

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ejabberd_agent_follows_the_primary_and_repairs_a_refused_edit() {
    let mut cluster = common::cluster_for_ejabberd().start().await;
    prepare_database(&cluster, "psql1");
    let c2s = free_port();
    let instance = PrivateInstance::start(
        &common::ejabberd_yml(c2s, cluster.node("psql1").port),
        free_port(),
    )
    .await
    .unwrap();
    let _agent = EjabberdAgent::start(&cluster, "e1", &instance, c2s).await;

    // 1. It follows psql1.
    let s = cluster
        .wait_for("e1 applied psql1", CONVERGE, |s| {
            let (n, e, _) = applied(s, "e1");
            n == "psql1" && e == epoch(s)
        })
        .await;
    let e1 = node(&s, "e1").unwrap();
    assert_eq!(e1.reached, i32::from(v1::GoalState::Follow));
    assert_eq!(
        e1.ejabberd
            .as_ref()
            .unwrap()
            .applied_target
            .as_ref()
            .unwrap()
            .port,
        u32::from(cluster.node("psql1").port)
    );
    instance
        .ctl(&["register", "alice", VHOST, "pw-a"])
        .await
        .unwrap();
    assert_eq!(users(&cluster, "psql1", "alice"), "1");

    // 2. kill -9 of the primary: the ejabberd agent moves ejabberd to psql2.
    let before = epoch(&cluster.status().await);
    cluster.crash("psql1");
    let s = cluster
        .wait_for("psql2 promoted and writable", CONVERGE, |s| {
            primary_of(s) == Some("psql2")
                && epoch(s) > before
                && node(s, "psql2").is_some_and(|n| {
                    n.reached == i32::from(v1::GoalState::Primary)
                        || n.reached == i32::from(v1::GoalState::Single)
                })
        })
        .await;
    let promoted_seen = Instant::now();
    let new_epoch = epoch(&s);
    cluster
        .wait_for("e1 applied psql2", CONVERGE, |s| {
            let (n, e, _) = applied(s, "e1");
            n == "psql2" && e == new_epoch
        })
        .await;
    println!(
        "ejabberd re-pointed {} ms after status showed psql2 writable",
        promoted_seen.elapsed().as_millis()
    );
    instance
        .ctl(&["register", "bob", VHOST, "pw-b"])
        .await
        .unwrap();
    assert_eq!(
        users(&cluster, "psql2", "bob"),
        "1",
        "bob is on the new primary"
    );
    assert_eq!(
        users(&cluster, "psql2", "alice"),
        "1",
        "alice survived the failover"
    );

    // 3. An edit ejabberd refuses (a broken option) made just before a switchover: the agent
    //    applies the new epoch from its last good copy (not the broken file) and the file
    //    ends up without the edit; an edit ejabberd accepts is kept.
    cluster.start_agent("psql1");
    cluster.wait_converged("psql2", CONVERGE).await;
    let path = instance.config_path();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{good}loglevel: not-a-level\n")).unwrap();
    cluster.switchover(Some("psql1")).await.unwrap();
    let s = cluster
        .wait_for("e1 applied psql1 after the switchover", CONVERGE, |s| {
            let (n, e, _) = applied(s, "e1");
            primary_of(s) == Some("psql1") && n == "psql1" && e == epoch(s)
        })
        .await;
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("not-a-level"), "{text}");
    println!("after the switchover: {}", applied(&s, "e1").2);
    instance
        .ctl(&["register", "carol", VHOST, "pw-c"])
        .await
        .unwrap();
    assert_eq!(users(&cluster, "psql1", "carol"), "1");

    let edited = text.replace("loglevel: info", "loglevel: warning");
    assert_ne!(edited, text);
    std::fs::write(&path, &edited).unwrap();
    cluster
        .wait_for("e1 adopted the accepted edit", CONVERGE, |s| {
            applied(s, "e1")
                .2
                .contains("settings other than SQL changed")
        })
        .await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), edited, "kept");
    instance.stop().await;
}
