//! A private, throw-away ejabberd for tests and drills, isolated from the system one.
//!
//! Each instance has its own directory (config, spool, logs, a home holding its own Erlang
//! cookie), node name `ejabberd_<random>@localhost`, and its own epmd on a loopback port the
//! caller picked (`ERL_EPMD_PORT`; tests take one below the ephemeral range from
//! `ha_tests::free_port`), so it never meets the system epmd on 4369 nor another test's node.
//! ejabberd runs as the `ejabberd` user in its own process group; epmd is started by us, so
//! both are ended by their PIDs. A further instance may join the first one's Erlang cluster
//! ([`PrivateInstance::start_joined`]): it shares that epmd and cookie instead of its own.
//!
//! Invariant: everything an instance started is stopped and its directory removed when it is
//! stopped or dropped, even after a failed start.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, User, chown};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::controller::{self, ControllerConfig};
use super::erl::ErlNode;

const EJABBERDCTL: &str = "/usr/sbin/ejabberdctl";
const EPMD: &str = "/usr/bin/epmd";
const ERL_CALL: &str = "/usr/lib/erlang/bin/erl_call";
const START_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the `ejabberd` system user does not exist")]
    NoUser,
    #[error("epmd on port {port} did not start: {detail}")]
    Epmd { port: u16, detail: String },
    #[error("ejabberd {node} exited during start ({status}); log tail:\n{log}")]
    Exited {
        node: String,
        status: String,
        log: String,
    },
    #[error("ejabberd {node} not started after {waited:?} (last: {last}); log tail:\n{log}")]
    StartTimeout {
        node: String,
        waited: Duration,
        last: String,
        log: String,
    },
    #[error("ejabberdctl {args} exited with {status}: {output}")]
    Ctl {
        args: String,
        status: String,
        output: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstanceError {
    let what = what.into();
    move |source| InstanceError::Io { what, source }
}

/// Whose epmd a new instance registers with.
#[derive(Clone, Copy)]
enum Epmd<'a> {
    /// Its own, started on this loopback port.
    Own(u16),
    /// The first node's, for a node joining that node's cluster.
    SharedWith(&'a PrivateInstance),
}

/// A running private ejabberd (see the module docs).
#[derive(Debug)]
pub struct PrivateInstance {
    root: PathBuf,
    node: ErlNode,
    uid: u32,
    gid: u32,
    epmd: Option<Child>,
    ejabberd: Option<Child>,
}

impl PrivateInstance {
    /// Writes `config_yaml` as the instance's `ejabberd.yml` (owned `root:ejabberd`, mode 0640,
    /// like Debian's), starts its own epmd on `epmd_port` (loopback), and starts ejabberd on it,
    /// waiting until the application runs.
    pub async fn start(config_yaml: &str, epmd_port: u16) -> Result<Self, InstanceError> {
        Self::launch(config_yaml, Epmd::Own(epmd_port)).await
    }

    /// A further node of `first`'s Erlang cluster: it uses `first`'s epmd and cookie, starts on
    /// `config_yaml`, and joins `first` (`ejabberdctl join_cluster`, which copies Mnesia's
    /// tables and restarts ejabberd), returning once `first` lists it as a member. Stop it
    /// before `first`, whose epmd it uses.
    pub async fn start_joined(
        config_yaml: &str,
        first: &PrivateInstance,
    ) -> Result<Self, InstanceError> {
        let mut instance = Self::launch(config_yaml, Epmd::SharedWith(first)).await?;
        instance.ctl(&["join_cluster", &first.node.node]).await?;
        instance.wait_running().await?;
        let members = first.ctl(&["list_cluster"]).await?;
        if !members.contains(&instance.node.node) {
            return Err(InstanceError::Ctl {
                args: "list_cluster".into(),
                status: "joined node missing".into(),
                output: members,
            });
        }
        info!(node = %instance.node.node, first = %first.node.node, "private ejabberd joined the cluster");
        Ok(instance)
    }

    async fn launch(config_yaml: &str, epmd: Epmd<'_>) -> Result<Self, InstanceError> {
        let user = User::from_name("ejabberd")
            .map_err(|e| InstanceError::Io {
                what: "looking up user ejabberd".into(),
                source: e.into(),
            })?
            .ok_or(InstanceError::NoUser)?;
        let suffix = format!("{:08x}", rand::random::<u32>());
        let root = std::env::temp_dir().join(format!("ha-ejabberd-{suffix}"));
        let (epmd_port, first) = match epmd {
            Epmd::Own(port) => (port, None),
            Epmd::SharedWith(first) => (first.node.epmd_port.unwrap_or(4369), Some(first)),
        };
        let cookie = match first {
            Some(f) => {
                let path = f.node.cookie_home.join(".erlang.cookie");
                fs::read_to_string(&path).map_err(io_err(format!("reading {}", path.display())))?
            }
            None => (0..20)
                .map(|_| char::from(b'A' + rand::random_range(0..26u8)))
                .collect(),
        };
        let mut instance = Self {
            node: ErlNode {
                erl_call: ERL_CALL.into(),
                node: format!("ejabberd_{suffix}@localhost"),
                cookie_home: root.join("home"),
                epmd_port: Some(epmd_port),
                timeout: Duration::from_secs(10),
            },
            root,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            epmd: None,
            ejabberd: None,
        };
        // On error `instance` is dropped, which ends whatever was started.
        instance.prepare(config_yaml, &cookie)?;
        if first.is_none() {
            instance.start_epmd(epmd_port).await?;
        }
        instance.start_ejabberd().await?;
        info!(node = %instance.node.node, epmd_port, dir = %instance.root.display(), "private ejabberd started");
        Ok(instance)
    }

    /// The managed `ejabberd.yml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("conf/ejabberd.yml")
    }

    pub fn node(&self) -> &ErlNode {
        &self.node
    }

    /// A controller configuration for this instance with test-friendly bounds.
    pub fn controller_config(&self, vhosts: Vec<String>) -> ControllerConfig {
        ControllerConfig {
            config_path: self.config_path(),
            node: self.node.clone(),
            vhosts,
            db_connect_timeout: Duration::from_secs(2),
            verify_timeout: Duration::from_secs(10),
            old_connections_timeout: Duration::from_secs(5),
            sql_check_interval: Duration::from_secs(10),
            sql_tls_dir: None,
        }
    }

    /// Runs `ejabberdctl <args>` against this instance and returns its output.
    pub async fn ctl(&self, args: &[&str]) -> Result<String, InstanceError> {
        let output = self
            .ctl_command(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io_err(format!("running ejabberdctl {}", args.join(" "))))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(text)
        } else {
            Err(InstanceError::Ctl {
                args: args.join(" "),
                status: output.status.to_string(),
                output: text,
            })
        }
    }

    /// SIGKILL of ejabberd's process group, then a new start on the same directories (what a
    /// service manager does after a crash), waiting until the application runs.
    pub async fn kill_and_restart(&mut self) -> Result<(), InstanceError> {
        if let Some(mut child) = self.ejabberd.take() {
            kill_group(&child);
            let _ = child.wait().await;
            info!(node = %self.node.node, "private ejabberd killed");
            // The Erlang VM may outlive `ejabberdctl` by a moment, registered with epmd, and a
            // start meanwhile finds the node "already running".
            self.wait_unregistered().await?;
        }
        self.start_ejabberd().await
    }

    /// Waits until epmd no longer lists this node (bounded by [`START_TIMEOUT`]).
    async fn wait_unregistered(&self) -> Result<(), InstanceError> {
        let Some(port) = self.node.epmd_port else {
            return Ok(());
        };
        let short = self.node.node.split('@').next().unwrap_or_default();
        let listed = format!("name {short} at port");
        let started = Instant::now();
        loop {
            let names = Command::new(EPMD)
                .args(["-port", &port.to_string(), "-names"])
                .env_clear()
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(io_err("running epmd -names"))?;
            if !String::from_utf8_lossy(&names.stdout).contains(&listed) {
                return Ok(());
            }
            if started.elapsed() >= START_TIMEOUT {
                return Err(InstanceError::StartTimeout {
                    node: self.node.node.clone(),
                    waited: started.elapsed(),
                    last: "the killed node is still registered with epmd".into(),
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops ejabberd (gracefully, then by force), then epmd, then removes the directory.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.ejabberd.take() {
            if let Err(e) = self.ctl(&["stop"]).await {
                warn!(node = %self.node.node, error = %e, "ejabberdctl stop failed, killing");
            }
            if tokio::time::timeout(STOP_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                warn!(node = %self.node.node, "ejabberd did not stop in time, killing its process group");
                kill_group(&child);
                let _ = child.wait().await;
            }
        }
        if let Some(mut epmd) = self.epmd.take() {
            terminate(&epmd);
            let _ = epmd.wait().await;
        }
        info!(node = %self.node.node, "private ejabberd stopped");
        // Drop removes the directory.
    }

    fn prepare(&self, config_yaml: &str, cookie: &str) -> Result<(), InstanceError> {
        let owned = |path: &Path, mode: u32| -> Result<(), InstanceError> {
            chown(path, Some(self.uid.into()), Some(self.gid.into())).map_err(|e| {
                InstanceError::Io {
                    what: format!("chown {}", path.display()),
                    source: e.into(),
                }
            })?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(io_err(format!("chmod {}", path.display())))
        };
        fs::create_dir(&self.root).map_err(io_err(format!("creating {}", self.root.display())))?;
        owned(&self.root, 0o750)?;
        for sub in ["conf", "spool", "logs", "home"] {
            let dir = self.root.join(sub);
            fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            owned(&dir, 0o750)?;
        }
        let write = |name: &str, text: &str| -> Result<PathBuf, InstanceError> {
            let path = self.root.join(name);
            fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))?;
            Ok(path)
        };
        let config = write("conf/ejabberd.yml", config_yaml)?;
        // Debian's layout: root owns the file, the ejabberd group reads it.
        chown(&config, Some(0.into()), Some(self.gid.into())).map_err(|e| InstanceError::Io {
            what: "chown ejabberd.yml".into(),
            source: e.into(),
        })?;
        fs::set_permissions(&config, fs::Permissions::from_mode(0o640))
            .map_err(io_err("chmod ejabberd.yml"))?;
        let ctl_cfg = write(
            "conf/ejabberdctl.cfg",
            &format!(
                "ERLANG_NODE={}\nERL_OPTIONS=\"-env ERL_CRASH_DUMP_BYTES 0\"\n",
                self.node.node
            ),
        )?;
        owned(&ctl_cfg, 0o640)?;
        // Distribution listens on loopback only.
        let vm_args = write(
            "conf/vm.args",
            "-kernel inet_dist_use_interface {127,0,0,1}\n",
        )?;
        owned(&vm_args, 0o640)?;
        let inetrc = write(
            "conf/inetrc",
            "{lookup,[\"file\",\"native\"]}.\n{host,{127,0,0,1}, [\"localhost\"]}.\n",
        )?;
        owned(&inetrc, 0o640)?;
        let cookie_path = write("home/.erlang.cookie", cookie)?;
        owned(&cookie_path, 0o400)
    }

    async fn start_epmd(&mut self, port: u16) -> Result<(), InstanceError> {
        let mut cmd = Command::new(EPMD);
        cmd.args(["-port", &port.to_string()])
            .env_clear()
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .uid(self.uid)
            .gid(self.gid)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(io_err("starting epmd"))?;
        let child = self.epmd.insert(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(InstanceError::Epmd {
                    port,
                    detail: format!("exited with {status}"),
                });
            }
            if Instant::now() >= deadline {
                return Err(InstanceError::Epmd {
                    port,
                    detail: "not listening after 10 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start_ejabberd(&mut self) -> Result<(), InstanceError> {
        let console = fs::File::create(self.root.join("logs/console.log"))
            .map_err(io_err("creating console.log"))?;
        let console_err = console
            .try_clone()
            .map_err(io_err("duplicating console.log"))?;
        let child = self
            .ctl_command(&["foreground"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .spawn()
            .map_err(io_err("starting ejabberdctl foreground"))?;
        self.ejabberd = Some(child);
        self.wait_running().await
    }

    /// Waits until the ejabberd application runs (or its process exits, or the start timeout).
    async fn wait_running(&mut self) -> Result<(), InstanceError> {
        let started = Instant::now();
        loop {
            let health = controller::node_health(&self.node).await;
            if health.running {
                return Ok(());
            }
            if let Some(child) = self.ejabberd.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(InstanceError::Exited {
                    node: self.node.node.clone(),
                    status: status.to_string(),
                    log: self.log_tail(),
                });
            }
            if started.elapsed() >= START_TIMEOUT {
                return Err(InstanceError::StartTimeout {
                    node: self.node.node.clone(),
                    waited: started.elapsed(),
                    last: health.status,
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `ejabberdctl` with this instance's directories, node and epmd, as the ejabberd user,
    /// with a clean environment so nothing of the caller's (e.g. `EJABBERD_CONFIG_PATH`) leaks.
    fn ctl_command(&self, args: &[&str]) -> Command {
        let dir = |sub: &str| self.root.join(sub).into_os_string();
        let mut cmd = Command::new(EJABBERDCTL);
        cmd.arg("--config-dir")
            .arg(dir("conf"))
            .arg("--spool")
            .arg(dir("spool"))
            .arg("--logs")
            .arg(dir("logs"))
            .arg("--node")
            .arg(&self.node.node)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .env("HOME", &self.node.cookie_home)
            .env(
                "ERL_EPMD_PORT",
                self.node.epmd_port.unwrap_or(4369).to_string(),
            )
            .current_dir(self.root.join("spool"))
            .uid(self.uid)
            .gid(self.gid)
            .kill_on_drop(true);
        cmd
    }

    /// The last lines of the instance's logs, for start failures.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for name in ["console.log", "ejabberd.log", "error.log"] {
            if let Ok(text) = fs::read_to_string(self.root.join("logs").join(name)) {
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(30);
                out.push_str(&format!("--- {name}\n{}\n", lines[from..].join("\n")));
            }
        }
        out
    }
}

impl Drop for PrivateInstance {
    fn drop(&mut self) {
        // Reached directly only when `stop` was not called (a failed start or a panicking
        // test): end everything by force.
        if let Some(child) = self.ejabberd.take() {
            kill_group(&child);
        }
        if let Some(epmd) = self.epmd.take() {
            terminate(&epmd);
        }
        if let Err(e) = fs::remove_dir_all(&self.root) {
            warn!(dir = %self.root.display(), error = %e, "could not remove the instance directory");
        }
    }
}

/// SIGKILL to the process group we created for ejabberdctl (bash, erl, beam and helpers).
fn kill_group(child: &Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}
