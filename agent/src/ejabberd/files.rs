//! Crash-safe replacement of a configuration file.
//!
//! Invariant: at every instant the path holds either the complete old file or the complete new
//! one, with the old file's owner, group and mode (ejabberd runs as its own user and must keep
//! reading it). The new content goes to a temporary file in the same directory (same
//! filesystem, so the rename is atomic), is fsynced, renamed over the target, and the directory
//! is fsynced so the rename itself survives a crash. On any failure the temporary file is
//! removed and the old file is untouched.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A failed atomic replacement; the original file is unchanged.
#[derive(Debug, thiserror::Error)]
#[error("cannot replace {path}: {step}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    pub step: &'static str,
    #[source]
    pub source: io::Error,
}

/// Replaces the existing file at `path` with `contents`, atomically, keeping its owner,
/// group and permission bits.
pub fn replace_file(path: &Path, contents: &[u8]) -> Result<(), WriteError> {
    let fail = |step: &'static str| {
        move |source: io::Error| WriteError {
            path: path.to_owned(),
            step,
            source,
        }
    };
    let meta = fs::metadata(path).map_err(fail("reading the current file's metadata"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        fail("naming the temporary file")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".ha-tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let tmp = dir.join(tmp_name);

    let result = write_temp(&tmp, contents, &meta).and_then(|()| {
        fs::rename(&tmp, path).map_err(|e| ("renaming over the file", e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ("fsyncing the directory", e))
    });
    result.map_err(|(step, source)| {
        // Best effort: the temp file may not exist if creation itself failed.
        let _ = fs::remove_file(&tmp);
        WriteError {
            path: path.to_owned(),
            step,
            source,
        }
    })
}

fn write_temp(
    tmp: &Path,
    contents: &[u8],
    meta: &fs::Metadata,
) -> Result<(), (&'static str, io::Error)> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| ("creating the temporary file", e))?;
    file.write_all(contents)
        .map_err(|e| ("writing the temporary file", e))?;
    std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))
        .map_err(|e| ("copying owner and group", e))?;
    file.set_permissions(Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| ("copying the mode", e))?;
    file.sync_all()
        .map_err(|e| ("fsyncing the temporary file", e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replaces_content_and_keeps_owner_group_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ejabberd.yml");
        fs::write(&path, "old\n").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        // Root can give the file away: use a non-root owner to prove it is copied.
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();

        replace_file(&path, b"new\n").unwrap();

        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file may remain");
    }

    #[test]
    fn missing_file_is_an_error_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = replace_file(&dir.path().join("absent.yml"), b"x").unwrap_err();
        assert_eq!(err.step, "reading the current file's metadata");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn failed_rename_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails even for root.
        let target = dir.path().join("ejabberd.yml");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), "old").unwrap();

        let err = replace_file(&target, b"new").unwrap_err();

        assert_eq!(err.step, "renaming over the file");
        assert_eq!(fs::read_to_string(target.join("keep")).unwrap(), "old");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temporary file removed"
        );
    }
}
