//! What the console's forms do (POST). Each checks the role and the CSRF token first, then
//! calls the same store function or per-job action as `refundctl`, under the signed-in
//! operator's name (the store writes the audit row), and shows what it did.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::CookieJar;
use serde::Deserialize;
use shared::store::approvals::{self as store_approvals, Action, Decided};
use shared::store::cases::{self, Explained};
use shared::store::jobs::{self, Correction, Operator, Resolution, Verdict};

use super::auth::{Role, Signed, Via};
use super::pages::{self, result_page, url_encode};
use super::replay::Selection;
use super::{Console, PRE_COOKIE, PageError, SESSION_COOKIE};
use crate::ctl::OperatorArgs;
use crate::ctl::approvals::{context, submit};
use crate::ctl::dlq::{self, ReplayOutcome};

type Done = Result<Response, PageError>;

/// A form that only carries its token.
#[derive(Debug, Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    csrf: String,
}

/// A form with a token and the operator's reason.
#[derive(Debug, Deserialize)]
pub struct NoteForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    note: String,
}

/// Checks role and token; the trimmed note, which must not be empty.
fn authorised(
    s: &Signed,
    needs: Role,
    csrf: &str,
    note: Option<&str>,
) -> Result<String, PageError> {
    s.check_csrf(csrf)?;
    s.require(needs)?;
    match note.map(str::trim) {
        Some("") => Err(PageError::BadInput(
            "note: say why (a ticket, an incident, the provider's confirmation); it is stored \
             in the audit row"
                .into(),
        )),
        Some(n) => Ok(n.to_owned()),
        None => Ok(String::new()),
    }
}

fn job_link(no: &str) -> String {
    format!("/jobs/{}", url_encode(no))
}

pub async fn replay_job(
    State(c): State<Arc<Console>>,
    s: Signed,
    Path(no): Path<String>,
    Form(f): Form<NoteForm>,
) -> Done {
    let note = authorised(&s, Role::Operator, &f.csrf, Some(&f.note))?;
    let who = OperatorArgs {
        operator: s.name.clone(),
        note,
    };
    let mut publisher = None;
    let outcome = dlq::replay_one(&c.ctl, &who, &no, &mut publisher).await?;
    if let Some(p) = publisher {
        p.close().await;
    }
    let (ok, line) = match outcome {
        ReplayOutcome::Replayed { prior } => (
            true,
            format!("{no}: replayed ({prior} → received, re-enqueued)."),
        ),
        ReplayOutcome::ReplayedNotPublished { prior, error } => (
            true,
            format!(
                "{no}: replayed ({prior} → received) but not re-enqueued ({error}); the worker's sweeper picks it up."
            ),
        ),
        ReplayOutcome::Refused { reason, .. } | ReplayOutcome::WouldRefuse { reason, .. } => {
            (false, format!("{no}: refused: {reason}"))
        }
        ReplayOutcome::WouldReplay { .. } => (false, format!("{no}: nothing done")),
    };
    Ok(result_page(
        &c,
        &s,
        "Replay",
        ok,
        &[line],
        (&job_link(&no), "Back to the job"),
    ))
}

pub async fn discard_job(
    State(c): State<Arc<Console>>,
    s: Signed,
    Path(no): Path<String>,
    Form(f): Form<NoteForm>,
) -> Done {
    let note = authorised(&s, Role::Operator, &f.csrf, Some(&f.note))?;
    let mut tx = c.ctl.pool.begin().await?;
    let verdict = jobs::discard(
        &mut tx,
        &no,
        Operator {
            name: &s.name,
            note: &note,
        },
    )
    .await?;
    tx.commit().await?;
    let (ok, line) = match verdict {
        Verdict::Done { .. } => (
            true,
            format!("{no}: discarded (it stays dead, out of the dead-letter set)."),
        ),
        Verdict::Refused { reason, .. } => (false, format!("{no}: refused: {reason}")),
    };
    Ok(result_page(
        &c,
        &s,
        "Discard",
        ok,
        &[line],
        (&job_link(&no), "Back to the job"),
    ))
}

