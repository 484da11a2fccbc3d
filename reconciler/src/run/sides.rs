//! The two sides of a run and how they are read: where the provider side comes from (statements
//! or our recorded answers), the ledger's bucket pass and its pairs, and which drill-down a
//! differing bucket gets.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Statement,
    Attempts,
}

impl Source {
    /// Step 1, ledger side, per (provider, merchant): [`LEDGER_PASS_FEES`] against
    /// statements, [`LEDGER_PASS`] against attempts.
    pub(super) fn ledger_pass(self) -> &'static str {
        match self {
            Source::Statement => LEDGER_PASS_FEES,
            Source::Attempts => LEDGER_PASS,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Source::Statement => "statement",
            Source::Attempts => "attempts",
        }
    }

    /// Step 1, provider side: per bucket, the number of the day's provider rows (one per
    /// payment before deduplication) and the bit_xor of their fingerprints. For attempts in the
    /// indexed time zone and every provider, an index-only scan of the three columns of
    /// `provider_attempts_reconcile` in bucket order feeding a sorted aggregate; for one
    /// provider (not in that index) or in another zone, the planner's choice (a range of
    /// `provider_attempts_accepted_day` there) and a hash aggregate of the stored columns.
    pub(super) fn pass_sql(self, day: DaySql, one_provider: bool) -> String {
        let provider = if one_provider {
            "AND provider = $4"
        } else {
            ""
        };
        match (self, day) {
            (Source::Statement, _) => {
                // An invalid row's fingerprint is its own (file and line): no ledger row has
                // it, and no other invalid row cancels it, so its bucket is drilled into.
                let fp = fee_fp(FP_STATEMENT);
                format!(
                    "SELECT {BUCKET} AS bucket, count(*) AS n,
                            bit_xor(CASE WHEN invalid
                                         THEN hashtextextended('invalid/' || file || '/' || line, 0)
                                         ELSE {fp} END) AS fp
                     FROM pg_temp.recon_statement WHERE NOT edge
                     GROUP BY 1"
                )
            }
            (Source::Attempts, DaySql::Indexed) => format!(
                "SELECT recon_bucket AS bucket, count(*) AS n, bit_xor(recon_fp) AS fp
                 FROM provider_attempts
                 WHERE outcome = 'accepted' AND recon_day = $1 {provider}
                 GROUP BY 1"
            ),
            (Source::Attempts, DaySql::Range) => format!(
                "SELECT recon_bucket AS bucket, count(*) AS n, bit_xor(recon_fp) AS fp
                 FROM provider_attempts
                 WHERE outcome = 'accepted' AND recorded_at >= $2 AND recorded_at < $3 {provider}
                 GROUP BY 1"
            ),
        }
    }

    /// The day's payments in the drilled buckets (of the drilled refunds, $10, when `drill`
    /// is [`Drill::Refunds`]), deduplicated: provider, merchant, refund_no, amount, at, source
    /// (a human pointer to the evidence).
    pub(super) fn payments(self, day: DaySql, drill: Drill) -> String {
        match self {
            Source::Statement => format!(
                "SELECT s.provider, s.merchant, s.refund_no,
                        s.settlement_refund_fee AS amount, s.refund_fee AS fee,
                        s.invalid, s.refunded_at AS at,
                        coalesce(($6::text[])[s.file + 1], 'statement') || ':' || s.line
                          || coalesce(' ' || s.provider_refund_id, '') AS source
                 FROM pg_temp.recon_statement s
                 WHERE NOT s.edge AND {BUCKET} = ANY ($7::int[])
                   {}",
                drill.refunds("s")
            ),
            Source::Attempts => format!(
                "SELECT DISTINCT ON (a.provider, a.merchant, a.refund_no, {PAYMENT_KEY})
                        a.provider, a.merchant, a.refund_no,
                        coalesce(a.settlement_refund_fee, 0) AS amount,
                        -- An answer's refund_fee is not compared: not a provider's account.
                        NULL::bigint AS fee, false AS invalid, a.recorded_at AS at,
                        'attempt ' || a.attempt
                          || CASE WHEN a.fenced THEN ' (fenced)' ELSE '' END
                          || coalesce(' ' || a.provider_refund_id, '') AS source
                 FROM provider_attempts a
                 WHERE a.outcome = 'accepted' AND a.recon_bucket = ANY ($7::int[]) {refunds}
                   AND {day}
                   AND ($4::text IS NULL OR a.provider = $4)
                 ORDER BY a.provider, a.merchant, a.refund_no, {PAYMENT_KEY}, a.recorded_at, a.id",
                refunds = drill.refunds("a"),
                day = match day {
                    DaySql::Indexed => "a.recon_day = $1",
                    DaySql::Range => "a.recorded_at >= $2 AND a.recorded_at < $3",
                }
            ),
        }
    }

    /// Payments of the neighbouring days near the cut-offs, looked up by refund_no: provider,
    /// merchant, refund_no, at, amount, and `payment` (rows with one are one payment).
    pub(super) fn neighbours(self) -> String {
        match self {
            Source::Statement => "SELECT provider, merchant, refund_no, refunded_at AS at,
                        settlement_refund_fee AS amount, file || ':' || line AS payment
                 FROM pg_temp.recon_statement WHERE edge"
                .to_owned(),
            Source::Attempts => format!(
                "SELECT a.provider, a.merchant, a.refund_no, a.recorded_at AS at,
                        coalesce(a.settlement_refund_fee, 0) AS amount, {PAYMENT_KEY} AS payment
                 FROM provider_attempts a WHERE a.outcome = 'accepted'"
            ),
        }
    }
}

