//! The arrival timeline: provider requests per merchant per second of the simulator's clock.
//!
//! The call log is capped (`call_log_capacity`) so that a long benchmark cannot exhaust
//! memory, which makes it useless for "how fast was this merchant called, second by second,
//! over the whole run". This keeps one pair of counters per (provider, merchant, second)
//! instead: it grows with merchants × seconds only, never with calls, and the hot path is one
//! hash-map increment under a mutex. `refund-bench` reads it through `GET /_sim/rates` to check
//! a per-merchant rate limit from the provider's side (S6) and to compare merchants' rates
//! before and during another merchant's outage (S7).
//!
//! Every request that reached a provider endpoint and could be read counts, at its arrival,
//! whatever it was then served (a fault, a rejection, a replay): the provider "saw" it. Refund
//! calls and ShengPay status queries are counted apart, and so are the requests a merchant's
//! rate limit refused ([`crate::limits`]); notifies are not requests to the simulator and are
//! not counted.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Provider;
use super::faults::Operation;

/// One merchant's requests during one second of the simulator's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateWindow {
    pub provider: Provider,
    /// Our merchant name; `None` for requests that named no known merchant.
    pub merchant: Option<String>,
    /// The second, as seconds since the Unix epoch: requests that arrived in
    /// `[second, second + 1)`.
    pub second: i64,
    /// Every request of that second: `refunds + queries`.
    pub calls: u64,
    /// Refund calls.
    pub refunds: u64,
    /// ShengPay status queries (always 0 for WuPay).
    pub queries: u64,
    /// Of `calls`, refused by the merchant's `[[limits]]` entry (`FREQUENCY_LIMITED` / 429).
    pub limited: u64,
}

/// A merchant by index into the simulator's account list of its provider: no name is copied on
/// the hot path, names are looked up when the timeline is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    provider: Provider,
    merchant: Option<usize>,
    second: i64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    refunds: u64,
    queries: u64,
    limited: u64,
}

#[derive(Default)]
pub(crate) struct RateBook {
    counts: HashMap<Key, Counts>,
}

impl RateBook {
    /// Counts one request of `operation` that arrived during unix second `second`; `limited`
    /// when the merchant's rate limit refused it.
    pub(crate) fn record(
        &mut self,
        provider: Provider,
        merchant: Option<usize>,
        operation: Operation,
        second: i64,
        limited: bool,
    ) {
        let counts = self
            .counts
            .entry(Key {
                provider,
                merchant,
                second,
            })
            .or_default();
        if operation == Operation::Query {
            counts.queries += 1;
        } else {
            counts.refunds += 1;
        }
        counts.limited += u64::from(limited);
    }

    pub(crate) fn clear(&mut self) {
        self.counts.clear();
    }

    /// The timeline, ordered by provider, merchant index and second; only the merchant named
    /// `merchant` and/or of `provider` when given. `name` turns an account index into our
    /// merchant name.
    pub(crate) fn windows<'a>(
        &self,
        merchant: Option<&str>,
        provider: Option<Provider>,
        name: impl Fn(Provider, usize) -> Option<&'a str>,
    ) -> Vec<RateWindow> {
        let mut keys: Vec<(&Key, &Counts)> = self
            .counts
            .iter()
            .filter(|(k, _)| provider.is_none_or(|p| p == k.provider))
            .collect();
        keys.sort_by_key(|(k, _)| **k);
        keys.into_iter()
            .filter_map(|(k, c)| {
                let merchant_name = k.merchant.and_then(|i| name(k.provider, i));
                if let Some(want) = merchant
                    && merchant_name != Some(want)
                {
                    return None;
                }
                Some(RateWindow {
                    provider: k.provider,
                    merchant: merchant_name.map(str::to_owned),
                    second: k.second,
                    calls: c.refunds + c.queries,
                    refunds: c.refunds,
                    queries: c.queries,
                    limited: c.limited,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: Provider, i: usize) -> Option<&'static str> {
        match (p, i) {
            (Provider::WuPay, 0) => Some("wu-a"),
            (Provider::WuPay, 1) => Some("wu-b"),
            (Provider::ShengPay, 0) => Some("sp-a"),
            _ => None,
        }
    }

    #[test]
    fn requests_are_counted_per_merchant_and_second_refunds_apart_from_queries() {
        let mut book = RateBook::default();
        for _ in 0..3 {
            book.record(Provider::WuPay, Some(0), Operation::Refund, 100, false);
        }
        book.record(Provider::WuPay, Some(0), Operation::Refund, 101, true);
        book.record(Provider::WuPay, Some(1), Operation::Refund, 100, false);
        book.record(Provider::ShengPay, Some(0), Operation::Refund, 100, false);
        book.record(Provider::ShengPay, Some(0), Operation::Query, 100, false);
        book.record(Provider::ShengPay, None, Operation::Refund, 100, false);

        let a = book.windows(Some("wu-a"), None, names);
        let seconds: Vec<(i64, u64)> = a.iter().map(|w| (w.second, w.calls)).collect();
        assert_eq!(seconds, [(100, 3), (101, 1)]);
        assert_eq!((a[0].limited, a[1].limited), (0, 1));

        let sp = book.windows(None, Some(Provider::ShengPay), names);
        assert_eq!(sp.len(), 2, "{sp:?}");
        let known = sp
            .iter()
            .find(|w| w.merchant.as_deref() == Some("sp-a"))
            .expect("sp-a counted");
        assert_eq!((known.refunds, known.queries, known.calls), (1, 1, 2));
        assert!(sp.iter().any(|w| w.merchant.is_none()), "unknown merchant");

        assert_eq!(book.windows(None, None, names).len(), 5);
        assert!(book.windows(Some("nobody"), None, names).is_empty());
        book.clear();
        assert!(book.windows(None, None, names).is_empty());
    }
}
