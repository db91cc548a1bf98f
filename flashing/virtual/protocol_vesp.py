"""pyserial URL handler `vesp:///path/to/board.sock`: a virtual board's serial port.

Registered by importing `flashing` (pyserial loads `protocol_<scheme>` modules from
the packages in `serial.protocol_handler_packages`). It behaves like a USB-serial
port on Linux: data both ways, the baud rate reaching the board, and DTR/RTS set
the ways a tty takes them — pyserial's one-line setters (TIOCMBIS/TIOCMBIC) and
`ioctl(fileno(), TIOCMSET)` for both at once, which esptool's reset strategies use.
The kernel side of those ioctls is `_modem_ioctl`: an open port's `fileno()` is its
socket, and ioctls on it that a tty driver answers are answered here.
A board's port also carries its USB identity (VID:PID, serial number, location),
listed for esptool's VID:PID lookup while the port is open in this process.
Like a tty, the port is free again the moment `close()` returns, and a close from
another thread ends a read that is waiting (the station aborts a unit that way).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import socket
import struct
import termios
import threading
import time
from urllib.parse import urlparse

from serial.serialutil import PortNotOpenError, SerialBase, SerialException, Timeout
from serial.tools.list_ports_common import ListPortInfo

from .link import DATA_HEAD, HEADER, LINES, MSG_BAUD, MSG_DATA, MSG_LINES, OPEN_OK, usb_descriptor_path

DISCONNECTED = ("device reports readiness to read but returned no data "
                "(device disconnected or multiple access on port?)")
# what pyserial's POSIX Serial raises when its port is closed under a read
CLOSED_UNDER_READ = f"read failed: [Errno {errno.EBADF}] {os.strerror(errno.EBADF)}"
OPEN_ANSWER_S = 15.0  # the board answers at once; this only bounds a board that is gone

# the modem-control ioctls of a Linux tty (drivers/tty/tty_io.c: tty_tiocmget, tty_tiocmset)
_TIOCM = struct.Struct("I")
_MODEM_REQUESTS = (termios.TIOCMGET, termios.TIOCMSET, termios.TIOCMBIS, termios.TIOCMBIC)
_INPUT_LINES = termios.TIOCM_CTS | termios.TIOCM_DSR | termios.TIOCM_CAR  # as the properties below say

_open_ports: dict[int, "Serial"] = {}  # socket fd -> the open port it belongs to
_open_lock = threading.Lock()


def serial_class_for_url(url: str):
    """The port is named by its socket's absolute path, as a tty is by its device node."""
    return Serial._path_from_url(url), Serial


def port_info(port: str) -> ListPortInfo | None:
    """pyserial's description of a virtual board's port (VID:PID, serial, location), if it has one."""
    try:
        path = Serial._path_from_url(port)
        usb = json.loads(usb_descriptor_path(path).read_text())
    except (SerialException, OSError, ValueError):
        return None
    info = ListPortInfo(path, skip_link_detection=True)
    for key in ("vid", "pid", "serial_number", "location", "manufacturer", "product", "interface"):
        setattr(info, key, usb.get(key))
    info.description = usb.get("product") or "n/a"
    info.apply_usb_info()
    return info


