"""`station flash` on an ESP32-C3 on its own USB port (USB-Serial/JTAG), the boot check on."""

from __future__ import annotations

from flashing.virtual.bench import VirtualBench
from tests.station.conftest import run_station
from tests.station.test_pipeline_refusals import c3_profile, finished


def test_station_flash_on_a_native_usb_c3_boots_the_app(station_env, capsys):
    name = c3_profile(station_env)
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


def test_the_profile_says_how_units_are_connected(station_env, capsys):
    name = c3_profile(station_env)
    path = station_env / "profiles" / name / "profile.toml"
    text = path.read_text()
    # usb-serial-jtag: `--virtual` boards are wired through the chip's own USB port too
    path.write_text(text.replace('device_class = "other"', 'device_class = "other"\nconnection = "usb-serial-jtag"'))
    rc, out, err = run_station(capsys, "flash", "--profile", name, "--virtual", "1", "--json")
    assert rc == 0, err
    assert [u["outcome"] for u in finished(out).values()] == ["passed"]
    # uart-bridge on a board that is on its own USB port: the bridge's reset boots its app, and the operator is told
    path.write_text(text.replace('device_class = "other"', 'device_class = "other"\nconnection = "uart-bridge"'))
    with VirtualBench(1, "esp32c3", run_dir=station_env / "run", usb_serial_jtag=True) as bench:
        bench[0].device.reset("app")
        rc, out, err = run_station(capsys, "flash", "--profile", name, "--port", bench[0].url, "--json")
        bad = finished(out)[bench[0].url]
        assert rc == 1 and (bad["outcome"], bad["failed_step"]) == ("failed", "connect")
        assert "chip's own USB port" in bad["error"]
    path.write_text(text.replace('chip = "esp32c3"', 'chip = "esp32"').replace(
        'device_class = "other"', 'device_class = "other"\nconnection = "usb-serial-jtag"'))
    rc, _, err = run_station(capsys, "flash", "--profile", name, "--virtual", "1")
    assert rc == 2 and "esp32 has no USB-Serial/JTAG controller" in err
