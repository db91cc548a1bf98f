"""The pipeline of one unit: the one function the CLI, the screen and the tests call.

The steps are declared once, as data (`STEPS`): each a plain function over the unit's
`UnitRun`, run in order; the screen and the tests take the order from there.
`provision_unit` holds the loop, the one error branch and the record that always runs.

The record is written ahead of the board (station/record.py): the `serial` step commits
the attempt as started and reserves the unit's serial before anything is written to the
board's flash; if that commit fails, the unit ends before flashing and the board is
untouched. Every step's duration is recorded; a failure stops the unit with a message
naming the step and what to do. Nothing here branches on virtual or real boards.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from flashing.errors import UnitError
from flashing.images import ImageError, check_image_bytes, parse_partition_table
from flashing.nvs import NvsEntry, NvsError, build_partition, keys_partition, new_keys, read_partition
from flashing.secure import (KEY_BYTES, Burn, EfuseState, burn_plan, check_state, encrypt_region, open_efuses, read_state, run_burn,
                             sign_image)
from flashing.session import BootLog, ChipIdentity, SessionError, UnitSession, flash_size_bytes

from . import keys as derived
from .config import StationConfig
from .events import Emit, LogLine, Progress, StepFinished, StepStarted, UnitFinished, UnitInfo, UnitResult, redacting
from .profile import Problem, Profile, ProfileError, read_region
from .record import (PARTLY_BURNED_REMEDY, Attempt, Outcome, Record, RecordError, SerialPlan, burns_left, fingerprint,
                     now_iso)
from .secrets import NO_SECRETS, Redactor
from .serials import SerialPattern, SerialPatternError
from .smoke import (FactoryAccounts, UnitAccount, UnitAccounts, healthcheck, make_reach, pair_and_wait, soak,
                    wait_for_address)


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
    redactor: Redactor = NO_SECRETS  # every text leaving provision_unit passes it (station/secrets.py)
    # who else hears every unit's events (redacted), on the unit's own thread, after the front end:
    # a station-wide log, or a test holding a unit at a step (an observer that blocks holds the unit)
    observers: list[Emit] = field(default_factory=list)
    central: object = None  # station/central.py Central: the plant's record, when station.toml has [central]

    def __post_init__(self) -> None:
        if not self.firmware:
            self.firmware = load_firmware(self.profile)
        # what every attempt records: the hashes of the very bytes this context flashes
        self.firmware_hashes = {f"0x{off:x}": hashlib.sha256(data).hexdigest() for _, off, data in self.firmware}
        self.app_version = _app_version(self.firmware)
        self._signed: list[tuple[str, int, bytes]] | None = None
        self._signing = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._outgrown: list[ThreadPoolExecutor] = []  # smaller pools, ending with their last units

    def signed_firmware(self) -> list[tuple[str, int, bytes]]:
        """The firmware with its bootloader and app images signed for Secure Boot v2, signed once per context."""
        with self._signing:
            if self._signed is None:
                self._signed = [(name, off, sign_image(data, self.station.secure_boot_key) if data[:1] == b"\xe9"
                                 else data) for name, off, data in self.firmware]
            return self._signed

    def unit_accounts(self) -> UnitAccounts:
        """Where each unit's own test-broker account is made (and deleted)."""
        return UnitAccounts(self.station.smoke, self.accounts or FactoryAccounts.from_settings(self.station.smoke))

    def workers(self, n: int) -> ThreadPoolExecutor:
        """Threads for running units, kept across batches (one per port at the most)."""
        if self._pool is None or self._pool._max_workers < n:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._outgrown.append(self._pool)
            self._pool = ThreadPoolExecutor(max_workers=max(n, 4), thread_name_prefix="unit")
        return self._pool

    def close(self) -> None:
        """Wait for the units still running, end the unit threads and close the record."""
        pools = [*self._outgrown, self._pool] if self._pool else self._outgrown
        self._pool, self._outgrown = None, []
        for pool in pools:
            pool.shutdown(wait=True)
        self.record.release_session()  # every attempt of this context has its finish (or its spool line)
        if self.central is not None:
            self.central.close()  # one last push of what this context recorded, bounded by its timeout
            self.central = None
        self.record.close()


def load_firmware(profile: Profile) -> list[tuple[str, int, bytes]]:
    """Each region's file read once, checked against its pin: these bytes are what every unit gets.

    `station profile check` read the files too, but a file swapped since then must not be
    flashed under the pinned hash: ProfileError names it, and nothing is flashed.
    """
    out, problems = [], []
    for r in profile.regions:
        data, problem = read_region(r, ": the file changed after the profile was loaded; nothing was flashed")
        if problem is not None:
            problems.append(problem)
        if data is not None:
            out.append((r.name, r.offset, data))
    table_at = profile.partition_table_offset
    table = next((data for _, off, data in out if off == table_at), None)
    if not problems and table is not None and profile.partitions:
        try:
            same = tuple(parse_partition_table(table)) == tuple(profile.partitions)
        except ImageError:
            same = False
        if not same:  # the layout the config offsets come from is the one being flashed
            problems.append(Problem(str(profile.path), f"firmware region 0x{table_at:x}", "the partition table "
                                    "changed after the profile was loaded; load the profile again"))
    if problems:
        raise ProfileError(problems)
    return out


