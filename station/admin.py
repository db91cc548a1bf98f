"""The admin password that guards the screen's F10 (switching profile or lot).

Stored as one line, `scrypt$<log2 N>$<r>$<p>$<salt>$<hash>` (base64, hashlib.scrypt), in
the file station.toml's `admin_password_file` names (default `var/admin-password`),
written by `station admin set-password`. A try is compared in constant time; after a
wrong try the next one is refused, without being checked, until a delay has passed
that doubles with each wrong try in a row. The old unsalted `admin_password_sha256`
of station.toml is never accepted: it locks admin with a message saying how to migrate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .files import write_private

LOG2_N, R, P = 17, 8, 1  # 128 MiB, 0.3 to 1 s here: once per admin try
MIN_LENGTH = 12  # characters
# what a stored line may ask for (a damaged file must not cost GiBs or hours)
LOG2_N_RANGE, MAX_R, MAX_P, MAX_MEMORY = (14, 22), 16, 4, 1 << 30
FIRST_DELAY_S, MAX_DELAY_S = 1.0, 60.0
MIGRATE = ("admin_password_sha256 (unsalted SHA-256) is no longer accepted: run "
           "`station admin set-password`, then remove admin_password_sha256 from station.toml")


class AdminPasswordError(ValueError):
    """A stored admin password line that cannot be used, or a new password that is refused."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=2 * 128 * n * r)


def hash_password(password: str, log2_n: int = LOG2_N, r: int = R, p: int = P) -> str:
    """The line to store for `password` (refused when shorter than MIN_LENGTH)."""
    if len(password) < MIN_LENGTH:
        raise AdminPasswordError(f"an admin password needs at least {MIN_LENGTH} characters "
                                 f"(this one has {len(password)})")
    salt = secrets.token_bytes(16)
    return f"scrypt${log2_n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, log2_n, r, p))}"


def parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """(log2 N, r, p, salt, hash) of a stored line, within bounds; AdminPasswordError otherwise."""
    parts = stored.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise AdminPasswordError("not a `scrypt$log2N$r$p$salt$hash` line")
    try:
        log2_n, r, p = (int(x) for x in parts[1:4])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise AdminPasswordError("its numbers or base64 fields are malformed") from None
    if not (LOG2_N_RANGE[0] <= log2_n <= LOG2_N_RANGE[1]) or not (1 <= r <= MAX_R) or not (1 <= p <= MAX_P) \
            or 128 * (1 << log2_n) * r > MAX_MEMORY:
        raise AdminPasswordError(f"scrypt parameters out of bounds (log2 N {log2_n}, r {r}, p {p})")
    if not (16 <= len(salt) <= 64) or len(digest) != 32:
        raise AdminPasswordError("salt or hash of the wrong length")
    return log2_n, r, p, salt, digest


def check_password(stored: str, password: str) -> bool:
    log2_n, r, p, salt, digest = parse(stored)
    return hmac.compare_digest(_scrypt(password, salt, log2_n, r, p), digest)


def read_stored(path: Path) -> str | None:
    """The stored line, or None when the file does not exist."""
    try:
        if path.stat().st_size > 4096:
            raise AdminPasswordError(f"{path} is larger than an admin password line")
        return path.read_text("utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminPasswordError(f"{path} cannot be read ({exc})") from None


def write_stored(path: Path, line: str) -> None:
    """Replace the file at once, readable by the station's user only."""
    write_private(path, (line + "\n").encode())


@dataclass(frozen=True)
class AdminCheck:
    ok: bool
    message: str  # for the operator: why not, and when to try again


class AdminGate:
    """Checks admin tries against the stored line, with a doubling delay after wrong ones."""

    def __init__(self, stored: str | None, legacy_sha256: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self.stored, self.legacy, self.clock = stored, legacy_sha256, clock
        self.failures = 0
        self.not_before = 0.0

    @classmethod
    def for_station(cls, station) -> "AdminGate":
        try:
            stored = read_stored(station.admin_password_file)
        except AdminPasswordError:
            stored = "unreadable"  # parse() refuses it below, with its words
        return cls(stored, station.admin_password_sha256)

    def locked(self) -> str | None:
        """Why admin cannot be entered at all (None: it can)."""
        if self.stored is None:
            return MIGRATE if self.legacy else ("admin is locked: no admin password is set "
                                                "(station admin set-password)")
        try:
            parse(self.stored)
        except AdminPasswordError as exc:
            return f"admin is locked: the stored admin password is unusable ({exc}); run station admin set-password"
        return None

    def wait_s(self) -> float:
        return max(0.0, self.not_before - self.clock())

    def check(self, password: str) -> AdminCheck:
        why = self.locked()
        if why:
            return AdminCheck(False, why)
        wait = self.wait_s()
        if wait > 0:  # not even checked: guessing cannot go faster than the delay
            return AdminCheck(False, f"too many wrong admin passwords: try again in {math.ceil(wait)} s")
        if check_password(self.stored, password):
            self.failures, self.not_before = 0, 0.0
            return AdminCheck(True, "")
        self.failures += 1
        delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (self.failures - 1))
        self.not_before = self.clock() + delay
        return AdminCheck(False, f"wrong admin password: next try in {math.ceil(delay)} s")
