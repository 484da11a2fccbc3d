//! What a new user of `refundctl` fell into, each read as success or as a puzzle in an
//! incident (issue #20, "CLI without traps"): typos that matched nothing and exited 0, a dry run
//! that wanted an audit note, a `| head` that ended in an error, `job show` that knew only
//! refund numbers, `dlq list` without the filters an SRE reaches for, `enqueue` publishing
//! requests the worker will refuse, and "pool timed out" for a database that refused the
//! connection.

mod refundctl_common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use clap::Parser;
use refundctl_common as rc;
use refundctl_common::{code, refundctl, show, write_config};
use shared::state::Cause;
use worker::ctl::{Cli, Status};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn an_unknown_cause_provider_or_state_exits_2_listing_the_allowed_values() {
    for (args, allowed) in [
        (
            vec!["dlq", "list", "--cause", "retries_exausted"],
            &[
                "retries_exhausted",
                "outcome_unknown",
                "rejected",
                "conflict",
            ][..],
        ),
        (
            vec!["dlq", "replay", "--cause", "outcome_unknwn", "--dry-run"],
            &["retries_exhausted", "outcome_unknown", "refund_abnormal"][..],
        ),
        (
            vec!["dlq", "list", "--provider", "paypal"],
            &["shengpay", "wupay"][..],
        ),
        (
            vec!["case", "list", "--state", "closed"],
            &["open", "explained", "corrected"][..],
        ),
    ] {
        let o = refundctl(None, &args);
        assert_eq!(code(&o), 2, "{args:?}: {}", show(&o));
        for value in allowed {
            assert!(
                stderr(&o).contains(value),
                "{args:?} should list {value}: {}",
                show(&o)
            );
        }
    }
}

/// Every leaf command of refundctl, as `--help` reaches it.
const COMMANDS: &[&[&str]] = &[
    &["enqueue"],
    &["job", "show"],
    &["job", "resolve"],
    &["job", "correct"],
    &["approvals", "list"],
    &["approvals", "approve"],
    &["approvals", "reject"],
    &["case", "list"],
    &["case", "explain"],
    &["dlq", "list"],
    &["dlq", "replay"],
    &["dlq", "discard"],
    &["stats"],
    &["migrate"],
];

#[test]
fn every_commands_help_shows_examples() {
    let o = refundctl(None, &["--help"]);
    assert!(stdout(&o).contains("Examples:"), "{}", show(&o));
    for command in COMMANDS {
        let mut args = command.to_vec();
        args.push("--help");
        let o = refundctl(None, &args);
        assert_eq!(code(&o), 0, "{args:?}: {}", show(&o));
        let text = stdout(&o);
        let examples = text
            .split_once("Examples:")
            .map(|(_, e)| e.to_owned())
            .unwrap_or_default();
        assert!(
            examples.contains(&format!("refundctl {}", command.join(" "))),
            "{args:?} has no example of itself: {}",
            show(&o)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_needs_no_operator_or_note() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "R1", "m1", "SYSTEMERROR").await;
    let file = write_config(&config);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_refundctl"));
    // No operating-system user to default to either.
    cmd.env_remove("USER")
        .env_remove("LOGNAME")
        .env_remove("USERNAME")
        .env_remove("REFUNDS_CONFIG")
        .arg("--config")
        .arg(&file)
        .args(["dlq", "replay", "--all", "--dry-run"]);
    let o = cmd.output()?;
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert!(stdout(&o).contains("R1  would replay"), "{}", show(&o));
    assert_eq!(rc::state_of(&db.pool, "R1").await, "dead");
    // A real replay still needs both.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_refundctl"));
    cmd.env_remove("USER")
        .env_remove("LOGNAME")
        .env_remove("USERNAME")
        .arg("--config")
        .arg(&file)
        .args(["dlq", "replay", "--all", "--note", "x"]);
    let o = cmd.output()?;
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("--operator"), "{}", show(&o));
    Ok(())
}

