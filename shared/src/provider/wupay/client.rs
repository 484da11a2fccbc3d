//! The WuPay client of one merchant account: configuration checks at start, the [`Provider`]
//! implementation and the HTTP exchange.
//!
//! It wires the other parts together (admit, encode, send, classify, scrub), so that what one
//! refund attempt sends, records and logs can be read in one place.
//!
//! [`Provider`]: crate::provider::Provider

use std::time::Instant;

use async_trait::async_trait;

use super::admit::{self, is_form_binding, request_validation_trigger};
use super::redact::REDACTED;
use super::request::{EncodedRequest, check_value, encode_request, params_with_rfkey};
use crate::config::{ConfigError, HttpConfig, Secret, WupayBinding, WupayMerchant};
use crate::job::{ProviderKind, RefundRequest, Rejection};
use crate::provider::http::{self, TransportError};
use crate::provider::{AttemptRecord, Outcome, Provider, RefundCall};

/// The WuPay client for one merchant account.
///
/// WuPay returns no refund id of its own, so an accepted refund's `provider_refund_id` is our
/// `refund_no` (sent as `refund_id`), and the settlement amount is the requested `refund_fee`
/// (WuPay reports no coupons).
pub struct WupayClient {
    // Visible to the sibling modules because the classifying (`classify`) and scrubbing
    // (`redact`) methods of this type live there, next to the rules they apply.
    pub(super) merchant: WupayMerchant,
    pub(super) rfkey: Secret,
    pub(super) client: reqwest::Client,
    pub(super) max_response_bytes: usize,
}

impl std::fmt::Debug for WupayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WupayClient")
            .field("merchant", &self.merchant.merchant)
            .field("base_url", &self.merchant.base_url)
            .field("binding", &self.merchant.binding)
            .field("rfkey", &self.rfkey)
            .finish_non_exhaustive()
    }
}

impl WupayClient {
    /// Builds the client for a configured merchant, reading its rfkey file. `key_prefix` is the
    /// merchant's config key (e.g. `wupay.merchants[0]`), so errors name the key at fault.
    pub fn new(
        merchant: &WupayMerchant,
        key_prefix: &str,
        client: reqwest::Client,
        http: &HttpConfig,
    ) -> Result<Self, ConfigError> {
        let rfkey = Secret::read_file(&format!("{key_prefix}.rfkey_file"), &merchant.rfkey_file)?;
        Self::with_rfkey(merchant, key_prefix, rfkey, client, http)
    }

    /// Builds the client with an rfkey already in hand (tools, tests). Refuses, at start, the
    /// configured values that could never be sent.
    pub fn with_rfkey(
        merchant: &WupayMerchant,
        key_prefix: &str,
        rfkey: Secret,
        client: reqwest::Client,
        http: &HttpConfig,
    ) -> Result<Self, ConfigError> {
        let key = |k: &str| format!("{key_prefix}.{k}");
        if reqwest::Url::parse(&merchant.base_url).is_err() {
            return Err(ConfigError::invalid(
                key("base_url"),
                format!("{:?} is not a URL", merchant.base_url),
            ));
        }
        for (k, v) in [("cpn_id", &merchant.cpn_id), ("area", &merchant.area)] {
            check_value(k, v).map_err(|e| ConfigError::invalid(key(k), e.to_string()))?;
        }
        if rfkey.expose().is_empty() {
            return Err(ConfigError::invalid(
                key("rfkey_file"),
                "the rfkey file is empty",
            ));
        }
        check_value("rfkey", rfkey.expose())
            .map_err(|e| ConfigError::invalid(key("rfkey_file"), e.to_string()))?;
        if is_form_binding(merchant.binding) {
            // These go in every request: one that request validation refuses would make every
            // refund of the merchant a 500.
            let refused = |what: &str| {
                format!(
                    "{what} ASP.NET request validation refuses on the {} binding (`<` before a letter, `!`, `/` or `?`, or `&#`); use a SOAP binding",
                    merchant.binding.as_str()
                )
            };
            for (k, v) in [("cpn_id", &merchant.cpn_id), ("area", &merchant.area)] {
                if let Some(at) = request_validation_trigger(v) {
                    return Err(ConfigError::invalid(
                        key(k),
                        refused(&format!("contains {at:?}, which")),
                    ));
                }
            }
            if request_validation_trigger(rfkey.expose()).is_some() {
                return Err(ConfigError::invalid(
                    key("rfkey_file"),
                    refused("the rfkey holds characters"),
                ));
            }
        }
        Ok(Self {
            merchant: merchant.clone(),
            rfkey,
            client,
            max_response_bytes: http.max_response_bytes,
        })
    }

    /// The binding this merchant is called with.
    pub fn binding(&self) -> WupayBinding {
        self.merchant.binding
    }

