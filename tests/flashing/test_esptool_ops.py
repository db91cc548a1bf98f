"""The real esptool (Python API and CLI) against the virtual device, every operation."""

from __future__ import annotations

import hashlib
import random
import re
import struct

import pytest
from esptool import cmds
from esptool.util import FatalError, UnsupportedCommandError

from tests.conftest import esptool_cli

CHIPS = ["esp32", "esp32c3", "esp32s3"]
CHIP_NAMES = {"esp32": "ESP32", "esp32c3": "ESP32-C3", "esp32s3": "ESP32-S3"}


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("stub", [True, False], ids=["stub", "rom"])
def test_api_every_operation(make_bench, chip, stub):
    bench = make_bench(1, chip)
    dev = bench[0].device
    esp = cmds.detect_chip(bench[0].url, connect_mode="no-reset")
    try:
        assert esp.CHIP_NAME == CHIP_NAMES[chip]
        assert esp.read_mac() == tuple(dev.mac)
        if chip == "esp32":
            with pytest.raises((FatalError, UnsupportedCommandError)):
                esp.get_security_info(cache=False)
        else:
            info = esp.get_security_info()
            assert info["chip_id"] == dev.chip.image_chip_id
            assert not info["parsed_flags"]["SECURE_DOWNLOAD_ENABLE"]
        if stub:
            esp = cmds.run_stub(esp)
            assert dev.state()["mode"] == "stub"
        cmds.attach_flash(esp)
        assert esp.flash_id() == 0x1640EF  # W25Q32JV, 4 MB
        assert cmds.detect_flash_size(esp) == "4MB"

        # several regions in one call, compressed (stub or ROM) and not
        regions = [(0x10000, rand(40_000, 1)), (0x30000, rand(5_000, 2)),
                   (0x40000, b"\x00" * 20_000)]
        cmds.write_flash(esp, list(regions), compress=True)
        cmds.verify_flash(esp, list(regions))
        plain = [(0x50000, rand(9_000, 3))]
        cmds.write_flash(esp, list(plain), no_compress=True)
        cmds.verify_flash(esp, list(plain))
        for offset, data in regions + plain:
            assert dev.flash.read(offset, len(data)) == data
            assert esp.flash_md5sum(offset, len(data)) == hashlib.md5(data).hexdigest()
        read_len = 8192 if stub else 1024  # ROM reads 64 bytes per command
        assert esp.read_flash(0x10000, read_len) == regions[0][1][:read_len]

        cmds.erase_region(esp, 0x30000, 0x2000)
        assert dev.flash.read(0x30000, 0x2000) == b"\xff" * 0x2000
        assert dev.flash.read(0x32000, 5000 - 0x2000) == regions[1][1][0x2000:]
        if stub:
            cmds.erase_flash(esp)
            assert dev.flash.read(0x10000, 40_000) == b"\xff" * 40_000
    finally:
        esp._port.close()


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("baud", [460800, 921600, 1500000])
def test_api_write_after_baud_change(make_bench, chip, baud):
    bench = make_bench(1, chip)
    dev = bench[0].device
    esp = cmds.run_stub(cmds.detect_chip(bench[0].url, connect_mode="no-reset"))
    try:
        esp.change_baud(baud)
        assert dev.state()["baud"] == baud
        data = rand(300_000, baud)
        cmds.attach_flash(esp)
        cmds.write_flash(esp, [(0x100000, data)])
        assert esp.read_flash(0x100000, len(data)) == data
    finally:
        esp._port.close()


def test_rom_answers_unsupported_command_like_a_rom(make_bench):
    bench = make_bench(1, "esp32c3")
    esp = cmds.detect_chip(bench[0].url, connect_mode="no-reset")
    try:
        # ERASE_REGION is a stub command: the ROM answers "invalid message", never silence
        val, data = esp.command(0xD1, struct.pack("<II", 0, 0x1000))
        assert data[:2] == b"\x01\x05"
        with pytest.raises(FatalError, match="Failed to erase region"):
            esp.check_command("erase region", 0xD1, struct.pack("<II", 0, 0x1000))
    finally:
        esp._port.close()


def test_stub_recognised_from_upload_and_legacy_stub(make_bench):
    from esptool.loader import StubFlasher

    bench = make_bench(1, "esp32")
    dev = bench[0].device
    old = list(StubFlasher.STUB_SUBDIRS)
    try:
        StubFlasher.STUB_SUBDIRS = ["1", "2"]  # esptool --stub-version 1
        esp = cmds.run_stub(cmds.detect_chip(bench[0].url, connect_mode="no-reset"))
        assert dev.state()["stub"] == "1"
        data = rand(70_000, 9)
        cmds.attach_flash(esp)
        cmds.write_flash(esp, [(0x20000, data)])
        assert esp.read_flash(0x20000, len(data)) == data
        esp._port.close()
    finally:
        StubFlasher.STUB_SUBDIRS = old


def _cli(port: str, *args: str) -> str:
    r = esptool_cli("--port", port, "--before", "no-reset", "--after", "no-reset", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("chip", CHIPS)
def test_cli_every_operation(make_bench, tmp_path, chip):
    bench = make_bench(1, chip)
    slot = bench[0]
    dev = slot.device
    url = slot.url
    mac = dev.mac_text
    out = _cli(url, "chip-id")
    assert CHIP_NAMES[chip] in out
    assert mac in _cli(url, "read-mac").lower()
    assert re.search(r"Manufacturer: ef\s+Device: 4016", _cli(url, "flash-id"))
    if chip != "esp32":
        assert "Chip ID: " in _cli(url, "get-security-info")
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(rand(50_000, 11))
    b.write_bytes(rand(3_000, 12))
    _cli(url, "-b", "921600", "write-flash", "0x10000", str(a), "0x30000", str(b))
    dev.reset("download")  # the stub stays resident at 921600 without a reset
    _cli(url, "--no-stub", "write-flash", "--no-compress", "0x40000", str(b))
    dev.reset("download")
    _cli(url, "verify-flash", "0x10000", str(a), "0x30000", str(b), "0x40000", str(b))
    dev.reset("download")
    back = tmp_path / "back.bin"
    _cli(url, "-b", "460800", "read-flash", "0x10000", "50000", str(back))
    assert back.read_bytes() == a.read_bytes()
    dev.reset("download")
    _cli(url, "erase-region", "0x30000", "0x1000")
    assert dev.flash.read(0x30000, 0x1000) == b"\xff" * 0x1000
    dev.reset("download")
    _cli(url, "erase-flash")
    assert dev.flash.read(0x10000, 50_000) == b"\xff" * 50_000


def test_cli_through_pty_as_a_plain_port(make_bench, tmp_path):
    bench = make_bench(1, "esp32c3")
    slot = bench[0]
    img = tmp_path / "img.bin"
    img.write_bytes(rand(20_000, 5))
    # default --before/--after: the pty cannot reset, esptool warns and syncs anyway
    r = esptool_cli("--port", slot.pty.path, "write-flash", "0x20000", str(img))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Chip was NOT reset" in r.stdout + r.stderr
    assert slot.device.flash.read(0x20000, 20_000) == img.read_bytes()
