//! Helpers for the `refundctl` tests: jobs driven into given states directly through the store,
//! and the CLI's context over a per-test database and broker names.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use shared::config::Config;
use shared::job::ProviderKind;
use shared::provider::{AttemptRecord, Outcome};
use shared::state::Cause;
use shared::store::intake::{self, Incoming, IntakeResult};
use shared::store::jobs;
use shared::workflow::Decision;
use sqlx::PgPool;
use testkit::request_json;
use worker::ctl::dlq::ReplayArgs;
use worker::ctl::job::{CorrectArgs, ResolveArgs, ResolveAs};
use worker::ctl::{AuditedUnlessDryRun, Ctl, Idempotency, OperatorArgs};

/// ShengPay merchant `m1` deduplicates on refund_no; WuPay merchant `w1` does not.
pub fn idempotency() -> Idempotency {
    Idempotency::default()
        .with("shengpay", "m1", true)
        .with("wupay", "w1", false)
}

pub fn ctl(config: &Config, pool: &PgPool) -> Ctl {
    Ctl::new(config.clone(), pool.clone(), idempotency()).expect("test config is valid")
}

/// The config with `[operator] approvals_required = 1`: resolutions and corrections apply at
/// once, as in development.
pub fn one_person((mut config, db): (Config, testkit::TestDb)) -> (Config, testkit::TestDb) {
    config.operator.approvals_required = 1;
    (config, db)
}

pub fn tz() -> chrono_tz::Tz {
    chrono_tz::Asia::Shanghai
}

pub fn who(name: &str, note: &str) -> OperatorArgs {
    OperatorArgs {
        operator: name.into(),
        note: note.into(),
    }
}

pub fn provider_of(merchant: &str) -> ProviderKind {
    if merchant.starts_with('w') {
        ProviderKind::Wupay
    } else {
        ProviderKind::Shengpay
    }
}

pub fn body(refund_no: &str, merchant: &str) -> Vec<u8> {
    serde_json::to_vec(&request_json(
        refund_no,
        &format!("O{refund_no}"),
        provider_of(merchant),
        merchant,
        1000,
        100,
    ))
    .unwrap()
}

