"""The smoke test against virtual boards' pairing servers and a real Mosquitto."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from flashing.firmware import build_firmware, twosmart_manifest
from flashing.virtual.bench import VirtualBench
from station.config import SmokeDefaults
from station.smoke import FactoryAccounts, UnitAccounts, WifiReach, soft_ap_bssid
from flashing.console import parse_boot_log
from tests.conftest import ADMIN_PASSWORD, MONITOR_PASSWORD, TEST_EMAIL, wait_until
from tests.station.conftest import json_lines, run_station


def smoke_config(env: Path, broker, timeout: float = 5, extra: str = "") -> None:
    cfg = env / "station.toml"
    base = cfg.read_text().split("\n[smoke]")[0]
    cfg.write_text(base + f'\n[smoke]\ntimeout_s = {timeout}\nbroker_port = {broker.port}\n'
                   f'test_email = "{TEST_EMAIL}"\n{extra}')


@pytest.fixture
def pair_env(station_env, mosquitto, monkeypatch):
    monkeypatch.setenv("STATION_MONITOR_PASSWORD", MONITOR_PASSWORD)
    monkeypatch.setenv("STATION_BROKER_ADMIN_PASSWORD", ADMIN_PASSWORD)
    smoke_config(station_env, mosquitto)
    return station_env


def finished(out: str) -> dict[str, dict]:
    return {e["port"]: e for e in json_lines(out) if e["event"] == "unit_finished"}


def flash(capsys, bench, *extra: str) -> tuple[int, dict[str, dict]]:
    ports = sum((["--port", s.url] for s in bench.slots), [])
    rc, out, err = run_station(capsys, "flash", *ports, "--json", *extra)
    return rc, finished(out)


def test_healthcheck_level_passes(station_env, capsys):
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        ports = sum((["--port", s.url] for s in bench.slots), [])
        rc, out, err = run_station(capsys, "flash", *ports, "--json", "--smoke", "healthcheck")
        assert rc == 0, err
        events = json_lines(out)
        res = finished(out)
        assert sorted(res) == sorted(s.url for s in bench.slots)
        for s in bench.slots:
            r = res[s.url]
            assert r["outcome"] == "passed" and r["durations"]["smoke"] > 0
            smoke = [e for e in events if e["event"] == "step_finished" and e["port"] == s.url and e["step"] == "smoke"]
            assert len(smoke) == 1 and smoke[0]["ok"] is True
            assert s.device.state()["app_mode"] == "ap"  # the pairing server it checked is the one the AP serves
        # the same boards with --smoke none: no smoke step at all
        rc, out, _ = run_station(capsys, "flash", *ports, "--json", "--smoke", "none", "--rework")
        assert rc == 0
        assert [r for r in finished(out).values() if "smoke" in r["durations"]] == []


def test_a_board_that_prints_its_address_late_is_still_checked(station_env, capsys):
    # a real access point or DHCP answers seconds after app_main, when the boot check has stopped reading
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        bench[0].device.set_fault("address_after", 1.5)
        rc, res = flash(capsys, bench, "--smoke", "healthcheck")
        r = res[bench[0].url]
        assert (rc, r["outcome"]) == (0, "passed"), r
        assert r["durations"]["smoke"] >= 0.5  # it waited for the address (the boot check read 0.5 s)


def wait_for_line(lines: list[str], want, what: str, timeout: float = 10.0, poke=None) -> None:
    wait_until(lambda: want(lines), f"{what} in {lines}", timeout, poke)


def broker_accounts(broker, timeout: float = 5) -> UnitAccounts:
    """The station's per-unit account maker, pointed at the test broker."""
    settings = SmokeDefaults(broker_host=broker.host, broker_port=broker.port, test_email=TEST_EMAIL,
                             timeout_s=timeout)
    return UnitAccounts(settings, FactoryAccounts("factory-test", "", TEST_EMAIL, broker.monitor_user,
                                                  broker.monitor_password, broker.admin_user, broker.admin_password))


