"""ESP32-C3/S3 on their own USB port (USB-Serial/JTAG), with the real esptool and the station's session.

The controller reads DTR/RTS as its reference manual's table says: RTS 0/DTR 1 sets the
download flag, RTS 0/DTR 0 clears it, RTS 1/DTR 0 resets the chip. esptool knows the port
by its VID:PID (303a:1001) and uses its USB-JTAG reset; the bridge's reset boots the app.
"""

from __future__ import annotations

import pytest
import serial
from esptool import cmds
from esptool.reset import UnixTightReset, USBJTAGSerialReset

from flashing.session import SessionError, UnitSession
from flashing.usb import usb_identity
from tests.flashing.test_esptool_resets import esptool, firmware_files, in_app, wait_for

USB_CHIPS = ["esp32c3", "esp32s3"]
CHIP_NAMES = {"esp32c3": "ESP32-C3", "esp32s3": "ESP32-S3"}


@pytest.mark.parametrize("chip", USB_CHIPS)
def test_esptool_cli_with_its_default_resets(make_bench, tmp_path, chip):
    bench = make_bench(1, chip, usb_serial_jtag=True)
    url, dev = bench[0].url, bench[0].device
    out = esptool(url, "chip-id")
    assert CHIP_NAMES[chip] in out and "USB-Serial/JTAG" in out  # esptool found VID:PID 303a:1001
    assert "Failed to get VID/PID" not in out
    regions, (app_offset, app) = firmware_files(chip, tmp_path)
    esptool(url, "-b", "921600", "write-flash", *regions)
    wait_for(dev, in_app)
    assert f"rst:{dev.chip.usb_reset},boot:{dev.chip.flash_boot}" in dev.console_text()
    assert "Verification successful" in esptool(url, "--no-stub", "verify-flash", *regions)
    back = tmp_path / "back.bin"
    esptool(url, "read-flash", hex(app_offset), str(len(app)), str(back))
    assert back.read_bytes() == app


def test_esptool_api_default_reset_write_and_any_baud(make_bench, tmp_path):
    bench = make_bench(1, "esp32s3", usb_serial_jtag=True)
    url, dev = bench[0].url, bench[0].device
    with serial.serial_for_url(url, baudrate=115200, timeout=0.5) as port:
        esp = cmds.detect_chip(port)  # default-reset: esptool picks the USB-JTAG sequence itself
        assert esp.get_usb_mode() == "USB-Serial/JTAG"
        esp = cmds.run_stub(esp)
        esp.change_baud(921600)
        cmds.attach_flash(esp)
        data = bytes(range(256)) * 64
        cmds.write_flash(esp, [(0x20000, data)])
        assert esp.read_flash(0x20000, len(data)) == data
    # CDC-ACM has no bit rate: a new session at 115200 finds the stub the last one left at 921600
    with serial.serial_for_url(url, baudrate=115200, timeout=0.5) as port:
        assert cmds.detect_chip(port, connect_mode="no-reset").sync_stub_detected
    assert dev.state()["mode"] == "stub"


def test_the_bridge_reset_boots_the_app_and_the_usb_reset_the_loader(make_bench, tmp_path):
    bench = make_bench(1, "esp32c3", usb_serial_jtag=True)
    url, dev = bench[0].url, bench[0].device
    regions, _ = firmware_files("esp32c3", tmp_path)
    esptool(url, "write-flash", *regions)
    wait_for(dev, in_app)
    with serial.serial_for_url(url, baudrate=115200, timeout=0.5) as port:
        before = dev.state()
        assert before["mode"] == "app"  # opening the port (DTR and RTS asserted) resets nothing
        UnixTightReset(port, 0.05).reset()  # the dev-board sequence: reset with the download flag clear
        after = wait_for(dev, lambda s: s["boots"] > before["boots"] and in_app(s))
        assert after["boots"] == before["boots"] + 1
        USBJTAGSerialReset(port).reset()
        wait_for(dev, lambda s: s["mode"] == "rom")
        assert f"rst:{dev.chip.usb_reset},boot:{dev.chip.download_boot}" in dev.console_text()


def test_station_session_resets_by_the_ports_identity(make_bench, tmp_path):
    bench = make_bench(1, "esp32c3", usb_serial_jtag=True)
    url = bench[0].url
    regions, _ = firmware_files("esp32c3", tmp_path)
    esptool(url, "write-flash", *regions)
    with UnitSession(url) as s:
        assert s.native_usb
        assert s.connect("esp32c3").chip == "ESP32-C3"
        s.prepare_flash(921600)
        log = s.boot()
        assert "USB_UART_CHIP_RESET" in log.text and "relay" in log.text
    # a fixture that hides the VID:PID, driven as a bridge: the operator is told why
    with UnitSession(url, native_usb=False) as s, pytest.raises(SessionError, match="chip's own USB port"):
        s.connect("esp32c3")


def test_usb_identity_of_virtual_ports(make_bench):
    native = make_bench(1, "esp32c3", usb_serial_jtag=True)[0]
    bridge = make_bench(1, "esp32")[0]
    usb = usb_identity(native.url)
    assert (usb.vid_pid, usb.native_usb, usb.serial_number) == ("303a:1001", True, native.device.mac_text.upper())
    uart = usb_identity(bridge.url)
    assert (uart.vid_pid, uart.native_usb, uart.product) == ("10c4:ea60", False,
                                                             "CP2102N USB to UART Bridge Controller")
    native.device.unplug()
    assert usb_identity(native.url) is None  # gone from the bus with the cable
    native.device.replug()
    assert usb_identity(native.url) == usb


def test_native_usb_is_for_chips_that_have_it(make_bench):
    with pytest.raises(ValueError, match="no USB-Serial/JTAG"):
        make_bench(1, "esp32", usb_serial_jtag=True)


def test_rtc_watchdog_outlives_a_usb_reset_until_esptool_disarms_it(make_bench):
    # the USB controller resets the digital core only: an armed RTC watchdog fires in download mode,
    # which is why esptool disables it after connecting through USB-Serial/JTAG
    bench = make_bench(1, "esp32c3", usb_serial_jtag=True)
    dev = bench[0].device
    wdt = dev.chip.rtc_wdt

    def arm(esp, seconds: float) -> None:
        esp.write_reg(wdt.wprotect, wdt.wkey)
        esp.write_reg(wdt.config1, int(seconds * wdt.slow_clock_hz))
        esp.write_reg(wdt.config0, 1 << 31 | 5 << 28)
        esp.write_reg(wdt.wprotect, 0)

    with serial.serial_for_url(bench[0].url, baudrate=115200, timeout=0.5) as port:
        arm(cmds.detect_chip(port, connect_mode="no-reset"), 0.5)
        USBJTAGSerialReset(port).reset()
        assert "waiting for download" in dev.console_text()
        wait_for(dev, lambda s: f"rst:{dev.chip.wdt_reset}" in dev.console_text())
        arm(cmds.detect_chip(port), 5.0)  # default reset: the USB sequence into download mode
        assert dev.state()["watchdog_armed"]
        esp = cmds.detect_chip(port)  # connects, then writes the watchdog off
        assert esp.read_reg(wdt.config0) == 0
        assert not dev.state()["watchdog_armed"]