def _app_version(firmware: list[tuple[str, int, bytes]]) -> str | None:
    """The version in the app image this context flashes (not the file as it is now)."""
    for name, _, data in firmware:
        if name == "app":
            try:
                info = check_image_bytes(data)
            except ImageError:
                return None
            return info.app.version if info.app else None
    return None


class StepFailure(UnitError):
    """The board failed a step (or is not the board this profile is for)."""


class StationFault(UnitError):
    """The station's set-up, not the board, stopped the unit."""

    station_fault = True


class Aborted(Exception):
    """The operator (or a signal) asked the unit to stop."""


ABORTED_TEXT = ("aborted by the operator", "put the board back and start it again")


def os_operator() -> str:
    """Who runs a unit when no operator was given (`station flash`, the Python API): the OS login name."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment nor the password database
        return f"uid {os.getuid()}"


def device_id_from_mac(mac: bytes) -> str:
    """The 2Smart SDK's device id: the Wi-Fi MAC in lower case with dashes."""
    return "-".join(f"{b:02x}" for b in mac)


def serial_max_length(profile: Profile) -> int | None:
    """The config key's limit on the unit's serial (None: no serial key, no limit)."""
    return next((k.max_length for k in profile.keys if k.unit == "serial"), None)


def clean_serial(text: str, max_length: int | None = None) -> str:
    """A serial from a label or the command line, trimmed; ValueError says what is wrong with it."""
    serial = text.strip()
    if not serial:
        raise ValueError("empty serial")
    if any(not c.isprintable() or c.isspace() for c in serial):
        raise ValueError("a serial has no spaces or control characters")
    if max_length is not None and len(serial.encode()) > max_length:
        raise ValueError(f"{len(serial.encode())} bytes; the profile's serial key holds {max_length}")
    return serial


class _UnitSink:
    """esptool's progress and messages for this unit, turned into events."""

    def __init__(self, port: str, emit: Emit):
        self.port, self.emit = port, emit
        self.region = ""
        self.base = 0
        self.size = 0
        self.total = 0
        self._last = 0.0

    def on_region(self, name: str, done: int, size: int, total: int) -> None:
        self.region, self.base, self.size, self.total = name, done, size, total
        self.emit(Progress(self.port, "flash", done, total, name))

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        self.emit(Progress(self.port, "flash", self.base + int(frac * self.size), self.total, self.region))

    def message(self, text: str) -> None:
        self.emit(LogLine(self.port, "esptool", text))


class _UnitRedactor:
    """The station's redaction filter for one unit, which also learns the secrets made for it."""

    def __init__(self, base: Redactor):
        self.current = base

    def learn(self, values) -> None:
        self.current = self.current.with_values(values)

    def __call__(self, text: str) -> str:
        return self.current(text)


@dataclass
class UnitRun:
    """Everything one unit's run knows so far; the steps read and fill it in."""

    job: UnitJob
    ctx: StationContext
    emit: Emit
    cancel: threading.Event
    attempt: Attempt
    session: UnitSession
    sink: _UnitSink
    mac: bytes = b""
    started: bool = False  # the record holds this attempt as started (write-ahead committed)
    info: ChipIdentity | None = None
    config_image: bytes | None = None
    keys_image: bytes | None = None
    boot_log: BootLog | None = None
    broker_account: UnitAccount | None = None  # this unit's own test-broker account, while it exists
    redact: _UnitRedactor | None = None  # the unit's redaction filter (learns its test account)
    credentials_on_unit: bool = False  # from /pair until the unit's own config is back and checked
    was_quarantined: bool = False  # an earlier attempt left test credentials on this board
    plant_serial: str | None = None  # the serial this board passed with at another station (central record)
    flash_key: bytes | None = None  # the unit's flash-encryption key (a secret: the redactor knows it)
    firmware: list[tuple[str, int, bytes]] | None = None  # what this unit gets when not the context's bytes
    late_burns: list = field(default_factory=list)  # (Burn, its record entry) made after the flash is written
    efuses: tuple | None = None  # (the esptool session's loader, espefuse's commands over it): see _efuses
    chip_key: dict | None = None  # [security] key = "chip": the record entry of the chip's own first-boot burns
    encrypt_writes: bool = False  # the ROM encrypts what the station writes (a chip-key unit re-flashed)

    @property
    def port(self) -> str:
        return self.job.port


