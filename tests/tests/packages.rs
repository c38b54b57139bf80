//! The Debian packages build and install: `scripts/build-debs.sh --profile dev` packages the
//! debug binaries of this target directory (built first when missing or stale, in this test's
//! profile: no release build), and each of the four packages carries its metadata, a binary that
//! runs, its man page and completions, units that pass `systemd-analyze verify`, and maintainer
//! scripts that parse and start nothing.
//!
//! Every package is checked completely and all problems are reported together, each with the
//! output of the command that found it.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

/// The workspace version: every package and binary carries it.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What one Debian package must contain.
struct Package {
    /// The package's name, also the name of its binary.
    name: &'static str,
    /// Packages its Depends line must name.
    depends: &'static [&'static str],
    /// Its systemd units, in usr/lib/systemd/system.
    units: &'static [&'static str],
    /// Whether it has maintainer scripts (postinst, prerm, postrm).
    scripts: bool,
}

const PACKAGES: [Package; 4] = [
    Package {
        name: "ha-monitor",
        depends: &["libc6", "adduser"],
        units: &["ha-monitor.service"],
        scripts: true,
    },
    Package {
        name: "ha-agent",
        depends: &["libc6"],
        units: &["ha-agent.service", "ha-agent-ejabberd.service"],
        scripts: true,
    },
    Package {
        name: "haclt",
        depends: &["libc6"],
        units: &[],
        scripts: false,
    },
    Package {
        name: "ha-provision",
        depends: &["libc6", "libvirt0"],
        units: &[],
        scripts: false,
    },
];

/// The maintainer scripts dpkg runs.
const MAINTAINER_SCRIPTS: [&str; 4] = ["preinst", "postinst", "prerm", "postrm"];

/// Installing or upgrading a package starts nothing: the units start once their configuration
/// exists, through the administrator.
const STARTS_A_SERVICE: [&str; 5] = [
    "systemctl start",
    "systemctl restart",
    "enable --now",
    "deb-systemd-invoke start",
    "deb-systemd-invoke restart",
];

/// Runs `cmd`: its stdout when it exits 0, else what it did and said.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}\n--- stdout\n{}--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn the_packages_build_and_install() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = tempfile::tempdir().unwrap();
    {
        // Holds the build lock while the binaries are packaged.
        let bins = ha_tests::bins::packaged_binaries();
        let target_dir = bins.profile_dir.parent().unwrap();
        // Cargo names the dev profile's directory `debug`.
        let profile = match bins.profile_dir.file_name().unwrap().to_str().unwrap() {
            "debug" => "dev",
            other => other,
        };
        let mut script = Command::new(workspace.join("scripts/build-debs.sh"));
        run(ha_tests::bins::without_test_env(&mut script)
            .args(["--profile", profile, "--output"])
            .arg(out.path())
            .env("CARGO_TARGET_DIR", target_dir))
        .unwrap_or_else(|e| panic!("scripts/build-debs.sh failed: {e}"));
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut problems = Vec::new();
    for package in &PACKAGES {
        let dir = scratch.path().join(package.name);
        std::fs::create_dir(&dir).unwrap();
        for problem in check(package, out.path(), &dir) {
            problems.push(format!("{}: {problem}", package.name));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// The problems of `package` (built into `debs`), unpacked under `dir`.
fn check(package: &Package, debs: &Path, dir: &Path) -> Vec<String> {
    // The lookup ha-provision uses to install them on guests.
    let deb = match ha_provision::guests::find_deb(debs, package.name) {
        Ok(deb) => deb,
        Err(e) => return vec![e.to_string()],
    };
    let mut problems = Vec::new();
    if let Err(e) = check_fields(package, &deb) {
        problems.push(e);
    }
    let root = dir.join("root");
    match run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root)) {
        Ok(_) => problems.extend(check_files(package, &root, dir)),
        Err(e) => problems.push(e),
    }
    let control = dir.join("control");
    match run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control)) {
        Ok(_) => problems.extend(check_scripts(package, &control)),
        Err(e) => problems.push(e),
    }
    problems
}

