"""The secure profile ([security]): flash encryption set up per unit with the real espefuse, espsecure and esptool.

Oracles outside the code under test: the board's own eFuses and engine (the virtual chip
decrypts through its cache exactly what espsecure encrypts: tests/flashing/test_flash_encryption.py),
`esptool read-flash` of the config partition read with our NVS reader, the board's boot and
pairing server, and the record reopened after a real kill -9.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sqlite3

import pytest

from flashing.firmware import DEFAULT_PARTITIONS, build_firmware, twosmart_manifest
from flashing.images import Partition
from flashing.mqtt_client import MqttClient
from flashing.nvs import NvsError, read_partition
from flashing.virtual.bench import VirtualBench
from station.record import ATTEMPT_KINDS, Record
from tests.conftest import esptool_cli, wait_until
from tests.station.conftest import REPO, TOKEN, json_lines, pin_firmware, run_station, run_station_process
from tests.station.test_record_guarantees import Proc

CONFIG, KEYS = 0x190000, 0x196000  # the config and nvs_keys partitions of the firmware below
MOVED_TABLE = 0xC000  # where an ESP32 secure-boot build puts it: its signed bootloader ends at 0x9000


def secure_firmware(chip: str, table: int = 0x8000, built: str | None = None):
    """The relay firmware built with NVS encryption; `table`: CONFIG_PARTITION_TABLE_OFFSET; `built`: the
    bootloader is built with flash encryption in that mode."""
    parts = DEFAULT_PARTITIONS + [Partition("nvs_keys", 1, 4, KEYS, 0x1000)]
    if table != 0x8000:  # the app's own nvs moves up behind the table's sector, as ESP-IDF lays it out
        parts = [Partition("nvs", 1, 2, table + 0x1000, 0x3000)] + parts[2:]
    return build_firmware(chip, project="relay", version="1.4.2", app_size=150_000, partitions=parts,
                          manifest=twosmart_manifest(encrypted=True), partition_table_offset=table,
                          flash_encryption=built)


def secure_profile(env, chip: str = "esp32c3", mode: str = "development", encryption: str = "per-unit",
                   extra: str = "", table: int = 0x8000, built: str | None = None) -> str:
    """The relay profile on `chip`, built with NVS encryption, with [security] flash_encryption = mode.

    `built`: the bootloader is built with flash encryption in that mode (the chip makes its key on first boot)."""
    fw = secure_firmware(chip, table, built)

    def edit(text: str) -> str:
        text = text.replace('chip = "esp32"', f'chip = "{chip}"')
        text = text.replace('offset = "0x1000"', f'offset = "{fw.bootloader_offset:#x}"')
        text = text.replace('offset = "0x8000"', f'offset = "{table:#x}"')
        text = text.replace('namespace = "2smart"', f'namespace = "2smart"\nencryption = "{encryption}"')
        return text + f'\n[security]\nflash_encryption = "{mode}"\n{extra}'

    pin_firmware(env, fw, edit)
    return "relay"


def board_key(dev) -> bytes:
    """The flash-encryption key as the chip's engine holds it (what the station burned)."""
    return dev.call(dev.efuse.flash_key)[1]


def forms(key: bytes) -> list[bytes]:
    h = key.hex()
    return [key, h.encode(), h.upper().encode(), base64.b64encode(key)]


