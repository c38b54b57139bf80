//! The workspace's daemon and CLI binaries (`ha-monitor`, `ha-agent`, `haclt`) for tests that
//! run them as real processes.
//!
//! They live in the target directory of the running test or example executable
//! (`target/<profile>/deps/test-HASH` or `target/<profile>/examples/NAME` ->
//! `target/<profile>/NAME`). When one is missing or older
//! than the sources of the crates it is built from, they are built once with `cargo build
//! --bins`, under an exclusive lock file in the target directory so that concurrent test
//! binaries neither build twice nor run a half-written executable. `cargo test -p ha-tests`
//! therefore works on its own; `scripts/test.sh` needs nothing extra.

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

/// Crates whose sources go into the binaries: a change in any of them makes a binary stale.
const SOURCE_DIRS: [&str; 5] = ["proto", "pki", "monitor", "agent", "haclt"];

/// Locates the binaries, building them first when needed (once per process). Panics when the
/// build fails: no test can run without them.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable has a path");
        // target/<profile>/deps/name-HASH or target/<profile>/examples/name
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executables live in target/<profile>/deps or examples")
            .to_path_buf();
        let bins = Binaries {
            monitor: profile_dir.join("ha-monitor"),
            agent: profile_dir.join("ha-agent"),
            haclt: profile_dir.join("haclt"),
        };
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("ha-tests sits in the workspace root")
            .to_path_buf();
        let lock_file = File::create(profile_dir.join(".ha-tests-bins.lock"))
            .expect("the target directory is writable");
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("flock on the build lock");
        if stale(&bins, &workspace) {
            build(&profile_dir, &workspace);
        }
        for b in [&bins.monitor, &bins.agent, &bins.haclt] {
            assert!(b.is_file(), "{} is missing after the build", b.display());
        }
        bins
    })
}

/// Whether a binary is missing or older than the newest source file it is built from.
fn stale(bins: &Binaries, workspace: &Path) -> bool {
    let oldest_bin = [&bins.monitor, &bins.agent, &bins.haclt]
        .iter()
        .map(|b| modified(b))
        .min()
        .flatten();
    let Some(oldest_bin) = oldest_bin else {
        return true;
    };
    let mut newest_source = modified(&workspace.join("Cargo.lock"));
    for dir in SOURCE_DIRS {
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

/// `cargo build --bins` for the three packages, into the test executable's target directory
/// and profile.
fn build(profile_dir: &Path, workspace: &Path) {
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory sits in the target directory");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("the profile directory has a UTF-8 name");
    // Cargo names the dev profile's directory `debug`.
    let profile = if profile == "debug" { "dev" } else { profile };
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--bins",
            "-p",
            "ha-monitor",
            "-p",
            "ha-agent",
            "-p",
            "haclt",
        ])
        .args(["--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build --bins failed: {status}");
}
