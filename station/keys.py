"""Keys derived from the station's key, one per purpose, so no key serves two jobs.

The station's random key (`var/station.key`) is never used directly: each use (token
fingerprints, per-lot NVS keys, the spool's authentication...) takes its own key from
HKDF-SHA256 with the purpose as the info string. Knowing one derived key (say, a lot's
NVS keys read off a unit's flash) tells nothing about the others or the station's key.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
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
