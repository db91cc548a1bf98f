"""What a bootloader built with flash encryption does on a board whose crypt count is still 0.

ESP-IDF's first boot (docs/en/security/flash-encryption.rst, "Flash Encryption Process";
bootloader_support/src/flash_encryption/flash_encrypt.c): the key is generated with the
hardware RNG and burned into a free key block, read- and write-protected, together with the
mode's security eFuses (<chip>/flash_encryption_secure_features.c, default Kconfig), in one
batch; the bootloader, the partition table, each app image and every data partition that must
be encrypted are encrypted in place, sector by sector; the crypt count is burned (development:
one more bit; release: every bit); then the bootloader resets. The log lines are ESP-IDF's
(docs/en/security/esp32c3_log.inc, "first_boot_enc"). Kept apart from flashing/secure.py on
purpose: the board's behaviour is the oracle the station's own plan is tested against.
"""

from __future__ import annotations

import os
from typing import Callable

from ..images import ImageError, Partition, check_image
from .crypt import FlashCipher
from .efuse import EfuseArray
from .nor import NorFlash

SECTOR = 0x1000
XTS_AES_128_KEY = 4  # KEY_PURPOSE value (esp_efuse_purpose_t)

# esp_flash_encryption_enable_secure_features, every "Potentially insecure option" at its default:
# (log line, fields) in the order the bootloader burns them; development mode selects
# CONFIG_SECURE_FLASH_UART_BOOTLOADER_ALLOW_ENC (and with it SKIP_WRITE_PROTECTION_CACHE)
_FEATURES = {
    "esp32": (("Disable UART bootloader decryption...", ("DISABLE_DL_DECRYPT",)),
              ("Disable UART bootloader MMU cache...", ("DISABLE_DL_CACHE",)),
              ("Disable JTAG...", ("JTAG_DISABLE",)),
              ("Disable ROM BASIC interpreter fallback...", ("CONSOLE_DEBUG_DISABLE",))),
    "esp32c3": (("Disable UART bootloader cache...", ("DIS_DOWNLOAD_ICACHE",)),
                ("Disable JTAG...", ("DIS_PAD_JTAG", "DIS_USB_JTAG")),
                (None, ("DIS_DIRECT_BOOT",))),
    "esp32s3": (("Disable UART bootloader cache...", ("DIS_DOWNLOAD_DCACHE", "DIS_DOWNLOAD_ICACHE")),
                ("Disable JTAG...", ("DIS_PAD_JTAG", "DIS_USB_JTAG")),  # IDF's HARD_DIS_JTAG
                (None, ("DIS_DIRECT_BOOT",))),
}
_MANUAL_ENCRYPT = {"esp32": "DISABLE_DL_ENCRYPT", "esp32c3": "DIS_DOWNLOAD_MANUAL_ENCRYPT",
                   "esp32s3": "DIS_DOWNLOAD_MANUAL_ENCRYPT"}
_CACHE = {"esp32": "DIS_CACHE", "esp32c3": "DIS_ICACHE", "esp32s3": "DIS_ICACHE"}


def encrypt_on_first_boot(chip: str, image_chip_id: int, efuse: EfuseArray, flash: NorFlash, mode: str,
                          parts: list[Partition], bootloader: tuple[int, int], log,
                          table_offset: int = 0x8000) -> str | None:
    """Enable flash encryption as the bootloader does; its log lines go to `log`. The failure, or None.

    `table_offset`: where the bootloader read its partition table (CONFIG_PARTITION_TABLE_OFFSET)."""
    cnt_field = efuse.crypt_cnt_field
    cnt = efuse.layout.fields[cnt_field]
    if cnt.wr_dis_bit is not None and efuse.field("WR_DIS") >> cnt.wr_dis_bit & 1:
        log.e("flash_encrypt", f"Flash Encryption cannot be enabled (CRYPT_CNT ({bin(efuse.crypt_cnt).count('1')}) "
                               "is write protected)")
        return "flash encryption cannot be enabled: the crypt count is write-protected"
    if efuse.crypt_cnt == 0:  # the very first pass: a key and the security eFuses, one batch
        log.i("efuse", "Batch mode of writing fields is enabled")
        fields, keys = {}, {}
        problem = _key(chip, efuse, fields, keys, log)
        if problem:
            log.e("flash_encrypt", f"Initialization of Flash encryption key failed ({problem})")
            return problem
        _secure_features(chip, efuse, mode, fields, log)
        efuse.burn_from_chip(fields, keys)
        log.i("efuse", "Batch mode. Prepared fields are committed")
    key = efuse.flash_key()
    if key is None:
        log.e("flash_encrypt", "Initialization of Flash encryption key failed (-1)")
        return "no flash-encryption key after the key burn"
    cipher = FlashCipher(*key)

    def encrypt(offset: int, length: int) -> None:
        for sector in range(offset, offset + length, SECTOR):
            data = flash.read(sector, SECTOR)
            flash.erase(sector, SECTOR)
            flash.program(sector, cipher.encrypt(sector, data))

    encrypt(*bootloader)
    log.i("flash_encrypt", "bootloader encrypted successfully")
    encrypt(table_offset, SECTOR)
    log.i("flash_encrypt", "partition table encrypted and loaded successfully")
    for index, part in enumerate(parts):
        size = _to_encrypt(part, flash.read, image_chip_id)
        if size:
            log.i("flash_encrypt", f"Encrypting partition {index} at offset 0x{part.offset:x} (length 0x{size:x})...")
            encrypt(part.offset, size)
            log.i("flash_encrypt", "Done encrypting")
    now = efuse.crypt_cnt
    if mode == "release":
        log.i("flash_encrypt", "Setting CRYPT_CNT for permanent encryption")
        new = (1 << cnt.bits) - 1
    else:
        new = now | (~now & (now + 1))  # the least significant 0 bit
    efuse.burn_from_chip({cnt_field: new})
    log.i("flash_encrypt", "Flash encryption completed")
    return None


