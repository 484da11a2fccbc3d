//! `refund-console`, the real binary, against the real PostgreSQL and RabbitMQ, driven in a
//! real headless browser (Debian's `chromium` and `chromium-driver`, over WebDriver): sign in,
//! search by order number, open a timeline, preview and run a bulk replay, approve a
//! resolution as a second operator, and a viewer refused an action. Plus the proxy sign-in,
//! which a browser cannot fake, over plain HTTP.
//!
//! With `CONSOLE_SCREENSHOTS=DIR` the browser test saves a screenshot of each page it visits
//! into DIR (`docs/console/` holds the ones `docs/console.md` shows).

mod refundctl_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use refundctl_common as rc;
use shared::config::Config;
use shared::state::Cause;
use testkit::KillOnDrop;

/// The operators of these tests: name, role, password.
const OPERATORS: [(&str, &str, &str); 3] = [
    ("alice", "operator", "alice-passphrase"),
    ("bob", "approver", "bob-passphrase"),
    ("vic", "viewer", "vic-passphrase"),
];

/// The operators file, with argon2 hashes of the passwords above.
fn operators_file(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for (name, role, password) in OPERATORS {
        let hash = worker::console::auth::hash_password(password).unwrap();
        text.push_str(&format!(
            "[[operators]]\nname = {name:?}\nrole = {role:?}\npassword_hash = {hash:?}\n\n"
        ));
    }
    // Named by the proxy only: no password.
    text.push_str("[[operators]]\nname = \"sso-olga\"\nrole = \"operator\"\n");
    let path = dir.join("operators.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The real `refund-console` on a free port over the test's database: its address.
async fn spawn_console(config: &Config, dir: &Path, extra: &str) -> (KillOnDrop, String) {
    let addr = testkit::free_addr().unwrap();
    let path = dir.join(format!("console-{}.toml", testkit::free_port().unwrap()));
    let text = format!(
        "{}\n[console]\naddr = {addr:?}\noperators_file = {:?}\nreplay_rate = 50.0\n{extra}\n",
        rc::toml_of(config),
        operators_file(dir)
    );
    std::fs::write(&path, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_refund-console"))
        .env_remove("REFUNDS_CONFIG")
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .expect("refund-console starts");
    let child = KillOnDrop(child);
    testkit::wait_until(
        Duration::from_secs(20),
        "the console answers /healthz",
        || {
            let addr = addr.clone();
            async move {
                Ok(testkit::http_get(&addr, "/healthz")
                    .await
                    .map(|(s, _)| s)
                    .unwrap_or(0)
                    == 200)
            }
        },
    )
    .await
    .unwrap();
    (child, addr)
}

/// `chromedriver` on a free port, and a headless Chromium session through it.
async fn browser() -> (KillOnDrop, Client) {
    let port = testkit::free_port().unwrap();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver runs (Debian: apt-get install chromium chromium-driver; .ci/run installs them)");
    let driver = KillOnDrop(driver);
    let addr = format!("127.0.0.1:{port}");
    // It keeps connections open whatever the request says: ready once it accepts one.
    testkit::wait_until(Duration::from_secs(20), "chromedriver listens", || {
        let addr = addr.clone();
        async move { Ok(tokio::net::TcpStream::connect(&addr).await.is_ok()) }
    })
    .await
    .unwrap();
    let caps = serde_json::json!({
        "goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"],
        }
    });
    let client = ClientBuilder::native()
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&format!("http://{addr}"))
        .await
        .expect("a Chromium session");
    (driver, client)
}

