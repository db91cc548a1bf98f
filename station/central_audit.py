"""Central exports: one signed export across every station, read from the central copy (`station export --central`).

The shape is a station export's (station/audit.py), widened to several chains, and
`station export verify` checks it as fully:

- **Who signs.** The machine that exports (a station, or the quality office's machine
  with its own station.toml, `[central] url` and signing key) signs the manifest with its
  signing key; no local record is read. The verifier pins that machine's key as for any
  export, and each producing station's key to check its checkpoints.
- **Only a copy that verifies is exported.** The export first runs the central `verify`
  (every station's chain linked from its genesis, every attempt row equal to its latest
  entry, every checkpoint signed under a key this machine trusts and extended), in the
  same REPEATABLE READ snapshot the rows and the journal are read from: an export never
  vouches for a copy edited in PostgreSQL, nor for a mix of two moments.
- **Rows** come from `attempts.row` (the attempt as its latest entry records it, which
  `verify` compares with the entry), never from the columns beside it, which nothing
  checks. Units: each board's latest passed attempt across the plant (a board reworked
  at another station keeps its serial; one that passed twice is exported once, and
  `station central conflicts` names it). Attempts: every attempt, with `prev_hash` and
  `row_hash` of its latest entry, as in a station export.
- **The journal** is one file: each station's segment of its central chain since the
  previous central export (the first: from the genesis), each entry with its station id
  and `seq` — every station's, whatever the filters (they narrow the rows; the series
  covers the whole copy, or a filtered export would leave the next one a gap). Per station the manifest states `after_seq`, `from_hash`, `entries`, `head`
  and the latest station-signed checkpoint inside the segment, with its signature: the
  station's own key then vouches for its entries up to that checkpoint, the exporter's
  for the rest.
- **A series.** Each export is recorded centrally (`central_exports`, migration c002)
  with where each segment ended; the next names its manifest hash and starts there, so
  `check_series` finds a missing one. Exports are serialised by an advisory lock: two
  machines exporting at once still make one series.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .audit import (ATTEMPT_FIELDS, AuditError, ExportFilter, _Counting, _write_rows, check_filter, journal_path,
                    paths, scope_of, sign_manifest, withholding)
from .central import verify
from .record import CHAIN_GENESIS, EXPORT_FIELDS, _signed, key_fingerprint, now_iso

CENTRAL_JOURNAL_FIELDS = ("station_id", "seq", "local_id", "kind", "attempt_uid", "at", "body", "unit", "prev_hash",
                          "entry_hash")
_EXPORT_LOCK = 0x5354_4E45  # "STNE": one central export at a time, plant-wide


class CentralExportRefused(AuditError):
    """The central copy does not verify (or no longer extends the previous export): nothing was written."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


# filters as in a station export, over the row the journal vouches for
_FILTERS = (("row->>'ended_at' >= %(since)s", "since"), ("row->>'ended_at' < %(until)s", "until"),
            ("row->>'profile' = %(profile)s", "profile"), ("row->>'operator' = %(operator)s", "operator"),
            ("station_id = %(station)s", "station"), ("row->>'lot' = %(lot)s", "lot"))


def _rows(conn: psycopg.Connection, f: ExportFilter) -> Iterator[dict]:
    joined = ("SELECT a.station_id, a.row, a.entry_hash, j.prev_hash FROM attempts a JOIN journal j "
              "ON j.station_id = a.station_id AND j.seq = a.entry_seq")
    if f.outcome is None:  # each board once: its latest pass anywhere; filters apply to that pass, as at a station
        sql = (f"SELECT * FROM (SELECT DISTINCT ON (row->>'mac') * FROM ({joined}) x WHERE row->>'outcome' = "
               "'passed' AND row->>'mac' IS NOT NULL ORDER BY row->>'mac', row->>'ended_at' DESC, station_id DESC, "
               "(row->>'id')::bigint DESC) u WHERE true")
    elif f.outcome == "any":
        sql = f"SELECT * FROM ({joined}) u WHERE true"
    else:
        sql = f"SELECT * FROM ({joined}) u WHERE row->>'outcome' = %(outcome)s"
    for cond, key in _FILTERS:
        if getattr(f, key) is not None:
            sql += f" AND {cond}"
    with conn.cursor(name="central_export_rows", row_factory=dict_row) as cur:
        cur.itersize = 2000
        cur.execute(sql + " ORDER BY station_id, (row->>'id')::bigint", asdict(f))
        for r in cur:
            yield {**r["row"], "station_id": r["station_id"], "prev_hash": r["prev_hash"], "row_hash": r["entry_hash"]}


def _segments(conn: psycopg.Connection, starts: dict[str, tuple[int, str]]) -> Iterator[dict]:
    with conn.cursor(name="central_export_journal", row_factory=dict_row) as cur:
        cur.itersize = 2000
        cur.execute("SELECT j.* FROM journal j JOIN (SELECT * FROM jsonb_each(%s)) s ON s.key = j.station_id "
                    "WHERE j.seq > (s.value->>0)::bigint ORDER BY j.station_id, j.seq",
                    [Jsonb({sid: [seq] for sid, (seq, _) in starts.items()})])
        yield from cur