class Serial(SerialBase):
    def open(self) -> None:
        if self._port is None:
            raise SerialException("Port must be configured before it can be used.")
        if self.is_open:
            raise SerialException("Port is already open.")
        path = self._path_from_url(self.portstr)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            sock.settimeout(OPEN_ANSWER_S)
            answer = sock.recv(1)
        except FileNotFoundError:
            sock.close()
            raise SerialException(errno.ENOENT, f"could not open port {self.portstr}: "
                                  f"[Errno 2] No such file or directory: '{path}'") from None
        except OSError as exc:
            sock.close()
            raise SerialException(f"could not open port {self.portstr}: {exc}") from None
        if answer != OPEN_OK:
            sock.close()
            raise SerialException(errno.EBUSY, f"could not exclusively lock port "
                                  f"{self.portstr}: [Errno 16] Device or resource busy")
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self._sock = sock
        self._rx = bytearray()
        # the lines as the bridge drives them; pyserial's _dtr_state/_rts_state only remember its own setters
        self._modem_dtr, self._modem_rts = bool(self._dtr_state), bool(self._rts_state)
        self._fd = sock.fileno()
        with _open_lock:
            _open_ports[self._fd] = self
        self.is_open = True
        try:
            self._reconfigure_port()
            self._send_lines()  # open asserts DTR and RTS, as pyserial's POSIX open does
        except SerialException:
            self.close()  # the board hung up at once: an open that fails holds nothing
            raise

    @staticmethod
    def _path_from_url(url: str) -> str:
        if os.path.isabs(url):
            return url  # already resolved by serial_class_for_url
        parts = urlparse(url)
        if parts.scheme != "vesp" or not parts.path:
            raise SerialException(f"expected a URL like vesp:///path/to/board.sock, not {url!r}")
        return parts.path

    def from_url(self, url: str) -> str:
        return self._path_from_url(url)

    def _reconfigure_port(self, force_update: bool = False) -> None:
        if self.is_open:
            self._msg(MSG_BAUD, struct.pack("<I", int(self._baudrate)))

    def _release(self) -> None:
        """Forget the socket's fd before it is closed: the number may be reused at once."""
        with _open_lock:
            if _open_ports.get(self._fd) is self:
                del _open_ports[self._fd]

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            self._release()
            # shutdown hangs up the board's end now (it sees the port free) and wakes a waiting read
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()

    def _msg(self, kind: bytes, body: bytes) -> None:
        try:
            self._sock.sendall(HEADER.pack(kind, len(body)) + body)
        except OSError as exc:
            raise SerialException(f"write failed: {exc}") from None

    def _send_lines(self) -> None:
        if self.is_open:
            self._msg(MSG_LINES, LINES.pack(self._modem_dtr, self._modem_rts, time.monotonic()))

    def _update_dtr_state(self) -> None:
        self._modem_dtr = bool(self._dtr_state)  # TIOCMBIS/TIOCMBIC: this line only
        self._send_lines()

    def _update_rts_state(self) -> None:
        self._modem_rts = bool(self._rts_state)
        self._send_lines()

    def _update_break_state(self) -> None:
        pass

    def _modem_ioctl(self, request: int, arg, mutate: bool):
        """TIOCMGET/TIOCMSET/TIOCMBIS/TIOCMBIC on this port, as the tty layer answers them."""
        if not self.is_open:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if isinstance(arg, int):
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))  # a pointer this side cannot follow
        if request == termios.TIOCMGET:
            bits = _INPUT_LINES | (termios.TIOCM_DTR if self._modem_dtr else 0) \
                | (termios.TIOCM_RTS if self._modem_rts else 0)
            out = _TIOCM.pack(bits)
            if isinstance(arg, (bytes, str)) or not mutate:
                return out  # an immutable argument: the result comes back as bytes
            memoryview(arg).cast("B")[: _TIOCM.size] = out
            return 0
        raw = arg.encode() if isinstance(arg, str) else bytes(arg)
        (bits,) = _TIOCM.unpack(raw[: _TIOCM.size])
        dtr, rts = bool(bits & termios.TIOCM_DTR), bool(bits & termios.TIOCM_RTS)
        if request == termios.TIOCMSET:
            self._modem_dtr, self._modem_rts = dtr, rts
        elif request == termios.TIOCMBIS:
            self._modem_dtr, self._modem_rts = self._modem_dtr or dtr, self._modem_rts or rts
        else:
            self._modem_dtr, self._modem_rts = self._modem_dtr and not dtr, self._modem_rts and not rts
        try:
            self._send_lines()  # both lines in one message: the bridge changes them together
        except SerialException:
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None
        return arg if isinstance(arg, bytes) else 0

    def fileno(self) -> int:
        if not self.is_open:
            raise PortNotOpenError()
        return self._sock.fileno()

    def _fill(self, timeout: float | None) -> bool:
        try:
            ready, _, _ = select.select([self._sock], [], [], timeout)
        except (OSError, ValueError):
            ready = None  # the socket was closed by another thread
        if not self.is_open:
            raise SerialException(CLOSED_UNDER_READ)
        if not ready:
            return False
        try:
            chunk = self._sock.recv(1 << 16)
        except OSError as exc:
            raise SerialException(f"read failed: {exc}") from None
        if not chunk:
            if not self.is_open:
                raise SerialException(CLOSED_UNDER_READ)
            self.is_open = False
            self._release()
            self._sock.close()  # the board is gone; a reopen (esptool's reconnect) makes a new socket
            raise SerialException(DISCONNECTED)
        self._rx += chunk
        return True

    @property
    def in_waiting(self) -> int:
        if not self.is_open:
            raise PortNotOpenError()
        while self._fill(0):
            pass
        return len(self._rx)

    def read(self, size: int = 1) -> bytes:
        if not self.is_open:
            raise PortNotOpenError()
        timeout = Timeout(self._timeout)
        while len(self._rx) < size:
            left = timeout.time_left()
            if left is not None and left <= 0:
                break
            if not self._fill(left):
                break
        out = bytes(self._rx[:size])
        del self._rx[:size]
        return out

    def write(self, data: bytes) -> int:
        if not self.is_open:
            raise PortNotOpenError()
        data = bytes(data)
        self._msg(MSG_DATA, DATA_HEAD.pack(int(self._baudrate), time.monotonic()) + data)
        return len(data)

    def reset_input_buffer(self) -> None:
        if not self.is_open:
            raise PortNotOpenError()
        while self._fill(0):
            pass
        self._rx.clear()

    def reset_output_buffer(self) -> None:
        if not self.is_open:
            raise PortNotOpenError()

    def flush(self) -> None:
        pass

    @property
    def cts(self) -> bool:
        return True

    @property
    def dsr(self) -> bool:
        return True

    @property
    def ri(self) -> bool:
        return False

    @property
    def cd(self) -> bool:
        return True


