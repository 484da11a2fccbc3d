//! The console's pages (GET): each reads through the store functions `refundctl` uses and
//! renders HTML on the server. Forms post to [`super::actions`].

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::CookieJar;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use shared::job::yuan;
use shared::state::State as JobState;
use shared::store::cases::{self, CaseFilter, CaseState};
use shared::store::operator::{self, DeadFilter, Discrepancies, JobDetail};
use shared::store::{activity, approvals, runs};

use super::auth::{Role, Signed};
use super::replay::{self, RunState, Selection};
use super::{Console, PRE_COOKIE, PageError, charts};

type Page = Result<Response, PageError>;

/// `s` percent-encoded for a query string.
pub fn url_encode(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|q| q.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

/// A time in the business time zone, to the second.
fn at(c: &Console, t: DateTime<Utc>) -> String {
    t.with_timezone(&c.ctl.tz)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Fen with yuan beside it.
fn money(fen: i64) -> Markup {
    html! { span.money title=(format!("{fen} fen")) { (fen) " fen " small { "(¥" (yuan(fen)) ")" } } }
}

fn opt_money(fen: Option<i64>) -> Markup {
    match fen {
        Some(f) => money(f),
        None => html! { "–" },
    }
}

/// The hidden CSRF field every form carries.
pub fn csrf_field(s: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// The frame of every signed-in page.
pub fn layout(
    c: &Console,
    s: &Signed,
    title: &str,
    refresh: Option<u32>,
    body: Markup,
) -> Response {
    let nav = [
        ("/", "Overview"),
        ("/search", "Search"),
        ("/dlq", "Dead letters"),
        ("/unknown", "Unknown outcomes"),
        ("/approvals", "Approvals"),
        ("/reconciliation", "Reconciliation"),
        ("/replays", "Replays"),
    ];
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(r) = refresh { meta http-equiv="refresh" content=(r); }
                title { (title) " · refund console" }
                link rel="stylesheet" href="/static/console.css";
            }
            body {
                header {
                    a.brand href="/" { "refund console" }
                    nav { @for (href, label) in nav { a href=(href) { (label) } } }
                    form.search method="get" action="/search" {
                        input type="search" name="q" placeholder="refund_no, order_no or provider id" aria-label="search";
                    }
                    div.who {
                        span #operator { (s.name) } " · " span #role { (s.role.as_str()) } " "
                        @if matches!(s.via, super::auth::Via::Session(_)) {
                            form.inline method="post" action="/sign-out" {
                                (csrf_field(s)) button.link type="submit" { "sign out" }
                            }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
                footer { "database " (c.config().database_url_redacted()) " · times in " (c.ctl.tz.name()) }
            }
        }
    };
    page.into_response()
}

/// A page for an error, signed in or not.
pub fn error_page(title: &str, text: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { (title) " · refund console" } link rel="stylesheet" href="/static/console.css"; }
            body { main { h1 { (title) } p.error { (text) } p { a href="/" { "Overview" } } } }
        }
    }
}

/// A page saying what an action did.
pub fn result_page(
    c: &Console,
    s: &Signed,
    title: &str,
    ok: bool,
    lines: &[String],
    back: (&str, &str),
) -> Response {
    layout(
        c,
        s,
        title,
        None,
        html! {
            div class=(if ok { "notice ok" } else { "notice refused" }) {
                @for l in lines { p { (l) } }
            }
            p { a href=(back.0) { (back.1) } }
        },
    )
}

pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("console.css"),
    )
        .into_response()
}

// --- overview ------------------------------------------------------------------------------

