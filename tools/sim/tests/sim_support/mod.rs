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

// ---- Our client (the `shared` crate), to show the worker's side reads what the sim sends ----

/// Our ShengPay client (the `shared` crate) for the simulator's first dev merchant.
pub fn our_client(sim: &SimHandle) -> shared::provider::shengpay::ShengpayClient {
    our_client_notified_at(sim, "https://example.invalid/notify")
}

/// [`our_client`], naming `notify_url` in its refund calls.
pub fn our_client_notified_at(
    sim: &SimHandle,
    notify_url: &str,
) -> shared::provider::shengpay::ShengpayClient {
    use shared::config::{HttpConfig, ShengpayMerchant, SignType};
    let merchant = ShengpayMerchant {
        merchant: "m1".into(),
        base_url: sim.base_url(),
        app_id: APP_ID.into(),
        mch_id: MCH_ID.into(),
        sign_type: SignType::Rsa,
        private_key_file: key_path("shengpay_merchant_private.pem"),
        platform_public_key_file: key_path("shengpay_platform_public.pem"),
        notify_url: notify_url.into(),
        idempotent: true,
        query_path: "/api/v3/payment/refundquery".into(),
        final_on_accept: false,
    };
    let http_config = HttpConfig::default();
    shared::provider::shengpay::ShengpayClient::new(
        &merchant,
        "shengpay.merchants[0]",
        shared::provider::http::build_client(&http_config).expect("HTTP client"),
        &http_config,
        shared::provider::codes::CodeTable::shengpay_default(),
    )
    .expect("client for the dev merchant")
}

/// A refund request message of merchant `m1` (our client's) for 100 of an order of 1000.
pub fn refund_request(order_no: &str, refund_no: &str) -> shared::job::RefundRequest {
    let body = serde_json::json!({
        "version": 1,
        "refund_no": refund_no,
        "order_no": order_no,
        "provider": "shengpay",
        "merchant": "m1",
        "total_fee": 1000,
        "refund_fee": 100,
        "reason": "customer returned goods",
    });
    shared::job::parse_request(body.to_string().as_bytes()).expect("a valid request")
}

// ---- ShengPay status query --------------------------------------------------------------------

/// Signed status query fields for `refund_no` at the first dev merchant (unsigned map).
pub fn query_fields(refund_no: &str) -> Map<String, Value> {
    let Value::Object(map) = json!({
        "appId": APP_ID,
        "mchId": MCH_ID,
        "outRefundNo": refund_no,
        "nonceStr": unique("nonce"),
        "signType": "RSA",
    }) else {
        unreachable!("a JSON object literal")
    };
    map
}

pub async fn post_query(
    client: &reqwest::Client,
    sim: &SimHandle,
    body: String,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(sim.shengpay_query_url())
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
}

/// Sends a signed status query and returns the parsed answer (asserting HTTP 200).
pub async fn shengpay_query(
    client: &reqwest::Client,
    sim: &SimHandle,
    fields: Map<String, Value>,
) -> Map<String, Value> {
    let response = post_query(client, sim, signed(fields))
        .await
        .expect("HTTP response");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON object")
}

// ---- Verification with the rsa crate ------------------------------------------------------

/// True when `sign` verifies with the platform PUBLIC key, checked with the `rsa` crate over
/// the canonical string of the parsed fields (a second check beside openssl's [`verifies`]).
pub fn verifies_rsa(fields: &Map<String, Value>) -> bool {
    use rsa::pkcs1v15::{Signature, VerifyingKey};
    use rsa::pkcs8::DecodePublicKey;
    use rsa::signature::Verifier as _;
    let Some(sign) = fields.get("sign").and_then(Value::as_str) else {
        return false;
    };
    let pem = std::fs::read_to_string(key_path("shengpay_platform_public.pem")).expect("key");
    let key = rsa::RsaPublicKey::from_public_key_pem(&pem).expect("SPKI PEM public key");
    let Ok(bytes) = BASE64.decode(sign) else {
        return false;
    };
    let Ok(signature) = Signature::try_from(bytes.as_slice()) else {
        return false;
    };
    let message = canonical(fields);
    match fields.get("signType").and_then(Value::as_str) {
        Some("RSA2") => VerifyingKey::<sha2::Sha256>::new(key)
            .verify(message.as_bytes(), &signature)
            .is_ok(),
        _ => VerifyingKey::<sha1::Sha1>::new(key)
            .verify(message.as_bytes(), &signature)
            .is_ok(),
    }
}

// ---- A notify receiver ----------------------------------------------------------------------

/// One notify as the receiver got it.
#[derive(Clone, Debug)]
pub struct Received {
    pub content_type: String,
    pub body: String,
    pub fields: Map<String, Value>,
    /// Whether `sign` verified (rsa crate, platform public key).
    pub verified: bool,
    /// The HTTP status the receiver answered.
    pub answered: u16,
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    /// Answers for the next verified notifies, in order; then 200 `SUCCESS`.
    script: std::collections::VecDeque<(u16, String)>,
}

/// A notify receiver on a free port, like the worker's: a notify whose signature does not
/// verify is answered 401; a verified one gets the next scripted answer, else 200 `SUCCESS`.
pub struct Receiver {
    pub url: String,
    state: std::sync::Arc<std::sync::Mutex<ReceiverState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Receiver::scripted(Vec::new()).await
    }

    /// A receiver that answers its first verified notifies with `answers`.
    pub async fn scripted(answers: Vec<(u16, &str)>) -> Receiver {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        type Shared = std::sync::Arc<std::sync::Mutex<ReceiverState>>;
        async fn notify(
            State(state): State<Shared>,
            headers: HeaderMap,
            body: String,
        ) -> (StatusCode, String) {
            let fields: Map<String, Value> = serde_json::from_str(&body).unwrap_or_default();
            let verified = verifies_rsa(&fields);
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            let (status, answer) = if !verified {
                (401, "FAIL: bad sign".to_owned())
            } else {
                state
                    .script
                    .pop_front()
                    .unwrap_or((200, "SUCCESS".to_owned()))
            };
            state.received.push(Received {
                content_type: headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
                body,
                fields,
                verified,
                answered: status,
            });
            (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                answer,
            )
        }
        let state: Shared = std::sync::Arc::new(std::sync::Mutex::new(ReceiverState {
            received: Vec::new(),
            script: answers
                .into_iter()
                .map(|(s, a)| (s, a.to_owned()))
                .collect(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("receiver binds");
        let addr = listener.local_addr().expect("receiver address");
        let app = axum::Router::new()
            .route("/notify/shengpay", axum::routing::post(notify))
            .with_state(std::sync::Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/notify/shengpay"),
            state,
            task,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .received
            .clone()
    }

    /// Waits until at least `n` notifies arrived (panics after 10 s) and returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "expected {n} notifies, got {}: {received:#?}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Refund fields whose `notifyUrl` is `receiver`'s.
pub fn refund_fields_to(
    receiver: &Receiver,
    order_no: &str,
    refund_no: &str,
    total: i64,
    refund: i64,
) -> Map<String, Value> {
    let mut fields = refund_fields(order_no, refund_no, total, refund);
    fields.insert("notifyUrl".into(), receiver.url.clone().into());
    fields
}

/// Waits until `check` holds for the simulator (panics after 10 s).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
