//! Scenario tests of `decide` + `apply` on the simulated cluster of `sim`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_proto::types::{Epoch, GoalState, NodeId};

use super::sim::{GROUP, World, id};
use super::*;
use crate::catalog::{Op, Rejected};

const STEP: u64 = 100;

fn converged(postgres: &[&str]) -> World {
    let mut w = World::new(postgres, &["e1"]);
    assert!(
        w.run_until(STEP, 50, |w| w.group().sync.confirmed),
        "{}",
        w.log.join("\n")
    );
    assert!(w.write(1000, None));
    w.step();
    w
}

fn promoted_to(w: &World, name: &str) -> bool {
    w.primary().as_deref() == Some(name) && w.goal_state(name) == Some(GoalState::Primary)
}

fn events(w: &World) -> Vec<String> {
    w.cat
        .events_after(0, usize::MAX)
        .map(|e| format!("{}: {}", e.kind, e.message))
        .collect()
}

/// Right after `new` was promoted, `old` keeps its `kept` goal until `new` reports itself
/// primary at the new epoch; only then is it told to follow `new`. (Rewound earlier, it would
/// find `new` still on the old timeline and stream from it.)
fn old_primary_rejoins_after_the_promotion(w: &mut World, old: &str, new: &str, kept: GoalState) {
    let epoch = w.group().epoch;
    assert_eq!(w.goal_state(old), Some(kept), "{}", w.log.join("\n"));
    assert_ne!(w.node(new).reached, Some(GoalState::Primary));
    assert!(w.run_until(STEP, 20, |w| w.goal_state(old) != Some(kept)));
    assert_eq!(w.node(new).reached, Some(GoalState::Primary));
    assert_eq!(
        w.goal(old).unwrap(),
        AssignedGoal::following(GoalState::Standby, epoch, id(new))
    );
}

#[test]
fn bootstrap_makes_the_first_node_single_then_primary_with_a_sync_standby() {
    let mut w = World::new(&["p1", "p2"], &["e1"]);
    w.step();
    assert_eq!(
        w.goal("p1").unwrap(),
        AssignedGoal::bare(GoalState::Single, Epoch(1))
    );
    let standby = w.goal("p2").unwrap();
    assert_eq!(
        (standby.state, standby.upstream),
        (GoalState::Standby, Some(id("p1")))
    );
    assert_eq!(
        w.goal_state("e1"),
        None,
        "ejabberd is pointed only at a primary that accepts writes"
    );
    assert_eq!(ejabberd_behind(&w.cat, &w.obs, GROUP), vec![id("e1")]);
    assert!(w.run_until(STEP, 20, |w| w.group().synchronous()));
    assert_eq!(w.goal_state("e1"), Some(GoalState::Follow));
    let p = w.goal("p1").unwrap();
    assert_eq!(p.state, GoalState::Primary);
    assert_eq!(
        (p.synchronous_standbys, p.synchronous_quorum),
        (vec![id("p2")], 1)
    );
    assert!(
        events(&w)
            .iter()
            .any(|e| e.contains("synchronous replication on"))
    );
    // Converged: nothing more to decide.
    w.step();
    assert!(decide(&w.cat, &w.obs, w.now).is_empty());
    assert!(service_converged(&w.cat, &w.obs, GROUP));
}

#[test]
fn primary_drops_to_async_when_the_sync_standby_dies_and_back_when_it_returns() {
    let mut w = converged(&["p1", "p2"]);
    w.crash("p2");
    assert!(w.run_until(STEP, 30, |w| !w.group().synchronous()));
    assert!(w.goal("p1").unwrap().synchronous_standbys.is_empty());
    assert!(
        events(&w)
            .iter()
            .any(|e| e.contains("dropped to asynchronous"))
    );
    assert!(w.write(10, None), "async primary accepts writes");
    w.restart("p2");
    assert!(w.run_until(STEP, 30, |w| w.group().synchronous()));
    assert_eq!(w.primary().as_deref(), Some("p1"));
}

