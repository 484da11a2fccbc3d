//! Fixtures and helpers shared by the ShengPay test modules: keys, the seed refund, signed
//! answers and a configured client, so that each module's tests read like the originals.

use std::path::PathBuf;

use openssl::pkey::{PKey, Private, Public};
use serde_json::{Map, Value, json};

use super::*;
use crate::config::{HttpConfig, ShengpayMerchant, SignType};
use crate::job::{ProviderKind, RefundAccount, RefundRequest, ShengpayOptions};
use crate::provider::codes::CodeTable;
use crate::provider::keys;
use crate::provider::{Outcome, http};

pub(super) fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/shengpay")
        .join(name)
}

pub(super) fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap()
}

pub(super) fn merchant_private() -> PKey<Private> {
    keys::private_key_from_file("test", &fixture_path("merchant_private_pkcs8.pem")).unwrap()
}

pub(super) fn merchant_public() -> PKey<Public> {
    keys::public_key_from_file("test", &fixture_path("merchant_public_spki.pem")).unwrap()
}

pub(super) fn platform_private() -> PKey<Private> {
    keys::private_key_from_file("test", &fixture_path("platform_private_pkcs8.pem")).unwrap()
}

pub(super) fn platform_public() -> PKey<Public> {
    keys::public_key_from_file("test", &fixture_path("platform_public_spki.pem")).unwrap()
}

/// The seed's refund, as our side asked for it.
pub(super) fn seed_expected() -> Expected<'static> {
    Expected {
        refund_no: "202105080000000488560",
        order_no: "202105080000000488560",
        refund_fee: 10,
        total_fee: 1000,
        mch_id: "93751497",
        app_id: "djgeiq978y933",
    }
}

pub(super) fn judge<'a>(key: &'a PKey<Public>, codes: &'a CodeTable) -> Judge<'a> {
    Judge {
        platform_key: key,
        sign_type: SignType::Rsa,
        codes,
    }
}

/// A successful response to the seed refund, as a JSON object to be signed.
pub(super) fn success_fields() -> Map<String, Value> {
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

pub(super) fn platform_signed(fields: Map<String, Value>) -> String {
    signed_json(fields, &platform_private(), SignType::Rsa)
        .unwrap()
        .body
}

pub(super) fn classify_seed(status: u16, body: &str) -> Outcome {
    let key = platform_public();
    let codes = CodeTable::shengpay_default();
    classify_response(
        status,
        body.as_bytes(),
        &seed_expected(),
        &judge(&key, &codes),
    )
}

pub(super) fn request(reason: Option<&str>, account: Option<RefundAccount>) -> RefundRequest {
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

pub(super) fn merchant_config(base_url: &str, sign_type: SignType) -> ShengpayMerchant {
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
        query_path: "/api/v3/payment/refundquery".into(),
        final_on_accept: false,
    }
}

pub(super) fn client(base_url: &str, sign_type: SignType) -> ShengpayClient {
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

pub(super) fn is_nonce(s: &str) -> bool {
    s.len() == NONCE_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
}
