//! The fields of a ShengPay refund request, and the intake check that they can be signed.
//!
//! The request builder and [`signable`] read one list of the fields that carry values of the
//! refund message, so intake refuses exactly what the signer would: a field added to the
//! request is checked without anyone having to remember to.

use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Map, Value};

use super::sign::{is_ambiguous, value_text};
use crate::config::SignType;
use crate::job::{ErrorCode, RefundRequest, Rejection};

/// Length of `nonceStr` (the seed's maximum, `String(32)`).
pub const NONCE_LEN: usize = 32;

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
                ErrorCode::UnsignableValue,
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

#[cfg(test)]
mod tests {

    use serde_json::json;

    use super::*;
    use crate::job::RefundAccount;
    use crate::provider::Provider;
    use crate::provider::shengpay::response::ResponseFields;
    use crate::provider::shengpay::sign::REDACTED;
    use crate::provider::shengpay::test_support::*;

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
}