#[test]
fn crashed_primary_fails_over_on_positive_evidence_before_the_lease() {
    let mut w = converged(&["p1", "p2"]);
    let crash_at = w.now;
    w.crash("p1");
    assert!(
        w.run_until(STEP, 60, |w| promoted_to(w, "p2")),
        "{}",
        w.log.join("\n")
    );
    let took = w.now - crash_at;
    let t = w.cat.timings().clone();
    let fenced_at = w
        .log
        .iter()
        .position(|l| l.contains("p1 failed"))
        .expect("the failure is logged");
    assert!(
        took >= t.report_interval * 2,
        "judged before two reports were missed: {took:?}"
    );
    assert!(
        took < t.unhealthy_after,
        "two missed reports and a refused probe are proof enough: {took:?}\n{}",
        w.log[fenced_at..].join("\n")
    );
    assert_eq!(w.group().epoch, Epoch(2));
    old_primary_rejoins_after_the_promotion(&mut w, "p1", "p2", GoalState::Fenced);
    assert!(w.run_until(STEP, 20, |w| service_converged(&w.cat, &w.obs, GROUP)));
    assert_eq!(w.node("e1").applied, Some((Epoch(2), id("p2"))));
    assert!(ejabberd_behind(&w.cat, &w.obs, GROUP).is_empty());
}

#[test]
fn frozen_primary_is_promoted_away_only_after_lease_and_margin() {
    let mut w = converged(&["p1", "p2"]);
    let last_report = w.now;
    w.node_mut("p1").frozen = true;
    let t = w.cat.timings().clone();
    assert!(w.run_until(STEP, 60, |w| w.goal_state("p1") == Some(GoalState::Fenced)));
    assert!(
        w.now - last_report >= t.lease + t.lease_margin,
        "a silent primary is not judged before its lease is out: {:?}",
        w.now - last_report
    );
    assert_eq!(
        w.goal_state("p2"),
        Some(GoalState::StopReplication),
        "the stream is cut first"
    );
    assert!(w.run_until(STEP, 80, |w| promoted_to(w, "p2")));
    let waited = w.now - last_report;
    assert!(waited < t.lease + t.lease_margin + Duration::from_millis(3 * STEP));
    // The frozen node wakes up with an expired lease: it cannot write, and it rejoins.
    w.restart("p1");
    assert!(w.run_until(STEP, 30, |w| w.node("p1").reached
        == Some(GoalState::Standby)));
    assert!(w.run_until(STEP, 30, |w| w.group().synchronous()));
}

#[test]
fn a_dead_agent_with_a_live_database_is_not_a_failure() {
    let mut w = converged(&["p1", "p2"]);
    w.kill_agent("p1");
    for _ in 0..100 {
        w.advance(STEP);
        w.step();
    }
    assert_eq!(w.primary().as_deref(), Some("p1"), "{}", w.log.join("\n"));
    assert_eq!(w.group().epoch, Epoch(1));
    assert!(w.group().operation.is_none());
}

#[test]
fn a_silent_agent_is_unhealthy_in_the_status_though_not_failed_over() {
    let mut w = converged(&["p1", "p2"]);
    assert_eq!(node_unhealthy(&w.cat, &w.obs, w.now, &id("p1")), None);
    w.kill_agent("p1");
    let t = w.cat.timings().clone();
    let since = w.now;
    assert!(w.run_until(STEP, 30, |w| {
        node_unhealthy(&w.cat, &w.obs, w.now, &id("p1")).is_some()
    }));
    assert!(w.now - since <= t.unhealthy_after + Duration::from_millis(2 * STEP));
    let why = node_unhealthy(&w.cat, &w.obs, w.now, &id("p1")).unwrap();
    assert!(why.contains("agent silent"), "{why}");
    assert!(why.contains("probe answers"), "{why}");
    assert_eq!(w.primary().as_deref(), Some("p1"));
    // Its standby still serves.
    assert_eq!(node_unhealthy(&w.cat, &w.obs, w.now, &id("p2")), None);
}

#[test]
fn a_primary_whose_postgres_cannot_start_is_failed_over_after_a_lease_and_rejoins_when_fixed() {
    let mut w = converged(&["p1", "p2"]);
    let t = w.cat.timings().clone();
    // PostgreSQL dies and every start fails; the agent keeps reporting it stopped.
    let down_at = w.now;
    w.node_mut("p1").pg_up = false;
    w.node_mut("p1").broken = true;
    assert!(w.run_until(STEP, 20, |w| {
        node_unhealthy(&w.cat, &w.obs, w.now, &id("p1"))
            .is_some_and(|why| why.contains("PostgreSQL not running"))
    }));
    assert!(
        w.run_until(STEP, 80, |w| promoted_to(w, "p2")),
        "{}",
        w.log.join("\n")
    );
    let took = w.now - down_at;
    assert!(
        took >= t.lease,
        "failed over after {took:?}, before a lease"
    );
    assert!(
        took < t.lease + Duration::from_millis(10 * STEP),
        "failed over after {took:?}"
    );
    assert!(
        events(&w)
            .iter()
            .any(|e| e.starts_with("failover")
                && e.contains("its agent reports PostgreSQL not running")),
        "{:#?}",
        events(&w)
    );
    // It stays down while broken, then rejoins by itself once fixed.
    assert!(!w.run_until(STEP, 30, |w| w.node("p1").reached
        == Some(GoalState::Standby)));
    w.node_mut("p1").broken = false;
    assert!(w.run_until(STEP, 30, |w| w.node("p1").reached
        == Some(GoalState::Standby)));
    assert!(w.run_until(STEP, 30, |w| w.group().synchronous()));
    assert_eq!(node_unhealthy(&w.cat, &w.obs, w.now, &id("p1")), None);
}

