//! The simulated ShengPay: the refund call (`POST /api/v1/payment/refund`, here), the refund's
//! asynchronous end ([`lifecycle`]), the notify it sends ([`notify`]) and the status query
//! ([`query`]), all signed JSON.
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
use rand::rngs::StdRng;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::Provider;
use crate::calls::Outcome;
use crate::crypto::{self, SignType};
use crate::faults::{FaultAction, Fired, fault_code};
use crate::ledger::{Decision, MAX_FEE, PaidRefund, RefundAttempt};
use crate::server::{Reply, ShengPayAccount, SimState, lock};

mod lifecycle;
mod notify;
mod query;

pub(crate) use lifecycle::{Book, Tracked, Which, end_refunds, run_ticker};
pub use lifecycle::{RefundStatus, ShengPayRefund};
pub(crate) use notify::{Notifier, resend};
pub use notify::{NotifyKind, NotifyOutcome, NotifyRecord};
pub(crate) use query::process_query;

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
pub(crate) enum Out {
    Str(String),
    Num(i64),
}

/// Builds a response (or notify) in the order fields are added, then signs exactly what it
/// writes.
pub(crate) struct ResponseBuilder {
    fields: Vec<(&'static str, Out)>,
    /// Whether this response writes amounts as JSON strings (see `string_amounts_rate`).
    string_amounts: bool,
    /// Per-field choice when `string_amounts`: `refundFee` always, others at random, as in the
    /// seed's example where only some amounts are strings.
    amount_coins: u32,
}

impl ResponseBuilder {
    pub(crate) fn new(string_amounts: bool, amount_coins: u32) -> Self {
        ResponseBuilder {
            fields: Vec::new(),
            string_amounts,
            amount_coins,
        }
    }

    pub(crate) fn str(&mut self, key: &'static str, value: impl Into<String>) -> &mut Self {
        self.fields.push((key, Out::Str(value.into())));
        self
    }

