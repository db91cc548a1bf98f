"""Exports an auditor can trust: filtered, hashed, signed, verifiable without the station.

Every export writes the data file (CSV or JSON lines), the station's journal segment
since its previous export (`<file>.journal.jsonl`), a manifest (station id, time,
filters, row count, SHA-256 of both files, the signed chain checkpoint it was taken at,
the previous export's manifest hash) and an Ed25519 signature of the manifest made with
the station's signing key, plus the station's public key in PEM.

Trust is pinned: `verify` and `merge` accept a manifest only when its signature
verifies under a key in the trust store for the manifest's station id (`station keys
trust PEM --station ID`; a station trusts its own key). The `.pub.pem` beside an export
is a convenience to pin from, never a reason to trust. A key's fingerprint is the
SHA-256 of its DER SubjectPublicKeyInfo, as OpenSSL prints it:

    openssl pkey -pubin -in units.csv.pub.pem -outform DER | openssl dgst -sha256
    openssl pkeyutl -verify -pubin -inkey units.csv.pub.pem -rawin \\
        -in units.csv.manifest.json -sigfile units.csv.manifest.sig
    openssl dgst -sha256 units.csv units.csv.journal.jsonl   # the manifest's "sha256", "journal.sha256"

What an outsider can check without the station's chain key: the journal segment is
linked (each entry names the hash of the one before it), starts where the previous
export's segment ended and ends at the signed head; every exported attempt row equals
the body of its journal entry; consecutive exports name each other (a missing one is a
gap). The entry hashes themselves are keyed (HMAC): only the station recomputes them
(`station db verify`), so the outsider relies on the signature for the entries' content.

An export for one lot or profile (one customer, or one product) withholds the body and unit
of every entry about an attempt outside it (`withholding`): the entry keeps its place and
hashes, so the segment still links, and another customer's MACs and serials stay home.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .files import write_private
from .record import ATTEMPT_COLUMNS, CHAIN_GENESIS, EXPORT_FIELDS, Outcome, Record, key_fingerprint, now_iso

# an attempt export carries every column the chain hashes, and the row's place in the chain
ATTEMPT_FIELDS = EXPORT_FIELDS + ["failed_step", "error"] + [
    c for c in ("id", *ATTEMPT_COLUMNS) if c not in EXPORT_FIELDS + ["failed_step", "error"]] + [
    "prev_hash", "row_hash"]
JOURNAL_FIELDS = ("id", "station_id", "kind", "attempt_uid", "at", "body", "unit", "prev_hash", "entry_hash")
SIGNING_PASSPHRASE_ENV = "STATION_SIGNING_PASSPHRASE"
SECRETS_PASSPHRASE_ENV = "STATION_SECRETS_PASSPHRASE"


@dataclass(frozen=True)
class ExportFilter:
    since: str | None = None
    until: str | None = None
    profile: str | None = None
    outcome: str | None = None  # None: provisioned units; an outcome (aborted, error…) or any: attempts
    operator: str | None = None
    station: str | None = None
    lot: str | None = None


class AuditError(Exception):
    pass


def _passphrase(given: str | None) -> str | None:
    if given is not None:
        return given or None
    return os.environ.get(SIGNING_PASSPHRASE_ENV) or os.environ.get(SECRETS_PASSPHRASE_ENV) or None


def signing_key(path: Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    """The station's Ed25519 key (created on first use, readable by the station only).

    With a passphrase ($STATION_SIGNING_PASSPHRASE, else $STATION_SECRETS_PASSPHRASE) a
    new key is written encrypted, and an encrypted key is opened with it.
    """
    secret = _passphrase(passphrase)
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        protect = serialization.BestAvailableEncryption(secret.encode()) if secret else \
            serialization.NoEncryption()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, protect)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return key
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # encrypted
        if not secret:
            raise AuditError(f"the signing key {path} is protected by a passphrase: set "
                             f"{SIGNING_PASSPHRASE_ENV}") from None
    except ValueError as exc:
        raise AuditError(f"{path} is not a usable signing key ({exc})") from None
    try:
        return serialization.load_pem_private_key(pem, password=secret.encode())
    except ValueError:
        raise AuditError(f"the signing key {path}: wrong passphrase ({SIGNING_PASSPHRASE_ENV}), or the file "
                         "was altered") from None


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(pem: bytes, where: str) -> Ed25519PublicKey:
    try:
        pub = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise AuditError(f"{where} is not a public key in PEM ({exc})") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise AuditError(f"{where} is not an Ed25519 public key")
    return pub


@dataclass(frozen=True)
class TrustedKey:
    station_id: str
    fingerprint: str
    pem: str
    added_at: str
    own: bool = False

    def public_key(self) -> Ed25519PublicKey:
        return load_public_key(self.pem.encode(), f"the trusted key {self.fingerprint[:16]}…")


class TrustStore:
    """The station public keys this machine trusts, per station id (`<var>/trust/keys.json`, 0600 in 0700).

    Beside it, `checkpoints.json`: the latest signed checkpoint of each chain, kept outside
    the database so that a database rolled back with its checkpoints still shows.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "keys.json"
        self.anchor = self.folder / "checkpoints.json"

    @classmethod
    def for_station(cls, station) -> "TrustStore":
        return cls(Path(station.signing_key).parent / "trust")

    def keys(self) -> list[TrustedKey]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise AuditError(f"{self.path}: not a trust store ({exc})") from None
        return [TrustedKey(**k) for k in doc.get("keys", [])]

    def keys_for(self, station_id: str) -> list[TrustedKey]:
        return [k for k in self.keys() if k.station_id == station_id]

    def by_station(self) -> dict[str, list[Ed25519PublicKey]]:
        out: dict[str, list[Ed25519PublicKey]] = {}
        for k in self.keys():
            out.setdefault(k.station_id, []).append(k.public_key())
        return out

    def trust(self, station_id: str, pem: bytes, own: bool = False) -> tuple[TrustedKey, bool]:
        """Pin a key for a station id; returns it and whether it is new."""
        pub = load_public_key(pem, "the key")
        fp = key_fingerprint(pub)
        keys = self.keys()
        for k in keys:
            if k.station_id == station_id and k.fingerprint == fp:
                return k, False
        new = TrustedKey(station_id, fp, public_pem(pub).decode(), now_iso(), own)
        doc = {"version": 1, "keys": [asdict(k) for k in keys + [new]]}
        write_private(self.path, json.dumps(doc, indent=2).encode() + b"\n")
        return new, True

    def anchored(self) -> list[dict]:
        try:
            return list(json.loads(self.anchor.read_text()).values())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise AuditError(f"{self.anchor}: damaged ({exc})") from None

    def anchor_checkpoints(self, rows: list[dict]) -> None:
        doc = {cp["station_id"]: cp for cp in self.anchored()}
        doc.update({cp["station_id"]: cp for cp in rows})
        write_private(self.anchor, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")


def station_signing_key(station, trust: TrustStore | None = None) -> Ed25519PrivateKey:
    """The station's signing key; its public half is trusted for the station's id."""
    key = signing_key(station.signing_key)
    (trust or TrustStore.for_station(station)).trust(station.station_id, public_pem(key), own=True)
    return key


def write_checkpoint(record: Record, station, reason: str) -> list[dict]:
    """Sign where the record's chains stand and keep the latest outside the database too."""
    trust = TrustStore.for_station(station)
    rows = record.checkpoint(station_signing_key(station, trust), reason)
    trust.anchor_checkpoints(rows)
    return rows


def check_filter(f: ExportFilter) -> None:
    if f.outcome not in (None, "any", *Outcome):  # a misspelt outcome would export nothing, silently
        raise AuditError(f"unknown outcome {f.outcome!r}: one of {', '.join(Outcome)}, or any")


def select_rows(record: Record, f: ExportFilter) -> Iterator[dict]:
    check_filter(f)
    return _rows(record, f)


def _rows(record: Record, f: ExportFilter) -> Iterator[dict]:
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


def journal_path(data: Path) -> Path:
    return data.with_name(data.name + ".journal.jsonl")


# an export filtered by lot or profile is for one customer or product: another's units are not its reader's
SCOPE_FILTERS = ("lot", "profile")


def scope_of(f: ExportFilter) -> dict[str, str]:
    """The filters that scope an export's journal segment to one lot or product (none: it carries every body)."""
    return {k: getattr(f, k) for k in SCOPE_FILTERS if getattr(f, k) is not None}


def withholding(entries: Iterable[dict], in_scope: Callable[[dict], bool] | None) -> Iterator[dict]:
    """The segment's entries; one about an attempt outside the export's scope keeps its place, kind, time and
    hashes (the chain still links) but not its body or unit: another lot's MACs and serials stay home."""
    for e in entries:
        if in_scope is not None and e.get("attempt_uid") and not in_scope(e):
            yield {**e, "body": None, "unit": None, "withheld": True}
        else:
            yield e


class _Hashing:
    """A binary file that hashes what is written to it (text in, UTF-8 out)."""

    def __init__(self, f):
        self.f = f
        self.digest = hashlib.sha256()

    def write(self, s: str) -> int:
        b = s.encode()
        self.digest.update(b)
        self.f.write(b)
        return len(s)


class _Counting:
    """Entries passed through, counting those whose body is withheld."""

    def __init__(self, entries: Iterable[dict]):
        self.entries = entries
        self.withheld = 0

    def __iter__(self) -> Iterator[dict]:
        for e in self.entries:
            self.withheld += bool(e.get("withheld"))
            yield e


def _write_rows(rows: Iterable[dict], out: Path, fmt: str, fields: list[str]) -> tuple[int, str]:
    count = 0
    with open(out, "wb") as raw:
        f = _Hashing(raw)
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
    return count, f.digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sign_manifest(manifest: dict, data: Path, key: Ed25519PrivateKey) -> str:
    """Write the manifest, its signature and the public key; return the manifest's SHA-256."""
    mpath, spath, ppath = paths(data)
    body = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    mpath.write_bytes(body)
    spath.write_bytes(key.sign(body))
    ppath.write_bytes(public_pem(key))
    return hashlib.sha256(body).hexdigest()


def export(record: Record, out: Path, fmt: str, f: ExportFilter, station_id: str,
           key: Ed25519PrivateKey, trust: TrustStore | None = None) -> dict:
    """Write the data file, the journal segment, the manifest and its signature; return the manifest.

    The export is a checkpoint: the chain is signed where it stands, and the segment runs
    from the previous export's checkpoint to this one, so consecutive exports chain.
    """
    check_filter(f)  # before anything is signed or written
    chain = f.station or station_id
    cp = record.checkpoint(key, "export", [chain])[0]
    if trust is not None:
        trust.anchor_checkpoints([cp])
    previous = record.last_export(chain, cp["id"])
    fields = EXPORT_FIELDS if f.outcome is None else ATTEMPT_FIELDS
    count, sha = _write_rows(select_rows(record, f), out, fmt, fields)
    after = previous["last_id"] if previous else 0
    scope = scope_of(f)
    in_scope = None
    if scope:
        where = " and ".join(f"{k} = :{k}" for k in scope)
        uids = {r["uid"] for r in record.db().query(f"select uid from attempts where {where}", scope)}
        in_scope = lambda e: e["attempt_uid"] in uids  # noqa: E731
    counted = _Counting(withholding(record.journal_segment(chain, after, cp["last_id"]), in_scope))
    entries, jsha = _write_rows(counted, journal_path(out), "jsonl",
                                list(JOURNAL_FIELDS) + (["withheld"] if scope else []))
    manifest = {
        "kind": "units" if f.outcome is None else "attempts", "station_id": station_id,
        "exported_at": now_iso(), "filters": {k: v for k, v in asdict(f).items() if v is not None},
        "format": fmt, "file": out.name, "rows": count, "sha256": sha, "chain_head": cp["head"],
        "checkpoint": {k: cp[k] for k in ("station_id", "last_id", "entries", "head", "at", "reason",
                                          "signature")},
        "journal": {"file": journal_path(out).name, "sha256": jsha, "entries": entries, "after_id": after,
                    "from_hash": previous["head"] if previous else CHAIN_GENESIS,
                    **({"scope": scope, "withheld": counted.withheld} if scope else {})},
        "previous_export": {"manifest_sha256": previous["manifest_sha256"], "last_id": previous["last_id"],
                            "chain_head": previous["head"], "at": previous["at"]} if previous else None,
        "public_key_sha256": key_fingerprint(key),
    }
    record.note_export(cp["id"], sign_manifest(manifest, out, key))
    return manifest


@dataclass(frozen=True)
class Verified:
    """An export that verified: its manifest, the key that signed it, what was checked."""

    path: Path
    manifest: dict
    manifest_sha256: str
    fingerprint: str  # of the key whose signature verified
    pinned: bool  # False: a one-off check with --pubkey
    notes: list[str] = field(default_factory=list)


def _signer(manifest: dict, body: bytes, sig: bytes, trust: TrustStore | None, pubkey_pem: bytes | None,
            where: Path) -> tuple[str, bool]:
    """The fingerprint of the key under which the signature verifies, and whether it is pinned."""
    station = str(manifest.get("station_id"))
    if pubkey_pem is not None:
        candidates = [load_public_key(pubkey_pem, "--pubkey")]
    else:
        pinned = trust.keys_for(station) if trust is not None else []
        if not pinned:
            _, _, ppath = paths(where)
            shown = ""
            if ppath.exists():
                with_fp = key_fingerprint(load_public_key(ppath.read_bytes(), ppath.name))
                shown = f" (the key beside it, {ppath.name}, has fingerprint {with_fp})"
            raise AuditError(
                f"no key is trusted for station {station!r}{shown}. Compare that fingerprint with the one the "
                "station's owner published (`station keys list` on the station), then pin it: "
                f"station keys trust {ppath} --station {station}")
        candidates = [k.public_key() for k in pinned]
    for pub in candidates:
        try:
            pub.verify(sig, body)
        except InvalidSignature:
            continue
        used = key_fingerprint(pub)
        claimed = manifest.get("public_key_sha256")
        legacy = hashlib.sha256(public_pem(pub)).hexdigest()  # exports before fingerprints were of the DER
        if claimed not in (used, legacy):
            raise AuditError(f"the manifest claims key {str(claimed)[:16]}… but was signed by key {used[:16]}…: "
                             "refused")
        return used, pubkey_pem is None
    if pubkey_pem is not None:
        raise AuditError("the signature does not match under --pubkey: the manifest was altered or signed by "
                         "another key")
    raise AuditError(f"the signature does not match any key trusted for station {station!r}: the manifest was "
                     "altered or signed by another key")


def verify(data: Path, trust: TrustStore | None = None, pubkey_pem: bytes | None = None) -> Verified:
    """Check an export's signature (under a pinned key, or --pubkey), its files and its chain segment."""
    mpath, spath, _ = paths(data)
    try:
        body, sig = mpath.read_bytes(), spath.read_bytes()
    except FileNotFoundError as exc:
        raise AuditError(f"missing {exc.filename}: an export comes with its manifest and signature") from None
    try:
        manifest = json.loads(body)
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise AuditError(f"{mpath.name}: not a manifest ({exc})") from None
    fp, pinned = _signer(manifest, body, sig, trust, pubkey_pem, data)
    sha = _sha256_file(data)
    if sha != manifest["sha256"]:
        raise AuditError(f"{data.name}: SHA-256 {sha} is not the manifest's {manifest['sha256']}: the data file "
                         "was altered")
    if manifest.get("scope") == "central":
        try:
            notes = _check_central(data, manifest, trust)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # signed, yet not what an export writes
            raise AuditError(f"{mpath.name}: not a central export's manifest or journal ({type(exc).__name__}: "
                             f"{exc})") from None
    elif "journal" in manifest:
        notes = _check_segment(data, manifest)
    elif manifest.get("kind") == "merge":
        notes = [f"a merge of {len(manifest.get('sources', []))} exports, each verified under a pinned key "
                 "when merged"]
    else:
        notes = ["no journal segment (an export made before exports carried the chain)"]
    return Verified(data, manifest, hashlib.sha256(body).hexdigest(), fp, pinned, notes)


def _cell(v) -> str:
    return "" if v is None else str(v)


def _journal_file(data: Path, manifest: dict) -> tuple[dict, Path]:
    """The manifest's journal part and its file, which must be there with the SHA-256 the manifest states."""
    j = manifest["journal"]
    jpath = data.with_name(j["file"])
    if not jpath.exists():
        raise AuditError(f"missing {jpath}: the export's journal segment")
    if _sha256_file(jpath) != j["sha256"]:
        raise AuditError(f"{jpath.name}: its SHA-256 is not the manifest's: the journal segment was altered")
    return j, jpath


def _check_segment(data: Path, manifest: dict) -> list[str]:
    """The journal segment: the manifest's file, linked, from the previous export to the signed head."""
    j, jpath = _journal_file(data, manifest)
    prev, last_id, n = j["from_hash"], j["after_id"], 0
    latest: dict[str, dict] = {}
    withheld: set[str] = set()
    for e in read_rows(jpath, "jsonl"):
        n += 1
        if e["prev_hash"] != prev or e["id"] <= last_id:
            raise AuditError(f"{jpath.name}: entry {e['id']} does not follow the entry before it")
        prev, last_id = e["entry_hash"], e["id"]
        if e.get("withheld"):
            withheld.add(e["entry_hash"])
        elif e["kind"] not in _NOT_ATTEMPTS:
            latest[e["entry_hash"]] = json.loads(e["body"])
    if n != j["entries"] or prev != manifest["chain_head"]:
        raise AuditError(f"{jpath.name}: the segment does not end at the signed head {manifest['chain_head'][:16]}…")
    if len(withheld) != j.get("withheld", 0):
        raise AuditError(f"{jpath.name}: {len(withheld)} entries are withheld, the manifest says {j.get('withheld', 0)}")
    notes = [f"journal segment: {n} entries, linked from {j['from_hash'][:16]}… to the signed head"
             + (f"; the bodies of {len(withheld)} entries about attempts outside "
                f"{', '.join(f'{k} {v}' for k, v in j['scope'].items())} are withheld (their hashes link the chain)"
                if withheld else "")]
    if manifest["kind"] != "attempts":
        return notes
    bound = older = 0
    for row in read_rows(data, manifest["format"]):
        if row.get("row_hash") in withheld:
            raise AuditError(f"{data.name}: attempt {row.get('id')}'s journal entry is withheld from the segment")
        body = latest.get(row.get("row_hash") or "")
        if body is None:
            older += 1  # its entry is in an earlier export's segment
            continue
        wrong = [k for k, v in body.items() if k in row and _cell(row[k]) != _cell(v)]
        if wrong:
            raise AuditError(f"{data.name}: attempt {row.get('id')} differs from its journal entry "
                             f"({', '.join(sorted(wrong))})")
        bound += 1
    notes.append(f"{bound} rows equal their journal entries"
                 + (f"; {older} were recorded before the previous export (its segment holds them)" if older else ""))
    return notes


# entry kinds that carry no attempt row (every other kind does: record.ATTEMPT_KINDS, `burn` among them)
_NOT_ATTEMPTS = ("counter", "admin", "unit", "block")


def _check_central(data: Path, manifest: dict, trust: TrustStore | None) -> list[str]:
    """A central export's journal: each station's segment linked and counted, its checkpoint, the rows' entries."""
    j, jpath = _journal_file(data, manifest)
    stations: dict[str, dict] = j["stations"]
    at = {sid: [s["from_hash"], s["after_seq"], 0] for sid, s in stations.items()}  # prev hash, seq, count
    marks = {sid: s["checkpoint"]["entries"] for sid, s in stations.items() if s.get("checkpoint")}
    marked: dict[str, str] = {}  # station -> the entry hash at its checkpoint's place
    latest: dict[tuple[str, str], tuple[str, dict]] = {}  # (station, attempt uid) -> its latest entry here
    hashes: set[tuple[str, str]] = set()
    withheld: set[tuple[str, str]] = set()  # entries about attempts outside the export's lot or profile
    total = 0
    for e in read_rows(jpath, "jsonl"):
        total += 1
        sid = e["station_id"]
        if sid not in at:
            raise AuditError(f"{jpath.name}: an entry of station {sid!r}, which the manifest does not name")
        st = at[sid]
        if e["prev_hash"] != st[0] or e["seq"] != st[1] + 1:
            raise AuditError(f"{jpath.name}: station {sid}'s entry {e['seq']} does not follow the entry before it")
        st[0], st[1], st[2] = e["entry_hash"], e["seq"], st[2] + 1
        if marks.get(sid) == e["seq"]:
            marked[sid] = e["entry_hash"]
        if e.get("withheld"):
            withheld.add((sid, e["entry_hash"]))
        elif e["kind"] not in _NOT_ATTEMPTS:
            latest[(sid, e["attempt_uid"])] = (e["entry_hash"], json.loads(e["body"]))
            hashes.add((sid, e["entry_hash"]))
    if total != j["entries"]:
        raise AuditError(f"{jpath.name}: {total} entries, the manifest says {j['entries']}")
    if len(withheld) != j.get("withheld", 0):
        raise AuditError(f"{jpath.name}: {len(withheld)} entries are withheld, the manifest says {j.get('withheld', 0)}")
    notes = [f"the bodies of {len(withheld)} entries about attempts outside "
             f"{', '.join(f'{k} {v}' for k, v in j['scope'].items())} are withheld (their hashes link the chains)"
             ] if withheld else []
    for sid, s in sorted(stations.items()):
        prev, _, n = at[sid]
        if n != s["entries"] or prev != s["head"]:
            raise AuditError(f"{jpath.name}: station {sid}'s segment does not end at the signed head "
                             f"{s['head'][:16]}… after {s['entries']} entries")
        notes.append(f"station {sid}: {n} entries linked from {s['from_hash'][:16]}… (after entry {s['after_seq']}) "
                     f"to {s['head'][:16]}…; " + _central_checkpoint(sid, s, marked.get(sid), trust, jpath))
    if manifest["kind"] == "attempts":
        def key(row):
            return row.get("station_id"), row.get("uid")
    else:  # a unit row is its board's pass: the attempt at that station that started then
        latest = {(sid, b.get("mac"), b.get("started_at")): (h, b) for (sid, _), (h, b) in latest.items()}

        def key(row):
            return row.get("station_id"), row.get("mac"), row.get("started_at")
    bound = older = 0
    for row in read_rows(data, manifest["format"]):
        if (row.get("station_id"), row.get("row_hash")) in withheld:
            raise AuditError(f"{data.name}: attempt {row.get('id')} of station {row.get('station_id')}: its journal "
                             "entry is withheld from the segment")
        found = latest.get(key(row))
        if found is None:
            if (row.get("station_id"), row.get("row_hash")) in hashes:
                raise AuditError(f"{data.name}: attempt {row.get('id')} of station {row.get('station_id')} is not "
                                 "as its latest journal entry records it")
            older += 1  # its entries are in an earlier central export's segment
            continue
        h, body = found
        wrong = [k for k, v in body.items() if k in row and _cell(row[k]) != _cell(v)]
        if row.get("row_hash") not in (None, h):
            wrong.append("row_hash")
        if wrong:
            raise AuditError(f"{data.name}: attempt {row.get('id')} of station {row.get('station_id')} differs from "
                             f"its journal entry ({', '.join(sorted(wrong))})")
        bound += 1
    notes.append(f"{bound} rows equal their latest journal entries"
                 + (f"; {older} were recorded before the previous central export (its segments hold them)"
                    if older else ""))
    return notes


def _central_checkpoint(sid: str, s: dict, marked: str | None, trust: TrustStore | None, jpath: Path) -> str:
    """A station's own signed checkpoint inside its segment: its place, and its signature when the key is pinned."""
    from .record import _signed

    cp = s.get("checkpoint")
    if not cp:
        return "no checkpoint of the station inside this segment (the exporter's signature covers it)"
    if cp.get("station_id") != sid or marked is None or marked != cp.get("head"):
        raise AuditError(f"{jpath.name}: station {sid}'s checkpoint of {cp.get('at')} (entry {cp.get('entries')}) "
                         "names no entry of its segment with that head")
    keys = trust.keys_for(sid) if trust is not None else []
    if not keys:
        return f"its checkpoint at entry {cp['entries']}: not checked: no key pinned for station {sid}"
    if not any(_signed(k.public_key(), cp) for k in keys):
        raise AuditError(f"station {sid}'s checkpoint of {cp.get('at')} is not signed by a key pinned for station "
                         f"{sid}: it was forged or altered")
    return f"its checkpoint at entry {cp['entries']} is signed by its pinned key"


def check_series(done: list[Verified]) -> list[str]:
    """Consecutive exports of one station must name each other: a missing one is a gap."""
    problems = []
    by_chain: dict[str, list[Verified]] = {}
    for v in done:
        if v.manifest.get("checkpoint") and v.manifest.get("kind") != "merge":
            by_chain.setdefault(v.manifest["checkpoint"]["station_id"], []).append(v)
    central: dict[str, list[Verified]] = {}
    for v in done:
        if v.manifest.get("scope") == "central":
            central.setdefault(v.manifest["central"]["series"], []).append(v)
    for series in central.values():  # one series per central copy, whoever exported
        problems += _unchained(
            series, "number", lambda v: v.manifest["central"]["number"],
            lambda a, b, prev: f"gap: central export {prev.get('number')} (at {prev.get('at')}, manifest "
                               f"{str(prev.get('manifest_sha256'))[:16]}…) between {a.path.name} and {b.path.name} "
                               "is not among these files: its journal segments are missing",
            lambda a, b: f"{b.path.name} does not follow {a.path.name}: the two central exports do not chain")
    for station, series in by_chain.items():
        problems += _unchained(
            series, "last_id", lambda v: v.manifest["checkpoint"]["last_id"],
            lambda a, b, prev: f"gap: station {station} made an export between {a.path.name} and {b.path.name} "
                               f"(at {prev.get('at')}, manifest {str(prev.get('manifest_sha256'))[:16]}…) that is "
                               "not among these files: its journal segment is missing",
            lambda a, b: f"{b.path.name} does not follow {a.path.name}: the two exports do not chain "
                         "(not the same record)")
    return problems


def _unchained(series: list[Verified], key: str, place, gap, broken) -> list[str]:
    """Each export of a series must name the one before it; a later one named instead is a gap."""
    problems = []
    series.sort(key=place)
    for a, b in zip(series, series[1:]):
        prev = b.manifest.get("previous_export") or {}
        if prev.get("manifest_sha256") != a.manifest_sha256:
            problems.append(gap(a, b, prev) if prev.get(key, -1) > place(a) else broken(a, b))
    return problems


def read_rows(data: Path, fmt: str) -> Iterator[dict]:
    with open(data, newline="") as fh:
        if fmt == "csv":
            yield from csv.DictReader(fh)
        else:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def merge(inputs: list[Path], out: Path, station_id: str, key: Ed25519PrivateKey,
          trust: TrustStore | None = None) -> tuple[dict, list[str]]:
    """Join exports verified under pinned keys; refuse records of one unit that conflict."""
    units: dict[str, dict] = {}
    by_serial: dict[str, str] = {}
    conflicts: list[str] = []
    sources = []
    fmt = None
    for path in inputs:
        v = verify(path, trust)
        manifest = v.manifest
        fmt = fmt or manifest["format"]
        sources.append({"file": path.name, "station_id": manifest["station_id"], "sha256": manifest["sha256"],
                        "chain_head": manifest.get("chain_head"), "rows": manifest["rows"],
                        "manifest_sha256": v.manifest_sha256, "public_key_sha256": v.fingerprint})
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
                "public_key_sha256": key_fingerprint(key)}
    sign_manifest(manifest, out, key)
    return manifest, []
