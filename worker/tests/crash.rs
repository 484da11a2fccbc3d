//! The real `refund-worker` binary under `kill -9` and SIGTERM: nothing lost, nothing paid twice.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use refund_sim::FaultRule;
use shared::config::Config;
use shared::job::ProviderKind;
use shared::state::State;
use shared::store::ops;
use testkit::{self, request_json};

/// Starts the real binary on `config` (written to `file`) and waits until `/readyz` says ready:
/// a signal sent before its handler is installed would kill it, proving nothing.
async fn start_worker(config: &Config, file: &std::path::Path) -> anyhow::Result<Child> {
    let worker = Command::new(env!("CARGO_BIN_EXE_refund-worker"))
        .arg("--config")
        .arg(file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    testkit::wait_ready(&config.worker.metrics_addr, true, Duration::from_secs(30)).await?;
    Ok(worker)
}

/// The test config with the worker's `/readyz` on a port of its own.
async fn worker_config(sim: &refund_sim::SimHandle) -> anyhow::Result<(Config, testkit::TestDb)> {
    let (mut base, db) = testkit::test_config().await?;
    base.worker.metrics_addr = testkit::free_addr()?;
    Ok((testkit::with_sim_merchants(&base, sim)?, db))
}

/// Sends SIGTERM to the worker and waits for it to exit; its exit status.
async fn sigterm(worker: Child) -> anyhow::Result<std::process::ExitStatus> {
    kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM)?;
    Ok(
        tokio::task::spawn_blocking(move || worker.wait_with_output())
            .await??
            .status,
    )
}

/// Whether all `n` jobs have succeeded and the request queue is empty.
async fn all_succeeded_and_drained(
    pool: &sqlx::PgPool,
    config: &Config,
    n: i64,
) -> anyhow::Result<bool> {
    let succeeded = ops::counts_by_state(pool)
        .await?
        .get(&State::Succeeded)
        .copied()
        == Some(n);
    Ok(succeeded && testkit::queue_depth(config, &config.amqp.queue).await? == 0)
}

