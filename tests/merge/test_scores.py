"""Stage 4's scores through the runner, on the real tiny models: the chat model (transformers
backend), CLIP and CLAP. A run folder as a real run leaves it (``merge_run``), with stage 2's
keyframes and audio on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from stages.scoring import ClapScorer, ClipScorer, ScorerSpec, cosine

RELAXED = {  # a random-weight model writes word salad: only the structural checks can pass
    "min_audio_overlap": 0,
    "min_visual_overlap": 0,
    "max_invented": 1,
    "min_words": 1,
}


def tf(model: Path, **extra: Any) -> dict[str, Any]:
    return {
        "backend": "transformers",
        "model": str(model),
        "reasoning_effort": None,
        "max_new_tokens": 24,
        "device": "cpu",
        "batch_size": 8,
        **RELAXED,
        **extra,
    }


def run_merge(run: Any) -> Any:
    from pipeline.cli import load_context
    from pipeline.runner import run_stage
    from pipeline.selection import stage_ledger
    from pipeline.stage import RunOptions
    from stages.merge.stage import MergeStage

    run_stage(MergeStage, load_context(run.config, run.workdir, ()), RunOptions(progress=False))
    return stage_ledger(MergeStage, run.workdir).latest()


def test_scores_reach_the_ledger(
    merge_run: Any, tiny_chat_model: Path, tiny_clip: Path, tiny_clap: Path
) -> None:
    run = merge_run(3, merge=tf(tiny_chat_model))
    state = run_merge(run)
    ok = state[state["status"] == "ok"]
    assert sorted(ok.index) == sorted(run.clip_ids)
    clap = ClapScorer(ScorerSpec(str(tiny_clap), batch_size=1))
    clip = ClipScorer(ScorerSpec(str(tiny_clip), batch_size=1))
    for cid, row in ok.iterrows():
        merged = list(row["merged_captions"])
        assert len(row["merge_clap_score"]) == len(row["merge_clip_score"]) == len(merged) == 5
        assert len(row["source_audio_clap_score"]) == len(row["source_audio_clip_score"]) == 5
        assert row["merge_score_tries"] == 1  # the rule is off
        models = json.loads(row["score_models"])
        assert models["clap"].startswith(f"{tiny_clap}@local:") and models["clip"].startswith(
            f"{tiny_clip}@local:"
        )
        # Each score is the one the scorer gives that pair alone: the clip's own audio and
        # middle keyframe, the caption at the same position.
        audio = clap.audio_embeds([run.workdir / f"media/audio/{cid}.flac"])[
            run.workdir / f"media/audio/{cid}.flac"
        ]
        frame = run.workdir / f"media/frames/{cid}/0.jpg"
        image = clip.image_embeds([frame])[frame]
        for k in (0, 4):
            text = merged[k]
            assert row["merge_clap_score"][k] == pytest.approx(
                cosine(audio, clap.text_embeds([text])[text]), abs=1e-4
            )  # type: ignore[arg-type]
            assert row["merge_clip_score"][k] == pytest.approx(
                cosine(image, clip.text_embeds([text])[text]), abs=1e-4
            )  # type: ignore[arg-type]
        checks = json.loads(row["merge_checks"])
        assert [m["clap_score"] for m in checks["merges"]] == pytest.approx(
            list(row["merge_clap_score"]), abs=1e-6
        )
    assert np.isfinite(np.concatenate(ok["source_audio_clap_score"].to_list())).all()
    assert ok["source_visual_clip_score"].notna().all() and ok["source_visual_clap_score"].notna().all()


def test_unreadable_audio_leaves_only_that_clip_unscored(merge_run: Any, tiny_chat_model: Path) -> None:
    """Audio the scorers cannot read keeps the clip's merges (ok) with no scores and no layer
    fingerprint, named in the message; the other clips score."""
    run = merge_run(3, merge=tf(tiny_chat_model))
    victim = run.clip_ids[1]
    (run.workdir / f"media/audio/{victim}.flac").write_bytes(b"fLaC this is not audio")
    state = run_merge(run)
    row = state.loc[victim]
    assert row["status"] == "ok" and "score_unreadable_audio" in row["message"]
    assert victim in row["message"] and f"media/audio/{victim}.flac" in row["message"]
    assert len(row["merged_captions"]) == 5 and pd.isna(row["layer_fingerprint"])
    others = state.loc[[c for c in run.clip_ids if c != victim]]
    assert (others["status"] == "ok").all() and others["merge_clap_score"].notna().all()
    assert others["layer_fingerprint"].notna().all()


def kept_and_tries(row: Any) -> list[tuple[str, float | None, list[dict[str, Any]]]]:
    checks = json.loads(row["merge_checks"])
    return [
        (cap, m["clap_score"], m["tries"])
        for cap, m in zip(row["merged_captions"], checks["merges"], strict=True)
    ]


def test_clap_rule_retries_low_merges_and_keeps_the_best(merge_run: Any, tiny_chat_model: Path) -> None:
    """With ``min_clap_percentile`` 50 over a run's first batch (4 clips x 5 merges), exactly the
    merges whose first answer ranks below the median are asked again with new seeds; each row
    keeps the best-scoring answer that passed the gate, whichever try it came from."""
    rule = {"min_clap_percentile": 50, "max_score_tries": 3, "score_min_population": 10, "batch_size": 8}
    run = merge_run(4, merge=tf(tiny_chat_model, **rule))
    state = run_merge(run)
    ok = state[state["status"] == "ok"]
    assert len(ok) == 4
    merges = [m for _, row in ok.iterrows() for m in kept_and_tries(row)]
    firsts = []
    for _, _, tries in merges:
        first = next(t for t in tries if "clap_score" in t and not t.get("score_retry"))
        firsts.append(first["clap_score"])
    pop = np.sort(np.array(firsts))
    retried_somewhere = kept_not_last = 0
    for (cap, kept, tries), first in zip(merges, firsts, strict=True):
        low = 100 * np.searchsorted(pop, first, side="right") / len(pop) < 50
        retries = [t for t in tries if t.get("score_retry")]
        assert bool(retries) == low  # asked again exactly when the first answer ranked low
        scored = [t for t in tries if "clap_score" in t]
        best = max(scored, key=lambda t: t["clap_score"])
        assert kept == pytest.approx(best["clap_score"]) and cap == best["caption"]
        assert {t["seed"] for t in tries} == set(range(len({t["seed"] for t in tries})))  # new seed each
        retried_somewhere += bool(retries)
        kept_not_last += best is not scored[-1]
    assert retried_somewhere >= 8  # about half of 20
    assert kept_not_last >= 1  # the best, not the last answer, is kept
    tries_col = ok["merge_score_tries"].astype(int)
    assert (tries_col > 1).any() and (tries_col <= 3).all()


def test_clap_rule_waits_for_its_population(merge_run: Any, tiny_chat_model: Path) -> None:
    rule = {"min_clap_percentile": 50, "score_min_population": 1000}
    state = run_merge(merge_run(2, merge=tf(tiny_chat_model, **rule)))
    ok = state[state["status"] == "ok"]
    assert len(ok) == 2 and (ok["merge_score_tries"] == 1).all()
    assert not any(
        t.get("score_retry") for _, row in ok.iterrows() for _, _, ts in kept_and_tries(row) for t in ts
    )


def test_the_rule_is_in_the_fingerprint_the_scorers_in_the_layer(tmp_path: Path) -> None:
    """Another CLIP or CLAP model changes the score layer only; the CLAP rule, which picks the
    kept answer by its CLAP score, makes the CLAP model part of what a merge is made with."""
    from pipeline.config import load_config
    from pipeline.stage import RunContext
    from stages.config import RunConfig
    from stages.merge.stage import MergeStage

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("manifest: {splits: {test: test.csv}}\n")

    def fp(*overrides: str) -> tuple[dict[str, Any], Any, tuple[str, ...]]:
        cfg = load_config(RunConfig, cfg_file, list(overrides))
        st = MergeStage(RunContext(tmp_path, cfg))
        return st.fingerprint_settings(), st.layer_settings(), st.reads()

    base, layer, reads = fp()
    assert base["clap_rule"] is None and reads == ("audio_captions", "visual_caption")
    assert layer["clap"] == "laion/larger_clap_general@ada0c23a36c4e8582805bb38fec3905903f18b41"
    other = fp("scoring.clip_model=other/clip")
    assert other[0] == base and other[1] != layer  # the merges stay current, their scores do not
    assert fp("merge.score=false")[:2] == (base, None)
    assert fp("scoring.batch_size=3")[:2] == fp("scoring.device=cpu")[:2] == (base, layer)
    rule = fp("merge.min_clap_percentile=20")
    assert rule[0] != base and rule[0]["clap_rule"]["min_clap_percentile"] == 20
    assert rule[0]["clap_rule"]["clap"] == layer["clap"] and "audio_path" in rule[2]
    assert fp("merge.min_clap_percentile=20", "merge.max_score_tries=5")[0] != rule[0]
    assert fp("merge.min_clap_percentile=20", "scoring.clap_model=other/clap")[0] != rule[0]
    with pytest.raises(Exception, match=r"min_clap_percentile needs merge\.score"):
        fp("merge.score=false", "merge.min_clap_percentile=10")
    # An old key (a manifest from before the scoring: section) is read in its new place.
    assert fp("merge.score_device=cpu")[:2] == fp("scoring.device=cpu")[:2]
