"""How a serial program reaches a virtual board: a reset-capable socket and a pty.

`SocketPort` listens on a Unix socket for the `vesp://` pyserial URL scheme
(`flashing.virtual.protocol_vesp`), which carries data, DTR/RTS and the host's
baud rate, so esptool's own reset sequences drive the board's auto-reset circuit.
Next to the socket, `<socket>.usb` holds the port's USB identity while the board is
plugged in, as sysfs holds a USB tty's.
`PtyPort` gives every board a pseudo-terminal that any serial program can open as
a plain port; a pty has no modem lines, so behind it the board sits in a jig that
holds IO0 low. The host's baud rate is read from the pty's termios settings.
"""

from __future__ import annotations

import json
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
HANDOVER_S = 10.0  # bounds the wait for a hung-up host's last messages to reach the board
JOIN_S = 5.0  # how long close() waits for a port's threads

def usb_descriptor_path(socket_path: str | Path) -> Path:
    """Where a plugged-in board's port keeps its USB identity (VID:PID, serial number, location)."""
    path = Path(socket_path)
    return path.with_name(path.name + ".usb")


_SPEEDS = {getattr(termios, n): int(n[1:]) for n in dir(termios)
           if n.startswith("B") and n[1:].isdigit()}


class SocketPort:
    """The board's USB-serial bridge as a Unix socket speaking the vesp protocol.

    One host at a time holds the port. A host that closed its end (it hung up) has
    released it, even if this side has not yet read its last messages: the next open
    waits for those to reach the board, then takes the port, as a tty is free at close().
    """

    def __init__(self, device: VirtualDevice, path: Path):
        self.device = device
        self.path = Path(path)
        self.url = f"vesp://{self.path}"
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._serving: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._host_baud = 115200
        self._lock = threading.RLock()
        device.links.append(self)
        self._listen()

    @property
    def attached(self) -> bool:
        """A host holds the port, or its last messages are still on their way to the board."""
        serving = self._serving
        return serving is not None and serving.is_alive()

    def _start(self, target, *args, name: str) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True, name=name)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return t

    def _listen(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.path))
        s.listen(4)
        descriptor = usb_descriptor_path(self.path)
        tmp = descriptor.with_name(descriptor.name + ".tmp")
        tmp.write_text(json.dumps(self.device.usb_descriptor()))
        os.replace(tmp, descriptor)  # a reader never sees half of it
        self._listener = s
        self._start(self._accept_loop, s, name=f"vdev-{self.device.index}-sock")

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # unplugged or closed
            if not self._take(conn):
                try:
                    conn.sendall(OPEN_BUSY)
                except OSError:
                    pass
                conn.close()
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            try:
                conn.sendall(OPEN_OK)  # before the sink joins: the answer must be the first byte
            except OSError:
                pass  # the host gave up waiting: its serve thread drops it at once
            # the board's output bound to this host: a write the board began for the last one never reaches it
            sink = Sink(conn.sendall, lambda: self._host_baud, "vesp")
            self.device.reset_capable_host(True)
            self.device.sinks.append(sink)
            self._serving = self._start(self._serve, conn, sink, name=f"vdev-{self.device.index}-conn")

    def _take(self, conn: socket.socket) -> bool:
        """Give the port to a new host if nobody holds it or its holder has hung up."""
        with self._lock:  # _drop closes the old socket under the lock: never polled once closed
            held = self._conn is not None and not _hung_up(self._conn)
            serving = self._serving
        if held:
            return False  # another program has the port open
        if serving is not None:
            serving.join(HANDOVER_S)  # the old holder's last messages reach the board first
            if serving.is_alive():
                return False
        with self._lock:
            if self._closed:
                return False
            self._conn = conn
        return True

    def _serve(self, conn: socket.socket, sink: Sink) -> None:
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
            self._drop(conn, sink)

    def _drop(self, conn: socket.socket, sink: Sink) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
            conn.close()
        if sink in self.device.sinks:
            self.device.sinks.remove(sink)
        self.device.reset_capable_host(False)

    # the cable: called on the device thread
    def unplugged(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop (close alone does not)
            except OSError:
                pass
            listener.close()
        for gone in (self.path, usb_descriptor_path(self.path)):
            try:
                gone.unlink()
            except FileNotFoundError:
                pass
        conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def replugged(self) -> None:
        with self._lock:  # a close() at the same time must see the new listener
            if not self._closed and self._listener is None:
                self._listen()

    def close(self) -> None:
        """Pull the cable for good and wait for this port's threads to end."""
        with self._lock:
            self._closed = True
        self.unplugged()
        deadline = time.monotonic() + JOIN_S
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))


def _hung_up(conn: socket.socket) -> bool:
    """The host closed its end (its last messages may still wait to be read)."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


class PtyPort:
    """A pseudo-terminal for the board: a plain serial port with no DTR/RTS."""

    def __init__(self, device: VirtualDevice):
        self.device = device
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._slave)
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()  # close() wakes the pump's select through it
        self._sink = Sink(self._send, self.host_baud, "pty")
        device.sinks.append(self._sink)
        self._pump_thread = threading.Thread(target=self._pump, daemon=True, name=f"vdev-{device.index}-pty")
        self._pump_thread.start()

    def host_baud(self) -> int | None:
        try:
            return _SPEEDS.get(termios.tcgetattr(self.master)[5])
        except termios.error:
            return None

    def _pump(self) -> None:
        while not self._closed:
            try:
                ready, _, _ = select.select([self.master, self._wake_r], [], [], 0.5)
                if self.master not in ready:
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
        if not self.device.powered or self._closed:
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
        """Stop the pump, then close the pty (never under a select that still uses it)."""
        if self._closed:
            return
        self._closed = True
        if self._sink in self.device.sinks:
            self.device.sinks.remove(self._sink)
        os.write(self._wake_w, b"x")
        self._pump_thread.join(JOIN_S)
        for fd in (self.master, self._slave, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
