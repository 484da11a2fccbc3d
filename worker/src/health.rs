//! `/metrics` (Prometheus text), `/healthz` (the process is alive) and `/readyz` (PostgreSQL
//! answers, the broker connection is up and intake is not stalled on a failing database) on
//! `worker.metrics_addr`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::app::Ctx;

/// The process-wide Prometheus recorder (installed once, even when tests start several apps).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .ok()?
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(crate::metrics::END_TO_END.into()),
                    crate::metrics::END_TO_END_BUCKETS,
                )
                .ok()?
                .install_recorder()
                .ok()
                .inspect(|_| crate::metrics::describe())
        })
        .as_ref()
}

/// Starts the endpoint; returns its task.
pub async fn serve(ctx: Arc<Ctx>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr = ctx.config.worker.metrics_addr.clone();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding worker.metrics_addr {addr}"))?;
    let _ = prometheus();
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(ctx);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health endpoint stopped");
        }
    }))
}

async fn metrics_page() -> impl IntoResponse {
    match prometheus() {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable".to_owned(),
        ),
    }
}

async fn ready(State(ctx): State<Arc<Ctx>>) -> impl IntoResponse {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&ctx.pool),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    let broker = ctx.broker_up();
    let intake = ctx.intake_up();
    let body =
        serde_json::json!({ "database": db, "broker": broker, "intake": intake }).to_string();
    let status = if db && broker && intake {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}
