"""The virtual bootloader boots as ESP-IDF's does: otadata's choice, its own banner, each segment's address.

The oracles are outside the code under test: esptool's own image parser for segment
addresses and the bootloader description, and ESP-IDF's bootloader_utility.c /
bootloader_common.c for the otadata rules and the partition table's words.
"""

from __future__ import annotations

import re
import struct

import pytest
from esptool.bin_image import LoadFirmwareImage

from flashing.firmware import build_firmware
from flashing.images import (
    OTA_IMG_ABORTED,
    OTA_IMG_VALID,
    Partition,
    Segment,
    bootloader_description,
    build_image,
    build_otadata,
    build_partition_table,
    chip_facts,
    ota_select_entry,
    select_boot,
)
from flashing.virtual.boot import boot_from_flash
from flashing.virtual.chips import CHIPS
from tests.conftest import esptool_cli
from tests.station.conftest import json_lines, run_station, station_env  # noqa: F401  (a station's files in tmp)
from tests.station.test_pipeline_refusals import write_profile

OTA_TABLE = [
    Partition("nvs", 0x01, 0x02, 0x9000, 0x4000),
    Partition("otadata", 0x01, 0x00, 0xD000, 0x2000),
    Partition("phy_init", 0x01, 0x01, 0xF000, 0x1000),
    Partition("ota_0", 0x00, 0x10, 0x10000, 0x100000),
    Partition("ota_1", 0x00, 0x11, 0x110000, 0x100000),
    Partition("config", 0x01, 0x02, 0x210000, 0x6000),
]


def two_apps(chip: str = "esp32"):
    """One build whose ota_0 and ota_1 hold apps with different project names."""
    a = build_firmware(chip, project="relay", version="1.0.0", app_size=60_000, partitions=OTA_TABLE)
    b = build_firmware(chip, project="relay-next", version="2.0.0", app_size=60_000, partitions=OTA_TABLE, seed=2)
    return a, b


def boot(regions, chip: str = "esp32", size: int = 4 << 20, write=None):
    flash = bytearray(b"\xff" * size)
    for offset, data in regions:
        flash[offset:offset + len(data)] = data

    def program(offset: int, sector: bytes) -> None:
        flash[offset:offset + len(sector)] = sector

    result = boot_from_flash(CHIPS[chip], lambda o, n: bytes(flash[o:o + n]), size, "POWERON_RESET",
                             program if write else None)
    return result, flash


@pytest.mark.parametrize("chip", ["esp32", "esp32c3"])
def test_otadata_selecting_ota_1_boots_ota_1s_app(make_bench, tmp_path, chip):
    a, b = two_apps(chip)
    files = {"bl.bin": a.bootloader, "pt.bin": a.partition_table, "otadata.bin": build_otadata(2),
             "a.bin": a.app, "b.bin": b.app}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    bench = make_bench(1, chip)
    r = esptool_cli("--chip", chip, "-p", bench[0].url, "--before", "no-reset", "--after", "no-reset",
                    "write-flash", hex(a.bootloader_offset), str(tmp_path / "bl.bin"), "0x8000", str(tmp_path / "pt.bin"),
                    "0xd000", str(tmp_path / "otadata.bin"), "0x10000", str(tmp_path / "a.bin"),
                    "0x110000", str(tmp_path / "b.bin"))
    assert r.returncode == 0, r.stdout + r.stderr
    state = bench[0].device.reset("app")
    log = bench[0].device.console_text()
    assert state["app"]["project_name"] == "relay-next", log  # seq 2: (2 - 1) % 2 = slot 1
    assert "Project name:     relay-next" in log and "Loaded app from partition at offset 0x110000" in log
    assert " 4 ota_1            OTA app          00 11 00110000 00100000" in log