def _ioctl(fd, request, arg=0, mutate_flag=True, /):
    """`fcntl.ioctl`, with the modem-line requests on an open virtual port answered by that port."""
    if request in _MODEM_REQUESTS:
        try:
            number = fd if isinstance(fd, int) else fd.fileno()
        except (AttributeError, OSError, ValueError):
            number = None
        port = _open_ports.get(number)
        if port is not None:
            return port._modem_ioctl(request, arg, mutate_flag)
    return _real_ioctl(fd, request, arg, mutate_flag)


def _with_open_virtual_ports(comports):
    """A port list that also holds this process's open virtual ports, as the OS lists a plugged bridge."""
    def listed(*args, **kwargs):
        with _open_lock:
            names = [p.portstr for p in _open_ports.values()]
        return list(comports(*args, **kwargs)) + [i for i in map(port_info, names) if i is not None]
    listed.real = comports
    return listed


def _install() -> None:
    """Answer what esptool asks of a Linux port: the modem-line ioctls and the port's VID:PID."""
    global _real_ioctl
    _real_ioctl = getattr(fcntl.ioctl, "real", fcntl.ioctl)  # a reloaded module wraps the original once
    _ioctl.real = _real_ioctl
    fcntl.ioctl = _ioctl
    try:
        import esp_pylib.serial_ports as esp_ports  # where esptool looks up a port's VID:PID
    except ImportError:
        return
    esp_ports._comports = _with_open_virtual_ports(getattr(esp_ports._comports, "real", esp_ports._comports))


_real_ioctl = fcntl.ioctl
_install()
