"""Issue #13: pinned station keys, and a keyed, anchored chain that catches more than edits in place.

Each tamper below is what the security review did to a real database file or export;
each must be caught by the station's own commands (`station db verify`, `station export
verify`, `station export merge`) after a signed checkpoint.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlite_utils import Database

from station.audit import TrustStore, public_pem, signing_key, write_checkpoint
from station.config import StationConfig
from station.record import (
    CHAIN_GENESIS,
    CHAIN_KEY_PURPOSE,
    SPOOL_KEY_PURPOSE,
    Attempt,
    Record,
    RecordError,
    SerialPlan,
    _entry_hash,
    _entry_hash_v1,
    derive_key,
    migrations,
    now_iso,
    station_key,
)
from tests.station.conftest import run_station

PLAN = SerialPlan(counter="RLY-", render=lambda n: f"RLY-{n:05}")


def _record(env: Path) -> Record:
    return Record(env / "station.db", station_key(env / "station.key"), station_id="test-station")


def _provision(record: Record, n: int, first: int = 0, lot: str = "LOT-1") -> list[Attempt]:
    """n units through the record as the pipeline writes them: started (serial reserved), then passed."""
    done = []
    for i in range(first, first + n):
        a = Attempt(port=f"p{i}", station_id="test-station", profile="relay", profile_hash="h",
                    started_at=now_iso(), mac=f"24:0a:c4:00:02:{i:02x}", lot=lot)
        record.start(a, PLAN)
        a.outcome, a.ended_at = "passed", now_iso()
        assert record.finish(a).attempt_id
        done.append(a)
    return done


def _checkpoint(env: Path, record: Record) -> None:
    write_checkpoint(record, StationConfig.load(env / "station.toml"), "test")


def _db_verify(capsys) -> tuple[int, str]:
    rc, out, err = run_station(capsys, "db", "verify")
    return rc, out + err


def _sql(env: Path, *statements: str, args=()) -> None:
    con = sqlite3.connect(env / "station.db")
    con.execute("PRAGMA foreign_keys=OFF")
    for s in statements:
        con.execute(s, args) if args else con.execute(s)
    con.commit()
    con.close()


def _rechain(env: Path, digest) -> None:
    """Rewrite the whole chain from the first entry with `digest(prev, entry)`, attempts' hashes to match."""
    con = sqlite3.connect(env / "station.db")
    con.row_factory = sqlite3.Row
    prev = CHAIN_GENESIS
    for e in [dict(r) for r in con.execute("select * from journal order by id")]:
        new = digest(prev, e)
        con.execute("update journal set prev_hash = ?, entry_hash = ? where id = ?", [prev, new, e["id"]])
        con.execute("update attempts set prev_hash = ?, row_hash = ? where row_hash = ?", [prev, new, e["entry_hash"]])
        prev = new
    con.commit()
    con.close()


def _unkeyed(prev: str, e: dict) -> str:
    canonical = json.dumps({k: e[k] for k in ("station_id", "kind", "attempt_uid", "at", "body", "unit")},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + canonical).encode()).hexdigest()


def _truncate_last_unit(env: Path) -> None:
    """Delete the last unit as if it had never been: its entries, attempt, unit row, counter value."""
    con = sqlite3.connect(env / "station.db")
    first = con.execute("select min(id) from journal where attempt_uid = (select uid from attempts "
                        "order by id desc limit 1)").fetchone()[0]
    con.execute("delete from journal where id >= ?", [first])
    mac = con.execute("select mac from attempts order by id desc limit 1").fetchone()[0]
    con.execute("delete from attempts where mac = ?", [mac])
    con.execute("delete from units where mac = ?", [mac])
    con.execute("update counters set value = value - 1")
    con.commit()
    con.close()


