//! `haclt`: parses arguments and runs one command; the exit code says why it failed.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: haclt::cli::Cli = ha_log::parse_args();
    ha_log::init(&cli.log, "HACLT_LOG", "warn");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("haclt: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(haclt::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("haclt: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
