-- Runs: start, read, wait for, signal and cancel. A role sees only the runs it started
-- (its tenant); superusers see every run.

-- Starts a run of the latest version of a workflow. Transactional: the run exists and is
-- due only once the caller commits. With an idempotency key, the same key (per tenant)
-- always returns the same run id and never starts a second run, also under concurrent
-- callers; the same key with another workflow or input raises 23505 idempotency_key_reused.
CREATE FUNCTION dispatched.start_run(
    workflow        text,
    input           jsonb    DEFAULT '{}',
    idempotency_key text     DEFAULT NULL,
    delay           interval DEFAULT NULL
)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant   text := dispatched._caller();
    v_input    jsonb := coalesce($2, '{}'::jsonb);
    v_version  integer;
    v_id       text;
    v_existing record;
    v_due      timestamptz;
BEGIN
    IF $1 IS NULL THEN
        RAISE EXCEPTION 'workflow: required' USING ERRCODE = '22023';
    END IF;
    IF $3 IS NOT NULL THEN
        PERFORM dispatched._check_key('idempotency_key', $3);
    END IF;
    IF $4 IS NOT NULL AND $4 < interval '0' THEN
        RAISE EXCEPTION 'delay: must not be negative, got %', $4 USING ERRCODE = '22023';
    END IF;
    -- the worker reads the input back: refuse what it could not parse (counted, not recursed)
    PERFORM dispatched._check_json_depth('input', v_input::text);

    SELECT max(w.version) INTO v_version FROM dispatched.workflows w WHERE w.name = $1;
    IF v_version IS NULL THEN
        RAISE EXCEPTION 'workflow "%" does not exist', $1
            USING ERRCODE = '42704',
                  HINT = 'Define it first with dispatched.define_workflow(name, definition).';
    END IF;

    IF NOT dispatched._preloaded()
       AND current_setting('dispatched_session.warned_no_worker', true) IS DISTINCT FROM 'on' THEN
        RAISE WARNING 'dispatched is not in shared_preload_libraries: runs are stored, but no worker will run them'
            USING HINT = 'Add dispatched to shared_preload_libraries and restart PostgreSQL.';
        PERFORM set_config('dispatched_session.warned_no_worker', 'on', false);
    END IF;

    v_id := dispatched._new_run_id();
    INSERT INTO dispatched.runs (id, tenant, workflow, version, input, idempotency_key)
    VALUES (v_id, v_tenant, $1, v_version, v_input, $3)
    ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;

    IF NOT FOUND THEN
        -- The key names an existing run (committed, or committed while we waited for it).
        SELECT r.id, r.workflow, r.input INTO v_existing
          FROM dispatched.runs r
         WHERE r.tenant = v_tenant AND r.idempotency_key = $3;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'could not start run: a concurrent run with idempotency key "%" is not visible to this transaction', $3
                USING ERRCODE = '40001', HINT = 'Retry the transaction.';
        END IF;
        IF v_existing.workflow IS DISTINCT FROM $1 OR v_existing.input IS DISTINCT FROM v_input THEN
            RAISE EXCEPTION 'idempotency_key_reused: key "%" already started run % with another workflow or input', $3, v_existing.id
                USING ERRCODE = '23505';
        END IF;
        RETURN v_existing.id;
    END IF;

    v_due := CASE WHEN $4 IS NULL THEN now() ELSE clock_timestamp() + $4 END;
    INSERT INTO dispatched.tasks (run_id, due_at) VALUES (v_id, v_due);
    INSERT INTO dispatched.events (run_id, type, data)
    VALUES (v_id, 'run.started',
            jsonb_build_object('workflow', $1, 'version', v_version, 'input', v_input)
            || CASE WHEN $3 IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('idempotency_key', $3) END
            || CASE WHEN $4 IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('not_before', v_due) END);
    PERFORM dispatched._wake_workers_at_commit();
    RETURN v_id;
END;
$$;

-- The run document, or NULL for an unknown run.
CREATE FUNCTION dispatched.run(run_id text)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v jsonb;
BEGIN
    SELECT jsonb_build_object(
        'id', r.id,
        'workflow', r.workflow,
        'version', r.version,
        'status', r.status,
        'input', r.input,
        'output', r.output,
        'error', r.error,
        'parent', r.parent,
        'idempotency_key', r.idempotency_key,
        'tenant', r.tenant,
        'steps', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'id', d.step ->> 'id',
                       'status', coalesce(s.status, 'pending'),
                       'attempt', coalesce(s.attempt, 0),
                       'response', s.response,
                       'signal', s.signal,
                       'error', s.error,
                       'started_at', s.started_at,
                       'finished_at', s.finished_at) ORDER BY d.n)
              FROM jsonb_array_elements(CASE WHEN jsonb_typeof(w.definition -> 'steps') = 'array'
                                         THEN w.definition -> 'steps' ELSE '[]' END) WITH ORDINALITY AS d (step, n)
              LEFT JOIN dispatched.steps s ON s.run_id = r.id AND s.idx = d.n - 1
        ), '[]'::jsonb),
        'created_at', r.created_at,
        'updated_at', r.updated_at,
        'finished_at', r.finished_at)
      INTO v
      FROM dispatched.runs r
      JOIN dispatched.workflows w ON w.name = r.workflow AND w.version = r.version
     WHERE r.id = $1
       AND (r.tenant = dispatched._caller() OR dispatched._caller_is_superuser());
    RETURN v;
