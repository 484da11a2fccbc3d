//! Property test of the job state machine against the real database: random sequences of
//! deliveries, duplicates, conflicts, claims, outcomes (current and stale), crashes (expired
//! leases), replays and resolutions never produce an illegal transition, never move a job out
//! of a final state, never book a job twice, and never call a declined job again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;
use shared::job::{ProviderKind, RefundRequest};
use shared::provider::{AttemptRecord, Outcome};
use shared::state::{Cause, State, TRANSITIONS};
use shared::store::intake::{self, Incoming};
use shared::store::jobs::{self, Claimed, Operator, Resolution};
use shared::workflow::Decision;
use sqlx::{PgPool, Row};

const JOBS: usize = 3;

#[derive(Debug, Clone)]
enum Ev {
    Deliver(usize),
    Conflict(usize),
    Claim(usize),
    /// Record an outcome for the job's latest claim (or a stale one).
    Outcome(usize, Kind, bool),
    /// The claiming worker dies: its lease runs out and the sweeper takes the job back.
    Crash(usize),
    Replay(usize),
    Resolve(usize, bool),
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Accepted,
    Declined,
    Retry,
    DeadUnknown,
    DeadRejected,
}

fn ev() -> impl Strategy<Value = Ev> {
    let j = 0..JOBS;
    let kind = prop_oneof![
        Just(Kind::Accepted),
        Just(Kind::Declined),
        Just(Kind::Retry),
        Just(Kind::DeadUnknown),
        Just(Kind::DeadRejected)
    ];
    prop_oneof![
        3 => j.clone().prop_map(Ev::Deliver),
        1 => j.clone().prop_map(Ev::Conflict),
        4 => j.clone().prop_map(Ev::Claim),
        4 => (j.clone(), kind, any::<bool>()).prop_map(|(j, k, s)| Ev::Outcome(j, k, s)),
        1 => j.clone().prop_map(Ev::Crash),
        2 => j.clone().prop_map(Ev::Replay),
        1 => (j, any::<bool>()).prop_map(|(j, s)| Ev::Resolve(j, s)),
    ]
}

fn request(case: u64, j: usize, fee: i64) -> RefundRequest {
    let v = testkit::request_json(
        &format!("P{case}J{j}"),
        &format!("PO{case}J{j}"),
        ProviderKind::Shengpay,
        "m1",
        1000,
        fee,
    );
    serde_json::from_value(v).unwrap()
}

fn record(kind: Kind, fee: i64) -> (AttemptRecord, Decision) {
    let (outcome, decision) = match kind {
        Kind::Accepted => (
            Outcome::Accepted {
                provider_refund_id: "X".into(),
                refund_fee: fee,
                settlement_refund_fee: fee,
                coupon_refund_fee: 0,
                raw: "{}".into(),
            },
            Decision::Succeed,
        ),
        Kind::Declined => (
            Outcome::Declined {
                code: "NOTENOUGH".into(),
                message: String::new(),
                raw: String::new(),
            },
            Decision::Fail,
        ),
        Kind::Retry => (
            Outcome::NotSent {
                error: "refused".into(),
            },
            Decision::Retry {
                after: Duration::ZERO,
                counted: true,
            },
        ),
        Kind::DeadUnknown => (
            Outcome::MaybeDelivered {
                error: "timeout".into(),
                raw: None,
            },
            Decision::Dead {
                cause: Cause::OutcomeUnknown,
            },
        ),
        Kind::DeadRejected => (
            Outcome::RequestRejected {
                code: "SIGN_ERROR".into(),
                message: String::new(),
                raw: String::new(),
            },
            Decision::Dead {
                cause: Cause::ProviderRejectedRequest,
            },
        ),
    };
    (
        AttemptRecord {
            outcome,
            request_redacted: "{}".into(),
            http_status: Some(200),
            latency: Duration::ZERO,
        },
        decision,
    )
}

async fn state_of(pool: &PgPool, refund_no: &str) -> Option<State> {
    shared::store::ops::job_state(pool, refund_no)
        .await
        .unwrap()
        .map(|s| s.0)
}

