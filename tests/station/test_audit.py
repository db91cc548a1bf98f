"""Audit: signed exports (checked by us and by OpenSSL), the hash chain, merge, secrets."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from flashing.virtual.bench import VirtualBench
from station.audit import ExportFilter, export, signing_key
from station.record import Attempt, Record, now_iso, station_key
from tests.station.conftest import TOKEN, pin_firmware, run_station

WIFI_PASSWORD = "wifi-Pa55-word"


def provision(capsys, env, count=2, *extra):
    with VirtualBench(count, "esp32", run_dir=env / "run") as bench:
        ports = sum((["--port", s.url] for s in bench.slots), [])
        rc, out, err = run_station(capsys, "flash", *ports, *extra)
        assert rc == 0, err
        return out, err, [s.device.mac_text for s in bench.slots]


def test_signed_export_verifies_with_station_and_openssl_and_edits_fail(station_env, capsys):
    provision(capsys, station_env, 2, "--lot", "LOT-7")
    out = station_env / "units.csv"
    rc, _, err = run_station(capsys, "export", "--out", str(out), "--lot", "LOT-7")
    assert rc == 0, err
    rc, text, _ = run_station(capsys, "export", "verify", str(out))
    assert rc == 0 and "verified" in text
    manifest = json.loads((station_env / "units.csv.manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["filters"] == {"lot": "LOT-7"}
    assert len(manifest["chain_head"]) == 64 and manifest["station_id"] == "test-station"
    # the flash run ended with a signed checkpoint; the export is one too, and names the chain's head
    reasons = [r for (r,) in sqlite3.connect(station_env / "station.db").execute("select reason from checkpoints")]
    assert reasons == ["station flash", "export"] and manifest["checkpoint"]["head"] == manifest["chain_head"]
    # an auditor without the station: OpenSSL, the public key, and the fingerprint the station published
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", f"{out}.pub.pem", "-outform", "DER"],
                         capture_output=True, check=True).stdout
    fp = subprocess.run(["openssl", "dgst", "-sha256", "-r"], input=der, capture_output=True).stdout.split()[0]
    _, listed, _ = run_station(capsys, "keys", "list")
    assert fp.decode() == manifest["public_key_sha256"] and fp.decode() in listed and fp.decode() in text
    cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", f"{out}.pub.pem", "-rawin",
           "-in", f"{out}.manifest.json", "-sigfile", f"{out}.manifest.sig"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "Signature Verified Successfully" in r.stdout
    dgst = subprocess.run(["openssl", "dgst", "-sha256", "-r", str(out)], capture_output=True, text=True)
    assert dgst.stdout.split()[0] == manifest["sha256"]
    dgst = subprocess.run(["openssl", "dgst", "-sha256", "-r", f"{out}.journal.jsonl"], capture_output=True, text=True)
    assert dgst.stdout.split()[0] == manifest["journal"]["sha256"]

    # an edited data file fails; an edited manifest fails, also for OpenSSL
    original = out.read_bytes()
    out.write_bytes(original.replace(b"RLY-", b"RLX-", 1))
    rc, _, err = run_station(capsys, "export", "verify", str(out))
    assert rc == 1 and "the data file was altered" in err
    out.write_bytes(original)
    mpath = station_env / "units.csv.manifest.json"
    mpath.write_text(mpath.read_text().replace('"rows": 2', '"rows": 3'))
    rc, _, err = run_station(capsys, "export", "verify", str(out))
    assert rc == 1 and "signature does not match any key trusted for station 'test-station'" in err
    assert subprocess.run(cmd, capture_output=True).returncode != 0

    # filters: no unit in another lot
    rc, _, _ = run_station(capsys, "export", "--out", str(station_env / "none.csv"), "--lot", "LOT-8")
    assert len(list(csv.DictReader(open(station_env / "none.csv")))) == 0


def _rows(n: int, station: str = "test-station"):
    return [Attempt(port=f"p{i}", station_id=station, profile="relay", profile_hash="h", started_at=now_iso(),
                    ended_at=now_iso(), outcome="passed", mac=f"24:0a:c4:00:00:{i:02x}", serial=f"S-{i}")
            for i in range(n)]


@pytest.mark.parametrize("tamper,first", [
    ("update attempts set error = 'x' where id = 3", "attempt 3 was edited"),
    ("delete from attempts where id = 3", "attempt 3 was deleted"),
    ("update attempts set id = 99 where id = 2", "attempt 99 was edited"),
    ("delete from journal where id = 3", "journal entry 4 does not follow"),
    ("update journal set body = replace(body, 'S-3', 'S-9') where id = 4", "journal entry 4 was edited"),
])
def test_db_verify_names_the_first_tampered_row(station_env, capsys, tamper, first):
    record = Record(station_env / "station.db", station_key(station_env / "station.key"))
    for a in _rows(6):
        record.add_attempt(a)
    rc, out, _ = run_station(capsys, "db", "verify")
    assert rc == 0 and "intact: 6 attempts" in out
    con = sqlite3.connect(station_env / "station.db")
    con.execute("PRAGMA foreign_keys=OFF")
    con.execute(tamper)
    con.commit()
    rc, out, _ = run_station(capsys, "db", "verify")
    assert rc == 1 and first in out.splitlines()[0]


def pin(capsys, folder, *stations: str) -> None:
    """Trust each station's key, as the auditor does after comparing its fingerprint."""
    for name in stations:
        rc, _, err = run_station(capsys, "keys", "trust", str(folder / f"{name}.csv.pub.pem"), "--station",
                                 f"station-{name}")
        assert rc == 0, err


