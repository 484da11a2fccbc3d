//! The evidence the simulator exports: the statement CSV (DESIGN.md §7), the paid list, the
//! control endpoints, the shipped config and the binary.

mod sim_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use refund_sim::{Provider, SimConfig};
use serde_json::{Map, Value};
use sim_support::*;

const HEADER: &str =
    "provider,merchant,refund_no,provider_refund_id,refund_fee,settlement_refund_fee,refunded_at";

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

async fn statement(client: &reqwest::Client, base: &str, query: &str) -> (u16, String) {
    let response = client
        .get(format!("{base}/_sim/statement?{query}"))
        .send()
        .await
        .expect("HTTP");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

fn rows(csv: &str) -> Vec<Vec<String>> {
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    assert_eq!(
        reader
            .headers()
            .expect("header")
            .iter()
            .collect::<Vec<_>>()
            .join(","),
        HEADER
    );
    reader
        .records()
        .map(|r| r.expect("row").iter().map(str::to_owned).collect())
        .collect()
}

#[tokio::test]
async fn the_statement_lists_refunds_by_business_date_split_at_midnight_in_shanghai() {
    let sim = start(config()).await;
    let client = client();
    let base = sim.base_url();
    let (late, early) = (unique("LATE"), unique("EARLY"));

    // 23:59:59.5 on 21 November in Shanghai (UTC+8).
    sim.set_now(Some(at("2026-11-21T15:59:59.500Z")));
    let late_response =
        shengpay_refund(&client, &sim, refund_fields(&unique("O"), &late, 1000, 100)).await;
    // 00:00:00.5 on 22 November in Shanghai.
    sim.set_now(Some(at("2026-11-21T16:00:00.500Z")));
    wupay_call(
        &client,
        &sim,
        Wu::Get,
        &wupay_params(&unique("O"), &early, 500, 50),
    )
    .await
    .expect("HTTP");
    sim.set_now(None);

    let (status, day1) = statement(&client, &base, "date=2026-11-21").await;
    assert_eq!(status, 200);
    assert!(day1.starts_with(&format!("{HEADER}\n")), "{day1}");
    let day1 = rows(&day1);
    assert_eq!(day1.len(), 1, "{day1:?}");
    assert_eq!(day1[0][0], "shengpay");
    assert_eq!(day1[0][1], MCH_ID);
    assert_eq!(day1[0][2], late);
    assert_eq!(day1[0][3], text(&late_response, "refundId"));
    assert_eq!(day1[0][4], "100");
    assert_eq!(day1[0][5], "100");
    assert!(
        day1[0][6].starts_with("2026-11-21T23:59:59."),
        "{}",
        day1[0][6]
    );
    assert!(day1[0][6].ends_with("+08:00"));
    assert!(DateTime::parse_from_rfc3339(&day1[0][6]).is_ok());

    let (_, day2) = statement(&client, &base, "date=2026-11-22").await;
    let day2 = rows(&day2);
    assert_eq!(day2.len(), 1);
    assert_eq!(day2[0][0], "wupay");
    assert_eq!(day2[0][1], "wu-get");
    assert_eq!(day2[0][2], early);
    assert!(day2[0][6].starts_with("2026-11-22T00:00:00."));

    let (_, only_shengpay) = statement(&client, &base, "date=2026-11-22&provider=shengpay").await;
    assert!(rows(&only_shengpay).is_empty());
    let (_, utc) = statement(&client, &base, "date=2026-11-21&tz=UTC").await;
    assert_eq!(rows(&utc).len(), 2);

    let in_process = sim
        .statement_csv(
            NaiveDate::from_ymd_opt(2026, 11, 22).expect("date"),
            Some(Provider::WuPay),
            None,
        )
        .expect("CSV");
    assert_eq!(rows(&in_process), day2);

    for bad in [
        "",
        "date=21-11-2026",
        "date=2026-11-21&provider=paypal",
        "date=2026-11-21&tz=Mars",
    ] {
        assert_eq!(statement(&client, &base, bad).await.0, 400, "{bad}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn the_paid_list_health_clock_and_reset_endpoints_work_over_http() {
    let sim = start(config()).await;
    let client = client();
    let base = sim.base_url();
    let refund = unique("R");
    shengpay_refund(
        &client,
        &sim,
        refund_fields(&unique("O"), &refund, 1000, 100),
    )
    .await;

    let paid: Vec<Map<String, Value>> = client
        .get(format!("{base}/_sim/paid"))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(paid.len(), 1);
    let entry = &paid[0];
    for key in [
        "provider",
        "merchant",
        "refund_no",
        "order_no",
        "provider_refund_id",
        "refund_fee",
        "settlement_refund_fee",
        "coupon_refund_fee",
        "refunded_at",
    ] {
        assert!(entry.contains_key(key), "{key} missing from {entry:?}");
    }
    assert_eq!(entry["provider"], "shengpay");
    assert_eq!(entry["refund_no"], refund.as_str());
    assert_eq!(entry["refund_fee"], 100);
    let refunded_at = entry["refunded_at"].as_str().expect("string");
    assert!(
        DateTime::parse_from_rfc3339(refunded_at).is_ok(),
        "{refunded_at}"
    );

    let health: Value = client
        .get(format!("{base}/_sim/health"))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["paid"], 1);

    let clock: Value = client
        .post(format!("{base}/_sim/clock"))
        .json(&serde_json::json!({"now": "2030-01-01T00:00:00Z"}))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert!(
        clock["now"]
            .as_str()
            .is_some_and(|n| n.starts_with("2030-01-01T00:00:0"))
    );
    assert!(sim.now() > at("2029-12-31T23:59:00Z"));

    let reset = client
        .post(format!("{base}/_sim/reset"))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(reset.status(), 200);
    assert!(sim.paid().is_empty());
    assert!(sim.calls().is_empty());
    // After a reset the same refund number pays again, with a new provider refund id.
    shengpay_refund(
        &client,
        &sim,
        refund_fields(&unique("O"), &refund, 1000, 100),
    )
    .await;
    assert_eq!(sim.paid().len(), 1);
    assert_ne!(
        sim.paid()[0].provider_refund_id,
        entry["provider_refund_id"].as_str().unwrap_or("")
    );
    sim.shutdown().await;
}

#[test]
fn the_shipped_config_is_valid_and_unknown_keys_are_refused() {
    let path = testkit::workspace_root().join("config/sim.toml");
    let config = SimConfig::load(&path).expect("config/sim.toml is valid");
    assert_eq!(config.listen.to_string(), "127.0.0.1:18080");
    assert_eq!(config.timezone, "Asia/Shanghai");
    let shengpay: Vec<_> = config
        .shengpay
        .merchants
        .iter()
        .map(|m| m.merchant.as_str())
        .collect();
    assert_eq!(shengpay, ["93751497", "10000002"]);
    let wupay: Vec<_> = config
        .wupay
        .merchants
        .iter()
        .map(|m| m.merchant.as_str())
        .collect();
    assert_eq!(wupay, ["wu-soap11", "wu-soap12", "wu-post", "wu-get"]);

    let text = std::fs::read_to_string(&path).expect("readable");
    let unknown = SimConfig::from_toml_str(&format!("surprise = 1\n{text}"));
    assert!(unknown.unwrap_err().to_string().contains("surprise"));
    let bad_rule = format!("{text}\n[[rules]]\naction = \"reset\"\norder_no = \"(\"\n");
    assert!(SimConfig::from_toml_str(&bad_rule).is_err());
}

#[tokio::test]
async fn the_config_loads_keys_in_pkcs1_and_bare_base64_der_too() {
    let dir = std::env::temp_dir().join(unique("sim-keys-"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let private = openssl::pkey::PKey::private_key_from_pem(
        &std::fs::read(key_path("shengpay_platform_private.pem")).expect("key"),
    )
    .expect("PEM");
    let rsa = private.rsa().expect("RSA key");
    std::fs::write(
        dir.join("pkcs1.pem"),
        rsa.private_key_to_pem().expect("PKCS#1 PEM"),
    )
    .expect("write");
    let public = openssl::pkey::PKey::public_key_from_pem(
        &std::fs::read(key_path("shengpay_merchant_public.pem")).expect("key"),
    )
    .expect("PEM");
    use base64::Engine as _;
    let der =
        base64::engine::general_purpose::STANDARD.encode(public.public_key_to_der().expect("DER"));
    std::fs::write(dir.join("public.b64"), der).expect("write");

    let mut config = config();
    config.platform_private_key_file = dir.join("pkcs1.pem");
    for merchant in &mut config.shengpay.merchants {
        merchant.public_key_file = dir.join("public.b64");
    }
    let sim = start(config).await;
    let response = shengpay_refund(
        &client(),
        &sim,
        refund_fields(&unique("O"), &unique("R"), 10, 1),
    )
    .await;
    assert_eq!(text(&response, "resultCode"), "SUCCESS");
    assert!(verifies(&response));
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_binary_serves_the_shipped_config_until_sigterm_and_exports_a_statement() {
    let workspace = testkit::workspace_root();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let exe = env!("CARGO_BIN_EXE_refund-sim");
    let child = Command::new(exe)
        .current_dir(&workspace)
        .args(["--config", "config/sim.toml", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("refund-sim starts");

    let deadline = Instant::now() + Duration::from_secs(30);
    let health = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(_) => break true,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break false,
        }
    };
    assert!(health, "refund-sim did not start listening");

    let out = std::env::temp_dir()
        .join(unique("statement-"))
        .with_extension("csv");
    let statement = Command::new(exe)
        .args(["statement", "--url"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["--date", "2026-11-21", "--provider", "wupay", "--out"])
        .arg(&out)
        .status()
        .expect("statement runs");
    assert!(statement.success());
    assert_eq!(
        std::fs::read_to_string(&out).expect("CSV written"),
        format!("{HEADER}\n")
    );
    let _ = std::fs::remove_file(out);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let output = child.wait_with_output().expect("refund-sim exits");
    assert!(output.status.success(), "{:?}", output.status);
    let logs = String::from_utf8_lossy(&output.stdout);
    let first: Value =
        serde_json::from_str(logs.lines().next().unwrap_or("")).expect("JSON log lines");
    assert!(first.get("timestamp").is_some(), "{first}");
}

#[test]
fn the_binary_help_documents_the_control_api() {
    let output = Command::new(env!("CARGO_BIN_EXE_refund-sim"))
        .arg("--help")
        .output()
        .expect("refund-sim --help runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "--config",
        "--listen",
        "statement",
        "/_sim/statement",
        "drop_response",
    ] {
        assert!(help.contains(expected), "--help lacks {expected}:\n{help}");
    }
}
