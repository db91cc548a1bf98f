"""A whole line on one station: baud fallback, fast rework, hung ports, aborts."""

from __future__ import annotations

import threading
import time

from flashing.virtual.bench import VirtualBench
from station.line import Line
from station.pipeline import UnitJob, provision_unit
from station.runner import open_station, run_units


def ctx_for(env, smoke="none"):
    return open_station("relay", env / "station.toml", smoke=smoke)


def test_baud_fallback_is_remembered_per_port_and_recorded(station_env):
    ctx = ctx_for(station_env)
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        dev = bench[0].device
        dev.set_fault("garble_above", 460800)  # a bridge that fails above 460800
        events = []
        r = provision_unit(UnitJob(bench[0].url), ctx, events.append)
        assert r.passed, r
        lines = [e.text for e in events if type(e).__name__ == "LogLine" and e.source == "station"]
        assert len(lines) == 1 and lines[0].startswith("baud 921600 failed on this port (")
        assert lines[0].endswith("); trying 460800"), lines  # with esptool's reason, one line
        assert ctx.port_baud[bench[0].url] == 460800
        dev.swap(faults={"garble_above": 460800})
        events.clear()
        r2 = provision_unit(UnitJob(bench[0].url), ctx, events.append)
        assert r2.passed
        assert not [e for e in events if type(e).__name__ == "LogLine" and e.source == "station"]
    bauds = [a["baud"] for a in ctx.record.attempts()]
    assert bauds == [460800, 460800]


def test_rework_rewrites_only_what_changed(station_env, monkeypatch):
    ctx = ctx_for(station_env)
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        first = provision_unit(UnitJob(bench[0].url), ctx, lambda e: None)
        assert first.passed and first.written_regions == ("bootloader", "partition-table", "app", "config")
        # same firmware, new vendor token: only the config partition changes
        ctx.secrets["vendor_token"] = "tok-000002"
        again = provision_unit(UnitJob(bench[0].url, rework=True), ctx, lambda e: None)
        assert again.passed and again.written_regions == ("config",)
        assert again.serial == first.serial
        assert again.durations["flash"] * 3 < first.durations["flash"]
    rows = ctx.record.attempts()
    assert rows[0]["written_regions"] == '["config"]' and rows[0]["rework"] == 1


def test_a_hung_port_while_seven_others_finish(station_env):
    ctx = ctx_for(station_env)
    with VirtualBench(8, "esp32", run_dir=station_env / "run") as bench:
        bench[3].device.set_fault("hang_after", 200_000)  # goes silent mid-write
        t = time.monotonic()
        results = run_units([UnitJob(s.url) for s in bench.slots], ctx, lambda e: None)
        took = time.monotonic() - t
        assert [r.outcome for r in results].count("passed") == 7
        bad = results[3]
        assert bad.outcome == "failed" and bad.failed_step == "flash"
        others = max(sum(r.durations.values()) for i, r in enumerate(results) if i != 3)
        assert others < took  # the others did not wait for the hung one
    ctx.close()


def test_abort_one_slot_within_2_seconds_while_others_continue(station_env):
    ctx = ctx_for(station_env)
    with VirtualBench(4, "esp32", run_dir=station_env / "run", realtime=True) as bench:
        changed = threading.Event()
        line = Line(ctx, [s.url for s in bench.slots], lambda i: changed.set())
        line.poll()
        deadline = time.monotonic() + 30
        while not all(s.step == "flash" for s in line.slots):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t = time.monotonic()
        line.abort(2)
        while line.slots[2].status != "aborted":
            assert time.monotonic() - t < 2.0, "abort took longer than 2 s"
            time.sleep(0.02)
        assert [s.status for i, s in enumerate(line.slots) if i != 2] == ["running"] * 3
        while any(s.status == "running" for s in line.slots):
            assert time.monotonic() < deadline + 60
            time.sleep(0.1)
        assert [s.status for s in line.slots] == ["passed", "passed", "aborted", "passed"]
    line.close()
