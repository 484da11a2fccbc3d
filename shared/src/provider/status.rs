//! What a provider says about a refund after accepting it: its notify callback and its status
//! query (DESIGN §5, "Asynchronous result").
//!
//! These types are the contract between a provider client that reads such an answer and the
//! store that applies it: a [`StatusReport`] has already been verified and shown to name the
//! refund it is applied to, so the store only decides how far it moves the job.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// How the provider says a refund stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundStatus {
    /// Still being processed: the job waits in `accepted`.
    Processing,
    /// The money moved: `succeeded`, booked with this settlement, dated by the success time.
    Success {
        provider_refund_id: String,
        settlement_refund_fee: i64,
        success_time: DateTime<Utc>,
    },
    /// Closed without refunding (ShengPay `REFUND_CLOSE`): `failed`, the order amount is free.
    Closed,
    /// The refund could not be credited (ShengPay `CHANGE`): the money needs another route,
    /// `dead`/`refund_abnormal` for an operator.
    Change,
}

impl RefundStatus {
    /// The provider's name for it, as stored with the notify and the query schedule.
    pub fn as_str(&self) -> &'static str {
        match self {
            RefundStatus::Processing => "PROCESSING",
            RefundStatus::Success { .. } => "SUCCESS",
            RefundStatus::Closed => "REFUND_CLOSE",
            RefundStatus::Change => "CHANGE",
        }
    }
}

/// A verified statement of the provider about one of our refunds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub refund_no: String,
    pub status: RefundStatus,
    /// The answer as it came, for the evidence.
    pub raw: String,
}

/// What a status query came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryOutcome {
    /// A verified answer naming the refund and how it stands.
    Status(StatusReport),
    /// A verified answer that the provider holds no refund of this number: the refund call
    /// never reached it (or was refused before it was recorded), so nothing was paid.
    NotFound { raw: String },
    /// No usable answer (transport failure, refusal, an answer that does not verify or is
    /// about another refund): ask again on the schedule.
    Unanswered { error: String, raw: Option<String> },
}

impl QueryOutcome {
    /// Short class name for metrics and logs.
    pub fn class(&self) -> &'static str {
        match self {
            QueryOutcome::Status(_) => "status",
            QueryOutcome::NotFound { .. } => "not_found",
            QueryOutcome::Unanswered { .. } => "unanswered",
        }
    }
}

/// One status query as made: its outcome, what was sent (secrets redacted), the HTTP status
/// if one came back, and how long it took.
#[derive(Debug, Clone)]
pub struct QueryRecord {
    pub outcome: QueryOutcome,
    pub request_redacted: String,
    pub http_status: Option<u16>,
    pub latency: Duration,
}

/// Why a notify is not applied. Either way it gets a non-2xx answer, so that ShengPay sends it
/// again: a notify we could not verify may be a genuine one damaged on the way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyRefusal {
    /// Not one signed JSON object that verifies with the provider's key.
    #[error("not verified: {0}")]
    Unverified(String),
    /// Verified, but not about this refund as we hold it (another refund, merchant or amount),
    /// or without what its status needs.
    #[error("not about this refund: {0}")]
    NotOurs(String),
    /// This provider sends no notifies.
    #[error("this provider sends no notifies")]
    Unsupported,
}
