//! Unit tests of `Catalog::apply` validation, idempotence, tokens, queries and persistence.

#![allow(clippy::unwrap_used)]

use super::*;

const T0: u64 = 1_700_000_000_000;

fn id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

struct Fixture {
    cat: Catalog,
    index: u64,
    requests: u64,
}

impl Fixture {
    fn new() -> Self {
        Self {
            cat: Catalog::new(),
            index: 0,
            requests: 0,
        }
    }

    fn cmd(&mut self, op: Op) -> Command {
        self.requests += 1;
        Command {
            request_id: format!("req-{}", self.requests),
            at_unix_ms: T0,
            op,
        }
    }

    fn apply(&mut self, cmd: &Command) -> Outcome {
        self.index += 1;
        self.cat.apply(self.index, cmd)
    }

    fn run(&mut self, op: Op) -> Outcome {
        let c = self.cmd(op);
        self.apply(&c)
    }

    fn register(&mut self, name: &str, kind: NodeKind) {
        self.run(register_op(name, kind, Registration::Config))
            .unwrap();
    }

    fn decision(&self, goals: Vec<(&str, AssignedGoal)>, primary: Option<&str>, epoch: u64) -> Op {
        let g = self.cat.group("g").unwrap();
        Op::Decide(Decision {
            group: "g".into(),
            based_on: g.revision,
            primary: primary.map(id),
            epoch: Epoch(epoch),
            sync: g.sync.clone(),
            operation: None,
            notice: None,
            goals: goals.into_iter().map(|(n, goal)| (id(n), goal)).collect(),
            events: vec![DecisionEvent {
                kind: "goal".into(),
                node: None,
                message: "test".into(),
            }],
        })
    }
}

fn register_op(name: &str, kind: NodeKind, source: Registration) -> Op {
    Op::RegisterNode {
        node: id(name),
        kind,
        group: "g".into(),
        endpoint: Endpoint {
            host: format!("{name}.lan"),
            port: 5432,
        },
        source,
        certificate: None,
    }
}

fn token_op(t: &token::NewToken, expires: u64) -> Op {
    Op::CreateToken {
        token_id: t.id.clone(),
        secret_sha256_hex: t.secret_sha256_hex.clone(),
        kind: NodeKind::Postgres,
        group: "g".into(),
        expires_at_unix_ms: expires,
        node: Some(id("p9")),
        address: Some("10.0.0.9".into()),
    }
}

#[test]
fn a_retried_request_is_applied_once_and_answers_the_same() {
    let mut f = Fixture::new();
    f.register("p1", NodeKind::Postgres);
    let cmd = f.cmd(Op::SetNodeSettings {
        node: id("p1"),
        candidate_priority: Some(7),
        replication_quorum: None,
    });
    let first = f.apply(&cmd).unwrap();
    let events = f.cat.events_after(0, 100).count();
    let revision = f.cat.group("g").unwrap().revision;
    assert_eq!(f.apply(&cmd).unwrap(), first);
    assert_eq!(
        f.cat.events_after(0, 100).count(),
        events,
        "no second event"
    );
    assert_eq!(
        f.cat.group("g").unwrap().revision,
        revision,
        "no second change"
    );
    // A rejection is remembered too.
    let bad = f.cmd(Op::RemoveNode { node: id("nobody") });
    assert_eq!(f.apply(&bad), Err(Rejected::UnknownNode(id("nobody"))));
    f.register("nobody", NodeKind::Postgres);
    assert_eq!(f.apply(&bad), Err(Rejected::UnknownNode(id("nobody"))));
    let empty = Command {
        request_id: String::new(),
        at_unix_ms: T0,
        op: Op::RemoveNode { node: id("p1") },
    };
    assert_eq!(f.apply(&empty), Err(Rejected::MissingRequestId));
}

