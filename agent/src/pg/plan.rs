//! The transition plan: which one controller step moves the local server towards its goal.
//!
//! [`plan`] is pure and total. It matches the goal state exhaustively (no wildcard arm), so a
//! goal state added to the contract does not compile until this table says how to reach it.
//! Invariants it keeps, whatever the input:
//! - a server that is not a primary is never made writable except by [`Action::Promote`], and
//!   only once its stream is cut ([`Action::StopReplication`] comes first);
//! - a primary asked to become a standby is fenced first, then rejoined (rewind or base backup):
//!   it is never restarted as a second primary;
//! - an empty data directory is only initialised for `single` (a new group); an empty node told
//!   to be `primary` is refused, as creating a new history there would split the group.
//!
//! The agent calls `plan` after each observation and applies the action; every action is
//! idempotent, so repeating it after a crash is safe. Epoch checks happen before: `plan` trusts
//! that `goal` is the newest the agent has accepted.

use ha_proto::NodeId;
use ha_proto::convert::Goal;
use ha_proto::types::GoalState;

use super::config::{SyncConfig, Upstream};

/// Which role a stopped server last had, from `pg_controldata`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasRole {
    Primary,
    Standby,
}

/// A stopped server's data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub was: WasRole,
    /// Shut down cleanly (false after a crash or an immediate stop).
    pub clean: bool,
    /// `standby.signal` is present: a start comes up read-only.
    pub standby_signal: bool,
}

/// What the agent knows of its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// No usable data directory (absent, empty, or left by an interrupted copy).
    Empty,
    Stopped(Stopped),
    /// Running, writable.
    Primary {
        /// The `synchronous_standby_names` in force.
        synchronous_standby_names: String,
    },
    /// Running in recovery.
    Standby {
        /// Whom the managed settings point at; `None` once replication is cut.
        upstream: Option<NodeId>,
        /// Whether the WAL receiver is streaming.
        streaming: bool,
    },
}

/// One controller step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// initdb, primary settings, start, replication role.
    Bootstrap(SyncConfig),
    /// Start the existing data directory as it is (a standby stays read-only).
    Start,
    /// Fresh base backup from the upstream (replacing any partial copy), then stream.
    JoinStandby(Upstream),
    /// Write standby settings (upstream or none) and start.
    StartStandby(Option<Upstream>),
    /// A running standby switches to another upstream (reload, no restart).
    Follow(Upstream),
    /// Cut the stream and report the last received and replayed LSN.
    StopReplication,
    Promote,
    SetSynchronous(SyncConfig),
    /// Fast stop, and `standby.signal` so no later start can accept writes.
    Fence,
    /// `pg_rewind` from the upstream (fresh base backup when impossible), then stream.
    Rejoin(Upstream),
    /// Clean fast stop reporting the final checkpoint LSN.
    Drain,
    Stop,
    /// The goal cannot be reached safely from here; the agent reports the reason and waits.
    Refuse(&'static str),
}

/// The goal's upstream as an [`Upstream`].
fn upstream_of(goal: &Goal) -> Option<Upstream> {
    goal.upstream.as_ref().map(|(node, endpoint)| Upstream {
        node: node.clone(),
        endpoint: endpoint.clone(),
    })
}

fn sync_of(goal: &Goal) -> SyncConfig {
    SyncConfig {
        standbys: goal.synchronous_standbys.clone(),
        quorum: goal.synchronous_quorum,
    }
}

/// Writable goals: reach a running primary with the goal's synchronous standbys.
fn plan_writable(observed: &Local, goal: &Goal, may_initialise: bool) -> Action {
    let sync = sync_of(goal);
    match observed {
        Local::Empty if may_initialise => Action::Bootstrap(sync),
        Local::Empty => Action::Refuse("no data directory: a primary cannot start a new history"),
        // A fenced or former standby comes up read-only; promotion follows on the next step.
        Local::Stopped(_) => Action::Start,
        Local::Primary {
            synchronous_standby_names,
        } if *synchronous_standby_names == sync.standby_names() => Action::Nothing,
        Local::Primary { .. } => Action::SetSynchronous(sync),
        Local::Standby {
            upstream,
            streaming,
        } if upstream.is_some() || *streaming => Action::StopReplication,
        Local::Standby { .. } => Action::Promote,
    }
}

/// The single step that moves `observed` towards `goal`.
pub fn plan(observed: &Local, goal: &Goal) -> Action {
    match goal.state {
        GoalState::Single => plan_writable(observed, goal, true),
        GoalState::Primary => plan_writable(observed, goal, false),
        GoalState::Standby => {
            let Some(up) = upstream_of(goal) else {
                return Action::Refuse("standby goal without an upstream");
            };
            match observed {
                Local::Empty => Action::JoinStandby(up),
                Local::Stopped(Stopped {
                    was: WasRole::Standby,
                    ..
                }) => Action::StartStandby(Some(up)),
                Local::Stopped(Stopped {
                    was: WasRole::Primary,
                    ..
                }) => Action::Rejoin(up),
                Local::Primary { .. } => Action::Fence,
                Local::Standby {
                    upstream: Some(current),
                    ..
                } if *current == up.node => Action::Nothing,
                Local::Standby { .. } => Action::Follow(up),
            }
        }
        GoalState::Draining => match observed {
            Local::Primary { .. } => Action::Drain,
            Local::Empty | Local::Stopped(_) | Local::Standby { .. } => Action::Nothing,
        },
        GoalState::Fenced => match observed {
            Local::Primary { .. } | Local::Standby { .. } => Action::Fence,
            Local::Stopped(Stopped {
                standby_signal: false,
                ..
            }) => Action::Fence,
            Local::Empty | Local::Stopped(_) => Action::Nothing,
        },
        GoalState::StopReplication => match observed {
            Local::Standby {
                upstream,
                streaming,
            } if upstream.is_some() || *streaming => Action::StopReplication,
            Local::Standby { .. } | Local::Primary { .. } => Action::Nothing,
            // Running lets it report how far it got; it starts with no upstream.
            Local::Stopped(Stopped {
                was: WasRole::Standby,
                ..
            }) => Action::StartStandby(None),
            Local::Stopped(Stopped {
                was: WasRole::Primary,
                ..
            }) => Action::Refuse("a stopped former primary has no replication to stop"),
            Local::Empty => Action::Refuse("no data directory: nothing to stop replicating"),
        },
        GoalState::Maintenance | GoalState::Removed => match observed {
            Local::Primary { .. } | Local::Standby { .. } => Action::Stop,
            Local::Empty | Local::Stopped(_) => Action::Nothing,
        },
        GoalState::Follow => Action::Refuse("follow is an ejabberd goal"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ha_proto::Epoch;
    use ha_proto::types::Endpoint;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn up(name: &str) -> Upstream {
        Upstream {
            node: n(name),
            endpoint: Endpoint {
                host: "10.0.0.1".into(),
                port: 5432,
            },
        }
    }

    fn goal(state: GoalState) -> Goal {
        let u = up("p1");
        Goal {
            node: n("me"),
            state,
            epoch: Epoch(4),
            upstream: Some((u.node, u.endpoint)),
            synchronous_standbys: vec![n("s1"), n("s2")],
            synchronous_quorum: 1,
        }
    }

    const SYNC_NAMES: &str = r#"ANY 1 ("s1", "s2")"#;

    fn sync() -> SyncConfig {
        SyncConfig {
            standbys: vec![n("s1"), n("s2")],
            quorum: 1,
        }
    }

    fn stopped(was: WasRole, clean: bool, standby_signal: bool) -> Local {
        Local::Stopped(Stopped {
            was,
            clean,
            standby_signal,
        })
    }

    /// Every observed situation the table distinguishes, with a short label.
    fn locals() -> Vec<(&'static str, Local)> {
        let mut v = vec![
            ("empty", Local::Empty),
            (
                "primary-sync",
                Local::Primary {
                    synchronous_standby_names: SYNC_NAMES.into(),
                },
            ),
            (
                "primary-async",
                Local::Primary {
                    synchronous_standby_names: String::new(),
                },
            ),
            (
                "standby-p1-streaming",
                Local::Standby {
                    upstream: Some(n("p1")),
                    streaming: true,
                },
            ),
            (
                "standby-p1-waiting",
                Local::Standby {
                    upstream: Some(n("p1")),
                    streaming: false,
                },
            ),
            (
                "standby-other",
                Local::Standby {
                    upstream: Some(n("old")),
                    streaming: true,
                },
            ),
            (
                "standby-cut",
                Local::Standby {
                    upstream: None,
                    streaming: false,
                },
            ),
        ];
        for was in [WasRole::Primary, WasRole::Standby] {
            for clean in [true, false] {
                for signal in [true, false] {
                    v.push(("stopped", stopped(was, clean, signal)));
                }
            }
        }
        v
    }

    /// The expected action for every (observed, goal) pair, written out independently of
    /// `plan`'s structure.
    fn expected(local: &Local, state: GoalState) -> Action {
        use GoalState as G;
        let is_stopped_was = |w| matches!(local, Local::Stopped(s) if s.was == w);
        match (state, local) {
            (G::Follow, _) => Action::Refuse("follow is an ejabberd goal"),
            (G::Single, Local::Empty) => Action::Bootstrap(sync()),
            (G::Primary, Local::Empty) => {
                Action::Refuse("no data directory: a primary cannot start a new history")
            }
            (G::Single | G::Primary, Local::Stopped(_)) => Action::Start,
            (
                G::Single | G::Primary,
                Local::Primary {
                    synchronous_standby_names: s,
                },
            ) => {
                if s == SYNC_NAMES {
                    Action::Nothing
                } else {
                    Action::SetSynchronous(sync())
                }
            }
            (
                G::Single | G::Primary,
                Local::Standby {
                    upstream: None,
                    streaming: false,
                },
            ) => Action::Promote,
            (G::Single | G::Primary, Local::Standby { .. }) => Action::StopReplication,
            (G::Standby, Local::Empty) => Action::JoinStandby(up("p1")),
            (G::Standby, Local::Stopped(_)) if is_stopped_was(WasRole::Standby) => {
                Action::StartStandby(Some(up("p1")))
            }
            (G::Standby, Local::Stopped(_)) => Action::Rejoin(up("p1")),
            (G::Standby, Local::Primary { .. }) => Action::Fence,
            (
                G::Standby,
                Local::Standby {
                    upstream: Some(u), ..
                },
            ) if u.as_str() == "p1" => Action::Nothing,
            (G::Standby, Local::Standby { .. }) => Action::Follow(up("p1")),
            (G::Draining, Local::Primary { .. }) => Action::Drain,
            (G::Draining, _) => Action::Nothing,
            (G::Fenced, Local::Primary { .. } | Local::Standby { .. }) => Action::Fence,
            (G::Fenced, Local::Stopped(s)) if !s.standby_signal => Action::Fence,
            (G::Fenced, _) => Action::Nothing,
            (
                G::StopReplication,
                Local::Standby {
                    upstream: None,
                    streaming: false,
                },
            ) => Action::Nothing,
            (G::StopReplication, Local::Standby { .. }) => Action::StopReplication,
            (G::StopReplication, Local::Primary { .. }) => Action::Nothing,
            (G::StopReplication, Local::Stopped(_)) if is_stopped_was(WasRole::Standby) => {
                Action::StartStandby(None)
            }
            (G::StopReplication, Local::Stopped(_)) => {
                Action::Refuse("a stopped former primary has no replication to stop")
            }
            (G::StopReplication, Local::Empty) => {
                Action::Refuse("no data directory: nothing to stop replicating")
            }
            (G::Maintenance | G::Removed, Local::Primary { .. } | Local::Standby { .. }) => {
                Action::Stop
            }
            (G::Maintenance | G::Removed, _) => Action::Nothing,
        }
    }

    const ALL_GOALS: [GoalState; 9] = [
        GoalState::Single,
        GoalState::Primary,
        GoalState::Standby,
        GoalState::Draining,
        GoalState::Fenced,
        GoalState::StopReplication,
        GoalState::Maintenance,
        GoalState::Removed,
        GoalState::Follow,
    ];

    #[test]
    fn every_pair_maps_to_the_expected_action() {
        let mut checked = 0;
        for state in ALL_GOALS {
            for (label, local) in locals() {
                assert_eq!(
                    plan(&local, &goal(state)),
                    expected(&local, state),
                    "goal {state}, observed {label}: {local:?}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 9 * 15);
    }

    #[test]
    fn never_promotes_while_streaming_and_never_restarts_a_primary_as_standby_directly() {
        for state in ALL_GOALS {
            for (_, local) in locals() {
                let action = plan(&local, &goal(state));
                if action == Action::Promote {
                    assert!(matches!(
                        local,
                        Local::Standby {
                            upstream: None,
                            streaming: false
                        }
                    ));
                    assert!(state.is_writable());
                }
                if let Local::Primary { .. } = local {
                    assert!(
                        !matches!(action, Action::Follow(_) | Action::StartStandby(_)),
                        "{state}: {action:?}"
                    );
                }
                if matches!(action, Action::Bootstrap(_)) {
                    assert_eq!(state, GoalState::Single);
                }
            }
        }
    }

    #[test]
    fn standby_goal_without_upstream_is_refused() {
        let mut g = goal(GoalState::Standby);
        g.upstream = None;
        assert!(matches!(plan(&Local::Empty, &g), Action::Refuse(_)));
    }

    #[test]
    fn failover_sequence_converges() {
        // Candidate standby: stop replication, then promote, then set its sync standbys.
        let g = goal(GoalState::Primary);
        let streaming = Local::Standby {
            upstream: Some(n("p1")),
            streaming: true,
        };
        assert_eq!(plan(&streaming, &g), Action::StopReplication);
        let cut = Local::Standby {
            upstream: None,
            streaming: false,
        };
        assert_eq!(plan(&cut, &g), Action::Promote);
        let promoted = Local::Primary {
            synchronous_standby_names: String::new(),
        };
        assert_eq!(plan(&promoted, &g), Action::SetSynchronous(sync()));
        // Old primary: fenced, then rejoined.
        let s = goal(GoalState::Standby);
        assert_eq!(plan(&promoted, &s), Action::Fence);
        let fenced = stopped(WasRole::Primary, true, true);
        assert_eq!(plan(&fenced, &s), Action::Rejoin(up("p1")));
    }
}