/// `copies` more dead jobs like `template` (R-numbered), in one statement.
async fn clone_dead_jobs(pool: &sqlx::PgPool, template: &str, copies: i32) {
    sqlx::query(
        "INSERT INTO jobs
         SELECT (jsonb_populate_record(NULL::jobs, to_jsonb(j)
                 || jsonb_build_object('refund_no', 'C' || g, 'order_no', 'OC' || g))).*
         FROM jobs j, generate_series(1, $2) g WHERE j.refund_no = $1",
    )
    .bind(template)
    .bind(copies)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_the_output_quietly() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "R1", "m1", "SYSTEMERROR").await;
    // Well over a pipe's buffer of JSON lines.
    clone_dead_jobs(&db.pool, "R1", 3_000).await;
    let file = write_config(&config);
    let mut child = Command::new(env!("CARGO_BIN_EXE_refundctl"))
        .env_remove("REFUNDS_CONFIG")
        .arg("--config")
        .arg(&file)
        .args(["dlq", "list", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // `| head -1`: one line read, then the pipe closed.
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first)?;
    assert!(first.contains("\"dead_job\""), "{first}");
    let o = child.wait_with_output()?;
    // As a filter the signal ends: 128 + SIGPIPE, and not a word.
    assert_eq!(code(&o), 141, "{}", show(&o));
    assert_eq!(stderr(&o), "", "nothing on stderr");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_names_the_database_it_read_and_shows_poison_messages_on_their_own_line()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "R1", "m1", "SYSTEMERROR").await;
    let r = rc::take(&db.pool, b"not json").await;
    assert!(matches!(
        r,
        shared::store::intake::IntakeResult::Rejected { .. }
    ));
    let file = write_config(&config);
    let o = refundctl(Some(&file), &["stats"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    let text = stdout(&o);
    let db_name = db.url.rsplit('/').next().unwrap().to_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("Database:") && l.contains(&db_name)),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("Poison messages:") && l.contains('1')),
        "{text}"
    );
    let o = refundctl(Some(&file), &["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert!(
        v["database"]
            .as_str()
            .unwrap_or_default()
            .contains(&db_name),
        "{v}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_show_finds_a_job_by_order_number_or_provider_refund_id() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::succeeded_job(&db.pool, "R7", "m1").await;
    let file = write_config(&config);
    // By order number (rc::body orders are "O" + refund_no) and by the provider's refund id.
    for key in ["OR7", "P-R7"] {
        let o = refundctl(Some(&file), &["job", "show", key]);
        assert_eq!(code(&o), 0, "{key}: {}", show(&o));
        assert!(stdout(&o).contains("R7"), "{key}: {}", show(&o));
        assert!(stdout(&o).contains("succeeded"), "{key}: {}", show(&o));
    }
    // Two refunds of one order: both named, none chosen for the user.
    let second = String::from_utf8(rc::body("R8", "m1"))?.replace("\"OR8\"", "\"OR7\"");
    rc::take(&db.pool, second.as_bytes()).await;
    let o = refundctl(Some(&file), &["job", "show", "OR7"]);
    assert_eq!(code(&o), 1, "{}", show(&o));
    assert!(
        stderr(&o).contains("R7") && stderr(&o).contains("R8"),
        "{}",
        show(&o)
    );
    let o = refundctl(Some(&file), &["job", "show", "NOTHING"]);
    assert_eq!(code(&o), 1, "{}", show(&o));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_filters_by_merchant_code_and_since_with_a_limit() -> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "E1", "m1", "SYSTEMERROR").await;
    rc::exhausted_job(&db.pool, "E2", "m1", "SYSTEMERROR").await;
    rc::exhausted_job(&db.pool, "E3", "m1", "FREQUENCY_LIMITED").await;
    rc::exhausted_job(&db.pool, "E4", "w1", "SYSTEMERROR").await;
    rc::dead_job(
        &db.pool,
        "U1",
        "w1",
        rc::maybe_delivered(),
        Cause::OutcomeUnknown,
    )
    .await;
    // E1 died three days ago.
    sqlx::query("UPDATE jobs SET updated_at = now() - interval '3 days' WHERE refund_no = 'E1'")
        .execute(&db.pool)
        .await?;
    let ctl = rc::ctl(&config, &db.pool);
    let run = |args: &'static [&'static str]| {
        let ctl = &ctl;
        async move {
            let mut argv = vec!["refundctl", "dlq", "list", "--json"];
            argv.extend_from_slice(args);
            let cli = Cli::try_parse_from(&argv).expect("parses");
            let mut out = Vec::new();
            let status = worker::ctl::execute(ctl, cli.command, &mut out)
                .await
                .expect("runs");
            assert_eq!(status, Status::Done);
            let mut listed: Vec<String> = rc::text(&out)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["type"] == "dead_job")
                .map(|v| v["refund_no"].as_str().unwrap_or_default().to_owned())
                .collect();
            listed.sort();
            listed
        }
    };
    assert_eq!(run(&["--merchant", "m1"]).await, ["E1", "E2", "E3"]);
    assert_eq!(run(&["--code", "SYSTEMERROR"]).await, ["E1", "E2", "E4"]);
    assert_eq!(
        run(&["--merchant", "m1", "--code", "SYSTEMERROR"]).await,
        ["E1", "E2"]
    );
    assert_eq!(run(&["--since", "1d"]).await, ["E2", "E3", "E4", "U1"]);
    assert_eq!(
        run(&["--since", "2h", "--merchant", "m1"]).await,
        ["E2", "E3"]
    );
    // A limit keeps the longest dead first.
    assert_eq!(run(&["--limit", "2"]).await.len(), 2);
    assert!(run(&["--limit", "1"]).await == ["E1"]);
    let cli = Cli::try_parse_from(["refundctl", "dlq", "list", "--since", "yesterday"]);
    assert!(cli.is_err(), "--since takes a duration like 2h or 3d");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_refuses_a_line_whose_merchant_is_not_configured_as_the_worker_would()
