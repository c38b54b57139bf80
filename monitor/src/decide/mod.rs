//! The decision function: from the committed catalog and the leader's observations, compute the
//! goal changes that move each group toward one healthy, writable primary.
//!
//! `decide` is pure: no I/O, no clock reads, no randomness; `now` and every observation time are
//! `Duration`s on the leader's monotonic clock. Its output is a list of [`Decision`]s, one per
//! group that changes, each with the reasons that become events. A decision is proposed to Raft
//! and takes effect only when committed; `Catalog::apply` rejects it if the group changed since
//! (`based_on`), and re-checks the structural safety rules.
//!
//! Safety rules kept here (and checked by the property test in `sim`):
//! - A standby is promoted only after the old primary is provably unable to write: its agent
//!   reported FENCED (or DRAINING, for a switchover), or its agent is silent and its port
//!   refuses connections, or its lease ran out (`last report + lease + lease_margin`) while its
//!   port does not answer (an answering port with a silent agent is a live, unfenced database).
//! - A primary is failed on positive evidence of a crash (two missed reports and a probe, taken
//!   since the last report, that was refused), when its agent reports PostgreSQL not running
//!   for a lease, or after silence for its lease and margin while its port does not answer. A
//!   probe that times out (frozen, partitioned) never shortens anything, and silence shorter
//!   than the lease never starts a failover: a primary paused for less resumes as primary.
//! - For status displays a node is unhealthy sooner (`node_unhealthy`): an agent silent for
//!   `unhealthy_after`, a server down or a standby not streaming for as long.
//! - Promotion without `allow_data_loss` needs the committed synchronous set confirmed applied
//!   by the old primary (`SyncSet::confirmed`, replicated), at least `n - k + 1` of its `n` members stopped with final
//!   LSNs, and a candidate holding the most advanced of those LSNs (it catches up from the most
//!   advanced standby first if it does not) and at least the set's `min_lsn`.
//! - Every replication stream to the old primary is cut (STOP_REPLICATION) before promotion, so
//!   a primary alive on the far side of a partition loses its synchronous acknowledgements.
//! - A node with candidate priority 0 is never promoted; a new primary always gets a new epoch.
//! - The old primary is told to rejoin (rewind, follow) only once the new primary reported
//!   itself primary at the new epoch, so it never rewinds onto a server still on the old
//!   timeline.
//! - A new leader judges no node on silence before `unhealthy_after` has passed since it took
//!   office (silence is measured from `max(last report, leader_since)`).

mod observe;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use ha_proto::types::{Epoch, GoalState, Lsn, NodeId, NodeKind};
use tracing::info;

use crate::catalog::{
    AssignedGoal, Catalog, Decision, DecisionEvent, FailoverPhase, Group, Node, Operation,
    StandbyLoss, SwitchoverPhase, SyncSet, Timings, join,
};
pub use observe::{
    EjabberdReport, NodeObservation, Observations, PgReport, PgRole, Probe, ProbeResult, Replica,
    Report, ReportDetail, SyncState, parse_sync_standby_names, sync_standby_names,
};

/// How long a synchronous standby whose PostgreSQL is being restarted by its agent (or whose
/// primary's is) stays in the synchronous set although it does not stream: the agent restarts
/// a crashed postmaster at once, and the WAL receiver reconnects within a second or two. The
/// same as the replication timeout after which a cut link is given up, so commits wait no
/// longer than for a cut link; dropping the standby at once instead opened a window of
/// asynchronous commits in which a crash of the primary could not be failed over (10.9 s of
/// stalled writes in the 200-fault chaos run, seed 14799457871922709824, fault 158).
pub const RESTART_GRACE: Duration = Duration::from_secs(5);

/// Why the leader refuses an operator request before proposing it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("{0}")]
    NotPossible(String),
}

/// Computes the goal changes for every group.
pub fn decide(catalog: &Catalog, obs: &Observations, now: Duration) -> Vec<Decision> {
    Memo::default().decide(catalog, obs, now)
}

/// Remembers, for every group whose last decision pass changed nothing, everything that pass
/// read: the group's revision (bumped by any change to the group or its nodes), each node's
/// observation revision (bumped when its report changes, not when an identical report arrives)
/// and each node's judgements of time and probes. A group whose inputs are all unchanged would be
/// decided the same way again, so [`Memo::decide`] skips it: in a steady cluster most groups
/// are skipped, where a full pass over thousands of groups ten times a second would cost a
/// large share of the leader's CPU. The property test in `sim` checks that a memoised pass
/// always returns what a full pass returns.
#[derive(Debug, Default)]
pub struct Memo {
    /// The catalog-wide inputs the remembered groups were judged with; any change forgets all.
    basis: Option<(Timings, Duration, bool)>,
    /// The catalog's applied index at the last pass: when it moves, groups that no longer
    /// exist are forgotten (a group created again under the same name starts afresh).
    applied_index: u64,
    quiet: HashMap<String, GroupInputs>,
}

#[derive(Debug, PartialEq)]
struct GroupInputs {
    revision: u64,
    nodes: Vec<(Option<u64>, TimeJudgements)>,
}

impl Memo {
    /// [`decide`], skipping the groups whose inputs did not change since a pass that left them
    /// unchanged.
    pub fn decide(
        &mut self,
        catalog: &Catalog,
        obs: &Observations,
        now: Duration,
    ) -> Vec<Decision> {
        let judge = Judge::new(catalog.timings(), obs, now);
        let basis = (catalog.timings().clone(), obs.leader_since, judge.settled());
        if self.basis.as_ref() != Some(&basis) {
            self.quiet.clear();
            self.basis = Some(basis);
        }
        if self.applied_index != catalog.applied_index() {
            self.applied_index = catalog.applied_index();
            self.quiet.retain(|name, _| catalog.group(name).is_some());
        }
        let mut decisions = Vec::new();
        for g in catalog.groups() {
            let inputs = GroupInputs {
                revision: g.revision,
                nodes: catalog
                    .group_nodes(&g.name)
                    .map(|n| {
                        (
                            obs.node(&n.name).map(|o| o.revision),
                            judge.time(&n.name, g.settings.failsafe()),
                        )
                    })
                    .collect(),
            };
            if self.quiet.get(&g.name) == Some(&inputs) {
                continue;
            }
            match Draft::new(catalog, &judge, g).run() {
                Some(d) => {
                    self.quiet.remove(&g.name);
                    decisions.push(d);
                }
                None => {
                    self.quiet.insert(g.name.clone(), inputs);
                }
            }
        }
        decisions
    }
}

