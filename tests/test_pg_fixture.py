"""The throwaway PostgreSQL of the tests (tests/pg.py): it works, isolates, restarts, and dies with its owner."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import REPO, pg_bindir, wait_until
import tests.pg as pg
from tests.pg import PgCluster, _alive, free_port, sweep_stale


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def test_a_query_works(pg_url):
    with psycopg.connect(pg_url) as con:
        assert con.execute("SELECT 1 + 1").fetchone() == (2,)
        assert con.info.dbname.startswith("t_")
        assert con.execute("SHOW fsync").fetchone() == ("off",)  # the test settings reached the server


def test_two_databases_are_separate_and_dropped_after(pg_server, pg_url):
    with psycopg.connect(pg_url) as con:
        con.execute("CREATE TABLE counters (name text PRIMARY KEY, next bigint NOT NULL)")
        con.execute("INSERT INTO counters VALUES ('relay', 7)")
    with pg_server.database() as other:
        assert other != pg_url
        lingering = psycopg.connect(other)  # left open: the drop ends it
        assert lingering.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
    with psycopg.connect(pg_server.url()) as con:
        names = {r[0] for r in con.execute("SELECT datname FROM pg_database")}
    assert other.rsplit("/", 1)[1] not in names and pg_url.rsplit("/", 1)[1] in names
    with pytest.raises(psycopg.OperationalError):
        lingering.execute("SELECT 1")
    lingering.close()


def test_stop_and_start_keep_the_data_and_the_port(pg_own):
    with psycopg.connect(pg_own.url()) as con:
        con.execute("CREATE TABLE units (serial text)")
        con.execute("INSERT INTO units VALUES ('RLY-00001')")
    port, pid = pg_own.port, pg_own.proc.pid
    pg_own.stop()
    assert not _alive(pid)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_own.url(), connect_timeout=1).close()
    pg_own.start()
    assert pg_own.port == port and pg_own.proc.pid != pid
    with psycopg.connect(pg_own.url()) as con:
        assert con.execute("SELECT serial FROM units").fetchall() == [("RLY-00001",)]


def test_a_taken_port_is_left_for_another_and_a_restart_says_why_it_failed(pg_own, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        offered = [taken.getsockname()[1]]  # "free" when asked, taken by the time postgres binds it
        monkeypatch.setattr(pg, "free_port", lambda: offered.pop() if offered else free_port())
        fresh = PgCluster.create(pg_bindir())
        try:
            assert not offered and fresh.port != taken.getsockname()[1]
            psycopg.connect(fresh.url()).close()
        finally:
            fresh.destroy()
    # a restart keeps its port: taken meanwhile, it fails, and the server's own words say why
    port = pg_own.port
    pg_own.stop()
    with socket.socket() as squatter:
        # the stopped server's own connections may leave TIME_WAIT on its port: bind as postgres does
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(pg.PgError, match=rf"(?s)postgres exited .* on port {port}; its log:.*could not bind"):
            pg_own.start()
    pg_own.start()
    assert pg_own.port == port


def test_kill_9_of_the_owner_leaves_no_live_postgres():
    """The server dies with the process that started it (setpriv --pdeathsig), as when pytest is killed."""
    pg_bindir()
    child = subprocess.Popen([sys.executable, "-m", "tests.pg"], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    pid = root = None
    try:
        pid, root = child.stdout.readline().split()
        pid, root = int(pid), Path(root)
        helpers = _children(pid)
        assert _alive(pid) and helpers, "the server and its helper processes run"
        child.kill()
        child.wait(10)
        wait_until(lambda: not _alive(pid) and not any(_alive(h) for h in helpers),
                   "the server and its helpers are gone after kill -9 of their owner")
        assert root in sweep_stale(root.parent) and not root.exists()  # its folder is a stale one now
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stdin.close()
        if pid and _alive(pid):  # the feature is broken: leave no server behind
            os.kill(pid, signal.SIGQUIT)
        if root:
            shutil.rmtree(root, ignore_errors=True)


def test_a_missing_server_skips_or_fails_under_ci(monkeypatch, tmp_path):
    nowhere = str(tmp_path / "*/bin/postgres")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        pg_bindir(nowhere)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match=".ci/run installs it"):
        pg_bindir(nowhere)


def test_the_highest_version_is_taken(tmp_path):
    for v in ("9.6", "15", "16"):
        exe = tmp_path / v / "bin" / "postgres"
        exe.parent.mkdir(parents=True)
        exe.write_text("")
        exe.chmod(0o755)
    assert pg_bindir(str(tmp_path / "*/bin/postgres")) == tmp_path / "16" / "bin"
