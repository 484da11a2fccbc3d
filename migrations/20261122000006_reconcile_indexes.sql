-- Indexes the reconciler (DESIGN §7) reads a day through, replacing the plain day indexes it was
-- the only reader of. Each carries, besides the day, the refund's bucket `hashtext(refund_no) &
-- 1023` and its fingerprint, a 64-bit hash of (provider, merchant, refund_no,
-- settlement_refund_fee), so that the reconciler's first pass over a day (count and bit_xor of
-- fingerprints per bucket) is an index-only scan in bucket order that evaluates nothing per row,
-- and its drill-down into the few buckets that differ reads only those buckets. The expressions
-- must stay textually identical to the ones in reconciler/src/run.rs, or the planner stops
-- matching them.
--
-- A ledger row is a `refund` entry exactly when refund_fee > 0 (CHECK on ledger), so the index
-- carries refund_fee rather than entry_kind.

CREATE INDEX ledger_reconcile ON ledger (
    business_date,
    (hashtext(refund_no) & 1023),
    provider,
    merchant,
    (hashtextextended(refund_no, settlement_refund_fee # hashtextextended(provider || '/' || merchant, 0)))
) INCLUDE (refund_no, refund_fee, settlement_refund_fee);
DROP INDEX ledger_by_day;

-- A day's accepted attempts: one range of recorded_at per bucket.
CREATE INDEX provider_attempts_reconcile ON provider_attempts (
    (hashtext(refund_no) & 1023),
    recorded_at,
    (hashtextextended(refund_no, coalesce(settlement_refund_fee, 0) # hashtextextended(provider || '/' || merchant, 0)))
) INCLUDE (provider, merchant, refund_no, settlement_refund_fee)
WHERE outcome = 'accepted';
DROP INDEX provider_attempts_accepted_day;
