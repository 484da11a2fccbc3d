//! The ShengPay client of one merchant: built from config (keys read and checked), `admit`,
//! and the refund call with its classification into an [`Outcome`] and the redacted record.

use std::fmt;
use std::time::Instant;

use async_trait::async_trait;
use openssl::pkey::{PKey, Private, Public};

use crate::config::{ConfigError, HttpConfig, ShengpayMerchant, SignType};
use crate::job::{ProviderKind, RefundRequest, Rejection};
use crate::provider::codes::CodeTable;
use crate::provider::http::{self, TransportError};
use crate::provider::keys;
use crate::provider::{AttemptRecord, Outcome, Provider, RefundCall};

use super::*;

/// ShengPay client for one merchant account.
pub struct ShengpayClient {
    merchant: String,
    app_id: String,
    mch_id: String,
    notify_url: String,
    sign_type: SignType,
    idempotent: bool,
    url: String,
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
            url: format!("{}{REFUND_PATH}", merchant.base_url.trim_end_matches('/')),
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

    /// Classifies a response to a refund of `request` (what [`Provider::refund`] does after
    /// the HTTP exchange).
    pub fn classify(&self, request: &RefundRequest, status: u16, body: &[u8]) -> Outcome {
        let expected = Expected {
            refund_no: &request.refund_no,
            order_no: &request.order_no,
            refund_fee: request.refund_fee,
            total_fee: request.total_fee,
            mch_id: &self.mch_id,
            app_id: &self.app_id,
        };
        let judge = Judge {
            platform_key: &self.platform_key,
            sign_type: self.sign_type,
            codes: &self.codes,
        };
        classify_response(status, body, &expected, &judge)
    }

    /// Verifies a notify callback body with ShengPay's key and returns its fields.
    pub fn verify_notify(&self, body: &[u8]) -> Result<ResponseFields, VerifyError> {
        verify_body(body, &self.platform_key, self.sign_type)
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
        let builder = self
            .http
            .post(&self.url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .body(body);
        let (outcome, http_status) = match http::send(builder, self.max_response_bytes).await {
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
