-- Provider-confirmed finality (issue #16): state `accepted`, what ShengPay's notify and status
-- query said, and the schedule of queries.
--
-- accepted: the provider took the refund and has not said how it ended (ShengPay answers
--   `resultCode SUCCESS` on the refund call before it processes the refund). The job leaves it
--   by the provider's notify or status query, never by another refund call.
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
-- NOT VALID, then VALIDATE: the new list only widens the old one, and validating under the
-- weaker lock does not block transitions while a large table is checked.
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('received', 'in_flight', 'accepted', 'retry_wait',
                     'succeeded', 'failed', 'rejected', 'dead')) NOT VALID;
ALTER TABLE jobs VALIDATE CONSTRAINT jobs_state_check;

-- The schedule of status queries, one row per job that is waiting for the provider's end: an
-- accepted job, or a ShengPay job dead with outcome_unknown (the query may show it was paid, or
-- that it never reached the provider). A table of its own, not columns on `jobs`: an index on
-- the due time there would make every transition of every job a non-HOT update (see the note
-- on `jobs` in the first migration). Rows are added with the transition to accepted and by the
-- sweeper for dead jobs, and removed when the job's end is known or the schedule gives up.
--
-- since: when the wait began (the schedule's clock: delays count from here, and it gives up
--   `give_up_after_ms` after it). queries: how many were answered or failed so far.
-- lease_until: a worker is querying; others skip the row until then (SKIP LOCKED claims).
CREATE TABLE status_queries (
    refund_no   text PRIMARY KEY REFERENCES jobs (refund_no),
    provider    text NOT NULL,
    merchant    text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    next_at     timestamptz NOT NULL,
    queries     integer NOT NULL DEFAULT 0 CHECK (queries >= 0),
    lease_until timestamptz,
    last_status text,
    last_error  text
);
CREATE INDEX status_queries_due ON status_queries (next_at);

-- Every verified notify, as it came (the evidence), with what applying it did. Unverified ones
-- are refused with a non-2xx answer and not stored: storing them would let anyone who can reach
-- the listener fill the table.
CREATE TABLE provider_notifications (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    provider     text NOT NULL,
    merchant     text NOT NULL,
    refund_no    text NOT NULL REFERENCES jobs (refund_no),
    status       text NOT NULL,
    body         text NOT NULL,
    body_sha256  text NOT NULL,
    -- applied: moved the job; no_change: the job was already there or further (a duplicate, a
    -- notify that arrived after a more final one).
    effect       text NOT NULL CHECK (effect IN ('applied', 'no_change'))
);
CREATE INDEX provider_notifications_refund_no ON provider_notifications (refund_no, id);
CREATE TRIGGER provider_notifications_append_only BEFORE UPDATE OR DELETE ON provider_notifications
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();

GRANT SELECT, INSERT, UPDATE, DELETE ON status_queries TO refunds_worker;
GRANT SELECT, INSERT ON provider_notifications TO refunds_worker;
GRANT USAGE, SELECT ON SEQUENCE provider_notifications_id_seq TO refunds_worker;
GRANT SELECT ON status_queries, provider_notifications TO refunds_operator;
-- An operator's resolution or replay of a job ends its wait for the provider.
GRANT DELETE ON status_queries TO refunds_operator;
