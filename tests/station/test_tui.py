"""The operator's screen, driven with Textual's Pilot against virtual boards."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time

import pytest

import station.line
from flashing.virtual.bench import VirtualBench
from station.events import Progress, StepStarted, UnitFinished, UnitInfo, UnitResult
from station.admin import hash_password, write_stored
from station.runner import open_station
from station.layout import WORDS, SlotView
from station.tui import CardBody, Confirm, HistoryScreen, SlotCard, StationApp, TextPrompt

from .test_layout import flat, missing, shows_word


def ctx_for(env, profile="relay"):
    return open_station(profile, env / "station.toml")


async def until(pilot, cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached: {[(s.status, s.step) for s in pilot.app.line.slots]}")
        await pilot.pause(0.1)


def header_text(app) -> str:
    return str(app.query_one("#header").render())


def on_screen(widget) -> list[str]:
    """The lines of `widget` as the terminal shows them (the compositor's output: what is cut is not there)."""
    r = widget.region
    screen = [strip.text for strip in widget.screen._compositor.render_strips()]
    return [line[r.x:r.right] for line in screen[r.y:r.bottom]]


def card_lines(app, i) -> list[str]:
    return on_screen(app.query_one(f"#slot-{i}", SlotCard).query_one(CardBody))


def card_text(app, i) -> str:
    """A card's words on one line, and its state word when it is shown in block letters."""
    lines = card_lines(app, i)
    return " ".join([flat(lines), *(w for w in WORDS.values() if w not in flat(lines) and shows_word(lines, w))])


def run(coro):
    return asyncio.run(coro)


def test_auto_start_pass_fail_retry_and_history(station_env):
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        bench[1].device.set_fault("no_download_mode")
        app = StationApp(ctx_for(station_env), [s.url for s in bench.slots], operator="Anna", poll_interval=0.1)

        async def go():
            async with app.run_test(size=(160, 45)) as pilot:
                line = app.line
                # boards present at start: both runs start by themselves
                await until(pilot, lambda: all(s.status in ("passed", "failed") for s in line.slots))
                # the card follows the line's state once the screen has handled the change
                await until(pilot, lambda: "PASS" in card_text(app, 0) and "FAIL" in card_text(app, 1))
                assert line.slots[0].status == "passed"
                text = card_text(app, 1)
                assert "FAIL" in text and "connect: the board booted its firmware" in text
                assert "check the fixture's BOOT/IO0 wiring" in text  # the next action: the recorded remedy
                assert line.passed == 1 and line.failed == 1
                # retry the failed slot once its fault is cleared
                bench[1].device.clear_faults()
                await pilot.press("f4")
                assert app.selected == 1
                await pilot.press("f5")
                await until(pilot, lambda: line.slots[1].status == "passed")
                # history: every attempt, then searched by MAC
                await pilot.press("f2")
                await until(pilot, lambda: isinstance(app.screen, HistoryScreen))
                table = app.screen.query_one("DataTable")
                await until(pilot, lambda: table.row_count == 3)
                rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
                assert sorted(r[3] for r in rows) == ["FAILED", "PASSED", "PASSED"]
                assert [r[4] for r in rows if r[3] == "FAILED"] == ["connect"]  # no MAC known then
                mac = bench[1].device.mac_text
                await pilot.press(*mac[-5:])
                await until(pilot, lambda: table.row_count == 1)
                rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
                assert len(rows) == 1 and rows[0][2] == mac and rows[0][3] == "PASSED"
                await pilot.press("escape")
                await until(pilot, lambda: not isinstance(app.screen, HistoryScreen))
        run(go())


def test_hot_plug_starts_a_run_and_a_pulled_board_aborts(station_env):
    with VirtualBench(1, "esp32", run_dir=station_env / "run", realtime=True) as bench:
        dev = bench[0].device
        dev.unplug()
        app = StationApp(ctx_for(station_env), [bench[0].url], operator="Anna", poll_interval=0.1)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                slot = app.line.slots[0]
                await until(pilot, lambda: "NO BOARD" in card_text(app, 0))
                assert slot.status == "empty" and not slot.present
                dev.replug()  # a board arrives: its run starts by itself
                await until(pilot, lambda: slot.status == "running" and slot.step == "flash" and slot.done > 0)
                dev.unplug()  # pulled mid-write: always ABORTED, whether esptool or the poll sees it first
                await until(pilot, lambda: slot.status != "running", timeout=10)
                assert slot.status == "aborted", slot.result
                assert slot.result.error == "the board was pulled out mid-run" and slot.result.failed_step == "flash"
                await until(pilot, lambda: "ABORTED" in card_text(app, 0))
                assert "pulled out mid-run" in card_text(app, 0)
                await until(pilot, lambda: not slot.present)  # the poll saw it go; the slot keeps its result
                assert slot.status == "aborted"
                dev.replug()  # the next board starts by itself
                await until(pilot, lambda: slot.status == "running")
                app.line.abort(0)
                await until(pilot, lambda: slot.status not in ("waiting", "running"))
                assert slot.status == "aborted", slot.result  # also when esptool is cut off mid-connect
        run(go())
        rows = ctx_for(station_env).record.attempts()
        assert [(r["outcome"], r["failed_step"]) for r in rows][-1] == ("aborted", "flash")
        assert sorted(r["error"] for r in rows) == ["aborted by the operator", "the board was pulled out mid-run"]


def test_abort_key_and_quit_mid_run_records_aborted_units(station_env):
    with VirtualBench(2, "esp32", run_dir=station_env / "run", realtime=True) as bench:
        app = StationApp(ctx_for(station_env), [s.url for s in bench.slots], operator="Anna", poll_interval=0.1)

        async def go():
            async with app.run_test(size=(160, 45)) as pilot:
                line = app.line
                await until(pilot, lambda: all(s.step == "flash" for s in line.slots))
                await pilot.press("f8")  # abort the selected slot (slot 1)
                await until(pilot, lambda: line.slots[0].status == "aborted")
                assert line.slots[1].status == "running"  # the other slot carries on
                await pilot.press("ctrl+q")  # quitting mid-run asks first
                await until(pilot, lambda: isinstance(app.screen, Confirm))
                assert "1 slot(s) are working" in str(app.screen.query("Label").first().render())
                await pilot.press("n")  # no: the screen and the run carry on
                await until(pilot, lambda: not isinstance(app.screen, Confirm))
                assert app.is_running and line.slots[1].status == "running"
                assert not any(isinstance(s, Confirm) for s in app.screen_stack)
                await pilot.press("ctrl+q")
                await until(pilot, lambda: isinstance(app.screen, Confirm))
                await pilot.press("y")
                await until(pilot, lambda: line.slots[1].status == "aborted", timeout=5)
        run(go())
        outcomes = [r["outcome"] for r in ctx_for(station_env).record.attempts()]
        assert sorted(outcomes) == ["aborted", "aborted"]


def label_profile(env):
    p = env / "profiles/relay/profile.toml"
    p.write_text(p.read_text().replace('pattern = "RLY-{yymmdd}-{seq:05}"', "given = true"))


def test_sixteen_slots_work_at_once_on_compact_cards(station_env):
    # wire-speed boards (a ~9 s flash step): all 16 runs must be in the flash step together
    # (a toolkit worker pool of cpu_count + 4 threads once ran only 6 of them at a time)
    with VirtualBench(16, "esp32", run_dir=station_env / "run", realtime=True) as bench:
        app = StationApp(ctx_for(station_env), [s.url for s in bench.slots], operator="Anna", poll_interval=0.1)

        async def go():
            async with app.run_test(size=(160, 45)) as pilot:
                line = app.line
                await until(pilot, lambda: all(s.step == "flash" and s.status == "running" for s in line.slots))
                assert app.compact and app.query_one("#slots").has_class("compact")
                await until(pilot, lambda: "flash" in card_text(app, 15))
                for i in range(16):
                    line.abort(i)
                await until(pilot, lambda: all(s.status == "aborted" for s in line.slots))
                await until(pilot, lambda: "ABORTED" in card_text(app, 15))
                assert "→ " in card_text(app, 15)

        run(go())
    assert len(app.line.ctx.record.attempts()) == 16


def test_scanner_assigns_labels_and_refuses_a_used_serial(station_env):
    label_profile(station_env)
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        app = StationApp(ctx_for(station_env), [s.url for s in bench.slots], operator="Anna", poll_interval=0.1)
        bells, refusals = [], []
        app.bell = lambda: bells.append(1)
        orig = app.notify
        # the red flash lasts a second: look at it when the refusal is announced
        app.notify = lambda msg, **kw: (kw.get("severity") == "error" and refusals.append(
            (msg, app.query_one("#scan").has_class("refused"))), orig(msg, **kw))

        async def go():
            async with app.run_test(size=(160, 45)) as pilot:
                line = app.line
                # seen by the poll that would have started them: they wait for labels
                await until(pilot, lambda: all(s.present for s in line.slots))
                assert [s.status for s in line.slots] == ["waiting", "waiting"]
                await until(pilot, lambda: "scan the label" in card_text(app, 0))
                await pilot.press(*"LBL-0001", "enter")
                await until(pilot, lambda: line.slots[0].status == "passed")
                assert line.slots[0].serial == "LBL-0001" and line.slots[1].status == "waiting"
                # the same label again: refused loudly, nothing starts
                await pilot.press(*"LBL-0001", "enter")
                await until(pilot, lambda: refusals)
                assert bells and refusals == [("serial LBL-0001 is already used", True)]
                assert line.slots[1].status == "waiting" and line.slots[1].scanned is None
                # to a chosen slot
                await pilot.press("f4", *"LBL-0002", "enter")
                await until(pilot, lambda: line.slots[1].status == "passed")
                assert line.slots[1].serial == "LBL-0002"
        run(go())


def second_profile(env) -> None:
    """`relay2`: the relay profile under another name and title (another content hash)."""
    shutil.copytree(env / "profiles/relay", env / "profiles/relay2")
    p = env / "profiles/relay2/profile.toml"
    p.write_text(p.read_text().replace('name = "relay"', 'name = "relay2"')
                 .replace('title = "2Smart Relay"', 'title = "2Smart Relay Two"'))


def test_admin_lock_on_profile_and_lot_change(station_env):
    cfg = station_env / "station.toml"
    second_profile(station_env)
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        dev = bench[0].device
        dev.unplug()
        app = StationApp(ctx_for(station_env), [bench[0].url], operator="Anna", poll_interval=0.1,
                         open_profile=lambda name: ctx_for(station_env, name))
        notes = []
        orig = app.notify
        app.notify = lambda msg, **kw: (notes.append(msg), orig(msg, **kw))

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                await pilot.press("f10")
                await until(pilot, lambda: any("admin is locked" in n for n in notes))
                assert not isinstance(app.screen, TextPrompt)  # nothing to type a password into
        run(go())

        # the old unsalted hash alone is refused, with the way to migrate
        cfg.write_text(cfg.read_text() + f'admin_password_sha256 = "{hashlib.sha256(b"s3cret").hexdigest()}"\n')
        app = StationApp(ctx_for(station_env), [bench[0].url], operator="Anna", poll_interval=0.1)
        notes.clear()
        app.notify = lambda msg, **kw: notes.append(msg)

        async def go_legacy():
            async with app.run_test(size=(100, 30)) as pilot:
                await pilot.press("f10")
                await until(pilot, lambda: any("station admin set-password" in n for n in notes))
                assert not isinstance(app.screen, TextPrompt)
        run(go_legacy())

        write_stored(station_env / "var/admin-password", hash_password("s3cret-admin-pw", log2_n=14))
        app = StationApp(ctx_for(station_env), [bench[0].url], operator="Anna", poll_interval=0.1,
                         open_profile=lambda name: ctx_for(station_env, name))
        notes.clear()
        orig2 = app.notify
        app.notify = lambda msg, **kw: (notes.append(msg), orig2(msg, **kw))

        async def prompt(pilot, question: str, answer: str) -> None:
            await until(pilot, lambda: isinstance(app.screen, TextPrompt) and app.screen.question == question)
            field = app.screen.query_one("#answer")
            field.value = ""
            await pilot.press(*answer, "enter")

        async def go2():
            async with app.run_test(size=(100, 30)) as pilot:
                line = app.line
                await pilot.press("f10")
                await prompt(pilot, "Admin password", "guess")
                await until(pilot, lambda: any("wrong admin password" in n for n in notes))
                assert line.ctx.profile.name == "relay" and line.lot == ""
                await until(pilot, lambda: app._admin.wait_s() == 0)  # the delay after a wrong try
                # a profile that does not exist: refused, the screen stays on the old one
                await pilot.press("f10")
                await prompt(pilot, "Admin password", "s3cret-admin-pw")
                await prompt(pilot, "Profile", "no-such-profile")
                await prompt(pilot, "Lot", "LOT-41")
                await until(pilot, lambda: any(n.startswith("not switched:") for n in notes))
                assert line.ctx.profile.name == "relay" and line.lot == ""
                # the other profile and a lot
                await pilot.press("f10")
                await prompt(pilot, "Admin password", "s3cret-admin-pw")
                await prompt(pilot, "Profile", "relay2")
                await prompt(pilot, "Lot", "LOT-42")
                await until(pilot, lambda: "profile relay2, lot LOT-42" in notes)
                assert line.ctx.profile.name == "relay2" and line.lot == "LOT-42"
                assert "relay2" in header_text(app) and "2Smart Relay Two" in header_text(app)
                assert "lot LOT-42" in header_text(app)
                dev.replug()  # the next board runs on the new profile, in the new lot
                await until(pilot, lambda: line.slots[0].status == "passed")
        run(go2())
    row = ctx_for(station_env).record.attempts()[0]
    assert (row["profile"], row["lot"], row["outcome"]) == ("relay2", "LOT-42", "passed")


def test_f9_pauses_behind_a_band_across_the_screen_and_f6_starts_the_selected_board(station_env):
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        for slot in bench.slots:
            slot.device.unplug()
        app = StationApp(ctx_for(station_env), [s.url for s in bench.slots], operator="Anna", poll_interval=0.1)
        refusals = []
        app.bell = lambda: refusals.append(None)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                line, band = app.line, app.query_one("#paused")
                assert not band.display
                await pilot.press("f9")
                await until(pilot, lambda: band.display)
                assert line.paused and band.region.width == 100  # a band across the screen, not a word
                assert "PAUSED" in " ".join(on_screen(band)) and "F9 resumes" in " ".join(on_screen(band))
                await pilot.press("f6")  # no board in slot 1: refused with a bell, nothing starts
                await until(pilot, lambda: refusals)
                assert [s.status for s in line.slots] == ["empty", "empty"]
                bench[0].device.replug()
                bench[1].device.replug()
                # the poll that sees a board arrive starts it at once unless paused
                await until(pilot, lambda: all(s.present for s in line.slots))
                line.poll()
                assert [s.status for s in line.slots] == ["waiting", "waiting"]
                await until(pilot, lambda: "paused: F6 starts it" in card_text(app, 1))
                await pilot.press("f4", "f6")  # the selected slot (2) starts; slot 1 keeps waiting
                await until(pilot, lambda: line.slots[1].status == "passed")
                assert line.slots[0].status == "waiting" and "READY" in card_text(app, 0)
                await pilot.press("f9")
                await until(pilot, lambda: not band.display)
                await until(pilot, lambda: line.slots[0].status == "passed")
                assert not line.paused
        run(go())


def test_f6_waits_for_the_label_when_the_profile_takes_serials_from_labels(station_env):
    label_profile(station_env)
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        app = StationApp(ctx_for(station_env), [bench[0].url], operator="Anna", poll_interval=0.1)
        notes = []
        orig = app.notify
        app.notify = lambda msg, **kw: (notes.append(msg), orig(msg, **kw))

        async def go():
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.line.slots[0].status == "waiting")
                await pilot.press("f6")
                await until(pilot, lambda: notes)
                assert notes == ["slot 1 waits for its label: scan it first"]
                assert app.line.slots[0].status == "waiting"
        run(go())


