"""The openai backend against vLLM's real OpenAI-compatible server on 127.0.0.1 (tiny model, CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.stage import RunContext
from stages.config import RunConfig
from stages.merge.gate import parse_answer
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
        *extra,
    ]
    return MergeStage(RunContext(tmp_path / "run", load_config(RunConfig, cfg_file, overrides)))


def run(stage: MergeStage, items: list) -> list:
    stage.setup()
    try:
        return stage.process(items)
    finally:
        stage.teardown()


RELAXED = ("merge.min_audio_overlap=0", "merge.min_visual_overlap=0", "merge.min_words=1")


def test_concurrent_structured_requests(tmp_path: Path, vllm_url: str) -> None:
    items = [make_merge_item(f"{c * 11}_0_10000") for c in "abc"]
    res = run(stage_for(tmp_path, vllm_url, *RELAXED), items)
    assert [r.status for r in res] == ["ok"] * 3, [(r.reason, r.message) for r in res]
    for r in res:
        out = r.outputs
        assert len(out["merged_captions"]) == 5 and all(out["merged_captions"])
        assert all(JSON_ANSWER.match(raw) for raw in out["merge_raw"]), out["merge_raw"]
        assert [parse_answer(raw)[0] for raw in out["merge_raw"]] == out["merged_captions"]
        assert out["merge_backend"] == "openai" and out["merge_model"] == "tiny-random-chat"
        merges = json.loads(out["merge_checks"])["merges"]
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


def test_unknown_model_is_a_permanent_failure(tmp_path: Path, vllm_url: str) -> None:
    stage = stage_for(tmp_path, vllm_url, "merge.model=no-such-model")
    (res,) = run(stage, [make_merge_item("eeeeeeeeeee_0_10000", split="train")])
    assert res.status == "failed_permanent" and res.reason == "http_404", res