pub async fn overview(State(c): State<Arc<Console>>, s: Signed) -> Page {
    let pool = &c.ctl.pool;
    let census = operator::job_census(pool).await?;
    let dead_total = census.by_state.get(&JobState::Dead).copied().unwrap_or(0);
    let dlq = operator::dlq_counts(pool, dead_total).await?;
    let minutes = activity::last_minutes(pool, 60).await?;
    let pending = approvals::list(pool, false).await?.len();
    let open_cases = cases::list(
        pool,
        CaseFilter {
            date: None,
            state: Some(CaseState::Open),
        },
    )
    .await?
    .len();
    let oldest = operator::oldest_in(
        pool,
        &[
            JobState::Received,
            JobState::InFlight,
            JobState::RetryWait,
            JobState::Accepted,
        ],
    )
    .await?;
    let labels: Vec<String> = minutes
        .iter()
        .map(|m| at(&c, m.minute)[11..16].to_owned())
        .collect();
    let series = |f: fn(&activity::Minute) -> i64| minutes.iter().map(f).collect::<Vec<i64>>();
    let throughput = charts::stacked_bars(
        "Jobs ended per minute (last hour)",
        &labels,
        &[
            ("succeeded", "#2e7d32", series(|m| m.succeeded)),
            ("failed", "#f9a825", series(|m| m.failed)),
            ("accepted", "#1565c0", series(|m| m.accepted)),
        ],
    );
    let failures = charts::stacked_bars(
        "Failures per minute (last hour)",
        &labels,
        &[
            ("retried", "#ef6c00", series(|m| m.retried)),
            ("dead", "#c62828", series(|m| m.dead)),
        ],
    );
    let body = html! {
        section.cards {
            div.card { h2 { "Dead letters" } p.big #dlq-depth { (dlq.depth()) } p { (dlq.dead_jobs) " dead jobs · " (dlq.poison_messages) " poison messages" } a href="/dlq" { "open" } }
            div.card { h2 { "Approvals waiting" } p.big { (pending) } a href="/approvals" { "open" } }
            div.card { h2 { "Open cases" } p.big { (open_cases) } a href="/reconciliation" { "open" } }
            div.card { h2 { "Oldest unfinished" }
                @match &oldest {
                    Some(o) => { p { a href=(format!("/jobs/{}", url_encode(&o.refund_no))) { (o.refund_no) } } p { (o.state) " since " (at(&c, o.created_at)) } }
                    None => { p.big { "none" } }
                }
            }
        }
        section {
            h2 { "Jobs by state" }
            table #states {
                thead { tr { th { "state" } th.num { "jobs" } } }
                tbody {
                    @for st in JobState::ALL {
                        tr { td { span class=(format!("state {st}")) { (st) } } td.num { (census.by_state.get(&st).copied().unwrap_or(0)) } }
                    }
                }
            }
            @if !census.dead_by_cause.is_empty() {
                h3 { "Dead jobs outstanding, by cause" }
                table { tbody { @for (cause, n) in &census.dead_by_cause { tr { td { (cause) } td.num { (n) } } } } }
            }
        }
        section.charts { (throughput) (failures) }
    };
    Ok(layout(&c, &s, "Overview", Some(15), body))
}

// --- search and the job timeline -------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    #[serde(default)]
    q: String,
}

pub async fn search(
    State(c): State<Arc<Console>>,
    s: Signed,
    Query(q): Query<SearchQuery>,
) -> Page {
    let key = q.q.trim();
    if key.is_empty() {
        return Ok(layout(
            &c,
            &s,
            "Search",
            None,
            html! {
                p { "Find a job by its refund_no, its order_no or the provider's refund id." }
                form method="get" action="/search" { input #q type="search" name="q" autofocus; " " button type="submit" { "Search" } }
            },
        ));
    }
    let detail = operator::job_detail(&c.ctl.pool, key).await?;
    if detail.found() {
        return Ok(Redirect::to(&format!("/jobs/{}", url_encode(key))).into_response());
    }
    let found = operator::jobs_by_other_key(&c.ctl.pool, key).await?;
    if let [one] = found.as_slice() {
        return Ok(Redirect::to(&format!("/jobs/{}", url_encode(&one.refund_no))).into_response());
    }
    Ok(layout(
        &c,
        &s,
        "Search",
        None,
        html! {
            @if found.is_empty() {
                p.notice { "Nothing has refund_no, order_no or provider refund id " code { (key) } "." }
            } @else {
                p { (found.len()) " jobs match " code { (key) } ":" }
                table #results {
                    thead { tr { th { "refund_no" } th { "state" } th { "matched" } } }
                    tbody { @for m in &found { tr { td { a href=(format!("/jobs/{}", url_encode(&m.refund_no))) { (m.refund_no) } } td { (m.state) } td { (m.matched) } } } }
                }
            }
        },
    ))
}

/// One line of a job's timeline.
struct Moment {
    at: DateTime<Utc>,
    kind: &'static str,
    what: Markup,
}

