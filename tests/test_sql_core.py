"""Black-box tests of the SQL API for what needs several sessions: concurrency, visibility
across transactions, wake-ups across sessions, roles, and DROP/CREATE EXTENSION."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

WAIT_ONLY = {"steps": [{"id": "w", "wait": {"signal": "go"}}]}


def key() -> str:
    return "k-" + uuid.uuid4().hex


@pytest.fixture
def wait_only(define_workflow) -> str:
    """A workflow whose one step waits for the signal `go` (no HTTP)."""
    return define_workflow(WAIT_ONLY)


def one(conn, query, params=()):
    return conn.execute(query, params).fetchone()[0]


# -- start_run with one idempotency key from many sessions at once ---------------------------


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_start_run_with_one_key_starts_one_run(connect, wait_only, round_):
    n = 16
    k = key()
    conns = [connect() for _ in range(n)]
    barrier = threading.Barrier(n)
    results: list[str | None] = [None] * n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = one(
                conns[i], "SELECT dispatched.start_run(%s, %s, %s)", (wait_only, Jsonb({"n": 1}), k)
            )
        except BaseException as e:  # noqa: BLE001 - every failure is reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a start_run call hung"
    assert errors == []
    assert len(set(results)) == 1, results
    run_id = results[0]
    assert run_id.startswith("run_")

    admin = connect()
    assert one(admin, "SELECT count(*) FROM dispatched.runs WHERE idempotency_key = %s", (k,)) == 1
    assert one(admin, "SELECT count(*) FROM dispatched.runs WHERE id = %s", (run_id,)) == 1
    started = one(
        admin, "SELECT count(*) FROM dispatched.events(%s) WHERE type = 'run.started'", (run_id,)
    )
    assert started == 1


# -- attach is woken by a cancel committed in another session -------------------------------


def test_attach_is_woken_by_cancel_run_in_another_session(connect, wait_only):
    starter = connect()
    run_id = one(starter, "SELECT dispatched.start_run(%s)", (wait_only,))
    attacher = connect()
    attacher_pid = attacher.info.backend_pid
    result: dict = {}

    def attach() -> None:
        t0 = time.monotonic()
        try:
            result["doc"] = one(attacher, "SELECT dispatched.attach(%s, '20s')", (run_id,))
        except BaseException as e:  # noqa: BLE001
            result["error"] = e
        result["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=attach)
    t.start()
    time.sleep(0.5)  # the one deliberate pause: let attach go to sleep before the cancel

    other = connect()
    # attach is asleep on the run-finished condition variable, not polling and not holding locks
    state, wait_type = other.execute(
        "SELECT state, wait_event_type FROM pg_stat_activity WHERE pid = %s", (attacher_pid,)
    ).fetchone()
    assert (state, wait_type) == ("active", "Extension")
    assert one(other, "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", (attacher_pid,)) == 0

    assert one(other, "SELECT dispatched.cancel_run(%s, 'changed my mind')", (run_id,)) is True
    cancelled_at = time.monotonic()
    t.join(10)
    assert not t.is_alive(), "attach did not return"
    woke_after = time.monotonic() - cancelled_at
    assert "error" not in result, result.get("error")
    assert result["elapsed"] < 5, f"attach returned after {result['elapsed']:.2f}s, not at the cancel"
    assert woke_after < 5
    doc = result["doc"]
    assert doc["message"].startswith("cancelled")
    assert "changed my mind" in doc["message"]
    assert "step" in doc and "status" in doc and doc["status"] is None
    assert doc == one(other, "SELECT dispatched.output(%s)", (run_id,))
    run = one(other, "SELECT dispatched.run(%s)", (run_id,))
    assert run["status"] == "cancelled" and run["error"] == doc


def test_attach_times_out_with_not_ready(connect, wait_only):
    conn = connect()
    run_id = one(conn, "SELECT dispatched.start_run(%s)", (wait_only,))
    t0 = time.monotonic()
    assert one(conn, "SELECT dispatched.attach(%s, '300ms')", (run_id,)) == {"message": "not ready"}
    assert 0.25 <= time.monotonic() - t0 < 5
    assert one(conn, "SELECT dispatched.cancel_run(%s)", (run_id,)) is True


# -- transactions: nothing is visible before commit, nothing is left after rollback ----------


def test_uncommitted_start_run_is_invisible_to_another_session(connect, wait_only):
    a = connect(autocommit=False)
    b = connect()
    run_id = one(a, "SELECT dispatched.start_run(%s)", (wait_only,))
    assert one(a, "SELECT dispatched.run(%s) ->> 'status'", (run_id,)) == "pending"  # A sees it
    assert one(b, "SELECT dispatched.run(%s)", (run_id,)) is None
    assert one(b, "SELECT dispatched.output(%s)", (run_id,)) == {"message": "not found"}
    assert one(b, "SELECT count(*) FROM dispatched.runs WHERE id = %s", (run_id,)) == 0
    a.commit()
    # pending, or already picked up by a worker
    assert one(b, "SELECT dispatched.run(%s) ->> 'status'", (run_id,)) in ("pending", "running", "waiting")
    assert one(b, "SELECT dispatched.output(%s)", (run_id,)) == {"message": "not ready"}
    assert one(b, "SELECT dispatched.cancel_run(%s)", (run_id,)) is True


def test_rolled_back_start_run_leaves_no_run(connect, wait_only):
    a = connect(autocommit=False)
    b = connect()
    run_id = one(a, "SELECT dispatched.start_run(%s)", (wait_only,))
    assert one(b, "SELECT dispatched.run(%s)", (run_id,)) is None  # never seen by B ...
    a.rollback()
    assert one(b, "SELECT dispatched.run(%s)", (run_id,)) is None  # ... and now gone
    for table, column in [("runs", "id"), ("tasks", "run_id"), ("events", "run_id"), ("steps", "run_id")]:
        count = one(b, f"SELECT count(*) FROM dispatched.{table} WHERE {column} = %s", (run_id,))
        assert count == 0, f"dispatched.{table} kept a row of the rolled-back run"
    a.autocommit = True
    assert one(a, "SELECT dispatched.run(%s)", (run_id,)) is None
    with pytest.raises(psycopg.errors.NoDataFound):  # P0002: unknown run
        a.execute("SELECT dispatched.signal(%s, 'go')", (run_id,))


def test_rolled_back_keyed_start_run_frees_the_key(connect, wait_only):
    k = key()
    a = connect(autocommit=False)
    first = one(a, "SELECT dispatched.start_run(%s, '{}', %s)", (wait_only, k))
    a.rollback()
    b = connect()
    second = one(b, "SELECT dispatched.start_run(%s, '{}', %s)", (wait_only, k))
    assert second != first
    assert one(b, "SELECT count(*) FROM dispatched.runs WHERE idempotency_key = %s", (k,)) == 1
    assert one(b, "SELECT dispatched.start_run(%s, '{}', %s)", (wait_only, k)) == second


def test_signal_to_an_uncommitted_run_is_unknown_elsewhere(connect, wait_only):
    a = connect(autocommit=False)
    b = connect()
    run_id = one(a, "SELECT dispatched.start_run(%s)", (wait_only,))
    with pytest.raises(psycopg.errors.NoDataFound):
        b.execute("SELECT dispatched.signal(%s, 'go')", (run_id,))
    a.commit()
    assert one(b, "SELECT dispatched.signal(%s, 'go', '{\"ok\": true}')", (run_id,)) is True
    types = [r[0] for r in b.execute("SELECT type FROM dispatched.events(%s) ORDER BY seq", (run_id,))]
    assert types[0] == "run.started" and types.count("signal.received") == 1
    b.execute("SELECT dispatched.cancel_run(%s)", (run_id,))  # unless a worker finished it already


# -- Layer 1 across sessions -----------------------------------------------------------------


def test_idempotency_begin_in_flight_then_replay_across_sessions(connect):
    endpoint, k = "POST /orders", key()
    a, b = connect(), connect()
    assert one(a, "SELECT dispatched.idempotency_begin(%s, %s)", (endpoint, k)) == {"state": "new"}
    in_flight = one(b, "SELECT dispatched.idempotency_begin(%s, %s)", (endpoint, k))
    assert in_flight["state"] == "in_flight"
    assert isinstance(in_flight["retry_after"], (int, float)) and in_flight["retry_after"] > 0

    a.execute(
        "SELECT dispatched.idempotency_complete(%s, %s, 201, %s, %s)",
        (endpoint, k, Jsonb({"order": 7}), Jsonb({"Location": "/orders/7"})),
    )
    replay = one(b, "SELECT dispatched.idempotency_begin(%s, %s)", (endpoint, k))
    assert replay == {"state": "replay", "status": 201, "headers": {"Location": "/orders/7"}, "body": {"order": 7}}


def test_idempotency_retryable_outcome_releases_the_key_for_another_session(connect):
    endpoint, k = "POST /pay", key()
    a, b = connect(), connect()
    assert one(a, "SELECT dispatched.idempotency_begin(%s, %s)", (endpoint, k)) == {"state": "new"}
    a.execute("SELECT dispatched.idempotency_complete(%s, %s, 503, %s)", (endpoint, k, Jsonb({"e": 1})))
    assert one(b, "SELECT dispatched.idempotency_begin(%s, %s)", (endpoint, k)) == {"state": "new"}


def test_idempotency_keys_of_different_roles_do_not_meet(connect, make_role):
    endpoint, k = "POST /orders", key()
    alice, bob = make_role(), make_role()
    a, b = connect(user=alice), connect(user=bob)
    assert one(a, "SELECT dispatched.idempotency_begin(%s, %s)", (endpoint, k)) == {"state": "new"}
    assert one(b, "SELECT dispatched.idempotency_begin(%s, %s)", (endpoint, k)) == {"state": "new"}


# -- roles -----------------------------------------------------------------------------------


def test_a_role_sees_only_its_own_runs(connect, make_role, wait_only):
    alice, bob = make_role(), make_role()
    a, b, admin = connect(user=alice), connect(user=bob), connect()
    run_id = one(a, "SELECT dispatched.start_run(%s)", (wait_only,))
    assert one(a, "SELECT dispatched.run(%s) ->> 'id'", (run_id,)) == run_id
    assert one(b, "SELECT dispatched.run(%s)", (run_id,)) is None
    assert one(b, "SELECT dispatched.output(%s)", (run_id,)) == {"message": "not found"}
    assert one(b, "SELECT dispatched.cancel_run(%s)", (run_id,)) is False
    assert b.execute("SELECT * FROM dispatched.events(%s)", (run_id,)).fetchall() == []
    with pytest.raises(psycopg.errors.NoDataFound):
        b.execute("SELECT dispatched.signal(%s, 'go')", (run_id,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        b.execute("SELECT count(*) FROM dispatched.runs")
    assert one(admin, "SELECT dispatched.run(%s) ->> 'id'", (run_id,)) == run_id  # superuser
    assert one(a, "SELECT dispatched.cancel_run(%s)", (run_id,)) is True


def test_ordinary_role_cannot_define_workflows_or_set_secrets(connect, make_role):
    c = connect(user=make_role())
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("SELECT dispatched.define_workflow('nope', %s)", (Jsonb(WAIT_ONLY),))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("SELECT dispatched.set_secret('nope', 'x')")


# -- DROP EXTENSION / CREATE EXTENSION (in a database of its own) ----------------------------


def test_drop_extension_removes_every_object_and_create_works_again(cluster):
    db = cluster.create_database(extension=True)
    try:
        with cluster.connect(db) as conn:
            conn.execute("SELECT dispatched.define_workflow('w', %s)", (Jsonb(WAIT_ONLY),))
            run_id = one(conn, "SELECT dispatched.start_run('w')")
            assert run_id.startswith("run_")
            conn.execute("DROP EXTENSION dispatched")
            assert one(conn, "SELECT count(*) FROM pg_extension WHERE extname = 'dispatched'") == 0
            in_schema = """
                SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = 'dispatched')
                     + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                         WHERE n.nspname = 'dispatched')
                     + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                         WHERE n.nspname = 'dispatched')"""
            assert one(conn, in_schema) == 0
            assert one(conn, "SELECT count(*) FROM pg_proc WHERE proname IN ('start_run', '_check_key')") == 0

            conn.execute("CREATE EXTENSION dispatched")
            assert one(conn, "SELECT count(*) FROM dispatched.workflows") == 0
            assert one(conn, "SELECT dispatched.run(%s)", (run_id,)) is None
            assert one(conn, "SELECT dispatched.define_workflow('w', %s)", (Jsonb(WAIT_ONLY),)) == 1
            assert one(conn, "SELECT dispatched.start_run('w')").startswith("run_")
    finally:
        cluster.drop_database(db)


def test_drop_extension_removes_the_schema(cluster):
    db = cluster.create_database(extension=True)
    try:
        with cluster.connect(db) as conn:
            conn.execute("DROP EXTENSION dispatched")
            assert one(conn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'dispatched'") == 0
    finally:
        cluster.drop_database(db)
