"""Ledger mechanics, sharding and config validation."""

from __future__ import annotations

import functools
import operator
from pathlib import Path

import pyarrow as pa
import pytest
from engine_helpers import avcaps

from pipeline.config import ConfigError, load_config
from pipeline.errors import AbortRun
from pipeline.io import atomic_path, clean_temp_files
from pipeline.ledger import Ledger
from pipeline.sharding import parse_shard, shard_of
from stages.config import RunConfig


def test_latest_row_wins_and_compaction_keeps_state(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger", [pa.field("x", pa.int64())])
    led.commit([{"clip_id": "a", "status": "failed_transient", "attempts": 1, "x": None}])
    led.commit(
        [
            {"clip_id": "a", "status": "ok", "attempts": 2, "x": 5},
            {"clip_id": "b", "status": "ok", "attempts": 1, "x": 7},
        ]
    )
    state = led.latest()
    assert state.loc["a", "status"] == "ok" and state.loc["a", "x"] == 5 and len(state) == 2
    led.compact()
    assert len(led.parts()) == 1
    assert led.latest()[["status", "x"]].to_dict() == state[["status", "x"]].to_dict()


def test_temp_parts_are_never_read(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger")
    led.commit([{"clip_id": "a", "status": "ok", "attempts": 1}])
    (tmp_path / "ledger" / ".tmp-x-1-abc-part-0.parquet").write_bytes(b"half a parquet file")
    assert list(led.latest().index) == ["a"]


def test_replace_all_recovers_from_a_crash_between_renames(tmp_path: Path) -> None:
    folder = tmp_path / "ledger"
    led = Ledger(folder)
    led.commit([{"clip_id": "old", "status": "ok", "attempts": 1}])
    # Simulate a crash after the new table was written and the old folder moved aside.
    new = Ledger(tmp_path / "ledger.new")
    new.commit([{"clip_id": "new", "status": "ok", "attempts": 1}])
    folder.rename(tmp_path / "ledger.old")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # A reader sees the complete new table and changes nothing ...
    assert list(Ledger(folder).latest().index) == ["new"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # ... the next writer finishes the swap.
    Ledger(folder).recover()
    assert list(Ledger(folder).latest().index) == ["new"]
    assert not (tmp_path / "ledger.old").exists() and not (tmp_path / "ledger.new").exists()


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "media" / "x.jpg"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash while writing")
    assert not dest.exists() and list((tmp_path / "media").iterdir()) == []


def test_clean_temp_files_spares_live_writers(tmp_path: Path) -> None:
    import os
    import socket

    host = socket.gethostname().replace("-", "_")
    live = tmp_path / f".tmp-{host}-{os.getpid()}-aaaa-x.jpg"
    dead = tmp_path / f".tmp-{host}-999999999-bbbb-y.jpg"
    live.write_bytes(b"1")
    dead.write_bytes(b"2")
    assert clean_temp_files(tmp_path) == 1
    assert live.exists() and not dead.exists()


def test_shard_parsing_and_stability() -> None:
    assert parse_shard("2/5") == (2, 5) and parse_shard(None) is None
    for bad in ("5/5", "x", "1/0", "-1/3"):
        with pytest.raises(AbortRun):
            parse_shard(bad)
    # Stable across processes and Python versions (not the salted built-in hash).
    assert shard_of("7fmOlUlwoNg_20000_30000", 1000) == shard_of("7fmOlUlwoNg_20000_30000", 1000)
    ids = [f"clip{i}" for i in range(2000)]
    for n in (1, 2, 3, 8, 13):
        buckets = [[c for c in ids if shard_of(c, n) == i] for i in range(n)]
        assert sorted(functools.reduce(operator.iadd, buckets, [])) == sorted(ids)
        assert min(len(b) for b in buckets) > 0.7 * len(ids) / n


def test_unknown_key_is_named_with_its_path(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workdir: x\nmanifest:\n  csv_dirr: y\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, cfg)
    assert f"invalid configuration in {cfg}" in str(err.value)
    assert "manifest.csv_dirr: unknown key" in str(err.value)


def test_wrong_type_and_bad_values(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("manifest:\n  sample_per_split: -3\n  seed: abc\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, cfg)
    assert "manifest.sample_per_split:" in str(err.value) and "manifest.seed:" in str(err.value)
    cfg.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(RunConfig, cfg)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "missing.yaml")


def test_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workdir: a\n")
    loaded = load_config(RunConfig, cfg, ["manifest.sample_per_split=12", "manifest.splits={test: t.csv}"])
    assert loaded.manifest.sample_per_split == 12 and loaded.manifest.splits == {"test": "t.csv"}
    with pytest.raises(ConfigError, match=r"manifest\.nope: unknown key"):
        load_config(RunConfig, cfg, ["manifest.nope=1"])
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        load_config(RunConfig, cfg, ["justakey"])


def test_cli_config_show_and_errors(tmp_path: Path) -> None:
    proc = avcaps(
        "config",
        "show",
        "--config",
        "manifests/demo.yaml",
        "--set",
        "manifest.seed=7",
        "--workdir",
        str(tmp_path / "w"),
        app=None,
        check=True,
    )
    assert "seed: 7" in proc.stdout and f"workdir: {tmp_path / 'w'}" in proc.stdout
    assert "sample_per_split: 12" in proc.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("manifest:\n  typo: 1\n")
    proc = avcaps("status", "--config", str(bad), app=None)
    assert proc.returncode == 2 and "manifest.typo: unknown key" in proc.stderr
    proc = avcaps(
        "run", "nosuchstage", "--config", "manifests/demo.yaml", "--workdir", str(tmp_path), app=None
    )
    assert proc.returncode == 2 and "valid stages: 0 (manifest)" in proc.stderr
