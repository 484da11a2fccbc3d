-- The refund processor's schema: jobs and their append-only history, provider attempts,
-- ledger, outbox, operator audit and rejected messages. Money is BIGINT fen everywhere.

CREATE FUNCTION refunds_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is append-only', TG_TABLE_NAME;
END $$;

-- One row per refund_no: the hot row. No index covers the columns that change on every
-- transition (state, attempt, lease_until, next_attempt_at, ...), and fillfactor leaves room on
-- the page, so transitions are HOT updates that touch no index.
CREATE TABLE jobs (
    refund_no             text PRIMARY KEY,
    order_no              text NOT NULL,
    provider              text NOT NULL CHECK (provider IN ('shengpay', 'wupay')),
    merchant              text NOT NULL,
    total_fee             bigint NOT NULL CHECK (total_fee BETWEEN 1 AND 100000000000),
    refund_fee            bigint NOT NULL CHECK (refund_fee >= 1 AND refund_fee <= total_fee),
    request               jsonb NOT NULL,
    content_hash          bytea NOT NULL,
    state                 text NOT NULL CHECK (state IN ('received', 'in_flight', 'retry_wait',
                                 'succeeded', 'failed', 'rejected', 'dead')),
    cause                 text,
    attempt               integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    lease_until           timestamptz,
    next_attempt_at       timestamptz,
    last_code             text,
    last_message          text,
    provider_refund_id    text,
    settlement_refund_fee bigint CHECK (settlement_refund_fee >= 0 AND settlement_refund_fee <= refund_fee),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'dead') = (cause IS NOT NULL))
) WITH (fillfactor = 70);

CREATE INDEX jobs_order_no ON jobs (order_no);
CREATE INDEX jobs_created_at ON jobs (created_at);

-- Refund totals per order: the cumulative cap of DESIGN §3, enforced under the row lock.
-- `committed_fee` counts every refund that is not definitively failed or rejected.
CREATE TABLE orders (
    order_no      text PRIMARY KEY,
    total_fee     bigint NOT NULL CHECK (total_fee BETWEEN 1 AND 100000000000),
    committed_fee bigint NOT NULL CHECK (committed_fee >= 0 AND committed_fee <= total_fee)
);

CREATE TABLE job_transitions (
    id         bigserial PRIMARY KEY,
    refund_no  text NOT NULL REFERENCES jobs (refund_no),
    from_state text,
    to_state   text NOT NULL,
    attempt    integer NOT NULL,
    actor      text NOT NULL,
    cause      text,
    detail     jsonb,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX job_transitions_refund_no ON job_transitions (refund_no, id);
CREATE TRIGGER job_transitions_append_only BEFORE UPDATE OR DELETE ON job_transitions
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();

-- Every provider call: what was sent (secrets redacted), what came back, how it was read.
CREATE TABLE provider_attempts (
    id                    bigserial PRIMARY KEY,
    refund_no             text NOT NULL REFERENCES jobs (refund_no),
    attempt               integer NOT NULL,
    provider              text NOT NULL,
    merchant              text NOT NULL,
    outcome               text NOT NULL,
    code                  text,
    message               text,
    http_status           integer,
    request               text NOT NULL,
    response              text,
    latency_us            bigint NOT NULL CHECK (latency_us >= 0),
    provider_refund_id    text,
    refund_fee            bigint CHECK (refund_fee >= 0),
    settlement_refund_fee bigint CHECK (settlement_refund_fee >= 0),
    coupon_refund_fee     bigint CHECK (coupon_refund_fee >= 0),
    fenced                boolean NOT NULL DEFAULT false,
    recorded_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provider_attempts_refund_no ON provider_attempts (refund_no, attempt);
CREATE INDEX provider_attempts_accepted_day ON provider_attempts (recorded_at) WHERE outcome = 'accepted';
CREATE TRIGGER provider_attempts_append_only BEFORE UPDATE OR DELETE ON provider_attempts
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();

-- Append-only ledger: one 'refund' entry per refund_no at most; corrections are reversals.
CREATE TABLE ledger (
    id                    bigserial PRIMARY KEY,
    refund_no             text NOT NULL REFERENCES jobs (refund_no),
    entry_kind            text NOT NULL CHECK (entry_kind IN ('refund', 'reversal')),
    provider              text NOT NULL,
    merchant              text NOT NULL,
    provider_refund_id    text,
    refund_fee            bigint NOT NULL,
    settlement_refund_fee bigint NOT NULL,
    business_date         date NOT NULL,
    source                text NOT NULL CHECK (source IN ('provider', 'manual')),
    reverses              bigint REFERENCES ledger (id),
    booked_at             timestamptz NOT NULL DEFAULT now(),
    CHECK ((entry_kind = 'refund' AND refund_fee > 0 AND settlement_refund_fee >= 0 AND reverses IS NULL)
        OR (entry_kind = 'reversal' AND refund_fee < 0 AND settlement_refund_fee <= 0 AND reverses IS NOT NULL))
);
CREATE UNIQUE INDEX ledger_one_refund_entry ON ledger (refund_no) WHERE entry_kind = 'refund';
CREATE INDEX ledger_by_day ON ledger (business_date, provider, merchant);
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();

-- Outcome events, written in the transaction of the transition, relayed with confirms.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    routing_key text NOT NULL,
    refund_no   text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE operator_audit (
    id          bigserial PRIMARY KEY,
    refund_no   text,
    action      text NOT NULL,
    result      text NOT NULL,
    operator    text NOT NULL CHECK (operator <> ''),
    note        text NOT NULL CHECK (note <> ''),
    prior_state text,
    new_state   text,
    reason      text,
    detail      jsonb,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX operator_audit_refund_no ON operator_audit (refund_no, id);
CREATE TRIGGER operator_audit_append_only BEFORE UPDATE OR DELETE ON operator_audit
    FOR EACH ROW EXECUTE FUNCTION refunds_forbid_change();

-- Messages refused at intake (invalid) or conflicting with an existing refund_no: the raw body
-- is kept so nothing is lost. A redelivery of the same body is the same row.
CREATE TABLE rejected_messages (
    id            bigserial PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('rejected', 'conflict')),
    refund_no     text,
    field         text NOT NULL,
    reason        text NOT NULL,
    body          bytea NOT NULL,
    body_sha256   bytea NOT NULL UNIQUE,
    message_id    text,
    occurrences   integer NOT NULL DEFAULT 1,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rejected_messages_refund_no ON rejected_messages (refund_no);
