"""The station as a user installs it: a wheel in a fresh venv, run from an empty folder outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.station.conftest import REPO

pytestmark = pytest.mark.install  # builds a wheel and installs its dependencies: `python3 tasks.py test -m install`


def _run(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def test_the_wheel_installs_into_a_fresh_venv_and_runs_from_an_empty_folder(tmp_path):
    started = time.monotonic()
    # from a copy of the sources alone: setuptools would put a stale build/ folder's files in the wheel
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             "var", ".pytest_cache", "tests", "benchmarks", "docs"))
    wheels = tmp_path / "wheels"
    r = _run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "-q", "-w", wheels)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("provisioning_station-*.whl")
    venv = tmp_path / "venv"
    r = _run(sys.executable, "-m", "venv", venv)
    assert r.returncode == 0, r.stderr
    r = _run(venv / "bin/python", "-m", "pip", "install", "-q", wheel)  # with its dependencies, as a user would
    assert r.returncode == 0, r.stderr[-3000:]
    installed = time.monotonic()

    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STATION_", "PYTHON", "COVERAGE_", "VIRTUAL_ENV", "RELAY_"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HOME=str(home),
               XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"))
    station = venv / "bin/station"

    r = _run(venv / "bin/python", "-c", "import station; print(station.__file__)", cwd=empty, env=env)
    assert r.stdout.startswith(str(venv)), r.stdout + r.stderr  # the wheel's copy, not the checkout's

    r = _run(station, "--version", cwd=empty, env=env)
    assert r.returncode == 0 and r.stdout.startswith("station 0.1.0 (provisioning-station), esptool 5."), r.stderr

    r = _run(station, "profile", "check", "relay", cwd=empty, env={**env, "RELAY_VENDOR_TOKEN": "tok-4242"})
    assert r.returncode == 0, r.stderr
    assert "is ready" in r.stdout and "packaged example" in r.stdout and str(venv) in r.stdout
    data = home / "data" / "provisioning-station"
    assert f"station.toml: none found, using defaults (files under {data})" in r.stderr

    r = _run(station, "demo", "--batch", cwd=empty, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 of 4 units passed" in r.stdout and f"the record is in {data / 'var' / 'demo.db'}" in r.stderr
    assert (data / "var" / "demo-export.csv").is_file()
    assert os.listdir(empty) == []  # nothing written where it was run
    # how long a user waits (the README quotes it); the marker keeps it out of the default run
    print(f"wheel + fresh venv install {installed - started:.0f} s, commands {time.monotonic() - installed:.0f} s")
