-- A replayed job gets a fresh retry budget: attempts and age are counted from the replay, while
-- `attempt` itself keeps growing (it is the fencing token and must never repeat).
ALTER TABLE jobs
    ADD COLUMN retry_base  integer NOT NULL DEFAULT 0 CHECK (retry_base >= 0),
    ADD COLUMN retry_since timestamptz;
