"""Central exports (`station export --central`, issue #17 item 5) against a real PostgreSQL.

What the quality office relies on: one signed export holds every station's units, each
station's journal segment and its own signed checkpoint; `station export verify` checks it
as fully as a station export; consecutive central exports chain; an export is never made
from a central copy that does not verify.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import psycopg

from station.audit import TrustStore, public_pem, read_rows, signing_key
from station.central import Central
from station.config import StationConfig
from station.record import Attempt, Outcome, Record, SerialPlan, station_key
from tests.station.conftest import run_station
from tests.station.test_central import _settings, make_station


class Line:
    """One station in-process: its record, its link to the central copy, its signing key."""

    def __init__(self, root: Path, sid: str, url: str):
        self.sid = sid
        self.rec = Record(root / f"{sid}.db", station_key(root / f"{sid}.key"), station_id=sid)
        self.rec.serial_blocks = True
        self.central = Central(_settings(url), None, self.rec, sid)
        self.key = signing_key(root / f"{sid}.pem")

    def unit(self, mac: str, outcome: str = Outcome.PASSED, at: str = "2026-11-02T10:00:00.000+00:00",
             **attrs) -> str:
        a = Attempt(port="p", station_id=self.sid, profile="relay", profile_hash="h", started_at=at, mac=mac,
                    **attrs)
        plan = SerialPlan(counter="relay:X-", render=lambda v: f"X-{v:05}", max_value=99999)
        self.central.need_serials(plan.counter, plan.max_value)
        serial = self.rec.start(a, plan)
        a.outcome, a.ended_at = outcome, at
        self.rec.finish(a)
        return serial

    def ship(self) -> None:
        """What the end of a run does: sign the chain, push it."""
        self.rec.checkpoint(self.key, "run")
        self.central.push()

    def close(self) -> None:
        self.central.close()
        self.rec.close()


def office(root: Path, url: str, *lines: Line, sid: str = "office") -> Path:
    """The quality office's machine: a station.toml with [central], its own signing key, the stations pinned."""
    cfg = make_station(root, sid, url)
    trust = TrustStore.for_station(StationConfig.load(cfg))
    for line in lines:
        trust.trust(line.sid, public_pem(line.key))
    return cfg


def export(capsys, cfg: Path, out: Path, *args: str) -> tuple[int, str, str]:
    return run_station(capsys, "export", "--central", "--config", str(cfg), "--out", str(out), *args)


def verify(capsys, cfg: Path, *files: Path) -> tuple[int, str, str]:
    return run_station(capsys, "export", "verify", *map(str, files), "--config", str(cfg))


def mac(n: int) -> str:
    return f"aa:00:00:00:00:{n:02x}"


