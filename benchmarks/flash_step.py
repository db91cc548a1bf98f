"""Benchmark: the station's flash step against the bare esptool CLI on the same boards.

Timing model on, 921600 baud, the example relay profile (bootloader, partition table,
~1 MB app, config partition). Boards run in a separate `station virtual --realtime`
process. Bare esptool: one `esptool write-flash` call writing the same four regions
(including its own connect and stub upload). Station: the pipeline's connect +
identify + flash steps (the same work), and the whole-unit step breakdown.
Target: the station within 5 % of bare esptool.

    python benchmarks/flash_step.py [--runs 3]
"""

from __future__ import annotations

import argparse
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

from station.config import StationConfig  # noqa: E402
from station.pipeline import StationContext, UnitJob, provision_unit  # noqa: E402
from station.profile import load_profile, resolve_secrets  # noqa: E402
from station.record import Record  # noqa: E402


def start_boards(run_dir: Path) -> tuple[subprocess.Popen, list[dict]]:
    proc = subprocess.Popen([sys.executable, "-m", "station", "virtual", "--realtime", "--json",
                             "--count", "2", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    boards = [json.loads(proc.stdout.readline()) for _ in range(2)]
    control = json.loads(proc.stdout.readline())["control"]
    return proc, boards, control


def ctl(control: str, op: str, device: int, **kw) -> None:
    from flashing.virtual.bench import ControlClient

    ControlClient(control).request(op, device, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RELAY_VENDOR_TOKEN", "bench-tok1")
    profile = load_profile(REPO / "profiles/relay")
    secrets, _ = resolve_secrets(profile)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        record = Record(tmp / "bench.db", b"k" * 32)  # the record is written only with the station's key
        ctx = StationContext(StationConfig(station_id="bench"), profile, secrets, record, b"k" * 32)
        # the station's config image for a fixed unit, for bare esptool to write too
        from flashing.nvs import NvsEntry, build_partition

        slot = profile.config_slot()
        config = build_partition("2smart", [NvsEntry("serial", "string", "BENCH-1")], slot.size)
        (tmp / "config.bin").write_bytes(config)
        files = [(r.offset, str(r.file)) for r in profile.regions] + [(slot.offset, str(tmp / "config.bin"))]
        proc, boards, control = start_boards(tmp / "run")
        bare, station_work, station_flash, breakdowns = [], [], [], []
        try:
            for run in range(args.runs):
                ctl(control, "swap", 0)
                ctl(control, "reset", 0, mode="download")
                cli = [sys.executable, "-m", "flashing.esptool_cli", "--port", boards[0]["url"],
                       "--before", "no-reset", "--after", "no-reset", "-b", "921600", "write-flash"]
                for off, path in files:
                    cli += [hex(off), path]
                t = time.perf_counter()
                subprocess.run(cli, check=True, capture_output=True)
                bare.append(time.perf_counter() - t)

                ctl(control, "swap", 1)
                res = provision_unit(UnitJob(boards[1]["url"]), ctx, lambda e: None)
                assert res.passed, res
                d = res.durations
                station_work.append(d["connect"] + d["identify"] + d["flash"])
                station_flash.append(d["flash"])
                breakdowns.append(d)
        finally:
            proc.terminate()
            proc.wait()
    b, s = statistics.median(bare), statistics.median(station_work)
    print(f"Timing model on, 921600 baud, relay profile ({args.runs} runs, medians):")
    print(f"  bare esptool CLI, one write-flash call (connect+stub+write+verify): {b:6.2f} s")
    print(f"  station connect + identify + flash steps (same work):               {s:6.2f} s "
          f"({100 * (s / b - 1):+.1f}%)")
    print(f"  station flash step alone:                                           "
          f"{statistics.median(station_flash):6.2f} s")
    print("  whole-unit step breakdown (median s):")
    for step in breakdowns[0]:
        print(f"    {step:<9} {statistics.median(bd[step] for bd in breakdowns):6.2f}")
    print(f"    {'total':<9} {statistics.median(sum(bd.values()) for bd in breakdowns):6.2f}")


if __name__ == "__main__":
    main()