pub async fn discard_poison(
    State(c): State<Arc<Console>>,
    s: Signed,
    Path(id): Path<i64>,
    Form(f): Form<NoteForm>,
) -> Done {
    let note = authorised(&s, Role::Operator, &f.csrf, Some(&f.note))?;
    let mut tx = c.ctl.pool.begin().await?;
    let refusal = jobs::discard_poison(
        &mut tx,
        id,
        Operator {
            name: &s.name,
            note: &note,
        },
    )
    .await?;
    tx.commit().await?;
    let (ok, line) = match refusal {
        None => (true, format!("poison message {id}: discarded.")),
        Some(reason) => (false, format!("poison message {id}: refused: {reason}")),
    };
    Ok(result_page(
        &c,
        &s,
        "Discard",
        ok,
        &[line],
        ("/dlq", "Back to the dead letters"),
    ))
}

/// A resolution or correction form.
#[derive(Debug, Deserialize)]
pub struct OutcomeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    settlement_fee: String,
    /// The resolution's note.
    #[serde(default)]
    note: Option<String>,
    /// The correction's evidence.
    #[serde(default)]
    evidence: Option<String>,
}

/// The settlement fee to book: `Some` for "succeeded" (required, whole fen, 0 or more),
/// `None` for "failed" (where a fee is an error).
fn settlement(f: &OutcomeForm) -> Result<Option<i64>, PageError> {
    let fee = f.settlement_fee.trim();
    match f.outcome.as_str() {
        "succeeded" => fee
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 0)
            .map(Some)
            .ok_or_else(|| {
                PageError::BadInput(format!(
                    "settlement_fee: {fee:?} is not a whole number of fen, 0 or more (required \
                     when the provider paid)"
                ))
            }),
        "failed" if fee.is_empty() => Ok(None),
        "failed" => Err(PageError::BadInput(
            "settlement_fee: only for a refund the provider paid; leave it empty for failed".into(),
        )),
        other => Err(PageError::BadInput(format!(
            "outcome: {other:?} is not succeeded or failed"
        ))),
    }
}

/// Which action an outcome form asks for.
#[derive(Debug, Clone, Copy)]
enum OutcomeKind {
    /// Settle a dead job (its reason is `note`).
    Resolve,
    /// Put a final job's booking right (its reason is `evidence`).
    Correct,
}

/// Checks the form, then files (or, with one approval required, applies) the resolution or
/// correction it asks for.
async fn outcome_action(
    c: &Console,
    s: &Signed,
    no: &str,
    kind: OutcomeKind,
    f: &OutcomeForm,
) -> Done {
    let why = match kind {
        OutcomeKind::Resolve => f.note.as_deref(),
        OutcomeKind::Correct => f.evidence.as_deref(),
    };
    let why = authorised(s, Role::Operator, &f.csrf, Some(why.unwrap_or("")))?;
    let action = match (kind, settlement(f)?) {
        (OutcomeKind::Resolve, Some(fee)) => Action::Resolve(Resolution::Succeeded {
            settlement_refund_fee: fee,
        }),
        (OutcomeKind::Resolve, None) => Action::Resolve(Resolution::Failed),
        (OutcomeKind::Correct, Some(fee)) => Action::Correct(Correction::Succeeded {
            settlement_refund_fee: fee,
        }),
        (OutcomeKind::Correct, None) => Action::Correct(Correction::Failed),
    };
    let why = why.as_str();
    let report = submit(
        &c.ctl,
        no,
        action,
        Operator {
            name: &s.name,
            note: why,
        },
    )
    .await?;
    let (ok, line) = match (&report.verdict, report.requested) {
        (Verdict::Done { prior }, Some(id)) => (
            true,
            format!(
                "{no}: approval request {id} filed: {} {prior} → {} waits for a second operator.",
                action.name(),
                action.outcome()
            ),
        ),
        (Verdict::Done { prior }, None) => (
            true,
            format!(
                "{no}: {} applied: {prior} → {}.",
                action.name(),
                action.outcome()
            ),
        ),
        (Verdict::Refused { reason, .. }, _) => (false, format!("{no}: refused: {reason}")),
    };
    Ok(result_page(
        c,
        s,
        "Resolution",
        ok,
        &[line],
        (&job_link(no), "Back to the job"),
    ))
}

pub async fn resolve(
    State(c): State<Arc<Console>>,
    s: Signed,
    Path(no): Path<String>,
    Form(f): Form<OutcomeForm>,
) -> Done {
    outcome_action(&c, &s, &no, OutcomeKind::Resolve, &f).await
}

pub async fn correct(
    State(c): State<Arc<Console>>,
    s: Signed,
    Path(no): Path<String>,
    Form(f): Form<OutcomeForm>,
) -> Done {
    outcome_action(&c, &s, &no, OutcomeKind::Correct, &f).await
}

