//! The simulated ShengPay refund API: `POST /api/v1/payment/refund`, signed JSON both ways.
//!
//! The signature rule (DESIGN.md §5) is implemented here independently of our client: every
//! field except `sign`, nulls and empty values dropped, keys sorted by ASCII, `k=v` joined with
//! `&`, values exactly as they appear in the JSON text (numbers as written, strings unquoted).
//! Requests are verified with the merchant's public key; every response, success or FAIL, is
//! signed with the platform key over the JSON text this module writes itself, so that amounts
//! written as strings (as in the seed's example) are signed as written.

use std::fmt::Write as _;

use hyper::StatusCode;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

use super::Provider;
use super::calls::Outcome;
use super::crypto::{self, SignType};
use super::faults::{FaultAction, Fired, fault_code};
use super::ledger::{Decision, MAX_FEE, PaidRefund, RefundAttempt};
use super::server::{Reply, SimState, lock};

/// A request field's value, kept as it was written.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Null,
    /// A JSON string, unescaped.
    Str(String),
    /// Anything else (numbers, booleans, nested JSON) as its raw JSON text.
    Raw(String),
}

impl Value {
    /// The value for the canonical string; `None` when the rule drops it (null or empty).
    fn canonical(&self) -> Option<&str> {
        match self {
            Value::Null => None,
            Value::Str(s) | Value::Raw(s) if s.is_empty() => None,
            Value::Str(s) | Value::Raw(s) => Some(s),
        }
    }
}

/// A parsed ShengPay request: the top-level fields in the order they were written.
#[derive(Debug)]
pub(crate) struct SpRequest {
    fields: Vec<(String, Value)>,
}

/// Collects an object's entries in order, refusing duplicate keys: with duplicates, what was
/// signed and what would be paid could differ.
struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields: Vec<(String, Box<RawValue>)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    if fields.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format!("duplicate field {key:?}")));
                    }
                    fields.push((key, value));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// Parses a request body; the error says what is wrong with it.
pub(crate) fn parse(body: &[u8]) -> Result<SpRequest, String> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_owned())?;
    let Fields(raw) = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let mut fields = Vec::with_capacity(raw.len());
    for (key, value) in raw {
        let text = value.get();
        let value = if text == "null" {
            Value::Null
        } else if text.starts_with('"') {
            Value::Str(serde_json::from_str(text).map_err(|e| format!("{key}: {e}"))?)
        } else {
            Value::Raw(text.to_owned())
        };
        fields.push((key, value));
    }
    Ok(SpRequest { fields })
}

impl SpRequest {
    /// A field's text (string value or raw JSON text), `None` when absent, null or empty.
    pub(crate) fn text(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.canonical())
    }

    fn canonical(&self) -> String {
        canonical(
            self.fields
                .iter()
                .filter_map(|(k, v)| v.canonical().map(|v| (k.as_str(), v))),
        )
    }
}

/// The canonical string to sign: `sign` and empty values left out, keys in ASCII order.
fn canonical<'a>(fields: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut pairs: Vec<(&str, &str)> = fields
        .filter(|(k, v)| *k != "sign" && !v.is_empty())
        .collect();
    pairs.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The merchant a request names by `mchId` + `appId`, as an index into the configured list.
pub(crate) fn find_merchant(state: &SimState, req: &SpRequest) -> Option<usize> {
    let mch_id = req.text("mchId")?;
    let app_id = req.text("appId")?;
    state
        .settings
        .shengpay
        .iter()
        .position(|m| m.mch_id == mch_id && m.app_id == app_id)
}

/// A response field as it will be written: a JSON string or a JSON integer.
enum Out {
    Str(String),
    Num(i64),
}

/// Builds a response in the order fields are added, then signs exactly what it writes.
struct ResponseBuilder {
    fields: Vec<(&'static str, Out)>,
    /// Whether this response writes amounts as JSON strings (see `string_amounts_rate`).
    string_amounts: bool,
    /// Per-field choice when `string_amounts`: `refundFee` always, others at random, as in the
    /// seed's example where only some amounts are strings.
    amount_coins: u32,
}

impl ResponseBuilder {
    fn new(string_amounts: bool, amount_coins: u32) -> Self {
        ResponseBuilder {
            fields: Vec::new(),
            string_amounts,
            amount_coins,
        }
    }

