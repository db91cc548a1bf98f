"""Untrusted text made safe to show: what boards, HTTP replies and people typed, as plain characters.

One function for every output layer (the screen, the CLI's stderr and stdout, JSON
lines): terminal control sequences and control characters are removed so that a
board's console cannot retitle, clear or drive the operator's terminal. Markup is
the screen's business: it shows text as `rich.text.Text`, never as markup.
"""

from __future__ import annotations

import re

# ESC sequences: OSC/DCS/SOS/PM/APC strings up to BEL or ST, CSI with its parameters, then any other ESC pair;
# the same introduced by their 8-bit C1 forms; then every C0 (but \t and \n), DEL and C1 left over
_SEQUENCES = re.compile(
    r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|\x1b[ -/]*[0-~]?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# bidirectional overrides and isolates reorder what the operator reads (a serial shown backwards)
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")


def safe_text(text: str | None) -> str:
    """The printable part of `text`: no ESC sequences, no C0 (but tab and newline), DEL or C1, no bidi overrides."""
    if not text:
        return text or ""
    text = _SEQUENCES.sub("", text)
    text = _CONTROLS.sub("", text)
    return _BIDI.sub("", text)


def one_line(text: str | None) -> str:
    """`safe_text` on one line: for a table row or a progress line that the text must not split or forge."""
    return " ".join(safe_text(text).split("\n")).replace("\t", " ")
