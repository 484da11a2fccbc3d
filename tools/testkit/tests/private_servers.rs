//! Private PostgreSQL and RabbitMQ instances: data survives a restart and a SIGKILL.
//! These start their own servers (never the shared ones); RabbitMQ takes ~5–10 s per start.

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sqlx::Connection;
use testkit::private::{PrivatePostgres, PrivateRabbit};

async fn count_rows(url: &str) -> anyhow::Result<i64> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM kept")
        .fetch_one(&mut c)
        .await?;
    c.close().await?;
    Ok(n)
}

#[tokio::test]
async fn private_postgres_keeps_data_across_restart_and_kill9() {
    let t = Instant::now();
    let pg = PrivatePostgres::start().await.unwrap();
    eprintln!("private PostgreSQL: start {:?}", t.elapsed());
    assert!(pg.is_running());
    assert_ne!(pg.port(), 5432);
    let url = pg.create_database("chaos").await.unwrap();
    assert_eq!(url, pg.url("chaos"));

    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE kept (id int PRIMARY KEY)")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("INSERT INTO kept SELECT generate_series(1, 100)")
        .execute(&mut c)
        .await
        .unwrap();

    let t = Instant::now();
    pg.restart().await.unwrap();
    eprintln!("private PostgreSQL: restart {:?}", t.elapsed());
    // The old session was ended by the shutdown.
    assert!(
        sqlx::query("SELECT 1").execute(&mut c).await.is_err(),
        "a session survived the restart"
    );
    assert_eq!(count_rows(&url).await.unwrap(), 100);

    // A committed row survives a crash of the postmaster.
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("INSERT INTO kept VALUES (101)")
        .execute(&mut c)
        .await
        .unwrap();
    let pid = pg.pid().unwrap();
    pg.kill9().await.unwrap();
    assert!(!pg.is_running());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z")
        }
    );
    assert!(sqlx::PgConnection::connect(&url).await.is_err());
    let t = Instant::now();
    pg.start_again().await.unwrap();
    eprintln!("private PostgreSQL: start after kill -9 {:?}", t.elapsed());
    assert_eq!(count_rows(&url).await.unwrap(), 101);
    assert!(
        pg.log_tail(200).contains("not properly shut down")
            || pg.log_tail(200).contains("automatic recovery"),
        "no crash recovery in the log:\n{}",
        pg.log_tail(40)
    );

    // Stop is idempotent, and a stopped server refuses connections.
    pg.stop().await.unwrap();
    pg.stop().await.unwrap();
    assert!(sqlx::PgConnection::connect(&url).await.is_err());
    pg.start_again().await.unwrap();
    assert_eq!(count_rows(&url).await.unwrap(), 101);

    let dir = pg.data_dir().parent().unwrap().to_path_buf();
    drop(pg);
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[tokio::test]
async fn private_postgres_instances_run_side_by_side_and_migrate() {
    let (a, b) = tokio::join!(PrivatePostgres::start(), PrivatePostgres::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
    let url = a.create_migrated_database("refunds").await.unwrap();
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert!(tables > 3, "only {tables} tables after migrating");
    // Killing one leaves the other alone.
    b.kill9().await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let err = PrivatePostgres::start_again(&b).await;
    assert!(err.is_ok(), "{err:?}");
    assert!(
        b.create_database("bad name")
            .await
            .unwrap_err()
            .to_string()
            .contains("letters, digits")
    );
}

async fn publish_persistent(url: &str, queue: &str, body: &[u8]) -> anyhow::Result<()> {
    let conn = shared::broker::connect(url, "private-rabbit-test").await?;
    let ch = shared::broker::confirm_channel(&conn).await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            shared::broker::json_properties(Some("m-1")),
        )
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "the broker did not ack the publish");
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// Messages in a queue (passive declare: fails if the queue is gone).
async fn depth(url: &str, queue: &str) -> anyhow::Result<u32> {
    let conn = shared::broker::connect(url, "private-rabbit-test").await?;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    conn.close(200, "done".into()).await?;
    Ok(q.message_count())
}

