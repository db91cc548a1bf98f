"""Flash encryption set up from the host for one unit: its key, its regions encrypted, its eFuse burns.

The way a factory that controls its keys does it, as ESP-IDF's docs/en/security/flash-encryption.rst
describes: the key is made on the host ("Using Host Generated Key"), every region is
encrypted host-side with espsecure's encrypt-flash-data for its own address (the scheme the
chip's engine decrypts: AES-256 with FLASH_CRYPT_CONFIG on ESP32, XTS-AES-128 on C3/S3),
the key and the eFuses that enable encryption are burned with espefuse ("Enabling Flash
Encryption Externally"; ESP32: BLOCK1, FLASH_CRYPT_CONFIG, FLASH_CRYPT_CNT; C3/S3: a key block
of purpose XTS_AES_128_KEY and SPI_BOOT_CRYPT_CNT), and the ciphertext is written with plain
writes. Release mode then burns what the bootloader's own release step burns
(bootloader_support flash_encryption_secure_features.c, "Release Mode" in the same
document): the ROM's encrypted-download and cache paths and JTAG disabled.

Each burn is a `Burn`, data the station records before it runs (it cannot be undone).
Everything here goes through espefuse's and espsecure's Python APIs, never their text.
"""

from __future__ import annotations

import copy
import importlib
import io
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import espefuse
import espsecure
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
for _chip in ("esp32", "esp32c3", "esp32s3"):
    importlib.import_module(f"espefuse.efuse.{_chip}.mem_definition").yaml = EFUSE_TABLES


@dataclass(frozen=True)
class Burn:
    """One eFuse burn of a unit's set-up: what it burns, in the words the record keeps."""

    name: str  # short: key, crypt-config, enable, release
    fields: tuple[str, ...]  # the eFuse fields (or key block) it burns
    values: tuple[tuple[str, int], ...] = ()  # burn-efuse's name=value pairs (the key burn has none)

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.fields)})"


class SecureError(UnitError):
    """A step of the flash-encryption set-up failed on the board."""


def burn_plan(chip: str, mode: str, secure_boot: bool = False) -> tuple[Burn, ...]:
    """The burns that set up flash encryption on `chip` in `mode` (and Secure Boot v2), in the order they are made.

    Secure Boot v2 follows ESP-IDF's docs/en/security/secure-boot-v2.rst ("Secure Boot V2
    Scheme", "Enabling Secure Boot V2 Externally"): the signing key's digest, then the enable bit.
    """
    if chip == "esp32":
        plan = [Burn("key", ("BLOCK1 flash_encryption key (read- and write-protected)",)),
                Burn("crypt-config", ("FLASH_CRYPT_CONFIG",), (("FLASH_CRYPT_CONFIG", ESP32_CRYPT_CONFIG),)),
                Burn("enable", ("FLASH_CRYPT_CNT",), (("FLASH_CRYPT_CNT", 1),))]
        release = ("DISABLE_DL_ENCRYPT", "DISABLE_DL_DECRYPT", "DISABLE_DL_CACHE", "JTAG_DISABLE")
    else:
        plan = [Burn("key", ("BLOCK_KEY0 purpose XTS_AES_128_KEY (read- and write-protected)",)),
                Burn("enable", ("SPI_BOOT_CRYPT_CNT",), (("SPI_BOOT_CRYPT_CNT", 1),))]
        release = ("DIS_DOWNLOAD_MANUAL_ENCRYPT", "DIS_DOWNLOAD_ICACHE", "DIS_PAD_JTAG", "DIS_USB_JTAG",
                   "DIS_DIRECT_BOOT")
        if chip == "esp32s3":
            release += ("DIS_DOWNLOAD_DCACHE",)
    if secure_boot and chip == "esp32":  # v3.0 silicon: one digest in BLOCK2, ABS_DONE_1 turns it on
        plan += [Burn("secure-boot-digest", ("BLOCK2 Secure Boot v2 key digest (write-protected)",)),
                 Burn("secure-boot", ("ABS_DONE_1",), (("ABS_DONE_1", 1),))]
    elif secure_boot:
        plan += [Burn("secure-boot-digest", ("BLOCK_KEY1 purpose SECURE_BOOT_DIGEST0 (write-protected)",)),
                 Burn("secure-boot", ("SECURE_BOOT_EN",), (("SECURE_BOOT_EN", 1),))]
    if mode == "release":
        plan.append(Burn("release", release, tuple((f, 1) for f in release)))
    return tuple(plan)


def sign_image(data: bytes, signing_key: Path) -> bytes:
    """`data` signed for Secure Boot v2 (espsecure sign-data --version 2, RSA-PSS): padded to a sector, signature sector appended."""
    with tempfile.TemporaryDirectory() as d, open(signing_key, "rb") as key, esptool_output(None):
        out = Path(d) / "signed.bin"
        espsecure.sign_data("2", [key], str(out), False, False, None, None, None, _named(data, "image"))
        return out.read_bytes()


def signed_size(size: int) -> int:
    """How long an image of `size` bytes is once signed: padded to 4 KiB, then its 4 KiB signature sector."""
    return -(-size // 4096) * 4096 + 4096


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
        espsecure.encrypt_flash_data(_named(key, "key"), out, address, ESP32_CRYPT_CONFIG, chip != "esp32",
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
            return espefuse.init_commands(esp=esp, do_not_confirm=True)
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
                fuses.burn_efuse({name: str(value) for name, value in burn.values})
    except FatalError as exc:
        raise SecureError(f"burning {burn.describe()} failed", "set the board aside: its eFuses may be partly "
                          "burned; the record says which", str(exc)) from None


@dataclass(frozen=True)
class EfuseState:
    """What the chip's eFuses say about flash encryption (espefuse's reading, not ours)."""

    crypt_cnt: int
    key_present: bool  # a flash-encryption key block is burned (its purpose, or ESP32's BLOCK1 protection)
    release_fields: dict[str, int]
    secure_boot: bool = False  # SECURE_BOOT_EN (ESP32: ABS_DONE_1)

    @property
    def encrypted(self) -> bool:
        return bin(self.crypt_cnt).count("1") % 2 == 1

    @property
    def release(self) -> bool:
        return bool(self.release_fields) and all(self.release_fields.values())


def read_state(fuses, chip: str) -> EfuseState:
    """Read, from the chip again, the eFuses that say whether, and how, the unit's flash is encrypted."""
    release = next((b for b in burn_plan(chip, "release") if b.name == "release"))
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
    except FatalError as exc:
        raise SecureError("the board's eFuses could not be read", "retry; replace the board if it repeats",
                          str(exc)) from None
    return EfuseState(int(cnt), bool(key), fields, boot)


def check_state(state: EfuseState, mode: str, secure_boot: bool = False) -> list[str]:
    """What differs between the eFuses read back and what the profile's mode burns (nothing: they match)."""
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
    if mode == "development" and any(state.release_fields.values()):
        problems.append("development mode, but release-mode eFuses are burned")
    return problems
