"""The real espefuse (CLI and Python API) against the virtual boards' eFuses.

Oracles outside the code under test: espefuse's own summary, burn checks and read-back
(the tool that burns real chips), and the board's state file across a restart.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from esptool import cmds
from esptool.util import FatalError

import espefuse
from flashing.virtual.bench import VirtualBench

# the unmodified espefuse CLI with the vesp:// scheme registered (as flashing.esptool_cli does for esptool)
RUN_ESPEFUSE = "import sys, flashing, espefuse; sys.argv[0] = 'espefuse'; espefuse._main()"


def espefuse_cli(port: str, chip: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_ESPEFUSE, "--port", port, "--chip", chip, *args],
                          capture_output=True, text=True, timeout=120)


def burn(port: str, chip: str, *args: str) -> None:
    """An espefuse burn that must succeed: the same CLI, run in this process (no interpreter start)."""
    espefuse.main(["--port", port, "--chip", chip, "--do-not-confirm", *args])


def read_field(port: str, name: str):
    """A field's value as the Python API reads it from the board."""
    esp = cmds.detect_chip(port, connect_mode="no-reset")
    try:
        with espefuse.init_commands(esp=esp) as fuses:
            value = fuses.efuses[name].get()
    finally:
        esp._port.close()
    if name.startswith("BLOCK") and isinstance(value, str):
        return bytes.fromhex(value.replace(" ", ""))  # a key block: espefuse shows its bytes in hex
    return value


def key_file(tmp_path: Path, name: str, size: int = 32, seed: int = 7) -> Path:
    import random

    path = tmp_path / name
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


@pytest.mark.parametrize("chip", ["esp32", "esp32c3", pytest.param("esp32s3", marks=pytest.mark.slow)])
def test_summary_shows_the_board_mac_and_no_coding_errors(make_bench, chip):
    bench = make_bench(1, chip)
    r = espefuse_cli(bench[0].url, chip, "summary")
    assert r.returncode == 0, r.stdout + r.stderr
    mac = bench[0].device.state()["mac"]
    shown = re.search(r"^MAC \(BLOCK\d\)[^=]*= ((?:[0-9a-f]{2}:){5}[0-9a-f]{2})(.*)$", r.stdout, re.M | re.I)
    assert shown and shown.group(1).lower() == mac, r.stdout
    if chip == "esp32":
        assert "OK)" in shown.group(2)  # the factory MAC_CRC is the ROM's esp_crc8 of the MAC
    # the factory-burned blocks carry valid check values: espefuse's coding-scheme check is clean
    assert "Error(s) in BLOCK" not in r.stdout


def test_burn_efuse_survives_a_board_restart(tmp_path):
    state = tmp_path / "state"
    with VirtualBench(1, "esp32c3", state_dir=state, run_dir=tmp_path / "run1", seed=1) as bench:
        mac = bench[0].device.state()["mac"]
        burn(bench[0].url, "esp32c3", "burn-efuse", "SECURE_VERSION", "5")
        assert read_field(bench[0].url, "SECURE_VERSION") == 5
    assert json.loads((state / "device-0.efuse.json").read_text())["chip"] == "esp32c3"
    with VirtualBench(1, "esp32c3", state_dir=state, run_dir=tmp_path / "run2", seed=1) as bench:
        assert bench[0].device.state()["mac"] == mac
        assert read_field(bench[0].url, "SECURE_VERSION") == 5


def test_bits_only_go_from_0_to_1(make_bench):
    bench = make_bench(1, "esp32c3")
    url = bench[0].url
    burn(url, "esp32c3", "burn-efuse", "SECURE_VERSION", "0b0101")
    # espefuse refuses to clear bits: silicon cannot
    r = espefuse_cli(url, "esp32c3", "--do-not-confirm", "burn-efuse", "SECURE_VERSION", "0b0010")
    assert r.returncode != 0
    assert "New value contains some bits that cannot be cleared" in r.stdout + r.stderr
    assert read_field(url, "SECURE_VERSION") == 0b0101
    # forced, the tool writes 0b0010 and the fuses OR it in: the 1s already burned stay, and
    # espefuse's read-back finds 0b0111 where it asked for 0b0010, as it would on silicon
    esp = cmds.detect_chip(url, connect_mode="no-reset")
    try:
        with espefuse.init_commands(esp=esp, do_not_confirm=True) as fuses:
            fuses.efuses.force_write_always = True
            with pytest.raises(FatalError, match="The burn was not successful"):
                fuses.burn_efuse({"SECURE_VERSION": "2"})
    finally:
        esp._port.close()
    assert read_field(url, "SECURE_VERSION") == 0b0111
    dev = bench[0].device
    assert dev.call(lambda: dev.efuse.burned_field("SECURE_VERSION")) == 0b0111


