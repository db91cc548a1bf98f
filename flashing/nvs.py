"""The config partition: build an NVS image safely, and read one back.

Building goes through Espressif's `esp-idf-nvs-partition-gen`, wrapped so that its
pitfalls cannot bite: everything is validated before the generator sees it (it
silently truncates long keys and exits the process on some errors), the input size
is the partition size minus the reserved page, the format version is explicit, and
the Wi-Fi driver keys it special-cases are refused. Reading is our own: PyPI has no
NVS reader, and the station checks every image it built before writing it.
"""

from __future__ import annotations

import io
import secrets
import struct
import zlib
from dataclasses import dataclass

PAGE = 4096
ENTRY = 32
ENTRIES_PER_PAGE = 126
MAX_KEY = 15
MAX_STRING = 4000  # NVS v2
MIN_PARTITION = 3 * PAGE

INT_TYPES = {
    "u8": (0x01, 0, 0xFF), "i8": (0x11, -0x80, 0x7F),
    "u16": (0x02, 0, 0xFFFF), "i16": (0x12, -0x8000, 0x7FFF),
    "u32": (0x04, 0, 0xFFFFFFFF), "i32": (0x14, -0x80000000, 0x7FFFFFFF),
}
TYPE_CODES = {code: name for name, (code, _, _) in INT_TYPES.items()}
STRING_TYPE, BLOB_DATA, BLOB_INDEX, BLOB_V1 = 0x21, 0x42, 0x48, 0x41
RESERVED_PREFIXES = ("sta.", "ap.")


class NvsError(ValueError):
    """A config that cannot become a valid NVS partition, or an image that is not one."""


@dataclass(frozen=True)
class NvsEntry:
    key: str
    type: str  # "string" or an integer type u8..i32
    value: str | int


def validate_key(key: str, what: str = "key") -> None:
    raw = key.encode("utf-8")
    if not raw:
        raise NvsError(f"{what} is empty")
    if len(raw) > MAX_KEY:
        raise NvsError(f"{what} {key!r} is {len(raw)} bytes; NVS keys are at most {MAX_KEY}")
    if not key.isascii() or not key.isprintable():
        raise NvsError(f"{what} {key!r} must be printable ASCII")


def validate_entry(entry: NvsEntry) -> None:
    validate_key(entry.key)
    if entry.key.startswith(RESERVED_PREFIXES):
        raise NvsError(f"key {entry.key!r} is reserved for the Wi-Fi driver's own records")
    if entry.type == "string":
        if not isinstance(entry.value, str):
            raise NvsError(f"key {entry.key!r}: a string value is needed")
        n = len(entry.value.encode("utf-8"))
        if n > MAX_STRING - 1:
            raise NvsError(f"key {entry.key!r}: {n} bytes; NVS strings hold at most {MAX_STRING - 1}")
        if "\0" in entry.value:
            raise NvsError(f"key {entry.key!r}: strings cannot contain NUL")
    elif entry.type in INT_TYPES:
        _, lo, hi = INT_TYPES[entry.type]
        if not isinstance(entry.value, int) or isinstance(entry.value, bool):
            raise NvsError(f"key {entry.key!r}: an integer value is needed for {entry.type}")
        if not lo <= entry.value <= hi:
            raise NvsError(f"key {entry.key!r}: {entry.value} is out of range for {entry.type}")
    else:
        raise NvsError(f"key {entry.key!r}: unknown type {entry.type!r} "
                       f"(string, {', '.join(INT_TYPES)})")


KEYS_SIZE = 64  # XTS-AES-256: encryption key + tweak key


def new_keys() -> bytes:
    """NVS encryption keys from the OS's cryptographic generator (not the generator's random)."""
    return secrets.token_bytes(KEYS_SIZE)


def keys_partition(keys: bytes, size: int = PAGE) -> bytes:
    """The `nvs_keys` partition: both keys, their CRC32, then erased flash."""
    if len(keys) != KEYS_SIZE:
        raise NvsError("NVS encryption needs 64 bytes of keys")
    body = keys + struct.pack("<I", zlib.crc32(keys, 0xFFFFFFFF))
    return body + b"\xff" * (size - len(body))


def read_keys_partition(data: bytes) -> bytes:
    keys = data[:KEYS_SIZE]
    if keys == b"\xff" * KEYS_SIZE:
        raise NvsError("the nvs_keys partition is empty")
    if struct.unpack_from("<I", data, KEYS_SIZE)[0] != zlib.crc32(keys, 0xFFFFFFFF):
        raise NvsError("the nvs_keys partition fails its CRC")
    return keys


def _xts(keys: bytes, address: int, data: bytes, decrypt: bool) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    cipher = Cipher(algorithms.AES(keys), modes.XTS(address.to_bytes(16, "little")))
    op = cipher.decryptor() if decrypt else cipher.encryptor()
    return op.update(data) + op.finalize()


