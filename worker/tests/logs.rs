//! The captured log of a full run at debug level holds no private key, no `rfkey` and no
//! signature, and is JSON with the job's span fields.

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use refund_sim::{FaultAction, FaultRule};
use shared::job::ProviderKind;
use shared::state::State;
use shared::store::ops;
use testkit::{self, request_json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_logs_no_private_key_rfkey_or_signature() -> anyhow::Result<()> {
    let rules = vec![
        FaultRule::new(FaultAction::Decline).order_no("^D"),
        FaultRule::new(FaultAction::BadSignature)
            .order_no("^S")
            .times(1),
        FaultRule::new(FaultAction::Http500).order_no("^E").times(1),
    ];
    let sim = testkit::start_sim(rules, 0.3).await?;
    let (base, db) = testkit::test_config().await?;
    let config = testkit::with_sim_merchants(&base, &sim)?;
    let file = testkit::toml_file("refund-worker-", &config)?;
    let log = tempfile::NamedTempFile::new()?;
    let mut worker = Command::new(env!("CARGO_BIN_EXE_refund-worker"))
        .arg("--config")
        .arg(file.path())
        .env("RUST_LOG", "debug")
        .stdout(Stdio::from(log.reopen()?))
        .stderr(Stdio::from(log.reopen()?))
        .spawn()?;
    let merchants = [
        (ProviderKind::Shengpay, "93751497"),
        (ProviderKind::Shengpay, "10000002"),
        (ProviderKind::Wupay, "wu-soap11"),
        (ProviderKind::Wupay, "wu-soap12"),
        (ProviderKind::Wupay, "wu-post"),
        (ProviderKind::Wupay, "wu-get"),
    ];
    let mut bodies = Vec::new();
    for (i, prefix) in ["N", "D", "S", "E"].iter().enumerate() {
        for (j, (kind, m)) in merchants.iter().enumerate() {
            let n = i * 10 + j;
            bodies.push(serde_json::to_vec(&request_json(
                &format!("L{n:03}"),
                &format!("{prefix}{n:03}"),
                *kind,
                m,
                900,
                300,
            ))?);
        }
    }
    testkit::publish_requests(&config, &bodies).await?;
    let pool = db.pool.clone();
    testkit::wait_until(Duration::from_secs(60), "every job final or dead", || {
        let pool = pool.clone();
        async move {
            let c = ops::counts_by_state(&pool).await?;
            let open: i64 = [State::Received, State::InFlight, State::RetryWait]
                .iter()
                .map(|s| c.get(s).copied().unwrap_or(0))
                .sum();
            Ok(c.values().sum::<i64>() == 24 && open == 0)
        }
    })
    .await?;
    kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM)?;
    worker.wait()?;

    let text = std::fs::read_to_string(log.path())?;
    assert!(
        text.lines().count() > 20,
        "the log is suspiciously short:\n{text}"
    );
    let root = testkit::workspace_root();
    let rfkey = std::fs::read_to_string(root.join("keys/dev/wupay_rfkey.txt"))?;
    assert!(!text.contains(rfkey.trim()), "the rfkey was logged");
    for key in [
        "shengpay_merchant_private.pem",
        "shengpay_platform_private.pem",
    ] {
        let pem = std::fs::read_to_string(root.join("keys/dev").join(key))?;
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!text.contains(line), "a line of {key} was logged");
        }
    }
    // Signatures are 2048-bit RSA in base64: 344 characters. Nothing that long may appear.
    let long_b64 = regex::Regex::new(r"[A-Za-z0-9+/]{120,}={0,2}")?;
    assert!(
        !long_b64.is_match(&text),
        "something like a signature or key was logged: {:?}",
        long_b64.find(&text).map(|m| m.as_str())
    );
    // JSON lines, with the job span's fields on the provider-call lines.
    let mut call_lines = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON: {line}: {e}"))?;
        if v["fields"]["message"] == "provider call finished" {
            call_lines += 1;
            let span = &v["span"];
            for f in ["refund_no", "provider", "merchant", "attempt"] {
                assert!(!span[f].is_null(), "span field {f} missing in {line}");
            }
        }
    }
    assert!(call_lines >= 24, "{call_lines} provider-call lines");
    sim.shutdown().await;
    Ok(())
}