/// Why `node` does not serve its role now, for status displays; `None` when it does. Stricter
/// than what `decide` acts upon: an agent that is silent for `unhealthy_after` is unhealthy
/// even while its port answers (nothing then watches the server or renews its lease), and so
/// is a server that does not run or a standby that does not stream for `unhealthy_after`,
/// unless its goal wants it so (fenced, draining, maintenance, replication cut).
pub fn node_unhealthy(
    catalog: &Catalog,
    obs: &Observations,
    now: Duration,
    node: &NodeId,
) -> Option<String> {
    let judge = Judge::new(catalog.timings(), obs, now);
    let bound = catalog.timings().unhealthy_after;
    if !judge.reporting(node) || judge.crashed(node) {
        let seen = obs.node(node).is_some_and(|o| o.report_at.is_some());
        return Some(if seen {
            format!("agent silent: {}", judge.describe_failure(node))
        } else {
            "no report since this monitor became leader".into()
        });
    }
    let goal = catalog.node(node)?.goal.as_ref().map(|g| g.state);
    let report = judge.report(node)?;
    if let Some(e) = report.ejabberd() {
        return (!e.running).then(|| "ejabberd is not running".into());
    }
    let o = obs.node(node)?;
    let lasted = |since: Option<Duration>| {
        since
            .map(|t| now.saturating_sub(t.max(obs.leader_since)))
            .filter(|d| *d >= bound)
    };
    let expects_running = matches!(
        goal,
        Some(GoalState::Single | GoalState::Primary | GoalState::Standby)
    );
    if let Some(d) = lasted(o.down_since).filter(|_| expects_running) {
        return Some(format!("PostgreSQL not running for {d:?}"));
    }
    if let Some(d) = lasted(o.not_streaming_since).filter(|_| goal == Some(GoalState::Standby)) {
        return Some(format!("standby not streaming for {d:?}"));
    }
    if report
        .pg()
        .is_some_and(|pg| pg.role == PgRole::Primary && pg.commits_blocked)
    {
        return Some("commits do not complete (the agent's own commit check hangs)".into());
    }
    None
}

/// Whether every ejabberd node of `group` (not removed, not in maintenance) reported that it
/// serves from the group's current primary at its current epoch: the failover is then complete
/// for the XMPP service.
pub fn service_converged(catalog: &Catalog, obs: &Observations, group: &str) -> bool {
    catalog
        .group(group)
        .is_some_and(|g| g.primary.is_some() && g.operation.is_none())
        && ejabberd_behind(catalog, obs, group).is_empty()
}

/// The ejabberd nodes of `group` (not removed, not in maintenance) that have not reported
/// serving from the group's current primary at its current epoch (all of them while the group
/// has no primary).
pub fn ejabberd_behind(catalog: &Catalog, obs: &Observations, group: &str) -> Vec<NodeId> {
    let current = catalog
        .group(group)
        .and_then(|g| Some((g.epoch, g.primary.as_ref()?)));
    catalog
        .members(group)
        .filter(|n| n.kind == NodeKind::Ejabberd && !n.maintenance)
        .filter(|n| {
            let applied = obs
                .node(&n.name)
                .and_then(|o| o.report.as_ref())
                .and_then(Report::ejabberd);
            !matches!((current, applied), (Some((epoch, primary)), Some(e))
                if e.applied_epoch == epoch && e.applied_node.as_ref() == Some(primary))
        })
        .map(|n| n.name.clone())
        .collect()
}

/// Leader-side check of a switchover request; returns the target (the best standby when `to`
/// is `None`). The caller then proposes `Op::Switchover` (or `Op::SetMaintenance` with
/// `switchover_to`).
pub fn check_switchover(
    catalog: &Catalog,
    obs: &Observations,
    now: Duration,
    group: &str,
    to: Option<&NodeId>,
) -> Result<NodeId, Refusal> {
    let judge = Judge::new(catalog.timings(), obs, now);
    let g = catalog
        .group(group)
        .ok_or_else(|| Refusal::UnknownGroup(group.to_owned()))?;
    let no = |why: String| Err(Refusal::NotPossible(why));
    let Some(p) = &g.primary else {
        return no(format!("group {group} has no primary"));
    };
    if let Some(op) = &g.operation {
        return no(format!("operation in progress: {}", op.describe()));
    }
    if !judge.reporting(p) {
        return no(format!("primary {p} is not reporting: use failover"));
    }
    let why_not = |n: &Node| -> Option<String> {
        if n.kind != NodeKind::Postgres || n.name == *p {
            Some("not a standby of this group".into())
        } else if n.candidate_priority == 0 {
            Some("candidate priority is 0".into())
        } else if n.maintenance {
            Some("in maintenance".into())
        } else if !judge.reporting(&n.name) {
            Some("not healthy (agent not reporting)".into())
        } else if judge.streaming_entry(p, &n.name).is_none() {
            Some(format!("not streaming from {p}"))
        } else {
            None
        }
    };
    match to {
        Some(t) => {
            let n = catalog
                .node(t)
                .filter(|n| !n.removed && n.group == group)
                .ok_or_else(|| {
                    Refusal::NotPossible(format!("{t} is not a node of group {group}"))
                })?;
            match why_not(n) {
                Some(why) => no(format!("{t} cannot become primary: {why}")),
                None => Ok(t.clone()),
            }
        }
        None => catalog
            .members(group)
            .filter(|n| why_not(n).is_none())
            .max_by_key(|n| {
                let lsn = judge.streaming_entry(p, &n.name).map(|r| r.flush_lsn);
                (n.candidate_priority, lsn, std::cmp::Reverse(n.name.clone()))
            })
            .map(|n| n.name.clone())
            .ok_or_else(|| {
                Refusal::NotPossible(format!("no healthy standby of {group} may become primary"))
            }),
    }
}

/// Leader-side check of an operator failover: refuses when no standby can be promoted (without
/// `allow_data_loss`: none provably holding every acknowledged write).
pub fn check_failover(
    catalog: &Catalog,
    obs: &Observations,
    now: Duration,
    group: &str,
    allow_data_loss: bool,
) -> Result<(), Refusal> {
    let judge = Judge::new(catalog.timings(), obs, now);
    let g = catalog
        .group(group)
        .ok_or_else(|| Refusal::UnknownGroup(group.to_owned()))?;
    let Some(p) = &g.primary else {
        return Err(Refusal::NotPossible(format!(
            "group {group} has no primary"
        )));
    };
    stop_set(catalog, &judge, g, p, allow_data_loss)
        .map(drop)
        .map_err(Refusal::NotPossible)
}

