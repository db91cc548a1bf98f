"""Station configuration (station.toml): who this station is and how it is set up.

The classes below are the file's only declaration: each is a frozen pydantic dataclass
whose fields are the keys of its table. Unknown keys are refused, so a typo in
station.toml is an error, not a silent default, and every problem is reported at once.
Paths are relative to station.toml's folder. The file is found by `find_config`: --config,
$STATION_CONFIG, ./station.toml, the user's config folder, else the built-in defaults
(whose relative paths then go under the user's data folder, unless run from a checkout).
"""

from __future__ import annotations

import dataclasses
import os
import string
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic.dataclasses import dataclass

from .schema import (
    NOT_IN_FILE,
    SCHEMA,
    ConfigError,
    FilePath,
    Flag,
    Name,
    Problem,
    Seconds,
    Text,
    describe,
    read_toml,
    validate,
)

__all__ = ["ConfigError", "Problem", "SmokeDefaults", "CentralSettings", "Ports", "StationConfig", "ConfigSource", "find_config",
           "source_checkout", "user_data_dir"]

APP = "provisioning-station"  # the folder name under the user's config and data folders
ENV = "STATION_CONFIG"


def source_checkout() -> Path | None:
    """The source tree the station runs from (an editable install or a clone), or None when installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "profiles").is_dir() else None


def _run_from_checkout() -> bool:
    root = source_checkout()
    return root is not None and Path.cwd().resolve().is_relative_to(root)


def user_config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP, appauthor=False))


def user_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP, appauthor=False))


@dataclasses.dataclass(frozen=True)
class ConfigSource:
    """Which station.toml a command uses and how it was found (path None: the built-in defaults)."""

    path: Path | None
    how: str  # "--config", "$STATION_CONFIG", "the current directory", "the user's config folder", "defaults"
    home: Path | None = None  # defaults only: the folder their relative paths go under (None: the current one)

    def describe(self) -> str:
        """The one line every command prints on stderr."""
        if self.path is not None:
            return f"station.toml: {self.path.resolve()} (from {self.how})"
        where = f"files under {self.home}" if self.home else "files under ./var"
        return f"station.toml: none found, using defaults ({where})"


def find_config(explicit: Path | None = None) -> ConfigSource:
    """station.toml by --config, $STATION_CONFIG, ./station.toml, the user's config folder, in that order.

    A file named by --config or $STATION_CONFIG must exist (ConfigError): a typo is not the defaults.
    """
    named = [(explicit, "--config")] if explicit is not None else []
    if os.environ.get(ENV):
        named.append((Path(os.environ[ENV]), "$" + ENV))
    if named:
        path, how = named[0]
        if not path.exists():
            raise ConfigError([Problem(str(path), "(file)", f"station configuration not found (given by {how})")])
        return ConfigSource(path, how)
    for path, how in ((Path("station.toml"), "the current directory"),
                      (user_config_dir() / "station.toml", "the user's config folder")):
        if path.exists():  # a folder or an unreadable file is named by the reader, not passed over
            return ConfigSource(path, how)
    return ConfigSource(None, "defaults", None if _run_from_checkout() else user_data_dir())


Port = Annotated[int, Field(strict=True, ge=1, le=65535)]


@dataclass(frozen=True, config=SCHEMA)
class SmokeDefaults:
    """[smoke]: how the smoke test reaches devices and which factory test accounts it uses."""

    timeout_s: Seconds = 10.0
    reach: Literal["direct", "wifi"] = "direct"  # direct: URL or the IP from the boot log; wifi: nmcli
    url: Text = ""  # direct: a fixed pairing-server URL instead of the boot log's IP
    port: Port = 80  # the pairing server's port when the boot log does not say
    wifi_interface: Text = "wlan0"
    test_ssid: Text = "factory-test"
    test_psk_env: Text = "STATION_TEST_PSK"
    test_email: Text = "factory-test@example.com"
    test_token_env: Text = "STATION_TEST_TOKEN"  # no longer read: each unit pairs with its own account
    broker_host: Text = "127.0.0.1"
    broker_port: Port = 1883
    # TLS to the test broker (its mqtts port): the station checks the broker's certificate and host
    # name against broker_ca_file (unset: the system's CA store); the device is paired with mqtts_port
    broker_tls: Flag = False
    broker_ca_file: FilePath | None = None
    monitor_user: Text = "station-monitor"
    monitor_password_env: Text = "STATION_MONITOR_PASSWORD"
    # the broker's dynamic-security admin, which creates and deletes each unit's test account
    broker_admin_user: Text = "station-admin"
    broker_admin_password_env: Text = "STATION_BROKER_ADMIN_PASSWORD"


def _central_url(url: str) -> str:
    if url:
        from .central import url_problem  # psycopg is imported only by a station that has a central record

        problem = url_problem(url)
        if problem:
            raise ValueError(problem)
    return url


@dataclass(frozen=True, config=SCHEMA)
class CentralSettings:
    """[central]: the plant's PostgreSQL record that several stations share; without a url the station is alone."""

    url: Annotated[Text, AfterValidator(_central_url)] = ""
    """postgresql://user@host:5432/dbname; the password from $STATION_CENTRAL_PASSWORD or the secrets file (central_password)."""
    block_size: Annotated[int, Field(strict=True, ge=1, le=10**9)] = 1000
    """serials leased per block: a block lasts this many units without the network."""
    low_water: Annotated[int, Field(strict=True, ge=0, le=10**9)] = 200
    """lease the next block when fewer serials than this are left."""
    timeout_s: Annotated[float, Field(ge=0.2, le=60, allow_inf_nan=False)] = 2.0
    """the longest the duplicate guard waits for the central database before it asks the local record only."""
    push_interval_s: Annotated[float, Field(ge=0.05, le=3600, allow_inf_nan=False)] = 1.0
    """how often the station pushes its new journal entries (a finished unit pushes at once)."""
    retry_s: Annotated[float, Field(ge=0.1, le=3600, allow_inf_nan=False)] = 10.0
    """after a failure, how long the station works from its own record before it tries the central database again."""

    @property
    def enabled(self) -> bool:
        return bool(self.url)


