//! Unit tests of `RaftStore` on real redb files, and the crash-consistency test that SIGKILLs a
//! writer process (this test binary re-executed) in the middle of a stream of writes.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage};
use redb::Database;

use super::{KEY_APPLIED, LOG, META, RaftStore, StorageError, WriteBatch};

pub(super) fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Entry::default()
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range
        .map(|i| entry(i, term, format!("entry {i}").as_bytes()))
        .collect()
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..HardState::default()
    }
}

fn voters(ids: &[u64]) -> ConfState {
    ConfState {
        voters: ids.to_vec(),
        ..ConfState::default()
    }
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn store_in(dir: &tempfile::TempDir) -> RaftStore {
    RaftStore::open(&dir.path().join("raft.redb")).unwrap()
}

fn reopen(store: RaftStore, dir: &tempfile::TempDir) -> RaftStore {
    drop(store);
    store_in(dir)
}

/// Appends `1..=last` at `term` with commit `commit`, as one Ready cycle.
fn append(store: &mut RaftStore, ents: &[Entry], commit: u64) {
    let term = ents.last().map_or(1, |e| e.term);
    store
        .write(WriteBatch {
            entries: ents,
            hard_state: Some(&hard_state(term, 1, commit)),
            ..WriteBatch::default()
        })
        .unwrap();
}

fn apply(store: &mut RaftStore, index: u64, state: &[u8]) {
    store
        .write(WriteBatch {
            applied: Some((index, state)),
            ..WriteBatch::default()
        })
        .unwrap();
}

fn is_store_error(result: raft::Result<impl std::fmt::Debug>, want: &raft::StorageError) -> bool {
    matches!(result, Err(raft::Error::Store(ref e)) if e == want)
}

/// Everything the store answers, to compare a store with its reopened self.
#[derive(Debug, PartialEq)]
struct View {
    hard_state: HardState,
    conf_state: ConfState,
    initialized: bool,
    first: u64,
    last: u64,
    terms: Vec<Result<u64, String>>,
    log: Vec<Entry>,
    applied: u64,
    state_machine: Option<Vec<u8>>,
    snapshot: Result<Snapshot, String>,
}

fn view(store: &RaftStore) -> View {
    let state = store.initial_state().unwrap();
    let first = store.first_index().unwrap();
    let last = store.last_index().unwrap();
    View {
        hard_state: state.hard_state,
        conf_state: state.conf_state,
        initialized: store.is_initialized(),
        first,
        last,
        terms: (0..=last + 1)
            .map(|i| store.term(i).map_err(|e| e.to_string()))
            .collect(),
        log: store.entries(first, last + 1, None, ctx()).unwrap(),
        applied: store.applied_index(),
        state_machine: store.state_machine(),
        snapshot: store.snapshot(0, 2).map_err(|e| e.to_string()),
    }
}

#[test]
fn the_store_can_move_to_the_raft_thread() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<RaftStore>();
    assert_send::<StorageError>();
}

#[test]
fn bootstrap_and_reopen_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    assert!(!store.is_initialized());
    assert_eq!(
        store.initial_state().unwrap().conf_state,
        ConfState::default()
    );

    store.bootstrap(&[1, 2, 3]).unwrap();
    assert!(store.is_initialized());
    let store = reopen(store, &dir);
    assert!(store.is_initialized());
    let state = store.initial_state().unwrap();
    assert_eq!(state.conf_state, voters(&[1, 2, 3]));
    assert_eq!(state.hard_state, HardState::default());
    assert_eq!(store.first_index().unwrap(), 1);
    assert_eq!(store.last_index().unwrap(), 0);
    assert_eq!(store.term(0).unwrap(), 0);
    assert_eq!(store.applied_index(), 0);
    assert_eq!(store.state_machine(), None);

    let mut store = store;
    assert!(matches!(
        store.bootstrap(&[1]),
        Err(StorageError::AlreadyInitialized)
    ));
}

#[test]
fn bootstrap_refuses_empty_voters() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    assert!(matches!(
        store.bootstrap(&[]),
        Err(StorageError::InvalidWrite(_))
    ));
    assert!(!reopen(store, &dir).is_initialized());
}

