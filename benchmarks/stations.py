"""Benchmark: several stations, one central record — N station processes × M virtual ports pushing to one PostgreSQL.

A throwaway PostgreSQL (tests/pg.py's PgCluster), then N station processes (default 8),
each with its own station folder (station.toml with `[central]` at that database, its own
SQLite record, keys and signing key), all on the example relay profile with the
healthcheck smoke test. Each process is a station running a shift: it opens the station
once and provisions M virtual boards at once (default 16; in-process, timing model off,
as `station flash --virtual M` runs them: as fast as the machine allows), batch after
batch (each board swapped for a new blank one with a MAC of its own between batches),
for K batches or until a duration has passed, then signs a checkpoint (as an export
does) and closes (the last push). All processes start provisioning at the same moment.

Reported, as one JSON object on stdout and a readable table on stderr:
- units/hour across the plant (passed units over the window from the start signal to
  the last batch's end);
- the central lag: from a unit's finish at its station (the attempt's `ended_at`) to its
  row being central (`attempts.received_at` in PostgreSQL; one machine, one clock),
  p50 / p99 / max;
- duplicates: serials on more than one attempt row centrally (must be 0), and
  station/central.py `conflicts`;
- every station's chain verifies centrally (`verify`, with each station's chain key and
  its trusted signing key), and the central copy holds every local journal entry;
- where the CPU went: each station process's threads by kind (virtual boards `vdev-*`,
  unit threads running the pipeline and esptool, the push thread), PostgreSQL's CPU
  (postmaster, its backends, its helpers), against the machine's capacity in the
  window; the most client connections PostgreSQL held;
- the outbox's cost on one station: benchmarks/line.py's 1- and 16-port runs (timing
  model on) with and without `[central]` (each central run on a fresh database), the
  16-port ratio both ways and the per-unit differences (--no-line skips it).

Some units fail on a 2-core machine this loaded (with or without [central]): they are
counted, and their errors printed; the exit status is 1 only when the central copy is
wrong (a duplicate serial, a conflict, a chain that does not verify, an entry missing).

    python benchmarks/stations.py [--stations 8] [--ports 16] [--batches 3 | --duration S] [--local | --hold-push]
                                  [--line-rounds 1] [--no-line]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "bench-tok1"  # the relay profile's vendor token (a test value, from the environment as in production)
TICK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting from /proc -------------------------------------------------------------------------------
def _stat_fields(path: str) -> list[str]:
    """/proc/…/stat after the command name (which may hold spaces): fields 3 onwards."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def thread_cpu_s(tid: int) -> float:
    f = _stat_fields(f"/proc/self/task/{tid}/stat")
    return (int(f[11]) + int(f[12])) / TICK  # utime, stime


def pg_cpu_s(postmaster: int) -> float:
    """PostgreSQL's CPU so far: the postmaster, its children that ended (cutime) and those that run."""
    f = _stat_fields(f"/proc/{postmaster}/stat")
    total = sum(int(x) for x in f[11:15])  # utime, stime, cutime, cstime
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                g = _stat_fields(f"/proc/{d.name}/stat")
            except OSError:
                continue
            if int(g[1]) == postmaster:
                total += int(g[11]) + int(g[12])
    return total / TICK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return (sum(f) - idle) / TICK, sum(f) / TICK


