//! What the simulated providers have paid: the core of the fake.
//!
//! A real provider's value to the system under test is that it pays each refund number at most
//! once and never more than an order's total; this module is where that holds, for both
//! providers alike, inside one lock so concurrent retries of one refund cannot both pay.
//! Money is integer fen (`i64`) with checked arithmetic, never floats.
//!
//! Accepting a refund reserves its amount against the order at once; whether it is *paid* (in
//! [`Ledger::paid`] and the statement) is a second step. WuPay is synchronous, so both happen
//! in one call. A ShengPay refund is settled when it ends `SUCCESS`, released when it ends
//! `REFUND_CLOSE` (the order can be refunded again), and stays reserved but unpaid when it ends
//! `CHANGE` (the money left the merchant but never reached the card).

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use super::Provider;

/// The upper bound on any amount, as in the request message contract.
pub const MAX_FEE: i64 = 100_000_000_000;

/// One refund the simulator accepted; in the paid list once settled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PaidRefund {
    pub provider: Provider,
    pub merchant: String,
    pub refund_no: String,
    pub order_no: String,
    /// `refundId` for ShengPay (`RO...`); WuPay returns no id, so the simulator makes one
    /// (`WU...`) for its statement.
    pub provider_refund_id: String,
    /// ShengPay's `transactionId` of the order (`C...`); also made up for WuPay.
    pub transaction_id: String,
    pub total_fee: i64,
    pub refund_fee: i64,
    pub settlement_refund_fee: i64,
    pub coupon_refund_fee: i64,
    /// Present when `coupon_refund_fee > 0`.
    pub coupon_refund_id: Option<String>,
    /// When it was paid: the call for WuPay, the `SUCCESS` end for ShengPay (until then, the
    /// acceptance time).
    #[serde(serialize_with = "rfc3339")]
    pub refunded_at: DateTime<Utc>,
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// A request to pay, as both providers' handlers hand it over after validation.
#[derive(Clone, Debug)]
pub(crate) struct RefundAttempt {
    pub provider: Provider,
    pub merchant: String,
    pub refund_no: String,
    pub order_no: String,
    pub total_fee: i64,
    pub refund_fee: i64,
    /// Share of refunds that get a coupon part (WuPay: always 0).
    pub coupon_rate: f64,
}

/// What the ledger decided.
#[derive(Clone, Debug)]
pub(crate) enum Decision {
    /// Accepted now (and paid, if settled at once).
    Paid(PaidRefund),
    /// Paid before with the same amounts: the first result again, nothing paid now.
    Replayed(PaidRefund),
    /// The refund number was paid before with different order or amounts: refused.
    Conflict,
    /// A definitive business refusal (`REFUND_AMOUNT_ERROR`).
    Declined { code: &'static str, message: String },
}

type RefundKey = (Provider, String, String);

struct OrderState {
    total_fee: i64,
    refunded: i64,
    transaction_id: String,
}

/// An accepted refund and how far it got.
struct Entry {
    refund: PaidRefund,
    settled: bool,
    released: bool,
}

pub(crate) struct Ledger {
    /// Every accepted refund, in acceptance order.
    entries: Vec<Entry>,
    /// Indexes into `entries` of the settled ones, in settlement order.
    paid: Vec<usize>,
    by_refund: HashMap<RefundKey, usize>,
    orders: HashMap<RefundKey, OrderState>,
    /// Id sequences survive [`Ledger::clear`] and start from the wall clock, so ids stay unique
    /// across resets and restarts of the simulator (a test database may outlive either).
    next_refund_seq: u64,
    next_transaction_seq: u64,
    next_coupon_seq: u64,
}

impl Ledger {
    pub(crate) fn new() -> Self {
        let start = u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0);
        Ledger {
            entries: Vec::new(),
            paid: Vec::new(),
            by_refund: HashMap::new(),
            orders: HashMap::new(),
            next_refund_seq: start,
            next_transaction_seq: start,
            next_coupon_seq: start,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.paid.clear();
        self.by_refund.clear();
        self.orders.clear();
    }

    /// Every settled refund, in settlement order.
    pub(crate) fn paid(&self) -> Vec<PaidRefund> {
        self.paid
            .iter()
            .map(|&i| self.entries[i].refund.clone())
            .collect()
    }

