"""No test credentials left behind, and one unit's test account cannot speak for another.

Against virtual boards and a real Mosquitto with its dynamic-security plugin: a unit that
fails after `/pair` (login refused, a crash during the soak, an abort while the station
waits for it) ends with its own configuration in flash, read back from the board; a unit
pulled out then is recorded quarantined, and its next run rewrites its configuration and
clears it. Each unit pairs with its own broker account, and a second publisher holding
another unit's credentials cannot make a failing unit pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import threading

import pytest

from flashing.mqtt_client import Message, MqttClient, MqttError
from flashing.nvs import read_partition
from flashing.virtual.bench import VirtualBench
from station.config import SmokeDefaults
from station.line import RunCancel
from station.pipeline import UnitJob, provision_unit
from station.profile import load_profile
from station.record import Record
from station.runner import open_station
from station.smoke import DYNSEC, FactoryAccounts, SmokeFailure, UnitAccounts, pair_and_wait
from tests.conftest import ADMIN_PASSWORD, MONITOR_PASSWORD, TEST_EMAIL, wait_until
from tests.station.conftest import TOKEN
from tests.station.test_smoke import smoke_config

VENDOR_EMAIL = "vendor@example.com"  # the relay profile's own email


@pytest.fixture
def pair_env(station_env, mosquitto, monkeypatch):
    monkeypatch.setenv("STATION_MONITOR_PASSWORD", MONITOR_PASSWORD)
    monkeypatch.setenv("STATION_BROKER_ADMIN_PASSWORD", ADMIN_PASSWORD)
    smoke_config(station_env, mosquitto, timeout=10)  # the waits here end by the fault, an abort or a pull
    return station_env


def accounts_for(broker, timeout: float = 5) -> UnitAccounts:
    settings = SmokeDefaults(broker_host=broker.host, broker_port=broker.port, test_email=TEST_EMAIL,
                             timeout_s=timeout)
    return UnitAccounts(settings, FactoryAccounts("factory-test", "", TEST_EMAIL, broker.monitor_user,
                                                  broker.monitor_password, broker.admin_user, broker.admin_password))


def broker_clients(broker) -> set[str]:
    """The usernames the broker's dynamic-security plugin knows (asked as the admin)."""
    got, done = [], threading.Event()

    def on(msg: Message) -> None:
        got.append(json.loads(msg.payload))
        done.set()

    admin = MqttClient(broker.host, broker.port, f"test-admin-{secrets.token_hex(4)}", broker.admin_user,
                       broker.admin_password)
    assert admin.connect() is None
    try:
        admin.subscribe(f"{DYNSEC}/response", on)
        admin.publish(DYNSEC, json.dumps({"commands": [{"command": "listClients", "verbose": False}]}))
        assert done.wait(5), "no answer to listClients"
    finally:
        admin.close()
    return set(got[0]["responses"][0]["data"]["clients"])


def config_on_board(device, profile) -> tuple[bytes, dict]:
    slot = profile.config_slot()
    image = device.flash.read(slot.offset, slot.size)
    return image, read_partition(image).get(profile.namespace, {})


def run_one(env, url: str, cancel=None, on_event=None, smoke: str | None = None):
    ctx = open_station("relay", env / "station.toml", smoke=smoke)
    events = []

    def emit(e) -> None:
        events.append(e)
        if on_event:
            on_event(e)

    try:
        result = provision_unit(UnitJob(url), ctx, emit, cancel)
        row = ctx.record.attempts(1)[0]
    finally:
        ctx.close()
    return result, row, events


def assert_own_config(env, device, row) -> None:
    """What the board's flash holds is the unit's own configuration, as the record has it."""
    image, values = config_on_board(device, load_profile(env / "profiles/relay"))
    assert hashlib.sha256(image).hexdigest() == row["config_sha256"]
    assert values["email"] == VENDOR_EMAIL and values["token"] == TOKEN and "ssid" not in values


class _DropsTheDevicesPublishes(UnitAccounts):
    """A broker that lets the device log in but drops what it publishes (its role names another topic)."""

    def create(self, device_id: str):
        made = super().create("not-" + device_id)
        return type(made)(made.email, made.token, device_id)

    def delete(self, unit):
        super().delete(type(unit)(unit.email, unit.token, "not-" + unit.device_id))


