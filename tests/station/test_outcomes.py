"""Outcomes: an abort at any step is ABORTED with that step, never FAIL; the station's faults are ERROR.

The operator's screen is driven with Textual's Pilot against virtual boards flashed by the
real esptool. A unit is held at the start of a step by an observer of its events
(`StationContext.observers`, which hears every unit's events on the unit's own thread), so
F8 lands while the slot shows that step; the boot check and the smoke test are also aborted
in the middle of their own I/O, where the closed port surfaces as an exception.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
import time

import pytest

from flashing.virtual.bench import VirtualBench
from station.events import StepFinished, StepStarted
from station.pipeline import ABORTED_TEXT, SECURE_STEPS, STEPS, UnitJob, provision_unit
from station.runner import open_station
from station.smoke import make_reach
from station.tui import Confirm, StationApp

from .conftest import json_lines, run_station
from .test_tui import card_text, until

HOLD_S = 60.0  # a test that fails before it releases its hold still ends: the unit thread waits no longer


def ctx_for(env):
    return open_station("relay", env / "station.toml")


def checks(env, **values) -> None:
    """Set [checks] keys of the example profile in the test's copy."""
    p = env / "profiles/relay/profile.toml"
    text = p.read_text()
    for key, value in values.items():
        text = re.sub(rf"(?m)^{key} = .*\n", "", text)  # [checks] is the file's last table
        text = text.replace("[checks]\n", f"[checks]\n{key} = {value}\n", 1)
    p.write_text(text)


class HoldAtStep:
    """Holds a unit when it announces `step` (or its end), until the test lets it go: an observer of its events."""

    def __init__(self, step: str, kind: type = StepStarted):
        self.step, self.kind = step, kind
        self.reached = threading.Event()
        self.go = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, self.kind) and event.step == self.step:
            self.reached.set()
            self.go.wait(HOLD_S)


def last_attempt(env) -> dict:
    ctx = ctx_for(env)
    try:
        return ctx.record.attempts(1)[0]
    finally:
        ctx.close()


@pytest.mark.parametrize("step", [s.name for s in STEPS if s.name not in SECURE_STEPS])  # the relay profile's
def test_f8_at_each_step_records_aborted_with_that_step(station_env, step):
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        ctx = ctx_for(station_env)
        hold = HoldAtStep(step)
        ctx.observers.append(hold)
        app = StationApp(ctx, [bench[0].url], operator="Anna", poll_interval=0.1)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                slot = app.line.slots[0]
                try:
                    await until(pilot, lambda: hold.reached.is_set() and slot.step == step)
                    await pilot.press("f8")
                    await until(pilot, lambda: slot.cancel.is_set())
                finally:
                    hold.go.set()
                await until(pilot, lambda: slot.status != "running")
                assert (slot.status, slot.result.failed_step) == ("aborted", step), slot.result
                await until(pilot, lambda: "ABORTED" in card_text(app, 0))
                text = card_text(app, 0)
                assert ABORTED_TEXT[1] in text and "FAIL" not in text  # the next action is the recorded remedy
                assert slot.action == slot.result.remedy
        asyncio.run(go())
    row = last_attempt(station_env)
    assert (row["outcome"], row["failed_step"]) == ("aborted", step)
    assert (row["error"], row["remedy"]) == ABORTED_TEXT
    assert row["operator"] == "Anna"


def test_f8_after_the_last_step_ran_is_aborted_not_passed(station_env):
    # the smoke test passed, then the operator aborted before the unit was over: the abort stands
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        ctx = ctx_for(station_env)
        hold = HoldAtStep(STEPS[-1].name, StepFinished)
        ctx.observers.append(hold)
        app = StationApp(ctx, [bench[0].url], operator="Anna", poll_interval=0.1)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                slot = app.line.slots[0]
                try:
                    await until(pilot, lambda: hold.reached.is_set())
                    await pilot.press("f8")
                    await until(pilot, lambda: slot.cancel.is_set())
                finally:
                    hold.go.set()
                await until(pilot, lambda: slot.status != "running")
                assert (slot.status, slot.result.failed_step) == ("aborted", STEPS[-1].name), slot.result
        asyncio.run(go())
    row = last_attempt(station_env)
    assert (row["outcome"], row["failed_step"]) == ("aborted", STEPS[-1].name)
    assert json.loads(row["durations"])[STEPS[-1].name] > 0  # it did run to its end


def test_f8_inside_the_boot_check_is_aborted_not_a_failure(station_env):
    checks(station_env, boot_settle_s=60, boot_timeout_s=120)  # the boot check reads the console for a minute
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        dev = bench[0].device
        app = StationApp(ctx_for(station_env), [bench[0].url], operator="Anna", poll_interval=0.1)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                slot = app.line.slots[0]
                # the step is on and the board runs its app: the check is reading its boot log from the port
                await until(pilot, lambda: slot.step == "boot" and dev.state()["mode"] == "app")
                t = time.monotonic()
                await pilot.press("f8")
                await until(pilot, lambda: slot.status != "running", timeout=15)
                assert time.monotonic() - t < 15  # the abort ended the read, not its minute
                assert (slot.status, slot.result.failed_step) == ("aborted", "boot"), slot.result
        asyncio.run(go())
    row = last_attempt(station_env)
    assert (row["outcome"], row["failed_step"], row["error"]) == ("aborted", "boot", ABORTED_TEXT[0])
    assert "Exception" not in (row["detail"] or "") and "Error" not in (row["error"] or "")


