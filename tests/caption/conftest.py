"""Caption-stage fixtures: the tiny BLIP-2 (built once per session), JPEG frames, run folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.stage import Item, RunContext
from stages.caption.stage import CaptionStage
from stages.config import RunConfig
from standins.blip2 import build_tiny_blip2

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip2(tmp_path_factory.mktemp("models") / "blip2-tiny")


@pytest.fixture(scope="session")
def mute_blip2(tiny_blip2: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Variants of the tiny model whose first token is always EOS (an empty caption).

    ``mute_blip2(rescued=True)``: with EOS forbidden, a word token wins, so the retry with
    ``min_new_tokens`` gives a caption. ``rescued=False``: the pad token wins next, which decodes
    to nothing, so the clip stays empty and fails. Built by editing the saved model's weights
    (the final layer norm outputs a constant vector, and token rows are aligned with it).
    """
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    def build(rescued: bool) -> Path:
        dest = tmp_path_factory.getbasetemp() / f"blip2-mute-{'rescued' if rescued else 'empty'}"
        if dest.exists():
            return dest
        model = Blip2ForConditionalGeneration.from_pretrained(tiny_blip2)
        proc = Blip2Processor.from_pretrained(tiny_blip2)
        tok = proc.tokenizer
        decoder = model.language_model.model.decoder
        with torch.no_grad():
            b = torch.randn(decoder.final_layer_norm.bias.shape, generator=torch.Generator().manual_seed(0))
            b = b / b.norm()
            decoder.final_layer_norm.weight.zero_()
            decoder.final_layer_norm.bias.copy_(b)
            head = model.language_model.get_output_embeddings().weight
            head.mul_(0.01)
            head[tok.eos_token_id] = 20 * b
            second = tok.pad_token_id if not rescued else tok.convert_tokens_to_ids("▁a")
            assert second is not None and second != tok.unk_token_id
            head[second] = 10 * b
        model.save_pretrained(dest)
        proc.save_pretrained(dest)
        return dest

    return build


@pytest.fixture(scope="session")
def ending_blip2(tiny_blip2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with EOS made likely enough that captions end at different lengths.

    The tiny model never emits EOS, so every caption runs to ``max_new_tokens``. Here the final
    layer norm's bias is moved along EOS's output row: EOS wins when the hidden state leans its
    way, which depends on the image and the step: on 22 images with 10 new tokens, some captions
    end after 1-9 tokens and some run to the cap, greedy and beam 3/5 alike, and a chunk of the
    soonest-ending images ends every search before the cap.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    dest = tmp_path_factory.getbasetemp() / "blip2-ending"
    if dest.exists():
        return dest
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_blip2)
    proc = Blip2Processor.from_pretrained(tiny_blip2)
    decoder = model.language_model.model.decoder
    eos_row = model.language_model.get_output_embeddings().weight[proc.tokenizer.eos_token_id]
    with torch.no_grad():
        decoder.final_layer_norm.bias.add_(5.5 * eos_row / eos_row.norm())
    model.save_pretrained(dest)
    proc.save_pretrained(dest)
    return dest