#[test]
fn a_second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _held = store_in(&dir);
    let err = RaftStore::open(&dir.path().join("raft.redb")).unwrap_err();
    assert!(matches!(err, StorageError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("already open"), "{err}");
}

#[test]
fn append_then_truncate_on_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    store.bootstrap(&[1]).unwrap();
    append(&mut store, &entries(1..=5, 1), 2);
    assert_eq!(store.last_index().unwrap(), 5);
    assert_eq!(store.entries(1, 6, None, ctx()).unwrap(), entries(1..=5, 1));

    // A new leader's entry at 4 replaces 4 and 5.
    append(&mut store, &[entry(4, 2, b"new 4")], 2);
    assert_eq!(store.last_index().unwrap(), 4);
    assert_eq!(store.term(4).unwrap(), 2);
    assert_eq!(store.term(3).unwrap(), 1);
    assert!(is_store_error(
        store.term(5),
        &raft::StorageError::Unavailable
    ));
    assert_eq!(
        store.entries(4, 5, None, ctx()).unwrap(),
        vec![entry(4, 2, b"new 4")]
    );
    assert!(is_store_error(
        store.entries(4, 6, None, ctx()),
        &raft::StorageError::Unavailable
    ));

    let before = view(&store);
    let refused = [
        (vec![entry(6, 2, b"gap")], "gap"),
        (vec![entry(2, 3, b"committed")], "committed"),
        (vec![entry(5, 2, b"a"), entry(7, 2, b"b")], "contiguous"),
    ];
    for (ents, why) in refused {
        let err = store
            .write(WriteBatch {
                entries: &ents,
                ..WriteBatch::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
    assert_eq!(view(&store), before);
    let store = reopen(store, &dir);
    assert_eq!(view(&store), before);
}

#[test]
fn compact_then_entries_below_first_are_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    store.bootstrap(&[1]).unwrap();
    let mut ents = entries(1..=3, 1);
    ents.extend(entries(4..=10, 2));
    append(&mut store, &ents, 8);
    apply(&mut store, 6, b"state at 6");

    assert!(matches!(
        store.compact(7),
        Err(StorageError::InvalidWrite(_))
    ));
    store.compact(5).unwrap();
    assert_eq!(store.first_index().unwrap(), 5);
    assert!(is_store_error(
        store.entries(4, 6, None, ctx()),
        &raft::StorageError::Compacted
    ));
    assert!(is_store_error(
        store.term(3),
        &raft::StorageError::Compacted
    ));
    // The term just below the first index survives compaction.
    assert_eq!(store.term(4).unwrap(), 2);
    assert_eq!(
        store.entries(5, 11, None, ctx()).unwrap(),
        ents[4..].to_vec()
    );

    // Compacting at or below the first index changes nothing.
    store.compact(3).unwrap();
    assert_eq!(store.first_index().unwrap(), 5);

    let before = view(&store);
    let store = reopen(store, &dir);
    assert_eq!(view(&store), before);
}

#[test]
fn snapshot_serves_the_applied_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    store.bootstrap(&[1, 2, 3]).unwrap();
    assert!(is_store_error(
        store.snapshot(0, 2),
        &raft::StorageError::SnapshotTemporarilyUnavailable
    ));

    let ents = [
        entry(1, 1, b"a"),
        entry(2, 1, b"b"),
        entry(3, 2, b"c"),
        entry(4, 2, b"d"),
        entry(5, 3, b"e"),
    ];
    append(&mut store, &ents, 5);
    store
        .write(WriteBatch {
            conf_state: Some(&voters(&[1, 2])),
            applied: Some((4, b"state at 4")),
            ..WriteBatch::default()
        })
        .unwrap();

    let snap = store.snapshot(3, 2).unwrap();
    assert_eq!(snap.get_metadata().index, 4);
    assert_eq!(snap.get_metadata().term, 2);
    assert_eq!(snap.get_metadata().get_conf_state(), &voters(&[1, 2]));
    assert_eq!(&snap.data[..], b"state at 4");
    assert!(is_store_error(
        store.snapshot(5, 2),
        &raft::StorageError::SnapshotTemporarilyUnavailable
    ));

    // After compaction up to the applied index the snapshot still names its term.
    store.compact(4).unwrap();
    store.compact(4).unwrap();
    assert_eq!(store.snapshot(0, 3).unwrap(), snap);
    let store = reopen(store, &dir);
    assert_eq!(store.snapshot(0, 3).unwrap(), snap);
}

