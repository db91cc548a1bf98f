"""The operator's screen: one card per fixture slot, its outcome at a glance at any terminal size.

A thin Textual front end over `station.line.Line`: it shows the slots and passes
the operator's keys and scans on; the line does the work in thread workers, so a
hung port never freezes the screen. Keys are function keys (a barcode scanner types
into the scan field): F2 history (Enter on a row: its detail), F3/F4 choose a slot, F5 retry,
F6 start the selected slot, F7 shift change, F8 abort, F9 pause (a PAUSED band across the
screen), F10 admin (switch profile or lot), Ctrl+Q quit. No unit starts until an operator has
signed in (typed or badge-scanned at the prompt). What a card and the header show in each size
is `station.layout`.

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
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Label, RichLog, Static

from .admin import AdminGate
from .layout import COLOURS, WORDS, SlotView, card_text, header_lines
from .line import NO_OPERATOR, Line, Slot
from .pipeline import STEP_NAMES, StationContext
from .record import RecordError
from .secrets import NO_SECRETS
from .text import one_line, safe_text

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


class CardBody(Static):
    """The card's lines, laid out for the size it has now (`station.layout.card_lines`)."""

    view: SlotView | None = None

    def render(self) -> Text:
        if self.view is None:
            return Text("")
        return card_text(self.view, self.content_size.width, self.content_size.height)


class SlotCard(Vertical):
    def __init__(self, index: int, redact: Callable[[str], str] = NO_SECRETS) -> None:
        super().__init__(id=f"slot-{index}", classes="card")
        self.index = index
        self.redact = redact
        # made here, not found by a query: the line's timer may show a slot before the card's children
        # are mounted (or after they are gone); the body keeps the view and draws it once it is there
        self.body = CardBody("", classes="body")

    def words(self, text: str | None) -> str:
        return one_line(self.redact(text or ""))

    def compose(self) -> ComposeResult:
        yield self.body

    def view(self, slot: Slot, selected: bool, labels_needed: bool, paused: bool = False) -> SlotView:
        """The slot as data, its texts redacted and on one line (a board's text never adds lines)."""
        w = self.words
        port = slot.port.rsplit("/", 1)[-1] if "://" in slot.port else slot.port.removeprefix("/dev/")
        progress, short, fraction = "", "", None
        if slot.status == "running":
            fraction = slot.done / slot.total if slot.total else 0.0
            progress = short = f"step: {slot.step}" if slot.step else "starting"
            if slot.total and slot.step == "flash":
                eta = f"  {slot.eta:.0f} s left" if slot.eta is not None else ""
                progress += f"  {_mb(slot.done)}/{_mb(slot.total)} MB  {slot.rate / 1e3:.0f} kB/s{eta}"
                eta = f" {slot.eta:.0f} s" if slot.eta is not None else ""
                short = f"flash {100 * fraction:.0f}% {slot.rate / 1e3:.0f} kB/s{eta}"
        hint = ""
        if slot.status == "waiting":
            hint = "scan the label" if labels_needed and not slot.scanned else (
                "paused: F6 starts it" if paused else "")
        return SlotView(
            number=slot.index + 1, port=w(port), status=slot.status, serial=w(slot.serial or slot.scanned),
            chip=w(slot.chip), mac=w(slot.mac), progress=w(progress), progress_short=w(short), fraction=fraction,
            elapsed=slot.elapsed if slot.started is not None else None, reason=w(slot.reason),
            action=w(slot.action), hint=hint, selected=selected,
            flag="QUARANTINE" if slot.result is not None and slot.result.quarantine else "")

    @property
    def view_shown(self) -> SlotView | None:
        """The view the card shows now (before it is laid out in lines)."""
        return self.body.view

    def show(self, slot: Slot, selected: bool, labels_needed: bool, paused: bool = False) -> None:
        self.set_class(selected, "selected")
        for status in WORDS:
            self.set_class(slot.status == status, status)
        self.body.view = self.view(slot, selected, labels_needed, paused)
        if self.body.is_attached:
            self.body.refresh()


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


