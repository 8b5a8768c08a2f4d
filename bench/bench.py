#!/usr/bin/env python3
"""The dispatched benchmark: a throwaway cluster (fsync and synchronous_commit on) with the
worker preloaded, nginx on 127.0.0.1 as the fast target, and the scenarios of issue 4. Prints a
table and one JSON line per scenario (also appended to bench/results/<file>.jsonl).

    python3 bench/bench.py [--scenarios throughput,latency,slow,load,wal,scale] [--n 500,20000,20000]
                           [--scale-runs 100000] [--latency-runs 200] [--out FILE]

Run it through bench/run.sh, which installs nginx and the release build first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import Cluster  # noqa: E402
from harness.net import free_port  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402

DB = "bench"
TICK = os.sysconf("SC_CLK_TCK")


# -- targets ------------------------------------------------------------------------------------


class Nginx:
    """nginx answering POST /step/<n> with a small JSON body; logs key and attempt per request."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="dispatched-bench-nginx-"))
        self.port = free_port()
        conf = f"""
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  log_format bench '$uri $http_idempotency_key $http_dispatched_attempt';
  access_log {self.dir}/access.log bench buffer=256k flush=1s;
  client_body_temp_path {self.dir}/body;
  proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fastcgi;
  uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location /step/ {{ default_type application/json; return 200 '{{"ok":true,"n":1}}'; }}
  }}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)

    def start(self) -> "Nginx":
        subprocess.run(["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)], check=True)
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log_lines(self) -> list[str]:
        # reopen the log so that buffered lines are written out
        subprocess.run(["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir), "-s", "reopen"], check=True)
        deadline = time.time() + 5
        path = self.dir / "access.log"
        lines: list[str] = []
        while time.time() < deadline:
            lines = path.read_text().splitlines() if path.exists() else []
            time.sleep(0.3)
            again = path.read_text().splitlines() if path.exists() else []
            if len(again) == len(lines):
                return again
        return lines

    def clear_log(self) -> None:
        self.log_lines()
        (self.dir / "access.log").write_text("")
        subprocess.run(["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir), "-s", "reopen"], check=True)

    def stop(self) -> None:
        subprocess.run(["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir), "-s", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)


class SlowTarget:
    """An asyncio HTTP/1.1 server that answers every request after one second (keep-alive)."""

    def __init__(self, delay: float = 1.0):
        self.delay = delay
        self.port = free_port()
        self.count = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                self.count += 1
                await asyncio.sleep(self.delay)
                body = b'{"slow":true}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=4096))
        self.loop.run_forever()
        server.close()

    def start(self) -> "SlowTarget":
        self.thread.start()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


# -- measuring ----------------------------------------------------------------------------------


def pg_pids(cluster: Cluster) -> list[int]:
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [pid] + [int(x) for x in out.split()]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / TICK


def worker_anon_kb(cluster: Cluster) -> int:
    """The workers' private memory (RssAnon): VmRSS would also count the shared buffers they
    touched."""
    total = 0
    for pid in cluster.worker_pids():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                total += int(line.split()[1])
    return total


class Counters:
    def __init__(self, conn, cluster):
        self.conn = conn
        self.cluster = cluster
        self.polls = 0
        self.peak_anon_kb = 0
        self.memory = []  # (perf_counter, worker private kB) at each sample

    def sample_memory(self) -> None:
        kb = worker_anon_kb(self.cluster)
        self.memory.append((time.perf_counter(), kb))
        self.peak_anon_kb = max(self.peak_anon_kb, kb)

    def memory_by_tenth(self, t0: float, t1: float) -> list:
        """The highest sample of the worker's private memory in each tenth of [t0, t1]."""
        out = []
        for k in range(10):
            lo, hi = t0 + (t1 - t0) * k / 10, t0 + (t1 - t0) * (k + 1) / 10
            out.append(max((kb for t, kb in self.memory if lo <= t <= hi), default=None))
        return out

    def snap(self) -> dict:
        row = self.conn.execute(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),"
            "       pg_snapshot_xmax(pg_current_snapshot())::text::bigint,"
            "       pg_current_wal_lsn() - '0/0'::pg_lsn"
        ).fetchone()
        return {"commits": row[0], "xmax": row[1], "wal": int(row[2]), "cpu": cpu_seconds(pg_pids(self.cluster)),
                "t": time.perf_counter(), "polls": self.polls}

    def diff(self, a: dict, b: dict, steps: int) -> dict:
        # pg_stat_database is updated by backends at transaction end (and flushed at most
        # every 0.5 s): wait for the stats to settle before the final snapshot
        polls = b["polls"] - a["polls"]
        commits = b["commits"] - a["commits"] - polls - 1
        return {
            "commits_per_step": round(commits / steps, 4),
            "writing_commits_per_step": round((b["xmax"] - a["xmax"]) / steps, 4),
            "wal_bytes_per_step": round((b["wal"] - a["wal"]) / steps),
            "pg_cpu_ms_per_step": round((b["cpu"] - a["cpu"]) * 1000 / steps, 4),
        }