def _rewrite_with_the_chain_key(env: Path) -> None:
    """An insider with the station's chain key (not its signing key) edits a serial and re-keys everything."""
    key = derive_key(station_key(env / "station.key"), CHAIN_KEY_PURPOSE)
    _sql(env, "update journal set body = replace(body, 'RLY-00002', 'RLY-00009'), "
              "unit = replace(unit, 'RLY-00002', 'RLY-00009')",
         "update attempts set serial = 'RLY-00009' where serial = 'RLY-00002'",
         "update units set serial = 'RLY-00009' where serial = 'RLY-00002'")
    _rechain(env, lambda prev, e: _entry_hash(key, prev, e))


def _append_forged_entry(env: Path) -> None:
    """A forged attempt appended to the journal with a correct (unkeyed SHA-256) hash, and its row."""
    con = sqlite3.connect(env / "station.db")
    con.row_factory = sqlite3.Row
    last = dict(con.execute("select * from journal order by id desc limit 1").fetchone())
    body = json.loads(con.execute("select body from journal where kind = 'finished' order by id desc limit 1")
                      .fetchone()[0])
    body.update(id=99, uid="f" * 32, serial="RLY-FORGED", mac="24:0a:c4:ff:ff:ff")
    entry = {"station_id": "test-station", "kind": "recorded", "attempt_uid": "f" * 32, "at": now_iso(),
             "body": json.dumps(body, sort_keys=True, separators=(",", ":")), "unit": None}
    digest = _unkeyed(last["entry_hash"], entry)
    con.execute("insert into journal (station_id, kind, attempt_uid, at, body, unit, prev_hash, entry_hash) "
                "values (?, ?, ?, ?, ?, ?, ?, ?)", [*entry.values(), last["entry_hash"], digest])
    cols = list(body)
    con.execute(f"insert into attempts ({', '.join(cols)}, prev_hash, row_hash) values "
                f"({', '.join('?' for _ in cols)}, ?, ?)", [*body.values(), last["entry_hash"], digest])
    con.commit()
    con.close()


