//! The consensus layer in-process: real raft threads and real redb stores, connected by the
//! simulated network so that links can be cut. Each test polls for a condition with a deadline.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ha_monitor::consensus::{self, Members, ProposeError, RaftHandle, RaftSettings, StateMachine};
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

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.applied.lock().unwrap()).unwrap()
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

fn fast(id: u64) -> RaftSettings {
    RaftSettings {
        tick: Duration::from_millis(20),
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

    async fn wait_applied(&self, ids: &[u64], count: usize, deadline: Duration) {
        let end = Instant::now() + deadline;
        while ids.iter().any(|id| self.applied(*id).len() < count) {
            let counts: Vec<_> = ids.iter().map(|id| self.applied(*id).len()).collect();
            assert!(
                Instant::now() < end,
                "members {ids:?} applied {counts:?}, want {count}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elects_one_leader_and_replicates_in_order() {
    let cluster = Cluster::new(&[1, 2, 3], fast);
    let leader = cluster
        .leader_among(&[1, 2, 3], Duration::from_secs(5))
        .await;
    for i in 0..50 {
        let (index, output) = propose(cluster.handle(leader), &format!("cmd-{i}"))
            .await
            .unwrap();
        assert!(index > 0);
        assert_eq!(output, (i as u64 + 1).to_le_bytes());
    }
    cluster
        .wait_applied(&[1, 2, 3], 50, Duration::from_secs(5))
        .await;
    let reference = cluster.applied(leader);
    for id in cluster.ids() {
        assert_eq!(cluster.applied(id), reference, "member {id} diverged");
    }
    // A follower refuses proposals and names the leader.
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    match propose(cluster.handle(follower), "x").await {
        Err(ProposeError::NotLeader {
            leader: Some((id, addr)),
        }) => {
            assert_eq!(id, leader);
            assert_eq!(addr, format!("sim-{leader}"));
        }
        other => panic!("follower answered {other:?}"),
    }
    // The read barrier works on the leader only.
    let read = cluster.handle(leader).read_index().await.unwrap();
    assert!(read >= 50);
    assert!(matches!(
        cluster.handle(follower).read_index().await,
        Err(ProposeError::NotLeader { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_cannot_commit_and_majority_moves_on() {
    let cluster = Cluster::new(&[1, 2, 3], fast);
    let old = cluster
        .leader_among(&[1, 2, 3], Duration::from_secs(5))
        .await;
    propose(cluster.handle(old), "before").await.unwrap();
    let old_term = cluster.handle(old).status().term;

    cluster.net.isolate(old, &cluster.ids());
    // The isolated leader accepts the proposal into its log but can never commit it.
    let stranded = tokio::spawn({
        let h = cluster.handle(old).clone();
        async move { h.propose(b"stranded".to_vec()).await }
    });
    let majority: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    let new = cluster
        .leader_among(&majority, Duration::from_secs(5))
        .await;
    assert_ne!(new, old);
    assert!(cluster.handle(new).status().term > old_term);
    propose(cluster.handle(new), "after").await.unwrap();

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
    assert_eq!(stranded, Err(ProposeError::Dropped));

    cluster.net.heal();
    cluster
        .wait_applied(&cluster.ids(), 2, Duration::from_secs(5))
        .await;
    let reference = cluster.applied(new);
    let datas: Vec<&[u8]> = reference.iter().map(|(_, d)| d.as_slice()).collect();
    assert_eq!(datas, vec![b"before".as_slice(), b"after".as_slice()]);
    for id in cluster.ids() {
        assert_eq!(
            cluster.applied(id),
            reference,
            "member {id} did not converge"
        );
    }
}

fn compacting(id: u64) -> RaftSettings {
    RaftSettings {
        tick: Duration::from_millis(20),
        persist_state_every: 10,
        compact_after: 20,
        ..RaftSettings::new(id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    let cluster = Cluster::new(&[1, 2, 3], compacting);
    let leader = cluster
        .leader_among(&[1, 2, 3], Duration::from_secs(5))
        .await;
    let lagging = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    cluster.net.isolate(lagging, &cluster.ids());
    for i in 0..120 {
        propose(cluster.handle(leader), &format!("cmd-{i}"))
            .await
            .unwrap();
    }
    assert_eq!(
        *cluster.members[&lagging].record.restores.lock().unwrap(),
        0
    );
    cluster.net.heal();
    cluster
        .wait_applied(&[lagging], 120, Duration::from_secs(10))
        .await;
    assert_eq!(cluster.applied(lagging), cluster.applied(leader));
    assert!(
        *cluster.members[&lagging].record.restores.lock().unwrap() >= 1,
        "the follower caught up without a snapshot: compaction did not happen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_acknowledged_and_applies_nothing_twice() {
    let mut cluster = Cluster::new(&[1, 2, 3], compacting);
    let leader = cluster
        .leader_among(&[1, 2, 3], Duration::from_secs(5))
        .await;
    for i in 0..37 {
        propose(cluster.handle(leader), &format!("cmd-{i}"))
            .await
            .unwrap();
    }
    cluster
        .wait_applied(&[1, 2, 3], 37, Duration::from_secs(5))
        .await;
    let before = cluster.applied(leader);
    for id in [1, 2, 3] {
        cluster.stop(id);
    }
    for id in [1, 2, 3] {
        cluster.start(id, Some(addresses(&[1, 2, 3])));
    }
    let leader = cluster
        .leader_among(&[1, 2, 3], Duration::from_secs(5))
        .await;
    propose(cluster.handle(leader), "after-restart")
        .await
        .unwrap();
    cluster
        .wait_applied(&[1, 2, 3], 38, Duration::from_secs(5))
        .await;
    for id in [1, 2, 3] {
        let applied = cluster.applied(id);
        assert_eq!(
            applied.len(),
            38,
            "member {id} applied something twice or lost it"
        );
        assert_eq!(&applied[..37], &before[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_online() {
    let mut cluster = Cluster::new(&[1, 2, 3], fast);
    let leader = cluster
        .leader_among(&[1, 2, 3], Duration::from_secs(5))
        .await;
    propose(cluster.handle(leader), "one").await.unwrap();

    // A new member starts empty and learns everything from the leader.
    cluster.start(4, None);
    let members = cluster
        .handle(leader)
        .add_member(4, "sim-4".into())
        .await
        .unwrap();
    assert_eq!(
        members.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    propose(cluster.handle(leader), "two").await.unwrap();
    cluster.wait_applied(&[4], 2, Duration::from_secs(5)).await;
    assert_eq!(cluster.applied(4), cluster.applied(leader));

    // Removing a follower stops it.
    let removed = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != 4)
        .unwrap();
    let mut status = cluster.handle(removed).watch_status();
    let members = cluster.handle(leader).remove_member(removed).await.unwrap();
    assert!(!members.contains_key(&removed));
    timeout(Duration::from_secs(5), status.wait_for(|s| s.removed))
        .await
        .unwrap()
        .unwrap();
    cluster.stop(removed);
    propose(cluster.handle(leader), "three").await.unwrap();
    let remaining = cluster.ids();
    cluster
        .wait_applied(&remaining, 3, Duration::from_secs(5))
        .await;
}