/// Which payment an accepted attempt (alias `a`) reports, for deduplication: the provider's
/// own refund id when it has one (an idempotent provider answering a retry with its first
/// result is the same payment), else the attempt itself. WuPay has no id of its own: its
/// accepted outcome carries our `refund_no` as `provider_refund_id`, so that pair says nothing
/// about which payment it was, and two accepted WuPay calls are two payments; only a repeat
/// of one attempt's answer is the same one.
pub(super) const PAYMENT_KEY: &str = "CASE WHEN a.provider_refund_id IS NULL
              OR a.provider_refund_id = a.refund_no THEN '#' || a.attempt
         ELSE a.provider_refund_id END";

/// One bucket of the ledger side.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LedgerBucket {
    /// `refund` entries.
    pub(super) n: i64,
    /// Whether a reversal of the day is in it.
    pub(super) rev: bool,
    pub(super) fp: i64,
}

/// One (provider, merchant) of the ledger side.
#[derive(Debug, Clone)]
pub(super) struct LedgerPair {
    pub(super) provider: String,
    pub(super) merchant: String,
    /// `refund` entries.
    pub(super) count: i64,
    /// The day's entries, reversals included.
    pub(super) total: i64,
    /// Whether it has a `refund` entry on the day (so the drill-down looks it up by index).
    pub(super) refunds: bool,
}

/// The ledger side of step 1, folded from its rows as they stream in: a fixed array of
/// buckets and one entry per (provider, merchant).
#[derive(Debug)]
pub(super) struct LedgerPass {
    pub(super) buckets: Vec<LedgerBucket>,
    pub(super) pairs: Vec<LedgerPair>,
}

impl Default for LedgerPass {
    fn default() -> Self {
        LedgerPass {
            buckets: vec![LedgerBucket::default(); BUCKETS as usize],
            pairs: Vec::new(),
        }
    }
}

impl LedgerPass {
    pub(super) fn pair(&mut self, provider: &str, merchant: &str) -> &mut LedgerPair {
        // The rows come in (provider, merchant) order: the last pair is nearly always the one.
        let at = match self
            .pairs
            .iter()
            .rposition(|p| p.provider == provider && p.merchant == merchant)
        {
            Some(i) => i,
            None => {
                self.pairs.push(LedgerPair {
                    provider: provider.to_owned(),
                    merchant: merchant.to_owned(),
                    count: 0,
                    total: 0,
                    refunds: false,
                });
                self.pairs.len() - 1
            }
        };
        &mut self.pairs[at]
    }

    pub(super) fn bucket(&mut self, row: &PgRow) -> Result<&mut LedgerBucket, RunError> {
        let bucket: i32 = row.try_get("bucket")?;
        usize::try_from(bucket)
            .ok()
            .and_then(|b| self.buckets.get_mut(b))
            .ok_or_else(|| RunError::Invalid(format!("bucket {bucket} out of range")))
    }

    /// The refund entries of one (`provider`, `merchant`) per bucket: `buckets`, `n` and `fp`,
    /// arrays of the same length, and their `total`. The pair's number is the sum of `n`,
    /// added up here (checked).
    pub(super) fn add_pair(&mut self, row: &PgRow) -> Result<(), RunError> {
        let provider: &str = row.try_get("provider")?;
        let merchant: &str = row.try_get("merchant")?;
        let overflow = || RunError::Overflow(format!("ledger of {provider}/{merchant}"));
        let buckets: Vec<i32> = row.try_get("buckets")?;
        let ns: Vec<i64> = row.try_get("n")?;
        let fps: Vec<i64> = row.try_get("fp")?;
        let total: i64 = row.try_get("total")?;
        if ns.len() != buckets.len() || fps.len() != buckets.len() {
            return Err(RunError::Invalid(
                "ledger pass: arrays of unequal length".into(),
            ));
        }
        let mut count = 0i64;
        for ((bucket, n), fp) in buckets.into_iter().zip(ns).zip(fps) {
            let b = usize::try_from(bucket)
                .ok()
                .and_then(|b| self.buckets.get_mut(b))
                .ok_or_else(|| RunError::Invalid(format!("bucket {bucket} out of range")))?;
            b.n = b.n.checked_add(n).ok_or_else(overflow)?;
            b.fp ^= fp;
            count = count.checked_add(n).ok_or_else(overflow)?;
        }
        let p = self.pair(provider, merchant);
        p.refunds = true;
        p.count = p.count.checked_add(count).ok_or_else(overflow)?;
        p.total = p.total.checked_add(total).ok_or_else(overflow)?;
        Ok(())
    }

