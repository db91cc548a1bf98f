"""The smoke test: the device's local pairing server, and optionally its broker login.

Levels: `none`; `healthcheck` (GET /healthcheck answers 200 within the timeout);
`pair` (a pairing as the 2Smart mobile app does it, with the factory's test Wi-Fi
and a test-broker account of the unit's own, waiting until the device's `$state` is
`ready` on that broker; then the pipeline restores the unit's own configuration, on
every path, and checks it).

Each unit pairs with its own short-lived broker account (`UnitAccounts`: Mosquitto's
dynamic-security plugin, driven over MQTT by the station's admin account): a random
email `<local>+<12 hex>@<domain>` and a random 10-character token (the SDK's limit), so
its MQTT username, sha256(email), is its own; its role allows only its own device
topic, `<username>/sweet-home/<device-id>/#`. One unit's credentials cannot publish
`$state` for another, and they are deleted when the unit ends. The device is reached `direct` (a URL, or the IP its boot log
printed) or over `wifi` (joining its access point by SSID and BSSID with
NetworkManager's nmcli, one join at a time per interface).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import secrets
import shutil
import socket
import ssl
import stat
import string
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping
from urllib.parse import urlencode, urlsplit

from flashing.console import MQTT_REFUSED, BootLog, parse_boot_log
from flashing.errors import UnitError
from flashing.mqtt_client import BrokerTls, Message, MqttClient, MqttError

from .config import SmokeDefaults


class SmokeFailure(UnitError):
    """The device failed its smoke test (pairing server, broker login, a crash after boot)."""


@dataclass(frozen=True)
class FactoryAccounts:
    """The factory's test Wi-Fi and broker accounts, with their secrets resolved."""

    test_ssid: str
    test_psk: str = field(repr=False)
    test_email: str  # the template of each unit's own test email
    monitor_user: str
    monitor_password: str = field(repr=False)
    admin_user: str = ""  # the broker's dynamic-security admin: creates and deletes unit accounts
    admin_password: str = field(default="", repr=False)

    @classmethod
    def from_settings(cls, s: SmokeDefaults, env: Mapping[str, str] | None = None) -> "FactoryAccounts":
        env = os.environ if env is None else env
        return cls(s.test_ssid, env.get(s.test_psk_env, ""), s.test_email, s.monitor_user,
                   env.get(s.monitor_password_env, ""), s.broker_admin_user, env.get(s.broker_admin_password_env, ""))

    def missing(self, s: SmokeDefaults) -> list[str]:
        out = []
        if not self.monitor_password:
            out.append(f"the broker monitor password ({s.monitor_password_env})")
        if not self.admin_password:
            out.append(f"the broker admin password ({s.broker_admin_password_env}), for per-unit test accounts")
        return out


@dataclass(frozen=True)
class UnitAccount:
    """One unit's own test-broker account: what its /pair request carries."""

    email: str
    token: str = field(repr=False)
    device_id: str

    @property
    def username(self) -> str:
        return hashlib.sha256(self.email.encode()).hexdigest()  # as the 2Smart SDK logs in

    @property
    def topic(self) -> str:
        """The only topic tree this account may publish or subscribe to."""
        return f"{self.username}/sweet-home/{self.device_id}"

    @property
    def role(self) -> str:
        return f"station-unit-{self.username}"


DYNSEC = "$CONTROL/dynamic-security/v1"
TOKEN_CHARS = string.ascii_letters + string.digits
TOKEN_LENGTH = 10  # the 2Smart SDK stores at most 10 characters of token
EMAIL_LIMIT = 64  # and 64 of email


class UnitAccountError(SmokeFailure):
    """The station could not create or delete a unit's test account: the station's fault."""

    station_fault = True


