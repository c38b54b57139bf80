//! The Raft node: one raft-rs `RawNode` driven by one dedicated thread.
//!
//! Everything that touches consensus state happens on that thread; the rest of the monitor talks
//! to it through [`RaftHandle`] (a channel with reply handles) and reads [`RaftStatus`] from a
//! watch channel. No lock is shared around consensus state.
//!
//! Each Ready cycle is persisted with exactly one [`RaftStore::write`]: new entries, hard state,
//! an installed snapshot and conf state (with the state machine, synchronously, after a
//! membership change). Because the stored state machine and its applied index are always written
//! in one transaction, a restart replays exactly the committed entries after that index: nothing
//! is applied twice and nothing acknowledged is lost. Messages that raft-rs marks as "persisted"
//! are sent only after the write returned.
//!
//! Every `persist_state_every` applied entries the state machine is also persisted, but its
//! serialization (the whole catalog: the dominant cost with thousands of nodes) runs on an
//! encoder thread from an immutable copy taken at an applied index ([`StateMachine::snapshot_job`]),
//! so the raft thread keeps ticking, stepping and applying meanwhile. When the bytes come back
//! the raft thread stores them with THEIR index, which is at or below everything applied and
//! committed since; bytes overtaken by a newer stored state (a snapshot from the leader, a
//! membership change) are dropped. At most one encoding runs at a time.
//!
//! A proposal is acknowledged to its caller only when it has been applied on this node, which
//! implies it is committed (durable on a quorum). When this node stops being leader, pending
//! proposals are answered with [`ProposeError::Dropped`]: their outcome is unknown and the caller
//! retries with the same request id (the catalog applies a request id once).

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::storage::{RaftStore, StorageError, WriteBatch};

/// Monitor Raft ids and their peer addresses (`host:port` of the peer gRPC service).
pub type Members = BTreeMap<u64, String>;

/// Serializes a copy of the state taken when the job was made; runs on the encoder thread.
pub type SnapshotJob = Box<dyn FnOnce() -> Vec<u8> + Send>;

/// The application replicated by Raft. `apply` must be deterministic: every member applies the
/// same entries in the same order and must reach the same state.
pub trait StateMachine: Send + 'static {
    type Output: Send + 'static;
    /// Applies one committed command.
    fn apply(&mut self, index: u64, data: &[u8]) -> Self::Output;
    /// The whole state as it is now, for persistence and for snapshots sent to lagging
    /// followers, serialized later by whoever runs the job. Taking the copy should be cheap (it
    /// happens on the raft thread); the serialization is the job's.
    fn snapshot_job(&self) -> SnapshotJob;
    /// The whole state, serialized now.
    fn snapshot(&self) -> Vec<u8> {
        (self.snapshot_job())()
    }
    /// Replaces the state with one produced by `snapshot` (on this or another member).
    fn restore(&mut self, data: &[u8]) -> Result<(), String>;
    /// Called once after each batch of applied entries (e.g. to publish a read-only copy).
    fn after_batch(&mut self, _applied: u64) {}
}

/// Timing and size settings of the Raft node.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Persist the state machine after this many applied entries (replayed from the log after a
    /// restart otherwise).
    pub persist_state_every: u64,
    /// Compact the log once this many entries are covered by the persisted state machine.
    pub compact_after: u64,
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
}

impl RaftSettings {
    pub fn new(id: u64) -> Self {
        Self {
            id,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            persist_state_every: 256,
            compact_after: 1024,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
        }
    }
}

/// Why a request to the Raft node did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(u64, String)> },
    #[error("leadership changed before the proposal was applied; retry with the same request id")]
    Dropped,
    #[error("the raft node has stopped")]
    Stopped,
    #[error("rejected by raft: {0}")]
    Rejected(String),
}

/// Why the Raft node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("stored state machine cannot be restored: {0}")]
    Restore(String),
    #[error(
        "this member has no bootstrap list and no stored state: start it with the initial members, or join it through AddMonitor on the leader"
    )]
    NoMembers,
}

/// What the rest of the monitor can see of the Raft node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub is_leader: bool,
    pub commit_index: u64,
    pub applied_index: u64,
    pub members: Members,
    /// Raft progress as seen by a leader: member id -> matched index.
    pub matched: BTreeMap<u64, u64>,
    /// Set when this member was removed from the group; the process should stop.
    pub removed: bool,
    /// Set when the group refused this member (it came back with wiped data).
    pub refused: Option<String>,
    pub stopped: bool,
}

