"""Redo only what changed (issue 25), on a run of the real stages 0-4 in this process (yt-dlp from
the local media server, PyAV, the tiny BLIP-2, CLIP and CLAP, the "dog" chat model), with a clip
that fails its download and one rate-limited once:

- a stage-3 redo whose setting changes no caption leaves stage 4 current, with nothing to redo;
- one that changes one clip's caption makes exactly that clip's merge stale;
- a stage-2 redo with another ``frame_max_side`` (same file names) makes every caption stale;
- a scorer out of CUDA memory keeps the batch's captions and merges, and the next run makes only
  the scores, calling BLIP-2 and the LLM zero times;
- a local model named by a relative and by an absolute path is one model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from stages.merge import backends
from stages.merge.stage import MergeStage
from stages.scoring import ClapScorer, ClipScorer
from standins.media import MediaServer, make_clip

pytestmark = pytest.mark.slow
# youtube id -> what its source is: "still" (a black picture: its three keyframes are equal, so
# their captions are), "moving" (a gray that changes every second: three different keyframes).
CLIPS = {"te-still-00": "still", "te-still-01": "still", "te-moves-00": "moving", "te-r429-000": "still"}
GONE = "te-e404-000"  # not on the server: its download fails for good


def cid(yt: str) -> str:
    return f"{yt}_1000_11000"


@pytest.fixture
def run_dir(
    tmp_path: Path, tiny_blip2: Path, dog_chat_model: Path, tiny_clip: Path, tiny_clap: Path
) -> Iterator[Any]:
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
            "workdir": str(tmp_path / "run"),
            "manifest": {"csv_dir": str(tmp_path / "csv"), "splits": {"test": "test.csv"}, "checksums": None},
            "download": {"url_template": media.url_template(), "backoff_s": 0.2, "max_attempts": 2},
            "keyframes": {"frames": 3},
            "caption": {"model": str(tiny_blip2), "num_beams": 1, "max_new_tokens": 8},
            "merge": {
                "backend": "transformers",
                "model": str(dog_chat_model),
                "device": "cpu",
                "reasoning_effort": None,
                "max_new_tokens": 24,
                "min_visual_overlap": 0.0,
                "max_quality_retries": 1,
            },
            "scoring": {"clip_model": str(tiny_clip), "clap_model": str(tiny_clap)},
        }
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(sections))

        class Run:
            dir = tmp_path / "run"
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