def test_two_stations_units_in_one_central_export_verify_under_each_stations_pinned_key(tmp_path, pg_url, capsys):
    one, two = Line(tmp_path, "line-1", pg_url), Line(tmp_path, "line-2", pg_url)
    try:
        one.unit(mac(1), at="2026-11-02T10:00:00.000+00:00")
        one.unit(mac(2), at="2026-11-02T10:01:00.000+00:00")
        one.unit(mac(3), Outcome.FAILED)
        two.unit(mac(4), at="2026-11-02T10:02:00.000+00:00")
        two.unit(mac(2), at="2026-11-02T11:00:00.000+00:00", rework=True)  # board 2 passed again, later, at line-2
        one.ship(), two.ship()
    finally:
        one.close(), two.close()
    cfg = office(tmp_path, pg_url, one, two)
    out = tmp_path / "plant.csv"
    rc, _, err = export(capsys, cfg, out)
    assert rc == 0, err
    rows = list(read_rows(out, "csv"))
    # each board once, as its latest pass anywhere says
    assert sorted((r["station_id"], r["mac"]) for r in rows) == [("line-1", mac(1)), ("line-2", mac(2)),
                                                                 ("line-2", mac(4))]
    manifest = json.loads(out.with_name("plant.csv.manifest.json").read_text())
    assert manifest["scope"] == "central" and manifest["station_id"] == "office" and manifest["rows"] == 3
    segs = manifest["journal"]["stations"]
    assert set(segs) == {"line-1", "line-2"}
    for sid, s in segs.items():
        assert s["after_seq"] == 0 and s["from_hash"] == "0" * 64 and s["entries"] > 0
        assert s["checkpoint"]["station_id"] == sid and s["checkpoint"]["head"] == s["head"]
    entries = [json.loads(line) for line in out.with_name("plant.csv.journal.jsonl").read_text().splitlines()]
    assert {(e["station_id"], e["seq"]) for e in entries} == {(sid, n) for sid, s in segs.items()
                                                               for n in range(1, s["entries"] + 1)}

    rc, out_text, err = verify(capsys, cfg, out)
    assert rc == 0, err
    for sid in ("line-1", "line-2"):
        assert f"station {sid}: {segs[sid]['entries']} entries linked" in out_text
    assert out_text.count("is signed by its pinned key") == 2
    assert "3 rows equal their latest journal entries" in out_text

    # an auditor who pinned the office and line-1 only: line-2's checkpoint is named unchecked, not passed over
    auditor = make_station(tmp_path, "auditor", pg_url)
    trust = TrustStore.for_station(StationConfig.load(auditor))
    trust.trust("office", out.with_name("plant.csv.pub.pem").read_bytes())
    trust.trust("line-1", public_pem(one.key))
    rc, out_text, err = verify(capsys, auditor, out)
    assert rc == 0, err
    assert "not checked: no key pinned for station line-2" in out_text
    assert out_text.count("is signed by its pinned key") == 1

    # every attempt, with its chain place: each row bound to its entry
    rc, _, err = export(capsys, cfg, tmp_path / "all.jsonl", "--outcome", "any")
    assert rc == 0, err
    attempts = list(read_rows(tmp_path / "all.jsonl", "jsonl"))
    assert len(attempts) == 5 and all(a["row_hash"] and a["uid"] for a in attempts)
    rc, out_text, err = verify(capsys, cfg, tmp_path / "all.jsonl")
    assert rc == 0, err
    # its segments hold nothing new (the units export just before took them): the rows rest on the series
    assert "5 were recorded before the previous central export" in out_text
    rc, _, err = verify(capsys, cfg, out, tmp_path / "all.jsonl")
    assert rc == 0, err


def test_the_filters_select_across_stations_as_in_a_station_export(tmp_path, pg_url, capsys):
    one, two = Line(tmp_path, "line-1", pg_url), Line(tmp_path, "line-2", pg_url)
    try:
        one.unit(mac(1), at="2026-11-01T09:00:00.000+00:00", lot="L1", operator="ann")
        one.unit(mac(2), Outcome.FAILED, at="2026-11-02T09:00:00.000+00:00", lot="L1", operator="ann")
        two.unit(mac(3), at="2026-11-02T10:00:00.000+00:00", lot="L2", operator="bob")
        two.unit(mac(4), Outcome.ABORTED, at="2026-11-03T10:00:00.000+00:00", lot="L2", operator="bob")
        two.unit(mac(5), at="2026-11-03T11:00:00.000+00:00", lot="L1", operator="bob")
        one.ship(), two.ship()
    finally:
        one.close(), two.close()
    cfg = office(tmp_path, pg_url, one, two)
    cases = [
        ((), {mac(1), mac(3), mac(5)}),
        (("--station", "line-2"), {mac(3), mac(5)}),
        (("--lot", "L1"), {mac(1), mac(5)}),
        (("--operator", "ann"), {mac(1)}),
        (("--since", "2026-11-02", "--until", "2026-11-03"), {mac(3)}),
        (("--outcome", "failed"), {mac(2)}),
        (("--outcome", "aborted", "--station", "line-2"), {mac(4)}),
        (("--outcome", "any", "--lot", "L2"), {mac(3), mac(4)}),
        (("--profile", "other"), set()),
    ]
    for n, (args, want) in enumerate(cases):
        out = tmp_path / f"e{n}.csv"
        rc, _, err = export(capsys, cfg, out, *args)
        assert rc == 0, (args, err)
        assert {r["mac"] for r in read_rows(out, "csv")} == want, args
        rc, _, err = verify(capsys, cfg, out)
        assert rc == 0, (args, err)
    rc, _, err = verify(capsys, cfg, *(tmp_path / f"e{n}.csv" for n in range(len(cases))))
    assert rc == 0, err  # every one of them a link of the same series


