"""A whole line on one station: baud fallback, fast rework, hung ports, aborts."""

from __future__ import annotations

import os
import threading

from flashing.nvs import read_partition
from flashing.virtual.bench import VirtualBench
from station.line import Line
from station.pipeline import UnitJob, provision_unit
from station.keys import TOKEN_FINGERPRINT, derive
from station.record import fingerprint
from station.runner import open_station
from tests.conftest import wait_until
from tests.station.conftest import TOKEN, json_lines, run_station_process


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


def test_baud_falls_back_below_460800_with_the_reason_in_the_log(station_env):
    ctx = ctx_for(station_env)
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        bench[0].device.set_fault("garble_above", 230400)  # a board at low supply voltage
        events = []
        r = provision_unit(UnitJob(bench[0].url), ctx, events.append)
        assert r.passed, r
    lines = [e.text for e in events if type(e).__name__ == "LogLine" and e.source == "station"]
    assert [(l.split(" failed")[0], l.rsplit("; ", 1)[1]) for l in lines] == [
        ("baud 921600", "trying 460800"), ("baud 460800", "trying 230400")]
    for line in lines:  # esptool's own words for what went wrong, one line each
        reason = line[line.index(" on this port (") + 15:line.rindex("); trying")]
        assert reason and "\n" not in line
        # where the garbled byte lands depends on the host's timing, so the reason is any of the
        # errors esptool's reader and command paths raise for a bad link (esptool/loader.py
        # slip_reader, command, check_command; util.py UnsupportedCommandError: a garbled
        # command gets the ROM's "invalid message" status) — esptool's words, never ours
        assert any(w in reason.lower() for w in (
            "timed out", "no serial data", "serial data stream stopped", "transfer stopped",
            "invalid head of packet", "invalid slip escape", "doesn't match request", "result was",
            "not supported in the current download mode", "checksum")), lines
        assert not reason.startswith(("the flasher stub", "the board", "no baud rate")), lines
    assert ctx.port_baud[bench[0].url] == 230400
    assert [a["baud"] for a in ctx.record.attempts()] == [230400]


def test_rework_rewrites_only_what_changed(station_env, monkeypatch):
    ctx = ctx_for(station_env)
    slot = ctx.profile.config_slot()
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        dev = bench[0].device
        erased: list[tuple[int, int]] = []  # what the board's flash was asked to erase (sector ranges)
        real_erase = dev.flash.erase
        monkeypatch.setattr(dev.flash, "erase", lambda offset, length: (erased.append((offset, length)),
                                                                        real_erase(offset, length))[1])
        first = provision_unit(UnitJob(bench[0].url), ctx, lambda e: None)
        assert first.passed and first.written_regions == ("bootloader", "partition-table", "app", "config")
        assert any(o <= 0x10000 < o + n for o, n in erased)  # the first run erased the app's sectors
        assert read_partition(dev.flash.read(slot.offset, slot.size))["2smart"]["token"] == TOKEN
        # same firmware, new vendor token: only the config partition changes
        ctx.secrets["vendor_token"] = "tok-000002"
        erased.clear()
        again = provision_unit(UnitJob(bench[0].url, rework=True), ctx, lambda e: None)
        assert again.passed and again.written_regions == ("config",)
        assert again.serial == first.serial
        # the board's own account: nothing outside the config partition was erased (so none was rewritten)
        assert erased and all(slot.offset <= o and o + n <= slot.offset + slot.size for o, n in erased), erased
        # the board holds the new token; the record holds only its fingerprint
        values = read_partition(dev.flash.read(slot.offset, slot.size))["2smart"]
        assert values["token"] == "tok-000002" and values["serial"] == first.serial
    rows = ctx.record.attempts()
    assert rows[0]["written_regions"] == '["config"]' and rows[0]["rework"] == 1
    assert rows[0]["token_fingerprint"] == fingerprint(derive(ctx.key, TOKEN_FINGERPRINT), "tok-000002") \
        != rows[1]["token_fingerprint"]
    assert not any("tok-000002" in str(v) for row in rows for v in row.values())


