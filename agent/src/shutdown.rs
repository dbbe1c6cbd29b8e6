//! Signals: the first SIGTERM or SIGINT cancels the root token (graceful stop, kernel state kept);
//! a second SIGINT exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Watches for signals until aborted.
#[must_use]
pub fn on_signals(cancel: CancellationToken) -> JoinHandle<()> {
    // The signal watcher lives as long as the process; it is the one task outside the tracker
    // because it must outlive the tracker's shutdown to see a second SIGINT.
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            warn!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down (again to exit at once)"),
        }
        cancel.cancel();
        if int.recv().await.is_some() {
            warn!("second SIGINT: exiting now");
            std::process::exit(130);
        }
    })
}
