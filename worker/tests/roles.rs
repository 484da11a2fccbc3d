//! The least-privilege database roles of migration `20261122000003_roles.sql`, against the real
//! PostgreSQL: each program's role can do its own writes and nothing more.
//!
//! Every connection takes its role through the startup option `-c role=...` (the same as a
//! `SET ROLE` right after connecting, but it also holds for every connection of a pool). The
//! worker test runs the worker's real startup that way, so a statement the worker needs and
//! the role lacks shows up as a job that never gets where it should; the operator test runs
//! refundctl's store calls. Each refusal must be SQLSTATE 42501 (insufficient privilege), not
//! the append-only trigger's error, so the privilege is what stops the statement.

mod common;

use std::time::Duration;

use shared::job::ProviderKind;
use shared::provider::Outcome;
use shared::state::State;
use shared::store::jobs::{self, Operator, Resolution, Verdict};
use shared::store::{operator, ops};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use testkit::{self, FakeProvider, request_json};

const WORKER: &str = "refunds_worker";
const RECONCILER: &str = "refunds_reconciler";
const OPERATOR: &str = "refunds_operator";

/// The roles migration, as the binaries embed it.
const ROLES_SQL: &str = include_str!("../../migrations/20261122000003_roles.sql");

/// `url` with a startup option that makes the session take `role`.
fn url_as_role(url: &str, role: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20role%3D{role}")
}

/// A connection to `url` acting as `role`.
async fn connect_as(url: &str, role: &str) -> anyhow::Result<PgConnection> {
    let mut conn = PgConnection::connect(&url_as_role(url, role)).await?;
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(user, role, "the startup option did not set the role");
    Ok(conn)
}

/// Runs `sql`; it must succeed.
async fn allowed(conn: &mut PgConnection, role: &str, sql: &'static str) -> anyhow::Result<()> {
    if let Err(e) = sqlx::raw_sql(sql).execute(&mut *conn).await {
        anyhow::bail!("{role} should be allowed `{sql}` but got: {e}");
    }
    Ok(())
}

/// Runs `sql`; it must fail for lack of privilege (SQLSTATE 42501).
async fn denied(conn: &mut PgConnection, role: &str, sql: &'static str) -> anyhow::Result<()> {
    match sqlx::raw_sql(sql).execute(&mut *conn).await {
        Ok(_) => anyhow::bail!("{role} was allowed `{sql}`"),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => Ok(()),
        Err(e) => anyhow::bail!("{role}: `{sql}` failed, but not for lack of privilege: {e}"),
    }
}

/// Inserts a job directly (as the test's admin connection) in `state`.
async fn insert_job(
    db: &testkit::TestDb,
    refund_no: &str,
    state: &str,
    cause: Option<&str>,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee,
             request, content_hash, state, cause, attempt)
         VALUES ($1, 'O' || $1, 'shengpay', 'm1', 1000, 100, '{}', '\\x00', $2, $3, 1)",
    )
    .bind(refund_no)
    .bind(state)
    .bind(cause)
    .execute(&db.pool)
    .await?;
    sqlx::query(
        "INSERT INTO orders (order_no, total_fee, committed_fee) VALUES ('O' || $1, 1000, 100)",
    )
    .bind(refund_no)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Tables (relkind `r`, `p`) or views (`v`, `m`) of the schema whose name is LIKE `name_like`
