//! The notify ShengPay POSTs to a refund's `notifyUrl` when it ends (DESIGN.md §5): signed JSON
//! with the refund's fields and `refundStatus`, retried until the receiver acknowledges it.
//!
//! A delivery counts only when the receiver answers HTTP 2xx with the body `SUCCESS`; anything
//! else (another status, another body, a timeout, a refused connection) is retried after each
//! wait of `notify_retry_ms`, and after the last one delivery gives up. Deliveries run as tasks
//! on the simulator's runtime, at most `notify_concurrency` at once, and end when the simulator
//! shuts down or is reset. At most `notify_max_pending` notifies are under way at a time; one
//! beyond that is recorded as `dropped_overflow` and never sent, so a receiver that never
//! answers cannot make the simulator grow without bound.
//!
//! Fault rules with `operation = "notify"` are matched when the refund ends and shape what
//! the receiver sees: nothing (`notify_drop`), a late first delivery (`notify_delay`), the
//! final notify twice (`notify_duplicate`), a stale `PROCESSING` notify after the final one
//! (`notify_reorder`), a first delivery whose `sign` does not verify (`notify_bad_sign`), or a
//! correctly signed notify about someone else's refund first (`notify_foreign`). Every attempt
//! is logged as a [`NotifyRecord`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::lifecycle::{RefundStatus, Tracked};
use super::{ResponseBuilder, random_bits};
use crate::config::ShengPaySection;
use crate::faults::{CallKey, FaultAction, Operation};
use crate::server::{SimState, lock, wait_for_shutdown};
use crate::{Provider, SimError};

/// The longest receiver answer kept in a record.
const ANSWER_CHARS: usize = 200;

/// What a delivery carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyKind {
    /// The refund's final notify.
    Final,
    /// The final notify again (`notify_duplicate`, or a resend through `/_sim/notify`).
    Duplicate,
    /// A `PROCESSING` notify sent after the final one (`notify_reorder`).
    Stale,
    /// The final notify with a corrupted `sign` (`notify_bad_sign`'s first attempt).
    BadSign,
    /// A correctly signed notify about another refund of another account (`notify_foreign`).
    Foreign,
}

/// What became of an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyOutcome {
    /// The receiver answered 2xx `SUCCESS`.
    Delivered,
    /// Not acknowledged; it will be sent again after the next wait of `notify_retry_ms`.
    Retry,
    /// Not acknowledged and no retries left: delivery stopped.
    GivenUp,
    /// Not acknowledged by a one-shot delivery (stale, foreign, resend), which is not retried.
    Refused,
    /// Never sent: a `notify_drop` rule fired.
    DroppedByRule,
    /// Never sent: `notify_max_pending` notifies were already under way.
    DroppedOverflow,
}

/// One notify delivery attempt (or a notify that was never sent, with `attempt` 0).
#[derive(Clone, Debug, Serialize)]
pub struct NotifyRecord {
    /// Order of recording, from 1, since the last reset.
    pub seq: u64,
    /// The refund it is about (a foreign notify *names* another one; see `kind`).
    pub refund_no: String,
    /// Our merchant name.
    pub merchant: String,
    /// The `refundStatus` sent.
    pub status: String,
    /// 1 for the first attempt of a delivery, 2 for its first retry, ...; 0 = never sent.
    pub attempt: u32,
    pub kind: NotifyKind,
    /// The receiver's HTTP status; `None` when no answer came.
    pub http_status: Option<u16>,
    /// The receiver's body, at most 200 characters.
    pub answer: Option<String>,
    /// Why no answer came (connect error, timeout), or why nothing was sent.
    pub error: Option<String>,
    pub delivered: bool,
    pub outcome: NotifyOutcome,
    /// Simulator clock when the attempt ended.
    pub at: DateTime<Utc>,
}

