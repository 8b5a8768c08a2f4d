"""Black-box tests of the HTTP worker: real cluster (worker preloaded), real requests to the
programmable service. Each test asserts what a user sees: what the service received, the run
document, the output and the event stream."""

from __future__ import annotations

import base64
import json
import time

import pytest
from psycopg.types.json import Jsonb

from harness import Reply


def b64(value) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def start(conn, workflow: str, input_=None, key=None, delay=None) -> str:
    return conn.execute(
        "SELECT dispatched.start_run(%s, %s, %s, %s::interval)",
        (workflow, Jsonb(input_ or {}), key, delay),
    ).fetchone()[0]


def attach(conn, run_id: str, timeout: str = "30s"):
    return conn.execute("SELECT dispatched.attach(%s, %s::interval)", (run_id, timeout)).fetchone()[0]


def run_doc(conn, run_id: str) -> dict:
    return conn.execute("SELECT dispatched.run(%s)", (run_id,)).fetchone()[0]


def events(conn, run_id: str) -> list[tuple[str, str | None, dict]]:
    rows = conn.execute("SELECT type, step, data FROM dispatched.events(%s)", (run_id,)).fetchall()
    return [(t, s, d) for t, s, d in rows]


def types(conn, run_id: str) -> list[str]:
    return [t for t, _, _ in events(conn, run_id)]


def finish(conn, run_id: str, timeout: str = "30s") -> dict:
    """Waits for the run to finish (attach, woken at commit) and returns its document."""
    out = attach(conn, run_id, timeout)
    doc = run_doc(conn, run_id)
    assert doc["status"] in ("completed", "failed", "cancelled"), (out, doc)
    return doc


# -- a workflow end to end ----------------------------------------------------------------------


def test_three_steps_with_expressions_headers_and_output(connect, define_workflow, http_service):
    conn = connect()
    conn.execute("SELECT dispatched.set_secret('svc_token', 'tok-123-secret')")
    http_service.script("/orders", Reply(201, {"order_id": "o-7", "total": 4999}, headers={"X-Request-Id": "req-9"}))
    http_service.script("/charge", Reply(200, {"transaction_id": "txn_1"}))
    http_service.script("/notify", Reply(202, "queued"))
    wf = define_workflow({
        "steps": [
            {"id": "create-order", "request": {
                "url": http_service.url("/orders"),
                "headers": {"Authorization": "Bearer {{ secrets.svc_token }}"},
                "body": {"customer": "{{ input.customer }}", "items": "{{ input.items }}"}}},
            {"id": "charge", "request": {
                "method": "PUT",
                "url": http_service.url("/charge"),
                "body": {"order": "{{ steps.create-order.response.body.order_id }}",
                         "amount": "{{ steps.create-order.response.body.total }}",
                         "note": "order {{ steps.create-order.response.body.order_id }} for {{ input.customer }}",
                         "trace": "{{ steps.create-order.response.headers.x-request-id }}",
                         "run": "{{ run.id }}"}},
             "provider_key": "billing:charge"},
            {"id": "notify", "request": {"url": http_service.url("/notify"), "body": {"status": "{{ steps.charge.response.status }}"}}},
        ],
        "output": {"order": "{{ steps.create-order.response.body.order_id }}",
                   "txn": "{{ steps.charge.response.body.transaction_id }}",
                   "notified": "{{ steps.notify.response.body }}"},
    })
    run_id = start(conn, wf, {"customer": "ann", "items": [1, 2]})
    assert attach(conn, run_id) == {"order": "o-7", "txn": "txn_1", "notified": "queued"}

    (o,) = http_service.requests("/orders")
    assert o.method == "POST"
    assert o.json == {"customer": "ann", "items": [1, 2]}
    assert o.headers["Authorization"] == "Bearer tok-123-secret"
    assert o.headers["Content-Type"] == "application/json"
    assert o.headers["Dispatched-Run"] == run_id
    assert o.headers["Dispatched-Step"] == "create-order"
    assert o.headers["Dispatched-Attempt"] == "1"
    assert o.headers["Idempotency-Key"] == f"{run_id}/create-order"
    port = http_service.port
    expected_inv = conn.execute(
        "SELECT dispatched.invocation_id(%s, 'create-order', 0, %s)", (run_id, f"http:POST:127.0.0.1:{port}")
    ).fetchone()[0]
    assert o.headers["Dispatched-Invocation"] == expected_inv

    (c,) = http_service.requests("/charge")
    assert c.method == "PUT"
    assert c.json == {"order": "o-7", "amount": 4999, "note": "order o-7 for ann", "trace": "req-9", "run": run_id}
    assert c.headers["Dispatched-Invocation"] == conn.execute(
        "SELECT dispatched.invocation_id(%s, 'charge', 0, 'billing:charge')", (run_id,)
    ).fetchone()[0]
    (n,) = http_service.requests("/notify")
    assert n.json == {"status": 200}

    doc = run_doc(conn, run_id)
    assert doc["status"] == "completed"
    assert [(s["id"], s["status"], s["attempt"]) for s in doc["steps"]] == [
        ("create-order", "succeeded", 1), ("charge", "succeeded", 1), ("notify", "succeeded", 1)]
    first = doc["steps"][0]["response"]
    assert first["status"] == 201
    assert first["body"] == {"order_id": "o-7", "total": 4999}
    assert first["headers"]["x-request-id"] == "req-9"
    assert doc["steps"][2]["response"]["body"] == "queued"
    assert types(conn, run_id) == [
        "run.started",
        "step.started", "step.succeeded",
        "step.started", "step.succeeded",
        "step.started", "step.succeeded",
        "run.completed"]
    succeeded = [d for t, _, d in events(conn, run_id) if t == "step.succeeded"]
    assert [d["status"] for d in succeeded] == [201, 200, 202]
    assert succeeded[0]["body"] == {"order_id": "o-7", "total": 4999}
    assert all(isinstance(d["duration_ms"], float) and d["duration_ms"] > 0 for d in succeeded)
    started = [d for t, _, d in events(conn, run_id) if t == "step.started"]
    assert started[0]["idempotency_key"] == f"{run_id}/create-order"
    assert started[0]["headers"]["authorization"] == "[redacted]"
    # Layer 2: every attempt's outcome is in the invocation log under its id
    assert conn.execute("SELECT dispatched.lookup_invocation(%s)", (expected_inv,)).fetchone()[0]["status"] == 201


