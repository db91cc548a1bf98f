"""pyserial URL handler `vesp:///path/to/board.sock`: a virtual board's serial port.

Registered by importing `flashing` (pyserial loads `protocol_<scheme>` modules from
the packages in `serial.protocol_handler_packages`). It behaves like a USB-serial
bridge: data both ways, DTR and RTS driving the board's auto-reset circuit, and the
baud rate reaching the board. Like a pty it has no file descriptor for modem-line
ioctls, so `fileno()` raises ENOTTY and esptool falls back to its DTR/RTS setters.
Like a tty, the port is free again the moment `close()` returns, and a close from
another thread ends a read that is waiting (the station aborts a unit that way).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from urllib.parse import urlparse

from serial.serialutil import PortNotOpenError, SerialBase, SerialException, Timeout

from .link import DATA_HEAD, HEADER, LINES, MSG_BAUD, MSG_DATA, MSG_LINES, OPEN_OK

DISCONNECTED = ("device reports readiness to read but returned no data "
                "(device disconnected or multiple access on port?)")
# what pyserial's POSIX Serial raises when its port is closed under a read
CLOSED_UNDER_READ = f"read failed: [Errno {errno.EBADF}] {os.strerror(errno.EBADF)}"
OPEN_ANSWER_S = 15.0  # the board answers at once; this only bounds a board that is gone


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
        self.is_open = True
        self._reconfigure_port()
        self._send_lines()

    @staticmethod
    def _path_from_url(url: str) -> str:
        parts = urlparse(url)
        if parts.scheme != "vesp" or not parts.path:
            raise SerialException(f"expected a URL like vesp:///path/to/board.sock, not {url!r}")
        return parts.path

    def from_url(self, url: str) -> str:
        return self._path_from_url(url)

    def _reconfigure_port(self, force_update: bool = False) -> None:
        if self.is_open:
            self._msg(MSG_BAUD, struct.pack("<I", int(self._baudrate)))

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
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
            self._msg(MSG_LINES, LINES.pack(self._dtr_state, self._rts_state, time.monotonic()))

    def set_dtr_rts(self, dtr: bool, rts: bool) -> None:
        """Both lines in one message: the bridge's TIOCMSET (pyserial sets them one by one)."""
        self._dtr_state, self._rts_state = bool(dtr), bool(rts)
        self._send_lines()

    def _update_dtr_state(self) -> None:
        self._send_lines()

    def _update_rts_state(self) -> None:
        self._send_lines()

    def _update_break_state(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

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
