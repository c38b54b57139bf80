//! A simulated cluster for testing `decide` + `Catalog::apply` together: PostgreSQL nodes with
//! WAL positions, synchronous acknowledgement, leases and faults; agents that reach their goals
//! the way the real agent does; and checks of the safety rules against the simulated ground
//! truth (which node can really write, which writes were really acknowledged).
//!
//! Invariants checked after every step (a violation panics with the step log):
//! - at most one writable goal per group, and one node per (group, epoch) ever writable;
//! - epochs never decrease; no node with candidate priority 0 is promoted;
//! - a promotion without `allow_data_loss` keeps every acknowledged write (the new primary's
//!   WAL reaches the highest acknowledged LSN);
//! - at a promotion no other node can still accept writes (old primary fenced or lease over),
//!   and at no time can two nodes accept writes.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ha_proto::types::{Endpoint, Epoch, GoalState, Lsn, NodeId, NodeKind, Timeline};
use proptest::prelude::*;

use super::*;
use crate::catalog::{Command, Op, Operation, Outcome, Registration};

pub(super) const GROUP: &str = "g";

pub(super) fn id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

#[derive(Debug, Clone)]
pub(super) struct SimNode {
    pub kind: NodeKind,
    pub agent_up: bool,
    pub pg_up: bool,
    /// The whole host is stopped (SIGSTOP): nothing answers, nothing happens.
    pub frozen: bool,
    /// Cut from the monitors only; PostgreSQL peers still reach it.
    pub partitioned: bool,
    /// The agent reports but does not act on its goal (hung on a slow step).
    pub stuck: bool,
    /// PostgreSQL cannot start (a bad `postgresql.conf`): the agent's starts fail.
    pub broken: bool,
    /// The replication link to its upstream is cut (both still reach the monitors): nothing
    /// streams, and both sides say so once their replication timeouts gave up.
    pub stream_cut: bool,
    pub role: PgRole,
    pub flush: Lsn,
    pub epoch: Epoch,
    pub upstream: Option<NodeId>,
    pub sync_applied: (Vec<NodeId>, u32),
    pub reached: Option<GoalState>,
    pub lease_until: Duration,
    pub applied: Option<(Epoch, NodeId)>,
    /// When the monitors last answered this agent's report.
    pub answered_at: Option<Duration>,
    /// A standby's vouch (the failsafe): for which primary and epoch, and until when.
    pub promise: Option<(NodeId, Epoch, Duration)>,
}

impl SimNode {
    fn new(kind: NodeKind) -> Self {
        Self {
            kind,
            agent_up: true,
            pg_up: false,
            frozen: false,
            partitioned: false,
            stuck: false,
            broken: false,
            stream_cut: false,
            role: PgRole::Empty,
            flush: Lsn::ZERO,
            epoch: Epoch::ZERO,
            upstream: None,
            sync_applied: (Vec::new(), 0),
            reached: None,
            lease_until: Duration::ZERO,
            applied: None,
            answered_at: None,
            promise: None,
        }
    }

    /// Still bound by a vouch at `now`.
    fn vouching(&self, now: Duration) -> bool {
        self.promise
            .as_ref()
            .is_some_and(|(_, _, until)| now < *until)
    }

    /// The agent's vouch rule (`agent/src/run/vouch.rs`): following `primary` at `epoch` (the
    /// goal it last acted on: a cut-off agent gets no new one), streaming from it, cut off from
    /// the monitors, within `failsafe` of its last answered report, bound by no other vouch.
    fn would_vouch(
        &self,
        primary: &NodeId,
        epoch: Epoch,
        now: Duration,
        failsafe: Duration,
    ) -> bool {
        self.agent_up
            && !self.frozen
            && self.partitioned
            && self.reached == Some(GoalState::Standby)
            && self.upstream.as_ref() == Some(primary)
            && self.epoch == epoch
            && self.streams_from(primary)
            && self
                .answered_at
                .is_some_and(|t| now.saturating_sub(t) <= failsafe)
            && self
                .promise
                .as_ref()
                .is_none_or(|(p, e, until)| now >= *until || (p == primary && *e == epoch))
    }

