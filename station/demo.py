"""The demo line: virtual boards that keep coming, some of them faulty.

For operator training and trade-show demos: a few seconds after each result the
board in that slot is swapped for a new one through the virtual boards' control
interface, and a share of the new boards carry a fault, so FAIL states show too.
It only plays the world around the station; the station itself runs unchanged.
"""

from __future__ import annotations

import random
import threading
import time

from flashing.virtual.bench import VirtualBench

from .line import Line

DEMO_FAULTS = [
    {"no_download_mode": True},  # the fixture cannot put it in download mode
    {"flash_dead": True},  # a dead flash chip
    {"pairing": "error"},  # its pairing server answers 500
    {"panic_after": 1.5},  # its firmware crashes soon after boot
]


class DemoLine:
    def __init__(self, bench: VirtualBench, line: Line, swap_after: float = 3.0, faulty_share: float = 0.2,
                 seed: int | None = None):
        self.bench, self.line = bench, line
        self.swap_after, self.faulty_share = swap_after, faulty_share
        self.rng = random.Random(seed)
        self.stopped = threading.Event()
        self._swapping: set[int] = set()
        self._runner = threading.Thread(target=self._run, daemon=True, name="demo-line")
        self._swaps: list[threading.Thread] = []  # started by the runner only

    def start(self) -> "DemoLine":
        self._runner.start()
        return self

    def stop(self) -> None:
        """Stop swapping; returns once no swap is under way, so the boards may be closed."""
        self.stopped.set()
        if self._runner.is_alive():
            self._runner.join(5)  # first: no swap starts after it
        for t in self._swaps:
            t.join(5)

    def _run(self) -> None:
        while not self.stopped.wait(0.2):
            for slot in self.line.slots:
                done = slot.status in ("passed", "failed", "aborted") and slot.ended is not None
                if done and slot.index not in self._swapping and time.monotonic() - slot.ended > self.swap_after:
                    self._swapping.add(slot.index)
                    t = threading.Thread(target=self._swap, args=(slot.index,), daemon=True,
                                         name=f"demo-swap-{slot.index}")
                    self._swaps = [x for x in self._swaps if x.is_alive()] + [t]
                    t.start()

    def _swap(self, index: int) -> None:
        dev = self.bench[index].device
        try:
            dev.unplug()
            if self.stopped.wait(0.8):  # the operator takes the board out and puts the next one in
                return
            faults = self.rng.choice(DEMO_FAULTS) if self.rng.random() < self.faulty_share else None
            dev.swap(faults=faults)
        finally:
            self.stopped.wait(0.5)
            self._swapping.discard(index)