class ThreadCpu:
    """Samples every thread's CPU of this process (a thread that ended keeps its last sample), by kind."""

    KINDS = (("vdev-", "boards"), ("unit", "units"), ("central-push", "push"), ("MainThread", "main"))

    def __init__(self, every_s: float = 0.25):
        self.seen: dict[tuple[int, str], float] = {}
        self.base: dict[tuple[int, str], float] = {}
        self._stop = threading.Event()
        self._every = every_s
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-cpu-sampler")
        self._thread.start()

    def sample(self) -> None:
        for t in threading.enumerate():
            try:
                self.seen[(t.native_id, t.name)] = thread_cpu_s(t.native_id)
            except (OSError, TypeError):
                pass  # ended between the listing and the read

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def mark(self) -> None:
        """From now on: what ran before (imports, opening the station) is not counted."""
        self.sample()
        self.base = dict(self.seen)

    def close(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.sample()
        by_kind: dict[str, float] = {}
        for key, cpu in self.seen.items():
            name, cpu = key[1], cpu - self.base.get(key, 0.0)
            kind = next((k for prefix, k in self.KINDS if name.startswith(prefix)), "other")
            by_kind[kind] = by_kind.get(kind, 0.0) + cpu
        return by_kind


def run_queue_s() -> float:
    """How long the calling thread has waited for a core, runnable but not running (/proc schedstat)."""
    return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9


class PushTimes:
    """Times the push thread's rounds (wall and its own CPU) and the wait from a finish's kick to the next push.

    Wraps the instance's methods (the push thread calls them by attribute): central.py is measured, not changed.
    """

    def __init__(self, central):
        self.kicked: float | None = None
        self.waits: list[float] = []
        self.pushes: list[tuple[float, float, float, int]] = []  # (wall s, own CPU s, run-queue wait s, entries)
        push, kick = central.push, central.kick

        def timed_kick() -> None:
            if self.kicked is None:
                self.kicked = time.monotonic()
            kick()

        def timed_push(conn=None) -> int:
            t0, c0, q0 = time.monotonic(), time.thread_time(), run_queue_s()
            kicked, self.kicked = self.kicked, None
            if kicked is not None:
                self.waits.append(t0 - kicked)
            n = push(conn)
            self.pushes.append((time.monotonic() - t0, time.thread_time() - c0, run_queue_s() - q0, n))
            return n

        central.push, central.kick = timed_push, timed_kick

    def summary(self) -> dict:
        busy = [p for p in self.pushes if p[3]]  # rounds that sent something
        return {"rounds": len(self.pushes), "rounds_sending": len(busy), "entries": sum(p[3] for p in busy),
                "wall_s": [round(p[0], 4) for p in busy], "cpu_s": [round(p[1], 4) for p in busy],
                "runq_s": [round(p[2], 4) for p in busy],
                "kick_wait_s": [round(w, 4) for w in self.waits]}


# -- one station process ---------------------------------------------------------------------------------------
def station_worker(args) -> None:
    """A station's shift: open once, M boards per batch, batches until told; one JSON line of what it did."""
    from flashing.virtual.bench import VirtualBench
    from station.audit import write_checkpoint
    from station.central import PushState
    from station.config import StationConfig
    from station.pipeline import UnitJob
    from station.runner import open_station, run_units

    os.environ["RELAY_VENDOR_TOKEN"] = TOKEN
    cpu = ThreadCpu()
    station = StationConfig.load(Path(args.worker))
    ctx = open_station(None, station=station, smoke="healthcheck")
    prof = ctx.profile
    timed = PushTimes(ctx.central) if ctx.central else None
    if ctx.central and args.hold_push:
        ctx.central.kick = lambda: None  # finishes wait for the close's push: the push's own effect, isolated
    bench = VirtualBench(args.ports, prof.chip, prof.board_flash_bytes(), control=False, realtime=False,
                         usb_serial_jtag=prof.connection == "usb-serial-jtag")
    batches, errors = [], []
    try:
        for slot in bench.slots:
            slot.device.heartbeat_s = 2.0  # as `station flash --virtual` sets it
        print(json.dumps({"ready": station.station_id}), flush=True)
        if not sys.stdin.readline():  # the start signal: every station starts provisioning at once
            return  # the benchmark is gone: no shift
        go, cpu0 = time.monotonic(), time.process_time()
        cpu.mark()
        unit = 0
        while (time.monotonic() - go < args.duration) if args.duration else (len(batches) < args.batches):
            for slot in bench.slots:  # a new blank board in every slot, with a MAC no other station uses
                slot.device.swap(board_mac(slot.device.chip.mac_oui, args.index, unit))
                unit += 1
            t0 = time.time()
            results = run_units([UnitJob(s.url, operator="bench") for s in bench.slots], ctx, lambda e: None)
            passed = [r for r in results if r.passed]
            errors += [r.error for r in results if not r.passed]
            batches.append({"start": t0, "end": time.time(), "passed": len(passed), "units": len(results),
                            "guard_ms": [1000 * r.durations.get("guard", 0) for r in passed],
                            "serial_ms": [1000 * r.durations.get("serial", 0) for r in passed],
                            "record_ms": [1000 * r.durations.get("record", 0) for r in passed],
                            # every step's seconds summed over the batch's passed units, and the slowest unit's cycle
                            "steps_s": {k: round(sum(r.durations.get(k, 0) for r in passed), 3)
                                        for k in (passed[0].durations if passed else {})},
                            "slowest_s": max((sum(r.durations.values()) for r in passed), default=0.0)})
        write_checkpoint(ctx.record, station, "benchmark: end of shift")  # as an export would sign it
    finally:
        bench.close()
        central = ctx.central.state if ctx.central else PushState()  # --local: no central record
        t_close = time.monotonic()
        ctx.close()  # the last push
        close_s = time.monotonic() - t_close
    threads = cpu.close()
    kinds: dict[str, int] = {}
    for e in errors:  # the error's words before its particulars (an address, a port)
        kind = e.split(" at http", 1)[0].split(" (", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    print(json.dumps({"station": station.station_id, "batches": batches, "errors": kinds,
                      "cpu_s": time.process_time() - cpu0, "threads_cpu_s": threads,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "pushed": central.pushed, "push_error": central.last_error,
                      "leases": len(central.leases), "close_s": close_s,
                      "push_times": timed.summary() if timed else None}), flush=True)


def board_mac(oui: bytes, station: int, unit: int) -> bytes:
    """Station index and unit number in the MAC: no two boards of the plant share one (the guard would refuse)."""
    return oui + bytes([station & 0xFF, (unit >> 8) & 0xFF, unit & 0xFF])


# -- the plant --------------------------------------------------------------------------------------------------
def station_folder(root: Path, sid: str, url: str, hold_push: bool = False) -> Path:
    """A station of its own: station.toml with [central] at the plant's database (its defaults otherwise).

    Without a url (--local) the station keeps its record alone: the same plant without the central record.
    """
    d = root / sid
    d.mkdir(parents=True)
    profiles = REPO / "profiles"
    lines = [f'station_id = "{sid}"', 'database = "station.db"', f'profiles_dir = "{profiles}"',
             'default_profile = "relay"', 'key_file = "station.key"', 'signing_key = "var/station-ed25519.pem"',
             *(["", "[central]", f'url = "{url}"'] if url else []),
             *(["push_interval_s = 3600"] if url and hold_push else [])]
    (d / "station.toml").write_text("\n".join(lines) + "\n")
    return d / "station.toml"


def run_plant(args, url: str, root: Path, postmaster: int) -> dict:
    import psycopg

    configs = [station_folder(root, f"st-{n:02d}", "" if args.local else url, args.hold_push)
               for n in range(1, args.stations + 1)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RELAY_VENDOR_TOKEN": TOKEN}
    env.pop("STATION_CONFIG", None)
    procs = []
    for n, cfg in enumerate(configs):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg), "--index", str(n),
               "--ports", str(args.ports), "--duration", str(args.duration), "--batches", str(args.batches),
               *(["--hold-push"] if args.hold_push else [])]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=open(cfg.parent / "stderr.txt", "w"), text=True, cwd=cfg.parent, env=env))
    for p, cfg in zip(procs, configs):
        line = p.stdout.readline()
        if not line:
            p.wait()
            sys.exit(f"station {cfg.parent.name} did not start:\n{(cfg.parent / 'stderr.txt').read_text()[-3000:]}")

    connections, stop = [0], threading.Event()

    def watch_connections() -> None:  # the most client connections the server held
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.wait(0.5):
                n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                 "AND pid <> pg_backend_pid()").fetchone()[0]
                connections[0] = max(connections[0], n)

    watcher = threading.Thread(target=watch_connections, name="bench-pg-connections")
    busy0, total0, pg0, me0 = *machine_busy(), pg_cpu_s(postmaster), time.process_time()
    go = time.time()
    watcher.start()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    reports = []
    try:
        for p, cfg in zip(procs, configs):
            out = p.stdout.readline()
            p.wait()
            if p.returncode or not out:
                sys.exit(f"station {cfg.parent.name} failed ({p.returncode}):\n"
                         f"{(cfg.parent / 'stderr.txt').read_text()[-3000:]}")
            reports.append(json.loads(out))
    finally:
        stop.set()
        watcher.join()
    busy1, total1, pg1, me1 = *machine_busy(), pg_cpu_s(postmaster), time.process_time()
    done = time.time()
    end = max(b["end"] for r in reports for b in r["batches"])
    units = sum(b["units"] for r in reports for b in r["batches"])
    passed = sum(b["passed"] for r in reports for b in r["batches"])
    window = end - go
    return {"configs": configs, "reports": reports, "window": window, "units": units, "passed": passed,
            "machine_busy_s": busy1 - busy0, "machine_capacity_s": total1 - total0, "pg_cpu_s": pg1 - pg0,
            "parent_cpu_s": me1 - me0,
            "wall_s": done - go, "connections": connections[0]}


