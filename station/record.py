"""The station's record: every unit and every attempt, written ahead of the board.

What the record guarantees, and how (later work — security, several stations, secure
production — extends this design, it does not replace it):

- **Written ahead.** Before the first write to a board's flash, one committed
  transaction (`Record.start`) reserves the unit's serial and records the attempt as
  `started` with the port, MAC, chip, profile and its hash, operator, lot and station.
  Serials are unique across the station: a reserved serial is a `units` row, and the
  unique index on `units.serial` is the final word. If that commit fails, the unit fails
  before flashing and the board is untouched. The attempt is finished in place
  (`Record.finish`) when the unit ends. An attempt that ends before anything
  irreversible (wrong chip, no answer) is written once, start and finish together
  (`Record.add`).
- **One journal, hash-chained.** Every state an attempt is recorded in is an entry of
  `journal`, append-only and chained per station: entry_hash = SHA-256(prev_hash +
  canonical JSON of the entry). Each entry carries the attempt's whole row; `attempts`
  (and `units`) are the queryable projection written in the same transaction, and an
  attempt row's `row_hash` is the hash of its latest entry. `verify` walks the chains
  and checks that every attempt row is exactly its latest entry.
- **Interrupted, never lost.** Each process that starts attempts holds an flock on
  `<db>.sessions/<session>.lock` while it lives. The next process that opens the record
  settles every `started` attempt whose process is gone (kill -9, power loss, a full
  disk) as `interrupted`, keeping its MAC and reserved serial, so an auditor sees every
  board that may hold a serial. A running station's attempts are never settled by
  another command. A later attempt on the board keeps its serial.
- **The spool.** A finish that cannot be written (disk full, read-only filesystem, I/O
  error, a locked database) goes to the spool file as one fsynced line authenticated
  with an HMAC of a key derived from the station's key. It is replayed on the next
  open, each line in its own transaction and idempotently by attempt uid; a damaged or
  forged line is set aside in `<spool>.rejected`, never applied. Spooled passes count
  for the duplicate guard while the process runs.

Secrets never reach the record: a token is kept as a keyed fingerprint only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets as pysecrets
import sqlite3
import threading
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Callable, Iterator

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from flashing.errors import UnitError

migrations = Migrations("station")


class Outcome(StrEnum):
    """How an attempt ended; `started` only while it runs (or until it is settled)."""

    STARTED = "started"
    PASSED = "passed"  # the board is provisioned
    FAILED = "failed"  # the board (or what was plugged in) failed a step
    ABORTED = "aborted"  # the operator (or a signal) stopped it
    ERROR = "error"  # the station failed: database, disk, a bug; never charged to the board
    INTERRUPTED = "interrupted"  # the station stopped mid-attempt (killed, power lost)


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


def _legacy_digest(prev_hash: str, row: dict) -> str:
    body = {k: v for k, v in row.items() if k not in ("prev_hash", "row_hash")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


@migrations()
def m002_hash_chain(db: Database) -> None:
    db["attempts"].add_column("prev_hash", str)
    db["attempts"].add_column("row_hash", str)
    heads: dict[str, str] = {}
    for row in list(db.query("select * from attempts order by id")):
        prev = heads.get(row["station_id"], CHAIN_GENESIS)
        digest = _legacy_digest(prev, row)
        db.execute("update attempts set prev_hash = ?, row_hash = ? where id = ?", [prev, digest, row["id"]])
        heads[row["station_id"]] = digest


@migrations()
def m003_write_ahead_journal(db: Database) -> None:
    db["attempts"].add_column("uid", str)
    db["attempts"].add_column("session", str)
    db.execute("update attempts set uid = lower(hex(randomblob(16))) where uid is null")
    db["attempts"].create_index(["uid"], unique=True)
    db["attempts"].create_index(["outcome"])
    db["journal"].create({"id": int, "station_id": str, "kind": str, "attempt_uid": str, "at": str,
                          "body": str, "prev_hash": str, "entry_hash": str}, pk="id")
    db["journal"].create_index(["attempt_uid"])
    db["journal"].create_index(["station_id", "id"])
    # the attempts recorded so far become the journal's first entries, in order
    heads: dict[str, str] = {}
    for row in list(db.query("select * from attempts order by id")):
        body = {c: row.get(c) for c in ("id", *ATTEMPT_COLUMNS)}  # columns added by later migrations: None
        prev = heads.get(row["station_id"], CHAIN_GENESIS)
        entry = _entry(row["station_id"], "recorded", row["uid"], row["ended_at"] or row["started_at"], body)
        digest = _entry_hash(prev, entry)
        db.execute("insert into journal (station_id, kind, attempt_uid, at, body, prev_hash, entry_hash) "
                   "values (?, ?, ?, ?, ?, ?, ?)",
                   [entry["station_id"], entry["kind"], entry["attempt_uid"], entry["at"], entry["body"],
                    prev, digest])
        db.execute("update attempts set prev_hash = ?, row_hash = ? where id = ?", [prev, digest, row["id"]])
        heads[row["station_id"]] = digest


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _new_uid() -> str:
    return uuid.uuid4().hex


@dataclass
class Attempt:
    """One unit through the pipeline once, as the record keeps it."""

    port: str
    station_id: str
    profile: str
    profile_hash: str
    started_at: str
    ended_at: str = ""
    outcome: str = Outcome.FAILED
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
    uid: str = field(default_factory=_new_uid)  # unique per attempt: what the spool replays by
    session: str = ""  # the station process that ran it (see the module docstring)
    quarantine: bool = False  # the factory's test credentials were left on the unit (smoke `pair`)

    def row(self) -> dict:
        d = asdict(self)
        for k in ("firmware_hashes", "durations", "written_regions"):
            d[k] = json.dumps(d[k], sort_keys=True)
        d["rework"] = int(self.rework)
        d["quarantine"] = int(self.quarantine)
        d["outcome"] = str(self.outcome)
        return d


# the attempt columns every journal entry carries (the row, less the projection's own keys)
ATTEMPT_COLUMNS = tuple(f.name for f in fields(Attempt))


def _entry(station_id: str, kind: str, uid: str, at: str, body: dict) -> dict:
    return {"station_id": station_id, "kind": kind, "attempt_uid": uid, "at": at,
            "body": json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)}


def _entry_hash(prev_hash: str, entry: dict) -> str:
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


class RecordError(UnitError):
    """The station could not write or read its record: a station fault, not the board's."""

    station_fault = True


