//! Outcome events (contract v1, DESIGN §6; every shape and code in docs/events.md).
//!
//! This module owns the event payload. Events are written to the outbox in the transaction that
//! makes the transition (so an event exists exactly when its transition does) and relayed to
//! the `refunds.events` topic exchange with publisher confirms, at least once. Each event gets
//! its `event_id` here, when it is built, and the relay sends the stored payload as it is: a
//! copy sent again after a crash carries the same id, which is what consumers dedupe on.
//!
//! Two families share one shape. `refund.*` events say what became of a refund: its job's
//! transitions, and a refused request whose `refund_no` no job has (that refund stands
//! rejected). `request.refused` answers a message that did not create a job and says nothing
//! about any job's state: a conflict, a body with no readable `refund_no`, a malformed copy of
//! a live job's request, a message the database could not store. Its `state` is null, so no
//! consumer keyed on `refund_no` + state can take it for the job's.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::job::{Readable, Rejection};
use crate::state::State;

/// The most of a rejection's `field` an event carries (an unknown field's name is the
/// sender's, of any length).
const MAX_FIELD_CHARS: usize = 128;
/// The most of a rejection's reason an event carries (serde echoes unknown values whole).
const MAX_MESSAGE_CHARS: usize = 512;

/// The routing key and `event` field of each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The provider took the refund and will say later how it ended.
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
    /// An operator corrected a final refund's booking after the fact, with the provider's
    /// evidence: it now stands as `state` says.
    #[serde(rename = "refund.corrected")]
    Corrected,
    /// A request message that did not create a job (see the module docs).
    #[serde(rename = "request.refused")]
    Refused,
}

impl EventKind {
    /// Every kind, for tests and docs.
    pub const ALL: [EventKind; 8] = [
        EventKind::Accepted,
        EventKind::Succeeded,
        EventKind::Failed,
        EventKind::Rejected,
        EventKind::Dead,
        EventKind::Resolved,
        EventKind::Corrected,
        EventKind::Refused,
    ];

