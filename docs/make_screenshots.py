#!/usr/bin/env python3
"""Render the operator's screen for the README: flashing, PASS/FAIL/ABORTED, 16 slots (SVG).

Runs the real screen headless against virtual boards (one of them faulty, one aborted
mid-flash), at 160x45, then the same state resized to 100x30 and 80x24.

    python docs/make_screenshots.py
"""

import asyncio
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flashing.virtual.bench import VirtualBench  # noqa: E402
from station.config import StationConfig  # noqa: E402
from station.runner import open_station  # noqa: E402
from station.tui import StationApp  # noqa: E402

OUT = REPO / "docs" / "screens"


async def shoot(app: StationApp, bench: VirtualBench) -> None:
    async with app.run_test(size=(160, 45)) as pilot:
        line = app.line
        while sum(s.step == "flash" and s.done > s.total // 3 for s in line.slots) < 3:
            await pilot.pause(0.1)
        await pilot.pause(0.5)
        app.save_screenshot("flashing.svg", str(OUT))
        line.abort(3)  # the operator's F8 on slot 4
        while not all(s.status in ("passed", "failed", "aborted") for s in line.slots):
            await pilot.pause(0.2)
        await pilot.press("f4")
        await pilot.pause(0.3)
        app.save_screenshot("pass-fail.svg", str(OUT))
        for width, height in ((100, 30), (80, 24)):
            await pilot.resize_terminal(width, height)
            await pilot.pause(0.3)
            app.save_screenshot(f"pass-fail-{width}x{height}.svg", str(OUT))


async def shoot_sixteen(app: StationApp) -> None:
    async with app.run_test(size=(160, 45)) as pilot:
        line = app.line
        while not all(s.step == "flash" and s.done > s.total // 4 for s in line.slots):
            await pilot.pause(0.1)
        await pilot.pause(0.3)
        app.save_screenshot("sixteen.svg", str(OUT))
        await pilot.resize_terminal(100, 30)
        await pilot.pause(0.3)
        app.save_screenshot("sixteen-100x30.svg", str(OUT))
        line.shutdown()
        while line.running():
            await pilot.pause(0.1)


def main() -> None:
    os.environ.setdefault("RELAY_VENDOR_TOKEN", "demo-tok42")
    with tempfile.TemporaryDirectory() as tmp, VirtualBench(4, "esp32", realtime=True, seed=7) as bench:
        bench[1].device.set_fault("flash_dead")
        station = StationConfig(station_id="line-1-station-1", database=Path(tmp) / "db.sqlite",
                                key_file=Path(tmp) / "k", profiles_dir=REPO / "profiles")
        ctx = open_station("relay", station=station, smoke="healthcheck")
        app = StationApp(ctx, [s.url for s in bench.slots], operator="Anna")
        app.line.lot = "LOT-2611"
        asyncio.run(shoot(app, bench))
    with tempfile.TemporaryDirectory() as tmp, VirtualBench(16, "esp32", realtime=True, seed=7) as bench:
        station = StationConfig(station_id="line-1-station-1", database=Path(tmp) / "db.sqlite",
                                key_file=Path(tmp) / "k", profiles_dir=REPO / "profiles")
        ctx = open_station("relay", station=station, smoke="healthcheck")
        app = StationApp(ctx, [s.url for s in bench.slots], operator="Anna")
        app.line.lot = "LOT-2611"
        asyncio.run(shoot_sixteen(app))
    print(f"wrote flashing, pass-fail (160x45, 100x30, 80x24) and sixteen (160x45, 100x30) to {OUT}")


if __name__ == "__main__":
    main()
