//! The command line of `ha-agent` (here so that man pages and completions are generated from it).

use std::path::PathBuf;

use clap::Parser;

/// The agent of one PostgreSQL or ejabberd node: reports to the monitors and follows their goals.
#[derive(Debug, Parser)]
#[command(name = "ha-agent", version)]
pub struct Args {
    /// The agent's TOML configuration file.
    #[arg(long, env = "HA_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Allow plaintext gRPC to the monitors (the file must also say `dev = true`).
    #[arg(long)]
    pub dev: bool,
    #[command(flatten)]
    pub log: ha_log::LogArgs,
}