def wait_drained(conn, counters: Counters, total_runs: int, progress=None, timeout: float = 3600,
                 poll: float = 0.05) -> float:
    """Polls (every `poll` seconds) until no task is left; returns the time it happened."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        # cheap for the server: the poll is counted in the cost figures
        if progress:
            left, done = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM dispatched.tasks), "
                "       (SELECT count(*) FROM dispatched.runs WHERE status IN ('completed','failed','cancelled'))"
            ).fetchone()
        else:
            left, done = conn.execute("SELECT EXISTS (SELECT 1 FROM dispatched.tasks), 0").fetchone()
        counters.polls += 1
        if counters.polls % 10 == 0:
            counters.sample_memory()
        now = time.perf_counter()
        if progress:
            progress(now, done)
        if not left:
            return now
        # counting finished runs reads the whole runs table: less often when progress is wanted
        time.sleep(0.25 if progress else poll)
    raise TimeoutError("runs did not drain")


def define(conn, name: str, urls: list[str]) -> None:
    conn.execute("SELECT dispatched.define_workflow(%s, %s)",
                 (name, Jsonb({"steps": [{"id": f"s{i}", "request": {"url": u}} for i, u in enumerate(urls)]})))


def check_exactly_once(nginx: Nginx, runs: int, steps: int) -> dict:
    lines = nginx.log_lines()
    keys = Counter(line.split()[1] for line in lines if line.startswith("/step/"))
    return {"requests": sum(keys.values()), "distinct_steps": len(keys),
            "exactly_once": len(keys) == runs * steps and all(v == 1 for v in keys.values())}


# -- scenarios ----------------------------------------------------------------------------------


def reset(conn) -> None:
    conn.execute("TRUNCATE dispatched.events, dispatched.steps, dispatched.tasks, dispatched.signals, "
                 "dispatched.invocations, dispatched.runs")
    conn.execute("CHECKPOINT")


def throughput(conn, cluster, nginx, n: int) -> dict:
    reset(conn)
    nginx.clear_log()
    counters = Counters(conn, cluster)
    a = counters.snap()
    t0 = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    conn.execute("SELECT dispatched.start_run('three', jsonb_build_object('i', g)) FROM generate_series(1, %s) g", (n,))
    wait_drained(conn, counters, n, poll=0.2)
    time.sleep(0.6)
    b = counters.snap()
    steps = 3 * n
    failed = conn.execute("SELECT count(*) FROM dispatched.runs WHERE status <> 'completed'").fetchone()[0]
    # from the first enqueue to the last completion, both on the server's clock (so the poll
    # above can be slow and cheap)
    seconds = (conn.execute("SELECT max(finished_at) FROM dispatched.runs").fetchone()[0] - t0).total_seconds()
    return {"scenario": f"throughput_{n}", "runs": n, "steps": steps, "not_completed": failed,
            "seconds": round(seconds, 3), "steps_per_s": round(steps / seconds),
            **counters.diff(a, b, steps), "worker_peak_anon_kb": counters.peak_anon_kb,
            **check_exactly_once(nginx, n, 3)}


def latency(conn, cluster, nginx, runs: int) -> dict:
    reset(conn)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run_id = conn.execute("SELECT dispatched.start_run('three')").fetchone()[0]
        out = conn.execute("SELECT dispatched.attach(%s, '10s')", (run_id,)).fetchone()[0]
        times.append((time.perf_counter() - t0) * 1000)
        assert out.get("message") != "not ready", out
    times.sort()
    pick = lambda q: round(times[min(len(times) - 1, int(q * len(times)))], 2)  # noqa: E731
    return {"scenario": "latency_3_steps", "runs": runs, "p50_ms": pick(0.50), "p90_ms": pick(0.90),
            "p99_ms": pick(0.99), "max_ms": round(times[-1], 2)}


def scale(conn, cluster, nginx, n: int) -> dict:
    reset(conn)
    nginx.clear_log()
    counters = Counters(conn, cluster)
    # enqueue the whole backlog in one transaction, so the drain starts from a full queue
    t_enqueue = time.perf_counter()
    with conn.transaction():
        conn.execute("SELECT dispatched.start_run('three', jsonb_build_object('i', g)) FROM generate_series(1, %s) g", (n,))
    a = counters.snap()
    enqueue_s = a["t"] - t_enqueue
    t0 = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    counters.sample_memory()
    drained = wait_drained(conn, counters, n, poll=0.25)
    counters.sample_memory()
    # when each tenth of the runs had finished, on the server's clock
    marks = conn.execute(
        "SELECT percentile_disc(ARRAY[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]) WITHIN GROUP (ORDER BY finished_at) "
        "FROM dispatched.runs").fetchone()[0]
    tenth = n // 10
    prev = t0
    per_tenth = []
    for t in marks:
        per_tenth.append(round(3 * tenth / max((t - prev).total_seconds(), 1e-6)))
        prev = t
    not_completed = conn.execute("SELECT count(*) FROM dispatched.runs WHERE status <> 'completed'").fetchone()[0]
    once = check_exactly_once(nginx, n, 3)
    sizes_before = table_sizes(conn)
    t_purge = time.perf_counter()
    purged = conn.execute("SELECT dispatched.purge('0 seconds')").fetchone()[0]
    purge_s = time.perf_counter() - t_purge
    conn.execute("VACUUM dispatched.runs, dispatched.steps, dispatched.events, dispatched.tasks")
    sizes_after = table_sizes(conn)
    return {"scenario": f"scale_{n}", "runs": n, "not_completed": not_completed, **once,
            "enqueue_s": round(enqueue_s, 2),
            "purged_runs": purged, "purge_s": round(purge_s, 2),
            "sizes_mb_before_purge": sizes_before, "sizes_mb_after_purge_and_vacuum": sizes_after,
            "drain_s": round((marks[-1] - t0).total_seconds(), 2), "steps_per_s_by_tenth": per_tenth,
            "last_vs_first": round(per_tenth[-1] / per_tenth[0], 3) if per_tenth[0] else None,
            "worker_peak_anon_kb": counters.peak_anon_kb, "worker_anon_kb_at_end": worker_anon_kb(cluster),
            "worker_anon_kb_by_tenth_of_drain": counters.memory_by_tenth(a["t"], drained)}


def wal_profile(conn, cluster, nginx, n: int) -> dict:
    """Where the WAL of N runs x 3 steps goes (pg_walinspect): bytes per step by relation
    (table, index, TOAST) and by record kind, with full-page images counted apart."""
    reset(conn)
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    counters = Counters(conn, cluster)
    start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    conn.execute("SELECT dispatched.start_run('three', jsonb_build_object('i', g)) FROM generate_series(1, %s) g", (n,))
    wait_drained(conn, counters, n, poll=0.2)
    end = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    steps = 3 * n
    # a record's first block reference names the relation it writes (relfilenode -> name)
    rows = conn.execute(
        """
        WITH r AS (
            SELECT resource_manager, record_type, record_length, fpi_length,
                   substring(block_ref from 'rel \\d+/\\d+/(\\d+)')::oid AS node
              FROM pg_get_wal_records_info(%s, %s))
        SELECT coalesce(c.relname, CASE WHEN r.node IS NULL THEN '(no relation)' ELSE '(other)' END),
               r.resource_manager || '/' || split_part(r.record_type, ' ', 1),
               count(*), sum(r.record_length), sum(r.fpi_length)
          FROM r LEFT JOIN pg_class c ON c.relfilenode = r.node AND r.node <> 0
         GROUP BY 1, 2 ORDER BY 4 DESC
        """, (start, end)).fetchall()
    by_relation: Counter = Counter()
    by_kind: Counter = Counter()
    records: Counter = Counter()
    fpi = 0
    for rel, kind, count, length, fpi_len in rows:
        rel = rel.replace("pg_toast_", "toast_") if rel else rel
        by_relation[rel] += int(length)
        by_kind[kind] += int(length)
        records[rel] += int(count)
        fpi += int(fpi_len)
    total = sum(by_relation.values())
    per = lambda c: {k: round(v / steps) for k, v in c.most_common(12)}  # noqa: E731
    return {"scenario": f"wal_profile_{n}", "runs": n, "steps": steps,
            "wal_bytes_per_step": round(total / steps), "fpi_bytes_per_step": round(fpi / steps),
            "records_per_step": round(sum(records.values()) / steps, 2),
            "bytes_per_step_by_relation": per(by_relation),
            "records_per_step_by_relation": {k: round(v / steps, 2) for k, v in records.most_common(12)},
            "bytes_per_step_by_record_kind": per(by_kind)}


def table_sizes(conn) -> dict:
    """Rows and megabytes (table with its indexes and TOAST) of the tables runs fill."""
    out = {}
    for name in ("runs", "steps", "events", "tasks", "invocations"):
        rows, size = conn.execute(
            f"SELECT (SELECT count(*) FROM dispatched.{name}), pg_total_relation_size('dispatched.{name}')").fetchone()
        out[name] = {"rows": rows, "mb": round(size / 1048576, 1)}
    return out


def slow_services(conn, cluster, nginx, slow: SlowTarget, n: int) -> dict:
    """10% of the steps hit a target that answers after 1 s: throughput of the other 90%,
    against the same fast runs alone (their unimpeded rate)."""
    fast_runs = n - n // 10

    def fast_rate(with_slow: bool) -> float:
        reset(conn)
        t0 = time.perf_counter()
        if with_slow:
            conn.execute("SELECT dispatched.start_run(CASE WHEN g %% 10 = 0 THEN 'slow3' ELSE 'three' END) "
                         "FROM generate_series(1, %s) g", (n,))
        else:
            conn.execute("SELECT dispatched.start_run('three') FROM generate_series(1, %s) g", (fast_runs,))
        while conn.execute("SELECT count(*) FROM dispatched.runs WHERE workflow = 'three' AND status <> 'completed'").fetchone()[0]:
            time.sleep(0.05)
        rate = 3 * fast_runs / (time.perf_counter() - t0)
        wait_drained(conn, Counters(conn, cluster), n)
        return rate

    alone = fast_rate(False)
    before = slow.count
    mixed = fast_rate(True)
    return {"scenario": f"slow_services_{n}", "runs": n, "fast_steps_per_s_alone": round(alone),
            "fast_steps_per_s_with_slow": round(mixed), "kept": round(mixed / alone, 3),
            "slow_requests": slow.count - before}


def load(conn, cluster, nginx, clients: int, seconds: int, keys: int) -> dict:
    """pgbench: `clients` connections call start_run for `seconds` with keys drawn from
    1..`keys` (so many keys repeat); then every run must complete with each step sent once."""
    reset(conn)
    nginx.clear_log()
    script = Path(tempfile.mkdtemp(prefix="dispatched-bench-")) / "start.sql"
    script.write_text("\\set k random(1, %d)\nSELECT dispatched.start_run('three', '{}', 'key-' || :k);\n" % keys)
    os.chmod(script.parent, 0o755)
    bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [f"{bindir}/pgbench", "-n", "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres",
         "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", str(script), DB],
        capture_output=True, text=True)
    calls = failed = 0
    for line in proc.stdout.splitlines():
        if line.startswith("number of transactions actually processed"):
            calls = int(line.split(":")[1].split("/")[0])
        if line.startswith("number of failed transactions"):
            failed = int(line.split(":")[1].split()[0])
    counters = Counters(conn, cluster)
    wait_drained(conn, counters, 0)
    runs, distinct, done = conn.execute(
        "SELECT count(*), count(DISTINCT idempotency_key), count(*) FILTER (WHERE status = 'completed') "
        "FROM dispatched.runs").fetchone()
    once = check_exactly_once(nginx, runs, 3)
    # runs that did not complete, by status and error (none expected)
    others = [f"{st}: {msg}" for st, msg in conn.execute(
        "SELECT status, coalesce(error ->> 'message', '') FROM dispatched.runs WHERE status <> 'completed' "
        "GROUP BY 1, 2 ORDER BY count(*) DESC LIMIT 5").fetchall()]
    once["not_completed_why"] = others
    return {"scenario": f"load_{clients}_clients_{seconds}s", "start_run_calls": calls,
            "calls_per_s": round(calls / seconds), "failed_calls": failed, "pgbench_exit": proc.returncode,
            "runs": runs, "distinct_keys": distinct, "completed": done,
            "drained_s": round(time.perf_counter() - t0 - seconds, 1), **once}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", default="throughput,latency,slow,load,wal,scale")
    ap.add_argument("--n", default="500,20000,20000")
    ap.add_argument("--scale-runs", type=int, default=100_000)
    ap.add_argument("--wal-runs", type=int, default=2000)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--slow-runs", type=int, default=5000)
    ap.add_argument("--load-clients", type=int, default=64)
    ap.add_argument("--load-seconds", type=int, default=60)
    ap.add_argument("--load-keys", type=int, default=20000)
    ap.add_argument("--conf", action="append", default=[], help="extra postgresql.conf line")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S.jsonl")))
    args = ap.parse_args()
    wanted = set(args.scenarios.split(","))

    nginx = Nginx().start()
    slow = SlowTarget().start()
    cluster = Cluster(extra_conf=[
        f"dispatched.database = '{DB}'",
        "dispatched.max_concurrent_requests = 512",
        "shared_buffers = '1GB'",
        "max_wal_size = '4GB'",
        "fsync = on",
        "synchronous_commit = on",
        *args.conf,
    ]).start()
    results = []
    workers = threads = None
    try:
        cluster.create_database(DB, extension=True)
        cluster.wait_for_workers(1)
        with cluster.connect(DB) as conn:
            workers = int(conn.execute("SHOW dispatched.workers").fetchone()[0])
            threads = int(conn.execute("SHOW dispatched.max_concurrent_requests").fetchone()[0])
            define(conn, "three", [nginx.url(f"/step/{i}") for i in range(3)])
            define(conn, "slow3", [slow.url(f"/slow/{i}") for i in range(3)])
            if "throughput" in wanted:
                seen = set()
                for n in [int(x) for x in args.n.split(",") if x]:
                    results.append(throughput(conn, cluster, nginx, n))
                    if n in seen:  # the same N again, on tables that held a batch before
                        results[-1]["scenario"] += "_again"
                    seen.add(n)
                    print(json.dumps(results[-1]), flush=True)
            if "latency" in wanted:
                results.append(latency(conn, cluster, nginx, args.latency_runs))
                print(json.dumps(results[-1]), flush=True)
            if "slow" in wanted:
                results.append(slow_services(conn, cluster, nginx, slow, args.slow_runs))
                print(json.dumps(results[-1]), flush=True)
            if "load" in wanted:
                results.append(load(conn, cluster, nginx, args.load_clients, args.load_seconds, args.load_keys))
                print(json.dumps(results[-1]), flush=True)
            if "wal" in wanted:
                results.append(wal_profile(conn, cluster, nginx, args.wal_runs))
                print(json.dumps(results[-1]), flush=True)
            if "scale" in wanted:
                results.append(scale(conn, cluster, nginx, args.scale_runs))
                print(json.dumps(results[-1]), flush=True)
    finally:
        cluster.stop()
        nginx.stop()
    for r in results:
        r["workers"] = workers
        r["max_concurrent_requests"] = threads
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print()
    print(f"{'scenario':28} figures")
    for r in results:
        figs = ", ".join(f"{k}={v}" for k, v in r.items() if k != "scenario")
        print(f"{r['scenario']:28} {figs}")
    print(f"\nresults appended to {args.out}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