#[tokio::test]
async fn private_rabbit_keeps_persistent_messages_across_restart_and_kill9() {
    let t = Instant::now();
    let r = PrivateRabbit::start().await.unwrap();
    eprintln!("private RabbitMQ: start {:?}", t.elapsed());
    assert_ne!(r.port(), 5672);
    assert!(r.node_name().starts_with("rabbit-test-"));
    let url = r.url();
    publish_persistent(&url, "kept", br#"{"n":1}"#)
        .await
        .unwrap();
    assert_eq!(depth(&url, "kept").await.unwrap(), 1);

    // rabbitmqctl reaches this node (its cookie and name), not the shared one.
    let queues = r.ctl(&["list_queues", "name", "messages"]).await.unwrap();
    assert!(queues.contains("kept"), "{queues}");
    // A failure names the command and its exit status.
    let err = format!("{:#}", r.ctl(&["no_such_command"]).await.unwrap_err());
    assert!(
        err.contains("rabbitmqctl -n rabbit-test-") && err.contains("no_such_command"),
        "{err}"
    );
    assert!(err.contains("exit status"), "{err}");

    let t = Instant::now();
    r.restart().await.unwrap();
    eprintln!("private RabbitMQ: restart {:?}", t.elapsed());
    assert_eq!(depth(&url, "kept").await.unwrap(), 1);

    publish_persistent(&url, "kept", br#"{"n":2}"#)
        .await
        .unwrap();
    let beam = r.pid().unwrap();
    let t = Instant::now();
    r.kill9().await.unwrap();
    assert!(!r.is_running());
    assert!(
        tokio::time::timeout(
            Duration::from_secs(2),
            shared::broker::connect(&url, "must-fail")
        )
        .await
        .map(|c| c.is_err())
        .unwrap_or(true),
        "connected to a killed node"
    );
    r.start_again().await.unwrap();
    eprintln!("private RabbitMQ: kill -9 + start again {:?}", t.elapsed());
    assert_ne!(r.pid().unwrap(), beam);
    assert_eq!(depth(&url, "kept").await.unwrap(), 2);

    let conn = shared::broker::connect(&url, "private-rabbit-test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let first = ch
        .basic_get("kept".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(first.delivery.data, br#"{"n":1}"#);
    conn.close(200, "done".into()).await.unwrap();

    let dir = r
        .log_path()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let node = r.node_name().to_owned();
    drop(r);
    assert!(!dir.exists(), "{} was not removed", dir.display());
    // The node's epmd registration went with it.
    let names = std::process::Command::new("epmd")
        .arg("-names")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let short = node.split('@').next().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut still = names.contains(&format!("name {short} "));
    while still && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let names = std::process::Command::new("epmd")
            .arg("-names")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        still = names.contains(&format!("name {short} "));
    }
    assert!(!still, "{short} is still registered with epmd");
}

#[tokio::test]
async fn private_rabbit_nodes_are_independent_of_each_other_and_the_shared_one() {
    // Runs beside the test above: two private nodes and the shared one at once.
    let r = PrivateRabbit::start().await.unwrap();
    let me = r.ctl(&["eval", "node()."]).await.unwrap();
    assert_eq!(me.trim().trim_matches('\''), r.node_name());
    publish_persistent(&r.url(), "only-here", b"{}")
        .await
        .unwrap();
    assert_eq!(depth(&r.url(), "only-here").await.unwrap(), 1);
    let pid = r.pid().unwrap();
    drop(r);
    // The kill is asynchronous: give the kernel a moment to deliver it and reap the VM.
    let gone = || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !gone() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone(), "the VM {pid} outlived its PrivateRabbit");
}

/// Chaos tasks restart servers from `tokio::spawn`: the operations must be `Send`.
#[allow(dead_code)]
fn operations_are_send(pg: &'static PrivatePostgres, r: &'static PrivateRabbit) {
    fn send<T: Send>(_: T) {}
    send(pg.restart());
    send(pg.kill9());
    send(pg.start_again());
    send(pg.create_migrated_database("x"));
    send(r.restart());
    send(r.kill9());
    send(r.start_again());
    send(r.ctl(&[]));
}
