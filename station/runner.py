"""Open the station for a run, and run many ports at once (one thread per port)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping

from .config import ConfigError, StationConfig
from .events import Emit, UnitResult
from .pipeline import StationContext, UnitJob, load_firmware, provision_unit
from .profile import ProfileError, check_profile, load_profile, resolve_secrets
from .record import Record, station_key
from .smoke import FactoryAccounts


def open_station(profile: str | None = None, config: Path | None = None, db: Path | None = None,
                 env: Mapping[str, str] | None = None, smoke: str | None = None,
                 station: StationConfig | None = None) -> StationContext:
    """Load station.toml and the profile, check the profile, open the record.

    Raises ConfigError (ProfileError listing every problem) when nothing may be flashed.
    """
    station = station or StationConfig.load(config)
    prof = load_profile(profile or station.default_profile, station.profiles_dir)
    problems = check_profile(prof, env, station.secrets_file)
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
    key = station_key(station.key_file)
    try:
        record = open_record(station, db, key)
    except Exception as exc:
        raise ConfigError(f"cannot open the station database {db or station.database}: {exc}") from None
    return StationContext(station, prof, secrets, record, key, firmware=firmware, smoke_level=smoke,
                          accounts=accounts)


def open_record(station: StationConfig, db: Path | None = None, key: bytes | None = None,
                replay: bool = True) -> Record:
    """The station's record, with its spool where station.toml says (else beside the database).

    Opening it replays the spool (unless `replay` is off) and settles the attempts of
    stations that were killed.
    """
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
