"""The dashboard in a real browser: headless Chromium (Debian package `chromium`) driven over
the DevTools protocol loads `GET /` from the ingress of a real cluster whose worker ran real
workflows against the programmable service. The test checks what a person sees (the token
form, run ids and statuses, filters, search, a run's step timeline with attempts, status
codes, retries, waits, compensation and a child run, the event stream, and a live run that
finishes while the page is open) and saves screenshots under tests/artifacts/."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
from psycopg.types.json import Jsonb

from harness import Reply
from harness.browser import Browser, chromium_path

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (scripts/setup.sh installs it)")


def b64(v) -> str:
    return base64.b64encode(json.dumps(v).encode()).decode()


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def define(ingress, name: str, definition: dict) -> str:
    ingress.one("SELECT dispatched.define_workflow(%s, %s)", (name, Jsonb(definition)))
    return name


def test_the_dashboard_shows_runs_steps_and_a_live_run(ingress, http_service, browser):
    tag = uuid.uuid4().hex[:6]
    role = ingress.cluster.create_role()
    tok = ingress.token(user=role)
    http_service.script("/reserve", Reply(200, {"reservation": "r-1"}))
    http_service.script("/charge", lambda req: Reply(503) if req.headers["Dispatched-Attempt"] == "1"
                        else Reply(200, {"charge": "c-1"}, delay=0.05))
    http_service.script("/refund", Reply(200, {"refunded": True}))
    http_service.script("/ship", Reply(200, {"tracking": "t-1"}))
    http_service.script("/ship-broken", Reply(422, {"error": "address"}))
    child_wf = define(ingress, f"notify-{tag}", {"steps": [{"id": "mail", "request": {"url": http_service.url("/ship")}}]})
    http_service.script("/report", Reply(202, {"job": "j-1"}, headers={
        "Dispatched-Spawn": f"{child_wf}; input={b64({'to': 'ann'})}; mode=detach"}))

    def checkout(ship_path):
        return {"steps": [
            {"id": "reserve", "request": {"url": http_service.url("/reserve")}},
            {"id": "charge", "request": {"url": http_service.url("/charge")},
             "retry": {"max_attempts": 3, "initial_interval": "200ms"},
             "compensate": {"url": http_service.url("/refund")}},
            {"id": "ship", "request": {"url": http_service.url(ship_path)}}]}

    ok_wf = define(ingress, f"checkout-{tag}", checkout("/ship"))
    bad_wf = define(ingress, f"checkout-broken-{tag}", checkout("/ship-broken"))
    wait_wf = define(ingress, f"approval-{tag}", {"steps": [
        {"id": "report", "request": {"url": http_service.url("/report")}, "wait": {"signal": "approved"}}]})

    def start(wf):
        status, _, body = ingress.request("POST", "/api/runs", {"workflow": wf, "input": {"order": tag}}, token=tok)
        assert status == 201
        return body["run_id"]

    completed, failed, waiting = start(ok_wf), start(bad_wf), start(wait_wf)
    for run_id, want in [(completed, "completed"), (failed, "failed")]:
        assert ingress.request("GET", f"/api/runs/{run_id}/attach?timeout=30s", token=tok)[0] == 200
        assert ingress.request("GET", f"/api/runs/{run_id}", token=tok)[2]["status"] == want
    http_service.wait_for("/report", 1)
    child = None
    for _ in range(300):  # the child exists once the worker recorded the 202 (attach wakes us)
        runs = ingress.request("GET", f"/api/runs?q={child_wf}", token=tok)[2]["runs"]
        if runs:
            child = runs[0]["id"]
            break
        ingress.request("GET", f"/api/runs/{waiting}/attach?timeout=100ms", token=tok)
    assert child is not None
    base = f"http://{ingress.host}:{ingress.port}"

    # 1. the token form, entered once
    browser.goto(base + "/")
    browser.wait_for("!document.getElementById('login').hidden")
    assert "Session token" in browser.text()
    browser.js(f"document.getElementById('token').value = {json.dumps(tok)};"
               "document.getElementById('loginform').requestSubmit()")
    browser.wait_for("document.querySelectorAll('#runs tr.run').length >= 4")
    text = browser.text()
    for run_id in (completed, failed, waiting, child):
        assert run_id in text
    for word in ("completed", "failed", "waiting", ok_wf, bad_wf, wait_wf, "waits for approved"):
        assert word in text, word
    statuses = browser.js("Object.fromEntries([...document.querySelectorAll('#runs tr.run')]"
                          ".map(tr => [tr.dataset.id, tr.querySelector('.badge').textContent]))")
    assert statuses == {completed: "completed", failed: "failed", waiting: "waiting", child: "completed"}
    assert browser.js("document.querySelector('button[data-status=failed]').innerText") == "failed 1"
    browser.screenshot(ARTIFACTS / "dashboard-runs.png")

    # kept in the browser: a fresh load shows the runs without asking again
    browser.goto(base + "/")
    browser.wait_for("document.querySelectorAll('#runs tr.run').length >= 4")
    assert browser.js("document.getElementById('login').hidden") is True

    # 2. a status filter and a search
    browser.js("document.querySelector('button[data-status=failed]').click()")
    browser.wait_for("location.hash.includes('status=failed') && document.querySelectorAll('#runs tr.run').length === 1")
    assert browser.js("document.querySelector('#runs tr.run').dataset.id") == failed
    browser.js(f"document.getElementById('search').value = {json.dumps(wait_wf)};"
               "document.getElementById('search').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))")
    browser.wait_for("location.hash.includes('q=') && document.querySelectorAll('#runs tr.run').length === 0")
    assert "No runs match." in browser.text()  # a waiting run is not among the failed ones
    browser.js("document.querySelector('button[data-status=\"\"]').click()")
    browser.wait_for(f"document.querySelectorAll('#runs tr.run').length === 1 && "
                     f"document.querySelector('#runs tr.run').dataset.id === {json.dumps(waiting)}")

    # 3. a completed run: its steps as a timeline, with the retried attempt
    browser.js("location.hash = '#/runs'")
    browser.wait_for(f"!!document.querySelector('tr.run[data-id={json.dumps(completed)}]')")
    browser.js(f"document.querySelector('tr.run[data-id={json.dumps(completed)}]').click()")
    browser.wait_for(f"document.getElementById('runid') && document.getElementById('runid').textContent === {json.dumps(completed)}")
    text = browser.text()
    for want in ("reserve", "charge", "ship", "attempt #1", "HTTP 503, retry in", "attempt #2", "HTTP 200",
                 "run.completed", "step.retry_scheduled", '"tracking": "t-1"'):
        assert want in text, want
    assert browser.js("document.querySelectorAll('.tl .seg').length") == 4  # reserve, charge x2, ship
    assert browser.js("document.querySelectorAll('.tl .seg.retry').length") == 1
    assert "live" not in browser.js("document.querySelector('#run h2').innerText")
    browser.screenshot(ARTIFACTS / "dashboard-run-completed.png")

    # 4. a failed run: the failed step and the compensation of the charge
    browser.js(f"location.hash = '#/run/{failed}'")
    browser.wait_for(f"document.getElementById('runid') && document.getElementById('runid').textContent === {json.dumps(failed)}")
    text = browser.text()
    for want in ("compensation #1", "HTTP 422, failed for good", "compensated", "compensation.succeeded", "run.failed"):
        assert want in text, want
    assert browser.js("[...document.querySelectorAll('.tl .badge')].map(b => b.textContent)") == [
        "succeeded", "compensated", "failed"]
    browser.screenshot(ARTIFACTS / "dashboard-run-failed.png")

    # 5. a live run: waiting, with its child; it finishes while the page is open
    browser.js(f"location.hash = '#/run/{waiting}'")
    browser.wait_for(f"document.getElementById('runid') && document.getElementById('runid').textContent === {json.dumps(waiting)}")
    text = browser.text()
    for want in ("live", 'waits for signal "approved"', f"child run {child}", "HTTP 202"):
        assert want in text, want
    assert browser.js("document.getElementById('signame').value") == "approved"
    # it refreshes by itself; an open event and what is typed survive a refresh
    browser.js("document.querySelector('details[data-seq=\"2\"]').open = true;"
               "document.getElementById('sigdata').value = '{\"typed\": 1}';"
               "document.getElementById('runid').dataset.mark = 'before'")
    browser.wait_for("document.getElementById('runid') && !document.getElementById('runid').dataset.mark")
    assert browser.js("document.querySelector('details[data-seq=\"2\"]').open") is True
    assert browser.js("document.getElementById('sigdata').value") == '{"typed": 1}'
    browser.screenshot(ARTIFACTS / "dashboard-run-live.png")
    assert ingress.request("POST", f"/api/runs/{waiting}/signal/approved", {"by": "ann"}, token=tok)[2] == {"delivered": True}
    browser.wait_for("document.querySelector('#run h2 .badge').textContent === 'completed'", timeout=15)
    text = browser.text()
    assert "signal received" in text and "run.completed" in text and "live" not in browser.js(
        "document.querySelector('#run h2').innerText")
    browser.screenshot(ARTIFACTS / "dashboard-run-live-finished.png")

    # 6. the child run opens from its link; a revoked token is asked for again
    browser.js(f"document.querySelector('a[href=\"#/run/{child}\"]').click()")
    browser.wait_for(f"document.getElementById('runid') && document.getElementById('runid').textContent === {json.dumps(child)}")
    assert waiting in browser.text()  # its parent
    ingress.one("SELECT dispatched.revoke_session_token(%s)", (tok,), user=role)
    browser.js("location.hash = '#/runs'")
    browser.wait_for("!document.getElementById('login').hidden")
    assert "unknown or revoked session token" in browser.text()
