"""`station profile check` says ready only for a profile that can pass; station.toml's keys."""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime
from pathlib import Path

import pytest

from flashing.firmware import DEFAULT_PARTITIONS, build_firmware, twosmart_manifest
from flashing.images import Partition
from station.config import ConfigError, StationConfig
from station.profile import ProfileError, load_profile
from station.serials import SerialPattern, SerialPatternError, render_serial
from tests.station.conftest import REPO, pin_firmware, run_station, run_station_process

RELAY = REPO / "profiles/relay/profile.toml"


def edit(env: Path, old: str, new: str) -> None:
    p = env / "profiles/relay/profile.toml"
    text = p.read_text()
    assert old in text, old
    p.write_text(text.replace(old, new, 1))


def add_region(env: Path, offset: int, file: str = "firmware/partition-table.bin") -> None:
    sha = hashlib.sha256((env / "profiles/relay" / file).read_bytes()).hexdigest()
    edit(env, "},\n]\n", f'}},\n  {{ name = "extra", offset = "0x{offset:x}", file = "{file}", sha256 = "{sha}" }},\n]\n')


def replace_firmware(env: Path, **build) -> None:
    """Swap the example's firmware files for another build and pin the new hashes."""
    pin_firmware(env, build_firmware("esp32", project="relay", version="1.4.2", app_size=150_000, **build))


def check(capsys) -> tuple[int, str]:
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert "Traceback" not in err
    return rc, out + err


def refused(capsys, *patterns: str) -> str:
    rc, text = check(capsys)
    assert rc == 2, text
    for p in patterns:
        assert re.search(p, text), text
    return text


def ready(capsys) -> None:
    rc, text = check(capsys)
    assert rc == 0 and "is ready" in text, text


def test_the_example_profile_is_ready(station_env, capsys):
    ready(capsys)


# -- the flash layout ----------------------------------------------------------------------

def test_overlapping_firmware_regions(station_env, capsys):
    add_region(station_env, 0x8800)  # inside the partition table (0x8000-0x8bff)
    refused(capsys, r"firmware region 0x8000 \(partition-table\) \(0x8000-0x8bff\) overlaps "
                    r"firmware region 0x8800 \(extra\)")


def test_two_regions_at_one_offset(station_env, capsys):
    add_region(station_env, 0x8000)
    refused(capsys, r"firmware region 0x8000 \(partition-table\) \(0x8000-0x8bff\) overlaps "
                    r"firmware region 0x8000 \(extra\)")


def test_regions_sharing_a_flash_sector(station_env, capsys):
    add_region(station_env, 0x8c00)  # right after the table, but in its 4 KiB sector
    refused(capsys, r"firmware region 0x8000 .* and firmware region 0x8c00 \(extra\) .* share the flash "
                    r"sector at 0x8000")


def test_region_over_the_config_partition(station_env, capsys):
    add_region(station_env, 0x190000)  # the example's config partition: the station writes it per unit
    refused(capsys, r"firmware: firmware region 0x190000 \(extra\) \(0x190000-0x190bff\) overlaps config partition "
                    r"'config' \(0x190000-0x195fff\)")


def test_region_over_the_nvs_keys_partition(station_env, capsys):
    replace_firmware(station_env, partitions=DEFAULT_PARTITIONS + [Partition("nvs_keys", 1, 4, 0x196000, 0x1000)],
                     manifest=twosmart_manifest(encrypted=True))
    edit(station_env, 'namespace = "2smart"', 'namespace = "2smart"\nencryption = "per-unit"')
    refused(capsys, r"config.encryption: 'per-unit' needs \[security\] flash_encryption")  # (test_hardening.py)
    add_region(station_env, 0x196000)
    refused(capsys, r"firmware: firmware region 0x196000 \(extra\) \(0x196000-0x196bff\) overlaps keys partition "
                    r"'nvs_keys' \(0x196000-0x196fff\)")