def test_protected_key_reads_zeros_and_cannot_be_burned_again(make_bench, tmp_path):
    bench = make_bench(1, "esp32c3")
    url, dev = bench[0].url, bench[0].device
    first, second = key_file(tmp_path, "k1.bin", seed=1), key_file(tmp_path, "k2.bin", seed=2)
    burn(url, "esp32c3", "burn-key", "BLOCK_KEY0", str(first), "XTS_AES_128_KEY")
    assert read_field(url, "KEY_PURPOSE_0") == "XTS_AES_128_KEY"
    assert read_field(url, "BLOCK_KEY0") == bytes(32)  # read-protected: the registers show zeros
    assert read_field(url, "RD_DIS") & 1
    # the engine still has it: the key as burned (espefuse reverses it for the XTS peripheral)
    assert dev.call(dev.efuse.flash_key) == ("xts", first.read_bytes(), 0)

    r = espefuse_cli(url, "esp32c3", "--do-not-confirm", "burn-key", "BLOCK_KEY0", str(second), "XTS_AES_128_KEY")
    assert r.returncode != 0
    assert "BLOCK_KEY0 is read-protected" in r.stderr and "Burn in this case may damage" in r.stderr
    # forcing the tool does not force the silicon: the write-protected block keeps its key
    r = espefuse_cli(url, "esp32c3", "--do-not-confirm", "burn-key", "--force-write-always",
                     "BLOCK_KEY0", str(second), "XTS_AES_128_KEY")
    assert "Skipped because '--force-write-always' option" in r.stdout, r.stdout + r.stderr
    assert "After 3 attempts, the required data was not set to BLOCK4" in r.stdout
    assert dev.call(dev.efuse.flash_key) == ("xts", first.read_bytes(), 0)


def test_read_protect_efuse_hides_a_key_left_readable(make_bench, tmp_path):
    bench = make_bench(1, "esp32c3")
    url = bench[0].url
    data = key_file(tmp_path, "hmac.bin", seed=3)
    burn(url, "esp32c3", "burn-key", "BLOCK_KEY1", str(data), "HMAC_UP", "--no-read-protect")
    assert read_field(url, "BLOCK_KEY1") == data.read_bytes()
    burn(url, "esp32c3", "read-protect-efuse", "BLOCK_KEY1")
    assert read_field(url, "BLOCK_KEY1") == bytes(32)


def test_security_info_follows_the_efuses(make_bench, tmp_path):
    bench = make_bench(1, "esp32c3")
    url = bench[0].url
    burn(url, "esp32c3", "burn-key", "BLOCK_KEY2", str(key_file(tmp_path, "k.bin")), "XTS_AES_128_KEY")
    burn(url, "esp32c3", "burn-efuse", "SPI_BOOT_CRYPT_CNT", "1")
    esp = cmds.detect_chip(url, connect_mode="no-reset")
    try:
        info = esp.get_security_info()
        assert info["flash_crypt_cnt"] == 1
        assert info["key_purposes"][2] == 4  # XTS_AES_128_KEY
        assert esp.get_flash_encryption_enabled()
        assert esp.is_flash_encryption_key_valid()
    finally:
        esp._port.close()


def test_secure_download_mode_burned_locks_out_espefuse(make_bench):
    bench = make_bench(1, "esp32c3")
    url = bench[0].pty.path  # espefuse reconnects by the port's device name, which a vesp:// URL is not
    r = espefuse_cli(url, "esp32c3", "--do-not-confirm", "burn-efuse", "ENABLE_SECURITY_DOWNLOAD")
    assert r.returncode == 0, r.stdout + r.stderr
    # espefuse's own burn sequence loses the chip to Secure Download Mode after the read command
    assert "Secure download mode is enabled" in r.stdout, r.stdout
    r = espefuse_cli(url, "esp32c3", "summary")
    assert r.returncode != 0
    assert "Secure Download Mode is enabled" in r.stdout + r.stderr


def test_download_mode_disabled_boots_from_flash(make_bench):
    bench = make_bench(1, "esp32c3")
    url, dev = bench[0].url, bench[0].device
    burn(url, "esp32c3", "burn-efuse", "DIS_DOWNLOAD_MODE")
    state = dev.reset("download")  # IO0 held low, as the auto-reset circuit does
    assert state["download_disabled"] and state["mode"] != "rom"


@pytest.mark.slow
@pytest.mark.parametrize("chip", ["esp32", "esp32s3"])
def test_protected_key_matrix(make_bench, tmp_path, chip):
    bench = make_bench(1, chip)
    url, dev = bench[0].url, bench[0].device
    key = key_file(tmp_path, "k.bin")
    if chip == "esp32":
        burn(url, chip, "burn-key", "flash_encryption", str(key))
        assert read_field(url, "BLOCK1") == bytes(32)
        assert dev.call(dev.efuse.flash_key)[:2] == ("esp32", key.read_bytes())
        r = espefuse_cli(url, chip, "--do-not-confirm", "burn-key", "flash_encryption", str(key))
    else:
        burn(url, chip, "burn-key", "BLOCK_KEY3", str(key), "XTS_AES_128_KEY")
        assert read_field(url, "BLOCK_KEY3") == bytes(32)
        r = espefuse_cli(url, chip, "--do-not-confirm", "burn-key", "BLOCK_KEY3", str(key), "XTS_AES_128_KEY")
    assert r.returncode != 0