    fn str(&mut self, key: &'static str, value: impl Into<String>) -> &mut Self {
        self.fields.push((key, Out::Str(value.into())));
        self
    }

    fn amount(&mut self, key: &'static str, value: i64) -> &mut Self {
        let bit = self.fields.len() % 32;
        let as_string =
            self.string_amounts && (key == "refundFee" || self.amount_coins & (1 << bit) != 0);
        let out = if as_string {
            Out::Str(value.to_string())
        } else {
            Out::Num(value)
        };
        self.fields.push((key, out));
        self
    }

    fn finish(self, state: &SimState, sign_type: SignType, corrupt: bool) -> String {
        let texts: Vec<(&str, String)> = self
            .fields
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Out::Str(s) => s.clone(),
                    Out::Num(n) => n.to_string(),
                };
                (*k, text)
            })
            .collect();
        let message = canonical(texts.iter().map(|(k, v)| (*k, v.as_str())));
        let mut signature = state.settings.platform.sign(sign_type, message.as_bytes());
        if corrupt && let Some(first) = signature.first_mut() {
            // Still valid base64 of the right length, so only a real verification catches it.
            *first ^= 0x01;
        }
        let mut body = String::from("{");
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let _ = write!(body, "{}:", json_string(key));
            match value {
                Out::Str(s) => body.push_str(&json_string(s)),
                Out::Num(n) => {
                    let _ = write!(body, "{n}");
                }
            }
        }
        let _ = write!(
            body,
            ",\"sign\":{}}}",
            json_string(&crypto::base64(&signature))
        );
        body
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Handles one refund call after fault selection. `fired` is the rule that fired, if any; only
/// its decline, retry_later and bad_signature actions matter here.
pub(crate) fn process(
    state: &SimState,
    req: &Result<SpRequest, String>,
    merchant: Option<usize>,
    fired: Option<&Fired>,
) -> Reply {
    let corrupt = fired.is_some_and(|f| f.action == Some(FaultAction::BadSignature));
    let (nonce, string_amounts, coins) = {
        let mut faults = lock(&state.faults);
        let rng = faults.rng();
        let nonce: String = (0..32)
            .map(|_| char::from(rng.sample(Alphanumeric)))
            .collect();
        let string_amounts = rng.random_bool(state.settings.string_amounts_rate);
        (nonce, string_amounts, rng.random::<u32>())
    };
    let respond = |builder: ResponseBuilder, sign_type: SignType, outcome: Outcome, code: &str| {
        let mut builder = builder;
        builder
            .str("nonceStr", nonce.clone())
            .str("signType", sign_type.as_str());
        Reply {
            status: StatusCode::OK,
            content_type: "application/json;charset=UTF-8",
            body: builder.finish(state, sign_type, corrupt),
            outcome,
            code: (!code.is_empty()).then(|| code.to_owned()),
        }
    };

    let req = match req {
        Ok(req) => req,
        Err(reason) => {
            let mut b = ResponseBuilder::new(false, 0);
            b.str("returnCode", "FAIL")
                .str("returnMsg", reason.clone())
                .str("errorCode", "PARAMS_ERROR");
            return respond(b, SignType::Rsa, Outcome::Rejected, "PARAMS_ERROR");
        }
    };
    let requested_sign_type = req.text("signType").map(SignType::parse);
    // FAIL responses are signed too; with no usable signType, the seed's default.
    let sign_type = requested_sign_type.flatten().unwrap_or(SignType::Rsa);
    let echo = |b: &mut ResponseBuilder| {
        for key in ["mchId", "appId", "outTradeNo", "outRefundNo"] {
            if let Some(v) = req.text(key) {
                b.str(key, v);
            }
        }
    };
    // A request the provider refuses before it reaches business logic: `returnCode FAIL`.
    let return_fail = |code: &str, msg: &str| {
        let mut b = ResponseBuilder::new(false, 0);
        b.str("returnCode", "FAIL")
            .str("returnMsg", msg)
            .str("errorCode", code)
            .str("errorCodeDes", msg);
        echo(&mut b);
        respond(b, sign_type, Outcome::Rejected, code)
    };
    // A business FAIL: `returnCode SUCCESS`, `resultCode FAIL`.
    let result_fail = |code: &str, msg: &str, outcome: Outcome| {
        let mut b = ResponseBuilder::new(false, 0);
        b.str("returnCode", "SUCCESS")
            .str("returnMsg", "OK")
            .str("resultCode", "FAIL")
            .str("errorCode", code)
            .str("errorCodeDes", msg);
        echo(&mut b);
        respond(b, sign_type, outcome, code)
    };

    for key in ["mchId", "appId"] {
        if req.text(key).is_none() {
            return result_fail("LACK_PARAMS", &format!("missing {key}"), Outcome::Rejected);
        }
    }
    let Some(merchant) = merchant.and_then(|i| state.settings.shengpay.get(i)) else {
        return return_fail("MCH_NOT_FOUND", "merchant not found");
    };
    let (Some(sign), Some(sign_type_text)) = (req.text("sign"), req.text("signType")) else {
        return result_fail("LACK_PARAMS", "missing sign or signType", Outcome::Rejected);
    };
    let Some(request_sign_type) = SignType::parse(sign_type_text) else {
        return result_fail(
            "PARAMS_ERROR",
            &format!("unsupported signType {sign_type_text}"),
            Outcome::Rejected,
        );
    };
    if !merchant
        .key
        .verify(request_sign_type, req.canonical().as_bytes(), sign)
    {
        return return_fail("SIGN_ERROR", "sign error");
    }
    for key in [
        "outTradeNo",
        "outRefundNo",
        "nonceStr",
        "totalFee",
        "refundFee",
        "notifyUrl",
    ] {
        if req.text(key).is_none() {
            return result_fail("LACK_PARAMS", &format!("missing {key}"), Outcome::Rejected);
        }
    }
    let params = match validate(req) {
        Ok(p) => p,
        Err(msg) => return result_fail("PARAMS_ERROR", &msg, Outcome::Rejected),
    };

    if let Some(fired) = fired {
        match fired.action {
            Some(FaultAction::Decline) => {
                let (code, msg) = fault_code(fired);
                return result_fail(&code, &msg, Outcome::Declined);
            }
            Some(FaultAction::RetryLater) => {
                let (code, msg) = fault_code(fired);
                return result_fail(&code, &msg, Outcome::RetryLater);
            }
            _ => {}
        }
    }

    let attempt = RefundAttempt {
        provider: Provider::ShengPay,
        merchant: merchant.name.clone(),
        refund_no: params.refund_no.to_owned(),
        order_no: params.order_no.to_owned(),
        total_fee: params.total_fee,
        refund_fee: params.refund_fee,
        coupon_rate: state.settings.coupon_rate,
    };
    let decision = lock(&state.ledger).apply(&attempt, state.clock.now());
    let (paid, outcome) = match decision {
        Decision::Paid(p) => (p, Outcome::Paid),
        Decision::Replayed(p) => (p, Outcome::Replayed),
        Decision::Conflict => {
            return result_fail(
                "PARAMS_ERROR",
                "outRefundNo reused with different parameters",
                Outcome::Rejected,
            );
        }
        Decision::Declined { code, message } => {
            return result_fail(code, &message, Outcome::Declined);
        }
    };
    respond(
        success(
            &paid,
            &merchant.app_id,
            &merchant.mch_id,
            string_amounts,
            coins,
        ),
        sign_type,
        outcome,
        "",
    )
}

