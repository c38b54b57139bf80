//! Durable Raft storage for the monitor: the raft-rs log, hard state, conf state, applied index
//! and the replicated state machine, all in one redb file.
//!
//! The Raft ready loop owns one [`RaftStore`] (inside `RawNode<RaftStore>`) and persists each
//! Ready cycle with a single [`RaftStore::write`]: log entries, hard state, conf state, applied
//! index and state machine bytes go into ONE redb write transaction, committed with redb's default
//! durability (fsync before `commit` returns). Hence a crash at any instant leaves either the whole
//! cycle or none of it, and an entry is never acknowledged before it is on disk.
//!
//! Invariants, checked before every write (a violating write is refused, nothing is written) and
//! again on open (a violation is reported as [`StorageError::Corrupt`] naming what broke):
//! - the log holds exactly the indexes `first..=last` with no gap, where
//!   `first = truncated.index + 1` and `truncated` is the last entry dropped by compaction or
//!   replaced by a snapshot (its term is kept: raft asks for the term at `first - 1`);
//! - `truncated.index <= applied <= commit <= last`;
//! - a state machine is stored exactly when `applied > 0`, and it is the state at `applied`.
//!
//! The caller keeps one more: the stored conf state is the one in force at `applied`, because it
//! passes `conf_state` in the same batch as the `applied` index that covers the conf change.
//! Restart raft with `Config::applied = applied_index()` and the state machine from
//! `state_machine()`; committed entries after it are handed out again.
//!
//! Reads on raft's hot path (`first_index`, `last_index`, the term of the last and truncated
//! entries, the hard and conf states) come from an in-memory copy that is replaced only after a
//! transaction commits, so memory never runs ahead of disk.

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, NO_LIMIT, RaftState, Storage};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tracing::{debug, info, warn};

/// Raft log: entry index -> protobuf-encoded `Entry`.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Everything else, one key each (see the `KEY_*` constants).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const KEY_FORMAT: &str = "format";
const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_TRUNCATED: &str = "truncated";
const KEY_APPLIED: &str = "applied";
const KEY_STATE_MACHINE: &str = "state_machine";

/// On-disk layout version; bump it when the tables or the encodings above change.
const FORMAT_VERSION: u64 = 1;

/// redb caches pages in memory up to this size; the default (1 GiB) is far more than a catalog
/// needs and three monitors may share one machine.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Errors of the Raft store. Every one of them means the write (or open) did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("raft store {} is already open (held by another process or handle)", path.display())]
    Locked { path: PathBuf },
    #[error("cannot open raft store {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("cannot create the directory of raft store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("raft store is corrupt: {0}")]
    Corrupt(String),
    #[error("raft store refused the write: {0}")]
    InvalidWrite(String),
    #[error("raft store is already initialized; bootstrap only runs on a brand-new member")]
    AlreadyInitialized,
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: protobuf::ProtobufError,
    },
    #[error("redb transaction: {0}")]
    Transaction(#[from] redb::TransactionError),
    #[error("redb table: {0}")]
    Table(#[from] redb::TableError),
    #[error("redb storage: {0}")]
    Redb(#[from] redb::StorageError),
    #[error("redb commit: {0}")]
    Commit(#[from] redb::CommitError),
}

/// Everything one Ready cycle asks to persist; applied in this order: snapshot, entries, hard
/// state, commit, conf state, applied. Leave a field at its default when the cycle has nothing for
/// it (in particular pass `snapshot: None` when `Ready::snapshot()` is empty).
#[derive(Debug, Default)]
pub struct WriteBatch<'a> {
    /// A snapshot received from the leader: replaces the log and the state machine
    /// (state machine := snapshot.data, applied := snapshot index, conf state := its conf state).
    /// Its index must be above the stored commit index, as raft guarantees.
    pub snapshot: Option<&'a Snapshot>,
    /// Entries to append; an entry whose index already exists truncates the log from there.
    pub entries: &'a [Entry],
    pub hard_state: Option<&'a HardState>,
    /// Commit index from a LightReady (updates only the commit of the stored hard state).
    pub commit: Option<u64>,
    /// Conf state after applying a conf change entry (stored together with `applied`).
    pub conf_state: Option<&'a ConfState>,
    /// The new applied index and the full state machine bytes at that index.
    pub applied: Option<(u64, &'a [u8])>,
}

impl WriteBatch<'_> {
    /// True when the cycle has nothing to persist; `write` then returns at once, without a commit.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.commit.is_none()
            && self.conf_state.is_none()
            && self.applied.is_none()
    }
}

/// Index and term of one log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct LogPosition {
    index: u64,
    term: u64,
}

