"""Black-box tests of the HTTP ingress (CONTRACT.md, "HTTP ingress"): a cluster of their own
with `dispatched.http_port` set and small bounds, plain HTTP requests (http.client and raw
sockets), and SQL to compare with. Each test asserts what a client sees: status codes,
headers, the JSON it gets back, and what the database then holds."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
import time
import uuid
from urllib.parse import quote

import pytest
from psycopg.types.json import Jsonb

from harness import Reply
from harness.ingress import MAX_BODY, MAX_CONNECTIONS
WAIT_GO = {"steps": [{"id": "w", "wait": {"signal": "go"}}], "output": "{{ steps.w.signal }}"}


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def role(ingress):
    return ingress.cluster.create_role()


@pytest.fixture
def tok(ingress, role):
    """A session token of a fresh ordinary role."""
    return ingress.token(user=role)


def define(ingress: Ingress, definition: dict) -> str:
    name = f"wf-{uuid.uuid4().hex[:10]}"
    ingress.one("SELECT dispatched.define_workflow(%s, %s)", (name, Jsonb(definition)))
    return name


def assert_error(resp, status: int, code: str):
    got_status, _, body = resp
    assert got_status == status, resp
    assert isinstance(body, dict) and body.get("error") == code, resp
    assert isinstance(body.get("message"), str) and body["message"], resp


def wait_status(ingress, run_id, token, status, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        doc = ingress.request("GET", f"/api/runs/{run_id}", token=token)[2]
        if doc["status"] == status:
            return doc
        assert time.monotonic() < deadline, doc
        # not a blind sleep: attach returns as soon as the run finishes, else after 100ms
        ingress.request("GET", f"/api/runs/{run_id}/attach?timeout=100ms", token=token)


# -- the worker and the basics ----------------------------------------------------------------


def test_the_ingress_is_a_worker_visible_in_pg_stat_activity(ingress):
    assert len(ingress.cluster.worker_pids("dispatched ingress")) == 1


def test_every_api_request_needs_a_valid_token(ingress, tok):
    for method, path in [("GET", "/api/capabilities"), ("GET", "/api/runs"), ("POST", "/api/runs"),
                         ("GET", "/api/runs/run_x"), ("POST", "/api/runs/run_x/signal/go")]:
        assert_error(ingress.request(method, path, body={} if method == "POST" else None), 401, "unauthorized")
        assert_error(ingress.request(method, path, token="dps_not-a-token",
                                     body={} if method == "POST" else None), 401, "unauthorized")
    status, headers, body = ingress.request("GET", "/api/capabilities", token=tok)
    assert status == 200 and headers["content-type"] == "application/json"
    assert body == ingress.one("SELECT dispatched.capabilities()")
    assert body["capabilities"]["idempotency"]["supported"] is True


def test_tokens_are_stored_hashed_and_only_superusers_issue_them_for_others(ingress, role):
    other = ingress.cluster.create_role()
    token = ingress.token(user=role)
    assert token.startswith("dps_") and len(token) >= 40
    rows = ingress.cluster.connect(ingress.dbname).execute(
        "SELECT token_hash, tenant, created_by FROM dispatched.session_tokens WHERE tenant = %s", (role,)).fetchall()
    assert rows == [(hashlib.sha256(token.encode()).hexdigest(), role, role)]
    with ingress.sql() as conn:
        assert not conn.execute("SELECT count(*) FROM dispatched.session_tokens WHERE token_hash = %s",
                                (token,)).fetchone()[0]
    # an ordinary role cannot read the table, nor create a token for someone else
    import psycopg
    with ingress.sql(role) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM dispatched.session_tokens")
    with ingress.sql(role) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only a superuser"):
            conn.execute("SELECT dispatched.create_session_token(%s)", (other,))
    with ingress.sql() as conn:
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("SELECT dispatched.create_session_token('no_such_role_x')")
    # a superuser may; the token acts as that role
    t = ingress.token(other)
    run_id = ingress.request("POST", "/api/runs", {"workflow": define(ingress, WAIT_GO)}, token=t)[2]["run_id"]
    assert ingress.one("SELECT tenant FROM dispatched.runs WHERE id = %s", (run_id,)) == other


def test_revoked_tokens_are_refused_at_once(ingress, role):
    token = ingress.token(user=role)
    assert ingress.request("GET", "/api/capabilities", token=token)[0] == 200
    other = ingress.cluster.create_role()
    # another ordinary role cannot revoke it
    assert ingress.one("SELECT dispatched.revoke_session_token(%s)", (token,), user=other) is False
    assert ingress.request("GET", "/api/capabilities", token=token)[0] == 200
    assert ingress.one("SELECT dispatched.revoke_session_token(%s)", (token,), user=role) is True
    assert ingress.one("SELECT dispatched.revoke_session_token(%s)", (token,), user=role) is False
    assert_error(ingress.request("GET", "/api/capabilities", token=token), 401, "unauthorized")


# -- every endpoint, compared with its SQL twin -----------------------------------------------


def test_start_read_signal_attach_output_and_events(ingress, role, tok):
    wf = define(ingress, WAIT_GO)
    status, headers, body = ingress.request("POST", "/api/runs", {"workflow": wf, "input": {"n": 1}}, token=tok)
    assert status == 201, body
    run_id = body["run_id"]
    assert run_id.startswith("run_") and len(run_id) >= 14
    assert headers["location"] == f"/api/runs/{run_id}"
    assert ingress.one("SELECT tenant FROM dispatched.runs WHERE id = %s", (run_id,)) == role

    doc = wait_status(ingress, run_id, tok, "waiting")
    with ingress.sql(role) as conn:
        assert doc == conn.execute("SELECT dispatched.run(%s)", (run_id,)).fetchone()[0]
    assert doc["workflow"] == wf and doc["input"] == {"n": 1} and doc["steps"][0]["status"] == "waiting"

    assert ingress.request("GET", f"/api/runs/{run_id}/output", token=tok)[:3:2] == (202, {"message": "not ready"})
    t0 = time.monotonic()
    assert ingress.request("GET", f"/api/runs/{run_id}/attach?timeout=300ms", token=tok)[:3:2] == (
        202, {"message": "not ready"})
    assert 0.25 <= time.monotonic() - t0 < 5

    assert ingress.request("POST", f"/api/runs/{run_id}/signal/go", {"ok": True}, token=tok)[:3:2] == (
        202, {"delivered": True})
    status, _, out = ingress.request("GET", f"/api/runs/{run_id}/attach?timeout=20s", token=tok)
    assert (status, out) == (200, {"ok": True})
    assert ingress.request("GET", f"/api/runs/{run_id}/output", token=tok)[:3:2] == (200, {"ok": True})
    # a finished run: signal not delivered, cancel does nothing
    assert ingress.request("POST", f"/api/runs/{run_id}/signal/go", token=tok)[:3:2] == (202, {"delivered": False})
    assert ingress.request("POST", f"/api/runs/{run_id}/cancel", token=tok)[:3:2] == (200, {"cancelled": False})

    status, _, ev = ingress.request("GET", f"/api/runs/{run_id}/events", token=tok)
    assert status == 200 and ev["run_id"] == run_id
    with ingress.sql(role) as conn:
        sql_events = conn.execute("SELECT seq, type, step, data FROM dispatched.events(%s)", (run_id,)).fetchall()
    assert [(e["seq"], e["type"], e["step"], e["data"]) for e in ev["events"]] == [tuple(r) for r in sql_events]
    assert [e["type"] for e in ev["events"]][-1] == "run.completed"
    assert "signal.received" in [e["type"] for e in ev["events"]]


def test_start_with_delay_and_cancel_with_reason(ingress, tok):
    wf = define(ingress, WAIT_GO)
    status, _, body = ingress.request("POST", "/api/runs", {"workflow": wf, "delay": "1h"}, token=tok)
    assert status == 201
    run_id = body["run_id"]
    assert ingress.request("GET", f"/api/runs/{run_id}", token=tok)[2]["status"] == "pending"
    assert ingress.request("POST", f"/api/runs/{run_id}/cancel", {"reason": "not needed"}, token=tok)[:3:2] == (
        200, {"cancelled": True})
    status, _, out = ingress.request("GET", f"/api/runs/{run_id}/output", token=tok)
    assert status == 200 and out["message"] == "cancelled: not needed"
    assert ingress.request("GET", f"/api/runs/{run_id}", token=tok)[2]["status"] == "cancelled"


def test_an_attach_in_progress_is_answered_when_the_run_finishes(ingress, tok):
    """A parked attach does not hold up other requests, and is answered at the finish."""
    wf = define(ingress, WAIT_GO)
    run_id = ingress.request("POST", "/api/runs", {"workflow": wf}, token=tok)[2]["run_id"]
    result = {}

    def attach():
        t = time.monotonic()
        result["resp"] = ingress.request("GET", f"/api/runs/{run_id}/attach?timeout=60s", token=tok)
        result["took"] = time.monotonic() - t

    th = threading.Thread(target=attach)
    th.start()
    wait_status(ingress, run_id, tok, "waiting")
    # other requests go on meanwhile
    assert ingress.request("GET", "/api/capabilities", token=tok)[0] == 200
    t_signal = time.monotonic()
    assert ingress.request("POST", f"/api/runs/{run_id}/signal/go", {"v": 2}, token=tok)[2] == {"delivered": True}
    th.join(30)
    assert not th.is_alive()
    assert result["resp"][0] == 200 and result["resp"][2] == {"v": 2}
    assert result["took"] < 30  # woken by the finish, not by the 60 s timeout
    assert time.monotonic() - t_signal < 10


def test_the_202_and_signal_pattern_over_http(ingress, tok, http_service):
    """A service answers 202 at once and, later, signals the run over HTTP, as a service
    without a database connection would (curl-like requests with the session header)."""
    signalled = threading.Event()

    def report(req):
        run_id = req.headers["Dispatched-Run"]

        def later():
            # until the run waits, a signal is kept for it; either way it must complete
            st, _, b = ingress.request("POST", f"/api/runs/{run_id}/signal/report-ready",
                                       {"url": "https://files/r-1.pdf"}, token=tok,
                                       headers={"Idempotency-Key": f"{run_id}-ready"})
            assert (st, b) == (202, {"delivered": True})
            signalled.set()

        threading.Thread(target=later).start()
        return Reply(202, {"job_id": "j-9"})

    http_service.script("/report", report)
    wf = define(ingress, {"steps": [
        {"id": "report", "request": {"url": http_service.url("/report"), "body": {"for": "{{ input.who }}"}},
         "wait": {"signal": "report-ready", "timeout": "1m"}}],
        "output": {"job": "{{ steps.report.response.body.job_id }}", "url": "{{ steps.report.signal.url }}"}})
    run_id = ingress.request("POST", "/api/runs", {"workflow": wf, "input": {"who": "ann"}}, token=tok)[2]["run_id"]
    status, _, out = ingress.request("GET", f"/api/runs/{run_id}/attach?timeout=30s", token=tok)
    assert (status, out) == (200, {"job": "j-9", "url": "https://files/r-1.pdf"})
    assert signalled.wait(5)
    (req,) = http_service.requests("/report")
    assert req.json == {"for": "ann"}
    types = [e["type"] for e in ingress.request("GET", f"/api/runs/{run_id}/events", token=tok)[2]["events"]]
    assert types.count("signal.received") == 1 and types[-1] == "run.completed"


def test_list_runs_is_tenant_scoped_with_status_and_search(ingress, role, tok):
    other_tok = ingress.token(user=ingress.cluster.create_role())
    wf = define(ingress, WAIT_GO)
    mine = [ingress.request("POST", "/api/runs", {"workflow": wf}, token=tok)[2]["run_id"] for _ in range(3)]
    theirs = ingress.request("POST", "/api/runs", {"workflow": wf}, token=other_tok)[2]["run_id"]
    ingress.request("POST", f"/api/runs/{mine[0]}/cancel", token=tok)
    status, _, body = ingress.request("GET", f"/api/runs?q={wf}", token=tok)
    assert status == 200
    assert {r["id"] for r in body["runs"]} == set(mine)
    assert theirs not in {r["id"] for r in body["runs"]}
    assert body["counts"].get("cancelled") == 1 and sum(body["counts"].values()) == 3
    only = ingress.request("GET", f"/api/runs?status=cancelled&q={quote(wf)}", token=tok)[2]["runs"]
    assert [r["id"] for r in only] == [mine[0]]
    by_id = ingress.request("GET", f"/api/runs?q={mine[1]}", token=tok)[2]["runs"]
    assert [r["id"] for r in by_id] == [mine[1]]
    assert ingress.request("GET", f"/api/runs?q={theirs}", token=tok)[2]["runs"] == []
    assert_error(ingress.request("GET", "/api/runs?limit=0", token=tok), 400, "bad_request")


# -- tenants ------------------------------------------------------------------------------------


def test_a_token_sees_only_its_tenants_runs(ingress, role, tok):
    other = ingress.cluster.create_role()
    other_tok = ingress.token(user=other)
    wf = define(ingress, WAIT_GO)
    # a run the role started in SQL is visible to its token
    with ingress.sql(role) as conn:
        sql_run = conn.execute("SELECT dispatched.start_run(%s)", (wf,)).fetchone()[0]
    assert ingress.request("GET", f"/api/runs/{sql_run}", token=tok)[2]["id"] == sql_run
    # ... and to nobody else's
    for method, path in [("GET", ""), ("GET", "/output"), ("GET", "/attach?timeout=0s"), ("GET", "/events"),
                         ("POST", "/signal/go"), ("POST", "/cancel")]:
        assert_error(ingress.request(method, f"/api/runs/{sql_run}{path}", token=other_tok), 404, "not_found")
    assert ingress.one("SELECT status FROM dispatched.runs WHERE id = %s", (sql_run,)) in ("pending", "waiting")
    assert ingress.one("SELECT count(*) FROM dispatched.signals WHERE run_id = %s", (sql_run,)) == 0
    # a superuser's token sees every run, as a superuser does in SQL
    su_tok = ingress.token()
    assert ingress.request("GET", f"/api/runs/{sql_run}", token=su_tok)[0] == 200


def test_unknown_runs_workflows_paths_and_methods(ingress, tok):
    for method, path in [("GET", ""), ("GET", "/output"), ("GET", "/attach"), ("GET", "/events"),
                         ("POST", "/signal/go"), ("POST", "/cancel")]:
        status, _, body = ingress.request(method, f"/api/runs/run_nope{path}", token=tok)
        assert_error((status, None, body), 404, "not_found")
    # output and attach say "not found" like their SQL twins
    assert ingress.request("GET", "/api/runs/run_nope/output", token=tok)[2]["message"] == "not found"
    assert_error(ingress.request("POST", "/api/runs", {"workflow": "no-such-wf"}, token=tok), 404, "workflow_not_found")
    assert_error(ingress.request("GET", "/api/nothing", token=tok), 404, "not_found")
    status, headers, body = ingress.request("DELETE", "/api/runs/run_x", token=tok)
    assert_error((status, headers, body), 405, "method_not_allowed")
    assert headers["allow"] == "GET"


def test_bad_requests_are_400_with_the_sql_message(ingress, tok):
    wf = define(ingress, WAIT_GO)
    assert_error(ingress.request("POST", "/api/runs", "{not json", token=tok), 400, "bad_request")
    assert_error(ingress.request("POST", "/api/runs", [1, 2], token=tok), 400, "bad_request")
    assert_error(ingress.request("POST", "/api/runs", {"input": {}}, token=tok), 400, "bad_request")
    assert_error(ingress.request("POST", "/api/runs", {"workflow": 7}, token=tok), 400, "bad_request")
    st, _, body = ingress.request("POST", "/api/runs", {"workflow": wf, "delay": "soon"}, token=tok)
    assert_error((st, None, body), 400, "invalid_argument")
    st, _, body = ingress.request("POST", "/api/runs", {"workflow": wf, "delay": "-5 minutes"}, token=tok)
    assert_error((st, None, body), 400, "invalid_argument")
    assert "delay: must not be negative" in body["message"]
    run_id = ingress.request("POST", "/api/runs", {"workflow": wf}, token=tok)[2]["run_id"]
    st, _, body = ingress.request("POST", f"/api/runs/{run_id}/signal/{quote('bad name!')}", token=tok)
    assert_error((st, None, body), 400, "invalid_argument")
    assert "signal name" in body["message"]
    assert_error(ingress.request("POST", f"/api/runs/{run_id}/signal/go", "{x", token=tok), 400, "bad_request")
    assert_error(ingress.request("GET", f"/api/runs/{run_id}/attach?timeout=forever", token=tok), 400, "bad_request")
    assert_error(ingress.request("GET", f"/api/runs/{run_id}/attach?timeout=2h", token=tok), 400, "bad_request")
    assert_error(ingress.request("POST", f"/api/runs/{run_id}/cancel", {"reason": 5}, token=tok), 400, "bad_request")
    # none of these started a run
    assert ingress.one("SELECT count(*) FROM dispatched.runs WHERE workflow = %s", (wf,)) == 1


# -- Layer 1 at the HTTP boundary ---------------------------------------------------------------


def test_a_keyed_start_is_replayed_and_a_reused_key_is_422(ingress, tok):
    wf = define(ingress, WAIT_GO)
    k = {"Idempotency-Key": "order-" + uuid.uuid4().hex}
    s1, h1, b1 = ingress.request("POST", "/api/runs", {"workflow": wf, "input": {"a": 1}}, token=tok, headers=k)
    assert s1 == 201 and "openwop-idempotent-replay" not in h1
    s2, h2, b2 = ingress.request("POST", "/api/runs", {"workflow": wf, "input": {"a": 1}}, token=tok, headers=k)
    assert (s2, b2) == (201, b1)
    assert h2["openwop-idempotent-replay"] == "true"
    assert h2["location"] == h1["location"]
    assert_error(ingress.request("POST", "/api/runs", {"workflow": wf, "input": {"a": 2}}, token=tok, headers=k),
                 422, "idempotency_key_reused")
    assert ingress.one("SELECT count(*) FROM dispatched.runs WHERE workflow = %s", (wf,)) == 1
    # keys are per tenant: another tenant's same key starts its own run
    other_tok = ingress.token(user=ingress.cluster.create_role())
    s3, h3, b3 = ingress.request("POST", "/api/runs", {"workflow": wf, "input": {"a": 1}}, token=other_tok, headers=k)
    assert s3 == 201 and b3 != b1 and "openwop-idempotent-replay" not in h3


def test_keyed_signal_and_cancel_are_replayed(ingress, tok):
    wf = define(ingress, {"steps": [{"id": "w", "wait": {"signal": "go"}}, {"id": "x", "wait": {"signal": "go"}}]})
    run_id = ingress.request("POST", "/api/runs", {"workflow": wf}, token=tok)[2]["run_id"]
    k = {"Idempotency-Key": "sig-" + uuid.uuid4().hex}
    s1, h1, b1 = ingress.request("POST", f"/api/runs/{run_id}/signal/go", {"n": 1}, token=tok, headers=k)
    s2, h2, b2 = ingress.request("POST", f"/api/runs/{run_id}/signal/go", {"n": 1}, token=tok, headers=k)
    assert (s1, b1) == (s2, b2) == (202, {"delivered": True})
    assert "openwop-idempotent-replay" not in h1 and h2["openwop-idempotent-replay"] == "true"
    assert ingress.one("SELECT count(*) FROM dispatched.signals WHERE run_id = %s", (run_id,)) == 1
    kc = {"Idempotency-Key": "cancel-" + uuid.uuid4().hex}
    assert ingress.request("POST", f"/api/runs/{run_id}/cancel", token=tok, headers=kc)[:3:2] == (200, {"cancelled": True})
    s, h, b = ingress.request("POST", f"/api/runs/{run_id}/cancel", token=tok, headers=kc)
    assert (s, b, h["openwop-idempotent-replay"]) == (200, {"cancelled": True}, "true")
    # the same key on another endpoint is another entry
    assert ingress.request("POST", f"/api/runs/{run_id}/cancel", token=tok, headers=k)[:3:2] == (200, {"cancelled": False})


def test_outcomes_that_must_not_be_cached_are_executed_again(ingress, tok):
    wf = define(ingress, WAIT_GO)
    k = {"Idempotency-Key": "retry-" + uuid.uuid4().hex}
    # 400 releases the key: the corrected request executes
    assert ingress.request("POST", "/api/runs", {"workflow": wf, "delay": "soon"}, token=tok, headers=k)[0] == 400
    s, h, b = ingress.request("POST", "/api/runs", {"workflow": wf}, token=tok, headers=k)
    assert s == 201 and "openwop-idempotent-replay" not in h
    # 403 (the role may not cancel runs) releases it too
    run_id = b["run_id"]
    kc = {"Idempotency-Key": "cancel-" + uuid.uuid4().hex}
    with ingress.sql() as conn:
        conn.execute("REVOKE EXECUTE ON FUNCTION dispatched.cancel_run(text, text) FROM PUBLIC")
    try:
        assert_error(ingress.request("POST", f"/api/runs/{run_id}/cancel", token=tok, headers=kc), 403, "forbidden")
    finally:
        with ingress.sql() as conn:
            conn.execute("GRANT EXECUTE ON FUNCTION dispatched.cancel_run(text, text) TO PUBLIC")
    s, h, b = ingress.request("POST", f"/api/runs/{run_id}/cancel", token=tok, headers=kc)
    assert (s, b) == (200, {"cancelled": True}) and "openwop-idempotent-replay" not in h


def test_a_key_held_by_another_caller_is_409_in_flight(ingress, role, tok):
    wf = define(ingress, WAIT_GO)
    key = "held-" + uuid.uuid4().hex
    with ingress.sql(role) as conn:
        # the same tenant holds the key through the SQL API (Layer 1 is shared)
        assert conn.execute("SELECT dispatched.idempotency_begin('POST /api/runs', %s)", (key,)).fetchone()[0] == {
            "state": "new"}
        s, h, b = ingress.request("POST", "/api/runs", {"workflow": wf}, token=tok, headers={"Idempotency-Key": key})
        assert_error((s, h, b), 409, "idempotency_in_flight")
        assert b["retryAfter"] == 1 and h["retry-after"] == "1"
        conn.execute("SELECT dispatched.idempotency_complete('POST /api/runs', %s, 500, 'null')", (key,))
    # released (a retryable outcome): the next request executes
    s, h, _ = ingress.request("POST", "/api/runs", {"workflow": wf}, token=tok, headers={"Idempotency-Key": key})
    assert s == 201 and "openwop-idempotent-replay" not in h


def test_concurrent_duplicates_start_one_run(ingress, tok):
    wf = define(ingress, WAIT_GO)
    key = "dup-" + uuid.uuid4().hex
    n = 6
    barrier = threading.Barrier(n)
    results = []
    lock = threading.Lock()

    def go():
        barrier.wait()
        r = ingress.request("POST", "/api/runs", {"workflow": wf}, token=tok, headers={"Idempotency-Key": key})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n
    originals = [r for r in results if r[0] == 201 and "openwop-idempotent-replay" not in r[1]]
    replays = [r for r in results if r[0] == 201 and r[1].get("openwop-idempotent-replay") == "true"]
    in_flight = [r for r in results if r[0] == 409]
    assert len(originals) == 1, results
    assert len(originals) + len(replays) + len(in_flight) == n, results
    assert all(r[2] == originals[0][2] for r in replays)
    assert all(r[2]["error"] == "idempotency_in_flight" and r[2]["retryAfter"] >= 1 for r in in_flight)
    assert ingress.one("SELECT count(*) FROM dispatched.runs WHERE workflow = %s", (wf,)) == 1


@pytest.mark.parametrize("bad_key", ["x" * 256, "has space", "slash/ed", "ümlaut", ""])
def test_bad_idempotency_keys_are_400(ingress, tok, bad_key):
    wf = define(ingress, WAIT_GO) if bad_key == "x" * 256 else "any"
    conn = http.client.HTTPConnection(ingress.host, ingress.port, timeout=10)
    body = json.dumps({"workflow": wf})
    # send the raw header bytes (http.client would refuse some of them)
    conn.putrequest("POST", "/api/runs")
    conn.putheader("Dispatched-Session", tok)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.putheader("Idempotency-Key", bad_key.encode("utf-8"))
    conn.endheaders(body.encode())
    resp = conn.getresponse()
    b = json.loads(resp.read())
    conn.close()
    assert resp.status == 400 and b["error"] == "invalid_idempotency_key", b


def test_a_255_character_key_is_accepted(ingress, tok):
    wf = define(ingress, WAIT_GO)
    s, _, _ = ingress.request("POST", "/api/runs", {"workflow": wf}, token=tok,
                              headers={"Idempotency-Key": "k" * 255})
    assert s == 201


# -- bounds -------------------------------------------------------------------------------------


def raw(ingress, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection((ingress.host, ingress.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_a_body_over_the_limit_is_413_without_reading_it(ingress, tok):
    s, _, b = ingress.request("POST", "/api/runs", {"workflow": "w", "input": {"x": "y" * MAX_BODY}}, token=tok)
    assert_error((s, None, b), 413, "body_too_large")


def test_chunked_bodies_are_refused(ingress, tok):
    out = raw(ingress, b"POST /api/runs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       b"Dispatched-Session: " + tok.encode() + b"\r\n\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 411 ")


def test_slow_headers_and_bodies_time_out_with_408(ingress, tok):
    t0 = time.monotonic()
    out = raw(ingress, b"GET /api/capabilities HTTP/1.1\r\nHost: x\r\n")  # no blank line: never ends
    assert out.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in out
    assert 1.5 < time.monotonic() - t0 < 8
    out = raw(ingress, b"POST /api/runs HTTP/1.1\r\nContent-Length: 100\r\nDispatched-Session: "
                       + tok.encode() + b"\r\n\r\n{\"work")
    assert out.startswith(b"HTTP/1.1 408 ")


def test_oversized_headers_are_431_and_garbage_is_400(ingress):
    out = raw(ingress, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")
    assert raw(ingress, b"HELLO\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_connections_over_the_cap_get_503_and_the_ingress_recovers(ingress, tok):
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            idle.append(socket.create_connection((ingress.host, ingress.port), timeout=10))
        # the held connections are accepted in order before this one
        out = raw(ingress, b"GET /api/capabilities HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in out
        # the idle ones are answered 408 and closed after the read timeout
        for s in idle:
            assert s.recv(100).startswith(b"HTTP/1.1 408 ")
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while True:  # the connection threads finish right after writing their 408
        status = ingress.request("GET", "/api/capabilities", token=tok)[0]
        if status == 200:
            break
        assert status == 503 and time.monotonic() < deadline
        time.sleep(0.05)


def test_expect_100_continue_gets_an_interim_answer(ingress, tok):
    """curl sends `Expect: 100-continue` with larger bodies and waits for it before sending."""
    wf = define(ingress, WAIT_GO)
    body = json.dumps({"workflow": wf, "input": {"pad": "x" * 2000}}).encode()
    with socket.create_connection((ingress.host, ingress.port), timeout=10) as s:
        s.sendall(b"POST /api/runs HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Type: application/json\r\n"
                  b"Dispatched-Session: " + tok.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        interim = s.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 201 ")


def test_the_dashboard_page_needs_no_token(ingress):
    status, headers, body = ingress.request("GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>dispatched</title>" in body and "frame-ancestors 'none'" in headers["content-security-policy"]


# -- last: this one crashes the module's cluster on purpose ------------------------------------


def test_the_ingress_comes_back_after_a_crash(ingress, tok):
    import os
    import signal

    (pid,) = ingress.cluster.worker_pids("dispatched ingress")
    os.kill(pid, signal.SIGKILL)  # the postmaster resets every backend, then restarts the workers
    deadline = time.monotonic() + 60
    while True:
        try:
            pids = ingress.cluster.worker_pids("dispatched ingress")
            if pids and pids[0] != pid:
                break
        except Exception:  # the server is still recovering
            pass
        assert time.monotonic() < deadline, "the ingress did not come back"
        time.sleep(0.2)
    ingress.wait_listening()
    status, _, body = ingress.request("GET", "/api/capabilities", token=tok)
    assert status == 200 and body["capabilities"]["idempotency"]["supported"] is True