fn timeline(d: &JobDetail) -> Vec<Moment> {
    let mut m = Vec::new();
    for t in &d.transitions {
        m.push(Moment {
            at: t.at,
            kind: "transition",
            what: html! {
                (t.from_state.as_deref().unwrap_or("·")) " → " b { (t.to_state) }
                " by " (t.actor) " (attempt " (t.attempt) ")"
                @if let Some(cause) = &t.cause { " cause " code { (cause) } }
            },
        });
    }
    for a in &d.attempts {
        m.push(Moment { at: a.recorded_at, kind: "call", what: html! {
            "attempt " (a.attempt) ": " b { (a.outcome) }
            @if let Some(code) = &a.code { " " code { (code) } }
            @if let Some(msg) = &a.message { " " (msg) }
            @if let Some(st) = a.http_status { " · HTTP " (st) }
            " · " (a.latency_us / 1000) " ms"
            @if a.fenced { " · " em { "came back after its attempt was superseded (kept, not applied)" } }
            details { summary { "request and answer" }
                h4 { "request (secrets redacted)" } pre { (a.request) }
                h4 { "answer" } pre { (a.response.as_deref().unwrap_or("(none)")) }
            }
        }});
    }
    for n in &d.notifications {
        m.push(Moment {
            at: n.received_at,
            kind: "notify",
            what: html! {
                "notify " b { (n.status) } " (" (n.effect) ")"
                details { summary { "body" } pre { (n.body) } }
            },
        });
    }
    for a in &d.audit {
        m.push(Moment { at: a.at, kind: "operator", what: html! {
            b { (a.operator) } " " (a.action) ": " (a.result)
            @if let (Some(p), Some(n)) = (&a.prior_state, &a.new_state) { " (" (p) " → " (n) ")" }
            " — " q { (a.note) }
            @if let Some(r) = &a.reason { " · " (r) }
        }});
    }
    for r in &d.rejections {
        m.push(Moment { at: r.last_seen_at, kind: "poison", what: html! {
            (r.kind) " message, field " code { (r.field) } ": " (r.reason) " (" (r.occurrences) "×)"
        }});
    }
    m.sort_by_key(|x| x.at);
    m
}

pub async fn job(State(c): State<Arc<Console>>, s: Signed, Path(no): Path<String>) -> Page {
    let d = operator::job_detail(&c.ctl.pool, &no).await?;
    if !d.found() {
        return Err(PageError::NotFound(format!(
            "no job or message has refund_no {no:?}"
        )));
    }
    let moments = timeline(&d);
    let job_cases = cases::of_refund(&c.ctl.pool, &no).await?;
    let actions = match &d.job {
        Some(j) => job_actions(&s, j)?,
        None => html! {},
    };
    let body = html! {
        @if let Some(j) = &d.job {
            table.facts #job {
                tr { th { "refund_no" } td #refund-no { (j.refund_no) } th { "state" } td #state { span class=(format!("state {}", j.state)) { (j.state) } @if let Some(cause) = &j.cause { " · " code #cause { (cause) } } } }
                tr { th { "order_no" } td #order-no { (j.order_no) } th { "provider" } td { (j.provider) " / " (j.merchant) } }
                tr { th { "refund fee" } td { (money(j.refund_fee)) } th { "total fee" } td { (money(j.total_fee)) } }
                tr { th { "settlement fee" } td { (opt_money(j.settlement_refund_fee)) } th { "provider refund id" } td { (j.provider_refund_id.as_deref().unwrap_or("–")) } }
                tr { th { "attempts" } td { (j.attempt) } th { "last code" } td { (j.last_code.as_deref().unwrap_or("–")) " " (j.last_message.as_deref().unwrap_or("")) } }
                tr { th { "created" } td { (at(&c, j.created_at)) } th { "updated" } td { (at(&c, j.updated_at)) } }
                tr { th { "may have been paid" } td { (if j.maybe_paid { "yes" } else { "no" }) } th { "idempotent merchant" } td { (j.idempotent.map_or("unrecorded", |i| if i { "yes" } else { "no" })) } }
            }
            @if let Some(q) = &d.status_query {
                p.notice { "Status queries: " (q.queries) " so far since " (at(&c, q.since)) "; "
                    @match q.next_at { Some(n) => { "next at " (at(&c, n)) }, None => { "schedule over" } }
                    @if let Some(st) = &q.last_status { "; last answer " code { (st) } }
                    @if let Some(e) = &q.last_error { "; last error " (e) } }
            }
            (actions)
        } @else {
            p.notice { "No job: this refund_no only arrived in messages refused at intake." }
        }
        h2 { "Timeline" }
        ol.timeline #timeline {
            @for m in &moments { li class=(m.kind) { span.time { (at(&c, m.at)) } " " span.kind { (m.kind) } " " (m.what) } }
        }
        h2 { "Reconciliation" }
        @if !job_cases.is_empty() {
            table #job-cases { thead { tr { th { "case" } th { "date" } th { "kind" } th { "ledger" } th { "provider" } th { "state" } th.num { "runs" } th.num { "days" } } }
                tbody { @for k in &job_cases { tr {
                    td { a href="/reconciliation?state=all" { (k.id) } } td { (k.business_date) } td { code { (k.kind) } }
                    td { (opt_money(k.ledger_amount)) } td { (opt_money(k.provider_amount)) }
                    td { (k.state) @if let Some(by) = &k.closed_by { " by " (by) } @if let Some(n) = &k.close_note { ": " q { (n) } } }
                    td.num { (k.runs) } td.num { (k.days_open) }
                } } } }
        }
        @match &d.discrepancies {
            Discrepancies::NotInstalled => { p { "Reconciliation is not installed in this database." } }
            Discrepancies::Unavailable { error } => { p.error { "Could not read discrepancies: " (error) } }
            Discrepancies::Found { rows } if rows.is_empty() => { p { "No discrepancy names this refund." } }
            Discrepancies::Found { rows } => {
                table { thead { tr { th { "run" } th { "kind" } th { "ledger" } th { "provider" } th { "detail" } } }
                    tbody { @for r in rows { tr {
                        td { (r.get("run_id").map(|v| v.to_string()).unwrap_or_default()) }
                        td { (r.get("kind").and_then(|v| v.as_str()).unwrap_or("")) }
                        td { (opt_money(r.get("ledger_amount").and_then(serde_json::Value::as_i64))) }
                        td { (opt_money(r.get("provider_amount").and_then(serde_json::Value::as_i64))) }
                        td { (r.get("detail").and_then(|v| v.as_str()).unwrap_or("")) }
                    } } }
                }
            }
        }
    };
    Ok(layout(&c, &s, &format!("Job {no}"), None, body))
}

