//! `ha-provision` binary: parses arguments, starts tracing and runs [`ha_provision::cli`].
//! An invalid topology file exits with status 64 before anything is created.

use std::process::ExitCode;

use clap::Parser as _;
use ha_provision::cli::{Cli, EXIT_INVALID_TOPOLOGY, InvalidTopology, run};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ha-provision: {e:#}");
            if e.downcast_ref::<InvalidTopology>().is_some() {
                ExitCode::from(EXIT_INVALID_TOPOLOGY)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