fn snapshot(index: u64, term: u64, ids: &[u64], data: &[u8]) -> Snapshot {
    let mut snap = Snapshot {
        data: data.to_vec().into(),
        ..Snapshot::default()
    };
    let meta = snap.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(voters(ids));
    snap
}

#[test]
fn install_a_snapshot_from_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    store.bootstrap(&[1, 2, 3]).unwrap();
    append(&mut store, &entries(1..=5, 1), 3);
    apply(&mut store, 3, b"state at 3");

    // Not ahead of the commit index: raft never sends that, the store refuses it.
    let stale = snapshot(3, 1, &[1, 2, 3], b"stale");
    assert!(
        store
            .write(WriteBatch {
                snapshot: Some(&stale),
                ..WriteBatch::default()
            })
            .is_err()
    );

    let snap = snapshot(8, 4, &[1, 2, 3, 4], b"leader state at 8");
    store
        .write(WriteBatch {
            snapshot: Some(&snap),
            entries: &[entry(9, 4, b"after snapshot")],
            ..WriteBatch::default()
        })
        .unwrap();
    let check = |store: &RaftStore| {
        assert_eq!(store.first_index().unwrap(), 9);
        assert_eq!(store.last_index().unwrap(), 9);
        assert_eq!(store.term(8).unwrap(), 4);
        assert!(is_store_error(
            store.term(7),
            &raft::StorageError::Compacted
        ));
        assert!(is_store_error(
            store.entries(8, 9, None, ctx()),
            &raft::StorageError::Compacted
        ));
        assert_eq!(
            store.entries(9, 10, None, ctx()).unwrap(),
            vec![entry(9, 4, b"after snapshot")]
        );
        assert_eq!(store.applied_index(), 8);
        assert_eq!(store.state_machine().unwrap(), b"leader state at 8");
        assert_eq!(store.conf_state(), voters(&[1, 2, 3, 4]));
        assert_eq!(store.hard_state(), hard_state(4, 1, 8));
        let served = store.snapshot(0, 2).unwrap();
        assert_eq!(served.get_metadata(), snap.get_metadata());
        assert_eq!(served.data, snap.data);
    };
    check(&store);
    let store = reopen(store, &dir);
    check(&store);
}

#[test]
fn reopen_after_each_kind_of_write_gives_identical_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    let check = |store: RaftStore| -> RaftStore {
        let before = view(&store);
        let store = reopen(store, &dir);
        assert_eq!(view(&store), before);
        store
    };
    store = check(store);
    store.bootstrap(&[1, 2, 3]).unwrap();
    store = check(store);
    // an empty cycle
    assert!(WriteBatch::default().is_empty());
    store.write(WriteBatch::default()).unwrap();
    store = check(store);
    // entries alone
    store
        .write(WriteBatch {
            entries: &entries(1..=4, 1),
            ..WriteBatch::default()
        })
        .unwrap();
    store = check(store);
    // hard state alone
    store
        .write(WriteBatch {
            hard_state: Some(&hard_state(1, 2, 2)),
            ..WriteBatch::default()
        })
        .unwrap();
    store = check(store);
    // commit alone (LightReady)
    store
        .write(WriteBatch {
            commit: Some(3),
            ..WriteBatch::default()
        })
        .unwrap();
    store = check(store);
    // conf state with applied
    store
        .write(WriteBatch {
            conf_state: Some(&voters(&[1, 2])),
            applied: Some((3, b"three")),
            ..WriteBatch::default()
        })
        .unwrap();
    store = check(store);
    // conflicting entries, hard state, commit and applied in one cycle
    store
        .write(WriteBatch {
            entries: &entries(4..=6, 2),
            hard_state: Some(&hard_state(2, 1, 4)),
            commit: Some(5),
            applied: Some((5, b"five")),
            ..WriteBatch::default()
        })
        .unwrap();
    store = check(store);
    // compaction
    store.compact(4).unwrap();
    store = check(store);
    // snapshot
    store
        .write(WriteBatch {
            snapshot: Some(&snapshot(9, 3, &[1, 2, 3], b"nine")),
            ..WriteBatch::default()
        })
        .unwrap();
    store = check(store);
    assert_eq!(store.applied_index(), 9);
}

