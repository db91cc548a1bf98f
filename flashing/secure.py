"""Flash encryption set up from the host for one unit: its key, its regions encrypted, its eFuse burns.

The way a factory that controls its keys does it, as ESP-IDF's docs/en/security/flash-encryption.rst
describes: the key is made on the host ("Using Host Generated Key"), every region is
encrypted host-side with espsecure's encrypt-flash-data for its own address (the scheme the
chip's engine decrypts: AES-256 with FLASH_CRYPT_CONFIG on ESP32, XTS-AES-128 on C3/S3),
the key and the eFuses that enable encryption are burned with espefuse ("Enabling Flash
Encryption Externally"; ESP32: BLOCK1, FLASH_CRYPT_CONFIG, FLASH_CRYPT_CNT; C3/S3: a key block
of purpose XTS_AES_128_KEY and SPI_BOOT_CRYPT_CNT), and the ciphertext is written with plain
writes. Release mode then burns what ESP-IDF's bootloader burns on a release-mode first boot
with the default Kconfig (see `burn_plan`): the ROM's encrypted-download and cache paths and
JTAG disabled, the cache disables write-protected, the crypt count burned to its maximum.
Secure Boot v2 adds what ESP-IDF burns when it enables secure boot: the unused digest slots
revoked, JTAG and direct boot disabled, RD_DIS write-protected.

Each burn is a `Burn`, data the station records before it runs (it cannot be undone).
Everything here goes through espefuse's and espsecure's Python APIs, never their text.
"""

from __future__ import annotations

import copy
import functools
import importlib
import io
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from esptool.util import FatalError

from .errors import UnitError
from .session import esptool_output

FLASH_ENCRYPTION_CHIPS = ("esp32", "esp32c3", "esp32s3")
MODES = ("development", "release")
KEY_BYTES = 32  # ESP32: the 256-bit BLOCK1 key; C3/S3: XTS-AES-128 (two 128-bit halves in one key block)
ESP32_CRYPT_CONFIG = 0xF  # every key tweak bit on: what ESP-IDF's bootloader burns


class _EfuseTables:
    """espefuse's eFuse tables (efuse_defs/<chip>.yaml), parsed once per process.

    espefuse parses its chip's YAML table with PyYAML's pure-Python loader every time it is
    opened: ~0.2 s of CPU, under the one interpreter lock all 16 ports share. Its
    mem_definition modules get this object as their `yaml`; `safe_load` parses each file once
    with libyaml's loader where PyYAML has it (the same safe schema; tests/flashing/
    test_efuse.py compares the results) and hands out copies, so no open sees another's.
    """

    def __init__(self) -> None:
        self._parsed: dict[str, object] = {}
        self._lock = threading.Lock()

    def safe_load(self, stream):
        name = getattr(stream, "name", None)
        with self._lock:
            if name not in self._parsed:
                loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
                self._parsed[name] = yaml.load(stream, Loader=loader)  # noqa: S506 - a safe loader
            return copy.deepcopy(self._parsed[name])


EFUSE_TABLES = _EfuseTables()


@functools.cache
def espefuse_module():
    """espefuse, imported when a unit first needs it (~0.3 s: a station with a plain profile never pays it),
    its chips' tables read through EFUSE_TABLES."""
    import espefuse

    for chip in ("esp32", "esp32c3", "esp32s3"):
        importlib.import_module(f"espefuse.efuse.{chip}.mem_definition").yaml = EFUSE_TABLES
    return espefuse


@dataclass(frozen=True)
class Burn:
    """One eFuse burn of a unit's set-up: what it burns, in the words the record keeps."""

    name: str  # short: key, crypt-config, enable, release
    fields: tuple[str, ...]  # the eFuse fields (or key block) it burns
    values: tuple[tuple[str, int], ...] = ()  # burn-efuse's name=value pairs (the key burn has none)
    protect: tuple[str, ...] = ()  # fields write-protect-efuse then protects (each with all sharing its WR_DIS bit)
    after_flash: bool = False  # made once the ciphertext is written and read back (esptool cannot write after it)

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.fields)})"


class SecureError(UnitError):
    """A step of the flash-encryption set-up failed on the board."""


