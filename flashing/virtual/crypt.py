"""The flash-encryption engine of the virtual chips: what reaches the NOR, and what the cache reads back.

Two schemes, as the chips implement them (ESP32 and ESP32-C3/S3 Technical Reference
Manuals, "External Memory Encryption and Decryption"; espsecure's encrypt-flash-data
models the same hardware and is what the tests compare against):

- ESP32: AES-256 on 16-byte blocks, each 32-byte flash block with its own key: the
  eFuse key XORed with "tweak" bits derived from the block's address, the bits chosen
  by FLASH_CRYPT_CONFIG. The engine runs AES *decryption* to encrypt (and encryption to
  decrypt), on byte-reversed blocks.
- ESP32-C3/S3: XTS-AES-128 (a 256-bit key) or XTS-AES-256 (512-bit, S3) over 128-byte
  data units, the tweak being the unit's flash address, on byte-reversed units.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

XTS_UNIT = 0x80
ESP32_KEY_BLOCK = 32

# ESP32 key tweak: which key bits each FLASH_CRYPT_CONFIG bit lets the address change
_TWEAK_RANGES = (
    0xFFFFFFFFFFFFFFFFE00000000000000000000000000000000000000000000000,
    0x00000000000000001FFFFFFFFFFFFFFFF0000000000000000000000000000000,
    0x000000000000000000000000000000000FFFFFFFFFFFFFFFE000000000000000,
    0x0000000000000000000000000000000000000000000000001FFFFFFFFFFFFFFF,
)
# the address bits spread across the key: multiplying by these places copies of addr>>5
_MUL1 = 0x0000200004000080000004000080001000000200004000080000040000800010
_MUL2 = 0x0000000000000000200000000000000010000000000000002000000000000001
_MUL2_MASK = 0x000000000000007FE00000000000000FF000000000000007E00000000000000F


def _esp32_block_key(key: int, address: int, config: int) -> bytes:
    """The AES-256 key the ESP32 engine uses for the 32-byte flash block at `address`."""
    tweak_range = 0
    for bit, bits in enumerate(_TWEAK_RANGES):
        if config >> bit & 1:
            tweak_range |= bits
    a = address >> 5
    key ^= ((_MUL1 * a) | ((_MUL2 * a) & _MUL2_MASK)) & tweak_range
    return key.to_bytes(32, "big")


@dataclass(frozen=True)
class FlashCipher:
    """The engine with one key: encrypts on the way to the NOR, decrypts on the way through the cache."""

    scheme: str  # "esp32" or "xts"
    key: bytes
    crypt_config: int = 0xF  # ESP32 FLASH_CRYPT_CONFIG

    def encrypt(self, address: int, data: bytes) -> bytes:
        return self._run(address, data, encrypt=True)

    def decrypt(self, address: int, data: bytes) -> bytes:
        return self._run(address, data, encrypt=False)

    def read(self, raw: Callable[[int, int], bytes], address: int, length: int) -> bytes:
        """Read `length` bytes at `address` through the cache: whole 32-byte blocks, decrypted."""
        start = address - address % ESP32_KEY_BLOCK
        end = address + length
        end += -end % ESP32_KEY_BLOCK
        plain = self.decrypt(start, raw(start, end - start))
        return plain[address - start: address - start + length]

    def _run(self, address: int, data: bytes, encrypt: bool) -> bytes:
        if address % 16:
            raise ValueError(f"encrypted flash access at 0x{address:x} is not 16-byte aligned")
        n = len(data)
        data = data + b"\xff" * (-n % 16)  # a partial last block: the engine works on whole ones
        if self.scheme == "esp32":
            out = self._esp32(address, data, encrypt)
        else:
            out = self._xts(address, data, encrypt)
        return out[:n]

    def _esp32(self, address: int, data: bytes, encrypt: bool) -> bytes:
        key = int.from_bytes(self.key, "big")
        out = bytearray()
        actor = None
        for pos in range(0, len(data), 16):
            at = address + pos
            if actor is None or at % ESP32_KEY_BLOCK == 0:
                cipher = Cipher(algorithms.AES(_esp32_block_key(key, at, self.crypt_config)), modes.ECB())
                # the engine runs AES backwards: decryption encrypts the flash
                actor = cipher.decryptor() if encrypt else cipher.encryptor()
            out += actor.update(data[pos:pos + 16][::-1])[::-1]
        return bytes(out)

    def _xts(self, address: int, data: bytes, encrypt: bool) -> bytes:
        out = bytearray()
        pos = 0
        while pos < len(data):
            at = address + pos
            unit = at - at % XTS_UNIT
            lead = at - unit
            take = min(XTS_UNIT - lead, len(data) - pos)
            # a partial unit: XTS works per 16-byte block, so the rest of the unit may be anything
            block = bytes(lead) + data[pos:pos + take] + bytes(XTS_UNIT - lead - take)
            tweak = struct.pack("<I", unit) + bytes(12)
            cipher = Cipher(algorithms.AES(self.key), modes.XTS(tweak))
            actor = cipher.encryptor() if encrypt else cipher.decryptor()
            done = actor.update(block[::-1])[::-1]
            out += done[lead:lead + take]
            pos += take
        return bytes(out)
