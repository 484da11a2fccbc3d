-- Reconciliation cases, corrections after the fact, and four-eyes approval (issue #17,
-- DESIGN §7, §8).
--
-- 1. Who the database says did it. Operators name themselves (`--operator`), which anyone can
--    type; the database also records its own session user on every audit row, approval and
--    case decision. A BEFORE INSERT trigger sets it, so a client cannot write another name
--    there. Rows from before this migration keep NULL: who connected then is not known.

CREATE FUNCTION refunds_stamp_db_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.db_user := session_user;
    RETURN NEW;
END $$;

ALTER TABLE operator_audit ADD COLUMN db_user text;
CREATE TRIGGER operator_audit_db_user BEFORE INSERT ON operator_audit
    FOR EACH ROW EXECUTE FUNCTION refunds_stamp_db_user();

-- 2. Corrections of a booking (`refundctl job correct`) are new ledger entries, never an edit.
--
--    The ledger kept one `refund` entry per refund_no (ledger_one_refund_entry) and a reversal
--    pointing at what it reverses. A wrong settlement is corrected by a reversal and the right
--    amount, a second positive entry of the same refund: a `refund` entry that names the
--    reversal it follows (`rebooks`). Kept as entry_kind `refund` on purpose: the reconciler
--    reads a refund's positive entries as `entry_kind = 'refund'` / `refund_fee > 0` (run/sql.rs),
--    so a re-booking is counted with no change there.
--
--    What keeps a refund booked at most once, net:
--    - one original entry per refund_no (rebooks NULL), as before;
--    - every entry is reversed at most once (unique `reverses`), and only a positive entry of
--      the same refund, by at most its amounts (trigger below; a partial reversal stays
--      possible, as before);
--    - every reversal is re-booked at most once (unique `rebooks`), by an entry of the same
--      refund, and only a full reversal is (trigger below): re-booking after a partial one
--      would book more than the refund.
--    So positive entries = 1 + re-bookings <= 1 + reversals, and each re-booking follows the
--    full cancellation of a distinct positive entry: the net is at most one booking, whatever
--    the sequence of corrections.
--
--    The index keeps its name and its predicate (`entry_kind = 'refund'`), which the reconciler's
--    drill-down by refund_no uses; the second key column lets re-bookings in.
ALTER TABLE ledger ADD COLUMN rebooks bigint REFERENCES ledger (id);
ALTER TABLE ledger ADD CONSTRAINT ledger_rebooks_only_refunds
    CHECK (rebooks IS NULL OR entry_kind = 'refund');
DROP INDEX ledger_one_refund_entry;
CREATE UNIQUE INDEX ledger_one_refund_entry ON ledger (refund_no, (coalesce(rebooks, 0)))
    WHERE entry_kind = 'refund';
CREATE UNIQUE INDEX ledger_reversed_once ON ledger (reverses) WHERE reverses IS NOT NULL;
CREATE UNIQUE INDEX ledger_rebooked_once ON ledger (rebooks) WHERE rebooks IS NOT NULL;

CREATE FUNCTION refunds_ledger_links() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    target ledger%ROWTYPE;
    reversed ledger%ROWTYPE;
BEGIN
    IF NEW.reverses IS NOT NULL THEN
        SELECT * INTO target FROM ledger WHERE id = NEW.reverses;
        IF target.refund_no IS DISTINCT FROM NEW.refund_no OR target.refund_fee <= 0
           OR -NEW.refund_fee > target.refund_fee
           OR -NEW.settlement_refund_fee > target.settlement_refund_fee THEN
            RAISE EXCEPTION 'ledger: a reversal cancels at most the amounts of a refund entry of the same refund_no'
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF NEW.rebooks IS NOT NULL THEN
        SELECT * INTO target FROM ledger WHERE id = NEW.rebooks;
        SELECT * INTO reversed FROM ledger WHERE id = target.reverses;
        IF target.refund_no IS DISTINCT FROM NEW.refund_no OR target.entry_kind <> 'reversal'
           OR target.refund_fee <> -reversed.refund_fee
           OR target.settlement_refund_fee <> -reversed.settlement_refund_fee THEN
            RAISE EXCEPTION 'ledger: a re-booking follows a full reversal of the same refund_no'
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER ledger_links BEFORE INSERT ON ledger
    FOR EACH ROW EXECUTE FUNCTION refunds_ledger_links();

