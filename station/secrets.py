"""The station's encrypted secrets file: vendor tokens and Wi-Fi passwords at rest.

AES-256-GCM with a key derived from a passphrase by scrypt (both through
`cryptography`). The station never writes a secret to disk in plaintext; the
passphrase comes from $STATION_SECRETS_PASSPHRASE or is asked for.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

PASSPHRASE_ENV = "STATION_SECRETS_PASSPHRASE"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1  # new files (OWASP's scrypt minimum: 128 MiB)
MIN_PASSPHRASE = 12  # characters, for a new file
# what a file may ask for: a forged or damaged file must not make the station spend GiBs or hours
N_RANGE = (2**14, 2**22)  # 2**15 was the old default: files written with it still open
MAX_R, MAX_P = 16, 4
MAX_SCRYPT_MEMORY = 1 << 30  # 128 * N * r bytes
SALT_RANGE = (16, 64)


class SecretStoreError(Exception):
    pass


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def kdf_problem(kdf: object) -> str | None:
    """What is wrong with a file's scrypt parameters (None: within bounds), before any work is done."""
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        return "its key derivation is not scrypt"
    n, r, p, salt = kdf.get("n"), kdf.get("r"), kdf.get("p"), kdf.get("salt")
    if not (_whole(n) and _whole(r) and _whole(p)):
        return "scrypt n, r and p must be whole numbers"
    if not (N_RANGE[0] <= n <= N_RANGE[1]) or n & (n - 1):
        return f"scrypt n = {n} is not a power of two from 2**14 to 2**22"
    if not (1 <= r <= MAX_R) or not (1 <= p <= MAX_P):
        return f"scrypt r = {r}, p = {p}: r must be 1..{MAX_R} and p 1..{MAX_P}"
    if 128 * n * r > MAX_SCRYPT_MEMORY:
        return f"scrypt n = {n} with r = {r} needs {128 * n * r >> 20} MiB; at most {MAX_SCRYPT_MEMORY >> 20} MiB"
    if not isinstance(salt, str):
        return "no scrypt salt"
    try:
        raw = base64.b64decode(salt, validate=True)
    except ValueError:
        return "the scrypt salt is not base64"
    if not (SALT_RANGE[0] <= len(raw) <= SALT_RANGE[1]):
        return f"a {len(raw)}-byte scrypt salt; {SALT_RANGE[0]} to {SALT_RANGE[1]} bytes expected"
    return None


class SecretStore:
    def __init__(self, path: Path, passphrase: str):
        if not passphrase:
            raise SecretStoreError(f"the secrets file needs a passphrase (set {PASSPHRASE_ENV})")
        self.path = Path(path)
        self.passphrase = passphrase

    def load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            if self.path.stat().st_size > 1 << 20:
                raise ValueError("larger than 1 MiB")
            doc = json.loads(self.path.read_text())
            kdf = doc["kdf"]
            problem = kdf_problem(kdf)
            if problem:
                raise SecretStoreError(f"{self.path}: refused: {problem} (a damaged or forged file; "
                                       "restore it from the backup)")
            key = _derive(self.passphrase, base64.b64decode(kdf["salt"]), kdf["n"], kdf["r"], kdf["p"])
            plain = AESGCM(key).decrypt(base64.b64decode(doc["nonce"]), base64.b64decode(doc["ciphertext"]),
                                        b"station-secrets-v1")
        except InvalidTag:
            raise SecretStoreError(f"{self.path}: wrong passphrase, or the file was altered") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise SecretStoreError(f"{self.path}: not a station secrets file ({exc})") from None
        return json.loads(plain)

    def save(self, values: dict[str, str]) -> None:
        """Encrypt `values` to the file, at today's scrypt parameters (an old file is upgraded)."""
        if not self.path.exists() and len(self.passphrase) < MIN_PASSPHRASE:
            raise SecretStoreError(f"a new secrets file needs a passphrase of at least {MIN_PASSPHRASE} "
                                   f"characters (this one has {len(self.passphrase)})")
        salt, nonce = os.urandom(16), os.urandom(12)
        key = _derive(self.passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        ct = AESGCM(key).encrypt(nonce, json.dumps(values).encode(), b"station-secrets-v1")
        doc = {"version": 1, "kdf": {"name": "scrypt", "salt": _b64(salt), "n": SCRYPT_N, "r": SCRYPT_R,
                                     "p": SCRYPT_P}, "cipher": "AES-256-GCM", "nonce": _b64(nonce),
               "ciphertext": _b64(ct)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc))
        os.replace(tmp, self.path)

    def set(self, name: str, value: str) -> None:
        values = self.load()
        values[name] = value
        self.save(values)

    def remove(self, name: str) -> bool:
        values = self.load()
        if name not in values:
            return False
        del values[name]
        self.save(values)
        return True

    def names(self) -> list[str]:
        return sorted(self.load())
