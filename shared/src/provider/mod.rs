//! Payment providers behind one trait.
//!
//! This module owns the contract between the worker and a provider client: what a refund call
//! is given ([`RefundCall`]), what it can come back with ([`Outcome`], the table of DESIGN §5),
//! and the per-provider code tables that decide which provider codes are retried, declined or
//! need an operator. The concrete protocols live in [`shengpay`] and [`wupay`]; the worker only
//! ever sees `dyn Provider`, looked up per (provider, merchant) in a [`Registry`].
//!
//! The split between [`Outcome::NotSent`] and [`Outcome::MaybeDelivered`] is the heart of "paid at
//! most once": a request that provably never left may always be sent again, one that may have
//! reached the provider may be resent only to a merchant that deduplicates on `refund_no`.

pub mod codes;
pub mod http;
pub mod keys;
pub mod shengpay;
pub mod status;
pub mod wupay;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::job::{ProviderKind, RefundRequest};

/// What one provider call is about: the validated request and the attempt number that claimed
/// it (for logs and the attempt record; the provider sees only `refund_no`, never the attempt).
#[derive(Debug, Clone, Copy)]
pub struct RefundCall<'a> {
    pub request: &'a RefundRequest,
    pub attempt: i32,
}

/// The result of one provider call, classified per DESIGN §5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted the refund.
    Accepted {
        provider_refund_id: String,
        refund_fee: i64,
        settlement_refund_fee: i64,
        coupon_refund_fee: i64,
        raw: String,
    },
    /// A definitive business FAIL: final, never retried.
    Declined {
        code: String,
        message: String,
        raw: String,
    },
    /// The provider asked us to try again later.
    RetryLater {
        code: String,
        message: String,
        raw: String,
    },
    /// The provider refused the request itself (signature, merchant, parameters): an operator
    /// must fix configuration, retrying cannot help.
    RequestRejected {
        code: String,
        message: String,
        raw: String,
    },
    /// The request never left this process (connect refused, DNS, TLS handshake, or a value we
    /// refused to send): safe to send again.
    NotSent { error: String },
    /// The request may have reached the provider but we do not know what it did (timeout after
    /// sending, reset mid-response, 5xx, an unparseable or unverifiable response).
    MaybeDelivered { error: String, raw: Option<String> },
    /// The provider answered, verifiably, with a result we cannot map (WuPay's opaque
    /// `RefundResult`): the refund may or may not have been paid; an operator must look.
    Unrecognised { result: String, raw: String },
}

impl Outcome {
    /// Short class name used in metrics, logs and the attempt record.
    pub fn class(&self) -> &'static str {
        match self {
            Outcome::Accepted { .. } => "accepted",
            Outcome::Declined { .. } => "declined",
            Outcome::RetryLater { .. } => "retry_later",
            Outcome::RequestRejected { .. } => "request_rejected",
            Outcome::NotSent { .. } => "not_sent",
            Outcome::MaybeDelivered { .. } => "maybe_delivered",
            Outcome::Unrecognised { .. } => "unrecognised",
        }
    }

    /// Whether the provider may have paid on this call: an acceptance, an answer we could not
    /// read, or one we could not map. Definitive answers (decline, retry later, request
    /// refused) and calls that never left say it did not.
    pub fn may_have_paid(&self) -> bool {
        matches!(
            self,
            Outcome::Accepted { .. }
                | Outcome::MaybeDelivered { .. }
                | Outcome::Unrecognised { .. }
        )
    }

    /// The provider's code (or our error text for transport outcomes), for the job and events.
    pub fn code(&self) -> Option<&str> {
        match self {
            Outcome::Declined { code, .. }
            | Outcome::RetryLater { code, .. }
            | Outcome::RequestRejected { code, .. } => Some(code),
            Outcome::NotSent { .. } => Some("NOT_SENT"),
            Outcome::MaybeDelivered { .. } => Some("MAYBE_DELIVERED"),
            Outcome::Unrecognised { .. } => Some("UNRECOGNISED_RESULT"),
            Outcome::Accepted { .. } => None,
        }
    }

    /// Human-readable message, if the outcome carries one.
    pub fn message(&self) -> Option<&str> {
        match self {
            Outcome::Declined { message, .. }
            | Outcome::RetryLater { message, .. }
            | Outcome::RequestRejected { message, .. } => Some(message),
            Outcome::NotSent { error } | Outcome::MaybeDelivered { error, .. } => Some(error),
            Outcome::Unrecognised { result, .. } => Some(result),
            Outcome::Accepted { .. } => None,
        }
    }

    /// The provider's raw response body, if any was read.
    pub fn raw(&self) -> Option<&str> {
        match self {
            Outcome::Accepted { raw, .. }
            | Outcome::Declined { raw, .. }
            | Outcome::RetryLater { raw, .. }
            | Outcome::RequestRejected { raw, .. }
            | Outcome::Unrecognised { raw, .. } => Some(raw),
            Outcome::MaybeDelivered { raw, .. } => raw.as_deref(),
            Outcome::NotSent { .. } => None,
        }
    }
}

