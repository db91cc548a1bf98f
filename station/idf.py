"""A new product profile from an ESP-IDF build folder (`station profile new NAME --from-idf BUILD`).

`read_build` reads what `idf.py build` leaves: flasher_args.json (the files and their
offsets, the chip, the flash settings) and, where present, project_description.json
(the target, the project's name and version); the partition table comes from the build's
own image. `propose_config_partition` picks where the station writes each unit's
config, and refuses the app's own `nvs` unless asked knowingly. `write_profile` copies
the images into the new profile's folder (self-contained: a rebuild cannot change what
is flashed), pins their SHA-256 and writes a commented profile.toml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from flashing.firmware import read_manifest
from flashing.images import FLASH_SIZES, SUPPORTED_CHIPS, ImageError, Partition, check_image_bytes, parse_partition_table

from .schema import ConfigError, Problem, read_json, validate

__all__ = ["IdfBuild", "BuildFile", "read_build", "propose_config_partition", "write_profile", "APP_NVS",
           "NAME_PATTERN"]

APP_NVS = "nvs"  # the partition ESP-IDF's nvs_flash_init() opens: the app's own settings
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_IMAGE_BYTES = 128 << 20  # larger than any ESP flash


@dataclasses.dataclass(frozen=True)
class BuildFile:
    offset: int
    rel: str  # as flasher_args.json names it
    name: str  # bootloader, partition-table, app, ... (flasher_args.json's key), else the file's stem
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def target(self) -> str:
        """Where the copy goes in the profile's folder: firmware/ plus the build's own relative path."""
        p = PurePosixPath(self.rel.replace("\\", "/"))
        safe = not p.is_absolute() and ".." not in p.parts and p.parts
        return str(PurePosixPath("firmware", *(p.parts if safe else (p.name,))))


@dataclasses.dataclass(frozen=True)
class IdfBuild:
    dir: Path
    flasher_args: Path
    chip: str
    chip_from: str  # which file or option said so
    flash_size: str | None  # None: flasher_args.json gave none of FLASH_SIZES (the bootloader's header decides)
    files: tuple[BuildFile, ...]
    partitions: tuple[Partition, ...]
    project: str | None
    version: str | None
    declared_partition: str | None = None  # where a 2Smart firmware's manifest says it reads its config


def _table(raw: dict, key: str) -> dict:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _build_dir(path: Path) -> Path:
    """The build folder, given the folder itself or one of its JSON files."""
    return path.parent if path.is_file() and path.suffix == ".json" else path


def read_build(path: Path, chip: str | None = None) -> IdfBuild:
    """Read an ESP-IDF build folder; ConfigError names every problem (file, key, what is wrong)."""
    from .profile import FlasherArgs, region_names  # the same reader a profile's flasher_args key goes through

    build = _build_dir(path)
    fa_path = build / "flasher_args.json"
    if not fa_path.is_file():
        raise ConfigError([Problem(str(fa_path), "(file)", "not found: give an ESP-IDF build folder (the one "
                                   "`idf.py build` fills, holding flasher_args.json)")])
    raw = read_json(fa_path, "flasher_args.json")
    args, problems = validate(FlasherArgs, raw, str(fa_path))
    if args is None:
        raise ConfigError(problems)
    desc_path = build / "project_description.json"
    desc = read_json(desc_path, "project_description.json") if desc_path.is_file() else {}
    desc = desc if isinstance(desc, dict) else {}

    declared = [(v, f"{fa_path.name} extra_esptool_args.chip") for v in
                [_table(raw, "extra_esptool_args").get("chip")] if isinstance(v, str)]
    declared += [(v, f"{desc_path.name} target") for v in [desc.get("target")] if isinstance(v, str)]
    if chip is not None:
        wrong = [f"{where} says {v!r}" for v, where in declared if v != chip]
        if wrong:
            raise ConfigError([Problem(str(build), "--chip", f"{chip!r}, but {'; '.join(wrong)}: the images are "
                                       "built for that chip (leave --chip out, or rebuild for the chip you want)")])
        chosen, chip_from = chip, "--chip"
    elif declared:
        chosen, chip_from = declared[0]
    else:
        raise ConfigError([Problem(str(fa_path), "extra_esptool_args.chip", "the build does not say its chip: "
                                   f"give --chip ({', '.join(SUPPORTED_CHIPS)})")])
    if chosen not in SUPPORTED_CHIPS:
        raise ConfigError([Problem(str(build), chip_from, f"{chosen!r} is not a chip the station supports "
                                   f"({', '.join(SUPPORTED_CHIPS)})")])

    names = region_names(raw)
    files, problems = [], []
    for offset, rel in sorted(args.flash_files.items()):
        f = build / rel
        try:
            if not f.is_file():  # a folder, or a FIFO that would never end
                raise FileNotFoundError(2, "no such file" if not f.exists() else "not a file")
            if f.stat().st_size > MAX_IMAGE_BYTES:
                problems.append(Problem(str(f), f"flash_files.0x{offset:x}", "larger than any ESP flash"))
                continue
            files.append(BuildFile(offset, rel, names.get(offset, PurePosixPath(rel).stem), f.read_bytes()))
        except OSError as exc:
            problems.append(Problem(str(f), f"flash_files.0x{offset:x}",
                                    f"missing or unreadable ({exc.strerror or exc}): is the build complete?"))
    targets = [b.target for b in files]
    problems += [Problem(str(fa_path), "flash_files", f"two files would be copied to {t}")
                 for t in sorted({t for t in targets if targets.count(t) > 1})]
    if problems:
        raise ConfigError(problems)

    table = _table_file(files)
    if table is None:
        raise ConfigError([Problem(str(fa_path), "flash_files", "no partition table (no \"partition-table\" entry "
                                   "and no file at 0x8000): the station finds the config partition there")])
    try:
        parts = tuple(parse_partition_table(table.data))
    except ImageError as exc:
        raise ConfigError([Problem(str(build / table.rel), "partition table", str(exc))]) from None

    size = _table(raw, "flash_settings").get("flash_size")
    project, version = desc.get("project_name"), desc.get("project_version")
    app = next((b for b in files if b.name == "app"), None)
    if app is not None and not (isinstance(project, str) and isinstance(version, str)):
        try:
            info = check_image_bytes(app.data).app
            project, version = (info.project_name, info.version) if info else (project, version)
        except ImageError:
            pass  # `profile check` names what is wrong with the image
    manifest = read_manifest(app.data[:8192]) if app is not None else None  # as profile check reads it
    declared = ((manifest or {}).get("config") or {}).get("partition") if isinstance(manifest, dict) else None
    return IdfBuild(build, fa_path, chosen, chip_from, size if size in FLASH_SIZES else None, tuple(files),
                    parts, project if isinstance(project, str) else None,
                    version if isinstance(version, str) else None,
                    declared if isinstance(declared, str) else None)


def _table_file(files) -> BuildFile | None:
    """The partition table: flasher_args.json's "partition-table" entry (at CONFIG_PARTITION_TABLE_OFFSET), else 0x8000."""
    return next((b for b in files if b.name == "partition-table"), None) or \
        next((b for b in files if b.offset == 0x8000), None)


