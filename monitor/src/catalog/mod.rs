//! The replicated catalog: the deterministic state machine that every monitor applies from the
//! Raft log.
//!
//! Invariants kept by [`Catalog::apply`] (each command is validated first and a rejection
//! changes nothing but the memory of its request id):
//! - `apply` is a pure function of the catalog and the command: time comes from the command's
//!   `at_unix_ms` (the proposer's clock), never from the machine applying it, and no randomness.
//! - A request id seen before returns the earlier outcome; the command is applied once.
//! - A group never has two nodes with a writable goal (SINGLE/PRIMARY), and the one it has is
//!   the group's primary at the group's epoch. Epochs never decrease, and a node with candidate
//!   priority 0 is never given a new epoch's writable goal (bootstrap of epoch 1 aside).
//! - Every change to a group or to one of its nodes bumps the group's `revision`; a
//!   [`Decision`] computed from an older revision is rejected as stale, so a decision is always
//!   applied to exactly the state it was computed from.
//! - Join tokens are kept only as SHA-256 hashes and are consumed at most once.
//! - Every node certificate the leader signs (at join, at renewal) is recorded by its serial
//!   until it expires; removing a node revokes all of its recorded certificates, and a revoked
//!   serial stays refused until the certificate has expired, after which its entry is dropped.
//!
//! The maps and histories are persistent (structurally shared) collections from `imbl`, so
//! `clone()` costs O(1) and a write after a clone copies only the O(log n) path it touches: the
//! state machine publishes a clone after every applied batch (read-your-writes for every
//! proposer) without paying for the whole catalog each time. They serialize as the same JSON
//! maps and arrays as the standard collections, so the snapshot format (version 1) is unchanged. Expired join tokens
//! are swept through an expiry index, and per-group queries go through a group index, instead
//! of scans of every token or node, and retried request ids are recognised through a hash index
//! of the request memory (all three indexes are derived, not serialized, rebuilt on load).

pub mod token;

use std::collections::BTreeSet;
use std::time::Duration;

use ha_proto::convert::Goal;
use ha_proto::types::{Endpoint, Epoch, GoalState, Lsn, NodeId, NodeKind};
use imbl::{HashMap, OrdMap, OrdSet, Vector};
use serde::{Deserialize, Serialize};
use tracing::info;

/// Version of the serialized form written by [`Catalog::to_bytes`].
pub const FORMAT_VERSION: u32 = 1;
/// How many events the catalog keeps (oldest dropped first).
pub const EVENT_HISTORY: usize = 1000;
/// How many recent request ids (with their outcome) the catalog remembers for idempotence.
pub const REQUEST_MEMORY: usize = 1000;
/// Default candidate priority of a new node.
pub const DEFAULT_PRIORITY: u32 = 50;

/// Failure timings, replicated so every monitor judges with the same numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// How often agents report.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// Silence after which a node counts as unhealthy (if the probe fails too).
    #[serde(with = "humantime_serde")]
    pub unhealthy_after: Duration,
    /// A primary's agent that could not renew for this long stops accepting writes.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Extra wait on top of the lease before the monitor assumes an unreachable primary has
    /// fenced itself. Must cover clock-rate skew and a deposed monitor leader that still renews
    /// leases until check-quorum makes it step down (one election timeout).
    #[serde(with = "humantime_serde")]
    pub lease_margin: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            report_interval: Duration::from_millis(500),
            unhealthy_after: Duration::from_millis(1500),
            lease: Duration::from_secs(3),
            lease_margin: Duration::from_secs(1),
        }
    }
}

impl Timings {
    /// Checks the relations the safety argument relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.report_interval.is_zero() {
            return Err("report_interval must be positive".into());
        }
        if self.unhealthy_after < self.report_interval * 2 {
            return Err("unhealthy_after must be at least two report intervals".into());
        }
        if self.lease <= self.unhealthy_after {
            return Err("lease must be longer than unhealthy_after".into());
        }
        if self.lease_margin < self.report_interval {
            return Err("lease_margin must be at least one report interval".into());
        }
        Ok(())
    }
}

/// Per-group replication settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSettings {
    /// How many synchronous standbys must acknowledge a commit (`ANY k`), capped at the number
    /// of healthy quorum standbys.
    pub sync_quorum: u32,
    /// A standby joins the synchronous set only when its flush LSN is at most this many bytes
    /// behind the primary's.
    pub max_sync_lag_bytes: u64,
    /// What happens when a synchronous standby stops streaming while its agent still reports.
    #[serde(default)]
    pub on_standby_loss: StandbyLoss,
    /// How long (ms) after its last answered report a synchronous standby that cannot reach a
    /// monitor leader may still vouch for its primary, which then keeps serving past its
    /// lease (0: off). The cost: a failover that finds every synchronous standby silent waits
    /// this long plus a lease and its margin (see `decide`'s failsafe rule).
    #[serde(default = "default_failsafe_ms")]
    pub failsafe_ms: u64,
}

/// One minute: a monitor outage (two of three monitors restarting, a partition of the monitor
/// network) costs no writes for that long; the price is paid only by a data-loss failover that
/// finds every synchronous standby silent.
fn default_failsafe_ms() -> u64 {
    60_000
}

/// The longest failsafe bound accepted: one hour.
pub const MAX_FAILSAFE_MS: u64 = 3_600_000;

impl GroupSettings {
    pub fn failsafe(&self) -> Duration {
        Duration::from_millis(self.failsafe_ms)
    }
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            sync_quorum: 1,
            max_sync_lag_bytes: 16 * 1024 * 1024,
            on_standby_loss: StandbyLoss::default(),
            failsafe_ms: default_failsafe_ms(),
        }
    }
}

/// The policy for a synchronous standby whose replication stream is gone (the primary's
/// `wal_sender_timeout` and the standby's `wal_receiver_timeout` both gave up on it) while
/// its agent still reports: a cut link between the two, or a standby whose WAL receiver
/// cannot connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StandbyLoss {
    /// pg_auto_failover's behaviour: the standby leaves the synchronous set, commits go on
    /// without it, and failover to it is refused until it has caught up and is synchronous
    /// again.
    #[default]
    Async,
    /// Commits wait until the standby streams again, so no acknowledged write ever exists on
    /// one node only; the group's notice says that commits wait.
    Wait,
}

