//! `haclt`: parses arguments and runs one command; the exit code says why it failed.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = haclt::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HACLT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