def _kb(n: int) -> str:
    return f"{n // 1024} KB" if n < 1 << 20 else f"{n / (1 << 20):g} MB"


def propose_config_partition(build: IdfBuild, requested: str | None = None, i_know: bool = False) -> Partition:
    """The NVS partition for the units' config: the one the firmware declares, else a dedicated one (`config`
    among several), or `nvs` only when asked knowingly."""
    nvs = [p for p in build.partitions if (p.type, p.subtype) == (1, 2)]
    listed = ", ".join(f"{p.name} (0x{p.offset:x}, {_kb(p.size)})" for p in nvs) or "none"
    table = str(build.dir / _table_file(build.files).rel)
    own = next((p for p in nvs if p.name == APP_NVS), None)
    refuse_own = (f"{APP_NVS!r} (0x{own.offset:x}, {_kb(own.size)}) is the app's own NVS: writing the config "
                  "there replaces the whole partition, erasing everything the app keeps in it (its settings, "
                  "Wi-Fi credentials and calibration stored by ESP-IDF) on every unit. Add a dedicated NVS "
                  "partition to partitions.csv (e.g. `config, data, nvs, , 0x6000`) and rebuild, or give "
                  f"--config-partition {APP_NVS} --i-know if the firmware reads its config from "
                  f"{APP_NVS!r} and nothing else lives there") if own else ""
    if requested is not None:
        chosen = next((p for p in build.partitions if p.name == requested), None)
        if chosen is None:
            raise ConfigError([Problem(table, "--config-partition", f"no partition {requested!r}; the NVS "
                                       f"partitions are: {listed}")])
        if (chosen.type, chosen.subtype) != (1, 2):
            raise ConfigError([Problem(table, "--config-partition", f"{requested!r} is {chosen.type_name}/"
                                       f"{chosen.subtype_name}, not data/nvs; the NVS partitions are: {listed}")])
        if chosen.name == APP_NVS and not i_know:
            raise ConfigError([Problem(table, "--config-partition", refuse_own)])
        return chosen
    dedicated = [p for p in nvs if p.name != APP_NVS]
    if build.declared_partition in {p.name for p in dedicated}:  # the firmware says where it reads its config
        return next(p for p in dedicated if p.name == build.declared_partition)
    if len(dedicated) == 1 or any(p.name == "config" for p in dedicated):
        return next((p for p in dedicated if p.name == "config"), dedicated[0])
    if dedicated:
        raise ConfigError([Problem(table, "config partition", f"several NVS partitions ({listed}): choose the "
                                   "one the firmware reads its config from with --config-partition NAME")])
    if own is not None:
        raise ConfigError([Problem(table, "config partition", "the build has no dedicated config partition: " + refuse_own)])
    raise ConfigError([Problem(table, "config partition", "the partition table has no NVS partition "
                               "(data/nvs) for the config: add one to partitions.csv and rebuild")])


