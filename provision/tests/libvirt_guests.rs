//! Guests of the libvirt backend: the SSH client against a real sshd (normal suite), and an
//! opt-in end-to-end run on real libvirt guests (only with `HA_LIBVIRT_E2E=1`).
//!
//! The sshd test starts `/usr/sbin/sshd -D` on a free loopback port with its own config, host
//! key and authorized key, as a child killed by PID when the test ends (pass or fail).
#![allow(clippy::unwrap_used)]

use ha_tests::free_port;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_provision::bootstrap::{self, Guests};
use ha_provision::image::{BaseImage, ImageRecipe};
use ha_provision::libvirt::LibvirtBackend;
use ha_provision::ssh::{SshError, SshSession, generate_key, write_private_key};
use ha_provision::{BackendKind, StateFile, Topology};

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
        eprintln!("installing {missing:?}");
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .unwrap()
            .success();
        assert!(ok, "apt-get install {missing:?}");
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

    /// Tears the stand down even when an assertion fails.
    struct Stand {
        state: Option<StateFile>,
    }

    impl Drop for Stand {
        fn drop(&mut self) {
            if let Some(state) = self.state.take() {
                let result = LibvirtBackend::open(URI).and_then(|b| b.down(state));
                eprintln!("teardown: {result:?}");
            }
        }
    }

    fn topology(name: &str) -> Topology {
        Topology::parse(&format!(
            r#"
            name = "{name}"
            domain = "e2e.local"
            [libvirt]
            domain_type = "qemu"
            [[network]]
            name = "mgmt"
            cidr = "192.168.213.0/24"
            mode = "routed"
            host = "192.168.213.1"
            management = true
            [[network]]
            name = "back"
            cidr = "192.168.214.0/29"
            mode = "isolated"
            [[node]]
            name = "pg1"
            role = "postgres"
            cpus = 1
            memory_mib = 768
            addresses = {{ mgmt = "192.168.213.11", back = "192.168.214.2" }}
            [[node]]
            name = "pg2"
            role = "postgres"
            cpus = 1
            memory_mib = 768
            addresses = {{ mgmt = "192.168.213.12", back = "192.168.214.3" }}
            "#
        ))
        .unwrap()
    }

    fn files_dir(root: &Path) -> PathBuf {
        let put = |rel: &str, content: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
        };
        put(
            "roles/postgres/etc/systemd/system/ha-e2e.service",
            "[Unit]\nDescription=ha-provision e2e marker\n[Service]\nType=oneshot\nRemainAfterExit=yes\n\
             ExecStart=/bin/sh -c 'cat /etc/ha-e2e/node.txt > /run/ha-e2e-ok'\n\
             [Install]\nWantedBy=multi-user.target\n",
        );
        put("nodes/pg1/etc/ha-e2e/node.txt", "pushed to pg1\n");
        put("nodes/pg2/etc/ha-e2e/node.txt", "pushed to pg2\n");
        root.to_owned()
    }

    pub fn run() {
        // Progress (guest SSH attempts, uploads, units) on stderr: this run takes minutes.
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
        let image = BaseImage::open_current(&image_dir, &ImageRecipe::default()).unwrap();
        let image_time = t0.elapsed();

        let work = tempfile::tempdir().unwrap();
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state_dir = work.path().join("state");
        let prefix = format!("lve{:04x}", rand::random::<u16>());
        let t = topology(&prefix);
        let text = toml::to_string(&t).unwrap();
        let mut state = StateFile::open_for_up(
            &state_dir,
            &text,
            &t,
            BackendKind::Libvirt,
            &prefix,
            Some(URI.into()),
        )
        .unwrap();
        let guests: Guests = bootstrap::prepare(&t, &state_dir, &image).unwrap();
        let backend = LibvirtBackend::open(URI).unwrap();
        let t_boot = Instant::now();
        let up = backend.up(&t, &mut state, &guests.media());
        let mut stand = Stand { state: Some(state) };
        up.unwrap();
        let define_and_start = t_boot.elapsed();

        let files = files_dir(&work.path().join("files"));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let started = rt
            .block_on(bootstrap::bootstrap_all(
                &guests,
                Some(&files),
                Duration::from_secs(300),
            ))
            .unwrap_or_else(|e| {
                for g in guests.guests.values() {
                    let log = std::fs::read_to_string(&g.media.console_log).unwrap_or_default();
                    let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
                    eprintln!("--- {} console (last lines, reversed) ---\n{tail}", g.node);
                }
                panic!("bootstrap: {e}");
            });
        let boot_to_units = t_boot.elapsed();
        assert_eq!(
            started,
            BTreeMap::from([
                ("pg1".to_owned(), vec!["ha-e2e.service".to_owned()]),
                ("pg2".to_owned(), vec!["ha-e2e.service".to_owned()]),
            ])
        );

        rt.block_on(async {
            for g in guests.guests.values() {
                let s = bootstrap::wait_for_ssh(
                    g,
                    guests.client_key.clone(),
                    Instant::now() + Duration::from_secs(30),
                )
                .await
                .unwrap();
                let out = s
                    .run("hostname; cat /run/ha-e2e-ok; ip -4 -br addr show; nft list tables; dpkg -s postgresql-15 ejabberd | grep -c '^Status: install ok installed'")
                    .await
                    .unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout);
                eprintln!("{}:\n{stdout}", g.node);
                assert!(stdout.starts_with(&format!("{}\npushed to {}\n", g.node, g.node)), "{stdout}");
                let node = t.node(&g.node).unwrap();
                for addr in node.addresses.values() {
                    assert!(stdout.contains(&addr.to_string()), "{addr} in {stdout}");
                }
                assert!(stdout.contains("table inet ha_provision"), "{stdout}");
                assert!(stdout.trim_end().ends_with('2'), "both packages: {stdout}");
                s.upload("/root/pushed.bin", b"hello guest\n", 0o600).await.unwrap();
                let back = s.run("cat /root/pushed.bin").await.unwrap();
                assert_eq!(back.stdout, b"hello guest\n");
                s.close().await.unwrap();
            }
            // pg1's address with pg2's pinned key: refused, even from a real guest.
            let pg1 = &guests.guests["pg1"];
            let pg2 = &guests.guests["pg2"];
            let err = SshSession::connect(
                pg1.ssh_addr,
                &pg2.host_key,
                "root",
                guests.client_key.clone(),
                Duration::from_secs(10),
            )
            .await
            .expect_err("wrong pin refused");
            assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
        });

        let t_down = Instant::now();
        let state = stand.state.take().unwrap();
        backend.down(state).unwrap();
        let down = t_down.elapsed();
        for g in guests.guests.values() {
            assert!(!g.media.disk.exists(), "overlay removed");
        }
        eprintln!(
            "E2E TIMINGS: image {image_time:?}, define+start 2 domains {define_and_start:?}, then boot+ssh+push+units {:?}, down {down:?}, total {:?}",
            boot_to_units - define_and_start,
            t0.elapsed()
        );
    }
}