# ESP-IDF's choices with the default Kconfig of a release build (CONFIG_SECURE_FLASH_ENCRYPTION_MODE_RELEASE,
# CONFIG_SECURE_FLASH_ENCRYPTION_KEY_SOURCE_EFUSES, every "Potentially insecure option" off):
# components/bootloader_support/src/<chip>/flash_encryption_secure_features.c
# (esp_flash_encryption_enable_secure_features) — the ROM's download paths, JTAG, direct boot
RELEASE_DISABLES = {
    "esp32": ("DISABLE_DL_ENCRYPT", "DISABLE_DL_DECRYPT", "DISABLE_DL_CACHE", "JTAG_DISABLE", "CONSOLE_DEBUG_DISABLE"),
    "esp32c3": ("DIS_DOWNLOAD_MANUAL_ENCRYPT", "DIS_DOWNLOAD_ICACHE", "DIS_PAD_JTAG", "DIS_USB_JTAG", "DIS_DIRECT_BOOT"),
    # DIS_PAD_JTAG is IDF's HARD_DIS_JTAG and DIS_DIRECT_BOOT its DIS_LEGACY_SPI_BOOT (espefuse's aliases)
    "esp32s3": ("DIS_DOWNLOAD_MANUAL_ENCRYPT", "DIS_DOWNLOAD_DCACHE", "DIS_DOWNLOAD_ICACHE", "DIS_PAD_JTAG",
                "DIS_USB_JTAG", "DIS_DIRECT_BOOT"),
}
# the same file, last: WR_DIS_DIS_CACHE (ESP32) / WR_DIS_DIS_ICACHE (C3/S3); the bit it burns also protects
# the download and JTAG disables above, so it comes after them
CACHE_WRITE_PROTECT = {"esp32": "DIS_CACHE", "esp32c3": "DIS_ICACHE", "esp32s3": "DIS_ICACHE"}
# components/bootloader_support/src/<chip>/secure_boot_secure_features.c (esp_secure_boot_enable_secure_features)
SECURE_BOOT_DISABLES = {
    "esp32": (("JTAG_DISABLE", 1), ("CONSOLE_DEBUG_DISABLE", 1)),
    "esp32c3": (("DIS_DIRECT_BOOT", 1), ("DIS_PAD_JTAG", 1), ("DIS_USB_JTAG", 1), ("SOFT_DIS_JTAG", 7)),
    "esp32s3": (("DIS_DIRECT_BOOT", 1), ("DIS_USB_JTAG", 1), ("DIS_PAD_JTAG", 1), ("SOFT_DIS_JTAG", 7)),
}


def crypt_cnt_field(chip: str) -> str:
    return "FLASH_CRYPT_CNT" if chip == "esp32" else "SPI_BOOT_CRYPT_CNT"


def crypt_cnt_max(chip: str) -> int:
    """Every bit of the crypt count: 7 bits on ESP32, 3 on C3/S3."""
    return 0x7F if chip == "esp32" else 0x7


