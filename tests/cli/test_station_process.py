"""`station` as a process: exit codes, what stdout carries, the demo and the virtual boards.

These run `python -m station …` in a subprocess: exit codes and writes to fd 1 are
the process's own, which an in-process call cannot show.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading

import pytest
from esptool import cmds

from flashing.ports import present
from flashing.virtual.bench import VirtualBench
from tests.station.conftest import TOKEN, run_station_process


@pytest.fixture
def env(station_env):
    return {**os.environ, "STATION_CONFIG": str(station_env / "station.toml")}


def untouched(bench: VirtualBench) -> bool:
    return all(s.device.flash.read(0x1000, 0x1000) == b"\xff" * 0x1000 for s in bench.slots)


# -- exit code 2: usage and configuration errors, nothing flashed --------------------------------

def test_no_port_is_a_usage_error(station_env, env):
    env = {k: v for k, v in env.items() if k not in ("ESPPORT", "ESPTOOL_PORT")}
    r = run_station_process("flash", "--profile", "relay", env=env, cwd=station_env)
    assert r.returncode == 2 and r.stdout == ""
    assert "no fixture ports found" in r.stderr and "give -p PORT, $ESPPORT or --virtual N" in r.stderr


def test_unknown_option_is_a_usage_error(station_env, env):
    r = run_station_process("flash", "--prot", "/dev/ttyUSB0", env=env, cwd=station_env)
    assert r.returncode == 2 and r.stdout == "" and "unrecognized arguments: --prot" in r.stderr


def test_serials_must_match_ports(station_env, env):
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        r = run_station_process("flash", "--port", bench[0].url, "--port", bench[1].url, "--serial", "SN-1",
                                "--json", env=env, cwd=station_env)
        assert r.returncode == 2 and r.stdout == ""
        assert "1 serials for 2 ports; give one per port" in r.stderr
        assert untouched(bench)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t + 'slot = 4\n', "station.toml: slot: unknown key; allowed here: station_id,"),
    (lambda t: t + '[smoke]\ntimeout = 3\n', "station.toml: smoke.timeout: unknown key; allowed here: timeout_s,"),
    (lambda t: t + 'slots = [4\n', "station.toml: (file): not valid TOML: Unclosed array"),
    (lambda t: t.replace('station_id = "test-station"', 'station_id = test-station'),
     "station.toml: (file): not valid TOML: Invalid value (at line 1, column 14)"),
], ids=["unknown-key", "unknown-smoke-key", "malformed-array", "unquoted-string"])
def test_bad_station_toml_is_a_configuration_error(station_env, env, edit, message):
    cfg = station_env / "station.toml"
    cfg.write_text(edit(cfg.read_text()))
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        r = run_station_process("flash", "--port", bench[0].url, "--json", env=env, cwd=station_env)
        assert r.returncode == 2, r.stderr
        assert r.stdout == "" and "nothing was flashed" in r.stderr and message in r.stderr
        assert untouched(bench)


# -- --json: stdout is data and nothing else -------------------------------------------------------

def test_json_lines_on_failing_units(station_env, env):
    with VirtualBench(3, "esp32", run_dir=station_env / "run") as bench:
        bench[1].device.set_fault("no_download_mode")
        bench[2].device.set_fault("flash_dead")
        ports = sum((["--port", s.url] for s in bench.slots), [])
        r = run_station_process("flash", *ports, "--json", env=env, cwd=station_env)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object ...
    assert all(isinstance(e, dict) and "event" in e for e in events) and len(lines) > 20
    assert {e["event"] for e in events} <= {"step_started", "step_finished", "progress", "unit_info",
                                           "unit_finished"}  # ... and console chatter stays out
    done = {e["port"]: e for e in events if e["event"] == "unit_finished"}
    assert [done[s.url]["outcome"] for s in bench.slots] == ["passed", "failed", "failed"]
    for s, step, words in ((bench[1], "connect", "instead of download mode"),
                           (bench[2], "identify", "flash")):
        bad = done[s.url]
        assert bad["failed_step"] == step and words in bad["error"], bad
        assert bad["remedy"] and bad["port"] == s.url
        assert set(bad) >= {"mac", "serial", "durations", "outcome", "failed_step", "error", "remedy"}
        assert step in bad["durations"]
    assert TOKEN not in r.stdout + r.stderr


# -- station demo --batch ----------------------------------------------------------------------

def test_demo_batch(station_env, env):
    db = station_env / "var" / "demo.db"
    r = run_station_process("demo", "--batch", "--count", "2", "--db", str(db), env=env, cwd=station_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 of 2 units passed" in r.stdout
    out = db.with_name("demo-export.csv")
    assert out.exists() and f"2 provisioned units exported to {out}" in r.stderr
    v = run_station_process("export", "verify", str(out), env=env, cwd=station_env)
    assert v.returncode == 0 and "verified" in v.stdout and "(2 rows" in v.stdout
    rows = [line for line in out.read_text().splitlines()[1:] if line]
    assert len(rows) == 2 and all(",passed," in row for row in rows)
    assert all('""smoke""' in row for row in rows)  # the pair smoke test ran against the embedded broker


# -- station virtual and station virtual-ctl -------------------------------------------------------

class Lines:
    """A process's stdout, line by line, with a deadline per line."""

    def __init__(self, stream):
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(line) for line in stream], daemon=True).start()

    def next(self, timeout: float = 30) -> str:
        return self.q.get(timeout=timeout)