def test_a_hung_port_while_seven_others_finish(station_env):
    # esptool's own config file gives the hung port a 12 s block timeout (one attempt): the
    # seven others need a few seconds, so if they waited for the hung port they would end after it
    cfg = station_env / "esptool.cfg"
    cfg.write_text("[esptool]\ntimeout = 12\nwrite_block_attempts = 1\n")
    env = {**os.environ, "STATION_CONFIG": str(station_env / "station.toml"), "ESPTOOL_CFGFILE": str(cfg)}
    with VirtualBench(8, "esp32", run_dir=station_env / "run") as bench:
        bench[3].device.set_fault("hang_after", 200_000)  # goes silent mid-write
        ports = sum((["--port", s.url] for s in bench.slots), [])
        r = run_station_process("flash", *ports, "--smoke", "none", "--json", env=env, cwd=station_env)
    assert r.returncode == 1, r.stderr[-2000:]
    finished = [e for e in json_lines(r.stdout) if e["event"] == "unit_finished"]  # in the order they ended
    hung = bench[3].url
    assert [e["port"] for e in finished][-1] == hung  # all seven others ended before the hung one
    assert [e["outcome"] for e in finished] == ["passed"] * 7 + ["failed"]
    bad = finished[-1]
    assert bad["failed_step"] == "flash" and bad["durations"]["flash"] >= 12  # it really sat out its timeout


def test_abort_one_slot_cuts_its_write_off_while_others_continue(station_env):
    # how long an abort takes is measured by benchmarks/line.py; here: it does not wait for the write
    ctx = ctx_for(station_env)
    with VirtualBench(4, "esp32", run_dir=station_env / "run", realtime=True) as bench:
        changed = threading.Event()
        line = Line(ctx, [s.url for s in bench.slots], lambda i: changed.set(), operator="Anna")
        line.poll()
        wait_until(lambda: all(s.step == "flash" for s in line.slots), "every slot flashing", 30)
        line.abort(2)
        wait_until(lambda: line.slots[2].status == "aborted", "slot 3 aborted", 30)
        cut_at = bench[2].device.bytes_since_plug
        assert [s.status for i, s in enumerate(line.slots) if i != 2] == ["running"] * 3
        wait_until(lambda: not any(s.status == "running" for s in line.slots), "the others finished", 90)
        assert [s.status for s in line.slots] == ["passed", "passed", "aborted", "passed"]
        # the aborted board got less than half of what a whole unit sends: esptool was cut off mid-write
        assert cut_at < bench[0].device.bytes_since_plug / 2, (cut_at, bench[0].device.bytes_since_plug)
    line.close()


def test_demo_line_swaps_each_finished_board_for_a_new_one_some_faulty(station_env):
    from station.demo import DemoLine

    ctx = ctx_for(station_env)
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        first_macs = [s.device.mac_text for s in bench.slots]
        line = Line(ctx, [s.url for s in bench.slots], lambda i: None, operator="Anna")
        # every new board faulty; seed 7 draws a dead flash and no download mode: both fail
        demo = DemoLine(bench, line, swap_after=0.2, faulty_share=1.0, seed=7).start()
        try:
            # two boards, then the two that replaced them; between polls, the screen's hot-plug poll
            wait_until(lambda: len(ctx.record.attempts()) >= 4, "four attempts", 60, poke=line.poll)
        finally:
            demo.stop()
            line.close()
        # nothing of the demo still acts on the boards once it stopped: they may be closed now
        assert not [t.name for t in threading.enumerate() if t.name.startswith("demo-")]
        second_macs = [s.device.mac_text for s in bench.slots]
    rows = sorted(ctx.record.attempts(), key=lambda r: r["id"])
    assert [r["outcome"] for r in rows[:2]] == ["passed", "passed"] and {r["mac"] for r in rows[:2]} == set(first_macs)
    assert set(first_macs).isdisjoint(second_macs)  # new boards, new MACs
    assert sorted((r["outcome"], r["failed_step"]) for r in rows[2:]) == [("failed", "connect"), ("failed", "identify")]
