"""Bad input never crashes the station: each case names the unit, the step and the remedy."""

from __future__ import annotations

import hashlib
import re

from esptool import cmds

from flashing.firmware import build_firmware
from flashing.images import Partition, build_partition_table
from flashing.virtual.bench import VirtualBench
from station.record import Record
from tests.station.conftest import json_lines, run_station


def finished(out: str) -> dict[str, dict]:
    return {e["port"]: e for e in json_lines(out) if e["event"] == "unit_finished"}


def edit_profile(env, old: str, new: str) -> None:
    p = env / "profiles/relay/profile.toml"
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))


def assert_refused(capsys, env, *fragments: str):
    with VirtualBench(1, "esp32", run_dir=env / "run") as bench:
        rc, out, err = run_station(capsys, "flash", "--port", bench[0].url, "--json")
        assert rc == 2, err
        assert out == ""  # nothing flashed, no unit events
        assert "nothing was flashed" in err
        for frag in fragments:
            assert re.search(frag, err), err
        assert bench[0].device.flash.read(0x10000, 4096) == b"\xff" * 4096


def test_wrong_chip_fails_that_unit_only(station_env, capsys):
    with VirtualBench(1, "esp32", run_dir=station_env / "r1") as good, \
            VirtualBench(1, "esp32c3", run_dir=station_env / "r2") as wrong:
        rc, out, _ = run_station(capsys, "flash", "--port", good[0].url, "--port", wrong[0].url, "--json")
        assert rc == 1
        res = finished(out)
        assert res[good[0].url]["outcome"] == "passed"
        bad = res[wrong[0].url]
        assert bad["failed_step"] == "connect"
        assert "wrong chip: found ESP32-C3, the profile is for ESP32" in bad["error"]
        assert "right product" in bad["remedy"]
        rows = Record(station_env / "station.db").attempts()
        assert {(r["port"], r["outcome"], r["failed_step"]) for r in rows} == {
            (good[0].url, "passed", None), (wrong[0].url, "failed", "connect")}


def test_firmware_hash_mismatch(station_env, capsys):
    app = station_env / "profiles/relay/firmware/relay.bin"
    data = bytearray(app.read_bytes())
    data[100] ^= 1
    app.write_bytes(bytes(data))
    assert_refused(capsys, station_env, r"relay\.bin: firmware region 0x10000: SHA-256 .* does not match")


def test_image_too_big_for_its_partition(station_env, capsys):
    parts = [Partition("nvs", 1, 2, 0x9000, 0x5000), Partition("phy_init", 1, 1, 0xE000, 0x1000),
             Partition("factory", 0, 0, 0x10000, 0x80000), Partition("config", 1, 2, 0x90000, 0x6000)]
    table = build_partition_table(parts)
    path = station_env / "profiles/relay/firmware/partition-table.bin"
    old_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(table)
    edit_profile(station_env, old_sha, hashlib.sha256(table).hexdigest())
    assert_refused(capsys, station_env, r"firmware region 0x10000: \d+ bytes do not fit partition 'factory'")


def test_key_longer_than_15_bytes(station_env, capsys):
    edit_profile(station_env, 'key = "product_id"', 'key = "product_identifier"')
    assert_refused(capsys, station_env, r"config\.keys\[4\] \(product_identifier\): .* at most 15")


def test_value_over_its_max_length(station_env, capsys, monkeypatch):
    edit_profile(station_env, 'value = "relay-1"', 'value = "' + "r" * 40 + '"')
    assert_refused(capsys, station_env, r"config\.keys\[4\] \(product_id\): value is 40 bytes; max_length is 32")
    monkeypatch.setenv("RELAY_VENDOR_TOKEN", "x" * 11)  # the SDK keeps 10 characters of token
    assert_refused(capsys, station_env, r"secrets\.vendor_token: 11 bytes; key 'token' holds at most 10")


def test_unresolvable_secret(station_env, capsys, monkeypatch):
    monkeypatch.delenv("RELAY_VENDOR_TOKEN")
    assert_refused(capsys, station_env, r"secrets\.vendor_token: not set: put it in the environment "
                                        r"variable RELAY_VENDOR_TOKEN")


def test_unplug_mid_write_fails_that_unit_only(station_env, capsys):
    with VirtualBench(3, "esp32", run_dir=station_env / "run") as bench:
        victim = bench[1]
        victim.device.set_fault("unplug_after", 300_000)
        rc, out, _ = run_station(capsys, "flash", *sum((["--port", s.url] for s in bench.slots), []), "--json")
        assert rc == 1
        res = finished(out)
        assert [res[s.url]["outcome"] for s in bench.slots] == ["passed", "failed", "passed"]
        bad = res[victim.url]
        assert bad["failed_step"] == "flash" and "unplugged" in bad["error"]
        assert bad["mac"] == victim.device.mac_text and "reseat" in bad["remedy"]
        rows = {r["port"]: r for r in Record(station_env / "station.db").attempts()}
        assert rows[victim.url]["failed_step"] == "flash" and rows[victim.url]["mac"] == victim.device.mac_text


def test_board_that_never_syncs(station_env, capsys):
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        quiet = bench[0]
        esp = cmds.run_stub(cmds.detect_chip(quiet.url, connect_mode="no-reset"))
        cmds.attach_flash(esp)
        cmds.write_flash(esp, build_firmware("esp32", app_size=50_000).regions())
        esp._port.close()
        quiet.device.set_fault("no_answer")
        quiet.device.reset("app")
        rc, out, _ = run_station(capsys, "flash", "--port", quiet.url, "--port", bench[1].url, "--json")
        assert rc == 1
        res = finished(out)
        assert res[bench[1].url]["outcome"] == "passed"
        bad = res[quiet.url]
        assert bad["failed_step"] == "connect"
        assert bad["error"] == f"no device answered on {quiet.url}"
        assert "download mode" in bad["remedy"]


def test_board_that_boots_its_app_instead_of_download_mode(station_env, capsys):
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        bench[0].device.set_fault("no_download_mode")
        rc, out, _ = run_station(capsys, "flash", "--port", bench[0].url, "--json")
        assert rc == 1
        bad = finished(out)[bench[0].url]
        assert bad["failed_step"] == "connect" and "instead of download mode" in bad["error"]
        assert "BOOT/IO0" in bad["remedy"]


def test_locked_database_fails_the_unit_before_flashing_and_spools_the_result(station_env, capsys):
    import sqlite3

    from station.config import StationConfig
    from station.runner import open_record

    Record(station_env / "station.db").close()
    holder = sqlite3.connect(station_env / "station.db")
    holder.execute("BEGIN EXCLUSIVE")
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, out, _ = run_station(capsys, "flash", "--port", bench[0].url, "--json")
        # the write-ahead commit failed: nothing was written to the board
        assert set(bench[0].device.flash.read(0, 0x400000)) == {0xFF}
    res = finished(out)[bench[0].url]
    assert rc == 3 and res["outcome"] == "error" and res["failed_step"] == "serial"
    assert "database is locked" in res["error"] and "close the other program" in res["remedy"]
    assert "spool" in res["note"]
    holder.rollback()
    holder.close()
    record = open_record(StationConfig.load(station_env / "station.toml"))  # replays the spool on open
    rows = record.attempts()
    assert len(rows) == 1 and rows[0]["failed_step"] == "serial" and rows[0]["outcome"] == "error"
    assert not record.spool.exists() and record.replayed == 1
    assert record.verify_chain() == []