/// The small persisted state kept in memory; cloned to plan a write, swapped in after commit.
#[derive(Debug, Clone, PartialEq, Default)]
struct Meta {
    hard_state: HardState,
    conf_state: ConfState,
    /// Last entry dropped by compaction or replaced by a snapshot; (0, 0) for a fresh log.
    truncated: LogPosition,
    /// Last entry of the log; equals `truncated` when the log is empty.
    last: LogPosition,
    applied: u64,
}

impl Meta {
    fn first_index(&self) -> u64 {
        self.truncated.index + 1
    }

    /// The invariants listed in the module docs, as a description of the first one broken.
    fn broken_invariant(&self, has_state_machine: bool) -> Option<String> {
        let Meta {
            hard_state,
            truncated,
            last,
            applied,
            ..
        } = self;
        let commit = hard_state.commit;
        if last.index < truncated.index {
            return Some(format!(
                "last index {} is below the truncated index {}",
                last.index, truncated.index
            ));
        }
        if *applied < truncated.index {
            return Some(format!(
                "applied index {applied} is below the snapshot/compaction index {}",
                truncated.index
            ));
        }
        if *applied > commit {
            return Some(format!(
                "applied index {applied} is above the commit index {commit}"
            ));
        }
        if commit > last.index {
            return Some(format!(
                "commit index {commit} is above the last log index {}",
                last.index
            ));
        }
        if has_state_machine != (*applied > 0) {
            return Some(format!(
                "applied index {applied} but state machine {}",
                if has_state_machine {
                    "present"
                } else {
                    "missing"
                }
            ));
        }
        None
    }
}

/// Durable raft-rs storage backed by one redb file. See the module docs for its invariants.
pub struct RaftStore {
    db: Database,
    path: PathBuf,
    meta: Meta,
    /// State machine bytes at `meta.applied`; kept in memory because snapshots serve them and the
    /// catalog is small (it is rewritten whole on every apply anyway).
    state_machine: Option<Vec<u8>>,
}

impl fmt::Debug for RaftStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftStore")
            .field("path", &self.path)
            .field("first", &self.meta.first_index())
            .field("last", &self.meta.last.index)
            .field("commit", &self.meta.hard_state.commit)
            .field("applied", &self.meta.applied)
            .field("term", &self.meta.hard_state.term)
            .finish()
    }
}

/// What a validated batch changes, computed before the transaction starts.
struct Plan<'a> {
    meta: Meta,
    /// A snapshot replaces the whole log.
    clear_log: bool,
    /// Drop entries from this index to the old last one (a conflicting append).
    truncate_from: Option<u64>,
    append: &'a [Entry],
    state_machine: Option<&'a [u8]>,
}

impl RaftStore {
    /// Opens or creates the database file. Fails with a clear error when another process holds it,
    /// and with [`StorageError::Corrupt`] when the persisted state breaks an invariant.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StorageError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            // A damaged file must come back as an error, never as a panic inside redb.
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => StorageError::Locked {
                    path: path.to_path_buf(),
                },
                source => StorageError::Open {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        ensure_layout(&db)?;
        let (meta, state_machine) = load(&db)?;
        info!(
            path = %path.display(),
            first = meta.first_index(),
            last = meta.last.index,
            commit = meta.hard_state.commit,
            applied = meta.applied,
            term = meta.hard_state.term,
            "raft store opened"
        );
        Ok(Self {
            db,
            path: path.to_path_buf(),
            meta,
            state_machine,
        })
    }