impl StandbyLoss {
    pub fn as_str(self) -> &'static str {
        match self {
            StandbyLoss::Async => "async",
            StandbyLoss::Wait => "wait",
        }
    }
}

impl std::str::FromStr for StandbyLoss {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "async" => Ok(StandbyLoss::Async),
            "wait" => Ok(StandbyLoss::Wait),
            other => Err(format!(
                "on_standby_loss must be \"async\" or \"wait\", not {other:?}"
            )),
        }
    }
}

/// The committed synchronous replication configuration of a group's primary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSet {
    /// Empty: asynchronous.
    pub standbys: BTreeSet<NodeId>,
    pub quorum: u32,
    /// The primary's flush LSN when this set was chosen. Writes acknowledged before that (under
    /// an older set, or asynchronously) are provably held only by a standby that reached it, so
    /// a candidate must have at least this LSN to be promoted without data loss.
    pub min_lsn: Lsn,
    /// The primary reported this exact set applied. Replicated (one write per set change) so
    /// that a monitor leader elected just as the primary dies still knows it.
    pub confirmed: bool,
}

/// A failover or switchover in progress, with what it waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Failover {
        old_primary: NodeId,
        allow_data_loss: bool,
        /// Requested by an operator rather than triggered by failed health checks.
        operator: bool,
        phase: FailoverPhase,
    },
    Switchover {
        old_primary: NodeId,
        target: NodeId,
        phase: SwitchoverPhase,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverPhase {
    /// Operator intent recorded; the next decision starts the failover.
    Requested,
    /// Old primary told FENCED, these standbys told STOP_REPLICATION; waiting for their final
    /// LSNs and for proof that the old primary cannot write.
    Stopping { stopping: BTreeSet<NodeId> },
    /// The chosen candidate streams from a more advanced standby until it holds `target`.
    CatchingUp {
        candidate: NodeId,
        from: NodeId,
        target: Lsn,
        stopping: BTreeSet<NodeId>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchoverPhase {
    /// Operator intent recorded; the next decision drains the primary.
    Requested,
    /// Old primary told DRAINING; waiting for it to stop and the target to hold its last LSN.
    Draining,
}

impl Operation {
    pub fn old_primary(&self) -> &NodeId {
        match self {
            Operation::Failover { old_primary, .. } | Operation::Switchover { old_primary, .. } => {
                old_primary
            }
        }
    }

    /// Whether `node` has a role in this operation (besides the old primary).
    pub fn involves(&self, node: &NodeId) -> bool {
        match self {
            Operation::Switchover { target, .. } => target == node,
            Operation::Failover { phase, .. } => match phase {
                FailoverPhase::Requested => false,
                FailoverPhase::Stopping { stopping } => stopping.contains(node),
                FailoverPhase::CatchingUp {
                    stopping,
                    candidate,
                    ..
                } => candidate == node || stopping.contains(node),
            },
        }
    }

    /// One line for `haclt status`: what the operation waits for.
    pub fn describe(&self) -> String {
        match self {
            Operation::Failover {
                old_primary,
                allow_data_loss,
                phase,
                ..
            } => {
                let loss = if *allow_data_loss {
                    " (data loss allowed)"
                } else {
                    ""
                };
                match phase {
                    FailoverPhase::Requested => {
                        format!("failover from {old_primary} requested{loss}")
                    }
                    FailoverPhase::Stopping { stopping } => format!(
                        "failover from {old_primary}{loss}: waiting for {} to stop replicating and for {old_primary} to be fenced",
                        join(stopping)
                    ),
                    FailoverPhase::CatchingUp {
                        candidate,
                        from,
                        target,
                        ..
                    } => format!(
                        "failover from {old_primary}{loss}: {candidate} catching up to {target} from {from}"
                    ),
                }
            }
            Operation::Switchover {
                old_primary,
                target,
                phase,
            } => match phase {
                SwitchoverPhase::Requested => {
                    format!("switchover {old_primary} -> {target} requested")
                }
                SwitchoverPhase::Draining => format!(
                    "switchover {old_primary} -> {target}: waiting for {old_primary} to drain and {target} to receive its last WAL"
                ),
            },
        }
    }
}

pub(crate) fn join(nodes: &BTreeSet<NodeId>) -> String {
    if nodes.is_empty() {
        return "(none)".into();
    }
    nodes
        .iter()
        .map(NodeId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A replication group: one primary and its standbys, plus the ejabberd nodes that follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub primary: Option<NodeId>,
    pub epoch: Epoch,
    pub sync: SyncSet,
    pub operation: Option<Operation>,
    pub settings: GroupSettings,
    /// Why the decision function is currently blocked (e.g. failover refused), if it is.
    pub notice: Option<String>,
    pub revision: u64,
}

impl Group {
    fn new(name: String) -> Self {
        Self {
            name,
            primary: None,
            epoch: Epoch::ZERO,
            sync: SyncSet::default(),
            operation: None,
            settings: GroupSettings::default(),
            notice: None,
            revision: 0,
        }
    }

    pub fn synchronous(&self) -> bool {
        !self.sync.standbys.is_empty()
    }
}

/// The goal assigned to a node, with its upstream by name (the endpoint is looked up when the
/// goal is served, so a re-registered endpoint is picked up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedGoal {
    pub state: GoalState,
    pub epoch: Epoch,
    pub upstream: Option<NodeId>,
    pub synchronous_standbys: Vec<NodeId>,
    pub synchronous_quorum: u32,
}

impl AssignedGoal {
    /// A goal without upstream or synchronous standbys.
    pub fn bare(state: GoalState, epoch: Epoch) -> Self {
        Self {
            state,
            epoch,
            upstream: None,
            synchronous_standbys: Vec::new(),
            synchronous_quorum: 0,
        }
    }

    pub fn following(state: GoalState, epoch: Epoch, upstream: NodeId) -> Self {
        Self {
            upstream: Some(upstream),
            ..Self::bare(state, epoch)
        }
    }

    pub fn primary(state: GoalState, epoch: Epoch, sync: &SyncSet) -> Self {
        Self {
            synchronous_standbys: sync.standbys.iter().cloned().collect(),
            synchronous_quorum: sync.quorum,
            ..Self::bare(state, epoch)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: NodeId,
    pub kind: NodeKind,
    pub group: String,
    pub endpoint: Endpoint,
    pub candidate_priority: u32,
    pub replication_quorum: bool,
    pub maintenance: bool,
    pub removed: bool,
    pub goal: Option<AssignedGoal>,
    /// Raft index of the registration: the first registered node bootstraps its group.
    pub registered_at_index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    pub secret_sha256_hex: String,
    pub kind: NodeKind,
    pub group: String,
    pub expires_at_unix_ms: u64,
    pub used: bool,
    /// The node the token admits, and the address it serves on. `None` only in tokens made
    /// before tokens were bound to a node: such a token admits nobody.
    #[serde(default)]
    pub node: Option<NodeId>,
    #[serde(default)]
    pub address: Option<String>,
}

/// What a valid token allows: one node, of one kind, in one group, at one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub id: String,
    pub kind: NodeKind,
    pub group: String,
    pub node: NodeId,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token is malformed")]
    Malformed,
    #[error("join token is unknown or revoked")]
    Unknown,
    #[error("join token does not match")]
    Mismatch,
    #[error("join token was already used")]
    Used,
    #[error("join token expired")]
    Expired,
    #[error("join token was not used yet")]
    Unused,
    #[error(
        "join token names no node (made before tokens were bound to one): create a new one with --node and --address"
    )]
    Unbound,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub kind: String,
    pub node: Option<NodeId>,
    pub group: Option<String>,
    pub epoch: Epoch,
    pub message: String,
}

/// An event the decision function wants recorded with its changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionEvent {
    pub kind: String,
    pub node: Option<NodeId>,
    pub message: String,
}

/// The output of `decide` for one group: the complete new group state plus the goals that
/// change, computed from the group at `based_on` revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub group: String,
    pub based_on: u64,
    pub primary: Option<NodeId>,
    pub epoch: Epoch,
    pub sync: SyncSet,
    pub operation: Option<Operation>,
    pub notice: Option<String>,
    pub goals: Vec<(NodeId, AssignedGoal)>,
    pub events: Vec<DecisionEvent>,
}

