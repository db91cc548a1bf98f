"""SLIP framing as Espressif's ROM and stub speak it."""

from __future__ import annotations

END = 0xC0


def encode(payload: bytes) -> bytes:
    return b"\xc0" + payload.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


def decode_body(body: bytes) -> bytes | None:
    """Unescape a frame body; None if it holds an invalid escape (a garbled frame)."""
    if b"\xdb" not in body:
        return body
    out = bytearray()
    i = 0
    n = len(body)
    while i < n:
        j = body.find(b"\xdb", i)
        if j < 0:
            out += body[i:]
            break
        out += body[i:j]
        if j + 1 >= n:
            return None
        nxt = body[j + 1]
        if nxt == 0xDC:
            out.append(0xC0)
        elif nxt == 0xDD:
            out.append(0xDB)
        else:
            return None
        i = j + 2
    return bytes(out)


class SlipDecoder:
    """Collects bytes and yields complete frames; bytes outside frames are dropped."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._in_frame = False

    def reset(self) -> None:
        self._buf.clear()
        self._in_frame = False

    def feed(self, data: bytes) -> list[bytes]:
        frames: list[bytes] = []
        pos = 0
        n = len(data)
        while pos < n:
            end = data.find(b"\xc0", pos)
            if not self._in_frame:
                if end < 0:
                    return frames  # noise between frames: the ROM ignores it
                self._in_frame = True
                self._buf.clear()
                pos = end + 1
                continue
            if end < 0:
                self._buf += data[pos:]
                return frames
            self._buf += data[pos:end]
            pos = end + 1
            if self._buf:
                body = decode_body(bytes(self._buf))
                if body is not None:
                    frames.append(body)
                self._buf.clear()
                self._in_frame = False
            # an empty frame (C0 C0) keeps us in frame: the second C0 opens the next
        return frames
