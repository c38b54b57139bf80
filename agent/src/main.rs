//! `ha-agent --config PATH [--dev]`: parses arguments, validates the configuration (exit 64 on
//! a bad one, before anything starts; also on an own certificate that fails its check at start
//! with no checked copy to use instead), starts logging, and runs the agent until SIGTERM or
//! SIGINT. PostgreSQL is left running on exit (the next agent adopts it) unless configured
//! otherwise.

use std::process::ExitCode;

use ha_agent::cli::Args;
use ha_agent::config::AgentConfig;
use ha_log::EX_USAGE;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Args = ha_log::parse_args();
    let config = match AgentConfig::load(&args.config, args.dev) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ha-agent: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    ha_log::init(&args.log, "RUST_LOG", "info");
    if config.dev {
        tracing::warn!("DEV MODE: plaintext gRPC to the monitors; never use this in production");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ha-agent: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("ha-agent: cannot install signal handlers: {e}");
                return ExitCode::from(EX_SOFTWARE);
            }
        };
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            // systemd shows the unit as stopping (no effect outside systemd).
            if let Err(e) = ha_agent::notify::Notifier::from_env().send("STOPPING=1") {
                tracing::warn!(error = %e, "cannot tell systemd the agent is stopping");
            }
            on_signal.cancel();
        });
        match ha_agent::run::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            // Its own certificate failed the check at start with no checked copy to use.
            Err(e @ ha_agent::run::RunError::Certificate(_)) => {
                eprintln!("ha-agent: {e}");
                ExitCode::from(EX_USAGE)
            }
            Err(e) => {
                tracing::error!(error = %e, "agent stopped");
                eprintln!("ha-agent: {e}");
                ExitCode::from(EX_SOFTWARE)
            }
        }
    })
}
