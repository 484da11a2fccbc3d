-- Discarding dead letters (`refundctl dlq discard`, DESIGN §8; issue #18 point 4, #20).
--
-- Some dead letters will never be paid and need no one's attention again: a request an order
-- system sent by mistake and cancelled on its side, a poison message that no fix will make
-- readable. Until now nothing could take them out of the dead-letter set, so its depth (and an
-- alert on it) could never go back to zero.
--
-- A discard archives, it does not rewrite: the job stays `dead` with its history, the poison
-- message stays stored; a row here records who discarded it, when and why, and the dead-letter
-- queries leave discarded items out. It is not a resolution and moves no money: a discarded
-- job's order amount stays committed (to release it, `job resolve --as failed`, which a
-- second person approves). Refused for a job whose provider may hold the money (cause
-- outcome_unknown or refund_abnormal): that is a resolution's business, never an archive's,
-- and hiding it would hide money.
--
-- Like every operator action, a SECURITY DEFINER function that checks under the row lock and
-- writes the audit row (stamped with session_user by operator_audit's trigger) in the same
-- transaction; refunds_operator gets EXECUTE, not INSERT.

CREATE TABLE dlq_discards (
    id         bigserial PRIMARY KEY,
    refund_no  text UNIQUE REFERENCES jobs (refund_no),
    poison_id  bigint UNIQUE REFERENCES rejected_messages (id),
    operator   text NOT NULL CHECK (operator <> ''),
    note       text NOT NULL CHECK (note <> ''),
    db_user    text,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (num_nonnulls(refund_no, poison_id) = 1)
);
CREATE TRIGGER dlq_discards_db_user BEFORE INSERT ON dlq_discards
    FOR EACH ROW EXECUTE FUNCTION refunds_stamp_db_user();
CREATE TRIGGER dlq_discards_append_only BEFORE UPDATE OR DELETE ON dlq_discards
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();
GRANT SELECT ON dlq_discards TO refunds_worker, refunds_reconciler, refunds_operator;

-- Why a dead job may not be replayed: as before (migration 0050), and a discarded job is
-- archived, not waiting to be sent. The four-argument form stays, for refundctl binaries of
-- before this migration during a rolling upgrade (their dry run does not know discards; their
-- replay calls operator_replay, which does).
CREATE FUNCTION operator_replay_refusal(p_state text, p_cause text, p_idempotent boolean,
    p_not_paid_per_statement boolean, p_discarded boolean)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_state <> 'dead' THEN
            format('job is %s, not dead: only dead jobs are replayed', p_state)
        WHEN p_discarded THEN
            'job was discarded from the dead letters (refundctl job show tells by whom and why)'
        WHEN p_cause = 'outcome_unknown' AND NOT p_idempotent AND NOT p_not_paid_per_statement THEN
            'outcome unknown at a merchant that is not idempotent: the provider may have paid; '
            'check with the provider and use `refundctl job resolve`, or wait for the '
            'statements of the attempt''s day and the next to show it unpaid'
    END;
$$;

CREATE OR REPLACE FUNCTION operator_replay_refusal(p_state text, p_cause text,
    p_idempotent boolean, p_not_paid_per_statement boolean)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT operator_replay_refusal(p_state, p_cause, p_idempotent, p_not_paid_per_statement,
        false);
$$;

-- operator_replay of migration 0050, asking the rule above with the discard.
CREATE OR REPLACE FUNCTION operator_replay(p_refund_no text, p_operator text, p_note text,
    OUT verdict text, OUT prior text, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    j jobs%ROWTYPE;
    not_paid boolean;
    discarded boolean;
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
        SELECT EXISTS (SELECT 1 FROM dlq_discards d WHERE d.refund_no = p_refund_no)
          INTO discarded;
        -- The job's own record of its merchant, never a config's.
        reason := operator_replay_refusal(j.state, j.cause, coalesce(j.idempotent, false),
            not_paid, discarded);
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

-- Discards a dead job from the dead letters: verdict 'done' or 'refused' (with the reason;
-- the refusal is audited too), and the job's state.
CREATE FUNCTION operator_discard_job(p_refund_no text, p_operator text, p_note text,
    OUT verdict text, OUT prior text, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    j jobs%ROWTYPE;
    earlier dlq_discards%ROWTYPE;
BEGIN
    SELECT * INTO j FROM jobs WHERE refund_no = p_refund_no FOR UPDATE;
    IF NOT FOUND THEN
        reason := 'no such job';
    ELSE
        prior := j.state;
        SELECT * INTO earlier FROM dlq_discards WHERE refund_no = p_refund_no;
        reason := CASE
            WHEN j.state <> 'dead' THEN
                format('job is %s, not dead: only dead jobs are discarded', j.state)
            WHEN earlier.id IS NOT NULL THEN
                format('already discarded by %s at %s', earlier.operator, earlier.at)
            WHEN j.cause IN ('outcome_unknown', 'refund_abnormal') THEN
                format('cause %s: the provider may hold the money, so this is settled with '
                       '`refundctl job resolve`, not archived', j.cause)
        END;
    END IF;
    IF reason IS NOT NULL THEN
        PERFORM operator_step_audit(p_refund_no, 'discard', 'refused', p_operator, p_note,
            prior, NULL, reason, NULL);
        verdict := 'refused';
        RETURN;
    END IF;
    INSERT INTO dlq_discards (refund_no, operator, note) VALUES (p_refund_no, p_operator, p_note);
    PERFORM operator_step_audit(p_refund_no, 'discard', 'discarded', p_operator, p_note,
        prior, prior, NULL, jsonb_build_object('cause', j.cause));
    verdict := 'done';
END $$;

-- Discards a stored poison message (rejected or conflicting request) from the dead letters.
CREATE FUNCTION operator_discard_poison(p_id bigint, p_operator text, p_note text,
    OUT verdict text, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    m rejected_messages%ROWTYPE;
    earlier dlq_discards%ROWTYPE;
BEGIN
    SELECT * INTO m FROM rejected_messages WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        reason := 'no such poison message';
    ELSE
        SELECT * INTO earlier FROM dlq_discards WHERE poison_id = p_id;
        IF earlier.id IS NOT NULL THEN
            reason := format('already discarded by %s at %s', earlier.operator, earlier.at);
        END IF;
    END IF;
    IF reason IS NOT NULL THEN
        PERFORM operator_step_audit(m.refund_no, 'discard_poison', 'refused', p_operator, p_note,
            NULL, NULL, reason, jsonb_build_object('poison_id', p_id));
        verdict := 'refused';
        RETURN;
    END IF;
    INSERT INTO dlq_discards (poison_id, operator, note) VALUES (p_id, p_operator, p_note);
    PERFORM operator_step_audit(m.refund_no, 'discard_poison', 'discarded', p_operator, p_note,
        NULL, NULL, NULL, jsonb_build_object('poison_id', p_id, 'kind', m.kind,
                                             'error_code', m.error_code));
    verdict := 'done';
END $$;

DO $pin$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema()
          AND p.proname IN ('operator_replay_refusal', 'operator_replay',
                            'operator_discard_job', 'operator_discard_poison')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$pin$;
GRANT EXECUTE ON FUNCTION
    operator_replay_refusal(text, text, boolean, boolean, boolean),
    operator_replay(text, text, text),
    operator_discard_job(text, text, text),
    operator_discard_poison(bigint, text, text)
TO refunds_operator;
