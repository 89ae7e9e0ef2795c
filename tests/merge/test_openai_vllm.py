"""The openai backend against vLLM's real OpenAI-compatible server on 127.0.0.1 (tiny model, CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.errors import AbortRun
from pipeline.stage import RunContext
from stages.config import RunConfig
from stages.merge.stage import MergeStage
from standins.llm import make_merge_item

pytestmark = pytest.mark.slow
JSON_ANSWER = re.compile(r'\s*\{\s*"caption"\s*:\s*"')  # structured output: a random model never writes this


def stage_for(tmp_path: Path, url: str, *extra: str) -> MergeStage:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("manifest: {splits: {test: test.csv}}\n")
    overrides = [
        "merge.backend=openai",
        f"merge.base_url={url}",
        "merge.model=tiny-random-chat",
        "merge.reasoning_effort=low",  # accepted (and ignored) by a non-gpt-oss model
        "merge.max_new_tokens=64",
        "merge.max_chars=120",
        "merge.concurrency=8",
        "merge.score=false",  # these items carry no stage-2 media (tests/merge/test_scores.py scores)
        *extra,
    ]
    return MergeStage(RunContext(tmp_path / "run", load_config(RunConfig, cfg_file, overrides)))


def run(stage: MergeStage, items: list) -> list:
    stage.setup()
    try:
        return stage.process(items)
    finally:
        stage.teardown()


RELAXED = (
    "merge.min_audio_overlap=0",
    "merge.min_visual_overlap=0",
    "merge.max_invented=1",
    "merge.min_words=1",
)


def test_concurrent_structured_requests(tmp_path: Path, vllm_url: str) -> None:
    items = [make_merge_item(f"{c * 11}_0_10000") for c in "abc"]
    res = run(stage_for(tmp_path, vllm_url, *RELAXED), items)
    assert [r.status for r in res] == ["ok"] * 3, [(r.reason, r.message) for r in res]
    for r in res:
        out = r.outputs
        assert len(out["merged_captions"]) == 5 and all(out["merged_captions"])
        assert all(JSON_ANSWER.match(raw) for raw in out["merge_raw"]), out["merge_raw"]
        assert out["merge_backend"] == "openai" and out["merge_model"] == "tiny-random-chat"
        merges = json.loads(out["merge_checks"])["merges"]
        assert [m["tries"][-1]["caption"] for m in merges] == out["merged_captions"]
        # The grammar closes the JSON within max_chars, so the answer ends before max_tokens.
        assert {t["finish_reason"] for m in merges for t in m["tries"]} == {"stop"}
        for m in merges:  # usage is summed over the tries of one merge
            assert (
                m["prompt_tokens"] > 100 * m["n_tries"] and 0 < m["completion_tokens"] <= 64 * m["n_tries"]
            ), m


def test_default_gate_rejects_random_answers(tmp_path: Path, vllm_url: str) -> None:
    (res,) = run(stage_for(tmp_path, vllm_url), [make_merge_item("ddddddddddd_0_10000", split="train")])
    assert res.status == "failed_permanent" and res.reason.startswith("gate_"), res
    (merge,) = json.loads(res.outputs["merge_checks"])["merges"]
    assert [t["seed"] for t in merge["tries"]] == [0, 1, 2]
    assert len({t["raw"] for t in merge["tries"]}) == 3  # a new seed, a new answer


def test_unknown_model_stops_setup(tmp_path: Path, vllm_url: str) -> None:
    """Before the preflight each clip failed `http_404` for good; now nothing is tried
    (the CLI's exit status: test_preflight.py)."""
    stage = stage_for(tmp_path, vllm_url, "merge.model=no-such-model")
    with pytest.raises(AbortRun) as err:
        stage.setup()
    msg = str(err.value)
    assert vllm_url in msg and "'no-such-model'" in msg and "it serves: tiny-random-chat" in msg, msg
    assert stage.backend is None


def test_budget_beyond_the_served_context_stops_setup(tmp_path: Path, vllm_url: str) -> None:
    stage = stage_for(tmp_path, vllm_url, "merge.retry_max_new_tokens=4096")  # the server: 2048
    with pytest.raises(AbortRun, match=r"token budget of 4096 .* 2048-token context"):
        stage.setup()


def tries(res: Any) -> list[tuple[int, int, str, str]]:
    (merge,) = json.loads(res.outputs["merge_checks"])["merges"]
    return [(t["seed"], t["max_tokens"], t["finish_reason"], t["reason"]) for t in merge["tries"]]


def test_cut_off_answer_retried_once_with_a_larger_budget_then_truncated(
    tmp_path: Path, vllm_url: str
) -> None:
    """A budget too small to close the JSON: finish_reason "length", one retry with
    retry_max_new_tokens (same seed), still cut off: gate_truncated (not invalid_json)."""
    flags = ("merge.max_new_tokens=2", "merge.retry_max_new_tokens=4", "merge.max_quality_retries=0")
    (res,) = run(
        stage_for(tmp_path, vllm_url, *RELAXED, *flags),
        [make_merge_item("fffffffffff_0_10000", split="train")],
    )
    assert res.status == "failed_permanent" and res.reason == "gate_truncated", res
    assert tries(res) == [(0, 2, "length", "truncated"), (0, 4, "length", "truncated")]
    # The figures of the cut-off try are stored too.
    assert res.outputs["merge_raw"][0].startswith('{"')


def test_cut_off_answer_passes_with_the_larger_budget(tmp_path: Path, vllm_url: str) -> None:
    flags = ("merge.max_new_tokens=2", "merge.retry_max_new_tokens=64", "merge.max_quality_retries=0")
    (res,) = run(
        stage_for(tmp_path, vllm_url, *RELAXED, *flags),
        [make_merge_item("fffffffffff_0_10000", split="train")],
    )
    assert res.status == "ok", res
    assert tries(res) == [(0, 2, "length", "truncated"), (0, 64, "stop", "ok")]
    raw = json.loads(res.outputs["merge_raw"][0], strict=False)["caption"]  # complete JSON now
    assert " ".join(raw.split()) == res.outputs["merged_captions"][0]
