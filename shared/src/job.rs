//! The refund request (contract v1, DESIGN §3) and its strict intake validation.
//!
//! This module owns what a valid refund request is. Parsing is strict on purpose: an order
//! system that sends a float, a string for a number, an unknown or duplicated field, or bytes
//! that are not UTF-8 has a bug we must surface, not guess around, because a guessed amount is
//! a wrong payment. Every rejection names the rule it breaks with a stable [`ErrorCode`] (what
//! order systems branch on, docs/events.md) and the field at fault ([`Rejection::field`]).
//!
//! A valid request also has a canonical form ([`RefundRequest::canonical_json`]) and its hash
//! ([`RefundRequest::content_hash`]): two messages with the same `refund_no` are duplicates when
//! their canonical forms are equal and a conflict otherwise, whatever their whitespace or key
//! order.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The most a request body may weigh (DESIGN §3).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The largest `total_fee` accepted, in fen.
pub const MAX_TOTAL_FEE: i64 = 100_000_000_000;

/// Which provider protocol a refund goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Shengpay,
    Wupay,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Shengpay => "shengpay",
            ProviderKind::Wupay => "wupay",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProviderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shengpay" => Ok(ProviderKind::Shengpay),
            "wupay" => Ok(ProviderKind::Wupay),
            other => Err(format!(
                "unknown provider {other:?} (expected shengpay or wupay)"
            )),
        }
    }
}

/// ShengPay's refund fund source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefundAccount {
    #[serde(rename = "UNSETTLED")]
    Unsettled,
    #[serde(rename = "RECHARGE")]
    Recharge,
}

impl RefundAccount {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundAccount::Unsettled => "UNSETTLED",
            RefundAccount::Recharge => "RECHARGE",
        }
    }
}

/// ShengPay-specific request options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShengpayOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_account: Option<RefundAccount>,
}

/// WuPay-specific request fields (required for WuPay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WupayOptions {
    pub pay_nd: String,
    pub auth_type: String,
    pub rec_organ: String,
    pub rec_device: String,
    pub rec_man: String,
}

/// A validated v1 refund request. Construct it with [`parse_request`] (from the wire) or
/// [`RefundRequest::validate`] (from code): either way every rule of DESIGN §3 holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    pub version: i64,
    pub refund_no: String,
    pub order_no: String,
    pub provider: ProviderKind,
    pub merchant: String,
    pub total_fee: i64,
    pub refund_fee: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shengpay: Option<ShengpayOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wupay: Option<WupayOptions>,
}

/// The `field` of a rejection of the message as a whole (its size, encoding or syntax).
pub const WHOLE_MESSAGE: &str = "$";

/// The rule a refused message broke: the stable `error_code` of `refund.rejected` and
/// `request.refused` events and of `rejected_messages`. Order systems branch on these, so a
/// code is never renamed or reused for another rule; a new rule gets a new code. Each names
/// one rule, whichever field it is about (the event's `field` says which); docs/events.md
/// lists them all, and a test keeps that list and [`ErrorCode::ALL`] equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The body is over [`MAX_MESSAGE_BYTES`].
    TooLarge,
    /// The body is not UTF-8.
    InvalidUtf8,
    /// The body is not one well-formed JSON document (syntax, truncated, trailing data).
    NotJson,
    /// A field the contract does not define.
    UnknownField,
    /// A key given twice in one object.
    DuplicateField,
    /// A required field is absent (`wupay` too, when `provider` is `wupay`).
    MissingField,
    /// A value of the wrong JSON type: a float or a string for an integer, `null` for a
    /// required value, an array for the message.
    WrongType,
    /// `version` is not `1`.
    UnsupportedVersion,
    /// `refund_no` or `order_no` is not 1–32 characters of `[0-9A-Za-z_-]`.
    InvalidIdentifier,
    /// `provider` or `shengpay.refund_account` is not one of its allowed values.
    UnknownValue,
    /// A fee outside its range: `total_fee` in 1..=100,000,000,000, `refund_fee` at least 1.
    InvalidAmount,
    /// `refund_fee` is above the request's own `total_fee`.
    OverTotalFee,
    /// A text over its length limit.
    TooLong,
    /// A text with a control character.
    ControlCharacter,
    /// `requested_at` is not RFC 3339.
    InvalidTimestamp,
    /// No merchant of that name is configured for the provider.
    UnknownMerchant,
    /// ShengPay: a signed value contains `&` or `=`.
    UnsignableValue,
    /// WuPay: a fee above its service's 32-bit integers.
    AmountTooLargeForProvider,
    /// WuPay's HTTP GET/POST bindings: text that ASP.NET request validation refuses.
    UnsafeForBinding,
    /// `total_fee` differs from the one earlier refunds of the order were taken with.
    OrderTotalMismatch,
    /// With the order's earlier refunds, `refund_fee` would exceed the order's `total_fee`.
    OverOrderTotal,
    /// The `refund_no` already has a job, with different content.
    Conflict,
    /// The message's effect could not be written for a reason of the database's own.
    Unstorable,
}

