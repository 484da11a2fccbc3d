//! Intake: consumes `refunds.requested`, turns each message into its effect, acks after commit.
//!
//! Deliveries are taken in small batches (what is already buffered, up to
//! `worker.intake_batch`) and recorded in one transaction, so the database sees one commit per
//! batch rather than one per message. Only after that commit are the messages acked, one
//! `multiple` ack per run (a rejection or conflict is nacked without requeue into the
//! dead-letter exchange). A crash before
//! the commit leaves nothing behind and the broker redelivers; a crash after it but before the
//! ack causes a redelivery that intake recognises as a duplicate. The consumer reconnects with
//! backoff when the broker goes away and reports readiness while disconnected as false.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use shared::store::intake::{self, Incoming, IntakeResult};
use tokio_util::sync::CancellationToken;

use crate::app::Ctx;

/// Consumes until `stop` is cancelled, reconnecting as needed.
pub async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    let mut backoff = reconnect_backoff();
    while !stop.is_cancelled() {
        match consume(&ctx, &stop).await {
            Ok(()) => break,
            Err(e) => {
                ctx.set_broker_up(false);
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    ctx.set_broker_up(false);
}

/// Backoff for reconnects: 100 ms doubling to 5 s, with jitter, forever.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

async fn consume(ctx: &Arc<Ctx>, stop: &CancellationToken) -> anyhow::Result<()> {
    let cfg = &ctx.config;
    let conn = shared::broker::connect(&cfg.amqp_url, &ctx.actor).await?;
    let channel = conn.create_channel().await?;
    shared::broker::declare_topology(&channel, &cfg.amqp).await?;
    channel
        .basic_qos(cfg.worker.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            cfg.amqp.queue.as_str().into(),
            ctx.actor.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    ctx.set_broker_up(true);
    tracing::info!(queue = %cfg.amqp.queue, prefetch = cfg.worker.prefetch, "consuming");
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => {
                // Unacked deliveries go back to the queue when the channel closes.
                let _ = channel.close(200, "shutdown".into()).await;
                let _ = conn.close(200, "shutdown".into()).await;
                return Ok(());
            }
            d = consumer.next() => d,
        };
        let Some(first) = first else {
            anyhow::bail!("consumer was cancelled by the broker");
        };
        let mut batch = vec![first?];
        while batch.len() < cfg.worker.intake_batch {
            match consumer.next().now_or_never() {
                Some(Some(d)) => batch.push(d?),
                Some(None) => break,
                None => break,
            }
        }
        metrics::gauge!(crate::metrics::PREFETCH_IN_USE).set(batch.len() as f64);
        take_batch(ctx, batch).await?;
    }
}

/// Records a batch, then acks (or dead-letters) each delivery and dispatches new jobs.
async fn take_batch(ctx: &Arc<Ctx>, batch: Vec<Delivery>) -> anyhow::Result<()> {
    let results = record_batch(ctx, &batch).await?;
    shared::failpoint::hit("intake_committed");
    // Acks go out as one `multiple` ack per run of acked deliveries (everything delivered
    // before this batch is already settled, so `multiple` covers exactly this batch's run).
    let mut to_ack: Option<&Delivery> = None;
    for (delivery, result) in batch.iter().zip(&results) {
        metrics::counter!(crate::metrics::INTAKE, "result" => result.label()).increment(1);
        if result.is_poison() {
            if let IntakeResult::Conflict { refund_no } = result {
                metrics::counter!(crate::metrics::CONFLICTS).increment(1);
                tracing::error!(refund_no = %refund_no, "conflict: refund_no reused with different content; stored and dead-lettered, never sent");
            }
            if let IntakeResult::Rejected {
                rejection,
                refund_no,
            } = result
            {
                tracing::warn!(refund_no = refund_no.as_deref().unwrap_or(""), field = %rejection.field, reason = %rejection.reason, "message rejected; stored and dead-lettered");
            }
            if let Some(last) = to_ack.take() {
                ack_through(last).await?;
            }
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: false,
                    multiple: false,
                })
                .await?;
        } else {
            to_ack = Some(delivery);
        }
    }
    if let Some(last) = to_ack {
        ack_through(last).await?;
    }
    for result in results {
        match result {
            IntakeResult::Created {
                refund_no,
                provider,
                merchant,
            }
            | IntakeResult::Duplicate {
                refund_no,
                state: shared::state::State::Received,
                provider,
                merchant,
            } => {
                let job = crate::executor::JobRef {
                    refund_no,
                    provider,
                    merchant,
                };
                crate::executor::dispatch(ctx, job).await
            }
            _ => {}
        }
    }
    Ok(())
}

