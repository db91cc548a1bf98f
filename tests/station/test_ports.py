"""Ports and fixture slots: what `station ports` sees, slots bound to USB locations, learning them, udev names.

No USB bridge exists here, so pyserial's port list is the one seam replaced: by real
`ListPortInfo` objects filled as pyserial's Linux backend fills them (a single-interface
bridge's location is the USB device, "1-1.4.2"; the ESP's USB-Serial/JTAG has three
interfaces, so its location carries the interface, "1-1.4.1:1.0").
"""

from __future__ import annotations

import os

import pytest
from serial.tools import list_ports
from serial.tools.list_ports_common import ListPortInfo

from flashing.ports import fixture_ports, fixture_slots, serial_ports, udev_rules
from flashing.virtual.bench import VirtualBench
from station import ports as station_ports
from station.config import ConfigError, StationConfig
from station.pipeline import UnitJob, provision_unit
from station.ports import Stopped, learn, with_slots
from station.runner import open_station
from tests.station.conftest import json_lines, run_station

FILTERS = ("10c4:ea60", "1a86:7523", "0403:6001", "303a:1001")


def linux_port(device: str, vid: int, pid: int, serial_number: str | None, location: str,
               manufacturer: str | None, product: str, interface: str | None = None) -> ListPortInfo:
    """A port as pyserial's list_ports_linux.SysFS fills it from sysfs (then its own description and hwid)."""
    info = ListPortInfo(device, skip_link_detection=True)
    info.vid, info.pid, info.serial_number, info.location = vid, pid, serial_number, location
    info.manufacturer, info.product, info.interface = manufacturer, product, interface
    info.apply_usb_info()
    return info


def cp2102n(device="/dev/ttyUSB10", location="1-1.4.2"):
    return linux_port(device, 0x10C4, 0xEA60, "9c1d5e9a3b7ced11a0c2b5e8f4d61c7a", location, "Silicon Labs",
                      "CP2102N USB to UART Bridge Controller", "CP2102N USB to UART Bridge Controller")


def ch340(device="/dev/ttyUSB2", location="1-1.4.3"):
    return linux_port(device, 0x1A86, 0x7523, None, location, None, "USB Serial")  # no serial number


def ftdi(device="/dev/ttyUSB0", location="1-1.4.4"):
    return linux_port(device, 0x0403, 0x6001, "A50285BI", location, "FTDI", "FT232R USB UART", "FT232R USB UART")


def esp_jtag(device="/dev/ttyACM0", location="1-1.4.1:1.0"):
    return linux_port(device, 0x303A, 0x1001, "F4:12:FA:5A:3C:9D", location, "Espressif",
                      "USB JTAG/serial debug unit")


def onboard():
    return ListPortInfo("/dev/ttyS0", skip_link_detection=True)  # a PC's own UART: no USB, no location


def test_the_fixtures_are_what_pyserial_makes_of_them():
    assert cp2102n().hwid == "USB VID:PID=10C4:EA60 SER=9c1d5e9a3b7ced11a0c2b5e8f4d61c7a LOCATION=1-1.4.2"
    assert cp2102n().description == "CP2102N USB to UART Bridge Controller - CP2102N USB to UART Bridge Controller"
    assert ch340().hwid == "USB VID:PID=1A86:7523 LOCATION=1-1.4.3" and ch340().description == "USB Serial"
    assert esp_jtag().hwid == "USB VID:PID=303A:1001 SER=F4:12:FA:5A:3C:9D LOCATION=1-1.4.1:1.0"


def test_without_a_binding_the_slots_are_the_bridges_in_natural_order():
    listed = [cp2102n("/dev/ttyUSB10"), ch340("/dev/ttyUSB2"), ftdi("/dev/ttyUSB0"), esp_jtag(), onboard()]
    slots = fixture_slots(serial_ports(lambda: listed), ("10c4:ea60", "1a86:7523", "0403:6001"), None, 16)
    # ttyUSB2 before ttyUSB10 (a string sort puts 10 first); the ESP's own USB is not in these filters
    assert [(s.number, s.name) for s in slots] == [(1, "/dev/ttyUSB0"), (2, "/dev/ttyUSB2"), (3, "/dev/ttyUSB10")]
    assert all(s.location is None for s in slots)
    assert fixture_ports(("10c4:ea60", "1a86:7523", "0403:6001"), comports=lambda: listed) == [s.name for s in slots]
    capped = fixture_slots(serial_ports(lambda: listed), FILTERS, None, 2)
    assert [s.name for s in capped] == ["/dev/ttyACM0", "/dev/ttyUSB0"]


