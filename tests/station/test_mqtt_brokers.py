"""The station's monitor and the virtual firmware (both paho-mqtt) through amqtt and Mosquitto alike, and over TLS.

The same pairing runs against the demo's embedded amqtt broker and a real Mosquitto with
its dynamic-security plugin; the demo broker keeps Mosquitto's account rules; with
`broker_tls` the station checks the broker's certificate against station.toml's CA file
(a CA made at test time) and the device logs in on the mqtts port.
"""

from __future__ import annotations

import json

import pytest

from flashing.mqtt_client import Message, MqttClient
from flashing.virtual.bench import VirtualBench
from station.demo_broker import DYNSEC, DemoBroker
from station.record import Record
from tests.conftest import ADMIN_PASSWORD, ADMIN_USER, MONITOR_PASSWORD, MONITOR_USER, Broker, make_test_ca, wait_until
from tests.station.test_credentials import accounts_for
from tests.station.test_smoke import flash, smoke_config


@pytest.fixture
def amqtt_broker():
    broker = DemoBroker(accounts={MONITOR_USER: MONITOR_PASSWORD}, admin=(ADMIN_USER, ADMIN_PASSWORD),
                        monitor=MONITOR_USER)
    yield Broker(broker.host, broker.port)
    broker.close()


@pytest.fixture
def secrets_env(monkeypatch):
    monkeypatch.setenv("STATION_MONITOR_PASSWORD", MONITOR_PASSWORD)
    monkeypatch.setenv("STATION_BROKER_ADMIN_PASSWORD", ADMIN_PASSWORD)


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
def test_the_monitor_and_the_firmware_pair_through(kind, request, station_env, secrets_env, capsys):
    broker = request.getfixturevalue("amqtt_broker" if kind == "amqtt" else "mosquitto")
    smoke_config(station_env, broker)
    heard: list[Message] = []
    watcher = MqttClient(broker.host, broker.port, f"test-watcher-{kind}", MONITOR_USER, MONITOR_PASSWORD)
    assert watcher.connect() is None
    try:
        watcher.subscribe("+/sweet-home/+/$state", heard.append)
        with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
            rc, res = flash(capsys, bench, "--smoke", "pair")
            assert (rc, res[bench[0].url]["outcome"]) == (0, "passed"), res
            device_id = bench[0].device.mac_text.replace(":", "-")
        # an independent subscriber heard the device's live `ready` under a per-unit username
        wait_until(lambda: any(m.topic.endswith(f"/sweet-home/{device_id}/$state") and m.payload == b"ready"
                          for m in heard), f"no $state ready from {device_id}: {heard}")
    finally:
        watcher.close()