def read_back(url: str, chip: str, tmp_path, offset: int, size: int) -> bytes:
    out = tmp_path / f"read-{offset:x}.bin"
    r = esptool_cli("--chip", chip, "-p", url, "read-flash", hex(offset), hex(size), str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    return out.read_bytes()


# -- profile check ------------------------------------------------------------------------------

def test_profile_check_says_what_is_burned(station_env, capsys):
    secure_profile(station_env, "esp32c3", "release")
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 0, err
    assert "flash encryption (release mode)" in out and "can never be undone" in out
    for fuse in ("BLOCK_KEY0 purpose XTS_AES_128_KEY", "SPI_BOOT_CRYPT_CNT", "DIS_DOWNLOAD_MANUAL_ENCRYPT",
                 "DIS_PAD_JTAG", "DIS_USB_JTAG"):
        assert fuse in out, out
    assert "never stored" in out


@pytest.mark.parametrize("case, words", [
    ("no nvs encryption", "flash encryption does not cover the config"),
    ("nvs encryption alone", "'per-unit' needs [security] flash_encryption"),
    ("secure boot without a key", "secure boot needs the station's signing key"),
    ("chip key, bootloader without flash encryption", "this bootloader is built without it"),
    ("chip key, bootloader in the other mode", "this bootloader is built in release mode"),
])
def test_profile_check_refuses_impossible_combinations(station_env, capsys, case, words):
    if case == "no nvs encryption":
        secure_profile(station_env, encryption="none")
    elif case.startswith("chip key"):
        secure_profile(station_env, extra='key = "chip"\n', built="release" if "other" in case else None)
    elif case == "nvs encryption alone":
        secure_profile(station_env, mode="off")
    else:
        secure_profile(station_env, extra="secure_boot = true\n")
    rc, _, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 2 and words in err, err
    with VirtualBench(1, "esp32c3", run_dir=station_env / "run") as bench:  # and nothing is burned
        rc, _, _ = run_station(capsys, "flash", "--port", bench[0].url, "--json")
        assert rc == 2 and not bench[0].device.state()["flash_encryption"]
        assert bench[0].device.flash.read(0x10000, 16) == b"\xff" * 16


# -- a unit end to end ---------------------------------------------------------------------------

CHIPS = ["esp32c3", pytest.param("esp32", marks=pytest.mark.slow), pytest.param("esp32s3", marks=pytest.mark.slow)]


@pytest.mark.parametrize("chip", CHIPS)
def test_secure_unit_passes_and_its_config_reads_back_sealed(station_env, capsys, tmp_path, chip):
    secure_profile(station_env, chip, "development")
    with VirtualBench(1, chip, run_dir=station_env / "run") as bench:
        url, dev = bench[0].url, bench[0].device
        rc, out, err = run_station(capsys, "flash", "--port", url, "--json")
        finished = [e for e in json_lines(out) if e["event"] == "unit_finished"]
        assert rc == 0 and finished[0]["outcome"] == "passed", (finished, err[-2000:])
        assert "secure" in finished[0]["durations"]
        state = dev.state()
        assert state["flash_encryption"] and state["mode"] == "app"  # it booted, and the smoke test passed

        # esptool read-flash returns ciphertext: no token, no NVS the reader can parse, no plain keys
        config = read_back(url, chip, tmp_path, CONFIG, 0x6000)
        assert TOKEN.encode() not in config
        with pytest.raises(NvsError):
            read_partition(config)
        keys_raw = read_back(url, chip, tmp_path, KEYS, 0x1000)
        plain_keys = dev.call(lambda: dev.cache_read(KEYS, 0x1000))  # as the app reads them, decrypted
        assert keys_raw != plain_keys and plain_keys[:64] not in keys_raw
        assert dev.call(lambda: dev.runtime.config["token"]) == TOKEN  # the firmware itself decrypted its config

        key = board_key(dev)
        rc, out2, err2 = run_station(capsys, "export", "--format", "jsonl", "--out", str(tmp_path / "x.jsonl"),
                                     "--outcome", "passed")
        exported = (tmp_path / "x.jsonl").read_bytes()
    row = Record(station_env / "station.db").attempts(1)[0]
    assert row["flash_encryption"] == "development"
    assert [b["state"] for b in json.loads(row["burns"])] == ["done"] * len(json.loads(row["burns"]))
    assert row["key_escrow"].startswith("aes-gcm:")
    # the key itself appears nowhere: database (and its WAL), --json output, stderr, export
    haystacks = {p.name: p.read_bytes() for p in station_env.glob("station.db*") if p.is_file()}
    haystacks.update(stdout=out.encode(), stderr=err.encode(), export=exported, export_out=(out2 + err2).encode())
    for where, data in haystacks.items():
        for form in forms(key):
            assert form not in data, f"the flash-encryption key found in {where}"


# -- rework ----------------------------------------------------------------------------------------

def test_development_unit_is_reworked_with_its_escrowed_key(station_env, capsys):
    secure_profile(station_env, "esp32c3", "development")
    with VirtualBench(1, "esp32c3", run_dir=station_env / "run") as bench:
        url, dev = bench[0].url, bench[0].device
        rc, _, err = run_station(capsys, "flash", "--port", url)
        assert rc == 0, err
        burned = dev.call(lambda: [list(b) for b in dev.efuse.burned])
        dev.flash.erase(0x10000, 0x1000)  # the app damaged: only a re-flash brings it back
        rc, out, err = run_station(capsys, "flash", "--port", url, "--rework", "--json")
        finished = [e for e in json_lines(out) if e["event"] == "unit_finished"][0]
        assert rc == 0 and finished["outcome"] == "passed", (finished, err[-2000:])
        assert "app" in finished["written_regions"]
        assert dev.state()["mode"] == "app"
        assert dev.call(lambda: [list(b) for b in dev.efuse.burned]) == burned  # not one bit burned again
    rework = Record(station_env / "station.db").attempts(1)[0]
    assert rework["rework"] and json.loads(rework["burns"] or "[]") == [] and rework["key_escrow"]


def test_release_unit_rework_is_refused_and_nothing_written(station_env, capsys):
    secure_profile(station_env, "esp32c3", "release")
    with VirtualBench(1, "esp32c3", run_dir=station_env / "run") as bench:
        url, dev = bench[0].url, bench[0].device
        rc, _, err = run_station(capsys, "flash", "--port", url)
        assert rc == 0, err
        flash_before = dev.flash.read(0, 0x200000)
        rc, out, err = run_station(capsys, "flash", "--port", url, "--rework", "--json")
        finished = [e for e in json_lines(out) if e["event"] == "unit_finished"][0]
        assert finished["outcome"] == "failed" and finished["failed_step"] == "secure", finished
        assert "release mode: it cannot be re-flashed" in finished["error"]
        assert dev.flash.read(0, 0x200000) == flash_before


# -- what release mode burns ---------------------------------------------------------------------

@pytest.mark.parametrize("chip", CHIPS)
def test_release_unit_can_never_turn_encryption_off_nor_burn_its_cache_disables(station_env, capsys, chip):
    """ESP-IDF's release-mode first boot with the default Kconfig: every bit of the crypt count burned
    (flash_encrypt.c), the cache-disable eFuses write-protected (<chip>/flash_encryption_secure_features.c).
    Oracles: espefuse's own reading and refusals, the board's bootloader line, the eFuse array itself."""
    import espefuse
    from esptool import cmds
    from esptool.util import FatalError

    from tests.flashing.test_efuse import burn, read_field

    secure_profile(station_env, chip, "release")
    count, most, cache = ("FLASH_CRYPT_CNT", 0x7F, "DIS_CACHE") if chip == "esp32" else \
        ("SPI_BOOT_CRYPT_CNT", 0x7, "DIS_ICACHE")
    with VirtualBench(1, chip, run_dir=station_env / "run") as bench:
        url, dev = bench[0].url, bench[0].device
        rc, out, err = run_station(capsys, "flash", "--port", url, "--json")
        finished = [e for e in json_lines(out) if e["event"] == "unit_finished"]
        assert rc == 0 and finished[0]["outcome"] == "passed", (finished, err[-2000:])
        # the bootloader counts what is left of the crypt count: nothing, encryption stays on for good
        assert "flash encryption is enabled (0 plaintext flashes left)" in dev.console_text()
        dev.reset("download")
        assert read_field(url, count) == most
        # a bit of the cache disable would brick the unit: espefuse refuses it, and forced, the silicon does
        with pytest.raises(FatalError, match=f"{cache} is write-protected. Burn is not possible."):
            burn(url, chip, "burn-efuse", cache, "1")
        esp = cmds.detect_chip(url, connect_mode="no-reset")
        try:
            with espefuse.init_commands(esp=esp, do_not_confirm=True) as fuses:
                fuses.efuses.force_write_always = True
                with pytest.raises(FatalError, match="The burn was not successful"):  # espefuse's read-back
                    fuses.burn_efuse({cache: "1"})
        finally:
            esp._port.close()
        assert dev.call(lambda: dev.efuse.burned_field(cache)) == 0
    burns = json.loads(Record(station_env / "station.db").attempts(1)[0]["burns"])
    assert [b["burn"].split(" ")[0] for b in burns][-3:] == ["release", "permanent", "write-protect"]
    assert {b["state"] for b in burns} == {"done"}


# -- a key the chip makes ------------------------------------------------------------------------

@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("mode", ["development", "release"])
def test_chip_key_unit_encrypts_itself_on_first_boot_and_is_reworked_by_the_rom(station_env, capsys, tmp_path,
                                                                               chip, mode):
    secure_profile(station_env, chip, mode, extra='key = "chip"\n', built=mode)
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 0 and "generated by the chip itself on its first boot" in out and "no escrow" in out, err
    with VirtualBench(1, chip, run_dir=station_env / "run") as bench:
        url, dev = bench[0].url, bench[0].device
        rc, out, err = run_station(capsys, "flash", "--port", url, "-v")
        assert rc == 0 and "PASS" in err, err[-3000:]
        assert "flash_encrypt: Flash encryption completed" in err  # the board's own first boot, in its boot log
        assert "boot: Resetting with flash encryption enabled..." in err
        assert dev.state()["flash_encryption"] and dev.state()["mode"] == "app"
        assert dev.call(lambda: dev.runtime.config["token"]) == TOKEN  # the firmware decrypts its nvs_keys
        config = read_back(url, chip, tmp_path, CONFIG, 0x6000)
        assert TOKEN.encode() not in config
        with pytest.raises(NvsError):
            read_partition(config)
        keys_raw = read_back(url, chip, tmp_path, KEYS, 0x1000)
        assert keys_raw != dev.call(lambda: dev.cache_read(KEYS, 0x1000))  # encrypted in place by the chip
        burned = dev.call(lambda: [list(b) for b in dev.efuse.burned])

        dev.flash.erase(0x10000, 0x1000)  # the app damaged: only a re-flash brings it back
        rc, out, err = run_station(capsys, "flash", "--port", url, "--rework", "--json")
        again = [e for e in json_lines(out) if e["event"] == "unit_finished"][0]
        if mode == "release":
            assert again["outcome"] == "failed" and "release mode: it cannot be re-flashed" in again["error"]
        else:  # esptool --encrypt: the ROM encrypts with the chip's key, which nobody else holds
            assert rc == 0 and again["outcome"] == "passed", (again, err[-2000:])
            assert "app" in again["written_regions"] and dev.state()["mode"] == "app"
        assert dev.call(lambda: [list(b) for b in dev.efuse.burned]) == burned  # not one bit burned again
    first = Record(station_env / "station.db").attempts(2)[-1]
    assert first["flash_encryption"] == mode and not first["key_escrow"]
    assert [(b["burn"].split(" ")[0], b["state"]) for b in json.loads(first["burns"])] == [("chip", "done")]


# -- the record written ahead of every burn ------------------------------------------------------

def kill_mid_burn(env, dev, url: str, programs_done: int) -> None:
    """`station flash` in a subprocess, killed -9 while the chip hangs as its next eFuse program command starts."""
    dev.set_fault("hang_after_burns", programs_done)
    station = Proc(["flash", "--port", url, "--json"], cwd=env)
    try:
        station.until(lambda: dev.state()["mode"] == "halted")
        station.p.send_signal(signal.SIGKILL)
        assert station.finish() == -signal.SIGKILL
    finally:
        station.stop()


def test_kill_9_mid_burn_is_recorded_with_exactly_the_burns_done(station_env):
    secure_profile(station_env, "esp32c3", "release")
    with VirtualBench(1, "esp32c3", run_dir=station_env / "run") as bench:
        url, dev = bench[0].url, bench[0].device
        # the key burn takes two program commands; the chip hangs as the third (the crypt count) starts
        kill_mid_burn(station_env, dev, url, 2)
        assert dev.call(lambda: dev.efuse.burned_field("SPI_BOOT_CRYPT_CNT")) == 0  # what the board holds
        assert dev.call(dev.efuse.flash_key) is not None  # the key burn itself was done
    con = sqlite3.connect(station_env / "station.db")
    con.row_factory = sqlite3.Row
    assert con.execute("select outcome from attempts").fetchone()["outcome"] == "started"  # nobody settled it yet
    kinds = [r["kind"] for r in con.execute("select kind from journal where attempt_uid != '' order by id")]
    con.close()
    assert kinds.count("burn") == 4  # the plan, key burning, key done, crypt count burning: each before its burn

    record = Record(station_env / "station.db", key=bytes.fromhex((station_env / "station.key").read_text()))
    try:
        assert len(record.settled) == 1
        row = record.attempts(1)[0]
        assert row["outcome"] == "interrupted"
        assert row["error"].startswith("interrupted: efuses partly burned (done: key (BLOCK_KEY0 purpose "
                                       "XTS_AES_128_KEY"), row["error"]
        assert "may or may not have happened: enable (SPI_BOOT_CRYPT_CNT)" in row["error"]
        assert "not started: release (DIS_DOWNLOAD_MANUAL_ENCRYPT" in row["error"]
        assert [b["state"] for b in json.loads(row["burns"])] == ["done", "burning", "pending", "pending", "pending"]
        assert record.verify_chain() == []
    finally:
        record.close()


# -- Secure Boot v2 ------------------------------------------------------------------------------

def test_profile_check_refuses_a_signed_bootloader_over_the_partition_table(station_env, capsys):
    from tests.flashing.test_secure_boot import signing_key

    key = signing_key(station_env, "secure-boot.pem")
    with open(station_env / "station.toml", "a") as f:
        f.write(f'secure_boot_key = "{key.name}"\n')
    secure_profile(station_env, "esp32", "development", extra="secure_boot = true\n")  # bootloader at 0x1000
    rc, _, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 2 and "the signed bootloader would end at 0x9000, past the partition table at 0x8000: move the " \
                       "partition table to 0x9000 or later (ESP-IDF CONFIG_PARTITION_TABLE_OFFSET" in err, err
    shutil.copytree(REPO / "profiles/relay", station_env / "profiles/relay", dirs_exist_ok=True)  # as it came
    secure_profile(station_env, "esp32", "development", extra="secure_boot = true\n", table=0x9000)  # just fits
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 0 and "BLOCK2 Secure Boot v2 key digest" in out and "ABS_DONE_1" in out, err


def test_profile_check_refuses_a_secure_boot_bootloader_larger_than_the_rom_verifies(station_env, capsys):
    """ESP-IDF "Bootloader Size": with Secure Boot v2 the ESP32 ROM verifies at most 48 KB, wherever the table is."""
    from flashing.images import Segment, build_image, build_partition_table, chip_facts
    from tests.flashing.test_secure_boot import signing_key
    from tests.station.test_pipeline_refusals import write_profile

    key = signing_key(station_env, "secure-boot.pem")
    with open(station_env / "station.toml", "a") as f:
        f.write(f'secure_boot_key = "{key.name}"\n')
    big = build_image([Segment(0x3FFF0030, bytes(0xC100))], chip_id=chip_facts("esp32").image_chip_id,
                      entry=0x40080650)  # 48 KB and a little: signed, it still ends before the table at 0x10000
    app = build_firmware("esp32", app_size=60_000, manifest=twosmart_manifest("other")).app
    table = build_partition_table([Partition("factory", 0, 0, 0x20000, 0x100000)])
    name = write_profile(station_env, "big-boot", "esp32", [("bootloader", 0x1000, big),
                                                            ("partition-table", 0x10000, table), ("app", 0x20000, app)])
    with open(station_env / f"profiles/{name}/profile.toml", "a") as f:
        f.write('\n[security]\nflash_encryption = "development"\nsecure_boot = true\n')
    rc, _, err = run_station(capsys, "profile", "check", name)
    assert rc == 2 and f"the bootloader is {len(big)} bytes; with Secure Boot v2 the esp32 ROM verifies at most " \
                       "49152" in err, err
    assert "past the partition table" not in err


# ESP32: the generated 26 KB bootloader at 0x1000, signed, ends at 0x9000: its build moves the partition table.
# ESP32 runs by default (about 11 s): its path (BLOCK2 digest, ABS_DONE_1, the ROM's check) is only here end to end
SECURE_BOOT_CHIPS = [("esp32c3", 0x8000), ("esp32", MOVED_TABLE), pytest.param("esp32s3", 0x8000,
                                                                                 marks=pytest.mark.slow)]


@pytest.mark.parametrize("chip, table", SECURE_BOOT_CHIPS)
def test_secure_boot_unit_boots_only_its_signed_firmware(station_env, capsys, tmp_path, chip, table):
    """Secure Boot v2 and flash encryption on one unit: it passes, then boots only firmware signed with the
    station's key (the board's own check, not the station's)."""
    from esptool.util import FatalError

    from tests.flashing.test_efuse import burn, key_file, read_field
    from tests.flashing.test_secure_boot import signing_key

    key = signing_key(station_env, "secure-boot.pem")  # a station file, outside profiles/
    with open(station_env / "station.toml", "a") as f:
        f.write(f'secure_boot_key = "{key.name}"\n')
    secure_profile(station_env, chip, "development", extra="secure_boot = true\n", table=table)
    digest, enable = ("BLOCK2 Secure Boot v2 key digest", "ABS_DONE_1") if chip == "esp32" else \
        ("BLOCK_KEY1 purpose SECURE_BOOT_DIGEST0", "SECURE_BOOT_EN")
    rc, out, err = run_station(capsys, "profile", "check", "relay")
    assert rc == 0 and digest in out and enable in out, err
    with VirtualBench(1, chip, run_dir=station_env / "run") as bench:
        url, dev = bench[0].url, bench[0].device
        rc, out, err = run_station(capsys, "flash", "--port", url, "--json")
        finished = [e for e in json_lines(out) if e["event"] == "unit_finished"][0]
        assert rc == 0 and finished["outcome"] == "passed", (finished, err[-2000:])
        log = dev.console_text()
        assert "secure_boot_v2: Signature verified successfully!" in log, log
        assert dev.call(lambda: dev.efuse.field(enable)) == 1
        assert dev.call(lambda: dev.efuse.secure_boot_digests()) is not None  # the chip itself has it on
        # an app signed with another key no longer boots on this unit (written encrypted, as an attacker with
        # the escrowed key could): the board's own check, not the station's
        from flashing.secure import encrypt_region, sign_image

        rogue = signing_key(tmp_path, "rogue.pem")
        app = encrypt_region(chip, board_key(dev), 0x10000, sign_image(secure_firmware(chip, table).app, rogue))
        dev.flash.erase(0x10000, -(-len(app) // 0x1000) * 0x1000 + 0x2000)
        dev.flash.program(0x10000, app)
        dev.reset("app")
        wait_until(lambda: dev.state()["mode"] == "bootloop", "the unit to refuse the app")
        log = dev.console_text()
        assert "secure_boot_v2: Secure Boot V2 verification failed." in log and "image valid, signature bad" in log
        if chip != "esp32":  # key purposes and revocable slots are C3/S3's (ESP32 v3 has its one digest in BLOCK2)
            # nor does one signed by a key whose digest is burned afterwards into a free slot: the station revoked
            # the slots it did not use, as ESP-IDF does when it enables secure boot
            dev.reset("download")
            burn(url, chip, "burn-key-digest", "BLOCK_KEY2", str(rogue), "SECURE_BOOT_DIGEST1")
            assert read_field(url, "KEY_PURPOSE_2") == "SECURE_BOOT_DIGEST1"
            # and RD_DIS is write-protected: a key burned later can never be hidden (ESP-IDF's WR_DIS_RD_DIS)
            burn(url, chip, "burn-key", "BLOCK_KEY3", str(key_file(tmp_path, "hmac.bin")), "HMAC_UP",
                 "--no-read-protect")
            with pytest.raises(FatalError, match="RD_DIS field being already write-disabled"):
                burn(url, chip, "read-protect-efuse", "BLOCK_KEY3")
            dev.reset("app")
            wait_until(lambda: dev.state()["mode"] == "bootloop", "the unit to refuse the app again")
            log = dev.console_text()
            assert "Secure Boot V2 verification failed." in log, log
    burns = [b["burn"] for b in json.loads(Record(station_env / "station.db").attempts(1)[0]["burns"])]
    assert [b.split(" ")[0] for b in burns] == ["key"] + ["crypt-config"] * (chip == "esp32") + \
        ["enable", "secure-boot-digest"] + ["revoke"] * (chip != "esp32") + ["secure-boot", "secure-boot-lock"]


def test_abort_between_burns_names_the_burns_done_and_not_started(station_env):
    import threading

    from station.events import LogLine
    from station.pipeline import UnitJob, provision_unit
    from station.runner import open_station

    secure_profile(station_env, "esp32c3", "development")
    ctx = open_station("relay", station_env / "station.toml")
    cancel = threading.Event()

    def operator(event) -> None:  # F8 as the second burn is announced
        if isinstance(event, LogLine) and event.text.startswith("burning enable"):
            cancel.set()

    ctx.observers.append(operator)
    try:
        with VirtualBench(1, "esp32c3", run_dir=station_env / "run") as bench:
            dev = bench[0].device
            result = provision_unit(UnitJob(bench[0].url), ctx, lambda e: None, cancel)
            assert dev.call(lambda: dev.efuse.burned_field("SPI_BOOT_CRYPT_CNT")) == 0
            assert dev.call(dev.efuse.flash_key) is not None
            assert dev.flash.read(0x10000, 16) == b"\xff" * 16  # nothing written
        assert (result.outcome, result.failed_step) == ("aborted", "secure")
        assert result.error == ("aborted by the operator; efuses partly burned (done: key (BLOCK_KEY0 purpose "
                                "XTS_AES_128_KEY (read- and write-protected)), not started: enable "
                                "(SPI_BOOT_CRYPT_CNT))"), result.error
        row = ctx.record.attempts(1)[0]
        assert row["error"] == result.error and "espefuse summary" in row["remedy"]
    finally:
        ctx.close()


# all three in the default run: each took 7-9 s alone (C3 6.7, ESP32 7.0, S3 9.0), under the ~10 s that would send
# a chip to the slow run
@pytest.mark.parametrize("chip", ["esp32c3", "esp32", "esp32s3"])
def test_a_secure_unit_pairs_with_the_factory_broker_and_keeps_its_own_sealed_config(station_env, mosquitto,
                                                                                   monkeypatch, capsys, tmp_path,
                                                                                   chip):
    """The issue's "boots and pairs": the smoke test's `pair` level (the unit's own test account on a real
    Mosquitto, `/pair`, its MQTT login), then the unit's own config written back, still unreadable."""
    from tests.station.test_smoke import ADMIN_PASSWORD, MONITOR_PASSWORD, smoke_config

    monkeypatch.setenv("STATION_MONITOR_PASSWORD", MONITOR_PASSWORD)
    monkeypatch.setenv("STATION_BROKER_ADMIN_PASSWORD", ADMIN_PASSWORD)
    smoke_config(station_env, mosquitto, timeout=15)
    secure_profile(station_env, chip, "development")
    ready: list[str] = []
    watcher = MqttClient(mosquitto.host, mosquitto.port, "test-watcher", mosquitto.monitor_user, MONITOR_PASSWORD)
    assert watcher.connect() is None
    with VirtualBench(1, chip, run_dir=station_env / "run") as bench:
        url, dev = bench[0].url, bench[0].device
        try:  # the unit's own MQTT login, seen at the broker: it published its $state ready
            watcher.subscribe("+/sweet-home/+/$state",
                              lambda m: ready.append(m.topic.split("/")[2]) if m.payload == b"ready" else None)
            rc, out, err = run_station(capsys, "flash", "--port", url, "--json", "--smoke", "pair")
        finally:
            watcher.close()
        finished = [e for e in json_lines(out) if e["event"] == "unit_finished"]
        assert rc == 0 and finished[0]["outcome"] == "passed", (finished, err[-2000:])
        assert not finished[0]["quarantine"]
        assert dev.mac_text.replace(":", "-") in ready
        assert dev.call(lambda: dev.runtime.config["token"]) == TOKEN  # its own token again, not the test one
        config = read_back(url, chip, tmp_path, CONFIG, 0x6000)
        assert TOKEN.encode() not in config
        with pytest.raises(NvsError):
            read_partition(config)


def test_the_burn_record_reaches_the_central_copy_even_from_a_station_killed_mid_burn(station_env, pg_url):
    """A station with [central] is killed -9 between two burns: its next `central push` gives the
    plant's record every burn entry (the plan, each `burning` before its burn, each `done`) and the
    attempt settled `interrupted: efuses partly burned`, exactly as the station's own record says;
    `central verify` accepts the copy."""
    import psycopg

    secure_profile(station_env, "esp32c3", "development")
    cfg = station_env / "station.toml"
    cfg.write_text(cfg.read_text() + f'\n[central]\nurl = "{pg_url}"\npush_interval_s = 0.2\ntimeout_s = 10.0\n')
    with VirtualBench(1, "esp32c3", run_dir=station_env / "run") as bench:
        url, dev = bench[0].url, bench[0].device
        kill_mid_burn(station_env, dev, url, 2)  # the key burn's two program commands, then the crypt count hangs
    push = run_station_process("central", "push", cwd=station_env, env={**os.environ, "STATION_CONFIG": str(cfg)})
    assert push.returncode == 0, push.stdout + push.stderr

    with psycopg.connect(pg_url) as conn:
        kinds = [k for (k,) in conn.execute("SELECT kind FROM journal WHERE kind = ANY(%s) ORDER BY seq",
                                            (list(ATTEMPT_KINDS),))]
        (row,) = [r for (r,) in conn.execute("SELECT row FROM attempts")]
        local_entries = conn.execute("SELECT entries FROM stations").fetchone()[0]
    assert kinds == ["started", "burn", "burn", "burn", "burn", "interrupted"], kinds
    assert row["outcome"] == "interrupted"
    assert "efuses partly burned (done: key (BLOCK_KEY0" in row["error"], row["error"]
    assert "may or may not have happened: enable (SPI_BOOT_CRYPT_CNT)" in row["error"], row["error"]
    burns = json.loads(row["burns"])  # the attempt row as the station's record holds it: burns as JSON text
    assert [b["state"] for b in burns] == ["done", "burning"], burns
    record = Record(station_env / "station.db", key=bytes.fromhex((station_env / "station.key").read_text()))
    try:
        local = record.attempts(1)[0]
        assert local["error"] == row["error"] and json.loads(local["burns"]) == burns
        assert record.db().execute("select count(*) from journal").fetchone()[0] == local_entries
    finally:
        record.close()
    check = run_station_process("central", "verify", cwd=station_env, env={**os.environ, "STATION_CONFIG": str(cfg)})
    assert check.returncode == 0, check.stdout + check.stderr
