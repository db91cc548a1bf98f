"""`station` as esptool and idf.py users type it: -p/-b, ESPPORT/ESPBAUD, -q/-v, --version, completion.

And the usage errors a shell user makes: each is exit 2 with the command's own usage,
and none of them touches a board or the record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path

import esptool
import pytest
from esptool import cmds

from flashing.virtual.bench import VirtualBench
from station.cli import main
from tests.cli.test_station_process import Lines, untouched
from tests.station.conftest import REPO, TOKEN, json_lines, run_station, run_station_process


def after_config(stderr: str) -> str:
    """stderr without the line naming the station.toml in use (every command that reads one says it first)."""
    first, _, rest = stderr.partition("\n")
    return rest if first.startswith("station.toml: ") else stderr


@pytest.fixture
def env(station_env):
    clean = {k: v for k, v in os.environ.items() if k not in ("ESPPORT", "ESPTOOL_PORT", "ESPBAUD", "ESPTOOL_BAUD")}
    return {**clean, "STATION_CONFIG": str(station_env / "station.toml")}


def station(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return run_station_process(*args, env=env, cwd=cwd)


def rows(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"select count(*) from {table}").fetchone()[0]


def bauds(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [b for (b,) in conn.execute("select baud from attempts order by id")]


def finished(stdout: str) -> list[dict]:
    return [e for e in json_lines(stdout) if e["event"] == "unit_finished"]


# -- --version ----------------------------------------------------------------------------------

def test_version_names_the_package_and_esptool(tmp_path):
    r = run_station_process("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(f"station {version('provisioning-station')} (provisioning-station), "
                               f"esptool {esptool.__version__}, Python ")


# -- -p/--port, -b/--baud, ESPPORT, ESPBAUD ---------------------------------------------------------

def test_ports_and_baud_from_the_environment_and_the_options(station_env, env):
    with VirtualBench(4, "esp32", run_dir=station_env / "run") as bench:
        # two ports as idf.py users separate them, the rate as they set it; the profile says 921600
        r = station("flash", "--json", env={**env, "ESPPORT": f"{bench[0].url}; {bench[1].url}", "ESPBAUD": "230400"},
                    cwd=station_env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert sorted(e["port"] for e in finished(r.stdout)) == [bench[0].url, bench[1].url]
        assert bauds(station_env / "station.db") == [230400, 230400]
        # -p and --port, and -b, win over the environment
        r = station("flash", "-p", bench[2].url, "--port", bench[3].url, "-b", "460800", "--json",
                    env={**env, "ESPPORT": "/dev/ttyNOPE", "ESPBAUD": "230400"}, cwd=station_env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert sorted(e["port"] for e in finished(r.stdout)) == [bench[2].url, bench[3].url]
        assert bauds(station_env / "station.db")[2:] == [460800, 460800]


def test_a_bad_espbaud_is_a_usage_error(station_env, env):
    r = station("flash", "--virtual", "1", env={**env, "ESPBAUD": "fast"}, cwd=station_env)
    assert r.returncode == 2 and r.stdout == ""
    assert "usage: station flash" in r.stderr and "$ESPBAUD: 'fast' is not a baud rate" in r.stderr
    assert not (station_env / "station.db").exists()


def test_the_screen_takes_ports_and_baud_as_flash_does(station_env, capsys, monkeypatch):
    from station.tui import StationApp

    screens: list[StationApp] = []
    monkeypatch.setattr(StationApp, "run", lambda self, *a, **k: screens.append(self))  # the screen: tests/station
    monkeypatch.setenv("ESPPORT", "/dev/ttyUSB7,/dev/ttyUSB8")
    monkeypatch.setenv("ESPBAUD", "460800")
    assert run_station(capsys, "tui", "--operator", "ann")[0] == 0
    assert run_station(capsys, "tui", "-p", "/dev/ttyACM0", "--port", "/dev/ttyACM1", "-b", "115200",
                       "--operator", "ann")[0] == 0
    assert run_station(capsys, "-p", "/dev/ttyACM2", "--operator", "ann")[0] == 0  # no command: the screen
    assert [[s.port for s in app.line.slots] for app in screens] == [["/dev/ttyUSB7", "/dev/ttyUSB8"],
                                                                     ["/dev/ttyACM0", "/dev/ttyACM1"], ["/dev/ttyACM2"]]
    assert [app.line.ctx.profile.baud for app in screens] == [460800, 115200, 460800]  # the profile says 921600


# -- -q and -v -------------------------------------------------------------------------------------

def test_quiet_is_data_only_and_verbose_says_more(station_env, env):
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        quiet = station("flash", "-q", "-p", bench[0].url, env=env, cwd=station_env)
        verbose = station("-v", "flash", "-p", bench[1].url, env=env, cwd=station_env)
    for r in (quiet, verbose):
        assert r.returncode == 0, r.stderr[-2000:]
        assert "1 of 1 units passed" in r.stdout  # the summary is data: it stays
    assert quiet.stderr == ""
    # beyond the usual progress: each step's time, esptool's own lines
    assert "flash [" in verbose.stderr and "flash done in" in verbose.stderr and "[esptool]" in verbose.stderr
    out = station_env / "x.csv"
    r = station("-q", "export", "--outcome", "any", "--out", str(out), env=env, cwd=station_env)
    assert r.returncode == 0 and r.stderr == "" and out.exists()
    r = station("export", "-q", "--out", str(out), "--since", "never", env=env, cwd=station_env)
    assert r.returncode == 2 and "'never' is not an ISO date" in r.stderr  # errors still say so


# -- fixture auto-detection ----------------------------------------------------------------------

def with_fixture(station_env: Path, *vid_pids: str) -> None:
    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text() + "[ports]\nusb = [" + ", ".join(f'"{v}"' for v in vid_pids) + "]\n")


def test_no_fixture_port_is_a_usage_error(station_env, env):
    with_fixture(station_env, "10c4:ea60", "1a86:7523")
    r = station("flash", env=env, cwd=station_env)
    assert r.returncode == 2 and r.stdout == ""
    assert "usage: station flash" in r.stderr
    assert "no fixture ports found (USB VID:PID 10c4:ea60, 1a86:7523)" in r.stderr
    assert not (station_env / "station.db").exists()


def test_flash_finds_the_fixture_ports_as_the_screen_does(station_env, monkeypatch, capsys):
    # no USB bridge exists here: pyserial's port list is the one seam faked; it names virtual boards
    from serial.tools import list_ports
    from serial.tools.list_ports_common import ListPortInfo

    for var in ("ESPPORT", "ESPTOOL_PORT", "ESPBAUD", "ESPTOOL_BAUD"):
        monkeypatch.delenv(var, raising=False)
    with_fixture(station_env, "10c4:ea60")
    with VirtualBench(3, "esp32", run_dir=station_env / "run") as bench:
        def port(slot, vid, pid):
            info = ListPortInfo(slot.url, skip_link_detection=True)
            info.vid, info.pid = vid, pid
            return info

        listed = [port(bench[2], 0x10C4, 0xEA60), port(bench[1], 0x0403, 0x6001), port(bench[0], 0x10C4, 0xEA60)]
        monkeypatch.setattr(list_ports, "comports", lambda *a, **k: listed)
        rc, out, err = run_station(capsys, "flash", "--json")
        assert rc == 0, err[-2000:]
        # the bridges station.toml names, sorted by path; the FTDI one is not the fixture's
        assert sorted(e["port"] for e in finished(out)) == [bench[0].url, bench[2].url]
        assert bench[1].device.flash.read(0x1000, 0x1000) == b"\xff" * 0x1000


# -- usage errors through the command's own parser ---------------------------------------------------

# the first of each kind runs as a process (exit code and streams are the process's own); the rest in-process
@pytest.mark.parametrize("args,usage,words", [
    (["export", "--since", "yesterday", "--out", "x.csv"], "usage: station export",
     "argument --since: 'yesterday' is not an ISO date or time; use 2026-11-01, 2026-11-01T08:30"),
    (["export", "--until", "11/01/2026", "--out", "x.csv"], "usage: station export", "'11/01/2026' is not an ISO"),
    (["export", "--since", "2026-13-01", "--out", "x.csv"], "usage: station export", "'2026-13-01' is not an ISO"),
    (["export", "--since", "2026-11-02", "--until", "2026-11-01", "--out", "x.csv"], "usage: station export",
     "--since 2026-11-02 is not before --until 2026-11-01"),
    (["flash", "--prot", "/dev/ttyUSB0"], "usage: station flash", "unrecognized arguments: --prot"),
    (["export", "verify", "--bogus", "x.csv"], "usage: station export verify", "unrecognized arguments: --bogus"),
    (["db", "verify", "--since", "2026-11-01"], "usage: station db verify", "unrecognized arguments: --since"),
    (["flash", "-b", "9600", "--virtual", "1"], "usage: station flash", "'9600' is not a baud rate"),
    (["flash", "--virtual", "-1"], "usage: station flash", "argument --virtual: -1 boards: give 1 to 64"),
    (["flash", "--virtual", "0"], "usage: station flash", "argument --virtual: 0 boards: give 1 to 64"),
    (["flash", "--virtual", "1000"], "usage: station flash", "argument --virtual: 1000 boards: give 1 to 64"),
    (["flash", "--virtual", "many"], "usage: station flash", "'many' is not a number of boards"),
    (["demo", "--batch", "--count", "65"], "usage: station demo", "argument --count: 65 boards: give 1 to 64"),
    (["virtual", "--count", "0"], "usage: station virtual", "argument --count: 0 boards: give 1 to 64"),
    (["flash", "--realtime", "-p", "/dev/null"], "usage: station flash", "--realtime is for virtual boards"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_usage_errors_show_the_commands_usage(station_env, env, capsys, monkeypatch, args, usage, words):
    monkeypatch.chdir(station_env)
    if args in AS_PROCESS:
        r = station(*args, env=env, cwd=station_env)
        rc, out, err = r.returncode, r.stdout, r.stderr
    else:
        capsys.readouterr()
        try:
            rc = main(args)
        except SystemExit as exc:  # argparse's own errors end the process
            rc = exc.code
        out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert after_config(err).startswith(usage), err
    assert words in err
    assert not (station_env / "station.db").exists() and not (station_env / "x.csv").exists()


AS_PROCESS = [["export", "--since", "yesterday", "--out", "x.csv"], ["flash", "--prot", "/dev/ttyUSB0"],
              ["export", "verify", "--bogus", "x.csv"], ["flash", "--virtual", "-1"], ["flash", "--virtual", "1000"],
              ["flash", "--realtime", "-p", "/dev/null"]]


# -- export: dates, the database, the format ---------------------------------------------------------

@pytest.fixture(scope="module")
def recorded_station(tmp_path_factory) -> tuple[Path, dict]:
    """A station with one provisioned unit in its record, shared by the tests that only add exports to it."""
    home = tmp_path_factory.mktemp("recorded")
    shutil.copytree(REPO / "profiles" / "relay", home / "profiles" / "relay")
    (home / "station.toml").write_text('station_id = "test-station"\ndatabase = "station.db"\n'
                                       'profiles_dir = "profiles"\nkey_file = "station.key"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESP", "STATION_"))}
    env.update(STATION_CONFIG=str(home / "station.toml"), RELAY_VENDOR_TOKEN=TOKEN)
    r = station("flash", "--virtual", "1", env=env, cwd=home)
    assert r.returncode == 0, r.stderr[-2000:]
    return home, env


@pytest.fixture
def recorded(recorded_station) -> Path:
    return recorded_station[0]


@pytest.fixture
def renv(recorded_station) -> dict:
    return recorded_station[1]


def test_dates_are_iso_and_offsets_count(recorded, renv, capsys, monkeypatch):
    for name in ("STATION_CONFIG", "RELAY_VENDOR_TOKEN"):
        monkeypatch.setenv(name, renv[name])

    def exported(env, cwd, *args: str) -> int:  # in-process: the options' parsing is the point, not the process
        out = cwd / "dated.csv"
        rc, _, err = run_station(capsys, "export", "--out", str(out), *args)
        assert rc == 0, err
        return len(out.read_text().splitlines()) - 1

    env = renv
    now = datetime.now(timezone.utc)
    assert exported(env, recorded, "--since", "2000-01-01") == 1
    assert exported(env, recorded, "--until", "2000-01-01") == 0
    assert exported(env, recorded, "--since", (now + timedelta(days=2)).date().isoformat()) == 0
    # an hour ago, written in UTC+03:00: later than now as text, earlier as a time
    an_hour_ago = (now - timedelta(hours=1)).astimezone(timezone(timedelta(hours=3)))
    assert exported(env, recorded, "--since", an_hour_ago.isoformat(timespec="minutes")) == 1
    assert exported(env, recorded, "--until", an_hour_ago.isoformat(timespec="minutes")) == 0
    # a time without an offset is UTC, as the record keeps it
    assert exported(env, recorded, "--since", (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")) == 1


def test_read_only_commands_never_create_a_database(station_env, env):
    typo = station_env / "statoin.db"
    for args in (["export", "--db", str(typo), "--out", str(station_env / "x.csv")],
                 ["db", "verify", "--db", str(typo)]):
        r = station(*args, env=env, cwd=station_env)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert f"no database at {typo}: check the path" in r.stderr
        assert after_config(r.stderr).startswith(f"usage: station {args[0]}")
    r = station("db", "verify", env=env, cwd=station_env)  # station.toml's database, not made yet either
    assert r.returncode == 2 and "no database at" in r.stderr and "(station.toml's database)" in r.stderr
    assert not typo.exists() and not (station_env / "station.db").exists() and not (station_env / "x.csv").exists()


def test_the_out_extension_gives_the_format(recorded, renv):
    env = renv
    jsonl, csv = recorded / "units.jsonl", recorded / "units.csv"
    assert station("export", "--out", str(jsonl), env=env, cwd=recorded).returncode == 0
    assert [json.loads(line)["outcome"] for line in jsonl.read_text().splitlines()] == ["passed"]
    assert station("export", "--out", str(csv), env=env, cwd=recorded).returncode == 0
    header = csv.read_text().splitlines()[0]
    assert "outcome" in header.split(",") and not header.startswith("{")
    for args, words in ((["--out", str(recorded / "u.jsonl"), "--format", "csv"],
                         "--format csv contradicts --out"),
                        (["--out", str(recorded / "u.csv"), "--format", "jsonl"], "--format jsonl contradicts"),
                        (["--out", str(recorded / "u.json")], "the export writes JSON lines: name it .jsonl")):
        r = station("export", *args, env=env, cwd=recorded)
        assert r.returncode == 2 and words in r.stderr and after_config(r.stderr).startswith("usage: station export")
    assert not any(recorded.glob("u.*"))
    # --format with a name that says nothing is as given
    assert station("export", "--out", str(recorded / "units.txt"), "--format", "jsonl", env=env,
                   cwd=recorded).returncode == 0
    assert json.loads((recorded / "units.txt").read_text().splitlines()[0])["outcome"] == "passed"


# -- a port that cannot be opened ------------------------------------------------------------------

def test_an_unopenable_port_is_a_usage_error_and_leaves_no_trace(recorded, renv, tmp_path):
    db = recorded / "station.db"
    before = rows(db, "attempts"), rows(db, "journal")
    assert before[0] >= 1
    with VirtualBench(1, "esp32", run_dir=tmp_path / "run") as bench:
        r = station("flash", "-p", bench[0].url, "-p", "/dev/ttyNOPE", "--json", env=renv, cwd=recorded)
        assert r.returncode == 2 and r.stdout == ""
        assert after_config(r.stderr).startswith("usage: station flash")
        assert "cannot open port /dev/ttyNOPE" in r.stderr and "nothing was flashed" in r.stderr
        assert (rows(db, "attempts"), rows(db, "journal")) == before
        assert untouched(bench)
        # the live board was opened and closed by that check: it still flashes (into a record of its own)
        r = station("flash", "-p", bench[0].url, "--json", "--db", str(tmp_path / "other.db"), env=renv,
                    cwd=recorded)
        assert r.returncode == 0, r.stderr[-2000:]
        assert [e["outcome"] for e in finished(r.stdout)] == ["passed"]


# -- station virtual: URLs that work when pasted ------------------------------------------------------

def test_virtual_prints_absolute_urls(tmp_path):
    cwd = tmp_path / "here"
    cwd.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "station", "virtual", "--state-dir", "var/boards", "--json"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        board = json.loads(Lines(proc.stdout).next())
        sock = (cwd / "var/boards/board-0.sock").resolve()
        assert board["url"] == f"vesp://{sock}" and board["url"].startswith("vesp:///")
        esp = cmds.detect_chip(board["url"])  # from this process, whose working folder is another
        try:
            assert esp.CHIP_NAME == "ESP32"
        finally:
            esp._port.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()


# -- completion --------------------------------------------------------------------------------------

def complete(line: str, tmp_path: Path) -> list[str]:
    out = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
           "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
    r = subprocess.run([sys.executable, "-m", "station"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return sorted(c.strip() for c in out.read_text().split("\n") if c.strip())


def test_shell_completion(tmp_path):
    assert complete("station fl", tmp_path) == ["flash"]
    assert {"--baud", "--port", "--virtual", "--realtime"} <= set(complete("station flash --", tmp_path))
    assert complete("station export --format ", tmp_path) == ["csv", "jsonl"]


def test_the_parser_loads_no_screen_and_no_esptool():
    # the shell runs `station` at every Tab: only the parser is loaded (Textual stays with the screen)
    code = ("import sys, station.cli as c; c.build_parser(); "
            "print(','.join(sorted({n.split('.')[0] for n in sys.modules} & {'textual', 'esptool', 'argcomplete'})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr
