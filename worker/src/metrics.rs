//! Metric names, in one place so dashboards and code agree.

pub const TRANSITIONS: &str = "refunds_transitions_total";
pub const INTAKE: &str = "refunds_intake_total";
pub const PROVIDER_CALLS: &str = "refunds_provider_calls_total";
pub const PROVIDER_LATENCY: &str = "refunds_provider_call_seconds";
pub const RETRIES: &str = "refunds_retries_total";
pub const DEAD_LETTERS: &str = "refunds_dead_letters_total";
pub const IN_FLIGHT: &str = "refunds_in_flight_jobs";
pub const OLDEST_OPEN_AGE: &str = "refunds_oldest_open_job_age_seconds";
pub const OUTBOX_LAG: &str = "refunds_outbox_lag_seconds";
pub const OUTBOX_PUBLISHED: &str = "refunds_outbox_published_total";
pub const PREFETCH_IN_USE: &str = "refunds_consumer_unacked_deliveries";
pub const FENCED: &str = "refunds_fenced_outcomes_total";
pub const CONFLICTS: &str = "refunds_conflicts_total";
pub const BROKER_CONNECTED: &str = "refunds_broker_connected";
pub const WRITE_BATCH: &str = "refunds_write_batch_size";
pub const WRITE_SECONDS: &str = "refunds_write_seconds";
pub const NOTIFIES: &str = "refunds_notifies_total";
pub const STATUS_QUERIES: &str = "refunds_status_queries_total";
pub const AWAITING_PROVIDER: &str = "refunds_awaiting_provider_jobs";
pub const JOBS: &str = "refunds_jobs";
pub const DEAD_JOBS: &str = "refunds_dead_jobs";
pub const OLDEST_PROVIDER_WAIT: &str = "refunds_oldest_provider_wait_seconds";
pub const DLQ_DEPTH: &str = "refunds_dlq_depth";
pub const BUILD_INFO: &str = "refunds_build_info";
pub const MERCHANT_PAUSED: &str = "refunds_merchant_paused";
pub const BUDGET_RATE: &str = "refunds_merchant_rate_permille";
pub const BUDGET_WAIT: &str = "refunds_budget_wait_seconds";
pub const BUDGET_WAITING: &str = "refunds_budget_waiting_jobs";
pub const THROTTLED: &str = "refunds_throttled_calls_total";
pub const PAUSES: &str = "refunds_merchant_pauses_total";
pub const END_TO_END: &str = "refunds_end_to_end_seconds";

/// Buckets of [`END_TO_END`]: a refund ends in a second (WuPay) or after the provider's
/// asynchronous processing (ShengPay: minutes, up to a day of status queries).
pub const END_TO_END_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
];

/// When a refund was requested, for [`ended`]: its `requested_at` when the order system set
/// it and it is not after the intake, else when it was taken in.
pub fn published_at(
    request: &shared::job::RefundRequest,
    created_at: chrono::DateTime<chrono::Utc>,
) -> chrono::DateTime<chrono::Utc> {
    request
        .requested_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .filter(|t| *t <= created_at)
        .unwrap_or(created_at)
}

/// Records a refund's end (`succeeded` or `failed`; other states are not ends): from its
/// request ([`published_at`]) to now.
pub fn ended(
    provider: shared::job::ProviderKind,
    published: chrono::DateTime<chrono::Utc>,
    to: shared::state::State,
) {
    use shared::state::State;
    if !matches!(to, State::Succeeded | State::Failed) {
        return;
    }
    let secs = (chrono::Utc::now() - published).as_seconds_f64().max(0.0);
    metrics::histogram!(END_TO_END, "provider" => provider.as_str(), "state" => to.as_str())
        .record(secs);
}