/// One provider call as recorded in `provider_attempts`: the outcome plus what was sent (with
/// secrets redacted), the HTTP status if one came back, and how long it took.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub outcome: Outcome,
    /// The request as sent, with `sign`, `rfkey` and other secrets replaced by `***`.
    pub request_redacted: String,
    pub http_status: Option<u16>,
    pub latency: Duration,
}

/// What a call says about the provider's health, for flow control (DESIGN §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// It answered (whatever the answer): it is up.
    Answered,
    /// It asked us to slow down: `FREQUENCY_LIMITED`, `BIZERR_NEED_RETRY`, HTTP 429 or 503.
    Throttled,
    /// No usable answer: transport failure, timeout, 5xx.
    Failed,
}

/// The provider codes that mean "too many requests", not "something broke".
pub const THROTTLE_CODES: &[&str] = &["FREQUENCY_LIMITED", "BIZERR_NEED_RETRY", "HTTP_429"];

impl AttemptRecord {
    /// What this call says about the provider's health. Failed means no answer at all (not
    /// sent, or sent and nothing came back) or a 5xx; an answer the client could not read or
    /// verify came from a provider that is up, so it is not a failure here.
    pub fn signal(&self) -> Signal {
        match (&self.outcome, self.http_status) {
            (_, Some(429 | 503)) => Signal::Throttled,
            (Outcome::RetryLater { code, .. }, _) if THROTTLE_CODES.contains(&code.as_str()) => {
                Signal::Throttled
            }
            (_, Some(s)) if s >= 500 => Signal::Failed,
            (Outcome::NotSent { .. }, _) | (Outcome::MaybeDelivered { .. }, None) => Signal::Failed,
            _ => Signal::Answered,
        }
    }
}

/// A payment provider client for one merchant account.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Which provider protocol this client speaks.
    fn kind(&self) -> ProviderKind;
    /// The merchant key (as in the request message and config) this client serves.
    fn merchant(&self) -> &str;
    /// Whether the provider deduplicates on `refund_no`, so that a maybe-delivered request may
    /// be sent again with the same `refund_no`.
    fn idempotent(&self) -> bool;
    /// Whether this merchant's protocol can carry the request as it is, checked at intake so
    /// that a request the provider's stack would refuse before processing (or that would sign
    /// ambiguously) is rejected with a reason naming the field, never sent.
    fn admit(&self, _request: &RefundRequest) -> Result<(), crate::job::Rejection> {
        Ok(())
    }
    /// Whether an accepted answer is the refund's end. A provider that processes refunds
    /// after accepting them (ShengPay) says `false`: the job waits in `accepted` for its notify
    /// or status query.
    fn final_on_accept(&self) -> bool {
        true
    }
    /// Send the refund once. Never panics, never retries: retrying is the worker's decision.
    async fn refund(&self, call: RefundCall<'_>) -> AttemptRecord;
    /// The account (`mchId`, `appId`) whose notifies this client reads, for a provider that
    /// notifies.
    fn notify_account(&self) -> Option<(&str, &str)> {
        None
    }
    /// Reads a notify about `request`: it must verify with the provider's key and name this
    /// refund with its amounts.
    fn read_notify(
        &self,
        _body: &[u8],
        _request: &RefundRequest,
    ) -> Result<status::StatusReport, status::NotifyRefusal> {
        Err(status::NotifyRefusal::Unsupported)
    }
    /// Ask the provider how the refund of `request` stands, once; `None` when the provider has
    /// no status query (WuPay: its unknown outcomes are settled by the statement).
    async fn query(&self, _request: &RefundRequest) -> Option<status::QueryRecord> {
        None
    }
}