-> anyhow::Result<()> {
    let (mut config, db) = testkit::test_config().await?;
    testkit::with_dev_merchants(&mut config)?;
    let known = config.shengpay.merchants[0].merchant.clone();
    let lines = [
        serde_json::to_string(&testkit::request_json(
            "Q1",
            "OQ1",
            shared::job::ProviderKind::Shengpay,
            &known,
            1000,
            100,
        ))?,
        serde_json::to_string(&testkit::request_json(
            "Q2",
            "OQ2",
            shared::job::ProviderKind::Shengpay,
            "nobody",
            1000,
            100,
        ))?,
    ];
    let path = std::env::temp_dir().join(format!("enqueue-{}.jsonl", uuid::Uuid::new_v4()));
    std::fs::write(&path, lines.join("\n") + "\n")?;
    let ctl = worker::ctl::Ctl::new(
        config.clone(),
        db.pool.clone(),
        worker::ctl::Idempotency::from_config(&config),
    )?;
    let mut out = Vec::new();
    let report = worker::ctl::enqueue::enqueue(
        &ctl,
        &worker::ctl::enqueue::EnqueueArgs { file: path.clone() },
        &mut out,
    )
    .await?;
    assert_eq!(report.accepted, 1, "{}", rc::text(&out));
    assert_eq!(report.invalid.len(), 1);
    let problem = &report.invalid[0];
    assert_eq!(
        (problem.line, problem.field.as_str()),
        (2, "merchant"),
        "{problem:?}"
    );
    assert!(problem.reason.contains("nobody"), "{problem:?}");
    assert_eq!(testkit::queue_depth(&config, &config.amqp.queue).await?, 1);
    std::fs::remove_file(&path)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_the_connection_is_named_as_refusing_it() -> anyhow::Result<()> {
    let (mut config, _db) = testkit::test_config().await?;
    let port = testkit::free_port()?;
    config.database_url = format!("postgres://postgres@127.0.0.1:{port}/refunds");
    let file = write_config(&config);
    let o = refundctl(Some(&file), &["stats"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    let err = stderr(&o).to_lowercase();
    assert!(err.contains("connection refused"), "{}", show(&o));
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{}", show(&o));
    assert!(!err.contains("pool timed out"), "{}", show(&o));
    Ok(())
}