#[test]
fn a_primary_restarted_by_its_agent_within_the_lease_is_not_failed_over() {
    let mut w = converged(&["p1", "p2"]);
    for _ in 0..5 {
        // Down for one report interval, then the agent's restart works.
        w.node_mut("p1").pg_up = false;
        w.node_mut("p1").broken = true;
        w.advance(STEP);
        w.step();
        w.node_mut("p1").broken = false;
        for _ in 0..20 {
            w.advance(STEP);
            w.step();
        }
    }
    assert_eq!(w.primary().as_deref(), Some("p1"), "{}", w.log.join("\n"));
    assert_eq!(w.group().epoch, Epoch(1));
}

#[test]
fn a_cut_replication_link_turns_synchronous_replication_off_by_default() {
    let mut w = converged(&["p1", "p2"]);
    w.node_mut("p2").stream_cut = true;
    assert!(w.run_until(STEP, 20, |w| !w.group().synchronous()));
    assert!(
        events(&w).iter().any(|e| e
            .contains("dropped to asynchronous (policy on_standby_loss = async)")
            && e.contains("p2 does not stream from p1")),
        "{:#?}",
        events(&w)
    );
    let acked = w.acked;
    assert!(w.write(100, None));
    assert!(w.run_until(STEP, 10, |w| w.acked > acked), "commits go on");
    // No failover to a standby that may miss acknowledged writes.
    w.crash("p1");
    assert!(!w.run_until(STEP, 60, |w| promoted_to(w, "p2")));
    assert!(
        w.group()
            .notice
            .as_deref()
            .unwrap_or("")
            .contains("refused")
    );
    w.restart("p1");
    w.node_mut("p2").stream_cut = false;
    assert!(w.run_until(STEP, 40, |w| w.group().synchronous()));
    assert_eq!(w.primary().as_deref(), Some("p1"));
}

#[test]
fn with_policy_wait_commits_wait_for_a_standby_that_does_not_stream() {
    let mut w = converged(&["p1", "p2"]);
    w.propose(Op::SetGroupSettings {
        group: GROUP.into(),
        settings: crate::catalog::GroupSettings {
            on_standby_loss: StandbyLoss::Wait,
            ..Default::default()
        },
    })
    .unwrap();
    w.node_mut("p2").stream_cut = true;
    assert!(w.run_until(STEP, 20, |w| {
        w.group()
            .notice
            .as_deref()
            .is_some_and(|n| n.contains("commits wait"))
    }));
    let acked = w.acked;
    assert!(w.write(100, None));
    assert!(
        !w.run_until(STEP, 30, |w| w.acked > acked),
        "no ack without p2"
    );
    assert!(w.group().synchronous());
    w.node_mut("p2").stream_cut = false;
    assert!(w.run_until(STEP, 10, |w| w.acked > acked));
    assert!(w.run_until(STEP, 10, |w| w.group().notice.is_none()));
}

#[test]
fn a_primary_paused_for_less_than_its_lease_stays_primary() {
    let mut w = converged(&["p1", "p2"]);
    let t = w.cat.timings().clone();
    // Frozen (nothing answers, the probe times out) for just under the lease.
    w.node_mut("p1").frozen = true;
    let pause = t.lease - Duration::from_millis(STEP);
    let end = w.now + pause;
    while w.now < end {
        w.advance(STEP);
        w.step();
    }
    assert!(
        node_unhealthy(&w.cat, &w.obs, w.now, &id("p1")).is_some(),
        "shown as silent meanwhile"
    );
    w.restart("p1");
    for _ in 0..50 {
        w.advance(STEP);
        w.step();
    }
    assert_eq!(w.primary().as_deref(), Some("p1"), "{}", w.log.join("\n"));
    assert_eq!(w.group().epoch, Epoch(1));
    assert!(w.group().synchronous());
    assert!(
        !events(&w).iter().any(|e| e.starts_with("failover")),
        "{:#?}",
        events(&w)
    );
}