def test_a_bound_slot_is_the_same_socket_whatever_number_its_port_gets(tmp_path):
    bound = {1: "1-1.4.2", 2: "1-1.4.3", 3: "1-1.4.1", 4: "1-1.4.9"}
    before = [cp2102n("/dev/ttyUSB10"), ch340("/dev/ttyUSB2"), esp_jtag("/dev/ttyACM0")]
    after_replug = [cp2102n("/dev/ttyUSB3"), ch340("/dev/ttyUSB11"), esp_jtag("/dev/ttyACM1")]
    dev = tmp_path / "dev"
    for listed in (before, after_replug):
        slots = fixture_slots(serial_ports(lambda: listed, dev), FILTERS, bound, None, dev)
        assert [s.number for s in slots] == [1, 2, 3, 4]
        assert slots[0].port.serial_number == "9c1d5e9a3b7ced11a0c2b5e8f4d61c7a"  # the CP2102N, by location
        assert slots[1].port.vid_pid == "1a86:7523" and slots[1].port.bridge == "CH340"
        # bound by USB device, the ESP's port is found at its interface 1.0
        assert slots[2].port.native_usb and slots[2].port.location == "1-1.4.1:1.0"
        # nothing in socket 4: the slot stays, watched under the name the udev rules give it
        assert not slots[3].here and slots[3].name == str(dev / "station/slot-4")
    assert slots[0].name == "/dev/ttyUSB3" and slots[1].name == "/dev/ttyUSB11"


def test_a_bound_slot_is_opened_by_its_stable_name(tmp_path):
    dev = tmp_path / "dev"
    tty = dev / "ttyUSB7"
    (dev / "serial/by-path").mkdir(parents=True)
    tty.write_text("")
    link = dev / "serial/by-path/pci-0000:00:14.0-usb-0:1.4.2:1.0-port0"
    link.symlink_to(tty)
    slots = fixture_slots(serial_ports(lambda: [cp2102n(str(tty))], dev), FILTERS, {1: "1-1.4.2"}, None, dev)
    assert slots[0].name == str(link)  # replugged, the board comes back under the same name
    (dev / "station").mkdir()
    (dev / "station/slot-1").symlink_to(tty)
    slots = fixture_slots(serial_ports(lambda: [cp2102n(str(tty))], dev), FILTERS, {1: "1-1.4.2"}, None, dev)
    assert slots[0].name == str(dev / "station/slot-1")


