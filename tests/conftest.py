"""Shared fixtures: virtual benches, the esptool CLI as a subprocess, firmware, no leaked threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import flashing  # noqa: F401  (registers vesp://)
from flashing.virtual.bench import VirtualBench

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STATION_SHARED_DIR", REPO.parent / "shared"))
THREAD_GRACE_S = 5.0  # a closed owner joins its threads; this only covers ones in their last steps


@pytest.fixture(autouse=True)
def no_thread_outlives_its_test():
    """Fail a test that leaves a thread running: whatever it opened, it must close.

    Threads alive before the test (session fixtures, pytest's own) are not its doing.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left or time.monotonic() >= deadline:
            break
        left[0].join(deadline - time.monotonic())
    if left:
        pytest.fail(f"{len(left)} thread(s) outlived the test: "
                    f"{', '.join(sorted(t.name for t in left))}", pytrace=False)


@pytest.fixture
def make_bench(tmp_path):
    benches: list[VirtualBench] = []

    def make(count: int = 1, chip: str = "esp32", **kw) -> VirtualBench:
        kw.setdefault("run_dir", tmp_path / f"run{len(benches)}")
        kw.setdefault("seed", 1234 + len(benches))
        bench = VirtualBench(count, chip, **kw)
        benches.append(bench)
        return bench

    yield make
    for b in benches:
        b.close()


def esptool_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real, unmodified esptool CLI in a subprocess (vesp:// registered)."""
    return subprocess.run([sys.executable, "-m", "flashing.esptool_cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "fixtures").is_dir():
        if os.environ.get("CI"):  # in CI a missing fixture is a broken setup, not a reason to skip
            pytest.fail(f"shared fixtures not found at {SHARED} (set STATION_SHARED_DIR)")
        pytest.skip(f"shared fixtures not found at {SHARED} (set STATION_SHARED_DIR)")
    return SHARED


# -- a real MQTT broker ----------------------------------------------------------------------

import hashlib  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
from dataclasses import dataclass  # noqa: E402

TEST_EMAIL = "factory-test@example.com"
TEST_TOKEN = "factory-t1"
MONITOR_USER, MONITOR_PASSWORD = "station-monitor", "monitor-pw-7"


@dataclass
class Broker:
    host: str
    port: int
    test_email: str = TEST_EMAIL
    test_token: str = TEST_TOKEN
    monitor_user: str = MONITOR_USER
    monitor_password: str = MONITOR_PASSWORD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    """A real Mosquitto on a free loopback port, with password authentication and an ACL."""
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    passwd = shutil.which("mosquitto_passwd")
    if not exe or not passwd:
        if os.environ.get("CI"):
            pytest.fail("Mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
        pytest.skip("Mosquitto is not installed (apt-get install mosquitto)")
    d = tmp_path_factory.mktemp("mosquitto")
    device_user = hashlib.sha256(TEST_EMAIL.encode()).hexdigest()
    pw_file = d / "passwd"
    subprocess.run([passwd, "-c", "-b", str(pw_file), device_user, TEST_TOKEN], check=True, capture_output=True)
    subprocess.run([passwd, "-b", str(pw_file), MONITOR_USER, MONITOR_PASSWORD], check=True, capture_output=True)
    (d / "acl").write_text(f"user {MONITOR_USER}\ntopic read #\n\npattern readwrite %u/#\n")
    port = _free_port()
    (d / "mosquitto.conf").write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pw_file}\n"
        f"acl_file {d / 'acl'}\npersistence false\nlog_dest file {d / 'log'}\n")
    proc = subprocess.Popen([exe, "-c", str(d / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    yield Broker("127.0.0.1", port)
    proc.terminate()
    proc.wait(5)
