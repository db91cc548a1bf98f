"""Attacks on the virtual chip's eFuses with the real espefuse, and what the chip then does (issue #18's threat model).

Oracle: espefuse's own rules for a chip (a Secure Boot v2 digest "must be readable") and ESP-IDF's
bootloader text for a failed signature check.
"""

from __future__ import annotations

from flashing.firmware import build_firmware
from tests.conftest import esptool_cli, wait_until
from tests.flashing.test_efuse import burn, espefuse_cli
from tests.flashing.test_secure_boot import signed, signing_key


def test_a_read_protected_secure_boot_digest_boots_nothing(make_bench, tmp_path):
    """espefuse refuses to read-protect a digest block; the RD_DIS field burned directly does it, and from then on
    the ROM reads zeros where the digest was: no image verifies (why ESP-IDF write-protects RD_DIS)."""
    chip = "esp32c3"
    slot = make_bench(1, chip)[0]
    fw = build_firmware(chip, app_size=60_000, manifest={"sdk": "plain"})
    key = signing_key(tmp_path, "trusted.pem")
    args = []
    for offset, data in fw.regions():
        path = tmp_path / f"r{offset:x}.bin"
        path.write_bytes(data)
        args += [hex(offset), str(signed(tmp_path, key, path) if data[:1] == b"\xe9" else path)]
    r = esptool_cli("--chip", chip, "-p", slot.url, "write-flash", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    burn(slot.url, chip, "burn-key-digest", "BLOCK_KEY0", str(key), "SECURE_BOOT_DIGEST0")
    burn(slot.url, chip, "burn-efuse", "SECURE_BOOT_EN")

    def boot() -> str:
        slot.device.reset("app")
        wait_until(lambda: slot.device.state()["mode"] in ("app", "bootloop"), "the board to boot")
        return slot.device.console_text()

    log = boot()
    assert slot.device.state()["mode"] == "app" and "secure boot verification succeeded" in log, log
    r = espefuse_cli(slot.url, chip, "--do-not-confirm", "read-protect-efuse", "BLOCK_KEY0")
    assert r.returncode != 0 and "BLOCK_KEY0 must be readable" in r.stdout + r.stderr, r.stdout + r.stderr
    burn(slot.url, chip, "burn-efuse", "RD_DIS", "1")  # BLOCK_KEY0's read-disable bit, as a plain field
    log = boot()
    assert slot.device.state()["mode"] == "bootloop" and "secure boot verification failed" in log, log
