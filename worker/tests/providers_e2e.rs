//! End to end against `refund-sim` over real HTTP: both providers, all four WuPay bindings,
//! declines, RetryLater, coupons; the simulator's paid list equals the ledger exactly.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use refund_sim::{FaultAction, FaultRule, Operation, Provider};
use shared::job::ProviderKind;
use shared::state::State;
use shared::store::ops;
use testkit::{self, request_json};

const SHENGPAY: [&str; 2] = ["93751497", "10000002"];
const WUPAY: [&str; 4] = ["wu-soap11", "wu-soap12", "wu-post", "wu-get"];

/// Waits until no job is open (received, in flight or waiting for a retry).
async fn settle(pool: &sqlx::PgPool, jobs: i64, secs: u64) -> anyhow::Result<BTreeMap<State, i64>> {
    testkit::wait_until(Duration::from_secs(secs), "every job final or dead", || {
        let pool = pool.clone();
        async move {
            let c = ops::counts_by_state(&pool).await?;
            let open: i64 = [State::Received, State::InFlight, State::RetryWait]
                .iter()
                .map(|s| c.get(s).copied().unwrap_or(0))
                .sum();
            Ok(c.values().sum::<i64>() == jobs && open == 0)
        }
    })
    .await?;
    Ok(ops::counts_by_state(pool).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_jobs_end_in_the_state_the_simulator_dictates_and_the_ledger_equals_what_it_paid()
-> anyhow::Result<()> {
    let rules = vec![
        FaultRule::new(FaultAction::Decline)
            .order_no("^D")
            .code("ORDER_NOT_REFUNDABLE"),
        FaultRule::new(FaultAction::RetryLater)
            .order_no("^B")
            .provider(Provider::ShengPay)
            .times(1),
    ];
    let sim = testkit::start_sim(rules, 0.3).await?;
    let (base, db) = testkit::test_config().await?;
    let config = testkit::with_sim_merchants(&base, &sim)?;
    let registry = worker::app::build_registry(&config)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = tokio::spawn(worker::app::run(config.clone(), registry, shutdown.clone()));

    let mut bodies = Vec::new();
    let mut expected: BTreeMap<String, State> = BTreeMap::new();
    for i in 0..1000usize {
        let (kind, merchant) = if i % 2 == 0 {
            (ProviderKind::Shengpay, SHENGPAY[(i / 2) % 2])
        } else {
            (ProviderKind::Wupay, WUPAY[(i / 2) % 4])
        };
        // 10% declines, 10% RetryLater (ShengPay; WuPay has no such answer), the rest plain.
        let prefix = match i % 10 {
            3 => "D",
            7 if kind == ProviderKind::Shengpay => "B",
            _ => "N",
        };
        let refund_no = format!("E{i:05}");
        let order_no = format!("{prefix}{i:05}");
        let fee = 100 + (i as i64 % 37) * 13;
        bodies.push(serde_json::to_vec(&request_json(
            &refund_no,
            &order_no,
            kind,
            merchant,
            fee * 3,
            fee,
        ))?);
        expected.insert(
            refund_no,
            if prefix == "D" {
                State::Failed
            } else {
                State::Succeeded
            },
        );
    }
    testkit::publish_requests(&config, &bodies).await?;
    let counts = settle(&db.pool, 1000, 120).await?;

    for (refund_no, want) in &expected {
        let (got, cause) = ops::job_state(&db.pool, refund_no)
            .await?
            .expect("job exists");
        assert_eq!(
            got, *want,
            "{refund_no} ended {got} ({cause:?}), expected {want}"
        );
    }
    assert_eq!(counts.get(&State::Failed).copied().unwrap_or(0), 100);

    // The ledger equals the simulator's paid list, amount for amount.
    let ledger = ops::ledger(&db.pool).await?;
    let mut paid: Vec<_> = sim.paid();
    paid.sort_by(|a, b| a.refund_no.cmp(&b.refund_no));
    assert_eq!(ledger.len(), paid.len());
    for (l, p) in ledger.iter().zip(&paid) {
        assert_eq!(l.refund_no, p.refund_no);
        assert_eq!(l.provider, p.provider.as_str());
        assert_eq!(l.merchant, p.merchant);
        assert_eq!(l.refund_fee, p.refund_fee, "{}", l.refund_no);
        assert_eq!(
            l.settlement_refund_fee, p.settlement_refund_fee,
            "{}",
            l.refund_no
        );
        if p.provider == Provider::ShengPay {
            assert_eq!(
                l.provider_refund_id.as_deref(),
                Some(p.provider_refund_id.as_str())
            );
        }
    }
    assert!(
        paid.iter().any(|p| p.settlement_refund_fee < p.refund_fee),
        "some refunds should carry a coupon"
    );
    // Every binding was exercised, and each refund was paid at most once.
    for m in WUPAY {
        assert!(
            ledger.iter().any(|l| l.merchant == m),
            "no refund through {m}"
        );
    }
    let mut seen = std::collections::HashSet::new();
    assert!(paid.iter().all(|p| seen.insert(p.refund_no.clone())));
    // A declined job was called exactly once.
    let calls = ops::attempts_per_job(&db.pool).await?;
    for (no, state) in &expected {
        if *state == State::Failed {
            assert_eq!(
                calls.get(no),
                Some(&1),
                "declined {no} called more than once"
            );
        }
    }
    shutdown.cancel();
    app.await??;
    sim.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_signature_does_not_verify_never_produces_succeeded_or_failed()
-> anyhow::Result<()> {
    // Every ShengPay answer for these refunds, to the refund call and to the status query,
    // carries a corrupted signature (the refund is paid at the provider all the same): the
    // worker must keep treating the outcome as unknown. Matched on the refund number, which
    // both calls carry (a query names no order), one rule per operation: a verified query
    // answer would rightly book it, as would a verified notify, which is why the notifies are
    // dropped too.
    let rules = vec![
        FaultRule::new(FaultAction::BadSignature).refund_no("^SIG"),
        FaultRule::new(FaultAction::BadSignature)
            .refund_no("^SIG")
            .operation(Operation::Query),
        FaultRule::new(FaultAction::NotifyDrop),
    ];
    let sim = testkit::start_sim(rules, 0.0).await?;
    let (mut base, db) = testkit::test_config().await?;
    base.worker.retry.max_attempts = 3;
    // Queries soon and often, so that the test sees them answered.
    base.worker.query.delays_ms = vec![200];
    base.worker.query.then_every_ms = 300;
    // A dead job is enrolled for queries by the full sweep: often, so that it is soon.
    base.worker.full_sweep_interval_ms = 500;
    let config = testkit::with_sim_merchants(&base, &sim)?;
    let registry = worker::app::build_registry(&config)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = tokio::spawn(worker::app::run(config.clone(), registry, shutdown.clone()));
    let bodies: Vec<Vec<u8>> = (0..10)
        .map(|i| {
            serde_json::to_vec(&request_json(
                &format!("SIG{i}"),
                &format!("S{i}"),
                ProviderKind::Shengpay,
                SHENGPAY[i % 2],
                500,
                100,
            ))
            .unwrap()
        })
        .collect();
    testkit::publish_requests(&config, &bodies).await?;
    settle(&db.pool, 10, 60).await?;
    // Dead with outcome_unknown, a ShengPay job is queried: let every one be asked (and told
    // with a bad signature) twice before looking at how they stand.
    testkit::wait_until(
        Duration::from_secs(60),
        "two queries of every job",
        || async { Ok((0..10).all(|i| sim.queries_for(&format!("SIG{i}")).len() >= 2)) },
    )
    .await?;
    let counts = settle(&db.pool, 10, 60).await?;
    assert_eq!(counts.get(&State::Dead).copied(), Some(10), "{counts:?}");
    assert_eq!(counts.get(&State::Succeeded), None);
    assert_eq!(counts.get(&State::Failed), None);
    assert!(ops::ledger(&db.pool).await?.is_empty());
    for i in 0..10 {
        let (_, cause) = ops::job_state(&db.pool, &format!("SIG{i}"))
            .await?
            .expect("job");
        // Paid at the provider but never verifiably answered: outcome unknown, for an operator.
        assert_eq!(cause.as_deref(), Some("outcome_unknown"));
    }
    // The simulator paid each once, however often it was asked.
    assert_eq!(sim.paid().len(), 10);
    shutdown.cancel();
    app.await??;
    sim.shutdown().await;
    Ok(())
}