#[test]
fn a_new_leader_judges_nobody_before_a_full_detection_window() {
    let mut w = converged(&["p1", "p2"]);
    w.advance(2000);
    w.new_leader();
    let since = w.now;
    w.crash("p1");
    let t = w.cat.timings().clone();
    assert!(w.run_until(STEP, 40, |w| w.goal_state("p1") == Some(GoalState::Fenced)));
    assert!(w.now - since >= t.unhealthy_after);
}

#[test]
fn planned_switchover_drains_then_promotes_without_losing_writes() {
    let mut w = converged(&["p1", "p2"]);
    assert_eq!(
        check_switchover(&w.cat, &w.obs, w.now, GROUP, None),
        Ok(id("p2"))
    );
    w.propose(Op::Switchover {
        group: GROUP.into(),
        target: id("p2"),
    })
    .unwrap();
    w.step();
    assert_eq!(w.goal_state("p1"), Some(GoalState::Draining));
    assert!(w.run_until(STEP, 20, |w| promoted_to(w, "p2")));
    assert_eq!(w.group().epoch, Epoch(2));
    old_primary_rejoins_after_the_promotion(&mut w, "p1", "p2", GoalState::Draining);
    assert!(w.run_until(STEP, 20, |w| w.group().synchronous()));
    assert!(w.write(10, None));
}

#[test]
fn switchover_is_refused_for_priority_zero_unhealthy_or_unknown_targets() {
    let mut w = converged(&["p1", "p2", "p3"]);
    w.propose(Op::SetNodeSettings {
        node: id("p2"),
        candidate_priority: Some(0),
        replication_quorum: None,
    })
    .unwrap();
    let refusal = check_switchover(&w.cat, &w.obs, w.now, GROUP, Some(&id("p2"))).unwrap_err();
    assert!(refusal.to_string().contains("priority is 0"), "{refusal}");
    let rejected = w
        .propose(Op::Switchover {
            group: GROUP.into(),
            target: id("p2"),
        })
        .unwrap_err();
    assert!(matches!(rejected, Rejected::NotEligible(_)), "{rejected}");
    w.crash("p3");
    w.advance(2000);
    w.step();
    let refusal = check_switchover(&w.cat, &w.obs, w.now, GROUP, Some(&id("p3"))).unwrap_err();
    assert!(refusal.to_string().contains("not healthy"), "{refusal}");
    assert!(
        check_switchover(&w.cat, &w.obs, w.now, GROUP, None).is_err(),
        "no healthy candidate left"
    );
    assert!(check_switchover(&w.cat, &w.obs, w.now, GROUP, Some(&id("zz"))).is_err());
}

#[test]
fn maintenance_on_a_standby_leaves_the_sync_set_first() {
    let mut w = converged(&["p1", "p2", "p3"]);
    assert!(w.group().sync.standbys.contains(&id("p2")));
    w.propose(Op::SetMaintenance {
        node: id("p2"),
        enabled: true,
        switchover_to: None,
    })
    .unwrap();
    w.step();
    assert!(!w.group().sync.standbys.contains(&id("p2")));
    assert_ne!(
        w.goal_state("p2"),
        Some(GoalState::Maintenance),
        "not before the primary applied the new set"
    );
    assert!(w.run_until(STEP, 10, |w| w.goal_state("p2")
        == Some(GoalState::Maintenance)));
    w.propose(Op::SetMaintenance {
        node: id("p2"),
        enabled: false,
        switchover_to: None,
    })
    .unwrap();
    assert!(w.run_until(STEP, 20, |w| w.group().sync.standbys.contains(&id("p2"))));
}

#[test]
fn maintenance_on_the_primary_switches_over_first() {
    let mut w = converged(&["p1", "p2"]);
    let no_target = w.propose(Op::SetMaintenance {
        node: id("p1"),
        enabled: true,
        switchover_to: None,
    });
    assert!(matches!(no_target, Err(Rejected::NotEligible(_))));
    let target = check_switchover(&w.cat, &w.obs, w.now, GROUP, None).unwrap();
    w.propose(Op::SetMaintenance {
        node: id("p1"),
        enabled: true,
        switchover_to: Some(target),
    })
    .unwrap();
    assert!(w.run_until(STEP, 20, |w| promoted_to(w, "p2")));
    assert_eq!(w.goal_state("p1"), Some(GoalState::Maintenance));
}

