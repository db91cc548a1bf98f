"""What the record guarantees, tested the way it breaks: real processes killed, real disks filled.

The boards run in a separate `station virtual` process that keeps their flash in a state
directory, so after the station is killed we read what each board really holds (its
config partition, with our NVS reader) and compare it with the record.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from flashing.nvs import NvsError, read_partition
from flashing.virtual.bench import VirtualBench
from station.config import StationConfig
from station.pipeline import UnitJob, provision_unit
from station.profile import load_profile
from station.record import Attempt, Record, RecordError, SerialPlan, now_iso
from station.runner import open_record, open_station
from tests.conftest import wait_until
from tests.station.conftest import REPO

PY = sys.executable


class Proc:
    """A station process whose stdout/stderr lines we read as they come, with deadlines."""

    def __init__(self, args: list[str], cwd: Path | None = None):
        self.p = subprocess.Popen([PY, "-m", "station", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=cwd)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                         for s, lines in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def until(self, cond, timeout: float = 120.0) -> None:
        def ended() -> bool:  # the process is gone and all it printed is read: cond can no longer come true
            return self.p.poll() is not None and not any(t.is_alive() for t in self._readers)

        wait_until(lambda: cond() or ended(), "the process's output", timeout,
                   why=lambda: f"stdout {self.out[-5:]}, stderr {self.err[-5:]}")
        if not cond():
            raise AssertionError(f"process ended ({self.p.returncode}); stderr {self.err[-10:]}")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.out) if line.startswith("{")]

    def finish(self, timeout: float = 60.0) -> int:
        rc = self.p.wait(timeout)
        for t in self._readers:
            t.join(10)
        return rc

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for t in self._readers:
            t.join(10)


@pytest.fixture
def boards():
    """`station virtual` in its own process, flash kept in a state directory."""
    started: list[tuple[Proc, Path]] = []

    def start(count: int, realtime: bool = False) -> tuple[list[dict], Path]:
        state = Path(tempfile.mkdtemp(prefix="vs"))  # short: a Unix socket path has 107 bytes at most
        args = ["virtual", "--count", str(count), "--chip", "esp32", "--state-dir", str(state), "--json"]
        proc = Proc(args + (["--realtime"] if realtime else []))
        started.append((proc, state))
        proc.until(lambda: any('"control"' in line for line in proc.out), timeout=60)
        infos = [json.loads(line) for line in proc.out if '"url"' in line]
        return infos, state

    yield start
    for proc, state in started:
        proc.stop()
        shutil.rmtree(state, ignore_errors=True)


def serial_on_board(state: Path, index: int, env: Path) -> str | None:
    """The serial a board's config partition holds, read from its flash as it is."""
    prof = load_profile("relay", env / "profiles")
    slot = prof.config_slot()
    with open(state / f"device-{index}.flash", "rb") as f:
        f.seek(slot.offset)
        image = f.read(slot.size)
    try:
        return read_partition(image).get(prof.namespace, {}).get("serial")
    except NvsError:
        return None  # erased or half-written: no readable serial


def station_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "station", *args], capture_output=True, text=True, timeout=120)