def test_region_past_the_declared_flash_size(station_env, capsys):
    edit(station_env, 'baud = 921600', 'baud = 921600\nflash_size = "1MB"')
    refused(capsys, r"firmware region 0x10000 \(app\) ends at 0x[0-9a-f]+, past the end of the 1MB flash "
                    r"\(0x100000, flash_size\)",
            r"config partition 'config' ends at 0x196000, past the end of the 1MB flash",
            r"flash_size: 1MB declared, but the bootloader is built for 4MB flash")
    edit(station_env, 'flash_size = "1MB"', 'flash_size = "4MB"')
    ready(capsys)


def test_partition_past_the_flash_size_in_the_bootloader_header(station_env, capsys):
    parts = [Partition("nvs", 1, 2, 0x9000, 0x5000), Partition("phy_init", 1, 1, 0xE000, 0x1000),
             Partition("factory", 0, 0, 0x10000, 0x100000), Partition("config", 1, 2, 0x1F0000, 0x20000)]
    replace_firmware(station_env, partitions=parts, flash_size="2MB")
    refused(capsys, r"config partition 'config' ends at 0x210000, past the end of the 2MB flash \(0x200000, "
                    r"the bootloader header's flash size\)")


# -- what the firmware reads ---------------------------------------------------------------

def test_a_key_the_firmware_does_not_read(station_env, capsys):
    edit(station_env, "[[config.keys]]\nkey = \"ssid\"",
         "[[config.keys]]\nkey = \"color\"\ntype = \"string\"\nmax_length = 8\nvalue = \"red\"\n\n"
         "[[config.keys]]\nkey = \"ssid\"")
    refused(capsys, r"config\.keys\[7\] \(color\): the firmware does not read 'color' and refuses unknown keys; "
                    r"it reads email, token, host")


def test_keys_are_free_when_the_firmware_declares_none(station_env, capsys):
    replace_firmware(station_env, manifest={"sdk": "2smart", "class": "wifi", "title": "2Smart Relay"})
    edit(station_env, 'key = "product_id"', 'key = "model"')
    ready(capsys)


def test_a_namespace_the_firmware_does_not_read(station_env, capsys):
    edit(station_env, 'namespace = "2smart"', 'namespace = "relay"')
    refused(capsys, r"config\.namespace: 'relay', but the firmware reads its config from namespace '2smart'")


# -- serial patterns ---------------------------------------------------------------------

@pytest.mark.parametrize("pattern, message", [
    ("RLY-{yymmdd}-{sequence:05}", r"unknown placeholder \{sequence:05\}: use \{yymmdd\}, .*\{seq\}"),
    ("RLY-{yymmdd-{seq:05}", r"unbalanced braces"),
    ("RLY-{yymmdd}}-{seq:05}", r"unbalanced braces"),
    ("RLY-{yymmdd}", r"no \{seq\} placeholder: every unit would get the same serial"),
    ("RLY-{seq:.3}", r"\{seq:\.3\}: not an integer format spec"),
])
def test_malformed_serial_pattern(station_env, capsys, pattern, message):
    edit(station_env, 'pattern = "RLY-{yymmdd}-{seq:05}"', f'pattern = "{pattern}"')
    refused(capsys, r"profile\.toml: serial\.pattern: " + message)
    with pytest.raises(ProfileError) as exc:  # refused when the file is read, with the file's other problems
        load_profile(station_env / "profiles/relay")
    assert [p.field for p in exc.value.problems] == ["serial.pattern"]


def test_serials_from_labels_need_no_pattern(station_env, capsys):
    edit(station_env, 'pattern = "RLY-{yymmdd}-{seq:05}"', "given = true")
    ready(capsys)
    edit(station_env, "given = true", 'given = true\npattern = "RLY-{seq:05}"')
    refused(capsys, r"serial: give either pattern or given = true")


def test_serial_longer_than_its_key_at_the_counters_maximum(station_env, capsys):
    # 32 bytes fit the example's serial key; one digit more at seq 10**12 - 1 does not
    edit(station_env, 'pattern = "RLY-{yymmdd}-{seq:05}"', 'pattern = "RELAY-SN-{yyyymmdd}-{seq:014}"')
    ready(capsys)
    edit(station_env, "{seq:014}", "{seq:015}")
    refused(capsys, r"serial\.pattern: gives serials up to 33 bytes \('RELAY-SN-20991231-999999999999999' at the "
                    r"counter's maximum 999999999999999\); config\.keys\[5\] \(serial\) holds at most 32")
    edit(station_env, "{seq:015}", "{seq}")  # no width: the maximum is 10**9 - 1
    ready(capsys)


