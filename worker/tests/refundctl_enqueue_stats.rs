//! `refundctl enqueue` and `refundctl stats` against the real PostgreSQL and RabbitMQ.

mod refundctl_common;

use std::time::Duration;

use refundctl_common as rc;
use shared::state::Cause;
use worker::ctl::Status;
use worker::ctl::enqueue::{self, EnqueueArgs};
use worker::ctl::stats::{self, StatsArgs};

fn temp_file(contents: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "refundctl-enqueue-{}.jsonl",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, contents).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_publishes_valid_lines_with_confirms_and_reports_invalid_lines_with_their_reasons()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let ctl = rc::ctl(&config, &db.pool);
    let valid = |i: usize| rc::text(&rc::body(&format!("R{i:04}"), "m1"));
    let mut lines: Vec<String> = (0..300).map(valid).collect();
    // Line numbers are 1-based: these land on lines 5, 11, 21 and 31 (a blank line is 8).
    lines.insert(
        4,
        valid(1).replace("\"refund_fee\":100", "\"refund_fee\":1.5"),
    );
    lines.insert(7, "   ".into());
    lines.insert(10, "{\"version\":1,".into());
    lines.insert(
        20,
        valid(2).replace("\"version\":1", "\"version\":1,\"extra\":true"),
    );
    lines.insert(
        30,
        valid(3).replace("\"provider\":\"shengpay\"", "\"provider\":\"paypal\""),
    );
    let path = temp_file(&(lines.join("\r\n") + "\n"));

    let mut out = Vec::new();
    let report = enqueue::enqueue(&ctl, &EnqueueArgs { file: path.clone() }, &mut out).await?;
    let printed = rc::text(&out);
    let _ = std::fs::remove_file(&path);
    assert_eq!(report.accepted, 300, "{printed}");
    assert_eq!(report.blank, 1);
    let invalid: Vec<(usize, &str)> = report
        .invalid
        .iter()
        .map(|p| (p.line, p.field.as_str()))
        .collect();
    assert_eq!(
        invalid,
        vec![
            (5, "refund_fee"),
            // Whatever the intake parser names for a truncated document.
            (
                11,
                shared::job::parse_request(b"{\"version\":1,")
                    .unwrap_err()
                    .field
                    .as_str()
            ),
            (21, "extra"),
            (31, "provider")
        ],
        "{printed}"
    );
    assert_eq!(report.invalid[0].refund_no.as_deref(), Some("R0001"));
    assert_eq!(report.status(), Status::Incomplete);
    assert!(
        printed.contains("line 5: invalid: refund_fee:"),
        "{printed}"
    );
    assert!(
        printed.contains("accepted 300, invalid 4 (304 lines, 1 blank skipped)"),
        "{printed}"
    );
    testkit::wait_until(Duration::from_secs(10), "300 messages queued", || {
        let config = config.clone();
        async move { Ok(testkit::queue_depth(&config, &config.amqp.queue).await? == 300) }
    })
    .await?;

    // A file with only valid lines exits 0.
    let path = temp_file(&format!("{}\n{}\n", valid(900), valid(901)));
    let report =
        enqueue::enqueue(&ctl, &EnqueueArgs { file: path.clone() }, &mut Vec::new()).await?;
    let _ = std::fs::remove_file(&path);
    assert_eq!(report.accepted, 2);
    assert_eq!(report.status(), Status::Done);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_counts_jobs_by_state_names_the_oldest_non_final_job_and_the_dlq_depth()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::new_job(&db.pool, "R1", "m1").await;
    rc::exhausted_job(&db.pool, "R2", "m1", "SYSTEMERROR").await;
    rc::dead_job(
        &db.pool,
        "R3",
        "w1",
        rc::maybe_delivered(),
        Cause::OutcomeUnknown,
    )
    .await;
    rc::take(&db.pool, b"not json").await;
    // Declares the topology, so the broker's dead-letter queue exists.
    testkit::publish_requests(&config, &[]).await?;
    let ctl = rc::ctl(&config, &db.pool);
    let mut out = Vec::new();
    let s = stats::stats(&ctl, &StatsArgs { json: true }, &mut out).await?;
    let v: serde_json::Value = serde_json::from_slice(&out)?;
    assert_eq!(v["counts"]["received"], 1);
    assert_eq!(v["counts"]["dead"], 2);
    assert_eq!(v["counts"]["succeeded"], 0);
    assert_eq!(v["total"], 3);
    assert_eq!(v["oldest_non_final"]["refund_no"], "R1");
    assert_eq!(v["oldest_in_progress"]["refund_no"], "R1");
    assert_eq!(v["dlq"]["dead_jobs"], 2);
    assert_eq!(v["dlq"]["poison_messages"], 1);
    assert_eq!(v["dlq"]["depth"], 3);
    // The broker answered (nothing was dead-lettered through it in this test).
    assert_eq!(s.dlq.broker_error, None);
    assert_eq!(s.dlq.broker_messages, Some(0));

    let mut out = Vec::new();
    stats::stats(&ctl, &StatsArgs { json: false }, &mut out).await?;
    let printed = rc::text(&out);
    assert!(
        printed.contains("DLQ depth: 3 (2 dead jobs + 1 poison messages; 0 discarded"),
        "{printed}"
    );
    assert!(
        printed.contains("Oldest non-final job:   R1 (received)"),
        "{printed}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_shows_each_merchants_limit_its_rate_now_and_a_pause() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    shared::store::budgets::configure(&db.pool, &[("wupay".into(), "w1".into(), 200.0, 10)], &[])
        .await?;
    shared::store::budgets::pause(
        &db.pool,
        "shengpay",
        "m1",
        std::time::Duration::from_secs(60),
        "80% or more of the last 20 calls failed",
    )
    .await?;
    testkit::publish_requests(&config, &[]).await?;
    let ctl = rc::ctl(&config, &db.pool);
    let mut out = Vec::new();
    stats::stats(&ctl, &StatsArgs { json: true }, &mut out).await?;
    let v: serde_json::Value = serde_json::from_slice(&out)?;
    let merchants = v["merchants"].as_array().cloned().unwrap_or_default();
    assert_eq!(merchants.len(), 2, "{v}");
    assert_eq!(merchants[0]["merchant"], "m1");
    assert!(merchants[0]["paused_until"].is_string());
    assert_eq!(merchants[1]["rate_per_sec"], 200.0);
    assert_eq!(merchants[1]["permille"], 1000);

    let mut out = Vec::new();
    stats::stats(&ctl, &StatsArgs { json: false }, &mut out).await?;
    let printed = rc::text(&out);
    assert!(printed.contains("Merchants (flow control)"), "{printed}");
    assert!(printed.contains("200.0/s, burst 10"), "{printed}");
    assert!(
        printed.contains("PAUSED since") && printed.contains("80% or more of the last 20 calls"),
        "{printed}"
    );
    Ok(())
}
