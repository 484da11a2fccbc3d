//! The workspace builds sqlx-core with TCP_NODELAY on its PostgreSQL sockets
//! (vendor/sqlx-core, upstream PR #4336): without it every small statement of the worker's
//! waits on the server's delayed ACK. Read back from the kernel on a real connection.

use refund_bench::machine::{pg_port, tcp_nodelay_to_port};
use sqlx::Connection;

#[tokio::test]
async fn postgres_connections_over_tcp_have_nagle_off() {
    let url = testkit::database_url().await.unwrap();
    let port = pg_port(&url).expect("DATABASE_URL is a TCP connection");
    assert_eq!(tcp_nodelay_to_port(port), None, "no connection open yet");
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
    assert_eq!(tcp_nodelay_to_port(port), Some(true));
    conn.close().await.unwrap();
}