def build_partition(namespace: str, entries: list[NvsEntry], size: int, keys: bytes | None = None) -> bytes:
    """An NVS image of exactly `size` bytes holding `entries` in `namespace`.

    With `keys` (64 bytes) the entries are XTS-AES encrypted as ESP-IDF's NVS
    encryption expects, each 32-byte entry tweaked by its address in the partition.
    """
    from esp_idf_nvs_partition_gen import nvs_partition_gen as gen

    validate_key(namespace, "namespace")
    if size % PAGE or size < MIN_PARTITION:
        raise NvsError(f"partition size 0x{size:x} must be a multiple of 0x1000 and at least 0x3000")
    seen = set()
    for e in entries:
        validate_entry(e)
        if e.key in seen:
            raise NvsError(f"key {e.key!r} appears twice")
        seen.add(e.key)
    # rough fit check before the generator runs (it exits the process on overflow)
    need = 1 + sum(1 if e.type != "string" else 1 + (len(str(e.value).encode()) + 1 + 31) // 32
                   for e in entries)
    usable = (size // PAGE - 1) * ENTRIES_PER_PAGE
    if need > usable:
        raise NvsError(f"config needs {need} NVS entries; a 0x{size:x} partition holds {usable}")
    out = io.BytesIO()
    try:
        if keys is not None and len(keys) != KEYS_SIZE:
            raise NvsError("NVS encryption needs 64 bytes of keys")
        nvs = gen.nvs_open(out, size - PAGE, gen.Page.VERSION2,  # one page stays reserved
                           is_encrypt=keys is not None, key=keys)
        gen.write_entry(nvs, namespace, "namespace", "", "")
        for e in entries:
            gen.write_entry(nvs, e.key, "data", e.type, str(e.value))
        gen.nvs_close(nvs)
    except SystemExit as exc:  # the generator's own error path
        raise NvsError(f"NVS generator refused the config (exit {exc.code})") from None
    except (gen.PageFullError, gen.InputError, gen.InsufficientSizeError, ValueError, KeyError) as exc:
        raise NvsError(f"NVS generator refused the config: {exc}") from None
    image = out.getvalue()
    if len(image) != size:
        raise NvsError(f"NVS generator produced {len(image)} bytes for a 0x{size:x} partition")
    return image


def _crc(data: bytes) -> int:
    return zlib.crc32(data, 0xFFFFFFFF)


def read_partition(image: bytes, keys: bytes | None = None) -> dict[str, dict[str, str | int | bytes]]:
    """Decode an NVS image: {namespace: {key: value}}. Raises NvsError on corruption.

    With `keys`, entries are decrypted first; wrong keys show up as CRC mismatches.
    """
    if len(image) % PAGE:
        raise NvsError("image size is not a multiple of 4096")
    if keys is not None:
        image = _decrypt_entries(image, keys)
    namespaces: dict[int, str] = {}
    raw: list[tuple[int, str, int | str | bytes]] = []
    pages = []
    for p in range(len(image) // PAGE):
        page = image[p * PAGE : (p + 1) * PAGE]
        state = struct.unpack_from("<I", page)[0]
        if state == 0xFFFFFFFF:
            continue
        if state not in (0xFFFFFFFE, 0xFFFFFFFC):
            continue  # freeing or corrupt pages are not read, as the driver would
        seq = struct.unpack_from("<I", page, 4)[0]
        if struct.unpack_from("<I", page, 28)[0] != _crc(page[4:28]):
            raise NvsError(f"page {p}: header CRC mismatch")
        pages.append((seq, p, page))
    for _, p, page in sorted(pages):
        bitmap = page[32:64]
        i = 0
        while i < ENTRIES_PER_PAGE:
            bits = (bitmap[i // 4] >> ((i % 4) * 2)) & 3
            if bits != 2:
                i += 1
                continue
            e = page[64 + i * ENTRY : 64 + (i + 1) * ENTRY]
            ns, etype, span, _chunk = e[0], e[1], e[2], e[3]
            if span == 0 or i + span > ENTRIES_PER_PAGE:
                raise NvsError(f"page {p} entry {i}: bad span {span}")
            if struct.unpack_from("<I", e, 4)[0] != _crc(e[0:4] + e[8:32]):
                raise NvsError(f"page {p} entry {i}: CRC mismatch")
            key = e[8:24].split(b"\0", 1)[0].decode("ascii", "replace")
            data = e[24:32]
            if ns == 0 and etype == 0x01:
                namespaces[data[0]] = key
            elif etype in TYPE_CODES:
                name = TYPE_CODES[etype]
                fmt = {"u8": "<B", "i8": "<b", "u16": "<H", "i16": "<h", "u32": "<I", "i32": "<i"}[name]
                raw.append((ns, key, struct.unpack_from(fmt, data)[0]))
            elif etype in (STRING_TYPE, BLOB_DATA, BLOB_V1):
                length, _, dcrc = struct.unpack("<HHI", data)
                payload = page[64 + (i + 1) * ENTRY : 64 + (i + span) * ENTRY][:length]
                if len(payload) != length or _crc(payload) != dcrc:
                    raise NvsError(f"page {p} entry {i} ({key!r}): data CRC mismatch")
                if etype == STRING_TYPE:
                    raw.append((ns, key, payload.rstrip(b"\0").decode("utf-8", "replace")))
                else:
                    raw.append((ns, key, payload))
            i += span
    result: dict[str, dict[str, str | int | bytes]] = {}
    for ns, key, value in raw:
        result.setdefault(namespaces.get(ns, f"#{ns}"), {})[key] = value
    return result


def _decrypt_entries(image: bytes, keys: bytes) -> bytes:
    out = bytearray(image)
    for p in range(len(image) // PAGE):
        base = p * PAGE
        if struct.unpack_from("<I", image, base)[0] == 0xFFFFFFFF:
            continue
        bitmap = image[base + 32 : base + 64]
        for i in range(ENTRIES_PER_PAGE):
            if (bitmap[i // 4] >> ((i % 4) * 2)) & 3 == 3:
                continue  # never written: still erased flash
            addr = base + 64 + i * ENTRY
            out[addr : addr + ENTRY] = _xts(keys, addr, image[addr : addr + ENTRY], decrypt=True)
    return bytes(out)
