//! Incarnations: a wiped monitor must rejoin under a new id.
//!
//! A monitor whose data directory was lost restarts with an empty log under its old id. Raft's
//! safety rests on every member remembering its votes and log, so such a member could vote twice
//! in one term. Each data directory therefore gets a random incarnation number when it is
//! created; monitors send theirs with every Raft batch, and every monitor records, durably, the
//! incarnation it first saw from each peer id. A batch from a known id with another incarnation
//! is refused, and the sender, told so, stops with a message naming the fix (remove the id, add
//! the monitor under a new one).
//!
//! The sender also says which incarnation it has on record for the receiver, so a wiped
//! receiver learns it before stepping any message of the group (raft-rs would otherwise panic on
//! a commit index beyond its empty log).
//!
//! The record file is written atomically (temp file, fsync, rename, fsync of the directory).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Metadata key carrying the sender's incarnation on peer calls (and the receiver's own in
/// the answer).
pub const METADATA: &str = "x-ha-incarnation";
/// Metadata key carrying the incarnation the sender has on record for the receiver: a
/// receiver that finds another number there knows its own data was wiped.
pub const PEER_METADATA: &str = "x-ha-peer-incarnation";
/// Prefix of the status message a refused (wiped) monitor receives.
pub const REFUSED: &str = "refused: this monitor's data directory was wiped";

/// Prefix of the status message a monitor that is no longer a member receives.
pub const NOT_A_MEMBER: &str = "refused: this monitor is not a member of the group";

/// Whether a peer's answer means the group refuses this monitor for good.
pub fn is_refusal(message: &str) -> bool {
    message.starts_with(REFUSED) || message.starts_with(NOT_A_MEMBER)
}

const OWN_FILE: &str = "incarnation";
const SEEN_FILE: &str = "peer-incarnations.json";

#[derive(Debug, thiserror::Error)]
pub enum IncarnationError {
    #[error(transparent)]
    Write(#[from] ha_files::FileError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IncarnationError + '_ {
    move |source| IncarnationError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), IncarnationError> {
    ha_files::write(&dir.join(name), bytes, ha_files::WriteOptions::mode(0o600))?;
    Ok(())
}

/// This monitor's incarnation and what it has seen of its peers.
#[derive(Debug)]
pub struct Incarnations {
    dir: PathBuf,
    own: u64,
    seen: BTreeMap<u64, u64>,
}

impl Incarnations {
    /// Loads the records of `dir`, creating this directory's incarnation on first use, and a
    /// new one whenever the Raft log is new (`fresh_log`): a member with a new log is a new
    /// incarnation even if this file survived.
    pub fn open(dir: &Path, fresh_log: bool) -> Result<Self, IncarnationError> {
        let own_path = dir.join(OWN_FILE);
        let existing = if fresh_log {
            Err(std::io::ErrorKind::NotFound.into())
        } else {
            fs::read_to_string(&own_path)
        };
        let own = match existing {
            Ok(text) => text.trim().parse().map_err(|_| IncarnationError::Corrupt {
                path: own_path.clone(),
                why: format!("{:?} is not a number", text.trim()),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let own = rand::random::<u64>().max(1);
                write_atomic(dir, OWN_FILE, own.to_string().as_bytes())?;
                own
            }
            Err(e) => return Err(io(&own_path)(e)),
        };
        let seen_path = dir.join(SEEN_FILE);
        let seen = match fs::read(&seen_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| IncarnationError::Corrupt {
                path: seen_path.clone(),
                why: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(&seen_path)(e)),
        };
        Ok(Self {
            dir: dir.to_owned(),
            own,
            seen,
        })
    }

    pub fn own(&self) -> u64 {
        self.own
    }

    /// The incarnation on record for peer `id`.
    pub fn known(&self, id: u64) -> Option<u64> {
        self.seen.get(&id).copied()
    }

    /// What a receiver concludes from the incarnation a sender has on record for it.
    pub fn check_claim(&self, me: u64, from: u64, claimed: u64) -> Result<(), String> {
        if claimed == self.own {
            Ok(())
        } else {
            Err(format!(
                "monitor {from} knows monitor {me} as incarnation {claimed:x} but it is {:x}: its data directory was wiped; remove it (haclt monitor remove {me}) and add it under a new id",
                self.own
            ))
        }
    }

    /// Accepts `incarnation` for peer `id` if it is the first seen or the same as before.
    pub fn check(&mut self, id: u64, incarnation: u64) -> Result<(), String> {
        match self.seen.get(&id) {
            Some(known) if *known == incarnation => Ok(()),
            Some(known) => Err(format!(
                "{REFUSED}: monitor {id} came back as incarnation {incarnation:x}, the group knows {known:x}; remove it (haclt monitor remove {id}) and add it under a new id"
            )),
            None => {
                self.seen.insert(id, incarnation);
                let bytes =
                    serde_json::to_vec(&self.seen).expect("a map of numbers always serializes");
                write_atomic(&self.dir, SEEN_FILE, &bytes).map_err(|e| e.to_string())
            }
        }
    }
}

/// The records shared by the transport (sending) and the peer service (receiving).
pub type Shared = std::sync::Arc<std::sync::Mutex<Incarnations>>;

/// Locks the shared records (a poisoned lock still holds consistent data: every update is one
/// map insert after a successful file write).
pub fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Incarnations> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_incarnation_is_refused_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut inc = Incarnations::open(dir.path(), true).unwrap();
        let own = inc.own();
        assert_ne!(own, 0);
        inc.check(2, 77).unwrap();
        inc.check(2, 77).unwrap();
        let mut again = Incarnations::open(dir.path(), false).unwrap();
        assert_eq!(again.own(), own, "the own incarnation is stable");
        let err = again.check(2, 78).unwrap_err();
        assert!(
            err.starts_with(REFUSED) && err.contains("haclt monitor remove 2"),
            "{err}"
        );
        again.check(3, 5).unwrap();
        assert_eq!(again.known(3), Some(5));
        again.check_claim(1, 2, own).unwrap();
        let err = again.check_claim(1, 2, own ^ 1).unwrap_err();
        assert!(
            err.contains("was wiped") && err.contains("haclt monitor remove 1"),
            "{err}"
        );
        let renewed = Incarnations::open(dir.path(), true).unwrap();
        assert_ne!(renewed.own(), own, "a new log is a new incarnation");
    }

    #[test]
    fn corrupt_records_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(OWN_FILE), "not a number").unwrap();
        let err = Incarnations::open(dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is corrupt"), "{err}");
    }
}
