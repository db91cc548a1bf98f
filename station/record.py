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
- **One journal, keyed and chained.** Every state an attempt is recorded in is an entry
  of `journal`, append-only and chained per station: entry_hash = HMAC-SHA256(chain key,
  prev_hash + canonical JSON of the entry), the chain key derived (HKDF) from the
  station's key for this use only, so an entry cannot be forged or the chain recomputed
  without the station's key. Each entry carries the attempt's whole row and the unit's
  row after it; a serial counter's change is a `counter` entry and an admin action
  (profile or lot switch) an `admin` entry, each in the same transaction as the change.
  `attempts`, `units` and `counters` are the queryable projection, and an attempt row's
  `row_hash` is the hash of its latest entry. `verify` walks the chains and checks that
  every attempt, unit and counter row is exactly what its latest entry says.
- **Signed checkpoints.** At every export and at the end of every `station flash` run
  and screen session the station signs (Ed25519, its signing key) the chain's last
  entry id, entry count and head (`checkpoints`, and the latest beside the trust store,
  outside the database). `verify` checks that the chain still extends every checkpoint:
  a truncated tail or a chain rewritten with the right chain key shows.
- **Interrupted, never lost.** Each process that starts attempts holds an flock on
  `<db>.sessions/<session>.lock` while it lives. The next process that opens the record
  settles every `started` attempt whose process is gone (kill -9, power loss, a full
  disk) as `interrupted`, keeping its MAC and reserved serial, so an auditor sees every
  board that may hold a serial. A running station's attempts are never settled by
  another command. A later attempt on the board keeps its serial.
- **The spool.** A finish that cannot be written (disk full, read-only filesystem, I/O
  error, a locked database) goes to the spool file as one fsynced line authenticated
  with an HMAC of a key derived (HKDF) from the station's key. It is replayed on the next
  open, each line in its own transaction and idempotently by attempt uid; a damaged or
  forged line is set aside in `<spool>.rejected`, never applied. Spooled passes count
  for the duplicate guard while the process runs.

