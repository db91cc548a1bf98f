"""What a card and the header show in a given size (`station.layout`), without a terminal."""

from __future__ import annotations

import re

import pytest
from rich.text import Text

from station.layout import BIG, SIZES, WORDS, SlotView, big, card_lines, first_clause, header_lines

REMEDIES = {
    "failed": ("flash: the board was unplugged or the port failed while writing",
               "reseat the board, then retry; replace the board if it fails again"),
    "error": ("serial: the record's database is locked by another process",
              "call the station's engineer; put this board aside"),
    "aborted": ("boot: aborted by the operator", "put the board back and start it again"),
}
# inner card sizes: the screen's at 80x24, 100x30, 160x45 (4 slots) and 160x45, 100x30 (16), and around them
SIZES_SEEN = [(35, 7), (45, 10), (33, 31), (35, 8), (22, 6)]
GRID = [(w, h) for w in (20, 22, 26, 30, 35, 45, 60, 76) for h in (6, 7, 8, 10, 13, 20, 31)]


def view(status: str, n: int = 12, **kw) -> SlotView:
    reason, action = REMEDIES.get(status, ("", "swap in the next board" if status == "passed" else ""))
    return SlotView(number=n, port="ttyUSB11", status=status, serial="RLY-261126-00012", chip="ESP32",
                    mac="24:0a:c4:5e:10:3b", elapsed=11.0, reason=reason, action=action, **kw)


def flat(lines: list[Text] | list[str]) -> str:
    """The card's words as one line (a wrapped sentence reads as the sentence)."""
    return " ".join(" ".join((line if isinstance(line, str) else line.plain).split()) for line in lines)


def shows_word(lines: list[Text] | list[str], word: str) -> bool:
    """The state word as text, or in block letters (each row of them on the card, in order)."""
    plain = [line if isinstance(line, str) else line.plain for line in lines]
    if any(re.search(rf"(^|\s){re.escape(word)}(\s|$)", p) for p in plain):
        return True
    for size in SIZES:
        rows = [r.rstrip() for r in big(word, size)]
        for top in range(len(plain) - len(rows) + 1):
            if all(r.strip() and r.strip() in plain[top + k] for k, r in enumerate(rows)):
                return True
    return False


def missing(v: SlotView, lines: list[Text] | list[str], width: int) -> list[str]:
    """What the card should show and does not (empty when all is there)."""
    text, gone = flat(lines), []
    first = lines[0] if isinstance(lines[0], str) else lines[0].plain
    if not first.lstrip("▶ ").startswith(str(v.number)):
        gone.append("the slot number first")
    if not shows_word(lines, v.word):
        gone.append(f"the word {v.word}")
    if v.serial not in text:
        gone.append("the serial")
    if v.status in REMEDIES:
        reason_words = v.reason.split()
        if v.reason not in text and " ".join(reason_words[:2]) not in text:
            gone.append("the reason (at least its step and first word)")
        clause = "→ " + first_clause(v.action)
        if "→ " + v.action not in text and clause not in text:
            gone.append(f"the next action ({clause!r} whole)")
    if any(len(line) > width for line in lines):
        gone.append("lines within the card's width")
    return gone


@pytest.mark.parametrize("width,height", SIZES_SEEN + GRID)
def test_a_finished_card_keeps_its_number_word_serial_reason_and_action(width, height):
    for status in ("passed", "failed", "aborted", "error"):
        v = view(status)
        lines = card_lines(v, width, height)
        assert len(lines) <= height
        assert not missing(v, lines, width), (status, width, height, [line.plain for line in lines])


@pytest.mark.parametrize("width,height", SIZES_SEEN)
def test_where_there_is_room_the_whole_reason_and_action_are_there(width, height):
    for status in ("failed", "error", "aborted"):
        v = view(status)
        text = flat(card_lines(v, width, height))
        if width >= 33:  # every card but the 16 at 100x30
            assert v.reason in text and "→ " + v.action in text, (status, width, height, text)
        else:  # shortened at a word: the reason's start, the action's first instruction whole
            assert "…" in text and "→ " + first_clause(v.action) in text, text