def test_without_output_the_run_gives_the_last_steps_body(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/last", Reply(200, {"done": True}))
    wf = define_workflow({"steps": [{"id": "only", "request": {"method": "GET", "url": http_service.url("/last")}}]})
    run_id = start(conn, wf)
    assert attach(conn, run_id) == {"done": True}
    assert conn.execute("SELECT dispatched.output(%s)", (run_id,)).fetchone()[0] == {"done": True}


# -- the status table ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 409])
def test_permanent_4xx_fails_at_once(connect, define_workflow, http_service, status):
    conn = connect()
    path = f"/perm{status}"
    http_service.script(path, Reply(status, {"error": "no"}))
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url(path)},
                                     "retry": {"max_attempts": 5, "initial_interval": "100ms"}}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    assert doc["error"] == {"message": f"HTTP {status}", "step": "s", "status": status}
    assert len(http_service.requests(path)) == 1
    assert conn.execute("SELECT dispatched.output(%s)", (run_id,)).fetchone()[0] == doc["error"]


def test_5xx_default_policy_is_three_attempts(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/down", Reply(500, {"e": 1}))
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/down")}}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    reqs = http_service.requests("/down")
    assert [r.headers["Dispatched-Attempt"] for r in reqs] == ["1", "2", "3"]
    assert len({r.headers["Idempotency-Key"] for r in reqs}) == 1
    assert len({r.headers["Dispatched-Invocation"] for r in reqs}) == 3
    # backoff 1 s then 2 s, with at most 20% jitter
    assert reqs[1].at - reqs[0].at >= 0.75
    assert reqs[2].at - reqs[1].at >= 1.55
    assert doc["status"] == "failed" and doc["error"]["status"] == 500
    assert doc["steps"][0]["attempt"] == 3
    assert types(conn, run_id).count("step.retry_scheduled") == 2


def test_503_then_success_honours_retry_after(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/busy", [Reply(503, headers={"Retry-After": "2"}), Reply(200, {"ok": 1})])
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/busy")}}]})
    run_id = start(conn, wf)
    assert attach(conn, run_id) == {"ok": 1}
    a, b = http_service.requests("/busy")
    assert b.at - a.at >= 1.9
    assert b.headers["Dispatched-Attempt"] == "2"


def test_429_is_retried_without_a_policy_after_retry_after_as_http_date(connect, define_workflow, http_service):
    conn = connect()
    from email.utils import formatdate

    def limited(req):
        if req.index == 0:
            return Reply(429, headers={"Retry-After": formatdate(time.time() + 3, usegmt=True)})
        return Reply(200, {"ok": True})

    http_service.script("/rate", limited)
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/rate")}}]})
    run_id = start(conn, wf)
    assert attach(conn, run_id) == {"ok": True}
    a, b = http_service.requests("/rate")
    assert b.at - a.at >= 2.0  # whole seconds; well past the 1 s backoff


def test_408_and_timeouts_retry_only_with_a_policy(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/t408", Reply(408))
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/t408")}}]})
    doc = finish(conn, start(conn, wf))
    assert doc["status"] == "failed" and len(http_service.requests("/t408")) == 1

    http_service.script("/slow", [Reply(200, {"late": True}, delay=2.0), Reply(200, {"fast": True})])
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/slow")}, "timeout": "500ms"}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    assert "timed out" in doc["error"]["message"]
    assert doc["error"]["status"] is None

    http_service.script("/slow2", [Reply(200, {"late": True}, delay=2.0), Reply(200, {"fast": True})])
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/slow2")}, "timeout": "500ms",
                                     "retry": {"max_attempts": 2, "initial_interval": "100ms"}}]})
    run_id = start(conn, wf)
    assert attach(conn, run_id) == {"fast": True}
    assert [r.headers["Dispatched-Attempt"] for r in http_service.requests("/slow2")] == ["1", "2"]