    pub fn routing_key(self) -> &'static str {
        match self {
            EventKind::Accepted => "refund.accepted",
            EventKind::Succeeded => "refund.succeeded",
            EventKind::Failed => "refund.failed",
            EventKind::Rejected => "refund.rejected",
            EventKind::Dead => "refund.dead",
            EventKind::Resolved => "refund.resolved",
            EventKind::Corrected => "refund.corrected",
            EventKind::Refused => "request.refused",
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

/// One event, as published. Every key is always present (null when it does not apply), so a
/// consumer with a strict schema reads every event with one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeEvent {
    pub version: u8,
    /// A UUID v4, made when the event is built; the same on every copy the relay sends.
    pub event_id: String,
    pub event: EventKind,
    /// Null only on a `request.refused` whose message had no readable `refund_no`.
    pub refund_no: Option<String>,
    pub order_no: Option<String>,
    pub provider: Option<String>,
    pub merchant: Option<String>,
    /// The job's state after the event; null on `request.refused`.
    pub state: Option<State>,
    pub refund_fee: Option<i64>,
    pub settlement_refund_fee: Option<i64>,
    pub provider_refund_id: Option<String>,
    /// On a job's events the provider's code (or ours: `LEASE_EXPIRED`, `MANUAL`, `CORRECTED`); on
    /// `refund.rejected` and `request.refused` one of [`crate::job::ErrorCode`].
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The request field a refusal is about; null for the message as a whole and on every
    /// other event.
    pub field: Option<String>,
    /// Why the job is dead, on `refund.dead` only.
    pub cause: Option<String>,
    pub attempts: i32,
    /// When the event was built, RFC 3339 with milliseconds in the configured time zone.
    pub occurred_at: String,
}

impl OutcomeEvent {
    /// The answer to a refused request message: `refund.rejected` (a readable `refund_no` that
    /// no job has) or `request.refused` (anything else), with what could be read of it.
    pub fn refusal(
        kind: EventKind,
        read: &Readable,
        rejection: &Rejection,
        tz: chrono_tz::Tz,
    ) -> Self {
        let field = rejection.json_field();
        let message = match field {
            Some(_) => rejection.to_string(),
            None => rejection.reason.clone(),
        };
        Self {
            version: 1,
            event_id: new_event_id(),
            event: kind,
            refund_no: read.refund_no.clone(),
            order_no: read.order_no.clone(),
            provider: read.provider.map(|p| p.as_str().to_owned()),
            merchant: read.merchant.clone(),
            state: (kind == EventKind::Rejected).then_some(State::Rejected),
            refund_fee: read.refund_fee,
            settlement_refund_fee: None,
            provider_refund_id: None,
            error_code: Some(rejection.code.as_str().to_owned()),
            error_message: Some(cut(&message, MAX_MESSAGE_CHARS)),
            field: field.map(|f| cut(f, MAX_FIELD_CHARS)),
            cause: None,
            attempts: 0,
            occurred_at: format_time(Utc::now(), tz),
        }
    }
}

/// A fresh event id (UUID v4, hyphenated, lower case).
pub fn new_event_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// Formats an instant as RFC 3339 with milliseconds in the business time zone (e.g.
/// `2026-11-21T10:00:03.123+08:00`).
pub fn format_time(at: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    at.with_timezone(&tz)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

/// `s` cut to `max` characters, marked with `…` when cut.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{ErrorCode, ProviderKind};

    #[test]
    fn occurred_at_has_milliseconds_and_the_zones_offset() {
        let at = DateTime::parse_from_rfc3339("2026-11-21T02:00:03.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            format_time(at, chrono_tz::Asia::Shanghai),
            "2026-11-21T10:00:03.123+08:00"
        );
        let whole = DateTime::parse_from_rfc3339("2026-11-21T02:00:03Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            format_time(whole, chrono_tz::UTC),
            "2026-11-21T02:00:03.000+00:00"
        );
    }

    #[test]
    fn every_kind_serialises_as_its_routing_key_and_accepted_is_refund_accepted() {
        for kind in EventKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.routing_key())
            );
        }
        assert_eq!(EventKind::Accepted.routing_key(), "refund.accepted");
        // Only the refusal of a message lives outside `refund.*`.
        let outside: Vec<EventKind> = EventKind::ALL
            .into_iter()
            .filter(|k| !k.routing_key().starts_with("refund."))
            .collect();
        assert_eq!(outside, [EventKind::Refused]);
    }

    #[test]
    fn event_ids_are_distinct_uuid_v4s() {
        let a = new_event_id();
        let b = new_event_id();
        assert_ne!(a, b);
        for id in [a, b] {
            assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
        }
    }

    #[test]
    fn a_refused_request_has_no_state_and_a_rejected_one_is_rejected() {
        let read = Readable {
            refund_no: Some("R1".into()),
            provider: Some(ProviderKind::Wupay),
            ..Readable::default()
        };
        let why = Rejection::new(ErrorCode::Conflict, "refund_no", "exists");
        let refused = OutcomeEvent::refusal(EventKind::Refused, &read, &why, chrono_tz::UTC);
        assert_eq!(refused.state, None);
        assert_eq!(refused.error_code.as_deref(), Some("CONFLICT"));
        assert_eq!(refused.field.as_deref(), Some("refund_no"));
        assert_eq!(refused.provider.as_deref(), Some("wupay"));
        let rejected = OutcomeEvent::refusal(EventKind::Rejected, &read, &why, chrono_tz::UTC);
        assert_eq!(rejected.state, Some(State::Rejected));
        assert_ne!(rejected.event_id, refused.event_id);
        let json = serde_json::to_value(&refused).unwrap();
        for key in ["cause", "field", "state", "refund_fee"] {
            assert!(json.as_object().unwrap().contains_key(key), "{key}");
        }
    }

    #[test]
    fn a_rejection_of_the_whole_message_has_a_null_field_and_long_texts_are_cut() {
        let long = Rejection::new(ErrorCode::UnknownField, "f".repeat(1000), "x".repeat(5000));
        let e = OutcomeEvent::refusal(
            EventKind::Refused,
            &Readable::default(),
            &long,
            chrono_tz::UTC,
        );
        assert_eq!(e.field.as_deref().map(|f| f.chars().count()), Some(129));
        assert_eq!(
            e.error_message.as_deref().map(|m| m.chars().count()),
            Some(513)
        );
        let whole = Rejection::new(ErrorCode::NotJson, crate::job::WHOLE_MESSAGE, "not JSON");
        let e = OutcomeEvent::refusal(
            EventKind::Refused,
            &Readable::default(),
            &whole,
            chrono_tz::UTC,
        );
        assert_eq!(e.field, None);
        assert_eq!(e.error_message.as_deref(), Some("not JSON"));
    }
}
