//! `refundctl dlq list`: dead jobs grouped by fingerprint, poison messages with their reasons,
//! filters, and one JSON object per dead job.

mod refundctl_common;

use refundctl_common as rc;
use shared::state::Cause;
use shared::store::intake::IntakeResult;
use worker::ctl::dlq::{self, ListArgs};

fn args(cause: Option<&str>, provider: Option<&str>, json: bool) -> ListArgs {
    ListArgs {
        cause: cause.map(str::to_owned),
        provider: provider.map(str::to_owned),
        json,
        ..Default::default()
    }
}

/// 3 retries_exhausted/shengpay/SYSTEMERROR, 2 outcome_unknown/wupay/MAYBE_DELIVERED,
/// 1 provider_rejected_request/shengpay/SIGN_ERROR, a succeeded job, 3 rejected messages
/// (2 on refund_fee, 1 not JSON) and a conflict.
async fn dead_letter_set(pool: &sqlx::PgPool) {
    for no in ["E1", "E2", "E3"] {
        rc::exhausted_job(pool, no, "m1", "SYSTEMERROR").await;
    }
    for no in ["U1", "U2"] {
        rc::dead_job(pool, no, "w1", rc::maybe_delivered(), Cause::OutcomeUnknown).await;
    }
    rc::dead_job(
        pool,
        "S1",
        "m1",
        rc::request_rejected("SIGN_ERROR"),
        Cause::ProviderRejectedRequest,
    )
    .await;
    rc::new_job(pool, "OK1", "m1").await;
    rc::call(
        pool,
        "OK1",
        rc::accepted("OK1"),
        shared::workflow::Decision::Succeed,
    )
    .await;
    for (no, fee) in [("BAD1", "1.5"), ("BAD2", "\"100\"")] {
        let body = String::from_utf8(rc::body(no, "m1"))
            .unwrap()
            .replace("\"refund_fee\":100", &format!("\"refund_fee\":{fee}"));
        let r = rc::take(pool, body.as_bytes()).await;
        assert!(matches!(r, IntakeResult::Rejected { .. }), "{r:?}");
    }
    assert!(matches!(
        rc::take(pool, b"not json at all").await,
        IntakeResult::Rejected { .. }
    ));
    let conflicting = String::from_utf8(rc::body("E1", "m1"))
        .unwrap()
        .replace("\"refund_fee\":100", "\"refund_fee\":99");
    assert!(matches!(
        rc::take(pool, conflicting.as_bytes()).await,
        IntakeResult::Conflict { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_jobs_are_grouped_by_cause_provider_and_code_with_counts_and_ages_and_poison_is_listed_with_reasons()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    dead_letter_set(&db.pool).await;
    let ctl = rc::ctl(&config, &db.pool);
    let mut out = Vec::new();
    let r = dlq::list(&ctl, &args(None, None, false), &mut out).await?;
    let printed = rc::text(&out);
    let fingerprints: Vec<(&str, &str, Option<&str>, i64)> = r
        .groups
        .iter()
        .map(|g| {
            (
                g.cause.as_str(),
                g.provider.as_str(),
                g.code.as_deref(),
                g.count,
            )
        })
        .collect();
    assert_eq!(
        fingerprints,
        vec![
            ("retries_exhausted", "shengpay", Some("SYSTEMERROR"), 3),
            ("outcome_unknown", "wupay", Some("MAYBE_DELIVERED"), 2),
            (
                "provider_rejected_request",
                "shengpay",
                Some("SIGN_ERROR"),
                1
            ),
        ]
    );
    for g in &r.groups {
        assert!(g.oldest <= g.newest);
    }
    assert_eq!(r.dead_jobs(), 6);
    let poison: Vec<(&str, &str, i64)> = r
        .poison
        .iter()
        .map(|g| (g.kind.as_str(), g.field.as_str(), g.messages))
        .collect();
    assert_eq!(
        poison,
        vec![
            ("rejected", "refund_fee", 2),
            ("conflict", "refund_no", 1),
            ("rejected", "$", 1),
        ]
    );
    let conflict = r.poison.iter().find(|g| g.kind == "conflict").unwrap();
    assert!(
        conflict.sample_reason.contains("already exists"),
        "{}",
        conflict.sample_reason
    );
    assert!(printed.contains("Dead jobs: 6 in 3 groups"), "{printed}");
    assert!(printed.contains("SYSTEMERROR"), "{printed}");
    assert!(
        printed.contains("Poison messages: 4 in 3 groups"),
        "{printed}"
    );
    assert!(printed.contains(" ago)"), "ages are shown: {printed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_cause_and_provider_select_groups_and_poison_kinds() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    dead_letter_set(&db.pool).await;
    let ctl = rc::ctl(&config, &db.pool);

    let r = dlq::list(
        &ctl,
        &args(Some("outcome_unknown"), None, false),
        &mut Vec::new(),
    )
    .await?;
    assert_eq!(r.groups.len(), 1);
    assert_eq!(r.groups[0].count, 2);
    assert!(r.poison.is_empty(), "no poison message has that cause");

    let r = dlq::list(&ctl, &args(None, Some("shengpay"), false), &mut Vec::new()).await?;
    assert_eq!(r.dead_jobs(), 4);
    assert!(r.groups.iter().all(|g| g.provider == "shengpay"));
    assert!(r.poison.is_empty(), "poison messages belong to no provider");

    let r = dlq::list(&ctl, &args(Some("rejected"), None, false), &mut Vec::new()).await?;
    assert!(r.groups.is_empty());
    assert_eq!(r.poison_messages(), 3);
    assert!(r.poison.iter().all(|g| g.kind == "rejected"));

    let mut out = Vec::new();
    let r = dlq::list(
        &ctl,
        &args(Some("nothing_like_this"), None, false),
        &mut out,
    )
    .await?;
    assert!(r.groups.is_empty() && r.poison.is_empty());
    assert!(rc::text(&out).contains("Dead jobs: none"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_prints_one_object_per_dead_job_and_per_poison_message() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    dead_letter_set(&db.pool).await;
    let ctl = rc::ctl(&config, &db.pool);
    let mut out = Vec::new();
    let r = dlq::list(&ctl, &args(None, None, true), &mut out).await?;
    let lines: Vec<serde_json::Value> = rc::text(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!(r.json_lines, 10);
    let jobs: Vec<&serde_json::Value> = lines.iter().filter(|l| l["type"] == "dead_job").collect();
    assert_eq!(jobs.len(), 6);
    let e1 = jobs.iter().find(|j| j["refund_no"] == "E1").unwrap();
    assert_eq!(e1["cause"], "retries_exhausted");
    assert_eq!(e1["provider"], "shengpay");
    assert_eq!(e1["merchant"], "m1");
    assert_eq!(e1["code"], "SYSTEMERROR");
    assert_eq!(e1["attempts"], 2);
    assert!(e1["died_at"].is_string());
    let poison: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["type"] == "poison_message")
        .collect();
    assert_eq!(poison.len(), 4);
    assert!(poison.iter().all(|p| p["reason"].is_string()));
    assert!(poison.iter().any(|p| p["refund_no"] == "BAD1"));

    let mut out = Vec::new();
    dlq::list(&ctl, &args(None, Some("wupay"), true), &mut out).await?;
    let wupay: Vec<serde_json::Value> = rc::text(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(wupay.len(), 2);
    assert!(wupay.iter().all(|l| l["provider"] == "wupay"));
    Ok(())
}