def write_frame(path: Path, seed: int, size: tuple[int, int] = (96, 64)) -> None:
    """A JPEG with random blocks (distinct per seed, so captions differ per image)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=92)


def make_items(workdir: Path, n_clips: int, frames: int = 3, seed: int = 0) -> list[Item]:
    """Items as stage 2 hands them over: ``frame_paths`` relative to the run folder, ``middle_frame``."""
    items = []
    for c in range(n_clips):
        clip_id = f"clip{c:03d}xxxx_{c * 1000}_{c * 1000 + 10000}"
        rels = []
        for k in range(frames):
            rel = f"media/frames/{clip_id}/{k}.jpg"
            write_frame(workdir / rel, seed * 100_000 + c * 100 + k)
            rels.append(rel)
        items.append(Item(clip_id, {"frame_paths": rels, "middle_frame": frames // 2, "split": "test"}))
    return items


def make_stage(
    workdir: Path,
    model: Path,
    clip: Path | None = None,
    scoring: dict[str, Any] | None = None,
    **caption: Any,
) -> CaptionStage:
    """A caption stage on ``model``; scoring with the CLIP at ``clip`` (none: scoring off) and the
    ``scoring:`` settings given."""
    settings = {"model": str(model), "num_beams": 1, "max_new_tokens": 8, "loader_workers": 2}
    settings |= {} if clip is not None else {"score": False}
    settings |= caption
    scorer = ({"clip_model": str(clip)} if clip is not None else {}) | (scoring or {})
    cfg = RunConfig.model_validate({"workdir": str(workdir), "caption": settings, "scoring": scorer})
    return CaptionStage(RunContext(workdir, cfg))


@pytest.fixture
def stage_factory(tiny_blip2: Path, tiny_clip: Path) -> Iterator[Any]:
    """Caption stages set up on the tiny BLIP-2, scoring with the tiny CLIP (as a real run does)."""
    made: list[CaptionStage] = []

    def factory(workdir: Path, model: Path | None = None, **caption: Any) -> CaptionStage:
        st = make_stage(workdir, model or tiny_blip2, tiny_clip, **caption)
        st.setup()
        made.append(st)
        return st

    yield factory
    for st in made:
        st.teardown()


# Clips that a real run has failed upstream: they must never reach the caption stage.
FAILED_DOWNLOAD = "dlfail00000_0_10000"
FAILED_KEYFRAMES = "kffail00000_0_10000"


def write_upstream_ledgers(workdir: Path, items: list[Item]) -> None:
    """Ledgers of stages 0-2 as a real run leaves them, for runner-level tests.

    Written with each stage's own output schema (imported, never copied) and the real ledger, they
    hold what a real run holds beside ``items``: a clip that failed the download for good, one
    whose keyframes failed (its integer ``middle_frame`` is null, which once turned the column
    into floats for every clip), and a download that failed transiently before it succeeded.
    """
    from pipeline.selection import stage_ledger
    from stages.download.stage import DownloadStage
    from stages.keyframes import KeyframesStage
    from stages.manifest import ManifestStage

    ok = {"status": "ok", "reason": "", "message": "", "attempts": 1}
    extra = [FAILED_DOWNLOAD, FAILED_KEYFRAMES]
    ids = [it.clip_id for it in items] + extra
    stage_ledger(ManifestStage, workdir).commit(
        [
            {
                "clip_id": cid,
                **ok,
                "youtube_id": cid[:11],
                "start_s": 0,
                "end_s": 10,
                "split": "test",
                "audio_captions": ["a dog barks"],
                "audiocap_ids": [i + 1],
            }
            for i, cid in enumerate(ids)
        ]
    )
    download = stage_ledger(DownloadStage, workdir)
    first = items[0].clip_id
    download.commit(
        [
            {
                "clip_id": first,
                "status": "failed_transient",
                "reason": "http_429",
                "message": "slow down",
                "attempts": 1,
                "seq": 1,
            },
            {
                "clip_id": FAILED_DOWNLOAD,
                "status": "failed_permanent",
                "reason": "http_404",
                "message": "HTTP Error 404: Not Found",
                "attempts": 1,
                "seq": 1,
            },
        ]
    )
    download.commit(
        [
            {
                "clip_id": cid,
                **ok,
                "attempts": 2 if cid == first else 1,
                "seq": 2 if cid == first else 1,
                "video_path": f"media/video/{cid}.mp4",
                "video_width": 320,
                "video_height": 240,
            }
            for cid in [it.clip_id for it in items] + [FAILED_KEYFRAMES]
        ]
    )
    keyframes = stage_ledger(KeyframesStage, workdir)
    keyframes.commit(
        [
            {
                "clip_id": FAILED_KEYFRAMES,
                "status": "failed_permanent",
                "reason": "corrupt_video",
                "message": "cannot decode media/video/kffail00000_0_10000.mp4",
                "attempts": 1,
            }
        ]
    )
    keyframes.commit(
        [
            {
                "clip_id": it.clip_id,
                **ok,
                "frame_paths": it["frame_paths"],
                "middle_frame": it["middle_frame"],
                "audio_path": f"media/audio/{it.clip_id}.flac",
                "audio_samples": 160000,
            }
            for it in items
        ]
    )


@pytest.fixture
def upstream_app(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The real application (``stages``) for this test; returns the env for subprocesses."""
    import os

    monkeypatch.delenv("AVCAPS_APP", raising=False)
    env = dict(os.environ)
    env.pop("AVCAPS_APP", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def items_factory() -> Any:
    """:func:`make_items` (test modules cannot import conftest under importlib mode)."""
    return make_items


@pytest.fixture
def upstream_ledgers() -> Any:
    """:func:`write_upstream_ledgers`."""
    return write_upstream_ledgers