def burn_plan(chip: str, mode: str, secure_boot: bool = False) -> tuple[Burn, ...]:
    """The burns that set up flash encryption on `chip` in `mode` (and Secure Boot v2), in the order they are made.

    Secure Boot v2 follows ESP-IDF's docs/en/security/secure-boot-v2.rst ("Secure Boot V2
    Scheme", "Enabling Secure Boot V2 Externally"): the signing key's digest, the unused
    digest slots revoked (C3/S3; secure_boot_v2/secure_boot.c, check_and_generate_secure_boot_keys:
    "Revoking empty key digest slot"), the enable bit, then <chip>/secure_boot_secure_features.c's
    disables and the write-protection of RD_DIS (no key can be read-protected afterwards: the
    flash-encryption key is already). SECURE_BOOT_AGGRESSIVE_REVOKE is not burned: ESP-IDF burns
    it only with the non-default CONFIG_SECURE_BOOT_ENABLE_AGGRESSIVE_KEY_REVOKE.

    Release mode's burns come after the flash is written (`after_flash`): the disables, the
    crypt count to its maximum (bootloader_support/src/flash_encryption/flash_encrypt.c,
    esp_flash_encrypt_enable: "Setting CRYPT_CNT for permanent encryption" — every bit burned,
    so no later burn can make it even: what ESP-IDF does instead of WR_DIS of the count, which
    on ESP32 would also write-protect UART_DL_DIS), then the cache disables write-protected.
    """
    if chip == "esp32":
        plan = [Burn("key", ("BLOCK1 flash_encryption key (read- and write-protected)",)),
                Burn("crypt-config", ("FLASH_CRYPT_CONFIG",), (("FLASH_CRYPT_CONFIG", ESP32_CRYPT_CONFIG),)),
                Burn("enable", ("FLASH_CRYPT_CNT",), (("FLASH_CRYPT_CNT", 1),))]
    else:
        plan = [Burn("key", ("BLOCK_KEY0 purpose XTS_AES_128_KEY (read- and write-protected)",)),
                Burn("enable", ("SPI_BOOT_CRYPT_CNT",), (("SPI_BOOT_CRYPT_CNT", 1),))]
    if secure_boot and chip == "esp32":  # v3.0 silicon: one digest in BLOCK2, ABS_DONE_1 turns it on
        plan += [Burn("secure-boot-digest", ("BLOCK2 Secure Boot v2 key digest (write-protected)",)),
                 Burn("secure-boot", ("ABS_DONE_1",), (("ABS_DONE_1", 1),))]
    elif secure_boot:
        revoke = ("SECURE_BOOT_KEY_REVOKE1", "SECURE_BOOT_KEY_REVOKE2")  # slot 0 holds the station's digest
        plan += [Burn("secure-boot-digest", ("BLOCK_KEY1 purpose SECURE_BOOT_DIGEST0 (write-protected)",)),
                 Burn("revoke", revoke, tuple((f, 1) for f in revoke)),
                 Burn("secure-boot", ("SECURE_BOOT_EN",), (("SECURE_BOOT_EN", 1),))]
    if secure_boot:
        lock = SECURE_BOOT_DISABLES[chip]
        plan.append(Burn("secure-boot-lock", tuple(f for f, _ in lock) + ("WR_DIS of RD_DIS",), lock,
                         protect=("RD_DIS",)))
    if mode == "release":
        done = {f for b in plan for f, _ in b.values}
        release = tuple(f for f in RELEASE_DISABLES[chip] if f not in done)
        count, most = crypt_cnt_field(chip), crypt_cnt_max(chip)
        cache = CACHE_WRITE_PROTECT[chip]
        plan += [Burn("release", release, tuple((f, 1) for f in release), after_flash=True),
                 Burn("permanent", (f"{count} = {most:#x}",), ((count, most),), after_flash=True),
                 Burn("write-protect", (f"WR_DIS of {cache} (and the disables sharing its bit)",),
                      protect=(cache,), after_flash=True)]
    return tuple(plan)


def sign_image(data: bytes, signing_key: Path) -> bytes:
    """`data` signed for Secure Boot v2 (espsecure sign-data --version 2, RSA-PSS): padded to a sector, signature sector appended."""
    with tempfile.TemporaryDirectory() as d, open(signing_key, "rb") as key, esptool_output(None):
        out = Path(d) / "signed.bin"
        _espsecure().sign_data("2", [key], str(out), False, False, None, None, None, _named(data, "image"))
        return out.read_bytes()


