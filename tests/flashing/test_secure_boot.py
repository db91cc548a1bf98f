"""Secure Boot v2 in the virtual bootloader, with keys, digests and signatures made by the real espsecure and espefuse.

Oracle for the log text: ESP-IDF's bootloader (secure_boot_v2 "Verifying with RSA-PSS...",
"Signature verified successfully!", "Secure Boot V2 verification failed."; esp_image_format.c
"Secure boot signature verification failed", "image valid, signature bad"; the ROM verifier's
"No signature block magic byte found at signature sector ...").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flashing.console import parse_boot_log
from flashing.firmware import build_firmware
from flashing.images import Partition
from tests.conftest import esptool_cli
from tests.flashing.test_efuse import burn
from tests.flashing.test_flash_encryption import flash_and_boot


def espsecure(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "espsecure", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def signing_key(tmp_path: Path, name: str) -> Path:
    key = tmp_path / name
    espsecure("generate-signing-key", "--version", "2", "--scheme", "rsa3072", str(key))
    return key


def signed(tmp_path: Path, key: Path, image: Path) -> Path:
    out = image.with_suffix(f".{key.stem}.signed")
    espsecure("sign-data", "--version", "2", "--keyfile", str(key), "--output", str(out), str(image))
    return out


def boot_with_app(slot, chip: str, app: Path) -> str:
    return flash_and_boot(slot, chip, [(0x10000, app)], encrypt=False)


# ESP32: the 26 KB bootloader at 0x1000, signed, ends at 0x9000, so its build moves the partition table
MOVED_TABLE = [Partition("nvs", 1, 2, 0xD000, 0x3000), Partition("factory", 0, 0, 0x10000, 0x180000),
               Partition("config", 1, 2, 0x190000, 0x6000)]


def firmware_for_secure_boot(chip: str, **kw):
    if chip == "esp32":
        kw.update(partitions=MOVED_TABLE, partition_table_offset=0xC000)
    return build_firmware(chip, manifest={"sdk": "plain"}, **kw)


def burn_secure_boot(url: str, chip: str, key: Path) -> None:
    if chip == "esp32":  # v3.0: one digest, in BLOCK2; ABS_DONE_1 turns Secure Boot v2 on
        burn(url, chip, "burn-key-digest", str(key))
        burn(url, chip, "burn-efuse", "ABS_DONE_1")
    else:
        burn(url, chip, "burn-key-digest", "BLOCK_KEY0", str(key), "SECURE_BOOT_DIGEST0")
        burn(url, chip, "burn-efuse", "SECURE_BOOT_EN")


@pytest.mark.parametrize("chip", ["esp32c3", pytest.param("esp32s3", marks=pytest.mark.slow),
                                  pytest.param("esp32", marks=pytest.mark.slow)])
def test_only_an_app_signed_with_the_burned_key_boots(make_bench, tmp_path, chip):
    bench = make_bench(1, chip)
    slot = bench[0]
    fw = firmware_for_secure_boot(chip, app_size=60_000)
    for offset, data in fw.regions():
        (tmp_path / f"r{offset:x}.bin").write_bytes(data)
    key = signing_key(tmp_path, "trusted.pem")
    boot_image = tmp_path / f"r{fw.bootloader_offset:x}.bin"  # the ROM checks the bootloader's own signature first
    boot_image.write_bytes(signed(tmp_path, key, boot_image).read_bytes())
    r = esptool_cli("--chip", chip, "-p", slot.url, "write-flash",
                    *[a for off, _ in fw.regions() for a in (hex(off), str(tmp_path / f"r{off:x}.bin"))])
    assert r.returncode == 0, r.stdout + r.stderr
    burn_secure_boot(slot.url, chip, key)
    app = tmp_path / f"r{fw.app_offset:x}.bin"

    log = boot_with_app(slot, chip, signed(tmp_path, key, app))
    assert slot.device.state()["mode"] == "app", log
    assert "secure_boot_v2: Verifying with RSA-PSS..." in log
    assert "secure_boot_v2: Signature verified successfully!" in log
    assert "app: relay 1.0.0 running" in log
    if chip != "esp32":
        assert "Valid secure boot key blocks: 0\nsecure boot verification succeeded\n" in log.replace("\r", "")

    # unsigned, and longer than the signed one: its signature sector lies in erased flash
    bigger = tmp_path / "unsigned.bin"
    bigger.write_bytes(firmware_for_secure_boot(chip, app_size=80_000).app)
    log = boot_with_app(slot, chip, bigger)
    assert slot.device.state()["mode"] == "bootloop", log
    assert "No signature block magic byte found at signature sector (found 0xff not 0xe7). Image not V2 signed?" in log
    assert "esp_image: image valid, signature bad" in log
    assert "boot: Factory app partition is not bootable" in log

    log = boot_with_app(slot, chip, signed(tmp_path, signing_key(tmp_path, "rogue.pem"), app))
    assert slot.device.state()["mode"] == "bootloop", log
    assert "E (" in log and "secure_boot_v2: Secure Boot V2 verification failed." in log
    assert "esp_image: Secure boot signature verification failed" in log

    if chip == "esp32":
        return  # one digest, no revocation
    # revoking the trusted key's slot leaves no key the board trusts
    burn(slot.url, chip, "burn-efuse", "SECURE_BOOT_KEY_REVOKE0")
    log = boot_with_app(slot, chip, signed(tmp_path, key, app))
    assert slot.device.state()["mode"] == "bootloop", log


# the ROM's words: a C3's (Valid secure boot key blocks / secure boot verification failed, as esp-idf issue #15959
# shows an S3 print them); the ESP32 v3 ROM's Secure Boot v2 failure words are not published: boot.py prints the
# same ROM's Secure Boot v1 words ("secure boot check fail", esp-idf issue #743) by analogy
ROM_REFUSES = {"esp32c3": "secure boot verification failed", "esp32": "secure boot check fail\nets_main.c 371\n"}


@pytest.mark.parametrize("chip", ["esp32c3", "esp32"])
def test_an_unsigned_bootloader_stops_in_the_rom_when_secure_boot_is_on(make_bench, tmp_path, chip):
    slot = make_bench(1, chip)[0]
    fw = firmware_for_secure_boot(chip, app_size=60_000)
    for offset, data in fw.regions():
        (tmp_path / f"r{offset:x}.bin").write_bytes(data)
    key = signing_key(tmp_path, "trusted.pem")
    app = tmp_path / f"r{fw.app_offset:x}.bin"
    app.write_bytes(signed(tmp_path, key, app).read_bytes())  # only the app is signed
    r = esptool_cli("--chip", chip, "-p", slot.url, "write-flash",
                    *[a for off, _ in fw.regions() for a in (hex(off), str(tmp_path / f"r{off:x}.bin"))])
    assert r.returncode == 0, r.stdout + r.stderr
    burn_secure_boot(slot.url, chip, key)
    log = boot_with_app(slot, chip, app)
    assert slot.device.state()["mode"] == "bootloop", log
    assert ROM_REFUSES[chip] in log.replace("\r", ""), log
    assert "2nd stage bootloader" not in log  # the ROM never ran it
    problem = parse_boot_log(log.replace("\r", "")).problem()  # what the station's boot check tells the operator
    assert problem.startswith("the board cannot boot its firmware: " + ROM_REFUSES[chip].split("\n")[0]), problem

    # the same bootloader signed with the trusted key: the ROM runs it, and it starts the signed app
    boot_image = tmp_path / f"r{fw.bootloader_offset:x}.bin"
    log = flash_and_boot(slot, chip, [(fw.bootloader_offset, signed(tmp_path, key, boot_image))], encrypt=False)
    assert slot.device.state()["mode"] == "app", log
    assert "2nd stage bootloader" in log and "secure_boot_v2: Signature verified successfully!" in log