#[test]
fn join_tokens_are_single_use_expire_and_resist_forgery() {
    let mut f = Fixture::new();
    let t = token::generate();
    f.run(token_op(&t, T0 + 60_000)).unwrap();
    let grant = f.cat.verify_token(&t.plaintext, T0).unwrap();
    assert_eq!(
        (grant.id.as_str(), grant.kind, grant.group.as_str()),
        (t.id.as_str(), NodeKind::Postgres, "g")
    );
    assert_eq!(
        (grant.node.as_str(), grant.address.as_str()),
        ("p9", "10.0.0.9"),
        "the token names the node it admits"
    );
    // A token made before tokens named their node (an older catalog) admits nobody.
    let old = token::generate();
    let mut unbound = token_op(&old, T0 + 60_000);
    if let Op::CreateToken { node, address, .. } = &mut unbound {
        *node = None;
        *address = None;
    }
    f.run(unbound).unwrap();
    assert_eq!(
        f.cat.verify_token(&old.plaintext, T0),
        Err(TokenError::Unbound)
    );

    let forged = format!("hajt_{}_{}", t.id, "A".repeat(43));
    assert_eq!(f.cat.verify_token(&forged, T0), Err(TokenError::Mismatch));
    assert_eq!(
        f.cat.verify_token("hajt_0123456789abcdef_x", T0),
        Err(TokenError::Unknown)
    );
    assert_eq!(
        f.cat.verify_token("password", T0),
        Err(TokenError::Malformed)
    );
    assert_eq!(
        f.cat.verify_token(&t.plaintext, T0 + 60_000),
        Err(TokenError::Expired)
    );
    // Only a used token is looked up for a retried join.
    assert_eq!(
        f.cat.verify_used_token(&t.plaintext, T0),
        Err(TokenError::Unused)
    );

    let join = Registration::JoinToken {
        token_id: t.id.clone(),
    };
    let wrong_kind = f.run(register_op("e1", NodeKind::Ejabberd, join.clone()));
    assert!(
        matches!(wrong_kind, Err(Rejected::Token { .. })),
        "{wrong_kind:?}"
    );
    f.run(register_op("p1", NodeKind::Postgres, join.clone()))
        .unwrap();
    assert_eq!(f.cat.verify_token(&t.plaintext, T0), Err(TokenError::Used));
    // A retried join learns what the used token granted, until the token expires; forged
    // secrets stay refused.
    assert_eq!(f.cat.verify_used_token(&t.plaintext, T0), Ok(grant));
    assert_eq!(
        f.cat.verify_used_token(&forged, T0),
        Err(TokenError::Mismatch)
    );
    assert_eq!(
        f.cat.verify_used_token(&t.plaintext, T0 + 60_000),
        Err(TokenError::Expired)
    );
    let reuse = f.run(register_op("p2", NodeKind::Postgres, join));
    assert_eq!(
        reuse,
        Err(Rejected::Token {
            id: t.id.clone(),
            reason: "join token was already used".into()
        })
    );
    assert!(f.cat.node(&id("p2")).is_none());

    let late = token::generate();
    f.run(token_op(&late, T0 + 10)).unwrap();
    let mut expired = f.cmd(register_op(
        "p3",
        NodeKind::Postgres,
        Registration::JoinToken {
            token_id: late.id.clone(),
        },
    ));
    expired.at_unix_ms = T0 + 10;
    assert!(matches!(f.apply(&expired), Err(Rejected::Token { .. })));

    let revoked = token::generate();
    f.run(token_op(&revoked, T0 + 60_000)).unwrap();
    f.run(Op::RevokeToken {
        token_id: revoked.id.clone(),
    })
    .unwrap();
    assert_eq!(
        f.cat.verify_token(&revoked.plaintext, T0),
        Err(TokenError::Unknown)
    );
    assert!(
        !String::from_utf8(f.cat.to_bytes())
            .unwrap()
            .contains(&t.plaintext),
        "only hashes are stored"
    );
}

#[test]
fn registration_from_config_is_idempotent_but_conflicts_are_rejected() {
    let mut f = Fixture::new();
    f.register("p1", NodeKind::Postgres);
    f.register("p1", NodeKind::Postgres);
    assert_eq!(
        f.run(register_op("p1", NodeKind::Ejabberd, Registration::Config)),
        Err(Rejected::NodeExists(id("p1")))
    );
    assert_eq!(f.cat.members("g").count(), 1);
    assert_eq!(
        f.cat.node(&id("p1")).unwrap().candidate_priority,
        DEFAULT_PRIORITY
    );
}

