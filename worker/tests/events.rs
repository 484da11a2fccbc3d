//! The outcome-events contract (DESIGN §6, docs/events.md) against the real PostgreSQL and
//! RabbitMQ: what order systems receive on `refunds.events`, and what is written to the outbox
//! for the relay to send.

mod common;
mod refundctl_common;

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use refundctl_common as rc;
use shared::config::Config;
use shared::job::ProviderKind;
use shared::provider::Outcome;
use shared::state::{Cause, State};
use shared::store::intake::{self, Incoming};
use shared::store::jobs;
use sqlx::PgPool;
use testkit::{FakeProvider, request_json};

/// One event as a consumer of `refunds.events` receives it.
#[derive(Debug, Clone)]
struct Received {
    routing_key: String,
    bytes: Vec<u8>,
    json: serde_json::Value,
}

/// A queue of one's own bound to every routing key of the events exchange; it goes away with
/// its connection.
struct EventQueue {
    conn: lapin::Connection,
    channel: lapin::Channel,
    queue: String,
}

impl EventQueue {
    async fn bind(config: &Config) -> anyhow::Result<Self> {
        let conn = shared::broker::connect(&config.amqp_url, "test-events").await?;
        let channel = conn.create_channel().await?;
        shared::broker::declare_topology(&channel, &config.amqp).await?;
        let queue = format!("{}.all", config.amqp.events_exchange);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                config.amqp.events_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            conn,
            channel,
            queue,
        })
    }

    /// Waits until `n` events have arrived (then a moment more, so that an extra one shows).
    async fn take(&self, n: usize, within: Duration) -> anyhow::Result<Vec<Received>> {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + within;
        let mut settled = None;
        loop {
            match self
                .channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await?
            {
                Some(m) => {
                    let bytes = m.delivery.data.clone();
                    out.push(Received {
                        routing_key: m.delivery.routing_key.to_string(),
                        json: serde_json::from_slice(&bytes)?,
                        bytes,
                    });
                }
                None => {
                    if out.len() >= n {
                        let at = *settled.get_or_insert_with(std::time::Instant::now);
                        if at.elapsed() > Duration::from_millis(500) {
                            return Ok(out);
                        }
                    } else if std::time::Instant::now() > deadline {
                        anyhow::bail!(
                            "{} of {n} events within {within:?}: {:?}",
                            out.len(),
                            out.iter().map(|e| &e.json).collect::<Vec<_>>()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn close(self) -> anyhow::Result<()> {
        self.conn.close(200, "done".into()).await?;
        Ok(())
    }
}

fn body(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// A `event_id` that is a UUID v4 in its hyphenated form.
fn assert_event_id(e: &serde_json::Value) -> String {
    let id = e["event_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no event_id in {e}"));
    let parsed = uuid::Uuid::parse_str(id).unwrap_or_else(|err| panic!("{id}: {err}"));
    assert_eq!(parsed.get_version_num(), 4, "{id}");
    assert_eq!(parsed.hyphenated().to_string(), id, "hyphenated lower case");
    id.to_owned()
}

/// `occurred_at` with milliseconds and the configured zone's offset (Asia/Shanghai, +08:00).
fn assert_occurred_at(e: &serde_json::Value) {
    let at = e["occurred_at"]
        .as_str()
        .unwrap_or_else(|| panic!("no occurred_at in {e}"));
    let shape = regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}\+08:00$").unwrap();
    assert!(shape.is_match(at), "{at}");
    let parsed = chrono::DateTime::parse_from_rfc3339(at).unwrap();
    let age = chrono::Utc::now().signed_duration_since(parsed);
    assert!(
        age >= chrono::Duration::zero() && age < chrono::Duration::minutes(5),
        "{at}"
    );
}

/// Takes one message in through intake, as the consumer would, against `admit`.
async fn take_with(
    pool: &PgPool,
    bytes: &[u8],
    redelivered: bool,
    admit: &intake::Admit<'_>,
) -> intake::IntakeResult {
    let mut tx = pool.begin().await.unwrap();
    let r = intake::take(
        &mut tx,
        &Incoming {
            body: bytes,
            message_id: None,
            redelivered,
        },
        admit,
        rc::tz(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    r
}

/// Every outbox row written after `after`: (id, routing key, payload).
async fn outbox_after(pool: &PgPool, after: i64) -> Vec<(i64, String, serde_json::Value)> {
    sqlx::query_as("SELECT id, routing_key, payload FROM outbox WHERE id > $1 ORDER BY id")
        .bind(after)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn last_outbox_id(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_carries_a_distinct_uuid_event_id_and_a_millisecond_occurred_at()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let events = EventQueue::bind(&config).await?;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    fake.script(
        "EV-FAIL",
        vec![Outcome::Declined {
            code: "REFUND_AMOUNT_INVALID".into(),
            message: "declined by the test".into(),
            raw: "{}".into(),
        }],
    );
    let app = common::spawn_app(&config, vec![fake.clone()]);
    let mut bodies = Vec::new();
    for no in ["EV-1", "EV-2", "EV-3", "EV-FAIL"] {
        bodies.push(body(&request_json(
            no,
            &format!("O{no}"),
            ProviderKind::Shengpay,
            "m1",
            1000,
            100,
        )));
    }
    bodies.push(body(&request_json(
        "EV-REJ",
        "OEV-REJ",
        ProviderKind::Shengpay,
        "nobody",
        1000,
        100,
    )));
    testkit::publish_requests(&config, &bodies).await?;
    let got = events.take(5, Duration::from_secs(30)).await?;
    assert_eq!(got.len(), 5, "{got:?}");
    let mut keys: Vec<&str> = got.iter().map(|e| e.routing_key.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "refund.failed",
            "refund.rejected",
            "refund.succeeded",
            "refund.succeeded",
            "refund.succeeded"
        ]
    );
    let mut ids = HashSet::new();
    for e in &got {
        assert_eq!(e.json["version"], 1, "{}", e.json);
        assert_eq!(e.json["event"], e.routing_key.as_str(), "{}", e.json);
        assert!(ids.insert(assert_event_id(&e.json)), "a repeated event_id");
        assert_occurred_at(&e.json);
    }
    app.stop().await?;
    events.close().await?;
    drop(db);
    Ok(())
}

/// The real binary, killed after the broker confirmed an event but before its outbox row was
/// deleted, sends that event again when it starts again: the same bytes, so the same event_id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_relayed_again_after_a_crash_keeps_its_event_id() -> anyhow::Result<()> {
    let (mut config, db) = testkit::test_config().await?;
    config.worker.metrics_addr = testkit::free_addr()?;
    testkit::with_dev_merchants(&mut config)?;
    let file = testkit::toml_file("refund-worker-events-", &config)?;
    let events = EventQueue::bind(&config).await?;
    let start = |failpoint: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_refund-worker"));
        cmd.arg("--config")
            .arg(file.path())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        match failpoint {
            Some(fp) => cmd.env(shared::failpoint::ENV, fp),
            None => cmd.env_remove(shared::failpoint::ENV),
        };
        cmd.spawn()
    };
    let mut first = start(Some("events_confirmed:1"))?;
    testkit::wait_ready(&config.worker.metrics_addr, true, Duration::from_secs(30)).await?;
    // An unknown merchant: the request is rejected, which makes exactly one event.
    testkit::publish_requests(
        &config,
        &[body(&request_json(
            "EV-DUP",
            "OEV-DUP",
            ProviderKind::Shengpay,
            "nobody",
            1000,
            100,
        ))],
    )
    .await?;
    let crashed = tokio::task::spawn_blocking(move || first.wait()).await??;
    assert!(!crashed.success(), "the failpoint aborts the worker");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(left, 1, "the confirmed event is still in the outbox");
    let mut second = start(None)?;
    let got = events.take(2, Duration::from_secs(30)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    second.wait()?;
    let got = got?;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].routing_key, "refund.rejected");
    assert_eq!(got[0].bytes, got[1].bytes, "the stored payload, unchanged");
    assert_eq!(assert_event_id(&got[0].json), assert_event_id(&got[1].json));
    events.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_event_carries_the_jobs_cause_and_other_events_carry_a_null_cause() {
    let db = testkit::test_db().await.unwrap();
    // Dead through a recorded call (the batched writer's path) and through `kill`.
    rc::dead_job(
        &db.pool,
        "EV-D1",
        "m1",
        rc::request_rejected("SIGN_ERROR"),
        Cause::ProviderRejectedRequest,
    )
    .await;
    rc::exhausted_job(&db.pool, "EV-D2", "m1", "SYSTEMERROR").await;
    rc::new_job(&db.pool, "EV-D3", "m1").await;
    let killed = jobs::kill(
        &db.pool,
        "EV-D3",
        None,
        Cause::OutcomeUnknown,
        "cannot be called",
        "test",
        rc::tz(),
    )
    .await
    .unwrap();
    assert!(killed);
    rc::new_job(&db.pool, "EV-S", "m1").await;
    rc::call(
        &db.pool,
        "EV-S",
        rc::accepted("EV-S"),
        shared::workflow::Decision::Succeed,
    )
    .await;
    let rows: Vec<(String, String, serde_json::Value, Option<String>)> = sqlx::query_as(
        "SELECT o.routing_key, o.refund_no, o.payload, j.cause
         FROM outbox o JOIN jobs j USING (refund_no) ORDER BY o.id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let dead: Vec<(&str, &serde_json::Value)> = rows
        .iter()
        .filter(|r| r.0 == "refund.dead")
        .map(|r| (r.1.as_str(), &r.2))
        .collect();
    assert_eq!(dead.len(), 3, "{rows:?}");
    for (no, payload) in &dead {
        let cause = rows.iter().find(|r| r.1 == *no).and_then(|r| r.3.clone());
        assert!(cause.is_some(), "{no} is dead with a cause");
        assert_eq!(
            payload["cause"].as_str(),
            cause.as_deref(),
            "{no}: {payload}"
        );
        assert_eq!(payload["state"], "dead");
    }
    let causes: Vec<&str> = dead
        .iter()
        .map(|(_, p)| p["cause"].as_str().unwrap())
        .collect();
    assert_eq!(
        causes,
        [
            Cause::ProviderRejectedRequest.as_str(),
            Cause::RetriesExhausted.as_str(),
            Cause::OutcomeUnknown.as_str()
        ]
    );
    let succeeded = rows
        .iter()
        .find(|r| r.0 == "refund.succeeded")
        .expect("the success event");
    let obj = succeeded.2.as_object().unwrap();
    assert!(
        obj.contains_key("cause") && obj["cause"].is_null(),
        "{}",
        succeeded.2
    );
}

/// One rule of the request contract broken, and the answer it must get.
struct Case {
    name: &'static str,
    body: Vec<u8>,
    /// `refund.rejected` (a readable refund_no no job has) or `request.refused`.
    routing_key: &'static str,
    code: &'static str,
    field: Option<&'static str>,
}

/// The real clients of config/refunds.toml's merchants, as the worker builds them (their
/// protocol checks are rules too).
fn dev_registry() -> shared::provider::Registry {
    let mut config = Config::default();
    testkit::with_dev_merchants(&mut config).expect("the dev merchants");
    worker::app::build_registry(&config).expect("the dev registry")
}

fn rule_cases() -> Vec<Case> {
    const SP: &str = "93751497";
    let base =
        |no: &str| request_json(no, &format!("O{no}"), ProviderKind::Shengpay, SP, 1000, 100);
    let with = |no: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base(no);
        f(&mut v);
        body(&v)
    };
    let wupay = |no: &str, merchant: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = request_json(
            no,
            &format!("O{no}"),
            ProviderKind::Wupay,
            merchant,
            1000,
            100,
        );
        f(&mut v);
        body(&v)
    };
    let rejected = "refund.rejected";
    let refused = "request.refused";
    let case = |name, body, routing_key, code, field| Case {
        name,
        body,
        routing_key,
        code,
        field,
    };
    let mut trailing = body(&base("RU-TRAIL"));
    trailing.extend_from_slice(b" {}");
    vec![
        case(
            "over 64 KiB",
            with("RU-BIG", &|v| v["reason"] = "x".repeat(70 * 1024).into()),
            rejected,
            "TOO_LARGE",
            None,
        ),
        case(
            "not UTF-8",
            b"{\"version\":1,\"refund_no\":\"RU-UTF\",\"reason\":\"\xff\"}".to_vec(),
            refused,
            "INVALID_UTF8",
            None,
        ),
        case("not JSON", b"not json".to_vec(), refused, "NOT_JSON", None),
        case(
            "truncated",
            b"{\"version\":1,\"refund_no\":\"RU-CUT\"".to_vec(),
            refused,
            "NOT_JSON",
            None,
        ),
        case("trailing data", trailing, refused, "NOT_JSON", None),
        case(
            "an array, not an object",
            b"[1,2,3]".to_vec(),
            refused,
            "WRONG_TYPE",
            None,
        ),
        case(
            "unknown field",
            with("RU-UNK", &|v| v["colour"] = "red".into()),
            rejected,
            "UNKNOWN_FIELD",
            Some("colour"),
        ),
        case(
            "unknown nested field",
            with("RU-UNK2", &|v| v["shengpay"] = serde_json::json!({"extra": 1})),
            rejected,
            "UNKNOWN_FIELD",
            Some("shengpay.extra"),
        ),
        case(
            "duplicate key",
            br#"{"version":1,"refund_no":"RU-DUP","order_no":"O1","order_no":"O2","provider":"shengpay","merchant":"93751497","total_fee":10,"refund_fee":1}"#.to_vec(),
            rejected,
            "DUPLICATE_FIELD",
            Some("order_no"),
        ),
        case(
            "duplicate refund_no (which is then unreadable)",
            br#"{"version":1,"refund_no":"RU-D1","refund_no":"RU-D2","order_no":"O1","provider":"shengpay","merchant":"93751497","total_fee":10,"refund_fee":1}"#.to_vec(),
            refused,
            "DUPLICATE_FIELD",
            Some("refund_no"),
        ),
        case(
            "missing field",
            with("RU-MISS", &|v| {
                v.as_object_mut().unwrap().remove("total_fee");
            }),
            rejected,
            "MISSING_FIELD",
            Some("total_fee"),
        ),
        case(
            "wupay options missing",
            with("RU-NOWU", &|v| {
                v["provider"] = "wupay".into();
                v["merchant"] = "wu-soap11".into();
            }),
            rejected,
            "MISSING_FIELD",
            Some("wupay"),
        ),
        case(
            "missing wupay option",
            wupay("RU-NOMAN", "wu-soap11", &|v| {
                v["wupay"].as_object_mut().unwrap().remove("rec_man");
            }),
            rejected,
            "MISSING_FIELD",
            Some("wupay.rec_man"),
        ),
        case(
            "a float",
            with("RU-FLOAT", &|v| v["refund_fee"] = serde_json::json!(1.5)),
            rejected,
            "WRONG_TYPE",
            Some("refund_fee"),
        ),
        case(
            "a string for a number",
            with("RU-STR", &|v| v["total_fee"] = "1000".into()),
            rejected,
            "WRONG_TYPE",
            Some("total_fee"),
        ),
        case(
            "null for a required string",
            with("RU-NULL", &|v| v["merchant"] = serde_json::Value::Null),
            rejected,
            "WRONG_TYPE",
            Some("merchant"),
        ),
        case(
            "a number for refund_no (which is then unreadable)",
            with("RU-X", &|v| v["refund_no"] = 7.into()),
            refused,
            "WRONG_TYPE",
            Some("refund_no"),
        ),
        case(
            "version 2",
            with("RU-V2", &|v| v["version"] = 2.into()),
            rejected,
            "UNSUPPORTED_VERSION",
            Some("version"),
        ),
        case(
            "refund_no with a space (which is then unreadable)",
            with("RU-X", &|v| v["refund_no"] = "bad refund no".into()),
            refused,
            "INVALID_IDENTIFIER",
            Some("refund_no"),
        ),
        case(
            "refund_no too long (which is then unreadable)",
            with("RU-X", &|v| v["refund_no"] = "R".repeat(33).into()),
            refused,
            "INVALID_IDENTIFIER",
            Some("refund_no"),
        ),
        case(
            "empty order_no",
            with("RU-ORD", &|v| v["order_no"] = "".into()),
            rejected,
            "INVALID_IDENTIFIER",
            Some("order_no"),
        ),
        case(
            "unknown provider",
            with("RU-PROV", &|v| v["provider"] = "paypal".into()),
            rejected,
            "UNKNOWN_VALUE",
            Some("provider"),
        ),
        case(
            "unknown refund account",
            with("RU-ACCT", &|v| {
                v["shengpay"] = serde_json::json!({"refund_account": "ELSEWHERE"})
            }),
            rejected,
            "UNKNOWN_VALUE",
            Some("shengpay.refund_account"),
        ),
        case(
            "total_fee 0",
            with("RU-T0", &|v| v["total_fee"] = 0.into()),
            rejected,
            "INVALID_AMOUNT",
            Some("total_fee"),
        ),
        case(
            "total_fee over the maximum",
            with("RU-TMAX", &|v| {
                v["total_fee"] = 100_000_000_001i64.into();
                v["refund_fee"] = 1.into();
            }),
            rejected,
            "INVALID_AMOUNT",
            Some("total_fee"),
        ),
        case(
            "total_fee beyond i64",
            with("RU-TU64", &|v| v["total_fee"] = u64::MAX.into()),
            rejected,
            "INVALID_AMOUNT",
            Some("total_fee"),
        ),
        case(
            "refund_fee 0",
            with("RU-R0", &|v| v["refund_fee"] = 0.into()),
            rejected,
            "INVALID_AMOUNT",
            Some("refund_fee"),
        ),
        case(
            "refund over its total",
            with("RU-OVER", &|v| v["refund_fee"] = 2000.into()),
            rejected,
            "OVER_TOTAL_FEE",
            Some("refund_fee"),
        ),
        case(
            "reason too long",
            with("RU-LONG", &|v| v["reason"] = "x".repeat(129).into()),
            rejected,
            "TOO_LONG",
            Some("reason"),
        ),
        case(
            "wupay option too long",
            wupay("RU-WLONG", "wu-soap11", &|v| {
                v["wupay"]["rec_man"] = "m".repeat(65).into()
            }),
            rejected,
            "TOO_LONG",
            Some("wupay.rec_man"),
        ),
        case(
            "control character in reason",
            with("RU-BELL", &|v| v["reason"] = "bell\u{7}".into()),
            rejected,
            "CONTROL_CHARACTER",
            Some("reason"),
        ),
        case(
            "control character in a wupay option",
            wupay("RU-WNL", "wu-soap11", &|v| v["wupay"]["pay_nd"] = "P\n".into()),
            rejected,
            "CONTROL_CHARACTER",
            Some("wupay.pay_nd"),
        ),
        case(
            "requested_at not RFC 3339",
            with("RU-TIME", &|v| v["requested_at"] = "noon".into()),
            rejected,
            "INVALID_TIMESTAMP",
            Some("requested_at"),
        ),
        case(
            "unknown merchant",
            with("RU-MER", &|v| v["merchant"] = "nobody".into()),
            rejected,
            "UNKNOWN_MERCHANT",
            Some("merchant"),
        ),
        case(
            "empty merchant",
            with("RU-MER0", &|v| v["merchant"] = "".into()),
            rejected,
            "UNKNOWN_MERCHANT",
            Some("merchant"),
        ),
        case(
            "a ShengPay value with & or =",
            with("RU-SIGN", &|v| v["reason"] = "a=1&refundFee=1".into()),
            rejected,
            "UNSIGNABLE_VALUE",
            Some("reason"),
        ),
        case(
            "over WuPay's 32-bit amounts",
            wupay("RU-I32", "wu-soap11", &|v| {
                v["total_fee"] = 3_000_000_000i64.into();
                v["refund_fee"] = 2_500_000_000i64.into();
            }),
            rejected,
            "AMOUNT_TOO_LARGE_FOR_PROVIDER",
            Some("total_fee"),
        ),
        case(
            "markup on WuPay's GET binding",
            wupay("RU-ASP", "wu-get", &|v| {
                v["reason"] = "returned <b>goods</b>".into()
            }),
            rejected,
            "UNSAFE_FOR_BINDING",
            Some("reason"),
        ),
    ]
}

/// What one message was answered with: the events written for it, and the code stored with
/// it in `rejected_messages`.
struct Answer {
    events: Vec<(i64, String, serde_json::Value)>,
    stored_code: Option<String>,
}

async fn answer_since(pool: &PgPool, before: i64) -> Answer {
    let stored_code: Option<String> = sqlx::query_scalar(
        "SELECT to_jsonb(r) ->> 'error_code' FROM rejected_messages r ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
    .flatten();
    Answer {
        events: outbox_after(pool, before).await,
        stored_code,
    }
}

/// Why `answer` is not one event under `key` with `code` and `field` (and the same code
/// stored), if it is not.
fn mismatch(answer: &Answer, key: &str, code: &str, field: Option<&str>) -> Option<String> {
    let [(_, routing_key, e)] = answer.events.as_slice() else {
        return Some(format!(
            "{} events, not 1: {:?}",
            answer.events.len(),
            answer.events
        ));
    };
    let got = (
        routing_key.as_str(),
        e["error_code"].as_str(),
        e["field"].as_str(),
        answer.stored_code.as_deref(),
    );
    let want = (key, Some(code), field, Some(code));
    let has_field = e.as_object().is_some_and(|o| o.contains_key("field"));
    (got != want || !has_field).then(|| format!("got {got:?}, want {want:?} in {e}"))
}

#[tokio::test]
async fn each_rejection_rule_answers_with_its_own_code_and_field() {
    let db = testkit::test_db().await.unwrap();
    let registry = dev_registry();
    let admit = |r: &shared::job::RefundRequest| registry.admit(r);
    let mut failures = Vec::new();
    for case in rule_cases() {
        let before = last_outbox_id(&db.pool).await;
        let r = take_with(&db.pool, &case.body, false, &admit).await;
        assert!(r.is_poison(), "{}: {r:?}", case.name);
        let answer = answer_since(&db.pool, before).await;
        if let Some(why) = mismatch(&answer, case.routing_key, case.code, case.field) {
            failures.push(format!("{}: {why}", case.name));
        }
    }
    // The rules that need an order or a job already there.
    let sp = |no: &str, order: &str, total: i64, fee: i64| {
        body(&request_json(
            no,
            order,
            ProviderKind::Shengpay,
            "93751497",
            total,
            fee,
        ))
    };
    let created = take_with(
        &db.pool,
        &sp("RU-FIRST", "ORU-ORDER", 1000, 900),
        false,
        &admit,
    )
    .await;
    assert!(matches!(created, intake::IntakeResult::Created { .. }));
    for (name, bytes, key, code, field) in [
        (
            "total_fee differs from the order's",
            sp("RU-TOT", "ORU-ORDER", 999, 10),
            "refund.rejected",
            "ORDER_TOTAL_MISMATCH",
            Some("total_fee"),
        ),
        (
            "over the order's total",
            sp("RU-CAP", "ORU-ORDER", 1000, 200),
            "refund.rejected",
            "OVER_ORDER_TOTAL",
            Some("refund_fee"),
        ),
        (
            "same refund_no, other content",
            sp("RU-FIRST", "ORU-ORDER", 1000, 901),
            "request.refused",
            "CONFLICT",
            Some("refund_no"),
        ),
    ] {
        let before = last_outbox_id(&db.pool).await;
        take_with(&db.pool, &bytes, false, &admit).await;
        let answer = answer_since(&db.pool, before).await;
        if let Some(why) = mismatch(&answer, key, code, field) {
            failures.push(format!("{name}: {why}"));
        }
    }
    // A message whose effect the database refused for a reason of its own.
    let before = last_outbox_id(&db.pool).await;
    let mut tx = db.pool.begin().await.unwrap();
    let unstorable = sp("RU-STORE", "ORU-STORE", 1000, 100);
    intake::store_unstorable(
        &mut tx,
        &Incoming {
            body: &unstorable,
            message_id: None,
            redelivered: false,
        },
        "refused by a trigger",
        rc::tz(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let answer = answer_since(&db.pool, before).await;
    if let Some(why) = mismatch(&answer, "request.refused", "UNSTORABLE", None) {
        failures.push(format!("unstorable: {why}"));
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[tokio::test]
async fn a_rejected_request_carries_the_fields_that_could_be_read_from_it() {
    let db = testkit::test_db().await.unwrap();
    let registry = testkit::fake_registry(&[(ProviderKind::Shengpay, "m1", true)]);
    let admit = |r: &shared::job::RefundRequest| registry.admit(r);
    // Unknown merchant: everything else is well-formed and read back.
    let unknown = request_json("RD-1", "ORD-1", ProviderKind::Shengpay, "nobody", 1000, 150);
    // A float fee: unreadable as a fee, the rest read; a bad order_no is not echoed.
    let mut float = request_json("RD-2", "O RD 2", ProviderKind::Shengpay, "m1", 1000, 100);
    float["refund_fee"] = serde_json::json!(1.5);
    for v in [&unknown, &float] {
        take_with(&db.pool, &body(v), false, &admit).await;
    }
    let rows = outbox_after(&db.pool, 0).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let e = &rows[0].2;
    assert_eq!(e["event"], "refund.rejected");
    assert_eq!(e["state"], "rejected");
    assert_eq!(e["refund_no"], "RD-1");
    assert_eq!(e["order_no"], "ORD-1");
    assert_eq!(e["provider"], "shengpay");
    assert_eq!(e["merchant"], "nobody");
    assert_eq!(e["refund_fee"], 150);
    assert_eq!(e["attempts"], 0);
    assert!(
        e["error_message"].as_str().unwrap().contains("nobody"),
        "{e}"
    );
    let e = &rows[1].2;
    assert_eq!(e["refund_no"], "RD-2");
    assert_eq!(e["order_no"], serde_json::Value::Null, "{e}");
    assert_eq!(e["provider"], "shengpay");
    assert_eq!(e["merchant"], "m1");
    assert_eq!(e["refund_fee"], serde_json::Value::Null, "{e}");
}

/// A conflict, an unparseable body and a malformed copy of a live job's request, published to
/// a running worker: each is answered under `request.refused`, and the job's own refund_no gets
/// no event but its real outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_and_an_unparseable_body_are_answered_as_refused_requests_never_as_a_jobs_state()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    let events = EventQueue::bind(&config).await?;
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    let app = common::spawn_app(&config, vec![fake.clone()]);
    let valid = request_json(
        "EV-LIVE",
        "OEV-LIVE",
        ProviderKind::Shengpay,
        "m1",
        1000,
        100,
    );
    testkit::publish_requests(&config, &[body(&valid)]).await?;
    let first = events.take(1, Duration::from_secs(30)).await?;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].routing_key, "refund.succeeded");

    let mut conflict = valid.clone();
    conflict["refund_fee"] = 99.into();
    let mut malformed = valid.clone();
    malformed["refund_fee"] = serde_json::json!(1.5);
    testkit::publish_requests(
        &config,
        &[
            body(&conflict),
            b"{\"version\":1,".to_vec(),
            body(&malformed),
        ],
    )
    .await?;
    let got = events.take(3, Duration::from_secs(30)).await?;
    assert_eq!(got.len(), 3, "{got:?}");
    let mut codes = Vec::new();
    for e in &got {
        assert_eq!(e.routing_key, "request.refused", "{}", e.json);
        assert_eq!(e.json["event"], "request.refused");
        assert_eq!(e.json["state"], serde_json::Value::Null, "{}", e.json);
        assert_event_id(&e.json);
        assert_occurred_at(&e.json);
        codes.push((
            e.json["error_code"].as_str().unwrap_or_default().to_owned(),
            e.json["refund_no"].as_str().map(str::to_owned),
        ));
    }
    codes.sort();
    assert_eq!(
        codes,
        [
            ("CONFLICT".to_owned(), Some("EV-LIVE".to_owned())),
            ("NOT_JSON".to_owned(), None),
            ("WRONG_TYPE".to_owned(), Some("EV-LIVE".to_owned())),
        ]
    );
    // The job itself is untouched and paid once.
    assert_eq!(
        rc::state_of(&db.pool, "EV-LIVE").await,
        State::Succeeded.as_str()
    );
    assert_eq!(fake.calls().get("EV-LIVE"), Some(&1));
    app.stop().await?;
    events.close().await?;
    Ok(())
}

#[tokio::test]
async fn the_same_refused_bytes_published_again_are_answered_again_but_a_redelivery_is_not() {
    let db = testkit::test_db().await.unwrap();
    let registry = testkit::fake_registry(&[(ProviderKind::Shengpay, "m1", true)]);
    let admit = |r: &shared::job::RefundRequest| registry.admit(r);
    for (bytes, redelivered) in [
        (b"garbage".as_slice(), false),
        (b"garbage".as_slice(), true),
        (b"garbage".as_slice(), false),
    ] {
        take_with(&db.pool, bytes, redelivered, &admit).await;
    }
    let rows = outbox_after(&db.pool, 0).await;
    let keys: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(keys, ["request.refused", "request.refused"]);
    assert_ne!(rows[0].2["event_id"], rows[1].2["event_id"]);
    let occurrences: i32 = sqlx::query_scalar("SELECT occurrences FROM rejected_messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(occurrences, 2);
}

#[tokio::test]
async fn an_operators_resolution_note_does_not_reach_the_resolved_event() {
    let db = testkit::test_db().await.unwrap();
    let note = "called ShengPay ops, ticket 4711, Mrs Wang confirmed by phone";
    for no in ["EV-RF", "EV-RS"] {
        rc::dead_job(
            &db.pool,
            no,
            "m1",
            rc::request_rejected("SIGN_ERROR"),
            Cause::ProviderRejectedRequest,
        )
        .await;
    }
    for (no, resolution) in [
        ("EV-RF", jobs::Resolution::Failed),
        (
            "EV-RS",
            jobs::Resolution::Succeeded {
                settlement_refund_fee: 100,
            },
        ),
    ] {
        let mut tx = db.pool.begin().await.unwrap();
        let verdict = jobs::resolve(
            &mut tx,
            no,
            resolution,
            Duration::ZERO,
            jobs::Operator {
                name: "frank",
                note,
            },
            rc::tz(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(verdict, jobs::Verdict::Done { prior: State::Dead });
    }
    let events: Vec<(String, String)> = sqlx::query_as(
        "SELECT refund_no, payload::text FROM outbox WHERE routing_key = 'refund.resolved'
         ORDER BY refund_no",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    for (no, text) in &events {
        assert!(!text.contains("ticket 4711"), "{no}: {text}");
        let e: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_event_id(&e);
    }
    let failed: serde_json::Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["error_code"], "MANUAL");
    // The note is kept where operators read it: the audit row.
    let audited: String =
        sqlx::query_scalar("SELECT note FROM operator_audit WHERE refund_no = 'EV-RF'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audited, note);
}