# -- the steps ---------------------------------------------------------------------------------

def connect(run: UnitRun) -> None:
    run.session.open()
    ident = run.session.connect(run.ctx.profile.chip)
    run.attempt.chip = ident.chip
    if ident.secure_download:
        raise StepFailure("the board is in Secure Download Mode: its flash cannot be read back or verified",
                          "set it aside for the secured-device process")
    run.mac = ident.mac
    run.attempt.mac = ":".join(f"{b:02x}" for b in ident.mac)
    run.attempt.device_id = device_id_from_mac(ident.mac)
    run.emit(UnitInfo(run.port, run.attempt.mac, run.attempt.chip))
    # known as soon as the MAC is: an attempt that ends early still carries the quarantine on
    try:
        run.was_quarantined = run.ctx.record.quarantined(run.attempt.mac)
    except RecordError:  # a locked record: the serial step says so; the flash step rewrites the config anyway
        run.was_quarantined = False
    if run.was_quarantined:
        run.emit(LogLine(run.port, "station", "an earlier attempt left test credentials on this board: "
                         "its own configuration is written again"))


def identify(run: UnitRun) -> None:
    profile = run.ctx.profile
    run.info, run.attempt.baud = _prepare_at_best_rate(run.session, run.ctx, run.port, run.emit)
    need = profile.needed_flash()
    have = flash_size_bytes(run.info.flash_size)
    if have and have < need:
        raise StepFailure(f"the board has {run.info.flash_size} of flash; the firmware needs "
                          f"{need // (1024 * 1024) or 1}MB",
                          "set it aside: it carries the wrong module for this product")


def guard(run: UnitRun) -> None:
    central = run.ctx.central
    if run.job.rework and central is None:
        return
    if central is None:
        prior = run.ctx.record.passed_unit(mac=run.attempt.mac)
    else:  # the plant's record first: a board that passed at another station is refused here too
        answer = central.passed_anywhere(run.attempt.mac)
        prior, run.attempt.guard = answer.prior, answer.where
        if answer.why:
            run.emit(LogLine(run.port, "guard", f"local only: {answer.why}"))
        if run.job.rework:  # re-provisioned on purpose: it keeps the serial it passed with, wherever that was
            run.plant_serial = prior["serial"] if prior else None
            return
    if prior:
        where = prior.get("station_id")
        elsewhere = f" at station {where}" if where and where != run.ctx.station.station_id else ""
        raise StepFailure(f"this board ({run.attempt.mac}) already passed{elsewhere} as {prior['serial']}",
                          "put it with the finished units, or re-provision it on purpose (--rework)")


def reserve_serial(run: UnitRun) -> None:
    """The write-ahead commit: the serial is reserved and the attempt recorded as started."""
    profile, now = run.ctx.profile, datetime.now()
    if run.job.serial or run.plant_serial:
        plan = SerialPlan(given=run.job.serial or run.plant_serial)
    elif profile.serial_pattern:
        pattern, station = SerialPattern.parse(profile.serial_pattern), run.ctx.station.station_id
        try:
            counter = pattern.counter_name(now, station)
        except SerialPatternError as exc:  # open_station refuses this before any unit; the Python API may not
            raise StationFault(str(exc), "call the station's engineer: fix station.toml's station_id or the "
                               "profile's serial pattern; no board was touched") from None
        plan = SerialPlan(counter=f"{profile.name}:{counter}", render=lambda seq: pattern.render(seq, now, station),
                          max_value=pattern.max_seq)
        if run.ctx.central is not None:  # a serial block for today, and tomorrow's leased ahead
            tomorrow = f"{profile.name}:{pattern.counter_name(now + timedelta(days=1), station)}"
            run.ctx.central.need_serials(plan.counter, plan.max_value,
                                         (tomorrow,) if tomorrow != plan.counter else ())
    else:
        plan = SerialPlan()
    run.ctx.record.start(run.attempt, plan)
    run.started = True
    run.emit(UnitInfo(run.port, serial=run.attempt.serial))


def build_config(run: UnitRun) -> None:
    run.config_image, run.keys_image, _ = _build_config(run.ctx, run.attempt)


def secure(run: UnitRun) -> None:
    """Flash encryption for this unit: its key, each eFuse burn journaled before it runs, its regions encrypted.

    A board already encrypted is reworked (development: with its escrowed key) or refused (release).
    """
    ctx, a = run.ctx, run.attempt
    chip, mode = ctx.profile.chip, ctx.profile.flash_encryption
    a.flash_encryption = mode
    state = read_state(_efuses(run), chip)
    if ctx.profile.flash_key == "chip":
        _chip_key(run, state)
        return
    if state.encrypted or state.key_present:
        key = _rework_key(run, state)
    else:
        key = _burn_new_key(run)
    plain = ctx.signed_firmware() if ctx.profile.secure_boot else ctx.firmware
    run.firmware = [(name, off, encrypt_region(chip, key, off, data)) for name, off, data in plain]
    if run.keys_image is not None:  # the NVS keys are flash-encrypted, as ESP-IDF's nvs_keys partition is
        kslot = next(p for p in ctx.profile.partitions if p.name == ctx.profile.keys_partition)
        run.keys_image = encrypt_region(chip, key, kslot.offset, run.keys_image)


def _chip_key(run: UnitRun, state: EfuseState) -> None:
    """[security] key = "chip": the unit's bootloader makes the key on its first boot; the station burns nothing.

    The record says so ahead of that boot (the `boot` step marks it burning, then done once
    the eFuses and the flash read back encrypted). A unit already encrypted is re-flashed
    through the ROM's own encryption (development) or refused (release).
    """
    a = run.attempt
    if state.encrypted or state.key_present:
        _refuse_rework(run, state, interrupted="an earlier first boot was interrupted",
                       key_where="its key never left the chip")
        run.encrypt_writes = True
        run.emit(LogLine(run.port, "secure", "flash already encrypted with the chip's own key (development mode): "
                         "re-flashed with esptool --encrypt, the chip encrypting"))
        return
    words = "key block (read- and write-protected), the crypt count and the mode's security eFuses"
    run.chip_key = {"burn": f"chip (by the unit's bootloader on its first boot: {words})", "state": "pending"}
    a.burns = [run.chip_key]
    run.ctx.record.note_burns(a)  # the record knows the key is the chip's before the board is written
    run.emit(LogLine(run.port, "secure", "the chip makes its own key on its first boot: nothing is burned from "
                     "the station, and the key is never stored anywhere"))


def _check_chip_encrypted(run: UnitRun) -> None:
    """After the first boot: the eFuses and the flash, read back over esptool, say the chip encrypted itself."""
    profile, session = run.ctx.profile, run.session
    session.connect(profile.chip)
    session.prepare_flash(run.attempt.baud or profile.baud)
    problems = check_state(read_state(_efuses(run), profile.chip), profile.flash_encryption, chip_key=True)
    app = next((r for r in run.ctx.firmware if r[2][:1] == b"\xe9" and r[1] >= 0x10000), None)
    if app is not None and session.read(app[1], 64) == app[2][:64]:
        problems.append("the app reads back as plaintext")
    if run.keys_image is not None:
        kslot = next(p for p in profile.partitions if p.name == profile.keys_partition)
        if session.read(kslot.offset, 64) == run.keys_image[:64]:
            problems.append("the NVS keys read back as plaintext")
    if problems:
        raise StepFailure(f"the unit did not encrypt itself as the profile says: {'; '.join(problems)}",
                          "set the board aside for the engineer: its eFuses cannot be undone")
    _check_sealed(run)


def _key_forms(key: bytes) -> list[str]:
    """The ways a raw key shows up in text: hex either case, base64 and base64url, padded or not.

    Each in the key's order and in the eFuse block's (espefuse burns and shows a key reversed). The
    redactor matches these forms as written: a hex key in capitals is a form of its own.
    """
    forms = []
    for k in (key, key[::-1]):
        forms += [k.hex(), k.hex().upper()]
        forms += [enc(k).decode().rstrip("=") for enc in (base64.b64encode, base64.urlsafe_b64encode)]
    return forms


def _burn_new_key(run: UnitRun) -> bytes:
    ctx, a = run.ctx, run.attempt
    chip, mode = ctx.profile.chip, ctx.profile.flash_encryption
    key = os.urandom(KEY_BYTES)  # the station's CSPRNG: one key per unit
    run.flash_key = key
    run.redact.learn(_key_forms(key))
    if mode == "development":  # sealed before the first burn: a unit whose key burned always has its escrow
        a.key_escrow = derived.escrow(ctx.key, a.uid, key)
    plan = burn_plan(chip, mode, ctx.profile.secure_boot)
    a.burns = [{"burn": b.describe(), "state": "pending"} for b in plan]
    ctx.record.note_burns(a)  # the whole plan, committed before the first burn
    # release mode's burns come last, after the ciphertext is written and read back (the flash step):
    # esptool refuses plain writes once DIS_DOWNLOAD_MANUAL_ENCRYPT is burned
    planned = list(zip(plan, a.burns))
    run.late_burns = [(b, e) for b, e in planned if b.after_flash]
    _make_burns(run, [(b, e) for b, e in planned if not b.after_flash], key)
    _check_burned(run, "development")  # encryption on, no release disable yet
    return key


def _efuses(run: UnitRun):
    """The unit's espefuse commands, opened once per esptool session (opening costs ~0.2 s of CPU)."""
    esp = run.session.esp
    if run.efuses is None or run.efuses[0] is not esp:
        run.efuses = (esp, open_efuses(esp))
    return run.efuses[1]


