"""The station's two esptool hooks change host CPU only, never what goes over the wire."""

from __future__ import annotations

import os
import threading
import zlib

import esptool.loader
from esptool import cmds

from flashing.session import UnitSession, _CompressOnce, install_logger


def test_compress_once_gives_zlibs_bytes_and_compresses_each_image_once(monkeypatch):
    calls = []
    real = zlib.compress

    def counting(data, level=-1):
        calls.append(len(data))
        return real(data, level)

    monkeypatch.setattr(zlib, "compress", counting)
    z = _CompressOnce()
    image = os.urandom(100_000) + bytes(200_000)
    out: list[bytes] = []
    threads = [threading.Thread(target=lambda: out.append(z.compress(image, 9))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [real(image, 9)] * 8
    assert calls == [len(image)]  # eight units at once, one compression
    assert z.compress(b"small", 9) == real(b"small", 9)  # small data is not kept
    assert z.compress(image, 6) == real(image, 6)  # the level is part of the key
    assert calls == [len(image), 5, len(image)]
    assert not z._busy  # nobody left waiting, nothing kept for the hits
    assert z.decompressobj is zlib.decompressobj and z.crc32 is zlib.crc32  # everything else is zlib's own
    assert z.decompressobj().decompress(out[0]) == image


def test_compress_once_keeps_only_a_few_images():
    z = _CompressOnce()
    for i in range(z.KEEP + 5):
        z.compress(bytes([i]) * z.MIN_SIZE, 9)
    assert len(z._done) == z.KEEP and not z._busy


def test_hooks_are_installed_once_and_short_frames_keep_their_hex():
    install_logger()
    assert isinstance(cmds.zlib, _CompressOnce)
    hooked = cmds.zlib
    install_logger()
    assert cmds.zlib is hooked
    fmt = esptool.loader.HexFormatter
    assert f"{fmt(bytes(16384))}" == "<16384 bytes>"
    assert f"{fmt(bytes.fromhex('c00008'))}" == "c00008"  # commands and replies: as esptool prints them


def test_a_flash_through_the_hooks_reads_back_exactly(make_bench):
    bench = make_bench(1)
    image = os.urandom(70_000) + bytes(130_000)  # big enough to go through the cache
    for _ in range(2):  # the second write takes the compressed image from the cache
        with UnitSession(bench[0].url) as s:
            s.connect("esp32")
            s.prepare_flash(921600)
            s.write(0x10000, image)
            assert s.esp.read_flash(0x10000, len(image)) == image
