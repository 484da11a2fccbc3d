//! `[[limits]]` and `[worker.flow]`: how fast each merchant may be called, and how the worker
//! slows down for a throttling provider and pauses for one that is down (DESIGN §9, §11).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::job::ProviderKind;

/// One `[[limits]]` entry: a merchant's call budget, shared by every worker replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    pub provider: ProviderKind,
    pub merchant: String,
    /// Provider calls per second (refund calls, replays and status queries together).
    pub rate_per_sec: f64,
    /// Calls that may go at once after a quiet spell; any window of W seconds carries at most
    /// `rate_per_sec * W + burst` calls.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_burst() -> u32 {
    1
}

/// `[worker.flow]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FlowConfig {
    /// How far ahead a worker reserves call slots of a limited merchant: one database round
    /// trip serves the calls of this span. A worker that dies leaves at most this much of the
    /// budget unused.
    pub reserve_ahead_ms: u64,
    /// No slot is handed out sooner than this from now: the time a worker needs to take an
    /// executor slot and claim the job before the call's slot comes.
    pub slot_lead_ms: u64,
    /// A call goes no later than this after its slot (a slot missed by more, before the claim
    /// or after a late wake-up, is given up and the job asks again); the burst credit is kept
    /// this much short, so that the limit holds for the calls as sent, not only for the slots.
    pub slot_grace_ms: u64,
    /// How many jobs of one limited merchant ask for their slot at once in one worker; more
    /// queue behind them (refund numbers only), so that a merchant waiting for its budget holds
    /// neither the consumer nor executor slots.
    pub lane_queue: usize,
    /// After a throttled answer (`FREQUENCY_LIMITED`, `BIZERR_NEED_RETRY`, HTTP 429/503) a
    /// limited merchant's rate is halved; it climbs back to the full rate over this.
    pub recover_ms: u64,
    /// The rate is never cut below this share of the configured one, in thousandths.
    pub min_rate_permille: i32,
    /// The calls of a merchant a worker remembers to decide whether its provider is down.
    pub pause_window: usize,
    /// ... of which at least this many must have been made,
    pub pause_min_calls: usize,
    /// ... and at least this percentage failed in transport or with a 5xx, to pause it.
    pub pause_failure_percent: u8,
    /// While paused, one probe call goes out this often (from one replica); the pause ends
    /// when a probe is answered.
    pub probe_interval_ms: u64,
    /// How often a worker reads the pauses other replicas decided.
    pub poll_ms: u64,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            reserve_ahead_ms: 200,
            slot_lead_ms: 100,
            slot_grace_ms: 30,
            lane_queue: 512,
            recover_ms: 30_000,
            min_rate_permille: 100,
            pause_window: 20,
            pause_min_calls: 10,
            pause_failure_percent: 80,
            probe_interval_ms: 1_000,
            poll_ms: 1_000,
        }
    }
}

impl FlowConfig {
    pub fn reserve_ahead(&self) -> Duration {
        Duration::from_millis(self.reserve_ahead_ms)
    }

    pub fn slot_lead(&self) -> Duration {
        Duration::from_millis(self.slot_lead_ms)
    }

    pub fn slot_grace(&self) -> Duration {
        Duration::from_millis(self.slot_grace_ms)
    }

    pub fn recover(&self) -> Duration {
        Duration::from_millis(self.recover_ms)
    }

    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
    }

    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("worker.flow.reserve_ahead_ms", self.reserve_ahead_ms),
            ("worker.flow.probe_interval_ms", self.probe_interval_ms),
            ("worker.flow.poll_ms", self.poll_ms),
            ("worker.flow.lane_queue", self.lane_queue as u64),
            ("worker.flow.pause_window", self.pause_window as u64),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if !(1..=1000).contains(&self.min_rate_permille) {
            return Err(ConfigError::invalid(
                "worker.flow.min_rate_permille",
                "must be between 1 and 1000 (thousandths of the configured rate)",
            ));
        }
        if self.pause_min_calls == 0 || self.pause_min_calls > self.pause_window {
            return Err(ConfigError::invalid(
                "worker.flow.pause_min_calls",
                format!(
                    "must be between 1 and worker.flow.pause_window ({})",
                    self.pause_window
                ),
            ));
        }
        if !(1..=100).contains(&self.pause_failure_percent) {
            return Err(ConfigError::invalid(
                "worker.flow.pause_failure_percent",
                "must be between 1 and 100",
            ));
        }
        Ok(())
    }
}

/// Checks `[[limits]]` against the merchants configured: `merchants` lists (provider, name).
pub(super) fn validate_limits(
    limits: &[LimitConfig],
    merchants: &[(ProviderKind, &str)],
) -> Result<(), ConfigError> {
    for (i, l) in limits.iter().enumerate() {
        let key = |field: &str| format!("limits[{i}].{field}");
        if !l.rate_per_sec.is_finite() || l.rate_per_sec <= 0.0 || l.rate_per_sec > 1_000_000.0 {
            return Err(ConfigError::invalid(
                key("rate_per_sec"),
                format!(
                    "{} is not a rate: calls per second, above 0 and at most 1000000",
                    l.rate_per_sec
                ),
            ));
        }
        if l.burst == 0 {
            return Err(ConfigError::invalid(key("burst"), "must be at least 1"));
        }
        if !merchants
            .iter()
            .any(|(p, m)| *p == l.provider && *m == l.merchant)
        {
            return Err(ConfigError::invalid(
                key("merchant"),
                format!(
                    "no [[{}.merchants]] entry has merchant = {:?}",
                    l.provider, l.merchant
                ),
            ));
        }
        if limits[..i]
            .iter()
            .any(|o| o.provider == l.provider && o.merchant == l.merchant)
        {
            return Err(ConfigError::invalid(
                key("merchant"),
                format!(
                    "{} merchant {:?} has two [[limits]] entries",
                    l.provider, l.merchant
                ),
            ));
        }
    }
    Ok(())
}
