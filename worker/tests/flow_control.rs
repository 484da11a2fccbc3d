//! Flow control against the simulator, over real HTTP (DESIGN §9 `[[limits]]`, §11): a
//! merchant's limit holds across worker replicas, a throttling provider slows its merchant
//! down without spending the jobs' retry budgets, and a provider that is down pauses its
//! merchant until it answers again, with no job dead.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use refund_sim::{FaultAction, FaultRule};
use shared::config::{Config, LimitConfig};
use shared::job::ProviderKind;
use shared::state::State;
use sqlx::PgPool;
use testkit::request_json;

const LIMITED: &str = "wu-soap11";
const FREE: &str = "wu-post";
const SHENGPAY: &str = "93751497";

/// Publishes `n` requests for `merchant`, refund numbers `{prefix}{i}`.
async fn publish(config: &Config, prefix: &str, merchant: &str, n: usize) -> anyhow::Result<()> {
    publish_to(config, prefix, ProviderKind::Wupay, merchant, n).await
}

/// Publishes `n` requests for `kind`'s `merchant`, refund numbers `{prefix}{i}`.
async fn publish_to(
    config: &Config,
    prefix: &str,
    kind: ProviderKind,
    merchant: &str,
    n: usize,
) -> anyhow::Result<()> {
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            serde_json::to_vec(&request_json(
                &format!("{prefix}{i:05}"),
                &format!("O{prefix}{i:05}"),
                kind,
                merchant,
                1000,
                100,
            ))
        })
        .collect::<Result<_, _>>()?;
    testkit::publish_requests(config, &bodies).await
}

/// Jobs by state among those whose refund number starts with `prefix`.
async fn states(pool: &PgPool, prefix: &str) -> anyhow::Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM jobs WHERE refund_no LIKE $1 || '%' GROUP BY state",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Waits until all `n` jobs of `prefix` are `succeeded`.
async fn all_succeeded(pool: &PgPool, prefix: &str, n: i64, secs: u64) -> anyhow::Result<()> {
    testkit::wait_until(
        Duration::from_secs(secs),
        &format!("{n} {prefix} jobs succeeded"),
        || async move {
            let s = states(pool, prefix).await?;
            Ok(s.get(State::Succeeded.as_str()).copied().unwrap_or(0) == n)
        },
    )
    .await
}

