"""The HTTP ingress for black-box tests: a cluster of its own with `dispatched.http_port` set
and small bounds (see `start_ingress`), and a small client (http.client) that returns
(status, lower-case headers, JSON body)."""

from __future__ import annotations

import http.client
import json
import socket
import time

from .cluster import Cluster
from .net import free_port

MAX_CONNECTIONS = 8
MAX_BODY = 65536
READ_TIMEOUT = "2s"


class Ingress:
    def __init__(self, cluster: Cluster, dbname: str, port: int):
        self.cluster = cluster
        self.dbname = dbname
        self.host = "127.0.0.1"
        self.port = port

    def sql(self, user: str | None = None):
        return self.cluster.connect(self.dbname, user=user)

    def one(self, query, params=(), user: str | None = None):
        with self.sql(user) as conn:
            return conn.execute(query, params).fetchone()[0]

    def token(self, tenant: str | None = None, user: str | None = None) -> str:
        return self.one("SELECT dispatched.create_session_token(%s)", (tenant,), user=user)

    def request(self, method: str, path: str, body=None, token: str | None = None,
                headers: dict | None = None, timeout: float = 30.0):
        """(status, headers as a lower-case dict, body as JSON or text)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        h = dict(headers or {})
        if token is not None:
            h["Dispatched-Session"] = token
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            h.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            raw = resp.read()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        text = raw.decode("utf-8", errors="replace")
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = text
        return resp.status, hdrs, parsed

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the ingress is not listening on {self.port} after {timeout}s")
                time.sleep(0.1)


def start_ingress(dbname: str) -> Ingress:
    """Starts a cluster with the ingress on a free port; its `cluster.stop()` ends it."""
    port = free_port()
    c = Cluster(extra_conf=[
        f"dispatched.database = '{dbname}'",
        f"dispatched.http_port = {port}",
        f"dispatched.http_max_connections = {MAX_CONNECTIONS}",
        f"dispatched.http_max_body_bytes = {MAX_BODY}",
        f"dispatched.http_read_timeout = '{READ_TIMEOUT}'",
    ]).start()
    try:
        c.create_database(dbname, extension=True)
        ing = Ingress(c, dbname, port)
        ing.wait_listening()
        return ing
    except BaseException:
        c.stop()
        raise