fn bodies() -> Vec<Vec<u8>> {
    let valid: Vec<serde_json::Value> = (0..1000)
        .map(|i| {
            request_json(
                &format!("K{i:05}"),
                &format!("KO{:05}", i / 2),
                ProviderKind::Shengpay,
                "93751497",
                1000,
                100,
            )
        })
        .collect();
    let mut out: Vec<Vec<u8>> = valid
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .collect();
    for i in 0..50 {
        let mut v = request_json(
            &format!("KBAD{i}"),
            "KOBAD",
            ProviderKind::Shengpay,
            "93751497",
            1000,
            100,
        );
        v["refund_fee"] = serde_json::json!(1.5 + i as f64);
        out.push(serde_json::to_vec(&v).unwrap());
    }
    for v in valid.iter().take(100) {
        out.push(serde_json::to_vec_pretty(v).unwrap());
    }
    for v in valid.iter().skip(100).take(100) {
        let mut c = v.clone();
        c["reason"] = "changed".into();
        out.push(serde_json::to_vec(&c).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_intake_then_restart_loses_nothing_and_pays_nothing_twice()
-> anyhow::Result<()> {
    // A little provider latency keeps jobs in flight when the kill lands.
    let sim = testkit::start_sim(vec![FaultRule::latency(20)], 0.2).await?;
    let (mut config, db) = worker_config(&sim).await?;
    config.worker.concurrency = 16;
    config.worker.lease_ms = 3_000;
    let file = testkit::toml_file("refund-worker-", &config)?;
    let mut worker = start_worker(&config, file.path()).await?;
    testkit::publish_requests(&config, &bodies()).await?;
    // Kill while it is taking the batch in: some jobs recorded, most not yet.
    let pool = db.pool.clone();
    testkit::wait_until(
        Duration::from_secs(60),
        "the worker to take in some jobs",
        || {
            let pool = pool.clone();
            async move { Ok(ops::counts_by_state(&pool).await?.values().sum::<i64>() >= 150) }
        },
    )
    .await?;
    kill(Pid::from_raw(worker.id() as i32), Signal::SIGKILL)?;
    worker.wait()?;
    let taken = ops::counts_by_state(&db.pool).await?.values().sum::<i64>();
    assert!(
        taken < 1000,
        "the kill landed after intake finished ({taken} jobs); the test proves nothing"
    );

    let worker = start_worker(&config, file.path()).await?;
    let pool = db.pool.clone();
    testkit::wait_until(
        Duration::from_secs(120),
        "every job to succeed and every message to be consumed",
        || {
            let pool = pool.clone();
            let config = config.clone();
            async move {
                Ok(ops::count_rejected(&pool, "rejected").await? == 50
                    && ops::count_rejected(&pool, "conflict").await? == 100
                    && all_succeeded_and_drained(&pool, &config, 1000).await?)
            }
        },
    )
    .await?;
    let status = sigterm(worker).await?;
    assert!(status.success(), "SIGTERM exit: {status}");

    assert_eq!(
        ops::counts_by_state(&db.pool).await?.values().sum::<i64>(),
        1000
    );
    assert_eq!(ops::count_rejected(&db.pool, "rejected").await?, 50);
    assert_eq!(ops::count_rejected(&db.pool, "conflict").await?, 100);
    assert_eq!(testkit::queue_depth(&config, &config.amqp.queue).await?, 0);
    assert_eq!(
        testkit::queue_depth(&config, &config.amqp.dead_letter_queue).await?,
        150
    );
    let paid = sim.paid();
    assert_eq!(
        paid.len(),
        1000,
        "each refund paid exactly once at the provider"
    );
    let ledger = ops::ledger(&db.pool).await?;
    assert_eq!(ledger.len(), 1000);
    let mut paid_amounts: Vec<_> = paid
        .iter()
        .map(|p| (p.refund_no.clone(), p.settlement_refund_fee))
        .collect();
    paid_amounts.sort();
    let booked: Vec<_> = ledger
        .iter()
        .map(|l| (l.refund_no.clone(), l.settlement_refund_fee))
        .collect();
    assert_eq!(paid_amounts, booked);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_consuming_finishes_in_flight_refunds_exits_cleanly_and_a_restart_pays_the_rest_once()
-> anyhow::Result<()> {
    let sim = testkit::start_sim(vec![FaultRule::latency(300)], 0.0).await?;
    let (config, db) = worker_config(&sim).await?;
    let file = testkit::toml_file("refund-worker-", &config)?;
    let worker = start_worker(&config, file.path()).await?;
    let bodies: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            serde_json::to_vec(&request_json(
                &format!("T{i:04}"),
                &format!("TO{i:04}"),
                ProviderKind::Shengpay,
                "93751497",
                500,
                50,
            ))
            .unwrap()
        })
        .collect();
    testkit::publish_requests(&config, &bodies).await?;
    let pool = db.pool.clone();
    testkit::wait_until(Duration::from_secs(30), "some refunds in flight", || {
        let pool = pool.clone();
        async move {
            Ok(ops::counts_by_state(&pool)
                .await?
                .get(&State::InFlight)
                .copied()
                .unwrap_or(0)
                > 0)
        }
    })
    .await?;
    let status = sigterm(worker).await?;
    assert!(status.success(), "exit status {status}");
    // Nothing was left half-done: no job in flight, and every job that was claimed finished.
    let counts = ops::counts_by_state(&db.pool).await?;
    assert_eq!(counts.get(&State::InFlight), None, "{counts:?}");
    // What was not taken in is still in the queue or recorded, never lost.
    let recorded = counts.values().sum::<i64>();
    let queued = testkit::queue_depth(&config, &config.amqp.queue).await? as i64;
    assert_eq!(
        recorded + queued,
        300,
        "recorded {recorded} + queued {queued}"
    );
    // A call the provider answered too late for its timeout is parked for a retry, not lost;
    // one whose retry wait the shutdown cut short stays `retry_wait`; one ShengPay accepted
    // waits `accepted` for its notify or status query (the listener stopped with the worker).
    // Nothing else is paid.
    let at = |s: State| counts.get(&s).copied().unwrap_or(0);
    assert!(
        sim.paid().len() as i64
            <= at(State::Succeeded) + at(State::Accepted) + at(State::RetryWait),
        "paid {} but succeeded {} + accepted {} + retry_wait {}",
        sim.paid().len(),
        at(State::Succeeded),
        at(State::Accepted),
        at(State::RetryWait)
    );
    // The next worker finishes everything: each refund paid once and booked once.
    let worker = start_worker(&config, file.path()).await?;
    testkit::wait_until(
        Duration::from_secs(60),
        "every refund to succeed after the restart",
        || {
            let pool = pool.clone();
            let config = config.clone();
            async move { all_succeeded_and_drained(&pool, &config, 300).await }
        },
    )
    .await?;
    let status = sigterm(worker).await?;
    assert!(status.success(), "exit status {status}");
    assert_eq!(sim.paid().len(), 300, "each refund paid exactly once");
    assert_eq!(ops::ledger(&db.pool).await?.len(), 300);
    sim.shutdown().await;
    Ok(())
}