class MarkedReach:
    """The station's own reach to the device, telling the test that the smoke test has begun."""

    def __init__(self, real, opened: threading.Event):
        self.real, self.opened = real, opened

    def open(self, *args):
        url = self.real.open(*args)
        self.opened.set()
        return url

    def close(self) -> None:
        self.real.close()


def smoke_app(env, bench) -> tuple[StationApp, threading.Event]:
    checks(env, smoke_soak_s=60)  # after /healthcheck the smoke test watches the console for a minute
    ctx = ctx_for(env)
    opened = threading.Event()
    ctx.make_reach = lambda settings: MarkedReach(make_reach(settings), opened)
    return StationApp(ctx, [s.url for s in bench.slots], operator="Anna", poll_interval=0.1), opened


def test_f8_inside_the_smoke_test_is_aborted_not_a_failure(station_env):
    # the case: the abort closes the port under the console watch (AttributeError, SerialException)
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        app, opened = smoke_app(station_env, bench)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                slot = app.line.slots[0]
                await until(pilot, lambda: opened.is_set() and slot.step == "smoke")
                await pilot.press("f8")
                await until(pilot, lambda: slot.status != "running", timeout=15)
                assert (slot.status, slot.result.failed_step) == ("aborted", "smoke"), slot.result
                await until(pilot, lambda: "ABORTED" in card_text(app, 0))
        asyncio.run(go())
    row = last_attempt(station_env)
    assert (row["outcome"], row["failed_step"], row["error"]) == ("aborted", "smoke", ABORTED_TEXT[0])


def test_quit_during_the_smoke_test_records_aborted(station_env):
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        app, opened = smoke_app(station_env, bench)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                await until(pilot, lambda: opened.is_set() and app.line.slots[0].step == "smoke")
                await pilot.press("ctrl+q")
                await until(pilot, lambda: isinstance(app.screen, Confirm))
                await pilot.press("y")
                await until(pilot, lambda: not app.is_running, timeout=15)
        asyncio.run(go())
    row = last_attempt(station_env)
    assert (row["outcome"], row["failed_step"], row["error"]) == ("aborted", "smoke", ABORTED_TEXT[0])


def test_each_outcome_is_its_own_in_the_record_and_the_export_filters(station_env, capsys):
    """One board passes, one fails (the board), one is aborted (the operator), one ends in error (the station)."""
    ctx = ctx_for(station_env)
    ctx.record.db().execute("PRAGMA busy_timeout=100")  # this thread's connection: the held database fails fast
    with VirtualBench(4, "esp32", run_dir=station_env / "run") as bench:
        bench[1].device.set_fault("no_download_mode")
        ports = [s.url for s in bench.slots]
        cancel = threading.Event()
        holder: list[sqlite3.Connection] = []

        def station_side(event) -> None:
            if event.port == ports[2] and isinstance(event, StepStarted) and event.step == "flash":
                cancel.set()  # the operator's abort, as the line sets it
            if event.port == ports[3] and isinstance(event, StepStarted) and event.step == "serial":
                holder.append(sqlite3.connect(ctx.record.path))  # another program holds the database
                holder[0].execute("BEGIN EXCLUSIVE")
            if event.port == ports[3] and isinstance(event, StepFinished) and event.step == "serial" and holder:
                holder.pop().rollback()

        ctx.observers.append(station_side)
        try:
            results = [provision_unit(UnitJob(p, operator="Anna"), ctx, lambda e: None,
                                      cancel if i == 2 else None) for i, p in enumerate(ports)]
        finally:
            ctx.close()
    assert [(r.outcome, r.failed_step) for r in results] == [
        ("passed", None), ("failed", "connect"), ("aborted", "flash"), ("error", "serial")]
    assert "close the other program" in results[3].remedy

    def exported(*args: str) -> list[dict]:
        out = station_env / f"export-{len(args)}-{args[-1] if args else 'units'}.jsonl"
        rc, _, err = run_station(capsys, "export", "--format", "jsonl", "--out", str(out), *args)
        assert rc == 0, err
        return json_lines(out.read_text())

    assert [(r["outcome"], r["failed_step"]) for r in exported("--outcome", "aborted")] == [("aborted", "flash")]
    assert [(r["outcome"], r["failed_step"]) for r in exported("--outcome", "error")] == [("error", "serial")]
    assert [(r["outcome"], r["failed_step"]) for r in exported("--outcome", "failed")] == [("failed", "connect")]
    assert [r["outcome"] for r in exported()] == ["passed"]  # the provisioned units
    assert sorted(r["outcome"] for r in exported("--outcome", "any")) == ["aborted", "error", "failed", "passed"]
    assert all(r["operator"] == "Anna" for r in exported("--outcome", "any"))
    assert set(results[2].durations) >= {"connect", "identify", "guard", "serial", "config", "flash", "record"}


def test_an_unknown_outcome_is_refused_before_anything_is_exported(station_env):
    from station.audit import AuditError, ExportFilter, export, station_signing_key

    ctx = ctx_for(station_env)
    try:
        with pytest.raises(AuditError, match="unknown outcome 'abortd'"):
            export(ctx.record, station_env / "x.csv", "csv", ExportFilter(outcome="abortd"), "test-station",
                   station_signing_key(ctx.station))
        assert not (station_env / "x.csv").exists() and ctx.record.checkpoints() == []
    finally:
        ctx.close()