def test_merge_two_stations_and_report_conflicts(station_env, capsys, tmp_path):
    a_db, b_db = Record(tmp_path / "a.db", os.urandom(32)), Record(tmp_path / "b.db", os.urandom(32))
    rows_a = _rows(3, "station-a")
    rows_b = _rows(5, "station-b")[3:]  # two other units
    for r in rows_a:
        a_db.add_attempt(r)
    for r in rows_b:
        b_db.add_attempt(r)
    ka, kb = signing_key(tmp_path / "a.pem"), signing_key(tmp_path / "b.pem")
    export(a_db, tmp_path / "a.csv", "csv", ExportFilter(), "station-a", ka)
    export(b_db, tmp_path / "b.csv", "csv", ExportFilter(), "station-b", kb)
    pin(capsys, tmp_path, "a", "b")
    merged = tmp_path / "all.csv"
    rc, _, err = run_station(capsys, "export", "merge", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                             "--out", str(merged))
    assert rc == 0, err
    assert len(list(csv.DictReader(open(merged)))) == 5
    rc, _, _ = run_station(capsys, "export", "verify", str(merged))
    assert rc == 0
    # station B also recorded unit 0 under another serial: the merge refuses and says which
    clash = _rows(1, "station-b")[0]
    clash.serial = "S-OTHER"
    b_db.add_attempt(clash)
    export(b_db, tmp_path / "b.csv", "csv", ExportFilter(), "station-b", kb)
    rc, _, err = run_station(capsys, "export", "merge", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                             "--out", str(tmp_path / "all2.csv"))
    assert rc == 1 and "unit 24:0a:c4:00:00:00: serial S-0 in a.csv (station-a) but S-OTHER in b.csv" in err
    assert not (tmp_path / "all2.csv").exists()