def test_consecutive_central_exports_chain_and_a_missing_one_is_a_gap(tmp_path, pg_url, capsys):
    one, two = Line(tmp_path, "line-1", pg_url), Line(tmp_path, "line-2", pg_url)
    cfg = office(tmp_path, pg_url, one, two)
    files = []
    try:
        for n in range(3):
            one.unit(mac(10 + n))
            if n != 1:  # line-2 makes nothing between the first and second export
                two.unit(mac(20 + n))
            one.ship(), two.ship()
            files.append(tmp_path / f"e{n}.jsonl")
            rc, _, err = export(capsys, cfg, files[-1], "--outcome", "any")
            assert rc == 0, err
    finally:
        one.close(), two.close()
    m = [json.loads(f.with_name(f.name + ".manifest.json").read_text()) for f in files]
    assert [x["central"]["number"] for x in m] == [1, 2, 3]
    for a, b, fa in zip(m, m[1:], files):
        body = fa.with_name(fa.name + ".manifest.json").read_bytes()
        assert b["previous_export"]["number"] == a["central"]["number"]
        assert b["previous_export"]["manifest_sha256"] == hashlib.sha256(body).hexdigest()
        for sid, s in b["journal"]["stations"].items():  # each segment starts where the previous one ended
            before = a["journal"]["stations"][sid]
            assert s["after_seq"] == before["after_seq"] + before["entries"] and s["from_hash"] == before["head"]
    quiet = m[1]["journal"]["stations"]["line-2"]  # nothing new at line-2: an empty segment, still stated
    assert quiet["entries"] == 0 and quiet["checkpoint"] is None and quiet["head"] == quiet["from_hash"]
    rc, out, err = verify(capsys, cfg, *files)
    assert rc == 0, err
    assert "recorded before the previous central export" in out  # export 3 holds every attempt, 2 and 3 not all

    rc, _, err = verify(capsys, cfg, files[0], files[2])
    assert rc == 1
    assert "gap: central export 2" in err and "journal segments are missing" in err


def _resign(out: Path, key, edit) -> None:
    """What a dishonest exporter could do: change the files, fix the hashes, sign again with its own key."""
    from station.audit import _sha256_file, journal_path, sign_manifest

    mpath = out.with_name(out.name + ".manifest.json")
    manifest = json.loads(mpath.read_text())
    edit(manifest)
    manifest["sha256"] = _sha256_file(out)
    manifest["journal"]["sha256"] = _sha256_file(journal_path(out))
    sign_manifest(manifest, out, key)


def test_tampering_with_any_file_of_a_central_export_is_refused(tmp_path, pg_url, capsys):
    one, two = Line(tmp_path, "line-1", pg_url), Line(tmp_path, "line-2", pg_url)
    try:
        serials = [one.unit(mac(1)), one.unit(mac(2)), two.unit(mac(3))]
        one.ship(), two.ship()
    finally:
        one.close(), two.close()
    cfg = office(tmp_path, pg_url, one, two)
    good = tmp_path / "good.csv"
    rc, _, err = export(capsys, cfg, good, "--outcome", "any")
    assert rc == 0, err
    names = [good.name + s for s in ("", ".journal.jsonl", ".manifest.json", ".manifest.sig", ".pub.pem")]
    office_key = signing_key(StationConfig.load(cfg).signing_key)

    def copy(tag: str) -> Path:
        d = tmp_path / tag
        d.mkdir()
        for n in names:
            (d / n).write_bytes((tmp_path / n).read_bytes())
        return d / good.name

    def journal_lines(out: Path) -> list[str]:
        return (out.with_name(out.name + ".journal.jsonl")).read_text().splitlines(keepends=True)

    def set_journal(out: Path, lines: list[str]) -> None:
        out.with_name(out.name + ".journal.jsonl").write_text("".join(lines))

    def edit_data(out):
        out.write_text(out.read_text().replace(serials[1], "X-99999"))

    def edit_journal(out):
        set_journal(out, [line.replace(serials[2], "X-99999") for line in journal_lines(out)])

    def edit_manifest(out):
        p = out.with_name(out.name + ".manifest.json")
        p.write_text(p.read_text().replace('"rows": 3', '"rows": 2'))

    def drop_entry_resigned(out):  # a segment with a hole, under a valid signature
        lines = journal_lines(out)
        set_journal(out, lines[:1] + lines[2:])
        _resign(out, office_key, lambda m: None)

    def forge_row_resigned(out):  # a row that is not what its station recorded, under a valid signature
        edit_data(out)
        _resign(out, office_key, lambda m: None)

    def forge_checkpoint_resigned(out):  # a station's checkpoint the station never signed
        def edit(m):
            cp = m["journal"]["stations"]["line-2"]["checkpoint"]
            cp["at"] = "2026-01-01T00:00:00.000+00:00"
        _resign(out, office_key, edit)

    cases = [(edit_data, "the data file was altered"), (edit_journal, "the journal segment was altered"),
             (edit_manifest, "signature does not match"), (drop_entry_resigned, "does not follow the entry before it"),
             (forge_row_resigned, "differs from its journal entry (serial)"),
             (forge_checkpoint_resigned, "is not signed by a key pinned for station line-2")]
    rc, _, err = verify(capsys, cfg, good)
    assert rc == 0, err
    for tamper, words in cases:
        out = copy(tamper.__name__)
        tamper(out)
        rc, _, err = verify(capsys, cfg, out)
        assert rc == 1 and "NOT VERIFIED" in err and words in err, (tamper.__name__, err)


