"""Faults: what a user sees when the service, the network or the database misbehaves.

Covered in test_worker.py already (not repeated here): a service that hangs past the timeout,
refuses connections, answers 200 with broken JSON under a JSON content type, answers with a
body over max_response_bytes, redirects in a loop; kill -9 of the worker mid-request; a fast
restart mid-run. This file adds: answers cut off mid-body or never given, a body sent byte by
byte past the step timeout, a DNS name that does not resolve, TLS with an untrusted
certificate, a deeply nested response body, kill -9 of the worker and `pg_ctl stop -m
immediate` under a load of runs, the database turned read-only while runs are due, and a
configuration reload (SIGHUP) while requests are on the wire."""

from __future__ import annotations

import collections
import contextlib
import json
import ssl
import subprocess
import time

import pytest
from psycopg.types.json import Jsonb

from harness import Cluster, HttpService, Reply

from test_worker import attach, finish, start, types


# -- the service misbehaves ---------------------------------------------------------------------


def test_an_answer_cut_off_mid_body_is_a_network_error_retried_with_a_policy(connect, define_workflow, http_service):
    conn = connect()
    big = {"blob": "z" * 5000}
    http_service.script("/cut", Reply(200, big, cut_after=100))
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/cut")}}]})
    doc = finish(conn, start(conn, wf))
    assert doc["status"] == "failed"
    assert doc["error"]["status"] is None
    assert doc["error"]["message"].startswith("reading the response failed"), doc["error"]
    assert http_service.url("/cut") in doc["error"]["message"]
    assert len(http_service.requests("/cut")) == 1  # a network error without a policy: no retry

    http_service.script("/cut2", [Reply(200, big, cut_after=100), Reply(200, {"whole": True})])
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/cut2")},
                                     "retry": {"max_attempts": 3, "initial_interval": "100ms"}}]})
    run_id = start(conn, wf)
    assert attach(conn, run_id) == {"whole": True}
    reqs = http_service.requests("/cut2")
    assert [r.headers["Dispatched-Attempt"] for r in reqs] == ["1", "2"]
    assert {r.headers["Idempotency-Key"] for r in reqs} == {f"{run_id}/s"}
    assert types(conn, run_id).count("step.retry_scheduled") == 1


def test_a_connection_closed_without_an_answer_fails_the_step(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/drop", Reply(drop=True))
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/drop")}}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    assert doc["error"]["status"] is None
    msg = doc["error"]["message"]
    assert msg.startswith(("network error", "protocol error", "connection failed")), msg
    assert http_service.url("/drop") in msg
    assert len(http_service.requests("/drop")) == 1


def test_a_body_sent_byte_by_byte_past_the_timeout_times_out(connect, define_workflow, http_service):
    conn = connect()
    # 200 bytes, one every 50 ms: 10 s to send it all; the step allows 1 s from connect to the
    # last byte
    http_service.script("/trickle", Reply(200, "x" * 200, chunk_size=1, chunk_interval=0.05))
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/trickle")}, "timeout": "1s"}]})
    t0 = time.monotonic()
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    elapsed = time.monotonic() - t0
    assert doc["status"] == "failed"
    assert doc["error"]["message"].startswith("timed out after 1s"), doc["error"]
    assert doc["error"]["status"] is None
    assert elapsed < 6, f"the step ended {elapsed:.1f}s after the start, not near its 1 s timeout"
    assert len(http_service.requests("/trickle")) == 1


def test_a_deeply_nested_response_body_does_not_hold_up_the_worker(connect, define_workflow, http_service):
    # 126 levels: serde_json parses it, and the worker reads it back a few levels deeper
    # (steps[i].response.body); that used to fail every claim, for every run of the batch.
    conn = connect()
    body = '{"a":' * 126 + "1" + "}" * 126
    http_service.script("/deep", Reply(200, body.encode(), content_type="application/json"))
    http_service.script("/next", Reply(200, {"next": True}))
    wf = define_workflow({"steps": [{"id": "deep", "request": {"url": http_service.url("/deep")}},
                                    {"id": "next", "request": {"url": http_service.url("/next")}}],
                          "output": {"deep": "{{ steps.deep.response.body }}", "next": "{{ steps.next.response.body }}"}})
    other = define_workflow({"steps": [{"id": "n", "request": {"url": http_service.url("/next")}}]})
    run_id = start(conn, wf)
    others = [start(conn, other) for _ in range(5)]
    out = attach(conn, run_id)
    assert out["next"] == {"next": True}
    assert json.dumps(out["deep"], separators=(",", ":")) == body
    for o in others:
        assert attach(conn, o) == {"next": True}


# -- the network --------------------------------------------------------------------------------


def test_a_name_that_does_not_resolve_fails_the_step_naming_it(connect, define_workflow):
    conn = connect()
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": "http://does-not-exist.invalid/x"}}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    assert doc["error"]["step"] == "s" and doc["error"]["status"] is None
    msg = doc["error"]["message"]
    assert msg.startswith("network error: failed to lookup address information"), msg
    assert msg.endswith("(http://does-not-exist.invalid/x)"), msg

    # a network failure: retried when the step has a policy
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": "http://does-not-exist.invalid/x"},
                                     "retry": {"max_attempts": 2, "initial_interval": "100ms"}}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed" and doc["steps"][0]["attempt"] == 2


