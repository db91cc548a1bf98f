"""`station flash` on an ESP32-C3 on its own USB port (USB-Serial/JTAG), the boot check on."""

from __future__ import annotations

from flashing.firmware import build_firmware, twosmart_manifest
from flashing.virtual.bench import VirtualBench
from tests.station.conftest import run_station
from tests.station.test_pipeline_refusals import finished, write_profile


def test_station_flash_on_a_native_usb_c3_boots_the_app(station_env, capsys):
    fw = build_firmware("esp32c3", project="node", version="1.0.0", app_size=100_000,
                        manifest=twosmart_manifest("other"))
    name = write_profile(station_env, "node-c3", "esp32c3", [
        ("bootloader", fw.bootloader_offset, fw.bootloader), ("partition-table", 0x8000, fw.partition_table),
        ("app", 0x10000, fw.app)])
    with VirtualBench(1, "esp32c3", run_dir=station_env / "run", usb_serial_jtag=True) as bench:
        rc, out, err = run_station(capsys, "flash", "--profile", name, "--port", bench[0].url, "--json")
        assert rc == 0, err
        unit = finished(out)[bench[0].url]
        assert (unit["outcome"], unit["chip"]) == ("passed", "ESP32-C3")
        console = bench[0].device.console_text()
        assert f"rst:{bench[0].device.chip.usb_reset},boot:0xc (SPI_FAST_FLASH_BOOT)" in console  # booted via USB
        assert bench[0].device.state()["app"]["project_name"] == "node"


def test_station_virtual_refuses_native_usb_on_an_esp32(station_env, capsys):
    rc, _, err = run_station(capsys, "virtual", "--chip", "esp32", "--usb-serial-jtag",
                             "--run-dir", str(station_env / "run"))
    assert rc == 2 and "no USB-Serial/JTAG controller" in err
