"""The timing model against its own prediction (real time: marked slow)."""

import os
import time

import pytest
from esptool import cmds

from flashing.virtual.timing import predict_write

pytestmark = pytest.mark.slow


def test_1mb_incompressible_write_at_921600_matches_the_model(make_bench):
    bench = make_bench(1, "esp32", realtime=True)
    data = os.urandom(1 << 20)
    esp = cmds.run_stub(cmds.detect_chip(bench[0].url, connect_mode="no-reset"))
    esp.change_baud(921600)
    cmds.attach_flash(esp)
    t, cpu = time.perf_counter(), time.process_time()
    cmds.write_flash(esp, [(0x10000, data)])
    measured, cpu = time.perf_counter() - t, time.process_time() - cpu
    esp._port.close()
    predicted = predict_write(data, 921600).seconds
    # never faster than the wire allows; esptool waits for each block's answer before it prepares the next, so
    # its own CPU (compressing, SLIP, MD5: this process's time, with the board's ~0.06 s per MB) adds to the
    # wire's time; how much depends on the machine, so the bound takes what this run measured
    assert 0.97 * predicted <= measured <= 1.05 * predicted + cpu, (measured, predicted, cpu)
