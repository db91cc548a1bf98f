# PYTHON_ARGCOMPLETE_OK  (argcomplete's global completion looks for this line)
"""The station's command line: `station virtual`, `station flash`, `station export`, ...

The CLI maps options onto the station's Python API and holds no provisioning
logic. stdout carries data (JSON lines with --json); diagnostics go to stderr
(-q: errors only; -v: every step and esptool's lines too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import date, datetime, timezone
from enum import IntEnum
from pathlib import Path
from typing import Callable

from station.secrets import NO_SECRETS
from station.text import one_line, safe_text


class Exit(IntEnum):
    """Documented exit codes."""

    OK = 0  # every unit passed
    UNIT_FAILED = 1  # at least one unit failed
    USAGE = 2  # usage, configuration or profile error: nothing was flashed
    STATION_ERROR = 3  # the station failed (database, disk, a bug): see the units' reasons
    SIGHUP = 129  # hung up: every running unit was aborted and recorded
    SIGINT = 130  # Ctrl-C: every running unit was aborted and recorded
    SIGTERM = 143  # terminated: every running unit was aborted and recorded


SIGNAL_EXIT = {"SIGHUP": Exit.SIGHUP, "SIGINT": Exit.SIGINT, "SIGTERM": Exit.SIGTERM}


class _StopOnSignal:
    """SIGINT, SIGTERM and SIGHUP abort every running unit through the cancel path.

    Each unit is then recorded as aborted at the step it was in, and the summary is
    printed; a second signal while recording only says so: nothing is lost.
    """

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for name in SIGNAL_EXIT:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.name is None:
            self.name = signal.Signals(signum).name
            _err(f"station flash: {self.name}: aborting every unit; recording, please wait")
            self.cancel.set()
        else:
            _err("station flash: recording, please wait")


class _Words:
    """The filter every text this process writes passes: the open station's redaction, then no control characters."""

    redact: Callable[[str], str] = NO_SECRETS  # the station's Redactor once one is open (URL queries go even before)
    level = 0  # -q: -1 (data on stdout, errors on stderr), -v: 1 (every step, esptool's and the board's lines)

    @classmethod
    def line(cls, text: str) -> str:
        return one_line(cls.redact(text))


def _err(msg: str) -> None:
    print(_Words.line(msg), file=sys.stderr, flush=True)


def _info(msg: str) -> None:
    """Progress and notes for people on stderr; -q leaves them out."""
    if _Words.level >= 0:
        _err(msg)


def _detail(msg: str) -> None:
    """What only -v shows."""
    if _Words.level > 0:
        _err(msg)


class _Usage(Exception):
    """A usage error found after parsing: main prints the command's own usage, then this, and exits 2."""


def _usage(parser: argparse.ArgumentParser, msg: str) -> int:
    """As argparse says a usage error, without raising SystemExit (main is also called in-process)."""
    parser.print_usage(sys.stderr)
    _err(f"{parser.prog}: error: {msg}")
    return Exit.USAGE


def _out(msg: str) -> None:
    print(_Words.line(msg), flush=True)


# -- station virtual ----------------------------------------------------------------------

def cmd_virtual(args: argparse.Namespace) -> int:
    from flashing.virtual.bench import VirtualBench
    from flashing.virtual.chips import CHIPS

    if args.chip not in CHIPS:
        _err(f"station virtual: unknown chip {args.chip!r}; choose one of {', '.join(CHIPS)}")
        return Exit.USAGE
    # absolute: a printed vesp://var/... would parse "var" as a host, and the URL is pasted elsewhere
    state_dir, run_dir = (d.resolve() if d else None for d in (args.state_dir, args.run_dir))
    try:
        bench = VirtualBench(args.count, args.chip, args.flash_size, state_dir=state_dir,
                             run_dir=run_dir, realtime=args.realtime, usb_serial_jtag=args.usb_serial_jtag)
    except ValueError as exc:
        _err(f"station virtual: {exc}")
        return Exit.USAGE
    for slot in bench.slots:  # as a real bootloader has it compiled in (flashing/virtual/boot.py)
        slot.device.compiled_table_offset = args.partition_table_offset
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for slot in bench.slots:
            info = slot.info()
            if args.json:
                print(json.dumps(info), flush=True)
            else:
                print(f"{info['index']:>3}  {info['chip']:<9} {info['mac']}  {info['pty']:<12} "
                      f"{info['url']}  pairing {info['pairing']}", flush=True)
        control = bench.control.path
        if args.json:
            print(json.dumps({"control": str(control)}), flush=True)
        else:
            _info(f"control: {control}   (station virtual-ctl --control {control} list)")
            _info("serving virtual boards; Ctrl-C stops them")
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
        sys.stdout.write(safe_text(reply["console"]))  # a board's text: never the terminal's control codes
    else:
        print(json.dumps(reply))
    return Exit.OK


# -- station flash ---------------------------------------------------------------------------

