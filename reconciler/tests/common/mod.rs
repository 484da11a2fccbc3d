//! Shared by the reconciler's tests: a database of one's own (testkit), a config file
//! pointing at it, and quick generators of a day's refunds.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use futures::TryStreamExt;
use shared::config::Config;
use sqlx::PgPool;
use testkit::TestDb;

pub const TZ: chrono_tz::Tz = chrono_tz::Asia::Shanghai;

/// A test's database, config and scratch directory.
pub struct Env {
    pub db: TestDb,
    pub config: Config,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the binary with `args` after `run --config <file>`.
    pub fn run_bin(&self, args: &[&str]) -> Output {
        let mut all = vec!["run", "--config", self.config_path.to_str().unwrap()];
        all.extend_from_slice(args);
        bin(&all)
    }
}

/// Runs `refund-reconciler` with `args`.
pub fn bin(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_refund-reconciler"))
        .args(args)
        .env_remove("REFUNDS_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .expect("refund-reconciler runs")
}

pub fn toml(url: &str, grace: u32) -> String {
    format!(
        "database_url = \"{url}\"\ntimezone = \"Asia/Shanghai\"\n\n[database]\n\
         migrate_on_start = false\nmax_connections = 4\n\n\
         # The tests serve statements from a local plain-http server.\n\
         [http]\nallow_plain_http = true\n\n[reconciler]\ngrace_minutes = {grace}\n"
    )
}

pub async fn env() -> Env {
    env_with_grace(30).await
}

pub async fn env_with_grace(grace: u32) -> Env {
    let db = testkit::test_db().await.expect("a test database");
    let dir = tempfile::tempdir().expect("temp dir");
    let text = toml(&db.url, grace);
    let config_path = dir.path().join("refunds.toml");
    std::fs::write(&config_path, &text).expect("config file");
    let config = Config::from_toml(&text).expect("config");
    Env {
        db,
        config,
        config_path,
        dir,
    }
}

pub fn date(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

/// A local time in Shanghai.
pub fn local(s: &str) -> DateTime<Utc> {
    TZ.from_local_datetime(
        &chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap(),
    )
    .single()
    .unwrap()
    .with_timezone(&Utc)
}

/// `n` succeeded refunds booked on `day` (numbers `{prefix}00000001`...), spread evenly over
/// the day in Shanghai, over 2 providers and 4 merchants each, one in five with a coupon; each
/// with a ledger entry and, if `attempts`, an accepted provider attempt recorded 100 ms before
/// booking.
pub async fn seed_day(pool: &PgPool, prefix: &str, day: NaiveDate, n: i64, attempts: bool) {
    let d = reconciler::day::Day::new(day, TZ, 0).unwrap();
    sqlx::query(
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee, request,
             content_hash, state, attempt, provider_refund_id, settlement_refund_fee, created_at,
             updated_at)
         SELECT $1 || lpad(i::text, 8, '0'), 'O' || $1 || lpad(i::text, 8, '0'),
                CASE WHEN i % 3 = 0 THEN 'wupay' ELSE 'shengpay' END, 'm' || (i % 4),
                100000, fee, '{}'::jsonb, '\\x00'::bytea, 'succeeded', 1,
                CASE WHEN i % 3 = 0 THEN NULL ELSE 'RO' || $1 || i END,
                fee - CASE WHEN i % 5 = 0 THEN fee / 10 ELSE 0 END, at, at
         FROM generate_series(1, $2::bigint) i
         CROSS JOIN LATERAL (SELECT 100 + (i * 7919) % 90000 AS fee,
             $3::timestamptz + (($4::timestamptz - $3::timestamptz) * i / ($2 + 1)) AS at) x",
    )
    .bind(prefix)
    .bind(n)
    .bind(d.start)
    .bind(d.end)
    .execute(pool)
    .await
    .expect("seed jobs");
    sqlx::query(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
             refund_fee, settlement_refund_fee, business_date, source, booked_at)
         SELECT refund_no, 'refund', provider, merchant, provider_refund_id, refund_fee,
                settlement_refund_fee, $2, 'provider', created_at
         FROM jobs WHERE refund_no LIKE $1 || '%'",
    )
    .bind(prefix)
    .bind(day)
    .execute(pool)
    .await
    .expect("seed ledger");
    if attempts {
        sqlx::query(
            "INSERT INTO provider_attempts (refund_no, attempt, provider, merchant, outcome,
                 request, latency_us, provider_refund_id, refund_fee, settlement_refund_fee,
                 coupon_refund_fee, recorded_at)
             SELECT refund_no, 1, provider, merchant, 'accepted', '{}', 1000, provider_refund_id,
                    refund_fee, settlement_refund_fee, refund_fee - settlement_refund_fee,
                    created_at - interval '100 milliseconds'
             FROM jobs WHERE refund_no LIKE $1 || '%'",
        )
        .bind(prefix)
        .execute(pool)
        .await
        .expect("seed attempts");
    }
}