def export(conn: psycopg.Connection, out: Path, fmt: str, f: ExportFilter, station_id: str,
           key: Ed25519PrivateKey, trusted: dict | None, chain_keys: dict[str, bytes] | None = None,
           signed: Callable = _signed) -> dict:
    """Verify the central copy, then write the data file, the journal segments, the manifest and its signature.

    `conn` is an autocommit connection to the central database; `trusted`: station id ->
    public keys (the exporter's trust store), as for `station central verify`.
    """
    check_filter(f)  # before anything is read or written
    conn.execute("SELECT pg_advisory_lock(%s)", [_EXPORT_LOCK])  # taken before the snapshot: it sees the last export
    written: list[Path] = []
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            problems, _ = verify(conn, trusted, chain_keys, signed)
            if problems:
                raise CentralExportRefused(
                    f"the central copy does not verify ({len(problems)} problem(s)); nothing was written", problems)
            series = conn.execute("SELECT id FROM central_identity").fetchone()[0]
            prev = conn.execute("SELECT number, manifest_sha256, exported_at, heads FROM central_exports "
                                "ORDER BY number DESC LIMIT 1").fetchone()
            before = prev[3] if prev else {}
            stations = conn.execute("SELECT station_id, entries, head FROM stations ORDER BY station_id").fetchall()
            starts: dict[str, tuple[int, str]] = {}
            lost = [sid for sid in before if sid not in {s[0] for s in stations}]
            for sid, _, _ in stations:
                seq, h = (before[sid]["seq"], before[sid]["head"]) if sid in before else (0, CHAIN_GENESIS)
                there = conn.execute("SELECT entry_hash FROM journal WHERE station_id = %s AND seq = %s",
                                     [sid, seq]).fetchone() if seq else (CHAIN_GENESIS,)
                if there is None or there[0] != h:
                    lost.append(sid)
                starts[sid] = (seq, h)
            if lost:  # verify walks from the genesis; this is the series' own continuity
                raise CentralExportRefused(
                    "the central copy no longer extends the previous central export; nothing was written",
                    [f"station {sid}: its chain no longer passes through entry {before[sid]['seq']} "
                     f"({before[sid]['head'][:16]}…) where central export {prev[0]} ended" if sid in before else
                     f"station {sid}: gone from the central copy since central export {prev[0]}" for sid in lost])
            fields = EXPORT_FIELDS if f.outcome is None else ATTEMPT_FIELDS
            written += [out, journal_path(out)]
            count, sha = _write_rows(_rows(conn, f), out, fmt, fields)
            scope = scope_of(f)
            in_scope = None
            if scope:  # one lot's or product's export: other attempts' entries keep only their place and hashes
                where = " AND ".join(f"row->>'{k}' = %({k})s" for k in scope)
                keys = {(sid, uid) for sid, uid in conn.execute(
                    f"SELECT station_id, uid FROM attempts WHERE {where}", scope).fetchall()}
                in_scope = lambda e: (e["station_id"], e["attempt_uid"]) in keys  # noqa: E731
            counted = _Counting(withholding(_segments(conn, starts), in_scope))
            entries, jsha = _write_rows(counted, journal_path(out), "jsonl",
                                        list(CENTRAL_JOURNAL_FIELDS) + (["withheld"] if scope else []))
            per_station = {}
            for sid, n, head in stations:
                after, from_hash = starts[sid]
                # the latest checkpoint inside the segment: the station's own signature over its head
                cp = conn.execute(
                    "SELECT body FROM checkpoints WHERE station_id = %s AND (body->>'entries')::bigint > %s AND "
                    "(body->>'entries')::bigint <= %s ORDER BY (body->>'entries')::bigint DESC, local_id DESC "
                    "LIMIT 1", [sid, after, n]).fetchone()
                per_station[sid] = {"after_seq": after, "from_hash": from_hash, "entries": n - after, "head": head,
                                    "checkpoint": cp[0] if cp else None}
            number = prev[0] + 1 if prev else 1
            manifest = {
                "kind": "units" if f.outcome is None else "attempts", "scope": "central", "station_id": station_id,
                "exported_at": now_iso(), "filters": {k: v for k, v in asdict(f).items() if v is not None},
                "format": fmt, "file": out.name, "rows": count, "sha256": sha,
                "central": {"series": series, "number": number},
                "journal": {"file": journal_path(out).name, "sha256": jsha, "entries": entries,
                            "stations": per_station,
                            **({"scope": scope, "withheld": counted.withheld} if scope else {})},
                "previous_export": {"manifest_sha256": prev[1], "number": prev[0], "at": prev[2]} if prev else None,
                "public_key_sha256": key_fingerprint(key),
            }
            written += list(paths(out))
            digest = sign_manifest(manifest, out, key)
            conn.execute("INSERT INTO central_exports (number, manifest_sha256, station_id, exported_at, heads) "
                         "VALUES (%s, %s, %s, %s, %s)",
                         [number, digest, station_id, manifest["exported_at"],
                          Jsonb({sid: {"seq": n, "head": head} for sid, n, head in stations})])
        written = []  # committed: the series names it
        return manifest
    finally:
        for p in written:  # an export the series does not record would be a fork of it
            p.unlink(missing_ok=True)
        with contextlib.suppress(psycopg.Error):  # a lost connection released it already
            conn.execute("SELECT pg_advisory_unlock(%s)", [_EXPORT_LOCK])


__all__ = ["export", "CentralExportRefused", "CENTRAL_JOURNAL_FIELDS"]