class UnitAccounts:
    """Per-unit test accounts on the factory broker, through Mosquitto's dynamic-security plugin.

    Each call logs in as the admin, sends its commands on `$CONTROL/dynamic-security/v1`
    and waits for their answers on `.../response`; no connection is kept between calls.
    """

    def __init__(self, settings: SmokeDefaults, accounts: FactoryAccounts):
        self.settings, self.accounts = settings, accounts

    def create(self, device_id: str) -> UnitAccount:
        if not device_id or any(c in device_id for c in "+#/\0"):
            raise UnitAccountError(f"device id {device_id!r} cannot name an MQTT topic", "report this board's MAC")
        local, _, domain = self.accounts.test_email.partition("@")
        email = f"{local}+{secrets.token_hex(6)}@{domain}"
        if len(email) > EMAIL_LIMIT:
            raise UnitAccountError(f"the per-unit test email is {len(email)} characters, over the SDK's "
                                   f"{EMAIL_LIMIT}", "shorten [smoke] test_email in station.toml")
        unit = UnitAccount(email, "".join(secrets.choice(TOKEN_CHARS) for _ in range(TOKEN_LENGTH)), device_id)
        acls = [{"acltype": t, "topic": f"{unit.topic}/#", "allow": True}
                for t in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")]
        try:
            self._run([{"command": "createRole", "rolename": unit.role, "acls": acls},
                       {"command": "createClient", "username": unit.username, "password": unit.token,
                        "roles": [{"rolename": unit.role}]}], "creating this unit's test broker account")
        except UnitAccountError:
            with contextlib.suppress(UnitAccountError):  # half made (the role alone): leave nothing behind
                self.delete(unit)
            raise
        return unit

    def delete(self, unit: UnitAccount) -> None:
        """Delete the account (the broker also drops its connection); a missing one is not an error."""
        self._run([{"command": "deleteClient", "username": unit.username},
                   {"command": "deleteRole", "rolename": unit.role}], "deleting this unit's test broker account",
                  missing_ok=True)

    def _run(self, commands: list[dict], doing: str, missing_ok: bool = False) -> None:
        s, tag = self.settings, secrets.token_hex(8)
        for i, c in enumerate(commands):
            c["correlationData"] = f"{tag}-{i}"
        answers: dict[str, dict] = {}
        done = threading.Event()

        def on_response(msg: Message) -> None:
            try:
                responses = json.loads(msg.payload).get("responses", [])
            except (ValueError, AttributeError):
                return
            for r in responses:
                if isinstance(r, dict) and str(r.get("correlationData", "")).startswith(tag):
                    answers[r["correlationData"]] = r
            if len(answers) == len(commands):
                done.set()

        admin = broker_client(s, f"station-accounts-{tag}", self.accounts.admin_user, self.accounts.admin_password)
        try:
            refused = admin.connect()
        except (OSError, MqttError) as exc:
            raise UnitAccountError(*_unreachable(s, exc, f" while {doing}")) from None
        try:
            if refused:
                raise UnitAccountError(f"the test broker refused the station's admin login while {doing} "
                                       f"({refused})", "check [smoke] broker_admin_user and its password on the broker")
            admin.subscribe(f"{DYNSEC}/response", on_response)
            admin.publish(DYNSEC, json.dumps({"commands": commands}))
            if not done.wait(s.timeout_s):
                raise UnitAccountError(f"the test broker did not answer while {doing} within {s.timeout_s:g} s",
                                       "check that the broker loads mosquitto_dynamic_security and that the "
                                       "admin account may use it")
        except MqttError as exc:
            raise UnitAccountError(f"the test broker connection failed while {doing} ({exc})",
                                   "check the factory test broker; retry") from None
        finally:
            admin.close()
        errors = [f"{a.get('command')}: {a['error']}" for a in answers.values() if a.get("error")
                  and not (missing_ok and "not found" in str(a["error"]).lower())]
        if errors:
            raise UnitAccountError(f"the test broker refused {doing} ({'; '.join(errors)})",
                                   "check the broker's dynamic-security configuration and the admin's role")


def broker_client(s: SmokeDefaults, client_id: str, user: str, password: str) -> MqttClient:
    """A login to the factory test broker as station.toml [smoke] describes it (TLS or not)."""
    tls = BrokerTls(str(s.broker_ca_file) if s.broker_ca_file else None) if s.broker_tls else None
    return MqttClient(s.broker_host, s.broker_port, client_id, user, password, timeout=s.timeout_s, tls=tls)


def _unreachable(s: SmokeDefaults, exc: BaseException, doing: str = "") -> tuple[str, str]:
    """The message and remedy for a test broker the station could not log in to."""
    where = f"{s.broker_host}:{s.broker_port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the test broker {where} presented a certificate the station does not trust{doing} "
                f"({exc.verify_message})", "check [smoke] broker_ca_file, and that the broker's certificate "
                "names broker_host")
    if isinstance(exc, ssl.SSLError):
        return (f"no TLS session with the test broker {where}{doing} ({exc.reason or exc})",
                "check that broker_port is the broker's TLS (mqtts) port, or set broker_tls = false")
    return (f"the test broker {where} is unreachable{doing} ({exc})",
            "start the factory test broker, or check station.toml [smoke]")


