"""Benchmark: a whole line on one station — 1, 4, 8 and 16 ports at once.

Timing model on at 921600, the example relay profile (~1 MB app) with the healthcheck
smoke test, boards in a separate `station virtual --realtime` process, one station
process driving every port. Prints per port count: aggregate throughput, mean
whole-unit cycle, the cycle the timing model says is the minimum, units per hour,
station CPU and peak memory, and the record's time per unit (the write-ahead start
commit in the serial step, the finish). Then fast rework against a full flash of the same unit,
and (with --soak N) memory growth of the station process across N units. Last, how long
the operator's abort of one slot mid-write takes (the screen's F8), four ports at once.

    python benchmarks/line.py [--ports 1,4,8,16] [--soak 1000] [--aborts 5] [--central URL]
    python benchmarks/line.py --profile secure-development --chip esp32c3 [--ports 1,16]

`--profile secure-development|secure-release` runs the line on the relay profile with
NVS encryption and [security] flash_encryption (each board's eFuses burned, its regions
encrypted per unit; README "Secure production") and adds the secure step's time per unit;
the rework, soak and abort measurements are for the plain relay profile and are skipped.

With --central URL the station has a [central] record there (station/central.py: the push
thread, serial blocks, the plant-wide guard): the outbox's cost on the line is the
difference against a run without it (benchmarks/stations.py measures both ways, each run
on a fresh database).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flashing.virtual.bench import ControlClient  # noqa: E402
from flashing.virtual.timing import predict_write  # noqa: E402
from station.config import CentralSettings, StationConfig  # noqa: E402
from station.pipeline import UnitJob  # noqa: E402
from station.runner import open_station, run_units  # noqa: E402

STUB_BYTES = 8608 + 284  # esptool's stub set 2 for ESP32, uploaded after the ROM's baud change


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def model_min_cycle(ctx) -> float:
    """The cycle the timing model allows at best: wire and flash only, no host time."""
    regions = [d for _, _, d in ctx.firmware] + [b"\xff" * ctx.profile.config_slot().size]
    wire = sum(predict_write(d, ctx.profile.baud).seconds for d in regions)
    # the ROM's baud change (esptool sleeps 50 ms after it), then the stub at the profile's rate
    stub = 0.05 + (STUB_BYTES + 200) * 10 / ctx.profile.baud
    resets = 0.1 + 0.05 + 0.02 + 0.1  # the station's reset pulses (download, then app)
    checks = ctx.profile.checks
    boot_log = 2300 * 10 / 115200 + checks.boot_settle_s  # boot log at 115200, then the boot check's settle
    smoke = checks.smoke_soak_s  # the healthcheck's round trip is ms; then the console is watched
    return wire + stub + resets + boot_log + smoke


CHIP = "esp32"  # the boards' chip (--chip)
PROFILES: Path | None = None  # a profiles dir made for --profile (else the repository's)


def start_boards(n: int, run_dir: Path):
    proc = subprocess.Popen([sys.executable, "-m", "station", "virtual", "--realtime", "--json", "--count",
                             str(n), "--run-dir", str(run_dir), "--chip", CHIP], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    boards = [json.loads(proc.stdout.readline()) for _ in range(n)]
    control = json.loads(proc.stdout.readline())["control"]
    return proc, boards, control


def station_ctx(tmp: Path, smoke: str = "healthcheck", central: str = ""):
    # one station id per run with [central]: a fresh local journal under an id the central copy holds is a conflict
    station = StationConfig(station_id=f"bench-{tmp.name}" if central else "bench", database=tmp / "bench.db",
                            key_file=tmp / "k", profiles_dir=PROFILES or REPO / "profiles",
                            central=CentralSettings(url=central))
    return open_station("relay", station=station, smoke=smoke)


def run_ports(n: int, tmp: Path, central: str = "") -> dict:
    ctx = station_ctx(tmp, central=central)
    proc, boards, control = start_boards(n, tmp / f"run{n}")
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        results = run_units([UnitJob(b["url"]) for b in boards], ctx, lambda e: None)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    finally:
        proc.terminate()
        proc.wait()
        ctx.close()  # with [central]: the last push, and the push thread ends
    passed = [r for r in results if r.passed]
    size = sum(len(d) for _, _, d in ctx.firmware) + ctx.profile.config_slot().size
    cycles = [sum(r.durations.values()) for r in passed]
    return {"ports": n, "passed": len(passed), "wall": wall, "throughput": len(passed) * size / wall,
            "cycle": statistics.mean(cycles) if cycles else float("nan"), "uph": len(passed) / wall * 3600,
            "cpu": cpu, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "min_cycle": model_min_cycle(ctx),
            # the record's own steps: the write-ahead commit (serial) and the finish (record)
            "serial_ms": 1000 * statistics.mean(r.durations["serial"] for r in passed) if passed else float("nan"),
            "record_ms": 1000 * statistics.mean(r.durations["record"] for r in passed) if passed else float("nan"),
            "guard_ms": 1000 * statistics.mean(r.durations["guard"] for r in passed) if passed else float("nan"),
            "secure_ms": 1000 * statistics.mean(r.durations.get("secure", 0) for r in passed) if passed else 0.0,
            "flash_s": statistics.mean(r.durations["flash"] for r in passed) if passed else float("nan"),
            "failed": [r.error for r in results if not r.passed][:3]}


FLASHING = ("connect", "identify", "flash")  # every step that talks the flashing protocol


def rework(tmp: Path) -> list[tuple[str, dict, dict]]:
    """A full unit, then two reworks of the same board: one whose config also matches
    (nothing to write), one with a new vendor token (only the config partition differs)."""
    (tmp / "rework").mkdir()
    ctx = station_ctx(tmp / "rework", smoke="none")
    proc, boards, _ = start_boards(1, tmp / "run-rw")
    url = boards[0]["url"]
    try:
        first = run_units([UnitJob(url)], ctx, lambda e: None)[0]
        same = run_units([UnitJob(url, rework=True)], ctx, lambda e: None)[0]
        ctx.secrets["vendor_token"] = "bench-tok2"
        changed = run_units([UnitJob(url, rework=True)], ctx, lambda e: None)[0]
    finally:
        proc.terminate()
        proc.wait()
    assert first.passed and same.passed and changed.passed, (first, same, changed)
    assert same.written_regions == () and changed.written_regions == ("config",), (same, changed)
    return [("firmware and config match", first.durations, same.durations),
            ("new token: config rewritten", first.durations, changed.durations)]


def secure_profiles(tmp: Path, chip: str, mode: str) -> Path:
    """The relay profile on `chip` (1 MB app as the example's), NVS encryption per unit, flash encryption `mode`."""
    import shutil

    from flashing.firmware import DEFAULT_PARTITIONS, build_firmware, twosmart_manifest
    from flashing.images import Partition
    from tests.station.conftest import pin_firmware

    shutil.copytree(REPO / "profiles" / "relay", tmp / "profiles" / "relay")
    parts = DEFAULT_PARTITIONS + [Partition("nvs_keys", 1, 4, 0x196000, 0x1000)]
    fw = build_firmware(chip, project="relay", version="1.4.2", partitions=parts,
                        manifest=twosmart_manifest(encrypted=True))
    pin_firmware(tmp, fw, lambda text: text.replace('chip = "esp32"', f'chip = "{chip}"').replace(
        'offset = "0x1000"', f'offset = "{fw.bootloader_offset:#x}"').replace(
        'namespace = "2smart"', 'namespace = "2smart"\nencryption = "per-unit"')
        + f'\n[security]\nflash_encryption = "{mode}"\n')
    return tmp / "profiles"


def small_profile(tmp: Path) -> Path:
    """The relay profile on a 100 KB app: the soak is about state kept per unit, not MB."""
    import hashlib
    import shutil

    from flashing.firmware import build_firmware

    d = tmp / "profiles" / "relay"
    shutil.copytree(REPO / "profiles" / "relay", d)
    text = (d / "profile.toml").read_text()
    app = build_firmware("esp32", project="relay", version="1.4.2", app_size=100_000).app
    old = hashlib.sha256((d / "firmware" / "relay.bin").read_bytes()).hexdigest()
    (d / "firmware" / "relay.bin").write_bytes(app)
    (d / "profile.toml").write_text(text.replace(old, hashlib.sha256(app).hexdigest()))
    return tmp / "profiles"


def soak(units: int, tmp: Path) -> list[tuple[int, float]]:
    """RSS of this station process after 32 warm-up units, then every 160 units.

    The 16 boards run in their own `station virtual` process (timing model off), so only
    the station is measured; each round swaps every board for a new blank one.
    """
    (tmp / "soak").mkdir()
    station = StationConfig(station_id="soak", database=tmp / "soak" / "db", key_file=tmp / "soak" / "k",
                            profiles_dir=small_profile(tmp / "soak"))
    ctx = open_station("relay", station=station, smoke="none")
    proc = subprocess.Popen([sys.executable, "-m", "station", "virtual", "--json", "--count", "16",
                             "--run-dir", str(tmp / "soak-run")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    boards = [json.loads(proc.stdout.readline()) for _ in range(16)]
    control = ControlClient(json.loads(proc.stdout.readline())["control"])
    try:
        done, samples = 0, []
        while done < units + 32:
            for i in range(16):
                control.request("swap", i)
            results = run_units([UnitJob(b["url"]) for b in boards], ctx, lambda e: None)
            assert all(r.passed for r in results), [r.error for r in results if not r.passed]
            done += 16
            if done >= 32 and (done - 32) % 160 == 0:
                gc.collect()
                samples.append((done - 32, rss_mb()))
        gc.collect()
        if samples[-1][0] != done - 32:
            samples.append((done - 32, rss_mb()))
        return samples
    finally:
        proc.terminate()
        proc.wait()


def abort_latency(rounds: int, tmp: Path) -> list[float]:
    """Seconds from the abort of slot 3 mid-write to its slot reading ABORTED, the other three writing on.

    The tests check that an abort cuts the write off (`test_abort_one_slot_cuts_its_write_off…`); the
    time it takes is this number.
    """
    from station.line import Line

    (tmp / "abort").mkdir()
    ctx = station_ctx(tmp / "abort", smoke="none")
    proc, boards, control = start_boards(4, tmp / "run-abort")
    control = ControlClient(control)
    took = []
    try:
        for _ in range(rounds):
            for i in range(4):
                control.request("swap", i)  # blank boards: the duplicate guard would refuse the last round's
            line = Line(ctx, [b["url"] for b in boards], lambda i: None, operator="bench")
            try:
                line.poll()
                deadline = time.monotonic() + 60
                while not all(s.step == "flash" and s.done > 0 for s in line.slots):
                    assert time.monotonic() < deadline, [(s.status, s.step) for s in line.slots]
                    time.sleep(0.01)
                t0 = time.monotonic()
                line.abort(2)
                while line.slots[2].status != "aborted":
                    assert time.monotonic() < deadline, line.slots[2].status
                    time.sleep(0.005)
                took.append(time.monotonic() - t0)
                assert [s.status for i, s in enumerate(line.slots) if i != 2] == ["running"] * 3
                while any(s.status == "running" for s in line.slots):
                    time.sleep(0.05)
            finally:
                line.close()
    finally:
        proc.terminate()
        proc.wait()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ports", default="1,4,8,16")
    ap.add_argument("--soak", type=int, default=0, help="units for the memory soak (e.g. 1000)")
    ap.add_argument("--aborts", type=int, default=5, help="rounds of the abort-latency measurement")
    ap.add_argument("--profile", choices=["relay", "secure-development", "secure-release"], default="relay")
    ap.add_argument("--chip", default="esp32", help="the boards' chip (a secure profile is built for it)")
    ap.add_argument("--central", default="", metavar="URL",
                    help="the port runs' station has [central] url = URL (an empty PostgreSQL database)")
    args = ap.parse_args()
    os.environ.setdefault("RELAY_VENDOR_TOKEN", "bench-tok1")
    global CHIP, PROFILES
    CHIP = args.chip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        secure = args.profile.startswith("secure-")
        if secure:
            PROFILES = secure_profiles(tmp / "profile", args.chip, args.profile.removeprefix("secure-"))
        rows = []
        print(f"{'ports':>5} {'passed':>6} {'MB/s':>6} {'cycle s':>8} {'model min s':>11} {'units/h':>8} "
              f"{'CPU s':>6} {'peak MB':>8} {'start ms':>8} {'finish ms':>9} {'secure ms':>9} {'flash s':>7}",
              flush=True)
        for n in [int(x) for x in args.ports.split(",")]:
            (tmp / f"p{n}").mkdir()
            r = run_ports(n, tmp / f"p{n}", args.central)
            rows.append(r)
            print(f"{r['ports']:>5} {r['passed']:>6} {r['throughput'] / 1e6:>6.3f} {r['cycle']:>8.2f} "
                  f"{r['min_cycle']:>11.2f} {r['uph']:>8.0f} {r['cpu']:>6.1f} {r['rss']:>8.1f} "
                  f"{r['serial_ms']:>8.1f} {r['record_ms']:>9.1f} {r['secure_ms']:>9.0f} {r['flash_s']:>7.2f}",
                  flush=True)
            if r["failed"]:
                print(f"  failed: {r['failed']}", flush=True)
        one = rows[0]["throughput"]
        for r in rows[1:]:
            print(f"  {r['ports']} ports: {r['throughput'] / (r['ports'] * one):.2f} x {r['ports']} x the 1-port "
                  f"throughput; mean cycle {r['cycle'] / r['min_cycle']:.2f} x the model's minimum")
        if secure:
            return
        print("rework of a unit whose firmware matches (boot check on, smoke test off):")
        for what, full, fast in rework(tmp):
            f_full, f_fast = (sum(d[k] for k in FLASHING) for d in (full, fast))
            w_full, w_fast = sum(full.values()), sum(fast.values())
            print(f"  {what:<28} flashing (connect+identify+flash) {f_fast:.2f} s against {f_full:.2f} s "
                  f"({f_full / f_fast:.1f} x); whole unit {w_fast:.2f} s against {w_full:.2f} s "
                  f"({w_full / w_fast:.1f} x)")
        if args.soak:
            samples = soak(args.soak, tmp)
            start = samples[0][1]
            print(f"station process memory across {args.soak} units (16 ports, 100 KB app, timing model off), "
                  f"after 32 warm-up units: {start:.1f} MB")
            print("  " + "  ".join(f"{n}: {mb - start:+.1f}" for n, mb in samples[1:]) + " MB")
            print(f"  largest growth {max(mb for _, mb in samples) - start:+.1f} MB, "
                  f"at the end {samples[-1][1] - start:+.1f} MB")
        if args.aborts:
            took = abort_latency(args.aborts, tmp)
            print(f"abort of one slot mid-write, 4 ports (the target: under 2 s): median {statistics.median(took):.3f} s, "
                  f"largest {max(took):.3f} s over {len(took)} aborts")


if __name__ == "__main__":
    main()
