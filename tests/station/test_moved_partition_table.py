"""A partition table away from 0x8000 (ESP-IDF's CONFIG_PARTITION_TABLE_OFFSET), as secure-boot builds need it.

The profile declares the table by where its `partition-table` region is written; an imported
IDF build by flasher_args.json's "partition-table" entry. Oracles outside the code under test:
the virtual board's own bootloader (it reads the table only where its image was built to),
the firmware reading its config from the partition that table names, and the flash itself.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib

import pytest

from flashing.firmware import build_firmware
from flashing.images import Partition
from flashing.virtual.bench import VirtualBench
from station.pipeline import load_firmware
from station.profile import ProfileError, load_profile
from tests.station.conftest import TOKEN, json_lines, pin_firmware, run_station

TABLE = 0xC000
PARTS = [Partition("nvs", 1, 2, 0xD000, 0x3000), Partition("factory", 0, 0, 0x10000, 0x180000),
         Partition("config", 1, 2, 0x190000, 0x6000)]


def moved_profile(env, table_at: int = TABLE, built_for: int = TABLE, parts=PARTS) -> None:
    """The relay profile with its partition table written at `table_at`, its bootloader built for `built_for`."""
    fw = build_firmware("esp32", project="relay", version="1.4.2", app_size=150_000, partitions=parts,
                        partition_table_offset=built_for)
    pin_firmware(env, fw, lambda text: text.replace('offset = "0x8000"', f'offset = "{table_at:#x}"'))


def test_a_profile_with_its_table_moved_is_checked_and_its_unit_boots_with_its_config(station_env, capsys):
    moved_profile(station_env)
    rc, out, err = run_station(capsys, "profile", "show", "relay")
    assert rc == 0 and "partition table (at 0xc000):" in out and "config" in out, err
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 0, err
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        dev = bench[0].device
        rc, out, err = run_station(capsys, "flash", "--port", bench[0].url, "--json")
        finished = [e for e in json_lines(out) if e["event"] == "unit_finished"][0]
        assert rc == 0 and finished["outcome"] == "passed", (finished, err[-2000:])
        assert dev.flash.read(0x8000, 0x1000) == b"\xff" * 0x1000  # nothing written where the table used to be
        assert f"boot:  2 {'config':<16} {'WiFi data':<16} 01 02 00190000 00006000" in dev.console_text()
        # the firmware found its config partition through the moved table (else: "config error" on its console)
        assert dev.call(lambda: dev.runtime.config["token"]) == TOKEN


@pytest.mark.parametrize("table_at, built_for, parts, words", [
    (0xD000, TABLE, [Partition("nvs", 1, 2, 0xE000, 0x2000)] + PARTS[1:],
     "the bootloader was built to read its partition table at 0xc000: the board would not find this one"),
    (0xC800, 0xC800, PARTS, "the partition table must start on a 4 KiB boundary"),
    (TABLE, TABLE, [Partition("nvs", 1, 2, 0xC000 + 0x800, 0x2000)] + PARTS[1:],
     "partition 'nvs' starts at 0xc800, but with the table at 0xc000 the first partition starts at 0xd000"),
    (0x6000, 0x6000, PARTS, "the partition table must come after the bootloader (0x1000-"),
])
def test_profile_check_refuses_a_table_the_board_would_not_find_or_idf_would_not_build(
        station_env, capsys, table_at, built_for, parts, words):
    moved_profile(station_env, table_at, built_for, parts)
    rc, _, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 2 and words in err, err


def test_an_idf_build_with_its_table_moved_becomes_a_profile_that_finds_it(station_env, tmp_path, capsys,
                                                                           monkeypatch):
    fw = build_firmware("esp32", project="valve", version="3.0.1", app_size=100_000, partitions=PARTS,
                        partition_table_offset=TABLE)
    build = tmp_path / "build"
    (build / "bootloader").mkdir(parents=True)
    (build / "partition_table").mkdir()
    (build / "bootloader/bootloader.bin").write_bytes(fw.bootloader)
    (build / "partition_table/pt.bin").write_bytes(fw.partition_table)  # a stem that names nothing
    (build / "valve.bin").write_bytes(fw.app)
    (build / "flasher_args.json").write_text(json.dumps({  # as idf.py leaves it with the offset moved
        "flash_files": {"0x1000": "bootloader/bootloader.bin", "0xc000": "partition_table/pt.bin",
                        "0x10000": "valve.bin"},
        "bootloader": {"offset": "0x1000", "file": "bootloader/bootloader.bin", "encrypted": "false"},
        "partition-table": {"offset": "0xc000", "file": "partition_table/pt.bin", "encrypted": "false"},
        "app": {"offset": "0x10000", "file": "valve.bin", "encrypted": "false"},
        "extra_esptool_args": {"chip": "esp32"}}))
    rc, _, err = run_station(capsys, "profile", "new", "valve", "--from-idf", str(build))
    assert rc == 0, err
    spec = tomllib.loads((station_env / "profiles/valve/profile.toml").read_text())
    assert {"name": "partition-table", "offset": "0xc000"}.items() <= spec["firmware"]["regions"][1].items()
    profile = load_profile("valve", station_env / "profiles")
    assert profile.partition_table_offset == TABLE and profile.config_slot().offset == 0x190000
    monkeypatch.setenv("VALVE_VENDOR_TOKEN", "valve-tk7")
    rc, _, err = run_station(capsys, "profile", "check", "valve")
    assert rc == 0, err


def test_the_pipeline_checks_the_table_it_flashes_at_the_profiles_offset(station_env):
    """The config's offsets come from the table the profile was loaded with: the one written at 0xC000."""
    moved_profile(station_env)
    profile = load_profile("relay", station_env / "profiles")
    assert [name for name, off, _ in load_firmware(profile) if off == TABLE] == ["partition-table"]
    stale = dataclasses.replace(profile, partitions=profile.partitions[:-1])  # as if loaded from another table
    with pytest.raises(ProfileError, match="firmware region 0xc000: the partition table changed"):
        load_firmware(stale)