class _HumanProgress:
    """Live per-port progress on stderr for people; the summary goes to stdout."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_pct: dict[str, int] = {}

    def __call__(self, event) -> None:
        from station.events import LogLine, Progress, StepFinished, StepStarted, UnitFinished

        with self.lock:
            if isinstance(event, StepStarted):
                _err(f"{port_label(event.port)}: {event.step} ...")
            elif isinstance(event, StepFinished):
                _detail(f"{port_label(event.port)}: {event.step} {'done' if event.ok else 'FAILED'} "
                        f"in {event.seconds:.2f}s")
            elif isinstance(event, LogLine):
                _detail(f"{port_label(event.port)}: [{event.source}] {event.text}")
            elif isinstance(event, Progress) and event.total:
                pct = event.done * 100 // event.total
                if pct // 10 != self.last_pct.get(event.port, -1) // 10:
                    self.last_pct[event.port] = pct
                    bar = "#" * (pct // 5)
                    _err(f"{port_label(event.port)}: flash [{bar:<20}] {pct:3d}% "
                         f"{event.done / 1e6:.2f}/{event.total / 1e6:.2f} MB")
            elif isinstance(event, UnitFinished):
                r = event.result
                if r.passed:
                    _err(f"{port_label(event.port)}: PASS {r.serial} {r.mac} firmware {r.firmware_version or '?'}")
                else:
                    _err(f"{port_label(event.port)}: {r.outcome.upper()} at {r.failed_step}: {r.error} -> {r.remedy}")


class _JsonLines:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, event) -> None:
        from station.events import LogLine, map_text, to_json_dict

        if isinstance(event, LogLine):
            return  # console and esptool chatter stay out of the data stream
        # a consumer printing a value (jq -r) must not get a board's escape sequences either
        line = json.dumps(to_json_dict(map_text(event, lambda t: safe_text(_Words.redact(t)))))
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def port_label(port: str) -> str:
    return port.rsplit("/", 1)[-1] if "://" in port else port


WORDS = {"passed": "PASS", "failed": "FAIL", "aborted": "ABORT", "error": "ERROR", "interrupted": "INTR"}


def _summary(results) -> None:
    _out(f"{'port':<16} {'result':<7} {'serial':<18} {'mac':<18} {'time':>6}  failed step: message")
    for r in results:
        msg = "" if r.passed else f"{r.failed_step}: {r.error} -> {r.remedy}"
        if r.note:
            msg += f" [{r.note}]"
        total = sum(r.durations.values())
        # one row per unit: a board's text cannot add a line of its own (a fake "4 of 4 units passed")
        _out(f"{port_label(r.port)[:16]:<16} {WORDS.get(r.outcome, r.outcome):<7} {one_line(r.serial or '-'):<18} "
             f"{one_line(r.mac or '-'):<18} {total:5.1f}s  {msg}")
    passed = sum(r.passed for r in results)
    _out(f"{passed} of {len(results)} units passed")


MAX_BOARDS = 64  # the most slots station.toml allows: a virtual bench is a fixture too
PORT_ENV = ("ESPPORT", "ESPTOOL_PORT")  # idf.py's, then esptool's
BAUD_ENV = ("ESPBAUD", "ESPTOOL_BAUD")
_PORT_SEPARATORS = re.compile(r"[\s,;]+")  # not ":": socket://host:4000 and COM3 keep theirs


@dataclass(frozen=True)
class FlashRun:
    """What one `station flash` does, whoever asks for it (the command line, `station demo --batch`)."""

    ports: tuple[str, ...] = ()
    virtual: int = 0  # this many virtual boards besides the ports
    realtime: bool = False  # the virtual boards run the timing model
    profile: str | None = None
    db: Path | None = None
    serials: tuple[str, ...] = ()
    rework: bool = False
    operator: str = ""
    lot: str = ""
    smoke: str | None = None
    baud: int | None = None
    json: bool = False


def _given_serials(run: FlashRun, ctx, count: int) -> list[str] | str:
    """The --serial values, trimmed and checked; a message when they cannot be used."""
    from station.pipeline import clean_serial, serial_max_length

    given = list(run.serials)
    if not given:
        return []
    if len(given) != count:
        return f"{len(given)} serials for {count} ports; give one per port"
    limit = serial_max_length(ctx.profile)
    serials = []
    for text in given:
        try:
            serials.append(clean_serial(text, limit))
        except ValueError as exc:
            return f"--serial {text!r}: {exc}"
    dupes = sorted({s for s in serials if serials.count(s) > 1})
    if dupes:
        return f"serial {', '.join(dupes)} given for more than one port; each board needs its own"
    return serials


def _env_ports() -> list[str]:
    """$ESPPORT (else $ESPTOOL_PORT): one port, or several separated by commas, semicolons or spaces."""
    for var in PORT_ENV:
        ports = [p for p in _PORT_SEPARATORS.split(os.environ.get(var, "")) if p]
        if ports:
            _detail(f"ports from ${var}: {' '.join(ports)}")
            return ports
    return []


def _env_baud() -> int | None:
    """$ESPBAUD (else $ESPTOOL_BAUD), checked as -b is."""
    for var in BAUD_ENV:
        text = os.environ.get(var, "").strip()
        if text:
            try:
                return _baud(text)
            except argparse.ArgumentTypeError as exc:
                raise _Usage(f"${var}: {exc}") from None
    return None


def _fixture_ports(station, every_slot: bool = False) -> list[str]:
    """The fixture's ports in slot order: bound to USB locations ([ports.slots]), else the USB VID:PID filters'
    in natural order (at most `slots`). every_slot: also the bound slots with nothing there now (the screen
    watches them, so that slot N stays the Nth card)."""
    from flashing.ports import fixture_slots, serial_ports

    slots = fixture_slots(serial_ports(), station.usb_ports, station.ports.slots, station.slots)
    for s in slots:
        if not s.here:
            _info(f"slot {s.number} ({s.location}): no port there now" +
                  (f"; watched as {s.name} (a name the rules of `station ports udev-rules` make)" if every_slot
                   else ""))
    return [s.name for s in slots if s.here or every_slot]


def _no_fixture_ports(station) -> str:
    if station.ports.slots:
        return (f"no port in any of the {len(station.ports.slots)} slots station.toml [ports.slots] binds "
                "(`station ports` lists what is there); plug in the fixture, or give -p PORT")
    filters = ", ".join(station.usb_ports) or "none in station.toml [ports] usb"
    return f"no fixture ports found (USB VID:PID {filters}); plug in the fixture, or give -p PORT"


def _where_ports(station) -> str:
    if station.ports.slots:
        return "slots bound in station.toml [ports.slots]"
    return f"USB VID:PID {', '.join(station.usb_ports)}"


def _unopenable(ports: list[str]) -> str | None:
    """The first port that cannot be opened, in words; opened and closed at once, as esptool opens it next."""
    import serial

    import flashing  # noqa: F401  (registers vesp://)

    for port in ports:
        try:
            serial.serial_for_url(port).close()
        except (serial.SerialException, OSError, ValueError) as exc:
            return f"cannot open port {port}: {exc}"
    return None


def cmd_flash(args: argparse.Namespace) -> int:
    from station.config import ConfigError, StationConfig

    try:
        station = StationConfig.load(args.config)
    except ConfigError as exc:
        return _not_ready(exc)
    ports = list(args.port or [])
    if not ports and not args.virtual:
        ports = _env_ports()
        if not ports:
            ports = _fixture_ports(station)
            if not ports:
                raise _Usage(f"{_no_fixture_ports(station)}, $ESPPORT or --virtual N")
            _info(f"station flash: fixture ports ({_where_ports(station)}): {' '.join(ports)}")
    if args.realtime and not args.virtual:
        raise _Usage("--realtime is for virtual boards: give --virtual N")
    baud = args.baud or _env_baud()
    # before any unit starts: a port that cannot be opened is a mistyped argument, not a failed board
    problem = _unopenable(ports)
    if problem:
        raise _Usage(f"{problem}; nothing was flashed")
    run = FlashRun(tuple(ports), args.virtual or 0, args.realtime, args.profile, args.db, tuple(args.serial or ()),
                   args.rework, args.operator, args.lot, args.smoke, baud, args.json)
    return flash(run, station)


def _not_ready(exc) -> int:
    _err("station flash: the profile or configuration is not ready; nothing was flashed")
    for p in getattr(exc, "problems", None) or [exc]:
        _err(f"  {p}")
    return Exit.USAGE


def flash(run: FlashRun, station) -> int:
    """Provision every port of `run` (and its virtual boards) at once; the exit code says how it went."""
    from station.config import ConfigError
    from station.pipeline import UnitJob
    from station.record import RecordError
    from station.runner import open_station, run_units

    try:
        ctx = open_station(run.profile, db=run.db, smoke=run.smoke, station=station, baud=run.baud)
    except ConfigError as exc:
        return _not_ready(exc)
    _Words.redact = ctx.redactor
    _info(f"profile {ctx.profile.name}: {ctx.profile.path.resolve()} ({ctx.profile.origin})")
    for a in ctx.record.settled:
        _info(f"station flash: interrupted earlier: {a['port']} {a['mac']} serial {a['serial']} "
              "(the station stopped mid-attempt; it is in the record as interrupted)")
    ports = list(run.ports)
    serials = _given_serials(run, ctx, len(ports) + run.virtual)
    if isinstance(serials, str):
        _err(f"station flash: {serials}; nothing was flashed")
        ctx.record.close()
        return Exit.USAGE
    bench = None
    if run.virtual:
        from flashing.virtual.bench import VirtualBench

        # the profile's boards on their own USB port get virtual boards wired the same way
        bench = VirtualBench(run.virtual, ctx.profile.chip, ctx.profile.board_flash_bytes(), control=False,
                             realtime=run.realtime, usb_serial_jtag=ctx.profile.connection == "usb-serial-jtag")
        for slot in bench.slots:
            slot.device.heartbeat_s = 2.0
            # a real build's bootloader has its table's offset compiled in: the profile is the only word on it
            slot.device.compiled_table_offset = ctx.profile.partition_table_offset
        ports += [slot.url for slot in bench.slots]
    _detail(f"station flash: profile {ctx.profile.name}, starting at {ctx.profile.baud} baud, "
            f"{len(ports)} port(s): {' '.join(ports)}")
    jobs = [UnitJob(port, serials[i] if serials else None, run.rework,
                    run.operator or ctx.station.operator, run.lot or ctx.station.lot)
            for i, port in enumerate(ports)]
    emit = _JsonLines() if run.json else _HumanProgress() if _Words.level >= 0 else (lambda event: None)
    cancel = threading.Event()
    results = []
    try:
        with _StopOnSignal(cancel) as stop:
            results = run_units(jobs, ctx, emit, cancel)
    except RecordError as exc:
        _err(f"station flash: {exc.message} -> {exc.remedy}")
        return Exit.STATION_ERROR
    finally:
        if bench:
            bench.close()
        if all(r.recorded == "database" for r in results):  # else the database is held: the next run signs
            _checkpoint(ctx, "station flash")
        central = ctx.central
        ctx.close()  # with a central record: one last push
    if central is not None and not central.state.online:
        _info(f"station flash: the central record is out of reach ({central.state.last_error}); this run is kept "
              "in the station's record and goes central when the station next reaches it (station central push)")
    if not run.json:
        _summary(results)
    if stop.name:
        return SIGNAL_EXIT[stop.name]
    if any(r.outcome == "error" or r.recorded == "lost" for r in results):
        return Exit.STATION_ERROR
    return Exit.OK if all(r.passed for r in results) else Exit.UNIT_FAILED


def _checkpoint(ctx, reason: str) -> None:
    """Sign where the record stands; a station that cannot only says so (the units are recorded)."""
    from station.audit import write_checkpoint

    try:
        write_checkpoint(ctx.record, ctx.station, reason)
    except Exception as exc:  # the run's result stands; the next run or export signs the chain
        _err(f"{reason}: no checkpoint written ({getattr(exc, 'message', exc)})")


def _open_profile(args: argparse.Namespace):
    """station.toml and the profile `args.profile` names, or their problems on stderr and Exit.USAGE."""
    from station.config import ConfigError, StationConfig
    from station.profile import load_profile

    try:
        station = StationConfig.load(args.config)
        return station, load_profile(args.profile, station.profiles_dir)
    except ConfigError as exc:
        for p in getattr(exc, "problems", None) or [exc]:
            _err(str(p))
        return Exit.USAGE


def cmd_profile_check(args: argparse.Namespace) -> int:
    from station.profile import StationKeys, check_profile, security_summary
    from station.serials import SerialPattern

    opened = _open_profile(args)
    if opened is Exit.USAGE:
        return opened
    station, prof = opened
    problems = check_profile(prof, store_path=station.secrets_file, station_id=station.station_id,
                             station_keys=StationKeys(station.key_file, station.secure_boot_key))
    for p in problems:
        _err(str(p))
    if problems:
        _err(f"{len(problems)} problem(s): profile {prof.name!r} is not ready")
        return Exit.USAGE
    print(f"profile {prof.name!r} is ready: {prof.chip}, firmware {prof.firmware_version()}, "
          f"{len(prof.regions)} regions, config hash {prof.content_hash[:16]} ({prof.origin} {prof.path.resolve()})")
    if prof.serial_pattern:
        pattern, today = SerialPattern.parse(prof.serial_pattern), datetime.now()
        first, last = (pattern.render(n, today, station.station_id) for n in (1, pattern.max_seq))
        on = f" on station {station.station_id!r}" if pattern.uses_station else ""
        print(f"  serials today{on}: {first!r} to {last!r} (pattern {prof.serial_pattern!r})")
    for line in security_summary(prof):
        print(f"  {line}")
    return Exit.OK


def cmd_profile_new(args: argparse.Namespace) -> int:
    """A profile from an ESP-IDF build: images copied and pinned, chip and flash size read, config partition proposed."""
    import shutil

    from station.config import ConfigError, StationConfig
    from station.idf import APP_NVS, NAME_PATTERN, env_name, propose_config_partition, read_build, write_profile
    from station.profile import check_profile, load_profile

    if not NAME_PATTERN.match(args.name):
        _err(f"station profile new: {args.name!r} is not a profile name: letters, digits, '.', '_' and '-', "
             "starting with a letter or digit (it becomes the folder's name)")
        return Exit.USAGE
    try:
        station = StationConfig.load(args.config)
        build = read_build(args.from_idf, args.chip)
        part = propose_config_partition(build, args.config_partition, args.i_know)
        out = args.out or station.profiles_dir / args.name
        path = write_profile(args.name, build, part, out)
    except ConfigError as exc:
        for p in getattr(exc, "problems", None) or [exc]:
            _err(str(p))
        _err("station profile new: nothing was written")
        return Exit.USAGE
    try:
        prof = load_profile(path)
        # an unset token is the next step, not a fault of the new profile
        problems = [p for p in check_profile(prof, store_path=station.secrets_file, station_id=station.station_id)
                    if not p.field.startswith("secrets.")]
    except ConfigError as exc:
        problems = getattr(exc, "problems", None) or [exc]
    if problems:
        shutil.rmtree(out)
        for p in problems:
            _err(str(p))
        _err(f"station profile new: the build does not make a profile the station accepts ({len(problems)} "
             "problem(s) above); nothing was kept")
        return Exit.USAGE
    by = args.name if out.resolve() == (station.profiles_dir / args.name).resolve() else str(out)
    size = build.flash_size or "the bootloader header's size"
    _out(f"wrote profile {args.name!r}: {path.resolve()}")
    _out(f"  chip {build.chip} (from {build.chip_from}); flash {size}"
         + (" (flasher_args.json flash_settings.flash_size)" if build.flash_size else ""))
    _out(f"  firmware {build.project or '?'} {build.version or '?'}: {len(build.files)} images COPIED into "
         f"{(out / 'firmware').resolve()} (the profile no longer depends on the build folder)")
    for b in build.files:
        _out(f"    0x{b.offset:<8x} {len(b.data):>9} B  {b.name:<16} {b.target}  sha256 {b.sha256}")
    own = " -- the app's own NVS, replaced whole on every unit (--i-know)" if part.name == APP_NVS else ""
    _out(f"  config partition {part.name!r} at 0x{part.offset:x} ({part.size} bytes){own}")
    _out("next steps:")
    _out(f"  1. edit the lines marked EDIT in {path} (the vendor account's email, the product id)")
    _out(f"  2. export {env_name(args.name)}_VENDOR_TOKEN=...  (the vendor's MQTT token; or keep it in the "
         "station's encrypted store: station secrets set)")
    _out(f"  3. station profile check {by}")
    board = f"{prof.board_flash_bytes() >> 20}MB"
    _out(f"  4. station flash --profile {by} --virtual 1   (its virtual boards get {board} of flash, as the "
         f"profile says; with `station virtual` give --flash-size {board})")
    return Exit.OK


def _profile_sources(station) -> list[tuple[str, Path]]:
    from station.profile import examples_dir

    return [("profiles_dir", station.profiles_dir), ("packaged example", examples_dir())]


def cmd_profile_list(args: argparse.Namespace) -> int:
    """Every profile a name can reach: the configured profiles_dir first, then the packaged examples."""
    from station.config import ConfigError, StationConfig
    from station.profile import load_profile

    try:
        station = StationConfig.load(args.config)
    except ConfigError as exc:
        for p in getattr(exc, "problems", None) or [exc]:
            _err(str(p))
        return Exit.USAGE
    seen_files, seen_names = set(), set()
    _out(f"{'name':<20} {'title':<28} {'chip':<9} {'firmware':<10} where from")
    for origin, base in _profile_sources(station):
        for toml in sorted(base.glob("*/profile.toml")) if base.is_dir() else []:
            if toml.resolve() in seen_files:
                continue
            seen_files.add(toml.resolve())
            name = toml.parent.name
            where = f"{origin} {toml.parent}" + (" (hidden by the profiles_dir one)" if name in seen_names else "")
            seen_names.add(name)
            try:
                prof = load_profile(toml)
                _out(f"{name:<20} {prof.title[:28]:<28} {prof.chip:<9} {prof.firmware_version() or '?':<10} {where}")
            except ConfigError:
                _out(f"{name:<20} {'(not readable: station profile check ' + name + ')':<49} {where}")
    return Exit.OK


def cmd_profile_show(args: argparse.Namespace) -> int:
    """The resolved profile: where it came from, regions, partitions, config keys (secrets by name only)."""
    from flashing.images import ImageError, check_image_bytes, chip_facts

    opened = _open_profile(args)
    if opened is Exit.USAGE:
        return opened
    station, prof = opened
    flash = f"{prof.flash_size} (declared)" if prof.flash_size else "not declared"
    boot = next((r for r in prof.regions if r.offset == chip_facts(prof.chip).bootloader_offset), None)
    if not prof.flash_size and boot is not None:
        try:
            flash = f"{check_image_bytes(boot.file.read_bytes()).flash_size_name} (the bootloader header's)"
        except (OSError, ImageError):
            pass
    _out(f"profile {prof.name!r}: {prof.title}")
    _out(f"  file {prof.path.resolve()} ({prof.origin})")
    _out(f"  chip {prof.chip}, device class {prof.device_class}, product id {prof.product_id or '-'}, "
         f"baud {prof.baud}, flash {flash}, virtual boards {prof.board_flash_bytes() >> 20}MB")
    _out(f"  firmware version {prof.firmware_version() or '?'}, content hash {prof.content_hash[:16]}")
    _out("regions (written in this order):")
    for r in prof.regions:
        try:
            size = f"{r.file.stat().st_size:>9} B"
        except OSError:
            size = f"{'missing':>11}"
        _out(f"  0x{r.offset:<8x} {size}  {r.name:<16} {r.file}  sha256 {r.sha256}")
    if prof.partitions:
        _out(f"partition table (at 0x{prof.partition_table_offset:x}):")
        for p in prof.partitions:
            mark = "  <- config" if p.name == prof.config_partition else ""
            _out(f"  {p.name:<16} {p.type_name + '/' + p.subtype_name:<16} 0x{p.offset:<8x} {p.size:>9} B{mark}")
    _out(f"config: partition {prof.config_partition or '-'}, namespace {prof.namespace}, "
         f"encryption {prof.encryption}")
    secrets = {s.name: s for s in prof.secrets}
    for k in prof.keys:
        if k.secret:
            s = secrets.get(k.secret)
            where = ", ".join(f"{w} {v}" for w, v in (("env", s.env), ("store", s.store), ("file", s.file)) if v) \
                if s else "not declared"
            source = f"secret {k.secret} ({where}; value not shown)"
        elif k.unit:
            source = f"the unit's {k.unit}"
        else:
            source = f"value {json.dumps(k.value)}"
        limit = f"<= {k.max_length}" if k.max_length else ""
        _out(f"  {k.key:<16} {k.type:<7} {limit:<7} {source}{' (optional)' if k.optional else ''}")
    _out(f"serial: {'pattern ' + prof.serial_pattern if prof.serial_pattern else 'given per unit (labels)'}")
    c = prof.checks
    _out(f"checks: boot {'on' if c.boot else 'off'} (timeout {c.boot_timeout_s:g} s), smoke {c.smoke}")
    return Exit.OK


def _open_record(args, replay: bool = True) -> tuple:
    """The record for a command that reads it: a database that is not there is a usage error, never made empty."""
    from station.config import StationConfig
    from station.runner import open_record

    station = StationConfig.load(args.config)
    path = args.db or station.database
    if not path.exists():
        where = "" if args.db else " (station.toml's database)"
        raise _Usage(f"no database at {path}{where}: check the path; this command reads a record and makes none")
    return station, open_record(station, args.db, replay=replay)


EXPORT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _export_format(out: Path, given: str | None) -> str:
    """--format, else the one --out's extension names, else csv; a --format that contradicts it is refused."""
    ext = out.suffix.lower()
    implied = EXPORT_FORMATS.get(ext)
    if ext == ".json" and given != "jsonl":  # one JSON document is not what the export writes
        raise _Usage(f"--out {out}: the export writes JSON lines: name it .jsonl (or give --format jsonl)")
    if given and implied and given != implied:
        raise _Usage(f"--format {given} contradicts --out {out} ({ext} is {implied}); "
                     "drop --format or change the extension")
    return given or implied or "csv"


