-- Workflow definitions and secrets.

-- Stores a new version of a workflow when the definition differs from the latest version
-- (A, B, A gives version 3) and returns its version; an identical definition returns the
-- existing version. An invalid definition is refused with SQLSTATE 22023 naming every
-- problem with its JSON path; nothing is stored.
CREATE FUNCTION dispatched.define_workflow(name text, definition jsonb)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_latest record;
BEGIN
    IF $1 IS NULL THEN
        RAISE EXCEPTION 'name: required' USING ERRCODE = '22023';
    END IF;
    IF $2 IS NULL THEN
        RAISE EXCEPTION 'definition: required' USING ERRCODE = '22023';
    END IF;
    PERFORM dispatched._check_name('workflow name', $1, true);
    PERFORM dispatched._validate_definition($2::text);

    -- One definer of a name at a time, so versions are gapless and never collide.
    PERFORM pg_advisory_xact_lock(hashtextextended('dispatched.workflow:' || $1, 0));

    SELECT w.version, w.definition INTO v_latest
      FROM dispatched.workflows w
     WHERE w.name = $1
     ORDER BY w.version DESC
     LIMIT 1;
    IF FOUND AND v_latest.definition = $2 THEN
        RETURN v_latest.version;
    END IF;

    INSERT INTO dispatched.workflows (name, version, definition, created_by)
    VALUES ($1, coalesce(v_latest.version, 0) + 1, $2, dispatched._caller());
    RETURN coalesce(v_latest.version, 0) + 1;
END;
$$;

-- Sets (or replaces) a secret for {{ secrets.<name> }}. Values are never shown again.
CREATE FUNCTION dispatched.set_secret(name text, value text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF $1 IS NULL THEN
        RAISE EXCEPTION 'name: required' USING ERRCODE = '22023';
    END IF;
    IF $2 IS NULL THEN
        RAISE EXCEPTION 'value: required' USING ERRCODE = '22023';
    END IF;
    PERFORM dispatched._check_name('secret name', $1, false);
    INSERT INTO dispatched.secrets AS s (name, value, updated_by)
    VALUES ($1, $2, dispatched._caller())
    ON CONFLICT (name) DO UPDATE
        SET value = EXCLUDED.value, updated_at = now(), updated_by = EXCLUDED.updated_by;
END;
$$;
