//! `systemd-analyze verify` as a test oracle for unit files (haclt's `systemd` test, the
//! packages test).
//!
//! `systemd-analyze verify` exits 0 on a misspelled or badly valued directive (it only logs
//! "ignoring"), so a unit counts as broken when the command fails OR says anything about it.
//! It also checks that ExecStart's binary exists and is executable.

use std::path::Path;
use std::process::Command;

/// `systemd-analyze verify --man=no --generators=no` on the unit file `path`: `Err(what it
/// said)` when the unit is refused or any line of its output names the unit (its file name).
pub fn verify_unit(path: &Path) -> Result<(), String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a unit file has a UTF-8 file name");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--generators=no"])
        .arg(path)
        .output()
        .expect("systemd-analyze (Debian package systemd, see scripts/install-deps.sh)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains(name)).collect();
    if out.status.success() && about_unit.is_empty() {
        Ok(())
    } else {
        Err(format!("exit {:?}: {said}", out.status.code()))
    }
}
