//! The WuPay client of one merchant: built from config (secrets read, values checked), the
//! intake check of what its binding can carry (`admit`), and the refund call with its
//! classification into an [`Outcome`] and the redacted attempt record.

use std::time::Instant;

use async_trait::async_trait;

use crate::config::{ConfigError, HttpConfig, Secret, WupayBinding, WupayMerchant};
use crate::job::{ProviderKind, RefundRequest, Rejection};
use crate::provider::http::{self, HttpReply, TransportError};
use crate::provider::{AttemptRecord, Outcome, Provider, RefundCall};

use super::*;

/// The WuPay client for one merchant account.
///
/// WuPay returns no refund id of its own, so an accepted refund's `provider_refund_id` is our
/// `refund_no` (sent as `refund_id`), and the settlement amount is the requested `refund_fee`
/// (WuPay reports no coupons).
pub struct WupayClient {
    merchant: WupayMerchant,
    pub(super) rfkey: Secret,
    client: reqwest::Client,
    max_response_bytes: usize,
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

    /// Classifies a reply that arrived whole, by the table in the module docs: the body first
    /// (a fault by its code whatever the status, a result counts only on a 2xx), then the
    /// status, which can refuse only when the body holds nothing like an answer.
    pub(super) fn outcome_of(&self, request: &RefundRequest, reply: &HttpReply) -> Outcome {
        let status = reply.status;
        let raw = String::from_utf8_lossy(&reply.body).into_owned();
        match parse_response(&reply.body, self.max_response_bytes) {
            Ok(Reply::Fault(f)) => match f.class {
                FaultClass::Sender => Outcome::RequestRejected {
                    code: match &f.subcode {
                        Some(sub) => format!("{}/{sub}", f.code),
                        None => f.code,
                    },
                    message: f.reason,
                    raw,
                },
                FaultClass::Receiver | FaultClass::Other => Outcome::MaybeDelivered {
                    error: format!(
                        "SOAP fault {} (HTTP {status}): {}",
                        self.excerpt(&f.code),
                        self.excerpt(&f.reason)
                    ),
                    raw: Some(raw),
                },
            },
            Ok(Reply::Result(value)) if (200..300).contains(&status) => {
                self.outcome_of_result(request, value, raw)
            }
            Ok(Reply::Result(value)) => Outcome::MaybeDelivered {
                error: format!(
                    "HTTP {status} with a result, so the operation ran: {}",
                    self.excerpt(&value)
                ),
                raw: Some(raw),
            },
            Err(e) => {
                let summary = self.summary(reply, &raw, &e);
                let answer_like = self.resembles_an_answer(&raw);
                match status {
                    429 if !answer_like => Outcome::RetryLater {
                        code: "HTTP_429".into(),
                        message: summary,
                        raw,
                    },
                    s if refused_at_the_door(s) && !answer_like => Outcome::RequestRejected {
                        code: format!("HTTP_{status}"),
                        message: summary,
                        raw,
                    },
                    _ => Outcome::MaybeDelivered {
                        error: summary,
                        raw: Some(raw),
                    },
                }
            }
        }
    }

    /// Whether a body that did not parse as a reply may still be one: a mangled envelope, a
    /// `RefundResult` cut short, a bare result string. Text matching is fine here because it
    /// only ever moves a reply towards "maybe delivered", never away from it.
    fn resembles_an_answer(&self, raw: &str) -> bool {
        const MARKS: [&str; 5] = [
            "RefundResult",
            "RefundResponse",
            TEMPURI_NS,
            SOAP11_NS,
            SOAP12_NS,
        ];
        let m = &self.merchant;
        MARKS.iter().any(|mark| raw.contains(mark))
            || map_result(raw, &m.success_results, &m.failure_prefixes) != ResultClass::Unrecognised
    }

    /// `HTTP <status>: <what the server said>`. A body served as XML (or untyped and looking
    /// like it) that does not parse is reported with the parse error; any other body is quoted
    /// as the server's own text, which is what an operator needs to see.
    fn summary(&self, reply: &HttpReply, raw: &str, error: &ParseError) -> String {
        let status = reply.status;
        if reply.body.is_empty() {
            return format!("HTTP {status}: empty body");
        }
        let xml = match reply.content_type.as_deref() {
            Some(ct) => is_xml_media_type(ct),
            None => raw
                .trim_start_matches('\u{FEFF}')
                .trim_start()
                .starts_with('<'),
        };
        if xml {
            format!("HTTP {status}: {error}; body: {}", self.excerpt(raw))
        } else {
            format!("HTTP {status}: {}", self.excerpt(raw))
        }
    }