def signed_size(size: int) -> int:
    """How long an image of `size` bytes is once signed: padded to 4 KiB, then its 4 KiB signature sector."""
    return -(-size // 4096) * 4096 + 4096


def _espsecure():
    import espsecure  # as espefuse: imported by the first unit that signs or encrypts, not at every start

    return espsecure


def _named(data: bytes, name: str) -> io.BytesIO:
    f = io.BytesIO(data)
    f.name = name  # espsecure compares names to refuse writing over its input
    return f


def encrypt_region(chip: str, key: bytes, address: int, data: bytes) -> bytes:
    """`data` as the chip's engine stores it at `address` under `key` (espsecure encrypt-flash-data).

    Padded with erased bytes to the 32-byte block the engines work in.
    """
    if len(data) % 32:
        data += b"\xff" * (32 - len(data) % 32)
    out = _named(b"", "ciphertext")
    with esptool_output(None):  # espsecure logs through esptool's logger: nothing of the key is printed
        _espsecure().encrypt_flash_data(_named(key, "key"), out, address, ESP32_CRYPT_CONFIG, chip != "esp32",
                                     _named(data, "plaintext"))
    return out.getvalue()


def open_efuses(esp):
    """espefuse's commands object over the unit's esptool session: one per unit's set-up.

    Opening it parses espefuse's eFuse table (YAML, ~0.2 s of CPU) and reads every eFuse
    register; a station with 16 ports does this under one interpreter lock, so each unit opens
    it once and every burn and read-back goes through it. espefuse re-reads the blocks after
    each burn itself (`burn_all`), and `read_state` reads them again before it answers.
    """
    try:
        with esptool_output(None):
            return espefuse_module().init_commands(esp=esp, do_not_confirm=True)
    except FatalError as exc:
        raise SecureError("the board's eFuses could not be read", "retry; replace the board if it repeats",
                          str(exc)) from None


def run_burn(fuses, chip: str, burn: Burn, key: bytes, signing_key: Path | None = None) -> None:
    """Make one burn through the unit's espefuse commands (`open_efuses`; espefuse's Python API, no confirmation)."""
    try:
        with esptool_output(None):
            if burn.name == "secure-boot-digest":
                with open(signing_key, "rb") as pem:  # espefuse takes the digest of the key's public half
                    if chip == "esp32":
                        fuses.burn_key_digest(pem, False, False)
                    else:
                        fuses.burn_key_digest(["BLOCK_KEY1"], [pem], ["SECURE_BOOT_DIGEST0"])
            elif burn.name == "key" and chip == "esp32":
                fuses.burn_key(["flash_encryption"], [_named(key, "flash-encryption key")], False, False)
            elif burn.name == "key":
                fuses.burn_key(["BLOCK_KEY0"], [_named(key, "flash-encryption key")], ["XTS_AES_128_KEY"])
            else:
                if burn.values:
                    fuses.burn_efuse({name: str(value) for name, value in burn.values})
                if burn.protect:
                    fuses.write_protect_efuse(list(burn.protect))
    except FatalError as exc:
        detail = _without_key_bits(str(exc)) if burn.name == "key" else str(exc)
        raise SecureError(f"burning {burn.describe()} failed", "set the board aside: its eFuses may be partly "
                          "burned; the record says which", detail) from None


# a hex run of 8 bytes or more, plain or spaced: espefuse's refusal of a key burn shows the block's new value
_HEX_RUN = re.compile(r"(?:0x)?[0-9a-fA-F]{16,}|(?:[0-9a-fA-F]{2}[ :]){7,}[0-9a-fA-F]{2}")


def _without_key_bits(text: str) -> str:
    """espefuse's words about a key burn, without the block values it prints ("value will be 0x…": the new key
    ORed with what the block already held, which the redactor cannot know, since it is not the key itself)."""
    return _HEX_RUN.sub("<key block bits withheld>", text)


@dataclass(frozen=True)
class EfuseState:
    """What the chip's eFuses say about flash encryption (espefuse's reading, not ours)."""

    crypt_cnt: int
    key_present: bool  # a flash-encryption key block is burned (its purpose, or ESP32's BLOCK1 protection)
    release_fields: dict[str, int]  # release mode's disables, as read
    secure_boot: bool = False  # SECURE_BOOT_EN (ESP32: ABS_DONE_1)
    chip: str = ""
    fields: dict[str, int] = field(default_factory=dict)  # every field a plan burns a value into, as read
    write_protected: dict[str, bool] = field(default_factory=dict)  # every field a plan protects, and the key's
    key_readable: bool = False  # the key block reads back (not read-protected)

    @property
    def encrypted(self) -> bool:
        return bin(self.crypt_cnt).count("1") % 2 == 1

    @property
    def release(self) -> bool:
        return bool(self.release_fields) and all(self.release_fields.values())


def _key_protections(chip: str) -> tuple[str, ...]:
    """The key block's protections espefuse's burn-key makes (ESP-IDF's release-mode check asks for each)."""
    return ("BLOCK1",) if chip == "esp32" else ("BLOCK_KEY0", "KEY_PURPOSE_0")


def read_state(fuses, chip: str) -> EfuseState:
    """Read, from the chip again, the eFuses that say whether, and how, the unit's flash is encrypted."""
    release = next((b for b in burn_plan(chip, "release") if b.name == "release"))
    every = burn_plan(chip, "release", secure_boot=True)
    try:
        with esptool_output(None):
            e = fuses.efuses
            e.read_coding_scheme()
            e.read_blocks()  # the registers now, not what the commands object read when it was opened
            e.update_efuses()
            if chip == "esp32":
                cnt = e["FLASH_CRYPT_CNT"].get()
                key = not e["BLOCK1"].is_readable() or any(e["BLOCK1"].get_raw())
            else:
                cnt = e["SPI_BOOT_CRYPT_CNT"].get_raw()
                key = any(str(e[f"KEY_PURPOSE_{i}"].get()).startswith("XTS_AES") for i in range(6))
            fields = {f: int(e[f].get_raw()) for f in release.fields}
            boot = bool(e["ABS_DONE_1" if chip == "esp32" else "SECURE_BOOT_EN"].get_raw())
            values = {f: int(e[f].get_raw()) for b in every for f, _ in b.values}
            guarded = [f for b in every for f in b.protect] + list(_key_protections(chip))
            protected = {f: not e[f].is_writeable() for f in guarded}
            readable = bool(key) and e[_key_protections(chip)[0]].is_readable()
    except FatalError as exc:
        raise SecureError("the board's eFuses could not be read", "retry; replace the board if it repeats",
                          str(exc)) from None
    return EfuseState(int(cnt), bool(key), fields, boot, chip, values, protected, readable)


# what ESP-IDF's bootloader burns in development mode besides the plan's key and count, when it makes the key
# itself (esp_flash_encryption_enable_secure_features, default Kconfig: only the ROM's encrypted download stays)
CHIP_KEY_DEVELOPMENT = {chip: tuple(f for f in fields if f not in ("DISABLE_DL_ENCRYPT", "DIS_DOWNLOAD_MANUAL_ENCRYPT"))
                        for chip, fields in RELEASE_DISABLES.items()}


def check_state(state: EfuseState, mode: str, secure_boot: bool = False, chip_key: bool = False) -> list[str]:
    """What differs between the eFuses read back and what the profile's mode burns (nothing: they match).

    `chip_key`: the chip's own bootloader burned them on its first boot (ESP-IDF's choices for the mode).
    """
    problems = []
    if secure_boot != state.secure_boot:
        problems.append("secure boot is " + ("not enabled" if secure_boot else "enabled, the profile does not ask for it"))
    if not state.encrypted:
        problems.append(f"the flash-encryption count reads {state.crypt_cnt:#x}: encryption is not on")
    if not state.key_present:
        problems.append("no flash-encryption key block is burned")
    if mode == "release" and not state.release:
        off = [f for f, v in state.release_fields.items() if not v]
        problems.append(f"release mode, but {', '.join(off)} not burned")
    if not state.chip:
        return problems
    plan = burn_plan(state.chip, mode, secure_boot)
    want: dict[str, int] = {}
    for b in plan:  # a later burn of the same field (the crypt count to its maximum) is what it reads
        want.update(b.values)
    if chip_key and mode == "development":
        want.update((f, 1) for f in CHIP_KEY_DEVELOPMENT[state.chip])
    reported = set(state.release_fields) if mode == "release" else set()  # said above
    wrong = [f"{f} reads {state.fields[f]:#x}, not {v:#x}" for f, v in want.items()
             if f in state.fields and state.fields[f] != v and f not in reported]
    if wrong:
        problems.append("; ".join(wrong))
    extra = [f for f, v in state.fields.items() if v and f not in want and f not in ("ABS_DONE_1", "SECURE_BOOT_EN")]
    if mode == "development" and any(f in state.release_fields for f in extra):  # the ROM's encrypted download
        problems.append(f"development mode, but release-mode eFuses are burned ({', '.join(extra)})")
    elif extra:
        problems.append(f"{', '.join(extra)} burned, which the profile does not burn")
    unprotected = [f for b in plan for f in b.protect] + list(_key_protections(state.chip))
    unprotected = [f for f in unprotected if f in state.write_protected and not state.write_protected[f]]
    if unprotected:
        problems.append(f"{', '.join(unprotected)} not write-protected")
    if state.key_readable:
        problems.append("the flash-encryption key is readable")
    return problems