TAMPERS = {
    "tail truncated": (_truncate_last_unit, "the journal no longer extends the checkpoint"),
    "journal row appended with an unkeyed hash": (_append_forged_entry, "written without the station's key"),
    "attempts row appended": (lambda env: _sql(
        env, "insert into attempts (id, uid, station_id, mac, serial, outcome, row_hash) values "
             "(50, 'x', 'test-station', '24:0a:c4:ee:ee:ee', 'RLY-77777', 'passed', 'y')"),
        "attempt 50 is not in the journal"),
    "whole chain rewritten with unkeyed SHA-256": (
        lambda env: _rechain(env, _unkeyed), "journal entry 1 was edited after it was recorded, or written "
                                             "without the station's key"),
    "whole chain rewritten with a wrong key": (
        lambda env: _rechain(env, lambda prev, e: _entry_hash(os.urandom(32), prev, e)),
        "journal entry 1 was edited after it was recorded, or written without the station's key"),
    "whole chain rewritten with the chain key": (_rewrite_with_the_chain_key,
                                                 "the journal no longer extends the checkpoint"),
    "unit's serial edited": (lambda env: _sql(env, "update units set serial = 'RLY-00042' where id = 2"),
                             "unit 2 (24:0a:c4:00:02:01) was edited after it was recorded (serial"),
    "unit's state edited": (lambda env: _sql(env, "update units set state = 'failed' where id = 1"),
                            "unit 1 (24:0a:c4:00:02:00) was edited after it was recorded (state"),
    "unit deleted": (lambda env: _sql(env, "delete from units where id = 3"), "unit 3 (24:0a:c4:00:02:02, "
                                                                              "serial RLY-00003) was deleted"),
    "counter edited": (lambda env: _sql(env, "update counters set value = 7"),
                       "serial counter 'RLY-' is 7 but the journal's last value is 3"),
    "counter reset": (lambda env: _sql(env, "update counters set value = 0"),
                      "serial counter 'RLY-' is 0 but the journal's last value is 3"),
    "counter deleted": (lambda env: _sql(env, "delete from counters"), "serial counter 'RLY-' was deleted"),
    "checkpoints deleted, then the tail": (
        lambda env: (_sql(env, "delete from checkpoints"), _truncate_last_unit(env)),
        "the journal no longer extends the checkpoint"),  # the copy kept beside the trust store
    "checkpoint forged": (lambda env: _sql(env, "update checkpoints set entries = entries - 1, last_id = "
                                                "last_id - 1"),
                          "is not signed by a key trusted for this station"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_db_verify_catches_what_edits_in_place_did_not(station_env, capsys, tamper):
    record = _record(station_env)
    _provision(record, 3)
    _checkpoint(station_env, record)
    record.close()
    rc, out = _db_verify(capsys)
    assert rc == 0 and "intact: 3 attempts" in out and "1 signed checkpoint" in out, out
    do, says = TAMPERS[tamper]
    do(station_env)
    rc, out = _db_verify(capsys)
    assert rc == 1 and says in out, out


def test_a_database_rolled_back_to_an_older_copy_is_caught_by_the_checkpoint_kept_outside_it(station_env, capsys):
    record = _record(station_env)
    _provision(record, 2)
    record.close()
    shutil.copy(station_env / "station.db", station_env / "older.db")  # a copy, checkpoints and all
    record = _record(station_env)
    _provision(record, 1, first=2)
    _checkpoint(station_env, record)
    record.close()
    for suffix in ("-wal", "-shm"):
        (station_env / f"station.db{suffix}").unlink(missing_ok=True)
    shutil.copy(station_env / "older.db", station_env / "station.db")
    rc, out = _db_verify(capsys)
    assert rc == 1 and "the journal no longer extends the checkpoint" in out, out


def test_a_forged_spool_line_is_caught_by_db_verify(station_env, capsys):
    record = _record(station_env)
    _provision(record, 1)
    _checkpoint(station_env, record)
    body = json.dumps({"kind": "recorded", "attempt": {"port": "p", "station_id": "test-station", "profile": "relay",
                                                       "profile_hash": "h", "started_at": now_iso(),
                                                       "outcome": "passed", "serial": "RLY-FORGED"}})
    # a forger who knows the format, not the key: HMAC under the raw station key is not the spool's key
    raw = station_key(station_env / "station.key")
    forged = hmac.new(raw, body.encode(), hashlib.sha256).hexdigest()
    record.spool.write_text(json.dumps({"hmac": forged, "body": body}) + "\n")
    rc, out = _db_verify(capsys)
    assert rc == 1 and "line 1: its authentication code does not match" in out, out
    assert record.spool.exists()  # reported, never applied


def test_chain_and_spool_keys_are_derived_per_purpose():
    k = os.urandom(32)
    chain, spool = derive_key(k, CHAIN_KEY_PURPOSE), derive_key(k, SPOOL_KEY_PURPOSE)
    assert len({chain, spool, k}) == 3 and derive_key(k, CHAIN_KEY_PURPOSE) == chain


def test_admin_actions_and_counters_are_in_the_chain(station_env, capsys):
    record = _record(station_env)
    _provision(record, 2)
    record.log_admin("switch", "Anna", {"profile": "relay", "lot": "LOT-2"})
    kinds = [r[0] for r in record.db().execute("select kind from journal order by id")]
    assert kinds == ["counter", "started", "finished"] * 2 + ["admin"]
    _checkpoint(station_env, record)
    record.close()
    rc, out = _db_verify(capsys)
    assert rc == 0, out
    _sql(station_env, "update journal set body = replace(body, 'LOT-2', 'LOT-3') where kind = 'admin'")
    rc, out = _db_verify(capsys)
    assert rc == 1 and "journal entry 7 was edited" in out, out


def test_the_screen_journals_an_admin_switch_and_signs_a_checkpoint_when_it_closes(station_env):
    from station.runner import open_station
    from station.tui import StationApp, TextPrompt

    from station.admin import hash_password, write_stored

    cfg = station_env / "station.toml"
    write_stored(station_env / "var/admin-password", hash_password("s3cret-admin-pw", log2_n=14))
    app = StationApp(open_station("relay", cfg), [], operator="Anna", poll_interval=0.1)

    async def answer(pilot, question: str, text: str) -> None:
        for _ in range(200):
            if isinstance(app.screen, TextPrompt) and app.screen.question == question:
                break
            await pilot.pause(0.05)
        app.screen.query_one("#answer").value = ""
        await pilot.press(*text, "enter")

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f10")
            await answer(pilot, "Admin password", "s3cret-admin-pw")
            await answer(pilot, "Profile", "relay")
            await answer(pilot, "Lot", "LOT-9")
            for _ in range(200):
                if app.line.lot == "LOT-9":
                    break
                await pilot.pause(0.05)

    asyncio.run(go())
    con = sqlite3.connect(station_env / "station.db")
    admin = [json.loads(b) for (b,) in con.execute("select body from journal where kind = 'admin'")]
    assert admin == [{"action": "switch", "operator": "Anna", "detail": {"profile": "relay", "lot": "LOT-9"}}]
    assert [r for (r,) in con.execute("select reason from checkpoints")] == ["screen session"]
    con.close()


# -- the migration -------------------------------------------------------------------------------------

def _legacy_database(path: Path, key: bytes | None = None) -> None:
    """A database as the station before issue #13 left it: m003's unkeyed journal, units and a counter."""
    db = Database(path)
    migrations.apply(db, stop_before="m003_write_ahead_journal")
    for i in range(3):
        db.execute("insert into units (mac, serial, state, created_at, updated_at) values (?, ?, 'provisioned', "
                   "?, ?)", [f"m{i}", f"S-{i}", now_iso(), now_iso()])
        db.execute("insert into attempts (unit_id, port, station_id, profile, outcome, mac, serial, started_at, "
                   "ended_at, rework, firmware_hashes, durations, written_regions) values "
                   "(?, 'p', 'test-station', 'relay', 'passed', ?, ?, ?, ?, 0, '{}', '{}', '[]')",
                   [i + 1, f"m{i}", f"S-{i}", now_iso(), now_iso()])
    db.execute("insert into counters (name, value) values ('S-', 3)")
    db.conn.commit()
    migrations.apply(db, stop_before="m004_keyed_chain_and_checkpoints")
    db.close()


def test_the_migration_rekeys_an_existing_chain_and_anchors_units_and_counters(station_env, capsys):
    db = station_env / "station.db"
    _legacy_database(db)
    old = sqlite3.connect(db)
    legacy = old.execute("select id, station_id, kind, attempt_uid, at, body, prev_hash, entry_hash from journal "
                         "order by id").fetchall()
    old.close()
    assert len(legacy) == 3 and all(
        _entry_hash_v1(p, dict(zip(("station_id", "kind", "attempt_uid", "at", "body"), r[1:6]))) == h
        for (*r, p, h) in legacy)
    with pytest.raises(RecordError, match="without the station's key"):
        Record(db)  # a reader without the key cannot re-key it, and leaves it as it was
    record = _record(station_env)
    key = derive_key(station_key(station_env / "station.key"), CHAIN_KEY_PURPOSE)
    entries = list(record.db().query("select * from journal order by id"))
    assert [e["kind"] for e in entries] == ["recorded"] * 3 + ["unit"] * 3 + ["counter"]
    assert all(_entry_hash(key, e["prev_hash"], e) == e["entry_hash"] for e in entries)
    assert entries[0]["entry_hash"] != legacy[0][-1]  # re-keyed, not kept
    assert record.verify_chain() == []
    record.close()
    _sql(station_env, "update units set serial = 'S-9' where id = 1")  # the anchored units are now covered
    rc, out = _db_verify(capsys)
    assert rc == 1 and "unit 1 (m0) was edited" in out, out


def test_the_migration_refuses_a_database_whose_old_chain_does_not_verify(station_env, capsys):
    db = station_env / "station.db"
    _legacy_database(db)
    _sql(station_env, "update journal set body = replace(body, 'S-1', 'S-7') where id = 2",
         "update attempts set serial = 'S-7' where id = 2")
    before = sqlite3.connect(db).execute("select entry_hash from journal order by id").fetchall()
    rc, out = _db_verify(capsys)
    assert rc == 1 and "journal does not verify" in out and "journal entry 2" in out, out
    assert "it was not re-keyed" in out
    con = sqlite3.connect(db)
    assert con.execute("select entry_hash from journal order by id").fetchall() == before  # never laundered
    assert not con.execute("select 1 from _sqlite_migrations where name like 'm004%'").fetchall()
    con.close()


# -- pinned keys -----------------------------------------------------------------------------------------

def _export(capsys, env: Path, name: str = "units.csv", *extra: str) -> Path:
    out = env / name
    rc, _, err = run_station(capsys, "export", "--outcome", "any", "--out", str(out), *extra)
    assert rc == 0, err
    return out


def _forge(out: Path, claimed: str) -> Path:
    """Change a serial, re-sign with a fresh key, ship its .pub.pem, claim the real station's fingerprint."""
    data = out.read_text().replace("RLY-00001", "RLY-00099", 1)
    out.write_text(data)
    mpath = out.with_name(out.name + ".manifest.json")
    manifest = json.loads(mpath.read_text())
    manifest["sha256"] = hashlib.sha256(data.encode()).hexdigest()
    manifest["public_key_sha256"] = claimed
    body = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    mpath.write_bytes(body)
    forger = Ed25519PrivateKey.generate()
    out.with_name(out.name + ".manifest.sig").write_bytes(forger.sign(body))
    pub = out.with_name(out.name + ".pub.pem")
    pub.write_bytes(public_pem(forger))
    return pub


def _openssl_fingerprint(pem: Path) -> str:
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(pem), "-outform", "DER"], capture_output=True,
                         check=True).stdout
    return subprocess.run(["openssl", "dgst", "-sha256", "-r"], input=der, capture_output=True,
                          check=True).stdout.split()[0].decode()


