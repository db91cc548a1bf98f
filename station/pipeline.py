"""The pipeline of one unit: the one function the CLI, the screen and the tests call.

connect -> identify -> guard duplicates -> assign serial -> build config partition
-> flash -> boot check -> record. Every step's duration is recorded; a failure stops
the unit with a message naming the step and what to do, and the unit is recorded as
failed with that reason. Nothing here branches on virtual or real boards.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

import hmac

from flashing.nvs import NvsEntry, NvsError, build_partition, keys_partition, new_keys, read_partition
from flashing.session import SessionError, UnitSession, flash_size_bytes

from .config import StationConfig
from .events import Emit, LogLine, Progress, StepFinished, StepStarted, UnitFinished, UnitInfo, UnitResult
from .profile import Profile
from .record import Attempt, Record, RecordError, fingerprint, now_iso
from .smoke import FactoryAccounts, SmokeFailure, healthcheck, make_reach, pair_and_wait, soak

STEPS = ("connect", "identify", "guard", "serial", "config", "flash", "boot", "smoke", "record")


@dataclass(frozen=True)
class UnitJob:
    port: str
    serial: str | None = None  # given per unit (from a label), else the profile's pattern
    rework: bool = False  # re-provision a unit that already passed
    operator: str = ""
    lot: str = ""


@dataclass
class StationContext:
    station: StationConfig
    profile: Profile
    secrets: dict[str, str]
    record: Record
    key: bytes
    firmware: list[tuple[str, int, bytes]] = field(default_factory=list)  # (name, offset, data)
    smoke_level: str | None = None  # overrides the profile's level
    port_baud: dict[str, int] = field(default_factory=dict)  # the rate that worked, per port, this shift
    accounts: FactoryAccounts | None = None
    make_reach: object = make_reach  # the seam for reaching a device (direct, or Wi-Fi via nmcli)

    def __post_init__(self) -> None:
        if not self.firmware:
            self.firmware = [(r.name, r.offset, data) for r, data in self.profile.region_bytes()]
        self._pool: ThreadPoolExecutor | None = None

    def workers(self, n: int) -> ThreadPoolExecutor:
        """Threads for running units, kept across batches (one per port at the most)."""
        if self._pool is None or self._pool._max_workers < n:
            self._pool = ThreadPoolExecutor(max_workers=max(n, 4), thread_name_prefix="unit")
        return self._pool


class StepFailure(Exception):
    def __init__(self, message: str, remedy: str, detail: str | None = None):
        super().__init__(message)
        self.message, self.remedy, self.detail = message, remedy, detail


class Aborted(Exception):
    pass


def device_id_from_mac(mac: bytes) -> str:
    """The 2Smart SDK's device id: the Wi-Fi MAC in lower case with dashes."""
    return "-".join(f"{b:02x}" for b in mac)


def render_serial(pattern: str, seq: int | None, when: datetime) -> str:
    values = {"yymmdd": when.strftime("%y%m%d"), "yyyymmdd": when.strftime("%Y%m%d"),
              "yy": when.strftime("%y"), "mm": when.strftime("%m"), "dd": when.strftime("%d")}
    if seq is None:  # the counter's name: the pattern up to the sequence number
        return pattern.split("{seq")[0].format(**values)
    return pattern.format(seq=seq, **values)


class _UnitSink:
    """esptool's progress and messages for this unit, turned into events."""

    def __init__(self, port: str, emit: Emit):
        self.port, self.emit = port, emit
        self.region = ""
        self.base = 0
        self.size = 0
        self.total = 0
        self._last = 0.0

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        self.emit(Progress(self.port, "flash", self.base + int(frac * self.size), self.total, self.region))

    def message(self, text: str) -> None:
        self.emit(LogLine(self.port, "esptool", text))


