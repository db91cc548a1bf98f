"""Binding the fixture's slots to USB locations: learning them from the operator, writing them to station.toml.

`learn` walks the operator through the sockets: for slot 1, 2, ... it says where to plug a
board and watches the serial ports until one appears that was not there before; that
port's USB location becomes the slot's. `with_slots` writes the result into station.toml's
[ports.slots] table and leaves every other line of the file (comments included) as it was.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

from flashing.ports import LOCATION, SerialPort

from .schema import ConfigError, Problem, parse_toml

POLL_S = 0.25  # how often the port list is read while waiting for a board


class Stopped(Exception):
    """The operator stopped learning, or no board came in time: nothing is written."""


def learn(count: int, poll: Callable[[], list[SerialPort]], say: Callable[[str], None],
          vid_pids: tuple[str, ...] = (), timeout_s: float = 120.0, interval_s: float | None = None,
          cancelled: Callable[[], bool] = lambda: False) -> dict[int, str]:
    """Slot number -> USB location for slots 1..count, from the ports that appear as the operator plugs boards.

    A port counts when it appears between two polls (so a port already there is learned by
    unplugging and plugging it again), has a USB location, is one of the fixture's bridges
    (`vid_pids`, when given) and is not bound to an earlier slot.
    """
    interval_s = POLL_S if interval_s is None else interval_s
    wanted = {vp.lower() for vp in vid_pids}
    bound: dict[int, str] = {}
    before = {p.location for p in poll()}
    for n in range(1, count + 1):
        say(f"slot {n}: plug a board (or the slot's USB cable) into slot {n} of the fixture")
        deadline = time.monotonic() + timeout_s
        while n not in bound:
            if cancelled():
                raise Stopped("stopped by the operator")
            if time.monotonic() >= deadline:
                raise Stopped(f"no new port appeared for slot {n} within {timeout_s:g} s")
            if interval_s:
                time.sleep(interval_s)  # the pace of the poll, not a wait for something: the loop checks
            now = poll()
            for port in now:
                if port.location in before:
                    continue
                note = _refuse(port, wanted, bound)
                if note:
                    say(note)
                elif n in bound:
                    say(f"{port.device} appeared too: plug one board at a time (plug it again for the next slot)")
                else:
                    bound[n] = port.location
                    say(f"slot {n} = {port.location} ({_kind(port)}, {port.device})")
            before = {p.location for p in now}
    return bound


def _kind(port: SerialPort) -> str:
    what = port.bridge or "unknown bridge"
    return f"{what}{', native USB' if port.native_usb else ''}, {port.vid_pid or 'no VID:PID'}"


def _refuse(port: SerialPort, wanted: set[str], bound: dict[int, str]) -> str | None:
    if not port.location or not LOCATION.match(port.location):
        return f"{port.device} has no USB location: it cannot be a fixture slot"
    for n, loc in bound.items():
        if loc == port.location:
            return f"{port.device} is slot {n} ({loc}), already learned; plug the next slot's board"
    if wanted and port.vid_pid not in wanted:
        return (f"{port.device} ({_kind(port)}) is not one of the fixture's bridges (station.toml [ports] usb): "
                "left out")
    return None


# -- station.toml --------------------------------------------------------------------------

_SLOTS_HEADER = re.compile(r"^[ \t]*\[[ \t]*ports[ \t]*\.[ \t]*slots[ \t]*\][ \t]*(#.*)?$")
_ANY_HEADER = re.compile(r"^[ \t]*\[")
_KEY_LINE = re.compile(r"^[ \t]*[\w\"'-]+[ \t]*=")


def with_slots(text: str, slots: dict[int, str], path: Path) -> str:
    """station.toml's text with [ports.slots] set to `slots`; every other key and comment kept.

    ConfigError when the file holds the table in a form this cannot rewrite safely (inline).
    """
    lines = text.splitlines(keepends=True)
    body = [f'{n} = "{loc}"\n' for n, loc in sorted(slots.items())]
    at = next((i for i, line in enumerate(lines) if _SLOTS_HEADER.match(line.rstrip("\r\n"))), None)
    if at is None and "slots" in parse_toml(text, path).get("ports", {}):
        raise _cannot_rewrite(path)
    if at is None:
        tail = "" if not text or text.endswith("\n") else "\n"
        out = text + tail + "\n[ports.slots]\n# slot = USB location of its socket's port (`station ports learn`)\n"
        out += "".join(body)
    else:
        end = next((i for i in range(at + 1, len(lines)) if _ANY_HEADER.match(lines[i])), len(lines))
        kept = [line for line in lines[at + 1:end] if not _KEY_LINE.match(line)]  # its comments stay
        blank_tail = []
        while kept and not kept[-1].strip():
            blank_tail.insert(0, kept.pop())
        out = "".join(lines[: at + 1] + kept + body + blank_tail + lines[end:])
    _same_but_slots(text, out, slots, path)
    return out


def _same_but_slots(old: str, new: str, slots: dict[int, str], path: Path) -> None:
    """The rewrite changed [ports.slots] and nothing else, or ConfigError (the file is left alone)."""
    before, after = parse_toml(old, path), parse_toml(new, path)
    want = {str(n): loc for n, loc in slots.items()}
    got = after.get("ports", {}).pop("slots", None)
    before.get("ports", {}).pop("slots", None)
    for d in (before, after):
        if d.get("ports") == {}:
            del d["ports"]
    if got != want or before != after:
        raise _cannot_rewrite(path)


def _cannot_rewrite(path: Path) -> ConfigError:
    return ConfigError([Problem(str(path), "ports.slots", "cannot be rewritten in place (is it written inline, "
                                "`slots = { ... }`?): write it as its own [ports.slots] table and run again")])


def write_slots(path: Path, slots: dict[int, str]) -> None:
    """Replace station.toml with the same file holding `slots`, atomically (a crash leaves the old one)."""
    text = path.read_text(encoding="utf-8")
    out = with_slots(text, slots, path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".station.toml.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(out)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
