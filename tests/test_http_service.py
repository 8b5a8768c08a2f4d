"""Self-test of the programmable HTTP service (tests/harness/http_service.py), called with
urllib and raw sockets, so that the suites built on it can trust it."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from harness import Reply, WaitTimeout


def call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    """(status, headers as list of pairs, body bytes), also for 4xx and 5xx."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.items(), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.items(), e.read()


def test_script_is_consumed_in_order_and_the_last_reply_repeats(http_service):
    path = "/seq"
    http_service.script(
        path,
        [
            Reply(503, {"error": "busy"}, headers=[("Retry-After", "1")]),
            Reply(500, "oops"),
            Reply(200, {"ok": True}),
        ],
    )
    got = [call(http_service.url(path)) for _ in range(5)]
    assert [s for s, _, _ in got] == [503, 500, 200, 200, 200]
    assert json.loads(got[0][2]) == {"error": "busy"}
    assert ("Retry-After", "1") in got[0][1]
    assert ("Content-Type", "application/json") in got[0][1]
    assert got[1][2] == b"oops"
    assert ("Content-Type", "text/plain; charset=utf-8") in got[1][1]
    assert json.loads(got[4][2]) == {"ok": True}
    assert [r.index for r in http_service.requests(path)] == [0, 1, 2, 3, 4]


def test_repeated_headers_raw_bytes_and_content_type(http_service):
    http_service.script(
        "/raw",
        Reply(
            201,
            b"\x00\x01binary",
            headers={"Dispatched-Log": ["first", "second"], "X-One": "1"},
            content_type="application/x-thing",
        ),
    )
    http_service.script("/pairs", Reply(200, headers=[("Dispatched-Log", "a"), ("dispatched-log", "b")]))
    status, headers, body = call(http_service.url("/raw"))
    assert status == 201
    assert body == b"\x00\x01binary"
    assert [v for n, v in headers if n == "Dispatched-Log"] == ["first", "second"]
    assert ("Content-Type", "application/x-thing") in headers
    status, headers, body = call(http_service.url("/pairs"))
    assert (status, body) == (200, b"")
    assert [(n, v) for n, v in headers if n.lower() == "dispatched-log"] == [("Dispatched-Log", "a"), ("dispatched-log", "b")]


def test_records_method_path_query_headers_and_body(http_service):
    http_service.script("/rec", Reply(200, {"ok": 1}))
    payload = json.dumps({"amount": 42}).encode()
    before = time.monotonic()
    # http.client sends header names as given (urllib would capitalize them)
    conn = http.client.HTTPConnection("127.0.0.1", http_service.port, timeout=10)
    conn.request(
        "POST",
        "/rec?x=1",
        body=payload,
        headers={"Content-Type": "application/json", "Idempotency-Key": "run_abc/charge", "X-Mixed-CASE": "v"},
    )
    conn.getresponse().read()
    conn.close()
    call(http_service.url("/rec"), "PUT", b"not json", {"Content-Type": "text/plain"})
    first, second = http_service.requests("/rec")
    assert (first.method, first.path, first.query, first.target) == ("POST", "/rec", "x=1", "/rec?x=1")
    assert first.body == payload and first.json == {"amount": 42}
    assert first.headers["idempotency-key"] == "run_abc/charge"
    assert first.headers.get("IDEMPOTENCY-KEY") == "run_abc/charge"
    assert "X-Mixed-CASE" in first.headers.names()  # original case kept
    assert first.headers.lower()["x-mixed-case"] == ["v"]
    assert "missing" not in first.headers and first.headers.get("missing") is None
    assert first.at >= before and second.at >= first.at
    assert (second.method, second.body, second.json, second.text) == ("PUT", b"not json", None, "not json")


def test_unscripted_path_answers_404_and_is_recorded(http_service):
    status, _, body = call(http_service.url("/nowhere"))
    assert status == 404
    assert json.loads(body) == {"error": "not scripted", "path": "/nowhere"}
    assert len(http_service.requests("/nowhere")) == 1