def _make_burns(run: UnitRun, burns: list[tuple[Burn, dict]], key: bytes) -> None:
    """Each burn journaled as burning before espefuse runs it, and as done after."""
    record, a = run.ctx.record, run.attempt
    for b, entry in burns:
        run.emit(LogLine(run.port, "secure", f"burning {b.describe()}"))
        if run.cancel.is_set():  # asked before this burn, or as it was announced: it does not run
            raise Aborted()
        entry["state"] = "burning"
        record.note_burns(a)  # RecordError: this burn does not run
        run_burn(_efuses(run), run.ctx.profile.chip, b, key, run.ctx.station.secure_boot_key)
        entry["state"] = "done"
        record.note_burns(a)


def _check_burned(run: UnitRun, mode: str) -> None:
    problems = check_state(read_state(_efuses(run), run.ctx.profile.chip), mode, run.ctx.profile.secure_boot)
    if problems:
        raise StepFailure(f"the eFuses read back do not match the profile: {'; '.join(problems)}",
                          "set the board aside for the engineer: its burns cannot be undone")


def _refuse_rework(run: UnitRun, state: EfuseState, interrupted: str, key_where: str) -> None:
    """Espressif's rules for a board found with a flash-encryption key: what happened to it is said first."""
    if not state.encrypted:  # on a release profile too, this is what the board is
        raise StepFailure(f"this unit has a flash-encryption key burned but encryption is not on: {interrupted}",
                          "set it aside for the engineer (espefuse summary); nothing was written")
    if state.release or run.ctx.profile.flash_encryption == "release":
        raise StepFailure(f"this unit's flash encryption is in release mode: it cannot be re-flashed ({key_where} "
                          "and the ROM's encrypted download is disabled)",
                          "set it aside: a release-mode unit is never reworked; nothing was written")


def _rework_key(run: UnitRun, state: EfuseState) -> bytes:
    """The key of a board whose flash is already encrypted: Espressif's rules for re-flashing it."""
    ctx, a = run.ctx, run.attempt
    _refuse_rework(run, state, interrupted="an earlier set-up was interrupted between its burns",
                   key_where="its key was never stored")
    found = ctx.record.escrowed_key(a.mac)
    if found is None:
        raise StepFailure("this unit's flash is encrypted with a key this station does not hold",
                          "set it aside: only the station that escrowed its key can re-flash it; nothing was written")
    uid, sealed = found
    try:
        key = derived.unescrow(ctx.key, uid, sealed)
    except Exception:  # InvalidTag or a damaged escrow: the record's word is not a usable key
        raise StationFault("the escrowed flash-encryption key of this unit does not open with the station's key",
                           "call the station's engineer (station db verify); nothing was written") from None
    run.flash_key = key
    run.redact.learn(_key_forms(key))
    a.key_escrow = derived.escrow(ctx.key, a.uid, key)  # this attempt's row holds it too, sealed to its uid
    run.emit(LogLine(run.port, "secure", "flash already encrypted (development mode): re-flashed with its "
                     "escrowed key"))
    return key


def _check_sealed(run: UnitRun) -> None:
    """Read the config and keys back over esptool: no secret and no parsable NVS may be there in plaintext."""
    profile = run.ctx.profile
    slot = profile.config_slot()
    if slot is None or run.config_image is None:
        return
    raw = run.session.read(slot.offset, slot.size)
    secrets = [v.encode() for k in profile.keys if k.secret and (v := run.ctx.secrets.get(k.secret))]
    leaked = any(v in raw for v in secrets)
    try:
        read_partition(raw)
        parsed = True
    except NvsError:
        parsed = False
    if leaked or parsed:
        raise StepFailure("the config partition reads back " + ("with a secret in plaintext" if leaked else
                          "as plaintext NVS") + " although flash encryption is on",
                          "set the board aside and call the station's engineer: the profile's NVS encryption "
                          "did not take")


def flash(run: UnitRun) -> None:
    profile = run.ctx.profile
    regions = list(run.firmware if run.firmware is not None else run.ctx.firmware)
    if run.config_image is not None:
        regions.append(("config", profile.config_slot().offset, run.config_image))
    if run.keys_image is not None:
        kslot = next(p for p in profile.partitions if p.name == profile.keys_partition)
        regions.append(("nvs_keys", kslot.offset, run.keys_image))
    # a chip-key unit re-flashed: everything but the config (NVS-encrypted, never flash-encrypted) through --encrypt
    encrypt = [name for name, _, _ in regions if name != "config"] if run.encrypt_writes else ()
    run.attempt.written_regions = run.session.write_regions(regions, run.sink.on_region, encrypt)
    if run.config_image is not None:
        run.was_quarantined = False  # the config region now is this unit's own (written or MD5-equal)
    if run.flash_key is not None:
        _check_sealed(run)
    if run.late_burns:
        _make_burns(run, run.late_burns, run.flash_key)
        run.late_burns = []
        _check_burned(run, run.ctx.profile.flash_encryption)
    if run.flash_key is not None:
        run.emit(LogLine(run.port, "secure", f"flash encryption on ({run.ctx.profile.flash_encryption} mode): "
                         "eFuses read back as the profile says"))