# -- reaching the device ---------------------------------------------------------------------

class DirectReach:
    """The pairing server at a fixed URL, or at the IP and port the boot log printed."""

    def __init__(self, settings: SmokeDefaults):
        self.settings = settings

    def open(self, boot: BootLog, mac: bytes, ap_name: str | None) -> str:
        if self.settings.url:
            return self.settings.url.rstrip("/")
        ip = boot.sta_ip or boot.ap_ip
        if not ip:
            raise SmokeFailure("the boot log shows no IP address for the device",
                               "check that the firmware starts its access point or joins the network",
                               boot.text[-2000:])
        return f"http://{ip}:{boot.http_port or self.settings.port}"

    def close(self) -> None:
        pass


_iface_locks: dict[str, threading.Lock] = {}
_iface_guard = threading.Lock()


def soft_ap_bssid(mac: bytes) -> str:
    """The soft-AP MAC: base MAC + 1 in the last byte, with carry."""
    n = (int.from_bytes(mac, "big") + 1) % (1 << 48)
    return ":".join(f"{b:02x}" for b in n.to_bytes(6, "big"))


class WifiReach:
    """Join the device's AP with nmcli on a named interface, one join at a time per interface.

    Several boards on a bench broadcast the same SSID, so the join names the BSSID too.
    """

    SDK_AP_URL = "http://192.168.4.1"  # the SDK's soft-AP address; station.toml [smoke] url overrides

    def __init__(self, settings: SmokeDefaults, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                 nmcli: str | None = None):
        self.settings = settings
        self.run = run
        self.nmcli = nmcli or resolve_nmcli()
        self.iface = settings.wifi_interface
        with _iface_guard:
            self.lock = _iface_locks.setdefault(self.iface, threading.Lock())
        self.joined: str | None = None

    def open(self, boot: BootLog, mac: bytes, ap_name: str | None) -> str:
        ssid = boot.ap_name or ap_name
        if not ssid:
            raise SmokeFailure("the device did not say which access point it started",
                               "check the firmware's boot log; it must start its AP")
        bssid = soft_ap_bssid(mac)
        if not self.lock.acquire(timeout=self.settings.timeout_s * 4):
            raise SmokeFailure(f"interface {self.iface} stayed busy with another board",
                               "retry when the other slots are done")
        cmd = [self.nmcli, "--wait", str(int(self.settings.timeout_s)), "device", "wifi", "connect", ssid,
               "bssid", bssid, "ifname", self.iface]
        try:
            r = self.run(cmd, capture_output=True, text=True, timeout=self.settings.timeout_s + 5,
                         env=dict(NMCLI_ENV))
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.lock.release()
            raise SmokeFailure(f"nmcli could not run: {exc}", "install NetworkManager or use reach = direct")
        if r.returncode != 0:
            self.lock.release()
            raise SmokeFailure(f"could not join the device's access point {ssid} ({bssid}) on {self.iface}",
                               "check that the board is powered and its AP is up; retry", r.stderr.strip())
        self.joined = ssid
        return (self.settings.url or self.SDK_AP_URL).rstrip("/")

    def close(self) -> None:
        if self.joined is not None:
            try:
                self.run([self.nmcli, "connection", "down", "id", self.joined], capture_output=True,
                         text=True, timeout=self.settings.timeout_s + 5, env=dict(NMCLI_ENV))
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.joined = None
            self.lock.release()


def make_reach(settings: SmokeDefaults, nmcli: str | None = None) -> DirectReach | WifiReach:
    return WifiReach(settings, nmcli=nmcli) if settings.reach == "wifi" else DirectReach(settings)


