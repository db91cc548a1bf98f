"""The dev-board auto-reset circuit and a busy host: the lines must change together."""

from __future__ import annotations

import errno
import time

import pytest

from flashing.session import SessionError, UnitSession
from flashing.virtual import protocol_vesp


@pytest.fixture
def slow_host(monkeypatch):
    """A host preempted for 50 ms between setting DTR and RTS (longer than the EN capacitor holds)."""
    real = protocol_vesp.Serial._update_rts_state

    def late(self):
        time.sleep(0.05)  # the preemption itself, the fault this fixture injects: not a wait for anything
        real(self)

    monkeypatch.setattr(protocol_vesp.Serial, "_update_rts_state", late)


def test_lines_set_together_reach_the_loader_on_a_busy_host(make_bench, slow_host):
    bench = make_bench(1)
    with UnitSession(bench[0].url) as s:
        assert s.connect("esp32").chip == "ESP32"


def test_lines_set_one_by_one_on_a_busy_host_boot_the_app(make_bench, slow_host, monkeypatch):
    # a port without TIOCMSET (as on Windows) gets esptool's classic reset, pyserial's two setters:
    # EN is released with IO0 still high in between
    def no_ioctl(self):
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    monkeypatch.setattr(protocol_vesp.Serial, "fileno", no_ioctl)
    bench = make_bench(1)
    with UnitSession(bench[0].url) as s, pytest.raises(SessionError, match="booted its firmware"):
        s.connect("esp32")