def test_operator_is_asked_at_start(station_env):
    app = StationApp(ctx_for(station_env), ["/dev/no-such-port-0"], operator=None)

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, TextPrompt))
            assert app.line.operator == ""
            await pilot.press(*"Maria", "enter")
            await until(pilot, lambda: app.line.operator == "Maria")
            assert "operator Maria" in header_text(app)
    run(go())


@pytest.mark.parametrize("size", [(80, 24), (100, 30), (160, 45)])
def test_snapshot_main_screen(station_env, snap_compare, size):
    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text().replace('station_id = "test-station"', 'station_id = "line-1-station-1"'))
    ports = [f"/dev/ttyFIXTURE{i}" for i in range(4)]  # no board in any slot: a steady screen
    app = StationApp(ctx_for(station_env), ports, operator="Anna")
    assert snap_compare(app, terminal_size=size, run_before=lambda pilot: steady_cursor(app))


# -- snapshots of the working screen, built from fixed state ---------------------------------------

class FixedClock:
    """The line's clock, held still: elapsed times and rates on the cards do not move."""

    def __init__(self, t: float = 10_000.0):
        self.t = t

    def monotonic(self) -> float:
        return self.t


@pytest.fixture
def fixed_station(station_env, monkeypatch):
    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text().replace('station_id = "test-station"', 'station_id = "line-1-station-1"'))
    clock = FixedClock()
    monkeypatch.setattr(station.line, "time", clock)
    return station_env, clock


