"""The station's record: every unit and every attempt, in SQLite, for traceability.

Schema changes are an append-only list of migrations (sqlite-utils). The database
runs in WAL mode and every thread opens its own connection, so all ports write at
the same time. An attempt that cannot be written (a locked database) is kept in a
spool file beside the database and added on the next start: no result is lost.
Secrets never reach the record: a token is kept as a keyed fingerprint only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets as pysecrets
import sqlite3
import threading

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("station")


@migrations()
def m001_units_attempts(db: Database) -> None:
    db["units"].create({
        "id": int, "mac": str, "serial": str, "chip": str, "profile": str, "device_id": str,
        "state": str, "created_at": str, "updated_at": str,
    }, pk="id", not_null={"mac"})
    db["units"].create_index(["mac"], unique=True)
    db["units"].create_index(["serial"], unique=True)
    db["attempts"].create({
        "id": int, "unit_id": int, "port": str, "station_id": str, "operator": str, "lot": str,
        "profile": str, "profile_hash": str, "firmware_hashes": str, "config_sha256": str,
        "token_fingerprint": str, "started_at": str, "ended_at": str, "outcome": str,
        "failed_step": str, "error": str, "remedy": str, "detail": str, "durations": str,
        "mac": str, "serial": str, "chip": str, "device_id": str, "firmware_version": str,
        "baud": int, "rework": int, "written_regions": str,
    }, pk="id", foreign_keys=[("unit_id", "units", "id")])
    db["attempts"].create_index(["unit_id"])
    db["attempts"].create_index(["ended_at"])
    db["counters"].create({"name": str, "value": int}, pk="name")


CHAIN_GENESIS = "0" * 64
HASHED_EXCLUDE = ("prev_hash", "row_hash")


def row_digest(prev_hash: str, row: dict) -> str:
    """The hash that chains an attempt row to the one before it (one chain per station)."""
    body = {k: v for k, v in row.items() if k not in HASHED_EXCLUDE}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


@migrations()
def m002_hash_chain(db: Database) -> None:
    db["attempts"].add_column("prev_hash", str)
    db["attempts"].add_column("row_hash", str)
    heads: dict[str, str] = {}
    for row in list(db.query("select * from attempts order by id")):
        prev = heads.get(row["station_id"], CHAIN_GENESIS)
        digest = row_digest(prev, row)
        db.execute("update attempts set prev_hash = ?, row_hash = ? where id = ?", [prev, digest, row["id"]])
        heads[row["station_id"]] = digest


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Attempt:
    """One unit through the pipeline once, as the record keeps it."""

    port: str
    station_id: str
    profile: str
    profile_hash: str
    started_at: str
    ended_at: str = ""
    outcome: str = "failed"  # passed | failed | aborted
    failed_step: str | None = None
    error: str | None = None
    remedy: str | None = None
    detail: str | None = None
    operator: str = ""
    lot: str = ""
    mac: str | None = None
    serial: str | None = None
    chip: str | None = None
    device_id: str | None = None
    firmware_version: str | None = None
    firmware_hashes: dict[str, str] = field(default_factory=dict)
    config_sha256: str | None = None
    token_fingerprint: str | None = None
    durations: dict[str, float] = field(default_factory=dict)
    baud: int | None = None
    rework: bool = False
    written_regions: list[str] = field(default_factory=list)

    def row(self) -> dict:
        d = asdict(self)
        for k in ("firmware_hashes", "durations", "written_regions"):
            d[k] = json.dumps(d[k], sort_keys=True)
        d["rework"] = int(self.rework)
        return d


class RecordError(Exception):
    def __init__(self, message: str, remedy: str):
        super().__init__(message)
        self.remedy = remedy


def _insert(db: Database, table: str, row: dict) -> int:
    """One INSERT inside the caller's transaction.

    Not sqlite-utils' insert(): inside a transaction it opens a savepoint with a random
    name, so every row compiled new SQL and each thread's connection kept ~128 of those
    statements cached: memory that grew with the units provisioned.
    """
    cols = ", ".join(f"[{c}]" for c in row)
    marks = ", ".join("?" for _ in row)
    return db.conn.execute(f"INSERT INTO [{table}] ({cols}) VALUES ({marks})", list(row.values())).lastrowid


class Record:
    def __init__(self, path: Path | str, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spool = self.path.with_suffix(self.path.suffix + ".spool")
        self.busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._spool_lock = threading.Lock()
        db = self.db()
        db.execute("PRAGMA journal_mode=WAL")
        migrations.apply(db)
        self.replay_spool()

    def db(self) -> Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = Database(self.path)
            db.execute(f"PRAGMA busy_timeout={self.busy_ms}")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def _locked(self, exc: sqlite3.OperationalError) -> RecordError:
        return RecordError(f"the station database is locked ({exc})",
                           f"close the other program that holds {self.path}, then retry")

    # -- queries used by the pipeline -----------------------------------------------------
    def passed_unit(self, mac: str | None = None, serial: str | None = None) -> dict | None:
        """A unit that already passed, found by MAC or serial."""
        try:
            for col, val in (("mac", mac), ("serial", serial)):
                if val:
                    rows = list(self.db().query(
                        f"select * from units where {col} = ? and state = 'provisioned'", [val]))
                    if rows:
                        return rows[0]
        except sqlite3.OperationalError as exc:
            raise self._locked(exc) from None
        return None

    def unit_by_mac(self, mac: str) -> dict | None:
        rows = list(self.db().query("select * from units where mac = ?", [mac]))
        return rows[0] if rows else None

    def serial_taken(self, serial: str, mac: str) -> bool:
        rows = list(self.db().query("select mac from units where serial = ?", [serial]))
        return bool(rows) and rows[0]["mac"] != mac

    def next_counter(self, name: str) -> int:
        """Atomically take the next value of a persistent counter (serial numbers)."""
        conn = self.db().conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [name])
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = ?", [name])
                value = conn.execute("SELECT value FROM counters WHERE name = ?", [name]).fetchone()[0]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise self._locked(exc) from None
        return value

    # -- writing ---------------------------------------------------------------------------
    def add_attempt(self, attempt: Attempt) -> int | None:
        """Write the attempt (and its unit). Returns its id, or None if it went to the spool."""
        try:
            return self._write(attempt)
        except sqlite3.OperationalError:
            with self._spool_lock, open(self.spool, "a") as f:
                f.write(json.dumps(asdict(attempt)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return None

    def _write(self, a: Attempt) -> int:
        db = self.db()
        db.conn.execute("BEGIN IMMEDIATE")  # one writer at a time: the chain never forks
        try:
            attempt_id = self._write_in_transaction(db, a)
            db.conn.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise
        return attempt_id

    def _write_in_transaction(self, db: Database, a: Attempt) -> int:
        unit_id = None
        if a.mac:
            unit = self.unit_by_mac(a.mac)
            state = "provisioned" if a.outcome == "passed" else None
            if unit is None:
                unit_id = _insert(db, "units", {
                    "mac": a.mac, "serial": a.serial, "chip": a.chip, "profile": a.profile,
                    "device_id": a.device_id, "state": state or "failed",
                    "created_at": a.ended_at, "updated_at": a.ended_at})
            else:
                unit_id = unit["id"]
                changes = {"updated_at": a.ended_at}
                if state:
                    changes.update(state=state, profile=a.profile, device_id=a.device_id, chip=a.chip)
                if a.serial and a.serial != unit["serial"]:
                    changes["serial"] = a.serial
                sets = ", ".join(f"[{k}] = ?" for k in changes)
                db.conn.execute(f"UPDATE units SET {sets} WHERE id = ?", [*changes.values(), unit_id])
        row = a.row()
        row["unit_id"] = unit_id
        head = db.execute("select row_hash from attempts where station_id = ? order by id desc limit 1",
                          [a.station_id]).fetchone()
        row["id"] = (db.execute("select coalesce(max(id), 0) + 1 from attempts").fetchone()[0])
        row["prev_hash"] = head[0] if head else CHAIN_GENESIS
        full = {c.name: None for c in db["attempts"].columns}
        full.update(row)
        row["row_hash"] = row_digest(row["prev_hash"], full)
        return _insert(db, "attempts", row)

    def replay_spool(self) -> int:
        """Add attempts kept while the database was locked; returns how many."""
        if not self.spool.exists():
            return 0
        with self._spool_lock:
            lines = self.spool.read_text().splitlines()
            done = 0
            for line in lines:
                if line.strip():
                    self._write(Attempt(**json.loads(line)))
                    done += 1
            self.spool.unlink()
        return done

    # -- tamper evidence -------------------------------------------------------------------------
    def chain_head(self, station_id: str) -> str:
        row = self.db().execute("select row_hash from attempts where station_id = ? order by id desc limit 1",
                                [station_id]).fetchone()
        return row[0] if row else CHAIN_GENESIS

    def verify_chain(self) -> list[str]:
        """Walk every station's chain; name the first row that was edited, deleted or inserted."""
        problems: list[str] = []
        heads: dict[str, str] = {}
        broken: set[str] = set()
        for row in self.db().query("select * from attempts order by id"):
            station = row["station_id"]
            if station in broken:
                continue
            expected_prev = heads.get(station, CHAIN_GENESIS)
            if row["prev_hash"] != expected_prev:
                problems.append(f"station {station}: attempt {row['id']} does not follow the row before it: "
                                "a row was deleted or inserted out of order just before it")
                broken.add(station)
                continue
            if row_digest(row["prev_hash"], row) != row["row_hash"]:
                problems.append(f"station {station}: attempt {row['id']} was edited after it was recorded")
                broken.add(station)
                continue
            heads[station] = row["row_hash"]
        return problems

    # -- reading for people -------------------------------------------------------------------
    def attempts(self, limit: int = 100) -> list[dict]:
        return list(self.db().query("select * from attempts order by id desc limit ?", [limit]))


EXPORT_FIELDS = ["serial", "mac", "chip", "device_id", "profile", "profile_hash", "firmware_version",
                 "firmware_hashes", "config_sha256", "token_fingerprint", "station_id", "operator",
                 "lot", "port", "started_at", "ended_at", "outcome", "durations", "baud", "rework"]


def station_key(path: Path) -> bytes:
    """The station's secret key for token fingerprints (created on first use)."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = pysecrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex())
        return key


def fingerprint(key: bytes, secret: str) -> str:
    """Keyed fingerprint: proves which token a unit got, useless to recover it."""
    return "hmac-sha256:" + hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()[:32]