#[test]
fn applied_beyond_commit_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    store.bootstrap(&[1]).unwrap();
    append(&mut store, &entries(1..=3, 1), 1);
    let before = view(&store);

    let err = store
        .write(WriteBatch {
            entries: &entries(4..=5, 1),
            applied: Some((2, b"two")),
            ..WriteBatch::default()
        })
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidWrite(_)), "{err}");
    assert!(err.to_string().contains("above the commit index"), "{err}");
    // The entries of the refused batch were not written either.
    assert_eq!(view(&store), before);

    // Applied beyond the last entry is refused too, even with a commit that claims it.
    let err = store
        .write(WriteBatch {
            commit: Some(4),
            applied: Some((4, b"four")),
            ..WriteBatch::default()
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("above the last log index"),
        "{err}"
    );
    // A commit moving backwards is refused.
    assert!(
        store
            .write(WriteBatch {
                commit: Some(0),
                ..WriteBatch::default()
            })
            .is_err()
    );
    let store = reopen(store, &dir);
    assert_eq!(view(&store), before);
}

#[test]
fn entries_respect_max_size_and_report_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    let ents = entries(1..=4, 1);
    append(&mut store, &ents, 0);
    let size = |e: &Entry| u64::from(protobuf::Message::compute_size(e));
    // At least one entry, even with a zero budget.
    assert_eq!(store.entries(1, 5, 0, ctx()).unwrap(), ents[..1].to_vec());
    let two = size(&ents[0]) + size(&ents[1]);
    assert_eq!(store.entries(1, 5, two, ctx()).unwrap(), ents[..2].to_vec());
    assert_eq!(
        store.entries(1, 5, two + 1, ctx()).unwrap(),
        ents[..2].to_vec()
    );
    assert_eq!(
        store.entries(1, 5, raft::NO_LIMIT, ctx()).unwrap(),
        ents.clone()
    );
    assert!(is_store_error(
        store.entries(1, 6, None, ctx()),
        &raft::StorageError::Unavailable
    ));
    assert_eq!(store.entries(3, 3, None, ctx()).unwrap(), Vec::new());
}

