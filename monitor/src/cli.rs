//! The command line of `ha-monitor` (here so that man pages and completions are generated from it).

use std::path::PathBuf;

use clap::Parser;

/// One member of the Raft group that decides failovers for PostgreSQL and ejabberd nodes.
#[derive(Debug, Parser)]
#[command(name = "ha-monitor", version)]
pub struct Args {
    /// The monitor's TOML configuration file.
    #[arg(long, env = "HA_MONITOR_CONFIG")]
    pub config: PathBuf,
    /// Allow plaintext gRPC or fewer than three monitors (the file must also say `dev = true`).
    #[arg(long)]
    pub dev: bool,
    #[command(flatten)]
    pub log: ha_log::LogArgs,
}