/// Why the old primary cannot accept writes any more.
enum Evidence {
    /// It stopped, or nothing listens on its port.
    Stopped(String),
    /// Its lease ran out: it fenced itself unless its standbys still vouch for it (the
    /// failsafe, [`Judge::failsafe_holds`]).
    LeaseOut(String),
}

/// The judgements of [`Judge::time`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimeJudgements {
    reporting: bool,
    pg_down: bool,
    missed_two: bool,
    lease_out: bool,
    probed_since_report: bool,
    recent_probe: Option<ProbeResult>,
    vouch_silent: bool,
    restarting: bool,
}

/// Health judgements from observations at one instant.
struct Judge<'a> {
    timings: &'a Timings,
    obs: &'a Observations,
    now: Duration,
}

impl<'a> Judge<'a> {
    fn new(timings: &'a Timings, obs: &'a Observations, now: Duration) -> Self {
        Self { timings, obs, now }
    }

    /// Whether a full `unhealthy_after` has passed since this monitor took office.
    fn settled(&self) -> bool {
        self.now.saturating_sub(self.obs.leader_since) >= self.timings.unhealthy_after
    }

    /// Every judgement about `n` that depends on `now`, on report times or on probes: with
    /// equal judgements and equal reports, a group is decided the same way (see [`Memo`]). A
    /// new judgement that reads any of these must be added here.
    fn time(&self, n: &NodeId, failsafe: Duration) -> TimeJudgements {
        TimeJudgements {
            vouch_silent: self.vouch_silent(n, failsafe),
            restarting: self.restarting(n),
            reporting: self.reporting(n),
            pg_down: self.pg_down(n),
            missed_two: self.missed_two(n),
            lease_out: self.lease_out(n),
            probed_since_report: self.probed_since_report(n),
            recent_probe: self.recent_probe(n),
        }
    }

    /// Two reports missed: the first condition of a crash on positive evidence.
    fn missed_two(&self, n: &NodeId) -> bool {
        self.silence(n) >= self.timings.report_interval * 2
    }

    /// The lease a silent primary's agent held has run out, with its margin.
    fn lease_out(&self, n: &NodeId) -> bool {
        self.silence(n) >= self.timings.lease + self.timings.lease_margin
    }

    /// Time since the last report, counted from no earlier than `leader_since`.
    fn silence(&self, n: &NodeId) -> Duration {
        let last = self
            .obs
            .node(n)
            .and_then(|o| o.report_at)
            .unwrap_or(self.obs.leader_since)
            .max(self.obs.leader_since);
        self.now.saturating_sub(last)
    }

    /// Silent for so long that any vouch its agent may still give has ended: a standby vouches
    /// only within `failsafe` of its last answered report, each time for at most a lease.
    fn vouch_silent(&self, n: &NodeId, failsafe: Duration) -> bool {
        self.silence(n) >= failsafe + self.timings.lease + self.timings.lease_margin
    }

    /// Whether standby `m` can no longer vouch for the primary of `epoch`, nor still be bound
    /// by a vouch: it reports none binding it and has left that primary (it reached another
    /// goal than STANDBY at this epoch, STOP_REPLICATION for a failover, which its agent does
    /// only once its vouches ended and after which it refuses new ones, or it is on a newer
    /// epoch), or it has been silent past [`Self::vouch_silent`].
    fn vouch_over(&self, m: &NodeId, epoch: Epoch, failsafe: Duration) -> bool {
        let left = self.report(m).is_some_and(|r| {
            !r.vouching
                && (r.epoch > epoch
                    || (r.epoch == epoch && r.reached.is_some_and(|s| s != GoalState::Standby)))
        });
        (self.reporting(m) && left) || self.vouch_silent(m, failsafe)
    }

    /// Why the primary `p` of `g` may still serve under the failsafe although its lease ran
    /// out, or `None` when it cannot. A primary serves past its lease only while every
    /// synchronous standby of its goal vouches for it. With the committed set confirmed applied
    /// by `p`, that is this set, so one member done with vouching ends it; otherwise `p` may
    /// hold another set, and every other PostgreSQL node of the group must be done.
    fn failsafe_holds(&self, catalog: &Catalog, g: &Group, p: &NodeId) -> Option<String> {
        let failsafe = g.settings.failsafe();
        if failsafe.is_zero() || (g.sync.confirmed && g.sync.standbys.is_empty()) {
            return None;
        }
        let over = |m: &NodeId| self.vouch_over(m, g.epoch, failsafe);
        if g.sync.confirmed {
            if g.sync.standbys.iter().any(over) {
                return None;
            }
            return Some(format!(
                "{p} may still serve under the failsafe: none of its synchronous standbys ({}) has stopped, and a silent one may vouch for it for up to {:?} after its last report",
                join(&g.sync.standbys),
                failsafe + self.timings.lease + self.timings.lease_margin
            ));
        }
        let pending: BTreeSet<NodeId> = catalog
            .group_nodes(&g.name)
            .filter(|n| n.kind == NodeKind::Postgres && n.name != *p && !over(&n.name))
            .map(|n| n.name.clone())
            .collect();
        (!pending.is_empty()).then(|| {
            format!(
                "{p} may still serve under the failsafe: its synchronous set is unconfirmed and {} may vouch for it (silent ones for up to {:?} after their last report)",
                join(&pending),
                failsafe + self.timings.lease + self.timings.lease_margin
            )
        })
    }

    fn reporting(&self, n: &NodeId) -> bool {
        self.silence(n) < self.timings.unhealthy_after
    }

    /// How long the agent of `n`, still reporting, has said its PostgreSQL does not run
    /// (counted from no earlier than `leader_since`); `None` while it runs or the agent is
    /// silent (silence has rules of its own).
    fn down_for(&self, n: &NodeId) -> Option<Duration> {
        let since = self.obs.node(n)?.down_since?;
        self.reporting(n)
            .then(|| self.now.saturating_sub(since.max(self.obs.leader_since)))
    }

    /// The agent, still reporting, is restarting its PostgreSQL: the server is down for less
    /// than [`RESTART_GRACE`], or it started less than that ago (the agent says so).
    fn restarting(&self, n: &NodeId) -> bool {
        self.down_for(n).is_some_and(|d| d < RESTART_GRACE)
            || (self.reporting(n) && self.pg(n).is_some_and(|pg| pg.recently_started))
    }

