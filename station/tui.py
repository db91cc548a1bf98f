"""The operator's screen: one card per fixture slot, PASS or FAIL at a glance.

A thin Textual front end over `station.line.Line`: it shows the slots and passes
the operator's keys and scans on; the line does the work in thread workers, so a
hung port never freezes the screen. Keys are function keys (a barcode scanner types
into the scan field): F2 history (Enter on a row: its detail), F3/F4 choose a slot, F5 retry,
F7 shift change, F8 abort, F9 pause, F10 admin (switch profile or lot), Ctrl+Q quit. No unit
starts until an operator has signed in (typed or badge-scanned at the prompt).

Every text that is not the screen's own (a board's console, an HTTP reply, an
operator's name, a scan, a lot) is shown as `rich.text.Text` — never parsed as
markup or emoji codes — after the station's redaction and with control characters
removed (`SlotCard.words`, `StationApp.words`). A crash of the screen aborts and
records the running units, and leaves its reason (redacted) in `StationApp.crashed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import traceback
from datetime import datetime
from typing import Callable

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Label, ProgressBar, RichLog, Static

from .admin import AdminGate
from .line import NO_OPERATOR, Line, Slot
from .pipeline import STEP_NAMES, StationContext
from .record import RecordError
from .secrets import NO_SECRETS
from .text import one_line, safe_text

STATUS_WORD = {"empty": "NO BOARD", "waiting": "READY", "running": "WORKING", "passed": "PASS",
               "failed": "FAIL", "aborted": "ABORTED", "error": "STATION ERROR"}


class SlotChanged(Message):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SlotChanged) and message.index == self.index


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def plain(text: str | None, redact: Callable[[str], str] = NO_SECRETS, style: str = "") -> Text:
    """Text that is shown as it is: redacted, without control characters, never markup nor emoji codes."""
    return Text(safe_text(redact(text or "")), style=style)


class SlotCard(Vertical):
    def __init__(self, index: int, redact: Callable[[str], str] = NO_SECRETS) -> None:
        super().__init__(id=f"slot-{index}", classes="card")
        self.index = index
        self.redact = redact

    def words(self, text: str) -> Text:
        return plain(text, self.redact)

    def compose(self) -> ComposeResult:
        yield Label("", classes="title")
        yield Static("", classes="ident")
        yield Static("", classes="step")
        yield ProgressBar(total=100, show_eta=False, show_percentage=False)
        yield Static("", classes="rate")
        yield Static("", classes="outcome")
        yield Static("", classes="action")

    def show(self, slot: Slot, selected: bool, labels_needed: bool, compact: bool = False) -> None:
        self.set_class(selected, "selected")
        for status in STATUS_WORD:
            self.set_class(slot.status == status, status)
        port = slot.port.rsplit("/", 1)[-1] if "://" in slot.port else slot.port
        self.query_one(".title", Label).update(self.words(f"{slot.index + 1}  {port}"))
        ident = (f"{one_line(slot.chip) or '-'}  {one_line(slot.mac) or '--:--:--:--:--:--'}\n"
                 f"SN {one_line(slot.serial or slot.scanned) or '-'}")
        self.query_one(".ident", Static).update(self.words(ident))
        step = slot.step if slot.status == "running" else ""
        waiting = slot.status == "waiting" and labels_needed and not slot.scanned
        bar = self.query_one(ProgressBar)
        pct = 100 * slot.done / slot.total if slot.total else (100 if slot.status == "passed" else 0)
        bar.update(progress=pct)
        rate = ""
        if slot.status == "running" and slot.total and slot.step == "flash":
            if compact:  # many slots: the rate shares the step's line
                eta = f" {slot.eta:.0f}s" if slot.eta is not None else ""
                rate = f"{_mb(slot.done)}/{_mb(slot.total)} MB {slot.rate / 1e3:.0f} kB/s{eta}"
            else:
                eta = f"  {slot.eta:.0f} s left" if slot.eta is not None else ""
                rate = f"{_mb(slot.done)}/{_mb(slot.total)} MB  {slot.rate / 1e3:.0f} kB/s{eta}"
        if compact:
            self.query_one(".step", Static).update(self.words(
                f"{step} {rate}".strip() if step else ("scan the label" if waiting else "")))
        else:
            self.query_one(".step", Static).update(self.words(
                f"step: {step}" if step else ("scan the label" if waiting else "")))
            self.query_one(".rate", Static).update(self.words(rate))
        word = STATUS_WORD[slot.status]
        if slot.result is not None and slot.result.quarantine:  # test credentials left on the unit
            word += " · QUARANTINE"
        self.query_one(".outcome", Static).update(self.words(word))
        action = ""
        if slot.status in ("failed", "aborted", "error") and compact:  # one line: what to do; the reason is in the log
            action = f"→ {slot.action}"
        elif slot.status in ("failed", "aborted", "error"):
            action = f"{slot.reason}\n→ {slot.action}"
        elif slot.status == "passed":
            action = f"→ {slot.action}"
        if slot.started is not None:
            action = f"{slot.elapsed:5.1f} s  {action}"
        self.query_one(".action", Static).update(self.words(action))


class TextPrompt(ModalScreen[str | None]):
    """Ask one thing (operator name, admin password, profile, lot)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, password: bool = False, value: str = "") -> None:
        super().__init__()
        self.question, self.password, self.value = question, password, value

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question)
            yield Input(value=self.value, password=self.password, id="answer")

    @on(Input.Submitted, "#answer")
    def submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "yes", "Yes"), Binding("n,escape", "no", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question)
            yield Label("[b]Y[/b] yes   [b]N[/b] no")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