def test_the_later_of_two_valid_entries_wins_and_a_bad_one_is_passed_over():
    a, b = two_apps()
    base = [(0x1000, a.bootloader), (0x8000, a.partition_table), (0x10000, a.app), (0x110000, b.app)]
    both = ota_select_entry(3).ljust(0x1000, b"\xff") + ota_select_entry(4)  # 4 > 3: (4 - 1) % 2 = ota_1
    assert boot(base + [(0xD000, both)])[0].app.project_name == "relay-next"
    stale = ota_select_entry(5, OTA_IMG_ABORTED).ljust(0x1000, b"\xff") + ota_select_entry(4)
    assert boot(base + [(0xD000, stale)])[0].app.project_name == "relay-next"  # 5 aborted: 4 is the one
    bad_crc = bytearray(build_otadata(2))
    bad_crc[28] ^= 1
    r, _ = boot(base + [(0xD000, bytes(bad_crc))])
    assert r.app.project_name == "relay"  # no valid entry, no factory: every slot from ota_0
    assert "E (" in r.log and "boot: ota data partition invalid and no factory, will try all partitions" in r.log


def test_blank_otadata_boots_factory_else_ota_0_and_sets_otadata():
    a, b = two_apps()
    r, flash = boot([(0x1000, a.bootloader), (0x8000, a.partition_table), (0x10000, a.app), (0x110000, b.app)],
                    write=True)
    assert r.app.project_name == "relay" and "boot: No factory image, trying OTA 0" in r.log
    assert "boot: Set actual ota_seq=1 in otadata[0]" in r.log
    assert bytes(flash[0xD000:0xD020]) == ota_select_entry(1, OTA_IMG_VALID)  # as IDF's set_actual_ota_seq
    with_factory = [Partition("factory", 0x00, 0x00, 0x210000, 0x100000)] + OTA_TABLE[:5]
    f = build_firmware("esp32", project="factory-app", app_size=60_000, partitions=with_factory)
    r, _ = boot([(0x1000, f.bootloader), (0x8000, f.partition_table), (0x210000, f.app), (0x10000, b.app)])
    assert r.app.project_name == "factory-app" and "boot: Defaulting to factory image" in r.log
    r, _ = boot([(0x1000, f.bootloader), (0x8000, f.partition_table), (0x210000, f.app), (0x10000, b.app),
                 (0xD000, build_otadata(1))])
    assert r.app.project_name == "relay-next"  # valid otadata outranks factory


def test_a_selected_slot_that_does_not_load_falls_back_as_idf_does():
    a, b = two_apps()
    broken = bytearray(b.app)
    broken[3000] ^= 0xFF
    r, _ = boot([(0x1000, a.bootloader), (0x8000, a.partition_table), (0x10000, a.app), (0x110000, bytes(broken)),
                 (0xD000, build_otadata(2))])
    assert r.app.project_name == "relay"
    assert re.search(r"E \(\d+\) esp_image: Checksum failed\. Calculated 0x[0-9a-f]+ read 0x[0-9a-f]+\n"
                     r"E \(\d+\) boot: OTA app partition slot 1 is not bootable\n", r.log), r.log
    small = [p if p.name != "otadata" else Partition("otadata", 0x01, 0x00, 0xD000, 0x1000) for p in OTA_TABLE]
    r, _ = boot([(0x1000, a.bootloader), (0x8000, build_partition_table(small)), (0x10000, a.app)])
    assert r.app is None and "ota_info partition size 4096 is too small (minimum 8192 bytes)" in r.log


def test_selection_follows_idf_rules_for_every_entry_state():
    # (sector 0, sector 1) -> slot, with two OTA slots and no factory
    cases = {(None, None): 0, (1, None): 0, (2, None): 1, (None, 2): 1, (3, 2): 0, (2, 3): 0, (7, 8): 1}
    for (s0, s1), slot in cases.items():
        data = b"".join((ota_select_entry(s) if s else b"") .ljust(0x1000, b"\xff") for s in (s0, s1))
        assert select_boot(OTA_TABLE, data).index == slot, (s0, s1)


