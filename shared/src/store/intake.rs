//! Intake: turning one broker message into exactly one effect.
//!
//! Each message becomes a new job, a duplicate (same `refund_no`, same content: no effect), a
//! conflict (same `refund_no`, different content: stored, never sent) or a rejection (invalid,
//! unknown merchant, over the order's total: stored with its raw bytes). The caller runs this
//! inside a transaction and acks the message only after that transaction commits, so a crash at
//! any point either leaves no trace (the message is redelivered) or a complete one.
//!
//! Every message that does not create a job is answered, in the same transaction, with an
//! event carrying its [`ErrorCode`](crate::job::ErrorCode) (docs/events.md): `refund.rejected`
//! when it names a well-formed `refund_no` that no job has (that refund stands rejected), and
//! `request.refused` otherwise — a conflict, a body with no readable `refund_no`, a malformed
//! copy of a live job's request — so that no answer can be read as the state of an existing
//! job. A new job and a duplicate are answered by the job's own events.

use sha2::{Digest, Sha256};
use sqlx::{PgConnection, Row};

use super::StoreError;
use super::text::{bounded, storable, storable_opt};
use crate::events::{EventKind, OutcomeEvent};
use crate::job::{
    ErrorCode, MAX_MESSAGE_BYTES, ProviderKind, RefundRequest, Rejection, WHOLE_MESSAGE,
    content_hash_of, parse_request, read_what_parses,
};
use crate::provider::Admission;
use crate::state::State;

/// How much of a body over [`MAX_MESSAGE_BYTES`] is stored: enough to see what sent it
/// (its SHA-256 and length are of the whole body). A rejected body within the limit is stored
/// whole, so an SRE can read exactly what was refused; an oversized one is not, or a stream
/// of them would fill the database with what the limit exists to keep out.
pub const OVERSIZED_PREFIX_BYTES: usize = 4096;

/// Decides whether a request may be taken in (its merchant is configured and its protocol can
/// carry it) and what is recorded of the merchant with the job.
pub type Admit<'a> = dyn Fn(&RefundRequest) -> Result<Admission, Rejection> + Sync + 'a;

/// A message as it came off the broker.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    pub body: &'a [u8],
    pub message_id: Option<&'a str>,
    /// The broker says this delivery may have been seen before (so a stored rejection of the
    /// same bytes is this message again, not a new occurrence).
    pub redelivered: bool,
}

/// What intake did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntakeResult {
    /// A new job in `received`, of this provider and merchant.
    Created {
        refund_no: String,
        provider: ProviderKind,
        merchant: String,
    },
    /// The same request again: nothing changed.
    Duplicate {
        refund_no: String,
        state: State,
        provider: ProviderKind,
        merchant: String,
    },
    /// Same `refund_no`, different content: stored as a conflict, never sent.
    Conflict { refund_no: String },
    /// Refused: stored with its reason.
    Rejected {
        rejection: Rejection,
        refund_no: Option<String>,
    },
}

impl IntakeResult {
    /// Whether the message belongs in the dead-letter queue.
    pub fn is_poison(&self) -> bool {
        matches!(
            self,
            IntakeResult::Conflict { .. } | IntakeResult::Rejected { .. }
        )
    }

    pub fn label(&self) -> &'static str {
        match self {
            IntakeResult::Created { .. } => "created",
            IntakeResult::Duplicate { .. } => "duplicate",
            IntakeResult::Conflict { .. } => "conflict",
            IntakeResult::Rejected { .. } => "rejected",
        }
    }
}

