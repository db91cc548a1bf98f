"""The vesp:// port behaves as a tty does: free at close(), and a close ends a waiting read."""

from __future__ import annotations

import hashlib
import socket
import struct
import sys
import threading
import time

import pytest
import serial

from flashing.firmware import build_firmware
from flashing.nvs import NvsEntry, build_partition
from flashing.virtual.bench import ControlClient, VirtualBench
from flashing.virtual.slip import encode
from station.demo_broker import DemoBroker
from tests.conftest import wait_until
from tests.flashing.test_virtual_board import flash_firmware

REOPENS = 50
TALKING_REOPENS = 500  # the race with a talking board is rare per open: enough opens to meet it


@pytest.fixture
def busy_cpu():
    """Another thread of this process spinning the whole time (it contends for the GIL and a core)."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    t = threading.Thread(target=spin, name="test-cpu-burner")
    t.start()
    yield
    stop.set()
    t.join()


def reopen_many(bench: VirtualBench) -> None:
    slot = bench[0]
    payload = b"\x00\x01\x02\x03"
    before = slot.device.state()["bytes_in"]
    for i in range(REOPENS):
        port = serial.serial_for_url(slot.url, baudrate=115200, timeout=0.1)  # refused if still held
        port.write(payload)
        port.close()
    # everything written before each close reached the board, as a tty drains its output at close
    port = serial.serial_for_url(slot.url, baudrate=115200, timeout=0.1)
    port.close()
    assert slot.device.state()["bytes_in"] - before == REOPENS * len(payload)


def test_immediate_reopen_after_close_succeeds_every_time(make_bench):
    reopen_many(make_bench(1))


def test_immediate_reopen_after_close_succeeds_while_the_cpu_is_busy(make_bench, busy_cpu):
    reopen_many(make_bench(1))


def test_immediate_reopen_while_the_board_keeps_talking(make_bench):
    # a program on the board's pty keeps syncing: the ROM's answers reach the vesp host too
    bench = make_bench(1)
    slot = bench[0]
    sync = encode(struct.pack("<BBHI", 0, 0x08, 36, 0) + b"\x07\x07\x12\x20" + b"\x55" * 32)
    stop = threading.Event()

    def talk() -> None:
        with serial.Serial(slot.pty.path, 115200, timeout=0) as pty:
            while not stop.is_set():
                pty.write(sync)
                pty.reset_input_buffer()
                stop.wait(0.002)

    talker = threading.Thread(target=talk, name="test-pty-talker")
    talker.start()
    heard = b""
    try:
        for i in range(TALKING_REOPENS):
            with serial.serial_for_url(slot.url, baudrate=115200, timeout=0.01) as port:
                heard += port.read(64)
    finally:
        stop.set()
        talker.join()
    assert b"\x01\x08" in heard  # the board was answering syncs all along


def test_a_second_program_is_still_refused_while_the_port_is_open(make_bench):
    bench = make_bench(1)
    with serial.serial_for_url(bench[0].url, timeout=0.1):
        with pytest.raises(serial.SerialException, match="Device or resource busy"):
            serial.serial_for_url(bench[0].url)


def waiting_in(thread: threading.Thread, function: str) -> bool:
    """The thread's innermost Python frame is `function` (blocked in a C call it made, or about to be)."""
    frame = sys._current_frames().get(thread.ident)
    return frame is not None and frame.f_code.co_name == function


def test_close_from_another_thread_wakes_a_waiting_read(make_bench):
    bench = make_bench(1)
    port = serial.serial_for_url(bench[0].url, baudrate=115200, timeout=5)
    port.reset_input_buffer()  # the board in download mode says nothing more
    outcome: dict[str, object] = {}

    def read() -> None:
        try:
            outcome["data"] = port.read(100)
        except serial.SerialException as exc:
            outcome["error"] = str(exc)
        outcome["woke"] = time.monotonic()

    reader = threading.Thread(target=read, name="test-reader")
    reader.start()
    try:
        wait_until(lambda: waiting_in(reader, "_fill") or not reader.is_alive(), "the reader waits in _fill", 5)
        assert reader.is_alive(), outcome
        closed = time.monotonic()
        port.close()
    finally:
        reader.join()
    assert outcome["woke"] - closed < 0.5
    assert outcome.get("error", "").startswith("read failed: [Errno 9]"), outcome  # as pyserial's POSIX Serial
    with serial.serial_for_url(bench[0].url, timeout=0.1):
        pass  # and the port is free again


def test_closing_a_bench_leaves_no_thread_behind(tmp_path):
    before = set(threading.enumerate())
    broker = DemoBroker(accounts={hashlib.sha256(b"unit@example.com").hexdigest(): "t1"})
    bench = VirtualBench(2, "esp32", run_dir=tmp_path / "run", seed=7)
    held = None
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fw = build_firmware("esp32", app_size=60_000)
        config = build_partition("2smart", [
            NvsEntry("ssid", "string", "line-wifi"), NvsEntry("psk", "string", "pw"),
            NvsEntry("email", "string", "unit@example.com"), NvsEntry("token", "string", "t1"),
            NvsEntry("host", "string", broker.host), NvsEntry("brport", "string", str(broker.port))], 0x6000)
        flash_firmware(bench[0].url, [*fw.regions(), (0x190000, config)])._port.close()
        flash_firmware(bench[1].url, fw.regions())._port.close()
        for slot in bench.slots:
            slot.device.reset("app")
        # board 0 logged in to the broker, board 1 serving pairing on its access point
        wait_until(lambda: "connected, publishing" in bench[0].device.console_text(), "board 0 logged in", 10,
                   why=bench[0].device.console_text)
        assert bench[1].device.state()["app_mode"] == "ap"
        held = serial.serial_for_url(bench[1].url, timeout=0.1)  # a host that keeps the port open
        assert len(ControlClient(bench.control.path).request("list")["devices"]) == 2
        control.connect(str(bench.control.path))  # a control client that stays connected
        expected = {"vesp-control", "vdev-0-mqtt", "vdev-1-http", "vdev-1-conn", "mqtt-broker"}

        def started() -> set[str]:
            return {t.name for t in threading.enumerate() if t not in before}

        # the board accepts a port's connection on its own thread: on a loaded host it starts a moment later
        wait_until(lambda: expected <= started(), "the boards', control's and broker's threads", 10,
                   why=lambda: str(expected - started()))
        assert expected <= started()
    finally:
        bench.close()
        broker.close()
        if held is not None:
            held.close()
        control.close()
    assert [t.name for t in threading.enumerate() if t not in before] == []


def test_a_failed_esptool_connect_frees_the_port_at_once(make_bench):
    from esptool import cmds
    from esptool.util import FatalError

    bench = make_bench(1)
    bench[0].device.reset("app")  # a blank board out of download mode: nothing answers a sync
    with pytest.raises(FatalError, match="Failed to connect") as failed:
        cmds.detect_chip(bench[0].url, connect_mode="no-reset", connect_attempts=1)
    # the traceback still holds esptool's loader and its port object: only a real close frees the port
    assert failed.traceback
    serial.serial_for_url(bench[0].url, timeout=0.1).close()
