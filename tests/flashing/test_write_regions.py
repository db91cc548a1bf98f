"""`UnitSession.write_regions`: a batch script's way to write a unit, without the station."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO


def test_a_script_writes_regions_and_a_second_pass_writes_only_what_changed(make_bench):
    bench = make_bench(1)
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from flashing.session import UnitSession
        a, b = os.urandom(20000), os.urandom(8192)
        seen = []
        with UnitSession({bench[0].url!r}) as s:
            s.connect("esp32")
            s.prepare_flash(460800)
            first = s.write_regions([("a", 0x10000, a), ("b", 0x20000, b)],
                                    lambda name, done, size, total: seen.append([name, done, size, total]))
            b2 = bytes([b[0] ^ 0xFF]) + b[1:]
            second = s.write_regions([("a", 0x10000, a), ("b", 0x20000, b2)])
        print(json.dumps({{"first": first, "second": second, "seen": seen,
                          "a": a.hex(), "b2": b2.hex(), "station": "station" in sys.modules}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["first"] == ["a", "b"] and out["second"] == ["b"]
    assert out["seen"] == [["a", 0, 20000, 28192], ["b", 20000, 8192, 28192], ["", 28192, 0, 28192]]
    assert not out["station"]  # flashing stands alone
    flash = bench[0].device.flash
    assert flash.read(0x10000, 20000) == bytes.fromhex(out["a"])
    assert flash.read(0x20000, 8192) == bytes.fromhex(out["b2"])
