"""Fixture ports: which serial ports exist now, and which carry the fixture's bridges."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from serial.tools import list_ports


def present(port: str) -> bool:
    """Is a board's port there right now (a USB bridge enumerated, a virtual board plugged)?"""
    if "://" in port:
        parts = urlparse(port)
        if parts.scheme == "vesp":
            return os.path.exists(parts.path)  # the board's socket exists while it is plugged in
        return True  # socket:// and rfc2217:// cannot tell: assume present
    return os.path.exists(port)


def fixture_ports(vid_pids: tuple[str, ...]) -> list[str]:
    """Serial ports whose USB VID:PID is one of the fixture's bridges, sorted by path."""
    wanted = {tuple(int(x, 16) for x in vp.split(":")) for vp in vid_pids}
    return sorted(p.device for p in list_ports.comports() if (p.vid, p.pid) in wanted)
