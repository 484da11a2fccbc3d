//! Postgres: the source of truth for every job, attempt, ledger entry and event.
//!
//! This module owns every query the system runs. Queries are short functions with a one-line
//! doc, grouped by the part of the system that needs them: [`intake`] (turning messages into
//! jobs, duplicates, conflicts and rejections), [`jobs`] (claims with leases and fencing, and
//! recording outcomes with ledger and outbox in one transaction), [`sweep`] (expired leases,
//! due retries, orphans, stuck jobs), [`outbox`] (the relay's reads and deletes), [`ops`]
//! (what operators read and do), [`approvals`] (four-eyes requests for resolutions and
//! corrections) and [`cases`] (reconciliation cases). Every state change goes through [`jobs::transition`], which
//! checks it against [`crate::state::TRANSITIONS`] and appends the history row in the same
//! transaction.

pub mod activity;
pub mod approvals;
pub mod budgets;
pub mod cases;
pub mod intake;
pub mod jobs;
pub mod operator;
pub mod ops;
pub mod outbox;
pub mod queries;
pub mod runs;
pub mod sweep;
pub mod text;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};

use crate::config::Config;

/// A duration as the whole milliseconds a query binds (saturating).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The schema migrations, embedded in every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("transition {from} -> {to} by {trigger:?} is not allowed")]
    IllegalTransition {
        from: crate::state::State,
        to: crate::state::State,
        trigger: crate::state::Trigger,
    },
}

impl StoreError {
    /// Whether the failure is the connection's rather than the query's: worth retrying.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Db(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                        | sqlx::Error::Protocol(_)
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    // 40001 serialization failure, 40P01 deadlock, 57P01 admin shutdown,
                    // 08xxx connection exceptions.
                    .is_some_and(|c| {
                        c == "40001" || c == "40P01" || c == "57P01" || c.starts_with("08")
                    })
            }
            _ => false,
        }
    }
}

/// How to connect to `database_url`, for a pool or a connection of its own: its `sslmode`, and
/// the CA of `database.ssl_root_cert` when set.
pub fn connect_options(config: &Config) -> Result<PgConnectOptions, StoreError> {
    let options = config
        .database_url
        .parse::<PgConnectOptions>()?
        .application_name("refunds");
    Ok(match &config.database.ssl_root_cert {
        Some(ca) => options.ssl_root_cert(ca),
        None => options,
    })
}

/// The pool's settings: the configured limits.
fn pool_options(config: &Config) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .acquire_timeout(Duration::from_millis(config.database.acquire_timeout_ms))
}

/// Opens a pool on `database_url` with the configured limits.
pub async fn connect(config: &Config) -> Result<PgPool, StoreError> {
    let options = connect_options(config)?;
    match pool_options(config).connect_with(options.clone()).await {
        // The pool retries until its acquire timeout and then names only the timeout; one
        // direct attempt says why (connection refused, no such host, a TLS or password
        // failure).
        Err(sqlx::Error::PoolTimedOut) => match options.connect().await {
            Err(cause) => Err(cause.into()),
            Ok(conn) => {
                let _ = conn.close().await;
                Err(sqlx::Error::PoolTimedOut.into())
            }
        },
        pool => Ok(pool?),
    }
}

/// A pool like [`connect`]'s that connects on first use, for a process that needs it only
/// when something goes wrong.
pub fn connect_lazy(config: &Config) -> Result<PgPool, StoreError> {
    Ok(pool_options(config).connect_lazy_with(connect_options(config)?))
}

/// Applies pending migrations. When every one is already applied, unchanged, one read says so
/// and nothing is locked: every process start (worker, each `refundctl` and reconciler run)
/// migrates, and the migrator's lock and checks cost several round trips.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    migrate_on(&mut *pool.acquire().await?).await
}

/// [`migrate`] on a connection of the caller's.
pub async fn migrate_on(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    if !up_to_date(conn).await {
        MIGRATOR.run_direct(None, conn, false).await?;
    }
    Ok(())
}

/// Whether the database has exactly this build's migrations, each applied successfully with
/// the same checksum. Anything else (no table yet, a pending or changed migration, no right to
/// read the table) is left to the migrator, to apply or to report.
async fn up_to_date(conn: &mut sqlx::PgConnection) -> bool {
    let Ok(applied) = sqlx::query_as::<_, (i64, Vec<u8>, bool)>(
        "SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(conn)
    .await
    else {
        return false;
    };
    let wanted: Vec<_> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    applied.len() == wanted.len()
        && applied
            .iter()
            .zip(&wanted)
            .all(|((version, checksum, ok), m)| {
                *ok && *version == m.version && checksum.as_slice() == &*m.checksum
            })
}
