"""``avcaps run 4 --dry-run N``: the requests exactly as sent to vLLM's real server and the gate's
verdicts on its answers, for N clips a run would take, with nothing written to the run folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.ledger import Ledger
from pipeline.stage import RunContext
from stages.config import RunConfig
from stages.merge.backends import ChatRequest, OpenAIBackend
from stages.merge.gate import REASONS
from stages.merge.stage import MergeStage

pytestmark = pytest.mark.slow
OPENAI = {"backend": "openai", "model": "tiny-random-chat", "max_new_tokens": 32, "max_chars": 120}


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_dry_run_prints_requests_as_sent_and_verdicts(merge_run: Callable[..., Any], vllm_url: str) -> None:
    run = merge_run(3, merge={**OPENAI, "base_url": vllm_url})
    before = files(run.workdir)
    proc = run.avcaps("run", "4", "--dry-run", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files(run.workdir) == before  # no ledger, stats, run log or config written

    cfg = load_config(RunConfig, run.config, [f"workdir={run.workdir}"])
    stage = MergeStage(RunContext(run.workdir, cfg))
    backend = OpenAIBackend(stage.cfg)
    clips = Ledger(run.workdir / "00-manifest" / "ledger").latest()
    blocks = proc.stdout.split("=== ")[1:]
    assert len(blocks) == 2 * 5, proc.stdout[-3000:]  # 2 test clips, one merge per audio caption
    seen = set()
    for block in blocks:
        head, rest = block.split("\n", 1)
        clip_id = head.split()[0]
        seen.add(clip_id)
        assert clip_id in run.clip_ids and "(merge_v2, openai)" in head, head
        request, rest = rest.removeprefix("--- request\n").split("\n--- answer", 1)
        url, body = request.split("\n", 1)
        assert url == f"POST {vllm_url}/chat/completions"
        sent = json.loads(body)
        # Exactly the body a run posts for this merge: the stage's own messages, seed, budget.
        audio = sent["messages"][-1]["content"].split("\n")[0].removeprefix("Audio caption: ")
        assert audio in list(clips.loc[clip_id, "audio_captions"])
        visual = sent["messages"][-1]["content"].split("Visual caption: ")[1]
        messages = stage.prompt.messages([audio], visual, stage.cfg.max_words)
        assert sent == backend.body(ChatRequest(messages, seed=0, max_tokens=32))
        answer, verdict = rest.split("\n--- gate: ", 1)
        assert "finish_reason " in answer.split("\n")[0]
        reason = verdict.split(":")[0]
        assert reason == "ok" or reason.removeprefix("gate_") in REASONS, verdict
        figures = json.loads(verdict.split("\n")[1])
        assert {"audio_overlap", "visual_overlap", "invented_share", "finish_reason"} <= set(figures)
    assert len(seen) == 2
    backend.close()


def test_dry_run_of_a_stage_without_one(merge_run: Callable[..., Any]) -> None:
    run = merge_run(2)
    proc = run.avcaps("run", "3", "--dry-run", "1")
    assert proc.returncode == 2 and "stage 03-caption offers no dry run" in proc.stderr, proc.stderr