class SerialTaken(UnitError):
    """A serial (given from a label) already belongs to another board."""


@dataclass(frozen=True)
class SerialPlan:
    """Where the unit's serial comes from: given (a label), or the profile's counter."""

    given: str | None = None
    counter: str | None = None  # the counter's name
    render: Callable[[int], str] | None = None  # the serial for a counter value
    max_value: int | None = None  # the counter's last value (the pattern's width)


@dataclass(frozen=True)
class Written:
    """Where a finish went: the database (attempt id), the spool, or nowhere (lost)."""

    attempt_id: int | None = None
    spooled: bool = False
    problem: str | None = None  # why it did not reach the database

    @property
    def note(self) -> str | None:
        if self.attempt_id is not None:
            return None
        if self.spooled:
            return f"the record could not be written ({self.problem}): the result is kept in the spool and added on the next start"
        return (f"the record could not be written ({self.problem}) nor spooled: this attempt shows as "
                "interrupted, with its board and serial, the next time the station starts")


def _insert(conn: sqlite3.Connection, table: str, row: dict) -> int:
    """One INSERT inside the caller's transaction.

    Not sqlite-utils' insert(): inside a transaction it opens a savepoint with a random
    name, so every row compiled new SQL and each thread's connection kept ~128 of those
    statements cached: memory that grew with the units provisioned.
    """
    cols = ", ".join(f"[{c}]" for c in row)
    marks = ", ".join("?" for _ in row)
    return conn.execute(f"INSERT INTO [{table}] ({cols}) VALUES ({marks})", list(row.values())).lastrowid


def _update(conn: sqlite3.Connection, table: str, changes: dict, where: str, args: list) -> int:
    sets = ", ".join(f"[{k}] = ?" for k in changes)
    return conn.execute(f"UPDATE [{table}] SET {sets} WHERE {where}", [*changes.values(), *args]).rowcount


