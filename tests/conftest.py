"""Fixtures of the black-box suites.

Session-wide (started once, stopped and removed at the end):
  cluster       a throwaway PostgreSQL 15 cluster (dispatched preloaded) on a free port, in a
                fresh temporary directory; its workers serve the database `dbname`
  dbname        the test database, with `CREATE EXTENSION dispatched` done
  http_server   the programmable HTTP service on 127.0.0.1 (harness/http_service.py)

Per test:
  connect       connect(user=None, db=None, autocommit=True) -> a new connection to the test
                database (or `db`) as the superuser (or `user`), closed at the end of the test
  make_role     make_role(superuser=False) -> the name of a new login role
  http_service  the session's HTTP service with its scripts and records reset

Per module (started once for the module that uses it):
  ingress       a cluster of its own with the HTTP ingress on a free port and small bounds
                (harness/ingress.py): .request(method, path, body, token, headers),
                .token(tenant, user), .sql(user), .one(query, params, user)
  define_workflow  define_workflow(definition, name=None) -> the workflow's (fresh) name

Environment: DISPATCHED_TEST_CONF may add postgresql.conf lines (separated by ';') to the
session cluster, e.g. DISPATCHED_TEST_CONF="dispatched.workers = 2".
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Cluster, HttpService  # noqa: E402

TEST_DB = "dispatched_test"


@pytest.fixture(scope="session")
def dbname() -> str:
    return TEST_DB


@pytest.fixture(scope="session")
def cluster(dbname):
    extra = [f"dispatched.database = '{dbname}'"]
    extra += [line.strip() for line in os.environ.get("DISPATCHED_TEST_CONF", "").split(";") if line.strip()]
    c = Cluster(extra_conf=extra).start()
    try:
        c.create_database(dbname, extension=True)
        yield c
    finally:
        c.stop()


@pytest.fixture
def connect(cluster, dbname):
    opened = []

    def _connect(user: str | None = None, db: str | None = None, autocommit: bool = True, **kwargs):
        conn = cluster.connect(db or dbname, user=user, autocommit=autocommit, **kwargs)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        try:
            conn.close()
        except Exception:
            pass


@pytest.fixture
def make_role(cluster):
    def _make_role(superuser: bool = False, name: str | None = None) -> str:
        return cluster.create_role(name=name, superuser=superuser)

    return _make_role


@pytest.fixture
def define_workflow(connect):
    conn = None

    def _define(definition: dict, name: str | None = None) -> str:
        nonlocal conn
        if conn is None:
            conn = connect()
        name = name or f"wf-{uuid.uuid4().hex[:10]}"
        conn.execute("SELECT dispatched.define_workflow(%s, %s)", (name, Jsonb(definition)))
        return name

    return _define


@pytest.fixture(scope="module")
def ingress(dbname):
    """A cluster of the module's own with the HTTP ingress (harness/ingress.py)."""
    from harness.ingress import start_ingress

    ing = start_ingress(dbname)
    try:
        yield ing
    finally:
        ing.cluster.stop()


@pytest.fixture(scope="session")
def http_server():
    svc = HttpService().start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def http_service(http_server):
    http_server.reset()
    yield http_server
    http_server.reset()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report ends with the server log written while it ran."""
    outcome = yield
    report = outcome.get_result()
    c = getattr(item, "_dispatched_cluster", None)
    if report.failed and c is not None:
        log = c.server_log()[item._dispatched_log_offset :]
        if log.strip():
            report.sections.append(("server.log while the test ran", log[-20000:]))


@pytest.fixture(autouse=True)
def _note_server_log_offset(request):
    """Remembers where the server log stood when a test that uses the cluster began."""
    if "cluster" in request.fixturenames:
        c = request.getfixturevalue("cluster")
        request.node._dispatched_cluster = c
        request.node._dispatched_log_offset = len(c.server_log())
    yield