def test_station_ports_lists_what_each_port_is(station_env, monkeypatch, capsys):
    listed = [cp2102n(), ch340(), ftdi(), esp_jtag(), onboard()]
    monkeypatch.setattr(list_ports, "comports", lambda *a, **k: listed)
    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text() + '[ports]\nusb = ["10c4:ea60", "303a:1001"]\n'
                   '[ports.slots]\n1 = "1-1.4.1"\n2 = "1-1.4.2"\n3 = "1-1.4.5"\n')
    rc, out, err = run_station(capsys, "ports", "--json")
    assert rc == 0, err
    rows = {r["port"]: r for r in json_lines(out)}
    assert rows["/dev/ttyACM0"] | {"stable_name": None} == {
        "slot": 1, "port": "/dev/ttyACM0", "vid_pid": "303a:1001", "location": "1-1.4.1:1.0",
        "serial_number": "F4:12:FA:5A:3C:9D", "bridge": "ESP USB-Serial/JTAG", "native_usb": True,
        "stable_name": None}
    assert rows["/dev/ttyUSB10"]["slot"] == 2 and rows["/dev/ttyUSB10"]["bridge"] == "CP210x"
    assert rows["/dev/ttyUSB2"]["bridge"] == "CH340" and rows["/dev/ttyUSB2"]["serial_number"] is None
    assert rows["/dev/ttyUSB0"]["bridge"] == "FTDI FT232R" and rows["/dev/ttyUSB0"]["slot"] is None
    assert rows["/dev/ttyS0"]["location"] is None and not rows["/dev/ttyS0"]["native_usb"]
    assert rows[None]["slot"] == 3 and rows[None]["location"] == "1-1.4.5"  # bound, nothing there
    listed.append(linux_port("/dev/ttyUSB9", 0x10C4, 0xEA60, "\x1b]0;owned\x07\x1b[2J", "1-2", "\x1b[31m",
                             "[b]bridge[/b]"))  # descriptor strings are the device's words: data
    rc, out, err = run_station(capsys, "ports")
    assert "\x1b" not in out and "\x07" not in out
    lines = out.splitlines()
    assert lines[0].split() == ["SLOT", "PORT", "VID:PID", "LOCATION", "SERIAL", "BRIDGE", "NATIVE", "USB"]
    assert lines[1].split()[:4] == ["1", "/dev/ttyACM0", "303a:1001", "1-1.4.1:1.0"] and lines[1].endswith("yes")
    assert "slots bound to USB locations" in err


def test_flash_takes_the_bound_slots_in_slot_order(station_env, monkeypatch, capsys):
    for var in ("ESPPORT", "ESPTOOL_PORT", "ESPBAUD", "ESPTOOL_BAUD"):
        monkeypatch.delenv(var, raising=False)
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        # virtual boards behind ports pyserial lists at two USB locations; slot 1 is the later device name
        listed = [cp2102n(bench[0].url, "1-1.4.2"), ch340(bench[1].url, "1-1.4.3")]
        monkeypatch.setattr(list_ports, "comports", lambda *a, **k: listed)
        cfg = station_env / "station.toml"
        cfg.write_text(cfg.read_text() + '[ports.slots]\n1 = "1-1.4.3"\n2 = "1-1.4.2"\n')
        rc, out, err = run_station(capsys, "flash", "--json", "--smoke", "none")
        assert rc == 0, err[-2000:]
        assert f"fixture ports (slots bound in station.toml [ports.slots]): {bench[1].url} {bench[0].url}" in err
        assert {e["port"] for e in json_lines(out) if e.get("event") == "unit_finished"} == {bench[0].url, bench[1].url}


def test_learn_binds_each_slot_to_the_port_that_appears():
    polls = iter([
        [ch340()],  # before: the CH340 is already there
        [ch340(), cp2102n()],  # slot 1: the CP2102N appears
        [ch340(), cp2102n(), ftdi("/dev/ttyUSB5", "1-2")],  # not a fixture bridge (filters below): left out
        [ch340(), cp2102n(), ftdi("/dev/ttyUSB5", "1-2"), onboard()],  # no USB location: left out
        [cp2102n(), ftdi("/dev/ttyUSB5", "1-2")],  # the CP2102N is already slot 1 ...
        [cp2102n(), ftdi("/dev/ttyUSB5", "1-2")],
        [ftdi("/dev/ttyUSB5", "1-2")],  # ... so the operator replugs it: told so, not taken again
        [cp2102n("/dev/ttyUSB4"), ftdi("/dev/ttyUSB5", "1-2")],
        [cp2102n("/dev/ttyUSB4"), ftdi("/dev/ttyUSB5", "1-2"), ch340("/dev/ttyUSB6")],  # slot 2: CH340 replugged
        [cp2102n("/dev/ttyUSB4"), ch340("/dev/ttyUSB6"), esp_jtag()],  # slot 3: a native-USB board
    ])
    said: list[str] = []
    got = learn(3, lambda: serial_ports(lambda: next(polls)), said.append, ("10c4:ea60", "1a86:7523", "303a:1001"),
                timeout_s=5, interval_s=0)
    assert got == {1: "1-1.4.2", 2: "1-1.4.3", 3: "1-1.4.1:1.0"}
    text = "\n".join(said)
    assert "slot 1: plug a board" in text and "slot 1 = 1-1.4.2 (CP210x, 10c4:ea60, /dev/ttyUSB10)" in text
    assert "/dev/ttyUSB5 (FTDI FT232R, 0403:6001) is not one of the fixture's bridges" in text
    assert "/dev/ttyS0 has no USB location" in text
    assert "/dev/ttyUSB4 is slot 1 (1-1.4.2), already learned" in text
    assert "slot 3 = 1-1.4.1:1.0 (ESP USB-Serial/JTAG, native USB, 303a:1001, /dev/ttyACM0)" in text


