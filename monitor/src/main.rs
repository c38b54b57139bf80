//! `ha-monitor --config PATH [--dev]`: parses arguments, validates the configuration (exit 64
//! on a bad one, before any port is bound), starts logging, and runs the monitor until SIGTERM
//! or SIGINT (SIGHUP reloads the TLS certificates).

use std::process::ExitCode;

use ha_log::EX_USAGE;
use ha_monitor::cli::Args;
use ha_monitor::config::MonitorConfig;
use tokio_util::sync::CancellationToken;

const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    let args: Args = ha_log::parse_args();
    let config = match MonitorConfig::load(&args.config, args.dev) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ha-monitor: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    ha_monitor::logging::init(&args.log);
    #[cfg(feature = "deliberately-broken")]
    match ha_monitor::broken::init() {
        Ok(breaks) => tracing::warn!(
            ?breaks,
            "DELIBERATELY BROKEN BUILD (feature deliberately-broken): safety bugs from HA_MONITOR_BREAK are active; for the chaos test only"
        ),
        Err(e) => {
            eprintln!("ha-monitor: {e}");
            return ExitCode::from(EX_USAGE);
        }
    }
    // Before anything touches rustls (the TLS server, peer clients).
    ha_pki::install_crypto();
    if config.dev {
        tracing::warn!(
            "DEV MODE: insecure settings are active (plaintext gRPC or fewer than three monitors); never use this in production"
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ha-monitor: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ha-monitor: cannot listen on {}: {e}", config.listen);
                return ExitCode::from(EX_SOFTWARE);
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(ha_monitor::logging::cancel_on_signal(shutdown.clone()));
        match ha_monitor::server::run(config, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ha-monitor: {e}");
                ExitCode::from(EX_SOFTWARE)
            }
        }
    })
}
