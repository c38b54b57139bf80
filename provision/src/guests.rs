//! The nodes of a libvirt stand once their guests answer SSH ([`crate::bootstrap`]): the
//! Debian packages installed from a directory of `.deb` files, the stand's material placed
//! with its owners and modes, the daemons started through their systemd units (the
//! [`Fleet`] of [`crate::lab::up`]); and `exec` and `status` of such a stand. Everything goes
//! over SSH with the pinned host keys.
//!
//! Packages per role: monitors get `ha-monitor` and `haclt`, PostgreSQL and ejabberd nodes
//! `ha-agent` and `haclt`. Each `.deb` is kept on the guest in [`DEBS_DIR`]; it is uploaded
//! and installed only when the guest's copy differs (SHA-256), so a second `up` reinstalls
//! nothing and restarts nothing. Installing starts nothing (the units wait for their
//! configuration); `up` starts them in order.
//!
//! Starting a node: monitors and PostgreSQL nodes `systemctl start --no-block` their unit
//! (`ha-monitor.service`, `ha-agent.service`; `up` then waits on `haclt status`). An ejabberd
//! node first (re)starts Debian's `ejabberd.service` unless its Erlang node (the name in the
//! pushed `ejabberdctl.cfg`) answers, waits until it does, joins the first ejabberd node's
//! Erlang cluster unless it is a member, then starts `ha-agent-ejabberd.service`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tracing::info;

use crate::bootstrap::{self, BootstrapError, Guest, Guests};
use crate::daemons::DaemonState;
use crate::lab::{Fleet, Haclt, LabError};
use crate::material::{EJABBERDCTL, Material, Placed};
use crate::ssh::{ExecOutput, SshSession, shell_quote};
use crate::topology::{Node, Role, Topology};

/// Where a guest keeps the packages `up` installed (compared on the next `up`).
pub const DEBS_DIR: &str = "/var/lib/ha-provision/debs";
/// How long an ejabberd node may take to answer after its (re)start: an Erlang VM under
/// software emulation boots in tens of seconds.
const EJABBERD_START: Duration = Duration::from_secs(300);

/// The packages a node of `role` gets.
pub fn packages(role: Role) -> &'static [&'static str] {
    match role {
        Role::Monitor => &["ha-monitor", "haclt"],
        Role::Postgres | Role::Ejabberd => &["ha-agent", "haclt"],
        Role::Gateway => &[],
    }
}