#[test]
fn two_failovers_in_a_row_raise_the_epoch_each_time() {
    let mut w = converged(&["p1", "p2", "p3"]);
    w.crash("p1");
    assert!(w.run_until(STEP, 60, |w| w.group().epoch == Epoch(2)));
    let second = w.primary().unwrap();
    assert!(w.run_until(STEP, 30, |w| w.group().sync.confirmed));
    assert!(w.write(500, None));
    w.crash(&second);
    assert!(
        w.run_until(STEP, 60, |w| w.group().epoch == Epoch(3)),
        "{}",
        w.log.join("\n")
    );
    assert_eq!(w.primary().as_deref(), Some("p3"));
    w.restart("p1");
    w.restart(&second);
    assert!(w.run_until(STEP, 40, |w| {
        ["p1", "p2"]
            .iter()
            .all(|n| w.node(n).reached == Some(GoalState::Standby))
    }));
}

#[test]
fn failover_is_refused_without_a_sync_standby_unless_data_loss_is_allowed() {
    let mut w = converged(&["p1", "p2"]);
    w.propose(Op::SetNodeSettings {
        node: id("p2"),
        candidate_priority: None,
        replication_quorum: Some(false),
    })
    .unwrap();
    assert!(w.run_until(STEP, 10, |w| !w.group().synchronous()));
    w.crash("p1");
    for _ in 0..60 {
        w.advance(STEP);
        w.step();
    }
    assert_eq!(w.primary().as_deref(), Some("p1"));
    assert!(
        w.group()
            .notice
            .as_deref()
            .unwrap_or("")
            .contains("failover is refused")
    );
    let refusal = check_failover(&w.cat, &w.obs, w.now, GROUP, false).unwrap_err();
    assert!(
        refusal.to_string().contains("no synchronous standby"),
        "{refusal}"
    );
    check_failover(&w.cat, &w.obs, w.now, GROUP, true).unwrap();
    w.propose(Op::Failover {
        group: GROUP.into(),
        allow_data_loss: true,
    })
    .unwrap();
    assert!(w.run_until(STEP, 20, |w| promoted_to(w, "p2")));
    assert_eq!(w.group().epoch, Epoch(2));
}

#[test]
fn quorum_needs_n_minus_k_plus_one_reachable_sync_standbys() {
    // ANY 1 of {p2, p3}: a write may be on either one only, so both must answer.
    let mut w = converged(&["p1", "p2", "p3"]);
    assert_eq!(w.group().sync.standbys.len(), 2);
    assert!(w.write(700, Some(&[id("p3")])));
    w.crash("p1");
    w.crash("p3");
    for _ in 0..60 {
        w.advance(STEP);
        w.step();
    }
    assert_eq!(w.group().epoch, Epoch(1), "{}", w.log.join("\n"));
    assert!(
        w.group()
            .notice
            .as_deref()
            .unwrap_or("")
            .contains("1 of the synchronous standbys")
    );
    w.restart("p3");
    assert!(w.run_until(STEP, 40, |w| w.group().epoch == Epoch(2)));
    assert!(w.node(&w.primary().unwrap()).flush >= w.acked);
}

#[test]
fn a_preferred_candidate_catches_up_from_the_most_advanced_standby() {
    let mut w = converged(&["p1", "p2", "p3"]);
    w.propose(Op::SetNodeSettings {
        node: id("p2"),
        candidate_priority: Some(100),
        replication_quorum: None,
    })
    .unwrap();
    w.step();
    assert!(w.write(900, Some(&[id("p3")])));
    let ahead = w.node("p3").flush;
    assert!(w.node("p2").flush < ahead);
    w.crash("p1");
    assert!(
        w.run_until(STEP, 60, |w| matches!(
            &w.group().operation,
            Some(Operation::Failover {
                phase: FailoverPhase::CatchingUp { .. },
                ..
            })
        )),
        "{}",
        w.log.join("\n")
    );
    assert_eq!(
        w.goal("p2").unwrap(),
        AssignedGoal::following(GoalState::Standby, Epoch(1), id("p3"))
    );
    assert!(w.run_until(STEP, 20, |w| promoted_to(w, "p2")));
    assert!(w.node("p2").flush >= ahead);
}

#[test]
fn priority_zero_is_never_promoted() {
    let mut w = converged(&["p1", "p2"]);
    w.propose(Op::SetNodeSettings {
        node: id("p2"),
        candidate_priority: Some(0),
        replication_quorum: None,
    })
    .unwrap();
    w.crash("p1");
    for _ in 0..60 {
        w.advance(STEP);
        w.step();
    }
    assert_eq!(w.group().epoch, Epoch(1));
    assert!(w.group().notice.is_some());
}