/// `base` pointed at the simulator, WuPay merchants idempotent, no notify listener (WuPay has
/// none, and replicas in one process would share its port).
fn wupay_config(base: &Config, sim: &refund_sim::SimHandle) -> anyhow::Result<Config> {
    let mut c = testkit::with_sim_merchants(base, sim)?;
    c.shengpay.merchants.clear();
    for m in &mut c.wupay.merchants {
        m.idempotent = true;
    }
    c.notify.addr = String::new();
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_together_never_exceed_a_merchants_limit() -> anyhow::Result<()> {
    let sim = testkit::start_sim(vec![], 0.0).await?;
    let (base, db) = testkit::test_config().await?;
    let mut config = wupay_config(&base, &sim)?;
    config.limits = vec![LimitConfig {
        provider: ProviderKind::Wupay,
        merchant: LIMITED.into(),
        rate_per_sec: 40.0,
        burst: 2,
    }];
    let mut apps = Vec::new();
    for _ in 0..3 {
        let registry = worker::app::build_registry(&config)?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(worker::app::run(config.clone(), registry, shutdown.clone()));
        apps.push((shutdown, handle));
    }
    publish(&config, "LIM", LIMITED, 300).await?;
    publish(&config, "FRE", FREE, 200).await?;
    // The unlimited merchant does not wait for the limited one's budget: it is done while the
    // limited one, at 40/s, still needs seconds.
    all_succeeded(&db.pool, "FRE", 200, 30).await?;
    let limited_done = states(&db.pool, "LIM").await?;
    let done = limited_done.get("succeeded").copied().unwrap_or(0);
    assert!(
        done < 300,
        "the unlimited merchant finished after the limited one had done {done} of 300"
    );
    all_succeeded(&db.pool, "LIM", 300, 40).await?;
    let calls = sim.calls();
    let limited: Vec<DateTime<Utc>> = calls
        .iter()
        .filter(|c| c.merchant.as_deref() == Some(LIMITED))
        .map(|c| c.at)
        .collect();
    assert_eq!(limited.len(), 300, "one call per refund");
    // At most rate × 1 s + burst in any second, and 5 % for timing.
    let peak = testkit::max_per_second(limited);
    assert!(
        peak <= 44,
        "{peak} calls in one second at a limit of 40/s, burst 2"
    );
    // Paid once each.
    let paid = sim.paid();
    assert_eq!(paid.len(), 500);
    for (shutdown, handle) in apps {
        shutdown.cancel();
        handle.await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_merchant_is_slowed_down_and_its_jobs_spend_no_attempts() -> anyhow::Result<()>
{
    // Each refund is answered ShengPay's FREQUENCY_LIMITED three times, then accepted (and its
    // notify says it was paid).
    let rules = vec![
        FaultRule::new(FaultAction::RetryLater)
            .merchant(SHENGPAY)
            .code("FREQUENCY_LIMITED")
            .times(3),
    ];
    let sim = testkit::start_sim(rules, 0.0).await?;
    let (mut base, db) = testkit::test_config().await?;
    // Two counted attempts only: three throttled answers would kill every job if they counted.
    base.worker.retry.max_attempts = 2;
    let mut config = testkit::with_sim_merchants(&base, &sim)?;
    config.limits = vec![LimitConfig {
        provider: ProviderKind::Shengpay,
        merchant: SHENGPAY.into(),
        rate_per_sec: 100.0,
        burst: 5,
    }];
    let registry = worker::app::build_registry(&config)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = tokio::spawn(worker::app::run(config.clone(), registry, shutdown.clone()));
    publish_to(&config, "THR", ProviderKind::Shengpay, SHENGPAY, 20).await?;
    all_succeeded(&db.pool, "THR", 20, 60).await?;
    let (spared, counted): (i64, i32) = sqlx::query_as(
        "SELECT sum(spared_attempts)::int8, max(attempt - retry_base) FROM jobs
         WHERE refund_no LIKE 'THR%'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(spared, 60, "three uncounted calls per job");
    assert!(counted <= 2, "a job counted {counted} attempts");
    let calls: i64 =
        sqlx::query_scalar("SELECT count(*) FROM provider_attempts WHERE refund_no LIKE 'THR%'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(calls, 80, "four calls per job");
    // The shared budget was cut.
    let (permille, slowed): (i32, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT slowdown_permille, slowed_at FROM merchant_budgets
         WHERE provider = 'shengpay' AND merchant = $1",
    )
    .bind(SHENGPAY)
    .fetch_one(&db.pool)
    .await?;
    assert!(permille < 1000 && slowed.is_some(), "permille {permille}");
    assert_eq!(sim.paid().len(), 20);
    shutdown.cancel();
    app.await??;
    Ok(())
}

/// A worker whose `LIMITED` merchant's provider answers every call with HTTP 500: four
/// attempts per job, the pause tripping after three failures and probing every 300 ms.
async fn start_with_limited_down() -> anyhow::Result<(
    refund_sim::SimHandle,
    testkit::TestDb,
    Config,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let down = vec![
        FaultRule::new(FaultAction::Http500)
            .merchant(LIMITED)
            .rate(1.0),
    ];
    let sim = testkit::start_sim(down, 0.0).await?;
    let (mut base, db) = testkit::test_config().await?;
    base.worker.retry.max_attempts = 4;
    // Below the attempts: the pause trips before any one job's budget is spent, even when the
    // first failures are a few jobs' retries (the intake may take the 30 in several batches).
    base.worker.flow.pause_min_calls = 3;
    base.worker.flow.probe_interval_ms = 300;
    base.worker.flow.poll_ms = 200;
    let config = wupay_config(&base, &sim)?;
    let registry = worker::app::build_registry(&config)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = tokio::spawn(worker::app::run(config.clone(), registry, shutdown.clone()));
    Ok((sim, db, config, shutdown, app))
}

/// The refunds of `prefix` that died, with what each call said: (refund, cause, attempt,
/// retry base, spared, calls), for an assertion's message.
async fn dead_jobs(
    pool: &PgPool,
    prefix: &str,
) -> anyhow::Result<Vec<(String, Option<String>, i32, i32, i32, Vec<String>)>> {
    Ok(sqlx::query_as(
        "SELECT j.refund_no, j.cause, j.attempt, j.retry_base, j.spared_attempts,
                array_agg(a.outcome || coalesce(':' || a.http_status::text, '') || '@'
                          || to_char(a.recorded_at, 'SS.MS') ORDER BY a.id)
         FROM jobs j JOIN provider_attempts a USING (refund_no)
         WHERE j.refund_no LIKE $1 || '%' AND j.state = 'dead' GROUP BY j.refund_no",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_the_database_is_slow_to_record_still_holds_and_no_job_dies() -> anyhow::Result<()>
{
    let (sim, db, config, shutdown, app) = start_with_limited_down().await?;
    // The write of the pause waits behind this row lock for longer than four attempts with
    // their backoff last, as on a database too busy to answer; reads of the budgets and the
    // claim of a probe (which finds no pause to move on) go on, and show no pause meanwhile.
    sqlx::query("INSERT INTO merchant_budgets (provider, merchant) VALUES ('wupay', $1)")
        .bind(LIMITED)
        .execute(&db.pool)
        .await?;
    let mut lock = db.pool.begin().await?;
    sqlx::query("SELECT 1 FROM merchant_budgets WHERE merchant = $1 FOR UPDATE")
        .bind(LIMITED)
        .execute(&mut *lock)
        .await?;
    publish(&config, "SLW", LIMITED, 30).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    lock.commit().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = states(&db.pool, "SLW").await?;
    let dead = dead_jobs(&db.pool, "SLW").await?;
    assert_eq!(
        s.get("dead"),
        None,
        "no job dies while its pause is on its way to the database: {s:?}; the dead: {dead:?}"
    );
    sim.set_rules(vec![])?;
    all_succeeded(&db.pool, "SLW", 30, 15).await?;
    shutdown.cancel();
    app.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_down_pauses_its_merchant_and_no_job_dies() -> anyhow::Result<()> {
    let (sim, db, config, shutdown, app) = start_with_limited_down().await?;
    publish(&config, "DWN", LIMITED, 30).await?;
    publish(&config, "UP", FREE, 30).await?;
    let pool = &db.pool;
    testkit::wait_until(Duration::from_secs(20), "merchant paused", || async move {
        let paused: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
            "SELECT paused_until FROM merchant_budgets WHERE provider = 'wupay' AND merchant = $1",
        )
        .bind(LIMITED)
        .fetch_optional(pool)
        .await?;
        Ok(paused.flatten().is_some())
    })
    .await?;
    // The other merchant goes on meanwhile.
    all_succeeded(pool, "UP", 30, 20).await?;
    // Down for longer than four attempts with their backoff would last: probes go out, the
    // jobs wait with their attempts unspent.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = states(pool, "DWN").await?;
    let dead = dead_jobs(pool, "DWN").await?;
    assert_eq!(
        s.get("dead"),
        None,
        "no job dies while its merchant is paused: {s:?}; the dead: {dead:?}"
    );
    let probes = sim
        .calls()
        .iter()
        .filter(|c| c.merchant.as_deref() == Some(LIMITED))
        .count();
    sim.set_rules(vec![])?;
    all_succeeded(pool, "DWN", 30, 15).await?;
    let max_counted: i32 = sqlx::query_scalar(
        "SELECT max(attempt - retry_base) FROM jobs WHERE refund_no LIKE 'DWN%'",
    )
    .fetch_one(pool)
    .await?;
    assert!(max_counted <= 4, "a job spent {max_counted} attempts");
    // Calls during the outage: the first failures, then about one probe per interval, not
    // every job's retries.
    assert!(
        probes < 30 * 4,
        "{probes} calls reached the provider while it was down"
    );
    let paused: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT paused_until FROM merchant_budgets WHERE provider = 'wupay' AND merchant = $1",
    )
    .bind(LIMITED)
    .fetch_one(pool)
    .await?;
    assert_eq!(paused, None, "resumed");
    assert_eq!(sim.paid().len(), 60);
    shutdown.cancel();
    app.await??;
    Ok(())
}
