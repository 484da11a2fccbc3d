//! Merchant budgets: the shared call budget of `[[limits]]`, the slow-down a throttled
//! provider asks for, and the pause of a merchant whose provider is down (DESIGN §9, §11).
//!
//! One row per (provider, merchant) in `merchant_budgets`, shared by every worker replica.
//! Each function is one statement: the row is locked for that statement only, never across a
//! provider call. The arithmetic (GCRA) is in the migration that creates the table.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::store::StoreError;

/// Microseconds, as a query binds them (saturating).
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// What a take handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The first slot (in the past when the budget has burst credit).
    pub first_at: DateTime<Utc>,
    /// Between two slots; zero for a merchant without a limit (every slot is `first_at`).
    pub step: Duration,
    pub granted: u32,
    /// When the next slot after these falls: when to ask again.
    pub next_at: DateTime<Utc>,
    /// Set when the merchant is paused: nothing was granted.
    pub paused_until: Option<DateTime<Utc>>,
    /// The database's clock when it granted: slot times are on this clock.
    pub db_now: DateTime<Utc>,
}

impl Grant {
    /// When slot `k` (from 0) may be used.
    pub fn slot(&self, k: u32) -> DateTime<Utc> {
        let us = micros(self.step).saturating_mul(i64::from(k));
        self.first_at + chrono::Duration::microseconds(us)
    }
}

/// A merchant's row as operators see it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BudgetState {
    pub provider: String,
    pub merchant: String,
    /// Calls per second configured; `None` without a limit.
    pub rate_per_sec: Option<f64>,
    pub burst: i32,
    /// The fraction of the rate in force now, in thousandths (1000: not slowed down).
    pub permille: i32,
    pub paused_until: Option<DateTime<Utc>>,
    pub paused_since: Option<DateTime<Utc>>,
    pub pause_reason: Option<String>,
}

/// Records the configured limits: each (provider, merchant, calls per second, burst) gets its
/// row (its slow-down and pause kept); merchants in `unlimited` lose a limit they had.
pub async fn configure(
    pool: &PgPool,
    limits: &[(String, String, f64, u32)],
    unlimited: &[(String, String)],
) -> Result<(), StoreError> {
    let mut provider = Vec::new();
    let mut merchant = Vec::new();
    let mut interval = Vec::new();
    let mut burst = Vec::new();
    for (p, m, rate, b) in limits {
        provider.push(p.as_str());
        merchant.push(m.as_str());
        // Validated positive and finite by the configuration; at least 1 µs.
        interval.push(((1_000_000.0 / rate).round() as i64).max(1));
        burst.push(i32::try_from(*b).unwrap_or(i32::MAX));
    }
    let (up, um): (Vec<&str>, Vec<&str>) = unlimited
        .iter()
        .map(|(p, m)| (p.as_str(), m.as_str()))
        .unzip();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO merchant_budgets (provider, merchant, interval_us, burst)
         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int4[])
         ON CONFLICT (provider, merchant) DO UPDATE
            SET interval_us = EXCLUDED.interval_us, burst = EXCLUDED.burst, updated_at = now()
          WHERE merchant_budgets.interval_us IS DISTINCT FROM EXCLUDED.interval_us
             OR merchant_budgets.burst <> EXCLUDED.burst",
    )
    .bind(&provider)
    .bind(&merchant)
    .bind(&interval)
    .bind(&burst)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE merchant_budgets b SET interval_us = NULL, updated_at = now()
         FROM unnest($1::text[], $2::text[]) AS u(provider, merchant)
         WHERE b.provider = u.provider AND b.merchant = u.merchant AND b.interval_us IS NOT NULL",
    )
    .bind(&up)
    .bind(&um)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// When slots may fall: none sooner than `lead` from now, at most `ahead` beyond that, and the
/// burst credit less `slack` (how late after its slot a call may leave).
#[derive(Debug, Clone, Copy)]
pub struct Reach {
    pub lead: Duration,
    pub ahead: Duration,
    pub slack: Duration,
}

