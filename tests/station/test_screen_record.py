"""The operator's screen and the record: interrupted units announced, SIGTERM recorded as aborts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from flashing.virtual.bench import VirtualBench
from station.runner import open_station
from station.tui import StationApp
from tests.station.conftest import REPO


def test_the_screen_names_the_units_a_killed_station_left_interrupted(station_env):
    db = station_env / "station.db"
    key = (station_env / "station.key")
    open_station("relay", station_env / "station.toml").record.close()  # creates the key and the database
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r});"
              "from station.record import Record, Attempt, SerialPlan, now_iso;"
              f"r = Record({str(db)!r}, bytes.fromhex(open({str(key)!r}).read().strip()));"
              "a = Attempt(port='/dev/ttyUSB3', station_id='test-station', profile='relay', profile_hash='h',"
              " started_at=now_iso(), mac='24:0a:c4:00:09:09');"
              "r.start(a, SerialPlan(given='RLY-KILLED-1')); import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    ctx = open_station("relay", station_env / "station.toml")
    app = StationApp(ctx, [], operator="Anna", poll_interval=0.1)

    async def go():
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.1)
            texts = [str(n.message) for n in app._notifications]
            assert any("1 unit(s) were interrupted: RLY-KILLED-1 (24:0a:c4:00:09:09)" in t for t in texts), texts

    asyncio.run(go())
    assert ctx.record.attempts()[0]["outcome"] == "interrupted"


def test_sigterm_on_the_screen_aborts_and_records_every_running_unit(station_env):
    ctx = open_station("relay", station_env / "station.toml")
    with VirtualBench(2, "esp32", run_dir=station_env / "run", realtime=True) as bench:
        app = StationApp(ctx, [s.url for s in bench.slots], operator="Anna", poll_interval=0.1)

        async def go():
            async with app.run_test(size=(160, 45)) as pilot:
                deadline = time.monotonic() + 60
                while not all(s.step == "flash" for s in app.line.slots):
                    assert time.monotonic() < deadline, [(s.status, s.step) for s in app.line.slots]
                    await pilot.pause(0.1)
                os.kill(os.getpid(), signal.SIGTERM)  # the screen's own handler: never pytest's death
                deadline = time.monotonic() + 30
                while app.is_running and app.return_code is None:
                    assert time.monotonic() < deadline, "the screen did not quit on SIGTERM"
                    await asyncio.sleep(0.05)

        asyncio.run(go())
        assert app.signalled == "SIGTERM"
        rows = ctx.record.attempts()
        assert [(r["outcome"], r["failed_step"]) for r in rows] == [("aborted", "flash")] * 2