impl RaftStatus {
    pub fn leader_address(&self) -> Option<(u64, String)> {
        self.members
            .get(&self.leader_id)
            .map(|a| (self.leader_id, a.clone()))
    }
}

/// Transport feedback: what raft-rs needs to pace replication, and the group's refusal of
/// this member (its data was wiped: see `incarnation`), which stops it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    Unreachable(u64),
    SnapshotDone { to: u64, ok: bool },
    Refused(String),
}

/// Sends raft messages to other members. Implementations must not block the raft thread:
/// queue and deliver asynchronously, dropping messages when a peer is slow (Raft retries).
pub trait Transport: Send + 'static {
    fn send(&mut self, messages: Vec<Message>, members: &Members, feedback: &FeedbackSender);
}

/// Lets a transport report delivery problems back to the raft thread.
#[derive(Debug, Clone)]
pub struct FeedbackSender(mpsc::Sender<Request>);

impl FeedbackSender {
    pub fn report(&self, feedback: Feedback) {
        let _ = self.0.send(Request::Feedback(feedback));
    }
}

type Reply<T> = oneshot::Sender<Result<T, ProposeError>>;

/// The output a state machine produced for one proposal, with the log index it was applied at.
pub type Applied = (u64, Vec<u8>);

#[derive(Debug)]
pub enum Request {
    Propose {
        data: Vec<u8>,
        reply: Reply<Applied>,
    },
    ReadIndex {
        reply: Reply<u64>,
    },
    AddMember {
        id: u64,
        address: String,
        reply: Reply<Members>,
    },
    RemoveMember {
        id: u64,
        reply: Reply<Members>,
    },
    Step(Box<Message>),
    Feedback(Feedback),
    /// The encoder thread finished the state machine bytes (with members) at `index`.
    Encoded {
        index: u64,
        bytes: Vec<u8>,
    },
    Stop,
}

/// One state machine serialization for the encoder thread.
struct EncodeJob {
    index: u64,
    members: Members,
    app: SnapshotJob,
}

/// Starts the thread that serializes state machine copies and hands the bytes back to the raft
/// thread as [`Request::Encoded`]. It ends when the raft thread drops the returned sender.
fn spawn_encoder(
    id: u64,
    results: mpsc::Sender<Request>,
) -> Result<mpsc::Sender<EncodeJob>, StartError> {
    let (jobs, rx) = mpsc::channel::<EncodeJob>();
    thread::Builder::new()
        .name(format!("raft-{id}-encode"))
        .spawn(move || {
            for job in rx {
                let started = Instant::now();
                let bytes = encode_state(&job.members, &(job.app)());
                debug!(
                    id,
                    index = job.index,
                    bytes = bytes.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "state machine encoded for persistence"
                );
                let done = Request::Encoded {
                    index: job.index,
                    bytes,
                };
                if results.send(done).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| StartError::Restore(format!("cannot start the encoder thread: {e}")))?;
    Ok(jobs)
}

/// Cheap, cloneable access to the raft thread.
#[derive(Debug, Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<Request>,
    status: watch::Receiver<RaftStatus>,
}

impl RaftHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Proposes `data`; resolves with the state machine's output once it is applied here.
    /// Outputs are encoded by the state machine as bytes (see [`StateMachine::Output`]).
    pub async fn propose(&self, data: Vec<u8>) -> Result<Applied, ProposeError> {
        self.ask(|reply| Request::Propose { data, reply }).await
    }

    /// Linearizable read barrier: resolves with an applied index at which this (leader) member's
    /// state reflects every write committed before the call.
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        self.ask(|reply| Request::ReadIndex { reply }).await
    }

    pub async fn add_member(&self, id: u64, address: String) -> Result<Members, ProposeError> {
        self.ask(|reply| Request::AddMember { id, address, reply })
            .await
    }

    pub async fn remove_member(&self, id: u64) -> Result<Members, ProposeError> {
        self.ask(|reply| Request::RemoveMember { id, reply }).await
    }

    /// Hands a message received from a peer to the raft thread.
    pub fn step(&self, message: Message) -> Result<(), ProposeError> {
        self.tx
            .send(Request::Step(Box::new(message)))
            .map_err(|_| ProposeError::Stopped)
    }

    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// Stops this member because the group refuses it (see `incarnation`).
    pub fn refuse(&self, why: String) {
        let _ = self.tx.send(Request::Feedback(Feedback::Refused(why)));
    }

    /// Asks the raft thread to stop after persisting what it has; returns immediately.
    pub fn stop(&self) {
        let _ = self.tx.send(Request::Stop);
    }
}

