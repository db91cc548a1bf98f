"""Secure production attacked as the threat model says it must hold (README "Threat model", issue #18).

The attacker uses the real tools: esptool, espefuse and espsecure against a unit the
station provisioned, `sqlite3` on the station's database file, and the station's own CLI
in a subprocess. The oracles are outside the code under test: the flash-encryption key is
taken from where silicon keeps it (the board's eFuse array in its state dir, read back in
the engine's byte order), what the board holds is read by espefuse, and what boots is what
the virtual bootloader prints.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest
from esptool import cmds
from esptool.util import FatalError

from flashing.firmware import DEFAULT_PARTITIONS, build_firmware, twosmart_manifest
from flashing.images import Partition
from flashing.nvs import NvsError, read_partition
from flashing.secure import burn_plan, sign_image
from flashing.virtual.bench import VirtualBench
from tests.conftest import esptool_cli, wait_until
from tests.flashing.test_efuse import espefuse_cli
from tests.station.conftest import TOKEN, json_lines, run_station, run_station_process
from tests.station.test_secure_profile import CONFIG, KEYS, kill_mid_burn, secure_profile

SSID, PSK = "Ws-Hq4Lz8P", "Wp%Z3#q=L m8/Ux+"  # the unit's own Wi-Fi: secrets the config carries
KEY_BLOCK = 4  # ESP32-C3: BLOCK_KEY0, where the station burns the XTS-AES-128 key


@pytest.fixture
def wifi_env(station_env, monkeypatch):
    monkeypatch.setenv("RELAY_WIFI_SSID", SSID)
    monkeypatch.setenv("RELAY_WIFI_PASSWORD", PSK)
    return station_env


def bench(env: Path, n: int = 1) -> VirtualBench:
    """ESP32-C3 boards whose eFuses and flash persist in the env's state dir, where the tests read silicon."""
    return VirtualBench(n, "esp32c3", run_dir=env / "run", state_dir=env / "state")


def silicon_key(env: Path, index: int = 0) -> bytes:
    """The flash-encryption key as the chip holds it: BLOCK_KEY0 from the eFuse state file, in the engine's order.

    espefuse burns a key file's bytes reversed into the block, so the key the station made is the block reversed.
    """
    saved = json.loads((env / "state" / f"device-{index}.efuse.json").read_text())
    block = struct.pack("<8I", *(int(w, 16) for w in saved["blocks"][KEY_BLOCK][:8]))
    assert any(block), "no key burned in BLOCK_KEY0"
    return block[::-1]


def key_forms(key: bytes) -> dict[str, bytes]:
    """Every form the redactor claims to remove, of the key and of its eFuse byte order (as espefuse shows it)."""
    forms = {}
    for order, k in (("key", key), ("key as burned (reversed)", key[::-1])):
        forms.update({f"{order} raw": k, f"{order} hex": k.hex().encode(), f"{order} HEX": k.hex().upper().encode(),
                      f"{order} base64": base64.b64encode(k).rstrip(b"="),
                      f"{order} base64url": base64.urlsafe_b64encode(k).rstrip(b"=")})
    return forms


def secret_forms() -> dict[str, bytes]:
    forms = {}
    for name, value in (("token", TOKEN), ("Wi-Fi PSK", PSK), ("SSID", SSID)):
        raw = value.encode()
        forms.update({name: raw, f"{name} hex": raw.hex().encode(), f"{name} HEX": raw.hex().upper().encode(),
                      f"{name} base64": base64.b64encode(raw).rstrip(b"="),
                      f"{name} base64url": base64.urlsafe_b64encode(raw).rstrip(b"=")})
    return forms


def found(forms: dict[str, bytes], where: dict[str, bytes]) -> list[str]:
    return [f"{name} in {place}" for place, data in where.items() for name, form in forms.items() if form in data]


def provision(env: Path, capsys, *urls: str, args: tuple[str, ...] = ()) -> list[dict]:
    rc, out, err = run_station(capsys, "flash", *[a for u in urls for a in ("--port", u)], "--json", *args)
    finished = [e for e in json_lines(out) if e["event"] == "unit_finished"]
    assert rc == 0 and all(f["outcome"] == "passed" for f in finished), (finished, err[-2000:])
    return finished


