#!/usr/bin/env python3
"""The project's two everyday commands, on a machine that has only python3 >= 3.11.

    python3 tasks.py demo    # the station with virtual boards and the example profile
    python3 tasks.py test    # the test suite (what CI runs)
    python3 tasks.py coverage  # the test suite under coverage, then the per-module report
    python3 tasks.py bench   # the benchmark scripts (slow; prints the numbers we quote)
    python3 tasks.py lock    # refresh requirements.lock from pyproject.toml (after changing a dependency)

The environment is installed from requirements.lock (every package pinned, with its hashes:
pip refuses any other file), then the station itself without dependencies.

Each creates or updates the local virtual environment `.venv` first; the `station`
command is then .venv/bin/station (`source .venv/bin/activate` puts it on PATH).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("STATION_VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"
STAMP = VENV / ".installed"
LOCK = ROOT / "requirements.lock"
# the one command that writes the lock: pinned versions with hashes, for Python 3.11+ on Linux
LOCK_COMMAND = ["-m", "piptools", "compile", "-q", "--generate-hashes", "--extra", "test", "--strip-extras",
                "--no-emit-index-url", "--no-emit-find-links", "--allow-unsafe",
                "-o", LOCK.name, "pyproject.toml"]


def ensure_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit("The station needs Python 3.11 or newer.")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + LOCK.read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV} ...", file=sys.stderr)
        try:
            venv.create(VENV, with_pip=True)
        except Exception as exc:  # e.g. Debian without python3-venv
            sys.exit(f"could not create a virtual environment ({exc}); "
                     "install your distribution's python3-venv package")
    print("installing the station and its dependencies ...", file=sys.stderr)
    subprocess.run([PY, "-m", "pip", "install", "-q", "--require-hashes", "-r", LOCK], check=True)
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT], check=True)
    STAMP.write_text(want)
    # the venv's bin is not on the caller's PATH: say how, once, when the environment is made
    print(f"`station` is {VENV / 'bin' / 'station'}; to have it on your PATH: source {VENV / 'bin' / 'activate'}",
          file=sys.stderr)


def main() -> int:
    task = sys.argv[1] if len(sys.argv) > 1 else "help"
    extra = sys.argv[2:]
    if task not in ("demo", "test", "coverage", "bench", "lock"):
        print(__doc__)
        return 0 if task == "help" else 2
    ensure_venv()
    if task == "lock":
        subprocess.run([PY, "-m", "pip", "install", "-q", "pip-tools>=7.4,<8"], check=True)
        # the header's command: pip-tools 7.6 dropped --custom-compile-command; the variable works in every 7.x
        return subprocess.call([PY, *LOCK_COMMAND], cwd=ROOT,
                               env={**os.environ, "CUSTOM_COMPILE_COMMAND": "python3 tasks.py lock"})
    if task == "demo":
        return subprocess.call([PY, "-m", "station", "demo", *extra], cwd=ROOT)
    if task == "test":
        return subprocess.call([PY, "-m", "pytest", *extra], cwd=ROOT)
    if task == "coverage":  # settings in pyproject.toml [tool.coverage.*]; subprocesses are measured too
        subprocess.call([PY, "-m", "coverage", "erase"], cwd=ROOT)
        rc = subprocess.call([PY, "-m", "coverage", "run", "-m", "pytest", *extra], cwd=ROOT)
        subprocess.call([PY, "-m", "coverage", "combine", "-q"], cwd=ROOT)
        subprocess.call([PY, "-m", "coverage", "report"], cwd=ROOT)
        return rc
    rc = 0
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        print(f"== {script.name}", flush=True)
        rc |= subprocess.call([PY, str(script), *extra], cwd=ROOT)
    return rc


if __name__ == "__main__":
    sys.exit(main())