    /// Adds another part of the pass (other pairs, other reversals).
    pub(super) fn merge(&mut self, other: LedgerPass) -> Result<(), RunError> {
        for (b, o) in self.buckets.iter_mut().zip(other.buckets) {
            b.n =
                b.n.checked_add(o.n)
                    .ok_or_else(|| RunError::Overflow("ledger bucket".into()))?;
            b.rev |= o.rev;
            b.fp ^= o.fp;
        }
        for o in other.pairs {
            let p = self.pair(&o.provider, &o.merchant);
            let overflow =
                || RunError::Overflow(format!("ledger of {}/{}", o.provider, o.merchant));
            p.refunds |= o.refunds;
            p.count = p.count.checked_add(o.count).ok_or_else(overflow)?;
            p.total = p.total.checked_add(o.total).ok_or_else(overflow)?;
        }
        Ok(())
    }

    /// A row of the reversals: (provider, merchant, bucket, total).
    pub(super) fn add_reversals(&mut self, row: &PgRow) -> Result<(), RunError> {
        let provider: &str = row.try_get("provider")?;
        let merchant: &str = row.try_get("merchant")?;
        let total: i64 = row.try_get("total")?;
        self.bucket(row)?.rev = true;
        let p = self.pair(provider, merchant);
        p.total = p
            .total
            .checked_add(total)
            .ok_or_else(|| RunError::Overflow(format!("ledger of {provider}/{merchant}")))?;
        Ok(())
    }
}

/// What the drill-down reads of the buckets that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drill {
    /// Every row of them ($7).
    Buckets,
    /// The rows of the refunds that [`NARROW`] found in them ($10).
    Refunds,
}

impl Drill {
    /// The condition on table alias `t` that keeps the rows of the drilled refunds.
    pub(super) fn refunds(self, t: &str) -> String {
        match self {
            Drill::Buckets => String::new(),
            Drill::Refunds => format!("AND {t}.refund_no = ANY ($10::text[])"),
        }
    }

    /// The day's ledger entries the drill-down reads, all columns.
    pub(super) fn ledger(self) -> &'static str {
        match self {
            Drill::Buckets => LEDGER_DRILLED,
            Drill::Refunds => LEDGER_DRILLED_REFUNDS,
        }
    }

    /// Per (provider, merchant), minus the count and total of the ledger's refund entries the
    /// drill-down reads, and minus the total of its reversals: provider, merchant, dn, dt.
    pub(super) fn ledger_totals(self) -> String {
        match self {
            Drill::Buckets => LEDGER_DRILLED_TOTALS.to_owned(),
            Drill::Refunds => format!(
                "SELECT provider, merchant, -count(*) FILTER (WHERE refund_fee > 0) AS dn,
                        -sum(settlement_refund_fee) AS dt
                 FROM ({LEDGER_DRILLED_REFUNDS}) e GROUP BY provider, merchant"
            ),
        }
    }
}

/// The ledger's (provider, merchant) pairs of the day, handed out a few at a time to the
/// connection that asks.
pub(super) struct Pairs {
    pub(super) providers: Vec<String>,
    pub(super) merchants: Vec<String>,
    /// Several pairs per query when there are many (small) ones, so that round trips stay few;
    /// one when there are few (large) ones, so that the two connections finish together.
    pub(super) chunk: usize,
    pub(super) next: std::sync::atomic::AtomicUsize,
}

impl Pairs {
    pub(super) async fn of_day(
        conn: &mut PgConnection,
        req: &RunRequest,
    ) -> Result<Pairs, RunError> {
        let row = sqlx::query(LEDGER_PAIRS)
            .bind(req.date)
            .bind(req.provider.as_deref())
            .fetch_one(conn)
            .await?;
        let providers: Vec<String> = row.try_get("providers")?;
        Ok(Pairs {
            chunk: providers.len().div_ceil(32).max(1),
            providers,
            merchants: row.try_get("merchants")?,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The next pairs nobody has taken, as (providers, merchants).
    pub(super) fn take(&self) -> Option<(&[String], &[String])> {
        let i = self
            .next
            .fetch_add(self.chunk, std::sync::atomic::Ordering::Relaxed);
        let end = (i + self.chunk).min(self.providers.len());
        self.providers
            .get(i..end)
            .zip(self.merchants.get(i..end))
            .filter(|(p, _)| !p.is_empty())
    }
}