    fn build(&self, req: &EncodedRequest) -> reqwest::RequestBuilder {
        let mut builder = match req.method {
            "GET" => self.client.get(&req.url),
            _ => self.client.post(&req.url),
        };
        if let Some(ct) = req.content_type {
            builder = builder.header(reqwest::header::CONTENT_TYPE, ct);
        }
        if let Some(action) = &req.soap_action {
            builder = builder.header("SOAPAction", action.as_str());
        }
        if let Some(body) = &req.body {
            builder = builder.body(body.clone());
        }
        builder
    }
}

#[async_trait]
impl Provider for WupayClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Wupay
    }

    fn merchant(&self) -> &str {
        &self.merchant.merchant
    }

    fn idempotent(&self) -> bool {
        self.merchant.idempotent
    }

    /// Refuses what WuPay's ASP.NET stack would refuse before running `Refund` (see the `admit`
    /// module): sent, such a request would come back as a 500 that cannot be told from a
    /// failure after paying.
    fn admit(&self, request: &RefundRequest) -> Result<(), Rejection> {
        admit::admit_request(self.merchant.binding, request)
    }

    async fn refund(&self, call: RefundCall<'_>) -> AttemptRecord {
        let started = Instant::now();
        let m = &self.merchant;
        // Intake should have refused these already; a job stored before that check must still
        // never reach a stack that refuses it.
        let encoded = self
            .admit(call.request)
            .map_err(|r| format!("`{}` {}; not sent", r.field, r.reason))
            .and_then(|()| {
                params_with_rfkey(call.request, m, self.rfkey.expose())
                    .and_then(|p| encode_request(&m.base_url, m.binding, &p))
                    .map_err(|e| e.to_string())
            });
        // The same parameters with `***` for the rfkey encode to exactly what was sent, minus
        // the secret, because the encoders are deterministic.
        let redacted = params_with_rfkey(call.request, m, REDACTED)
            .and_then(|p| encode_request(&m.base_url, m.binding, &p))
            .map(|r| r.record())
            .unwrap_or_default();
        let (outcome, http_status) = match encoded {
            Err(error) => (Outcome::NotSent { error }, None),
            Ok(req) => match http::send(self.build(&req), self.max_response_bytes).await {
                Ok(reply) => (self.outcome_of(call.request, &reply), Some(reply.status)),
                Err(TransportError::NotSent(error)) => (Outcome::NotSent { error }, None),
                Err(TransportError::MaybeDelivered(error)) => {
                    (Outcome::MaybeDelivered { error, raw: None }, None)
                }
            },
        };
        let outcome = self.scrub_outcome(outcome);
        let latency = started.elapsed();
        tracing::debug!(
            merchant = %m.merchant,
            refund_no = %call.request.refund_no,
            attempt = call.attempt,
            binding = m.binding.as_str(),
            http_status,
            outcome = outcome.class(),
            latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            "wupay refund call"
        );
        AttemptRecord {
            outcome,
            request_redacted: self.scrub(redacted),
            http_status,
            latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;
    use crate::provider::wupay::test_support::*;
    use crate::provider::wupay::*;

    // ---- construction ------------------------------------------------------------------

    #[test]
    fn new_reads_and_trims_the_rfkey_file_and_names_the_key_when_it_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rfkey");
        std::fs::write(&path, format!("  {RFKEY}\n")).unwrap();
        let mut m = merchant(WupayBinding::Soap11, "http://h/WuPay.asmx");
        m.rfkey_file = path;
        m.idempotent = true;
        let cfg = http_config();
        let http = http::build_client(&cfg).unwrap();
        let c = WupayClient::new(&m, "wupay.merchants[3]", http.clone(), &cfg).unwrap();
        assert_eq!(c.rfkey.expose(), RFKEY);
        assert!(c.idempotent());
        assert_eq!(c.kind(), ProviderKind::Wupay);
        assert_eq!(Provider::merchant(&c), "wu-1");
        assert!(!format!("{c:?}").contains("S3cr3t"));

        m.rfkey_file = dir.path().join("missing");
        let e = WupayClient::new(&m, "wupay.merchants[3]", http, &cfg).unwrap_err();
        assert!(
            e.to_string().contains("wupay.merchants[3].rfkey_file"),
            "{e}"
        );
    }

    #[test]
    fn configured_values_that_could_never_be_sent_are_refused_at_start() {
        let cfg = http_config();
        let http = http::build_client(&cfg).unwrap();
        let mut m = merchant(WupayBinding::Soap11, "http://h/WuPay.asmx");
        m.area = "east\n".into();
        let e = WupayClient::with_rfkey(
            &m,
            "wupay.merchants[0]",
            Secret::new(RFKEY),
            http.clone(),
            &cfg,
        )
        .unwrap_err();
        assert!(e.to_string().contains("wupay.merchants[0].area"), "{e}");
        let m = merchant(WupayBinding::Soap11, "http://h/WuPay.asmx");
        let e = WupayClient::with_rfkey(
            &m,
            "wupay.merchants[0]",
            Secret::new("k\tey"),
            http.clone(),
            &cfg,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("rfkey_file") && !e.to_string().contains("k\tey"),
            "{e}"
        );
        let e = WupayClient::with_rfkey(&m, "wupay.merchants[0]", Secret::new(""), http, &cfg)
            .unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[tokio::test]
    async fn soap11_refund_posts_the_envelope_with_its_soap_action() {
        let (base, server) = serve_once(
            200,
            "text/xml; charset=utf-8",
            soap_response(SoapVersion::Soap11, "SUCCESS").unwrap(),
        )
        .await;
        let m = merchant(WupayBinding::Soap11, &base);
        let r = request();
        let record = client_for(&m).refund(call(&r)).await;
        let got = server.await.unwrap();
        assert_eq!(got.method, "POST");
        assert_eq!(got.target, "/WuPay.asmx");
        assert_eq!(got.header("content-type"), Some("text/xml; charset=utf-8"));
        assert_eq!(
            got.header("soapaction"),
            Some("\"http://tempuri.org/Refund\"")
        );
        let sent = parse_refund_request(&got.body, MAX).unwrap();
        let expected = refund_params(&r, &m, &Secret::new(RFKEY)).unwrap();
        assert_eq!(
            sent,
            expected
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.clone()))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            got.body,
            soap_envelope(SoapVersion::Soap11, &expected).unwrap()
        );
        assert_eq!(record.outcome.class(), "accepted");
        assert_eq!(record.http_status, Some(200));
        assert_no_rfkey(&record.request_redacted);
        assert!(
            record.request_redacted.contains("<rfkey>***</rfkey>"),
            "{}",
            record.request_redacted
        );
        // Apart from the rfkey, the record is exactly what was sent.
        let sent_text = String::from_utf8(got.body).unwrap();
        let escaped = quick_xml::escape::escape(RFKEY);
        assert_eq!(
            record.request_redacted,
            sent_text.replace(escaped.as_ref(), "***")
        );
    }

    #[tokio::test]
    async fn soap12_refund_posts_the_envelope_with_the_action_in_its_content_type() {
        let (base, server) = serve_once(
            200,
            "application/soap+xml; charset=utf-8",
            soap_response(SoapVersion::Soap12, "FAIL:NOTENOUGH:balance too low").unwrap(),
        )
        .await;
        let m = merchant(WupayBinding::Soap12, &base);
        let r = request();
        let record = client_for(&m).refund(call(&r)).await;
        let got = server.await.unwrap();
        assert_eq!(got.method, "POST");
        assert_eq!(got.target, "/WuPay.asmx");
        assert_eq!(
            got.header("content-type"),
            Some("application/soap+xml; charset=utf-8; action=\"http://tempuri.org/Refund\"")
        );
        assert_eq!(got.header("soapaction"), None);
        let expected = refund_params(&r, &m, &Secret::new(RFKEY)).unwrap();
        assert_eq!(
            got.body,
            soap_envelope(SoapVersion::Soap12, &expected).unwrap()
        );
        assert!(matches!(
            record.outcome,
            Outcome::Declined { ref code, ref message, .. } if code == "NOTENOUGH" && message == "balance too low"
        ));
        assert_no_rfkey(&record.request_redacted);
    }

    #[tokio::test]
    async fn http_post_refund_sends_the_form_to_the_refund_path() {
        let (base, server) = serve_once(
            200,
            "text/xml; charset=utf-8",
            string_response("SUCCESS").unwrap(),
        )
        .await;
        let m = merchant(WupayBinding::HttpPost, &base);
        let r = request();
        let record = client_for(&m).refund(call(&r)).await;
        let got = server.await.unwrap();
        assert_eq!(got.method, "POST");
        assert_eq!(got.target, "/WuPay.asmx/Refund");
        assert_eq!(
            got.header("content-type"),
            Some("application/x-www-form-urlencoded; charset=utf-8")
        );
        let expected = refund_params(&r, &m, &Secret::new(RFKEY)).unwrap();
        let body = String::from_utf8(got.body).unwrap();
        assert_eq!(body, form_body(&expected).unwrap());
        assert!(body.starts_with("refund_id=R2026112100000001&order_id=O2026112100000001&pay_nd=P0001&money=1000&refund_fee=100&"), "{body}");
        assert!(
            body.ends_with("&cpnId=CPN9&area=%E5%8D%8E%E4%B8%9C"),
            "{body}"
        );
        assert_eq!(record.outcome.class(), "accepted");
        assert_no_rfkey(&record.request_redacted);
        assert!(
            record.request_redacted.contains("&rfkey=***&"),
            "{}",
            record.request_redacted
        );
    }

    #[tokio::test]
    async fn http_get_refund_sends_the_query_to_the_refund_path() {
        let (base, server) = serve_once(
            200,
            "text/xml; charset=utf-8",
            string_response("SUCCESS").unwrap(),
        )
        .await;
        let m = merchant(WupayBinding::HttpGet, &base);
        let r = request();
        let record = client_for(&m).refund(call(&r)).await;
        let got = server.await.unwrap();
        assert_eq!(got.method, "GET");
        let expected = refund_params(&r, &m, &Secret::new(RFKEY)).unwrap();
        assert_eq!(
            got.target,
            format!("/WuPay.asmx/Refund?{}", query_string(&expected).unwrap())
        );
        assert!(got.body.is_empty());
        assert_eq!(record.outcome.class(), "accepted");
        assert_no_rfkey(&record.request_redacted);
        assert!(
            record
                .request_redacted
                .starts_with(&format!("{base}/Refund?refund_id="))
        );
        assert!(
            record.request_redacted.contains("&rfkey=***&"),
            "{}",
            record.request_redacted
        );
    }

    #[tokio::test]
    async fn a_fault_with_http_500_is_classified_by_the_fault() {
        let (base, server) = serve_once(
            500,
            "text/xml; charset=utf-8",
            fixture("soap11_fault_client.xml"),
        )
        .await;
        let m = merchant(WupayBinding::Soap11, &base);
        let r = request();
        let record = client_for(&m).refund(call(&r)).await;
        server.await.unwrap();
        assert_eq!(record.http_status, Some(500));
        assert!(
            matches!(record.outcome, Outcome::RequestRejected { ref code, .. } if code == "Client")
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_not_sent_and_its_error_hides_the_rfkey() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        for binding in [
            WupayBinding::Soap11,
            WupayBinding::Soap12,
            WupayBinding::HttpPost,
            WupayBinding::HttpGet,
        ] {
            let m = merchant(binding, &format!("http://{addr}/WuPay.asmx"));
            let r = request();
            let record = client_for(&m).refund(call(&r)).await;
            match &record.outcome {
                Outcome::NotSent { error } => assert_no_rfkey(error),
                other => panic!("{binding:?}: {other:?}"),
            }
            assert_eq!(record.http_status, None);
            assert_no_rfkey(&record.request_redacted);
        }
    }

    #[tokio::test]
    async fn a_value_with_a_control_character_is_not_sent_at_all() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let m = merchant(
            WupayBinding::Soap11,
            &format!("http://{}/WuPay.asmx", listener.local_addr().unwrap()),
        );
        let mut r = request();
        if let Some(w) = r.wupay.as_mut() {
            w.rec_man = "op\t7".into();
        }
        let record = client_for(&m).refund(call(&r)).await;
        match &record.outcome {
            Outcome::NotSent { error } => assert!(error.contains("`rec_man`"), "{error}"),
            other => panic!("{other:?}"),
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), listener.accept())
                .await
                .is_err(),
            "nothing may reach the provider"
        );
    }

    #[tokio::test]
    async fn a_reply_over_the_size_cap_is_maybe_delivered() {
        let big = format!(
            r#"<string xmlns="http://tempuri.org/">{}</string>"#,
            "x".repeat(300 * 1024)
        );
        let (base, server) = serve_once(200, "text/xml", big.into_bytes()).await;
        let m = merchant(WupayBinding::HttpGet, &base);
        let r = request();
        let record = client_for(&m).refund(call(&r)).await;
        server.await.unwrap();
        assert_eq!(record.outcome.class(), "maybe_delivered");
    }

    #[tokio::test]
    async fn the_http_post_form_is_sent_declaring_utf8() {
        let (base, server) = serve_once(
            200,
            "text/xml; charset=utf-8",
            string_response("SUCCESS").unwrap(),
        )
        .await;
        let m = merchant(WupayBinding::HttpPost, &base);
        let r = request();
        let record = client_for(&m).refund(call(&r)).await;
        let got = server.await.unwrap();
        assert_eq!(
            got.header("content-type"),
            Some("application/x-www-form-urlencoded; charset=utf-8")
        );
        // The charset is what the bytes are: `华东` percent-encoded as UTF-8.
        assert!(
            String::from_utf8(got.body)
                .unwrap()
                .ends_with("&area=%E5%8D%8E%E4%B8%9C"),
        );
        assert_eq!(record.outcome.class(), "accepted");
    }
}
