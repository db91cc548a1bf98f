"""Product profiles: what a unit of a product receives, and the checks made before any flash.

A profile is `profiles/<name>/profile.toml` plus its files: the chip, the firmware
(an ESP-IDF build's flasher_args.json or explicit regions, each with a pinned
SHA-256), the config partition and its schema (NVS namespace, keys, types, maximum
lengths and where each value comes from), secrets (never in the profile itself),
the serial-number scheme, the baud rate and the checks after flashing.

The file's tables are declared once, below, as frozen pydantic dataclasses (`ProfileFile`
and the tables it holds; `ConfigKey` and `Checks` are also what a `Profile` carries).
`load_profile` reports every problem of the file at once; `check_profile` then checks
what needs the firmware's bytes: hashes, images, the partition table, the flash layout,
the keys the firmware reads and the serial numbers the pattern gives.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import BeforeValidator, ConfigDict, Field, PlainValidator, field_validator, model_validator
from pydantic.dataclasses import dataclass as schema

from flashing.firmware import read_manifest
from flashing.images import (
    FLASH_SIZES,
    MAX_BOOTLOADER_SIZE,
    OTADATA_SIZE,
    PARTITION_TABLE_OFFSET,
    PARTITION_TABLE_SECTOR,
    SUPPORTED_CHIPS,
    ImageError,
    Partition,
    boot_partition,
    bootloader_flash_encryption,
    check_image_bytes,
    chip_facts,
    declared_table_offset,
    parse_partition_table,
)
from flashing.nvs import INT_TYPES, MAX_STRING, NvsEntry, NvsError, build_partition, validate_entry, validate_key

from .schema import (
    SCHEMA,
    ConfigError,
    FileName,
    Flag,
    Name,
    Offset,
    Problem,
    Seconds,
    Sha256,
    Text,
    describe,
    dotted,
    parse_toml,
    read_json,
    read_text,
    validate,
    whole_number,
)
from .secrets import MIN_SECRET_CHARS
from .serials import SerialPattern, SerialPatternError

__all__ = ["Problem", "ProfileError", "Profile", "Region", "ConfigKey", "SecretSource", "Checks",
           "load_profile", "check_profile", "resolve_secrets", "find_profile", "locate_profile",
           "examples_dir", "ProfileSource"]

DEVICE_CLASSES = ("wifi", "no-wifi", "other")
SMOKE_LEVELS = ("none", "healthcheck", "pair")
UNIT_SOURCES = ("serial", "device_id", "mac")
ENCRYPTIONS = ("none", "per-unit", "per-lot")
FLASH_ENCRYPTION = ("off", "development", "release")
FLASH_KEYS = ("station", "chip")  # who makes a unit's flash-encryption key
FLASH_ENCRYPTION_CHIPS = ("esp32", "esp32c3", "esp32s3")  # flashing/secure.py knows their eFuses
BAUDS = (115200, 230400, 460800, 921600, 1500000, 2000000)  # the rates esptool uses
CONNECTIONS = ("auto", "usb-serial-jtag", "uart-bridge")
USB_SERIAL_JTAG_CHIPS = ("esp32c3", "esp32s3")  # the chips with their own USB-Serial/JTAG controller
NVS_TYPES = ("string", *INT_TYPES)
# the 2Smart SDK's stored-config limits (it copies without bounds checks)
SDK_LIMITS = {"ssid": 32, "psk": 64, "password": 64, "email": 64, "token": 10, "host": 64,
              "brport": 5}
SECTOR = 0x1000  # esptool erases whole 4 KiB flash sectors before it writes
MAX_REGION_BYTES = 128 << 20  # larger than any ESP flash: not read at all
MANIFEST_SPAN = 8192  # the firmware manifest sits in the app's first bytes (as the device reads it)
TABLE_REGION = "partition-table"  # ESP-IDF's name for it: flasher_args.json's key, partition-table.bin's stem


class ProfileError(ConfigError):
    def __init__(self, problems: list[Problem]):
        super().__init__(problems)


# -- the file: profile.toml's tables ------------------------------------------------------

def _text_or_whole(value: object) -> str | int:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"expected text in quotes or a whole number, got {describe(value)}")


TextOrWhole = Annotated[str | int, PlainValidator(_text_or_whole)]
MaxLength = Annotated[int, Field(strict=True, ge=1, le=MAX_STRING - 1)]


@schema(frozen=True, config=SCHEMA)
class ConfigKey:
    """One [[config.keys]] entry: an NVS key and where its value comes from (exactly one source)."""

    key: Text
    """The NVS key the firmware reads (at most 15 bytes)."""
    type: Literal[NVS_TYPES] = "string"  # type: ignore[valid-type]
    """The NVS type of the value."""
    max_length: MaxLength | None = None
    """Longest value in bytes; required for strings (the 2Smart SDK's limits are checked)."""
    value: TextOrWhole | None = None
    """The same value for every unit (give exactly one of value, unit, secret)."""
    unit: Literal[UNIT_SOURCES] | None = None  # type: ignore[valid-type]
    """This unit's own value: its serial, its device id (the MAC with dashes) or its MAC."""
    secret: Name | None = None
    """The name of a [secrets.NAME] table the value is read from."""
    optional: Flag = False
    """The secret may be unset: the key is then left out."""

    @model_validator(mode="after")
    def _one_source(self) -> "ConfigKey":
        given = [s for s in ("value", "unit", "secret") if getattr(self, s) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of value, unit or secret (given: {', '.join(given) or 'none'})")
        return self


@schema(frozen=True, config=SCHEMA)
class Checks:
    """[checks]: what is checked after flashing."""

    boot: Flag = True
    """Reset the unit after flashing and read its boot log (the app must start)."""
    boot_timeout_s: Seconds = 5.0
    """How long the app may take to start."""
    boot_settle_s: Seconds = 0.5
    """How long the console is watched after the app started, for an early crash."""
    smoke: Literal[SMOKE_LEVELS] = "none"  # type: ignore[valid-type]
    """The smoke test after boot: none, the pairing server's /healthcheck, or pairing up to the broker login."""
    smoke_soak_s: Seconds = 1.0
    """How long the console is watched after the smoke checks, for a late crash."""

    @model_validator(mode="after")
    def _smoke_needs_boot(self) -> "Checks":
        if self.smoke != "none" and not self.boot:
            raise ValueError("smoke = \"" + self.smoke + "\" needs boot = true (the smoke test reads the "
                             "device's address from the boot log)")
        return self


@schema(frozen=True, config=SCHEMA)
class RegionEntry:
    """One entry of [firmware] regions."""

    offset: Offset
    """Where the file is written in flash."""
    file: FileName
    """The image, relative to the profile's folder."""
    sha256: Sha256
    """The file's pinned SHA-256: any other bytes are refused."""
    name: Name | None = None
    """What the region is called in messages and the record (default: the file's stem)."""


@schema(frozen=True, config=SCHEMA)
class FirmwareTable:
    """[firmware]: explicit regions, or an ESP-IDF build's flasher_args.json with a pin per file."""

    regions: tuple[RegionEntry, ...] | None = None
    """The images and their offsets (give either regions or flasher_args)."""
    flasher_args: FileName | None = None
    """An ESP-IDF build's flasher_args.json, relative to the profile's folder: its flash_files are written."""
    sha256: dict[Text, Sha256] = dataclasses.field(default_factory=dict)
    """With flasher_args: each file it names (as it names it) = its pinned SHA-256."""

    @model_validator(mode="after")
    def _one_kind(self) -> "FirmwareTable":
        if (self.regions is None) == (self.flasher_args is None):
            raise ValueError("give either regions or flasher_args (exactly one)")
        if self.regions == ():
            raise ValueError("regions is empty: no firmware to write")
        if self.regions is not None and self.sha256:
            raise ValueError("the sha256 table pins flasher_args' files; a region carries its own sha256")
        return self


@schema(frozen=True, config=SCHEMA)
class ConfigTable:
    """[config]: the NVS partition the station writes and its keys."""

    partition: Name | None = None
    """The data/nvs partition the station writes, by name (offset and size come from the partition table)."""
    namespace: Text = "2smart"
    """The NVS namespace of the keys."""
    keys: tuple[ConfigKey, ...] = ()
    """The keys written for each unit ([[config.keys]])."""
    encryption: Literal[ENCRYPTIONS] = "none"  # type: ignore[valid-type]
    """NVS encryption of the config: keys made per unit or per lot, written to the keys partition; needs [security] flash_encryption (the keys partition is flash-encrypted)."""
    keys_partition: Name = "nvs_keys"
    """With encryption: the data/nvs_keys partition."""


@schema(frozen=True, config=SCHEMA)
class SecurityTable:
    """[security]: flash encryption and Secure Boot v2, set up per unit by the station with eFuse burns that cannot be undone."""

    flash_encryption: Literal[FLASH_ENCRYPTION] = "off"  # type: ignore[valid-type]
    """off, development (the unit can be re-flashed: its key is escrowed in the record, encrypted) or release (the key is never stored; the ROM's plaintext download paths are disabled)."""
    secure_boot: Flag = False
    """Secure Boot v2: only firmware signed with the station's signing key (station.toml secure_boot_key, never in a profile) boots."""
    key: Literal[FLASH_KEYS] = "station"  # type: ignore[valid-type]
    """station (made on the station, burned by it; escrowed in development mode) or chip (generated by the chip itself on its first boot: its bootloader must be built with flash encryption; never leaves the chip, no escrow)."""


@schema(frozen=True, config=SCHEMA)
class SecretTable:
    """[secrets.NAME]: where a secret is read (never its value)."""

    env: Name | None = None
    """The environment variable holding the secret."""
    file: FileName | None = None
    """A file holding the secret, relative to the profile's folder."""
    store: Name | None = None
    """A name in the station's encrypted secrets file (`station secrets set NAME`)."""
    optional: Flag = False
    """The secret may be unset (its keys are then left out)."""

    @model_validator(mode="before")
    @classmethod
    def _no_values(cls, data: Any) -> Any:
        keys = data.kwargs or {} if hasattr(data, "kwargs") else data
        if isinstance(keys, dict) and "value" in keys:
            raise ValueError("secrets are never written into a profile: give env, file or store")
        return data

    @model_validator(mode="after")
    def _some_source(self) -> "SecretTable":
        if self.env is None and self.file is None and self.store is None:
            raise ValueError("give env, file or store: where the secret is read")
        return self


@schema(frozen=True, config=SCHEMA)
class SerialTable:
    """[serial]: a pattern with a counter (see station/serials.py), or serials given per unit."""

    pattern: Text | None = None
    """Serial numbers with a persistent counter, e.g. "RLY-{yymmdd}-{seq:05}" (default: the name's first three letters, then that)."""
    given: Flag = False
    """Serials come from labels (--serial, the scanner) instead of a pattern."""

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            SerialPattern.parse(pattern)  # SerialPatternError is a ValueError: reported on the key
        return pattern

    @model_validator(mode="after")
    def _pattern_or_given(self) -> "SerialTable":
        if self.given and self.pattern is not None:
            raise ValueError("give either pattern or given = true (serials from labels), not both")
        return self


@schema(frozen=True, config=SCHEMA)
class ProfileFile:
    """profile.toml: the top-level keys, then its tables."""

    chip: Literal[SUPPORTED_CHIPS]  # type: ignore[valid-type]
    """The chip the firmware is built for (esptool's --chip name)."""
    firmware: FirmwareTable
    """What is written to flash: [firmware]."""
    name: Name | None = None
    """The profile's name in the record (default: its folder's name)."""
    title: Text = ""
    """The product's name on the screen."""
    device_class: Literal[DEVICE_CLASSES] = "wifi"  # type: ignore[valid-type]
    """wifi and no-wifi devices get the config partition (no-wifi never gets Wi-Fi keys); other gets none."""
    product_id: Text = ""
    """The product's id in 2Smart Cloud, carried in the record."""
    lot: Text = ""
    """The default production lot."""
    baud: Annotated[Literal[BAUDS], BeforeValidator(whole_number)] = 921600  # type: ignore[valid-type]
    """The highest rate the station tries for flashing (it falls back to slower ones)."""
    connection: Literal[CONNECTIONS] = "auto"  # type: ignore[valid-type]
    """How units reach their port: auto (its USB VID:PID tells), usb-serial-jtag (the chip's own USB, esp32c3/esp32s3) or uart-bridge."""
    flash_size: Literal[tuple(FLASH_SIZES)] | None = None  # type: ignore[valid-type]
    """The module's flash (default: the size in the bootloader image's header); virtual boards get this size."""
    config: ConfigTable = dataclasses.field(default_factory=ConfigTable)
    """The NVS config partition and its keys: [config]."""
    secrets: dict[Text, SecretTable] = dataclasses.field(default_factory=dict)
    """Where each secret is read, one table per secret: [secrets.NAME] (never a value)."""
    serial: SerialTable = dataclasses.field(default_factory=SerialTable)
    """How units get serial numbers: [serial]."""
    checks: Checks = dataclasses.field(default_factory=Checks)
    """What is checked after flashing: [checks]."""
    security: SecurityTable = dataclasses.field(default_factory=SecurityTable)
    """Flash encryption and secure boot, burned per unit: [security]."""

    @model_validator(mode="after")
    def _native_usb_needs_the_controller(self) -> "ProfileFile":
        if self.connection == "usb-serial-jtag" and self.chip not in USB_SERIAL_JTAG_CHIPS:
            raise ValueError(f'connection = "usb-serial-jtag" is for {" and ".join(USB_SERIAL_JTAG_CHIPS)}: '
                             f"{self.chip} has no USB-Serial/JTAG controller")
        return self


def region_names(raw: dict) -> dict[int, str]:
    """Offsets a flasher_args.json names: its "bootloader": {"offset": "0x1000", ...} entries."""
    names: dict[int, str] = {}
    for key, entry in raw.items():
        if isinstance(entry, dict) and isinstance(entry.get("offset"), str):
            try:
                names[int(entry["offset"], 0)] = key
            except ValueError:
                pass
    return names


@schema(frozen=True, config=ConfigDict(extra="ignore"))  # ESP-IDF's file: its other keys are esptool's
class FlasherArgs:
    flash_files: Annotated[dict[Offset, FileName], Field(min_length=1)]


# -- the value: what the station works with -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Region:
    offset: int
    file: Path
    sha256: str
    name: str


@dataclasses.dataclass(frozen=True)
class SecretSource:
    name: str
    env: str | None
    file: Path | None
    optional: bool
    store: str | None = None  # a name in the station's encrypted secrets file


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    title: str
    path: Path  # the profile.toml
    chip: str
    device_class: str
    baud: int
    regions: tuple[Region, ...]
    config_partition: str | None
    namespace: str
    keys: tuple[ConfigKey, ...]
    secrets: tuple[SecretSource, ...]
    serial_pattern: str | None  # None: serials are given per unit
    checks: Checks
    content_hash: str
    product_id: str = ""
    lot: str = ""  # the default production lot
    encryption: str = "none"  # NVS encryption of the config: none | per-unit | per-lot
    keys_partition: str = "nvs_keys"
    partitions: tuple[Partition, ...] = dataclasses.field(default=())
    flash_size: str | None = None  # as declared; None: the bootloader header's
    connection: str = "auto"  # auto | usb-serial-jtag | uart-bridge
    origin: str = "path"  # where the name led: path, profiles_dir or packaged example
    flash_encryption: str = "off"  # off | development | release ([security])
    secure_boot: bool = False
    flash_key: str = "station"  # station | chip: who makes each unit's flash-encryption key ([security] key)
    partition_table_offset: int = PARTITION_TABLE_OFFSET  # where its region is written (see table_region)

    @property
    def dir(self) -> Path:
        return self.path.parent

    def region_bytes(self) -> list[tuple[Region, bytes]]:
        return [(r, r.file.read_bytes()) for r in self.regions]

    def config_slot(self) -> Partition | None:
        for p in self.partitions:
            if p.name == self.config_partition:
                return p
        return None

    def firmware_hashes(self) -> dict[str, str]:
        return {f"0x{r.offset:x}": r.sha256 for r in self.regions}

    def needed_flash(self) -> int:
        ends = [r.offset + r.file.stat().st_size for r in self.regions if r.file.exists()]
        ends += [p.offset + p.size for p in self.partitions]
        return max(ends, default=0)

    def board_flash_bytes(self) -> int:
        """A virtual board's flash for this profile: the declared flash_size, else what the layout reaches (4 MB at least)."""
        need = self.needed_flash()
        declared = int(self.flash_size.removesuffix("MB")) << 20 if self.flash_size else 0
        size = declared if declared >= need else max(4 << 20, need)
        return 1 << (size - 1).bit_length()

    def firmware_version(self) -> str | None:
        for r in self.regions:
            if r.name == "app":
                return _app_version(r.file, r.sha256)
        return None


@functools.lru_cache(maxsize=32)
def _app_version(path: Path, sha256: str) -> str | None:
    """The app description's version (cached: the screen asks on every refresh)."""
    try:
        info = check_image_bytes(path.read_bytes())
    except (OSError, ImageError):
        return None
    return info.app.version if info.app else None


def examples_dir() -> Path:
    """The example profiles shipped with the station: the checkout's profiles/, or the installed package's copy."""
    from .config import source_checkout

    root = source_checkout()
    return root / "profiles" if root is not None else Path(__file__).resolve().parent / "examples"


@dataclasses.dataclass(frozen=True)
class ProfileSource:
    """Where a profile name led: its profile.toml and which of the three places it came from."""

    path: Path
    origin: str  # "path", "profiles_dir" or "packaged example"


def locate_profile(name_or_path: str | Path, profiles_dir: Path) -> ProfileSource:
    """A profile by path, else by name under the configured profiles_dir, else among the packaged examples."""
    p = Path(name_or_path)
    if p.is_file():
        return ProfileSource(p, "path")
    if (p / "profile.toml").exists():
        return ProfileSource(p / "profile.toml", "path")
    candidate = profiles_dir / str(name_or_path) / "profile.toml"
    if candidate.exists():  # a folder or an unreadable file is named by the reader
        return ProfileSource(candidate, "profiles_dir")
    example = examples_dir() / str(name_or_path) / "profile.toml"
    if p.name == str(name_or_path) and example.is_file():  # a bare name, never a path into the package
        return ProfileSource(example, "packaged example")
    raise ProfileError([Problem(str(candidate), "profile", "not found: give a profile name "
                                f"under {profiles_dir} or a path to a profile.toml (`station profile list` "
                                "shows the profiles found)")])


def find_profile(name_or_path: str | Path, profiles_dir: Path) -> Path:
    return locate_profile(name_or_path, profiles_dir).path


def load_profile(name_or_path: str | Path, profiles_dir: Path = Path("profiles")) -> Profile:
    """Read and check a profile.toml; ProfileError lists every problem of the file at once."""
    found = locate_profile(name_or_path, profiles_dir)
    path = found.path
    try:
        text = read_text(path, "profile")
        spec, problems = validate(ProfileFile, parse_toml(text, path), str(path))
        if spec is None:
            raise ProfileError(problems)
        regions = _regions(spec.firmware, path)
    except ConfigError as exc:
        raise ProfileError(exc.problems or [Problem(str(path), "(file)", str(exc))]) from None
    content = hashlib.sha256(text.encode())
    for r in regions:
        content.update(r.sha256.encode())
    table = table_region(regions)
    name = spec.name or path.parent.name
    pattern = spec.serial.pattern
    if pattern is None and not spec.serial.given:
        prefix = name.upper()[:3].replace("{", "{{").replace("}", "}}")
        pattern = f"{prefix}-{{yymmdd}}-{{seq:05}}"
    return Profile(
        name=name, title=spec.title, path=path, chip=spec.chip, device_class=spec.device_class,
        baud=spec.baud, regions=regions, config_partition=spec.config.partition,
        namespace=spec.config.namespace, keys=spec.config.keys,
        secrets=tuple(SecretSource(n, s.env, path.parent / s.file if s.file else None, s.optional, s.store)
                      for n, s in spec.secrets.items()),
        serial_pattern=pattern, checks=spec.checks, content_hash=content.hexdigest(),
        product_id=spec.product_id, lot=spec.lot, encryption=spec.config.encryption,
        keys_partition=spec.config.keys_partition, partitions=_partitions(table),
        flash_size=spec.flash_size, origin=found.origin, connection=spec.connection,
        flash_encryption=spec.security.flash_encryption, secure_boot=spec.security.secure_boot,
        flash_key=spec.security.key,
        partition_table_offset=table.offset if table is not None else PARTITION_TABLE_OFFSET,
    )


def _regions(fw: FirmwareTable, path: Path) -> tuple[Region, ...]:
    """The regions to write: the profile's own, or those of the build's flasher_args.json."""
    if fw.regions is not None:
        return tuple(Region(r.offset, path.parent / r.file, r.sha256, r.name or Path(r.file).stem)
                     for r in fw.regions)
    fa_path = path.parent / str(fw.flasher_args)
    raw = read_json(fa_path, "flasher_args.json")
    args, problems = validate(FlasherArgs, raw, str(fa_path))
    if args is None:
        raise ConfigError(problems)
    names = region_names(raw)
    regions = []
    for offset, rel in args.flash_files.items():
        if rel not in fw.sha256:
            problems.append(Problem(str(path), dotted("firmware.sha256", (rel,)), "no SHA-256 pinned for "
                                    f"this file of {fa_path.name}"))
        regions.append(Region(offset, fa_path.parent / rel, fw.sha256.get(rel, ""),
                              names.get(offset, Path(rel).stem)))
    if problems:
        raise ConfigError(problems)
    return tuple(regions)


def table_region(regions: tuple[Region, ...]) -> Region | None:
    """The partition table's region: the one named partition-table (as ESP-IDF names it), else the one at 0x8000.

    Its offset is the build's CONFIG_PARTITION_TABLE_OFFSET: declared once, by where the file is written.
    """
    named = [r for r in regions if r.name == TABLE_REGION]
    if named:
        return named[0]
    return next((r for r in regions if r.offset == PARTITION_TABLE_OFFSET), None)


def _partitions(table: Region | None) -> tuple[Partition, ...]:
    if table is not None:
        try:
            if table.file.is_file() and table.file.stat().st_size <= MAX_REGION_BYTES:
                return tuple(parse_partition_table(table.file.read_bytes()))
        except (OSError, ImageError):
            pass
    return ()


def resolve_secrets(profile: Profile, env: Mapping[str, str] | None = None,
                    store_path: Path | None = None) -> tuple[dict[str, str], list[Problem]]:
    """Read every secret the profile names: environment, a file, or the encrypted store."""
    env = os.environ if env is None else env
    stored: dict[str, str] | None = None
    store_error = None
    if any(s.store for s in profile.secrets):
        from .secrets import PASSPHRASE_ENV, SecretStore, SecretStoreError

        try:
            stored = SecretStore(store_path or Path("var/secrets.enc"), env.get(PASSPHRASE_ENV, "")).load()
        except SecretStoreError as exc:
            store_error = str(exc)
    values: dict[str, str] = {}
    problems: list[Problem] = []
    f = str(profile.path)
    for s in profile.secrets:
        value = None
        if s.env and env.get(s.env):
            value = env[s.env]
        elif s.store:
            if stored is None:
                if not s.optional:
                    problems.append(Problem(f, f"secrets.{s.name}.store", store_error or "no secrets file"))
                continue
            value = stored.get(s.store)
            if value is None and not s.optional:
                problems.append(Problem(f, f"secrets.{s.name}.store", f"{s.store!r} is not in the secrets "
                                        f"file: station secrets set {s.store}"))
                continue
        elif s.file is not None:
            try:
                value = read_text(s.file, "secret file").strip()
            except ConfigError as exc:
                if not s.optional:
                    problems += [dataclasses.replace(p, field=f"secrets.{s.name}.file") for p in exc.problems]
                continue
        if value is None:
            if not s.optional:
                where = f"environment variable {s.env}" if s.env else "a file"
                problems.append(Problem(f, f"secrets.{s.name}", f"not set: put it in the {where}"))
            continue
        if len(value) < MIN_SECRET_CHARS:  # the redactor cannot hunt for it without eating ordinary words
            problems.append(Problem(f, f"secrets.{s.name}", f"{len(value)} characters: a secret needs at least "
                                    f"{MIN_SECRET_CHARS}, or it could not be kept out of the record and the screen"))
            continue
        values[s.name] = value
    return values, problems


def read_region(r: Region, pin_note: str = "") -> tuple[bytes | None, Problem | None]:
    """A firmware region's file, read once, and what is wrong with it (missing, too large, not its pin)."""
    where = f"firmware region 0x{r.offset:x}"
    try:
        if not r.file.is_file():
            raise FileNotFoundError(2, "no such file" if not r.file.exists() else "not a file")
        if r.file.stat().st_size > MAX_REGION_BYTES:
            return None, Problem(str(r.file), where, "larger than any ESP flash")
        data = r.file.read_bytes()
    except OSError as exc:
        return None, Problem(str(r.file), where, f"missing or unreadable ({exc.strerror or exc})")
    digest = hashlib.sha256(data).hexdigest()
    if digest != r.sha256.lower():
        return data, Problem(str(r.file), where, f"SHA-256 {digest} does not match the pinned "
                                                 f"{r.sha256 or '(none)'}{pin_note}")
    return data, None


def check_profile(profile: Profile, env: Mapping[str, str] | None = None,
                  store_path: Path | None = None, station_id: str | None = None,
                  station_keys: "StationKeys | None" = None) -> list[Problem]:
    """Everything that can be checked without a device (on station `station_id`). An empty list means ready.

    `station_keys`: the station's own key files, which a secure profile needs (escrow, signing).
    """
    problems: list[Problem] = []
    f = str(profile.path)
    chip = chip_facts(profile.chip)
    images: dict[int, bytes] = {}
    sizes: list[tuple[Region, int]] = []  # every region read (two at one offset are two regions)
    for r in profile.regions:
        data, problem = read_region(r)
        if problem is not None:
            problems.append(problem)
        if data is None:
            continue
        images[r.offset] = data
        sizes.append((r, len(data)))
    table_at, declared = profile.partition_table_offset, table_region(profile.regions) is not None
    table = images.get(table_at) if declared else None
    parts: list[Partition] = []
    if not declared:
        problems.append(Problem(f, "firmware", f"no partition table: no region named {TABLE_REGION!r} and none "
                                f"at 0x{PARTITION_TABLE_OFFSET:x} (ESP-IDF's default offset)"))
    elif table is not None:  # a missing or unpinned file is named above
        try:
            parts = parse_partition_table(table)
        except ImageError as exc:
            problems.append(Problem(f, f"firmware region 0x{table_at:x}", f"invalid partition table: {exc}"))
    bootloader_flash = None
    if chip.bootloader_offset in images:
        try:
            info = check_image_bytes(images[chip.bootloader_offset], chip.image_chip_id)
            bootloader_flash = info.flash_size_name if info.flash_size_name in FLASH_SIZES else None
        except ImageError as exc:
            problems.append(Problem(f, f"firmware region 0x{chip.bootloader_offset:x}",
                                    f"not a valid {chip.name} bootloader: {exc}"))
    else:
        problems.append(Problem(f, "firmware", f"no bootloader at 0x{chip.bootloader_offset:x} for {chip.name}"))
    for p in parts:
        data = images.get(p.offset)
        if data is None:
            continue
        if len(data) > p.size:
            problems.append(Problem(f, f"firmware region 0x{p.offset:x}",
                                    f"{len(data)} bytes do not fit partition {p.name!r} ({p.size} bytes)"))
        if p.type == 0:
            try:
                check_image_bytes(data, chip.image_chip_id)
            except ImageError as exc:
                problems.append(Problem(f, f"firmware region 0x{p.offset:x}",
                                        f"not a valid {chip.name} app image: {exc}"))
    # the app the bootloader starts: as the profile's own otadata selects it, when it ships one
    ota = next((p for p in parts if p.type == 1 and p.subtype == 0x00), None)
    otadata = images.get(ota.offset) if ota is not None else None
    app = boot_partition(parts, None if otadata is None else otadata.ljust(OTADATA_SIZE, b"\xff")) if parts else None
    if app is not None and app.offset not in images:
        problems.append(Problem(f, "firmware", "no app image for the partition the bootloader starts"))

    problems += _check_layout(profile, sizes, parts, bootloader_flash)
    boot_image = images.get(chip.bootloader_offset)
    if profile.flash_key == "chip" and boot_image is not None and profile.flash_encryption != "off":
        built = bootloader_flash_encryption(boot_image)
        if built != profile.flash_encryption:
            problems.append(Problem(f, "security.key", "a chip generates its own key only when its bootloader is "
                                    f"built with flash encryption in {profile.flash_encryption} mode; this "
                                    "bootloader is built " + (f"in {built} mode" if built else
                                    "without it (CONFIG_SECURE_FLASH_ENC_ENABLED)")))
    if table is not None:
        problems += _check_table_place(profile, chip.bootloader_offset, boot_image, parts)
    if profile.secure_boot and boot_image is not None:
        problems += _check_signed_bootloader(profile, chip.bootloader_offset, boot_image)
    if profile.device_class == "other":
        if profile.config_partition or profile.keys:
            problems.append(Problem(f, "config", "'other' devices get no config partition"))
    else:
        problems += _check_config(profile, parts)
        if app is not None and app.offset in images:
            problems += _check_firmware_reads(profile, read_manifest(images[app.offset][:MANIFEST_SPAN]))
    problems += _check_serial(profile, station_id)
    problems += _check_security(profile, station_keys)
    secrets, secret_problems = resolve_secrets(profile, env, store_path)
    problems += secret_problems
    for k in profile.keys:
        if k.secret and k.secret not in {s.name for s in profile.secrets}:
            problems.append(Problem(f, f"config key {k.key!r}", f"secret {k.secret!r} has no [secrets.{k.secret}]"))
        elif k.secret in secrets and k.max_length and len(secrets[k.secret].encode()) > k.max_length:
            problems.append(Problem(f, f"secrets.{k.secret}", f"{len(secrets[k.secret].encode())} bytes; "
                                    f"key {k.key!r} holds at most {k.max_length}"))
    return problems


def _check_table_place(profile: Profile, boot_at: int, boot_image: bytes | None,
                       parts: list[Partition]) -> list[Problem]:
    """The table sits where ESP-IDF allows (CONFIG_PARTITION_TABLE_OFFSET) and where the bootloader looks for it."""
    f, at = str(profile.path), profile.partition_table_offset
    where = f"firmware region 0x{at:x} ({TABLE_REGION})"
    problems = []
    if at % PARTITION_TABLE_SECTOR:
        problems.append(Problem(f, where, f"the partition table must start on a 4 KiB boundary "
                                f"(CONFIG_PARTITION_TABLE_OFFSET is a multiple of 0x1000), not 0x{at:x}"))
    if boot_image is not None and at < boot_at + len(boot_image):
        problems.append(Problem(f, where, f"the partition table must come after the bootloader "
                                f"(0x{boot_at:x}-0x{boot_at + len(boot_image) - 1:x})"))
    early = [p for p in parts if p.offset < at + PARTITION_TABLE_SECTOR]
    if early:
        problems.append(Problem(f, where, f"partition {early[0].name!r} starts at 0x{early[0].offset:x}, but "
                                f"with the table at 0x{at:x} the first partition starts at "
                                f"0x{at + PARTITION_TABLE_SECTOR:x} at the earliest (the table's own sector)"))
    if boot_image is not None:
        try:
            info = check_image_bytes(boot_image)
            first = info.segments[0]
            expects = declared_table_offset(boot_image[first[0]:first[0] + first[2]])
        except ImageError:
            expects = None  # `not a valid bootloader` is said above
        # only a generated bootloader says where it looks; a real one has it compiled in, unreadable here
        if expects is not None and expects != at:
            problems.append(Problem(f, where, f"the bootloader was built to read its partition table at "
                                    f"0x{expects:x}: the board would not find this one (rebuild with "
                                    f"CONFIG_PARTITION_TABLE_OFFSET=0x{at:x}, or write the table at 0x{expects:x})"))
    return problems


def _check_signed_bootloader(profile: Profile, boot_at: int, boot_image: bytes) -> list[Problem]:
    """A Secure Boot v2 bootloader, signature sector and all, fits before the table and in the ROM's buffer."""
    from flashing.secure import signed_size

    f, at = str(profile.path), profile.partition_table_offset
    problems = []
    end = boot_at + signed_size(len(boot_image))
    if end > at:  # the signature sector would overwrite the partition table
        problems.append(Problem(f, "security.secure_boot", f"the signed bootloader would end at 0x{end:x}, "
                                f"past the partition table at 0x{at:x}: move the partition table to "
                                f"0x{end:x} or later (ESP-IDF CONFIG_PARTITION_TABLE_OFFSET, its partitions "
                                "after it) or build a smaller bootloader"))
    limit = MAX_BOOTLOADER_SIZE.get(profile.chip)
    if limit is not None and len(boot_image) > limit:
        problems.append(Problem(f, "security.secure_boot", f"the bootloader is {len(boot_image)} bytes; with "
                                f"Secure Boot v2 the {profile.chip} ROM verifies at most {limit} "
                                "(ESP-IDF \"Bootloader Size\"): build a smaller bootloader"))
    return problems


@dataclasses.dataclass(frozen=True)
class StationKeys:
    """The station-side key files a secure profile needs: never inside profiles/."""

    station_key: Path | None = None  # the station's key: development mode escrows each unit's key under it
    secure_boot_key: Path | None = None  # the RSA-3072 signing key of Secure Boot v2


def _check_security(profile: Profile, keys: StationKeys | None) -> list[Problem]:
    """What [security] will burn is possible on this chip and this station."""
    f = str(profile.path)
    problems = []
    on = profile.flash_encryption != "off"
    if (on or profile.secure_boot) and profile.chip not in FLASH_ENCRYPTION_CHIPS:
        problems.append(Problem(f, "security", f"{profile.chip} is not a chip the station sets up flash "
                                f"encryption or secure boot on ({', '.join(FLASH_ENCRYPTION_CHIPS)})"))
    if profile.flash_key == "chip" and not on:
        problems.append(Problem(f, "security.key", "key = \"chip\" needs flash_encryption: the chip makes its key "
                                "when its bootloader enables flash encryption"))
    if profile.flash_key == "chip" and profile.secure_boot:
        problems.append(Problem(f, "security.key", "key = \"chip\" with secure_boot: the station burns secure boot "
                                "only together with a key it makes (use key = \"station\")"))
    if profile.flash_key == "chip" and on and not profile.checks.boot:
        problems.append(Problem(f, "security.key", "key = \"chip\" needs the boot check: the unit encrypts itself "
                                "on its first boot, and the station verifies it after that boot"))
    if profile.secure_boot and not on:
        problems.append(Problem(f, "security.secure_boot", "the station sets secure boot up together with flash "
                                "encryption: set flash_encryption too"))
    if profile.secure_boot:
        key = keys.secure_boot_key if keys else None
        if key is None or not key.is_file():
            problems.append(Problem(f, "security.secure_boot", "secure boot needs the station's signing key: "
                                    "station.toml secure_boot_key names no readable file"
                                    + (f" ({key})" if key else "")))
        elif (why := _not_a_signing_key(key)) is not None:
            problems.append(Problem(f, "security.secure_boot", f"station.toml secure_boot_key {key}: {why}"))
    if profile.flash_encryption == "development" and keys is not None and keys.station_key is not None and \
            not _can_hold(keys.station_key):
        problems.append(Problem(f, "security.flash_encryption", "development mode escrows each unit's key "
                                f"under the station's key, and this station has none and cannot make one "
                                f"({keys.station_key}: not writable); fix station.toml key_file"))
    return problems


def _can_hold(key_file: Path) -> bool:
    """The station's key is there, or can be made on first use (its nearest existing folder is writable)."""
    if key_file.is_file():
        return os.access(key_file, os.R_OK)
    folder = key_file.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def _not_a_signing_key(path: Path) -> str | None:
    """Why the file is not a Secure Boot v2 RSA-3072 private key (None: it is one)."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        return f"not a readable PEM private key ({type(exc).__name__})"
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != 3072:
        return "Secure Boot v2 signs with an RSA-3072 key (espsecure generate-signing-key --version 2 --scheme rsa3072)"
    return None


def security_summary(profile: Profile) -> list[str]:
    """What `profile check` says will be burned on every unit, in words (nothing: no [security])."""
    if profile.flash_encryption == "off":
        return []
    from flashing.secure import burn_plan

    if profile.flash_key == "chip":
        return [f"flash encryption ({profile.flash_encryption} mode): each unit's key is generated by the chip "
                "itself on its first boot (its bootloader is built with flash encryption) and never leaves it: "
                "no escrow is possible. The station burns nothing; on that boot the chip's bootloader burns, "
                "and they can never be undone:",
                "  a key block (read- and write-protected) and the crypt count, with ESP-IDF's "
                f"{profile.flash_encryption}-mode security eFuses (flash_encryption_secure_features.c)",
                "  the station verifies them after that boot: the eFuses and the flash read back over esptool",
                "  a development unit is re-flashed with esptool --encrypt (the chip encrypts with its own key)"
                if profile.flash_encryption == "development" else
                "  the unit can never be re-flashed: the ROM's encrypted download is disabled and no one holds the key"]
    lines = [f"flash encryption ({profile.flash_encryption} mode): each unit gets its own key, made on the "
             "station; these eFuses are burned and can never be undone:"]
    lines += [f"  {b.describe()}" for b in burn_plan(profile.chip, profile.flash_encryption, profile.secure_boot)]
    if profile.secure_boot:
        lines.append("  the bootloader and app are signed with the station's secure_boot_key (RSA-PSS): only "
                     "firmware signed with it ever boots on these units")
    lines.append("  the key is escrowed in the record, encrypted (the unit can be re-flashed)"
                 if profile.flash_encryption == "development" else
                 "  the key is never stored: the unit can never be re-flashed")
    return lines


def _written(profile: Profile, sizes: list[tuple[Region, int]], parts: list[Partition]) -> list[tuple[str, int, int]]:
    """What the station writes to a unit's flash: (what, start, end) of each region and partition."""
    spans = [(f"firmware region 0x{r.offset:x} ({r.name})", r.offset, r.offset + n) for r, n in sizes]
    if profile.device_class != "other":
        wanted = [("config partition", profile.config_partition)]
        if profile.encryption != "none":
            wanted.append(("keys partition", profile.keys_partition))
        for what, name in wanted:
            p = next((p for p in parts if p.name == name), None)
            if p is not None:
                spans.append((f"{what} {p.name!r}", p.offset, p.offset + p.size))
    return sorted(spans, key=lambda s: s[1])


def _check_layout(profile: Profile, sizes: list[tuple[Region, int]], parts: list[Partition],
                  bootloader_flash: str | None) -> list[Problem]:
    """Nothing the station writes overlaps (to the 4 KiB sector esptool erases) or ends past the flash."""
    f = str(profile.path)
    problems = []
    spans = _written(profile, sizes, parts)
    for i, (what, start, end) in enumerate(spans):
        for other, o_start, o_end in spans[i + 1:]:
            if o_start < end:
                problems.append(Problem(f, "firmware", f"{what} (0x{start:x}-0x{end - 1:x}) overlaps {other} "
                                        f"(0x{o_start:x}-0x{o_end - 1:x})"))
            elif o_start // SECTOR * SECTOR < end and (end - 1) // SECTOR == o_start // SECTOR:
                problems.append(Problem(f, "firmware", f"{what} (ends 0x{end - 1:x}) and {other} (starts "
                                        f"0x{o_start:x}) share the flash sector at 0x{o_start // SECTOR * SECTOR:x}: "
                                        "esptool erases whole 4 KiB sectors, so writing one erases the other"))
    if profile.flash_size and bootloader_flash and profile.flash_size != bootloader_flash:
        problems.append(Problem(f, "flash_size", f"{profile.flash_size} declared, but the bootloader is built "
                                f"for {bootloader_flash} flash"))
    size_name = profile.flash_size or bootloader_flash
    if size_name:
        size = int(size_name.removesuffix("MB")) << 20
        source = "flash_size" if profile.flash_size else "the bootloader header's flash size"
        for what, start, end in spans:
            if end > size:
                problems.append(Problem(f, "firmware", f"{what} ends at 0x{end:x}, past the end of the "
                                        f"{size_name} flash (0x{size:x}, {source})"))
    return problems


def _check_firmware_reads(profile: Profile, manifest: object) -> list[Problem]:
    """The config matches what the firmware says it reads (a 2Smart firmware refuses unknown keys)."""
    f = str(profile.path)
    cfg = manifest.get("config") if isinstance(manifest, dict) else None
    if not isinstance(cfg, dict):
        return []  # the firmware declares nothing: nothing to compare
    problems = []
    for key, mine in (("partition", profile.config_partition), ("namespace", profile.namespace)):
        theirs = cfg.get(key)
        if isinstance(theirs, str) and mine and theirs != mine:
            problems.append(Problem(f, f"config.{key}", f"{mine!r}, but the firmware reads its config from "
                                    f"{key} {theirs!r}"))
    reads = cfg.get("keys")
    if isinstance(reads, list) and all(isinstance(k, str) for k in reads):
        for i, k in enumerate(profile.keys):
            if k.key not in reads:
                problems.append(Problem(f, f"config.keys[{i}] ({k.key})", f"the firmware does not read "
                                        f"{k.key!r} and refuses unknown keys; it reads {', '.join(reads)}"))
    return problems


def _check_serial(profile: Profile, station_id: str | None) -> list[Problem]:
    """The longest serial the pattern gives (with this station's id) fits the config key that carries it."""
    if not profile.serial_pattern:
        return []
    f = str(profile.path)
    try:
        pattern = SerialPattern.parse(profile.serial_pattern)
        longest = pattern.longest(station_id)
    except SerialPatternError as exc:
        return [Problem(f, "serial.pattern", str(exc))]
    n = len(longest.encode())
    # a station id has no fixed width: the serial is checked on the station that runs it, and named
    on, fix = ((f" on station {station_id!r}, station.toml station_id, {len(station_id.encode())} bytes",
                ": shorten the station id or the pattern") if pattern.uses_station else ("", ""))
    return [Problem(f, "serial.pattern", f"gives serials up to {n} bytes ({longest!r} at the counter's maximum "
                    f"{pattern.max_seq}{on}); config.keys[{i}] ({k.key}) holds at most {k.max_length}{fix}")
            for i, k in enumerate(profile.keys) if k.unit == "serial" and k.max_length and n > k.max_length]


def _check_config(profile: Profile, parts: list[Partition]) -> list[Problem]:
    f = str(profile.path)
    problems: list[Problem] = []
    slot = next((p for p in parts if p.name == profile.config_partition), None)
    if not profile.config_partition:
        problems.append(Problem(f, "config.partition", "name the partition that receives the config"))
    elif parts and slot is None:
        problems.append(Problem(f, "config.partition", f"no partition {profile.config_partition!r} in the "
                                f"partition table ({', '.join(p.name for p in parts)})"))
    elif slot is not None and (slot.type, slot.subtype) != (1, 2):
        problems.append(Problem(f, "config.partition", f"{slot.name!r} is {slot.type_name}/{slot.subtype_name}, "
                                "not data/nvs"))
    if profile.encryption != "none" and profile.flash_encryption == "off":
        # the keys would sit in plaintext next to what they protect: not encryption, only its look
        problems.append(Problem(f, "config.encryption", f"{profile.encryption!r} needs [security] "
                                "flash_encryption: without it the nvs_keys partition is written in plaintext "
                                "beside the config it protects; set flash_encryption = \"development\" or "
                                "\"release\", or encryption = \"none\""))
    if profile.flash_encryption != "off" and profile.encryption == "none" and profile.keys:
        # ESP-IDF never flash-encrypts an NVS partition: its secrets are protected by NVS encryption
        problems.append(Problem(f, "config.encryption", "flash encryption does not cover the config: NVS "
                                "partitions are never flash-encrypted (ESP-IDF), so the token would still be "
                                "read back in plaintext; set encryption = \"per-unit\" or \"per-lot\" (its "
                                "keys partition is flash-encrypted)"))
    if profile.encryption != "none" and parts:
        kslot = next((p for p in parts if p.name == profile.keys_partition), None)
        if kslot is None or (kslot.type, kslot.subtype) != (1, 4):
            problems.append(Problem(f, "config.keys_partition", f"NVS encryption needs a data/nvs_keys "
                                    f"partition named {profile.keys_partition!r} in the partition table"))
    try:
        validate_key(profile.namespace, "namespace")
    except NvsError as exc:
        problems.append(Problem(f, "config.namespace", str(exc)))
    trial: list[NvsEntry] = []
    for i, k in enumerate(profile.keys):
        where = f"config.keys[{i}] ({k.key})"
        if profile.device_class == "no-wifi" and k.key in ("ssid", "psk", "sta.ssid", "sta.pswd"):
            problems.append(Problem(f, where, "No-Wi-Fi devices never get Wi-Fi keys"))
        limit = SDK_LIMITS.get(k.key)
        if k.type == "string":
            if k.max_length is None:
                problems.append(Problem(f, where, "a string key needs max_length"))
            elif limit and k.max_length > limit:
                problems.append(Problem(f, where, f"max_length {k.max_length} exceeds the 2Smart SDK's "
                                        f"{limit} for {k.key!r}"))
            if isinstance(k.value, str) and k.max_length and len(k.value.encode()) > k.max_length:
                problems.append(Problem(f, where, f"value is {len(k.value.encode())} bytes; max_length "
                                        f"is {k.max_length}"))
            sample: str | int = "x" * (k.max_length or 1)
        else:
            sample = k.value if isinstance(k.value, int) else 0
        try:
            e = NvsEntry(k.key, k.type, sample)
            validate_entry(e)
            if k.value is not None:
                validate_entry(NvsEntry(k.key, k.type, k.value))
            trial.append(e)
        except NvsError as exc:
            problems.append(Problem(f, where, str(exc)))
    if slot is not None and not problems:
        try:
            build_partition(profile.namespace, trial, slot.size)
        except NvsError as exc:
            problems.append(Problem(f, "config", f"at full length the config does not fit "
                                    f"partition {slot.name!r}: {exc}"))
    return problems
