"""Stage 4's preflight: a run that cannot merge anything stops before its first item, with exit
status 2 and one line naming the endpoint (or model path) and the model, and consumes no attempt.

Run as a user runs it (``avcaps run 4`` in a subprocess) on a run folder whose stages 0-3 are
written as a real run leaves them; the server cases use vLLM's real OpenAI-compatible server
(``--api-key`` for the key cases) and a port nobody listens on.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from standins.llmserver import free_port

pytestmark = pytest.mark.slow
OPENAI = {"backend": "openai", "model": "tiny-random-chat", "max_new_tokens": 32, "max_chars": 120}
RELAXED = {"min_audio_overlap": 0, "min_visual_overlap": 0, "min_words": 1, "max_invented": 1.0}


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The run's one error line (``error: ...``) on stderr; fails unless there is exactly one."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    return lines[0]


def assert_nothing_attempted(run: Any) -> None:
    """No merge row was written, and `avcaps status` still counts every clip pending."""
    assert not list((run.workdir / "04-merge").glob("ledger/*.parquet"))
    status = run.avcaps("status", "--json")
    assert status.returncode == 0, status.stderr
    (merge,) = [s for s in json.loads(status.stdout)["stages"] if s["stage"] == "04-merge"]
    assert merge["pending"] == len(run.clip_ids) and merge["failed_transient"] == 0, merge


def test_server_down_stops_the_run_before_any_item(merge_run: Callable[..., Any]) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # a port nobody listens on
    run = merge_run(3, merge={**OPENAI, "base_url": url, "retries": 1, "retry_backoff_s": 0.05})
    t0 = time.monotonic()
    proc = run.avcaps("run", "4")
    line = error_line(proc)
    assert url in line and "'tiny-random-chat'" in line and "unreachable" in line, line
    assert time.monotonic() - t0 < 60
    assert_nothing_attempted(run)


def test_unknown_model_stops_the_run(merge_run: Callable[..., Any], vllm_url: str) -> None:
    run = merge_run(3, merge={**OPENAI, "base_url": vllm_url, "model": "no-such-model"})
    line = error_line(run.avcaps("run", "4"))
    assert vllm_url in line and "'no-such-model'" in line and "tiny-random-chat" in line, line
    assert_nothing_attempted(run)


def test_missing_or_rejected_key_stops_the_run(
    merge_run: Callable[..., Any], keyed_vllm: tuple[str, str]
) -> None:
    keyed_vllm_url, key = keyed_vllm
    merge = {**OPENAI, **RELAXED, "base_url": keyed_vllm_url, "api_key_env": "AVCAPS_TEST_KEY"}
    run = merge_run(3, merge=merge)
    for env in ({}, {"AVCAPS_TEST_KEY": "not-the-key"}):
        line = error_line(run.avcaps("run", "4", env=env))
        assert keyed_vllm_url in line and "'tiny-random-chat'" in line and "HTTP 401" in line, line
        assert "$AVCAPS_TEST_KEY" in line and "not-the-key" not in line, line  # names the variable only
        assert_nothing_attempted(run)
    # With the key the same run merges (one clip, to keep it short).
    proc = run.avcaps("run", "4", "--limit", "1", env={"AVCAPS_TEST_KEY": key})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert key not in proc.stderr + proc.stdout
    assert "ok 1" in proc.stdout, proc.stdout


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_missing_model_path_stops_the_run(
    merge_run: Callable[..., Any], tmp_path: Path, backend: str
) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    for model, why in ((tmp_path / "no-such-model", "no such folder"), (empty, "no config.json")):
        run = merge_run(2, merge={"backend": backend, "model": str(model), "device": "cpu"})
        line = error_line(run.avcaps("run", "4"))
        assert str(model) in line and why in line and backend in line, line
        assert_nothing_attempted(run)
