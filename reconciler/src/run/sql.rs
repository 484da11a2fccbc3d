//! The run's SQL, as text and the parameters every statement binds: the bucket and fingerprint
//! expressions (the same as the indexes'), the ledger and provider passes, the drill-downs and
//! the classification of discrepancies. Kept apart so that the text of each statement can be
//! read whole.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::AssertSqlSafe;

use super::*;

/// How a query finds the day's attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DaySql {
    /// The time zone is [`INDEXED_TZ`]: by `provider_attempts_reconcile`, in bucket order.
    Indexed,
    /// Another zone: by a range of `recorded_at`.
    Range,
}

/// The time zone of `provider_attempts.recon_day`, the business date its index is keyed by
/// (migration 0007).
pub const INDEXED_TZ: &str = "Asia/Shanghai";

/// The parameters every query of a run is given (each uses some of them).
pub(super) struct Params<'a> {
    pub(super) date: NaiveDate,
    pub(super) start: DateTime<Utc>,
    pub(super) end: DateTime<Utc>,
    pub(super) provider: Option<&'a str>,
    pub(super) exhaustive: bool,
    pub(super) files: Vec<String>,
}

pub(super) fn bind<'q>(
    sql: String,
    p: &Params<'_>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(sql))
        .bind(p.date)
        .bind(p.start)
        .bind(p.end)
        .bind(p.provider.map(str::to_owned))
        .bind(p.exhaustive)
        .bind(p.files.clone())
}

/// A refund's bucket, for statements (a temporary table); the ledger and the attempts store it
/// as `recon_bucket` (migration 0008, the same expression, [`BUCKETS`] of them).
pub const BUCKET: &str = "(hashtext(refund_no) & 1023)";

/// A statement row's fingerprint: a 64-bit hash of (provider, merchant, refund_no,
/// settlement_refund_fee), the expression the ledger and the attempts store as `recon_fp`
/// (migration 0007). They must stay the same, or no bucket ever matches.
pub const FP_STATEMENT: &str = "hashtextextended(refund_no, settlement_refund_fee \
                            # hashtextextended(provider || '/' || merchant, 0))";

/// Step 1, ledger side, for some (provider, merchant) pairs ($2, $3), one row each: per
/// bucket, the refund entries and the bit_xor of their fingerprints (the expression `$fp`), as
/// arrays, and the pair's total (a bigint that raises an error on overflow).
/// Per pair an index-only scan in bucket order feeding a sorted aggregate: bucket and
/// fingerprint are stored columns, read from the index, and the sums stay bigint
/// (`recon_sum`, migration 0007).
macro_rules! ledger_pass {
    ($fp:literal) => {
        concat!(
            "SELECT pm.provider, pm.merchant, g.*
         FROM unnest($2::text[], $3::text[]) pm(provider, merchant)
         CROSS JOIN LATERAL (
             SELECT coalesce(array_agg(bucket), '{}') AS buckets,
                    coalesce(array_agg(n), '{}') AS n, coalesce(array_agg(fp), '{}') AS fp,
                    coalesce(recon_sum(total), 0) AS total
             FROM (
                 SELECT recon_bucket AS bucket, count(*) AS n,
                        recon_sum(settlement_refund_fee) AS total, bit_xor(",
            $fp,
            ") AS fp
                 FROM ledger
                 WHERE business_date = $1 AND refund_fee > 0
                   AND recon_pair = hashtextextended(pm.provider || '/' || pm.merchant, 0)
                 GROUP BY 1
             ) b
         ) g"
        )
    };
}

/// [`ledger_pass!`] against attempts: the stored fingerprint, from `ledger_reconcile`.
pub(super) const LEDGER_PASS: &str = ledger_pass!("recon_fp");

/// [`ledger_pass!`] against statements, which carry the refund_fee too: the fingerprint
/// hashed with the refund_fee ([`FEE_FP`]), from `ledger_reconcile_fees` (migration 0020,
/// the same index with the refund_fee included), so that a row whose refund_fee differs
/// makes its bucket differ. Attempts keep the narrower index and the stored fingerprint:
/// what a provider answered a call is compared on the settlement only.
pub(super) const LEDGER_PASS_FEES: &str = ledger_pass!("hashint8extended(recon_fp, refund_fee)");

/// A row's fingerprint with its refund_fee, from its fingerprint `fp`: against statements
/// both sides' rows are fingerprinted so.
pub fn fee_fp(fp: &str) -> String {
    format!("hashint8extended({fp}, refund_fee)")
}

/// The (provider, merchant) pairs with refund entries on the day, as two arrays: a skip scan
/// of `ledger_reconcile`, one index descent and one row per pair. The provider is filtered
/// afterwards: filtering in the scan would read every row of the other provider's pairs.
pub(super) const LEDGER_PAIRS: &str = "WITH RECURSIVE p AS (
         (SELECT recon_pair, provider, merchant FROM ledger
          WHERE business_date = $1 AND refund_fee > 0
          ORDER BY recon_pair LIMIT 1)
         UNION ALL
         SELECT n.* FROM p CROSS JOIN LATERAL (
             SELECT recon_pair, provider, merchant FROM ledger
             WHERE business_date = $1 AND refund_fee > 0 AND recon_pair > p.recon_pair
             ORDER BY recon_pair LIMIT 1
         ) n
     )
     SELECT coalesce(array_agg(provider ORDER BY provider, merchant), '{}') AS providers,
            coalesce(array_agg(merchant ORDER BY provider, merchant), '{}') AS merchants
     FROM p WHERE $2::text IS NULL OR provider = $2";