def check_central(url: str, configs: list[Path]) -> dict:
    """Lag, duplicates, conflicts, verify, and every local entry central, read from the central copy."""
    import psycopg

    from station.audit import TrustStore
    from station.central import conflicts, verify
    from station.config import StationConfig
    from station.record import Record, station_key

    trusted, chain_keys, local = {}, {}, {}
    for cfg in configs:
        st = StationConfig.load(cfg)
        for sid, keys in TrustStore.for_station(st).by_station().items():
            trusted.setdefault(sid, []).extend(keys)
        rec = Record(st.database, station_key(st.key_file), station_id=st.station_id)
        try:
            chain_keys[st.station_id] = rec._chain_key
            local[st.station_id] = rec.db().execute("select count(*) from journal").fetchone()[0]
        finally:
            rec.close()
    with psycopg.connect(url, autocommit=True) as conn:
        lags = [r[0] for r in conn.execute(
            "SELECT extract(epoch FROM received_at - ended_at::timestamptz) FROM attempts "
            "WHERE outcome <> 'started' AND ended_at IS NOT NULL ORDER BY 1")]
        dup = conn.execute("SELECT count(*) FROM (SELECT serial FROM attempts WHERE serial IS NOT NULL "
                           "GROUP BY serial HAVING count(*) > 1) d").fetchone()[0]
        rows, passed = conn.execute("SELECT count(*), count(*) FILTER (WHERE outcome = 'passed') "
                                    "FROM attempts").fetchone()
        central = dict(conn.execute("SELECT station_id, entries FROM stations").fetchall())
        found = conflicts(conn)
        t0 = time.monotonic()
        problems, notes = verify(conn, trusted, chain_keys)
        verify_s = time.monotonic() - t0
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        # PostgreSQL's side of every session (ended sessions flushed theirs): executing, or waiting for a station
        active, idle_tx, commits = conn.execute(
            "SELECT active_time, idle_in_transaction_time, xact_commit FROM pg_stat_database "
            "WHERE datname = current_database()").fetchone()
    lags = [float(x) for x in lags]
    return {"lag_p50_s": quantile(lags, 0.5), "lag_p99_s": quantile(lags, 0.99), "lag_max_s": quantile(lags, 1.0),
            "lag_rows": len(lags), "central_attempts": rows, "central_passed": passed,
            "duplicate_serials": dup, "conflicts": len(found), "verify_problems": problems,
            "stations_verified": len(notes), "verify_s": verify_s,
            "entries_missing": {s: n - central.get(s, 0) for s, n in local.items() if n != central.get(s, 0)},
            "central_db_mb": size / 1e6, "pg_active_s": active / 1000, "pg_idle_in_transaction_s": idle_tx / 1000,
            "pg_commits": commits}


