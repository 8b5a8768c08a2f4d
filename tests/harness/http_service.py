"""A programmable HTTP service for black-box tests: the service a workflow's steps call.

It runs in the test process (a ThreadingHTTPServer on 127.0.0.1, on a free port). Each path
has a script: a list of replies given in order, the last one repeating. Every request is
recorded, and a test can wait (with a timeout, on a condition variable) until N requests for
a path have arrived.

    svc = HttpService().start()
    svc.script("/charge", [Reply(503, headers={"Retry-After": "1"}), Reply(200, {"id": "ch_1"})])
    url = svc.url("/charge")
    ...                                         # something calls url
    first, second = svc.wait_for("/charge", 2, timeout=10)
    assert second.headers["dispatched-attempt"] == "2"
    svc.stop()

A script entry is a Reply or a callable taking the Request and returning a Reply. A path with
no script answers 404 with {"error": "not scripted", "path": ...} (see `default`).
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Union
from urllib.parse import urlsplit

HeaderInput = Union[Mapping[str, Union[str, Iterable[str]]], Iterable[tuple[str, str]], None]


@dataclass
class Reply:
    """One scripted answer.

    status:         HTTP status.
    body:           dict/list/int/float/bool -> JSON; str -> text (UTF-8); bytes -> sent as is;
                    None -> no body. (For a JSON `null` body, use body=b"null" with
                    content_type="application/json".)
    headers:        a dict (a value may be a list: the header repeats) or a list of
                    (name, value) pairs, sent in that order with the case given.
    content_type:   Content-Type; by default application/json for JSON bodies,
                    text/plain; charset=utf-8 for str, application/octet-stream for bytes.
                    A Content-Type in `headers` wins.
    delay:          seconds to wait before answering (the request is recorded on arrival).
    chunk_size:     send the body slowly: this many bytes at a time ...
    chunk_interval: ... with this many seconds between chunks (headers go out at once).
    drop:           close the connection without answering (after `delay`).
    cut_after:      send the headers (with the full Content-Length) and only this many bytes
                    of the body, then reset the connection: an answer cut off mid-body.
    """

    status: int = 200
    body: Any = None
    headers: HeaderInput = None
    content_type: str | None = None
    delay: float = 0.0
    chunk_size: int | None = None
    chunk_interval: float = 0.0
    drop: bool = False
    cut_after: int | None = None

    def header_pairs(self) -> list[tuple[str, str]]:
        return _pairs(self.headers)

    def body_bytes(self) -> tuple[bytes, str | None]:
        """The body as bytes and its default content type."""
        b = self.body
        if b is None:
            return b"", None
        if isinstance(b, (bytes, bytearray, memoryview)):
            return bytes(b), "application/octet-stream"
        if isinstance(b, str):
            return b.encode("utf-8"), "text/plain; charset=utf-8"
        return json.dumps(b).encode("utf-8"), "application/json"


Script = Union[Reply, Callable[["Request"], Reply]]


def _pairs(headers: HeaderInput) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        out = []
        for name, value in headers.items():
            if isinstance(value, (list, tuple)):
                out.extend((name, str(v)) for v in value)
            else:
                out.append((name, str(value)))
        return out
    return [(str(n), str(v)) for n, v in headers]


class Headers:
    """Request headers: the original names and order, and case-insensitive lookup."""

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        self._pairs = list(pairs)

    def items(self) -> list[tuple[str, str]]:
        """Every header as (name as sent, value), in order; repeats included."""
        return list(self._pairs)

    def names(self) -> list[str]:
        """Header names as sent (original case), in order."""
        return [n for n, _ in self._pairs]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header, any case."""
        lname = name.lower()
        for n, v in self._pairs:
            if n.lower() == lname:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, any case, in order."""
        lname = name.lower()
        return [v for n, v in self._pairs if n.lower() == lname]

    def lower(self) -> dict[str, list[str]]:
        """{lower-case name: [values]}."""
        out: dict[str, list[str]] = {}
        for n, v in self._pairs:
            out.setdefault(n.lower(), []).append(v)
        return out

    def __getitem__(self, name: str) -> str:
        v = self.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._pairs)

    def __repr__(self) -> str:
        return f"Headers({self._pairs!r})"


@dataclass
class Request:
    """A recorded request."""

    method: str
    target: str  # the request target as sent: path and query
    path: str  # without the query
    query: str  # without the "?"
    headers: Headers
    body: bytes
    json: Any  # the body parsed as JSON, or None when it is empty or not JSON
    at: float  # time.monotonic() at arrival (headers and body read)
    wall: float  # time.time() at arrival
    index: int  # 0 for the first request to this path, 1 for the second, ...
    client: tuple[str, int] = field(default=("", 0))

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class WaitTimeout(AssertionError):
    """wait()/wait_for() gave up: what was awaited did not arrive in time."""


class HttpService:
    """The programmable service. start() it, script() paths, stop() it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
        self.host = host
        self._want_port = port
        self._tls = tls  # a server-side context: the service speaks HTTPS
        self._cond = threading.Condition()
        self._scripts: dict[str, list[Script]] = {}
        self._served: dict[str, int] = {}
        self._requests: list[Request] = []
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self.errors: list[str] = []  # exceptions raised while answering (tracebacks)
        self.tls_failures: list[str] = []  # TLS handshakes that failed (HTTPS services)
        self.default: Script = lambda req: Reply(404, {"error": "not scripted", "path": req.path})
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "HttpService":
        service = self

        class Handler(_Handler):
            svc = service

        self._server = ThreadingHTTPServer((self.host, self._want_port), Handler)
        if self._tls is not None:
            # the handshake happens per connection, in the handler's thread (setup)
            self._server.socket = self._tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True, name="http-service"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> "HttpService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        if not path.startswith("/"):
            path = "/" + path
        return self.base_url + path

    # -- scripting -------------------------------------------------------------------------

    def script(self, path: str, replies: Script | Iterable[Script]) -> None:
        """Sets the script of a path (replacing any earlier one and restarting it)."""
        if isinstance(replies, Reply) or callable(replies):
            replies = [replies]
        replies = list(replies)
        if not replies:
            raise ValueError("a script needs at least one reply")
        with self._cond:
            self._scripts[path] = replies
            self._served[path] = 0

    def reset(self) -> None:
        """Forgets every script and every recorded request."""
        with self._cond:
            self._scripts.clear()
            self._served.clear()
            self._requests.clear()
            self.errors.clear()

    def _next(self, path: str) -> Script:
        with self._cond:
            script = self._scripts.get(path)
            if not script:
                return self.default
            i = self._served.get(path, 0)
            self._served[path] = i + 1
            return script[min(i, len(script) - 1)]

    # -- what arrived ----------------------------------------------------------------------

    def requests(self, path: str | None = None) -> list[Request]:
        """The recorded requests (for one path, or all), in arrival order."""
        with self._cond:
            return [r for r in self._requests if path is None or r.path == path]

    def wait(self, predicate: Callable[[list[Request]], Any], timeout: float = 10.0, what: str = "condition"):
        """Waits until predicate(all requests so far) is truthy and returns its value.
        Raises WaitTimeout after `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: predicate(list(self._requests)) or self._stopping.is_set(), timeout=timeout)
            value = predicate(list(self._requests))
            if not value:
                seen = [f"{r.method} {r.target}" for r in self._requests]
                state = "the service stopped" if self._stopping.is_set() else f"after {timeout}s"
                raise WaitTimeout(f"waiting for {what}: gave up, {state}; requests so far: {seen}")
            return value

    def wait_for(self, path: str, n: int = 1, timeout: float = 10.0) -> list[Request]:
        """Waits until at least n requests for path have arrived; returns them all."""

        def enough(reqs: list[Request]):
            mine = [r for r in reqs if r.path == path]
            return mine if len(mine) >= n else None

        return self.wait(enough, timeout, what=f"{n} request(s) to {path}")

    # -- called by the handler -------------------------------------------------------------

    def _record(self, req: Request) -> None:
        with self._cond:
            req.index = sum(1 for r in self._requests if r.path == req.path)
            self._requests.append(req)
            self._cond.notify_all()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)


class _Handler(BaseHTTPRequestHandler):
    svc: HttpService  # set by HttpService.start
    protocol_version = "HTTP/1.1"  # keep-alive, as real services do
    timeout = 60  # an idle keep-alive connection is closed after this many seconds
    server_version = "dispatched-test-service"
    sys_version = ""

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as e:
                self.svc.tls_failures.append(repr(e))
                raise
        super().setup()
        self.svc._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.svc._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after the chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        svc = self.svc
        body = self._read_body()
        parts = urlsplit(self.path)
        parsed = None
        if body:
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                parsed = None
        req = Request(
            method=self.command,
            target=self.path,
            path=parts.path,
            query=parts.query,
            headers=Headers(self.headers.items()),
            body=body,
            json=parsed,
            at=time.monotonic(),
            wall=time.time(),
            index=0,
            client=self.client_address[:2],
        )
        svc._record(req)

        entry = svc._next(req.path)
        try:
            reply = entry(req) if callable(entry) and not isinstance(entry, Reply) else entry
            if not isinstance(reply, Reply):
                raise TypeError(f"a script callable must return a Reply, not {type(reply).__name__}")
        except Exception:
            tb = traceback.format_exc()
            svc.errors.append(tb)
            reply = Reply(500, {"error": "script raised", "traceback": tb})

        if reply.delay > 0 and svc._stopping.wait(reply.delay):
            reply = Reply(drop=True)
        if reply.drop:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return

        payload, default_type = reply.body_bytes()
        pairs = reply.header_pairs()
        names = {n.lower() for n, _ in pairs}
        try:
            self.send_response(reply.status)
            for name, value in pairs:
                self.send_header(name, value)
            ctype = reply.content_type or default_type
            if ctype and "content-type" not in names:
                self.send_header("Content-Type", ctype)
            if "content-length" not in names:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD" and payload:
                if reply.cut_after is not None:
                    self.wfile.write(payload[: reply.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    # SO_LINGER 0: close() sends a reset, not an orderly end of stream
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                if reply.chunk_size:
                    self.wfile.flush()
                    for i in range(0, len(payload), reply.chunk_size):
                        if i and svc._stopping.wait(reply.chunk_interval):
                            self.close_connection = True
                            return
                        self.wfile.write(payload[i : i + reply.chunk_size])
                        self.wfile.flush()
                else:
                    self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; that is its business

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle
