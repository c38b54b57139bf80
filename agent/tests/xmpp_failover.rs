//! The XMPP service through a failover, with real parts only: one `ha-monitor`, two PostgreSQL
//! 15 nodes with their agents (the `ha-tests` harness), two private ejabberd 23.01 nodes in one
//! Erlang cluster, each driven by an `ha-agent` in the ejabberd role, and XMPP clients on the
//! `tokio-xmpp` library. Every chat message is an SQL write (message archive), and a message to
//! an offline user is stored in SQL until the user logs in.
//!
//! 1. Both frontends use psql1 and report both Erlang nodes as their cluster. alice (on e1) and bob (on e2) log in and exchange a message;
//!    alice leaves one for carol, who is offline. Both are stored on psql1.
//! 2. kill -9 of psql1's postmaster and agent: psql2 is promoted and both frontends move to it.
//! 3. alice and bob, still in the sessions they opened before (no interruption, same bound
//!    JIDs), exchange messages both ways, delivered and archived on psql2; alice leaves carol a
//!    second offline message.
//! 4. Nothing written before the failover is missing on psql2; carol logs in on e2 and receives
//!    both offline messages, served from psql2.
//! 5. psql1 rejoins as psql2's standby; then psql2 is frozen (SIGSTOP of its PostgreSQL and
//!    agent) for longer than the lease: psql1 is promoted, both frontends leave the frozen
//!    server, the same sessions exchange messages stored on psql1; thawed, psql2 fences itself
//!    and rejoins, and psql1 holds every message of the test.
//! 6. A switchover back to psql2, psql1 demoted to its standby: both frontends move, no
//!    ejabberd connection is found on psql1, and the sessions carry on.
//!
//! The times from the kill (and the freeze) to both frontends verified on the new primary, and
//! from the kill to the first message after it archived on psql2, are printed. Every process is ended by PID, even on failure.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/frontends.rs"]
mod frontends;

use std::time::Duration;

use common::{VHOST, epoch, psql};
use frontends::{FRONTENDS, Frontends, frontends_on};
use ha_tests::cluster::{Cluster, node, primary_of};
use ha_tests::xmpp::XmppUser;
use tokio::time::Instant;

const CONVERGE: Duration = Duration::from_secs(90);
const LOGIN: Duration = Duration::from_secs(20);
const DELIVERY: Duration = Duration::from_secs(10);