# -- the outbox's cost on one station (benchmarks/line.py) ------------------------------------------------
def line_module():
    spec = importlib.util.spec_from_file_location("bench_line", REPO / "benchmarks" / "line.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def outbox_cost(cluster, root: Path, rounds: int) -> dict:
    """line.py's 1- and 16-port runs (timing model on) without and with [central], alternating, `rounds` times."""
    line = line_module()
    runs: dict[str, dict[int, list[dict]]] = {"local": {1: [], 16: []}, "central": {1: [], 16: []}}
    for r in range(rounds):
        for how in ("local", "central"):
            for n in (1, 16):
                d = root / f"line-{how}-{r}" / f"p{n}"
                d.mkdir(parents=True)
                if how == "central":
                    with cluster.database() as url:  # a fresh central copy per run
                        runs[how][n].append(line.run_ports(n, d, url))
                else:
                    runs[how][n].append(line.run_ports(n, d))
    out = {}
    for how, by_n in runs.items():
        one, sixteen = by_n[1], by_n[16]
        mean = lambda rows, k: statistics.mean(x[k] for x in rows)  # noqa: E731
        out[how] = {"ratio_16": mean(sixteen, "throughput") / (16 * mean(one, "throughput")),
                    "ratios_16": [s["throughput"] / (16 * o["throughput"]) for o, s in zip(one, sixteen)],
                    "cycle_16_s": mean(sixteen, "cycle"), "cycle_1_s": mean(one, "cycle"),
                    "cpu_per_unit_16_s": mean(sixteen, "cpu") / 16, "passed_16": [s["passed"] for s in sixteen],
                    "guard_ms": mean(sixteen, "guard_ms"), "serial_ms": mean(sixteen, "serial_ms"),
                    "record_ms": mean(sixteen, "record_ms")}
    return out


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def ms3(values: list[float]) -> str:
    return "/".join(f"{1000 * quantile(values, q):.0f}" for q in (0.5, 0.99, 1.0)) + " ms"


def show(r: dict, c: dict | None, args) -> None:
    def err(s=""):
        print(s, file=sys.stderr, flush=True)

    err(f"plant: {args.stations} stations x {args.ports} virtual ports (timing model off), one PostgreSQL; "
        f"{r['passed']}/{r['units']} units passed in {r['window']:.1f} s -> {r['uph']:.0f} units/hour")
    err("per station: CPU seconds in the window by thread kind; the record's steps per unit (mean ms) in the "
        "first batch (it connects, migrates, leases) / the later ones")
    err(f"{'station':<8} {'batches':>7} {'passed':>6} {'CPU s':>6} {'boards':>6} {'units':>6} {'main':>5} "
        f"{'push':>5} {'guard ms':>13} {'start ms':>13} {'finish ms':>11} {'close s':>7}")
    for s in r["reports"]:
        b, t = s["batches"], s["threads_cpu_s"]
        avg = lambda k, bs: statistics.mean(  # noqa: E731
            x for bb in bs for x in bb[k]) if any(bb[k] for bb in bs) else float("nan")
        two = lambda k: f"{avg(k, b[:1]):.0f}/{avg(k, b[1:]):.0f}"  # noqa: E731
        err(f"{s['station']:<8} {len(b):>7} {sum(x['passed'] for x in b):>6} {s['cpu_s']:>6.1f} "
            f"{t.get('boards', 0):>6.1f} {t.get('units', 0):>6.1f} {t.get('main', 0):>5.1f} {t.get('push', 0):>5.2f} "
            f"{two('guard_ms'):>13} {two('serial_ms'):>13} {two('record_ms'):>11} {s['close_s']:>7.2f}")
    cpu = r["cpu"]
    err(f"CPU over the {r['wall_s']:.1f} s run (machine: {cpu['capacity_s']:.0f} CPU s, {cpu['busy_pct']:.0f} % busy): "
        f"stations {cpu['stations_s']:.0f} s (virtual boards {cpu['boards_s']:.0f}, unit threads {cpu['units_s']:.0f}, "
        f"push threads {cpu['push_s']:.1f}), PostgreSQL {cpu['pg_s']:.1f} s, other processes (not this "
        f"benchmark) {cpu['others_s']:.0f} s; push {cpu['push_pct']:.2f} %, "
        f"PostgreSQL {cpu['pg_pct']:.2f} % of the machine's busy time; {r['connections']} client connections at most")
    steps: dict[str, float] = {}
    for s in r["reports"]:
        for b in s["batches"]:
            for k, v in b["steps_s"].items():
                steps[k] = steps.get(k, 0.0) + v / max(1, r["passed"])
    err("a passed unit's steps, mean s: " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()) +
        f" (cycle {sum(steps.values()):.2f}); a batch lasts as long as its slowest unit: mean "
        f"{statistics.mean(b['slowest_s'] for s in r['reports'] for b in s['batches']):.1f} s")
    failed: dict[str, int] = {}
    for s in r["reports"]:
        for e, n in s["errors"].items():
            failed[e] = failed.get(e, 0) + n
    for e, n in sorted(failed.items(), key=lambda x: -x[1]):
        err(f"  {n} unit(s) failed: {e}")
    if c is None:
        return err("(--local: no central record)")
    err(f"central lag (ended_at -> received_at) over {c['lag_rows']} attempts: p50 {c['lag_p50_s'] * 1000:.0f} ms, "
        f"p99 {c['lag_p99_s'] * 1000:.0f} ms, max {c['lag_max_s'] * 1000:.0f} ms")
    pt = r["push"]
    err(f"  its parts: the finish's commit at the station (finish ms above); from the kick to the push thread's next "
        f"round p50/p99/max {ms3(pt['kick_wait_s'])}; a round that sends ({pt['rounds_sending']} rounds, "
        f"{pt['entries_per_round']:.1f} entries each) takes {ms3(pt['wall_s'])} of which the push thread's own CPU "
        f"{ms3(pt['cpu_s'])}, waiting for a core {ms3(pt['runq_s'])}; the rest is waiting for PostgreSQL's "
        f"answers and for the GIL")
    err(f"  PostgreSQL's side, every session: executing statements {c['pg_active_s']:.1f} s in all, idle inside a "
        f"transaction waiting for its station {c['pg_idle_in_transaction_s']:.1f} s; the push rounds took "
        f"{sum(pt['wall_s']):.1f} s in all ({c['pg_commits']} commits)")
    err(f"central copy: {c['central_attempts']} attempts ({c['central_passed']} passed), {c['duplicate_serials']} "
        f"duplicate serials, {c['conflicts']} conflicts, {c['stations_verified']} stations verified with "
        f"{len(c['verify_problems'])} problems in {c['verify_s']:.2f} s, entries missing: "
        f"{c['entries_missing'] or 'none'}")


