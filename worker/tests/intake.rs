//! Intake against the real PostgreSQL and RabbitMQ: every published message is accounted for.

mod common;

use std::time::Duration;

use shared::job::ProviderKind;
use shared::state::State;
use shared::store::ops;
use testkit::{self, FakeProvider, request_json};

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

/// Messages PostgreSQL cannot store as they came: a U+0000 in a value that is echoed into the
/// reason, in a field name, in the provider name, in the refund number, plus a body far over
/// the size limit. Each carries a readable refund number where it can, so that its rejection
/// also writes an event.
fn unstorable_bodies() -> Vec<Vec<u8>> {
    let base = |i: usize| {
        request_json(
            &format!("NUL{i:03}"),
            &format!("ONUL{i:03}"),
            ProviderKind::Shengpay,
            "m1",
            1000,
            100,
        )
    };
    let mut out = Vec::new();
    let mut v = base(0);
    v["shengpay"] = serde_json::json!({"refund_account": "UN\u{0}SETTLED"});
    out.push(serde_json::to_vec(&v).unwrap());
    let mut v = base(1);
    v["\u{0}"] = 1.into();
    out.push(serde_json::to_vec(&v).unwrap());
    let mut v = base(2);
    v["provider"] = "shengpay\u{0}".into();
    out.push(serde_json::to_vec(&v).unwrap());
    let mut v = base(3);
    v["refund_no"] = "NUL\u{0}003".into();
    out.push(serde_json::to_vec(&v).unwrap());
    let mut v = base(4);
    v["reason"] = "a\u{0}b".into();
    out.push(serde_json::to_vec(&v).unwrap());
    let mut v = base(5);
    v["extra\u{0}field"] = "x\u{0}".into();
    out.push(serde_json::to_vec(&v).unwrap());
    let mut v = base(6);
    v["reason"] = "\u{0}".repeat(300 * 1024).into();
    out.push(serde_json::to_vec(&v).unwrap());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_postgres_cannot_store_as_it_came_is_dead_lettered_and_intake_goes_on()
-> anyhow::Result<()> {
    let (mut config, db) = testkit::test_config().await?;
    // Batches as large as the test's interleaving, so every bad message shares a batch.
    config.worker.intake_batch = 32;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    let app = common::spawn_app(&config, vec![fake.clone()]);

    let bad = unstorable_bodies();
    let mut bodies = Vec::new();
    for i in 0..300 {
        let v = request_json(
            &format!("OK{i:05}"),
            &format!("OOK{i:05}"),
            ProviderKind::Shengpay,
            "m1",
            1000,
            100,
        );
        bodies.push(serde_json::to_vec(&v).unwrap());
        if i % 40 == 20 {
            bodies.push(bad[(i / 40) % bad.len()].clone());
        }
    }
    bodies.extend(bad.iter().cloned());
    let poison = bodies.len() - 300;
    testkit::publish_requests(&config, &bodies).await?;

    let pool = db.pool.clone();
    testkit::wait_until(
        Duration::from_secs(60),
        "every valid job succeeded and every message consumed",
        || {
            let pool = pool.clone();
            let config = config.clone();
            async move {
                let counts = ops::counts_by_state(&pool).await?;
                let succeeded = counts.get(&State::Succeeded).copied().unwrap_or(0);
                let depth = testkit::queue_depth(&config, &config.amqp.queue).await?;
                Ok(succeeded == 300 && depth == 0)
            }
        },
    )
    .await?;
    // Every bad message is stored (a repeat of the same bytes is one row) and dead-lettered.
    assert_eq!(
        ops::count_rejected(&db.pool, "rejected").await?,
        bad.len() as i64
    );
    testkit::wait_until(
        Duration::from_secs(10),
        "every bad message dead-lettered",
        || {
            let config = config.clone();
            async move {
                Ok(
                    testkit::queue_depth(&config, &config.amqp.dead_letter_queue).await?
                        == poison as u32,
                )
            }
        },
    )
    .await?;
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT field, reason FROM rejected_messages ORDER BY id")
            .fetch_all(&db.pool)
            .await?;
    for (field, reason) in &stored {
        assert!(
            !field.contains('\0') && !reason.contains('\0'),
            "{field}: {reason}"
        );
    }
    assert!(fake.calls().keys().all(|no| no.starts_with("OK")));
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_effect_cannot_be_written_is_stored_as_unstorable_and_its_batch_goes_on()
-> anyhow::Result<()> {
    let (mut config, db) = testkit::test_config().await?;
    config.worker.intake_batch = 32;
    // Any failure that is not the connection's, whatever its cause: here the database refuses
    // one job outright.
    sqlx::raw_sql(
        "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.refund_no = 'BOOM' THEN RAISE EXCEPTION 'refused by a test trigger'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER test_refuse BEFORE INSERT ON jobs
             FOR EACH ROW EXECUTE FUNCTION test_refuse();",
    )
    .execute(&db.pool)
    .await?;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    let mut bodies = Vec::new();
    for i in 0..60 {
        let no = if i == 30 {
            "BOOM".to_owned()
        } else {
            format!("OKB{i:03}")
        };
        let v = request_json(
            &no,
            &format!("O{no}"),
            ProviderKind::Shengpay,
            "m1",
            1000,
            100,
        );
        bodies.push(serde_json::to_vec(&v).unwrap());
    }
    testkit::publish_requests(&config, &bodies).await?;
    testkit::wait_until(
        Duration::from_secs(60),
        "59 jobs succeeded and the queue empty",
        || {
            let pool = db.pool.clone();
            let config = config.clone();
            async move {
                let counts = ops::counts_by_state(&pool).await?;
                let depth = testkit::queue_depth(&config, &config.amqp.queue).await?;
                Ok(counts.get(&State::Succeeded).copied().unwrap_or(0) == 59 && depth == 0)
            }
        },
    )
    .await?;
    let (field, reason): (String, String) =
        sqlx::query_as("SELECT field, reason FROM rejected_messages")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(field, "$");
    assert!(reason.contains("refused by a test trigger"), "{reason}");
    testkit::wait_until(Duration::from_secs(10), "BOOM dead-lettered", || {
        let config = config.clone();
        async move { Ok(testkit::queue_depth(&config, &config.amqp.dead_letter_queue).await? == 1) }
    })
    .await?;
    assert!(!fake.calls().contains_key("BOOM"));
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_merchants_protocol_cannot_carry_is_rejected_at_intake_naming_the_field()
-> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    // The real clients of config/refunds.toml's merchants, as the worker builds them.
    let text = std::fs::read_to_string(testkit::workspace_root().join("config/refunds.toml"))?;
    let mut config = shared::config::Config::from_toml(&text)?;
    testkit::point_merchants(&mut config, "http://127.0.0.1:9", |m| {
        Some(format!("http://127.0.0.1:9/{m}/WuPay.asmx"))
    })?;
    let registry = worker::app::build_registry(&config)?;
    let admit = |r: &shared::job::RefundRequest| registry.admit(r);
    let mut ambiguous = request_json("AD1", "OAD1", ProviderKind::Shengpay, "93751497", 1000, 100);
    ambiguous["reason"] = "a=1&refundFee=1".into();
    let mut too_big = request_json(
        "AD2",
        "OAD2",
        ProviderKind::Wupay,
        "wu-soap11",
        3_000_000_000,
        2_500_000_000,
    );
    too_big["reason"] = "big".into();
    let mut markup = request_json("AD3", "OAD3", ProviderKind::Wupay, "wu-get", 1000, 100);
    markup["reason"] = "returned <b>goods</b>".into();
    let mut fine = request_json("AD4", "OAD4", ProviderKind::Wupay, "wu-soap11", 1000, 100);
    fine["reason"] = "returned <b>goods</b>".into();
    let mut results = Vec::new();
    for v in [&ambiguous, &too_big, &markup, &fine] {
        let body = serde_json::to_vec(v)?;
        let msg = shared::store::intake::Incoming {
            body: &body,
            message_id: None,
            redelivered: false,
        };
        let mut tx = db.pool.begin().await?;
        let r =
            shared::store::intake::take(&mut tx, &msg, &admit, chrono_tz::Asia::Shanghai).await?;
        tx.commit().await?;
        results.push(r);
    }
    let field = |r: &shared::store::intake::IntakeResult| match r {
        shared::store::intake::IntakeResult::Rejected { rejection, .. } => {
            Some(rejection.field.clone())
        }
        _ => None,
    };
    assert_eq!(
        field(&results[0]).as_deref(),
        Some("reason"),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(
            field(&results[1]).as_deref(),
            Some("total_fee" | "refund_fee")
        ),
        "{:?}",
        results[1]
    );
    assert_eq!(
        field(&results[2]).as_deref(),
        Some("reason"),
        "{:?}",
        results[2]
    );
    assert!(
        matches!(
            results[3],
            shared::store::intake::IntakeResult::Created { .. }
        ),
        "SOAP carries markup escaped: {:?}",
        results[3]
    );
    Ok(())
}
