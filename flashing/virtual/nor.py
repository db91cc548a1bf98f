"""The virtual board's SPI NOR flash: erase sets 0xFF, program ANDs bits.

The array lives in memory or, with a state file, in a shared memory map of that
file, so another process reading the file sees every completed write at once.
Timing figures are the typical values of a Winbond W25Q32JV (datasheet, AC
electrical characteristics): page program 0.4 ms per 256 bytes, sector erase
(4 KB) 45 ms, block erase (64 KB) 150 ms, chip erase 10 s for 4 MB (scaled by size).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

SECTOR = 0x1000
BLOCK = 0x10000
PAGE = 0x100

PAGE_PROGRAM_S = 0.0004
SECTOR_ERASE_S = 0.045
BLOCK_ERASE_S = 0.150
CHIP_ERASE_S_PER_4MB = 10.0


@dataclass(frozen=True)
class FlashPart:
    """A JEDEC-identified NOR part: what RDID and SFDP report."""

    manufacturer: int
    memory_type: int
    capacity_code: int
    name: str

    @property
    def size(self) -> int:
        return 1 << self.capacity_code

    @property
    def rdid(self) -> int:
        """The 24-bit RDID answer as the SPI W0 register holds it."""
        return self.manufacturer | (self.memory_type << 8) | (self.capacity_code << 16)


PARTS = {
    2 * 1024 * 1024: FlashPart(0xEF, 0x40, 0x15, "W25Q16JV"),
    4 * 1024 * 1024: FlashPart(0xEF, 0x40, 0x16, "W25Q32JV"),
    8 * 1024 * 1024: FlashPart(0xEF, 0x40, 0x17, "W25Q64JV"),
    16 * 1024 * 1024: FlashPart(0xEF, 0x40, 0x18, "W25Q128JV"),
}


def part_for_size(size: int) -> FlashPart:
    try:
        return PARTS[size]
    except KeyError:
        sizes = ", ".join(f"{s // (1024 * 1024)}MB" for s in PARTS)
        raise ValueError(f"flash size {size} is not modelled; choose one of {sizes}") from None


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("B")
    if t.endswith("M"):
        return int(t[:-1]) * 1024 * 1024
    if t.endswith("K"):
        return int(t[:-1]) * 1024
    return int(t, 0)


def sfdp_table(part: FlashPart) -> bytes:
    """A minimal JESD216 SFDP table: header, one parameter header, basic table."""
    table = bytearray(b"\xff" * 0x100)
    table[0:8] = b"SFDP" + bytes([0x06, 0x01, 0x00, 0xFF])  # rev 1.6, 1 header
    table[8:16] = bytes([0x00, 0x06, 0x01, 0x10, 0x80, 0x00, 0x00, 0xFF])  # BFPT @0x80
    density = part.size * 8 - 1
    bfpt = [0xFFF120E5, density, 0x6B08EB44, 0xBB423B08, 0xFFFFFFFE, 0xFF00FFFF,
            0xEB40FFFF, 0x520F200C, 0xFF00D810]
    for i, word in enumerate(bfpt):
        table[0x80 + 4 * i : 0x84 + 4 * i] = word.to_bytes(4, "little")
    return bytes(table)


class NorFlash:
    """A NOR array with erase/program semantics and typical-part latencies."""

    def __init__(self, size: int, path: Path | None = None):
        self.part = part_for_size(size)
        self.size = size
        self.path = path
        self._file = None
        if path is None:
            self.mem: bytearray | mmap.mmap = bytearray(b"\xff" * size)
        else:
            fresh = not path.exists() or path.stat().st_size != size
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if fresh:
                os.ftruncate(fd, 0)
                os.write(fd, b"\xff" * size)
            self._file = fd
            self.mem = mmap.mmap(fd, size)

    def close(self) -> None:
        if isinstance(self.mem, mmap.mmap):
            self.mem.flush()
            self.mem.close()
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def sync(self) -> None:
        """Make the state file current (the map is shared; flush pushes it to disk)."""
        if isinstance(self.mem, mmap.mmap):
            self.mem.flush()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise ValueError("read beyond the end of flash")
        return bytes(self.mem[offset : offset + length])

    def erase(self, offset: int, length: int) -> float:
        """Erase sector-aligned range; returns the modelled duration in seconds."""
        if offset % SECTOR or length % SECTOR or offset + length > self.size:
            raise ValueError("erase range not sector aligned or beyond the end of flash")
        self.mem[offset : offset + length] = b"\xff" * length
        return erase_time(offset, length)

    def erase_all(self) -> float:
        self.mem[0 : self.size] = b"\xff" * self.size
        return CHIP_ERASE_S_PER_4MB * self.size / (4 * 1024 * 1024)

    def program(self, offset: int, data: bytes) -> float:
        """Program bytes: each bit can only go from 1 to 0. Returns modelled seconds."""
        n = len(data)
        if offset < 0 or offset + n > self.size:
            raise ValueError("write beyond the end of flash")
        old = self.mem[offset : offset + n]
        if old.count(0xFF) == n:
            self.mem[offset : offset + n] = data
        else:
            merged = int.from_bytes(old, "little") & int.from_bytes(data, "little")
            self.mem[offset : offset + n] = merged.to_bytes(n, "little")
        return program_time(offset, n)

    def wipe(self) -> None:
        """A new blank board: every byte 0xFF."""
        self.mem[0 : self.size] = b"\xff" * self.size
        self.sync()


def erase_time(offset: int, length: int) -> float:
    """Latency of erasing a range with 64 KB block erases where aligned, else sectors."""
    t = 0.0
    end = offset + length
    while offset < end:
        if offset % BLOCK == 0 and end - offset >= BLOCK:
            t += BLOCK_ERASE_S
            offset += BLOCK
        else:
            t += SECTOR_ERASE_S
            offset += SECTOR
    return t


def program_time(offset: int, length: int) -> float:
    if length <= 0:
        return 0.0
    first = offset // PAGE
    last = (offset + length - 1) // PAGE
    return (last - first + 1) * PAGE_PROGRAM_S
