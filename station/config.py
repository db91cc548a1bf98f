"""Station configuration (station.toml): who this station is and how it is set up.

Unknown keys are refused, so a typo in station.toml is an error, not a silent
default. The file is found at $STATION_CONFIG, else ./station.toml.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration or profile problem: nothing is flashed."""


def take(table: dict[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    return table


@dataclass(frozen=True)
class SmokeDefaults:
    """How the smoke test reaches devices and which factory test accounts it uses."""

    timeout_s: float = 10.0
    reach: str = "direct"  # "direct" (URL or the IP from the boot log) or "wifi" (nmcli)
    url: str = ""  # direct: a fixed pairing-server URL instead of the boot log's IP
    port: int = 80  # the pairing server's port when the boot log does not say
    wifi_interface: str = "wlan0"
    test_ssid: str = "factory-test"
    test_psk_env: str = "STATION_TEST_PSK"
    test_email: str = "factory-test@example.com"
    test_token_env: str = "STATION_TEST_TOKEN"
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    monitor_user: str = "station-monitor"
    monitor_password_env: str = "STATION_MONITOR_PASSWORD"

    FIELDS = ("timeout_s", "reach", "url", "port", "wifi_interface", "test_ssid", "test_psk_env",
              "test_email", "test_token_env", "broker_host", "broker_port", "monitor_user",
              "monitor_password_env")


@dataclass(frozen=True)
class StationConfig:
    station_id: str = "station-1"
    database: Path = Path("var/station.db")
    profiles_dir: Path = Path("profiles")
    default_profile: str = "relay"
    slots: int = 4
    usb_ports: tuple[str, ...] = ()  # "vid:pid" filters for fixture ports
    operator: str = ""
    lot: str = ""
    admin_password_sha256: str = ""
    key_file: Path = Path("var/station.key")
    signing_key: Path = Path("var/station-ed25519.pem")
    secrets_file: Path = Path("var/secrets.enc")
    smoke: SmokeDefaults = field(default_factory=SmokeDefaults)
    source: Path | None = None
    spool_path: Path = Path("var/station.db.spool")  # record finishes that could not be written
    min_free_mb: int = 64  # no unit starts when the database's disk has less free space

    @classmethod
    def load(cls, path: Path | None = None) -> "StationConfig":
        path = path or Path(os.environ.get("STATION_CONFIG", "station.toml"))
        if not path.exists():
            if path == Path("station.toml"):
                return cls()
            raise ConfigError(f"{path}: station configuration not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        take(data, {"station_id", "database", "profiles_dir", "default_profile", "slots",
                    "ports", "operator", "lot", "admin_password_sha256", "key_file", "smoke",
                    "signing_key", "secrets_file", "spool", "min_free_mb"},
             str(path))
        base = path.parent
        ports = take(data.get("ports", {}), {"usb"}, f"{path} [ports]")
        smoke = take(data.get("smoke", {}), set(SmokeDefaults.FIELDS), f"{path} [smoke]")
        if smoke.get("reach", "direct") not in ("direct", "wifi"):
            raise ConfigError(f"{path} [smoke] reach: 'direct' or 'wifi'")
        slots = data.get("slots", 4)
        if not isinstance(slots, int) or not 1 <= slots <= 64:
            raise ConfigError(f"{path}: slots must be a whole number from 1 to 64")
        min_free = data.get("min_free_mb", 64)
        if not isinstance(min_free, int) or isinstance(min_free, bool) or min_free < 0:
            raise ConfigError(f"{path}: min_free_mb must be a whole number of megabytes, 0 or more")
        database = base / data.get("database", "var/station.db")
        for vp in ports.get("usb", []):
            if not isinstance(vp, str) or len(vp.split(":")) != 2:
                raise ConfigError(f"{path} [ports] usb: {vp!r} is not 'vid:pid' in hex")
        return cls(
            station_id=str(data.get("station_id", "station-1")),
            database=database,
            spool_path=base / data["spool"] if "spool" in data else database.with_name(database.name + ".spool"),
            min_free_mb=min_free,
            profiles_dir=base / data.get("profiles_dir", "profiles"),
            default_profile=str(data.get("default_profile", "relay")),
            slots=slots,
            usb_ports=tuple(ports.get("usb", ())),
            operator=str(data.get("operator", "")),
            lot=str(data.get("lot", "")),
            admin_password_sha256=str(data.get("admin_password_sha256", "")),
            key_file=base / data.get("key_file", "var/station.key"),
            signing_key=base / data.get("signing_key", "var/station-ed25519.pem"),
            secrets_file=base / data.get("secrets_file", "var/secrets.enc"),
            smoke=SmokeDefaults(**smoke),
            source=path,
        )
