"""Black-box tests of psql administration: LISTEN dispatched, retry_run, purge, and the
operator views, on the session cluster with its worker and the programmable service."""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

from harness import Reply


def one(conn, query, params=()):
    return conn.execute(query, params).fetchone()[0]


def start(conn, wf, input_=None, delay=None):
    return one(conn, "SELECT dispatched.start_run(%s, %s, NULL, %s::interval)", (wf, Jsonb(input_ or {}), delay))


def attach(conn, run_id, timeout="30s"):
    return one(conn, "SELECT dispatched.attach(%s, %s::interval)", (run_id, timeout))


def status(conn, run_id):
    return one(conn, "SELECT dispatched.run(%s) ->> 'status'", (run_id,))


def notifications(conn, want: set[str], timeout: float = 30.0) -> dict[str, str]:
    """Reads notifications on channel dispatched until every run in `want` was announced."""
    got: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while not want <= set(got):
        left = deadline - time.monotonic()
        assert left > 0, f"no notification for {want - set(got)}; got {got}"
        for n in conn.notifies(timeout=left, stop_after=1):
            assert n.channel == "dispatched"
            payload = json.loads(n.payload)
            assert set(payload) == {"run_id", "status"}
            got[payload["run_id"]] = payload["status"]
    return got


def test_listen_dispatched_announces_every_finished_run(connect, define_workflow, http_service):
    listener = connect()
    listener.execute("LISTEN dispatched")
    conn = connect()
    http_service.script("/ok", Reply(200, {"ok": 1}))
    http_service.script("/no", Reply(422))
    ok = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/ok")}}]})
    no = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/no")}}]})
    waits = define_workflow({"steps": [{"id": "w", "wait": {"signal": "go"}}]})
    completed, failed, cancelled, waiting = start(conn, ok), start(conn, no), start(conn, waits), start(conn, waits)
    assert one(conn, "SELECT dispatched.cancel_run(%s)", (cancelled,))
    got = notifications(listener, {completed, failed, cancelled})
    assert got[completed] == "completed" and got[failed] == "failed" and got[cancelled] == "cancelled"
    # nothing for a run that has not finished, and nothing for a cancel that rolled back
    with connect(autocommit=False) as tx:
        tx.execute("SELECT dispatched.cancel_run(%s)", (waiting,))
        tx.rollback()
    assert one(conn, "SELECT dispatched.signal(%s, 'go')", (waiting,))
    got = notifications(listener, {waiting})
    assert got == {waiting: "completed"}


def test_retry_run_resumes_at_the_failed_step_with_a_new_attempt(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/first", Reply(200, {"a": 1}))
    http_service.script("/flaky", [Reply(422, {"error": "bad"}), Reply(200, {"b": 2})])
    wf = define_workflow({"steps": [
        {"id": "first", "request": {"url": http_service.url("/first")}},
        {"id": "flaky", "request": {"url": http_service.url("/flaky")}}],
        "output": {"a": "{{ steps.first.response.body.a }}", "b": "{{ steps.flaky.response.body.b }}"}})
    run_id = start(conn, wf)
    assert attach(conn, run_id) == {"message": "HTTP 422", "step": "flaky", "status": 422}
    assert one(conn, "SELECT dispatched.retry_run(%s)", (run_id,)) is True
    assert attach(conn, run_id) == {"a": 1, "b": 2}
    first, second = http_service.requests("/flaky")
    assert (first.headers["Dispatched-Attempt"], second.headers["Dispatched-Attempt"]) == ("1", "2")
    assert first.headers["Dispatched-Invocation"] != second.headers["Dispatched-Invocation"]
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == f"{run_id}/flaky"
    assert len(http_service.requests("/first")) == 1  # the succeeded step is not sent again
    doc = one(conn, "SELECT dispatched.run(%s)", (run_id,))
    assert doc["status"] == "completed" and doc["error"] is None
    assert [(s["id"], s["status"], s["attempt"]) for s in doc["steps"]] == [("first", "succeeded", 1), ("flaky", "succeeded", 2)]
    types = [r[0] for r in conn.execute("SELECT type FROM dispatched.events(%s)", (run_id,)).fetchall()]
    assert types[types.index("run.failed") + 1] == "run.retried" and types[-1] == "run.completed"
    # a completed run is not retried
    assert one(conn, "SELECT dispatched.retry_run(%s)", (run_id,)) is False


def test_retry_run_of_a_timed_out_wait_waits_again(connect, define_workflow):
    conn = connect()
    wf = define_workflow({"steps": [{"id": "w", "wait": {"signal": "go", "timeout": "300ms"}}], "output": "{{ steps.w.signal }}"})
    run_id = start(conn, wf)
    assert attach(conn, run_id)["message"].endswith("timed out after 300ms")
    assert one(conn, "SELECT dispatched.retry_run(%s)", (run_id,))
    assert one(conn, "SELECT dispatched.signal(%s, 'go', '{\"late\": true}')", (run_id,))
    assert attach(conn, run_id) == {"late": True}


def test_retry_run_refuses_compensated_runs_and_other_tenants(connect, define_workflow, http_service, make_role):
    conn = connect()
    http_service.script("/pay", Reply(200, {"id": "p1"}))
    http_service.script("/refund", Reply(200))
    http_service.script("/ship", Reply(422))
    wf = define_workflow({"steps": [
        {"id": "pay", "request": {"url": http_service.url("/pay")}, "compensate": {"url": http_service.url("/refund")}},
        {"id": "ship", "request": {"url": http_service.url("/ship")}}]})
    run_id = start(conn, wf)
    attach(conn, run_id)
    assert status(conn, run_id) == "failed"
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="compensated"):
        conn.execute("SELECT dispatched.retry_run(%s)", (run_id,))
    assert status(conn, run_id) == "failed"
    with pytest.raises(psycopg.errors.NoDataFound):
        conn.execute("SELECT dispatched.retry_run('run_does_not_exist')")
    other = connect(user=make_role())
    with pytest.raises(psycopg.errors.NoDataFound):
        other.execute("SELECT dispatched.retry_run(%s)", (run_id,))