/// What intake records on a new job about its merchant, so that every later decision (worker,
/// sweeper, replay) reads it from the job and not from whichever config the deciding process has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The merchant deduplicates on `refund_no`: a maybe-delivered request may be resent.
    pub idempotent: bool,
}

/// The clients the worker may call, one per (provider, merchant).
#[derive(Clone, Default)]
pub struct Registry {
    clients: HashMap<(ProviderKind, String), Arc<dyn Provider>>,
}

impl Registry {
    /// Adds (or replaces) the client for its (provider, merchant).
    pub fn insert(&mut self, client: Arc<dyn Provider>) {
        self.clients
            .insert((client.kind(), client.merchant().to_owned()), client);
    }

    /// The client for a (provider, merchant), if configured.
    pub fn get(&self, kind: ProviderKind, merchant: &str) -> Option<&Arc<dyn Provider>> {
        self.clients.get(&(kind, merchant.to_owned()))
    }

    /// Whether a client exists for this (provider, merchant).
    pub fn contains(&self, kind: ProviderKind, merchant: &str) -> bool {
        self.get(kind, merchant).is_some()
    }

    /// Whether a request may be taken in: its merchant has a client and that client's protocol
    /// can carry it. What intake records of the merchant with the job comes back with it.
    pub fn admit(&self, request: &RefundRequest) -> Result<Admission, crate::job::Rejection> {
        let Some(client) = self.get(request.provider, &request.merchant) else {
            return Err(crate::job::Rejection::unknown_merchant(request));
        };
        client.admit(request)?;
        Ok(Admission {
            idempotent: client.idempotent(),
        })
    }

    /// Every configured (provider, merchant).
    pub fn merchants(&self) -> impl Iterator<Item = (ProviderKind, &str)> {
        self.clients.keys().map(|(k, m)| (*k, m.as_str()))
    }

    /// Every configured (provider, merchant) with whether it deduplicates on `refund_no`.
    pub fn idempotence(&self) -> Vec<(String, String, bool)> {
        self.clients
            .iter()
            .map(|((k, m), c)| (k.as_str().to_owned(), m.clone(), c.idempotent()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// How a provider code is treated (the code tables of DESIGN §5, overridable in config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeClass {
    RetryLater,
    Declined,
    RequestRejected,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(outcome: Outcome, http_status: Option<u16>) -> AttemptRecord {
        AttemptRecord {
            outcome,
            request_redacted: String::new(),
            http_status,
            latency: Duration::ZERO,
        }
    }

    fn retry_later(code: &str) -> Outcome {
        Outcome::RetryLater {
            code: code.into(),
            message: String::new(),
            raw: String::new(),
        }
    }

    fn maybe() -> Outcome {
        Outcome::MaybeDelivered {
            error: "x".into(),
            raw: None,
        }
    }

    #[test]
    fn too_many_requests_is_a_throttle_whatever_the_protocol_says() {
        for r in [
            record(retry_later("FREQUENCY_LIMITED"), Some(200)),
            record(retry_later("BIZERR_NEED_RETRY"), Some(200)),
            record(retry_later("HTTP_429"), Some(429)),
            record(maybe(), Some(503)),
        ] {
            assert_eq!(r.signal(), Signal::Throttled, "{r:?}");
        }
    }

    #[test]
    fn no_answer_or_a_5xx_is_a_failure_and_an_unreadable_answer_is_not() {
        let not_sent = Outcome::NotSent {
            error: "refused".into(),
        };
        assert_eq!(record(not_sent, None).signal(), Signal::Failed);
        assert_eq!(record(maybe(), None).signal(), Signal::Failed);
        assert_eq!(record(maybe(), Some(500)).signal(), Signal::Failed);
        assert_eq!(
            record(retry_later("SYSTEMERROR"), Some(502)).signal(),
            Signal::Failed
        );
        // A bad signature on a 200: the provider is up.
        assert_eq!(record(maybe(), Some(200)).signal(), Signal::Answered);
        assert_eq!(
            record(retry_later("SYSTEMERROR"), Some(200)).signal(),
            Signal::Answered
        );
    }
}
