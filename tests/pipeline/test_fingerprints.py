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


def test_a_changed_setting_makes_its_stage_stale_and_later_ones_wait(fp: dict) -> None:
    st = status(fp)
    assert st["01-toy"]["stale"] == 0 and st["02-echo"]["stale"] == 0 and st["02-echo"]["ok"] == N

    spicy = ("toy.flavour=spicy",)
    st = status(fp, *spicy)
    # Toy's rows are stale; echo's are made from toy's current values, so they wait (and say so).
    assert st["01-toy"]["stale"] == N and st["02-echo"]["stale"] == 0
    assert st["02-echo"]["waiting_on_stale"] == {"01-toy": N}
    # Nothing downstream takes a stale row: echo waits until toy is redone, and its run says so.
    report = run(fp, "echo", *spicy)
    assert report.selected == 0
    assert f"{N} wait for stage 01-toy" in report.message and "run `avcaps run 1` first" in report.message
    assert run(fp, "toy", *spicy).selected == N
    st = status(fp, *spicy)
    # Toy's new values are not the ones echo's rows read: now they are stale.
    assert st["01-toy"]["stale"] == 0 and st["02-echo"]["stale"] == N
    assert st["02-echo"]["by_split"]["test"]["stale"] == N
    assert run(fp, "echo", *spicy).selected == N
    assert status(fp, *spicy)["02-echo"]["stale"] == 0
    assert all(v.endswith(":spicy/v1") for v in current(fp, "echo")["echo"])
    assert run(fp, "echo", *spicy).selected == 0  # and a rerun does nothing

    # Back to the first setting: stale again (a fingerprint is of the settings, not of a version).
    assert status(fp)["01-toy"]["stale"] == N


def test_a_redo_that_makes_the_same_values_leaves_later_stages_current(fp: dict) -> None:
    """A setting in toy's fingerprint that leaves its output as it is: toy is redone, echo (which
    reads toy's values, not its rows' fingerprints) stays current and is not redone."""
    neutral = ("toy.neutral=b",)
    assert status(fp, *neutral)["01-toy"]["stale"] == N
    assert run(fp, "toy", *neutral).selected == N
    st = status(fp, *neutral)
    assert st["01-toy"]["stale"] == 0 and st["02-echo"]["stale"] == 0
    assert "waiting_on_stale" not in st["02-echo"]
    assert run(fp, "echo", *neutral).selected == 0


@pytest.mark.parametrize("legacy", [("toy", "echo"), ("echo",)], ids=["every-stage", "behind-current-rows"])
def test_rows_of_the_chained_fingerprints_keep_working(fp: dict, legacy: tuple[str, ...]) -> None:
    """A run folder whose rows carry the fingerprints of before (the settings chained with the
    upstream row's fingerprint): current as they are, stale when a setting changes. Also when
    only a later stage's rows are that old (the chain is made through stages with none)."""
    import pyarrow as pa

    from pipeline.fingerprint import chain, settings_fingerprint

    manifest = stage_ledger(find_stage("manifest"), fp["workdir"]).latest_table(["fingerprint"])
    by_id = dict(zip(manifest["clip_id"].to_pylist(), manifest["fingerprint"].to_pylist(), strict=True))
    c = ctx(fp)
    toy, echo = find_stage("toy")(c), find_stage("echo")(c)
    toy_fp: dict[str, str] = {}
    for stage, up in ((toy, by_id), (echo, None)):
        led = stage_ledger(type(stage), fp["workdir"])
        rows = led.latest_table().drop_columns(["seq", "updated_at"]).to_pylist()
        settings = settings_fingerprint(stage, stage.legacy_fingerprint_settings()[0])
        ups = [(up or toy_fp)[r["clip_id"]] for r in rows]
        old = chain(settings, pa.array(ups, pa.string())).to_pylist()
        if stage is toy:
            toy_fp = {r["clip_id"]: f for r, f in zip(rows, old, strict=True)}
        if stage.name in legacy:
            led.commit(
                [{**r, "fingerprint": f, "layer_fingerprint": None} for r, f in zip(rows, old, strict=True)]
            )
    for name in ("toy", "echo"):
        assert current(fp, name)["fingerprint"].str.startswith("r:").any() == (name not in legacy)
    st = status(fp)
    assert st["01-toy"]["stale"] == 0 and st["02-echo"]["stale"] == 0
    assert run(fp, "toy").selected == 0 and run(fp, "echo").selected == 0
    assert status(fp, "toy.flavour=x")["01-toy"]["stale"] == N


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
