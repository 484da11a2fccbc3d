//! Helpers shared by the worker's integration tests: start the worker's real startup
//! (`worker::app::run`) in-process against a per-test database and broker names.

#![allow(dead_code)]

use std::sync::Arc;

use shared::config::Config;
use shared::provider::{Provider, Registry};
use tokio_util::sync::CancellationToken;

/// A running worker; dropping it does not stop it, `stop` does (and waits for the drain).
pub struct App {
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl App {
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await?
    }
}

/// Starts the worker with these provider clients.
pub fn spawn_app(config: &Config, clients: Vec<Arc<dyn Provider>>) -> App {
    let mut registry = Registry::default();
    for c in clients {
        registry.insert(c);
    }
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker::app::run(config.clone(), registry, shutdown.clone()));
    App { shutdown, handle }
}