def test_a_bootloader_that_does_not_say_is_taken_at_the_profiles_word_on_the_station_and_0x8000_elsewhere(
        station_env, capsys):
    """A real IDF bootloader has its table's offset compiled in, unreadable: like one, a generated bootloader built
    for the default says nothing. Profile check cannot refuse it; the station's own virtual boards take the profile's
    offset as what it compiled in; a board told nothing looks at ESP-IDF's default, 0x8000."""
    moved_profile(station_env, TABLE, built_for=0x8000)
    rc, _, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 0, err
    rc, out, err = run_station(capsys, "flash", "--virtual", "1", "--json")
    finished = [e for e in json_lines(out) if e["event"] == "unit_finished"]
    assert rc == 0 and finished[0]["outcome"] == "passed", (finished, err[-2000:])
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, out, err = run_station(capsys, "flash", "--port", bench[0].url, "--json")
        bad = [e for e in json_lines(out) if e["event"] == "unit_finished"][0]
        assert (bad["outcome"], bad["failed_step"]) == ("failed", "boot"), bad
        assert "flash_parts: partition 0 invalid magic number 0xffff" in bad["error"], bad


def test_station_virtual_boards_can_be_told_where_a_real_builds_table_is(station_env, capsys, tmp_path):
    """`station virtual --partition-table-offset`: boards for a real ESP-IDF build whose table is moved (its
    bootloader cannot say where): the unit passes on them; a value no build can have is refused (exit 2)."""
    import subprocess
    import sys

    from tests.station.conftest import REPO

    moved_profile(station_env, TABLE, built_for=0x8000)  # a bootloader that does not say, like a real one
    boards = subprocess.Popen([sys.executable, "-m", "station", "virtual", "--json", "--partition-table-offset",
                               hex(TABLE), "--run-dir", str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        url = json.loads(boards.stdout.readline())["url"]
        rc, out, err = run_station(capsys, "flash", "--port", url, "--json")
        finished = [e for e in json_lines(out) if e["event"] == "unit_finished"]
        assert rc == 0 and finished[0]["outcome"] == "passed", (finished, err[-2000:])
    finally:
        boards.terminate()
        boards.wait(30)
        boards.stdout.close()
    bad = subprocess.run([sys.executable, "-m", "station", "virtual", "--partition-table-offset", "0x8800"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "on a 4 KiB sector" in bad.stderr, bad.stderr
