-- psql administration: views for operators, retry_run, purge, and COMMENT ON every object
-- of the extension, so that \d+, \dv+ and \df+ dispatched.* read as documentation.
--
-- The views read the tables directly (they are the extension owner's), so like the tables
-- they are for superusers only; grant SELECT on them to a monitoring role if you wish:
--   GRANT SELECT ON dispatched.runs_by_status TO monitoring;
-- A notification on channel `dispatched` ({"run_id":..,"status":..}) is sent at the commit
-- of every transaction that finished a run: LISTEN dispatched.

-- Runs by workflow and status.
DO $views$
DECLARE
    v_path text := pg_catalog.current_setting('search_path');
BEGIN
-- The views are created with search_path = pg_catalog, pg_temp, so that every function and
-- operator in them is pg_catalog's whatever the installing session's path; then the path is
-- put back.
PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

CREATE VIEW dispatched.runs_by_status AS
SELECT r.workflow,
       r.status,
       count(*)            AS runs,
       min(r.created_at)   AS oldest_created_at,
       max(r.updated_at)   AS last_change_at
  FROM dispatched.runs r
 GROUP BY r.workflow, r.status;

-- The queue as operators see it: every run with something due, the step it is at, and
-- whether it is due now, scheduled for later, or in flight (leased by a worker).
CREATE VIEW dispatched.steps_due AS
SELECT t.run_id,
       r.tenant,
       r.workflow,
       r.status                                               AS run_status,
       coalesce(s.step_id, w.definition -> 'steps' -> r.step_index ->> 'id') AS step,
       coalesce(s.status, 'pending')                          AS step_status,
       coalesce(s.attempt, 0)                                 AS attempt,
       CASE WHEN t.lease_owner IS NOT NULL AND t.lease_until > now() THEN 'in_flight'
            WHEN t.due_at <= now() THEN 'due'
            ELSE 'scheduled' END                              AS state,
       t.due_at,
       t.lease_owner                                          AS worker,
       t.lease_until,
       t.claims
  FROM dispatched.tasks t
  JOIN dispatched.runs r ON r.id = t.run_id
  JOIN dispatched.workflows w ON w.name = r.workflow AND w.version = r.version
  LEFT JOIN dispatched.steps s ON s.run_id = r.id AND s.idx = r.step_index;

-- Every attempt of a step request, from the event stream: when it started (step.started),
-- how it ended (step.response: an answer 2xx, recorded in step.response when the step goes
-- on waiting and in step.succeeded otherwise; step.retry_scheduled: failed, retried;
-- step.failed: failed for good; NULL: still in flight), and how long it took (the worker's
-- measured duration_ms when the event has it).
CREATE VIEW dispatched.step_attempts AS
SELECT r.workflow,
       e.run_id,
       e.step,
       (e.data ->> 'attempt')::integer AS attempt,
       substring(e.data ->> 'url' FROM '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#]+)') AS host,
       e.at                            AS started_at,
       CASE WHEN o.type = 'step.succeeded' THEN 'step.response' ELSE o.type END AS outcome,
       (o.data ->> 'status')::integer  AS http_status,
       o.at                            AS ended_at,
       coalesce((o.data ->> 'duration_ms')::float8, extract(epoch FROM (o.at - e.at)) * 1000) AS duration_ms
  FROM dispatched.events e
  JOIN dispatched.runs r ON r.id = e.run_id
  LEFT JOIN LATERAL (
        SELECT e2.type, e2.at,
               CASE WHEN e2.answer_in_step
                    THEN e2.data || coalesce((SELECT jsonb_build_object('status', s.response -> 'status')
                                                FROM dispatched.steps s
                                               WHERE s.run_id = e2.run_id AND s.step_id = e2.step), '{}')
                    ELSE e2.data END AS data
          FROM dispatched.events e2
         WHERE e2.run_id = e.run_id AND e2.seq > e.seq AND e2.step = e.step
           AND (e2.type IN ('step.response', 'step.retry_scheduled', 'step.failed')
                OR (e2.type = 'step.succeeded' AND (e2.data ? 'status' OR e2.answer_in_step)))
           AND e2.data ->> 'attempt' = e.data ->> 'attempt'
           AND coalesce((e2.data ->> 'compensation')::boolean, false) = false
         ORDER BY e2.seq
         LIMIT 1) o ON true
 WHERE e.type = 'step.started';

-- Per workflow and host: attempts, retry and failure rates (per attempt), and the p50 and
-- p99 durations of the attempts that ended.
CREATE VIEW dispatched.step_stats AS
SELECT a.workflow,
       a.host,
       count(*)                                                    AS attempts,
       count(*) FILTER (WHERE a.outcome = 'step.response')         AS succeeded,
       count(*) FILTER (WHERE a.outcome = 'step.retry_scheduled')  AS retried,
       count(*) FILTER (WHERE a.outcome = 'step.failed')           AS failed,
       count(*) FILTER (WHERE a.outcome IS NULL)                   AS in_flight,
       round(count(*) FILTER (WHERE a.outcome = 'step.retry_scheduled')::numeric / count(*), 4) AS retry_rate,
       round(count(*) FILTER (WHERE a.outcome = 'step.failed')::numeric / count(*), 4)          AS failure_rate,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms))::numeric, 1)  AS p50_ms,
       round((percentile_cont(0.99) WITHIN GROUP (ORDER BY a.duration_ms))::numeric, 1) AS p99_ms
  FROM dispatched.step_attempts a
 GROUP BY a.workflow, a.host;