/// Takes in one message: validate, then create, dedupe, or store the conflict or rejection.
pub async fn take(
    conn: &mut PgConnection,
    msg: &Incoming<'_>,
    admit: &Admit<'_>,
    tz: chrono_tz::Tz,
) -> Result<IntakeResult, StoreError> {
    let request = match parse_request(msg.body) {
        Ok(r) => r,
        Err(rejection) => return reject(conn, msg, rejection, tz).await,
    };
    let admission = match admit(&request) {
        Ok(a) => a,
        Err(rejection) => return reject(conn, msg, rejection, tz).await,
    };
    let hash = request.content_hash();
    if insert_job(conn, &request, &hash, admission).await? {
        if let Some(rejection) = reserve_order_amount(conn, &request).await? {
            delete_new_job(conn, &request.refund_no).await?;
            return reject(conn, msg, rejection, tz).await;
        }
        insert_intake_history(conn, &request.refund_no).await?;
        return Ok(IntakeResult::Created {
            refund_no: request.refund_no,
            provider: request.provider,
            merchant: request.merchant,
        });
    }
    let (existing_hash, state) = existing(conn, &request.refund_no).await?;
    if existing_hash.as_slice() == hash.as_slice() {
        return Ok(IntakeResult::Duplicate {
            refund_no: request.refund_no,
            state,
            provider: request.provider,
            merchant: request.merchant,
        });
    }
    let reason = format!(
        "refund_no {} already exists (state {state}) with different content",
        request.refund_no
    );
    let rejection = Rejection::new(ErrorCode::Conflict, "refund_no", reason);
    let first =
        store_rejection(conn, msg, "conflict", Some(&request.refund_no), &rejection).await?;
    // Never `refund.rejected`: that would say the live job of this refund_no was rejected.
    if answers(first, msg) {
        let event = OutcomeEvent::refusal(
            EventKind::Refused,
            &read_what_parses(msg.body),
            &rejection,
            tz,
        );
        super::outbox::insert(conn, &event).await?;
    }
    Ok(IntakeResult::Conflict {
        refund_no: request.refund_no,
    })
}

/// Takes in a batch of messages, with the same effect as [`take`] on each in turn.
///
/// The common case — a valid request for a new `refund_no` of an order not otherwise in the
/// batch — is done for all such messages at once: one statement reserves their orders' amounts,
/// inserts the jobs that got their reservation, and writes their history. Everything else (an
/// invalid message, a `refund_no` that exists, an order over its total, a second message for the
/// same `refund_no` or order in this batch) goes through [`take`] afterwards, in message order,
/// so it sees the new jobs as it would have one by one. The statement runs in a savepoint: if
/// a concurrent worker inserted one of the jobs first (its order amount must not stay
/// reserved) or the statement fails for any reason but the connection's, it is undone and
/// every message goes through [`take`].
pub async fn take_batch(
    conn: &mut PgConnection,
    msgs: &[Incoming<'_>],
    admit: &Admit<'_>,
    tz: chrono_tz::Tz,
) -> Result<Vec<IntakeResult>, StoreError> {
    let mut results: Vec<Option<IntakeResult>> = vec![None; msgs.len()];
    let mut fast: Vec<(usize, RefundRequest, Admission)> = Vec::new();
    let mut seen_refunds = std::collections::HashSet::new();
    let mut seen_orders = std::collections::HashSet::new();
    for (i, msg) in msgs.iter().enumerate() {
        let Ok(r) = parse_request(msg.body) else {
            continue;
        };
        let Ok(admission) = admit(&r) else {
            continue;
        };
        // `insert` on both sets, so a later copy of either key stays on the slow path.
        let new_refund = seen_refunds.insert(r.refund_no.clone());
        let new_order = seen_orders.insert(r.order_no.clone());
        if new_refund && new_order {
            fast.push((i, r, admission));
        }
    }
    if !fast.is_empty() {
        let mut sp = sqlx::Acquire::begin(&mut *conn).await?;
        match insert_new_jobs(&mut sp, &fast).await {
            Ok(Some(created)) => {
                sp.commit().await?;
                for ((i, r, _), created) in fast.iter().zip(created) {
                    if created {
                        results[*i] = Some(IntakeResult::Created {
                            refund_no: r.refund_no.clone(),
                            provider: r.provider,
                            merchant: r.merchant.clone(),
                        });
                    }
                }
            }
            Ok(None) => sp.rollback().await?,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "batched intake failed; taking the messages one by one");
                sp.rollback().await?;
            }
        }
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (msg, done) in msgs.iter().zip(results) {
        out.push(match done {
            Some(r) => r,
            None => take(conn, msg, admit, tz).await?,
        });
    }
    Ok(out)
}

