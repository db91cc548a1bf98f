"""Benchmark: a signed export of 1,000,000 attempts — time and peak memory.

Generates a station database with N attempts (a hash-chained record, as the station
writes it), then runs `station export --outcome any` in a fresh process for
N = 100k, 300k and 1M, reporting wall time and the process's peak RSS. Memory must
stay flat as rows grow (rows stream from SQLite to the file). Targets at 1M rows:
under 30 s and under 200 MB.

    python benchmarks/export.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from station.record import CHAIN_GENESIS, Attempt, Record  # noqa: E402
from station.record import _legacy_digest as row_digest  # noqa: E402  (m002's row hash: export reads no chain)


def generate(db_path: Path, n: int) -> None:
    record = Record(db_path)
    db = record.db()
    cols = [c.name for c in db["attempts"].columns]
    prev = CHAIN_GENESIS
    batch = []
    base = Attempt(port="/dev/ttyUSB0", station_id="bench", profile="relay", profile_hash="ab" * 32,
                   started_at="2026-11-26T10:00:00.000+00:00", ended_at="2026-11-26T10:00:30.000+00:00",
                   outcome="passed", operator="op", lot="LOT-1", chip="ESP32",
                   firmware_hashes={"0x1000": "cd" * 32, "0x8000": "ef" * 32, "0x10000": "01" * 32},
                   config_sha256="23" * 32, token_fingerprint="hmac-sha256:" + "45" * 16,
                   durations={"connect": 0.2, "identify": 0.7, "flash": 8.7, "boot": 0.8}, baud=921600,
                   firmware_version="1.4.2").row()
    t = time.perf_counter()
    con = db.conn
    sql = f"insert into attempts ({', '.join(cols)}) values ({', '.join('?' for _ in cols)})"
    for i in range(1, n + 1):
        row = dict.fromkeys(cols)
        row.update(base, id=i, mac=f"24:0a:c4:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                   serial=f"RLY-261126-{i:07d}", device_id=f"24-0a-c4-{i:06x}", prev_hash=prev)
        row["row_hash"] = prev = row_digest(prev, row)
        batch.append([row[c] for c in cols])
        if len(batch) == 20000:
            con.executemany(sql, batch)
            con.commit()
            batch.clear()
    if batch:
        con.executemany(sql, batch)
        con.commit()
    record.close()
    print(f"  generated {n} attempts in {time.perf_counter() - t:.1f} s", flush=True)


def export_once(db_path: Path, out: Path, cfg: Path) -> tuple[float, float, dict]:
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "station", "export", "--config", str(cfg), "--db",
                             str(db_path), "--outcome", "any", "--format", "csv", "--out", str(out)],
                            cwd=REPO, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    if status != 0:
        raise SystemExit(proc.stderr.read().decode())
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    return elapsed, usage.ru_maxrss / 1024, manifest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    sizes = sorted({min(args.rows, 100_000), min(args.rows, 300_000), args.rows})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = tmp / "station.toml"
        cfg.write_text('station_id = "bench"\nsigning_key = "bench.pem"\n')
        print(f"{'rows':>9} {'export s':>9} {'peak RSS MB':>12} {'file MB':>8}")
        for n in sizes:
            db = tmp / f"bench-{n}.db"
            generate(db, n)
            out = tmp / f"export-{n}.csv"
            elapsed, rss, manifest = export_once(db, out, cfg)
            assert manifest["rows"] == n
            print(f"{n:>9} {elapsed:>9.1f} {rss:>12.1f} {out.stat().st_size / 1e6:>8.1f}", flush=True)
            db.unlink()
            out.unlink()


if __name__ == "__main__":
    main()
