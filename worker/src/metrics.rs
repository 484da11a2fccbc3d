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

/// Counts one state transition.
pub fn transition(from: &str, to: &str) {
    metrics::counter!(TRANSITIONS, "from" => from.to_owned(), "to" => to.to_owned()).increment(1);
}