/// Step 1, the day's reversals (few; `ledger_reconcile_reversals`): per (provider, merchant)
/// and bucket, their total.
pub(super) const REVERSALS: &str = "SELECT provider, merchant, recon_bucket AS bucket,
                sum(settlement_refund_fee)::bigint AS total
         FROM ledger
         WHERE business_date = $1 AND refund_fee < 0 AND ($2::text IS NULL OR provider = $2)
         GROUP BY 1, 2, 3";

/// The day's ledger entries in the drilled buckets ($7), all columns: the refund entries
/// looked up by index per (provider, merchant) of the day ($8, $9), and the reversals among the
/// day's few.
pub(super) const LEDGER_DRILLED: &str =
    "SELECT e.* FROM unnest($8::text[], $9::text[]) pm(provider, merchant)
         CROSS JOIN LATERAL (
             SELECT * FROM ledger e
             WHERE e.business_date = $1 AND e.refund_fee > 0
               AND e.recon_pair = hashtextextended(pm.provider || '/' || pm.merchant, 0)
               AND e.recon_bucket = ANY ($7::int[])
         ) e
         UNION ALL
         SELECT e.* FROM ledger e
         WHERE e.business_date = $1 AND e.refund_fee < 0
           AND e.recon_bucket = ANY ($7::int[])";

/// The day's ledger entries of the drilled refunds ($10), all columns: the refund entries by
/// `ledger_one_refund_entry`, the reversals among the day's few.
pub(super) const LEDGER_DRILLED_REFUNDS: &str = "SELECT e.* FROM ledger e
         WHERE e.entry_kind = 'refund' AND e.refund_no = ANY ($10::text[])
           AND e.business_date = $1
         UNION ALL
         SELECT e.* FROM ledger e
         WHERE e.business_date = $1 AND e.refund_fee < 0 AND e.refund_no = ANY ($10::text[])";

