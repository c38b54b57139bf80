//! The consensus layer in-process: real raft threads and real redb stores, connected by the
//! simulated network so that links can be cut. Each test polls for a condition with a deadline.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ha_monitor::consensus::{
    self, Members, ProposeError, RaftHandle, RaftSettings, SnapshotJob, StateMachine,
};
use ha_monitor::storage::RaftStore;
use ha_monitor::transport::sim::SimNetwork;
use tokio::time::{Instant, timeout};

/// Records every applied command; snapshots are the whole record. `restores` counts how often
/// the member received its state from a snapshot (or from disk at start).
type Log = Vec<(u64, Vec<u8>)>;

#[derive(Default, Clone)]
struct Record {
    applied: Arc<Mutex<Log>>,
    restores: Arc<Mutex<u32>>,
}

impl StateMachine for Record {
    type Output = Vec<u8>;

    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8> {
        let mut applied = self.applied.lock().unwrap();
        applied.push((index, data.to_vec()));
        (applied.len() as u64).to_le_bytes().to_vec()
    }

    fn snapshot_job(&self) -> SnapshotJob {
        let copy = self.applied.lock().unwrap().clone();
        Box::new(move || serde_json::to_vec(&copy).unwrap())
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        *self.applied.lock().unwrap() = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        *self.restores.lock().unwrap() += 1;
        Ok(())
    }
}

struct Member {
    handle: RaftHandle,
    thread: Option<JoinHandle<()>>,
    record: Record,
}

struct Cluster {
    net: SimNetwork,
    dir: tempfile::TempDir,
    members: BTreeMap<u64, Member>,
    settings: fn(u64) -> RaftSettings,
}

/// 50 ms ticks: elections within ~0.5-0.75 s, yet rare spurious ones on a loaded machine
/// (the tests below tolerate those anyway).
fn fast(id: u64) -> RaftSettings {
    RaftSettings {
        tick: Duration::from_millis(50),
        ..RaftSettings::new(id)
    }
}

fn addresses(ids: &[u64]) -> Members {
    ids.iter().map(|id| (*id, format!("sim-{id}"))).collect()
}

impl Cluster {
    fn new(ids: &[u64], settings: fn(u64) -> RaftSettings) -> Self {
        let mut cluster = Cluster {
            net: SimNetwork::default(),
            dir: tempfile::tempdir().unwrap(),
            members: BTreeMap::new(),
            settings,
        };
        for &id in ids {
            cluster.start(id, Some(addresses(ids)));
        }
        cluster
    }

    fn start(&mut self, id: u64, bootstrap: Option<Members>) {
        let store = RaftStore::open(&self.dir.path().join(format!("m{id}.redb"))).unwrap();
        let record = Record::default();
        let (handle, thread) = consensus::spawn(
            (self.settings)(id),
            store,
            record.clone(),
            self.net.transport(id),
            bootstrap,
        )
        .unwrap();
        self.net.register(id, handle.clone());
        self.members.insert(
            id,
            Member {
                handle,
                thread: Some(thread),
                record,
            },
        );
    }

    fn stop(&mut self, id: u64) {
        self.net.unregister(id);
        let mut member = self.members.remove(&id).unwrap();
        member.handle.stop();
        member.thread.take().unwrap().join().unwrap();
    }

    fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    fn handle(&self, id: u64) -> &RaftHandle {
        &self.members[&id].handle
    }

    fn applied(&self, id: u64) -> Log {
        self.members[&id].record.applied.lock().unwrap().clone()
    }

