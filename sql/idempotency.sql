-- Idempotency for the application's own endpoints (Layer 1), the activity log of its own
-- side effects (Layer 2), and the capability advertisement. Both are per database role:
-- a role never sees another role's entries.

-- Begins a request under an idempotency key.
--   {"state":"new"}                          the caller owns the key and must complete it
--   {"state":"replay","status":..,"headers":{..},"body":..}   a final answer is cached
--   {"state":"in_flight","retry_after":1}    another caller holds the key
-- A claim that is never completed lapses after dispatched.idempotency_lock_timeout.
CREATE FUNCTION dispatched.idempotency_begin(endpoint text, key text, tenant text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_role   text := dispatched._caller();
    v_tenant text := coalesce($3, dispatched._caller());
    v_ck     text;
    v_new    boolean;
    r        record;
BEGIN
    IF $1 IS NULL OR $1 = '' THEN
        RAISE EXCEPTION 'endpoint: required' USING ERRCODE = '22023';
    END IF;
    IF $2 IS NULL THEN
        RAISE EXCEPTION 'key: required' USING ERRCODE = '22023';
    END IF;
    PERFORM dispatched._check_key('key', $2);
    v_ck := dispatched.idempotency_cache_key(v_tenant, $1, $2);

    INSERT INTO dispatched.idempotency_cache AS c
           (role, cache_key, tenant, endpoint, key, state, expires_at)
    VALUES (v_role, v_ck, v_tenant, $1, $2, 'in_flight',
            clock_timestamp() + dispatched._setting_ms('idempotency_lock_timeout') * interval '1 millisecond')
    ON CONFLICT (role, cache_key) DO UPDATE
        SET state = 'in_flight', status = NULL, headers = NULL, body = NULL,
            created_at = now(), expires_at = EXCLUDED.expires_at
        WHERE c.expires_at <= clock_timestamp()
    RETURNING true INTO v_new;
    IF v_new THEN
        RETURN '{"state": "new"}'::jsonb;
    END IF;

    SELECT c.state, c.status, c.headers, c.body INTO r
      FROM dispatched.idempotency_cache c
     WHERE c.role = v_role AND c.cache_key = v_ck;
    IF r.state = 'final' THEN
        RETURN jsonb_build_object('state', 'replay', 'status', r.status,
                                  'headers', coalesce(r.headers, '{}'::jsonb), 'body', r.body);
    END IF;
    RETURN '{"state": "in_flight", "retry_after": 1}'::jsonb;
END;
$$;

-- Completes a request begun with idempotency_begin. Final outcomes (2xx and non-retryable
-- 4xx) are cached for dispatched.idempotency_retention, with their headers (Set-Cookie
-- excepted); retryable outcomes (408, 429, 5xx) and 400/401/403 release the key so that the
-- next caller executes again. A final answer already cached is never replaced.
CREATE FUNCTION dispatched.idempotency_complete(
    endpoint text,
    key      text,
    status   integer,
    body     jsonb,
    headers  jsonb DEFAULT '{}',
    tenant   text  DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_role     text := dispatched._caller();
    v_tenant   text := coalesce($6, dispatched._caller());
    v_ck       text;
    v_headers  jsonb;
BEGIN
    IF $1 IS NULL OR $1 = '' THEN
        RAISE EXCEPTION 'endpoint: required' USING ERRCODE = '22023';
    END IF;
    IF $2 IS NULL THEN
        RAISE EXCEPTION 'key: required' USING ERRCODE = '22023';
    END IF;
    PERFORM dispatched._check_key('key', $2);
    IF $3 IS NULL THEN
        RAISE EXCEPTION 'status: required' USING ERRCODE = '22023';
    END IF;
    IF $5 IS NOT NULL AND jsonb_typeof($5) <> 'object' THEN
        RAISE EXCEPTION 'headers: must be a JSON object, not %', jsonb_typeof($5) USING ERRCODE = '22023';
    END IF;
    v_ck := dispatched.idempotency_cache_key(v_tenant, $1, $2);

    IF dispatched._cache_decision($3) = 'release' THEN
        DELETE FROM dispatched.idempotency_cache c
         WHERE c.role = v_role AND c.cache_key = v_ck
           AND (c.state = 'in_flight' OR c.expires_at <= clock_timestamp());
        RETURN;
    END IF;

    SELECT coalesce(jsonb_object_agg(h.key, h.value), '{}'::jsonb) INTO v_headers
      FROM jsonb_each(coalesce($5, '{}'::jsonb)) h
     WHERE lower(h.key) <> 'set-cookie';

    INSERT INTO dispatched.idempotency_cache AS c
           (role, cache_key, tenant, endpoint, key, state, status, headers, body, expires_at)
    VALUES (v_role, v_ck, v_tenant, $1, $2, 'final', $3, v_headers, $4,
            clock_timestamp() + dispatched._setting_ms('idempotency_retention') * interval '1 millisecond')
    ON CONFLICT (role, cache_key) DO UPDATE
        SET state = 'final', status = EXCLUDED.status, headers = EXCLUDED.headers,
            body = EXCLUDED.body, expires_at = EXCLUDED.expires_at
        WHERE c.state = 'in_flight' OR c.expires_at <= clock_timestamp();
END;
$$;

-- Persists a side effect's outcome (success or failure) under its invocation id; the first
-- write wins and every call returns the stored outcome. Kept for
-- dispatched.invocation_retention. Needs no run: the log is keyed by invocation id per role.
CREATE FUNCTION dispatched.record_invocation(
    run_id       text,
    node_id      text,
    attempt      integer,
    provider_key text,
    outcome      jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant text := dispatched._caller();
    v_id     text;
    v_out    jsonb;
BEGIN
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL OR $4 IS NULL THEN
        RAISE EXCEPTION '%: required',
            CASE WHEN $1 IS NULL THEN 'run_id' WHEN $2 IS NULL THEN 'node_id'
                 WHEN $3 IS NULL THEN 'attempt' ELSE 'provider_key' END
            USING ERRCODE = '22023';
    END IF;
    IF $5 IS NULL THEN
        RAISE EXCEPTION 'outcome: required' USING ERRCODE = '22023';
    END IF;
    PERFORM dispatched._check_json_depth('outcome', $5::text);
    v_id := dispatched.invocation_id($1, $2, $3, $4);

    INSERT INTO dispatched.invocations AS i
           (tenant, invocation_id, run_id, node_id, attempt, provider_key, outcome, expires_at)
    VALUES (v_tenant, v_id, $1, $2, $3, $4, $5,
            clock_timestamp() + dispatched._setting_ms('invocation_retention') * interval '1 millisecond')
    ON CONFLICT (tenant, invocation_id) DO UPDATE
        SET outcome = EXCLUDED.outcome, recorded_at = now(), expires_at = EXCLUDED.expires_at,
            run_id = EXCLUDED.run_id, node_id = EXCLUDED.node_id, attempt = EXCLUDED.attempt,
            provider_key = EXCLUDED.provider_key
        WHERE i.expires_at <= clock_timestamp();

    SELECT i.outcome INTO v_out
      FROM dispatched.invocations i
     WHERE i.tenant = v_tenant AND i.invocation_id = v_id;
    RETURN v_out;
END;
$$;

-- The stored outcome of an invocation, or NULL (unknown or expired). A superuser also finds
-- invocations recorded for other roles, such as the worker's for a run's steps.
CREATE FUNCTION dispatched.lookup_invocation(invocation_id text)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN (
        SELECT i.outcome
          FROM dispatched.invocations i
         WHERE i.invocation_id = $1
           AND i.expires_at > clock_timestamp()
           AND (i.tenant = dispatched._caller() OR dispatched._caller_is_superuser())
         ORDER BY (i.tenant = dispatched._caller()) DESC, i.recorded_at
         LIMIT 1);
END;
$$;

-- The OpenWOP capability advertisement, with the retention figures read from the settings.
CREATE FUNCTION dispatched.capabilities()
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN jsonb_build_object('capabilities', jsonb_build_object('idempotency', jsonb_build_object(
        'supported', true,
        'layer1RetentionSeconds', dispatched._setting_ms('idempotency_retention') / 1000,
        'layer2RetentionSeconds', dispatched._setting_ms('invocation_retention') / 1000,
        'crossRegion', 'single-region')));
END;
$$;