pub async fn approve(
    State(c): State<Arc<Console>>,
    s: Signed,
    Path(id): Path<i64>,
    Form(f): Form<TokenForm>,
) -> Done {
    authorised(&s, Role::Approver, &f.csrf, None)?;
    let mut tx = c.ctl.pool.begin().await?;
    let decided = store_approvals::approve(&mut tx, id, &s.name, context(&c.ctl)).await?;
    tx.commit().await?;
    decision_page(&c, &s, id, decided)
}

pub async fn reject(
    State(c): State<Arc<Console>>,
    s: Signed,
    Path(id): Path<i64>,
    Form(f): Form<NoteForm>,
) -> Done {
    // The requester may withdraw their own request; anybody else needs the approver role (the
    // store checks who may, this only keeps viewers and operators off other people's).
    s.check_csrf(&f.csrf)?;
    let own = store_approvals::list(&c.ctl.pool, false)
        .await?
        .iter()
        .any(|a| a.id == id && a.requested_by == s.name);
    let note = authorised(
        &s,
        if own { Role::Operator } else { Role::Approver },
        &f.csrf,
        Some(&f.note),
    )?;
    let mut tx = c.ctl.pool.begin().await?;
    let decided = store_approvals::reject(
        &mut tx,
        id,
        Operator {
            name: &s.name,
            note: &note,
        },
    )
    .await?;
    tx.commit().await?;
    decision_page(&c, &s, id, decided)
}

fn decision_page(c: &Console, s: &Signed, id: i64, decided: Decided) -> Done {
    let (ok, line) = match decided {
        Decided::Applied { prior } => (
            true,
            format!("Request {id} approved and applied (the job was {prior})."),
        ),
        Decided::Rejected => (true, format!("Request {id} rejected.")),
        Decided::ActionRefused { reason } => (
            false,
            format!(
                "Request {id} approved, but refused when applied (closed as refused): {reason}"
            ),
        ),
        Decided::Refused { reason } => (false, format!("Request {id}: refused: {reason}")),
        Decided::NotFound => return Err(PageError::NotFound(format!("no approval request {id}"))),
    };
    Ok(result_page(
        c,
        s,
        "Approval",
        ok,
        &[line],
        ("/approvals", "Back to the approvals"),
    ))
}

pub async fn explain_case(
    State(c): State<Arc<Console>>,
    s: Signed,
    Path(id): Path<i64>,
    Form(f): Form<NoteForm>,
) -> Done {
    let note = authorised(&s, Role::Operator, &f.csrf, Some(&f.note))?;
    let mut tx = c.ctl.pool.begin().await?;
    let explained = cases::explain(
        &mut tx,
        id,
        Operator {
            name: &s.name,
            note: &note,
        },
    )
    .await?;
    tx.commit().await?;
    let (ok, line) = match explained {
        Explained::Done => (true, format!("Case {id} explained.")),
        Explained::Refused { reason } => (false, format!("Case {id}: refused: {reason}")),
        Explained::NotFound => return Err(PageError::NotFound(format!("no case {id}"))),
    };
    Ok(result_page(
        &c,
        &s,
        "Case",
        ok,
        &[line],
        ("/reconciliation", "Back to reconciliation"),
    ))
}

/// The bulk replay form of the preview page.
#[derive(Debug, Deserialize)]
pub struct ReplayForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    rate: String,
    #[serde(flatten)]
    selection: Selection,
}

pub async fn start_replay(
    State(c): State<Arc<Console>>,
    s: Signed,
    Form(f): Form<ReplayForm>,
) -> Done {
    let note = authorised(&s, Role::Operator, &f.csrf, Some(&f.note))?;
    let max = c.config().console.replay_rate;
    let rate = f
        .rate
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0 && *r <= max)
        .ok_or_else(|| {
            PageError::BadInput(format!(
                "rate: {:?} is not a number of replays per second above 0 and at most {max}",
                f.rate
            ))
        })?;
    let selection = f.selection.normalized();
    let selected = selection.refund_nos(&c.ctl).await?;
    if selected.is_empty() {
        return Err(PageError::BadInput(format!(
            "{} selects no dead job now: nothing to replay",
            selection.describe()
        )));
    }
    let who = OperatorArgs {
        operator: s.name.clone(),
        note,
    };
    let id = c.runs.start(c.ctl.clone(), who, selection, selected, rate);
    Ok(Redirect::to(&format!("/replays/{id}")).into_response())
}