def test_secrets_file_set_list_remove_and_use(station_env, capsys, monkeypatch):
    monkeypatch.setenv("STATION_SECRETS_PASSPHRASE", "correct horse battery")
    monkeypatch.delenv("RELAY_VENDOR_TOKEN")
    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN + "\n"))
    rc, _, _ = run_station(capsys, "secrets", "set", "relay_token")
    assert rc == 0
    rc, out, _ = run_station(capsys, "secrets", "list")
    assert out.split() == ["relay_token"]
    blob = (station_env / "var/secrets.enc").read_bytes()
    assert TOKEN.encode() not in blob and b"scrypt" in blob
    p = station_env / "profiles/relay/profile.toml"
    p.write_text(p.read_text().replace('env = "RELAY_VENDOR_TOKEN"', 'store = "relay_token"'))
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, out, err = run_station(capsys, "flash", "--port", bench[0].url, "--json")
        assert rc == 0, err
    monkeypatch.setenv("STATION_SECRETS_PASSPHRASE", "wrong")
    rc, _, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 2 and "wrong passphrase" in err
    monkeypatch.setenv("STATION_SECRETS_PASSPHRASE", "correct horse battery")
    rc, _, _ = run_station(capsys, "secrets", "remove", "relay_token")
    rc, out, _ = run_station(capsys, "secrets", "list")
    assert rc == 0 and out == ""


def forms(secret: str) -> list[bytes]:
    raw = secret.encode()
    return [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
            base64.b64encode(raw).rstrip(b"=")]


def test_token_and_wifi_password_appear_nowhere_in_plaintext(station_env, capsys, monkeypatch):
    monkeypatch.setenv("RELAY_WIFI_SSID", "factory-wifi")
    monkeypatch.setenv("RELAY_WIFI_PASSWORD", WIFI_PASSWORD)
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        ports = sum((["--port", s.url] for s in bench.slots), [])
        rc, human_out, human_err = run_station(capsys, "flash", *ports)
        assert rc == 0, human_err
        rc, json_out, json_err = run_station(capsys, "flash", *ports, "--json", "--rework")
        assert rc == 0
        # the boards did get them: the secrets live on the device, and only there
        assert "factory-wifi" in bench[0].device.console_text()
    for fmt in ("csv", "jsonl"):
        run_station(capsys, "export", "--format", fmt, "--outcome", "any", "--out", str(station_env / f"x.{fmt}"))
    haystacks = {"stdout": human_out.encode() + json_out.encode(), "stderr": human_err.encode() + json_err.encode()}
    for path in station_env.rglob("*"):
        if path.is_file() and "profiles" not in path.parts and "run" not in path.parts:
            haystacks[str(path)] = path.read_bytes()
    assert any(k.endswith("station.db") for k in haystacks) and any(k.endswith("x.csv") for k in haystacks)
    assert any(k.endswith("station.db-wal") for k in haystacks)  # the WAL is searched too
    for secret in (TOKEN, WIFI_PASSWORD):
        for form in forms(secret):
            for where, data in haystacks.items():
                assert form not in data, f"{secret!r} as {form!r} found in {where}"


def encrypted_profile(env, encryption: str = "per-unit") -> str:
    """The relay profile on firmware built with NVS encryption and an nvs_keys partition."""
    from flashing.firmware import DEFAULT_PARTITIONS, build_firmware, twosmart_manifest
    from flashing.images import Partition

    parts = DEFAULT_PARTITIONS + [Partition("nvs_keys", 1, 4, 0x196000, 0x1000)]
    fw = build_firmware("esp32", project="relay", version="1.4.2", app_size=150_000, partitions=parts,
                        manifest=twosmart_manifest(encrypted=True))
    pin_firmware(env, fw, lambda text: text.replace('namespace = "2smart"',
                                                     f'namespace = "2smart"\nencryption = "{encryption}"'))
    return "relay"


