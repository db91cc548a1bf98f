"""What the pipeline tells its front ends: small frozen events through one callback.

The CLI writes them as JSON lines, the operator's screen turns them into messages,
the tests collect them in a list. Every event leaves the pipeline through
`redacting` (station/secrets.py's filter over each of its texts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Union


@dataclass(frozen=True)
class UnitResult:
    port: str
    outcome: str  # passed | failed | aborted | error (the station's fault) — station.record.Outcome
    failed_step: str | None = None
    error: str | None = None
    remedy: str | None = None
    mac: str | None = None
    serial: str | None = None
    device_id: str | None = None
    chip: str | None = None
    firmware_version: str | None = None
    durations: dict[str, float] = field(default_factory=dict)
    attempt_id: int | None = None
    written_regions: tuple[str, ...] = ()
    note: str | None = None
    recorded: str = "database"  # where the attempt went: database | spool | lost
    quarantine: bool = False  # the unit still holds the factory's test credentials: set it aside

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


@dataclass(frozen=True)
class StepStarted:
    port: str
    step: str


@dataclass(frozen=True)
class StepFinished:
    port: str
    step: str
    seconds: float
    ok: bool


@dataclass(frozen=True)
class Progress:
    port: str
    step: str
    done: int
    total: int
    region: str = ""


@dataclass(frozen=True)
class LogLine:
    port: str
    source: str  # "esptool" | "boot"
    text: str


@dataclass(frozen=True)
class UnitInfo:
    """What is known of the unit so far: after connect (MAC, chip), after the serial step."""

    port: str
    mac: str | None = None
    chip: str | None = None
    serial: str | None = None


@dataclass(frozen=True)
class UnitFinished:
    port: str
    result: UnitResult


Event = Union[StepStarted, StepFinished, Progress, LogLine, UnitInfo, UnitFinished]
Emit = Callable[[Event], None]

_NAMES = {StepStarted: "step_started", StepFinished: "step_finished", Progress: "progress",
          LogLine: "log", UnitInfo: "unit_info", UnitFinished: "unit_finished"}


def to_json_dict(event: Event) -> dict:
    d = asdict(event)
    if isinstance(event, UnitFinished):
        d = {"port": event.port, **asdict(event.result)}
    return {"event": _NAMES[type(event)], **d}


KEEP_AS_GIVEN = ("port",)  # a port is the unit's address as the caller gave it: the key they match results by


def map_text(event: Event, fn: Callable[[str], str]) -> Event:
    """The same event with `fn` applied to each of its texts (and its result's), the port kept as given."""
    changes = {}
    for f in fields(event):
        value = getattr(event, f.name)
        if isinstance(value, UnitResult):
            changes[f.name] = map_text(value, fn)
        elif isinstance(value, str) and f.name not in KEEP_AS_GIVEN:
            changes[f.name] = fn(value)
    return replace(event, **changes) if changes else event


def redacting(emit: Emit, redact: Callable[[str], str]) -> Emit:
    """`emit`, behind the station's redaction filter: no event carries a secret out."""
    return lambda event: emit(map_text(event, redact))