/// The one `<package>_<version>_<arch>.deb` of `package` in `dir`.
pub fn find_deb(dir: &Path, package: &str) -> Result<PathBuf, LabError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LabError::Io {
        what: format!(
            "reading the packages directory {} (build the packages: scripts/build-debs.sh)",
            dir.display()
        ),
        source,
    })?;
    let prefix = format!("{package}_");
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(LabError::Packages(format!(
            "no {package}_*.deb in {} (build the packages: scripts/build-debs.sh)",
            dir.display()
        ))),
        many => Err(LabError::Packages(format!(
            "{} packages of {package} in {}: {} (keep one)",
            many.len(),
            dir.display(),
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The nodes of a libvirt stand, each with an open SSH session.
pub struct GuestFleet {
    rt: tokio::runtime::Runtime,
    sessions: BTreeMap<String, SshSession>,
    /// The first ejabberd node: every other one joins its Erlang cluster.
    first_ejabberd: Option<String>,
    haclt: Haclt,
}

impl std::fmt::Debug for GuestFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestFleet")
            .field("nodes", &self.sessions.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn remote(node: &str, what: impl Into<String>) -> impl FnOnce(String) -> LabError + '_ {
    let what = what.into();
    move |detail| LabError::Remote {
        node: node.to_owned(),
        what,
        detail,
    }
}

impl GuestFleet {
    /// Waits (until `timeout`) for every guest of `guests` to answer SSH and keeps the
    /// sessions; `haclt` is the operator's, run on this machine.
    pub fn connect(
        topology: &Topology,
        guests: &Guests,
        timeout: Duration,
        haclt: Haclt,
    ) -> Result<Self, LabError> {
        let rt = tokio::runtime::Runtime::new().map_err(|source| LabError::Io {
            what: "starting the async runtime".into(),
            source,
        })?;
        let deadline = Instant::now() + timeout;
        let sessions = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for guest in guests.guests.values() {
                let guest = guest.clone();
                let key = guests.client_key.clone();
                set.spawn(async move {
                    let session = bootstrap::wait_for_ssh(&guest, key, deadline).await?;
                    Ok::<_, BootstrapError>((guest.node, session))
                });
            }
            let mut sessions = BTreeMap::new();
            while let Some(joined) = set.join_next().await {
                let (node, session) = joined.expect("ssh tasks do not panic")?;
                sessions.insert(node, session);
            }
            Ok::<_, BootstrapError>(sessions)
        });
        let sessions = sessions.map_err(|e| LabError::Remote {
            node: "guests".into(),
            what: "waiting for SSH".into(),
            detail: e.to_string(),
        })?;
        Ok(Self {
            rt,
            sessions,
            first_ejabberd: topology
                .nodes_with_role(Role::Ejabberd)
                .next()
                .map(|n| n.name.clone()),
            haclt,
        })
    }

    fn session(&self, node: &str) -> Result<&SshSession, LabError> {
        self.sessions.get(node).ok_or_else(|| LabError::Remote {
            node: node.to_owned(),
            what: "reaching the node".into(),
            detail: "no SSH session (not a guest of this stand)".into(),
        })
    }

    /// Runs `command` on `node` as root; fails unless it exits 0.
    pub fn run(&self, node: &str, command: &str) -> Result<ExecOutput, LabError> {
        let session = self.session(node)?;
        self.rt
            .block_on(session.run(command))
            .map_err(|e| remote(node, "running a command")(e.to_string()))
    }

    /// Installs the packages of every node's role from `debs` (see the module docs), all
    /// guests at once. Returns the packages installed per node (empty: all were current).
    pub fn install_packages(
        &self,
        topology: &Topology,
        debs: &Path,
    ) -> Result<BTreeMap<String, Vec<String>>, LabError> {
        let mut plans = Vec::new();
        for node in &topology.nodes {
            let mut files = Vec::new();
            for package in packages(node.role) {
                let path = find_deb(debs, package)?;
                let data = std::fs::read(&path).map_err(|source| LabError::Io {
                    what: format!("reading {}", path.display()),
                    source,
                })?;
                let name = path
                    .file_name()
                    .expect("found by its file name")
                    .to_string_lossy()
                    .into_owned();
                files.push((name, hex(&Sha256::digest(&data)), data));
            }
            if !files.is_empty() {
                plans.push((node.name.clone(), files));
            }
        }
        self.rt.block_on(async {
            let mut installed = BTreeMap::new();
            let jobs = plans.iter().map(|(node, files)| async move {
                let session = self.session(node)?;
                let result = install_on(session, files).await;
                result
                    .map(|names| (node.clone(), names))
                    .map_err(remote(node, "installing the packages"))
            });
            for done in futures::future::join_all(jobs).await {
                let (node, names) = done?;
                installed.insert(node, names);
            }
            Ok(installed)
        })
    }

    /// Pushes the operator's extra files (`up --files`, see
    /// [`bootstrap::push_and_start`]) to every guest. Returns the units started per node.
    pub fn push_files(
        &self,
        guests: &Guests,
        files: &Path,
    ) -> Result<BTreeMap<String, Vec<String>>, LabError> {
        let mut started = BTreeMap::new();
        for guest in guests.guests.values() {
            let session = self.session(&guest.node)?;
            let units = self
                .rt
                .block_on(bootstrap::push_and_start(session, guest, files))
                .map_err(|e| remote(&guest.node, "pushing files")(e.to_string()))?;
            started.insert(guest.node.clone(), units);
        }
        Ok(started)
    }

    /// Closes every session.
    pub fn close(self) {
        let Self { rt, sessions, .. } = self;
        rt.block_on(async {
            for (_, s) in sessions {
                let _ = s.close().await;
            }
        });
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Uploads the packages whose copy on the guest differs and installs them together.
async fn install_on(
    session: &SshSession,
    files: &[(String, String, Vec<u8>)],
) -> Result<Vec<String>, String> {
    let mut changed = Vec::new();
    for (name, sum, data) in files {
        let path = format!("{DEBS_DIR}/{name}");
        let have = session
            .exec(&format!("sha256sum {} 2>/dev/null", shell_quote(&path)))
            .await
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&have.stdout)
            .split_whitespace()
            .next()
            == Some(sum.as_str())
        {
            continue;
        }
        session
            .upload(&path, data, 0o644)
            .await
            .map_err(|e| e.to_string())?;
        changed.push(path);
    }
    if changed.is_empty() {
        return Ok(changed);
    }
    let list: Vec<String> = changed.iter().map(|p| shell_quote(p)).collect();
    let out = session
        .exec(&format!(
            "DEBIAN_FRONTEND=noninteractive dpkg -i {} 2>&1",
            list.join(" ")
        ))
        .await
        .map_err(|e| e.to_string())?;
    if out.status != 0 {
        return Err(format!(
            "dpkg -i exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    info!(addr = %session.addr(), packages = ?changed, "packages installed");
    Ok(changed)
}

impl Fleet for GuestFleet {
    fn place(
        &mut self,
        material: &Material<'_>,
        node: &str,
        files: &[Placed],
    ) -> Result<(), LabError> {
        let session = self.session(node)?;
        let fail = |what: &str| remote(node, what.to_owned());
        self.rt.block_on(async {
            // Directories first, in list order (parents before children).
            let dirs: Vec<String> = files
                .iter()
                .filter(|f| f.dir)
                .map(|f| {
                    format!(
                        "install -d -o {} -g {} -m {:o} {}",
                        f.owner,
                        f.group,
                        f.mode,
                        shell_quote(&f.path.display().to_string())
                    )
                })
                .collect();
            if !dirs.is_empty() {
                session
                    .run(&dirs.join(" && "))
                    .await
                    .map_err(|e| fail("creating directories")(e.to_string()))?;
            }
            for f in files.iter().filter(|f| !f.dir) {
                let path = f.path.display().to_string();
                if f.once {
                    let there = session
                        .exec(&format!("test -e {}", shell_quote(&path)))
                        .await
                        .map_err(|e| fail("checking a file")(e.to_string()))?;
                    if there.status == 0 {
                        continue;
                    }
                }
                let local = material.local(node, &f.path);
                let data = std::fs::read(&local).map_err(|source| LabError::Io {
                    what: format!("reading {}", local.display()),
                    source,
                })?;
                session
                    .upload_owned(
                        &path,
                        &data,
                        f.mode,
                        Some(&format!("{}:{}", f.owner, f.group)),
                    )
                    .await
                    .map_err(|e| fail("placing a file")(e.to_string()))?;
            }
            Ok(())
        })
    }

    fn start(&mut self, material: &Material<'_>, node: &Node) -> Result<(), LabError> {
        let script = match node.role {
            Role::Monitor | Role::Postgres => format!(
                "systemctl start --no-block {}",
                Material::unit(node.role).expect("monitors and agents have a unit")
            ),
            Role::Ejabberd => self.ejabberd_start(material, node),
            Role::Gateway => return Ok(()),
        };
        info!(node = %node.name, "starting its daemons");
        self.run(&node.name, &script).map(|_| ())
    }

    fn as_postgres(&mut self, node: &str, argv: &[String], stdin: &[u8]) -> Result<(), LabError> {
        let session = self.session(node)?;
        let line: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
        let command = format!("runuser -u postgres -- {}", line.join(" "));
        let out = self
            .rt
            .block_on(session.exec_with_stdin(&command, stdin))
            .map_err(|e| remote(node, argv[0].clone())(e.to_string()))?;
        if out.status == 0 {
            Ok(())
        } else {
            Err(remote(node, argv[0].clone())(format!(
                "exit {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    fn haclt(&self) -> &Haclt {
        &self.haclt
    }
}

impl GuestFleet {
    /// The shell script that starts an ejabberd node (see the module docs).
    fn ejabberd_start(&self, material: &Material<'_>, node: &Node) -> String {
        let home = material.ejabberd_home(&node.name).display().to_string();
        let mut script = format!(
            "set -e\n\
             ctl() {{ runuser -u ejabberd -- env HOME={home} {EJABBERDCTL} \"$@\"; }}\n\
             if ! ctl status >/dev/null 2>&1; then systemctl restart ejabberd.service; fi\n\
             up=0\n\
             for i in $(seq {secs}); do if ctl status >/dev/null 2>&1; then up=1; break; fi; sleep 1; done\n\
             [ $up = 1 ] || {{ echo 'ejabberd did not answer within {secs} s' >&2; exit 1; }}\n",
            home = shell_quote(&home),
            secs = EJABBERD_START.as_secs(),
        );
        if let Some(first) = self.first_ejabberd.as_deref().filter(|f| *f != node.name) {
            let erl = Material::erlang_node(first);
            script.push_str(&format!(
                "joined=0\n\
                 for i in $(seq 30); do\n\
                 if ctl list_cluster | grep -q {erl}; then joined=1; break; fi\n\
                 ctl join_cluster {erl} >&2 || sleep 5\n\
                 done\n\
                 [ $joined = 1 ] || {{ echo 'could not join the Erlang cluster of {erl}' >&2; exit 1; }}\n",
                erl = shell_quote(&erl),
            ));
        }
        script.push_str(&format!(
            "systemctl start --no-block {}\n",
            Material::unit(Role::Ejabberd).expect("ejabberd agents have a unit")
        ));
        script
    }
}

/// One systemd unit of a guest as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// The unit.
    pub unit: String,
    /// `ActiveState/SubState` (`active/running`, `activating/auto-restart`, ...).
    pub state: String,
    /// Its main PID while it has one.
    pub pid: Option<i32>,
    /// How often systemd restarted it since it was started.
    pub restarts: u32,
    /// Its main process is stopped (SIGSTOP): it serves nothing.
    pub stopped: bool,
}

impl UnitState {
    /// The state in `status`'s terms.
    pub fn daemon_state(&self) -> DaemonState {
        match self.state.as_str() {
            "active/running" if self.stopped => DaemonState::Frozen,
            "active/running" => DaemonState::Running,
            s if s.starts_with("activating") => DaemonState::Restarting,
            _ => DaemonState::Down,
        }
    }
}

/// The units of a guest of `role` (Debian's `ejabberd.service` first on ejabberd nodes), as
/// systemd on the guest reports them now.
pub fn units_status(
    rt: &tokio::runtime::Runtime,
    session: &SshSession,
    role: Role,
) -> Result<Vec<UnitState>, String> {
    let mut units: Vec<&str> = Material::unit(role).into_iter().collect();
    if role == Role::Ejabberd {
        units.insert(0, "ejabberd.service");
    }
    let mut out = Vec::new();
    for unit in units {
        // The main process's state letter from /proc (after the `(comm)` field).
        let shown = rt
            .block_on(session.run(&format!(
                "systemctl show -p ActiveState,SubState,MainPID,NRestarts {unit}; \
                 pid=$(systemctl show -p MainPID --value {unit}); \
                 [ \"$pid\" -gt 0 ] && sed 's/.*) \\(.\\).*/Proc=\\1/' /proc/$pid/stat || true"
            )))
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&shown.stdout).into_owned();
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_owned()
        };
        out.push(UnitState {
            unit: unit.to_owned(),
            state: format!("{}/{}", field("ActiveState"), field("SubState")),
            pid: field("MainPID").parse::<i32>().ok().filter(|p| *p > 0),
            restarts: field("NRestarts").parse().unwrap_or(0),
            stopped: matches!(field("Proc").as_str(), "T" | "t"),
        });
    }
    Ok(out)
}

/// A guest reached again for `exec` or `status`.
pub fn connect_one(
    rt: &tokio::runtime::Runtime,
    guests: &Guests,
    node: &str,
    timeout: Duration,
) -> Result<SshSession, LabError> {
    let guest: &Guest = guests.guests.get(node).ok_or_else(|| LabError::Remote {
        node: node.to_owned(),
        what: "reaching the node".into(),
        detail: "no such node in the stand".into(),
    })?;
    rt.block_on(bootstrap::wait_for_ssh(
        guest,
        guests.client_key.clone(),
        Instant::now() + timeout,
    ))
    .map_err(|e| remote(node, "connecting over SSH")(e.to_string()))
}