    /// Whether this server accepts writes now or could without being told anything new. Only a
    /// live agent enforces the lease: PostgreSQL outlives a dead agent.
    fn can_write(&self, now: Duration) -> bool {
        self.pg_up && self.role == PgRole::Primary && (now < self.lease_until || !self.agent_up)
    }

    fn serves(&self) -> bool {
        self.pg_up && !self.frozen
    }

    /// Receives WAL from `upstream` now.
    fn streams_from(&self, upstream: &NodeId) -> bool {
        self.serves() && !self.stream_cut && self.upstream.as_ref() == Some(upstream)
    }
}

#[derive(Debug)]
pub(super) struct World {
    pub cat: Catalog,
    pub obs: Observations,
    pub now: Duration,
    pub nodes: BTreeMap<NodeId, SimNode>,
    /// Highest write acknowledged to a client on the current history.
    pub acked: Lsn,
    pub log: Vec<String>,
    index: u64,
    requests: u64,
    writable_at: BTreeMap<Epoch, NodeId>,
    /// Old primaries still running when a failover with data loss promoted another node. The
    /// one accepted hole: while such a node's agent is dead, nothing enforces its lease, and an
    /// asynchronous primary needs no standby to acknowledge. Cleared when its agent returns.
    orphans: BTreeSet<NodeId>,
    /// Run beside every full pass: a memoised pass must decide exactly the same.
    memo: Memo,
}

impl World {
    /// A group `g` with the given postgres and ejabberd nodes, registered in order.
    pub fn new(postgres: &[&str], ejabberd: &[&str]) -> Self {
        let mut w = World {
            cat: Catalog::new(),
            obs: Observations::new(Duration::ZERO),
            now: Duration::ZERO,
            nodes: BTreeMap::new(),
            acked: Lsn::ZERO,
            log: Vec::new(),
            index: 0,
            requests: 0,
            writable_at: BTreeMap::new(),
            orphans: BTreeSet::new(),
            memo: Memo::default(),
        };
        let all = postgres
            .iter()
            .map(|n| (n, NodeKind::Postgres))
            .chain(ejabberd.iter().map(|n| (n, NodeKind::Ejabberd)));
        for (name, kind) in all {
            let op = Op::RegisterNode {
                node: id(name),
                kind,
                group: GROUP.into(),
                endpoint: Endpoint {
                    host: format!("{name}.test"),
                    port: 5432,
                },
                source: Registration::Config,
                certificate: None,
            };
            w.propose(op).unwrap();
            w.nodes.insert(id(name), SimNode::new(kind));
        }
        w
    }

    pub fn node(&self, name: &str) -> &SimNode {
        &self.nodes[&id(name)]
    }

    pub fn node_mut(&mut self, name: &str) -> &mut SimNode {
        self.nodes.get_mut(&id(name)).unwrap()
    }

    pub fn group(&self) -> &Group {
        self.cat.group(GROUP).unwrap()
    }

    pub fn goal(&self, name: &str) -> Option<AssignedGoal> {
        self.cat.node(&id(name)).unwrap().goal.clone()
    }

    pub fn goal_state(&self, name: &str) -> Option<GoalState> {
        self.goal(name).map(|g| g.state)
    }

    pub fn primary(&self) -> Option<String> {
        self.group().primary.as_ref().map(ToString::to_string)
    }