def read_regions(url: str, regions: list[tuple[int, int]]) -> dict[int, bytes]:
    """Regions read with esptool's read_flash over one connection (its stub, as `esptool read-flash` does)."""
    esp = cmds.detect_chip(url, connect_mode="default-reset")
    try:
        esp = cmds.run_stub(esp)
        esp.change_baud(921600)
        return {offset: esp.read_flash(offset, size) for offset, size in regions}
    finally:
        esp._port.close()


def efuses(url: str) -> tuple[dict, str]:
    """Every eFuse as espefuse reads it off the board (`summary --format json`), and espefuse's whole output."""
    r = espefuse_cli(url, "esp32c3", "summary", "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout[r.stdout.index("{"):]), r.stdout + r.stderr


def firmware(version: str = "1.4.2", project: str = "relay"):
    return build_firmware("esp32c3", project=project, version=version, app_size=150_000,
                          partitions=DEFAULT_PARTITIONS + [Partition("nvs_keys", 1, 4, KEYS, 0x1000)],
                          manifest=twosmart_manifest(encrypted=True))


def boot(dev) -> str:
    dev.reset("app")
    wait_until(lambda: dev.state()["mode"] in ("app", "bootloop", "config-error"), "the board to boot")
    return dev.console_text()


# -- 1. a shipped unit and a USB cable ------------------------------------------------------------

@pytest.mark.parametrize("mode, key", [("development", "station"), ("release", "station"), ("release", "chip"),
                                       pytest.param("development", "chip", marks=pytest.mark.slow)])
def test_a_usb_cable_reads_no_secret_off_a_shipped_unit(wifi_env, capsys, tmp_path, mode, key):
    """esptool read-flash of everything the station wrote, espefuse summary and dump: ciphertext and zeros.

    `key`: made by the station, or by the chip on its first boot ([security] key = "chip")."""
    if key == "chip":
        secure_profile(wifi_env, "esp32c3", mode, extra='key = "chip"\n', built=mode)
    else:
        secure_profile(wifi_env, "esp32c3", mode)
    with bench(wifi_env) as b:
        url, dev = b[0].url, b[0].device
        provision(wifi_env, capsys, url)
        assert dev.call(lambda: dev.runtime.config["psk"]) == PSK  # the unit itself holds and decrypts them
        key = silicon_key(wifi_env)
        fw = firmware()
        app_end = 0x10000 + len(fw.app)
        regions = read_regions(url, [(0, 0x9000), (0x10000, app_end - 0x10000), (CONFIG, 0x6000), (KEYS, 0x1000)])
        fuses, summary = efuses(url)
        dump = espefuse_cli(url, "esp32c3", "dump")
        plain_keys = dev.call(lambda: dev.cache_read(KEYS, 64))  # the NVS keys as the app reads them
    where = {f"read-flash 0x{offset:x}": data for offset, data in regions.items()}
    assert found(secret_forms() | key_forms(key), where) == []
    with pytest.raises(NvsError):
        read_partition(regions[CONFIG])
    assert plain_keys not in regions[KEYS]  # the nvs_keys partition is ciphertext too
    app = regions[0x10000]
    assert app != fw.app[:len(app)] and app[0] != 0xE9  # no app image to patch or read strings from
    assert regions[0][fw.bootloader_offset] != 0xE9 and regions[0][0x8000:0x8002] != b"\xaa\x50"  # nor a table
    # espefuse: the key block is read-protected and reads as zeros, in every view
    assert dump.returncode == 0, dump.stdout + dump.stderr
    assert found(key_forms(key), {"espefuse summary": summary.encode(), "espefuse dump": dump.stdout.encode()}) == []
    assert fuses["BLOCK_KEY0"]["readable"] is False and int(fuses["BLOCK_KEY0"]["raw_value"], 16) == 0
    assert fuses["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
    line = next(ln for ln in dump.stdout.splitlines() if ln.startswith("BLOCK_KEY0 "))
    assert line.split("dump:")[1].split() == ["00000000"] * 8, line


def write_flash(url: str, *args: str) -> subprocess.CompletedProcess:
    return esptool_cli("--chip", "esp32c3", "-p", url, "-b", "921600", "write-flash", *args)


def test_a_release_unit_takes_no_firmware_over_usb(station_env, capsys, tmp_path):
    """A patched app: an encrypted write is refused by esptool and the chip; a forced plaintext one does not boot."""
    secure_profile(station_env, "esp32c3", "release")
    patched = tmp_path / "patched.bin"
    patched.write_bytes(firmware(version="6.6.6").app)
    with bench(station_env) as b:
        url, dev = b[0].url, b[0].device
        provision(station_env, capsys, url)
        shipped = dev.flash.read(0, 0x200000)

        r = write_flash(url, "--encrypt", "0x10000", str(patched))
        assert r.returncode != 0 and "encrypt functionality in UART download mode disabled" in r.stdout + r.stderr
        esp = cmds.detect_chip(url, connect_mode="default-reset")
        try:  # below esptool's own check, the chip refuses an encrypted write (DIS_DOWNLOAD_MANUAL_ENCRYPT)
            with pytest.raises(FatalError):
                cmds.run_stub(esp).flash_begin(len(patched.read_bytes()), 0x10000, encrypted_write=True)
        finally:
            esp._port.close()
        r = write_flash(url, "0x10000", str(patched))
        assert r.returncode != 0 and "Flashing plaintext data may brick your device" in r.stdout + r.stderr
        assert dev.flash.read(0, 0x200000) == shipped

        r = write_flash(url, "--force", "0x10000", str(patched))  # the attacker insists: written in plaintext
        assert r.returncode == 0, r.stdout + r.stderr
        log = boot(dev)
        assert dev.state()["mode"] == "bootloop", log
    assert "esp_image: image at 0x10000 has invalid magic byte (nothing flashed here?)" in log  # decrypted to noise
    assert "6.6.6" not in log


def test_encryption_turned_off_on_a_development_unit_shows_only_ciphertext(station_env, capsys, tmp_path):
    """Development mode lets the crypt count go even (documented): the board then boots nothing it was shipped
    with, a plaintext firmware of the attacker's own boots and finds only ciphertext where the config was."""
    secure_profile(station_env, "esp32c3", "development")
    fw = firmware()
    files = []
    for offset, data in fw.regions():
        files += [hex(offset), str(tmp_path / f"plain-{offset:x}.bin")]
        Path(files[-1]).write_bytes(data)
    with bench(station_env) as b:
        url, dev = b[0].url, b[0].device
        provision(station_env, capsys, url)
        config = dev.flash.read(CONFIG, 0x6000)
        r = espefuse_cli(url, "esp32c3", "--do-not-confirm", "burn-efuse", "SPI_BOOT_CRYPT_CNT", "3")
        assert r.returncode == 0, r.stdout + r.stderr
        log = boot(dev)
        assert dev.state()["mode"] == "bootloop" and "invalid header" in log, log  # the ROM reads its ciphertext

        r = write_flash(url, *files)  # everything but the config and its keys, in plaintext
        assert r.returncode == 0, r.stdout + r.stderr
        log = boot(dev)
        assert "app_init: App version:      1.4.2" in log, log
        assert "config error" in log  # the firmware finds no NVS where the config was: ciphertext
        assert dev.call(lambda: dict(dev.runtime.config)) == {}
        assert dev.flash.read(CONFIG, 0x6000) == config

        # encryption on again (the count's last bit): the plaintext firmware is noise now; no bit is left to turn it off
        r = espefuse_cli(url, "esp32c3", "--do-not-confirm", "burn-efuse", "SPI_BOOT_CRYPT_CNT", "7")
        assert r.returncode == 0, r.stdout + r.stderr
        log = boot(dev)
        assert dev.state()["mode"] == "bootloop", log
        assert efuses(url)[0]["SPI_BOOT_CRYPT_CNT"]["raw_value"] in ("0x7", 7)


def test_encryption_cannot_be_turned_off_on_a_release_unit(station_env, capsys):
    """Release mode burns every bit of the crypt count (ESP-IDF's "permanent encryption"): no burn makes it even."""
    secure_profile(station_env, "esp32c3", "release")
    with bench(station_env) as b:
        url, dev = b[0].url, b[0].device
        provision(station_env, capsys, url)
        assert dev.call(lambda: dev.efuse.burned_field("SPI_BOOT_CRYPT_CNT")) == 7
        espefuse_cli(url, "esp32c3", "--do-not-confirm", "burn-efuse", "SPI_BOOT_CRYPT_CNT", "3")
        assert dev.call(lambda: dev.efuse.burned_field("SPI_BOOT_CRYPT_CNT")) == 7
        log = boot(dev)
        assert dev.state()["mode"] == "app" and "flash encryption is enabled (0 plaintext flashes left)" in log, log


def rsa_key(path: Path) -> Path:
    """An RSA-3072 signing key as `espsecure generate-signing-key --version 2` makes one (PEM), made in-process."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    return path


def with_secure_boot_key(env: Path) -> Path:
    key = rsa_key(env / "secure-boot.pem")  # a station file, outside profiles/
    with open(env / "station.toml", "a") as f:
        f.write(f'secure_boot_key = "{key.name}"\n')
    return key


def secure_boot_unit(env: Path, capsys, b: VirtualBench) -> Path:
    """A development-mode unit with Secure Boot v2 on, provisioned by the station; the station's signing key."""
    key = with_secure_boot_key(env)
    secure_profile(env, "esp32c3", "development", extra="secure_boot = true\n")
    provision(env, capsys, b[0].url)
    return key


def test_a_secure_boot_unit_boots_no_firmware_but_the_stations(station_env, capsys, tmp_path):
    """Development mode lets anyone with the cable write encrypted (esptool --encrypt, by design): secure boot is
    what stands. An app signed by another key, an unsigned app, a bootloader signed by another key: none boots."""
    other = rsa_key(tmp_path / "attacker.pem")
    fw = firmware(version="6.6.6")
    app, bootloader = tmp_path / "app.bin", tmp_path / "bootloader.bin"
    app.write_bytes(fw.app)
    bootloader.write_bytes(fw.bootloader)
    (tmp_path / "app.signed").write_bytes(sign_image(fw.app, other))  # espsecure sign-data --version 2
    (tmp_path / "bootloader.signed").write_bytes(sign_image(fw.bootloader, other))
    with bench(station_env) as b:
        url, dev = b[0].url, b[0].device
        secure_boot_unit(station_env, capsys, b)
        # the unsigned app is as long as the station's: behind it lies the station's signature sector, of another image
        for image, offset, words in ((app, 0x10000, "Secure Boot V2 verification failed."),
                                     (tmp_path / "app.signed", 0x10000, "Secure Boot V2 verification failed."),
                                     (tmp_path / "bootloader.signed", 0, "secure boot verification failed")):
            r = write_flash(url, "--encrypt", hex(offset), str(image))
            assert r.returncode == 0, r.stdout + r.stderr
            log = boot(dev)
            assert dev.state()["mode"] == "bootloop" and words in log, (image.name, log)
            assert "6.6.6" not in log


@pytest.mark.slow  # an open gap, not a regression guard: its XPASS will come with a rewrite of this test
@pytest.mark.xfail(strict=True, reason="no anti-rollback: the station burns no SECURE_VERSION and the virtual "
                   "bootloader checks none, so an older app signed with the station's key boots")
def test_a_downgrade_to_an_older_signed_app_does_not_boot(station_env, capsys, tmp_path):
    old = tmp_path / "old.bin"
    with bench(station_env) as b:
        url, dev = b[0].url, b[0].device
        key = secure_boot_unit(station_env, capsys, b)
        old.write_bytes(sign_image(firmware(version="1.3.0").app, key))  # the vendor's earlier release
        r = write_flash(url, "--encrypt", "0x10000", str(old))
        assert r.returncode == 0, r.stdout + r.stderr
        log = boot(dev)
        assert "App version:      1.3.0" not in log and dev.state()["mode"] != "app", log


def test_a_secure_boot_units_digest_cannot_be_read_protected(station_env, capsys):
    """RD_DIS write-protected once the keys are burned: the digest block stays readable, the unit keeps booting."""
    with bench(station_env) as b:
        url, dev = b[0].url, b[0].device
        secure_boot_unit(station_env, capsys, b)
        r = espefuse_cli(url, "esp32c3", "--do-not-confirm", "burn-efuse", "RD_DIS", "2")  # BLOCK_KEY1, the digest
        assert r.returncode != 0, r.stdout + r.stderr
        assert dev.call(lambda: dev.efuse.burned_field("RD_DIS")) == 1  # the flash-encryption key's bit only
        log = boot(dev)
        assert dev.state()["mode"] == "app", log


# -- 2. someone with the database file or an export ------------------------------------------------

def station_key(env: Path) -> bytes:
    return bytes.fromhex((env / "station.key").read_text())


def rows(env: Path, sql: str = "select * from attempts order by id", args=()) -> list[dict]:
    con = sqlite3.connect(env / "station.db")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    finally:
        con.close()


def edit(env: Path, sql: str, args=()) -> None:
    """The attacker's edit of the database file, with sqlite3 (the station is not running)."""
    con = sqlite3.connect(env / "station.db")
    try:
        con.execute(sql, args)
        con.commit()
    finally:
        con.close()


def db_verify(env: Path) -> subprocess.CompletedProcess:
    return run_station_process("db", "verify", cwd=env)


def test_the_escrow_opens_only_with_the_station_key_and_its_own_attempt(station_env, capsys):
    from cryptography.exceptions import InvalidTag

    from station.keys import unescrow

    secure_profile(station_env, "esp32c3", "development")
    with bench(station_env, 2) as b:
        provision(station_env, capsys, b[0].url, b[1].url)
        a, b_ = (next(r for r in rows(station_env) if r["port"] == slot.url) for slot in b)
    key = station_key(station_env)
    assert unescrow(key, a["uid"], a["key_escrow"]) == silicon_key(station_env, 0)
    assert unescrow(key, b_["uid"], b_["key_escrow"]) == silicon_key(station_env, 1)
    with pytest.raises(InvalidTag):  # a copy of the database, without var/station.key
        unescrow(os.urandom(32), a["uid"], a["key_escrow"])
    with pytest.raises(InvalidTag):  # sealed to its attempt: under another attempt's uid it does not open
        unescrow(key, b_["uid"], a["key_escrow"])


@pytest.mark.parametrize("move", ["escrow to the other board's row", "row to the other board's MAC"])
def test_a_rework_refuses_an_escrow_moved_in_the_database_and_writes_nothing(station_env, capsys, move):
    """Board A's escrow placed where board B's rework finds it: the rework refuses, B's flash and eFuses untouched."""
    secure_profile(station_env, "esp32c3", "development")
    with bench(station_env, 2) as b:
        provision(station_env, capsys, b[0].url, b[1].url)
        by_port = {r["port"]: r for r in rows(station_env)}
        a, victim = by_port[b[0].url], by_port[b[1].url]
        if move == "escrow to the other board's row":
            edit(station_env, "update attempts set key_escrow = ? where uid = ?", [a["key_escrow"], victim["uid"]])
        else:  # the MACs swapped: B's rework looks up B's MAC and finds A's row, whose uid opens A's escrow
            edit(station_env, "update attempts set mac = ? where uid = ?", [victim["mac"], a["uid"]])
            edit(station_env, "update attempts set mac = ? where uid = ?", [a["mac"], victim["uid"]])
        dev = b[1].device
        efuse_file = station_env / "state" / "device-1.efuse.json"
        flash, fuses = dev.flash.read(0, 0x200000), efuse_file.read_bytes()
        dev.flash.erase(0x10000, 0x1000)  # the app damaged: the rework would write it again
        flash = dev.flash.read(0, 0x200000)
        rc, out, err = run_station(capsys, "flash", "--port", b[1].url, "--rework", "--json")
        finished = [e for e in json_lines(out) if e["event"] == "unit_finished"][0]
        assert finished["outcome"] == "error" and finished["failed_step"] == "secure", finished
        assert "escrow" in finished["error"] and "nothing was written" in finished["remedy"], finished
        assert finished["written_regions"] == []
        assert dev.flash.read(0, 0x200000) == flash and efuse_file.read_bytes() == fuses
    edited = victim if move.startswith("escrow") else a
    r = db_verify(station_env)
    assert r.returncode != 0 and f"attempt {edited['id']} was edited" in r.stdout + r.stderr


def test_edited_burn_lists_and_forged_burn_entries_fail_db_verify(station_env, capsys):
    """What the record says was burned on a board cannot be changed, forged or dropped without the station's key."""
    import hashlib

    secure_profile(station_env, "esp32c3", "release")
    with bench(station_env) as b:
        provision(station_env, capsys, b[0].url)
    assert run_station(capsys, "db", "verify")[0] == 0
    attempt = rows(station_env)[0]
    burns = json.loads(attempt["burns"])
    assert [b["state"] for b in burns] == ["done"] * len(burns) and len(burns) == len(burn_plan("esp32c3", "release"))
    entries = rows(station_env, "select * from journal where kind = 'burn' order by id")
    assert len(entries) == 1 + 2 * len(burns)  # the plan, then burning and done for each
    head = rows(station_env, "select * from journal order by id desc limit 1")[0]
    pending = json.dumps([{**b, "state": "pending"} for b in burns], sort_keys=True)
    body = json.loads(entries[0]["body"])
    forged = json.dumps({**body, "burns": pending}, sort_keys=True, separators=(",", ":"))

    def unkeyed(prev: str, entry: dict) -> str:  # the hash an attacker without the station's key can make
        fields = {k: entry[k] for k in ("station_id", "kind", "attempt_uid", "at", "body", "unit")}
        return hashlib.sha256((prev + json.dumps(fields, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()

    new = {**entries[0], "body": forged, "at": head["at"]}
    cases = [  # (edit, undo, what db verify must say)
        ("update attempts set burns = ? where uid = ?", [pending, attempt["uid"]],
         "update attempts set burns = ? where uid = ?", [attempt["burns"], attempt["uid"]],
         f"attempt {attempt['id']} was edited"),
        ("update journal set body = ? where id = ?", [forged, entries[-1]["id"]],
         "update journal set body = ? where id = ?", [entries[-1]["body"], entries[-1]["id"]],
         f"journal entry {entries[-1]['id']} was edited"),
        ("insert into journal (id, station_id, kind, attempt_uid, at, body, unit, prev_hash, entry_hash) "
         "values (?, ?, 'burn', ?, ?, ?, ?, ?, ?)",
         [head["id"] + 1, head["station_id"], attempt["uid"], new["at"], forged, new["unit"], head["entry_hash"],
          unkeyed(head["entry_hash"], new)],
         "delete from journal where id = ?", [head["id"] + 1],
         f"journal entry {head['id'] + 1} was edited after it was recorded, or written without the station's key"),
        ("delete from journal where id = ?", [entries[3]["id"]],
         "insert into journal select * from temp_saved", [],
         f"journal entry {entries[3]['id'] + 1} does not follow the entry before it"),
    ]
    edit(station_env, "create table temp_saved as select * from journal where id = ?", [entries[3]["id"]])
    for sql, args, undo, undo_args, words in cases:
        edit(station_env, sql, args)
        rc, out, err = run_station(capsys, "db", "verify")
        assert rc != 0 and words in out + err, (words, out, err)
        edit(station_env, undo, undo_args)
        rc, out, err = run_station(capsys, "db", "verify")  # the edit undone: the record is whole again
        assert rc == 0, (words, out, err)


def test_the_unit_redactor_removes_the_flash_key_in_every_encoding_the_redactor_claims():
    """hex either case, base64 and base64url (padded or not), in the key's order and in the eFuse's (espefuse's)."""
    from station.pipeline import _key_forms, _UnitRedactor
    from station.secrets import NO_SECRETS

    key = bytes([0xFB, 0xEF, 0xFF] * 10 + [0x3E, 0x3F])  # its base64 holds "+" and "/": base64url differs
    redact = _UnitRedactor(NO_SECRETS)
    redact.learn(_key_forms(key))
    for name, form in key_forms(key).items():
        if not name.endswith("raw"):  # raw bytes are not text: the file tests grep for them
            text = f"espefuse said: {form.decode()} (end)"
            assert form.decode() not in redact(text) and redact(text).endswith(" (end)"), (name, redact(text))


def test_the_flash_key_is_nowhere_the_station_writes(station_env, tmp_path):
    """A secure run and a rework: the database and its WAL, the spool, every export file, --json and stderr."""
    from station.events import StepStarted
    from station.keys import unescrow
    from station.pipeline import UnitJob, provision_unit
    from station.runner import open_station

    secure_profile(station_env, "esp32c3", "development")
    where: dict[str, bytes] = {}
    with bench(station_env) as b:
        url = b[0].url
        r = run_station_process("flash", "--port", url, "--json", cwd=station_env)
        assert r.returncode == 0, r.stderr[-2000:]
        where.update({"flash --json stdout": r.stdout.encode(), "flash stderr": r.stderr.encode()})
        key = silicon_key(station_env)

        # a rework whose finish goes to the spool: the database taken by another program once the unit boots
        ctx = open_station(config=station_env / "station.toml")
        holder = sqlite3.connect(station_env / "station.db")

        def emit(event) -> None:
            if isinstance(event, StepStarted) and event.step == "smoke":
                holder.execute("BEGIN EXCLUSIVE")

        try:
            result = provision_unit(UnitJob(url, rework=True), ctx, emit)
            # the WAL holds this run's burn-free entries and the first run's are in the file: read both now
            where.update({p.name + " (held)": p.read_bytes() for p in station_env.glob("station.db*") if p.is_file()})
        finally:
            holder.rollback()
            holder.close()
            ctx.close()
        assert result.recorded == "spool", result
    where.update({p.name: p.read_bytes() for p in station_env.glob("station.db*") if p.is_file()})
    assert any(n.endswith("-wal (held)") for n in where) and any(".spool" in n for n in where), sorted(where)
    for fmt in ("csv", "jsonl"):
        r = run_station_process("export", "--format", fmt, "--out", str(tmp_path / f"units.{fmt}"), "--outcome", "any",
                                cwd=station_env)
        assert r.returncode == 0, r.stderr
        where[f"export {fmt} output"] = (r.stdout + r.stderr).encode()
    r = run_station_process("db", "verify", cwd=station_env)
    where["db verify output"] = (r.stdout + r.stderr).encode()
    where.update({p.name: p.read_bytes() for p in tmp_path.glob("units.*")})
    assert len([n for n in where if n.startswith("units.")]) >= 8  # data, journal, manifest, signature: each format
    assert found(key_forms(key), where) == []
    escrows = [r["key_escrow"] for r in rows(station_env)]
    assert len(escrows) == 2 and all(unescrow(station_key(station_env), r["uid"], r["key_escrow"]) == key
                                     for r in rows(station_env))  # the record holds the key: sealed, twice


# -- 3. the kill -9 and the burn record ------------------------------------------------------------

PLAN = burn_plan("esp32c3", "release", secure_boot=True)  # 9 burns, 12 eFuse program commands
PROGRAMS = 12


def board_shows(fuses: dict) -> dict[str, str]:
    """Each burn of the plan as espefuse reads the board: "all" of its effects, "none", or "part"."""
    def raw(name: str) -> int:
        return int(str(fuses[name]["raw_value"]), 0)

    def blank(name: str) -> bool:
        return fuses[name]["readable"] and raw(name) == 0

    shows = {}
    for b in PLAN:
        effects = [raw(f) & v == v for f, v in b.values] + [not fuses[f]["writeable"] for f in b.protect]
        if b.name == "key":
            effects += [not blank("BLOCK_KEY0"), fuses["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY",
                        not fuses["BLOCK_KEY0"]["readable"]]
        elif b.name == "secure-boot-digest":
            effects += [not blank("BLOCK_KEY1"), fuses["KEY_PURPOSE_1"]["value"] == "SECURE_BOOT_DIGEST0"]
        shows[b.name] = "all" if all(effects) else "none" if not any(effects) else "part"
    return shows


def kill_at_burn(env: Path, dev, url: str, programs_done: int) -> None:
    """`station flash` killed -9 as the chip's next eFuse program starts; then the board powered back."""
    kill_mid_burn(env, dev, url, programs_done)
    dev.clear_faults()
    dev.reset("download")  # power back: the chip reloads its eFuses


@pytest.mark.parametrize("programs_done", [
    # by default: mid-key (its block burned, its purpose not), mid secure-boot lock (RD_DIS not yet protected),
    # and release mode's crypt count to its maximum; program 2 (the count) is in test_secure_profile.py
    n if n in (1, 8, 10) else pytest.param(n, marks=pytest.mark.slow) for n in range(PROGRAMS)])
def test_a_kill_at_each_burn_is_settled_as_exactly_what_the_board_shows(station_env, tmp_path, programs_done):
    """Killed as each eFuse program command starts (release mode with secure boot: every kind of burn); the next
    command settles the attempt, and its words are what espefuse reads off the board afterwards."""
    with_secure_boot_key(station_env)
    secure_profile(station_env, "esp32c3", "release", extra="secure_boot = true\n")
    with bench(station_env) as b:
        kill_at_burn(station_env, b[0].device, b[0].url, programs_done)
        shows = board_shows(efuses(b[0].url)[0])
    # the board: every burn before the one that hung is whole, that one is not, none after it has begun
    order = [b.name for b in PLAN]
    hung = next(name for name in order if shows[name] != "all")
    assert all(shows[name] == "none" for name in order[order.index(hung) + 1:]), shows
    out = tmp_path / "all.jsonl"
    r = run_station_process("export", "--format", "jsonl", "--out", str(out), "--outcome", "any", cwd=station_env)
    assert r.returncode == 0, r.stderr
    row = json_lines(out.read_text())[0]  # the auditor's view, after the next command settled it
    assert row["outcome"] == "interrupted"
    burns = row["burns"] if isinstance(row["burns"], list) else json.loads(row["burns"])
    by_name = {b.describe(): b.name for b in PLAN}
    for entry in burns:  # whole on the board: done; untouched: pending; the one that hung: burning
        name = by_name[entry["burn"]]
        assert entry["state"] == ("burning" if name == hung else {"all": "done", "none": "pending"}[shows[name]]), \
            (entry, shows)
    done = [b.describe() for b in PLAN if shows[b.name] == "all"]
    never = [b.describe() for b in PLAN if b.name != hung and shows[b.name] == "none"]
    words = [f"done: {'; '.join(done) or 'none'}",
             f"may or may not have happened: {next(b.describe() for b in PLAN if b.name == hung)}"]
    words += [f"not started: {'; '.join(never)}"] if never else []
    assert row["error"].startswith(f"interrupted: efuses partly burned ({', '.join(words)})"), row["error"]


@pytest.mark.parametrize("programs_done, words, mode", [
    (2, "has a flash-encryption key burned but encryption is not on", "development"),  # key done, crypt count 0
    # on a release profile the refusal says what happened to the board, not "release mode: cannot be re-flashed"
    (2, "has a flash-encryption key burned but encryption is not on", "release"),
    (1, "burning key (BLOCK_KEY0 purpose XTS_AES_128_KEY", "development"),  # the key block's data, its purpose not
])
def test_a_board_left_between_burns_is_refused_with_nothing_burned_or_written(station_env, capsys, programs_done,
                                                                            words, mode):
    """The station put back on a board its kill left half set up: it refuses, as plain flash and as a rework."""
    secure_profile(station_env, "esp32c3", mode)
    with bench(station_env) as b:
        url, dev = b[0].url, b[0].device
        kill_at_burn(station_env, dev, url, programs_done)
        efuse_file = station_env / "state" / "device-0.efuse.json"
        fuses, flash = efuse_file.read_bytes(), dev.flash.read(0, 0x200000)
        assert flash == b"\xff" * 0x200000  # the kill came before anything was written
        for rework in ((), ("--rework",)):
            rc, out, err = run_station(capsys, "flash", "--port", url, "--json", *rework)
            finished = [e for e in json_lines(out) if e["event"] == "unit_finished"][0]
            assert finished["outcome"] == "failed" and finished["failed_step"] == "secure", finished
            assert words in finished["error"] and "set" in finished["remedy"] and "aside" in finished["remedy"], \
                finished
            assert efuse_file.read_bytes() == fuses and dev.flash.read(0, 0x200000) == flash, rework


def test_a_refused_key_burn_records_no_bits_of_the_key(station_env, capsys):
    """A board whose key block holds an earlier attempt's bits: espefuse refuses the new key, and its words are the
    new key ORed with the old one — which must reach neither the record nor the output."""
    import re

    secure_profile(station_env, "esp32c3", "release")
    with bench(station_env) as b:
        url, dev = b[0].url, b[0].device
        kill_at_burn(station_env, dev, url, 1)  # the key block's data burned, its purpose not
        rc, out, err = run_station(capsys, "flash", "--port", url, "--json")
    row = rows(station_env)[-1]
    texts = {"error": row["error"] or "", "detail": row["detail"] or "", "stdout": out, "stderr": err}
    assert not [k for k, v in texts.items() if re.search(r"[0-9a-fA-F]{64}", v)], texts