#[test]
fn a_partitioned_primary_cannot_write_once_the_standby_is_promoted() {
    let mut w = converged(&["p1", "p2"]);
    w.node_mut("p1").partitioned = true;
    let mut wrote_while_cut_off = false;
    for _ in 0..80 {
        w.advance(STEP);
        w.step();
        // Clients on p1's side keep writing; the sim checks no acknowledged write is lost.
        wrote_while_cut_off |= w.write(5, None);
        if w.goal_state("p2") == Some(GoalState::StopReplication) {
            assert!(
                !w.node("p1").pg_up,
                "the stream is cut only once the old primary's lease is out"
            );
        }
        if promoted_to(&w, "p2") {
            break;
        }
    }
    assert!(promoted_to(&w, "p2"));
    assert!(
        wrote_while_cut_off,
        "the old primary kept running until its lease ended"
    );
    assert!(!w.node("p1").pg_up, "it fenced itself");
    w.node_mut("p1").partitioned = false;
    assert!(w.run_until(STEP, 30, |w| w.node("p1").reached
        == Some(GoalState::Standby)));
}

#[test]
fn removed_nodes_leave_the_sync_set_before_being_told() {
    let mut w = converged(&["p1", "p2", "p3"]);
    assert!(matches!(
        w.propose(Op::RemoveNode { node: id("p1") }),
        Err(Rejected::NotEligible(_))
    ));
    w.propose(Op::RemoveNode { node: id("p2") }).unwrap();
    w.step();
    assert!(!w.group().sync.standbys.contains(&id("p2")));
    assert!(w.run_until(STEP, 10, |w| w.goal_state("p2") == Some(GoalState::Removed)));
    w.propose(Op::RemoveNode { node: id("e1") }).unwrap();
    w.step();
    assert_eq!(w.goal_state("e1"), Some(GoalState::Removed));
    assert!(
        service_converged(&w.cat, &w.obs, GROUP),
        "no ejabberd node left to wait for"
    );
}

#[test]
fn observations_of_unknown_nodes_are_ignored() {
    let mut w = converged(&["p1", "p2"]);
    let stranger = NodeId::new("stranger").unwrap();
    w.obs.record_probe(stranger, ProbeResult::Refused, w.now);
    assert!(decide(&w.cat, &w.obs, w.now).is_empty());
}

#[test]
fn a_crash_is_not_judged_on_one_missed_report() {
    let mut w = converged(&["p1", "p2"]);
    let crash_at = w.now;
    w.crash("p1");
    let t = w.cat.timings().clone();
    while w.now + Duration::from_millis(STEP) < crash_at + t.report_interval * 2 {
        w.advance(STEP);
        w.step();
        assert_eq!(
            w.goal_state("p1"),
            Some(GoalState::Primary),
            "judged after {:?} of silence",
            w.now - crash_at
        );
    }
}

#[test]
fn a_refused_probe_older_than_the_last_report_proves_nothing() {
    let mut w = converged(&["p1", "p2"]);
    // Past the leader's first detection window.
    for _ in 0..20 {
        w.advance(STEP);
        w.step();
    }
    let t = w.cat.timings().clone();
    let p1 = id("p1");
    let reported = w.obs.node(&p1).unwrap().report_at.unwrap();
    let mut obs = w.obs.clone();
    // Refused just before the agent's last report (a restart), then silence: two missed
    // reports, but nothing says PostgreSQL is down now.
    obs.record_probe(
        p1.clone(),
        ProbeResult::Refused,
        reported - Duration::from_millis(10),
    );
    let now = reported + t.report_interval * 2 + Duration::from_millis(100);
    assert!(now < reported + t.unhealthy_after);
    let fences = |d: &[Decision]| {
        d.iter()
            .flat_map(|d| &d.goals)
            .any(|(n, g)| *n == p1 && g.state == GoalState::Fenced)
    };
    assert!(!fences(&decide(&w.cat, &obs, now)));
    // A refused probe taken during the silence is the evidence.
    obs.record_probe(
        p1.clone(),
        ProbeResult::Refused,
        now - Duration::from_millis(50),
    );
    let d = decide(&w.cat, &obs, now);
    assert!(fences(&d), "{d:#?}");
}

mod judge {
    //! Properties of the failure judgement alone, over random report and probe times.
    use super::*;
    use crate::catalog::Timings;
    use crate::decide::observe::{NodeObservation, Probe};
    use proptest::prelude::*;

    fn result() -> impl Strategy<Value = ProbeResult> {
        prop_oneof![
            Just(ProbeResult::Ok),
            Just(ProbeResult::Refused),
            Just(ProbeResult::Timeout)
        ]
    }

