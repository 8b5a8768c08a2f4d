-- The privilege model.
--
-- * The tables are the extension owner's; no other role has any privilege on them, so data
--   is reached only through the functions, which are SECURITY DEFINER with a pinned
--   search_path and scope everything to the calling role (its tenant).
-- * Administration (define_workflow, set_secret) is for the owner and superusers; grant
--   EXECUTE on them to the roles you trust to define workflows.
-- * Runs, signals, events and both idempotency layers are open to every role (PUBLIC), each
--   seeing only its own runs and entries. Revoke and grant as your deployment needs.
-- * Internal helpers (names starting with _) are not for direct use.

REVOKE ALL ON ALL TABLES IN SCHEMA dispatched FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA dispatched FROM PUBLIC;
GRANT USAGE ON SCHEMA dispatched TO PUBLIC;

REVOKE EXECUTE ON FUNCTION dispatched.define_workflow(text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dispatched.set_secret(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dispatched._wake_workers_at_commit() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dispatched._run_finished_at_commit() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dispatched._wait_finished(text, bigint) FROM PUBLIC;


REVOKE EXECUTE ON FUNCTION dispatched._deliver_signal(text, text, jsonb, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dispatched._cancel_run(text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dispatched.decrypt(jsonb) FROM PUBLIC;

DO $$
BEGIN
    IF NOT dispatched._preloaded() THEN
        RAISE WARNING 'dispatched is not in shared_preload_libraries: runs are stored, but no worker will run them'
            USING HINT = 'Add dispatched to shared_preload_libraries and restart PostgreSQL.';
    END IF;
END;
$$;
