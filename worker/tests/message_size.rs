//! Oversized messages (DESIGN §3, issue #18 point 6): the real worker refuses a body over
//! 64 KiB, stores only its size, SHA-256 and a prefix, and keeps no copy of it: its memory
//! does not grow with the messages it refuses.

use std::time::Duration;

use sha2::{Digest, Sha256};
use shared::job::MAX_MESSAGE_BYTES;
use shared::store::intake::OVERSIZED_PREFIX_BYTES;

/// A request of `bytes` bytes (its `reason` padded), distinct per `n`.
fn oversized(n: usize, bytes: usize) -> Vec<u8> {
    let mut v = testkit::request_json(
        &format!("RBIG{n:04}"),
        &format!("OBIG{n:04}"),
        shared::job::ProviderKind::Shengpay,
        "nobody",
        1000,
        100,
    );
    let base = serde_json::to_vec(&v).unwrap().len();
    v["reason"] = "x"
        .repeat(bytes - base + v["reason"].as_str().unwrap().len())
        .into();
    let body = serde_json::to_vec(&v).unwrap();
    assert_eq!(body.len(), bytes);
    body
}

/// The worker's resident and peak resident memory, in KiB, from /proc.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// (error_code, body_bytes, stored length, stored body, body_sha256) of a rejected message.
type StoredRejection = (String, i64, i32, Vec<u8>, Vec<u8>);

async fn stored(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM rejected_messages")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mebibyte_message_is_refused_with_its_size_hash_and_a_prefix_and_not_held()
-> anyhow::Result<()> {
    const MIB: usize = 1024 * 1024;
    const MESSAGES: usize = 40;
    let (mut config, db) = testkit::test_config().await?;
    config.worker.metrics_addr = testkit::free_addr()?;
    testkit::with_dev_merchants(&mut config)?;
    let file = testkit::toml_file("refund-worker-size-", &config)?;
    let worker = testkit::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_refund-worker"))
            .arg("--config")
            .arg(file.path())
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    testkit::wait_ready(&config.worker.metrics_addr, true, Duration::from_secs(30)).await?;

    // One at a time, each taken in before the next: what is measured is what the worker keeps
    // of a message after refusing it, not how many the broker hands it at once (that is the
    // prefetch times the broker's max_message_size; docs/operations.md).
    let mut after_warmup = 0;
    for n in 0..MESSAGES {
        testkit::publish_requests(&config, &[oversized(n, MIB)]).await?;
        testkit::wait_until(Duration::from_secs(30), "the message stored", || async {
            Ok(stored(&db.pool).await == n as i64 + 1)
        })
        .await?;
        if n == 4 {
            after_warmup = memory_kib(worker.id()).0;
        }
    }
    let (rss, peak) = memory_kib(worker.id());

    let rows: Vec<StoredRejection> = sqlx::query_as(
        "SELECT error_code, body_bytes, octet_length(body), body, body_sha256
         FROM rejected_messages ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(rows.len(), MESSAGES);
    for (n, (code, bytes, stored_len, prefix, sha)) in rows.iter().enumerate() {
        let body = oversized(n, MIB);
        assert_eq!(code, "TOO_LARGE");
        assert_eq!(*bytes, MIB as i64, "the whole size is recorded");
        assert_eq!(
            *stored_len as usize, OVERSIZED_PREFIX_BYTES,
            "only a prefix is stored"
        );
        assert_eq!(prefix.as_slice(), &body[..OVERSIZED_PREFIX_BYTES]);
        assert_eq!(
            sha.as_slice(),
            &Sha256::digest(&body)[..],
            "of the whole body"
        );
    }
    // 35 MiB refused after the warm-up; a worker that kept each (or a copy of each) would
    // have grown by that much.
    assert!(
        rss <= after_warmup + 12 * 1024,
        "resident memory grew from {after_warmup} KiB to {rss} KiB over {} refused MiB",
        MESSAGES - 5
    );
    assert!(
        peak <= after_warmup + 24 * 1024,
        "peak resident memory {peak} KiB against {after_warmup} KiB after the warm-up"
    );
    const { assert!(MAX_MESSAGE_BYTES < MIB) };

    worker.terminate()?;
    Ok(())
}
