//! `haclt systemd monitor|agent`: unit files for the daemons, derived from their configuration.
//!
//! The monitor runs as the `ha-monitor` system user with its Raft data in its state directory.
//! The agent runs as the user that owns what it drives (`postgres.os_user` for the PostgreSQL
//! role, `ejabberd` for the ejabberd role), may write exactly the paths its configuration names
//! (read with [`ha_agent::config::AgentConfig::load`], so the unit and the agent agree on every
//! derived path), is `Type=notify` with a watchdog it feeds from its main loop, and is stopped
//! with `KillMode=process` so that PostgreSQL, which it leaves running on purpose, survives an
//! agent restart. Every unit carries `ConditionPathExists=` on its configuration: a unit enabled
//! by a package starts nothing until the configuration exists. Each hardening exception is
//! commented in the unit text itself.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use ha_agent::config::{AgentConfig, RoleConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Unit {
    Monitor,
    Agent,
}

/// The agent role a unit is written for without reading a configuration (the packages' units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Postgres,
    Ejabberd,
}

pub const MONITOR_CONFIG: &str = "/etc/ha/monitor.toml";
pub const AGENT_CONFIG: &str = "/etc/ha/agent.toml";
/// Where the packaged ejabberd-role unit reads its configuration (`ha-agent-ejabberd.service`).
pub const AGENT_EJABBERD_CONFIG: &str = "/etc/ha/agent-ejabberd.toml";
const MONITOR_DATA: &str = "/var/lib/ha-monitor";
const AGENT_STATE: &str = "/var/lib/ha-agent";
/// The systemd watchdog period of the agent (it feeds it every half period).
pub const AGENT_WATCHDOG: &str = "10s";

/// What the agent's unit needs to know, from its configuration or the packages' defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AgentPaths {
    role: Role,
    user: String,
    state_dir: PathBuf,
    /// `(path, why)`: every directory the agent (or the PostgreSQL it starts) writes into.
    writable: Vec<(PathBuf, String)>,
    /// Directories under /run the agent needs before it writes (created by systemd).
    runtime: Option<PathBuf>,
    dev: bool,
}

impl AgentPaths {
    fn from_config(cfg: &AgentConfig) -> Self {
        let mut writable = Vec::new();
        let (role, user, runtime) = match &cfg.role {
            RoleConfig::Postgres(r) => {
                let pg = r.pg_config(cfg.tls.as_ref());
                // The agent creates the data directory and its TLS copies next to it (and wipes
                // and re-creates the data directory for a base backup): their parent must be
                // writable, not just the two directories.
                let parent = parent(&pg.data_dir);
                writable.push((
                    parent,
                    format!(
                        "data directory {} and TLS copies {}",
                        pg.data_dir.display(),
                        pg.tls_dir.display()
                    ),
                ));
                writable.push((
                    parent_of_file(&pg.log_file),
                    format!("server log {}", pg.log_file.display()),
                ));
                writable.push((
                    pg.socket_dir.clone(),
                    "PostgreSQL's socket directory".into(),
                ));
                (Role::Postgres, pg.os_user.clone(), Some(pg.socket_dir))
            }
            RoleConfig::Ejabberd(r) => {
                writable.push((
                    parent_of_file(&r.controller.config_path),
                    format!(
                        "{} (rewritten in place: a new file renamed over it)",
                        r.controller.config_path.display()
                    ),
                ));
                // Created by the agent when missing: its parent must be writable (under the
                // state directory, the unit's StateDirectory= covers it).
                if let Some(dir) = r
                    .controller
                    .sql_tls_dir
                    .as_ref()
                    .filter(|d| !d.starts_with(&cfg.state_dir))
                {
                    writable.push((
                        parent(dir),
                        format!("ejabberd's TLS copies for PostgreSQL {}", dir.display()),
                    ));
                }
                (Role::Ejabberd, "ejabberd".to_owned(), None)
            }
        };
        if let Some(tls) = &cfg.tls {
            // Written at join when the node has no certificate yet (key first, then the
            // certificate the monitor signed).
            writable.push((
                parent_of_file(&tls.key),
                format!("TLS key {} (written at join)", tls.key.display()),
            ));
            writable.push((
                parent_of_file(&tls.cert),
                format!("TLS certificate {} (written at join)", tls.cert.display()),
            ));
        }
        writable.push((cfg.state_dir.clone(), "the agent's state".into()));
        Self {
            role,
            user,
            state_dir: cfg.state_dir.clone(),
            writable,
            runtime: runtime.filter(|d| d.starts_with("/run")),
            dev: cfg.tls.is_none(),
        }
    }