def test_pair_level_with_mosquitto_and_an_independent_subscriber(pair_env, mosquitto, capsys):
    shared = hashlib.sha256(TEST_EMAIL.encode()).hexdigest()
    sub = subprocess.Popen(["mosquitto_sub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-u",
                            mosquitto.monitor_user, "-P", MONITOR_PASSWORD, "-v", "-t", "+/sweet-home/+/$state"],
                           stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(l.rstrip("\n") for l in sub.stdout), daemon=True)
    reader.start()
    accounts = broker_accounts(mosquitto)
    probe_account = accounts.create("probe")
    probe = ["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-u", probe_account.username,
             "-P", probe_account.token, "-t", f"{probe_account.topic}/$state", "-m", "probe"]
    try:
        # the subscriber is listening once it hears a probe on the same topic pattern
        wait_for_line(lines, lambda ls: f"{probe_account.topic}/$state probe" in ls, "probe",
                      poke=lambda: subprocess.run(probe, check=True, timeout=10))
        with VirtualBench(3, "esp32", run_dir=pair_env / "run") as bench:
            for s in bench.slots:
                s.device.heartbeat_s = 1
            rc, res = flash(capsys, bench, "--smoke", "pair")
            assert rc == 0, res
            for s in bench.slots:
                # restored afterwards: the unit's own config, no Wi-Fi, so its AP is up again
                assert s.device.state()["app_mode"] == "ap"
            ids = [s.device.mac_text.replace(":", "-") for s in bench.slots]
        users = set()
        for device_id in ids:
            wait_for_line(lines, lambda ls: any(l.endswith(f"/sweet-home/{device_id}/$state ready") for l in ls),
                          device_id)
            users |= {l.split("/")[0] for l in lines if l.endswith(f"/sweet-home/{device_id}/$state ready")}
        # each unit logged in with its own account: three usernames, none the shared test account
        assert len(users) == 3 and shared not in users
    finally:
        accounts.delete(probe_account)
        sub.terminate()
        sub.wait(5)
        reader.join(5)


@pytest.mark.parametrize("fault,value,level,expect", [
    ("pairing", "down", "healthcheck", "no answer from the pairing server"),
    ("pairing", "error", "healthcheck", "/healthcheck answered 500"),
    ("pairing", "hang", "healthcheck", "did not answer within 6 s"),
    ("mqtt_refused", True, "pair", "the broker refused this device's login (not authorized"),
    ("panic_after", 1.2, "healthcheck", "the firmware crashed after boot (Guru Meditation Error"),
])
def test_faults_fail_the_smoke_step_while_others_pass(pair_env, mosquitto, capsys, fault, value, level, expect):
    # the smoke timeout bounds the wait for the board's address too (a loaded host once printed a board's
    # address more than 2 s after its boot check): short only where the hang makes the test wait it out
    smoke_config(pair_env, mosquitto, timeout=6 if value == "hang" else 15)
    with VirtualBench(3, "esp32", run_dir=pair_env / "run") as bench:
        for s in bench.slots:
            s.device.mqtt_retry_s = 0.3
        victim = bench[1]
        victim.device.set_fault(fault, value)
        rc, res = flash(capsys, bench, "--smoke", level)
        assert rc == 1
        assert [res[s.url]["outcome"] for s in bench.slots] == ["passed", "failed", "passed"]
        bad = res[victim.url]
        assert bad["failed_step"] == "smoke", bad
        assert expect in bad["error"], bad["error"]


def test_wrong_key_name_profile_is_refused_before_flashing(station_env, capsys):
    # the firmware would reject it at boot ("config error: unknown key(s) 'tokn'"): its manifest says so first
    p = station_env / "profiles/relay/profile.toml"
    p.write_text(p.read_text().replace('key = "token"', 'key = "tokn"'))
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, res = flash(capsys, bench)
        assert rc == 2 and res == {}
        assert bench[0].device.flash.read(0x10000, 16) == b"\xff" * 16
    rc, _, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 2 and "config.keys[1] (tokn): the firmware does not read 'tokn'" in err


def make_profile(env: Path, device_class: str, keys: bool = True, smoke: str = "healthcheck") -> str:
    """A profile for a device of another class, with firmware that declares that class."""
    d = env / "profiles" / device_class
    (d / "fw").mkdir(parents=True)
    fw = build_firmware("esp32", project=device_class, version="2.0.0", app_size=120_000,
                        manifest=twosmart_manifest(device_class, title=f"2Smart {device_class}"))
    regions = []
    for name, off, data in (("bootloader", 0x1000, fw.bootloader), ("partition-table", 0x8000, fw.partition_table),
                            ("app", 0x10000, fw.app)):
        (d / "fw" / f"{name}.bin").write_bytes(data)
        regions.append(f'{{ name = "{name}", offset = "{hex(off)}", file = "fw/{name}.bin", '
                       f'sha256 = "{hashlib.sha256(data).hexdigest()}" }}')
    text = (f'name = "{device_class}"\ntitle = "2Smart {device_class}"\nchip = "esp32"\n'
            f'device_class = "{device_class}"\n\n[firmware]\nregions = [\n  ' + ",\n  ".join(regions) + "\n]\n")
    if keys:
        text += ('\n[config]\npartition = "config"\nnamespace = "2smart"\n'
                 '[[config.keys]]\nkey = "email"\ntype = "string"\nmax_length = 64\nvalue = "v@example.com"\n'
                 '[[config.keys]]\nkey = "device_id"\ntype = "string"\nmax_length = 32\nunit = "device_id"\n')
    text += f'\n[checks]\nboot = true\nsmoke = "{smoke}"\n'
    (d / "profile.toml").write_text(text)
    return device_class