def show_line(line: dict) -> None:
    def err(s=""):
        print(s, file=sys.stderr, flush=True)

    if line:
        lo, ce = line["local"], line["central"]
        err("the outbox on one station (benchmarks/line.py, timing model on, 1 and 16 ports):")
        for how, x in line.items():
            err(f"  {how:<8} 16-port ratio {x['ratio_16']:.3f} ({', '.join(f'{v:.3f}' for v in x['ratios_16'])}); "
                f"cycle {x['cycle_16_s']:.2f} s; station CPU {x['cpu_per_unit_16_s']:.3f} s/unit; guard "
                f"{x['guard_ms']:.1f} ms, start {x['serial_ms']:.1f} ms, finish {x['record_ms']:.1f} ms")
        err(f"  difference per unit (central - local): cycle {1000 * (ce['cycle_16_s'] - lo['cycle_16_s']):+.0f} ms, "
            f"station CPU {1000 * (ce['cpu_per_unit_16_s'] - lo['cpu_per_unit_16_s']):+.1f} ms, ratio "
            f"{ce['ratio_16'] - lo['ratio_16']:+.3f}")


def plant_cpu(r: dict) -> None:
    """Where the plant's CPU went in the window, by process and thread kind."""
    r["uph"] = r["passed"] / r["window"] * 3600
    t = {k: sum(s["threads_cpu_s"].get(k, 0.0) for s in r["reports"]) for k in ("boards", "units", "push")}
    stations_s = sum(s["cpu_s"] for s in r["reports"])
    pts = [s["push_times"] for s in r["reports"] if s["push_times"]]
    r["push"] = {k: [x for pt in pts for x in pt[k]] for k in ("wall_s", "cpu_s", "runq_s", "kick_wait_s")}
    r["push"]["rounds_sending"] = sum(pt["rounds_sending"] for pt in pts)
    r["push"]["entries_per_round"] = sum(pt["entries"] for pt in pts) / max(1, r["push"]["rounds_sending"])
    r["push"] |= {f"{k}_p50_p99_max": [quantile(r["push"][k], q) for q in (0.5, 0.99, 1.0)]
                  for k in ("wall_s", "cpu_s", "runq_s", "kick_wait_s")}
    r["cpu"] = {"capacity_s": r["machine_capacity_s"], "busy_pct": 100 * r["machine_busy_s"] / r["machine_capacity_s"],
                "stations_s": stations_s, "boards_s": t["boards"], "units_s": t["units"], "push_s": t["push"],
                "pg_s": r["pg_cpu_s"], "others_s": r["machine_busy_s"] - stations_s - r["pg_cpu_s"] - r["parent_cpu_s"],
                "push_pct": 100 * t["push"] / r["machine_busy_s"],
                "pg_pct": 100 * r["pg_cpu_s"] / r["machine_busy_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stations", type=int, default=8)
    ap.add_argument("--ports", type=int, default=16, help="virtual boards per station, provisioned at once")
    ap.add_argument("--batches", type=int, default=3, help="batches of --ports boards per station")
    ap.add_argument("--duration", type=float, default=0.0,
                    help="seconds instead of --batches: no station starts a batch after this")
    ap.add_argument("--local", action="store_true",
                    help="the same plant without [central] (each station alone): the baseline of the outbox's cost")
    ap.add_argument("--hold-push", action="store_true",
                    help="with [central], push only at the end of the shift (the guard and leases as usual)")
    ap.add_argument("--line-rounds", type=int, default=1, help="line.py runs each way (0: none)")
    ap.add_argument("--no-line", action="store_true", help="skip the outbox's cost on one station")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # a station process of the plant (its station.toml)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return station_worker(args)
    if args.stations < 1 or args.stations > 255:
        ap.error("--stations: 1 to 255 (the station index is a byte of the boards' MACs)")

    from tests.pg import PgCluster, server_bindir

    bindir = server_bindir()
    if bindir is None:
        sys.exit("no PostgreSQL server installed (apt-get install postgresql): the benchmark starts its own")
    os.environ.setdefault("RELAY_VENDOR_TOKEN", TOKEN)  # line.py's station runs in this process
    cluster = PgCluster.create(bindir)
    line = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-stations-") as tmp, cluster.database() as url:
            r = run_plant(args, url, Path(tmp), cluster.proc.pid)
            c = None if args.local else check_central(url, r["configs"])
            plant_cpu(r)
            show(r, c, args)  # before the line runs: the plant's numbers stand whatever happens next
            if not (args.local or args.no_line or not args.line_rounds):
                line = outbox_cost(cluster, Path(tmp), args.line_rounds)
                show_line(line)
    finally:
        cluster.destroy()
    machine = {"cpus": os.cpu_count(), "model": _cpu_model(), "python": platform.python_version(),
               "postgresql": bindir.parent.name, "kernel": platform.release()}
    doc = {"machine": machine, "stations": args.stations, "ports": args.ports, "duration_s": args.duration,
           "batches": args.batches, "units": r["units"], "passed": r["passed"], "window_s": round(r["window"], 2),
           "units_per_hour": round(r["uph"]), "cpu": {k: round(v, 2) for k, v in r["cpu"].items()},
           "max_client_connections": r["connections"],
           "push": {k: v for k, v in r["push"].items() if not k.endswith("_s")},
           "stations_detail": [{k: v for k, v in s.items() if k not in ("batches", "push_times")}
                               | {"batches": len(s["batches"])} for s in r["reports"]],
           "central": c, "outbox_on_one_station": line}
    print(json.dumps(doc, default=str))
    bad = c is not None and (c["duplicate_serials"] or c["conflicts"] or c["verify_problems"] or c["entries_missing"])
    sys.exit(1 if bad else 0)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
