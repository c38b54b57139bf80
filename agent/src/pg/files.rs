//! The data directory as files: what state it is in, crash-safe writes of the files the agent
//! owns, and the parsed output of `pg_controldata`.
//!
//! Invariants: a file the agent writes is either its old or its new content after a crash
//! and belongs to the PostgreSQL OS user; no write, chmod or chown follows a symbolic link the
//! `postgres` user could have planted (all through `ha_files`).
//! A bootstrap or base backup in progress is marked by a sibling file created before the data
//! directory is touched and removed only once the result is complete and configured, so an
//! interrupted one is seen as [`DataDirState::Partial`] and redone, never started.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use ha_files::WriteOptions;
use ha_proto::{Lsn, Timeline};

use super::PgError;

/// What is on disk at the data directory path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirState {
    /// Absent or empty: ready for `initdb` or a base backup.
    Empty,
    /// Left by an interrupted base backup or initdb: must be wiped before use.
    Partial,
    /// A complete cluster (`PG_VERSION` and `global/pg_control` present, no marker).
    Initialized,
}

/// The marker that exists while a base backup fills `data_dir`.
pub fn incomplete_marker(data_dir: &Path) -> PathBuf {
    let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
    name.push(".ha-incomplete");
    data_dir.with_file_name(name)
}

pub fn inspect(data_dir: &Path) -> Result<DataDirState, PgError> {
    if incomplete_marker(data_dir).exists() {
        return Ok(DataDirState::Partial);
    }
    let mut entries = match fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DataDirState::Empty),
        Err(e) => return Err(PgError::io("reading the data directory", data_dir, e)),
    };
    if entries.next().is_none() {
        return Ok(DataDirState::Empty);
    }
    if has_cluster(data_dir) {
        Ok(DataDirState::Initialized)
    } else {
        Ok(DataDirState::Partial)
    }
}

/// Whether `data_dir` holds the files PostgreSQL needs to start, whatever the marker says.
pub fn has_cluster(data_dir: &Path) -> bool {
    data_dir.join("PG_VERSION").is_file() && data_dir.join("global/pg_control").is_file()
}

pub use ha_files::Owner;

/// Writes `contents` to `path` atomically with mode 0600, owned by `owner` (see `ha_files`:
/// nothing in the data directory is followed through a symbolic link).
pub fn write_atomic(path: &Path, contents: &str, owner: Owner) -> Result<(), PgError> {
    ha_files::write(
        path,
        contents.as_bytes(),
        WriteOptions::mode(0o600).owned_by(owner),
    )
    .map_err(PgError::File)
}

/// Reads a file the agent may have written, `None` when absent.
pub fn read_optional(path: &Path) -> Result<Option<String>, PgError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PgError::io("reading", path, e)),
    }
}

pub fn remove_optional(path: &Path) -> Result<(), PgError> {
    ha_files::remove(path).map(drop).map_err(PgError::File)
}

pub fn sync_dir(dir: &Path) -> Result<(), PgError> {
    ha_files::sync_dir(dir).map_err(PgError::File)
}

/// Makes `dir` exist, empty, mode 0700 and owned by `owner` (keeping the directory itself, which
/// may be a mount point).
pub fn reset_dir(dir: &Path, owner: Owner) -> Result<(), PgError> {
    // Refuses a symbolic link before anything is listed or removed through it.
    prepare_dir(dir, owner)?;
    let entries = fs::read_dir(dir).map_err(|e| PgError::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| PgError::io("listing", dir, e))?;
        let p = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(|e| PgError::io("inspecting", &p, e))?
            .is_dir();
        // Neither removal follows a symbolic link inside the directory.
        let r = if is_dir {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(|e| PgError::io("removing", &p, e))?;
    }
    Ok(())
}

/// Creates `dir` when needed and gives it to `owner` with mode 0700, on the opened directory:
/// a symbolic link there is refused.
pub fn prepare_dir(dir: &Path, owner: Owner) -> Result<(), PgError> {
    ha_files::prepare_dir(dir, 0o700, Some(owner)).map_err(PgError::File)
}