def fixed_app(env, clock, slots: int) -> StationApp:
    # fixture ports that are not there: the poll leaves the state below alone
    app = StationApp(ctx_for(env), [f"/dev/ttyFIXTURE{i}" for i in range(slots)], operator="Anna")
    app.line.spawn = lambda fn: None  # no pipeline: the test plays the events
    app.line.lot = "LOT-2611"
    app.line.opened = clock.t - 3600  # an hour into the shift
    return app


def play(app, clock, i: int, until_step: str, fraction: float = 0.0) -> None:
    """Slot i through the pipeline's events up to `until_step` (fixed MAC and serial)."""
    line, port = app.line, app.line.slots[i].port
    slot = line.slots[i]
    total = sum(len(d) for _, _, d in line.ctx.firmware) + line.ctx.profile.config_slot().size
    line.start(i)
    feed = lambda e: line._event(slot, e)  # noqa: E731  (the pipeline's emit for this slot)
    mac = f"24:0a:c4:5e:10:{0x30 + i:02x}"
    for step in ("connect", "identify", "guard", "serial", "config", "flash", "boot"):
        feed(StepStarted(port, step))
        if step == "connect":
            feed(UnitInfo(port, mac, "ESP32"))
        if step == "serial":
            feed(UnitInfo(port, serial=f"RLY-261126-{i + 1:05d}"))
        if step == "flash":
            feed(Progress(port, "flash", 0, total, "bootloader"))
            clock.t += 4.0
            feed(Progress(port, "flash", int(total * fraction), total, "app"))
        if step == until_step:
            return
        if step == "flash":
            feed(Progress(port, "flash", total, total, ""))
        clock.t += 1.0


