//! The notify listener: `POST /notify/shengpay` on `[notify] addr`, where ShengPay reports how
//! an accepted refund ended (DESIGN §5).
//!
//! Its own port, never the metrics port: this is the one port open to the outside, so it
//! serves this route and nothing else. A notify is answered `200 SUCCESS` only after it was
//! verified, shown to name one of our refunds with its amounts, stored as it came and applied,
//! all in one committed transaction; anything else gets a non-2xx answer, and ShengPay sends it
//! again. Notifies repeat and come out of order: applying one only ever moves a job towards a
//! more final state (`store::jobs::apply_status`), so a duplicate is stored and changes
//! nothing.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use shared::job::{ProviderKind, RefundRequest};
use shared::provider::shengpay::ResponseFields;
use shared::provider::status::NotifyRefusal;
use shared::store::jobs::{self, Effect, Source};
use shared::store::text::sha256_hex;

use crate::app::Ctx;

/// Who may be named by a notify: each ShengPay account (`mchId`, `appId`) and its merchant.
struct Listener {
    ctx: Arc<Ctx>,
    accounts: HashMap<(String, String), String>,
}

/// Starts the listener on `[notify] addr`; `None` when it is turned off (empty address).
pub async fn serve(ctx: Arc<Ctx>) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let addr = ctx.config.notify.addr.clone();
    if addr.is_empty() {
        return Ok(None);
    }
    let accounts = ctx
        .registry
        .merchants()
        .filter_map(|(kind, merchant)| {
            let client = ctx.registry.get(kind, merchant)?;
            let (mch, app) = client.notify_account()?;
            Some(((mch.to_owned(), app.to_owned()), merchant.to_owned()))
        })
        .collect();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding notify.addr {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "notify listener started");
    let limit = ctx.config.notify.max_body_bytes;
    let shutdown = ctx.shutdown.clone();
    let state = Arc::new(Listener { ctx, accounts });
    let app = Router::new()
        .route("/notify/shengpay", post(shengpay))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state);
    Ok(Some(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "notify listener stopped");
        }
    })))
}

/// A refused notify: the status, and a short reason in the body (ShengPay logs it).
fn refuse(status: StatusCode, outcome: &'static str, why: impl std::fmt::Display) -> Response {
    metrics::counter!(crate::metrics::NOTIFIES, "outcome" => outcome).increment(1);
    tracing::warn!(outcome, reason = %why, "notify refused");
    (status, format!("FAIL: {why}")).into_response()
}

async fn shengpay(State(l): State<Arc<Listener>>, body: Bytes) -> Response {
    match handle(&l, &body).await {
        Ok(effect) => {
            metrics::counter!(crate::metrics::NOTIFIES, "outcome" => effect.as_str()).increment(1);
            (StatusCode::OK, "SUCCESS").into_response()
        }
        Err(r) => r,
    }
}

/// Verifies, checks, stores and applies one notify; the response to give when it may not be
/// acknowledged.
async fn handle(l: &Listener, body: &[u8]) -> Result<Effect, Response> {
    // Which account and refund it claims to be about: read before verifying, only to find the
    // key and the job; nothing is believed until the signature and the job agree.
    let fields = ResponseFields::parse(body)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, "unreadable", e))?;
    let text = |name: &str| fields.string(name).ok().flatten().map(str::to_owned);
    let (Some(mch_id), Some(app_id), Some(refund_no)) =
        (text("mchId"), text("appId"), text("outRefundNo"))
    else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "unreadable",
            "mchId, appId and outRefundNo are required",
        ));
    };
    let Some(merchant) = l.accounts.get(&(mch_id, app_id)) else {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "unknown_merchant",
            "no configured ShengPay account has this mchId and appId",
        ));
    };
    let Some(client) = l.ctx.registry.get(ProviderKind::Shengpay, merchant) else {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "unknown_merchant",
            "merchant not configured",
        ));
    };
    let ctx = &l.ctx;
    let internal = |e: &dyn std::fmt::Display| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_committed",
            e.to_string(),
        )
    };
    let mut tx = ctx.pool.begin().await.map_err(|e| internal(&e))?;
    let request = job_request(&mut tx, &refund_no, merchant)
        .await
        .map_err(|e| internal(&e))?;
    let Some((request, created_at)) = request else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "unknown_refund",
            "no ShengPay refund of this merchant has this outRefundNo",
        ));
    };
    let report = client.read_notify(body, &request).map_err(|e| match e {
        NotifyRefusal::Unverified(_) => refuse(StatusCode::UNAUTHORIZED, "unverified", e),
        NotifyRefusal::NotOurs(_) | NotifyRefusal::Unsupported => {
            refuse(StatusCode::UNPROCESSABLE_ENTITY, "not_ours", e)
        }
    })?;
    let effect = jobs::apply_status(
        &mut tx,
        &report,
        Source::Notify,
        ctx.config.worker.query.due_after(0),
        &ctx.actor,
        ctx.tz,
    )
    .await
    .map_err(|e| internal(&e))?;
    store_notify(&mut tx, merchant, &report, body, &effect)
        .await
        .map_err(|e| internal(&e))?;
    tx.commit().await.map_err(|e| internal(&e))?;
    shared::failpoint::hit("notify_committed");
    if let Effect::Applied { from, to } = &effect {
        crate::metrics::transition(from.as_str(), to.as_str());
        crate::metrics::ended(
            request.provider,
            crate::metrics::published_at(&request, created_at),
            *to,
        );
    }
    tracing::info!(
        refund_no = %report.refund_no,
        status = report.status.as_str(),
        effect = effect.as_str(),
        "notify applied"
    );
    Ok(effect)
}

/// The request of `merchant`'s ShengPay job `refund_no` and when it was taken in, locked for
/// the notify's transaction.
async fn job_request(
    tx: &mut sqlx::PgConnection,
    refund_no: &str,
    merchant: &str,
) -> anyhow::Result<Option<(RefundRequest, chrono::DateTime<chrono::Utc>)>> {
    let row: Option<(serde_json::Value, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT request, created_at FROM jobs
         WHERE refund_no = $1 AND provider = 'shengpay' AND merchant = $2 FOR UPDATE",
    )
    .bind(refund_no)
    .bind(merchant)
    .fetch_optional(&mut *tx)
    .await?;
    row.map(|(v, at)| {
        serde_json::from_value(v)
            .map(|r| (r, at))
            .context("the job's stored request cannot be read")
    })
    .transpose()
}

/// Stores the notify as it came, with what applying it did.
async fn store_notify(
    tx: &mut sqlx::PgConnection,
    merchant: &str,
    report: &shared::provider::status::StatusReport,
    body: &[u8],
    effect: &Effect,
) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(body);
    sqlx::query(
        "INSERT INTO provider_notifications
             (provider, merchant, refund_no, status, body, body_sha256, effect)
         VALUES ('shengpay', $1, $2, $3, $4, $5, $6)",
    )
    .bind(merchant)
    .bind(&report.refund_no)
    .bind(report.status.as_str())
    .bind(shared::store::text::storable(&text).as_ref())
    .bind(sha256_hex(body))
    .bind(effect.as_str())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