/// The forms that apply to this job in its state, for a role that may use them.
fn job_actions(s: &Signed, j: &operator::JobRecord) -> Result<Markup, PageError> {
    let state = j.state()?;
    if !s.may(Role::Operator) {
        return Ok(html! {});
    }
    let base = format!("/jobs/{}", url_encode(&j.refund_no));
    let may_hold_money = matches!(
        j.cause.as_deref(),
        Some("outcome_unknown" | "refund_abnormal")
    );
    Ok(html! {
        section.actions {
            @if state == JobState::Dead {
                fieldset { legend { "Replay" } "Send it to the provider again (refused when that could pay it twice). "
                    form.inline method="post" action=(format!("{base}/replay")) {
                        (csrf_field(s)) input name="note" required placeholder="why (ticket, incident)" aria-label="why"; " "
                        button #replay type="submit" { "Replay" }
                    }
                }
                @if !may_hold_money {
                    fieldset { legend { "Discard" } "Take it out of the dead letters for good; it stays dead with its history. "
                        form.inline method="post" action=(format!("{base}/discard")) {
                            (csrf_field(s)) input name="note" required placeholder="why it will never be paid" aria-label="why"; " "
                            button #discard type="submit" { "Discard" }
                        }
                    }
                }
                fieldset { legend { "Resolve" } "Settle it as the provider says it ended."
                    (outcome_form(s, &format!("{base}/resolve"), "Resolve", "note", "how you know (provider ticket)")) }
            }
            @if state.is_final() && state != JobState::Dead {
                fieldset { legend { "Correct the booking" } "The provider's evidence says it ended otherwise than booked."
                    (outcome_form(s, &format!("{base}/correct"), "Correct", "evidence", "statement file and line, ticket")) }
            }
        }
    })
}

/// A form asking for succeeded (with the settlement fee) or failed, and why.
pub fn outcome_form(s: &Signed, action: &str, label: &str, why: &str, placeholder: &str) -> Markup {
    html! {
        form.outcome method="post" action=(action) {
            (csrf_field(s))
            select name="outcome" aria-label="outcome" { option value="succeeded" { "paid (succeeded)" } option value="failed" { "not paid (failed)" } }
            " " input name="settlement_fee" inputmode="numeric" placeholder="settlement fee, fen (if paid)" aria-label="settlement fee";
            " " input name=(why) required placeholder=(placeholder) aria-label=(why);
            " " button type="submit" { (label) }
        }
    }
}

// --- dead letters and bulk replay ------------------------------------------------------------