def finish(app, clock, i: int, outcome: str, step: str | None = None, error: str | None = None,
           remedy: str | None = None) -> None:
    slot = app.line.slots[i]
    clock.t += 2.0
    app.line._event(slot, UnitFinished(slot.port, UnitResult(
        slot.port, outcome, step, error, remedy, slot.mac, slot.serial, chip=slot.chip)))


def steady_cursor(app) -> None:
    app.query_one("#scan").cursor_blink = False  # a blinking cursor would be in the picture half the time


async def settle(pilot, app, words: dict[int, str]) -> None:
    """Wait until every card shows its word (the line's changes went through the message queue)."""
    await until(pilot, lambda: all(w in card_text(app, i) for i, w in words.items()))


def test_snapshot_flashing(fixed_station, snap_compare):
    env, clock = fixed_station
    app = fixed_app(env, clock, 4)

    async def before(pilot):
        steady_cursor(app)
        play(app, clock, 0, "flash", 0.42)
        play(app, clock, 1, "flash", 0.81)
        play(app, clock, 2, "boot")
        app.line.slots[3].status = "waiting"
        app.line.on_change(3)
        clock.t += 3.0
        await settle(pilot, app, {0: "kB/s", 1: "kB/s", 2: "step: boot", 3: "READY"})

    assert snap_compare(app, terminal_size=(160, 45), run_before=before)