/// Package, Version (the workspace version, with a Debian revision) and Depends.
fn check_fields(package: &Package, deb: &Path) -> Result<(), String> {
    let control = run(Command::new("dpkg-deb").arg("-f").arg(deb))?;
    let field = |name: &str| {
        control
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .unwrap_or_default()
    };
    let mut problems = Vec::new();
    if field("Package") != package.name {
        problems.push(format!("Package is not {}", package.name));
    }
    let version = field("Version");
    if version.rsplit_once('-').map(|(upstream, _)| upstream) != Some(VERSION) {
        problems.push(format!("Version {version:?} is not {VERSION}-<revision>"));
    }
    let depends: Vec<&str> = field("Depends")
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
        .collect();
    for needed in package.depends {
        if !depends.contains(needed) {
            problems.push(format!("Depends lacks {needed}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}; dpkg-deb -f:\n{control}", problems.join("; ")))
    }
}

/// The binary runs, the man page and completions are there, the units pass verify.
fn check_files(package: &Package, root: &Path, dir: &Path) -> Vec<String> {
    let name = package.name;
    let mut problems = Vec::new();
    match run(Command::new(root.join("usr/bin").join(name)).arg("--version")) {
        Ok(out) if out.contains(VERSION) => {}
        Ok(out) => problems.push(format!("--version says {out:?}, not {VERSION}")),
        Err(e) => problems.push(e),
    }
    let man = root.join(format!("usr/share/man/man1/{name}.1.gz"));
    match run(Command::new("gzip").arg("-cd").arg(&man)) {
        Ok(page) if page.contains(".TH") => {}
        Ok(page) => problems.push(format!("{} is no man page: {page:.200}", man.display())),
        Err(e) => problems.push(e),
    }
    for completion in [
        format!("usr/share/bash-completion/completions/{name}"),
        format!("usr/share/zsh/vendor-completions/_{name}"),
        format!("usr/share/fish/vendor_completions.d/{name}.fish"),
    ] {
        let len = std::fs::metadata(root.join(&completion)).map_or(0, |m| m.len());
        if len == 0 {
            problems.push(format!("{completion} is missing or empty"));
        }
    }
    problems.extend(check_units(package, root, dir));
    problems
}

/// Exactly the expected units, each passing `systemd-analyze verify` with its ExecStart
/// pointed at the unpacked binary (verify needs it to exist).
fn check_units(package: &Package, root: &Path, dir: &Path) -> Vec<String> {
    let system = root.join("usr/lib/systemd/system");
    let mut present: Vec<String> = std::fs::read_dir(&system)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    let mut expected: Vec<String> = package.units.iter().map(|u| (*u).to_owned()).collect();
    expected.sort();
    if present != expected {
        return vec![format!(
            "{} holds units {present:?}, not {expected:?}",
            system.display()
        )];
    }
    let verify_dir = dir.join("units");
    std::fs::create_dir(&verify_dir).unwrap();
    let exec_start = "ExecStart=/usr/bin/";
    let mut problems = Vec::new();
    for unit in package.units {
        let text = std::fs::read_to_string(system.join(unit)).unwrap();
        if !text.contains(&format!("{exec_start}{} ", package.name)) {
            problems.push(format!(
                "{unit} does not start /usr/bin/{}:\n{text}",
                package.name
            ));
            continue;
        }
        let unpacked = text.replace(
            exec_start,
            &format!("ExecStart={}/usr/bin/", root.display()),
        );
        let copy = verify_dir.join(unit);
        std::fs::write(&copy, &unpacked).unwrap();
        if let Err(e) = ha_tests::systemd::verify_unit(&copy) {
            problems.push(format!(
                "{unit} fails systemd-analyze verify: {e}\n{unpacked}"
            ));
        }
    }
    problems
}

/// Maintainer scripts: the expected ones, executable, parsed by `sh -n`, starting no service;
/// ha-monitor's postinst creates its system user.
fn check_scripts(package: &Package, control: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let present: Vec<&str> = MAINTAINER_SCRIPTS
        .into_iter()
        .filter(|s| control.join(s).exists())
        .collect();
    let expected: &[&str] = if package.scripts {
        &["postinst", "prerm", "postrm"]
    } else {
        &[]
    };
    if present != expected {
        problems.push(format!(
            "maintainer scripts {present:?}, expected {expected:?}"
        ));
    }
    for script in present {
        let path = control.join(script);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        if mode & 0o111 == 0 {
            problems.push(format!("{script} is not executable (mode {mode:o})"));
        }
        if let Err(e) = run(Command::new("sh").arg("-n").arg(&path)) {
            problems.push(format!("{script} does not parse: {e}"));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        for line in &code {
            if let Some(start) = STARTS_A_SERVICE.iter().find(|s| line.contains(*s)) {
                problems.push(format!("{script} starts a service ({start}): {line}"));
            }
        }
        if package.name == "ha-monitor" && script == "postinst" {
            let creates_user = code.iter().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.contains(&"adduser")
                    && words.contains(&"--system")
                    && words.last() == Some(&"ha-monitor")
            });
            if !creates_user {
                problems.push(format!(
                    "postinst does not create the ha-monitor user (adduser --system ... ha-monitor):\n{text}"
                ));
            }
        }
    }
    problems
}