pub async fn dlq(State(c): State<Arc<Console>>, s: Signed) -> Page {
    let pool = &c.ctl.pool;
    let groups = operator::dead_groups(pool, &DeadFilter::default()).await?;
    let poison = operator::poison_groups(pool, None, None, None).await?;
    let messages = operator::poison_messages(pool, None, None, Some(50)).await?;
    let body = html! {
        h2 { "Dead jobs by fingerprint" }
        @if groups.is_empty() { p #no-dead { "No dead job waits." } }
        @else {
            table #groups {
                thead { tr { th { "cause" } th { "provider" } th { "last code" } th.num { "jobs" } th { "died" } th { "sample message" } th {} } }
                tbody { @for g in &groups {
                    @let sel = Selection { cause: Some(g.cause.clone()), provider: Some(g.provider.clone()), code: Some(g.code.clone().unwrap_or_else(|| "-".into())) };
                    tr {
                        td { code { (g.cause) } } td { (g.provider) } td { (g.code.as_deref().unwrap_or("–")) } td.num { (g.count) }
                        td { (at(&c, g.oldest)) " … " (at(&c, g.newest)) } td { (g.sample_message.as_deref().unwrap_or("")) }
                        td { a.button href=(format!("/dlq/replay?{}", serde_urlencoded::to_string(&sel).unwrap_or_default())) { "Preview replay" } }
                    }
                } }
            }
            p { a href="/dlq/replay" { "Preview a replay of every dead job" } }
        }
        h2 { "Poison messages" }
        @if poison.is_empty() { p { "No poison message is stored." } }
        @else {
            table { thead { tr { th { "kind" } th { "field" } th.num { "messages" } th.num { "arrivals" } th { "latest reason" } } }
                tbody { @for g in &poison { tr { td { (g.kind) } td { code { (g.field) } } td.num { (g.messages) } td.num { (g.occurrences) } td { (g.sample_reason) } } } } }
            h3 { "Oldest messages" }
            table #poison { thead { tr { th { "id" } th { "kind" } th { "refund_no" } th { "reason" } th { "body" } th {} } }
                tbody { @for m in &messages { tr {
                    td { (m.id) } td { (m.kind) } td { (m.refund_no.as_deref().unwrap_or("–")) } td { (m.reason) }
                    td { details { summary { (m.body_bytes) " bytes" } pre { (m.body) } } }
                    td { @if s.may(Role::Operator) {
                        form method="post" action=(format!("/dlq/poison/{}/discard", m.id)) { (csrf_field(&s)) input name="note" required placeholder="why"; " " button type="submit" { "Discard" } }
                    } }
                } } } }
        }
    };
    Ok(layout(&c, &s, "Dead letters", None, body))
}

