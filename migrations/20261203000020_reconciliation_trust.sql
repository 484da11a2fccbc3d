-- Reconciliation finance can trust (issue #17, DESIGN §7).
--
-- ledger_reconcile_fees: ledger_reconcile with the refund_fee included. A run against
-- statements compares the statement's refund_fee as well as its settlement: its ledger pass
-- fingerprints each refund entry with its refund_fee (reconciler/src/run/sql.rs,
-- LEDGER_PASS_FEES), read from this index alone. Runs against recorded attempts, the nightly
-- benchmark's fast path, keep reading the narrower ledger_reconcile. The price: one more index
-- entry per booking.
CREATE INDEX ledger_reconcile_fees ON ledger (business_date, recon_pair, recon_bucket, recon_fp)
    INCLUDE (settlement_refund_fee, refund_fee)
    WHERE refund_fee > 0;

-- invalid_at_provider: a statement row that keeps the CSV contract but cannot be right (its
-- settlement above its refund_fee) is a discrepancy of its refund, not a reason to stop the
-- whole run.
ALTER TABLE reconciliation_discrepancies DROP CONSTRAINT reconciliation_discrepancies_kind_check;
ALTER TABLE reconciliation_discrepancies ADD CONSTRAINT reconciliation_discrepancies_kind_check
    CHECK (kind IN ('amount_mismatch', 'missing_at_provider', 'missing_in_ledger',
                    'duplicate_at_provider', 'pending', 'invalid_at_provider'));

-- A run against statements is never replaced by a later run against our own recorded answers
-- (DESIGN §7): the recorded answers are not an independent account. A later run covering the
-- same provider replaces an earlier one when it is against statements, or when the earlier one
-- is against attempts too. The reconciler sets superseded_by by the same rule.
CREATE OR REPLACE VIEW reconciliation_current_totals AS
SELECT r.business_date, t.*
FROM reconciliation_totals t
JOIN reconciliation_runs r ON r.id = t.run_id
WHERE r.status IN ('balanced', 'discrepancies')
  AND NOT EXISTS (
      SELECT 1 FROM reconciliation_runs n
      WHERE n.business_date = r.business_date AND n.id > r.id
        AND n.status IN ('balanced', 'discrepancies')
        AND (n.provider IS NULL OR n.provider = t.provider)
        AND (n.source = 'statement' OR r.source = 'attempts'));

CREATE OR REPLACE VIEW reconciliation_current_discrepancies AS
SELECT r.business_date, r.finished_at AS run_finished_at, d.*
FROM reconciliation_discrepancies d
JOIN reconciliation_runs r ON r.id = d.run_id
WHERE r.status IN ('balanced', 'discrepancies')
  AND NOT EXISTS (
      SELECT 1 FROM reconciliation_runs n
      WHERE n.business_date = r.business_date AND n.id > r.id
        AND n.status IN ('balanced', 'discrepancies')
        AND (n.provider IS NULL OR n.provider = d.provider)
        AND (n.source = 'statement' OR r.source = 'attempts'));

-- statement_missing: against statements, a provider with refunds in the ledger that day but no
-- statement row of the day, one per (provider, merchant) with an empty refund_no.
-- nothing_to_reconcile: a run where neither side had anything on the day (the wrong database or
-- date, far more often than a day without refunds); it is not balanced, and supersedes nothing.
ALTER TABLE reconciliation_discrepancies DROP CONSTRAINT reconciliation_discrepancies_kind_check;
ALTER TABLE reconciliation_discrepancies ADD CONSTRAINT reconciliation_discrepancies_kind_check
    CHECK (kind IN ('amount_mismatch', 'missing_at_provider', 'missing_in_ledger',
                    'duplicate_at_provider', 'pending', 'invalid_at_provider',
                    'statement_missing'));
ALTER TABLE reconciliation_runs DROP CONSTRAINT reconciliation_runs_status_check;
ALTER TABLE reconciliation_runs ADD CONSTRAINT reconciliation_runs_status_check
    CHECK (status IN ('running', 'balanced', 'discrepancies', 'nothing_to_reconcile', 'failed'));
