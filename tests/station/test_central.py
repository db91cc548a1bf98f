"""Several stations, one central record (issue #17), against a real PostgreSQL and real station processes.

What the plant relies on: no serial is ever issued twice, a board passes once across the
plant, a station keeps working when the central database goes away and catches up after,
every attempt reaches the central copy exactly once, and the copy verifies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from flashing.virtual.bench import VirtualBench
from station.central import MIGRATIONS, Central, CentralConflict, CentralError, conflicts, migrate, verify
from station.config import CentralSettings, StationConfig
from station.events import StepStarted
from station.pipeline import UnitJob
from station.record import Attempt, Outcome, Record, RecordError, SerialPlan, now_iso, station_key
from station.runner import open_station, run_units
from tests.conftest import wait_until
from tests.station.conftest import REPO, TOKEN, json_lines, run_station

PASSWORD_IN_TEST = "c3ntral-s3cret-pw"


def make_station(root: Path, sid: str, url: str, **central) -> Path:
    """A station folder of its own: station.toml with [central], the example profile, its own keys."""
    d = root / sid
    shutil.copytree(REPO / "profiles" / "relay", d / "profiles" / "relay")
    # a generous guard timeout: a loaded test machine must not turn a central answer into "local only"
    settings = {"url": url, "block_size": 3, "low_water": 1, "timeout_s": 10.0, "push_interval_s": 0.2,
                "retry_s": 0.5, **central}
    lines = [f'station_id = "{sid}"', 'database = "station.db"', 'profiles_dir = "profiles"',
             'default_profile = "relay"', 'key_file = "station.key"', 'signing_key = "station-ed25519.pem"',
             "", "[central]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    (d / "station.toml").write_text("\n".join(lines) + "\n")
    return d / "station.toml"


def _tomorrow_prefix() -> str:
    from datetime import datetime, timedelta

    return (datetime.now() + timedelta(days=1)).strftime("RLY-%y%m%d-")


def station_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "STATION_CONFIG"}
    env.update(RELAY_VENDOR_TOKEN=TOKEN, PYTHONPATH=str(REPO), **(extra or {}))
    return env


def central_rows(url: str, sql: str, args=()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


def local_record(cfg: Path) -> Record:
    station = StationConfig.load(cfg)
    return Record(station.database, station_key(station.key_file), station_id=station.station_id)


# -- several station processes on one profile --------------------------------------------------------
@pytest.mark.parametrize("stations", [2, 4])
def test_station_processes_on_one_profile_never_share_a_serial(tmp_path, pg_url, stations):
    boards = 3  # per station; blocks of 3 with a low-water mark of 1: every station leases while the others do
    configs = [make_station(tmp_path, f"st-{n}", pg_url) for n in range(1, stations + 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "station", "flash", "--config", str(cfg), "--virtual",
                               str(boards), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=station_env(), cwd=cfg.parent) for cfg in configs]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        bad = [e for e in json_lines(out) if e["event"] == "unit_finished" and e["outcome"] != "passed"]
        assert p.returncode == 0, (bad, err[-2000:])
    finished = [e for out, _ in outs for e in json_lines(out) if e["event"] == "unit_finished"]
    assert len(finished) == stations * boards and all(e["outcome"] == "passed" for e in finished)
    serials = [e["serial"] for e in finished]
    assert len(set(serials)) == len(serials), serials

    # the central copy: every attempt exactly once, the same serials, each station's from its own leases
    rows = central_rows(pg_url, "SELECT station_id, serial FROM attempts WHERE outcome = 'passed'")
    assert sorted(r[1] for r in rows) == sorted(serials)
    leases = central_rows(pg_url, "SELECT counter, station_id, first, last FROM leases ORDER BY counter, first")
    today = "relay:" + finished[0]["serial"].rsplit("-", 1)[0] + "-"
    assert {c for c, *_ in leases} <= {today, f"relay:{_tomorrow_prefix()}"}  # tomorrow's is leased ahead
    for counter in {c for c, *_ in leases}:
        spans = [(f, l) for c, _, f, l in leases if c == counter]
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), f"overlapping blocks of {counter}: {spans}"
    for sid, serial in rows:
        seq = int(serial.rsplit("-", 1)[1])
        assert any(c == today and s == sid and f <= seq <= l for c, s, f, l in leases), \
            f"{serial} of {sid} is outside its blocks"
    for cfg in configs:
        rec = local_record(cfg)
        try:
            local = rec.db().execute("select count(*) from journal").fetchone()[0]
            assert rec.verify_chain() == []
        finally:
            rec.close()
        central = central_rows(pg_url, "SELECT entries FROM stations WHERE station_id = %s",
                               [StationConfig.load(cfg).station_id])[0][0]
        assert central == local  # the run's last push took everything, checkpoint included
    with psycopg.connect(pg_url) as conn:
        problems, notes = verify(conn, None)
        assert problems == [] and len(notes) == stations
        assert conflicts(conn) == []


# -- one board, one provisioning across the plant ------------------------------------------------------
def test_a_board_provisioned_at_one_station_is_refused_at_another(tmp_path, pg_url, capsys):
    a, b = make_station(tmp_path, "line-a", pg_url), make_station(tmp_path, "line-b", pg_url)
    with VirtualBench(2, "esp32", run_dir=tmp_path / "run") as bench:
        ports = sum((["--port", s.url] for s in bench.slots), [])
        os.environ["RELAY_VENDOR_TOKEN"] = TOKEN
        rc, out, err = run_station(capsys, "flash", "--config", str(a), *ports, "--json")
        assert rc == 0, err
        first = {e["mac"]: e["serial"] for e in json_lines(out) if e["event"] == "unit_finished"}
        rc, out, err = run_station(capsys, "flash", "--config", str(b), *ports, "--json")
        assert rc == 1
        done = [e for e in json_lines(out) if e["event"] == "unit_finished"]
        assert all(e["failed_step"] == "guard" and e["outcome"] == "failed" for e in done)
        for e in done:
            assert f"already passed at station line-a as {first[e['mac']]}" in e["error"]
            assert e["serial"] is None  # refused before the serial step: station B issued nothing
        rec = local_record(b)
        try:
            assert {r["guard"] for r in rec.attempts()} == {"central"}
        finally:
            rec.close()
        # the same boards, reworked on purpose at B: allowed, they keep the serials they passed with at A
        rc, out, err = run_station(capsys, "flash", "--config", str(b), *ports, "--rework", "--json")
        assert rc == 0, err
        again = {e["mac"]: e["serial"] for e in json_lines(out) if e["event"] == "unit_finished"}
        assert again == first
    rc, out, _ = run_station(capsys, "central", "conflicts", "--config", str(b))
    assert rc == 0, out


def test_conflicts_name_a_board_that_passed_at_two_stations_while_they_were_cut_off(tmp_path, pg_own, capsys):
    url = pg_own.url()
    a, b = make_station(tmp_path, "line-a", url), make_station(tmp_path, "line-b", url)
    os.environ["RELAY_VENDOR_TOKEN"] = TOKEN
    with VirtualBench(3, "esp32", run_dir=tmp_path / "run") as bench:
        one, two, shared = (s.url for s in bench.slots)
        for cfg, port in ((a, one), (b, two)):  # each station leases its block while the network is there
            rc, _, err = run_station(capsys, "flash", "--config", str(cfg), "--port", port)
            assert rc == 0, err
        pg_own.stop()
        serials = []
        for cfg in (a, b):  # cut off, neither can know the other passed it
            rc, out, err = run_station(capsys, "flash", "--config", str(cfg), "--port", shared, "--json")
            assert rc == 0, err
            serials.append(json_lines(out)[-1]["serial"])
        pg_own.start()
    rec = local_record(b)
    try:
        assert rec.attempts(1)[0]["guard"] == "local only"
    finally:
        rec.close()
    for cfg in (a, b):
        assert run_station(capsys, "central", "push", "--config", str(cfg))[0] == 0
    rc, out, _ = run_station(capsys, "central", "conflicts", "--config", str(a))
    assert rc == 1
    assert "passed more than once: at line-a, line-b" in out and all(s in out for s in serials)
    rc, out, _ = run_station(capsys, "central", "conflicts", "--config", str(a), "--json")
    found = json_lines(out)
    assert [c["kind"] for c in found] == ["board passed twice"] and found[0]["serials"] == sorted(serials)


# -- the central database goes away mid-batch ----------------------------------------------------------
def test_a_station_keeps_provisioning_while_the_central_database_is_down_then_catches_up(tmp_path, pg_own):
    url = pg_own.url()
    cfg = make_station(tmp_path, "line-c", url, block_size=50, low_water=5, retry_s=0.3)
    env = {"RELAY_VENDOR_TOKEN": TOKEN}
    station = StationConfig.load(cfg)
    os.environ["RELAY_VENDOR_TOKEN"] = TOKEN
    ctx = open_station(station=station, env=env)
    stopped = threading.Event()

    def stop_the_server(event) -> None:  # the server goes away while the batch's units are flashing
        if isinstance(event, StepStarted) and event.step == "flash" and not stopped.is_set():
            stopped.set()
            pg_own.stop()

    try:
        with VirtualBench(6, "esp32", run_dir=tmp_path / "run") as bench:
            first = [UnitJob(s.url) for s in bench.slots[:3]]
            ctx.observers.append(stop_the_server)
            results = run_units(first, ctx, lambda e: None)
            assert [r.outcome for r in results] == ["passed"] * 3, [r.error for r in results]
            assert stopped.is_set()
            # down the whole batch: the station provisions from its block, the guard from its own record
            results = run_units([UnitJob(s.url) for s in bench.slots[3:]], ctx, lambda e: None)
            assert [r.outcome for r in results] == ["passed"] * 3, [r.error for r in results]
            assert ctx.central.state.online is False
            attempts = ctx.record.attempts()
            assert {a["guard"] for a in attempts[:3]} == {"local only"}
            pg_own.start()
            wait_until(lambda: ctx.central.state.online and _central_count(url, "line-c") == _local_count(ctx.record),
                       "the station catches up by itself once the server is back", timeout=90,
                       poke=ctx.central.kick,
                       why=lambda: (ctx.central.state, _central_count(url, "line-c"), _local_count(ctx.record)))
    finally:
        ctx.close()
    rec = local_record(cfg)
    try:
        local_uids = sorted(r["uid"] for r in rec.attempts(100))
        assert rec.verify_chain() == []
    finally:
        rec.close()
    central_uids = sorted(r[0] for r in central_rows(url, "SELECT uid FROM attempts WHERE station_id = 'line-c'"))
    assert central_uids == local_uids and len(local_uids) == 6  # every attempt exactly once
    with psycopg.connect(url) as conn:
        problems, _ = verify(conn, None)
    assert problems == []


def _central_count(url: str, sid: str) -> int:
    try:
        rows = central_rows(url, "SELECT entries FROM stations WHERE station_id = %s", [sid])
    except psycopg.OperationalError:
        return -1
    return rows[0][0] if rows else 0


def _local_count(record: Record) -> int:
    return record.db().execute("select count(*) from journal").fetchone()[0]


def test_an_exhausted_block_without_the_central_database_refuses_before_the_board_is_touched(tmp_path, pg_own, capsys):
    url = pg_own.url()
    cfg = make_station(tmp_path, "line-d", url, block_size=2, low_water=0)
    os.environ["RELAY_VENDOR_TOKEN"] = TOKEN
    with VirtualBench(3, "esp32", run_dir=tmp_path / "run") as bench:
        rc, _, err = run_station(capsys, "flash", "--config", str(cfg), "--port", bench.slots[0].url,
                                 "--port", bench.slots[1].url)
        assert rc == 0, err
        pg_own.stop()
        last = bench.slots[2]
        before = last.device.flash.read(0x10000, 4096)
        rc, out, err = run_station(capsys, "flash", "--config", str(cfg), "--port", last.url, "--json")
        assert rc == 3, err  # the station's fault (no serial to give), not the board's
        done = json_lines(out)[-1]
        assert done["outcome"] == "error" and done["failed_step"] == "serial"
        assert "no serial block is left" in done["error"] and "central database" in done["error"]
        assert "no board was touched" in done["remedy"]
        assert "goes central when the station next reaches it" in err  # the engineer's script is told too
        assert last.device.flash.read(0x10000, 4096) == before  # nothing was written to the board
        pg_own.start()
        rc, out, err = run_station(capsys, "flash", "--config", str(cfg), "--port", last.url, "--json")
        assert rc == 0, err  # back online: a new block, the board passes
        assert json_lines(out)[-1]["serial"].endswith("-00003")  # the next block follows the last serial used


# -- the outbox, leases and verify, in one process ---------------------------------------------------------
def _settings(url: str, **kw) -> CentralSettings:
    return CentralSettings(**{"url": url, "block_size": 5, "low_water": 1, "timeout_s": 10.0, "push_interval_s": 0.1,
                              "retry_s": 0.3, **kw})


def _record(tmp_path: Path, sid: str) -> Record:
    rec = Record(tmp_path / f"{sid}.db", station_key(tmp_path / f"{sid}.key"), station_id=sid)
    rec.serial_blocks = True
    return rec


def _unit(rec: Record, c: Central, mac: str, outcome=Outcome.PASSED) -> str:
    a = Attempt(port="p", station_id=rec.station_id, profile="relay", profile_hash="h", started_at=now_iso(), mac=mac)
    plan = SerialPlan(counter="relay:X-", render=lambda v: f"X-{v:05}", max_value=99999)
    c.need_serials(plan.counter, plan.max_value)
    serial = rec.start(a, plan)
    a.outcome, a.ended_at = outcome, now_iso()
    rec.finish(a)
    return serial


def test_concurrent_leases_never_overlap(tmp_path, pg_url):
    stations = [(_record(tmp_path, f"s{n}"), None) for n in range(8)]
    # a low-water mark above any block: every call leases one more
    centrals = [Central(_settings(pg_url, block_size=10, low_water=10**6), None, rec, rec.station_id)
                for rec, _ in stations]

    def lease_many(c: Central) -> list:
        return [(blk.first, blk.last) for blk in (c.lease("relay:X-", 10**6) for _ in range(15))]

    try:
        with ThreadPoolExecutor(8) as pool:
            blocks = sorted(b for got in pool.map(lease_many, centrals) for b in got)
        assert len(blocks) == 8 * 15
        assert all(a[1] < b[0] for a, b in zip(blocks, blocks[1:])), "two stations hold the same serial"
    finally:
        for c in centrals:
            c.close()
            c.record.close()


def test_a_push_is_idempotent_and_resumes_where_the_central_copy_stands(tmp_path, pg_url):
    rec = _record(tmp_path, "s1")
    c1, c2 = Central(_settings(pg_url), None, rec, "s1"), Central(_settings(pg_url), None, rec, "s1")
    try:
        for n in range(4):
            _unit(rec, c1, f"aa:00:00:00:00:{n:02x}")
        total = _local_count(rec)
        with ThreadPoolExecutor(2) as pool:  # two pushers of one station at once (two processes on one record)
            pushed = list(pool.map(lambda c: c.push(), (c1, c2)))
        assert sum(pushed) == total and c1.push() == 0
        _unit(rec, c1, "aa:00:00:00:00:10", Outcome.FAILED)
        assert c2.push() == _local_count(rec) - total  # only what is new
        rows = central_rows(pg_url, "SELECT seq FROM journal WHERE station_id = 's1' ORDER BY seq")
        assert [r[0] for r in rows] == list(range(1, _local_count(rec) + 1))
        assert central_rows(pg_url, "SELECT count(*) FROM attempts")[0][0] == 5
    finally:
        c1.close(), c2.close(), rec.close()


def test_a_journal_that_does_not_continue_the_central_copy_is_never_pushed_over_it(tmp_path, pg_url):
    rec = _record(tmp_path, "s1")
    c = Central(_settings(pg_url), None, rec, "s1")
    _unit(rec, c, "aa:00:00:00:00:01")
    c.push()
    rec.close()
    (tmp_path / "new").mkdir()  # the station's database replaced (a restored backup, a new disk)
    other = _record(tmp_path / "new", "s1")
    c2 = Central(_settings(pg_url), None, other, "s1")
    try:
        _unit(other, c2, "aa:00:00:00:00:02")
        with pytest.raises(CentralConflict) as e:
            c2.push()
        assert "does not continue the central copy" in e.value.message
        assert central_rows(pg_url, "SELECT count(*) FROM attempts")[0][0] == 1
    finally:
        c.close(), c2.close(), other.close()


def test_central_verify_names_what_was_changed_in_the_central_copy(tmp_path, pg_url):
    from station.audit import signing_key

    rec = _record(tmp_path, "s1")
    c = Central(_settings(pg_url), None, rec, "s1")
    key = signing_key(tmp_path / "s1.pem")
    try:
        for n in range(3):
            _unit(rec, c, f"aa:00:00:00:00:{n:02x}")
        rec.checkpoint(key, "test")
        c.push()
        trusted = {"s1": [key.public_key()]}
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert verify(conn, trusted, {"s1": rec._chain_key}) [0] == []
            cases = [
                ("UPDATE attempts SET serial = 'X-99999', row = jsonb_set(row, '{serial}', '\"X-99999\"') "
                 "WHERE serial = 'X-00002'", "was edited in the central copy"),
                ("UPDATE journal SET body = replace(body, 'X-00002', 'X-99999') WHERE body LIKE '%X-00002%'",
                 "is not what the station recorded"),
                ("DELETE FROM journal WHERE seq = (SELECT max(seq) FROM journal)", "does not extend the checkpoint"),
                ("UPDATE checkpoints SET body = jsonb_set(body, '{entries}', '2')", "not signed by a key trusted"),
            ]
            for sql, words in cases:
                conn.execute("BEGIN")
                conn.execute(sql)
                problems, _ = verify(conn, trusted, {"s1": rec._chain_key})
                conn.execute("ROLLBACK")
                assert any(words in p for p in problems), (sql, problems)
    finally:
        c.close(), rec.close()


def test_the_guard_falls_back_to_the_local_record_when_the_central_database_is_out_of_reach(tmp_path):
    rec = _record(tmp_path, "s1")
    with __import__("socket").socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Central(_settings(f"postgresql://station@127.0.0.1:{port}/plant"), PASSWORD_IN_TEST, rec, "s1")
    try:
        answer = c.passed_anywhere("aa:00:00:00:00:01")
        assert answer.prior is None and answer.where == "local only"
        assert f"127.0.0.1:{port}/plant" in answer.why and PASSWORD_IN_TEST not in answer.why
        with pytest.raises(CentralError):
            c.push()
    finally:
        c.close(), rec.close()


def test_a_password_in_the_url_is_refused_and_the_password_never_shows(tmp_path, capsys):
    cfg = tmp_path / "station.toml"
    cfg.write_text(f'[central]\nurl = "postgresql://station:{PASSWORD_IN_TEST}@db.plant/record"\n')
    rc, out, err = run_station(capsys, "central", "status", "--config", str(cfg))
    assert rc == 2 and "holds a password" in err and "STATION_CENTRAL_PASSWORD" in err
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.write_text(f'[central]\nurl = "postgresql://station@127.0.0.1:{port}/record"\n')
    os.environ["STATION_CENTRAL_PASSWORD"] = PASSWORD_IN_TEST
    try:
        rc, out, err = run_station(capsys, "central", "status", "--config", str(cfg))
    finally:
        del os.environ["STATION_CENTRAL_PASSWORD"]
    assert rc == 3 and f"127.0.0.1:{port}/record" in err and "out of reach" in err
    assert PASSWORD_IN_TEST not in out + err


def test_migrations_apply_once_whoever_connects_first(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as a, psycopg.connect(pg_url, autocommit=True) as b:
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(migrate, (a, b)))
        assert sorted(len(d) for d in done) == [0, len(MIGRATIONS)]
        assert migrate(a) == []


def test_every_query_of_the_station_is_bounded_by_the_timeout_from_the_first_one(tmp_path, pg_url):
    """A central database that holds a lock (a long migration, a stuck transaction) costs a lease or the
    guard timeout_s, then the station carries on: even a lease before any guard (a fresh station) is bounded."""
    with psycopg.connect(pg_url) as conn:
        migrate(conn)
    rec = _record(tmp_path, "s1")
    holder = psycopg.connect(pg_url)
    asks = {"lease": lambda c: c.lease("relay:X-", 99999), "guard": lambda c: c.passed_anywhere("aa:00:00:00:00:01")}
    try:
        holder.execute("LOCK TABLE counters, attempts IN ACCESS EXCLUSIVE MODE")  # every query of theirs waits
        for what, ask in asks.items():
            c, got = Central(_settings(pg_url), None, rec, "s1"), {}  # a fresh connection each: its first query

            def run(c=c, ask=ask, got=got):
                try:
                    got["answer"] = ask(c)
                except CentralError as exc:
                    got["error"] = exc

            t = threading.Thread(target=run)
            t.start()
            try:
                wait_until(lambda: not t.is_alive(), f"the {what} gives up while the lock is held")
            finally:
                if t.is_alive():
                    holder.rollback()  # the lock goes: the thread ends (the assertion above has failed already)
                t.join()
                c.close()
            if what == "lease":
                assert "statement timeout" in got["error"].message, got
            else:
                assert got["answer"].where == "local only" and "statement timeout" in got["answer"].why, got
    finally:
        holder.close()
        rec.close()


def test_a_lease_wanted_while_the_database_was_down_does_not_keep_the_push_from_catching_up(tmp_path, pg_own):
    """The push thread leases what was asked before it pushes; while the station waits out retry_s, that lease is
    refused at once: the refusal must not restart the wait, or a station kicked often never pushes again."""
    rec = _record(tmp_path, "s1")
    c = Central(_settings(pg_own.url(), retry_s=0.3), None, rec, "s1")
    try:
        pg_own.stop()
        assert c.passed_anywhere("aa:00:00:00:00:01").where == "local only"  # the station now waits retry_s
        with pytest.raises(RecordError):
            c.need_serials("relay:X-", 99999)  # none left, none to be had: asked of the push thread too
        c.start()
        pg_own.start()
        wait_until(lambda: c.state.online and c.state.leases and _central_count(pg_own.url(), "s1") == _local_count(rec),
                   "the push thread leases and pushes again", poke=c.kick)  # every finished unit kicks it
    finally:
        c.close(), rec.close()


def test_the_operator_sees_when_the_central_record_is_out_of_reach(tmp_path, pg_own):
    from station.tui import StationApp
    from tests.station.test_tui import header_text, run, until

    cfg = make_station(tmp_path, "line-e", pg_own.url(), block_size=20)
    os.environ["RELAY_VENDOR_TOKEN"] = TOKEN
    with VirtualBench(1, "esp32", run_dir=tmp_path / "run") as bench:
        app = StationApp(open_station(station=StationConfig.load(cfg)), [bench.slots[0].url], operator="Anna",
                         poll_interval=0.1)

        async def go():
            async with app.run_test(size=(160, 45)) as pilot:
                await until(pilot, lambda: app.line.slots[0].status == "passed")
                await until(pilot, lambda: "central: online" in header_text(app))
                pg_own.stop()
                app.line.ctx.central.kick()
                await until(pilot, lambda: "CENTRAL OFFLINE" in header_text(app))
                pg_own.start()
                app.line.ctx.central.kick()
                await until(pilot, lambda: "central: online" in header_text(app))
        run(go())


def test_a_serial_block_widened_behind_the_stations_back_shows_in_db_verify(tmp_path, pg_url):
    rec = _record(tmp_path, "s1")
    c = Central(_settings(pg_url), None, rec, "s1")
    try:
        _unit(rec, c, "aa:00:00:00:00:01")
        assert rec.verify_chain() == []
        with rec.atomic() as conn:  # someone with the database file gives the station more serials
            conn.execute("update blocks set last = last + 1000")
        assert any("widened behind the station's back" in p for p in rec.verify_chain())
        with rec.atomic() as conn:
            conn.execute("delete from blocks")
        assert any("was deleted" in p for p in rec.verify_chain())
    finally:
        c.close(), rec.close()


def test_entries_pushed_under_another_stations_id_stop_its_push_and_fail_its_verify(tmp_path, pg_url):
    rec = _record(tmp_path, "s1")
    c = Central(_settings(pg_url), None, rec, "s1")
    try:
        _unit(rec, c, "aa:00:00:00:00:01")
        c.push()
        with psycopg.connect(pg_url, autocommit=True) as conn:  # someone with the database password, as s1
            n, head = conn.execute("SELECT entries, head FROM stations WHERE station_id = 's1'").fetchone()
            conn.execute("INSERT INTO journal (station_id, seq, local_id, kind, attempt_uid, at, body, unit, prev_hash, "
                         "entry_hash) VALUES ('s1', %s, 999, 'recorded', 'forged', '2026-01-01', '{}', NULL, %s, %s)",
                         [n + 1, head, "f" * 64])
            conn.execute("UPDATE stations SET entries = entries + 1, head = %s WHERE station_id = 's1'", ["f" * 64])
            problems, _ = verify(conn, None, {"s1": rec._chain_key})
            assert any("is not what the station recorded" in p for p in problems)
        _unit(rec, c, "aa:00:00:00:00:02")
        with pytest.raises(CentralConflict):
            c.push()
    finally:
        c.close(), rec.close()
