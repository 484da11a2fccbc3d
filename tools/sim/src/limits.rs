//! The providers' own per-merchant rate limits (`[[limits]]` in the simulator's config).
//!
//! Real providers throttle a merchant that calls too fast: ShengPay answers `resultCode FAIL`
//! with `errCode FREQUENCY_LIMITED`, WuPay's gateway an HTTP 429 with no body. A limit here is a
//! token bucket per merchant (`rate_per_sec` refilled, at most `burst` kept) on the real
//! monotonic clock — never the shiftable business clock, so moving "now" for a statement test
//! cannot refill or drain a bucket. A request beyond the limit is refused before any fault rule
//! is looked at: the front door throttles it, nothing behind it runs.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Provider;

/// The error code ShengPay throttles with (WuPay's is the HTTP status).
pub const FREQUENCY_LIMITED: &str = "FREQUENCY_LIMITED";

/// One `[[limits]]` entry of the simulator's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimLimit {
    pub provider: Provider,
    /// Our merchant name, as in `[[shengpay.merchants]]` / `[[wupay.merchants]]`.
    pub merchant: String,
    /// Requests (refund calls and status queries together) admitted per second, sustained.
    pub rate_per_sec: f64,
    /// Requests admitted at once after a quiet spell; at least 1.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_burst() -> u32 {
    1
}

impl SimLimit {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !self.rate_per_sec.is_finite() || self.rate_per_sec <= 0.0 {
            return Err(format!(
                "limits: {} rate_per_sec must be a positive number, got {}",
                self.merchant, self.rate_per_sec
            ));
        }
        if self.burst == 0 {
            return Err(format!(
                "limits: {} burst must be at least 1",
                self.merchant
            ));
        }
        Ok(())
    }
}

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

/// The buckets, by provider and merchant index (no name copied on the hot path).
pub(crate) struct Limiter {
    buckets: HashMap<(Provider, usize), Bucket>,
}

impl Limiter {
    /// `limits` with each merchant name turned into its account index by `index`; a name
    /// `index` does not know is refused.
    pub(crate) fn new(
        limits: &[SimLimit],
        index: impl Fn(Provider, &str) -> Option<usize>,
    ) -> Result<Self, String> {
        let mut buckets = HashMap::new();
        let now = Instant::now();
        for l in limits {
            l.validate()?;
            let i = index(l.provider, &l.merchant).ok_or_else(|| {
                format!(
                    "limits: {} is not a configured {} merchant",
                    l.merchant, l.provider
                )
            })?;
            let bucket = Bucket {
                rate: l.rate_per_sec,
                burst: f64::from(l.burst),
                tokens: f64::from(l.burst),
                at: now,
            };
            if buckets.insert((l.provider, i), bucket).is_some() {
                return Err(format!(
                    "limits: {} {} is limited twice",
                    l.provider, l.merchant
                ));
            }
        }
        Ok(Limiter { buckets })
    }

    /// Whether a request of this merchant arriving `now` is within its limit (and takes a
    /// token if so). Merchants without a limit are always admitted.
    pub(crate) fn admit(
        &mut self,
        provider: Provider,
        merchant: Option<usize>,
        now: Instant,
    ) -> bool {
        let Some(b) = merchant.and_then(|i| self.buckets.get_mut(&(provider, i))) else {
            return true;
        };
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * b.rate).min(b.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limit(rate: f64, burst: u32) -> SimLimit {
        SimLimit {
            provider: Provider::WuPay,
            merchant: "wu-a".into(),
            rate_per_sec: rate,
            burst,
        }
    }

    fn index(p: Provider, m: &str) -> Option<usize> {
        (p == Provider::WuPay && m == "wu-a").then_some(0)
    }

    #[test]
    fn a_burst_then_the_rate_and_other_merchants_untouched() {
        let mut l = Limiter::new(&[limit(10.0, 3)], index).expect("valid");
        let t0 = Instant::now();
        let admitted = (0..5)
            .filter(|_| l.admit(Provider::WuPay, Some(0), t0))
            .count();
        assert_eq!(admitted, 3, "the burst, then refused");
        // 10/s: one token per 100 ms.
        assert!(l.admit(Provider::WuPay, Some(0), t0 + Duration::from_millis(100)));
        assert!(!l.admit(Provider::WuPay, Some(0), t0 + Duration::from_millis(150)));
        // A long quiet spell refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        let admitted = (0..10)
            .filter(|_| l.admit(Provider::WuPay, Some(0), later))
            .count();
        assert_eq!(admitted, 3);
        assert!((0..100).all(|_| l.admit(Provider::WuPay, Some(1), t0)));
        assert!((0..100).all(|_| l.admit(Provider::ShengPay, Some(0), t0)));
        assert!(
            l.admit(Provider::WuPay, None, t0),
            "unknown merchants are not limited"
        );
    }

    #[test]
    fn bad_limits_are_refused_with_a_reason() {
        let unknown = SimLimit {
            merchant: "nobody".into(),
            ..limit(1.0, 1)
        };
        for (bad, why) in [
            (vec![limit(0.0, 1)], "rate_per_sec"),
            (vec![limit(f64::NAN, 1)], "rate_per_sec"),
            (vec![limit(1.0, 0)], "burst"),
            (vec![unknown], "not a configured"),
            (vec![limit(1.0, 1), limit(2.0, 1)], "twice"),
        ] {
            let error = Limiter::new(&bad, index).err().unwrap_or_default();
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }
}