-- The run that has waited longest (for a signal or a child run), and for what.
CREATE VIEW dispatched.oldest_waiting_run AS
SELECT r.id          AS run_id,
       r.tenant,
       r.workflow,
       s.step_id     AS step,
       r.waiting_for,
       r.updated_at  AS waiting_since,
       now() - r.updated_at AS waited,
       s.wait_deadline
  FROM dispatched.runs r
  LEFT JOIN dispatched.steps s ON s.run_id = r.id AND s.idx = r.step_index
 WHERE r.status = 'waiting'
 ORDER BY r.updated_at, r.id
 LIMIT 1;

PERFORM pg_catalog.set_config('search_path', v_path, true);
END
$views$;

-- Resumes a failed run at its failed step, with new attempt numbers: the step's next attempt
-- is its last one plus one, so Dispatched-Attempt and the invocation id are new and the
-- activity log's record of the failed attempt is not replayed. Returns true when resumed,
-- false when the run is not failed; P0002 for an unknown run. A run whose failure was
-- compensated (any compensation attempted) is refused with 55000: compensation undid the
-- effects of its earlier steps, so resuming after them would build on undone work; start a
-- new run instead. Steps after the failed one were never reached and start at attempt 1.
CREATE FUNCTION dispatched.retry_run(run_id text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r     record;
    s     record;
BEGIN
    -- lock order: the task, then the run (as the worker does)
    PERFORM 1 FROM dispatched.tasks t WHERE t.run_id = $1 FOR UPDATE;
    SELECT x.status, x.step_index INTO r
      FROM dispatched.runs x
     WHERE x.id = $1
       AND (x.tenant = dispatched._caller() OR dispatched._caller_is_superuser())
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run "%" does not exist', $1 USING ERRCODE = 'P0002';
    END IF;
    IF r.status <> 'failed' THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM dispatched.steps x
                WHERE x.run_id = $1 AND (x.status = 'compensated' OR x.comp_attempt > 0)) THEN
        RAISE EXCEPTION 'run "%" cannot be retried: its failure was compensated', $1
            USING ERRCODE = '55000',
                  DETAIL = 'Compensation undid the effects of its earlier steps.',
                  HINT = 'Start a new run.';
    END IF;
    SELECT x.idx, x.step_id, x.attempt INTO s
      FROM dispatched.steps x
     WHERE x.run_id = $1 AND x.status = 'failed'
     ORDER BY x.idx
     LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run "%" cannot be retried: no step failed (its output could not be rendered)', $1
            USING ERRCODE = '55000';
    END IF;

    UPDATE dispatched.steps x
       SET status = 'running', phase = 'backoff', response = NULL, signal = NULL, error = NULL,
           wait_deadline = NULL, invocation = NULL, child = NULL, finished_at = NULL,
           updated_at = clock_timestamp()
     WHERE x.run_id = $1 AND x.idx = s.idx;
    UPDATE dispatched.runs x
       SET status = 'running', step_index = s.idx, compensating = false, waiting_for = NULL,
           output = NULL, error = NULL, finished_at = NULL, updated_at = clock_timestamp()
     WHERE x.id = $1;
    INSERT INTO dispatched.tasks AS t (run_id, due_at) VALUES ($1, now())
    ON CONFLICT (run_id) DO UPDATE SET due_at = EXCLUDED.due_at, lease_owner = NULL;
    INSERT INTO dispatched.events (run_id, type, step, data)
    VALUES ($1, 'run.retried', s.step_id,
            jsonb_build_object('step', s.step_id, 'last_attempt', s.attempt, 'by', dispatched._caller()));
    PERFORM dispatched._wake_workers_at_commit();
    RETURN true;
