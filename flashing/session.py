"""One esptool session per unit: reset, connect, identify, write, boot the app.

The real esptool does all the protocol work through its Python API; this module
owns the port, resets the board with esptool's own reset strategies (the dev-board
DTR/RTS circuit behind a USB-UART bridge, or the USB-Serial/JTAG controller of a
chip on its own USB port), reads what the ROM printed, routes esptool's logger
output per thread to the unit it belongs to, and turns esptool's errors into
messages an operator can act on.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
import re
from typing import Callable, Iterator, Protocol, Sequence

import serial
import esptool.loader
from esptool import cmds
from esptool.loader import ESPLoader
from esptool.logger import TemplateLogger, log
from esptool.reset import DEFAULT_RESET_DELAY, ClassicReset, HardReset, ResetStrategy, UnixTightReset, \
    USBJTAGSerialReset
from esptool.util import FatalError, NotImplementedInROMError, UnsupportedCommandError

import flashing  # noqa: F401  (registers vesp://)

from .console import BANNER, BootLog, read_boot_log
from .errors import UnitError
from .usb import usb_identity

ROM_BAUD = 115200


class EsptoolSink(Protocol):
    def progress(self, done: int, total: int) -> None: ...
    def message(self, text: str) -> None: ...


_local = threading.local()
_install_lock = threading.Lock()
_installed = False


class _ThreadRoutedLogger(TemplateLogger):
    """esptool's one process-wide logger, handing each thread's output to its unit."""

    def _sink(self) -> EsptoolSink | None:
        return getattr(_local, "sink", None)

    def print(self, *args, **kwargs) -> None:
        sink = self._sink()
        text = " ".join(str(a) for a in args).strip()
        if sink and text:
            sink.message(text)

    def note(self, message: str) -> None:
        self.print(f"Note: {message}")

    def warning(self, message: str) -> None:
        self.print(f"Warning: {message}")

    def error(self, message: str) -> None:
        self.print(f"Error: {message}")

    def stage(self, finish: bool = False) -> None:
        pass

    def progress_bar(self, cur_iter: int, total_iters: int, prefix: str = "", suffix: str = "",
                     bar_length: int = 30) -> None:
        sink = self._sink()
        if sink:
            sink.progress(cur_iter, total_iters)

    def set_verbosity(self, verbosity: str) -> None:
        pass


class _ShortHex(esptool.loader.HexFormatter):
    """esptool's trace helper, without the hex dump of long payloads.

    esptool 5.6 builds its trace messages with f-strings, so the "lazy" HexFormatter is
    formatted for every packet even with tracing off: a 16 KB block becomes ~70 KB of
    hex text twice (command and write), ~0.5 CPU s per flashed MB, discarded unread. The
    station never turns esptool's trace on, and with 16 ports that CPU is the limit of
    the whole line. Short frames (commands, replies) keep their hex.
    """

    def __str__(self) -> str:
        if len(self._s) > 64:
            return f"<{len(self._s)} bytes>"
        return super().__str__()


class _CompressOnce:
    """`zlib` as esptool's write_flash sees it: each firmware region is compressed once.

    esptool compresses every region it writes (level 9, ~0.08 CPU s for a 1 MB app);
    on a line every unit gets the same firmware, and 16 units starting together
    compressed it 16 times over on two cores (~0.5 s added to each cycle). The output is
    zlib's own, byte for byte: a cache keyed by the data's SHA-256 and the level, one
    thread compressing while the others wait for its result.
    """

    MIN_SIZE = 64 * 1024
    KEEP = 8

    def __init__(self) -> None:
        self._done: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
        self._busy: dict[tuple[bytes, int], threading.Lock] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(zlib, name)

    def compress(self, data, /, level: int = -1) -> bytes:
        if len(data) < self.MIN_SIZE:
            return zlib.compress(data, level)
        key = (hashlib.sha256(data).digest(), level)
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                return self._done[key]
            busy = self._busy.setdefault(key, threading.Lock())
        with busy:
            with self._lock:
                if key in self._done:
                    self._done.move_to_end(key)
                    return self._done[key]
            out = zlib.compress(data, level)
            with self._lock:
                self._done[key] = out
                while len(self._done) > self.KEEP:
                    self._done.popitem(last=False)
                self._busy.pop(key, None)
            return out


def install_logger() -> None:
    """Install the routing logger and the station's two esptool hooks, once per process.

    Both hooks change host CPU only, never what goes over the wire: trace text that is
    never shown is not built, and the same firmware is not compressed once per unit.
    """
    global _installed
    with _install_lock:
        if not _installed:
            log.set_logger(_ThreadRoutedLogger())
            esptool.loader.HexFormatter = _ShortHex
            cmds.zlib = _CompressOnce()
            _installed = True


@contextlib.contextmanager
def esptool_output(sink: EsptoolSink | None) -> Iterator[None]:
    install_logger()
    previous = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        _local.sink = previous


NO_RESET_SCHEMES = ("socket://", "loop://")

# esptool's words for packets garbled or lost on the wire
LINK_TROUBLE = re.compile(r"checksum|Bad data|Invalid head of packet|Timed out waiting for packet|"
                          r"Serial data stream stopped|Packet content transfer stopped|corrupt", re.I)


class SessionError(UnitError):
    """A failure of one unit's session, with what the operator should do about it."""

    def __init__(self, message: str, remedy: str, detail: str | None = None, link: bool = False):
        super().__init__(message, remedy, detail)
        self.link = link  # the serial link failed (a lower baud rate may work)


