//! A ShengPay refund after the call that accepted it: `PROCESSING` for `processing_ms`, then
//! `SUCCESS`, or `REFUND_CLOSE` / `CHANGE` when a fault rule decided so at the refund call.
//!
//! The [`Book`] holds every accepted ShengPay refund (what the status query answers and
//! `/_sim/refunds` lists) and a queue of the ones still processing, ordered by when they are
//! due. One background task per simulator ([`run_ticker`]) sleeps until the earliest is due
//! and ends it; `finish` ends all of them at once. Due times are on the real monotonic clock,
//! because the processing time is a duration the system under test really waits; the times
//! recorded (accepted, ended, success) are on the simulator's settable clock, so a test that
//! moves the clock decides the statement date of what ends afterwards.
//!
//! Ending a refund settles it in the ledger (`SUCCESS`: paid, listed in the statement at its
//! success time), releases it (`REFUND_CLOSE`: the order can be refunded again) or leaves it
//! reserved and unpaid (`CHANGE`), then starts its notify.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::ResponseBuilder;
use super::notify;
use crate::Provider;
use crate::crypto::SignType;
use crate::ledger::PaidRefund;
use crate::server::{ShengPayAccount, SimState, lock, wait_for_shutdown};

/// A refund's place in the book: (our merchant name, `outRefundNo`).
pub(crate) type Key = (String, String);

/// A ShengPay `refundStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RefundStatus {
    Processing,
    Success,
    RefundClose,
    Change,
}

impl RefundStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundStatus::Processing => "PROCESSING",
            RefundStatus::Success => "SUCCESS",
            RefundStatus::RefundClose => "REFUND_CLOSE",
            RefundStatus::Change => "CHANGE",
        }
    }
}

/// One ShengPay refund as `SimHandle::refunds` and `/_sim/refunds` show it.
#[derive(Clone, Debug, Serialize)]
pub struct ShengPayRefund {
    /// Our merchant name.
    pub merchant: String,
    pub refund_no: String,
    pub order_no: String,
    /// `refundId`, given at acceptance.
    pub provider_refund_id: String,
    pub total_fee: i64,
    pub refund_fee: i64,
    pub settlement_refund_fee: i64,
    pub status: RefundStatus,
    pub accepted_at: DateTime<Utc>,
    /// When it is due to end (simulator clock at acceptance plus `processing_ms`).
    pub ends_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// `SUCCESS` only: the `refundSuccessTime`, and `refunded_at` in the paid list.
    pub success_time: Option<DateTime<Utc>>,
    /// Where its notify goes; `None` when the refund call named none.
    pub notify_url: Option<String>,
}

/// A refund plus what only the simulator needs: the account ids and sign type its notifies
/// carry, how it will end, and its place in the queue.
#[derive(Clone, Debug)]
pub(crate) struct Tracked {
    pub view: ShengPayRefund,
    pub app_id: String,
    pub mch_id: String,
    pub transaction_id: String,
    pub sign_type: SignType,
    /// The status it ends with (decided by the rule that fired at the refund call).
    pub planned: RefundStatus,
    slot: (Instant, u64),
}

impl Tracked {
    pub(crate) fn new(
        paid: &PaidRefund,
        account: &ShengPayAccount,
        sign_type: SignType,
        notify_url: Option<&str>,
        planned: RefundStatus,
        now: DateTime<Utc>,
        processing: Duration,
    ) -> Self {
        let ends_at = chrono::TimeDelta::from_std(processing)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .unwrap_or(now);
        Tracked {
            view: ShengPayRefund {
                merchant: account.name.clone(),
                refund_no: paid.refund_no.clone(),
                order_no: paid.order_no.clone(),
                provider_refund_id: paid.provider_refund_id.clone(),
                total_fee: paid.total_fee,
                refund_fee: paid.refund_fee,
                settlement_refund_fee: paid.settlement_refund_fee,
                status: RefundStatus::Processing,
                accepted_at: now,
                ends_at,
                ended_at: None,
                success_time: None,
                notify_url: notify_url.filter(|u| !u.is_empty()).map(str::to_owned),
            },
            app_id: account.app_id.clone(),
            mch_id: account.mch_id.clone(),
            transaction_id: paid.transaction_id.clone(),
            sign_type,
            planned,
            slot: (Instant::now() + processing, 0),
        }
    }

    pub(crate) fn key(&self) -> Key {
        (self.view.merchant.clone(), self.view.refund_no.clone())
    }

    /// The fields a notify and a query answer share (DESIGN.md §5), about refund `refund_no`
    /// of account (`mch_id`, `app_id`) in `status`: normally this refund's own, but a foreign
    /// or stale notify names something else.
    pub(crate) fn report_fields(
        &self,
        b: &mut ResponseBuilder,
        (mch_id, app_id, refund_no): (&str, &str, &str),
        status: RefundStatus,
    ) {
        let v = &self.view;
        b.str("appId", app_id)
            .str("mchId", mch_id)
            .str("outTradeNo", v.order_no.clone())
            .str("outRefundNo", refund_no)
            .str("refundId", v.provider_refund_id.clone())
            .str("transactionId", self.transaction_id.clone())
            .amount("totalFee", v.total_fee)
            .amount("refundFee", v.refund_fee)
            .amount("settlementRefundFee", v.settlement_refund_fee)
            .amount("settlementTotalFee", v.total_fee)
            .str("refundStatus", status.as_str());
        if status == RefundStatus::Success
            && let Some(at) = v.success_time
        {
            b.str("refundSuccessTime", success_time_text(at));
        }
    }
}

