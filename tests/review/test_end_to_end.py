"""The whole pipeline on the demo manifest, every stage real: download from the local media server,
keyframes, tiny BLIP-2, tiny chat LLM, push to the real Label Studio, annotate as annotators would,
then export — which pulls the reviews itself — and the test references are exactly the review.
As in a real run, one clip is gone from the source (404) and one is served only on a second try:
the first never goes past stage 1, the second goes all the way."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import load_context
from pipeline.registry import find_stage
from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions
from stages.review.client import LabelStudio
from stages.review.labeling import text_result, verdict_result
from stages.review.server import LabelStudioServer
from standins.media import MediaServer, make_sources
from standins.review_run import TEST_CREDS as CREDS

pytestmark = pytest.mark.slow
DEMO = Path(__file__).parents[2] / "manifests" / "demo.yaml"


def test_pipeline_review_export(
    ls_server: LabelStudioServer, ls_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from standins.blip2 import build_tiny_blip2
    from standins.llm import build_tiny_chat_model
    from standins.scorers import scorer_overrides

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", CREDS.api_key)
    monkeypatch.delenv("AVCAPS_APP", raising=False)
    workdir = ls_root / "end-to-end"  # under the server's document root, as `review server` sets it
    base = (f"review.url={ls_server.url}", f"review.document_root={ls_root}")
    ctx = load_context(DEMO, workdir, base)
    run_stage(find_stage("manifest"), ctx, RunOptions(progress=False))
    clips = pd.read_parquet(workdir / "00-manifest" / "ledger", columns=["clip_id", "youtube_id", "start_s"])
    make_sources(tmp_path / "media", [(str(r.youtube_id), int(r.start_s)) for r in clips.itertuples()])
    blip2 = build_tiny_blip2(tmp_path / "blip2")
    chat = build_tiny_chat_model(tmp_path / "chat")
    first, second = clips.sort_values("clip_id").head(2).itertuples()
    gone, flaky = str(first.clip_id), str(second.clip_id)
    with MediaServer(tmp_path / "media") as media:
        media.set_fault(f"{first.youtube_id}.mp4", "404")
        media.set_fault(f"{second.youtube_id}.mp4", "500", times=1)
        ctx = load_context(
            DEMO,
            workdir,
            (
                *base,
                f"download.url_template={media.url_template()}",
                f"caption.model={blip2}",
                *scorer_overrides(tmp_path / "scorers"),
                "merge.backend=transformers",
                f"merge.model={chat}",
                "merge.device=cpu",
                "merge.reasoning_effort=null",
                "export.allow_unreviewed=true",
            ),
        )
        report = run_stage(find_stage("download"), ctx, RunOptions(progress=False))
        assert report.counts == {"ok": 11, "failed_permanent": 1, "failed_transient": 1}
        for name in ("keyframes", "caption", "merge", "review"):
            report = run_stage(find_stage(name), ctx, RunOptions(progress=False))
            assert report.counts == {"ok": 11}, (name, report.counts)  # never the clip gone
    downloads = stage_ledger(find_stage("download")(ctx)).latest()
    assert downloads.loc[gone, "reason"] == "http_404"
    assert (downloads.loc[flaky, "status"], downloads.loc[flaky, "attempts"]) == ("ok", 2)

    pushed = stage_ledger(find_stage("review")(ctx)).latest()
    merges = stage_ledger(find_stage("merge")(ctx)).latest()
    assert gone not in pushed.index and flaky in pushed.index
    a, b, r = sorted(pushed.index)[:3]
    client = LabelStudio(ls_server.url, CREDS.api_key)
    edit = ["A dog barks twice on a sunny lawn"] * len(merges.loc[b, "merged_captions"])
    client.create_annotation(int(pushed.loc[a, "ls_task_id"]), [verdict_result("accept")])
    client.create_annotation(int(pushed.loc[b, "ls_task_id"]), [verdict_result("edited"), text_result(edit)])
    client.create_annotation(int(pushed.loc[r, "ls_task_id"]), [verdict_result("rejected")])

    run_stage(find_stage("export"), ctx, RunOptions(progress=False))  # pulls the reviews first
    test = pd.concat(pd.read_parquet(p) for p in sorted((workdir / "export" / "data" / "and").glob("test-*")))
    test = test.set_index("clip_id")
    assert list(test.loc[a, "captions"]) == list(merges.loc[a, "merged_captions"])
    assert test.loc[a, "review_verdict"] == "accept"
    assert list(test.loc[b, "captions"]) == edit and test.loc[b, "review_verdict"] == "edited"
    assert r not in test.index  # rejected clips never ship
    assert (test.drop(index=[a, b])["review_verdict"] == "unreviewed").all() and len(test) == 10
    assert gone not in test.index and flaky in test.index
