//! ShengPay's asynchronous result (DESIGN §5): the status query we send, and how a notify or a
//! query answer is read into a [`StatusReport`].
//!
//! Both carry the same fields and are signed like a refund answer. The rules that make a
//! report safe to apply live here, once for both: it must verify, name this refund (the
//! platform signs every answer with one key, so an old notify of another refund can be
//! replayed) and carry amounts that agree with the job; a success must say what was settled
//! and when. Anything else is not a report: the notify is refused (ShengPay retries it) and the
//! query is asked again later.

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::{Map, Value};

use super::classify::{Expected, Judge, Presence, about_another_refund, short};
use super::request::MerchantParams;
use super::response::{RefundResponse, ResponseFields, VerifyError};
use crate::provider::status::{QueryOutcome, RefundStatus, StatusReport};

/// The codes with which a status query says it holds no refund of this number: WeChat Pay v2's
/// `REFUNDNOTEXIST`, which ShengPay mirrors, and the underscored spelling of its other codes.
pub const NOT_FOUND_CODES: [&str; 2] = ["REFUNDNOTEXIST", "REFUND_NOT_EXIST"];

/// The unsigned fields of a status query for `refund_no` (everything but `sign`).
pub fn query_fields(
    merchant: &MerchantParams<'_>,
    refund_no: &str,
    nonce: &str,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("appId".into(), merchant.app_id.into());
    m.insert("mchId".into(), merchant.mch_id.into());
    m.insert("nonceStr".into(), nonce.into());
    m.insert("outRefundNo".into(), refund_no.into());
    m.insert("signType".into(), merchant.sign_type.as_str().into());
    m
}

/// `refundSuccessTime` (`yyyyMMddHHmmss`, Beijing time, which has no daylight saving).
pub fn parse_success_time(text: &str) -> Result<DateTime<Utc>, String> {
    let local = NaiveDateTime::parse_from_str(text, "%Y%m%d%H%M%S").map_err(|_| {
        format!(
            "refundSuccessTime {:?} is not yyyyMMddHHmmss",
            short(Some(text))
        )
    })?;
    chrono_tz::Asia::Shanghai
        .from_local_datetime(&local)
        .single()
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| format!("refundSuccessTime {text:?} is not a time in Asia/Shanghai"))
}

/// The status a verified notify or query answer gives for the refund `exp` describes, or why
/// it gives none: an answer about another refund, with other amounts, or without what a
/// success must say.
pub fn status_report(
    resp: &RefundResponse,
    exp: &Expected<'_>,
    raw: String,
) -> Result<StatusReport, String> {
    if let Some(why) = about_another_refund(resp, exp, Presence::Required) {
        return Err(format!("not about this refund: {why}"));
    }
    if resp.refund_fee.is_some_and(|f| f != exp.refund_fee) {
        return Err("refundFee differs from the amount requested".into());
    }
    if resp.total_fee.is_some_and(|t| t != exp.total_fee) {
        return Err("totalFee differs from the order total".into());
    }
    let status = match resp.refund_status.as_deref() {
        Some("PROCESSING") => RefundStatus::Processing,
        Some("REFUND_CLOSE" | "REFUNDCLOSE") => RefundStatus::Closed,
        Some("CHANGE") => RefundStatus::Change,
        Some("SUCCESS") => success(resp, exp)?,
        other => {
            return Err(format!("unrecognised refundStatus {:?}", short(other)));
        }
    };
    Ok(StatusReport {
        refund_no: exp.refund_no.to_owned(),
        status,
        raw,
    })
}