impl ErrorCode {
    /// Every code, in the order docs/events.md lists them.
    pub const ALL: [ErrorCode; 23] = [
        ErrorCode::TooLarge,
        ErrorCode::InvalidUtf8,
        ErrorCode::NotJson,
        ErrorCode::UnknownField,
        ErrorCode::DuplicateField,
        ErrorCode::MissingField,
        ErrorCode::WrongType,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidIdentifier,
        ErrorCode::UnknownValue,
        ErrorCode::InvalidAmount,
        ErrorCode::OverTotalFee,
        ErrorCode::TooLong,
        ErrorCode::ControlCharacter,
        ErrorCode::InvalidTimestamp,
        ErrorCode::UnknownMerchant,
        ErrorCode::UnsignableValue,
        ErrorCode::AmountTooLargeForProvider,
        ErrorCode::UnsafeForBinding,
        ErrorCode::OrderTotalMismatch,
        ErrorCode::OverOrderTotal,
        ErrorCode::Conflict,
        ErrorCode::Unstorable,
    ];

    /// The code as events carry it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::InvalidUtf8 => "INVALID_UTF8",
            ErrorCode::NotJson => "NOT_JSON",
            ErrorCode::UnknownField => "UNKNOWN_FIELD",
            ErrorCode::DuplicateField => "DUPLICATE_FIELD",
            ErrorCode::MissingField => "MISSING_FIELD",
            ErrorCode::WrongType => "WRONG_TYPE",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::InvalidIdentifier => "INVALID_IDENTIFIER",
            ErrorCode::UnknownValue => "UNKNOWN_VALUE",
            ErrorCode::InvalidAmount => "INVALID_AMOUNT",
            ErrorCode::OverTotalFee => "OVER_TOTAL_FEE",
            ErrorCode::TooLong => "TOO_LONG",
            ErrorCode::ControlCharacter => "CONTROL_CHARACTER",
            ErrorCode::InvalidTimestamp => "INVALID_TIMESTAMP",
            ErrorCode::UnknownMerchant => "UNKNOWN_MERCHANT",
            ErrorCode::UnsignableValue => "UNSIGNABLE_VALUE",
            ErrorCode::AmountTooLargeForProvider => "AMOUNT_TOO_LARGE_FOR_PROVIDER",
            ErrorCode::UnsafeForBinding => "UNSAFE_FOR_BINDING",
            ErrorCode::OrderTotalMismatch => "ORDER_TOTAL_MISMATCH",
            ErrorCode::OverOrderTotal => "OVER_ORDER_TOTAL",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::Unstorable => "UNSTORABLE",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why a message was refused at intake: the rule it broke (`code`), the field at fault
/// (`field`, [`WHOLE_MESSAGE`] for the message as a whole) and a human-readable `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{field}: {reason}")]
pub struct Rejection {
    pub code: ErrorCode,
    pub field: String,
    pub reason: String,
}

impl Rejection {
    /// A rejection of `field` under the rule `code`. Both texts may echo the input (serde
    /// names an unknown field or variant as it was sent), so control characters are written
    /// escaped: the reason is read on terminals and stored in PostgreSQL, which cannot hold
    /// U+0000.
    pub fn new(code: ErrorCode, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            code,
            field: escape_controls(field.into()),
            reason: escape_controls(reason.into()),
        }
    }

