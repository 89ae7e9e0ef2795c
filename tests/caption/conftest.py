"""Caption-stage fixtures: the tiny BLIP-2 (built once per session), JPEG frames, run folders."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.ledger import Ledger
from pipeline.stage import Item, RunContext
from stages.caption import CaptionStage
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


def make_stage(workdir: Path, model: Path, **caption: Any) -> CaptionStage:
    settings = {"model": str(model), "num_beams": 1, "max_new_tokens": 8, "loader_workers": 2} | caption
    cfg = RunConfig.model_validate({"workdir": str(workdir), "caption": settings})
    return CaptionStage(RunContext(workdir, cfg))


@pytest.fixture
def stage_factory(tiny_blip2: Path) -> Iterator[Any]:
    made: list[CaptionStage] = []

    def factory(workdir: Path, model: Path | None = None, **caption: Any) -> CaptionStage:
        st = make_stage(workdir, model or tiny_blip2, **caption)
        st.setup()
        made.append(st)
        return st

    yield factory
    for st in made:
        st.teardown()


def write_upstream_ledgers(workdir: Path, items: list[Item]) -> None:
    """Ledgers of stages 0-2 to the column contract, for runner-level tests before stage 2 lands."""
    import pyarrow as pa

    base = {"status": "ok", "reason": "", "message": "", "attempts": 1}
    manifest = Ledger(
        workdir / "00-manifest" / "ledger",
        [
            pa.field("youtube_id", pa.string()),
            pa.field("start_s", pa.int32()),
            pa.field("split", pa.string()),
        ],
    )
    manifest.commit(
        [
            {"clip_id": it.clip_id, **base, "youtube_id": it.clip_id[:11], "start_s": 0, "split": "test"}
            for it in items
        ]
    )
    download = Ledger(workdir / "01-download" / "ledger", [pa.field("video_path", pa.string())])
    download.commit(
        [{"clip_id": it.clip_id, **base, "video_path": f"media/video/{it.clip_id}.mp4"} for it in items]
    )
    keyframes = Ledger(
        workdir / "02-keyframes" / "ledger",
        [pa.field("frame_paths", pa.list_(pa.string())), pa.field("middle_frame", pa.int32())],
    )
    keyframes.commit(
        [
            {
                "clip_id": it.clip_id,
                **base,
                "frame_paths": it["frame_paths"],
                "middle_frame": it["middle_frame"],
            }
            for it in items
        ]
    )


@pytest.fixture
def upstream_app(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the engine at :mod:`upstream_app` in this process; returns the env for subprocesses."""
    monkeypatch.setenv("AVCAPS_APP", "upstream_app")
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.pop("upstream_app", None)
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def items_factory() -> Any:
    """:func:`make_items` (test modules cannot import conftest under importlib mode)."""
    return make_items


@pytest.fixture
def upstream_ledgers() -> Any:
    """:func:`write_upstream_ledgers`."""
    return write_upstream_ledgers