pub async fn abort_replay(
    State(c): State<Arc<Console>>,
    s: Signed,
    Path(id): Path<u64>,
    Form(f): Form<TokenForm>,
) -> Done {
    authorised(&s, Role::Operator, &f.csrf, None)?;
    if !c.runs.abort(id) {
        return Err(PageError::NotFound(format!(
            "no bulk replay {id} in this console"
        )));
    }
    tracing::info!(run = id, operator = %s.name, "console bulk replay aborted");
    Ok(Redirect::to(&format!("/replays/{id}")).into_response())
}

/// The sign-in form.
#[derive(Debug, Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    next: String,
}

/// Where to go after signing in: a path of this console only (never another site).
fn local_path(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.starts_with("/\\") {
        next
    } else {
        "/"
    }
}

pub async fn sign_in(
    State(c): State<Arc<Console>>,
    jar: CookieJar,
    Form(f): Form<SignInForm>,
) -> Response {
    let pre = jar
        .get(PRE_COOKIE)
        .map(|k| k.value().to_owned())
        .unwrap_or_default();
    let next = local_path(&f.next).to_owned();
    if pre.is_empty() || !super::auth::token_matches(&c.sessions.sign_in_token(&pre), &f.token) {
        return pages::sign_in_page(
            &c,
            jar,
            &next,
            Some("The sign-in form expired; please sign in again."),
        );
    }
    let name = f.name.trim().to_owned();
    if let Some(left) = c.sign_ins.blocked(&name) {
        tracing::warn!(operator = %name, "console sign-in refused: too many failures");
        let minutes = left.as_secs().div_ceil(60);
        let mut page = pages::sign_in_page(
            &c,
            jar,
            &next,
            Some(&format!(
                "Too many failed sign-ins for this name: try again in {minutes} minute{}.",
                if minutes == 1 { "" } else { "s" }
            )),
        );
        *page.status_mut() = axum::http::StatusCode::TOO_MANY_REQUESTS;
        return page;
    }
    let checker = c.clone();
    let password = f.password;
    let who = name.clone();
    let role = tokio::task::spawn_blocking(move || checker.operators.verify(&who, &password))
        .await
        .ok()
        .flatten();
    match role {
        Some(role) => {
            c.sign_ins.succeeded(&name);
            let id = c.sessions.start(&name);
            tracing::info!(operator = %name, role = role.as_str(), "console sign-in");
            let jar = jar.remove(PRE_COOKIE).add(c.cookie(SESSION_COOKIE, id));
            (jar, Redirect::to(&next)).into_response()
        }
        None => {
            c.sign_ins.failed(&name);
            tracing::warn!(operator = %name, "console sign-in refused");
            pages::sign_in_page(&c, jar, &next, Some("Unknown name or wrong password."))
        }
    }
}

pub async fn sign_out(
    State(c): State<Arc<Console>>,
    s: Signed,
    jar: CookieJar,
    Form(f): Form<TokenForm>,
) -> Done {
    s.check_csrf(&f.csrf)?;
    if let Via::Session(id) = &s.via {
        c.sessions.end(id);
    }
    tracing::info!(operator = %s.name, "console sign-out");
    Ok((jar.remove(SESSION_COOKIE), Redirect::to("/sign-in")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_sign_in_only_a_local_path_is_followed() {
        assert_eq!(local_path("/jobs/R1"), "/jobs/R1");
        assert_eq!(local_path("https://evil.example/"), "/");
        assert_eq!(local_path("//evil.example/"), "/");
        assert_eq!(local_path("/\\evil.example"), "/");
    }

    fn form(outcome: &str, fee: &str) -> OutcomeForm {
        OutcomeForm {
            csrf: String::new(),
            outcome: outcome.into(),
            settlement_fee: fee.into(),
            note: None,
            evidence: None,
        }
    }

    #[test]
    fn a_settlement_fee_goes_with_succeeded_only() {
        assert_eq!(settlement(&form("succeeded", " 90 ")).unwrap(), Some(90));
        assert_eq!(settlement(&form("failed", "")).unwrap(), None);
        for (o, fee, field) in [
            ("succeeded", "", "settlement_fee"),
            ("succeeded", "-1", "settlement_fee"),
            ("succeeded", "9.5", "settlement_fee"),
            ("failed", "10", "settlement_fee"),
            ("paid", "", "outcome"),
        ] {
            match settlement(&form(o, fee)) {
                Err(PageError::BadInput(m)) => assert!(m.starts_with(field), "{o} {fee}: {m}"),
                other => panic!("{o} {fee}: {other:?}"),
            }
        }
    }
}