def boot(run: UnitRun) -> None:
    profile = run.ctx.profile
    entry = run.chip_key
    if entry is not None:  # this boot makes the chip burn its key: recorded before it
        entry["state"] = "burning"
        run.ctx.record.note_burns(run.attempt)
    log = _boot_once(run)
    if entry is not None:
        if not log.encrypted_on_boot:
            raise StepFailure("the unit booted without encrypting itself: its bootloader is not built with flash "
                              "encryption", "check the profile's bootloader (station profile check)", log.text[-2000:])
        _check_chip_encrypted(run)
        entry["state"] = "done"
        run.ctx.record.note_burns(run.attempt)
        run.emit(LogLine(run.port, "secure", f"flash encryption on ({profile.flash_encryption} mode, the chip's "
                         "own key): eFuses and flash read back encrypted"))
        run.chip_key = None
        log = _boot_once(run)  # back into the app, for the smoke test
    run.attempt.firmware_version = log.version
    want = run.ctx.app_version
    if want and log.version and log.version != want:
        raise StepFailure(f"the board runs firmware {log.version}, the profile ships {want}",
                          "retry; if it repeats, check the profile's app image")


def _boot_once(run: UnitRun) -> BootLog:
    profile = run.ctx.profile
    log = run.session.boot(profile.checks.boot_timeout_s, profile.checks.boot_settle_s)
    run.boot_log = log
    for line in log.text.splitlines():
        run.emit(LogLine(run.port, "boot", line))
    problem = log.problem()
    if problem:
        raise StepFailure(problem, log.remedy(), log.text[-2000:])
    return log


def smoke(run: UnitRun) -> None:
    level = run.ctx.smoke_level or run.ctx.profile.checks.smoke
    _smoke(level, run)


def _secure_on(run: UnitRun) -> bool:
    return run.ctx.profile.flash_encryption != "off"


def _boot_on(run: UnitRun) -> bool:
    return run.ctx.profile.checks.boot or run.chip_key is not None  # the chip's key is verified after its boot


def _smoke_on(run: UnitRun) -> bool:
    level = run.ctx.smoke_level or run.ctx.profile.checks.smoke
    return _boot_on(run) and level != "none" and run.ctx.profile.device_class != "other"


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[UnitRun], None]
    when: Callable[[UnitRun], bool] = lambda run: True


STEPS: tuple[Step, ...] = (
    Step("connect", connect),
    Step("identify", identify),
    Step("guard", guard),
    Step("serial", reserve_serial),  # write-ahead: nothing irreversible before this commit
    Step("config", build_config),
    Step("secure", secure, _secure_on),  # eFuse burns, each journaled before it runs; then the regions encrypted
    Step("flash", flash),
    Step("boot", boot, _boot_on),
    Step("smoke", smoke, _smoke_on),
)
SECURE_STEPS = ("secure",)  # the steps a profile without [security] skips
# every step a unit's durations can name, in order: the record is always the last
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS) + ("record",)


NATIVE_USB = {"auto": None, "usb-serial-jtag": True, "uart-bridge": False}  # None: the port's VID:PID tells


