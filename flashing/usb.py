"""Which USB device carries a serial port, and whether it is the chip's own USB-Serial/JTAG.

A board on a USB-UART bridge (CP2102N, CH340, FTDI) is reset through the dev-board
DTR/RTS circuit; an ESP32-C3/S3 on its own USB port (Espressif's VID:PID 303a:1001)
is reset by its USB-Serial/JTAG controller, which reads DTR/RTS differently. The
identity comes from pyserial's port list, as esptool looks it up; a virtual board's
`vesp://` port carries its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from esp_pylib.constants import ESPRESSIF_VID, USB_JTAG_SERIAL_PID
from serial.tools import list_ports
from serial.tools.list_ports_common import ListPortInfo


@dataclass(frozen=True)
class UsbIdentity:
    vid: int
    pid: int
    serial_number: str | None
    location: str | None  # the physical USB path, e.g. "1-1.4.1": stable across replugs
    product: str | None

    @property
    def vid_pid(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"

    @property
    def native_usb(self) -> bool:
        """The chip's own USB-Serial/JTAG controller, not a USB-UART bridge."""
        return (self.vid, self.pid) == (ESPRESSIF_VID, USB_JTAG_SERIAL_PID)


def usb_identity(port: str) -> UsbIdentity | None:
    """The USB device behind `port`, or None (no such port, or not USB: a pty, socket://, rfc2217://)."""
    info = _port_info(port)
    if info is None or info.vid is None or info.pid is None:
        return None
    return UsbIdentity(info.vid, info.pid, info.serial_number, info.location, info.product)


def _port_info(port: str) -> ListPortInfo | None:
    if port.startswith("vesp://"):
        from .virtual.protocol_vesp import port_info

        return port_info(port)
    if "://" in port:
        return None
    names = {port, os.path.realpath(port)}  # a /dev/serial/by-path link names the same tty
    return next((p for p in list_ports.comports() if p.device in names), None)
