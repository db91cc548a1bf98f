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
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


class SecretStoreError(Exception):
    pass


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


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
            doc = json.loads(self.path.read_text())
            kdf = doc["kdf"]
            key = _derive(self.passphrase, base64.b64decode(kdf["salt"]), kdf["n"], kdf["r"], kdf["p"])
            plain = AESGCM(key).decrypt(base64.b64decode(doc["nonce"]), base64.b64decode(doc["ciphertext"]),
                                        b"station-secrets-v1")
        except InvalidTag:
            raise SecretStoreError(f"{self.path}: wrong passphrase, or the file was altered") from None
        except (ValueError, KeyError) as exc:
            raise SecretStoreError(f"{self.path}: not a station secrets file ({exc})") from None
        return json.loads(plain)

    def save(self, values: dict[str, str]) -> None:
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
