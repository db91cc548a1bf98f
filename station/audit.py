"""Exports an auditor can trust: filtered, hashed, signed, verifiable without the station.

Every export writes the data file (CSV or JSON lines), a manifest (station id, time,
filters, row count, SHA-256 of the data file, the chain head it was taken at) and an
Ed25519 signature of the manifest made with the station's key, plus the station's
public key in PEM. Anyone can check them with OpenSSL:

    openssl pkeyutl -verify -pubin -inkey units.csv.pub.pem -rawin \\
        -in units.csv.manifest.json -sigfile units.csv.manifest.sig
    openssl dgst -sha256 units.csv      # equals the manifest's "sha256"
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .record import EXPORT_FIELDS, Record, now_iso

ATTEMPT_FIELDS = EXPORT_FIELDS + ["failed_step", "error", "row_hash"]


@dataclass(frozen=True)
class ExportFilter:
    since: str | None = None
    until: str | None = None
    profile: str | None = None
    outcome: str | None = None  # None: provisioned units; passed|failed|aborted|any: attempts
    operator: str | None = None
    station: str | None = None
    lot: str | None = None


class AuditError(Exception):
    pass


def signing_key(path: Path) -> Ed25519PrivateKey:
    """The station's Ed25519 key (created on first use, readable by the station only)."""
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return key


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def select_rows(record: Record, f: ExportFilter) -> Iterator[dict]:
    if f.outcome is None:
        sql = ("select a.* from attempts a join units u on u.id = a.unit_id "
               "where a.outcome = 'passed' and u.state = 'provisioned' and a.id = ("
               "select max(id) from attempts where unit_id = u.id and outcome = 'passed')")
    elif f.outcome == "any":
        sql = "select a.* from attempts a where 1"
    else:
        sql = "select a.* from attempts a where a.outcome = :outcome"
    for col, key in (("a.ended_at >= :since", "since"), ("a.ended_at < :until", "until"),
                     ("a.profile = :profile", "profile"), ("a.operator = :operator", "operator"),
                     ("a.station_id = :station", "station"), ("a.lot = :lot", "lot")):
        if getattr(f, key) is not None:
            sql += f" and {col}"
    yield from record.db().query(sql + " order by a.id", asdict(f))


def paths(data: Path) -> tuple[Path, Path, Path]:
    return (data.with_name(data.name + ".manifest.json"), data.with_name(data.name + ".manifest.sig"),
            data.with_name(data.name + ".pub.pem"))


def _write_rows(rows: Iterable[dict], out: Path, fmt: str, fields: list[str]) -> tuple[int, str]:
    digest = hashlib.sha256()
    count = 0

    class Hashing:
        def __init__(self, f):
            self.f = f

        def write(self, s: str) -> int:
            b = s.encode()
            digest.update(b)
            self.f.write(b)
            return len(s)

    with open(out, "wb") as raw:
        f = Hashing(raw)
        if fmt == "csv":
            w = csv.DictWriter(f, fields, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for row in rows:
                w.writerow(row)
                count += 1
        else:
            for row in rows:
                f.write(json.dumps({k: row.get(k) for k in fields}, separators=(",", ":")) + "\n")
                count += 1
    return count, digest.hexdigest()


def sign_manifest(manifest: dict, data: Path, key: Ed25519PrivateKey) -> Path:
    mpath, spath, ppath = paths(data)
    body = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    mpath.write_bytes(body)
    spath.write_bytes(key.sign(body))
    ppath.write_bytes(public_pem(key))
    return mpath


def export(record: Record, out: Path, fmt: str, f: ExportFilter, station_id: str,
           key: Ed25519PrivateKey) -> dict:
    """Write the data file, its manifest and signature; return the manifest."""
    fields = EXPORT_FIELDS if f.outcome is None else ATTEMPT_FIELDS
    head = record.chain_head(f.station or station_id)
    count, sha = _write_rows(select_rows(record, f), out, fmt, fields)
    manifest = {
        "kind": "units" if f.outcome is None else "attempts", "station_id": station_id,
        "exported_at": now_iso(), "filters": {k: v for k, v in asdict(f).items() if v is not None},
        "format": fmt, "file": out.name, "rows": count, "sha256": sha, "chain_head": head,
        "public_key_sha256": hashlib.sha256(public_pem(key)).hexdigest(),
    }
    sign_manifest(manifest, out, key)
    return manifest


def verify(data: Path, public_key_pem: bytes | None = None) -> dict:
    """Check an export's signature and hash; return its manifest or raise AuditError."""
    mpath, spath, ppath = paths(data)
    try:
        body, sig = mpath.read_bytes(), spath.read_bytes()
        pem = public_key_pem or ppath.read_bytes()
    except FileNotFoundError as exc:
        raise AuditError(f"missing {exc.filename}: an export comes with its manifest, signature and key") from None
    pub = serialization.load_pem_public_key(pem)
    try:
        pub.verify(sig, body)
    except InvalidSignature:
        raise AuditError(f"{mpath.name}: the signature does not match: the manifest was altered "
                         "or signed by another key") from None
    manifest = json.loads(body)
    digest = hashlib.sha256()
    with open(data, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != manifest["sha256"]:
        raise AuditError(f"{data.name}: SHA-256 {digest.hexdigest()} is not the manifest's "
                         f"{manifest['sha256']}: the data file was altered")
    return manifest


def read_rows(data: Path, fmt: str) -> Iterator[dict]:
    with open(data, newline="") as fh:
        if fmt == "csv":
            yield from csv.DictReader(fh)
        else:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def merge(inputs: list[Path], out: Path, station_id: str, key: Ed25519PrivateKey) -> tuple[dict, list[str]]:
    """Join verified exports of several stations; refuse records of one unit that conflict."""
    units: dict[str, dict] = {}
    by_serial: dict[str, str] = {}
    conflicts: list[str] = []
    sources = []
    fmt = None
    for path in inputs:
        manifest = verify(path)
        fmt = fmt or manifest["format"]
        sources.append({"file": path.name, "station_id": manifest["station_id"], "sha256": manifest["sha256"],
                        "chain_head": manifest["chain_head"], "rows": manifest["rows"]})
        for row in read_rows(path, manifest["format"]):
            mac, serial = row.get("mac"), row.get("serial")
            where = f"{path.name} ({manifest['station_id']})"
            prior = units.get(mac)
            if prior is not None and (prior["serial"] != serial or prior["device_id"] != row.get("device_id")):
                conflicts.append(f"unit {mac}: serial {prior['serial']} in {prior['_from']} but {serial} in {where}")
                continue
            if serial and by_serial.get(serial, mac) != mac:
                conflicts.append(f"serial {serial}: board {by_serial[serial]} and board {mac} ({where})")
                continue
            if prior is None:
                units[mac] = {**row, "_from": where}
                by_serial[serial] = mac
    if conflicts:
        return {}, conflicts
    fields = list(next(iter(units.values())).keys() - {"_from"}) if units else EXPORT_FIELDS
    fields = [f for f in ATTEMPT_FIELDS if f in fields] + sorted(set(fields) - set(ATTEMPT_FIELDS))
    count, sha = _write_rows(units.values(), out, fmt or "csv", fields)
    manifest = {"kind": "merge", "station_id": station_id, "exported_at": now_iso(), "format": fmt or "csv",
                "file": out.name, "rows": count, "sha256": sha, "sources": sources,
                "public_key_sha256": hashlib.sha256(public_pem(key)).hexdigest()}
    sign_manifest(manifest, out, key)
    return manifest, []
