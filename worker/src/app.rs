//! Startup and shutdown: builds the shared context, starts every task, and drains on SIGTERM.
//!
//! [`run`] is what the binary calls; tests call it too (through `spawn`-style helpers) with
//! their own config and, where they need one, a fake [`Registry`], so the code under test is
//! the binary's own startup.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use shared::config::Config;
use shared::provider::Registry;
use shared::provider::codes::CodeTable;
use shared::provider::shengpay::ShengpayClient;
use shared::provider::wupay::WupayClient;
use shared::workflow::RetryPolicy;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything the worker's tasks share.
pub struct Ctx {
    pub pool: PgPool,
    pub config: Config,
    pub registry: Registry,
    pub tz: chrono_tz::Tz,
    pub policy: RetryPolicy,
    /// This process's name in history rows and logs.
    pub actor: String,
    /// Free executor slots: a job runs only with a permit, which bounds in-flight calls and
    /// pushes back on the consumer.
    pub slots: Arc<Semaphore>,
    pub jobs: TaskTracker,
    /// Claims and outcomes go through here, batched across jobs.
    pub writer: crate::writer::Writer,
    /// Every provider call waits for its merchant's turn here (rate limits, pauses).
    pub flow: Arc<crate::flow::Flow>,
    pub broker_up: AtomicBool,
    pub intake_up: AtomicBool,
    pub shutdown: CancellationToken,
}

impl Ctx {
    pub fn broker_up(&self) -> bool {
        self.broker_up.load(Ordering::Relaxed)
    }

    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::BROKER_CONNECTED).set(if up { 1.0 } else { 0.0 });
    }

    /// Whether intake may take a request in, and what it records of its merchant.
    pub fn admit(
        &self,
        request: &shared::job::RefundRequest,
    ) -> Result<shared::provider::Admission, shared::job::Rejection> {
        self.registry.admit(request)
    }

    pub fn set_intake_up(&self, up: bool) {
        self.intake_up.store(up, Ordering::Relaxed);
    }

    /// Whether intake is writing (false while its transactions fail and are retried).
    pub fn intake_up(&self) -> bool {
        self.intake_up.load(Ordering::Relaxed)
    }
}

/// Builds one client per configured merchant; any merchant whose client cannot be built
/// (unreadable key, bad key) stops the start with an error naming its config key.
pub fn build_registry(config: &Config) -> anyhow::Result<Registry> {
    let http =
        shared::provider::http::build_client(&config.http).context("building the HTTP client")?;
    let mut registry = Registry::default();
    let codes = CodeTable::shengpay_default().with_overrides(&config.shengpay.codes);
    for (i, m) in config.shengpay.merchants.iter().enumerate() {
        let client = ShengpayClient::new(
            m,
            &format!("shengpay.merchants[{i}]"),
            http.clone(),
            &config.http,
            codes.clone(),
        )?;
        registry.insert(Arc::new(client));
    }
    for (i, m) in config.wupay.merchants.iter().enumerate() {
        let client = WupayClient::new(
            m,
            &format!("wupay.merchants[{i}]"),
            http.clone(),
            &config.http,
        )?;
        registry.insert(Arc::new(client));
    }
    Ok(registry)
}

