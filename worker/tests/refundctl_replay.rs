//! `refundctl dlq replay` against the real PostgreSQL and RabbitMQ: only jobs that are still
//! dead and safe to send again are replayed, every decision is audited, nothing is paid twice.

mod common;
mod refundctl_common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use refundctl_common as rc;
use shared::job::ProviderKind;
use shared::provider::Outcome;
use shared::state::{Cause, State};
use shared::store::ops;
use testkit::{self, FakeProvider};
use worker::ctl::Status;
use worker::ctl::dlq::{self, ReplayOutcome};
use worker::ctl::job::{self, ResolveAs};

async fn wait_for_state(
    pool: &sqlx::PgPool,
    refund_nos: &[&str],
    state: &str,
) -> anyhow::Result<()> {
    let nos: Vec<String> = refund_nos.iter().map(|s| s.to_string()).collect();
    testkit::wait_until(
        Duration::from_secs(30),
        &format!("{refund_nos:?} {state}"),
        || {
            let pool = pool.clone();
            let nos = nos.clone();
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM jobs WHERE refund_no = ANY($1) AND state = $2",
                )
                .bind(&nos)
                .bind(state)
                .fetch_one(&pool)
                .await?;
                Ok(n as usize == nos.len())
            }
        },
    )
    .await
}