def test_a_central_copy_edited_in_postgresql_is_refused_at_export(tmp_path, pg_url, capsys):
    one = Line(tmp_path, "line-1", pg_url)
    try:
        serial = one.unit(mac(1))
        one.unit(mac(2))
        one.ship()
    finally:
        one.close()
    cfg = office(tmp_path, pg_url, one)
    out = tmp_path / "plant.csv"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE attempts SET row = jsonb_set(row, '{serial}', '\"X-99999\"') WHERE serial = %s",
                     [serial])
    rc, _, err = export(capsys, cfg, out)
    assert rc == 1
    assert "refused: the central copy does not verify" in err and "was edited in the central copy" in err
    assert list(tmp_path.glob("plant.csv*")) == []  # nothing written, nothing recorded in the series
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM central_exports").fetchone()[0] == 0
        conn.execute("UPDATE attempts SET row = jsonb_set(row, '{serial}', to_jsonb(%s::text)) WHERE serial = %s",
                     [serial, serial])

    # a station whose key this machine has not pinned: its checkpoints cannot be checked, so no export
    bare = make_station(tmp_path, "bare-office", pg_url)
    rc, _, err = export(capsys, bare, out)
    assert rc == 1 and "no key is trusted for this station" in err
    assert list(tmp_path.glob("plant.csv*")) == []

    rc, _, err = export(capsys, cfg, out)  # the copy put back as the station recorded it: exported
    assert rc == 0, err


def test_boards_flashed_at_two_stations_export_centrally_with_the_rows_each_station_recorded(tmp_path, pg_url, capsys,
                                                                                             monkeypatch):
    from flashing.virtual.bench import VirtualBench
    from tests.station.conftest import TOKEN, json_lines

    monkeypatch.setenv("RELAY_VENDOR_TOKEN", TOKEN)
    a, b = make_station(tmp_path, "line-a", pg_url), make_station(tmp_path, "line-b", pg_url)
    with VirtualBench(4, "esp32", run_dir=tmp_path / "run") as bench:
        passed = {}
        for cfg, slots in ((a, bench.slots[:2]), (b, bench.slots[2:])):
            rc, out, err = run_station(capsys, "flash", "--config", str(cfg), *sum((["--port", s.url] for s in slots),
                                                                                     []), "--json")
            assert rc == 0, err
            passed.update({e["mac"]: e["serial"] for e in json_lines(out) if e["event"] == "unit_finished"})
    cfg = make_station(tmp_path, "office", pg_url)
    trust = TrustStore.for_station(StationConfig.load(cfg))
    for station in (a, b):
        s = StationConfig.load(station)
        trust.trust(s.station_id, public_pem(signing_key(s.signing_key)))
    units, attempts = tmp_path / "units.csv", tmp_path / "attempts.jsonl"
    rc, _, err = export(capsys, cfg, attempts, "--outcome", "any")
    assert rc == 0, err
    rc, _, err = export(capsys, cfg, units)
    assert rc == 0, err
    rc, out, err = verify(capsys, cfg, attempts, units)
    assert rc == 0, err
    assert "4 rows equal their latest journal entries" in out and out.count("is signed by its pinned key") == 2
    assert {r["mac"]: r["serial"] for r in read_rows(units, "csv")} == passed
    # each row is what its station's own record holds, cell for cell
    for station in (a, b):
        s = StationConfig.load(station)
        rec = Record(s.database, station_key(s.key_file), station_id=s.station_id)
        try:
            local = {r["uid"]: r for r in rec.attempts(100)}
        finally:
            rec.close()
        central = [r for r in read_rows(attempts, "jsonl") if r["station_id"] == s.station_id]
        assert len(central) == len(local) == 2
        for row in central:
            assert {k: row[k] for k in row} == {k: local[row["uid"]].get(k) for k in row}, row["uid"]


