"""The virtual chip's eFuse array and its controller, as espefuse reads and burns them.

The layout (block addresses, write registers, field positions, protection bits) is
espefuse's own table for the chip (`espefuse/efuse/<chip>/mem_definition.py` and the
yaml field list): the tool that burns real chips is the final word on where bits live.
The array keeps what was burned; the controller's read registers show it as silicon
does: loaded at reset and by the read command, read-protected blocks as zeros, and on
ESP32-C3/S3 each block's Reed-Solomon check reported in the error registers. Burning is
a program command after the 0x5A5A opcode; bits only go from 0 to 1 and write-protected
blocks and fields do not change. The array persists in the board's state dir.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import reedsolo

RS_PARITY = 12  # bytes of Reed-Solomon check value per 32-byte block (ESP32-C3/S3 TRM, eFuse chapter)


@dataclass(frozen=True)
class BlockSpec:
    id: int
    name: str
    rd_addr: int
    wr_addr: int
    words: int  # words the read registers show
    wr_dis_bit: int | None
    rd_dis_bits: tuple[int, ...]
    key_purpose: str | None  # the KEY_PURPOSE_n field naming what this key block is for


@dataclass(frozen=True)
class FieldSpec:
    name: str
    block: int
    word: int
    pos: int
    bits: int
    wr_dis_bit: int | None
    rd_dis_bits: tuple[int, ...]

    @property
    def shift(self) -> int:
        return self.word * 32 + self.pos

    @property
    def mask(self) -> int:
        return ((1 << self.bits) - 1) << self.shift


@dataclass(frozen=True)
class EfuseLayout:
    """One chip's eFuse controller: its register window, blocks, fields and commands."""

    chip: str
    base: int
    size: int
    blocks: tuple[BlockSpec, ...]
    fields: dict[str, FieldSpec]
    conf_reg: int
    cmd_reg: int
    write_opcode: int  # 0x5A5A: what the conf register must hold for a program command
    read_opcode: int  # 0x5AA5: likewise for a read command
    pgm_cmd: int
    read_cmd: int
    rs_coded: bool  # ESP32-C3/S3: BLOCK1.. carry 12 bytes of RS check value
    unit_words: int  # data words one program command writes per block (C3/S3: the 8 PGM_DATA registers)
    block_fail: tuple  # (register, bit or None) per block: RS decode failed
    block_errors: tuple  # (register, mask or None, offset) per block: RS-corrected bytes
    error_regs: tuple[int, ...]

    def block_words(self, blk: BlockSpec) -> int:
        """Data words the array stores for a block (the write window, at least the read window)."""
        return max(blk.words, self.unit_words if blk.id else blk.words)


