"""Secure Boot v2 (RSA-PSS) as the virtual bootloader checks an app: its signature block against the eFuse digests.

The signature sector follows the image at the next 4 KB boundary and holds up to three
1216-byte blocks (ESP-IDF "Secure Boot v2", signature block format: magic 0xE7, version 2,
SHA-256 of the image, the RSA-3072 public key as the RSA peripheral wants it — n, e,
r^-1, m' little-endian —, the signature, CRC32). A block is trusted when the SHA-256 of
its key material is one of the digests burned in the eFuses (and not revoked).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

SECTOR = 0x1000
SIG_BLOCK_SIZE = 1216
SIG_BLOCK_MAGIC = 0xE7
SIG_BLOCK_VERSION_RSA = 0x02
SIG_BLOCKS = 3
KEY_MATERIAL = slice(36, 36 + 384 + 4 + 384 + 4)  # n, e, rinv, m'


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rom_line: str | None = None  # what the ROM's verifier prints itself (no log prefix)


def _block_valid(blk: bytes) -> bool:
    magic, version = blk[0], blk[1]
    crc = struct.unpack("<I", blk[1196:1200])[0]
    return magic == SIG_BLOCK_MAGIC and version == SIG_BLOCK_VERSION_RSA \
        and zlib.crc32(blk[:1196]) & 0xFFFFFFFF == crc


def _signature_ok(blk: bytes, digest: bytes) -> bool:
    n_le, e, _rinv, _m, sig_le = struct.unpack("<384sI384sI384s", blk[36:36 + 384 * 3 + 8])
    key = rsa.RSAPublicNumbers(e, int.from_bytes(n_le, "little")).public_key()
    try:
        key.verify(sig_le[::-1], digest, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                   utils.Prehashed(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_app(read: Callable[[int, int], bytes], offset: int, image_length: int,
               trusted: tuple[bytes, ...]) -> Verdict:
    """Whether the image at `offset` carries a signature block from a trusted key."""
    padded = image_length + (-image_length % SECTOR)
    sector = read(offset + padded, SIG_BLOCK_SIZE * SIG_BLOCKS)
    if sector[0] != SIG_BLOCK_MAGIC:
        return Verdict(False, "No signature block magic byte found at signature sector "
                              f"(found 0x{sector[0]:x} not 0xe7). Image not V2 signed?")
    digest = hashlib.sha256(read(offset, padded)).digest()
    for i in range(SIG_BLOCKS):
        blk = sector[i * SIG_BLOCK_SIZE:(i + 1) * SIG_BLOCK_SIZE]
        if not _block_valid(blk) or blk[4:36] != digest:
            continue
        if hashlib.sha256(blk[KEY_MATERIAL]).digest() in trusted and _signature_ok(blk, digest):
            return Verdict(True)
    return Verdict(False)
