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

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, PKeyRef, Private, Public};
use openssl::rsa::Padding;
use openssl::sign::{Signer, Verifier};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::codes::CodeTable;
use super::http::{self, TransportError};
use super::keys;
use super::{AttemptRecord, CodeClass, Outcome, Provider, RefundCall};
use crate::config::{ConfigError, HttpConfig, ShengpayMerchant, SignType};
use crate::job::{ProviderKind, RefundRequest, Rejection};

/// The refund endpoint, relative to a merchant's `base_url`.
pub const REFUND_PATH: &str = "/api/v1/payment/refund";
/// Length of `nonceStr` (the seed's maximum, `String(32)`).
pub const NONCE_LEN: usize = 32;
/// The field that carries the signature; it is never part of the string to sign.
pub const SIGN_FIELD: &str = "sign";
/// What replaces the signature in the recorded request.
pub const REDACTED: &str = "***";

const SUCCESS: &str = "SUCCESS";
const FAIL: &str = "FAIL";

// ---------------------------------------------------------------------------------------------
// The string to sign and the signature
// ---------------------------------------------------------------------------------------------

/// The string to sign (DESIGN §5): every field except `sign`, empty values dropped, keys sorted
/// by ASCII byte order, `k=v` joined with `&`, raw values (no URL-encoding).
///
/// Nulls have no `&str` form; callers holding JSON drop them before (as [`ResponseFields`] and
/// [`signed_json`] do).
pub fn canonical_string<K: AsRef<str>, V: AsRef<str>>(fields: &[(K, V)]) -> String {
    let mut kept: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_ref(), v.as_ref()))
        .filter(|(k, v)| *k != SIGN_FIELD && !v.is_empty())
        .collect();
    // `str` orders by bytes, which for these keys is ASCII order; stable so that equal keys
    // (impossible in a verified response, see `ResponseFields::parse`) keep their order.
    kept.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = String::new();
    for (i, (k, v)) in kept.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Why a body was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// OpenSSL failed (a key that cannot sign, an allocation failure).
    #[error("signing failed: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
    /// A field would make the string to sign ambiguous (see [`is_ambiguous`]).
    #[error(
        "refusing to sign: field `{field}` contains `&` or `=`, so another set of fields could \
         sign alike"
    )]
    Ambiguous { field: String },
}

/// Whether a key or value would make the string to sign ambiguous. Values are joined raw as
/// `k=v&…`, so `refundDesc` = `a=1&refundFee=1` signs exactly like `refundDesc` = `a` plus a
/// second field `refundFee` = `1`: the platform could not tell which one we signed.
pub fn is_ambiguous(text: &str) -> bool {
    text.contains(['&', '='])
}

fn digest(sign_type: SignType) -> MessageDigest {
    match sign_type {
        SignType::Rsa => MessageDigest::sha1(),
        SignType::Rsa2 => MessageDigest::sha256(),
    }
}

/// Signs `canonical` with PKCS#1 v1.5 (SHA1 for `RSA`, SHA256 for `RSA2`), base64 standard.
/// Deterministic: the same key and text always give the same signature.
pub fn sign(
    key: &PKeyRef<Private>,
    sign_type: SignType,
    canonical: &str,
) -> Result<String, SignError> {
    let mut signer = Signer::new(digest(sign_type), key)?;
    signer.set_rsa_padding(Padding::PKCS1)?;
    signer.update(canonical.as_bytes())?;
    Ok(STANDARD.encode(signer.sign_to_vec()?))
}

/// Whether `signature_b64` is a valid signature of `canonical` by `key`. Anything malformed
/// (bad base64, wrong length, OpenSSL error) is simply "does not verify".
pub fn verify(
    key: &PKeyRef<Public>,
    sign_type: SignType,
    canonical: &str,
    signature_b64: &str,
) -> bool {
    // Some gateways wrap long base64 values; whitespace is never part of a signature.
    let compact: String = signature_b64
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let Ok(signature) = STANDARD.decode(compact.as_bytes()) else {
        return false;
    };
    let check = || -> Result<bool, openssl::error::ErrorStack> {
        let mut verifier = Verifier::new(digest(sign_type), key)?;
        verifier.set_rsa_padding(Padding::PKCS1)?;
        verifier.update(canonical.as_bytes())?;
        verifier.verify(&signature)
    };
    check().unwrap_or(false)
}

/// A signed JSON body and the same body with the signature redacted (for the attempt record).
#[derive(Clone, PartialEq, Eq)]
pub struct SignedJson {
    pub body: String,
    pub redacted: String,
}

impl fmt::Debug for SignedJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The body holds the signature; Debug shows only the redacted form.
        f.debug_struct("SignedJson")
            .field("redacted", &self.redacted)
            .finish_non_exhaustive()
    }
}

/// The signing text of one JSON value: strings unquoted, null and "" dropped, anything else as
/// the compact JSON text `serde_json` writes for it (which is what the body will contain).
fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => serde_json::to_string(other).ok(),
    }
}

/// Signs a flat JSON object the ShengPay way and returns the body with `sign` added (any `sign`
/// already present is replaced). Used for our requests (and by tests, for responses).
///
/// Refuses a key or value containing `&` or `=`. Intake already rejects such requests
/// ([`signable`]) and merchant values are checked when the client is built; this is the last
/// line, so that a path that skipped those checks still never sends an ambiguous signature.
pub fn signed_json(
    mut fields: Map<String, Value>,
    key: &PKeyRef<Private>,
    sign_type: SignType,
) -> Result<SignedJson, SignError> {
    fields.remove(SIGN_FIELD);
    let pairs: Vec<(String, String)> = fields
        .iter()
        .filter_map(|(k, v)| value_text(v).map(|t| (k.clone(), t)))
        .collect();
    if let Some((k, _)) = pairs
        .iter()
        .find(|(k, v)| is_ambiguous(k) || is_ambiguous(v))
    {
        return Err(SignError::Ambiguous { field: k.clone() });
    }
    let signature = sign(key, sign_type, &canonical_string(&pairs))?;
    fields.insert(SIGN_FIELD.to_owned(), Value::String(REDACTED.to_owned()));
    let redacted = Value::Object(fields.clone()).to_string();
    fields.insert(SIGN_FIELD.to_owned(), Value::String(signature));
    Ok(SignedJson {
        body: Value::Object(fields).to_string(),
        redacted,
    })
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// A fresh `nonceStr`: 32 random ASCII alphanumerics.
pub fn new_nonce() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(NONCE_LEN)
        .map(char::from)
        .collect()
}

/// The merchant-side values a refund request carries besides the refund itself.
#[derive(Debug, Clone, Copy)]
pub struct MerchantParams<'a> {
    pub app_id: &'a str,
    pub mch_id: &'a str,
    pub notify_url: &'a str,
    pub sign_type: SignType,
}

/// One request field that comes from the refund message rather than from merchant config.
struct FromRequest {
    /// The ShengPay field name.
    wire: &'static str,
    /// The message field it comes from (DESIGN §3), as intake rejections name it.
    source: &'static str,
    value: Value,
}

/// Every field of the request body that carries a value of the refund message. The request
/// builder and the intake check ([`signable`]) both read this one list, so a field added here
/// is checked without anyone having to remember to.
fn from_request(request: &RefundRequest) -> Vec<FromRequest> {
    let field = |wire, source, value: Value| FromRequest {
        wire,
        source,
        value,
    };
    let mut out = vec![
        field("outTradeNo", "order_no", request.order_no.as_str().into()),
        field(
            "outRefundNo",
            "refund_no",
            request.refund_no.as_str().into(),
        ),
        field("totalFee", "total_fee", request.total_fee.into()),
        field("refundFee", "refund_fee", request.refund_fee.into()),
    ];
    if let Some(reason) = request.reason.as_deref().filter(|r| !r.is_empty()) {
        out.push(field("refundDesc", "reason", reason.into()));
    }
    if let Some(account) = request.refund_account() {
        out.push(field(
            "refundAccount",
            "shengpay.refund_account",
            account.as_str().into(),
        ));
    }
    out
}

/// Whether every value `request` puts into the string to sign can be signed unambiguously
/// (DESIGN §5: no `&` or `=`). The rejection names the message field. Merchant values
/// (`appId`, `mchId`, `notifyUrl`) are checked once, when the client is built.
pub fn signable(request: &RefundRequest) -> Result<(), Rejection> {
    for f in from_request(request) {
        if value_text(&f.value).is_some_and(|t| is_ambiguous(&t)) {
            return Err(Rejection::new(
                f.source,
                format!(
                    "must not contain `&` or `=`: ShengPay signs `{}` joined raw as k=v&..., \
                     so such a value could sign like a different set of fields",
                    f.wire
                ),
            ));
        }
    }
    Ok(())
}

/// The unsigned request fields for `request` (everything but `sign`). Fees are JSON integers;
/// `refundDesc` and `refundAccount` only when the request has them.
pub fn refund_fields(
    merchant: &MerchantParams<'_>,
    request: &RefundRequest,
    nonce: &str,
) -> Map<String, Value> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    put("appId", merchant.app_id.into());
    put("mchId", merchant.mch_id.into());
    put("nonceStr", nonce.into());
    put("notifyUrl", merchant.notify_url.into());
    put("signType", merchant.sign_type.as_str().into());
    for f in from_request(request) {
        put(f.wire, f.value);
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Responses: raw fields
// ---------------------------------------------------------------------------------------------

/// Why a response body could not be read as a ShengPay answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response is not a JSON object: {0}")]
    NotJson(String),
    #[error("response repeats field `{0}`, so what was signed is ambiguous")]
    DuplicateField(String),
    #[error("response field `{field}`: {reason}")]
    BadField { field: String, reason: String },
    #[error("response lacks field `{0}`")]
    Missing(String),
}

