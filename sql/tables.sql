-- dispatched: the tables. Everything the engine knows is in these tables; nothing lives only
-- in memory. The functions in the other files are the only way ordinary roles reach them
-- (see privileges.sql).
--
-- Design for the worker's hot path:
--   * `tasks` is the queue: one narrow row per run that has something to do at a due time
--     (start, next step, retry, delay, wait timeout). Workers claim due rows in batches with
--     FOR UPDATE SKIP LOCKED over the index on due_at; a claim sets a lease (lease_owner,
--     lease_until) without touching due_at, so claims and lease renewals are HOT updates, and
--     a worker that dies leaves the row to be claimed again when the lease ends.
--     A run that waits for a signal without a timeout, or is finished, has no task row, so
--     the queue and its index hold only live work and stay small.
--   * `runs` and `steps` are updated in place at every transition; they carry no index on
--     a column that changes and leave room on each page (fillfactor), so those updates are
--     HOT.
--   * `events` is append-only, keyed by (run_id, seq). A step's answer is stored once: in its
--     step row, not again in its step.succeeded event (see answer_in_step).
--   * Expired Layer 1 and Layer 2 rows are found by their expires_at index and deleted in
--     small batches; reads ignore expired rows, so correctness never waits for a purge.

-- The schema is created here, by the extension script, so that it belongs to the extension
-- and DROP EXTENSION removes it (a schema named in the control file would not).
CREATE SCHEMA dispatched;

-- Workflow definitions, one row per version. Runs keep the version they started with.
CREATE TABLE dispatched.workflows (
    name        text        NOT NULL,
    version     integer     NOT NULL CHECK (version OPERATOR(pg_catalog.>) 0),
    definition  jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by  text        NOT NULL,
    PRIMARY KEY (name, version)
);

-- Runs. `tenant` is the role that started the run: a role sees only its own runs.
-- The unique (tenant, idempotency_key) index makes start_run idempotent: the run's identity
-- is its key (DBOS), and this table is the Layer 1 cache of start_run.
CREATE TABLE dispatched.runs (
    id               text COLLATE pg_catalog."C" PRIMARY KEY,
    tenant           text COLLATE pg_catalog."C" NOT NULL,
    workflow         text        NOT NULL,
    version          integer     NOT NULL,
    input            jsonb       NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running', 'waiting', 'completed', 'failed', 'cancelled']::pg_catalog.text[])),
    -- index into the definition's steps of the step the run is at
    step_index       integer     NOT NULL DEFAULT 0,
    -- true while failed-run compensation walks back through the succeeded steps
    compensating     boolean     NOT NULL DEFAULT false,
    -- the signal name the current step waits for, if it waits
    waiting_for      text,
    output           jsonb,
    error            jsonb,
    parent           text COLLATE pg_catalog."C",
    idempotency_key  text COLLATE pg_catalog."C",
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    finished_at      timestamptz,
    FOREIGN KEY (workflow, version) REFERENCES dispatched.workflows (name, version)
) WITH (fillfactor = 60);

CREATE UNIQUE INDEX runs_idempotency_key ON dispatched.runs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_parent ON dispatched.runs (parent) WHERE parent IS NOT NULL;
CREATE INDEX runs_tenant_created ON dispatched.runs (tenant, created_at);

-- The state of each step a run has reached. Steps not reached yet have no row and show as
-- `pending` in dispatched.run().
--
-- Identifiers (run ids, tenants, keys, invocation ids) compare byte by byte (COLLATE "C"):
-- they are ASCII, and every index lookup on them skips the locale's string comparison.
--
-- steps, tasks and signals name their run without a foreign key: the worker writes these rows
-- by the thousand per second, and a foreign key check per row costs a lookup and a row lock on
-- the run (WAL too). Only the extension's functions write them, always for an existing run,
-- and dispatched.purge() deletes them with their run.
CREATE TABLE dispatched.steps (
    run_id       text COLLATE pg_catalog."C" NOT NULL,
    idx          integer     NOT NULL,
    step_id      text        NOT NULL,
    status       text        NOT NULL
                 CHECK (status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'running', 'waiting', 'succeeded', 'failed', 'compensated']::pg_catalog.text[])),
    -- where the step is within its status: request (an attempt on the wire), backoff,
    -- wait (for a signal), child (for an attached child run), done
    phase        text        NOT NULL DEFAULT 'request'
                 CHECK (phase OPERATOR(pg_catalog.=) ANY (ARRAY['request', 'backoff', 'wait', 'child', 'done']::pg_catalog.text[])),
    attempt      integer     NOT NULL DEFAULT 0,
    response     jsonb,
    signal       jsonb,
    error        jsonb,
    wait_deadline timestamptz,
    -- Layer 2 invocation id of the attempt on the wire, to find its logged outcome
    invocation   text,
    -- compensation: its attempt and phase (request, backoff, done)
    comp_attempt integer     NOT NULL DEFAULT 0,
    comp_phase   text,
    -- the child run this step waits for (Dispatched-Spawn mode=attach)
    child        text,
    started_at   timestamptz,
    finished_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (run_id, idx)
) WITH (fillfactor = 50);

