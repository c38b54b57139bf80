//! The one way the workspace writes files: crash-safe and symlink-safe.
//!
//! Every daemon and tool writes its files through this crate (keys and certificates, the
//! PostgreSQL settings and markers in a data directory, `ejabberd.yml`, agent and monitor
//! state, the stand's records), so the rules below hold everywhere, not only where someone
//! remembered them.
//!
//! Invariants:
//! - **Crash-safe.** A file is replaced by writing a temporary file with a random name next to
//!   it, fsyncing it, renaming it over the target and fsyncing the directory: after a crash the
//!   path holds the complete old or the complete new content, never a torn one.
//! - **Never wider than asked.** The temporary file is created (`O_CREAT | O_EXCL`) with mode
//!   0600, given its owner and exact mode on the open descriptor, and only then filled: a
//!   secret is never readable by anyone else, not even briefly, and the umask does not matter.
//! - **Nothing is followed.** The directory is opened once with `O_NOFOLLOW` and everything
//!   after happens relative to that descriptor (`openat`, `renameat`, `unlinkat`): a directory
//!   that is a symbolic link is refused, a symbolic link planted at the target is replaced (the
//!   rename never writes through it), and ownership and mode are set on descriptors, never on
//!   paths. So a local user who owns a directory the root agent writes into (PostgreSQL's data
//!   directory belongs to `postgres`) cannot make it overwrite or give away any other file.
//!   Components above the last directory are trusted: they belong to root in every layout the
//!   project documents.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid, UnlinkatFlags};

/// Who owns a file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// A write, rename or removal that did not happen; the old file, if any, is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {step}: {source}")]
    Io {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is a symbolic link: refused, so that nothing is written or given away through it \
         (configure the real path)"
    )]
    Symlink { path: PathBuf },
    #[error(
        "{path} is not a plain file (a directory, device or a file with other hard links): refused"
    )]
    NotPlain { path: PathBuf },
    #[error("{path} has no file name")]
    NoName { path: PathBuf },
}

impl FileError {
    fn io<'a>(path: &'a Path, step: &'static str) -> impl FnOnce(Errno) -> Self + 'a {
        move |e| Self::Io {
            path: path.to_owned(),
            step,
            source: e.into(),
        }
    }

    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::Symlink { path }
            | Self::NotPlain { path }
            | Self::NoName { path } => path,
        }
    }

    /// Whether the file was not there (a read or removal of an absent file).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// How [`write`] leaves the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    mode: u32,
    owner: Option<Owner>,
    durable: bool,
}

impl WriteOptions {
    /// Exactly `mode`, owned by the caller, fsynced.
    pub const fn mode(mode: u32) -> Self {
        Self {
            mode,
            owner: None,
            durable: true,
        }
    }

    /// Owned by `owner` (set on the descriptor before anything is written).
    pub const fn owned_by(self, owner: Owner) -> Self {
        Self {
            owner: Some(owner),
            ..self
        }
    }

    /// Owned by `owner` when given, by the caller otherwise.
    pub const fn maybe_owned_by(self, owner: Option<Owner>) -> Self {
        Self { owner, ..self }
    }

    /// Still atomic, but neither the file nor the directory is fsynced: for records that only
    /// count within the boot that wrote them (the page cache outlives a crash of the process).
    pub const fn not_durable(self) -> Self {
        Self {
            durable: false,
            ..self
        }
    }
}

/// Replaces (or creates) the file at `path` with `contents`, atomically, see the module rules.
pub fn write(path: &Path, contents: &[u8], options: WriteOptions) -> Result<(), FileError> {
    let (dir, name) = open_parent(path)?;
    write_in(&dir, path, name, contents, options)
}

/// Replaces the existing file at `path`, keeping its owner, group and mode (a configuration
/// another service reads, such as `ejabberd.yml`). A symbolic link there is refused.
pub fn replace_keeping_owner(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    let (dir, name) = open_parent(path)?;
    let st = nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(FileError::io(path, "reading the current file's metadata"))?;
    match kind(&st) {
        SFlag::S_IFREG => {}
        SFlag::S_IFLNK => {
            return Err(FileError::Symlink {
                path: path.to_owned(),
            });
        }
        _ => {
            return Err(FileError::NotPlain {
                path: path.to_owned(),
            });
        }
    }
    let options = WriteOptions::mode(st.st_mode & 0o7777).owned_by(Owner {
        uid: st.st_uid,
        gid: st.st_gid,
    });
    write_in(&dir, path, name, contents, options)
}

/// Renames `from` over `to` (both in the same directory) and makes the rename durable.
pub fn rename(from: &Path, to: &Path) -> Result<(), FileError> {
    let (dir, to_name) = open_parent(to)?;
    let from_name = from.file_name().ok_or_else(|| FileError::NoName {
        path: from.to_owned(),
    })?;
    nix::fcntl::renameat(&dir, from_name, &dir, to_name)
        .map_err(FileError::io(to, "renaming into place"))?;
    nix::unistd::fsync(&dir).map_err(FileError::io(to, "fsyncing the directory"))
}

