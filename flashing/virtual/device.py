"""A virtual ESP32-family board: chip, flash, UART wire, auto-reset circuit, faults.

The device runs on its own thread and owns all its state; transports (the
reset-capable socket link and the pty) hand it bytes, line changes and the host's
baud rate through a queue. It is reached like any board: through a serial port.
A board is wired one of two ways: a USB-UART bridge (CP2102N) with the dev-board
DTR/RTS auto-reset circuit, or (ESP32-C3/S3) the chip's own USB-Serial/JTAG
controller, whose DTR/RTS act as its reference manual's table says and whose
CDC-ACM link carries any baud rate.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
import os
import queue
import random
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from ..firmware import read_manifest
from ..images import PARTITION_TABLE_OFFSET
from .app import TwoSmartApp
from .boot import boot_from_flash
from .chips import ESP32_CK8M, ESP32_RTC_CALI, ChipModel, chip_by_name
from .crypt import FlashCipher
from .efuse import EfuseArray
from .first_boot import encrypt_on_first_boot
from .loader import Loader, known_stubs
from .nor import NorFlash, sfdp_table
from .slip import SlipDecoder, encode

STRAP_DELAY = 0.010  # EN's RC delay (10 kOhm, 1 uF): the chip samples IO0 this long after EN rises
BOOTLOOP_PERIOD = 0.5  # watchdog reset period of a board that cannot boot
CONSOLE_KEEP = 64 * 1024
_hosts = itertools.count(1)


def _virtual_address() -> tuple[str, int]:
    """A loopback address and free port of its own for a board's pairing server."""
    n = next(_hosts)
    ip = f"127.77.{os.getpid() % 250}.{n % 250 + 1}"
    with socket.socket() as s:
        s.bind((ip, 0))
        return ip, s.getsockname()[1]
USB_WIRE_BAUD = 10_000_000  # full-speed USB bulk moves ~1 MB/s whatever the line coding says
BAUD_TOLERANCE = 0.03  # a UART still decodes within about 3 %
GARBLE_RATE = 0.01  # byte error rate on a link driven above what it can carry


PAIRING_FAULTS = ("down", "error", "hang", "pair_hang", "pair_drop", "pair_echo", "echo")


@dataclass
class Faults:
    """Injectable faults; each mirrors a way real boards fail at the line."""

    noise: float = 0.0  # probability that a byte on the wire is corrupted
    no_answer: bool = False  # board without auto-reset, sitting in its app
    flash_dead: bool = False  # SPI flash does not answer (RDID reads FFFFFF)
    secure_download: bool = False  # Secure Download Mode eFuse burnt
    no_download_mode: bool = False  # IO0 never reaches the chip: always boots flash
    unplug_after: int | None = None  # host bytes until the cable is pulled
    hang_after: int | None = None  # host bytes until the chip hangs: powered, silent
    hang_after_burns: int | None = None  # eFuse program commands completed before the chip hangs on the next
    garble_above: int | None = None  # baud above which the link corrupts bytes
    # pairing server "down", answering 500 ("error"), or "hang"; a buggy firmware's /pair only: "pair_hang",
    # "pair_drop" (closes without a reply), "pair_echo"; "echo": every request answered 500 with what it knows
    pairing: str | None = None
    mqtt_refused: bool = False  # the broker refuses this device's login
    panic_after: float | None = None  # firmware panics this many seconds after boot
    address_after: float | None = None  # seconds from app_main to its IP address (slow AP start or DHCP)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class Sink:
    """Where the device's UART output goes, and the baud rate that end listens at."""

    write: Callable[[bytes], None]
    baud: Callable[[], int | None]
    name: str  # names the wire's noise stream, so a seeded board garbles the same bytes every run