# the outcomes, with the words the pipeline and the record use
OUTCOMES = [
    ("passed", None, None, None),
    ("failed", "flash", "the board was unplugged or the port failed while writing",
     "reseat the board, then retry; replace the board if it fails again"),
    ("aborted", "boot", "aborted by the operator", "put the board back and start it again"),
    ("error", "serial", "the record's database is locked by another process",
     "call the station's engineer; put this board aside"),
    ("running", None, None, None),
]


def outcomes(app, clock, slots: int) -> dict[int, SlotView]:
    """PASS, FAIL, ABORTED, ERROR and WORKING in turn; what each card must show, as the test knows it."""
    expect = {}
    for i in range(slots):
        outcome, step, error, remedy = OUTCOMES[i % 5] if slots > 4 else OUTCOMES[i]
        if outcome == "running":
            play(app, clock, i, "flash", 0.5)
        else:
            play(app, clock, i, step or "boot", 0.3)
            finish(app, clock, i, outcome, step, error, remedy)
        expect[i] = SlotView(number=i + 1, port="", status=outcome, serial=f"RLY-261126-{i + 1:05d}",
                             reason=f"{step}: {error}" if error else "", action=remedy or "")
    return expect


LAYOUTS = [((80, 24), 4), ((100, 30), 4), ((160, 45), 4), ((160, 45), 16), ((100, 30), 16)]
LAYOUT_IDS = [f"{w}x{h}-{n}slots" for (w, h), n in LAYOUTS]


