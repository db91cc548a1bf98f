"""Open the station for a run, and run many ports at once (one thread per port)."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from pathlib import Path
from typing import Mapping

from .config import ConfigError, StationConfig
from .events import Emit, UnitResult
from .pipeline import StationContext, UnitJob, load_firmware, provision_unit
from .profile import ProfileError, StationKeys, check_profile, load_profile, resolve_secrets
from .record import Record, station_key
from .secrets import Redactor
from .smoke import FactoryAccounts, SmokeFailure, make_reach, resolve_nmcli

PRIVATE_UMASK = 0o077  # the database, its WAL, the spool, exports and keys: the station's user alone


def private_files() -> None:
    """Every file the station creates from now on is 0600, every folder 0700 (SQLite's WAL follows its database)."""
    os.umask(PRIVATE_UMASK)


def open_station(profile: str | None = None, config: Path | None = None, db: Path | None = None,
                 env: Mapping[str, str] | None = None, smoke: str | None = None,
                 station: StationConfig | None = None, baud: int | None = None) -> StationContext:
    """Load station.toml and the profile, check the profile, open the record.

    `baud` overrides the profile's starting rate for this run (`station flash -b`).
    Raises ConfigError (ProfileError listing every problem) when nothing may be flashed.
    """
    private_files()
    station = station or StationConfig.load(config)
    prof = load_profile(profile or station.default_profile, station.profiles_dir)
    if baud:
        prof = dataclasses.replace(prof, baud=baud)  # the content hash stays the profile file's
    key = station_key(station.key_file)  # made on first use: a development-mode profile escrows under it
    problems = check_profile(prof, env, station.secrets_file, station.station_id,
                             StationKeys(station.key_file, station.secure_boot_key))
    if problems:
        raise ProfileError(problems)
    secrets, _ = resolve_secrets(prof, env, station.secrets_file)
    level = smoke or prof.checks.smoke
    accounts = FactoryAccounts.from_settings(station.smoke, env)
    if level == "pair" and prof.device_class != "other":
        missing = accounts.missing(station.smoke)
        if missing:
            raise ConfigError(f"smoke level 'pair' needs {' and '.join(missing)} in the environment")
    firmware = load_firmware(prof)  # read once: the bytes checked against the pins are the bytes flashed
    reach = make_reach
    if station.smoke.reach == "wifi" and level != "none" and prof.device_class != "other":
        try:
            reach = functools.partial(make_reach, nmcli=resolve_nmcli())  # found once, at start
        except SmokeFailure as exc:
            raise ConfigError(f"reach = wifi: {exc.message}; {exc.remedy}") from None
    redactor = Redactor.for_station(secrets, accounts, env)
    password = None
    if station.central.enabled:
        from .central import central_password

        password = central_password(station.secrets_file, os.environ if env is None else env)
        redactor = redactor.with_values([password])  # one redaction point: the database password too
    try:
        record = open_record(station, db, key)
    except Exception as exc:
        raise ConfigError(redactor(f"cannot open the station database {db or station.database}: {exc}")) from None
    central = None
    if station.central.enabled:
        from .central import Central

        record.serial_blocks = True  # serials only from blocks leased centrally: no two stations share one
        central = Central(station.central, password, record, station.station_id).start()
    return StationContext(station, prof, secrets, record, key, firmware=firmware, smoke_level=smoke,
                          accounts=accounts, make_reach=reach, redactor=redactor, central=central)


def open_record(station: StationConfig, db: Path | None = None, key: bytes | None = None,
                replay: bool = True) -> Record:
    """The station's record, with its spool where station.toml says (else beside the database).

    Opening it replays the spool (unless `replay` is off) and settles the attempts of
    stations that were killed.
    """
    private_files()
    path = db or station.database
    spool = station.spool_path if db is None else None
    return Record(path, key if key is not None else station_key(station.key_file), spool, replay=replay,
                  station_id=station.station_id)


def min_free_mb(station: StationConfig) -> float:
    return float(station.min_free_mb)


def run_units(jobs: list[UnitJob], ctx: StationContext, emit: Emit,
              cancel: threading.Event | None = None) -> list[UnitResult]:
    """Provision every job at the same time; a hung or failing port never stops the others.

    The worker threads are kept for the context's next batch (a station runs batch after
    batch): their database connections and buffers are reused, so memory stays flat.
    """
    ctx.record.check_free_space(min_free_mb(ctx.station))  # raises RecordError: no board touched
    pool = ctx.workers(len(jobs))
    futures = [pool.submit(provision_unit, job, ctx, emit, cancel) for job in jobs]
    return [f.result() for f in futures]