impl Decision {
    /// Wraps the decision into a command for the Raft log.
    pub fn into_command(self, request_id: String, at_unix_ms: u64) -> Command {
        Command {
            request_id,
            at_unix_ms,
            op: Op::Decide(self),
        }
    }
}

/// A node certificate the cluster CA signed, as named in a command (serial: lowercase hex of
/// its DER bytes, [`ha_pki::serial_hex`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    pub serial: String,
    pub not_after_unix_ms: u64,
    /// [`ha_pki::CertInfo::public_key_sha256`]: a retried join is answered only for the key
    /// the node joined with. Empty in certificates recorded before keys were.
    #[serde(default)]
    pub public_key_sha256: String,
}

/// A recorded node certificate, kept until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub node: NodeId,
    pub not_after_unix_ms: u64,
    /// See [`IssuedCertificate::public_key_sha256`].
    #[serde(default)]
    pub public_key_sha256: String,
    /// When it was revoked (proposer's clock); `None` while it is valid.
    pub revoked_at_unix_ms: Option<u64>,
}

/// How a node registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Registration {
    /// Through `Join`: the leader verified the plaintext; applying consumes the token.
    JoinToken { token_id: String },
    /// From the operator's topology (ha-provision); re-registering identical data is a no-op.
    Config,
}

/// A mutation of the catalog. `request_id` makes retries idempotent; `at_unix_ms` is the
/// proposer's wall clock and the only time `apply` knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub request_id: String,
    pub at_unix_ms: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    RegisterNode {
        node: NodeId,
        kind: NodeKind,
        group: String,
        endpoint: Endpoint,
        source: Registration,
        /// The certificate the leader signed for the joining node's CSR, if it signed one.
        #[serde(default)]
        certificate: Option<IssuedCertificate>,
    },
    /// A renewed certificate of a registered node (`AgentService/Renew`).
    RecordCertificate {
        node: NodeId,
        certificate: IssuedCertificate,
    },
    /// The operator revokes one recorded certificate (`haclt cert revoke`).
    RevokeCertificate {
        serial: String,
    },
    CreateToken {
        token_id: String,
        secret_sha256_hex: String,
        kind: NodeKind,
        group: String,
        expires_at_unix_ms: u64,
        /// The node the token admits and its address (checked by the leader before proposing).
        #[serde(default)]
        node: Option<NodeId>,
        #[serde(default)]
        address: Option<String>,
    },
    RevokeToken {
        token_id: String,
    },
    /// Goal changes computed by `decide`.
    Decide(Decision),
    /// Planned switchover to `target` (chosen and health-checked by the leader with
    /// `decide::check_switchover`).
    Switchover {
        group: String,
        target: NodeId,
    },
    /// Operator failover: fence the primary and promote the best standby, even one not known
    /// to hold every acknowledged write when `allow_data_loss`.
    Failover {
        group: String,
        allow_data_loss: bool,
    },
    /// Maintenance on/off. Enabling it on the primary needs `switchover_to` (from
    /// `decide::check_switchover`): the primary is switched over first.
    SetMaintenance {
        node: NodeId,
        enabled: bool,
        switchover_to: Option<NodeId>,
    },
    SetNodeSettings {
        node: NodeId,
        candidate_priority: Option<u32>,
        replication_quorum: Option<bool>,
    },
    RemoveNode {
        node: NodeId,
    },
    RecordEvent {
        kind: String,
        node: Option<NodeId>,
        group: Option<String>,
        message: String,
    },
    SetTimings(Timings),
    SetGroupSettings {
        group: String,
        settings: GroupSettings,
    },
}

/// The outcome of an applied command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub index: u64,
    /// The epoch of the group concerned (zero when the command concerns no group).
    pub epoch: Epoch,
    pub message: String,
}

/// Why a command was rejected; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejected {
    #[error("request id is empty")]
    MissingRequestId,
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("node {0} is already registered with different settings")]
    NodeExists(NodeId),
    #[error("join token {id}: {reason}")]
    Token { id: String, reason: String },
    #[error("join token {0} already exists")]
    TokenExists(String),
    #[error(
        "decision for group {group} was computed at revision {based_on}, group is at {current}"
    )]
    StaleDecision {
        group: String,
        based_on: u64,
        current: u64,
    },
    #[error("group {group} already has an operation in progress: {operation}")]
    OperationInProgress { group: String, operation: String },
    #[error("{0}")]
    NotEligible(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("decision would break a safety rule: {0}")]
    Unsafe(String),
}