def test_a_forged_export_claiming_the_real_fingerprint_is_refused_by_verify_and_merge(station_env, capsys):
    record = _record(station_env)
    _provision(record, 2)
    record.close()
    out = _export(capsys, station_env)
    real = json.loads((station_env / "units.csv.manifest.json").read_text())["public_key_sha256"]
    rc, listed, _ = run_station(capsys, "keys", "list")
    assert rc == 0 and [line.split() for line in listed.splitlines()] == [["test-station", real, "this", "station"]]
    # the published fingerprint is OpenSSL's: the README's first step
    assert _openssl_fingerprint(station_env / "units.csv.pub.pem") == real
    forged_pub = _forge(out, real)
    assert _openssl_fingerprint(forged_pub) != real  # the README's first step catches the forgery by hand
    rc, text, err = run_station(capsys, "export", "verify", str(out))
    assert rc == 1 and "does not match any key trusted for station 'test-station'" in err, text + err
    assert "verified" not in text
    rc, text, err = run_station(capsys, "export", "verify", str(out), "--pubkey", str(forged_pub))
    assert rc == 1 and f"claims key {real[:16]}… but was signed by key" in err, text + err
    rc, _, err = run_station(capsys, "export", "merge", str(out), "--out", str(station_env / "all.csv"))
    assert rc == 1 and "refused, nothing was written" in err
    assert not (station_env / "all.csv").exists() and not (station_env / "all.csv.manifest.json").exists()


