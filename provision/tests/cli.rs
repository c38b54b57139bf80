//! The real `ha-provision` binary refuses topologies that cannot make a cluster (no monitor,
//! an even number of monitors, no PostgreSQL node) in `plan` and `up`: exit 64, the problem
//! named on stderr, and nothing created (no state directory, no namespace).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

/// The reference stand with `drop` monitor and `drop_pg` PostgreSQL nodes removed, written
/// into `dir`.
fn without(dir: &Path, monitors: usize, postgres: usize) -> std::path::PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/xmpp-lab.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let mut out = String::new();
    let (mut monitors_left, mut postgres_left) = (monitors, postgres);
    // Nodes are `[[node]]` tables; drop whole tables of the given roles.
    for table in text.split("\n[[node]]") {
        let dropped = if table.contains("role = \"monitor\"") && monitors_left > 0 {
            monitors_left -= 1;
            true
        } else if table.contains("role = \"postgres\"") && postgres_left > 0 {
            postgres_left -= 1;
            true
        } else {
            false
        };
        if !dropped {
            if !out.is_empty() {
                out.push_str("\n[[node]]");
            }
            out.push_str(table);
        }
    }
    assert_eq!(
        (monitors_left, postgres_left),
        (0, 0),
        "the example has them"
    );
    let path = dir.join(format!("without-{monitors}-{postgres}.toml"));
    std::fs::write(&path, out).unwrap();
    path
}

fn namespaces() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn plan_and_up_refuse_a_stand_that_cannot_make_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let prefix = format!("hpc{}", std::process::id());
    for (monitors, postgres, problem) in [
        (1, 0, "2 monitor nodes: use an odd number"),
        (2, 0, "1 monitor node: use 3 or 5"),
        (3, 0, "no monitor node"),
        (0, 2, "no PostgreSQL node"),
    ] {
        let file = without(dir.path(), monitors, postgres);
        for command in ["plan", "up"] {
            let out = Command::new(env!("CARGO_BIN_EXE_ha-provision"))
                .arg("--state-dir")
                .arg(&state_dir)
                .arg(command)
                .arg(&file)
                .args(["--prefix", &prefix])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{command}: {stderr}");
            assert!(
                stderr.contains(problem) && stderr.contains(&*file.to_string_lossy()),
                "{command} names the file and the problem: {stderr}"
            );
            assert!(out.stdout.is_empty(), "{command} printed a plan");
            assert!(!state_dir.exists(), "{command} created its state");
            assert!(
                !namespaces().contains(&prefix),
                "{command} created namespaces"
            );
        }
    }
}
