//! Process plumbing of the monitor's `main`: logs (see `ha_log`: `RUST_LOG` filters, default
//! `info` with raft's own chatter at `warn`) and graceful shutdown on SIGTERM or SIGINT.

use tokio_util::sync::CancellationToken;

/// Installs the global `tracing` subscriber; a second call is a no-op.
pub fn init(args: &ha_log::LogArgs) {
    ha_log::init(args, "RUST_LOG", "info,raft=warn");
}

/// Cancels `token` on the first SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}