async fn run_case(pool: &PgPool, case: u64, events: Vec<Ev>) -> Result<(), TestCaseError> {
    let tz = chrono_tz::Asia::Shanghai;
    // Even-numbered jobs are at a merchant that deduplicates on refund_no, odd ones are not.
    let known = |r: &RefundRequest| {
        Ok(shared::provider::Admission {
            idempotent: r.refund_no.ends_with(['0', '2', '4', '6', '8']),
        })
    };
    let op = Operator {
        name: "prop",
        note: "property test",
    };
    let mut claims: HashMap<usize, Vec<Claimed>> = HashMap::new();
    let mut finals: HashMap<usize, State> = HashMap::new();
    let mut declined: HashSet<usize> = HashSet::new();
    for ev in events {
        let mut conn = pool.acquire().await.unwrap();
        match ev {
            Ev::Deliver(j) | Ev::Conflict(j) => {
                let fee = if matches!(ev, Ev::Conflict(_)) {
                    7
                } else {
                    100
                };
                let body = serde_json::to_vec(&request(case, j, fee)).unwrap();
                let msg = Incoming {
                    body: &body,
                    message_id: None,
                    redelivered: false,
                };
                intake::take(&mut conn, &msg, &known, tz).await.unwrap();
            }
            Ev::Claim(j) => {
                let no = request(case, j, 100).refund_no;
                let got = jobs::claim(
                    pool,
                    &[no],
                    Duration::from_secs(30),
                    "prop",
                    jobs::ClaimToken::new(),
                )
                .await
                .unwrap();
                if let Some(c) = got.claimed.into_iter().next() {
                    prop_assert!(!declined.contains(&j), "a declined job was claimed again");
                    prop_assert!(!finals.contains_key(&j), "a final job was claimed again");
                    claims.entry(j).or_default().push(c);
                }
            }
            Ev::Outcome(j, kind, stale) => {
                let Some(list) = claims.get(&j) else { continue };
                let c = if stale { list.first() } else { list.last() };
                let Some(c) = c else { continue };
                let (rec, decision) = record(kind, c.request.refund_fee);
                let r = jobs::record_outcome(pool, c, &rec, &decision, "prop", tz)
                    .await
                    .unwrap();
                if let jobs::Recorded::Applied(State::Failed) = r {
                    declined.insert(j);
                }
            }
            Ev::Crash(j) => {
                let no = request(case, j, 100).refund_no;
                sqlx::query("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE refund_no = $1 AND state = 'in_flight'")
                    .bind(&no).execute(pool).await.unwrap();
                let expired: Option<(i32, bool)> = sqlx::query_as(
                    "SELECT attempt, idempotent FROM jobs WHERE refund_no = $1 AND state = 'in_flight'",
                )
                .bind(&no)
                .fetch_optional(pool)
                .await
                .unwrap();
                if let Some((a, idempotent)) = expired {
                    jobs::expire_lease(pool, &no, a, idempotent, "prop", tz)
                        .await
                        .unwrap();
                }
            }
            Ev::Replay(j) => {
                let no = request(case, j, 100).refund_no;
                let mut tx = pool.begin().await.unwrap();
                jobs::replay(&mut tx, &no, op).await.unwrap();
                tx.commit().await.unwrap();
            }
            Ev::Resolve(j, succeeded) => {
                let no = request(case, j, 100).refund_no;
                let res = if succeeded {
                    Resolution::Succeeded {
                        settlement_refund_fee: 5,
                    }
                } else {
                    Resolution::Failed
                };
                let mut tx = pool.begin().await.unwrap();
                jobs::resolve(&mut tx, &no, res, Duration::ZERO, op, tz)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }
        // Invariants after every event.
        for j in 0..JOBS {
            let no = request(case, j, 100).refund_no;
            let Some(s) = state_of(pool, &no).await else {
                continue;
            };
            if let Some(f) = finals.get(&j) {
                prop_assert_eq!(*f, s, "job {} left final state {}", no, f);
            }
            if s.is_final() {
                finals.insert(j, s);
            }
            let entries: i64 =
                sqlx::query_scalar("SELECT count(*) FROM ledger WHERE refund_no = $1")
                    .bind(&no)
                    .fetch_one(pool)
                    .await
                    .unwrap();
            prop_assert!(entries <= 1, "job {} has {} ledger entries", no, entries);
            prop_assert_eq!(
                entries == 1,
                s == State::Succeeded,
                "ledger entry iff succeeded ({})",
                s
            );
        }
    }
    // Every recorded transition is one of the allowed ones, and histories chain.
    let rows = sqlx::query("SELECT refund_no, from_state, to_state FROM job_transitions WHERE refund_no LIKE $1 ORDER BY refund_no, id")
        .bind(format!("P{case}J%"))
        .fetch_all(pool).await.unwrap();
    let mut last: HashMap<String, String> = HashMap::new();
    for r in rows {
        let no: String = r.get("refund_no");
        let from: Option<String> = r.get("from_state");
        let to: String = r.get("to_state");
        match &from {
            None => prop_assert_eq!(to.as_str(), "received"),
            Some(f) => {
                let (f, t): (State, State) = (f.parse().unwrap(), to.parse().unwrap());
                prop_assert!(
                    TRANSITIONS.iter().any(|tr| tr.from == f && tr.to == t),
                    "illegal {f} -> {t}"
                );
            }
        }
        prop_assert_eq!(
            from.as_deref(),
            last.get(&no).map(String::as_str),
            "history of {} does not chain",
            no
        );
        last.insert(no, to);
    }
    Ok(())
}

#[test]
fn random_event_sequences_keep_every_job_state_machine_invariant() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(testkit::test_db()).unwrap();
    let pool = db.pool.clone();
    let case = std::sync::atomic::AtomicU64::new(0);
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(events in proptest::collection::vec(ev(), 1..40))| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(run_case(&pool, n, events))?;
    });
}