/// Edits the persisted file behind the store's back and expects open to name what broke.
fn corrupt_and_open(edit: impl FnOnce(&redb::WriteTransaction)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    store.bootstrap(&[1]).unwrap();
    append(&mut store, &entries(1..=6, 1), 4);
    apply(&mut store, 3, b"three");
    drop(store);
    let db = Database::create(dir.path().join("raft.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    edit(&txn);
    txn.commit().unwrap();
    drop(db);
    match RaftStore::open(&dir.path().join("raft.redb")) {
        Err(StorageError::Corrupt(what)) => what,
        other => panic!("expected a corrupt error, got {other:?}"),
    }
}

#[test]
fn open_reports_broken_invariants() {
    let what = corrupt_and_open(|txn| {
        txn.open_table(LOG).unwrap().remove(3).unwrap();
    });
    assert!(what.contains("gaps"), "{what}");

    let what = corrupt_and_open(|txn| {
        let mut meta = txn.open_table(META).unwrap();
        meta.insert(KEY_APPLIED, 5u64.to_le_bytes().as_slice())
            .unwrap();
    });
    assert!(
        what.contains("applied index 5 is above the commit index 4"),
        "{what}"
    );

    let what = corrupt_and_open(|txn| {
        txn.open_table(LOG).unwrap().remove(1).unwrap();
    });
    assert!(what.contains("log starts at 2"), "{what}");

    let what = corrupt_and_open(|txn| {
        let mut log = txn.open_table(LOG).unwrap();
        log.insert(6, b"\xff\xff garbage".as_slice()).unwrap();
    });
    assert!(what.contains("log entry 6 does not decode"), "{what}");

    // A file that redb itself reads fine must still be opened by this build's format only.
    let what = corrupt_and_open(|txn| {
        let mut meta = txn.open_table(META).unwrap();
        meta.insert(super::KEY_FORMAT, 9u64.to_le_bytes().as_slice())
            .unwrap();
    });
    assert!(what.contains("unknown format version 9"), "{what}");
}

// ---- with raft-rs itself ---------------------------------------------------------------------

/// Applies committed entries to a toy state machine (the data of each entry followed by ';').
fn apply_committed(committed: &[Entry], state: &mut Vec<u8>) -> Option<u64> {
    for e in committed.iter().filter(|e| !e.data.is_empty()) {
        state.extend_from_slice(&e.data);
        state.push(b';');
    }
    committed.last().map(|e| e.index)
}

/// The ready loop the monitor runs, reduced to one node: one `write` per Ready, one per LightReady.
fn drive(node: &mut raft::RawNode<RaftStore>, state: &mut Vec<u8>) {
    while node.has_ready() {
        let mut rd = node.ready();
        let applied = apply_committed(&rd.take_committed_entries(), state);
        let snapshot = (!rd.snapshot().is_empty()).then(|| rd.snapshot().clone());
        node.mut_store()
            .write(WriteBatch {
                snapshot: snapshot.as_ref(),
                entries: rd.entries(),
                hard_state: rd.hs(),
                applied: applied.map(|i| (i, state.as_slice())),
                ..WriteBatch::default()
            })
            .unwrap();
        let mut light = node.advance(rd);
        let applied = apply_committed(&light.take_committed_entries(), state);
        node.mut_store()
            .write(WriteBatch {
                commit: light.commit_index(),
                applied: applied.map(|i| (i, state.as_slice())),
                ..WriteBatch::default()
            })
            .unwrap();
        node.advance_apply();
    }
}

fn raft_node(store: RaftStore) -> raft::RawNode<RaftStore> {
    let config = raft::Config {
        id: 1,
        applied: store.applied_index(),
        ..raft::Config::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    raft::RawNode::new(&config, store, &logger).unwrap()
}

#[test]
fn a_raft_node_runs_on_the_store_and_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_in(&dir);
    store.bootstrap(&[1]).unwrap();
    let mut node = raft_node(store);
    let mut state = Vec::new();
    node.campaign().unwrap();
    drive(&mut node, &mut state);
    for data in ["a", "b", "c"] {
        node.propose(vec![], data.as_bytes().to_vec()).unwrap();
        drive(&mut node, &mut state);
    }
    assert_eq!(state, b"a;b;c;");
    let applied = node.store().applied_index();
    node.mut_store().compact(applied).unwrap();
    let hard_state_before = node.store().hard_state();
    drop(node);

    // Restart: the state machine and applied index come back from the store.
    let store_after = store_in(&dir);
    assert_eq!(store_after.hard_state(), hard_state_before);
    assert_eq!(store_after.applied_index(), applied);
    let mut state = store_after.state_machine().unwrap();
    let mut node = raft_node(store_after);
    node.campaign().unwrap();
    drive(&mut node, &mut state);
    node.propose(vec![], b"d".to_vec()).unwrap();
    drive(&mut node, &mut state);
    assert_eq!(state, b"a;b;c;d;");
    assert_eq!(node.store().state_machine().unwrap(), state);
    assert!(node.store().hard_state().term >= 2);
}

// ---- crash consistency ----------------------------------------------------------------------

/// Set in the re-executed child: the database file the writer loop uses.
const CRASH_CHILD_ENV: &str = "HA_MONITOR_STORAGE_CRASH_DB";
const CRASH_CHILD_TEST: &str = "storage::tests::crash_writer_child";

fn crash_payload(index: u64) -> Vec<u8> {
    let len = 16 + (index * 7919 % 2000) as usize;
    (0..len)
        .map(|k| (index as u8).wrapping_add(k as u8))
        .collect()
}

fn crash_state(index: u64) -> Vec<u8> {
    format!("state machine at {index};")
        .repeat(200)
        .into_bytes()
}

/// The writer half of `sigkill_mid_write_loses_no_acknowledged_write`: only does something when
/// that test re-executes this binary with `CRASH_CHILD_ENV` set. It appends, then commits and
/// applies, one entry at a time, compacting now and then, and prints each acknowledged write.
#[test]
fn crash_writer_child() {
    let Ok(path) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let mut store = RaftStore::open(std::path::Path::new(&path)).unwrap();
    if !store.is_initialized() {
        store.bootstrap(&[1]).unwrap();
    }
    let mut out = std::io::stdout().lock();
    let start = store.last_index().unwrap() + 1;
    for index in start..start + 100_000 {
        let commit = store.hard_state().commit;
        store
            .write(WriteBatch {
                entries: &[entry(index, 1, &crash_payload(index))],
                hard_state: Some(&hard_state(1, 1, commit)),
                ..WriteBatch::default()
            })
            .unwrap();
        writeln!(out, "append {index}").unwrap();
        out.flush().unwrap();
        store
            .write(WriteBatch {
                commit: Some(index),
                applied: Some((index, &crash_state(index))),
                ..WriteBatch::default()
            })
            .unwrap();
        writeln!(out, "apply {index}").unwrap();
        out.flush().unwrap();
        if index % 16 == 0 {
            store.compact(index - 8).unwrap();
            writeln!(out, "compact {}", index - 8).unwrap();
            out.flush().unwrap();
        }
    }
}

/// Kills the writer child when the test ends, whichever way it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Already dead is fine; it is our own child, killed by its PID.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, Default)]
struct Acked {
    appended: u64,
    applied: u64,
    compacted: u64,
}

impl Acked {
    fn record(&mut self, line: &str) -> bool {
        let Some((kind, index)) = line.split_once(' ') else {
            return false;
        };
        let Ok(index) = index.parse::<u64>() else {
            return false;
        };
        let slot = match kind {
            "append" => &mut self.appended,
            "apply" => &mut self.applied,
            "compact" => &mut self.compacted,
            _ => return false,
        };
        *slot = (*slot).max(index);
        true
    }
}

/// Runs the writer child until it acknowledged `kill_after` writes (plus a random few hundred
/// microseconds, so the kill lands anywhere inside the next write), SIGKILLs it, and returns every
/// write it acknowledged before dying.
fn run_writer_and_kill(path: &std::path::Path, kill_after: usize) -> Acked {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args([
            CRASH_CHILD_TEST,
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut acked = Acked::default();
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count < kill_after {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => count += usize::from(acked.record(&line)),
            Err(_) => {
                let mut stderr = String::new();
                if let Some(mut err) = child.0.stderr.take() {
                    let _ = child.0.kill();
                    let _ = err.read_to_string(&mut stderr);
                }
                panic!("writer child stopped after {count} acks: {stderr}");
            }
        }
    }
    // Not synchronisation: a random extra delay so the kill lands at a random point of a write.
    std::thread::sleep(Duration::from_micros(rand::random_range(0..800)));
    child.0.kill().unwrap();
    // Lines already printed were acknowledged before the kill; read them to the end of the pipe.
    for line in rx.iter() {
        acked.record(&line);
    }
    reader.join().unwrap();
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "the writer must have been killed");
    acked
}

#[test]
fn sigkill_mid_write_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    for round in 0..5 {
        let acked = run_writer_and_kill(&path, rand::random_range(1..=120));
        let store = RaftStore::open(&path).unwrap();
        let (first, last) = (store.first_index().unwrap(), store.last_index().unwrap());
        assert!(
            last >= acked.appended,
            "round {round}: acked append {} lost (last {last})",
            acked.appended
        );
        assert!(
            store.applied_index() >= acked.applied,
            "round {round}: acked apply {} lost (applied {})",
            acked.applied,
            store.applied_index()
        );
        assert!(
            first >= acked.compacted,
            "round {round}: acked compaction to {} lost (first {first})",
            acked.compacted
        );
        let hs = store.hard_state();
        assert!(store.applied_index() <= hs.commit && hs.commit <= last);
        let expected_state =
            (store.applied_index() > 0).then(|| crash_state(store.applied_index()));
        assert_eq!(store.state_machine(), expected_state);
        for e in store.entries(first, last + 1, None, ctx()).unwrap() {
            assert_eq!(e.term, 1);
            assert_eq!(
                &e.data[..],
                crash_payload(e.index).as_slice(),
                "entry {}",
                e.index
            );
        }
        if first > 1 {
            assert_eq!(store.term(first - 1).unwrap(), 1);
        }
    }
}