/// The unit and maintainer-script checks can fail: they pass a good fake package and catch
/// each deliberately broken variant (without building packages).
#[test]
fn the_checks_catch_broken_units_and_scripts() {
    let monitor = &PACKAGES[0];
    assert_eq!(monitor.name, "ha-monitor");
    let unit = "[Unit]\nDescription=HA monitor\n\n[Service]\n\
                ExecStart=/usr/bin/ha-monitor --config /etc/ha/monitor.toml\nKillMode=process\n\n\
                [Install]\nWantedBy=multi-user.target\n";
    let units_problems = |text: &str| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let system = root.join("usr/lib/systemd/system");
        std::fs::create_dir_all(&system).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        let bin = root.join("usr/bin/ha-monitor");
        std::fs::write(&bin, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(system.join("ha-monitor.service"), text).unwrap();
        check_units(monitor, &root, dir.path())
    };
    let good = units_problems(unit);
    assert!(good.is_empty(), "{good:?}");
    for (from, to) in [
        ("KillMode=process", "KillMode=procss"),
        ("KillMode=process", "KilMode=process"),
        ("/usr/bin/ha-monitor", "/usr/bin/ha-monitors"),
    ] {
        let broken = unit.replace(from, to);
        assert!(!units_problems(&broken).is_empty(), "{to} was not caught");
    }

    let postinst = "#!/bin/sh\nset -e\n# systemctl start is never run\n\
                    if ! getent passwd ha-monitor >/dev/null; then\n  \
                    adduser --system --group --quiet ha-monitor\nfi\nexit 0\n";
    let scripts_problems = |postinst: &str, mode: u32| {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("postinst", postinst),
            ("prerm", "#!/bin/sh\nexit 0\n"),
            ("postrm", "#!/bin/sh\nexit 0\n"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        check_scripts(monitor, dir.path())
    };
    let good = scripts_problems(postinst, 0o755);
    assert!(good.is_empty(), "{good:?}");
    assert!(
        !scripts_problems(postinst, 0o644).is_empty(),
        "a script that is not executable was not caught"
    );
    for (from, to) in [
        ("fi\n", "\n"),
        ("exit 0", "systemctl start ha-monitor.service\nexit 0"),
        (
            "exit 0",
            "systemctl enable --now ha-monitor.service\nexit 0",
        ),
        ("adduser --system --group --quiet ha-monitor", "true"),
    ] {
        let broken = postinst.replace(from, to);
        assert!(
            !scripts_problems(&broken, 0o755).is_empty(),
            "{to:?} was not caught"
        );
    }
    let none = tempfile::tempdir().unwrap();
    assert!(
        !check_scripts(monitor, none.path()).is_empty(),
        "missing maintainer scripts were not caught"
    );
}