def when(iso: str | None) -> str:
    """A recorded time (UTC, ISO) as the station's local date and time, to the second."""
    if not iso:
        return ""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    except ValueError:
        return iso  # not the station's own format: shown as it is (as plain text by the caller)


class HistoryScreen(Screen):
    """Every attempt, newest first; searched by serial, MAC (any common form) or device id."""

    BINDINGS = [Binding("escape,f2", "app.pop_screen", "Back")]
    DEFAULT_CSS = """
    HistoryScreen #history { height: 1fr; }
    """

    def __init__(self, line: Line, words: Callable[[str], Text]) -> None:
        super().__init__()
        self.line = line
        self.words = words

    def compose(self) -> ComposeResult:
        yield Label("History — search by serial, MAC or device id; Enter on a row shows it all; Esc goes back",
                    id="history-title")
        yield Input(placeholder="serial, MAC (aa:bb:…, AA-BB-…, aabb…) or device id", id="search")
        yield DataTable(id="history", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("#", "serial", "MAC", "result", "step", "ended", "operator", "lot", "message")
        self.fill("")
        self.query_one("#search", Input).focus()

    @on(Input.Changed, "#search")
    def search(self, event: Input.Changed) -> None:
        self.fill(event.value)

    @on(Input.Submitted, "#search")
    def to_rows(self) -> None:
        self.query_one(DataTable).focus()  # Enter from the search: down to the rows, Enter again opens one

    @on(DataTable.RowSelected, "#history")
    def open_row(self, event: DataTable.RowSelected) -> None:
        row = self.line.ctx.record.attempt(int(event.row_key.value))
        if row is not None:
            self.app.push_screen(AttemptScreen(row, self.words))

    def fill(self, query: str) -> None:
        table = self.query_one(DataTable)
        table.clear()
        w = self.words
        for r in self.line.history(query):
            # cells as Text: a DataTable parses plain strings as markup (and ":ab:" in a MAC as an emoji);
            # the message whole, last: the table scrolls sideways, the detail view wraps it
            table.add_row(str(r["id"]), w(r["serial"] or "-"), w(r["mac"] or "-"), r["outcome"].upper(),
                          w(r["failed_step"] or ""), w(when(r["ended_at"] or r["started_at"])),
                          w(one_line(r["operator"])), w(one_line(r["lot"])), w(one_line(r["error"])),
                          key=str(r["id"]))


class AttemptScreen(Screen):
    """One attempt, all of it: outcome, full reason and next action, times, step durations, regions."""

    BINDINGS = [Binding("escape,enter", "app.pop_screen", "Back")]
    DEFAULT_CSS = """
    AttemptScreen #attempt { height: 1fr; padding: 0 1; }
    """

    def __init__(self, row: dict, words: Callable[[str], Text]) -> None:
        super().__init__()
        self.row = row
        self.words = words

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="attempt"):
            yield Static(self.text(), id="attempt-text")
        yield Footer()

    def text(self) -> Text:
        r, w = self.row, self.words
        durations = r["durations"] or {}
        steps = [s for s in STEP_NAMES if s in durations] + sorted(set(durations) - set(STEP_NAMES))
        outcome = str(r["outcome"]).upper() + (f" at {r['failed_step']}" if r["failed_step"] else "")
        total = ""
        try:
            seconds = (datetime.fromisoformat(r["ended_at"]) - datetime.fromisoformat(r["started_at"]))
            total = f"   ({seconds.total_seconds():.1f} s)"
        except (TypeError, ValueError):
            pass
        lines: list[tuple[str, Text]] = [
            ("outcome", w(outcome)),
            ("reason", w(r["error"] or "-")),
            ("next action", w(r["remedy"] or "-")),
            ("serial", w(r["serial"] or "-")),
            ("MAC", w(r["mac"] or "-")),
            ("device id", w(r["device_id"] or "-")),
            ("chip", w(r["chip"] or "-")),
            ("firmware", w(r["firmware_version"] or "-")),
            ("operator", w(one_line(r["operator"]) or "-")),
            ("lot", w(one_line(r["lot"]) or "-")),
            ("station", w(r["station_id"] or "-")),
            ("port", w(r["port"] or "-")),
            ("profile", w(f"{r['profile']} ({(r['profile_hash'] or '')[:8]})")),
            ("started", w(when(r["started_at"]))),
            ("ended", w(when(r["ended_at"]) + total)),
            # no-break spaces inside each "step 1.23 s": a narrow screen wraps between steps, not in one
            ("steps", w("  ".join(f"{s}\u00a0{durations[s]:.2f}\u00a0s" for s in steps) or "-")),
            ("written", w(", ".join(r["written_regions"] or []) or "none")),
        ]
        if r.get("quarantine"):
            lines.insert(3, ("quarantine", Text("test credentials left on the unit: set it aside")))
        if r["detail"]:
            lines.append(("detail", w("\n" + r["detail"])))
        out = Text(f"Attempt {r['id']}\n", style="bold")
        for label, value in lines:
            out.append(f"{label:<12} ", style="bold")
            out.append_text(value)  # plain text (redacted, no control characters): never parsed as markup
            out.append("\n")
        return out


