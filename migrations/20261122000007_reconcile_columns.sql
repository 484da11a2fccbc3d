-- Narrow indexes for the reconciler (DESIGN §7), replacing the expression indexes of 0006.
--
-- 0006 indexed the bucket and fingerprint as expressions, and an index-only scan needs every
-- column an indexed expression reads, so its indexes carried refund_no, provider, merchant and
-- recorded_at as well: 94 MB each for a day of a million refunds, text deformed and compared row
-- by row, and the two together larger than shared_buffers (128 MB), so every run read them
-- again. Stored generated columns hold the values themselves; PostgreSQL computes them on
-- insert, so the writers (shared/src/store/jobs.rs) are unchanged. The reconciler's first pass
-- then reads, per side, only what it aggregates. The price: ledger rows grow by 24 bytes (a
-- fifth more pages for a sequential scan of the ledger), attempts by 16.
--
-- The expressions must stay identical to the ones in reconciler/src/run.rs (statements, which
-- live in a temporary table, are hashed there the same way), or the two sides stop agreeing.
-- A refund's bucket is `hashtext(refund_no) & 4095`; a row's fingerprint is a 64-bit hash of
-- (provider, merchant, refund_no, settlement_refund_fee).
--
-- Adding a stored column rewrites the table under an exclusive lock: on a large deployment
-- apply this in a maintenance window.

ALTER TABLE ledger
    ADD COLUMN recon_pair bigint GENERATED ALWAYS AS (hashtextextended(provider || '/' || merchant, 0)) STORED,
    ADD COLUMN recon_fp bigint GENERATED ALWAYS AS
        (hashtextextended(refund_no, settlement_refund_fee # hashtextextended(provider || '/' || merchant, 0))) STORED,
    ADD COLUMN recon_bucket integer GENERATED ALWAYS AS (hashtext(refund_no) & 4095) STORED;

-- The business date in Asia/Shanghai, the default time zone (DESIGN §9). A deployment in another
-- zone reconciles through provider_attempts_accepted_day (a range of recorded_at) instead, and a
-- run for one provider by the planner's choice (the provider is not indexed): same result, with
-- a hash aggregate.
ALTER TABLE provider_attempts
    ADD COLUMN recon_day date GENERATED ALWAYS AS ((recorded_at AT TIME ZONE 'Asia/Shanghai')::date) STORED,
    ADD COLUMN recon_bucket integer GENERATED ALWAYS AS (hashtext(refund_no) & 4095) STORED,
    ADD COLUMN recon_fp bigint GENERATED ALWAYS AS
        (hashtextextended(refund_no, coalesce(settlement_refund_fee, 0) # hashtextextended(provider || '/' || merchant, 0))) STORED;

DROP INDEX ledger_reconcile;
DROP INDEX provider_attempts_reconcile;

-- The ledger's refund entries (refund_fee > 0 exactly for `refund` entries, CHECK on ledger) in
-- (day, provider and merchant, bucket) order: per (provider, merchant) the totals, per bucket
-- the fingerprints, in one index-only pass; the drill-down looks buckets up in it. The pair is
-- keyed by a 64-bit hash of its names (recon_pair): compared as text on every row, provider and
-- merchant cost about 30% of the pass. Two pairs of one day with the same hash would have their
-- totals added up under one of them (about n^2 / 2^65 for n pairs, the odds the fingerprints
-- already accept); their refunds are still compared one by one, by name.
CREATE INDEX ledger_reconcile ON ledger (business_date, recon_pair, recon_bucket, recon_fp)
    INCLUDE (settlement_refund_fee)
    WHERE refund_fee > 0;

-- A day's accepted attempts in bucket order: the provider side's pass is one index-only scan of
-- three fixed-width columns.
CREATE INDEX provider_attempts_reconcile ON provider_attempts (recon_day, recon_bucket, recon_fp)
    WHERE outcome = 'accepted';

-- A bigint sum that stays a bigint: sum(bigint) keeps a 128-bit state per group and returns
-- numeric, a conversion per bucket (4,096 for each (provider, merchant)) that the client then
-- has to decode. int8pl raises an error on overflow, so an overflowing total still stops the
-- run.
CREATE AGGREGATE recon_sum(bigint) (SFUNC = int8pl, STYPE = bigint, COMBINEFUNC = int8pl, PARALLEL = SAFE);
