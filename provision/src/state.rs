//! The stand's state file: which backend built it, from which topology, and every resource
//! `up` created, so `down` removes exactly those and nothing else.
//!
//! Invariants: a resource is recorded (and the file made durable) *before* it is created, so
//! after a crash or a partial failure the file lists a superset of what exists and `down`
//! tolerates recorded resources that are already gone. The file is replaced atomically (write
//! a temp file, fsync, rename, fsync the directory) and never holds a resource twice.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::topology::{Topology, TopologyError};

/// Format version written into the file; a different version is refused, not guessed at.
const VERSION: u32 = 1;
const FILE_NAME: &str = "state.json";

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Filesystem error on `path`.
    #[error("state file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file could not be replaced (the old one is unchanged).
    #[error(transparent)]
    Write(#[from] ha_files::FileError),
    /// The file is not valid JSON of the expected shape.
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The file was written by another format version.
    #[error("state file {path} has version {found}, this build reads version {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// The stored topology no longer validates.
    #[error("state file {path}: stored topology: {source}")]
    Topology {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: TopologyError,
    },
    /// `up` was asked to build a stand over a state dir holding a different one.
    #[error(
        "state dir {dir} holds stand `{stand}` ({backend}, prefix `{prefix}`); run `down` first or use another --state-dir"
    )]
    Mismatch {
        /// The state dir.
        dir: PathBuf,
        /// Stand recorded there.
        stand: String,
        /// Backend recorded there.
        backend: BackendKind,
        /// Prefix recorded there.
        prefix: String,
    },
}

/// Which backend built the stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Network namespaces on this machine.
    Netns,
    /// libvirt networks and domains.
    Libvirt,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Netns => "netns",
            BackendKind::Libvirt => "libvirt",
        })
    }
}

/// Something `up` created and `down` must remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    /// A network namespace (its veths, bridges and addresses live and die with it).
    Namespace {
        /// Name under /run/netns.
        name: String,
    },
    /// `/etc/netns/<namespace>`, holding the hosts and hostname files.
    EtcNetns {
        /// The directory.
        path: PathBuf,
    },
    /// A file or directory tree generated in the state directory (netns processes' material).
    Files {
        /// The file or directory.
        path: PathBuf,
    },
    /// A libvirt network.
    LibvirtNetwork {
        /// Its name.
        name: String,
    },
    /// A libvirt domain.
    LibvirtDomain {
        /// Its name.
        name: String,
    },
}

/// The content of the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Stand name (from the topology).
    pub stand: String,
    /// Backend that built it.
    pub backend: BackendKind,
    /// Prefix of every created name.
    pub prefix: String,
    /// The topology file the stand was built from (TOML), so `down`, `status` and `exec`
    /// do not need the file.
    pub topology: String,
    /// libvirt connection URI used (libvirt backend only).
    pub libvirt_uri: Option<String>,
    /// Created resources, in creation order.
    pub created: Vec<Resource>,
}

/// A state file on disk and its loaded content.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    state: State,
}

/// Removes generated files recorded as [`Resource::Files`]: a file, or a directory and
/// everything in it. Already gone is not an error; true when something was removed.
pub fn remove_files(path: &Path) -> std::io::Result<bool> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl StateFile {
    /// The default state directory of a stand.
    pub fn default_dir(stand: &str) -> PathBuf {
        Path::new("/run/ha-provision").join(stand)
    }

    /// Loads the state in `dir`; `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>, StateError> {
        let path = dir.join(FILE_NAME);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let state: State = serde_json::from_str(&text).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        if state.version != VERSION {
            return Err(StateError::Version {
                path,
                found: state.version,
            });
        }
        Ok(Some(Self {
            dir: dir.to_owned(),
            state,
        }))
    }

    /// Loads the state in `dir` for building `topology` with `backend` under `prefix`, or
    /// starts a new one. An existing state for another stand, backend or prefix is refused;
    /// the stored topology is replaced by the new one (a changed file is re-applied).
    pub fn open_for_up(
        dir: &Path,
        topology_text: &str,
        topology: &Topology,
        backend: BackendKind,
        prefix: &str,
        libvirt_uri: Option<String>,
    ) -> Result<Self, StateError> {
        let mut file = match Self::load(dir)? {
            Some(existing) => {
                let s = &existing.state;
                if s.stand != topology.name || s.backend != backend || s.prefix != prefix {
                    return Err(StateError::Mismatch {
                        dir: dir.to_owned(),
                        stand: s.stand.clone(),
                        backend: s.backend,
                        prefix: s.prefix.clone(),
                    });
                }
                existing
            }
            None => Self {
                dir: dir.to_owned(),
                state: State {
                    version: VERSION,
                    stand: topology.name.clone(),
                    backend,
                    prefix: prefix.to_owned(),
                    topology: String::new(),
                    libvirt_uri: None,
                    created: Vec::new(),
                },
            },
        };
        file.state.topology = topology_text.to_owned();
        file.state.libvirt_uri = libvirt_uri;
        file.save()?;
        Ok(file)
    }

    /// The loaded content.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored topology, validated again.
    pub fn topology(&self) -> Result<Topology, StateError> {
        Topology::parse(&self.state.topology).map_err(|source| StateError::Topology {
            path: self.dir.join(FILE_NAME),
            source,
        })
    }

    /// Where the operator config for `haclt` of this stand lives.
    pub fn haclt_config_path(dir: &Path) -> PathBuf {
        dir.join("haclt.toml")
    }

    /// Records `resource` durably unless already recorded. Call before creating it.
    pub fn record(&mut self, resource: Resource) -> Result<(), StateError> {
        if self.state.created.contains(&resource) {
            return Ok(());
        }
        self.state.created.push(resource);
        self.save()
    }

    /// Forgets `resource` after it was removed.
    pub fn forget(&mut self, resource: &Resource) -> Result<(), StateError> {
        self.state.created.retain(|r| r != resource);
        self.save()
    }

    /// Deletes the state file and, when empty, its directory: the stand is gone.
    pub fn remove(self) -> Result<(), StateError> {
        let path = self.dir.join(FILE_NAME);
        fs::remove_file(&path).map_err(|source| StateError::Io { path, source })?;
        // Only succeeds when nothing else lives there; a user-provided dir with other files
        // is left alone.
        let _ = fs::remove_dir(&self.dir);
        Ok(())
    }

    fn save(&self) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let json = serde_json::to_vec_pretty(&self.state)
            .expect("the state holds only strings, paths and enums, which always serialize");
        ha_files::write(
            &self.dir.join(FILE_NAME),
            &json,
            ha_files::WriteOptions::mode(0o644),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::topology::tests::example;

    #[test]
    fn records_survive_reload_and_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = example();
        let text = toml::to_string(&t).unwrap();
        let mut f =
            StateFile::open_for_up(dir.path(), &text, &t, BackendKind::Netns, "p1", None).unwrap();
        let ns = Resource::Namespace {
            name: "p1-a".into(),
        };
        f.record(ns.clone()).unwrap();
        f.record(ns.clone()).unwrap();
        let loaded = StateFile::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.state().created, vec![ns.clone()]);
        assert_eq!(loaded.topology().unwrap(), t);
        let err = StateFile::open_for_up(dir.path(), &text, &t, BackendKind::Netns, "p2", None)
            .unwrap_err();
        assert!(err.to_string().contains("prefix `p1`"), "{err}");
        let mut again = StateFile::load(dir.path()).unwrap().unwrap();
        again.forget(&ns).unwrap();
        assert!(again.state().created.is_empty());
        again.remove().unwrap();
        assert!(StateFile::load(dir.path()).unwrap().is_none());
    }
}