def test_callable_script_and_a_script_that_raises(http_service):
    http_service.script("/echo", lambda req: Reply(200, {"you_sent": req.json, "attempt": req.index + 1}))
    status, _, body = call(http_service.url("/echo"), "POST", b'{"a": [1, 2]}', {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body) == {"you_sent": {"a": [1, 2]}, "attempt": 1}

    def broken(req):
        raise RuntimeError("boom")

    http_service.script("/broken", broken)
    status, _, body = call(http_service.url("/broken"))
    assert status == 500 and "boom" in json.loads(body)["traceback"]
    assert len(http_service.errors) == 1


def test_wait_for_wakes_when_requests_arrive(http_service):
    http_service.script("/later", Reply(204))
    callers = [threading.Thread(target=call, args=(http_service.url("/later"), "POST", b"{}")) for _ in range(3)]
    for t in callers:
        t.start()
    reqs = http_service.wait_for("/later", 3, timeout=10)
    assert len(reqs) == 3
    for t in callers:
        t.join(10)


def test_wait_for_times_out_with_what_it_saw(http_service):
    call(http_service.url("/other"))
    start = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"1 request\(s\) to /never.*GET /other"):
        http_service.wait_for("/never", 1, timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 5


def test_delay_is_applied_after_the_request_is_recorded(http_service):
    http_service.script("/slow", Reply(200, {"late": True}, delay=0.6))
    result = {}

    def caller():
        result["reply"] = call(http_service.url("/slow"))
        result["done"] = time.monotonic()

    t = threading.Thread(target=caller)
    t.start()
    (req,) = http_service.wait_for("/slow", 1, timeout=10)
    assert "done" not in result  # recorded while the answer is still being delayed
    t.join(10)
    assert result["reply"][0] == 200
    assert result["done"] - req.at >= 0.55


def test_body_sent_slowly(http_service):
    body = b"x" * 40
    http_service.script("/drip", Reply(200, body, chunk_size=10, chunk_interval=0.1))
    conn = http.client.HTTPConnection("127.0.0.1", http_service.port, timeout=10)
    conn.request("GET", "/drip")
    resp = conn.getresponse()
    headers_at = time.monotonic()
    assert resp.status == 200 and resp.getheader("Content-Length") == "40"
    data = resp.read()
    body_done = time.monotonic()
    conn.close()
    assert data == body
    assert body_done - headers_at >= 0.25  # three pauses of 0.1 s between four chunks


def test_keep_alive_serves_several_requests_on_one_connection(http_service):
    http_service.script("/ka", [Reply(200, {"n": 1}), Reply(200, {"n": 2})])
    conn = http.client.HTTPConnection("127.0.0.1", http_service.port, timeout=10)
    for n in (1, 2):
        conn.request("POST", "/ka", body=b"{}", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert json.loads(resp.read()) == {"n": n}
    conn.close()
    a, b = http_service.requests("/ka")
    assert a.client == b.client  # the same client socket


def test_chunked_request_body_is_read(http_service):
    http_service.script("/chunked", Reply(200))
    with socket.create_connection(("127.0.0.1", http_service.port), timeout=10) as s:
        s.sendall(
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    (req,) = http_service.requests("/chunked")
    assert req.body == b"hello world"


def test_drop_closes_the_connection_without_an_answer(http_service):
    http_service.script("/drop", [Reply(drop=True), Reply(200)])
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
        urllib.request.urlopen(http_service.url("/drop"), timeout=10)
    assert call(http_service.url("/drop"))[0] == 200


def test_reset_forgets_scripts_and_requests(http_service):
    http_service.script("/r", Reply(200))
    call(http_service.url("/r"))
    http_service.reset()
    assert http_service.requests() == []
    assert call(http_service.url("/r"))[0] == 404