@pytest.fixture(scope="module")
def https_service(tmp_path_factory):
    """An HTTPS service with a self-signed certificate nobody trusts."""
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-addext", "basicConstraints=critical,CA:FALSE", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    svc = HttpService(tls=ctx).start()
    try:
        yield svc
    finally:
        svc.stop()


def test_tls_to_an_untrusted_certificate_fails_and_sends_nothing(connect, define_workflow, https_service):
    conn = connect()
    https_service.reset()
    https_service.script("/secure", Reply(200, {"should": "never arrive"}))
    url = https_service.url("/secure")
    assert url.startswith("https://127.0.0.1:")
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": url, "body": {"card": "4242"}},
                                     "retry": {"max_attempts": 3, "initial_interval": "100ms"}}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    msg = doc["error"]["message"]
    assert msg.startswith("TLS error"), msg
    assert "invalid peer certificate: UnknownIssuer" in msg, msg
    assert url in msg
    assert doc["steps"][0]["attempt"] == 1  # an untrusted certificate is permanent: no retry
    assert https_service.requests() == []  # not a byte of the request was sent
    assert https_service.tls_failures  # the client gave up during the handshake


# -- the database -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crashable(dbname):
    """A cluster of this module's own: these tests stop it hard and make it read-only."""
    c = Cluster(extra_conf=[f"dispatched.database = '{dbname}'"]).start()
    try:
        c.create_database(dbname, extension=True)
        yield c
    finally:
        c.stop()


def check_sent_at_most_twice(reqs, run_ids, steps):
    """Every step of every run reached the service, with one Idempotency-Key per step, attempt 1,
    and at most twice (once more only for a request in flight at the fault)."""
    by_key = collections.defaultdict(list)
    for r in reqs:
        by_key[r.headers["Idempotency-Key"]].append(r)
    for run_id in run_ids:
        for step in steps:
            mine = by_key.pop(f"{run_id}/{step}", [])
            assert 1 <= len(mine) <= 2, (run_id, step, len(mine))
            assert {r.headers["Dispatched-Run"] for r in mine} == {run_id}
            assert {r.headers["Dispatched-Step"] for r in mine} == {step}
            assert {r.headers["Dispatched-Attempt"] for r in mine} == {"1"}
            assert len({r.headers["Dispatched-Invocation"] for r in mine}) == 1
    assert not by_key, f"requests with unexpected keys: {list(by_key)[:5]}"
    return sum(1 for r in reqs) - len(run_ids) * len(steps)


def test_stop_immediate_under_load_loses_nothing_and_doubles_nothing(crashable, dbname, http_service):
    http_service.script("/a", lambda req: Reply(200, {"n": req.index}, delay=0.2))
    http_service.script("/b", lambda req: Reply(200, {"n": req.index}, delay=0.1))
    with crashable.connect(dbname) as conn:
        conn.execute("SELECT dispatched.define_workflow('load', %s)", (Jsonb({"steps": [
            {"id": "a", "request": {"url": http_service.url("/a")}},
            {"id": "b", "request": {"url": http_service.url("/b")}}],
            "output": {"a": "{{ steps.a.response.status }}", "b": "{{ steps.b.response.status }}"}}),))
        ids = [r[0] for r in conn.execute(
            "SELECT dispatched.start_run('load', jsonb_build_object('i', g)) FROM generate_series(1, 150) g").fetchall()]
    # crash with requests on the wire and runs at every stage
    http_service.wait(lambda reqs: len(reqs) >= 40, timeout=30, what="40 requests of the load")
    crashable.stop_immediate()
    crashable.start_again()
    with crashable.connect(dbname) as conn:
        for run_id in ids:
            attach(conn, run_id, "60s")
        statuses = conn.execute(
            "SELECT status, count(*) FROM dispatched.runs WHERE id = ANY(%s) GROUP BY 1", (ids,)).fetchall()
        assert statuses == [("completed", 150)]
        # no result recorded twice: one step.succeeded per step, one run.completed per run
        counts = conn.execute("""
            SELECT e.type, e.step, count(*) FROM dispatched.events e
             WHERE e.run_id = ANY(%s) AND e.type IN ('step.succeeded', 'run.completed')
             GROUP BY e.run_id, e.type, e.step HAVING count(*) > 1""", (ids,)).fetchall()
        assert counts == []
        assert conn.execute("SELECT count(*) FROM dispatched.tasks WHERE run_id = ANY(%s)", (ids,)).fetchone()[0] == 0
        for run_id in ids[:3]:
            assert conn.execute("SELECT dispatched.output(%s)", (run_id,)).fetchone()[0] == {"a": 200, "b": 200}
    reqs = http_service.requests("/a") + http_service.requests("/b")
    resent = check_sent_at_most_twice(reqs, ids, ["a", "b"])
    print(f"stop -m immediate under load: {len(reqs)} requests for {len(ids) * 2} steps, {resent} sent again")
    # only what was in flight at the crash is sent again: at most the worker's capacity
    assert resent <= 64, resent


