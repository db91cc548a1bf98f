"""Issue #13, item 6: the admin password, the secrets file, the firmware bytes, NVS keys.

The admin password is a bounded scrypt line checked in constant time with a doubling
delay; the secrets file refuses cost parameters out of bounds and short passphrases
for new files; each firmware file is read once, checked against its pin and flashed
from those bytes; NVS encryption is refused until the keys partition is protected;
per-lot keys need a lot; token fingerprints and lot keys come from keys derived per
purpose from the station's key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from flashing.firmware import build_firmware
from flashing.nvs import read_keys_partition, read_partition
from flashing.virtual.bench import VirtualBench
from station import admin, keys
from station.admin import AdminGate, AdminPasswordError, check_password, hash_password
from station.config import StationConfig
from station.pipeline import StationContext, UnitJob, load_firmware, provision_unit
from station.profile import ProfileError, check_profile, load_profile, resolve_secrets
from station.record import fingerprint, station_key
from station.runner import open_record, open_station
from station.secrets import SecretStore, SecretStoreError
from tests.station.conftest import TOKEN, run_station
from tests.station.test_audit import encrypted_profile

# -- the admin password ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_admin_password_is_a_bounded_scrypt_line():
    line = hash_password("twelve-chars!", log2_n=14)
    assert line.startswith("scrypt$14$8$1$") and "twelve" not in line
    assert check_password(line, "twelve-chars!") and not check_password(line, "twelve-chars?")
    assert hash_password("twelve-chars!", log2_n=14) != line  # salted
    with pytest.raises(AdminPasswordError, match="at least 12 characters"):
        hash_password("short")
    _, ln, r, p, salt, digest = line.split("$")
    for bad in (f"scrypt$23${r}${p}${salt}${digest}", f"scrypt${ln}$17${p}${salt}${digest}",
                f"scrypt${ln}${r}$5${salt}${digest}", f"scrypt$22$8$1${salt}${digest}",  # 4 GiB
                f"scrypt${ln}${r}${p}$c2FsdA==${digest}", "sha256$" + hashlib.sha256(b"x").hexdigest()):
        with pytest.raises(AdminPasswordError):
            check_password(bad, "twelve-chars!")


def test_admin_gate_backs_off_and_does_not_check_while_waiting(monkeypatch):
    clock = Clock()
    gate = AdminGate(hash_password("twelve-chars!", log2_n=14), clock=clock)
    checked = []
    real = admin.check_password
    monkeypatch.setattr(admin, "check_password", lambda s, p: (checked.append(p), real(s, p))[1])
    assert gate.check("wrong-one").message == "wrong admin password: next try in 1 s"
    # the right password during the delay: refused without being compared
    assert gate.check("twelve-chars!").message == "too many wrong admin passwords: try again in 1 s"
    assert checked == ["wrong-one"]
    clock.t += 1
    assert not gate.check("wrong-two").ok
    assert gate.wait_s() == 2  # doubled
    clock.t += 2
    assert gate.check("twelve-chars!").ok and gate.wait_s() == 0 and gate.failures == 0
    for _ in range(12):  # capped
        clock.t += 100
        gate.check("nope")
    assert gate.wait_s() == admin.MAX_DELAY_S


def test_admin_gate_locked_without_a_password_and_refuses_the_old_hash():
    assert "no admin password is set" in AdminGate(None).locked()
    legacy = AdminGate(None, hashlib.sha256(b"s3cret").hexdigest())
    assert legacy.locked() == admin.MIGRATE and not legacy.check("s3cret").ok
    assert "unusable" in AdminGate("garbage").locked()


def test_station_admin_set_password(station_env, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("too-short\n"))
    rc, _, err = run_station(capsys, "admin", "set-password")
    assert rc == 2 and "at least 12 characters" in err
    path = station_env / "var/admin-password"
    assert not path.exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long admin password\n"))
    rc, _, err = run_station(capsys, "admin", "set-password")
    assert rc == 0 and str(path) in err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    line = path.read_text().strip()
    assert line.startswith("scrypt$17$8$1$") and check_password(line, "a long admin password")
    gate = AdminGate.for_station(StationConfig.load(station_env / "station.toml"))
    assert gate.locked() is None


# -- the secrets file ----------------------------------------------------------------------------

def test_secrets_file_cost_parameters_and_passphrase(tmp_path):
    path = tmp_path / "secrets.enc"
    with pytest.raises(SecretStoreError, match="at least 12 characters"):
        SecretStore(path, "short-pass").save({"a": "1"})
    assert not path.exists()
    store = SecretStore(path, "a good long passphrase")
    store.set("token", "tok-1")
    doc = json.loads(path.read_text())
    assert (doc["kdf"]["n"], doc["kdf"]["r"], doc["kdf"]["p"]) == (2**17, 8, 1)
    assert store.load() == {"token": "tok-1"}
    good = dict(doc["kdf"])
    for change, words in (({"n": 2**23}, "2\\*\\*22"), ({"n": 3 * 2**15}, "power of two"), ({"r": 17}, "r must be"),
                          ({"p": 5}, "p 1..4"), ({"n": 2**22, "r": 8}, "MiB"), ({"n": "16384"}, "whole numbers"),
                          ({"salt": base64.b64encode(b"short").decode()}, "salt"), ({"name": "pbkdf2"}, "not scrypt")):
        path.write_text(json.dumps({**doc, "kdf": {**good, **change}}))
        with pytest.raises(SecretStoreError, match=words):
            SecretStore(path, "a good long passphrase").load()
    # a file written at the old N = 2**15 still opens; the next change re-saves it at today's cost
    from station import secrets as module

    path.unlink()
    old = module.SCRYPT_N
    module.SCRYPT_N = 2**15
    try:
        SecretStore(path, "a good long passphrase").set("token", "tok-2")
    finally:
        module.SCRYPT_N = old
    assert json.loads(path.read_text())["kdf"]["n"] == 2**15
    store.set("ssid", "x")
    assert json.loads(path.read_text())["kdf"]["n"] == 2**17 and store.load() == {"token": "tok-2", "ssid": "x"}


# -- the firmware bytes --------------------------------------------------------------------------

def test_firmware_is_read_once_and_a_file_swapped_after_the_check_is_refused(station_env):
    app = station_env / "profiles/relay/firmware/relay.bin"
    original = app.read_bytes()
    other = build_firmware("esp32", project="relay", version="6.6.6", app_size=150_000).app
    ctx = open_station("relay", station_env / "station.toml")
    try:
        app.write_bytes(other)  # swapped after the station loaded it
        with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
            result = provision_unit(UnitJob(bench[0].url), ctx, lambda e: None)
            assert result.outcome == "passed", result
            assert bench[0].device.flash.read(0x10000, len(original)) == original  # the bytes it checked
            assert result.firmware_version == "1.4.2"
        row = ctx.record.attempts(1)[0]
        assert json.loads(row["firmware_hashes"])["0x10000"] == hashlib.sha256(original).hexdigest()
    finally:
        ctx.close()
    # between `profile check` and loading: the load compares the bytes it read with the pin
    app.write_bytes(original)
    profile = load_profile(station_env / "profiles/relay")
    assert check_profile(profile) == []
    app.write_bytes(other)
    with pytest.raises(ProfileError, match="relay.bin: firmware region 0x10000: SHA-256 .* changed after"):
        load_firmware(profile)
    station = StationConfig.load(station_env / "station.toml")
    record = open_record(station)
    try:
        with pytest.raises(ProfileError, match="changed after the profile was loaded"):
            StationContext(station, profile, {}, record, b"k" * 32)
    finally:
        record.close()


# -- NVS encryption, per-lot keys and derived keys --------------------------------------------

def test_nvs_encryption_is_refused_without_flash_encryption(station_env, capsys):
    encrypted_profile(station_env, "per-unit")
    rc, _, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 2 and "config.encryption: 'per-unit' needs [security] flash_encryption" in err
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, _, _ = run_station(capsys, "flash", "--port", bench[0].url, "--json")
        assert rc == 2 and bench[0].device.flash.read(0x10000, 16) == b"\xff" * 16


def unchecked_station(env: Path) -> StationContext:
    """The pipeline with an encrypted profile, past `profile check` (which refuses it without flash encryption, see above)."""
    station = StationConfig.load(env / "station.toml")
    profile = load_profile(env / "profiles/relay")
    values, _ = resolve_secrets(profile)
    key = station_key(station.key_file)
    return StationContext(station, profile, values, open_record(station, None, key), key)


def test_per_lot_keys_need_a_lot_and_are_derived_for_that_purpose(station_env):
    encrypted_profile(station_env, "per-lot")
    ctx = unchecked_station(station_env)
    slot = ctx.profile.config_slot()
    try:
        with VirtualBench(4, "esp32", run_dir=station_env / "run") as bench:
            results = [provision_unit(UnitJob(s.url, lot=lot), ctx, lambda e: None)
                       for s, lot in zip(bench.slots, ("LOT-A", "LOT-A", "LOT-B", ""))]
            assert [r.outcome for r in results] == ["passed", "passed", "passed", "error"]
            assert results[3].failed_step == "config" and "per-lot NVS keys need a lot" in results[3].error
            assert bench[3].device.flash.read(slot.offset, 16) == b"\xff" * 16  # nothing written
            got = [read_keys_partition(s.device.flash.read(0x196000, 0x1000)) for s in bench.slots[:3]]
            for s, k in zip(bench.slots[:3], got):
                image = s.device.flash.read(slot.offset, slot.size)
                assert TOKEN.encode() not in image and read_partition(image, k)["2smart"]["token"] == TOKEN
        assert got[0] == got[1] != got[2]
        assert got[0] == keys.derive(ctx.key, "nvs-lot-keys/relay/LOT-A", 64)
        assert got[0] != hmac.new(ctx.key, b"nvs-lot:relay:LOT-A", "sha512").digest()  # not the station key itself
        rows = ctx.record.attempts()
    finally:
        ctx.close()
    # the token's fingerprint is keyed with its own derived key, not the station's key
    want = fingerprint(keys.derive(ctx.key, keys.TOKEN_FINGERPRINT), TOKEN)
    assert {r["token_fingerprint"] for r in rows if r["outcome"] == "passed"} == {want}
    assert want != fingerprint(ctx.key, TOKEN)
    stored = b"".join(p.read_bytes() for p in station_env.glob("station.db*") if p.is_file())
    assert not any(k in stored or k.hex().encode() in stored for k in got)


def test_derived_keys_differ_by_purpose():
    k = os.urandom(32)
    assert keys.derive(k, "a") == keys.derive(k, "a") != keys.derive(k, "b")
    assert len(keys.derive(k, "a", 64)) == 64 and keys.derive(k, "a") != k
    with pytest.raises(ValueError):
        keys.derive(k, "")


def test_per_unit_encrypted_config_round_trips_through_the_virtual_device(station_env):
    """The pipeline's NVS encryption itself, on a board without flash encryption (the secure profile adds it)."""
    from flashing.nvs import keys_partition, new_keys

    encrypted_profile(station_env, "per-unit")
    ctx = unchecked_station(station_env)
    slot = ctx.profile.config_slot()
    try:
        with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
            results = [provision_unit(UnitJob(s.url), ctx, lambda e: None) for s in bench.slots]
            assert [r.outcome for r in results] == ["passed", "passed"], results
            got = []
            for s in bench.slots:
                image = s.device.flash.read(slot.offset, slot.size)
                k = read_keys_partition(s.device.flash.read(0x196000, 0x1000))
                got.append(k)
                assert TOKEN.encode() not in image and read_partition(image, k)["2smart"]["token"] == TOKEN
                assert s.device.state()["app_mode"] == "ap"  # the board decrypted its config and came up
            assert got[0] != got[1]  # one set per unit
            dev = bench[0].device  # a board whose keys do not match its config fails its boot check
            dev.flash.erase(0x196000, 0x1000)
            dev.flash.program(0x196000, keys_partition(new_keys()))
            assert dev.reset("app")["app_mode"] == "config-error"
            assert "the NVS keys do not match" in dev.console_text()
    finally:
        ctx.close()