/// Takes a raw message in through intake, as the consumer would.
pub async fn take(pool: &PgPool, body: &[u8]) -> IntakeResult {
    let mut tx = pool.begin().await.unwrap();
    let registry = testkit::fake_registry(&[
        (ProviderKind::Shengpay, "m1", true),
        (ProviderKind::Wupay, "w1", false),
    ]);
    let known = |r: &shared::job::RefundRequest| registry.admit(r);
    let r = intake::take(
        &mut tx,
        &Incoming {
            body,
            message_id: None,
            redelivered: false,
        },
        &known,
        tz(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    r
}

/// A new job in `received`.
pub async fn new_job(pool: &PgPool, refund_no: &str, merchant: &str) {
    let r = take(pool, &body(refund_no, merchant)).await;
    assert!(
        matches!(r, IntakeResult::Created { .. }),
        "{refund_no}: {r:?}"
    );
}

/// Claims the job and records one provider call with `outcome` and `decision`.
pub async fn call(pool: &PgPool, refund_no: &str, outcome: Outcome, decision: Decision) {
    // A retry_wait job is claimable once due; make it due.
    sqlx::query(
        "UPDATE jobs SET next_attempt_at = now() WHERE refund_no = $1 AND state = 'retry_wait'",
    )
    .bind(refund_no)
    .execute(pool)
    .await
    .unwrap();
    let claimed = jobs::claim(
        pool,
        &[refund_no.to_owned()],
        Duration::from_secs(30),
        "test",
        jobs::ClaimToken::new(),
    )
    .await
    .unwrap();
    let claimed = claimed
        .claimed
        .into_iter()
        .next()
        .expect("job is claimable");
    let rec = AttemptRecord {
        outcome,
        request_redacted: format!("{{\"outRefundNo\":\"{refund_no}\",\"sign\":\"***\"}}"),
        http_status: Some(200),
        latency: Duration::from_micros(12_345),
    };
    jobs::record_outcome(pool, &claimed, &rec, &decision, "test", tz())
        .await
        .unwrap();
}

pub fn retry_later(code: &str) -> Outcome {
    Outcome::RetryLater {
        code: code.into(),
        message: format!("{code} from the provider"),
        raw: format!("{{\"resultCode\":\"FAIL\",\"errCode\":\"{code}\"}}"),
    }
}

pub fn maybe_delivered() -> Outcome {
    Outcome::MaybeDelivered {
        error: "timed out after sending".into(),
        raw: None,
    }
}

pub fn request_rejected(code: &str) -> Outcome {
    Outcome::RequestRejected {
        code: code.into(),
        message: format!("{code} from the provider"),
        raw: "{}".into(),
    }
}

pub fn accepted(refund_no: &str) -> Outcome {
    Outcome::Accepted {
        provider_refund_id: format!("P-{refund_no}"),
        refund_fee: 100,
        settlement_refund_fee: 100,
        coupon_refund_fee: 0,
        raw: "{}".into(),
    }
}

/// A job that died after one call with `outcome`, with `cause`.
pub async fn dead_job(
    pool: &PgPool,
    refund_no: &str,
    merchant: &str,
    outcome: Outcome,
    cause: Cause,
) {
    new_job(pool, refund_no, merchant).await;
    call(pool, refund_no, outcome, Decision::Dead { cause }).await;
}

/// A job that retried once, then died with retries exhausted.
pub async fn exhausted_job(pool: &PgPool, refund_no: &str, merchant: &str, code: &str) {
    new_job(pool, refund_no, merchant).await;
    call(
        pool,
        refund_no,
        retry_later(code),
        Decision::Retry {
            after: Duration::ZERO,
            counted: true,
        },
    )
    .await;
    call(
        pool,
        refund_no,
        retry_later(code),
        Decision::Dead {
            cause: Cause::RetriesExhausted,
        },
    )
    .await;
}

pub fn declined(code: &str) -> Outcome {
    Outcome::Declined {
        code: code.into(),
        message: format!("{code} from the provider"),
        raw: "{}".into(),
    }
}

/// A job the provider paid at once: succeeded, booked 100 fen with settlement 100.
pub async fn succeeded_job(pool: &PgPool, refund_no: &str, merchant: &str) {
    new_job(pool, refund_no, merchant).await;
    call(pool, refund_no, accepted(refund_no), Decision::Succeed).await;
}

/// A job the provider declined: failed, its amount given back to the order.
pub async fn failed_job(pool: &PgPool, refund_no: &str, merchant: &str) {
    new_job(pool, refund_no, merchant).await;
    call(pool, refund_no, declined("NOTENOUGH"), Decision::Fail).await;
}

pub fn correct_args(refund_no: &str, to: ResolveAs, fee: Option<i64>, by: &str) -> CorrectArgs {
    CorrectArgs {
        refund_no: refund_no.into(),
        to,
        settlement_fee: fee,
        evidence: "ShengPay statement 2026-11-10, line 7".into(),
        operator: by.into(),
    }
}

/// (id, entry_kind, refund_fee, settlement_refund_fee, reverses, rebooks) of a refund's ledger
/// entries, in order.
pub async fn ledger_rows(
    pool: &PgPool,
    refund_no: &str,
) -> Vec<(i64, String, i64, i64, Option<i64>, Option<i64>)> {
    sqlx::query_as(
        "SELECT id, entry_kind, refund_fee, settlement_refund_fee, reverses, rebooks FROM ledger
         WHERE refund_no = $1 ORDER BY id",
    )
    .bind(refund_no)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The committed refund amount of an order.
pub async fn committed(pool: &PgPool, order_no: &str) -> i64 {
    sqlx::query_scalar("SELECT committed_fee FROM orders WHERE order_no = $1")
        .bind(order_no)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The payloads of a refund's outbox events with this routing key, in order.
pub async fn events(pool: &PgPool, refund_no: &str, key: &str) -> Vec<serde_json::Value> {
    sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE refund_no = $1 AND routing_key = $2 ORDER BY id",
    )
    .bind(refund_no)
    .bind(key)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A planted discrepancy: (kind, provider, merchant, refund_no, ledger, provider).
pub type Found<'a> = (&'a str, &'a str, &'a str, &'a str, Option<i64>, Option<i64>);

/// A stored reconciliation run of `date` (finished, with discrepancies) for every provider,
/// superseding the earlier runs of the date as the reconciler does, with one discrepancy per
/// (kind, provider, merchant, refund_no, ledger, provider); its cases opened. Returns the
/// run's id.
pub async fn stored_run(pool: &PgPool, date: &str, found: &[Found<'_>]) -> i64 {
    let mut tx = pool.begin().await.unwrap();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO reconciliation_runs (business_date, source, timezone, grace_minutes, status,
             discrepancy_count, started_at, locked_at, finished_at)
         VALUES ($1::date, 'statement', 'Asia/Shanghai', 30, 'discrepancies', $2, now(), now(),
                 now())
         RETURNING id",
    )
    .bind(date)
    .bind(found.len() as i64)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE reconciliation_runs SET superseded_by = $1
         WHERE business_date = $2::date AND id <> $1 AND superseded_by IS NULL",
    )
    .bind(id)
    .bind(date)
    .execute(&mut *tx)
    .await
    .unwrap();
    for (kind, provider, merchant, refund_no, l, p) in found {
        sqlx::query(
            "INSERT INTO reconciliation_discrepancies (run_id, kind, provider, merchant,
                 refund_no, ledger_amount, provider_amount, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'planted by the test')",
        )
        .bind(id)
        .bind(kind)
        .bind(provider)
        .bind(merchant)
        .bind(refund_no)
        .bind(l)
        .bind(p)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    shared::store::cases::open_from_run(&mut tx, id)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id
}

/// (state, closed_by) of the case of (refund_no, kind).
pub async fn case_state(pool: &PgPool, refund_no: &str, kind: &str) -> (String, Option<String>) {
    sqlx::query_as(
        "SELECT state, closed_by FROM reconciliation_cases WHERE refund_no = $1 AND kind = $2",
    )
    .bind(refund_no)
    .bind(kind)
    .fetch_one(pool)
    .await
    .unwrap()
}

pub fn replay_all(by: &str) -> ReplayArgs {
    ReplayArgs {
        refund_nos: Vec::new(),
        cause: None,
        all: true,
        dry_run: false,
        rate: 0.0,
        json: false,
        who: AuditedUnlessDryRun::new(by, "INC-42 provider outage over"),
    }
}

pub fn replay_these(by: &str, refund_nos: &[&str]) -> ReplayArgs {
    ReplayArgs {
        refund_nos: refund_nos.iter().map(|s| s.to_string()).collect(),
        all: false,
        ..replay_all(by)
    }
}

pub fn resolve_args(refund_no: &str, to: ResolveAs, fee: Option<i64>, by: &str) -> ResolveArgs {
    ResolveArgs {
        refund_no: refund_no.into(),
        to,
        settlement_fee: fee,
        who: who(by, "checked with the provider: ticket SP-7"),
    }
}

pub async fn state_of(pool: &PgPool, refund_no: &str) -> String {
    sqlx::query_scalar("SELECT state FROM jobs WHERE refund_no = $1")
        .bind(refund_no)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// (operator, action, result, prior_state, reason) of each audit row of a job.
pub async fn audit_rows(
    pool: &PgPool,
    refund_no: &str,
) -> Vec<(String, String, String, Option<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT operator, action, result, prior_state, reason FROM operator_audit
         WHERE refund_no = $1 ORDER BY id",
    )
    .bind(refund_no)
    .fetch_all(pool)
    .await
    .unwrap()
}

pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The config as a TOML file of its own (what the binary reads).
pub fn write_config(config: &Config) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("refundctl-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, toml_of(config)).unwrap();
    path
}

/// The keys of `c` the refundctl binary needs.
pub fn toml_of(c: &Config) -> String {
    let a = &c.amqp;
    format!(
        "database_url = {:?}\namqp_url = {:?}\n\n[amqp]\nexchange = {:?}\nqueue = {:?}\n\
         routing_key = {:?}\ndead_letter_exchange = {:?}\ndead_letter_queue = {:?}\n\
         events_exchange = {:?}\nqueue_type = {:?}\n",
        c.database_url,
        c.amqp_url,
        a.exchange,
        a.queue,
        a.routing_key,
        a.dead_letter_exchange,
        a.dead_letter_queue,
        a.events_exchange,
        a.queue_type
    )
}

/// Runs the real refundctl with `--config` (when given) and `args`.
pub fn refundctl(config: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_refundctl"));
    cmd.env_remove("REFUNDS_CONFIG");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args).output().expect("refundctl runs")
}

/// The exit code.
pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

/// Exit code, stdout and stderr, for an assertion's message.
pub fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