    /// True once `bootstrap` ran or anything was persisted (hard state, entries, snapshot).
    pub fn is_initialized(&self) -> bool {
        self.meta.conf_state != ConfState::default()
            || self.meta.hard_state != HardState::default()
            || self.meta.last.index > 0
    }

    /// First start of a brand-new cluster member: sets the initial ConfState (voters) at index 0.
    pub fn bootstrap(&mut self, voters: &[u64]) -> Result<(), StorageError> {
        if self.is_initialized() {
            return Err(StorageError::AlreadyInitialized);
        }
        if voters.is_empty() || voters.contains(&0) {
            return Err(StorageError::InvalidWrite(format!(
                "bootstrap needs at least one voter and no id 0, got {voters:?}"
            )));
        }
        let mut meta = self.meta.clone();
        meta.conf_state.voters = voters.to_vec();
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(META)?;
            put_meta(&mut table, &meta)?;
        }
        txn.commit()?;
        info!(voters = ?voters, "raft store bootstrapped");
        self.meta = meta;
        Ok(())
    }

    /// Persists one Ready cycle in one transaction (see WriteBatch). Returns once the commit is
    /// durable (fsync); on error nothing of the batch was written and memory is unchanged.
    pub fn write(&mut self, batch: WriteBatch<'_>) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let plan = self.plan(&batch).inspect_err(|e| {
            warn!(error = %e, "raft store write refused");
        })?;
        let txn = self.db.begin_write()?;
        {
            let mut log = txn.open_table(LOG)?;
            if plan.clear_log {
                log.retain(|_, _| false)?;
            }
            if let Some(from) = plan.truncate_from {
                log.retain_in(from..=self.meta.last.index, |_, _| false)?;
            }
            for entry in plan.append {
                let bytes = entry
                    .write_to_bytes()
                    .map_err(|source| StorageError::Encode {
                        what: "log entry",
                        source,
                    })?;
                log.insert(entry.index, bytes.as_slice())?;
            }
            let mut meta = txn.open_table(META)?;
            put_meta(&mut meta, &plan.meta)?;
            if let Some(bytes) = plan.state_machine {
                meta.insert(KEY_STATE_MACHINE, bytes)?;
            }
        }
        txn.commit()?;

        if plan.clear_log {
            info!(
                index = plan.meta.truncated.index,
                term = plan.meta.truncated.term,
                "snapshot installed"
            );
        }
        if let Some(from) = plan.truncate_from {
            info!(
                from,
                old_last = self.meta.last.index,
                "log truncated by conflicting entries"
            );
        }
        debug!(
            appended = plan.append.len(),
            last = plan.meta.last.index,
            commit = plan.meta.hard_state.commit,
            applied = plan.meta.applied,
            "raft store write"
        );
        self.meta = plan.meta;
        if let Some(bytes) = plan.state_machine {
            self.state_machine = Some(bytes.to_vec());
        }
        Ok(())
    }

    /// Validates `batch` against the current state and computes the state after it.
    fn plan<'a>(&self, batch: &WriteBatch<'a>) -> Result<Plan<'a>, StorageError> {
        let mut plan = Plan {
            meta: self.meta.clone(),
            clear_log: false,
            truncate_from: None,
            append: batch.entries,
            state_machine: None,
        };
        let meta = &mut plan.meta;

        if let Some(snapshot) = batch.snapshot {
            let snap = snapshot.get_metadata();
            if snap.index <= meta.hard_state.commit {
                return Err(StorageError::InvalidWrite(format!(
                    "snapshot index {} is not above the commit index {}",
                    snap.index, meta.hard_state.commit
                )));
            }
            let position = LogPosition {
                index: snap.index,
                term: snap.term,
            };
            meta.truncated = position;
            meta.last = position;
            meta.hard_state.term = meta.hard_state.term.max(snap.term);
            meta.hard_state.commit = snap.index;
            meta.conf_state = snap.get_conf_state().clone();
            meta.applied = snap.index;
            plan.clear_log = true;
            plan.state_machine = Some(&snapshot.data[..]);
        }

        if let (Some(head), Some(tail)) = (batch.entries.first(), batch.entries.last()) {
            if let Some(pair) = batch
                .entries
                .windows(2)
                .find(|pair| pair[1].index != pair[0].index + 1)
            {
                return Err(StorageError::InvalidWrite(format!(
                    "entries are not contiguous: {} is followed by {}",
                    pair[0].index, pair[1].index
                )));
            }
            if head.index < meta.first_index() {
                return Err(StorageError::InvalidWrite(format!(
                    "entry {} is below the first log index {} (compacted)",
                    head.index,
                    meta.first_index()
                )));
            }
            if head.index > meta.last.index + 1 {
                return Err(StorageError::InvalidWrite(format!(
                    "entry {} leaves a gap after the last log index {}",
                    head.index, meta.last.index
                )));
            }
            if head.index <= meta.last.index {
                if head.index <= meta.hard_state.commit {
                    return Err(StorageError::InvalidWrite(format!(
                        "entry {} would overwrite a committed entry (commit {})",
                        head.index, meta.hard_state.commit
                    )));
                }
                // A snapshot in the same batch already emptied the log.
                if !plan.clear_log {
                    plan.truncate_from = Some(head.index);
                }
            }
            meta.last = LogPosition {
                index: tail.index,
                term: tail.term,
            };
        }

        if let Some(hard_state) = batch.hard_state {
            check_commit_forward(meta.hard_state.commit, hard_state.commit)?;
            meta.hard_state = hard_state.clone();
        }
        if let Some(commit) = batch.commit {
            check_commit_forward(meta.hard_state.commit, commit)?;
            meta.hard_state.commit = commit;
        }
        if let Some(conf_state) = batch.conf_state {
            meta.conf_state = conf_state.clone();
        }
        if let Some((index, bytes)) = batch.applied {
            if index == 0 || index < meta.applied {
                return Err(StorageError::InvalidWrite(format!(
                    "applied index {index} would move back from {}",
                    meta.applied
                )));
            }
            meta.applied = index;
            plan.state_machine = Some(bytes);
        }

        let has_state_machine = plan.state_machine.is_some() || self.state_machine.is_some();
        if let Some(broken) = plan.meta.broken_invariant(has_state_machine) {
            return Err(StorageError::InvalidWrite(broken));
        }
        Ok(plan)
    }

    pub fn applied_index(&self) -> u64 {
        self.meta.applied
    }

    /// State machine bytes at `applied_index()` (None before anything was applied).
    pub fn state_machine(&self) -> Option<Vec<u8>> {
        self.state_machine.clone()
    }

    /// Drops log entries below `index` (index <= applied). The snapshot served afterwards is
    /// (applied index, its term, conf state, state machine bytes).
    pub fn compact(&mut self, index: u64) -> Result<(), StorageError> {
        if index > self.meta.applied {
            return Err(StorageError::InvalidWrite(format!(
                "compaction to {index} is beyond the applied index {}",
                self.meta.applied
            )));
        }
        let first = self.meta.first_index();
        if index <= first {
            debug!(index, first, "nothing to compact");
            return Ok(());
        }
        let mut meta = self.meta.clone();
        meta.truncated = LogPosition {
            index: index - 1,
            term: self.term_of(index - 1)?,
        };
        let txn = self.db.begin_write()?;
        {
            let mut log = txn.open_table(LOG)?;
            log.retain_in(first..index, |_, _| false)?;
            let mut table = txn.open_table(META)?;
            put_meta(&mut table, &meta)?;
        }
        txn.commit()?;
        info!(first = index, dropped = index - first, "raft log compacted");
        self.meta = meta;
        Ok(())
    }

    pub fn hard_state(&self) -> HardState {
        self.meta.hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.meta.conf_state.clone()
    }

    /// Term of `index`, which must be in `truncated.index..=last`.
    fn term_of(&self, index: u64) -> Result<u64, StorageError> {
        if index == self.meta.truncated.index {
            return Ok(self.meta.truncated.term);
        }
        if index == self.meta.last.index {
            return Ok(self.meta.last.term);
        }
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let value = log
            .get(index)?
            .ok_or_else(|| StorageError::Corrupt(format!("log entry {index} is missing")))?;
        Ok(decode_entry(index, value.value())?.term)
    }

    /// Entries `low..high` (all inside the log), cut by raft's `max_size` rule: the first entry
    /// always, then entries while the running encoded size stays within the limit.
    fn read_entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, StorageError> {
        let limit = max_size.filter(|&max| max != NO_LIMIT);
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let wanted = high - low;
        let mut entries = Vec::with_capacity(usize::try_from(wanted.min(1024)).unwrap_or(1024));
        let mut size = 0u64;
        for item in log.range(low..high)? {
            let (key, value) = item?;
            let expected = low + entries.len() as u64;
            if key.value() != expected {
                return Err(StorageError::Corrupt(format!(
                    "log entry {expected} is missing (found {})",
                    key.value()
                )));
            }
            let entry = decode_entry(expected, value.value())?;
            if let Some(limit) = limit {
                size += u64::from(entry.compute_size());
                if !entries.is_empty() && size > limit {
                    return Ok(entries);
                }
            }
            entries.push(entry);
        }
        if entries.len() as u64 != wanted {
            return Err(StorageError::Corrupt(format!(
                "log entries {}..{high} are missing",
                low + entries.len() as u64
            )));
        }
        Ok(entries)
    }
}

