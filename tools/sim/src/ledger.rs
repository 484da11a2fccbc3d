//! What the simulated providers have paid: the core of the fake.
//!
//! A real provider's value to the system under test is that it pays each refund number at most
//! once and never more than an order's total; this module is where that holds, for both
//! providers alike, inside one lock so concurrent retries of one refund cannot both pay.
//! Money is integer fen (`i64`) with checked arithmetic, never floats.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use super::Provider;

/// The upper bound on any amount, as in the request message contract.
pub const MAX_FEE: i64 = 100_000_000_000;

/// One refund the simulator paid.
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
    /// Paid now.
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

pub(crate) struct Ledger {
    paid: Vec<PaidRefund>,
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
            paid: Vec::new(),
            by_refund: HashMap::new(),
            orders: HashMap::new(),
            next_refund_seq: start,
            next_transaction_seq: start,
            next_coupon_seq: start,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.paid.clear();
        self.by_refund.clear();
        self.orders.clear();
    }

    pub(crate) fn paid(&self) -> &[PaidRefund] {
        &self.paid
    }

    /// Pays `attempt` unless that would pay a refund number twice or exceed the order.
    pub(crate) fn apply(&mut self, attempt: &RefundAttempt, now: DateTime<Utc>) -> Decision {
        let key = (
            attempt.provider,
            attempt.merchant.clone(),
            attempt.refund_no.clone(),
        );
        if let Some(&index) = self.by_refund.get(&key) {
            let first = &self.paid[index];
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
        self.by_refund.insert(key, self.paid.len());
        self.paid.push(paid.clone());
        Decision::Paid(paid)
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

    #[test]
    fn a_refund_number_is_paid_once_and_replayed_after() {
        let mut ledger = Ledger::new();
        let now = Utc::now();
        let Decision::Paid(first) = ledger.apply(&attempt("R1", "O1", 100, 10), now) else {
            panic!("first attempt must pay");
        };
        let Decision::Replayed(again) = ledger.apply(&attempt("R1", "O1", 100, 10), now) else {
            panic!("repeat must replay");
        };
        assert_eq!(first, again);
        assert!(matches!(
            ledger.apply(&attempt("R1", "O1", 100, 11), now),
            Decision::Conflict
        ));
        assert_eq!(ledger.paid().len(), 1);
    }

    #[test]
    fn cumulative_refunds_of_an_order_never_exceed_its_total() {
        let mut ledger = Ledger::new();
        let now = Utc::now();
        assert!(matches!(
            ledger.apply(&attempt("R1", "O1", 100, 60), now),
            Decision::Paid(_)
        ));
        assert!(matches!(
            ledger.apply(&attempt("R2", "O1", 100, 41), now),
            Decision::Declined {
                code: "REFUND_AMOUNT_ERROR",
                ..
            }
        ));
        assert!(matches!(
            ledger.apply(&attempt("R3", "O1", 200, 10), now),
            Decision::Declined {
                code: "REFUND_AMOUNT_ERROR",
                ..
            }
        ));
        assert!(matches!(
            ledger.apply(&attempt("R4", "O1", 100, 40), now),
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
