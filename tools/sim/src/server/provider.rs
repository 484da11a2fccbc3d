//! Provider calls: what a request is (provider, operation, binding, merchant, refund and order
//! numbers) as far as fault rules need it, the fault applied, and the provider module's answer.
//! Refund calls are logged in the call log, ShengPay status queries in the query log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap};
use hyper::{Request, StatusCode};
use tracing::debug;

use crate::calls::{CallRecord, Outcome};
use crate::faults::{CallKey, FaultAction, Fired, Operation};
use crate::limits::FREQUENCY_LIMITED;
use crate::shengpay::Which;
use crate::wupay::{self, Binding, WuParams};
use crate::{Provider, shengpay};

use super::*;

fn media_type(headers: &HeaderMap) -> (String, String) {
    let value = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (media, params) = value.split_once(';').unwrap_or((value, ""));
    (media.trim().to_ascii_lowercase(), params.to_owned())
}

pub(super) fn soap_version(headers: &HeaderMap) -> Option<Binding> {
    match media_type(headers).0.as_str() {
        "text/xml" => Some(Binding::Soap11),
        "application/soap+xml" => Some(Binding::Soap12),
        _ => None,
    }
}

/// Checks the SOAP action (1.1: the `SOAPAction` header, required; 1.2: the optional `action`
/// media-type parameter), as ASP.NET dispatches on it.
fn check_soap_action(headers: &HeaderMap, binding: Binding) -> Result<(), String> {
    let unquote = |s: &str| s.trim().trim_matches('"').to_owned();
    let action = match binding {
        Binding::Soap11 => Some(
            headers
                .get("soapaction")
                .and_then(|v| v.to_str().ok())
                .map(unquote)
                .unwrap_or_default(),
        ),
        _ => media_type(headers).1.split(';').find_map(|param| {
            let (key, value) = param.split_once('=')?;
            (key.trim().eq_ignore_ascii_case("action")).then(|| unquote(value))
        }),
    };
    match action {
        Some(action) if action != wupay::SOAP_ACTION => Err(format!(
            "Server did not recognize the value of HTTP Header SOAPAction: {}.",
            action
                .chars()
                .filter(|c| !c.is_control())
                .take(100)
                .collect::<String>()
        )),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy)]
pub(super) enum Route {
    ShengPay,
    ShengPayQuery,
    WuPay { merchant: usize, binding: Binding },
}

enum Parsed {
    ShengPay {
        request: Result<shengpay::SpRequest, String>,
        merchant: Option<usize>,
        query: bool,
    },
    WuPay {
        merchant: usize,
        binding: Binding,
        params: Result<WuParams, String>,
    },
}

impl Parsed {
    fn provider(&self) -> Provider {
        match self {
            Parsed::ShengPay { .. } => Provider::ShengPay,
            Parsed::WuPay { .. } => Provider::WuPay,
        }
    }

    fn operation(&self) -> Operation {
        match self {
            Parsed::ShengPay { query: true, .. } => Operation::Query,
            _ => Operation::Refund,
        }
    }

    fn binding(&self) -> &'static str {
        match self {
            Parsed::ShengPay { .. } => "json",
            Parsed::WuPay { binding, .. } => binding.as_str(),
        }
    }

    /// The merchant's index in its provider's account list, if the request named a known one.
    fn merchant_index(&self) -> Option<usize> {
        match self {
            Parsed::ShengPay { merchant, .. } => *merchant,
            Parsed::WuPay { merchant, .. } => Some(*merchant),
        }
    }

    /// (merchant, refund number, order number) as far as the request tells them.
    fn identity<'a>(
        &'a self,
        state: &'a SimState,
    ) -> (Option<&'a str>, Option<&'a str>, Option<&'a str>) {
        match self {
            Parsed::ShengPay {
                request, merchant, ..
            } => {
                let merchant = merchant
                    .and_then(|i| state.settings.shengpay.get(i))
                    .map(|m| m.name.as_str());
                match request {
                    Ok(r) => (merchant, r.text("outRefundNo"), r.text("outTradeNo")),
                    Err(_) => (merchant, None, None),
                }
            }
            Parsed::WuPay {
                merchant, params, ..
            } => {
                let merchant = state.settings.wupay.get(*merchant).map(|m| m.name.as_str());
                match params {
                    Ok(p) => (merchant, p.get("refund_id"), p.get("order_id")),
                    Err(_) => (merchant, None, None),
                }
            }
        }
    }
}

