//! The sweeper's queries: a bounded round finds the recent jobs through `jobs_created_at`
//! without reading the table's history, and a full round finds the old open ones too.

use std::time::Duration;

use chrono::Utc;
use shared::store::sweep::{self, Scope};
use sqlx::{PgPool, Row};

/// Inserts `n` jobs in `state`, created `age` ago; an open one is due (its retry time or its
/// lease ended a minute ago).
async fn jobs(pool: &PgPool, prefix: &str, n: i64, state: &str, age: &str) -> anyhow::Result<()> {
    let due_column = match state {
        "retry_wait" => "next_attempt_at",
        "in_flight" => "lease_until",
        _ => "updated_at",
    };
    let sql = format!(
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee, request,
             content_hash, state, attempt, created_at, {due_column})
         SELECT no, 'O' || no, 'wupay', 'm', 1000, 100, jsonb_build_object('refund_no', no),
                sha256(convert_to(no, 'UTF8')), $2, 1, now() - $3::interval,
                now() - interval '1 minute'
         FROM (SELECT $1 || lpad(i::text, 8, '0') AS no FROM generate_series(1, $4) i) s"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(prefix)
        .bind(state)
        .bind(age)
        .bind(n)
        .execute(pool)
        .await?;
    Ok(())
}

/// Sequential and index scans of `jobs` so far, as the statistics collector has them.
async fn scans(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    let r = sqlx::query(
        "SELECT seq_scan, coalesce(idx_scan, 0) AS idx_scan FROM pg_stat_user_tables
         WHERE relname = 'jobs'",
    )
    .fetch_one(pool)
    .await?;
    Ok((r.try_get("seq_scan")?, r.try_get("idx_scan")?))
}

/// Makes this connection's pending statistics visible to the others.
async fn flush_stats(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await?;
    // The flush happens when the backend next goes idle: one more statement.
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

#[tokio::test]
async fn a_bounded_sweep_finds_recent_jobs_by_index_and_only_a_full_sweep_finds_old_open_ones()
-> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    // One connection, so that its statistics are the ones flushed.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await?;
    // The table's history: 50,000 finished jobs of last month.
    jobs(&pool, "DONE", 50_000, "succeeded", "30 days").await?;
    // Open jobs: old ones (a retry due and a lease expired two days ago) and recent ones.
    jobs(&pool, "OLDR", 1, "retry_wait", "2 days").await?;
    jobs(&pool, "OLDL", 1, "in_flight", "2 days").await?;
    jobs(&pool, "NEWR", 1, "retry_wait", "5 minutes").await?;
    jobs(&pool, "NEWL", 1, "in_flight", "5 minutes").await?;
    sqlx::query("ANALYZE jobs").execute(&pool).await?;

    let recent = Scope::CreatedSince(Utc::now() - chrono::Duration::hours(1));
    flush_stats(&pool).await?;
    let before = scans(&pool).await?;
    let due: Vec<String> = sweep::due(&pool, recent, Duration::from_secs(10), 100, &[])
        .await?
        .into_iter()
        .map(|d| d.refund_no)
        .collect();
    let expired = sweep::expired_leases(&pool, recent, 100).await?;
    let oldest = sweep::oldest_open(&pool, recent).await?;
    flush_stats(&pool).await?;
    let after = scans(&pool).await?;

    assert_eq!(due, vec!["NEWR00000001".to_owned()]);
    assert_eq!(
        expired
            .iter()
            .map(|e| e.refund_no.as_str())
            .collect::<Vec<_>>(),
        vec!["NEWL00000001"]
    );
    let oldest = oldest.expect("recent open jobs");
    assert!(
        Utc::now() - oldest < chrono::Duration::minutes(6),
        "{oldest}"
    );
    assert_eq!(
        after.0, before.0,
        "a bounded sweep read `jobs` sequentially (seq_scan {} -> {})",
        before.0, after.0
    );
    assert!(
        after.1 >= before.1 + 3,
        "index scans {before:?} -> {after:?}"
    );

    let mut due: Vec<String> = sweep::due(&pool, Scope::All, Duration::from_secs(10), 100, &[])
        .await?
        .into_iter()
        .map(|d| d.refund_no)
        .collect();
    due.sort();
    assert_eq!(due, vec!["NEWR00000001", "OLDR00000001"]);
    let mut expired: Vec<String> = sweep::expired_leases(&pool, Scope::All, 100)
        .await?
        .into_iter()
        .map(|e| e.refund_no)
        .collect();
    expired.sort();
    assert_eq!(expired, vec!["NEWL00000001", "OLDL00000001"]);
    let oldest = sweep::oldest_open(&pool, Scope::All)
        .await?
        .expect("old open jobs");
    assert!(Utc::now() - oldest > chrono::Duration::days(1), "{oldest}");
    Ok(())
}