@dataclass(frozen=True)
class ChipIdentity:
    chip: str  # esptool's CHIP_NAME
    mac: bytes
    flash_size: str | None  # as esptool reports it, e.g. "4MB"
    flash_id: int
    secure_download: bool
    description: str


def flash_size_bytes(name: str | None) -> int:
    if not name:
        return 0
    return int(name.upper().removesuffix("MB")) * 1024 * 1024


class UnitSession:
    """The serial port of one fixture slot and the esptool session on it."""

    def __init__(self, port: str, sink: EsptoolSink | None = None,
                 cancelled: Callable[[], bool] = lambda: False, native_usb: bool | None = None):
        self.port_name = port
        self.sink = sink
        self.cancelled = cancelled
        self.serial: serial.SerialBase | None = None
        self.esp: ESPLoader | None = None
        self.can_reset = True
        self._native_usb = native_usb  # the fixture or profile says so; None: the port's VID:PID tells
        self.native_usb = bool(native_usb)

    # -- port ----------------------------------------------------------------------------
    def open(self) -> None:
        try:
            s = serial.serial_for_url(self.port_name, do_not_open=True, exclusive=True)
            s.baudrate = ROM_BAUD
            s.timeout = 0.5
            s.open()
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SessionError(f"cannot open {self.port_name}: {exc}",
                               "check the cable and that no other program holds the port") from None
        self.serial = s
        # a network port (socket://) carries no modem lines: nothing can reset the board
        self.can_reset = not self.port_name.startswith(NO_RESET_SCHEMES)
        if self._native_usb is None:
            identity = usb_identity(self.port_name)
            self.native_usb = bool(identity and identity.native_usb)

    def close(self) -> None:
        if self.serial is not None:
            with contextlib.suppress(Exception):
                self.serial.close()
        self.serial = None
        self.esp = None

    def __enter__(self) -> "UnitSession":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reset ----------------------------------------------------------------------------
    def _reset(self, *strategies: ResetStrategy) -> bool:
        """Run the first of esptool's reset sequences the port can carry; False if it carries none."""
        for strategy in strategies:
            try:
                strategy.reset()  # the sequence alone: esptool's retry loop would swallow a port without lines
                return True
            except (OSError, serial.SerialException, NotImplementedError):
                continue  # a pty or a network port has no modem lines; Windows has no TIOCMSET
        self.can_reset = False
        return False

    def enter_download_mode(self) -> str:
        """Reset the board into its ROM loader as esptool does; return what the ROM printed."""
        s = self.serial
        s.baudrate = ROM_BAUD
        s.reset_input_buffer()
        if self.native_usb:
            done = self._reset(USBJTAGSerialReset(s))
        else:
            # both lines in one TIOCMSET: set one after the other, the dev-board circuit passes through
            # "both asserted" (EN released with IO0 high), and a host busy with 16 ports can take longer
            # than the EN capacitor holds, so the chip boots its app instead of the loader
            done = self._reset(UnixTightReset(s, DEFAULT_RESET_DELAY), ClassicReset(s, DEFAULT_RESET_DELAY))
        if not done:
            return ""
        time.sleep(0.02)
        return s.read(s.in_waiting).decode("ascii", "replace")

    def reset_into_app(self) -> None:
        """Pulse EN (or reset through the USB controller) with the boot pin released: the app boots."""
        s = self.serial
        s.baudrate = ROM_BAUD
        s.reset_input_buffer()
        try:
            if s.dtr:
                s.dtr = False  # esptool's hard reset pulses RTS alone; with DTR asserted EN never falls
        except (OSError, serial.SerialException):
            self.can_reset = False
            return
        # esptool's own choice: uses_usb is for USB-OTG ports that re-enumerate; USB-Serial/JTAG does not
        self._reset(HardReset(s))

    # -- esptool ----------------------------------------------------------------------------
    def connect(self, expected_chip: str | None = None, resets: int = 3) -> ChipIdentity:
        # the classic circuit passes through "both asserted" between the two line changes;
        # a slow host can miss the strap window, so a board that booted its app gets another pulse
        for _ in range(resets):
            banner = self.enter_download_mode()
            m = BANNER.search(banner)
            if not (m and "DOWNLOAD" not in m.group(2)):
                break
        if m and "DOWNLOAD" not in m.group(2):
            if "USB_UART_CHIP_RESET" in banner and not self.native_usb:
                raise SessionError(
                    f"the board booted its firmware ({m.group(2)}) instead of download mode: it is on the "
                    "chip's own USB port, which the bridge's reset does not drive",
                    "set the fixture's ports to native USB (USB-Serial/JTAG), or check that the port "
                    "reports VID:PID 303a:1001")
            raise SessionError(
                f"the board booted its firmware ({m.group(2)}) instead of download mode",
                "check the fixture's BOOT/IO0 wiring, or hold BOOT while the board is reset")
        try:
            with esptool_output(self.sink):
                esp = cmds.detect_chip(self.serial, ROM_BAUD, connect_mode="no-reset",
                                       connect_attempts=2)
        except FatalError as exc:
            if not self.can_reset:
                raise SessionError(f"no device answered on {self.port_name}: this port cannot reset the board",
                                   "put the board in download mode by hand (hold BOOT, press EN), or connect "
                                   "it through a port with DTR/RTS", str(exc)) from None
            raise SessionError(f"no device answered on {self.port_name}",
                               "is the board powered and seated in the fixture, and in download mode?",
                               str(exc)) from None
        except (serial.SerialException, OSError) as exc:
            raise SessionError(f"the port went away while connecting ({exc})",
                               "check the USB cable and the board, then retry") from None
        self.esp = esp
        if expected_chip and esp.CHIP_NAME.replace("-", "").lower() != expected_chip.replace("-", "").lower():
            raise SessionError(
                f"wrong chip: found {esp.CHIP_NAME}, the profile is for {expected_chip.upper()}",
                "put this board aside for the right product, or load the right profile")
        try:
            with esptool_output(self.sink):
                mac = bytes(esp.read_mac("BASE_MAC")) if not esp.secure_download_mode else b""
                desc = esp.get_chip_description() if not esp.secure_download_mode else esp.CHIP_NAME
        except (FatalError, UnsupportedCommandError, NotImplementedInROMError) as exc:
            raise SessionError("could not read the chip's identity", "retry; replace the board if it repeats",
                               str(exc)) from None
        return ChipIdentity(esp.CHIP_NAME, mac, None, 0, esp.secure_download_mode, desc)

    def prepare_flash(self, baud: int) -> ChipIdentity:
        """Raise the baud rate, upload the stub, attach and identify the flash chip.

        The ROM loader changes the rate first (esptool's own ROM CHANGE_BAUDRATE, with its
        ESP32 crystal compensation), so the ~9 KB stub goes at the fast rate: the stub keeps
        the UART divider the ROM set. esptool itself uploads the stub at 115200 (~0.8 s per
        unit); at 921600 it takes ~0.1 s, which is most of what a fast rework costs.
        """
        esp = self.esp
        try:
            with esptool_output(self.sink):
                if baud != ROM_BAUD:
                    esp.change_baud(baud)
                esp = cmds.run_stub(esp)
                cmds.attach_flash(esp)
                flash_id = esp.flash_id()
                size = cmds.detect_flash_size(esp)
        except FatalError as exc:
            raise SessionError("the flasher stub did not start or the baud change failed",
                               "retry; if it repeats, lower the profile's baud rate", str(exc), link=True) from None
        except (serial.SerialException, OSError) as exc:
            raise SessionError(f"the port went away ({exc})", "check the USB cable and retry") from None
        # never let esptool wait for a pulled board and resume on whatever is plugged in next
        esp.WRITE_FLASH_ATTEMPTS = 1
        self.esp = esp
        if flash_id & 0xFFFFFF in (0xFFFFFF, 0):
            raise SessionError("the flash chip does not answer (ID FFFFFF)",
                               "replace the board: its flash is dead or not soldered")
        return ChipIdentity(esp.CHIP_NAME, b"", size, flash_id, False, "")

    def write(self, offset: int, data: bytes, encrypt: bool = False) -> None:
        """Write one region, compressed, verified by esptool's MD5 check (`encrypt`: the ROM encrypts it, --encrypt)."""
        try:
            with esptool_output(self.sink):
                cmds.write_flash(self.esp, [(offset, data)], compress=True, encrypt=encrypt)
        except FatalError as exc:
            text = str(exc)
            if LINK_TROUBLE.search(text):  # garbled or lost packets: the cable, not the board
                raise SessionError(f"writing 0x{offset:x} failed: the serial link garbled or lost data",
                                   "check the USB cable and the fixture's contacts, then retry",
                                   text, link=True) from None
            raise SessionError(f"writing 0x{offset:x} failed", "retry; replace the board if it repeats",
                               text) from None
        except (serial.SerialException, OSError) as exc:
            raise SessionError(f"the board was unplugged or the port failed while writing ({exc})",
                               "reseat the board and retry") from None

    def write_regions(self, regions: Sequence[tuple[str, int, bytes]],
                      on_region: Callable[[str, int, int, int], None] | None = None,
                      encrypt: Sequence[str] = ()) -> list[str]:
        """Write each (name, offset, data) whose MD5 on the board differs; return the names written.

        Fast rework: a region that already matches (the firmware of a unit being
        re-provisioned) is not rewritten. `on_region(name, done, size, total)` is called
        before each region and once at the end with name "" (bytes counted over all regions).
        The regions named in `encrypt` are written with esptool's --encrypt, always (the NOR
        holds their ciphertext, which no MD5 of the plaintext matches).
        """
        total = sum(len(d) for _, _, d in regions)
        done = 0
        written: list[str] = []
        for name, offset, data in regions:
            if on_region:
                on_region(name, done, len(data), total)
            if name in encrypt:
                self.write(offset, data, encrypt=True)
                written.append(name)
            elif self.region_md5(offset, len(data)) != hashlib.md5(data).hexdigest():
                self.write(offset, data)
                written.append(name)
            done += len(data)
        if on_region:
            on_region("", total, 0, total)
        return written

    def region_md5(self, offset: int, size: int) -> str:
        try:
            with esptool_output(self.sink):
                return self.esp.flash_md5sum(offset, size)
        except FatalError as exc:
            if LINK_TROUBLE.search(str(exc)):  # garbled or lost packets: the cable, not the board
                raise SessionError("the MD5 check failed: the serial link garbled or lost data",
                                   "check the USB cable and the fixture's contacts, then retry",
                                   str(exc), link=True) from None
            raise SessionError("the board did not answer an MD5 check", "retry; replace the board if it repeats",
                               str(exc), link=True) from None
        except (serial.SerialException, OSError) as exc:
            raise SessionError(f"the board was unplugged or the port failed ({exc})",
                               "reseat the board and retry") from None

    def read(self, offset: int, size: int) -> bytes:
        """Read a flash region back as the NOR holds it (ciphertext on an encrypted board), as read-flash does."""
        try:
            with esptool_output(self.sink):
                return self.esp.read_flash(offset, size)
        except FatalError as exc:
            raise SessionError(f"reading 0x{offset:x} back failed", "retry; replace the board if it repeats",
                               str(exc), link=bool(LINK_TROUBLE.search(str(exc)))) from None
        except (serial.SerialException, OSError) as exc:
            raise SessionError(f"the board was unplugged or the port failed ({exc})",
                               "reseat the board and retry") from None

    def read_console(self) -> str:
        """What the board printed since the last read (app mode, 115200)."""
        try:
            return self.serial.read(self.serial.in_waiting).decode("utf-8", "replace")
        except (serial.SerialException, OSError):
            return ""

    def boot(self, timeout: float = 5.0, settle: float = 0.5) -> BootLog:
        """Reset into the app and read its boot log at 115200."""
        self.esp = None
        self.reset_into_app()
        if not self.can_reset:
            raise SessionError("this port cannot reset the board (no DTR/RTS)",
                               "reset the board by hand, or switch the boot check off for this fixture")
        return read_boot_log(self.serial, timeout, settle, self.cancelled)
