//! Publishing refund requests the way an order system does (persistent, publisher confirms),
//! recording when each one was sent: the start of its end-to-end latency.
//!
//! Confirms are pipelined (up to [`WINDOW`] outstanding), so the publisher is never the
//! bottleneck of a burst; a paced publisher sends message `i` at `t0 + i / rate` whatever the
//! system does (open loop), so a slow system shows up as latency, not as a slower offer.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use lapin::Channel;
use lapin::PublisherConfirm;
use lapin::options::BasicPublishOptions;
use shared::config::AmqpConfig;
use shared::job::ProviderKind;

use testkit::request_json;

/// Outstanding confirms at most.
pub const WINDOW: usize = 4096;

/// Microseconds since the Unix epoch (the same clock as PostgreSQL's `clock_timestamp()`).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// One request: its refund number and body.
pub struct Msg {
    pub refund_no: String,
    pub body: Vec<u8>,
}

/// `n` valid requests numbered `{prefix}{i:07}`, to `merchants` in turn.
pub fn requests(prefix: &str, n: usize, kind: ProviderKind, merchants: &[&str]) -> Vec<Msg> {
    (0..n)
        .map(|i| {
            let refund_no = format!("{prefix}{i:07}");
            let order_no = format!("O{refund_no}");
            let merchant = merchants[i % merchants.len()];
            let v = request_json(
                &refund_no,
                &order_no,
                kind,
                merchant,
                10_000,
                100 + (i % 900) as i64,
            );
            Msg {
                refund_no,
                body: serde_json::to_vec(&v).unwrap_or_default(),
            }
        })
        .collect()
}

async fn settle(confirm: PublisherConfirm) -> anyhow::Result<()> {
    if confirm.await?.is_nack() {
        bail!("the broker nacked a publish");
    }
    Ok(())
}

/// Publishes every message, at `rate` per second if given (else as fast as confirms allow);
/// returns the send time (µs since the epoch) of each, in order, once all are confirmed.
pub async fn publish(
    ch: &Channel,
    amqp: &AmqpConfig,
    msgs: &[Msg],
    rate: Option<f64>,
) -> anyhow::Result<Vec<i64>> {
    let mut sent = Vec::with_capacity(msgs.len());
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(WINDOW);
    let t0 = Instant::now();
    for (i, m) in msgs.iter().enumerate() {
        if let Some(rate) = rate {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        while pending.len() >= WINDOW {
            if let Some(c) = pending.pop_front() {
                settle(c).await?;
            }
        }
        sent.push(now_us());
        let confirm = ch
            .basic_publish(
                amqp.exchange.as_str().into(),
                amqp.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &m.body,
                shared::broker::json_properties(None),
            )
            .await?;
        pending.push_back(confirm);
    }
    for c in pending {
        settle(c).await?;
    }
    Ok(sent)
}