def _verify_exports(args, trust) -> int:
    from station.audit import AuditError, check_series, verify

    pem = args.pubkey.read_bytes() if args.pubkey else None
    done, failed = [], False
    for path in args.files:
        try:
            v = verify(path, trust, pem)
        except AuditError as exc:
            _err(f"NOT VERIFIED: {path}: {exc}")
            failed = True
            continue
        m = v.manifest
        how = ("pinned for this station" if v.pinned else
               "ONE-OFF check with --pubkey: the key is not pinned, compare its fingerprint with the published one")
        # what a manifest says (station ids, times) is the exporter's text: data, never control sequences
        _out(f"verified: {path} ({m['rows']} rows, station {m['station_id']}, sha256 {m['sha256'][:16]}…, "
             f"signed by key {v.fingerprint} — {how})")
        for note in v.notes:
            _out(f"  {note}")
        done.append(v)
    for gap in check_series(done):
        _err(f"NOT VERIFIED: {gap}")
        failed = True
    return Exit.UNIT_FAILED if failed else Exit.OK


def cmd_export(args: argparse.Namespace) -> int:
    from station.audit import AuditError, ExportFilter, TrustStore, export, merge, station_signing_key
    from station.config import ConfigError, StationConfig

    action = getattr(args, "export_action", None)
    try:
        if action == "verify":
            return _verify_exports(args, TrustStore.for_station(StationConfig.load(args.config)))
        if action == "merge":  # reads only the exports: no record is opened
            if not args.out:
                raise _Usage("--out FILE is needed")
            station = StationConfig.load(args.config)
            trust = TrustStore.for_station(station)
            key = station_signing_key(station, trust)
            try:
                manifest, conflicts = merge(args.files, args.out, station.station_id, key, trust)
            except AuditError as exc:
                _err(f"station export merge: refused, nothing was written: {exc}")
                return Exit.UNIT_FAILED
            if conflicts:
                _err(f"refused: {len(conflicts)} conflicting record(s); nothing was written")
                for c in conflicts:
                    _err(f"  {c}")
                return Exit.UNIT_FAILED
            _info(f"merged {len(args.files)} exports: {manifest['rows']} units -> {args.out}")
            return Exit.OK
        if not args.out:
            raise _Usage("--out FILE is needed")
        fmt = _export_format(args.out, args.format)
        if args.since and args.until and args.since >= args.until:
            raise _Usage(f"--since {args.since} is not before --until {args.until}: nothing could match")
        if getattr(args, "central", False):
            return _export_central(args, fmt)
        station, record = _open_record(args)
        trust = TrustStore.for_station(station)
        key = station_signing_key(station, trust)
        f = ExportFilter(args.since, args.until, args.profile, args.outcome, args.operator,
                         args.station, args.lot)
        m = export(record, args.out, fmt, f, station.station_id, key, trust)
        _info(f"wrote {m['rows']} {m['kind']} to {args.out}, signed manifest {args.out}.manifest.json "
              f"(key {m['public_key_sha256']})")
        return Exit.OK
    except AuditError as exc:
        _err(f"station export: {exc}")
        return Exit.USAGE
    except (ConfigError, OSError) as exc:
        _err(f"station export: {exc}")
        return Exit.USAGE