def test_an_export_from_an_unpinned_station_explains_how_to_pin_and_then_verifies(station_env, capsys, tmp_path):
    other = Record(tmp_path / "b.db", os.urandom(32), station_id="station-b")
    a = Attempt(port="p", station_id="station-b", profile="relay", profile_hash="h", started_at=now_iso(),
                ended_at=now_iso(), outcome="passed", mac="24:0a:c4:00:0b:01", serial="B-1")
    other.add(a)
    from station.audit import ExportFilter, export
    kb = signing_key(tmp_path / "b.pem")
    export(other, tmp_path / "b.csv", "csv", ExportFilter(), "station-b", kb)
    pub = tmp_path / "b.csv.pub.pem"
    rc, text, err = run_station(capsys, "export", "verify", str(tmp_path / "b.csv"))
    assert rc == 1 and "no key is trusted for station 'station-b'" in err
    assert _openssl_fingerprint(pub) in err and f"station keys trust {pub} --station station-b" in err
    rc, _, err = run_station(capsys, "export", "merge", str(tmp_path / "b.csv"), "--out", str(tmp_path / "m.csv"))
    assert rc == 1 and "no key is trusted" in err
    # a one-off check says it is one
    rc, text, _ = run_station(capsys, "export", "verify", str(tmp_path / "b.csv"), "--pubkey", str(pub))
    assert rc == 0 and "ONE-OFF" in text
    # pinned: it verifies, naming the key that did
    rc, _, err = run_station(capsys, "keys", "trust", str(pub), "--station", "station-b")
    assert rc == 0 and "now trusted" in err
    rc, text, _ = run_station(capsys, "export", "verify", str(tmp_path / "b.csv"))
    assert rc == 0 and f"signed by key {_openssl_fingerprint(pub)} — pinned" in text
    # a key pinned for one station does not vouch for another station's id
    m = json.loads((tmp_path / "b.csv.manifest.json").read_text())
    m["station_id"] = "station-c"
    body = json.dumps(m, indent=2, sort_keys=True).encode() + b"\n"
    (tmp_path / "b.csv.manifest.json").write_bytes(body)
    (tmp_path / "b.csv.manifest.sig").write_bytes(kb.sign(body))
    rc, _, err = run_station(capsys, "export", "verify", str(tmp_path / "b.csv"))
    assert rc == 1 and "no key is trusted for station 'station-c'" in err
    store = TrustStore.for_station(StationConfig.load(station_env / "station.toml"))
    assert os.stat(store.folder).st_mode & 0o777 == 0o700 and os.stat(store.path).st_mode & 0o777 == 0o600