def test_secrets_reach_neither_the_spool_nor_failed_units(station_env, monkeypatch):
    """Failed units carry error and detail (esptool's and the console's words), and a database
    held by another program after the write-ahead commit sends each finish to the spool:
    neither may hold the token or the Wi-Fi password."""
    from station.pipeline import UnitJob, provision_unit
    from station.runner import open_station

    monkeypatch.setenv("RELAY_WIFI_SSID", "factory-wifi")
    monkeypatch.setenv("RELAY_WIFI_PASSWORD", WIFI_PASSWORD)
    db = station_env / "station.db"
    ctx = open_station("relay", station_env / "station.toml")
    ctx.record.busy_ms = 100
    ctx.record.close()  # the next connection takes the short busy timeout
    done = {}
    with VirtualBench(3, "esp32", run_dir=station_env / "run") as bench:
        bench[1].device.set_fault("panic_after", 0.05)  # crashes while it boots: detail is the boot log
        bench[2].device.set_fault("unplug_after", 300_000)  # cable pulled mid-write
        for i, s in enumerate(bench.slots):
            holders: list[sqlite3.Connection] = []

            def hold_after_the_commit(e) -> None:  # another program takes the database mid-unit
                if type(e).__name__ == "StepStarted" and e.step == "flash" and not holders:
                    holders.append(sqlite3.connect(db))
                    holders[0].execute("BEGIN EXCLUSIVE")

            done[s.url] = provision_unit(UnitJob(s.url, f"SN-{i}"), ctx, hold_after_the_commit)
            holders[0].rollback()
            holders[0].close()
    ctx.close()
    assert [done[s.url].outcome for s in bench.slots] == ["passed", "failed", "failed"]
    assert all(r.recorded == "spool" for r in done.values())
    spooled = [json.loads(json.loads(line)["body"])["attempt"]
               for line in (station_env / "station.db.spool").read_text().splitlines()]
    spool_bytes = (station_env / "station.db.spool").read_bytes()
    # the spool holds what the record will: the token's fingerprint, the failures' words
    assert len(spooled) == 3 and all(a["token_fingerprint"].startswith("hmac-sha256:") for a in spooled)
    failed = {a["failed_step"]: a for a in spooled if a["outcome"] == "failed"}
    assert set(failed) == {"boot", "flash"}
    assert "Guru Meditation" in failed["boot"]["error"] and "unplugged" in failed["flash"]["error"]
    assert "app_init: Project name:     relay" in failed["boot"]["detail"]  # the boot log itself
    rows = Record(db, station_key(station_env / "station.key")).attempts()  # replayed on open
    assert len(rows) == 3 and not (station_env / "station.db.spool").exists()
    columns = b"\n".join(str(r[k]).encode() for r in rows for k in ("error", "detail", "remedy"))
    assert b"app_init: App version:      1.4.2" in columns  # the console's words made it into the record
    for secret in (TOKEN, WIFI_PASSWORD):
        for form in forms(secret):
            assert form not in spool_bytes, f"{secret!r} as {form!r} in the spool"
            assert form not in columns, f"{secret!r} as {form!r} in a failed unit's error or detail"


@pytest.mark.parametrize("clash,why", [
    (lambda a: setattr(a, "serial", "S-OTHER"), "unit 24:0a:c4:00:00:00: serial S-0 in a.csv (station-a) but "
                                                "S-OTHER in b.csv"),
    (lambda a: setattr(a, "mac", "24:0a:c4:00:00:77"), "serial S-0: board 24:0a:c4:00:00:00 and board "
                                                       "24:0a:c4:00:00:77 (b.csv"),
], ids=["one-mac-two-serials", "one-serial-two-boards"])
def test_merge_refuses_conflicting_records(station_env, capsys, tmp_path, clash, why):
    a_db, b_db = Record(tmp_path / "a.db", os.urandom(32)), Record(tmp_path / "b.db", os.urandom(32))
    for r in _rows(2, "station-a"):
        a_db.add_attempt(r)
    other = _rows(1, "station-b")[0]  # station B's record of unit 0, made to conflict
    clash(other)
    b_db.add_attempt(other)
    export(a_db, tmp_path / "a.csv", "csv", ExportFilter(), "station-a", signing_key(tmp_path / "a.pem"))
    export(b_db, tmp_path / "b.csv", "csv", ExportFilter(), "station-b", signing_key(tmp_path / "b.pem"))
    pin(capsys, tmp_path, "a", "b")
    rc, _, err = run_station(capsys, "export", "merge", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                             "--out", str(tmp_path / "all.csv"))
    assert rc == 1 and "refused: 1 conflicting record(s); nothing was written" in err
    assert why in err
    assert not (tmp_path / "all.csv").exists() and not (tmp_path / "all.csv.manifest.json").exists()