def _export_central(args: argparse.Namespace, fmt: str) -> int:
    """`station export --central`: every station's record from the central copy, signed by this machine."""
    import os

    import psycopg

    from station.audit import ExportFilter, TrustStore, station_signing_key
    from station.central import Central, CentralError, central_password
    from station.central_audit import CentralExportRefused, export
    from station.config import StationConfig
    from station.record import CHAIN_KEY_PURPOSE, derive_key, station_key
    from station.secrets import Redactor

    station = StationConfig.load(args.config)
    if not station.central.enabled:
        raise _Usage("station.toml has no [central] url: --central exports from the plant's central record (README: "
                     "Several stations)")
    if args.db:
        raise _Usage("--db names a station database: --central reads the central record only; drop one of them")
    password = central_password(station.secrets_file, os.environ)
    _Words.redact = Redactor.from_values([password])
    trust = TrustStore.for_station(station)
    key = station_signing_key(station, trust)
    # a station that exports recomputes its own chain's entries too (the key exists only where it ran)
    chain_keys = ({station.station_id: derive_key(station_key(station.key_file), CHAIN_KEY_PURPOSE)}
                  if station.key_file.exists() else {})
    f = ExportFilter(args.since, args.until, args.profile, args.outcome, args.operator, args.station, args.lot)
    try:
        with Central(station.central, password, None, station.station_id).connect() as conn:
            m = export(conn, args.out, fmt, f, station.station_id, key, trust.by_station(), chain_keys)
    except CentralExportRefused as exc:
        _err(f"station export --central: refused: {exc}")
        for p in exc.problems:
            _err(f"  {p}")
        return Exit.UNIT_FAILED
    except CentralError as exc:
        _err(f"station export --central: {exc.message} -> {exc.remedy}")
        return Exit.STATION_ERROR
    except psycopg.Error as exc:  # the link broke mid-export: nothing was kept (central_audit.export)
        _err(f"station export --central: the central database failed while exporting ({' '.join(str(exc).split())}); "
             "nothing was written -> try again")
        return Exit.STATION_ERROR
    stations = m["journal"]["stations"]
    _info(f"wrote {m['rows']} {m['kind']} of {len(stations)} station(s) from the central record to {args.out} "
          f"(central export {m['central']['number']}, {m['journal']['entries']} journal entries), signed manifest "
          f"{args.out}.manifest.json (key {m['public_key_sha256']})")
    return Exit.OK


def cmd_keys(args: argparse.Namespace) -> int:
    """The trust store: which station keys this machine accepts exports from."""
    from station.audit import AuditError, TrustStore, station_signing_key
    from station.config import ConfigError, StationConfig

    try:
        station = StationConfig.load(args.config)
        trust = TrustStore.for_station(station)
        if args.keys_action == "trust":
            k, new = trust.trust(args.station, args.pem.read_bytes())
            _info(f"{'now trusted' if new else 'already trusted'}: key {k.fingerprint} for station {k.station_id} "
                  f"({trust.path})")
            return Exit.OK
        try:
            station_signing_key(station, trust)  # the station trusts its own key (made on first use)
        except AuditError as exc:  # a protected key without its passphrase: the pinned keys still show
            _err(f"station keys: this station's own key not checked: {exc}")
        for k in sorted(trust.keys(), key=lambda k: (not k.own, k.station_id, k.added_at)):
            print(f"{k.station_id:<20} {k.fingerprint}  {'this station' if k.own else 'pinned ' + k.added_at}")
        return Exit.OK
    except (AuditError, ConfigError, OSError) as exc:
        _err(f"station keys: {exc}")
        return Exit.USAGE