/// Step 2, narrowed: the refunds to compare one by one in the buckets that differ ($7), from
/// the indexes alone but for a row per refund found. In those buckets a ledger refund entry
/// and an accepted attempt with one fingerprint are one refund of one (provider, merchant)
/// with one amount, booked once and paid once (up to a 64-bit hash collision); what has no
/// partner, or more than one, is a refund to compare, with every row of it on both sides (a
/// refund paid twice has a partnered row and one without). The day's reversals in those
/// buckets are compared too: their refunds net on the ledger side, which fingerprints do not.
/// For attempts by `provider_attempts_reconcile`, every provider ($8, $9: the day's pairs).
pub(super) const NARROW: &str = "WITH x AS (
         SELECT e.recon_pair AS pair, e.recon_bucket AS bucket, e.recon_fp AS fp, 1 AS side
         FROM unnest($8::text[], $9::text[]) pm(provider, merchant)
         CROSS JOIN LATERAL (
             SELECT recon_pair, recon_bucket, recon_fp FROM ledger
             WHERE business_date = $1 AND refund_fee > 0
               AND recon_pair = hashtextextended(pm.provider || '/' || pm.merchant, 0)
               AND recon_bucket = ANY ($7::int[])
         ) e
         UNION ALL
         SELECT NULL, recon_bucket, recon_fp, -1 FROM provider_attempts
         WHERE outcome = 'accepted' AND recon_day = $1 AND recon_bucket = ANY ($7::int[])
     ), odd AS (
         SELECT bucket, fp, max(pair) AS pair FROM x GROUP BY bucket, fp HAVING sum(side) <> 0
     )
     SELECT coalesce(array_agg(DISTINCT r.refund_no), '{}') FROM (
         SELECT e.refund_no FROM odd JOIN ledger e
           ON e.business_date = $1 AND e.refund_fee > 0 AND e.recon_pair = odd.pair
          AND e.recon_bucket = odd.bucket AND e.recon_fp = odd.fp
         UNION ALL
         SELECT a.refund_no FROM odd JOIN provider_attempts a
           ON a.outcome = 'accepted' AND a.recon_day = $1 AND a.recon_bucket = odd.bucket
          AND a.recon_fp = odd.fp
         UNION ALL
         SELECT refund_no FROM ledger
         WHERE business_date = $1 AND refund_fee < 0 AND recon_bucket = ANY ($7::int[])
     ) r";

/// Per (provider, merchant), minus the ledger's refund entries and entries' total in the
/// drilled buckets ($7), read like [`LEDGER_DRILLED`] but from the index alone.
pub(super) const LEDGER_DRILLED_TOTALS: &str =
    "SELECT pm.provider, pm.merchant, -t.n AS dn, -t.total AS dt
         FROM unnest($8::text[], $9::text[]) pm(provider, merchant)
         CROSS JOIN LATERAL (
             SELECT count(*) AS n, sum(e.settlement_refund_fee) AS total FROM ledger e
             WHERE e.business_date = $1 AND e.refund_fee > 0
               AND e.recon_pair = hashtextextended(pm.provider || '/' || pm.merchant, 0)
               AND e.recon_bucket = ANY ($7::int[])
         ) t
         WHERE t.n > 0
         UNION ALL
         SELECT provider, merchant, 0, -sum(settlement_refund_fee) FROM ledger
         WHERE business_date = $1 AND refund_fee < 0
           AND recon_bucket = ANY ($7::int[])
         GROUP BY provider, merchant";

/// Step 2a: both sides per refund in the drilled buckets (of the drilled refunds, for
/// [`Drill::Refunds`]): provider, merchant, refund_no, ledger_amount, booked_at, manual,
/// provider_amount, provider_n, provider_at, sources.
pub(super) fn refunds_sql(source: Source, day: DaySql, drill: Drill) -> String {
    format!(
        "WITH l AS (
             SELECT e.provider, e.merchant, e.refund_no,
                    sum(e.settlement_refund_fee) AS amount, sum(e.refund_fee) AS fee,
                    min(e.booked_at) FILTER (WHERE e.entry_kind = 'refund') AS booked_at,
                    bool_or(e.source = 'manual') AS manual
             FROM ({ledger}) e
             WHERE ($4::text IS NULL OR e.provider = $4)
             GROUP BY e.provider, e.merchant, e.refund_no
             HAVING sum(e.refund_fee) <> 0 OR sum(e.settlement_refund_fee) <> 0
         ), p AS (
             SELECT provider, merchant, refund_no, sum(amount) AS amount, sum(fee) AS fee,
                    bool_or(invalid) AS invalid, count(*) AS n,
                    min(at) AS at, string_agg(source, ', ' ORDER BY at, source) AS sources
             FROM ({payments}) x
             GROUP BY provider, merchant, refund_no
         )
         SELECT coalesce(l.provider, p.provider) AS provider,
                coalesce(l.merchant, p.merchant) AS merchant,
                coalesce(l.refund_no, p.refund_no) AS refund_no,
                l.amount::bigint AS ledger_amount, l.fee::bigint AS ledger_fee, l.booked_at,
                l.manual, p.amount::bigint AS provider_amount, p.fee::bigint AS provider_fee, coalesce(p.n, 0) AS provider_n,
                p.at AS provider_at, p.sources, coalesce(p.invalid, false) AS invalid
         FROM l FULL JOIN p
           ON p.provider = l.provider AND p.merchant = l.merchant AND p.refund_no = l.refund_no",
        ledger = drill.ledger(),
        payments = source.payments(day, drill)
    )
}