class WireNoise:
    """Errors on one direction of one wire, placed by byte count and a seeded generator.

    Where an error falls depends only on how many bytes have crossed the wire, never on
    how a transport happened to chunk them, so a seeded board fails the same way every run.
    """

    def __init__(self, seed: str):
        self.rng = random.Random(seed)
        self.rate = 0.0
        self.gap = 0  # clean bytes before the next error

    def _draw_gap(self) -> int:
        return int(math.log(1 - self.rng.random()) / math.log(1 - min(self.rate, 0.999999)))

    def flip_bits(self, data: bytes, rate: float) -> bytes:
        """Flip one bit in a byte with probability `rate` per byte."""
        if rate <= 0:
            self.rate = 0.0
            return data
        if rate != self.rate:
            self.rate = rate
            self.gap = self._draw_gap()
        if self.gap >= len(data):
            self.gap -= len(data)
            return data
        out = bytearray(data)
        i = self.gap
        while i < len(out):
            out[i] ^= 1 << self.rng.randrange(8)
            i += self._draw_gap() + 1
        self.gap = i - len(out)
        return bytes(out)

    def garbage(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class VirtualDevice:
    def __init__(self, chip: str | ChipModel = "esp32", *, index: int = 0,
                 flash_size: int = 4 * 1024 * 1024, mac: bytes | None = None,
                 state_dir: Path | None = None, realtime: bool = False,
                 seed: int | None = None, usb_serial_jtag: bool = False):
        self.chip = chip if isinstance(chip, ChipModel) else chip_by_name(chip)
        if usb_serial_jtag and not self.chip.has_usb_serial_jtag:
            raise ValueError(f"{self.chip.name} has no USB-Serial/JTAG controller: "
                             "native USB is for esp32c3 and esp32s3")
        self.usb_serial_jtag = usb_serial_jtag
        # a real stub greets within milliseconds of MEM_END; learn the stubs now, not then
        known_stubs(self.chip.key)
        self.index = index
        self.realtime = realtime
        self.state_dir = Path(state_dir) if state_dir else None
        self.rng = random.Random(seed if seed is not None else os.urandom(8))
        self._noise_seed = str(seed) if seed is not None else os.urandom(8).hex()
        self._noise: dict[str, WireNoise] = {}  # per wire direction: "rx", "tx-vesp", "tx-pty"
        self.faults = Faults()
        self.flash_size = flash_size
        self.mac = mac
        self._load_identity()
        flash_path = self.state_dir / f"device-{index}.flash" if self.state_dir else None
        self.flash = NorFlash(self.flash_size, flash_path)
        self.sfdp = sfdp_table(self.flash.part)
        efuse_path = self.state_dir / f"device-{index}.efuse.json" if self.state_dir else None
        self.efuse = EfuseArray(self.chip.key, self.chip.factory_efuses(self.mac), efuse_path)
        self.regs: dict[int, int] = {}
        self._reset_registers()
        self.sinks: list[Sink] = []
        self.links: list[Any] = []  # transports told about unplug/replug
        # the firmware's view of the world: its network address, heartbeat, broker retry
        self.net_ip, self.http_port = _virtual_address()
        self.heartbeat_s = 10.0
        self.mqtt_retry_s = 5.0
        self.broker_ca_file: str | None = None  # the CA its firmware trusts for mqtts (None: the system's store)
        # where a bootloader that does not say it reads its partition table (boot.py): what a real build compiled in
        self.compiled_table_offset = PARTITION_TABLE_OFFSET
        self.runtime: TwoSmartApp | None = None
        self._stopped_apps: list[TwoSmartApp] = []  # their threads may still be ending
        self.boot_time = time.monotonic()
        # wire and circuit state (device thread only)
        self.powered = True
        self.mode = "off"
        self.loader: Loader | None = None
        self.decoder = SlipDecoder()
        self.baud: int | None = 115200
        self.host_baud = 115200
        self.reset_capable_hosts = 0
        self.dtr = self.rts = False
        self.en_low = False
        self.io0_low = False
        self.strap_at: float | None = None
        self.download_flag = False  # USB-Serial/JTAG: boot into download mode at the next USB reset
        self.flash_attached = False  # the ROM's SPI flash answers only after SPI_ATTACH
        self._wdt_armed: int | None = None  # token of the RTC watchdog's pending reset
        self._wdt_deadline: float | None = None
        self.rx_clock = self.tx_clock = self.flash_ready_at = 0.0
        self.bytes_in = self.bytes_out = 0
        self.bytes_since_plug = 0
        self.console = bytearray()
        self.app = None
        self.boot_error: str | None = None
        self.boots = 0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"vdev-{index}", daemon=True)
        self._stopped = threading.Event()
        self._thread.start()
        self.call(lambda: self._power_up("poweron"))

    # -- identity and persistence ---------------------------------------------------
    def _identity_path(self) -> Path | None:
        return self.state_dir / f"device-{self.index}.json" if self.state_dir else None

    def _load_identity(self) -> None:
        path = self._identity_path()
        if path and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("chip") == self.chip.key:
                self.mac = bytes.fromhex(saved["mac"].replace(":", ""))
                self.flash_size = saved["flash_size"]
        if self.mac is None:
            self.mac = self.chip.mac_oui + bytes(self.rng.randrange(256) for _ in range(3))
        self._save_identity()

    def _save_identity(self) -> None:
        path = self._identity_path()
        if path:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"chip": self.chip.key, "mac": self.mac_text,
                                       "flash_size": self.flash_size}))
            os.replace(tmp, path)

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    def _reset_registers(self) -> None:
        self.regs = dict(self.chip.registers(self.mac))
        self.efuse.reset()

    # -- the flash-encryption engine and the cache ------------------------------------
    def flash_cipher(self) -> FlashCipher | None:
        """The engine with the key burned in the eFuses; None while no key is burned."""
        key = self.efuse.flash_key()
        return FlashCipher(*key) if key else None

    def cache_read(self, offset: int, length: int) -> bytes:
        """Flash as the CPU sees it through the cache: decrypted while flash encryption is on."""
        cipher = self.flash_cipher() if self.efuse.flash_encryption_enabled else None
        if cipher is None:
            return self.flash.read(offset, length)
        return cipher.read(self.flash.read, offset, length)

    @property
    def secure_download(self) -> bool:
        """The ROM runs Secure Download Mode: ENABLE_SECURITY_DOWNLOAD burned (or the fault set)."""
        return self.faults.secure_download or self.efuse.secure_download

    # -- thread-safe entry points (any thread) --------------------------------------
    def host_write(self, data: bytes, host_baud: int | None, t: float | None = None) -> None:
        self._events.put(("rx", data, host_baud, t or time.monotonic()))

    def host_lines(self, dtr: bool, rts: bool, t: float | None = None) -> None:
        self._events.put(("lines", dtr, rts, t or time.monotonic()))

    def reset_capable_host(self, attached: bool) -> None:
        self._events.put(("host", attached))

    def post(self, fn: Callable[[], Any]) -> None:
        """Run fn on the device thread later; do not wait for it."""
        self._events.put(("call", fn, {}, threading.Event()))

    def uptime_ms(self) -> int:
        return int((time.monotonic() - self.boot_time) * 1000) + 300

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run fn on the device thread and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        box: dict[str, Any] = {}
        done = threading.Event()
        self._events.put(("call", fn, box, done))
        deadline = time.monotonic() + timeout
        while not done.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if self._stopped.is_set():
                raise RuntimeError(f"virtual device {self.index} is closed")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"virtual device {self.index} did not answer")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def close(self) -> None:
        """Stop the chip and its firmware, and wait for their threads to end."""
        if not self._stopped.is_set():
            self._events.put(("stop",))
            self._thread.join(5)
        deadline = time.monotonic() + 5
        for app in self._stopped_apps:
            app.join(max(0.0, deadline - time.monotonic()))
        self._stopped_apps.clear()
        self.flash.close()

    # -- control (documented interface; any thread) ---------------------------------
    def reset(self, mode: str = "download") -> dict:
        """Reset the chip into 'download' mode or into the 'app', as a button press would."""
        if mode not in ("download", "app"):
            raise ValueError("reset mode is 'download' or 'app'")
        return self.call(lambda: (self._chip_reset(), self._start(mode == "download", "poweron"),
                                  self.describe())[-1])

    def power_cycle(self) -> dict:
        return self.call(lambda: (self._power_off(), self._power_up("poweron"), self.describe())[-1])

    def unplug(self) -> dict:
        return self.call(lambda: (self._unplug(), self.describe())[-1])

    def replug(self) -> dict:
        return self.call(lambda: (self._replug(), self.describe())[-1])

    def swap(self, mac: bytes | None = None, faults: dict | None = None) -> dict:
        """Take the board out and put a new blank one (new MAC, erased flash) in its place.

        `faults` makes the new board a faulty one from the moment it is plugged in.
        """
        def do():
            self._unplug()
            self.mac = mac or self.chip.mac_oui + bytes(self.rng.randrange(256) for _ in range(3))
            self.efuse.blank(self.chip.factory_efuses(self.mac))
            self._reset_registers()
            self.flash.wipe()
            self.faults = Faults(**(faults or {}))
            self.boots = self.bytes_in = self.bytes_out = 0
            self._save_identity()
            self._replug()
            return self.describe()
        return self.call(do)

    def set_fault(self, name: str, value: Any = True) -> dict:
        if name not in Faults.names():
            raise ValueError(f"unknown fault {name!r}; faults: {', '.join(Faults.names())}")
        if name == "pairing" and value not in PAIRING_FAULTS + (None,):
            raise ValueError(f"pairing fault is one of {', '.join(PAIRING_FAULTS)}")
        def do():
            setattr(self.faults, name, value)
            return self.describe()
        return self.call(do)

    def clear_faults(self) -> dict:
        def do():
            self.faults = Faults()
            return self.describe()
        return self.call(do)

    def state(self) -> dict:
        return self.call(self.describe)

    def console_text(self) -> str:
        return self.call(lambda: self.console.decode("utf-8", "replace"))

    def describe(self) -> dict:
        return {
            "index": self.index, "chip": self.chip.name, "mac": self.mac_text,
            "flash_size": self.flash_size, "flash_part": self.flash.part.name,
            "powered": self.powered, "mode": self._mode_name(), "baud": self.baud,
            "stub": self.loader.stub.version if self.loader and self.loader.stub else None,
            "app": asdict(self.app) if self.app else None, "boot_error": self.boot_error,
            "boots": self.boots, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "faults": {k: v for k, v in asdict(self.faults).items() if v not in (None, False, 0.0)},
            "realtime": self.realtime,
            "pairing_url": f"http://{self.net_ip}:{self.http_port}",
            "app_mode": self.runtime.mode if self.runtime else None,
            "flash_file": str(self.flash.path) if self.flash.path else None,
            "usb_serial_jtag": self.usb_serial_jtag,
            "watchdog_armed": self._wdt_armed is not None,
            "flash_encryption": self.efuse.flash_encryption_enabled,
            "download_disabled": self.efuse.download_disabled,
        }

    def usb_descriptor(self) -> dict:
        """What the host's USB stack reports for this board's port (pyserial's ListPortInfo fields)."""
        slot = f"1-1.{self.index + 1}"
        if self.usb_serial_jtag:
            # the controller's CDC-ACM and JTAG interfaces: pyserial names the location by interface
            return {"vid": 0x303A, "pid": 0x1001, "serial_number": self.mac_text.upper(),
                    "manufacturer": "Espressif", "product": "USB JTAG/serial debug unit",
                    "location": f"{slot}:1.0", "interface": None}
        return {"vid": 0x10C4, "pid": 0xEA60, "serial_number": hashlib.md5(self.mac).hexdigest(),
                "manufacturer": "Silicon Labs", "product": "CP2102N USB to UART Bridge Controller",
                "location": slot, "interface": None}

    def _mode_name(self) -> str:
        if self.mode == "rom" and self.loader and self.loader.stub:
            return "stub"
        return self.mode

    # -- the device thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                try:
                    ev = self._events.get(timeout=timeout)
                except queue.Empty:
                    ev = None
                if ev is not None:
                    kind = ev[0]
                    if kind == "stop":
                        self._stop_app()
                        return
                    if kind == "rx":
                        self._on_rx(ev[1], ev[2], ev[3])
                    elif kind == "lines":
                        self._on_lines(ev[1], ev[2], ev[3])
                    elif kind == "host":
                        self.reset_capable_hosts += 1 if ev[1] else -1
                    elif kind == "call":
                        _, fn, box, done = ev
                        try:
                            box["result"] = fn()
                        except Exception as exc:  # handed back to the caller
                            box["error"] = exc
                        done.set()
                self._run_timers()
        finally:
            self._stopped.set()

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()

    # -- power, reset and boot ----------------------------------------------------------
    def _stop_app(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
            self._stopped_apps = [a for a in self._stopped_apps if a.running()] + [self.runtime]
            self.runtime = None

    def _power_off(self) -> None:
        self._stop_app()
        self.mode = "off"
        self.loader = None
        self.app = None
        self._timers.clear()
        self.flash.sync()

    def _power_up(self, cause: str) -> None:
        if not self.powered:
            return
        # with no reset-capable host attached the board sits in a jig holding IO0 low
        if self.reset_capable_hosts == 0:
            download = True
        else:
            download = self.io0_low
        if self.faults.no_answer or self.faults.no_download_mode:
            download = False
        self._start(download, cause)

    def _chip_reset(self) -> None:
        self._stop_app()
        self.mode = "reset"
        self.loader = None
        self.app = None
        self._timers.clear()
        self.decoder.reset()
        self.flash.sync()

    def _start(self, download: bool, cause: str, keep_console: bool = False) -> None:
        if not self.powered:
            return
        if self.faults.no_download_mode or self.efuse.download_disabled:
            download = False  # DIS_DOWNLOAD_MODE: the ROM boots from flash whatever IO0 says
        self._stop_app()
        self._timers.clear()
        self.decoder.reset()
        self.mode = "booting"
        self.boot_time = time.monotonic()
        self.boots += 1
        if not keep_console:
            self.console.clear()
        # the USB controller resets the digital core only: the RTC domain and its watchdog run on
        rtc = self._rtc_domain() if cause == "usb" else {}
        wdt_deadline = self._wdt_deadline if cause == "usb" else None
        self.flash_attached = False
        self._wdt_armed = self._wdt_deadline = None
        self._reset_registers()
        self.regs.update(rtc)
        if wdt_deadline is not None:
            self._arm_wdt(wdt_deadline)
        reset_text = {"poweron": self.chip.poweron_reset, "wdt": self.chip.wdt_reset,
                      "sw": self.chip.sw_reset, "usb": self.chip.usb_reset}[cause]
        if download:
            self.mode = "rom"
            self.app = None
            self.loader = Loader(self)
            self.baud = None  # the ROM auto-bauds on the first SYNC
            self._print(self.chip.banner(reset_text, self.chip.download_boot) + "waiting for download\n")
            return
        self.loader = None
        self.baud = 115200
        encrypted = self.efuse.flash_encryption_enabled
        result = boot_from_flash(self.chip, self.cache_read, self.flash.size, reset_text,
                                 plaintext_flashes_left=self.efuse.plaintext_flashes_left if encrypted else None,
                                 secure_boot=self.efuse.secure_boot_digests(), first_boot=self._encrypt_flash,
                                 compiled_table_offset=self.compiled_table_offset)
        self._print(result.log)
        if result.reset:  # encrypted on this first boot: the bootloader resets into the encrypted firmware
            self._start(False, "sw", keep_console=True)
            return
        self.boot_error = result.error
        if result.app is None:
            self.mode = "bootloop"
            self.app = None
            self.schedule(BOOTLOOP_PERIOD, lambda: self._start(False, "wdt"))
            return
        self.mode = "app"
        self.app = result.app
        if self.faults.panic_after is not None:
            self.schedule(self.faults.panic_after, self._panic)
        manifest = read_manifest(self.cache_read(result.app_offset, 8192))
        if manifest and manifest.get("sdk") == "2smart":
            self.runtime = TwoSmartApp(self, manifest, result.app.version, result.partition_table_offset)
            self.runtime.start()
        else:
            self._print(f"I ({self.uptime_ms()}) app: {result.app.project_name} "
                        f"{result.app.version} running\n")

    def _encrypt_flash(self, mode: str, parts, bootloader: tuple[int, int], log, table_offset: int) -> str | None:
        """The bootloader's first-boot flash encryption, with this chip's eFuses and flash."""
        return encrypt_on_first_boot(self.chip.key, self.chip.image_chip_id, self.efuse, self.flash, mode, parts,
                                     bootloader, log, table_offset)

    def _panic(self) -> None:
        if self.mode != "app":
            return
        self._stop_app()
        self._print("Guru Meditation Error: Core  0 panic'ed (LoadProhibited). Exception was unhandled.\n\n"
                    "Core  0 register dump:\nPC      : 0x400d2f5e  PS      : 0x00060330  A0      : 0x800d3a1c\n\n"
                    "Backtrace: 0x400d2f5b:0x3ffb1f50 0x400d3a19:0x3ffb1f80 0x4008a1e6:0x3ffb1fb0\n\n"
                    "Rebooting...\n")
        self._start(False, "sw")

    def soft_reset_to_rom(self) -> None:
        self._start(True, "sw")

    def leave_loader(self) -> None:
        self.flash.sync()
        self._start(False, "sw")

    def run_unknown_ram_code(self, entry: int) -> None:
        self.mode = "halted"  # running code we cannot emulate: the UART falls silent
        self.loader = None

    def _unplug(self) -> None:
        if not self.powered:
            return
        self._power_off()
        self.powered = False
        for link in self.links:
            link.unplugged()

    def _replug(self) -> None:
        if self.powered:
            return
        self.powered = True
        self.bytes_since_plug = 0
        self.dtr = self.rts = False
        self.download_flag = False
        self.en_low = self.io0_low = False
        self.strap_at = None
        for link in self.links:
            link.replugged()
        self._power_up("poweron")

    # -- the auto-reset circuit ---------------------------------------------------------
    def _on_lines(self, dtr: bool, rts: bool, t: float) -> None:
        if not self.powered or self.faults.no_answer:
            return
        if self.usb_serial_jtag:
            self._on_usb_lines(dtr, rts)
            return
        if self.strap_at is not None and t >= self.strap_at:
            self._resolve_strap()
        self.dtr, self.rts = dtr, rts
        en_low = rts and not dtr  # transistor pair of the classic dev-board circuit
        io0_low = dtr and not rts
        self.io0_low = io0_low and not self.faults.no_download_mode
        if en_low and not self.en_low:
            self.en_low = True
            self.strap_at = None
            self._chip_reset()
        elif not en_low and self.en_low:
            self.en_low = False
            self.strap_at = t + STRAP_DELAY
            self.schedule(max(0.0, self.strap_at - time.monotonic()), self._strap_timer)

    def _on_usb_lines(self, dtr: bool, rts: bool) -> None:
        """The USB-Serial/JTAG controller's use of DTR/RTS (ESP32-C3/S3 TRM, "CDC-ACM Settings with RTS and DTR").

        RTS 0 DTR 0 clears the download-mode flag, RTS 0 DTR 1 sets it, RTS 1 DTR 0 resets the chip
        (into download mode if the flag is set, else from flash), RTS 1 DTR 1 does nothing. A host
        request that repeats the lines already set is no change and resets nothing.
        """
        if (dtr, rts) == (self.dtr, self.rts):
            return
        self.dtr, self.rts = dtr, rts
        if not rts:
            self.download_flag = dtr and not self.faults.no_download_mode
        elif not dtr:
            self._chip_reset()
            self._start(self.download_flag, "usb")

    def _strap_timer(self) -> None:
        if self.strap_at is not None and time.monotonic() >= self.strap_at:
            self._resolve_strap()

    def _resolve_strap(self) -> None:
        self.strap_at = None
        if self.mode == "reset":
            self._start(self.io0_low, "poweron")

    # -- the wire -------------------------------------------------------------------------
    def _on_rx(self, data: bytes, host_baud: int | None, t: float) -> None:
        if host_baud:
            self.host_baud = host_baud
        if not self.powered:
            return
        if self.faults.unplug_after is not None:
            left = self.faults.unplug_after - self.bytes_since_plug
            if len(data) >= left:
                self.bytes_since_plug += max(0, left)
                self.faults.unplug_after = None
                self._unplug()
                return
        self.bytes_in += len(data)
        self.bytes_since_plug += len(data)
        if self.faults.hang_after is not None and self.bytes_since_plug >= self.faults.hang_after:
            if self.mode != "halted":
                self._stop_app()
                self.mode, self.loader = "halted", None  # a hung chip: only a reset brings it back
            return
        if self.realtime:
            arrive = max(t, self.rx_clock) + len(data) * 10 / (USB_WIRE_BAUD if self.usb_serial_jtag
                                                                  else self.host_baud)
            self.rx_clock = arrive
            self._sleep_until(arrive)
        if self.mode != "rom" or self.loader is None:
            return  # in reset, in the app (console input is ignored) or silent
        if self.baud is None:
            self.baud = self.host_baud  # ROM auto-baud locks on the first sync
        data = self._corrupt(data, self.host_baud, self.baud, "rx")
        for frame in self.decoder.feed(data):
            if self.loader is None:
                break
            self.loader.handle(frame)

    def _corrupt(self, data: bytes, sender: int | None, receiver: int | None, wire: str) -> bytes:
        """What arrives when a UART reads bytes sent at `sender` baud at `receiver` baud."""
        noise = self._noise.get(wire)
        if noise is None:
            noise = self._noise[wire] = WireNoise(f"{self._noise_seed}:{wire}")
        if self.usb_serial_jtag:
            sender = receiver = None  # CDC-ACM frames carry bytes, not bit times: no rate to miss
        if sender and receiver and abs(sender / receiver - 1) > BAUD_TOLERANCE:
            # wrong rate: framing errors; fewer or more bytes, none of them right
            n = max(1, int(len(data) * receiver / sender))
            return noise.garbage(min(n, 4096))
        rate = self.faults.noise
        if self.faults.garble_above and sender and sender > self.faults.garble_above:
            rate = max(rate, GARBLE_RATE)
        return noise.flip_bits(data, rate)

    def _print(self, text: str) -> None:
        raw = text.replace("\n", "\r\n").encode()
        self.console += text.encode()
        if len(self.console) > CONSOLE_KEEP:
            del self.console[: len(self.console) - CONSOLE_KEEP]
        self.tx(raw)

    def send_frame(self, payload: bytes) -> None:
        self.tx(encode(payload))

    def tx(self, data: bytes) -> None:
        if not self.powered or self.mode in ("off", "reset"):
            return
        dev_baud = self.baud or 115200
        self.bytes_out += len(data)
        if self.realtime:
            wire = USB_WIRE_BAUD if self.usb_serial_jtag else dev_baud
            done = max(time.monotonic(), self.tx_clock) + len(data) * 10 / wire
            self.tx_clock = done
            self._sleep_until(done)
        for sink in list(self.sinks):
            try:
                sink.write(self._corrupt(data, dev_baud, sink.baud(), f"tx-{sink.name}"))
            except OSError:
                pass  # the host end went away; a UART does not notice

    def set_baud(self, baud: int) -> None:
        self.baud = baud

    # -- flash timing -------------------------------------------------------------------
    def _sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def flash_busy(self, seconds: float, pipelined: bool) -> None:
        """Account for flash latency; the stub overlaps it with the next block's transfer."""
        if not self.realtime or seconds <= 0:
            return
        now = time.monotonic()
        if pipelined:
            start = max(now, self.flash_ready_at)
            self.flash_ready_at = start + seconds
            self._sleep_until(start)
        else:
            self.flash_drain()
            self.flash_ready_at = time.monotonic() + seconds
            self._sleep_until(self.flash_ready_at)

    def flash_drain(self) -> None:
        if self.realtime:
            self._sleep_until(self.flash_ready_at)

    # -- registers and the SPI flash controller --------------------------------------------
    def rom_crystal_hz(self) -> float:
        return ESP32_RTC_CALI * 15625 * ESP32_CK8M / 40

    def read_register(self, addr: int) -> int:
        if self.efuse.owns(addr):
            return self.efuse.read(addr)
        if addr == self.chip.uart_clkdiv_reg:
            return int(40_000_000 / (self.baud or self.host_baud or 115200)) & 0xFFFFF
        return self.regs.get(addr, 0)

    def write_register(self, addr: int, value: int, mask: int = 0xFFFFFFFF) -> None:
        if self.efuse.owns(addr):
            if self.faults.hang_after_burns is not None and self.efuse.is_program(addr, value, mask):
                if self.efuse.programs >= self.faults.hang_after_burns:
                    self._stop_app()
                    self.mode, self.loader = "halted", None  # a brown-out as the burn starts: nothing burned
                    return
            self.efuse.write(addr, value, mask)
            return
        wdt = self.chip.rtc_wdt
        if wdt and addr in wdt.registers[:2] and self.regs.get(wdt.wprotect, 0) != wdt.wkey:
            return  # write-protected: esptool unlocks with the key first
        old = self.regs.get(addr, 0)
        self.regs[addr] = (old & ~mask) | (value & mask)
        if wdt and addr == wdt.config0:
            self._rtc_watchdog(wdt)
            return
        spi = self.chip.spi
        if addr == spi.cmd and self.regs[addr] & (1 << 18):
            self._spi_command()
            self.regs[addr] &= ~(1 << 18)

    def _rtc_watchdog(self, wdt) -> None:
        """Enabled with a stage-0 action, the RTC watchdog resets the whole chip when its count runs out."""
        config0 = self.regs.get(wdt.config0, 0)
        if not (config0 >> 31 and (config0 >> 28) & 0x7):
            self._wdt_armed = self._wdt_deadline = None
            return
        ticks = self.regs.get(wdt.config1, 0) or 200_000  # the register's reset value
        self._arm_wdt(time.monotonic() + ticks / wdt.slow_clock_hz)

    def _arm_wdt(self, deadline: float) -> None:
        token = self._wdt_armed = next(self._seq)
        self._wdt_deadline = deadline

        def expire() -> None:
            if self._wdt_armed == token:
                self._wdt_reset()
        self.schedule(max(0.0, deadline - time.monotonic()), expire)

    def _rtc_domain(self) -> dict[int, int]:
        wdt = self.chip.rtc_wdt
        return {a: self.regs[a] for a in wdt.registers if a in self.regs} if wdt else {}

    def _wdt_reset(self) -> None:
        """A system reset: the chip samples its strapping pins again, as at power-on."""
        self._chip_reset()
        self.download_flag = False
        self._power_up("wdt")

    def _spi_command(self) -> None:
        spi = self.chip.spi
        usr = self.regs.get(spi.base + spi.usr, 0)
        opcode = self.regs.get(spi.base + spi.usr2, 0) & 0xFF
        miso_bits = self.regs.get(spi.base + spi.miso_dlen, 0) + 1 if usr & (1 << 28) else 0
        addr = 0
        if usr & (1 << 30):
            addr_len = ((self.regs.get(spi.base + spi.usr1, 0) >> 26) & 0x3F) + 1
            addr = self.regs.get(spi.addr, 0)
            if spi.addr_msb:
                addr >>= 32 - addr_len
        if self.faults.flash_dead:
            result = 0xFFFFFFFF  # MISO floats high
        elif not self.flash_attached:
            result = self.chip.unattached_flash_id  # the ROM has not routed the flash pins yet
        elif opcode == 0x9F:
            result = self.flash.part.rdid
        elif opcode == 0x5A:
            chunk = self.sfdp[addr : addr + 4] if addr < len(self.sfdp) else b""
            result = int.from_bytes(chunk.ljust(4, b"\xff"), "little")
        else:
            result = 0  # status registers read 0: not busy, nothing protected
        if miso_bits:
            result &= (1 << min(miso_bits, 32)) - 1
            self.regs[spi.base + spi.w0] = result