    /// The agent reports for a whole lease that its PostgreSQL does not run: it crashed and
    /// cannot be restarted (restart limit, a start that fails, an unusable data directory).
    /// The same time a silent primary gets before it is replaced, and far longer than the
    /// agent's restart after a plain crash (under a second), which is never a failover.
    fn pg_down(&self, n: &NodeId) -> bool {
        self.down_for(n).is_some_and(|d| d >= self.timings.lease)
    }

    /// The latest probe, if it is recent enough to say something about now.
    fn recent_probe(&self, n: &NodeId) -> Option<ProbeResult> {
        let p = self.obs.node(n)?.probe?;
        (p.at >= self.obs.leader_since
            && self.now.saturating_sub(p.at) < self.timings.unhealthy_after)
            .then_some(p.result)
    }

    /// Down on positive evidence, without waiting for `unhealthy_after`: the agent missed two
    /// reports and a probe taken since its last report was refused (nothing listens on the
    /// PostgreSQL port). A probe that times out proves nothing (a frozen or partitioned host
    /// looks the same), so it never counts here. A new leader still waits `unhealthy_after`
    /// after taking office: agents may not have found it yet.
    fn crashed(&self, n: &NodeId) -> bool {
        self.settled()
            && self.missed_two(n)
            && self.probed_since_report(n)
            && self.recent_probe(n) == Some(ProbeResult::Refused)
    }

    /// Whether the leader probed `n` after its last report.
    fn probed_since_report(&self, n: &NodeId) -> bool {
        self.obs.node(n).is_some_and(|o| {
            o.probe
                .is_some_and(|p| o.report_at.is_none_or(|r| p.at > r))
        })
    }

    /// Crashed (positive evidence), no report for `unhealthy_after` and the probe does not
    /// answer Ok, or its agent reports PostgreSQL down for a lease ([`Self::pg_down`]).
    fn failed(&self, n: &NodeId) -> bool {
        self.crashed(n)
            || (!self.reporting(n) && self.recent_probe(n) != Some(ProbeResult::Ok))
            || self.pg_down(n)
    }

    /// Whether the primary `p` has failed: a crash on positive evidence, a silent agent whose
    /// port refuses, PostgreSQL reported down for a lease, or silence for the whole lease and
    /// its margin while the port does not answer. Silence shorter than that never starts a
    /// failover, because starting one cuts the standby's stream and fences `p`: a primary
    /// paused for less than its lease (a stalled VM, a frozen host) resumes as the primary.
    /// Waiting costs nothing, since a silent primary whose port does not refuse can only be
    /// replaced once its lease is out anyway (see [`Self::fence_evidence`]).
    fn primary_failed(&self, p: &NodeId) -> bool {
        self.crashed(p)
            || self.pg_down(p)
            || (!self.reporting(p) && self.recent_probe(p) == Some(ProbeResult::Refused))
            || (self.lease_out(p) && self.recent_probe(p) != Some(ProbeResult::Ok))
            || (crate::broken::active().lease && self.failed(p))
    }

    fn report(&self, n: &NodeId) -> Option<&'a Report> {
        self.obs.node(n)?.report.as_ref()
    }

    fn pg(&self, n: &NodeId) -> Option<&'a PgReport> {
        self.report(n)?.pg()
    }

    fn reached(&self, n: &NodeId, state: GoalState, epoch: Epoch) -> bool {
        self.report(n)
            .is_some_and(|r| r.reached == Some(state) && r.epoch >= epoch)
    }

    /// The primary's `pg_stat_replication` row for `standby`, when it is streaming.
    fn streaming_entry(&self, primary: &NodeId, standby: &NodeId) -> Option<&'a Replica> {
        self.pg(primary)?
            .replicas
            .iter()
            .find(|r| r.name == standby.as_str() && r.is_streaming())
    }

    /// Whether the primary's last report shows exactly `sync` applied.
    fn sync_applied(&self, primary: &NodeId, sync: &SyncSet) -> bool {
        let expected: Vec<String> = sync.standbys.iter().map(ToString::to_string).collect();
        self.pg(primary)
            .and_then(|pg| parse_sync_standby_names(&pg.synchronous_standby_names))
            .is_some_and(|(k, names)| k == sync.quorum && names == expected)
    }

    /// Evidence that the old primary cannot accept writes any more, or `None`.
    fn fence_evidence(&self, n: &NodeId, epoch: Epoch) -> Option<Evidence> {
        if self.reached(n, GoalState::Fenced, epoch) || self.reached(n, GoalState::Draining, epoch)
        {
            return Some(Evidence::Stopped(format!("{n} reported it stopped")));
        }
        if self.crashed(n)
            || (!self.reporting(n) && self.recent_probe(n) == Some(ProbeResult::Refused))
        {
            return Some(Evidence::Stopped(format!(
                "{n}'s agent is silent and its port refuses connections"
            )));
        }
        if crate::broken::active().lease && self.failed(n) {
            return Some(Evidence::Stopped(format!(
                "{n} failed (DELIBERATELY BROKEN: not waiting for its lease)"
            )));
        }
        // The lease is enforced by the agent; a port that still answers means the database
        // runs (perhaps with its agent dead), so an expired lease proves nothing then.
        let wait = self.timings.lease + self.timings.lease_margin;
        (self.lease_out(n) && self.recent_probe(n) != Some(ProbeResult::Ok))
            .then(|| Evidence::LeaseOut(format!("{n}'s lease expired ({wait:?} without a report)")))
    }

    fn describe_failure(&self, n: &NodeId) -> String {
        if let Some(down) = self.down_for(n).filter(|_| self.pg_down(n)) {
            let cause = self
                .report(n)
                .map(|r| r.last_error.as_str())
                .filter(|e| !e.is_empty())
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            return format!("its agent reports PostgreSQL not running for {down:?}{cause}");
        }
        let probe = match self.recent_probe(n) {
            Some(ProbeResult::Ok) => "answers",
            Some(ProbeResult::Refused) => "refused",
            Some(ProbeResult::Timeout) => "timed out",
            None => "no recent result",
        };
        format!("no report for {:?}, probe {probe}", self.silence(n))
    }
}