/// Removes the file (or symbolic link) at `path` durably; `false` when there was none.
pub fn remove(path: &Path) -> Result<bool, FileError> {
    let (dir, name) = match open_parent(path) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(e),
    };
    match nix::unistd::unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(FileError::io(path, "removing")(e)),
    }
    nix::unistd::fsync(&dir).map_err(FileError::io(path, "fsyncing the directory"))?;
    Ok(true)
}

/// Fsyncs the directory `dir` (after files in it were created or renamed by someone else).
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    let fd = open_dir(dir)?;
    nix::unistd::fsync(&fd).map_err(FileError::io(dir, "fsyncing the directory"))
}

/// Makes `dir` exist with exactly `mode` and, when given, `owner`, set on the opened directory
/// itself: a symbolic link there is refused, never followed to chmod or chown its target.
pub fn prepare_dir(dir: &Path, mode: u32, owner: Option<Owner>) -> Result<(), FileError> {
    fs::create_dir_all(dir).map_err(|source| FileError::Io {
        path: dir.to_owned(),
        step: "creating the directory",
        source,
    })?;
    let fd = open_dir(dir)?;
    if let Some(o) = owner {
        nix::unistd::fchown(&fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid)))
            .map_err(FileError::io(dir, "changing the owner"))?;
    }
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode))
        .map_err(FileError::io(dir, "setting the mode"))
}

