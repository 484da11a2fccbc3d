//! The shortcut (fingerprints per merchant, then per bucket) must give exactly the answer of
//! comparing every refund one by one.

mod common;

use common::*;
use reconciler::progress::Progress;
use reconciler::run::{BUCKET, BUCKETS, FP_STATEMENT, RunRequest, run};

const DAY: &str = "2026-11-10";

async fn compare(env: &Env, statements: Vec<std::path::PathBuf>) -> usize {
    let mut req = RunRequest::new(date(DAY));
    req.statements = statements;
    let fast = run(env.pool(), &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    req.exhaustive = true;
    let slow = run(env.pool(), &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(slow.drilled_pairs, 8);
    let a = discrepancies(env.pool(), fast.run_id).await;
    let b = discrepancies(env.pool(), slow.run_id).await;
    assert_eq!(a, b);
    assert_eq!(fast.totals, slow.totals);
    assert!(
        fast.drilled_buckets < slow.drilled_buckets,
        "{} {}",
        fast.drilled_buckets,
        slow.drilled_buckets
    );
    assert!(
        fast.drilled_refunds < slow.drilled_refunds,
        "{} {}",
        fast.drilled_refunds,
        slow.drilled_refunds
    );
    assert_discrepancies_explain_diffs(env.pool(), fast.run_id).await;
    a.len()
}

/// Reversals of every `n`th ledger entry booked before 23:00, full for even ids, of one fen
/// for odd ones.
async fn reverse_every(pool: &sqlx::PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
             refund_fee, settlement_refund_fee, business_date, source, reverses, booked_at)
         SELECT refund_no, 'reversal', provider, merchant, provider_refund_id,
                -CASE WHEN id % 2 = 0 THEN refund_fee ELSE 1 END,
                -CASE WHEN id % 2 = 0 THEN settlement_refund_fee ELSE 1 END,
                business_date, 'manual', id, booked_at + interval '1 second'
         FROM ledger WHERE id % $2 = 0 AND booked_at < $1",
    )
    .bind(local("2026-11-10 23:00:00"))
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shortcut_and_the_exhaustive_comparison_agree_against_a_statement() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "E", date(DAY), 20_000, false).await;
    reverse_every(pool, 1009).await;
    // The statement: dropped, doubled, changed and foreign rows.
    let path = env.path("s.csv");
    let sql = format!(
        "COPY (
           SELECT provider, merchant, refund_no, coalesce(provider_refund_id, '') AS provider_refund_id,
                  refund_fee,
                  settlement_refund_fee + CASE WHEN n % 613 = 0 AND settlement_refund_fee > 0 THEN -1
                                               WHEN n % 617 = 0 AND settlement_refund_fee < refund_fee THEN 1
                                               ELSE 0 END AS settlement_refund_fee,
                  to_char(booked_at AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+08:00\"') AS refunded_at
           FROM (SELECT l.*, row_number() OVER (ORDER BY id) AS n FROM ledger l
                 WHERE entry_kind = 'refund' AND business_date = '{DAY}') x
           CROSS JOIN generate_series(1, CASE WHEN n % 701 = 0 THEN 2 ELSE 1 END)
           WHERE n % 499 <> 0
           UNION ALL
           SELECT 'shengpay', 'm' || (i % 4), 'F' || i, 'RO-F' || i, 100, 90,
                  to_char(('{DAY}'::timestamp + i * interval '7 minutes'), 'YYYY-MM-DD\"T\"HH24:MI:SS\"+08:00\"')
           FROM generate_series(1, 30) i
         ) TO STDOUT WITH (FORMAT csv, HEADER true)"
    );
    let mut conn = pool.acquire().await.unwrap();
    let mut stream = conn.copy_out_raw(&sql).await.unwrap();
    let mut bytes = Vec::new();
    use futures::TryStreamExt;
    while let Some(c) = stream.try_next().await.unwrap() {
        bytes.extend_from_slice(&c);
    }
    drop(stream);
    drop(conn);
    std::fs::write(&path, bytes).unwrap();
    let found = compare(&env, vec![path]).await;
    assert!(found > 100, "{found}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shortcut_and_the_exhaustive_comparison_agree_against_attempts() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "Q", date(DAY), 20_000, false).await;
    sqlx::query(
        "INSERT INTO provider_attempts (refund_no, attempt, provider, merchant, outcome, request,
             latency_us, provider_refund_id, refund_fee, settlement_refund_fee, coupon_refund_fee,
             fenced, recorded_at)
         SELECT refund_no, k, provider, merchant, 'accepted', '{}', 1000,
                CASE WHEN k = 2 AND n % 3 = 0 THEN provider_refund_id || '-B' ELSE provider_refund_id END,
                refund_fee,
                settlement_refund_fee + CASE WHEN n % 641 = 0 AND settlement_refund_fee > 0 THEN -1 ELSE 0 END,
                0, k = 1 AND n % 89 = 0, booked_at - interval '100 milliseconds' + (k - 1) * interval '1 second'
         FROM (SELECT l.*, row_number() OVER (ORDER BY id) AS n FROM ledger l) x
         CROSS JOIN generate_series(1, CASE WHEN n % 89 = 0 THEN 2 ELSE 1 END) k
         WHERE n % 509 <> 0 AND booked_at < $1",
    )
    .bind(local("2026-11-10 23:59:00"))
    .execute(pool)
    .await
    .unwrap();
    // A second payment of another amount beside one that matches the ledger: the refund is
    // compared whole, though one of its attempts has a partner.
    sqlx::query(
        "INSERT INTO provider_attempts (refund_no, attempt, provider, merchant, outcome, request,
             latency_us, provider_refund_id, refund_fee, settlement_refund_fee, coupon_refund_fee,
             fenced, recorded_at)
         SELECT refund_no, 7, provider, merchant, 'accepted', '{}', 1000,
                provider_refund_id || '-C', refund_fee, settlement_refund_fee - 1, 0, false,
                booked_at + interval '2 seconds'
         FROM (SELECT l.*, row_number() OVER (ORDER BY id) AS n FROM ledger l) x
         WHERE n % 97 = 0 AND settlement_refund_fee > 0 AND booked_at < $1",
    )
    .bind(local("2026-11-10 23:00:00"))
    .execute(pool)
    .await
    .unwrap();
    reverse_every(pool, 1013).await;
    let found = compare(&env, Vec::new()).await;
    assert!(found > 50, "{found}");

    // The attempts of a day in another time zone are found by a range of recorded_at instead
    // of the index on Shanghai dates; Singapore's days are Shanghai's (UTC+8 all year), so the
    // answer must be the same.
    let req = RunRequest::new(date(DAY));
    let indexed = run(env.pool(), &env.config, &req, &Progress::hidden())
        .await
        .unwrap();
    let mut singapore = env.config.clone();
    singapore.timezone = "Asia/Singapore".into();
    let ranged = run(env.pool(), &singapore, &req, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(
        discrepancies(env.pool(), indexed.run_id).await,
        discrepancies(env.pool(), ranged.run_id).await
    );
    assert_eq!(indexed.totals, ranged.totals);
}

#[tokio::test(flavor = "multi_thread")]
async fn statements_are_bucketed_and_fingerprinted_as_the_tables_store_it() {
    let env = env().await;
    let pool = env.pool();
    seed_day(pool, "H", date(DAY), 3_000, true).await;
    let (ledger, attempts, buckets): (i64, i64, i64) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT (SELECT count(*) FROM ledger
                 WHERE recon_bucket <> {BUCKET} OR recon_fp <> {FP_STATEMENT}
                    OR recon_bucket >= {BUCKETS}),
                (SELECT count(*) FROM provider_attempts
                 WHERE recon_bucket <> {BUCKET}
                    OR recon_fp <> hashtextextended(refund_no, coalesce(settlement_refund_fee, 0)
                                   # hashtextextended(provider || '/' || merchant, 0))),
                (SELECT count(DISTINCT recon_bucket) FROM ledger)"
        )))
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!((ledger, attempts), (0, 0));
    // 3,000 refunds fill about 95% of 1,024 buckets.
    assert!(buckets > i64::from(BUCKETS) * 9 / 10, "{buckets}");
}
