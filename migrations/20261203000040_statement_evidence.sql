-- The repair loop (issue #17, DESIGN §5 WuPay, §7): a WuPay job dead with outcome_unknown is
-- resolved from the provider's statements. Listed as paid: the reconciler books it through the
-- job's state machine (dead -> succeeded, detail {"source": "statement", "evidence":
-- "FILE:LINE"}), like a ShengPay status query would. Absent: the proof takes two statements
-- (the day of each attempt that may have paid, and the next, since a payment near midnight is
-- on the provider's next day), so each statement run records the absence it saw, and the
-- verdict "not paid per statement" is written only when every needed day was seen without it.
-- Both tables are append-only evidence.

-- One statement run saw no row of the refund on business_date, though the statement had rows
-- of the refund's merchant that day (a missing statement proves nothing). `attempt` is the
-- job's attempt count then: a replay starts new attempts, whose own days need their own proof.
CREATE TABLE statement_absences (
    refund_no     text NOT NULL REFERENCES jobs (refund_no),
    attempt       integer NOT NULL,
    business_date date NOT NULL,
    files         text[] NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (refund_no, attempt, business_date)
);

-- The verdict on a job's unknown outcome as of `attempt`: 'paid' (booked from the row named in
-- evidence) or 'not_paid' (absent on every day in evidence); replay may resend a WuPay job
-- with an unknown outcome only after a 'not_paid' verdict for its current attempt.
CREATE TABLE statement_verdicts (
    id          bigserial PRIMARY KEY,
    refund_no   text NOT NULL REFERENCES jobs (refund_no),
    attempt     integer NOT NULL,
    verdict     text NOT NULL CHECK (verdict IN ('paid', 'not_paid')),
    evidence    jsonb NOT NULL,
    decided_at  timestamptz NOT NULL DEFAULT now(),
    decided_by  text NOT NULL DEFAULT session_user,
    UNIQUE (refund_no, attempt, verdict)
);

-- The days each WuPay job dead with an unknown outcome needs seen without it, in time zone tz:
-- the business day of each attempt that may have paid since its last 'not_paid' verdict (a
-- replay's new attempts need their own proof), and the next day.
CREATE FUNCTION statement_needed_days(tz text)
RETURNS TABLE (refund_no text, merchant text, attempt integer, day date)
LANGUAGE sql STABLE AS $$
    WITH c AS (
        SELECT j.refund_no, j.merchant, j.attempt,
               coalesce((SELECT max(v.attempt) FROM statement_verdicts v
                         WHERE v.refund_no = j.refund_no AND v.verdict = 'not_paid'), 0)
                   AS proven
        FROM jobs j
        WHERE j.state = 'dead' AND j.cause = 'outcome_unknown' AND j.provider = 'wupay')
    SELECT DISTINCT c.refund_no, c.merchant, c.attempt,
           (a.recorded_at AT TIME ZONE tz)::date + k.k
    FROM c
    JOIN provider_attempts a ON a.refund_no = c.refund_no AND a.attempt > c.proven
     AND a.outcome IN ('maybe_delivered', 'unrecognised')
    CROSS JOIN (VALUES (0), (1)) k(k)
$$;

CREATE TRIGGER statement_absences_append_only BEFORE UPDATE OR DELETE ON statement_absences
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();
CREATE TRIGGER statement_verdicts_append_only BEFORE UPDATE OR DELETE ON statement_verdicts
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();

-- The reconciler now moves such a job (and books it, with its event) as the worker does for a
-- provider's report; it reads the attempts to know which days need proof.
GRANT SELECT, INSERT ON statement_absences, statement_verdicts TO refunds_reconciler;
GRANT USAGE, SELECT ON SEQUENCE statement_verdicts_id_seq TO refunds_reconciler;
GRANT UPDATE ON jobs, orders TO refunds_reconciler;
GRANT SELECT, INSERT ON job_transitions, ledger, outbox TO refunds_reconciler;
GRANT SELECT ON orders, status_queries TO refunds_reconciler;
GRANT DELETE ON status_queries TO refunds_reconciler;
GRANT USAGE, SELECT ON SEQUENCE job_transitions_id_seq, ledger_id_seq, outbox_id_seq
    TO refunds_reconciler;
GRANT SELECT ON statement_absences, statement_verdicts TO refunds_operator;
