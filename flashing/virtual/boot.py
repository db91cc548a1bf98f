"""What the virtual board prints when it boots from flash, and whether it comes up.

Runs the checks a ROM and ESP-IDF's 2nd-stage bootloader make (bootloader image
magic, chip id, checksum and appended SHA-256; with Secure Boot v2 on, the ROM's check
of the bootloader's own signature; the partition table with its MD5 entry; otadata's
choice of app, then each app image in the order the bootloader tries them) and renders
the serial log a real board prints at 115200: ROM banner, bootloader lines (its own IDF
version and compile time), app start — or the real failure text.

Where the partition table is: a real bootloader has CONFIG_PARTITION_TABLE_OFFSET compiled
in, so the virtual one reads the table where its own image says it was built to
(`images.declared_table_offset`: the build fact a generated bootloader carries in its first
segment when it moved the table). A bootloader that says nothing — a generated one built
for the default, or a real IDF build, whose value no one can read from its code — reads
it at `compiled_table_offset`: 0x8000 unless the board is told otherwise (the station
tells its virtual boards the profile's offset, as it tells them the module's flash size).
A table anywhere else is not looked for: the boot fails as ESP-IDF's does ("Failed to
verify partition table", "load partition table error!").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ..images import (
    FACTORY_INDEX,
    GENERATED_DATE,
    GENERATED_IDF_VERSION,
    GENERATED_TIME,
    MAX_BOOTLOADER_SIZE,
    OTA_IMG_VALID,
    OTADATA_SIZE,
    PARTITION_TABLE_OFFSET,
    PARTITION_TABLE_SIZE,
    SECTOR,
    TEST_APP_INDEX,
    AppDescription,
    ImageError,
    Partition,
    boot_order,
    bootloader_flash_encryption,
    check_image,
    chip_facts,
    declared_table_offset,
    ota_select_entry,
    parse_partition_table,
    partition_usage,
    select_boot,
)
from .chips import ChipModel
from .secure_boot import verify_app

SIZE_NAMES = {0: "1MB", 1: "2MB", 2: "4MB", 3: "8MB", 4: "16MB"}
FREQ_NAMES = {0x0: "40MHz", 0x1: "26.7MHz", 0x2: "20MHz", 0xF: "80MHz"}


@dataclass(frozen=True)
class BootResult:
    log: str  # everything printed from the ROM banner to the app start or failure
    app: AppDescription | None  # the app that runs, None when the boot failed
    app_offset: int | None
    error: str | None  # the failure in the board's own words
    reset: bool = False  # the bootloader enabled flash encryption and resets itself ("first boot")
    partition_table_offset: int = PARTITION_TABLE_OFFSET  # where the bootloader read it (the app reads it there)


class _Log:
    def __init__(self, start_ms: int = 27):
        self.lines: list[str] = []
        self.ms = start_ms

    def raw(self, text: str) -> None:
        self.lines.append(text)

    def i(self, tag: str, msg: str, step: int = 4) -> None:
        self.ms += step
        self.lines.append(f"I ({self.ms}) {tag}: {msg}")

    def w(self, tag: str, msg: str, step: int = 4) -> None:
        self.ms += step
        self.lines.append(f"W ({self.ms}) {tag}: {msg}")

    def e(self, tag: str, msg: str, step: int = 4) -> None:
        self.ms += step
        self.lines.append(f"E ({self.ms}) {tag}: {msg}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def boot_from_flash(chip: ChipModel, read: Callable[[int, int], bytes], flash_size: int,
                    reset_cause: str, write: Callable[[int, bytes], None] | None = None,
                    plaintext_flashes_left: int | None = None,
                    secure_boot: tuple[bytes, ...] | None = None,
                    first_boot: Callable | None = None,
                    compiled_table_offset: int = PARTITION_TABLE_OFFSET) -> BootResult:
    """Boot from flash as the ROM and the 2nd-stage bootloader do; the log they print and the app that runs.

    `read` is flash as the CPU sees it through the cache: on a chip with flash encryption on it
    decrypts, so a plaintext image reads as noise and fails the image checks with the real text.
    `plaintext_flashes_left` (encryption on) is what the bootloader reports as it checks encryption
    (ESP-IDF bootloader_support/src/flash_encrypt.c, esp_flash_encrypt_state).
    `secure_boot` (Secure Boot v2 on) holds the trusted key digests each app's signature is checked
    against (bootloader_support/src/secure_boot_v2, esp_image_format.c verify_secure_boot_signature).

    `compiled_table_offset`: where a bootloader that does not declare its partition table's offset
    reads it (see the module's docstring).

    `write(offset, sector)` erases and programs one flash sector: the bootloader sets otadata[0]
    when it starts ota_0 with blank otadata and no factory app (without it, that write is skipped).

    `first_boot(mode, partitions, (offset, length) of the bootloader, log)` enables flash encryption
    (flashing/virtual/first_boot.py) when the bootloader was built with it and encryption is still off:
    a bootloader carries what its build enables (flashing.images.bootloader_flash_encryption).
    """
    log = _Log()
    log.raw(chip.banner(reset_cause, chip.flash_boot).rstrip("\n"))
    # ROM: load the 2nd-stage bootloader
    try:
        bl = check_image(read, chip.bootloader_offset, MAX_BOOTLOADER_SIZE.get(chip.key, 0x10000), chip.image_chip_id)
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
        if secure_boot is not None and not verify_app(read, chip.bootloader_offset, bl.length, secure_boot).ok:
            # the ESP32 v3 ROM checks what it loaded against BLOCK2's digest (ABS_DONE_1). Its failure words are
            # not published for v2: these are the same ROM's Secure Boot v1 words (esp-idf issues #743, #7421)
            log.raw("secure boot check fail")
            log.raw("ets_main.c 371")
            return BootResult(log.text(), None, None, "the ROM's secure boot check of the bootloader failed")
    else:
        log.raw("SPIWP:0xee")
        log.raw(f"mode:{mode}, clock div:1")
        if secure_boot is not None:  # the ROM checks the bootloader's own signature before it loads it
            # the ROM's lines as a C3 with secure boot prints them (a device log); the failure line by analogy
            log.raw("Valid secure boot key blocks: " + " ".join(str(i) for i in range(len(secure_boot))))
            if not verify_app(read, chip.bootloader_offset, bl.length, secure_boot).ok:
                log.raw("secure boot verification failed")
                return BootResult(log.text(), None, None, "the ROM's secure boot check of the bootloader failed")
            log.raw("secure boot verification succeeded")
        for _, addr, length in bl.segments:
            log.raw(f"load:0x{addr:08x},len:0x{length:x}")
    log.raw(f"entry 0x{bl.entry:08x}")
    # 2nd stage bootloader: its banner is its own esp_bootloader_desc_t (IDF 5.1 on)
    desc = bl.bootloader
    log.i("boot", f"ESP-IDF {desc.idf_version if desc else GENERATED_IDF_VERSION} 2nd stage bootloader", 0)
    log.i("boot", f"compile time {desc.date_time if desc else f'{GENERATED_DATE} {GENERATED_TIME}'}", 0)
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
    first = bl.segments[0]
    declared = declared_table_offset(read(chip.bootloader_offset + first[0], first[2]))
    table_at = compiled_table_offset if declared is None else declared
    try:
        parts = parse_partition_table(read(table_at, PARTITION_TABLE_SIZE))
    except ImageError as exc:
        log.e("flash_parts", str(exc))
        log.e("boot", "Failed to verify partition table")
        log.e("boot", "load partition table error!")
        return BootResult(log.text(), None, None, f"load partition table error: {exc}",
                          partition_table_offset=table_at)
    log.i("boot", "Partition Table:")
    log.i("boot", "## Label            Usage          Type ST Offset   Length")
    for n, p in enumerate(parts):
        log.i("boot", f"{n:2d} {p.name:<16} {partition_usage(p):<16} {p.type:02x} {p.subtype:02x} "
                      f"{p.offset:08x} {p.size:08x}", 1)
    log.i("boot", "End of partition table")
    built = bootloader_flash_encryption(read(chip.bootloader_offset, bl.length))
    enable = None
    if built and plaintext_flashes_left is None and first_boot is not None:
        def enable(log: _Log) -> str | None:
            return first_boot(built, parts, (chip.bootloader_offset, bl.length), log, table_at)
    result = _load_app(chip, read, write, flash_size, parts, log, plaintext_flashes_left, secure_boot, enable)
    return dataclasses.replace(result, partition_table_offset=table_at)


def _load_app(chip: ChipModel, read: Callable[[int, int], bytes], write: Callable[[int, bytes], None] | None,
              flash_size: int, parts: list[Partition], log: _Log,
              plaintext_flashes_left: int | None = None,
              secure_boot: tuple[bytes, ...] | None = None,
              enable_encryption: Callable[[_Log], str | None] | None = None) -> BootResult:
    """otadata's choice, then each candidate app in the bootloader's order until one loads."""
    ota_info = next((p for p in parts if p.type == 1 and p.subtype == 0x00), None)
    otadata = None
    if ota_info is not None:
        fits = ota_info.size >= OTADATA_SIZE and ota_info.offset + OTADATA_SIZE <= flash_size
        otadata = read(ota_info.offset, OTADATA_SIZE) if fits else b""
    choice = select_boot(parts, otadata)
    if choice.info:
        log.i("boot", choice.info)
    if choice.error:
        log.e("boot", choice.error)
    if choice.index is None:
        return BootResult(log.text(), None, None, choice.error)
    facts = chip_facts(chip.key)
    first_error = None
    for index, part in boot_order(parts, choice.index):
        if part.offset + part.size > flash_size:
            msg = f"partition {part.name} at 0x{part.offset:x} is beyond the flash size"
            log.e("boot", msg)
            first_error = first_error or "app partition beyond flash size"
            _not_bootable(log, index)
            continue

        def segment(i: int, pos: int, addr: int, length: int, base: int = part.offset) -> None:
            how = "map" if facts.is_mapped(addr) else ("load" if addr >= 0x10000000 else "")
            log.i("esp_image", f"segment {i}: paddr={base + pos:08x} vaddr={addr:08x} size={length:05x}h "
                               f"({length:6d}) {how}", 2)

        try:
            app = check_image(read, part.offset, part.size, chip.image_chip_id, on_segment=segment)
        except ImageError as exc:
            msg = str(exc)
            if msg.startswith("invalid header"):
                msg = f"image at 0x{part.offset:x} has invalid magic byte (nothing flashed here?)"
            log.e("esp_image", msg)
            first_error = first_error or msg
            _not_bootable(log, index)
            continue
        if secure_boot is not None and not _signature_checked(read, part, app.length, secure_boot, log):
            first_error = first_error or "Secure Boot V2 verification failed"
            _not_bootable(log, index)
            continue
        if index == TEST_APP_INDEX:
            log.w("boot", "Falling back to test app as only bootable partition")
        log.i("boot", f"Loaded app from partition at offset 0x{part.offset:x}")
        if choice.initial and index > FACTORY_INDEX and write is not None and ota_info is not None:
            write(ota_info.offset, ota_select_entry(index + 1, OTA_IMG_VALID).ljust(SECTOR, b"\xff"))
            log.i("boot", f"Set actual ota_seq={index + 1} in otadata[0]")
        if secure_boot is not None:
            log.i("secure_boot_v2", "enabling secure boot v2...", 0)
            log.i("secure_boot_v2", "secure boot v2 is already enabled, continuing..")
        if plaintext_flashes_left is not None:
            log.i("boot", "Checking flash encryption...", 0)
            log.i("flash_encrypt", f"flash encryption is enabled ({plaintext_flashes_left} plaintext flashes left)")
        elif enable_encryption is not None:  # bootloader_utility.c load_image: encrypt, then reset
            log.i("boot", "Checking flash encryption...", 0)
            error = enable_encryption(log)
            if error:
                log.e("boot", "Flash encryption check failed (-1).")
                return BootResult(log.text(), None, None, error)
            log.i("boot", "Resetting with flash encryption enabled...", 1)
            return BootResult(log.text(), None, None, None, reset=True)
        return _app_start(app.app, part, log)
    log.e("boot", "No bootable app partitions in the partition table")
    return BootResult(log.text(), None, None, first_error or "no bootable app partition")


def _signature_checked(read: Callable[[int, int], bytes], part: Partition, length: int,
                       trusted: tuple[bytes, ...], log: _Log) -> bool:
    """The bootloader's Secure Boot v2 check of one app, with its log lines."""
    log.i("secure_boot_v2", "Verifying with RSA-PSS...")
    verdict = verify_app(read, part.offset, length, trusted)
    if verdict.ok:
        log.i("secure_boot_v2", "Signature verified successfully!", 8)
        return True
    if verdict.rom_line:
        log.raw(verdict.rom_line)
    log.e("secure_boot_v2", "Secure Boot V2 verification failed.", 1)
    log.e("esp_image", "Secure boot signature verification failed", 3)
    log.i("esp_image", "Calculating simple hash to check for corruption...", 1)
    log.w("esp_image", "image valid, signature bad", 60)
    return False


def _not_bootable(log: _Log, index: int) -> None:
    """log_invalid_app_partition's words."""
    if index == FACTORY_INDEX:
        log.e("boot", "Factory app partition is not bootable")
    elif index == TEST_APP_INDEX:
        log.e("boot", "Factory test app partition is not bootable")
    else:
        log.e("boot", f"OTA app partition slot {index} is not bootable")


def _app_start(desc: AppDescription | None, part: Partition, log: _Log) -> BootResult:
    log.i("boot", "Disabling RNG early entropy source...")
    log.i("cpu_start", "Pro cpu up.", 20)
    log.i("cpu_start", "Pro cpu start user code", 10)
    log.i("cpu_start", "cpu freq: 160000000 Hz")
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