    /// The paths of the example configuration in agent/README.md (the packages' units).
    fn defaults(role: Role) -> Self {
        let etc = (
            PathBuf::from("/etc/ha"),
            "TLS key and certificate (written at join)".into(),
        );
        let state = (PathBuf::from(AGENT_STATE), "the agent's state".into());
        let (user, writable, runtime) = match role {
            Role::Postgres => (
                "postgres",
                vec![
                    (
                        PathBuf::from("/var/lib/postgresql/15"),
                        "data directory /var/lib/postgresql/15/ha, TLS copies \
                         /var/lib/postgresql/15/ha.tls, server log /var/lib/postgresql/15/ha.log"
                            .into(),
                    ),
                    (
                        PathBuf::from("/run/postgresql"),
                        "PostgreSQL's socket directory".into(),
                    ),
                    etc,
                    state,
                ],
                Some(PathBuf::from("/run/postgresql")),
            ),
            Role::Ejabberd => (
                "ejabberd",
                vec![
                    (
                        PathBuf::from("/etc/ejabberd"),
                        "/etc/ejabberd/ejabberd.yml (rewritten in place: a new file renamed \
                         over it)"
                            .into(),
                    ),
                    etc,
                    state,
                ],
                None,
            ),
        };
        Self {
            role,
            user: user.to_owned(),
            state_dir: PathBuf::from(AGENT_STATE),
            writable,
            runtime,
            dev: false,
        }
    }
}

fn parent(dir: &Path) -> PathBuf {
    dir.parent().unwrap_or(dir).to_path_buf()
}

fn parent_of_file(file: &Path) -> PathBuf {
    parent(file)
}

/// `Some(name)` when `dir` is `base/name` (systemd then creates and owns it: `StateDirectory=`).
fn under(dir: &Path, base: &str) -> Option<String> {
    let rest = dir.strip_prefix(base).ok()?;
    let name = rest.to_str()?;
    (!name.is_empty() && !name.contains("..")).then(|| name.to_owned())
}

/// What `haclt systemd` prints: the unit for `unit` with the daemon's configuration at `config`
/// (default `/etc/ha/monitor.toml` or `/etc/ha/agent.toml`) and its binary in `bin_dir`.
/// For the agent, `role` writes the unit for the default paths of that role without reading
/// any file; otherwise the agent's configuration is read and must be valid.
pub fn render(
    unit: Unit,
    config: Option<&Path>,
    bin_dir: &Path,
    role: Option<Role>,
) -> Result<String, String> {
    match unit {
        Unit::Monitor => {
            let config = config.unwrap_or(Path::new(MONITOR_CONFIG));
            Ok(monitor_unit(config, &monitor_data_dir(config)?, bin_dir))
        }
        Unit::Agent => {
            let paths = match role {
                Some(r) => AgentPaths::defaults(r),
                None => {
                    let path = config.unwrap_or(Path::new(AGENT_CONFIG));
                    let cfg = AgentConfig::load(path, true).map_err(|e| {
                        format!(
                            "the agent unit is derived from the agent's configuration: {e} \
                             (or pass --role postgres|ejabberd for the default paths)"
                        )
                    })?;
                    AgentPaths::from_config(&cfg)
                }
            };
            let default_config = match paths.role {
                Role::Postgres => AGENT_CONFIG,
                Role::Ejabberd if role.is_some() => AGENT_EJABBERD_CONFIG,
                Role::Ejabberd => AGENT_CONFIG,
            };
            let config = config.unwrap_or(Path::new(default_config));
            Ok(agent_unit(config, &paths, bin_dir))
        }
    }
}

