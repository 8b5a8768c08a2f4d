-- Internal functions shared by the SQL API and the worker. Not for direct use.

-- Delivers a signal to a run of `tenant` (any tenant when NULL). Returns NULL for an unknown
-- run, false for a finished one, true when delivered (or delivered before under this key).
-- Locks the run's task before the run, the order the worker uses, so the two never deadlock.
CREATE FUNCTION dispatched._deliver_signal(p_run text, p_name text, p_data jsonb, p_key text, p_tenant text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r    record;
    v_id bigint;
BEGIN
    PERFORM 1 FROM dispatched.tasks t WHERE t.run_id = p_run FOR UPDATE;
    SELECT x.status, x.waiting_for INTO r
      FROM dispatched.runs x
     WHERE x.id = p_run AND (p_tenant IS NULL OR x.tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF r.status IN ('completed', 'failed', 'cancelled') THEN
        RETURN false;
    END IF;

    INSERT INTO dispatched.signals (run_id, name, data, idempotency_key)
    VALUES (p_run, p_name, p_data, p_key)
    ON CONFLICT (run_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RETURN true; -- this key was delivered before
    END IF;

    INSERT INTO dispatched.events (run_id, type, data)
    VALUES (p_run, 'signal.received',
            jsonb_build_object('name', p_name)
            || CASE WHEN p_data IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('data', p_data) END
            || CASE WHEN p_key IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('idempotency_key', p_key) END);

    IF r.status = 'waiting' AND r.waiting_for = p_name THEN
        INSERT INTO dispatched.tasks AS t (run_id, due_at) VALUES (p_run, now())
        ON CONFLICT (run_id) DO UPDATE SET due_at = least(t.due_at, EXCLUDED.due_at)
            WHERE t.lease_until IS NULL;
        PERFORM dispatched._wake_workers_at_commit();
    END IF;
    RETURN true;
END;
$$;

-- Cancels a run of `tenant` (any tenant when NULL) that is not finished: true; false for a
-- finished or unknown run.
CREATE FUNCTION dispatched._cancel_run(p_run text, p_reason text, p_tenant text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r      record;
    v_step text;
BEGIN
    PERFORM 1 FROM dispatched.tasks t WHERE t.run_id = p_run FOR UPDATE;
    SELECT x.status, x.step_index, x.parent INTO r
      FROM dispatched.runs x
     WHERE x.id = p_run AND (p_tenant IS NULL OR x.tenant = p_tenant)
       FOR UPDATE;
    IF NOT FOUND OR r.status IN ('completed', 'failed', 'cancelled') THEN
        RETURN false;
    END IF;

    SELECT s.step_id INTO v_step FROM dispatched.steps s WHERE s.run_id = p_run AND s.idx = r.step_index;
    UPDATE dispatched.runs x
       SET status = 'cancelled',
           waiting_for = NULL,
           error = jsonb_build_object('message', 'cancelled' || coalesce(': ' || p_reason, ''),
                                      'step', v_step, 'status', NULL, 'reason', p_reason),
           finished_at = now(),
           updated_at = now()
     WHERE x.id = p_run;
    UPDATE dispatched.steps s
       SET status = 'failed', phase = 'done', error = '{"message": "cancelled"}'::jsonb,
           finished_at = now(), updated_at = now()
     WHERE s.run_id = p_run AND s.status IN ('pending', 'running', 'waiting');
    DELETE FROM dispatched.tasks t WHERE t.run_id = p_run;
    INSERT INTO dispatched.events (run_id, type, step, data)
    VALUES (p_run, 'run.cancelled', v_step, jsonb_build_object('reason', p_reason));
    -- a parent waiting for this run as an attached child learns of it
    IF r.parent IS NOT NULL THEN
        INSERT INTO dispatched.tasks AS t (run_id, due_at)
        SELECT p.id, clock_timestamp() FROM dispatched.runs p
         WHERE p.id = r.parent AND p.waiting_for = 'child:' || p_run
        ON CONFLICT (run_id) DO UPDATE SET due_at = least(t.due_at, EXCLUDED.due_at)
            WHERE t.lease_until IS NULL;
    END IF;
    PERFORM pg_notify('dispatched', jsonb_build_object('run_id', p_run, 'status', 'cancelled')::text);
    PERFORM dispatched._run_finished_at_commit();
    PERFORM dispatched._wake_workers_at_commit();
    RETURN true;
END;
$$;
