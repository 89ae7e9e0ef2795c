"""Redo only what changed (issue 25), on a run of the real stages 0-4 in this process (yt-dlp from
the local media server, PyAV, the tiny BLIP-2, CLIP and CLAP, the "dog" chat model), with a clip
that fails its download and one rate-limited once:

- a stage-3 redo whose setting changes no caption leaves stage 4 current, with nothing to redo;
- one that changes one clip's caption makes exactly that clip's merge stale;
- a stage-2 redo with another ``frame_max_side`` (same file names) makes every caption stale;
- a scorer out of CUDA memory keeps the batch's captions and merges, and the next run makes only
  the scores, calling BLIP-2 and the LLM zero times;
- a local model named by a relative and by an absolute path is one model;
- on a reviewed run (two annotators per task, the real Label Studio), a CLIP swap re-scores every
  clip with no BLIP-2 or LLM call, shows the new scores on the same tasks, keeps every annotation
  current, and the export then names the new model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from pipeline.cli import load_context
from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions, Stage
from pipeline.status import run_status
from stages.caption.captioner import Captioner
from stages.caption.stage import CaptionStage
from stages.download.stage import DownloadStage
from stages.export.stage import ExportStage
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from stages.merge import backends
from stages.merge.stage import MergeStage
from stages.review.client import LabelStudio
from stages.review.labeling import verdict_result
from stages.review.push import ReviewStage
from stages.review.server import LabelStudioServer
from stages.scoring import ClapScorer, ClipScorer
from standins.media import MediaServer, make_clip
from standins.review_run import TEST_CREDS as CREDS
from standins.scorers import build_tiny_clip

pytestmark = pytest.mark.slow
# youtube id -> what its source is: "still" (a black picture: its three keyframes are equal, so
# their captions are), "moving" (a gray that changes every second: three different keyframes).
CLIPS = {"te-still-00": "still", "te-still-01": "still", "te-moves-00": "moving", "te-r429-000": "still"}
GONE = "te-e404-000"  # not on the server: its download fails for good


def cid(yt: str) -> str:
    return f"{yt}_1000_11000"


@contextmanager
def made_run(tmp_path: Path, workdir: Path, models: dict[str, Path], **extra: Any) -> Iterator[Any]:
    """Stages 0-4 run in this process in ``workdir`` (``extra``: more config sections)."""
    (tmp_path / "sources").mkdir()
    for yt, kind in CLIPS.items():
        os.replace(
            make_clip(tmp_path / "made" / yt, 13, black=kind == "still"), tmp_path / "sources" / f"{yt}.mp4"
        )
    lines = ["audiocap_id,youtube_id,start_time,caption"]
    for n, yt in enumerate([*CLIPS, GONE]):
        lines += [f"{2 * n + 1},{yt},1,A dog barks", f"{2 * n + 2},{yt},1,Dogs bark"]
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "test.csv").write_text("\n".join(lines) + "\n")
    with MediaServer(tmp_path / "sources") as media:
        media.set_fault("te-r429-000.mp4", "429", 1)
        sections = {
            "workdir": str(workdir),
            "manifest": {"csv_dir": str(tmp_path / "csv"), "splits": {"test": "test.csv"}, "checksums": None},
            "download": {"url_template": media.url_template(), "backoff_s": 0.2, "max_attempts": 2},
            "keyframes": {"frames": 3},
            "caption": {"model": str(models["blip2"]), "num_beams": 1, "max_new_tokens": 8},
            "merge": {
                "backend": "transformers",
                "model": str(models["chat"]),
                "device": "cpu",
                "reasoning_effort": None,
                "max_new_tokens": 24,
                "min_visual_overlap": 0.0,
                "max_quality_retries": 1,
            },
            "scoring": {"clip_model": str(models["clip"]), "clap_model": str(models["clap"])},
            **extra,
        }
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(sections))

        class Run:
            dir = workdir
            path = config

            def ctx(self, *sets: str) -> Any:
                return load_context(config, None, sets)

            def run(self, cls: type[Stage], *sets: str, **opts: Any) -> Any:
                return run_stage(cls, self.ctx(*sets), RunOptions(progress=False, **opts))

            def status(self, *sets: str) -> dict[str, dict[str, Any]]:
                return {s["stage"]: s for s in run_status(self.ctx(*sets))["stages"]}

            def rows(self, cls: type[Stage]) -> pd.DataFrame:
                return stage_ledger(cls, self.dir).latest()

        r = Run()
        for cls in (ManifestStage, DownloadStage, KeyframesStage, CaptionStage, MergeStage):
            r.run(cls)
        yield r


@pytest.fixture
def models(tiny_blip2: Path, dog_chat_model: Path, tiny_clip: Path, tiny_clap: Path) -> dict[str, Path]:
    return {"blip2": tiny_blip2, "chat": dog_chat_model, "clip": tiny_clip, "clap": tiny_clap}


@pytest.fixture
def run_dir(tmp_path: Path, models: dict[str, Path]) -> Iterator[Any]:
    with made_run(tmp_path, tmp_path / "run", models) as r:
        yield r


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often BLIP-2 captions, and the LLM backend is made or asked, from here on."""
    counts = {"blip2": 0, "blip2_loads": 0, "llm": 0, "llm_backends": 0}
    caption, init, generate, make = (
        Captioner.caption,
        Captioner.__init__,
        backends.TransformersBackend.generate,
        backends.make_backend,
    )

    def counted(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kw)

        return wrapper

    monkeypatch.setattr(Captioner, "caption", counted("blip2", caption))
    monkeypatch.setattr(Captioner, "__init__", counted("blip2_loads", init))
    monkeypatch.setattr(backends.TransformersBackend, "generate", counted("llm", generate))
    monkeypatch.setattr("stages.merge.stage.make_backend", counted("llm_backends", make))
    return counts


