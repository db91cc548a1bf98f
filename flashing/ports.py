"""Fixture ports: which serial ports exist now, what they are, and which fixture slot each one is.

A slot is a physical socket of the fixture. ttyUSB/ttyACM numbers follow enumeration order,
which changes with every replug or reboot, so a slot is bound to the USB location of its
port (pyserial's `location`, the path of hub ports from the root: "1-1.4.2", or
"1-1.4.2:1.0" for a device with several interfaces). Where no binding exists, the fixture's
ports are taken in natural order (ttyUSB2 before ttyUSB10).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping
from urllib.parse import urlparse

from serial.tools import list_ports

# USB VID:PID of the serial bridges fixtures are built with, and of the ESP's own USB
BRIDGES = {
    (0x10C4, 0xEA60): "CP210x",
    (0x1A86, 0x7523): "CH340",
    (0x1A86, 0x55D4): "CH9102",
    (0x0403, 0x6001): "FTDI FT232R",
    (0x0403, 0x6010): "FTDI FT2232",
    (0x0403, 0x6015): "FTDI FT-X",
    (0x303A, 0x1001): "ESP USB-Serial/JTAG",
}
# the chip's own USB-Serial/JTAG controller (ESP32-C3, ESP32-S3): no bridge, no DTR/RTS circuit
NATIVE_USB = frozenset({(0x303A, 0x1001)})

# hub ports from the root ("1-1.4.2"), with the interface for multi-interface devices (":1.0")
LOCATION = re.compile(r"^\d{1,3}-\d{1,3}(\.\d{1,3}){0,6}(:\d{1,3}\.\d{1,3})?$")
DEV = Path("/dev")
BY_PATH = "serial/by-path"  # udev's links named after the USB path: stable across replugs
UDEV_NAME = "station/slot-{n}"  # the names `udev_rules` gives each slot under /dev

Comports = Callable[[], Iterable]  # pyserial's list_ports.comports, or fixtures of its output


def present(port: str) -> bool:
    """Is a board's port there right now (a USB bridge enumerated, a virtual board plugged)?"""
    if "://" in port:
        parts = urlparse(port)
        if parts.scheme == "vesp":
            return os.path.exists(parts.path)  # the board's socket exists while it is plugged in
        return True  # socket:// and rfc2217:// cannot tell: assume present
    return os.path.exists(port)


def natural_key(name: str) -> tuple:
    """Sort key reading digit runs as numbers: /dev/ttyUSB2 before /dev/ttyUSB10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


@dataclass(frozen=True)
class SerialPort:
    """One serial port as pyserial lists it, with the stable names udev gives it."""

    device: str
    vid: int | None = None
    pid: int | None = None
    serial_number: str | None = None
    location: str | None = None
    manufacturer: str | None = None
    product: str | None = None
    description: str = ""
    hwid: str = ""
    links: tuple[str, ...] = ()  # /dev/serial/by-path/… and /dev/station/slot-N pointing at it

    @classmethod
    def from_info(cls, info, links: tuple[str, ...] = ()) -> "SerialPort":
        return cls(info.device, info.vid, info.pid, info.serial_number, info.location, info.manufacturer,
                   info.product, info.description or "", info.hwid or "", links)

    @property
    def vid_pid(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}" if self.vid is not None and self.pid is not None else ""

    @property
    def bridge(self) -> str:
        """The bridge's kind by VID:PID ("" for a port that is not USB or not a known bridge)."""
        return BRIDGES.get((self.vid, self.pid), "")

    @property
    def native_usb(self) -> bool:
        return (self.vid, self.pid) in NATIVE_USB


def _links(dev: Path) -> dict[str, list[str]]:
    """Real device path -> the udev links to it (the slot names first, then by-path)."""
    out: dict[str, list[str]] = {}
    for folder in (dev / UDEV_NAME.rsplit("/", 1)[0], dev / BY_PATH):
        try:
            names = sorted(os.listdir(folder), key=natural_key)
        except OSError:
            continue
        for name in names:
            link = folder / name
            out.setdefault(os.path.realpath(link), []).append(str(link))
    return out


