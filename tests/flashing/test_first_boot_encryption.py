"""A bootloader built with flash encryption encrypts the board itself on its first boot, with a key the chip makes.

Oracles: ESP-IDF's first-boot log (docs/en/security/esp32c3_log.inc, flash_encrypt.c,
bootloader_utility.c), espefuse's reading of the eFuses the bootloader burned, and espsecure's
encrypt-flash-data: what `esptool read-flash` returns must be what espsecure makes of the
plaintext with the chip's key at that address.
"""

from __future__ import annotations

import re

import pytest

from flashing.firmware import DEFAULT_PARTITIONS, build_firmware
from flashing.images import Partition
from tests.flashing.test_efuse import read_field
from tests.conftest import wait_until
from tests.flashing.test_flash_encryption import espsecure_encrypt, esptool_ok

KEYS = 0x196000
CHIPS = ["esp32c3", pytest.param("esp32", marks=pytest.mark.slow), pytest.param("esp32s3", marks=pytest.mark.slow)]


def first_boot(slot, chip: str, tmp_path, mode: str | None):
    parts = DEFAULT_PARTITIONS + [Partition("nvs_keys", 1, 4, KEYS, 0x1000)]
    fw = build_firmware(chip, app_size=60_000, manifest={"sdk": "plain"}, partitions=parts, flash_encryption=mode)
    files = []
    for offset, data in fw.regions() + [(KEYS, bytes(range(256)) * 16)]:
        path = tmp_path / f"r{offset:x}.bin"
        path.write_bytes(data)
        files.append((offset, path))
    # plaintext, as the host writes it; no reset from esptool, so the console keeps the first boot from its start
    esptool_ok("--chip", chip, "-p", slot.url, "--after", "no-reset", "write-flash",
               *[a for offset, path in files for a in (hex(offset), str(path))])
    slot.device.reset("app")
    wait_until(lambda: slot.device.state()["mode"] in ("app", "bootloop"), "the board to boot")
    return fw, files, slot.device.console_text()


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("mode", ["development", "release"])
def test_first_boot_encrypts_the_flash_with_a_key_the_chip_made(make_bench, tmp_path, chip, mode):
    slot = make_bench(1, chip)[0]
    url, dev = slot.url, slot.device
    fw, files, log = first_boot(slot, chip, tmp_path, mode)
    assert dev.state()["mode"] == "app" and dev.state()["flash_encryption"], log
    lines = [re.sub(r"^[IWE] \(\d+\) ", "", line) for line in log.replace("\r", "").splitlines()]
    purpose = 0 if chip == "esp32" else 4
    expected = ["boot: Checking flash encryption...", "efuse: Batch mode of writing fields is enabled",
                "flash_encrypt: Generating new flash encryption key...",
                f"efuse: Writing EFUSE_BLK_KEY0 with purpose {purpose}",
                "flash_encrypt: Disable UART bootloader encryption..." if mode == "release" else
                "flash_encrypt: Not disabling UART bootloader encryption",
                "efuse: Batch mode. Prepared fields are committed", "flash_encrypt: bootloader encrypted successfully",
                "flash_encrypt: partition table encrypted and loaded successfully",
                f"flash_encrypt: Encrypting partition 2 at offset 0x10000 (length 0x{len(fw.app):x})...",
                "flash_encrypt: Encrypting partition 4 at offset 0x196000 (length 0x1000)...",  # nvs_keys
                "flash_encrypt: Flash encryption completed", "boot: Resetting with flash encryption enabled..."]
    first = lines[:lines.index("boot: Resetting with flash encryption enabled...") + 1]
    assert [line for line in first if line in expected or line.startswith("flash_encrypt: Encrypting")] == expected
    assert "flash_encrypt: Encrypting partition 3" not in log  # the config NVS: not flagged, not encrypted
    left = 0 if mode == "release" else (3 if chip == "esp32" else 1)
    assert log.count("rst:") == 2 and f"flash encryption is enabled ({left} plaintext flashes left)" in log
    assert "app: relay 1.0.0 running" in log

    # the eFuses the bootloader burned, as espefuse reads them
    dev.reset("download")
    count = "FLASH_CRYPT_CNT" if chip == "esp32" else "SPI_BOOT_CRYPT_CNT"
    assert read_field(url, count) == ((0x7F if chip == "esp32" else 7) if mode == "release" else 1)
    key_block = "BLOCK1" if chip == "esp32" else "BLOCK_KEY0"
    assert read_field(url, key_block) == bytes(32)  # read-protected: nobody reads the chip's key
    if chip != "esp32":
        assert read_field(url, "KEY_PURPOSE_0") == "XTS_AES_128_KEY"
    manual = "DISABLE_DL_ENCRYPT" if chip == "esp32" else "DIS_DOWNLOAD_MANUAL_ENCRYPT"
    assert read_field(url, manual) == (mode == "release")

    # the NOR holds what espsecure makes of each region with the chip's key (known here only to the test)
    key = tmp_path / "chip-key.bin"
    key.write_bytes(dev.call(dev.efuse.flash_key)[1])
    for offset, path in files:
        if offset not in (fw.app_offset, KEYS):
            continue  # the bootloader and the partition table: the second boot read them decrypted
        raw = tmp_path / f"raw{offset:x}.bin"
        esptool_ok("--chip", chip, "-p", url, "read-flash", hex(offset), hex(path.stat().st_size), str(raw))
        assert raw.read_bytes() == espsecure_encrypt(chip, key, offset, path, tmp_path / f"want{offset:x}.bin")


def test_a_bootloader_built_without_flash_encryption_leaves_the_flash_plain(make_bench, tmp_path):
    slot = make_bench(1, "esp32c3")[0]
    fw, _, log = first_boot(slot, "esp32c3", tmp_path, None)
    assert slot.device.state()["mode"] == "app" and not slot.device.state()["flash_encryption"], log
    assert "flash_encrypt" not in log and log.count("rst:") == 1
    assert slot.device.flash.read(0x10000, len(fw.app)) == fw.app
