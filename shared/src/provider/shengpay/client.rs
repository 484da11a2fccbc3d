//! The ShengPay client of one merchant account: configuration checks at start, the
//! [`Provider`] implementation and the HTTP exchange.
//!
//! It only wires the other parts together (build and sign the request, send it, classify the
//! answer), so that what a refund attempt records and how it is logged can be read in one place
//! without the protocol details.

use std::fmt;
use std::time::Instant;

use async_trait::async_trait;
use openssl::pkey::{PKey, Private, Public};

use super::classify::{Expected, Judge, classify_response};
use super::request::{MerchantParams, new_nonce, refund_fields, signable};
use super::response::{RefundResponse, ResponseFields, VerifyError, verify_body};
use super::sign::{SignError, SignedJson, is_ambiguous, signed_json};
use super::status::{classify_query, query_fields, status_report};
use crate::config::{ConfigError, HttpConfig, ShengpayMerchant, SignType};
use crate::job::{ProviderKind, RefundRequest, Rejection};
use crate::provider::codes::CodeTable;
use crate::provider::http::{self, TransportError};
use crate::provider::keys;
use crate::provider::status::{NotifyRefusal, QueryOutcome, QueryRecord, StatusReport};
use crate::provider::{AttemptRecord, Outcome, Provider, RefundCall};

/// The refund endpoint, relative to a merchant's `base_url`.
pub const REFUND_PATH: &str = "/api/v1/payment/refund";

/// ShengPay client for one merchant account.
pub struct ShengpayClient {
    merchant: String,
    app_id: String,
    mch_id: String,
    notify_url: String,
    sign_type: SignType,
    idempotent: bool,
    final_on_accept: bool,
    url: String,
    query_url: String,
    http: reqwest::Client,
    max_response_bytes: usize,
    codes: CodeTable,
    private_key: PKey<Private>,
    platform_key: PKey<Public>,
}

impl fmt::Debug for ShengpayClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are left out on purpose.
        f.debug_struct("ShengpayClient")
            .field("merchant", &self.merchant)
            .field("url", &self.url)
            .field("sign_type", &self.sign_type)
            .field("idempotent", &self.idempotent)
            .finish_non_exhaustive()
    }
}

impl ShengpayClient {
    /// Builds the client for `merchant`, loading its private key and ShengPay's public key.
    /// `key_prefix` is the merchant's config path (e.g. `shengpay.merchants[0]`) so that key
    /// errors name `shengpay.merchants[0].private_key_file`.
    pub fn new(
        merchant: &ShengpayMerchant,
        key_prefix: &str,
        http: reqwest::Client,
        http_config: &HttpConfig,
        codes: CodeTable,
    ) -> Result<Self, ConfigError> {
        let private_key = keys::private_key_from_file(
            &format!("{key_prefix}.private_key_file"),
            &merchant.private_key_file,
        )?;
        let platform_key = keys::public_key_from_file(
            &format!("{key_prefix}.platform_public_key_file"),
            &merchant.platform_public_key_file,
        )?;
        Self::with_keys(
            merchant,
            key_prefix,
            private_key,
            platform_key,
            http,
            http_config,
            codes,
        )
    }