/// Delivery settings, the HTTP client, the concurrency limit and the log.
pub(crate) struct Notifier {
    client: reqwest::Client,
    permits: Semaphore,
    pending: AtomicUsize,
    max_pending: usize,
    retry: Vec<Duration>,
    timeout: Duration,
    log: Mutex<NotifyLog>,
    /// Nonces and amount styles of notify bodies. Not the calls' source: notifies are signed
    /// whenever their tasks run, and drawing from the calls' source would make which calls a
    /// rule with a `rate` fires depend on timing rather than on the seed.
    rng: Mutex<StdRng>,
}

struct NotifyLog {
    entries: VecDeque<NotifyRecord>,
    capacity: usize,
    total: u64,
}

impl Notifier {
    pub(crate) fn new(
        section: &ShengPaySection,
        log_capacity: usize,
        seed: u64,
    ) -> Result<Self, SimError> {
        let client = reqwest::Client::builder()
            // Each notify names its own receiver; a redirect would send the signed body to
            // somewhere the refund call never named.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SimError::Invalid(format!("cannot build the notify HTTP client: {e}")))?;
        Ok(Notifier {
            client,
            permits: Semaphore::new(section.notify_concurrency),
            pending: AtomicUsize::new(0),
            max_pending: section.notify_max_pending,
            retry: section
                .notify_retry_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            timeout: Duration::from_millis(section.notify_timeout_ms),
            log: Mutex::new(NotifyLog {
                entries: VecDeque::new(),
                capacity: log_capacity.max(1),
                total: 0,
            }),
            // Derived from the seed, but a stream of its own ("notify" in ASCII).
            rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x6e6f_7469_6679)),
        })
    }

    /// Every record kept, in order, optionally only those of one refund number.
    pub(crate) fn records(&self, refund_no: Option<&str>) -> Vec<NotifyRecord> {
        lock(&self.log)
            .entries
            .iter()
            .filter(|r| refund_no.is_none_or(|want| r.refund_no == want))
            .cloned()
            .collect()
    }

    /// Notifies under way (not yet delivered, given up or stopped).
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn clear(&self) {
        let mut log = lock(&self.log);
        log.entries.clear();
        log.total = 0;
    }

    fn push(&self, mut record: NotifyRecord) -> NotifyRecord {
        let mut log = lock(&self.log);
        log.total += 1;
        record.seq = log.total;
        if log.entries.len() >= log.capacity {
            log.entries.pop_front();
        }
        log.entries.push_back(record.clone());
        record
    }
}

/// A record for `t` with nothing sent yet; the attempt fills in the rest.
fn record(state: &SimState, t: &Tracked, kind: NotifyKind, attempt: u32) -> NotifyRecord {
    let status = match kind {
        NotifyKind::Stale => RefundStatus::Processing,
        _ => t.view.status,
    };
    NotifyRecord {
        seq: 0,
        refund_no: t.view.refund_no.clone(),
        merchant: t.view.merchant.clone(),
        status: status.as_str().to_owned(),
        attempt,
        kind,
        http_status: None,
        answer: None,
        error: None,
        delivered: false,
        outcome: NotifyOutcome::Refused,
        at: state.clock.now(),
    }
}

