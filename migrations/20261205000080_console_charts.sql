-- The console's throughput and failure charts read the last hour of job_transitions by time.
-- A BRIN index: the table is append-only in time order, so a block-range index answers that
-- range scan while costing the hot path almost nothing (no per-row b-tree insert).
CREATE INDEX job_transitions_at ON job_transitions USING brin (at);