SLOT_KEYS = Binding.Group("Slot")  # F3 F4 share one word in the footer
BOTTOM_LOG_ROWS = 9  # the selected slot's log beside the scan field, when the cards can spare it
ROOMY_CARD_LINES = 12  # inner lines a card keeps before the log may take rows from it
TINY_CARD_ROWS = 8  # cards lower than this drop their border (16 slots at 100x30)


class StationApp(App):
    TITLE = "Provisioning station"
    CSS = """
    Screen { layout: vertical; }
    #header { height: auto; background: $boost; padding: 0 1; }
    #paused { height: 1; width: 100%; display: none; content-align: center middle; text-style: bold;
              background: $warning; color: black; }
    #paused.on { display: block; }
    #slots { grid-size: 4; grid-gutter: 0 1; height: 1fr; }
    .card { border: round $panel-lighten-2; padding: 0 1; height: 100%; background: $panel; }
    .card .body { height: 1fr; width: 1fr; }
    .card.selected { border: double $accent; }
    .card.passed { background: #1b7f3b; color: white; border: round white; }
    .card.failed { background: #c62828; color: white; border: round white; }
    .card.aborted { background: #ff8c00; color: black; border: round black; }
    .card.error { background: #b0279b; color: white; border: round white; }
    .card.passed.selected, .card.failed.selected, .card.error.selected { border: double white; }
    .card.aborted.selected { border: double black; }
    #slots.tiny .card { border: none; padding: 0 1; }
    #bottom { height: 9; }
    #log { width: 1fr; border: round $panel-lighten-2; }
    #scan { width: 40; }
    #scan.refused { background: red; }
    #bottom.slim { height: 1; }
    #bottom.slim #log { display: none; }
    #bottom.slim #scan-box { layout: horizontal; width: 1fr; }
    #bottom.slim #scan-box Label { width: auto; padding: 0 1; }
    Footer.-compact FooterLabel { margin: 0 1 0 0; }
    #dialog { width: 60; height: auto; border: thick $accent; padding: 1 2; background: $surface; }
    TextPrompt, Confirm { align: center middle; }
    """
    # F keys, because a barcode scanner types into the scan field; short words, so 80 columns show every key
    BINDINGS = [
        Binding("f2", "history", "History", key_display="F2"),
        Binding("f3", "select(-1)", "Prev slot", key_display="F3", group=SLOT_KEYS),
        Binding("f4", "select(1)", "Next slot", key_display="F4", group=SLOT_KEYS),
        Binding("f5", "retry", "Retry", key_display="F5"),
        Binding("f6", "start", "Start", key_display="F6"),
        Binding("f7", "shift_change", "Shift", key_display="F7"),
        Binding("f8", "abort", "Abort", key_display="F8"),
        Binding("f9", "pause", "Pause", key_display="F9"),
        Binding("f10", "admin", "Admin", key_display="F10", show=False),  # for the line's admin, not operators
        Binding("ctrl+q", "quit_station", "Quit", key_display="^Q", priority=True),
    ]
    ENABLE_COMMAND_PALETTE = False  # its Quit would skip the question; its themes are not the line's business

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
        self.compact = False  # cards too low to spare rows for the log: the scan field alone at the bottom
        self._header_rows = 2
        self.crashed: str | None = None  # why the screen stopped on an error (redacted): the CLI exits 3

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static("", id="header")
        yield Static("PAUSED · no board starts by itself · F9 resumes · F6 starts the selected slot", id="paused")
        with Grid(id="slots"):
            for slot in self.line.slots:
                yield SlotCard(slot.index, self.redact)
        with Horizontal(id="bottom"):
            yield RichLog(id="log", max_lines=400, wrap=False)
            with Vertical(id="scan-box"):
                yield Label("Scan label")
                yield Input(placeholder="scan or type a serial", id="scan")
        yield Footer(compact=True)  # every key and its word in 80 columns

    def on_mount(self) -> None:
        # the main screen's widgets, kept: a dialog on top must not hide them from updates
        self.header_view = self.query_one("#header", Static)
        self.cards = {c.index: c for c in self.query(SlotCard)}
        self.log_view = self.query_one("#log", RichLog)
        self.slots_view = self.query_one("#slots")
        self.scan_field = self.query_one("#scan", Input)
        self.paused_view = self.query_one("#paused", Static)
        self._header()
        self._columns()
        for slot in self.line.slots:
            self._show(slot.index)
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
        self._header()
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
        """Cards, log and scan field shared out for this size: every card keeps its number, state, serial,
        and on FAIL/ERROR the reason and next action; the log only takes rows the cards can spare."""
        if not hasattr(self, "slots_view"):
            return
        n = len(self.line.slots)
        width, height = self.size
        cols = max(1, min(n, 4 if width >= 140 or n > 8 else 2))
        rows = max(1, -(-n // cols))  # a screen may open with no fixture port at all
        free = height - self._header_rows - self.line.paused - 1  # the footer's row
        compact = (free - BOTTOM_LOG_ROWS) // rows - 2 < ROOMY_CARD_LINES
        tiny = (free - (1 if compact else BOTTOM_LOG_ROWS)) // rows < TINY_CARD_ROWS
        self.slots_view.styles.grid_size_columns = cols
        self.slots_view.set_class(tiny, "tiny")
        self.query_one("#bottom").set_class(compact, "slim")
        self.scan_field.compact = compact
        self.slots_view.set_class(compact, "compact")
        self.compact = compact

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
        card.show(slot, index == self.selected, self.line.labels_needed, self.line.paused)
        if index == self.selected:
            self._log()

    def _log(self) -> None:
        log = self.log_view
        log.border_title = f"slot {self.selected + 1}: events and boot log"
        log.clear()
        for text in list(self.line.slots[self.selected].log)[-60:]:
            log.write(self.words(text))

    def _header(self) -> None:
        if not hasattr(self, "header_view"):
            return  # a resize before the screen is mounted
        line, prof = self.line, self.line.ctx.profile
        y = f"{line.yield_pct:.0f}%" if line.yield_pct is not None else "-"
        cyc = f"{line.mean_cycle:.1f} s" if line.mean_cycle is not None else "-"

        def say(text: str | None) -> str:
            return safe_text(self.redact(one_line(text)))

        def named(label: str, name: str | None, rest: str = "") -> Text:
            # our styles around names we did not write (operator, lot, profile): assembled, never parsed as markup
            return Text.assemble(label, (say(name) or "-", "bold"), rest)

        def count(word: str, status: str, n: int) -> Text:
            fg, bg = COLOURS[status]
            return Text(f" {word} {n} ", style=f"bold {fg} on {bg}")

        groups = [
            (True, " · ", [named("profile ", prof.name, f" ({say(prof.title)})"),
                           Text(f"fw {say(prof.firmware_version()) or '?'}"), Text(f"config {prof.content_hash[:8]}")]),
            (False, " · ", [named("station ", line.ctx.station.station_id), named("operator ", line.operator),
                            named("lot ", line.lot), *self._central()]),
            (True, "  ", [count("PASS", "passed", line.passed), count("FAIL", "failed", line.failed),
                          count("ABORTED", "aborted", line.aborted), count("ERROR", "error", line.errors),
                          Text(f"yield {y}"), Text(f"{line.units_per_hour:.0f} units/h"), Text(f"cycle {cyc}")]),
            (False, "", [Text(f" NOT STARTING UNITS: {say(line.refusal)} ", style="reverse red")
                         if line.refusal else Text("")]),
        ]
        lines = header_lines(groups, max(self.size.width - 2, 20))
        self.header_view.update(Text("\n").join(lines))
        self.paused_view.set_class(line.paused, "on")
        if len(lines) != self._header_rows:  # a folded header takes its rows from the cards
            self._header_rows = len(lines)
            self._columns()

    def _central(self) -> list[Text]:
        central = self.line.ctx.central
        if central is None:
            return []  # a station alone: nothing to say
        words, warn = central.words()
        return [Text(f" {words} ", style="reverse yellow") if warn else Text(words)]

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

    def action_start(self) -> None:
        why = self.line.start_manually(self.selected)
        if why:
            self.bell()
            self.tell(why, severity="warning", timeout=4)

    def action_pause(self) -> None:
        self.line.toggle_pause()  # the PAUSED band says it (a toast would cover a card)
        self._header()
        self._columns()  # the PAUSED band takes a row
        for slot in self.line.slots:
            self._show(slot.index)

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
