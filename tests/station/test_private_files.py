"""What the station creates is its user's alone; nmcli runs by absolute path with nothing of its environment.

The station sets its own umask (a shell's usual 022 must not make the record, its WAL,
the spool, exports or keys readable by every user), and finds nmcli once, at start,
refusing one that another user could replace.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from flashing.console import parse_boot_log
from station.config import ConfigError, SmokeDefaults
from station.record import Attempt, Record, now_iso
from station.runner import open_station
from station.smoke import NMCLI_ENV, SmokeFailure, WifiReach, resolve_nmcli

SECRET_ENV = {"RELAY_VENDOR_TOKEN": "Vt7Kq2Xw9Z", "STATION_TEST_TOKEN": "Tt4Gh8Vb1N",
              "STATION_TEST_PSK": "Fp%Test#Psk=77", "STATION_MONITOR_PASSWORD": "Mp-9xQ2-mon",
              "STATION_SECRETS_PASSPHRASE": "Pp-Secrets-5150"}


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def shell_umask():
    """The umask of a usual shell (022) around the test; the station must not rely on it."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def private_env(station_env):
    cfg = station_env / "station.toml"
    cfg.write_text('station_id = "test-station"\ndatabase = "var/db/station.db"\nprofiles_dir = "profiles"\n'
                   'default_profile = "relay"\nkey_file = "var/keys/station.key"\n'
                   'signing_key = "var/keys/station-ed25519.pem"\nsecrets_file = "var/secrets/secrets.enc"\n')
    return station_env