@pytest.mark.parametrize("fault", ["mqtt_refused", "panic_after"])
def test_a_unit_failing_after_pair_ends_with_its_own_config(pair_env, mosquitto, fault):
    before = broker_clients(mosquitto)
    toml = pair_env / "profiles/relay/profile.toml"
    toml.write_text(toml.read_text().replace('smoke = "healthcheck"', 'smoke = "healthcheck"\nsmoke_soak_s = 4'))
    with VirtualBench(1, "esp32", run_dir=pair_env / "run") as bench:
        dev = bench[0].device
        dev.mqtt_retry_s = 0.3

        def on_event(e) -> None:
            # the crash comes 1.5 s into the boot after /pair, after `ready`, in the 4 s soak:
            # set once the first boot check passed
            if fault == "panic_after" and type(e).__name__ == "StepStarted" and e.step == "smoke":
                dev.set_fault("panic_after", 1.5)

        if fault == "mqtt_refused":
            dev.set_fault("mqtt_refused")
        result, row, _ = run_one(pair_env, bench[0].url, on_event=on_event, smoke="pair")
        assert (result.outcome, result.failed_step) == ("failed", "smoke"), result
        assert ("refused this device's login" if fault == "mqtt_refused" else "crashed after boot") in result.error
        assert not result.quarantine and row["quarantine"] == 0
        dev.clear_faults()
        assert_own_config(pair_env, dev, row)
    assert broker_clients(mosquitto) == before  # its account is gone


def test_an_abort_while_waiting_for_the_device_restores_its_config(pair_env, mosquitto, monkeypatch):
    before = broker_clients(mosquitto)
    monkeypatch.setattr("station.pipeline.UnitAccounts", _DropsTheDevicesPublishes)
    with VirtualBench(1, "esp32", run_dir=pair_env / "run") as bench:
        dev = bench[0].device
        cancel = threading.Event()

        def operator() -> None:  # F8 once the unit rebooted onto the test Wi-Fi and broker
            wait_until(lambda: dev.state()["app_mode"] == "network", "the unit paired")
            cancel.set()

        t = threading.Thread(target=operator)
        t.start()
        try:
            result, row, _ = run_one(pair_env, bench[0].url, cancel, smoke="pair")
        finally:
            cancel.set()
            t.join()
        assert (result.outcome, result.failed_step) == ("aborted", "smoke"), result
        assert not result.quarantine and row["quarantine"] == 0
        assert_own_config(pair_env, dev, row)  # the port the abort closed was opened again to restore it
    assert broker_clients(mosquitto) == before


def test_a_board_pulled_after_pair_is_quarantined_until_its_next_run(pair_env, mosquitto, monkeypatch):
    # the pull ends the wait for `ready`: a smoke timeout far away, so a loaded host cannot end it first
    smoke_config(pair_env, mosquitto, timeout=60)
    before = broker_clients(mosquitto)
    monkeypatch.setattr("station.pipeline.UnitAccounts", _DropsTheDevicesPublishes)
    with VirtualBench(1, "esp32", run_dir=pair_env / "run") as bench:
        dev, url = bench[0].device, bench[0].url
        profile = load_profile(pair_env / "profiles/relay")

        def pull() -> None:
            wait_until(lambda: dev.state()["app_mode"] == "network", "the unit paired")
            dev.unplug()

        t = threading.Thread(target=pull)
        t.start()
        try:
            result, row, _ = run_one(pair_env, url, RunCancel(url), smoke="pair")  # the screen's cancel
        finally:
            t.join()
        assert result.outcome == "aborted", (result.failed_step, result.error)
        assert result.quarantine and row["quarantine"] == 1
        assert "the board was pulled out mid-run" in row["error"]
        assert "test credentials left on unit: quarantine" in row["error"]
        _, values = config_on_board(dev, profile)
        assert values["email"] != VENDOR_EMAIL and values["email"].startswith("factory-test+")  # truly left
        assert broker_clients(mosquitto) == before  # but dead

        dev.replug()
        monkeypatch.setattr("station.pipeline.UnitAccounts", UnitAccounts)
        again, row2, events = run_one(pair_env, url, smoke="healthcheck")
        assert again.outcome == "passed" and not again.quarantine and row2["quarantine"] == 0
        assert "config" in again.written_regions
        assert any("an earlier attempt left test credentials" in getattr(e, "text", "") for e in events)
        assert_own_config(pair_env, dev, row2)


