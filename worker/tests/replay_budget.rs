//! A replayed job gets a fresh retry budget: it is not killed again after one call.

mod common;

use std::time::Duration;

use shared::job::ProviderKind;
use shared::provider::Outcome;
use shared::state::State;
use shared::store::jobs::{self, Operator};
use shared::store::ops;
use testkit::{self, FakeProvider, request_json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_job_gets_a_fresh_retry_budget() -> anyhow::Result<()> {
    let (mut config, db) = testkit::test_config().await?;
    config.worker.retry.max_attempts = 2;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    let not_sent = || Outcome::NotSent {
        error: "connection refused".into(),
    };
    // Two failures exhaust the first budget; after the replay one more failure is retried.
    fake.script("RB1", vec![not_sent(), not_sent(), not_sent()]);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    let body = serde_json::to_vec(&request_json(
        "RB1",
        "ORB1",
        ProviderKind::Shengpay,
        "m1",
        500,
        100,
    ))?;
    testkit::publish_requests(&config, &[body]).await?;
    let pool = db.pool.clone();
    let state_is = |want: State| {
        let pool = pool.clone();
        move || {
            let pool = pool.clone();
            async move { Ok(ops::job_state(&pool, "RB1").await?.map(|s| s.0) == Some(want)) }
        }
    };
    testkit::wait_until(
        Duration::from_secs(20),
        "the job to die",
        state_is(State::Dead),
    )
    .await?;
    assert_eq!(fake.calls().get("RB1"), Some(&2));

    let mut tx = db.pool.begin().await?;
    let op = Operator {
        name: "sre",
        note: "provider was down; fixed",
    };
    jobs::replay(&mut tx, "RB1", op).await?;
    tx.commit().await?;
    // The sweeper takes the replayed (received) job; it fails once more, is retried, and pays.
    testkit::wait_until(
        Duration::from_secs(30),
        "the job to succeed",
        state_is(State::Succeeded),
    )
    .await?;
    assert_eq!(fake.calls().get("RB1"), Some(&4));
    assert_eq!(fake.paid().len(), 1);
    app.stop().await?;
    Ok(())
}