/// Starts the notify of a refund that just ended, shaped by the notify rule that fires for it.
pub(crate) fn dispatch(state: &Arc<SimState>, t: Tracked) {
    if t.view.notify_url.is_none() {
        return;
    }
    let fired = lock(&state.faults).select(&CallKey {
        operation: Operation::Notify,
        provider: Provider::ShengPay,
        merchant: Some(&t.view.merchant),
        refund_no: Some(&t.view.refund_no),
        order_no: Some(&t.view.order_no),
    });
    let action = fired.as_ref().and_then(|f| f.action);
    let notifier = &state.notifier;
    let never_sent = |outcome, error: &str| {
        let mut r = record(state, &t, NotifyKind::Final, 0);
        r.outcome = outcome;
        r.error = Some(error.to_owned());
        notifier.push(r);
    };
    if action == Some(FaultAction::NotifyDrop) {
        never_sent(
            NotifyOutcome::DroppedByRule,
            "dropped by a notify_drop rule",
        );
        return;
    }
    if notifier.pending.fetch_add(1, Ordering::SeqCst) >= notifier.max_pending {
        notifier.pending.fetch_sub(1, Ordering::SeqCst);
        never_sent(
            NotifyOutcome::DroppedOverflow,
            "notify_max_pending notifies already under way",
        );
        return;
    }
    let delay = match action {
        Some(FaultAction::NotifyDelay) => fired.as_ref().map_or(0, |f| f.latency_ms),
        _ => 0,
    };
    let epoch = state.epoch();
    let task_state = Arc::clone(state);
    let mut shutdown = state.shutdown.clone();
    state.runtime.spawn(async move {
        tokio::select! {
            _ = sequence(&task_state, &t, action, Duration::from_millis(delay), epoch) => {}
            () = wait_for_shutdown(&mut shutdown) => {}
        }
        task_state.notifier.pending.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Every delivery of one refund's notify, in order. `None` once the simulator was reset.
async fn sequence(
    state: &Arc<SimState>,
    t: &Tracked,
    action: Option<FaultAction>,
    delay: Duration,
    epoch: u64,
) -> Option<()> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if action == Some(FaultAction::NotifyForeign) {
        once(state, t, NotifyKind::Foreign, epoch).await?;
    }
    let bad_first = action == Some(FaultAction::NotifyBadSign);
    with_retries(state, t, NotifyKind::Final, bad_first, epoch).await?;
    match action {
        Some(FaultAction::NotifyDuplicate) => {
            with_retries(state, t, NotifyKind::Duplicate, false, epoch).await?;
        }
        Some(FaultAction::NotifyReorder) => {
            once(state, t, NotifyKind::Stale, epoch).await?;
        }
        _ => {}
    }
    Some(())
}

/// Delivers until acknowledged or out of retries; whether it was acknowledged.
async fn with_retries(
    state: &Arc<SimState>,
    t: &Tracked,
    kind: NotifyKind,
    bad_first: bool,
    epoch: u64,
) -> Option<bool> {
    let mut number = 1u32;
    loop {
        let this_kind = if bad_first && number == 1 {
            NotifyKind::BadSign
        } else {
            kind
        };
        let mut r = attempt(state, t, this_kind, number, epoch).await?;
        let wait = usize::try_from(number - 1)
            .ok()
            .and_then(|i| state.notifier.retry.get(i))
            .copied();
        r.outcome = match (r.delivered, wait) {
            (true, _) => NotifyOutcome::Delivered,
            (false, Some(_)) => NotifyOutcome::Retry,
            (false, None) => NotifyOutcome::GivenUp,
        };
        let delivered = r.delivered;
        state.notifier.push(r);
        match wait {
            _ if delivered => return Some(true),
            None => return Some(false),
            Some(wait) => tokio::time::sleep(wait).await,
        }
        number += 1;
    }
}

/// One delivery that is not retried.
async fn once(state: &Arc<SimState>, t: &Tracked, kind: NotifyKind, epoch: u64) -> Option<bool> {
    let mut r = attempt(state, t, kind, 1, epoch).await?;
    if r.delivered {
        r.outcome = NotifyOutcome::Delivered;
    }
    let delivered = r.delivered;
    state.notifier.push(r);
    Some(delivered)
}

/// Sends the current final notify of an ended refund once, now, and returns its record:
/// lets a test show its receiver a duplicate whenever it wants one.
pub(crate) async fn resend(
    state: &Arc<SimState>,
    merchant: Option<&str>,
    refund_no: &str,
) -> Result<NotifyRecord, SimError> {
    let found = lock(&state.refunds).find(merchant, refund_no).cloned();
    let Some(t) = found else {
        return Err(SimError::NotFound(format!(
            "no ShengPay refund {refund_no:?}"
        )));
    };
    if t.view.status == RefundStatus::Processing {
        return Err(SimError::NotFound(format!(
            "refund {refund_no:?} is still processing: it has no final notify yet"
        )));
    }
    if t.view.notify_url.is_none() {
        return Err(SimError::NotFound(format!(
            "refund {refund_no:?} named no notifyUrl"
        )));
    }
    let epoch = state.epoch();
    let Some(mut r) = attempt(state, &t, NotifyKind::Duplicate, 1, epoch).await else {
        return Err(SimError::NotFound("the simulator was reset".into()));
    };
    if r.delivered {
        r.outcome = NotifyOutcome::Delivered;
    }
    Ok(state.notifier.push(r))
}

/// One POST of a freshly signed body; the record of it (outcome still to decide), or `None`
/// when the simulator was reset since the notify started (its refund is forgotten).
async fn attempt(
    state: &Arc<SimState>,
    t: &Tracked,
    kind: NotifyKind,
    number: u32,
    epoch: u64,
) -> Option<NotifyRecord> {
    let url = t.view.notify_url.clone()?;
    // Signing is CPU work (slow in debug builds): keep it off the async workers.
    let signer = (Arc::clone(state), t.clone());
    let body = tokio::task::spawn_blocking(move || body(&signer.0, &signer.1, kind))
        .await
        .ok()?;
    let notifier = &state.notifier;
    let _slot = notifier.permits.acquire().await.ok()?;
    if state.epoch() != epoch {
        return None;
    }
    let result = notifier
        .client
        .post(url)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )
        .body(body)
        .timeout(notifier.timeout)
        .send()
        .await;
    let mut r = record(state, t, kind, number);
    match result {
        Ok(response) => {
            r.http_status = Some(response.status().as_u16());
            match response.bytes().await {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    r.delivered = response_ok(r.http_status) && text.trim() == "SUCCESS";
                    r.answer = Some(text.chars().take(ANSWER_CHARS).collect());
                }
                Err(e) => r.error = Some(error_chain(&e)),
            }
        }
        Err(e) => r.error = Some(error_chain(&e)),
    }
    r.at = state.clock.now();
    Some(r)
}