class Record:
    """The station's SQLite record; one connection per thread, one writer at a time."""

    def __init__(self, path: Path | str, key: bytes | None = None, spool: Path | str | None = None,
                 busy_timeout_s: float = 5.0, replay: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spool = Path(spool) if spool else self.path.with_name(self.path.name + ".spool")
        self.rejected = self.spool.with_name(self.spool.name + ".rejected")
        self.sessions = self.path.with_name(self.path.name + ".sessions")
        self.busy_ms = int(busy_timeout_s * 1000)
        # the spool's lines are authenticated with a key used for nothing else
        self._spool_key = hmac.new(key, b"station spool v1", hashlib.sha256).digest() if key else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._session: str | None = None
        self._session_fd: int | None = None
        self._spooled: dict[str, Attempt] = {}  # uid -> finish kept in the spool, this process
        self.replayed = 0
        self.rejected_lines = 0
        self.settled: list[dict] = []
        db = self.db()
        db.execute("PRAGMA journal_mode=WAL")
        migrations.apply(db)
        if replay and self._spool_key is not None:
            self.replay_spool()
        self.settled = self.settle_interrupted()

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

    def release_session(self) -> None:
        """End this process's session: its attempts are all finished (or spooled)."""
        with self._lock:
            if self._session_fd is not None:
                with contextlib.suppress(OSError):
                    (self.sessions / f"{self._session}.lock").unlink()
                os.close(self._session_fd)
                self._session_fd = None
                self._session = None

    @contextlib.contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction (one writer at a time: the chain never forks)."""
        conn = self.db().conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _fault(self, exc: Exception, doing: str) -> RecordError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return RecordError(f"the station database is locked ({text}) while {doing}",
                               f"close the other program that holds {self.path}, then retry")
        return RecordError(f"the station database could not be written ({text}) while {doing}",
                           "call the station's engineer: check the disk that holds "
                           f"{self.path.parent} (space, permissions, errors)")

    def free_mb(self) -> float:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize / (1024 * 1024)

    def check_free_space(self, min_free_mb: float) -> None:
        """Refuse to start units when the record's disk is nearly full."""
        free = self.free_mb()
        if free < min_free_mb:
            raise RecordError(f"only {free:.1f} MB free on the disk that holds the station database "
                              f"({self.path.parent}); the station needs {min_free_mb:g} MB to record units",
                              "call the station's engineer: free space on that disk; no board was touched")

    # -- sessions: which process owns a started attempt -----------------------------------
    def _own_session(self) -> str:
        with self._lock:
            if self._session is None:
                self.sessions.mkdir(parents=True, exist_ok=True)
                sid = _new_uid()
                fd = os.open(self.sessions / f"{sid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)  # held until the process ends, however it ends
                self._session, self._session_fd = sid, fd
            return self._session

    def _session_alive(self, sid: str) -> bool:
        if sid == self._session:
            return True
        path = self.sessions / f"{sid}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        return False

    def settle_interrupted(self) -> list[dict]:
        """Mark `started` attempts whose process is gone as `interrupted`; return them."""
        try:
            rows = list(self.db().query("select uid, session from attempts where outcome = 'started'"))
        except sqlite3.Error:
            return []
        dead = [r["uid"] for r in rows if not self._session_alive(r["session"] or "")]
        settled = []
        for uid in dead:
            try:
                with self.atomic() as conn:
                    row = self._row_by_uid(conn, uid)
                    if row is None or row["outcome"] != Outcome.STARTED:
                        continue
                    a = _attempt_from_row(row)
                    a.outcome = Outcome.INTERRUPTED
                    a.ended_at = now_iso()
                    a.error = ("interrupted: the station stopped (killed, crashed or lost power) during this "
                               f"attempt; the board may hold serial {a.serial} and the vendor's parameters")
                    a.remedy = "put the board back on the line: a new attempt keeps its serial"
                    settled.append({**a.row(), "id": self._project(conn, a, "interrupted")})
            except sqlite3.Error:
                break  # a locked or full database: the next open settles them
        return settled

    def unsettled_interrupted(self) -> list[dict]:
        """Interrupted attempts whose board has had no attempt since (for the operator)."""
        return list(self.db().query(
            "select a.* from attempts a where a.outcome = 'interrupted' and not exists ("
            "select 1 from attempts b where b.mac = a.mac and b.id > a.id) order by a.id"))

    # -- queries used by the pipeline -----------------------------------------------------
    def passed_unit(self, mac: str | None = None, serial: str | None = None) -> dict | None:
        """A unit that already passed, found by MAC or serial (spooled passes included)."""
        for a in list(self._spooled.values()):
            if a.outcome == Outcome.PASSED and ((mac and a.mac == mac) or (serial and a.serial == serial)):
                return {"mac": a.mac, "serial": a.serial, "state": "provisioned", "spooled": True}
        try:
            for col, val in (("mac", mac), ("serial", serial)):
                if val:
                    rows = list(self.db().query(
                        f"select * from units where {col} = ? and state = 'provisioned'", [val]))
                    if rows:
                        return rows[0]
        except sqlite3.Error as exc:
            raise self._fault(exc, "looking for an earlier pass") from None
        return None

    def quarantined(self, mac: str) -> bool:
        """Whether the board's latest finished attempt left the factory's test credentials on it."""
        try:
            row = self.db().execute("select quarantine from attempts where mac = ? and outcome != 'started' "
                                    "order by id desc limit 1", [mac]).fetchone()
        except sqlite3.Error as exc:
            raise self._fault(exc, "looking for a quarantined board") from None
        return bool(row and row[0])

    def unit_by_mac(self, mac: str) -> dict | None:
        rows = list(self.db().query("select * from units where mac = ?", [mac]))
        return rows[0] if rows else None

    def serial_taken(self, serial: str, mac: str | None = None) -> bool:
        """Whether the serial belongs (or is reserved) for another board."""
        if any(a.serial == serial and a.mac != mac for a in list(self._spooled.values())):
            return True
        rows = list(self.db().query("select mac from units where serial = ?", [serial]))
        return bool(rows) and rows[0]["mac"] != mac

    # -- writing ---------------------------------------------------------------------------
    def start(self, a: Attempt, plan: SerialPlan) -> str:
        """Reserve the unit's serial and record the attempt as started, in one commit.

        Returns the serial. Raises SerialTaken (a label already on another board) or
        RecordError (the commit failed: nothing may be written to the board).
        """
        a.session = self._own_session()
        a.outcome = Outcome.STARTED
        try:
            with self.atomic() as conn:
                a.serial = self._reserve(conn, a, plan)
                self._project(conn, a, "started", insert=True)
        except (sqlite3.Error, OSError) as exc:
            raise self._fault(exc, "reserving the serial") from None
        return a.serial

    def _reserve(self, conn: sqlite3.Connection, a: Attempt, plan: SerialPlan) -> str:
        unit = conn.execute("select id, serial from units where mac = ?", [a.mac]).fetchone()
        if plan.given:
            if self.serial_taken(plan.given, a.mac):
                raise SerialTaken(f"serial {plan.given} already belongs to another board",
                                  "scan the label of this board, or print a new one")
            serial = plan.given
        elif unit and unit[1]:
            serial = unit[1]  # a retried or reworked board keeps its serial
        else:
            serial = self._next_free_serial(conn, plan)
        if unit is None:
            _insert(conn, "units", {"mac": a.mac, "serial": serial, "chip": a.chip, "profile": a.profile,
                                    "device_id": a.device_id, "state": "reserved",
                                    "created_at": a.started_at, "updated_at": a.started_at})
        elif serial != unit[1]:
            _update(conn, "units", {"serial": serial, "updated_at": a.started_at}, "id = ?", [unit[0]])
        return serial

    def _next_free_serial(self, conn: sqlite3.Connection, plan: SerialPlan) -> str:
        if plan.counter is None or plan.render is None:
            raise SerialTaken("this profile takes serials from labels and none was given",
                              "scan the board's label (or pass --serial)")
        conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [plan.counter])
        value = conn.execute("SELECT value FROM counters WHERE name = ?", [plan.counter]).fetchone()[0]
        while True:
            value += 1
            if plan.max_value is not None and value > plan.max_value:
                raise RecordError(f"the serial counter {plan.counter!r} is exhausted (last value {plan.max_value})",
                                  "call the station's engineer: widen the profile's serial pattern or start a "
                                  "new series; no board was touched")
            serial = plan.render(value)
            # a counter behind the units table (a restored backup) skips forward, never reuses
            if not conn.execute("select 1 from units where serial = ?", [serial]).fetchone() and \
                    not self.serial_taken(serial):
                break
        conn.execute("UPDATE counters SET value = ? WHERE name = ?", [value, plan.counter])
        return serial

    def finish(self, a: Attempt) -> Written:
        """Record how a started attempt ended; spool it if the database cannot take it."""
        return self._write_or_spool(a, "finished")

    def add(self, a: Attempt) -> Written:
        """Record an attempt that ended before it was started (nothing was written to the board)."""
        return self._write_or_spool(a, "recorded")

    def add_attempt(self, a: Attempt) -> int | None:
        """`add`, returning the attempt id (None when spooled): for scripts and tests."""
        return self.add(a).attempt_id

    def _write_or_spool(self, a: Attempt, kind: str) -> Written:
        try:
            with self.atomic() as conn:
                attempt_id = self._project(conn, a, kind, insert=kind == "recorded")
            return Written(attempt_id)
        except (sqlite3.Error, OSError) as exc:
            problem = str(exc)
        try:
            self._spool_line(kind, a)
        except OSError as exc:
            return Written(None, False, f"{problem}; spool: {exc.strerror or exc}")
        return Written(None, True, problem)

    def _row_by_uid(self, conn: sqlite3.Connection, uid: str) -> dict | None:
        cur = conn.execute("select * from attempts where uid = ?", [uid])
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row)) if row else None

    def _project(self, conn: sqlite3.Connection, a: Attempt, kind: str, insert: bool = False) -> int:
        """Append the journal entry for `a`'s current state and write the projection."""
        unit_id = self._project_unit(conn, a, kind)
        row = a.row()
        # the attempt's id is part of what is chained: renumbering a row is an edit
        found = None if insert else conn.execute("select id from attempts where uid = ?", [a.uid]).fetchone()
        row["id"] = found[0] if found else conn.execute("select coalesce(max(id), 0) + 1 from attempts").fetchone()[0]
        head = conn.execute("select entry_hash from journal where station_id = ? order by id desc limit 1",
                            [a.station_id]).fetchone()
        prev = head[0] if head else CHAIN_GENESIS
        entry = _entry(a.station_id, kind, a.uid, a.ended_at or a.started_at, row)
        digest = _entry_hash(prev, entry)
        _insert(conn, "journal", {**entry, "prev_hash": prev, "entry_hash": digest})
        row.update(unit_id=unit_id, prev_hash=prev, row_hash=digest)
        if found:
            _update(conn, "attempts", row, "uid = ?", [a.uid])
        else:  # a new attempt, or a finish whose start never committed
            _insert(conn, "attempts", row)
        return row["id"]

    def _project_unit(self, conn: sqlite3.Connection, a: Attempt, kind: str) -> int | None:
        if not a.mac:
            return None
        at = a.ended_at or a.started_at
        unit = conn.execute("select id, serial, state from units where mac = ?", [a.mac]).fetchone()
        passed = a.outcome == Outcome.PASSED
        if unit is None:
            return _insert(conn, "units", {
                "mac": a.mac, "serial": a.serial, "chip": a.chip, "profile": a.profile,
                "device_id": a.device_id, "state": "provisioned" if passed else "failed",
                "created_at": at, "updated_at": at})
        changes: dict = {"updated_at": at}
        if passed:
            changes.update(state="provisioned", profile=a.profile, device_id=a.device_id, chip=a.chip)
        elif unit[2] == "reserved" and kind != "started":
            changes["state"] = "failed"
        if a.serial and a.serial != unit[1]:
            changes["serial"] = a.serial
        _update(conn, "units", changes, "id = ?", [unit[0]])
        return unit[0]

    # -- the spool ------------------------------------------------------------------------------
    def _sign(self, body: bytes) -> str:
        return hmac.new(self._spool_key, body, hashlib.sha256).hexdigest()

    def _spool_line(self, kind: str, a: Attempt) -> None:
        if self._spool_key is None:
            raise OSError("the record was opened without the station's key")
        body = json.dumps({"kind": kind, "attempt": asdict(a)}, sort_keys=True, separators=(",", ":"),
                          default=str)
        line = json.dumps({"hmac": self._sign(body.encode()), "body": body}) + "\n"
        with self._lock:
            fd = os.open(self.spool, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                data = line.encode()
                if os.write(fd, data) != len(data):
                    raise OSError("short write to the spool")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._spooled[a.uid] = a

    def spool_lines(self) -> list[str]:
        try:
            return [line for line in self.spool.read_text("utf-8", "replace").splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def spool_report(self) -> tuple[int, list[str]]:
        """How many spool lines are authentic, and what is wrong with the others (nothing applied)."""
        good, bad = 0, []
        for n, line in enumerate(self.spool_lines(), 1):
            try:
                if self._spool_key is None:
                    raise ValueError("cannot be checked without the station's key")
                self._parse_spool_line(line)
                good += 1
            except (ValueError, KeyError, TypeError) as exc:
                bad.append(f"line {n}: {exc}")
        return good, bad

    def _parse_spool_line(self, line: str) -> tuple[str, Attempt]:
        outer = json.loads(line)
        body = outer["body"]
        if not hmac.compare_digest(self._sign(body.encode()), str(outer["hmac"])):
            raise ValueError("its authentication code does not match (damaged, or not written by this station)")
        inner = json.loads(body)
        if inner["kind"] not in ("finished", "recorded"):
            raise ValueError(f"unknown kind {inner['kind']!r}")
        return inner["kind"], Attempt(**inner["attempt"])

    def replay_spool(self) -> int:
        """Add the finishes kept in the spool, each once; returns how many were added."""
        lines = self.spool_lines()
        if not lines:
            return 0
        if self._spool_key is None:
            raise RecordError("the spool cannot be checked without the station's key", "open it with the key")
        done, bad = 0, []
        with self._lock:
            for n, line in enumerate(lines, 1):
                try:
                    kind, a = self._parse_spool_line(line)
                except (ValueError, KeyError, TypeError) as exc:
                    bad.append(f"line {n}: {exc}")
                    self._set_aside(line, f"line {n}: {exc}")
                    continue
                try:
                    with self.atomic() as conn:
                        row = self._row_by_uid(conn, a.uid)
                        if row is not None and row["outcome"] not in (Outcome.STARTED, Outcome.INTERRUPTED):
                            continue  # already recorded: a replay never inserts twice
                        self._project(conn, a, kind, insert=row is None)
                    done += 1
                except sqlite3.Error:
                    return done  # still locked or full: the spool stays for the next open
            self.spool.unlink()
            self._spooled.clear()
        self.replayed, self.rejected_lines = done, len(bad)
        return done

    def _set_aside(self, line: str, why: str) -> None:
        fd = os.open(self.rejected, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps({"why": why, "line": line}) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- tamper evidence -------------------------------------------------------------------------
    def chain_head(self, station_id: str) -> str:
        row = self.db().execute("select entry_hash from journal where station_id = ? order by id desc limit 1",
                                [station_id]).fetchone()
        return row[0] if row else CHAIN_GENESIS

    def verify_chain(self) -> list[str]:
        """Walk every station's journal and check the attempts against it; name the first problem."""
        problems: list[str] = []
        heads: dict[str, str] = {}
        broken: set[str] = set()
        latest: dict[str, dict] = {}
        for e in self.db().query("select * from journal order by id"):
            station = e["station_id"]
            if station in broken:
                continue
            if e["prev_hash"] != heads.get(station, CHAIN_GENESIS):
                problems.append(f"station {station}: journal entry {e['id']} does not follow the entry before "
                                "it: an entry was deleted or inserted out of order just before it")
                broken.add(station)
                continue
            entry = {k: e[k] for k in ("station_id", "kind", "attempt_uid", "at", "body")}
            if _entry_hash(e["prev_hash"], entry) != e["entry_hash"]:
                problems.append(f"station {station}: journal entry {e['id']} was edited after it was recorded")
                broken.add(station)
                continue
            heads[station] = e["entry_hash"]
            latest[e["attempt_uid"]] = e
        seen = set()
        for row in self.db().query("select * from attempts order by id"):
            seen.add(row["uid"])
            e = latest.get(row["uid"])
            if row["station_id"] in broken:
                continue
            if e is None:
                problems.append(f"attempt {row['id']} is not in the journal: it was inserted behind the "
                                "station's back")
                continue
            body = json.loads(e["body"])
            if any(row.get(k) != v for k, v in body.items()) or row["row_hash"] != e["entry_hash"]:
                problems.append(f"attempt {row['id']} was edited after it was recorded")
        for uid, e in latest.items():
            if uid not in seen and e["station_id"] not in broken:
                problems.append(f"station {e['station_id']}: attempt {json.loads(e['body']).get('id')} was "
                                f"deleted from the attempts table (journal entry {e['id']} records it)")
        return problems

    # -- reading for people -------------------------------------------------------------------
    def attempts(self, limit: int = 100) -> list[dict]:
        return list(self.db().query("select * from attempts order by id desc limit ?", [limit]))


def _attempt_from_row(row: dict) -> Attempt:
    d = {k: row[k] for k in ATTEMPT_COLUMNS if k in row}
    for k in ("firmware_hashes", "durations", "written_regions"):
        d[k] = json.loads(d[k]) if d.get(k) else ({} if k != "written_regions" else [])
    d["rework"] = bool(d.get("rework"))
    d["quarantine"] = bool(d.get("quarantine"))
    return Attempt(**d)


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


@migrations()
def m004_quarantine(db: Database) -> None:
    # an attempt after which the unit still holds the factory's test credentials (issue #13)
    db["attempts"].add_column("quarantine", int)