/// A Unix time in milliseconds as RFC 3339 (UTC, seconds), for messages.
pub fn unix_ms_text(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl Rejected {
    fn token(id: &str, e: TokenError) -> Self {
        Rejected::Token {
            id: id.to_owned(),
            reason: e.to_string(),
        }
    }
}

pub type Outcome = Result<Applied, Rejected>;

/// Why stored bytes could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("catalog format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    Version(u32),
    #[error("catalog bytes are not valid: {0}")]
    Decode(#[from] serde_json::Error),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    groups: OrdMap<String, Group>,
    nodes: OrdMap<NodeId, Node>,
    tokens: OrdMap<String, JoinToken>,
    /// `(expires_at_unix_ms, token id)` of every entry of `tokens`, so the expiry sweep visits
    /// only expired tokens. Derived from `tokens`: not serialized, rebuilt by `from_bytes`.
    #[serde(skip)]
    token_expiry: OrdSet<(u64, String)>,
    /// The names of every node of each group, removed ones included, so that per-group
    /// queries (the decision function asks them for every group, every tick) cost the group's
    /// size, not the catalog's. Derived from `nodes`: not serialized, rebuilt by `from_bytes`.
    #[serde(skip)]
    group_nodes: OrdMap<String, OrdSet<NodeId>>,
    /// Every node certificate signed by the leader that has not expired yet, by serial.
    #[serde(default)]
    certificates: OrdMap<String, Certificate>,
    timings: Timings,
    events: Vector<Event>,
    next_event_seq: u64,
    /// The last [`REQUEST_MEMORY`] request ids with their outcomes, oldest first: the order in
    /// which they are forgotten.
    recent_requests: Vector<(String, Outcome)>,
    /// The same ids and outcomes keyed by id, so that recognising a retried proposal costs one
    /// hash lookup instead of a scan of the ring on every command. Derived from
    /// `recent_requests` (ids in the ring are unique: a known id is never pushed again): not
    /// serialized, rebuilt by `from_bytes`. Only looked up, never iterated, so the per-process
    /// hash seed cannot make replicas differ.
    #[serde(skip)]
    request_outcomes: HashMap<String, Outcome>,
    applied_index: u64,
}

#[derive(Serialize)]
struct VersionedRef<'a> {
    version: u32,
    catalog: &'a Catalog,
}

#[derive(Deserialize)]
struct VersionProbe {
    version: u32,
}

#[derive(Deserialize)]
struct Versioned {
    catalog: Catalog,
}

impl Catalog {
    pub fn new() -> Self {
        Self {
            next_event_seq: 1,
            ..Self::default()
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&VersionedRef {
            version: FORMAT_VERSION,
            catalog: self,
        })
        .expect("the catalog holds only string-keyed maps and plain data, which always serialize")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LoadError> {
        let probe: VersionProbe = serde_json::from_slice(bytes)?;
        if probe.version != FORMAT_VERSION {
            return Err(LoadError::Version(probe.version));
        }
        let mut catalog = serde_json::from_slice::<Versioned>(bytes)?.catalog;
        catalog.rebuild_indexes();
        Ok(catalog)
    }

    /// Derives the indexes that are not serialized from the collections that are.
    fn rebuild_indexes(&mut self) {
        self.token_expiry = self
            .tokens
            .iter()
            .map(|(id, t)| (t.expires_at_unix_ms, id.clone()))
            .collect();
        self.group_nodes = OrdMap::new();
        for n in self.nodes.values() {
            self.group_nodes
                .entry(n.group.clone())
                .or_default()
                .insert(n.name.clone());
        }
        self.request_outcomes = self.recent_requests.iter().cloned().collect();
    }

    // ----- queries -----

    /// The recorded certificate with this serial, while it has not expired.
    pub fn certificate(&self, serial: &str) -> Option<&Certificate> {
        self.certificates.get(serial)
    }

    /// Whether `node` holds a certificate for the key `public_key_sha256` that is valid at
    /// `now_unix_ms` (recorded, not expired, not revoked).
    pub fn holds_key(&self, node: &NodeId, public_key_sha256: &str, now_unix_ms: u64) -> bool {
        !public_key_sha256.is_empty()
            && self.certificates.values().any(|c| {
                &c.node == node
                    && c.public_key_sha256 == public_key_sha256
                    && c.not_after_unix_ms > now_unix_ms
                    && c.revoked_at_unix_ms.is_none()
            })
    }

    /// Every recorded certificate (valid and revoked) by serial.
    pub fn certificates(&self) -> impl Iterator<Item = (&String, &Certificate)> {
        self.certificates.iter()
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.get(name)
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// Every node, removed ones included (they keep their REMOVED goal).
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// Every node of one group, removed ones included, in name order.
    pub fn group_nodes<'a>(&'a self, group: &str) -> impl Iterator<Item = &'a Node> + use<'a> {
        self.group_nodes
            .get(group)
            .into_iter()
            .flatten()
            // The index and the map change together (`register`), so every name resolves.
            .filter_map(|name| self.nodes.get(name))
    }

    /// The nodes of one group that are not removed, in name order.
    pub fn members<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.group_nodes(group).filter(|n| !n.removed)
    }

    /// The goal of `node` in wire-ready domain form, if it has one.
    pub fn goal(&self, node: &NodeId) -> Option<Goal> {
        let n = self.nodes.get(node)?;
        let g = n.goal.as_ref()?;
        let upstream = match &g.upstream {
            Some(up) => Some((up.clone(), self.nodes.get(up)?.endpoint.clone())),
            None => None,
        };
        Some(Goal {
            node: node.clone(),
            state: g.state,
            epoch: g.epoch,
            upstream,
            synchronous_standbys: g.synchronous_standbys.clone(),
            synchronous_quorum: g.synchronous_quorum,
        })
    }

    /// Events with a sequence number above `after_seq`, oldest first, at most `limit`.
    pub fn events_after(&self, after_seq: u64, limit: usize) -> impl Iterator<Item = &Event> {
        self.events
            .iter()
            .filter(move |e| e.seq > after_seq)
            .take(limit)
    }