def test_the_banner_is_the_bootloaders_own(shared_dir):
    build = shared_dir / "fixtures/idf-builds/esp32-valve-controller"
    r, _ = boot([(0x1000, (build / "bootloader/bootloader.bin").read_bytes()),
                 (0x8000, (build / "partition_table/partition-table.bin").read_bytes()),
                 (0x10000, (build / "valve_controller.bin").read_bytes())], size=2 << 20)
    assert "boot: ESP-IDF v6.0-dev-1489-g4e036983a7 2nd stage bootloader\n" in r.log
    assert "boot: compile time Aug  4 2025 22:55:17\n" in r.log
    # a bootloader of our own with a description says what it carries; one without falls back
    facts = chip_facts("esp32c3")
    fw = build_firmware("esp32c3", app_size=60_000)
    desc = bootloader_description("v5.3.1-dirty", "Mar  3 2025 09:15:00") + bytes(200)
    bl = build_image([Segment(0x3FCD5820, desc), Segment(0x403CC710, bytes(400))], chip_id=facts.image_chip_id,
                     entry=0x403CC71A)
    r, _ = boot([(0, bl), (0x8000, fw.partition_table), (0x10000, fw.app)], chip="esp32c3")
    assert "ESP-IDF v5.3.1-dirty 2nd stage bootloader" in r.log and "compile time Mar  3 2025 09:15:00" in r.log
    junk = bytes([0x50]) + bytes(range(1, 200))  # a 0x50 magic byte over text that is not text
    bl = build_image([Segment(0x3FCD5820, junk)], chip_id=facts.image_chip_id, entry=0x403CC71A)
    r, _ = boot([(0, bl), (0x8000, fw.partition_table), (0x10000, fw.app)], chip="esp32c3")
    assert "ESP-IDF v5.1.2 2nd stage bootloader" in r.log and "compile time Nov 26 2026 12:00:00" in r.log


def test_each_segment_line_carries_its_own_address(shared_dir):
    app_path = shared_dir / "fixtures/idf-builds/esp32-valve-controller/valve_controller.bin"
    build = app_path.parent
    r, _ = boot([(0x1000, (build / "bootloader/bootloader.bin").read_bytes()),
                 (0x8000, (build / "partition_table/partition-table.bin").read_bytes()),
                 (0x10000, app_path.read_bytes())], size=2 << 20)
    image = LoadFirmwareImage("esp32", str(app_path))  # esptool's own reading of the image
    facts = chip_facts("esp32")
    expected = []
    for i, seg in enumerate(image.segments):
        how = "map" if facts.is_mapped(seg.addr) else "load"
        expected.append(f"esp_image: segment {i}: paddr={0x10000 + seg.file_offs + 8:08x} vaddr={seg.addr:08x} "
                        f"size={len(seg.data):05x}h ({len(seg.data):6d}) {how}")
    got = [line.split(") ", 1)[1] for line in r.log.splitlines() if "esp_image: segment" in line]
    assert got == expected
    assert len({line.split("paddr=")[1][:8] for line in got}) == len(got)