def test_consecutive_exports_chain_and_a_missing_one_is_a_gap(station_env, capsys):
    record = _record(station_env)
    _provision(record, 2)
    first = _export(capsys, station_env, "e1.csv")
    _provision(record, 1, first=2)
    second = _export(capsys, station_env, "e2.jsonl", "--format", "jsonl")
    _provision(record, 1, first=3)
    third = _export(capsys, station_env, "e3.csv", "--lot", "LOT-1")
    record.close()
    rc, text, err = run_station(capsys, "export", "verify", str(first), str(second), str(third))
    assert rc == 0, err
    assert "2 rows equal their journal entries" in text  # e1: its own two attempts
    assert "1 rows equal their journal entries; 2 were recorded before the previous export" in text  # e2
    m1, m2 = (json.loads(p.with_name(p.name + ".manifest.json").read_text()) for p in (first, second))
    assert m2["previous_export"]["chain_head"] == m1["chain_head"] == m2["journal"]["from_hash"]
    assert m1["previous_export"] is None and m1["journal"]["from_hash"] == CHAIN_GENESIS
    rc, _, err = run_station(capsys, "export", "verify", str(first), str(third))
    assert rc == 1 and "gap: station test-station made an export between e1.csv and e3.csv" in err
    # the attempts carry every hashed column: a row edited and re-hashed by the data file's SHA-256 alone fails
    rows = list(csv.DictReader(first.open()))
    assert {"id", "uid", "session", "prev_hash", "row_hash", "written_regions"} <= set(rows[0])
    segment = first.with_name("e1.csv.journal.jsonl")
    lines = segment.read_text().splitlines()
    e = json.loads(lines[1])
    e["body"] = e["body"].replace("LOT-1", "LOT-X")
    segment.write_text("\n".join([lines[0], json.dumps(e), *lines[2:]]) + "\n")
    rc, _, err = run_station(capsys, "export", "verify", str(first))
    assert rc == 1 and "the journal segment was altered" in err


