"""Retention: the worker purges expired Layer 1 entries (idempotency_cache) and Layer 2 rows
(invocations) on its own, in small batches. The worker reads postgresql.conf, so this module
has a cluster of its own with retentions of one second; a superuser session that sets a long
retention writes rows that must stay."""

from __future__ import annotations

import time

import pytest
from psycopg.types.json import Jsonb

from harness import Cluster


@pytest.fixture(scope="module")
def short(dbname):
    c = Cluster(extra_conf=[
        f"dispatched.database = '{dbname}'",
        "dispatched.idempotency_retention = '1s'",
        "dispatched.idempotency_lock_timeout = '1s'",
        "dispatched.invocation_retention = '1s'",
    ]).start()
    try:
        c.create_database(dbname, extension=True)
        yield c
    finally:
        c.stop()


def counts(conn):
    return conn.execute("""
        SELECT (SELECT count(*) FROM dispatched.idempotency_cache WHERE endpoint LIKE 'purge-%%'),
               (SELECT count(*) FROM dispatched.invocations WHERE provider_key LIKE 'purge:%%')""").fetchone()


def test_expired_layer1_and_layer2_rows_are_purged_in_batches(short, dbname):
    short.wait_for_workers(1)
    n = 2500  # more than two batches of 1000 in each table
    with short.connect(dbname) as conn:
        log_at = len(short.server_log())
        # One transaction: the rows are counted before the purge can see them.
        with conn.transaction():
            # rows that expire a second after they are written (the cluster's settings) ...
            conn.execute("""
                SELECT dispatched.idempotency_begin('purge-final', 'k' || g),
                       dispatched.idempotency_complete('purge-final', 'k' || g, 201, jsonb_build_object('g', g)),
                       dispatched.record_invocation('run_purge' || g, 'n', 0, 'purge:short', '{"ok": true}')
                  FROM generate_series(1, %s) g""", (n,))
            conn.execute("SELECT dispatched.idempotency_begin('purge-claim', 'c' || g) FROM generate_series(1, 10) g")
            # ... and rows that stay: this session keeps them for an hour
            conn.execute("SET LOCAL dispatched.idempotency_retention = '1h'")
            conn.execute("SET LOCAL dispatched.invocation_retention = '1h'")
            conn.execute("""
                SELECT dispatched.idempotency_begin('purge-keep', 'k' || g),
                       dispatched.idempotency_complete('purge-keep', 'k' || g, 200, '{}'),
                       dispatched.record_invocation('run_keep' || g, 'n', 0, 'purge:keep', '{"ok": true}')
                  FROM generate_series(1, 5) g""")
            before = counts(conn)
        assert before == (n + 15, n + 5)

        deadline = time.monotonic() + 30
        while counts(conn) != (5, 5):
            assert time.monotonic() < deadline, (counts(conn), short.server_log()[log_at:][-3000:])
            time.sleep(0.2)
        kept = conn.execute(
            "SELECT array_agg(endpoint ORDER BY key) FROM dispatched.idempotency_cache WHERE endpoint LIKE 'purge-%%'"
        ).fetchone()[0]
        assert kept == ["purge-keep"] * 5
        replay = conn.execute("SELECT dispatched.idempotency_begin('purge-keep', 'k1')").fetchone()[0]
        assert replay["state"] == "replay"
        assert conn.execute(
            "SELECT count(*) FROM dispatched.invocations WHERE provider_key = 'purge:keep'").fetchone()[0] == 5
        # an expired key is free again (reads never waited for the purge)
        assert conn.execute("SELECT dispatched.idempotency_begin('purge-final', 'k1')").fetchone()[0] == {"state": "new"}

    log = short.server_log()[log_at:]
    purged = [line for line in log.splitlines() if "purged" in line]
    assert any("expired idempotency entries" in line for line in purged), log[-3000:]
    assert any("expired invocation log rows" in line for line in purged), log[-3000:]
    total = sum(int(line.split("purged ")[1].split()[0]) for line in purged if "idempotency" in line)
    assert total >= n + 10


def test_the_purge_leaves_runs_alone(short, dbname):
    with short.connect(dbname) as conn:
        conn.execute("SELECT dispatched.define_workflow('w', %s)", (Jsonb({"steps": [{"id": "w", "wait": {"signal": "go"}}]}),))
        run_id = conn.execute("SELECT dispatched.start_run('w', '{}', 'purge-run-key')").fetchone()[0]
        log_at = len(short.server_log())
        conn.execute("SELECT dispatched.record_invocation('run_x', 'n', 0, 'purge:again', '{}')")
        deadline = time.monotonic() + 30
        while conn.execute("SELECT count(*) FROM dispatched.invocations WHERE provider_key = 'purge:again'").fetchone()[0]:
            assert time.monotonic() < deadline, short.server_log()[log_at:][-3000:]
            time.sleep(0.2)
        # the run and its start key are not Layer 1 entries: they stay
        assert conn.execute("SELECT dispatched.start_run('w', '{}', 'purge-run-key')").fetchone()[0] == run_id
        assert conn.execute("SELECT dispatched.run(%s)->>'status'", (run_id,)).fetchone()[0] in ("pending", "waiting")