    /// Builds the client from keys already loaded (the key file paths in `merchant` are not
    /// read). Merchant values that go into every string to sign are checked here, once, so
    /// that a bad one stops the start naming its config key instead of failing each refund.
    pub fn with_keys(
        merchant: &ShengpayMerchant,
        key_prefix: &str,
        private_key: PKey<Private>,
        platform_key: PKey<Public>,
        http: reqwest::Client,
        http_config: &HttpConfig,
        codes: CodeTable,
    ) -> Result<Self, ConfigError> {
        for (name, value) in [
            ("app_id", &merchant.app_id),
            ("mch_id", &merchant.mch_id),
            ("notify_url", &merchant.notify_url),
        ] {
            if is_ambiguous(value) {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}.{name}"),
                    "must not contain `&` or `=`: ShengPay signs values joined raw as k=v&..., \
                     so such a value could sign like a different set of fields (a notify URL \
                     cannot carry a query string)",
                ));
            }
        }
        Ok(Self {
            merchant: merchant.merchant.clone(),
            app_id: merchant.app_id.clone(),
            mch_id: merchant.mch_id.clone(),
            notify_url: merchant.notify_url.clone(),
            sign_type: merchant.sign_type,
            idempotent: merchant.idempotent,
            final_on_accept: merchant.final_on_accept,
            url: format!("{}{REFUND_PATH}", merchant.base_url.trim_end_matches('/')),
            query_url: format!(
                "{}{}",
                merchant.base_url.trim_end_matches('/'),
                merchant.query_path
            ),
            http,
            max_response_bytes: http_config.max_response_bytes,
            codes,
            private_key,
            platform_key,
        })
    }

    /// The refund endpoint this client posts to.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn params(&self) -> MerchantParams<'_> {
        MerchantParams {
            app_id: &self.app_id,
            mch_id: &self.mch_id,
            notify_url: &self.notify_url,
            sign_type: self.sign_type,
        }
    }

    /// The signed request body for `request`, with a fresh nonce.
    pub fn build_request(&self, request: &RefundRequest) -> Result<SignedJson, SignError> {
        let fields = refund_fields(&self.params(), request, &new_nonce());
        signed_json(fields, &self.private_key, self.sign_type)
    }

    /// The status query endpoint this client posts to.
    pub fn query_url(&self) -> &str {
        &self.query_url
    }

    /// The merchant account (`mchId`, `appId`) whose answers and notifies this client reads.
    pub fn account(&self) -> (&str, &str) {
        (&self.mch_id, &self.app_id)
    }

    /// What an answer about `request` must say to be about it.
    fn expected<'a>(&'a self, request: &'a RefundRequest) -> Expected<'a> {
        Expected {
            refund_no: &request.refund_no,
            order_no: &request.order_no,
            refund_fee: request.refund_fee,
            total_fee: request.total_fee,
            mch_id: &self.mch_id,
            app_id: &self.app_id,
        }
    }

    fn judge(&self) -> Judge<'_> {
        Judge {
            platform_key: &self.platform_key,
            sign_type: self.sign_type,
            codes: &self.codes,
        }
    }

    /// Classifies a response to a refund of `request` (what [`Provider::refund`] does after
    /// the HTTP exchange).
    pub fn classify(&self, request: &RefundRequest, status: u16, body: &[u8]) -> Outcome {
        classify_response(status, body, &self.expected(request), &self.judge())
    }

    /// Verifies a notify callback body with ShengPay's key and returns its fields.
    pub fn verify_notify(&self, body: &[u8]) -> Result<ResponseFields, VerifyError> {
        verify_body(body, &self.platform_key, self.sign_type)
    }

    /// The status a verified notify gives for the job of `request`, or why it gives none.
    pub fn notify_report(
        &self,
        fields: &ResponseFields,
        request: &RefundRequest,
        raw: String,
    ) -> Result<StatusReport, String> {
        let resp = RefundResponse::from_fields(fields).map_err(|e| e.to_string())?;
        status_report(&resp, &self.expected(request), raw)
    }

    /// The signed status query for `request`, with a fresh nonce.
    pub fn build_query(&self, request: &RefundRequest) -> Result<SignedJson, SignError> {
        let fields = query_fields(&self.params(), &request.refund_no, &new_nonce());
        signed_json(fields, &self.private_key, self.sign_type)
    }

    /// Posts a signed JSON body; the transport outcome and, if one came back, the answer.
    async fn post(&self, url: &str, body: String) -> Result<http::HttpReply, TransportError> {
        let builder = self
            .http
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .body(body);
        http::send(builder, self.max_response_bytes).await
    }
}