/// Takes up to `want` call slots for a merchant within `reach`.
pub async fn take(
    pool: &PgPool,
    provider: &str,
    merchant: &str,
    want: u32,
    reach: Reach,
    recover: Duration,
) -> Result<Grant, StoreError> {
    let row = sqlx::query(
        "SELECT first_at, step_us, granted, next_at, paused_until, db_now
         FROM budget_take($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(provider)
    .bind(merchant)
    .bind(i32::try_from(want).unwrap_or(i32::MAX))
    .bind(micros(reach.lead))
    .bind(micros(reach.ahead))
    .bind(micros(recover))
    .bind(micros(reach.slack))
    .fetch_one(pool)
    .await?;
    let step: i64 = row.try_get("step_us")?;
    let granted: i32 = row.try_get("granted")?;
    Ok(Grant {
        first_at: row.try_get("first_at")?,
        step: Duration::from_micros(u64::try_from(step).unwrap_or(0)),
        granted: u32::try_from(granted).unwrap_or(0),
        next_at: row.try_get("next_at")?,
        paused_until: row.try_get("paused_until")?,
        db_now: row.try_get("db_now")?,
    })
}

/// Halves a limited merchant's rate after a throttled answer (at most once per `debounce`
/// across replicas, not below `min_permille`); the fraction now in force, `None` without a
/// limit.
pub async fn slow_down(
    pool: &PgPool,
    provider: &str,
    merchant: &str,
    min_permille: i32,
    recover: Duration,
    debounce: Duration,
) -> Result<Option<i32>, StoreError> {
    Ok(sqlx::query_scalar("SELECT budget_slow($1, $2, $3, $4, $5)")
        .bind(provider)
        .bind(merchant)
        .bind(min_permille)
        .bind(micros(recover))
        .bind(micros(debounce))
        .fetch_one(pool)
        .await?)
}

/// Pauses a merchant until `probe_in` from now (kept if already paused longer); when it is now
/// paused until.
pub async fn pause(
    pool: &PgPool,
    provider: &str,
    merchant: &str,
    probe_in: Duration,
    reason: &str,
) -> Result<DateTime<Utc>, StoreError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO merchant_budgets AS b (provider, merchant, paused_until, paused_since, pause_reason)
         VALUES ($1, $2, clock_timestamp() + $3 * interval '1 microsecond', clock_timestamp(), $4)
         ON CONFLICT (provider, merchant) DO UPDATE
            SET paused_until = greatest(b.paused_until, EXCLUDED.paused_until),
                paused_since = coalesce(b.paused_since, EXCLUDED.paused_since),
                pause_reason = coalesce(b.pause_reason, EXCLUDED.pause_reason),
                updated_at = now()
         RETURNING paused_until",
    )
    .bind(provider)
    .bind(merchant)
    .bind(micros(probe_in))
    .bind(reason)
    .fetch_one(pool)
    .await?)
}

/// Claims the next probe of a paused merchant whose pause has run out (one replica wins: the
/// pause moves on by `probe_in`); whether this caller may send the probe, and until when the
/// merchant is paused (`None` when it is not paused any more).
pub async fn probe(
    pool: &PgPool,
    provider: &str,
    merchant: &str,
    probe_in: Duration,
) -> Result<(bool, Option<DateTime<Utc>>), StoreError> {
    let won: Option<DateTime<Utc>> = sqlx::query_scalar(
        "UPDATE merchant_budgets
            SET paused_until = clock_timestamp() + $3 * interval '1 microsecond', updated_at = now()
          WHERE provider = $1 AND merchant = $2 AND paused_until <= clock_timestamp()
          RETURNING paused_until",
    )
    .bind(provider)
    .bind(merchant)
    .bind(micros(probe_in))
    .fetch_optional(pool)
    .await?;
    if let Some(until) = won {
        return Ok((true, Some(until)));
    }
    let until: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
        "SELECT paused_until FROM merchant_budgets WHERE provider = $1 AND merchant = $2",
    )
    .bind(provider)
    .bind(merchant)
    .fetch_optional(pool)
    .await?;
    Ok((false, until.flatten()))
}

/// Ends a merchant's pause (a probe was answered); whether it was paused.
pub async fn resume(pool: &PgPool, provider: &str, merchant: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE merchant_budgets
            SET paused_until = NULL, paused_since = NULL, pause_reason = NULL, updated_at = now()
          WHERE provider = $1 AND merchant = $2 AND paused_until IS NOT NULL",
    )
    .bind(provider)
    .bind(merchant)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Every merchant's budget row, with the slow-down in force after `recover`.
pub async fn states(pool: &PgPool, recover: Duration) -> Result<Vec<BudgetState>, StoreError> {
    let rows = sqlx::query(
        "SELECT provider, merchant, interval_us, burst, paused_until, paused_since, pause_reason,
                budget_permille(b, clock_timestamp(), $1) AS permille
         FROM merchant_budgets b ORDER BY provider, merchant",
    )
    .bind(micros(recover))
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            let interval: Option<i64> = r.try_get("interval_us")?;
            Ok(BudgetState {
                provider: r.try_get("provider")?,
                merchant: r.try_get("merchant")?,
                rate_per_sec: interval.filter(|i| *i > 0).map(|i| 1_000_000.0 / i as f64),
                burst: r.try_get("burst")?,
                permille: r.try_get("permille")?,
                paused_until: r.try_get("paused_until")?,
                paused_since: r.try_get("paused_since")?,
                pause_reason: r.try_get("pause_reason")?,
            })
        })
        .collect()
}