fn bad(field: &str, reason: impl Into<String>) -> ResponseError {
    ResponseError::BadField {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// One top-level field of a response, as it appeared in the JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawField {
    Null,
    /// A JSON string with its escapes decoded.
    Str(String),
    /// A number, boolean, object or array: its JSON text exactly as written.
    Json(String),
}

impl RawField {
    fn from_raw(raw: &RawValue) -> Result<Self, serde_json::Error> {
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<String>(text).map(RawField::Str),
            Some(b'n') => Ok(RawField::Null),
            _ => Ok(RawField::Json(text.to_owned())),
        }
    }

    /// The text that is signed for this value; `None` when the field is left out (null, "").
    pub fn signed_text(&self) -> Option<&str> {
        match self {
            RawField::Null => None,
            RawField::Str(s) | RawField::Json(s) if s.is_empty() => None,
            RawField::Str(s) | RawField::Json(s) => Some(s),
        }
    }
}

/// Top-level object as written, keeping duplicates (serde_json's `Map` would silently keep the
/// last one, letting a signed value and a read value differ).
struct RawObject(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push(entry);
                }
                Ok(RawObject(out))
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

/// A response (or notify callback) body as raw, unique, top-level fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseFields {
    fields: BTreeMap<String, RawField>,
}

/// Why a body's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Parse(#[from] ResponseError),
    #[error("response carries no sign")]
    Unsigned,
    #[error("response signType {found:?} is not the configured {expected}")]
    SignTypeMismatch {
        found: String,
        expected: &'static str,
    },
    #[error("response signature does not verify")]
    BadSignature,
}

impl ResponseFields {
    /// Parses a body. Never panics, whatever the bytes: anything but one JSON object with
    /// unique keys is an error.
    pub fn parse(body: &[u8]) -> Result<Self, ResponseError> {
        let RawObject(entries) =
            serde_json::from_slice(body).map_err(|e| ResponseError::NotJson(e.to_string()))?;
        let mut fields = BTreeMap::new();
        for (name, raw) in entries {
            let value = RawField::from_raw(&raw).map_err(|e| bad(&name, e.to_string()))?;
            if fields.contains_key(&name) {
                return Err(ResponseError::DuplicateField(name));
            }
            fields.insert(name, value);
        }
        Ok(Self { fields })
    }

    /// The string the platform signed: every field but `sign`, values as written.
    pub fn canonical(&self) -> String {
        let pairs: Vec<(&str, &str)> = self
            .fields
            .iter()
            .filter_map(|(k, v)| v.signed_text().map(|t| (k.as_str(), t)))
            .collect();
        canonical_string(&pairs)
    }

    /// One field, if present.
    pub fn get(&self, name: &str) -> Option<&RawField> {
        self.fields.get(name)
    }

    /// Every field, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawField)> {
        self.fields.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether the body carries a signature at all (null and "" count as none).
    pub fn is_signed(&self) -> bool {
        self.get(SIGN_FIELD)
            .is_some_and(|v| v.signed_text().is_some())
    }

    /// Checks the signature with the platform key. The algorithm is the merchant's configured
    /// one; a `signType` naming another is refused rather than followed, so a response cannot
    /// choose a weaker hash than the one configured.
    pub fn verify(&self, key: &PKeyRef<Public>, sign_type: SignType) -> Result<(), VerifyError> {
        let signature = match self.get(SIGN_FIELD) {
            None | Some(RawField::Null) => return Err(VerifyError::Unsigned),
            Some(RawField::Str(s)) if s.is_empty() => return Err(VerifyError::Unsigned),
            Some(RawField::Str(s)) => s,
            Some(RawField::Json(_)) => return Err(VerifyError::BadSignature),
        };
        match self.get("signType").and_then(RawField::signed_text) {
            None => {}
            Some(t) if t == sign_type.as_str() => {}
            Some(t) => {
                return Err(VerifyError::SignTypeMismatch {
                    found: t.chars().take(16).collect(),
                    expected: sign_type.as_str(),
                });
            }
        }
        if verify(key, sign_type, &self.canonical(), signature) {
            Ok(())
        } else {
            Err(VerifyError::BadSignature)
        }
    }

    /// A text field: a JSON string (or a number's text, which some gateways send for ids).
    /// Null and "" read as absent, like they are for signing.
    pub fn string(&self, name: &str) -> Result<Option<&str>, ResponseError> {
        match self.get(name) {
            None | Some(RawField::Null) => Ok(None),
            Some(RawField::Str(s)) => Ok(Some(s.as_str()).filter(|s| !s.is_empty())),
            Some(RawField::Json(t)) if t.starts_with(|c: char| c.is_ascii_digit()) => {
                Ok(Some(t.as_str()))
            }
            Some(RawField::Json(_)) => Err(bad(name, "expected a string")),
        }
    }

    /// An amount in fen: a JSON integer or a string of ASCII digits, parsed straight into
    /// `i64`. `10.0`, `1e3`, `-1`, `+1`, ` 1` and values beyond `i64` are refused: a float or a
    /// guess is never booked.
    pub fn amount(&self, name: &str) -> Result<Option<i64>, ResponseError> {
        let text = match self.get(name) {
            None | Some(RawField::Null) => return Ok(None),
            Some(RawField::Str(s)) if s.is_empty() => return Ok(None),
            Some(RawField::Str(s)) | Some(RawField::Json(s)) => s,
        };
        parse_fen(text)
            .map(Some)
            .map_err(|reason| bad(name, reason))
    }
}

/// Digits only, into `i64`, never through a float.
pub fn parse_fen(text: &str) -> Result<i64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a whole, non-negative number of fen".to_owned());
    }
    text.parse::<i64>()
        .map_err(|_| "amount is too large".to_owned())
}

/// Parses a body and checks its signature, as [`classify_response`] does: for notify callbacks
/// and for tools (the simulator) that receive our signed requests.
pub fn verify_body(
    body: &[u8],
    key: &PKeyRef<Public>,
    sign_type: SignType,
) -> Result<ResponseFields, VerifyError> {
    let fields = ResponseFields::parse(body)?;
    fields.verify(key, sign_type)?;
    Ok(fields)
}

// ---------------------------------------------------------------------------------------------
// Responses: typed
// ---------------------------------------------------------------------------------------------

/// One coupon of a refund (`couponRefundId$n`, `couponType$n`, `couponRefundFee$n`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Coupon {
    pub index: u32,
    pub id: Option<String>,
    pub coupon_type: Option<String>,
    pub fee: Option<i64>,
}

/// A refund response, typed. Every field is optional here; what an outcome requires is checked
/// where the outcome is decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefundResponse {
    pub return_code: Option<String>,
    pub return_msg: Option<String>,
    pub result_code: Option<String>,
    pub error_code: Option<String>,
    pub error_code_des: Option<String>,
    pub mch_id: Option<String>,
    pub app_id: Option<String>,
    pub transaction_id: Option<String>,
    pub out_trade_no: Option<String>,
    pub out_refund_no: Option<String>,
    pub refund_id: Option<String>,
    pub refund_fee: Option<i64>,
    pub settlement_refund_fee: Option<i64>,
    pub total_fee: Option<i64>,
    pub settlement_total_fee: Option<i64>,
    pub coupon_refund_count: Option<i64>,
    pub coupon_refund_fee: Option<i64>,
    /// In index order.
    pub coupons: Vec<Coupon>,
    pub nonce_str: Option<String>,
    pub sign_type: Option<String>,
}

/// `couponRefundId0` → 0 for `prefix` `couponRefundId`; `None` for anything else, including
/// non-canonical indexes such as `01`, which would otherwise alias `1`.
fn coupon_index(name: &str, prefix: &str) -> Option<Result<u32, ResponseError>> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    Some(
        digits
            .parse::<u32>()
            .map_err(|_| bad(name, "coupon index is too large")),
    )
}

impl RefundResponse {
    /// Reads the typed view. Fails on a malformed amount or a non-text text field.
    pub fn from_fields(f: &ResponseFields) -> Result<Self, ResponseError> {
        let s = |name: &str| f.string(name).map(|v| v.map(str::to_owned));
        let mut coupons: BTreeMap<u32, Coupon> = BTreeMap::new();
        for (name, _) in f.iter() {
            // `couponRefundFee` alone is the total, so only suffixed names are per coupon.
            if let Some(i) = coupon_index(name, "couponRefundId") {
                let i = i?;
                coupons.entry(i).or_default().id = s(name)?;
            } else if let Some(i) = coupon_index(name, "couponType") {
                let i = i?;
                coupons.entry(i).or_default().coupon_type = s(name)?;
            } else if let Some(i) = coupon_index(name, "couponRefundFee") {
                let i = i?;
                coupons.entry(i).or_default().fee = f.amount(name)?;
            }
        }
        let coupons = coupons
            .into_iter()
            .map(|(index, c)| Coupon { index, ..c })
            .collect();
        Ok(Self {
            return_code: s("returnCode")?,
            return_msg: s("returnMsg")?,
            result_code: s("resultCode")?,
            error_code: s("errorCode")?,
            error_code_des: s("errorCodeDes")?,
            mch_id: s("mchId")?,
            app_id: s("appId")?,
            transaction_id: s("transactionId")?,
            out_trade_no: s("outTradeNo")?,
            out_refund_no: s("outRefundNo")?,
            refund_id: s("refundId")?,
            refund_fee: f.amount("refundFee")?,
            settlement_refund_fee: f.amount("settlementRefundFee")?,
            total_fee: f.amount("totalFee")?,
            settlement_total_fee: f.amount("settlementTotalFee")?,
            coupon_refund_count: f.amount("couponRefundCount")?,
            coupon_refund_fee: f.amount("couponRefundFee")?,
            coupons,
            nonce_str: s("nonceStr")?,
            sign_type: s("signType")?,
        })
    }

    /// The coupon part of the refund: `couponRefundFee` if given, else the sum of the
    /// per-coupon fees (checked), else 0.
    pub fn coupon_total(&self) -> Result<i64, ResponseError> {
        if let Some(total) = self.coupon_refund_fee {
            return Ok(total);
        }
        self.coupons
            .iter()
            .filter_map(|c| c.fee)
            .try_fold(0i64, i64::checked_add)
            .ok_or_else(|| bad("couponRefundFee$n", "coupon fees overflow"))
    }
}

// ---------------------------------------------------------------------------------------------
// Classification
// ---------------------------------------------------------------------------------------------

/// What we asked for, to check an accepted response against before booking it.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub refund_no: &'a str,
    pub order_no: &'a str,
    pub refund_fee: i64,
    pub total_fee: i64,
    pub mch_id: &'a str,
    pub app_id: &'a str,
}