def test_the_outcome_is_the_largest_thing_where_there_is_room():
    # 160x45 with 4 slots: five-row letters; 100x30: at least three rows; 16 at 100x30: one bold line
    for status in ("passed", "failed", "aborted", "error", "running"):
        v = view(status, **({"fraction": 0.4, "progress": "step: flash"} if status == "running" else {}))
        assert [line.plain.strip() for line in card_lines(v, 33, 31) if line.plain.strip()][1] \
            == big(v.word, "full")[0].strip()
        assert shows_word(card_lines(v, 45, 10), v.word)
        assert any(line.plain.strip() == v.word for line in card_lines(v, 22, 6))


def test_cards_of_one_width_use_one_letter_size():
    # PASS alone would take the 10-row letters at 35 columns; ABORTED and WORKING fit only 5-row ones
    sizes = set()
    for status in BIG:
        lines = card_lines(view(status), 35, 31)
        sizes.add(sum(1 for line in lines if "█" in line.plain))
    assert sizes == {5}


def test_every_state_word_has_block_letters_of_each_size():
    for status in BIG:
        for size, rows in zip(SIZES, (3, 5, 10)):
            letters = big(WORDS[status], size)
            assert letters is not None and len(letters) == rows
            assert len({len(r) for r in letters}) == 1  # a block: centred as one
    assert big("PAS$") is None


def test_a_waiting_or_running_card_says_what_it_waits_for_and_how_far_it_is():
    v = SlotView(number=3, port="ttyUSB2", status="waiting", hint="paused: F6 starts it")
    assert "paused: F6 starts it" in flat(card_lines(v, 22, 6)) and "READY" in flat(card_lines(v, 22, 6))
    v = SlotView(number=3, port="ttyUSB2", status="running", progress="step: flash  0.55/1.09 MB  137 kB/s  4 s left",
                 progress_short="flash 50% 137 kB/s 4 s", fraction=0.5)
    assert "step: flash 0.55/1.09 MB 137 kB/s 4 s left" in flat(card_lines(v, 45, 10))
    assert "flash 50% 137 kB/s 4 s" in flat(card_lines(v, 22, 6))


def test_a_card_too_small_for_everything_keeps_the_number_word_and_serial():
    v = view("failed")
    lines = card_lines(v, 17, 4)  # 16 slots at 80x24
    assert len(lines) == 4
    assert lines[0].plain.startswith("12  FAIL") and "RLY-261126-00012" in flat(lines) and "→ reseat" in flat(lines)


HEADER = [
    (True, " · ", [Text("profile relay (2Smart Relay)"), Text("fw 1.4.2"), Text("config a18f4f07")]),
    (False, " · ", [Text("station line-1-station-1"), Text("operator Anna"), Text("lot LOT-2611")]),
    (True, "  ", [Text(w) for w in (" PASS 4 ", " FAIL 3 ", " ABORTED 3 ", " ERROR 3 ", "yield 57%",
                                    "4 units/h", "cycle 12.0 s")]),
]


@pytest.mark.parametrize("width,rows", [(78, 3), (98, 3), (158, 2), (40, 7)])
def test_the_header_folds_and_never_hides_the_counters(width, rows):
    lines = header_lines(HEADER, width)
    assert len(lines) == rows, [line.plain for line in lines]
    assert all(len(line) <= width for line in lines)
    text = "\n".join(line.plain for line in lines)
    for _, _, parts in HEADER:
        for part in parts:
            assert part.plain in text  # whole: a part is never split across lines
    assert any(line.plain.startswith(" PASS 4 ") for line in lines)  # the counters start their own line


def test_a_header_part_longer_than_the_line_is_cut_with_an_ellipsis():
    lines = header_lines([(True, " · ", [Text("operator " + "x" * 50)])], 30)
    assert [line.plain for line in lines] == ["operator " + "x" * 20 + "…"]


@pytest.mark.parametrize("width,height", SIZES_SEEN + [(17, 4)])
def test_a_unit_in_quarantine_says_so_at_every_size(width, height):
    v = view("passed", flag="QUARANTINE")
    assert "QUARANTINE" in flat(card_lines(v, width, height))
