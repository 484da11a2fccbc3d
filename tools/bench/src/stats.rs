//! Small statistics: percentiles of latencies, medians of repeated runs, and the PostgreSQL
//! counters (transactions per database, WAL for the cluster) read before and after a run.

use sqlx::{PgConnection, Row};

/// The `p`-th percentile (0..=100, nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of some values (NaN for none; NaNs are ignored).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Cumulative counters of one database (`pg_stat_database`) and of the cluster's WAL
/// (`pg_stat_wal`).
#[derive(Debug, Clone, Copy, Default)]
pub struct PgCounters {
    pub xact_commit: i64,
    pub xact_rollback: i64,
    pub wal_records: i64,
    pub wal_bytes: f64,
    pub wal_sync: i64,
    pub wal_write: i64,
}

/// Reads the counters for `db` (ask from a connection to another database, so the reading
/// itself does not count).
pub async fn pg_counters(admin: &mut PgConnection, db: &str) -> anyhow::Result<PgCounters> {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *admin)
        .await?;
    let row =
        sqlx::query("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1")
            .bind(db)
            .fetch_optional(&mut *admin)
            .await?;
    let (xact_commit, xact_rollback) = match row {
        Some(r) => (r.try_get("xact_commit")?, r.try_get("xact_rollback")?),
        None => (0, 0),
    };
    let wal = sqlx::query(
        "SELECT wal_records, wal_bytes::float8 AS wal_bytes, wal_sync, wal_write FROM pg_stat_wal",
    )
    .fetch_optional(&mut *admin)
    .await
    .ok()
    .flatten();
    let mut c = PgCounters {
        xact_commit,
        xact_rollback,
        ..PgCounters::default()
    };
    if let Some(w) = wal {
        c.wal_records = w.try_get("wal_records").unwrap_or(0);
        c.wal_bytes = w.try_get("wal_bytes").unwrap_or(0.0);
        c.wal_sync = w.try_get("wal_sync").unwrap_or(0);
        c.wal_write = w.try_get("wal_write").unwrap_or(0);
    }
    Ok(c)
}

impl PgCounters {
    /// `self - earlier`.
    pub fn since(&self, earlier: &PgCounters) -> PgCounters {
        PgCounters {
            xact_commit: self.xact_commit - earlier.xact_commit,
            xact_rollback: self.xact_rollback - earlier.xact_rollback,
            wal_records: self.wal_records - earlier.wal_records,
            wal_bytes: self.wal_bytes - earlier.wal_bytes,
            wal_sync: self.wal_sync - earlier.wal_sync,
            wal_write: self.wal_write - earlier.wal_write,
        }
    }
}

/// Cumulative access counters of one table (`pg_stat_user_tables`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TableCounters {
    pub seq_scan: i64,
    pub seq_tup_read: i64,
    pub idx_scan: i64,
    pub idx_tup_fetch: i64,
    pub n_tup_ins: i64,
    pub n_tup_upd: i64,
    pub n_tup_hot_upd: i64,
    pub n_tup_del: i64,
}

impl TableCounters {
    /// `self - earlier`.
    pub fn since(&self, e: &TableCounters) -> TableCounters {
        TableCounters {
            seq_scan: self.seq_scan - e.seq_scan,
            seq_tup_read: self.seq_tup_read - e.seq_tup_read,
            idx_scan: self.idx_scan - e.idx_scan,
            idx_tup_fetch: self.idx_tup_fetch - e.idx_tup_fetch,
            n_tup_ins: self.n_tup_ins - e.n_tup_ins,
            n_tup_upd: self.n_tup_upd - e.n_tup_upd,
            n_tup_hot_upd: self.n_tup_hot_upd - e.n_tup_hot_upd,
            n_tup_del: self.n_tup_del - e.n_tup_del,
        }
    }
}

/// The access counters of the tables a refund writes, read on a connection to the scenario
/// database (one query).
pub async fn table_counters(
    conn: &mut PgConnection,
) -> anyhow::Result<std::collections::BTreeMap<String, TableCounters>> {
    let rows = sqlx::query(
        "SELECT relname::text AS name, COALESCE(seq_scan, 0) AS seq_scan,
                COALESCE(seq_tup_read, 0) AS seq_tup_read, COALESCE(idx_scan, 0) AS idx_scan,
                COALESCE(idx_tup_fetch, 0) AS idx_tup_fetch, n_tup_ins, n_tup_upd,
                n_tup_hot_upd, n_tup_del
         FROM pg_stat_user_tables
         WHERE relname IN ('jobs', 'job_transitions', 'provider_attempts', 'ledger', 'outbox',
                           'orders')",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("name")?,
                TableCounters {
                    seq_scan: r.try_get("seq_scan")?,
                    seq_tup_read: r.try_get("seq_tup_read")?,
                    idx_scan: r.try_get("idx_scan")?,
                    idx_tup_fetch: r.try_get("idx_tup_fetch")?,
                    n_tup_ins: r.try_get("n_tup_ins")?,
                    n_tup_upd: r.try_get("n_tup_upd")?,
                    n_tup_hot_upd: r.try_get("n_tup_hot_upd")?,
                    n_tup_del: r.try_get("n_tup_del")?,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn medians_ignore_missing_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, f64::NAN, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