    /// Waits until exactly one of `among` leads and the others agree on it.
    async fn leader_among(&self, among: &[u64], deadline: Duration) -> u64 {
        let end = Instant::now() + deadline;
        loop {
            let statuses: Vec<_> = among.iter().map(|id| self.handle(*id).status()).collect();
            let leaders: Vec<u64> = statuses
                .iter()
                .filter(|s| s.is_leader)
                .map(|s| s.id)
                .collect();
            if let [leader] = leaders[..]
                && statuses.iter().all(|s| s.leader_id == leader)
            {
                return leader;
            }
            assert!(
                Instant::now() < end,
                "no single agreed leader among {among:?}: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Proposes on whichever of `among` leads. A refusal by a non-leader (nothing applied) is
    /// retried on the new leader; `Dropped` (outcome unknown: the leader changed after
    /// accepting) is returned, so callers count only acknowledged proposals.
    async fn propose_on_leader(
        &self,
        among: &[u64],
        data: &str,
    ) -> Result<(u64, Vec<u8>), ProposeError> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let leader = self.leader_among(among, Duration::from_secs(5)).await;
            match propose(self.handle(leader), data).await {
                Err(ProposeError::NotLeader { .. }) if Instant::now() < end => continue,
                other => return other,
            }
        }
    }

    /// Proposes a barrier until one is acknowledged, then waits until `ids` applied it: after
    /// that every member has applied everything the barrier's leader had.
    async fn settle(&self, ids: &[u64], among: &[u64]) -> Log {
        let mut n = 0;
        let (index, _) = loop {
            n += 1;
            if let Ok(r) = self.propose_on_leader(among, &format!("barrier-{n}")).await {
                break r;
            }
        };
        let end = Instant::now() + Duration::from_secs(10);
        while ids
            .iter()
            .any(|id| self.applied(*id).last().is_none_or(|(i, _)| *i < index))
        {
            assert!(
                Instant::now() < end,
                "members {ids:?} did not apply index {index}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reference = self.applied(ids[0]);
        for id in ids {
            assert_eq!(self.applied(*id), reference, "member {id} diverged");
        }
        reference
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in self.members.values() {
            m.handle.stop();
        }
        for m in self.members.values_mut() {
            if let Some(t) = m.thread.take() {
                let _ = t.join();
            }
        }
    }
}

async fn propose(handle: &RaftHandle, data: &str) -> Result<(u64, Vec<u8>), ProposeError> {
    timeout(
        Duration::from_secs(5),
        handle.propose(data.as_bytes().to_vec()),
    )
    .await
    .unwrap_or(Err(ProposeError::Dropped))
}

/// The payloads of a log other than the barriers `settle` adds.
fn payloads(log: &Log) -> Vec<String> {
    log.iter()
        .map(|(_, d)| String::from_utf8(d.clone()).unwrap())
        .filter(|d| !d.starts_with("barrier-"))
        .collect()
}

/// Every acknowledged payload is applied exactly once, and no payload twice.
fn assert_once(log: &Log, acked: &[String]) {
    let applied = payloads(log);
    for a in acked {
        let n = applied.iter().filter(|x| *x == a).count();
        assert_eq!(n, 1, "acknowledged {a} applied {n} times");
    }
    let mut unique = applied.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        applied.len(),
        "a payload was applied twice: {applied:?}"
    );
}

const ALL: [u64; 3] = [1, 2, 3];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elects_one_leader_and_replicates_in_order() {
    let cluster = Cluster::new(&ALL, fast);
    let mut acked = Vec::new();
    for i in 0..50 {
        let data = format!("cmd-{i:02}");
        if cluster.propose_on_leader(&ALL, &data).await.is_ok() {
            acked.push(data);
        }
    }
    assert!(!acked.is_empty());
    let log = cluster.settle(&ALL, &ALL).await;
    assert_once(&log, &acked);
    let applied = payloads(&log);
    let mut sorted = applied.clone();
    sorted.sort();
    assert_eq!(applied, sorted, "commands applied out of proposal order");

    // A follower refuses proposals and names the leader it knows.
    let leader = cluster.leader_among(&ALL, Duration::from_secs(5)).await;
    let follower = ALL.into_iter().find(|id| *id != leader).unwrap();
    match propose(cluster.handle(follower), "x").await {
        Err(ProposeError::NotLeader {
            leader: Some((id, addr)),
        }) => assert_eq!(addr, format!("sim-{id}")),
        other => panic!("follower answered {other:?}"),
    }
    assert!(matches!(
        cluster.handle(follower).read_index().await,
        Err(ProposeError::NotLeader { .. })
    ));
    // The read barrier on the leader covers everything applied so far.
    let leader = cluster.leader_among(&ALL, Duration::from_secs(5)).await;
    if let Ok(read) = cluster.handle(leader).read_index().await {
        assert!(read >= log.last().unwrap().0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_cannot_commit_and_majority_moves_on() {
    let cluster = Cluster::new(&ALL, fast);
    let mut acked = Vec::new();
    for attempt in 0.. {
        let data = format!("before-{attempt}");
        if cluster.propose_on_leader(&ALL, &data).await.is_ok() {
            acked.push(data);
            break;
        }
    }
    let old = cluster.leader_among(&ALL, Duration::from_secs(5)).await;
    let old_term = cluster.handle(old).status().term;

    cluster.net.isolate(old, &ALL);
    // The isolated leader may accept the proposal into its log but can never commit it.
    let stranded = tokio::spawn({
        let h = cluster.handle(old).clone();
        async move { h.propose(b"stranded".to_vec()).await }
    });
    let majority: Vec<u64> = ALL.into_iter().filter(|id| *id != old).collect();
    let new = cluster
        .leader_among(&majority, Duration::from_secs(5))
        .await;
    assert_ne!(new, old);
    assert!(cluster.handle(new).status().term > old_term);
    for attempt in 0.. {
        let data = format!("after-{attempt}");
        if cluster.propose_on_leader(&majority, &data).await.is_ok() {
            acked.push(data);
            break;
        }
    }

    // check_quorum: the old leader steps down by itself within an election timeout or so.
    let end = Instant::now() + Duration::from_secs(3);
    while cluster.handle(old).status().is_leader {
        assert!(Instant::now() < end, "isolated leader did not step down");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stranded = timeout(Duration::from_secs(3), stranded)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            stranded,
            Err(ProposeError::Dropped | ProposeError::NotLeader { .. })
        ),
        "{stranded:?}"
    );

    cluster.net.heal();
    let log = cluster.settle(&ALL, &ALL).await;
    assert_once(&log, &acked);
    assert!(!payloads(&log).contains(&"stranded".to_owned()));
}

fn compacting(id: u64) -> RaftSettings {
    RaftSettings {
        tick: Duration::from_millis(50),
        persist_state_every: 10,
        compact_after: 20,
        ..RaftSettings::new(id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    let cluster = Cluster::new(&ALL, compacting);
    let leader = cluster.leader_among(&ALL, Duration::from_secs(5)).await;
    let lagging = ALL.into_iter().find(|id| *id != leader).unwrap();
    let majority: Vec<u64> = ALL.into_iter().filter(|id| *id != lagging).collect();
    cluster.net.isolate(lagging, &ALL);
    let mut acked = Vec::new();
    for i in 0..120 {
        let data = format!("cmd-{i:03}");
        if cluster.propose_on_leader(&majority, &data).await.is_ok() {
            acked.push(data);
        }
    }
    assert_eq!(
        *cluster.members[&lagging].record.restores.lock().unwrap(),
        0
    );
    cluster.net.heal();
    let log = cluster.settle(&ALL, &majority).await;
    assert_once(&log, &acked);
    assert!(
        *cluster.members[&lagging].record.restores.lock().unwrap() >= 1,
        "the follower caught up without a snapshot: compaction did not happen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_acknowledged_and_applies_nothing_twice() {
    let mut cluster = Cluster::new(&ALL, compacting);
    let mut acked = Vec::new();
    for i in 0..37 {
        let data = format!("cmd-{i:02}");
        if cluster.propose_on_leader(&ALL, &data).await.is_ok() {
            acked.push(data);
        }
    }
    let before = cluster.settle(&ALL, &ALL).await;
    for id in ALL {
        cluster.stop(id);
    }
    for id in ALL {
        cluster.start(id, Some(addresses(&ALL)));
    }
    let after = cluster.settle(&ALL, &ALL).await;
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "the applied history changed"
    );
    assert_once(&after, &acked);
}

/// Runs a membership change on whichever member leads, retrying refusals by non-leaders.
async fn on_leader<F, Fut>(cluster: &Cluster, among: &[u64], f: F) -> Members
where
    F: Fn(RaftHandle) -> Fut,
    Fut: std::future::Future<Output = Result<Members, ProposeError>>,
{
    loop {
        let leader = cluster.leader_among(among, Duration::from_secs(5)).await;
        match f(cluster.handle(leader).clone()).await {
            Ok(m) => return m,
            Err(ProposeError::NotLeader { .. } | ProposeError::Dropped) => continue,
            Err(e) => panic!("membership change failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_online() {
    let mut cluster = Cluster::new(&ALL, fast);
    cluster.settle(&ALL, &ALL).await;

    // A new member starts empty and learns everything from the leader.
    cluster.start(4, None);
    let members = on_leader(&cluster, &ALL, |h| async move {
        h.add_member(4, "sim-4".into()).await
    })
    .await;
    assert_eq!(
        members.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    cluster.settle(&[1, 2, 3, 4], &ALL).await;

    // Removing a follower stops it.
    let leader = cluster.leader_among(&ALL, Duration::from_secs(5)).await;
    let removed = ALL.into_iter().find(|id| *id != leader).unwrap();
    let mut status = cluster.handle(removed).watch_status();
    let members = on_leader(&cluster, &[1, 2, 3, 4], |h| async move {
        h.remove_member(removed).await
    })
    .await;
    assert!(!members.contains_key(&removed));
    timeout(Duration::from_secs(5), status.wait_for(|s| s.removed))
        .await
        .unwrap()
        .unwrap();
    cluster.stop(removed);
    let remaining = cluster.ids();
    cluster.settle(&remaining, &remaining).await;
}
