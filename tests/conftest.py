"""Shared fixtures: virtual benches, the esptool CLI as a subprocess, firmware."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flashing  # noqa: F401  (registers vesp://)
from flashing.virtual.bench import VirtualBench

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STATION_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture
def make_bench(tmp_path):
    benches: list[VirtualBench] = []

    def make(count: int = 1, chip: str = "esp32", **kw) -> VirtualBench:
        kw.setdefault("run_dir", tmp_path / f"run{len(benches)}")
        bench = VirtualBench(count, chip, seed=1234 + len(benches), **kw)
        benches.append(bench)
        return bench

    yield make
    for b in benches:
        b.close()


def esptool_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real, unmodified esptool CLI in a subprocess (vesp:// registered)."""
    return subprocess.run([sys.executable, "-m", "flashing.esptool_cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "fixtures").is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED} (set STATION_SHARED_DIR)")
    return SHARED
