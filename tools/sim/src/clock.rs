//! The simulator's notion of "now", which tests may shift.
//!
//! Business dates split at midnight in the statement time zone; a test that wants refunds on
//! both sides of midnight sets the clock just before it instead of waiting for it. The clock
//! keeps running from the time set, so refunds paid after one another still get increasing
//! timestamps.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, TimeDelta, Utc};

#[derive(Default)]
pub(crate) struct Clock {
    /// Offset from the real clock, in microseconds.
    offset_us: AtomicI64,
}

impl Clock {
    pub(crate) fn now(&self) -> DateTime<Utc> {
        let offset = TimeDelta::microseconds(self.offset_us.load(Ordering::Relaxed));
        let real = Utc::now();
        real.checked_add_signed(offset).unwrap_or(real)
    }

    /// Makes "now" equal `now`; `None` returns to the real clock.
    pub(crate) fn set_now(&self, now: Option<DateTime<Utc>>) {
        let offset = now
            .and_then(|t| (t - Utc::now()).num_microseconds())
            .unwrap_or(0);
        self.offset_us.store(offset, Ordering::Relaxed);
    }

    pub(crate) fn offset_ms(&self) -> i64 {
        self.offset_us.load(Ordering::Relaxed) / 1000
    }
}