/// Everything needed to judge a response.
#[derive(Clone, Copy)]
pub struct Judge<'a> {
    pub platform_key: &'a PKeyRef<Public>,
    pub sign_type: SignType,
    pub codes: &'a CodeTable,
}

fn maybe(error: impl Into<String>, raw: &str) -> Outcome {
    Outcome::MaybeDelivered {
        error: error.into(),
        raw: Some(raw.to_owned()),
    }
}

/// Maps an HTTP answer to an [`Outcome`] (DESIGN §5). Never panics, whatever the bytes.
///
/// - Any non-2xx status is maybe delivered, body kept. 5xx is so by DESIGN; for 4xx we cannot
///   tell ShengPay from a proxy or WAF in front of it, and ShengPay's own verdicts (including
///   refusals) come as signed JSON with 200. ShengPay merchants are idempotent by default, so
///   this costs a retry with the same `outRefundNo`, never a second refund.
/// - A body that is not one JSON object with unique keys is maybe delivered.
/// - Signature: a signed body must verify (else maybe delivered). An *unsigned* body is
///   accepted only as `returnCode` `FAIL` → RequestRejected: the platform answers protocol-level
///   failures (e.g. its own SIGN_ERROR on our request) before it signs, and RequestRejected
///   leads to `dead`, never to `succeeded` or `failed`, so the safety rule "an unverified
///   response never produces succeeded or failed" holds; the operator sees the raw body.
///   A body that carries a sign that does not verify is never trusted, FAIL or not.
/// - The platform signs every answer with one key for all merchants and refunds, so a valid
///   signature only says ShengPay said it, not that it said it about this request: an old
///   signed answer to another refund can be replayed. Hence every outcome below must name
///   this refund (see [`about_another_refund`]); one that names another is maybe delivered,
///   and ShengPay's dedup on `outRefundNo` makes asking again the way to learn the truth.
/// - `returnCode` FAIL (signed or not) → RequestRejected (code `errorCode`, else
///   `RETURN_FAIL`), unless it names another refund, merchant or app. The identifying fields
///   may be absent here: the platform refuses such requests (SIGN_ERROR, MCH_NOT_FOUND)
///   before reading them, and RequestRejected takes the job to `dead` with its amount still
///   held, so a replayed one cannot release money; an operator reads the raw body.
/// - Verified SUCCESS/SUCCESS → Accepted, only if it names our `outRefundNo`, `mchId`, `appId`
///   and `refundFee` (and, where present, our order and total) and has a `refundId` and a
///   `settlementRefundFee` no larger than the refund; otherwise maybe delivered.
/// - Verified SUCCESS/FAIL → only if it names our `outRefundNo`, `mchId` and `appId` (a
///   decline releases the order amount, so one about another refund could let the order
///   system pay twice), the code table on `errorCode` (absent: `RESULT_FAIL`, which the table
///   treats as unknown, i.e. Declined by default); otherwise maybe delivered.
/// - Any other `returnCode`/`resultCode` → maybe delivered (ShengPay dedupes on `outRefundNo`,
///   so asking again is how to learn the result).
pub fn classify_response(
    status: u16,
    body: &[u8],
    expected: &Expected<'_>,
    judge: &Judge<'_>,
) -> Outcome {
    let raw = String::from_utf8_lossy(body).into_owned();
    if !(200..300).contains(&status) {
        return maybe(format!("HTTP {status} from provider"), &raw);
    }
    let fields = match ResponseFields::parse(body) {
        Ok(f) => f,
        Err(e) => return maybe(format!("unreadable response: {e}"), &raw),
    };
    let verified = match fields.verify(judge.platform_key, judge.sign_type) {
        Ok(()) => true,
        Err(VerifyError::Unsigned) => false,
        Err(e) => return maybe(e.to_string(), &raw),
    };
    let resp = match RefundResponse::from_fields(&fields) {
        Ok(r) => r,
        Err(e) => return maybe(format!("unreadable response: {e}"), &raw),
    };
    let return_code = resp.return_code.as_deref();
    if return_code == Some(FAIL) {
        if let Some(why) = about_another_refund(&resp, expected, Presence::IfPresent) {
            return maybe(
                format!("returnCode FAIL is not about this refund: {why}"),
                &raw,
            );
        }
        return Outcome::RequestRejected {
            code: resp
                .error_code
                .clone()
                .unwrap_or_else(|| "RETURN_FAIL".to_owned()),
            message: resp
                .return_msg
                .clone()
                .or_else(|| resp.error_code_des.clone())
                .unwrap_or_default(),
            raw,
        };
    }
    if !verified {
        return maybe("response carries no sign", &raw);
    }
    if return_code != Some(SUCCESS) {
        return maybe(
            format!("unrecognised returnCode {:?}", short(return_code)),
            &raw,
        );
    }
    match resp.result_code.as_deref() {
        Some(SUCCESS) => accepted(&resp, expected, raw),
        Some(FAIL) => {
            if let Some(why) = about_another_refund(&resp, expected, Presence::Required) {
                return maybe(
                    format!("resultCode FAIL is not about this refund: {why}"),
                    &raw,
                );
            }
            let code = resp
                .error_code
                .clone()
                .unwrap_or_else(|| "RESULT_FAIL".to_owned());
            let message = resp
                .error_code_des
                .clone()
                .or_else(|| resp.return_msg.clone())
                .unwrap_or_default();
            match judge.codes.classify(&code) {
                CodeClass::RetryLater => Outcome::RetryLater { code, message, raw },
                CodeClass::Declined => Outcome::Declined { code, message, raw },
                CodeClass::RequestRejected => Outcome::RequestRejected { code, message, raw },
            }
        }
        other => maybe(format!("unrecognised resultCode {:?}", short(other)), &raw),
    }
}

/// Provider text in our error messages is bounded: it is their data, not ours.
fn short(v: Option<&str>) -> Option<String> {
    v.map(|s| s.chars().take(32).collect())
}

/// Whether [`about_another_refund`] insists on the identifying fields being there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    /// A business answer (`resultCode`): ShengPay echoes them, so an answer without them cannot
    /// be shown to be about this refund.
    Required,
    /// A protocol-level refusal (`returnCode` FAIL), which may come before they were read.
    IfPresent,
}

/// Why a response is not about the refund we sent, if it is not: `outRefundNo` names the
/// refund only within a merchant account (`mchId` + `appId`), so all three must be ours;
/// `outTradeNo` is checked when present, as a different order can only mean another refund.
fn about_another_refund(
    resp: &RefundResponse,
    exp: &Expected<'_>,
    presence: Presence,
) -> Option<String> {
    let required = presence == Presence::Required;
    for (name, got, want, needed) in [
        (
            "outRefundNo",
            resp.out_refund_no.as_deref(),
            exp.refund_no,
            required,
        ),
        ("mchId", resp.mch_id.as_deref(), exp.mch_id, required),
        ("appId", resp.app_id.as_deref(), exp.app_id, required),
        (
            "outTradeNo",
            resp.out_trade_no.as_deref(),
            exp.order_no,
            false,
        ),
    ] {
        match got {
            Some(g) if g != want => return Some(format!("{name} is not ours")),
            None if needed => return Some(format!("{name} missing")),
            _ => {}
        }
    }
    None
}

fn accepted(resp: &RefundResponse, exp: &Expected<'_>, raw: String) -> Outcome {
    let mismatch = |what: &str| maybe(format!("accepted response does not match: {what}"), &raw);
    if let Some(why) = about_another_refund(resp, exp, Presence::Required) {
        return mismatch(&why);
    }
    let Some(refund_fee) = resp.refund_fee else {
        return mismatch("refundFee missing");
    };
    if refund_fee != exp.refund_fee {
        return mismatch("refundFee differs from the amount requested");
    }
    if resp.total_fee.is_some_and(|t| t != exp.total_fee) {
        return mismatch("totalFee differs from the order total");
    }
    let Some(provider_refund_id) = resp.refund_id.clone() else {
        return mismatch("refundId missing");
    };
    let Some(settlement_refund_fee) = resp.settlement_refund_fee else {
        return mismatch("settlementRefundFee missing");
    };
    if settlement_refund_fee > refund_fee {
        return mismatch("settlementRefundFee exceeds refundFee");
    }
    let coupon_refund_fee = match resp.coupon_total() {
        Ok(c) if c <= refund_fee => c,
        Ok(_) => return mismatch("couponRefundFee exceeds refundFee"),
        Err(e) => return maybe(format!("unreadable response: {e}"), &raw),
    };
    Outcome::Accepted {
        provider_refund_id,
        refund_fee,
        settlement_refund_fee,
        coupon_refund_fee,
        raw,
    }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// ShengPay client for one merchant account.
pub struct ShengpayClient {
    merchant: String,
    app_id: String,
    mch_id: String,
    notify_url: String,
    sign_type: SignType,
    idempotent: bool,
    url: String,
    http: reqwest::Client,
    max_response_bytes: usize,
    codes: CodeTable,
    private_key: PKey<Private>,
    platform_key: PKey<Public>,
}

impl fmt::Debug for ShengpayClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are left out on purpose.
        f.debug_struct("ShengpayClient")
            .field("merchant", &self.merchant)
            .field("url", &self.url)
            .field("sign_type", &self.sign_type)
            .field("idempotent", &self.idempotent)
            .finish_non_exhaustive()
    }
}

impl ShengpayClient {
    /// Builds the client for `merchant`, loading its private key and ShengPay's public key.
    /// `key_prefix` is the merchant's config path (e.g. `shengpay.merchants[0]`) so that key
    /// errors name `shengpay.merchants[0].private_key_file`.
    pub fn new(
        merchant: &ShengpayMerchant,
        key_prefix: &str,
        http: reqwest::Client,
        http_config: &HttpConfig,
        codes: CodeTable,
    ) -> Result<Self, ConfigError> {
        let private_key = keys::private_key_from_file(
            &format!("{key_prefix}.private_key_file"),
            &merchant.private_key_file,
        )?;
        let platform_key = keys::public_key_from_file(
            &format!("{key_prefix}.platform_public_key_file"),
            &merchant.platform_public_key_file,
        )?;
        Self::with_keys(
            merchant,
            key_prefix,
            private_key,
            platform_key,
            http,
            http_config,
            codes,
        )
    }

