//! Guests of the libvirt backend: the SSH client against a real sshd (normal suite), and an
//! opt-in end-to-end run on real libvirt guests (only with `HA_LIBVIRT_E2E=1`).
//!
//! The sshd test starts `/usr/sbin/sshd -D` on a free loopback port with its own config, host
//! key and authorized key, as a child killed by PID when the test ends (pass or fail).
#![allow(clippy::unwrap_used)]

use ha_tests::free_port;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_provision::StateFile;
use ha_provision::bootstrap;
use ha_provision::image::{BaseImage, ImageRecipe};
use ha_provision::lab::Haclt;
use ha_provision::ssh::{SshError, SshSession, generate_key, write_private_key};

/// Kills a child process by PID when dropped.
struct KillOnDrop(Child, &'static str);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        eprintln!("stopped {} (pid {})", self.1, self.0.id());
    }
}

/// Polls `what` until it holds or `deadline` passes.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pinned key accepted; any other pinned key refused with both fingerprints; exec returns
/// status, stdout and stderr; upload writes the file with its mode, atomically.
#[tokio::test]
async fn ssh_client_pins_host_key_execs_and_uploads_against_real_sshd() {
    let dir = tempfile::tempdir().unwrap();
    let host_key = generate_key("sshd-test-host");
    let client_key = generate_key("sshd-test-client");
    let host_path = dir.path().join("host_key");
    write_private_key(&host_path, &host_key).unwrap();
    let auth = dir.path().join("authorized_keys");
    std::fs::write(
        &auth,
        format!(
            "{}\n",
            ha_provision::ssh::public_openssh(client_key.public_key()).unwrap()
        ),
    )
    .unwrap();
    let port = free_port();
    let config = dir.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n",
            host_path.display(),
            auth.display()
        ),
    )
    .unwrap();
    // sshd refuses to start without its privilege separation directory.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
        .expect("start /usr/sbin/sshd (scripts/install-deps.sh installs openssh-server)");
    let _sshd = KillOnDrop(child, "sshd");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until("sshd listening", Duration::from_secs(10), || {
        TcpStream::connect(addr).is_ok()
    });
    let client_key = Arc::new(client_key);
    let timeout = Duration::from_secs(10);

    // Another host key pinned: refused, naming both fingerprints.
    let impostor = generate_key("not-this-host");
    let err = SshSession::connect(
        addr,
        impostor.public_key(),
        "root",
        client_key.clone(),
        timeout,
    )
    .await
    .expect_err("a different pinned key must be refused");
    match &err {
        SshError::HostKeyMismatch {
            expected,
            presented,
        } => {
            assert_eq!(
                *expected,
                impostor
                    .public_key()
                    .fingerprint(russh::keys::HashAlg::Sha256)
                    .to_string()
            );
            assert_eq!(
                *presented,
                host_key
                    .public_key()
                    .fingerprint(russh::keys::HashAlg::Sha256)
                    .to_string()
            );
        }
        other => panic!("expected a host key mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("host key mismatch"), "{err}");

    // The right host key but a key sshd does not know: authentication refused.
    let stranger = Arc::new(generate_key("stranger"));
    let err = SshSession::connect(addr, host_key.public_key(), "root", stranger, timeout)
        .await
        .expect_err("unknown client key");
    assert!(matches!(err, SshError::AuthRejected { .. }), "{err:?}");

    // The pinned key: accepted.
    let session = SshSession::connect(addr, host_key.public_key(), "root", client_key, timeout)
        .await
        .expect("pinned key accepted");
    let out = session
        .exec("echo out; echo err >&2; exit 3")
        .await
        .unwrap();
    assert_eq!(out.status, 3);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let err = session.run("exit 7").await.expect_err("non-zero status");
    assert!(matches!(err, SshError::Failed { status: 7, .. }), "{err:?}");

    let target = dir.path().join("new dir/it's a file");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    session
        .upload(&target.display().to_string(), &payload, 0o640)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), payload);
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert!(
        !dir.path().join("new dir/it's a file.ha-upload").exists(),
        "no temporary left behind"
    );
    // With an owner: the file is that user's when it appears.
    let owned = dir.path().join("owned");
    session
        .upload_owned(
            &owned.display().to_string(),
            b"secret",
            0o600,
            Some("nobody:nogroup"),
        )
        .await
        .unwrap();
    let meta = std::fs::metadata(&owned).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (nobody.uid.as_raw(), 0o600)
    );
    let echoed = session.exec_with_stdin("wc -c", &payload).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&echoed.stdout).trim(), "200000");
    session.close().await.unwrap();
}

