"""The production line at one station: slots, hot-plug, auto-start, scans, counters.

Headless: the operator's screen shows it and drives it, the tests drive it too.
Each slot is a fixture port. A board arriving on a port starts its run by itself
(unless paused, or the profile takes serials from labels and none was scanned yet);
a board pulled mid-run ends it as aborted, whoever notices first (the line's poll, or
esptool reading from the vanished port). Runs go to the station's unit threads, one per
slot at the most (not a GUI toolkit's worker pool, which may run only a few at once),
and report through `on_change(slot_index)`. The line owns the station contexts it
is given: a switch closes the one it replaces, and `close()` the current one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from flashing.ports import present

from .events import Event, LogLine, Progress, StepStarted, UnitFinished, UnitInfo, UnitResult
from .record import RecordError
from .runner import min_free_mb
from .text import one_line
from .pipeline import StationContext, UnitJob, clean_serial, provision_unit, serial_max_length

LOG_LINE_CHARS = 1000  # of one console or esptool line kept for the screen (the record keeps its own detail)
NO_OPERATOR = "no operator: press F7 to sign in"
OPERATOR_CHARS = 64  # a name or a badge's id; a scanner that keeps typing does not fill the record


class RunCancel(threading.Event):
    """A run's cancel: set by an abort, and reads as set once the slot's board is gone.

    So a pulled board ends its run as aborted even when esptool's read on the vanished
    port fails before the line's next poll has seen the board go.
    """

    def __init__(self, port: str):
        super().__init__()
        self.port = port

    def is_set(self) -> bool:
        return super().is_set() or not present(self.port)

    @property
    def reason(self) -> str:
        if not present(self.port):
            return "the board was pulled out mid-run"
        return "aborted by the operator"


@dataclass
class Slot:
    index: int
    port: str
    status: str = "empty"  # empty | waiting | running | passed | failed | aborted | error
    step: str = ""
    mac: str | None = None
    chip: str | None = None
    serial: str | None = None
    scanned: str | None = None  # serial from a label, waiting for its board
    done: int = 0
    total: int = 0
    rate: float = 0.0  # bytes per second while flashing
    started: float | None = None
    ended: float | None = None
    result: UnitResult | None = None
    present: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    log: deque = field(default_factory=lambda: deque(maxlen=400))
    _progress_t: tuple[float, int] | None = None

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started

    @property
    def eta(self) -> float | None:
        if self.rate > 0 and self.total:
            return (self.total - self.done) / self.rate
        return None

    @property
    def reason(self) -> str:
        r = self.result
        if not r or r.passed:
            return ""
        return ": ".join(t for t in (r.failed_step, r.error) if t)

    @property
    def action(self) -> str:
        r = self.result
        if not r or r.passed:
            return "swap in the next board" if r else ""
        # one source of advice: what the record says to do (an abort's too)
        return r.remedy or ("put the board back and start it again" if r.outcome == "aborted" else "retry")


class Line:
    def __init__(self, ctx: StationContext, ports: list[str], on_change: Callable[[int], None],
                 spawn: Callable[[Callable[[], None]], None] | None = None, operator: str = "",
                 lot: str = ""):
        self.ctx = ctx
        self.slots = [Slot(i, p) for i, p in enumerate(ports)]
        self.on_change = on_change
        self.spawn = spawn or (lambda fn: self.ctx.workers(len(self.slots)).submit(fn))
        self.operator = operator  # no unit starts until someone is signed in
        self.lot = lot or ctx.station.lot or ctx.profile.lot
        self.paused = False
        self.refusal: str | None = None  # why units may not start (shown in the header)
        self.lock = threading.Lock()
        self.passed = 0
        self.failed = 0
        self.aborted = 0
        self.errors = 0  # the station's fault (database, disk, a bug): not the boards', not in the yield
        self.cycles: list[float] = []
        self.opened = time.monotonic()

    # -- counters -------------------------------------------------------------------------
    @property
    def yield_pct(self) -> float | None:
        """Boards that passed of the boards tested: aborts and the station's errors say nothing of a board."""
        n = self.passed + self.failed
        return 100.0 * self.passed / n if n else None

    @property
    def units_per_hour(self) -> float:
        hours = max(time.monotonic() - self.opened, 1.0) / 3600
        return self.passed / hours

    @property
    def mean_cycle(self) -> float | None:
        return sum(self.cycles) / len(self.cycles) if self.cycles else None

    @property
    def operator(self) -> str:
        return self._operator

    @operator.setter
    def operator(self, name: str | None) -> None:
        # typed or badge-scanned: one line of printable text (a scanner's CR, GS or ESC is not a name)
        self._operator = one_line(name or "").strip()[:OPERATOR_CHARS].strip()

    @property
    def labels_needed(self) -> bool:
        return self.ctx.profile.serial_pattern is None

    def running(self) -> list[Slot]:
        return [s for s in self.slots if s.status == "running"]

    # -- hot-plug -----------------------------------------------------------------------------
    def poll(self) -> None:
        """Look at every port: start runs on boards that arrived, abort runs whose board left."""
        for slot in self.slots:
            here = present(slot.port)
            if here and not slot.present:
                slot.present = True
                if slot.status in ("empty", "passed", "failed", "aborted", "error"):
                    self._reset(slot, "waiting")
                self.on_change(slot.index)
            elif not here and slot.present:
                slot.present = False
                if slot.status == "running":
                    slot.cancel.set()  # the board was pulled: the run ends as aborted
                elif slot.status == "waiting":
                    slot.status = "empty"
                self.on_change(slot.index)
            if slot.status == "waiting" and slot.present and not self.paused and not self.blocked():
                if not self.labels_needed or slot.scanned:
                    self.start(slot.index)

    def blocked(self) -> str | None:
        """Why no unit may start now (no operator signed in, the record's disk nearly full), else None."""
        why = None if self.operator else NO_OPERATOR
        if why is None:
            try:
                self.ctx.record.check_free_space(min_free_mb(self.ctx.station))
            except RecordError as exc:
                why = exc.message
        if self.refusal != why:
            self.refusal = why
            for slot in self.slots:
                self.on_change(slot.index)
        return why

    def _reset(self, slot: Slot, status: str) -> None:
        slot.status, slot.step, slot.result = status, "", None
        slot.mac = slot.chip = slot.serial = None
        slot.done = slot.total = 0
        slot.rate = 0.0
        slot.started = slot.ended = None
        slot.cancel = RunCancel(slot.port)
        slot.log.clear()

    # -- operator actions ---------------------------------------------------------------------
    def start(self, index: int) -> bool:
        slot = self.slots[index]
        if not self.operator:  # every attempt carries who ran it: none without a sign-in
            self.blocked()
            return False
        with self.lock:
            if slot.status == "running":
                return False
            self._reset(slot, "running")
            slot.started = time.monotonic()
        job = UnitJob(slot.port, serial=slot.scanned, operator=self.operator, lot=self.lot)
        slot.scanned = None
        cancel = slot.cancel
        self.on_change(index)
        self.spawn(lambda: provision_unit(job, self.ctx, lambda e: self._event(slot, e), cancel))
        return True

    def retry(self, index: int) -> bool:
        slot = self.slots[index]
        if slot.status not in ("failed", "aborted", "error") or not present(slot.port):
            return False
        if self.labels_needed and slot.result and slot.result.serial:
            slot.scanned = slot.result.serial
        return self.start(index)

    def abort(self, index: int) -> bool:
        slot = self.slots[index]
        if slot.status != "running":
            return False
        slot.cancel.set()
        return True

    def start_manually(self, index: int) -> str | None:
        """The operator starts a waiting board (auto-start paused, or it waits); why not, in words, else None."""
        slot = self.slots[index]
        n = index + 1
        if slot.status == "running":
            return f"slot {n} is already working"
        if not present(slot.port):
            return f"slot {n} has no board"
        if slot.status in ("passed", "failed", "aborted", "error"):
            return f"slot {n} has finished: put the next board in, or F5 to retry it"
        if self.labels_needed and not slot.scanned:
            return f"slot {n} waits for its label: scan it first"
        why = self.blocked()
        if why:
            return why
        return None if self.start(index) else f"slot {n} is already working"

    def toggle_pause(self) -> bool:
        self.paused = not self.paused
        return self.paused

    def scan(self, serial: str, index: int | None = None) -> tuple[bool, str]:
        """A label scanned: give it to the chosen slot or the next board waiting for one."""
        try:  # a scanner's control codes (GS, ESC) or a label too long for the config: refused like --serial
            serial = clean_serial(serial, serial_max_length(self.ctx.profile))
        except ValueError as exc:
            return False, f"label refused: {exc}"
        if self.ctx.record.serial_taken(serial) or any(
                s.scanned == serial or (s.status == "running" and s.serial == serial) for s in self.slots):
            return False, f"serial {serial} is already used"
        candidates = [self.slots[index]] if index is not None else [
            s for s in self.slots if s.status in ("waiting", "empty") and not s.scanned]
        for slot in sorted(candidates, key=lambda s: (s.status != "waiting", s.index)):
            if slot.status in ("waiting", "empty") and not slot.scanned:
                slot.scanned = serial
                self.on_change(slot.index)
                return True, f"{serial} -> slot {slot.index + 1}"
        return False, "no board is waiting for a label"

    def history(self, query: str = "", limit: int = 200) -> list[dict]:
        return self.ctx.record.history(query, limit)

    def switch(self, ctx: StationContext | None = None, lot: str | None = None) -> None:
        if self.running():
            raise RuntimeError("wait until no slot is running")
        if ctx is not None:
            old, self.ctx = self.ctx, ctx
            old.close()
        if lot is not None:
            self.lot = lot

    def shutdown(self) -> None:
        for slot in self.running():
            slot.cancel.set()

    def close(self) -> None:
        """Abort the runs still going, wait until they have recorded themselves, end the unit threads."""
        self.shutdown()
        self.ctx.close()

    # -- events from the pipeline (worker threads) -------------------------------------------------
    def _event(self, slot: Slot, e: Event) -> None:
        if isinstance(e, StepStarted):
            slot.step = e.step
            slot.log.append(f"-- {e.step}")
        elif isinstance(e, Progress):
            now = time.monotonic()
            if slot._progress_t and e.done > slot._progress_t[1]:
                t0, d0 = slot._progress_t
                if now - t0 > 0.2:
                    slot.rate = (e.done - d0) / (now - t0)
                    slot._progress_t = (now, e.done)
            elif not slot._progress_t:
                slot._progress_t = (now, e.done)
            slot.done, slot.total = e.done, e.total
        elif isinstance(e, LogLine):
            slot.log.append(e.text[:LOG_LINE_CHARS])  # a board's endless line must not grow the screen's log
        elif isinstance(e, UnitFinished):
            r = e.result
            slot.result = r
            slot.mac, slot.chip, slot.serial = r.mac, r.chip, r.serial
            slot.ended = time.monotonic()
            slot.status = r.outcome
            slot.step = ""
            with self.lock:
                if r.passed:
                    self.passed += 1
                    self.cycles.append(slot.elapsed)
                elif r.outcome == "failed":
                    self.failed += 1
                elif r.outcome == "aborted":
                    self.aborted += 1
                elif r.outcome == "error":
                    self.errors += 1
            slot.log.append(f"== {r.outcome.upper()} {r.error or ''}")
        elif isinstance(e, UnitInfo):
            slot.mac, slot.chip = e.mac or slot.mac, e.chip or slot.chip
            slot.serial = e.serial or slot.serial
        self.on_change(slot.index)