def ctl(control, *args: str) -> subprocess.CompletedProcess:
    return run_station_process("virtual-ctl", "--control", str(control), *args)


def test_virtual_boards_in_their_own_process_and_virtual_ctl(tmp_path):
    run_dir = tmp_path / "boards"
    proc = subprocess.Popen([sys.executable, "-m", "station", "virtual", "--count", "2", "--chip", "esp32",
                             "--json", "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out = Lines(proc.stdout)
        boards = [json.loads(out.next()) for _ in range(2)]
        control = json.loads(out.next())["control"]
        assert [b["index"] for b in boards] == [0, 1] and {b["chip"] for b in boards} == {"ESP32"}
        assert all(b["url"].startswith("vesp://") and os.path.exists(b["pty"]) for b in boards)

        # the unmodified esptool reaches a board in the other process and reads its MAC
        esp = cmds.detect_chip(boards[0]["url"])
        try:
            assert esp.CHIP_NAME == "ESP32"
            assert ":".join(f"{b:02x}" for b in esp.read_mac()) == boards[0]["mac"]
        finally:
            esp._port.close()

        r = ctl(control, "list")
        assert r.returncode == 0
        assert [d["mac"] for d in json.loads(r.stdout)["devices"]] == [b["mac"] for b in boards]
        r = ctl(control, "--device", "1", "fault", "garble_above", "460800")
        assert r.returncode == 0 and json.loads(r.stdout)["state"]["faults"] == {"garble_above": 460800}
        r = ctl(control, "--device", "1", "clear_faults")
        assert json.loads(r.stdout)["state"]["faults"] == {}
        assert ctl(control, "--device", "1", "unplug").returncode == 0
        assert not present(boards[1]["url"])
        assert ctl(control, "--device", "1", "replug").returncode == 0
        assert present(boards[1]["url"])
        r = ctl(control, "--device", "0", "reset", "app")  # a blank board booted: the ROM's boot loop
        assert r.returncode == 0 and json.loads(r.stdout)["state"]["mode"] == "bootloop"
        r = ctl(control, "--device", "0", "console")
        assert r.returncode == 0 and "boot:0x13 (SPI_FAST_FLASH_BOOT)\ninvalid header: 0xffffffff" in r.stdout
        r = ctl(control, "--device", "5", "state")  # no such board: refused in words
        assert r.returncode == 2 and "device must be an index from 0 to 1" in r.stderr
        r = ctl(control, "--device", "0", "fault", "no_such_fault")
        assert r.returncode == 2 and "unknown fault 'no_such_fault'" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)  # what a service manager sends: it stops cleanly
        rc = proc.wait(30)
    assert rc == 0, proc.stderr.read()
    assert not os.path.exists(control)