def test_each_unit_pairs_with_its_own_account(pair_env, mosquitto, capsys):
    from tests.station.conftest import run_station

    before = broker_clients(mosquitto)
    with VirtualBench(2, "esp32", run_dir=pair_env / "run") as bench:
        seen: dict[str, set[str]] = {}

        def on(msg: Message) -> None:
            if msg.payload == b"ready" and not msg.retain:
                seen.setdefault(msg.topic.split("/")[2], set()).add(msg.topic.split("/")[0])

        watcher = MqttClient(mosquitto.host, mosquitto.port, "test-watcher", mosquitto.monitor_user,
                             MONITOR_PASSWORD)
        assert watcher.connect() is None
        try:
            watcher.subscribe("+/sweet-home/+/$state", on)
            ports = sum((["--port", s.url] for s in bench.slots), [])
            rc = run_station(capsys, "flash", *ports, "--json", "--smoke", "pair")[0]
            assert rc == 0
        finally:
            watcher.close()
        ids = [s.device.mac_text.replace(":", "-") for s in bench.slots]
        users = [seen[i] for i in ids]
        assert all(len(u) == 1 for u in users) and users[0] != users[1]
        assert hashlib.sha256(TEST_EMAIL.encode()).hexdigest() not in users[0] | users[1]
        record = Record(pair_env / "station.db")
        rows = {r["mac"]: r for r in record.attempts()}
        record.close()
        for s in bench.slots:
            assert_own_config(pair_env, s.device, rows[s.device.mac_text.lower()])
    assert broker_clients(mosquitto) == before


def test_another_units_credentials_cannot_publish_for_it(mosquitto):
    accounts = accounts_for(mosquitto)
    a, b = accounts.create("24-0a-c4-00-00-0a"), accounts.create("24-0a-c4-00-00-0b")
    heard: list[tuple[str, bytes]] = []
    own = threading.Event()

    def on(msg: Message) -> None:
        heard.append((msg.topic, msg.payload))
        if msg.topic == f"{b.topic}/$state":
            own.set()

    monitor = MqttClient(mosquitto.host, mosquitto.port, "test-monitor", mosquitto.monitor_user, MONITOR_PASSWORD)
    spoofer = MqttClient(mosquitto.host, mosquitto.port, "test-spoofer", b.username, b.token)
    try:
        assert monitor.connect() is None
        for user in (a.username, b.username):  # fresh users: nothing retained under them
            monitor.subscribe(f"{user}/#", on)
        assert spoofer.connect() is None
        with pytest.raises(MqttError, match="refused the subscription"):  # SUBACK 0x80
            spoofer.subscribe(f"{a.topic}/#", lambda m: None, wait=5)
        for topic in (f"{a.topic}/$state", f"{b.username}/sweet-home/{a.device_id}/$state"):
            spoofer.publish(topic, "ready")
        spoofer.publish(f"{b.topic}/$state", "ready")  # its own topic: allowed, and ordered after the others
        assert own.wait(5), "the spoofer's own publish never arrived"
        assert heard == [(f"{b.topic}/$state", b"ready")]
    finally:
        spoofer.close()
        monitor.close()
        accounts.delete(a)
        accounts.delete(b)
    # deleted: the credentials no longer log in at all
    late = MqttClient(mosquitto.host, mosquitto.port, "test-late", b.username, b.token)
    try:
        assert late.connect() == "not authorized"
    finally:
        late.close()


def test_a_failing_unit_is_not_made_to_pass_by_another_units_publisher(pair_env, mosquitto, capsys):
    """Unit A never reaches the broker (login refused); B's live account publishes A's `$state ready`."""
    from tests.station.conftest import run_station

    with VirtualBench(1, "esp32", run_dir=pair_env / "run") as bench:
        dev = bench[0].device
        assert run_station(capsys, "flash", "--port", bench[0].url, "--smoke", "healthcheck")[0] == 0
        dev.set_fault("mqtt_refused")
        device_id = dev.mac_text.replace(":", "-")
        base = f"http://{dev.net_ip}:{dev.http_port}"
        accounts = accounts_for(mosquitto)
        settings = dataclasses.replace(accounts.settings, timeout_s=2)
        unit_a, unit_b = accounts.create(device_id), accounts.create("24-0a-c4-ff-ff-0b")
        stop = threading.Event()
        spoofed = threading.Event()
        spoofer = MqttClient(mosquitto.host, mosquitto.port, "test-spoofer-b", unit_b.username, unit_b.token)
        assert spoofer.connect() is None

        def spoof() -> None:
            while not stop.wait(0.05):
                for topic in (f"{unit_a.topic}/$state", f"{unit_b.username}/sweet-home/{device_id}/$state"):
                    spoofer.publish(topic, "ready")
                spoofed.set()

        t = threading.Thread(target=spoof)
        t.start()
        try:
            # the console is left unread, so only `ready` on the broker could end the wait early
            with pytest.raises(SmokeFailure, match="did not report .state = ready"):
                pair_and_wait(base, "wifi", device_id, settings, accounts.accounts, unit_a, lambda: "")
            assert spoofed.is_set()
        finally:
            stop.set()
            t.join()
            spoofer.close()
            accounts.delete(unit_a)
            accounts.delete(unit_b)
