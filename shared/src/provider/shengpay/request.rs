//! What we send: the refund request's fields from a validated request and the merchant's
//! config, and the intake check that every value that is signed can be signed unambiguously.

use serde_json::{Map, Value};

use crate::config::SignType;
use crate::job::{RefundRequest, Rejection};

use super::*;

/// The merchant-side values a refund request carries besides the refund itself.
#[derive(Debug, Clone, Copy)]
pub struct MerchantParams<'a> {
    pub app_id: &'a str,
    pub mch_id: &'a str,
    pub notify_url: &'a str,
    pub sign_type: SignType,
}

/// One request field that comes from the refund message rather than from merchant config.
pub(super) struct FromRequest {
    /// The ShengPay field name.
    wire: &'static str,
    /// The message field it comes from (DESIGN §3), as intake rejections name it.
    source: &'static str,
    value: Value,
}

/// Every field of the request body that carries a value of the refund message. The request
/// builder and the intake check ([`signable`]) both read this one list, so a field added here
/// is checked without anyone having to remember to.
pub(super) fn from_request(request: &RefundRequest) -> Vec<FromRequest> {
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