END;
$$;

-- Deletes the caller's finished runs (every tenant's for a superuser) that finished more than
-- `older_than` ago, with their steps, signals and events. Returns how many runs it deleted.
-- Runs not finished are never touched. The activity log (Layer 2) keeps its own retention.
CREATE FUNCTION dispatched.purge(older_than interval)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ids text[];
BEGIN
    IF $1 IS NULL OR $1 < interval '0' THEN
        RAISE EXCEPTION 'older_than: must be zero or more, got %', coalesce($1::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    SELECT array_agg(r.id) INTO v_ids
      FROM dispatched.runs r
     WHERE r.status IN ('completed', 'failed', 'cancelled')
       AND r.finished_at < clock_timestamp() - $1
       AND (r.tenant = dispatched._caller() OR dispatched._caller_is_superuser());
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM dispatched.events e WHERE e.run_id = ANY (v_ids);
    DELETE FROM dispatched.steps s WHERE s.run_id = ANY (v_ids);
    DELETE FROM dispatched.signals g WHERE g.run_id = ANY (v_ids);
    DELETE FROM dispatched.tasks t WHERE t.run_id = ANY (v_ids);
    DELETE FROM dispatched.runs r WHERE r.id = ANY (v_ids);
    RETURN cardinality(v_ids);
END;
$$;

REVOKE EXECUTE ON FUNCTION dispatched.purge(interval) FROM PUBLIC;

-- -- Comments ----------------------------------------------------------------------------------

COMMENT ON SCHEMA dispatched IS 'dispatched: durable HTTP workflows inside PostgreSQL. Functions whose names start with _ are internal.';

COMMENT ON TABLE dispatched.workflows IS 'Every version of every workflow definition; runs keep the version they started with.';
COMMENT ON TABLE dispatched.runs IS 'One row per run: tenant (the role that started it), status, the step it is at, output, error, parent.';
COMMENT ON TABLE dispatched.steps IS 'The state of each step a run has reached (steps not reached have no row and show as pending).';
COMMENT ON TABLE dispatched.tasks IS 'The queue: one row per run with something due at a known time (start, step, retry, delay, wait timeout, lease end).';
COMMENT ON TABLE dispatched.signals IS 'Signals kept until a step waiting for that name takes them.';
COMMENT ON TABLE dispatched.events IS 'The append-only event stream of every run.';
COMMENT ON TABLE dispatched.secrets IS 'Values for {{ secrets.<name> }}; readable by the extension owner only, never shown.';
COMMENT ON TABLE dispatched.idempotency_cache IS 'Layer 1: idempotency claims and cached final answers of the application''s endpoints, per role.';
COMMENT ON TABLE dispatched.invocations IS 'Layer 2: the activity log, outcome per invocation id and tenant; first write wins.';
COMMENT ON TABLE dispatched.session_tokens IS 'Session tokens of the HTTP ingress, as hex sha256 hashes only, with the tenant (role) they act as.';

COMMENT ON VIEW dispatched.runs_by_status IS 'Runs by workflow and status, with the oldest creation and the last change.';
COMMENT ON VIEW dispatched.steps_due IS 'Runs with something due: the step, attempt, and whether it is due now, scheduled, or in flight (leased by a worker).';
COMMENT ON VIEW dispatched.step_attempts IS 'Every attempt of a step request from the events: host, start, outcome (step.response, step.retry_scheduled, step.failed; NULL in flight), HTTP status, duration.';
COMMENT ON VIEW dispatched.step_stats IS 'Per workflow and host: attempts, retry and failure rates per attempt, p50 and p99 attempt durations in ms.';
COMMENT ON VIEW dispatched.oldest_waiting_run IS 'The run that has waited longest for a signal or a child run.';

COMMENT ON FUNCTION dispatched.define_workflow(text, jsonb) IS 'Stores a new version of a workflow when the definition differs from the latest; returns its version. Bad definitions: 22023 naming the JSON path.';
COMMENT ON FUNCTION dispatched.set_secret(text, text) IS 'Sets or replaces a secret for {{ secrets.<name> }}; values are never shown.';
COMMENT ON FUNCTION dispatched.start_run(text, jsonb, text, interval) IS 'Starts a run of the latest version; returns its id. Transactional. With a key: one run per key and tenant (23505 idempotency_key_reused for another workflow or input).';
COMMENT ON FUNCTION dispatched.run(text) IS 'The run document (id, workflow, version, status, input, output, error, parent, steps, times), or NULL.';
COMMENT ON FUNCTION dispatched.output(text) IS 'The output once completed; {"message":"not ready"} while running; {"message":"not found"}; the error document when failed or cancelled.';
COMMENT ON FUNCTION dispatched.attach(text, interval) IS 'Waits (no lock, no polling) until the run finishes, then answers as output(); {"message":"not ready"} after the timeout.';
COMMENT ON FUNCTION dispatched.signal(text, text, jsonb, text) IS 'Delivers a signal (kept until a step waits for it); false for a finished run, P0002 for an unknown one; a keyed signal is delivered once.';
COMMENT ON FUNCTION dispatched.cancel_run(text, text) IS 'Cancels a run that is not finished (true), else false; no further step starts, nothing is compensated.';
COMMENT ON FUNCTION dispatched.events(text) IS 'The run''s event stream in order, numbered from 1.';
COMMENT ON FUNCTION dispatched.idempotency_begin(text, text, text) IS 'Layer 1: claims a key ({"state":"new"}), or answers replay (a cached final answer) or in_flight (another caller holds it).';
COMMENT ON FUNCTION dispatched.idempotency_complete(text, text, integer, jsonb, jsonb, text) IS 'Layer 1: caches a final answer (2xx, non-retryable 4xx) for dispatched.idempotency_retention, or releases the key (408, 429, 5xx, 400, 401, 403).';
COMMENT ON FUNCTION dispatched.idempotency_cache_key(text, text, text) IS 'Layer 1 composite key: hex sha256(tenant '':'' endpoint '':'' key).';
COMMENT ON FUNCTION dispatched.invocation_id(text, text, integer, text) IS 'Layer 2 invocation id: hex sha256(run_id '':'' node_id '':'' attempt '':'' provider_key), attempt zero-based.';
COMMENT ON FUNCTION dispatched.record_invocation(text, text, integer, text, jsonb) IS 'Layer 2: persists an outcome under its invocation id (first write wins) and returns the stored outcome.';
COMMENT ON FUNCTION dispatched.lookup_invocation(text) IS 'Layer 2: the stored outcome of an invocation id, or NULL.';
COMMENT ON FUNCTION dispatched.capabilities() IS 'The OpenWOP capability document, retention figures from the settings.';
COMMENT ON FUNCTION dispatched.decrypt(jsonb) IS 'Superusers: decrypts a body stored encrypted in the events (dispatched.encryption_key).';
COMMENT ON FUNCTION dispatched.create_session_token(text) IS 'HTTP ingress: creates a session token acting as tenant (default the caller; other roles: superusers only). Shown once; stored hashed.';
COMMENT ON FUNCTION dispatched.revoke_session_token(text) IS 'HTTP ingress: revokes a session token (the tenant''s own, one the caller created, or any for a superuser); true when it existed.';
COMMENT ON FUNCTION dispatched.list_runs(text, text, integer) IS 'The caller''s runs (all for a superuser), newest first, filtered by status and by run id or workflow name; with counts per status.';
COMMENT ON FUNCTION dispatched.retry_run(text) IS 'Resumes a failed run at its failed step with new attempt numbers; false if not failed; 55000 if its failure was compensated.';
COMMENT ON FUNCTION dispatched.purge(interval) IS 'Deletes finished runs (the caller''s; all for a superuser) that finished more than older_than ago, with their steps, signals and events; returns the count.';

COMMENT ON FUNCTION dispatched._deliver_signal(text, text, jsonb, text, text) IS 'Internal: delivers a signal to a run of a tenant (any when NULL); NULL unknown, false finished, true delivered.';
COMMENT ON FUNCTION dispatched._cancel_run(text, text, text) IS 'Internal: cancels a run of a tenant (any when NULL); notifies channel dispatched.';
COMMENT ON FUNCTION dispatched._check_json_depth(text, text) IS 'Internal: refuses JSON nested deeper than the limit (22023), counting the text without recursion.';
COMMENT ON FUNCTION dispatched._validate_definition(text) IS 'Internal: validates a workflow definition; 22023 naming every problem with its JSON path.';
COMMENT ON FUNCTION dispatched._check_key(text, text) IS 'Internal: 22023 unless the key is 1 to 255 characters of A-Z a-z 0-9 - . _ ~.';
COMMENT ON FUNCTION dispatched._check_name(text, text, boolean) IS 'Internal: 22023 unless the name is valid (workflow, signal, secret).';
COMMENT ON FUNCTION dispatched._new_run_id() IS 'Internal: a new run id, run_ and 22 URL-safe characters (128 random bits).';
COMMENT ON FUNCTION dispatched._caller() IS 'Internal: the role the caller acts as (its tenant).';
COMMENT ON FUNCTION dispatched._caller_is_superuser() IS 'Internal: whether the caller is a superuser (sees every tenant).';
COMMENT ON FUNCTION dispatched._cache_decision(integer) IS 'Internal: cache or release, what idempotency_complete does with an HTTP status.';
COMMENT ON FUNCTION dispatched._setting_ms(text) IS 'Internal: a duration setting in milliseconds.';
COMMENT ON FUNCTION dispatched._preloaded() IS 'Internal: whether the library is in shared_preload_libraries (workers can run).';
COMMENT ON FUNCTION dispatched._wake_workers_at_commit() IS 'Internal: wakes the workers when the transaction commits.';
COMMENT ON FUNCTION dispatched._run_finished_at_commit() IS 'Internal: wakes attach (and the HTTP ingress) when the transaction commits.';
COMMENT ON FUNCTION dispatched._wait_finished(text, bigint) IS 'Internal: sleeps until the run finishes or the timeout (ms) passes; no lock, no polling.';
COMMENT ON FUNCTION dispatched._new_session_token() IS 'Internal: a new session token, dps_ and 43 URL-safe characters (256 random bits).';
COMMENT ON FUNCTION dispatched._session_token_hash(text) IS 'Internal: hex sha256 of a session token, the form it is stored in.';