#[test]
fn decisions_are_rejected_when_stale_or_unsafe() {
    let mut f = Fixture::new();
    f.register("p1", NodeKind::Postgres);
    f.register("p2", NodeKind::Postgres);
    let single = AssignedGoal::bare(GoalState::Single, Epoch(1));
    let stale = f.decision(vec![("p1", single.clone())], Some("p1"), 1);
    f.run(Op::SetNodeSettings {
        node: id("p2"),
        candidate_priority: Some(0),
        replication_quorum: None,
    })
    .unwrap();
    assert!(matches!(f.run(stale), Err(Rejected::StaleDecision { .. })));

    let two = f.decision(
        vec![("p1", single.clone()), ("p2", single.clone())],
        Some("p1"),
        1,
    );
    assert!(matches!(f.run(two), Err(Rejected::Unsafe(m)) if m.contains("would all be writable")));
    let not_primary = f.decision(vec![("p2", single.clone())], Some("p1"), 1);
    assert!(matches!(f.run(not_primary), Err(Rejected::Unsafe(_))));
    f.run(f.decision(vec![("p1", single)], Some("p1"), 1))
        .unwrap();
    assert_eq!(f.cat.group("g").unwrap().epoch, Epoch(1));

    let down = f.decision(vec![], Some("p1"), 0);
    assert!(matches!(f.run(down), Err(Rejected::Unsafe(m)) if m.contains("epoch would go down")));
    let promote_zero = f.decision(
        vec![
            ("p1", AssignedGoal::bare(GoalState::Fenced, Epoch(1))),
            ("p2", AssignedGoal::bare(GoalState::Primary, Epoch(2))),
        ],
        Some("p2"),
        2,
    );
    assert!(matches!(f.run(promote_zero), Err(Rejected::Unsafe(m)) if m.contains("priority 0")));
    let same_epoch = f.decision(
        vec![("p1", AssignedGoal::bare(GoalState::Fenced, Epoch(1)))],
        Some("p2"),
        1,
    );
    assert!(matches!(f.run(same_epoch), Err(Rejected::Unsafe(m)) if m.contains("new epoch")));
    assert_eq!(
        f.cat.goal(&id("p1")).unwrap().state,
        GoalState::Single,
        "rejections change nothing"
    );
}

#[test]
fn goals_are_served_with_the_upstream_endpoint() {
    let mut f = Fixture::new();
    f.register("p1", NodeKind::Postgres);
    f.register("p2", NodeKind::Postgres);
    assert!(f.cat.goal(&id("p2")).is_none());
    let op = f.decision(
        vec![
            ("p1", AssignedGoal::bare(GoalState::Single, Epoch(1))),
            (
                "p2",
                AssignedGoal::following(GoalState::Standby, Epoch(1), id("p1")),
            ),
        ],
        Some("p1"),
        1,
    );
    f.run(op).unwrap();
    let goal = f.cat.goal(&id("p2")).unwrap();
    assert_eq!(
        goal.upstream,
        Some((
            id("p1"),
            Endpoint {
                host: "p1.lan".into(),
                port: 5432
            }
        ))
    );
    assert_eq!(goal.epoch, Epoch(1));
    let wire = ha_proto::v1::Goal::from(goal.clone());
    assert_eq!(Goal::try_from(wire).unwrap(), goal);
}

#[test]
fn operator_commands_validate_targets_and_pending_operations() {
    let mut f = Fixture::new();
    f.register("p1", NodeKind::Postgres);
    f.register("p2", NodeKind::Postgres);
    let none = f.run(Op::Switchover {
        group: "g".into(),
        target: id("p2"),
    });
    assert!(matches!(none, Err(Rejected::NotEligible(m)) if m.contains("no primary")));
    f.run(f.decision(
        vec![("p1", AssignedGoal::bare(GoalState::Single, Epoch(1)))],
        Some("p1"),
        1,
    ))
    .unwrap();
    assert!(matches!(
        f.run(Op::Switchover {
            group: "g".into(),
            target: id("p1")
        }),
        Err(Rejected::NotEligible(_))
    ));
    assert!(matches!(
        f.run(Op::Switchover {
            group: "x".into(),
            target: id("p2")
        }),
        Err(Rejected::UnknownGroup(_))
    ));
    f.run(Op::Switchover {
        group: "g".into(),
        target: id("p2"),
    })
    .unwrap();
    let busy = f.run(Op::Failover {
        group: "g".into(),
        allow_data_loss: true,
    });
    assert!(matches!(busy, Err(Rejected::OperationInProgress { .. })));
    assert!(matches!(
        f.run(Op::RemoveNode { node: id("p2") }),
        Err(Rejected::OperationInProgress { .. })
    ));
    assert!(
        f.cat
            .group("g")
            .unwrap()
            .operation
            .as_ref()
            .unwrap()
            .describe()
            .contains("p1 -> p2")
    );
}

