"""The serial bootloader of the virtual device: ROM commands and the flasher stub.

One `Loader` per stay in download mode. It takes decoded SLIP frames and answers
them as the chip's ROM would, until esptool uploads its flasher stub; from the
recognised stub on it answers in the stub dialect (2-byte status, compressed
writes, READ_FLASH, erase commands). Opcodes and status formats follow esptool's
loader.py; the installed esptool is the reference.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from .crypt import FlashCipher
from .nor import SECTOR

if TYPE_CHECKING:
    from .device import VirtualDevice

# opcodes
FLASH_BEGIN, FLASH_DATA, FLASH_END = 0x02, 0x03, 0x04
MEM_BEGIN, MEM_END, MEM_DATA = 0x05, 0x06, 0x07
SYNC, WRITE_REG, READ_REG = 0x08, 0x09, 0x0A
SPI_SET_PARAMS, SPI_ATTACH, READ_FLASH_SLOW, CHANGE_BAUDRATE = 0x0B, 0x0D, 0x0E, 0x0F
FLASH_DEFL_BEGIN, FLASH_DEFL_DATA, FLASH_DEFL_END = 0x10, 0x11, 0x12
SPI_FLASH_MD5, GET_SECURITY_INFO = 0x13, 0x14
ERASE_FLASH, ERASE_REGION, READ_FLASH, RUN_USER_CODE = 0xD0, 0xD1, 0xD2, 0xD3

SYNC_DATA = b"\x07\x07\x12\x20" + b"\x55" * 32
ROM_SYNC_VALUE = 0x20120707

# ESP32-S3 ROM: rom_spiflash_legacy_funcs.read, the pointer esptool aims at its stub when secure
# boot keeps the ROM from running uploaded code (esptool loader.run_stub, "secure_boot_workflow")
S3_ROM_READ_FUNC_PTR = 0x3FCEF688

# ROM error codes (second status byte)
ROM_INVALID_MSG, ROM_FAILED, ROM_BAD_CRC = 0x05, 0x06, 0x07
ROM_FLASH_WRITE_ERR, ROM_FLASH_READ_ERR, ROM_READ_LEN_ERR, ROM_DEFLATE_ERR = 0x08, 0x09, 0x0A, 0x0B

# stub error codes (big-endian 16-bit)
STUB_BAD_DATA_LEN, STUB_BAD_CHECKSUM, STUB_BAD_BLOCKSIZE = 0xC000, 0xC100, 0xC200
STUB_INVALID_COMMAND, STUB_SPI_FAILED, STUB_NOT_IN_FLASH_MODE = 0xC300, 0xC400, 0xC600
STUB_INFLATE_ERROR, STUB_NOT_ENOUGH_DATA, STUB_TOO_MUCH_DATA = 0xC700, 0xC800, 0xC900
STUB_NOT_IMPLEMENTED = 0xFF00

# commands a ROM in Secure Download Mode still accepts
SDM_ALLOWED = {SYNC, FLASH_BEGIN, FLASH_DATA, FLASH_END, SPI_SET_PARAMS, SPI_ATTACH,
               CHANGE_BAUDRATE, GET_SECURITY_INFO}
ROM_OPCODES = {FLASH_BEGIN, FLASH_DATA, FLASH_END, MEM_BEGIN, MEM_END, MEM_DATA, SYNC,
               WRITE_REG, READ_REG, SPI_SET_PARAMS, SPI_ATTACH, READ_FLASH_SLOW,
               CHANGE_BAUDRATE, FLASH_DEFL_BEGIN, FLASH_DEFL_DATA, FLASH_DEFL_END,
               SPI_FLASH_MD5, GET_SECURITY_INFO}
STUB_OPCODES = (ROM_OPCODES - {READ_FLASH_SLOW}) | {ERASE_FLASH, ERASE_REGION, READ_FLASH}


class CommandError(Exception):
    """A command the loader refuses; `code` is the ROM error byte or stub status."""

    def __init__(self, rom: int, stub: int):
        super().__init__(f"rom 0x{rom:02x} stub 0x{stub:04x}")
        self.rom = rom
        self.stub = stub


@dataclass(frozen=True)
class KnownStub:
    version: str  # esptool's stub set: "1" legacy, "2" esp-flasher-stub
    entry: int
    text_start: int
    text_digest: bytes


@lru_cache(maxsize=None)
def known_stubs(chip_key: str) -> tuple[KnownStub, ...]:
    """The flasher stubs the installed esptool can upload for this chip."""
    import esptool.loader

    base = os.path.join(os.path.dirname(esptool.loader.__file__), "targets", "stub_flasher")
    stubs = []
    for version in ("1", "2"):
        path = os.path.join(base, version, f"{chip_key}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            js = json.load(f)
        text = base64.b64decode(js["text"])
        stubs.append(KnownStub(version, js["entry"], js["text_start"],
                               hashlib.sha256(text).digest()))
    return tuple(stubs)


@dataclass
class _Write:
    offset: int
    size: int  # bytes announced (decompressed for DEFL)
    blocks: int
    block_size: int
    compressed: bool
    next_seq: int = 0
    written: int = 0
    erased_to: int = 0  # stub erases as it goes
    inflater: "zlib._Decompress | None" = None
    cipher: FlashCipher | None = None  # FLASH_BEGIN's encrypt flag: the engine encrypts on the way in
    pending: bytes = b""  # plaintext short of a whole 16-byte block, waiting for the rest


@dataclass
class _Read:
    offset: int
    remaining: int
    block: int
    window: int
    sent: int = 0
    acked: int = 0
    md5: "hashlib._Hash | None" = None


class Loader:
    def __init__(self, device: "VirtualDevice"):
        self.dev = device
        self.chip = device.chip
        self.stub: KnownStub | None = None
        self.param_size = 2 * 1024 * 1024  # ROM default until SPI_SET_PARAMS
        self.write: _Write | None = None
        self.read: _Read | None = None
        self.ram: dict[int, bytearray] = {}
        self.mem_seg: tuple[int, int, int] | None = None  # addr, size, expected seq
        self.mem_seq = 0

    @property
    def in_stub(self) -> bool:
        return self.stub is not None

    # -- replies --------------------------------------------------------------------
    def reply(self, op: int, value: int = 0, data: bytes = b"") -> None:
        status = b"\x00\x00" if self.in_stub else b"\x00\x00\x00\x00"
        body = data + status
        self.dev.send_frame(struct.pack("<BBHI", 1, op, len(body), value) + body)

    def fail(self, op: int, err: CommandError) -> None:
        if self.in_stub:
            body = struct.pack(">H", err.stub)
        else:
            body = bytes([1, err.rom, 0, 0])
        self.dev.send_frame(struct.pack("<BBHI", 1, op, len(body), 0) + body)

    # -- dispatch -------------------------------------------------------------------
    def handle(self, frame: bytes) -> None:
        if self.read is not None:
            self._read_ack(frame)
            return
        if len(frame) < 8 or frame[0] != 0:
            return  # not a request: a real loader ignores it
        _, op, length, chk = struct.unpack("<BBHI", frame[:8])
        data = frame[8:]
        if len(data) != length:
            self.fail(op, CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN))
            return
        supported = STUB_OPCODES if self.in_stub else ROM_OPCODES
        if op == GET_SECURITY_INFO and not self.chip.rom_has_security_info:
            supported = set()
        if op not in supported or (self.dev.secure_download
                                   and not self.in_stub and op not in SDM_ALLOWED):
            self.fail(op, CommandError(ROM_INVALID_MSG, STUB_NOT_IMPLEMENTED))
            return
        if self.in_stub and op not in (FLASH_DATA, FLASH_DEFL_DATA):
            self.dev.flash_drain()  # the stub handles one command at a time
        handler = self._handlers[op]
        try:
            handler(self, op, data, chk)
        except CommandError as err:
            self.fail(op, err)
        except (struct.error, ValueError):
            self.fail(op, CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN))

    # -- session commands -----------------------------------------------------------
    def _sync(self, op, data, chk):
        if data != SYNC_DATA:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
        value = 0 if self.in_stub else ROM_SYNC_VALUE
        for _ in range(8):
            self.reply(op, value)

    def _read_reg(self, op, data, chk):
        (addr,) = struct.unpack("<I", data)
        self.reply(op, self.dev.read_register(addr))

    def _write_reg(self, op, data, chk):
        if len(data) % 16:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
        for i in range(0, len(data), 16):
            addr, value, mask, _delay = struct.unpack("<IIII", data[i : i + 16])
            self.dev.write_register(addr, value, mask)
        self.reply(op)

    def _security_info(self, op, data, chk):
        efuse = self.dev.efuse
        flags = efuse.security_flags() | (0x4 if self.dev.faults.secure_download else 0)
        purposes = (efuse.key_purposes() + [0] * 7)[:7]
        payload = struct.pack("<IBBBBBBBBII", flags, efuse.crypt_cnt, *purposes,
                              self.chip.image_chip_id, 1)
        self.reply(op, 0, payload)

    def _spi_set_params(self, op, data, chk):
        _id, total, _block, _sector, _page, _mask = struct.unpack("<IIIIII", data)
        self.param_size = total
        self.reply(op)

    def _spi_attach(self, op, data, chk):
        if len(data) not in (4, 8):
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
        self.dev.flash_attached = True
        self.reply(op)

    def _change_baud(self, op, data, chk):
        new, _old = struct.unpack("<II", data)
        if not self.in_stub and self.chip.key == "esp32":
            # ESP32 ROM scales by its RTC-calibrated clock; esptool pre-compensates
            new = int(new * self.dev.rom_crystal_hz() / 40_000_000)
        self.reply(op)
        self.dev.set_baud(new)

    # -- RAM download and the stub ----------------------------------------------------
    def _mem_begin(self, op, data, chk):
        size, blocks, block_size, addr = struct.unpack("<IIII", data)
        self.mem_seg = (addr, size, blocks)
        self.mem_seq = 0
        self.ram[addr] = bytearray()
        self.reply(op)

    def _mem_data(self, op, data, chk):
        length, seq, _, _ = struct.unpack("<IIII", data[:16])
        payload = data[16:]
        if self.mem_seg is None or len(payload) != length:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
        if _checksum(payload) != chk & 0xFF:
            raise CommandError(ROM_BAD_CRC, STUB_BAD_CHECKSUM)
        if seq != self.mem_seq:
            raise CommandError(ROM_FAILED, STUB_BAD_DATA_LEN)
        self.ram[self.mem_seg[0]] += payload
        self.mem_seq += 1
        self.reply(op)

    def _mem_end(self, op, data, chk):
        flag, entry = struct.unpack("<II", data)
        self.reply(op)
        if flag != 0:
            return  # upload finished without jumping
        stub = self._recognise_stub(entry)
        self.ram.clear()
        if stub is None:
            self.dev.run_unknown_ram_code(entry)
            return
        self._start_stub(stub)

    def _start_stub(self, stub: KnownStub) -> None:
        self.stub = stub
        self.write = None
        self.dev.flash_attached = True  # the stub attaches the flash as it starts
        self.dev.send_frame(b"OHAI")

    def _recognise_stub(self, entry: int) -> KnownStub | None:
        for stub in known_stubs(self.chip.key):
            text = self.ram.get(stub.text_start)
            if entry == stub.entry and text is not None \
                    and hashlib.sha256(bytes(text)).digest() == stub.text_digest:
                return stub
        return None

    # -- flash writes -----------------------------------------------------------------
    def _check_flash(self) -> None:
        if self.dev.faults.flash_dead:
            raise CommandError(ROM_FLASH_WRITE_ERR, STUB_SPI_FAILED)

    def _begin(self, op, data, chk, compressed: bool):
        self._check_flash()
        if len(data) not in (16, 20):
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
        if not self.in_stub and len(data) != (16 if self.chip.key == "esp32" else 20):
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
        size, blocks, block_size, offset = struct.unpack("<IIII", data[:16])
        encrypt = len(data) == 20 and struct.unpack("<I", data[16:])[0] != 0
        cipher = self._encryption_engine(offset) if encrypt else None
        flash = self.dev.flash
        limit = flash.size if self.in_stub else min(flash.size, self.param_size)
        if offset + size > limit:
            raise CommandError(ROM_FAILED, STUB_BAD_DATA_LEN)
        w = _Write(offset, size, blocks, block_size, compressed, cipher=cipher)
        if compressed:
            w.inflater = zlib.decompressobj()
        if not self.in_stub:
            # the ROM erases the whole region up front
            start = offset - offset % SECTOR
            end = offset + size
            end += -end % SECTOR
            if end > start:
                self.dev.flash_busy(flash.erase(start, end - start), pipelined=False)
            w.erased_to = end
        else:
            w.erased_to = offset - offset % SECTOR  # the stub erases as data arrives
        self.write = w if size or blocks else None
        self.reply(op)

    def _encryption_engine(self, offset: int) -> FlashCipher:
        """The engine for an encrypted write, or the refusal a chip gives.

        DIS_DOWNLOAD_MANUAL_ENCRYPT (release mode) takes the engine away from the download
        mode, and with no key burned there is nothing to encrypt with: either way the
        write fails rather than store plaintext where ciphertext was asked for.
        """
        cipher = self.dev.flash_cipher()
        if self.dev.efuse.manual_encrypt_disabled or cipher is None or offset % 16:
            raise CommandError(ROM_FAILED, STUB_SPI_FAILED)
        return cipher

    def _flash_begin(self, op, data, chk):
        self._begin(op, data, chk, compressed=False)

    def _defl_begin(self, op, data, chk):
        self._begin(op, data, chk, compressed=True)

    def _flash_data(self, op, data, chk):
        self._data(op, data, chk, compressed=False)

    def _defl_data(self, op, data, chk):
        self._data(op, data, chk, compressed=True)

    def _data(self, op, data, chk, compressed: bool):
        w = self.write
        if w is None or w.compressed != compressed:
            raise CommandError(ROM_FAILED, STUB_NOT_IN_FLASH_MODE)
        length, seq, _, _ = struct.unpack("<IIII", data[:16])
        payload = data[16:]
        if len(payload) != length:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
        if _checksum(payload) != chk & 0xFF:
            raise CommandError(ROM_BAD_CRC, STUB_BAD_CHECKSUM)
        if seq != w.next_seq:
            # a retried block after a lost reply: the loader already holds it
            if seq == w.next_seq - 1:
                self.reply(op)
                return
            raise CommandError(ROM_FAILED, STUB_BAD_DATA_LEN)
        if compressed:
            try:
                out = w.inflater.decompress(payload)
            except zlib.error:
                raise CommandError(ROM_DEFLATE_ERR, STUB_INFLATE_ERROR) from None
        else:
            if not self.in_stub and length != w.block_size:
                raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
            out = payload
        room = max(0, w.size - w.written - len(w.pending))
        if len(out) > room:
            if compressed and self.in_stub:
                raise CommandError(ROM_FAILED, STUB_TOO_MUCH_DATA)
            out = out[:room]  # the 0xFF padding of a last block is not programmed
        w.next_seq += 1
        self._program(w, out)
        self.reply(op)

    def _program(self, w: _Write, out: bytes) -> None:
        addr = w.offset + w.written
        if w.cipher is not None:
            out = self._encrypt(w, addr, out)
        if not out:
            return
        flash = self.dev.flash
        end = addr + len(out)
        if end > flash.size:
            raise CommandError(ROM_FLASH_WRITE_ERR, STUB_SPI_FAILED)
        cost = 0.0
        if self.in_stub and end > w.erased_to:
            # the stub erases ahead of the write pointer: a 64 KB block where it can
            start = w.erased_to
            stop = end + (-end % SECTOR)
            if start % 0x10000 == 0 and stop - start < 0x10000 \
                    and start + 0x10000 <= w.offset + w.size + (-(w.offset + w.size) % SECTOR):
                stop = start + 0x10000
            cost += flash.erase(start, stop - start)
            w.erased_to = stop
        cost += flash.program(addr, out)
        w.written += len(out)
        self.dev.flash_busy(cost, pipelined=self.in_stub)

    @staticmethod
    def _encrypt(w: _Write, addr: int, out: bytes) -> bytes:
        """Ciphertext for the whole 16-byte blocks received so far; the rest waits for its block."""
        data = w.pending + out
        complete = w.written + len(data) >= w.size
        keep = 0 if complete else len(data) % 16
        w.pending = data[len(data) - keep:] if keep else b""
        return w.cipher.encrypt(addr, data[:len(data) - keep])

    def _end(self, op, data, chk):
        (flag,) = struct.unpack("<I", data)
        w = self.write
        if self.in_stub:
            if w is not None and w.written < w.size:
                raise CommandError(ROM_FAILED, STUB_NOT_ENOUGH_DATA)
            self.dev.flash_drain()
            self.write = None
            self.reply(op)
            if flag == 0:
                self.dev.soft_reset_to_rom()
            return
        self.write = None
        self.reply(op)
        # ROM: leaving the loader; flag 0 reboots, 1 runs user code. Both start the app.
        self.dev.leave_loader()

    # -- flash reads and checks -------------------------------------------------------
    def _md5(self, op, data, chk):
        addr, size, _, _ = struct.unpack("<IIII", data)
        if self.dev.faults.flash_dead:
            raise CommandError(ROM_FLASH_READ_ERR, STUB_SPI_FAILED)
        if addr + size > self.dev.flash.size:
            raise CommandError(ROM_READ_LEN_ERR, STUB_BAD_DATA_LEN)
        self.dev.flash_drain()
        digest = hashlib.md5(self.dev.flash.read(addr, size))
        self.dev.flash_busy(size / 20e6, pipelined=False)  # SPI read at 20 MB/s (80 MHz QIO)
        self.reply(op, 0, digest.digest() if self.in_stub else digest.hexdigest().encode())

    def _read_slow(self, op, data, chk):
        offset, length = struct.unpack("<II", data)
        hijacked = self.dev.regs.get(S3_ROM_READ_FUNC_PTR) if self.chip.key == "esp32s3" else None
        stub = self._recognise_stub(hijacked) if hijacked else None
        if stub is not None:
            self.ram.clear()
            self._start_stub(stub)  # the ROM's read went through the pointer into the stub
            return
        if self.dev.faults.flash_dead:
            raise CommandError(ROM_FLASH_READ_ERR, STUB_SPI_FAILED)
        if length > 64 or offset + length > min(self.dev.flash.size, self.param_size):
            raise CommandError(ROM_READ_LEN_ERR, STUB_BAD_DATA_LEN)
        chunk = self.dev.flash.read(offset, length)
        self.reply(op, 0, chunk + b"\xff" * (64 - length))

    def _read_flash(self, op, data, chk):
        offset, length, block, window = struct.unpack("<IIII", data)
        if self.dev.faults.flash_dead:
            raise CommandError(ROM_FLASH_READ_ERR, STUB_SPI_FAILED)
        if offset + length > self.dev.flash.size or block == 0:
            raise CommandError(ROM_READ_LEN_ERR, STUB_BAD_DATA_LEN)
        self.dev.flash_drain()
        self.reply(op)
        window = 1 if self.stub.version == "2" else max(1, window)
        self.read = _Read(offset, length, block, window, md5=hashlib.md5())
        self._read_pump()

    def _read_pump(self) -> None:
        r = self.read
        while r.remaining > 0 and r.sent - r.acked < r.window:
            n = min(r.block, r.remaining)
            chunk = self.dev.flash.read(r.offset, n)
            r.md5.update(chunk)
            r.offset += n
            r.remaining -= n
            r.sent += 1
            self.dev.send_frame(chunk)
        if r.remaining == 0 and r.acked == r.sent:
            self.read = None
            self.dev.send_frame(r.md5.digest())

    def _read_ack(self, frame: bytes) -> None:
        if len(frame) != 4:
            return
        self.read.acked += 1
        self._read_pump()

    def _erase_flash(self, op, data, chk):
        self._check_flash()
        self.dev.flash_busy(self.dev.flash.erase_all(), pipelined=False)
        self.dev.flash_drain()
        self.reply(op)

    def _erase_region(self, op, data, chk):
        self._check_flash()
        offset, size = struct.unpack("<II", data)
        if offset % SECTOR or size % SECTOR or offset + size > self.dev.flash.size:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
        self.dev.flash_busy(self.dev.flash.erase(offset, size), pipelined=False)
        self.dev.flash_drain()
        self.reply(op)

    _handlers = {
        SYNC: _sync, READ_REG: _read_reg, WRITE_REG: _write_reg,
        GET_SECURITY_INFO: _security_info, SPI_SET_PARAMS: _spi_set_params,
        SPI_ATTACH: _spi_attach, CHANGE_BAUDRATE: _change_baud,
        MEM_BEGIN: _mem_begin, MEM_DATA: _mem_data, MEM_END: _mem_end,
        FLASH_BEGIN: _flash_begin, FLASH_DATA: _flash_data, FLASH_END: _end,
        FLASH_DEFL_BEGIN: _defl_begin, FLASH_DEFL_DATA: _defl_data, FLASH_DEFL_END: _end,
        SPI_FLASH_MD5: _md5, READ_FLASH_SLOW: _read_slow, READ_FLASH: _read_flash,
        ERASE_FLASH: _erase_flash, ERASE_REGION: _erase_region,
    }


def _checksum(data: bytes) -> int:
    from ..images import _xor

    return _xor(data, 0xEF)
