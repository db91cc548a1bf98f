"""Boards the pipeline must refuse, each at the right step with a reason in words.

Secure Download Mode, a module with too little flash, and a board that boots another
firmware version than the profile ships.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flashing.firmware import DEFAULT_PARTITIONS, build_firmware, twosmart_manifest
from flashing.images import Partition, build_partition_table
from flashing.virtual.bench import VirtualBench
from station.record import Record
from tests.station.conftest import json_lines, run_station


def finished(out: str) -> dict[str, dict]:
    return {e["port"]: e for e in json_lines(out) if e["event"] == "unit_finished"}


def write_profile(env: Path, name: str, chip: str, regions: list[tuple[str, int, bytes]]) -> str:
    """A profile for an 'other' device (no config partition) with pinned regions."""
    d = env / "profiles" / name
    (d / "fw").mkdir(parents=True)
    lines = []
    for region, offset, data in regions:
        (d / "fw" / f"{region}.bin").write_bytes(data)
        lines.append(f'{{ name = "{region}", offset = "{hex(offset)}", file = "fw/{region}.bin", '
                     f'sha256 = "{hashlib.sha256(data).hexdigest()}" }}')
    (d / "profile.toml").write_text(
        f'name = "{name}"\ntitle = "2Smart Hub Node"\nchip = "{chip}"\ndevice_class = "other"\n\n'
        "[firmware]\nregions = [\n  " + ",\n  ".join(lines) + "\n]\n\n[checks]\nboot = true\n")
    return name


def c3_profile(env: Path) -> str:
    """An ESP32-C3 'other' device's profile: bootloader, partition table and a 100 KB app."""
    fw = build_firmware("esp32c3", project="node", version="1.0.0", app_size=100_000,
                        manifest=twosmart_manifest("other"))
    return write_profile(env, "node-c3", "esp32c3", [
        ("bootloader", fw.bootloader_offset, fw.bootloader), ("partition-table", 0x8000, fw.partition_table),
        ("app", 0x10000, fw.app)])


def blank_at(bench: VirtualBench, offset: int, size: int = 4096) -> bool:
    return bench[0].device.flash.read(offset, size) == b"\xff" * size


def test_secure_download_mode_fails_at_connect(station_env, capsys):
    name = c3_profile(station_env)
    with VirtualBench(1, "esp32c3", run_dir=station_env / "run") as bench:
        bench[0].device.set_fault("secure_download")
        rc, out, err = run_station(capsys, "flash", "--profile", name, "--port", bench[0].url, "--json")
        assert rc == 1, err
        bad = finished(out)[bench[0].url]
        assert (bad["outcome"], bad["failed_step"], bad["chip"]) == ("failed", "connect", "ESP32-C3")
        assert bad["error"] == "the board is in Secure Download Mode: its flash cannot be read back or verified"
        assert bad["remedy"] == "set it aside for the secured-device process"
        assert blank_at(bench, 0x10000)  # nothing was written
        bench[0].device.clear_faults()  # the same board without the eFuse: it passes
        rc, out, err = run_station(capsys, "flash", "--profile", name, "--port", bench[0].url, "--json")
        assert rc == 0, err


def test_too_small_flash_fails_at_identify(station_env, capsys):
    # the relay firmware with its config partition at 3 MB: needs more than a 2MB module has
    parts = [p if p.name != "config" else Partition("config", 1, 2, 0x300000, 0x6000) for p in DEFAULT_PARTITIONS]
    table = build_partition_table(parts)
    d = station_env / "profiles/relay"
    old = hashlib.sha256((d / "firmware/partition-table.bin").read_bytes()).hexdigest()
    (d / "firmware/partition-table.bin").write_bytes(table)
    p = d / "profile.toml"
    p.write_text(p.read_text().replace(old, hashlib.sha256(table).hexdigest()))
    with VirtualBench(1, "esp32", "2MB", run_dir=station_env / "r2") as small, \
            VirtualBench(1, "esp32", "4MB", run_dir=station_env / "r4") as big:
        rc, out, err = run_station(capsys, "flash", "--port", small[0].url, "--port", big[0].url, "--json")
        assert rc == 1, err
        res = finished(out)
        assert res[big[0].url]["outcome"] == "passed"  # the same profile fits a 4MB module
        bad = res[small[0].url]
        assert (bad["outcome"], bad["failed_step"]) == ("failed", "identify")
        assert bad["error"] == "the board has 2MB of flash; the firmware needs 3MB"
        assert "wrong module" in bad["remedy"]
        assert bad["mac"] == small[0].device.mac_text
        assert blank_at(small, 0x10000) and blank_at(small, 0x1000)


def test_firmware_version_mismatch_fails_at_boot(station_env, capsys):
    # factory + ota_0 and no otadata: the bootloader starts the factory app (1.0.0), while the
    # region the profile calls "app" (2.0.0) goes to ota_0 and never runs
    parts = [Partition("nvs", 1, 2, 0x9000, 0x5000), Partition("phy_init", 1, 1, 0xE000, 0x1000),
             Partition("factory", 0, 0x00, 0x10000, 0x100000), Partition("ota_0", 0, 0x10, 0x110000, 0x100000)]
    old = build_firmware("esp32", project="node", version="1.0.0", app_size=120_000, partitions=parts,
                         manifest=twosmart_manifest("other"))
    new = build_firmware("esp32", project="node", version="2.0.0", app_size=120_000, partitions=parts,
                         manifest=twosmart_manifest("other"))
    name = write_profile(station_env, "node", "esp32", [
        ("bootloader", 0x1000, new.bootloader), ("partition-table", 0x8000, new.partition_table),
        ("factory", 0x10000, old.app), ("app", 0x110000, new.app)])
    rc, out, err = run_station(capsys, "profile", "check", name)
    assert rc == 0 and "firmware 2.0.0" in out, err  # nothing a desk check can see
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, out, err = run_station(capsys, "flash", "--profile", name, "--port", bench[0].url, "--json")
        assert rc == 1, err
        bad = finished(out)[bench[0].url]
        assert (bad["outcome"], bad["failed_step"]) == ("failed", "boot")
        assert bad["error"] == "the board runs firmware 1.0.0, the profile ships 2.0.0"
        assert bad["firmware_version"] == "1.0.0" and "check the profile's app image" in bad["remedy"]
        assert bench[0].device.state()["app"]["version"] == "1.0.0"
    row = Record(station_env / "station.db").attempts()[0]
    assert (row["outcome"], row["failed_step"], row["firmware_version"]) == ("failed", "boot", "1.0.0")