fn check_commit_forward(current: u64, new: u64) -> Result<(), StorageError> {
    if new < current {
        return Err(StorageError::InvalidWrite(format!(
            "commit index would move back from {current} to {new}"
        )));
    }
    Ok(())
}

fn raft_error(error: StorageError) -> raft::Error {
    raft::Error::Store(raft::StorageError::Other(Box::new(error)))
}

impl Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.meta.hard_state.clone(),
            self.meta.conf_state.clone(),
        ))
    }

    /// Unlike `MemStorage`, `high` beyond `last_index() + 1` is reported as `Unavailable` instead
    /// of a panic.
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.meta.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > self.meta.last.index + 1 {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        self.read_entries(low, high, max_size.into())
            .map_err(raft_error)
    }

    /// The term of `first_index() - 1` is kept across compaction and snapshots, as the trait asks.
    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.meta.truncated.index {
            return Ok(self.meta.truncated.term);
        }
        if idx < self.meta.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if idx > self.meta.last.index {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        self.term_of(idx).map_err(raft_error)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.meta.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.meta.last.index)
    }

    /// The applied state; `SnapshotTemporarilyUnavailable` while nothing is applied or the applied
    /// index is still behind `request_index` (raft retries later).
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let applied = self.meta.applied;
        let Some(data) = self
            .state_machine
            .as_ref()
            .filter(|_| applied >= request_index)
        else {
            debug!(applied, request_index, to, "snapshot not ready yet");
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        };
        let mut snapshot = Snapshot {
            data: data.clone().into(),
            ..Snapshot::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = applied;
        metadata.term = self.term_of(applied).map_err(raft_error)?;
        metadata.set_conf_state(self.meta.conf_state.clone());
        info!(index = applied, term = metadata.term, to, "snapshot served");
        Ok(snapshot)
    }
}

