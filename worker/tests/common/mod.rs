//! Helpers shared by the worker's integration tests: start the worker's real startup
//! (`worker::app::run`) in-process against a per-test database and broker names.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use shared::config::Config;
use shared::job::ProviderKind;
use shared::provider::{Provider, Registry};
use shared::state::State;
use shared::store::ops;
use sqlx::PgPool;
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

/// Publishes one valid request: order `O{refund_no}`, total 1000, refund 400.
pub async fn publish(config: &Config, refund_no: &str, merchant: &str, kind: ProviderKind) {
    let v = testkit::request_json(
        refund_no,
        &format!("O{refund_no}"),
        kind,
        merchant,
        1000,
        400,
    );
    testkit::publish_requests(config, &[serde_json::to_vec(&v).unwrap()])
        .await
        .unwrap();
}

/// Waits (30 s at most) until the job is in `state`.
pub async fn wait_state(pool: &PgPool, refund_no: &str, state: State) -> anyhow::Result<()> {
    testkit::wait_until(
        Duration::from_secs(30),
        &format!("{refund_no} {state}"),
        || {
            let pool = pool.clone();
            let no = refund_no.to_owned();
            async move { Ok(ops::job_state(&pool, &no).await?.map(|s| s.0) == Some(state)) }
        },
    )
    .await
}

/// What the order's cumulative cap holds for its refunds.
pub async fn committed_fee(pool: &PgPool, order_no: &str) -> i64 {
    sqlx::query_scalar("SELECT committed_fee FROM orders WHERE order_no = $1")
        .bind(order_no)
        .fetch_one(pool)
        .await
        .unwrap()
}