def test_kill_9_of_the_worker_with_a_batch_in_flight_loses_nothing(crashable, dbname, http_service):
    http_service.script("/k", lambda req: Reply(200, {"n": req.index}, delay=0.3))
    with crashable.connect(dbname) as conn:
        conn.execute("SELECT dispatched.define_workflow('kill', %s)", (Jsonb({"steps": [
            {"id": "a", "request": {"url": http_service.url("/k")}},
            {"id": "b", "request": {"url": http_service.url("/k")}}]}),))
        ids = [r[0] for r in conn.execute(
            "SELECT dispatched.start_run('kill', jsonb_build_object('i', g)) FROM generate_series(1, 100) g").fetchall()]
    http_service.wait(lambda reqs: len(reqs) >= 30, timeout=30, what="30 requests of the load")
    killed = crashable.kill_workers()
    assert killed
    crashable.wait_workers_replaced(killed)
    with crashable.connect(dbname) as conn:
        for run_id in ids:
            attach(conn, run_id, "60s")
        statuses = conn.execute(
            "SELECT status, count(*) FROM dispatched.runs WHERE id = ANY(%s) GROUP BY 1", (ids,)).fetchall()
        assert statuses == [("completed", 100)]
        doubled = conn.execute("""
            SELECT e.run_id, e.step FROM dispatched.events e
             WHERE e.run_id = ANY(%s) AND e.type = 'step.succeeded'
             GROUP BY e.run_id, e.step HAVING count(*) > 1""", (ids,)).fetchall()
        assert doubled == []
    resent = check_sent_at_most_twice(http_service.requests("/k"), ids, ["a", "b"])
    assert 0 < resent <= 64, resent  # the batch in flight at the kill, and only it, went again


@contextlib.contextmanager
def read_only_for_the_worker(conn):
    """default_transaction_read_only on for every new transaction of the cluster (the worker's
    too) but not for `conn`, which may still start runs; reset on the way out."""
    conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    conn.execute("SELECT pg_reload_conf()")
    try:
        conn.execute("SET default_transaction_read_only = off")
        yield
    finally:
        conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")


def test_a_read_only_database_makes_the_worker_back_off_and_resume(crashable, dbname, http_service):
    http_service.script("/ro", Reply(200, {"ok": True}))
    with crashable.connect(dbname) as conn:
        conn.execute("SELECT dispatched.define_workflow('ro', %s)", (Jsonb({"steps": [
            {"id": "a", "request": {"url": http_service.url("/ro")}},
            {"id": "b", "request": {"url": http_service.url("/ro")}}]}),))
        log_at = len(crashable.server_log())
        with read_only_for_the_worker(conn):
            ids = [r[0] for r in conn.execute(
                "SELECT dispatched.start_run('ro', jsonb_build_object('i', g)) FROM generate_series(1, 20) g").fetchall()]
            # wait (on the log) until the worker has tried and failed twice: it backs off
            deadline = time.monotonic() + 30
            while crashable.server_log()[log_at:].count("read-only transaction") < 2:
                assert time.monotonic() < deadline, crashable.server_log()[log_at:][-3000:]
                time.sleep(0.1)
            assert http_service.requests("/ro") == []
            pending = conn.execute(
                "SELECT count(*) FROM dispatched.runs WHERE id = ANY(%s) AND status = 'pending'", (ids,)).fetchone()[0]
            assert pending == 20
            # it backs off rather than spinning: about one try a second
            tries = lambda: crashable.server_log()[log_at:].count("claiming due steps failed")  # noqa: E731
            before = tries()
            time.sleep(3)
            assert tries() - before <= 5, f"{tries() - before} failed claims in 3 s"
        for run_id in ids:
            assert attach(conn, run_id, "30s") == {"ok": True}
        assert conn.execute(
            "SELECT count(*) FROM dispatched.runs WHERE id = ANY(%s) AND status = 'completed'", (ids,)).fetchone()[0] == 20
    check_sent_at_most_twice(http_service.requests("/ro"), ids, ["a", "b"])
    assert len(http_service.requests("/ro")) == 40  # nothing was in flight: nothing sent twice