def provision_unit(job: UnitJob, ctx: StationContext, emit: Emit,
                   cancel: threading.Event | None = None) -> UnitResult:
    """Provision the board on `job.port` once; never raises for a unit's failure."""
    redact = _UnitRedactor(ctx.redactor)
    # the one way out for this unit's events: no secret passes, to the front end or an observer
    emit = redacting(_heard_by(ctx.observers, emit), redact)
    cancel = cancel or threading.Event()
    profile = ctx.profile
    attempt = Attempt(port=job.port, station_id=ctx.station.station_id, profile=profile.name,
                      profile_hash=profile.content_hash, started_at=now_iso(),
                      operator=job.operator.strip() or os_operator(),  # every attempt names who ran it
                      lot=job.lot or ctx.station.lot or profile.lot,
                      rework=job.rework, firmware_hashes=dict(ctx.firmware_hashes), baud=profile.baud)
    sink = _UnitSink(job.port, emit)
    session = UnitSession(job.port, sink, cancelled=cancel.is_set, native_usb=NATIVE_USB[profile.connection])
    run = UnitRun(job, ctx, emit, cancel, attempt, session, sink, redact=redact)
    current = STEPS[0].name
    watcher_stop = threading.Event()

    def watch_cancel() -> None:
        # an abort closes the port: esptool fails at once instead of finishing the write
        while not watcher_stop.wait(0.05):
            if cancel.is_set():
                session.close()
                return

    watcher = threading.Thread(target=watch_cancel, daemon=True, name=f"unit-cancel-{job.port}")
    watcher.start()
    try:
        for step in STEPS:
            if not step.when(run):
                continue
            if cancel.is_set():
                raise Aborted()
            current = step.name
            emit(StepStarted(job.port, current))
            t, ok = time.monotonic(), False
            try:
                if cancel.is_set():  # asked while the step was announced: it does not run
                    raise Aborted()
                step.run(run)
                ok = True
            finally:
                seconds = round(time.monotonic() - t, 3)
                attempt.durations[current] = seconds
                emit(StepFinished(job.port, current, seconds, ok))
        if cancel.is_set():  # the last step ran to its end past an abort: the operator's word stands
            raise Aborted()
        attempt.outcome = Outcome.PASSED
    except BaseException as exc:  # the one error branch: every way a unit can end
        attempt.failed_step = current
        attempt.outcome, attempt.error, attempt.remedy, attempt.detail = _how_it_ended(exc, cancel)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt/SystemExit in a worker: recorded below by the finally
    finally:
        watcher_stop.set()
        watcher.join()  # before a restore reopens the port, so no late abort closes it again
        if attempt.outcome == Outcome.STARTED:  # a BaseException escaped the branch above
            attempt.outcome, attempt.error, attempt.remedy = Outcome.ABORTED, *ABORTED_TEXT
        if run.broker_account is not None or run.credentials_on_unit:
            _take_back_after_failure(run)
        session.close()
        _mark_quarantine(run)
        partly = burns_left(attempt) if attempt.outcome != Outcome.PASSED else None
        if partly:  # a unit stopped between its burns: the auditor and the operator see exactly which
            attempt.error = f"{attempt.error}; {partly}" if attempt.error else partly
            attempt.remedy = PARTLY_BURNED_REMEDY
        attempt.ended_at = now_iso()
        redact.current.fields(attempt)  # the record's texts (error, remedy, detail) hold no secret either
        t = time.monotonic()
        written = ctx.record.finish(attempt) if run.started else ctx.record.add(attempt)
        attempt.durations["record"] = round(time.monotonic() - t, 3)
        if ctx.central is not None:
            ctx.central.kick()  # the finish goes central now, not at the next interval
    recorded = "database" if written.attempt_id is not None else "spool" if written.spooled else "lost"
    if recorded == "lost" and run.started:
        # the record holds it as started, so it shows as interrupted: say so now, at the line
        attempt.outcome, attempt.failed_step = Outcome.ERROR, "record"
        attempt.error = f"the unit's result could not be recorded ({written.problem})"
        attempt.remedy = ("call the station's engineer; put this board aside: it shows as interrupted, "
                          "with its serial, until it is run again")
    result = UnitResult(
        port=job.port, outcome=str(attempt.outcome), failed_step=attempt.failed_step, error=attempt.error,
        remedy=attempt.remedy, mac=attempt.mac, serial=attempt.serial, device_id=attempt.device_id,
        chip=attempt.chip, firmware_version=attempt.firmware_version, durations=dict(attempt.durations),
        attempt_id=written.attempt_id, written_regions=tuple(attempt.written_regions), note=written.note,
        recorded=recorded, quarantine=attempt.quarantine)
    emit(UnitFinished(job.port, result))
    return result


def _heard_by(observers: list[Emit], emit: Emit) -> Emit:
    def both(event) -> None:
        emit(event)  # the front end first: a unit held by an observer shows the step it is held in
        for observe in list(observers):
            observe(event)
    return both


def _how_it_ended(exc: BaseException, cancel: threading.Event) -> tuple[Outcome, str, str, str | None]:
    """Outcome, message, remedy and detail for a unit that stopped with `exc`."""
    if isinstance(exc, UnitError) and exc.station_fault:
        return Outcome.ERROR, exc.message, exc.remedy, exc.detail  # even during an abort: say so
    if isinstance(exc, Aborted) or cancel.is_set() or not isinstance(exc, Exception):
        # the line's cancel knows whether the board was pulled; a plain Event means the operator
        return Outcome.ABORTED, getattr(cancel, "reason", ABORTED_TEXT[0]), ABORTED_TEXT[1], None
    if isinstance(exc, UnitError):
        return Outcome.FAILED, exc.message, exc.remedy, exc.detail
    # a bug must not take the other ports down, nor be charged to the board
    return (Outcome.ERROR, f"station error: {exc!r}",
            "call the station's engineer; the board can be retried", None)


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
        if not attempt.lot:  # an empty lot would be one set of keys for every lot-less unit, forever
            raise StationFault("per-lot NVS keys need a lot, and this unit has none",
                               "give the lot (--lot, F10, station.toml or the profile's lot) and retry")
        # derived from the station's key for this purpose and the lot: one set per lot, never stored
        keys = derived.derive(ctx.key, f"{derived.NVS_LOT_KEYS}/{profile.name}/{attempt.lot}", 64)
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
        attempt.token_fingerprint = fingerprint(derived.derive(ctx.key, derived.TOKEN_FINGERPRINT), token)
    return image, keys_partition(keys) if keys else None, want


