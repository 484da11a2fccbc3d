-- The stable error code of each refused message (shared::job::ErrorCode, docs/events.md), the
-- same code its refund.rejected or request.refused event carries, so that what operators see in
-- `refundctl dlq list` and what order systems were told can be matched. NULL for messages
-- stored before this migration: their field and reason say what was wrong, and no code is
-- guessed from them.
ALTER TABLE rejected_messages
    ADD COLUMN error_code text;
