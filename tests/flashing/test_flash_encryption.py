"""Flash encryption in the virtual boards, driven by the real espefuse, esptool and espsecure.

The oracle for the ciphertext is espsecure's encrypt-flash-data (Espressif's host model of
the chips' encryption engines): what `esptool write-flash --encrypt` leaves in the NOR must
be exactly what espsecure produces for the same key and address. The boot oracle is
ESP-IDF's bootloader text (bootloader_support: esp_image_format.c "image at 0x%x has invalid
magic byte (nothing flashed here?)", flash_encrypt.c "flash encryption is enabled (%d
plaintext flashes left)").
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from esptool import cmds
from esptool.util import FatalError

from flashing.firmware import build_firmware
from tests.conftest import esptool_cli, wait_until
from tests.flashing.test_efuse import burn, key_file


def encrypt_board(url: str, chip: str, tmp_path: Path, key_size: int = 32) -> Path:
    """Burn a flash-encryption key and an odd crypt count, as 'enabling flash encryption externally' does."""
    key = key_file(tmp_path, "fe-key.bin", size=key_size, seed=11)
    if chip == "esp32":
        burn(url, chip, "burn-key", "flash_encryption", str(key))
        burn(url, chip, "burn-efuse", "FLASH_CRYPT_CNT", "1", "FLASH_CRYPT_CONFIG", "0xF")
    else:
        purpose = "XTS_AES_256_KEY" if key_size == 64 else "XTS_AES_128_KEY"
        burn(url, chip, "burn-key", "BLOCK_KEY0", str(key), purpose)
        burn(url, chip, "burn-efuse", "SPI_BOOT_CRYPT_CNT", "1")
    return key


def espsecure_encrypt(chip: str, key: Path, address: int, plain: Path, out: Path) -> bytes:
    xts = [] if chip == "esp32" else ["--aes-xts"]
    r = subprocess.run([sys.executable, "-m", "espsecure", "encrypt-flash-data", "--keyfile", str(key),
                        "--address", hex(address), "--output", str(out), *xts, str(plain)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return out.read_bytes()


def esptool_ok(*args: str) -> subprocess.CompletedProcess:
    r = esptool_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


MATRIX = [
    "esp32c3",
    pytest.param("esp32", marks=pytest.mark.slow),
    pytest.param("esp32s3", marks=pytest.mark.slow),
    pytest.param("esp32s3-256", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("variant", MATRIX)
def test_encrypted_write_is_what_espsecure_encrypts(make_bench, tmp_path, variant):
    chip, _, bits = variant.partition("-")
    bench = make_bench(1, chip)
    url = bench[0].url
    key = encrypt_board(url, chip, tmp_path, key_size=64 if bits == "256" else 32)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(random.Random(5).randbytes(24 * 1024 + 96))  # not a whole number of sectors
    esptool_ok("--chip", chip, "-p", url, "write-flash", "--encrypt", "0x10000", str(plain))

    raw = tmp_path / "raw.bin"
    esptool_ok("--chip", chip, "-p", url, "read-flash", "0x10000", hex(plain.stat().st_size), str(raw))
    expected = espsecure_encrypt(chip, key, 0x10000, plain, tmp_path / "expected.bin")
    assert raw.read_bytes() == expected  # read-flash returns the NOR's ciphertext, as espsecure makes it
    assert raw.read_bytes() != plain.read_bytes()


def flash_and_boot(slot, chip: str, regions: list[tuple[int, Path]], encrypt: bool) -> str:
    args = ["--chip", chip, "-p", slot.url, "write-flash"] + (["--encrypt"] if encrypt else [])
    for offset, path in regions:
        args += [hex(offset), str(path)]
    esptool_ok(*args)
    slot.device.reset("app")
    wait_until(lambda: slot.device.state()["mode"] in ("app", "bootloop"), "the board to boot")
    return slot.device.console_text()


@pytest.mark.parametrize("chip", ["esp32c3", pytest.param("esp32", marks=pytest.mark.slow),
                                  pytest.param("esp32s3", marks=pytest.mark.slow)])
def test_encrypted_app_boots_and_a_plaintext_one_does_not(make_bench, tmp_path, chip):
    bench = make_bench(1, chip)
    slot = bench[0]
    encrypt_board(slot.url, chip, tmp_path)
    fw = build_firmware(chip, app_size=120_000, manifest={"sdk": "plain"})
    files = []
    for offset, data in fw.regions():
        path = tmp_path / f"region-{offset:x}.bin"
        path.write_bytes(data)
        files.append((offset, path))

    assert slot.device.state()["flash_encryption"]
    log = flash_and_boot(slot, chip, files, encrypt=True)
    assert slot.device.state()["mode"] == "app", log
    left = 3 if chip == "esp32" else 1  # (7 - 1) / 2 on ESP32's 7-bit count, (3 - 1) / 2 on C3/S3
    assert f"flash_encrypt: flash encryption is enabled ({left} plaintext flashes left)" in log
    assert "app: relay 1.0.0 running" in log
    # the NOR holds no plaintext image: its magic byte is not there to read
    assert slot.device.flash.read(fw.app_offset, 1) != b"\xe9"

    # the same app written in plaintext: the cache decrypts it into noise
    log = flash_and_boot(slot, chip, [files[-1]], encrypt=False)
    assert slot.device.state()["mode"] == "bootloop", log
    assert f"esp_image: image at 0x{fw.app_offset:x} has invalid magic byte (nothing flashed here?)" in log
    assert "boot: Factory app partition is not bootable" in log
    assert "E (" in log and "boot: No bootable app partitions in the partition table" in log


def test_release_mode_refuses_encrypted_writes(make_bench, tmp_path):
    bench = make_bench(1, "esp32c3")
    url = bench[0].url
    encrypt_board(url, "esp32c3", tmp_path)
    burn(url, "esp32c3", "burn-efuse", "DIS_DOWNLOAD_MANUAL_ENCRYPT")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(bytes(4096))
    r = esptool_cli("--chip", "esp32c3", "-p", url, "write-flash", "--encrypt", "0x10000", str(plain))
    assert r.returncode != 0
    assert "encrypt functionality in UART download mode disabled" in r.stdout + r.stderr
    # below esptool's own check, the chip refuses too: ROM and stub alike
    esp = cmds.detect_chip(url, connect_mode="default-reset")
    try:
        with pytest.raises(FatalError):
            esp.flash_begin(4096, 0x10000, encrypted_write=True)
        esp = cmds.run_stub(esp)
        with pytest.raises(FatalError):
            esp.flash_defl_begin(4096, 100, 0x10000, encrypted_write=True)
    finally:
        esp._port.close()


def test_encrypted_write_without_a_key_is_refused(make_bench):
    bench = make_bench(1, "esp32c3")
    esp = cmds.detect_chip(bench[0].url, connect_mode="default-reset")
    try:
        with pytest.raises(FatalError):
            esp.flash_begin(4096, 0x10000, encrypted_write=True)
    finally:
        esp._port.close()
    assert bench[0].device.flash.read(0x10000, 16) == b"\xff" * 16
