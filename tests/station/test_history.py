"""The history: search by serial, MAC in any common form, and device id; each attempt's detail view.

The searches read a real SQLite record; the screen's history is driven with Textual's Pilot
after real runs on virtual boards (one passes, one fails with the board's long message after its serial was given).
"""

from __future__ import annotations

import asyncio
import os
import re
import time

import pytest

from flashing.virtual.bench import VirtualBench
from station.pipeline import SECURE_STEPS, STEPS
from station.record import Attempt, Record, now_iso
from station.runner import open_station
from station.tui import AttemptScreen, HistoryScreen, StationApp

UNITS = {  # serial -> MAC; B and C share "ab:cd", A and B the vendor prefix
    "RLY-261126-00001": "24:0a:c4:12:34:56",
    "RLY-261126-00002": "24:0a:c4:ab:cd:ef",
    "SN_X%9": "30:ae:a4:ab:cd:00",
}


@pytest.fixture
def record(tmp_path):
    record = Record(tmp_path / "station.db", os.urandom(32), station_id="st-1")
    for serial, mac in UNITS.items():
        a = Attempt(port="/dev/ttyUSB0", station_id="st-1", profile="relay", profile_hash="0" * 64,
                    started_at=now_iso(), ended_at=now_iso(), outcome="passed", operator="Anna",
                    mac=mac, serial=serial, device_id=mac.replace(":", "-"))
        record.add_attempt(a)
    yield record
    record.close()


def found(record: Record, query: str) -> set[str]:
    return {r["serial"] for r in record.history(query)}


A, B, C = UNITS


@pytest.mark.parametrize("query, serials", [
    ("RLY-261126-00002", {B}),  # a whole serial
    ("rly-261126-0000", {A, B}),  # part of one, any case
    ("00001", {A}),  # digits only: a serial's tail (and no MAC holds them)
    ("24:0a:c4:ab:cd:ef", {B}),  # the MAC as the record writes it
    ("24:0A:C4:AB:CD:EF", {B}),  # upper case
    ("24-0a-c4-ab-cd-ef", {B}),  # dashes (also the device id)
    ("240AC4ABCDEF", {B}),  # bare hex, as printed on a module's label
    ("240a.c4ab.cdef", {B}),  # dotted groups, as network tools print it
    ("ab:cd", {B, C}),  # a part, with separators
    ("ABCD", {B, C}),  # a part, bare
    ("24-0A-C4", {A, B}),  # the vendor prefix
    (" cd:00 ", {C}),  # surrounding spaces from a paste
    ("SN_X%", {C}),  # LIKE's wildcards are the serial's own characters
    ("_", {C}),
    ("%", {C}),
    ("ff:ff", set()),
    ("", {A, B, C}),  # nothing typed: the newest attempts
])
def test_history_finds_a_unit_by_serial_mac_in_any_form_and_device_id(record, query, serials):
    assert found(record, query) == serials


def test_history_finds_by_device_id_that_is_not_the_mac(record):
    a = Attempt(port="/dev/ttyUSB1", station_id="st-1", profile="relay", profile_hash="0" * 64,
                started_at=now_iso(), ended_at=now_iso(), outcome="failed", operator="Anna",
                mac="24:0a:c4:00:00:01", serial="RLY-9", device_id="relay-kitchen-7")
    record.add_attempt(a)
    assert found(record, "kitchen") == {"RLY-9"}
    assert found(record, "RELAY-KITCHEN-7") == {"RLY-9"}


def screen_text(app) -> str:
    return str(app.screen.query_one("#attempt-text").render())


def table_rows(app) -> list[list[str]]:
    table = app.screen.query_one("DataTable")
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def until(pilot, cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await pilot.pause(0.05)


DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


def test_history_detail_shows_the_whole_attempt(station_env):
    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text() + 'lot = "LOT-7"\n')
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        bench[1].device.set_fault("panic_after", 0.1)  # its firmware crashes at boot
        good, bad = bench[0].device.mac_text, bench[1].device.mac_text
        app = StationApp(open_station("relay", cfg), [s.url for s in bench.slots], operator="Anna",
                         poll_interval=0.1)

        async def go():
            async with app.run_test(size=(100, 30)) as pilot:
                line = app.line
                await until(pilot, lambda: [s.status for s in line.slots] == ["passed", "failed"])
                failure = line.slots[1].result
                assert len(failure.error) > 50  # long enough that the old table cut it
                await pilot.press("f2")
                await until(pilot, lambda: isinstance(app.screen, HistoryScreen))
                await until(pilot, lambda: len(table_rows(app)) == 2)
                rows = table_rows(app)
                assert all(DATE_TIME.match(r[5]) for r in rows), rows  # date and time, not the time alone
                assert [r[-1] for r in rows if r[3] == "FAILED"] == [failure.error]  # the whole message

                # the passed board, by its MAC as a label prints it: bare upper-case hex
                await pilot.press(*good.replace(":", "").upper())
                await until(pilot, lambda: [r[2] for r in table_rows(app)] == [good])
                await pilot.press("enter", "enter")  # to the rows, then open the one under the cursor
                await until(pilot, lambda: isinstance(app.screen, AttemptScreen))
                text = screen_text(app)
                passed = line.slots[0].result
                for want in ("outcome      PASSED", f"serial       {passed.serial}", f"MAC          {good}",
                             f"device id    {passed.device_id}", "operator     Anna", "lot          LOT-7",
                             f"port         {bench[0].url}", f"firmware     {passed.firmware_version}",
                             "chip         ESP32", "reason       -"):
                    assert want in text, (want, text)
                assert len(DATE_TIME.findall(text)) == 2  # started and ended
                steps = re.search(r"steps +(.*)", text).group(1)
                for step in [s.name for s in STEPS if s.name not in SECURE_STEPS]:  # (the record's own write is timed after it is written)
                    assert re.search(rf"\b{step}\s\d+\.\d\d\ss", steps), (step, steps)
                written = re.search(r"written +(.*)", text).group(1)
                assert written == ", ".join(passed.written_regions) and "config" in written
                await pilot.press("escape")
                await until(pilot, lambda: isinstance(app.screen, HistoryScreen))

                # the failed board, by its device id
                search = app.screen.query_one("#search")
                search.value = ""
                search.focus()
                await pilot.press(*bad.replace(":", "-"))
                await until(pilot, lambda: [r[3] for r in table_rows(app)] == ["FAILED"])
                await pilot.press("enter", "enter")
                await until(pilot, lambda: isinstance(app.screen, AttemptScreen))
                text = screen_text(app)
                assert "outcome      FAILED at boot" in text
                assert f"reason       {failure.error}\n" in text  # whole, on the detail's own lines
                assert f"next action  {failure.remedy}\n" in text
                assert "\ndetail " in text and "boot:" in text.split("\ndetail ", 1)[1]  # the board's own words
        asyncio.run(go())