/// `refundSuccessTime`: `yyyyMMddHHmmss` in Beijing time, whatever the statement's zone.
pub(crate) fn success_time_text(at: DateTime<Utc>) -> String {
    at.with_timezone(&chrono_tz::Asia::Shanghai)
        .format("%Y%m%d%H%M%S")
        .to_string()
}

/// Every accepted ShengPay refund, and the queue of those still processing.
#[derive(Default)]
pub(crate) struct Book {
    refunds: HashMap<Key, Tracked>,
    /// Acceptance order, for listing.
    order: Vec<Key>,
    /// Processing refunds by due time (ties broken by acceptance sequence).
    queue: BTreeMap<(Instant, u64), Key>,
    next_seq: u64,
}

impl Book {
    /// Adds a newly accepted refund (the ledger guarantees one per key).
    pub(crate) fn register(&mut self, mut tracked: Tracked) {
        self.next_seq += 1;
        tracked.slot.1 = self.next_seq;
        let key = tracked.key();
        self.queue.insert(tracked.slot, key.clone());
        if self.refunds.insert(key.clone(), tracked).is_none() {
            self.order.push(key);
        }
    }

    pub(crate) fn get(&self, merchant: &str, refund_no: &str) -> Option<&Tracked> {
        self.refunds
            .get(&(merchant.to_owned(), refund_no.to_owned()))
    }

    /// The refund of this number at `merchant`, or at any merchant (the first accepted).
    pub(crate) fn find(&self, merchant: Option<&str>, refund_no: &str) -> Option<&Tracked> {
        match merchant {
            Some(m) => self.get(m, refund_no),
            None => self
                .order
                .iter()
                .filter(|k| k.1 == refund_no)
                .find_map(|k| self.refunds.get(k)),
        }
    }

    /// Every refund, in acceptance order, optionally only those of one refund number.
    pub(crate) fn list(&self, refund_no: Option<&str>) -> Vec<ShengPayRefund> {
        self.order
            .iter()
            .filter(|k| refund_no.is_none_or(|want| k.1 == want))
            .filter_map(|k| self.refunds.get(k))
            .map(|t| t.view.clone())
            .collect()
    }

    pub(crate) fn processing(&self) -> usize {
        self.queue.len()
    }

    fn next_due(&self) -> Option<Instant> {
        self.queue.keys().next().map(|slot| slot.0)
    }

    /// Takes the refunds due at `now` off the queue.
    fn take_due(&mut self, now: Instant) -> Vec<Key> {
        let later = self.queue.split_off(&(now, u64::MAX));
        let due = std::mem::replace(&mut self.queue, later);
        due.into_values().collect()
    }

    /// Takes every processing refund off the queue.
    fn take_all(&mut self) -> Vec<Key> {
        std::mem::take(&mut self.queue).into_values().collect()
    }

    /// Ends a processing refund with its planned status at `at`; the refund as ended, or
    /// `None` when it is unknown or ended already.
    fn end(&mut self, key: &Key, at: DateTime<Utc>) -> Option<Tracked> {
        let tracked = self.refunds.get_mut(key)?;
        if tracked.view.status != RefundStatus::Processing {
            return None;
        }
        self.queue.remove(&tracked.slot);
        tracked.view.status = tracked.planned;
        tracked.view.ended_at = Some(at);
        if tracked.planned == RefundStatus::Success {
            tracked.view.success_time = Some(at);
        }
        Some(tracked.clone())
    }

    pub(crate) fn clear(&mut self) {
        self.refunds.clear();
        self.order.clear();
        self.queue.clear();
    }
}

/// Which refunds [`end_refunds`] ends.
#[derive(Clone, Debug)]
pub(crate) enum Which {
    /// Those due by now.
    Due,
    /// Every processing refund.
    All,
    /// One refund, if it is still processing.
    One(Key),
}

/// Ends refunds now (simulator clock), books the result in the ledger and starts their
/// notifies; returns how many ended.
pub(crate) fn end_refunds(state: &Arc<SimState>, which: Which) -> usize {
    let now = state.clock.now();
    let mut ended = Vec::new();
    {
        let mut book = lock(&state.refunds);
        let keys = match which {
            Which::Due => book.take_due(Instant::now()),
            Which::All => book.take_all(),
            Which::One(key) => vec![key],
        };
        let mut ledger = lock(&state.ledger);
        for key in keys {
            let Some(tracked) = book.end(&key, now) else {
                continue;
            };
            let (merchant, refund_no) = (&key.0, &key.1);
            match tracked.view.status {
                RefundStatus::Success => {
                    ledger.settle(Provider::ShengPay, merchant, refund_no, now);
                }
                RefundStatus::RefundClose => {
                    ledger.release(Provider::ShengPay, merchant, refund_no);
                }
                RefundStatus::Change | RefundStatus::Processing => {}
            }
            ended.push(tracked);
        }
    }
    let count = ended.len();
    for tracked in ended {
        notify::dispatch(state, tracked);
    }
    count
}

/// The background task that ends refunds when they are due, until shutdown. It sleeps until
/// the earliest due time and is woken early when a refund is accepted (it may be due sooner).
pub(crate) async fn run_ticker(state: Arc<SimState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let next = lock(&state.refunds).next_due();
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = due => {
                end_refunds(&state, Which::Due);
            }
            () = state.wake.notified() => {}
            () = wait_for_shutdown(&mut shutdown) => return,
        }
    }
}
