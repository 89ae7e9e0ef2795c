"""``--executor ray`` on a local Ray cluster (2 CPUs): same ledger as the local executor, and a
worker killed mid-run never duplicates committed work."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from engine_helpers import write_config, write_csvs

from pipeline.config import load_config
from pipeline.registry import find_stage
from pipeline.runner import run_stage
from pipeline.stage import RunContext, RunOptions

N = 24


@pytest.fixture
def toyapp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVCAPS_APP", "toyapp")


def make_run(tmp_path: Path, name: str, script: dict[str, str], extra: str = "") -> RunContext:
    from toyapp import ToyConfig

    rows = [(i + 1, f"t{i:010d}", i, f"caption {i}") for i in range(N)]
    csv_dir = write_csvs(tmp_path / "csv", {"test": rows})
    (tmp_path / f"{name}.json").write_text(json.dumps(script))
    cfg_path = write_config(
        tmp_path / f"{name}.yaml",
        tmp_path / name,
        csv_dir,
        ["test"],
        f"toy:\n  batch_size: 4\n  backoff_s: 0.01\n  script: {tmp_path / f'{name}.json'}\n"
        f"  work_log: {tmp_path / f'{name}.log'}\n{extra}",
    )
    cfg = load_config(ToyConfig, cfg_path)
    ctx = RunContext(workdir=cfg.workdir, config=cfg)
    run_stage(find_stage("manifest"), ctx, RunOptions(progress=False))
    return ctx


def state(ctx: RunContext) -> pd.DataFrame:
    df = pd.read_parquet(ctx.workdir / "01-toy" / "ledger")
    df = df.sort_values("seq").drop_duplicates("clip_id", keep="last").set_index("clip_id").sort_index()
    return df[["status", "reason", "attempts", "toy_out", "toy_file"]]


SCRIPT = {
    "t0000000003_3000_13000": "transient:1",
    "t0000000004_4000_14000": "permanent",
    "t0000000005_5000_15000": "boom",
    "t0000000006_6000_16000": "transient:9",
}


def test_ray_ledger_equals_local_ledger(tmp_path: Path, cluster: None, toyapp: None) -> None:
    local = make_run(tmp_path, "local", SCRIPT)
    distributed = make_run(tmp_path, "ray", SCRIPT)
    run_stage(find_stage("toy"), local, RunOptions(progress=False))
    run_stage(find_stage("toy"), distributed, RunOptions(progress=False, executor="ray"))
    a, b = state(local), state(distributed)
    assert len(a) == N
    pd.testing.assert_frame_equal(a.drop(columns=["toy_file"]), b.drop(columns=["toy_file"]))
    assert (a["toy_file"].dropna() == b["toy_file"].dropna()).all()
    assert b.loc["t0000000003_3000_13000", "status"] == "ok"
    assert b.loc["t0000000006_6000_16000", "attempts"] == 3


def test_an_abort_in_a_worker_stops_the_run_with_its_exit_status(
    tmp_path: Path, cluster: None, toyapp: None
) -> None:
    """A worker's RunThrottled reaches the driver as itself (Ray Data would re-raise it as its own
    UserCodeException, exit status lost); the results it carries are committed, the items it
    never tried get no row."""
    from pipeline.errors import RunThrottled

    ctx = make_run(tmp_path, "throttle", {"t0000000010_10000_20000": "throttle"})
    with pytest.raises(RunThrottled, match="the toy source refuses this host") as err:
        run_stage(find_stage("toy"), ctx, RunOptions(progress=False, executor="ray"))
    assert err.value.exit_code == 4
    done = state(ctx)
    assert (done["status"] == "ok").all()
    # Its batch (items 8-11): the two before it are committed, it and the one after are not.
    assert {"t0000000008_8000_18000", "t0000000009_9000_19000"} <= set(done.index)
    assert not {"t0000000010_10000_20000", "t0000000011_11000_21000"} & set(done.index)


def test_worker_killed_mid_run_then_rerun(tmp_path: Path, cluster: None, toyapp: None) -> None:
    ctx = make_run(tmp_path, "kill", {}, "  sleep_s: 0.3\n")
    log = tmp_path / "kill.log"
    killed: list[int] = []

    def kill_first_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.exists() and log.read_text().strip():
                pid = int(log.read_text().split()[1])
                if pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    # Ray may retry the killed task or give up on it: either way the rerun must finish the stage.
    with contextlib.suppress(Exception):
        run_stage(find_stage("toy"), ctx, RunOptions(progress=False, executor="ray"))
    killer.join()
    assert killed, "no worker was killed"
    run_stage(find_stage("toy"), ctx, RunOptions(progress=False, executor="ray"))
    history = pd.read_parquet(ctx.workdir / "01-toy" / "ledger")
    assert len(history) == N and history["clip_id"].is_unique, "a batch was committed twice"
    assert (history["status"] == "ok").all()
