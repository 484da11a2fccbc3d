//! The real `refundctl` binary: `--help` on every command, and exit status 0 (done), 1 (some
//! items refused or not found) and 2 (could not run).

mod refundctl_common;

use refundctl_common as rc;
use refundctl_common::{code, refundctl, show, write_config};

#[test]
fn every_command_has_help_and_usage_errors_exit_2() {
    for args in [
        vec!["--help"],
        vec!["enqueue", "--help"],
        vec!["job", "--help"],
        vec!["job", "show", "--help"],
        vec!["job", "resolve", "--help"],
        vec!["job", "correct", "--help"],
        vec!["approvals", "list", "--help"],
        vec!["approvals", "approve", "--help"],
        vec!["approvals", "reject", "--help"],
        vec!["case", "list", "--help"],
        vec!["case", "explain", "--help"],
        vec!["dlq", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["dlq", "replay", "--help"],
        vec!["stats", "--help"],
        vec!["migrate", "--help"],
    ] {
        let o = refundctl(None, &args);
        assert_eq!(code(&o), 0, "{args:?}: {}", show(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage: refundctl"),
            "{args:?}: {}",
            show(&o)
        );
    }
    for args in [
        vec![],
        vec!["nonsense"],
        vec!["dlq", "replay", "--operator", "a", "--note", "b"],
        vec![
            "dlq",
            "replay",
            "--all",
            "--cause",
            "x",
            "--operator",
            "a",
            "--note",
            "b",
        ],
        vec!["dlq", "replay", "--all", "--note", "b"],
        vec!["dlq", "replay", "--all", "--operator", " ", "--note", "b"],
        vec![
            "dlq",
            "replay",
            "--all",
            "--rate",
            "-1",
            "--operator",
            "a",
            "--note",
            "b",
        ],
        vec![
            "job",
            "resolve",
            "R1",
            "--as",
            "succeeded",
            "--operator",
            "a",
            "--note",
            "b",
        ],
        vec![
            "job",
            "resolve",
            "R1",
            "--as",
            "maybe",
            "--operator",
            "a",
            "--note",
            "b",
        ],
        vec!["dlq", "list", "--provider", "paypal"],
        vec!["case", "list", "--state", "closed"],
        vec![
            "job",
            "correct",
            "R1",
            "--as",
            "succeeded",
            "--evidence",
            "e",
            "--operator",
            "a",
        ],
        vec!["approvals", "approve", "7"],
    ] {
        let o = refundctl(None, &args);
        assert_eq!(code(&o), 2, "{args:?}: {}", show(&o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_is_0_when_done_1_when_refused_or_not_found_and_2_when_it_cannot_run()
-> anyhow::Result<()> {
    let (config, db) = testkit::test_config().await?;
    rc::exhausted_job(&db.pool, "R1", "m1", "SYSTEMERROR").await;
    let file = write_config(&config);
    let cfg = Some(file.as_path());

    let o = refundctl(cfg, &["migrate"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("up to date"));

    let o = refundctl(cfg, &["dlq", "list"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("retries_exhausted"));

    let o = refundctl(cfg, &["stats", "--json"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["counts"]["dead"], 1);

    let o = refundctl(cfg, &["job", "show", "R1"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    let o = refundctl(cfg, &["job", "show", "NOPE"]);
    assert_eq!(code(&o), 1, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("NOPE"));

    // A dry run that would replay everything exits 0 and changes nothing.
    let o = refundctl(
        cfg,
        &[
            "dlq",
            "replay",
            "--all",
            "--dry-run",
            "--operator",
            "ivy",
            "--note",
            "check",
        ],
    );
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("R1  would replay"));
    assert_eq!(rc::state_of(&db.pool, "R1").await, "dead");

    // One replayed, one not found: exit 1.
    let o = refundctl(
        cfg,
        &[
            "dlq",
            "replay",
            "--refund-no",
            "R1",
            "NOPE",
            "--operator",
            "ivy",
            "--note",
            "INC-1",
        ],
    );
    assert_eq!(code(&o), 1, "{}", show(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("R1  replayed"), "{}", show(&o));
    assert!(
        stdout.contains("NOPE  refused: no such job"),
        "{}",
        show(&o)
    );
    assert_eq!(rc::state_of(&db.pool, "R1").await, "received");

    // --json: one object per job; R1 is no longer dead, so it is refused (exit 1).
    let o = refundctl(
        cfg,
        &[
            "dlq",
            "replay",
            "--refund-no",
            "R1",
            "--json",
            "--operator",
            "ivy",
            "--note",
            "again",
        ],
    );
    assert_eq!(code(&o), 1, "{}", show(&o));
    let line: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(line["refund_no"], "R1");
    assert_eq!(line["result"], "refused");
    assert_eq!(line["prior"], "received");
    assert!(line["reason"].as_str().unwrap().contains("not dead"));

    // Resolving a job that is not dead is refused: exit 1.
    let o = refundctl(
        cfg,
        &[
            "job",
            "resolve",
            "R1",
            "--as",
            "failed",
            "--operator",
            "ivy",
            "--note",
            "x",
        ],
    );
    assert_eq!(code(&o), 1, "{}", show(&o));

    // Could not run: a missing config file, an unreachable database.
    let o = refundctl(
        Some(std::path::Path::new("/nonexistent/refunds.toml")),
        &["stats"],
    );
    assert_eq!(code(&o), 2, "{}", show(&o));
    let mut unreachable = config.clone();
    unreachable.database_url = "postgres://postgres@127.0.0.1:1/nothing".into();
    let bad = write_config(&unreachable);
    let o = refundctl(Some(&bad), &["dlq", "list"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("PostgreSQL"),
        "{}",
        show(&o)
    );
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&bad);
    Ok(())
}