def cmd_db_verify(args: argparse.Namespace) -> int:
    from station.audit import AuditError, TrustStore
    from station.config import ConfigError

    try:
        station, record = _open_record(args, replay=False)  # a spool is reported here, never applied
        trust = TrustStore.for_station(station)
        trusted, anchored = trust.by_station(), trust.anchored()
    except _Usage:
        raise
    except (ConfigError, AuditError) as exc:
        _err(f"station db verify: {exc}")
        return Exit.USAGE
    except Exception as exc:  # a journal that does not verify is refused at open (RecordError)
        _err(f"station db verify: {getattr(exc, 'message', exc)} -> {getattr(exc, 'remedy', '')}")
        return Exit.UNIT_FAILED
    for a in record.settled:
        print(f"settled as interrupted: attempt {a['id']} ({a['mac']}, serial {a['serial']})")
    problems = record.verify_chain(trusted, anchored)
    good, bad = record.spool_report()
    for p in problems:
        print(p)
    if good:
        print(f"spool {record.spool}: {good} result(s) not yet in the database; the station adds them "
              "the next time it runs (station flash, the screen, station export)")
    for b in bad:
        print(f"spool {record.spool}: {b}")
    if problems or bad:
        _err("the record has been tampered with or damaged (see above)")
        return Exit.UNIT_FAILED
    n = record.count_attempts()
    cps = record.checkpoints()
    last = (f"; it extends {len(cps)} signed checkpoint(s), the last of {cps[-1]['at']}" if cps else
            "; no signed checkpoint yet (written at every export and at the end of every run)")
    print(f"the record is intact: {n} attempts, every station's chain verified{last}")
    return Exit.OK


def cmd_central(args: argparse.Namespace) -> int:
    """The plant's central record (station.toml [central]): status, push, verify, conflicts."""
    import os

    from station.audit import TrustStore
    from station.central import Central, CentralError, central_password, conflicts, status, verify
    from station.config import ConfigError, StationConfig
    from station.secrets import Redactor

    try:
        station = StationConfig.load(args.config)
    except ConfigError as exc:
        _err(f"station central: {exc}")
        return Exit.USAGE
    if not station.central.enabled:
        raise _Usage("station.toml has no [central] url: this station keeps its record alone (README: Several "
                     "stations)")
    password = central_password(station.secrets_file, os.environ)
    _Words.redact = Redactor.from_values([password])
    action = args.central_action
    record = None
    if action == "push" or (action in ("verify", "status") and station.database.exists()):
        station, record = _open_record(args)
    central = Central(station.central, password, record, station.station_id)
    try:
        if action == "push":
            n = central.push()
            _info(f"pushed {n} journal entries of station {station.station_id} to the central record")
            return Exit.OK
        with central.connect() as conn:
            if action == "status":
                rows = status(conn)
                if getattr(args, "json", False):
                    for r in rows:
                        _out(json.dumps(r, default=str))
                    return Exit.OK
                for r in rows:
                    _out(f"{r['station_id']:<20} {r['entries']:>8} entries  {r['attempts']:>7} attempts  "
                         f"{r['leases']:>4} block(s)  last push {r['last_push'] or '-'}")
                if record is not None:
                    mine = next((r for r in rows if r["station_id"] == station.station_id), None)
                    local = record.db().execute("select count(*) from journal where station_id = ?",
                                                [station.station_id]).fetchone()[0]
                    behind = local - (mine["entries"] if mine else 0)
                    _out(f"this station ({station.station_id}): {behind} journal entries not yet central")
                return Exit.OK
            if action == "conflicts":
                found = conflicts(conn)
                as_json = getattr(args, "json", False)
                for c in found:
                    _out(json.dumps(c) if as_json else _conflict_words(c))
                if not found and not as_json:
                    _info("no conflicts: no board passed twice, no serial on two boards")
                return Exit.UNIT_FAILED if found else Exit.OK
            trust = TrustStore.for_station(station)
            keys = {station.station_id: record._chain_key} if record is not None and record._chain_key else {}
            problems, notes = verify(conn, trust.by_station(), keys)
            for n in notes:
                _out(n)
            for p in problems:
                _out(f"PROBLEM: {p}")
            if problems:
                _err("the central record does not verify (see above)")
                return Exit.UNIT_FAILED
            _info("the central record verifies: every station's chain is linked and extends its signed checkpoints")
            return Exit.OK
    except CentralError as exc:
        _err(f"station central {action}: {exc.message} -> {exc.remedy}")
        return Exit.STATION_ERROR
    finally:
        if record is not None:
            record.close()


def _conflict_words(c: dict) -> str:
    if c["kind"] == "board passed twice":
        return (f"board {c['mac']} passed more than once: at {', '.join(c['stations'])} with serial(s) "
                f"{', '.join(s or '-' for s in c['serials'])}")
    return f"serial {c['serial']} is on {len(c['macs'])} boards: {', '.join(c['macs'])} (at {', '.join(c['stations'])})"


def cmd_secrets(args: argparse.Namespace) -> int:
    import getpass
    import os

    from station.config import ConfigError, StationConfig
    from station.secrets import PASSPHRASE_ENV, SecretStore, SecretStoreError

    try:
        station = StationConfig.load(args.config)
        passphrase = os.environ.get(PASSPHRASE_ENV) or (
            getpass.getpass("secrets passphrase: ") if sys.stdin.isatty() else "")
        store = SecretStore(station.secrets_file, passphrase)
        if args.secrets_action == "list":
            for name in store.names():
                print(name)
        elif args.secrets_action == "set":
            if sys.stdin.isatty():
                value = getpass.getpass(f"value of {args.name}: ")
            else:
                value = sys.stdin.readline().rstrip("\n")
            if not value:
                _err("station secrets set: empty value; nothing stored")
                return Exit.USAGE
            store.set(args.name, value)
            _info(f"stored {args.name} in {station.secrets_file}")
        elif args.secrets_action == "remove":
            if not store.remove(args.name):
                _err(f"station secrets remove: {args.name} is not stored")
                return Exit.UNIT_FAILED
            _info(f"removed {args.name}")
    except (ConfigError, SecretStoreError) as exc:
        _err(f"station secrets: {exc}")
        return Exit.USAGE
    return Exit.OK


def cmd_admin(args: argparse.Namespace) -> int:
    """`station admin set-password`: the scrypt line for the screen's F10, in admin_password_file."""
    import getpass

    from station.admin import AdminPasswordError, hash_password, write_stored
    from station.config import ConfigError, StationConfig

    try:
        station = StationConfig.load(args.config)
        if sys.stdin.isatty():
            password = getpass.getpass("new admin password: ")
            if getpass.getpass("again: ") != password:
                _err("station admin set-password: the two entries differ; nothing changed")
                return Exit.USAGE
        else:
            password = sys.stdin.readline().rstrip("\n")
        write_stored(station.admin_password_file, hash_password(password))
    except (ConfigError, AdminPasswordError) as exc:
        _err(f"station admin set-password: {exc}; nothing changed")
        return Exit.USAGE
    _info(f"admin password set in {station.admin_password_file}")
    if station.admin_password_sha256:
        _err("now remove admin_password_sha256 from station.toml: it is no longer accepted")
    return Exit.OK


# -- station ports ------------------------------------------------------------------------

def cmd_ports(args: argparse.Namespace) -> int:
    """The serial ports here and the fixture slot each is; `learn` binds slots; `udev-rules` names them."""
    from station.config import ConfigError, StationConfig

    try:
        station = StationConfig.load(args.config)
    except ConfigError as exc:
        for p in getattr(exc, "problems", None) or [exc]:
            _err(f"station ports: {p}")
        return Exit.USAGE
    if args.ports_action == "udev-rules":
        return _ports_udev_rules(station)
    if args.ports_action == "learn":
        return _ports_learn(station, args)
    return _ports_list(station, args.json)


