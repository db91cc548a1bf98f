"""ESP firmware images and partition tables: parse, check and build the bytes.

Used by the virtual device's boot path (the checks a ROM and bootloader make) and
by the station (profile checks, the example firmware). Follows ESP-IDF's app image
format: 8-byte header, 16-byte extended header, segments, a checksum byte at the
next 16-byte boundary, then an optional SHA-256 of everything before it. Also the
2nd-stage bootloader's choice of app: otadata's two `esp_ota_select_entry_t` sectors,
read as ESP-IDF's bootloader_utility.c reads them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

IMAGE_MAGIC = 0xE9
CHECKSUM_SEED = 0xEF
APP_DESC_MAGIC = 0xABCD5432
PARTITION_MAGIC = b"\xaa\x50"
PARTITION_MD5_MAGIC = b"\xeb\xeb"
PARTITION_TABLE_OFFSET = 0x8000  # CONFIG_PARTITION_TABLE_OFFSET's default; a build may move it (multiple of 4 KiB)
PARTITION_TABLE_SIZE = 0xC00
PARTITION_TABLE_SECTOR = 0x1000  # what the table occupies: the first partition starts one sector after it
# the largest 2nd-stage bootloader a ROM loads (ESP-IDF api-guides/bootloader.rst "Bootloader Size": with Secure
# Boot v2 the ROM verifies it in a buffer of this size, so a larger one never boots)
MAX_BOOTLOADER_SIZE = {"esp32": 0xC000, "esp32c3": 0x10000, "esp32s3": 0x10000}
# the sdkconfig value a generated bootloader says it was compiled with (a real one has it compiled in, unreadable)
BOOTLOADER_FACTS_MARK = b"2SMART-BL:"
EXT_HEADER_FMT = "<BBBBHBHH4sB"
APP_DESC_FMT = "<II8s32s32s16s16s32s32sHHB3s72s"
MAX_SEGMENTS = 16

FLASH_MODES = {"qio": 0, "qout": 1, "dio": 2, "dout": 3}
FLASH_SIZES = {"1MB": 0x0, "2MB": 0x1, "4MB": 0x2, "8MB": 0x3, "16MB": 0x4}
FLASH_FREQS = {"40m": 0x0, "26m": 0x1, "20m": 0x2, "80m": 0xF}


# the chips the station and its virtual boards are built and tested for
SUPPORTED_CHIPS = ("esp32", "esp32c3", "esp32s3")


@dataclass(frozen=True)
class ChipFacts:
    key: str  # esptool's --chip name
    name: str  # esptool's CHIP_NAME
    image_chip_id: int
    bootloader_offset: int
    mapped: tuple[tuple[int, int], ...] = ()  # the flash-mapped (IROM, DROM) address ranges, [start, end)

    def is_mapped(self, addr: int) -> bool:
        """Is this load address one the cache maps from flash (a segment the bootloader maps, not loads)?"""
        return any(start <= addr < end for start, end in self.mapped)


def chip_facts(key: str) -> ChipFacts:
    """What an image for this chip must carry, from esptool's own chip definitions."""
    from esptool.targets import CHIP_DEFS

    c = CHIP_DEFS[key]
    return ChipFacts(key, c.CHIP_NAME, c.IMAGE_CHIP_ID, c.BOOTLOADER_FLASH_OFFSET,
                     ((c.IROM_MAP_START, c.IROM_MAP_END), (c.DROM_MAP_START, c.DROM_MAP_END)))


class ImageError(Exception):
    """An image that a ROM or bootloader would refuse; the message is its words."""


@dataclass(frozen=True)
class Segment:
    load_addr: int
    data: bytes


@dataclass(frozen=True)
class AppDescription:
    project_name: str
    version: str
    idf_version: str
    compile_date: str
    compile_time: str
    secure_version: int


@dataclass(frozen=True)
class BootloaderDescription:
    """esp_bootloader_desc_t (ESP-IDF 5.1 and later), at the start of the bootloader's first DRAM segment."""

    version: int
    idf_version: str
    date_time: str