    pub(crate) fn paid_count(&self) -> usize {
        self.paid.len()
    }

    /// Accepts `attempt` unless that would pay a refund number twice or exceed the order;
    /// `settle` pays it at once (`now` is then its `refunded_at`).
    pub(crate) fn apply(
        &mut self,
        attempt: &RefundAttempt,
        now: DateTime<Utc>,
        settle: bool,
    ) -> Decision {
        let key = (
            attempt.provider,
            attempt.merchant.clone(),
            attempt.refund_no.clone(),
        );
        if let Some(&index) = self.by_refund.get(&key) {
            let first = &self.entries[index].refund;
            let same = first.order_no == attempt.order_no
                && first.total_fee == attempt.total_fee
                && first.refund_fee == attempt.refund_fee;
            return if same {
                Decision::Replayed(first.clone())
            } else {
                Decision::Conflict
            };
        }
        if attempt.refund_fee < 1 || attempt.total_fee < 1 || attempt.refund_fee > attempt.total_fee
        {
            return Decision::Declined {
                code: "REFUND_AMOUNT_ERROR",
                message: "refund amount exceeds the order total".into(),
            };
        }
        let order_key = (
            attempt.provider,
            attempt.merchant.clone(),
            attempt.order_no.clone(),
        );
        let already = match self.orders.get(&order_key) {
            Some(order) if order.total_fee != attempt.total_fee => {
                return Decision::Declined {
                    code: "REFUND_AMOUNT_ERROR",
                    message: format!(
                        "total fee {} does not match the order's total fee {}",
                        attempt.total_fee, order.total_fee
                    ),
                };
            }
            Some(order) => order.refunded,
            None => 0,
        };
        let Some(after) = already
            .checked_add(attempt.refund_fee)
            .filter(|after| *after <= attempt.total_fee)
        else {
            return Decision::Declined {
                code: "REFUND_AMOUNT_ERROR",
                message: "refund amount exceeds the refundable amount".into(),
            };
        };

        let coupon_refund_fee =
            coupon_fee(&attempt.refund_no, attempt.refund_fee, attempt.coupon_rate);
        // coupon_fee keeps the coupon below the refund, so this cannot underflow; checked anyway
        // because a wrong settlement amount is exactly what the reconciler must never see.
        let Some(settlement_refund_fee) = attempt
            .refund_fee
            .checked_sub(coupon_refund_fee)
            .filter(|s| *s >= 1)
        else {
            return Decision::Declined {
                code: "REFUND_AMOUNT_ERROR",
                message: "refund amount too small".into(),
            };
        };
        let id_prefix = match attempt.provider {
            Provider::ShengPay => "RO",
            Provider::WuPay => "WU",
        };
        let provider_refund_id = format!("{id_prefix}{:019}", bump(&mut self.next_refund_seq));
        let coupon_refund_id =
            (coupon_refund_fee > 0).then(|| format!("CP{:019}", bump(&mut self.next_coupon_seq)));
        let next_transaction = &mut self.next_transaction_seq;
        let order = self.orders.entry(order_key).or_insert_with(|| OrderState {
            total_fee: attempt.total_fee,
            refunded: 0,
            transaction_id: format!("C{:019}", bump(next_transaction)),
        });
        order.refunded = after;
        let paid = PaidRefund {
            provider: attempt.provider,
            merchant: attempt.merchant.clone(),
            refund_no: attempt.refund_no.clone(),
            order_no: attempt.order_no.clone(),
            provider_refund_id,
            transaction_id: order.transaction_id.clone(),
            total_fee: attempt.total_fee,
            refund_fee: attempt.refund_fee,
            settlement_refund_fee,
            coupon_refund_fee,
            coupon_refund_id,
            refunded_at: now,
        };
        let index = self.entries.len();
        self.by_refund.insert(key, index);
        self.entries.push(Entry {
            refund: paid.clone(),
            settled: settle,
            released: false,
        });
        if settle {
            self.paid.push(index);
        }
        Decision::Paid(paid)
    }