#[test]
fn an_operator_failover_can_be_upgraded_to_allow_data_loss() {
    let mut f = Fixture::new();
    f.register("p1", NodeKind::Postgres);
    f.run(f.decision(
        vec![("p1", AssignedGoal::bare(GoalState::Single, Epoch(1)))],
        Some("p1"),
        1,
    ))
    .unwrap();
    f.run(Op::Failover {
        group: "g".into(),
        allow_data_loss: false,
    })
    .unwrap();
    assert!(
        f.run(Op::Failover {
            group: "g".into(),
            allow_data_loss: false
        })
        .is_err()
    );
    f.run(Op::Failover {
        group: "g".into(),
        allow_data_loss: true,
    })
    .unwrap();
    assert!(matches!(
        f.cat.group("g").unwrap().operation,
        Some(Operation::Failover {
            allow_data_loss: true,
            ..
        })
    ));
}

#[test]
fn settings_are_validated() {
    let mut f = Fixture::new();
    assert!(Timings::default().validate().is_ok());
    let bad = Timings {
        lease: Duration::from_secs(1),
        ..Timings::default()
    };
    assert!(matches!(
        f.run(Op::SetTimings(bad)),
        Err(Rejected::Invalid(_))
    ));
    let good = Timings {
        lease: Duration::from_secs(5),
        ..Timings::default()
    };
    f.run(Op::SetTimings(good.clone())).unwrap();
    assert_eq!(f.cat.timings(), &good);
    f.register("p1", NodeKind::Postgres);
    let zero = GroupSettings {
        sync_quorum: 0,
        ..GroupSettings::default()
    };
    assert!(matches!(
        f.run(Op::SetGroupSettings {
            group: "g".into(),
            settings: zero
        }),
        Err(Rejected::Invalid(_))
    ));
}

#[test]
fn events_are_numbered_bounded_and_paged() {
    let mut f = Fixture::new();
    for i in 0..(EVENT_HISTORY + 5) {
        f.run(Op::RecordEvent {
            kind: "note".into(),
            node: None,
            group: None,
            message: format!("n{i}"),
        })
        .unwrap();
    }
    let all: Vec<&Event> = f.cat.events_after(0, usize::MAX).collect();
    assert_eq!(all.len(), EVENT_HISTORY);
    assert_eq!(all[0].seq, 6, "the oldest were dropped");
    assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    let page: Vec<u64> = f.cat.events_after(all[10].seq, 3).map(|e| e.seq).collect();
    assert_eq!(page, vec![all[11].seq, all[12].seq, all[13].seq]);
    assert_eq!(
        all.last().unwrap().at_unix_ms,
        T0,
        "time comes from the command"
    );
}

#[test]
fn request_memory_is_bounded() {
    let mut f = Fixture::new();
    let first = f.cmd(Op::RecordEvent {
        kind: "note".into(),
        node: None,
        group: None,
        message: "x".into(),
    });
    f.apply(&first).unwrap();
    let note = |f: &mut Fixture| {
        f.cmd(Op::RecordEvent {
            kind: "note".into(),
            node: None,
            group: None,
            message: "y".into(),
        })
    };
    let mut last = note(&mut f);
    for _ in 0..REQUEST_MEMORY {
        last = note(&mut f);
        f.apply(&last).unwrap();
    }
    // The index of remembered ids survives a reload: the newest id is still applied once.
    f.cat = Catalog::from_bytes(&f.cat.to_bytes()).unwrap();
    let before = f.cat.events_after(0, usize::MAX).last().unwrap().seq;
    let again = f.apply(&last).unwrap();
    assert_eq!(
        f.cat.events_after(0, usize::MAX).last().unwrap().seq,
        before,
        "a remembered id applied twice after a reload"
    );
    assert_eq!(again.index, f.index - 1, "the earlier outcome is returned");
    f.apply(&first).unwrap();
    assert_eq!(
        f.cat.events_after(0, usize::MAX).last().unwrap().seq,
        before + 1,
        "forgotten ids apply again"
    );
}