-- The queue: what is due when. See the header.
CREATE TABLE dispatched.tasks (
    run_id       text COLLATE pg_catalog."C" PRIMARY KEY,
    -- when the task is due; a lease leaves it as it is (so lease updates are HOT)
    due_at       timestamptz NOT NULL,
    -- which worker holds the lease and until when (NULL: nobody); a leased task is claimed
    -- again only once its lease has run out
    lease_owner  integer,
    lease_until  timestamptz,
    -- how many times the task was claimed: an answer counts only for the current claim
    claims       integer     NOT NULL DEFAULT 0
) WITH (fillfactor = 30);

CREATE INDEX tasks_due ON dispatched.tasks (due_at);

-- Signals, kept until a step that waits for that name takes them (buffered signals).
CREATE TABLE dispatched.signals (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id           text COLLATE pg_catalog."C" NOT NULL,
    name             text        NOT NULL,
    data             jsonb,
    idempotency_key  text COLLATE pg_catalog."C",
    -- index of the step that took the signal; NULL while buffered
    taken_by_step    integer,
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE INDEX signals_buffered ON dispatched.signals (run_id, name, id) WHERE taken_by_step IS NULL;
CREATE UNIQUE INDEX signals_idempotency_key ON dispatched.signals (run_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The event stream of each run, append-only.
CREATE TABLE dispatched.events (
    run_id  text COLLATE pg_catalog."C" NOT NULL,
    seq     bigint      GENERATED ALWAYS AS IDENTITY,
    at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    type    text        NOT NULL,
    step    text,
    data    jsonb,
    -- step.succeeded only: the answer (status, headers, body) is not copied into data; it is
    -- the step's response in dispatched.steps, stored once, and dispatched.events() shows it
    answer_in_step boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, seq)
);

-- Secrets for `{{ secrets.<name> }}`. No role but the extension's owner can read this table.
CREATE TABLE dispatched.secrets (
    name        text        PRIMARY KEY,
    value       text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_by  text        NOT NULL
);

-- Layer 1: the request idempotency cache of the application's own endpoints (OpenWOP).
-- Keyed by the role that uses it and the composite key sha256(tenant:endpoint:key), so that
-- one database role can never read another's cached answers.
CREATE TABLE dispatched.idempotency_cache (
    role        text COLLATE pg_catalog."C" NOT NULL,
    cache_key   text COLLATE pg_catalog."C" NOT NULL,
    tenant      text        NOT NULL,
    endpoint    text        NOT NULL,
    key         text        NOT NULL,
    state       text        NOT NULL CHECK (state OPERATOR(pg_catalog.=) ANY (ARRAY['in_flight', 'final']::pg_catalog.text[])),
    status      integer,
    headers     jsonb,
    body        jsonb,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- in_flight: when the claim lapses; final: when the cached answer expires
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (role, cache_key)
);

CREATE INDEX idempotency_cache_expires ON dispatched.idempotency_cache (expires_at);

-- Layer 2: the activity (invocation) log, keyed by invocation id per tenant. The worker
-- writes each step attempt's outcome here before the run moves on; applications write their
-- own side effects with record_invocation. First write wins.
CREATE TABLE dispatched.invocations (
    tenant         text COLLATE pg_catalog."C" NOT NULL,
    invocation_id  text COLLATE pg_catalog."C" NOT NULL,
    run_id         text COLLATE pg_catalog."C" NOT NULL,
    node_id        text        NOT NULL,
    attempt        integer     NOT NULL,
    provider_key   text        NOT NULL,
    outcome        jsonb       NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at     timestamptz NOT NULL,
    PRIMARY KEY (tenant, invocation_id)
);

CREATE INDEX invocations_expires ON dispatched.invocations (expires_at);
