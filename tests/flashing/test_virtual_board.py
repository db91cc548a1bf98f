"""The virtual board on the wire: resets, baud rate, persistence, boot and faults."""

from __future__ import annotations

import random
import threading
import time

import pytest
import serial
from esptool import cmds
from esptool.util import FatalError

from flashing.firmware import build_firmware
from flashing.images import Partition, build_partition_table
from flashing.virtual.bench import ControlClient, VirtualBench
from flashing.virtual.device import VirtualDevice
from tests.conftest import esptool_cli, wait_for_state, wait_until


def flash_firmware(url: str, regions, connect_mode="no-reset"):
    esp = cmds.run_stub(cmds.detect_chip(url, connect_mode=connect_mode))
    cmds.attach_flash(esp)
    cmds.write_flash(esp, list(regions))
    return esp


def read_console(port: serial.Serial, until: bytes, timeout: float = 5.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while until not in buf and time.monotonic() < deadline:
        buf += port.read(port.in_waiting or 1)
    return buf


def wait_mode(dev: VirtualDevice, mode: str, timeout: float = 3.0) -> dict:
    return wait_state(dev, lambda st: st["mode"] == mode, timeout)


def wait_state(dev: VirtualDevice, ready, timeout: float = 3.0) -> dict:
    """The board's state once `ready(state)` holds."""
    return wait_for_state(dev, ready, timeout)


def wait_released(slot, timeout: float = 3.0) -> None:
    """Wait until the board has taken in everything a closed port sent it."""
    wait_until(lambda: not slot.socket.attached, "the board to let go of a closed port", timeout)


# -- reset circuit -----------------------------------------------------------------------

def test_default_reset_enters_download_and_hard_reset_boots_the_app(make_bench):
    bench = make_bench(1, "esp32")
    slot = bench[0]
    fw = build_firmware("esp32", app_size=200_000)
    flash_firmware(slot.url, fw.regions())._port.close()
    slot.device.reset("app")
    assert slot.device.state()["mode"] == "app"

    # esptool's own default-reset sequence, no special case anywhere
    esp = cmds.detect_chip(slot.url, connect_mode="default-reset")
    assert slot.device.state()["mode"] == "rom"
    esp = cmds.run_stub(esp)
    esp.change_baud(921600)
    cmds.reset_chip(esp, "hard-reset")  # esptool's HardReset: pulses RTS alone
    esp._port.close()
    assert wait_mode(slot.device, "app")["app"]["project_name"] == "relay"

    # the boot log, read with pyserial at 115200 after a reset through the same lines
    with serial.serial_for_url(slot.url, baudrate=115200, timeout=0.2) as port:
        port.dtr = False
        port.rts = True  # EN low
        wait_mode(slot.device, "reset")
        port.reset_input_buffer()
        port.rts = False  # EN high, IO0 high: boot from flash
        log = read_console(port, b"app: relay")
    text = log.decode()
    assert "rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)" in text
    assert "Project name:     relay" in text and "App version:      1.0.0" in text
    assert "Loaded app from partition at offset 0x10000" in text


def test_hard_reset_does_nothing_while_dtr_is_asserted(make_bench):
    # pyserial opens with DTR and RTS asserted; the classic circuit keeps EN high then
    bench = make_bench(1, "esp32c3")
    slot = bench[0]
    esp = cmds.detect_chip(slot.url, connect_mode="no-reset")
    cmds.reset_chip(esp, "hard-reset")
    esp._port.close()
    wait_released(slot)  # the board has seen the reset's line changes
    assert slot.device.state()["mode"] == "rom"


def test_baud_change_holds_until_reset_and_wrong_rate_garbles(make_bench):
    bench = make_bench(1, "esp32s3")
    slot = bench[0]

    def port(baud: int = 115200) -> serial.Serial:
        # the test owns each port: one that esptool fails on is closed here, never by the garbage collector
        return serial.serial_for_url(slot.url, baudrate=baud, timeout=0.5)

    with port() as p:
        esp = cmds.run_stub(cmds.detect_chip(p, connect_mode="no-reset"))
        esp.change_baud(921600)
    assert slot.device.state()["baud"] == 921600
    # a new session at 115200 talks to a stub that still listens at 921600: no sync
    with port() as p, pytest.raises(FatalError, match="Failed to connect"):
        cmds.detect_chip(p, connect_mode="no-reset", connect_attempts=1)
    # at the stub's rate the stub answers, and esptool finds it already running
    with port(921600) as p:
        assert cmds.detect_chip(p, baud=921600, connect_mode="no-reset").sync_stub_detected
    slot.device.reset("download")
    with port() as p:
        assert not cmds.detect_chip(p, connect_mode="no-reset").sync_stub_detected


# -- persistence -------------------------------------------------------------------------

def test_state_dir_keeps_flash_and_mac_and_file_is_current(tmp_path):
    state = tmp_path / "state"
    data = random.Random(3).randbytes(70_000)
    with VirtualBench(1, "esp32c3", state_dir=state, run_dir=tmp_path / "r1") as bench:
        mac = bench[0].device.mac_text
        esp = flash_firmware(bench[0].url, [(0x20000, data)])
        # another reader sees the write as soon as the command completed
        with open(state / "device-0.flash", "rb") as f:
            f.seek(0x20000)
            assert f.read(len(data)) == data
        esp._port.close()
    with VirtualBench(1, "esp32c3", state_dir=state, run_dir=tmp_path / "r2") as bench:
        assert bench[0].device.mac_text == mac
        assert bench[0].device.flash.read(0x20000, len(data)) == data


@pytest.mark.parametrize("size,code", [("2MB", 0x15), ("8MB", 0x17), ("16MB", 0x18)])
def test_flash_sizes_reported_by_rdid(make_bench, size, code):
    bench = make_bench(1, "esp32", flash_size=size)
    esp = cmds.run_stub(cmds.detect_chip(bench[0].url, connect_mode="no-reset"))
    cmds.attach_flash(esp)
    assert esp.flash_id() >> 16 == code
    assert cmds.detect_flash_size(esp) == size
    esp._port.close()


# -- boot ----------------------------------------------------------------------------------

@pytest.mark.parametrize("chip", ["esp32", "esp32c3", "esp32s3"])
def test_boot_log_of_a_valid_build(make_bench, chip):
    bench = make_bench(1, chip)
    fw = build_firmware(chip, project="relay", version="2.1.0", app_size=150_000)
    flash_firmware(bench[0].url, fw.regions())._port.close()
    st = bench[0].device.reset("app")
    assert st["mode"] == "app" and st["app"]["version"] == "2.1.0"
    log = bench[0].device.console_text()
    assert bench[0].device.chip.flash_boot in log
    assert f"boot.{chip}: SPI Flash Size : 4MB" in log
    assert "Calling app_main()" in log


def test_real_idf_build_boots(make_bench, shared_dir):
    build = shared_dir / "fixtures/idf-builds/esp32-valve-controller"
    regions = [(0x1000, (build / "bootloader/bootloader.bin").read_bytes()),
               (0x8000, (build / "partition_table/partition-table.bin").read_bytes()),
               (0x10000, (build / "valve_controller.bin").read_bytes()),
               (0x110000, (build / "spiffs.bin").read_bytes())]
    bench = make_bench(1, "esp32", flash_size="2MB")
    flash_firmware(bench[0].url, regions)._port.close()
    st = bench[0].device.reset("app")
    assert st["app"]["project_name"] == "valve_controller" and st["app"]["version"] == "1"
    assert "spiffs" in bench[0].device.console_text()


def _corrupt_app(fw):
    app = bytearray(fw.app)
    app[5000] ^= 0xFF
    return [(fw.bootloader_offset, fw.bootloader), (0x8000, fw.partition_table),
            (fw.app_offset, bytes(app))]


def test_boot_failures_print_the_real_text_and_loop(make_bench):
    bench = make_bench(4, "esp32")
    fw = build_firmware("esp32", app_size=100_000)
    wrong_chip = build_firmware("esp32c3", app_size=100_000)
    bad_table = bytearray(fw.partition_table)
    bad_table[40] ^= 1  # breaks the MD5 entry's check
    cases = [
        ([], "invalid header: 0xffffffff"),  # blank board
        (_corrupt_app(fw), "Checksum failed. Calculated"),
        ([(0x1000, fw.bootloader), (0x8000, bytes(bad_table)), (0x10000, fw.app)],
         "Partition table MD5 mismatch"),
        ([(0x1000, fw.bootloader), (0x8000, fw.partition_table), (0x10000, wrong_chip.app)],
         "mismatch chip ID, expected 0, found 5"),
    ]
    for slot, (regions, text) in zip(bench.slots, cases):
        if regions:
            flash_firmware(slot.url, regions)._port.close()
        st = slot.device.reset("app")
        assert st["mode"] == "bootloop" and text in st["boot_error"]
        assert text in slot.device.console_text()
    # the watchdog resets the board again and again
    assert wait_state(bench[0].device, lambda st: st["boots"] >= 3)["boots"] >= 3
    assert bench[0].device.chip.wdt_reset in bench[0].device.console_text()


# -- faults ----------------------------------------------------------------------------------

def test_fault_no_answer_board_in_app_without_auto_reset(make_bench):
    bench = make_bench(1, "esp32")
    dev = bench[0].device
    flash_firmware(bench[0].url, build_firmware("esp32", app_size=60_000).regions())._port.close()
    dev.set_fault("no_answer")
    dev.reset("app")  # a quiet app: no boot loop banners on the line
    with pytest.raises(FatalError, match="No serial data received"):
        cmds.detect_chip(bench[0].url, connect_mode="default-reset", connect_attempts=3)
    dev.clear_faults()
    esp = cmds.detect_chip(bench[0].url, connect_mode="default-reset", connect_attempts=3)
    esp._port.close()


def test_fault_wrong_boot_mode(make_bench):
    bench = make_bench(1, "esp32")
    dev = bench[0].device
    flash_firmware(bench[0].url, build_firmware("esp32", app_size=60_000).regions())._port.close()
    dev.set_fault("no_download_mode")
    dev.reset("app")
    with pytest.raises(FatalError, match=r"Wrong boot mode detected \(0x13\)"):
        cmds.detect_chip(bench[0].url, connect_mode="default-reset", connect_attempts=3)
    dev.clear_faults()
    cmds.detect_chip(bench[0].url, connect_mode="default-reset", connect_attempts=3)._port.close()


def test_fault_flash_chip_not_answering(make_bench, tmp_path):
    bench = make_bench(1, "esp32c3")
    dev = bench[0].device
    dev.set_fault("flash_dead")
    img = tmp_path / "x.bin"
    img.write_bytes(b"\x12" * 5000)
    r = esptool_cli("--port", bench[0].url, "--before", "no-reset", "write-flash", "0x10000", str(img))
    assert r.returncode == 2
    assert "Failed to communicate with the flash chip" in r.stdout + r.stderr
    assert "C400: Failed SPI operation" in r.stdout + r.stderr
    dev.clear_faults()
    dev.reset("download")
    r = esptool_cli("--port", bench[0].url, "--before", "no-reset", "write-flash", "0x10000", str(img))
    assert r.returncode == 0, r.stdout + r.stderr


def test_fault_secure_download_mode(make_bench, tmp_path):
    bench = make_bench(1, "esp32c3")
    dev = bench[0].device
    dev.set_fault("secure_download")
    dev.reset("download")
    r = esptool_cli("--port", bench[0].url, "--before", "no-reset", "read-mac")
    assert r.returncode == 2
    assert "in Secure Download Mode" in r.stdout
    assert "'read-mac' command is not available in Secure Download Mode" in r.stdout + r.stderr
    img = tmp_path / "x.bin"
    img.write_bytes(b"\x34" * 5000)
    r = esptool_cli("--port", bench[0].url, "--before", "no-reset", "write-flash", "0x10000", str(img))
    assert r.returncode == 0 and "Stub flasher is not supported in Secure Download Mode" in r.stdout + r.stderr
    assert dev.flash.read(0x10000, 5000) == img.read_bytes()
    dev.clear_faults()
    dev.reset("download")
    r = esptool_cli("--port", bench[0].url, "--before", "no-reset", "read-mac")
    assert r.returncode == 0 and dev.mac_text in r.stdout


def test_fault_line_noise(make_bench):
    # seeded noise garbles the same bytes every run: with this seed the first data block arrives corrupted
    bench = make_bench(1, "esp32", seed=1)
    dev = bench[0].device
    data = random.Random(8).randbytes(64_000)
    esp = cmds.run_stub(cmds.detect_chip(bench[0].url, connect_mode="no-reset"))
    cmds.attach_flash(esp)
    dev.set_fault("noise", 3e-4)
    with pytest.raises(FatalError) as failed:
        cmds.write_flash(esp, [(0x10000, data)])
    assert str(failed.value) == "Failed to write to target flash after seq 0 (result was C100: Bad data checksum)"
    esp._port.close()
    dev.clear_faults()
    dev.reset("download")
    esp = flash_firmware(bench[0].url, [(0x10000, data)])
    assert esp.read_flash(0x10000, len(data)) == data
    esp._port.close()


def test_fault_garble_above_fails_esptool_above_that_rate_only(make_bench, tmp_path):
    bench = make_bench(1, "esp32")
    dev = bench[0].device
    dev.set_fault("garble_above", 460800)
    img = tmp_path / "x.bin"
    img.write_bytes(random.Random(8).randbytes(64_000))
    args = ("--port", bench[0].url, "--before", "no-reset", "write-flash", "0x10000", str(img))
    r = esptool_cli("--baud", "921600", *args)
    assert r.returncode == 2
    assert ("Unable to verify flash chip connection (Serial data stream stopped: "
            "Possible serial noise or corruption.)") in r.stderr
    dev.reset("download")  # the stub left running at 921600 is gone
    r = esptool_cli("--baud", "460800", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert dev.flash.read(0x10000, 64_000) == img.read_bytes()


def test_fault_unplug_gives_pyserials_words_through_esptool(make_bench, tmp_path):
    bench = make_bench(1, "esp32")
    slot = bench[0]
    slot.device.unplug()
    r = esptool_cli("--port", slot.url, "read-mac")
    assert r.returncode == 2
    # pyserial names the port by its device node, as for a tty: the socket's path
    assert f"could not open port {slot.socket.path}: [Errno 2] No such file or directory" in r.stderr
    slot.device.replug()
    args = ("--port", slot.url, "--before", "no-reset", "--after", "no-reset",
            "read-flash", "0", "0x40000", str(tmp_path / "read.bin"))
    assert esptool_cli(*args).returncode == 0
    whole = slot.device.state()["bytes_in"]  # host bytes of the whole command
    slot.device.unplug()
    slot.device.replug()
    slot.device.set_fault("unplug_after", whole - 12)  # pulled during the last acknowledgements
    r = esptool_cli(*args)
    assert r.returncode == 1
    assert ("A serial exception error occurred: device reports readiness to read but returned no data "
            "(device disconnected or multiple access on port?)") in r.stderr


def test_fault_unplug_before_open_and_mid_write_with_replug(make_bench):
    bench = make_bench(1, "esp32")
    slot = bench[0]
    slot.device.unplug()
    with pytest.raises(FatalError, match="Could not open vesp:"):
        cmds.detect_chip(slot.url)
    slot.device.replug()

    data = random.Random(9).randbytes(200_000)
    esp = cmds.run_stub(cmds.detect_chip(slot.url, connect_mode="no-reset"))
    cmds.attach_flash(esp)
    slot.device.set_fault("unplug_after", 60_000)  # the cable comes out mid-write

    def put_back() -> None:  # once the board is out and has let go of the port
        wait_state(slot.device, lambda st: not st["powered"], timeout=30)
        wait_released(slot, timeout=30)
        slot.device.replug()

    replug = threading.Thread(target=put_back, name="test-replug")
    replug.start()
    try:
        cmds.write_flash(esp, [(0x10000, data)])  # esptool reconnects once per file
    finally:
        replug.join()
    assert slot.device.flash.read(0x10000, len(data)) == data
    esp._port.close()


def test_fault_unplug_mid_write_for_good(make_bench):
    bench = make_bench(1, "esp32c3")
    slot = bench[0]
    esp = cmds.run_stub(cmds.detect_chip(slot.url, connect_mode="no-reset"))
    cmds.attach_flash(esp)
    slot.device.set_fault("unplug_after", 30_000)
    with pytest.raises(serial.SerialException, match="device disconnected"):
        esp.WRITE_FLASH_ATTEMPTS = 1  # no reconnect wait: the board is gone
        cmds.write_flash(esp, [(0x10000, random.Random(2).randbytes(100_000))])
    slot.device.replug()
    assert slot.device.state()["powered"]


def test_swap_gives_a_new_blank_board(make_bench):
    bench = make_bench(1, "esp32")
    dev = bench[0].device
    flash_firmware(bench[0].url, [(0x10000, b"\x01" * 4096)])._port.close()
    old = dev.mac_text
    st = dev.swap()
    assert st["mac"] != old and st["boots"] == 1
    assert dev.flash.read(0x10000, 4096) == b"\xff" * 4096


def test_control_interface_from_another_process(make_bench):
    bench = make_bench(2, "esp32")
    client = ControlClient(bench.control.path)
    devices = client.request("list")["devices"]
    assert [d["index"] for d in devices] == [0, 1]
    assert devices[1]["pty"].startswith("/dev/pts/")
    assert client.request("fault", 1, name="noise", value=0.01)["state"]["faults"] == {"noise": 0.01}
    assert client.request("clear_faults", 1)["state"]["faults"] == {}
    assert client.request("reset", 0, mode="app")["state"]["mode"] == "bootloop"
    assert "invalid header" in client.request("console", 0)["console"]
    assert client.request("unplug", 0)["state"]["powered"] is False
    assert client.request("replug", 0)["state"]["powered"] is True
    with pytest.raises(RuntimeError, match="unknown fault"):
        client.request("fault", 0, name="smoke")


def test_partition_table_md5_entry_is_checked():
    parts = [Partition("factory", 0, 0, 0x10000, 0x100000)]
    table = build_partition_table(parts)
    from flashing.images import ImageError, parse_partition_table

    assert parse_partition_table(table)[0].name == "factory"
    broken = bytearray(table)
    broken[8] ^= 1
    with pytest.raises(ImageError, match="MD5"):
        parse_partition_table(bytes(broken))
