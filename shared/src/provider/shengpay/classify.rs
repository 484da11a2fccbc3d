//! A ShengPay HTTP answer mapped to an [`Outcome`] (DESIGN §5).
//!
//! This is where "paid at most once" is decided for ShengPay, so it is kept small and apart
//! from parsing and signing: a verified answer still has to name this refund (the platform
//! signs every answer with one key, so an old one can be replayed), and anything that cannot be
//! shown to be about this refund is maybe delivered, never booked.

use openssl::pkey::{PKeyRef, Public};

use super::response::{RefundResponse, ResponseFields, VerifyError};
use crate::config::SignType;
use crate::provider::codes::CodeTable;
use crate::provider::{CodeClass, Outcome};

const SUCCESS: &str = "SUCCESS";
const FAIL: &str = "FAIL";

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
pub(super) fn short(v: Option<&str>) -> Option<String> {
    v.map(|s| s.chars().take(32).collect())
}

/// Whether [`about_another_refund`] insists on the identifying fields being there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Presence {
    /// A business answer (`resultCode`): ShengPay echoes them, so an answer without them cannot
    /// be shown to be about this refund.
    Required,
    /// A protocol-level refusal (`returnCode` FAIL), which may come before they were read.
    IfPresent,
}

/// Why a response is not about the refund we sent, if it is not: `outRefundNo` names the
/// refund only within a merchant account (`mchId` + `appId`), so all three must be ours;
/// `outTradeNo` is checked when present, as a different order can only mean another refund.
pub(super) fn about_another_refund(
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

#[cfg(test)]
mod tests {

    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::*;
    use crate::provider::shengpay::sign::signed_json;
    use crate::provider::shengpay::test_support::*;

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

    fn is_booked(o: &Outcome) -> bool {
        matches!(o, Outcome::Accepted { .. } | Outcome::Declined { .. })
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
    }
}
