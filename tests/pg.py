"""A throwaway PostgreSQL cluster for the tests: the distribution's server, started directly, dying with its test process.

`PgCluster.create()` runs `initdb` in a fresh `/tmp/station-pg-<owner pid>-…` folder and starts `postgres` as a
child of the calling process (not `pg_ctl`, which daemonizes it), wrapped in `setpriv --pdeathsig QUIT`: if the
test process dies, even by kill -9, the server gets SIGQUIT (immediate shutdown). As root the server runs as
`nobody` (initdb and postgres refuse root). Only loopback listens, trust authentication, no fsync: a test server.

No pytest here: tests/conftest.py turns a missing server into a skip (or a failure under CI), and a test can run
this module in a child process (`python -m tests.pg`) to kill that child.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

PREFIX = "station-pg-"
NOBODY = 65534  # initdb and postgres refuse to run as root
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
PORT_TRIES = 5
_OPTIONS = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
_BIND_FAILED = ("could not bind", "could not create any TCP/IP sockets", "Address already in use")


class PgError(RuntimeError):
    """The test server could not be made, started or stopped; the message carries its log."""


def server_bindir(pattern: str = "/usr/lib/postgresql/*/bin/postgres") -> Path | None:
    """The highest installed version's bin folder (Debian keeps it off PATH), or None."""
    def version(exe: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(exe).parent.parent.name)) or (0,)
    found = sorted((p for p in glob.glob(pattern) if os.access(p, os.X_OK)), key=version)
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """A process that runs (a zombie, reaped soon by whoever adopted it, is not a live server)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def sweep_stale(tmp: Path | None = None) -> list[Path]:
    """Remove the folders of clusters whose test process and server are both gone (a killed run's ~40 MB)."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(PREFIX + "*"):
        owner = re.match(re.escape(PREFIX) + r"(\d+)-", d.name)
        if owner and _alive(int(owner[1])):
            continue
        server = _postmaster_pid(d / "data")
        if server is not None and _alive(server):
            continue  # a server still runs there (not ours to stop)
        if not owner and server is None and time.time() - d.stat().st_mtime < 300:
            continue  # no owner in the name and no server yet: maybe someone's initdb under way
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class PgCluster:
    """One PostgreSQL data folder and its server; `stop()` and `start()` keep the folder and the port.

    Start it from a thread that outlives the server (pytest's main thread, as fixtures and tests run, also
    under xdist): the parent-death signal follows the thread that forked, not the process.
    """

    def __init__(self, bindir: Path, root: Path):
        self.bindir, self.root = bindir, root
        self.data, self.sock, self.log = root / "data", root / "sock", root / "log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @classmethod
    def create(cls, bindir: Path) -> "PgCluster":
        """initdb a fresh cluster in a new folder and start its server."""
        sweep_stale()
        root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))  # the owner in the name: see sweep_stale
        cluster = cls(bindir, root)
        try:
            cluster.sock.mkdir()
            if os.geteuid() == 0:
                for p in (root, cluster.sock):
                    os.chown(p, NOBODY, NOBODY)
            cluster._initdb()
            cluster.start()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _argv(self, exe: str, *args: str) -> list[str]:
        # setpriv execs the server (same pid); --pdeathsig after the uid change, which would clear it
        who = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if os.geteuid() == 0 else []
        return ["setpriv", "--pdeathsig", "QUIT", *who, "--", str(self.bindir / exe), *args]

    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}

    def _initdb(self) -> None:
        r = subprocess.run(self._argv("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                                      "-E", "UTF8", "--no-instructions"),
                           cwd=self.root, env=self._env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode:
            raise PgError(f"initdb failed ({r.returncode}):\n{r.stdout[-3000:]}")

    def start(self) -> None:
        """Start the server: on a free port the first time, on the same port after a stop()."""
        assert self.proc is None, "the server is already running"
        fixed = self.port
        for attempt in range(1 if fixed else PORT_TRIES):
            port = fixed or free_port()  # a free port can be taken before postgres binds it: then another
            mark = self.log.stat().st_size if self.log.exists() else 0
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    self._argv("postgres", "-D", str(self.data), "-c", "listen_addresses=127.0.0.1", "-p", str(port),
                               "-k", str(self.sock), *_OPTIONS),
                    cwd=self.root, env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self.port = port
            try:
                self._wait_ready()
                return
            except PgError as exc:
                self.proc, said = None, self.log.read_bytes()[mark:].decode(errors="replace")
                if fixed or attempt + 1 == PORT_TRIES or not any(s in said for s in _BIND_FAILED):
                    self.port = fixed
                    raise PgError(f"{exc}; its log:\n{said[-3000:]}") from None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None:
                    raise PgError(f"postgres exited with {self.proc.returncode} on port {self.port}") from None
                if time.monotonic() > deadline:
                    self._halt()
                    raise PgError(f"postgres did not accept connections in {START_TIMEOUT_S:.0f} s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are ended, the data stays); start() brings it back."""
        if self.proc is not None:
            self._halt()
            self.proc = None

    def _halt(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: what pdeathsig would do
            self.proc.wait(STOP_TIMEOUT_S)

    def destroy(self) -> None:
        """Stop the server and remove its folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def database(self):
        """A fresh, empty database for the block; its URL. Dropped after, whatever connections are left."""
        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            if self.proc is not None:  # a test that stopped the server drops nothing (the folder goes anyway)
                with psycopg.connect(self.url(), autocommit=True) as con:
                    con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _serve() -> None:
    """A child for the kill -9 test: start a cluster, say where, then wait for stdin to close."""
    cluster = PgCluster.create(server_bindir())
    print(cluster.proc.pid, cluster.root, flush=True)
    sys.stdin.read()
    cluster.destroy()


if __name__ == "__main__":
    _serve()