END;
$$;

-- The run's output once completed; {"message":"not ready"} while it is not finished;
-- {"message":"not found"} for an unknown run; the error document when failed or cancelled.
CREATE FUNCTION dispatched.output(run_id text)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    SELECT x.status, x.output, x.error INTO r
      FROM dispatched.runs x
     WHERE x.id = $1
       AND (x.tenant = dispatched._caller() OR dispatched._caller_is_superuser());
    IF NOT FOUND THEN
        RETURN '{"message": "not found"}'::jsonb;
    END IF;
    RETURN CASE r.status
        WHEN 'completed' THEN coalesce(r.output, 'null'::jsonb)
        WHEN 'failed' THEN r.error
        WHEN 'cancelled' THEN r.error
        ELSE '{"message": "not ready"}'::jsonb
    END;
END;
$$;

-- Waits until the run finishes, then answers as output(); {"message":"not ready"} when the
-- timeout passes first. Holds no row lock and does not poll (see _wait_finished).
CREATE FUNCTION dispatched.attach(run_id text, timeout interval DEFAULT '30s')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF $2 IS NULL OR $2 < interval '0' THEN
        RAISE EXCEPTION 'timeout: must be zero or more, got %', coalesce($2::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM dispatched.runs x
                    WHERE x.id = $1
                      AND (x.tenant = dispatched._caller() OR dispatched._caller_is_superuser())) THEN
        RETURN '{"message": "not found"}'::jsonb;
    END IF;
    PERFORM dispatched._wait_finished($1, (extract(epoch FROM $2) * 1000)::bigint);
    RETURN dispatched.output($1);
END;
$$;

-- Delivers a signal. If no step waits for it yet, it is kept until one does. Returns false
-- for a finished run; raises P0002 for an unknown run. With an idempotency key a repeated
-- signal is delivered once (and answers true again).
CREATE FUNCTION dispatched.signal(
    run_id          text,
    name            text,
    data            jsonb DEFAULT NULL,
    idempotency_key text  DEFAULT NULL
)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_delivered boolean;
BEGIN
    IF $2 IS NULL THEN
        RAISE EXCEPTION 'name: required' USING ERRCODE = '22023';
    END IF;
    PERFORM dispatched._check_name('signal name', $2, true);
    IF $4 IS NOT NULL THEN
        PERFORM dispatched._check_key('idempotency_key', $4);
    END IF;
    IF $3 IS NOT NULL THEN
        PERFORM dispatched._check_json_depth('data', $3::text);
    END IF;
    v_delivered := dispatched._deliver_signal($1, $2, $3, $4,
        CASE WHEN dispatched._caller_is_superuser() THEN NULL ELSE dispatched._caller() END);
    IF v_delivered IS NULL THEN
        RAISE EXCEPTION 'run "%" does not exist', $1 USING ERRCODE = 'P0002';
    END IF;
    RETURN v_delivered;
END;
$$;

-- Cancels a run that is not finished (true); false for a finished or unknown run. No
-- further step starts, an answer in flight is discarded, nothing is compensated.
CREATE FUNCTION dispatched.cancel_run(run_id text, reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN coalesce(dispatched._cancel_run($1, $2,
        CASE WHEN dispatched._caller_is_superuser() THEN NULL ELSE dispatched._caller() END), false);
END;
$$;

-- The run's event stream in order, numbered from 1. A step.succeeded event stored without
-- its answer (answer_in_step) gets it back from the step's response.
CREATE FUNCTION dispatched.events(run_id text)
RETURNS TABLE (seq bigint, at timestamptz, type text, step text, data jsonb)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT row_number() OVER (ORDER BY e.seq), e.at, e.type, e.step,
           CASE WHEN e.answer_in_step
                THEN e.data OPERATOR(pg_catalog.||) coalesce(
                         (SELECT s.response FROM dispatched.steps s
                           WHERE s.run_id = e.run_id AND s.step_id = e.step), '{}'::jsonb)
                ELSE e.data END
      FROM dispatched.events e
     WHERE e.run_id = $1
       AND EXISTS (SELECT 1 FROM dispatched.runs x
                    WHERE x.id = $1
                      AND (x.tenant = dispatched._caller() OR dispatched._caller_is_superuser()))
     ORDER BY e.seq;
END;
$$;