/// The monitor's `data_dir` from its file when the file exists (only that key is read: the
/// monitor validates the rest when it starts), else the default.
fn monitor_data_dir(config: &Path) -> Result<PathBuf, String> {
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(MONITOR_DATA.into()),
        Err(e) => return Err(format!("cannot read {}: {e}", config.display())),
    };
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
    match table.get("data_dir") {
        Some(toml::Value::String(d)) if Path::new(d).is_absolute() => Ok(d.into()),
        _ => Err(format!(
            "{}: data_dir must be an absolute path",
            config.display()
        )),
    }
}

/// Lines every unit shares: everything that the daemons never need.
const HARDENING: &str = "\
NoNewPrivileges=yes
# Not root, and no capability is needed (the agent signals only processes of its own user).
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Other users' processes are hidden; the daemon's own (the agent's PostgreSQL) stay visible.
# ProcSubset=pid is not set: the agent reads /proc/sys/kernel/random/boot_id (its lease record).
ProtectProc=invisible
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
# AF_NETLINK is not needed (no interface enumeration; name lookups work without it).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
UMask=0077
";

fn monitor_unit(config: &Path, data_dir: &Path, bin_dir: &Path) -> String {
    let state = match under(data_dir, "/var/lib") {
        Some(name) => format!("StateDirectory={name}\nStateDirectoryMode=0700\n"),
        None => format!("ReadWritePaths={}\n", data_dir.display()),
    };
    format!(
        "# Generated by `haclt systemd monitor`.
[Unit]
Description=HA monitor (Raft member deciding PostgreSQL and ejabberd failovers)
Documentation=man:ha-monitor(1)
After=network-online.target
Wants=network-online.target
# Installed but idle until the configuration exists.
ConditionPathExists={config}
# Keep restarting however often it fails (a monitor must come back); a bad configuration
# (exit 64) is not retried.
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart={bin} --config {config}
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=1
RestartPreventExitStatus=64
TimeoutStopSec=30
User=ha-monitor
Group=ha-monitor
# The Raft log and snapshots ({data_dir}); the configuration and keys in /etc/ha are read only.
{state}{HARDENING}MemoryDenyWriteExecute=yes

[Install]
WantedBy=multi-user.target
",
        bin = bin_dir.join("ha-monitor").display(),
        config = config.display(),
        data_dir = data_dir.display(),
    )
}

fn agent_unit(config: &Path, paths: &AgentPaths, bin_dir: &Path) -> String {
    let (what, mdwe) = match paths.role {
        Role::Postgres => (
            "drives the local PostgreSQL",
            // The agent starts PostgreSQL, which inherits this sandbox: its JIT (LLVM) maps
            // pages writable then executable.
            "# MemoryDenyWriteExecute= is off: PostgreSQL, started by the agent, runs in this\n\
             # sandbox and its JIT compiler makes memory executable.\n",
        ),
        Role::Ejabberd => (
            "points the local ejabberd at the primary",
            // erl_call is a small C program; the BEAM itself runs under ejabberd's own unit.
            "# The agent runs only erl_call (C), never the BEAM: no executable memory.\n\
             MemoryDenyWriteExecute=yes\n",
        ),
    };
    let mut state = String::new();
    if let Some(name) = under(&paths.state_dir, "/var/lib") {
        state.push_str(&format!("StateDirectory={name}\nStateDirectoryMode=0700\n"));
    }
    if let Some(run) = paths.runtime.as_deref().and_then(|r| under(r, "/run")) {
        state.push_str(&format!(
            "# Created for {user} if missing, and kept when the agent stops (PostgreSQL keeps its socket).\n\
             RuntimeDirectory={run}\nRuntimeDirectoryMode=2775\nRuntimeDirectoryPreserve=yes\n",
            user = paths.user
        ));
    }
    let mut listed: Vec<&Path> = Vec::new();
    for (path, why) in &paths.writable {
        if listed.iter().any(|l| path.starts_with(l)) {
            continue;
        }
        listed.push(path);
        // `-`: a missing directory does not stop the unit; the agent then reports why it
        // cannot write there.
        state.push_str(&format!("# {why}\nReadWritePaths=-{}\n", path.display()));
    }
    let dev = if paths.dev { " --dev" } else { "" };
    format!(
        "# Generated by `haclt systemd agent`.
[Unit]
Description=HA agent (reports to the monitors and {what})
Documentation=man:ha-agent(1)
After=network-online.target
Wants=network-online.target
# Installed but idle until the configuration exists.
ConditionPathExists={config}
# Keep restarting however often it fails; a bad configuration (exit 64) is not retried.
StartLimitIntervalSec=0

[Service]
# READY=1 once joined and the server observed; WATCHDOG=1 from the main loop (every {half}).
Type=notify
NotifyAccess=main
WatchdogSec={AGENT_WATCHDOG}
# Joining waits for a monitor leader, and the first observation may follow a base backup:
# no bound on the start. The watchdog runs from READY=1 on.
TimeoutStartSec=infinity
ExecStart={bin} --config {config}{dev}
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=1
RestartPreventExitStatus=64
TimeoutStopSec=30
# Only the agent is stopped: the PostgreSQL it started keeps running and serving, and the next
# agent adopts it (stop_postgres_on_shutdown = true in the configuration stops it instead).
KillMode=process
# The user that owns what the agent drives; the agent never needs root.
User={user}
{state}{HARDENING}{mdwe}
[Install]
WantedBy=multi-user.target
",
        half = "5s",
        bin = bin_dir.join("ha-agent").display(),
        config = config.display(),
        user = paths.user,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_restart_and_are_hardened() {
        for (unit, role) in [
            (Unit::Monitor, None),
            (Unit::Agent, Some(Role::Postgres)),
            (Unit::Agent, Some(Role::Ejabberd)),
        ] {
            let text = render(
                unit,
                Some(Path::new("/etc/x.toml")),
                Path::new("/opt/bin"),
                role,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            for needed in [
                "Restart=always",
                "--config /etc/x.toml",
                "ConditionPathExists=/etc/x.toml",
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "CapabilityBoundingSet=\n",
                "SystemCallFilter=@system-service",
                "User=",
            ] {
                assert!(
                    text.contains(needed),
                    "{unit:?} unit lacks {needed}:\n{text}"
                );
            }
        }
    }

    #[test]
    fn the_agent_outlives_nothing_it_started_and_notifies() {
        let pg = render(
            Unit::Agent,
            None,
            Path::new("/usr/bin"),
            Some(Role::Postgres),
        )
        .unwrap();
        for needed in [
            "ExecStart=/usr/bin/ha-agent --config /etc/ha/agent.toml\n",
            "KillMode=process",
            "Type=notify",
            "WatchdogSec=10s",
            "User=postgres",
            "ReadWritePaths=-/var/lib/postgresql/15\n",
            "ReadWritePaths=-/run/postgresql\n",
            "ReadWritePaths=-/etc/ha\n",
            "StateDirectory=ha-agent\n",
        ] {
            assert!(pg.contains(needed), "lacks {needed}:\n{pg}");
        }
        assert!(!pg.contains("MemoryDenyWriteExecute=yes"), "{pg}");
        let ej = render(
            Unit::Agent,
            None,
            Path::new("/usr/bin"),
            Some(Role::Ejabberd),
        )
        .unwrap();
        for needed in [
            "--config /etc/ha/agent-ejabberd.toml",
            "User=ejabberd",
            "ReadWritePaths=-/etc/ejabberd\n",
            "MemoryDenyWriteExecute=yes",
        ] {
            assert!(ej.contains(needed), "lacks {needed}:\n{ej}");
        }
    }

    #[test]
    fn the_monitor_runs_as_its_user_with_its_data_dir() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let default = render(
            Unit::Monitor,
            Some(&dir.path().join("none.toml")),
            Path::new("/usr/bin"),
            None,
        )
        .unwrap();
        assert!(default.contains("User=ha-monitor\n"), "{default}");
        assert!(default.contains("StateDirectory=ha-monitor\n"), "{default}");
        let cfg = dir.path().join("monitor.toml");
        std::fs::write(&cfg, "id = 1\ndata_dir = \"/srv/raft\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let moved = render(Unit::Monitor, Some(&cfg), Path::new("/usr/bin"), None).unwrap();
        assert!(moved.contains("ReadWritePaths=/srv/raft\n"), "{moved}");
        assert!(!moved.contains("StateDirectory="), "{moved}");
    }
}
