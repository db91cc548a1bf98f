"""`station flash` end to end on virtual boards: units pass, the record holds them."""

from __future__ import annotations

import csv
import json
import os


from flashing.nvs import read_partition
from flashing.virtual.bench import VirtualBench
from station.pipeline import SECURE_STEPS, STEP_NAMES
from station.profile import load_profile
from station.record import Record
from tests.station.conftest import TOKEN, json_lines, run_station, run_station_process

STEPS = set(STEP_NAMES) - set(SECURE_STEPS)  # the pipeline's own list: every step a relay unit runs


def test_the_steps_in_the_order_the_readme_gives():
    # the write-ahead commit (serial) comes before anything is written to the board (flash)
    assert STEP_NAMES == ("connect", "identify", "guard", "serial", "config", "secure", "flash", "boot", "smoke",
                          "record")


def test_flash_virtual_4_json_subprocess(station_env):
    env = {**os.environ, "STATION_CONFIG": str(station_env / "station.toml")}
    r = run_station_process("flash", "--profile", "relay", "--virtual", "4", "--json", env=env,
                            cwd=station_env)
    assert r.returncode == 0, r.stderr[-3000:]
    events = json_lines(r.stdout)  # stdout is JSON lines and nothing else
    finished = [e for e in events if e["event"] == "unit_finished"]
    assert len(finished) == 4 and all(e["outcome"] == "passed" for e in finished)
    assert {e["event"] for e in events} == {"step_started", "step_finished", "progress", "unit_info",
                                           "unit_finished"}
    assert all(set(e["durations"]) == STEPS for e in finished)
    assert TOKEN not in r.stdout + r.stderr


def test_config_partition_record_and_export(station_env, capsys):
    with VirtualBench(4, "esp32", run_dir=station_env / "run") as bench:
        ports = sum((["--port", s.url] for s in bench.slots), [])
        rc, out, err = run_station(capsys, "flash", "--profile", "relay", *ports)
        assert rc == 0, err
        assert "4 of 4 units passed" in out
        profile = load_profile(station_env / "profiles/relay")
        slot = profile.config_slot()
        record = Record(station_env / "station.db")
        for s in bench.slots:
            dev = s.device
            values = read_partition(dev.flash.read(slot.offset, slot.size))["2smart"]
            unit = record.unit_by_mac(dev.mac_text)
            assert values == {
                "email": "vendor@example.com", "token": TOKEN, "host": "cloud.2smart.com",
                "brport": "1883", "product_id": "relay-1", "serial": unit["serial"],
                "device_id": dev.mac_text.replace(":", "-"),
            }
            assert unit["state"] == "provisioned" and unit["serial"].startswith("RLY-")
            assert dev.state()["app"]["version"] == "1.4.2"

        attempts = record.attempts()
        assert len(attempts) == 4
        for a in attempts:
            assert a["outcome"] == "passed" and a["station_id"] == "test-station"
            assert a["profile"] == "relay" and a["profile_hash"] == profile.content_hash
            assert json.loads(a["firmware_hashes"]) == profile.firmware_hashes()
            assert len(a["config_sha256"]) == 64
            assert a["token_fingerprint"].startswith("hmac-sha256:") and TOKEN not in a["token_fingerprint"]
            assert set(json.loads(a["durations"])) == STEPS - {"record"}  # timed after the write
            assert a["firmware_version"] == "1.4.2" and a["chip"] == "ESP32"
            assert a["started_at"] <= a["ended_at"]

        for fmt in ("csv", "jsonl"):
            out_file = station_env / f"export.{fmt}"
            rc, _, err = run_station(capsys, "export", "--format", fmt, "--out", str(out_file),
                                     "--profile", "relay", "--since", "2000-01-01")
            assert rc == 0
            if fmt == "csv":
                rows = list(csv.DictReader(out_file.open()))
            else:
                rows = [json.loads(l) for l in out_file.read_text().splitlines()]
            assert len(rows) == 4
            assert {r["mac"] for r in rows} == {s.device.mac_text for s in bench.slots}
            for row in rows:
                assert all(row[k] not in (None, "") for k in ("serial", "mac", "chip", "device_id",
                           "profile_hash", "firmware_hashes", "config_sha256", "token_fingerprint",
                           "started_at", "ended_at", "durations"))
            assert TOKEN not in out_file.read_text()
        assert TOKEN.encode() not in (station_env / "station.db").read_bytes()

        # the same boards again: refused as duplicates ...
        rc, out, _ = run_station(capsys, "flash", "--profile", "relay", *ports, "--json")
        assert rc == 1
        done = [e for e in json_lines(out) if e["event"] == "unit_finished"]
        assert all(e["outcome"] == "failed" and e["failed_step"] == "guard" for e in done)
        assert all("already passed" in e["error"] and "--rework" in e["remedy"] for e in done)
        # ... and provisioned again on purpose with --rework, keeping their serials
        serials = {record.unit_by_mac(s.device.mac_text)["serial"] for s in bench.slots}
        rc, out, _ = run_station(capsys, "flash", "--profile", "relay", *ports, "--rework", "--json")
        assert rc == 0
        done = [e for e in json_lines(out) if e["event"] == "unit_finished"]
        assert {e["serial"] for e in done} == serials
        record.close()