    /// Pays an accepted refund at `at`; false when it is unknown, already paid or released.
    pub(crate) fn settle(
        &mut self,
        provider: Provider,
        merchant: &str,
        refund_no: &str,
        at: DateTime<Utc>,
    ) -> bool {
        let key = (provider, merchant.to_owned(), refund_no.to_owned());
        let Some(&index) = self.by_refund.get(&key) else {
            return false;
        };
        let entry = &mut self.entries[index];
        if entry.settled || entry.released {
            return false;
        }
        entry.settled = true;
        entry.refund.refunded_at = at;
        self.paid.push(index);
        true
    }

    /// Gives an accepted, unpaid refund's amount back to its order; false when it is unknown,
    /// paid or released already. The refund number stays taken: a repeat replays the first
    /// answer.
    pub(crate) fn release(&mut self, provider: Provider, merchant: &str, refund_no: &str) -> bool {
        let key = (provider, merchant.to_owned(), refund_no.to_owned());
        let Some(&index) = self.by_refund.get(&key) else {
            return false;
        };
        let entry = &mut self.entries[index];
        if entry.settled || entry.released {
            return false;
        }
        entry.released = true;
        let order_key = (provider, merchant.to_owned(), entry.refund.order_no.clone());
        if let Some(order) = self.orders.get_mut(&order_key) {
            // Never below zero even if an invariant broke: the order total is what protects
            // against paying twice.
            order.refunded = order
                .refunded
                .checked_sub(entry.refund.refund_fee)
                .unwrap_or(0)
                .max(0);
        }
        true
    }

