//! What a verified answer means for the refund: the code table, and the rule that every
//! verified outcome must name this refund (`outRefundNo`, `mchId`, `appId`, and on success
//! `refundFee`), else it is maybe delivered.

use openssl::pkey::{PKeyRef, Public};

use crate::config::SignType;
use crate::provider::codes::CodeTable;
use crate::provider::{CodeClass, Outcome};

use super::*;

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

pub(super) fn maybe(error: impl Into<String>, raw: &str) -> Outcome {
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

pub(super) fn accepted(resp: &RefundResponse, exp: &Expected<'_>, raw: String) -> Outcome {
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