def test_the_demo_broker_keeps_mosquittos_account_rules(amqtt_broker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    accounts = accounts_for(amqtt_broker)
    unit = accounts.create("24-0a-c4-00-00-0c")
    heard: list[tuple[str, bytes]] = []
    monitor = MqttClient(amqtt_broker.host, amqtt_broker.port, "t-monitor", MONITOR_USER, MONITOR_PASSWORD)
    device = MqttClient(amqtt_broker.host, amqtt_broker.port, "t-device", unit.username, unit.token)
    intruder = MqttClient(amqtt_broker.host, amqtt_broker.port, "t-intruder", unit.username, "wrong")
    try:
        assert monitor.connect() is None
        monitor.subscribe("#", lambda m: heard.append((m.topic, m.payload)))
        assert intruder.connect() == "not authorized"
        assert device.connect() is None
        device.publish(f"{unit.username}/sweet-home/other-device/$state", "ready")  # outside its role: dropped
        device.publish(DYNSEC, json.dumps({"commands": [{"command": "deleteRole", "rolename": unit.role}]}))
        device.publish(f"{unit.topic}/$state", "ready")  # its own topic, and ordered after the others
        wait_until(lambda: heard, "the device's own publish never arrived")
        assert heard == [(f"{unit.topic}/$state", b"ready")]
        accounts.delete(unit)  # the role was still there: a non-admin's command did nothing
        assert device.wait_closed(5), "a deleted client stays connected"
        assert heard == [(f"{unit.topic}/$state", b"ready")]
    finally:
        for c in (device, intruder, monitor):
            c.close()
    late = MqttClient(amqtt_broker.host, amqtt_broker.port, "t-late", unit.username, unit.token)
    assert late.connect() == "not authorized"
    assert list(tmp_path.iterdir()) == []  # no files left behind


def test_an_account_of_the_demo_broker_may_use_its_own_tree_only(tmp_path):
    broker = DemoBroker(accounts={"plain": "pw", MONITOR_USER: MONITOR_PASSWORD}, monitor=MONITOR_USER)
    heard: list[str] = []
    plain = MqttClient(broker.host, broker.port, "t-plain", "plain", "pw")
    monitor = MqttClient(broker.host, broker.port, "t-mon", MONITOR_USER, MONITOR_PASSWORD)
    try:
        assert monitor.connect() is None and plain.connect() is None
        monitor.subscribe("#", lambda m: heard.append(m.topic))
        plain.subscribe("plain/#", lambda m: None)  # `pattern readwrite %u/#`
        with pytest.raises(Exception, match="refused the subscription"):
            plain.subscribe("other/#", lambda m: None)
        plain.publish("other/x", "1")
        plain.publish("plain/x", "2")
        wait_until(lambda: heard, "plain/x never arrived")
        assert heard == ["plain/x"]
    finally:
        plain.close()
        monitor.close()
        broker.close()


def tls_config(env, broker, ca_file, timeout: float = 5) -> None:
    smoke_config(env, broker, timeout=timeout, extra=f'broker_tls = true\nbroker_ca_file = "{ca_file}"\n')


def test_pairing_over_tls(mosquitto_tls, station_env, secrets_env, capsys):
    tls_config(station_env, mosquitto_tls, mosquitto_tls.ca.ca_file)
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        bench[0].device.broker_ca_file = str(mosquitto_tls.ca.ca_file)  # the CA its firmware was built with
        rc, res = flash(capsys, bench, "--smoke", "pair")
        # the broker's only listener is TLS: the monitor and the device both reached it over TLS
        assert (rc, res[bench[0].url]["outcome"]) == (0, "passed"), res


def test_a_broker_certificate_from_another_ca_is_the_stations_error(mosquitto_tls, station_env, secrets_env,
                                                                    capsys, tmp_path):
    other = make_test_ca(tmp_path / "other", "Someone Else's CA")
    tls_config(station_env, mosquitto_tls, other.ca_file)
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, res = flash(capsys, bench, "--smoke", "pair")
        r = res[bench[0].url]
        assert (r["outcome"], r["failed_step"]) == ("error", "smoke"), r
        assert "presented a certificate the station does not trust" in r["error"], r["error"]
        assert "broker_ca_file" in r["remedy"], r


def test_a_device_that_does_not_trust_the_broker_never_reports_ready(mosquitto_tls, station_env, secrets_env,
                                                                     capsys, tmp_path):
    tls_config(station_env, mosquitto_tls, mosquitto_tls.ca.ca_file, timeout=3)
    other = make_test_ca(tmp_path / "other", "Someone Else's CA")
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        bench[0].device.broker_ca_file = str(other.ca_file)
        bench[0].device.mqtt_retry_s = 0.3
        rc, res = flash(capsys, bench, "--smoke", "pair")
        r = res[bench[0].url]
        assert (r["outcome"], r["failed_step"]) == ("failed", "smoke"), r
        assert "did not report $state = ready" in r["error"], r["error"]
    record = Record(station_env / "station.db")
    try:
        detail = record.attempts()[0]["detail"]  # what the board printed while the station waited
    finally:
        record.close()
    assert "cannot reach broker" in detail and "certificate verify failed" in detail, detail
