//! Outcome events (contract v1, DESIGN §6).
//!
//! This module owns the event payload. Events are written to the outbox in the transaction that
//! makes the transition (so an event exists exactly when its transition does) and relayed to
//! the `refunds.events` topic exchange with publisher confirms; consumers dedupe on
//! `refund_no` + `event`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::state::State;

/// The routing key and `event` field of each outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "refund.accepted")]
    Accepted,
    #[serde(rename = "refund.succeeded")]
    Succeeded,
    #[serde(rename = "refund.failed")]
    Failed,
    #[serde(rename = "refund.rejected")]
    Rejected,
    #[serde(rename = "refund.dead")]
    Dead,
    #[serde(rename = "refund.resolved")]
    Resolved,
}

impl EventKind {
    pub fn routing_key(self) -> &'static str {
        match self {
            EventKind::Accepted => "refund.accepted",
            EventKind::Succeeded => "refund.succeeded",
            EventKind::Failed => "refund.failed",
            EventKind::Rejected => "refund.rejected",
            EventKind::Dead => "refund.dead",
            EventKind::Resolved => "refund.resolved",
        }
    }

    /// The event a worker transition into `to` publishes, if any.
    pub fn for_state(to: State) -> Option<Self> {
        match to {
            State::Accepted => Some(EventKind::Accepted),
            State::Succeeded => Some(EventKind::Succeeded),
            State::Failed => Some(EventKind::Failed),
            State::Rejected => Some(EventKind::Rejected),
            State::Dead => Some(EventKind::Dead),
            State::Received | State::InFlight | State::RetryWait => None,
        }
    }
}

/// One outcome event, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeEvent {
    pub version: u8,
    pub event: EventKind,
    pub refund_no: String,
    pub order_no: Option<String>,
    pub provider: Option<String>,
    pub merchant: Option<String>,
    pub state: State,
    pub refund_fee: Option<i64>,
    pub settlement_refund_fee: Option<i64>,
    pub provider_refund_id: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub attempts: i32,
    pub occurred_at: String,
}

/// Formats an instant as RFC 3339 in the business time zone (e.g. `+08:00`).
pub fn format_time(at: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    at.with_timezone(&tz)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}