def serial_ports(comports: Comports | None = None, dev: Path = DEV) -> list[SerialPort]:
    """Every serial port present now (pyserial's list, or `comports()`), in natural order of its device name."""
    links = _links(dev)
    listed = comports() if comports is not None else list_ports.comports()
    ports = [SerialPort.from_info(p, tuple(links.get(os.path.realpath(p.device), ()))) for p in listed]
    return sorted(ports, key=lambda p: natural_key(p.device))


def at_location(ports: Iterable[SerialPort], location: str) -> SerialPort | None:
    """The port at a bound USB location: exactly there, else the first interface of the device there."""
    ports = list(ports)
    exact = next((p for p in ports if p.location == location), None)
    if exact or ":" in location:
        return exact
    inside = sorted((p for p in ports if p.location and p.location.split(":")[0] == location),
                    key=lambda p: natural_key(p.location or ""))
    return inside[0] if inside else None


@dataclass(frozen=True)
class FixtureSlot:
    """A socket of the fixture: its number, the location it is bound to, the port there now."""

    number: int
    location: str | None  # None: taken in natural order (no [ports.slots] in station.toml)
    port: SerialPort | None  # None: nothing enumerated at the location now
    name: str  # what the station opens and watches for this slot

    @property
    def here(self) -> bool:
        return self.port is not None


def fixture_slots(ports: list[SerialPort], vid_pids: Iterable[str], bound: Mapping[int, str] | None = None,
                  count: int | None = None, dev: Path = DEV) -> list[FixtureSlot]:
    """The fixture's slots in order: bound to USB locations when `bound` is given, else natural order.

    A bound slot with nothing there is still a slot (a native-USB board enumerates only once
    plugged): it is watched under its udev name, which `udev_rules` makes.
    """
    if bound:
        return [FixtureSlot(n, loc, p := at_location(ports, loc), _slot_name(n, p, dev))
                for n, loc in sorted(bound.items())]
    wanted = {tuple(int(x, 16) for x in vp.split(":")) for vp in vid_pids}
    mine = [p for p in ports if (p.vid, p.pid) in wanted]
    return [FixtureSlot(i, None, p, p.device) for i, p in enumerate(mine[:count], 1)]


def _slot_name(n: int, port: SerialPort | None, dev: Path) -> str:
    """Slot n's udev name when it is there or nothing is, else the port's by-path link, else its device."""
    own = str(dev / UDEV_NAME.format(n=n))
    if port is None or own in port.links:
        return own
    return next((x for x in port.links if f"/{BY_PATH}/" in x), port.device)


def fixture_ports(vid_pids: tuple[str, ...], bound: Mapping[int, str] | None = None, count: int | None = None,
                  comports: Comports | None = None, dev: Path = DEV) -> list[str]:
    """The names of the fixture's ports present now, in slot order."""
    return [s.name for s in fixture_slots(serial_ports(comports, dev), vid_pids, bound, count, dev) if s.here]


def udev_rules(bound: Mapping[int, str], source: str = "station.toml") -> str:
    """A udev rules file naming each bound slot /dev/station/slot-N, whatever tty number it gets."""
    lines = [
        f"# Fixture slots of the provisioning station, made by `station ports udev-rules` from {source}.",
        "# Each socket's serial port gets a fixed name, /dev/station/slot-N, bound to its USB location;",
        "# ModemManager is told to leave the ports alone (its probing disturbs ESP boards in download mode).",
        "# Install: sudo cp THIS_FILE /etc/udev/rules.d/60-station-slots.rules",
        "#          sudo udevadm control --reload-rules && sudo udevadm trigger --subsystem-match=tty",
    ]
    for n, loc in sorted(bound.items()):
        if not LOCATION.match(loc):  # the file is validated; this keeps a rule line from ever being built of text
            raise ValueError(f"slot {n}: {loc!r} is not a USB location")
        lines.append(f'SUBSYSTEM=="tty", KERNELS=="{loc}", SYMLINK+="{UDEV_NAME.format(n=n)}", '
                     f'ENV{{ID_MM_DEVICE_IGNORE}}="1"')
    return "\n".join(lines) + "\n"