def test_partition_usage_as_the_bootloader_prints_it():
    table = [
        Partition("otadata", 0x01, 0x00, 0xD000, 0x2000), Partition("phy_init", 0x01, 0x01, 0xF000, 0x1000),
        Partition("nvs", 0x01, 0x02, 0x9000, 0x4000), Partition("coredump", 0x01, 0x03, 0x300000, 0x10000),
        Partition("nvs_keys", 0x01, 0x04, 0x310000, 0x1000), Partition("efuse_em", 0x01, 0x05, 0x311000, 0x2000),
        Partition("spiffs", 0x01, 0x82, 0x320000, 0x10000), Partition("factory", 0x00, 0x00, 0x10000, 0x100000),
        Partition("ota_0", 0x00, 0x10, 0x110000, 0x100000), Partition("ota_1", 0x00, 0x11, 0x210000, 0x80000),
        Partition("test", 0x00, 0x20, 0x290000, 0x60000), Partition("custom", 0x40, 0x01, 0x330000, 0x1000),
    ]
    fw = build_firmware("esp32", app_size=60_000, partitions=table[7:8])
    r, _ = boot([(0x1000, fw.bootloader), (0x8000, build_partition_table(table)), (0x10000, fw.app)])
    rows = [line.split("boot: ", 1)[1] for line in r.log.splitlines() if re.search(r"boot: +\d+ ", line)]
    # "%2d %-16s %-16s %02x %02x %08x %08x", the words of bootloader_utility_load_partition_table
    assert rows == [
        " 0 otadata          OTA data         01 00 0000d000 00002000",
        " 1 phy_init         RF data          01 01 0000f000 00001000",
        " 2 nvs              WiFi data        01 02 00009000 00004000",
        " 3 coredump         Unknown data     01 03 00300000 00010000",
        " 4 nvs_keys         NVS keys         01 04 00310000 00001000",
        " 5 efuse_em         efuse            01 05 00311000 00002000",
        " 6 spiffs           Unknown data     01 82 00320000 00010000",
        " 7 factory          factory app      00 00 00010000 00100000",
        " 8 ota_0            OTA app          00 10 00110000 00100000",
        " 9 ota_1            OTA app          00 11 00210000 00080000",
        "10 test             test app         00 20 00290000 00060000",
        "11 custom           unknown          40 01 00330000 00001000",
    ]
    assert struct.calcsize("<I20sII") == 32  # esp_ota_select_entry_t


def test_a_profile_shipping_otadata_for_ota_1_is_ready_and_its_units_boot_ota_1(station_env, capsys):
    _, b = two_apps()
    # no image for ota_0 at all: only otadata makes this profile's firmware bootable
    name = write_profile(station_env, "node-ota", "esp32", [
        ("bootloader", 0x1000, b.bootloader), ("partition-table", 0x8000, b.partition_table),
        ("otadata", 0xD000, build_otadata(2)), ("app", 0x110000, b.app)])
    rc, out, err = run_station(capsys, "profile", "check", name)
    assert rc == 0 and "is ready" in out + err, out + err
    rc, out, err = run_station(capsys, "flash", "--profile", name, "--virtual", "1", "--json")
    assert rc == 0, err[-2000:]
    done = [e for e in json_lines(out) if e["event"] == "unit_finished"]
    assert done[0]["outcome"] == "passed" and done[0]["firmware_version"] == "2.0.0", done


MOVED = [Partition("nvs", 0x01, 0x02, 0xD000, 0x3000), Partition("factory", 0x00, 0x00, 0x10000, 0x100000)]


@pytest.mark.parametrize("chip", ["esp32", "esp32c3"])
def test_the_bootloader_reads_the_partition_table_only_where_it_was_built_to(chip):
    """CONFIG_PARTITION_TABLE_OFFSET is compiled into a real bootloader: a table elsewhere is not found."""
    moved = build_firmware(chip, app_size=60_000, partitions=MOVED, partition_table_offset=0xC000)
    default = build_firmware(chip, app_size=60_000, partitions=MOVED)
    r, _ = boot(moved.regions(), chip)
    assert r.app is not None and r.partition_table_offset == 0xC000, r.log
    assert f"boot:  0 {'nvs':<16} {'WiFi data':<16} 01 02 0000d000 00003000" in r.log

    # a bootloader built for 0x8000 with the table at 0xC000, and one built for 0xC000 with it at 0x8000
    for bootloader, table_at in ((default.bootloader, 0xC000), (moved.bootloader, 0x8000)):
        r, _ = boot([(moved.bootloader_offset, bootloader), (table_at, moved.partition_table),
                     (0x10000, moved.app)], chip)
        assert r.app is None, r.log
        # flash_partitions.c and bootloader_utility.c / bootloader_start.c, word for word
        assert re.search(r"E \(\d+\) flash_parts: partition 0 invalid magic number 0xffff\n"
                         r"E \(\d+\) boot: Failed to verify partition table\n"
                         r"E \(\d+\) boot: load partition table error!\n$", r.log), r.log
