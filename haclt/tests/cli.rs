//! The real `haclt` binary, run in a tempdir: the `pki` commands end to end (files, modes, exit
//! codes, rotation with and without a new CA) and the `systemd` unit output.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use ha_pki::{CertInfo, Role};
use x509_parser::pem::Pem;

fn haclt(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_haclt"))
        .args(args)
        // Keep the test independent of the caller's environment.
        .env_remove("HACLT_CONFIG")
        .env_remove("HACLT_MONITORS")
        .env_remove("HACLT_DEV")
        .output()
        .unwrap();
    eprintln!(
        "haclt {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(args: &[&str]) -> String {
    let out = haclt(args);
    assert_eq!(out.status.code(), Some(0), "haclt {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str], code: i32, stderr_contains: &str) {
    let out = haclt(args);
    assert_eq!(out.status.code(), Some(code), "haclt {args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(stderr_contains), "{stderr}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn show(path: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["pki", "show", path.to_str().unwrap(), "--json"])).unwrap()
}

fn pems(path: &Path) -> Vec<Pem> {
    let bytes = std::fs::read(path).unwrap();
    Pem::iter_from_buffer(&bytes).map(Result::unwrap).collect()
}

/// Whether the certificate in `cert` verifies against the single CA certificate in `ca`.
fn verifies(cert: &Path, ca: &Path) -> bool {
    let (cert_pem, ca_pem) = (pems(cert), pems(ca));
    let (cert, ca) = (
        cert_pem[0].parse_x509().unwrap(),
        ca_pem[0].parse_x509().unwrap(),
    );
    cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
}

#[test]
fn pki_init_issue_show_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out = tmp.path().join("certs");
    let (d, o) = (dir.to_str().unwrap(), out.to_str().unwrap());

    fails(
        &["pki", "issue", "m1", "--role", "monitor", "--dir", d],
        64,
        "run `haclt pki init",
    );
    ok(&["pki", "init", "--dir", d, "--name", "test-ca"]);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.pem")) & !0o644, 0);
    let ca_pem = std::fs::read(dir.join("ca.pem")).unwrap();
    fails(&["pki", "init", "--dir", d], 64, "--force");
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca_pem);

    let ca = show(&dir.join("ca.pem"));
    assert_eq!(ca["is_ca"], true);
    assert_eq!(ca["subject"], "CN=test-ca");
    assert_eq!(ca["role"], serde_json::Value::Null);

    for role in Role::ALL {
        let name = format!("{role}1");
        let stdout = ok(&[
            "pki",
            "issue",
            &name,
            "--role",
            role.as_str(),
            "--san",
            "192.168.1.10",
            "--san",
            "db.example.net",
            "--dir",
            d,
            "--out",
            o,
        ]);
        assert!(stdout.contains("expires"), "{stdout}");
        let (cert, key) = (
            out.join(format!("{name}.pem")),
            out.join(format!("{name}.key")),
        );
        assert_eq!(mode(&key), 0o600, "{name}.key");
        let s = show(&cert);
        assert_eq!(s["role"], role.as_str());
        assert_eq!(s["name"], name.as_str());
        assert_eq!(s["subject"], format!("CN={name}"));
        assert_eq!(s["issuer"], "CN=test-ca");
        assert_eq!(s["is_ca"], false);
        let sans: Vec<&str> = s["sans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for expected in [
            format!("URI:ha://{role}/{name}"),
            "IP:192.168.1.10".to_owned(),
            "DNS:db.example.net".to_owned(),
        ] {
            assert!(
                sans.contains(&expected.as_str()),
                "{expected} not in {sans:?}"
            );
        }
        let (nb, na) = (
            humantime::parse_rfc3339(s["not_before"].as_str().unwrap()).unwrap(),
            humantime::parse_rfc3339(s["not_after"].as_str().unwrap()).unwrap(),
        );
        let lifetime = na.duration_since(nb).unwrap().as_secs();
        // One year (365.25 days) plus the five-minute clock-skew allowance.
        assert_eq!(lifetime, 31_557_600 + 300);
        assert!(verifies(&cert, &dir.join("ca.pem")));
    }
    let human = ok(&["pki", "show", out.join("postgres1.pem").to_str().unwrap()]);
    assert!(human.contains("identity:   postgres/postgres1"), "{human}");

    fails(
        &["pki", "issue", "x", "--role", "admin", "--dir", d],
        64,
        "unknown role",
    );
    fails(
        &["pki", "issue", "Bad", "--role", "monitor", "--dir", d],
        64,
        "invalid name",
    );
    fails(
        &["pki", "show", dir.join("ca.key").to_str().unwrap()],
        64,
        "not a certificate",
    );
    // --force replaces the CA; the certificates it issued are then re-issued by rotate.
    ok(&["pki", "init", "--dir", d, "--name", "test-ca", "--force"]);
    assert_ne!(std::fs::read(dir.join("ca.pem")).unwrap(), ca_pem);
    let report = ok(&["pki", "rotate", "--dir", d]);
    let n = Role::ALL.len();
    assert!(
        report.contains(&format!("{n} of {n} certificates re-issued")),
        "{report}"
    );
    assert!(verifies(&out.join("monitor1.pem"), &dir.join("ca.pem")));
}