- **Every eFuse burn, ahead of the burn** (secure production, issue #18). A burn cannot
  be undone, so the started attempt carries its `burns` list (each burn: what it burns,
  and its state `pending`, `burning` or `done`), and every change of it is a `burn` entry
  of the attempt's journal, committed (`Record.note_burns`) before espefuse is called:
  the whole plan first, then `burning` before each burn and `done` after it. If that
  commit fails, the burn does not run. An attempt interrupted mid-set-up is settled as
  `interrupted: efuses partly burned (done: …, may or may not have happened: …, not
  started: …)`: the one `burning` burn is exactly the one the record cannot vouch for.
- **Keys.** A unit's flash-encryption key is a secret: it never reaches the record. In
  development mode it is escrowed (`key_escrow`): AES-256-GCM under a key derived from
  the station's key for that purpose only (station/keys.py), with the attempt's uid as
  associated data, sealed before the first burn; a rework finds it by MAC, and takes it
  only from a row its keyed journal entry vouches for (`escrowed_key`). In release mode
  it is never stored.

Secrets never reach the record: a token is kept as a keyed fingerprint only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets as pysecrets
import sqlite3
import threading
import uuid
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Callable, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from flashing.errors import UnitError

from .keys import derive

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
        entry = _entry_v1(row["station_id"], "recorded", row["uid"], row["ended_at"] or row["started_at"], body)
        digest = _entry_hash_v1(prev, entry)
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
    guard: str = ""  # with a central record: "central", or "local only" when it could not be asked (station/central.py)
    flash_encryption: str = ""  # the profile's [security] mode when this attempt set it up (or reworked it)
    # each eFuse burn of this attempt: {"burn", "fields", "state": pending | burning | done}, journaled before it runs
    burns: list[dict] = field(default_factory=list)
    key_escrow: str | None = None  # development mode: the unit's flash-encryption key, AES-GCM under a derived key

    def row(self) -> dict:
        d = asdict(self)
        for k in ("firmware_hashes", "durations", "written_regions", "burns"):
            d[k] = json.dumps(d[k], sort_keys=True)
        d["rework"] = int(self.rework)
        d["quarantine"] = int(self.quarantine)
        d["outcome"] = str(self.outcome)
        return d


# the journal entry kinds that carry an attempt row: its states (`burn`: before and after each eFuse burn)
ATTEMPT_KINDS = ("started", "burn", "finished", "recorded", "interrupted")

# the attempt columns every journal entry carries (the row, less the projection's own keys)
ATTEMPT_COLUMNS = tuple(f.name for f in fields(Attempt))


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _entry_v1(station_id: str, kind: str, uid: str, at: str, body: dict) -> dict:
    return {"station_id": station_id, "kind": kind, "attempt_uid": uid, "at": at, "body": _canonical(body)}


def _entry_hash_v1(prev_hash: str, entry: dict) -> str:
    """The unkeyed chain of m003 (anyone could recompute it): only m004 still reads it."""
    return hashlib.sha256((prev_hash + _canonical(entry)).encode()).hexdigest()


# what an entry is, as chained: the journal's columns less its id and the two hashes
ENTRY_FIELDS = ("station_id", "kind", "attempt_uid", "at", "body", "unit")


def _entry(station_id: str, kind: str, uid: str, at: str, body: dict, unit: dict | None = None) -> dict:
    return {"station_id": station_id, "kind": kind, "attempt_uid": uid, "at": at, "body": _canonical(body),
            "unit": _canonical(unit) if unit is not None else None}


def _entry_hash(chain_key: bytes, prev_hash: str, entry: dict) -> str:
    return hmac.new(chain_key, (prev_hash + _canonical({k: entry[k] for k in ENTRY_FIELDS})).encode(),
                    hashlib.sha256).hexdigest()


def derive_key(station_key_bytes: bytes, purpose: str) -> bytes:
    """A key for one purpose only, derived from the station's key (station.keys: HKDF-SHA256)."""
    return derive(station_key_bytes, purpose)


CHAIN_KEY_PURPOSE = "journal-chain/v1"
SPOOL_KEY_PURPOSE = "spool/v2"

# the key m004 needs to re-key an existing chain: Record sets it around migrations.apply
_MIGRATION_KEY: ContextVar[bytes | None] = ContextVar("_MIGRATION_KEY", default=None)


def _legacy_chain_problems(db: Database) -> list[str]:
    """What is wrong with an m003 (unkeyed) journal and its attempts: the old `verify`."""
    problems: list[str] = []
    heads: dict[str, str] = {}
    latest: dict[str, dict] = {}
    for e in db.query("select * from journal order by id"):
        entry = {k: e[k] for k in ("station_id", "kind", "attempt_uid", "at", "body")}
        if e["prev_hash"] != heads.get(e["station_id"], CHAIN_GENESIS) or \
                _entry_hash_v1(e["prev_hash"], entry) != e["entry_hash"]:
            problems.append(f"journal entry {e['id']} (station {e['station_id']}) was edited, deleted around "
                            "or inserted")
            break
        heads[e["station_id"]] = e["entry_hash"]
        latest[e["attempt_uid"]] = e
    for row in db.query("select * from attempts order by id"):
        e = latest.pop(row["uid"], None)
        if e is None or row["row_hash"] != e["entry_hash"] or \
                any(row.get(k) != v for k, v in json.loads(e["body"]).items()):
            problems.append(f"attempt {row['id']} is not what the journal recorded")
    problems += [f"attempt {json.loads(e['body']).get('id')} was deleted" for e in latest.values()]
    return problems


@migrations()
def m004_keyed_chain_and_checkpoints(db: Database) -> None:
    """Re-key the journal (HMAC), cover units and counters, add signed checkpoints.

    The unkeyed chain is checked first: a database whose chain does not verify is
    refused, never re-keyed (that would launder the edits). The units and counters as
    they stand are then anchored in the chain (the old chain did not cover them).
    """
    db["journal"].add_column("unit", str)
    db["checkpoints"].create({"id": int, "station_id": str, "last_id": int, "entries": int, "head": str,
                              "at": str, "reason": str, "public_key_sha256": str, "signature": str,
                              "manifest_sha256": str}, pk="id")
    db["checkpoints"].create_index(["station_id", "id"])
    entries = list(db.query("select * from journal order by id"))
    if not entries:
        return
    key = _MIGRATION_KEY.get()
    if key is None:
        raise RecordError("the station database's journal must be re-keyed once, and this command opened it "
                          "without the station's key", "open it with the station (station db verify)")
    problems = _legacy_chain_problems(db)
    if problems:
        raise RecordError(f"the station database's journal does not verify ({'; '.join(problems[:3])}): "
                          "it was not re-keyed, so the edits stay evident",
                          "call the quality engineer: keep this database as evidence and restore the last "
                          "backup whose journal verifies")
    chain_key = derive_key(key, CHAIN_KEY_PURPOSE)
    heads: dict[str, str] = {}
    for e in entries:
        prev = heads.get(e["station_id"], CHAIN_GENESIS)
        entry = {**{k: e[k] for k in ("station_id", "kind", "attempt_uid", "at", "body")}, "unit": None}
        digest = _entry_hash(chain_key, prev, entry)
        db.execute("update journal set prev_hash = ?, entry_hash = ? where id = ?", [prev, digest, e["id"]])
        db.execute("update attempts set prev_hash = ?, row_hash = ? where row_hash = ?",
                   [prev, digest, e["entry_hash"]])
        heads[e["station_id"]] = digest
    station = entries[-1]["station_id"]  # the station that uses this database now
    at = now_iso()
    for unit in list(db.query("select * from units order by id")):
        _append(db.conn, chain_key, station, "unit", "", at, {"anchored": "m004"}, unit)
    for counter in list(db.query("select * from counters order by name")):
        _append(db.conn, chain_key, station, "counter", "", at, counter)


def _append(conn: sqlite3.Connection, chain_key: bytes, station_id: str, kind: str, uid: str, at: str,
            body: dict, unit: dict | None = None) -> tuple[str, str]:
    """Append one entry to the station's chain inside the caller's transaction; (prev, hash)."""
    head = conn.execute("select entry_hash from journal where station_id = ? order by id desc limit 1",
                        [station_id]).fetchone()
    prev = head[0] if head else CHAIN_GENESIS
    entry = _entry(station_id, kind, uid, at, body, unit)
    digest = _entry_hash(chain_key, prev, entry)
    _insert(conn, "journal", {**entry, "prev_hash": prev, "entry_hash": digest})
    return prev, digest


def checkpoint_payload(cp: dict) -> bytes:
    """What a checkpoint's signature covers."""
    return ("2smart-station checkpoint v1\n" + _canonical(
        {k: cp[k] for k in ("station_id", "last_id", "entries", "head", "at", "reason")})).encode()


def key_fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """SHA-256 of the public key's DER (SubjectPublicKeyInfo): what `openssl pkey -pubin -outform DER
    | openssl dgst -sha256` prints."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


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


WRITER_WAIT_S = 30.0  # how long a thread waits for the station's other writers before it gives up
_WRITERS: dict[Path, threading.RLock] = {}
_WRITERS_LOCK = threading.Lock()


class WriterStuck(sqlite3.OperationalError):
    """The station's own writers did not let this one write in time (not another program's lock)."""


def _writer_lock(path: Path) -> threading.RLock:
    """One writer lock per database file in this process, shared by every Record open on it."""
    key = path.resolve()
    with _WRITERS_LOCK:
        return _WRITERS.setdefault(key, threading.RLock())


class Record:
    """The station's SQLite record; one connection per thread, one writer at a time."""

    def __init__(self, path: Path | str, key: bytes | None = None, spool: Path | str | None = None,
                 busy_timeout_s: float = 5.0, replay: bool = True, station_id: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spool = Path(spool) if spool else self.path.with_name(self.path.name + ".spool")
        self.rejected = self.spool.with_name(self.spool.name + ".rejected")
        self.sessions = self.path.with_name(self.path.name + ".sessions")
        self.busy_ms = int(busy_timeout_s * 1000)
        self.station_id = station_id  # whose chain admin entries and checkpoints go to
        # the chain and the spool each have a key used for nothing else; without the station's
        # key the record can be read, not written (nor its chain checked)
        self._chain_key = derive_key(key, CHAIN_KEY_PURPOSE) if key else None
        self._spool_key = derive_key(key, SPOOL_KEY_PURPOSE) if key else None
        # spool lines written before the keys came from HKDF still replay after an upgrade
        self._spool_key_v1 = hmac.new(key, b"station spool v1", hashlib.sha256).digest() if key else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._session: str | None = None
        self._session_fd: int | None = None
        self._spooled: dict[str, Attempt] = {}  # uid -> finish kept in the spool, this process
        self.replayed = 0
        self.rejected_lines = 0
        self.settled: list[dict] = []
        # with a central record, serials come only from blocks leased there (station/central.py)
        self.serial_blocks = False
        db = self.db()
        db.execute("PRAGMA journal_mode=WAL")
        token = _MIGRATION_KEY.set(key)
        try:
            migrations.apply(db)
        finally:
            _MIGRATION_KEY.reset(token)
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
        """One IMMEDIATE transaction (one writer at a time: the chain never forks).

        The station's own threads (16 ports, the push and lease threads) take turns on a lock
        of this process first: SQLite's busy handler polls with sleeps and is unfair, so 16
        units committing at once on a loaded host could wait past the busy timeout for each
        other and end `error` with "locked". So SQLite's busy timeout is only ever spent
        waiting for another program, which is what its message and remedy say.
        """
        writer = _writer_lock(self.path)
        if not writer.acquire(timeout=WRITER_WAIT_S):
            raise WriterStuck(f"this station's own record writers held the database for over {WRITER_WAIT_S:.0f} s")
        try:
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
        finally:
            writer.release()

    def _fault(self, exc: Exception, doing: str) -> RecordError:
        text = str(exc)
        if isinstance(exc, WriterStuck):
            return RecordError(f"the station database could not be written while {doing}: {text}",
                               "call the station's engineer: a write of this station hangs (a stalled disk?)")
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
        if self._chain_key is None:
            return []  # a reader without the key leaves them for the station
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
                    if a.burns:
                        a.error, a.remedy = burns_interrupted(a)
                    settled.append({**a.row(), "id": self._project(conn, a, "interrupted")})
            except sqlite3.Error:
                break  # a locked or full database: the next open settles them
        return settled

    def note_burns(self, a: Attempt) -> None:
        """Journal the started attempt's burns as they stand now, before (or after) an eFuse burn.

        Raises RecordError when the commit fails: the burn it announces must then not run.
        """
        try:
            with self.atomic() as conn:
                self._project(conn, a, "burn")
        except (sqlite3.Error, OSError) as exc:
            raise self._fault(exc, "recording an eFuse burn before it is made") from None

    def escrowed_key(self, mac: str) -> tuple[str, str] | None:
        """(attempt uid, escrow) of the board's latest attempt that escrowed a flash-encryption key.

        Only a row its keyed journal entry vouches for: the escrow is sealed to its attempt's uid,
        not to the board, so a row moved to another board's MAC would otherwise hand out that key.
        """
        try:
            conn = self.db().conn
            cur = conn.execute("select * from attempts where mac = ? and key_escrow is not null "
                               "order by id desc limit 1", [mac])
            row = cur.fetchone()
            if row is None:
                return None
            row = dict(zip([c[0] for c in cur.description], row))
            cur = conn.execute("select * from journal where attempt_uid = ? order by id desc limit 1", [row["uid"]])
            entry = cur.fetchone()
            entry = dict(zip([c[0] for c in cur.description], entry)) if entry else None
        except sqlite3.Error as exc:
            raise self._fault(exc, "looking for the board's escrowed key") from None
        body = json.loads(entry["body"]) if entry else {}
        if not (entry and self._chain_key and row["row_hash"] == entry["entry_hash"]
                and hmac.compare_digest(_entry_hash(self._chain_key, entry["prev_hash"], entry), entry["entry_hash"])
                and body.get("mac") == mac and body.get("key_escrow") == row["key_escrow"]):
            raise RecordError(f"the escrowed flash-encryption key of this board (attempt {row['id']}) is not what "
                              "the station's journal recorded: the database was edited",
                              "call the station's engineer (station db verify); nothing was written to the board")
        return row["uid"], row["key_escrow"]

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
        a.outcome = Outcome.STARTED
        try:
            a.session = self._own_session()
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
            serial = self._next_free_serial(conn, plan, a)
        if unit is None:
            _insert(conn, "units", {"mac": a.mac, "serial": serial, "chip": a.chip, "profile": a.profile,
                                    "device_id": a.device_id, "state": "reserved",
                                    "created_at": a.started_at, "updated_at": a.started_at})
        elif serial != unit[1]:
            _update(conn, "units", {"serial": serial, "updated_at": a.started_at}, "id = ?", [unit[0]])
        return serial

    def _next_free_serial(self, conn: sqlite3.Connection, plan: SerialPlan, a: Attempt) -> str:
        if plan.counter is None or plan.render is None:
            raise SerialTaken("this profile takes serials from labels and none was given",
                              "scan the board's label (or pass --serial)")
        conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [plan.counter])
        value = conn.execute("SELECT value FROM counters WHERE name = ?", [plan.counter]).fetchone()[0]
        blocks = self._blocks(conn, plan.counter, value) if self.serial_blocks else None
        while True:
            value += 1
            if blocks is not None:  # the next value inside a leased block: other stations hold the rest
                while blocks and value > blocks[0][1]:
                    blocks.pop(0)
                if not blocks:
                    raise RecordError(f"no serial block is left for {plan.counter!r}",
                                      "the station leases one from the central database: check the network to "
                                      "it (station central status); no board was touched")
                value = max(value, blocks[0][0])
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
        # the counter is in the chain too: a counter set back behind the station's back shows
        _append(conn, self._writing_key(), a.station_id, "counter", a.uid, a.started_at,
                {"name": plan.counter, "value": value})
        return serial

    # -- serial blocks (a central record: station/central.py) --------------------------------------
    @staticmethod
    def _blocks(conn: sqlite3.Connection, counter: str, value: int) -> list[tuple[int, int]]:
        return [tuple(r) for r in conn.execute("select first, last from blocks where counter = ? and last > ? "
                                               "order by first", [counter, value])]

    def counter_value(self, counter: str) -> int:
        """The counter's last value used here (0: none)."""
        row = self.db().execute("select value from counters where name = ?", [counter]).fetchone()
        return row[0] if row else 0

    def serials_left(self, counter: str) -> int:
        """How many serials of `counter` are left in this station's blocks."""
        value = self.counter_value(counter)
        return sum(last - max(first - 1, value) for first, last in self._blocks(self.db().conn, counter, value))

    def add_block(self, counter: str, first: int, last: int, lease_id: int, station_id: str) -> None:
        """Record a block of serials leased centrally, journaled, before any serial of it is used."""
        row = {"counter": counter, "first": first, "last": last, "lease_id": lease_id, "station_id": station_id,
               "leased_at": now_iso()}
        try:
            with self.atomic() as conn:
                _insert(conn, "blocks", row)
                _append(conn, self._writing_key(), station_id, "block", "", row["leased_at"], row)
        except (sqlite3.Error, OSError) as exc:
            raise self._fault(exc, f"recording the serial block {first}-{last} of {counter!r}") from None

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

    def _writing_key(self) -> bytes:
        if self._chain_key is None:
            raise RecordError("the record was opened without the station's key: it can be read, not written",
                              "open it with the station's key (station_key(station.key_file))")
        return self._chain_key

    def log_admin(self, action: str, operator: str, detail: dict | str | None = None,
                  station_id: str | None = None) -> None:
        """Record an admin action (profile or lot switch, shift change) as a journal entry."""
        body = {"action": action, "operator": operator, "detail": detail}
        try:
            with self.atomic() as conn:
                _append(conn, self._writing_key(), station_id or self.station_id, "admin", "", now_iso(), body)
        except (sqlite3.Error, OSError) as exc:
            raise self._fault(exc, f"recording the admin action {action!r}") from None

    def _project(self, conn: sqlite3.Connection, a: Attempt, kind: str, insert: bool = False) -> int:
        """Append the journal entry for `a`'s current state and write the projection."""
        unit_id = self._project_unit(conn, a, kind)
        row = a.row()
        # the attempt's id is part of what is chained: renumbering a row is an edit
        found = None if insert else conn.execute("select id from attempts where uid = ?", [a.uid]).fetchone()
        row["id"] = found[0] if found else conn.execute("select coalesce(max(id), 0) + 1 from attempts").fetchone()[0]
        unit = None
        if unit_id is not None:
            cur = conn.execute("select * from units where id = ?", [unit_id])
            unit = dict(zip([c[0] for c in cur.description], cur.fetchone()))
        prev, digest = _append(conn, self._writing_key(), a.station_id, kind, a.uid, a.ended_at or a.started_at,
                               row, unit)
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
    def _sign(self, body: bytes, key: bytes | None = None) -> str:
        return hmac.new(key or self._spool_key, body, hashlib.sha256).hexdigest()

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
        if not any(hmac.compare_digest(self._sign(body.encode(), k), str(outer["hmac"]))
                   for k in (self._spool_key, self._spool_key_v1)):
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

    def chain_stations(self) -> list[str]:
        return [r[0] for r in self.db().execute("select distinct station_id from journal order by station_id")]

    def checkpoint(self, signing_key: Ed25519PrivateKey, reason: str = "",
                   station_ids: list[str] | None = None) -> list[dict]:
        """Sign where each station's chain stands now (last entry id, entry count, head); return the rows.

        `verify` then checks that the chain still extends it: a truncated tail, or a chain
        rewritten by someone without the signing key, no longer does.
        """
        rows = []
        conn = self.db().conn
        conn.execute(f"PRAGMA busy_timeout={min(self.busy_ms, 1000)}")  # a held database: the next one signs
        try:
            with self.atomic() as conn:
                for station in station_ids or self.chain_stations() or ([self.station_id] if self.station_id else []):
                    last, count = conn.execute("select coalesce(max(id), 0), count(*) from journal where "
                                               "station_id = ?", [station]).fetchone()
                    head = conn.execute("select entry_hash from journal where id = ?", [last]).fetchone()
                    cp = {"station_id": station, "last_id": last, "entries": count,
                          "head": head[0] if head else CHAIN_GENESIS, "at": now_iso(), "reason": reason,
                          "public_key_sha256": key_fingerprint(signing_key)}
                    cp["signature"] = signing_key.sign(checkpoint_payload(cp)).hex()
                    cp["id"] = _insert(conn, "checkpoints", cp)
                    rows.append(cp)
        except (sqlite3.Error, OSError) as exc:
            raise self._fault(exc, "writing a checkpoint") from None
        finally:
            conn.execute(f"PRAGMA busy_timeout={self.busy_ms}")
        return rows

    def note_export(self, checkpoint_id: int, manifest_sha256: str) -> None:
        """Tie an export's manifest to its checkpoint: the next export names it as its predecessor."""
        with self.atomic() as conn:
            _update(conn, "checkpoints", {"manifest_sha256": manifest_sha256}, "id = ?", [checkpoint_id])

    def last_export(self, station_id: str, before_id: int) -> dict | None:
        rows = list(self.db().query("select * from checkpoints where station_id = ? and id < ? and reason = "
                                    "'export' and manifest_sha256 is not null order by id desc limit 1",
                                    [station_id, before_id]))
        return rows[0] if rows else None

    def checkpoints(self) -> list[dict]:
        return list(self.db().query("select * from checkpoints order by id"))

    def journal_segment(self, station_id: str, after_id: int, upto_id: int) -> Iterator[dict]:
        yield from self.db().query("select * from journal where station_id = ? and id > ? and id <= ? order by id",
                                   [station_id, after_id, upto_id])

    def verify_chain(self, trusted: dict[str, list[Ed25519PublicKey]] | None = None,
                     extra_checkpoints: list[dict] = ()) -> list[str]:
        """Walk every station's journal and check the tables and checkpoints against it.

        `trusted`: the public keys each station's checkpoints must be signed by (from the
        trust store, never from the database); `extra_checkpoints`: checkpoints kept
        outside the database. Names the first problem of each kind.
        """
        if self._chain_key is None:
            return ["the record was opened without the station's key: its keyed chain cannot be checked"]
        problems: list[str] = []
        heads: dict[str, str] = {}
        broken: set[str] = set()
        latest: dict[str, dict] = {}  # attempt uid -> its latest entry
        units: dict[str, tuple[dict, dict]] = {}  # mac -> (unit row as last journaled, entry)
        counters: dict[str, tuple[int, dict]] = {}
        blocks: dict[tuple[str, int], tuple[dict, dict]] = {}  # serial blocks leased centrally
        checkpoints = self.checkpoints() + list(extra_checkpoints)
        signed_at = {cp["last_id"] for cp in checkpoints}
        by_id: dict[int, dict] = {}  # only the entries a checkpoint names: memory stays flat
        counts: dict[str, int] = {}
        for e in self.db().query("select * from journal order by id"):
            station = e["station_id"]
            if station in broken:
                continue
            if e["prev_hash"] != heads.get(station, CHAIN_GENESIS):
                problems.append(f"station {station}: journal entry {e['id']} does not follow the entry before "
                                "it: an entry was deleted or inserted out of order just before it")
                broken.add(station)
                continue
            if not hmac.compare_digest(_entry_hash(self._chain_key, e["prev_hash"], e), e["entry_hash"] or ""):
                problems.append(f"station {station}: journal entry {e['id']} was edited after it was recorded, "
                                "or written without the station's key")
                broken.add(station)
                continue
            heads[station] = e["entry_hash"]
            counts[station] = counts.get(station, 0) + 1
            if e["id"] in signed_at:
                by_id[e["id"]] = {"station_id": station, "entry_hash": e["entry_hash"], "n": counts[station]}
            body = json.loads(e["body"])
            if e["kind"] == "counter":
                counters[body["name"]] = (body["value"], e)
            elif e["kind"] == "block":
                blocks[(body["counter"], body["first"])] = (body, e)
            elif e["kind"] in ATTEMPT_KINDS:
                latest[e["attempt_uid"]] = e
            elif e["kind"] not in ("admin", "unit"):
                problems.append(f"station {station}: journal entry {e['id']} is of an unknown kind {e['kind']!r}")
            if e["unit"]:
                unit = json.loads(e["unit"])
                units[unit["mac"]] = (unit, e)
        problems += self._check_attempts(latest, broken)
        problems += self._check_units(units, broken)
        problems += self._check_counters(counters, broken)
        problems += self._check_blocks(blocks, broken)
        problems += self._check_checkpoints(checkpoints, by_id, trusted)
        return problems

    def _check_attempts(self, latest: dict[str, dict], broken: set[str]) -> list[str]:
        problems = []
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

    def _check_units(self, units: dict[str, tuple[dict, dict]], broken: set[str]) -> list[str]:
        if broken:
            return []  # a broken chain cannot say what the units should be
        problems = []
        for row in self.db().query("select * from units order by id"):
            journaled = units.pop(row["mac"], None)
            if journaled is None:
                problems.append(f"unit {row['id']} ({row['mac']}, serial {row['serial']}) is not in the journal: "
                                "it was inserted behind the station's back")
            elif journaled[0] != row:
                changed = sorted(k for k in row if journaled[0].get(k) != row[k])
                problems.append(f"unit {row['id']} ({journaled[0]['mac']}) was edited after it was recorded "
                                f"({', '.join(changed)}; journal entry {journaled[1]['id']} has serial "
                                f"{journaled[0]['serial']}, state {journaled[0]['state']})")
        for mac, (unit, e) in units.items():
            problems.append(f"unit {unit['id']} ({mac}, serial {unit['serial']}) was deleted from the units "
                            f"table (journal entry {e['id']} records it)")
        return problems

    def _check_counters(self, counters: dict[str, tuple[int, dict]], broken: set[str]) -> list[str]:
        if broken:
            return []
        problems = []
        for row in self.db().query("select * from counters order by name"):
            journaled = counters.pop(row["name"], None)
            if journaled is None:
                problems.append(f"serial counter {row['name']!r} is not in the journal: it was set behind the "
                                "station's back")
            elif journaled[0] != row["value"]:
                problems.append(f"serial counter {row['name']!r} is {row['value']} but the journal's last value "
                                f"is {journaled[0]} (entry {journaled[1]['id']}): it was reset or edited behind "
                                "the station's back")
        for name, (value, e) in counters.items():
            problems.append(f"serial counter {name!r} was deleted (journal entry {e['id']} set it to {value})")
        return problems

    def _check_blocks(self, blocks: dict[tuple[str, int], tuple[dict, dict]], broken: set[str]) -> list[str]:
        if broken:
            return []
        problems = []
        for row in self.db().query("select * from blocks order by id"):
            journaled = blocks.pop((row["counter"], row["first"]), None)
            if journaled is None or any(row[k] != v for k, v in journaled[0].items()):
                problems.append(f"serial block {row['first']}-{row['last']} of {row['counter']!r} is not what the "
                                "journal recorded when it was leased: it was inserted or widened behind the "
                                "station's back (serials another station holds could be issued twice)")
        for (counter, first), (body, e) in blocks.items():
            problems.append(f"serial block {first}-{body['last']} of {counter!r} was deleted (journal entry {e['id']})")
        return problems

    @staticmethod
    def _check_checkpoints(checkpoints: list[dict], by_id: dict[int, dict],
                           trusted: dict[str, list[Ed25519PublicKey]] | None) -> list[str]:
        problems = []
        seen: set[str] = set()
        failed: set[str] = set()  # one problem per station: the earliest checkpoint the chain lost
        for cp in checkpoints:
            station, where = cp["station_id"], f"checkpoint of {cp['at']} ({cp.get('reason') or 'no reason'})"
            if cp["signature"] in seen or station in failed:
                continue  # the copy kept outside the database, or a station already reported
            seen.add(cp["signature"])
            if trusted is not None:
                keys = trusted.get(station, [])
                if not keys:
                    problems.append(f"station {station}: {where} cannot be checked: no key is trusted for this "
                                    "station (station keys trust PEM --station ID)")
                    continue
                if not any(_signed(k, cp) for k in keys):
                    problems.append(f"station {station}: {where} is not signed by a key trusted for this station: "
                                    "it was forged or altered")
                    continue
            if not cp["last_id"]:
                continue  # signed an empty chain
            e = by_id.get(cp["last_id"])
            if e is None or e["station_id"] != station or e["entry_hash"] != cp["head"] or \
                    e["n"] != cp["entries"]:
                problems.append(f"station {station}: the journal no longer extends the {where}, signed at entry "
                                f"{cp['last_id']} of {cp['entries']} with head {cp['head'][:16]}…: entries were "
                                "deleted from its end, or the chain was rewritten")
                failed.add(station)
        return problems

    # -- reading for people -------------------------------------------------------------------
    def attempts(self, limit: int = 100) -> list[dict]:
        return list(self.db().query("select * from attempts order by id desc limit ?", [limit]))

    def count_attempts(self) -> int:
        return self.db().execute("select count(*) from attempts").fetchone()[0]

    def history(self, query: str = "", limit: int = 200) -> list[dict]:
        """The newest attempts, or those whose serial, device id or MAC contains `query`.

        A MAC is found in any common form, whole or in part: aa:bb:cc:dd:ee:ff,
        AA-BB-CC-DD-EE-FF, aabb.ccdd.eeff or bare hex.
        """
        text = query.strip()
        where, args = "1", {}
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where, args = "serial like :like escape '\\' or device_id like :like escape '\\'", {"like": like}
            digits = MAC_SEPARATORS.sub("", text).lower()
            if digits and all(c in "0123456789abcdef" for c in digits):
                where += " or replace(replace(lower(mac), ':', ''), '-', '') like :hex"
                args["hex"] = f"%{digits}%"
        return list(self.db().query(
            f"select {HISTORY_COLUMNS} from attempts where {where} order by id desc limit :limit",
            {**args, "limit": limit}))

    def attempt(self, attempt_id: int) -> dict | None:
        """One attempt as recorded, its durations, hashes and written regions decoded (the history's detail)."""
        rows = list(self.db().query("select * from attempts where id = ?", [attempt_id]))
        if not rows:
            return None
        row = rows[0]
        for k, empty in (("durations", {}), ("firmware_hashes", {}), ("written_regions", []), ("burns", [])):
            try:
                row[k] = json.loads(row[k]) if row[k] else empty
            except ValueError:
                row[k] = empty
        return row


