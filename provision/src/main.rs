//! `ha-provision` binary: parses arguments, starts tracing and runs [`ha_provision::cli`].
//! An invalid topology file exits with status 64 before anything is created.

use std::process::ExitCode;

use ha_provision::cli::{Cli, EXIT_INVALID_TOPOLOGY, InvalidTopology, run};

fn main() -> ExitCode {
    let cli: Cli = ha_log::parse_args();
    ha_log::init(&cli.log, "RUST_LOG", "info");
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