    proptest! {
        #[test]
        fn failure_needs_silence_and_a_failed_probe(
            leader_since in 0u64..3000,
            report_at in proptest::option::of(0u64..6000),
            probe in proptest::option::of((result(), 0u64..6000)),
            now in 0u64..8000,
        ) {
            let ms = Duration::from_millis;
            let t = Timings::default();
            let node = id("p1");
            let mut obs = Observations::new(ms(leader_since));
            obs.nodes.insert(node.clone(), NodeObservation {
                revision: 0,
                report: None,
                report_at: report_at.map(ms),
                probe: probe.map(|(result, at)| Probe { result, at: ms(at) }),
                down_since: None,
                not_streaming_since: None,
            });
            let now = ms(now);
            let judge = Judge::new(&t, &obs, now);
            let silence = judge.silence(&node);
            let recent = judge.recent_probe(&node);
            let failed = judge.failed(&node);
            // An answering port is a live database, whatever the agent does.
            if recent == Some(ProbeResult::Ok) {
                prop_assert!(!failed);
            }
            // Never on one missed report.
            if silence < t.report_interval * 2 {
                prop_assert!(!failed);
            }
            // Before unhealthy_after only a refused probe taken during the silence counts,
            // and never in a new leader's first detection window.
            if failed && silence < t.unhealthy_after {
                prop_assert_eq!(recent, Some(ProbeResult::Refused));
                let (_, at) = probe.unwrap();
                prop_assert!(report_at.is_none_or(|r| at > r));
                prop_assert!(now - ms(leader_since) >= t.unhealthy_after);
            }
            // A probe that times out (frozen, partitioned) shortens nothing.
            if recent == Some(ProbeResult::Timeout) {
                prop_assert_eq!(failed, silence >= t.unhealthy_after);
            }
        }
    }
}

/// p1 primary with p2 its only synchronous standby, p3 an asynchronous one (replication quorum
/// off), all converged.
fn with_async_third() -> World {
    let mut w = converged(&["p1", "p2", "p3"]);
    w.propose(Op::SetNodeSettings {
        node: id("p3"),
        candidate_priority: None,
        replication_quorum: Some(false),
    })
    .unwrap();
    assert!(w.run_until(STEP, 30, |w| {
        w.group().sync.confirmed && w.group().sync.standbys == [id("p2")].into()
    }));
    w
}

/// Steps `ms` of simulated time, a client writing on every step; counts the writes accepted.
fn write_for(w: &mut World, ms: u64) -> usize {
    let mut accepted = 0;
    for _ in 0..ms / STEP {
        w.advance(STEP);
        w.step();
        accepted += usize::from(w.write(5, None));
    }
    accepted
}

#[test]
fn monitors_out_of_reach_cost_no_writes_while_the_sync_standby_vouches() {
    let mut w = with_async_third();
    // Neither the primary nor its synchronous standby reaches the monitors (two of three
    // monitors stopped looks the same from the nodes) for 20 s: four times the lease.
    w.node_mut("p1").partitioned = true;
    w.node_mut("p2").partitioned = true;
    let steps = 20_000 / STEP;
    let accepted = write_for(&mut w, 20_000);
    assert_eq!(
        accepted as u64,
        steps,
        "every write accepted under the failsafe\n{}",
        w.log.join("\n")
    );
    assert_eq!(w.primary().as_deref(), Some("p1"));
    assert!(w.node("p1").pg_up, "never fenced");
    w.node_mut("p1").partitioned = false;
    w.node_mut("p2").partitioned = false;
    write_for(&mut w, 2_000);
    assert_eq!(w.group().epoch, Epoch(1), "nothing was promoted");
}

#[test]
fn without_the_failsafe_the_primary_fences_when_its_lease_runs_out() {
    let mut w = with_async_third();
    w.propose(Op::SetGroupSettings {
        group: GROUP.into(),
        settings: crate::catalog::GroupSettings {
            failsafe_ms: 0,
            ..w.group().settings.clone()
        },
    })
    .unwrap();
    w.node_mut("p1").partitioned = true;
    w.node_mut("p2").partitioned = true;
    write_for(&mut w, 5_000);
    assert!(!w.node("p1").pg_up, "fenced after its lease");
}

