"""What the virtual board prints when it boots from flash, and whether it comes up.

Runs the checks a ROM and ESP-IDF's 2nd-stage bootloader make (bootloader image
magic, chip id, checksum and appended SHA-256; the partition table at 0x8000 with
its MD5 entry; the app partition's image) and renders the serial log a real board
prints at 115200: ROM banner, bootloader lines, app start — or the real failure text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..images import (
    PARTITION_TABLE_OFFSET,
    PARTITION_TABLE_SIZE,
    AppDescription,
    ImageError,
    check_image,
    boot_partition,
    parse_partition_table,
)
from .chips import ChipModel

SIZE_NAMES = {0: "1MB", 1: "2MB", 2: "4MB", 3: "8MB", 4: "16MB"}
FREQ_NAMES = {0x0: "40MHz", 0x1: "26.7MHz", 0x2: "20MHz", 0xF: "80MHz"}


@dataclass(frozen=True)
class BootResult:
    log: str  # everything printed from the ROM banner to the app start or failure
    app: AppDescription | None  # the app that runs, None when the boot failed
    app_offset: int | None
    error: str | None  # the failure in the board's own words


class _Log:
    def __init__(self, start_ms: int = 27):
        self.lines: list[str] = []
        self.ms = start_ms

    def raw(self, text: str) -> None:
        self.lines.append(text)

    def i(self, tag: str, msg: str, step: int = 4) -> None:
        self.ms += step
        self.lines.append(f"I ({self.ms}) {tag}: {msg}")

    def e(self, tag: str, msg: str, step: int = 4) -> None:
        self.ms += step
        self.lines.append(f"E ({self.ms}) {tag}: {msg}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def boot_from_flash(chip: ChipModel, read: Callable[[int, int], bytes], flash_size: int,
                    reset_cause: str) -> BootResult:
    log = _Log()
    log.raw(chip.banner(reset_cause, chip.flash_boot).rstrip("\n"))
    # ROM: load the 2nd-stage bootloader
    try:
        bl = check_image(read, chip.bootloader_offset, 0x8000 - chip.bootloader_offset,
                         chip.image_chip_id)
    except ImageError as exc:
        msg = str(exc)
        if not msg.startswith("invalid header"):
            msg = f"bootloader image at 0x{chip.bootloader_offset:x}: {msg}"
        log.raw(msg)
        return BootResult(log.text(), None, None, msg)
    mode = bl.flash_mode_name
    if chip.key == "esp32":
        log.raw("configsip: 0, SPIWP:0xee")
        log.raw("clk_drv:0x00,q_drv:0x00,d_drv:0x00,cs0_drv:0x00,hd_drv:0x00,wp_drv:0x00")
        log.raw(f"mode:{mode}, clock div:2")
        for _, addr, length in bl.segments:
            log.raw(f"load:0x{addr:08x},len:{length}")
    else:
        log.raw("SPIWP:0xee")
        log.raw(f"mode:{mode}, clock div:1")
        for _, addr, length in bl.segments:
            log.raw(f"load:0x{addr:08x},len:0x{length:x}")
    log.raw(f"entry 0x{bl.entry:08x}")
    # 2nd stage bootloader
    log.i("boot", "ESP-IDF v5.1.2 2nd stage bootloader", 0)
    log.i("boot", "compile time Nov 26 2026 12:00:00", 0)
    if chip.key == "esp32":
        log.i("boot", "Multicore bootloader")
        log.i("boot", "chip revision: v3.0")
    else:
        log.i("boot", "chip revision: v0.4" if chip.key == "esp32c3" else "chip revision: v0.2")
    tag = f"boot.{chip.idf_target}"
    log.i(tag, f"SPI Speed      : {FREQ_NAMES.get(bl.flash_freq_code, '40MHz')}")
    log.i(tag, f"SPI Mode       : {mode}")
    log.i(tag, f"SPI Flash Size : {SIZE_NAMES.get(bl.flash_size_code, '4MB')}")
    log.i("boot", "Enabling RNG early entropy source...")
    try:
        parts = parse_partition_table(read(PARTITION_TABLE_OFFSET, PARTITION_TABLE_SIZE))
    except ImageError as exc:
        log.e("flash_parts", str(exc))
        log.e("boot", "Failed to verify partition table")
        log.e("boot", "load partition table error!")
        return BootResult(log.text(), None, None, f"load partition table error: {exc}")
    log.i("boot", "Partition Table:")
    log.i("boot", "## Label            Usage          Type ST Offset   Length")
    for n, p in enumerate(parts):
        usage = {(1, 2): "WiFi data", (1, 1): "RF data", (1, 0): "OTA data",
                 (0, 0): "factory app", (0, 0x10): "OTA app"}.get((p.type, p.subtype), "Unknown data")
        log.i("boot", f"{n:2d} {p.name:<16} {usage:<14} {p.type:02x} {p.subtype:02x} "
                      f"{p.offset:08x} {p.size:08x}", 1)
    log.i("boot", "End of partition table")
    part = boot_partition(parts)
    if part is None:
        log.e("boot", "No bootable app partitions in the partition table")
        return BootResult(log.text(), None, None, "no bootable app partition")
    if part.offset + part.size > flash_size:
        log.e("boot", f"partition {part.name} at 0x{part.offset:x} is beyond the flash size")
        return BootResult(log.text(), None, None, "app partition beyond flash size")
    try:
        app = check_image(read, part.offset, part.size, chip.image_chip_id)
    except ImageError as exc:
        msg = str(exc)
        if msg.startswith("invalid header"):
            msg = f"image at 0x{part.offset:x} has invalid magic byte (nothing flashed here?)"
        log.e("esp_image", msg)
        log.e("boot", f"{'Factory' if part.subtype == 0 else 'OTA'} app partition is not bootable")
        log.e("boot", "No bootable app partitions in the partition table")
        return BootResult(log.text(), None, None, msg)
    for _, addr, length in app.segments:
        log.i("esp_image", f"segment: paddr={part.offset:08x} vaddr={addr:08x} size={length:05x}h ({length:6d}) load", 2)
    log.i("boot", f"Loaded app from partition at offset 0x{part.offset:x}")
    log.i("boot", "Disabling RNG early entropy source...")
    log.i("cpu_start", "Pro cpu up.", 20)
    log.i("cpu_start", "Pro cpu start user code", 10)
    log.i("cpu_start", "cpu freq: 160000000 Hz")
    desc = app.app
    if desc is not None:
        log.i("app_init", "Application information:")
        log.i("app_init", f"Project name:     {desc.project_name}", 1)
        log.i("app_init", f"App version:      {desc.version}", 1)
        log.i("app_init", f"Compile time:     {desc.compile_date} {desc.compile_time}", 1)
        log.i("app_init", f"ESP-IDF:          {desc.idf_version}", 1)
    else:
        desc = AppDescription("?", "?", "?", "", "", 0)
    log.i("main_task", "Calling app_main()", 20)
    return BootResult(log.text(), desc, part.offset, None)