def check_every_board_is_in_the_record(env: Path, infos: list[dict], state: Path,
                                       db: Path | None = None) -> dict[str, str]:
    """Every board whose flash holds a serial has an attempt with that MAC and serial."""
    verify = station_cli("db", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    out = env / "all.csv"
    exp = station_cli("export", "--outcome", "any", "--out", str(out))
    assert exp.returncode == 0, exp.stderr
    exported = list(csv.DictReader(open(out)))
    con = sqlite3.connect(db or env / "station.db")
    con.row_factory = sqlite3.Row
    held = {}
    for i, info in enumerate(infos):
        serial = serial_on_board(state, i, env)
        if serial is None:
            continue
        held[info["mac"]] = serial
        rows = con.execute("select outcome from attempts where mac = ? and serial = ?",
                           [info["mac"], serial]).fetchall()
        assert rows, f"board {info['mac']} holds {serial} and the record does not know it"
        assert {r["outcome"] for r in rows} <= {"passed", "interrupted"}
        assert any(r["mac"] == info["mac"] and r["serial"] == serial for r in exported)
    assert len(set(held.values())) == len(held), f"one serial on two boards: {held}"
    assert not con.execute("select count(*) from attempts where outcome = 'started'").fetchone()[0]
    con.close()
    return held


@pytest.mark.parametrize("kill_at", ["connect", "flash", "boot", "smoke", "after a pass"])
def test_kill_9_at_any_step_leaves_no_board_unrecorded(station_env, boards, kill_at):
    infos, state = boards(2, realtime=kill_at == "flash")  # the timing model: killed mid-write
    ports = sum((["--port", i["url"]] for i in infos), [])
    station = Proc(["flash", *ports, "--json"])

    def reached() -> bool:
        ev = station.events()
        if kill_at == "after a pass":
            return any(e["event"] == "unit_finished" and e["outcome"] == "passed" for e in ev)
        if kill_at == "flash":
            return any(e["event"] == "progress" and e["region"] == "app" and e["done"] > 0.3 * e["total"]
                       for e in ev)
        return any(e["event"] == "step_started" and e["step"] == kill_at for e in ev)

    station.until(reached)
    station.p.send_signal(signal.SIGKILL)
    assert station.finish() == -signal.SIGKILL
    held = check_every_board_is_in_the_record(station_env, infos, state)
    con = sqlite3.connect(station_env / "station.db")
    outcomes = sorted(r[0] for r in con.execute("select outcome from attempts"))
    con.close()
    if kill_at == "connect":
        assert not held  # nothing irreversible happens before the write-ahead commit
    elif kill_at == "after a pass":
        assert "passed" in outcomes and len(held) >= 1
    else:
        assert outcomes.count("interrupted") >= 1
    if kill_at == "flash":
        # the next attempt on the same boards settles them: each keeps the serial it was given
        reserved = dict(sqlite3.connect(station_env / "station.db").execute(
            "select mac, serial from units").fetchall())
        again = station_cli("flash", *ports, "--json")
        assert again.returncode == 0, again.stderr
        for i, info in enumerate(infos):
            assert serial_on_board(state, i, station_env) == reserved[info["mac"]]
        check_every_board_is_in_the_record(station_env, infos, state)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_flash_aborts_every_unit_and_prints_the_summary(station_env, boards, sig, code):
    infos, state = boards(2, realtime=True)
    ports = sum((["--port", i["url"]] for i in infos), [])
    station = Proc(["flash", *ports])
    station.until(lambda: sum("flash [" in line for line in station.err) >= 2)
    holder = _locked(station_env / "station.db") if sig == signal.SIGINT else None  # recording waits
    station.p.send_signal(sig)
    if holder is not None:
        station.until(lambda: any("aborting every unit" in line for line in station.err), timeout=10)
        station.p.send_signal(sig)  # a second Ctrl-C while recording loses nothing
        station.until(lambda: any("recording, please wait" == line.split(": ")[-1] for line in station.err),
                      timeout=10)
        holder.rollback()
        holder.close()
    assert station.finish(timeout=30) == code
    assert "0 of 2 units passed" in station.out
    assert sum(" ABORT " in line for line in station.out) == 2
    assert not any("Traceback" in line for line in station.err)
    con = sqlite3.connect(station_env / "station.db")
    rows = con.execute("select outcome, failed_step from attempts").fetchall()
    assert rows == [("aborted", "flash"), ("aborted", "flash")]
    con.close()
    check_every_board_is_in_the_record(station_env, infos, state)


def test_duplicate_serials_are_refused_before_anything_is_flashed(station_env, boards):
    infos, state = boards(3)
    ports = sum((["--port", i["url"]] for i in infos), [])
    r = station_cli("flash", *ports, "--serial", "LBL-1", "--serial", "LBL-2", "--serial", " LBL-1 ")
    assert r.returncode == 2 and "LBL-1 given for more than one port" in r.stderr
    r = station_cli("flash", *ports, "--serial", "LBL-1", "--serial", "LBL 2", "--serial", "LBL-3")
    assert r.returncode == 2 and "no spaces or control characters" in r.stderr
    r = station_cli("flash", *ports, "--serial", "LBL-1", "--serial", "X" * 33, "--serial", "LBL-3")
    assert r.returncode == 2 and "holds 32" in r.stderr
    for i in range(3):
        with open(state / f"device-{i}.flash", "rb") as f:
            assert set(f.read()) == {0xFF}  # untouched
    assert not (station_env / "station.db").exists() or not sqlite3.connect(
        station_env / "station.db").execute("select count(*) from attempts").fetchone()[0]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk():
    mounted: list[Path] = []

    def make(size: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix="disk"))
        if not _mount_tmpfs(d, size):
            if os.environ.get("CI"):
                pytest.fail("cannot mount a tmpfs (the disk-full tests need root)")
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _station_toml(env: Path, db: Path, extra: str = "") -> None:
    (env / "station.toml").write_text(
        f'station_id = "test-station"\ndatabase = "{db}"\nprofiles_dir = "profiles"\n'
        f'default_profile = "relay"\nkey_file = "station.key"\n{extra}')