def test_purge_deletes_only_the_callers_finished_runs(connect, define_workflow, make_role):
    role = make_role()
    connect().execute(f'GRANT EXECUTE ON FUNCTION dispatched.purge(interval) TO "{role}"')
    conn = connect(user=role)
    wf = define_workflow({"steps": [{"id": "w", "wait": {"signal": "go"}}]})
    done, live = start(conn, wf), start(conn, wf)
    assert one(conn, "SELECT dispatched.cancel_run(%s)", (done,))
    someone_else = start(connect(user=make_role()), wf)
    connect().execute("SELECT dispatched.cancel_run(%s)", (someone_else,))
    assert one(conn, "SELECT dispatched.purge('1 hour')") == 0
    assert one(conn, "SELECT dispatched.purge('0 seconds')") == 1
    su = connect()
    assert one(su, "SELECT count(*) FROM dispatched.runs WHERE id = %s", (done,)) == 0
    assert one(su, "SELECT count(*) FROM dispatched.events WHERE run_id = %s", (done,)) == 0
    assert one(su, "SELECT count(*) FROM dispatched.runs WHERE id IN (%s, %s)", (live, someone_else)) == 2
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT dispatched.purge('-1 day')")
    # not granted: an ordinary role may not purge
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        connect(user=make_role()).execute("SELECT dispatched.purge('0 seconds')")


def test_operator_views(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/slow", Reply(200, {"ok": 1}, delay=0.3))
    http_service.script("/busy", lambda req: Reply(503) if req.headers["Dispatched-Attempt"] == "1"
                        else Reply(200, {"ok": 2}, delay=0.1))
    http_service.script("/hold", Reply(200, delay=5.0))
    wf = define_workflow({"steps": [
        {"id": "slow", "request": {"url": http_service.url("/slow")}},
        {"id": "busy", "request": {"url": http_service.url("/busy")}, "retry": {"max_attempts": 3, "initial_interval": "100ms"}}]})
    for _ in range(2):
        attach(conn, start(conn, wf))
    host = f"127.0.0.1:{http_service.port}"
    stats = conn.execute(
        "SELECT attempts, succeeded, retried, failed, in_flight, retry_rate, failure_rate, p50_ms, p99_ms"
        "  FROM dispatched.step_stats WHERE workflow = %s AND host = %s", (wf, host)).fetchone()
    attempts, succeeded, retried, failed, in_flight, retry_rate, failure_rate, p50, p99 = stats
    # per run: slow once, busy twice (503 then 200)
    assert (attempts, succeeded, retried, failed, in_flight) == (6, 4, 2, 0, 0)
    assert float(retry_rate) == pytest.approx(2 / 6, abs=1e-4) and float(failure_rate) == 0
    assert 90 <= float(p50) <= float(p99) and float(p99) >= 300

    counts = dict(conn.execute("SELECT status, runs FROM dispatched.runs_by_status WHERE workflow = %s", (wf,)).fetchall())
    assert counts == {"completed": 2}

    # the queue: a delayed run is scheduled, a run with a request on the wire is in flight
    held = define_workflow({"steps": [{"id": "h", "request": {"url": http_service.url("/hold")}}]})
    later = start(conn, held, delay="1 hour")
    now = start(conn, held)
    http_service.wait_for("/hold", 1)
    rows = {r[0]: r[1:] for r in conn.execute(
        "SELECT run_id, step, state, attempt, worker FROM dispatched.steps_due WHERE workflow = %s", (held,)).fetchall()}
    assert rows[later] == ("h", "scheduled", 0, None)
    assert rows[now][:3] == ("h", "in_flight", 1) and rows[now][3] is not None

    # the oldest waiting run
    waits = define_workflow({"steps": [{"id": "w", "wait": {"signal": "go"}}]})
    first = start(conn, waits)
    attach(conn, first, "200ms")
    assert status(conn, first) == "waiting"
    oldest = conn.execute("SELECT run_id, step, waiting_for, waited > interval '0' FROM dispatched.oldest_waiting_run").fetchone()
    # runs of earlier tests may still wait; this one is the oldest unless such a run exists
    older = one(conn, "SELECT count(*) FROM dispatched.runs WHERE status = 'waiting' AND updated_at < "
                      "(SELECT updated_at FROM dispatched.runs WHERE id = %s)", (first,))
    if older == 0:
        assert oldest == (first, "w", "go", True)
    else:
        assert oldest[0] != first
    conn.execute("SELECT dispatched.cancel_run(%s)", (later,))
    conn.execute("SELECT dispatched.cancel_run(%s)", (first,))


def test_every_object_has_a_comment(connect):
    conn = connect()
    missing = conn.execute("""
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'dispatched' AND c.relkind IN ('r', 'v') AND obj_description(c.oid, 'pg_class') IS NULL
        UNION ALL
        SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'dispatched' AND obj_description(p.oid, 'pg_proc') IS NULL""").fetchall()
    assert missing == []
