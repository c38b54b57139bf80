//! Property test: `RaftStore` answers raft exactly like raft-rs's reference `MemStorage` under the
//! same random sequence of appends (with conflicting overwrites), hard state and commit updates,
//! applies, compactions, snapshot installs and reopenings of the redb file.
//!
//! Two answers differ on purpose, where `MemStorage` departs from the `Storage` contract ("the
//! term of the entry before first_index is retained"): after a compaction `MemStorage` forgets
//! the term at `first_index - 1` (it answers `Compacted`) while `RaftStore` keeps it, and
//! `MemStorage` keeps answering the term of its last installed snapshot even once that index is
//! below `first_index - 1`, where `RaftStore` answers `Compacted`. At those two points the test
//! checks `RaftStore` against the term the log held when it was compacted.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use raft::eraftpb::{ConfState, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, Storage};

use super::tests::entry;
use super::{RaftStore, WriteBatch};

/// One step; its numbers are selectors that `Pair::step` maps into the range valid at that point.
#[derive(Debug, Clone)]
enum Op {
    Append {
        overlap: u64,
        term_bump: u64,
        datas: Vec<Vec<u8>>,
    },
    HardState {
        term_bump: u64,
        vote: u64,
        commit: u64,
    },
    Commit(u64),
    Apply {
        applied: u64,
        voters: Option<Vec<u64>>,
    },
    Compact(u64),
    Snapshot {
        ahead: u64,
        term_bump: u64,
        voters: Vec<u64>,
        data: Vec<u8>,
    },
    Reopen,
}

fn voters() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(1u64..6, 1..4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            0u64..4,
            0u64..2,
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 1..5)
        )
            .prop_map(|(overlap, term_bump, datas)| Op::Append { overlap, term_bump, datas }),
        2 => (0u64..2, 0u64..4, any::<u64>())
            .prop_map(|(term_bump, vote, commit)| Op::HardState { term_bump, vote, commit }),
        2 => any::<u64>().prop_map(Op::Commit),
        2 => (any::<u64>(), prop::option::of(voters()))
            .prop_map(|(applied, voters)| Op::Apply { applied, voters }),
        2 => any::<u64>().prop_map(Op::Compact),
        1 => (0u64..4, 0u64..2, voters(), prop::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(ahead, term_bump, voters, data)| Op::Snapshot { ahead, term_bump, voters, data }),
        1 => Just(Op::Reopen),
    ]
}

fn conf(ids: &[u64]) -> ConfState {
    ConfState {
        voters: ids.to_vec(),
        ..ConfState::default()
    }
}

/// `x` mapped into `lo..=hi`.
fn pick(x: u64, lo: u64, hi: u64) -> u64 {
    lo + x % (hi - lo + 1)
}

struct Pair {
    dir: tempfile::TempDir,
    store: Option<RaftStore>,
    mem: MemStorage,
    /// Index and term of the entry just below `first_index`, as the log held it.
    boundary: (u64, u64),
}

impl Pair {
    fn new(bootstrap: Option<&[u64]>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RaftStore::open(&dir.path().join("raft.redb")).unwrap();
        let mem = MemStorage::new();
        if let Some(ids) = bootstrap {
            store.bootstrap(ids).unwrap();
            mem.initialize_with_conf_state(conf(ids));
        }
        Self {
            dir,
            store: Some(store),
            mem,
            boundary: (0, 0),
        }
    }

    fn store(&mut self) -> &mut RaftStore {
        self.store
            .as_mut()
            .expect("the store is only absent inside reopen")
    }