BOOTLOADER_DESC_MAGIC = 0x50
BOOTLOADER_DESC_FMT = "<B3sI32s24s16s"  # as esptool's image-info reads it (80 bytes)


@dataclass(frozen=True)
class ImageInfo:
    chip_id: int
    entry: int
    flash_mode: int
    flash_size_code: int
    flash_freq_code: int
    segments: tuple[tuple[int, int, int], ...]  # (file offset, load addr, length)
    length: int  # bytes including checksum and hash
    hash_appended: bool
    app: AppDescription | None
    bootloader: BootloaderDescription | None = None

    @property
    def flash_size_name(self) -> str:
        names = {v: k for k, v in FLASH_SIZES.items()}
        return names.get(self.flash_size_code, "?")

    @property
    def flash_mode_name(self) -> str:
        names = {v: k for k, v in FLASH_MODES.items()}
        return names.get(self.flash_mode, "?").upper()


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_app_description(segment: bytes) -> AppDescription | None:
    if len(segment) < 256:
        return None
    fields = struct.unpack(APP_DESC_FMT, segment[:256])
    if fields[0] != APP_DESC_MAGIC:
        return None
    return AppDescription(
        project_name=_cstr(fields[4]),
        version=_cstr(fields[3]),
        idf_version=_cstr(fields[7]),
        compile_date=_cstr(fields[6]),
        compile_time=_cstr(fields[5]),
        secure_version=fields[1],
    )


def _text_field(raw: bytes) -> str | None:
    """A NUL-terminated printable ASCII field, or None (filler that happens to carry a magic byte)."""
    text, nul, _ = raw.partition(b"\0")
    if not nul or not text or not all(0x20 <= c < 0x7F for c in text):
        return None
    return text.decode("ascii")


def parse_bootloader_description(segment: bytes) -> BootloaderDescription | None:
    if len(segment) < struct.calcsize(BOOTLOADER_DESC_FMT):
        return None
    magic, _, version, idf, date_time, _ = struct.unpack_from(BOOTLOADER_DESC_FMT, segment)
    idf_text, date_text = _text_field(idf), _text_field(date_time)
    if magic != BOOTLOADER_DESC_MAGIC or idf_text is None or date_text is None:
        return None
    return BootloaderDescription(version, idf_text, date_text)


def bootloader_description(idf_version: str, date_time: str, version: int = 1) -> bytes:
    """The 80 bytes of an esp_bootloader_desc_t, to open a bootloader's first DRAM segment."""
    return struct.pack(BOOTLOADER_DESC_FMT, BOOTLOADER_DESC_MAGIC, b"", version, idf_version.encode()[:31],
                       date_time.encode()[:23], b"")


# Messages ESP-IDF compiles into a 2nd-stage bootloader only when its build enables flash encryption
# (bootloader_support/src/flash_encryption/flash_encrypt.c is all under CONFIG_SECURE_FLASH_ENC_ENABLED), the
# second only with CONFIG_SECURE_FLASH_ENCRYPTION_MODE_RELEASE (esp_flash_encrypt_enable). A bootloader's log
# strings sit in its DRAM segment: what the chip runs is what the board knows of its build.
FLASH_ENC_BUILT = b"Flash encryption completed"
FLASH_ENC_RELEASE_BUILT = b"Setting CRYPT_CNT for permanent encryption"


def bootloader_flash_encryption(image: bytes) -> str | None:
    """The flash-encryption mode a bootloader image was built with: "release", "development" or None (off)."""
    if FLASH_ENC_BUILT not in image:
        return None
    return "release" if FLASH_ENC_RELEASE_BUILT in image else "development"


