"""STOPGAP until branch pgfix lands (tests/pg.py): a throwaway PostgreSQL for the central-record tests."""
import glob, os, pwd, shutil, signal, socket, subprocess, tempfile, time, uuid

import psycopg
import pytest


def _bindir():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[-3]))
    return os.path.dirname(found[-1]) if found else None


class Cluster:
    def __init__(self):
        self.bindir = _bindir()
        if self.bindir is None:
            (pytest.fail if os.environ.get("CI") else pytest.skip)("no PostgreSQL server (apt-get install postgresql)")
        self.tmp = tempfile.mkdtemp(prefix="stopgap-pg-")
        self.data, self.sock = os.path.join(self.tmp, "data"), os.path.join(self.tmp, "sock")
        os.mkdir(self.sock)
        self.as_user = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("nobody")
            for p in (self.tmp, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self.as_user = [f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        subprocess.run(["setpriv", *self.as_user, "--", os.path.join(self.bindir, "initdb"), "-D", self.data,
                        "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--no-instructions"],
                       cwd=self.tmp, check=True, capture_output=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "QUIT", *self.as_user, "--", os.path.join(self.bindir, "postgres"),
             "-D", self.data, "-c", "listen_addresses=127.0.0.1", "-p", str(self.port), "-k", self.sock,
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "postgres did not start"
                time.sleep(0.05)

    def stop(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
            self.proc = None

    def close(self):
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def pg_server():
    c = Cluster()
    yield c
    c.close()


@pytest.fixture
def pg_url(pg_server):
    yield pg_server.new_database()


@pytest.fixture
def pg_own():
    c = Cluster()
    yield c
    c.close()
