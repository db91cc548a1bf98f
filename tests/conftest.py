"""Shared fixtures: virtual benches, the esptool CLI as a subprocess, firmware, no leaked threads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import flashing  # noqa: F401  (registers vesp://)
from flashing.virtual.bench import VirtualBench
from tests.pg import PgCluster, free_port, server_bindir

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STATION_SHARED_DIR", REPO.parent / "shared"))
THREAD_GRACE_S = 5.0  # a closed owner joins its threads; this only covers ones in their last steps


def wait_until(cond, what: str, timeout: float = 15.0, poke=None, why=None) -> None:
    """Wait for a condition, polling it, up to a deadline (never a fixed sleep); `poke` runs between polls.

    `why`, when given, says what stood in the way if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not reached: {what}" + (f" ({why()})" if why else "")
        if poke:
            poke()
        time.sleep(0.05)


def wait_for_state(dev, ready, timeout: float = 5.0) -> dict:
    """A virtual board's state once `ready(state)` holds (wait_until's deadline fails the test otherwise)."""
    seen: dict = {}

    def holds() -> bool:
        seen["state"] = dev.state()
        return ready(seen["state"])

    wait_until(holds, "the board's state", timeout, why=lambda: str(seen.get("state")))
    return seen["state"]


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


@pytest.fixture(scope="session", autouse=True)
def own_user_folders(tmp_path_factory):
    """The user's config and data folders (platformdirs honours XDG_*) are the run's own: no test reads or
    writes the real ones, and a station.toml there cannot change what a test sees."""
    home = tmp_path_factory.mktemp("user")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(home / "config"))
        mp.setenv("XDG_DATA_HOME", str(home / "data"))
        yield home


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

import base64  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
from dataclasses import dataclass  # noqa: E402

TEST_EMAIL = "factory-test@example.com"
MONITOR_USER, MONITOR_PASSWORD = "station-monitor", "monitor-pw-7"
ADMIN_USER, ADMIN_PASSWORD = "station-admin", "admin-pw-9"
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"


@dataclass
class Broker:
    host: str
    port: int
    test_email: str = TEST_EMAIL
    monitor_user: str = MONITOR_USER
    monitor_password: str = MONITOR_PASSWORD
    admin_user: str = ADMIN_USER
    admin_password: str = ADMIN_PASSWORD


def _dynsec_client(username: str, password: str, role: str) -> dict:
    """A client as Mosquitto's dynamic-security file keeps it (PBKDF2-SHA512, as `mosquitto_ctrl` writes)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {"username": username, "password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": 101, "roles": [{"rolename": role}]}


def _acl(acltype: str, topic: str) -> dict:
    return {"acltype": acltype, "topic": topic, "allow": True}


def _dynsec_plugin() -> str | None:
    for pattern in ("/usr/lib/*/" + DYNSEC_PLUGIN, "/usr/lib/" + DYNSEC_PLUGIN, "/usr/lib/mosquitto/" + DYNSEC_PLUGIN,
                    "/usr/local/lib/" + DYNSEC_PLUGIN, "/usr/local/lib/*/" + DYNSEC_PLUGIN):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _start_mosquitto(d: Path, listener: str):
    """Mosquitto with the dynamic-security plugin and its test accounts, on `listener` (its config lines)."""
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    plugin = _dynsec_plugin()
    if not exe or not plugin:
        what = "Mosquitto is not installed" if not exe else f"Mosquitto's {DYNSEC_PLUGIN} was not found"
        if os.environ.get("CI"):
            pytest.fail(f"{what}; .ci/run installs it (apt-get install mosquitto)")
        pytest.skip(f"{what} (apt-get install mosquitto)")
    admin_acls = [_acl(t, "$CONTROL/dynamic-security/#") for t in
                  ("publishClientSend", "publishClientReceive", "subscribePattern")]
    monitor_acls = [_acl("subscribePattern", "#"), _acl("publishClientReceive", "#")]
    (d / "dynsec.json").write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
        "clients": [_dynsec_client(ADMIN_USER, ADMIN_PASSWORD, "admin"),
                    _dynsec_client(MONITOR_USER, MONITOR_PASSWORD, "monitor")],
        "groups": [],
        "roles": [{"rolename": "admin", "acls": admin_acls}, {"rolename": "monitor", "acls": monitor_acls}],
    }, indent=1))
    port = free_port()
    (d / "mosquitto.conf").write_text(
        f"user root\nlistener {port} 127.0.0.1\n{listener}allow_anonymous false\nplugin {plugin}\n"
        f"plugin_opt_config_file {d / 'dynsec.json'}\npersistence false\nlog_dest file {d / 'log'}\n")
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
    return proc, port


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    """A real Mosquitto on a free loopback port, its accounts in the dynamic-security plugin.

    Only the station's admin (which makes each unit's own test account) and the monitor
    (which reads every device topic) exist at start; nothing may publish by default.
    """
    proc, port = _start_mosquitto(tmp_path_factory.mktemp("mosquitto"), "")
    yield Broker("127.0.0.1", port)
    proc.terminate()
    proc.wait(5)


@dataclass(frozen=True)
class BrokerCa:
    """A CA made at test time and a broker certificate it signed for 127.0.0.1 and localhost."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_test_ca(d: Path, name: str = "Station Test CA") -> BrokerCa:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = BrokerCa(d / "ca.pem", d / "broker.pem", d / "broker.key")
    out.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return out


@dataclass
class TlsBroker(Broker):
    ca: BrokerCa | None = None


@pytest.fixture(scope="session")
def mosquitto_tls(tmp_path_factory):
    """A second real Mosquitto whose only listener is TLS (the SDK's mqtts port), its certificate from a test CA."""
    d = tmp_path_factory.mktemp("mosquitto-tls")
    ca = make_test_ca(d / "ca")
    proc, port = _start_mosquitto(d, f"cafile {ca.ca_file}\ncertfile {ca.cert_file}\nkeyfile {ca.key_file}\n")
    yield TlsBroker("127.0.0.1", port, ca=ca)
    proc.terminate()
    proc.wait(5)


# -- a real PostgreSQL (the central record, issue #17) -----------------------------------------


def pg_bindir(pattern: str = "/usr/lib/postgresql/*/bin/postgres") -> Path:
    """The server's bin folder; missing, the test is skipped (failed with CI set, as for Mosquitto)."""
    found = server_bindir(pattern)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres); "
                        ".ci/run installs it: apt-get install postgresql")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    return found


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway cluster per test process (each xdist worker its own); tests take databases from it."""
    cluster = PgCluster.create(pg_bindir())
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database of the session's server, dropped after the test: its postgresql:// URL."""
    with pg_server.database() as url:
        yield url


@pytest.fixture
def pg_own():
    """A private cluster (its own initdb, ~1.2 s) the test may stop() and start() on the same port and data."""
    cluster = PgCluster.create(pg_bindir())
    yield cluster
    cluster.destroy()
