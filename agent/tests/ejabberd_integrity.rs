//! The ejabberd agent keeps ejabberd's file and SQL pool right, with real processes: one
//! `ha-monitor`, two PostgreSQL nodes with their agents, a private ejabberd 23.01 and an
//! `ha-agent` in the ejabberd role (found by an operator on the lab stand).
//!
//! a. Invalid YAML written into the managed file by hand is detected and replaced by the
//!    agent's last good copy within one check interval plus one apply; status names the
//!    repair; ejabberd keeps serving (a registration lands on the primary). The time from the
//!    write to the repaired file is printed.
//! b. `sql_port` changed by hand and ejabberd killed and started again while the agent is
//!    stopped (SIGSTOP), so ejabberd surely runs from the tampered file (checked in the node);
//!    once the agent runs again, registrations through ejabberd work again within a printed
//!    bound and land on the primary; the file is the last good copy again.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::{EjabberdAgent, VHOST, applied, epoch, prepare_database, users};
use ha_agent::ejabberd::PrivateInstance;
use ha_agent::run::ejabberd::HEALTH_EVERY;
use ha_tests::cluster::node;
use ha_tests::free_port;
use ha_tests::stand::Stopped;
use tokio::time::Instant;

const CONVERGE: Duration = Duration::from_secs(90);
/// One apply: reload, pool restart and a verified write (well under the 10 s verify bound).
const APPLY: Duration = Duration::from_secs(10);
/// Bound for one registration attempt through ejabberdctl (a broken pool makes it hang).
const ATTEMPT: Duration = Duration::from_secs(3);

/// Registers `prefix-N` users through ejabberd until one succeeds; returns its name. Each
/// attempt has its own name: one that timed out may still complete later.
async fn register_until(instance: &PrivateInstance, prefix: &str, deadline: Instant) -> String {
    for n in 0.. {
        let user = format!("{prefix}{n}");
        let args = ["register", &user, VHOST, "pw"];
        let last = match tokio::time::timeout(ATTEMPT, instance.ctl(&args)).await {
            Ok(Ok(_)) => return user,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {ATTEMPT:?}"),
        };
        assert!(
            Instant::now() < deadline,
            "no registration through ejabberd succeeded in time; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ejabberd_agent_repairs_a_broken_or_tampered_file() {
    let cluster = common::cluster_for_ejabberd().start().await;
    prepare_database(&cluster, "psql1");
    let c2s = free_port();
    let p1 = cluster.node("psql1").port;
    let mut instance = PrivateInstance::start(&common::ejabberd_yml(c2s, p1), free_port())
        .await
        .unwrap();
    let agent = EjabberdAgent::start(&cluster, "e1", &instance, c2s).await;
    cluster
        .wait_for("e1 applied psql1", CONVERGE, |s| {
            let (n, e, _) = applied(s, "e1");
            n == "psql1" && e == epoch(s)
        })
        .await;
    let path = instance.config_path();
    let good = std::fs::read_to_string(&path).unwrap();

    // a. Invalid YAML (an unterminated quote) written by hand.
    let broken = good.replace("sql_password: 'ejb-pw'", "sql_password: 'ejb-pw");
    assert_ne!(broken, good);
    std::fs::write(&path, &broken).unwrap();
    let written = Instant::now();
    let bound = HEALTH_EVERY + APPLY;
    loop {
        if std::fs::read_to_string(&path).unwrap() == good {
            break;
        }
        assert!(
            written.elapsed() < bound,
            "the broken file was not repaired within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "invalid YAML detected and the file repaired {} ms after it was written (check every {:?})",
        written.elapsed().as_millis(),
        HEALTH_EVERY
    );
    let s = cluster
        .wait_for("e1 reports the repair", CONVERGE, |s| {
            applied(s, "e1").2.contains("managed file repaired")
        })
        .await;
    println!("reported: {}", applied(&s, "e1").2);
    let user = register_until(&instance, "alice", Instant::now() + APPLY).await;
    assert_eq!(users(&cluster, "psql1", &user), "1", "ejabberd serves");
    cluster
        .wait_for(
            "e1's error cleared at the next clean check",
            CONVERGE,
            |s| applied(s, "e1").2.is_empty(),
        )
        .await;

    // b. sql_port changed by hand, ejabberd killed and started again from the tampered file
    // while the agent does not look.
    let bogus = free_port();
    let tampered = good.replace(&format!("sql_port: {p1}"), &format!("sql_port: {bogus}"));
    assert_ne!(tampered, good);
    let stopped = Stopped::new(vec![agent.pid()]);
    std::fs::write(&path, &tampered).unwrap();
    instance.kill_and_restart().await.unwrap();
    let port = instance
        .node()
        .eval(&format!("ejabberd_option:sql_port(<<\"{VHOST}\">>)."))
        .await
        .unwrap();
    assert_eq!(
        port,
        bogus.to_string(),
        "ejabberd runs from the tampered file"
    );
    let resumed = Instant::now();
    drop(stopped);
    let user = register_until(&instance, "bob", resumed + HEALTH_EVERY + APPLY * 2).await;
    println!(
        "registrations through ejabberd work again {} ms after the agent resumed",
        resumed.elapsed().as_millis()
    );
    assert_eq!(users(&cluster, "psql1", &user), "1", "on the primary");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
    let s = cluster
        .wait_for("e1 running and clean", CONVERGE, |s| {
            node(s, "e1").is_some_and(|n| {
                n.last_error.is_empty() && n.ejabberd.as_ref().is_some_and(|e| e.running)
            })
        })
        .await;
    assert_eq!(applied(&s, "e1").0, "psql1");
    drop(agent);
    instance.stop().await;
}