@pytest.mark.parametrize("size,slots", LAYOUTS, ids=LAYOUT_IDS)
def test_every_card_shows_number_outcome_serial_reason_and_action_at_every_size(fixed_station, size, slots):
    env, clock = fixed_station
    app = fixed_app(env, clock, slots)

    async def go():
        async with app.run_test(size=size) as pilot:
            expect = outcomes(app, clock, slots)
            await settle(pilot, app, {i: v.word for i, v in expect.items()})
            gone = []
            for i, v in expect.items():
                lines = card_lines(app, i)
                gone += [f"slot {i + 1} ({v.word}): {what}" for what in missing(v, lines, len(lines[0]))]
                if v.status == "running" and "flash" not in flat(lines):
                    gone.append(f"slot {i + 1}: its step")
            assert not gone, "\n".join(gone)
            header = " ".join(on_screen(app.query_one("#header")))
            counts = {w: sum(v.word == w for v in expect.values()) for w in ("PASS", "FAIL", "ABORTED", "ERROR")}
            for word, n in counts.items():
                assert f"{word} {n}" in header, header
            y = 100 * counts["PASS"] / (counts["PASS"] + counts["FAIL"])
            assert f"yield {y:.0f}%" in header and "units/h" in header and "cycle 12.0 s" in header, header
            assert (app.line.aborted, app.line.errors) == (counts["ABORTED"], counts["ERROR"])
            await until(pilot, lambda: on_screen(app.query_one("Footer"))[0].strip())  # it composes late
            footer = on_screen(app.query_one("Footer"))[0]
            for b in app.BINDINGS:
                if b.show:  # every key and its word, whole
                    assert b.key_display in footer and (b.group or b).description in footer, footer
            if not any(b.key == "f7" for b in app.BINDINGS):  # room kept for the shift-change key (#14)
                assert len(footer.rstrip()) <= size[0] - 10, footer
    run(go())


@pytest.mark.parametrize("size", [(80, 24), (100, 30), (160, 45)])
def test_snapshot_outcomes(fixed_station, snap_compare, size):
    env, clock = fixed_station
    app = fixed_app(env, clock, 4)

    async def before(pilot):
        steady_cursor(app)
        expect = outcomes(app, clock, 4)
        await settle(pilot, app, {i: v.word for i, v in expect.items()})

    assert snap_compare(app, terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", [(160, 45), (100, 30)])
def test_snapshot_sixteen_slots(fixed_station, snap_compare, size):
    env, clock = fixed_station
    app = fixed_app(env, clock, 16)

    async def before(pilot):
        steady_cursor(app)
        expect = outcomes(app, clock, 16)
        if size == (160, 45):
            await pilot.press("f9")  # the PAUSED band above the cards
        await settle(pilot, app, {i: v.word for i, v in expect.items()})
        assert app.compact

    assert snap_compare(app, terminal_size=size, run_before=before)


def test_a_card_shown_before_its_body_is_mounted_keeps_the_view():
    # the line's timer showed a running slot between a card's mount and its body's (16 slots, an idle run
    # on three workers): the card keeps the view for its body instead of failing the screen
    card = SlotCard(4)
    slot = station.line.Slot(4, "/dev/ttyUSB4", status="running", step="flash")
    card.show(slot, selected=False, labels_needed=False)
    assert card.view_shown is not None and (card.view_shown.status, card.view_shown.number) == ("running", 5)
