"""The station's secrets: the encrypted secrets file, and the one filter text leaves through.

The secrets file: AES-256-GCM with a key derived from a passphrase by scrypt (both
through `cryptography`). The station never writes a secret to disk in plaintext; the
passphrase comes from $STATION_SECRETS_PASSPHRASE or is asked for.

The filter (`Redactor`): every text the station lets out (events, the record's error,
remedy and detail, JSON lines, the screen, the CLI's messages) passes one object that
knows every secret value the station holds and removes each, in every encoding a
message can carry it in, and never lets a URL's query string through.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import quote, quote_plus

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


# -- the redaction point ---------------------------------------------------------------------------

REDACTED = "<redacted>"
MIN_SECRET_CHARS = 4  # shorter values cannot be told from ordinary words: profile check should refuse them
MIN_FRAGMENT_CHARS = 4  # a secret cut at a text's edge (a console tail) still leaks from this length on
EDGE_TEXT_CHARS = 200  # only long texts are cut to an excerpt (console tails of 1500-2000 characters)
# the texts of a record's attempt that carry words from exceptions, boards and HTTP replies
ATTEMPT_TEXTS = ("error", "remedy", "detail", "firmware_version")
# a URL's query (or a bare "/pair?a=b"): everything from "?" while it looks like key=value pairs
_QUERY = re.compile(r"\?(?=[^\s?#'\")]*=)[^\s#'\")]*")


def _encodings(secret: str) -> set[str]:
    """The forms a secret takes in text: raw, URL-encoded, hex, base64(url), escaped for repr and JSON."""
    raw = secret.encode()
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), raw.hex(),
             repr(secret)[1:-1], json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        forms.add(enc(raw).decode())
        forms.add(enc(raw).decode().rstrip("="))
        # inside a longer base64 text (Basic auth "user:secret") the secret starts at any of 3 alignments:
        # the characters made of its own bytes alone are the same whatever surrounds it
        for skip in (0, 1, 2):
            core = raw[skip:]
            core = core[: len(core) - len(core) % 3]
            if len(core) >= 3:
                forms.add(enc(core).decode())
    return {f for f in forms if len(f) >= MIN_SECRET_CHARS}


@dataclass(frozen=True)
class Redactor:
    """Removes every secret value the station holds from a text, and every URL's query string.

    Built once per station (`from_values`); `__call__` is the filter. A secret of fewer
    than MIN_SECRET_CHARS characters is not searched for (it would eat ordinary words).
    """

    secrets: tuple[str, ...] = field(default=(), repr=False)
    _pattern: re.Pattern | None = field(default=None, repr=False, compare=False)
    _edges: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_values(cls, values: Iterable[str | None]) -> "Redactor":
        secrets = tuple(sorted({v for v in values if v and len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True))
        forms = sorted({f for s in secrets for f in _encodings(s)}, key=len, reverse=True)
        hexes = {s.encode().hex() for s in secrets}
        # hex and percent-escapes are case-insensitive in the wild; the rest is matched as written
        alts = [f"(?i:{re.escape(f)})" if f in hexes or "%" in f else re.escape(f) for f in forms]
        pattern = re.compile("|".join(alts)) if alts else None
        return cls(secrets, pattern, tuple(s for s in secrets if len(s) > MIN_FRAGMENT_CHARS))

    @classmethod
    def for_station(cls, secrets: Mapping[str, str], accounts=None, env: Mapping[str, str] | None = None
                    ) -> "Redactor":
        """The profile's secrets, the factory accounts' (test token, test PSK, monitor password), passphrases."""
        env = os.environ if env is None else env
        values = list(secrets.values())
        if accounts is not None:
            values += [getattr(accounts, name, None)
                       for name in ("test_token", "test_psk", "monitor_password", "admin_password")]
        values.append(env.get(PASSPHRASE_ENV))
        return cls.from_values(values)

    def with_values(self, values: Iterable[str | None]) -> "Redactor":
        """This filter, also removing `values` (secrets made during one unit's run: its test account)."""
        return Redactor.from_values([*self.secrets, *values])

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._pattern is not None:  # first: a raw secret in a query may hold "#" or a space, where a query ends
            text = self._pattern.sub(REDACTED, text)
        text = _QUERY.sub("?" + REDACTED, text)
        return self._cut_edges(text)

    def _cut_edges(self, text: str) -> str:
        # a text cut to its last (or first) N characters may hold only part of a secret at its edge
        if len(text) < EDGE_TEXT_CHARS:
            return text
        for s in self._edges:
            for n in range(len(s) - 1, MIN_FRAGMENT_CHARS - 1, -1):
                if text.startswith(s[-n:]):
                    text = REDACTED + text[n:]
                    break
            for n in range(len(s) - 1, MIN_FRAGMENT_CHARS - 1, -1):
                if text.endswith(s[:n]):
                    text = text[:-n] + REDACTED
                    break
        return text

    def fields(self, obj: object, names: Iterable[str] = ATTEMPT_TEXTS) -> None:
        """Redact the named text attributes of a mutable record (by default an Attempt's) in place."""
        for name in names:
            value = getattr(obj, name)
            if isinstance(value, str):
                setattr(obj, name, self(value))


NO_SECRETS = Redactor()  # still hides query strings: for code paths that hold no secret
