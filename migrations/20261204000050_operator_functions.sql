-- Operator actions the database itself enforces (issue #18, DESIGN §4, §8).
--
-- 1. The state machine, whoever writes. `job_state_transitions` lists every (from, to) pair
--    of shared/src/state.rs TRANSITIONS (a test compares the two: worker/tests/roles.rs), and
--    a trigger refuses any UPDATE that changes `jobs.state` to a pair not listed, for every
--    role, the schema owner included. A new transition in state.rs needs a migration that
--    adds its pair; the test fails until it exists.
--
-- 2. What refundctl does (replay, resolve, correct; filing, approving and rejecting a
--    four-eyes request; explaining a case) are SECURITY DEFINER functions owned by the schema
--    owner, `operator_*` below. refunds_operator keeps SELECT on everything and EXECUTE on
--    these, nothing else: with its credentials alone no job, ledger entry, event, order
--    amount, case or audit row can be written except as one whole action, checked and audited
--    in one transaction. Every audit row these functions write carries the database's
--    `session_user` (the refunds_stamp_db_user trigger of migration 0030: inside a SECURITY
--    DEFINER function current_user is the owner, session_user stays who logged in) beside the
--    operator's own name.
--
--    Where the rules live: the decisions moved here, and the Rust copies were deleted
--    (shared/src/store/jobs/manual.rs and correct.rs now only call these functions and read
--    their verdict). A function that re-checked under lock what Rust had decided would keep
--    two copies of every rule (which refusals exist, in which order, with which text) that
--    could drift; the point of the change is that the database's copy is the one that holds,
--    so it is the only one. `refundctl dlq replay --dry-run` asks the same function
--    (operator_replay_refusal) that the replay itself applies under the row lock.
--
--    Each function pins search_path (to this schema, then pg_temp, as PostgreSQL's docs
--    require for SECURITY DEFINER, so that no object a caller creates can stand in for one of
--    ours), and EXECUTE is revoked from PUBLIC on all of them. The internal steps
--    (operator_step_*) are executable by their owner only: they run inside an action, never
--    alone.
--
--    What the database cannot know stays the caller's: the business time zone and the quiet
--    time after a worker's lease are arguments (refundctl passes its config), and whether a
--    second person is required is refundctl's `[operator] approvals_required`: operator_resolve
--    and operator_correct (the one-person path) are executable by the operator role.
--
-- 3. The reconciler cannot rewrite past runs: a finished run (status other than `running`) is
--    fixed except for being superseded once (superseded_by NULL -> a later run), by a trigger;
--    its totals and discrepancies lose UPDATE (the reconciler only inserts them).

-- 1 ---------------------------------------------------------------------------------------
CREATE TABLE job_state_transitions (
    from_state text NOT NULL,
    to_state   text NOT NULL,
    PRIMARY KEY (from_state, to_state)
);
INSERT INTO job_state_transitions (from_state, to_state) VALUES
    ('received', 'in_flight'), ('retry_wait', 'in_flight'),
    ('in_flight', 'succeeded'), ('in_flight', 'accepted'), ('in_flight', 'failed'),
    ('in_flight', 'dead'), ('in_flight', 'retry_wait'),
    ('accepted', 'succeeded'), ('accepted', 'failed'), ('accepted', 'dead'),
    ('retry_wait', 'succeeded'), ('retry_wait', 'failed'), ('retry_wait', 'dead'),
    ('retry_wait', 'accepted'),
    ('dead', 'succeeded'), ('dead', 'failed'), ('dead', 'dead'), ('dead', 'accepted'),
    ('dead', 'received'),
    ('received', 'succeeded'), ('received', 'failed'), ('received', 'dead'),
    ('failed', 'succeeded'), ('succeeded', 'failed'), ('succeeded', 'succeeded');
GRANT SELECT ON job_state_transitions TO refunds_worker, refunds_reconciler, refunds_operator;

CREATE FUNCTION refunds_check_state_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM job_state_transitions
                   WHERE from_state = OLD.state AND to_state = NEW.state) THEN
        RAISE EXCEPTION 'jobs: % -> % is not a transition of the state machine (refund_no %)',
            OLD.state, NEW.state, OLD.refund_no
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_state_machine BEFORE UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION refunds_check_state_change();

