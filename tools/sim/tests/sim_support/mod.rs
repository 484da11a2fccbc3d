//! Helpers shared by the simulator's integration tests: a config for the dev keys, and a
//! ShengPay/WuPay client side written with openssl and serde_json, independent of both the
//! simulator's rsa-crate code and the `shared` crate, so each implementation checks the other.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::{Signer, Verifier};
use refund_sim::{ShengPayMerchant, SimConfig, SimHandle, Simulator, WuPayMerchant};
use serde_json::{Map, Value, json};

pub const MCH_ID: &str = "93751497";
pub const APP_ID: &str = "djgeiq978y933";
pub const RFKEY: &str = "dev-rfkey-3c9f7a1e";

pub fn key_path(name: &str) -> PathBuf {
    testkit::workspace_root().join("keys/dev").join(name)
}

/// The dev-key configuration of config/sim.toml, on a free port, without coupons, string
/// amounts or rules, so each test turns on only what it checks. ShengPay refunds end as they
/// are answered (`processing_ms = 0`), so tests of the money rules see them paid at once;
/// tests of the asynchronous side set a processing time of their own.
pub fn config() -> SimConfig {
    let mut config = SimConfig::new(key_path("shengpay_platform_private.pem"));
    config.listen = "127.0.0.1:0".parse().expect("valid address");
    config.shengpay.processing_ms = 0;
    for (merchant, app_id) in [(MCH_ID, APP_ID), ("10000002", "app-10000002")] {
        config.shengpay.merchants.push(ShengPayMerchant {
            merchant: merchant.into(),
            app_id: app_id.into(),
            mch_id: merchant.into(),
            public_key_file: key_path("shengpay_merchant_public.pem"),
        });
    }
    for name in ["wu-soap11", "wu-soap12", "wu-post", "wu-get"] {
        config.wupay.merchants.push(WuPayMerchant {
            merchant: name.into(),
            path: format!("/{name}/WuPay.asmx"),
            cpn_id: "C001".into(),
            area: "A01".into(),
            rfkey_file: key_path("wupay_rfkey.txt"),
        });
    }
    config
}

pub async fn start(config: SimConfig) -> SimHandle {
    Simulator::start(config).await.expect("simulator starts")
}

pub fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(30))
}

pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("reqwest client")
}

/// A unique suffix so tests never share refund or order numbers.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{prefix}{}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

// ---- ShengPay -------------------------------------------------------------------------------

