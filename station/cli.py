"""The station's command line: `station virtual`, `station flash`, `station export`, ...

The CLI maps options onto the station's Python API and holds no provisioning
logic. stdout carries data (JSON lines with --json); diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from enum import IntEnum
from pathlib import Path


class Exit(IntEnum):
    """Documented exit codes."""

    OK = 0  # every unit passed
    UNIT_FAILED = 1  # at least one unit failed
    USAGE = 2  # usage, configuration or profile error: nothing was flashed


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- station virtual ----------------------------------------------------------------------

def cmd_virtual(args: argparse.Namespace) -> int:
    from flashing.virtual.bench import VirtualBench
    from flashing.virtual.chips import CHIPS

    if args.chip not in CHIPS:
        _err(f"station virtual: unknown chip {args.chip!r}; choose one of {', '.join(CHIPS)}")
        return Exit.USAGE
    try:
        bench = VirtualBench(args.count, args.chip, args.flash_size, state_dir=args.state_dir,
                             run_dir=args.run_dir, realtime=args.realtime)
    except ValueError as exc:
        _err(f"station virtual: {exc}")
        return Exit.USAGE
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for slot in bench.slots:
            info = slot.info()
            if args.json:
                print(json.dumps(info), flush=True)
            else:
                print(f"{info['index']:>3}  {info['chip']:<9} {info['mac']}  {info['pty']:<12} "
                      f"{info['url']}", flush=True)
        control = bench.control.path
        if args.json:
            print(json.dumps({"control": str(control)}), flush=True)
        else:
            _err(f"control: {control}   (station virtual-ctl --control {control} list)")
            _err("serving virtual boards; Ctrl-C stops them")
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        bench.close()
    return Exit.OK


def cmd_virtual_ctl(args: argparse.Namespace) -> int:
    from flashing.virtual.bench import ControlClient

    extra: dict = {}
    if args.op == "reset":
        extra["mode"] = args.value or "download"
    elif args.op == "fault":
        if not args.value:
            _err("station virtual-ctl: fault needs a NAME and optionally a VALUE")
            return Exit.USAGE
        extra["name"] = args.value
        extra["value"] = json.loads(args.fault_value) if args.fault_value else True
    elif args.op == "swap" and args.value:
        extra["mac"] = args.value
    try:
        reply = ControlClient(args.control).request(args.op, args.device, **extra)
    except (OSError, RuntimeError) as exc:
        _err(f"station virtual-ctl: {exc}")
        return Exit.USAGE
    if args.op == "console":
        sys.stdout.write(reply["console"])
    else:
        print(json.dumps(reply))
    return Exit.OK


# -- station demo -------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    """Start virtual boards, flash generated firmware with esptool, boot them."""
    import time

    from esptool import cmds

    from flashing.firmware import build_firmware
    from flashing.virtual.bench import VirtualBench

    fw = build_firmware(args.chip, project="relay", version="1.0.0")
    with VirtualBench(args.count, args.chip) as bench:
        for slot in bench.slots:
            _err(f"board {slot.device.index}: {slot.device.mac_text} on {slot.url}")
            esp = cmds.run_stub(cmds.detect_chip(slot.url, connect_mode="no-reset"))
            esp.change_baud(921600)
            cmds.attach_flash(esp)
            cmds.write_flash(esp, fw.regions())
            esp._port.close()
            state = slot.device.reset("app")
            time.sleep(0.05)
            print(slot.device.console_text(), flush=True)
            _err(f"board {slot.device.index}: {state['mode']} "
                 f"({state['app']['project_name']} {state['app']['version']})")
    return Exit.OK


# -- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="station", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("virtual", help="start virtual ESP boards and serve them until interrupted")
    v.add_argument("--chip", default="esp32", help="esp32, esp32c3 or esp32s3 (default esp32)")
    v.add_argument("--count", type=int, default=1)
    v.add_argument("--flash-size", default="4MB", help="2MB, 4MB, 8MB or 16MB")
    v.add_argument("--state-dir", type=Path, help="keep each board's flash and MAC here")
    v.add_argument("--run-dir", type=Path, help="where the boards' sockets go")
    v.add_argument("--realtime", action="store_true",
                   help="timing model: wire at baud/10 bytes/s, flash erase/program latency")
    v.add_argument("--json", action="store_true", help="one JSON object per board per line")
    v.set_defaults(func=cmd_virtual)

    d = sub.add_parser("demo", help="flash virtual boards with the example firmware")
    d.add_argument("--count", type=int, default=2)
    d.add_argument("--chip", default="esp32")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("virtual-ctl", help="act on a running `station virtual` board")
    c.add_argument("--control", required=True, type=Path, help="the control socket it printed")
    c.add_argument("--device", type=int, default=None)
    c.add_argument("op", choices=["list", "state", "reset", "power_cycle", "unplug", "replug",
                                  "swap", "fault", "clear_faults", "console"])
    c.add_argument("value", nargs="?", help="reset: download|app; fault: NAME; swap: new MAC")
    c.add_argument("fault_value", nargs="?", help="fault: JSON value (default true)")
    c.set_defaults(func=cmd_virtual_ctl)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