/// The batched part of [`take_batch`]: per request whether its job was created (its order had
/// room and its `refund_no` was new), or `None` if a concurrent insert won a race and the
/// savepoint must be rolled back.
async fn insert_new_jobs(
    conn: &mut PgConnection,
    fast: &[(usize, RefundRequest, Admission)],
) -> Result<Option<Vec<bool>>, StoreError> {
    let n = fast.len();
    let mut refund_no = Vec::with_capacity(n);
    let mut order_no = Vec::with_capacity(n);
    let mut provider = Vec::with_capacity(n);
    let mut merchant = Vec::with_capacity(n);
    let mut total_fee = Vec::with_capacity(n);
    let mut refund_fee = Vec::with_capacity(n);
    let mut request = Vec::with_capacity(n);
    let mut hash = Vec::with_capacity(n);
    let mut idempotent = Vec::with_capacity(n);
    for (_, r, admission) in fast {
        idempotent.push(admission.idempotent);
        let json = r.canonical_json();
        hash.push(content_hash_of(&json).to_vec());
        request.push(json);
        refund_no.push(r.refund_no.as_str());
        order_no.push(r.order_no.as_str());
        provider.push(r.provider.as_str());
        merchant.push(r.merchant.as_str());
        total_fee.push(r.total_fee);
        refund_fee.push(r.refund_fee);
    }
    let rows = sqlx::query(
        "WITH r AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[],
                 $6::int8[], $7::text[], $8::bytea[], $9::bool[])
               WITH ORDINALITY AS r(refund_no, order_no, provider, merchant, total_fee,
                    refund_fee, request, content_hash, idempotent, n)
         ), fresh AS (
             SELECT r.* FROM r
             WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.refund_no = r.refund_no)
         ), ord AS (
             INSERT INTO orders (order_no, total_fee, committed_fee)
             SELECT order_no, total_fee, refund_fee FROM fresh
             ON CONFLICT (order_no) DO UPDATE
                 SET committed_fee = orders.committed_fee + EXCLUDED.committed_fee
                 WHERE orders.total_fee = EXCLUDED.total_fee
                   AND orders.committed_fee + EXCLUDED.committed_fee <= orders.total_fee
             RETURNING order_no
         ), ins AS (
             INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee,
                 request, content_hash, state, idempotent)
             SELECT f.refund_no, f.order_no, f.provider, f.merchant, f.total_fee, f.refund_fee,
                    f.request::jsonb, f.content_hash, 'received', f.idempotent
             FROM fresh f JOIN ord USING (order_no)
             ON CONFLICT (refund_no) DO NOTHING
             RETURNING refund_no
         ), hist AS (
             INSERT INTO job_transitions (refund_no, from_state, to_state, attempt, actor)
             SELECT refund_no, NULL, 'received', 0, 'intake' FROM ins
         )
         SELECT (o.order_no IS NOT NULL AND f.refund_no IS NOT NULL) AS reserved,
                (i.refund_no IS NOT NULL) AS created
         FROM r
         LEFT JOIN fresh f ON f.n = r.n
         LEFT JOIN ord o ON o.order_no = f.order_no
         LEFT JOIN ins i ON i.refund_no = f.refund_no
         ORDER BY r.n",
    )
    .persistent(false)
    .bind(&refund_no)
    .bind(&order_no)
    .bind(&provider)
    .bind(&merchant)
    .bind(&total_fee)
    .bind(&refund_fee)
    .bind(&request)
    .bind(&hash)
    .bind(&idempotent)
    .fetch_all(&mut *conn)
    .await?;
    let mut created = Vec::with_capacity(n);
    for row in rows {
        let reserved: bool = row.try_get("reserved")?;
        let done: bool = row.try_get("created")?;
        if reserved && !done {
            // Someone inserted this refund_no after our check: its reservation must go.
            return Ok(None);
        }
        created.push(done);
    }
    if created.len() != n {
        return Err(StoreError::Corrupt(format!(
            "batched intake answered {} rows for {n} requests",
            created.len()
        )));
    }
    Ok(Some(created))
}

