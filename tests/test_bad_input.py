"""Every bad input tried, and the exact error it gets: the source of docs/bad-input.md.

Each case is an SQL call with its arguments. The expected outcome (SQLSTATE and the first line
of the message, or "accepted") is recorded in tests/bad_input_expected.json; the test runs
every case against a real cluster and compares, and checks that docs/bad-input.md is exactly
the table rendered from the cases and that snapshot, so the document cannot drift from what
the extension does. Malformed directive headers are not SQL errors: a service sends them and
the run's events get a `directive.invalid` with the reason; those are checked the same way.

After a deliberate change of behaviour:  python3 tests/test_bad_input.py --update
(runs the cases against a fresh cluster, rewrites the snapshot and the document; review the
diff before committing it).
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "bad_input_expected.json"
DOC = HERE.parent / "docs" / "bad-input.md"

OK_WAIT = {"id": "w", "wait": {"signal": "s"}}


def step(**extra):
    s = {"id": "a", "request": {"url": "http://h/"}}
    s.update(extra)
    return {"steps": [s]}


def req(**fields):
    r = {"url": "http://h/"}
    r.update(fields)
    return {"steps": [{"id": "a", "request": r}]}


def nested_array(n):
    return "[" * n + "]" * n


def nested_object(n):
    return '{"a":' * n + "1" + "}" * n


def b64(value) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


DEF = "SELECT dispatched.define_workflow('bad', %s::jsonb)"
START = "SELECT dispatched.start_run(%s, %s::jsonb, %s, %s::interval)"

# (group, what, sql, params). `jsonb` arguments are passed as text and cast, so that text
# which is not JSON reaches the server as such.
CASES: list[tuple[str, str, str, tuple]] = []


def case(group, what, sql, *params):
    CASES.append((group, what, sql, params))


def define(what, doc):
    case("definition", what, DEF, doc if isinstance(doc, str) else json.dumps(doc))


define("not JSON", '{"steps": [')
define("not an object", [])
define("no steps", {})
define("steps not an array", {"steps": {}})
define("no step", {"steps": []})
define("1001 steps", {"steps": [{"id": f"s{i}", "wait": {"signal": "s"}} for i in range(1001)]})
define("unknown top-level field", {"steps": [OK_WAIT], "extra": 1})
define("a step that is a string", {"steps": ["a"]})
define("step without id", {"steps": [{"wait": {"signal": "s"}}]})
define("step id a number", {"steps": [{"id": 5, "wait": {"signal": "s"}}]})
define("step id with a dot", {"steps": [{"id": "a.b", "wait": {"signal": "s"}}]})
define("step id of 129 characters", {"steps": [{"id": "x" * 129, "wait": {"signal": "s"}}]})
define("duplicate step id", {"steps": [OK_WAIT, OK_WAIT]})
define("step with neither request nor wait", {"steps": [{"id": "a"}]})
define("retry on a wait-only step", {"steps": [{"id": "a", "wait": {"signal": "s"}, "retry": {}}]})
define("unknown step field", step(colour="red"))
define("request not an object", {"steps": [{"id": "a", "request": "http://h/"}]})
define("request without url", {"steps": [{"id": "a", "request": {"method": "POST"}}]})
define("url not a string", req(url=7))
define("url with ftp scheme", req(url="ftp://h/"))
define("url without host", req(url="http:///x"))
define("url with port 99999", req(url="http://h:99999/"))
define("url with port 0", req(url="http://h:0/"))
define("url with credentials", req(url="http://u:p@h/"))
define("url with a space", req(url="http://h/a b"))
define("url with an unclosed IPv6 address", req(url="http://[::1/x"))
define("url with a bad host name", req(url="http://h%41/"))
define("unsupported method", req(method="FETCH"))
define("GET with a body", req(method="GET", body={}))
define("header name with a space", req(headers={"Bad Name": "x"}))
define("reserved header Idempotency-Key", req(headers={"Idempotency-Key": "x"}))
define("header value not a string", req(headers={"X-N": 1}))
define("header value with a line break", req(headers={"X-A": "a\r\nX-B: b"}))
define("timeout without unit", step(timeout="30"))
define("timeout 0s", step(timeout="0s"))
define("timeout over a day", step(timeout="2d"))
define("timeout a number", step(timeout=30))
define("timeout with a fraction", step(timeout="1.5s"))
define("timeout negative", step(timeout="-1s"))
define("timeout in parsecs", step(timeout="10 parsecs"))
define("timeout huge number", step(timeout="99999999999999999999999s"))
define("retry max_attempts 0", step(retry={"max_attempts": 0}))
define("retry max_attempts 2.5", step(retry={"max_attempts": 2.5}))
define("retry max_attempts 1001", step(retry={"max_attempts": 1001}))
define("retry backoff_coefficient 0.5", step(retry={"backoff_coefficient": 0.5}))
define("retry max_interval below initial_interval", step(retry={"initial_interval": "10s", "max_interval": "1s"}))
define("retry unknown field", step(retry={"tries": 3}))
define("retry interval over 366 days", step(retry={"initial_interval": "367d"}))
define("idempotency_header other than key/invocation", step(idempotency_header="both"))
define("provider_key with a space", step(provider_key="a b"))
define("wait without signal", {"steps": [{"id": "a", "wait": {}}]})
define("wait signal empty", {"steps": [{"id": "a", "wait": {"signal": ""}}]})
define("wait timeout not a duration", {"steps": [{"id": "a", "wait": {"signal": "s", "timeout": "soon"}}]})
define("expression unclosed", req(body={"x": "{{ input.amount"}))
define("expression empty", req(body={"x": "{{ }}"}))
define("expression unknown root", req(headers={"X": "{{ inputs.x }}"}))
define("expression empty segment", req(body="{{ input..x }}"))
define("expression ending in a dot", req(body="{{ input.x. }}"))
define("expression with a space inside", req(body="{{ input.a b }}"))
define("expression bad array index", req(body="{{ input.items[x] }}"))
define("expression run field other than id", req(body="{{ run.started }}"))
define("expression secrets without name", req(body="{{ secrets }}"))
define("expression upper-case header name", {"steps": [{"id": "a", "request": {"url": "http://h/"}},
                                                       {"id": "b", "request": {"url": "http://h/", "body": "{{ steps.a.response.headers.X-Id }}"}}]})
define("expression to a later step", {"steps": [{"id": "a", "request": {"url": "http://h/", "body": "{{ steps.b.response.body }}"}},
                                                {"id": "b", "request": {"url": "http://h/"}}]})
define("expression to an unknown step", req(body="{{ steps.zz.response.status }}"))
define("expression to the response of a wait-only step", {"steps": [OK_WAIT, {"id": "b", "request": {"url": "http://h/{{ steps.w.response.body.x }}"}}]})
define("secret in the output", {"steps": [{"id": "a", "request": {"url": "http://h/"}}], "output": "{{ secrets.x }}"})
define("array nested 101 levels", nested_array(101))
define("object nested 101 levels", '{"steps": ' + nested_array(100) + "}")
define("array nested 10,000 levels", nested_array(10_000))
define("array nested 100,000 levels", nested_array(100_000))
define("a 10 MB definition (one big body string)", req(body={"blob": "x" * (10 * 1024 * 1024)}))
case("definition", "workflow name NULL", "SELECT dispatched.define_workflow(NULL, '{}')")
case("definition", "definition NULL", "SELECT dispatched.define_workflow('w', NULL)")
case("definition", "workflow name with a space", "SELECT dispatched.define_workflow('a b', %s)", json.dumps({"steps": [OK_WAIT]}))
case("definition", "workflow name empty", "SELECT dispatched.define_workflow('', %s)", json.dumps({"steps": [OK_WAIT]}))
case("definition", "workflow name of 129 characters", "SELECT dispatched.define_workflow(%s, %s)", "w" * 129, json.dumps({"steps": [OK_WAIT]}))

for what, key in [("empty", ""), ("256 characters", "k" * 256), ("with a space", "a b"), ("with a slash", "a/b"),
                  ("non-ASCII", "clé"), ("with a backslash", "a\\x00")]:
    case("key", f"start_run key {what}", START, "ok", "{}", key, None)
case("key", "idempotency_begin key with a slash", "SELECT dispatched.idempotency_begin('POST /x', 'a/b')")
case("key", "idempotency_begin key NULL", "SELECT dispatched.idempotency_begin('POST /x', NULL)")
case("key", "idempotency_begin endpoint empty", "SELECT dispatched.idempotency_begin('', 'k')")
case("key", "signal key of 256 characters", "SELECT dispatched.signal(%s, 's', NULL, %s)", "run_none", "k" * 256)
case("key", "start_run key reused with another input", "SELECT dispatched.start_run('ok', '{\"i\": 1}', 'reused'), dispatched.start_run('ok', '{\"i\": 2}', 'reused')")

case("run", "start_run workflow NULL", START, None, "{}", None, None)
case("run", "start_run unknown workflow", START, "nope", "{}", None, None)
case("run", "start_run input not JSON", START, "ok", "{nope", None, None)
case("run", "start_run input nested 101 levels", START, "ok", nested_object(101), None, None)
case("run", "start_run input nested 10,000 levels", START, "ok", nested_object(10_000), None, None)
case("run", "start_run a 10 MB input", "SELECT length(dispatched.start_run('ok', %s::jsonb)) > 10", json.dumps({"blob": "x" * (10 * 1024 * 1024)}))
case("run", "signal unknown run", "SELECT dispatched.signal('run_none', 's')")
case("run", "signal name with a space", "SELECT dispatched.signal('run_none', 'a b')")
case("run", "signal data nested 101 levels", "SELECT dispatched.signal('run_none', 's', %s::jsonb)", nested_object(101))
case("run", "record_invocation outcome nested 101 levels",
     "SELECT dispatched.record_invocation('run_x', 'n', 0, 'p', %s::jsonb)", nested_object(101))
case("run", "idempotency_complete headers not an object",
     "SELECT dispatched.idempotency_begin('POST /h', 'hk'), dispatched.idempotency_complete('POST /h', 'hk', 200, '{}', '[]')")
case("run", "set_secret name with a dot", "SELECT dispatched.set_secret('a.b', 'v')")

case("duration", "start_run delay negative", START, "ok", "{}", None, "-1 second")
case("duration", "start_run delay not an interval", START, "ok", "{}", None, "soon")
for setting, value in [("idempotency_retention", "10 parsecs"), ("idempotency_retention", "1.5h"),
                       ("invocation_retention", "367 days"), ("invocation_retention", "-1d"),
                       ("default_timeout", "soon"), ("default_timeout", "")]:
    case("duration", f"SET dispatched.{setting} = '{value}'", f"SET dispatched.{setting} = '{value}'")

# Directive headers a service may send. (header, value) -> the directive.invalid reason.
DIRECTIVES: list[tuple[str, str]] = [
    ("Dispatched-Spawn", "; mode=attach"),
    ("Dispatched-Spawn", "child; input=!!!"),
    ("Dispatched-Spawn", "child; input=eyJh"),
    ("Dispatched-Spawn", "child; mode=later"),
    ("Dispatched-Spawn", "child; colour=red"),
    ("Dispatched-Spawn", "no-such-workflow"),
    ("Dispatched-Spawn", "bad name"),
    ("Dispatched-Spawn", "child; input=" + base64.b64encode(nested_object(200).encode()).decode()),
    ("Dispatched-Signal", "name=go"),
    ("Dispatched-Signal", "run=a b; name=go"),
    ("Dispatched-Signal", "run=run_x"),
    ("Dispatched-Signal", "run=run_x; name=a b"),
    ("Dispatched-Signal", "run=run_x; name=go; data=***"),
    ("Dispatched-Signal", "run=run_x; name=go; when=now"),
    ("Dispatched-Signal", "just text"),
    ("Dispatched-Cancel", " "),
    ("Dispatched-Cancel", "run/../x"),
    ("Dispatched-Delay", "in a while"),
    ("Dispatched-Delay", "30"),
    ("Dispatched-Delay", "400d"),
    ("Dispatched-Log", "   "),
]


# Bad HTTP requests to the ingress: (what, raw request). {tok} is a valid session token.
def http(method, path, body=None, headers=None, token=True):
    head = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    if token:
        head.append("Dispatched-Session: {tok}")
    for k, v in (headers or {}).items():
        head.append(f"{k}: {v}")
    data = b""
    if body is not None:
        data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        head.append("Content-Type: application/json")
        if not any(k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})):
            head.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


INGRESS: list[tuple[str, bytes]] = [
    ("no Dispatched-Session header", http("GET", "/api/runs", token=False)),
    ("an unknown session token", http("GET", "/api/runs", token=False, headers={"Dispatched-Session": "nope"})),
    ("body that is not JSON", http("POST", "/api/runs", "{not json")),
    ("body that is a JSON array", http("POST", "/api/runs", [1, 2])),
    ("no workflow", http("POST", "/api/runs", {"input": {}})),
    ("workflow a number", http("POST", "/api/runs", {"workflow": 7})),
    ("an unknown workflow", http("POST", "/api/runs", {"workflow": "nope"})),
    ("input nested 101 levels", http("POST", "/api/runs", '{"workflow": "ok", "input": ' + nested_object(101) + "}")),
    ("delay that is not a duration", http("POST", "/api/runs", {"workflow": "ok", "delay": "soon"})),
    ("Idempotency-Key with a space", http("POST", "/api/runs", {"workflow": "ok"}, {"Idempotency-Key": "has space"})),
    ("Idempotency-Key of 256 characters", http("POST", "/api/runs", {"workflow": "ok"}, {"Idempotency-Key": "k" * 256})),
    ("body over dispatched.http_max_body_bytes (64 KiB here)", http("POST", "/api/runs", {"workflow": "ok", "input": {"x": "y" * 65536}})),
    ("Transfer-Encoding: chunked", http("POST", "/api/runs", b"0\r\n\r\n", {"Transfer-Encoding": "chunked"})),
    ("Content-Length that is not a number", http("POST", "/api/runs", b"{}", {"Content-Length": "twelve"})),
    ("headers over 16 KiB", http("GET", "/api/runs", headers={"X-Big": "h" * 17000})),
    ("a request line that is not HTTP", b"HELLO THERE\r\n\r\n"),
    ("an unknown path", http("GET", "/api/nope")),
    ("a method the path does not take", http("DELETE", "/api/runs")),
    ("run list limit=0", http("GET", "/api/runs?limit=0")),
    ("an unknown run", http("GET", "/api/runs/run_doesnotexist0000000000")),
    ("attach with timeout=forever", http("GET", "/api/runs/run_doesnotexist0000000000/attach?timeout=forever")),
    ("a signal whose body is not JSON", http("POST", "/api/runs/run_doesnotexist0000000000/signal/go", "{x")),
    ("cancel with a reason that is a number", http("POST", "/api/runs/run_doesnotexist0000000000/cancel", {"reason": 5})),
]


def run_ingress_case(ingress, token, data):
    """Sends a raw request; returns {"status", "error", "message"} of the answer."""
    import socket

    with socket.create_connection((ingress.host, ingress.port), timeout=15) as s:
        s.sendall(data.replace(b"{tok}", token.encode()))
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    return {"status": status, "error": doc.get("error"), "message": doc.get("message")}


def ingress_results(ingress):
    ingress.one("SELECT dispatched.define_workflow('ok', %s)", (Jsonb({"steps": [OK_WAIT]}),))
    token = ingress.token()
    return {what: run_ingress_case(ingress, token, data) for what, data in INGRESS}


def run_case(conn, sql, params):
    try:
        with conn.transaction():
            conn.execute(sql, params or None)
        return {"sqlstate": None, "message": "accepted"}
    except psycopg.Error as e:
        primary = e.diag.message_primary or str(e).splitlines()[0]
        # run ids are random: the table shows them as run_…
        return {"sqlstate": e.sqlstate, "message": re.sub(r"run_[A-Za-z0-9_-]{22}(?![A-Za-z0-9_-])", "run_…", primary)}


def prepare(conn):
    conn.execute("SELECT dispatched.define_workflow('ok', %s)", (Jsonb({"steps": [OK_WAIT]}),))


def run_directives(conn, http_service):
    """Sends every directive header in one response; returns {(header, value): reason}."""
    from harness import Reply

    from test_worker import attach, events, start

    http_service.script("/directives", Reply(200, {"ok": 1}, headers=DIRECTIVES))
    conn.execute("SELECT dispatched.define_workflow('directives', %s)",
                 (Jsonb({"steps": [{"id": "d", "request": {"url": http_service.url("/directives")}}]}),))
    run_id = start(conn, "directives")
    assert attach(conn, run_id) == {"ok": 1}
    got = {}
    for t, _, d in events(conn, run_id):
        if t == "directive.invalid":
            got[f"{d['header']}: {d['value'].strip()}"] = d["reason"]
    return got


def results(conn, http_service):
    prepare(conn)
    out = {"sql": {}, "directives": {}}
    for group, what, sql, params in CASES:
        out["sql"][f"{group}: {what}"] = run_case(conn, sql, params)
    out["directives"] = run_directives(conn, http_service)
    return out


def _cell(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def render(expected) -> str:
    lines = [
        "# Bad input and the error it gets",
        "",
        "Every bad input tried against `dispatched`, with the exact SQLSTATE and message (first",
        "line) it gets. Generated from `tests/test_bad_input.py`, which runs each case against a real",
        "cluster and fails when the extension answers differently, or when this file is not",
        "exactly what it renders: regenerate with `python3 tests/test_bad_input.py --update`.",
        "",
        "Nothing here crashes a backend or the worker, and no case gets an internal error (`XX000`).",
        "JSON nested more than 100 levels deep is refused with `22023` wherever it comes in",
        "(definitions, run input, signal data, activity-log outcomes), counted on the text without",
        "recursion; PostgreSQL itself refuses jsonb text nested so deeply that its own parser would",
        "exceed `max_stack_depth` (`54001`). Size is not limited beyond PostgreSQL's own limits: a",
        "10 MB definition or input is accepted.",
        "",
        "## SQL calls",
        "",
        "| group | input | SQLSTATE | message |",
        "| --- | --- | --- | --- |",
    ]
    for group, what, _, _ in CASES:
        r = expected["sql"][f"{group}: {what}"]
        lines.append(f"| {group} | {_cell(what)} | {r['sqlstate'] or '—'} | {_cell(r['message'])} |")
    lines += [
        "",
        "## Directive headers (a service's response)",
        "",
        "A malformed directive is never fatal: the step succeeds and the run's events get a",
        "`directive.invalid` event `{\"header\", \"value\", \"reason\"}` with this reason.",
        "",
        "| header: value | reason |",
        "| --- | --- |",
    ]
    for header, value in DIRECTIVES:
        key = f"{header.lower()}: {value.strip()}"
        lines.append(f"| `{_cell(header + ': ' + value)}` | {_cell(expected['directives'].get(key, 'NOT REPORTED'))} |")
    lines += [
        "",
        "## HTTP ingress requests",
        "",
        "Sent as raw bytes to the ingress (`dispatched.http_port`) with a valid session token",
        "unless the case says otherwise; the answer's status and its JSON body",
        "`{\"error\", \"message\"}`. A bad request never reaches the database half done.",
        "",
        "| request | status | error | message |",
        "| --- | --- | --- | --- |",
    ]
    for what, _ in INGRESS:
        r = expected["ingress"].get(what, {"status": 0, "error": None, "message": "NOT RUN"})
        lines.append(f"| {_cell(what)} | {r['status']} | {r['error'] or '—'} | {_cell(r['message'] or '—')} |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def expected():
    return json.loads(EXPECTED.read_text())


def test_every_bad_input_gets_its_documented_error(connect, http_service, expected):
    conn = connect()
    got = results(conn, http_service)
    mismatches = {k: (expected["sql"].get(k), v) for k, v in got["sql"].items() if expected["sql"].get(k) != v}
    assert not mismatches, json.dumps(mismatches, indent=1)[:5000]
    assert got["directives"] == expected["directives"]


def test_every_bad_ingress_request_gets_its_documented_answer(ingress, expected):
    got = ingress_results(ingress)
    mismatches = {k: (expected["ingress"].get(k), v) for k, v in got.items() if expected["ingress"].get(k) != v}
    assert not mismatches, json.dumps(mismatches, indent=1)[:5000]


def test_no_bad_input_gets_an_internal_error(expected):
    for what, r in expected["sql"].items():
        assert not (r["sqlstate"] or "").startswith("XX"), (what, r)
    for header, value in DIRECTIVES:
        key = f"{header.lower()}: {value.strip()}"
        assert key in expected["directives"], key
    for what, _ in INGRESS:
        r = expected["ingress"][what]
        assert 400 <= r["status"] < 500 and r["error"] and r["message"], (what, r)


def test_the_document_is_the_table_of_the_cases(expected):
    assert DOC.read_text() == render(expected), "docs/bad-input.md is stale: python3 tests/test_bad_input.py --update"


if __name__ == "__main__" and "--update" in sys.argv:
    sys.path.insert(0, str(HERE))
    from harness import Cluster, HttpService

    from harness.ingress import start_ingress

    svc = HttpService().start()
    c = Cluster(extra_conf=["dispatched.database = 'bad'"]).start()
    try:
        c.create_database("bad")
        with c.connect("bad") as conn:
            got = results(conn, svc)
    finally:
        c.stop()
        svc.stop()
    ing = start_ingress("bad")
    try:
        got["ingress"] = ingress_results(ing)
    finally:
        ing.cluster.stop()
    EXPECTED.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    DOC.write_text(render(got))
    print(f"wrote {EXPECTED} and {DOC}")