/// The canonical string over parsed JSON: every field but `sign`, null/empty dropped, sorted.
pub fn canonical(fields: &Map<String, Value>) -> String {
    let mut pairs: Vec<(String, String)> = fields
        .iter()
        .filter(|(k, _)| k.as_str() != "sign")
        .filter_map(|(k, v)| {
            let text = match v {
                Value::Null => return None,
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (!text.is_empty()).then(|| (k.clone(), text))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn digest(sign_type: &str) -> MessageDigest {
    match sign_type {
        "RSA2" => MessageDigest::sha256(),
        _ => MessageDigest::sha1(),
    }
}

/// Signs with the merchant's private key (openssl) and returns the request JSON.
pub fn signed(mut fields: Map<String, Value>) -> String {
    let sign_type = fields
        .get("signType")
        .and_then(Value::as_str)
        .unwrap_or("RSA")
        .to_owned();
    let pem = std::fs::read(key_path("shengpay_merchant_private.pem")).expect("merchant key");
    let key = PKey::private_key_from_pem(&pem).expect("PEM private key");
    let mut signer = Signer::new(digest(&sign_type), &key).expect("signer");
    signer
        .update(canonical(&fields).as_bytes())
        .expect("sign update");
    let signature = signer.sign_to_vec().expect("sign");
    fields.insert("sign".into(), Value::String(BASE64.encode(signature)));
    Value::Object(fields).to_string()
}

/// Request fields of a ShengPay refund (unsigned).
pub fn refund_fields(
    order_no: &str,
    refund_no: &str,
    total: i64,
    refund: i64,
) -> Map<String, Value> {
    let Value::Object(map) = json!({
        "appId": APP_ID,
        "mchId": MCH_ID,
        "outTradeNo": order_no,
        "outRefundNo": refund_no,
        "nonceStr": unique("nonce"),
        "totalFee": total,
        "refundFee": refund,
        "refundDesc": "customer returned goods",
        "notifyUrl": "https://example.invalid/notify",
        "signType": "RSA",
    }) else {
        unreachable!("a JSON object literal")
    };
    map
}

/// True when the response's `sign` verifies with the platform public key (openssl).
pub fn verifies(response: &Map<String, Value>) -> bool {
    let Some(sign) = response.get("sign").and_then(Value::as_str) else {
        return false;
    };
    let sign_type = response
        .get("signType")
        .and_then(Value::as_str)
        .unwrap_or("RSA");
    let pem = std::fs::read(key_path("shengpay_platform_public.pem")).expect("platform key");
    let key = PKey::public_key_from_pem(&pem).expect("PEM public key");
    let Ok(signature) = BASE64.decode(sign) else {
        return false;
    };
    let mut verifier = Verifier::new(digest(sign_type), &key).expect("verifier");
    verifier
        .update(canonical(response).as_bytes())
        .expect("verify update");
    verifier.verify(&signature).unwrap_or(false)
}

pub async fn post_shengpay(
    client: &reqwest::Client,
    sim: &SimHandle,
    body: String,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(sim.shengpay_url())
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
}

/// Sends a signed refund and returns the parsed response (asserting HTTP 200).
pub async fn shengpay_refund(
    client: &reqwest::Client,
    sim: &SimHandle,
    fields: Map<String, Value>,
) -> Map<String, Value> {
    let response = post_shengpay(client, sim, signed(fields))
        .await
        .expect("HTTP response");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON object")
}

/// An amount field that may be a JSON number or a string of digits.
pub fn amount(response: &Map<String, Value>, key: &str) -> i64 {
    match response.get(key) {
        Some(Value::Number(n)) => n.as_i64().expect("integer"),
        Some(Value::String(s)) => s.parse().expect("digits"),
        other => panic!("{key} missing or not an amount: {other:?}"),
    }
}

pub fn text<'a>(response: &'a Map<String, Value>, key: &str) -> &'a str {
    response.get(key).and_then(Value::as_str).unwrap_or("")
}

// ---- WuPay ----------------------------------------------------------------------------------

/// WuPay parameters in the help page's order.
pub fn wupay_params(
    order_no: &str,
    refund_no: &str,
    money: i64,
    refund: i64,
) -> Vec<(String, String)> {
    [
        ("refund_id", refund_no.to_owned()),
        ("order_id", order_no.to_owned()),
        ("pay_nd", "P0001".into()),
        ("money", money.to_string()),
        ("refund_fee", refund.to_string()),
        ("auth_type", "1".into()),
        ("rec_organ", "S01".into()),
        ("rec_device", "T01".into()),
        ("rec_man", "op7".into()),
        // Characters every binding must escape, in a form ASP.NET request validation lets
        // through on GET/POST (`<` before a space, `&` before a space).
        ("reason", "returned < goods > & more".into()),
        ("rfkey", RFKEY.into()),
        ("cpnId", "C001".into()),
        ("area", "A01".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

pub fn set_param(params: &mut [(String, String)], name: &str, value: &str) {
    for (k, v) in params.iter_mut() {
        if k == name {
            *v = value.to_owned();
        }
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A SOAP envelope as the seed shows it; `version12` picks SOAP 1.2.
pub fn soap_envelope(params: &[(String, String)], version12: bool) -> String {
    let (prefix, ns) = if version12 {
        ("soap12", "http://www.w3.org/2003/05/soap-envelope")
    } else {
        ("soap", "http://schemas.xmlsoap.org/soap/envelope/")
    };
    let inner: String = params
        .iter()
        .map(|(k, v)| format!("<{k}>{}</{k}>", xml_escape(v)))
        .collect();
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<{prefix}:Envelope xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:{prefix}="{ns}">
  <{prefix}:Body><Refund xmlns="http://tempuri.org/">{inner}</Refund></{prefix}:Body>
</{prefix}:Envelope>"#
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wu {
    Soap11,
    Soap12,
    Post,
    Get,
}

impl Wu {
    pub const ALL: [Wu; 4] = [Wu::Soap11, Wu::Soap12, Wu::Post, Wu::Get];

    pub fn merchant(self) -> &'static str {
        match self {
            Wu::Soap11 => "wu-soap11",
            Wu::Soap12 => "wu-soap12",
            Wu::Post => "wu-post",
            Wu::Get => "wu-get",
        }
    }
}

/// Sends a WuPay refund over `binding`; returns (HTTP status, content type, body).
pub async fn wupay_call(
    client: &reqwest::Client,
    sim: &SimHandle,
    binding: Wu,
    params: &[(String, String)],
) -> reqwest::Result<(u16, String, String)> {
    let base = sim
        .wupay_url(binding.merchant())
        .expect("configured merchant");
    let request = match binding {
        Wu::Soap11 => client
            .post(&base)
            .header("content-type", "text/xml; charset=utf-8")
            .header("SOAPAction", "\"http://tempuri.org/Refund\"")
            .body(soap_envelope(params, false)),
        Wu::Soap12 => client
            .post(&base)
            .header(
                "content-type",
                "application/soap+xml; charset=utf-8; action=\"http://tempuri.org/Refund\"",
            )
            .body(soap_envelope(params, true)),
        Wu::Post => client.post(format!("{base}/Refund")).form(params),
        Wu::Get => client.get(format!("{base}/Refund")).query(params),
    };
    let response = request.send().await?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = response.text().await?;
    Ok((status, content_type, body))
}

/// The text of the first element named `local` (any prefix), with entities resolved.
pub fn xml_text(body: &str, local: &str) -> Option<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::reader::NsReader::from_str(body);
    let mut inside = false;
    let mut text = String::new();
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) if e.local_name().as_ref() == local => inside = true,
            Event::End(e) if inside && e.local_name().as_ref() == local => return Some(text),
            Event::Text(t) if inside => text.push_str(&t.xml10_content()),
            Event::GeneralRef(r) if inside => {
                let resolved = match r.resolve_char_ref().ok()? {
                    Some(c) => c.to_string(),
                    None => quick_xml::escape::resolve_predefined_entity(&r)?.to_owned(),
                };
                text.push_str(&resolved);
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}
