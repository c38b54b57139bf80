//! `haclt systemd monitor|agent`: unit files for the daemons. `Restart=always` because a
//! monitor or agent that exits must come back; hardening keeps each daemon to the files it owns.

use std::path::{Path, PathBuf};

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Unit {
    Monitor,
    Agent,
}

pub fn render(unit: Unit, config: Option<&Path>, bin_dir: &Path) -> String {
    let (name, description, default_config, state_dir, extra) = match unit {
        Unit::Monitor => (
            "ha-monitor",
            "HA monitor (Raft member deciding PostgreSQL and ejabberd failovers)",
            "/etc/ha/monitor.toml",
            "ha-monitor",
            "",
        ),
        Unit::Agent => (
            "ha-agent",
            "HA agent (drives the local PostgreSQL or ejabberd toward the monitors' goal)",
            "/etc/ha/agent.toml",
            "ha-agent",
            // The agent starts PostgreSQL as its own child and must be able to stop it cleanly
            // before systemd kills it: let it manage its children.
            "KillMode=mixed\n",
        ),
    };
    let config = config.map_or_else(|| PathBuf::from(default_config), Path::to_path_buf);
    format!(
        "[Unit]
Description={description}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={bin} --config {config}
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=1
TimeoutStopSec=30
{extra}StateDirectory={state_dir}
StateDirectoryMode=0700
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
ReadWritePaths=/var/lib/{state_dir}

[Install]
WantedBy=multi-user.target
",
        bin = bin_dir.join(name).display(),
        config = config.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_restart_and_are_hardened() {
        for unit in [Unit::Monitor, Unit::Agent] {
            let text = render(unit, Some(Path::new("/etc/x.toml")), Path::new("/opt/bin"));
            for needed in [
                "Restart=always",
                "--config /etc/x.toml",
                "TimeoutStopSec=30",
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
            ] {
                assert!(
                    text.contains(needed),
                    "{unit:?} unit lacks {needed}:\n{text}"
                );
            }
        }
        assert!(
            render(Unit::Agent, None, Path::new("/usr/local/bin"))
                .contains("ExecStart=/usr/local/bin/ha-agent --config /etc/ha/agent.toml")
        );
    }
}