def test_disk_full_mid_batch_leaves_no_board_holding_a_serial_the_record_lacks(station_env, boards, small_disk):
    disk = small_disk("3m")
    _station_toml(station_env, disk / "station.db", "min_free_mb = 0\n")
    infos, state = boards(4, realtime=True)
    ports = sum((["--port", i["url"]] for i in infos), [])
    station = Proc(["flash", *ports, "--json"])
    # every unit has committed its start and is writing: then the disk fills up
    station.until(lambda: sum(e["event"] == "step_started" and e["step"] == "flash"
                              for e in station.events()) == 4)
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    rc = station.finish(timeout=120)
    assert rc == 3, station.err[-5:]
    finished = [e for e in station.events() if e["event"] == "unit_finished"]
    assert len(finished) == 4 and all(e["outcome"] == "error" and e["recorded"] == "lost" for e in finished)
    assert all("could not be recorded" in e["error"] and "interrupted" in e["remedy"] for e in finished)
    (disk / "filler").unlink()
    # the next command that opens the record settles them: every board that holds a serial is there
    held = check_every_board_is_in_the_record(station_env, infos, state, disk / "station.db")
    assert len(held) == 4


def test_a_nearly_full_disk_refuses_to_start_units(station_env, boards, small_disk):
    disk = small_disk("2m")
    _station_toml(station_env, disk / "station.db", "min_free_mb = 50\n")
    infos, state = boards(1)
    r = station_cli("flash", "--port", infos[0]["url"])
    assert r.returncode == 3
    assert "MB free on the disk that holds the station database" in r.stderr and "no board was touched" in r.stderr
    with open(state / "device-0.flash", "rb") as f:
        assert set(f.read()) == {0xFF}


# -- the spool, in process ------------------------------------------------------------------------

def _attempt(i: int, outcome: str = "passed") -> Attempt:
    return Attempt(port=f"p{i}", station_id="test-station", profile="relay", profile_hash="h",
                   started_at=now_iso(), ended_at=now_iso(), outcome=outcome,
                   mac=f"24:0a:c4:00:01:{i:02x}", serial=f"S-{i}")