#[test]
fn bytes_round_trip_and_unknown_versions_are_refused() {
    let mut f = Fixture::new();
    f.register("p1", NodeKind::Postgres);
    f.run(f.decision(
        vec![("p1", AssignedGoal::bare(GoalState::Single, Epoch(1)))],
        Some("p1"),
        1,
    ))
    .unwrap();
    let bytes = f.cat.to_bytes();
    assert_eq!(Catalog::from_bytes(&bytes).unwrap(), f.cat);
    let text = String::from_utf8(bytes)
        .unwrap()
        .replacen("\"version\":1", "\"version\":99", 1);
    assert!(matches!(
        Catalog::from_bytes(text.as_bytes()),
        Err(LoadError::Version(99))
    ));
    assert!(matches!(
        Catalog::from_bytes(b"{"),
        Err(LoadError::Decode(_))
    ));
    // Applying the same log to two copies gives the same catalog (determinism).
    let mut a = Catalog::new();
    let mut b = Catalog::new();
    let cmd = Command {
        request_id: "r".into(),
        at_unix_ms: T0,
        op: register_op("p9", NodeKind::Postgres, Registration::Config),
    };
    assert_eq!(a.apply(1, &cmd), b.apply(1, &cmd));
    assert_eq!(a.to_bytes(), b.to_bytes());
}

#[test]
fn expired_tokens_are_swept_on_creation_also_after_a_reload() {
    let mut f = Fixture::new();
    let short = token::generate();
    f.run(token_op(&short, T0 + 10)).unwrap();
    let long = token::generate();
    f.run(token_op(&long, T0 + 60_000)).unwrap();
    let revoked = token::generate();
    f.run(token_op(&revoked, T0 + 5)).unwrap();
    f.run(Op::RevokeToken {
        token_id: revoked.id.clone(),
    })
    .unwrap();
    // The expiry index is not serialized: loading must rebuild it or nothing is ever swept.
    f.cat = Catalog::from_bytes(&f.cat.to_bytes()).unwrap();

    let next = token::generate();
    let mut create = f.cmd(token_op(&next, T0 + 120_000));
    create.at_unix_ms = T0 + 10; // exactly when `short` expires
    f.apply(&create).unwrap();
    assert_eq!(
        f.cat.verify_token(&short.plaintext, T0),
        Err(TokenError::Unknown),
        "the expired token is gone"
    );
    assert!(f.cat.verify_token(&long.plaintext, T0 + 10).is_ok());
    assert!(f.cat.verify_token(&next.plaintext, T0 + 10).is_ok());
    let index: OrdSet<(u64, String)> = f
        .cat
        .tokens
        .iter()
        .map(|(id, t)| (t.expires_at_unix_ms, id.clone()))
        .collect();
    assert_eq!(
        f.cat.token_expiry, index,
        "the index holds exactly the tokens"
    );
    assert_eq!(index.len(), 2);
}