#[test]
fn pki_rotate_reissues_due_certificates_and_rotates_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let d = dir.to_str().unwrap();
    ok(&["pki", "init", "--dir", d]);
    ok(&[
        "pki",
        "issue",
        "short",
        "--role",
        "postgres",
        "--san",
        "10.0.0.5",
        "--validity",
        "20d",
        "--dir",
        d,
    ]);
    ok(&["pki", "issue", "long", "--role", "ejabberd", "--dir", d]);
    let (short, long) = (dir.join("short.pem"), dir.join("long.pem"));
    let before_short = show(&short);
    let before_long = std::fs::read(&long).unwrap();

    // The 20-day certificate is within the 30-day overlap and is re-issued for 90 days; the
    // one-year certificate is untouched.
    let report = ok(&[
        "pki",
        "rotate",
        "--dir",
        d,
        "--overlap",
        "30d",
        "--validity",
        "90d",
    ]);
    assert!(report.contains("re-issued short"), "{report}");
    assert!(report.contains("1 of 2 certificates re-issued"), "{report}");
    let after_short = show(&short);
    assert_ne!(after_short["serial"], before_short["serial"]);
    assert!(
        humantime::parse_rfc3339(after_short["not_after"].as_str().unwrap()).unwrap()
            > humantime::parse_rfc3339(before_short["not_after"].as_str().unwrap()).unwrap()
    );
    assert_eq!(after_short["sans"], before_short["sans"]);
    assert_eq!(after_short["role"], "postgres");
    assert_eq!(std::fs::read(&long).unwrap(), before_long);
    // Idempotent: nothing is due any more.
    let again = ok(&["pki", "rotate", "--dir", d, "--overlap", "30d"]);
    assert!(again.contains("0 of 2 certificates re-issued"), "{again}");
    assert_eq!(show(&short)["serial"], after_short["serial"]);

    // A new CA: the bundle trusts old and new, every certificate is re-issued by the new one.
    let old_ca = dir.join("old-ca.pem");
    std::fs::copy(dir.join("ca.pem"), &old_ca).unwrap();
    let report = ok(&["pki", "rotate", "--dir", d, "--new-ca"]);
    assert!(report.contains("created CA cluster-ca-g2"), "{report}");
    assert!(report.contains("2 of 2 certificates re-issued"), "{report}");
    let bundle = pems(&dir.join("ca-bundle.pem"));
    assert_eq!(bundle.len(), 2);
    for pem in &bundle {
        let cert = pem.parse_x509().unwrap();
        assert!(cert.is_ca());
    }
    assert_eq!(bundle[0].contents, pems(&old_ca)[0].contents);
    assert_eq!(bundle[1].contents, pems(&dir.join("ca.pem"))[0].contents);
    for cert in [&short, &long] {
        assert!(verifies(cert, &dir.join("ca.pem")), "{}", cert.display());
        assert!(!verifies(cert, &old_ca), "{}", cert.display());
        let info = CertInfo::from_pem(&std::fs::read_to_string(cert).unwrap()).unwrap();
        assert!(!info.is_ca);
    }
    assert_eq!(show(&short)["sans"], before_short["sans"]);
    assert_eq!(show(&long)["role"], "ejabberd");

    // Re-running --new-ca during the overlap finishes the rotation instead of creating a third
    // CA; retiring the old CA leaves only the new one in the bundle.
    let current = std::fs::read(dir.join("ca.pem")).unwrap();
    let serial = show(&long)["serial"].clone();
    let again = ok(&["pki", "rotate", "--dir", d, "--new-ca"]);
    assert!(again.contains("already under way"), "{again}");
    assert!(again.contains("0 of 2 certificates re-issued"), "{again}");
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), current);
    assert_eq!(show(&long)["serial"], serial);
    ok(&["pki", "rotate", "--dir", d, "--retire-old-ca"]);
    assert_eq!(pems(&dir.join("ca-bundle.pem")).len(), 1);
}

#[test]
fn systemd_unit_restarts_always() {
    let unit = ok(&["systemd", "monitor"]);
    assert!(unit.contains("Restart=always"), "{unit}");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/ha-monitor"),
        "{unit}"
    );
}

#[test]
fn config_is_looked_for_in_etc_then_the_users_config_dir() {
    use haclt::cli::{config_candidates, find_config};
    use std::path::PathBuf;
    let xdg = config_candidates(Some("/x".into()), Some("/home/u".into()));
    assert_eq!(
        xdg,
        [
            PathBuf::from("/etc/ha/haclt.toml"),
            PathBuf::from("/x/ha/haclt.toml")
        ]
    );
    let home = config_candidates(None, Some("/home/u".into()));
    assert_eq!(home[1], PathBuf::from("/home/u/.config/ha/haclt.toml"));
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
    let places = [first.clone(), second.clone()];
    assert_eq!(find_config(&places), None);
    std::fs::write(&second, "").unwrap();
    assert_eq!(find_config(&places), Some(&second));
    std::fs::write(&first, "").unwrap();
    assert_eq!(find_config(&places), Some(&first), "the earlier place wins");
}

#[test]
fn without_config_the_users_file_is_read_and_a_missing_one_named() {
    assert!(
        !Path::new(haclt::cli::SYSTEM_CONFIG).exists(),
        "this test needs a machine without {}",
        haclt::cli::SYSTEM_CONFIG
    );
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_haclt"))
            .args(["--timeout", "200ms", "status"])
            .env_remove("HACLT_CONFIG")
            .env_remove("HACLT_MONITORS")
            .env_remove("HACLT_DEV")
            .env("XDG_CONFIG_HOME", dir.path())
            .output()
            .unwrap()
    };
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let user_file = dir.path().join("ha/haclt.toml");
    assert!(
        stderr.contains("/etc/ha/haclt.toml") && stderr.contains(user_file.to_str().unwrap()),
        "every place tried is named: {stderr}"
    );
    // A closed loopback port: reading the file shows as "unreachable", not a usage error.
    std::fs::create_dir_all(user_file.parent().unwrap()).unwrap();
    std::fs::write(&user_file, "monitors = [\"127.0.0.1:9\"]\ndev = true\n").unwrap();
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("127.0.0.1:9"), "{stderr}");
}