    /// Refunds paid on `date` in time zone `tz`, optionally of one provider, in payment order.
    pub(crate) fn statement(
        &self,
        date: NaiveDate,
        tz: Tz,
        provider: Option<Provider>,
    ) -> Vec<PaidRefund> {
        self.paid
            .iter()
            .map(|&i| &self.entries[i].refund)
            .filter(|p| provider.is_none_or(|want| p.provider == want))
            .filter(|p| p.refunded_at.with_timezone(&tz).date_naive() == date)
            .cloned()
            .collect()
    }
}

fn bump(seq: &mut u64) -> u64 {
    let value = *seq;
    *seq = seq.wrapping_add(1);
    value
}

/// The contract header of the provider statement CSV (DESIGN.md §7).
pub const STATEMENT_HEADER: [&str; 7] = [
    "provider",
    "merchant",
    "refund_no",
    "provider_refund_id",
    "refund_fee",
    "settlement_refund_fee",
    "refunded_at",
];

/// Writes refunds as the provider statement CSV; `refunded_at` in `tz`'s offset.
pub(crate) fn statement_csv(rows: &[PaidRefund], tz: Tz) -> Result<String, csv::Error> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(STATEMENT_HEADER)?;
    for row in rows {
        writer.write_record([
            row.provider.as_str(),
            &row.merchant,
            &row.refund_no,
            &row.provider_refund_id,
            &row.refund_fee.to_string(),
            &row.settlement_refund_fee.to_string(),
            &row.refunded_at
                .with_timezone(&tz)
                .to_rfc3339_opts(SecondsFormat::Millis, true),
        ])?;
    }
    let bytes = writer.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// FNV-1a: a stable hash (unlike `std`'s, which is seeded per process) so the same refund
/// number gets the same coupon decision in every run.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The coupon part of a refund: `max(1, refund_fee / 10)` for the chosen share of refund
/// numbers when the refund is at least 2 fen (so some cash is always refunded), else 0.
pub fn coupon_fee(refund_no: &str, refund_fee: i64, coupon_rate: f64) -> i64 {
    if refund_fee < 2 || coupon_rate <= 0.0 {
        return 0;
    }
    // The rate is a probability, not money: a float is fine here.
    let threshold = (coupon_rate.clamp(0.0, 1.0) * 10_000.0).round() as u64;
    if stable_hash(refund_no) % 10_000 >= threshold {
        return 0;
    }
    (refund_fee / 10).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(refund_no: &str, order_no: &str, total: i64, refund: i64) -> RefundAttempt {
        RefundAttempt {
            provider: Provider::ShengPay,
            merchant: "m".into(),
            refund_no: refund_no.into(),
            order_no: order_no.into(),
            total_fee: total,
            refund_fee: refund,
            coupon_rate: 0.0,
        }
    }

    impl Ledger {
        fn apply_now(&mut self, attempt: &RefundAttempt, now: DateTime<Utc>) -> Decision {
            self.apply(attempt, now, true)
        }
    }

    #[test]
    fn an_unsettled_refund_holds_the_order_but_is_paid_only_when_settled() {
        let mut ledger = Ledger::new();
        let accepted = Utc::now();
        assert!(matches!(
            ledger.apply(&attempt("R1", "O1", 100, 100), accepted, false),
            Decision::Paid(_)
        ));
        assert!(ledger.paid().is_empty());
        assert!(matches!(
            ledger.apply(&attempt("R2", "O1", 100, 1), accepted, false),
            Decision::Declined { .. }
        ));
        let later = accepted + chrono::TimeDelta::seconds(2);
        assert!(ledger.settle(Provider::ShengPay, "m", "R1", later));
        assert!(!ledger.settle(Provider::ShengPay, "m", "R1", later));
        assert!(!ledger.release(Provider::ShengPay, "m", "R1"));
        assert_eq!(ledger.paid().len(), 1);
        assert_eq!(ledger.paid()[0].refunded_at, later);
    }

    #[test]
    fn a_released_refund_frees_the_order_and_its_number_still_replays() {
        let mut ledger = Ledger::new();
        let now = Utc::now();
        ledger.apply(&attempt("R1", "O1", 100, 100), now, false);
        assert!(ledger.release(Provider::ShengPay, "m", "R1"));
        assert!(!ledger.settle(Provider::ShengPay, "m", "R1", now));
        assert!(matches!(
            ledger.apply(&attempt("R1", "O1", 100, 100), now, false),
            Decision::Replayed(_)
        ));
        assert!(matches!(
            ledger.apply(&attempt("R2", "O1", 100, 100), now, false),
            Decision::Paid(_)
        ));
        assert!(ledger.paid().is_empty());
    }

    #[test]
    fn a_refund_number_is_paid_once_and_replayed_after() {
        let mut ledger = Ledger::new();
        let now = Utc::now();
        let Decision::Paid(first) = ledger.apply_now(&attempt("R1", "O1", 100, 10), now) else {
            panic!("first attempt must pay");
        };
        let Decision::Replayed(again) = ledger.apply_now(&attempt("R1", "O1", 100, 10), now) else {
            panic!("repeat must replay");
        };
        assert_eq!(first, again);
        assert!(matches!(
            ledger.apply_now(&attempt("R1", "O1", 100, 11), now),
            Decision::Conflict
        ));
        assert_eq!(ledger.paid().len(), 1);
    }

    #[test]
    fn cumulative_refunds_of_an_order_never_exceed_its_total() {
        let mut ledger = Ledger::new();
        let now = Utc::now();
        assert!(matches!(
            ledger.apply_now(&attempt("R1", "O1", 100, 60), now),
            Decision::Paid(_)
        ));
        assert!(matches!(
            ledger.apply_now(&attempt("R2", "O1", 100, 41), now),
            Decision::Declined {
                code: "REFUND_AMOUNT_ERROR",
                ..
            }
        ));
        assert!(matches!(
            ledger.apply_now(&attempt("R3", "O1", 200, 10), now),
            Decision::Declined {
                code: "REFUND_AMOUNT_ERROR",
                ..
            }
        ));
        assert!(matches!(
            ledger.apply_now(&attempt("R4", "O1", 100, 40), now),
            Decision::Paid(_)
        ));
    }

    #[test]
    fn coupons_are_deterministic_and_leave_some_cash() {
        assert_eq!(coupon_fee("R1", 1, 1.0), 0);
        assert_eq!(coupon_fee("R1", 2, 1.0), 1);
        assert_eq!(coupon_fee("R1", 1000, 1.0), 100);
        assert_eq!(coupon_fee("R1", 1000, 0.0), 0);
        let chosen = (0..1000)
            .filter(|i| coupon_fee(&format!("R{i}"), 100, 0.3) > 0)
            .count();
        assert!((200..400).contains(&chosen), "{chosen}");
    }
}
