"""How a serial program reaches a virtual board: a reset-capable socket and a pty.

`SocketPort` listens on a Unix socket for the `vesp://` pyserial URL scheme
(`flashing.virtual.protocol_vesp`), which carries data, DTR/RTS and the host's
baud rate, so esptool's own reset sequences drive the board's auto-reset circuit.
`PtyPort` gives every board a pseudo-terminal that any serial program can open as
a plain port; a pty has no modem lines, so behind it the board sits in a jig that
holds IO0 low. The host's baud rate is read from the pty's termios settings.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import termios
import threading
import time
import tty
from pathlib import Path

from .device import Sink, VirtualDevice

# host -> device messages: type byte, payload length (u32), payload
MSG_DATA = b"D"  # <I baud> <d t> bytes
MSG_LINES = b"L"  # <B dtr> <B rts> <d t>
MSG_BAUD = b"B"  # <I baud>
HEADER = struct.Struct("<cI")
DATA_HEAD = struct.Struct("<Id")
LINES = struct.Struct("<BBd")
OPEN_OK, OPEN_BUSY = b"\x01", b"\x00"

_SPEEDS = {getattr(termios, n): int(n[1:]) for n in dir(termios)
           if n.startswith("B") and n[1:].isdigit()}


class SocketPort:
    """The board's USB-serial bridge as a Unix socket speaking the vesp protocol."""

    def __init__(self, device: VirtualDevice, path: Path):
        self.device = device
        self.path = Path(path)
        self.url = f"vesp://{self.path}"
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._host_baud = 115200
        self._lock = threading.Lock()
        self._sink = Sink(self._send, lambda: self._host_baud)
        device.links.append(self)
        self._listen()

    def _listen(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.path))
        s.listen(4)
        self._listener = s
        threading.Thread(target=self._accept_loop, args=(s,), daemon=True,
                         name=f"vdev-{self.device.index}-sock").start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # unplugged or closed
            with self._lock:
                busy = self._conn is not None
                if not busy:
                    self._conn = conn
            if busy:
                try:
                    conn.sendall(OPEN_BUSY)
                finally:
                    conn.close()
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            conn.sendall(OPEN_OK)
            self.device.reset_capable_host(True)
            self.device.sinks.append(self._sink)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"vdev-{self.device.index}-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        dev = self.device
        try:
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= HEADER.size:
                    kind, length = HEADER.unpack_from(buf)
                    if len(buf) < HEADER.size + length:
                        break
                    body = bytes(buf[HEADER.size : HEADER.size + length])
                    del buf[: HEADER.size + length]
                    if kind == MSG_DATA:
                        baud, t = DATA_HEAD.unpack_from(body)
                        self._host_baud = baud
                        dev.host_write(body[DATA_HEAD.size :], baud, t)
                    elif kind == MSG_LINES:
                        dtr, rts, t = LINES.unpack(body)
                        dev.host_lines(bool(dtr), bool(rts), t)
                    elif kind == MSG_BAUD:
                        (self._host_baud,) = struct.unpack("<I", body)
        except OSError:
            pass
        finally:
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            if self._conn is not conn:
                return
            self._conn = None
        if self._sink in self.device.sinks:
            self.device.sinks.remove(self._sink)
        self.device.reset_capable_host(False)
        try:
            conn.close()
        except OSError:
            pass

    def _send(self, data: bytes) -> None:
        conn = self._conn
        if conn is not None:
            conn.sendall(data)

    # the cable: called on the device thread
    def unplugged(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop (close alone does not)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def replugged(self) -> None:
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.unplugged()


class PtyPort:
    """A pseudo-terminal for the board: a plain serial port with no DTR/RTS."""

    def __init__(self, device: VirtualDevice):
        self.device = device
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._slave)
        self._closed = False
        device.sinks.append(Sink(self._send, self.host_baud))
        threading.Thread(target=self._pump, daemon=True,
                         name=f"vdev-{device.index}-pty").start()

    def host_baud(self) -> int | None:
        try:
            return _SPEEDS.get(termios.tcgetattr(self.master)[5])
        except termios.error:
            return None

    def _pump(self) -> None:
        while not self._closed:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.5)
                if not ready:
                    continue
                data = os.read(self.master, 1 << 16)
            except (OSError, ValueError):
                if self._closed:
                    return
                time.sleep(0.05)
                continue
            if data:
                self.device.host_write(data, self.host_baud(), time.monotonic())

    def _send(self, data: bytes) -> None:
        if not self.device.powered:
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                return  # nobody reads the port: the bytes are lost, as on a real UART
            view = view[n:]

    def unplugged(self) -> None:
        pass  # a pty cannot vanish; the board behind it simply stops answering

    def replugged(self) -> None:
        pass

    def close(self) -> None:
        self._closed = True
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