    pub(crate) fn amount(&mut self, key: &'static str, value: i64) -> &mut Self {
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

    pub(crate) fn finish(self, state: &SimState, sign_type: SignType, corrupt: bool) -> String {
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

/// What every answer to one call shares: its nonce, how it writes amounts, how it is signed
/// and which request fields it echoes (every answer names the refund it answers).
pub(crate) struct Responder<'a> {
    state: &'a SimState,
    nonce: String,
    string_amounts: bool,
    coins: u32,
    corrupt: bool,
    sign_type: SignType,
    echo: Vec<(&'static str, String)>,
}

/// A fresh nonce and the amount-style choices (whether amounts are strings, and which), from
/// a seeded random source.
pub(crate) fn random_bits(rng: &mut StdRng, string_amounts_rate: f64) -> (String, bool, u32) {
    let nonce: String = (0..32)
        .map(|_| char::from(rng.sample(Alphanumeric)))
        .collect();
    let string_amounts = rng.random_bool(string_amounts_rate);
    (nonce, string_amounts, rng.random::<u32>())
}

impl<'a> Responder<'a> {
    pub(crate) fn new(state: &'a SimState, fired: Option<&Fired>) -> Self {
        // The calls' random source, shared with the rule rates: one seed reproduces a run.
        let (nonce, string_amounts, coins) = random_bits(
            lock(&state.faults).rng(),
            state.settings.string_amounts_rate,
        );
        Responder {
            state,
            nonce,
            string_amounts,
            coins,
            corrupt: fired.is_some_and(|f| f.action == Some(FaultAction::BadSignature)),
            // FAIL responses are signed too; with no usable signType, the seed's default.
            sign_type: SignType::Rsa,
            echo: Vec::new(),
        }
    }

    /// A builder that writes amounts the way this answer does.
    pub(crate) fn builder(&self) -> ResponseBuilder {
        ResponseBuilder::new(self.string_amounts, self.coins)
    }

    pub(crate) fn reply(&self, mut b: ResponseBuilder, outcome: Outcome, code: &str) -> Reply {
        b.str("nonceStr", self.nonce.clone())
            .str("signType", self.sign_type.as_str());
        Reply {
            status: StatusCode::OK,
            content_type: "application/json;charset=UTF-8",
            body: b.finish(self.state, self.sign_type, self.corrupt),
            outcome,
            code: (!code.is_empty()).then(|| code.to_owned()),
            accepted: None,
            detail: None,
        }
    }

    fn echo(&self, b: &mut ResponseBuilder) {
        for (key, value) in &self.echo {
            b.str(key, value.clone());
        }
    }

    /// A request the provider refuses before it reaches business logic: `returnCode FAIL`.
    pub(crate) fn return_fail(&self, code: &str, msg: &str) -> Reply {
        let mut b = ResponseBuilder::new(false, 0);
        b.str("returnCode", "FAIL")
            .str("returnMsg", msg)
            .str("errorCode", code)
            .str("errorCodeDes", msg);
        self.echo(&mut b);
        self.reply(b, Outcome::Rejected, code)
    }

    /// A business FAIL: `returnCode SUCCESS`, `resultCode FAIL`.
    pub(crate) fn result_fail(&self, code: &str, msg: &str, outcome: Outcome) -> Reply {
        let mut b = ResponseBuilder::new(false, 0);
        b.str("returnCode", "SUCCESS")
            .str("returnMsg", "OK")
            .str("resultCode", "FAIL")
            .str("errorCode", code)
            .str("errorCodeDes", msg);
        self.echo(&mut b);
        self.reply(b, outcome, code)
    }
}

/// What refund calls and status queries check alike: a readable request from a known account,
/// signed by it. Sets the answer's sign type and echoed fields on the way.
pub(crate) fn authenticate<'r, 's>(
    r: &mut Responder<'s>,
    req: &'r Result<SpRequest, String>,
    merchant: Option<usize>,
    echo: &[&'static str],
) -> Result<(&'r SpRequest, &'s ShengPayAccount), Box<Reply>> {
    let req = match req {
        Ok(req) => req,
        Err(reason) => {
            let mut b = ResponseBuilder::new(false, 0);
            b.str("returnCode", "FAIL")
                .str("returnMsg", reason.clone())
                .str("errorCode", "PARAMS_ERROR");
            return Err(Box::new(r.reply(b, Outcome::Rejected, "PARAMS_ERROR")));
        }
    };
    if let Some(sign_type) = req.text("signType").and_then(SignType::parse) {
        r.sign_type = sign_type;
    }
    r.echo = echo
        .iter()
        .filter_map(|key| req.text(key).map(|v| (*key, v.to_owned())))
        .collect();
    for key in ["mchId", "appId"] {
        if req.text(key).is_none() {
            return Err(Box::new(r.result_fail(
                "LACK_PARAMS",
                &format!("missing {key}"),
                Outcome::Rejected,
            )));
        }
    }
    let state = r.state;
    let Some(account) = merchant.and_then(|i| state.settings.shengpay.get(i)) else {
        return Err(Box::new(
            r.return_fail("MCH_NOT_FOUND", "merchant not found"),
        ));
    };
    let (Some(sign), Some(sign_type_text)) = (req.text("sign"), req.text("signType")) else {
        return Err(Box::new(r.result_fail(
            "LACK_PARAMS",
            "missing sign or signType",
            Outcome::Rejected,
        )));
    };
    let Some(request_sign_type) = SignType::parse(sign_type_text) else {
        return Err(Box::new(r.result_fail(
            "PARAMS_ERROR",
            &format!("unsupported signType {sign_type_text}"),
            Outcome::Rejected,
        )));
    };
    if !account
        .key
        .verify(request_sign_type, req.canonical().as_bytes(), sign)
    {
        return Err(Box::new(r.return_fail("SIGN_ERROR", "sign error")));
    }
    Ok((req, account))
}

/// Handles one refund call after fault selection. `fired` is the rule that fired, if any; only
/// its decline, retry_later and bad_signature actions matter here. `ends` is how an accepted
/// refund ends (`refund_close` or `change`; none: `SUCCESS`), chosen apart from `fired`.
///
/// Acceptance reserves the amount and starts the refund's `PROCESSING` time; the call itself
/// answers as ShengPay does, with no status: how the refund ends comes by notify and query.
pub(crate) fn process(
    state: &SimState,
    req: &Result<SpRequest, String>,
    merchant: Option<usize>,
    fired: Option<&Fired>,
    ends: Option<FaultAction>,
) -> Reply {
    let mut r = Responder::new(state, fired);
    let (req, merchant) = match authenticate(
        &mut r,
        req,
        merchant,
        &["mchId", "appId", "outTradeNo", "outRefundNo"],
    ) {
        Ok(found) => found,
        Err(reply) => return *reply,
    };
    for key in [
        "outTradeNo",
        "outRefundNo",
        "nonceStr",
        "totalFee",
        "refundFee",
        "notifyUrl",
    ] {
        if req.text(key).is_none() {
            return r.result_fail("LACK_PARAMS", &format!("missing {key}"), Outcome::Rejected);
        }
    }
    let params = match validate(req) {
        Ok(p) => p,
        Err(msg) => return r.result_fail("PARAMS_ERROR", &msg, Outcome::Rejected),
    };

    if let Some(fired) = fired {
        match fired.action {
            Some(FaultAction::Decline) => {
                let (code, msg) = fault_code(fired);
                return r.result_fail(&code, &msg, Outcome::Declined);
            }
            Some(FaultAction::RetryLater) => {
                let (code, msg) = fault_code(fired);
                return r.result_fail(&code, &msg, Outcome::RetryLater);
            }
            _ => {}
        }
    }
    let ends = match ends {
        Some(FaultAction::RefundClose) => RefundStatus::RefundClose,
        Some(FaultAction::Change) => RefundStatus::Change,
        _ => RefundStatus::Success,
    };

    let attempt = RefundAttempt {
        provider: Provider::ShengPay,
        merchant: merchant.name.clone(),
        refund_no: params.refund_no.to_owned(),
        order_no: params.order_no.to_owned(),
        total_fee: params.total_fee,
        refund_fee: params.refund_fee,
        coupon_rate: state.settings.coupon_rate,
    };
    let now = state.clock.now();
    // The book is locked around the ledger so that a query never sees a refund the ledger
    // accepted but the book does not know yet (lock order everywhere: refunds, then ledger).
    let decision = {
        let mut book = lock(&state.refunds);
        let decision = lock(&state.ledger).apply(&attempt, now, false);
        if let Decision::Paid(paid) = &decision {
            book.register(Tracked::new(
                paid,
                merchant,
                r.sign_type,
                req.text("notifyUrl"),
                ends,
                now,
                state.settings.processing,
            ));
        }
        decision
    };
    let (paid, outcome) = match decision {
        Decision::Paid(p) => (p, Outcome::Paid),
        Decision::Replayed(p) => (p, Outcome::Replayed),
        Decision::Conflict => {
            return r.result_fail(
                "PARAMS_ERROR",
                "outRefundNo reused with different parameters",
                Outcome::Rejected,
            );
        }
        Decision::Declined { code, message } => {
            return r.result_fail(code, &message, Outcome::Declined);
        }
    };
    let b = success(&paid, &merchant.app_id, &merchant.mch_id, r.builder());
    let mut reply = r.reply(b, outcome, "");
    if outcome == Outcome::Paid {
        reply.accepted = Some((merchant.name.clone(), paid.refund_no.clone()));
        state.wake.notify_one();
    }
    reply
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
    mut b: ResponseBuilder,
) -> ResponseBuilder {
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