def test_learn_gives_up_without_a_board_and_writes_nothing():
    with pytest.raises(Stopped, match="no new port appeared for slot 1 within 0.2 s"):
        learn(2, lambda: [], lambda _: None, timeout_s=0.2, interval_s=0.01)


STATION_TOML = '''# line 1 station (hand-written)
station_id = "line-1"  # the record's station id
database = "station.db"
key_file = "station.key"

[ports]
# the fixture's bridges
usb = ["10c4:ea60", "1a86:7523"]

[ports.slots]
# socket = hub port, counted from the left
1 = "1-1.1"
2 = "1-1.2"

[smoke]
timeout_s = 10  # seconds
'''


def test_learned_slots_replace_the_table_and_nothing_else(tmp_path):
    path = tmp_path / "station.toml"
    out = with_slots(STATION_TOML, {1: "1-1.4.2", 2: "1-1.4.3", 3: "1-1.4.1:1.0"}, path)
    assert out == STATION_TOML.replace('1 = "1-1.1"\n2 = "1-1.2"\n',
                                       '1 = "1-1.4.2"\n2 = "1-1.4.3"\n3 = "1-1.4.1:1.0"\n')
    plain = "station_id = \"line-1\"\n[smoke]\ntimeout_s = 10\n"
    added = with_slots(plain, {1: "1-1.4.2"}, path)
    assert added.startswith(plain) and added.endswith('[ports.slots]\n# slot = USB location of its socket\'s port '
                                                      '(`station ports learn`)\n1 = "1-1.4.2"\n')
    with pytest.raises(ConfigError, match="write it as its own \\[ports.slots\\] table"):
        with_slots('[ports]\nslots = { 1 = "1-1.1" }\n', {1: "1-1.4.2"}, path)


def test_station_ports_learn_writes_station_toml(station_env, monkeypatch, capsys):
    cfg = station_env / "station.toml"
    cfg.write_text(STATION_TOML)
    os.chmod(cfg, 0o640)
    polls = iter([[], [cp2102n()], [cp2102n(), ch340()]])
    last: list = []

    def comports(*a, **k):
        last[:] = next(polls, last)
        return list(last)

    monkeypatch.setattr(list_ports, "comports", comports)
    monkeypatch.setattr(station_ports, "POLL_S", 0)
    rc, out, err = run_station(capsys, "ports", "learn", "--slots", "2", "--timeout", "5")
    assert rc == 0, err
    assert out == '1 = "1-1.4.2"\n2 = "1-1.4.3"\n'
    assert StationConfig.load(cfg).ports.slots == {1: "1-1.4.2", 2: "1-1.4.3"}
    text = cfg.read_text()
    assert "# socket = hub port, counted from the left" in text and 'timeout_s = 10  # seconds' in text
    assert cfg.stat().st_mode & 0o777 == 0o640
    rc, out, err = run_station(capsys, "ports", "udev-rules")
    assert rc == 0, err
    rules = [line for line in out.splitlines() if not line.startswith("#")]
    assert rules == ['SUBSYSTEM=="tty", KERNELS=="1-1.4.2", SYMLINK+="station/slot-1", ENV{ID_MM_DEVICE_IGNORE}="1"',
                     'SUBSYSTEM=="tty", KERNELS=="1-1.4.3", SYMLINK+="station/slot-2", ENV{ID_MM_DEVICE_IGNORE}="1"']


