"""Serial-number patterns: the one place a pattern is checked and rendered.

A pattern is text with placeholders in braces, as in `RLY-{yymmdd}-{seq:05}`:
`{yymmdd}`, `{yyyymmdd}`, `{yy}`, `{mm}`, `{dd}` (the day the unit is provisioned),
`{station}` (the provisioning station's id, station.toml `station_id`) and
`{seq}` (the station's persistent counter, first value 1) with an optional integer format
spec (`{seq:05}`, `{seq:x}`). Dates and `{station}` take no format spec. Literal braces
are written `{{` and `}}`.

The counter's name is the pattern rendered up to `{seq}`: a new day (with `{yymmdd}`
before it) or another station (with `{station}` before it) counts on its own.

The counter's maximum is the largest number the spec's width holds: 10**N - 1 for
`{seq:0N}` (16**N - 1 for `{seq:0Nx}`); without a width it is 10**9 - 1. Past it the
pattern renders nothing (`SerialPatternError`), so a serial never grows past what the
profile checked against the config key's `max_length`. A station id has no fixed width:
`longest(station)` is the longest serial on that station, so the check is made with the
id of the station that runs the profile (`station profile check`, and again when a run
opens), and a station whose id makes the serial too long is refused before any board.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import datetime

DATE_PLACEHOLDERS = {"yymmdd": "%y%m%d", "yyyymmdd": "%Y%m%d", "yy": "%y", "mm": "%m", "dd": "%d"}
PLACEHOLDERS = (*DATE_PLACEHOLDERS, "station", "seq")
DEFAULT_SEQ_MAX = 10**9 - 1
# an integer format spec: [[fill]align][sign][#][0][width][grouping][type]
_INT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?#?0?(?P<width>\d+)?[,_]?(?P<type>[bdoxX])?", re.S)
_BASE = {"b": 2, "o": 8, "x": 16, "X": 16}


class SerialPatternError(ValueError):
    """A pattern that cannot give serial numbers (or a counter past the pattern's maximum)."""


@dataclass(frozen=True)
class SerialPattern:
    text: str
    parts: tuple[tuple[str, str | None, str], ...]  # (literal text, placeholder or None, format spec)
    max_seq: int  # 0 when the pattern has no {seq}

    @classmethod
    def parse(cls, text: str, need_seq: bool = True) -> "SerialPattern":
        """Check a pattern; SerialPatternError says what is wrong in words of the profile."""
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise SerialPatternError(f"unbalanced braces ({exc}); write a literal brace as {{{{ or }}}}") from None
        parts: list[tuple[str, str | None, str]] = []
        max_seq = 0
        for literal, field, spec, conversion in parsed:
            if field is None:
                parts.append((literal, None, ""))
                continue
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            if field not in PLACEHOLDERS:
                names = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise SerialPatternError(f"unknown placeholder {shown}: use {names}")
            if conversion or "{" in (spec or ""):
                raise SerialPatternError(f"{shown}: a placeholder takes only a format spec such as {{seq:05}}")
            if field == "seq":
                if max_seq:
                    raise SerialPatternError("{seq} appears twice: one counter per serial")
                max_seq = _seq_max(spec or "", shown)
            elif spec:
                what = "{station} takes" if field == "station" else "date placeholders take"
                raise SerialPatternError(f"{shown}: {what} no format spec")
            parts.append((literal, field, spec or ""))
        if need_seq and not max_seq:
            raise SerialPatternError("no {seq} placeholder: every unit would get the same serial "
                                     "(add one such as {seq:05}, or take serials from labels: [serial] given = true)")
        return cls(text, tuple(parts), max_seq)

    @property
    def uses_station(self) -> bool:
        return any(field == "station" for _, field, _ in self.parts)

    def render(self, seq: int | None, when: datetime, station: str | None = None) -> str:
        """The serial for counter value `seq` on day `when` at station `station` (its id)."""
        if seq is not None and not 0 <= seq <= self.max_seq:
            raise SerialPatternError(f"counter value {seq} is past the pattern's maximum {self.max_seq} "
                                     f"({self.text}): widen {{seq}} or start a new pattern")
        return self._render(seq, when, station, to_seq=False)

    def counter_name(self, when: datetime, station: str | None = None) -> str:
        """The counter's name: the pattern rendered up to {seq} (a new day, station or prefix: a new counter)."""
        return self._render(None, when, station, to_seq=True)

    def longest(self, station: str | None = None) -> str:
        """The longest serial (on that station): at the counter's maximum (dates have fixed widths)."""
        return self.render(self.max_seq, datetime(2099, 12, 31), station)

    def _render(self, seq: int | None, when: datetime, station: str | None, to_seq: bool) -> str:
        if self.uses_station:
            station_in_serial(station)
        out = []
        for literal, field, spec in self.parts:
            out.append(literal)
            if field == "seq":
                if to_seq:
                    break
                out.append(format(seq or 0, spec))
            elif field == "station":
                out.append(station)
            elif field is not None:
                out.append(when.strftime(DATE_PLACEHOLDERS[field]))
        return "".join(out)


def station_in_serial(station: str | None) -> str:
    """A station id as {station} puts it in a serial: printable, no spaces (as a serial from a label)."""
    if station is None:
        raise SerialPatternError("the pattern has {station}: it renders only with a station's id")
    if not station or any(not c.isprintable() or c.isspace() for c in station):
        raise SerialPatternError(f"station id {station!r} (station.toml station_id) cannot go into a serial "
                                 "through {station}: a serial has no spaces or control characters")
    return station


def _seq_max(spec: str, shown: str) -> int:
    m = _INT_SPEC.fullmatch(spec)
    try:
        if m is None:
            raise ValueError
        format(0, spec), format(DEFAULT_SEQ_MAX, spec)
    except ValueError:
        raise SerialPatternError(f"{shown}: not an integer format spec (such as 05, 06 or 04x)") from None
    if not m["width"]:
        return DEFAULT_SEQ_MAX
    width, base = int(m["width"]), _BASE.get(m["type"] or "d", 10)
    if width > 18:
        raise SerialPatternError(f"{shown}: a counter of more than 18 digits")
    top = base**width - 1
    while top and len(format(top, spec)) > width:  # sign, prefix or grouping take part of the width
        top //= base
    if top < 1:
        raise SerialPatternError(f"{shown}: the width leaves no room for the counter")
    return top


def render_serial(pattern: str, seq: int | None, when: datetime, station: str | None = None) -> str:
    """The serial (or, with seq None, the counter's name) for a pattern."""
    p = SerialPattern.parse(pattern, need_seq=False)
    return p.counter_name(when, station) if seq is None else p.render(seq, when, station)