def provision_unit(job: UnitJob, ctx: StationContext, emit: Emit,
                   cancel: threading.Event | None = None) -> UnitResult:
    """Provision the board on `job.port` once; never raises for a unit's failure."""
    cancel = cancel or threading.Event()
    profile = ctx.profile
    attempt = Attempt(port=job.port, station_id=ctx.station.station_id, profile=profile.name,
                      profile_hash=profile.content_hash, started_at=now_iso(),
                      operator=job.operator, lot=job.lot or ctx.station.lot or profile.lot,
                      rework=job.rework,
                      firmware_hashes=profile.firmware_hashes(), baud=profile.baud)
    sink = _UnitSink(job.port, emit)
    session = UnitSession(job.port, sink, cancelled=cancel.is_set)
    current = {"step": "connect"}
    note = None
    watcher_stop = threading.Event()

    def watch_cancel() -> None:
        # an abort closes the port: esptool fails at once instead of finishing the write
        while not watcher_stop.wait(0.05):
            if cancel.is_set():
                session.close()
                return

    threading.Thread(target=watch_cancel, daemon=True).start()

    @contextmanager
    def step(name: str) -> Iterator[None]:
        if cancel.is_set():
            raise Aborted()
        current["step"] = name
        emit(StepStarted(job.port, name))
        t = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            seconds = round(time.monotonic() - t, 3)
            attempt.durations[name] = seconds
            emit(StepFinished(job.port, name, seconds, ok))

    try:
        with step("connect"):
            session.open()
            ident = session.connect(profile.chip)
            attempt.chip = ident.chip
            if ident.secure_download:
                raise StepFailure("the board is in Secure Download Mode: its flash cannot be read back "
                                  "or verified", "set it aside for the secured-device process")
        mac = ident.mac
        attempt.mac = ":".join(f"{b:02x}" for b in mac)
        attempt.device_id = device_id_from_mac(mac)
        emit(UnitInfo(job.port, attempt.mac, attempt.chip))
        with step("identify"):
            info, attempt.baud = _prepare_at_best_rate(session, ctx, job.port, emit)
            need = profile.needed_flash()
            have = flash_size_bytes(info.flash_size)
            if have and have < need:
                raise StepFailure(f"the board has {info.flash_size} of flash; the firmware needs "
                                  f"{need // (1024 * 1024) or 1}MB",
                                  "set it aside: it carries the wrong module for this product")
        with step("guard"):
            if not job.rework:
                prior = ctx.record.passed_unit(mac=attempt.mac)
                if prior:
                    raise StepFailure(f"this board ({attempt.mac}) already passed as {prior['serial']}",
                                      "put it with the finished units, or re-provision it on purpose (--rework)")
        with step("serial"):
            attempt.serial = _assign_serial(job, ctx, attempt.mac)
        emit(UnitInfo(job.port, serial=attempt.serial))
        with step("config"):
            image, keys_image, values = _build_config(ctx, attempt)
        with step("flash"):
            regions = [(name, off, data) for name, off, data in ctx.firmware]
            if image is not None:
                slot = profile.config_slot()
                regions.append(("config", slot.offset, image))
            if keys_image is not None:
                kslot = next(p for p in profile.partitions if p.name == profile.keys_partition)
                regions.append(("nvs_keys", kslot.offset, keys_image))
            sink.total = sum(len(d) for _, _, d in regions)
            for name, offset, data in regions:
                sink.region, sink.size = name, len(data)
                # fast rework: a region whose MD5 on the board already matches is not rewritten
                if session.region_md5(offset, len(data)) != hashlib.md5(data).hexdigest():
                    session.write(offset, data)
                    attempt.written_regions.append(name)
                sink.base += len(data)
                emit(Progress(job.port, "flash", sink.base, sink.total, name))
            emit(Progress(job.port, "flash", sink.total, sink.total, ""))
        if profile.checks.boot:
            with step("boot"):
                log = session.boot(profile.checks.boot_timeout_s, profile.checks.boot_settle_s)
                for line in log.text.splitlines():
                    emit(LogLine(job.port, "boot", line))
                problem = log.problem()
                if problem:
                    raise StepFailure(problem, "replace the board if a retry fails the same way",
                                      log.text[-2000:])
                attempt.firmware_version = log.version
                want = profile.firmware_version()
                if want and log.version and log.version != want:
                    raise StepFailure(f"the board runs firmware {log.version}, the profile ships {want}",
                                      "retry; if it repeats, check the profile's app image")
            level = ctx.smoke_level or profile.checks.smoke
            if level != "none" and profile.device_class != "other":
                with step("smoke"):
                    _smoke(level, ctx, session, log, mac, attempt, image)
        attempt.outcome = "passed"
    except Aborted:
        attempt.outcome, attempt.failed_step = "aborted", current["step"]
        attempt.error, attempt.remedy = _abort_reason(cancel), "put the board back and start it again"
    except (StepFailure, SessionError, RecordError, SmokeFailure) as exc:
        if cancel.is_set():
            attempt.outcome = "aborted"
            attempt.error, attempt.remedy = _abort_reason(cancel), "put the board back and start it again"
        else:
            attempt.error = getattr(exc, "message", str(exc))
            attempt.remedy = exc.remedy
            attempt.detail = getattr(exc, "detail", None)
        attempt.failed_step = current["step"]
    except Exception as exc:  # a bug must not take the other ports down
        attempt.failed_step = current["step"]
        if cancel.is_set():  # a port closed under esptool by an abort raises whatever esptool raises
            attempt.outcome = "aborted"
            attempt.error, attempt.remedy = _abort_reason(cancel), "put the board back and start it again"
        else:
            attempt.error = f"unexpected error: {exc!r}"
            attempt.remedy = "retry; if it repeats, report it to the station's engineers"
    finally:
        watcher_stop.set()
        session.close()
    attempt.ended_at = now_iso()
    t = time.monotonic()
    attempt_id = ctx.record.add_attempt(attempt)
    attempt.durations["record"] = round(time.monotonic() - t, 3)
    if attempt_id is None:
        note = (f"the database was locked: this attempt is kept in {ctx.record.spool.name} "
                "and added on the next start")
    result = UnitResult(
        port=job.port, outcome=attempt.outcome, failed_step=attempt.failed_step, error=attempt.error,
        remedy=attempt.remedy, mac=attempt.mac, serial=attempt.serial, device_id=attempt.device_id,
        chip=attempt.chip, firmware_version=attempt.firmware_version, durations=dict(attempt.durations),
        attempt_id=attempt_id, written_regions=tuple(attempt.written_regions), note=note)
    emit(UnitFinished(job.port, result))
    return result