struct Params<'a> {
    refund_no: &'a str,
    order_no: &'a str,
    total_fee: i64,
    refund_fee: i64,
}

/// Checks formats and ranges; the message names the offending field.
fn validate(req: &SpRequest) -> Result<Params<'_>, String> {
    let text = |key: &str| req.text(key).unwrap_or("");
    for (key, max) in [
        ("outTradeNo", 32),
        ("outRefundNo", 32),
        ("nonceStr", 32),
        ("refundDesc", 128),
        ("refundAccount", 32),
        ("notifyUrl", 300),
    ] {
        let value = text(key);
        if value.chars().count() > max {
            return Err(format!("{key} longer than {max} characters"));
        }
        if value.chars().any(char::is_control) {
            return Err(format!("{key} contains control characters"));
        }
    }
    if let Some(account) = req.text("refundAccount")
        && !matches!(account, "UNSETTLED" | "RECHARGE")
    {
        return Err(format!(
            "refundAccount {account:?} is not UNSETTLED or RECHARGE"
        ));
    }
    let fee = |key: &str| -> Result<i64, String> {
        let raw = text(key);
        // Integers only, as digits: "1.0", "1e3" or "+1" are not fen.
        if raw.is_empty() || raw.len() > 18 || !raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{key} must be a positive integer in fen"));
        }
        let value: i64 = raw
            .parse()
            .map_err(|_| format!("{key} must be a positive integer in fen"))?;
        if !(1..=MAX_FEE).contains(&value) {
            return Err(format!("{key} must be between 1 and {MAX_FEE}"));
        }
        Ok(value)
    };
    Ok(Params {
        refund_no: text("outRefundNo"),
        order_no: text("outTradeNo"),
        total_fee: fee("totalFee")?,
        refund_fee: fee("refundFee")?,
    })
}

