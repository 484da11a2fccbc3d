-- Least-privilege database roles: one per program, each allowed exactly the statements its
-- code runs, so a bug or a leaked password in one program cannot do another program's writes.
--
--   refunds_worker      refund-worker: intake, claims, outcomes, ledger, outbox relay, sweeper
--   refunds_reconciler  refund-reconciler: reads jobs, attempts and ledger; writes the reconciliation tables
--   refunds_operator    refundctl: reads everything; replay and manual resolution (audited)
--
-- The roles are NOLOGIN groups. An administrator creates LOGIN users and makes them members
-- (docs/operations.md, "Database roles"); the programs connect as those users. Migrations run
-- as the schema owner (`refundctl migrate` with the owner's URL), never as one of these roles.
--
-- Nobody here gets TRUNCATE, DDL, or UPDATE/DELETE on the append-only tables (job_transitions,
-- provider_attempts, ledger, operator_audit); their triggers forbid row changes, and the missing
-- privileges also stop TRUNCATE, which row triggers do not see.
--
-- Roles are cluster-wide while this migration runs once per database: several databases (test
-- databases, shards) may run it at the same moment. Advisory locks are per database and cannot
-- serialise that, so a role that another session created first is simply accepted: both the
-- `duplicate_object` error and the `unique_violation` that a concurrent CREATE ROLE raises on
-- pg_authid mean "it exists now". If the migrating user lacks CREATEROLE, an administrator can
-- create the three roles beforehand; this migration then only grants.
--
-- A later migration that creates a table grants on it in the same file (the roles test in
-- worker/tests/roles.rs fails for a table the operator cannot read).

DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['refunds_worker', 'refunds_reconciler', 'refunds_operator'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format(
                    'CREATE ROLE %I NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
                    r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                RAISE NOTICE 'role % was created concurrently by another session', r;
            END;
        END IF;
    END LOOP;
END
$roles$;

-- The schema the tables live in (normally public; since PostgreSQL 15 PUBLIC no longer has
-- CREATE there, and hardened clusters may have revoked USAGE too).
DO $schema$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO refunds_worker, refunds_reconciler, refunds_operator',
                   current_schema());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cannot grant USAGE on schema %: grant it as the schema owner', current_schema();
END
$schema$;

-- Every program may see which migrations are applied (a version check at start).
GRANT SELECT ON _sqlx_migrations TO refunds_worker, refunds_reconciler, refunds_operator;

-- refund-worker ----------------------------------------------------------------------------
-- jobs: intake inserts; claims and transitions update (SELECT ... FOR UPDATE needs UPDATE);
-- DELETE only because intake removes a job it inserted in the same transaction when the
-- order's refund total refuses it (store::intake::delete_new_job).
GRANT SELECT, INSERT, UPDATE, DELETE ON jobs TO refunds_worker;
-- orders: the cumulative refund cap (INSERT ... ON CONFLICT DO UPDATE), released on failure.
GRANT SELECT, INSERT, UPDATE ON orders TO refunds_worker;
-- append-only history, attempts and ledger: insert and read back, never change.
GRANT SELECT, INSERT ON job_transitions, provider_attempts, ledger TO refunds_worker;
-- rejected messages: a redelivery of the same bytes counts an occurrence (ON CONFLICT DO UPDATE).
GRANT SELECT, INSERT, UPDATE ON rejected_messages TO refunds_worker;
-- outbox: written with the transition, locked by the relay (FOR UPDATE SKIP LOCKED), deleted
-- once the broker confirmed.
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO refunds_worker;
GRANT USAGE, SELECT ON SEQUENCE job_transitions_id_seq, provider_attempts_id_seq, ledger_id_seq,
    rejected_messages_id_seq, outbox_id_seq TO refunds_worker;

-- refundctl --------------------------------------------------------------------------------
-- Reads everything (below, with the reconciliation tables); replay and manual resolution move
-- a dead job (jobs), release or book its amount (orders, ledger), append history, the event
-- and the audit row.
GRANT SELECT ON jobs, orders, job_transitions, provider_attempts, ledger, outbox,
    operator_audit, rejected_messages TO refunds_operator;
GRANT UPDATE ON jobs, orders TO refunds_operator;
GRANT INSERT ON job_transitions, ledger, outbox, operator_audit TO refunds_operator;
GRANT USAGE, SELECT ON SEQUENCE job_transitions_id_seq, ledger_id_seq, outbox_id_seq,
    operator_audit_id_seq TO refunds_operator;

-- refund-reconciler ------------------------------------------------------------------------
-- Reads what was booked and what the providers answered.
GRANT SELECT ON jobs, provider_attempts, ledger TO refunds_reconciler;

-- Statement rows and working sets live in per-session temporary tables.
DO $temp$
BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO refunds_reconciler', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cannot grant TEMPORARY on database %: grant it as the database owner',
        current_database();
END
$temp$;

-- The reconciliation's own tables and views (migration 20261122000002: reconciliation_runs,
-- _totals, _discrepancies and the _current_ views), found by name so that a later table of
-- the same family is covered when this migration runs after it. The reconciler records runs
-- (INSERT) and marks superseded ones (UPDATE); it deletes nothing, history stays. The operator
-- reads them (`refundctl job show` shows a refund's current discrepancies).
DO $recon$
DECLARE
    t record;
    s regclass;
BEGIN
    FOR t IN
        SELECT c.oid::regclass AS rel, c.relkind
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema()
          AND c.relkind IN ('r', 'p', 'v', 'm')
          AND (c.relname LIKE 'reconciliation%' OR c.relname LIKE 'recon\_%'
               OR c.relname LIKE '%statement%')
    LOOP
        IF t.relkind IN ('r', 'p') THEN
            EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %s TO refunds_reconciler', t.rel);
        ELSE
            EXECUTE format('GRANT SELECT ON %s TO refunds_reconciler', t.rel);
        END IF;
        EXECUTE format('GRANT SELECT ON %s TO refunds_operator', t.rel);
        FOR s IN
            SELECT d.objid::regclass
            FROM pg_catalog.pg_depend d
            JOIN pg_catalog.pg_class sc ON sc.oid = d.objid AND sc.relkind = 'S'
            WHERE d.classid = 'pg_catalog.pg_class'::regclass
              AND d.refclassid = 'pg_catalog.pg_class'::regclass
              AND d.refobjid = t.rel
              AND d.deptype IN ('a', 'i')
        LOOP
            EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO refunds_reconciler', s);
        END LOOP;
    END LOOP;
END
$recon$;