def test_two_machines_exporting_at_once_make_one_series(tmp_path, pg_url):
    from concurrent.futures import ThreadPoolExecutor

    from station.audit import ExportFilter
    from station.central import migrate
    from station.central_audit import _EXPORT_LOCK
    from station.central_audit import export as central_export
    from tests.conftest import wait_until

    one = Line(tmp_path, "line-1", pg_url)
    try:
        one.unit(mac(1))
        one.ship()
    finally:
        one.close()
    trusted = {"line-1": [one.key.public_key()]}

    def run(tag: str):
        with psycopg.connect(pg_url, autocommit=True) as conn:
            return central_export(conn, tmp_path / f"{tag}.csv", "csv", ExportFilter(), tag,
                                  signing_key(tmp_path / f"{tag}.pem"), trusted)

    with psycopg.connect(pg_url, autocommit=True) as holder, ThreadPoolExecutor(2) as pool:
        migrate(holder)
        holder.execute("SELECT pg_advisory_lock(%s)", [_EXPORT_LOCK])
        try:  # both exports start while the lock is held: each must wait for it, then read the other's
            futures = [pool.submit(run, tag) for tag in ("qa-1", "qa-2")]
            wait_until(lambda: holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT "
                                              "granted").fetchone()[0] == 2, "both exports wait for the export lock")
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", [_EXPORT_LOCK])
        manifests = sorted((f.result(timeout=60) for f in futures), key=lambda m: m["central"]["number"])
    first, second = manifests
    assert [first["central"]["number"], second["central"]["number"]] == [1, 2]
    body = (tmp_path / f"{first['station_id']}.csv.manifest.json").read_bytes()
    assert second["previous_export"]["manifest_sha256"] == hashlib.sha256(body).hexdigest()
    assert second["journal"]["stations"]["line-1"]["after_seq"] == first["journal"]["stations"]["line-1"]["entries"]


def test_without_a_reachable_central_record_nothing_is_exported_and_the_password_never_shows(tmp_path, capsys,
                                                                                            monkeypatch):
    import socket

    from tests.station.test_central import PASSWORD_IN_TEST

    alone = tmp_path / "alone.toml"
    alone.write_text('station_id = "alone"\n')
    rc, _, err = export(capsys, alone, tmp_path / "x.csv")
    assert rc == 2 and "no [central] url" in err
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_station(tmp_path, "office", f"postgresql://station@127.0.0.1:{port}/plant")
    monkeypatch.setenv("STATION_CENTRAL_PASSWORD", PASSWORD_IN_TEST)
    rc, out, err = export(capsys, cfg, tmp_path / "x.csv")
    assert rc == 3 and f"127.0.0.1:{port}/plant" in err and "out of reach" in err
    assert PASSWORD_IN_TEST not in out + err
    assert not list(tmp_path.glob("x.csv*"))


def test_a_central_export_for_one_lot_withholds_the_other_lots_entries_at_every_station(tmp_path, pg_url, capsys):
    """The quality office exports lot B for its customer from the central copy: each station's segment
    keeps every entry's place and hashes but not other lots' bodies; it verifies."""
    one, two = Line(tmp_path, "line-1", pg_url), Line(tmp_path, "line-2", pg_url)
    try:
        a1 = one.unit(mac(1), lot="LOT-A")
        b1 = one.unit(mac(2), lot="LOT-B")
        a2 = two.unit(mac(3), lot="LOT-A")
        b2 = two.unit(mac(4), lot="LOT-B")
        one.ship()
        two.ship()
        cfg = office(tmp_path, pg_url, one, two)
    finally:
        one.close()
        two.close()
    out = tmp_path / "lot-b.jsonl"
    rc, _, err = export(capsys, cfg, out, "--format", "jsonl", "--lot", "LOT-B", "--outcome", "any")
    assert rc == 0, err
    journal = (tmp_path / "lot-b.jsonl.journal.jsonl").read_text()
    for other in (mac(1), mac(3), a1, a2, "LOT-A"):
        assert other not in journal, f"{other} of lot A is in lot B's central journal"
    for own in (mac(2), mac(4), b1, b2):
        assert own in journal
    manifest = json.loads((tmp_path / "lot-b.jsonl.manifest.json").read_text())
    assert manifest["journal"]["scope"] == {"lot": "LOT-B"} and manifest["journal"]["withheld"] > 0
    rc, text, err = verify(capsys, cfg, out)
    assert rc == 0, text + err
    assert "entries about attempts outside lot LOT-B are withheld" in text + err