def check_image(read: Callable[[int, int], bytes], offset: int, limit: int,
                chip_id: int | None = None,
                on_segment: Callable[[int, int, int, int], None] | None = None) -> ImageInfo:
    """Check an image in flash as the ROM/bootloader does; raise ImageError if bad.

    `read(offset, length)` reads flash; `limit` is how many bytes the image may span;
    `on_segment(index, data offset in the image, load address, length)` hears each segment as
    it is read, before the checksum is known (the bootloader logs them so).
    """
    head = read(offset, 24)
    magic, count, mode, size_freq, entry = struct.unpack("<BBBBI", head[:8])
    if magic != IMAGE_MAGIC:
        raise ImageError(f"invalid header: 0x{struct.unpack('<I', head[:4])[0]:08x}")
    if count == 0 or count > MAX_SEGMENTS:
        raise ImageError(f"image at 0x{offset:x} has invalid segment count {count}")
    ext = struct.unpack(EXT_HEADER_FMT, head[8:24])
    image_chip_id, hash_appended = ext[4], ext[9] == 1
    if chip_id is not None and image_chip_id != chip_id:
        raise ImageError(
            f"mismatch chip ID, expected {chip_id}, found {image_chip_id}"
        )
    pos = 24
    checksum = CHECKSUM_SEED
    segments = []
    app = boot_desc = None
    for i in range(count):
        if pos + 8 > limit:
            raise ImageError(f"image at 0x{offset:x} runs past its partition")
        load_addr, length = struct.unpack("<II", read(offset + pos, 8))
        pos += 8
        if length > limit or pos + length > limit:
            raise ImageError(
                f"image at 0x{offset:x} has invalid segment {i} length 0x{length:x}"
            )
        data = read(offset + pos, length)
        if i == 0:
            app = parse_app_description(data)
            boot_desc = parse_bootloader_description(data)
        if on_segment:
            on_segment(i, pos, load_addr, length)
        segments.append((pos, load_addr, length))
        checksum = _xor(data, checksum)
        pos += length
    pos += 15 - (pos % 16)  # pad so the checksum byte ends a 16-byte line
    stored = read(offset + pos, 1)[0]
    pos += 1
    if stored != checksum:
        raise ImageError(
            f"Checksum failed. Calculated 0x{checksum:x} read 0x{stored:x}"
        )
    if hash_appended:
        body = read(offset, pos)
        digest = read(offset + pos, 32)
        if hashlib.sha256(body).digest() != digest:
            raise ImageError("Image hash failed - image is corrupt")
        pos += 32
    return ImageInfo(
        chip_id=image_chip_id, entry=entry, flash_mode=mode,
        flash_size_code=size_freq >> 4, flash_freq_code=size_freq & 0xF,
        segments=tuple(segments), length=pos, hash_appended=hash_appended, app=app, bootloader=boot_desc,
    )


def check_image_bytes(data: bytes, chip_id: int | None = None) -> ImageInfo:
    def read(off: int, n: int) -> bytes:
        chunk = data[off : off + n]
        return chunk + b"\xff" * (n - len(chunk))

    return check_image(read, 0, len(data), chip_id)


def _xor(data: bytes, seed: int) -> int:
    if not data:
        return seed
    # XOR all bytes quickly: fold the big integer down to one byte.
    n = int.from_bytes(data, "little")
    width = len(data)
    while width > 1:
        half = (width + 1) // 2
        n = (n & ((1 << (8 * half)) - 1)) ^ (n >> (8 * half))
        width = half
    return (n & 0xFF) ^ seed


# -- building ---------------------------------------------------------------------


# what the station's generated firmware (flashing/firmware.py) says it was built with
GENERATED_IDF_VERSION, GENERATED_DATE, GENERATED_TIME = "v5.1.2", "Nov 26 2026", "12:00:00"


def app_description(project_name: str, version: str, idf_version: str = GENERATED_IDF_VERSION,
                    date: str = GENERATED_DATE, time: str = GENERATED_TIME,
                    secure_version: int = 0) -> bytes:
    return struct.pack(
        APP_DESC_FMT, APP_DESC_MAGIC, secure_version, b"", version.encode()[:31],
        project_name.encode()[:31], time.encode()[:15], date.encode()[:15],
        idf_version.encode()[:31], hashlib.sha256(project_name.encode()).digest(),
        0, 0, 16, b"", b"",
    )


