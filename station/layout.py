"""What a slot card and the header show in a given size: plain data in, lines of text out.

The operator's screen (`station.tui`) hands a frozen `SlotView` and the card's inner
size to `card_lines`, and the header's parts and its width to `header_lines`; neither
needs Textual, so every size is tested without a terminal. A card always keeps its slot
number, state word and serial, and on FAIL/ERROR/ABORTED the reason and the next action
(shortened at a word, never to nothing); what room is left goes, in order, to the full
action and reason, the outcome in block letters, the chip and MAC, the progress bar, and
larger letters. Every text in a view is already redacted and free of control characters.
"""

from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass

from rich.text import Text

WORDS = {"empty": "NO BOARD", "waiting": "READY", "running": "WORKING", "passed": "PASS",
         "failed": "FAIL", "aborted": "ABORTED", "error": "ERROR"}
FINISHED = ("failed", "aborted", "error")  # the states whose card says why and what to do
CARD_COLOURED = ("passed", *FINISHED)  # the whole card in the outcome's colour (the screen's CSS)

# the outcome's colour: the card's background for a finished unit, a band for the others
COLOURS = {"passed": ("white", "#1b7f3b"), "failed": ("white", "#c62828"), "aborted": ("black", "#ff8c00"),
           "error": ("white", "#b0279b"), "running": ("black", "#e0c020"), "waiting": ("white", "#3a5f8a"),
           "empty": ("white", "#4a4a4a")}

# a 3x5 pixel font (4 or 5 wide for N and W): the letters of the state words
_PIXELS = {
    "A": (".#.", "#.#", "###", "#.#", "#.#"), "B": ("##.", "#.#", "##.", "#.#", "##."),
    "D": ("##.", "#.#", "#.#", "#.#", "##."), "E": ("###", "#..", "##.", "#..", "###"),
    "F": ("###", "#..", "##.", "#..", "#.."), "G": ("###", "#..", "#.#", "#.#", "###"),
    "I": ("###", ".#.", ".#.", ".#.", "###"), "K": ("#.#", "#.#", "##.", "#.#", "#.#"),
    "L": ("#..", "#..", "#..", "#..", "###"), "N": ("#..#", "##.#", "#.##", "#..#", "#..#"),
    "O": ("###", "#.#", "#.#", "#.#", "###"), "P": ("###", "#.#", "###", "#..", "#.."),
    "R": ("###", "#.#", "##.", "#.#", "#.#"), "S": ("###", "#..", "###", "..#", "###"),
    "T": ("###", ".#.", ".#.", ".#.", ".#."), "W": ("#...#", "#...#", "#.#.#", "##.##", "#...#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."), " ": ("..", "..", "..", "..", ".."),
}
_HALF = {(False, False): " ", (True, False): "▀", (False, True): "▄", (True, True): "█"}
SIZES = ("half", "full", "double")  # 3, 5 and 10 rows high


@functools.cache  # every card asks on every refresh
def big(word: str, size: str = "half") -> tuple[str, ...] | None:
    """`word` in block letters (3, 5 or 10 rows), or None when a letter is not in the font."""
    if any(c not in _PIXELS for c in word):
        return None
    rows = ["".join(("#" if p == "#" else ".") for p in ".".join(_PIXELS[c][r] for c in word)) for r in range(5)]
    if size == "half":  # two pixel rows per text row
        rows.append("." * len(rows[0]))
        return tuple("".join(_HALF[(top[i] == "#", low[i] == "#")] for i in range(len(top)))
                     for top, low in zip(rows[0::2], rows[1::2]))
    scale = 2 if size == "double" else 1
    return tuple(line.replace("#", "█" * scale).replace(".", " " * scale) for line in rows for _ in range(scale))


@dataclass(frozen=True)
class SlotView:
    """A slot as its card shows it (texts already redacted and printable)."""

    number: int
    port: str
    status: str  # empty | waiting | running | passed | failed | aborted | error
    serial: str = ""
    chip: str = ""
    mac: str = ""
    progress: str = ""  # the step and, while flashing, bytes, speed and time left
    progress_short: str = ""  # the same for a narrow card
    fraction: float | None = None  # of the progress bar, while running
    elapsed: float | None = None
    reason: str = ""
    action: str = ""
    hint: str = ""  # what the slot waits for ("scan the label", "paused: F6 starts it")
    flag: str = ""  # e.g. QUARANTINE: shown whenever the state word is
    selected: bool = False

    @property
    def word(self) -> str:
        return WORDS[self.status]


def wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, max(width, 1), break_on_hyphens=False) or [""]


def shorten(text: str, width: int, lines: int) -> list[str]:
    """`text` wrapped into at most `lines` lines, cut at a word with an ellipsis, never to nothing."""
    out = wrap(text, width)
    if len(out) <= lines:
        return out
    out = out[:max(lines, 1)]
    last = out[-1]
    while len(last) + 1 > width and " " in last:
        last = last.rsplit(" ", 1)[0]
    out[-1] = last[:max(width - 1, 1)].rstrip(" ,;:") + "…"
    return out


def first_clause(action: str) -> str:
    """The first instruction of a remedy ("reseat the board, then retry; replace …" -> "… then retry…")."""
    head, sep, _ = action.partition(";")
    return head.rstrip(" ,.") + "…" if sep else action


TITLE_BAR = "bold white on #202020"  # a dark strip on top of each card: cards without a border stay apart
SELECTED_BAR = "bold white on #0178d4"
BIG = ("running", "passed", *FINISHED)  # the states whose word may be in block letters


class _Card:
    """The parts of one card, each in the smallest form that still says it, grown while there is room."""

    def __init__(self, v: SlotView, width: int, height: int):
        self.v, self.width, self.height = v, width, height
        w = width
        finished = v.status in FINISHED
        serial = v.serial or "-"
        self.serial = [f"SN {serial}"] if len(serial) + 3 <= w else wrap(serial, w)
        self.word = [v.word]
        self.word_size = "text"
        self.word_in_title = False
        self.ident: list[str] = []
        self.progress = shorten(v.progress if len(v.progress) <= w else v.progress_short, w, 1) \
            if v.progress else []
        self.bar: list[str] = []
        self.hint = shorten(v.hint, w, 2) if v.hint else []
        self.flag = [v.flag[:w]] if v.flag else []
        self.reason = shorten(v.reason, w, 1) if finished and v.reason else []
        self.action = shorten("→ " + (first_clause(v.action) if finished else v.action), w, 2) if v.action else []
        self.blank_above = self.blank_below = 0

    def used(self) -> int:
        return (1 + len(self.word) + len(self.flag) + len(self.serial) + len(self.ident) + len(self.progress)
                + len(self.bar) + len(self.hint) + len(self.reason) + len(self.action)
                + self.blank_above + self.blank_below)

    def grow(self, name: str, value) -> bool:
        """Take a larger form of one part if the card still fits; else keep the old one."""
        old = getattr(self, name)
        setattr(self, name, value)
        if self.used() <= self.height:
            return True
        setattr(self, name, old)
        return False

    def squeeze(self) -> None:
        """Too low for the least: the word joins the title, then the reason goes, then the action takes one line."""
        v = self.v
        if self.used() > self.height and len(f"{v.number}  {v.word}") <= self.width:
            self.word, self.word_in_title = [], True
        if self.used() > self.height:
            self.reason = []
        if self.used() > self.height and len(self.action) > 1:
            self.action = shorten(" ".join(self.action), self.width, 1)
        if self.used() > self.height:
            self.hint = self.hint[:1]

    def fill(self) -> None:
        v, w = self.v, self.width
        self.squeeze()
        if v.action:
            self.grow("action", wrap("→ " + v.action, w))
        if v.reason and v.status in FINISHED:
            self.grow("reason", wrap(v.reason, w))
        # one letter size for every card of this width: the size at which the widest word fits
        sizes = [size for size in SIZES if max(len(big(WORDS[s], size)[0]) for s in BIG) <= w]
        letters = big(v.word, "half") if v.status in BIG else None
        if letters and sizes and not self.word_in_title and self.grow("word", list(letters)):
            self.word_size = "half"
        ident = f"{v.chip}  {v.mac}" if v.chip and len(v.chip) + 2 + len(v.mac) <= w else v.mac
        if ident and len(ident) <= w:
            self.grow("ident", [ident])
        if v.fraction is not None:
            self.grow("bar", [bar_text(v.fraction, w)])
        for size in sizes[1:]:
            if self.word_size != "text" and self.grow("word", list(big(v.word, size))):
                self.word_size = size
        spare = self.height - self.used()
        if spare > 0 and self.word_size != "text":
            # room around the outcome, by the card's height alone: the words of a row of cards line up
            self.blank_above = min(spare, max(0, (self.height - len(self.word) - 10) // 3))
            self.blank_below = min(spare - self.blank_above, self.blank_above)

    def title(self) -> Text:
        v, w = self.v, self.width
        bar = SELECTED_BAR if v.selected else TITLE_BAR
        title = Text(f"{'▶ ' if v.selected else ''}{v.number}", style=bar)
        if self.word_in_title:
            fg, bg = COLOURS[v.status]
            title.append(" ", style=bar)
            title.append(f" {v.word} ", style=f"bold {fg} on {bg}")
        right = f"{v.elapsed:.1f} s" if v.elapsed is not None else ""
        room = w - len(title) - 2 - (len(right) + 2 if right else 0)
        if room >= 4:
            title.append(f"  {v.port if len(v.port) <= room else v.port[:room - 1] + '…'}", style=bar)
        if right and len(title) + 2 + len(right) <= w:
            title.append(" " * (w - len(title) - len(right)) + right, style=bar)
        title.append(" " * (w - len(title)), style=bar)
        return title

    def lines(self) -> list[Text]:
        v, w = self.v, self.width
        fg, bg = COLOURS[v.status]
        band = f"bold {fg} on {bg}"
        out = [self.title()]
        out += [Text("")] * self.blank_above
        block = max((len(line) for line in self.word), default=0)
        # a one-line word in reverse on a card of its own colour, where a band would not stand out
        style = f"bold {bg} on {fg}" if self.word_size == "text" and v.status in CARD_COLOURED else band
        for line in self.word:  # the letters of a word as one block, centred
            out.append(Text(line.ljust(block).center(w)[:w].ljust(w), style=style))
        out += [Text("")] * self.blank_below
        out += [Text(s, style="bold") for s in self.flag]
        out += [Text(s) for s in self.serial + self.ident + self.progress]
        out += [Text(s, style="bold") for s in self.bar]
        out += [Text(s, style="italic") for s in self.hint]
        out += [Text(s) for s in self.reason]
        out += [Text(s, style="bold") for s in self.action]
        return out[:self.height]


def bar_text(fraction: float, width: int) -> str:
    done = max(0, min(width, round(width * fraction)))
    return "━" * done + "╌" * (width - done)


def card_lines(v: SlotView, width: int, height: int) -> list[Text]:
    """The card's lines for an inner size of `width` x `height` cells (at most `height` lines)."""
    card = _Card(v, max(width, 1), max(height, 1))
    card.fill()
    return card.lines()


def card_text(v: SlotView, width: int, height: int) -> Text:
    return Text("\n").join(card_lines(v, width, height))


def header_lines(groups: list[tuple[bool, str, list[Text]]], width: int) -> list[Text]:
    """The header's groups of parts folded into lines of `width`.

    A group is (starts a line, separator, parts). A group joins the line before it when
    it fits there whole; else its parts are packed into lines, never split (a part longer
    than the line is cut with an ellipsis), so a narrow screen gets more lines, not less.
    """
    out: list[Text] = []
    for fresh, sep, parts in groups:
        parts = [p if len(p) <= width else p[:max(width - 1, 1)] + "…" for p in parts if p.plain]
        if not parts:
            continue
        whole = Text(sep).join(parts)
        if out and not fresh and len(out[-1]) + 3 + len(whole) <= width:
            out[-1].append("   ")
            out[-1].append_text(whole)
            continue
        line: Text | None = None
        for part in parts:
            if line is not None and len(line) + len(sep) + len(part) <= width:
                line.append(sep)
                line.append_text(part)
                continue
            if line is not None:
                out.append(line)
            line = Text()
            line.append_text(part)  # the part's style stays on the part (a copy would lend it to the line)
        out.append(line)
    return out
