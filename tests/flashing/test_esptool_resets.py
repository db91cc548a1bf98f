"""esptool's own resets through the `vesp://` bridge, as through a USB-UART on Linux.

Every esptool run resets the board into download mode (its tight DTR/RTS reset over
TIOCMSET) and its closing hard reset boots the app, so runs follow one another in any
order: a stub left at a fast baud rate by one run never answers the next. Also the
registers esptool writes that have an effect: the RTC watchdog (`--after
watchdog-reset`) and the ROM's SPI flash, which answers only once attached.
"""

from __future__ import annotations


import pytest
import serial
from esptool import cmds

from flashing.firmware import build_firmware
from flashing.virtual.device import VirtualDevice
from tests.conftest import esptool_cli, wait_for_state

NO_SDK = {"sdk": "none"}  # an app that prints its banner and runs no 2Smart firmware


def wait_for(dev: VirtualDevice, ready, timeout: float = 5.0) -> dict:
    return wait_for_state(dev, ready, timeout)


def in_app(state: dict) -> bool:
    return state["mode"] == "app"


def esptool(url: str, *args: str) -> str:
    r = esptool_cli("--port", url, *args)  # default --before default-reset, --after hard-reset
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Chip was NOT reset" not in r.stdout + r.stderr
    return r.stdout


def firmware_files(chip: str, tmp_path) -> tuple[list[str], tuple[int, bytes]]:
    fw = build_firmware(chip, app_size=24_000, manifest=NO_SDK)
    args = []
    for offset, data in fw.regions():
        path = tmp_path / f"{offset:x}.bin"
        path.write_bytes(data)
        args += [hex(offset), str(path)]
    return args, (fw.app_offset, fw.app)


ORDERS = [
    pytest.param("esp32", "stub-first", id="esp32-stub-first"),  # the case of issue #15
    pytest.param("esp32c3", "rom-first", id="esp32c3-rom-first"),
    pytest.param("esp32", "rom-first", id="esp32-rom-first", marks=pytest.mark.slow),
    pytest.param("esp32c3", "stub-first", id="esp32c3-stub-first", marks=pytest.mark.slow),
    pytest.param("esp32s3", "stub-first", id="esp32s3-stub-first", marks=pytest.mark.slow),
    pytest.param("esp32s3", "rom-first", id="esp32s3-rom-first", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("chip,order", ORDERS)
def test_esptool_runs_with_its_own_resets_in_any_order(make_bench, tmp_path, chip, order):
    bench = make_bench(1, chip)
    url, dev = bench[0].url, bench[0].device
    regions, (app_offset, app) = firmware_files(chip, tmp_path)
    stub, rom = [], ["--no-stub"]
    first, then = (stub, rom) if order == "stub-first" else (rom, stub)

    out = esptool(url, "-b", "921600", *first, "write-flash", *regions)
    assert "Hard resetting via RTS pin" in out
    assert wait_for(dev, in_app)["app"]["project_name"] == "relay"  # the closing hard reset boots the app
    # the next run resets the board into its ROM: no stub is left listening at 921600
    assert "Verification successful" in esptool(url, *then, "verify-flash", *regions)
    wait_for(dev, in_app)
    back = tmp_path / "back.bin"
    esptool(url, *then, "read-flash", hex(app_offset), str(len(app)), str(back))
    assert back.read_bytes() == app
    wait_for(dev, in_app)


@pytest.mark.parametrize("chip", ["esp32c3", "esp32s3"])
def test_watchdog_reset_reboots_the_chip_into_its_app(make_bench, tmp_path, chip):
    bench = make_bench(1, chip)
    dev = bench[0].device
    regions, _ = firmware_files(chip, tmp_path)
    out = esptool(bench[0].url, "--after", "watchdog-reset", "write-flash", *regions)
    assert "Hard resetting with a watchdog" in out
    state = wait_for(dev, in_app)
    assert state["app"]["project_name"] == "relay"
    assert f"rst:{dev.chip.wdt_reset}" in dev.console_text()


def test_watchdog_registers_are_write_protected_until_unlocked(make_bench):
    bench = make_bench(1, "esp32c3")
    wdt = bench[0].device.chip.rtc_wdt
    with serial.serial_for_url(bench[0].url, baudrate=115200, timeout=0.5) as port:
        esp = cmds.detect_chip(port, connect_mode="no-reset")
        esp.write_reg(wdt.config0, 1 << 31 | 5 << 28)  # no key: the write does not land
        assert esp.read_reg(wdt.config0) == 0
        esp.write_reg(wdt.wprotect, wdt.wkey)
        esp.write_reg(wdt.config1, 1_000_000)  # ~7 s: long enough to read back, then disarm
        esp.write_reg(wdt.config0, 1 << 31 | 5 << 28)
        assert esp.read_reg(wdt.config0) == 1 << 31 | 5 << 28
        esp.write_reg(wdt.config0, 0)  # what esptool does on USB-Serial/JTAG after connecting
        esp.write_reg(wdt.wprotect, 0)
        assert bench[0].device.state()["mode"] == "rom"


@pytest.mark.parametrize("chip,before", [("esp32", 0xFFFFFF), ("esp32c3", 0), ("esp32s3", 0)])
def test_rom_flash_answers_only_after_spi_attach(make_bench, chip, before):
    bench = make_bench(1, chip)
    with serial.serial_for_url(bench[0].url, baudrate=115200, timeout=0.5) as port:
        esp = cmds.detect_chip(port, connect_mode="no-reset")
        assert esp.flash_id() == before
        assert cmds.detect_flash_size(esp) is None  # esptool: "Detected flash size: Unknown"
        cmds.attach_flash(esp)
        assert esp.flash_id() == 0x1640EF
        assert cmds.detect_flash_size(esp) == "4MB"
