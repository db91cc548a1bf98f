"""The plant's central record: several stations, one PostgreSQL, each station still whole offline.

The topology, and why each part is where it is (the README's "Several stations" says it
for the plant's engineer):

- **Each station keeps its own record** (station/record.py, SQLite): the line never
  waits for the network. The central database is a copy the stations feed, plus the two
  things that must be decided in one place for the whole plant: who owns which serials,
  and which boards passed anywhere.
- **The outbox is the journal.** A station's journal is already append-only, ordered and
  chained, and every state of every attempt is an entry of it, committed before the board
  is touched. So nothing is written twice on the line: a push thread (`Central.start`)
  sends the entries after the last one the central copy holds, in order, in one
  PostgreSQL transaction per batch, with the station's signed checkpoints. The central
  copy's own head is the cursor: a push is idempotent (the station's row is locked, the
  batch must continue its head, every entry has its place `seq` in the station's chain
  and every attempt is keyed by its uid), and resumes after any outage, restart or kill
  where the central copy stands. A journal that does not continue the central copy (a
  restored backup, another station under the same id) is never pushed over it: the push
  stops and says so.
- **Serial blocks.** With a central record, a station takes its serials from blocks it
  leases at the central database, one `UPDATE … RETURNING` on the counter's row in one
  transaction (PostgreSQL's row lock serialises concurrent leases: no two blocks
  overlap), recorded locally as a journaled `block` entry before any serial of it is
  used. A station leases the next block in the background when fewer than `low_water`
  serials are left, and tomorrow's block too when its pattern has a date before `{seq}`.
  It uses its blocks offline; with none left and the central database out of reach it
  refuses before any board is touched. A block leased but not recorded (a crash between
  the two commits) is a gap in the series, never a duplicate.
- **The plant-wide guard.** Before the serial step, the duplicate guard asks the central
  copy (one short query, `timeout_s`) whether the board's MAC passed at any station. Out
  of reach, it falls back to the station's own record and the attempt says
  `guard: local only`; `station central conflicts` reports a board that passed twice.
- **Verifying the central copy** (`verify`): each station's chain must be linked from its
  genesis, every attempt row must equal its latest entry, and each station's signed
  checkpoints (signature under the key the verifier trusts for that station) must name
  an entry of the central copy with the same head and count. Entry hashes are keyed
  (HMAC with the station's chain key): the central copy cannot recompute them, so a
  station verifies its own chain there with its key as well.

Secrets: the database password never sits in station.toml; it comes from
$STATION_CENTRAL_PASSWORD or the secrets file (`central_password`) and is one of the
station's redacted values.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from flashing.errors import UnitError

from .record import ATTEMPT_KINDS as _RECORD_ATTEMPT_KINDS
from .record import CHAIN_GENESIS, ENTRY_FIELDS, Record, RecordError, _entry_hash, _signed

PASSWORD_ENV = "STATION_CENTRAL_PASSWORD"
PASSWORD_SECRET = "central_password"  # its name in the station's secrets file
ATTEMPT_KINDS = _RECORD_ATTEMPT_KINDS  # the entry kinds that carry an attempt (`burn` too: issue #18)
PUSH_BATCH = 500  # entries per transaction: a long outage catches up in bounded steps

# The central schema, one migration per entry, applied in order by whichever station
# connects first (under an advisory lock: two stations never migrate at once).
MIGRATIONS: tuple[tuple[str, str], ...] = (
    ("c001_stations_journal_attempts", """
        CREATE TABLE stations (
            station_id text PRIMARY KEY,
            entries bigint NOT NULL DEFAULT 0,          -- how many of its journal entries are here
            head text NOT NULL DEFAULT '""" + CHAIN_GENESIS + """',
            last_local_id bigint NOT NULL DEFAULT 0,   -- the last pushed entry's id in the station's journal
            last_checkpoint_id bigint NOT NULL DEFAULT 0,
            first_push timestamptz NOT NULL DEFAULT now(),
            last_push timestamptz
        );
        CREATE TABLE journal (
            station_id text NOT NULL REFERENCES stations,
            seq bigint NOT NULL,                        -- 1, 2, ...: the entry's place in its station's chain
            local_id bigint NOT NULL,
            kind text NOT NULL,
            attempt_uid text NOT NULL,
            at text NOT NULL,
            body text NOT NULL,
            unit text,
            prev_hash text NOT NULL,
            entry_hash text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (station_id, seq),
            UNIQUE (station_id, local_id)
        );
        CREATE TABLE attempts (
            station_id text NOT NULL,
            uid text NOT NULL,
            mac text,
            serial text,
            outcome text NOT NULL,
            profile text,
            lot text,
            operator text,
            started_at text,
            ended_at text,
            rework boolean NOT NULL DEFAULT false,
            row jsonb NOT NULL,                         -- the attempt as its latest entry records it
            entry_seq bigint NOT NULL,
            entry_hash text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (station_id, uid)
        );
        CREATE INDEX attempts_mac ON attempts (mac);
        CREATE INDEX attempts_serial ON attempts (serial);
        CREATE INDEX attempts_ended ON attempts (ended_at);
        CREATE TABLE checkpoints (
            signature text PRIMARY KEY,
            station_id text NOT NULL,
            local_id bigint NOT NULL,
            body jsonb NOT NULL,
            received_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE TABLE counters (name text PRIMARY KEY, next bigint NOT NULL);
        CREATE TABLE leases (
            id bigserial PRIMARY KEY,
            station_id text NOT NULL,
            counter text NOT NULL,
            first bigint NOT NULL,
            last bigint NOT NULL,
            leased_at timestamptz NOT NULL DEFAULT now()
        );
    """),
    # central exports (station/central_audit.py): the series they form, so the next one names its predecessor
    ("c002_central_exports", """
        CREATE TABLE central_identity (
            id text PRIMARY KEY DEFAULT gen_random_uuid()::text,  -- names this central copy's export series
            created_at timestamptz NOT NULL DEFAULT now()
        );
        INSERT INTO central_identity DEFAULT VALUES;
        CREATE TABLE central_exports (
            number bigint PRIMARY KEY,                  -- 1, 2, ...: the place in the series
            manifest_sha256 text NOT NULL UNIQUE,
            station_id text NOT NULL,                   -- the machine that signed it
            exported_at text NOT NULL,
            heads jsonb NOT NULL,                       -- station id -> {"seq", "head"}: where each segment ended
            recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );
    """),
)
_MIGRATION_LOCK = 0x5354_4E43  # "STNC": the advisory lock id of the schema's migrations


class CentralError(UnitError):
    """The central database is out of reach or refused (the station carries on where it can)."""


class CentralConflict(CentralError):
    """The station's journal does not continue the central copy of its chain: nothing is pushed over it."""


@dataclass(frozen=True)
class Block:
    counter: str
    first: int
    last: int
    lease_id: int


@dataclass
class GuardAnswer:
    """What the plant-wide guard found: a pass anywhere (or None), and whether the central copy answered."""

    prior: dict | None
    where: str  # "central" or "local only"
    why: str = ""  # why the central copy did not answer


@dataclass
class PushState:
    online: bool | None = None  # None until the first push or query says
    last_error: str = ""
    pushed: int = 0  # entries this process pushed
    last_push: float = 0.0  # monotonic time of the last push that reached the database
    leases: list[Block] = field(default_factory=list)


def connection_url(url: str, password: str | None) -> str:
    """The URL with the password from the environment or the secrets file (never from station.toml)."""
    if not password:
        return url
    params = psycopg.conninfo.conninfo_to_dict(url)
    params["password"] = password
    return psycopg.conninfo.make_conninfo(**params)


def central_password(store_path, env) -> str | None:
    """The central database's password: $STATION_CENTRAL_PASSWORD, else the secrets file's central_password."""
    if env.get(PASSWORD_ENV):
        return env[PASSWORD_ENV]
    from .secrets import PASSPHRASE_ENV, SecretStore, SecretStoreError

    if not env.get(PASSPHRASE_ENV) or not store_path.exists():
        return None
    try:
        return SecretStore(store_path, env[PASSPHRASE_ENV]).load().get(PASSWORD_SECRET)
    except SecretStoreError:
        return None


def url_problem(url: str) -> str | None:
    """What is wrong with a [central] url, in words of station.toml (None: fine)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return "not a PostgreSQL URL: write postgresql://user@host:5432/dbname"
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        return f"not a PostgreSQL URL ({exc})"
    if params.get("password"):
        return (f"holds a password: station.toml is not a secret; put it in ${PASSWORD_ENV} or the secrets file "
                f"(station secrets set {PASSWORD_SECRET}) and remove it from the URL")
    return None


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply the central schema's migrations that are missing; return their names."""
    done = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK])
        conn.execute("CREATE TABLE IF NOT EXISTS central_migrations (name text PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        have = {r[0] for r in conn.execute("SELECT name FROM central_migrations")}
        for name, sql in MIGRATIONS:
            if name not in have:
                conn.execute(sql)
                conn.execute("INSERT INTO central_migrations (name) VALUES (%s)", [name])
                done.append(name)
    return done


class Central:
    """One station's link to the central record: push thread, serial leases, the plant-wide guard."""

    def __init__(self, settings, password: str | None, record: Record, station_id: str):
        self.settings = settings
        self.record = record
        self.station_id = station_id
        self._conninfo = connection_url(settings.url, password)
        self._where = _shown(settings.url)
        self.state = PushState()
        self._query_lock = threading.Lock()  # guard and synchronous leases share one connection
        self._query_conn: psycopg.Connection | None = None
        self._push_conn: psycopg.Connection | None = None
        self._down_until = 0.0  # after a failure, the guard answers from the local record until then
        self._migrated = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._want: dict[str, tuple[int, int | None]] = {}  # counter -> (floor, max value): blocks to lease
        self._want_lock = threading.Lock()
        self._lease_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- connections ---------------------------------------------------------------------------
    def connect(self, statement_timeout: bool = False) -> psycopg.Connection:
        """A connection; with `statement_timeout` every statement after the migrations is bounded by timeout_s."""
        timeout = self.settings.timeout_s
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=max(1, round(timeout)),
                                   application_name=f"station {self.station_id}"[:63],
                                   # a dead link fails a query instead of hanging it (Linux TCP_USER_TIMEOUT)
                                   tcp_user_timeout=int(timeout * 1000), keepalives_idle=max(1, int(timeout)),
                                   keepalives_interval=1, keepalives_count=2)
        except psycopg.Error as exc:
            raise self._error(exc, "connecting") from None
        if not self._migrated:
            try:
                migrate(conn)
            except psycopg.Error as exc:
                conn.close()
                raise self._error(exc, "preparing its schema") from None
            self._migrated = True
        if statement_timeout:
            # once per connection, not per query (the guard is one round trip; 16 units queue on this
            # connection); a session setting, not a startup option, which poolers such as PgBouncer refuse
            try:
                conn.execute("SELECT set_config('statement_timeout', %s, false)", [str(int(timeout * 1000))])
            except psycopg.Error as exc:
                conn.close()
                raise self._error(exc, "connecting") from None
        return conn

    def _error(self, exc: Exception, doing: str) -> CentralError:
        text = " ".join(str(exc).split()) or type(exc).__name__
        self.state.last_error = text  # the cause alone: later messages quote it once
        return CentralError(f"the central database {self._where} is out of reach while {doing} ({text})",
                            "the station carries on from its own record and serial block; check the network "
                            "and the database server, the station catches up by itself")

    @contextlib.contextmanager
    def _query(self) -> Iterator[psycopg.Connection]:
        """The shared query connection, (re)opened on demand; a failure closes it and opens the circuit."""
        with self._query_lock:
            if time.monotonic() < self._down_until:
                raise CentralError(f"the central database {self._where} is out of reach ({self.state.last_error}; "
                                   "the station tries again shortly)", "the station carries on from its own record")
            try:
                if self._query_conn is None or self._query_conn.closed:
                    self._query_conn = self.connect(statement_timeout=True)
                yield self._query_conn
            except (psycopg.Error, CentralError) as exc:
                self._went_down(exc)
                if self._query_conn is not None:
                    self._query_conn.close()
                    self._query_conn = None
                raise exc if isinstance(exc, CentralError) else self._error(exc, "querying") from None

    def _went_down(self, exc: Exception) -> None:
        self.state.online = False
        if not isinstance(exc, CentralError):
            self.state.last_error = " ".join(str(exc).split())
        now = time.monotonic()
        if now >= self._down_until:  # a refusal of the open circuit is no new failure: it must not keep it open
            self._down_until = now + self.settings.retry_s

    # -- the plant-wide guard ------------------------------------------------------------------------
    def passed_anywhere(self, mac: str) -> GuardAnswer:
        """Whether the board passed at any station, per the central copy; else per this station's record."""
        try:
            with self._query() as conn:
                with conn.cursor(row_factory=dict_row) as cur:
                    row = cur.execute("SELECT station_id, serial, ended_at FROM attempts WHERE mac = %s AND "
                                      "outcome = 'passed' ORDER BY ended_at DESC LIMIT 1", [mac]).fetchone()
            local = self.record.passed_unit(mac=mac)
            if row is None and local:  # passed here, not yet pushed
                row = {"station_id": self.station_id, "serial": local["serial"]}
            return GuardAnswer(row, "central")
        except CentralError as exc:
            return GuardAnswer(self.record.passed_unit(mac=mac), "local only", exc.message)

    # -- serial blocks ---------------------------------------------------------------------------------
    def need_serials(self, counter: str, max_value: int | None, later: tuple[str, ...] = ()) -> None:
        """Before a serial is reserved: make sure the counter has one; lease ahead in the background.

        Raises RecordError (no board touched) when the counter has no serial left here and the
        central database cannot lease a block now.
        """
        left = self.record.serials_left(counter)
        if left < self.settings.low_water:
            self._ask(counter, max_value)
        for name in later:  # tomorrow's counter, leased while the network is there
            if self.record.serials_left(name) == 0:
                self._ask(name, max_value)
        if left > 0:
            return
        try:
            self.lease(counter, max_value)
        except CentralError as exc:
            raise RecordError(f"no serial block is left for {counter!r} and the central database cannot lease one: "
                              f"{exc.message}",
                              "check the network to the central database (station central status); no board "
                              "was touched") from None

    def _ask(self, counter: str, max_value: int | None) -> None:
        with self._want_lock:
            self._want[counter] = max_value
        self._wake.set()

    def lease(self, counter: str, max_value: int | None = None) -> Block | None:
        """Lease the next block of `counter` centrally and record it here; None: another thread just did."""
        with self._lease_lock:
            if self.record.serials_left(counter) >= max(1, self.settings.low_water):
                return None
            floor = self.record.counter_value(counter) + 1  # after every serial this station ever used
            size = self.settings.block_size
            with self._query() as conn, conn.transaction():
                conn.execute("INSERT INTO counters (name, next) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
                             "SET next = greatest(counters.next, excluded.next)", [counter, floor])
                first = conn.execute("UPDATE counters SET next = next + %s WHERE name = %s RETURNING next - %s",
                                     [size, counter, size]).fetchone()[0]
                last = first + size - 1 if max_value is None else min(first + size - 1, max_value)
                if first > last:
                    raise RecordError(f"the serial counter {counter!r} is exhausted plant-wide (the next serial "
                                      f"would be {first}, the pattern's maximum is {max_value})",
                                      "call the station's engineer: widen the profile's serial pattern or start "
                                      "a new series; no board was touched")
                lease_id = conn.execute("INSERT INTO leases (station_id, counter, first, last) VALUES "
                                        "(%s, %s, %s, %s) RETURNING id",
                                        [self.station_id, counter, first, last]).fetchone()[0]
            block = Block(counter, first, last, lease_id)
            self.record.add_block(block.counter, block.first, block.last, block.lease_id, self.station_id)
            self.state.leases.append(block)
            self._wake.set()  # the block's journal entry goes central soon
            return block

    # -- the push ----------------------------------------------------------------------------------------
    def push(self, conn: psycopg.Connection | None = None) -> int:
        """Send this station's journal entries the central copy lacks, and its checkpoints; return how many."""
        own = conn is None
        conn = conn or self.connect()
        try:
            total = 0
            while True:
                n = self._push_batch(conn)
                total += n
                if n < PUSH_BATCH:
                    break
            self.state.pushed += total
            self.state.online, self.state.last_error = True, ""
            self._down_until = 0.0  # reached again: the guard asks the central record at once
            self.state.last_push = time.monotonic()
            return total
        except psycopg.Error as exc:
            raise self._error(exc, "pushing the record") from None
        finally:
            if own:
                conn.close()

    def _push_batch(self, conn: psycopg.Connection) -> int:
        sid = self.station_id
        with conn.transaction():
            conn.execute("INSERT INTO stations (station_id) VALUES (%s) ON CONFLICT DO NOTHING", [sid])
            entries, head, last_local, last_cp = conn.execute(
                "SELECT entries, head, last_local_id, last_checkpoint_id FROM stations WHERE station_id = %s "
                "FOR UPDATE", [sid]).fetchone()
            db = self.record.db()
            rows = list(db.query("select * from journal where station_id = ? and id > ? order by id limit ?",
                                 [sid, last_local, PUSH_BATCH]))
            mine = db.execute("select entry_hash from journal where id = ?", [last_local]).fetchone() \
                if last_local else (CHAIN_GENESIS,)
            prev = head
            for n, e in enumerate([None, *rows]):
                if (e is None and (mine is None or mine[0] != head)) or (e is not None and e["prev_hash"] != prev):
                    if n <= 1:
                        raise CentralConflict(
                            f"station {sid}'s journal does not continue the central copy of its chain (central "
                            f"head {head[:16]}… after {entries} entries): this record is not the one the central "
                            "copy holds (a restored backup, a new database, or two stations with one id)",
                            "nothing was pushed over it: call the station's engineer (station central verify)")
                    raise CentralConflict(f"station {sid}'s journal entry {e['id']} does not follow the one before "
                                          "it: the local journal is damaged",
                                          "run station db verify; nothing was pushed past it")
                if e is not None:
                    prev = e["entry_hash"]
            if rows:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO journal (station_id, seq, local_id, kind, attempt_uid, at, body, unit, "
                        "prev_hash, entry_hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        [(sid, entries + i + 1, e["id"], e["kind"], e["attempt_uid"], e["at"], e["body"], e["unit"],
                          e["prev_hash"], e["entry_hash"]) for i, e in enumerate(rows)])
                    latest: dict[str, tuple[int, dict]] = {}
                    for i, e in enumerate(rows):
                        if e["kind"] in ATTEMPT_KINDS:
                            latest[e["attempt_uid"]] = (entries + i + 1, e)
                    cur.executemany(
                        "INSERT INTO attempts AS a (station_id, uid, mac, serial, outcome, profile, lot, operator, "
                        "started_at, ended_at, rework, row, entry_seq, entry_hash) VALUES (%s, %s, %s, %s, %s, %s, "
                        "%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (station_id, uid) DO UPDATE SET mac = "
                        "excluded.mac, serial = excluded.serial, outcome = excluded.outcome, profile = "
                        "excluded.profile, lot = excluded.lot, operator = excluded.operator, started_at = "
                        "excluded.started_at, ended_at = excluded.ended_at, rework = excluded.rework, row = "
                        "excluded.row, entry_seq = excluded.entry_seq, entry_hash = excluded.entry_hash, "
                        "received_at = clock_timestamp() WHERE a.entry_seq < excluded.entry_seq",
                        [_attempt_params(sid, uid, seq, e) for uid, (seq, e) in latest.items()])
                conn.execute("UPDATE stations SET entries = %s, head = %s, last_local_id = %s, last_push = now() "
                             "WHERE station_id = %s", [entries + len(rows), prev, rows[-1]["id"], sid])
                last_local = rows[-1]["id"]
            # the checkpoints whose entries are all central now (a checkpoint never names an entry not yet here)
            cps = list(self.record.db().query(
                "select * from checkpoints where station_id = ? and id > ? and last_id <= ? order by id",
                [sid, last_cp, last_local]))
            if cps:
                conn.cursor().executemany(
                    "INSERT INTO checkpoints (signature, station_id, local_id, body) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    [(cp["signature"], sid, cp["id"], Jsonb(_checkpoint_body(cp))) for cp in cps])
                conn.execute("UPDATE stations SET last_checkpoint_id = %s WHERE station_id = %s", [cps[-1]["id"], sid])
        return len(rows)

    # -- the thread that feeds the central copy -------------------------------------------------------
    def start(self) -> "Central":
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"central-push-{self.station_id}")
        self._thread.start()
        return self

    def words(self) -> tuple[str, bool]:
        """For the operator: what the central record is to this station now, and whether that is a warning."""
        if self.state.online is None:
            return "central: connecting", False
        if self.state.online:
            return "central: online", False
        return "CENTRAL OFFLINE: duplicate check on this station only, serials from its block", True

    def kick(self) -> None:
        """Something was recorded: push soon."""
        self._wake.set()

    def _run(self) -> None:
        backoff = 0.0
        while True:
            self._wake.wait(backoff or self.settings.push_interval_s)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self._leases_wanted()
                if self._push_conn is None or self._push_conn.closed:
                    self._push_conn = self.connect()
                self.push(self._push_conn)
                backoff = 0.0
            except CentralError as exc:
                self._went_down(exc)
                if self._push_conn is not None:
                    self._push_conn.close()
                    self._push_conn = None
                backoff = min(max(backoff * 2, self.settings.push_interval_s), self.settings.retry_s)
            except Exception as exc:  # a bug must not end the push for the rest of the shift
                self.state.last_error = f"{type(exc).__name__}: {exc}"
                backoff = self.settings.retry_s
            if stopping:
                break

    def _leases_wanted(self) -> None:
        with self._want_lock:
            want, self._want = self._want, {}
        for counter, max_value in want.items():
            try:
                self.lease(counter, max_value)
            except CentralError:
                with self._want_lock:  # asked again on the next round; the push below still tries on its own
                    for name, top in want.items():
                        self._want.setdefault(name, top)
                return
            except RecordError:
                pass  # exhausted, or the local record is held: the unit that needs it says so

    def close(self) -> None:
        """Stop the push thread after one last push (bounded by the timeout), and close the connections."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(self.settings.timeout_s * 4 + 5)
            self._thread = None
        for conn in (self._push_conn, self._query_conn):
            if conn is not None:
                conn.close()
        self._push_conn = self._query_conn = None


def _attempt_params(sid: str, uid: str, seq: int, e: dict) -> tuple:
    row = json.loads(e["body"])
    return (sid, uid, row.get("mac"), row.get("serial"), row.get("outcome") or "", row.get("profile"),
            row.get("lot"), row.get("operator"), row.get("started_at"), row.get("ended_at") or None,
            bool(row.get("rework")), Jsonb(row), seq, e["entry_hash"])


def _checkpoint_body(cp: dict) -> dict:
    return {k: cp[k] for k in ("station_id", "last_id", "entries", "head", "at", "reason", "public_key_sha256",
                               "signature")}


def _shown(url: str) -> str:
    try:
        p = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unreadable URL)"
    return f"{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '')}"


# -- reading the central copy (verify, conflicts, status) ------------------------------------------
def verify(conn: psycopg.Connection, trusted: dict | None, chain_keys: dict[str, bytes] | None = None,
           signed: Callable[[object, dict], bool] = _signed) -> tuple[list[str], list[str]]:
    """Walk every station's chain in the central copy; return (problems, notes).

    `trusted`: station id -> public keys its checkpoints must verify under (from the
    verifier's trust store); `chain_keys`: the chain keys the verifier holds (a station
    its own), whose entries are recomputed too.
    """
    problems: list[str] = []
    notes: list[str] = []
    fresh = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if fresh:  # one snapshot: stations pushing meanwhile do not make a consistent copy look broken
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        stations = conn.execute("SELECT station_id, entries, head FROM stations ORDER BY station_id").fetchall()
        for sid, entries, head in stations:
            problems += _verify_station(conn, sid, entries, head, trusted, (chain_keys or {}).get(sid), signed,
                                        notes)
    return problems, notes


def _verify_station(conn, sid: str, entries: int, head: str, trusted, chain_key: bytes | None, signed,
                    notes: list[str]) -> list[str]:
    where = f"station {sid}"
    prev, n, at_seq = CHAIN_GENESIS, 0, {}
    latest: dict[str, tuple[int, str, dict]] = {}
    with conn.cursor(name=f"walk_{abs(hash(sid))}", row_factory=dict_row) as cur:
        cur.itersize = 2000
        cur.execute("SELECT * FROM journal WHERE station_id = %s ORDER BY seq", [sid])
        for e in cur:
            n += 1
            if e["seq"] != n:
                return [f"{where}: central entry {n} is missing (the copy jumps to entry {e['seq']}): an entry was "
                        "deleted from the central copy"]
            if e["prev_hash"] != prev:
                return [f"{where}: central entry {n} (its journal entry {e['local_id']}) does not follow the entry "
                        "before it: the central copy was edited"]
            if chain_key is not None and not hmac.compare_digest(
                    _entry_hash(chain_key, e["prev_hash"], e), e["entry_hash"]):
                return [f"{where}: central entry {n} (its journal entry {e['local_id']}) is not what the station "
                        "recorded: it was edited in the central copy"]
            prev = e["entry_hash"]
            at_seq[n] = prev
            if e["kind"] in ATTEMPT_KINDS:
                latest[e["attempt_uid"]] = (n, e["entry_hash"], json.loads(e["body"]))
    problems = []
    if n != entries or prev != head:
        problems.append(f"{where}: the central copy holds {n} entries ending at {prev[:16]}… but its station row "
                        f"says {entries} ending at {head[:16]}…: entries were deleted or added behind the push")
    rows = conn.execute("SELECT uid, row, entry_seq, entry_hash FROM attempts WHERE station_id = %s",
                        [sid]).fetchall()
    seen = set()
    for uid, row, seq, ehash in rows:
        seen.add(uid)
        want = latest.get(uid)
        if want is None:
            problems.append(f"{where}: attempt {uid} is in the central attempts but in none of its entries: it was "
                            "inserted behind the push")
        elif want[1] != ehash or row != want[2]:
            problems.append(f"{where}: attempt {row.get('id')} (uid {uid}) differs from its journal entry "
                            f"{want[0]}: it was edited in the central copy")
    for uid, (seq, _, body) in latest.items():
        if uid not in seen:
            problems.append(f"{where}: attempt {body.get('id')} (uid {uid}) was deleted from the central attempts "
                            f"(central entry {seq} records it)")
    cps = conn.execute("SELECT body FROM checkpoints WHERE station_id = %s ORDER BY local_id", [sid]).fetchall()
    checked = 0
    for (cp,) in cps:
        keys = (trusted or {}).get(sid, []) if trusted is not None else None
        if keys is not None:
            if not keys:
                problems.append(f"{where}: its checkpoints cannot be checked: no key is trusted for this station "
                                "(station keys trust PEM --station ID)")
                break
            if signed is None or not any(signed(k, cp) for k in keys):
                problems.append(f"{where}: the checkpoint of {cp['at']} is not signed by a key trusted for this "
                                "station: it was forged or altered")
                continue
        if cp["entries"] and at_seq.get(cp["entries"]) != cp["head"]:
            problems.append(f"{where}: the central copy does not extend the checkpoint of {cp['at']} (entry "
                            f"{cp['entries']}, head {cp['head'][:16]}…): entries were deleted or the chain was "
                            "rewritten")
            break
        checked += 1
    notes.append(f"{where}: {n} entries linked from the genesis{' and recomputed with its chain key' if chain_key else ''}"
                 f", {len(rows)} attempts equal their entries, {checked} signed checkpoint(s) match")
    return problems


def conflicts(conn: psycopg.Connection) -> list[dict]:
    """Boards provisioned twice across the plant, and serials on two boards."""
    out = []
    for mac, stations, serials in conn.execute(
            "SELECT mac, array_agg(DISTINCT station_id ORDER BY station_id), array_agg(DISTINCT serial ORDER BY "
            "serial) FROM attempts WHERE outcome = 'passed' AND mac IS NOT NULL GROUP BY mac HAVING "
            "count(*) FILTER (WHERE NOT rework) > 1 OR count(DISTINCT serial) > 1 ORDER BY mac"):
        out.append({"kind": "board passed twice", "mac": mac, "stations": stations, "serials": serials})
    for serial, macs, stations in conn.execute(
            "SELECT serial, array_agg(DISTINCT mac ORDER BY mac), array_agg(DISTINCT station_id ORDER BY station_id) "
            "FROM attempts WHERE serial IS NOT NULL AND outcome <> 'started' GROUP BY serial "
            "HAVING count(DISTINCT mac) > 1 ORDER BY serial"):
        out.append({"kind": "serial on two boards", "serial": serial, "macs": macs, "stations": stations})
    return out


def status(conn: psycopg.Connection) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT s.station_id, s.entries, s.head, s.last_push, (SELECT count(*) FROM attempts a WHERE "
            "a.station_id = s.station_id) AS attempts, (SELECT count(*) FROM leases l WHERE l.station_id = "
            "s.station_id) AS leases FROM stations s ORDER BY s.station_id").fetchall()


__all__ = ["Central", "CentralError", "CentralConflict", "Block", "GuardAnswer", "migrate", "verify", "conflicts",
           "status", "url_problem", "connection_url", "PASSWORD_ENV", "PASSWORD_SECRET", "ENTRY_FIELDS"]