/// `Database cluster state` from `pg_controldata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterState {
    /// A primary stopped cleanly.
    ShutDown,
    /// A standby stopped cleanly.
    ShutDownInRecovery,
    /// A primary that was running (or crashed).
    InProduction,
    /// A standby that was running (or crashed).
    InArchiveRecovery,
    /// starting up, shutting down, in crash recovery.
    Other(String),
}

/// The fields of `pg_controldata` the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    pub state: ClusterState,
    pub system_identifier: u64,
    pub checkpoint_lsn: Lsn,
    pub checkpoint_timeline: Timeline,
}

fn bad<E>(field: &'static str) -> impl FnOnce(E) -> PgError {
    move |_| PgError::ControlData { field }
}

impl ControlData {
    /// Parses `pg_controldata` output (run with `LC_ALL=C`).
    pub fn parse(text: &str) -> Result<Self, PgError> {
        let fields: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |key: &'static str| {
            fields
                .get(key)
                .copied()
                .ok_or(PgError::ControlData { field: key })
        };
        let state = match get("Database cluster state")? {
            "shut down" => ClusterState::ShutDown,
            "shut down in recovery" => ClusterState::ShutDownInRecovery,
            "in production" => ClusterState::InProduction,
            "in archive recovery" => ClusterState::InArchiveRecovery,
            other => ClusterState::Other(other.to_owned()),
        };
        Ok(Self {
            state,
            system_identifier: get("Database system identifier")?
                .parse()
                .map_err(bad("Database system identifier"))?,
            checkpoint_lsn: get("Latest checkpoint location")?
                .parse()
                .map_err(bad("Latest checkpoint location"))?,
            checkpoint_timeline: Timeline(
                get("Latest checkpoint's TimeLineID")?
                    .parse()
                    .map_err(bad("Latest checkpoint's TimeLineID"))?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SAMPLE: &str = "pg_control version number:            1300\n\
        Catalog version number:               202209061\n\
        Database system identifier:           7305383735185069912\n\
        Database cluster state:               shut down in recovery\n\
        pg_control last modified:             Mon 23 Nov 2026 07:00:00 PM UTC\n\
        Latest checkpoint location:           0/3000060\n\
        Latest checkpoint's REDO location:    0/3000028\n\
        Latest checkpoint's TimeLineID:       2\n";

    #[test]
    fn controldata_parses() {
        let c = ControlData::parse(SAMPLE).unwrap();
        assert_eq!(c.state, ClusterState::ShutDownInRecovery);
        assert_eq!(c.system_identifier, 7_305_383_735_185_069_912);
        assert_eq!(c.checkpoint_lsn, Lsn(0x300_0060));
        assert_eq!(c.checkpoint_timeline, Timeline(2));
        assert!(matches!(
            ControlData::parse("Database cluster state: shut down\n"),
            Err(PgError::ControlData { .. })
        ));
    }

    #[test]
    fn data_dir_states() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        assert_eq!(inspect(&data).unwrap(), DataDirState::Empty);
        fs::create_dir(&data).unwrap();
        assert_eq!(inspect(&data).unwrap(), DataDirState::Empty);
        fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        assert_eq!(inspect(&data).unwrap(), DataDirState::Partial);
        fs::create_dir(data.join("global")).unwrap();
        fs::write(data.join("global/pg_control"), "x").unwrap();
        assert_eq!(inspect(&data).unwrap(), DataDirState::Initialized);
        fs::write(incomplete_marker(&data), "").unwrap();
        assert_eq!(inspect(&data).unwrap(), DataDirState::Partial);
        let me = Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        reset_dir(&data, me).unwrap();
        assert_eq!(fs::read_dir(&data).unwrap().count(), 0);
        write_atomic(&data.join("f"), "new", me).unwrap();
        assert_eq!(
            read_optional(&data.join("f")).unwrap().as_deref(),
            Some("new")
        );
        remove_optional(&data.join("f")).unwrap();
        remove_optional(&data.join("f")).unwrap();
        assert_eq!(read_optional(&data.join("f")).unwrap(), None);
    }
}
