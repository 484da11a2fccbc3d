//! ShengPay's refund API (DESIGN §5, seed `001_9bfea206f3bcf372.txt`): signing, sending,
//! verifying and classifying.
//!
//! This module owns everything ShengPay-specific: the string to sign, RSA signatures
//! (`RSA` = SHA1withRSA, `RSA2` = SHA256withRSA, PKCS#1 v1.5, base64), the request body, the
//! response parser and the mapping of a response to an [`Outcome`]. The worker only sees the
//! [`Provider`] trait.
//!
//! Two rules drive the design. First, a response is verified over each value *as it appears in
//! the JSON text* (`"refundFee":"10"` and `"settlementRefundFee":10` both sign as `…=10`, and
//! `10.0` would sign as `10.0`), so the parser keeps raw text instead of going through
//! `serde_json::Value`, which would re-render numbers. Second, money is never guessed: amounts
//! are whole fen from digits only (never through a float), and an answer that does not verify,
//! does not parse, or does not match what we asked for is "maybe delivered", never a success
//! or a decline (a wrong booking is worse than an operator looking at a job).
//!
//! The parts live in private children, one per responsibility, so that the code that decides
//! whether money moved (`classify`) can be read apart from the byte-level work it relies on:
//! `sign` (the string to sign and RSA), `request` (the body we send and the intake check that
//! it can be signed), `response` (answers and notifies read as raw text and verified),
//! `classify` (an answer mapped to an [`Outcome`]) and `client` (the [`Provider`] that ties
//! them to HTTP). Everything public is re-exported here, so callers keep naming
//! `shengpay::X`.
//!
//! [`Outcome`]: super::Outcome
//! [`Provider`]: super::Provider

mod classify;
mod client;
mod request;
mod response;
mod sign;
mod status;
#[cfg(test)]
mod test_support;

pub use classify::{Expected, Judge, classify_response};
pub use client::{REFUND_PATH, ShengpayClient};
pub use request::{MerchantParams, NONCE_LEN, new_nonce, refund_fields, signable};
pub use response::{
    Coupon, RawField, RefundResponse, ResponseError, ResponseFields, VerifyError, parse_fen,
    verify_body,
};
pub use sign::{
    REDACTED, SIGN_FIELD, SignError, SignedJson, canonical_string, is_ambiguous, sign, signed_json,
    verify,
};
pub use status::{
    NOT_FOUND_CODES, classify_query, parse_success_time, query_fields, status_report,
};