def test_no_wifi_device_pairs_without_wifi_keys(pair_env, capsys):
    name = make_profile(pair_env, "no-wifi", smoke="pair")
    with VirtualBench(1, "esp32", run_dir=pair_env / "run") as bench:
        rc, res = flash(capsys, bench, "--profile", name)
        assert rc == 0, res
        assert "eth: link up" in bench[0].device.console_text()
    p = pair_env / "profiles/no-wifi/profile.toml"
    p.write_text(p.read_text().replace('[checks]', '[[config.keys]]\nkey = "ssid"\ntype = "string"\n'
                                       'max_length = 32\nvalue = "x"\n\n[checks]'))
    rc, out, err = run_station(capsys, "profile", "check", "no-wifi")
    assert rc == 2 and "No-Wi-Fi devices never get Wi-Fi keys" in err


def test_other_device_gets_no_config_and_no_smoke(station_env, capsys):
    name = make_profile(station_env, "other", keys=False, smoke="pair")
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, res = flash(capsys, bench, "--profile", name)
        r = res[bench[0].url]
        assert rc == 0 and "smoke" not in r["durations"] and "config" not in r["written_regions"]
        assert bench[0].device.state()["app_mode"] == "hub"


def test_wifi_reach_through_nmcli_seam(tmp_path, monkeypatch):
    """The Wi-Fi path cannot run here: a fake nmcli on PATH records what the station asks."""
    log = tmp_path / "nmcli.log"
    fake = tmp_path / "bin" / "nmcli"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nsleep 0.2\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    settings = SmokeDefaults(reach="wifi", wifi_interface="wlx-test", timeout_s=5)
    boot = parse_boot_log('I (301) wifi_ap: access point "2Smart Relay AP" started\nAP IP address: 192.168.4.1\n')
    macs = [bytes.fromhex("240ac41234ff"), bytes.fromhex("240ac4123500")]
    spans = []  # from joined to leaving: inside the interface's lock, so they may never overlap

    def join(mac: bytes) -> None:
        reach = WifiReach(settings)
        assert reach.open(boot, mac, None) == "http://192.168.4.1"
        joined = time.monotonic()
        time.sleep(0.1)  # the smoke test's work on the AP: a window in which a second join would show
        left = time.monotonic()
        reach.close()
        spans.append((joined, left))

    threads = [threading.Thread(target=join, args=(m,)) for m in macs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = log.read_text().splitlines()
    connects = [l for l in lines if " wifi connect " in l]
    assert len(connects) == 2
    assert "wifi connect 2Smart Relay AP bssid 24:0a:c4:12:35:00 ifname wlx-test" in lines[0] + "".join(connects)
    assert any("bssid 24:0a:c4:12:35:01 ifname wlx-test" in l for l in connects)  # carry into the next byte
    assert lines[1].startswith("connection down id 2Smart Relay AP")  # one join at a time per interface
    assert [("wifi connect" in l, "connection down" in l) for l in lines] == [(True, False), (False, True)] * 2
    first, second = sorted(spans)
    assert len(spans) == 2 and first[1] <= second[0]
    assert soft_ap_bssid(bytes.fromhex("ffffffffffff")) == "00:00:00:00:00:00"


def test_a_pairing_server_that_listens_after_the_address_is_logged_is_asked_again_not_failed():
    """ESP-IDF logs the address before httpd listens: a refused first connection is the firmware
    starting, retried until the smoke timeout; a server that never listens still fails the unit."""
    import socket

    from station.smoke import NotListening, SmokeFailure, healthcheck

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = sock.getsockname()[1]
    answered = threading.Event()

    def serve() -> None:
        sock.listen(1)
        sock.settimeout(25)  # the check gives up at 30 s: this thread never outlives the test
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        answered.set()

    late = threading.Timer(0.5, serve)  # the server comes up half a second after the address is known
    late.start()
    try:
        healthcheck(f"http://127.0.0.1:{port}", 30.0)
        assert answered.is_set()
    finally:
        late.join(35)
        sock.close()

    never = socket.socket()
    never.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(NotListening, match="no answer from the pairing server") as failed:
            healthcheck(f"http://127.0.0.1:{never.getsockname()[1]}", 0.5)
        assert isinstance(failed.value, SmokeFailure)  # the unit fails at smoke, as before
        with pytest.raises(NotListening):  # an abort stops the retries at once
            healthcheck(f"http://127.0.0.1:{never.getsockname()[1]}", 600.0, cancelled=lambda: True)
    finally:
        never.close()