def test_serial_pattern_counter_maximum_and_rendering():
    when = datetime(2026, 3, 9)
    assert SerialPattern.parse("RLY-{yymmdd}-{seq:05}").max_seq == 99999
    assert SerialPattern.parse("A{seq}").max_seq == 10**9 - 1
    assert SerialPattern.parse("A{seq:04x}").max_seq == 0xFFFF
    assert SerialPattern.parse("{yyyymmdd}/{seq:+05}").longest() == "20991231/+9999"
    p = SerialPattern.parse("RLY-{yymmdd}-{seq:05}")
    assert p.render(42, when) == "RLY-260309-00042" and p.counter_name(when) == "RLY-260309-"
    assert render_serial("RLY-{yymmdd}-{seq:05}", None, when) == "RLY-260309-"  # the pipeline's counter name
    assert SerialPattern.parse("{{seq}}-{seq:02}").render(7, when) == "{seq}-07"
    with pytest.raises(SerialPatternError, match="past the pattern's maximum 99999"):
        p.render(100000, when)


# -- station.toml ------------------------------------------------------------------------------

def test_spool_and_min_free_mb(tmp_path):
    cfg = tmp_path / "station.toml"
    cfg.write_text('database = "db/station.db"\n')
    st = StationConfig.load(cfg)
    assert st.spool_path == tmp_path / "db/station.db.spool" and st.min_free_mb == 64
    cfg.write_text('database = "db/station.db"\nspool = "spool/finishes.jsonl"\nmin_free_mb = 0\n')
    st = StationConfig.load(cfg)
    assert st.spool_path == tmp_path / "spool/finishes.jsonl" and st.min_free_mb == 0
    assert StationConfig().spool_path == Path("var/station.db.spool")
    cfg.write_text('min_free_mb = -1\nspool = 5\n')
    with pytest.raises(ConfigError) as exc:
        StationConfig.load(cfg)
    assert [str(p) for p in exc.value.problems] == [
        f"{cfg}: spool: expected a path in quotes, got 5",
        f"{cfg}: min_free_mb: -1 is out of range: it must be at least 0"]


def test_every_problem_of_a_file_at_once(station_env):
    edit(station_env, 'chip = "esp32"', 'chip = "esp64"')
    edit(station_env, 'smoke = "healthcheck"', 'smoke = "pairing"')
    edit(station_env, "boot_timeout_s = 5", "boot_timeout_s = nan\ncolour = 1")
    with pytest.raises(ProfileError) as exc:
        load_profile(station_env / "profiles/relay")
    assert [(p.field, p.message) for p in exc.value.problems] == [
        ("chip", '"esp64" is not allowed: use "esp32", "esp32c3" or "esp32s3"'),
        ("checks.boot_timeout_s", "expected a finite number (not nan or inf), got nan"),
        ("checks.smoke", '"pairing" is not allowed: use "none", "healthcheck" or "pair"'),
        ("checks.colour", "unknown key; allowed here: boot, boot_timeout_s, boot_settle_s, smoke, smoke_soak_s"),
    ]


# -- one subprocess per file kind: exit 2 and a clear line, no traceback -------------------------