#[async_trait]
impl Provider for ShengpayClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Shengpay
    }

    fn merchant(&self) -> &str {
        &self.merchant
    }

    fn idempotent(&self) -> bool {
        self.idempotent
    }

    fn admit(&self, request: &RefundRequest) -> Result<(), Rejection> {
        signable(request)
    }

    fn final_on_accept(&self) -> bool {
        self.final_on_accept
    }

    fn notify_account(&self) -> Option<(&str, &str)> {
        Some(self.account())
    }

    fn read_notify(
        &self,
        body: &[u8],
        request: &RefundRequest,
    ) -> Result<StatusReport, NotifyRefusal> {
        let fields = self
            .verify_notify(body)
            .map_err(|e| NotifyRefusal::Unverified(e.to_string()))?;
        let raw = String::from_utf8_lossy(body).into_owned();
        self.notify_report(&fields, request, raw)
            .map_err(NotifyRefusal::NotOurs)
    }

    async fn query(&self, request: &RefundRequest) -> Option<QueryRecord> {
        let started = Instant::now();
        let (outcome, request_redacted, http_status) = match self.build_query(request) {
            Err(e) => (
                QueryOutcome::Unanswered {
                    error: e.to_string(),
                    raw: None,
                },
                String::new(),
                None,
            ),
            Ok(SignedJson { body, redacted }) => match self.post(&self.query_url, body).await {
                Err(TransportError::NotSent(error) | TransportError::MaybeDelivered(error)) => (
                    QueryOutcome::Unanswered { error, raw: None },
                    redacted,
                    None,
                ),
                Ok(reply) => (
                    classify_query(
                        reply.status,
                        &reply.body,
                        &self.expected(request),
                        &self.judge(),
                    ),
                    redacted,
                    Some(reply.status),
                ),
            },
        };
        tracing::debug!(
            refund_no = %request.refund_no,
            merchant = %self.merchant,
            class = outcome.class(),
            http_status,
            "shengpay status query"
        );
        Some(QueryRecord {
            outcome,
            request_redacted,
            http_status,
            latency: started.elapsed(),
        })
    }

    async fn refund(&self, call: RefundCall<'_>) -> AttemptRecord {
        let started = Instant::now();
        let request = call.request;
        let signed = match self.build_request(request) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(refund_no = %request.refund_no, error = %e, "shengpay signing failed");
                return AttemptRecord {
                    outcome: Outcome::NotSent {
                        error: e.to_string(),
                    },
                    request_redacted: String::new(),
                    http_status: None,
                    latency: started.elapsed(),
                };
            }
        };
        let SignedJson { body, redacted } = signed;
        let (outcome, http_status) = match self.post(&self.url, body).await {
            Err(TransportError::NotSent(error)) => (Outcome::NotSent { error }, None),
            Err(TransportError::MaybeDelivered(error)) => {
                (Outcome::MaybeDelivered { error, raw: None }, None)
            }
            Ok(reply) => (
                self.classify(request, reply.status, &reply.body),
                Some(reply.status),
            ),
        };
        let latency = started.elapsed();
        tracing::debug!(
            refund_no = %request.refund_no,
            attempt = call.attempt,
            merchant = %self.merchant,
            class = outcome.class(),
            code = outcome.code().unwrap_or(""),
            http_status,
            latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            "shengpay refund attempt"
        );
        AttemptRecord {
            outcome,
            request_redacted: redacted,
            http_status,
            latency,
        }
    }
}

#[cfg(test)]
mod tests {

    use serde_json::Value;

    use super::*;
    use crate::job::RefundAccount;
    use crate::provider::shengpay::sign::REDACTED;
    use crate::provider::shengpay::test_support::*;

