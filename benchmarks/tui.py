"""Benchmark: the operator's screen with 8 virtual boards flashing at once.

Timing model on, 921600 baud, the example relay profile, boards in a separate
`station virtual --realtime` process. The screen runs headless (Textual's test
driver) in this process, exactly as at the bench. Reports the station process's CPU
seconds per flashed MB, and the screen's response to a key press (F4, select the
next slot) while every slot flashes. Target: under 100 ms.

    python benchmarks/tui.py [--boards 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from textual import events  # noqa: E402

from station.config import StationConfig  # noqa: E402
from station.runner import open_station  # noqa: E402
from station.tui import StationApp  # noqa: E402


async def drive(app: StationApp, presses: int) -> tuple[list[float], float, float]:
    async with app.run_test(size=(160, 45)) as pilot:
        line = app.line
        deadline = time.monotonic() + 60
        need = max(1, len(line.slots) * 3 // 4)  # slots start a little apart: most must be flashing
        while sum(s.step == "flash" for s in line.slots) < need:
            if time.monotonic() > deadline:
                raise SystemExit(f"slots never all flashed: {[(s.status, s.step, s.reason) for s in line.slots]}")
            await pilot.pause(0.05)
        cpu0 = time.process_time()
        latencies, flashing = [], []
        for _ in range(presses):
            want = (app.selected + 1) % len(line.slots)
            t = time.perf_counter()
            # the key as the terminal driver delivers it, then wait until the card shows it
            app.post_message(events.Key("f4", None))
            while not app.cards[want].has_class("selected"):
                await asyncio.sleep(0.001)
            latencies.append((time.perf_counter() - t) * 1000)
            flashing.append(sum(s.step == "flash" for s in line.slots))
            await asyncio.sleep(0.2)
        while not all(s.status in ("passed", "failed") for s in line.slots):
            await pilot.pause(0.1)
        return latencies, flashing, time.process_time() - cpu0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boards", type=int, default=8)
    ap.add_argument("--presses", type=int, default=25)
    args = ap.parse_args()
    os.environ.setdefault("RELAY_VENDOR_TOKEN", "bench-tok1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc = subprocess.Popen([sys.executable, "-m", "station", "virtual", "--realtime", "--json", "--count",
                                 str(args.boards), "--run-dir", str(tmp / "run")],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        boards = [json.loads(proc.stdout.readline()) for _ in range(args.boards)]
        proc.stdout.readline()
        try:
            station = StationConfig(station_id="bench", database=tmp / "bench.db", key_file=tmp / "k",
                                    profiles_dir=REPO / "profiles")
            ctx = open_station("relay", station=station, smoke="none")
            app = StationApp(ctx, [b["url"] for b in boards], operator="bench")
            cpu_start = time.process_time()
            latencies, flashing, _ = asyncio.run(drive(app, args.presses))
            cpu_total = time.process_time() - cpu_start
        finally:
            proc.terminate()
            proc.wait()
        passed = sum(s.status == "passed" for s in app.line.slots)
        flashed_mb = passed * sum(len(d) for _, _, d in ctx.firmware) / 1e6
    print(f"{args.boards} boards, timing model on at 921600, relay profile: {passed} passed")
    print(f"  station process CPU: {cpu_total:.1f} s for {flashed_mb:.1f} MB flashed "
          f"= {cpu_total / flashed_mb:.2f} CPU s per MB (whole run, screen included)")
    print(f"  key press (F4) to the screen updated, while {min(flashing)}-{max(flashing)} slots flash "
          f"({len(latencies)} presses): median {statistics.median(latencies):.1f} ms, "
          f"p90 {sorted(latencies)[int(len(latencies) * 0.9)]:.1f} ms, max {max(latencies):.1f} ms")


if __name__ == "__main__":
    main()