pub async fn replay_preview(
    State(c): State<Arc<Console>>,
    s: Signed,
    Query(sel): Query<Selection>,
) -> Page {
    let sel = sel.normalized();
    let p = replay::preview(&c.ctl, &sel).await?;
    let rate = c.config().console.replay_rate;
    let body = html! {
        p { "Selection: " b #selection { (sel.describe()) } "." }
        p #preview-counts { b #would-replay { (p.would_replay) } " would be replayed, " b #would-refuse { (p.refusals.len()) } " would be refused, of " (p.selected.len()) " selected. Nothing has been changed." }
        @if !p.refusals.is_empty() {
            h2 { "Would be refused" }
            table #refusals { thead { tr { th { "refund_no" } th { "why" } } }
                tbody { @for (no, why) in p.refusals.iter().take(200) { tr { td { a href=(format!("/jobs/{}", url_encode(no))) { (no) } } td { (why) } } } } }
        }
        @if p.would_replay > 0 {
            @if s.may(Role::Operator) {
                h2 { "Replay" }
                form #replay-form method="post" action="/dlq/replay" {
                    (csrf_field(&s))
                    input type="hidden" name="cause" value=(sel.cause.clone().unwrap_or_default());
                    input type="hidden" name="provider" value=(sel.provider.clone().unwrap_or_default());
                    input type="hidden" name="code" value=(sel.code.clone().unwrap_or_default());
                    input type="hidden" name="expected" value=(p.selected.len());
                    label { "Why " input #note name="note" required placeholder="incident or ticket"; } " "
                    label { "Replays per second " input #rate name="rate" type="number" min="0.1" max=(rate) step="0.1" value=(rate); } " "
                    button #start-replay type="submit" { "Replay " (p.would_replay) " jobs" }
                }
                p { "Each job is checked again when its turn comes; one that changed meanwhile is refused then." }
            } @else {
                p.notice { "Your role (" (s.role.as_str()) ") may look, not replay." }
            }
        }
        h2 { "Selected jobs" }
        ul.compact { @for no in p.selected.iter().take(100) { li { a href=(format!("/jobs/{}", url_encode(no))) { (no) } } } }
        @if p.selected.len() > 100 { p { "… and " (p.selected.len() - 100) " more." } }
    };
    Ok(layout(&c, &s, "Replay preview", None, body))
}

pub async fn replays(State(c): State<Arc<Console>>, s: Signed) -> Page {
    let list = c.runs.list();
    Ok(layout(
        &c,
        &s,
        "Bulk replays",
        None,
        html! {
            @if list.is_empty() { p { "No bulk replay has run since this console started." } }
            table { thead { tr { th { "run" } th { "state" } th { "selection" } th { "by" } th.num { "done" } th.num { "replayed" } th.num { "refused" } th { "started" } } }
                tbody { @for r in &list { tr {
                    td { a href=(format!("/replays/{}", r.id)) { (r.id) } } td { (r.state.as_str()) } td { (r.selection.describe()) } td { (r.operator) }
                    td.num { (r.done) "/" (r.total) } td.num { (r.replayed) } td.num { (r.refusals.len()) } td { (at(&c, r.started_at)) }
                } } } }
        },
    ))
}

pub async fn replay_run(State(c): State<Arc<Console>>, s: Signed, Path(id): Path<u64>) -> Page {
    let r = c
        .runs
        .get(id)
        .ok_or_else(|| PageError::NotFound(format!("no bulk replay {id} in this console")))?;
    let running = r.state == RunState::Running;
    let percent = (r.done * 100).checked_div(r.total).unwrap_or(100);
    let body = html! {
        p { "Selection " b { (r.selection.describe()) } ", by " (r.operator) " — " q { (r.note) } ", at most " (r.rate) " per second." }
        p { "State: " b #run-state { (r.state.as_str()) } }
        progress #progress max=(r.total) value=(r.done) { (percent) "%" }
        p #run-counts { span #done { (r.done) } " of " (r.total) " done: " span #replayed { (r.replayed) } " replayed, " span #refused { (r.refusals.len()) } " refused"
            @if r.not_published > 0 { ", " (r.not_published) " not re-enqueued (left to the sweeper)" } "." }
        @if let Some(e) = &r.error { p.error { "Stopped: " (e) } }
        @if running && s.may(Role::Operator) {
            form method="post" action=(format!("/replays/{id}/abort")) { (csrf_field(&s)) button #abort type="submit" { "Abort" } }
        }
        @if !r.refusals.is_empty() {
            h2 { "Refused" }
            table { tbody { @for (no, why) in &r.refusals { tr { td { a href=(format!("/jobs/{}", url_encode(no))) { (no) } } td { (why) } } } } }
        }
    };
    Ok(layout(
        &c,
        &s,
        &format!("Bulk replay {id}"),
        running.then_some(1),
        body,
    ))
}

// --- unknown outcomes and approvals ----------------------------------------------------------

pub async fn unknown(State(c): State<Arc<Console>>, s: Signed) -> Page {
    let mut jobs = Vec::new();
    for cause in ["outcome_unknown", "refund_abnormal"] {
        let filter = DeadFilter {
            cause: Some(cause.into()),
            limit: Some(500),
            ..DeadFilter::default()
        };
        let mut some: Vec<_> = operator::dead_jobs(&c.ctl.pool, filter)
            .try_collect()
            .await?;
        jobs.append(&mut some);
    }
    let pending: std::collections::HashMap<String, i64> = approvals::list(&c.ctl.pool, false)
        .await?
        .into_iter()
        .map(|a| (a.refund_no, a.id))
        .collect();
    let body = html! {
        p { "Dead jobs the provider may have paid: settle each as the provider says. "
            @if c.config().operator.four_eyes() { "A resolution takes effect when a second operator approves it." } }
        @if jobs.is_empty() { p #no-unknown { "None." } } @else {
        table #unknown { thead { tr { th { "refund_no" } th { "cause" } th { "provider" } th { "refund fee" } th { "last code" } th { "died" } th {} } }
            tbody { @for j in &jobs { tr {
                td { a href=(format!("/jobs/{}", url_encode(&j.refund_no))) { (j.refund_no) } } td { code { (j.cause) } } td { (j.provider) " / " (j.merchant) }
                td { (money(j.refund_fee)) } td { (j.code.as_deref().unwrap_or("–")) } td { (at(&c, j.died_at)) }
                td { @if let Some(id) = pending.get(&j.refund_no) { a href="/approvals" { "request " (id) " waits for approval" } }
                     @else if s.may(Role::Operator) { (outcome_form(&s, &format!("/jobs/{}/resolve", url_encode(&j.refund_no)), "Resolve", "note", "how you know")) } }
            } } } } }
    };
    Ok(layout(&c, &s, "Unknown outcomes", None, body))
}

pub async fn approvals(State(c): State<Arc<Console>>, s: Signed) -> Page {
    let all = approvals::list(&c.ctl.pool, true).await?;
    let (pending, decided): (Vec<_>, Vec<_>) = all.into_iter().partition(|a| a.state == "pending");
    let body = html! {
        h2 { "Waiting" }
        @if pending.is_empty() { p #no-pending { "Nothing waits for approval." } } @else {
        table #pending { thead { tr { th { "id" } th { "action" } th { "refund_no" } th { "outcome" } th { "settlement" } th { "why" } th { "by" } th { "filed" } th {} } }
            tbody { @for a in &pending { tr id=(format!("request-{}", a.id)) {
                td { (a.id) } td { (a.action) } td { a href=(format!("/jobs/{}", url_encode(&a.refund_no))) { (a.refund_no) } } td { (a.outcome) }
                td { (opt_money(a.settlement_refund_fee)) } td { (a.note) } td { (a.requested_by) } td { (at(&c, a.requested_at)) }
                td {
                    @if a.requested_by != s.name && s.may(Role::Approver) {
                        form.inline method="post" action=(format!("/approvals/{}/approve", a.id)) { (csrf_field(&s)) button.approve type="submit" { "Approve" } }
                    } @else if a.requested_by == s.name { small { "yours: a second operator approves it" } }
                    @if a.requested_by == s.name || s.may(Role::Approver) {
                        form.inline method="post" action=(format!("/approvals/{}/reject", a.id)) { (csrf_field(&s)) input name="note" required placeholder="why"; button type="submit" { (if a.requested_by == s.name { "Withdraw" } else { "Reject" }) } }
                    }
                }
            } } } } }
        h2 { "Decided" }
        @if decided.is_empty() { p { "Nothing decided yet." } }
        table #decided { thead { tr { th { "id" } th { "action" } th { "refund_no" } th { "state" } th { "by" } th { "decided by" } th { "at" } th { "refusal" } } }
            tbody { @for a in decided.iter().rev().take(50) { tr {
                td { (a.id) } td { (a.action) " → " (a.outcome) } td { a href=(format!("/jobs/{}", url_encode(&a.refund_no))) { (a.refund_no) } } td { (a.state) }
                td { (a.requested_by) } td { (a.decided_by.as_deref().unwrap_or("–")) } td { (a.decided_at.map(|t| at(&c, t)).unwrap_or_default()) } td { (a.refusal.as_deref().unwrap_or("")) }
            } } } }
    };
    Ok(layout(&c, &s, "Approvals", None, body))
}