/// The standbys to stop for a failover away from `p`, or why there is no safe failover.
fn stop_set(
    catalog: &Catalog,
    judge: &Judge<'_>,
    g: &Group,
    p: &NodeId,
    allow_data_loss: bool,
) -> Result<BTreeSet<NodeId>, String> {
    // Only a standby on the current history (it reached a standby goal of this epoch) has WAL
    // comparable with the primary's; an old primary that has not rejoined yet does not.
    let usable = |n: &Node| {
        n.kind == NodeKind::Postgres
            && n.name != *p
            && !n.maintenance
            && judge.reporting(&n.name)
            && judge.report(&n.name).is_some_and(|r| {
                r.epoch >= g.epoch
                    && matches!(
                        r.reached,
                        Some(GoalState::Standby | GoalState::StopReplication)
                    )
            })
    };
    if allow_data_loss {
        let set: BTreeSet<NodeId> = catalog
            .members(&g.name)
            .filter(|n| usable(n))
            .map(|n| n.name.clone())
            .collect();
        if !catalog
            .members(&g.name)
            .any(|n| set.contains(&n.name) && n.candidate_priority > 0)
        {
            return Err(format!("no healthy standby of {} may be promoted", g.name));
        }
        return Ok(set);
    }
    let s = &g.sync.standbys;
    if s.is_empty() {
        return Err(format!(
            "{} has no synchronous standby, so writes acknowledged by {p} may exist only on {p}",
            g.name
        ));
    }
    if !g.sync.confirmed {
        return Err(format!(
            "{p} never reported the synchronous set ({}) applied",
            join(s)
        ));
    }
    let reachable: BTreeSet<NodeId> = catalog
        .members(&g.name)
        .filter(|n| s.contains(&n.name) && usable(n))
        .map(|n| n.name.clone())
        .collect();
    let need = s.len() - g.sync.quorum as usize + 1;
    if reachable.len() < need {
        return Err(format!(
            "only {} of the synchronous standbys ({}) are reachable, {need} needed to be sure one holds every acknowledged write",
            reachable.len(),
            join(s)
        ));
    }
    let promotable = catalog
        .members(&g.name)
        .any(|n| reachable.contains(&n.name) && n.candidate_priority > 0);
    if !promotable {
        return Err(format!(
            "no reachable synchronous standby of {} may be promoted (candidate priority 0)",
            g.name
        ));
    }
    Ok(reachable)
}

/// The decision being built for one group.
struct Draft<'a> {
    catalog: &'a Catalog,
    judge: &'a Judge<'a>,
    group: &'a Group,
    primary: Option<NodeId>,
    epoch: Epoch,
    sync: SyncSet,
    operation: Option<Operation>,
    notice: Option<String>,
    goals: Vec<(NodeId, AssignedGoal)>,
    events: Vec<DecisionEvent>,
}

impl<'a> Draft<'a> {
    fn new(catalog: &'a Catalog, judge: &'a Judge<'a>, group: &'a Group) -> Self {
        Self {
            catalog,
            judge,
            group,
            primary: group.primary.clone(),
            epoch: group.epoch,
            sync: group.sync.clone(),
            operation: group.operation.clone(),
            notice: group.notice.clone(),
            goals: Vec::new(),
            events: Vec::new(),
        }
    }

    fn run(mut self) -> Option<Decision> {
        match (self.group.primary.clone(), self.group.operation.clone()) {
            (None, _) => self.bootstrap(),
            (Some(p), None) if self.judge.primary_failed(&p) => {
                self.start_failover(&p, false, false);
            }
            (Some(p), None) => self.steady(&p),
            (
                Some(_),
                Some(Operation::Failover {
                    old_primary,
                    allow_data_loss,
                    operator,
                    phase,
                }),
            ) => self.failover(&old_primary, allow_data_loss, operator, phase),
            (
                Some(_),
                Some(Operation::Switchover {
                    old_primary,
                    target,
                    phase,
                }),
            ) => self.switchover(&old_primary, &target, phase),
        }
        self.followers();
        self.finish()
    }

    fn finish(self) -> Option<Decision> {
        let g = self.group;
        let unchanged = self.goals.is_empty()
            && self.events.is_empty()
            && self.primary == g.primary
            && self.epoch == g.epoch
            && self.sync == g.sync
            && self.operation == g.operation
            && self.notice == g.notice;
        (!unchanged).then(|| Decision {
            group: g.name.clone(),
            based_on: g.revision,
            primary: self.primary,
            epoch: self.epoch,
            sync: self.sync,
            operation: self.operation,
            notice: self.notice,
            goals: self.goals,
            events: self.events,
        })
    }

    // ----- helpers -----

    fn goal_of(&self, n: &NodeId) -> Option<&AssignedGoal> {
        self.goals
            .iter()
            .rev()
            .find(|(id, _)| id == n)
            .map(|(_, g)| g)
            .or_else(|| self.catalog.node(n)?.goal.as_ref())
    }

    fn set_goal(&mut self, n: &NodeId, goal: AssignedGoal, reason: &str) {
        if self.goal_of(n) == Some(&goal) {
            return;
        }
        let upstream = goal
            .upstream
            .as_ref()
            .map(|u| format!(" from {u}"))
            .unwrap_or_default();
        let sync = if goal.synchronous_standbys.is_empty() {
            String::new()
        } else {
            format!(
                " with {}",
                sync_standby_names(&goal.synchronous_standbys, goal.synchronous_quorum)
            )
        };
        let message = format!(
            "{n}: {}{upstream}{sync} at {}: {reason}",
            goal.state, goal.epoch
        );
        info!(group = %self.group.name, node = %n, goal = %goal.state, epoch = %goal.epoch, reason, "goal decided");
        self.events.push(DecisionEvent {
            kind: "goal".into(),
            node: Some(n.clone()),
            message,
        });
        self.goals.retain(|(id, _)| id != n);
        self.goals.push((n.clone(), goal));
    }

    fn event(&mut self, kind: &str, node: Option<&NodeId>, message: String) {
        info!(group = %self.group.name, kind, node = ?node.map(NodeId::as_str), message, "decision");
        self.events.push(DecisionEvent {
            kind: kind.into(),
            node: node.cloned(),
            message,
        });
    }

    /// Records why progress is blocked; an event only when the reason changes.
    fn set_notice(&mut self, notice: Option<String>) {
        if notice != self.notice {
            if let Some(text) = &notice {
                self.event("blocked", None, text.clone());
            }
            self.notice = notice;
        }
    }