HISTORY_COLUMNS = ("id, serial, mac, device_id, outcome, failed_step, error, remedy, port, operator, lot, "
                   "started_at, ended_at")
MAC_SEPARATORS = re.compile(r"[\s:.\-]")  # between a MAC's bytes as people write them


def _signed(key: Ed25519PublicKey, cp: dict) -> bool:
    try:
        key.verify(bytes.fromhex(cp["signature"]), checkpoint_payload(cp))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _attempt_from_row(row: dict) -> Attempt:
    d = {k: row[k] for k in ATTEMPT_COLUMNS if k in row}
    for k in ("firmware_hashes", "durations", "written_regions", "burns"):
        d[k] = json.loads(d[k]) if d.get(k) else ({} if k not in ("written_regions", "burns") else [])
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
def m005_quarantine(db: Database) -> None:
    # an attempt after which the unit still holds the factory's test credentials (issue #13)
    db["attempts"].add_column("quarantine", int)


def burns_interrupted(a: Attempt) -> tuple[str, str]:
    """What an interrupted attempt's burns say: which are done, which may have happened, which never ran."""
    partly = burns_left(a)
    if partly is None:
        done = [b["burn"] for b in a.burns]
        return (f"interrupted after every eFuse burn was made ({'; '.join(done)}): the board's flash encryption "
                f"is set up; it may hold serial {a.serial} and part of its firmware",
                "put the board back on the line in the same mode: a development-mode unit is re-flashed with its "
                "escrowed key; a release-mode unit cannot be re-flashed: set it aside")
    return (f"interrupted: {partly}; the board may hold serial {a.serial}", PARTLY_BURNED_REMEDY)