def _abort_reason(cancel: threading.Event) -> str:
    # the line's cancel knows whether the board was pulled; a plain Event means the operator
    return getattr(cancel, "reason", "aborted by the operator")


def _assign_serial(job: UnitJob, ctx: StationContext, mac: str) -> str:
    record, profile = ctx.record, ctx.profile
    if job.serial:
        serial = job.serial
        if record.serial_taken(serial, mac):
            raise StepFailure(f"serial {serial} already belongs to another board",
                              "scan the label of this board, or print a new one")
        return serial
    existing = record.unit_by_mac(mac)
    if existing and existing["serial"]:
        return existing["serial"]  # a retried or reworked board keeps its serial
    if not profile.serial_pattern:
        raise StepFailure("this profile takes serials from labels and none was given",
                          "scan the board's label (or pass --serial)")
    now = datetime.now()
    counter = f"{profile.name}:{render_serial(profile.serial_pattern, None, now)}"
    return render_serial(profile.serial_pattern, record.next_counter(counter), now)


def _build_config(ctx: StationContext, attempt: Attempt) -> tuple[bytes | None, bytes | None, dict]:
    profile = ctx.profile
    if profile.device_class == "other" or not profile.keys:
        return None, None, {}
    slot = profile.config_slot()
    if slot is None:
        raise StepFailure(f"partition {profile.config_partition!r} is not in the firmware's table",
                          "fix the profile (station profile check)")
    unit_values = {"serial": attempt.serial, "device_id": attempt.device_id, "mac": attempt.mac}
    entries = []
    for k in profile.keys:
        if k.secret:
            value = ctx.secrets.get(k.secret)
            if value is None:
                if k.optional:
                    continue
                raise StepFailure(f"secret {k.secret!r} is not available", "set it and restart the run")
        elif k.unit:
            value = unit_values[k.unit]
        else:
            value = k.value
        if k.type == "string" and k.max_length and len(str(value).encode()) > k.max_length:
            raise StepFailure(f"value for {k.key!r} is {len(str(value).encode())} bytes; the schema "
                              f"allows {k.max_length}", "fix the profile or the value given")
        entries.append(NvsEntry(k.key, k.type, value))
    keys = None
    if profile.encryption == "per-unit":
        keys = new_keys()
    elif profile.encryption == "per-lot":
        # derived from the station's random key and the lot: one set per lot, never stored
        keys = hmac.new(ctx.key, f"nvs-lot:{profile.name}:{attempt.lot}".encode(), "sha512").digest()
    try:
        image = build_partition(profile.namespace, entries, slot.size, keys)
        back = read_partition(image, keys).get(profile.namespace, {})
    except NvsError as exc:
        raise StepFailure(f"the config partition cannot be built: {exc}", "fix the profile") from None
    want = {e.key: e.value for e in entries}
    if back != want:
        raise StepFailure("the config partition did not read back as built",
                          "report this to the station's engineers: the NVS generator misbehaved")
    attempt.config_sha256 = hashlib.sha256(image).hexdigest()
    token = next((ctx.secrets.get(k.secret) for k in profile.keys if k.key == "token" and k.secret), None)
    if token:
        attempt.token_fingerprint = fingerprint(ctx.key, token)
    return image, keys_partition(keys) if keys else None, want