def _vid_pid(vp: str) -> str:
    parts = vp.split(":")
    if len(parts) != 2 or not all(1 <= len(p) <= 4 and all(c in string.hexdigits for c in p) for p in parts):
        raise ValueError(f"{describe(vp)} is not \"vid:pid\" in hex, such as \"10c4:ea60\"")
    return vp


def _slot_number(key: object) -> object:
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    raise ValueError(f"{describe(key)} is not a slot number: name the slots 1, 2, 3, ...")


def _location(loc: str) -> str:
    from flashing.ports import LOCATION

    if not LOCATION.match(loc):
        raise ValueError(f"{describe(loc)} is not a USB location such as \"1-1.4.2\" or \"1-1.4.2:1.0\" "
                         "(`station ports` shows each port's)")
    return loc


def _slot_map(slots: dict[int, str]) -> dict[int, str]:
    missing = [n for n in range(1, max(slots, default=0) + 1) if n not in slots]
    if missing:
        raise ValueError(f"slot {missing[0]} is missing: number the slots 1 to {max(slots)} without gaps "
                         "(`station ports learn` writes them so)")
    seen: dict[str, int] = {}
    for n, loc in sorted(slots.items()):
        if loc in seen:
            raise ValueError(f"slots {seen[loc]} and {n} are both bound to {describe(loc)}: one socket each")
        seen[loc] = n
    return slots


SlotNumber = Annotated[int, BeforeValidator(_slot_number), Field(ge=1, le=64)]
Location = Annotated[Text, AfterValidator(_location)]


@dataclass(frozen=True, config=SCHEMA)
class Ports:
    """[ports]: which serial ports are the fixture's, and which socket each one is."""

    usb: tuple[Annotated[Text, AfterValidator(_vid_pid)], ...] = ()
    """USB "vid:pid" of the fixture's bridges; without [ports.slots] their ports are the slots, in natural order."""
    slots: Annotated[dict[SlotNumber, Location], AfterValidator(_slot_map)] = dataclasses.field(
        default_factory=dict)
    """Slot number = USB location of its socket's port ("1-1.4.2"); replaces `slots` and the natural order."""


@dataclass(frozen=True, config=SCHEMA)
class StationConfig:
    """station.toml: the top-level keys, then [ports] and [smoke]."""

    station_id: Name = "station-1"
    database: FilePath = Path("var/station.db")
    # record finishes that could not be written wait here; default: the database path + ".spool"
    spool: FilePath | None = None
    # the station starts no unit when the database's filesystem has less free space than this
    min_free_mb: Annotated[int, Field(strict=True, ge=0, le=1 << 40)] = 64
    profiles_dir: FilePath = Path("profiles")
    default_profile: Name = "relay"
    slots: Annotated[int, Field(strict=True, ge=1, le=64)] = 4
    operator: Text = ""
    lot: Text = ""
    # refused since issue #13 (unsalted): kept only to say how to migrate (station/admin.py)
    admin_password_sha256: Annotated[str, Field(strict=True, pattern=r"^([0-9a-fA-F]{64})?$")] = ""
    admin_password_file: FilePath = Path("var/admin-password")  # written by `station admin set-password`
    key_file: FilePath = Path("var/station.key")
    signing_key: FilePath = Path("var/station-ed25519.pem")
    secrets_file: FilePath = Path("var/secrets.enc")
    # Secure Boot v2's RSA-3072 signing key ([security] secure_boot): a station file, never in a profile
    secure_boot_key: FilePath | None = None
    ports: Ports = dataclasses.field(default_factory=Ports)
    smoke: SmokeDefaults = dataclasses.field(default_factory=SmokeDefaults)
    central: CentralSettings = dataclasses.field(default_factory=CentralSettings)
    source: Path | None = dataclasses.field(default=None, metadata=NOT_IN_FILE)  # the station.toml read

    @property
    def usb_ports(self) -> tuple[str, ...]:
        return self.ports.usb

    @property
    def spool_path(self) -> Path:
        return self.spool if self.spool is not None else self.database.with_name(self.database.name + ".spool")

    @classmethod
    def load(cls, path: Path | None = None) -> "StationConfig":
        """Read station.toml (found by `find_config`); ConfigError lists every problem (file, key, what is wrong)."""
        found = find_config(path)
        if found.path is None:
            defaults = cls()
            return defaults if found.home is None else _under(defaults, found.home)
        data = read_toml(found.path, "station configuration")
        config, problems = validate(cls, data, str(found.path))
        if config is None:
            raise ConfigError(problems)
        return dataclasses.replace(_under(config, found.path.parent), source=found.path)


def _under(config: StationConfig, base: Path) -> StationConfig:
    """Every relative path of the configuration taken as relative to `base` (an absolute one stays)."""
    paths = {f.name: base / v for f in dataclasses.fields(config) if isinstance(v := getattr(config, f.name), Path)}
    if config.smoke.broker_ca_file is not None:
        paths["smoke"] = dataclasses.replace(config.smoke, broker_ca_file=base / config.smoke.broker_ca_file)
    return dataclasses.replace(config, **paths)