def test_given_serials_and_serial_conflict(station_env, capsys):
    with VirtualBench(2, "esp32", run_dir=station_env / "run") as bench:
        a, b = bench.slots
        rc, out, _ = run_station(capsys, "flash", "--port", a.url, "--serial", "SN-A-1", "--json")
        assert rc == 0
        rc, out, _ = run_station(capsys, "flash", "--port", b.url, "--serial", "SN-A-1", "--json")
        assert rc == 1
        done = json_lines(out)[-1]
        assert done["failed_step"] == "serial" and "already belongs to another board" in done["error"]


def test_profile_check_command(station_env, capsys):
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 0 and "is ready" in out


def test_profile_from_an_esp_idf_build_flasher_args(station_env, capsys):
    """[firmware] flasher_args: the build's own layout, each file pinned in [firmware.sha256]."""
    import hashlib
    import shutil

    d = station_env / "profiles/relay"
    build = d / "build"
    files = {"0x1000": "bootloader/bootloader.bin", "0x8000": "partition_table/partition-table.bin",
             "0x10000": "relay.bin"}
    sources = {"0x1000": "bootloader.bin", "0x8000": "partition-table.bin", "0x10000": "relay.bin"}
    for off, rel in files.items():
        (build / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(d / "firmware" / sources[off], build / rel)
    (build / "flasher_args.json").write_text(json.dumps({  # as idf.py writes it
        "write_flash_args": ["--flash_mode", "dio", "--flash_size", "4MB", "--flash_freq", "40m"],
        "flash_files": files,
        "bootloader": {"offset": "0x1000", "file": files["0x1000"], "encrypted": "false"},
        "partition-table": {"offset": "0x8000", "file": files["0x8000"], "encrypted": "false"},
        "app": {"offset": "0x10000", "file": files["0x10000"], "encrypted": "false"},
        "extra_esptool_args": {"after": "hard_reset", "before": "default_reset", "stub": True, "chip": "esp32"},
    }))
    pins = "\n".join(f'"{rel}" = "{hashlib.sha256((build / rel).read_bytes()).hexdigest()}"' for rel in files.values())
    text = (d / "profile.toml").read_text()
    start, end = text.index("[firmware]"), text.index("# The pre-specified parameters")
    p = d / "profile.toml"
    p.write_text(text[:start] + f'[firmware]\nflasher_args = "build/flasher_args.json"\n\n[firmware.sha256]\n{pins}\n\n'
                 + text[end:])
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 0 and "firmware 1.4.2, 3 regions" in out, err
    with VirtualBench(1, "esp32", run_dir=station_env / "run") as bench:
        rc, out, err = run_station(capsys, "flash", "--port", bench[0].url, "--json")
        assert rc == 0, err
        done = json_lines(out)[-1]
        assert done["written_regions"] == ["bootloader", "partition-table", "app", "config"]
        assert done["firmware_version"] == "1.4.2"
    # a file of the build without its pin is refused before anything is flashed
    p.write_text(p.read_text().replace(f'"{files["0x10000"]}" = ', '"other.bin" = '))
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 2 and 'firmware.sha256."relay.bin": no SHA-256 pinned for this file' in err