def _key(chip: str, efuse: EfuseArray, fields: dict, keys: dict, log) -> str | None:
    """check_and_generate_encryption_keys: a key block already burned is used, else one is generated."""
    lay = efuse.layout
    rd_dis, wr_dis = efuse.field("RD_DIS"), efuse.field("WR_DIS")
    if chip == "esp32":
        block, purpose_field = lay.blocks[1], None
        burned = any(efuse.burned[1][:lay.block_words(block)])
        slot = None
    else:
        purposes = efuse.key_purposes()
        slot = next((i for i, p in enumerate(purposes) if p == XTS_AES_128_KEY), None)
        burned = slot is not None
        if slot is None:
            slot = next((i for i, p in enumerate(purposes)
                         if p == 0 and not any(efuse.burned[4 + i][:lay.block_words(lay.blocks[4 + i])])), None)
            if slot is None:
                log.e("flash_encrypt", "Not enough free efuse key blocks (need 1) to continue")
                return "no free eFuse key block"
        block, purpose_field = lay.blocks[4 + slot], f"KEY_PURPOSE_{slot}"
    if burned:
        protected = all(rd_dis >> b & 1 for b in block.rd_dis_bits) and wr_dis >> block.wr_dis_bit & 1 and \
            (purpose_field is None or wr_dis >> lay.fields[purpose_field].wr_dis_bit & 1)
        if not protected:
            log.e("flash_encrypt", "Invalid key state, check read&write protection for key and keypurpose(if exists)")
            return "a key block is burned but not read- and write-protected"
        log.i("flash_encrypt", "Using pre-loaded flash encryption key in efuse")
        return None
    log.i("flash_encrypt", "Generating new flash encryption key...")
    keys[block.id] = os.urandom(32)  # bootloader_fill_random: the hardware RNG
    log.i("efuse", f"Writing EFUSE_BLK_KEY{slot or 0} with purpose {XTS_AES_128_KEY if slot is not None else 0}")
    wr = 1 << block.wr_dis_bit
    if purpose_field is not None:
        fields[purpose_field] = XTS_AES_128_KEY
        wr |= 1 << lay.fields[purpose_field].wr_dis_bit
    fields["RD_DIS"] = sum(1 << b for b in block.rd_dis_bits)
    fields["WR_DIS"] = wr
    return None


def _secure_features(chip: str, efuse: EfuseArray, mode: str, fields: dict, log) -> None:
    if chip == "esp32":
        log.i("flash_encrypt", "Setting CRYPT_CONFIG efuse to 0xF")
        fields["FLASH_CRYPT_CONFIG"] = 0xF
    if mode == "release":
        log.i("flash_encrypt", "Disable UART bootloader encryption...")
        fields[_MANUAL_ENCRYPT[chip]] = 1
    else:
        log.w("flash_encrypt", "Not disabling UART bootloader encryption")
    for line, names in _FEATURES[chip]:
        if line:
            log.i("flash_encrypt", line)
        for name in names:
            fields[name] = 1
    if mode == "release":  # WR_DIS_DIS_(I)CACHE, skipped in development with the UART encryption left on
        fields["WR_DIS"] = fields.get("WR_DIS", 0) | 1 << efuse.layout.fields[_CACHE[chip]].wr_dis_bit


def _to_encrypt(part: Partition, read: Callable[[int, int], bytes], image_chip_id: int) -> int:
    """encrypt_partition's choice: how much of the partition is encrypted (0: none)."""
    if part.type == 0:  # an app: its image only, if it holds a valid one (SECURE_FLASH_ENCRYPT_ONLY_IMAGE_LEN...)
        try:
            length = check_image(read, part.offset, part.size, image_chip_id).length
        except ImageError:
            return 0
        return min(part.size, length)  # encrypted sector by sector, the last one whole
    if part.type == 1 and part.subtype in (0x00, 0x04):  # otadata, nvs_keys: always
        return part.size
    return part.size if part.flags & 1 else 0  # the partition table's "encrypted" flag