/// Creates the tables of a new file (and stamps its format), or checks the format of an old one.
fn ensure_layout(db: &Database) -> Result<(), StorageError> {
    let txn = db.begin_write()?;
    {
        txn.open_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        let format = meta
            .get(KEY_FORMAT)?
            .map(|v| decode_u64s::<1>(KEY_FORMAT, v.value()));
        match format {
            None => {
                meta.insert(KEY_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
            }
            Some(Ok([FORMAT_VERSION])) => {}
            Some(Ok([other])) => {
                return Err(StorageError::Corrupt(format!(
                    "unknown format version {other} (this build reads {FORMAT_VERSION})"
                )));
            }
            Some(Err(e)) => return Err(e),
        }
    }
    txn.commit()?;
    Ok(())
}

/// Reads the persisted state and checks the invariants of the module docs.
fn load(db: &Database) -> Result<(Meta, Option<Vec<u8>>), StorageError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(META)?;
    let get = |key: &str| -> Result<Option<Vec<u8>>, StorageError> {
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    };
    let hard_state = get(KEY_HARD_STATE)?
        .map(|b| decode_message::<HardState>(KEY_HARD_STATE, &b))
        .transpose()?
        .unwrap_or_default();
    let conf_state = get(KEY_CONF_STATE)?
        .map(|b| decode_message::<ConfState>(KEY_CONF_STATE, &b))
        .transpose()?
        .unwrap_or_default();
    let truncated = get(KEY_TRUNCATED)?
        .map(|b| decode_u64s::<2>(KEY_TRUNCATED, &b))
        .transpose()?
        .map(|[index, term]| LogPosition { index, term })
        .unwrap_or_default();
    let applied = get(KEY_APPLIED)?
        .map(|b| decode_u64s::<1>(KEY_APPLIED, &b))
        .transpose()?
        .map_or(0, |[applied]| applied);
    let state_machine = get(KEY_STATE_MACHINE)?;

    let log = txn.open_table(LOG)?;
    let last = match (log.first()?, log.last()?) {
        (Some((first_key, first_value)), Some((last_key, last_value))) => {
            let (first_index, last_index) = (first_key.value(), last_key.value());
            if first_index != truncated.index + 1 {
                return Err(StorageError::Corrupt(format!(
                    "log starts at {first_index} but the snapshot/compaction index is {}",
                    truncated.index
                )));
            }
            let len = log.len()?;
            if len != last_index - first_index + 1 {
                return Err(StorageError::Corrupt(format!(
                    "log {first_index}..={last_index} holds {len} entries: it has gaps"
                )));
            }
            decode_entry(first_index, first_value.value())?;
            let last_entry = decode_entry(last_index, last_value.value())?;
            LogPosition {
                index: last_index,
                term: last_entry.term,
            }
        }
        _ => truncated,
    };
    let meta = Meta {
        hard_state,
        conf_state,
        truncated,
        last,
        applied,
    };
    if let Some(broken) = meta.broken_invariant(state_machine.is_some()) {
        return Err(StorageError::Corrupt(broken));
    }
    Ok((meta, state_machine))
}