fn response_ok(status: Option<u16>) -> bool {
    status.is_some_and(|s| (200..300).contains(&s))
}

/// An error with its causes ("error sending request" alone says nothing).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The signed JSON of one delivery. Signed over exactly what is written, amounts as strings
/// or numbers by the same `string_amounts_rate` choice as responses.
fn body(state: &SimState, t: &Tracked, kind: NotifyKind) -> String {
    let (nonce, string_amounts, coins) = random_bits(
        &mut lock(&state.notifier.rng),
        state.settings.string_amounts_rate,
    );
    let mut b = ResponseBuilder::new(string_amounts, coins);
    let own = (
        t.mch_id.as_str(),
        t.app_id.as_str(),
        t.view.refund_no.as_str(),
    );
    match kind {
        NotifyKind::Foreign => {
            // Another account the platform really serves, when there is one: what a replayed
            // notify of someone else's refund looks like. Signed right, about the wrong refund.
            let (mch_id, app_id) = state
                .settings
                .shengpay
                .iter()
                .find(|a| a.mch_id != t.mch_id)
                .map(|a| (a.mch_id.clone(), a.app_id.clone()))
                .unwrap_or_else(|| (format!("{}0", t.mch_id), t.app_id.clone()));
            let refund_no = format!("{}X", t.view.refund_no);
            t.report_fields(&mut b, (&mch_id, &app_id, &refund_no), t.view.status);
        }
        NotifyKind::Stale => t.report_fields(&mut b, own, RefundStatus::Processing),
        NotifyKind::Final | NotifyKind::Duplicate | NotifyKind::BadSign => {
            t.report_fields(&mut b, own, t.view.status);
        }
    }
    b.str("nonceStr", nonce)
        .str("signType", t.sign_type.as_str());
    b.finish(state, t.sign_type, kind == NotifyKind::BadSign)
}
