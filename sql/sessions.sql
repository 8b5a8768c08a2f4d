-- Session tokens of the HTTP ingress. A token acts as its tenant (a database role): over
-- HTTP it sees and does exactly what that role sees and does through the SQL API. Tokens
-- are stored only as hex sha256 hashes; the clear token is shown once, when it is created.

CREATE TABLE dispatched.session_tokens (
    token_hash  text        PRIMARY KEY,
    tenant      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by  text        NOT NULL
);

CREATE INDEX session_tokens_tenant ON dispatched.session_tokens (tenant);

-- Creates a session token for `tenant` (default: the calling role) and returns it. Only a
-- superuser may create a token for another role. The token is not stored, only its hash:
-- keep it, it cannot be shown again.
CREATE FUNCTION dispatched.create_session_token(tenant text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant text := coalesce($1, dispatched._caller());
    v_token  text;
BEGIN
    IF v_tenant <> dispatched._caller() AND NOT dispatched._caller_is_superuser() THEN
        RAISE EXCEPTION 'only a superuser may create a session token for another role ("%")', v_tenant
            USING ERRCODE = '42501';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = v_tenant) THEN
        RAISE EXCEPTION 'role "%" does not exist', v_tenant USING ERRCODE = '42704';
    END IF;
    v_token := dispatched._new_session_token();
    INSERT INTO dispatched.session_tokens (token_hash, tenant, created_by)
    VALUES (dispatched._session_token_hash(v_token), v_tenant, dispatched._caller());
    RETURN v_token;
END;
$$;

-- Revokes a session token: true when it existed (and was the caller's own, or the caller
-- created it, or the caller is a superuser), else false. Requests with it get 401 at once.
CREATE FUNCTION dispatched.revoke_session_token(token text)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF $1 IS NULL THEN
        RETURN false;
    END IF;
    DELETE FROM dispatched.session_tokens t
     WHERE t.token_hash = dispatched._session_token_hash($1)
       AND (t.tenant = dispatched._caller() OR t.created_by = dispatched._caller()
            OR dispatched._caller_is_superuser());
    RETURN FOUND;
END;
$$;

-- Runs of the calling role (every run for a superuser), newest first, for the dashboard and
-- GET /api/runs: optionally only one status, and `q` matching a run id (exactly or as a
-- prefix) or part of a workflow name. Returns {"runs": [..], "counts": {status: n}} where
-- counts ignore the status filter (they label the dashboard's filter buttons).
CREATE FUNCTION dispatched.list_runs(status text DEFAULT NULL, q text DEFAULT NULL, "limit" integer DEFAULT 50)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_all    boolean := dispatched._caller_is_superuser();
    v_tenant text := dispatched._caller();
    v_runs   jsonb;
    v_counts jsonb;
BEGIN
    IF $3 IS NULL OR $3 < 1 OR $3 > 500 THEN
        RAISE EXCEPTION 'limit: 1 to 500, not %', coalesce($3::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', r.id, 'workflow', r.workflow, 'version', r.version, 'status', r.status,
               'parent', r.parent, 'tenant', r.tenant,
               'step', (SELECT d.step ->> 'id' FROM dispatched.workflows w,
                               jsonb_array_elements(w.definition -> 'steps') WITH ORDINALITY AS d (step, n)
                         WHERE w.name = r.workflow AND w.version = r.version AND d.n = r.step_index + 1),
               'waiting_for', r.waiting_for,
               'created_at', r.created_at, 'updated_at', r.updated_at, 'finished_at', r.finished_at)
               ORDER BY r.created_at DESC, r.id), '[]'::jsonb)
      INTO v_runs
      FROM (SELECT * FROM dispatched.runs r
             WHERE (v_all OR r.tenant = v_tenant)
               AND ($1 IS NULL OR r.status = $1)
               AND ($2 IS NULL OR r.id = $2 OR r.id LIKE replace(replace(replace($2, '\', '\\'), '%', '\%'), '_', '\_') || '%'
                    OR r.workflow ILIKE '%' || replace(replace(replace($2, '\', '\\'), '%', '\%'), '_', '\_') || '%')
             ORDER BY r.created_at DESC, r.id
             LIMIT $3) r;
    SELECT coalesce(jsonb_object_agg(c.status, c.n), '{}'::jsonb) INTO v_counts
      FROM (SELECT r.status, count(*) AS n FROM dispatched.runs r
             WHERE (v_all OR r.tenant = v_tenant)
               AND ($2 IS NULL OR r.id = $2 OR r.id LIKE replace(replace(replace($2, '\', '\\'), '%', '\%'), '_', '\_') || '%'
                    OR r.workflow ILIKE '%' || replace(replace(replace($2, '\', '\\'), '%', '\%'), '_', '\_') || '%')
             GROUP BY r.status) c;
    RETURN jsonb_build_object('runs', v_runs, 'counts', v_counts);
END;
$$;