    /// The request's merchant has no client for its provider (the worker's intake and
    /// `refundctl enqueue` refuse it with the same words).
    pub fn unknown_merchant(request: &RefundRequest) -> Self {
        Self::new(
            ErrorCode::UnknownMerchant,
            "merchant",
            format!(
                "merchant {:?} is not configured for provider {}",
                request.merchant, request.provider
            ),
        )
    }

    /// The field as events name it: `None` for the message as a whole.
    pub fn json_field(&self) -> Option<&str> {
        (self.field != WHOLE_MESSAGE).then_some(self.field.as_str())
    }
}

/// `s` with its control characters written as Rust escapes (`\0`, `\u{7}`, ...).
fn escape_controls(s: String) -> String {
    if !s.chars().any(char::is_control) {
        return s;
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Parses and validates one message body. Strict: see the module docs.
pub fn parse_request(body: &[u8]) -> Result<RefundRequest, Rejection> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(Rejection::new(
            ErrorCode::TooLarge,
            WHOLE_MESSAGE,
            format!(
                "message is {} bytes, more than the {MAX_MESSAGE_BYTES} allowed",
                body.len()
            ),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        Rejection::new(
            ErrorCode::InvalidUtf8,
            WHOLE_MESSAGE,
            format!("body is not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    // serde reads a struct from a JSON array as readily as from an object, so a bare array of
    // the right values would pass as a request: the message must be an object.
    if !text.trim_start().starts_with('{') {
        return Err(not_an_object(text));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let request: RefundRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let text = json_error_text(e.inner());
        let field = field_of(&path, &text);
        Rejection::new(rule_of(e.inner(), &field, &text), field, text)
    })?;
    de.end().map_err(|e| {
        Rejection::new(
            ErrorCode::NotJson,
            WHOLE_MESSAGE,
            format!("trailing data after the JSON object: {e}"),
        )
    })?;
    request.validate()?;
    Ok(request)
}

/// The rejection of a message that does not start as a JSON object: JSON of another type, or
/// not JSON at all.
fn not_an_object(text: &str) -> Rejection {
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => Rejection::new(
            ErrorCode::WrongType,
            WHOLE_MESSAGE,
            "the message must be a JSON object",
        ),
        Err(e) => Rejection::new(
            ErrorCode::NotJson,
            WHOLE_MESSAGE,
            format!("not JSON: {}", json_error_text(&e)),
        ),
    }
}

/// The rule a deserialisation error breaks. serde_json sorts its errors into syntax and data;
/// which data rule it is, only its message says: the wording of serde's default `de::Error`
/// constructors, which serde_json uses (the code table tests catch a change of it).
fn rule_of(e: &serde_json::Error, field: &str, text: &str) -> ErrorCode {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ErrorCode::NotJson,
        Category::Data if text.starts_with("missing field") => ErrorCode::MissingField,
        Category::Data if text.starts_with("unknown field") => ErrorCode::UnknownField,
        Category::Data if text.starts_with("duplicate field") => ErrorCode::DuplicateField,
        Category::Data if text.starts_with("unknown variant") => ErrorCode::UnknownValue,
        // An integer beyond i64: out of the field's range rather than of the wrong type.
        Category::Data if text.starts_with("invalid value") => match field {
            "version" => ErrorCode::UnsupportedVersion,
            "total_fee" | "refund_fee" => ErrorCode::InvalidAmount,
            _ => ErrorCode::WrongType,
        },
        Category::Data => ErrorCode::WrongType,
    }
}

/// The field an error is about: serde reports missing and unknown fields at their parent's
/// path, with the field's name only in the message, so take it from there.
fn field_of(path: &str, text: &str) -> String {
    let parent = match path {
        // serde_path_to_error writes `?` when the document ended before any field.
        "." | "" | "?" => None,
        p => Some(p),
    };
    let named = ["missing field `", "unknown field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| text.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    match (parent, named) {
        (Some(p), Some(n)) if p == n || p.ends_with(&format!(".{n}")) => p.to_owned(),
        (Some(p), Some(n)) => format!("{p}.{n}"),
        (None, Some(n)) => n.to_owned(),
        (Some(p), None) => p.to_owned(),
        (None, None) => "$".to_owned(),
    }
}

/// serde_json's message without its "at line L column C" suffix, which is noise for a message
/// on one line; the path already says where.
fn json_error_text(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn check_id(field: &str, v: &str) -> Result<(), Rejection> {
    if v.is_empty() || v.len() > 32 {
        return Err(Rejection::new(
            ErrorCode::InvalidIdentifier,
            field,
            format!("must be 1 to 32 characters, got {}", v.chars().count()),
        ));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(Rejection::new(
            ErrorCode::InvalidIdentifier,
            field,
            format!("character {c:?} is not allowed (only 0-9, A-Z, a-z, _ and -)"),
        ));
    }
    Ok(())
}

fn check_text(field: &str, v: &str, max_chars: usize) -> Result<(), Rejection> {
    let n = v.chars().count();
    if n > max_chars {
        return Err(Rejection::new(
            ErrorCode::TooLong,
            field,
            format!("at most {max_chars} characters allowed, got {n}"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(Rejection::new(
            ErrorCode::ControlCharacter,
            field,
            "control characters are not allowed",
        ));
    }
    Ok(())
}

impl RefundRequest {
    /// Checks every rule of DESIGN §3 that the type system does not already enforce.
    pub fn validate(&self) -> Result<(), Rejection> {
        if self.version != 1 {
            return Err(Rejection::new(
                ErrorCode::UnsupportedVersion,
                "version",
                format!("unsupported version {}, expected 1", self.version),
            ));
        }
        check_id("refund_no", &self.refund_no)?;
        check_id("order_no", &self.order_no)?;
        // No merchant is configured under the empty name: the rule it breaks is that one.
        if self.merchant.is_empty() {
            return Err(Rejection::new(
                ErrorCode::UnknownMerchant,
                "merchant",
                "must not be empty",
            ));
        }
        check_text("merchant", &self.merchant, 64)?;
        if self.total_fee < 1 || self.total_fee > MAX_TOTAL_FEE {
            return Err(Rejection::new(
                ErrorCode::InvalidAmount,
                "total_fee",
                format!(
                    "must be between 1 and {MAX_TOTAL_FEE} fen, got {}",
                    self.total_fee
                ),
            ));
        }
        if self.refund_fee < 1 {
            return Err(Rejection::new(
                ErrorCode::InvalidAmount,
                "refund_fee",
                format!("must be at least 1 fen, got {}", self.refund_fee),
            ));
        }
        if self.refund_fee > self.total_fee {
            return Err(Rejection::new(
                ErrorCode::OverTotalFee,
                "refund_fee",
                format!("{} exceeds total_fee {}", self.refund_fee, self.total_fee),
            ));
        }
        if let Some(reason) = &self.reason {
            check_text("reason", reason, 128)?;
        }
        if let Some(at) = &self.requested_at {
            chrono::DateTime::parse_from_rfc3339(at).map_err(|e| {
                Rejection::new(
                    ErrorCode::InvalidTimestamp,
                    "requested_at",
                    format!("not an RFC 3339 timestamp: {e}"),
                )
            })?;
        }
        match (self.provider, &self.wupay) {
            (ProviderKind::Wupay, None) => {
                return Err(Rejection::new(
                    ErrorCode::MissingField,
                    "wupay",
                    "required when provider is wupay",
                ));
            }
            (_, Some(w)) => {
                for (name, v) in [
                    ("wupay.pay_nd", &w.pay_nd),
                    ("wupay.auth_type", &w.auth_type),
                    ("wupay.rec_organ", &w.rec_organ),
                    ("wupay.rec_device", &w.rec_device),
                    ("wupay.rec_man", &w.rec_man),
                ] {
                    check_text(name, v, 64)?;
                }
            }
            (ProviderKind::Shengpay, None) => {}
        }
        Ok(())
    }

    /// The canonical JSON form: fixed field order, no insignificant whitespace.
    pub fn canonical_json(&self) -> String {
        // Serialising a struct of strings, integers and enums cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// SHA-256 of the canonical form: equal for duplicates, different for conflicts.
    pub fn content_hash(&self) -> [u8; 32] {
        content_hash_of(&self.canonical_json())
    }

    /// ShengPay's refund account, if the request names one.
    pub fn refund_account(&self) -> Option<RefundAccount> {
        self.shengpay.as_ref().and_then(|s| s.refund_account)
    }
}

/// Best effort to read `refund_no` out of a body that failed validation, so a rejection can be
/// tied to the refund it was meant to be (and an event can name it). Never trusted for anything
/// else.
pub fn sniff_refund_no(body: &[u8]) -> Option<String> {
    read_what_parses(body).refund_no
}

/// What could be read of a refused message's identifying fields, for its answer: each field
/// that is there once, of its type and within its own rule (an identifier that breaks its rule
/// is not echoed: it could be anything, of any length). Nothing is read from a body that is
/// not UTF-8 or not one JSON object; a field given twice is not read (which of the two would
/// it be?).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readable {
    pub refund_no: Option<String>,
    pub order_no: Option<String>,
    pub provider: Option<ProviderKind>,
    pub merchant: Option<String>,
    pub refund_fee: Option<i64>,
}

/// The top-level keys [`read_what_parses`] reads.
const READ_KEYS: [&str; 5] = [
    "refund_no",
    "order_no",
    "provider",
    "merchant",
    "refund_fee",
];

/// A JSON object's top-level entries of [`READ_KEYS`] as they came, repeated keys kept (a map
/// would keep one of them silently). Every other value is skipped unread, so reading an
/// oversized body for its `refund_no` builds no copy of its bulk.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = m.next_key::<String>()? {
                    if READ_KEYS.contains(&key.as_str()) {
                        out.push((key, m.next_value::<serde_json::Value>()?));
                    } else {
                        m.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads what it can of a message that may not be valid; see [`Readable`].
pub fn read_what_parses(body: &[u8]) -> Readable {
    use serde_json::Value;
    let Ok(text) = std::str::from_utf8(body) else {
        return Readable::default();
    };
    let Ok(Entries(entries)) = serde_json::from_str::<Entries>(text) else {
        return Readable::default();
    };
    let once = |key: &str| {
        let mut hits = entries.iter().filter(|(k, _)| k == key).map(|(_, v)| v);
        match (hits.next(), hits.next()) {
            (Some(v), None) => Some(v),
            _ => None,
        }
    };
    let id = |field: &str| match once(field) {
        Some(Value::String(s)) if check_id(field, s).is_ok() => Some(s.clone()),
        _ => None,
    };
    Readable {
        refund_no: id("refund_no"),
        order_no: id("order_no"),
        provider: match once("provider") {
            Some(Value::String(p)) => p.parse().ok(),
            _ => None,
        },
        merchant: match once("merchant") {
            Some(Value::String(m)) if !m.is_empty() && check_text("merchant", m, 64).is_ok() => {
                Some(m.clone())
            }
            _ => None,
        },
        refund_fee: once("refund_fee").and_then(Value::as_i64),
    }
}

/// The content hash of a request's canonical JSON (what [`RefundRequest::content_hash`]
/// computes, for a caller that already holds the canonical form).
pub fn content_hash_of(canonical_json: &str) -> [u8; 32] {
    Sha256::digest(canonical_json.as_bytes()).into()
}

/// An amount of fen in yuan, `-1234567` → `-12,345.67`: integer arithmetic only.
pub fn yuan(fen: i64) -> String {
    let a = fen.unsigned_abs();
    let digits = (a / 100).to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{}{grouped}.{:02}", if fen < 0 { "-" } else { "" }, a % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn valid() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "refund_no": "R2026112100000001",
            "order_no": "O2026112100000001",
            "provider": "shengpay",
            "merchant": "93751497",
            "total_fee": 1000,
            "refund_fee": 100,
            "reason": "customer returned goods",
            "requested_at": "2026-11-21T10:00:00+08:00",
            "shengpay": { "refund_account": "UNSETTLED" },
        })
    }

    fn reject(body: &[u8]) -> Rejection {
        parse_request(body).expect_err("should be rejected")
    }

    #[test]
    fn a_rejection_that_echoes_a_nul_or_control_character_writes_it_escaped() {
        let unknown = reject(&with(|v| v["a\u{0}b"] = 1.into()));
        assert_eq!(unknown.field, "a\\u{0}b");
        assert!(!unknown.reason.contains('\0'), "{}", unknown.reason);
        let variant = reject(&with(|v| v["provider"] = "shengpay\u{0}\u{7}".into()));
        assert_eq!(variant.field, "provider");
        assert!(
            variant.reason.contains("shengpay\\u{0}\\u{7}"),
            "{}",
            variant.reason
        );
    }

    fn with(f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v = valid();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn the_design_example_is_accepted() {
        let r = parse_request(&serde_json::to_vec(&valid()).unwrap()).unwrap();
        assert_eq!(r.refund_fee, 100);
        assert_eq!(r.refund_account(), Some(RefundAccount::Unsettled));
    }

    #[test]
    fn every_rejection_names_its_field() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with(|v| v["version"] = 2.into()), "version"),
            (with(|v| v["refund_no"] = "".into()), "refund_no"),
            (with(|v| v["refund_no"] = "R 1".into()), "refund_no"),
            (
                with(|v| v["refund_no"] = "R".repeat(33).into()),
                "refund_no",
            ),
            (with(|v| v["order_no"] = "O/1".into()), "order_no"),
            (with(|v| v["provider"] = "paypal".into()), "provider"),
            (with(|v| v["total_fee"] = 0.into()), "total_fee"),
            (
                with(|v| v["total_fee"] = 100_000_000_001i64.into()),
                "total_fee",
            ),
            (with(|v| v["refund_fee"] = 0.into()), "refund_fee"),
            (with(|v| v["refund_fee"] = 1001.into()), "refund_fee"),
            (
                with(|v| v["refund_fee"] = serde_json::json!(1.5)),
                "refund_fee",
            ),
            (
                with(|v| v["refund_fee"] = serde_json::json!(100.0)),
                "refund_fee",
            ),
            (with(|v| v["total_fee"] = "1000".into()), "total_fee"),
            (with(|v| v["reason"] = "a\u{7}b".into()), "reason"),
            (with(|v| v["reason"] = "x".repeat(129).into()), "reason"),
            (
                with(|v| v["requested_at"] = "yesterday".into()),
                "requested_at",
            ),
            (
                with(|v| v["shengpay"]["refund_account"] = "OTHER".into()),
                "shengpay.refund_account",
            ),
            (
                with(|v| v["shengpay"]["extra"] = 1.into()),
                "shengpay.extra",
            ),
            (with(|v| v["colour"] = "red".into()), "colour"),
            (with(|v| v["provider"] = "wupay".into()), "wupay"),
            (
                with(|v| {
                    v["provider"] = "wupay".into();
                    v["wupay"] = serde_json::json!({"pay_nd":"P","auth_type":"1","rec_organ":"S","rec_device":"T"});
                }),
                "wupay.rec_man",
            ),
            (
                with(|v| {
                    v["provider"] = "wupay".into();
                    v["wupay"] = serde_json::json!({"pay_nd":"P\n","auth_type":"1","rec_organ":"S","rec_device":"T","rec_man":"m"});
                }),
                "wupay.pay_nd",
            ),
            (
                with(|v| {
                    v.as_object_mut().unwrap().remove("merchant");
                }),
                "merchant",
            ),
        ];
        for (body, field) in cases {
            let r = reject(&body);
            assert_eq!(r.field, field, "{} -> {r}", String::from_utf8_lossy(&body));
        }
    }

    #[test]
    fn every_rejection_names_the_rule_it_breaks() {
        use ErrorCode::*;
        let wupay = |f: &dyn Fn(&mut serde_json::Value)| {
            with(|v| {
                v["provider"] = "wupay".into();
                v["wupay"] = serde_json::json!({"pay_nd":"P","auth_type":"1","rec_organ":"S","rec_device":"T","rec_man":"m"});
                f(v);
            })
        };
        let mut trailing = serde_json::to_vec(&valid()).unwrap();
        trailing.extend_from_slice(b" {}");
        let cases: Vec<(Vec<u8>, ErrorCode, &str)> = vec![
            (
                with(|v| v["reason"] = "x".repeat(70 * 1024).into()),
                TooLarge,
                "$",
            ),
            (b"{\"reason\":\"\xff\"}".to_vec(), InvalidUtf8, "$"),
            (b"not json".to_vec(), NotJson, "$"),
            (b"".to_vec(), NotJson, "$"),
            (b"{\"version\":1,".to_vec(), NotJson, "$"),
            (trailing, NotJson, "$"),
            (b"[]".to_vec(), WrongType, "$"),
            (b" null".to_vec(), WrongType, "$"),
            (
                br#"[1,"R1","O1","shengpay","m",10,1,null,null,null,null]"#.to_vec(),
                WrongType,
                "$",
            ),
            (with(|v| v["colour"] = "red".into()), UnknownField, "colour"),
            (
                br#"{"version":1,"version":1,"refund_no":"R1"}"#.to_vec(),
                DuplicateField,
                "version",
            ),
            (
                with(|v| {
                    v.as_object_mut().unwrap().remove("order_no");
                }),
                MissingField,
                "order_no",
            ),
            (
                with(|v| v["provider"] = "wupay".into()),
                MissingField,
                "wupay",
            ),
            (
                with(|v| v["refund_fee"] = 1.5.into()),
                WrongType,
                "refund_fee",
            ),
            (with(|v| v["version"] = "1".into()), WrongType, "version"),
            (with(|v| v["reason"] = 7.into()), WrongType, "reason"),
            (
                with(|v| v["version"] = 2.into()),
                UnsupportedVersion,
                "version",
            ),
            (
                with(|v| v["version"] = u64::MAX.into()),
                UnsupportedVersion,
                "version",
            ),
            (
                with(|v| v["order_no"] = "O/1".into()),
                InvalidIdentifier,
                "order_no",
            ),
            (
                with(|v| v["refund_no"] = "".into()),
                InvalidIdentifier,
                "refund_no",
            ),
            (
                with(|v| v["provider"] = "paypal".into()),
                UnknownValue,
                "provider",
            ),
            (
                with(|v| v["shengpay"]["refund_account"] = "OTHER".into()),
                UnknownValue,
                "shengpay.refund_account",
            ),
            (
                with(|v| v["total_fee"] = 0.into()),
                InvalidAmount,
                "total_fee",
            ),
            (
                with(|v| v["refund_fee"] = (-5).into()),
                InvalidAmount,
                "refund_fee",
            ),
            (
                with(|v| v["refund_fee"] = u64::MAX.into()),
                InvalidAmount,
                "refund_fee",
            ),
            (
                with(|v| v["refund_fee"] = 1001.into()),
                OverTotalFee,
                "refund_fee",
            ),
            (
                with(|v| v["merchant"] = "m".repeat(65).into()),
                TooLong,
                "merchant",
            ),
            (
                wupay(&|v| v["wupay"]["auth_type"] = "1".repeat(65).into()),
                TooLong,
                "wupay.auth_type",
            ),
            (
                with(|v| v["reason"] = "a\tb".into()),
                ControlCharacter,
                "reason",
            ),
            (
                with(|v| v["requested_at"] = "2026-11-21".into()),
                InvalidTimestamp,
                "requested_at",
            ),
            (
                with(|v| v["merchant"] = "".into()),
                UnknownMerchant,
                "merchant",
            ),
        ];
        for (body, code, field) in cases {
            let r = reject(&body);
            assert_eq!(
                (r.code, r.field.as_str()),
                (code, field),
                "{} -> {r}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            );
        }
    }

    #[test]
    fn error_codes_are_distinct_and_written_as_upper_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                "{s}"
            );
            assert_eq!(serde_json::to_value(code).unwrap(), s);
        }
    }

    #[test]
    fn docs_events_md_lists_every_error_code_and_no_other() {
        let doc = include_str!("../../docs/events.md");
        // The table between the markers: rows of the form "| `CODE` | ...".
        let table = doc
            .split_once("<!-- error-codes -->")
            .and_then(|(_, rest)| rest.split_once("<!-- /error-codes -->"))
            .map(|(table, _)| table)
            .expect("docs/events.md marks its table of codes");
        let documented: Vec<&str> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(documented, codes, "docs/events.md's table, in this order");
    }

    #[test]
    fn what_parses_of_an_invalid_message_is_read_and_nothing_else() {
        let r = read_what_parses(&with(|v| {
            v["refund_fee"] = 7.into();
            v["order_no"] = "not an id".into();
            v["provider"] = "paypal".into();
            v["colour"] = "red".into();
        }));
        assert_eq!(
            r,
            Readable {
                refund_no: Some("R2026112100000001".into()),
                order_no: None,
                provider: None,
                merchant: Some("93751497".into()),
                refund_fee: Some(7),
            }
        );
        assert_eq!(read_what_parses(b"[1]"), Readable::default());
        assert_eq!(
            read_what_parses(b"{\"refund_no\":\"R1\",\"reason\":\"\xff\"}"),
            Readable::default()
        );
        let dup = br#"{"refund_no":"R1","refund_no":"R2","merchant":"m"}"#;
        assert_eq!(
            read_what_parses(dup),
            Readable {
                merchant: Some("m".into()),
                ..Readable::default()
            }
        );
    }

    #[test]
    fn unknown_and_missing_fields_are_named_in_the_reason() {
        let r = reject(&with(|v| v["colour"] = "red".into()));
        assert!(r.reason.contains("colour"), "{r}");
        let r = reject(&with(|v| {
            v.as_object_mut().unwrap().remove("merchant");
        }));
        assert!(r.reason.contains("merchant"), "{r}");
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let body = br#"{"version":1,"refund_no":"R1","refund_no":"R2","order_no":"O1","provider":"shengpay","merchant":"m","total_fee":10,"refund_fee":1}"#;
        let r = reject(body);
        assert!(r.reason.contains("duplicate field `refund_no`"), "{r}");
        assert_eq!(r.field, "refund_no");
    }

    #[test]
    fn invalid_utf8_oversized_and_non_json_bodies_are_rejected() {
        assert_eq!(reject(b"{\"version\":1,\"reason\":\"\xff\"}").field, "$");
        let big = with(|v| v["reason"] = "x".repeat(70 * 1024).into());
        assert!(reject(&big).reason.contains("more than"));
        assert_eq!(reject(b"not json").field, "$");
        assert_eq!(reject(b"[]").field, "$");
        let mut trailing = serde_json::to_vec(&valid()).unwrap();
        trailing.extend_from_slice(b" {}");
        assert!(reject(&trailing).reason.contains("trailing"));
    }

    #[test]
    fn canonical_form_ignores_whitespace_and_key_order() {
        let a = parse_request(&serde_json::to_vec(&valid()).unwrap()).unwrap();
        let text = serde_json::to_string_pretty(&valid()).unwrap();
        let b = parse_request(text.as_bytes()).unwrap();
        assert_eq!(a.content_hash(), b.content_hash());
        let c = parse_request(&with(|v| v["refund_fee"] = 101.into())).unwrap();
        assert_ne!(a.content_hash(), c.content_hash());
    }

    #[test]
    fn refund_no_is_sniffed_from_invalid_messages_when_it_is_well_formed() {
        assert_eq!(
            sniff_refund_no(&with(|v| v["refund_fee"] = 1.5.into())).as_deref(),
            Some("R2026112100000001")
        );
        assert_eq!(sniff_refund_no(b"\xff"), None);
    }
}