def _ports_list(station, as_json: bool) -> int:
    from flashing.ports import fixture_slots, serial_ports

    ports = serial_ports()
    slots = fixture_slots(ports, station.usb_ports, station.ports.slots, station.slots)
    slot_of = {s.port.device: s for s in slots if s.port}

    def row(p) -> dict:
        s = slot_of.get(p.device)
        name = s.name if s else next(iter(p.links), p.device)  # what the station opens for it
        return dict(slot=s.number if s else None, port=p.device, vid_pid=p.vid_pid, location=p.location,
                    serial_number=p.serial_number, bridge=p.bridge, native_usb=p.native_usb,
                    stable_name=None if name == p.device else name)

    rows = [row(p) for p in ports]
    rows += [dict(slot=s.number, port=None, vid_pid="", location=s.location, serial_number=None, bridge="",
                  native_usb=False, stable_name=s.name) for s in slots if not s.here]
    rows.sort(key=lambda r: (r["slot"] is None, r["slot"] or 0))
    if as_json:
        for r in rows:
            _out(json.dumps(r))
    else:
        head = ("SLOT", "PORT", "VID:PID", "LOCATION", "SERIAL", "BRIDGE", "NATIVE USB")
        table = [head] + [(str(r["slot"] or "-"), r["port"] or "(nothing there)", r["vid_pid"] or "-",
                           r["location"] or "-", r["serial_number"] or "-", r["bridge"] or "-",
                           "yes" if r["native_usb"] else "no") for r in rows]
        widths = [max(len(safe_text(row[i])) for row in table) for i in range(len(head))]
        for row in table:
            _out("  ".join(safe_text(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    if station.ports.slots:
        _info(f"slots bound to USB locations by {station.source or 'station.toml'} [ports.slots]")
    else:
        _info("no [ports.slots] in station.toml: the slots are the fixture's ports (USB VID:PID "
              f"{', '.join(station.usb_ports) or 'none'}) in natural order, which changes when boards are "
              "replugged; `station ports learn` binds each slot to its socket")
    return Exit.OK


def _ports_udev_rules(station) -> int:
    from flashing.ports import udev_rules

    if not station.ports.slots:
        raise _Usage("no [ports.slots] in station.toml to make rules from: run `station ports learn` first")
    sys.stdout.write(udev_rules(station.ports.slots, str(station.source or "station.toml")))
    return Exit.OK


def _ports_learn(station, args: argparse.Namespace) -> int:
    from flashing.ports import serial_ports
    from station.config import ConfigError
    from station.ports import Stopped, learn, write_slots

    if station.source is None:
        raise _Usage("no station.toml to write the slots into: give --config FILE (or create ./station.toml)")
    count = args.slots or len(station.ports.slots) or station.slots
    _info(f"station ports learn: {count} slots; plug one board at a time; a port already there is learned by "
          "unplugging and plugging it again; Ctrl-C stops without writing anything")
    try:
        slots = learn(count, serial_ports, _info, station.usb_ports, args.timeout)
    except KeyboardInterrupt:
        _err("station ports learn: stopped; station.toml is unchanged")
        return Exit.SIGINT
    except Stopped as exc:
        _err(f"station ports learn: {exc}; station.toml is unchanged")
        return Exit.UNIT_FAILED
    try:
        write_slots(station.source, slots)
    except (ConfigError, OSError) as exc:
        _err(f"station ports learn: {exc}")
        return Exit.USAGE
    for n, loc in sorted(slots.items()):
        _out(f"{n} = {json.dumps(loc)}")
    _info(f"written to {station.source} [ports.slots]; `station ports udev-rules` makes a udev rules file for them")
    return Exit.OK


# -- station demo -------------------------------------------------------------------------

def _demo_station(args):
    """station.toml with the demo's embedded broker as the factory test broker."""
    import dataclasses
    import os

    from station.config import StationConfig
    from station.demo_broker import DemoBroker

    # the example profile's vendor token and the factory broker's accounts: demo values
    os.environ.setdefault("RELAY_VENDOR_TOKEN", "demo-tok42")
    os.environ.setdefault("STATION_MONITOR_PASSWORD", "demo-monitor")
    os.environ.setdefault("STATION_BROKER_ADMIN_PASSWORD", "demo-admin")
    station = StationConfig.load(args.config)
    smoke = station.smoke
    # each unit's own test account is made on it, as on the factory's Mosquitto
    broker = DemoBroker(accounts={smoke.monitor_user: os.environ[smoke.monitor_password_env]},
                        admin=(smoke.broker_admin_user, os.environ[smoke.broker_admin_password_env]),
                        monitor=smoke.monitor_user)
    station = dataclasses.replace(station, smoke=dataclasses.replace(
        smoke, broker_host=broker.host, broker_port=broker.port, broker_tls=False, reach="direct", url=""))
    return station, broker


def cmd_demo(args: argparse.Namespace) -> int:
    """The station with virtual boards and the example profile (the operator's screen)."""
    from station.config import ConfigError

    try:
        station, broker = _demo_station(args)
    except ConfigError as exc:
        _err(f"station demo: {exc}")
        return Exit.USAGE
    db = args.db or station.database.with_name("demo.db")  # var/ in a checkout, else the user's data folder
    try:
        if args.batch:
            return _demo_batch(args, station, db)
        return _demo_screen(args, station, db)
    finally:
        broker.close()


def _demo_batch(args, station, db: Path) -> int:
    run = FlashRun(virtual=args.count, realtime=args.realtime, profile=args.profile, db=db, operator="demo",
                   lot="demo", smoke=args.smoke)
    rc = flash(run, station)
    if rc != Exit.USAGE:
        from station.audit import ExportFilter, TrustStore, export, station_signing_key
        from station.runner import open_record

        out = db.with_name("demo-export.csv")
        trust = TrustStore.for_station(station)
        m = export(open_record(station, db), out, "csv", ExportFilter(), station.station_id,
                   station_signing_key(station, trust), trust)
        _info(f"the record is in {db}; {m['rows']} provisioned units exported to {out} (signed manifest "
             f"beside it: station export verify {out})")
    return rc


def _demo_screen(args, station, db: Path) -> int:
    from flashing.virtual.bench import VirtualBench
    from station.config import ConfigError
    from station.demo import DemoLine
    from station.runner import open_station
    from station.tui import StationApp

    def opener(name: str):
        return open_station(name, db=db, smoke=args.smoke, station=station)

    try:
        ctx = opener(args.profile)
    except ConfigError as exc:
        _err(f"station demo: {exc}")
        return Exit.USAGE
    with VirtualBench(args.count, ctx.profile.chip, ctx.profile.board_flash_bytes(), realtime=args.realtime) as bench:
        for slot in bench.slots:
            slot.device.heartbeat_s = 2.0
            slot.device.compiled_table_offset = ctx.profile.partition_table_offset
        app = StationApp(ctx, [s.url for s in bench.slots], operator=args.operator, open_profile=opener)
        demo = DemoLine(bench, app.line, faulty_share=args.faulty).start()
        try:
            return _run_screen(app)
        finally:
            demo.stop()


def cmd_tui(args: argparse.Namespace) -> int:
    """The operator's screen on the fixture's real ports (-p, else $ESPPORT, else the USB VID:PID filters)."""
    from station.config import ConfigError
    from station.runner import open_station
    from station.tui import StationApp

    baud = args.baud or _env_baud()
    try:
        ctx = open_station(args.profile, args.config, args.db, baud=baud)
    except ConfigError as exc:
        for p in getattr(exc, "problems", None) or [exc]:
            _err(f"station: {p}")
        return Exit.USAGE
    ports = args.port or _env_ports() or _fixture_ports(ctx.station, every_slot=True)
    if not ports:
        ctx.close()
        raise _Usage(_no_fixture_ports(ctx.station) + " or $ESPPORT")
    app = StationApp(ctx, ports, operator=args.operator,
                     open_profile=lambda name: open_station(name, args.config, args.db, baud=baud))
    return _run_screen(app)


def _run_screen(app) -> int:
    """Run the operator's screen until it quits; a crash of the screen is a station error (exit 3)."""
    _Words.redact = app.line.ctx.redactor
    try:
        app.run()
    finally:
        app.line.shutdown()
        if app.crashed:
            app.line.close()  # every running unit aborted and recorded before the process says so
        app.line.ctx.record.release_session()
    if app.crashed:
        for text in app.crashed.splitlines():
            _err(f"station: {text}")
        _err("station: the operator's screen stopped on an error; the units that were running are recorded "
             "as aborted -> call the station's engineer with the lines above")
        return Exit.STATION_ERROR
    return SIGNAL_EXIT[app.signalled] if app.signalled else Exit.OK


# -- parser ---------------------------------------------------------------------------------

def _table_offset(text: str) -> int:
    """CONFIG_PARTITION_TABLE_OFFSET: 0x8000 or later, on a 4 KiB sector."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 0xc000)") from None
    if value < 0x8000 or value % 0x1000:
        raise argparse.ArgumentTypeError(f"{text}: a partition table sits at 0x8000 or later, on a 4 KiB sector")
    return value


def _boards(text: str) -> int:
    """--virtual and --count: a number of boards a station can have."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of boards") from None
    if not 1 <= n <= MAX_BOARDS:
        raise argparse.ArgumentTypeError(f"{n} boards: give 1 to {MAX_BOARDS}")
    return n


def _baud(text: str) -> int:
    """-b and $ESPBAUD: one of the rates esptool uses."""
    from station.profile import BAUDS

    try:
        baud = int(text)
    except ValueError:
        baud = 0
    if baud not in BAUDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a baud rate the station uses "
                                         f"({', '.join(map(str, BAUDS))})")
    return baud


MOMENT_FORMS = "2026-11-01, 2026-11-01T08:30, 2026-11-01T08:30:00+02:00 (UTC unless an offset is given)"


def _moment(text: str) -> str:
    """--since/--until: an ISO date or time, written as the record's UTC times compare with it."""
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time; use {MOMENT_FORMS}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # the record's times are UTC
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _serial_ports(**_) -> list[str]:
    """-p's shell completion: the serial ports present now."""
    from serial.tools import list_ports

    return [p.device for p in list_ports.comports()]


class _Version(argparse.Action):
    """--version: the station's package version and esptool's (whose flashing this is)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import esptool

    try:
        ours = version("provisioning-station")
    except PackageNotFoundError:  # run from a checkout that was never installed
        ours = "(not installed)"
    return f"station {ours} (provisioning-station), esptool {esptool.__version__}, Python {platform.python_version()}"


def _voice(default) -> argparse.ArgumentParser:
    """-q/-v: before the command (default 0) and on every command (SUPPRESS: absent leaves `station -q …`'s)."""
    parent = argparse.ArgumentParser(add_help=False)
    g = parent.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                   help="only data on stdout and errors on stderr (before or after any command)")
    g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
                   help="more on stderr: every step's time, esptool's and the board's lines")
    return parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="station", parents=[_voice(0)],
                                description="the provisioning station; no command opens the operator's screen (tui)")
    p.add_argument("--version", action=_Version, help="the station's version, esptool's and Python's")
    p.set_defaults(usage_parser=p)
    voice = _voice(argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(parent_sub, name: str, help: str, **kw) -> argparse.ArgumentParser:
        c = parent_sub.add_parser(name, help=help, description=help, parents=[voice], **kw)
        c.set_defaults(usage_parser=c)  # a usage error shows this command's usage, not the top level's
        return c

    v = command(sub, "virtual", "start virtual ESP boards and serve them until interrupted")
    v.add_argument("--chip", default="esp32", metavar="CHIP", help="esp32, esp32c3 or esp32s3 (default esp32)")
    v.add_argument("--count", type=_boards, default=1, metavar="N", help=f"how many boards, 1 to {MAX_BOARDS}")
    v.add_argument("--flash-size", default="4MB", metavar="SIZE", help="2MB, 4MB, 8MB or 16MB")
    v.add_argument("--state-dir", type=Path, metavar="DIR", help="keep each board's flash and MAC here")
    v.add_argument("--run-dir", type=Path, metavar="DIR", help="where the boards' sockets go")
    v.add_argument("--realtime", action="store_true",
                   help="timing model: wire at baud/10 bytes/s, flash erase/program latency")
    v.add_argument("--usb-serial-jtag", action="store_true",
                   help="esp32c3/esp32s3 on the chip's own USB port (VID:PID 303a:1001), not a USB-UART bridge")
    v.add_argument("--partition-table-offset", type=_table_offset, default=0x8000, metavar="OFFSET",
                   help="where the boards' bootloader looks for its partition table when its image does not say "
                        "(a real ESP-IDF build's CONFIG_PARTITION_TABLE_OFFSET; default 0x8000)")
    v.add_argument("--json", action="store_true", help="one JSON object per board per line")
    v.set_defaults(func=cmd_virtual)

    f = command(sub, "flash", "provision units on fixture ports (or virtual boards)")
    f.add_argument("--profile", metavar="NAME", help="profile name under profiles/ or a path (default: station.toml's)")
    f.add_argument("-p", "--port", action="append", metavar="PORT",
                   help="serial port or pyserial URL; repeat for more (default: $ESPPORT, else the fixture's "
                        "USB ports as station.toml [ports] names them)").completer = _serial_ports
    f.add_argument("-b", "--baud", type=_baud, metavar="BAUD",
                   help="starting baud rate, lower ones are tried when it fails (default: $ESPBAUD, else the "
                        "profile's)")
    f.add_argument("--virtual", type=_boards, metavar="N", help=f"provision N virtual boards (1 to {MAX_BOARDS})")
    f.add_argument("--realtime", action="store_true",
                   help="the virtual boards run the timing model (real wire and flash times)")
    f.add_argument("--json", action="store_true", help="one JSON event per line on stdout")
    f.add_argument("--db", type=Path, metavar="FILE", help="station database (default: station.toml's)")
    f.add_argument("--serial", action="append", metavar="SERIAL", help="serial for each port, in order (from labels)")
    f.add_argument("--rework", action="store_true", help="re-provision units that already passed")
    f.add_argument("--operator", default="", metavar="NAME", help="who is provisioning (default: station.toml's)")
    f.add_argument("--lot", default="", metavar="LOT", help="production lot (default: station.toml's)")
    f.add_argument("--config", type=Path, metavar="FILE",
                   help="station.toml (default $STATION_CONFIG or ./station.toml)")
    f.add_argument("--smoke", choices=["none", "healthcheck", "pair"],
                   help="smoke-test level for this run (default: the profile's)")
    f.set_defaults(func=cmd_flash)

    pr = command(sub, "profile", "product profiles")
    prs = pr.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    pc = command(prs, "check", "validate a profile without a device")
    pc.add_argument("profile", help="profile name under profiles/ or a path")
    pc.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    pc.set_defaults(func=cmd_profile_check)
    pn = command(prs, "new", "a profile from an ESP-IDF build folder (images copied, SHA-256 pinned)")
    pn.add_argument("name", help="the new profile's name (its folder under profiles_dir)")
    pn.add_argument("--from-idf", type=Path, required=True, metavar="BUILD_DIR",
                    help="the build folder (holding flasher_args.json), or its flasher_args.json")
    pn.add_argument("--chip", help="only when the build does not say (it must agree when it does)")
    pn.add_argument("--config-partition", metavar="P",
                    help="the NVS partition for the units' config (default: the build's dedicated one)")
    pn.add_argument("--i-know", action="store_true",
                    help="with --config-partition nvs: overwrite the app's own NVS on every unit")
    pn.add_argument("--out", type=Path, metavar="DIR", help="the new profile's folder (default: profiles_dir/NAME)")
    pn.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    pn.set_defaults(func=cmd_profile_new)
    pl = command(prs, "list", "the profiles found: profiles_dir, then the packaged examples")
    pl.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    pl.set_defaults(func=cmd_profile_list)
    ps = command(prs, "show", "a profile as the station reads it: regions, hashes, config keys")
    ps.add_argument("profile", help="profile name under profiles/ or a path")
    ps.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    ps.set_defaults(func=cmd_profile_show)

    e = command(sub, "export", "signed exports of the record for audit (and verify, merge)")
    e.add_argument("--format", choices=["csv", "jsonl"],
                   help="default: from --out's extension (.csv, .jsonl), else csv")
    e.add_argument("--since", type=_moment, metavar="WHEN", help=f"from then on: {MOMENT_FORMS}")
    e.add_argument("--until", type=_moment, metavar="WHEN", help="before then (same forms)")
    e.add_argument("--profile", metavar="NAME", help="only this profile's units")
    e.add_argument("--outcome", choices=["passed", "failed", "aborted", "error", "interrupted", "started", "any"],
                   help="export attempts with this outcome (default: the provisioned units)")
    e.add_argument("--operator", metavar="NAME", help="only this operator's units")
    e.add_argument("--station", metavar="ID", help="only this station id's units")
    e.add_argument("--lot", metavar="LOT", help="only this lot's units")
    e.add_argument("--out", type=Path, metavar="FILE", help="the export file; its signed manifest goes beside it")
    e.add_argument("--central", action="store_true",
                   help="export every station's record from the central database ([central] in station.toml), "
                        "signed by this machine; no station database is read")
    e.add_argument("--db", type=Path, metavar="FILE",
                   help="station database, which must exist (default: station.toml's)")
    e.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    e.set_defaults(func=cmd_export, export_action=None)
    es = e.add_subparsers(dest="export_action", metavar="ACTION")
    ev = command(es, "verify", "check exports: signature under a pinned key, hashes, chain, gaps")
    ev.add_argument("files", type=Path, nargs="+", help="one export, or a station's consecutive exports")
    ev.add_argument("--pubkey", type=Path, metavar="PEM",
                    help="a one-off, unpinned check with this public key (default: the keys pinned with "
                         "`station keys trust`)")
    ev.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    ev.set_defaults(func=cmd_export)
    em = command(es, "merge", "join exports of several stations into one audit set")
    em.add_argument("files", type=Path, nargs="+", help="the exports to join")
    em.add_argument("--out", type=Path, metavar="FILE", help="the merged export")
    em.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    em.set_defaults(func=cmd_export)

    db = command(sub, "db", "the station database")
    dbs = db.add_subparsers(dest="db_action", required=True, metavar="ACTION")
    dv = command(dbs, "verify", "walk the hash chain; name the first tampered row")
    dv.add_argument("--db", type=Path, metavar="FILE",
                    help="station database, which must exist (default: station.toml's)")
    dv.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    dv.set_defaults(func=cmd_db_verify)

    ce = command(sub, "central", "the plant's central record shared by several stations ([central] in station.toml)")
    ces = ce.add_subparsers(dest="central_action", required=True, metavar="ACTION")
    cs = command(ces, "status", "every station's entries, attempts and serial blocks in the central record")
    cs.add_argument("--json", action="store_true", help="one JSON object per station")
    cp = command(ces, "push", "push this station's journal now (the station also does it by itself while it runs)")
    cv = command(ces, "verify", "walk every station's chain in the central copy against its signed checkpoints")
    cc = command(ces, "conflicts", "boards that passed at more than one station, serials on two boards")
    cc.add_argument("--json", action="store_true", help="one JSON object per conflict")
    for c in (cs, cp, cv, cc):
        c.add_argument("--db", type=Path, metavar="FILE", help="this station's database (default: station.toml's)")
        c.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
        c.set_defaults(func=cmd_central)

    k = command(sub, "keys", "the station keys this machine trusts exports from")
    ks = k.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    kt = command(ks, "trust", "pin a station's public key (compare its fingerprint first)")
    kt.add_argument("pem", type=Path, help="the station's public key (PEM)")
    kt.add_argument("--station", required=True, metavar="ID", help="the station id the key signs for")
    command(ks, "list", "the pinned keys with their fingerprints (this station's own first)")
    k.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    k.set_defaults(func=cmd_keys)

    sc = command(sub, "secrets", "the encrypted secrets file (tokens, Wi-Fi passwords)")
    scs = sc.add_subparsers(dest="secrets_action", required=True, metavar="ACTION")
    ss = command(scs, "set", "store a secret; the value is read from stdin or asked for")
    ss.add_argument("name", help="the secret's name, as a profile's secrets table gives it")
    command(scs, "list", "names of the stored secrets")
    sr = command(scs, "remove", "forget a stored secret")
    sr.add_argument("name", help="the secret's name")
    sc.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    sc.set_defaults(func=cmd_secrets)

    ad = command(sub, "admin", "the admin password of the operator's screen (F10)")
    ads = ad.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    command(ads, "set-password", "read it from the terminal (twice) or one line of stdin; "
            "store its scrypt hash in admin_password_file")
    ad.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    ad.set_defaults(func=cmd_admin)

    t = command(sub, "tui", "the operator's screen on the fixture's ports (the default)")
    t.add_argument("--profile", metavar="NAME", help="profile name under profiles/ or a path (default: station.toml's)")
    t.add_argument("-p", "--port", action="append", metavar="PORT",
                   help="serial port or pyserial URL; repeat for more (default: $ESPPORT, else the fixture's "
                        "USB ports)").completer = _serial_ports
    t.add_argument("-b", "--baud", type=_baud, metavar="BAUD",
                   help="starting baud rate (default: $ESPBAUD, else the profile's)")
    t.add_argument("--operator", metavar="NAME", help="skip the operator prompt")
    t.add_argument("--db", type=Path, metavar="FILE", help="station database (default: station.toml's)")
    t.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    t.set_defaults(func=cmd_tui)

    d = command(sub, "demo", "the operator's screen with virtual boards and the example profile")
    d.add_argument("--count", type=_boards, default=4, metavar="N", help=f"virtual boards, 1 to {MAX_BOARDS} "
                   "(default 4)")
    d.add_argument("--batch", action="store_true", help="no screen: provision the boards once, CLI output")
    d.add_argument("--realtime", action="store_true",
                   help="the boards run the timing model: real flashing times, cycle times and units per hour")
    d.add_argument("--operator", metavar="NAME", help="skip the operator prompt")
    d.add_argument("--faulty", type=float, default=0.2, metavar="SHARE", help="share of faulty boards (default 0.2)")
    d.add_argument("--profile", default="relay", metavar="NAME", help="the profile (default relay, the example)")
    d.add_argument("--db", type=Path, metavar="FILE", help="the demo's database (default var/demo.db)")
    d.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    d.add_argument("--smoke", default="pair", choices=["none", "healthcheck", "pair"],
                   help="smoke-test level (default pair)")
    d.set_defaults(func=cmd_demo)

    po = command(sub, "ports", "the serial ports here: VID:PID, USB location, bridge, native USB, fixture slot")
    po.add_argument("--json", action="store_true", help="one JSON object per port per line")
    po.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    po.set_defaults(func=cmd_ports, ports_action=None)
    pos = po.add_subparsers(dest="ports_action", metavar="ACTION")
    pl = command(pos, "learn", "bind each slot to its socket: plug a board into slot 1, 2, ... as asked; "
                 "writes [ports.slots] into station.toml")
    pl.add_argument("--slots", type=_boards, metavar="N", help="how many slots (default: those bound, else slots)")
    pl.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds to wait for each board "
                    "(default 120)")
    pl.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    pl.set_defaults(func=cmd_ports)
    pu = command(pos, "udev-rules", "print a udev rules file naming each bound slot /dev/station/slot-N")
    pu.add_argument("--config", type=Path, metavar="FILE", help="station.toml")
    pu.set_defaults(func=cmd_ports)

    c = command(sub, "virtual-ctl", "act on a running `station virtual` board")
    c.add_argument("--control", required=True, type=Path, metavar="SOCKET", help="the control socket it printed")
    c.add_argument("--device", type=int, default=None, metavar="INDEX",
                   help="the board's index (default: all, for list)")
    ops = ["list", "state", "reset", "power_cycle", "unplug", "replug", "swap", "fault", "clear_faults", "console"]
    c.add_argument("op", choices=ops, metavar="OP", help=f"what to do: {', '.join(ops)}")
    c.add_argument("value", nargs="?", help="reset: download|app; fault: NAME; swap: new MAC")
    c.add_argument("fault_value", nargs="?", help="fault: JSON value (default true)")
    c.set_defaults(func=cmd_virtual_ctl)
    return p


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The README's command reference, generated from the parser (tests/cli/test_readme_cli.py keeps it so)."""
    parser = parser or build_parser()
    out: list[str] = []

    def cell(text: str | None) -> str:
        return (text or "").replace("|", "\\|")

    def walk(p: argparse.ArgumentParser, summary: str) -> None:
        fmt = p._get_formatter()
        out.append(f"**`{p.prog}`** — {cell(summary)}\n")
        rows = [a for a in p._actions if a.help is not argparse.SUPPRESS
                and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
                and (p is parser or a.dest != "verbosity")]  # -q/-v: said once, for every command
        if rows:
            out.append("| option | |\n|---|---|")
            for a in rows:
                name = ", ".join(f"`{x}`" for x in fmt._format_action_invocation(a).split(", "))
                out.append(f"| {name} | {cell(a.help)} |")
            out.append("")
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for choice in a._choices_actions:
                    walk(a.choices[choice.dest], choice.help)

    walk(parser, parser.description)
    return "\n".join(out).rstrip("\n") + "\n"


def say_config(args: argparse.Namespace) -> None:
    """One stderr line: which station.toml this command uses, or that it uses the defaults (-q: none)."""
    from station.config import ConfigError, find_config

    if not hasattr(args, "config") or getattr(args, "verbosity", 0) < 0:
        return
    try:
        _err(find_config(args.config).describe())
    except ConfigError:
        pass  # the command itself reports a missing --config or $STATION_CONFIG file


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # the database, its WAL, spool, exports, keys, secrets: 0600 in 0700 folders
    _Words.redact = NO_SECRETS  # until this command opens a station (main may run more than once in a process)
    _Words.level = 0
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions: argcomplete answers and exits
        import argcomplete

        argcomplete.autocomplete(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not set(argv) & {*commands, "-h", "--help", "--version"}:  # no command: the screen (`station -p X`)
        argv = ["tui", *argv]
    args, extra = parser.parse_known_args(argv)
    command = args.usage_parser
    if extra:  # through the command's own parser: its usage, not the top level's
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    _Words.level = args.verbosity
    say_config(args)
    try:
        return int(args.func(args))
    except _Usage as exc:
        return _usage(command, str(exc))


if __name__ == "__main__":
    sys.exit(main())