/// Stores a rejected message and answers it: `refund.rejected` when it names a `refund_no`
/// that no job has, else `request.refused` (a malformed copy of a valid request must not
/// announce that the live refund was rejected).
async fn reject(
    conn: &mut PgConnection,
    msg: &Incoming<'_>,
    rejection: Rejection,
    tz: chrono_tz::Tz,
) -> Result<IntakeResult, StoreError> {
    let read = read_what_parses(msg.body);
    let refund_no = read.refund_no.clone();
    let first = store_rejection(conn, msg, "rejected", refund_no.as_deref(), &rejection).await?;
    if answers(first, msg) {
        let kind = match &refund_no {
            Some(no) if !job_exists(conn, no).await? => EventKind::Rejected,
            _ => EventKind::Refused,
        };
        let event = OutcomeEvent::refusal(kind, &read, &rejection, tz);
        super::outbox::insert(conn, &event).await?;
    }
    Ok(IntakeResult::Rejected {
        rejection,
        refund_no,
    })
}

/// Whether a stored refused message is answered now: the first time its bytes are seen, and
/// each time they are published again, but not when the broker redelivers a message whose
/// transaction (and answer) had committed before its ack was lost.
fn answers(first_seen: bool, msg: &Incoming<'_>) -> bool {
    first_seen || !msg.redelivered
}

/// Inserts a new job in `received`; false if the `refund_no` exists.
async fn insert_job(
    conn: &mut PgConnection,
    r: &RefundRequest,
    hash: &[u8; 32],
    admission: Admission,
) -> Result<bool, StoreError> {
    let request = serde_json::to_value(r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let inserted = sqlx::query(
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee,
             request, content_hash, state, idempotent)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'received', $9)
         ON CONFLICT (refund_no) DO NOTHING",
    )
    .bind(&r.refund_no)
    .bind(&r.order_no)
    .bind(r.provider.as_str())
    .bind(&r.merchant)
    .bind(r.total_fee)
    .bind(r.refund_fee)
    .bind(request)
    .bind(hash.as_slice())
    .bind(admission.idempotent)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Adds a refund to its order's committed total under the order's row lock; the rejection if
/// the order's total differs or would be exceeded.
async fn reserve_order_amount(
    conn: &mut PgConnection,
    r: &RefundRequest,
) -> Result<Option<Rejection>, StoreError> {
    let reserved = sqlx::query(
        "INSERT INTO orders (order_no, total_fee, committed_fee) VALUES ($1, $2, $3)
         ON CONFLICT (order_no) DO UPDATE
             SET committed_fee = orders.committed_fee + EXCLUDED.committed_fee
             WHERE orders.total_fee = EXCLUDED.total_fee
               AND orders.committed_fee + EXCLUDED.committed_fee <= orders.total_fee
         RETURNING committed_fee",
    )
    .bind(&r.order_no)
    .bind(r.total_fee)
    .bind(r.refund_fee)
    .fetch_optional(&mut *conn)
    .await?;
    if reserved.is_some() {
        return Ok(None);
    }
    let row = sqlx::query("SELECT total_fee, committed_fee FROM orders WHERE order_no = $1")
        .bind(&r.order_no)
        .fetch_one(&mut *conn)
        .await?;
    let total: i64 = row.try_get("total_fee")?;
    let committed: i64 = row.try_get("committed_fee")?;
    Ok(Some(if total != r.total_fee {
        Rejection::new(
            ErrorCode::OrderTotalMismatch,
            "total_fee",
            format!(
                "{} differs from total_fee {total} of earlier refunds of order {}",
                r.total_fee, r.order_no
            ),
        )
    } else {
        Rejection::new(
            ErrorCode::OverOrderTotal,
            "refund_fee",
            format!(
                "{} would take refunds of order {} to {} fen, over its total_fee {total} \
                 ({committed} already committed)",
                r.refund_fee,
                r.order_no,
                committed.saturating_add(r.refund_fee)
            ),
        )
    }))
}