    /// Provider text fit to quote in an error: rfkey scrubbed first (so a cut cannot leave
    /// part of it), control characters escaped (one line, nothing a terminal or log reader
    /// interprets), then bounded.
    fn excerpt(&self, text: &str) -> String {
        let scrubbed = self.scrub(text.trim().to_owned());
        let mut escaped = String::with_capacity(scrubbed.len());
        for c in scrubbed.chars() {
            if c.is_control() {
                escaped.extend(c.escape_default());
            } else {
                escaped.push(c);
            }
        }
        quote(&escaped)
    }

    fn outcome_of_result(&self, request: &RefundRequest, value: String, raw: String) -> Outcome {
        let m = &self.merchant;
        match map_result(&value, &m.success_results, &m.failure_prefixes) {
            ResultClass::Success => Outcome::Accepted {
                provider_refund_id: request.refund_no.clone(),
                refund_fee: request.refund_fee,
                settlement_refund_fee: request.refund_fee,
                coupon_refund_fee: 0,
                raw,
            },
            ResultClass::Failure { code, message } => Outcome::Declined { code, message, raw },
            ResultClass::Unrecognised => Outcome::Unrecognised { result: value, raw },
        }
    }

    /// Replaces the rfkey, in every form it could appear in (plain, XML-escaped, URL-encoded),
    /// with `***`.
    fn scrub(&self, s: String) -> String {
        let key = self.rfkey.expose();
        if key.is_empty() {
            return s;
        }
        let mut form = String::new();
        percent_encode_into(&mut form, key, true);
        let mut query = String::new();
        percent_encode_into(&mut query, key, false);
        let escaped = quick_xml::escape::escape(key);
        let mut out = s;
        for form in [key, escaped.as_ref(), form.as_str(), query.as_str()] {
            if out.contains(form) {
                out = out.replace(form, REDACTED);
            }
        }
        out
    }

    fn scrub_outcome(&self, outcome: Outcome) -> Outcome {
        let s = |v: String| self.scrub(v);
        match outcome {
            Outcome::Accepted {
                provider_refund_id,
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                raw,
            } => Outcome::Accepted {
                provider_refund_id,
                refund_fee,
                settlement_refund_fee,
                coupon_refund_fee,
                raw: s(raw),
            },
            Outcome::Declined { code, message, raw } => Outcome::Declined {
                code: s(code),
                message: s(message),
                raw: s(raw),
            },
            Outcome::RetryLater { code, message, raw } => Outcome::RetryLater {
                code: s(code),
                message: s(message),
                raw: s(raw),
            },
            Outcome::RequestRejected { code, message, raw } => Outcome::RequestRejected {
                code: s(code),
                message: s(message),
                raw: s(raw),
            },
            Outcome::NotSent { error } => Outcome::NotSent { error: s(error) },
            Outcome::MaybeDelivered { error, raw } => Outcome::MaybeDelivered {
                error: s(error),
                raw: raw.map(s),
            },
            Outcome::Unrecognised { result, raw } => Outcome::Unrecognised {
                result: s(result),
                raw: s(raw),
            },
        }
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

    /// Refuses what WuPay's ASP.NET stack would refuse before running `Refund` (see the module
    /// docs): sent, such a request would come back as a 500 that cannot be told from a failure
    /// after paying.
    fn admit(&self, request: &RefundRequest) -> Result<(), Rejection> {
        for (field, param, fee) in [
            ("total_fee", "money", request.total_fee),
            ("refund_fee", "refund_fee", request.refund_fee),
        ] {
            if i32::try_from(fee).is_err() {
                return Err(Rejection::new(
                    field,
                    format!(
                        "{fee} fen does not fit WuPay's `{param}`, a 32-bit int in its service (at most {}): its stack would refuse the request before Refund runs",
                        i32::MAX
                    ),
                ));
            }
        }
        let binding = self.merchant.binding;
        if !is_form_binding(binding) {
            return Ok(());
        }
        let Some(w) = &request.wupay else {
            return Err(Rejection::new("wupay", "required when provider is wupay"));
        };
        let fields = [
            ("refund_no", request.refund_no.as_str()),
            ("order_no", request.order_no.as_str()),
            ("wupay.pay_nd", w.pay_nd.as_str()),
            ("wupay.auth_type", w.auth_type.as_str()),
            ("wupay.rec_organ", w.rec_organ.as_str()),
            ("wupay.rec_device", w.rec_device.as_str()),
            ("wupay.rec_man", w.rec_man.as_str()),
            ("reason", request.reason.as_deref().unwrap_or_default()),
        ];
        for (field, value) in fields {
            if let Some(at) = request_validation_trigger(value) {
                return Err(Rejection::new(
                    field,
                    format!(
                        "contains {at:?}, which ASP.NET request validation on WuPay's {} binding refuses (HTTP 500, HttpRequestValidationException) before Refund runs; only the SOAP bindings carry it",
                        binding.as_str()
                    ),
                ));
            }
        }
        Ok(())
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
