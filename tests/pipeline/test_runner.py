"""The runner and ledger through a toy stage: resume after SIGKILL, retries, sharding, status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from engine_helpers import HERE, avcaps, write_config, write_csvs

from pipeline.config import load_config
from pipeline.errors import AbortRun
from pipeline.registry import find_stage
from pipeline.runner import run_stage
from pipeline.stage import RunContext, RunOptions
from pipeline.status import run_status

N = 24


@pytest.fixture
def run(tmp_path: Path, toyapp: None) -> dict:
    """A toy run folder: N test clips + 4 train clips, stage 0 done."""
    test_rows = [(i + 1, f"t{i:010d}", i, f"test caption {i}") for i in range(N)]
    train_rows = [(100 + i, f"r{i:010d}", i, f"train caption {i}") for i in range(4)]
    csv_dir = write_csvs(tmp_path / "csv", {"train": train_rows, "test": test_rows})
    script = tmp_path / "script.json"
    script.write_text("{}")
    cfg = write_config(
        tmp_path / "toy.yaml",
        tmp_path / "run",
        csv_dir,
        ["train", "test"],
        f"toy:\n  batch_size: 4\n  backoff_s: 0.01\n  script: {script}\n"
        f"  work_log: {tmp_path / 'work.log'}\n",
    )
    info = {"cfg": cfg, "script": script, "log": tmp_path / "work.log", "workdir": tmp_path / "run"}
    run_stage(find_stage("manifest"), ctx(info), RunOptions(progress=False))
    return info


def ctx(info: dict, *overrides: str) -> RunContext:
    from toyapp import ToyConfig

    cfg = load_config(ToyConfig, info["cfg"], list(overrides))
    return RunContext(workdir=cfg.workdir, config=cfg)


def toy(info: dict, *overrides: str, **opts: object) -> object:
    return run_stage(find_stage("toy"), ctx(info, *overrides), RunOptions(progress=False, **opts))


def history(info: dict) -> pd.DataFrame:
    return pd.read_parquet(info["workdir"] / "01-toy" / "ledger")


def latest(info: dict) -> pd.DataFrame:
    df = history(info).sort_values("seq").drop_duplicates("clip_id", keep="last")
    return df.set_index("clip_id")


def work(info: dict) -> list[str]:
    lines = info["log"].read_text().splitlines() if info["log"].exists() else []
    return [line.split()[0] for line in lines]


def test_runs_every_item_once_and_rerun_does_nothing(run: dict) -> None:
    toy(run)
    df = latest(run)
    assert len(df) == N + 4 and (df["status"] == "ok").all()
    assert sorted(work(run)) == sorted(df.index)
    for clip_id, rel in df["toy_file"].items():
        assert (run["workdir"] / rel).read_text().endswith(clip_id.split("_")[0][-1])
    report = toy(run)
    assert "nothing to do" in report.message
    assert len(work(run)) == N + 4


def test_transient_retried_with_backoff_then_ok(run: dict) -> None:
    ids = sorted(pd.read_parquet(run["workdir"] / "00-manifest" / "ledger")["clip_id"])
    run["script"].write_text(json.dumps({ids[0]: "transient:2", ids[1]: "transient:9"}))
    toy(run)
    df = latest(run)
    assert df.loc[ids[0], "status"] == "ok" and df.loc[ids[0], "attempts"] == 3
    assert df.loc[ids[1], "status"] == "failed_transient" and df.loc[ids[1], "attempts"] == 3
    assert df.loc[ids[1], "reason"] == "http_429"
    assert work(run).count(ids[0]) == 3
    # Exhausted: a plain rerun leaves it; --retry-failed gives it a fresh budget.
    toy(run)
    assert work(run).count(ids[1]) == 3
    toy(run, retry_failed=True)
    assert work(run).count(ids[1]) == 6


def test_permanent_not_retried_unless_asked(run: dict) -> None:
    ids = sorted(pd.read_parquet(run["workdir"] / "00-manifest" / "ledger")["clip_id"])
    run["script"].write_text(json.dumps({ids[2]: "permanent"}))
    toy(run)
    assert latest(run).loc[ids[2], "status"] == "failed_permanent"
    assert latest(run).loc[ids[2], "reason"] == "removed"
    toy(run)
    assert work(run).count(ids[2]) == 1
    run["script"].write_text("{}")
    toy(run, retry_failed=True)
    assert latest(run).loc[ids[2], "status"] == "ok" and work(run).count(ids[2]) == 2
    toy(run, force=True)
    assert len(work(run)) == 2 * (N + 4) + 1
    assert (latest(run)["status"] == "ok").all()


def test_unexpected_error_fails_only_its_item(run: dict) -> None:
    ids = sorted(pd.read_parquet(run["workdir"] / "00-manifest" / "ledger")["clip_id"])
    run["script"].write_text(json.dumps({ids[5]: "boom"}))
    toy(run)
    df = latest(run)
    assert df.loc[ids[5], "status"] == "failed_permanent"
    assert df.loc[ids[5], "reason"] == "unexpected:ValueError"
    assert "boom on" in df.loc[ids[5], "message"] and "toyapp.py" in df.loc[ids[5], "message"]
    assert (df.drop(index=ids[5])["status"] == "ok").all()


def test_abort_stops_the_run_and_keeps_committed_batches(run: dict) -> None:
    ids = sorted(pd.read_parquet(run["workdir"] / "00-manifest" / "ledger")["clip_id"])
    run["script"].write_text(json.dumps({ids[10]: "abort"}))
    with pytest.raises(AbortRun, match="toy model is missing"):
        toy(run)
    done = latest(run)
    assert len(done) == 8 and (done["status"] == "ok").all()  # the two batches before it
    proc = avcaps("run", "toy", "--config", str(run["cfg"]), "--no-progress")
    assert proc.returncode == 2 and "error: the toy model is missing" in proc.stderr


def test_an_abort_from_process_commits_the_batch_results_it_carries(run: dict) -> None:
    """RunThrottled (exit 4) raised mid-batch with the results finished before it: those are
    committed; the items never tried get no row, so they keep every attempt."""
    ids = sorted(pd.read_parquet(run["workdir"] / "00-manifest" / "ledger")["clip_id"])
    run["script"].write_text(json.dumps({ids[9]: "throttle", ids[2]: "transient:1"}))
    proc = avcaps("run", "toy", "--config", str(run["cfg"]), "--no-progress")
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: the toy source refuses this host"
    done = latest(run)
    # Batches of 4 in clip-table order: the first two batches, and the one item of the third
    # batch before the throttling one (the toy works through a batch in order).
    batch3 = work(run)[8:12]
    before = batch3[: batch3.index(ids[9])]
    assert set(done.index) == set(work(run)[:8]) | set(before)
    assert ids[9] not in done.index and not set(batch3[batch3.index(ids[9]) :]) & set(done.index)
    # Status says the last run stopped, and why.
    stats = json.loads((run["workdir"] / "01-toy" / "stats.json").read_text())
    assert stats["last_run"]["exit_code"] == 4
    assert stats["last_run"]["message"] == "stopped: the toy source refuses this host"
    from pipeline.status import format_table

    table = format_table(run_status(ctx(run)))
    assert "last run stopped (exit 4)" in table and "! stopped: the toy source refuses this host" in table
    # The next run (the source answering again) does the rest; every item ok, tried once
    # (the transient one twice).
    run["script"].write_text(json.dumps({ids[2]: "transient:1"}))
    toy(run)
    final = latest(run)
    assert (final["status"] == "ok").all() and len(final) == N + 4
    assert final.loc[ids[9], "attempts"] == 1 and final.loc[ids[2], "attempts"] == 2


def test_wants_filters_items(run: dict) -> None:
    toy(run, "toy.only_split=train")
    assert len(latest(run)) == 4


def test_limit(run: dict) -> None:
    toy(run, limit=5)
    assert len(latest(run)) == 5
    toy(run)
    assert len(latest(run)) == N + 4 and history(run)["clip_id"].is_unique


def test_a_stage_orders_its_items(run: dict) -> None:
    """ItemStage.order: batches, --limit and shards take the clips in the order the stage gives."""
    from pipeline.errors import AbortRun

    table_order = list(table_clips(run, "toy.order=table"))
    toy(run, "toy.order=reverse", limit=5)
    assert work(run) == table_order[::-1][:5]  # the last five clips of the table, last first
    toy(run, "toy.order=reverse", shard=(0, 2))
    shard = work(run)[5:]
    assert shard == [c for c in table_order[::-1][5:] if c in set(shard)]  # the order holds in a shard
    with pytest.raises(AbortRun, match=r"order\(\) must give a permutation of its"):
        toy(run, "toy.order=broken", force=True)


def table_clips(info: dict, *overrides: str) -> list[str]:
    """The clips the toy stage applies to, in clip-table order."""
    from pipeline.selection import selected, upstream_ok

    c = ctx(info, *overrides)
    stage = find_stage("toy")(c)
    return selected(stage, upstream_ok(type(stage), c))["clip_id"].to_pylist()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_shards_partition_the_items(run: dict, n: int) -> None:
    seen: list[str] = []
    for i in range(n):
        before = set(latest(run).index) if (run["workdir"] / "01-toy").exists() else set()
        toy(run, shard=(i, n))
        after = set(latest(run).index)
        seen.extend(after - before)
    assert len(seen) == len(set(seen)) == N + 4
    assert history(run)["clip_id"].is_unique  # no item done twice


def test_changing_shard_count_between_runs_is_safe(run: dict) -> None:
    toy(run, shard=(0, 2))
    for i in range(3):
        toy(run, shard=(i, 3))
    assert len(latest(run)) == N + 4 and history(run)["clip_id"].is_unique


def test_status_counts_reasons_and_splits(run: dict) -> None:
    ids = sorted(pd.read_parquet(run["workdir"] / "00-manifest" / "ledger")["clip_id"])
    test_ids = [c for c in ids if c.startswith("t")]
    run["script"].write_text(json.dumps({test_ids[0]: "permanent", test_ids[1]: "transient:9"}))
    toy(run, limit=10)
    st = run_status(ctx(run))["stages"][1]
    assert st["stage"] == "01-toy"
    assert (st["ok"], st["failed_permanent"], st["failed_transient"], st["pending"]) == (8, 1, 1, N + 4 - 10)
    assert st["reasons"] == {"http_429": 1, "removed": 1}
    assert st["by_split"]["test"]["failed_permanent"] == 1
    assert st["by_split"]["train"]["pending"] == 4 - sum(1 for c in ids[:10] if c.startswith("r"))
    proc = avcaps("status", "--config", str(run["cfg"]), "--json", check=True)
    assert json.loads(proc.stdout)["stages"][1]["reasons"] == {"http_429": 1, "removed": 1}
    table = avcaps("status", "--config", str(run["cfg"]), check=True).stdout
    assert "01-toy" in table and "removed=1" in table
    stats = json.loads((run["workdir"] / "01-toy" / "stats.json").read_text())
    assert stats["ok"] == 8 and stats["last_run"]["processed"] >= 10


def test_sigkill_mid_stage_then_resume(run: dict) -> None:
    """Kill -9 in the middle of the stage; the rerun finishes every item exactly once."""
    env = {
        **os.environ,
        "AVCAPS_APP": "toyapp",
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        "toy",
        "--config",
        str(run["cfg"]),
        "--set",
        "toy.sleep_s=0.1",
        "--set",
        "toy.commit_interval_s=0",  # commit every batch: a kill then loses the batch in flight only
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(work(run)) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(work(run))
    partial = latest(run) if (run["workdir"] / "01-toy" / "ledger").exists() else pd.DataFrame()
    assert 0 < killed_at < N + 4, "the kill must land mid-stage"
    assert len(partial) < N + 4
    subprocess.run([*cmd[:-5], "--no-progress"], env=env, check=True, capture_output=True)
    hist = history(run)
    assert hist["clip_id"].is_unique, "an item was committed twice"
    assert len(hist) == N + 4 and (hist["status"] == "ok").all()
    # Work lost to the kill is at most the batch in flight.
    assert len(work(run)) <= N + 4 + 4
    leftovers = list(run["workdir"].rglob(".tmp-*"))
    assert leftovers == [], leftovers


def test_a_stage_with_nothing_eligible_counts_as_run_for_the_next(tmp_path: Path, toyapp: None) -> None:
    """A run whose clips all fail upstream (or have no split a stage applies to) leaves a stage with
    no row at all; the stage after it must see zero clips, not "has not run yet"."""
    from pipeline.selection import upstream_ok

    csv_dir = write_csvs(tmp_path / "csv", {"train": [(1, "r0000000000", 0, "a train caption")]})
    cfg = write_config(
        tmp_path / "toy.yaml", tmp_path / "run", csv_dir, ["train"], "toy:\n  only_split: test\n"
    )
    info = {"cfg": cfg, "workdir": tmp_path / "run"}
    run_stage(find_stage("manifest"), ctx(info), RunOptions(progress=False))
    report = toy(info)
    assert report.selected == 0 and "nothing to do" in report.message
    assert not (tmp_path / "run" / "01-toy" / "ledger").exists()

    class After(find_stage("toy")):  # type: ignore[misc,valid-type]
        number, name, upstream = 2, "after", "toy"

    assert upstream_ok(After, ctx(info)).num_rows == 0