PARTLY_BURNED_REMEDY = ("set the board aside for the engineer: read its eFuses (espefuse summary) before anything "
                        "else; its burns cannot be undone")


def burns_left(a: Attempt) -> str | None:
    """"efuses partly burned (done: …, may or may not have happened: …, not started: …)", or None: all done or none planned."""
    done = [b["burn"] for b in a.burns if b["state"] == "done"]
    maybe = [b["burn"] for b in a.burns if b["state"] == "burning"]
    never = [b["burn"] for b in a.burns if b["state"] == "pending"]
    if not maybe and not never:
        return None
    words = [f"done: {'; '.join(done) or 'none'}"]
    if maybe:
        words.append(f"may or may not have happened: {'; '.join(maybe)}")
    if never:
        words.append(f"not started: {'; '.join(never)}")
    return f"efuses partly burned ({', '.join(words)})"


@migrations()
def m006_central(db: Database) -> None:
    # issue #17: serial blocks leased from the central record, and how the duplicate guard was asked
    db["blocks"].create({"id": int, "counter": str, "first": int, "last": int, "lease_id": int,
                         "station_id": str, "leased_at": str}, pk="id", not_null={"counter", "first", "last"})
    db["blocks"].create_index(["counter", "first"])
    db["attempts"].add_column("guard", str)


@migrations()
def m007_secure_production(db: Database) -> None:
    # issue #18: the attempt's flash-encryption mode, its eFuse burns (journaled before each) and the escrowed key
    db["attempts"].add_column("flash_encryption", str)
    db["attempts"].add_column("burns", str)
    db["attempts"].add_column("key_escrow", str)