def _smoke(level: str, ctx: StationContext, session: UnitSession, log, mac: bytes, attempt: Attempt,
           image: bytes | None) -> None:
    profile, settings = ctx.profile, ctx.station.smoke
    reach = ctx.make_reach(settings)
    seen: list[str] = []

    def console() -> str:
        text = session.read_console()
        seen.append(text)
        return text

    try:
        base = reach.open(log, mac, f"{profile.title} AP" if profile.title else None)
        healthcheck(base, settings.timeout_s)
        if level == "pair":
            pair_and_wait(base, profile.device_class, attempt.device_id, settings, ctx.accounts, console)
        soak(console, profile.checks.smoke_soak_s, "".join(seen))
    finally:
        reach.close()
    if level == "pair" and image is not None:
        # put the unit's own configuration back, and check that it boots clean with it
        slot = profile.config_slot()
        session.connect(profile.chip)
        session.prepare_flash(profile.baud)
        session.write(slot.offset, image)
        again = session.boot(profile.checks.boot_timeout_s, profile.checks.boot_settle_s)
        problem = again.problem()
        if problem:
            raise StepFailure(f"after restoring its configuration: {problem}",
                              "retry; replace the board if it repeats", again.text[-2000:])


BAUD_LADDER = (2000000, 1500000, 921600, 460800, 230400, 115200)


def _prepare_at_best_rate(session: UnitSession, ctx: StationContext, port: str, emit: Emit):
    """Start at the profile's rate (or what worked on this port before) and fall back on failure.

    Some USB bridges, and boards at low supply voltage, fail above 460800: the link is
    tried with a few round trips at each rate, and the rate that works is remembered.
    """
    top = ctx.port_baud.get(port, ctx.profile.baud)
    rates = [r for r in BAUD_LADDER if r <= top] or [115200]
    last: SessionError | None = None
    for i, rate in enumerate(rates):
        if i:
            why = f" ({last.detail.splitlines()[0]})" if last and last.detail else ""
            emit(LogLine(port, "station", f"baud {rates[i - 1]} failed on this port{why}; trying {rate}"))
            session.connect(ctx.profile.chip)  # a reset brings the chip back to its ROM at 115200
        try:
            info = session.prepare_flash(rate)
            session.region_md5(0, 0x1000)  # a round trip at the new rate
        except SessionError as exc:
            if not exc.link:
                raise  # the board, not the link: a lower rate will not help
            last = exc
            continue
        ctx.port_baud[port] = rate
        return info, rate
    raise SessionError(f"no baud rate worked on this port (tried {', '.join(map(str, rates))})",
                       "check the USB cable and the fixture's serial bridge", last.detail if last else None)