# nmcli gets nothing of the station's environment (its secrets, the passphrase): a fixed PATH and C locale
NMCLI_ENV = (("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), ("LANG", "C"))


def resolve_nmcli(path: str | None = None) -> str:
    """nmcli's absolute path, refused when someone other than root (or the station's user) could replace it."""
    found = shutil.which("nmcli", path=path)
    remedy = "install NetworkManager from the distribution, or use reach = direct"
    if not found:
        raise SmokeFailure("nmcli is not installed", remedy)
    found = os.path.realpath(found)
    if not os.path.isabs(found):
        raise SmokeFailure(f"nmcli was found at a relative path ({found})", remedy)
    for where in (found, os.path.dirname(found)):
        st = os.stat(where)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise SmokeFailure(f"{where} can be changed by other users: the station will not run nmcli from it",
                               remedy)
    return found


# -- the checks -------------------------------------------------------------------------------

MAX_REPLY_BYTES = 64 * 1024  # a pairing server's reply is a word or two; more is a broken or hostile device


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that gives up at an overall deadline, however slowly bytes arrive."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the reply did not end in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buf)


class _DeadlineSocket:
    """What http.client needs of a socket, with every read bounded by one deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def makefile(self, mode: str, *args, **kw):
        return io.BufferedReader(_DeadlineReader(self.sock, self.deadline))

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        self.sock.sendall(data)

    def close(self) -> None:
        pass  # http.client closes its end before the body is read ("Connection: close"); http_get closes the socket


def _where(url: str) -> str:
    """The URL as a message may name it: scheme, host, port and path, never the query."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc.rpartition('@')[2]}{u.path}"  # no user:password@ either


def http_get(url: str, timeout: float, max_bytes: int = MAX_REPLY_BYTES,
             deadline: float | None = None) -> tuple[int, str]:
    """GET `url`: status and body, within `timeout` overall and at most `max_bytes` of body.

    A server that trickles bytes, or streams without end, fails the unit at the deadline
    or the cap instead of holding (or filling) the station. `deadline` (monotonic) is when
    `timeout` started to run, for a caller that asks again within one timeout.
    """
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise SmokeFailure(f"the pairing server's address {_where(url)} is not an http:// URL",
                           "fix station.toml [smoke] url")
    deadline = time.monotonic() + timeout if deadline is None else deadline
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=max(deadline - time.monotonic(), 0.05))
    raw: socket.socket | None = None
    body = bytearray()
    try:
        conn.connect()
        raw = conn.sock
        conn.sock = _DeadlineSocket(raw, deadline)
        conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""),
                     headers={"Connection": "close"})
        r = conn.getresponse()
        while len(body) <= max_bytes:  # never more than the cap (plus one read) in memory
            chunk = r.read(min(16384, max_bytes + 1 - len(body)))
            if not chunk:
                break
            body += chunk
        r.close()
    except (TimeoutError, socket.timeout):
        raise SmokeFailure(f"the pairing server did not answer within {timeout:g} s ({_where(url)})",
                           "the firmware may be hung: power-cycle and retry, else replace the board") from None
    except ConnectionRefusedError as exc:
        raise NotListening(f"no answer from the pairing server at {_where(url)} ({type(exc).__name__}: "
                           f"{exc})", "check that the firmware starts its pairing server; retry") from None
    except (OSError, http.client.HTTPException) as exc:
        raise SmokeFailure(f"no answer from the pairing server at {_where(url)} ({type(exc).__name__}: "
                           f"{exc})", "check that the firmware starts its pairing server; retry") from None
    finally:
        conn.close()
        if raw is not None:
            raw.close()
    if len(body) > max_bytes:
        raise SmokeFailure(f"the pairing server's reply from {_where(url)} is larger than {max_bytes // 1024} KiB",
                           "the firmware's pairing server misbehaves: replace the board if a retry does the same")
    return r.status, bytes(body).decode("utf-8", "replace")


class NotListening(SmokeFailure):
    """The connection was refused: nothing listens at the pairing server's address (yet)."""


REFUSED_RETRY_S = 0.1