def _locked(path: Path) -> sqlite3.Connection:
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_a_damaged_or_forged_spool_line_is_set_aside_and_good_lines_go_in_once(tmp_path):
    key = os.urandom(32)
    db = tmp_path / "station.db"
    record = Record(db, key, busy_timeout_s=0.05)
    holder = _locked(db)
    for i in range(3):
        assert record.add(_attempt(i)).spooled
    holder.rollback()
    holder.close()
    record.close()
    lines = record.spool.read_text().splitlines()
    forged = json.loads(lines[0])
    forged["body"] = forged["body"].replace("S-0", "S-FORGED")
    with open(record.spool, "a") as f:
        f.write(json.dumps(forged) + "\n")
        f.write(lines[2][: len(lines[2]) // 2] + "\n")  # a short write: power lost mid-line
    kept = record.spool.read_text()
    entries = []
    for _ in range(3):  # every start replays what is there: never twice
        record.spool.write_text(kept)
        again = Record(db, key)
        assert not again.spool.exists()
        rows = again.attempts()
        assert sorted(r["serial"] for r in rows) == ["S-0", "S-1", "S-2"]
        entries.append(again.db().execute("select count(*) from journal").fetchone()[0])
        assert again.verify_chain() == []
        again.close()
    assert entries == [3, 3, 3]  # nothing recorded twice, not even in the journal
    rejected = [json.loads(x) for x in record.rejected.read_text().splitlines()]
    assert len(rejected) == 6 and all("line 4" in r["why"] or "line 5" in r["why"] for r in rejected)
    assert "authentication code does not match" in rejected[0]["why"]


def test_a_spooled_pass_is_refused_by_the_duplicate_guard_in_the_same_process(station_env):
    ctx = open_station("relay", station_env / "station.toml")
    ctx.record.busy_ms = 100
    ctx.record.close()  # the next connection takes the short busy timeout
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        holders: list[sqlite3.Connection] = []

        def lock_before_the_finish(e) -> None:
            if type(e).__name__ == "StepStarted" and e.step == "boot" and not holders:
                holders.append(_locked(ctx.record.path))

        first = provision_unit(UnitJob(bench[0].url), ctx, lock_before_the_finish)
        assert first.passed and first.recorded == "spool"
        holders[0].rollback()
        holders[0].close()
        second = provision_unit(UnitJob(bench[0].url), ctx, lambda e: None)
        assert second.outcome == "failed" and second.failed_step == "guard"
        assert f"already passed as {first.serial}" in second.error
    ctx.record.close()
    ctx.record.release_session()
    reopened = open_record(StationConfig.load(station_env / "station.toml"))
    outcomes = sorted(r["outcome"] for r in reopened.attempts())
    assert outcomes == ["failed", "passed"] and reopened.verify_chain() == []


# -- serials ----------------------------------------------------------------------------------------

def test_a_counter_behind_the_units_skips_forward_and_an_exhausted_counter_refuses(tmp_path):
    record = Record(tmp_path / "s.db", os.urandom(32))
    plan = SerialPlan(counter="c", render=lambda n: f"S-{n}", max_value=4)
    serials = []
    for i in range(3):
        a = _attempt(i)
        serials.append(record.start(a, plan))
        a.outcome = "passed"
        record.finish(a)
    assert serials == ["S-1", "S-2", "S-3"]
    # a counter restored from an older backup: the used serials are skipped, never reused
    record.db().execute("update counters set value = 0 where name = 'c'")
    record.db().conn.commit()
    assert record.start(_attempt(10), plan) == "S-4"
    with pytest.raises(RecordError, match="exhausted"):
        record.start(_attempt(11), plan)
    # a label already on another board is refused; the same board keeps its serial
    with pytest.raises(Exception, match="already belongs to another board"):
        record.start(_attempt(12), SerialPlan(given="S-2"))
    assert record.start(_attempt(1), SerialPlan(counter="c", render=lambda n: f"S-{n}")) == "S-2"
    assert record.verify_chain() == []


def test_interrupted_attempts_are_settled_only_when_their_process_is_gone(tmp_path):
    key = os.urandom(32)
    db = tmp_path / "i.db"
    running = Record(db, key)
    a = _attempt(1)
    running.start(a, SerialPlan(given="S-LIVE"))
    # another command (an export, a verify) opens the record while the station runs: nothing settled
    other = Record(db, key)
    assert other.settled == [] and other.attempts()[0]["outcome"] == "started"
    # the station's process ends without a finish: the next open settles it, with its serial and MAC
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r});"
              "from station.record import Record, Attempt, SerialPlan, now_iso;"
              f"r = Record({str(db)!r}, bytes.fromhex({key.hex()!r}));"
              "a = Attempt(port='p', station_id='test-station', profile='relay', profile_hash='h', started_at=now_iso(),"
              " mac='24:0a:c4:00:09:09');"
              "r.start(a, SerialPlan(given='S-KILLED')); import os; os._exit(0)")
    subprocess.run([PY, "-c", script], check=True, timeout=60)
    later = Record(db, key)
    assert [(s["serial"], s["mac"], s["outcome"]) for s in later.settled] == [
        ("S-KILLED", "24:0a:c4:00:09:09", "interrupted")]
    assert {r["serial"]: r["outcome"] for r in later.attempts()} == {"S-LIVE": "started", "S-KILLED": "interrupted"}
    assert [r["serial"] for r in later.unsettled_interrupted()] == ["S-KILLED"]
    assert later.verify_chain() == []


def test_a_board_that_fails_before_the_write_ahead_commit_is_not_touched(station_env):
    ctx = open_station("relay", station_env / "station.toml")
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        holder = _locked(ctx.record.path)
        ctx.record.busy_ms = 100
        ctx.record.close()
        r = provision_unit(UnitJob(bench[0].url), ctx, lambda e: None)
        holder.rollback()
        holder.close()
        assert r.outcome == "error" and r.failed_step == "serial" and r.recorded == "spool"
        assert "call the station" in r.remedy or "close the other program" in r.remedy
        assert set(bench[0].device.flash.read(0, 0x400000)) == {0xFF}