def test_burn_key_digest_is_readable_and_write_protected(make_bench, tmp_path):
    pytest.importorskip("cryptography")
    bench = make_bench(1, "esp32c3")
    url = bench[0].url
    signing = tmp_path / "sb.pem"
    r = subprocess.run([sys.executable, "-m", "espsecure", "generate-signing-key", "--version", "2",
                        "--scheme", "rsa3072", str(signing)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    digest = tmp_path / "digest.bin"
    r = subprocess.run([sys.executable, "-m", "espsecure", "digest-sbv2-public-key", "--keyfile", str(signing),
                        "--output", str(digest)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    burn(url, "esp32c3", "burn-key-digest", "BLOCK_KEY1", str(signing), "SECURE_BOOT_DIGEST0")
    assert read_field(url, "KEY_PURPOSE_1") == "SECURE_BOOT_DIGEST0"
    assert read_field(url, "BLOCK_KEY1") == digest.read_bytes()  # a digest stays readable
    r = espefuse_cli(url, "esp32c3", "summary")
    assert re.search(r"BLOCK_KEY1 \(BLOCK5\)\s+Purpose: SECURE_BOOT_DIGEST0", r.stdout)


def test_burn_takes_the_write_opcode_and_shows_after_the_read_command(make_bench):
    """espefuse's C3 sequence by hand over WRITE_REG/READ_REG (fields.py efuse_program/efuse_read)."""
    from espefuse.efuse.esp32c3.mem_definition import EfuseDefineBlocks, EfuseDefineRegisters as R

    bench = make_bench(1, "esp32c3")
    esp = cmds.detect_chip(bench[0].url, connect_mode="no-reset")
    word4 = EfuseDefineBlocks.get(EfuseDefineBlocks.BLOCKS[0]).rd_addr + 4 * 4  # SECURE_VERSION's word
    try:
        esp.write_reg(R.EFUSE_PGM_DATA0_REG + 4 * 4, 1 << 14)
        esp.write_reg(R.EFUSE_CMD_REG, R.EFUSE_PGM_CMD)  # no 0x5A5A in the conf register: nothing burns
        esp.write_reg(R.EFUSE_CONF_REG, R.EFUSE_READ_OP_CODE)
        esp.write_reg(R.EFUSE_CMD_REG, R.EFUSE_READ_CMD)
        assert esp.read_reg(word4) == 0
        esp.write_reg(R.EFUSE_CONF_REG, R.EFUSE_WRITE_OP_CODE)
        esp.write_reg(R.EFUSE_CMD_REG, R.EFUSE_PGM_CMD)
        assert esp.read_reg(R.EFUSE_CMD_REG) == 0  # the command has completed
        assert esp.read_reg(word4) == 0  # burned, but the read registers load only on the read command
        esp.write_reg(R.EFUSE_CONF_REG, R.EFUSE_READ_OP_CODE)
        esp.write_reg(R.EFUSE_CMD_REG, R.EFUSE_READ_CMD)
        assert esp.read_reg(word4) == 1 << 14
        esp.write_reg(word4, 0)  # read registers are not writable
        assert esp.read_reg(word4) == 1 << 14
    finally:
        esp._port.close()


def test_the_stations_parse_of_espefuses_tables_equals_espefuses_own(tmp_path):
    """flashing.secure parses espefuse's eFuse tables once per process (libyaml): the same data as
    PyYAML's own safe loader gives espefuse, and a copy per open, so one unit's burns never touch
    another's table."""
    import os

    import yaml

    from flashing.secure import EFUSE_TABLES, espefuse_module

    espefuse_module()  # as the station's first open of espefuse does

    defs = Path(os.path.dirname(espefuse.__file__)) / "efuse_defs"
    for chip in ("esp32", "esp32c3", "esp32s3"):
        with open(defs / f"{chip}.yaml") as f:
            theirs = yaml.safe_load(f)
        with open(defs / f"{chip}.yaml") as f:
            ours = EFUSE_TABLES.safe_load(f)
        assert ours == theirs and ours  # equal, and not empty
        ours["EFUSES"].clear()
        with open(defs / f"{chip}.yaml") as f:
            assert EFUSE_TABLES.safe_load(f) == theirs  # a caller's change does not reach the next open
        mod = __import__(f"espefuse.efuse.{chip}.mem_definition", fromlist=["yaml"])
        assert mod.yaml is EFUSE_TABLES  # espefuse's own open goes through it
