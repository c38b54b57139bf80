//! `haclt systemd`: every unit it prints passes `systemd-analyze verify` (the real one), and the
//! agent's unit follows the paths of a real agent configuration with non-default paths.
//! `systemd-analyze verify` exits 0 on a misspelled or badly valued directive (it only logs
//! "ignoring"), so a unit counts as broken when the command fails OR says anything about it;
//! the test shows that a deliberately broken directive is caught.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn haclt(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_haclt"))
        .args(args)
        .env_remove("HACLT_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "haclt {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `systemd-analyze verify` on `text` written as `dir/name` (see [`ha_tests::systemd`]).
fn verify(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    ha_tests::systemd::verify_unit(&path)
}

/// A bin dir with executable stand-ins for the daemons (verify checks that ExecStart exists).
fn bin_dir(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for name in ["ha-monitor", "ha-agent"] {
        let p = bin.join(name);
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin.to_str().unwrap().to_owned()
}

#[test]
fn every_unit_passes_systemd_analyze_verify_and_a_broken_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bin = bin_dir(dir.path());
    let units = [
        (
            "ha-monitor.service",
            haclt(&["systemd", "monitor", "--bin-dir", &bin]),
        ),
        (
            "ha-agent.service",
            haclt(&["systemd", "agent", "--role", "postgres", "--bin-dir", &bin]),
        ),
        (
            "ha-agent-ejabberd.service",
            haclt(&["systemd", "agent", "--role", "ejabberd", "--bin-dir", &bin]),
        ),
    ];
    for (name, text) in &units {
        verify(dir.path(), name, text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
    }
    // The check can fail: a misspelled directive, a bad value, a missing binary.
    let (name, good) = &units[1];
    for (from, to) in [
        ("RestrictNamespaces=yes", "RestrictNamespace=yes"),
        ("KillMode=process", "KillMode=procss"),
        ("/ha-agent --config", "/ha-missing --config"),
    ] {
        assert!(good.contains(from), "{from}");
        let broken = good.replace(from, to);
        assert!(
            verify(dir.path(), name, &broken).is_err(),
            "{to} was not caught"
        );
    }
}

/// `haclt systemd agent` for the configuration at `config`.
fn agent_unit(config: &Path, bin: &str) -> String {
    let config = config.to_str().unwrap();
    haclt(&[
        "systemd",
        "agent",
        "--config-path",
        config,
        "--bin-dir",
        bin,
    ])
}

#[test]
fn agent_units_follow_a_configuration_with_non_default_paths() {
    let dir = tempfile::tempdir().unwrap();
    let bin = bin_dir(dir.path());
    let pg = dir.path().join("pg.toml");
    std::fs::write(
        &pg,
        r#"role = "postgres"
node = "pg1"
group = "main"
monitors = ["127.0.0.1:7400"]
state_dir = "/srv/ha/agent-state"
listen = "127.0.0.1:7410"
[tls]
ca = "/srv/pki/ca.pem"
cert = "/srv/pki/node/pg1.pem"
key = "/srv/pki/keys/pg1.key"
[postgres]
data_dir = "/srv/pg/cluster/data"
port = 5433
advertise_host = "127.0.0.1"
socket_dir = "/srv/pg/sockets"
log_file = "/srv/pg/logs/postgres.log"
"#,
    )
    .unwrap();
    let text = agent_unit(&pg, &bin);
    for needed in [
        "User=postgres\n",
        "ReadWritePaths=-/srv/pg/cluster\n",
        "ReadWritePaths=-/srv/pg/logs\n",
        "ReadWritePaths=-/srv/pg/sockets\n",
        "ReadWritePaths=-/srv/pki/node\n",
        "ReadWritePaths=-/srv/pki/keys\n",
        "ReadWritePaths=-/srv/ha/agent-state\n",
        "/srv/pg/cluster/data.tls",
        "KillMode=process\n",
        &format!("ExecStart={bin}/ha-agent --config {}\n", pg.display()),
        &format!("ConditionPathExists={}\n", pg.display()),
    ] {
        assert!(text.contains(needed), "lacks {needed}:\n{text}");
    }
    assert!(!text.contains("StateDirectory="), "{text}");
    assert!(!text.contains("RuntimeDirectory="), "{text}");
    verify(dir.path(), "pg-agent.service", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    let ej = dir.path().join("ej.toml");
    std::fs::write(
        &ej,
        r#"role = "ejabberd"
node = "xmpp1"
group = "main"
monitors = ["127.0.0.1:7400"]
state_dir = "/var/lib/ha-agent-xmpp"
dev = true
[ejabberd]
config_file = "/srv/xmpp/conf/ejabberd.yml"
erlang_node = "ejabberd@localhost"
cookie_home = "/var/lib/ejabberd"
vhosts = ["example.org"]
advertise_host = "127.0.0.1"
"#,
    )
    .unwrap();
    let text = agent_unit(&ej, &bin);
    for needed in [
        "User=ejabberd\n",
        "ReadWritePaths=-/srv/xmpp/conf\n",
        "StateDirectory=ha-agent-xmpp\n",
        "MemoryDenyWriteExecute=yes\n",
        // A dev configuration (no [tls]) needs the flag too.
        " --dev\n",
    ] {
        assert!(text.contains(needed), "lacks {needed}:\n{text}");
    }
    verify(dir.path(), "ej-agent.service", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    // With TLS to PostgreSQL: the agent creates the copies' directory, so its parent is
    // writable; under the state directory nothing more is needed.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "").unwrap();
    for (sql_tls, parent_listed) in [
        ("/srv/xmpp/sql-tls", true),
        ("/var/lib/ha-agent-xmpp/sql-tls", false),
    ] {
        let with_tls = std::fs::read_to_string(&ej).unwrap().replace(
            "dev = true\n",
            &format!(
                "[tls]\nca = {ca:?}\ncert = \"/srv/pki/node/node.pem\"\nkey = \"/srv/pki/keys/node.key\"\n"
            ),
        ) + &format!("sql_tls_dir = {sql_tls:?}\n");
        let path = dir.path().join("ej-tls.toml");
        std::fs::write(&path, with_tls).unwrap();
        let text = agent_unit(&path, &bin);
        let listed: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ReadWritePaths="))
            .collect();
        assert_eq!(
            listed.contains(&"ReadWritePaths=-/srv/xmpp"),
            parent_listed,
            "{sql_tls}:\n{text}"
        );
        assert!(!text.contains(" --dev"), "{text}");
    }
}

#[test]
fn an_agent_unit_needs_a_readable_configuration_or_a_role() {
    let out = Command::new(env!("CARGO_BIN_EXE_haclt"))
        .args([
            "systemd",
            "agent",
            "--config-path",
            "/nonexistent/agent.toml",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/agent.toml"), "{stderr}");
    assert!(stderr.contains("--role"), "{stderr}");
}