    #[test]
    fn constructor_errors_name_the_key_file_setting() {
        let mut m = merchant_config("http://127.0.0.1:9", SignType::Rsa);
        m.private_key_file = fixture_path("missing.pem");
        let http_cfg = HttpConfig::default();
        let e = ShengpayClient::new(
            &m,
            "shengpay.merchants[3]",
            http::build_client(&http_cfg).unwrap(),
            &http_cfg,
            CodeTable::shengpay_default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("shengpay.merchants[3].private_key_file"),
            "{e}"
        );
        let mut m = merchant_config("http://127.0.0.1:9", SignType::Rsa);
        m.platform_public_key_file = fixture_path("merchant_private_pkcs8.pem");
        let e = ShengpayClient::new(
            &m,
            "shengpay.merchants[3]",
            http::build_client(&http_cfg).unwrap(),
            &http_cfg,
            CodeTable::shengpay_default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("shengpay.merchants[3].platform_public_key_file"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_refund_whose_values_cannot_be_signed_unambiguously_is_not_sent() {
        // Nothing listens on the port: had the request been sent, it would be NotSent for a
        // connection error instead, so the message is what shows the signer refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = client(&format!("http://{addr}"), SignType::Rsa);
        let req = request(Some("a=1&refundFee=1"), None);
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 1,
            })
            .await;
        match &rec.outcome {
            Outcome::NotSent { error } => assert!(error.contains("refundDesc"), "{error}"),
            o => panic!("{o:?}"),
        }
        assert_eq!(rec.http_status, None);
    }

    #[test]
    fn a_merchant_value_with_ampersand_or_equals_fails_client_construction_naming_the_key() {
        let http_cfg = HttpConfig::default();
        type Edit = fn(&mut ShengpayMerchant);
        let cases: [(&str, Edit); 4] = [
            ("notify_url", |m| {
                m.notify_url = "https://notify.example/refund?a=1&b=2".into()
            }),
            ("notify_url", |m| {
                m.notify_url = "https://notify.example/refund?token=x".into()
            }),
            ("app_id", |m| m.app_id = "app&x".into()),
            ("mch_id", |m| m.mch_id = "9=3".into()),
        ];
        for (key, edit) in cases {
            let mut m = merchant_config("http://127.0.0.1:9", SignType::Rsa);
            edit(&mut m);
            let e = ShengpayClient::new(
                &m,
                "shengpay.merchants[2]",
                http::build_client(&http_cfg).unwrap(),
                &http_cfg,
                CodeTable::shengpay_default(),
            )
            .expect_err("an ambiguous merchant value must be refused");
            assert!(
                e.to_string()
                    .contains(&format!("shengpay.merchants[2].{key}")),
                "{e}"
            );
        }
    }

    // --- end to end over HTTP ----------------------------------------------------------------

    /// Answers one HTTP/1.1 request on `listener` with `reply_to(request_body)` and hands the
    /// request (head, body) back.
    async fn serve_once(
        listener: tokio::net::TcpListener,
        status: &'static str,
        reply_to: impl FnOnce(&str) -> String + Send + 'static,
    ) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed early");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap();
        while buf.len() < head_end + len {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8(buf[head_end..head_end + len].to_vec()).unwrap();
        let reply = reply_to(&body);
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
        sock.shutdown().await.unwrap();
        (head, body)
    }

    #[tokio::test]
    async fn refund_posts_a_signed_request_and_books_the_verified_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_once(listener, "200 OK", |req_body| {
            // Answer like ShengPay: echo the refund, amounts half as strings, signed.
            let req: Value = serde_json::from_str(req_body).unwrap();
            let mut m = success_fields();
            m.insert("outRefundNo".into(), req["outRefundNo"].clone());
            m.insert("outTradeNo".into(), req["outTradeNo"].clone());
            m.insert("refundFee".into(), req["refundFee"].to_string().into());
            m.insert("settlementRefundFee".into(), req["refundFee"].clone());
            m.insert("totalFee".into(), req["totalFee"].clone());
            platform_signed(m)
        }));
        let c = client(&format!("http://{addr}/"), SignType::Rsa);
        assert_eq!(c.url(), format!("http://{addr}/api/v1/payment/refund"));
        let req = request(Some("退货"), Some(RefundAccount::Recharge));
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 1,
            })
            .await;
        let (head, body) = server.await.unwrap();

        assert!(
            head.starts_with("POST /api/v1/payment/refund HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json; charset=utf-8\r\n"),
            "{head}"
        );
        let sent = ResponseFields::parse(body.as_bytes()).unwrap();
        assert!(sent.verify(&merchant_public(), SignType::Rsa).is_ok());
        assert!(is_nonce(sent.string("nonceStr").unwrap().unwrap()));
        assert_eq!(sent.string("refundDesc").unwrap(), Some("退货"));
        assert_eq!(sent.string("refundAccount").unwrap(), Some("RECHARGE"));

        match &rec.outcome {
            Outcome::Accepted {
                provider_refund_id,
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                ..
            } => {
                assert_eq!(provider_refund_id, "RO2110160000000014290");
                assert_eq!(
                    (*refund_fee, *settlement_refund_fee, *coupon_refund_fee),
                    (100, 100, 0)
                );
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(rec.http_status, Some(200));
        let recorded: Value = serde_json::from_str(&rec.request_redacted).unwrap();
        assert_eq!(recorded["sign"], REDACTED);
        assert_eq!(recorded["outRefundNo"], "R2026112100000001");
        let sig = sent.string("sign").unwrap().unwrap();
        assert!(!rec.request_redacted.contains(sig));
        assert!(rec.latency > std::time::Duration::ZERO);
    }

    #[tokio::test]
    async fn refund_against_a_5xx_is_maybe_delivered_with_the_status_recorded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_once(listener, "503 Service Unavailable", |_| {
            "busy".to_owned()
        }));
        let c = client(&format!("http://{addr}"), SignType::Rsa2);
        let req = request(None, None);
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 2,
            })
            .await;
        server.await.unwrap();
        assert_eq!(rec.http_status, Some(503));
        assert_eq!(
            rec.outcome,
            Outcome::MaybeDelivered {
                error: "HTTP 503 from provider".into(),
                raw: Some("busy".into()),
            }
        );
    }

    #[tokio::test]
    async fn refund_to_a_refused_connection_is_not_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = client(&format!("http://{addr}"), SignType::Rsa);
        let req = request(None, None);
        let rec = c
            .refund(RefundCall {
                request: &req,
                attempt: 1,
            })
            .await;
        assert!(
            matches!(rec.outcome, Outcome::NotSent { .. }),
            "{:?}",
            rec.outcome
        );
        assert_eq!(rec.http_status, None);
        assert!(rec.request_redacted.contains(r#""sign":"***""#));
    }
}