    /// Builds the client from keys already loaded (the key file paths in `merchant` are not
    /// read). Merchant values that go into every string to sign are checked here, once, so
    /// that a bad one stops the start naming its config key instead of failing each refund.
    pub fn with_keys(
        merchant: &ShengpayMerchant,
        key_prefix: &str,
        private_key: PKey<Private>,
        platform_key: PKey<Public>,
        http: reqwest::Client,
        http_config: &HttpConfig,
        codes: CodeTable,
    ) -> Result<Self, ConfigError> {
        for (name, value) in [
            ("app_id", &merchant.app_id),
            ("mch_id", &merchant.mch_id),
            ("notify_url", &merchant.notify_url),
        ] {
            if is_ambiguous(value) {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}.{name}"),
                    "must not contain `&` or `=`: ShengPay signs values joined raw as k=v&..., \
                     so such a value could sign like a different set of fields (a notify URL \
                     cannot carry a query string)",
                ));
            }
        }
        Ok(Self {
            merchant: merchant.merchant.clone(),
            app_id: merchant.app_id.clone(),
            mch_id: merchant.mch_id.clone(),
            notify_url: merchant.notify_url.clone(),
            sign_type: merchant.sign_type,
            idempotent: merchant.idempotent,
            url: format!("{}{REFUND_PATH}", merchant.base_url.trim_end_matches('/')),
            http,
            max_response_bytes: http_config.max_response_bytes,
            codes,
            private_key,
            platform_key,
        })
    }

    /// The refund endpoint this client posts to.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn params(&self) -> MerchantParams<'_> {
        MerchantParams {
            app_id: &self.app_id,
            mch_id: &self.mch_id,
            notify_url: &self.notify_url,
            sign_type: self.sign_type,
        }
    }

    /// The signed request body for `request`, with a fresh nonce.
    pub fn build_request(&self, request: &RefundRequest) -> Result<SignedJson, SignError> {
        let fields = refund_fields(&self.params(), request, &new_nonce());
        signed_json(fields, &self.private_key, self.sign_type)
    }

    /// Classifies a response to a refund of `request` (what [`Provider::refund`] does after
    /// the HTTP exchange).
    pub fn classify(&self, request: &RefundRequest, status: u16, body: &[u8]) -> Outcome {
        let expected = Expected {
            refund_no: &request.refund_no,
            order_no: &request.order_no,
            refund_fee: request.refund_fee,
            total_fee: request.total_fee,
            mch_id: &self.mch_id,
            app_id: &self.app_id,
        };
        let judge = Judge {
            platform_key: &self.platform_key,
            sign_type: self.sign_type,
            codes: &self.codes,
        };
        classify_response(status, body, &expected, &judge)
    }

    /// Verifies a notify callback body with ShengPay's key and returns its fields.
    pub fn verify_notify(&self, body: &[u8]) -> Result<ResponseFields, VerifyError> {
        verify_body(body, &self.platform_key, self.sign_type)
    }
}