#[test]
fn a_data_loss_failover_waits_until_no_silent_sync_standby_can_vouch_any_more() {
    let mut w = with_async_third();
    let cut = w.now;
    w.node_mut("p1").partitioned = true;
    w.node_mut("p2").partitioned = true;
    write_for(&mut w, 5_000);
    w.propose(Op::Failover {
        group: GROUP.into(),
        allow_data_loss: true,
    })
    .unwrap();
    // p1 keeps serving under p2's vouches: promoting p3 now would make two primaries (the
    // simulation fails the test if that happens).
    write_for(&mut w, 30_000);
    assert_eq!(w.primary().as_deref(), Some("p1"), "{}", w.log.join("\n"));
    let notice = w.group().notice.clone().unwrap_or_default();
    assert!(notice.contains("failsafe"), "{notice}");
    // p2 stops vouching once its last answered report is older than the failsafe bound, p1
    // fences a lease later, and p3 is promoted once p2's silence covers bound, lease, margin.
    assert!(
        w.run_until(STEP, 500, |w| promoted_to(w, "p3")),
        "{}",
        w.log.join("\n")
    );
    assert!(!w.node("p1").pg_up);
    let t = w.cat.timings();
    let bound = Duration::from_secs(60) + t.lease + t.lease_margin;
    assert!(
        w.now - cut >= bound && w.now - cut <= bound + Duration::from_secs(2),
        "promoted {:?} after the cut, bound {bound:?}",
        w.now - cut
    );
}

/// p1's and p2's latest reports, changed by `primary` and `standby`, recorded now; then a
/// decision pass.
fn reported(
    w: &mut World,
    primary: impl FnOnce(&mut PgReport),
    standby: impl FnOnce(&mut PgReport),
) {
    let now = w.now;
    for (name, change) in [
        ("p1", Box::new(primary) as Box<dyn FnOnce(&mut PgReport)>),
        ("p2", Box::new(standby)),
    ] {
        let mut r = w.obs.node(&id(name)).unwrap().report.clone().unwrap();
        let ReportDetail::Postgres(pg) = &mut r.detail else {
            panic!("a postgres report")
        };
        change(pg);
        w.obs.record_report(r, now);
    }
    w.decide_and_apply();
}

/// The reports after a restart of the primary's postmaster, before its standby reconnected:
/// the primary streams to nobody, the standby's WAL receiver is not streaming.
fn reconnecting(w: &mut World, recently_started: bool) {
    reported(
        w,
        |pg| {
            pg.replicas.clear();
            pg.recently_started = recently_started;
        },
        |pg| pg.streaming = false,
    );
}

#[test]
fn a_restarted_primary_keeps_its_synchronous_standby_while_it_reconnects() {
    let mut w = converged(&["p1", "p2"]);
    let set = w.group().sync.clone();
    assert!(set.confirmed && set.standbys.contains(&id("p2")));
    reconnecting(&mut w, true);
    assert_eq!(
        w.group().sync,
        set,
        "kept while the primary is just started"
    );
    reconnecting(&mut w, false);
    assert!(
        w.group().sync.standbys.is_empty(),
        "both sides say the stream is gone and the primary is not new: dropped"
    );
}

#[test]
fn a_primary_whose_commits_hang_is_shown_unhealthy() {
    let mut w = converged(&["p1", "p2"]);
    let p1 = id("p1");
    assert_eq!(node_unhealthy(&w.cat, &w.obs, w.now, &p1), None);
    let mut r = w.obs.node(&p1).unwrap().report.clone().unwrap();
    let ReportDetail::Postgres(pg) = &mut r.detail else {
        panic!("a postgres report")
    };
    pg.commits_blocked = true;
    let now = w.now;
    w.obs.record_report(r, now);
    let why = node_unhealthy(&w.cat, &w.obs, now, &p1).unwrap_or_default();
    assert!(why.contains("commits do not complete"), "{why:?}");
}

#[test]
fn a_standby_restarted_by_its_agent_stays_synchronous_for_the_restart_grace() {
    let mut w = converged(&["p1", "p2"]);
    let set = w.group().sync.clone();
    // p2's postmaster crashed: its agent reports it stopped, p1 streams to nobody.
    let crashed = |w: &mut World| {
        reported(
            w,
            |pg| pg.replicas.clear(),
            |pg| {
                pg.role = PgRole::Stopped;
                pg.streaming = false;
            },
        );
    };
    crashed(&mut w);
    assert_eq!(w.group().sync, set, "kept while its agent restarts it");
    w.advance(u64::try_from(RESTART_GRACE.as_millis()).unwrap() - 100);
    crashed(&mut w);
    assert_eq!(w.group().sync, set);
    w.advance(200);
    crashed(&mut w);
    assert!(
        w.group().sync.standbys.is_empty(),
        "down past the grace: dropped, commits go on"
    );
}
