//! `store::migrate`, which every process runs at start: a database already up to date is left
//! alone, a changed migration is still reported, and an empty database gets every migration.

use shared::store::{self, MIGRATOR};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Row};

/// (version, installed_on) of every applied migration.
async fn applied(pool: &PgPool) -> anyhow::Result<Vec<(i64, String)>> {
    let rows = sqlx::query(
        "SELECT version, installed_on::text AS at FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("version")?, r.try_get("at")?)))
        .collect()
}

#[tokio::test]
async fn migrating_an_up_to_date_database_changes_nothing() -> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    let before = applied(&db.pool).await?;
    assert_eq!(before.len(), MIGRATOR.iter().count());
    store::migrate(&db.pool).await?;
    store::migrate(&db.pool).await?;
    assert_eq!(applied(&db.pool).await?, before);
    Ok(())
}

#[tokio::test]
async fn a_migration_changed_after_it_was_applied_is_still_reported() -> anyhow::Result<()> {
    let db = testkit::test_db().await?;
    let last = MIGRATOR.iter().map(|m| m.version).max().unwrap_or_default();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = $1")
        .bind(last)
        .execute(&db.pool)
        .await?;
    let e = store::migrate(&db.pool)
        .await
        .expect_err("a changed migration must not pass");
    assert!(e.to_string().contains(&last.to_string()), "{e}");
    Ok(())
}

#[tokio::test]
async fn an_empty_database_gets_every_migration() -> anyhow::Result<()> {
    let admin_url = testkit::database_url().await?;
    let mut admin = PgConnection::connect(&admin_url).await?;
    let name = format!("refunds_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let pool = PgPool::connect(&testkit::with_db(&admin_url, &name)).await?;
    store::migrate(&pool).await?;
    let versions: Vec<i64> = applied(&pool).await?.into_iter().map(|(v, _)| v).collect();
    let wanted: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    pool.close().await;
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    assert_eq!(versions, wanted);
    Ok(())
}