/// Runs the worker until `shutdown` is cancelled, then drains and returns.
pub async fn run(
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tz = config.tz()?;
    if registry.is_empty() {
        anyhow::bail!(
            "no merchant is configured: add [[shengpay.merchants]] or [[wupay.merchants]] to the \
             config (see README, Configuration)"
        );
    }
    let pool = shared::store::connect(&config).await.with_context(|| {
        format!(
            "connecting to PostgreSQL at {}",
            config.database_url_redacted()
        )
    })?;
    if config.database.migrate_on_start {
        shared::store::migrate(&pool)
            .await
            .context("applying migrations")?;
    }
    let filled = shared::store::jobs::backfill_idempotent(&pool, &registry.idempotence())
        .await
        .context("recording merchant idempotence on jobs from before it was recorded")?;
    if filled > 0 {
        tracing::info!(
            jobs = filled,
            "recorded their merchant's idempotence on jobs from before it was recorded at intake"
        );
    }
    let actor = format!(
        "worker:{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
        std::process::id()
    );
    let writer = crate::writer::Writer::start(
        pool.clone(),
        config.worker.writers,
        config.worker.write_batch,
        config.worker.lease(),
        actor.clone(),
        tz,
    );
    let (attempts, min_calls) = (
        config.worker.retry.max_attempts,
        config.worker.flow.pause_min_calls,
    );
    if usize::try_from(attempts).is_ok_and(|a| a <= min_calls) {
        // Not an error: a short retry budget can be wanted (the dev config has one). But the
        // pause cannot spare a lone job's attempts: it trips only after `pause_min_calls`
        // failures, which one job alone never reaches.
        tracing::warn!(
            max_attempts = attempts,
            pause_min_calls = min_calls,
            "worker.retry.max_attempts is not above worker.flow.pause_min_calls: a job alone at a failing merchant spends its whole retry budget before the merchant pauses"
        );
    }
    let flow = crate::flow::Flow::start(
        pool.clone(),
        config.worker.flow.clone(),
        registry
            .merchants()
            .map(|(kind, merchant)| (kind, merchant.to_owned())),
        &config.limits,
        shutdown.clone(),
    );
    flow.configure()
        .await
        .context("recording the merchants' call budgets ([[limits]])")?;
    let ctx = Arc::new(Ctx {
        pool,
        writer,
        flow,
        policy: RetryPolicy::from_config(&config.worker.retry),
        slots: Arc::new(Semaphore::new(config.worker.concurrency)),
        config,
        registry,
        tz,
        actor,
        jobs: TaskTracker::new(),
        broker_up: AtomicBool::new(false),
        intake_up: AtomicBool::new(true),
        shutdown: shutdown.clone(),
    });
    let health = crate::health::serve(ctx.clone()).await?;
    let notify = crate::notify::serve(ctx.clone()).await?;
    tracing::info!(
        merchants = ctx.registry.len(),
        database = %ctx.config.database_url_redacted(),
        broker = %ctx.config.amqp_url_redacted(),
        "refund-worker started"
    );
    let tasks = TaskTracker::new();
    let stop_intake = CancellationToken::new();
    let consumer = tokio::spawn(crate::consumer::run(ctx.clone(), stop_intake.clone()));
    tasks.spawn(crate::sweeper::run(ctx.clone()));
    tasks.spawn(crate::executor::run_ready(ctx.clone()));
    tasks.spawn(crate::status_sync::run(ctx.clone()));
    let stop_relay = CancellationToken::new();
    tasks.spawn(crate::relay::run(ctx.clone(), stop_relay.clone()));

    shutdown.cancelled().await;
    tracing::info!("shutdown: stopping intake, finishing in-flight jobs");
    stop_intake.cancel();
    let grace = Duration::from_millis(ctx.config.worker.shutdown_grace_ms);
    let deadline = tokio::time::Instant::now() + grace;
    // The consumer finishes the batch it holds (commit, ack, dispatch) before it stops; only
    // then is the set of in-flight jobs complete, so wait for it first.
    if tokio::time::timeout_at(deadline, consumer).await.is_err() {
        tracing::warn!("shutdown: intake did not stop within the grace period");
    }
    ctx.jobs.close();
    if tokio::time::timeout_at(deadline, ctx.jobs.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown: in-flight jobs did not finish within {} ms; their leases will expire and \
             the sweeper will take them",
            grace.as_millis()
        );
    }
    // Let the relay publish what the last jobs wrote before it stops.
    stop_relay.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown: background tasks did not stop within 5 s");
    }
    health.abort();
    if let Some(n) = notify {
        n.abort();
    }
    ctx.pool.close().await;
    tracing::info!("refund-worker stopped");
    Ok(())
}
