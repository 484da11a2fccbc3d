//! One run, phase by phase, on the run's own connection and the helper: the lock and snapshot,
//! both sides' totals by bucket, the drill-down of the buckets that differ, the midnight rules,
//! and storing the run with its totals and discrepancies.

use std::time::Instant;

use chrono::{DateTime, Utc};
use shared::config::Config;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

use crate::day::Day;
use crate::progress::Progress;

use super::*;

pub(super) async fn run_inner(
    conns: Connections,
    config: &Config,
    req: &RunRequest,
    progress: &Progress,
    started_at: DateTime<Utc>,
) -> Result<(RunOutcome, PgConnection), RunError> {
    let clock = Instant::now();
    let tz = config.tz().map_err(|e| RunError::Invalid(e.to_string()))?;
    let day = Day::new(req.date, tz, config.reconciler.grace_minutes).map_err(RunError::Invalid)?;
    if let Some(p) = &req.provider
        && !crate::PROVIDERS.contains(&p.as_str())
    {
        return Err(RunError::Invalid(format!(
            "--provider {p:?}: expected shengpay or wupay"
        )));
    }
    let source = if req.against_statements() {
        Source::Statement
    } else {
        Source::Attempts
    };
    let inputs = req.inputs();
    // Connections of its own: the run's temporary tables and session lock must not outlive
    // it in a pool.
    let Connections {
        main: mut conn,
        helper,
    } = conns;

    let mut timings = Timings::default();
    let step = Instant::now();
    let statements = match source {
        Source::Statement => {
            // Before the session's first temporary table.
            sqlx::query("SET temp_buffers = '128MB'")
                .execute(&mut conn)
                .await?;
            let total = inputs
                .iter()
                .map(|i| std::fs::metadata(&i.path).map(|m| m.len()).unwrap_or(0))
                .sum();
            let bar = progress.bytes(total, "loading statements");
            let summary =
                crate::statement::load(&mut conn, &inputs, &day, req.provider.as_deref(), &bar)
                    .await?;
            bar.finish_and_clear();
            for f in &summary.files {
                tracing::info!(
                    file = %f.path, rows = f.rows, on_date = f.on_date,
                    near_cutoff = f.near_cutoff, ignored = f.ignored, "statement loaded"
                );
            }
            Some(summary)
        }
        Source::Attempts => None,
    };
    timings.load_ms = ms_since(step);
    let step = Instant::now();

    let spinner = progress.spinner(format!("waiting for other runs of {}", req.date));
    // A session lock, taken before the transaction begins, so that the transaction's snapshot
    // (repeatable read, shared with the helper) is taken after the previous run of the date
    // committed and this run supersedes it. Dropping the connection on an error releases it.
    let (class, key) = lock_key(req.date);
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(class)
        .bind(key)
        .fetch_one(&mut conn)
        .await?;
    if !free {
        tracing::warn!(date = %req.date, "another run of this date is in progress; waiting for it");
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(class)
            .bind(key)
            .execute(&mut conn)
            .await?;
    }
    // The repair loop first, in a transaction of its own, so that the run's snapshot sees
    // what the statement settled (unknown WuPay outcomes booked or shown unpaid).
    let repairs = match (&statements, req.provider.as_deref()) {
        (Some(_), None | Some("wupay")) => {
            let files = req.statement_names();
            crate::repair::from_statement(&mut conn, req.date, tz, &files).await?
        }
        _ => crate::repair::Repairs::default(),
    };
    let day_sql = if tz.name() == INDEXED_TZ {
        DaySql::Indexed
    } else {
        DaySql::Range
    };
    // The attempts of every provider by their index: the provider side streams in bucket
    // order, and the drill-down can be narrowed to refunds by index.
    let streaming =
        source == Source::Attempts && day_sql == DaySql::Indexed && req.provider.is_none();
    // Index-only scans in index order, so that grouping streams instead of hashing or sorting
    // a million rows; the plans are fixed rather than left to estimates for expressions.
    let plan_settings = [
        "SET LOCAL enable_seqscan = off",
        "SET LOCAL enable_bitmapscan = off",
        "SET LOCAL enable_sort = off",
        "SET LOCAL enable_hashagg = off",
        "SET LOCAL max_parallel_workers_per_gather = 0",
    ]
    .join("; ");
    // One round trip: the transaction, its settings, and the plan settings of the provider
    // side when it streams (the others set them when they join the ledger side).
    let mut tx = conn
        .begin_with(AssertSqlSafe(format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL jit = off; \
             SET LOCAL work_mem = '64MB'; SET LOCAL application_name = 'refund-reconciler'; {}",
            if streaming {
                plan_settings.as_str()
            } else {
                ""
            }
        )))
        .await?;
    let head = sqlx::query(
        "SELECT pg_export_snapshot() AS snapshot, coalesce($1::timestamptz, now()) AS as_of",
    )
    .bind(req.as_of)
    .fetch_one(&mut *tx)
    .await?;
    let (snapshot, as_of): (String, DateTime<Utc>) =
        (head.try_get("snapshot")?, head.try_get("as_of")?);
    timings.lock_ms = ms_since(step);
    let files = req.statement_names();
    let params = Params {
        date: req.date,
        start: day.start,
        end: day.end,
        provider: req.provider.as_deref(),
        exhaustive: req.exhaustive,
        files,
    };

    spinner.set_message(format!("matching totals of {}", req.date));
    let step = Instant::now();
    // The ledger's (provider, merchant) pairs, found by whichever connection gets there first
    // (the second one, at once), are shared out as they come between the two, so that both
    // stay busy to the end.
    let pairs = tokio::sync::OnceCell::<Pairs>::new();
    let ledger_side = async {
        // The ledger side is read on the second connection, concurrently with the provider
        // side.
        let mut helper = helper;
        // The id is made by the server of hex digits and dashes; checked all the same.
        if !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(RunError::Invalid(format!(
                "unexpected snapshot id {snapshot:?}"
            )));
        }
        // One round trip: the transaction, its snapshot and its plan settings.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET TRANSACTION SNAPSHOT '{snapshot}'; SET LOCAL jit = off; {plan_settings}"
        )))
        .execute(&mut helper)
        .await?;
        let pairs = pairs
            .get_or_try_init(|| Pairs::of_day(&mut helper, req))
            .await?;
        let mut pass = LedgerPass::default();
        let reversals = sqlx::query(REVERSALS)
            .bind(req.date)
            .bind(req.provider.as_deref())
            .fetch_all(&mut helper)
            .await?;
        for row in &reversals {
            pass.add_reversals(row)?;
        }
        while let Some((p, m)) = pairs.take() {
            let rows = sqlx::query(source.ledger_pass())
                .bind(req.date)
                .bind(p)
                .bind(m)
                .fetch_all(&mut helper)
                .await?;
            for row in &rows {
                pass.add_pair(row)?;
            }
        }
        sqlx::raw_sql("COMMIT").execute(&mut helper).await?;
        let _ = helper.close().await;
        Ok::<_, RunError>(pass)
    };
    let provider_side = async {
        // As arrays, one row: 1,024 rows cost more to send and decode than to compute.
        let row = bind(
            format!(
                "SELECT coalesce(array_agg(bucket), '{{}}') AS buckets,
                        coalesce(array_agg(n), '{{}}') AS n, coalesce(array_agg(fp), '{{}}') AS fp
                 FROM ({}) p",
                source.pass_sql(day_sql, req.provider.is_some())
            ),
            &params,
        )
        .fetch_one(&mut *tx)
        .await?;
        let buckets: Vec<i32> = row.try_get("buckets")?;
        let ns: Vec<i64> = row.try_get("n")?;
        let fps: Vec<i64> = row.try_get("fp")?;
        let mut side = vec![(0i64, 0i64); BUCKETS as usize];
        for ((b, n), fp) in buckets.into_iter().zip(ns).zip(fps) {
            let slot = usize::try_from(b)
                .ok()
                .and_then(|b| side.get_mut(b))
                .ok_or_else(|| RunError::Invalid(format!("bucket {b} out of range")))?;
            *slot = (n, fp);
        }
        // Then the ledger pairs the second connection has not taken yet.
        let mut pass = LedgerPass::default();
        let pairs = pairs
            .get_or_try_init(|| Pairs::of_day(&mut tx, req))
            .await?;
        if let Some(first) = pairs.take() {
            if !streaming {
                sqlx::raw_sql(AssertSqlSafe(plan_settings.clone()))
                    .execute(&mut *tx)
                    .await?;
            }
            let mut next = Some(first);
            while let Some((p, m)) = next {
                let rows = sqlx::query(source.ledger_pass())
                    .bind(req.date)
                    .bind(p)
                    .bind(m)
                    .fetch_all(&mut *tx)
                    .await?;
                for row in &rows {
                    pass.add_pair(row)?;
                }
                next = pairs.take();
            }
        }
        sqlx::raw_sql(
            "SET LOCAL enable_seqscan = on; SET LOCAL enable_bitmapscan = on; \
             SET LOCAL enable_sort = on; SET LOCAL enable_hashagg = on; \
             RESET max_parallel_workers_per_gather",
        )
        .execute(&mut *tx)
        .await?;
        Ok::<_, RunError>((side, pass))
    };
    let (mut ledger, (provider_side, main_part)) = futures::try_join!(ledger_side, provider_side)?;
    ledger.merge(main_part)?;
    ledger
        .pairs
        .sort_by(|a, b| (&a.provider, &a.merchant).cmp(&(&b.provider, &b.merchant)));
    timings.totals_ms = ms_since(step);
    let step = Instant::now();
    // In the transaction, so never seen before it commits: written when it is needed.
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO reconciliation_runs (business_date, provider, source, statement_files,
             timezone, grace_minutes, status, started_at, locked_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'running', $7, now())
         RETURNING id",
    )
    .bind(req.date)
    .bind(req.provider.as_deref())
    .bind(source.as_str())
    .bind(&params.files)
    .bind(tz.name())
    .bind(i32::try_from(day.grace_minutes).unwrap_or(i32::MAX))
    .bind(started_at)
    .fetch_one(&mut *tx)
    .await?;

    // A bucket is the same on both sides when neither has a reversal in it and both have the
    // same number of rows and the same bit_xor of fingerprints: the ledger's rows of a bucket
    // without reversals are distinct (one refund entry per refund_no), so equal xors leave the
    // provider side only the same rows plus pairs of repeats, which equal counts rule out (up
    // to a 64-bit hash collision).
    let drilled: Vec<i32> = (0..BUCKETS)
        .filter(|&b| {
            let i = b as usize;
            let l = &ledger.buckets[i];
            req.exhaustive || l.rev || (l.n, l.fp) != provider_side[i]
        })
        .collect();
    let mut totals: Vec<Total> = ledger
        .pairs
        .iter()
        .map(|p| Total {
            provider: p.provider.clone(),
            merchant: p.merchant.clone(),
            ledger_total: p.total,
            provider_total: p.total,
            diff: 0,
            ledger_count: p.count,
            provider_count: p.count,
        })
        .collect();
    // The (provider, merchant) pairs with refund entries on the day: the drill-down looks
    // their refund entries up by index, pair by pair.
    let (pair_providers, pair_merchants): (Vec<String>, Vec<String>) = ledger
        .pairs
        .iter()
        .filter(|p| p.refunds)
        .map(|p| (p.provider.clone(), p.merchant.clone()))
        .unzip();
    timings.buckets_ms = ms_since(step);

    // Against statements, a provider with ledger entries on the day but no statement row of
    // the day in any file: its statement is missing. Its refunds are not listed one by one
    // (thousands of missing_at_provider saying one thing); each of its (provider, merchant)
    // gets one statement_missing instead, stored after the drill-down. So does a configured
    // statement that was not there (`req.missing`): the provider's, or one merchant's, even
    // with nothing booked, since the day cannot be called balanced without it.
    let mut warnings: Vec<String> = Vec::new();
    // (provider, merchant or "" for all of its merchants, why when it was configured).
    let mut unstated: Vec<(String, String, Option<String>)> = Vec::new();
    if let Some(summary) = &statements {
        let covered = |p: &str| {
            summary.files.iter().any(|f| {
                f.providers_on_date.iter().any(|x| x == p)
                    || (f.rows == 0 && f.fetched_for.as_deref() == Some(p))
            })
        };
        for t in &totals {
            if (t.ledger_count > 0 || t.ledger_total != 0)
                && !covered(&t.provider)
                && !unstated.iter().any(|u| u.0 == t.provider)
            {
                unstated.push((t.provider.clone(), String::new(), None));
                warnings.push(format!(
                    "the statements have no row of {} dated {}: each of its merchants is                      statement_missing; give its statement, or --provider for the other",
                    t.provider, req.date
                ));
            }
        }
        for m in &req.missing {
            let merchant = m.merchant.clone().unwrap_or_default();
            let why = format!(
                "the statement of {} was not there after {} look{}: {}",
                req.date,
                m.looks,
                if m.looks == 1 { "" } else { "s" },
                m.source
            );
            warnings.push(format!(
                "{}{}: {why}",
                m.provider,
                m.merchant
                    .as_deref()
                    .map(|x| format!(" merchant {x}"))
                    .unwrap_or_default()
            ));
            match unstated
                .iter_mut()
                .find(|u| u.0 == m.provider && u.1 == merchant)
            {
                Some(u) => u.2 = Some(why),
                None => unstated.push((m.provider.clone(), merchant, Some(why))),
            }
        }
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let uncovered: Vec<String> = unstated
        .iter()
        .map(|(p, m, _)| {
            if m.is_empty() {
                p.clone()
            } else {
                format!("{p}\u{1f}{m}")
            }
        })
        .collect();

    let drilled_buckets = i64::try_from(drilled.len()).unwrap_or(i64::MAX);
    let mut drilled_pairs = 0;
    let mut drilled_refunds = 0;
    if !drilled.is_empty() {
        spinner.set_message(format!("drilling into {drilled_buckets} buckets"));
        let drill = if streaming && !req.exhaustive {
            Drill::Refunds
        } else {
            Drill::Buckets
        };
        let narrowed: Vec<String> = match drill {
            Drill::Refunds => bind(NARROW.to_owned(), &params)
                .bind(&drilled)
                .bind(&pair_providers)
                .bind(&pair_merchants)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?,
            Drill::Buckets => Vec::new(),
        };
        let (next_known, previous_known) = match &statements {
            Some(s) => (s.coverage.after(req.date), s.coverage.before(req.date)),
            None => {
                let all = || crate::PROVIDERS.map(str::to_owned).to_vec();
                (
                    if day.next_window_closed(as_of) {
                        all()
                    } else {
                        Vec::new()
                    },
                    if day.previous_window_closed(as_of) {
                        all()
                    } else {
                        Vec::new()
                    },
                )
            }
        };
        // Outside what the drill-down read the provider side is the ledger's refund entries,
        // row for row; inside it, it is what the drill-down counted (each payment once). So
        // the provider totals are the ledger's, less what the drill-down read of it, plus the
        // drill-down's.
        let corrections = bind(drill_sql(source, day_sql, drill), &params)
            .bind(&drilled)
            .bind(&pair_providers)
            .bind(&pair_merchants)
            .bind(&narrowed)
            .bind(run_id)
            .bind(i32::try_from(day.grace_minutes).unwrap_or(i32::MAX))
            .bind(tz.name())
            .bind(&next_known)
            .bind(&previous_known)
            .bind(day.next_window_closed(as_of))
            .bind(day.previous_window_closed(as_of))
            .bind(&uncovered)
            .fetch_all(&mut *tx)
            .await?;
        drilled_pairs = corrections.len();
        for c in corrections {
            let (provider, merchant): (String, String) =
                (c.try_get("provider")?, c.try_get("merchant")?);
            let (dn, dt): (i64, i64) = (c.try_get("dn")?, c.try_get("dt")?);
            drilled_refunds += u64::try_from(c.try_get::<i64, _>("refunds")?).unwrap_or(0);
            let at = match totals
                .iter()
                .position(|t| t.provider == provider && t.merchant == merchant)
            {
                Some(i) => i,
                None => {
                    totals.push(Total {
                        provider: provider.clone(),
                        merchant: merchant.clone(),
                        ledger_total: 0,
                        provider_total: 0,
                        diff: 0,
                        ledger_count: 0,
                        provider_count: 0,
                    });
                    totals.len() - 1
                }
            };
            let t = &mut totals[at];
            t.provider_count = t.provider_count.checked_add(dn).ok_or_else(|| {
                RunError::Overflow(format!("provider count of {provider}/{merchant}"))
            })?;
            t.provider_total = t.provider_total.checked_add(dt).ok_or_else(|| {
                RunError::Overflow(format!("provider total of {provider}/{merchant}"))
            })?;
        }
        totals.sort_by(|a, b| (&a.provider, &a.merchant).cmp(&(&b.provider, &b.merchant)));
    }
    timings.drill_ms = ms_since(step);

    spinner.set_message("storing the run");
    let step = Instant::now();
    for t in &mut totals {
        t.diff = t
            .provider_total
            .checked_sub(t.ledger_total)
            .ok_or_else(|| RunError::Overflow(format!("diff of {}/{}", t.provider, t.merchant)))?;
    }
    let column = |f: fn(&Total) -> i64| totals.iter().map(f).collect::<Vec<i64>>();
    sqlx::query(
        "INSERT INTO reconciliation_totals (run_id, provider, merchant, ledger_total,
             ledger_count, provider_total, provider_count, diff)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[],
                                  $7::int8[], $8::int8[])",
    )
    .bind(run_id)
    .bind(
        totals
            .iter()
            .map(|t| t.provider.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        totals
            .iter()
            .map(|t| t.merchant.clone())
            .collect::<Vec<_>>(),
    )
    .bind(column(|t| t.ledger_total))
    .bind(column(|t| t.ledger_count))
    .bind(column(|t| t.provider_total))
    .bind(column(|t| t.provider_count))
    .bind(column(|t| t.diff))
    .execute(&mut *tx)
    .await?;

    if !unstated.is_empty() {
        // One per (provider, merchant): a merchant of a provider without any statement and
        // with a configured statement of its own that was missing is one discrepancy, which
        // says what was looked for.
        sqlx::query(
            "INSERT INTO reconciliation_discrepancies (run_id, kind, provider, merchant,
                 refund_no, ledger_amount, provider_amount, detail)
             SELECT DISTINCT ON (provider, merchant) $1, 'statement_missing', provider,
                    merchant, '', ledger_amount, NULL, detail
             FROM (
                 SELECT u.provider, coalesce(t.merchant, u.merchant) AS merchant,
                        coalesce(t.ledger_total, 0) AS ledger_amount,
                        coalesce(u.why, 'no statement row of ' || u.provider || ' dated ' || $2
                                 || ' in the statements given')
                        || ': ' || coalesce(t.ledger_count, 0)
                        || ' refunds booked, none compared; give its statement of the day'
                        AS detail,
                        u.why IS NULL AS implicit
                 FROM unnest($3::text[], $4::text[], $5::text[]) u (provider, merchant, why)
                 LEFT JOIN reconciliation_totals t
                   ON t.run_id = $1 AND t.provider = u.provider
                  AND (u.merchant = '' OR t.merchant = u.merchant)
                  AND (t.ledger_count > 0 OR t.ledger_total <> 0)
                 WHERE t.provider IS NOT NULL OR u.why IS NOT NULL
             ) x
             ORDER BY provider, merchant, implicit",
        )
        .bind(run_id)
        .bind(req.date.to_string())
        .bind(unstated.iter().map(|u| u.0.clone()).collect::<Vec<_>>())
        .bind(unstated.iter().map(|u| u.1.clone()).collect::<Vec<_>>())
        .bind(unstated.iter().map(|u| u.2.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }

    let counts = sqlx::query(
        "SELECT count(*) FILTER (WHERE kind <> 'pending') AS d,
                count(*) FILTER (WHERE kind = 'pending') AS p
         FROM reconciliation_discrepancies WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&mut *tx)
    .await?;
    let (discrepancies, pending): (i64, i64) = (counts.try_get("d")?, counts.try_get("p")?);
    // Nothing on either side is not a balanced day: more likely the wrong database or date.
    let status = if totals.is_empty() && discrepancies == 0 && pending == 0 {
        Status::NothingToReconcile
    } else if discrepancies == 0 {
        Status::Balanced
    } else {
        Status::Discrepancies
    };
    sqlx::query(
        "UPDATE reconciliation_runs SET status = $2, discrepancy_count = $3, pending_count = $4,
             finished_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(run_id)
    .bind(status.as_str())
    .bind(discrepancies)
    .bind(pending)
    .execute(&mut *tx)
    .await?;
    // A run for every provider supersedes every earlier run of the date; a run for one
    // provider supersedes the earlier runs for that provider (an earlier run for every
    // provider stays current for the others: see the reconciliation_current_* views). A run
    // against our own recorded answers never supersedes one against statements: it is not an
    // independent account, so what a statement found stays the day's result.
    // A run that found nothing to reconcile replaces nothing.
    let superseded: Vec<i64> = sqlx::query_scalar(
        "UPDATE reconciliation_runs SET superseded_by = $1
         WHERE business_date = $2 AND id <> $1 AND superseded_by IS NULL AND $5
           AND status IN ('balanced', 'discrepancies')
           AND ($3::text IS NULL OR provider = $3)
           AND ($4 = 'statement' OR source = 'attempts')
         RETURNING id",
    )
    .bind(run_id)
    .bind(req.date)
    .bind(req.provider.as_deref())
    .bind(source.as_str())
    .bind(status != Status::NothingToReconcile)
    .fetch_all(&mut *tx)
    .await?;
    // Cases follow the runs: after superseded_by is set, which tells them what a rerun replaced.
    shared::store::cases::open_from_run(&mut tx, run_id).await?;
    let kept_current: Vec<i64> = sqlx::query_scalar(KEPT_CURRENT)
        .bind(run_id)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(class)
        .bind(key)
        .execute(&mut conn)
        .await?;
    timings.store_ms = ms_since(step);
    spinner.finish_and_clear();

    tracing::info!(
        run_id, date = %req.date, status = status.as_str(), discrepancies, pending,
        drilled_pairs, drilled_buckets, drilled_refunds, source = source.as_str(),
        elapsed_ms = ms_since(clock), load_ms = timings.load_ms, lock_ms = timings.lock_ms,
        totals_ms = timings.totals_ms, buckets_ms = timings.buckets_ms,
        drill_ms = timings.drill_ms, store_ms = timings.store_ms,
        "reconciliation stored"
    );
    let outcome = RunOutcome {
        run_id,
        date: req.date,
        status,
        discrepancies,
        pending,
        totals,
        drilled_pairs,
        drilled_buckets,
        drilled_refunds,
        statements,
        superseded,
        kept_current,
        repairs,
        warnings,
        timings,
    };
    Ok((outcome, conn))
}