/// Steps 2 and 3 in one statement (no temporary table to create and drop): compares the
/// refunds, classifies and stores their discrepancies, and returns per (provider, merchant)
/// what the drill-down changes on the provider side (`dn`, `dt`: less the ledger entries it
/// read, plus the payments it counted) and the number of `refunds` it compared.
pub(super) fn drill_sql(source: Source, day: DaySql, drill: Drill) -> String {
    format!(
        "WITH recon_refunds AS MATERIALIZED ({refunds}),
         stored AS ({discrepancies})
         SELECT provider, merchant, sum(dn)::bigint AS dn, sum(dt)::bigint AS dt,
                sum(refunds)::bigint AS refunds
         FROM (
             SELECT e.*, 0 AS refunds FROM ({ledger}) e
             WHERE ($4::text IS NULL OR provider = $4)
             UNION ALL
             SELECT provider, merchant, provider_n, coalesce(provider_amount, 0), 1
             FROM recon_refunds
         ) x GROUP BY provider, merchant",
        refunds = refunds_sql(source, day, drill),
        discrepancies = discrepancies_sql(source),
        ledger = drill.ledger_totals(),
    )
}

/// Step 2b: classify and store, from `recon_refunds`. Extra parameters: $11 run id, $12 grace
/// minutes, $13 time zone, $14 providers whose next day is known, $15 providers whose previous
/// day is known, $16 whether the ledger's next window is closed, $17 whether its previous
/// window is closed, $18 providers (or `provider U+001F merchant`) without a statement of the day.
pub(super) fn discrepancies_sql(source: Source) -> String {
    format!(
        "INSERT INTO reconciliation_discrepancies (run_id, kind, provider, merchant, refund_no,
             ledger_amount, provider_amount, detail)
         SELECT $11, k.kind, r.provider, r.merchant, r.refund_no, r.ledger_amount,
                r.provider_amount,
                concat_ws('; ', k.why,
                          'job ' || coalesce(j.state || coalesce(' (' || j.cause || ')', ''),
                                             'not found'))
         FROM recon_refunds r
         CROSS JOIN LATERAL (SELECT make_interval(mins => $12) AS g) gi
         -- For a one-sided refund: its time on that side, the cut-off it is near (if any), and
         -- whether the other side would be after that cut-off. OFFSET 0 keeps the planner from
         -- copying these CASEs into every condition below that uses them: copied, they made
         -- planning (index predicates tested against each) cost 3-10 ms, more than a narrowed
         -- drill-down takes to run.
         CROSS JOIN LATERAL (
             SELECT t,
                    CASE WHEN t >= $3 - gi.g AND t < $3 THEN $3
                         WHEN t >= $2 AND t < $2 + gi.g THEN $2 END AS cut
             FROM (SELECT CASE WHEN r.ledger_amount IS NULL THEN r.provider_at
                               WHEN r.provider_amount IS NULL THEN r.booked_at END AS t) t0
             OFFSET 0
         ) c
         LEFT JOIN LATERAL (
             SELECT min(x.at) AS at, count(DISTINCT x.payment) AS n, min(x.amount) AS lo,
                    max(x.amount) AS hi
             FROM ({neighbours}) x
             WHERE r.provider_amount IS NULL AND c.cut IS NOT NULL
               AND x.refund_no = r.refund_no AND x.provider = r.provider
               AND x.merchant = r.merchant
               AND x.at >= CASE WHEN c.cut = $3 THEN $3 ELSE $2 - gi.g END
               AND x.at < CASE WHEN c.cut = $3 THEN $3 + gi.g ELSE $2 END
         ) pp ON true
         LEFT JOIN LATERAL (
             SELECT min(x.booked_at) AS at, min(x.settlement_refund_fee) AS amount FROM ledger x
             WHERE r.ledger_amount IS NULL AND c.cut IS NOT NULL
               AND x.refund_no = r.refund_no AND x.entry_kind = 'refund'
               AND x.provider = r.provider AND x.merchant = r.merchant
               AND x.booked_at >= CASE WHEN c.cut = $3 THEN $3 ELSE $2 - gi.g END
               AND x.booked_at < CASE WHEN c.cut = $3 THEN $3 + gi.g ELSE $2 END
         ) lp ON true
         -- Whether that booking across midnight was paid on its own day (in the same window):
         -- then it is not this payment's partner, and this payment is a second one.
         LEFT JOIN LATERAL (
             SELECT true AS matched FROM ({neighbours}) x
             WHERE lp.at IS NOT NULL
               AND x.refund_no = r.refund_no AND x.provider = r.provider
               AND x.merchant = r.merchant
               AND x.at >= CASE WHEN c.cut = $3 THEN $3 ELSE $2 - gi.g END
               AND x.at < CASE WHEN c.cut = $3 THEN $3 + gi.g ELSE $2 END
             LIMIT 1
         ) lm ON true
         CROSS JOIN LATERAL (
             SELECT CASE WHEN c.cut = $3 THEN r.provider = ANY($14::text[])
                         ELSE r.provider = ANY($15::text[]) END AS provider_known,
                    CASE WHEN c.cut = $3 THEN $16 ELSE $17 END AS ledger_known,
                    CASE WHEN c.cut = $3 THEN 'the next day ' || ($1 + 1)
                         ELSE 'the previous day ' || ($1 - 1) END AS neighbour,
                    CASE WHEN c.cut = $3 THEN 'before' ELSE 'after' END AS side
         ) n
         CROSS JOIN LATERAL (
             SELECT to_char(r.booked_at AT TIME ZONE $13, 'YYYY-MM-DD HH24:MI:SS') AS booked,
                    to_char(r.provider_at AT TIME ZONE $13, 'YYYY-MM-DD HH24:MI:SS') AS paid,
                    to_char(pp.at AT TIME ZONE $13, 'YYYY-MM-DD HH24:MI:SS') AS partner_paid,
                    to_char(lp.at AT TIME ZONE $13, 'YYYY-MM-DD HH24:MI:SS') AS partner_booked
         ) f
         CROSS JOIN LATERAL (
             SELECT CASE
                 -- A provider row that cannot be right says nothing we could match on.
                 WHEN r.invalid THEN 'invalid_at_provider'
                 WHEN r.ledger_amount IS NOT NULL AND r.provider_amount IS NOT NULL THEN
                     CASE WHEN r.provider_n > 1 THEN 'duplicate_at_provider'
                          -- The refund_fee only where the provider side has it (statements).
                          WHEN r.ledger_amount <> r.provider_amount
                               OR r.ledger_fee <> r.provider_fee THEN 'amount_mismatch'
                     END
                 -- Near a cut-off a partner across midnight makes the refund pending only if
                 -- it is one payment (or booking) unmatched on its own day and agrees in
                 -- amount. A booking has one refund entry (ledger_one_refund_entry), so a
                 -- payment across midnight of a refund booked on D is never matched on its own
                 -- day; a booking across midnight of a payment on D may be.
                 WHEN r.provider_amount IS NULL THEN
                     CASE WHEN c.cut IS NULL THEN 'missing_at_provider'
                          WHEN pp.n > 1 THEN 'duplicate_at_provider'
                          WHEN pp.n = 1 AND (pp.lo <> r.ledger_amount OR pp.hi <> r.ledger_amount)
                          THEN 'amount_mismatch'
                          WHEN pp.n = 1 OR NOT n.provider_known THEN 'pending'
                          ELSE 'missing_at_provider' END
                 ELSE
                     CASE WHEN r.provider_n > 1 THEN 'duplicate_at_provider'
                          WHEN c.cut IS NULL THEN 'missing_in_ledger'
                          WHEN lp.at IS NOT NULL AND lm.matched THEN 'duplicate_at_provider'
                          WHEN lp.at IS NOT NULL AND lp.amount <> r.provider_amount
                          THEN 'amount_mismatch'
                          WHEN lp.at IS NOT NULL OR NOT n.ledger_known THEN 'pending'
                          ELSE 'missing_in_ledger' END
             END AS kind
         ) k0
         CROSS JOIN LATERAL (
             SELECT k0.kind, CASE k0.kind
                 WHEN 'invalid_at_provider' THEN
                     'the statement says settlement ' || r.provider_amount
                     || ' above the refund_fee ' || r.provider_fee || ': ' || r.sources
                     || CASE WHEN r.ledger_amount IS NULL THEN '; not in the ledger' ELSE '' END
                 WHEN 'duplicate_at_provider' THEN
                     CASE WHEN r.provider_amount IS NULL THEN
                         'booked ' || f.booked || ', within ' || $12 || ' min ' || n.side
                         || ' the cut-off; the provider paid it ' || pp.n
                         || ' times across it, first at ' || f.partner_paid
                     WHEN r.provider_n = 1 THEN
                         'provider: ' || r.sources || ' at ' || f.paid || ', a second payment: '
                         || 'booked at ' || f.partner_booked || ' across the cut-off and paid '
                         || 'there too'
                     ELSE
                         'provider has it ' || r.provider_n || ' times: ' || r.sources
                         || CASE WHEN r.ledger_amount IS NULL THEN '; not in the ledger' ELSE '' END
                     END
                 WHEN 'amount_mismatch' THEN
                     CASE WHEN r.provider_amount IS NULL THEN
                         'booked ' || f.booked || '; the provider paid ' || pp.lo || ' at '
                         || f.partner_paid || ' across the cut-off'
                     WHEN r.ledger_amount IS NULL THEN
                         'provider: ' || r.sources || ' at ' || f.paid || '; booked '
                         || lp.amount || ' at ' || f.partner_booked || ' across the cut-off'
                     ELSE concat_ws('; ',
                         CASE WHEN r.ledger_amount <> r.provider_amount
                              THEN 'settlement_refund_fee: ledger ' || r.ledger_amount
                                   || ', provider ' || r.provider_amount END,
                         CASE WHEN r.ledger_fee <> r.provider_fee
                              THEN 'refund_fee: ledger ' || r.ledger_fee || ', provider '
                                   || r.provider_fee END,
                         'provider: ' || r.sources) END
                 WHEN 'missing_in_ledger' THEN
                     'provider: ' || r.sources || ' at ' || f.paid
                 WHEN 'missing_at_provider' THEN
                     coalesce('booked ' || f.booked, 'reversal of a refund booked on another day')
                     || CASE WHEN r.manual THEN ' (manual resolution)' ELSE '' END
                 WHEN 'pending' THEN
                     CASE WHEN r.provider_amount IS NULL THEN
                         'booked ' || f.booked || ', within ' || $12 || ' min ' || n.side
                         || ' the cut-off; '
                         || coalesce('provider paid it at ' || f.partner_paid,
                                     'the provider''s ' || n.neighbour || ' is not in yet')
                     ELSE
                         'provider: ' || r.sources || ' at ' || f.paid || ', within ' || $12
                         || ' min ' || n.side || ' the cut-off; '
                         || coalesce('booked at ' || f.partner_booked,
                                     'the ledger of ' || n.neighbour || ' is not complete yet')
                     END
             END AS why
         ) k
         LEFT JOIN jobs j ON j.refund_no = r.refund_no
         -- $18: providers (and provider U+001F merchant pairs) without a statement of the day,
         -- reported per merchant instead.
         WHERE k.kind IS NOT NULL AND NOT (r.provider = ANY ($18::text[])
                                           OR r.provider || chr(31) || r.merchant = ANY ($18::text[]))",
        neighbours = source.neighbours()
    )
}
