//! Transport and key rules at start (issue 18): PostgreSQL over TLS with `sslmode=verify-full`
//! and the CA of `database.ssl_root_cert`; provider URLs over https only unless
//! `[http] allow_plain_http`; RSA keys of at least 2,048 bits. The binaries refuse a bad setting
//! with exit status 2 and a message naming the key or file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use shared::config::Config;
use sqlx::Row as _;
use testkit::private::PrivatePostgres;
use testkit::tls::TestCa;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A config for `database_url` with `ssl_root_cert`, validated as a binary would.
fn tls_config(database_url: String, ca: &Path) -> anyhow::Result<Config> {
    let mut c = Config {
        database_url,
        ..Config::default()
    };
    c.database.ssl_root_cert = Some(ca.to_owned());
    c.database.max_connections = 1;
    c.database.acquire_timeout_ms = 5_000;
    c.validate()?;
    Ok(c)
}

async fn connect_error(config: &Config) -> String {
    match shared::store::connect(config).await {
        Ok(_) => panic!(
            "connected to {} although it must be refused",
            config.database_url
        ),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_with_the_right_ca_and_refuses_a_wrong_ca_or_host_name()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("refunds test database CA")?;
    let other_ca = TestCa::new("someone else's CA")?;
    let ca_file = write(dir.path(), "ca.crt", &ca.cert_pem()?);
    let other_ca_file = write(dir.path(), "other-ca.crt", &other_ca.cert_pem()?);
    // The certificate names `localhost` only.
    let pg = PrivatePostgres::start_tls(ca.issue(&["localhost"])?).await?;
    let port = pg.port();
    let url =
        |host: &str| format!("postgres://postgres@{host}:{port}/postgres?sslmode=verify-full");

    // The right CA and the name in the certificate: connected, and the server says the
    // session is encrypted.
    let pool = shared::store::connect(&tls_config(url("localhost"), &ca_file)?).await?;
    let row = sqlx::query("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await?;
    assert!(
        row.get::<bool, _>("ssl"),
        "the server sees a plain connection"
    );
    let version: String = row.get("version");
    assert!(
        version == "TLSv1.2" || version == "TLSv1.3",
        "negotiated {version}"
    );
    pool.close().await;

    // A CA that did not sign the server's certificate.
    let e = connect_error(&tls_config(url("localhost"), &other_ca_file)?).await;
    assert!(
        e.contains("certificate verify failed") && e.contains("unable to get local issuer"),
        "{e}"
    );

    // The right CA, but the address connected to is not in the certificate.
    let e = connect_error(&tls_config(url("127.0.0.1"), &ca_file)?).await;
    assert!(
        e.contains("certificate verify failed") && e.contains("IP address mismatch"),
        "{e}"
    );

    // The right CA, but a server whose certificate is for another host name.
    let elsewhere = PrivatePostgres::start_tls(ca.issue(&["db.elsewhere.test"])?).await?;
    let e = connect_error(&tls_config(
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full",
            elsewhere.port()
        ),
        &ca_file,
    )?)
    .await;
    assert!(
        e.contains("certificate verify failed") && e.contains("hostname mismatch"),
        "{e}"
    );

    // sslmode=require without a CA: encrypted, the certificate not checked (no CA is loaded,
    // so this is also the cheap path for a local server).
    let mut require = Config {
        database_url: format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=require"),
        ..Config::default()
    };
    require.database.max_connections = 1;
    let pool = shared::store::connect(&require).await?;
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await?;
    assert!(ssl, "sslmode=require connected in plain text");
    pool.close().await;

    // Without TLS asked for, the same server takes a plain connection: the encryption above
    // is the client's doing (sslmode), not the server's default.
    let mut plain = Config {
        database_url: format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"),
        ..Config::default()
    };
    plain.database.max_connections = 1;
    let pool = shared::store::connect(&plain).await?;
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await?;
    assert!(!ssl);
    pool.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_file_is_read_at_each_connection_and_a_bundle_of_two_cas_is_trusted()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let old = TestCa::new("refunds database CA, old")?;
    let new = TestCa::new("refunds database CA, new")?;
    let ca_file = write(dir.path(), "ca.crt", &old.cert_pem()?);
    let pg = PrivatePostgres::start_tls(old.issue(&["localhost"])?).await?;
    let config = tls_config(
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full",
            pg.port()
        ),
        &ca_file,
    )?;
    shared::store::connect(&config).await?.close().await;

    // The file now holds only a CA that did not sign the server's certificate: the next
    // connection reads it and is refused (no connector built from the old contents is reused).
    std::fs::write(&ca_file, new.cert_pem()?)?;
    let e = connect_error(&config).await;
    assert!(e.contains("certificate verify failed"), "{e}");

    // A rotation's first step, the new CA and the old one in one file: trusted whichever comes
    // first in it.
    std::fs::write(&ca_file, format!("{}{}", new.cert_pem()?, old.cert_pem()?))?;
    shared::store::connect(&config).await?.close().await;
    Ok(())
}

