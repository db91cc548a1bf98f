"""The operator gate: no unit starts until someone signs in; F7 hands the station over, in the record.

Boards wait on virtual fixtures (flashed by the real esptool once they start); the record
is the station's real SQLite file, read back after the screen has closed.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import threading

from flashing.virtual.bench import VirtualBench
from station.events import StepStarted
from station.line import NO_OPERATOR, Line
from station.runner import open_station
from station.tui import StationApp, TextPrompt

from .conftest import run_station
from .test_tui import until

HOLD_S = 60.0


def ctx_for(env):
    return open_station("relay", env / "station.toml")


def header_text(app) -> str:
    return str(app.query_one("#header").render())


def recorded(env) -> tuple[list[dict], list[dict]]:
    """The attempts (oldest first) and the admin entries of the journal."""
    ctx = ctx_for(env)
    try:
        attempts = sorted(ctx.record.attempts(), key=lambda r: r["id"])
        admin = [json.loads(e["body"]) for e in ctx.record.db().query(
            "select body from journal where kind = 'admin' order by id")]
        return attempts, admin
    finally:
        ctx.close()


def test_no_attempt_before_an_operator_signs_in_then_units_start(station_env):
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        app = StationApp(ctx_for(station_env), [s.url for s in bench.slots], operator=None, poll_interval=0.05)
        record = app.line.ctx.record

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                line = app.line
                await until(pilot, lambda: isinstance(app.screen, TextPrompt))
                await pilot.press("escape")  # no name: the station stays shut, it does not sign in "unknown"
                await until(pilot, lambda: not isinstance(app.screen, TextPrompt))
                await until(pilot, lambda: all(s.present for s in line.slots))  # seen: they would start now
                for _ in range(3):  # the screen's hot-plug poll, run here so that it surely ran
                    line.poll()
                assert [s.status for s in line.slots] == ["waiting", "waiting"] and not line.running()
                assert line.operator == "" and line.refusal == NO_OPERATOR
                assert not line.start(0) and not line.retry(1)  # no other way in either
                assert record.count_attempts() == 0
                assert all(set(b.device.flash.read(0, 0x10000)) == {0xFF} for b in bench.slots)  # untouched
                await until(pilot, lambda: NO_OPERATOR in header_text(app))
                assert any(NO_OPERATOR in str(n.message) for n in app._notifications)
                await pilot.press("f7")
                await until(pilot, lambda: isinstance(app.screen, TextPrompt))
                await pilot.press(*"Maria", "enter")
                await until(pilot, lambda: all(s.status == "passed" for s in line.slots))
                assert "operator Maria" in header_text(app) and NO_OPERATOR not in header_text(app)
        asyncio.run(go())
    attempts, admin = recorded(station_env)
    assert [(a["outcome"], a["operator"]) for a in attempts] == [("passed", "Maria")] * 2
    assert admin == [{"action": "shift", "operator": "Maria", "detail": {"took_over_from": None}}]


class HoldAtStep:
    def __init__(self, port: str, step: str):
        self.port, self.step = port, step
        self.reached, self.go = threading.Event(), threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, StepStarted) and (event.port, event.step) == (self.port, self.step):
            self.reached.set()
            self.go.wait(HOLD_S)


def test_f7_shift_change_is_recorded_and_running_units_keep_their_operator(station_env):
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        bench[1].device.unplug()  # the second board arrives after the shift change
        ctx = ctx_for(station_env)
        hold = HoldAtStep(bench[0].url, "boot")
        ctx.observers.append(hold)
        app = StationApp(ctx, [s.url for s in bench.slots], operator="Anna", poll_interval=0.05)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                first, second = app.line.slots
                try:
                    await until(pilot, lambda: hold.reached.is_set())
                    await pilot.press("f7")  # while slot 1 runs
                    await until(pilot, lambda: isinstance(app.screen, TextPrompt))
                    await pilot.press(*"Bob", "enter")
                    await until(pilot, lambda: app.line.operator == "Bob")
                    assert first.status == "running"
                finally:
                    hold.go.set()
                await until(pilot, lambda: first.status == "passed")
                bench[1].device.replug()
                await until(pilot, lambda: second.status == "passed")
                assert "operator Bob" in header_text(app)
        asyncio.run(go())
    attempts, admin = recorded(station_env)
    assert [(a["port"], a["operator"]) for a in attempts] == [(bench[0].url, "Anna"), (bench[1].url, "Bob")]
    assert admin == [{"action": "shift", "operator": "Bob", "detail": {"took_over_from": "Anna"}}]


def test_escape_on_the_shift_prompt_keeps_the_operator(station_env):
    app = StationApp(ctx_for(station_env), ["/dev/no-such-port-0"], operator="Anna")

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f7")
            await until(pilot, lambda: isinstance(app.screen, TextPrompt))
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, TextPrompt))
            assert app.line.operator == "Anna" and app.line.refusal != NO_OPERATOR
            await pilot.press("f7")
            await until(pilot, lambda: isinstance(app.screen, TextPrompt))
            await pilot.press("enter")  # an empty answer is no one: Anna stays
            await until(pilot, lambda: not isinstance(app.screen, TextPrompt))
            assert app.line.operator == "Anna"
    asyncio.run(go())
    assert recorded(station_env)[1] == []  # no change, nothing in the journal


def test_a_badge_scan_signs_in_as_one_line_of_text(station_env):
    line = Line(ctx_for(station_env), ["/dev/no-such-port-0"], lambda i: None)
    try:
        line.operator = "  BADGE-0042\r\n"  # a scanner's Enter
        assert line.operator == "BADGE-0042" and line.blocked() != NO_OPERATOR
        line.operator = "\x1d\x1b[2J\r"  # control codes only: no one
        assert line.operator == "" and line.blocked() == NO_OPERATOR
        line.operator = "X" * 500  # a scanner that keeps typing
        assert len(line.operator) == 64
    finally:
        line.close()


def test_station_flash_names_the_os_user_when_no_operator_is_given(station_env, capsys):
    rc, _, err = run_station(capsys, "flash", "--virtual", "1")
    assert rc == 0, err
    rc, _, err = run_station(capsys, "flash", "--virtual", "1", "--operator", "Zoe")
    assert rc == 0, err
    attempts, _ = recorded(station_env)
    assert [a["operator"] for a in attempts] == [getpass.getuser(), "Zoe"]