def _smoke(level: str, run: UnitRun) -> None:
    ctx, session = run.ctx, run.session
    profile, settings = ctx.profile, ctx.station.smoke
    reach = ctx.make_reach(settings)
    seen: list[str] = []

    def console() -> str:
        text = session.read_console()
        seen.append(text)
        return text

    try:
        if not settings.url:  # the address comes from the console
            run.boot_log = wait_for_address(run.boot_log, console, settings.timeout_s, run.cancel.is_set)
        base = reach.open(run.boot_log, run.mac, f"{profile.title} AP" if profile.title else None)
        healthcheck(base, settings.timeout_s, run.cancel.is_set)
        if level == "pair":
            run.broker_account = ctx.unit_accounts().create(run.attempt.device_id)
            run.redact.learn([run.broker_account.token, run.broker_account.email])
            run.credentials_on_unit = True  # from the request on, the unit may hold them
            pair_and_wait(base, profile.device_class, run.attempt.device_id, settings, ctx.accounts,
                          run.broker_account, console, run.cancel.is_set)
        soak(console, profile.checks.smoke_soak_s, "".join(seen))
    finally:
        reach.close()
    if level == "pair":
        problems = _take_back(run)
        if problems:
            raise problems[0]
        again = session.boot(profile.checks.boot_timeout_s, profile.checks.boot_settle_s)
        problem = again.problem()
        if problem:
            raise StepFailure(f"after restoring its configuration: {problem}",
                              "retry; replace the board if it repeats", again.text[-2000:])


QUARANTINE = "test credentials left on unit: quarantine"


def _own_config(run: UnitRun) -> tuple[int, bytes] | None:
    """Where the unit's own configuration goes and what it is (erased flash when it has none)."""
    slot = run.ctx.profile.config_slot()
    if slot is None:
        return None
    return slot.offset, run.config_image if run.config_image is not None else b"\xff" * slot.size


def _take_back(run: UnitRun) -> list[UnitError]:
    """Delete the unit's test account, then write its own configuration back and check it by MD5.

    Returns what went wrong (nothing: the unit holds no test credentials any more). A port
    closed by an abort is opened again; a board that is gone cannot be restored.
    """
    problems: list[UnitError] = []
    if run.broker_account is not None:
        account, run.broker_account = run.broker_account, None
        try:
            run.ctx.unit_accounts().delete(account)
        except UnitError as exc:
            problems.append(exc)
    if run.credentials_on_unit:
        own = _own_config(run)
        if own is None:
            problems.append(StepFailure("the profile names no config partition to restore",
                                        "fix the profile (station profile check)"))
            return problems
        offset, image = own
        session, profile = run.session, run.ctx.profile
        try:
            if session.serial is None:  # closed by an abort: the board may still be there
                session.open()
            session.connect(profile.chip)
            session.prepare_flash(run.attempt.baud or profile.baud)
            session.write(offset, image)
            if session.region_md5(offset, len(image)) != hashlib.md5(image).hexdigest():
                raise StepFailure("the restored configuration does not read back as written",
                                  "retry; replace the board if it repeats")
        except UnitError as exc:
            problems.append(exc)
        else:
            run.credentials_on_unit = False
            run.emit(LogLine(run.port, "station", "the unit's own configuration is back (checked by MD5)"))
    return problems


def _take_back_after_failure(run: UnitRun) -> None:
    """The same, on a unit that already failed or was aborted: what still went wrong joins its error."""
    try:
        problems = _take_back(run)
    except Exception as exc:  # a bug here must not lose the unit's record
        problems = [StationFault(f"station error while restoring: {exc!r}", "call the station's engineer")]
    if problems:
        a = run.attempt
        words = "; ".join(p.message for p in problems)
        a.error = f"{a.error}; {words}" if a.error else words
        a.detail = "\n".join(filter(None, [a.detail, *(p.detail for p in problems)])) or None


def _mark_quarantine(run: UnitRun) -> None:
    a = run.attempt
    a.quarantine = run.credentials_on_unit or run.was_quarantined
    if not a.quarantine:
        return
    why = "an earlier attempt left them and this one did not rewrite the configuration" \
        if not run.credentials_on_unit else "the unit's own configuration could not be written back"
    a.error = f"{a.error}; {QUARANTINE} ({why})" if a.error else f"{QUARANTINE} ({why})"
    a.remedy = ("set this board aside in quarantine: it can reach the factory's test broker; run it again "
                "(its configuration is rewritten first) or erase its flash")


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
