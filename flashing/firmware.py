"""Firmware that a real ESP-IDF build would produce, generated without a toolchain.

Builds a 2nd-stage bootloader image, a partition table with a dedicated config
partition, and an app image with an app description, for ESP32, ESP32-C3 and
ESP32-S3. Contents are deterministic filler that compresses like real code
(about 2:1). Used for the example profile, the demo and the tests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from .images import (
    FLASH_ENC_BUILT,
    FLASH_ENC_RELEASE_BUILT,
    PARTITION_TABLE_OFFSET,
    Partition,
    Segment,
    app_description,
    bootloader_facts,
    build_image,
    build_partition_table,
    chip_facts,
)

# load addresses of a typical IDF build, per chip: bootloader (dram, iram, iram) and app
_LAYOUT = {
    "esp32": dict(bl=[0x3FFF0030, 0x40078000, 0x40080400], bl_entry=0x40080650,
                  app=[0x3F400020, 0x3FFB0000, 0x40080000, 0x400D0020], app_entry=0x40081100),
    "esp32c3": dict(bl=[0x3FCD5820, 0x403CC710, 0x403CE710], bl_entry=0x403CC71A,
                    app=[0x3C000020, 0x3FC88000, 0x40380000, 0x42000020], app_entry=0x4038041C),
    "esp32s3": dict(bl=[0x3FCE3818, 0x403C9700, 0x403CC700], bl_entry=0x403C9954,
                    app=[0x3C000020, 0x3FC88000, 0x40374000, 0x42000020], app_entry=0x403754BC),
}

MANIFEST_MARK = b"2SMART-FW:"
# the keys a firmware built on the 2Smart SDK reads from its config namespace
SDK_KEYS = ["email", "token", "host", "brport", "mqtts_port", "product_id", "device_id", "serial",
            "ssid", "psk", "admin_pass", "rootTopic"]

DEFAULT_PARTITIONS = [
    Partition("nvs", 0x01, 0x02, 0x9000, 0x5000),
    Partition("phy_init", 0x01, 0x01, 0xE000, 0x1000),
    Partition("factory", 0x00, 0x00, 0x10000, 0x180000),
    Partition("config", 0x01, 0x02, 0x190000, 0x6000),
]


@dataclass(frozen=True)
class Firmware:
    bootloader_offset: int
    bootloader: bytes
    partition_table: bytes
    app_offset: int
    app: bytes
    partitions: tuple[Partition, ...]
    partition_table_offset: int = PARTITION_TABLE_OFFSET

    def regions(self) -> list[tuple[int, bytes]]:
        return [(self.bootloader_offset, self.bootloader), (self.partition_table_offset, self.partition_table),
                (self.app_offset, self.app)]


def _filler(rng: random.Random, size: int) -> bytes:
    """Bytes that compress about 2:1, like machine code and constant data."""
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(48)
        out += bytes([rng.randrange(4)]) * 40
    return bytes(out[:size])


def twosmart_manifest(device_class: str = "wifi", title: str = "2Smart Relay",
                      partition: str = "config", namespace: str = "2smart",
                      keys: list[str] | None = None, encrypted: bool = False) -> dict:
    """What a 2Smart-SDK firmware declares about itself: class, config location and keys.

    `encrypted`: built with NVS encryption, reading its keys from the nvs_keys partition
    (written only when true, so the example firmware stays what profile.toml pins).
    """
    config = {"partition": partition, "namespace": namespace, "keys": keys or SDK_KEYS}
    if encrypted:
        config["encrypted"] = True
    return {"sdk": "2smart", "class": device_class, "title": title, "config": config}


def read_manifest(app_head: bytes) -> dict | None:
    """Find a 2Smart firmware manifest in the first bytes of an app image."""
    pos = app_head.find(MANIFEST_MARK)
    if pos < 0:
        return None
    end = app_head.find(b"\0", pos)
    try:
        return json.loads(app_head[pos + len(MANIFEST_MARK) : end if end > 0 else None])
    except ValueError:
        return None


def build_firmware(chip: str = "esp32", project: str = "relay", version: str = "1.0.0",
                   app_size: int = 1024 * 1024, flash_size: str = "4MB",
                   partitions: list[Partition] | None = None, seed: int = 1,
                   manifest: dict | None = None, flash_encryption: str | None = None,
                   partition_table_offset: int = PARTITION_TABLE_OFFSET) -> Firmware:
    """`flash_encryption` ("development" or "release"): the bootloader is built with flash encryption on
    (CONFIG_SECURE_FLASH_ENC_ENABLED): it carries flash_encrypt.c's messages, and a board whose crypt count
    is 0 encrypts itself on its first boot (flashing.images.bootloader_flash_encryption).
    `partition_table_offset`: CONFIG_PARTITION_TABLE_OFFSET; moved, the bootloader says so (images.bootloader_facts)
    and `partitions` must start after the table's sector."""
    lay, facts = _LAYOUT[chip], chip_facts(chip)
    rng = random.Random(f"{chip}/{project}/{version}/{seed}")
    bl_sizes = [6372, 15920, 3880]
    bl_data = [_filler(rng, n) for n in bl_sizes]
    if partition_table_offset != PARTITION_TABLE_OFFSET:  # the default's bytes stay what profiles pin
        fact = bootloader_facts(partition_table_offset)
        bl_data[0] = fact + bl_data[0][len(fact):]
    if flash_encryption:  # the log strings in the DRAM segment, in place of filler (the size stays)
        built = b"I (%lu) %s: " + FLASH_ENC_BUILT + b"\n\0"
        if flash_encryption == "release":
            built += b"I (%lu) %s: " + FLASH_ENC_RELEASE_BUILT + b"\n\0"
        bl_data[0] = bl_data[0][:256] + built + bl_data[0][256 + len(built):]
    bootloader = build_image(
        [Segment(a, d) for a, d in zip(lay["bl"], bl_data)],
        chip_id=facts.image_chip_id, entry=lay["bl_entry"], flash_size=flash_size)
    parts = partitions or DEFAULT_PARTITIONS
    app_part = next(p for p in parts if p.type == 0)
    overhead = 24 + 8 * 4 + 16 + 32 + 256
    body = max(0, app_size - overhead)
    sizes = [body * 15 // 100, body * 2 // 100, body * 10 // 100]
    sizes.append(body - sum(sizes))
    marker = MANIFEST_MARK + json.dumps(manifest or twosmart_manifest()).encode() + b"\0"
    datas = [app_description(project, version) + marker + _filler(rng, sizes[0] - 256 - len(marker))]
    datas += [_filler(rng, n) for n in sizes[1:]]
    app = build_image([Segment(a, d) for a, d in zip(lay["app"], datas)],
                      chip_id=facts.image_chip_id, entry=lay["app_entry"], flash_size=flash_size)
    return Firmware(facts.bootloader_offset, bootloader, build_partition_table(parts),
                    app_part.offset, app, tuple(parts), partition_table_offset)
