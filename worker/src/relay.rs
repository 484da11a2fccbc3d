//! The outbox relay: publishes outcome events with publisher confirms, at least once.
//!
//! Events are locked in Postgres (`FOR UPDATE SKIP LOCKED`, so several workers share the work),
//! published, and deleted only after the broker confirmed them, in the same transaction. A
//! crash or broker outage between publish and delete republishes them later, as stored, so a
//! copy carries the same `event_id`, which consumers dedupe on (docs/events.md). On shutdown
//! the relay drains what is left before stopping.

use std::sync::Arc;
use std::time::Duration;

use shared::broker;
use shared::store::outbox;
use tokio_util::sync::CancellationToken;

use crate::app::Ctx;

const BATCH: i64 = 200;

/// After a partial batch, how long events may gather before the next one. Without it, at any
/// load short of the maximum the relay turns every few events into a transaction and a round of
/// confirms of its own; events are not on the refund's path (its state is final at the
/// outcome's commit), so a few milliseconds more for them buy that work back.
const LINGER: Duration = Duration::from_millis(20);

/// Relays until `stop` is cancelled (then one last drain).
pub async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    let mut backoff = crate::consumer::reconnect_backoff();
    loop {
        match relay(&ctx, &stop).await {
            Ok(()) => return,
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "outbox relay failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn relay(ctx: &Arc<Ctx>, stop: &CancellationToken) -> anyhow::Result<()> {
    let conn = broker::connect(&ctx.config.amqp_url, &format!("{}:relay", ctx.actor)).await?;
    let channel = broker::confirm_channel(&conn).await?;
    broker::declare_topology(&channel, &ctx.config.amqp).await?;
    let poll = Duration::from_millis(ctx.config.worker.outbox_poll_ms);
    loop {
        let published = publish_batch(ctx, &channel).await?;
        if published as i64 >= BATCH {
            continue;
        }
        if published > 0 {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(LINGER) => {}
            }
            continue;
        }
        if stop.is_cancelled() {
            let _ = conn.close(200, "shutdown".into()).await;
            return Ok(());
        }
        let lag = outbox::lag_ms(&ctx.pool).await?;
        metrics::gauge!(crate::metrics::OUTBOX_LAG).set(lag as f64 / 1000.0);
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Publishes one batch; the number of events published.
async fn publish_batch(ctx: &Arc<Ctx>, channel: &lapin::Channel) -> anyhow::Result<usize> {
    let mut tx = ctx.pool.begin().await?;
    let pending = outbox::lock_oldest(&mut tx, BATCH).await?;
    if pending.is_empty() {
        return Ok(0);
    }
    if let Some(oldest) = pending.first() {
        metrics::gauge!(crate::metrics::OUTBOX_LAG).set(oldest.age_ms as f64 / 1000.0);
    }
    // Publish the whole batch, then wait for every confirm: one round of confirms per batch.
    let mut confirms = Vec::with_capacity(pending.len());
    for p in &pending {
        confirms.push(
            channel
                .basic_publish(
                    ctx.config.amqp.events_exchange.as_str().into(),
                    p.routing_key.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    &p.payload,
                    broker::json_properties(Some(&format!("event-{}", p.id))),
                )
                .await?,
        );
    }
    for c in confirms {
        if c.await?.is_nack() {
            anyhow::bail!("broker nacked an event; the batch stays in the outbox");
        }
    }
    shared::failpoint::hit("events_confirmed");
    let ids: Vec<i64> = pending.iter().map(|p| p.id).collect();
    outbox::delete(&mut tx, &ids).await?;
    tx.commit().await?;
    metrics::counter!(crate::metrics::OUTBOX_PUBLISHED).increment(ids.len() as u64);
    Ok(ids.len())
}
