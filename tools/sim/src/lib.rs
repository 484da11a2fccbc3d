//! `refund-sim`: a fake of both payment providers (ShengPay JSON and WuPay `.asmx`) served over
//! real HTTP with real RSA signatures.
//!
//! It is the independent second implementation of the provider contracts in DESIGN.md §5: its
//! canonicalisation, signing and XML handling are its own (the `rsa` crate and quick-xml), never
//! the `shared` crate's client code, so a bug in one side shows up as a failure on the other.
//!
//! What it owns:
//! - money: every `outRefundNo` / `refund_id` is paid at most once per provider and merchant,
//!   repeats replay the first result, and per-order totals are never exceeded ([`ledger`]);
//! - ShengPay's asynchronous result, as the real service behaves: an accepted refund is
//!   `PROCESSING` for `[shengpay] processing_ms`, then a background task owned by the simulator
//!   ends it `SUCCESS` (paid), `REFUND_CLOSE` (amount released) or `CHANGE` (amount kept,
//!   unpaid), POSTs a signed notify to its `notifyUrl` with retries until answered 2xx
//!   `SUCCESS`, and the status query answers how it stands. WuPay stays synchronous;
//! - fault injection by rule, per operation (refund call, status query, notify): latency,
//!   HTTP 500, connection reset, hang, pay-then-drop, bad signature, decline, retry-later,
//!   refund_close, change, and notifies dropped, delayed, duplicated, reordered, badly signed
//!   or preceded by a foreign one ([`faults`]);
//! - the evidence tests and the reconciler need: a paid list (ShengPay refunds once they
//!   succeeded), the ShengPay refunds with their status, call, query and notify logs and a
//!   provider statement CSV (DESIGN.md §7), all exposed under `/_sim/` and on [`SimHandle`],
//!   which also ends every processing refund at once ([`SimHandle::finish`]) and resends
//!   notifies ([`SimHandle::send_notify`]);
//! - an arrival timeline that the call log's cap does not limit: requests per merchant per
//!   second of its clock, refund calls and status queries apart (`GET /_sim/rates`,
//!   [`SimHandle::rates`]), what the benchmarks check rate limits against;
//! - the providers' own per-merchant rate limits, if configured: a request beyond one is
//!   refused as the real services do (ShengPay `FREQUENCY_LIMITED`, WuPay HTTP 429)
//!   ([`limits`]).
//!
//! Use it in-process with [`Simulator::start`], or run the `refund-sim` binary. The demo, the
//! integration and fault tests (through `testkit`) and the benchmarks pay against it; nothing
//! that ships depends on it.

mod calls;
mod clock;
pub mod config;
mod crypto;
pub mod faults;
pub mod ledger;
pub mod limits;
mod rates;
mod server;
mod shengpay;
mod wupay;

use serde::{Deserialize, Serialize};

pub use calls::{CallRecord, Outcome, QueryRecord};
pub use config::{ShengPayMerchant, ShengPaySection, SimConfig, WuPayMerchant};
pub use faults::{FaultAction, FaultRule, Operation};
pub use ledger::PaidRefund;
pub use limits::SimLimit;
pub use rates::RateWindow;
pub use server::{SimHandle, Simulator};
pub use shengpay::{NotifyKind, NotifyOutcome, NotifyRecord, RefundStatus, ShengPayRefund};

/// The two simulated providers. Serialised as `shengpay` / `wupay`, the names used in the
/// request message, the statement CSV and the fault rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    ShengPay,
    WuPay,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::ShengPay => "shengpay",
            Provider::WuPay => "wupay",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Provider {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shengpay" => Ok(Provider::ShengPay),
            "wupay" => Ok(Provider::WuPay),
            other => Err(SimError::Invalid(format!(
                "unknown provider {other:?} (expected shengpay or wupay)"
            ))),
        }
    }
}

/// Why the simulator could not start or refused a control request.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration (or a rule set sent at run time) is not acceptable.
    #[error("invalid simulator configuration: {0}")]
    Invalid(String),
    /// A key or secret file could not be read or parsed.
    #[error("cannot load key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A control request named a refund the simulator does not hold (or cannot act on yet).
    #[error("not found: {0}")]
    NotFound(String),
}