/// and on which `role` lacks `privilege`.
async fn relations_without(
    conn: &mut PgConnection,
    role: &str,
    privilege: &str,
    name_like: &str,
    views: bool,
) -> anyhow::Result<Vec<String>> {
    let kinds: Vec<String> = if views {
        vec!["v".into(), "m".into()]
    } else {
        vec!["r".into(), "p".into()]
    };
    Ok(sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind::text = ANY($4) AND c.relname LIKE $3
           AND NOT has_table_privilege($1, c.oid, $2)
         ORDER BY 1",
    )
    .bind(role)
    .bind(privilege)
    .bind(name_like)
    .bind(kinds)
    .fetch_all(&mut *conn)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_does_its_whole_job_as_refunds_worker() -> anyhow::Result<()> {
    let (mut config, db) = testkit::test_config().await?;
    config.database_url = url_as_role(&db.url, WORKER);
    let fake = FakeProvider::new(ProviderKind::Shengpay, "m1", true);
    fake.script(
        "RDECLINE",
        vec![Outcome::Declined {
            code: "ORDER_NOT_REFUNDABLE".into(),
            message: "no".into(),
            raw: "{}".into(),
        }],
    );
    fake.script(
        "RRETRY",
        vec![Outcome::RetryLater {
            code: "SYSTEMERROR".into(),
            message: "later".into(),
            raw: "{}".into(),
        }],
    );
    fake.script(
        "RDEAD",
        vec![Outcome::RequestRejected {
            code: "SIGN_ERROR".into(),
            message: "bad sign".into(),
            raw: "{}".into(),
        }],
    );
    let app = common::spawn_app(&config, vec![fake.clone()]);

    let req = |refund_no: &str, order_no: &str, total: i64, fee: i64| {
        serde_json::to_vec(&request_json(
            refund_no,
            order_no,
            ProviderKind::Shengpay,
            "m1",
            total,
            fee,
        ))
        .unwrap()
    };
    let mut conflict = request_json("ROK", "OOK", ProviderKind::Shengpay, "m1", 1000, 100);
    conflict["refund_fee"] = 99.into();
    let bodies = vec![
        req("ROK", "OOK", 1000, 100),
        req("RDECLINE", "ODECLINE", 1000, 100),
        req("RRETRY", "ORETRY", 1000, 100),
        req("RDEAD", "ODEAD", 1000, 100),
        // Together over their order's total: intake inserts the second job, then deletes it.
        req("ROVER1", "OOVER", 1000, 600),
        req("ROVER2", "OOVER", 1000, 600),
        // The same content again (a duplicate), then different content (a conflict).
        req("ROK", "OOK", 1000, 100),
        serde_json::to_vec(&conflict)?,
        // The same invalid bytes twice: one rejected row, two occurrences (ON CONFLICT DO UPDATE).
        b"not json".to_vec(),
        b"not json".to_vec(),
    ];
    testkit::publish_requests(&config, &bodies).await?;

    let pool = db.pool.clone();
    let finished =
        testkit::wait_until(
            Duration::from_secs(60),
            "every job in its expected state, the outbox relayed and the queue empty",
            || {
                let pool = pool.clone();
                let config = config.clone();
                async move {
                    let state = |r: &'static str| {
                        let pool = pool.clone();
                        async move {
                            Ok::<_, anyhow::Error>(ops::job_state(&pool, r).await?.map(|s| s.0))
                        }
                    };
                    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                        .fetch_one(&pool)
                        .await?;
                    Ok(state("ROK").await? == Some(State::Succeeded)
                        && state("RRETRY").await? == Some(State::Succeeded)
                        && state("RDECLINE").await? == Some(State::Failed)
                        && state("RDEAD").await? == Some(State::Dead)
                        && (state("ROVER1").await? == Some(State::Succeeded)
                            || state("ROVER2").await? == Some(State::Succeeded))
                        && outbox == 0
                        && testkit::queue_depth(&config, &config.amqp.queue).await? == 0)
                }
            },
        )
        .await;
    if let Err(e) = finished {
        if app.handle.is_finished() {
            let ended = app.handle.await?;
            anyhow::bail!("{e}; the worker ended: {ended:?}");
        }
        return Err(e);
    }

    let over = (
        ops::job_state(&db.pool, "ROVER1").await?.map(|s| s.0),
        ops::job_state(&db.pool, "ROVER2").await?.map(|s| s.0),
    );
    let (paid_over, refused_over) = match over {
        (Some(State::Succeeded), None) => ("ROVER1", "ROVER2"),
        (None, Some(State::Succeeded)) => ("ROVER2", "ROVER1"),
        other => anyhow::bail!("one over-cap refund should succeed, one vanish: {other:?}"),
    };
    let rejected: Vec<(String, Option<String>, i32)> = sqlx::query_as(
        "SELECT kind, refund_no, occurrences FROM rejected_messages ORDER BY kind, refund_no",
    )
    .fetch_all(&db.pool)
    .await?;
    assert!(
        rejected
            .iter()
            .any(|r| r.0 == "conflict" && r.1.as_deref() == Some("ROK")),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .any(|r| r.1.as_deref() == Some(refused_over)),
        "{rejected:?}"
    );
    assert!(
        rejected.iter().any(|r| r.1.is_none() && r.2 == 2),
        "the repeated invalid body should count two occurrences: {rejected:?}"
    );
    // The declined refund gave its amount back to the order.
    let committed: i64 =
        sqlx::query_scalar("SELECT committed_fee FROM orders WHERE order_no = 'ODECLINE'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(committed, 0);
    let ledger = ops::ledger(&db.pool).await?;
    let mut booked: Vec<&str> = ledger.iter().map(|l| l.refund_no.as_str()).collect();
    booked.sort_unstable();
    let mut expected = vec!["ROK", "RRETRY", paid_over];
    expected.sort_unstable();
    assert_eq!(booked, expected);
    // The worker's connections were refunds_worker: the URL it was given makes them so.
    let mut check = PgConnection::connect(&config.database_url).await?;
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut check)
        .await?;
    assert_eq!(user, WORKER);
    app.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_worker_cannot_change_history_ledger_or_audit() -> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    let mut c = connect_as(&db.url, WORKER).await?;
    // Its own kinds of writes work...
    allowed(
        &mut c,
        WORKER,
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee,
             request, content_hash, state)
         VALUES ('W1', 'OW1', 'shengpay', 'm1', 1000, 100, '{}', '\\x00', 'succeeded');
         INSERT INTO job_transitions (refund_no, from_state, to_state, attempt, actor)
         VALUES ('W1', NULL, 'received', 0, 'test');
         INSERT INTO provider_attempts (refund_no, attempt, provider, merchant, outcome,
             request, latency_us)
         VALUES ('W1', 1, 'shengpay', 'm1', 'accepted', '{}', 1);
         INSERT INTO ledger (refund_no, entry_kind, provider, merchant, refund_fee,
             settlement_refund_fee, business_date, source)
         VALUES ('W1', 'refund', 'shengpay', 'm1', 100, 100, current_date, 'provider');
         INSERT INTO outbox (routing_key, refund_no, payload) VALUES ('refund.succeeded', 'W1', '{}');
         DELETE FROM outbox WHERE refund_no = 'W1';
         UPDATE jobs SET last_code = 'X' WHERE refund_no = 'W1'",
    )
    .await?;
    // ...and nothing else: the append-only tables refuse by privilege, before their triggers.
    for sql in [
        "DELETE FROM ledger",
        "UPDATE ledger SET refund_fee = 1",
        "TRUNCATE ledger",
        "UPDATE job_transitions SET actor = 'someone else'",
        "DELETE FROM job_transitions",
        "TRUNCATE job_transitions",
        "UPDATE provider_attempts SET outcome = 'declined'",
        "DELETE FROM provider_attempts",
        "SELECT * FROM operator_audit",
        "INSERT INTO operator_audit (action, result, operator, note) VALUES ('a', 'b', 'c', 'd')",
        "TRUNCATE jobs",
        "DROP TABLE outbox",
        "ALTER TABLE ledger DISABLE TRIGGER ledger_append_only",
        "DELETE FROM _sqlx_migrations",
    ] {
        denied(&mut c, WORKER, sql).await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_reconciler_moves_jobs_only_as_the_repair_loop_does_and_changes_no_history()
-> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    insert_job(&db, "R1", "succeeded", None).await?;
    let mut c = connect_as(&db.url, RECONCILER).await?;
    for sql in [
        "SELECT * FROM jobs",
        "SELECT * FROM ledger",
        "SELECT * FROM provider_attempts",
    ] {
        allowed(&mut c, RECONCILER, sql).await?;
    }
    for sql in [
        "INSERT INTO jobs (refund_no, order_no, provider, merchant, total_fee, refund_fee,
             request, content_hash, state)
         VALUES ('X1', 'OX1', 'shengpay', 'm1', 1000, 100, '{}', '\\x00', 'received')",
        "DELETE FROM jobs",
        "UPDATE ledger SET settlement_refund_fee = 0",
        "DELETE FROM ledger",
        "UPDATE job_transitions SET actor = 'x'",
        "DELETE FROM outbox",
        "SELECT * FROM operator_audit",
        "TRUNCATE ledger",
        "UPDATE statement_verdicts SET verdict = 'paid'",
        "DELETE FROM statement_absences",
    ] {
        denied(&mut c, RECONCILER, sql).await?;
    }
    // The repair loop (migration 0040) settles WuPay's unknown outcomes from statements
    // through the job's state machine, as the worker does for a provider's report: it moves
    // the job, books the ledger, appends history and the event. What it writes stays
    // append-only (the tables' triggers), which the denials above check.
    for sql in [
        "UPDATE jobs SET updated_at = updated_at WHERE refund_no = 'R1'",
        "INSERT INTO outbox (routing_key, refund_no, payload) VALUES ('x', 'R1', '{}')",
    ] {
        allowed(&mut c, RECONCILER, sql).await?;
    }
    // Its own tables: it records runs and marks superseded ones, and deletes nothing; its
    // statement staging lives in temporary tables.
    allowed(
        &mut c,
        RECONCILER,
        "INSERT INTO reconciliation_runs (business_date, source, timezone, grace_minutes, status,
             started_at)
         VALUES (current_date, 'attempts', 'Asia/Shanghai', 30, 'running', now());
         INSERT INTO reconciliation_totals (run_id, provider, merchant, ledger_total, ledger_count,
             provider_total, provider_count, diff)
         SELECT max(id), 'shengpay', 'm1', 100, 1, 100, 1, 0 FROM reconciliation_runs;
         INSERT INTO reconciliation_discrepancies (run_id, kind, provider, merchant, refund_no,
             ledger_amount, provider_amount, detail)
         SELECT max(id), 'pending', 'shengpay', 'm1', 'R1', 100, NULL, 'test' FROM reconciliation_runs;
         UPDATE reconciliation_runs SET status = 'balanced', finished_at = now();
         SELECT * FROM reconciliation_current_totals;
         SELECT * FROM reconciliation_current_discrepancies;
         CREATE TEMP TABLE recon_statement (refund_no text);
         INSERT INTO recon_statement VALUES ('R1')",
    )
    .await?;
    denied(&mut c, RECONCILER, "DELETE FROM reconciliation_runs").await?;
    // A finished run is history: it can be superseded, once, and nothing else changes.
    let rewrite = sqlx::raw_sql("UPDATE reconciliation_runs SET status = 'discrepancies'")
        .execute(&mut c)
        .await;
    match rewrite {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23514") => {}
        other => anyhow::bail!("a finished run was rewritten: {other:?}"),
    }
    denied(
        &mut c,
        RECONCILER,
        "UPDATE reconciliation_totals SET diff = 5",
    )
    .await?;
    denied(
        &mut c,
        RECONCILER,
        "UPDATE reconciliation_discrepancies SET detail = 'x'",
    )
    .await?;
    denied(&mut c, RECONCILER, "TRUNCATE reconciliation_discrepancies").await?;
    // The same holds for every table and view of the family, whatever a later migration adds.
    let no_update =
        relations_without(&mut c, RECONCILER, "UPDATE", "reconciliation%", false).await?;
    assert_eq!(
        no_update,
        ["reconciliation_discrepancies", "reconciliation_totals"],
        "{RECONCILER} updates only runs (to supersede them) and cases"
    );
    for privilege in ["SELECT", "INSERT"] {
        let missing =
            relations_without(&mut c, RECONCILER, privilege, "reconciliation%", false).await?;
        assert!(
            missing.is_empty(),
            "{RECONCILER} lacks {privilege} on {missing:?}"
        );
    }
    let missing = relations_without(&mut c, RECONCILER, "SELECT", "reconciliation%", true).await?;
    assert!(missing.is_empty(), "{RECONCILER} cannot read {missing:?}");
    Ok(())
}

