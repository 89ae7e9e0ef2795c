"""A damaged ledger part (cut short, zero bytes, random bytes) or stats.json: status names it and
counts the rest, run refuses (exit 2) naming it, ``avcaps repair`` moves it to quarantine/ and the
next run redoes exactly the items whose current rows it held (issue 26)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from engine_helpers import avcaps, write_config, write_csvs

N = 24


def _run(tmp_path: Path, script: dict[str, str]) -> tuple[Path, Path]:
    rows = [(i + 1, f"t{i:010d}", i, f"caption {i}") for i in range(N)]
    csv_dir = write_csvs(tmp_path / "csv", {"test": rows})
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    log = tmp_path / "work.log"
    extra = (
        f"toy:\n  batch_size: 3\n  backoff_s: 0.01\n  commit_interval_s: 0\n  script: {path}\n"
        f"  work_log: {log}\n"
    )
    cfg = write_config(tmp_path / "toy.yaml", tmp_path / "run", csv_dir, ["test"], extra)
    avcaps("run", "0", "--config", str(cfg), "--no-progress", check=True)
    return cfg, log


def cid(i: int) -> str:
    return f"t{i:010d}_{i * 1000}_{i * 1000 + 10000}"


def _said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:") or "Traceback" in line]


def test_damaged_parts_are_named_refused_and_repaired(tmp_path: Path) -> None:
    # A history as a real run leaves it: retried items (a failed row, then an ok one in a later
    # part) and items that failed for good.
    script = {cid(1): "transient:1", cid(7): "transient:2", cid(13): "transient:1", cid(4): "permanent"}
    script[cid(20)] = "permanent"
    cfg, log = _run(tmp_path, script)
    avcaps("run", "toy", "--config", str(cfg), "--no-progress", check=True)
    ledger = tmp_path / "run" / "01-toy" / "ledger"
    parts = sorted(ledger.glob("part-*.parquet"))
    assert len(parts) >= 8
    history = pd.concat([pq.read_table(p).to_pandas().assign(part=p.name) for p in parts])
    latest = history.sort_values("seq").drop_duplicates("clip_id", keep="last").set_index("clip_id")

    # Three parts, each damaged its own way.
    cut, empty, noise = parts[1], parts[3], parts[-1]
    size = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[: size // 2])
    empty.write_bytes(b"")
    noise.write_bytes(os.urandom(noise.stat().st_size))
    lost = set(latest.index[latest["part"].isin([cut.name, empty.name, noise.name])])
    assert lost  # items whose current row was in a damaged part

    # Status names each part and counts the rest; it changes nothing.
    proc = avcaps("status", "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    toy = next(s for s in json.loads(proc.stdout)["stages"] if s["stage"] == "01-toy")
    named = {Path(d["path"]).name: d for d in toy["damaged_parts"]}
    assert named.keys() == {cut.name, empty.name, noise.name}
    assert named[empty.name]["bytes"] == 0 and "0 bytes" in named[empty.name]["problem"]
    assert "magic bytes" in named[cut.name]["problem"]
    assert sum(toy[k] for k in ("ok", "failed_permanent", "failed_transient", "pending")) == N
    table = avcaps("status", "--config", str(cfg), check=True).stdout
    assert all(f"01-toy/ledger/{p.name}" in table for p in (cut, empty, noise)), table
    assert "avcaps repair" in table

    # Run refuses, naming the parts, in one line.
    proc = avcaps("run", "toy", "--config", str(cfg), "--no-progress")
    assert proc.returncode == 2
    (line,) = _said(proc.stderr)
    assert all(p.name in line for p in (cut, empty, noise)) and "avcaps repair" in line, line

    # Repair quarantines them (never deletes) and says what became of the items.
    proc = avcaps("repair", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    quarantine = tmp_path / "run" / "01-toy" / "quarantine"
    assert sorted(p.name for p in quarantine.glob("*.parquet")) == sorted(p.name for p in (cut, empty, noise))
    assert (quarantine / empty.name).stat().st_size == 0
    assert (quarantine / cut.name).stat().st_size == size // 2
    note = json.loads((quarantine / f"{noise.name}.json").read_text())
    assert note["part"] == noise.name and note["problem"]
    assert "01-toy: damaged part" in proc.stdout and "items have no row now" in proc.stdout, proc.stdout

    # The next run redoes exactly the items whose current row was lost (and nothing else).
    log.unlink()
    proc = avcaps("run", "toy", "--config", str(cfg), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    redone = {line.split()[0] for line in log.read_text().splitlines()}
    assert redone == lost
    status = json.loads(avcaps("status", "--config", str(cfg), "--json", check=True).stdout)
    toy = next(s for s in status["stages"] if s["stage"] == "01-toy")
    assert "damaged_parts" not in toy and toy["quarantined_parts"] == 3
    assert toy["ok"] == N - 2 and toy["failed_permanent"] == 2 and toy["pending"] == 0
    assert avcaps("repair", "--config", str(cfg), check=True).stdout.strip().endswith("nothing to repair")


def test_a_damaged_upstream_part_or_stats_file_is_named(tmp_path: Path) -> None:
    cfg, _ = _run(tmp_path, {})
    avcaps("run", "toy", "--config", str(cfg), "--no-progress", check=True)
    stats = tmp_path / "run" / "01-toy" / "stats.json"
    stats.write_text(stats.read_text()[:40])  # cut short
    table = avcaps("status", "--config", str(cfg), check=True).stdout
    assert f"{stats}: not valid JSON" in table
    # A run rewrites it whole.
    avcaps("run", "toy", "--config", str(cfg), "--no-progress", check=True)
    assert json.loads(stats.read_text())["ok"] == N

    (clip_table,) = (tmp_path / "run" / "00-manifest" / "ledger").glob("part-*.parquet")
    clip_table.write_bytes(os.urandom(4096))
    proc = avcaps("run", "toy", "--config", str(cfg), "--no-progress")
    assert proc.returncode == 2
    (line,) = _said(proc.stderr)
    assert f"00-manifest/ledger/{clip_table.name} (4,096 bytes" in line, line
    proc = avcaps("status", "--config", str(cfg))
    assert proc.returncode == 0 and clip_table.name in proc.stdout, proc.stderr
    proc = avcaps("repair", "--config", str(cfg), "--stage", "0")
    assert proc.returncode == 0, proc.stderr
    assert "avcaps run 0" in proc.stdout  # the clip table is rebuilt by stage 0
    avcaps("run", "0", "--config", str(cfg), "--no-progress", check=True)
    proc = avcaps("run", "toy", "--config", str(cfg), "--no-progress")
    assert proc.returncode == 0, proc.stderr