    fn postgres_members(&self) -> Vec<&'a Node> {
        self.catalog
            .members(&self.group.name)
            .filter(|n| n.kind == NodeKind::Postgres)
            .collect()
    }

    /// Whether `n` may still be counted on to acknowledge commits: in the committed or drafted
    /// set, or named by the primary's last report.
    fn maybe_synchronous(&self, n: &NodeId) -> bool {
        let reported = self
            .primary
            .as_ref()
            .and_then(|p| self.judge.pg(p))
            .is_some_and(|pg| {
                parse_sync_standby_names(&pg.synchronous_standby_names)
                    .is_none_or(|(_, names)| names.iter().any(|x| x == n.as_str()))
            });
        self.group.sync.standbys.contains(n) || self.sync.standbys.contains(n) || reported
    }

    // ----- states -----

    fn bootstrap(&mut self) {
        if self.group.epoch > Epoch::ZERO {
            self.set_notice(Some(format!("group {} has no primary", self.group.name)));
            return;
        }
        let Some(first) = self
            .postgres_members()
            .into_iter()
            .filter(|n| !n.maintenance)
            .min_by_key(|n| (n.candidate_priority == 0, n.registered_at_index))
        else {
            return;
        };
        let p = first.name.clone();
        self.epoch = Epoch(1);
        self.primary = Some(p.clone());
        self.set_goal(
            &p,
            AssignedGoal::bare(GoalState::Single, self.epoch),
            "first node of the group",
        );
        self.event(
            "bootstrap",
            Some(&p),
            format!("{p} bootstraps group {}", self.group.name),
        );
        self.steady(&p);
    }

    /// Healthy primary, nothing in progress: keep the synchronous set and the standbys right.
    fn steady(&mut self, p: &NodeId) {
        let waiting = self.update_sync_set(p);
        self.set_notice(waiting);
        let state = match self.goal_of(p) {
            Some(g) if g.state == GoalState::Single && self.sync.standbys.is_empty() => {
                GoalState::Single
            }
            _ => GoalState::Primary,
        };
        let goal = AssignedGoal::primary(state, self.epoch, &self.sync);
        self.set_goal(p, goal, "primary of the group");
        for n in self.postgres_members() {
            if n.name == *p {
                continue;
            }
            if n.maintenance {
                if !self.maybe_synchronous(&n.name) {
                    self.set_goal(
                        &n.name,
                        AssignedGoal::bare(GoalState::Maintenance, self.epoch),
                        "operator maintenance",
                    );
                }
            } else if self
                .goal_of(&n.name)
                .is_some_and(|g| matches!(g.state, GoalState::Fenced | GoalState::Draining))
            {
                // A former primary rejoins only once `p` reports itself primary on its new
                // timeline: rewound earlier, it would find `p` still on the old timeline ("no
                // rewind required"), stream from it, and be stranded when `p`'s timeline forks
                // behind its own WAL end. (The agent refuses that case too.)
                if self.primary_reached(p) {
                    let goal = AssignedGoal::following(GoalState::Standby, self.epoch, p.clone());
                    self.set_goal(&n.name, goal, "old primary rejoins as standby");
                }
            } else {
                let goal = AssignedGoal::following(GoalState::Standby, self.epoch, p.clone());
                self.set_goal(&n.name, goal, "standby of the primary");
            }
        }
    }

    /// Keeps the synchronous set right. Returns the group's notice when commits wait for a
    /// synchronous standby that does not stream (policy [`StandbyLoss::Wait`]).
    fn update_sync_set(&mut self, p: &NodeId) -> Option<String> {
        if !self.judge.reporting(p) {
            return None;
        }
        let ppg = self.judge.pg(p).filter(|pg| pg.role == PgRole::Primary)?;
        let settings = &self.group.settings;
        let max_lag = settings.max_sync_lag_bytes;
        let mut next = BTreeSet::new();
        let mut lost = Vec::new();
        let mut waiting = Vec::new();
        for n in self.postgres_members() {
            let follows_p = self
                .goal_of(&n.name)
                .is_some_and(|g| g.state == GoalState::Standby && g.upstream.as_ref() == Some(p));
            if n.name == *p || n.maintenance || !n.replication_quorum || !follows_p {
                continue;
            }
            let entry = self.judge.streaming_entry(p, &n.name);
            let keep = if self.sync.standbys.contains(&n.name) {
                // A member stays until both sides agree it is gone: the primary no longer
                // streams to it (its `wal_sender_timeout` gave up), and its agent is silent
                // or says it is not streaming (its `wal_receiver_timeout` gave up). With the
                // `wait` policy a member whose agent still reports stays all the same. While
                // the standby's or the primary's PostgreSQL is being restarted by its agent
                // (for [`RESTART_GRACE`]), the member stays too: it reconnects in a second or
                // two, and dropping it would open a window of asynchronous commits in which a
                // crash of the primary could not be failed over.
                let silent = !self.judge.reporting(&n.name);
                let standby_gone = silent || self.judge.pg(&n.name).is_some_and(|s| !s.streaming);
                let restarting = self.judge.restarting(p) || self.judge.restarting(&n.name);
                let gone = entry.is_none() && standby_gone && !restarting;
                let wait = gone && !silent && settings.on_standby_loss == StandbyLoss::Wait;
                if wait {
                    waiting.push(format!("{} does not stream from {p}", n.name));
                } else if gone {
                    lost.push(if silent {
                        format!("{} is silent and {p} does not stream to it", n.name)
                    } else {
                        format!("{} does not stream from {p}", n.name)
                    });
                }
                !gone || wait
            } else {
                entry.is_some_and(|r| r.flush_lsn.bytes_behind(ppg.flush_lsn) <= max_lag)
            };
            if keep && !crate::broken::active().sync {
                next.insert(n.name.clone());
            }
        }
        let quorum = if next.is_empty() {
            0
        } else {
            self.group
                .settings
                .sync_quorum
                .min(u32::try_from(next.len()).unwrap_or(u32::MAX))
        };
        let lost = lost.join(", ");
        let waiting = (!waiting.is_empty()).then(|| {
            format!(
                "commits wait (policy on_standby_loss = wait): {}",
                waiting.join(", ")
            )
        });
        if next == self.sync.standbys && quorum == self.sync.quorum {
            if !self.sync.confirmed && !next.is_empty() && self.judge.sync_applied(p, &self.sync) {
                self.sync.confirmed = true;
                self.event(
                    "sync",
                    Some(p),
                    format!("{p} applied the synchronous set ({})", join(&next)),
                );
            }
            return waiting;
        }
        let was = join(&self.sync.standbys);
        let message = if next.is_empty() && !lost.is_empty() {
            format!(
                "dropped to asynchronous (policy on_standby_loss = async): {lost}; commits go on \
                 without it, and failover is refused until a standby is synchronous again (was {was})"
            )
        } else if next.is_empty() {
            format!("dropped to asynchronous: no healthy synchronous standby (was {was})")
        } else if self.sync.standbys.is_empty() {
            format!(
                "synchronous replication on: ANY {quorum} of {}",
                join(&next)
            )
        } else {
            let why = if lost.is_empty() {
                String::new()
            } else {
                format!(": {lost}")
            };
            format!(
                "synchronous set now ANY {quorum} of {} (was {was}){why}",
                join(&next)
            )
        };
        self.sync = SyncSet {
            standbys: next,
            quorum,
            min_lsn: self.sync.min_lsn.max(ppg.flush_lsn),
            confirmed: false,
        };
        self.event("sync", Some(p), message);
        waiting
    }

    fn start_failover(&mut self, p: &NodeId, allow_data_loss: bool, operator: bool) {
        let allow_data_loss = allow_data_loss || crate::broken::active().sync;
        match stop_set(self.catalog, self.judge, self.group, p, allow_data_loss) {
            Ok(stopping) => {
                let why = if operator {
                    "operator requested failover".to_owned()
                } else {
                    format!("{p} failed: {}", self.judge.describe_failure(p))
                };
                self.event(
                    "failover",
                    Some(p),
                    format!("{why}; cutting replication on {}", join(&stopping)),
                );
                self.set_notice(None);
                self.fence_and_stop(p, &stopping, &why);
                self.operation = Some(Operation::Failover {
                    old_primary: p.clone(),
                    allow_data_loss,
                    operator,
                    phase: FailoverPhase::Stopping { stopping },
                });
            }
            Err(reason) => {
                if operator {
                    self.operation = None;
                    self.event(
                        "failover_refused",
                        Some(p),
                        format!("failover refused: {reason}"),
                    );
                    if !self.judge.primary_failed(p) {
                        self.steady(p);
                    }
                } else {
                    self.set_notice(Some(format!(
                        "{p} failed but failover is refused: {reason}"
                    )));
                }
            }
        }
    }

    fn fence_and_stop(&mut self, p: &NodeId, stopping: &BTreeSet<NodeId>, why: &str) {
        self.set_goal(p, AssignedGoal::bare(GoalState::Fenced, self.epoch), why);
        for s in stopping {
            self.set_goal(
                s,
                AssignedGoal::bare(GoalState::StopReplication, self.epoch),
                "failover: cut the stream from the old primary",
            );
        }
    }

    fn failover(
        &mut self,
        p: &NodeId,
        allow_data_loss: bool,
        operator: bool,
        phase: FailoverPhase,
    ) {
        let mut stopping = match phase {
            FailoverPhase::Requested => return self.start_failover(p, allow_data_loss, operator),
            FailoverPhase::Stopping { stopping } => stopping,
            FailoverPhase::CatchingUp {
                candidate,
                from,
                target,
                stopping,
            } => {
                if !self.judge.reporting(&candidate) {
                    self.event(
                        "failover",
                        Some(&candidate),
                        format!(
                            "candidate {candidate} went silent while catching up; choosing again"
                        ),
                    );
                    self.set_goal(
                        &candidate,
                        AssignedGoal::bare(GoalState::StopReplication, self.epoch),
                        "failover: candidate lost",
                    );
                    self.operation = Some(Operation::Failover {
                        old_primary: p.clone(),
                        allow_data_loss,
                        operator,
                        phase: FailoverPhase::Stopping { stopping },
                    });
                } else if self
                    .judge
                    .pg(&candidate)
                    .is_some_and(|pg| pg.flush_lsn >= target)
                {
                    self.promote(&candidate, &format!("caught up to {target} from {from}"));
                }
                return;
            }
        };
        if allow_data_loss {
            // An upgraded failover may use every healthy standby, not only the synchronous ones.
            if let Ok(more) = stop_set(self.catalog, self.judge, self.group, p, true) {
                stopping.extend(more);
            }
        }
        self.fence_and_stop(p, &stopping, "failover in progress");
        self.operation = Some(Operation::Failover {
            old_primary: p.clone(),
            allow_data_loss,
            operator,
            phase: FailoverPhase::Stopping {
                stopping: stopping.clone(),
            },
        });
        let alive: Vec<&NodeId> = stopping
            .iter()
            .filter(|s| self.judge.reporting(s))
            .collect();
        if alive.is_empty() && self.judge.reporting(p) {
            self.operation = None;
            self.event(
                "failover_abandoned",
                Some(p),
                format!("no standby left to promote; {p} resumes as primary"),
            );
            return self.steady(p);
        }
        let stopped: Vec<(&'a Node, Lsn)> = alive
            .iter()
            .filter(|s| {
                self.judge
                    .reached(s, GoalState::StopReplication, self.epoch)
            })
            .filter_map(|s| Some((self.catalog.node(s)?, self.judge.pg(s)?.flush_lsn)))
            .collect();
        // Wait for every live standby's final LSN, except that without data loss n - k + 1
        // stopped synchronous standbys suffice: the others (at most k - 1) cannot complete an
        // acknowledgement any more, so a stuck agent does not block the failover.
        let s = &self.group.sync;
        let need = (s.standbys.len() + 1).saturating_sub(s.quorum as usize);
        let have = stopped
            .iter()
            .filter(|(n, _)| s.standbys.contains(&n.name))
            .count();
        let enough = !allow_data_loss && have >= need;
        if stopped.len() < alive.len() && !enough {
            return;
        }
        let evidence = match self.judge.fence_evidence(p, self.epoch) {
            None => return,
            Some(Evidence::Stopped(e)) => e,
            Some(Evidence::LeaseOut(e)) => {
                if let Some(why) = self.judge.failsafe_holds(self.catalog, self.group, p) {
                    return self.set_notice(Some(format!("failover waits: {why}")));
                }
                e
            }
        };
        let Some(&(_, most)) = stopped.iter().max_by_key(|(_, lsn)| *lsn) else {
            return;
        };
        let most_node = stopped
            .iter()
            .filter(|(_, lsn)| *lsn == most)
            .map(|(n, _)| n.name.clone())
            .min()
            .expect("the maximum comes from this list");
        if !allow_data_loss {
            if have < need {
                return self.set_notice(Some(format!(
                    "failover waits: {have} of the synchronous standbys ({}) stopped, {need} needed",
                    join(&s.standbys)
                )));
            }
            if most < s.min_lsn {
                return self.set_notice(Some(format!(
                    "failover waits: the most advanced standby has {most}, acknowledged writes reach {}",
                    s.min_lsn
                )));
            }
        }
        let candidate = stopped
            .iter()
            .filter(|(n, _)| n.candidate_priority > 0)
            .filter(|(n, _)| allow_data_loss || self.group.sync.standbys.contains(&n.name))
            .max_by_key(|(n, lsn)| {
                (
                    n.candidate_priority,
                    *lsn,
                    std::cmp::Reverse(n.name.clone()),
                )
            });
        let Some(&(c, lsn)) = candidate else {
            return self.set_notice(Some(
                "failover waits: no stopped standby may be promoted".into(),
            ));
        };
        let c = c.name.clone();
        if lsn >= most {
            self.promote(
                &c,
                &format!("{evidence}; {c} holds the most advanced WAL ({lsn})"),
            );
        } else {
            self.set_goal(
                &c,
                AssignedGoal::following(GoalState::Standby, self.epoch, most_node.clone()),
                "failover: catch up before promotion",
            );
            self.event(
                "failover",
                Some(&c),
                format!("{c} catches up from {most_node} to {most} before promotion"),
            );
            self.operation = Some(Operation::Failover {
                old_primary: p.clone(),
                allow_data_loss,
                operator,
                phase: FailoverPhase::CatchingUp {
                    candidate: c,
                    from: most_node,
                    target: most,
                    stopping,
                },
            });
        }
    }

    fn switchover(&mut self, p: &NodeId, target: &NodeId, phase: SwitchoverPhase) {
        if self.judge.primary_failed(p) {
            self.operation = None;
            self.event(
                "switchover_abandoned",
                Some(p),
                format!("{p} failed during switchover"),
            );
            return self.start_failover(p, false, false);
        }
        let target_ok = self.catalog.node(target).is_some_and(|n| {
            !n.removed && !n.maintenance && n.candidate_priority > 0 && self.judge.reporting(target)
        });
        match phase {
            SwitchoverPhase::Requested => {
                if !target_ok || self.judge.streaming_entry(p, target).is_none() {
                    self.operation = None;
                    self.event("switchover_refused", Some(target), format!("switchover to {target} refused: it is not healthy and streaming from {p}"));
                    return self.steady(p);
                }
                self.set_goal(
                    p,
                    AssignedGoal::bare(GoalState::Draining, self.epoch),
                    &format!("switchover to {target}"),
                );
                self.operation = Some(Operation::Switchover {
                    old_primary: p.clone(),
                    target: target.clone(),
                    phase: SwitchoverPhase::Draining,
                });
            }
            SwitchoverPhase::Draining => {
                if !target_ok {
                    self.operation = None;
                    self.event(
                        "switchover_abandoned",
                        Some(target),
                        format!("{target} is no longer healthy; {p} resumes as primary"),
                    );
                    return self.steady(p);
                }
                if !self.judge.reached(p, GoalState::Draining, self.epoch) {
                    return;
                }
                let (Some(final_lsn), Some(t_lsn)) = (
                    self.judge.pg(p).map(|pg| pg.flush_lsn),
                    self.judge.pg(target).map(|pg| pg.flush_lsn),
                ) else {
                    return;
                };
                // The drained primary is stopped, so there is no stream left to cut: promoting
                // directly saves one round trip of write unavailability.
                if t_lsn >= final_lsn {
                    self.promote(
                        target,
                        &format!("switchover: {p} drained at {final_lsn}, {target} holds it"),
                    );
                }
            }
        }
    }

    fn promote(&mut self, c: &NodeId, reason: &str) {
        let old = self.primary.clone();
        self.epoch = self.epoch.next();
        self.primary = Some(c.clone());
        let min_lsn = self.judge.pg(c).map_or(Lsn::ZERO, |pg| pg.flush_lsn);
        self.sync = SyncSet {
            min_lsn,
            ..SyncSet::default()
        };
        self.operation = None;
        self.notice = None;
        self.event(
            "promoted",
            Some(c),
            format!(
                "{c} promoted to primary at {} (was {}): {reason}",
                self.epoch,
                old.as_ref().map_or("none", NodeId::as_str)
            ),
        );
        let goal = AssignedGoal::primary(GoalState::Primary, self.epoch, &self.sync);
        self.set_goal(c, goal, reason);
        for n in self.postgres_members() {
            // The old primary keeps its fenced (or draining) goal until `c` reports itself
            // primary: see `steady`.
            if n.name == *c || (Some(&n.name) == old.as_ref() && !n.maintenance) {
                continue;
            }
            let goal = if n.maintenance {
                AssignedGoal::bare(GoalState::Maintenance, self.epoch)
            } else {
                AssignedGoal::following(GoalState::Standby, self.epoch, c.clone())
            };
            self.set_goal(&n.name, goal, "follow the new primary");
        }
    }

    /// Whether `p` reported itself writable (primary or single) at the current epoch.
    fn primary_reached(&self, p: &NodeId) -> bool {
        [GoalState::Primary, GoalState::Single]
            .into_iter()
            .any(|s| self.judge.reached(p, s, self.epoch))
    }

    /// ejabberd nodes follow the primary; removed nodes are told so once nothing waits on them.
    fn followers(&mut self) {
        let nodes: Vec<&'a Node> = self.catalog.group_nodes(&self.group.name).collect();
        for n in nodes {
            let goal = match (n.kind, n.removed, n.maintenance, &self.primary) {
                (NodeKind::Postgres, true, _, _) if !self.maybe_synchronous(&n.name) => {
                    AssignedGoal::bare(GoalState::Removed, self.epoch)
                }
                (NodeKind::Postgres, _, _, _) => continue,
                (NodeKind::Ejabberd, true, _, _) => {
                    AssignedGoal::bare(GoalState::Removed, self.epoch)
                }
                (NodeKind::Ejabberd, false, true, _) => {
                    AssignedGoal::bare(GoalState::Maintenance, self.epoch)
                }
                (NodeKind::Ejabberd, false, false, Some(p)) => {
                    // Re-point ejabberd only once the primary of this epoch accepts writes:
                    // before that its verifying write fails (the server is still in recovery)
                    // and the agent would only retry later.
                    if !self.primary_reached(p) {
                        continue;
                    }
                    AssignedGoal::following(GoalState::Follow, self.epoch, p.clone())
                }
                (NodeKind::Ejabberd, false, false, None) => continue,
            };
            // A removed node keeps its REMOVED goal at the epoch it was removed.
            if goal.state == GoalState::Removed
                && n.goal
                    .as_ref()
                    .is_some_and(|g| g.state == GoalState::Removed)
            {
                continue;
            }
            let why = match goal.state {
                GoalState::Removed => "removed by the operator",
                GoalState::Maintenance => "operator maintenance",
                _ => "serve from the current primary",
            };
            self.set_goal(&n.name, goal, why);
        }
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