fn success(
    paid: &PaidRefund,
    app_id: &str,
    mch_id: &str,
    string_amounts: bool,
    coins: u32,
) -> ResponseBuilder {
    let mut b = ResponseBuilder::new(string_amounts, coins);
    b.str("returnCode", "SUCCESS")
        .str("returnMsg", "OK")
        .str("resultCode", "SUCCESS")
        .str("mchId", mch_id)
        .str("appId", app_id)
        .str("transactionId", paid.transaction_id.clone())
        .str("outTradeNo", paid.order_no.clone())
        .str("outRefundNo", paid.refund_no.clone())
        .str("refundId", paid.provider_refund_id.clone())
        .amount("refundFee", paid.refund_fee)
        .amount("settlementRefundFee", paid.settlement_refund_fee)
        .amount("totalFee", paid.total_fee)
        .amount("settlementTotalFee", paid.total_fee);
    if let Some(coupon_id) = &paid.coupon_refund_id {
        b.amount("couponRefundCount", 1)
            .amount("couponRefundFee", paid.coupon_refund_fee)
            .str("couponRefundId0", coupon_id.clone())
            .str("couponType0", "NO_CASH")
            .amount("couponRefundFee0", paid.coupon_refund_fee);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canonical_string_matches_the_design_example() {
        let body = r#"{
            "appId":"djgeiq978y933","mchId":"93751497","nonceStr":"ZmTruYz2Tld2hIRRg4Nf",
            "notifyUrl":"https://openapi2.lx-qa.com/pay/callback/v2/refund",
            "outRefundNo":"202105080000000488560","outTradeNo":"202105080000000488560",
            "refundFee":100,"sign":"xyz","signType":"RSA","totalFee":100,
            "refundDesc":"","refundAccount":null}"#;
        let req = parse(body.as_bytes()).expect("valid JSON");
        assert_eq!(
            req.canonical(),
            "appId=djgeiq978y933&mchId=93751497&nonceStr=ZmTruYz2Tld2hIRRg4Nf&notifyUrl=https://openapi2.lx-qa.com/pay/callback/v2/refund&outRefundNo=202105080000000488560&outTradeNo=202105080000000488560&refundFee=100&signType=RSA&totalFee=100"
        );
    }

    #[test]
    fn values_keep_their_json_text_and_strings_are_unescaped() {
        let req = parse(br#"{"b":"x\u0026y","a":1.50,"c":"10"}"#).expect("valid JSON");
        assert_eq!(req.canonical(), "a=1.50&b=x&y&c=10");
    }

    #[test]
    fn duplicate_keys_are_refused() {
        assert!(
            parse(br#"{"a":1,"a":2}"#)
                .unwrap_err()
                .contains("duplicate")
        );
    }
}