#[async_trait]
impl Provider for ShengpayClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Shengpay
    }

    fn merchant(&self) -> &str {
        &self.merchant
    }

    fn idempotent(&self) -> bool {
        self.idempotent
    }

    fn admit(&self, request: &RefundRequest) -> Result<(), Rejection> {
        signable(request)
    }

    async fn refund(&self, call: RefundCall<'_>) -> AttemptRecord {
        let started = Instant::now();
        let request = call.request;
        let signed = match self.build_request(request) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(refund_no = %request.refund_no, error = %e, "shengpay signing failed");
                return AttemptRecord {
                    outcome: Outcome::NotSent {
                        error: e.to_string(),
                    },
                    request_redacted: String::new(),
                    http_status: None,
                    latency: started.elapsed(),
                };
            }
        };
        let SignedJson { body, redacted } = signed;
        let builder = self
            .http
            .post(&self.url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .body(body);
        let (outcome, http_status) = match http::send(builder, self.max_response_bytes).await {
            Err(TransportError::NotSent(error)) => (Outcome::NotSent { error }, None),
            Err(TransportError::MaybeDelivered(error)) => {
                (Outcome::MaybeDelivered { error, raw: None }, None)
            }
            Ok(reply) => (
                self.classify(request, reply.status, &reply.body),
                Some(reply.status),
            ),
        };
        let latency = started.elapsed();
        tracing::debug!(
            refund_no = %request.refund_no,
            attempt = call.attempt,
            merchant = %self.merchant,
            class = outcome.class(),
            code = outcome.code().unwrap_or(""),
            http_status,
            latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            "shengpay refund attempt"
        );
        AttemptRecord {
            outcome,
            request_redacted: redacted,
            http_status,
            latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;

    use proptest::prelude::*;
    use serde_json::json;

    use crate::job::{RefundAccount, ShengpayOptions};

    const SEED_CANONICAL: &str = "appId=djgeiq978y933&mchId=93751497&nonceStr=ZmTruYz2Tld2hIRRg4Nf&notifyUrl=https://openapi2.lx-qa.com/pay/callback/v2/refund&outRefundNo=202105080000000488560&outTradeNo=202105080000000488560&refundFee=100&signType=RSA&totalFee=100";

    const SEED_REQUEST: &str = r#"{
    "appId":"djgeiq978y933",
    "mchId":"93751497",
    "nonceStr":"ZmTruYz2Tld2hIRRg4Nf",
    "notifyUrl":"https://openapi2.lx-qa.com/pay/callback/v2/refund",
    "outRefundNo":"202105080000000488560",
    "outTradeNo":"202105080000000488560",
    "refundFee":100,
    "sign":"LbSLSAj7i7YwqAOzTnVRatCyp/SWSqiNiIXUzpLN4fF7ypsCq9K3a2I+l2fTYgqDQPcTF4AOsmy5XveYnMzp5qlASasAkPH2W+KhTmStWfu6UKb05jzJR4/WyQr0BD3gzgvEP22T9BRJUiZIpx6W5dfYE1NBc6ES3SFiHXiGV2AgPZqh6w6E3rctLP1fZP/n752pk3/KP9mtaXmzm/UE2RrCMJj/1Ubg1vdWkNe0GKztl5gX5GEcWITXBnfA8Kj0ovJI1xtfGXHfHgSLnk4dmC33xGO7w3pMbA+ZlI+mOIuuVuv667vYt5bs+AwzWk+b9TyeG6Zs3gz1GZp7S4ySWw==",
    "signType":"RSA",
    "totalFee":100
}"#;

    fn fixture_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/shengpay")
            .join(name)
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(fixture_path(name)).unwrap()
    }

    fn merchant_private() -> PKey<Private> {
        keys::private_key_from_file("test", &fixture_path("merchant_private_pkcs8.pem")).unwrap()
    }

    fn merchant_public() -> PKey<Public> {
        keys::public_key_from_file("test", &fixture_path("merchant_public_spki.pem")).unwrap()
    }

    fn platform_private() -> PKey<Private> {
        keys::private_key_from_file("test", &fixture_path("platform_private_pkcs8.pem")).unwrap()
    }

    fn platform_public() -> PKey<Public> {
        keys::public_key_from_file("test", &fixture_path("platform_public_spki.pem")).unwrap()
    }

    /// The seed's refund, as our side asked for it.
    fn seed_expected() -> Expected<'static> {
        Expected {
            refund_no: "202105080000000488560",
            order_no: "202105080000000488560",
            refund_fee: 10,
            total_fee: 1000,
            mch_id: "93751497",
            app_id: "djgeiq978y933",
        }
    }

    fn judge<'a>(key: &'a PKey<Public>, codes: &'a CodeTable) -> Judge<'a> {
        Judge {
            platform_key: key,
            sign_type: SignType::Rsa,
            codes,
        }
    }

    /// A successful response to the seed refund, as a JSON object to be signed.
    fn success_fields() -> Map<String, Value> {
        let Value::Object(m) = json!({
            "returnCode": "SUCCESS",
            "returnMsg": "OK",
            "resultCode": "SUCCESS",
            "mchId": "93751497",
            "appId": "djgeiq978y933",
            "transactionId": "C2110160000000091671",
            "outTradeNo": "202105080000000488560",
            "outRefundNo": "202105080000000488560",
            "refundId": "RO2110160000000014290",
            "refundFee": "10",
            "settlementRefundFee": 10,
            "totalFee": 1000,
            "settlementTotalFee": 1000,
            "nonceStr": "GLEhZmpGicVlbEeCRYOEagLPhkwgBgRH",
            "signType": "RSA",
        }) else {
            unreachable!()
        };
        m
    }

    fn fail_fields(code: &str) -> Map<String, Value> {
        let mut m = success_fields();
        for k in [
            "refundId",
            "refundFee",
            "settlementRefundFee",
            "totalFee",
            "settlementTotalFee",
        ] {
            m.remove(k);
        }
        m.insert("resultCode".into(), "FAIL".into());
        m.insert("errorCode".into(), code.into());
        m.insert(
            "errorCodeDes".into(),
            format!("description of {code}").into(),
        );
        m
    }

    fn platform_signed(fields: Map<String, Value>) -> String {
        signed_json(fields, &platform_private(), SignType::Rsa)
            .unwrap()
            .body
    }

    fn classify_seed(status: u16, body: &str) -> Outcome {
        let key = platform_public();
        let codes = CodeTable::shengpay_default();
        classify_response(
            status,
            body.as_bytes(),
            &seed_expected(),
            &judge(&key, &codes),
        )
    }

    fn is_booked(o: &Outcome) -> bool {
        matches!(o, Outcome::Accepted { .. } | Outcome::Declined { .. })
    }

    // --- string to sign and signatures -------------------------------------------------------

    #[test]
    fn seed_request_example_gives_the_design_canonical_string() {
        let fields = ResponseFields::parse(SEED_REQUEST.as_bytes()).unwrap();
        assert_eq!(fields.canonical(), SEED_CANONICAL);
        assert_eq!(fixture("seed_request_canonical.txt"), SEED_CANONICAL);
        let pairs = [
            ("totalFee", "100"),
            ("signType", "RSA"),
            ("sign", "ignored"),
            ("refundFee", "100"),
            ("refundDesc", ""),
            ("outTradeNo", "202105080000000488560"),
            ("outRefundNo", "202105080000000488560"),
            (
                "notifyUrl",
                "https://openapi2.lx-qa.com/pay/callback/v2/refund",
            ),
            ("nonceStr", "ZmTruYz2Tld2hIRRg4Nf"),
            ("mchId", "93751497"),
            ("appId", "djgeiq978y933"),
        ];
        assert_eq!(canonical_string(&pairs), SEED_CANONICAL);
    }

    #[test]
    fn seed_request_fields_built_by_us_give_the_design_canonical_string() {
        let Value::Object(fields) = serde_json::from_str::<Value>(SEED_REQUEST).unwrap() else {
            unreachable!()
        };
        let signed = signed_json(fields, &merchant_private(), SignType::Rsa).unwrap();
        let back = ResponseFields::parse(signed.body.as_bytes()).unwrap();
        assert_eq!(back.canonical(), SEED_CANONICAL);
        assert!(back.verify(&merchant_public(), SignType::Rsa).is_ok());
    }

    #[test]
    fn canonical_string_sorts_by_ascii_bytes_and_does_not_url_encode() {
        let pairs = [
            ("b", "x y&z"),
            ("B", "1"),
            ("a_", "2"),
            ("aZ", "3"),
            ("empty", ""),
        ];
        assert_eq!(canonical_string(&pairs), "B=1&aZ=3&a_=2&b=x y&z");
    }

    fn cli_signature_case(sign_type: SignType, sig_file: &str) {
        let cli = fixture(sig_file);
        let canonical = fixture("seed_request_canonical.txt");
        assert!(verify(
            &merchant_public(),
            sign_type,
            &canonical,
            cli.trim()
        ));
        let ours = sign(&merchant_private(), sign_type, &canonical).unwrap();
        assert_eq!(ours, cli.trim(), "PKCS#1 v1.5 is deterministic");
        let other = match sign_type {
            SignType::Rsa => SignType::Rsa2,
            SignType::Rsa2 => SignType::Rsa,
        };
        assert!(!verify(&merchant_public(), other, &canonical, cli.trim()));
        assert!(!verify(
            &merchant_public(),
            sign_type,
            &format!("{canonical}&x=1"),
            cli.trim()
        ));
    }

    #[test]
    fn openssl_cli_sha1_signature_of_the_seed_string_verifies_and_equals_ours() {
        cli_signature_case(SignType::Rsa, "seed_request_canonical.sha1withrsa.sig");
    }

    #[test]
    fn openssl_cli_sha256_signature_of_the_seed_string_verifies_and_equals_ours() {
        cli_signature_case(SignType::Rsa2, "seed_request_canonical.sha256withrsa.sig");
    }

    #[test]
    fn rsa_crate_and_openssl_signatures_verify_each_other_for_rsa_and_rsa2() {
        use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
        use rsa::{Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
        use sha1::Digest as _;

        let private =
            RsaPrivateKey::from_pkcs8_pem(&fixture("merchant_private_pkcs8.pem")).unwrap();
        let public =
            RsaPublicKey::from_public_key_pem(&fixture("merchant_public_spki.pem")).unwrap();
        let msg = SEED_CANONICAL.as_bytes();
        for sign_type in [SignType::Rsa, SignType::Rsa2] {
            let (scheme, hashed) = match sign_type {
                SignType::Rsa => (
                    Pkcs1v15Sign::new::<sha1::Sha1>(),
                    sha1::Sha1::digest(msg).to_vec(),
                ),
                SignType::Rsa2 => (
                    Pkcs1v15Sign::new::<sha2::Sha256>(),
                    sha2::Sha256::digest(msg).to_vec(),
                ),
            };
            let theirs = private.sign(scheme.clone(), &hashed).unwrap();
            let theirs_b64 = STANDARD.encode(&theirs);
            assert!(verify(
                &merchant_public(),
                sign_type,
                SEED_CANONICAL,
                &theirs_b64
            ));
            let ours = sign(&merchant_private(), sign_type, SEED_CANONICAL).unwrap();
            let ours_bytes = STANDARD.decode(&ours).unwrap();
            assert!(public.verify(scheme, &hashed, &ours_bytes).is_ok());
            assert_eq!(ours, theirs_b64);
        }
    }

    #[test]
    fn garbage_signatures_simply_do_not_verify() {
        let key = merchant_public();
        for s in ["", "!!!", "AAAA", "not base64 at all", &"A".repeat(344)] {
            assert!(!verify(&key, SignType::Rsa, SEED_CANONICAL, s), "{s}");
        }
    }

    // --- requests ----------------------------------------------------------------------------

    fn request(reason: Option<&str>, account: Option<RefundAccount>) -> RefundRequest {
        RefundRequest {
            version: 1,
            refund_no: "R2026112100000001".into(),
            order_no: "O2026112100000001".into(),
            provider: ProviderKind::Shengpay,
            merchant: "m1".into(),
            total_fee: 1000,
            refund_fee: 100,
            reason: reason.map(str::to_owned),
            requested_at: None,
            shengpay: account.map(|a| ShengpayOptions {
                refund_account: Some(a),
            }),
            wupay: None,
        }
    }

    fn merchant_config(base_url: &str, sign_type: SignType) -> ShengpayMerchant {
        ShengpayMerchant {
            merchant: "m1".into(),
            base_url: base_url.into(),
            app_id: "djgeiq978y933".into(),
            mch_id: "93751497".into(),
            sign_type,
            private_key_file: fixture_path("merchant_private_pkcs1.pem"),
            platform_public_key_file: fixture_path("platform_public_spki.pem"),
            notify_url: "https://notify.example/refund".into(),
            idempotent: true,
        }
    }

    fn client(base_url: &str, sign_type: SignType) -> ShengpayClient {
        let m = merchant_config(base_url, sign_type);
        let http_cfg = HttpConfig {
            connect_timeout_ms: 1_000,
            timeout_ms: 5_000,
            ..HttpConfig::default()
        };
        ShengpayClient::new(
            &m,
            "shengpay.merchants[0]",
            http::build_client(&http_cfg).unwrap(),
            &http_cfg,
            CodeTable::shengpay_default(),
        )
        .unwrap()
    }

    fn is_nonce(s: &str) -> bool {
        s.len() == NONCE_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
    }

    #[test]
    fn request_body_has_every_field_integer_fees_a_fresh_nonce_and_a_valid_signature() {
        for sign_type in [SignType::Rsa, SignType::Rsa2] {
            let c = client("http://127.0.0.1:9", sign_type);
            let req = request(
                Some("customer returned goods"),
                Some(RefundAccount::Unsettled),
            );
            let a = c.build_request(&req).unwrap();
            let b = c.build_request(&req).unwrap();
            let v: Value = serde_json::from_str(&a.body).unwrap();
            assert_eq!(v["appId"], "djgeiq978y933");
            assert_eq!(v["mchId"], "93751497");
            assert_eq!(v["outTradeNo"], "O2026112100000001");
            assert_eq!(v["outRefundNo"], "R2026112100000001");
            assert_eq!(v["totalFee"], json!(1000));
            assert_eq!(v["refundFee"], json!(100));
            assert!(v["refundFee"].is_i64());
            assert_eq!(v["refundDesc"], "customer returned goods");
            assert_eq!(v["refundAccount"], "UNSETTLED");
            assert_eq!(v["notifyUrl"], "https://notify.example/refund");
            assert_eq!(v["signType"], sign_type.as_str());
            let nonce_a = v["nonceStr"].as_str().unwrap().to_owned();
            let vb: Value = serde_json::from_str(&b.body).unwrap();
            assert!(is_nonce(&nonce_a), "{nonce_a}");
            assert_ne!(
                nonce_a,
                vb["nonceStr"].as_str().unwrap(),
                "nonce is fresh per call"
            );
            let fields = ResponseFields::parse(a.body.as_bytes()).unwrap();
            assert!(fields.verify(&merchant_public(), sign_type).is_ok());
            // The recorded copy is the same request without the signature.
            let r: Value = serde_json::from_str(&a.redacted).unwrap();
            assert_eq!(r["sign"], REDACTED);
            let sig = v["sign"].as_str().unwrap();
            assert!(!a.redacted.contains(sig));
            assert!(!format!("{a:?}").contains(sig));
            let mut without = v.clone();
            without["sign"] = REDACTED.into();
            assert_eq!(without, r);
        }
    }

    #[test]
    fn optional_request_fields_are_left_out_when_absent() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        let a = c.build_request(&request(None, None)).unwrap();
        let v: Value = serde_json::from_str(&a.body).unwrap();
        assert!(v.get("refundDesc").is_none());
        assert!(v.get("refundAccount").is_none());
        assert_eq!(v.as_object().unwrap().len(), 10, "nine fields and sign");
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn constructor_errors_name_the_key_file_setting() {
        let mut m = merchant_config("http://127.0.0.1:9", SignType::Rsa);
        m.private_key_file = fixture_path("missing.pem");
        let http_cfg = HttpConfig::default();
        let e = ShengpayClient::new(
            &m,
            "shengpay.merchants[3]",
            http::build_client(&http_cfg).unwrap(),
            &http_cfg,
            CodeTable::shengpay_default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("shengpay.merchants[3].private_key_file"),
            "{e}"
        );
        let mut m = merchant_config("http://127.0.0.1:9", SignType::Rsa);
        m.platform_public_key_file = fixture_path("merchant_private_pkcs8.pem");
        let e = ShengpayClient::new(
            &m,
            "shengpay.merchants[3]",
            http::build_client(&http_cfg).unwrap(),
            &http_cfg,
            CodeTable::shengpay_default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("shengpay.merchants[3].platform_public_key_file"),
            "{e}"
        );
    }

    // --- response parsing --------------------------------------------------------------------

    #[test]
    fn seed_response_amounts_parse_into_fen_from_strings_and_numbers() {
        let body = fixture("seed_response.json");
        let fields = ResponseFields::parse(body.as_bytes()).unwrap();
        let r = RefundResponse::from_fields(&fields).unwrap();
        assert_eq!(r.refund_fee, Some(10));
        assert_eq!(r.settlement_refund_fee, Some(10));
        assert_eq!(r.total_fee, Some(1000));
        assert_eq!(r.settlement_total_fee, Some(1000));
        assert_eq!(r.refund_id.as_deref(), Some("RO2110160000000014290"));
        assert!(r.coupons.is_empty());
        assert_eq!(r.coupon_total().unwrap(), 0);
        // The string to verify keeps the value as written: "10" signs as refundFee=10.
        let canonical = fields.canonical();
        assert!(canonical.contains("&refundFee=10&"), "{canonical}");
        assert_eq!(canonical, fixture("seed_response_canonical.txt"));
    }

    #[test]
    fn seed_response_signed_by_the_openssl_cli_is_accepted_for_the_seed_refund() {
        let o = classify_seed(200, &fixture("seed_response_platform_signed.json"));
        assert_eq!(
            o,
            Outcome::Accepted {
                provider_refund_id: "RO2110160000000014290".into(),
                refund_fee: 10,
                settlement_refund_fee: 10,
                coupon_refund_fee: 0,
                raw: fixture("seed_response_platform_signed.json"),
            }
        );
    }

    #[test]
    fn seed_response_with_shengpays_own_signature_is_maybe_delivered_under_our_test_key() {
        let o = classify_seed(200, &fixture("seed_response.json"));
        assert!(
            matches!(o, Outcome::MaybeDelivered { raw: Some(_), .. }),
            "{o:?}"
        );
    }

    #[test]
    fn values_sign_as_written_in_the_json_text() {
        let body = br#"{"a":10,"b":"10","c":1.50,"d":{"y":1, "x":[true,null]},"e":null,"f":"","g":"x\"y\u00e9\/","h":false,"sign":"s"}"#;
        let f = ResponseFields::parse(body).unwrap();
        assert_eq!(
            f.canonical(),
            "a=10&b=10&c=1.50&d={\"y\":1, \"x\":[true,null]}&g=x\"yé/&h=false"
        );
    }

    #[test]
    fn amounts_accept_only_digits_into_i64() {
        for (json, want) in [
            (r#""10""#, Some(10)),
            ("10", Some(10)),
            ("0", Some(0)),
            (r#""0010""#, Some(10)),
            ("9223372036854775807", Some(i64::MAX)),
            ("null", None),
            (r#""""#, None),
        ] {
            let body = format!(r#"{{"refundFee":{json}}}"#);
            let f = ResponseFields::parse(body.as_bytes()).unwrap();
            assert_eq!(f.amount("refundFee"), Ok(want), "{json}");
        }
        for json in [
            "10.0",
            "1e3",
            "1E3",
            "-1",
            r#""-1""#,
            r#""+1""#,
            r#""10.0""#,
            r#"" 10""#,
            r#""10 ""#,
            r#""1e3""#,
            r#""0x10""#,
            "9223372036854775808",
            r#""99999999999999999999999""#,
            "true",
            "[10]",
            r#"{"v":10}"#,
            r#""१०""#,
        ] {
            let body = format!(r#"{{"refundFee":{json}}}"#);
            let f = ResponseFields::parse(body.as_bytes()).unwrap();
            assert!(f.amount("refundFee").is_err(), "{json} must be refused");
        }
    }

    #[test]
    fn coupon_fields_parse_into_coupons_by_index() {
        let mut m = success_fields();
        m.insert("couponRefundCount".into(), 2.into());
        m.insert("couponRefundFee".into(), "3".into());
        m.insert("couponRefundId0".into(), "CP0".into());
        m.insert("couponType0".into(), "CASH".into());
        m.insert("couponRefundFee0".into(), 1.into());
        m.insert("couponRefundId1".into(), "CP1".into());
        m.insert("couponType1".into(), "NO_CASH".into());
        m.insert("couponRefundFee1".into(), "2".into());
        m.insert("settlementRefundFee".into(), 8.into());
        let body = platform_signed(m.clone());
        let f = ResponseFields::parse(body.as_bytes()).unwrap();
        let r = RefundResponse::from_fields(&f).unwrap();
        assert_eq!(r.coupon_refund_count, Some(2));
        assert_eq!(
            r.coupons,
            vec![
                Coupon {
                    index: 0,
                    id: Some("CP0".into()),
                    coupon_type: Some("CASH".into()),
                    fee: Some(1),
                },
                Coupon {
                    index: 1,
                    id: Some("CP1".into()),
                    coupon_type: Some("NO_CASH".into()),
                    fee: Some(2),
                },
            ]
        );
        match classify_seed(200, &body) {
            Outcome::Accepted {
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                ..
            } => assert_eq!(
                (refund_fee, settlement_refund_fee, coupon_refund_fee),
                (10, 8, 3)
            ),
            o => panic!("{o:?}"),
        }
        // Without the total, the per-coupon fees are summed.
        m.remove("couponRefundFee");
        let body = platform_signed(m);
        assert!(matches!(
            classify_seed(200, &body),
            Outcome::Accepted {
                coupon_refund_fee: 3,
                ..
            }
        ));
    }

    #[test]
    fn a_malformed_coupon_fee_makes_the_response_unreadable() {
        let mut m = success_fields();
        m.insert("couponRefundFee0".into(), "1.5".into());
        let o = classify_seed(200, &platform_signed(m));
        assert!(matches!(o, Outcome::MaybeDelivered { .. }), "{o:?}");
    }

    // --- classification ----------------------------------------------------------------------

    #[test]
    fn every_default_code_table_row_gives_its_class_through_the_classifier() {
        let table = CodeTable::shengpay_default();
        let rows: Vec<(String, CodeClass)> = table.rows().map(|(c, k)| (c.to_owned(), k)).collect();
        assert_eq!(rows.len(), 13);
        for (code, class) in rows {
            let body = platform_signed(fail_fields(&code));
            let o = classify_seed(200, &body);
            let want = match class {
                CodeClass::RetryLater => "retry_later",
                CodeClass::Declined => "declined",
                CodeClass::RequestRejected => "request_rejected",
            };
            assert_eq!(o.class(), want, "{code}: {o:?}");
            assert_eq!(o.code(), Some(code.as_str()));
            assert_eq!(o.message(), Some(format!("description of {code}").as_str()));
            assert_eq!(o.raw(), Some(body.as_str()));
        }
    }

    #[test]
    fn each_design_code_gives_its_design_class_and_unknown_codes_decline() {
        let cases = [
            ("BIZERR_NEED_RETRY", "retry_later"),
            ("SYSTEMERROR", "retry_later"),
            ("FREQUENCY_LIMITED", "retry_later"),
            ("REFUND_AMOUNT_ERROR", "declined"),
            ("ORDER_NOT_REFUNDABLE", "declined"),
            ("ORDER_NOT_EXIST", "declined"),
            ("NOTENOUGH", "declined"),
            ("TRADE_OVERDUE", "declined"),
            ("SIGN_ERROR", "request_rejected"),
            ("LACK_PARAMS", "request_rejected"),
            ("PARAMS_ERROR", "request_rejected"),
            ("MCH_NOT_FOUND", "request_rejected"),
            ("SERVICE_PROVIDER_NO_AUTH", "request_rejected"),
            ("SOMETHING_NEW", "declined"),
        ];
        for (code, class) in cases {
            let o = classify_seed(200, &platform_signed(fail_fields(code)));
            assert_eq!(o.class(), class, "{code}");
        }
        // A FAIL without errorCode is an unknown code: declined by the default table.
        let mut m = fail_fields("X");
        m.remove("errorCode");
        let o = classify_seed(200, &platform_signed(m));
        assert_eq!((o.class(), o.code()), ("declined", Some("RESULT_FAIL")));
    }

    #[test]
    fn config_overrides_reach_the_classifier() {
        let mut o = BTreeMap::new();
        o.insert("SYSTEMERROR".to_owned(), CodeClass::Declined);
        let codes = CodeTable::shengpay_default().with_overrides(&o);
        let key = platform_public();
        let body = platform_signed(fail_fields("SYSTEMERROR"));
        let out = classify_response(200, body.as_bytes(), &seed_expected(), &judge(&key, &codes));
        assert_eq!(out.class(), "declined");
    }

    #[test]
    fn return_code_fail_is_request_rejected_signed_or_unsigned() {
        let Value::Object(m) = json!({
            "returnCode": "FAIL",
            "returnMsg": "签名错误",
            "errorCode": "SIGN_ERROR",
        }) else {
            unreachable!()
        };
        let signed = platform_signed(m.clone());
        let unsigned = Value::Object(m).to_string();
        for body in [&signed, &unsigned] {
            let o = classify_seed(200, body);
            assert_eq!(o.class(), "request_rejected", "{body}");
            assert_eq!(o.code(), Some("SIGN_ERROR"));
            assert_eq!(o.message(), Some("签名错误"));
        }
        let o = classify_seed(200, r#"{"returnCode":"FAIL","returnMsg":"bad"}"#);
        assert_eq!(o.code(), Some("RETURN_FAIL"));
    }

    #[test]
    fn a_fail_with_a_sign_that_does_not_verify_is_not_trusted() {
        let Value::Object(m) = json!({"returnCode": "FAIL", "returnMsg": "x"}) else {
            unreachable!()
        };
        let body = signed_json(m, &merchant_private(), SignType::Rsa)
            .unwrap()
            .body;
        let o = classify_seed(200, &body);
        assert!(matches!(o, Outcome::MaybeDelivered { .. }), "{o:?}");
    }

    #[test]
    fn unverifiable_responses_never_succeed_or_fail() {
        let good = platform_signed(success_fields());
        assert!(matches!(
            classify_seed(200, &good),
            Outcome::Accepted { .. }
        ));
        let declined = platform_signed(fail_fields("NOTENOUGH"));
        assert!(matches!(
            classify_seed(200, &declined),
            Outcome::Declined { .. }
        ));
        let mut bodies: Vec<(&str, String)> = Vec::new();
        for base in [&good, &declined] {
            let v: Value = serde_json::from_str(base).unwrap();
            let mut tampered = v.clone();
            tampered["transactionId"] = "C0000000000000000000".into();
            bodies.push(("tampered field", tampered.to_string()));
            let mut added = v.clone();
            added["extra"] = "1".into();
            bodies.push(("added field", added.to_string()));
            let mut removed = v.clone();
            removed.as_object_mut().unwrap().remove("nonceStr");
            bodies.push(("removed field", removed.to_string()));
            let mut unsigned = v.clone();
            unsigned.as_object_mut().unwrap().remove("sign");
            bodies.push(("missing sign", unsigned.to_string()));
            let mut empty = v.clone();
            empty["sign"] = "".into();
            bodies.push(("empty sign", empty.to_string()));
            let mut null = v.clone();
            null["sign"] = Value::Null;
            bodies.push(("null sign", null.to_string()));
            let mut numeric = v.clone();
            numeric["sign"] = 12.into();
            bodies.push(("numeric sign", numeric.to_string()));
            let mut rsa2 = v.clone();
            rsa2["signType"] = "RSA2".into();
            bodies.push(("other signType", rsa2.to_string()));
            let mut m = v.as_object().unwrap().clone();
            m.remove("sign");
            bodies.push((
                "wrong key",
                signed_json(m, &merchant_private(), SignType::Rsa)
                    .unwrap()
                    .body,
            ));
            // A duplicate key: the signed value and the read value could differ.
            let dup = base.replacen('{', r#"{"resultCode":"FAIL","#, 1);
            bodies.push(("duplicate key", dup));
            // A number re-rendered differently no longer matches what was signed.
            if base.contains(":1000") {
                bodies.push(("re-rendered number", base.replace(":1000", ":1000.0")));
            }
        }
        for (what, body) in &bodies {
            let o = classify_seed(200, body);
            assert!(!is_booked(&o), "{what}: {o:?}");
            assert!(matches!(o, Outcome::MaybeDelivered { .. }), "{what}: {o:?}");
        }
    }

    #[test]
    fn an_accepted_response_for_another_refund_or_amount_is_not_booked() {
        type Edit = fn(&mut Map<String, Value>);
        let cases: Vec<(&str, Edit)> = vec![
            ("outRefundNo", |m| {
                m.insert("outRefundNo".into(), "OTHER".into());
            }),
            ("no outRefundNo", |m| {
                m.remove("outRefundNo");
            }),
            ("refundFee", |m| {
                m.insert("refundFee".into(), 11.into());
            }),
            ("no refundFee", |m| {
                m.remove("refundFee");
            }),
            ("outTradeNo", |m| {
                m.insert("outTradeNo".into(), "OTHER".into());
            }),
            ("mchId", |m| {
                m.insert("mchId".into(), "1".into());
            }),
            ("totalFee", |m| {
                m.insert("totalFee".into(), 999.into());
            }),
            ("no refundId", |m| {
                m.remove("refundId");
            }),
            ("no settlementRefundFee", |m| {
                m.remove("settlementRefundFee");
            }),
            ("settlement above refund", |m| {
                m.insert("settlementRefundFee".into(), 11.into());
            }),
            ("coupon above refund", |m| {
                m.insert("couponRefundFee".into(), 11.into());
            }),
            ("float amount", |m| {
                m.insert("refundFee".into(), json!(10.0));
            }),
            ("resultCode unknown", |m| {
                m.insert("resultCode".into(), "PROCESSING".into());
            }),
            ("returnCode missing", |m| {
                m.remove("returnCode");
            }),
        ];
        for (what, change) in cases {
            let mut m = success_fields();
            change(&mut m);
            let o = classify_seed(200, &platform_signed(m));
            assert!(
                matches!(o, Outcome::MaybeDelivered { raw: Some(_), .. }),
                "{what}: {o:?}"
            );
        }
    }

    #[test]
    fn non_2xx_and_unreadable_bodies_are_maybe_delivered_with_the_body_kept() {
        let good = platform_signed(success_fields());
        for status in [500, 502, 503, 404, 400, 302, 100] {
            let o = classify_seed(status, &good);
            assert!(
                matches!(o, Outcome::MaybeDelivered { raw: Some(ref r), .. } if *r == good),
                "{status}"
            );
        }
        for body in [
            "",
            "<html>Bad Gateway</html>",
            "[]",
            "null",
            "{",
            r#"{"a":1} x"#,
        ] {
            let o = classify_seed(200, body);
            assert!(
                matches!(o, Outcome::MaybeDelivered { raw: Some(_), .. }),
                "{body}"
            );
        }
    }

    #[test]
    fn deeply_nested_bodies_are_refused_without_overflowing_the_stack() {
        let body = format!(r#"{{"a":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        let o = classify_seed(200, &body);
        assert!(matches!(o, Outcome::MaybeDelivered { .. }));
    }

    #[test]
    fn verify_body_checks_notify_callbacks_the_same_way() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        let body = platform_signed(success_fields());
        let f = c.verify_notify(body.as_bytes()).unwrap();
        assert_eq!(f.amount("refundFee"), Ok(Some(10)));
        let tampered = body.replace("RO2110160000000014290", "RO2110160000000014291");
        assert_eq!(
            c.verify_notify(tampered.as_bytes()),
            Err(VerifyError::BadSignature)
        );
    }

    proptest! {
        #[test]
        fn the_classifier_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let o = classify_seed(200, &String::from_utf8_lossy(&body));
            prop_assert!(!is_booked(&o));
            let key = platform_public();
            let codes = CodeTable::shengpay_default();
            let o = classify_response(200, &body, &seed_expected(), &judge(&key, &codes));
            prop_assert!(!is_booked(&o));
        }

        #[test]
        fn the_classifier_never_panics_on_arbitrary_flat_json(
            entries in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("refundFee".to_owned()), Just("settlementRefundFee".to_owned()),
                        Just("couponRefundFee".to_owned()), Just("couponRefundFee0".to_owned()),
                        Just("couponRefundFee99999999999".to_owned()), Just("couponType01".to_owned()),
                        Just("returnCode".to_owned()), Just("resultCode".to_owned()),
                        Just("errorCode".to_owned()), Just("sign".to_owned()), "[a-zA-Z$0-9]{0,12}",
                    ],
                    prop_oneof![
                        Just("\"SUCCESS\"".to_owned()), Just("\"FAIL\"".to_owned()), Just("null".to_owned()),
                        "-?[0-9]{0,25}(\\.[0-9]{0,3})?([eE][0-9]{1,3})?",
                        "\"[ -~]{0,20}\"".prop_filter("valid JSON string", |s| !s[1..s.len() - 1].contains(['"', '\\'])),
                        Just("{\"a\":[1,{}]}".to_owned()), Just("true".to_owned()),
                    ],
                ),
                0..12,
            )
        ) {
            let body = format!(
                "{{{}}}",
                entries.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",")
            );
            let o = classify_seed(200, &body);
            // Unsigned or wrongly signed: at most a request rejection, never booked.
            prop_assert!(!is_booked(&o), "{body} -> {o:?}");
        }

        #[test]
        fn anything_we_sign_verifies_through_the_raw_text_path(
            entries in proptest::collection::btree_map(
                "[a-zA-Z]{1,10}",
                prop_oneof![
                    any::<String>().prop_map(Value::String),
                    any::<i64>().prop_map(Value::from),
                    Just(Value::Null),
                    Just(json!({"n": [1, "two", null]})),
                ],
                0..10,
            )
        ) {
            let m: Map<String, Value> = entries.into_iter().collect();
            let ambiguous = m.values().filter_map(value_text).any(|t| is_ambiguous(&t));
            match signed_json(m, &platform_private(), SignType::Rsa2) {
                Ok(signed) => {
                    prop_assert!(!ambiguous);
                    prop_assert!(verify_body(signed.body.as_bytes(), &platform_public(), SignType::Rsa2).is_ok());
                }
                Err(e) => prop_assert!(ambiguous && matches!(e, SignError::Ambiguous { .. }), "{e}"),
            }
        }
    }

    // --- a verified answer must be about this refund -----------------------------------------

    fn with(mut m: Map<String, Value>, key: &str, value: Option<&str>) -> Map<String, Value> {
        match value {
            Some(v) => m.insert(key.into(), v.into()),
            None => m.remove(key),
        };
        m
    }

    fn assert_maybe_delivered(o: &Outcome, what: &str) {
        assert!(
            matches!(o, Outcome::MaybeDelivered { raw: Some(_), .. }),
            "{what}: {o:?}"
        );
    }

    #[test]
    fn a_signed_decline_of_another_refund_is_maybe_delivered() {
        let body = platform_signed(with(
            fail_fields("NOTENOUGH"),
            "outRefundNo",
            Some("202105080000000000001"),
        ));
        assert_maybe_delivered(&classify_seed(200, &body), "other outRefundNo");
    }

    #[test]
    fn a_signed_decline_for_another_merchant_is_maybe_delivered() {
        let body = platform_signed(with(fail_fields("NOTENOUGH"), "mchId", Some("10000002")));
        assert_maybe_delivered(&classify_seed(200, &body), "other mchId");
    }

    #[test]
    fn a_signed_decline_for_another_app_is_maybe_delivered() {
        let body = platform_signed(with(
            fail_fields("NOTENOUGH"),
            "appId",
            Some("app-10000002"),
        ));
        assert_maybe_delivered(&classify_seed(200, &body), "other appId");
    }

    #[test]
    fn a_signed_decline_that_does_not_name_the_refund_merchant_and_app_is_maybe_delivered() {
        for key in ["outRefundNo", "mchId", "appId"] {
            let body = platform_signed(with(fail_fields("NOTENOUGH"), key, None));
            assert_maybe_delivered(&classify_seed(200, &body), &format!("no {key}"));
        }
    }

    #[test]
    fn a_signed_decline_for_another_order_is_maybe_delivered() {
        let body = platform_signed(with(fail_fields("NOTENOUGH"), "outTradeNo", Some("OTHER")));
        assert_maybe_delivered(&classify_seed(200, &body), "other outTradeNo");
    }

    #[test]
    fn a_signed_decline_naming_this_refund_merchant_and_app_is_declined() {
        let body = platform_signed(fail_fields("NOTENOUGH"));
        assert_eq!(
            classify_seed(200, &body),
            Outcome::Declined {
                code: "NOTENOUGH".into(),
                message: "description of NOTENOUGH".into(),
                raw: body.clone(),
            }
        );
        // outTradeNo is not required: the refund is named by outRefundNo within mchId/appId.
        let body = platform_signed(with(fail_fields("NOTENOUGH"), "outTradeNo", None));
        assert_eq!(classify_seed(200, &body).class(), "declined");
    }

    #[test]
    fn a_signed_retry_later_about_another_refund_is_maybe_delivered() {
        let ours = platform_signed(fail_fields("SYSTEMERROR"));
        assert_eq!(classify_seed(200, &ours).class(), "retry_later");
        let body = platform_signed(with(
            fail_fields("SYSTEMERROR"),
            "outRefundNo",
            Some("202105080000000000001"),
        ));
        assert_maybe_delivered(&classify_seed(200, &body), "retry later, other outRefundNo");
    }

    #[test]
    fn a_signed_business_rejection_about_another_refund_is_maybe_delivered() {
        let ours = platform_signed(fail_fields("PARAMS_ERROR"));
        assert_eq!(classify_seed(200, &ours).class(), "request_rejected");
        let body = platform_signed(with(fail_fields("PARAMS_ERROR"), "mchId", Some("10000002")));
        assert_maybe_delivered(&classify_seed(200, &body), "params error, other mchId");
    }

    #[test]
    fn a_return_code_fail_naming_another_refund_is_maybe_delivered() {
        let Value::Object(m) = json!({
            "returnCode": "FAIL",
            "returnMsg": "sign error",
            "errorCode": "SIGN_ERROR",
            "mchId": "93751497",
            "appId": "djgeiq978y933",
            "outRefundNo": "202105080000000488560",
        }) else {
            unreachable!()
        };
        assert_eq!(
            classify_seed(200, &platform_signed(m.clone())).class(),
            "request_rejected",
            "a protocol-level FAIL that names this refund"
        );
        for (key, other) in [
            ("outRefundNo", "202105080000000000001"),
            ("mchId", "10000002"),
            ("appId", "app-10000002"),
            ("outTradeNo", "OTHER"),
        ] {
            let changed = with(m.clone(), key, Some(other));
            assert_maybe_delivered(
                &classify_seed(200, &platform_signed(changed.clone())),
                &format!("signed, other {key}"),
            );
            assert_maybe_delivered(
                &classify_seed(200, &Value::Object(changed).to_string()),
                &format!("unsigned, other {key}"),
            );
        }
    }

    #[test]
    fn an_accepted_response_that_does_not_name_our_merchant_and_app_is_not_booked() {
        for (key, value) in [
            ("mchId", None),
            ("appId", None),
            ("appId", Some("app-10000002")),
        ] {
            let o = classify_seed(200, &platform_signed(with(success_fields(), key, value)));
            assert_maybe_delivered(&o, &format!("{key} {value:?}"));
        }
    }

    // --- values that would make two field sets sign alike ------------------------------------

    #[test]
    fn a_reason_with_ampersand_or_equals_is_refused_at_intake_naming_reason() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        // Signs like refundDesc=a with refundFee=1, whatever the real refundFee.
        for reason in ["a=1&refundFee=1", "a&b", "x=y"] {
            let e = c
                .admit(&request(Some(reason), None))
                .expect_err("an ambiguous reason must be refused");
            assert_eq!(e.field, "reason", "{reason}: {}", e.reason);
            assert!(
                e.reason.contains('&') && e.reason.contains('='),
                "{}",
                e.reason
            );
        }
    }

    #[test]
    fn a_plain_reason_is_admitted() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        for req in [
            request(Some("customer returned goods, 退货 (50%)"), None),
            request(None, Some(RefundAccount::Recharge)),
            request(Some(""), Some(RefundAccount::Unsettled)),
        ] {
            assert_eq!(c.admit(&req), Ok(()), "{req:?}");
        }
    }

    #[test]
    fn the_signer_refuses_a_value_with_ampersand_or_equals_and_the_refund_is_not_sent() {
        let c = client("http://127.0.0.1:9", SignType::Rsa);
        let req = request(Some("a=1&refundFee=1"), None);
        let e = c
            .build_request(&req)
            .expect_err("the signer must refuse an ambiguous value");
        assert!(e.to_string().contains("refundDesc"), "{e}");
    }

    #[tokio::test]
    async fn a_refund_whose_values_cannot_be_signed_unambiguously_is_not_sent() {
        // Nothing listens on the port: had the request been sent, it would be NotSent for a
        // connection error instead, so the message is what shows the signer refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = client(&format!("http://{addr}"), SignType::Rsa);
        let req = request(Some("a=1&refundFee=1"), None);
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 1,
            })
            .await;
        match &rec.outcome {
            Outcome::NotSent { error } => assert!(error.contains("refundDesc"), "{error}"),
            o => panic!("{o:?}"),
        }
        assert_eq!(rec.http_status, None);
    }

    #[test]
    fn a_merchant_value_with_ampersand_or_equals_fails_client_construction_naming_the_key() {
        let http_cfg = HttpConfig::default();
        type Edit = fn(&mut ShengpayMerchant);
        let cases: [(&str, Edit); 4] = [
            ("notify_url", |m| {
                m.notify_url = "https://notify.example/refund?a=1&b=2".into()
            }),
            ("notify_url", |m| {
                m.notify_url = "https://notify.example/refund?token=x".into()
            }),
            ("app_id", |m| m.app_id = "app&x".into()),
            ("mch_id", |m| m.mch_id = "9=3".into()),
        ];
        for (key, edit) in cases {
            let mut m = merchant_config("http://127.0.0.1:9", SignType::Rsa);
            edit(&mut m);
            let e = ShengpayClient::new(
                &m,
                "shengpay.merchants[2]",
                http::build_client(&http_cfg).unwrap(),
                &http_cfg,
                CodeTable::shengpay_default(),
            )
            .expect_err("an ambiguous merchant value must be refused");
            assert!(
                e.to_string()
                    .contains(&format!("shengpay.merchants[2].{key}")),
                "{e}"
            );
        }
    }

    // --- end to end over HTTP ----------------------------------------------------------------

    /// Answers one HTTP/1.1 request on `listener` with `reply_to(request_body)` and hands the
    /// request (head, body) back.
    async fn serve_once(
        listener: tokio::net::TcpListener,
        status: &'static str,
        reply_to: impl FnOnce(&str) -> String + Send + 'static,
    ) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed early");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap();
        while buf.len() < head_end + len {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8(buf[head_end..head_end + len].to_vec()).unwrap();
        let reply = reply_to(&body);
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
        sock.shutdown().await.unwrap();
        (head, body)
    }

    #[tokio::test]
    async fn refund_posts_a_signed_request_and_books_the_verified_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_once(listener, "200 OK", |req_body| {
            // Answer like ShengPay: echo the refund, amounts half as strings, signed.
            let req: Value = serde_json::from_str(req_body).unwrap();
            let mut m = success_fields();
            m.insert("outRefundNo".into(), req["outRefundNo"].clone());
            m.insert("outTradeNo".into(), req["outTradeNo"].clone());
            m.insert("refundFee".into(), req["refundFee"].to_string().into());
            m.insert("settlementRefundFee".into(), req["refundFee"].clone());
            m.insert("totalFee".into(), req["totalFee"].clone());
            platform_signed(m)
        }));
        let c = client(&format!("http://{addr}/"), SignType::Rsa);
        assert_eq!(c.url(), format!("http://{addr}/api/v1/payment/refund"));
        let req = request(Some("退货"), Some(RefundAccount::Recharge));
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 1,
            })
            .await;
        let (head, body) = server.await.unwrap();

        assert!(
            head.starts_with("POST /api/v1/payment/refund HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json; charset=utf-8\r\n"),
            "{head}"
        );
        let sent = ResponseFields::parse(body.as_bytes()).unwrap();
        assert!(sent.verify(&merchant_public(), SignType::Rsa).is_ok());
        assert!(is_nonce(sent.string("nonceStr").unwrap().unwrap()));
        assert_eq!(sent.string("refundDesc").unwrap(), Some("退货"));
        assert_eq!(sent.string("refundAccount").unwrap(), Some("RECHARGE"));

        match &rec.outcome {
            Outcome::Accepted {
                provider_refund_id,
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                ..
            } => {
                assert_eq!(provider_refund_id, "RO2110160000000014290");
                assert_eq!(
                    (*refund_fee, *settlement_refund_fee, *coupon_refund_fee),
                    (100, 100, 0)
                );
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(rec.http_status, Some(200));
        let recorded: Value = serde_json::from_str(&rec.request_redacted).unwrap();
        assert_eq!(recorded["sign"], REDACTED);
        assert_eq!(recorded["outRefundNo"], "R2026112100000001");
        let sig = sent.string("sign").unwrap().unwrap();
        assert!(!rec.request_redacted.contains(sig));
        assert!(rec.latency > std::time::Duration::ZERO);
    }

    #[tokio::test]
    async fn refund_against_a_5xx_is_maybe_delivered_with_the_status_recorded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_once(listener, "503 Service Unavailable", |_| {
            "busy".to_owned()
        }));
        let c = client(&format!("http://{addr}"), SignType::Rsa2);
        let req = request(None, None);
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 2,
            })
            .await;
        server.await.unwrap();
        assert_eq!(rec.http_status, Some(503));
        assert_eq!(
            rec.outcome,
            Outcome::MaybeDelivered {
                error: "HTTP 503 from provider".into(),
                raw: Some("busy".into()),
            }
        );
    }

    #[tokio::test]
    async fn refund_to_a_refused_connection_is_not_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = client(&format!("http://{addr}"), SignType::Rsa);
        let req = request(None, None);
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 1,
            })
            .await;
        assert!(
            matches!(rec.outcome, Outcome::NotSent { .. }),
            "{:?}",
            rec.outcome
        );
        assert_eq!(rec.http_status, None);
        assert!(rec.request_redacted.contains(r#""sign":"***""#));
    }
}
