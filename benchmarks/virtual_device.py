"""Benchmark of the virtual device: its CPU per MB written, and the timing model.

Starts the boards in a separate process (`station virtual`), flashes them with the
real esptool's Python API from this process, and reports:
  1. device-side CPU seconds per MB written (timing model off, 921600 baud);
  2. with the timing model on, the measured time of a 1 MB incompressible write at
     921600 and at 115200 against what the model predicts (target: within 10 % once
     esptool's own CPU time during the write, which adds to the wire's, is taken out).

    python benchmarks/virtual_device.py            # everything (about 2 minutes)
    python benchmarks/virtual_device.py --quick    # skip the 115200 run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flashing  # noqa: F401
from esptool import cmds
from esptool.logger import TemplateLogger, log

from flashing.virtual.timing import predict_write

REPO = Path(__file__).resolve().parents[1]


class QuietLogger(TemplateLogger):
    def print(self, *a, **k): pass
    def note(self, m): pass
    def warning(self, m): pass
    def error(self, m): print(m, file=sys.stderr)
    def stage(self, finish=False): pass
    def progress_bar(self, *a, **k): pass
    def set_verbosity(self, v): pass


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_boards(run_dir: Path, realtime: bool) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "station", "virtual", "--chip", "esp32", "--json",
            "--run-dir", str(run_dir)] + (["--realtime"] if realtime else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)
    board = json.loads(proc.stdout.readline())
    proc.stdout.readline()  # control socket line
    return proc, board["url"]


def write_once(url: str, data: bytes, baud: int) -> tuple[float, float]:
    """The write's wall time, and esptool's CPU time during it (this process)."""
    esp = cmds.run_stub(cmds.detect_chip(url, connect_mode="no-reset"))
    if baud != 115200:
        esp.change_baud(baud)
    cmds.attach_flash(esp)
    t, cpu = time.perf_counter(), time.process_time()
    cmds.write_flash(esp, [(0x10000, data)])
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    esp._port.close()
    return elapsed, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the 1 MB write at 115200")
    args = ap.parse_args()
    log.set_logger(QuietLogger())
    data = os.urandom(1 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_boards(Path(tmp) / "cpu", realtime=False)
        try:
            before = cpu_seconds(proc.pid)
            host_before = time.process_time()
            t, _ = write_once(url, data * 2, 921600)
            dev_cpu = cpu_seconds(proc.pid) - before
            host_cpu = time.process_time() - host_before
        finally:
            proc.terminate()
            proc.wait()
        print("Timing model off, 2 MB random via stub at 921600:")
        print(f"  device CPU   {dev_cpu / 2:.3f} s per MB written")
        print(f"  esptool CPU  {host_cpu / 2:.3f} s per MB (host side, for comparison)")
        print(f"  wall         {t:.2f} s")

        print("\nTiming model on, 1 MB random via stub:")
        # esptool waits for each block's answer before it prepares the next: its CPU adds to the wire's time
        print(f"  {'baud':>8} {'predicted s':>12} {'measured s':>11} {'error':>7} {'esptool CPU s':>14} "
              f"{'error without it':>17}")
        for baud in ([921600] if args.quick else [921600, 115200]):
            proc, url = start_boards(Path(tmp) / f"rt{baud}", realtime=True)
            try:
                measured, cpu = write_once(url, data, baud)
            finally:
                proc.terminate()
                proc.wait()
            pred = predict_write(data, baud).seconds
            print(f"  {baud:>8} {pred:>12.2f} {measured:>11.2f} {100 * (measured / pred - 1):>+6.1f}% {cpu:>14.2f} "
                  f"{100 * ((measured - cpu) / pred - 1):>+16.1f}%")


if __name__ == "__main__":
    main()
