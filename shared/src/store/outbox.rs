//! The outbox: events written with their transitions (and the answers to refused messages),
//! read and removed by the relay.

use sqlx::{PgConnection, PgPool, Row};

use super::StoreError;
use crate::events::OutcomeEvent;

/// An event waiting to be published.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: i64,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub age_ms: i64,
}

/// Writes an event to the outbox (inside the caller's transaction). The payload is stored
/// whole, `event_id` included, and the relay publishes it as stored: a copy sent again after a
/// crash is the same event.
pub async fn insert(conn: &mut PgConnection, event: &OutcomeEvent) -> Result<(), StoreError> {
    let payload = serde_json::to_value(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    sqlx::query("INSERT INTO outbox (routing_key, refund_no, payload) VALUES ($1, $2, $3)")
        .bind(event.event.routing_key())
        // The column is only for finding a refund's events; an answer to a message without a
        // readable refund_no is kept under '' (the payload says null).
        .bind(event.refund_no.as_deref().unwrap_or_default())
        .bind(payload)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Locks the oldest events not yet published, at most `limit`; other relays skip them.
pub async fn lock_oldest(conn: &mut PgConnection, limit: i64) -> Result<Vec<Pending>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, routing_key, payload::text AS payload,
                (extract(epoch FROM now() - created_at) * 1000)::bigint AS age_ms
         FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let payload: String = r.try_get("payload")?;
            Ok(Pending {
                id: r.try_get("id")?,
                routing_key: r.try_get("routing_key")?,
                payload: payload.into_bytes(),
                age_ms: r.try_get("age_ms")?,
            })
        })
        .collect()
}

/// Removes events the broker has confirmed.
pub async fn delete(conn: &mut PgConnection, ids: &[i64]) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Age in milliseconds of the oldest unpublished event (0 when empty).
pub async fn lag_ms(pool: &PgPool) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "SELECT COALESCE((extract(epoch FROM now() - min(created_at)) * 1000)::bigint, 0) AS lag
         FROM outbox",
    )
    .fetch_one(pool)
    .await?;
    Ok(row.try_get("lag")?)
}