/// The state machine bytes as persisted: the member addresses travel with the application
/// state so that a member restored from a snapshot knows where its peers are.
fn encode_state(members: &Members, app: &[u8]) -> Vec<u8> {
    let members = serde_json::to_vec(members).expect("a map of ids to strings always serializes");
    let mut out = Vec::with_capacity(8 + members.len() + app.len());
    out.extend_from_slice(&(members.len() as u64).to_le_bytes());
    out.extend_from_slice(&members);
    out.extend_from_slice(app);
    out
}

fn decode_state(bytes: &[u8]) -> Result<(Members, &[u8]), String> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("state shorter than its header")?;
    let len = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|e| e.to_string())?;
    let members = bytes
        .get(8..8 + len)
        .ok_or("state shorter than its member list")?;
    let members: Members = serde_json::from_slice(members).map_err(|e| e.to_string())?;
    Ok((members, &bytes[8 + len..]))
}

/// Starts the raft thread. `bootstrap` lists the initial members (id, peer address) and is used
/// only when the store holds nothing yet; a member added later starts with `None` and waits for
/// the leader to contact it.
pub fn spawn<S, T>(
    settings: RaftSettings,
    mut store: RaftStore,
    mut sm: S,
    transport: T,
    bootstrap: Option<Members>,
) -> Result<(RaftHandle, thread::JoinHandle<()>), StartError>
where
    S: StateMachine<Output = Vec<u8>>,
    T: Transport,
{
    let mut members = Members::new();
    if store.is_initialized() {
        if let Some(bytes) = store.state_machine() {
            let (stored_members, app) = decode_state(&bytes).map_err(StartError::Restore)?;
            sm.restore(app).map_err(StartError::Restore)?;
            members = stored_members;
        }
        if members.is_empty() {
            // Nothing applied yet: the addresses are those we were bootstrapped with.
            members = bootstrap.clone().unwrap_or_default();
        }
    } else if let Some(initial) = bootstrap.clone() {
        let voters: Vec<u64> = initial.keys().copied().collect();
        store.bootstrap(&voters)?;
        members = initial;
    } else {
        // A member being added: it learns everything from the leader's snapshot or log.
        members = Members::new();
    }
    if bootstrap.is_none() && !store.is_initialized() && members.is_empty() {
        debug!(id = settings.id, "starting empty, waiting for the leader");
    }
    let config = raft::Config {
        id: settings.id,
        election_tick: settings.election_ticks,
        // raft-rs draws each election timeout from [min, max); its default max of twice the
        // election tick lets a leader's death go unnoticed for up to 2 s with our defaults.
        // 1.5x keeps elections randomized enough to avoid split votes and bounds failover.
        min_election_tick: settings.election_ticks,
        max_election_tick: settings.election_ticks + settings.election_ticks.div_ceil(2),
        heartbeat_tick: settings.heartbeat_ticks,
        applied: store.applied_index(),
        max_size_per_msg: settings.max_size_per_msg,
        max_inflight_msgs: settings.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    config.validate()?;
    let logger = slog::Logger::root(tracing_slog::TracingSlogDrain, slog::o!());
    let raw = RawNode::new(&config, store, &logger)?;
    let (tx, rx) = mpsc::channel();
    let (status_tx, status_rx) = watch::channel(RaftStatus {
        id: settings.id,
        members: members.clone(),
        ..Default::default()
    });
    let handle = RaftHandle {
        tx: tx.clone(),
        status: status_rx,
    };
    let encoder = spawn_encoder(settings.id, tx.clone())?;
    let node = Node {
        persisted_sm_index: raw.store().applied_index(),
        encoder,
        encoding: None,
        encoded: None,
        raw,
        sm,
        transport,
        feedback: FeedbackSender(tx),
        settings,
        members,
        status: status_tx,
        next_ctx: 1,
        proposals: HashMap::new(),
        reads: HashMap::new(),
        waiting_reads: Vec::new(),
        conf_changes: HashMap::new(),
        was_leader: false,
        removed: false,
        refused: None,
    };
    let thread = thread::Builder::new()
        .name(format!("raft-{}", node.settings.id))
        .spawn(move || node.run(rx))
        .map_err(|e| StartError::Restore(format!("cannot start the raft thread: {e}")))?;
    Ok((handle, thread))
}

struct Node<S: StateMachine<Output = Vec<u8>>, T: Transport> {
    raw: RawNode<RaftStore>,
    sm: S,
    transport: T,
    feedback: FeedbackSender,
    settings: RaftSettings,
    members: Members,
    status: watch::Sender<RaftStatus>,
    /// Context ids for this member's proposals, read requests and conf changes.
    next_ctx: u64,
    proposals: HashMap<Vec<u8>, Reply<Applied>>,
    reads: HashMap<Vec<u8>, Reply<u64>>,
    waiting_reads: Vec<(u64, Reply<u64>)>,
    conf_changes: HashMap<Vec<u8>, Reply<Members>>,
    persisted_sm_index: u64,
    /// Jobs for the encoder thread (see the module documentation).
    encoder: mpsc::Sender<EncodeJob>,
    /// The applied index of the copy being encoded, while one is.
    encoding: Option<u64>,
    /// Bytes back from the encoder, stored by the next `persist_encoded`.
    encoded: Option<(u64, Vec<u8>)>,
    was_leader: bool,
    removed: bool,
    refused: Option<String>,
}

impl<S: StateMachine<Output = Vec<u8>>, T: Transport> Node<S, T> {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut next_tick = Instant::now() + self.settings.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Request::Stop) => break,
                Ok(req) => {
                    self.handle(req);
                    // Drain what is already queued so one Ready covers a whole batch.
                    let mut stop = false;
                    for req in rx.try_iter().take(4096) {
                        if matches!(req, Request::Stop) {
                            stop = true;
                            break;
                        }
                        self.handle(req);
                    }
                    if stop {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += self.settings.tick;
                if next_tick < Instant::now() {
                    // The thread was starved (e.g. SIGSTOP); do not replay missed ticks in a burst.
                    next_tick = Instant::now() + self.settings.tick;
                }
            }
            if let Err(e) = self.on_ready().and_then(|()| self.persist_encoded()) {
                error!(id = self.settings.id, error = %e, "raft storage failed; stopping this member");
                break;
            }
            if self.removed {
                info!(
                    id = self.settings.id,
                    "this member was removed from the monitor group; stopping"
                );
                break;
            }
            if self.refused.is_some() {
                break;
            }
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Persist the state machine so the next start does not replay the whole tail.
        let applied = self.raw.raft.raft_log.applied;
        if applied > self.persisted_sm_index {
            let bytes = encode_state(&self.members, &self.sm.snapshot());
            let batch = WriteBatch {
                commit: Some(self.raw.raft.raft_log.committed),
                applied: Some((applied, &bytes)),
                ..Default::default()
            };
            if let Err(e) = self.raw.mut_store().write(batch) {
                warn!(error = %e, "could not persist the state machine at shutdown; it will be replayed");
            }
        }
        self.fail_pending(|| ProposeError::Stopped);
        self.status.send_modify(|s| {
            s.stopped = true;
            s.removed = self.removed;
            s.refused.clone_from(&self.refused);
            s.is_leader = false;
        });
    }

    fn ctx(&mut self) -> Vec<u8> {
        let ctx = [self.settings.id.to_le_bytes(), self.next_ctx.to_le_bytes()].concat();
        self.next_ctx += 1;
        ctx
    }

    fn not_leader(&self) -> ProposeError {
        let leader = self.raw.raft.leader_id;
        ProposeError::NotLeader {
            leader: self.members.get(&leader).map(|a| (leader, a.clone())),
        }
    }

    fn handle(&mut self, req: Request) {
        let is_leader = self.raw.raft.state == StateRole::Leader;
        match req {
            Request::Propose { data, reply } => {
                if !is_leader {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let ctx = self.ctx();
                match self.raw.propose(ctx.clone(), data) {
                    Ok(()) => {
                        self.proposals.insert(ctx, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Rejected(e.to_string())));
                    }
                }
            }
            Request::ReadIndex { reply } => {
                if !is_leader {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let ctx = self.ctx();
                self.raw.read_index(ctx.clone());
                self.reads.insert(ctx, reply);
            }
            Request::AddMember { id, address, reply } => {
                self.conf_change(is_leader, ConfChangeType::AddNode, id, address, reply);
            }
            Request::RemoveMember { id, reply } => {
                self.conf_change(
                    is_leader,
                    ConfChangeType::RemoveNode,
                    id,
                    String::new(),
                    reply,
                );
            }
            Request::Step(msg) => {
                if let Err(e) = self.raw.step(*msg) {
                    debug!(error = %e, "dropped a raft message");
                }
            }
            Request::Feedback(Feedback::Unreachable(to)) => self.raw.report_unreachable(to),
            Request::Feedback(Feedback::Refused(why)) => {
                error!(id = self.settings.id, %why, "the monitor group refuses this member; stopping");
                self.refused = Some(why);
            }
            Request::Feedback(Feedback::SnapshotDone { to, ok }) => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Request::Encoded { index, bytes } => {
                self.encoding = None;
                self.encoded = Some((index, bytes));
            }
            Request::Stop => {}
        }
    }

    fn conf_change(
        &mut self,
        is_leader: bool,
        kind: ConfChangeType,
        id: u64,
        address: String,
        reply: Reply<Members>,
    ) {
        if !is_leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if id == 0 {
            let _ = reply.send(Err(ProposeError::Rejected(
                "monitor id 0 is reserved".into(),
            )));
            return;
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = id;
        cc.context = address.into_bytes().into();
        let ctx = self.ctx();
        match self.raw.propose_conf_change(ctx.clone(), cc) {
            Ok(()) => {
                self.conf_changes.insert(ctx, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(ProposeError::Rejected(e.to_string())));
            }
        }
    }

    fn fail_pending(&mut self, err: impl Fn() -> ProposeError) {
        for (_, reply) in self.proposals.drain() {
            let _ = reply.send(Err(err()));
        }
        for (_, reply) in self.reads.drain() {
            let _ = reply.send(Err(err()));
        }
        for (_, reply) in self.waiting_reads.drain(..) {
            let _ = reply.send(Err(err()));
        }
        for (_, reply) in self.conf_changes.drain() {
            let _ = reply.send(Err(err()));
        }
    }

    fn send(&mut self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        for m in &messages {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                debug!(
                    to = m.to,
                    index = m.get_snapshot().get_metadata().index,
                    "sending snapshot"
                );
            }
        }
        self.transport.send(messages, &self.members, &self.feedback);
    }

    fn on_ready(&mut self) -> Result<(), StorageError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        self.send(ready.take_messages());

        let snapshot = ready.snapshot().clone();
        let installs_snapshot = !snapshot.is_empty();
        if installs_snapshot {
            self.restore_snapshot(&snapshot);
        }
        for rs in ready.take_read_states() {
            if let Some(reply) = self.reads.remove(rs.request_ctx.as_slice()) {
                self.waiting_reads.push((rs.index, reply));
            }
        }
        let committed = ready.take_committed_entries();
        let mut outcome = self.apply_entries(committed);
        // When a snapshot is installed the store takes the snapshot's own state and index.
        let state = if installs_snapshot {
            None
        } else {
            self.state_to_persist(&outcome)
        };
        let applied = state.as_ref().map(|(i, b)| (*i, b.as_slice()));
        let committed = self.raw.raft.raft_log.committed;
        self.raw.mut_store().write(WriteBatch {
            snapshot: installs_snapshot.then_some(&snapshot),
            entries: ready.entries(),
            hard_state: ready.hs(),
            commit: applied.map(|_| committed),
            conf_state: outcome.conf_state.as_ref(),
            applied,
        })?;
        if let Some((index, _)) = applied {
            self.persisted_sm_index = index;
        }
        if installs_snapshot {
            self.persisted_sm_index = snapshot.get_metadata().index;
        }
        self.finish_applied(&mut outcome);
        self.send(ready.take_persisted_messages());

        let mut light = self.raw.advance(ready);
        let commit = light.commit_index();
        self.send(light.take_messages());
        let committed = light.take_committed_entries();
        let mut outcome = self.apply_entries(committed);
        let state = self.state_to_persist(&outcome);
        let applied = state.as_ref().map(|(i, b)| (*i, b.as_slice()));
        // A commit index alone need not be durable (a restarted member learns it again from
        // the leader); it is written together with the next persisted state machine, which must
        // never be ahead of the stored commit.
        if applied.is_some() || outcome.conf_state.is_some() {
            let committed = commit.unwrap_or(self.raw.raft.raft_log.committed);
            self.raw.mut_store().write(WriteBatch {
                commit: Some(committed),
                conf_state: outcome.conf_state.as_ref(),
                applied,
                ..Default::default()
            })?;
            if let Some((index, _)) = applied {
                self.persisted_sm_index = index;
            }
        }
        self.finish_applied(&mut outcome);
        self.raw.advance_apply();
        self.maybe_compact()?;
        self.publish_status();
        Ok(())
    }

    /// The state machine to persist with this batch, serialized here: only after a membership
    /// change (the addresses must be durable with the conf state). Every `persist_state_every`
    /// entries a copy goes to the encoder thread instead; until it is stored the log replays.
    fn state_to_persist(&mut self, outcome: &ApplyOutcome) -> Option<(u64, Vec<u8>)> {
        let index = outcome.last_applied;
        let behind = index.saturating_sub(self.persisted_sm_index);
        if behind == 0 {
            return None;
        }
        if outcome.conf_state.is_some() {
            return Some((index, encode_state(&self.members, &self.sm.snapshot())));
        }
        if behind >= self.settings.persist_state_every && self.encoding.is_none() {
            let job = EncodeJob {
                index,
                members: self.members.clone(),
                app: self.sm.snapshot_job(),
            };
            if self.encoder.send(job).is_err() {
                // The encoder thread is gone (it panicked): persist here rather than never.
                warn!(
                    id = self.settings.id,
                    "encoder thread gone; encoding on the raft thread"
                );
                return Some((index, encode_state(&self.members, &self.sm.snapshot())));
            }
            self.encoding = Some(index);
        }
        None
    }

    /// Stores the bytes the encoder returned, unless a newer state was stored meanwhile. The
    /// bytes are at an index already applied, hence committed and in the local log, so raising
    /// the stored commit to it (when it is behind) keeps `applied <= commit <= last`.
    fn persist_encoded(&mut self) -> Result<(), StorageError> {
        let Some((index, bytes)) = self.encoded.take() else {
            return Ok(());
        };
        if index <= self.persisted_sm_index {
            debug!(
                id = self.settings.id,
                index,
                persisted = self.persisted_sm_index,
                "encoded state overtaken by a newer stored state; dropped"
            );
            return Ok(());
        }
        let stored_commit = self.raw.store().hard_state().commit;
        self.raw.mut_store().write(WriteBatch {
            commit: (stored_commit < index).then_some(index),
            applied: Some((index, &bytes)),
            ..Default::default()
        })?;
        self.persisted_sm_index = index;
        self.maybe_compact()
    }

    fn restore_snapshot(&mut self, snapshot: &Snapshot) {
        match decode_state(snapshot.get_data()) {
            Ok((members, app)) => {
                if let Err(e) = self.sm.restore(app) {
                    // A leader sent state we cannot read: continuing would diverge.
                    panic!(
                        "snapshot at index {} cannot be restored: {e}",
                        snapshot.get_metadata().index
                    );
                }
                self.members = members;
                info!(
                    id = self.settings.id,
                    index = snapshot.get_metadata().index,
                    "installed a snapshot from the leader"
                );
            }
            Err(e) => panic!(
                "snapshot at index {} is malformed: {e}",
                snapshot.get_metadata().index
            ),
        }
        self.sm.after_batch(snapshot.get_metadata().index);
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> ApplyOutcome {
        let mut outcome = ApplyOutcome::default();
        for entry in entries {
            outcome.last_applied = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if entry.data.is_empty() {
                        // The empty entry a new leader appends at the start of its term.
                        continue;
                    }
                    let output = self.sm.apply(entry.index, &entry.data);
                    outcome
                        .outputs
                        .push((entry.context.to_vec(), entry.index, output));
                }
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    if let Err(e) = cc.merge_from_bytes(&entry.data) {
                        panic!(
                            "committed conf change at index {} is malformed: {e}",
                            entry.index
                        );
                    }
                    let result = match self.raw.apply_conf_change(&cc) {
                        Ok(conf_state) => {
                            self.apply_membership(&cc);
                            outcome.conf_state = Some(conf_state);
                            Ok(self.members.clone())
                        }
                        Err(e) => {
                            warn!(index = entry.index, error = %e, "conf change not applied");
                            Err(ProposeError::Rejected(e.to_string()))
                        }
                    };
                    outcome.conf_outputs.push((entry.context.to_vec(), result));
                }
                EntryType::EntryConfChangeV2 => {
                    panic!(
                        "committed joint conf change at index {}: this monitor never proposes one",
                        entry.index
                    )
                }
            }
        }
        if outcome.last_applied > 0 {
            self.sm.after_batch(outcome.last_applied);
        }
        outcome
    }

    fn apply_membership(&mut self, cc: &ConfChange) {
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                let address = String::from_utf8_lossy(&cc.context).into_owned();
                info!(id = cc.node_id, %address, "monitor added to the group");
                self.members.insert(cc.node_id, address);
            }
            ConfChangeType::RemoveNode => {
                info!(id = cc.node_id, "monitor removed from the group");
                self.members.remove(&cc.node_id);
                if cc.node_id == self.settings.id {
                    self.removed = true;
                }
            }
        }
    }

    /// Answers the proposers of what was just applied, once it is durable.
    fn finish_applied(&mut self, outcome: &mut ApplyOutcome) {
        for (ctx, index, output) in outcome.outputs.drain(..) {
            if let Some(reply) = self.proposals.remove(&ctx) {
                let _ = reply.send(Ok((index, output)));
            }
        }
        for (ctx, result) in outcome.conf_outputs.drain(..) {
            if let Some(reply) = self.conf_changes.remove(&ctx) {
                let _ = reply.send(result);
            }
        }
        let applied = self.raw.raft.raft_log.applied.max(outcome.last_applied);
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .waiting_reads
            .drain(..)
            .partition(|(index, _)| *index <= applied);
        self.waiting_reads = waiting;
        for (_, reply) in ready {
            let _ = reply.send(Ok(applied));
        }
    }

    fn maybe_compact(&mut self) -> Result<(), StorageError> {
        let Ok(first) = raft::Storage::first_index(self.raw.store()) else {
            return Ok(());
        };
        if self.persisted_sm_index >= first + self.settings.compact_after {
            self.raw.mut_store().compact(self.persisted_sm_index)?;
            debug!(
                id = self.settings.id,
                index = self.persisted_sm_index,
                "log compacted"
            );
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let is_leader = raft.state == StateRole::Leader;
        if self.was_leader && !is_leader {
            info!(id = self.settings.id, term = raft.term, "lost leadership");
            self.fail_pending(|| ProposeError::Dropped);
        } else if !self.was_leader && is_leader {
            info!(
                id = self.settings.id,
                term = self.raw.raft.term,
                "became leader"
            );
        }
        let raft = &self.raw.raft;
        self.was_leader = is_leader;
        let matched = if is_leader {
            raft.prs()
                .iter()
                .map(|(id, pr)| (*id, pr.matched))
                .collect()
        } else {
            BTreeMap::new()
        };
        let next = RaftStatus {
            id: self.settings.id,
            leader_id: raft.leader_id,
            term: raft.term,
            is_leader,
            commit_index: raft.raft_log.committed,
            applied_index: raft.raft_log.applied,
            members: self.members.clone(),
            matched,
            removed: self.removed,
            refused: self.refused.clone(),
            stopped: false,
        };
        self.status.send_if_modified(|s| {
            if *s == next {
                false
            } else {
                *s = next;
                true
            }
        });
    }
}

#[derive(Default)]
struct ApplyOutcome {
    last_applied: u64,
    outputs: Vec<(Vec<u8>, u64, Vec<u8>)>,
    conf_outputs: Vec<(Vec<u8>, Result<Members, ProposeError>)>,
    conf_state: Option<ConfState>,
}
