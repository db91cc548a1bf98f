"""The device side never imports the application or a UI (one direction of dependency)."""

import subprocess
import sys

CODE = """
import sys, pkgutil, importlib, flashing, flashing.virtual
for m in pkgutil.walk_packages(flashing.__path__, "flashing."):
    importlib.import_module(m.name)
# (click arrives with esptool itself, whose CLI is built on it; our code does not use it)
bad = sorted(n for n in sys.modules if n.split(".")[0] in ("station", "textual"))
print(",".join(bad))
"""


def test_flashing_imports_no_station_and_no_ui():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""


def test_the_pipeline_imports_no_ui():
    code = "import sys, station.pipeline, station.runner, station.line; " \
           "print(','.join(n for n in sys.modules if n.split('.')[0] == 'textual'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""