def test_db_verify_reports_a_spool_and_does_not_apply_it(station_env, capsys):
    from station.record import station_key
    from tests.station.conftest import run_station

    db = station_env / "station.db"
    record = Record(db, station_key(station_env / "station.key"), busy_timeout_s=0.05)
    holder = _locked(db)
    assert record.add(_attempt(1)).spooled
    holder.rollback()
    holder.close()
    record.close()
    rc, out, _ = run_station(capsys, "db", "verify")
    assert rc == 0 and "1 result(s) not yet in the database" in out and "intact: 0 attempts" in out
    assert record.spool.exists()
    with open(record.spool, "a") as f:
        f.write('{"hmac": "00", "body": "{}"}\n')
    rc, out, err = run_station(capsys, "db", "verify")
    assert rc == 1 and "line 2: its authentication code does not match" in out and "damaged" in err
    assert record.spool.exists()


# -- remedies that fit the evidence -----------------------------------------------------------------

def test_a_port_that_cannot_reset_says_so(station_env):
    import socket

    ctx = open_station("relay", station_env / "station.toml")
    with socket.socket() as server:  # a network serial port with nothing answering behind it
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = f"socket://127.0.0.1:{server.getsockname()[1]}"
        r = provision_unit(UnitJob(port), ctx, lambda e: None)
    assert r.outcome == "failed" and r.failed_step == "connect"
    assert "this port cannot reset the board" in r.error and "replace" not in r.remedy
    assert "download mode by hand" in r.remedy


def test_line_noise_during_the_write_points_at_the_cable_not_the_board(station_env):
    ctx = open_station("relay", station_env / "station.toml")
    with VirtualBench(1, "esp32", run_dir=station_env / "run", seed=7) as bench:
        def noisy_once_writing(e) -> None:
            if type(e).__name__ == "StepStarted" and e.step == "flash":
                bench[0].device.set_fault("noise", 0.02)

        r = provision_unit(UnitJob(bench[0].url), ctx, noisy_once_writing)
    assert r.outcome == "failed" and r.failed_step == "flash", r
    assert "check the USB cable" in r.remedy and "replace" not in r.remedy


def test_a_station_fault_is_an_error_never_charged_to_the_board(station_env):
    from station.line import Line

    ctx = open_station("relay", station_env / "station.toml")
    ctx.record.busy_ms = 100
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        holder = _locked(ctx.record.path)
        try:
            line = Line(ctx, [bench[0].url], lambda i: None, spawn=lambda fn: fn(), operator="Anna")
            line.slots[0].present = True
            line.start(0)  # runs in this thread: the record's connection is this thread's
        finally:
            holder.rollback()
            holder.close()
        slot = line.slots[0]
        assert slot.status == "error" and slot.result.failed_step == "serial"
        assert line.failed == 0 and line.passed == 0 and line.yield_pct is None
        assert "close the other program" in slot.action


def test_the_screen_starts_no_unit_while_the_record_disk_is_nearly_full(station_env):
    from station.line import Line

    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text() + "min_free_mb = 1099511627776\n")  # more than any disk has
    ctx = open_station("relay", cfg)
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        changed: list[int] = []
        line = Line(ctx, [bench[0].url], changed.append, operator="Anna")
        try:
            line.poll()  # the board is there: it would start now
            assert line.slots[0].status == "waiting" and not line.running()
            assert "MB free on the disk that holds the station database" in line.refusal
            assert changed  # the screen is told, so the header shows why
        finally:
            line.close()
        assert set(bench[0].device.flash.read(0, 0x400000)) == {0xFF}
    assert open_record(StationConfig.load(cfg)).attempts() == []


def test_sixteen_units_committing_at_once_wait_for_each_other_not_for_sqlites_busy_timeout(tmp_path):
    """16 ports start and finish their units at the same moment, each on its own connection, with a
    busy timeout far shorter than their queue: none ends "database is locked" (the station's own
    writers take turns; SQLite's busy timeout is only spent on another program)."""
    import threading

    record = Record(tmp_path / "s.db", os.urandom(32), busy_timeout_s=0.001)
    plan = SerialPlan(counter="c", render=lambda n: f"S-{n}")
    errors, serials = [], []
    go = threading.Barrier(16)

    def port(n: int) -> None:
        try:
            go.wait()
            for i in range(10):
                a = _attempt(100 * n + i)
                serials.append(record.start(a, plan))
                a.outcome = "passed"
                written = record.finish(a)
                assert written.attempt_id is not None, written
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            errors.append(repr(exc))
        finally:
            record.close()  # this thread's connection

    threads = [threading.Thread(target=port, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert errors == [], errors[:3]
        assert len(serials) == len(set(serials)) == 160
        assert not record.spool.exists() or record.spool.read_text() == ""
        assert record.verify_chain() == []
    finally:
        record.close()