def station(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **SECRET_ENV, "STATION_CONFIG": str(cwd / "station.toml")}
    return subprocess.run([sys.executable, "-m", "station", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, input=stdin, timeout=300, preexec_fn=lambda: os.umask(0o022))


def test_record_keys_secrets_and_exports_are_0600_in_0700_folders(private_env):
    r = station("flash", "--virtual", "1", "--json", cwd=private_env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = station("secrets", "set", "wifi", cwd=private_env, stdin="a-wifi-password\n")
    assert r.returncode == 0, r.stderr
    r = station("export", "--format", "csv", "--out", str(private_env / "units.csv"), cwd=private_env)
    assert r.returncode == 0, r.stderr
    var = private_env / "var"
    files = [var / "db/station.db", var / "keys/station.key", var / "keys/station-ed25519.pem",
             var / "secrets/secrets.enc", private_env / "units.csv", private_env / "units.csv.manifest.json",
             private_env / "units.csv.manifest.sig", private_env / "units.csv.pub.pem"]
    folders = [var, var / "db", var / "keys", var / "secrets", var / "db/station.db.sessions"]
    assert {str(p.relative_to(private_env)): oct(mode(p)) for p in files} == \
        {str(p.relative_to(private_env)): "0o600" for p in files}
    assert {str(p.relative_to(private_env)): oct(mode(p)) for p in folders} == \
        {str(p.relative_to(private_env)): "0o700" for p in folders}


def test_the_wal_the_spool_and_its_rejects_are_0600(private_env, shell_umask):
    ctx = open_station(config=private_env / "station.toml", env={**os.environ, **SECRET_ENV})
    db = private_env / "var/db/station.db"
    try:
        ctx.record.add(Attempt(port="p", station_id="test-station", profile="relay", profile_hash="h",
                               started_at=now_iso(), ended_at=now_iso()))
        wal, shm = db.with_name("station.db-wal"), db.with_name("station.db-shm")
        assert wal.exists() and shm.exists()  # an open WAL database
        assert [oct(mode(p)) for p in (db, wal, shm)] == ["0o600"] * 3
    finally:
        ctx.close()
    # a finish the database cannot take goes to the spool; a forged spool line to the rejected file
    holder = sqlite3.connect(db)  # another program holding the database
    holder.execute("BEGIN EXCLUSIVE")
    record = Record(db, ctx.key, busy_timeout_s=0.1)
    try:
        w = record.add(Attempt(port="p", station_id="test-station", profile="relay", profile_hash="h",
                               started_at=now_iso(), ended_at=now_iso()))
        assert w.spooled, w
    finally:
        record.close()
        holder.rollback()
        holder.close()
    spool = db.with_name("station.db.spool")
    assert oct(mode(spool)) == "0o600"
    with open(spool, "a") as f:
        f.write(json.dumps({"hmac": "0" * 64, "body": "{}"}) + "\n")
    Record(db, ctx.key).close()  # replays: the good line applied, the forged one set aside
    assert oct(mode(db.with_name("station.db.spool.rejected"))) == "0o600"


# -- nmcli -----------------------------------------------------------------------------------

BOOT = parse_boot_log('I (301) wifi_ap: access point "2Smart Relay AP" started\nAP IP address: 192.168.4.1\n')
MAC = bytes.fromhex("240ac41234ff")


def fake_nmcli(folder: Path, log: Path, file_mode: int = 0o755) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nmcli"
    exe.write_text(f'#!/bin/sh\necho "ARGS $*" >> {log}\nenv >> {log}\nexit 0\n')
    exe.chmod(file_mode)
    return exe


def test_nmcli_runs_by_absolute_path_with_nothing_of_the_environment(tmp_path, monkeypatch):
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    log = tmp_path / "nmcli.log"
    exe = fake_nmcli(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{exe.parent}:{os.environ['PATH']}")
    settings = SmokeDefaults(reach="wifi", wifi_interface="wlx-test", timeout_s=5)
    calls = []

    def run(cmd, **kw):  # the seam: what the station asks of the operating system
        calls.append((cmd, kw))
        return subprocess.run(cmd, **kw)

    reach = WifiReach(settings, run=run)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # found once: a later PATH changes nothing
    reach.open(BOOT, MAC, None)
    reach.close()
    assert [cmd[0] for cmd, _ in calls] == [str(exe), str(exe)]
    assert [kw["env"] for _, kw in calls] == [dict(NMCLI_ENV)] * 2
    assert dict(NMCLI_ENV) == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
    seen = log.read_text()  # the environment nmcli really got
    assert "ARGS --wait 5 device wifi connect 2Smart Relay AP bssid 24:0a:c4:12:35:00 ifname wlx-test" in seen
    assert "LANG=C" in seen and "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in seen
    for name, value in SECRET_ENV.items():
        assert name not in seen and value not in seen


def test_open_station_finds_nmcli_once_and_refuses_a_missing_one(station_env, tmp_path, monkeypatch):
    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text() + '\n[smoke]\nreach = "wifi"\n')
    exe = fake_nmcli(tmp_path / "bin", tmp_path / "nmcli.log")
    monkeypatch.setenv("PATH", str(exe.parent))
    ctx = open_station(config=cfg)
    try:
        monkeypatch.setenv("PATH", "/nonexistent")
        assert ctx.make_reach(ctx.station.smoke).nmcli == str(exe)
    finally:
        ctx.close()
    with pytest.raises(ConfigError, match="reach = wifi: nmcli is not installed"):
        open_station(config=cfg)


@pytest.mark.parametrize("how", ["file writable by others", "folder writable by others", "owned by another user"])
def test_an_nmcli_that_another_user_could_replace_is_refused(tmp_path, how):
    exe = fake_nmcli(tmp_path / "bin", tmp_path / "nmcli.log")
    if how == "file writable by others":
        exe.chmod(0o777)
    elif how == "folder writable by others":
        exe.parent.chmod(0o777)
    else:
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(exe, 4321, 4321)
    with pytest.raises(SmokeFailure, match="can be changed by other users"):
        resolve_nmcli(path=str(exe.parent))
    exe.chmod(0o755)
    exe.parent.chmod(0o755)
    if how != "owned by another user":
        assert resolve_nmcli(path=str(exe.parent)) == str(exe)