/// Removes a job inserted by this same transaction (its order refused it).
async fn delete_new_job(conn: &mut PgConnection, refund_no: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM jobs WHERE refund_no = $1 AND state = 'received' AND attempt = 0")
        .bind(refund_no)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Appends the job's first history row (intake → received).
async fn insert_intake_history(conn: &mut PgConnection, refund_no: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO job_transitions (refund_no, from_state, to_state, attempt, actor)
         VALUES ($1, NULL, 'received', 0, 'intake')",
    )
    .bind(refund_no)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The stored content hash and state of an existing job.
async fn existing(
    conn: &mut PgConnection,
    refund_no: &str,
) -> Result<(Vec<u8>, State), StoreError> {
    let row = sqlx::query("SELECT content_hash, state FROM jobs WHERE refund_no = $1")
        .bind(refund_no)
        .fetch_one(&mut *conn)
        .await?;
    let state: String = row.try_get("state")?;
    Ok((
        row.try_get("content_hash")?,
        state.parse().map_err(StoreError::Corrupt)?,
    ))
}

/// Whether a job with this `refund_no` exists.
async fn job_exists(conn: &mut PgConnection, refund_no: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query("SELECT 1 FROM jobs WHERE refund_no = $1")
        .bind(refund_no)
        .fetch_optional(&mut *conn)
        .await?
        .is_some())
}

/// Stores a rejected or conflicting message with its raw bytes (all of them within
/// [`MAX_MESSAGE_BYTES`], else the first [`OVERSIZED_PREFIX_BYTES`]; the SHA-256 and length
/// of all), its error code, and every
/// text escaped as PostgreSQL can store it; true the first time these bytes are seen. A
/// redelivery updates `last_seen_at` only; a new publish of identical bytes also counts an
/// occurrence.
async fn store_rejection(
    conn: &mut PgConnection,
    msg: &Incoming<'_>,
    kind: &str,
    refund_no: Option<&str>,
    rejection: &Rejection,
) -> Result<bool, StoreError> {
    let sha: [u8; 32] = Sha256::digest(msg.body).into();
    let keep = if msg.body.len() > MAX_MESSAGE_BYTES {
        OVERSIZED_PREFIX_BYTES
    } else {
        MAX_MESSAGE_BYTES
    };
    let (body, _) = bounded(msg.body, keep);
    let row = sqlx::query(
        "INSERT INTO rejected_messages (kind, refund_no, field, reason, body, body_sha256,
             message_id, body_bytes, error_code)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $9, $10)
         ON CONFLICT (body_sha256) DO UPDATE
             SET last_seen_at = now(),
                 occurrences = rejected_messages.occurrences + CASE WHEN $8 THEN 0 ELSE 1 END
         RETURNING (xmax = 0) AS inserted",
    )
    .bind(kind)
    .bind(refund_no.map(storable))
    .bind(storable(&rejection.field))
    .bind(storable(&rejection.reason))
    .bind(body)
    .bind(sha.as_slice())
    .bind(storable_opt(msg.message_id))
    .bind(msg.redelivered)
    .bind(i64::try_from(msg.body.len()).unwrap_or(i64::MAX))
    .bind(rejection.code.as_str())
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.try_get("inserted")?)
}

/// Stores a message whose effect could not be written (for a reason that is not the
/// connection's) as a rejection of the whole message, with the error as its reason, so that it
/// is dead-lettered and the messages after it go on; it is answered with `request.refused`
/// (whether its refund was taken in cannot be known from here).
pub async fn store_unstorable(
    conn: &mut PgConnection,
    msg: &Incoming<'_>,
    error: &str,
    tz: chrono_tz::Tz,
) -> Result<IntakeResult, StoreError> {
    let read = read_what_parses(msg.body);
    let result = unstorable_result(error);
    if let IntakeResult::Rejected { rejection, .. } = &result {
        let first =
            store_rejection(conn, msg, "rejected", read.refund_no.as_deref(), rejection).await?;
        if answers(first, msg) {
            let event = OutcomeEvent::refusal(EventKind::Refused, &read, rejection, tz);
            super::outbox::insert(conn, &event).await?;
        }
    }
    Ok(result)
}

/// The intake result of a message that could not be taken in because of `error`.
pub fn unstorable_result(error: &str) -> IntakeResult {
    IntakeResult::Rejected {
        rejection: Rejection::new(
            ErrorCode::Unstorable,
            WHOLE_MESSAGE,
            format!("the message could not be stored as it came: {error}"),
        ),
        refund_no: None,
    }
}