def healthcheck(base: str, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> None:
    """GET /healthcheck: 200 within `timeout`. A refused connection is asked again until then.

    A device logs its address (got IP, or its access point up) before its HTTP server
    listens (ESP-IDF's httpd starts after the network event), so on a busy station the first
    connection can be refused; that is the firmware still starting, not a board failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = http_get(base + "/healthcheck", timeout, deadline=deadline)
            break
        except NotListening:
            if time.monotonic() + REFUSED_RETRY_S >= deadline or cancelled():
                raise
            time.sleep(REFUSED_RETRY_S)  # a poll of a port nobody listens on yet: nothing to wait on instead
    if status != 200:
        # the reply goes whole to the detail: an excerpt cut inside a secret would hide it from the redaction
        raise SmokeFailure(f"/healthcheck answered {status}, not 200",
                           "the firmware's pairing server is unhealthy: retry, else replace the board", body)


def pair_and_wait(base: str, device_class: str, device_id: str, settings: SmokeDefaults,
                  accounts: FactoryAccounts, unit: UnitAccount, console: Callable[[], str],
                  cancelled: Callable[[], bool] = lambda: False) -> float:
    """Pair as the mobile app does, with the unit's own account; wait for `$state` = ready.

    Returns the seconds from the pairing request to `ready`. `console` returns what
    the board printed since the last call (to tell a refused login from silence);
    `cancelled` ends the wait at once (an abort).
    """
    topic = f"{unit.topic}/$state"
    ready = threading.Event()

    def on_state(msg: Message) -> None:
        if not msg.retain and msg.payload == b"ready":  # a retained one is from an earlier run
            ready.set()

    monitor = broker_client(settings, f"station-smoke-{device_id}", accounts.monitor_user,
                            accounts.monitor_password)
    try:
        refused = monitor.connect()
    except (OSError, MqttError) as exc:
        raise SmokeFailure(*_unreachable(settings, exc)) from None
    if refused:
        raise SmokeFailure(f"the test broker refused the station's monitor login ({refused})",
                           "check the monitor account in station.toml [smoke]")
    try:
        try:
            monitor.subscribe(topic, on_state)
        except MqttError as exc:
            raise SmokeFailure(f"the test broker would not let the monitor watch this unit ({exc})",
                               "check the monitor account's rights on the broker") from None
        params = {"wsp": unit.email, "token": unit.token,
                  "host": settings.broker_host, "brport": str(settings.broker_port)}
        if settings.broker_tls:  # the SDK's TLS port: the device logs in over TLS too
            params["mqtts_port"] = str(settings.broker_port)
        if device_class == "wifi":
            params = {"ssid": accounts.test_ssid, "psk": accounts.test_psk, **params}
        t0 = time.monotonic()
        url = f"{base}/pair?{urlencode(params)}"
        try:
            status, body = http_get(url, settings.timeout_s)
        except SmokeFailure as exc:  # its words name the URL: not with the token and the Wi-Fi password
            raise SmokeFailure(exc.message.replace(url, f"{base}/pair"), exc.remedy, exc.detail) from None
        if status != 200:
            raise SmokeFailure(f"/pair answered {status} {body.strip()[:80]!r}, not 200 OK",
                               "the device refused the pairing data: check the firmware; retry")
        seen = ""
        deadline = t0 + settings.timeout_s
        while time.monotonic() < deadline:
            if ready.wait(0.1):
                return time.monotonic() - t0
            if cancelled():
                raise SmokeFailure("stopped while waiting for the device on the test broker",
                                   "put the board back and start it again")
            seen += console()
            refused = MQTT_REFUSED.search(seen)
            if refused:
                raise SmokeFailure(f"the broker refused this device's login ({refused.group(1).strip()})",
                                   "check the factory test broker; replace the board if others pass",
                                   seen[-1500:])
        raise SmokeFailure(f"timeout: the device did not report $state = ready on the test broker within "
                           f"{settings.timeout_s:g} s", "check the test Wi-Fi and broker; retry", seen[-1500:])
    finally:
        monitor.close()


def wait_for_address(boot: BootLog, console: Callable[[], str], timeout: float,
                     cancelled: Callable[[], bool] = lambda: False) -> BootLog:
    """The boot log once it names the device's IP address, read on for up to `timeout` seconds.

    The boot check stops reading soon after app_main; a board prints its address when its
    access point is up or DHCP answered, which on a real network can take seconds more.
    A crash while waiting fails the unit as a crash, not as a missing address.
    """
    text, deadline = boot.text, time.monotonic() + timeout
    while not (boot.sta_ip or boot.ap_ip) and time.monotonic() < deadline and not cancelled():
        time.sleep(0.05)
        text += console()
        boot = parse_boot_log(text)
        if boot.panic:
            raise SmokeFailure(f"the firmware crashed after boot ({boot.panic.strip()})",
                               "replace the board if a retry crashes the same way", text[-2000:])
    return boot


def soak(console: Callable[[], str], seconds: float, seen: str = "") -> None:
    """Keep watching the console after the checks: a crash soon after boot fails the unit."""
    deadline = time.monotonic() + seconds
    text = seen
    while True:
        text += console()
        log = parse_boot_log(text)
        if log.panic:
            raise SmokeFailure(f"the firmware crashed after boot ({log.panic.strip()})",
                               "replace the board if a retry crashes the same way", text[-2000:])
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)