/// How long resolution waits after a lease for a stalled worker (the defaults' figure).
const QUIET: std::time::Duration = std::time::Duration::from_secs(12);

#[tokio::test]
async fn the_operator_resolves_replays_and_discards_dead_jobs_and_reads_everything()
-> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    insert_job(&db, "D1", "dead", Some("outcome_unknown")).await?;
    insert_job(&db, "D2", "dead", Some("retries_exhausted")).await?;
    insert_job(&db, "D3", "dead", Some("retries_exhausted")).await?;
    insert_job(&db, "D4", "dead", Some("retries_exhausted")).await?;
    let mut c = connect_as(&db.url, OPERATOR).await?;
    let op = Operator {
        name: "alice",
        note: "checked with the provider",
    };
    let tz = chrono_tz::Asia::Shanghai;

    // refundctl's own store calls, on a connection that is refunds_operator.
    let mut tx = c.begin().await?;
    let paid = jobs::resolve(
        &mut tx,
        "D1",
        Resolution::Succeeded {
            settlement_refund_fee: 90,
        },
        QUIET,
        op,
        tz,
    )
    .await?;
    let failed = jobs::resolve(&mut tx, "D2", Resolution::Failed, QUIET, op, tz).await?;
    let replayed = jobs::replay(&mut tx, "D3", op).await?;
    let refused = jobs::replay(&mut tx, "NOPE", op).await?;
    let discarded = jobs::discard(&mut tx, "D4", op).await?;
    tx.commit().await?;
    assert_eq!(discarded, Verdict::Done { prior: State::Dead });
    assert_eq!(paid, Verdict::Done { prior: State::Dead });
    assert_eq!(failed, Verdict::Done { prior: State::Dead });
    assert_eq!(replayed, Verdict::Done { prior: State::Dead });
    assert!(matches!(refused, Verdict::Refused { .. }));
    assert_eq!(
        ops::job_state(&db.pool, "D1").await?.map(|s| s.0),
        Some(State::Succeeded)
    );
    assert_eq!(
        ops::job_state(&db.pool, "D3").await?.map(|s| s.0),
        Some(State::Received)
    );
    let audit: i64 = sqlx::query_scalar("SELECT count(*) FROM operator_audit")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(audit, 5);

    for sql in [
        "DELETE FROM ledger",
        "UPDATE ledger SET refund_fee = 1",
        "DELETE FROM operator_audit",
        "UPDATE operator_audit SET note = 'nothing happened'",
        "TRUNCATE operator_audit",
        "DELETE FROM jobs",
        "DELETE FROM outbox",
        "INSERT INTO provider_attempts (refund_no, attempt, provider, merchant, outcome,
             request, latency_us)
         VALUES ('D1', 1, 'shengpay', 'm1', 'accepted', '{}', 1)",
        "UPDATE job_transitions SET actor = 'someone else'",
        "INSERT INTO rejected_messages (kind, field, reason, body, body_sha256)
         VALUES ('rejected', 'x', 'y', '\\x00', '\\x00')",
        // Only through the database's operator functions, never around them and their audit.
        "UPDATE jobs SET state = 'received' WHERE refund_no = 'D2'",
        "UPDATE jobs SET last_message = 'x' WHERE refund_no = 'D2'",
        "UPDATE orders SET committed_fee = 0",
        "INSERT INTO ledger (refund_no, entry_kind, provider, merchant, refund_fee,
             settlement_refund_fee, business_date, source)
         VALUES ('D2', 'refund', 'shengpay', 'm1', 100, 100, current_date, 'manual')",
        "INSERT INTO outbox (routing_key, refund_no, payload) VALUES ('refund.succeeded', 'D2', '{}')",
        "INSERT INTO job_transitions (refund_no, from_state, to_state, attempt, actor)
         VALUES ('D2', 'failed', 'succeeded', 1, 'x')",
        "INSERT INTO operator_audit (action, result, operator, note) VALUES ('a', 'b', 'c', 'd')",
        "UPDATE reconciliation_cases SET state = 'explained'",
        "UPDATE approval_requests SET state = 'rejected'",
        "DELETE FROM status_queries",
        "SELECT operator_step_audit('D2', 'a', 'b', 'c', 'd', NULL, NULL, NULL, NULL)",
        "SELECT operator_step_transition('D2', 'failed', 'succeeded', 'x', NULL, NULL, NULL, NULL)",
        "INSERT INTO dlq_discards (refund_no, operator, note) VALUES ('D2', 'x', 'y')",
        "DELETE FROM dlq_discards",
    ] {
        denied(&mut c, OPERATOR, sql).await?;
    }
    // Every audit row names who logged in to the database beside the operator's own name.
    let session: String = sqlx::query_scalar("SELECT session_user::text")
        .fetch_one(&mut c)
        .await?;
    let db_users: Vec<Option<String>> =
        sqlx::query_scalar("SELECT db_user FROM operator_audit ORDER BY id")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(db_users, vec![Some(session.clone()); 5]);
    assert_ne!(session, OPERATOR, "session_user is the login, not the role");
    denied(
        &mut c,
        OPERATOR,
        "INSERT INTO reconciliation_runs (business_date, source, timezone, grace_minutes, status,
             started_at)
         VALUES (current_date, 'attempts', 'UTC', 0, 'balanced', now())",
    )
    .await?;

    // refundctl's read queries, on a pool whose connections are refunds_operator.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url_as_role(&db.url, OPERATOR))
        .await?;
    let detail = operator::job_detail(&pool, "D1").await?;
    assert!(detail.found());
    operator::dead_groups(&pool, &operator::DeadFilter::default()).await?;
    operator::dead_refund_nos(&pool, None).await?;
    operator::poison_groups(&pool, None, None, None).await?;
    operator::poison_messages(&pool, None, None, None).await?;
    operator::poison_totals(&pool).await?;
    operator::discarded_totals(&pool).await?;
    operator::replay_facts(&pool, "D3").await?;
    operator::oldest_in(&pool, &[State::Dead, State::Received]).await?;
    assert!(!operator::applied_migrations(&pool).await?.is_empty());
    pool.close().await;

    // Every table and view, including ones later migrations add, is readable by the operator:
    // a migration that creates one must grant on it (see the roles migration's header).
    for views in [false, true] {
        let unreadable = relations_without(&mut c, OPERATOR, "SELECT", "%", views).await?;
        assert!(
            unreadable.is_empty(),
            "{OPERATOR} cannot read {unreadable:?}: grant SELECT in the migration that creates them"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_state_change_outside_the_state_machine_is_refused_even_for_the_schema_owner()
-> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    insert_job(&db, "S1", "succeeded", None).await?;
    // db.pool is the owner (it ran the migrations).
    for (to, allowed_now) in [("in_flight", false), ("received", false), ("failed", true)] {
        let r = sqlx::query("UPDATE jobs SET state = $1 WHERE refund_no = 'S1'")
            .bind(to)
            .execute(&db.pool)
            .await;
        match (r, allowed_now) {
            (Ok(_), true) => {}
            (Err(sqlx::Error::Database(e)), false) if e.code().as_deref() == Some("23514") => {
                assert!(e.message().contains("not a transition"), "{}", e.message());
            }
            (r, _) => anyhow::bail!("succeeded -> {to}: {r:?}"),
        }
    }
    assert_eq!(
        ops::job_state(&db.pool, "S1").await?.map(|s| s.0),
        Some(State::Failed)
    );
    Ok(())
}

#[tokio::test]
async fn the_databases_list_of_transitions_is_the_state_machines() -> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    let stored: std::collections::BTreeSet<(String, String)> =
        sqlx::query_as("SELECT from_state, to_state FROM job_state_transitions")
            .fetch_all(&db.pool)
            .await?
            .into_iter()
            .collect();
    let rust: std::collections::BTreeSet<(String, String)> = shared::state::TRANSITIONS
        .iter()
        .map(|t| (t.from.as_str().to_owned(), t.to.as_str().to_owned()))
        .collect();
    assert_eq!(
        stored, rust,
        "job_state_transitions (migration 20261204000050) and state::TRANSITIONS differ: \
         a new transition needs a migration that lists it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_roles_migration_is_idempotent_and_safe_to_run_concurrently() -> anyhow::Result<()> {
    // The migration under other role names, so that the roles do not exist yet and the race
    // between databases (roles are cluster-wide) really happens.
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let names: Vec<(&str, String)> = [WORKER, RECONCILER, OPERATOR]
        .into_iter()
        .map(|r| (r, format!("t{id}_{}", r.trim_start_matches("refunds_"))))
        .collect();
    let mut sql = ROLES_SQL.to_owned();
    for (from, to) in &names {
        sql = sql.replace(from, to);
    }
    let dbs = futures::future::try_join_all((0..4).map(|_| testkit::test_db())).await?;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(dbs.len()));
    let runs = dbs.iter().map(|db| {
        let sql = sql.clone();
        let barrier = barrier.clone();
        async move {
            let mut c = PgConnection::connect(&db.url).await?;
            barrier.wait().await;
            // Twice, each in a transaction as sqlx runs a migration: the second run finds
            // everything in place.
            for _ in 0..2 {
                let mut tx = c.begin().await?;
                sqlx::raw_sql(AssertSqlSafe(sql.clone()))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Ok::<_, anyhow::Error>(c)
        }
    });
    let result = futures::future::try_join_all(runs).await;

    // Clean up whatever happened: revoke in every database, then drop the roles.
    let role_list = names
        .iter()
        .map(|(_, n)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    for db in &dbs {
        let mut c = PgConnection::connect(&db.url).await?;
        let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP OWNED BY {role_list}")))
            .execute(&mut c)
            .await;
    }
    let created: Vec<(String, bool)> = sqlx::query(
        "SELECT rolname::text, rolcanlogin FROM pg_roles WHERE rolname LIKE $1 ORDER BY 1",
    )
    .bind(format!("t{id}\\_%"))
    .fetch_all(&dbs[0].pool)
    .await?
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    sqlx::raw_sql(AssertSqlSafe(format!("DROP ROLE IF EXISTS {role_list}")))
        .execute(&dbs[0].pool)
        .await?;

    result?;
    assert_eq!(created.len(), 3, "{created:?}");
    assert!(created.iter().all(|(_, login)| !login), "{created:?}");
    Ok(())
}
