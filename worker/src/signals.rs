//! SIGTERM and Ctrl-C for the long-running binaries (`refund-worker`, `refund-console`): a
//! clean stop, registered before anything else starts.

use anyhow::Context;

/// SIGTERM and Ctrl-C, registered when made.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    /// Waits for either.
    pub async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.interrupt.recv() => tracing::info!("interrupt received"),
        }
    }
}