/// Acks `last` and every unsettled delivery before it on the channel.
async fn ack_through(last: &Delivery) -> anyhow::Result<()> {
    last.acker.ack(BasicAckOptions { multiple: true }).await?;
    Ok(())
}

/// Runs intake for every delivery in one transaction. A transient database failure
/// (connection, serialization, deadlock, timeout) is retried until it passes or shutdown begins
/// (the deliveries stay unacked meanwhile); any other failure is the batch's content, so the
/// batch is split and taken message by message ([`record_each`]), and the message at fault
/// is stored as unstorable and dead-lettered while the rest go on.
async fn record_batch(ctx: &Arc<Ctx>, batch: &[Delivery]) -> anyhow::Result<Vec<IntakeResult>> {
    match retry_transient(ctx, || try_record_batch(ctx, batch)).await? {
        Ok(r) => Ok(r),
        Err(e) if batch.len() == 1 => Ok(vec![store_unstorable(ctx, &batch[0], &e).await?]),
        Err(e) => {
            tracing::warn!(error = %e, messages = batch.len(), "intake batch failed; taking its messages one by one");
            record_each(ctx, batch).await
        }
    }
}

/// Takes each delivery in a transaction of its own; one that still fails for a reason other
/// than the connection's is stored as unstorable.
async fn record_each(ctx: &Arc<Ctx>, batch: &[Delivery]) -> anyhow::Result<Vec<IntakeResult>> {
    let mut out = Vec::with_capacity(batch.len());
    for d in batch {
        let one = std::slice::from_ref(d);
        match retry_transient(ctx, || try_record_batch(ctx, one)).await? {
            Ok(mut r) if r.len() == 1 => out.extend(r.pop()),
            Ok(r) => anyhow::bail!("intake answered {} results for one message", r.len()),
            Err(e) => out.push(store_unstorable(ctx, d, &e).await?),
        }
    }
    Ok(out)
}

/// Stores a message whose effect could not be written as a rejection of the whole message
/// (raw bytes, their SHA-256, the error escaped), so it is dead-lettered and never blocks the
/// messages after it. If even that cannot be written, the message still goes to the
/// dead-letter queue, where it is not lost.
async fn store_unstorable(
    ctx: &Arc<Ctx>,
    d: &Delivery,
    error: &shared::store::StoreError,
) -> anyhow::Result<IntakeResult> {
    let msg = incoming(d);
    tracing::error!(error = %error, bytes = d.data.len(), "a message could not be taken in; storing it as unstorable and dead-lettering it");
    let stored = retry_transient(ctx, || async {
        let mut tx = ctx.pool.begin().await?;
        let r = intake::store_unstorable(&mut tx, &msg, &error.to_string(), ctx.tz).await?;
        tx.commit().await?;
        Ok(r)
    })
    .await?;
    match stored {
        Ok(result) => Ok(result),
        Err(e) => {
            tracing::error!(error = %e, "an unstorable message could not be recorded either; it is dead-lettered only");
            Ok(intake::unstorable_result(&error.to_string()))
        }
    }
}

/// Runs `op` until it succeeds or fails for a reason that is not transient (returned as
/// `Ok(Err(_))`); transient failures are retried with backoff until shutdown begins, with
/// readiness reporting intake as stalled meanwhile.
async fn retry_transient<T, F, Fut>(
    ctx: &Arc<Ctx>,
    mut op: F,
) -> anyhow::Result<Result<T, shared::store::StoreError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, shared::store::StoreError>>,
{
    let mut backoff = reconnect_backoff();
    loop {
        match op().await {
            Err(e) if e.is_transient() => {
                ctx.set_intake_up(false);
                if ctx.shutdown.is_cancelled() {
                    return Err(e.into());
                }
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "intake transaction failed; retrying");
                tokio::time::sleep(wait).await;
            }
            other => {
                ctx.set_intake_up(true);
                return Ok(other);
            }
        }
    }
}

/// A delivery as intake sees it.
fn incoming(d: &Delivery) -> Incoming<'_> {
    Incoming {
        body: &d.data,
        message_id: d.properties.message_id().as_ref().map(|s| s.as_str()),
        redelivered: d.redelivered,
    }
}

async fn try_record_batch(
    ctx: &Arc<Ctx>,
    batch: &[Delivery],
) -> Result<Vec<IntakeResult>, shared::store::StoreError> {
    let admit = |r: &shared::job::RefundRequest| ctx.admit(r);
    let msgs: Vec<Incoming> = batch.iter().map(incoming).collect();
    let mut tx = ctx.pool.begin().await?;
    let out = intake::take_batch(&mut tx, &msgs, &admit, ctx.tz).await?;
    tx.commit().await?;
    Ok(out)
}
