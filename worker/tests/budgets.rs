//! The shared merchant budget (`store::budgets`, migration `flow_control`) against the real
//! PostgreSQL: slots taken concurrently by many callers never put more than
//! `rate × W + burst` calls in a window, a slow-down halves the rate and is debounced, and one
//! caller at a time wins a paused merchant's probe.

use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::store::budgets;

fn reach(ahead_ms: u64) -> budgets::Reach {
    budgets::Reach {
        lead: Duration::ZERO,
        ahead: Duration::from_millis(ahead_ms),
        slack: Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_takes_never_hand_out_more_than_the_rate_and_the_burst() -> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    budgets::configure(&db.pool, &[("wupay".into(), "w1".into(), 100.0, 5)], &[]).await?;
    // Eight "replicas" take batches of up to 7 slots as fast as they can for about a second.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let pool = db.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut slots: Vec<DateTime<Utc>> = Vec::new();
            let until = std::time::Instant::now() + Duration::from_millis(1_200);
            while std::time::Instant::now() < until {
                let g = budgets::take(&pool, "wupay", "w1", 7, reach(50), Duration::from_secs(30))
                    .await?;
                slots.extend((0..g.granted).map(|k| g.slot(k)));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(slots)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    assert!(
        all.len() >= 100,
        "only {} slots in 1.2 s at 100/s",
        all.len()
    );
    // Distinct slots, at least a step apart after the burst.
    for w in all.windows(2).skip(5) {
        assert!(
            w[1] - w[0] >= chrono::Duration::microseconds(9_999),
            "{w:?}"
        );
    }
    let mut start = 0;
    for end in 0..all.len() {
        while all[end] - all[start] >= chrono::Duration::seconds(1) {
            start += 1;
        }
        assert!(
            end - start < 100 + 5,
            "{} slots in one second",
            end - start + 1
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_down_halves_the_rate_once_per_debounce_and_never_below_its_floor()
-> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    budgets::configure(&db.pool, &[("wupay".into(), "w1".into(), 100.0, 1)], &[]).await?;
    let recover = Duration::from_secs(3_600);
    let debounce = Duration::from_secs(60);
    let first = budgets::slow_down(&db.pool, "wupay", "w1", 100, recover, debounce).await?;
    assert_eq!(first, Some(500));
    // Within the debounce: the same overload, no second cut.
    let again = budgets::slow_down(&db.pool, "wupay", "w1", 100, recover, debounce).await?;
    assert!(again.is_some_and(|p| (499..=501).contains(&p)), "{again:?}");
    for _ in 0..6 {
        budgets::slow_down(&db.pool, "wupay", "w1", 100, recover, Duration::ZERO).await?;
    }
    let states = budgets::states(&db.pool, recover).await?;
    assert!((100..=101).contains(&states[0].permille), "{:?}", states[0]);
    // The step between slots follows the cut rate: 10 calls/s, 100 ms apart.
    let g = budgets::take(&db.pool, "wupay", "w1", 3, reach(500), recover).await?;
    assert!(g.step >= Duration::from_millis(99), "{g:?}");
    // An unlimited merchant has nothing to cut.
    assert_eq!(
        budgets::slow_down(&db.pool, "wupay", "w2", 100, recover, debounce).await?,
        None
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_caller_wins_a_paused_merchants_probe_and_an_answer_resumes_it() -> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    // Long enough that no caller, however late, reaches the next probe.
    let probe = Duration::from_secs(30);
    budgets::pause(&db.pool, "shengpay", "m1", Duration::ZERO, "test").await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let pool = db.pool.clone();
        tasks.push(tokio::spawn(async move {
            budgets::probe(&pool, "shengpay", "m1", probe).await
        }));
    }
    let mut winners = 0;
    for t in tasks {
        let (won, until) = t.await??;
        assert!(until.is_some());
        winners += usize::from(won);
    }
    assert_eq!(winners, 1);
    // Paused: a take grants nothing.
    let g = budgets::take(
        &db.pool,
        "shengpay",
        "m1",
        5,
        reach(100),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(g.granted, 0);
    assert!(g.paused_until.is_some());
    assert!(budgets::resume(&db.pool, "shengpay", "m1").await?);
    let (won, until) = budgets::probe(&db.pool, "shengpay", "m1", probe).await?;
    assert!(!won && until.is_none(), "resumed");
    Ok(())
}
