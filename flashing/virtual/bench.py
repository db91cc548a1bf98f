"""A bench of virtual boards, and the control interface other processes use.

`VirtualBench` starts N boards, each with a `vesp://` socket and a pty, optionally
keeping their flash and MAC in a state directory; `usb_serial_jtag=True` wires
ESP32-C3/S3 boards through the chip's own USB port instead of a USB-UART bridge. `ControlServer` answers JSON
lines on a Unix socket (`<run dir>/control.sock`):

    {"device": 0, "op": "reset", "mode": "download"}   -> {"ok": true, "state": {...}}

ops: state, reset (mode download|app), power_cycle, unplug, replug, swap,
fault (name, value), clear_faults, console, list, timing (heartbeat_s, mqtt_retry_s).
`ControlClient` is the Python side.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .device import VirtualDevice
from .link import PtyPort, SocketPort
from .nor import parse_size


@dataclass
class BenchSlot:
    device: VirtualDevice
    socket: SocketPort
    pty: PtyPort

    @property
    def url(self) -> str:
        return self.socket.url

    def info(self) -> dict:
        d = self.device.state()
        return {"index": d["index"], "chip": d["chip"], "mac": d["mac"],
                "flash_size": d["flash_size"], "pty": self.pty.path, "url": self.url,
                "pairing": d["pairing_url"], "mode": d["mode"], "flash_file": d["flash_file"],
                "usb_serial_jtag": d["usb_serial_jtag"]}


class VirtualBench:
    def __init__(self, count: int = 1, chip: str = "esp32", flash_size: str | int = "4MB",
                 state_dir: Path | str | None = None, run_dir: Path | str | None = None,
                 realtime: bool = False, control: bool = True, seed: int | None = None,
                 usb_serial_jtag: bool = False):
        self.state_dir = Path(state_dir) if state_dir else None
        self._tmp = None
        if run_dir is None:
            if self.state_dir:
                run_dir = self.state_dir
            else:
                self._tmp = tempfile.TemporaryDirectory(prefix="vesp-")
                run_dir = self._tmp.name
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.slots: list[BenchSlot] = []
        size = parse_size(flash_size)
        for i in range(count):
            dev = VirtualDevice(chip, index=i, flash_size=size, state_dir=self.state_dir,
                                realtime=realtime, usb_serial_jtag=usb_serial_jtag,
                                seed=None if seed is None else seed + i)
            sock = SocketPort(dev, self.run_dir / f"board-{i}.sock")
            self.slots.append(BenchSlot(dev, sock, PtyPort(dev)))
        self.control = ControlServer(self, self.run_dir / "control.sock") if control else None

    def __enter__(self) -> "VirtualBench":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, i: int) -> BenchSlot:
        return self.slots[i]

    def __len__(self) -> int:
        return len(self.slots)

    def close(self) -> None:
        """Stop every board and port; no thread of the bench is left when this returns."""
        if self.control:
            self.control.close()
        for slot in self.slots:
            slot.device.close()  # first: a stopped chip sends nothing to a port being closed
            slot.socket.close()
            slot.pty.close()
        if self._tmp:
            self._tmp.cleanup()


OPS = ("state", "reset", "power_cycle", "unplug", "replug", "swap", "fault",
       "clear_faults", "console", "list", "timing")


class ControlServer:
    def __init__(self, bench: VirtualBench, path: Path):
        self.bench = bench
        self.path = path
        if path.exists():
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._lock = threading.Lock()
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="vesp-control")]
        self._threads[0].start()

    def close(self) -> None:
        """Stop answering, hang up on every client and wait for the server's threads."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        for s in (self._sock, *conns):
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes accept() and reads; close() alone does not
            except OSError:
                pass
        self._sock.close()
        deadline = time.monotonic() + 5
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True, name="vesp-control-client")
                self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    try:
                        reply = {"ok": True, **self.handle(json.loads(line))}
                    except Exception as exc:  # every bad request gets an answer, not a hang
                        reply = {"ok": False, "error": str(exc)}
                    f.write(json.dumps(reply).encode() + b"\n")
                    f.flush()
        except OSError:
            pass  # the client went away, or the server is closing
        finally:
            with self._lock:
                self._conns.discard(conn)

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
        if op == "list":
            return {"devices": [s.info() for s in self.bench.slots]}
        idx = req.get("device")
        if not isinstance(idx, int) or not 0 <= idx < len(self.bench.slots):
            raise ValueError(f"device must be an index from 0 to {len(self.bench.slots) - 1}")
        dev = self.bench.slots[idx].device
        if op == "console":
            return {"console": dev.console_text()}
        if op == "reset":
            return {"state": dev.reset(req.get("mode", "download"))}
        if op == "timing":  # the firmware's heartbeat and broker-retry periods, for tests
            def do():
                for name in ("heartbeat_s", "mqtt_retry_s"):
                    if name in req:
                        setattr(dev, name, float(req[name]))
                return dev.describe()
            return {"state": dev.call(do)}
        if op == "fault":
            return {"state": dev.set_fault(req["name"], req.get("value", True))}
        if op == "swap":
            mac = req.get("mac")
            return {"state": dev.swap(bytes.fromhex(mac.replace(":", "")) if mac else None)}
        return {"state": getattr(dev, op)()}


class ControlClient:
    """Talk to a running `station virtual` from another process."""

    def __init__(self, path: Path | str):
        self.path = str(path)

    def request(self, op: str, device: int | None = None, **args: Any) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.path)
            s.settimeout(60)
            s.sendall(json.dumps({"op": op, "device": device, **args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if not reply.pop("ok"):
            raise RuntimeError(reply["error"])
        return reply
