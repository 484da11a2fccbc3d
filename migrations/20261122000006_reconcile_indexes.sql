-- Indexes the reconciler (DESIGN §7) reads a day through. The expressions must stay textually
-- identical to the ones in reconciler/src/run.rs, or the planner stops matching them.
--
-- A refund's bucket is `hashtext(refund_no) & 4095`; a row's fingerprint is a 64-bit hash of
-- (provider, merchant, refund_no, settlement_refund_fee). The reconciler's first pass over a day
-- is, per side, one index-only scan in group order feeding a sorted GroupAggregate: nothing is
-- hashed, sorted or computed per row (bucket and fingerprint are read from the index). Its
-- drill-down into the few buckets that differ reads only those buckets, by index.

-- The ledger's refund entries (refund_fee > 0 exactly for `refund` entries, CHECK on ledger) in
-- (day, provider, merchant, bucket) order: per (provider, merchant) the totals, per bucket the
-- fingerprints, in one pass. refund_no is included so that the scan is index-only (the planner
-- asks for every column an indexed expression uses).
CREATE INDEX ledger_reconcile ON ledger (
    business_date,
    provider,
    merchant,
    (hashtext(refund_no) & 4095),
    (hashtextextended(refund_no, settlement_refund_fee # hashtextextended(provider || '/' || merchant, 0)))
) INCLUDE (settlement_refund_fee, refund_no)
WHERE refund_fee > 0;
-- Reversals are rare; the reconciler reads a day's separately (and drills into their buckets).
CREATE INDEX ledger_reconcile_reversals ON ledger (business_date) WHERE refund_fee < 0;
DROP INDEX ledger_by_day;

-- A day's accepted attempts in bucket order, the day being the business date in the default
-- time zone, Asia/Shanghai (DESIGN §9). A deployment in another zone reconciles through
-- provider_attempts_accepted_day (a range of recorded_at) instead: same result, with a hash
-- aggregate; it can add this index with its own zone to get the streaming plan. Every column
-- an indexed expression uses is included, so that the scan is index-only.
CREATE INDEX provider_attempts_reconcile ON provider_attempts (
    ((recorded_at AT TIME ZONE 'Asia/Shanghai')::date),
    (hashtext(refund_no) & 4095),
    (hashtextextended(refund_no, coalesce(settlement_refund_fee, 0) # hashtextextended(provider || '/' || merchant, 0)))
) INCLUDE (provider, merchant, refund_no, settlement_refund_fee, recorded_at)
WHERE outcome = 'accepted';
