"""What the timing model predicts for a write, computed from first principles.

The model (on with `realtime=True` / `station virtual --realtime`): every byte
takes 10 bit times on the wire at the sender's baud rate, each direction on its
own; the flash takes the typical latencies in `nor` (W25Q32JV). The ROM erases a
region up front and programs each block before it answers; the stub answers a
block once the previous one is in flash, so programming overlaps the next
transfer. `predict_write` walks esptool's command sequence for one region written
through the stub and returns the seconds the model says it takes; the benchmark
compares that with what the real esptool measures against the virtual board.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from .nor import BLOCK, SECTOR, erase_time, program_time

STUB_BLOCK = 0x4000
MD5_READ_BPS = 20e6  # SPI read during SPI_FLASH_MD5: 80 MHz QIO


def slip_len(payload: bytes) -> int:
    return len(payload) + payload.count(b"\xc0") + payload.count(b"\xdb") + 2


@dataclass(frozen=True)
class Prediction:
    seconds: float
    wire_down: float  # host -> device bytes on the wire, seconds
    wire_up: float
    flash_exposed: float  # flash time not hidden behind the wire
    blocks: int
    compressed: bool


def predict_write(data: bytes, baud: int, offset: int = 0x10000) -> Prediction:
    """Seconds from FLASH_(DEFL_)BEGIN to the verified MD5 for one region via the stub."""
    packed = zlib.compress(data, 9)
    compressed = len(packed) < len(data)  # esptool sends raw data when it cannot shrink it
    stream = packed if compressed else data
    bit = 10 / baud
    reply = 12 * bit  # 8-byte header + 2 status bytes + two delimiters
    t = 0.0
    down = up = 0.0

    def command(n_payload: int) -> None:
        nonlocal t, down, up
        d = (n_payload + 8 + 2) * bit
        t += d + reply
        down += d
        up += reply

    command(24)  # SPI_SET_PARAMS
    command(20)  # FLASH_(DEFL_)BEGIN
    busy_until = 0.0
    erased_to = offset - offset % SECTOR
    written = 0
    region_end = offset + len(data)
    region_end += -region_end % SECTOR
    blocks = (len(stream) + STUB_BLOCK - 1) // STUB_BLOCK
    exposed = 0.0
    inflater = zlib.decompressobj() if compressed else None
    for i in range(blocks):
        chunk = stream[i * STUB_BLOCK : (i + 1) * STUB_BLOCK]
        wire = slip_len(b"\0" * 24 + chunk) * bit
        arrive = t + wire
        down += wire
        out = inflater.decompress(chunk) if inflater else chunk[: len(data) - written]
        cost = 0.0
        addr = offset + written
        end = addr + len(out)
        if out and end > erased_to:
            stop = end + (-end % SECTOR)
            if erased_to % BLOCK == 0 and stop - erased_to < BLOCK and erased_to + BLOCK <= region_end:
                stop = erased_to + BLOCK
            cost += erase_time(erased_to, stop - erased_to)
            erased_to = stop
        cost += program_time(addr, len(out))
        written += len(out)
        start = max(arrive, busy_until)
        exposed += start - arrive
        busy_until = start + cost
        t = start + reply
        up += reply
    # esptool's closing read (READ_REG) waits for the last block in flash, then MD5
    command(4)
    exposed += max(0.0, busy_until - t)
    t = max(t, busy_until)
    t += len(data) / MD5_READ_BPS
    command(16)
    up += 16 * bit
    t += 16 * bit
    return Prediction(t, down, up, exposed, blocks, compressed)
