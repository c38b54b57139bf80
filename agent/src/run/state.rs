//! The agent's persisted state: the highest epoch it has seen and whether the node has joined.
//!
//! Invariants: the highest epoch never goes down. A goal with a lower epoch is refused; a goal
//! with a higher one is persisted (file written to a temporary name, fsynced, renamed over the
//! old one, directory fsynced) before the agent acts on it, so a crash can never make the agent
//! forget an epoch it acted upon. The file carries a magic, a version and a SHA-256 checksum; a
//! corrupt or unknown file is an error, never silently read as "epoch 0".

use std::path::{Path, PathBuf};

use ha_proto::Epoch;
use sha2::{Digest as _, Sha256};

const MAGIC: &[u8; 8] = b"HAAGENT\0";
const VERSION: u32 = 1;
const FILE_NAME: &str = "agent.state";
/// magic + version + epoch + joined flag.
const BODY_LEN: usize = 8 + 4 + 8 + 1;
const FILE_LEN: usize = BODY_LEN + 32;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] ha_files::FileError),
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// What survives agent restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentState {
    pub highest_epoch: Epoch,
    pub joined: bool,
}

/// A goal epoch compared with the persisted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochCheck {
    /// Older than an epoch already seen: refuse the goal.
    Stale { highest: Epoch },
    /// The epoch already persisted.
    Current,
    /// Newer: persist it before acting.
    Newer,
}

impl AgentState {
    pub fn check(&self, epoch: Epoch) -> EpochCheck {
        if epoch < self.highest_epoch {
            EpochCheck::Stale {
                highest: self.highest_epoch,
            }
        } else if epoch == self.highest_epoch {
            EpochCheck::Current
        } else {
            EpochCheck::Newer
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FILE_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.highest_epoch.get().to_le_bytes());
        out.push(u8::from(self.joined));
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err("not an ha-agent state file (bad magic)".into());
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().map_err(|_| "short header")?);
        if version != VERSION {
            return Err(format!("unsupported version {version}"));
        }
        if bytes.len() != FILE_LEN {
            return Err(format!("length {} instead of {FILE_LEN}", bytes.len()));
        }
        let (body, sum) = bytes.split_at(BODY_LEN);
        if Sha256::digest(body).as_slice() != sum {
            return Err("checksum mismatch".into());
        }
        let epoch = u64::from_le_bytes(body[12..20].try_into().map_err(|_| "short epoch")?);
        let joined = match body[20] {
            0 => false,
            1 => true,
            other => return Err(format!("joined flag {other}")),
        };
        Ok(Self {
            highest_epoch: Epoch(epoch),
            joined,
        })
    }
}

/// The state file inside the agent's state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
        let path = path.to_owned();
        move |source| StateError::Io { what, path, source }
    }

    /// The persisted state; a missing file is a fresh agent (epoch 0, not joined).
    pub fn load(&self) -> Result<AgentState, StateError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                AgentState::decode(&bytes).map_err(|reason| StateError::Corrupt { path, reason })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(e) => Err(Self::io("reading", &path)(e)),
        }
    }

    /// Replaces the state durably (`ha_files`: atomic, fsynced, no link followed).
    pub fn store(&self, state: &AgentState) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io("creating", &self.dir))?;
        ha_files::write(
            &self.path(),
            &state.encode(),
            ha_files::WriteOptions::mode(0o600),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(&dir.path().join("sub"));
        assert_eq!(file.load().unwrap(), AgentState::default());
        let s = AgentState {
            highest_epoch: Epoch(u64::MAX - 3),
            joined: true,
        };
        file.store(&s).unwrap();
        assert_eq!(file.load().unwrap(), s);
        let t = AgentState {
            highest_epoch: Epoch(9),
            joined: false,
        };
        file.store(&t).unwrap();
        assert_eq!(file.load().unwrap(), t);
        assert!(!dir.path().join("sub/agent.state.tmp").exists());
    }

    #[test]
    fn corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        file.store(&AgentState {
            highest_epoch: Epoch(7),
            joined: true,
        })
        .unwrap();
        let good = std::fs::read(file.path()).unwrap();
        // Every single flipped bit is caught, by the magic, the version, the length or the sum.
        for i in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[i / 8] ^= 1 << (i % 8);
            std::fs::write(file.path(), &bad).unwrap();
            assert!(
                matches!(file.load(), Err(StateError::Corrupt { .. })),
                "bit {i} flipped went unnoticed"
            );
        }
        std::fs::write(file.path(), &good[..good.len() - 1]).unwrap();
        let e = file.load().unwrap_err().to_string();
        assert!(e.contains("length"), "{e}");
        std::fs::write(file.path(), b"").unwrap();
        assert!(file.load().unwrap_err().to_string().contains("bad magic"));
    }

    #[test]
    fn older_epochs_are_refused() {
        let s = AgentState {
            highest_epoch: Epoch(5),
            joined: true,
        };
        assert_eq!(s.check(Epoch(4)), EpochCheck::Stale { highest: Epoch(5) });
        assert_eq!(s.check(Epoch(5)), EpochCheck::Current);
        assert_eq!(s.check(Epoch(6)), EpochCheck::Newer);
        assert_eq!(AgentState::default().check(Epoch(0)), EpochCheck::Current);
    }
}