/// Saves a screenshot of the page when `CONSOLE_SCREENSHOTS` names a directory.
async fn shot(b: &Client, name: &str) {
    if let Ok(dir) = std::env::var("CONSOLE_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        let png = b.screenshot().await.unwrap();
        std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

/// The text of the first element matching `css`, once the page has one (a page that is being
/// replaced by a navigation is asked again).
async fn text(b: &Client, css: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = match b.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.ok(),
            Err(_) => None,
        };
        if let Some(t) = got {
            return t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {css} on the page: {}",
            page(b).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn page(b: &Client) -> String {
    match b.find(Locator::Css("body")).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(e) => format!("(no page: {e})"),
    }
}

async fn sign_in(b: &Client, base: &str, name: &str) {
    let password = OPERATORS.iter().find(|o| o.0 == name).unwrap().2;
    b.goto(&format!("{base}/")).await.unwrap();
    let form = b.form(Locator::Css("#sign-in")).await.unwrap();
    form.set_by_name("name", name).await.unwrap();
    form.set_by_name("password", password).await.unwrap();
    form.submit().await.unwrap();
    assert_eq!(text(b, "#operator").await, name, "signed in as {name}");
}

async fn sign_out(b: &Client) {
    b.find(Locator::Css("form[action='/sign-out'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait()
        .for_element(Locator::Css("#sign-in"))
        .await
        .unwrap();
}

/// Waits until the element's text is `want` (pages that refresh themselves).
async fn wait_text(b: &Client, css: &str, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = match b.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{css} stayed {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_search_replay_in_bulk_and_approve_in_a_browser_and_a_viewer_is_refused() {
    let (config, db) = testkit::test_config().await.unwrap();
    let pool = db.pool.clone();
    // Five jobs dead of exhausted retries at an idempotent merchant: one fingerprint.
    for i in 1..=5 {
        rc::exhausted_job(&pool, &format!("B{i}"), "m1", "SYSTEMERROR").await;
    }
    // A job whose outcome is unknown at a merchant that does not deduplicate: replay refuses
    // it; a resolution settles it, once a second operator approves.
    rc::dead_job(
        &pool,
        "U1",
        "w1",
        rc::maybe_delivered(),
        Cause::OutcomeUnknown,
    )
    .await;
    sqlx::query("UPDATE jobs SET last_lease_until = now() - interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();
    rc::succeeded_job(&pool, "S1", "m1").await;
    // A reconciliation run against statements found S1 paid 90, booked 100: a case.
    rc::stored_run(
        &pool,
        "2026-12-04",
        &[(
            "amount_mismatch",
            "shengpay",
            "m1",
            "S1",
            Some(100),
            Some(90),
        )],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_console, addr) = spawn_console(&config, dir.path(), "").await;
    let base = format!("http://{addr}");
    let (_driver, b) = browser().await;

    // Not signed in: the sign-in page, whatever was asked for.
    b.goto(&format!("{base}/dlq")).await.unwrap();
    b.wait()
        .for_element(Locator::Css("#sign-in"))
        .await
        .unwrap();
    shot(&b, "sign-in").await;
    // A wrong password is refused.
    let form = b.form(Locator::Css("#sign-in")).await.unwrap();
    form.set_by_name("name", "alice").await.unwrap();
    form.set_by_name("password", "guess").await.unwrap();
    form.submit().await.unwrap();
    assert!(text(&b, "#sign-in-error").await.contains("wrong password"));

    sign_in(&b, &base, "alice").await;
    assert_eq!(
        text(&b, "#dlq-depth").await,
        "6",
        "five exhausted and one unknown"
    );
    shot(&b, "overview").await;

    // Search by order number: the job's timeline.
    let q = b.find(Locator::Css("header input[name=q]")).await.unwrap();
    q.send_keys("OB3\u{E007}").await.unwrap();
    assert_eq!(text(&b, "#refund-no").await, "B3");
    assert_eq!(text(&b, "#state").await, "dead · retries_exhausted");
    let timeline = text(&b, "#timeline").await;
    assert!(
        timeline.contains("attempt 2: retry_later SYSTEMERROR"),
        "{timeline}"
    );
    assert!(timeline.contains("→ dead"), "{timeline}");
    shot(&b, "timeline").await;

    // A preview of every dead job lists what would be refused, and why.
    b.goto(&format!("{base}/dlq/replay")).await.unwrap();
    assert_eq!(text(&b, "#would-replay").await, "5");
    assert_eq!(text(&b, "#would-refuse").await, "1");
    let refusals = text(&b, "#refusals").await;
    assert!(refusals.contains("U1"), "{refusals}");

    // The dead letters, grouped; the exhausted group's replay is previewed first.
    b.goto(&format!("{base}/dlq")).await.unwrap();
    shot(&b, "dead-letters").await;
    b.find(Locator::XPath(
        "//table[@id='groups']//tr[td/code='retries_exhausted']//a",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    assert_eq!(text(&b, "#would-replay").await, "5");
    assert_eq!(text(&b, "#would-refuse").await, "0");
    assert_eq!(
        rc::state_of(&pool, "B1").await,
        "dead",
        "a preview changes nothing"
    );
    shot(&b, "replay-preview").await;
    let form = b.form(Locator::Css("#replay-form")).await.unwrap();
    form.set_by_name("note", "INC-7 provider back")
        .await
        .unwrap();
    form.set_by_name("rate", "10").await.unwrap();
    form.submit().await.unwrap();
    wait_text(&b, "#run-state", "finished").await;
    assert_eq!(text(&b, "#replayed").await, "5");
    assert_eq!(text(&b, "#refused").await, "0");
    shot(&b, "replay-run").await;
    for i in 1..=5 {
        let no = format!("B{i}");
        assert_eq!(rc::state_of(&pool, &no).await, "received", "{no} replayed");
        let audit = rc::audit_rows(&pool, &no).await;
        assert!(
            audit
                .iter()
                .any(|(operator, action, result, ..)| action == "replay"
                    && result == "replayed"
                    && operator == "alice"),
            "{no}: {audit:?}"
        );
    }

    // A slow bulk replay can be aborted: it stops between two jobs, the rest stay dead.
    for i in 1..=4 {
        rc::exhausted_job(&pool, &format!("C{i}"), "m1", "FREQUENCY_LIMITED").await;
    }
    b.goto(&format!(
        "{base}/dlq/replay?cause=retries_exhausted&provider=shengpay&code=FREQUENCY_LIMITED"
    ))
    .await
    .unwrap();
    assert_eq!(text(&b, "#would-replay").await, "4");
    let form = b.form(Locator::Css("#replay-form")).await.unwrap();
    form.set_by_name("note", "INC-8 try one first")
        .await
        .unwrap();
    form.set_by_name("rate", "0.2").await.unwrap();
    form.submit().await.unwrap();
    b.wait()
        .for_element(Locator::Css("#abort"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&b, "#run-state", "aborted").await;
    let replayed: usize = text(&b, "#replayed").await.parse().unwrap();
    assert!(replayed < 4, "aborted after {replayed}");
    let mut still_dead = 0;
    for i in 1..=4 {
        if rc::state_of(&pool, &format!("C{i}")).await == "dead" {
            still_dead += 1;
        }
    }
    assert_eq!(still_dead, 4 - replayed, "what was not replayed stays dead");

    b.goto(&format!("{base}/replays")).await.unwrap();
    shot(&b, "replays").await;

    // alice files a resolution of the unknown outcome; she cannot approve her own.
    b.goto(&format!("{base}/unknown")).await.unwrap();
    shot(&b, "unknown-outcomes").await;
    let form = b.form(Locator::Css("#unknown form.outcome")).await.unwrap();
    form.set_by_name("outcome", "failed").await.unwrap();
    form.set_by_name("note", "WuPay ticket 88: never received")
        .await
        .unwrap();
    form.submit().await.unwrap();
    wait_text(&b, "h1", "Resolution").await;
    assert!(
        page(&b).await.contains("waits for a second operator"),
        "{}",
        page(&b).await
    );
    b.goto(&format!("{base}/approvals")).await.unwrap();
    assert!(
        b.find(Locator::Css("#pending button.approve"))
            .await
            .is_err(),
        "no approve button on one's own request"
    );
    assert_eq!(
        rc::state_of(&pool, "U1").await,
        "dead",
        "not applied by one person"
    );
    sign_out(&b).await;

    // bob, an approver, approves it: applied.
    sign_in(&b, &base, "bob").await;
    b.goto(&format!("{base}/approvals")).await.unwrap();
    shot(&b, "approvals").await;
    b.find(Locator::Css("#pending button.approve"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&b, "h1", "Approval").await;
    assert!(
        page(&b).await.contains("approved and applied"),
        "{}",
        page(&b).await
    );
    assert_eq!(rc::state_of(&pool, "U1").await, "failed");
    // And explains the reconciliation case.
    b.goto(&format!("{base}/reconciliation")).await.unwrap();
    assert!(
        text(&b, "#by-kind")
            .await
            .contains("amount_mismatch 1 100 fen"),
        "{}",
        page(&b).await
    );
    shot(&b, "reconciliation").await;
    let form = b.form(Locator::Css("#cases form")).await.unwrap();
    form.set_by_name("note", "coupon share, per ShengPay SP-12")
        .await
        .unwrap();
    form.submit().await.unwrap();
    wait_text(&b, "h1", "Case").await;
    assert_eq!(
        rc::case_state(&pool, "S1", "amount_mismatch").await,
        ("explained".to_owned(), Some("bob".to_owned()))
    );
    // The job's page shows its case, and who explained it.
    b.goto(&format!("{base}/jobs/S1")).await.unwrap();
    let case = text(&b, "#job-cases").await;
    assert!(
        case.contains("amount_mismatch") && case.contains("explained by bob"),
        "{case}"
    );
    sign_out(&b).await;

    // vic, a viewer, sees the job but no action; a form forged into the page is refused by
    // the server too, with the viewer's own valid token.
    sign_in(&b, &base, "vic").await;
    rc::exhausted_job(&pool, "B9", "m1", "SYSTEMERROR").await;
    b.goto(&format!("{base}/jobs/B9")).await.unwrap();
    assert!(
        b.find(Locator::Css("#replay")).await.is_err(),
        "no replay button for a viewer"
    );
    b.execute(
        "const f = document.createElement('form'); f.method = 'post'; f.action = '/jobs/B9/replay';
         for (const [k, v] of [['csrf', document.querySelector('input[name=csrf]').value], ['note', 'x']]) {
             const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); }
         document.body.appendChild(f); f.submit();",
        vec![],
    )
    .await
    .unwrap();
    wait_text(&b, "h1", "Not allowed").await;
    assert!(page(&b).await.contains("Your role is viewer"));
    assert_eq!(rc::state_of(&pool, "B9").await, "dead", "nothing changed");

    // And a form without the session's token is refused whoever sends it.
    b.goto(&format!("{base}/jobs/B9")).await.unwrap();
    b.execute(
        "const f = document.createElement('form'); f.method = 'post'; f.action = '/jobs/B9/replay';
         const i = document.createElement('input'); i.name = 'note'; i.value = 'x'; f.appendChild(i);
         document.body.appendChild(f); f.submit();",
        vec![],
    )
    .await
    .unwrap();
    wait_text(&b, "h1", "Form expired").await;
    b.close().await.unwrap();
}

/// A raw HTTP request to the console: the status and the whole answer, headers included.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    testkit::http_request(addr, method, path, headers, body)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_names_the_operator_and_an_untrusted_one_is_not_believed() {
    let (config, db) = testkit::test_config().await.unwrap();
    let pool = db.pool.clone();
    rc::exhausted_job(&pool, "P1", "m1", "SYSTEMERROR").await;
    let dir = tempfile::tempdir().unwrap();
    let header = "X-Auth-Request-User";

    let (_trusted, addr) = spawn_console(
        &config,
        dir.path(),
        &format!("proxy_header = {header:?}\ntrusted_proxies = [\"127.0.0.1\"]"),
    )
    .await;
    let (status, body) = http(&addr, "GET", "/", &[(header, "sso-olga")], "").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(r#"<span id="operator">sso-olga</span>"#),
        "{body}"
    );
    // Somebody the operators file does not name gets nothing.
    let (status, body) = http(&addr, "GET", "/", &[(header, "mallory")], "").await;
    assert_eq!(status, 403);
    assert!(body.contains("who is not in the console"), "{body}");
    // A proxied operator's form still needs the token of the page.
    let (status, _) = http(
        &addr,
        "POST",
        "/jobs/P1/replay",
        &[(header, "sso-olga")],
        "note=x",
    )
    .await;
    assert_eq!(status, 403);
    let csrf = regex::Regex::new(r#"name="csrf" value="([0-9a-f]+)""#).unwrap();
    let (_, job_page) = http(&addr, "GET", "/jobs/P1", &[(header, "sso-olga")], "").await;
    let token = csrf.captures(&job_page).expect("a token on the page")[1].to_owned();
    let (status, body) = http(
        &addr,
        "POST",
        "/jobs/P1/replay",
        &[(header, "sso-olga")],
        &format!("csrf={token}&note=INC-9"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("replayed"), "{body}");
    let audit = rc::audit_rows(&pool, "P1").await;
    assert!(
        audit
            .iter()
            .any(|(o, a, r, ..)| a == "replay" && r == "replayed" && o == "sso-olga"),
        "{audit:?}"
    );

    // The same header from an address that is not a trusted proxy is ignored: sign in.
    let (_untrusted, addr) = spawn_console(
        &config,
        dir.path(),
        &format!("proxy_header = {header:?}\ntrusted_proxies = [\"10.9.9.9\"]"),
    )
    .await;
    let (status, head) = http(&addr, "GET", "/", &[(header, "sso-olga")], "").await;
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("location: /sign-in"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_wrong_passwords_lock_the_name_out_even_with_the_right_one_next() {
    let (config, _db) = testkit::test_config().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_console, addr) = spawn_console(&config, dir.path(), "").await;
    // The sign-in form's cookie and token, as a browser gets them.
    let (_, page) = http(&addr, "GET", "/sign-in", &[], "").await;
    let cookie = regex::Regex::new(r"refund_console_pre=([0-9a-f]+)")
        .unwrap()
        .captures(&page)
        .expect("a pre-session cookie")[1]
        .to_owned();
    let token = regex::Regex::new(r#"name="token" value="([0-9a-f]+)""#)
        .unwrap()
        .captures(&page)
        .expect("a form token")[1]
        .to_owned();
    let cookie = format!("refund_console_pre={cookie}");
    let try_password = |password: &'static str| {
        let (addr, cookie, token) = (addr.clone(), cookie.clone(), token.clone());
        async move {
            http(
                &addr,
                "POST",
                "/sign-in",
                &[("Cookie", &cookie)],
                &format!("token={token}&name=alice&password={password}&next=%2F"),
            )
            .await
        }
    };
    for _ in 0..5 {
        assert_eq!(try_password("guess").await.0, 401);
    }
    let (status, body) = try_password("alice-passphrase").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("Too many failed sign-ins"), "{body}");
    assert!(!body.contains("refund_console="), "no session: {body}");
}
