"""`{station}` in a serial pattern: the station's id in every serial, its own counter, checked on the station."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest

from flashing.nvs import read_partition
from flashing.virtual.bench import VirtualBench
from station.config import StationConfig
from station.pipeline import StationContext, UnitJob, provision_unit
from station.profile import load_profile, resolve_secrets
from station.record import Record, station_key
from station.runner import open_record
from station.serials import SerialPattern, SerialPatternError
from tests.station.conftest import json_lines, run_station

PATTERN = 'pattern = "RLY-{yymmdd}-{seq:05}"'


def use_pattern(env: Path, pattern: str) -> None:
    p = env / "profiles/relay/profile.toml"
    p.write_text(p.read_text().replace(PATTERN, f'pattern = "{pattern}"', 1))


def set_station_id(env: Path, station_id: str) -> None:
    cfg = env / "station.toml"
    cfg.write_text(re.sub(r'(?m)^station_id = ".*"$', f'station_id = "{station_id}"', cfg.read_text(), count=1))


def pairs_in_record(env: Path, query: str) -> dict:
    record = Record(env / "station.db")
    try:
        return dict(record.db().execute(query).fetchall())
    finally:
        record.close()


def flash_one(capsys, port: str) -> tuple[int, dict | None, str]:
    rc, out, err = run_station(capsys, "flash", "--profile", "relay", "--port", port, "--json")
    done = [e for e in json_lines(out) if e["event"] == "unit_finished"]
    return rc, done[0] if done else None, err


def test_the_pattern_renders_the_station_id_and_counts_per_station():
    when = datetime(2026, 3, 9)
    p = SerialPattern.parse("RLY-{station}-{yymmdd}-{seq:05}")
    assert p.render(42, when, "line-7") == "RLY-line-7-260309-00042"
    assert p.counter_name(when, "line-7") == "RLY-line-7-260309-" != p.counter_name(when, "line-8")
    assert p.longest("line-7") == "RLY-line-7-991231-99999"
    after = SerialPattern.parse("RLY-{seq:05}-{station}")  # after {seq}: one counter, the suffix tells them apart
    assert after.counter_name(when, "line-7") == after.counter_name(when, "line-8") == "RLY-"
    with pytest.raises(SerialPatternError, match=r"\{station:5\}: \{station\} takes no format spec"):
        SerialPattern.parse("RLY-{station:5}-{seq}")
    with pytest.raises(SerialPatternError, match=r"it renders only with a station's id"):
        p.render(1, when)
    for bad in ("line 7", "line-7\x1b[2J", "line\u202e7", ""):
        with pytest.raises(SerialPatternError, match=r"cannot go into a serial through \{station\}"):
            p.render(1, when, bad)


def test_a_unit_gets_a_serial_with_the_station_id(station_env, capsys):
    use_pattern(station_env, "RLY-{station}-{seq:05}")
    profile = load_profile(station_env / "profiles/relay")
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, done, err = flash_one(capsys, bench[0].url)
        assert rc == 0 and done["outcome"] == "passed", err
        assert done["serial"] == "RLY-test-station-00001"
        slot = profile.config_slot()  # the board carries it, not only the record
        nvs = read_partition(bench[0].device.flash.read(slot.offset, slot.size))["2smart"]
        assert nvs["serial"] == "RLY-test-station-00001"
    assert pairs_in_record(station_env, "select mac, serial from units") == {bench[0].device.mac_text:
                                                                         "RLY-test-station-00001"}


def test_two_stations_count_separately(station_env, capsys):
    """One database, two station ids: each starts its own counter at 1 (without {station} they would share one)."""
    use_pattern(station_env, "RLY-{station}-{seq:05}")
    with VirtualBench(3, "esp32", run_dir=station_env / "run") as bench:
        serials = []
        for slot, station_id in zip(bench.slots, ("line-1", "line-2", "line-1")):
            set_station_id(station_env, station_id)
            rc, done, err = flash_one(capsys, slot.url)
            assert rc == 0, err
            serials.append(done["serial"])
    assert serials == ["RLY-line-1-00001", "RLY-line-2-00001", "RLY-line-1-00002"]
    counters = pairs_in_record(station_env, "select name, value from counters")
    assert counters == {"relay:RLY-line-1-": 2, "relay:RLY-line-2-": 1}


def test_profile_check_shows_the_serial_as_this_station_renders_it(station_env, capsys):
    use_pattern(station_env, "RLY-{station}-{seq:05}")
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 0, err
    assert "serials today on station 'test-station': 'RLY-test-station-00001' to 'RLY-test-station-99999' " \
           "(pattern 'RLY-{station}-{seq:05}')" in out


@pytest.mark.parametrize("station_id, why", [
    ("line-7-building-north-east-hall", r"serial\.pattern: gives serials up to 41 bytes "
     r"\('RLY-line-7-building-north-east-hall-99999' at the counter's maximum 99999 on station "
     r"'line-7-building-north-east-hall', station\.toml station_id, 31 bytes\); config\.keys\[5\] \(serial\) "
     r"holds at most 32: shorten the station id or the pattern"),
    ("line 7", r"serial\.pattern: station id 'line 7' \(station\.toml station_id\) cannot go into a serial "
     r"through \{station\}: a serial has no spaces or control characters"),
], ids=["too-long", "with-a-space"])
def test_a_station_whose_id_does_not_fit_the_serial_is_refused_before_any_board(station_env, capsys, station_id,
                                                                                 why):
    use_pattern(station_env, "RLY-{station}-{seq:05}")
    set_station_id(station_env, station_id)
    rc, _, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 2 and re.search(why, err), err
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, done, err = flash_one(capsys, bench[0].url)
        assert rc == 2 and done is None and re.search(why, err), err
        assert bench[0].device.state()["bytes_in"] == 0  # refused when the run opened: not a byte to the board


def test_the_python_api_refuses_it_at_the_serial_step_without_touching_the_board(station_env):
    """A context made without open_station (no profile check): the serial step stops it, as the station's fault."""
    use_pattern(station_env, "RLY-{station}-{seq:05}")
    set_station_id(station_env, "line 7")
    station = StationConfig.load(station_env / "station.toml")
    profile = load_profile(station_env / "profiles/relay")
    values, _ = resolve_secrets(profile)
    key = station_key(station.key_file)
    ctx = StationContext(station, profile, values, open_record(station, None, key), key)
    try:
        with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
            result = provision_unit(UnitJob(bench[0].url), ctx, lambda e: None)
            assert (result.outcome, result.failed_step) == ("error", "serial"), result
            assert "station id 'line 7'" in result.error and "station.toml's station_id" in result.remedy
            assert bench[0].device.flash.read(0x10000, 16) == b"\xff" * 16  # nothing written
    finally:
        ctx.close()