/// One job (state `state`, cause for dead jobs).
pub async fn job(
    pool: &PgPool,
    refund_no: &str,
    provider: &str,
    merchant: &str,
    fee: i64,
    state: &str,
) {
    sqlx::query(
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee, request,
             content_hash, state, cause, attempt)
         VALUES ($1, 'O' || $1, $2, $3, 100000, $4, '{}'::jsonb, '\\x00'::bytea, $5,
                 CASE WHEN $5 = 'dead' THEN 'outcome_unknown' END, 1)",
    )
    .bind(refund_no)
    .bind(provider)
    .bind(merchant)
    .bind(fee)
    .bind(state)
    .execute(pool)
    .await
    .expect("job");
}

/// A ledger `refund` entry booked at `at` (its business date in Shanghai); returns its id.
pub async fn book(
    pool: &PgPool,
    refund_no: &str,
    provider: &str,
    merchant: &str,
    fee: i64,
    settle: i64,
    at: DateTime<Utc>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
             refund_fee, settlement_refund_fee, business_date, source, booked_at)
         VALUES ($1, 'refund', $2, $3, 'RO-' || $1, $4, $5,
                 ($6::timestamptz AT TIME ZONE 'Asia/Shanghai')::date, 'provider', $6)
         RETURNING id",
    )
    .bind(refund_no)
    .bind(provider)
    .bind(merchant)
    .bind(fee)
    .bind(settle)
    .bind(at)
    .fetch_one(pool)
    .await
    .expect("ledger entry")
}

/// A reversal of ledger entry `reverses`.
pub async fn reverse(pool: &PgPool, reverses: i64, fee: i64, settle: i64, at: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
             refund_fee, settlement_refund_fee, business_date, source, reverses, booked_at)
         SELECT refund_no, 'reversal', provider, merchant, provider_refund_id, -$2, -$3,
                ($4::timestamptz AT TIME ZONE 'Asia/Shanghai')::date, 'manual', id, $4
         FROM ledger WHERE id = $1",
    )
    .bind(reverses)
    .bind(fee)
    .bind(settle)
    .bind(at)
    .execute(pool)
    .await
    .expect("reversal");
}

/// A provider attempt.
#[allow(clippy::too_many_arguments)]
pub async fn attempt(
    pool: &PgPool,
    refund_no: &str,
    attempt: i32,
    outcome: &str,
    provider_refund_id: Option<&str>,
    settle: i64,
    fenced: bool,
    at: DateTime<Utc>,
) {
    sqlx::query(
        "INSERT INTO provider_attempts (refund_no, attempt, provider, merchant, outcome, request,
             latency_us, provider_refund_id, refund_fee, settlement_refund_fee, coupon_refund_fee,
             fenced, recorded_at)
         SELECT refund_no, $2, provider, merchant, $3, '{}', 1000, $4,
                CASE WHEN $3 = 'accepted' THEN refund_fee END,
                CASE WHEN $3 = 'accepted' THEN $5::bigint END,
                CASE WHEN $3 = 'accepted' THEN refund_fee - $5::bigint END, $6, $7
         FROM jobs WHERE refund_no = $1",
    )
    .bind(refund_no)
    .bind(attempt)
    .bind(outcome)
    .bind(provider_refund_id)
    .bind(settle)
    .bind(fenced)
    .bind(at)
    .execute(pool)
    .await
    .expect("attempt");
}

