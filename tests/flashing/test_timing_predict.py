"""The timing model's prediction, as arithmetic (no clock): what `--realtime` promises trainees."""

import os

from flashing.virtual.timing import predict_write


def test_an_incompressible_write_costs_at_least_its_bytes_on_the_wire():
    data = os.urandom(1 << 20)
    p = predict_write(data, 921600)
    assert not p.compressed and p.blocks == 64  # esptool sends raw 16 KiB blocks it cannot shrink
    floor = len(data) * 10 / 921600  # 10 bit times a byte
    assert floor < p.wire_down < 1.01 * floor
    assert p.seconds >= p.wire_down + p.wire_up
    slow = predict_write(data, 115200)
    assert 7.9 < slow.wire_down / p.wire_down < 8.1  # the wire scales with the rate


def test_a_compressible_write_is_shorter_and_the_flash_shows_through():
    blank = b"\xff" * (1 << 20)
    p = predict_write(blank, 921600)
    assert p.compressed and p.blocks == 1
    assert p.wire_down < 0.05  # a few KB of deflate
    assert p.flash_exposed > 1.0  # erasing and programming 1 MB is no longer hidden behind the wire
    assert p.seconds >= p.flash_exposed