def test_the_signing_key_can_be_protected_by_a_passphrase(station_env, capsys, monkeypatch):
    record = _record(station_env)
    _provision(record, 1)
    record.close()
    monkeypatch.setenv("STATION_SIGNING_PASSPHRASE", "signing pass 1")
    _export(capsys, station_env)
    pem = (station_env / "var/station-ed25519.pem").read_text()
    assert "ENCRYPTED PRIVATE KEY" in pem
    monkeypatch.setenv("STATION_SIGNING_PASSPHRASE", "wrong")
    rc, _, err = run_station(capsys, "export", "--outcome", "any", "--out", str(station_env / "x.csv"))
    assert rc == 2 and "wrong passphrase" in err
    monkeypatch.delenv("STATION_SIGNING_PASSPHRASE")
    rc, _, err = run_station(capsys, "export", "--outcome", "any", "--out", str(station_env / "x.csv"))
    assert rc == 2 and "protected by a passphrase: set STATION_SIGNING_PASSPHRASE" in err
    rc, text, _ = run_station(capsys, "export", "verify", str(station_env / "units.csv"))  # verify needs no secret
    assert rc == 0 and "pinned" in text


def test_an_export_for_one_lot_withholds_other_lots_entries_and_still_verifies(station_env, capsys):
    """A contract manufacturer exports lot LOT-2 for its customer: the journal segment keeps every
    entry's place and hashes (the chain links from the previous export to the signed head) but not
    the bodies of other lots' entries, so no MAC or serial of LOT-1 reaches LOT-2's customer."""
    record = _record(station_env)
    try:
        _provision(record, 2)  # LOT-1
        ours = _provision(record, 2, first=2, lot="LOT-2")
    finally:
        record.close()
    out = station_env / "lot2.jsonl"
    rc, _, err = run_station(capsys, "export", "--out", str(out), "--format", "jsonl", "--lot", "LOT-2",
                             "--outcome", "any")
    assert rc == 0, err
    journal = (station_env / "lot2.jsonl.journal.jsonl").read_text()
    for other in ("24:0a:c4:00:02:00", "24:0a:c4:00:02:01", "RLY-00001", "RLY-00002", "LOT-1"):
        assert other not in journal, f"{other} of another lot is in LOT-2's journal segment"
    for a in ours:
        assert a.mac in journal and a.serial in journal  # this lot's own entries keep their bodies
    manifest = json.loads((station_env / "lot2.jsonl.manifest.json").read_text())
    entries = [json.loads(line) for line in journal.splitlines()]
    withheld = [e for e in entries if e.get("withheld")]
    assert manifest["journal"]["scope"] == {"lot": "LOT-2"}
    assert manifest["journal"]["withheld"] == len(withheld) > 0
    assert all(e["body"] is None and e["unit"] is None and e["entry_hash"] for e in withheld)
    rc, text, err = run_station(capsys, "export", "verify", str(out))
    assert rc == 0, text + err
    assert f"the bodies of {len(withheld)} entries about attempts outside lot LOT-2 are withheld" in text + err

    # an unscoped export (all lots) carries every body, and starts where LOT-2's ended
    rc, _, err = run_station(capsys, "export", "--out", str(station_env / "all.csv"), "--outcome", "any")
    assert rc == 0, err
    assert "withheld" not in json.loads((station_env / "all.csv.manifest.json").read_text())["journal"]