fn put_meta(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    meta: &Meta,
) -> Result<(), StorageError> {
    let hard_state = meta
        .hard_state
        .write_to_bytes()
        .map_err(|source| StorageError::Encode {
            what: "hard state",
            source,
        })?;
    let conf_state = meta
        .conf_state
        .write_to_bytes()
        .map_err(|source| StorageError::Encode {
            what: "conf state",
            source,
        })?;
    let mut truncated = [0u8; 16];
    truncated[..8].copy_from_slice(&meta.truncated.index.to_le_bytes());
    truncated[8..].copy_from_slice(&meta.truncated.term.to_le_bytes());
    table.insert(KEY_HARD_STATE, hard_state.as_slice())?;
    table.insert(KEY_CONF_STATE, conf_state.as_slice())?;
    table.insert(KEY_TRUNCATED, truncated.as_slice())?;
    table.insert(KEY_APPLIED, meta.applied.to_le_bytes().as_slice())?;
    Ok(())
}

fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StorageError> {
    let entry = Entry::parse_from_bytes(bytes)
        .map_err(|e| StorageError::Corrupt(format!("log entry {index} does not decode: {e}")))?;
    if entry.index != index {
        return Err(StorageError::Corrupt(format!(
            "log entry stored under {index} carries index {}",
            entry.index
        )));
    }
    Ok(entry)
}

fn decode_message<M: protobuf::Message>(key: &str, bytes: &[u8]) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes)
        .map_err(|e| StorageError::Corrupt(format!("{key} does not decode: {e}")))
}

/// Little-endian u64s stored back to back.
fn decode_u64s<const N: usize>(key: &str, bytes: &[u8]) -> Result<[u64; N], StorageError> {
    if bytes.len() != N * 8 {
        return Err(StorageError::Corrupt(format!(
            "{key} is {} bytes long, expected {}",
            bytes.len(),
            N * 8
        )));
    }
    let mut out = [0u64; N];
    for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        *slot = u64::from_le_bytes(word);
    }
    Ok(out)
}
