"""Keys derived from the station's key, one per purpose, so no key serves two jobs.

The station's random key (`var/station.key`) is never used directly: each use (token
fingerprints, per-lot NVS keys, the spool's authentication...) takes its own key from
HKDF-SHA256 with the purpose as the info string. Knowing one derived key (say, a lot's
NVS keys read off a unit's flash) tells nothing about the others or the station's key.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INFO_PREFIX = b"2smart-station/v1/"

# the purposes in use, named once
TOKEN_FINGERPRINT = "token-fingerprint"
NVS_LOT_KEYS = "nvs-lot-keys"


def derive(station_key: bytes, purpose: str, length: int = 32) -> bytes:
    """A key for `purpose` (a short text; a different purpose gives an unrelated key)."""
    if not station_key:
        raise ValueError("no station key to derive from")
    if not purpose:
        raise ValueError("a derived key needs a purpose")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=INFO_PREFIX + purpose.encode()).derive(station_key)
FLASH_KEY_ESCROW = "flash-encryption-key-escrow"


def escrow(station_key: bytes, attempt_uid: str, key: bytes) -> str:
    """A unit's flash-encryption key sealed for the record: AES-256-GCM under a key derived for this only.

    The attempt's uid is the associated data: an escrow moved to another attempt's row does not open.
    """
    nonce = os.urandom(12)
    sealed = AESGCM(derive(station_key, FLASH_KEY_ESCROW)).encrypt(nonce, key, attempt_uid.encode())
    return "aes-gcm:" + base64.b64encode(nonce + sealed).decode()


def unescrow(station_key: bytes, attempt_uid: str, text: str) -> bytes:
    """The key an `escrow` sealed; InvalidTag when the text, the uid or the station's key is not the one."""
    raw = base64.b64decode(text.removeprefix("aes-gcm:"))
    return AESGCM(derive(station_key, FLASH_KEY_ESCROW)).decrypt(raw[:12], raw[12:], attempt_uid.encode())