#[test]
fn group_queries_follow_registration_removal_and_reload() {
    let mut f = Fixture::new();
    for name in ["p1", "p2", "p3"] {
        f.register(name, NodeKind::Postgres);
    }
    f.register("e1", NodeKind::Ejabberd);
    f.run(Op::RemoveNode { node: id("p2") }).unwrap();
    f.run(Op::RemoveNode { node: id("p3") }).unwrap();
    // A removed node may register again, here in another group.
    f.run(Op::RegisterNode {
        node: id("p3"),
        kind: NodeKind::Postgres,
        group: "h".into(),
        endpoint: Endpoint {
            host: "p3.lan".into(),
            port: 5432,
        },
        source: Registration::Config,
        certificate: None,
    })
    .unwrap();
    let names = |nodes: Vec<&Node>| -> Vec<String> {
        nodes.iter().map(|n| n.name.as_str().to_owned()).collect()
    };
    let check = |cat: &Catalog| {
        assert_eq!(
            names(cat.group_nodes("g").collect()),
            ["e1", "p1", "p2"],
            "removed nodes stay in their group"
        );
        assert_eq!(names(cat.members("g").collect()), ["e1", "p1"]);
        assert_eq!(names(cat.members("h").collect()), ["p3"]);
        assert_eq!(
            names(cat.group_nodes("nope").collect()),
            Vec::<String>::new()
        );
    };
    check(&f.cat);
    let loaded = Catalog::from_bytes(&f.cat.to_bytes()).unwrap();
    check(&loaded);
    assert_eq!(loaded, f.cat);
}

#[test]
fn removal_revokes_recorded_certificates_until_they_expire() {
    let mut f = Fixture::new();
    f.register("p1", NodeKind::Postgres);
    f.register("p2", NodeKind::Postgres);
    let cert = |serial: &str, not_after_unix_ms: u64| IssuedCertificate {
        serial: serial.into(),
        not_after_unix_ms,
        public_key_sha256: format!("key-of-{serial}"),
    };
    let record = |node: &str, c: IssuedCertificate| Op::RecordCertificate {
        node: id(node),
        certificate: c,
    };
    f.run(record("p2", cert("aa", T0 + 1_000))).unwrap();
    f.run(record("p2", cert("bb", T0 + 60_000))).unwrap();
    f.run(record("p1", cert("cc", T0 + 60_000))).unwrap();
    assert!(matches!(
        f.run(record("p1", cert("dd", T0))),
        Err(Rejected::Invalid(_))
    ));
    assert!(matches!(
        f.run(record("nobody", cert("ee", T0 + 60_000))),
        Err(Rejected::UnknownNode(_))
    ));
    let applied = f.run(Op::RemoveNode { node: id("p2") }).unwrap();
    assert!(applied.message.contains("aa, bb"), "{}", applied.message);
    let revoked = |cat: &Catalog, serial: &str| {
        cat.certificate(serial)
            .and_then(|c| c.revoked_at_unix_ms)
            .is_some()
    };
    assert!(revoked(&f.cat, "aa") && revoked(&f.cat, "bb"));
    assert!(!revoked(&f.cat, "cc"));
    // A node holds the keys of its valid certificates only.
    assert!(f.cat.holds_key(&id("p1"), "key-of-cc", T0));
    assert!(
        !f.cat.holds_key(&id("p1"), "key-of-cc", T0 + 60_000),
        "expired"
    );
    assert!(!f.cat.holds_key(&id("p2"), "key-of-bb", T0), "revoked");
    assert!(
        !f.cat.holds_key(&id("p2"), "key-of-cc", T0),
        "another node's"
    );
    assert!(!f.cat.holds_key(&id("p1"), "", T0), "no key recorded");
    // A snapshot keeps them.
    let copy = Catalog::from_bytes(&f.cat.to_bytes()).unwrap();
    assert!(revoked(&copy, "bb") && !revoked(&copy, "cc"));
    // Revoking again, or an unknown serial, is refused and changes nothing.
    assert!(
        f.run(Op::RevokeCertificate {
            serial: "bb".into()
        })
        .is_err()
    );
    assert!(
        f.run(Op::RevokeCertificate {
            serial: "ff".into()
        })
        .is_err()
    );
    f.run(Op::RevokeCertificate {
        serial: "cc".into(),
    })
    .unwrap();
    assert!(revoked(&f.cat, "cc"));
    // Expired entries are dropped with the next certificate change: the map stays bounded.
    let later = Command {
        request_id: "later".into(),
        at_unix_ms: T0 + 2_000,
        op: record("p1", cert("gg", T0 + 60_000)),
    };
    f.apply(&later).unwrap();
    assert!(f.cat.certificate("aa").is_none());
    assert!(revoked(&f.cat, "bb"));
    assert_eq!(f.cat.certificates().count(), 3);
}