    /// Checks a plaintext join token at `now_unix_ms` without consuming it.
    pub fn verify_token(
        &self,
        plaintext: &str,
        now_unix_ms: u64,
    ) -> Result<TokenGrant, TokenError> {
        self.check_token(plaintext, now_unix_ms, false)
    }

    /// Like [`Catalog::verify_token`] for a token that was used already: what it granted, for
    /// answering a retried join again (its first answer may have been lost on the way). The
    /// caller must check that the retry comes from the node that joined (its key).
    pub fn verify_used_token(
        &self,
        plaintext: &str,
        now_unix_ms: u64,
    ) -> Result<TokenGrant, TokenError> {
        self.check_token(plaintext, now_unix_ms, true)
    }

    fn check_token(
        &self,
        plaintext: &str,
        now_unix_ms: u64,
        used: bool,
    ) -> Result<TokenGrant, TokenError> {
        let (id, secret) = token::parse(plaintext).ok_or(TokenError::Malformed)?;
        let t = self.tokens.get(id).ok_or(TokenError::Unknown)?;
        if !token::hashes_equal(&token::hash_secret(secret), &t.secret_sha256_hex) {
            return Err(TokenError::Mismatch);
        }
        if used {
            if !t.used {
                return Err(TokenError::Unused);
            }
            if now_unix_ms >= t.expires_at_unix_ms {
                return Err(TokenError::Expired);
            }
        } else {
            Self::token_usable(t, now_unix_ms)?;
        }
        let (Some(node), Some(address)) = (&t.node, &t.address) else {
            return Err(TokenError::Unbound);
        };
        Ok(TokenGrant {
            id: t.id.clone(),
            kind: t.kind,
            group: t.group.clone(),
            node: node.clone(),
            address: address.clone(),
        })
    }

    fn token_usable(t: &JoinToken, now_unix_ms: u64) -> Result<(), TokenError> {
        if t.used {
            return Err(TokenError::Used);
        }
        if now_unix_ms >= t.expires_at_unix_ms {
            return Err(TokenError::Expired);
        }
        Ok(())
    }

    // ----- apply -----

