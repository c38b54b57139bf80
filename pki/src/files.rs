//! Reading and writing key and certificate files.
//!
//! Invariants: a private key is only ever written with mode 0600, atomically and never through
//! a symbolic link (`ha_files`), so a crash leaves either the old or the new key, never a torn
//! or briefly world-readable one; and a key is only ever read from a
//! file that neither group nor others can access, checked on the opened file itself so the check
//! and the read see the same inode.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Mode of private key files.
pub const KEY_FILE_MODE: u32 = 0o600;
/// Mode of certificate and CA bundle files (public material).
pub const PUBLIC_FILE_MODE: u32 = 0o644;

/// Errors reading or writing PKI files.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: mode {mode:04o} lets group or others access a secret; run `chmod 600 {path}`")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("{path}: not UTF-8 text (expected PEM)")]
    NotText { path: PathBuf },
    #[error(transparent)]
    Write(ha_files::FileError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a private key (or any secret) with mode 0600, atomically.
pub fn write_key_file(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_atomic(path, contents, KEY_FILE_MODE)
}

/// Writes a certificate or CA bundle with mode 0644, atomically.
pub fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_atomic(path, contents, PUBLIC_FILE_MODE)
}

/// Writes any file with exactly `mode`, atomically: it never exists with wider permissions
/// (a configuration holding a password is never briefly world-readable), and an existing
/// file of another mode is replaced, not reused.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    write_atomic(path, contents, mode)
}

/// Reads a secret file as text, refusing it when group or others have any access.
pub fn read_key_file(path: &Path) -> Result<String, FileError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mode = file.metadata().map_err(io_error(path))?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FileError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut contents = String::new();
    file.read_to_string(&mut contents).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            FileError::NotText {
                path: path.to_owned(),
            }
        } else {
            FileError::Io {
                path: path.to_owned(),
                source: e,
            }
        }
    })?;
    Ok(contents)
}

/// Reads a public file (certificate, CA bundle) as text.
pub fn read_public_file(path: &Path) -> Result<String, FileError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    String::from_utf8(bytes).map_err(|_| FileError::NotText {
        path: path.to_owned(),
    })
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    ha_files::write(path, contents, ha_files::WriteOptions::mode(mode)).map_err(FileError::Write)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_written_0600_reads_back_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_key_file(&path, b"first").unwrap();
        write_key_file(&path, b"second").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_key_file(&path).unwrap(), "second");
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn group_or_world_accessible_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_key_file(&path, b"secret").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            match read_key_file(&path) {
                Err(FileError::InsecurePermissions { mode: m, .. }) => assert_eq!(m, mode),
                other => panic!("mode {mode:o}: expected refusal, got {other:?}"),
            }
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_key_file(&path).unwrap(), "secret");
    }

    #[test]
    fn public_files_are_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        write_public_file(&path, b"cert").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        // The process umask may only narrow it.
        assert_eq!(mode & !0o644, 0);
        assert_eq!(read_public_file(&path).unwrap(), "cert");
    }
}