class StationApp(App):
    TITLE = "Provisioning station"
    CSS = """
    Screen { layout: vertical; }
    #header { height: 2; background: $boost; padding: 0 1; }
    #slots { grid-size: 4; grid-gutter: 0 1; height: 1fr; }
    .card { border: round $panel-lighten-2; padding: 0 1; height: 100%; }
    .card.selected { border: double $accent; }
    .card .title { text-style: bold; }
    .card .outcome { height: 3; content-align: center middle; text-style: bold; background: $panel; }
    .card.passed .outcome { background: green; color: white; }
    .card.failed .outcome { background: red; color: white; }
    .card.aborted .outcome { background: darkorange; color: black; }
    .card.error .outcome { background: magenta; color: white; }
    .card.running .outcome { background: $warning-darken-2; color: black; }
    .card.failed { border: round red; }
    .card.passed { border: round green; }
    .card .action { height: auto; }
    #bottom { height: 9; }
    #slots.compact .card .outcome { height: 1; }
    #slots.compact .card .rate { display: none; }
    #bottom.compact { height: 6; }
    #log { width: 1fr; border: round $panel-lighten-2; }
    #scan { width: 40; }
    #scan.refused { background: red; }
    #dialog { width: 60; height: auto; border: thick $accent; padding: 1 2; background: $surface; }
    TextPrompt, Confirm { align: center middle; }
    """
    BINDINGS = [
        Binding("f2", "history", "History"),
        Binding("f3", "select(-1)", "Prev slot"),
        Binding("f4", "select(1)", "Next slot"),
        Binding("f5", "retry", "Retry"),
        Binding("f7", "shift_change", "Shift"),
        Binding("f8", "abort", "Abort"),
        Binding("f9", "pause", "Pause"),
        Binding("f10", "admin", "Admin"),
        Binding("ctrl+q", "quit_station", "Quit", priority=True),
    ]

    def __init__(self, ctx: StationContext, ports: list[str], operator: str | None = None,
                 open_profile: Callable[[str], StationContext] | None = None, poll_interval: float = 0.2):
        super().__init__()
        self.line = Line(ctx, ports, self._changed, operator=operator or "")
        self.signalled: str | None = None  # the signal that ended the screen (SIGTERM, SIGHUP)
        self.ask_operator = operator is None
        self.open_profile = open_profile
        self.poll_interval = poll_interval
        self.selected = 0
        self.chosen: int | None = None  # a slot the operator picked for the next scan
        self.compact = False  # many slots: cards of one line per item
        self.crashed: str | None = None  # why the screen stopped on an error (redacted): the CLI exits 3

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static("", id="header")
        with Grid(id="slots"):
            for slot in self.line.slots:
                yield SlotCard(slot.index, self.redact)
        with Horizontal(id="bottom"):
            yield RichLog(id="log", max_lines=400, wrap=False)
            with Vertical(id="scan-box"):
                yield Label("Scan label")
                yield Input(placeholder="scan or type a serial", id="scan")
        yield Footer()

    def on_mount(self) -> None:
        # the main screen's widgets, kept: a dialog on top must not hide them from updates
        self.header_view = self.query_one("#header", Static)
        self.cards = {c.index: c for c in self.query(SlotCard)}
        self.log_view = self.query_one("#log", RichLog)
        self.slots_view = self.query_one("#slots")
        self.scan_field = self.query_one("#scan", Input)
        self._columns()
        for slot in self.line.slots:
            self._show(slot.index)
        self._header()
        if threading.current_thread() is threading.main_thread():
            self.install_signal_handlers()
        self.set_interval(self.poll_interval, self._poll)
        self.set_interval(1.0, self._tick)
        self.scan_field.focus()
        interrupted = self.line.ctx.record.unsettled_interrupted()
        if interrupted:  # boards that may hold a serial from a run the station did not finish
            who = ", ".join(f"{a['serial']} ({a['mac']})" for a in interrupted[:5])
            more = f" and {len(interrupted) - 5} more" if len(interrupted) > 5 else ""
            self.tell(f"{len(interrupted)} unit(s) were interrupted: {who}{more}. Put each back on the "
                      "line: a new attempt keeps its serial.", severity="warning", timeout=30)
        if self.ask_operator:  # no unit starts until someone signs in
            self.line.blocked()
            self.push_screen(TextPrompt("Operator: type your name or scan your badge"), self._set_operator)

    def on_resize(self) -> None:
        self._columns()

    # -- text that is not ours ---------------------------------------------------------------------
    def redact(self, text: str) -> str:
        return self.line.ctx.redactor(text)  # the current station's (a profile switch brings its own)

    def words(self, text: str | None, style: str = "") -> Text:
        return plain(text, self.redact, style)

    def tell(self, text: str, **kw) -> None:
        """A notification with words from outside (a scan, an exception): plain text, no markup."""
        self.notify(safe_text(self.redact(text)), markup=False, **kw)

    def _handle_exception(self, error: Exception) -> None:
        # Textual would print a traceback with each frame's locals: the station's secrets are among them
        self.crashed = safe_text(self.redact("".join(traceback.format_exception(error)).rstrip()))
        self.line.shutdown()  # the running units end as aborted; on_unmount waits for their records
        super()._handle_exception(error)

    def _fatal_error(self) -> None:
        self.bell()
        self._close_messages_no_wait()  # the reason is in self.crashed, printed by the CLI without locals

    def _columns(self) -> None:
        n = len(self.line.slots)
        cols = 4 if self.size.width >= 140 else 2
        if hasattr(self, "slots_view"):
            self.slots_view.styles.grid_size_columns = min(cols, max(1, n))
            compact = -(-n // cols) >= 3  # three rows of cards or more (16 ports): one line each
            if compact != self.compact:
                self.compact = compact
                self.slots_view.set_class(compact, "compact")
                self.query_one("#bottom").set_class(compact, "compact")
                for slot in self.line.slots:
                    self._show(slot.index)

    def _set_operator(self, name: str | None) -> None:
        """The prompt's answer: a name signs in (in the record, as who took over); Esc changes nothing."""
        old = self.line.operator
        if name:
            self.line.operator = name  # the line keeps one printable line of it
            if not self.line.operator:
                self.line.operator = old  # nothing printable in it: not a name
        new = self.line.operator
        if new and new != old:
            try:
                self.line.ctx.record.log_admin("shift", new, {"took_over_from": old or None})
            except RecordError as exc:  # the attempts carry the name anyway; say that the change is not in the chain
                self.tell(f"the shift change is not in the record: {exc.message}", severity="error", timeout=10)
            self.tell(f"operator {new}", timeout=3)
        self.line.blocked()  # the header's banner follows at once, boards or not
        if not new:
            self.bell()
            self.notify(NO_OPERATOR, severity="warning", timeout=30)
        self._header()

    def action_shift_change(self) -> None:
        if isinstance(self.screen, TextPrompt):
            return  # already asking (the start's prompt, or F7 twice)
        self.push_screen(TextPrompt("Shift change: the new operator types a name or scans a badge"),
                         self._set_operator)

    # -- the line's state on screen ------------------------------------------------------------------
    def _changed(self, index: int) -> None:
        self.post_message(SlotChanged(index))  # from worker threads; merged when they come fast

    def on_slot_changed(self, message: SlotChanged) -> None:
        self._show(message.index)
        self._header()

    def _show(self, index: int) -> None:
        slot = self.line.slots[index]
        card = self.cards[index]
        if not card.is_attached:
            return  # the screen is closing; the line's last changes have nowhere to go
        card.show(slot, index == self.selected, self.line.labels_needed, self.compact)
        if index == self.selected:
            self._log()

    def _log(self) -> None:
        log = self.log_view
        log.border_title = f"slot {self.selected + 1}: events and boot log"
        log.clear()
        for text in list(self.line.slots[self.selected].log)[-60:]:
            log.write(self.words(text))

    def _header(self) -> None:
        line, prof = self.line, self.line.ctx.profile
        y = f"{line.yield_pct:.0f}%" if line.yield_pct is not None else "-"
        cyc = f"{line.mean_cycle:.1f} s" if line.mean_cycle is not None else "-"

        def say(text: str | None) -> str:
            return safe_text(self.redact(one_line(text)))
        # our styles around names we did not write (operator, lot, profile): assembled, never parsed as markup
        header = Content.assemble(
            "profile ", (say(prof.name), "bold"), f" ({say(prof.title)}) · fw {say(prof.firmware_version()) or '?'}"
            f" · config {prof.content_hash[:8]}   station ", (say(line.ctx.station.station_id), "bold"),
            " · operator ", (say(line.operator) or "-", "bold"), " · lot ", (say(line.lot) or "-", "bold"),
            *(("  ", (" PAUSED ", "reverse")) if line.paused else ()), "\n",
            (f"PASS {line.passed}", "green"), "  ", (f"FAIL {line.failed}", "red"),
            f"  yield {y}  {line.units_per_hour:.0f} units/h  cycle {cyc}",
            *(("  ", (f" NOT STARTING UNITS: {say(line.refusal)} ", "reverse red")) if line.refusal else ()))
        self.header_view.update(header)

    def _poll(self) -> None:
        self.line.poll()

    def _tick(self) -> None:
        for slot in self.line.slots:
            if slot.status == "running":
                self._show(slot.index)
        self._header()

    # -- scanner -----------------------------------------------------------------------------------
    @on(Input.Submitted, "#scan")
    def scanned(self, event: Input.Submitted) -> None:
        field = event.input
        ok, msg = self.line.scan(event.value, self.chosen)
        field.value = ""
        self.chosen = None
        if ok:
            self.tell(msg, timeout=3)
        else:
            self.bell()
            field.add_class("refused")
            self.set_timer(1.0, lambda: field.remove_class("refused"))
            self.tell(msg, severity="error", timeout=5)

    # -- keys ------------------------------------------------------------------------------------------
    def action_select(self, step: int) -> None:
        old = self.selected
        self.selected = (self.selected + step) % len(self.line.slots)
        self.chosen = self.selected
        self._show(old)
        self._show(self.selected)

    def action_retry(self) -> None:
        if not self.line.retry(self.selected):
            self.bell()

    def action_abort(self) -> None:
        if not self.line.abort(self.selected):
            self.bell()

    def action_pause(self) -> None:
        paused = self.line.toggle_pause()
        self.notify("auto-start paused" if paused else "auto-start resumed")
        self._header()

    def action_history(self) -> None:
        self.push_screen(HistoryScreen(self.line, self.words))

    def _admin_gate(self) -> AdminGate:
        """One gate per screen, so the delay after wrong tries holds across F10 presses."""
        if getattr(self, "_admin", None) is None:
            self._admin = AdminGate.for_station(self.line.ctx.station)
        return self._admin

    @work
    async def action_admin(self) -> None:
        gate = self._admin_gate()
        why = gate.locked()
        if why:
            self.notify(why, severity="error")
            return
        pw = await self.push_screen_wait(TextPrompt("Admin password", password=True))
        if pw is None:
            return
        # scrypt takes up to a second: in a thread worker, so the cards keep moving
        check = await self.run_worker(lambda: gate.check(pw), thread=True, exit_on_error=False).wait()
        if not check.ok:
            self.bell()
            self.notify(check.message, severity="error")
            return
        if self.line.running():
            self.notify("wait until no slot is running", severity="error")
            return
        name = await self.push_screen_wait(TextPrompt("Profile", value=self.line.ctx.profile.name))
        lot = await self.push_screen_wait(TextPrompt("Lot", value=self.line.lot))
        try:
            ctx = self.open_profile(name) if name and self.open_profile and name != self.line.ctx.profile.name \
                else None
            self.line.switch(ctx, lot if lot is not None else None)
            self.line.ctx.record.log_admin("switch", self.line.operator,  # in the chain: who switched what
                                           {"profile": self.line.ctx.profile.name, "lot": self.line.lot})
        except Exception as exc:  # a bad profile must not close the screen
            self.tell(f"not switched: {exc}", severity="error", timeout=8)
            return
        self.tell(f"profile {self.line.ctx.profile.name}, lot {self.line.lot}")
        self._header()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGHUP quit like Ctrl+Q answered "yes": running units are aborted and recorded."""
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda name=sig.name: self.run_worker(self._quit_on_signal(name)))

    async def _quit_on_signal(self, name: str) -> None:
        self.signalled = name
        self.line.shutdown()
        while self.line.running():  # each aborted run records itself, then leaves "running"
            await asyncio.sleep(0.05)
        self.exit()

    def on_unmount(self) -> None:
        self.line.close()  # runs still going end as aborted; no unit thread outlives the screen
        with contextlib.suppress(Exception):  # the session's units are recorded; the next run signs the chain
            from .audit import write_checkpoint

            write_checkpoint(self.line.ctx.record, self.line.ctx.station, "screen session")
            self.line.ctx.record.close()

    @work
    async def action_quit_station(self) -> None:
        if self.line.running():
            sure = await self.push_screen_wait(Confirm(f"{len(self.line.running())} slot(s) are working. "
                                                       "Abort them and quit?"))
            if not sure:
                return
            self.line.shutdown()
            while self.line.running():  # each aborted run records itself, then leaves "running"
                await asyncio.sleep(0.05)
        self.exit()
