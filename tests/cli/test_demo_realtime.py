"""`station demo --realtime`: the trainees' boards run the timing model, so cycle times look real."""

from __future__ import annotations

import os
import re

import pytest

from flashing.virtual import bench as bench_module
from flashing.virtual.device import VirtualDevice
from flashing.virtual.timing import predict_write
from station.tui import StationApp
from tests.station.conftest import REPO, run_station, run_station_process


@pytest.fixture
def boards_made(monkeypatch):
    """The `realtime` each virtual board of the run was made with (then run without the model: quick)."""
    made: list[bool] = []

    class Recorded(VirtualDevice):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self.realtime)
            self.realtime = False  # the flag reaching the board is this test's point; its timing, tests/flashing's

    monkeypatch.setattr(bench_module, "VirtualDevice", Recorded)
    for name, value in (("STATION_MONITOR_PASSWORD", "demo-monitor"), ("STATION_BROKER_ADMIN_PASSWORD", "demo-admin")):
        monkeypatch.setenv(name, value)  # what the demo would set in this process's environment for good
    return made


@pytest.mark.parametrize("flag", [True, False])
def test_demo_batch_realtime_reaches_the_boards(station_env, capsys, boards_made, flag):
    args = ["demo", "--batch", "--count", "2", "--smoke", "none", "--db", str(station_env / "demo.db")]
    rc, out, err = run_station(capsys, *args, *(["--realtime"] if flag else []))
    assert rc == 0, err[-2000:]
    assert "2 of 2 units passed" in out
    assert boards_made == [flag, flag]


@pytest.mark.parametrize("flag", [True, False])
def test_demo_screen_realtime_reaches_the_boards(station_env, capsys, boards_made, monkeypatch, flag):
    monkeypatch.setattr(StationApp, "run", lambda self, *a, **k: None)  # the screen itself: tests/station
    args = ["demo", "--count", "3", "--operator", "trainee", "--db", str(station_env / "demo.db")]
    rc, _, err = run_station(capsys, *args, *(["--realtime"] if flag else []))
    assert rc == 0, err[-2000:]
    assert boards_made == [flag] * 3


@pytest.mark.slow
def test_demo_realtime_takes_the_models_time(station_env):
    # a lower bound only: the model sleeps for the wire and the flash, so no machine is faster than it
    env = {**os.environ, "STATION_CONFIG": str(station_env / "station.toml")}
    r = run_station_process("demo", "--batch", "--realtime", "--count", "1", "--smoke", "none", "--db",
                            str(station_env / "demo.db"), env=env, cwd=station_env)
    assert r.returncode == 0, r.stderr[-2000:]
    app = (REPO / "profiles/relay/firmware/relay.bin").read_bytes()
    least = predict_write(app, 921600).seconds
    seconds = float(re.search(r"PASS .* (\d+\.\d)s", r.stdout).group(1))
    assert seconds >= least, (seconds, least)