def build_image(segments: list[Segment], *, chip_id: int, entry: int,
                flash_mode: str = "dio", flash_size: str = "4MB",
                flash_freq: str = "40m", hash_appended: bool = True) -> bytes:
    """Assemble an ESP image that `esptool image-info` and the ROM accept."""
    out = bytearray(struct.pack(
        "<BBBBI", IMAGE_MAGIC, len(segments), FLASH_MODES[flash_mode],
        (FLASH_SIZES[flash_size] << 4) | FLASH_FREQS[flash_freq], entry,
    ))
    out += struct.pack(EXT_HEADER_FMT, 0xEE, 0, 0, 0, chip_id, 0, 0, 0xFFFF,
                       b"\0" * 4, 1 if hash_appended else 0)
    checksum = CHECKSUM_SEED
    for seg in segments:
        data = seg.data + b"\0" * (-len(seg.data) % 4)
        out += struct.pack("<II", seg.load_addr, len(data)) + data
        checksum = _xor(data, checksum)
    out += b"\0" * (15 - len(out) % 16)
    out.append(checksum)
    if hash_appended:
        out += hashlib.sha256(out).digest()
    return bytes(out)


# -- partition tables ---------------------------------------------------------------

PARTITION_TYPES = {"app": 0x00, "data": 0x01}
PARTITION_SUBTYPES = {
    "app": {"factory": 0x00, "ota_0": 0x10, "ota_1": 0x11, "test": 0x20},
    "data": {"ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03,
             "nvs_keys": 0x04, "spiffs": 0x82, "fat": 0x81},
}


@dataclass(frozen=True)
class Partition:
    name: str
    type: int
    subtype: int
    offset: int
    size: int
    flags: int = 0

    @property
    def type_name(self) -> str:
        return {0: "app", 1: "data"}.get(self.type, f"0x{self.type:02x}")

    @property
    def subtype_name(self) -> str:
        names = {v: k for k, v in PARTITION_SUBTYPES.get(self.type_name, {}).items()}
        return names.get(self.subtype, f"0x{self.subtype:02x}")


def parse_partition_table(data: bytes) -> list[Partition]:
    """Parse a partition table as the bootloader does; raise ImageError if bad."""
    parts: list[Partition] = []
    for pos in range(0, min(len(data), PARTITION_TABLE_SIZE), 32):
        entry = data[pos : pos + 32]
        if entry[:2] == PARTITION_MAGIC:
            _, ptype, sub, off, size, name, flags = struct.unpack("<2sBBII16sI", entry)
            parts.append(Partition(_cstr(name), ptype, sub, off, size, flags))
        elif entry[:2] == PARTITION_MD5_MAGIC:
            if hashlib.md5(data[:pos]).digest() != entry[16:32]:
                raise ImageError("Partition table MD5 mismatch")
        elif entry == b"\xff" * 32 and pos:  # flash_partitions.c: the first record cannot be the end
            break
        else:  # esp_partition_table_verify prints the record's 16-bit magic
            raise ImageError(f"partition {pos // 32} invalid magic number 0x{struct.unpack('<H', entry[:2])[0]:x}")
    if not parts:
        raise ImageError("Failed to verify partition table")
    return parts


def bootloader_facts(partition_table_offset: int) -> bytes:
    """The build fact a generated bootloader carries: where it was compiled to read its partition table."""
    return BOOTLOADER_FACTS_MARK + json.dumps({"CONFIG_PARTITION_TABLE_OFFSET": hex(partition_table_offset)}).encode() \
        + b"\0"