@pytest.mark.parametrize("kind", ["station.toml", "profile.toml", "flasher_args.json"])
def test_malformed_file_exits_2_with_a_clear_message(station_env, kind):
    prof = station_env / "profiles/relay"
    if kind == "station.toml":
        (station_env / "station.toml").write_bytes(b'station_id = "line-1"\nslots = "four"\n[ports]\nusb = 3\n')
        expect = [f"{station_env / 'station.toml'}: slots: expected a whole number, got \"four\"",
                  f"{station_env / 'station.toml'}: ports.usb: expected a list [ ... ], got 3"]
    elif kind == "profile.toml":
        (prof / "profile.toml").write_bytes(RELAY.read_bytes().replace(b'title = "2Smart Relay"', b'title = "\xff"'))
        expect = [f"{prof / 'profile.toml'}: (file): is not UTF-8 text: byte 0xff on line 4; "
                  "save the profile as UTF-8"]
    else:
        text = (prof / "profile.toml").read_text()
        start, end = text.index("regions = ["), text.index("]\n", text.index("regions = [")) + 2
        (prof / "profile.toml").write_text(text[:start] + 'flasher_args = "build/flasher_args.json"\n' + text[end:])
        (prof / "build").mkdir()
        (prof / "build/flasher_args.json").write_text('{"flash_files": {"0x1000": ["bootloader.bin"]}}')
        expect = [f"{prof / 'build/flasher_args.json'}: flash_files.0x1000: expected text in quotes, "
                  "got a list of 1 item"]
    r = run_station_process("profile", "check", "relay", env={**os.environ, "STATION_CONFIG": str(station_env / "station.toml")},
                            cwd=station_env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "pydantic" not in r.stderr
    for line in expect:
        assert line in r.stderr.splitlines(), r.stderr


BIG = b"# padding\n" * 5_000_000  # 50 MB
DEEP_TOML = b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n"
CASES = {
    "station.toml": [b"", "folder", BIG, b'station_id = "\xff"\n', DEEP_TOML, b"slots = nan\n", b"slots = -5\n",
                     b"slots = 99999999999999999999999999\n", b"smoke = [1, 2]\n", b"station_id = { a = 1 }\n",
                     b"[ports]\nusb = [[[[]]]]\n", b"[[smoke]]\ntimeout_s = inf\n"],
    "profile.toml": [b"", "folder", BIG, b'name = "\xc3\x28"\n', DEEP_TOML, b'chip = "esp32"\nfirmware = "x"\n',
                     b'chip = ["esp32"]\n[firmware]\nregions = [{ offset = -1, file = "a", sha256 = "0" }]\n',
                     b'chip = "esp32"\n[firmware]\nflasher_args = { file = "x" }\n',
                     b'chip = "esp32"\nbaud = inf\n[firmware]\nregions = []\n'],
    "flasher_args.json": [b"", "folder", BIG, b'{"flash_files": "\xff"}', b"[" * 100_000 + b"]" * 100_000,
                          b"NaN", b'{"flash_files": {"0x1000": 1e999}}', b"[]", b'{"flash_files": {"-0x1": "a"}}',
                          b'{"flash_files": {"0x1000": {"file": "a"}}}'],
}


@pytest.mark.parametrize("kind, case", [(k, i) for k, cases in CASES.items() for i in range(len(cases))])
def test_malformed_files_exit_2_naming_file_and_key(station_env, capsys, kind, case):
    content = CASES[kind][case]
    prof = station_env / "profiles/relay"
    if kind == "flasher_args.json":
        text = (prof / "profile.toml").read_text()
        start = text.index("regions = [")
        end = text.index("]\n", start) + 2
        (prof / "profile.toml").write_text(text[:start] + 'flasher_args = "flasher_args.json"\n' + text[end:])
    target = {"station.toml": station_env / "station.toml", "profile.toml": prof / "profile.toml",
              "flasher_args.json": prof / "flasher_args.json"}[kind]
    target.unlink(missing_ok=True)
    if content == "folder":
        target.mkdir()
    else:
        target.write_bytes(content)
    rc, text = check(capsys)
    assert rc == 2, text
    lines = [line for line in text.splitlines() if line.startswith(f"{target}: ")]
    assert lines, text
    for line in lines:
        field, message = line.removeprefix(f"{target}: ").split(": ", 1)
        assert field and message and "pydantic" not in message, line


def test_a_secret_too_short_to_redact_is_refused(station_env, capsys, monkeypatch):
    """A 3-character vendor token could not be hunted for in text without eating ordinary words,
    so the redactor skips it: the station refuses it instead of writing it into the record."""
    monkeypatch.setenv("RELAY_VENDOR_TOKEN", "ab1")
    rc, out = check(capsys)
    assert rc != 0
    assert "secrets.vendor_token" in out and "3 characters: a secret needs at least 4" in out, out
    assert "ab1" not in out
    monkeypatch.setenv("RELAY_VENDOR_TOKEN", "ab12")
    rc, out = check(capsys)
    assert rc == 0, out
