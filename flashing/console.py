"""The board's serial console after reset: read the boot log and judge it."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import serial

BANNER = re.compile(r"rst:0x[0-9a-f]+ \(([A-Z_]+)\),boot:0x[0-9a-f]+ \(([^)]*)\)")
APP_STARTED = re.compile(r"Calling app_main\(\)|app_main\(\) started|cpu_start: Starting scheduler")
VERSION = re.compile(r"App version:\s+(\S+)")
PROJECT = re.compile(r"Project name:\s+(\S+)")
STA_IP = re.compile(r"^(?:I \(\d+\) [\w.]+: )?IP: (\d+\.\d+\.\d+\.\d+)", re.M)
AP_IP = re.compile(r"AP IP address: (\d+\.\d+\.\d+\.\d+)")
PANIC = re.compile(r"Guru Meditation Error[^\n]*|abort\(\) was called[^\n]*|"
                   r"Backtrace:[^\n]*|panic'ed[^\n]*")
HTTP_PORT = re.compile(r"listening on port (\d+)")
AP_NAME = re.compile(r'access point "([^"]+)" started')
CONFIG_ERROR = re.compile(r"E \(\d+\) 2smart: (config error: [^\n]+)")
MQTT_REFUSED = re.compile(r"broker refused login for this device: ([^\n;]+)")
# bootloader_utility.c: the reset a bootloader makes itself once it has encrypted the flash on its first boot
ENCRYPTED_ON_BOOT = re.compile(r"boot: Resetting with flash encryption enabled")
# the ROM's own refusals come first: no later line is printed once it stops
IMAGE_ERRORS = re.compile(r"invalid header: 0x[0-9a-f]+|secure boot (?:verification failed|check fail)|"
                          r"E \(\d+\) (?:esp_image|boot|flash_parts): [^\n]+")


NO_RESET = "this port cannot reset the board: nothing was printed after the reset (no boot log)"
NO_RESET_REMEDY = ("power-cycle the board to check it boots; on the fixture, check the DTR/RTS wiring to EN and IO0, "
                   "or switch the boot check off for ports that cannot reset")


@dataclass(frozen=True)
class BootLog:
    text: str
    banners: int
    app_started: bool
    project: str | None
    version: str | None
    sta_ip: str | None
    ap_ip: str | None
    panic: str | None
    image_error: str | None
    http_port: int | None = None
    ap_name: str | None = None
    config_error: str | None = None
    encrypted_on_boot: bool = False  # the bootloader enabled flash encryption and reset once (a first boot)

    @property
    def boot_loop(self) -> bool:
        return self.banners - self.encrypted_on_boot > 1

    def remedy(self) -> str:
        """What the operator does about `problem()`."""
        if self.problem() == NO_RESET:
            return NO_RESET_REMEDY
        return "replace the board if a retry fails the same way"

    def problem(self) -> str | None:
        """What is wrong with this boot, in the words of the line; None if it is clean."""
        if self.panic:
            return f"the firmware crashed after boot ({self.panic.strip()})"
        if self.config_error:
            return f"the firmware rejected its configuration: {self.config_error.removeprefix('config error: ')}"
        if self.image_error and not self.app_started:
            loop = " and the board is in a boot loop" if self.boot_loop else ""
            return f"the board cannot boot its firmware: {self.image_error.strip()}{loop}"
        if self.boot_loop:
            return "the board restarts again and again (boot loop)"
        if not self.banners:
            # the station just spoke to the chip on this port: a reset that reached EN prints a ROM banner
            return NO_RESET
        if not self.app_started:
            return "the app did not start within the boot timeout"
        return None


def parse_boot_log(text: str) -> BootLog:
    def first(rx: re.Pattern) -> str | None:
        m = rx.search(text)
        return m.group(1) if m and m.groups() else (m.group(0) if m else None)

    return BootLog(
        text=text, banners=len(BANNER.findall(text)), app_started=bool(APP_STARTED.search(text)),
        project=first(PROJECT), version=first(VERSION), sta_ip=first(STA_IP), ap_ip=first(AP_IP),
        panic=first(PANIC), image_error=first(IMAGE_ERRORS),
        http_port=int(first(HTTP_PORT)) if first(HTTP_PORT) else None, ap_name=first(AP_NAME),
        config_error=first(CONFIG_ERROR), encrypted_on_boot=bool(ENCRYPTED_ON_BOOT.search(text)),
    )


def read_boot_log(port: serial.SerialBase, timeout: float = 5.0, settle: float = 0.5,
                  cancelled=lambda: False) -> BootLog:
    """Read what the board prints until its app has run for `settle` seconds (or timeout)."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    started_at = None
    port.timeout = 0.05
    while time.monotonic() < deadline and not cancelled():
        chunk = port.read(max(1, port.in_waiting))
        if chunk:
            buf += chunk
            if started_at is None and APP_STARTED.search(buf.decode("utf-8", "replace")):
                started_at = time.monotonic()
        if started_at is not None and time.monotonic() - started_at >= settle:
            break
    text = buf.decode("utf-8", "replace").replace("\r\n", "\n")
    return parse_boot_log(text)