def test_the_run_as_made(run_dir: Any) -> None:
    st = run_dir.status()
    download = run_dir.rows(DownloadStage)
    assert (
        download.loc[cid(GONE), "reason"] == "http_404" and download.loc[cid("te-r429-000"), "attempts"] == 2
    )
    assert all(st[s]["stale"] == 0 for s in ("01-download", "02-keyframes", "03-caption", "04-merge"))
    assert st["03-caption"]["layer_stale"] == 0 and st["04-merge"]["layer_stale"] == 0
    assert run_dir.rows(MergeStage)["layer_fingerprint"].notna().all()


def test_a_caption_redo_that_changes_no_caption_leaves_the_merges_current(
    run_dir: Any, calls: dict[str, int]
) -> None:
    before = run_dir.rows(CaptionStage)
    same = ("caption.dtype=float32",)  # what `auto` is on a CPU: another setting, the same captions
    assert run_dir.status(*same)["03-caption"]["stale"] == 4
    assert run_dir.run(CaptionStage, *same).selected == 4
    assert calls["blip2"] > 0
    after = run_dir.rows(CaptionStage)
    assert (after["frame_captions"].map(list) == before["frame_captions"].map(list)).all()
    st = run_dir.status(*same)
    assert st["03-caption"]["stale"] == 0 and st["04-merge"]["stale"] == 0
    assert "waiting_on_stale" not in st["04-merge"]
    report = run_dir.run(MergeStage, *same)
    assert report.selected == 0 and calls["llm"] == 0


def test_a_caption_redo_that_changes_one_caption_makes_that_merge_stale(run_dir: Any) -> None:
    """The first keyframe's caption instead of the middle one's: the same for the still clips
    (their frames are equal), another for the moving one."""
    before = run_dir.rows(CaptionStage)
    first = ("caption.caption_frame=first",)
    run_dir.run(CaptionStage, *first)
    after = run_dir.rows(CaptionStage)
    changed = set(after.index[after["visual_caption"] != before["visual_caption"]])
    moving = cid("te-moves-00")
    assert changed <= {moving}
    caps = list(after.loc[moving, "frame_captions"])
    if caps[0] == caps[1]:
        pytest.skip("the random BLIP-2 gave the moving clip's first and middle frames one caption")
    assert changed == {moving}
    st = run_dir.status(*first)
    assert st["04-merge"]["stale"] == 1
    report = run_dir.run(MergeStage, *first)
    assert report.selected == 1
    assert run_dir.status(*first)["04-merge"]["stale"] == 0