def _bits(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


@lru_cache(maxsize=None)
def layout(chip: str) -> EfuseLayout:
    """The chip's eFuse layout as espefuse defines it."""
    mem = importlib.import_module(f"espefuse.efuse.{chip}.mem_definition")
    regs = mem.EfuseDefineRegisters
    blocks_def = mem.EfuseDefineBlocks()
    blocks = []
    for row in blocks_def.BLOCKS:
        b = blocks_def.get(row)
        blocks.append(BlockSpec(b.id, b.name, b.rd_addr, b.wr_addr, b.len, b.write_disable_bit,
                                _bits(b.read_disable_bit), b.key_purpose))
    defs = mem.EfuseDefineFields(None)
    fields = {}
    groups = ("EFUSES", "KEYBLOCKS", "KEYBLOCKS_256", "CUSTOM_MAC", "ADC_CALIBRATION",
              "CALIBRATION_EFUSES")
    for group in groups:
        for f in getattr(defs, group, []):
            if f.word is None or f.pos is None:
                continue
            fields[f.name] = FieldSpec(f.name, f.block, f.word, f.pos, f.bit_len,
                                       f.write_disable_bit, _bits(f.read_disable_bit))
    if chip == "esp32":
        return EfuseLayout(chip, regs.DR_REG_EFUSE_BASE, regs.EFUSE_MEM_SIZE, tuple(blocks), fields,
                           regs.EFUSE_REG_CONF, regs.EFUSE_REG_CMD, regs.EFUSE_CONF_WRITE,
                           regs.EFUSE_CONF_READ, regs.EFUSE_CMD_WRITE, regs.EFUSE_CMD_READ,
                           False, 8, (), (), (regs.EFUSE_REG_DEC_STATUS,))
    if hasattr(regs, "BLOCK_ERRORS"):  # ESP32-S3: one table (register, count mask, count offset, fail bit)
        fail = tuple((reg, bit) for reg, _, _, bit in regs.BLOCK_ERRORS)
        counts = tuple((reg, mask, offs) for reg, mask, offs, _ in regs.BLOCK_ERRORS)
    else:  # ESP32-C3: two tables (its fail bits sit one block off, as espefuse notes)
        fail, counts = tuple(regs.BLOCK_FAIL_BIT), tuple(regs.BLOCK_NUM_ERRORS)
    return EfuseLayout(chip, regs.DR_REG_EFUSE_BASE, regs.EFUSE_MEM_SIZE, tuple(blocks), fields,
                       regs.EFUSE_CONF_REG, regs.EFUSE_CMD_REG, regs.EFUSE_WRITE_OP_CODE,
                       regs.EFUSE_READ_OP_CODE, regs.EFUSE_PGM_CMD, regs.EFUSE_READ_CMD,
                       True, 8, fail, counts, tuple(regs.ERRORS))


@lru_cache(maxsize=4096)
def rs_parity(data: bytes) -> bytes:
    """The 12-byte Reed-Solomon check value the controller stores after a 32-byte block."""
    return bytes(reedsolo.RSCodec(RS_PARITY).encode(data)[len(data):])


def rs_decode(data: bytes, parity: bytes) -> tuple[bytes, int, bool]:
    """What the controller reads from a coded block: (data, bytes corrected, failed)."""
    if rs_parity(data) == parity:
        return data, 0, False
    try:
        msg, _, errata = reedsolo.RSCodec(RS_PARITY).decode(data + parity)
    except reedsolo.ReedSolomonError:
        return data, 0, True
    return bytes(msg), len(errata), False


class EfuseArray:
    """The burned bits of one chip and the controller registers that show and burn them."""

    def __init__(self, chip: str, factory: dict[int, dict[int, int]], path: Path | None = None):
        self.layout = layout(chip)
        self.path = path
        self.burned: list[list[int]] = []  # per block: data words, then RS check words
        self.ctrl: dict[int, int] = {}  # write-data, conf, cmd, timing registers
        self.shown: dict[int, int] = {}  # the read registers as last loaded
        self.loaded: list[list[int]] = []  # what the chip's logic acts on: the array as last loaded
        self.programs = 0  # program commands since power-on (a fault can hang the chip at the next)
        if not self._load():
            self.blank(factory)
        self.reload()

    # -- persistence ------------------------------------------------------------------
    def _empty(self) -> list[list[int]]:
        lay = self.layout
        return [[0] * (lay.block_words(b) + (3 if lay.rs_coded and b.id else 0)) for b in lay.blocks]

    def _load(self) -> bool:
        if not (self.path and self.path.exists()):
            return False
        saved = json.loads(self.path.read_text())
        empty = self._empty()
        blocks = saved.get("blocks", [])
        if saved.get("chip") != self.layout.chip or [len(b) for b in blocks] != [len(b) for b in empty]:
            return False
        self.burned = [[int(w, 16) for w in b] for b in blocks]
        return True

    def save(self) -> None:
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"chip": self.layout.chip,
                                   "blocks": [[f"{w:08x}" for w in b] for b in self.burned]}))
        os.replace(tmp, self.path)

    def blank(self, factory: dict[int, dict[int, int]]) -> None:
        """A new chip: nothing burned but what the factory burns (MAC, revision), with its check values."""
        self.burned = self._empty()
        for block, words in factory.items():
            for word, value in words.items():
                self.burned[block][word] |= value
            self._seal(block)
        self.save()
        self.reload()

    def _seal(self, block: int) -> None:
        """The factory programs a coded block in one go: data and its RS check value."""
        if not (self.layout.rs_coded and block):
            return
        n = self.layout.block_words(self.layout.blocks[block])
        data = struct.pack(f"<{n}I", *self.burned[block][:n])
        self.burned[block][n:] = list(struct.unpack("<3I", rs_parity(data)))

    # -- the loaded array (what the chip's logic acts on, read protection or not) -----
    # Like silicon, the chip sees a burn only once the read command (or a reset) loads it:
    # espefuse's own burn sequence relies on this (ENABLE_SECURITY_DOWNLOAD, DIS_DOWNLOAD_MODE).
    def block_int(self, block: int) -> int:
        return sum(w << (32 * i) for i, w in enumerate(self.loaded[block]))

    def block_bytes(self, block: int) -> bytes:
        return struct.pack(f"<{len(self.loaded[block])}I", *self.loaded[block])

    def readable_block_bytes(self, block: int) -> bytes:
        """A block as software reads it through the read registers: zeros once it is read-protected."""
        blk = self.layout.blocks[block]
        return struct.pack(f"<{blk.words}I", *(self.shown[blk.rd_addr + 4 * i] for i in range(blk.words)))

    def burned_field(self, name: str) -> int:
        """A field as the array holds it now, loaded or not."""
        f = self.layout.fields[name]
        n = self.layout.block_words(self.layout.blocks[f.block])
        value = sum(w << (32 * i) for i, w in enumerate(self.burned[f.block][:n]))
        return (value & f.mask) >> f.shift

    def field(self, name: str) -> int:
        f = self.layout.fields[name]
        return (self.block_int(f.block) & f.mask) >> f.shift

    def has_field(self, name: str) -> bool:
        return name in self.layout.fields

    # -- the register window ----------------------------------------------------------
    def owns(self, addr: int) -> bool:
        return self.layout.base <= addr < self.layout.base + self.layout.size

    def read(self, addr: int) -> int:
        if addr in self.shown:
            return self.shown[addr]
        return self.ctrl.get(addr, 0)

    def is_program(self, addr: int, value: int, mask: int = 0xFFFFFFFF) -> bool:
        """Whether this register write starts a program (burn) command."""
        lay = self.layout
        cmd = (self.ctrl.get(addr, 0) & ~mask) | (value & mask)
        return addr == lay.cmd_reg and bool(cmd & lay.pgm_cmd) and self.ctrl.get(lay.conf_reg, 0) == lay.write_opcode

    def write(self, addr: int, value: int, mask: int = 0xFFFFFFFF) -> bool:
        """A register write; a program or read command runs when the command register is written.

        Returns True when a program command burned (and saved) the write registers.
        """
        lay = self.layout
        if addr in self.shown:
            return False  # read registers are read-only
        old = self.ctrl.get(addr, 0)
        self.ctrl[addr] = (old & ~mask) | (value & mask)
        if addr != lay.cmd_reg:
            return False
        cmd = self.ctrl[addr]
        self.ctrl[addr] = 0  # the command completes before the host can poll
        conf = self.ctrl.get(lay.conf_reg, 0)
        if cmd & lay.pgm_cmd and conf == lay.write_opcode:
            self._program(None if lay.chip == "esp32" else (cmd >> 2) & 0xF)
            self.programs += 1
            self.save()
            return True
        if cmd & lay.read_cmd and conf == lay.read_opcode:
            self.reload()
        return False

    def _write_words(self, blk: BlockSpec) -> list[int]:
        lay = self.layout
        if lay.chip == "esp32":
            return [self.ctrl.get(blk.wr_addr + 4 * i, 0) for i in range(blk.words)]
        n = lay.block_words(blk) if blk.id else blk.words
        words = [self.ctrl.get(blk.wr_addr + 4 * i, 0) for i in range(n)]
        if blk.id:
            words += [self.ctrl.get(blk.wr_addr + 0x20 + 4 * i, 0) for i in range(3)]
        return words

    def _program(self, only: int | None) -> None:
        """Burn the write registers into the array: 0 -> 1 only, protected bits untouched."""
        lay = self.layout
        wr_dis = self.field("WR_DIS")
        for blk in lay.blocks:
            if only is not None and blk.id != only:
                continue
            words = self._write_words(blk)
            if not any(words):
                continue
            if blk.wr_dis_bit is not None and wr_dis >> blk.wr_dis_bit & 1:
                continue  # the whole block is write-protected
            if blk.id == 0:
                keep = 0  # BLOCK0: each field has its own write-protect bit
                for f in lay.fields.values():
                    if f.block == 0 and f.wr_dis_bit is not None and wr_dis >> f.wr_dis_bit & 1:
                        keep |= f.mask
                for i in range(len(words)):
                    words[i] &= ~(keep >> (32 * i)) & 0xFFFFFFFF
            for i, w in enumerate(words):
                self.burned[blk.id][i] |= w
        if lay.chip == "esp32":
            for blk in lay.blocks:  # the write-data registers are cleared after a burn
                for i in range(blk.words):
                    self.ctrl.pop(blk.wr_addr + 4 * i, None)

    def burn_from_chip(self, fields: dict[str, int], keys: dict[int, bytes] | None = None) -> None:
        """The chip's own firmware burning eFuses (ESP-IDF's batch write, committed at once).

        Bits only go from 0 to 1; a block or field write-protected before the batch keeps its
        bits (the batch's own WR_DIS bits take effect after it). Then the array reloads.
        """
        lay = self.layout
        wr_dis = self.burned_field("WR_DIS")
        for block, data in (keys or {}).items():
            blk = lay.blocks[block]
            if blk.wr_dis_bit is not None and wr_dis >> blk.wr_dis_bit & 1:
                continue
            n = lay.block_words(blk)
            for i, w in enumerate(struct.unpack(f"<{n}I", data.ljust(4 * n, b"\0")[:4 * n])):
                self.burned[block][i] |= w
            self._seal(block)
        for name, value in fields.items():
            f = lay.fields[name]
            if f.wr_dis_bit is not None and wr_dis >> f.wr_dis_bit & 1:
                continue
            bits = (value << f.shift) & f.mask
            for i in range(lay.block_words(lay.blocks[f.block])):
                self.burned[f.block][i] |= (bits >> (32 * i)) & 0xFFFFFFFF
            self._seal(f.block)
        self.save()
        self.reload()

    def reload(self) -> None:
        """Load the read registers from the array (reset, or the read command)."""
        lay = self.layout
        rd_dis = self.burned_field("RD_DIS")
        shown: dict[int, int] = {}
        loaded: list[list[int]] = []
        errors: dict[int, int] = {reg: 0 for reg in lay.error_regs}
        for blk in lay.blocks:
            n = lay.block_words(blk)
            data = self.burned[blk.id][:n]
            if lay.rs_coded and blk.id:
                raw = struct.pack(f"<{n}I", *data)
                parity = struct.pack("<3I", *self.burned[blk.id][n:n + 3])
                fixed, corrected, failed = rs_decode(raw, parity)
                data = list(struct.unpack(f"<{n}I", fixed))
                reg, fmask, offs = lay.block_errors[blk.id]
                if fmask is not None:
                    errors[reg] |= (min(corrected, fmask) & fmask) << offs
                reg, bit = lay.block_fail[blk.id]
                if failed and bit is not None:
                    errors[reg] |= 1 << bit
            loaded.append(list(data))  # before read protection: the hardware still uses a hidden key
            if any(rd_dis >> b & 1 for b in blk.rd_dis_bits):
                data = [0] * n
            elif blk.id == 0:
                hide = 0
                for f in lay.fields.values():
                    if f.block == 0 and any(rd_dis >> b & 1 for b in f.rd_dis_bits):
                        hide |= f.mask
                data = [w & ~(hide >> (32 * i)) & 0xFFFFFFFF for i, w in enumerate(data)]
            for i in range(blk.words):
                shown[blk.rd_addr + 4 * i] = data[i]
        shown.update(errors)
        self.shown = shown
        self.loaded = loaded

    def reset(self) -> None:
        """A chip reset: the controller's registers clear and the read registers reload."""
        self.ctrl.clear()
        self.reload()

    # -- what the chip's security hardware sees ---------------------------------------
    def _name(self, esp32: str, other: str) -> str:
        return esp32 if self.layout.chip == "esp32" else other

    @property
    def crypt_cnt_field(self) -> str:
        return self._name("FLASH_CRYPT_CNT", "SPI_BOOT_CRYPT_CNT")

    @property
    def crypt_cnt(self) -> int:
        return self.field(self.crypt_cnt_field)

    @property
    def flash_encryption_enabled(self) -> bool:
        return bin(self.crypt_cnt).count("1") % 2 == 1

    @property
    def plaintext_flashes_left(self) -> int:
        """What the bootloader reports: (FLASH_ENC_CNT_MAX - count) / 2, none once the count is write-protected."""
        f = self.layout.fields[self.crypt_cnt_field]
        if f.wr_dis_bit is not None and self.field("WR_DIS") >> f.wr_dis_bit & 1:
            return 0
        return (f.bits - bin(self.crypt_cnt).count("1")) // 2

    @property
    def manual_encrypt_disabled(self) -> bool:
        return bool(self.field(self._name("DISABLE_DL_ENCRYPT", "DIS_DOWNLOAD_MANUAL_ENCRYPT")))

    @property
    def download_disabled(self) -> bool:
        return bool(self.field(self._name("UART_DOWNLOAD_DIS", "DIS_DOWNLOAD_MODE")))

    @property
    def secure_download(self) -> bool:
        return self.has_field("ENABLE_SECURITY_DOWNLOAD") and bool(self.field("ENABLE_SECURITY_DOWNLOAD"))

    def key_purposes(self) -> list[int]:
        return [self.field(f"KEY_PURPOSE_{i}") for i in range(6) if self.has_field(f"KEY_PURPOSE_{i}")]

    def security_flags(self) -> int:
        """GET_SECURITY_INFO's flag word (esptool's SECURITY_INFO_FLAG_MAP, taken from the ROM)."""
        flags = 0
        for bit, name in ((0, "SECURE_BOOT_EN"), (1, "SECURE_BOOT_AGGRESSIVE_REVOKE"),
                          (2, "ENABLE_SECURITY_DOWNLOAD"), (3, "SECURE_BOOT_KEY_REVOKE0"),
                          (4, "SECURE_BOOT_KEY_REVOKE1"), (5, "SECURE_BOOT_KEY_REVOKE2"),
                          (9, "DIS_DOWNLOAD_DCACHE"), (10, "DIS_DOWNLOAD_ICACHE")):
            if self.has_field(name) and self.field(name):
                flags |= 1 << bit
        return flags

    def flash_key(self) -> tuple[str, bytes, int] | None:
        """The flash-encryption engine's key: (scheme, key, FLASH_CRYPT_CONFIG), None without one.

        espefuse burns a key file's bytes reversed into the block ("Reversing byte order for
        AES-XTS hardware peripheral"), so the engine's key is the block read back reversed.
        """
        if self.layout.chip == "esp32":
            raw = self.block_bytes(1)
            if not any(raw):
                return None
            return "esp32", raw[::-1], self.field("FLASH_CRYPT_CONFIG")
        purposes = {p: i for i, p in enumerate(self.key_purposes())}
        if 2 in purposes and 3 in purposes:  # XTS_AES_256_KEY_1 and _2 (ESP32-S3)
            return ("xts", self.block_bytes(4 + purposes[2])[::-1] + self.block_bytes(4 + purposes[3])[::-1], 0)
        if 4 in purposes:  # XTS_AES_128_KEY
            return "xts", self.block_bytes(4 + purposes[4])[::-1], 0
        return None

    def secure_boot_digests(self) -> tuple[bytes, ...] | None:
        """The public-key digests Secure Boot v2 trusts; None while secure boot is off.

        ESP32 (v3.0): ABS_DONE_1 burned, the digest in BLOCK2. ESP32-C3/S3: SECURE_BOOT_EN
        burned, each key block whose purpose is SECURE_BOOT_DIGESTn and whose
        SECURE_BOOT_KEY_REVOKEn is not burned. The ROM and the bootloader read the digests through the
        read registers (unlike the flash-encryption key, which the engine takes unseen): a read-protected
        digest reads as zeros and no image verifies, which is why espefuse keeps digests readable.
        """
        if self.layout.chip == "esp32":
            return (self.readable_block_bytes(2),) if self.field("ABS_DONE_1") else None
        if not self.field("SECURE_BOOT_EN"):
            return None
        return tuple(self.readable_block_bytes(4 + i) for i, p in enumerate(self.key_purposes())
                     if p in (9, 10, 11) and not self.field(f"SECURE_BOOT_KEY_REVOKE{p - 9}"))
