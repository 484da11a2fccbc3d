//! Reading what ShengPay answers (a refund answer, a notify): every field kept as it appears in
//! the JSON text, so that verification signs exactly what was sent; amounts as numbers or
//! strings into fen without a float; coupons by their `$n` fields.

use std::collections::BTreeMap;
use std::fmt;

use openssl::pkey::{PKeyRef, Public};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::config::SignType;

use super::*;

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

pub(super) fn bad(field: &str, reason: impl Into<String>) -> ResponseError {
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
pub(super) struct RawObject(Vec<(String, Box<RawValue>)>);

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
pub(super) fn coupon_index(name: &str, prefix: &str) -> Option<Result<u32, ResponseError>> {
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