def test_a_database_error_while_requests_are_on_the_wire_does_not_send_them_again(crashable, dbname, http_service):
    """A claim fails (the database is read-only for a moment) while the worker holds requests on
    the wire: once the database takes writes again, those requests are still the worker's own
    and are not sent a second time."""
    http_service.script("/wire", Reply(200, {"ok": True}, delay=4.0))
    with crashable.connect(dbname) as conn:
        conn.execute("SELECT dispatched.define_workflow('on_the_wire', %s)", (Jsonb({"steps": [
            {"id": "a", "request": {"url": http_service.url("/wire")}}]}),))
        ids = [start(conn, "on_the_wire", {"i": i}) for i in range(10)]
        http_service.wait_for("/wire", 10, timeout=20)
        log_at = len(crashable.server_log())
        with read_only_for_the_worker(conn):
            # a new run wakes the worker at commit; its claim fails: the database is read-only
            ids.append(start(conn, "on_the_wire", {"i": 10}))
            deadline = time.monotonic() + 20
            while "claiming due steps failed" not in crashable.server_log()[log_at:]:
                assert time.monotonic() < deadline, crashable.server_log()[log_at:][-3000:]
                time.sleep(0.05)
        for run_id in ids:
            assert attach(conn, run_id, "30s") == {"ok": True}
    sent = collections.Counter(r.headers["Idempotency-Key"] for r in http_service.requests("/wire"))
    assert sorted(sent) == sorted(f"{run_id}/a" for run_id in ids)
    assert [k for k, n in sent.items() if n > 1] == []  # nothing held on the wire went twice

def test_a_reload_while_requests_are_on_the_wire_applies_new_settings_without_a_crash(crashable, dbname, http_service):
    """SIGHUP reaches the worker while its HTTP threads hold requests: the worker (not a thread)
    reloads the configuration, nothing crashes or restarts, and the next step obeys the new
    dispatched.allowed_hosts."""
    port = http_service.port
    http_service.script("/hold", Reply(200, {"held": True}, delay=1.5))
    http_service.script("/after", Reply(200, {"after": True}))
    with crashable.connect(dbname) as conn:
        conn.execute("SELECT dispatched.define_workflow('by_name', %s)", (Jsonb({"steps": [
            {"id": "b", "request": {"url": f"http://localhost:{port}/after"}}]}),))
        conn.execute("SELECT dispatched.define_workflow('held_then_by_name', %s)", (Jsonb({"steps": [
            {"id": "a", "request": {"url": http_service.url("/hold")}},
            {"id": "b", "request": {"url": f"http://localhost:{port}/after"}}]}),))
        # before the reload a host name is allowed (allowed_hosts is empty)
        assert attach(conn, start(conn, "by_name")) == {"after": True}
        workers = crashable.wait_for_workers(1)
        log_at = len(crashable.server_log())
        ids = [start(conn, "held_then_by_name", {"i": i}) for i in range(10)]
        http_service.wait_for("/hold", 10, timeout=20)
        try:
            # the ten requests are held by the service for 1.5 s: reload (SIGHUP) meanwhile
            conn.execute("ALTER SYSTEM SET dispatched.allowed_hosts = '127.0.0.1'")
            for _ in range(3):
                conn.execute("SELECT pg_reload_conf()")
                time.sleep(0.05)
            assert len(http_service.requests("/hold")) == 10  # still on the wire: none answered yet
            for run_id in ids:
                doc = finish(conn, run_id)
                assert doc["status"] == "failed", doc
                assert doc["error"]["step"] == "b"
                assert doc["error"]["message"] == 'host "localhost" is not in dispatched.allowed_hosts'
                assert doc["steps"][0]["status"] == "succeeded"
                assert doc["steps"][0]["response"]["body"] == {"held": True}
        finally:
            conn.execute("ALTER SYSTEM RESET dispatched.allowed_hosts")
            conn.execute("SELECT pg_reload_conf()")
    log = crashable.server_log()[log_at:]
    assert "terminated by signal" not in log and "reinitializing" not in log, log[-3000:]
    assert crashable.worker_pids() == workers  # the same worker: it did not die and come back
    assert len(http_service.requests("/hold")) == 10  # each held step sent once
    assert len(http_service.requests("/after")) == 1  # only the run before the reload got there