-- 3. Cases: each discrepancy a reconciliation run finds (but `pending`, which a rerun with the
--    neighbouring day settles) opens a case, keyed by what it is about: (business date,
--    provider, merchant, refund_no, kind). A later run of the day that finds it again is the
--    same case (case_sightings lists every run that saw it; the amounts as each run
--    counted them are that run's row in reconciliation_discrepancies). A case still open that a
--    later, superseding run no longer finds is closed as `resolved_by_rerun`: the superseding
--    run is the day's current answer (the reconciliation_current_* views), and a case it does
--    not show would have finance chase a difference the report no longer has. It opens again
--    if a later run finds it once more. `explained` and `corrected` are a person's decisions
--    and stay as they are when a run finds the case again, except that a `corrected` case
--    found by a run that started after the correction opens again: the correction did not fix
--    the day.
--
--    refund_no is '' for statement_missing (a whole (provider, merchant) without a statement).
CREATE TABLE reconciliation_cases (
    id              bigserial PRIMARY KEY,
    business_date   date NOT NULL,
    provider        text NOT NULL,
    merchant        text NOT NULL,
    refund_no       text NOT NULL,
    kind            text NOT NULL,
    state           text NOT NULL DEFAULT 'open'
                        CHECK (state IN ('open', 'explained', 'corrected', 'resolved_by_rerun')),
    -- As the last run that saw it counted them.
    ledger_amount   bigint,
    provider_amount bigint,
    detail          text NOT NULL,
    first_run_id    bigint NOT NULL REFERENCES reconciliation_runs (id),
    last_run_id     bigint NOT NULL REFERENCES reconciliation_runs (id),
    opened_at       timestamptz NOT NULL DEFAULT now(),
    -- When, by whom and why it left `open` the last time (a run, for resolved_by_rerun).
    closed_at       timestamptz,
    closed_by       text,
    close_note      text,
    closed_db_user  text,
    UNIQUE (business_date, provider, merchant, refund_no, kind),
    CHECK ((state = 'open') = (closed_at IS NULL))
);
CREATE INDEX reconciliation_cases_refund_no ON reconciliation_cases (refund_no) WHERE state = 'open';
CREATE INDEX reconciliation_cases_last_run ON reconciliation_cases (last_run_id) WHERE state = 'open';

-- Append-only, and named outside the reconciliation% family on purpose: the roles migration
-- gives the reconciler UPDATE on every table of that family, and nobody updates this one.
CREATE TABLE case_sightings (
    case_id bigint NOT NULL REFERENCES reconciliation_cases (id),
    run_id  bigint NOT NULL REFERENCES reconciliation_runs (id),
    PRIMARY KEY (case_id, run_id)
);
CREATE TRIGGER case_sightings_append_only BEFORE UPDATE OR DELETE ON case_sightings
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();

-- 4. Four-eyes approval of `job resolve` and `job correct` ([operator] approvals_required).
--    The request holds everything the action needs, so the approver applies exactly what was
--    asked; the action is applied in the transaction that approves it. The requester can never
--    approve their own request (CHECK; they may withdraw it, as a rejection), and a refund has
--    at most one pending request, so two contradicting requests cannot both wait for a
--    signature.
CREATE TABLE approval_requests (
    id                    bigserial PRIMARY KEY,
    action                text NOT NULL CHECK (action IN ('resolve', 'correct')),
    refund_no             text NOT NULL,
    outcome               text NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    settlement_refund_fee bigint CHECK (settlement_refund_fee >= 0),
    -- The resolution's note, or the correction's evidence.
    note                  text NOT NULL CHECK (note <> ''),
    requested_by          text NOT NULL CHECK (requested_by <> ''),
    db_user               text,
    requested_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- applied: approved and done; refused: approved, but the action was refused when applied
    -- (the job had changed); rejected: the second operator said no.
    state                 text NOT NULL DEFAULT 'pending'
                              CHECK (state IN ('pending', 'applied', 'refused', 'rejected')),
    decided_by            text,
    decided_db_user       text,
    decided_at            timestamptz,
    decision_note         text,
    refusal               text,
    CHECK (state NOT IN ('applied', 'refused') OR decided_by <> requested_by),
    CHECK ((state = 'pending') = (decided_at IS NULL))
);
CREATE UNIQUE INDEX approval_requests_one_pending ON approval_requests (refund_no) WHERE state = 'pending';
CREATE TRIGGER approval_requests_db_user BEFORE INSERT ON approval_requests
    FOR EACH ROW EXECUTE FUNCTION refunds_stamp_db_user();

CREATE FUNCTION refunds_stamp_decider() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state <> 'pending' THEN
        RAISE EXCEPTION 'approval request % is already %', OLD.id, OLD.state;
    END IF;
    NEW.decided_db_user := session_user;
    RETURN NEW;
END $$;
CREATE TRIGGER approval_requests_decided BEFORE UPDATE ON approval_requests
    FOR EACH ROW EXECUTE FUNCTION refunds_stamp_decider();
CREATE TRIGGER approval_requests_no_delete BEFORE DELETE ON approval_requests
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();

CREATE FUNCTION refunds_stamp_case_closer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.closed_at IS NULL THEN
        NEW.closed_db_user := NULL;
    ELSIF NEW.closed_at IS DISTINCT FROM OLD.closed_at THEN
        NEW.closed_db_user := session_user;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER reconciliation_cases_closer BEFORE UPDATE ON reconciliation_cases
    FOR EACH ROW EXECUTE FUNCTION refunds_stamp_case_closer();

-- Privileges (see 20261122000003_roles.sql). The reconciler opens and carries cases forward;
-- the operator reads everything, explains cases and closes them by correction, and files and
-- decides approval requests.
GRANT SELECT, INSERT, UPDATE ON reconciliation_cases TO refunds_reconciler;
GRANT SELECT, INSERT ON case_sightings TO refunds_reconciler;
GRANT USAGE, SELECT ON SEQUENCE reconciliation_cases_id_seq TO refunds_reconciler;
GRANT SELECT, UPDATE ON reconciliation_cases TO refunds_operator;
GRANT SELECT ON case_sightings TO refunds_operator;
GRANT SELECT, INSERT, UPDATE ON approval_requests TO refunds_operator;
GRANT USAGE, SELECT ON SEQUENCE approval_requests_id_seq TO refunds_operator;