/// Registers the help text and unit of every metric (the `# HELP` lines of `/metrics`), and
/// sets `refunds_build_info`. Called once, when the recorder is installed: a metric described
/// here shows its help from its first sample on.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        TRANSITIONS,
        "Job state transitions made by this process, by from and to state."
    );
    describe_counter!(
        INTAKE,
        "Messages taken off the request queue, by intake result."
    );
    describe_counter!(
        PROVIDER_CALLS,
        "Refund calls to the providers, by provider, merchant and outcome class."
    );
    describe_histogram!(
        PROVIDER_LATENCY,
        Unit::Seconds,
        "Refund call latency, by provider, merchant and outcome class."
    );
    describe_counter!(
        RETRIES,
        "Refund calls scheduled again after a retryable outcome, by provider."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Jobs this process moved to dead, by cause (a counter: refunds_dlq_depth is what is outstanding)."
    );
    describe_gauge!(IN_FLIGHT, "Provider calls this process has open now.");
    describe_histogram!(
        END_TO_END,
        Unit::Seconds,
        "From a refund's request (requested_at, else its intake) to its end (succeeded or failed), by provider and state."
    );
    describe_gauge!(
        MERCHANT_PAUSED,
        "1 while a merchant's calls are paused because its provider is down (probing), else 0; by provider and merchant."
    );
    describe_gauge!(
        BUDGET_RATE,
        "The share of a limited merchant's configured rate in force, in thousandths (below 1000 after the provider throttled us); by provider and merchant."
    );
    describe_histogram!(
        BUDGET_WAIT,
        Unit::Seconds,
        "How long a call waited for its merchant's budget (rate limit), by provider and merchant."
    );
    describe_gauge!(
        BUDGET_WAITING,
        "Jobs waiting in this process for their merchant's budget, by provider and merchant (at worker.flow.lane_queue the rest wait in the database)."
    );
    describe_counter!(
        THROTTLED,
        "Provider calls answered 'too many requests' (FREQUENCY_LIMITED, BIZERR_NEED_RETRY, HTTP 429/503), by provider and merchant."
    );
    describe_counter!(
        PAUSES,
        "Times this process paused a merchant whose provider was failing, by provider and merchant."
    );
    describe_gauge!(
        OLDEST_OPEN_AGE,
        Unit::Seconds,
        "Age of the oldest job not in a final state, as of the last sweep."
    );
    describe_gauge!(
        OUTBOX_LAG,
        Unit::Seconds,
        "Age of the oldest outcome event not yet published to the events exchange."
    );
    describe_counter!(
        OUTBOX_PUBLISHED,
        "Outcome events published to the events exchange."
    );
    describe_gauge!(
        PREFETCH_IN_USE,
        "Deliveries the consumer holds unacknowledged (at most the prefetch)."
    );
    describe_counter!(
        FENCED,
        "Outcomes discarded because another worker had taken the job over (its lease had run out)."
    );
    describe_counter!(
        CONFLICTS,
        "Requests that reused a refund_no with other content (stored, never sent)."
    );
    describe_gauge!(
        BROKER_CONNECTED,
        "1 while the broker connection is up, else 0."
    );
    describe_histogram!(WRITE_BATCH, "Jobs per batched database write, by kind.");
    describe_histogram!(
        WRITE_SECONDS,
        Unit::Seconds,
        "Duration of a batched database write, by kind."
    );
    describe_counter!(
        NOTIFIES,
        "ShengPay notifies received, by outcome or effect."
    );
    describe_counter!(
        STATUS_QUERIES,
        "Status queries made, by provider, merchant and outcome class."
    );
    describe_gauge!(
        AWAITING_PROVIDER,
        "Jobs waiting for the provider's word (accepted, or dead with an unknown outcome and still queried), as of the last full sweep."
    );
    describe_gauge!(
        DEAD_JOBS,
        "Dead jobs outstanding in the database, not discarded, by cause, as of the last full sweep (use max)."
    );
    describe_gauge!(
        OLDEST_PROVIDER_WAIT,
        Unit::Seconds,
        "How long the job that has waited longest for the provider's notify or status query answer has waited (0: none waits), as of the last full sweep."
    );
    describe_gauge!(
        JOBS,
        "Jobs by state in the database, as of the last full sweep (the same figure from every replica: aggregate with max, not sum)."
    );
    describe_gauge!(
        DLQ_DEPTH,
        "Dead jobs and poison messages outstanding in the database, not discarded, as of the last full sweep (every replica reports it: use max)."
    );
    describe_gauge!(BUILD_INFO, "1, labelled with this build's version.");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Counts one state transition.
pub fn transition(from: &str, to: &str) {
    metrics::counter!(TRANSITIONS, "from" => from.to_owned(), "to" => to.to_owned()).increment(1);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Every metric name this module defines, read from its own source.
    fn defined() -> BTreeSet<String> {
        let re = regex::Regex::new(r#"pub const [A-Z_]+: &str = "(refunds_[a-z_]+)";"#).unwrap();
        re.captures_iter(include_str!("metrics.rs"))
            .map(|c| c[1].to_owned())
            .collect()
    }

    /// The metric names a file refers to (histogram series named by their metric).
    fn used(text: &str) -> BTreeSet<String> {
        let re = regex::Regex::new(r"refunds_[a-z_]+").unwrap();
        re.find_iter(text)
            .map(|m| {
                let n = m.as_str();
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| n.strip_suffix(s))
                    .unwrap_or(n)
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn the_dashboard_and_the_alerts_only_use_metrics_the_worker_exports() {
        let defined = defined();
        assert!(defined.len() > 20, "{defined:?}");
        let dashboard = include_str!("../../monitoring/grafana-dashboard.json");
        let v: serde_json::Value = serde_json::from_str(dashboard).unwrap();
        assert!(v["panels"].as_array().is_some_and(|p| !p.is_empty()));
        let alerts = include_str!("../../monitoring/alerts.yml");
        for (file, text) in [
            ("grafana-dashboard.json", dashboard),
            ("alerts.yml", alerts),
        ] {
            // A name ending in `_` is a comment's wildcard (`refunds_oldest_*`).
            let unknown: Vec<_> = used(text)
                .into_iter()
                .filter(|n| !defined.contains(n) && !n.ends_with('_'))
                .collect();
            assert!(unknown.is_empty(), "{file} uses {unknown:?}");
        }
    }
}