pub(super) async fn provider_call(
    state: Arc<SimState>,
    reset_flag: Arc<AtomicBool>,
    req: Request<Incoming>,
    route: Route,
) -> Result<HttpResponse, Abort> {
    let arrived = state.clock.now();
    let (parts, body) = req.into_parts();
    let body = match route {
        Route::WuPay {
            binding: Binding::HttpGet,
            ..
        } => Bytes::from(parts.uri.query().unwrap_or("").to_owned()),
        _ => match read_body(body, state.settings.max_body_bytes).await? {
            Ok(body) => body,
            Err(too_large) => return Ok(too_large),
        },
    };
    let parsed = match route {
        Route::ShengPay | Route::ShengPayQuery => {
            let request = shengpay::parse(&body);
            let merchant = request
                .as_ref()
                .ok()
                .and_then(|r| shengpay::find_merchant(&state, r));
            Parsed::ShengPay {
                request,
                merchant,
                query: matches!(route, Route::ShengPayQuery),
            }
        }
        Route::WuPay { merchant, binding } => {
            let params = match binding {
                Binding::HttpGet => wupay::parse_form(&body),
                Binding::HttpPost => {
                    let media = media_type(&parts.headers).0;
                    if media.is_empty() || media == "application/x-www-form-urlencoded" {
                        wupay::parse_form(&body)
                    } else {
                        Err(format!(
                            "System.InvalidOperationException: Request format is invalid: {}.",
                            media
                                .chars()
                                .filter(|c| !c.is_control())
                                .take(100)
                                .collect::<String>()
                        ))
                    }
                }
                Binding::Soap11 | Binding::Soap12 => check_soap_action(&parts.headers, binding)
                    .and_then(|()| wupay::parse_soap(&body, binding)),
            };
            Parsed::WuPay {
                merchant,
                binding,
                params,
            }
        }
    };

    let (merchant, refund_no, order_no) = parsed.identity(&state);
    let operation = parsed.operation();
    let throttled = !lock(&state.limiter).admit(
        parsed.provider(),
        parsed.merchant_index(),
        std::time::Instant::now(),
    );
    lock(&state.rates).record(
        parsed.provider(),
        parsed.merchant_index(),
        operation,
        arrived.timestamp(),
        throttled,
    );
    let key = CallKey {
        operation,
        provider: parsed.provider(),
        merchant,
        refund_no,
        order_no,
    };
    // A throttled request never reaches the rules: the provider's front door refused it, so
    // no rule fires for it nor counts it towards `times`.
    let (fired, ends) = if throttled {
        (None, None)
    } else {
        let mut faults = lock(&state.faults);
        let fired = faults.select(&key);
        // How the refund ends is matched on its own (see `faults`); only a refund call has one.
        let ends = (operation == Operation::Refund)
            .then(|| faults.select_end(&key))
            .flatten();
        (fired, ends)
    };
    let mut record = CallRecord {
        seq: 0,
        at: arrived,
        provider: key.provider,
        merchant: merchant.map(str::to_owned),
        binding: parsed.binding(),
        refund_no: refund_no.map(str::to_owned),
        order_no: order_no.map(str::to_owned),
        outcome: Outcome::None,
        code: None,
        fault: fired.as_ref().and_then(|f| f.action),
        rule: fired.as_ref().map(|f| f.index),
        latency_ms: state.settings.latency_ms + fired.as_ref().map_or(0, |f| f.latency_ms),
    };
    if record.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(record.latency_ms)).await;
    }
    debug!(
        provider = %record.provider,
        merchant = ?record.merchant,
        refund_no = ?record.refund_no,
        fault = ?record.fault,
        "provider call"
    );

    match record.fault {
        Some(FaultAction::Http500) => {
            log(&state, operation, record, None);
            return Ok(respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "Internal Server Error",
            ));
        }
        Some(FaultAction::BinaryBody) => {
            log(&state, operation, record, None);
            return Ok(respond(
                StatusCode::BAD_GATEWAY,
                "application/octet-stream",
                &b"\x00\xff\xfe\x00\xc3(gateway\x00\x80"[..],
            ));
        }
        Some(FaultAction::Reset) => {
            log(&state, operation, record, None);
            reset_flag.store(true, Ordering::Relaxed);
            return Err(Abort("reset fault"));
        }
        Some(FaultAction::Hang) => {
            log(&state, operation, record, None);
            // Hold the request until the client gives up; past hang_max, close unanswered so
            // abandoned hangs cannot pile up.
            tokio::time::sleep(state.settings.hang_max).await;
            return Err(Abort("hang fault"));
        }
        _ => {}
    }
    if throttled && matches!(parsed, Parsed::WuPay { .. }) {
        // WuPay's gateway throttles before the service: a bare 429, no SOAP.
        record.outcome = Outcome::RetryLater;
        record.code = Some("HTTP_429".into());
        log(&state, operation, record, Some("retry_later".into()));
        return Ok(respond(
            StatusCode::TOO_MANY_REQUESTS,
            "text/plain; charset=utf-8",
            "Too Many Requests",
        ));
    }
    // ShengPay throttles with a signed business answer: the provider module serves it as a
    // retry-later with its code.
    let fired = if throttled {
        Some(Fired {
            index: usize::MAX,
            latency_ms: 0,
            action: Some(FaultAction::RetryLater),
            code: Some(FREQUENCY_LIMITED.into()),
            message: None,
        })
    } else {
        fired
    };

    let reply = match parsed {
        Parsed::ShengPay {
            request,
            merchant,
            query,
        } => {
            // Signing is CPU work (slow in debug builds): keep it off the async workers.
            let worker_state = Arc::clone(&state);
            let fired_for_worker = fired.clone();
            tokio::task::spawn_blocking(move || {
                let fired = fired_for_worker.as_ref();
                if query {
                    shengpay::process_query(&worker_state, &request, merchant, fired)
                } else {
                    shengpay::process(&worker_state, &request, merchant, fired, ends)
                }
            })
            .await
            .map_err(|_| Abort("provider handler failed"))?
        }
        Parsed::WuPay {
            merchant,
            binding,
            params,
        } => wupay::process(&state, merchant, binding, &params, fired.as_ref()),
    };
    record.outcome = reply.outcome;
    record.code = reply.code.clone();
    let drop_response = record.fault == Some(FaultAction::DropResponse);
    log(&state, operation, record, reply.detail.clone());
    if let Some(key) = reply.accepted.clone()
        && state.settings.processing.is_zero()
    {
        // processing_ms = 0: the refund ends as its answer goes out, so a client that has
        // the answer finds it paid (the ticker would also end it, a moment later).
        shengpay::end_refunds(&state, Which::One(key));
    }
    if drop_response {
        return Err(Abort("drop_response fault"));
    }
    Ok(respond(reply.status, reply.content_type, reply.body))
}

/// Logs a refund call in the call log, a status query in the query log. `detail` is what the
/// query answered, when the provider module got to answer it.
fn log(state: &SimState, operation: Operation, record: CallRecord, detail: Option<String>) {
    if operation != Operation::Query {
        lock(&state.calls).push(record);
        return;
    }
    let transport = matches!(
        record.fault,
        Some(
            FaultAction::Http500 | FaultAction::BinaryBody | FaultAction::Reset | FaultAction::Hang
        )
    );
    let answered = match (transport, record.fault, detail) {
        (true, Some(fault), _) => fault.as_str().to_owned(),
        (_, _, Some(detail)) => detail,
        _ => "rejected".to_owned(),
    };
    lock(&state.queries).push(QueryRecord {
        seq: 0,
        at: record.at,
        merchant: record.merchant,
        refund_no: record.refund_no,
        answered,
        code: record.code,
        fault: record.fault,
        rule: record.rule,
    });
}