-- 2: steps --------------------------------------------------------------------------------

-- One audit row (db_user is stamped by the table's trigger).
CREATE FUNCTION operator_step_audit(p_refund_no text, p_action text, p_result text,
    p_operator text, p_note text, p_prior text, p_new_state text, p_reason text, p_detail jsonb)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO operator_audit (refund_no, action, result, operator, note, prior_state,
        new_state, reason, detail)
    VALUES (p_refund_no, p_action, p_result, p_operator, p_note, p_prior, p_new_state,
        p_reason, p_detail);
$$;

-- An operator's transition of a job locked in p_from, with its history row (the same columns
-- as shared::store::jobs::transition writes for a change with no cause, lease or retry).
CREATE FUNCTION operator_step_transition(p_refund_no text, p_from text, p_to text,
    p_actor text, p_code text, p_message text, p_settle bigint, p_detail jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE jobs SET state = p_to, cause = NULL, lease_until = NULL, next_attempt_at = NULL,
           last_code = p_code, last_message = p_message,
           settlement_refund_fee = COALESCE(p_settle, settlement_refund_fee),
           updated_at = now()
    WHERE refund_no = p_refund_no AND state = p_from;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n <> 1 THEN
        RAISE EXCEPTION 'job % changed under its row lock', p_refund_no;
    END IF;
    INSERT INTO job_transitions (refund_no, from_state, to_state, attempt, actor, cause, detail)
    SELECT refund_no, p_from, p_to, attempt, p_actor, NULL, p_detail
    FROM jobs WHERE refund_no = p_refund_no;
END $$;

-- An instant as shared::events::format_time writes it: RFC 3339, milliseconds, the offset
-- of time zone p_tz (2026-11-21T10:00:03.123+08:00).
CREATE FUNCTION operator_step_format_time(p_at timestamptz, p_tz text)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT to_char(p_at AT TIME ZONE p_tz, 'YYYY-MM-DD"T"HH24:MI:SS.MS')
        || CASE WHEN off < interval '0' THEN '-' ELSE '+' END
        || to_char(CASE WHEN off < interval '0' THEN -off ELSE off END, 'HH24:MI')
    FROM (SELECT (p_at AT TIME ZONE p_tz) - (p_at AT TIME ZONE 'UTC') AS off) o;
$$;

-- The outcome event of an operator's transition, in the outbox: the shape of
-- shared::events::OutcomeEvent, with p_message in place of the operator's note.
CREATE FUNCTION operator_step_event(p_kind text, p_refund_no text, p_message text, p_tz text)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO outbox (routing_key, refund_no, payload)
    SELECT p_kind, j.refund_no, jsonb_build_object(
        'version', 1,
        'event_id', gen_random_uuid()::text,
        'event', p_kind,
        'refund_no', j.refund_no,
        'order_no', j.order_no,
        'provider', j.provider,
        'merchant', j.merchant,
        'state', j.state,
        'refund_fee', j.refund_fee,
        'settlement_refund_fee', CASE WHEN j.state = 'succeeded' THEN j.settlement_refund_fee END,
        'provider_refund_id', CASE WHEN j.state = 'succeeded' THEN j.provider_refund_id END,
        'error_code', CASE WHEN j.state <> 'succeeded' THEN j.last_code END,
        'error_message', CASE WHEN j.state <> 'succeeded' THEN p_message END,
        'field', NULL,
        'cause', CASE WHEN j.state = 'dead' THEN j.cause END,
        'attempts', j.attempt,
        'occurred_at', operator_step_format_time(now(), p_tz))
    FROM jobs j WHERE j.refund_no = p_refund_no;
$$;

-- Why a dead job may not be replayed, if it may not (NULL: it may): final jobs never are,
-- nor jobs whose outcome is unknown at a merchant that does not deduplicate on refund_no
-- (as recorded on the job), unless the provider's statements showed its current attempt
-- unpaid.
CREATE FUNCTION operator_replay_refusal(p_state text, p_cause text, p_idempotent boolean,
    p_not_paid_per_statement boolean)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_state <> 'dead' THEN
            format('job is %s, not dead: only dead jobs are replayed', p_state)
        WHEN p_cause = 'outcome_unknown' AND NOT p_idempotent AND NOT p_not_paid_per_statement THEN
            'outcome unknown at a merchant that is not idempotent: the provider may have paid; '
            'check with the provider and use `refundctl job resolve`, or wait for the '
            'statements of the attempt''s day and the next to show it unpaid'
    END;
$$;

-- Resolves a dead job by hand (see operator_resolve).
CREATE FUNCTION operator_step_resolve(p_refund_no text, p_outcome text, p_settle bigint,
    p_quiet_ms bigint, p_tz text, p_operator text, p_note text,
    OUT verdict text, OUT prior text, OUT reason text)
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
    paid_evidence boolean;
    accepted_fees bigint[];
    quiet_until timestamptz;
BEGIN
    IF p_outcome NOT IN ('succeeded', 'failed') OR ((p_outcome = 'succeeded') <> (p_settle IS NOT NULL)) THEN
        RAISE EXCEPTION 'resolve: % with settlement fee % is not a resolution', p_outcome, p_settle;
    END IF;
    SELECT * INTO j FROM jobs WHERE refund_no = p_refund_no FOR UPDATE;
    IF NOT FOUND THEN
        reason := 'no such job';
    ELSIF j.state <> 'dead' THEN
        reason := format('job is %s, not dead: only dead jobs are resolved by hand', j.state);
    END IF;
    prior := j.state;
    IF reason IS NULL THEN
        SELECT EXISTS (SELECT 1 FROM provider_attempts a WHERE a.refund_no = j.refund_no
                         AND a.outcome IN ('accepted', 'unrecognised')),
               ARRAY(SELECT DISTINCT a.settlement_refund_fee FROM provider_attempts a
                     WHERE a.refund_no = j.refund_no AND a.outcome = 'accepted'
                       AND a.settlement_refund_fee IS NOT NULL),
               CASE WHEN j.attempt > 0
                     AND NOT EXISTS (SELECT 1 FROM provider_attempts a
                                     WHERE a.refund_no = j.refund_no AND a.attempt = j.attempt)
                     AND j.last_lease_until + p_quiet_ms * interval '1 millisecond' > now()
                    THEN j.last_lease_until + p_quiet_ms * interval '1 millisecond' END
          INTO paid_evidence, accepted_fees, quiet_until;
        IF quiet_until IS NOT NULL THEN
            reason := format('the last attempt''s worker may still send until %s (its lease, '
                'the HTTP timeout and a margin); resolve after that',
                to_char(quiet_until AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'));
        ELSIF p_settle IS NULL AND paid_evidence THEN
            reason := 'an attempt was accepted or answered with an unrecognised result: the '
                'provider may have paid, so it cannot be resolved as failed; check with the provider';
        ELSIF p_settle IS NOT NULL AND (p_settle < 0 OR p_settle > j.refund_fee) THEN
            reason := format('settlement fee %s must be between 0 and the refund fee %s',
                p_settle, j.refund_fee);
        ELSIF p_settle IS NOT NULL AND cardinality(accepted_fees) > 0
              AND NOT p_settle = ANY (accepted_fees) THEN
            reason := format('settlement fee %s disagrees with what the provider accepted (%s)',
                p_settle, array_to_string(accepted_fees, ', '));
        END IF;
    END IF;
    IF reason IS NOT NULL THEN
        PERFORM operator_step_audit(p_refund_no, 'resolve', 'refused', p_operator, p_note,
            prior, p_outcome, reason, NULL);
        verdict := 'refused';
        RETURN;
    END IF;
    PERFORM operator_step_transition(p_refund_no, 'dead', p_outcome, 'operator:' || p_operator,
        'MANUAL', p_note, p_settle, jsonb_build_object('note', p_note));
    IF p_settle IS NOT NULL THEN
        INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
            refund_fee, settlement_refund_fee, business_date, source)
        SELECT refund_no, 'refund', provider, merchant, provider_refund_id, refund_fee,
            p_settle, (now() AT TIME ZONE p_tz)::date, 'manual'
        FROM jobs WHERE refund_no = p_refund_no;
    ELSE
        UPDATE orders SET committed_fee = committed_fee - j.refund_fee
        WHERE order_no = j.order_no;
    END IF;
    -- The note is for operators; order systems get a fixed text.
    PERFORM operator_step_event('refund.resolved', p_refund_no,
        'resolved by an operator after checking with the provider', p_tz);
    DELETE FROM status_queries WHERE refund_no = p_refund_no;
    PERFORM operator_step_audit(p_refund_no, 'resolve', 'resolved', p_operator, p_note,
        'dead', p_outcome, NULL,
        CASE WHEN p_settle IS NOT NULL THEN jsonb_build_object('settlement_refund_fee', p_settle) END);
    verdict := 'done';
END $$;

-- Corrects a final job's booking (see operator_correct).
CREATE FUNCTION operator_step_correct(p_refund_no text, p_outcome text, p_settle bigint,
    p_tz text, p_operator text, p_note text,
    OUT verdict text, OUT prior text, OUT reason text)
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
    live ledger%ROWTYPE;
    reversal_id bigint;
    booking_id bigint;
    v_rebooks bigint;
    book_date date;
    closed bigint[];
    n integer;
BEGIN
    IF p_outcome NOT IN ('succeeded', 'failed') OR ((p_outcome = 'succeeded') <> (p_settle IS NOT NULL)) THEN
        RAISE EXCEPTION 'correct: % with settlement fee % is not a correction', p_outcome, p_settle;
    END IF;
    SELECT * INTO j FROM jobs WHERE refund_no = p_refund_no FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM operator_step_audit(p_refund_no, 'correct', 'refused', p_operator, p_note,
            NULL, p_outcome, 'no such job', NULL);
        verdict := 'refused';
        reason := 'no such job';
        RETURN;
    END IF;
    prior := j.state;
    -- The refund's live booking: a positive entry no reversal cancels.
    SELECT e.* INTO live FROM ledger e
    WHERE e.refund_no = p_refund_no AND e.refund_fee > 0
      AND NOT EXISTS (SELECT 1 FROM ledger r WHERE r.reverses = e.id)
    ORDER BY e.id DESC LIMIT 1;
    reason := CASE
        WHEN j.state = 'rejected' THEN
            'job is rejected: it never reached a provider, so there is no booking to correct'
        WHEN j.state = 'dead' THEN
            'job is dead, not final: settle it with `refundctl job resolve`'
        WHEN j.state NOT IN ('succeeded', 'failed') THEN
            format('job is %s, not final: only a final job''s booking is corrected', j.state)
        WHEN j.state = 'failed' AND p_outcome = 'failed' THEN
            'job is failed already: nothing to correct'
        WHEN p_settle IS NOT NULL AND (p_settle < 0 OR p_settle > j.refund_fee) THEN
            format('settlement fee %s must be between 0 and the refund fee %s', p_settle, j.refund_fee)
        WHEN j.state = 'succeeded' AND p_outcome = 'succeeded' AND live.id IS NOT NULL
             AND live.settlement_refund_fee = p_settle THEN
            format('job is booked with settlement fee %s already: nothing to correct', p_settle)
        WHEN j.state = 'succeeded' AND live.id IS NULL THEN
            'job is succeeded but the ledger has no live booking of it to reverse; look at its '
            'ledger entries'
        WHEN j.state = 'failed' AND live.id IS NOT NULL THEN
            format('job is failed but ledger entry %s books it; look at its ledger entries', live.id)
    END;
    -- Before anything is written: a refund paid after all needs its amount on the order again.
    IF reason IS NULL AND j.state = 'failed' THEN
        UPDATE orders SET committed_fee = committed_fee + j.refund_fee
        WHERE order_no = j.order_no AND committed_fee + j.refund_fee <= total_fee;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n <> 1 THEN
            reason := format('order %s''s other refunds leave no room for this refund''s %s fen; '
                'correct them first', j.order_no, j.refund_fee);
        END IF;
    END IF;
    IF reason IS NOT NULL THEN
        PERFORM operator_step_audit(p_refund_no, 'correct', 'refused', p_operator, p_note,
            prior, p_outcome, reason, NULL);
        verdict := 'refused';
        RETURN;
    END IF;
    PERFORM operator_step_transition(p_refund_no, j.state, p_outcome, 'operator:' || p_operator,
        'CORRECTED', p_note, p_settle, jsonb_build_object('evidence', p_note));
    -- Entries carry the business date of what they put right (see migration 0030 and
    -- shared/src/store/jobs/correct.rs).
    IF live.id IS NOT NULL THEN
        INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
            refund_fee, settlement_refund_fee, business_date, source, reverses)
        VALUES (p_refund_no, 'reversal', j.provider, j.merchant, live.provider_refund_id,
            -live.refund_fee, -live.settlement_refund_fee, live.business_date, 'manual', live.id)
        RETURNING id INTO reversal_id;
    END IF;
    IF p_settle IS NOT NULL THEN
        IF reversal_id IS NOT NULL THEN
            v_rebooks := reversal_id;
            book_date := live.business_date;
        ELSE
            SELECT r.id, r.business_date INTO v_rebooks, book_date FROM ledger r
            WHERE r.refund_no = p_refund_no AND r.entry_kind = 'reversal'
              AND NOT EXISTS (SELECT 1 FROM ledger x WHERE x.rebooks = r.id)
            ORDER BY r.id DESC LIMIT 1;
            IF v_rebooks IS NULL THEN
                SELECT coalesce(max(business_date), (now() AT TIME ZONE p_tz)::date)
                  INTO book_date FROM reconciliation_cases
                WHERE refund_no = p_refund_no AND state = 'open' AND kind = 'missing_in_ledger';
            END IF;
        END IF;
        INSERT INTO ledger (refund_no, entry_kind, provider, merchant, provider_refund_id,
            refund_fee, settlement_refund_fee, business_date, source, rebooks)
        SELECT refund_no, 'refund', provider, merchant, provider_refund_id, refund_fee,
            p_settle, book_date, 'manual', v_rebooks
        FROM jobs WHERE refund_no = p_refund_no
        RETURNING id INTO booking_id;
    ELSE
        UPDATE orders SET committed_fee = committed_fee - j.refund_fee
        WHERE order_no = j.order_no;
    END IF;
    -- The evidence is for operators; order systems get a fixed text.
    PERFORM operator_step_event('refund.corrected', p_refund_no,
        'booking corrected by an operator with the provider''s evidence', p_tz);
    IF p_settle IS NULL THEN
        -- A failed job shows no settlement (what was paid is now reversed in the ledger).
        UPDATE jobs SET settlement_refund_fee = NULL WHERE refund_no = p_refund_no;
    END IF;
    WITH c AS (
        UPDATE reconciliation_cases SET state = 'corrected', closed_at = now(),
            closed_by = p_operator, close_note = p_note
        WHERE refund_no = p_refund_no AND state = 'open'
        RETURNING id
    )
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO closed FROM c;
    PERFORM operator_step_audit(p_refund_no, 'correct', 'corrected', p_operator, p_note,
        prior, p_outcome, NULL, jsonb_build_object(
            'settlement_refund_fee', p_settle,
            'previous_settlement_refund_fee', live.settlement_refund_fee,
            'reversal_entry', reversal_id,
            'booking_entry', booking_id,
            'cases_corrected', to_jsonb(closed)));
    verdict := 'done';
END $$;

-- Applies a resolution or a correction.
CREATE FUNCTION operator_step_apply(p_action text, p_refund_no text, p_outcome text,
    p_settle bigint, p_quiet_ms bigint, p_tz text, p_operator text, p_note text,
    OUT verdict text, OUT prior text, OUT reason text)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_action = 'resolve' THEN
        SELECT * INTO verdict, prior, reason FROM operator_step_resolve(p_refund_no, p_outcome,
            p_settle, p_quiet_ms, p_tz, p_operator, p_note);
    ELSIF p_action = 'correct' THEN
        SELECT * INTO verdict, prior, reason FROM operator_step_correct(p_refund_no, p_outcome,
            p_settle, p_tz, p_operator, p_note);
    ELSE
        RAISE EXCEPTION 'unknown operator action %', p_action;
    END IF;
END $$;

-- 2: actions ------------------------------------------------------------------------------
-- Each returns verdict ('done' or 'refused'; see each for more), the job's state before and
-- the reason of a refusal. A refusal writes its audit row and nothing else.

-- Replays a dead job (back to received, same refund_no), re-checked under its row lock.
CREATE FUNCTION operator_replay(p_refund_no text, p_operator text, p_note text,
    OUT verdict text, OUT prior text, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    j jobs%ROWTYPE;
    not_paid boolean;
BEGIN
    SELECT * INTO j FROM jobs WHERE refund_no = p_refund_no FOR UPDATE;
    IF NOT FOUND THEN
        reason := 'no such job';
    ELSE
        prior := j.state;
        SELECT EXISTS (SELECT 1 FROM statement_verdicts v
                       WHERE v.refund_no = p_refund_no AND v.verdict = 'not_paid'
                         AND v.attempt = j.attempt)
          INTO not_paid;
        -- The job's own record of its merchant, never a config's.
        reason := operator_replay_refusal(j.state, j.cause, coalesce(j.idempotent, false),
            not_paid);
    END IF;
    IF reason IS NOT NULL THEN
        PERFORM operator_step_audit(p_refund_no, 'replay', 'refused', p_operator, p_note,
            prior, NULL, reason, NULL);
        verdict := 'refused';
        RETURN;
    END IF;
    PERFORM operator_step_transition(p_refund_no, 'dead', 'received', 'operator:' || p_operator,
        NULL, NULL, NULL, jsonb_build_object('note', p_note, 'cause', j.cause));
    UPDATE jobs SET retry_base = attempt, retry_since = now() WHERE refund_no = p_refund_no;
    -- Sent again: whatever the query schedule waited for is now the new attempt's to answer.
    DELETE FROM status_queries WHERE refund_no = p_refund_no;
    PERFORM operator_step_audit(p_refund_no, 'replay', 'replayed', p_operator, p_note,
        prior, 'received', NULL, NULL);
    verdict := 'done';
END $$;

-- Resolves a dead job by hand after checking with the provider: ledger entry (source manual)
-- or the order's amount released, refund.resolved, audit. Refused while the last attempt's
-- worker may still send (its lease plus p_quiet_ms, when it recorded no answer), as failed
-- when an attempt was accepted or unrecognised, and as succeeded with a settlement fee out of
-- range or other than an accepted attempt's.
CREATE FUNCTION operator_resolve(p_refund_no text, p_outcome text, p_settle bigint,
    p_quiet_ms bigint, p_tz text, p_operator text, p_note text,
    OUT verdict text, OUT prior text, OUT reason text)
LANGUAGE sql SECURITY DEFINER AS $$
    SELECT * FROM operator_step_resolve(p_refund_no, p_outcome, p_settle, p_quiet_ms, p_tz,
        p_operator, p_note);
$$;

-- Corrects a final job's booking with the provider's evidence (p_note): reversal and new
-- booking in the ledger, the order's reserved amount moved, refund.corrected, the refund's
-- open cases closed as corrected, audit.
CREATE FUNCTION operator_correct(p_refund_no text, p_outcome text, p_settle bigint,
    p_tz text, p_operator text, p_note text,
    OUT verdict text, OUT prior text, OUT reason text)
LANGUAGE sql SECURITY DEFINER AS $$
    SELECT * FROM operator_step_correct(p_refund_no, p_outcome, p_settle, p_tz, p_operator,
        p_note);
$$;

-- Files a four-eyes request for a resolution or correction: verdict 'requested' (with its
-- id) when applying it now would be done (tried, then rolled back), else 'refused' with the
-- reason the action would give, or because the refund has a pending request.
CREATE FUNCTION operator_request(p_action text, p_refund_no text, p_outcome text,
    p_settle bigint, p_quiet_ms bigint, p_tz text, p_operator text, p_note text,
    OUT verdict text, OUT request_id bigint, OUT prior text, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    pending bigint;
    trial record;
BEGIN
    SELECT id INTO pending FROM approval_requests
    WHERE refund_no = p_refund_no AND state = 'pending';
    IF pending IS NOT NULL THEN
        reason := format('approval request %s for this refund is pending: approve or reject it first',
            pending);
    ELSE
        -- Applied in a subtransaction that the raise rolls back; the variables keep the verdict.
        BEGIN
            SELECT * INTO trial FROM operator_step_apply(p_action, p_refund_no, p_outcome,
                p_settle, p_quiet_ms, p_tz, p_operator, p_note);
            RAISE EXCEPTION 'trial' USING ERRCODE = 'RF001';
        EXCEPTION WHEN SQLSTATE 'RF001' THEN
            NULL;
        END;
        prior := trial.prior;
        reason := trial.reason;
    END IF;
    IF reason IS NOT NULL THEN
        PERFORM operator_step_audit(p_refund_no, p_action || '_request', 'refused', p_operator,
            p_note, prior, p_outcome, reason, NULL);
        verdict := 'refused';
        RETURN;
    END IF;
    INSERT INTO approval_requests (action, refund_no, outcome, settlement_refund_fee, note,
        requested_by)
    VALUES (p_action, p_refund_no, p_outcome, p_settle, p_note, p_operator)
    RETURNING id INTO request_id;
    PERFORM operator_step_audit(p_refund_no, p_action || '_request', 'requested', p_operator,
        p_note, prior, p_outcome, NULL,
        jsonb_build_object('request_id', request_id, 'settlement_refund_fee', p_settle));
    verdict := 'requested';
END $$;

-- Approves request p_id as p_approver and applies its action as its requester asked it:
-- verdict 'applied' (prior: the job's state before), 'action_refused' (the action was
-- refused when applied; the request is closed as refused), 'refused' (not pending, or the
-- approver is the requester) or 'not_found'.
CREATE FUNCTION operator_approve(p_id bigint, p_approver text, p_quiet_ms bigint, p_tz text,
    OUT verdict text, OUT prior text, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    r approval_requests%ROWTYPE;
    v_note text := format('approval of request %s', p_id);
    applied record;
BEGIN
    SELECT * INTO r FROM approval_requests WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        verdict := 'not_found';
        RETURN;
    END IF;
    IF r.state <> 'pending' THEN
        reason := format('approval request %s is %s, not pending', r.id, r.state);
    ELSIF r.requested_by = p_approver THEN
        reason := format('%s requested it: a second, different operator must approve it',
            p_approver);
    END IF;
    IF reason IS NOT NULL THEN
        PERFORM operator_step_audit(r.refund_no, 'approve', 'refused', p_approver, v_note, NULL,
            NULL, reason, jsonb_build_object('request_id', r.id, 'action', r.action));
        verdict := 'refused';
        RETURN;
    END IF;
    SELECT * INTO applied FROM operator_step_apply(r.action, r.refund_no, r.outcome,
        r.settlement_refund_fee, p_quiet_ms, p_tz, r.requested_by, r.note);
    UPDATE approval_requests
    SET state = CASE WHEN applied.verdict = 'done' THEN 'applied' ELSE 'refused' END,
        decided_by = p_approver, decided_at = now(), decision_note = NULL,
        refusal = applied.reason
    WHERE id = p_id;
    PERFORM operator_step_audit(r.refund_no, 'approve',
        CASE WHEN applied.verdict = 'done' THEN 'approved' ELSE 'approved_refused' END,
        p_approver, v_note, NULL, r.outcome, applied.reason,
        jsonb_build_object('request_id', p_id, 'action', r.action,
            'requested_by', r.requested_by));
    IF applied.verdict = 'done' THEN
        verdict := 'applied';
        prior := applied.prior;
    ELSE
        verdict := 'action_refused';
        reason := applied.reason;
    END IF;
END $$;

-- Rejects request p_id (its requester may withdraw it this way): verdict 'rejected',
-- 'refused' (not pending) or 'not_found'.
CREATE FUNCTION operator_reject(p_id bigint, p_operator text, p_note text,
    OUT verdict text, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    r approval_requests%ROWTYPE;
BEGIN
    SELECT * INTO r FROM approval_requests WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        verdict := 'not_found';
        RETURN;
    END IF;
    IF r.state <> 'pending' THEN
        reason := format('approval request %s is %s, not pending', r.id, r.state);
        PERFORM operator_step_audit(r.refund_no, 'reject', 'refused', p_operator, p_note, NULL,
            NULL, reason, jsonb_build_object('request_id', r.id, 'action', r.action));
        verdict := 'refused';
        RETURN;
    END IF;
    UPDATE approval_requests SET state = 'rejected', decided_by = p_operator,
        decided_at = now(), decision_note = p_note, refusal = NULL
    WHERE id = p_id;
    PERFORM operator_step_audit(r.refund_no, 'reject', 'rejected', p_operator, p_note, NULL,
        NULL, NULL, jsonb_build_object('request_id', p_id, 'action', r.action,
            'requested_by', r.requested_by));
    verdict := 'rejected';
END $$;

-- Marks an open reconciliation case explained with the operator's note: verdict 'done',
-- 'refused' (not open) or 'not_found'.
CREATE FUNCTION operator_case_explain(p_case_id bigint, p_operator text, p_note text,
    OUT verdict text, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    c reconciliation_cases%ROWTYPE;
    audited_refund text;
    v_detail jsonb;
BEGIN
    SELECT * INTO c FROM reconciliation_cases WHERE id = p_case_id FOR UPDATE;
    IF NOT FOUND THEN
        verdict := 'not_found';
        RETURN;
    END IF;
    -- statement_missing names no refund: its audit row names none either.
    audited_refund := nullif(c.refund_no, '');
    v_detail := jsonb_build_object('case_id', p_case_id, 'case_state', c.state);
    IF c.state <> 'open' THEN
        reason := format('case %s is %s, not open: only open cases are explained', p_case_id,
            c.state);
        PERFORM operator_step_audit(audited_refund, 'case_explain', 'refused', p_operator,
            p_note, NULL, NULL, reason, v_detail);
        verdict := 'refused';
        RETURN;
    END IF;
    UPDATE reconciliation_cases SET state = 'explained', closed_at = now(),
        closed_by = p_operator, close_note = p_note
    WHERE id = p_case_id;
    PERFORM operator_step_audit(audited_refund, 'case_explain', 'explained', p_operator, p_note,
        NULL, NULL, NULL, v_detail);
    verdict := 'done';
END $$;

-- Pinned search_path, and EXECUTE for the operator on the actions only.
DO $pin$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema()
          AND (p.proname LIKE 'operator\_%' OR p.proname = 'refunds_check_state_change')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$pin$;
GRANT EXECUTE ON FUNCTION
    operator_replay_refusal(text, text, boolean, boolean),
    operator_replay(text, text, text),
    operator_resolve(text, text, bigint, bigint, text, text, text),
    operator_correct(text, text, bigint, text, text, text),
    operator_request(text, text, text, bigint, bigint, text, text, text),
    operator_approve(bigint, text, bigint, text),
    operator_reject(bigint, text, text),
    operator_case_explain(bigint, text, text)
TO refunds_operator;
-- The trigger function runs as whoever updates jobs.
GRANT EXECUTE ON FUNCTION refunds_check_state_change() TO refunds_worker, refunds_reconciler,
    refunds_operator;

-- SELECT and EXECUTE only: every write right refunds_operator had (roles migration, 0010,
-- 0030) goes.
DO $revoke$
BEGIN
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON ALL TABLES IN SCHEMA %I FROM refunds_operator',
                   current_schema());
    EXECUTE format('REVOKE USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA %I FROM refunds_operator',
                   current_schema());
END
$revoke$;

-- 3 ---------------------------------------------------------------------------------------
CREATE FUNCTION refunds_runs_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'running' THEN
        RETURN NEW;
    END IF;
    IF OLD.superseded_by IS NULL AND NEW.superseded_by IS NOT NULL
       AND (to_jsonb(NEW) - 'superseded_by') = (to_jsonb(OLD) - 'superseded_by') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'reconciliation run % is finished: only its superseded_by is set, once', OLD.id
        USING ERRCODE = 'check_violation';
END $$;
ALTER FUNCTION refunds_runs_fixed() SET search_path = pg_catalog, pg_temp;
CREATE TRIGGER reconciliation_runs_fixed BEFORE UPDATE ON reconciliation_runs
    FOR EACH ROW EXECUTE FUNCTION refunds_runs_fixed();
REVOKE UPDATE ON reconciliation_totals, reconciliation_discrepancies FROM refunds_reconciler;
