//! `/metrics` of the real binary (issue #20, "Observability shipped"): every metric has its
//! `# HELP`, provider calls carry their merchant, the build is labelled, and jobs by state and
//! the dead-letter depth are read from the database, so they go down when an operator acts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use shared::job::ProviderKind;
use shared::state::State;
use shared::store::ops;

/// The samples of `/metrics`: (name with labels, value).
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(addr: &str) -> anyhow::Result<String> {
    let (status, page) = testkit::http_get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_help_merchants_a_build_and_database_gauges_that_go_down() -> anyhow::Result<()>
{
    let sim = testkit::start_sim(Vec::new(), 0.0).await?;
    let (mut base, db) = testkit::test_config().await?;
    base.worker.metrics_addr = testkit::free_addr()?;
    // The database gauges are read with the full sweep: often, so that the test sees them.
    base.worker.full_sweep_interval_ms = 300;
    let config = testkit::with_sim_merchants(&base, &sim)?;
    let merchant = config.shengpay.merchants[0].merchant.clone();
    let file = testkit::toml_file("refund-worker-metrics-", &config)?;
    let worker = testkit::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_refund-worker"))
            .arg("--config")
            .arg(file.path())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let addr = config.worker.metrics_addr.clone();
    testkit::wait_ready(&addr, true, Duration::from_secs(30)).await?;

    let bodies: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            serde_json::to_vec(&testkit::request_json(
                &format!("MET{i}"),
                &format!("OMET{i}"),
                ProviderKind::Shengpay,
                &merchant,
                1000,
                100,
            ))
            .unwrap()
        })
        .collect();
    testkit::publish_requests(&config, &bodies).await?;
    // And one for a merchant nobody configured: a poison message, in the dead-letter depth.
    testkit::publish_requests(
        &config,
        &[serde_json::to_vec(&testkit::request_json(
            "MET-X",
            "OMET-X",
            ProviderKind::Shengpay,
            "nobody",
            1000,
            100,
        ))?],
    )
    .await?;
    testkit::wait_until(Duration::from_secs(60), "4 jobs succeeded", || async {
        let counts = ops::counts_by_state(&db.pool).await?;
        Ok(counts.get(&State::Succeeded).copied() == Some(4))
    })
    .await?;
    let jobs_succeeded = "refunds_jobs{state=\"succeeded\"}";
    testkit::wait_until(
        Duration::from_secs(30),
        "the gauges of a full sweep",
        || {
            let addr = addr.clone();
            async move {
                let s = samples(&scrape(&addr).await?);
                Ok(s.get(jobs_succeeded) == Some(&4.0) && s.get("refunds_dlq_depth") == Some(&1.0))
            }
        },
    )
    .await?;

    let page = scrape(&addr).await?;
    // Every metric family has its help (and its type).
    let helped: BTreeSet<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let typed: BTreeSet<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!typed.is_empty(), "{page}");
    let without: Vec<&&str> = typed.iter().filter(|t| !helped.contains(*t)).collect();
    assert!(without.is_empty(), "metrics without # HELP: {without:?}");

    let s = samples(&page);
    assert_eq!(
        s.get(&format!(
            "refunds_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(&1.0),
        "{page}"
    );
    let calls: f64 = s
        .iter()
        .filter(|(k, _)| {
            k.starts_with("refunds_provider_calls_total{")
                && k.contains(&format!("merchant=\"{merchant}\""))
        })
        .map(|(_, v)| v)
        .sum();
    assert!(calls >= 4.0, "provider calls by merchant: {page}");
    assert_eq!(s.get("refunds_jobs{state=\"dead\"}"), Some(&0.0));
    for cause in shared::state::Cause::ALL {
        let key = format!("refunds_dead_jobs{{cause=\"{}\"}}", cause.as_str());
        assert_eq!(s.get(&key), Some(&0.0), "{key}: {page}");
    }
    assert!(
        s.contains_key("refunds_oldest_provider_wait_seconds"),
        "{page}"
    );
    // Published to final: the four refunds that ended, with the long buckets of an end that
    // may take the provider minutes.
    let ended: f64 = s
        .iter()
        .filter(|(k, _)| {
            k.starts_with("refunds_end_to_end_seconds_count{") && k.contains("state=\"succeeded\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(ended, 4.0, "{page}");
    assert!(
        page.contains("refunds_end_to_end_seconds_bucket{"),
        "{page}"
    );
    assert!(page.contains("le=\"3600\""), "end-to-end buckets: {page}");

    // The poison message discarded by an operator: the depth goes back to zero (a counter of
    // dead letters never would).
    let poison: i64 = sqlx::query_scalar("SELECT id FROM rejected_messages")
        .fetch_one(&db.pool)
        .await?;
    let mut conn = db.pool.acquire().await?;
    let refused = shared::store::jobs::discard_poison(
        &mut conn,
        poison,
        shared::store::jobs::Operator {
            name: "sre",
            note: "unknown merchant, test traffic",
        },
    )
    .await?;
    assert_eq!(refused, None);
    testkit::wait_until(Duration::from_secs(30), "the depth back to 0", || {
        let addr = addr.clone();
        async move { Ok(samples(&scrape(&addr).await?).get("refunds_dlq_depth") == Some(&0.0)) }
    })
    .await?;
    worker.terminate()?;
    sim.shutdown().await;
    Ok(())
}
