//! The call log: every provider request the simulator received and what it served.
//!
//! Tests assert on it ("the worker called exactly twice, the first was reset"), so each record
//! says both the business outcome and the injected fault, if any. The log is capped at
//! `call_log_capacity` records (oldest dropped) so a long benchmark cannot exhaust memory.
//!
//! ShengPay status queries have a log of their own ([`QueryRecord`]), so that counting the
//! refund calls of a refund number is not disturbed by how often its status was asked.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Provider;
use super::faults::FaultAction;

/// The business outcome of one call, before any transport fault is applied on top.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Paid (WuPay) or accepted (ShengPay, paid when it ends `SUCCESS`) by this call.
    Paid,
    /// Paid before with the same amounts; the first result was served again.
    Replayed,
    /// A definitive business FAIL (`resultCode FAIL` / `FAIL:<CODE>:...`).
    Declined,
    /// "Try again later" (ShengPay `SYSTEMERROR`, WuPay Server fault).
    RetryLater,
    /// The request itself was refused: bad signature, unknown merchant, bad parameters, wrong
    /// rfkey.
    Rejected,
    /// Not processed at all (a transport fault fired first).
    None,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Paid => "paid",
            Outcome::Replayed => "replayed",
            Outcome::Declined => "declined",
            Outcome::RetryLater => "retry_later",
            Outcome::Rejected => "rejected",
            Outcome::None => "none",
        }
    }
}

/// One provider request as the simulator saw it.
#[derive(Clone, Debug, Serialize)]
pub struct CallRecord {
    /// Arrival order, from 1, over the simulator's lifetime.
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub provider: Provider,
    /// Our merchant name; `None` when the request named no known merchant.
    pub merchant: Option<String>,
    /// `json` (ShengPay), `soap11`, `soap12`, `http_post`, `http_get` (WuPay).
    pub binding: &'static str,
    pub refund_no: Option<String>,
    pub order_no: Option<String>,
    pub outcome: Outcome,
    /// The error code served, if any (`SIGN_ERROR`, `ORDER_NOT_REFUNDABLE`, ...).
    pub code: Option<String>,
    /// The injected fault, if a rule with an action fired.
    pub fault: Option<FaultAction>,
    /// Index of the rule that fired, if any.
    pub rule: Option<usize>,
    /// Delay added before handling (global plus rule latency).
    pub latency_ms: u64,
}

impl CallRecord {
    /// What the client got, as one word: the fault if one fired, else the outcome.
    pub fn served(&self) -> &'static str {
        match self.fault {
            Some(fault) => fault.as_str(),
            None => self.outcome.as_str(),
        }
    }

    /// True when this call created a payment.
    pub fn paid(&self) -> bool {
        self.outcome == Outcome::Paid
    }
}

pub(crate) struct CallLog {
    entries: VecDeque<CallRecord>,
    capacity: usize,
    total: u64,
}

/// `GET /_sim/calls` without `full`: counts, per served kind and per refund number.
#[derive(Serialize)]
pub(crate) struct CallSummary {
    pub total: u64,
    pub retained: usize,
    pub by_served: BTreeMap<&'static str, u64>,
    pub by_refund_no: BTreeMap<String, RefundCalls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls: Option<Vec<CallRecord>>,
}

#[derive(Default, Serialize)]
pub(crate) struct RefundCalls {
    pub total: u64,
    pub by_served: BTreeMap<&'static str, u64>,
}

impl CallLog {
    pub(crate) fn new(capacity: usize) -> Self {
        CallLog {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            total: 0,
        }
    }

    /// Appends a record, giving it the next sequence number.
    pub(crate) fn push(&mut self, mut record: CallRecord) {
        self.total += 1;
        record.seq = self.total;
        if self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(record);
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.total = 0;
    }

    pub(crate) fn records(&self) -> Vec<CallRecord> {
        self.entries.iter().cloned().collect()
    }

    pub(crate) fn summary(&self, refund_no: Option<&str>, full: bool) -> CallSummary {
        let mut summary = CallSummary {
            total: self.total,
            retained: self.entries.len(),
            by_served: BTreeMap::new(),
            by_refund_no: BTreeMap::new(),
            calls: full.then(Vec::new),
        };
        let wanted = self
            .entries
            .iter()
            .filter(|r| refund_no.is_none_or(|want| r.refund_no.as_deref() == Some(want)));
        for record in wanted {
            let served = record.served();
            *summary.by_served.entry(served).or_default() += 1;
            let per = summary
                .by_refund_no
                .entry(record.refund_no.clone().unwrap_or_default())
                .or_default();
            per.total += 1;
            *per.by_served.entry(served).or_default() += 1;
            if let Some(calls) = summary.calls.as_mut() {
                calls.push(record.clone());
            }
        }
        summary
    }
}

/// One ShengPay status query as the simulator saw it.
#[derive(Clone, Debug, Serialize)]
pub struct QueryRecord {
    /// Arrival order, from 1, since the last reset.
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// Our merchant name; `None` when the query named no known account.
    pub merchant: Option<String>,
    pub refund_no: Option<String>,
    /// What it was told: the `refundStatus` (`PROCESSING`, `SUCCESS`, `REFUND_CLOSE`,
    /// `CHANGE`), `not_found`, `retry_later`, `rejected` (bad request, signature or account),
    /// or the transport fault that answered instead (`http500`, `reset`, ...).
    pub answered: String,
    /// The error code served, if any.
    pub code: Option<String>,
    /// The injected fault, if a rule with an action fired.
    pub fault: Option<FaultAction>,
    /// Index of the rule that fired, if any.
    pub rule: Option<usize>,
}

pub(crate) struct QueryLog {
    entries: VecDeque<QueryRecord>,
    capacity: usize,
    total: u64,
}

impl QueryLog {
    pub(crate) fn new(capacity: usize) -> Self {
        QueryLog {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            total: 0,
        }
    }

    pub(crate) fn push(&mut self, mut record: QueryRecord) {
        self.total += 1;
        record.seq = self.total;
        if self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(record);
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.total = 0;
    }

    /// Every record kept, in order, optionally only those of one refund number.
    pub(crate) fn records(&self, refund_no: Option<&str>) -> Vec<QueryRecord> {
        self.entries
            .iter()
            .filter(|r| refund_no.is_none_or(|want| r.refund_no.as_deref() == Some(want)))
            .cloned()
            .collect()
    }
}