// --- reconciliation --------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct CaseQuery {
    #[serde(default)]
    state: Option<String>,
}

pub async fn reconciliation(
    State(c): State<Arc<Console>>,
    s: Signed,
    Query(q): Query<CaseQuery>,
) -> Page {
    let state = match q.state.as_deref().filter(|v| !v.is_empty()) {
        None => Some(CaseState::Open),
        Some("all") => None,
        Some(v) => Some(
            v.parse::<CaseState>()
                .map_err(|e| PageError::BadInput(format!("state: {e}")))?,
        ),
    };
    let mut conn = c.ctl.pool.acquire().await?;
    let run_rows = runs::list(&mut conn, None, 30).await?;
    drop(conn);
    let by_kind = activity::current_discrepancies_by_kind(&c.ctl.pool).await?;
    let case_rows = cases::list(&c.ctl.pool, CaseFilter { date: None, state }).await?;
    let body = html! {
        h2 { "Runs" }
        @if run_rows.is_empty() { p { "No reconciliation has run." } }
        table #runs { thead { tr { th { "run" } th { "date" } th { "scope" } th { "source" } th { "status" } th.num { "discrepancies" } th { "ledger" } th { "provider" } th { "diff" } th { "superseded" } } }
            tbody { @for r in &run_rows { tr class=(if r.superseded_by.is_some() { "superseded" } else { "" }) {
                td { (r.id) } td { (r.date) } td { (r.provider.as_deref().unwrap_or("all")) }
                td { (r.source) @if r.source == "attempts" { " " small { "(our own answers: not independent)" } } }
                td { span class=(format!("status {}", r.status)) { (r.status) } @if let Some(e) = &r.error { " " small { (e) } } }
                td.num { (r.discrepancies) } td { (money(r.ledger_total)) } td { (money(r.provider_total)) } td { (money(r.diff)) }
                td { (r.superseded_by.map(|id| format!("by {id}")).unwrap_or_else(|| "–".into())) }
            } } } }
        h2 { "Current discrepancies by kind" }
        @if by_kind.is_empty() { p { "None in the current runs." } }
        @if !by_kind.is_empty() {
            table #by-kind { thead { tr { th { "kind" } th.num { "discrepancies" } th { "ledger" } th { "provider" } th { "provider − ledger" } } }
                tbody { @for k in &by_kind { tr {
                    td { code { (k.kind) } } td.num { (k.count) } td { (money(k.ledger_amount)) } td { (money(k.provider_amount)) }
                    td { (k.provider_amount.checked_sub(k.ledger_amount).map_or_else(|| html! { "overflow" }, money)) }
                } } } }
        }
        h2 { "Cases" }
        p { "Show: " a href="/reconciliation?state=open" { "open" } " · " a href="/reconciliation?state=explained" { "explained" } " · " a href="/reconciliation?state=corrected" { "corrected" } " · " a href="/reconciliation?state=all" { "all" } }
        @if case_rows.is_empty() { p { "No case." } }
        table #cases { thead { tr { th { "case" } th { "date" } th { "provider" } th { "refund_no" } th { "kind" } th { "ledger" } th { "provider" } th { "state" } th.num { "days" } th {} } }
            tbody { @for k in &case_rows { tr {
                td { (k.id) } td { (k.business_date) } td { (k.provider) " / " (k.merchant) }
                td { @if k.refund_no.is_empty() { "–" } @else { a href=(format!("/jobs/{}", url_encode(&k.refund_no))) { (k.refund_no) } } }
                td { code { (k.kind) } } td { (opt_money(k.ledger_amount)) } td { (opt_money(k.provider_amount)) }
                td { (k.state) @if let Some(by) = &k.closed_by { " by " (by) } @if let Some(n) = &k.close_note { ": " q { (n) } } }
                td.num { (k.days_open) }
                td { @if k.state == "open" && s.may(Role::Operator) {
                    form.inline method="post" action=(format!("/cases/{}/explain", k.id)) { (csrf_field(&s)) input name="note" required placeholder="explanation"; button type="submit" { "Explain" } }
                } }
            } } } }
    };
    Ok(layout(&c, &s, "Reconciliation", None, body))
}

