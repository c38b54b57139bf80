//! The workspace's daemon and CLI binaries (`ha-monitor`, `ha-agent`, `haclt`) for tests that
//! run them as real processes, and every binary the Debian packages ship (plus `ha-docgen`,
//! which writes their man pages) for the packages test.
//!
//! They live in the target directory of the running test or example executable
//! (`target/<profile>/deps/test-HASH` or `target/<profile>/examples/NAME` ->
//! `target/<profile>/NAME`). When one is missing or older
//! than the sources of the crates it is built from, they are built once with `cargo build
//! --bins`, in the test's own profile, under an exclusive lock file in the target directory so
//! that concurrent test binaries neither build twice nor run a half-written executable.
//! `cargo test -p ha-tests` therefore works on its own; `scripts/test.sh` needs nothing extra.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

/// The three workspace binaries, built and up to date.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub monitor: PathBuf,
    pub agent: PathBuf,
    pub haclt: PathBuf,
}

/// Binaries built together: their names, the crates whose sources go into them (a change in
/// any of them makes a binary stale), and what `cargo build --bins` selects to build them.
struct BinarySet {
    names: &'static [&'static str],
    source_dirs: &'static [&'static str],
    select: &'static [&'static str],
}

/// The three daemon and CLI binaries, each from its package.
const DAEMONS: BinarySet = BinarySet {
    names: &["ha-monitor", "ha-agent", "haclt"],
    source_dirs: &["proto", "pki", "monitor", "agent", "haclt"],
    select: &["-p", "ha-monitor", "-p", "ha-agent", "-p", "haclt"],
};

/// The binaries the Debian packages ship, and `ha-docgen`, which writes their man pages and
/// completions. They are built like `cargo test --workspace` (the suite, nextest) builds them:
/// the same packages with their dev-dependencies, hence the same features, so after the suite's
/// own build only `ha-docgen` (no test needs it) is compiled, instead of every dependency
/// above tokio again for a second feature set.
const PACKAGED: BinarySet = BinarySet {
    names: &[
        "ha-monitor",
        "ha-agent",
        "haclt",
        "ha-provision",
        "ha-docgen",
    ],
    source_dirs: &[
        "proto",
        "pki",
        "files",
        "logging",
        "monitor",
        "agent",
        "haclt",
        "provision",
        "docgen",
    ],
    select: &["--workspace", "--tests"],
};

/// Locates the binaries, building them first when needed (once per process). Panics when the
/// build fails: no test can run without them.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let profile_dir = profile_dir();
        let _lock = built(&profile_dir, &DAEMONS);
        Binaries {
            monitor: profile_dir.join("ha-monitor"),
            agent: profile_dir.join("ha-agent"),
            haclt: profile_dir.join("haclt"),
        }
    })
}

/// The binaries of the Debian packages (`ha-monitor`, `ha-agent`, `haclt`, `ha-provision`) and
/// `ha-docgen`, built and up to date in [`PackagedBinaries::profile_dir`], for
/// `scripts/build-debs.sh --profile dev`.
///
/// The guard holds the build lock until it is dropped, so that no other test binary rebuilds a
/// binary while it is being packaged; [`binaries`] must not be called (in this process) while
/// it lives: it would wait for the lock forever.
#[derive(Debug)]
pub struct PackagedBinaries {
    /// `target/<profile>`, the directory of the test executable's profile.
    pub profile_dir: PathBuf,
    _lock: Flock<File>,
}

/// Builds the packaged binaries when needed (see [`PackagedBinaries`]). Panics when the build
/// fails.
pub fn packaged_binaries() -> PackagedBinaries {
    let profile_dir = profile_dir();
    let lock = built(&profile_dir, &PACKAGED);
    PackagedBinaries {
        profile_dir,
        _lock: lock,
    }
}

/// `target/<profile>` of the running test or example executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/name-HASH or target/<profile>/examples/name
    exe.parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps or examples")
        .to_path_buf()
}

/// Under the build lock (returned, held), builds the binaries of `set` into `profile_dir` when
/// one is missing or stale.
fn built(profile_dir: &Path, set: &BinarySet) -> Flock<File> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ha-tests sits in the workspace root");
    let lock_file = File::create(profile_dir.join(".ha-tests-bins.lock"))
        .expect("the target directory is writable");
    let lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock on the build lock");
    let bins: Vec<PathBuf> = set.names.iter().map(|n| profile_dir.join(n)).collect();
    if stale(&bins, workspace, set.source_dirs) {
        build(profile_dir, workspace, set.select);
    }
    for b in &bins {
        assert!(b.is_file(), "{} is missing after the build", b.display());
    }
    lock
}

/// Whether a binary is missing or older than the newest source file it is built from.
fn stale(bins: &[PathBuf], workspace: &Path, source_dirs: &[&str]) -> bool {
    let oldest_bin = bins.iter().map(|b| modified(b)).min().flatten();
    let Some(oldest_bin) = oldest_bin else {
        return true;
    };
    let mut newest_source = modified(&workspace.join("Cargo.lock"));
    for dir in source_dirs {
        newest_source = newest_source.max(modified(&workspace.join(dir).join("Cargo.toml")));
        newest_source = newest_source.max(newest_in(&workspace.join(dir).join("src")));
    }
    newest_source.is_some_and(|s| s > oldest_bin)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn newest_in(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_in(&path)
        } else {
            modified(&path)
        };
        newest = newest.max(t);
    }
    newest
}

/// `cargo build --bins` with `select`, into the test executable's target directory and
/// profile.
fn build(profile_dir: &Path, workspace: &Path, select: &[&str]) {
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory sits in the target directory");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("the profile directory has a UTF-8 name");
    // Cargo names the dev profile's directory `debug`.
    let profile = if profile == "debug" { "dev" } else { profile };
    let status = without_test_env(&mut Command::new(env!("CARGO")))
        .args(["build", "--bins"])
        .args(select)
        .args(["--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace)
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "cargo build --bins {select:?} failed: {status}"
    );
}

/// Removes from `cmd`'s environment what cargo and nextest set for a test process (the
/// package's `CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), for a cargo started by a test. Build
/// scripts depend on some of them (ring's: `rerun-if-env-changed=CARGO_MANIFEST_DIR`), so
/// with them a build from a test reruns ring's build script and recompiles everything above
/// ring, and the next build from a shell does it again.
pub fn without_test_env(cmd: &mut Command) -> &mut Command {
    const NAMES: [&str; 8] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ];
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if NAMES.contains(&name)
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
        {
            cmd.env_remove(name);
        }
    }
    cmd
}
