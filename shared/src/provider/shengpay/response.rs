//! ShengPay answers and notify callbacks read as raw fields, verified, then typed.
//!
//! A response is verified over each value as it appears in the JSON text, so the parser keeps
//! top-level values as written (and refuses duplicate keys) rather than going through
//! `serde_json::Value`; only after the signature checks out are fields read into
//! [`RefundResponse`], amounts as whole fen from digits only. What the values *mean* for the
//! refund is left to the classifier.

use std::collections::BTreeMap;
use std::fmt;

use openssl::pkey::{PKeyRef, Public};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::sign::{SIGN_FIELD, canonical_string, verify};
use crate::config::SignType;

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
///
/// [`classify_response`]: super::classify_response
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
    /// Notify and status query only: how the refund stands, and when it succeeded.
    pub refund_status: Option<String>,
    pub refund_success_time: Option<String>,
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
            refund_status: s("refundStatus")?,
            refund_success_time: s("refundSuccessTime")?,
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

#[cfg(test)]
mod tests {

    use super::*;
    use crate::provider::Outcome;
    use crate::provider::shengpay::test_support::*;

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
}
