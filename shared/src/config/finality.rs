//! Configuration of how jobs learn the provider's end: the notify listener (`[notify]`) and the
//! status query schedule (`[worker.query]`), DESIGN §5 and §9.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[notify]`: the listener ShengPay's notify callbacks reach (through the ingress). Its own
/// port, never the metrics port: it is the one port open to the outside.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Address of `POST /notify/shengpay`; empty turns the listener off (a worker that only
    /// serves WuPay, or a deployment where other replicas take the notifies).
    pub addr: String,
    /// Largest notify body read; a larger one is refused unread (413).
    pub max_body_bytes: usize,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:9465".into(),
            max_body_bytes: 16 * 1024,
        }
    }
}

/// `[worker.query]`: when jobs waiting for the provider's end are queried. The delays count
/// from the moment the wait began (the acceptance, or the death with an unknown outcome); after
/// the list, one query every `then_every_ms`; after `give_up_after_ms`, an accepted job goes
/// `dead`/`refund_abnormal` for an operator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    pub delays_ms: Vec<u64>,
    pub then_every_ms: u64,
    pub give_up_after_ms: u64,
    /// How often a worker looks for due queries.
    pub poll_ms: u64,
    /// How many due queries one look takes at most.
    pub batch: usize,
    /// Queries in flight at once in one worker.
    pub concurrency: usize,
    /// How long a worker holds a taken query before another may take it.
    pub lease_ms: u64,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            delays_ms: vec![60_000, 300_000, 600_000, 1_200_000, 1_800_000],
            then_every_ms: 3_600_000,
            give_up_after_ms: 7 * 24 * 3_600_000,
            poll_ms: 1_000,
            batch: 64,
            concurrency: 16,
            lease_ms: 30_000,
        }
    }
}

impl QueryConfig {
    /// When the query after `done` earlier ones is due, counted from the start of the wait:
    /// the first `delays_ms.len()` follow the list, then one every `then_every_ms`.
    pub fn due_after(&self, done: u32) -> Duration {
        let n = usize::try_from(done).unwrap_or(usize::MAX);
        let listed: u64 = self.delays_ms.iter().take(n.saturating_add(1)).sum();
        let extra = u64::try_from(n.saturating_add(1).saturating_sub(self.delays_ms.len()))
            .unwrap_or(u64::MAX);
        Duration::from_millis(listed.saturating_add(extra.saturating_mul(self.then_every_ms)))
    }

    pub fn give_up_after(&self) -> Duration {
        Duration::from_millis(self.give_up_after_ms)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    pub(super) fn validate(&self, http_timeout_ms: u64) -> Result<(), ConfigError> {
        if self.delays_ms.contains(&0) {
            return Err(ConfigError::invalid(
                "worker.query.delays_ms",
                "every delay must be at least 1 ms",
            ));
        }
        for (key, v) in [
            ("worker.query.then_every_ms", self.then_every_ms),
            ("worker.query.poll_ms", self.poll_ms),
            ("worker.query.give_up_after_ms", self.give_up_after_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if self.batch == 0 || self.concurrency == 0 {
            return Err(ConfigError::invalid(
                "worker.query.batch",
                "worker.query.batch and worker.query.concurrency must be at least 1",
            ));
        }
        if self.lease_ms <= http_timeout_ms {
            return Err(ConfigError::invalid(
                "worker.query.lease_ms",
                format!(
                    "must be longer than http.timeout_ms ({http_timeout_ms} ms): another worker \
                     may take the query when the lease ends"
                ),
            ));
        }
        Ok(())
    }
}

impl NotifyConfig {
    pub(super) fn validate(&self, metrics_addr: &str) -> Result<(), ConfigError> {
        if self.addr.is_empty() {
            return Ok(());
        }
        let Ok(addr) = self.addr.parse::<std::net::SocketAddr>() else {
            return Err(ConfigError::invalid(
                "notify.addr",
                format!("{:?} is not an address like 0.0.0.0:9465", self.addr),
            ));
        };
        if metrics_addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|m| m.port() == addr.port() && addr.port() != 0)
        {
            return Err(ConfigError::invalid(
                "notify.addr",
                "must not share worker.metrics_addr's port: the notify port is opened to the \
                 outside, the metrics port never",
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::invalid(
                "notify.max_body_bytes",
                "must be at least 1024",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_follow_the_listed_delays_then_the_steady_interval() {
        let q = QueryConfig {
            delays_ms: vec![60_000, 300_000],
            then_every_ms: 3_600_000,
            ..QueryConfig::default()
        };
        let mins = |n| q.due_after(n).as_secs() / 60;
        assert_eq!(mins(0), 1);
        assert_eq!(mins(1), 6);
        assert_eq!(mins(2), 66);
        assert_eq!(mins(3), 126);
        assert!(
            q.due_after(u32::MAX) > q.due_after(3),
            "saturates, never wraps"
        );
    }

    #[test]
    fn the_notify_port_may_not_be_the_metrics_port() {
        let n = NotifyConfig {
            addr: "0.0.0.0:9464".into(),
            ..NotifyConfig::default()
        };
        let e = n.validate("127.0.0.1:9464").unwrap_err();
        assert!(e.to_string().contains("notify.addr"), "{e}");
        assert!(NotifyConfig::default().validate("127.0.0.1:9464").is_ok());
    }

    #[test]
    fn a_query_lease_must_outlast_the_http_call() {
        let q = QueryConfig {
            lease_ms: 10_000,
            ..QueryConfig::default()
        };
        let e = q.validate(10_000).unwrap_err();
        assert!(e.to_string().contains("worker.query.lease_ms"), "{e}");
    }
}
