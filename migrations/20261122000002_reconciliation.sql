-- Nightly reconciliation (DESIGN §7): every run of `refund-reconciler run`, its totals per
-- (provider, merchant) and its discrepancies per refund. Written by the reconciler only, in one
-- transaction per run under an advisory lock on the business date, so two runs of one day never
-- interleave and a run is either stored whole or not at all. Money is BIGINT fen.
--
-- A later run of the same date covering the same provider supersedes an earlier one: the earlier
-- run stays (history), with `superseded_by` set when the later run covers all of its scope. The
-- views `reconciliation_current_totals` and `reconciliation_current_discrepancies` give, per date
-- and provider, the answer of the latest finished run only; `refundctl job show` reads the
-- latter by `refund_no`.
--
-- Statement rows are staged in a per-session temporary table (created by the reconciler, not
-- here): they live only as long as the run that loads them.

CREATE TABLE reconciliation_runs (
    id                bigserial PRIMARY KEY,
    business_date     date NOT NULL,
    -- NULL: every provider; else the run's --provider.
    provider          text,
    -- Where the provider side came from: statement files, or accepted provider attempts.
    source            text NOT NULL CHECK (source IN ('statement', 'attempts')),
    statement_files   text[] NOT NULL DEFAULT '{}',
    timezone          text NOT NULL,
    grace_minutes     integer NOT NULL CHECK (grace_minutes >= 0),
    -- 'running' is only ever seen inside the run's own transaction; 'failed' runs are recorded
    -- after the fact with the error, and never supersede anything.
    status            text NOT NULL CHECK (status IN ('running', 'balanced', 'discrepancies', 'failed')),
    error             text,
    discrepancy_count bigint NOT NULL DEFAULT 0 CHECK (discrepancy_count >= 0),
    pending_count     bigint NOT NULL DEFAULT 0 CHECK (pending_count >= 0),
    -- When the command started (statements are loaded before the lock is taken), when it held
    -- the date's lock, and when it finished.
    started_at        timestamptz NOT NULL,
    locked_at         timestamptz,
    finished_at       timestamptz,
    superseded_by     bigint REFERENCES reconciliation_runs (id),
    CHECK ((status = 'failed') = (error IS NOT NULL))
);
CREATE INDEX reconciliation_runs_by_date ON reconciliation_runs (business_date, id);

CREATE TABLE reconciliation_totals (
    run_id         bigint NOT NULL REFERENCES reconciliation_runs (id),
    provider       text NOT NULL,
    merchant       text NOT NULL,
    -- Sum of the day's ledger settlement_refund_fee (reversals included) and the number of
    -- refund entries booked that day.
    ledger_total   bigint NOT NULL,
    ledger_count   bigint NOT NULL CHECK (ledger_count >= 0),
    -- Sum and number of the provider's payments that day (a refund paid twice counts twice).
    provider_total bigint NOT NULL,
    provider_count bigint NOT NULL CHECK (provider_count >= 0),
    diff           bigint NOT NULL CHECK (diff = provider_total - ledger_total),
    PRIMARY KEY (run_id, provider, merchant)
);

CREATE TABLE reconciliation_discrepancies (
    run_id          bigint NOT NULL REFERENCES reconciliation_runs (id),
    kind            text NOT NULL CHECK (kind IN ('amount_mismatch', 'missing_at_provider',
                        'missing_in_ledger', 'duplicate_at_provider', 'pending')),
    provider        text NOT NULL,
    merchant        text NOT NULL,
    refund_no       text NOT NULL,
    -- settlement_refund_fee as counted on the run's date on each side; NULL where that side
    -- has nothing for the refund on that date.
    ledger_amount   bigint,
    provider_amount bigint,
    -- Why, for a person: statement lines or attempts, booking times, the job's state.
    detail          text NOT NULL,
    PRIMARY KEY (run_id, provider, merchant, refund_no),
    CHECK (ledger_amount IS NOT NULL OR provider_amount IS NOT NULL)
);
CREATE INDEX reconciliation_discrepancies_refund_no ON reconciliation_discrepancies (refund_no);

-- The latest finished run covering (date, provider): no later finished run of that date covers
-- the same provider.
CREATE VIEW reconciliation_current_totals AS
SELECT r.business_date, t.*
FROM reconciliation_totals t
JOIN reconciliation_runs r ON r.id = t.run_id
WHERE r.status IN ('balanced', 'discrepancies')
  AND NOT EXISTS (
      SELECT 1 FROM reconciliation_runs n
      WHERE n.business_date = r.business_date AND n.id > r.id
        AND n.status IN ('balanced', 'discrepancies')
        AND (n.provider IS NULL OR n.provider = t.provider));

CREATE VIEW reconciliation_current_discrepancies AS
SELECT r.business_date, r.finished_at AS run_finished_at, d.*
FROM reconciliation_discrepancies d
JOIN reconciliation_runs r ON r.id = d.run_id
WHERE r.status IN ('balanced', 'discrepancies')
  AND NOT EXISTS (
      SELECT 1 FROM reconciliation_runs n
      WHERE n.business_date = r.business_date AND n.id > r.id
        AND n.status IN ('balanced', 'discrepancies')
        AND (n.provider IS NULL OR n.provider = d.provider));