// --- sign-in ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct SignInQuery {
    #[serde(default)]
    pub next: Option<String>,
}

/// The sign-in page; `error` when the last try failed.
pub fn sign_in_page(c: &Console, jar: CookieJar, next: &str, error: Option<&str>) -> Response {
    let (jar, pre) = match jar.get(PRE_COOKIE).map(|k| k.value().to_owned()) {
        Some(pre) if pre.len() == 64 => (jar, pre),
        _ => {
            let pre = hex::encode(rand::random::<[u8; 32]>());
            (jar.add(c.cookie(PRE_COOKIE, pre.clone())), pre)
        }
    };
    let token = c.sessions.sign_in_token(&pre);
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Sign in · refund console" } link rel="stylesheet" href="/static/console.css"; }
            body.sign-in { main {
                h1 { "refund console" }
                @if let Some(e) = error { p.error #sign-in-error { (e) } }
                form #sign-in method="post" action="/sign-in" {
                    input type="hidden" name="token" value=(token);
                    input type="hidden" name="next" value=(next);
                    label { "Name" input #name name="name" autocomplete="username" required autofocus; }
                    label { "Password" input #password name="password" type="password" autocomplete="current-password" required; }
                    button #sign-in-button type="submit" { "Sign in" }
                }
            } }
        }
    };
    let status = if error.is_some() {
        axum::http::StatusCode::UNAUTHORIZED
    } else {
        axum::http::StatusCode::OK
    };
    (status, jar, page).into_response()
}

pub async fn sign_in(
    State(c): State<Arc<Console>>,
    jar: CookieJar,
    Query(q): Query<SignInQuery>,
) -> Response {
    sign_in_page(&c, jar, q.next.as_deref().unwrap_or("/"), None)
}