/// Waits until `query` (a count) on `node`'s ejabberd database returns `want`.
async fn wait_count(cluster: &Cluster, node: &str, query: &str, want: u64) {
    let deadline = Instant::now() + DELIVERY;
    loop {
        let got: u64 = psql(cluster, node, common::DB, &["-c", query])
            .parse()
            .unwrap();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node}: {query} gave {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sessions of ejabberd's role on `node`'s server.
fn ejabberd_connections(cluster: &Cluster, node: &str) -> u64 {
    psql(
        cluster,
        node,
        "postgres",
        &[
            "-c",
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'ejabberd'",
        ],
    )
    .parse()
    .unwrap()
}

fn archived(body: &str) -> String {
    format!("SELECT least(count(*), 1) FROM archive WHERE txt = '{body}'")
}

fn offline_for_carol() -> String {
    "SELECT count(*) FROM spool WHERE username = 'carol'".to_owned()
}

fn jid(user: &str) -> String {
    format!("{user}@{VHOST}")
}

/// Neither session was interrupted, and both are still the sessions opened at login.
async fn assert_sessions_kept(
    alice: &mut XmppUser,
    bob: &mut XmppUser,
    sessions: &(String, String),
) {
    assert_eq!(
        (alice.interruptions().await, bob.interruptions().await),
        (0, 0),
        "the XMPP sessions were never interrupted"
    );
    assert_eq!((alice.bound_jid(), bob.bound_jid()), *sessions);
}

/// Sends `body` from `from` to `to`, who must receive it from `from`.
async fn exchange(
    from: &mut XmppUser,
    from_user: &str,
    to: &mut XmppUser,
    to_user: &str,
    body: &str,
) {
    from.send(&jid(to_user), body).await.unwrap();
    let sender = to.receive(body, DELIVERY).await.unwrap();
    assert_eq!(sender, jid(from_user));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xmpp_sessions_survive_a_primary_crash_and_write_to_the_new_primary() {
    let mut cluster = common::cluster_for_ejabberd().start().await;
    let frontends = Frontends::start(&cluster).await;
    let [e1, _] = &frontends.nodes;
    let [c2s1, c2s2] = frontends.c2s;

    // 1. Both frontends on psql1, each reporting both Erlang nodes as its cluster; two
    //    sessions, one message each way stored there.
    let members = frontends.nodes.each_ref().map(|n| n.node().node.clone());
    cluster
        .wait_for(
            "both frontends use psql1 and see the cluster",
            CONVERGE,
            |s| {
                frontends_on(s, "psql1")
                    && FRONTENDS.iter().all(|f| {
                        node(s, f)
                            .and_then(|n| n.ejabberd.as_ref())
                            .is_some_and(|e| members.iter().all(|m| e.cluster_members.contains(m)))
                    })
            },
        )
        .await;
    for (user, password) in [("alice", "pw-a"), ("bob", "pw-b"), ("carol", "pw-c")] {
        e1.ctl(&["register", user, VHOST, password]).await.unwrap();
    }
    let mut alice = XmppUser::login(&jid("alice"), "pw-a", c2s1, LOGIN)
        .await
        .unwrap();
    let mut bob = XmppUser::login(&jid("bob"), "pw-b", c2s2, LOGIN)
        .await
        .unwrap();
    let sessions = (alice.bound_jid(), bob.bound_jid());
    exchange(&mut alice, "alice", &mut bob, "bob", "before: alice to bob").await;
    alice
        .send(&jid("carol"), "before: offline for carol")
        .await
        .unwrap();
    wait_count(&cluster, "psql1", &archived("before: alice to bob"), 1).await;
    wait_count(&cluster, "psql1", &offline_for_carol(), 1).await;

    // 2. kill -9 of the primary: both frontends move to psql2.
    let before = epoch(&cluster.status().await);
    let killed = Instant::now();
    cluster.crash("psql1");
    cluster
        .wait_for("psql2 promoted and both frontends on it", CONVERGE, |s| {
            primary_of(s) == Some("psql2") && epoch(s) > before && frontends_on(s, "psql2")
        })
        .await;
    let moved = killed.elapsed();

    // 3. The same sessions carry on; what they send now is stored on psql2.
    exchange(&mut alice, "alice", &mut bob, "bob", "after: alice to bob").await;
    wait_count(&cluster, "psql2", &archived("after: alice to bob"), 1).await;
    let first_write = killed.elapsed();
    exchange(&mut bob, "bob", &mut alice, "alice", "after: bob to alice").await;
    wait_count(&cluster, "psql2", &archived("after: bob to alice"), 1).await;
    alice
        .send(&jid("carol"), "after: offline for carol")
        .await
        .unwrap();
    assert_sessions_kept(&mut alice, &mut bob, &sessions).await;
    println!(
        "primary crash to both frontends verified on psql2: {moved:?}; \
         to the first message after it archived on psql2: {first_write:?}"
    );

    // 4. Nothing from before is missing; carol's offline messages come from psql2.
    wait_count(&cluster, "psql2", &archived("before: alice to bob"), 1).await;
    wait_count(&cluster, "psql2", &offline_for_carol(), 2).await;
    let mut carol = XmppUser::login(&jid("carol"), "pw-c", c2s2, LOGIN)
        .await
        .unwrap();
    for body in ["before: offline for carol", "after: offline for carol"] {
        assert_eq!(carol.receive(body, DELIVERY).await.unwrap(), jid("alice"));
    }

    // 5. The new primary frozen (SIGSTOP of its PostgreSQL and agent) for longer than the
    //    lease, with psql1 back as its standby: psql1 is promoted, the frontends leave the
    //    frozen server, the sessions carry on and what they send is stored on psql1.
    cluster.start_agent("psql1");
    cluster.wait_converged("psql2", CONVERGE).await;
    let before = epoch(&cluster.status().await);
    let frozen = Instant::now();
    cluster.freeze_node("psql2");
    cluster
        .wait_for("psql1 promoted and both frontends on it", CONVERGE, |s| {
            primary_of(s) == Some("psql1") && epoch(s) > before && frontends_on(s, "psql1")
        })
        .await;
    let moved = frozen.elapsed();
    exchange(&mut alice, "alice", &mut bob, "bob", "frozen: alice to bob").await;
    exchange(&mut bob, "bob", &mut alice, "alice", "frozen: bob to alice").await;
    for body in ["frozen: alice to bob", "frozen: bob to alice"] {
        wait_count(&cluster, "psql1", &archived(body), 1).await;
    }
    println!("primary frozen to both frontends verified on psql1: {moved:?}");
    cluster.thaw();
    // psql2 wakes with its lease long over: it fences itself and returns as psql1's standby.
    cluster.wait_converged("psql1", CONVERGE).await;
    for body in [
        "before: alice to bob",
        "after: alice to bob",
        "after: bob to alice",
    ] {
        wait_count(&cluster, "psql1", &archived(body), 1).await;
    }
    assert_sessions_kept(&mut alice, &mut bob, &sessions).await;
    assert_eq!(
        ejabberd_connections(&cluster, "psql2"),
        0,
        "none on the thawed server"
    );

    // 6. A planned switchover back to psql2: psql1 keeps running, demoted to a standby. Both
    //    frontends move and leave no connection on psql1; the sessions carry on.
    let before = epoch(&cluster.status().await);
    cluster.switchover(Some("psql2")).await.unwrap();
    cluster
        .wait_for(
            "psql2 primary again and both frontends on it",
            CONVERGE,
            |s| primary_of(s) == Some("psql2") && epoch(s) > before && frontends_on(s, "psql2"),
        )
        .await;
    cluster.wait_converged("psql2", CONVERGE).await;
    assert_eq!(
        ejabberd_connections(&cluster, "psql1"),
        0,
        "no ejabberd connection on the old primary, now a standby"
    );
    exchange(
        &mut alice,
        "alice",
        &mut bob,
        "bob",
        "switched: alice to bob",
    )
    .await;
    wait_count(&cluster, "psql2", &archived("switched: alice to bob"), 1).await;
    assert_sessions_kept(&mut alice, &mut bob, &sessions).await;

    for user in [alice, bob, carol] {
        user.logout().await;
    }
    frontends.stop().await;
}