fn success(resp: &RefundResponse, exp: &Expected<'_>) -> Result<RefundStatus, String> {
    if resp.refund_fee.is_none() {
        return Err("a success without refundFee".into());
    }
    let Some(provider_refund_id) = resp.refund_id.clone().filter(|r| !r.is_empty()) else {
        return Err("a success without refundId".into());
    };
    let Some(settlement_refund_fee) = resp.settlement_refund_fee else {
        return Err("a success without settlementRefundFee".into());
    };
    if !(0..=exp.refund_fee).contains(&settlement_refund_fee) {
        return Err("settlementRefundFee is not between 0 and refundFee".into());
    }
    let Some(time) = resp.refund_success_time.as_deref() else {
        return Err("a success without refundSuccessTime".into());
    };
    Ok(RefundStatus::Success {
        provider_refund_id,
        settlement_refund_fee,
        success_time: parse_success_time(time)?,
    })
}

fn unanswered(error: impl Into<String>, raw: &str) -> QueryOutcome {
    QueryOutcome::Unanswered {
        error: error.into(),
        raw: Some(raw.to_owned()),
    }
}

/// Maps the HTTP answer to a status query. Only a verified answer that names this refund
/// counts: a "does not exist" leads to sending the refund again, so it must be as certain as
/// a status. Everything else is unanswered, and the schedule asks again.
pub fn classify_query(
    status: u16,
    body: &[u8],
    exp: &Expected<'_>,
    judge: &Judge<'_>,
) -> QueryOutcome {
    let raw = String::from_utf8_lossy(body).into_owned();
    if !(200..300).contains(&status) {
        return unanswered(format!("HTTP {status} from provider"), &raw);
    }
    let fields = match ResponseFields::parse(body) {
        Ok(f) => f,
        Err(e) => return unanswered(format!("unreadable answer: {e}"), &raw),
    };
    match fields.verify(judge.platform_key, judge.sign_type) {
        Ok(()) => {}
        Err(VerifyError::Unsigned) => return unanswered("answer carries no sign", &raw),
        Err(e) => return unanswered(e.to_string(), &raw),
    }
    let resp = match RefundResponse::from_fields(&fields) {
        Ok(r) => r,
        Err(e) => return unanswered(format!("unreadable answer: {e}"), &raw),
    };
    if resp.return_code.as_deref() != Some("SUCCESS") {
        return unanswered(
            format!(
                "returnCode {:?}: {}",
                short(resp.return_code.as_deref()),
                short(resp.return_msg.as_deref().or(resp.error_code.as_deref()))
                    .unwrap_or_default()
            ),
            &raw,
        );
    }
    match resp.result_code.as_deref() {
        Some("SUCCESS") => match status_report(&resp, exp, raw.clone()) {
            Ok(report) => QueryOutcome::Status(report),
            Err(why) => unanswered(why, &raw),
        },
        Some("FAIL") => {
            if let Some(why) = about_another_refund(&resp, exp, Presence::Required) {
                return unanswered(format!("not about this refund: {why}"), &raw);
            }
            match resp.error_code.as_deref() {
                Some(code) if NOT_FOUND_CODES.contains(&code) => QueryOutcome::NotFound { raw },
                code => unanswered(format!("resultCode FAIL {:?}", short(code)), &raw),
            }
        }
        other => unanswered(format!("unrecognised resultCode {:?}", short(other)), &raw),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::SignType;
    use crate::provider::codes::CodeTable;
    use crate::provider::shengpay::sign::signed_json;
    use crate::provider::shengpay::test_support::*;

    fn exp() -> Expected<'static> {
        Expected {
            refund_no: "R1",
            order_no: "O1",
            refund_fee: 100,
            total_fee: 300,
            mch_id: "93751497",
            app_id: "djgeiq978y933",
        }
    }

    fn answer(extra: Value) -> Map<String, Value> {
        let mut m = json!({
            "returnCode": "SUCCESS", "returnMsg": "OK", "resultCode": "SUCCESS",
            "appId": "djgeiq978y933", "mchId": "93751497", "outTradeNo": "O1", "outRefundNo": "R1",
            "refundId": "RF1", "transactionId": "T1", "totalFee": 300, "refundFee": 100,
            "settlementRefundFee": 90, "settlementTotalFee": 290, "refundStatus": "SUCCESS",
            "refundSuccessTime": "20261121100003", "nonceStr": "n", "signType": "RSA",
        })
        .as_object()
        .cloned()
        .unwrap();
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                m.remove(k);
            } else {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    }

    fn query(body: &str) -> QueryOutcome {
        let codes = CodeTable::shengpay_default();
        let key = platform_public();
        let judge = Judge {
            platform_key: &key,
            sign_type: SignType::Rsa,
            codes: &codes,
        };
        classify_query(200, body.as_bytes(), &exp(), &judge)
    }

    fn signed(m: Map<String, Value>) -> String {
        signed_json(m, &platform_private(), SignType::Rsa)
            .unwrap()
            .body
    }

    #[test]
    fn a_signed_success_gives_the_settlement_and_the_success_time_in_utc() {
        match query(&signed(answer(json!({})))) {
            QueryOutcome::Status(StatusReport {
                status:
                    RefundStatus::Success {
                        provider_refund_id,
                        settlement_refund_fee,
                        success_time,
                    },
                ..
            }) => {
                assert_eq!(provider_refund_id, "RF1");
                assert_eq!(settlement_refund_fee, 90);
                assert_eq!(success_time.to_rfc3339(), "2026-11-21T02:00:03+00:00");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn each_refund_status_maps_to_its_status_and_both_spellings_of_close_are_closed() {
        for (text, want) in [
            ("PROCESSING", RefundStatus::Processing),
            ("REFUND_CLOSE", RefundStatus::Closed),
            ("REFUNDCLOSE", RefundStatus::Closed),
            ("CHANGE", RefundStatus::Change),
        ] {
            let body = signed(answer(
                json!({"refundStatus": text, "refundSuccessTime": null}),
            ));
            match query(&body) {
                QueryOutcome::Status(r) => assert_eq!(r.status, want, "{text}"),
                o => panic!("{text}: {o:?}"),
            }
        }
    }

    #[test]
    fn a_signed_not_exist_naming_the_refund_is_not_found_and_one_naming_another_is_unanswered() {
        let fail = |no: &str| {
            signed(answer(json!({
                "resultCode": "FAIL", "errorCode": "REFUNDNOTEXIST", "outRefundNo": no,
                "refundStatus": null, "refundId": null, "refundFee": null,
                "settlementRefundFee": null, "refundSuccessTime": null,
            })))
        };
        assert!(matches!(query(&fail("R1")), QueryOutcome::NotFound { .. }));
        assert!(matches!(
            query(&fail("R2")),
            QueryOutcome::Unanswered { .. }
        ));
    }

    #[test]
    fn an_unsigned_or_badly_signed_answer_is_never_a_status_nor_a_not_found() {
        let unsigned = serde_json::to_string(&answer(json!({}))).unwrap();
        assert!(matches!(query(&unsigned), QueryOutcome::Unanswered { .. }));
        let forged = signed(answer(json!({})))
            .replace("\"settlementRefundFee\":90", "\"settlementRefundFee\":99");
        assert!(matches!(query(&forged), QueryOutcome::Unanswered { .. }));
    }

    #[test]
    fn an_answer_whose_amounts_or_names_are_not_this_refunds_is_unanswered() {
        for extra in [
            json!({"refundFee": 101}),
            json!({"totalFee": 301}),
            json!({"mchId": "other"}),
            json!({"appId": null}),
            json!({"outTradeNo": "O2"}),
            json!({"settlementRefundFee": 101}),
            json!({"refundSuccessTime": "2026-11-21"}),
            json!({"refundId": null}),
            json!({"refundStatus": "WHATEVER"}),
        ] {
            let o = query(&signed(answer(extra.clone())));
            assert!(
                matches!(o, QueryOutcome::Unanswered { .. }),
                "{extra}: {o:?}"
            );
        }
    }
}