/// Writes the statement of the ledger's refund entries of `day` (whose refund_no starts with
/// `prefix`), each paid 100 ms before booking, to `path`; streamed with COPY.
pub async fn write_statement(pool: &PgPool, prefix: &str, day: NaiveDate, path: &Path) {
    let sql = format!(
        "COPY (SELECT provider, merchant, refund_no,
                      coalesce(provider_refund_id, '') AS provider_refund_id,
                      refund_fee, settlement_refund_fee,
                      to_char((booked_at - interval '100 milliseconds') AT TIME ZONE 'Asia/Shanghai',
                              'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"+08:00\"') AS refunded_at
               FROM ledger
               WHERE business_date = '{day}' AND entry_kind = 'refund'
                 AND refund_no LIKE '{prefix}%'
               ORDER BY id)
         TO STDOUT WITH (FORMAT csv, HEADER true)"
    );
    let mut conn = pool.acquire().await.unwrap();
    let mut stream = conn.copy_out_raw(&sql).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = stream.try_next().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    std::fs::write(path, out).unwrap();
}

/// Appends statement rows (without header) to `path`.
pub fn append(path: &Path, rows: &[String]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
}

/// A statement row.
pub fn row(
    provider: &str,
    merchant: &str,
    refund_no: &str,
    prid: &str,
    fee: i64,
    settle: i64,
    at: DateTime<Utc>,
) -> String {
    format!(
        "{provider},{merchant},{refund_no},{prid},{fee},{settle},{}",
        at.with_timezone(&TZ)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
    )
}

/// Discrepancies of a stored run: (kind, provider, merchant, refund_no, ledger, provider).
pub type D = (String, String, String, String, Option<i64>, Option<i64>);

pub async fn discrepancies(pool: &PgPool, run_id: i64) -> Vec<D> {
    sqlx::query_as(
        "SELECT kind, provider, merchant, refund_no, ledger_amount, provider_amount
         FROM reconciliation_discrepancies WHERE run_id = $1 ORDER BY refund_no",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

pub fn d(
    kind: &str,
    provider: &str,
    merchant: &str,
    refund_no: &str,
    l: Option<i64>,
    p: Option<i64>,
) -> D {
    (
        kind.into(),
        provider.into(),
        merchant.into(),
        refund_no.into(),
        l,
        p,
    )
}

/// Checks that the discrepancies of a run account for each pair's diff.
pub async fn assert_discrepancies_explain_diffs(pool: &PgPool, run_id: i64) {
    let bad: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT t.provider, t.merchant, t.diff,
                coalesce(sum(coalesce(d.provider_amount, 0) - coalesce(d.ledger_amount, 0)), 0)::bigint
         FROM reconciliation_totals t
         LEFT JOIN reconciliation_discrepancies d
           ON d.run_id = t.run_id AND d.provider = t.provider AND d.merchant = t.merchant
         WHERE t.run_id = $1
         GROUP BY t.provider, t.merchant, t.diff
         HAVING t.diff <> coalesce(sum(coalesce(d.provider_amount, 0) - coalesce(d.ledger_amount, 0)), 0)",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        bad.is_empty(),
        "diffs not explained by discrepancies: {bad:?}"
    );
}

/// The latest run id.
pub async fn last_run(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT max(id) FROM reconciliation_runs")
        .fetch_one(pool)
        .await
        .unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