def declared_table_offset(segment: bytes) -> int | None:
    """Where a generated bootloader says it reads its partition table (its first segment's build fact); None: unsaid.

    A real ESP-IDF bootloader has CONFIG_PARTITION_TABLE_OFFSET compiled into its code, where
    nothing outside it can read it; a generated one (flashing/firmware.py) declares a moved
    table with `bootloader_facts`, and says nothing when it uses the default, 0x8000.
    """
    pos = segment.find(BOOTLOADER_FACTS_MARK)
    if pos < 0:
        return None
    end = segment.find(b"\0", pos)
    try:
        facts = json.loads(segment[pos + len(BOOTLOADER_FACTS_MARK):end if end > 0 else None])
        return int(facts["CONFIG_PARTITION_TABLE_OFFSET"], 16)
    except (ValueError, KeyError, TypeError):
        return None


def build_partition_table(parts: list[Partition]) -> bytes:
    out = bytearray()
    for p in parts:
        out += struct.pack("<2sBBII16sI", PARTITION_MAGIC, p.type, p.subtype, p.offset,
                           p.size, p.name.encode()[:15], p.flags)
    out += PARTITION_MD5_MAGIC + b"\xff" * 14 + hashlib.md5(out).digest()
    out += b"\xff" * (PARTITION_TABLE_SIZE - len(out))
    return bytes(out)


def partition_usage(p: Partition) -> str:
    """The "Usage" column of the bootloader's partition table print (bootloader_utility.c)."""
    if p.type == 0:
        if p.subtype in (0x00, 0x20):
            return "factory app" if p.subtype == 0x00 else "test app"
        return "OTA app" if p.subtype & 0xF0 == 0x10 else "Unknown app"
    if p.type == 1:
        return {0x00: "OTA data", 0x01: "RF data", 0x02: "WiFi data", 0x04: "NVS keys",
                0x05: "efuse"}.get(p.subtype, "Unknown data")
    return "unknown"


# -- otadata: which app the bootloader starts ------------------------------------------

SECTOR = 0x1000
OTADATA_SIZE = 2 * SECTOR  # two sectors, one esp_ota_select_entry_t at the start of each
OTA_SELECT_FMT = "<I20sII"  # ota_seq, seq_label[20], ota_state, crc
FACTORY_INDEX, TEST_APP_INDEX = -1, -2
OTA_IMG_NEW, OTA_IMG_PENDING_VERIFY, OTA_IMG_VALID, OTA_IMG_INVALID, OTA_IMG_ABORTED = 0, 1, 2, 3, 4
OTA_IMG_UNDEFINED = 0xFFFFFFFF


def ota_select_crc(seq: int) -> int:
    """bootloader_common_ota_select_crc: the ROM's crc32_le(UINT32_MAX, &ota_seq, 4)."""
    return zlib.crc32(struct.pack("<I", seq), 0xFFFFFFFF)


def ota_select_entry(seq: int, state: int = OTA_IMG_VALID) -> bytes:
    """One esp_ota_select_entry_t (32 bytes) as esp_ota_set_boot_partition writes it."""
    return struct.pack(OTA_SELECT_FMT, seq, b"\xff" * 20, state, ota_select_crc(seq))


def build_otadata(seq: int, state: int = OTA_IMG_VALID) -> bytes:
    """An otadata partition selecting OTA slot (seq - 1) % slots: the entry in sector 0, sector 1 erased."""
    return ota_select_entry(seq, state).ljust(SECTOR, b"\xff") + b"\xff" * SECTOR


@dataclass(frozen=True)
class OtaEntry:
    seq: int
    state: int
    crc: int

    @property
    def invalid(self) -> bool:
        """bootloader_common_ota_select_invalid: blank, or marked invalid or aborted."""
        return self.seq == 0xFFFFFFFF or self.state in (OTA_IMG_INVALID, OTA_IMG_ABORTED)

    @property
    def valid(self) -> bool:
        return not self.invalid and self.crc == ota_select_crc(self.seq)

    @property
    def initial(self) -> bool:
        """Blank or with a wrong CRC: what a fresh ota_data_initial.bin leaves."""
        return self.seq == 0xFFFFFFFF or self.crc != ota_select_crc(self.seq)


