//! Intake against the real PostgreSQL and RabbitMQ: every published message is accounted for.

mod common;

use std::time::Duration;

use shared::job::ProviderKind;
use shared::state::State;
use shared::store::ops;
use tools::testkit::{self, FakeProvider, request_json};

/// One way to break a valid request.
type Rule = Box<dyn Fn(&mut serde_json::Value)>;

fn invalid_bodies() -> Vec<Vec<u8>> {
    let base = |i: usize| {
        request_json(
            &format!("BAD{i:04}"),
            &format!("OBAD{i:04}"),
            ProviderKind::Shengpay,
            "m1",
            1000,
            100,
        )
    };
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut push = |i: usize, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base(i);
        f(&mut v);
        out.push(serde_json::to_vec(&v).unwrap());
    };
    // One of every rule, several times over with different refund numbers.
    let rules: Vec<Rule> = vec![
        Box::new(|v| v["version"] = 2.into()),
        Box::new(|v| v["refund_no"] = "bad refund no".into()),
        Box::new(|v| v["order_no"] = "".into()),
        Box::new(|v| v["provider"] = "paypal".into()),
        Box::new(|v| v["merchant"] = "unknown-merchant".into()),
        Box::new(|v| v["total_fee"] = 0.into()),
        Box::new(|v| v["refund_fee"] = 2000.into()),
        Box::new(|v| v["refund_fee"] = serde_json::json!(1.5)),
        Box::new(|v| v["refund_fee"] = "100".into()),
        Box::new(|v| v["reason"] = "bell\u{7}".into()),
        Box::new(|v| v["requested_at"] = "noon".into()),
        Box::new(|v| v["shengpay"] = serde_json::json!({"refund_account": "ELSEWHERE"})),
        Box::new(|v| v["unexpected"] = true.into()),
        Box::new(|v| {
            v.as_object_mut().unwrap().remove("total_fee");
        }),
        Box::new(|v| v["provider"] = "wupay".into()),
    ];
    for i in 0..45 {
        push(i, &*rules[i % rules.len()]);
    }
    out.push(b"{\"version\":1,\"refund_no\":\"BADUTF\xff\"}".to_vec());
    out.push(br#"{"version":1,"refund_no":"BADDUP","refund_no":"BADDUP2","order_no":"O","provider":"shengpay","merchant":"m1","total_fee":10,"refund_fee":1}"#.to_vec());
    let mut big = base(46);
    big["reason"] = "x".repeat(70 * 1024).into();
    out.push(serde_json::to_vec(&big).unwrap());
    out.push(b"not json at all".to_vec());
    out.push(b"[1,2,3]".to_vec());
    assert_eq!(out.len(), 50);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_published_message_becomes_exactly_one_job_rejection_conflict_or_duplicate()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    let app = common::spawn_app(&config, vec![fake.clone()]);

    let valid: Vec<serde_json::Value> = (0..1000)
        .map(|i| {
            request_json(
                &format!("R{i:06}"),
                &format!("O{:06}", i / 2),
                ProviderKind::Shengpay,
                "m1",
                1000,
                100,
            )
        })
        .collect();
    let mut bodies: Vec<Vec<u8>> = valid
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .collect();
    bodies.extend(invalid_bodies());
    // 100 same-content repeats (pretty-printed: same content, other bytes) and 100 conflicts.
    for v in valid.iter().take(100) {
        bodies.push(serde_json::to_vec_pretty(v).unwrap());
    }
    for v in valid.iter().skip(100).take(100) {
        let mut c = v.clone();
        c["refund_fee"] = 99.into();
        bodies.push(serde_json::to_vec(&c).unwrap());
    }
    assert_eq!(bodies.len(), 1250);
    testkit::publish_requests(&config, &bodies).await?;

    let pool = db.pool.clone();
    testkit::wait_until(
        Duration::from_secs(60),
        "every job final and every message consumed",
        || {
            let pool = pool.clone();
            let config = config.clone();
            async move {
                let counts = ops::counts_by_state(&pool).await?;
                let succeeded = counts.get(&State::Succeeded).copied().unwrap_or(0);
                let depth = testkit::queue_depth(&config, &config.amqp.queue).await?;
                let rejected = ops::count_rejected(&pool, "rejected").await?;
                let conflicts = ops::count_rejected(&pool, "conflict").await?;
                Ok(succeeded == 1000 && rejected >= 50 && conflicts >= 100 && depth == 0)
            }
        },
    )
    .await?;
    let counts = ops::counts_by_state(&db.pool).await?;
    assert_eq!(counts.values().sum::<i64>(), 1000, "{counts:?}");
    assert_eq!(ops::count_rejected(&db.pool, "rejected").await?, 50);
    assert_eq!(ops::count_rejected(&db.pool, "conflict").await?, 100);
    // Rejections and conflicts are dead-lettered: 150 in the DLQ; nothing left unconsumed.
    testkit::wait_until(Duration::from_secs(10), "150 dead letters", || {
        let config = config.clone();
        async move { Ok(testkit::queue_depth(&config, &config.amqp.dead_letter_queue).await? == 150) }
    })
    .await?;
    // Each job was paid once, and only the valid ones were ever sent.
    let calls = fake.calls();
    assert_eq!(calls.len(), 1000);
    assert!(calls.values().all(|n| *n == 1), "a refund was called twice");
    assert_eq!(ops::ledger(&db.pool).await?.len(), 1000);
    app.stop().await?;
    Ok(())
}
