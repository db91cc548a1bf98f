#!/usr/bin/env python3
"""Generate the example relay profile's firmware (no ESP toolchain needed).

Writes firmware/bootloader.bin, firmware/partition-table.bin and firmware/relay.bin:
an ESP32 2nd-stage bootloader, a partition table with a dedicated `config` NVS
partition, and a ~1 MB app with an app description (project "relay", version 1.4.2).
The output is deterministic; profile.toml pins each file's SHA-256, printed here.

    python profiles/relay/make_firmware.py
"""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashing.firmware import build_firmware  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    fw = build_firmware("esp32", project="relay", version="1.4.2", app_size=1_040_000)
    out = HERE / "firmware"
    out.mkdir(exist_ok=True)
    for name, data in (("bootloader.bin", fw.bootloader), ("partition-table.bin", fw.partition_table),
                       ("relay.bin", fw.app)):
        (out / name).write_bytes(data)
        print(f"{name:22} {len(data):8} bytes  sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