    fn step(&mut self, op: &Op) {
        let hs = self.mem.initial_state().unwrap().hard_state;
        let first = self.mem.first_index().unwrap();
        let last = self.mem.last_index().unwrap();
        let applied = self.store().applied_index();
        match op {
            Op::Append {
                overlap,
                term_bump,
                datas,
            } => {
                // Raft never rewrites committed entries: start anywhere after the commit index.
                let lowest = (hs.commit + 1).max(first);
                let start = last + 1 - (*overlap).min(last + 1 - lowest);
                let ents: Vec<_> = (start..)
                    .zip(datas)
                    .map(|(i, data)| entry(i, hs.term + term_bump, data))
                    .collect();
                self.store()
                    .write(WriteBatch {
                        entries: &ents,
                        ..WriteBatch::default()
                    })
                    .unwrap();
                self.mem.wl().append(&ents).unwrap();
            }
            Op::HardState {
                term_bump,
                vote,
                commit,
            } => {
                let new = HardState {
                    term: hs.term + term_bump,
                    vote: *vote,
                    commit: pick(*commit, hs.commit, last),
                    ..HardState::default()
                };
                self.store()
                    .write(WriteBatch {
                        hard_state: Some(&new),
                        ..WriteBatch::default()
                    })
                    .unwrap();
                self.mem.wl().set_hardstate(new);
            }
            Op::Commit(commit) => {
                let commit = pick(*commit, hs.commit, last);
                self.store()
                    .write(WriteBatch {
                        commit: Some(commit),
                        ..WriteBatch::default()
                    })
                    .unwrap();
                self.mem.wl().mut_hard_state().commit = commit;
            }
            Op::Apply {
                applied: to,
                voters,
            } => {
                let to = pick(*to, applied, hs.commit);
                if to == 0 {
                    return;
                }
                let state = format!("state at {to}");
                let cs = voters.as_deref().map(conf);
                self.store()
                    .write(WriteBatch {
                        conf_state: cs.as_ref(),
                        applied: Some((to, state.as_bytes())),
                        ..WriteBatch::default()
                    })
                    .unwrap();
                if let Some(cs) = cs {
                    self.mem.wl().set_conf_state(cs);
                }
                assert_eq!(self.store().applied_index(), to);
                assert_eq!(self.store().state_machine(), Some(state.into_bytes()));
            }
            Op::Compact(index) => {
                let index = pick(*index, 0, applied);
                if index > first {
                    self.boundary = (index - 1, self.mem.term(index - 1).unwrap());
                }
                self.store().compact(index).unwrap();
                self.mem.wl().compact(index).unwrap();
            }
            Op::Snapshot {
                ahead,
                term_bump,
                voters,
                data,
            } => {
                let mut snap = Snapshot {
                    data: data.clone().into(),
                    ..Snapshot::default()
                };
                let meta = snap.mut_metadata();
                meta.index = hs.commit + 1 + ahead;
                meta.term = hs.term + term_bump;
                meta.set_conf_state(conf(voters));
                self.boundary = (meta.index, meta.term);
                self.store()
                    .write(WriteBatch {
                        snapshot: Some(&snap),
                        ..WriteBatch::default()
                    })
                    .unwrap();
                self.mem.wl().apply_snapshot(snap).unwrap();
            }
            Op::Reopen => {
                drop(self.store.take());
                self.store = Some(RaftStore::open(&self.dir.path().join("raft.redb")).unwrap());
            }
        }
    }

    fn check(&mut self, max_size: u64) -> Result<(), TestCaseError> {
        let mem = &self.mem;
        let store = self.store.as_ref().expect("present between steps");
        let (ours, theirs) = (store.initial_state().unwrap(), mem.initial_state().unwrap());
        prop_assert_eq!(&ours.hard_state, &theirs.hard_state);
        prop_assert_eq!(&ours.conf_state, &theirs.conf_state);
        let first = mem.first_index().unwrap();
        let last = mem.last_index().unwrap();
        prop_assert_eq!(store.first_index().unwrap(), first);
        prop_assert_eq!(store.last_index().unwrap(), last);

        for i in 0..=last + 1 {
            let (ours, theirs) = (store.term(i), mem.term(i));
            if i + 1 == first {
                prop_assert_eq!(self.boundary.0, i);
                prop_assert_eq!(ours, Ok(self.boundary.1), "term at first - 1 = {}", i);
            } else if i + 1 < first && theirs.is_ok() {
                prop_assert_eq!(
                    ours,
                    Err(raft::Error::Store(raft::StorageError::Compacted)),
                    "stale snapshot term at {}",
                    i
                );
            } else {
                prop_assert_eq!(ours, theirs, "term({})", i);
            }
        }

        let ctx = || GetEntriesContext::empty(false);
        for low in first.saturating_sub(1).max(1)..=last {
            let mut highs = vec![low + 1, low + (last + 1 - low).div_ceil(2), last + 1];
            highs.dedup();
            for high in highs.into_iter().filter(|&h| h > low) {
                for limit in [None, Some(0), Some(max_size)] {
                    prop_assert_eq!(
                        store.entries(low, high, limit, ctx()),
                        mem.entries(low, high, limit, ctx()),
                        "entries({}, {}, {:?})",
                        low,
                        high,
                        limit
                    );
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn answers_like_mem_storage(
        bootstrap in prop::option::of(voters()),
        ops in prop::collection::vec(op(), 1..40),
        max_size in 0u64..400,
    ) {
        let mut pair = Pair::new(bootstrap.as_deref());
        pair.check(max_size)?;
        for op in &ops {
            pair.step(op);
            pair.check(max_size)?;
        }
    }
}
