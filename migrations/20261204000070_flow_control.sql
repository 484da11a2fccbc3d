-- Flow control (DESIGN §9 `[[limits]]`, §11): one shared call budget per (provider, merchant),
-- the adaptive slow-down a throttled provider asks for, and the pause of a merchant whose
-- provider is down. Every worker replica takes from the same row, so scaling out never sends
-- more than the merchant's quota; a take is one short statement (the row is locked for the
-- statement only, never across a provider call).
--
-- The budget is a GCRA (generic cell rate algorithm): `tat` is the theoretical arrival time of
-- the next call. A take of n calls hands out n slots `step` apart, starting at
-- max(tat, now + lead - (burst - 1) * step), as far as `now + lead + ahead` (a worker reserves
-- a little ahead so that one round trip serves a batch, and no slot sooner than `lead` from
-- now, the time a worker needs to claim the job before its slot); `tat` moves past the last
-- slot. In any window
-- of length W at most rate * W + burst slots fall, whatever the number of replicas. A slot
-- reserved by a worker that dies is never used: the budget is under-spent, never exceeded.

CREATE TABLE merchant_budgets (
    provider            text NOT NULL,
    merchant            text NOT NULL,
    -- Microseconds between calls at the configured rate; NULL for a merchant without a limit
    -- (its row exists for the pause only).
    interval_us         bigint CHECK (interval_us > 0),
    burst               integer NOT NULL DEFAULT 1 CHECK (burst >= 1),
    tat                 timestamptz NOT NULL DEFAULT now(),
    -- The fraction of the rate in force after the provider last throttled us, in thousandths;
    -- it recovers linearly to 1000 over the worker's `flow.recover_ms` from `slowed_at`.
    slowdown_permille   integer NOT NULL DEFAULT 1000 CHECK (slowdown_permille BETWEEN 1 AND 1000),
    slowed_at           timestamptz,
    -- Paused: no calls until `paused_until`, then one probe at a time (each probe pushes it on
    -- by the probe interval) until a probe is answered.
    paused_until        timestamptz,
    paused_since        timestamptz,
    pause_reason        text,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, merchant)
);

-- Calls a throttled answer spared from a job's retry budget over its life (they are bounded by
-- `worker.retry.max_uncounted`, so that a provider throttling forever cannot keep a job calling
-- forever).
ALTER TABLE jobs ADD COLUMN spared_attempts integer NOT NULL DEFAULT 0 CHECK (spared_attempts >= 0);

-- The slow-down in force at `p_now`: the last cut recovering linearly over `p_recover_us`.
CREATE FUNCTION budget_permille(b merchant_budgets, p_now timestamptz, p_recover_us bigint)
RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN b.slowed_at IS NULL OR b.slowdown_permille >= 1000 OR p_recover_us <= 0 THEN 1000
        ELSE least(1000, b.slowdown_permille + ((1000 - b.slowdown_permille)
                 * least(1.0, extract(epoch FROM p_now - b.slowed_at) * 1000000.0 / p_recover_us))::integer)
    END
$$;

-- Takes up to `p_want` call slots for a merchant, as far as `p_ahead_us` ahead. Returns the
-- first slot, the step between slots, how many were granted, when the next slot falls (the
-- new `tat`), `paused_until` when the merchant is paused (then nothing is granted), and the
-- database's clock (a worker places the slots on its own clock relative to it). A
-- merchant without a row, or without a limit, is granted everything at once.
CREATE FUNCTION budget_take(p_provider text, p_merchant text, p_want integer,
                            p_lead_us bigint, p_ahead_us bigint, p_recover_us bigint,
                            p_slack_us bigint)
RETURNS TABLE (first_at timestamptz, step_us bigint, granted integer, next_at timestamptz,
               paused_until timestamptz, db_now timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    b merchant_budgets;
    t_now timestamptz := clock_timestamp();
    v_step bigint;
    v_start timestamptz;
    v_n bigint;
BEGIN
    SELECT * INTO b FROM merchant_budgets m
     WHERE m.provider = p_provider AND m.merchant = p_merchant FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT t_now, 0::bigint, p_want, t_now, NULL::timestamptz, t_now;
        RETURN;
    END IF;
    IF b.paused_until IS NOT NULL THEN
        RETURN QUERY SELECT t_now, 0::bigint, 0, b.paused_until, b.paused_until, t_now;
        RETURN;
    END IF;
    IF b.interval_us IS NULL THEN
        RETURN QUERY SELECT t_now, 0::bigint, p_want, t_now, NULL::timestamptz, t_now;
        RETURN;
    END IF;
    v_step := (b.interval_us * 1000) / budget_permille(b, t_now, p_recover_us);
    -- The burst credit less the slack: a call may leave up to the slack after its slot (timer,
    -- send), and the window's bound must hold for the calls, not only for the slots.
    v_start := greatest(b.tat, t_now + (p_lead_us - greatest(0, (b.burst - 1) * v_step - p_slack_us))
                                      * interval '1 microsecond');
    -- Slots v_start + k * step for k = 0.. as long as they fall within now + lead + ahead.
    v_n := floor(extract(epoch FROM (t_now + (p_lead_us + p_ahead_us) * interval '1 microsecond') - v_start)
                 * 1000000.0 / v_step)::bigint + 1;
    v_n := greatest(0, least(p_want, v_n));
    UPDATE merchant_budgets m SET tat = v_start + (v_n * v_step) * interval '1 microsecond',
                                  updated_at = t_now
     WHERE m.provider = p_provider AND m.merchant = p_merchant;
    RETURN QUERY SELECT v_start, v_step, v_n::integer,
                        v_start + (v_n * v_step) * interval '1 microsecond', NULL::timestamptz, t_now;
END
$$;

-- The provider throttled a call: the merchant's rate is halved (not below `p_min_permille`),
-- at most once per `p_debounce_us` across all replicas (they all see the same overload).
CREATE FUNCTION budget_slow(p_provider text, p_merchant text, p_min_permille integer,
                            p_recover_us bigint, p_debounce_us bigint)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    b merchant_budgets;
    t_now timestamptz := clock_timestamp();
    v_now_permille integer;
BEGIN
    SELECT * INTO b FROM merchant_budgets m
     WHERE m.provider = p_provider AND m.merchant = p_merchant AND m.interval_us IS NOT NULL
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_now_permille := budget_permille(b, t_now, p_recover_us);
    IF b.slowed_at IS NOT NULL AND b.slowed_at > t_now - p_debounce_us * interval '1 microsecond' THEN
        RETURN v_now_permille;
    END IF;
    UPDATE merchant_budgets m
       SET slowdown_permille = greatest(p_min_permille, v_now_permille / 2),
           slowed_at = t_now, updated_at = t_now
     WHERE m.provider = p_provider AND m.merchant = p_merchant;
    RETURN greatest(p_min_permille, v_now_permille / 2);
END
$$;

GRANT SELECT, INSERT, UPDATE ON merchant_budgets TO refunds_worker;
GRANT SELECT ON merchant_budgets TO refunds_operator, refunds_reconciler;
GRANT EXECUTE ON FUNCTION
    budget_permille(merchant_budgets, timestamptz, bigint),
    budget_take(text, text, integer, bigint, bigint, bigint, bigint),
    budget_slow(text, text, integer, bigint, bigint)
TO refunds_worker;
