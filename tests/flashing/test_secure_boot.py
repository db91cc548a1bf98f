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

from flashing.firmware import build_firmware
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


@pytest.mark.parametrize("chip", ["esp32c3", pytest.param("esp32s3", marks=pytest.mark.slow),
                                  pytest.param("esp32", marks=pytest.mark.slow)])
def test_only_an_app_signed_with_the_burned_key_boots(make_bench, tmp_path, chip):
    bench = make_bench(1, chip)
    slot = bench[0]
    fw = build_firmware(chip, app_size=60_000, manifest={"sdk": "plain"})
    for offset, data in fw.regions():
        (tmp_path / f"r{offset:x}.bin").write_bytes(data)
    r = esptool_cli("--chip", chip, "-p", slot.url, "write-flash",
                    *[a for off, _ in fw.regions() for a in (hex(off), str(tmp_path / f"r{off:x}.bin"))])
    assert r.returncode == 0, r.stdout + r.stderr
    key = signing_key(tmp_path, "trusted.pem")
    if chip != "esp32":  # the C3/S3 ROM checks the bootloader's own signature first (not modelled on ESP32)
        boot_image = tmp_path / f"r{fw.bootloader_offset:x}.bin"
        r = esptool_cli("--chip", chip, "-p", slot.url, "write-flash", hex(fw.bootloader_offset),
                        str(signed(tmp_path, key, boot_image)))
        assert r.returncode == 0, r.stdout + r.stderr
    if chip == "esp32":  # v3.0: one digest, in BLOCK2; ABS_DONE_1 turns Secure Boot v2 on
        burn(slot.url, chip, "burn-key-digest", str(key))
        burn(slot.url, chip, "burn-efuse", "ABS_DONE_1")
    else:
        burn(slot.url, chip, "burn-key-digest", "BLOCK_KEY0", str(key), "SECURE_BOOT_DIGEST0")
        burn(slot.url, chip, "burn-efuse", "SECURE_BOOT_EN")
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
    bigger.write_bytes(build_firmware(chip, app_size=80_000, manifest={"sdk": "plain"}).app)
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


def test_an_unsigned_bootloader_stops_in_the_rom_when_secure_boot_is_on(make_bench, tmp_path):
    chip = "esp32c3"
    slot = make_bench(1, chip)[0]
    fw = build_firmware(chip, app_size=60_000, manifest={"sdk": "plain"})
    for offset, data in fw.regions():
        (tmp_path / f"r{offset:x}.bin").write_bytes(data)
    key = signing_key(tmp_path, "trusted.pem")
    app = tmp_path / f"r{fw.app_offset:x}.bin"
    app.write_bytes(signed(tmp_path, key, app).read_bytes())  # only the app is signed
    r = esptool_cli("--chip", chip, "-p", slot.url, "write-flash",
                    *[a for off, _ in fw.regions() for a in (hex(off), str(tmp_path / f"r{off:x}.bin"))])
    assert r.returncode == 0, r.stdout + r.stderr
    burn(slot.url, chip, "burn-key-digest", "BLOCK_KEY0", str(key), "SECURE_BOOT_DIGEST0")
    burn(slot.url, chip, "burn-efuse", "SECURE_BOOT_EN")
    log = boot_with_app(slot, chip, app)
    assert slot.device.state()["mode"] == "bootloop", log
    assert "secure boot verification failed" in log
    assert "2nd stage bootloader" not in log  # the ROM never ran it
