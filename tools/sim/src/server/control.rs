//! The `/_sim/` control API: fault rules, the simulated clock, the paid list, the ShengPay
//! refunds, the call, query and notify logs, the arrival timeline (`/_sim/rates`), finishing
//! refunds and resending notifies, and the provider statement CSV that tests and the
//! reconciler read.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;

use crate::Provider;
use crate::faults::FaultRule;
use crate::ledger::{self};
use crate::shengpay::{self, Which};

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockRequest {
    /// RFC 3339; `null` returns to the real clock.
    now: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifyRequest {
    refund_no: String,
    /// Our merchant name; absent: the first refund of that number.
    #[serde(default)]
    merchant: Option<String>,
}

pub(super) async fn control(
    state: &Arc<SimState>,
    req: Request<Incoming>,
) -> Result<HttpResponse, Abort> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = query_params(req.uri().query());
    let body = match read_body(req.into_body(), state.settings.max_body_bytes.max(1 << 20)).await? {
        Ok(body) => body,
        Err(too_large) => return Ok(too_large),
    };
    let response = match (&method, path.as_str()) {
        (&Method::GET, "/_sim/health") => json(
            StatusCode::OK,
            &serde_json::json!({
                "status": "ok",
                "paid": lock(&state.ledger).paid_count(),
                "calls": lock(&state.calls).summary(None, false).total,
                "processing": lock(&state.refunds).processing(),
                "notifies_pending": state.notifier.pending(),
            }),
        ),
        (&Method::GET, "/_sim/refunds") => json(
            StatusCode::OK,
            &lock(&state.refunds).list(query.get("refund_no").map(String::as_str)),
        ),
        (&Method::GET, "/_sim/queries") => json(
            StatusCode::OK,
            &lock(&state.queries).records(query.get("refund_no").map(String::as_str)),
        ),
        (&Method::GET, "/_sim/notifies") => json(
            StatusCode::OK,
            &state
                .notifier
                .records(query.get("refund_no").map(String::as_str)),
        ),
        (&Method::POST, "/_sim/finish") => {
            let ended = shengpay::end_refunds(state, Which::All);
            json(StatusCode::OK, &serde_json::json!({ "ended": ended }))
        }
        (&Method::POST, "/_sim/notify") => match serde_json::from_slice::<NotifyRequest>(&body) {
            Ok(request) => {
                match shengpay::resend(state, request.merchant.as_deref(), &request.refund_no).await
                {
                    Ok(record) => json(StatusCode::OK, &record),
                    Err(e) => error_json(StatusCode::NOT_FOUND, &e.to_string()),
                }
            }
            Err(e) => error_json(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"refund_no\": \"...\", \"merchant\"?: \"...\"}}: {e}"),
            ),
        },
        (&Method::GET, "/_sim/paid") => json(StatusCode::OK, &lock(&state.ledger).paid()),
        (&Method::GET, "/_sim/calls") => {
            let full = matches!(query.get("full").map(String::as_str), Some("1" | "true"));
            let refund_no = query.get("refund_no").map(String::as_str);
            json(StatusCode::OK, &lock(&state.calls).summary(refund_no, full))
        }
        (&Method::GET, "/_sim/rates") => rates(state, &query),
        (&Method::GET, "/_sim/statement") => statement(state, &query),
        (&Method::POST, "/_sim/reset") => {
            reset(state);
            json(StatusCode::OK, &serde_json::json!({ "status": "reset" }))
        }
        (&Method::GET, "/_sim/rules") => json(StatusCode::OK, &lock(&state.faults).rules()),
        (&Method::POST, "/_sim/rules") => match serde_json::from_slice::<Vec<FaultRule>>(&body) {
            Ok(rules) => match lock(&state.faults).replace(&rules) {
                Ok(()) => json(StatusCode::OK, &rules),
                Err(e) => error_json(StatusCode::BAD_REQUEST, &e),
            },
            Err(e) => error_json(
                StatusCode::BAD_REQUEST,
                &format!("expected a JSON array of rules: {e}"),
            ),
        },
        (&Method::GET, "/_sim/clock") => clock_json(state),
        (&Method::POST, "/_sim/clock") => match serde_json::from_slice::<ClockRequest>(&body) {
            Ok(request) => {
                state.clock.set_now(request.now);
                clock_json(state)
            }
            Err(e) => error_json(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"now\": RFC 3339 or null}}: {e}"),
            ),
        },
        _ => error_json(StatusCode::NOT_FOUND, "unknown control endpoint"),
    };
    Ok(response)
}

fn clock_json(state: &SimState) -> HttpResponse {
    json(
        StatusCode::OK,
        &serde_json::json!({
            "now": state.clock.now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "offset_ms": state.clock.offset_ms(),
        }),
    )
}

/// `GET /_sim/rates[?merchant=NAME][&provider=shengpay|wupay]`: a JSON array of
/// [`crate::RateWindow`] — `{"provider", "merchant", "second" (unix), "calls" (refund calls +
/// status queries), "refunds", "queries"}` — one per merchant and second that saw a request.
fn rates(state: &SimState, query: &HashMap<String, String>) -> HttpResponse {
    let provider = match provider_param(query) {
        Ok(p) => p,
        Err(e) => return error_json(StatusCode::BAD_REQUEST, &e),
    };
    let merchant = query.get("merchant").map(String::as_str);
    json(StatusCode::OK, &rate_windows(state, merchant, provider))
}

/// The optional `provider=shengpay|wupay` parameter; why not when it names no provider.
fn provider_param(query: &HashMap<String, String>) -> Result<Option<Provider>, String> {
    query
        .get("provider")
        .map(|p| p.parse::<Provider>())
        .transpose()
        .map_err(|e| e.to_string())
}

fn statement(state: &SimState, query: &HashMap<String, String>) -> HttpResponse {
    let Some(date) = query
        .get("date")
        .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
    else {
        return error_json(StatusCode::BAD_REQUEST, "date=YYYY-MM-DD is required");
    };
    let provider = match provider_param(query) {
        Ok(p) => p,
        Err(e) => return error_json(StatusCode::BAD_REQUEST, &e),
    };
    let tz = match query.get("tz").map(|t| t.parse::<Tz>()).transpose() {
        Ok(tz) => tz.unwrap_or(state.settings.tz),
        Err(_) => return error_json(StatusCode::BAD_REQUEST, "tz must be an IANA time zone"),
    };
    let rows = lock(&state.ledger).statement(date, tz, provider);
    match ledger::statement_csv(&rows, tz) {
        Ok(csv) => respond(StatusCode::OK, "text/csv; charset=utf-8", csv),
        Err(e) => error_json(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
