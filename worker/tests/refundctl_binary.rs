//! The real `refundctl` binary: `--help` on every command, and exit status 0 (done), 1 (some
//! items refused or not found) and 2 (could not run).

mod refundctl_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use refundctl_common as rc;
use shared::config::Config;

fn write_config(config: &Config) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("refundctl-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, toml_of(config)).unwrap();
    path
}

fn toml_of(c: &Config) -> String {
    let a = &c.amqp;
    format!(
        "database_url = {:?}\namqp_url = {:?}\n\n[amqp]\nexchange = {:?}\nqueue = {:?}\n\
         routing_key = {:?}\ndead_letter_exchange = {:?}\ndead_letter_queue = {:?}\n\
         events_exchange = {:?}\nqueue_type = {:?}\n",
        c.database_url,
        c.amqp_url,
        a.exchange,
        a.queue,
        a.routing_key,
        a.dead_letter_exchange,
        a.dead_letter_queue,
        a.events_exchange,
        a.queue_type
    )
}

fn refundctl(config: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_refundctl"));
    cmd.env_remove("REFUNDS_CONFIG");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args).output().expect("refundctl runs")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

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
    let o = refundctl(Some(Path::new("/nonexistent/refunds.toml")), &["stats"]);
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
