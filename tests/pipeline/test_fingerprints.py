"""Stale results never ship: every row knows what it was made from (issue 13), on a toy chain of two
item stages (``fpapp``: ``toy`` then ``echo``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from engine_helpers import write_config, write_csvs

from pipeline.config import load_config
from pipeline.registry import find_stage
from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunContext, RunOptions
from pipeline.status import run_status

N = 6


@pytest.fixture
def fp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("AVCAPS_APP", "fpapp")
    rows = [(i + 1, f"f{i:010d}", i, f"caption {i}") for i in range(N)]
    csv_dir = write_csvs(tmp_path / "csv", {"test": rows})
    toy = "toy:\n  write_file: false\n"
    cfg = write_config(tmp_path / "fp.yaml", tmp_path / "run", csv_dir, ["test"], toy)
    info = {"cfg": cfg, "workdir": tmp_path / "run", "tmp": tmp_path}
    for stage in ("manifest", "toy", "echo"):
        run(info, stage)
    return info


def ctx(info: dict, *overrides: str) -> RunContext:
    from fpapp import FpConfig

    cfg = load_config(FpConfig, info["cfg"], list(overrides))
    return RunContext(workdir=cfg.workdir, config=cfg)


def run(info: dict, stage: str, *overrides: str, **opts: object) -> object:
    return run_stage(find_stage(stage), ctx(info, *overrides), RunOptions(progress=False, **opts))


def status(info: dict, *overrides: str) -> dict[str, dict]:
    return {s["stage"]: s for s in run_status(ctx(info, *overrides))["stages"]}


def current(info: dict, stage: str) -> pd.DataFrame:
    return stage_ledger(find_stage(stage), info["workdir"]).latest()


def test_a_changed_setting_makes_its_stage_and_every_later_one_stale(fp: dict) -> None:
    st = status(fp)
    assert st["01-toy"]["stale"] == 0 and st["02-echo"]["stale"] == 0 and st["02-echo"]["ok"] == N

    spicy = ("toy.flavour=spicy",)
    st = status(fp, *spicy)
    assert st["01-toy"]["stale"] == N and st["02-echo"]["stale"] == N  # the echo of a stale toy row
    assert st["02-echo"]["by_split"]["test"]["stale"] == N
    # Nothing downstream takes a stale row: echo waits until toy is redone.
    assert run(fp, "echo", *spicy).selected == 0
    assert run(fp, "toy", *spicy).selected == N
    st = status(fp, *spicy)
    assert st["01-toy"]["stale"] == 0 and st["02-echo"]["stale"] == N
    assert run(fp, "echo", *spicy).selected == N
    assert status(fp, *spicy)["02-echo"]["stale"] == 0
    assert all(v.endswith(":spicy/v1") for v in current(fp, "echo")["echo"])
    assert run(fp, "echo", *spicy).selected == 0  # and a rerun does nothing

    # Back to the first setting: stale again (a fingerprint is of the settings, not of a version).
    assert status(fp)["01-toy"]["stale"] == N


def test_only_the_stage_whose_setting_changed_is_stale(fp: dict) -> None:
    st = status(fp, "echo.tag=v2")
    assert st["01-toy"]["stale"] == 0 and st["02-echo"]["stale"] == N
    assert run(fp, "echo", "echo.tag=v2").selected == N
    assert set(current(fp, "echo")["echo"].str[-3:]) == {"/v2"}


def test_a_failed_stale_redo_keeps_the_previous_result_current(fp: dict) -> None:
    before = current(fp, "echo")
    broken = sorted(before.index)[:2]
    fail = fp["tmp"] / "fail.json"
    fail.write_text(json.dumps(broken))
    report = run(fp, "echo", "echo.tag=v2", f"echo.fail={fail}")
    assert report.counts == {"ok": N - 2, "failed_permanent": 2}
    now = current(fp, "echo")
    for cid in broken:  # still ok, with the old output; the failure is in the row and the history
        assert now.loc[cid, "status"] == "ok" and now.loc[cid, "echo"] == before.loc[cid, "echo"]
        assert now.loc[cid, "reason"] == "kept_previous" and "echo_broken" in now.loc[cid, "message"]
    history = stage_ledger(find_stage("echo"), fp["workdir"]).read_all()
    assert set(history[history["status"] == "failed_permanent"]["clip_id"]) == set(broken)
    st = status(fp, "echo.tag=v2", f"echo.fail={fail}")["02-echo"]
    assert st["ok"] == N and st["stale"] == 2 and st["redo_failed"] == 2

    # A plain run tries the stale ones again; with --drop-previous the failure replaces them.
    report = run(fp, "echo", "echo.tag=v2", f"echo.fail={fail}", drop_previous=True)
    assert report.selected == 2
    now = current(fp, "echo")
    assert set(now.loc[broken, "status"]) == {"failed_permanent"}


def test_a_forced_redo_against_a_broken_stage_keeps_every_ok_row(fp: dict) -> None:
    before = current(fp, "echo")
    fail = fp["tmp"] / "fail.json"
    fail.write_text(json.dumps(sorted(before.index)))  # everything fails now
    report = run(fp, "echo", f"echo.fail={fail}", force=True)
    assert report.counts == {"failed_permanent": N}
    now = current(fp, "echo")
    assert (now["status"] == "ok").all() and (now["echo"] == before["echo"]).all()
    st = status(fp, f"echo.fail={fail}")["02-echo"]
    assert st["ok"] == N and st["stale"] == 0 and st["redo_failed"] == N


def test_rows_without_a_fingerprint_count_as_current(fp: dict) -> None:
    """Run folders from before fingerprints: their rows are taken as current, and new rows chain on."""
    for stage in ("toy", "echo"):
        led = stage_ledger(find_stage(stage), fp["workdir"])
        rows = led.latest_table().drop_columns(["seq", "updated_at"]).to_pylist()
        led.commit([{**r, "fingerprint": None} for r in rows])
    st = status(fp)
    assert st["01-toy"]["stale"] == 0 and st["02-echo"]["stale"] == 0
    assert run(fp, "toy").selected == 0 and run(fp, "echo").selected == 0
    assert status(fp, "toy.flavour=x")["01-toy"]["stale"] == 0  # nothing says otherwise
