"""The virtual ESP32-family board: real serial bootloader protocol, boot log, faults."""

from .chips import CHIPS, chip_by_name
from .device import Faults, VirtualDevice
from .link import PtyPort, SocketPort

__all__ = ["CHIPS", "Faults", "PtyPort", "SocketPort", "VirtualDevice", "chip_by_name"]
