"""Untrusted text is data: what boards, HTTP replies and people say never drives the screen or the terminal.

A board whose firmware names itself in markup and escape sequences, a MAC with ":ab:"
(Rich's emoji code for 🆎), an operator called "[/b] O'Brien", a lot "[red]x"; pairing
servers that stream without end or trickle a byte a second; and a screen that crashes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from textual.app import App

from flashing.firmware import build_firmware
from flashing.virtual.bench import VirtualBench
from station.line import Line
from station.record import Record
from station.runner import open_station
from station.smoke import MAX_REPLY_BYTES, SmokeFailure, healthcheck, http_get
from station.text import safe_text
from station.tui import HistoryScreen, SlotCard, StationApp
from tests.station.conftest import TOKEN, json_lines, run_station, run_station_process

HOSTILE_PROJECT = "[/]\x1b]0;PWNED\x07[b]:ab:"  # markup, an OSC that retitles the terminal, an emoji code
HOSTILE_VERSION = "1.0[/b]\x1b[2J"  # markup and a CSI that clears the screen
HOSTILE_MAC = bytes.fromhex("240aab5eab01")  # 24:0a:ab:5e:ab:01
OPERATOR, LOT = "[/b] O'Brien", "[red]x"


def hostile_profile(env: Path) -> None:
    """The example profile, its firmware rebuilt with a hostile project name and version."""
    fw = build_firmware("esp32", project=HOSTILE_PROJECT, version=HOSTILE_VERSION, app_size=200_000)
    d = env / "profiles" / "relay"
    text = (d / "profile.toml").read_text()
    for name, data in (("bootloader.bin", fw.bootloader), ("partition-table.bin", fw.partition_table),
                       ("relay.bin", fw.app)):
        (d / "firmware" / name).write_bytes(data)
        text = re.sub(rf'(file = "firmware/{re.escape(name)}", sha256 = ")[0-9a-f]+',
                      rf"\g<1>{hashlib.sha256(data).hexdigest()}", text)
    (d / "profile.toml").write_text(text)


def test_safe_text_keeps_printable_unicode_and_drops_control_sequences():
    assert safe_text("a\x1b]0;PWNED\x07b\x1b[2Jc\x1b[31md\x1b]8;;http://x\x1b\\e") == "abcde"
    assert safe_text("tab\tnew\nline\r\x00\x7f\x85\x9b2J\u202eevil") == "tab\tnew\nlineevil"  # \x9b2J: an 8-bit CSI, gone whole
    assert safe_text("[/] [b] :ab: Ünïcødé ✓ 🆗") == "[/] [b] :ab: Ünïcødé ✓ 🆗"


def test_a_scanned_label_with_control_codes_is_refused(station_env):
    line = Line(open_station(config=station_env / "station.toml"), ["/dev/no-such-port-0"], lambda i: None)
    try:
        assert line.scan("SN-1\x1b]0;PWNED\x07") == (False, "label refused: a serial has no spaces or control "
                                                          "characters")
        assert line.scan("SN\x1d2") == (False, "label refused: a serial has no spaces or control characters")
        assert line.scan("  SN-3 ") == (True, "SN-3 -> slot 1")
        assert line.slots[0].scanned == "SN-3"
    finally:
        line.close()


def test_board_and_people_text_is_shown_literally_on_the_screen(station_env):
    hostile_profile(station_env)
    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text() + f'lot = "{LOT}"\n')
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        bench[0].device.swap(HOSTILE_MAC)
        app = StationApp(open_station(config=cfg), [bench[0].url], operator=OPERATOR, poll_interval=0.1)

        async def go() -> dict[str, str]:
            async with app.run_test(size=(160, 45)) as pilot:
                while app.line.slots[0].status != "passed":
                    assert app.line.slots[0].status not in ("failed", "error"), app.line.slots[0].result
                    await pilot.pause(0.1)
                card = app.query_one("#slot-0", SlotCard)
                while card.view_shown is None or card.view_shown.status != "passed":
                    await pilot.pause(0.05)  # the last change reaches the card (and the log, in the same call)
                seen = {"card": " ".join(str(w.render()) for w in card.query("Static, Label")),
                        "header": str(app.query_one("#header").render()),
                        "log": "\n".join(strip.text for strip in app.query_one("#log").lines),
                        "svg": app.export_screenshot()}
                await pilot.press("f2")
                while not isinstance(app.screen, HistoryScreen) or app.screen.query_one("DataTable").row_count < 1:
                    await pilot.pause(0.1)
                table = app.screen.query_one("DataTable")
                seen["history"] = " | ".join(str(c) for c in table.get_row_at(0))
                await pilot.pause()  # the table's rows drawn
                seen["history svg"] = app.export_screenshot()
                return seen

        seen = asyncio.run(go())  # a MarkupError would have ended the screen and surfaced here
    assert "Project name:     [/][b]:ab:" in seen["log"], seen["log"]  # the board's words, minus the OSC
    assert "App version:      1.0[/b]" in seen["log"]
    assert f"operator {OPERATOR} · lot {LOT}" in seen["header"] and "fw 1.0[/b] ·" in seen["header"]
    assert "24:0a:ab:5e:ab:01" in seen["card"] and "24:0a:ab:5e:ab:01" in seen["history"]
    assert LOT in seen["history"] and OPERATOR in seen["history"]
    for where, text in seen.items():
        assert "\x1b" not in text and "\x07" not in text and "PWNED" not in text, where
        assert "🆎" not in text, where  # ":ab:" stayed text, not Rich's emoji


def test_no_escape_sequence_from_a_board_reaches_the_terminal(station_env):
    hostile_profile(station_env)
    env = {**os.environ, "STATION_CONFIG": str(station_env / "station.toml")}
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        bench[0].device.swap(HOSTILE_MAC)
        human = run_station_process("flash", "--port", bench[0].url, "--operator", OPERATOR, env=env,
                                    cwd=station_env)
        data = run_station_process("flash", "--port", bench[0].url, "--rework", "--json", env=env,
                                   cwd=station_env)
    assert human.returncode == 0 and data.returncode == 0, human.stderr + data.stderr
    for r in (human, data):
        assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout + r.stderr
    assert "\\u001b" not in data.stdout and "\\u0007" not in data.stdout  # nor escaped, for `jq -r` to revive
    done = [e for e in json_lines(data.stdout) if e["event"] == "unit_finished"]
    assert done[0]["firmware_version"] == "1.0[/b]" and done[0]["mac"] == "24:0a:ab:5e:ab:01"
    assert "1 of 1 units passed" in human.stdout
    assert "firmware 1.0[/b]" in human.stderr  # the board's words, shown as data


# -- HTTP replies: a size cap and an overall deadline ------------------------------------------------

class HostilePairingServer:
    """A pairing server on 127.0.0.1 whose /healthcheck streams without end, or trickles a byte a second.

    It counts what it managed to send: a station that stops reading makes its writes fail.
    """

    STREAM_BYTES = 100 * 1024 * 1024
    TRICKLE_BYTES = 30  # a station without an overall deadline would take 30 s and pass

    def __init__(self, mode: str):
        self.mode, self.sent, self.stop = mode, 0, threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stuck write ends; the server's threads are joined at close

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                try:
                    server.serve(self)
                except OSError:
                    pass  # the station hung up: what it did not read is not counted

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = False  # server_close joins the handlers
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="hostile-pairing-server")
        self.thread.start()

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        if self.mode == "trickle-status":
            for b in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"[: self.TRICKLE_BYTES]:
                h.wfile.write(bytes([b]))
                h.wfile.flush()
                if self.stop.wait(1.0):
                    return
            return
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        if self.mode == "trickle":
            h.send_header("Content-Length", str(self.TRICKLE_BYTES))
        h.end_headers()
        if self.mode == "stream":
            chunk = b"x" * 65536
            while self.sent < self.STREAM_BYTES and not self.stop.is_set():
                h.wfile.write(chunk)
                self.sent += len(chunk)
        else:
            for _ in range(self.TRICKLE_BYTES):
                h.wfile.write(b".")
                h.wfile.flush()
                self.sent += 1
                if self.stop.wait(1.0):
                    return

    def close(self) -> None:
        self.stop.set()
        self.http.shutdown()
        self.http.server_close()
        self.thread.join()


@pytest.fixture
def hostile_server():
    servers: list[HostilePairingServer] = []

    def start(mode: str) -> HostilePairingServer:
        servers.append(HostilePairingServer(mode))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_a_healthcheck_streaming_100_mb_fails_the_unit_at_the_cap(station_env, capsys, hostile_server):
    server = hostile_server("stream")
    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text() + f'\n[smoke]\ntimeout_s = 5\nurl = "{server.url}"\n')
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, out, err = run_station(capsys, "flash", "--port", bench[0].url, "--smoke", "healthcheck", "--json")
    done = [e for e in json_lines(out) if e["event"] == "unit_finished"][0]
    assert rc == 1 and done["failed_step"] == "smoke", done
    assert f"is larger than {MAX_REPLY_BYTES // 1024} KiB" in done["error"]
    # the station stopped reading at the cap: what the server got out is its socket buffers' worth, not 100 MB
    assert server.sent < 16 * 1024 * 1024, server.sent


@pytest.mark.parametrize("mode", ["trickle", "trickle-status"])
def test_a_pairing_server_trickling_a_byte_a_second_fails_at_the_deadline(hostile_server, mode):
    server = hostile_server(mode)
    t0 = time.monotonic()
    with pytest.raises(SmokeFailure) as failure:
        healthcheck(server.url, timeout=2)
    elapsed = time.monotonic() - t0
    assert "did not answer within 2 s" in failure.value.message
    assert elapsed < HostilePairingServer.TRICKLE_BYTES / 2  # at the deadline, not when the server is done
    assert server.sent < HostilePairingServer.TRICKLE_BYTES


def test_a_refused_pairing_server_is_named_without_the_query():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: refused
    with pytest.raises(SmokeFailure) as failure:
        http_get(f"http://127.0.0.1:{port}/pair?psk=Fp%25Test&token=Tt4Gh8", timeout=2)
    assert "no answer from the pairing server at http://127.0.0.1:" in failure.value.message
    assert "/pair (" in failure.value.message and "Tt4Gh8" not in failure.value.message
    assert "?" not in failure.value.message


# -- a crash of the screen --------------------------------------------------------------------------

def test_a_crash_of_the_screen_exits_3_records_the_running_unit_and_prints_no_secret(
        station_env, capsys, monkeypatch):
    original = SlotCard.show

    def show(self, slot, *args, **kw):
        if slot.step == "flash":
            raise RuntimeError(f"the card broke while flashing (token {TOKEN})")
        return original(self, slot, *args, **kw)

    monkeypatch.setattr(SlotCard, "show", show)
    monkeypatch.setattr(StationApp, "run", lambda self: App.run(self, headless=True, size=(160, 45)))
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, out, err = run_station(capsys, "tui", "--port", bench[0].url, "--operator", "Anna")
    assert rc == 3, err
    assert "the card broke while flashing (token <redacted>)" in err and "call the station's engineer" in err
    assert TOKEN not in out + err
    record = Record(station_env / "station.db")
    rows = record.attempts()
    record.close()
    assert [(r["outcome"], r["failed_step"]) for r in rows] == [("aborted", "flash")]