/// The acceptance scenario of issue #6, with the worker running against fake providers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_all_re_enqueues_only_jobs_still_dead_and_safe_refuses_the_rest_and_pays_nothing_twice()
-> anyhow::Result<()> {
    // carol's resolution applies at once (one person).
    let (mut config, db) = rc::one_person(testkit::test_config().await?);
    config.worker.retry.max_attempts = 2;
    let sp = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    let wu = FakeProvider::new(ProviderKind::Wupay, "w1", false);
    let later = || rc::retry_later("SYSTEMERROR");
    // Retries exhausted at an idempotent merchant: to be replayed.
    for no in ["A1", "A2", "A3"] {
        sp.script(no, vec![later(), later()]);
    }
    // Outcome unknown at a non-idempotent merchant: never sent again blindly.
    wu.script("B1", vec![rc::maybe_delivered()]);
    // Retries exhausted, then replayed by someone else meanwhile: succeeded by replay time.
    sp.script("C1", vec![later(), later()]);
    // Refused by the provider, then resolved as failed meanwhile.
    sp.script("D1", vec![rc::request_rejected("SIGN_ERROR")]);
    // Outcome unknown at an idempotent merchant (unrecognised answer): safe to send again.
    sp.script(
        "E1",
        vec![Outcome::Unrecognised {
            result: "PENDING?".into(),
            raw: "PENDING?".into(),
        }],
    );
    let app = common::spawn_app(&config, vec![sp.clone(), wu.clone()]);
    let all = ["A1", "A2", "A3", "B1", "C1", "D1", "E1"];
    let bodies: Vec<Vec<u8>> = all
        .iter()
        .map(|no| rc::body(no, if *no == "B1" { "w1" } else { "m1" }))
        .collect();
    testkit::publish_requests(&config, &bodies).await?;
    wait_for_state(&db.pool, &all, "dead").await?;
    let ctl = rc::ctl(&config, &db.pool);

    // The dead-letter set as `dlq replay --all` sees it when it starts.
    let mut bob = rc::replay_all("bob");
    bob.rate = 50.0;
    let snapshot = dlq::select(&ctl, &bob).await?;
    assert_eq!(
        snapshot.iter().map(String::as_str).collect::<HashSet<_>>(),
        all.iter().copied().collect::<HashSet<_>>()
    );

    // Meanwhile: alice replays C1 (and the worker pays it), carol resolves D1 as failed.
    let mut out = Vec::new();
    let alice = dlq::replay(&ctl, &rc::replay_these("alice", &["C1"]), &mut out).await?;
    assert_eq!(alice.replayed(), vec!["C1"], "{}", rc::text(&out));
    wait_for_state(&db.pool, &["C1"], "succeeded").await?;
    let carol = job::resolve(
        &ctl,
        &rc::resolve_args("D1", ResolveAs::Failed, None, "carol"),
        &mut Vec::new(),
    )
    .await?;
    assert_eq!(carol.status(), Status::Done);

    // Now bob's replay works through its selection, re-checking each job.
    let mut out = Vec::new();
    let report = dlq::replay_selected(&ctl, &bob, &snapshot, &mut out).await?;
    let printed = rc::text(&out);
    let replayed: HashSet<&str> = report.replayed().into_iter().collect();
    assert_eq!(
        replayed,
        HashSet::from(["A1", "A2", "A3", "E1"]),
        "{printed}"
    );
    assert!(
        matches!(report.outcome("B1"), Some(ReplayOutcome::Refused { prior: Some(State::Dead), reason }) if reason.contains("outcome unknown")),
        "{printed}"
    );
    assert!(
        matches!(report.outcome("C1"), Some(ReplayOutcome::Refused { prior: Some(State::Succeeded), reason }) if reason.contains("succeeded, not dead")),
        "{printed}"
    );
    assert!(
        matches!(report.outcome("D1"), Some(ReplayOutcome::Refused { prior: Some(State::Failed), reason }) if reason.contains("failed, not dead")),
        "{printed}"
    );
    assert_eq!(report.status(), Status::Incomplete, "refusals exit 1");
    assert!(
        printed.contains("B1  refused: outcome unknown"),
        "{printed}"
    );
    assert!(
        printed.contains("replayed 4, refused 3 (of 7 selected)"),
        "{printed}"
    );

    // The replayed jobs run again under the same refund_no and are paid once.
    wait_for_state(&db.pool, &["A1", "A2", "A3", "E1"], "succeeded").await?;
    let calls = sp.calls();
    for no in ["A1", "A2", "A3", "C1"] {
        assert_eq!(calls[no], 3, "{no}: two failed calls and the one that paid");
    }
    assert_eq!(calls["D1"], 1, "a refused request is not sent again");
    assert_eq!(calls["E1"], 2);
    assert_eq!(
        wu.calls()["B1"],
        1,
        "outcome unknown at WuPay: never resent"
    );
    assert!(wu.paid().is_empty());
    let ledger = ops::ledger(&db.pool).await?;
    let booked: Vec<&str> = ledger.iter().map(|l| l.refund_no.as_str()).collect();
    assert_eq!(booked, vec!["A1", "A2", "A3", "C1", "E1"]);
    assert!(ledger.iter().all(|l| l.refund_fee == 100));
    assert_eq!(rc::state_of(&db.pool, "B1").await, "dead");
    assert_eq!(rc::state_of(&db.pool, "D1").await, "failed");

    // Every job of bob's run has its audit row: operator, note, prior state, time.
    for no in all {
        let rows: Vec<_> = rc::audit_rows(&db.pool, no)
            .await
            .into_iter()
            .filter(|r| r.0 == "bob")
            .collect();
        assert_eq!(rows.len(), 1, "{no}: {rows:?}");
        let (_, action, result, prior, reason) = &rows[0];
        assert_eq!(action, "replay");
        assert!(prior.is_some(), "{no}: prior state recorded");
        if replayed.contains(no) {
            assert_eq!(result, "replayed");
        } else {
            assert_eq!(result, "refused");
            assert!(reason.is_some(), "{no}: refusal reason recorded");
        }
    }
    let notes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operator_audit WHERE operator = 'bob' AND note = $1 AND at IS NOT NULL",
    )
    .bind("INC-42 provider outage over")
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(notes, 7);

    // Running it again finds only B1 dead, refuses it, and sends nothing.
    let again = dlq::replay(&ctl, &rc::replay_all("bob"), &mut Vec::new()).await?;
    assert!(again.replayed().is_empty());
    assert_eq!(again.refused(), vec!["B1"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sp.calls(),
        calls,
        "no provider call after the second replay"
    );
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replays_started_at_the_same_moment_enqueue_each_eligible_job_exactly_once()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let mut eligible = Vec::new();
    for i in 0..40 {
        let no = format!("X{i:03}");
        rc::dead_job(
            &db.pool,
            &no,
            "m1",
            rc::retry_later("SYSTEMERROR"),
            Cause::RetriesExhausted,
        )
        .await;
        eligible.push(no);
    }
    for i in 0..5 {
        rc::dead_job(
            &db.pool,
            &format!("U{i:03}"),
            "w1",
            rc::maybe_delivered(),
            Cause::OutcomeUnknown,
        )
        .await;
    }
    let ctl = Arc::new(rc::ctl(&config, &db.pool));
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut tasks = Vec::new();
    for name in ["ops-1", "ops-2"] {
        let (ctl, barrier) = (ctl.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let args = rc::replay_all(name);
            barrier.wait().await;
            let mut out = Vec::new();
            dlq::replay(&ctl, &args, &mut out).await
        }));
    }
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await??);
    }
    let mut replayed: Vec<&str> = reports.iter().flat_map(|r| r.replayed()).collect();
    replayed.sort();
    let expected: Vec<&str> = eligible.iter().map(String::as_str).collect();
    assert_eq!(
        replayed, expected,
        "each eligible job replayed by exactly one of the two"
    );
    for r in &reports {
        // Each saw the jobs still dead when it looked (the other may have taken some by then:
        // the two are simultaneous, not in step), always the 5 it must refuse; what the other
        // took between its look and its turn it refuses as no longer dead.
        let unknown = r.jobs.iter().filter(|j| j.refund_no.starts_with('U'));
        assert_eq!(unknown.count(), 5);
        assert!(r.jobs.len() <= 45, "{} jobs", r.jobs.len());
        for j in &r.jobs {
            if let ReplayOutcome::Refused { reason, .. } = &j.outcome
                && j.refund_no.starts_with('X')
            {
                assert!(reason.contains("received, not dead"), "{reason}");
            }
        }
    }
    // Exactly one message per eligible job reached the queue (no worker is consuming).
    testkit::wait_until(Duration::from_secs(10), "40 replayed messages", || {
        let config = config.clone();
        async move { Ok(testkit::queue_depth(&config, &config.amqp.queue).await? == 40) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(testkit::queue_depth(&config, &config.amqp.queue).await?, 40);
    // One dead -> received transition and one `replayed` audit row per eligible job.
    let per_job: Vec<(String, i64)> = sqlx::query_as(
        "SELECT refund_no, count(*) FROM job_transitions
         WHERE from_state = 'dead' AND to_state = 'received' GROUP BY refund_no ORDER BY refund_no",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(per_job.len(), 40);
    assert!(per_job.iter().all(|(_, n)| *n == 1));
    let audits: Vec<(String, i64)> = sqlx::query_as(
        "SELECT result, count(*) FROM operator_audit GROUP BY result ORDER BY result",
    )
    .fetch_all(&db.pool)
    .await?;
    // 40 replays, and a refusal audited for every job a replay saw and did not take: the 5
    // unsafe ones twice, and whatever the other took between the look and the turn.
    let refused: usize = reports.iter().map(|r| r.refused().len()).sum();
    assert!(refused >= 10, "{refused}");
    assert_eq!(
        audits,
        vec![
            ("refused".to_owned(), refused as i64),
            ("replayed".to_owned(), 40)
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_what_would_happen_to_each_job_and_changes_nothing() -> anyhow::Result<()>
{
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "R1", "m1", "SYSTEMERROR").await;
    rc::dead_job(
        &db.pool,
        "R2",
        "w1",
        rc::maybe_delivered(),
        Cause::OutcomeUnknown,
    )
    .await;
    rc::new_job(&db.pool, "R3", "m1").await;
    let ctl = rc::ctl(&config, &db.pool);
    let mut args = rc::replay_these("dave", &["R1", "R2", "R3", "NOPE"]);
    args.dry_run = true;
    let mut out = Vec::new();
    let report = dlq::replay(&ctl, &args, &mut out).await?;
    let printed = rc::text(&out);
    assert_eq!(report.would_replay(), vec!["R1"]);
    assert_eq!(report.refused(), vec!["R2", "R3", "NOPE"]);
    assert_eq!(report.status(), Status::Incomplete);
    assert!(
        printed.contains("R1  would replay  (dead -> received)"),
        "{printed}"
    );
    assert!(
        printed.contains("R2  would refuse: outcome unknown"),
        "{printed}"
    );
    assert!(
        printed.contains("R3  would refuse: job is received, not dead"),
        "{printed}"
    );
    assert!(
        printed.contains("NOPE  would refuse: no such job"),
        "{printed}"
    );
    assert!(printed.contains("nothing was changed"), "{printed}");
    let audits: i64 = sqlx::query_scalar("SELECT count(*) FROM operator_audit")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(audits, 0, "a dry run audits nothing");
    assert_eq!(rc::state_of(&db.pool, "R1").await, "dead");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_cause_takes_only_that_cause_and_an_unknown_refund_no_is_refused_and_audited()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "R1", "m1", "SYSTEMERROR").await;
    rc::dead_job(
        &db.pool,
        "R2",
        "m1",
        rc::request_rejected("SIGN_ERROR"),
        Cause::ProviderRejectedRequest,
    )
    .await;
    let ctl = rc::ctl(&config, &db.pool);
    let mut args = rc::replay_all("erin");
    args.all = false;
    args.cause = Some("provider_rejected_request".into());
    let report = dlq::replay(&ctl, &args, &mut Vec::new()).await?;
    assert_eq!(report.replayed(), vec!["R2"]);
    assert_eq!(report.status(), Status::Done);
    assert_eq!(rc::state_of(&db.pool, "R1").await, "dead");
    assert_eq!(rc::state_of(&db.pool, "R2").await, "received");
    // The request is published again unchanged: the same refund_no and content.
    testkit::wait_until(Duration::from_secs(10), "one replayed message", || {
        let config = config.clone();
        async move { Ok(testkit::queue_depth(&config, &config.amqp.queue).await? == 1) }
    })
    .await?;
    let conn = shared::broker::connect(&config.amqp_url, "test-get").await?;
    let ch = conn.create_channel().await?;
    let msg = ch
        .basic_get(
            config.amqp.queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await?
        .expect("the replayed message");
    let sent = shared::job::parse_request(&msg.delivery.data).expect("a valid v1 request");
    assert_eq!(
        sent,
        shared::job::parse_request(&rc::body("R2", "m1")).unwrap()
    );
    assert_eq!(
        msg.delivery.properties.delivery_mode(),
        &Some(2),
        "persistent"
    );
    conn.close(200, "done".into()).await?;

    let report = dlq::replay(&ctl, &rc::replay_these("erin", &["NOPE"]), &mut Vec::new()).await?;
    assert_eq!(
        report.outcome("NOPE"),
        Some(&ReplayOutcome::Refused {
            prior: None,
            reason: "no such job".into()
        })
    );
    assert_eq!(report.status(), Status::Incomplete);
    assert_eq!(rc::audit_rows(&db.pool, "NOPE").await.len(), 1);

    // Nothing dead of that cause any more: nothing to do, exit 0.
    let mut out = Vec::new();
    let report = dlq::replay(&ctl, &args, &mut out).await?;
    assert!(report.jobs.is_empty());
    assert_eq!(report.status(), Status::Done);
    assert!(rc::text(&out).contains("nothing to replay"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_the_idempotence_recorded_on_the_job_not_the_operators_config()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    // Created at WuPay merchant w1, which does not deduplicate: the outcome is unknown.
    rc::dead_job(
        &db.pool,
        "U1",
        "w1",
        rc::maybe_delivered(),
        Cause::OutcomeUnknown,
    )
    .await;
    // An operator whose config is stale (or wrong) says w1 deduplicates.
    let stale = worker::ctl::Idempotency::default().with("wupay", "w1", true);
    let ctl = worker::ctl::Ctl::new(config.clone(), db.pool.clone(), stale)?;
    for dry_run in [true, false] {
        let mut args = rc::replay_these("kim", &["U1"]);
        args.dry_run = dry_run;
        let report = dlq::replay(&ctl, &args, &mut Vec::new()).await?;
        let refused = matches!(
            report.outcome("U1"),
            Some(ReplayOutcome::Refused { reason, .. } | ReplayOutcome::WouldRefuse { reason, .. })
                if reason.contains("not idempotent")
        );
        assert!(refused, "dry run {dry_run}: {:?}", report.outcome("U1"));
    }
    assert_eq!(rc::state_of(&db.pool, "U1").await, "dead");
    Ok(())
}