def test_connection_errors_retry_only_with_a_policy(connect, define_workflow):
    conn = connect()
    from harness.net import free_port

    dead = f"http://127.0.0.1:{free_port()}/x"
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": dead}}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    assert "connection" in doc["error"]["message"].lower() or "network" in doc["error"]["message"].lower()
    assert types(conn, run_id).count("step.retry_scheduled") == 0

    wf = define_workflow({"steps": [{"id": "s", "request": {"url": dead}, "retry": {"max_attempts": 3, "initial_interval": "50ms"}}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    assert doc["steps"][0]["attempt"] == 3
    assert types(conn, run_id).count("step.retry_scheduled") == 2


def test_json_body_that_is_not_json_fails_the_step(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/broken", Reply(200, b"{not json", content_type="application/json"))
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/broken")}}]})
    doc = finish(conn, start(conn, wf))
    assert doc["status"] == "failed"
    assert "not JSON" in doc["error"]["message"]


# -- compensation -------------------------------------------------------------------------------


def test_failure_compensates_succeeded_steps_in_reverse_order(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/reserve", Reply(200, {"reservation": "r-1"}))
    http_service.script("/charge", Reply(200, {"charge_id": "ch-9"}))
    http_service.script("/ship", Reply(422, {"error": "no address"}))
    http_service.script("/release", Reply(200))
    http_service.script("/refund", [Reply(503), Reply(200)])
    wf = define_workflow({"steps": [
        {"id": "reserve", "request": {"url": http_service.url("/reserve")},
         "compensate": {"url": http_service.url("/release"), "body": {"r": "{{ steps.reserve.response.body.reservation }}"}}},
        {"id": "log", "request": {"url": http_service.url("/reserve")}},
        {"id": "charge", "request": {"url": http_service.url("/charge")},
         "compensate": {"url": http_service.url("/refund"), "body": {"charge_id": "{{ steps.charge.response.body.charge_id }}"}},
         "retry": {"max_attempts": 3, "initial_interval": "100ms"}},
        {"id": "ship", "request": {"url": http_service.url("/ship")}},
    ]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    assert doc["error"] == {"message": "HTTP 422", "step": "ship", "status": 422}
    refunds = http_service.requests("/refund")
    (release,) = http_service.requests("/release")
    assert [r.json for r in refunds] == [{"charge_id": "ch-9"}, {"charge_id": "ch-9"}]
    assert {r.headers["Idempotency-Key"] for r in refunds} == {f"{run_id}/charge/compensate"}
    assert [r.headers["Dispatched-Attempt"] for r in refunds] == ["1", "2"]
    assert release.json == {"r": "r-1"}
    assert release.headers["Idempotency-Key"] == f"{run_id}/reserve/compensate"
    assert refunds[-1].at < release.at  # reverse order
    assert [s["status"] for s in doc["steps"]] == ["compensated", "succeeded", "compensated", "failed"]
    comp = [(t, s) for t, s, _ in events(conn, run_id) if t.startswith("compensation.")]
    assert comp == [("compensation.started", "charge"), ("compensation.started", "charge"),
                    ("compensation.succeeded", "charge"),
                    ("compensation.started", "reserve"), ("compensation.succeeded", "reserve")]


def test_a_compensation_that_fails_for_good_is_in_the_events(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/a", Reply(200))
    http_service.script("/undo-a", Reply(400))
    http_service.script("/b", Reply(404))
    wf = define_workflow({"steps": [
        {"id": "a", "request": {"url": http_service.url("/a")}, "compensate": {"url": http_service.url("/undo-a")}},
        {"id": "b", "request": {"url": http_service.url("/b")}},
    ]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    assert "compensation.failed" in types(conn, run_id)
    assert types(conn, run_id)[-1] == "run.failed"


# -- waits and signals --------------------------------------------------------------------------


def test_202_then_signal_completes_the_step(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/report", Reply(202, {"job_id": "j-1"}))
    wf = define_workflow({"steps": [
        {"id": "report", "request": {"url": http_service.url("/report")}, "wait": {"signal": "report-ready", "timeout": "1m"}},
    ], "output": {"job": "{{ steps.report.response.body.job_id }}", "url": "{{ steps.report.signal.url }}"}})
    run_id = start(conn, wf)
    http_service.wait_for("/report", 1)
    # the worker records the answer and parks the run; wait for it to show as waiting
    deadline = time.monotonic() + 10
    while run_doc(conn, run_id)["status"] != "waiting":
        assert time.monotonic() < deadline, run_doc(conn, run_id)
        attach(conn, run_id, "50ms")
    assert conn.execute("SELECT dispatched.signal(%s, 'report-ready', %s)", (run_id, Jsonb({"url": "https://r/1"}))).fetchone()[0]
    assert attach(conn, run_id) == {"job": "j-1", "url": "https://r/1"}
    doc = run_doc(conn, run_id)
    assert doc["steps"][0]["status"] == "succeeded"
    assert doc["steps"][0]["signal"] == {"url": "https://r/1"}


def test_a_signal_sent_before_the_wait_is_kept(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/slow", Reply(200, {"ok": 1}, delay=1.0))
    wf = define_workflow({"steps": [
        {"id": "work", "request": {"url": http_service.url("/slow")}},
        {"id": "approve", "wait": {"signal": "approved"}},
    ], "output": "{{ steps.approve.signal }}"})
    run_id = start(conn, wf)
    http_service.wait_for("/slow", 1)  # step 1 is in flight: nobody waits for the signal yet
    assert conn.execute("SELECT dispatched.signal(%s, 'approved', %s)", (run_id, Jsonb({"by": "bo"}))).fetchone()[0]
    assert attach(conn, run_id) == {"by": "bo"}


def test_a_wait_times_out(connect, define_workflow):
    conn = connect()
    wf = define_workflow({"steps": [{"id": "w", "wait": {"signal": "never", "timeout": "500ms"}}]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    assert doc["error"]["message"] == 'wait for signal "never" timed out after 500ms'
    assert doc["error"]["step"] == "w"


# -- cancel and delay ---------------------------------------------------------------------------


def test_cancel_discards_the_answer_in_flight_and_stops_the_run(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/slow", Reply(200, {"late": True}, delay=1.5))
    http_service.script("/next", Reply(200))
    wf = define_workflow({"steps": [
        {"id": "slow", "request": {"url": http_service.url("/slow")}},
        {"id": "next", "request": {"url": http_service.url("/next")}},
    ]})
    run_id = start(conn, wf)
    http_service.wait_for("/slow", 1)
    assert conn.execute("SELECT dispatched.cancel_run(%s, 'user asked')", (run_id,)).fetchone()[0]
    assert attach(conn, run_id)["message"] == "cancelled: user asked"
    # the slow answer goes back 1.5 s after the request arrived; give the worker time to get it
    (slow,) = http_service.requests("/slow")
    time.sleep(max(0.0, slow.at + 2.5 - time.monotonic()))
    doc = run_doc(conn, run_id)
    assert doc["status"] == "cancelled"
    assert doc["steps"][0]["response"] is None
    assert doc["steps"][0]["status"] == "failed"
    assert http_service.requests("/next") == []
    assert types(conn, run_id)[-1] == "run.cancelled"


def test_start_delay_is_durable_and_the_run_is_pending_meanwhile(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/later", Reply(200, {"ok": True}))
    wf = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/later")}}]})
    t0 = time.time()
    run_id = start(conn, wf, delay="1500ms")
    assert run_doc(conn, run_id)["status"] == "pending"
    assert attach(conn, run_id) == {"ok": True}
    (r,) = http_service.requests("/later")
    assert r.wall - t0 >= 1.4


# -- directives ---------------------------------------------------------------------------------


def test_directives_log_delay_signal_cancel_and_invalid(connect, define_workflow, http_service):
    conn = connect()
    waiter = define_workflow({"steps": [{"id": "w", "wait": {"signal": "poke"}}], "output": "{{ steps.w.signal }}"})
    victim = define_workflow({"steps": [{"id": "w", "wait": {"signal": "never"}}]})
    other = start(conn, waiter)
    doomed = start(conn, victim)
    http_service.script("/d", Reply(200, {"ok": 1}, headers=[
        ("Dispatched-Log", "first line"),
        ("Dispatched-Log", "second line"),
        ("Dispatched-Delay", "1s"),
        ("Dispatched-Signal", f"run={other}; name=poke; data={b64({'from': 'service'})}"),
        ("Dispatched-Cancel", doomed),
        ("Dispatched-Delay", "in a while"),
        ("Dispatched-Spawn", "no-such-workflow"),
    ]))
    http_service.script("/e", Reply(200, {"second": True}))
    wf = define_workflow({"steps": [
        {"id": "d", "request": {"url": http_service.url("/d")}},
        {"id": "e", "request": {"url": http_service.url("/e")}},
    ]})
    run_id = start(conn, wf)
    assert attach(conn, run_id) == {"second": True}
    evs = events(conn, run_id)
    assert [d["message"] for t, _, d in evs if t == "log"] == ["first line", "second line"]
    invalid = [d for t, _, d in evs if t == "directive.invalid"]
    assert {"header": "dispatched-delay", "value": "in a while"}.items() <= invalid[0].items()
    assert "invalid duration" in invalid[0]["reason"]
    assert invalid[1]["header"] == "dispatched-spawn" and "does not exist" in invalid[1]["reason"]
    (d,) = http_service.requests("/d")
    (e,) = http_service.requests("/e")
    assert e.at - d.at >= 0.95  # Dispatched-Delay: 1s before the next step
    assert attach(conn, other) == {"from": "service"}
    assert run_doc(conn, doomed)["status"] == "cancelled"


def test_spawn_detach_and_attach(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/child", Reply(200, {"shipped": True}))
    child = define_workflow({"steps": [{"id": "c", "request": {"url": http_service.url("/child"), "body": {"order": "{{ input.order }}"}}}],
                             "output": {"order": "{{ input.order }}", "child_done": True}})
    http_service.script("/parent", Reply(200, {"p": 1}, headers=[
        ("Dispatched-Spawn", f"{child}; input={b64({'order': 1})}; mode=detach"),
        ("Dispatched-Spawn", f"{child}; input={b64({'order': 2})}; mode=attach"),
    ]))
    wf = define_workflow({"steps": [{"id": "p", "request": {"url": http_service.url("/parent")}}],
                          "output": "{{ steps.p.response.body }}"})
    run_id = start(conn, wf)
    assert attach(conn, run_id) == {"order": 2, "child_done": True}
    children = conn.execute(
        "SELECT id, input, status FROM dispatched.runs WHERE parent = %s ORDER BY input->>'order'", (run_id,)
    ).fetchall()
    assert [(c[1], c[2] in ("completed", "running", "pending")) for c in children] == [({"order": 1}, True), ({"order": 2}, True)]
    assert run_doc(conn, children[0][0])["parent"] == run_id
    spawned = [d for t, _, d in events(conn, run_id) if t == "child.spawned"]
    assert [s["mode"] for s in spawned] == ["detach", "attach"]
    assert sorted(r.json["order"] for r in http_service.wait_for("/child", 2)) == [1, 2]


# -- redaction and encryption -------------------------------------------------------------------


def test_secrets_never_appear_in_stored_data(connect, define_workflow, http_service, cluster, dbname):
    conn = connect()
    secret = "sk_live_REDACT_ME_42"
    conn.execute("SELECT dispatched.set_secret('stripe', %s)", (secret,))
    http_service.script("/echo", lambda req: Reply(200, {"echo": req.headers.get("X-Key"), "auth": req.headers.get("Authorization")},
                                                   headers={"Set-Cookie": "session=abc", "X-Echo": req.headers.get("X-Key")}))
    http_service.script("/fail", Reply(500, {"msg": f"bad key {secret}"}))
    wf = define_workflow({"steps": [
        {"id": "echo", "request": {"url": http_service.url("/echo"), "headers": {
            "Authorization": "Bearer {{ secrets.stripe }}", "X-Key": "{{ secrets.stripe }}", "Cookie": "c=1"},
            "body": {"k": "{{ secrets.stripe }}"}}},
        {"id": "fail", "request": {"url": http_service.url("/fail?k={{ secrets.stripe }}")}, "retry": {"max_attempts": 1}},
    ]})
    run_id = start(conn, wf)
    doc = finish(conn, run_id)
    assert doc["status"] == "failed"
    (req,) = http_service.requests("/echo")
    assert req.headers["X-Key"] == secret  # the service did get it
    dumps = conn.execute("""
        SELECT coalesce((SELECT string_agg(to_jsonb(r)::text, ' ') FROM dispatched.runs r WHERE id = %(id)s), '')
            || coalesce((SELECT string_agg(to_jsonb(s)::text, ' ') FROM dispatched.steps s WHERE run_id = %(id)s), '')
            || coalesce((SELECT string_agg(to_jsonb(e)::text, ' ') FROM dispatched.events e WHERE run_id = %(id)s), '')
            || coalesce((SELECT string_agg(to_jsonb(i)::text, ' ') FROM dispatched.invocations i WHERE run_id = %(id)s), '')
            || dispatched.run(%(id)s)::text || dispatched.output(%(id)s)::text
    """, {"id": run_id}).fetchone()[0]
    assert secret not in dumps
    assert "[redacted]" in dumps
    started = [d for t, s, d in events(conn, run_id) if t == "step.started" and s == "echo"][0]
    assert started["headers"]["authorization"] == "[redacted]"
    assert started["headers"]["cookie"] == "[redacted]"
    response = doc["steps"][0]["response"]
    assert response["headers"]["set-cookie"] == "[redacted]"
    assert secret not in cluster.server_log()


# -- bounds: a cluster of their own, with small limits -------------------------------------------


@pytest.fixture(scope="module")
def bounded(dbname):
    from harness import Cluster

    c = Cluster(extra_conf=[
        f"dispatched.database = '{dbname}'",
        "dispatched.max_response_bytes = 65536",
        "dispatched.allowed_hosts = '127.0.0.1'",
        "dispatched.encryption_key = 'test-key-1'",
    ]).start()
    try:
        c.create_database(dbname, extension=True)
        yield c
    finally:
        c.stop()


def test_an_oversized_body_fails_the_step(bounded, dbname, http_service):
    with bounded.connect(dbname) as conn:
        http_service.script("/big", Reply(200, {"blob": "x" * 100000}))
        conn.execute("SELECT dispatched.define_workflow('big', %s)", (Jsonb({"steps": [{"id": "s", "request": {"url": http_service.url("/big")}}]}),))
        run_id = start(conn, "big")
        doc = finish(conn, run_id)
        assert doc["status"] == "failed"
        assert doc["error"]["message"] == "response body is larger than dispatched.max_response_bytes (65536 bytes)"


def test_hosts_outside_allowed_hosts_and_metadata_addresses_are_refused(bounded, dbname, http_service):
    with bounded.connect(dbname) as conn:
        http_service.script("/ok", Reply(200))
        conn.execute("SELECT dispatched.define_workflow('byname', %s)", (Jsonb({"steps": [{"id": "s", "request": {"url": f"http://localhost:{http_service.port}/ok"}}]}),))
        conn.execute("SELECT dispatched.define_workflow('meta', %s)", (Jsonb({"steps": [{"id": "s", "request": {"url": "http://169.254.169.254/latest/meta-data"}}]}),))
        doc = finish(conn, start(conn, "byname"))
        assert doc["status"] == "failed"
        assert doc["error"]["message"] == 'host "localhost" is not in dispatched.allowed_hosts'
        doc = finish(conn, start(conn, "meta"))
        assert doc["status"] == "failed"
        assert "169.254.169.254" in doc["error"]["message"]
        assert http_service.requests("/ok") == []


def test_redirects_are_followed_only_to_allowed_hosts(bounded, dbname, http_service):
    with bounded.connect(dbname) as conn:
        http_service.script("/hop", Reply(302, headers={"Location": "/target"}))
        http_service.script("/target", Reply(200, {"arrived": True}))
        http_service.script("/away", Reply(307, headers={"Location": f"http://localhost:{http_service.port}/target"}))
        http_service.script("/loop", Reply(302, headers={"Location": "/loop"}))
        for name, path in [("hop", "/hop"), ("away", "/away"), ("loop", "/loop")]:
            conn.execute("SELECT dispatched.define_workflow(%s, %s)", (name, Jsonb({"steps": [{"id": "s", "request": {"url": http_service.url(path)}}]})))
        assert attach(conn, start(conn, "hop")) == {"arrived": True}
        doc = finish(conn, start(conn, "away"))
        assert doc["error"]["message"] == 'host "localhost" is not in dispatched.allowed_hosts'
        doc = finish(conn, start(conn, "loop"))
        assert "more than 5 redirects" in doc["error"]["message"]
        assert len(http_service.requests("/loop")) == 6


def test_large_bodies_are_encrypted_in_events(bounded, dbname, http_service):
    with bounded.connect(dbname) as conn:
        small = {"blob": "s" * 100}
        big = {"blob": "y" * 20000}
        http_service.script("/small", Reply(200, small))
        http_service.script("/large", Reply(200, big))
        conn.execute("SELECT dispatched.define_workflow('enc', %s)", (Jsonb({"steps": [
            {"id": "a", "request": {"url": http_service.url("/small")}},
            {"id": "b", "request": {"url": http_service.url("/large")}}]}),))
        run_id = start(conn, "enc")
        assert attach(conn, run_id) == big
        responses = {s: d for t, s, d in events(conn, run_id) if t == "step.succeeded"}
        assert responses["a"]["body"] == small
        stored = responses["b"]["body"]
        assert stored["encrypted"] == "aes-256-gcm"
        assert "yyyy" not in json.dumps(stored)
        assert conn.execute("SELECT dispatched.decrypt(%s)", (Jsonb(stored),)).fetchone()[0] == big


# -- faults -------------------------------------------------------------------------------------


def test_kill_9_of_the_worker_mid_request_completes_the_run(connect, define_workflow, http_service, cluster, dbname):
    conn = connect()
    http_service.script("/slow", [Reply(200, {"first": True}, delay=3.0), Reply(200, {"second": True})])
    http_service.script("/after", Reply(200, {"done": True}))
    wf = define_workflow({"steps": [
        {"id": "slow", "request": {"url": http_service.url("/slow")}, "timeout": "10s"},
        {"id": "after", "request": {"url": http_service.url("/after")}},
    ]})
    run_id = start(conn, wf)
    http_service.wait_for("/slow", 1)
    killed = cluster.kill_workers()
    assert killed
    cluster.wait_workers_replaced(killed)
    conn = connect()
    assert attach(conn, run_id, "60s") == {"done": True}
    reqs = http_service.requests("/slow")
    assert 1 <= len(reqs) <= 2
    assert {r.headers["Idempotency-Key"] for r in reqs} == {f"{run_id}/slow"}
    assert {r.headers["Dispatched-Attempt"] for r in reqs} == {"1"}
    assert len(http_service.requests("/after")) == 1
    assert run_doc(conn, run_id)["steps"][0]["attempt"] == 1


def test_restart_fast_mid_run_completes_the_run(connect, define_workflow, http_service, cluster, dbname):
    conn = connect()
    http_service.script("/s1", Reply(200, {"a": 1}, delay=1.0))
    http_service.script("/s2", Reply(200, {"b": 2}))
    wf = define_workflow({"steps": [
        {"id": "s1", "request": {"url": http_service.url("/s1")}},
        {"id": "s2", "request": {"url": http_service.url("/s2")}},
    ]})
    run_id = start(conn, wf)
    http_service.wait_for("/s1", 1)
    conn.close()
    cluster.restart("fast")
    conn = connect()
    assert attach(conn, run_id, "60s") == {"b": 2}
    assert {r.headers["Dispatched-Attempt"] for r in http_service.requests("/s1")} == {"1"}
    assert len(http_service.requests("/s2")) == 1


# -- concurrency ---------------------------------------------------------------------------------


def test_a_slow_service_does_not_hold_up_other_runs(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/slow", Reply(200, {"slow": True}, delay=3.0))
    http_service.script("/fast", Reply(200, {"fast": True}))
    slow = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/slow")}}]})
    fast = define_workflow({"steps": [{"id": "a", "request": {"url": http_service.url("/fast")}},
                                      {"id": "b", "request": {"url": http_service.url("/fast")}}]})
    slow_run = start(conn, slow)
    http_service.wait_for("/slow", 1)
    t0 = time.monotonic()
    assert attach(conn, start(conn, fast), "10s") == {"fast": True}
    assert time.monotonic() - t0 < 2.5  # done while the slow request (3 s) is still on the wire
    assert run_doc(conn, slow_run)["status"] == "running"
    assert attach(conn, slow_run) == {"slow": True}


@pytest.fixture(scope="module")
def two_workers(dbname):
    from harness import Cluster

    c = Cluster(extra_conf=[f"dispatched.database = '{dbname}'", "dispatched.workers = 2"]).start()
    try:
        c.create_database(dbname, extension=True)
        yield c
    finally:
        c.stop()


def test_two_workers_share_the_work_and_send_each_step_once(two_workers, dbname, http_service):
    assert len(two_workers.wait_for_workers(2)) == 2
    http_service.script("/step", lambda req: Reply(200, {"n": req.index}))
    with two_workers.connect(dbname) as conn:
        conn.execute("SELECT dispatched.define_workflow('pair', %s)", (Jsonb({"steps": [
            {"id": "a", "request": {"url": http_service.url("/step")}},
            {"id": "b", "request": {"url": http_service.url("/step")}},
            {"id": "c", "request": {"url": http_service.url("/step")}}]}),))
        ids = [r[0] for r in conn.execute(
            "SELECT dispatched.start_run('pair', jsonb_build_object('i', g)) FROM generate_series(1, 200) g").fetchall()]
        for run_id in ids:
            assert run_doc(conn, run_id)["status"] in ("pending", "running", "completed")
        for run_id in ids:
            attach(conn, run_id, "60s")
        statuses = conn.execute("SELECT status, count(*) FROM dispatched.runs GROUP BY 1").fetchall()
        assert statuses == [("completed", 200)]
    reqs = http_service.requests("/step")
    keys = [(r.headers["Idempotency-Key"], r.headers["Dispatched-Attempt"]) for r in reqs]
    assert len(keys) == 600
    assert len(set(keys)) == 600  # no step sent twice


def test_idempotency_header_invocation_sends_the_invocation_id(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/inv", [Reply(500), Reply(200, {"ok": 1})])
    wf = define_workflow({"steps": [{"id": "pay", "request": {"url": http_service.url("/inv")},
                                     "provider_key": "stripe:create-charge", "idempotency_header": "invocation"}]})
    run_id = start(conn, wf)
    assert attach(conn, run_id) == {"ok": 1}
    first, second = http_service.requests("/inv")
    for attempt, req in enumerate([first, second]):
        inv = conn.execute("SELECT dispatched.invocation_id(%s, 'pay', %s, 'stripe:create-charge')", (run_id, attempt)).fetchone()[0]
        assert req.headers["Idempotency-Key"] == inv
        assert req.headers["Dispatched-Invocation"] == inv
    # both attempts' outcomes are in the activity log, failure included
    assert conn.execute("SELECT dispatched.lookup_invocation(%s)", (first.headers["Dispatched-Invocation"],)).fetchone()[0]["status"] == 500


def test_a_run_whose_definition_cannot_be_read_fails_alone(connect, define_workflow, http_service):
    conn = connect()
    http_service.script("/fine", Reply(200, {"fine": True}))
    good = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/fine")}}]})
    bad = define_workflow({"steps": [{"id": "s", "request": {"url": http_service.url("/fine")}}]})
    # a definition damaged behind the API's back (as a superuser could)
    conn.execute("UPDATE dispatched.workflows SET definition = '{\"steps\": \"not a list\"}' WHERE name = %s", (bad,))
    with conn.transaction():  # both runs become due at once, in one batch
        bad_run = start(conn, bad)
        good_run = start(conn, good)
    assert attach(conn, good_run) == {"fine": True}
    doc = finish(conn, bad_run)
    assert doc["status"] == "failed"
    assert doc["error"]["message"].startswith("the workflow definition cannot be read: ")
    assert "steps: must be an array" in doc["error"]["message"]


def test_secrets_are_not_in_pg_stat_activity_while_a_request_is_on_the_wire(connect, define_workflow, http_service):
    conn = connect()
    secret = "sk_live_ACTIVITY_77"
    # a bind parameter: the secret is not in this statement's text either
    conn.execute("SELECT dispatched.set_secret('activity_key', %s)", (secret,), prepare=False)
    http_service.script("/hold", Reply(200, {"ok": True}, delay=1.5))
    wf = define_workflow({"steps": [
        {"id": "a", "request": {"url": http_service.url("/hold"), "headers": {"X-Key": "{{ secrets.activity_key }}"}}},
        {"id": "b", "request": {"url": http_service.url("/hold"), "body": {"k": "{{ secrets.activity_key }}"}}},
    ]})
    run_id = start(conn, wf)
    for n in (1, 2):
        http_service.wait_for("/hold", n)  # the worker is between claim and record, or recording
        seen = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE %s",
            (f"%{secret}%",)).fetchone()[0]
        assert seen == 0
    assert attach(conn, run_id) == {"ok": True}
    assert http_service.requests("/hold")[0].headers["X-Key"] == secret


@pytest.fixture
def hosts_file_names():
    """Names that resolve, through /etc/hosts, to the addresses chosen here (removed again at
    the end). glibc reads /etc/hosts at every lookup, so the worker sees them at once."""
    from pathlib import Path

    path = Path("/etc/hosts")
    names = {
        "metadata.dispatched.test": "169.254.169.254",
        "linklocal6.dispatched.test": "fe80::1",
        "loopback.dispatched.test": "127.0.0.1",
    }
    before = path.read_text()
    try:
        path.write_text(before.rstrip("\n") + "\n" + "".join(f"{ip} {name}\n" for name, ip in names.items()))
    except OSError as e:
        pytest.fail(f"these tests add names to /etc/hosts and cannot: {e}")
    try:
        yield names
    finally:
        path.write_text(before)


def test_a_name_whose_dns_answer_is_a_metadata_or_link_local_address_is_refused(
        connect, define_workflow, http_service, hosts_file_names):
    # every host is allowed on this cluster (allowed_hosts is empty), but not these addresses,
    # whatever name leads to them
    http_service.script("/ok", Reply(200, {"ok": True}))
    conn = connect()
    control = define_workflow({"steps": [{"id": "s", "request": {"url": f"http://loopback.dispatched.test:{http_service.port}/ok"}}]})
    # the names do resolve: the control reaches the service through one of them
    assert attach(conn, start(conn, control)) == {"ok": True}
    for name, ip in [("metadata.dispatched.test", "169.254.169.254"), ("linklocal6.dispatched.test", "fe80::1")]:
        wf = define_workflow({"steps": [{"id": "s", "request": {"url": f"http://{name}:{http_service.port}/ok"}}]})
        doc = finish(conn, start(conn, wf))
        assert doc["status"] == "failed", doc
        assert doc["error"]["message"] == (
            f'host "{name}" resolves to {ip}, a link-local or cloud metadata address; '
            "list it in dispatched.allowed_hosts to allow it"), doc["error"]
    assert len(http_service.requests("/ok")) == 1


@pytest.fixture(scope="module")
def small_pool(dbname):
    from harness import Cluster

    c = Cluster(extra_conf=[
        f"dispatched.database = '{dbname}'",
        "dispatched.max_concurrent_requests = 8",
        "dispatched.max_requests_per_host = 2",
    ]).start()
    try:
        c.create_database(dbname, extension=True)
        yield c
    finally:
        c.stop()


def test_one_host_gets_at_most_its_share_of_connections_and_the_rest_wait_in_order(small_pool, dbname, http_service):
    with small_pool.connect(dbname) as conn:
        http_service.script("/slow", Reply(200, {"slow": True}, delay=2.0))
        http_service.script("/fast", Reply(200, {"fast": True}))
        # two origins of one service: 127.0.0.1:<port> is slow, localhost:<port> is fast
        conn.execute("SELECT dispatched.define_workflow('slow1', %s)", (Jsonb({"steps": [
            {"id": "s", "request": {"url": http_service.url("/slow")}}]}),))
        conn.execute("SELECT dispatched.define_workflow('fast2', %s)", (Jsonb({"steps": [
            {"id": "a", "request": {"url": f"http://localhost:{http_service.port}/fast"}},
            {"id": "b", "request": {"url": f"http://localhost:{http_service.port}/fast"}}]}),))
        slow_runs = [start(conn, "slow1") for _ in range(6)]
        http_service.wait_for("/slow", 2)
        t0 = time.monotonic()
        assert attach(conn, start(conn, "fast2"), "10s") == {"fast": True}
        assert time.monotonic() - t0 < 1.5  # while the first slow requests are on the wire
        # the slow host has its 2 requests on the wire; the other 4 wait in the worker
        assert len(http_service.requests("/slow")) == 2
        assert [run_doc(conn, r)["status"] for r in slow_runs].count("completed") == 0
        for r in slow_runs:
            assert attach(conn, r, "20s") == {"slow": True}
        keys = [req.headers.get("Idempotency-Key") for req in http_service.requests("/slow")]
        assert sorted(keys) == sorted(f"{r}/s" for r in slow_runs)  # each sent once


def test_requests_waiting_for_their_host_longer_than_a_lease_are_still_sent_once(small_pool, dbname, http_service):
    # two at a time to this host, each 1.5 s: the last of 30 waits ~21 s in the worker, longer
    # than the lease its claim took (3 s timeout + 15 s), so its lease must be renewed while it
    # waits, or the run would be claimed again and its step sent twice (the 1.5 s between the
    # answer and the timeout leaves room for a loaded machine)
    with small_pool.connect(dbname) as conn:
        http_service.script("/slowish", Reply(200, {"ok": True}, delay=1.5))
        conn.execute("SELECT dispatched.define_workflow('slowish', %s)", (Jsonb({"steps": [
            {"id": "s", "request": {"url": http_service.url("/slowish")}, "timeout": "3s"}]}),))
        runs = [start(conn, "slowish") for _ in range(30)]
        for r in runs:
            assert attach(conn, r, "60s") == {"ok": True}
        keys = [req.headers.get("Idempotency-Key") for req in http_service.requests("/slowish")]
        assert sorted(keys) == sorted(f"{r}/s" for r in runs)