#[test]
fn a_ca_file_without_certificate_checking_in_the_url_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ca").unwrap();
    let ca_file = write(dir.path(), "ca.crt", &ca.cert_pem().unwrap());
    for mode in ["prefer", "require", "disable"] {
        let e = tls_config(
            format!("postgres://u@db.example/refunds?sslmode={mode}"),
            &ca_file,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("database.ssl_root_cert") && e.contains(mode),
            "{e}"
        );
    }
    let not_pem = write(dir.path(), "not.crt", "hello");
    let e = tls_config(
        "postgres://u@db.example/refunds?sslmode=verify-full".into(),
        &not_pem,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("database.ssl_root_cert") && e.contains("no PEM certificate"),
        "{e}"
    );
    let e = tls_config(
        "postgres://u@db.example/refunds?sslmode=verify-full".into(),
        &dir.path().join("missing.crt"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("database.ssl_root_cert") && e.contains("missing.crt"),
        "{e}"
    );
}

fn run(binary: &str, config: &Path, args: &[&str]) -> Output {
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("REFUNDS_CONFIG")
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn wupay(name: &str, base_url: &str, rfkey: &Path) -> String {
    format!(
        "[[wupay.merchants]]\nmerchant = {name:?}\nbase_url = {base_url:?}\ncpn_id = \"C\"\n\
         area = \"A\"\nrfkey_file = {:?}\n",
        rfkey.display().to_string()
    )
}

#[test]
fn the_binaries_exit_2_naming_the_key_of_a_plain_http_provider_url() {
    let dir = tempfile::tempdir().unwrap();
    let rfkey = write(dir.path(), "rfkey", "secret");
    let merchants = [
        wupay("w0", "https://wupay.example/WuPay.asmx", &rfkey),
        wupay("w1", "https://wupay.example/WuPay.asmx", &rfkey),
        wupay("w2", "http://wupay.example/WuPay.asmx", &rfkey),
    ]
    .concat();
    // An unreachable database: the binaries must stop at the configuration, before it.
    let head = "database_url = \"postgres://postgres@127.0.0.1:1/none\"\n";
    let refused = write(dir.path(), "refused.toml", &format!("{head}{merchants}"));
    for (binary, args) in [
        (env!("CARGO_BIN_EXE_refund-worker"), &[][..]),
        (env!("CARGO_BIN_EXE_refundctl"), &["stats"][..]),
    ] {
        let o = run(binary, &refused, args);
        assert_eq!(o.status.code(), Some(2), "{binary}: {}", show(&o));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("wupay.merchants[2].base_url") && stderr.contains("allow_plain_http"),
            "{binary}: {}",
            show(&o)
        );
    }

    // With the flag the configuration passes, and the worker goes on to the database (which
    // is not there: still exit 2, but for that reason).
    let allowed = write(
        dir.path(),
        "allowed.toml",
        &format!("{head}[http]\nallow_plain_http = true\n\n{merchants}"),
    );
    let o = run(env!("CARGO_BIN_EXE_refund-worker"), &allowed, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("base_url"), "{}", show(&o));
    assert!(stderr.contains("PostgreSQL"), "{}", show(&o));
}

#[test]
fn the_worker_exits_2_naming_a_key_file_under_2048_bits() {
    let dir = tempfile::tempdir().unwrap();
    let small = openssl::rsa::Rsa::generate(1024).unwrap();
    let private = dir.path().join("merchant-1024.pem");
    std::fs::write(&private, small.private_key_to_pem().unwrap()).unwrap();
    let platform = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../keys/dev/shengpay_platform_public.pem")
        .canonicalize()
        .unwrap();
    let config = write(
        dir.path(),
        "small-key.toml",
        &format!(
            "database_url = \"postgres://postgres@127.0.0.1:1/none\"\n\n\
             [[shengpay.merchants]]\nmerchant = \"m\"\nbase_url = \"https://shengpay.example\"\n\
             app_id = \"a\"\nmch_id = \"m\"\nprivate_key_file = {:?}\n\
             platform_public_key_file = {:?}\nnotify_url = \"https://n.example/notify\"\n",
            private.display().to_string(),
            platform.display().to_string()
        ),
    );
    let o = run(env!("CARGO_BIN_EXE_refund-worker"), &config, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&private.display().to_string())
            && stderr.contains("1024 bits is below the 2048-bit minimum"),
        "{}",
        show(&o)
    );
}
