-- What every later decision about a job must read from the job itself, not from whichever
-- process happens to decide (issue #14).
--
-- idempotent: whether the job's merchant deduplicates on refund_no, as configured when the job
--   was created. Worker, sweeper and replay read this, never their own config, so a stale
--   refundctl config cannot replay an outcome_unknown job at a merchant that does not
--   deduplicate. Jobs from before this migration are filled in from their merchant's current
--   config by the first worker or `refundctl migrate` that starts with this build
--   (store::jobs::backfill_idempotent); until then NULL reads as false, the side that never
--   resends.
--
-- maybe_paid: an attempt of this job may have paid (an answer that was maybe delivered,
--   unrecognised or accepted, fenced or not; a lease that ran out mid-call). Sticky: once
--   true it stays true. A later definitive decline then cannot free the order amount, and a
--   dead job says outcome_unknown whatever its last attempt was.
--
-- claim_token: the claim statement that took the job to in_flight, so a worker whose claim
--   reply was lost can find the rows it claimed and give back the ones it never sent.
--
-- last_lease_until: when the last claim's lease ended; lease_until is cleared at the end of an
--   attempt, and manual resolution must wait until no stalled worker can still send.
ALTER TABLE jobs
    ADD COLUMN idempotent       boolean,
    ADD COLUMN maybe_paid       boolean NOT NULL DEFAULT false,
    ADD COLUMN claim_token      uuid,
    ADD COLUMN last_lease_until timestamptz;

UPDATE jobs j SET maybe_paid = true
WHERE EXISTS (SELECT 1 FROM provider_attempts a
              WHERE a.refund_no = j.refund_no
                AND a.outcome IN ('maybe_delivered', 'unrecognised', 'accepted'))
   OR j.last_code = 'LEASE_EXPIRED'
   -- An attempt that ended without an answer and without a reason (a lease expiry; before
   -- this build its history row carried no detail) may have sent.
   OR EXISTS (SELECT 1 FROM job_transitions t
              WHERE t.refund_no = j.refund_no AND t.from_state = 'in_flight'
                AND t.to_state IN ('retry_wait', 'dead') AND t.detail IS NULL);

-- The jobs still to be backfilled, found without reading the table. No transition writes
-- `idempotent`, so the index costs no HOT update; new jobs are never in it.
CREATE INDEX jobs_idempotent_unrecorded ON jobs (provider, merchant) WHERE idempotent IS NULL;

-- A stored rejection keeps at most 1 MiB of its body (the SHA-256 is of the whole body).
ALTER TABLE rejected_messages
    ADD COLUMN body_bytes bigint;