@pytest.mark.parametrize("table,words", [
    ('1 = "1-1.1"\n3 = "1-1.3"\n', "ports.slots: slot 2 is missing: number the slots 1 to 3 without gaps"),
    ('1 = "1-1.1"\n2 = "1-1.1"\n', 'ports.slots: slots 1 and 2 are both bound to "1-1.1": one socket each'),
    ('one = "1-1.1"\n', 'ports.slots.one: "one" is not a slot number'),
    ('1 = "1-1.1"\n"\u0661" = "1-1.2"\n', 'is not a slot number'),  # an Arabic-Indic one: not a second slot 1
    ('1 = "1-1.1\\"\\nRUN+=\\"/bin/sh"\n', "is not a USB location such as"),
    ('1 = 11\n', "ports.slots.1: expected text in quotes, got 11"),
])
def test_a_slot_table_that_is_not_a_fixture_is_refused(tmp_path, table, words):
    path = tmp_path / "station.toml"
    path.write_text("[ports.slots]\n" + table)
    with pytest.raises(ConfigError) as exc:
        StationConfig.load(path)
    assert words in str(exc.value)


def test_udev_rules_never_carry_text_that_is_not_a_location():
    with pytest.raises(ValueError):
        udev_rules({1: '1-1" RUN+="/bin/sh'})


# -- a port that cannot reset the board -----------------------------------------------------

def test_a_port_whose_lines_do_not_reach_the_board_says_it_cannot_reset(station_env):
    ctx = open_station("relay", station_env / "station.toml")
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        dev = bench[0].device
        dev.reset("download")  # BOOT held and EN pressed by hand: the loader answers ...
        dev.set_fault("no_answer", True)  # ... but DTR/RTS are not wired to EN and IO0
        r = provision_unit(UnitJob(bench[0].url), ctx, lambda e: None)
    ctx.close()
    assert r.outcome == "failed" and r.failed_step == "boot", r.error
    assert "this port cannot reset the board" in r.error and "replace" not in r.remedy
    assert "DTR/RTS wiring" in r.remedy


def test_the_readme_describes_the_ports_keys_as_the_schema_does():
    from station.config import Ports
    from station.schema import reference_rows
    from tests.station.conftest import REPO

    readme = (REPO / "README.md").read_text()
    for key, kind, default, meaning in reference_rows(Ports, "ports."):
        assert f"| `{key}` | {kind} | {default} | {meaning} |" in readme


class NetworkPort:
    """A raw TCP serial server (as ser2net gives) in front of a board's pty: bytes only, no modem lines."""

    def __init__(self, pty_path: str):
        import select
        import socket
        import threading

        import serial

        self._select = select.select
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"socket://127.0.0.1:{self.server.getsockname()[1]}"
        self.tty = serial.Serial(pty_path, 115200, timeout=0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="network-port")
        self.thread.start()

    def _run(self) -> None:
        conns = []
        while not self.stop.is_set():
            ready, _, _ = self._select([self.server, self.tty.fileno(), *conns], [], [], 0.05)
            for r in ready:
                if r is self.server:
                    conns = [self.server.accept()[0]]  # one client at a time, the latest
                elif r == self.tty.fileno():
                    data = self.tty.read(4096)
                    for c in conns:
                        c.sendall(data)
                else:
                    data = r.recv(4096)
                    if data:
                        self.tty.write(data)
                    else:
                        conns = []
        for c in conns:
            c.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.server.close()
        self.tty.close()


def test_a_network_port_says_it_cannot_reset_the_board(station_env):
    ctx = open_station("relay", station_env / "station.toml", baud=115200)  # the pty's rate: no baud change
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:  # behind its pty, in download mode
        net = NetworkPort(bench[0].pty.path)
        try:
            r = provision_unit(UnitJob(net.url), ctx, lambda e: None)
        finally:
            net.close()
    ctx.close()
    assert r.outcome == "failed" and r.failed_step == "boot", r.error
    assert "this port cannot reset the board" in r.error and "replace" not in r.remedy
