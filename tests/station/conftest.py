"""Fixtures for the station: a station.toml in a temp dir, a copy of the example profile."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from station.cli import main

REPO = Path(__file__).resolve().parents[2]
TOKEN = "tok-987654"


@pytest.fixture
def station_env(tmp_path, monkeypatch):
    """A station.toml whose database and key live in tmp; the example profile in tmp too."""
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO / "profiles" / "relay", profiles / "relay")
    cfg = tmp_path / "station.toml"
    cfg.write_text('station_id = "test-station"\ndatabase = "station.db"\n'
                   'profiles_dir = "profiles"\ndefault_profile = "relay"\nkey_file = "station.key"\n')
    monkeypatch.setenv("RELAY_VENDOR_TOKEN", TOKEN)
    monkeypatch.setenv("STATION_CONFIG", str(cfg))
    return tmp_path


def run_station(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # only what this command prints, not what the test printed before it
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_station_process(*args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "station", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def pin_firmware(env: Path, fw, extra=lambda text: text) -> None:
    """Put a generated build (`flashing.firmware.build_firmware`) in the example profile and pin its hashes."""
    import hashlib

    d = env / "profiles/relay"
    text = (d / "profile.toml").read_text()
    for name, data in (("bootloader.bin", fw.bootloader), ("partition-table.bin", fw.partition_table),
                       ("relay.bin", fw.app)):
        old = hashlib.sha256((d / "firmware" / name).read_bytes()).hexdigest()
        (d / "firmware" / name).write_bytes(data)
        text = text.replace(old, hashlib.sha256(data).hexdigest())
    (d / "profile.toml").write_text(extra(text))