/// The opt-in end-to-end run, see the README: only runs with `HA_LIBVIRT_E2E=1`; otherwise
/// it prints that it is skipped and passes without checking anything.
#[test]
fn opt_in_libvirt_e2e_runs_only_with_ha_libvirt_e2e_1() {
    if std::env::var("HA_LIBVIRT_E2E").as_deref() != Ok("1") {
        eprintln!("SKIPPED: libvirt end-to-end run (set HA_LIBVIRT_E2E=1 to run it)");
        return;
    }
    e2e::run();
}

mod e2e {
    use super::*;

    const URI: &str = "qemu:///system";

    /// The daemons this run started because none was running (stopped by PID at the end).
    struct Daemons {
        _children: Vec<KillOnDrop>,
        _shadow: Option<tempfile::TempDir>,
    }

    /// Installs what the run needs when something is missing. All four packages at once,
    /// qemu-utils at the version of qemu-system-x86: a qemu-utils from elsewhere (backports)
    /// breaks qemu-system-common, and apt would remove it (and `qemu-img` with it) to install
    /// the others.
    fn ensure_packages() {
        let needed = [
            ("/usr/sbin/libvirtd", "libvirt-daemon-system"),
            ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
            ("/usr/sbin/debootstrap", "debootstrap"),
            ("/usr/bin/qemu-img", "qemu-utils"),
        ];
        let missing: Vec<&str> = needed
            .iter()
            .filter(|(bin, _)| !Path::new(bin).exists())
            .map(|(_, pkg)| *pkg)
            .collect();
        if missing.is_empty() {
            return;
        }
        let policy = Command::new("apt-cache")
            .args(["policy", "qemu-system-x86"])
            .output()
            .unwrap();
        let candidate = String::from_utf8_lossy(&policy.stdout)
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Candidate:")
                    .map(|v| v.trim().to_owned())
            })
            .filter(|v| v != "(none)")
            .expect("apt knows qemu-system-x86 (apt-get update first)");
        let qemu_utils = format!("qemu-utils={candidate}");
        eprintln!("installing {missing:?} ({qemu_utils})");
        let ok = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "--allow-downgrades",
            ])
            .args([
                "libvirt-daemon-system",
                "qemu-system-x86",
                "debootstrap",
                &qemu_utils,
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .unwrap()
            .success();
        assert!(ok, "apt-get install {missing:?}");
        for (bin, pkg) in needed {
            assert!(Path::new(bin).exists(), "{bin} of {pkg} after the install");
        }
    }

    fn ensure_daemons() -> Daemons {
        // The network driver records guest MACs there; systemd-tmpfiles creates it on hosts
        // where init runs libvirt, nothing does in a container.
        std::fs::create_dir_all("/var/lib/libvirt/dnsmasq").unwrap();
        if virt::connect::Connect::open(Some(URI)).is_ok() {
            return Daemons {
                _children: Vec::new(),
                _shadow: None,
            };
        }
        // No init started them (containers): run them in the foreground as our children.
        let virtlogd = Command::new("/usr/sbin/virtlogd")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // A /dev/kvm that exists but does not work makes libvirt 9.0 find its capability
        // cache stale on every lookup ("KVM was enabled when probing, but it is not available
        // now") and re-probe qemu for 30-60 s per domain definition. This daemon sees, in its
        // own mount namespace, a root-only regular file there instead, so KVM is consistently
        // unusable and the cache holds; and a qemu.conf with `namespaces = []`, because the
        // per-domain private /dev cannot carry that bind mount over. The host's /dev/kvm and
        // /etc/libvirt/qemu.conf are untouched.
        let shadow = tempfile::tempdir().unwrap();
        let no_kvm = shadow.path().join("kvm");
        std::fs::write(&no_kvm, b"").unwrap();
        std::fs::set_permissions(&no_kvm, std::fs::Permissions::from_mode(0o600)).unwrap();
        let qemu_conf = shadow.path().join("qemu.conf");
        let mut conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
        conf.push_str("\nnamespaces = []\n");
        std::fs::write(&qemu_conf, conf).unwrap();
        let mut libvirtd = if Path::new("/dev/kvm").exists() {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg(
                    "mount --bind \"$0\" /dev/kvm && mount --bind \"$1\" /etc/libvirt/qemu.conf \
                     && exec /usr/sbin/libvirtd",
                )
                .arg(&no_kvm)
                .arg(&qemu_conf);
            c
        } else {
            Command::new("/usr/sbin/libvirtd")
        };
        // unshare and sh exec into libvirtd: the PID we kill is the daemon's.
        let libvirtd = libvirtd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let started = vec![
            KillOnDrop(virtlogd, "virtlogd"),
            KillOnDrop(libvirtd, "libvirtd"),
        ];
        wait_until("libvirtd answering", Duration::from_secs(30), || {
            virt::connect::Connect::open(Some(URI)).is_ok()
        });
        Daemons {
            _children: started,
            _shadow: Some(shadow),
        }
    }

    /// The stand `up` built: `down` runs when it is dropped, even when an assertion failed
    /// (the console logs and the daemons' journals of the guests are printed first when the
    /// run is failing).
    struct Stand {
        state_dir: PathBuf,
        guests: Vec<String>,
    }

    impl Drop for Stand {
        fn drop(&mut self) {
            if std::thread::panicking() {
                for g in &self.guests {
                    let log = bootstrap::guest_dir(&self.state_dir, g).join("console.log");
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!(
                        "--- {g} console (last lines, newest first) ---\n{}",
                        tail.join("\n")
                    );
                    // What the daemons said (they log to the journal, not the console).
                    let out = provision(
                        &self.state_dir,
                        &[
                            "exec",
                            g,
                            "--",
                            "journalctl",
                            "--no-pager",
                            "-n",
                            "40",
                            "-u",
                            "ha-*",
                            "-u",
                            "ejabberd",
                        ],
                    );
                    eprintln!("--- {g} journal ---\n{}", summary(&out));
                }
            }
            let out = provision(&self.state_dir, &["down"]);
            eprintln!("teardown: {}", summary(&out));
        }
    }

    /// The opt-in stand: three monitors (ha-monitor refuses to run alone), two PostgreSQL
    /// nodes, the smallest that fails over, and one ejabberd frontend (see docs/results.md for what the reference
    /// stand's eight guests do under software emulation on two cores). The service network gives this machine
    /// an address: it is the operator host (`haclt`, the drill writer).
    fn topology_text(name: &str) -> String {
        let mut text = format!(
            r#"
            name = "{name}"
            domain = "e2e.local"
            [libvirt]
            uri = "{URI}"
            domain_type = "qemu"
            [[network]]
            name = "mgmt"
            cidr = "192.168.213.0/24"
            mode = "routed"
            host = "192.168.213.1"
            management = true
            [[network]]
            name = "back"
            cidr = "192.168.214.0/24"
            mode = "routed"
            host = "192.168.214.1"
            "#
        );
        for (node, role, memory_mib, last) in [
            ("mon1", "monitor", 384, 21),
            ("mon2", "monitor", 384, 22),
            ("mon3", "monitor", 384, 23),
            ("pg1", "postgres", 768, 11),
            ("pg2", "postgres", 768, 12),
            ("xmpp1", "ejabberd", 1024, 31),
        ] {
            text.push_str(&format!(
                "[[node]]\nname = \"{node}\"\nrole = \"{role}\"\ncpus = 1\nmemory_mib = {memory_mib}\n\
                 addresses = {{ mgmt = \"192.168.213.{last}\", back = \"192.168.214.{last}\" }}\n"
            ));
        }
        text
    }

    fn bin_dir() -> PathBuf {
        Path::new(env!("CARGO_BIN_EXE_ha-provision"))
            .parent()
            .unwrap()
            .to_owned()
    }

    /// `ha-provision --state-dir S ARGS`.
    fn provision(state_dir: &Path, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_ha-provision"))
            .arg("--state-dir")
            .arg(state_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn summary(out: &std::process::Output) -> String {
        format!(
            "{}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `ha-provision exec NODE -- sh -c SCRIPT`: its stdout, or a panic with everything.
    fn exec(state_dir: &Path, node: &str, script: &str) -> String {
        let out = provision(state_dir, &["exec", node, "--", "sh", "-c", script]);
        assert!(
            out.status.success(),
            "exec {node} {script}: {}",
            summary(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `systemctl show` of a unit: (MainPID, NRestarts).
    fn unit(state_dir: &Path, node: &str, unit: &str) -> (i64, u32) {
        let text = exec(
            state_dir,
            node,
            &format!("systemctl show -p MainPID,NRestarts {unit}"),
        );
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} in {text}"))
                .to_owned()
        };
        (
            field("MainPID").parse().unwrap(),
            field("NRestarts").parse().unwrap(),
        )
    }

    /// The postmaster's PID on `node` (first line of `postmaster.pid`).
    fn postmaster(state_dir: &Path, node: &str) -> String {
        exec(
            state_dir,
            node,
            "head -1 /var/lib/postgresql/15/ha/postmaster.pid",
        )
    }

    /// (primary, epoch) once the group has a primary and every other PostgreSQL node is its
    /// healthy standby.
    fn converged(s: &serde_json::Value) -> Option<(String, u64)> {
        let primary = s["groups"][0]["primary"].as_str()?.to_owned();
        let epoch = s["groups"][0]["epoch"].as_u64()?;
        let nodes = s["nodes"].as_array()?;
        let pg: Vec<&serde_json::Value> =
            nodes.iter().filter(|n| n["kind"] != "ejabberd").collect();
        let ok = pg.len() == 2
            && pg.iter().all(|n| {
                if n["name"] == primary.as_str() {
                    n["state"] == "primary"
                } else {
                    n["state"] == "standby"
                }
            });
        ok.then_some((primary, epoch))
    }

    /// The ejabberd frontend runs and applied `primary` at `epoch` (its write through
    /// ejabberd's pool was seen there).
    fn ejabberd_on(s: &serde_json::Value, primary: &str, epoch: u64) -> bool {
        ha_provision::lab::ejabberd_status(s, "xmpp1").is_some_and(|e| {
            e["running"] == true
                && e["applied_node"] == primary
                && e["applied_epoch"].as_u64() >= Some(epoch)
        })
    }

    fn other(primary: &str) -> &'static str {
        if primary == "pg1" { "pg2" } else { "pg1" }
    }

    pub fn run() {
        // Progress (guest SSH attempts, uploads, steps) on stderr: this run takes minutes.
        let _ = tracing_subscriber::fmt()
            .with_env_filter("ha_provision=info")
            .with_writer(std::io::stderr)
            .try_init();
        let t0 = Instant::now();
        ensure_packages();
        let _daemons = ensure_daemons();
        let image_dir = std::env::var_os("HA_LIBVIRT_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/ha-provision-image"));
        BaseImage::open_current(&image_dir, &ImageRecipe::default()).unwrap();
        let image_time = t0.elapsed();
        let debs = std::env::var_os("HA_LIBVIRT_DEBS")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin_dir().parent().unwrap().join("debian"));
        for p in ["ha-monitor", "ha-agent", "haclt"] {
            ha_provision::guests::find_deb(&debs, p).unwrap_or_else(|e| {
                panic!("{e}: build them first (scripts/build-debs.sh, or set HA_LIBVIRT_DEBS)")
            });
        }

        let work = tempfile::tempdir().unwrap();
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state_dir = work.path().join("state");
        let prefix = format!("lve{:04x}", rand::random::<u16>());
        let file = work.path().join("e2e.toml");
        std::fs::write(&file, topology_text(&prefix)).unwrap();
        let t_up = Instant::now();
        let stand = Stand {
            state_dir: state_dir.clone(),
            guests: ["mon1", "mon2", "mon3", "pg1", "pg2", "xmpp1"]
                .map(String::from)
                .to_vec(),
        };
        let out = provision(
            &state_dir,
            &[
                "--backend",
                "libvirt",
                "up",
                file.to_str().unwrap(),
                "--prefix",
                &prefix,
                "--image",
                image_dir.to_str().unwrap(),
                "--packages",
                debs.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "up: {}", summary(&out));
        let up_returned = t_up.elapsed();
        eprintln!("UP:\n{}", String::from_utf8_lossy(&out.stdout));

        let haclt = Haclt {
            binary: bin_dir().join("haclt"),
            fabric: None,
            config: StateFile::haclt_config_path(&state_dir),
        };
        let long = Duration::from_secs(600);
        let s = haclt
            .wait_for("primary and standby", long, |s| converged(s).is_some())
            .unwrap();
        let (primary, epoch) = converged(&s).unwrap();
        let up_converged = t_up.elapsed();

        // status and exec over SSH.
        let out = provision(&state_dir, &["status", "--json"]);
        assert!(out.status.success(), "status: {}", summary(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for n in report["nodes"].as_array().unwrap() {
            assert_eq!(n["running"], true, "{n}");
            let daemons = n["daemons"].as_array().unwrap();
            // An ejabberd guest: Debian's ejabberd.service and the agent's unit.
            let units = if n["name"] == "xmpp1" { 2 } else { 1 };
            assert_eq!(daemons.len(), units, "{n}");
            assert!(daemons.iter().all(|d| d["state"] == "running"), "{n}");
        }
        // ejabberd writes to the primary over TLS with its node certificate, no password.
        let s = haclt
            .wait_for("ejabberd on the primary", long, |s| {
                ejabberd_on(s, &primary, epoch)
            })
            .unwrap();
        drop(s);
        let sessions = exec(
            &state_dir,
            &primary,
            "runuser -u postgres -- psql -X -h /run/postgresql -d postgres -Atc \
             \"SELECT DISTINCT s.ssl || ' ' || s.client_dn FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'ejabberd'\"",
        );
        assert_eq!(
            sessions, "true /CN=xmpp1",
            "ejabberd's sessions on {primary}"
        );
        assert_eq!(
            exec(&state_dir, &primary, "systemctl is-active ha-agent"),
            "active"
        );
        let out = provision(&state_dir, &["exec", &primary, "--", "sh", "-c", "exit 7"]);
        assert_eq!(out.status.code(), Some(7), "exit status passed on");

        // 1. The crash drill: kill -9 of the primary's postmaster and agent.
        let t = Instant::now();
        let out = Command::new(&haclt.binary)
            .arg("--config")
            .arg(&haclt.config)
            // Under software emulation a TLS connect takes about 2 s and a synchronous
            // commit about 0.6 s (see the drill's --write-timeout).
            .args([
                "drill",
                "crash-primary",
                "--json",
                "--write-timeout",
                "5s",
                "--wait",
                "300s",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "drill: {}", summary(&out));
        let drill: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(drill["lost_writes"], 0, "{drill}");
        let s = haclt
            .wait_for("the crashed primary rejoins", long, |s| {
                converged(s).is_some_and(|(p, e)| p == other(&primary) && e > epoch)
            })
            .unwrap();
        let drill_rejoined = t.elapsed();
        let (primary, epoch) = converged(&s).unwrap();
        haclt
            .wait_for("ejabberd on the new primary", long, |s| {
                ejabberd_on(s, &primary, epoch)
            })
            .unwrap();

        // 2. systemctl restart ha-agent on the primary: no failover, PostgreSQL and its
        //    connections stay.
        let pm = postmaster(&state_dir, &primary);
        exec(
            &state_dir,
            &primary,
            "(runuser -u postgres -- psql -X -h /run/postgresql -d postgres -c 'select pg_sleep(15)' \
             >/root/held.out 2>&1; echo $? >/root/held.rc) >/dev/null 2>&1 &",
        );
        let (_, restarts) = unit(&state_dir, &primary, "ha-agent");
        let t = Instant::now();
        exec(&state_dir, &primary, "systemctl restart ha-agent");
        let restart_ready = t.elapsed();
        let s = haclt
            .wait_for("converged after the agent restart", long, |s| {
                converged(s).is_some()
            })
            .unwrap();
        assert_eq!(
            converged(&s).unwrap(),
            (primary.clone(), epoch),
            "no failover"
        );
        assert_eq!(
            postmaster(&state_dir, &primary),
            pm,
            "PostgreSQL kept running"
        );
        haclt_wait_file(&state_dir, &primary, "/root/held.rc");
        assert_eq!(
            exec(&state_dir, &primary, "cat /root/held.rc"),
            "0",
            "the held connection finished"
        );
        assert_eq!(
            unit(&state_dir, &primary, "ha-agent").1,
            restarts,
            "a restart, not a crash"
        );

        // 3. kill -9 of the agent: systemd restarts it, no failover.
        let kill_restarted = restarted_after(&state_dir, &primary, "-9", long);
        let s = haclt
            .wait_for("converged after kill -9", long, |s| converged(s).is_some())
            .unwrap();
        assert_eq!(
            converged(&s).unwrap(),
            (primary.clone(), epoch),
            "no failover"
        );
        assert_eq!(
            postmaster(&state_dir, &primary),
            pm,
            "PostgreSQL kept running"
        );

        // 4. A frozen agent (SIGSTOP): the watchdog restarts it.
        let t = Instant::now();
        let watchdog_restarted = restarted_after(&state_dir, &primary, "-STOP", long);
        let s = haclt
            .wait_for("converged after the freeze", long, |s| {
                converged(s).is_some()
            })
            .unwrap();
        let (after_freeze, freeze_epoch) = converged(&s).unwrap();
        let freeze_converged = t.elapsed();
        let (primary, epoch) = (after_freeze, freeze_epoch);

        // 5. Reboot of the primary's guest: the standby is promoted, the old primary rejoins
        //    as standby when it is back, with no manual step.
        let t = Instant::now();
        let out = provision(
            &state_dir,
            &[
                "exec",
                &primary,
                "--",
                "sh",
                "-c",
                "(sleep 1; systemctl reboot) >/dev/null 2>&1 &",
            ],
        );
        assert!(out.status.success(), "reboot: {}", summary(&out));
        let s = haclt
            .wait_for("the standby is promoted", long, |s| {
                s["groups"][0]["primary"].as_str() == Some(other(&primary))
                    && s["groups"][0]["epoch"].as_u64() > Some(epoch)
            })
            .unwrap();
        let reboot_failover = t.elapsed();
        drop(s);
        let s = haclt
            .wait_for("the rebooted node rejoins as standby", long, |s| {
                converged(s).is_some_and(|(p, _)| p == other(&primary))
            })
            .unwrap();
        let reboot_rejoined = t.elapsed();
        assert!(converged(&s).is_some());

        let t_down = Instant::now();
        drop(stand);
        let down = t_down.elapsed();
        eprintln!(
            "E2E FIGURES: image {image_time:.1?}; up returned {up_returned:.1?}, converged {up_converged:.1?}; \
             drill crash-primary {drill}, old primary back as standby {drill_rejoined:.1?}; \
             systemctl restart ha-agent {restart_ready:.1?} (no failover); kill -9 agent restarted {kill_restarted:.1?} (no failover); \
             SIGSTOP agent restarted by the watchdog {watchdog_restarted:.1?}, converged {freeze_converged:.1?}; \
             reboot of the primary: failover {reboot_failover:.1?}, rejoined {reboot_rejoined:.1?}; down {down:.1?}; total {:.1?}",
            t0.elapsed()
        );
    }

    /// Sends `signal` (a `kill` option) to `node`'s agent and waits until systemd has started
    /// a new one (restart count up, another main PID); returns how long that took.
    fn restarted_after(state_dir: &Path, node: &str, signal: &str, timeout: Duration) -> Duration {
        let (pid, restarts) = unit(state_dir, node, "ha-agent");
        let t = Instant::now();
        exec(state_dir, node, &format!("kill {signal} {pid}"));
        wait_until(
            &format!("ha-agent restarted after kill {signal}"),
            timeout,
            || {
                let (p, r) = unit(state_dir, node, "ha-agent");
                r > restarts && p > 0 && p != pid
            },
        );
        t.elapsed()
    }

    /// Waits until `path` exists on `node`.
    fn haclt_wait_file(state_dir: &Path, node: &str, path: &str) {
        wait_until(
            &format!("{path} on {node}"),
            Duration::from_secs(120),
            || {
                provision(state_dir, &["exec", node, "--", "test", "-s", path])
                    .status
                    .success()
            },
        );
    }
}
