"""A throwaway PostgreSQL 15 cluster with dispatched preloaded, for black-box tests.

It is started with scripts/cluster.sh (as user postgres) in a fresh temporary directory on a
free port, and removed again by stop(). Connections go over TCP to 127.0.0.1 with trust
authentication, so any role can connect without a password.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import time
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from .net import free_port

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "scripts" / "cluster.sh"


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() != 0:
        return  # running as postgres (or another user that owns the directory) already
    pw = pwd.getpwnam("postgres")
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def pkglibdir() -> Path:
    out = subprocess.run(["pg_config", "--pkglibdir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


class Cluster:
    """A PostgreSQL cluster in its own temporary directory.

    extra_conf: more postgresql.conf lines (e.g. "dispatched.workers = 2"), appended after
    the ones scripts/cluster.sh writes.
    private_lib: load a private copy of the installed dispatched.so (taken at start), found
    first through dynamic_library_path. A `cargo pgrx install` elsewhere on the machine
    overwrites the installed library in place, which kills every server that has it mapped
    (SIGBUS); the copy keeps this cluster alive through that.
    """

    def __init__(
        self,
        extra_conf: list[str] | None = None,
        prefix: str = "dispatched-test-",
        private_lib: bool = True,
    ):
        self.extra_conf = list(extra_conf or [])
        self.private_lib = private_lib
        self.prefix = prefix
        self.root: Path | None = None
        self.datadir: Path | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"
        self.superuser = "postgres"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Cluster":
        self.root = Path(tempfile.mkdtemp(prefix=self.prefix))
        # The data directory's parent must be reachable by postgres (mkdtemp makes it 0700).
        _chown_to_postgres(self.root)
        self.datadir = self.root / "data"
        self.port = free_port()
        conf = list(self.extra_conf)
        if self.private_lib:
            libdir = self.root / "lib"
            libdir.mkdir()
            os.chmod(libdir, 0o755)
            shutil.copy2(pkglibdir() / "dispatched.so", libdir / "dispatched.so")
            conf.insert(0, f"dynamic_library_path = '{libdir}:$libdir'")
        cmd = ["bash", str(CLUSTER_SH), "start", str(self.datadir), str(self.port), *conf]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log = self.server_log()
            self._force_stop()
            self._remove()
            raise RuntimeError(
                f"cluster.sh start failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
                f"--- server.log ---\n{log}"
            )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the server (fast shutdown) and removes the directory. A server that does not
        stop within `timeout` seconds (e.g. a background worker that ignores SIGTERM) is
        stopped with an immediate shutdown, then killed, and RuntimeError says so: nothing
        is left running either way."""
        problem = None
        if self.datadir is not None:
            try:
                subprocess.run(
                    ["bash", str(CLUSTER_SH), "stop", str(self.datadir)],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                pass
            if self._postmaster_pid() is not None:
                log = self.server_log()
                problem = (
                    f"the cluster in {self.datadir} did not stop within {timeout}s of a fast "
                    f"shutdown; forced it down\n--- end of server.log ---\n{log[-5000:]}"
                )
                self._force_stop()
        self._remove()
        if problem:
            raise RuntimeError(problem)

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError, TypeError):
            return None

    def _force_stop(self) -> None:
        """Immediate shutdown, then SIGKILL of the postmaster and its children."""
        if self.datadir is None or self._postmaster_pid() is None:
            return
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        cmd = [f"{bindir}/pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "10", "stop"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        try:
            subprocess.run(cmd, capture_output=True, timeout=20)
        except subprocess.TimeoutExpired:
            pass
        pid = self._postmaster_pid()
        if pid is not None:
            for p in [pid, *_children(pid)]:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass

    def _remove(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
        self.datadir = None

    def server_log(self) -> str:
        """The server log (for diagnostics); empty when there is none."""
        if self.datadir is None:
            return ""
        try:
            return (self.datadir / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- connections -----------------------------------------------------------------------

    def conninfo(self, dbname: str = "postgres", user: str | None = None) -> str:
        return psycopg.conninfo.make_conninfo(
            host=self.host,
            port=self.port,
            user=user or self.superuser,
            dbname=dbname,
            connect_timeout=10,
            application_name="dispatched-tests",
        )

    def connect(
        self, dbname: str = "postgres", user: str | None = None, autocommit: bool = True, **kwargs
    ) -> psycopg.Connection:
        """A new connection (autocommit unless told otherwise); the caller closes it."""
        return psycopg.connect(self.conninfo(dbname, user), autocommit=autocommit, **kwargs)

    # -- databases and roles ---------------------------------------------------------------

    def create_database(self, name: str | None = None, extension: bool = True) -> str:
        """Creates a database (a fresh name unless given), with `CREATE EXTENSION dispatched`
        in it unless extension=False. Returns its name."""
        name = name or f"db_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if extension:
            with self.connect(name) as conn:
                conn.execute("CREATE EXTENSION dispatched")
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def create_role(self, name: str | None = None, superuser: bool = False, login: bool = True) -> str:
        """Creates a role (a fresh name unless given). Returns its name."""
        name = name or f"role_{uuid.uuid4().hex[:12]}"
        opts = [sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"), sql.SQL("LOGIN" if login else "NOLOGIN")]
        with self.connect() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} {}").format(sql.Identifier(name), sql.SQL(" ").join(opts))
            )
        return name

    # -- faults ----------------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        cmd = [f"{bindir}/pg_ctl", "-D", str(self.datadir), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed: {proc.stdout}{proc.stderr}")

    def restart(self, mode: str = "fast") -> None:
        """pg_ctl restart -m MODE (waits until the server accepts connections again)."""
        self._pg_ctl("-l", str(self.datadir / "server.log"), "-m", mode, "-w", "-t", "60", "restart")

    def stop_immediate(self) -> None:
        """pg_ctl stop -m immediate: the postmaster and every backend end at once."""
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def start_again(self) -> None:
        self._pg_ctl("-l", str(self.datadir / "server.log"), "-w", "-t", "60", "start")

    def worker_pids(self, backend_type: str = "dispatched worker") -> list[int]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = %s ORDER BY pid", (backend_type,)
            ).fetchall()
        return [r[0] for r in rows]

    def kill_workers(self) -> list[int]:
        """kill -9 every dispatched worker; returns their pids."""
        pids = self.worker_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> list[int]:
        """Waits until n dispatched workers run (they start once their database exists)."""
        deadline = time.monotonic() + timeout
        pids: list[int] = []
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if len(pids) >= n:
                return pids
            time.sleep(0.2)
        raise TimeoutError(f"{n} workers not running after {timeout}s: {pids}")

    def wait_workers_replaced(self, old_pids: list[int], timeout: float = 60.0) -> list[int]:
        """After workers were killed: waits until the server accepts connections again and
        new workers (none of `old_pids`) run. Returns the new pids."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                pids = self.worker_pids()
                if pids and not set(pids) & set(old_pids):
                    return pids
                last = pids
            except psycopg.OperationalError as e:  # the server is still recovering
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"workers not replaced after {timeout}s: {last}")
