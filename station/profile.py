"""Product profiles: what a unit of a product receives, and the checks made before any flash.

A profile is `profiles/<name>/profile.toml` plus its files: the chip, the firmware
(an ESP-IDF build's flasher_args.json or explicit regions, each with a pinned
SHA-256), the config partition and its schema (NVS namespace, keys, types, maximum
lengths and where each value comes from), secrets (never in the profile itself),
the serial-number scheme, the baud rate and the checks after flashing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from flashing.images import (
    SUPPORTED_CHIPS,
    ImageError,
    Partition,
    boot_partition,
    check_image_bytes,
    chip_facts,
    parse_partition_table,
)
from flashing.nvs import NvsEntry, NvsError, build_partition, validate_entry, validate_key

from .config import ConfigError, take

DEVICE_CLASSES = ("wifi", "no-wifi", "other")
SMOKE_LEVELS = ("none", "healthcheck", "pair")
UNIT_SOURCES = ("serial", "device_id", "mac")
# the 2Smart SDK's stored-config limits (it copies without bounds checks)
SDK_LIMITS = {"ssid": 32, "psk": 64, "password": 64, "email": 64, "token": 10, "host": 64,
              "brport": 5}


@dataclass(frozen=True)
class Problem:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


class ProfileError(ConfigError):
    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Region:
    offset: int
    file: Path
    sha256: str
    name: str


@dataclass(frozen=True)
class ConfigKey:
    key: str
    type: str
    max_length: int | None
    value: str | int | None = None
    unit: str | None = None
    secret: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class SecretSource:
    name: str
    env: str | None
    file: Path | None
    optional: bool
    store: str | None = None  # a name in the station's encrypted secrets file


@dataclass(frozen=True)
class Checks:
    boot: bool = True
    boot_timeout_s: float = 5.0
    boot_settle_s: float = 0.5
    smoke: str = "none"
    smoke_soak_s: float = 1.0  # console watched after the smoke checks for a late crash


@dataclass(frozen=True)
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
    partitions: tuple[Partition, ...] = field(default=())

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


def _int(v: Any) -> int:
    return int(v, 0) if isinstance(v, str) else int(v)


def find_profile(name_or_path: str | Path, profiles_dir: Path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    if (p / "profile.toml").is_file():
        return p / "profile.toml"
    candidate = profiles_dir / str(name_or_path) / "profile.toml"
    if candidate.is_file():
        return candidate
    raise ProfileError([Problem(str(candidate), "profile", "not found: give a profile name "
                                f"under {profiles_dir} or a path to a profile.toml")])


def load_profile(name_or_path: str | Path, profiles_dir: Path = Path("profiles")) -> Profile:
    """Parse a profile; raises ProfileError listing every structural problem."""
    path = find_profile(name_or_path, profiles_dir)
    f = str(path)
    problems: list[Problem] = []
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError([Problem(f, "toml", str(exc))]) from None

    def bad(fieldname: str, msg: str) -> None:
        problems.append(Problem(f, fieldname, msg))

    try:
        take(data, {"name", "title", "chip", "device_class", "baud", "product_id", "firmware",
                    "config", "secrets", "serial", "checks", "lot"}, f)
    except ConfigError as exc:
        bad("(top level)", str(exc).split(": ", 1)[1])
    chip = str(data.get("chip", ""))
    if chip not in SUPPORTED_CHIPS:
        bad("chip", f"{chip!r} is not one of {', '.join(SUPPORTED_CHIPS)}")
    device_class = str(data.get("device_class", "wifi"))
    if device_class not in DEVICE_CLASSES:
        bad("device_class", f"{device_class!r} is not one of {', '.join(DEVICE_CLASSES)}")
    baud = data.get("baud", 921600)
    if baud not in (115200, 230400, 460800, 921600, 1500000, 2000000):
        bad("baud", f"{baud} is not a rate esptool uses (115200 … 2000000)")

    regions: list[Region] = []
    fw = data.get("firmware", {})
    try:
        take(fw, {"regions", "flasher_args", "sha256"}, f"{f} [firmware]")
    except ConfigError as exc:
        bad("firmware", str(exc).split(": ", 1)[-1])
    if "flasher_args" in fw:
        fa_path = path.parent / fw["flasher_args"]
        pins = fw.get("sha256", {})
        try:
            fa = json.loads(fa_path.read_text())
            names = {v.get("offset"): k for k, v in fa.items() if isinstance(v, dict) and "offset" in v}
            for off, rel in fa["flash_files"].items():
                name = names.get(off, Path(rel).stem)
                if rel not in pins:
                    bad(f"firmware.sha256.\"{rel}\"", "no SHA-256 pinned for this file")
                regions.append(Region(_int(off), fa_path.parent / rel, str(pins.get(rel, "")), name))
        except (OSError, ValueError, KeyError) as exc:
            bad("firmware.flasher_args", f"cannot read {fa_path}: {exc}")
    else:
        for i, r in enumerate(fw.get("regions", [])):
            try:
                take(r, {"offset", "file", "sha256", "name"}, "")
                regions.append(Region(_int(r["offset"]), path.parent / r["file"], str(r.get("sha256", "")),
                                      str(r.get("name", Path(r["file"]).stem))))
                if not r.get("sha256"):
                    bad(f"firmware.regions[{i}].sha256", "no SHA-256 pinned for this file")
            except (KeyError, ValueError, ConfigError) as exc:
                bad(f"firmware.regions[{i}]", f"needs offset, file and sha256 ({exc})")
    if not regions:
        bad("firmware", "no firmware: give flasher_args or regions")

    cfg = data.get("config", {})
    keys: list[ConfigKey] = []
    try:
        take(cfg, {"partition", "namespace", "keys", "encryption", "keys_partition"}, "")
    except ConfigError as exc:
        bad("config", str(exc).lstrip(": "))
    for i, k in enumerate(cfg.get("keys", [])):
        where = f"config.keys[{i}]"
        try:
            take(k, {"key", "type", "max_length", "value", "unit", "secret", "optional"}, "")
        except ConfigError as exc:
            bad(where, str(exc).lstrip(": "))
            continue
        sources = [s for s in ("value", "unit", "secret") if s in k]
        if len(sources) != 1:
            bad(where, "give exactly one of value, unit or secret")
            continue
        if "unit" in k and k["unit"] not in UNIT_SOURCES:
            bad(f"{where}.unit", f"{k['unit']!r} is not one of {', '.join(UNIT_SOURCES)}")
        keys.append(ConfigKey(str(k.get("key", "")), str(k.get("type", "string")),
                              k.get("max_length"), k.get("value"), k.get("unit"), k.get("secret"),
                              bool(k.get("optional", False))))
    secrets: list[SecretSource] = []
    for name, s in data.get("secrets", {}).items():
        if not isinstance(s, dict):
            bad(f"secrets.{name}", "must be a table with env or file")
            continue
        try:
            take(s, {"env", "file", "optional", "store"}, "")
        except ConfigError as exc:
            bad(f"secrets.{name}", str(exc).lstrip(": "))
        if "value" in s:
            bad(f"secrets.{name}", "secrets are never written into a profile")
        secrets.append(SecretSource(name, s.get("env"), path.parent / s["file"] if "file" in s else None,
                                    bool(s.get("optional", False)), s.get("store")))
    serial = data.get("serial", {})
    pattern = serial.get("pattern")
    if pattern is None and not serial.get("given", False):
        pattern = f"{data.get('name', 'UNIT').upper()[:3]}-{{yymmdd}}-{{seq:05}}"
    chk = data.get("checks", {})
    try:
        take(chk, {"boot", "boot_timeout_s", "boot_settle_s", "smoke", "smoke_soak_s"}, "")
    except ConfigError as exc:
        bad("checks", str(exc).lstrip(": "))
    checks = Checks(bool(chk.get("boot", True)), float(chk.get("boot_timeout_s", 5.0)),
                    float(chk.get("boot_settle_s", 0.5)), str(chk.get("smoke", "none")),
                    float(chk.get("smoke_soak_s", 1.0)))
    if checks.smoke not in SMOKE_LEVELS:
        bad("checks.smoke", f"{checks.smoke!r} is not one of {', '.join(SMOKE_LEVELS)}")
    elif checks.smoke != "none" and not checks.boot:
        bad("checks.smoke", "the smoke test needs the boot check (it reads the device's address there)")
    if problems:
        raise ProfileError(problems)

    content = hashlib.sha256(raw)
    for r in regions:
        content.update(r.sha256.encode())
    partitions: tuple[Partition, ...] = ()
    for r in regions:
        if r.offset == 0x8000 and r.file.exists():
            try:
                partitions = tuple(parse_partition_table(r.file.read_bytes()))
            except ImageError:
                pass
    return Profile(
        name=str(data.get("name", path.parent.name)), title=str(data.get("title", "")), path=path,
        chip=chip, device_class=device_class, baud=baud, regions=tuple(regions),
        config_partition=cfg.get("partition"), namespace=str(cfg.get("namespace", "2smart")),
        keys=tuple(keys), secrets=tuple(secrets), serial_pattern=pattern, checks=checks,
        content_hash=content.hexdigest(), product_id=str(data.get("product_id", "")),
        lot=str(data.get("lot", "")),
        encryption=str(cfg.get("encryption", "none")),
        keys_partition=str(cfg.get("keys_partition", "nvs_keys")),
        partitions=partitions,
    )


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
                value = s.file.read_text().strip()
            except OSError as exc:
                if not s.optional:
                    problems.append(Problem(str(s.file), f"secrets.{s.name}.file", f"cannot read: {exc.strerror}"))
                continue
        if value is None:
            if not s.optional:
                where = f"environment variable {s.env}" if s.env else "a file"
                problems.append(Problem(f, f"secrets.{s.name}", f"not set: put it in the {where}"))
            continue
        values[s.name] = value
    return values, problems


def check_profile(profile: Profile, env: Mapping[str, str] | None = None,
                  store_path: Path | None = None) -> list[Problem]:
    """Everything that can be checked without a device. An empty list means ready."""
    problems: list[Problem] = []
    f = str(profile.path)
    chip = chip_facts(profile.chip)
    images: dict[int, bytes] = {}
    for i, r in enumerate(profile.regions):
        where = f"firmware region 0x{r.offset:x}"
        try:
            data = r.file.read_bytes()
        except OSError as exc:
            problems.append(Problem(str(r.file), where, f"missing or unreadable ({exc.strerror})"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != r.sha256.lower():
            problems.append(Problem(str(r.file), where, f"SHA-256 {digest} does not match the pinned "
                                    f"{r.sha256 or '(none)'}"))
        images[r.offset] = data
    table = images.get(0x8000)
    parts: list[Partition] = []
    if table is None:
        problems.append(Problem(f, "firmware", "no partition table at 0x8000"))
    else:
        try:
            parts = parse_partition_table(table)
        except ImageError as exc:
            problems.append(Problem(f, "firmware region 0x8000", f"invalid partition table: {exc}"))
    if chip.bootloader_offset in images:
        try:
            check_image_bytes(images[chip.bootloader_offset], chip.image_chip_id)
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
    if parts and boot_partition(parts) is not None and boot_partition(parts).offset not in images:
        problems.append(Problem(f, "firmware", "no app image for the partition the bootloader starts"))

    if profile.device_class == "other":
        if profile.config_partition or profile.keys:
            problems.append(Problem(f, "config", "'other' devices get no config partition"))
    else:
        problems += _check_config(profile, parts)
    secrets, secret_problems = resolve_secrets(profile, env, store_path)
    problems += secret_problems
    for k in profile.keys:
        if k.secret and k.secret not in {s.name for s in profile.secrets}:
            problems.append(Problem(f, f"config key {k.key!r}", f"secret {k.secret!r} has no [secrets.{k.secret}]"))
        elif k.secret in secrets and k.max_length and len(secrets[k.secret].encode()) > k.max_length:
            problems.append(Problem(f, f"secrets.{k.secret}", f"{len(secrets[k.secret].encode())} bytes; "
                                    f"key {k.key!r} holds at most {k.max_length}"))
    return problems


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
    if profile.encryption not in ("none", "per-unit", "per-lot"):
        problems.append(Problem(f, "config.encryption", f"{profile.encryption!r} is not none, per-unit or per-lot"))
    elif profile.encryption != "none" and parts:
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