    /// Applies an operator (or any) command under a fresh request id.
    pub fn propose(&mut self, op: Op) -> Outcome {
        self.requests += 1;
        let cmd = Command {
            request_id: format!("r{}", self.requests),
            at_unix_ms: 1_700_000_000_000 + u64::try_from(self.now.as_millis()).unwrap(),
            op,
        };
        self.apply(&cmd)
    }

    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        self.index += 1;
        self.cat.apply(self.index, cmd)
    }

    pub fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
    }

    pub fn crash(&mut self, name: &str) {
        let n = self.node_mut(name);
        n.agent_up = false;
        n.pg_up = false;
    }

    /// The agent alone dies; PostgreSQL keeps running.
    pub fn kill_agent(&mut self, name: &str) {
        self.node_mut(name).agent_up = false;
    }

    pub fn restart(&mut self, name: &str) {
        self.orphans.remove(&id(name));
        let n = self.node_mut(name);
        n.agent_up = true;
        n.frozen = false;
    }

    /// A new monitor leader: soft state starts empty.
    pub fn new_leader(&mut self) {
        self.obs = Observations::new(self.now);
        self.log.push(format!("{:?} new leader", self.now));
    }

    /// A client writes `bytes` of WAL to whichever node accepts writes; standbys in `receivers`
    /// (all streaming ones when `None`) receive it at once.
    pub fn write(&mut self, bytes: u64, receivers: Option<&[NodeId]>) -> bool {
        let now = self.now;
        let writers: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.can_write(now) && !n.frozen)
            .map(|(k, _)| k.clone())
            .collect();
        let [w] = writers.as_slice() else {
            return false;
        };
        let w = w.clone();
        self.node_mut(w.as_str()).flush.0 += bytes;
        let lsn = self.nodes[&w].flush;
        let followers: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(k, n)| n.streams_from(&w) && receivers.is_none_or(|r| r.contains(k)))
            .map(|(k, _)| k.clone())
            .collect();
        for f in followers {
            self.node_mut(f.as_str()).flush = lsn;
        }
        self.update_acks();
        true
    }

    /// Acknowledgements: asynchronous primaries acknowledge at once; synchronous ones when
    /// `k` of their applied set flushed.
    /// Only the catalog's primary counts: the checks below prove no other node can acknowledge.
    fn update_acks(&mut self) {
        let primary = self.group().primary.clone();
        for (name, n) in &self.nodes {
            if !(n.serves() && n.role == PgRole::Primary && Some(name) == primary.as_ref()) {
                continue;
            }
            let (set, k) = &n.sync_applied;
            let acked = if set.is_empty() {
                n.flush
            } else {
                let mut flushes: Vec<Lsn> = set
                    .iter()
                    .filter_map(|s| self.nodes.get(s))
                    .filter(|s| s.streams_from(name))
                    .map(|s| s.flush.min(n.flush))
                    .collect();
                flushes.sort_unstable_by(|a, b| b.cmp(a));
                flushes.get(*k as usize - 1).copied().unwrap_or(Lsn::ZERO)
            };
            self.acked = self.acked.max(acked);
        }
    }

    /// Standbys copy what their upstream has.
    pub fn replicate(&mut self) {
        let snapshot = self.nodes.clone();
        for n in self.nodes.values_mut() {
            if let Some((name, up)) = n.upstream.as_ref().and_then(|u| snapshot.get_key_value(u))
                && n.streams_from(name)
                && up.serves()
            {
                n.flush = n.flush.max(up.flush);
            }
        }
        self.update_acks();
    }

    /// The failsafe: a primary cut off from the monitors, still under its lease, asks every
    /// synchronous standby it applied; if all vouch, its lease runs on and each standby is
    /// bound for as long.
    fn failsafe_round(&mut self) {
        let now = self.now;
        let lease = self.cat.timings().lease;
        let failsafe = self.group().settings.failsafe();
        if failsafe.is_zero() {
            return;
        }
        let asking: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| {
                n.role == PgRole::Primary
                    && n.pg_up
                    && n.agent_up
                    && !n.frozen
                    && n.partitioned
                    && now < n.lease_until
                    && !n.sync_applied.0.is_empty()
            })
            .map(|(k, _)| k.clone())
            .collect();
        for p in asking {
            let (epoch, set) = (self.nodes[&p].epoch, self.nodes[&p].sync_applied.0.clone());
            let all = set.iter().all(|s| {
                self.nodes
                    .get(s)
                    .is_some_and(|s| s.would_vouch(&p, epoch, now, failsafe))
            });
            if !all {
                continue;
            }
            for s in &set {
                let n = self.nodes.get_mut(s).unwrap();
                let until = n
                    .promise
                    .as_ref()
                    .map_or(now + lease, |q| q.2.max(now + lease));
                n.promise = Some((p.clone(), epoch, until));
            }
            let n = self.nodes.get_mut(&p).unwrap();
            n.lease_until = n.lease_until.max(now + lease);
            self.log.push(format!("{now:?} {p} vouched for by {set:?}"));
        }
    }

    /// One round: leases lapse, agents act and report, the leader probes, decides, applies.
    pub fn step(&mut self) {
        self.failsafe_round();
        let now = self.now;
        for n in self.nodes.values_mut() {
            // The agent's self-fence: a primary that could not renew stops accepting writes.
            if n.role == PgRole::Primary
                && n.pg_up
                && now >= n.lease_until
                && !n.frozen
                && n.agent_up
            {
                n.pg_up = false;
            }
        }
        let names: Vec<NodeId> = self.nodes.keys().cloned().collect();
        for name in &names {
            self.agent_act(name);
        }
        self.replicate();
        for name in &names {
            self.report(name);
        }
        self.decide_and_apply();
    }

    fn agent_act(&mut self, name: &NodeId) {
        let n = &self.nodes[name];
        if !n.agent_up || n.frozen || n.partitioned || n.stuck {
            return;
        }
        let Some(goal) = self.cat.node(name).and_then(|c| c.goal.clone()) else {
            return;
        };
        if goal.epoch < n.epoch {
            return;
        }
        // A vouch binds: no other goal than following that primary at that epoch until it ends.
        if let Some((p, e, _)) = n.promise.as_ref().filter(|_| n.vouching(self.now))
            && !(goal.state == GoalState::Standby
                && goal.upstream.as_ref() == Some(p)
                && goal.epoch == *e)
        {
            return;
        }
        let upstream_flush = goal
            .upstream
            .as_ref()
            .and_then(|u| self.nodes.get(u))
            .map(|u| u.flush);
        let snapshot = self.nodes.clone();
        let n = self.nodes.get_mut(name).unwrap();
        n.epoch = goal.epoch;
        if n.kind == NodeKind::Ejabberd {
            if goal.state == GoalState::Follow {
                n.applied = goal.upstream.clone().map(|u| (goal.epoch, u));
            }
            n.reached = Some(goal.state);
            return;
        }
        match goal.state {
            GoalState::Single | GoalState::Primary => {
                if n.broken && !n.pg_up {
                    return; // every start fails; the agent reports it stopped
                }
                n.role = PgRole::Primary;
                n.upstream = None;
                n.pg_up = true;
                n.sync_applied = (goal.synchronous_standbys.clone(), goal.synchronous_quorum);
            }
            GoalState::Standby => {
                if n.broken && !n.pg_up {
                    return;
                }
                let up_flush = upstream_flush.unwrap_or(Lsn::ZERO);
                if n.role == PgRole::Empty {
                    n.flush = up_flush; // base backup
                } else if n.upstream != goal.upstream && n.flush > up_flush {
                    n.flush = up_flush; // pg_rewind to the divergence point
                }
                n.role = PgRole::Standby;
                n.upstream = goal.upstream.clone();
                n.pg_up = true;
                n.sync_applied = (Vec::new(), 0);
            }
            GoalState::StopReplication => {
                if n.role == PgRole::Empty {
                    return; // nothing to stop: no data yet
                }
                if n.broken && !n.pg_up {
                    return;
                }
                // Runs in recovery without a primary to stream from.
                n.role = PgRole::Standby;
                n.upstream = None;
                n.pg_up = true;
            }
            GoalState::Draining => {
                if n.pg_up && n.role == PgRole::Primary {
                    // A clean shutdown ships all WAL to the connected standbys.
                    let flush = n.flush;
                    for (k, s) in &snapshot {
                        if s.streams_from(name) {
                            self.nodes.get_mut(k).unwrap().flush = flush;
                        }
                    }
                }
                let n = self.nodes.get_mut(name).unwrap();
                n.pg_up = false;
            }
            GoalState::Fenced | GoalState::Maintenance | GoalState::Removed => n.pg_up = false,
            GoalState::Follow => {}
        }
        self.nodes.get_mut(name).unwrap().reached = Some(goal.state);
    }

    fn report(&mut self, name: &NodeId) {
        let n = &self.nodes[name];
        let probe = if n.frozen || n.partitioned {
            ProbeResult::Timeout
        } else if n.pg_up {
            ProbeResult::Ok
        } else {
            ProbeResult::Refused
        };
        if n.kind == NodeKind::Postgres {
            self.obs.record_probe(name.clone(), probe, self.now);
        }
        if !n.agent_up || n.frozen || n.partitioned {
            return;
        }
        let detail = match n.kind {
            NodeKind::Ejabberd => ReportDetail::Ejabberd(EjabberdReport {
                running: true,
                applied_epoch: n.applied.as_ref().map_or(Epoch::ZERO, |a| a.0),
                applied_node: n.applied.as_ref().map(|a| a.1.clone()),
            }),
            NodeKind::Postgres => {
                let replicas = if n.pg_up && n.role == PgRole::Primary {
                    self.nodes
                        .iter()
                        .filter(|(_, s)| s.streams_from(name))
                        .map(|(k, s)| Replica {
                            name: k.to_string(),
                            state: "streaming".into(),
                            sync_state: if n.sync_applied.0.contains(k) {
                                SyncState::Quorum
                            } else {
                                SyncState::Async
                            },
                            flush_lsn: s.flush,
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let streaming = n.upstream.as_ref().is_some_and(|u| {
                    n.streams_from(u) && self.nodes.get(u).is_some_and(SimNode::serves)
                });
                ReportDetail::Postgres(PgReport {
                    role: if n.pg_up { n.role } else { PgRole::Stopped },
                    timeline: Timeline(u32::try_from(n.epoch.get()).unwrap()),
                    write_lsn: n.flush,
                    flush_lsn: n.flush,
                    replay_lsn: n.flush,
                    read_only: false,
                    replicas,
                    synchronous_standby_names: sync_standby_names(
                        &n.sync_applied.0,
                        n.sync_applied.1,
                    ),
                    streaming,
                    upstream_node: n.upstream.clone(),
                    recently_started: false,
                    commits_blocked: false,
                })
            }
        };
        let report = Report {
            node: name.clone(),
            epoch: n.epoch,
            reached: n.reached,
            last_error: String::new(),
            detail,
            vouching: n.vouching(self.now),
        };
        self.obs.record_report(report, self.now);
        let lease = self.cat.timings().lease;
        let n = self.nodes.get_mut(name).unwrap();
        n.lease_until = self.now + lease;
        n.answered_at = Some(self.now);
    }

    pub fn decide_and_apply(&mut self) {
        let decisions = decide(&self.cat, &self.obs, self.now);
        let memoised = self.memo.decide(&self.cat, &self.obs, self.now);
        if memoised != decisions {
            self.fail(format!(
                "a memoised pass decided {memoised:?} where a full pass decided {decisions:?}"
            ));
        }
        for d in decisions {
            let before = self.group().clone();
            let allow_data_loss = matches!(
                before.operation,
                Some(Operation::Failover {
                    allow_data_loss: true,
                    ..
                })
            );
            for e in &d.events {
                self.log
                    .push(format!("{:?} {}: {}", self.now, e.kind, e.message));
            }
            self.requests += 1;
            let cmd = d.into_command(format!("d{}", self.requests), 0);
            let outcome = self.apply(&cmd);
            assert!(
                outcome.is_ok(),
                "decision rejected: {outcome:?}\n{}",
                self.log.join("\n")
            );
            self.check(&before, allow_data_loss);
        }
        self.check_single_writer();
    }

    fn fail(&self, what: String) -> ! {
        panic!("{what}\nlog:\n{}", self.log.join("\n"))
    }

    /// Whether `name` may acknowledge writes now or later without being told anything new: a
    /// live agent's lease has not run out, or (dead agent) enough of its synchronous standbys
    /// still stream from it, or it runs asynchronously.
    fn may_acknowledge(&self, name: &NodeId) -> bool {
        let n = &self.nodes[name];
        if !n.can_write(self.now) {
            return false;
        }
        let (set, k) = &n.sync_applied;
        let streaming = set
            .iter()
            .filter(|s| self.nodes.get(*s).is_some_and(|s| s.streams_from(name)))
            .count();
        n.agent_up || set.is_empty() || streaming >= *k as usize
    }

    fn exempt(&self, k: &NodeId) -> bool {
        self.orphans.contains(k) && !self.nodes[k].agent_up
    }

    /// At no time may two nodes acknowledge writes (orphans with a dead agent aside).
    fn check_single_writer(&self) {
        let writers: Vec<_> = self
            .nodes
            .keys()
            .filter(|k| self.may_acknowledge(k) && !self.exempt(k))
            .map(NodeId::as_str)
            .collect();
        if writers.len() > 1 {
            self.fail(format!(
                "{writers:?} can all accept writes at {:?}",
                self.now
            ));
        }
    }

    fn check(&mut self, before: &Group, allow_data_loss: bool) {
        let after = self.group().clone();
        if after.epoch < before.epoch {
            self.fail(format!(
                "epoch went down from {} to {}",
                before.epoch, after.epoch
            ));
        }
        let writable: Vec<(NodeId, Epoch)> = self
            .cat
            .members(GROUP)
            .filter_map(|n| {
                n.goal
                    .as_ref()
                    .filter(|g| g.state.is_writable())
                    .map(|g| (n.name.clone(), g.epoch))
            })
            .collect();
        if writable.len() > 1 {
            self.fail(format!("two writable goals: {writable:?}"));
        }
        for (n, e) in writable {
            let first = self
                .writable_at
                .entry(e)
                .or_insert_with(|| n.clone())
                .clone();
            if first != n {
                self.fail(format!("{n} and {first} were both writable at {e}"));
            }
        }
        let promoted = after.epoch > before.epoch && before.primary.is_some();
        if !promoted {
            return;
        }
        let c = after.primary.clone().unwrap();
        if self.cat.node(&c).unwrap().candidate_priority == 0 {
            self.fail(format!("{c} promoted with candidate priority 0"));
        }
        let flush = self.nodes[&c].flush;
        if allow_data_loss {
            self.acked = flush;
        } else if flush < self.acked {
            self.fail(format!(
                "{c} promoted at {flush} but writes up to {} were acknowledged",
                self.acked
            ));
        }
        if allow_data_loss {
            let running: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(k, n)| **k != c && n.pg_up && n.role == PgRole::Primary)
                .map(|(k, _)| k.clone())
                .collect();
            self.orphans.extend(running);
        }
        for k in self.nodes.keys() {
            if *k != c && self.may_acknowledge(k) && !self.exempt(k) {
                self.fail(format!(
                    "{c} promoted while {k} can still acknowledge writes"
                ));
            }
        }
        self.log.push(format!(
            "{:?} promoted {c} at {} (acked {})",
            self.now, after.epoch, self.acked
        ));
    }

    /// Steps until `cond` holds, advancing `ms` per step, at most `max` steps.
    pub fn run_until(&mut self, ms: u64, max: usize, cond: impl Fn(&World) -> bool) -> bool {
        for _ in 0..max {
            if cond(self) {
                return true;
            }
            self.advance(ms);
            self.step();
        }
        cond(self)
    }
}

#[derive(Debug, Clone)]
enum Action {
    Write(u64, Vec<usize>),
    Replicate,
    Advance(u64),
    Crash(usize),
    KillAgent(usize),
    Restart(usize),
    Freeze(usize),
    Partition(usize, bool),
    Stuck(usize, bool),
    Broken(usize, bool),
    StreamCut(usize, bool),
    NewLeader,
    Switchover(Option<usize>),
    Failover(bool),
    Maintenance(usize, bool),
    Priority(usize, u32),
}

const PG: [&str; 3] = ["p1", "p2", "p3"];

fn action() -> impl Strategy<Value = Action> {
    let node = 0..PG.len();
    prop_oneof![
        6 => (1u64..5000, proptest::collection::vec(0..PG.len(), 0..3)).prop_map(|(b, r)| Action::Write(b, r)),
        3 => Just(Action::Replicate),
        8 => (50u64..2000).prop_map(Action::Advance),
        1 => node.clone().prop_map(Action::Crash),
        1 => node.clone().prop_map(Action::KillAgent),
        2 => node.clone().prop_map(Action::Restart),
        1 => node.clone().prop_map(Action::Freeze),
        1 => (node.clone(), any::<bool>()).prop_map(|(n, on)| Action::Partition(n, on)),
        1 => (node.clone(), any::<bool>()).prop_map(|(n, on)| Action::Stuck(n, on)),
        1 => (node.clone(), any::<bool>()).prop_map(|(n, on)| Action::Broken(n, on)),
        1 => (node.clone(), any::<bool>()).prop_map(|(n, on)| Action::StreamCut(n, on)),
        1 => Just(Action::NewLeader),
        1 => proptest::option::of(node.clone()).prop_map(Action::Switchover),
        1 => any::<bool>().prop_map(Action::Failover),
        1 => (node.clone(), any::<bool>()).prop_map(|(n, on)| Action::Maintenance(n, on)),
        1 => (node, prop_oneof![Just(0u32), Just(50), Just(100)]).prop_map(|(n, p)| Action::Priority(n, p)),
    ]
}

impl World {
    fn perform(&mut self, a: &Action) {
        self.log.push(format!("{:?} action {a:?}", self.now));
        match a {
            Action::Write(bytes, receivers) => {
                let r: Vec<NodeId> = receivers.iter().map(|i| id(PG[*i])).collect();
                self.write(*bytes, Some(&r));
            }
            Action::Replicate => self.replicate(),
            Action::Advance(ms) => self.advance(*ms),
            Action::Crash(i) => self.crash(PG[*i]),
            Action::KillAgent(i) => self.kill_agent(PG[*i]),
            Action::Restart(i) => self.restart(PG[*i]),
            Action::Freeze(i) => self.node_mut(PG[*i]).frozen = true,
            Action::Partition(i, on) => self.node_mut(PG[*i]).partitioned = *on,
            Action::Stuck(i, on) => self.node_mut(PG[*i]).stuck = *on,
            Action::Broken(i, on) => self.node_mut(PG[*i]).broken = *on,
            Action::StreamCut(i, on) => self.node_mut(PG[*i]).stream_cut = *on,
            Action::NewLeader => self.new_leader(),
            Action::Switchover(to) => {
                let to = to.map(|i| id(PG[i]));
                if let Ok(target) =
                    check_switchover(&self.cat, &self.obs, self.now, GROUP, to.as_ref())
                {
                    let outcome = self.propose(Op::Switchover {
                        group: GROUP.into(),
                        target,
                    });
                    self.log.push(format!("  -> {outcome:?}"));
                }
            }
            Action::Failover(allow_data_loss) => {
                if check_failover(&self.cat, &self.obs, self.now, GROUP, *allow_data_loss).is_ok() {
                    let outcome = self.propose(Op::Failover {
                        group: GROUP.into(),
                        allow_data_loss: *allow_data_loss,
                    });
                    self.log.push(format!("  -> {outcome:?}"));
                }
            }
            Action::Maintenance(i, enabled) => {
                let node = id(PG[*i]);
                let switchover_to = if *enabled && self.group().primary.as_ref() == Some(&node) {
                    check_switchover(&self.cat, &self.obs, self.now, GROUP, None).ok()
                } else {
                    None
                };
                let outcome = self.propose(Op::SetMaintenance {
                    node,
                    enabled: *enabled,
                    switchover_to,
                });
                self.log.push(format!("  -> {outcome:?}"));
            }
            Action::Priority(i, p) => {
                let outcome = self.propose(Op::SetNodeSettings {
                    node: id(PG[*i]),
                    candidate_priority: Some(*p),
                    replication_quorum: None,
                });
                self.log.push(format!("  -> {outcome:?}"));
            }
        }
        self.step();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_the_safety_rules(
        quorum in 1u32..3,
        failsafe_ms in prop_oneof![Just(0u64), Just(2_000), Just(60_000)],
        actions in proptest::collection::vec(action(), 1..160),
    ) {
        let mut w = World::new(&PG, &["e1"]);
        w.propose(Op::SetGroupSettings {
            group: GROUP.into(),
            settings: crate::catalog::GroupSettings {
                sync_quorum: quorum,
                failsafe_ms,
                ..Default::default()
            },
        }).unwrap();
        // Converge first so that most histories start from a replicated, synchronous group.
        w.run_until(500, 20, |w| w.group().synchronous());
        for a in &actions {
            w.perform(a);
        }
    }
}