def test_a_keyframes_redo_with_other_frames_makes_every_caption_stale(run_dir: Any) -> None:
    before = run_dir.rows(KeyframesStage)
    smaller = ("keyframes.frame_max_side=48",)
    assert run_dir.run(KeyframesStage, *smaller).selected == 4
    after = run_dir.rows(KeyframesStage)
    assert (after["frame_paths"].map(list) == before["frame_paths"].map(list)).all()  # same names
    assert (after["frame_digests"].map(list) != before["frame_digests"].map(list)).all()  # other bytes
    st = run_dir.status(*smaller)
    assert st["02-keyframes"]["stale"] == 0 and st["03-caption"]["stale"] == 4


def test_a_scorer_out_of_memory_keeps_the_captions_and_the_merges(
    run_dir: Any, calls: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    def oom(*args: Any, **kw: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with monkeypatch.context() as m:
        m.setattr(ClipScorer, "image_embeds", oom)
        m.setattr(ClapScorer, "audio_embeds", oom)
        assert run_dir.run(CaptionStage, force=True).counts == {"ok": 4}
        assert run_dir.run(MergeStage, force=True).counts == {"ok": 4}
    captions, merges = run_dir.rows(CaptionStage), run_dir.rows(MergeStage)
    assert (captions["status"] == "ok").all() and captions["frame_captions"].map(len).eq(3).all()
    assert captions["layer_fingerprint"].isna().all() and captions["visual_clip_score"].isna().all()
    assert (merges["status"] == "ok").all() and merges["merged_captions"].map(len).eq(2).all()
    assert merges["layer_fingerprint"].isna().all() and "out of memory" in merges["message"].iloc[0]
    st = run_dir.status()
    assert (st["03-caption"]["stale"], st["03-caption"]["layer_stale"]) == (0, 4)
    assert (st["04-merge"]["stale"], st["04-merge"]["layer_stale"]) == (0, 4)

    made = dict(calls)
    assert run_dir.run(CaptionStage).selected == 4 and run_dir.run(MergeStage).selected == 4
    assert calls["blip2"] == made["blip2"] and calls["blip2_loads"] == made["blip2_loads"]  # scores only
    assert calls["llm"] == made["llm"] and calls["llm_backends"] == made["llm_backends"]
    captions2, merges2 = run_dir.rows(CaptionStage), run_dir.rows(MergeStage)
    assert captions2["visual_clip_score"].notna().all() and merges2["merge_clap_score"].notna().all()
    assert (captions2["frame_captions"].map(list) == captions["frame_captions"].map(list)).all()
    assert (merges2["merged_captions"].map(list) == merges["merged_captions"].map(list)).all()
    st = run_dir.status()
    assert st["03-caption"]["layer_stale"] == 0 and st["04-merge"]["layer_stale"] == 0


def test_a_local_model_by_any_path_is_one_model(
    run_dir: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model = Path(yaml.safe_load(run_dir.path.read_text())["merge"]["model"])
    link = tmp_path / "also-the-chat-model"
    os.symlink(model, link)
    monkeypatch.chdir(model.parent)
    for name in (model.name, f"./{model.name}", str(model.resolve()), str(link)):
        st = run_dir.status(f"merge.model={name}")
        assert st["04-merge"]["stale"] == 0, name


def test_a_clip_model_swap_keeps_the_merges_and_their_reviews(
    tmp_path: Path,
    models: dict[str, Path],
    ls_server: LabelStudioServer,
    ls_root: Path,
    calls: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's case: a finished, reviewed run (two annotators per task) changes its CLIP model.
    Only the scores are stale; stages 3 and 4 make them without BLIP-2 or the LLM, stage 5 shows
    them on the same tasks, the reviews stay current, and the export names the new model."""
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", CREDS.api_key)
    monkeypatch.delenv("AVCAPS_APP", raising=False)
    other_clip = build_tiny_clip(tmp_path / "clip-other", seed=1)
    review = {"url": ls_server.url, "document_root": str(ls_root), "annotators_per_task": 2}
    with made_run(tmp_path, ls_root / tmp_path.name, models, review=review) as run:
        assert run.run(ReviewStage).counts == {"ok": 4}
        client = LabelStudio(ls_server.url, CREDS.api_key)
        people = []
        for i in range(2):
            name = f"{tmp_path.name}-annotator-{i}"[-60:]
            body = {"username": name, "email": f"{name}@avcaps.test"}
            user = client.request("POST", "/api/users/", json=body)
            people.append(int(user["id"]))
        tasks = {str(k): int(v) for k, v in run.rows(ReviewStage)["ls_task_id"].items()}
        for task_id in tasks.values():
            for who in people:
                body = {"result": [verdict_result("accept")], "completed_by": who}
                client.request("POST", f"/api/tasks/{task_id}/annotations/", json=body)
        exported = run.run(ExportStage)
        assert exported.exit_code == 0, exported.message
        stats = json.loads((run.dir / "export" / "statistics.json").read_text())
        old_model = stats["scores"]["clip_model"]
        assert stats["review"] == {"accept": 4, "edited": 0, "rejected": 0, "unreviewed": 0}

        swap = (f"scoring.clip_model={other_clip}",)
        captions, merges = run.rows(CaptionStage), run.rows(MergeStage)
        shown = {c: client.task(t)["data"] for c, t in tasks.items()}
        st = run.status(*swap)
        assert [st[s]["stale"] for s in ("03-caption", "04-merge", "05-review", "06-export")] == [0, 0, 0, 0]
        assert st["03-caption"]["layer_stale"] == 4 and st["04-merge"]["layer_stale"] == 4

        made = dict(calls)
        assert run.run(CaptionStage, *swap).selected == 4
        assert run.run(MergeStage, *swap).selected == 4
        assert calls == made  # no BLIP-2 or LLM loaded or asked: only CLIP ran
        captions2, merges2 = run.rows(CaptionStage), run.rows(MergeStage)
        assert (captions2["frame_captions"].map(list) == captions["frame_captions"].map(list)).all()
        assert (merges2["merged_captions"].map(list) == merges["merged_captions"].map(list)).all()
        assert (captions2["clip_model"] != captions["clip_model"]).all()
        assert all(
            list(a) != list(b)
            for a, b in zip(captions2["visual_clip_score"], captions["visual_clip_score"], strict=True)
        )
        assert (merges2["score_models"] != merges["score_models"]).all()
        st = run.status(*swap)
        assert st["04-merge"]["layer_stale"] == 0 and st["05-review"]["layer_stale"] == 4

        assert run.run(ReviewStage, *swap).selected == 4
        after = run.rows(ReviewStage)
        assert {str(k): int(v) for k, v in after["ls_task_id"].items()} == tasks  # the same tasks
        assert after["ls_outdated_annotations"].map(len).eq(0).all()
        for c, t in tasks.items():
            data = client.task(t)["data"]
            assert data["merged_captions"] == shown[c]["merged_captions"]
            assert data["scores"] != shown[c]["scores"]  # the new CLIP's scores
            assert len(client.annotations(t)) == 2
        st = run.status(*swap)
        assert all(st[s].get("stale", 0) == 0 and st[s].get("layer_stale", 0) == 0 for s in st if s < "06")

        exported = run.run(ExportStage, *swap)
        assert exported.exit_code == 0, exported.message
        stats = json.loads((run.dir / "export" / "statistics.json").read_text())
        assert stats["scores"]["clip_model"] == sorted(set(captions2["clip_model"])) != old_model
        assert stats["review"] == {"accept": 4, "edited": 0, "rejected": 0, "unreviewed": 0}
        assert stats["outdated_reviews"] == 0 and stats["stale_items"] == 0
        assert stats["review_agreement"]["votes"] == 8  # both annotators' answers, still counted

        # A caption redo whose setting changes no caption (the dtype `auto` is on a CPU) leaves the
        # merges, the review tasks and the export current.
        same = (*swap, "caption.dtype=float32")
        assert run.run(CaptionStage, *same).selected == 4
        st = run.status(*same)
        assert [st[s]["stale"] for s in ("03-caption", "04-merge", "05-review", "06-export")] == [0, 0, 0, 0]