    /// Applies the command committed at Raft `index`. Deterministic and idempotent.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Outcome {
        self.applied_index = self.applied_index.max(index);
        if cmd.request_id.is_empty() {
            return Err(Rejected::MissingRequestId);
        }
        if let Some(earlier) = self.request_outcomes.get(&cmd.request_id) {
            return earlier.clone();
        }
        // Every operation validates fully before its first write, so a rejection leaves the
        // catalog as it was (apart from the applied index and this request's memory).
        let outcome = self.apply_op(index, cmd);
        match &outcome {
            Ok(a) => {
                info!(index, request = %cmd.request_id, epoch = %a.epoch, message = %a.message, "applied")
            }
            Err(r) => info!(index, request = %cmd.request_id, reason = %r, "rejected"),
        }
        self.recent_requests
            .push_back((cmd.request_id.clone(), outcome.clone()));
        self.request_outcomes
            .insert(cmd.request_id.clone(), outcome.clone());
        while self.recent_requests.len() > REQUEST_MEMORY {
            if let Some((forgotten, _)) = self.recent_requests.pop_front() {
                self.request_outcomes.remove(&forgotten);
            }
        }
        outcome
    }

    fn applied(&self, index: u64, group: Option<&str>, message: impl Into<String>) -> Outcome {
        let epoch = group
            .and_then(|g| self.groups.get(g))
            .map_or(Epoch::ZERO, |g| g.epoch);
        Ok(Applied {
            index,
            epoch,
            message: message.into(),
        })
    }

    fn push_event(
        &mut self,
        at: u64,
        kind: &str,
        node: Option<&NodeId>,
        group: Option<&str>,
        message: String,
    ) {
        let epoch = group
            .and_then(|g| self.groups.get(g))
            .map_or(Epoch::ZERO, |g| g.epoch);
        let seq = self.next_event_seq.max(1);
        self.next_event_seq = seq + 1;
        self.events.push_back(Event {
            seq,
            at_unix_ms: at,
            kind: kind.to_owned(),
            node: node.cloned(),
            group: group.map(str::to_owned),
            epoch,
            message,
        });
        while self.events.len() > EVENT_HISTORY {
            self.events.pop_front();
        }
    }

    /// Drops every token that expired at `at` (expiry at or before it), oldest first:
    /// O(expired · log tokens) rather than a scan of all tokens.
    fn sweep_expired_tokens(&mut self, at: u64) {
        while self
            .token_expiry
            .get_min()
            .is_some_and(|(expires, _)| *expires <= at)
        {
            let (_, id) = self
                .token_expiry
                .remove_min()
                .expect("the loop condition saw a minimum");
            self.tokens.remove(&id);
        }
    }

    /// Records a certificate signed for `node`, dropping the expired ones first (this bounds
    /// the map by the certificates valid at one time).
    fn record_certificate(&mut self, at: u64, node: &NodeId, c: &IssuedCertificate) {
        self.sweep_expired_certificates(at);
        self.certificates.insert(
            c.serial.clone(),
            Certificate {
                node: node.clone(),
                not_after_unix_ms: c.not_after_unix_ms,
                public_key_sha256: c.public_key_sha256.clone(),
                revoked_at_unix_ms: None,
            },
        );
    }

    fn revoke(&mut self, at: u64, serial: &str) {
        if let Some(c) = self.certificates.get_mut(serial) {
            c.revoked_at_unix_ms = Some(at);
        }
    }

    /// Drops every certificate that expired at `at`: an expired certificate is refused by
    /// every TLS handshake, so neither its record nor its revocation matters any more.
    fn sweep_expired_certificates(&mut self, at: u64) {
        let expired: Vec<String> = self
            .certificates
            .iter()
            .filter(|(_, c)| c.not_after_unix_ms <= at)
            .map(|(serial, _)| serial.clone())
            .collect();
        for serial in expired {
            self.certificates.remove(&serial);
        }
    }

    fn bump(&mut self, group: &str) {
        if let Some(g) = self.groups.get_mut(group) {
            g.revision += 1;
        }
    }

    fn live_node(&self, id: &NodeId) -> Result<&Node, Rejected> {
        match self.nodes.get(id) {
            Some(n) if !n.removed => Ok(n),
            _ => Err(Rejected::UnknownNode(id.clone())),
        }
    }

    fn group_ref(&self, name: &str) -> Result<&Group, Rejected> {
        self.groups
            .get(name)
            .ok_or_else(|| Rejected::UnknownGroup(name.to_owned()))
    }

    fn idle_group(&self, name: &str) -> Result<&Group, Rejected> {
        let g = self.group_ref(name)?;
        match &g.operation {
            Some(op) => Err(Rejected::OperationInProgress {
                group: name.to_owned(),
                operation: op.describe(),
            }),
            None => Ok(g),
        }
    }

    /// The deterministic part of switchover eligibility (health is checked by the leader).
    fn check_switchover_target(&self, group: &str, target: &NodeId) -> Result<NodeId, Rejected> {
        let g = self.idle_group(group)?;
        let primary = g
            .primary
            .clone()
            .ok_or_else(|| Rejected::NotEligible(format!("group {group} has no primary")))?;
        let t = self.live_node(target)?;
        let refuse = |why: &str| {
            Err(Rejected::NotEligible(format!(
                "{target} cannot become primary: {why}"
            )))
        };
        if t.group != group || t.kind != NodeKind::Postgres {
            return refuse("not a postgres node of this group");
        }
        if *target == primary {
            return refuse("it is already the primary");
        }
        if t.candidate_priority == 0 {
            return refuse("candidate priority is 0");
        }
        if t.maintenance {
            return refuse("it is in maintenance");
        }
        Ok(primary)
    }

    fn apply_op(&mut self, index: u64, cmd: &Command) -> Outcome {
        let at = cmd.at_unix_ms;
        match &cmd.op {
            Op::RegisterNode {
                node,
                kind,
                group,
                endpoint,
                source,
                certificate,
            } => {
                let outcome = self.register(index, at, node, *kind, group, endpoint, source)?;
                if let Some(c) = certificate {
                    self.record_certificate(at, node, c);
                }
                Ok(outcome)
            }
            Op::RecordCertificate { node, certificate } => {
                self.live_node(node)?;
                if certificate.not_after_unix_ms <= at {
                    return Err(Rejected::Invalid(format!(
                        "certificate {} has expired already",
                        certificate.serial
                    )));
                }
                self.record_certificate(at, node, certificate);
                self.push_event(
                    at,
                    "certificate_renewed",
                    Some(node),
                    None,
                    format!(
                        "certificate {} of {node} issued, valid until {}",
                        certificate.serial,
                        unix_ms_text(certificate.not_after_unix_ms)
                    ),
                );
                self.applied(
                    index,
                    None,
                    format!("certificate {} of {node} recorded", certificate.serial),
                )
            }
            Op::RevokeCertificate { serial } => {
                self.sweep_expired_certificates(at);
                let Some(c) = self.certificates.get(serial) else {
                    return Err(Rejected::Invalid(format!(
                        "no certificate with serial {serial} is recorded (unknown, or expired already)"
                    )));
                };
                if let Some(when) = c.revoked_at_unix_ms {
                    return Err(Rejected::Invalid(format!(
                        "certificate {serial} of {} was revoked already at {}",
                        c.node,
                        unix_ms_text(when)
                    )));
                }
                let node = c.node.clone();
                self.revoke(at, serial);
                let msg = format!("certificate {serial} of {node} revoked");
                self.push_event(at, "certificate_revoked", Some(&node), None, msg.clone());
                self.applied(index, None, msg)
            }
            Op::CreateToken {
                token_id,
                secret_sha256_hex,
                kind,
                group,
                expires_at_unix_ms,
                node,
                address,
            } => {
                if self.tokens.contains_key(token_id) {
                    return Err(Rejected::TokenExists(token_id.clone()));
                }
                if *expires_at_unix_ms <= at {
                    return Err(Rejected::Invalid("token would be expired already".into()));
                }
                // Expired tokens are useless; dropping them here bounds the map.
                self.sweep_expired_tokens(at);
                self.token_expiry
                    .insert((*expires_at_unix_ms, token_id.clone()));
                self.tokens.insert(
                    token_id.clone(),
                    JoinToken {
                        id: token_id.clone(),
                        secret_sha256_hex: secret_sha256_hex.clone(),
                        kind: *kind,
                        group: group.clone(),
                        expires_at_unix_ms: *expires_at_unix_ms,
                        used: false,
                        node: node.clone(),
                        address: address.clone(),
                    },
                );
                self.push_event(
                    at,
                    "token_created",
                    None,
                    None,
                    format!("join token {token_id} for a {kind} node of group {group}"),
                );
                self.applied(index, None, format!("token {token_id} created"))
            }
            Op::RevokeToken { token_id } => {
                let Some(t) = self.tokens.remove(token_id) else {
                    return Err(Rejected::token(token_id, TokenError::Unknown));
                };
                self.token_expiry
                    .remove(&(t.expires_at_unix_ms, token_id.clone()));
                self.push_event(
                    at,
                    "token_revoked",
                    None,
                    None,
                    format!("join token {token_id} revoked"),
                );
                self.applied(index, None, format!("token {token_id} revoked"))
            }
            Op::Decide(d) => self.apply_decision(index, at, d),
            Op::Switchover { group, target } => {
                let primary = self.check_switchover_target(group, target)?;
                self.start_switchover(at, group, primary.clone(), target.clone());
                self.applied(
                    index,
                    Some(group),
                    format!("switchover {primary} -> {target} started"),
                )
            }
            Op::Failover {
                group,
                allow_data_loss,
            } => self.operator_failover(index, at, group, *allow_data_loss),
            Op::SetMaintenance {
                node,
                enabled,
                switchover_to,
            } => self.set_maintenance(index, at, node, *enabled, switchover_to.as_ref()),
            Op::SetNodeSettings {
                node,
                candidate_priority,
                replication_quorum,
            } => {
                let n = self.live_node(node)?;
                let group = n.group.clone();
                let n = self.nodes.get_mut(node).expect("checked by live_node");
                if let Some(p) = candidate_priority {
                    n.candidate_priority = *p;
                }
                if let Some(q) = replication_quorum {
                    n.replication_quorum = *q;
                }
                let msg = format!(
                    "candidate_priority {}, replication_quorum {}",
                    n.candidate_priority, n.replication_quorum
                );
                self.bump(&group);
                self.push_event(at, "node_settings", Some(node), Some(&group), msg.clone());
                self.applied(index, Some(&group), msg)
            }
            Op::RemoveNode { node } => {
                let n = self.live_node(node)?;
                let group = n.group.clone();
                if let Some(g) = self.groups.get(&group) {
                    if g.primary.as_ref() == Some(node) {
                        return Err(Rejected::NotEligible(format!(
                            "{node} is the primary of {group}: switch over first"
                        )));
                    }
                    if g.operation.as_ref().is_some_and(|op| op.involves(node)) {
                        return Err(Rejected::OperationInProgress {
                            group: group.clone(),
                            operation: g
                                .operation
                                .as_ref()
                                .map(Operation::describe)
                                .unwrap_or_default(),
                        });
                    }
                }
                self.nodes
                    .get_mut(node)
                    .expect("checked by live_node")
                    .removed = true;
                self.sweep_expired_certificates(at);
                let serials: Vec<String> = self
                    .certificates
                    .iter()
                    .filter(|(_, c)| c.node == *node && c.revoked_at_unix_ms.is_none())
                    .map(|(serial, _)| serial.clone())
                    .collect();
                for serial in &serials {
                    self.revoke(at, serial);
                }
                let msg = if serials.is_empty() {
                    format!("{node} removed")
                } else {
                    format!(
                        "{node} removed, certificate(s) {} revoked",
                        serials.join(", ")
                    )
                };
                self.bump(&group);
                self.push_event(at, "node_removed", Some(node), Some(&group), msg.clone());
                self.applied(index, Some(&group), msg)
            }
            Op::RecordEvent {
                kind,
                node,
                group,
                message,
            } => {
                self.push_event(at, kind, node.as_ref(), group.as_deref(), message.clone());
                self.applied(index, group.as_deref(), "event recorded")
            }
            Op::SetTimings(t) => {
                t.validate().map_err(Rejected::Invalid)?;
                self.timings = t.clone();
                self.push_event(at, "settings", None, None, format!("timings set: {t:?}"));
                self.applied(index, None, "timings set")
            }
            Op::SetGroupSettings { group, settings } => {
                self.group_ref(group)?;
                if settings.sync_quorum == 0 {
                    return Err(Rejected::Invalid("sync_quorum must be at least 1".into()));
                }
                if settings.failsafe_ms > MAX_FAILSAFE_MS {
                    return Err(Rejected::Invalid(format!(
                        "failsafe must be at most {:?}",
                        Duration::from_millis(MAX_FAILSAFE_MS)
                    )));
                }
                let g = self.groups.get_mut(group).expect("checked by group_ref");
                g.settings = settings.clone();
                g.revision += 1;
                self.push_event(
                    at,
                    "settings",
                    None,
                    Some(group),
                    format!("group settings set: {settings:?}"),
                );
                self.applied(index, Some(group), "group settings set")
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        index: u64,
        at: u64,
        node: &NodeId,
        kind: NodeKind,
        group: &str,
        endpoint: &Endpoint,
        source: &Registration,
    ) -> Outcome {
        if group.is_empty() {
            return Err(Rejected::Invalid("group name is empty".into()));
        }
        if let Some(existing) = self.nodes.get(node).filter(|n| !n.removed) {
            let same =
                existing.kind == kind && existing.group == group && existing.endpoint == *endpoint;
            return if same && *source == Registration::Config {
                self.applied(index, Some(group), format!("{node} already registered"))
            } else {
                Err(Rejected::NodeExists(node.clone()))
            };
        }
        if let Registration::JoinToken { token_id } = source {
            let t = self
                .tokens
                .get(token_id)
                .ok_or_else(|| Rejected::token(token_id, TokenError::Unknown))?;
            Self::token_usable(t, at).map_err(|e| Rejected::token(token_id, e))?;
            if t.kind != kind || t.group != group {
                return Err(Rejected::Token {
                    id: token_id.clone(),
                    reason: format!("token is for a {} node of group {}", t.kind, t.group),
                });
            }
            self.tokens.get_mut(token_id).expect("checked above").used = true;
        }
        self.groups
            .entry(group.to_owned())
            .or_insert_with(|| Group::new(group.to_owned()));
        // A removed node may come back in another group: it leaves the old group's index.
        if let Some(old) = self.nodes.get(node).filter(|old| old.group != group)
            && let Some(names) = self.group_nodes.get_mut(&old.group)
        {
            names.remove(node);
        }
        self.group_nodes
            .entry(group.to_owned())
            .or_default()
            .insert(node.clone());
        self.nodes.insert(
            node.clone(),
            Node {
                name: node.clone(),
                kind,
                group: group.to_owned(),
                endpoint: endpoint.clone(),
                candidate_priority: DEFAULT_PRIORITY,
                replication_quorum: true,
                maintenance: false,
                removed: false,
                goal: None,
                registered_at_index: index,
            },
        );
        self.bump(group);
        let how = match source {
            Registration::JoinToken { token_id } => format!("joined with token {token_id}"),
            Registration::Config => "registered from config".to_owned(),
        };
        let msg = format!("{kind} node {node} at {endpoint} {how}");
        self.push_event(at, "node_registered", Some(node), Some(group), msg.clone());
        self.applied(index, Some(group), msg)
    }

    fn start_switchover(&mut self, at: u64, group: &str, old_primary: NodeId, target: NodeId) {
        let msg = format!("switchover from {old_primary} to {target} requested");
        let g = self
            .groups
            .get_mut(group)
            .expect("caller checked the group");
        g.operation = Some(Operation::Switchover {
            old_primary,
            target: target.clone(),
            phase: SwitchoverPhase::Requested,
        });
        g.revision += 1;
        self.push_event(at, "switchover_requested", Some(&target), Some(group), msg);
    }

    fn operator_failover(
        &mut self,
        index: u64,
        at: u64,
        group: &str,
        allow_data_loss: bool,
    ) -> Outcome {
        let g = self.group_ref(group)?;
        let primary = g
            .primary
            .clone()
            .ok_or_else(|| Rejected::NotEligible(format!("group {group} has no primary")))?;
        let operation = match g.operation.clone() {
            None => Operation::Failover {
                old_primary: primary,
                allow_data_loss,
                operator: true,
                phase: FailoverPhase::Requested,
            },
            // A failover already waiting for an eligible standby may be upgraded to accept
            // data loss; anything else in progress must finish first.
            Some(Operation::Failover {
                old_primary,
                allow_data_loss: false,
                operator,
                phase,
            }) if allow_data_loss => Operation::Failover {
                old_primary,
                allow_data_loss,
                operator,
                phase,
            },
            Some(op) => {
                return Err(Rejected::OperationInProgress {
                    group: group.to_owned(),
                    operation: op.describe(),
                });
            }
        };
        let msg = operation.describe();
        let g = self.groups.get_mut(group).expect("checked by group_ref");
        g.operation = Some(operation);
        g.revision += 1;
        self.push_event(at, "failover_requested", None, Some(group), msg.clone());
        self.applied(index, Some(group), msg)
    }

    fn set_maintenance(
        &mut self,
        index: u64,
        at: u64,
        node: &NodeId,
        enabled: bool,
        switchover_to: Option<&NodeId>,
    ) -> Outcome {
        let n = self.live_node(node)?;
        let group = n.group.clone();
        if n.maintenance == enabled {
            return self.applied(
                index,
                Some(&group),
                format!("{node} maintenance already {}", on_off(enabled)),
            );
        }
        let g = self.group_ref(&group)?;
        if let Some(op) = g
            .operation
            .as_ref()
            .filter(|op| op.involves(node) || op.old_primary() == node)
        {
            return Err(Rejected::OperationInProgress {
                group: group.clone(),
                operation: op.describe(),
            });
        }
        let is_primary = g.primary.as_ref() == Some(node);
        if enabled && is_primary {
            let target = switchover_to.ok_or_else(|| {
                Rejected::NotEligible(format!(
                    "{node} is the primary: maintenance needs a switchover target"
                ))
            })?;
            let primary = self.check_switchover_target(&group, target)?;
            self.start_switchover(at, &group, primary, target.clone());
        }
        self.nodes
            .get_mut(node)
            .expect("checked by live_node")
            .maintenance = enabled;
        self.bump(&group);
        let msg = format!("{node} maintenance {}", on_off(enabled));
        self.push_event(at, "maintenance", Some(node), Some(&group), msg.clone());
        self.applied(index, Some(&group), msg)
    }

    fn apply_decision(&mut self, index: u64, at: u64, d: &Decision) -> Outcome {
        let g = self.group_ref(&d.group)?;
        if g.revision != d.based_on {
            return Err(Rejected::StaleDecision {
                group: d.group.clone(),
                based_on: d.based_on,
                current: g.revision,
            });
        }
        self.validate_decision(g, d).map_err(Rejected::Unsafe)?;
        for (node, goal) in &d.goals {
            self.nodes
                .get_mut(node)
                .expect("validated: node exists")
                .goal = Some(goal.clone());
        }
        let g = self.groups.get_mut(&d.group).expect("checked by group_ref");
        g.primary = d.primary.clone();
        g.epoch = d.epoch;
        g.sync = d.sync.clone();
        g.operation = d.operation.clone();
        g.notice = d.notice.clone();
        g.revision += 1;
        for e in &d.events {
            self.push_event(
                at,
                &e.kind,
                e.node.as_ref(),
                Some(&d.group),
                e.message.clone(),
            );
        }
        let summary = d
            .events
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        self.applied(index, Some(&d.group), summary)
    }

    /// The safety rules a decision must keep, checked against the state it would produce.
    fn validate_decision(&self, g: &Group, d: &Decision) -> Result<(), String> {
        if d.epoch < g.epoch {
            return Err(format!(
                "epoch would go down from {} to {}",
                g.epoch, d.epoch
            ));
        }
        for (node, goal) in &d.goals {
            let n = self
                .nodes
                .get(node)
                .ok_or_else(|| format!("unknown node {node}"))?;
            if n.group != d.group {
                return Err(format!("{node} is not in group {}", d.group));
            }
            if goal.epoch > d.epoch {
                return Err(format!(
                    "goal of {node} carries {} beyond the group's {}",
                    goal.epoch, d.epoch
                ));
            }
            if n.removed && goal.state != GoalState::Removed {
                return Err(format!("{node} is removed"));
            }
            let q = goal.synchronous_quorum as usize;
            if q > goal.synchronous_standbys.len()
                || (q == 0) != goal.synchronous_standbys.is_empty()
            {
                return Err(format!(
                    "goal of {node} has quorum {q} of {}",
                    goal.synchronous_standbys.len()
                ));
            }
        }
        fn new_goal<'a>(d: &'a Decision, n: &'a Node) -> Option<&'a AssignedGoal> {
            d.goals
                .iter()
                .find(|(id, _)| *id == n.name)
                .map(|(_, g)| g)
                .or(n.goal.as_ref())
        }
        let writable: Vec<(&Node, &AssignedGoal)> = self
            .group_nodes(&d.group)
            .filter_map(|n| {
                new_goal(d, n)
                    .filter(|g| g.state.is_writable())
                    .map(|g| (n, g))
            })
            .collect();
        match writable.as_slice() {
            [] => {}
            [(n, goal)] => {
                if d.primary.as_ref() != Some(&n.name) || goal.epoch != d.epoch {
                    return Err(format!(
                        "{} would be writable at {} but is not the primary at {}",
                        n.name, goal.epoch, d.epoch
                    ));
                }
                if n.kind != NodeKind::Postgres {
                    return Err(format!("{} is not a postgres node", n.name));
                }
                let promoted = d.epoch > g.epoch || g.primary.as_ref() != Some(&n.name);
                if promoted && d.epoch > Epoch(1) && n.candidate_priority == 0 {
                    return Err(format!("{} has candidate priority 0", n.name));
                }
            }
            many => {
                let names: Vec<_> = many.iter().map(|(n, _)| n.name.as_str()).collect();
                return Err(format!("{} would all be writable", names.join(", ")));
            }
        }
        if d.primary != g.primary && d.epoch == g.epoch && g.primary.is_some() {
            return Err("a new primary needs a new epoch".into());
        }
        if d.sync.standbys.len() < d.sync.quorum as usize
            || (d.sync.quorum == 0) != d.sync.standbys.is_empty()
        {
            return Err("synchronous quorum out of range".into());
        }
        if d.sync.min_lsn < g.sync.min_lsn && d.epoch == g.epoch {
            return Err("synchronous min LSN would go down within an epoch".into());
        }
        Ok(())
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

#[cfg(test)]
mod tests;