/// Opens the log file at `path` for appending, creating it with `mode` when absent. A symbolic
/// link, a non-regular file or a file with another hard link is refused: the opener may be root
/// and the directory someone else's.
pub fn open_append(path: &Path, mode: u32) -> Result<File, FileError> {
    let (dir, name) = open_parent(path)?;
    let fd = nix::fcntl::openat(
        &dir,
        name,
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map_err(|e| refused_link(path, e, "opening"))?;
    let st = nix::sys::stat::fstat(&fd).map_err(FileError::io(path, "inspecting"))?;
    if kind(&st) != SFlag::S_IFREG || st.st_nlink != 1 {
        return Err(FileError::NotPlain {
            path: path.to_owned(),
        });
    }
    Ok(File::from(fd))
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// `ELOOP` from an `O_NOFOLLOW` open means a symbolic link was there.
fn refused_link(path: &Path, e: Errno, step: &'static str) -> FileError {
    if e == Errno::ELOOP || (e == Errno::ENOTDIR && path.is_symlink()) {
        FileError::Symlink {
            path: path.to_owned(),
        }
    } else {
        FileError::io(path, step)(e)
    }
}

fn open_dir(dir: &Path) -> Result<OwnedFd, FileError> {
    nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refused_link(dir, e, "opening the directory"))
}

/// The directory holding `path`, opened without following a link, and the file's name in it.
fn open_parent(path: &Path) -> Result<(OwnedFd, &OsStr), FileError> {
    let name = path.file_name().ok_or_else(|| FileError::NoName {
        path: path.to_owned(),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok((open_dir(dir)?, name))
}

fn write_in(
    dir: &OwnedFd,
    path: &Path,
    name: &OsStr,
    contents: &[u8],
    options: WriteOptions,
) -> Result<(), FileError> {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        ".ha-tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = fill_and_rename(dir, path, &tmp, name, contents, options);
    if result.is_err() {
        // Best effort: the temporary file is useless once the write failed.
        let _ = nix::unistd::unlinkat(dir, tmp.as_bytes(), UnlinkatFlags::NoRemoveDir);
    }
    result
}

fn fill_and_rename(
    dir: &OwnedFd,
    path: &Path,
    tmp: &OsStr,
    name: &OsStr,
    contents: &[u8],
    options: WriteOptions,
) -> Result<(), FileError> {
    let fd = nix::fcntl::openat(
        dir,
        tmp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(FileError::io(path, "creating the temporary file"))?;
    if let Some(o) = options.owner {
        nix::unistd::fchown(&fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid))).map_err(
            FileError::io(path, "setting the owner of the temporary file"),
        )?;
    }
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(options.mode)).map_err(FileError::io(
        path,
        "setting the mode of the temporary file",
    ))?;
    let mut file = File::from(fd);
    let io_step = |step: &'static str| {
        move |source| FileError::Io {
            path: path.to_owned(),
            step,
            source,
        }
    };
    file.write_all(contents)
        .map_err(io_step("writing the temporary file"))?;
    if options.durable {
        file.sync_all()
            .map_err(io_step("fsyncing the temporary file"))?;
    }
    nix::fcntl::renameat(dir, tmp, dir, name)
        .map_err(FileError::io(path, "renaming into place"))?;
    if options.durable {
        nix::unistd::fsync(dir.as_fd()).map_err(FileError::io(path, "fsyncing the directory"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};

    const NOBODY: Owner = Owner {
        uid: 65534,
        gid: 65534,
    };

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn entries(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn writes_exact_mode_and_owner_replaces_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postgresql.ha.conf");
        write(&path, b"one", WriteOptions::mode(0o644)).unwrap();
        assert_eq!(mode_of(&path), 0o644);
        // Another mode and an owner: the file is replaced, not reused.
        write(&path, b"two", WriteOptions::mode(0o600).owned_by(NOBODY)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode_of(&path), 0o600);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (NOBODY.uid, NOBODY.gid));
        write(&path, b"three", WriteOptions::mode(0o600).not_durable()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert_eq!(entries(dir.path()), 1, "no temporary file left");
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "root's file").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("standby.signal");
        symlink(&victim, &path).unwrap();
        write(&path, b"", WriteOptions::mode(0o600).owned_by(NOBODY)).unwrap();
        assert!(!path.is_symlink(), "the link itself is replaced");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "root's file");
        let meta = fs::metadata(&victim).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
        // Keeping the owner of a link is refused: there is no file of its own to keep.
        symlink(&victim, dir.path().join("ejabberd.yml")).unwrap();
        let err = replace_keeping_owner(&dir.path().join("ejabberd.yml"), b"x").unwrap_err();
        assert!(matches!(err, FileError::Symlink { .. }), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "root's file");
    }

    #[test]
    fn a_symlinked_directory_is_refused_for_every_operation() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("etc");
        fs::create_dir(&real).unwrap();
        fs::write(real.join("shadow"), "secret").unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.path().join("socket_dir");
        symlink(&real, &link).unwrap();
        let file = link.join("shadow");
        let refused = |r: Result<(), FileError>| {
            let err = r.unwrap_err();
            assert!(matches!(err, FileError::Symlink { .. }), "{err}");
            assert!(err.to_string().contains("symbolic link"), "{err}");
        };
        refused(write(&file, b"x", WriteOptions::mode(0o600)));
        refused(replace_keeping_owner(&file, b"x"));
        refused(remove(&file).map(drop));
        refused(rename(&link.join("a"), &file));
        refused(sync_dir(&link));
        refused(open_append(&file, 0o600).map(drop));
        refused(prepare_dir(&link, 0o700, Some(NOBODY)));
        assert_eq!(fs::read_to_string(real.join("shadow")).unwrap(), "secret");
        let meta = fs::metadata(&real).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o755));
        assert_eq!(entries(&real), 1);
    }

    #[test]
    fn keeping_owner_copies_owner_group_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ejabberd.yml");
        write(&path, b"old", WriteOptions::mode(0o640).owned_by(NOBODY)).unwrap();
        replace_keeping_owner(&path, b"new").unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (65534, 65534, 0o640)
        );
        let err = replace_keeping_owner(&dir.path().join("absent"), b"x").unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(entries(dir.path()), 1);
    }

    #[test]
    fn a_failed_rename_leaves_the_old_content_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails even for root.
        let target = dir.path().join("conf");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), "old").unwrap();
        let err = write(&target, b"new", WriteOptions::mode(0o600)).unwrap_err();
        assert!(err.to_string().contains("renaming into place"), "{err}");
        assert_eq!(fs::read_to_string(target.join("keep")).unwrap(), "old");
        assert_eq!(entries(dir.path()), 1);
    }

    #[test]
    fn directories_logs_removal_and_rename() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/sock");
        prepare_dir(&sock, 0o700, Some(NOBODY)).unwrap();
        let meta = fs::metadata(&sock).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (65534, 0o700));
        prepare_dir(&sock, 0o750, None).unwrap();
        assert_eq!(mode_of(&sock), 0o750);

        let log = dir.path().join("server.log");
        writeln!(open_append(&log, 0o640).unwrap(), "one").unwrap();
        writeln!(open_append(&log, 0o640).unwrap(), "two").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "one\ntwo\n");
        assert_eq!(mode_of(&log), 0o640);
        // A second hard link (to root's file, say) is refused.
        fs::hard_link(&log, dir.path().join("other")).unwrap();
        let err = open_append(&log, 0o640).unwrap_err();
        assert!(matches!(err, FileError::NotPlain { .. }), "{err}");

        let pending = dir.path().join("node.key.pending");
        write(&pending, b"new key", WriteOptions::mode(0o600)).unwrap();
        rename(&pending, &dir.path().join("node.key")).unwrap();
        assert_eq!(fs::read(dir.path().join("node.key")).unwrap(), b"new key");
        assert!(remove(&dir.path().join("node.key")).unwrap());
        assert!(!remove(&dir.path().join("node.key")).unwrap());
        assert!(!remove(&dir.path().join("absent/dir/file")).unwrap());
        sync_dir(dir.path()).unwrap();
    }
}