def _q(text: str) -> str:
    """A TOML basic string of any text (a build's names are data: quotes and control characters escaped)."""
    return json.dumps(text).replace("\x7f", "\\u007f")


def env_name(name: str) -> str:
    return re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")


def profile_text(name: str, build: IdfBuild, config: Partition) -> str:
    """profile.toml for the build: the 2Smart keys of the example profile, comments saying what to edit."""
    env = env_name(name)
    prefix = (re.sub(r"[^A-Z0-9]", "", name.upper()) or "DEV")[:3]
    title = " ".join(x for x in (build.project, build.version and f"{build.version}") if x) or name
    regions = "\n".join(f'  {{ name = {_q(b.name)}, offset = "0x{b.offset:x}", file = {_q(b.target)}, '
                        f'sha256 = "{b.sha256}" }},' for b in build.files)
    size_line = (f'flash_size = "{build.flash_size}"  # flasher_args.json flash_settings.flash_size'
                 if build.flash_size else "# flash_size: not in flasher_args.json; the bootloader's header decides")
    own = ("\n# This is the app's own NVS (--i-know): the station replaces the whole partition on every unit."
           if config.name == APP_NVS else "")

    def key(k: str, n: int, source: str, optional: bool = False) -> str:
        return f'[[config.keys]]\nkey = "{k}"\ntype = "string"\nmax_length = {n}\n{source}\n' + (
            "optional = true\n" if optional else "")

    keys = "\n".join([
        key("email", 64, 'value = "vendor@example.com"  # EDIT: the vendor account the devices belong to'),
        key("token", 10, 'secret = "vendor_token"'),
        key("host", 64, 'value = "cloud.2smart.com"'),
        key("brport", 5, 'value = "1883"'),
        key("product_id", 32, f'value = "{name}"  # EDIT: the product id in 2Smart Cloud'),
        key("serial", 32, 'unit = "serial"'),
        key("device_id", 32, 'unit = "device_id"'),
        key("ssid", 32, 'secret = "wifi_ssid"', True),
        key("psk", 64, 'secret = "wifi_password"', True),
    ])
    return f'''# Product profile made by `station profile new {name} --from-idf` from the ESP-IDF build
# {_q(str(build.dir.resolve()))}
# The images were copied into firmware/ and each file's SHA-256 is pinned below: rebuilding
# the project changes nothing here until you run `station profile new` again.
# Every key: README, "Profile keys". Check it with `station profile check <this folder>`.
name = "{name}"
title = {_q(title)}
chip = "{build.chip}"  # from {build.chip_from}
{size_line}
device_class = "wifi"  # "no-wifi" for a device without Wi-Fi (then remove the ssid and psk keys)
product_id = "{name}"  # EDIT: the product id in 2Smart Cloud
baud = 921600

[firmware]
regions = [
{regions}
]

# The pre-specified parameters, written into NVS partition {_q(config.name)} (0x{config.offset:x}, {_kb(config.size)}).
# Limits follow the 2Smart SDK's stored config (token 10, email 64, host 64, port 5).{own}
[config]
partition = {_q(config.name)}
namespace = "2smart"

{keys}
# Secrets come from the environment (or a file, or the station's secrets store), never from this profile.
[secrets.vendor_token]
env = "{env}_VENDOR_TOKEN"

[secrets.wifi_ssid]
env = "{env}_WIFI_SSID"
optional = true

[secrets.wifi_password]
env = "{env}_WIFI_PASSWORD"
optional = true

[serial]
# {{yymmdd}} {{yyyymmdd}} {{yy}} {{mm}} {{dd}}: the day; {{station}}: station.toml's station_id; {{seq:05}}: the counter
pattern = "{prefix}-{{yymmdd}}-{{seq:05}}"

[checks]
boot = true
boot_timeout_s = 5
smoke = "none"  # "healthcheck" or "pair" once the firmware runs the 2Smart pairing server
'''


def write_profile(name: str, build: IdfBuild, config: Partition, out: Path) -> Path:
    """Write the profile folder (profile.toml and firmware/) all at once; refuses an existing folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError([Problem(str(out), "--out", "already exists and is not empty: nothing was written "
                                   "(remove it, or give another --out)")])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        for b in build.files:
            dest = tmp / b.target
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(b.data)  # the bytes hashed are the bytes copied
        (tmp / "profile.toml").write_text(profile_text(name, build, config))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "profile.toml"