def parse_otadata(data: bytes) -> tuple[OtaEntry, OtaEntry]:
    """The two entries of an otadata partition (its first two sectors)."""
    size = struct.calcsize(OTA_SELECT_FMT)
    entries = []
    for sector in (0, 1):
        seq, _, state, crc = struct.unpack(OTA_SELECT_FMT, data[sector * SECTOR:sector * SECTOR + size])
        entries.append(OtaEntry(seq, state, crc))
    return entries[0], entries[1]


@dataclass(frozen=True)
class BootSelection:
    """The bootloader's choice before it loads anything: an index (FACTORY_INDEX or an OTA slot) and its words."""

    index: int | None  # None: the otadata partition itself is unusable; the bootloader resets
    info: str | None = None  # what it logs at I level
    error: str | None = None  # what it logs at E level
    initial: bool = False  # no factory, otadata blank: ota_0 is tried and otadata[0] set to it


def ota_slots(parts: list[Partition]) -> dict[int, Partition]:
    """OTA app partitions by slot number (ota_0 = 0, ota_1 = 1, ...)."""
    return {p.subtype & 0x0F: p for p in parts if p.type == 0 and p.subtype & 0xF0 == 0x10}


def select_boot(parts: list[Partition], otadata: bytes | None) -> BootSelection:
    """bootloader_utility_get_selected_boot_partition, without rollback or anti-rollback (IDF's defaults).

    `otadata`: the otadata partition's bytes, None when the table has no otadata partition.
    """
    ota_info = next((p for p in parts if p.type == 1 and p.subtype == 0x00), None)
    if ota_info is None or otadata is None:
        return BootSelection(FACTORY_INDEX)
    if ota_info.size < OTADATA_SIZE:
        return BootSelection(None, error=f"ota_info partition size {ota_info.size} is too small "
                                         f"(minimum {OTADATA_SIZE} bytes)")
    first, second = parse_otadata(otadata)
    app_count = len(ota_slots(parts))
    has_factory = any(p.type == 0 and p.subtype == 0x00 for p in parts)
    if (first.invalid and second.invalid) or app_count == 0:
        if has_factory:
            return BootSelection(FACTORY_INDEX, info="Defaulting to factory image")
        return BootSelection(0, info="No factory image, trying OTA 0", initial=first.initial and second.initial)
    valid = [e for e in (first, second) if e.valid]
    if valid:
        active = max(valid, key=lambda e: e.seq)  # both valid: the higher sequence number (the later update)
        return BootSelection((active.seq - 1) % app_count)
    if has_factory:
        return BootSelection(FACTORY_INDEX, error="ota data partition invalid, falling back to factory")
    return BootSelection(FACTORY_INDEX, error="ota data partition invalid and no factory, will try all partitions")


def boot_order(parts: list[Partition], index: int) -> list[tuple[int, Partition]]:
    """The partitions bootloader_utility_load_boot_image tries: from `index` back to factory, then the later slots."""
    slots = ota_slots(parts)
    app_count = len(slots)
    factory = next((p for p in parts if p.type == 0 and p.subtype == 0x00), None)

    def at(i: int) -> Partition | None:
        if i == FACTORY_INDEX:
            return factory
        return slots.get(i) if 0 <= i < app_count else None

    order = [(i, at(i)) for i in range(index, FACTORY_INDEX - 1, -1)]
    order += [(i, at(i)) for i in range(index + 1, app_count)]
    order.append((TEST_APP_INDEX, next((p for p in parts if p.type == 0 and p.subtype == 0x20), None)))
    return [(i, p) for i, p in order if p is not None and p.size]


def boot_partition(parts: list[Partition], otadata: bytes | None = None) -> Partition | None:
    """The app the bootloader tries first: as otadata selects it; without otadata, factory, else ota_0."""
    choice = select_boot(parts, otadata)
    order = boot_order(parts, choice.index) if choice.index is not None else []
    return order[0][1] if order else None
