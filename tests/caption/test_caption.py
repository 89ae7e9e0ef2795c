"""Stage 3 on CPU with the tiny random BLIP-2: batching, preprocessing, failures, provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import AbortRun
from stages.caption.captioner import Captioner, clean_caption
from stages.caption.config import CaptionConfig
from stages.caption.stage import pick_frame


def captions(results: list[Any]) -> dict[str, list[str]]:
    return {r.clip_id: r.outputs["frame_captions"] for r in results if r.status == "ok"}


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_caption_equals_single_image_caption(
    tmp_path: Path, stage_factory: Any, items_factory: Any, num_beams: int
) -> None:
    items = items_factory(tmp_path, n_clips=4, frames=2)
    batched = stage_factory(tmp_path, gen_batch_size=8, num_beams=num_beams, dedup_frames=False)
    single = stage_factory(tmp_path, gen_batch_size=1, num_beams=num_beams, dedup_frames=False)
    got = captions(batched.process(items))
    want = captions(single.process(items))
    assert len(got) == 4 and got == want
    flat = [c for caps in got.values() for c in caps]
    assert len(set(flat)) > 1, "the stand-in must caption different images differently"


def test_prompt_is_sliced_off_and_image_tokens_are_in_it(
    tmp_path: Path, stage_factory: Any, items_factory: Any
) -> None:
    items = items_factory(tmp_path, n_clips=3, frames=1)
    batched = stage_factory(tmp_path, prompt="a photo of", gen_batch_size=8)
    cap = batched.captioner
    ids = cap.input_ids[0].tolist()
    q = cap.model.config.num_query_tokens
    assert ids[:q] == [cap.model.config.image_token_index] * q  # the image is in the prompt
    prompt_ids = cap.processor.tokenizer("a photo of")["input_ids"]
    assert ids[q:] == prompt_ids  # BOS + prompt, no padding
    # The raw generated part has exactly max_new_tokens or fewer tokens: the prompt is not in it.
    frames = [cap.load_frame(tmp_path / it["frame_paths"][0]) for it in items]
    raw = cap._generate(frames, cap.decoding)
    assert all(not text.startswith("a photo of") for text, _ in raw)
    single = stage_factory(tmp_path, prompt="a photo of", gen_batch_size=1)
    assert captions(batched.process(items)) == captions(single.process(items))


def test_preprocessing_matches_the_processor(tmp_path: Path, stage_factory: Any, items_factory: Any) -> None:
    import torch
    from PIL import Image

    items = items_factory(tmp_path, n_clips=2, frames=1)
    cap = stage_factory(tmp_path).captioner
    paths = [tmp_path / it["frame_paths"][0] for it in items]
    ours = cap.pixel_values([cap.load_frame(p) for p in paths])
    ref = cap.processor.image_processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.to(ours.dtype), atol=1e-5, rtol=1e-5)


def test_oom_back_off_halves_the_batch_and_gives_the_same_captions(
    tmp_path: Path, stage_factory: Any, items_factory: Any
) -> None:
    items = items_factory(tmp_path, n_clips=5, frames=2)
    ref = captions(stage_factory(tmp_path, gen_batch_size=8).process(items))
    st = stage_factory(tmp_path, gen_batch_size=8, simulate_oom_above=2)
    results = st.process(items)
    assert captions(results) == ref and len(ref) == 5
    assert st.captioner.oom_events == [{"from": 8, "to": 4}, {"from": 4, "to": 2}]
    assert {r.outputs["caption_gen_batch"] for r in results} == {2}
    st.teardown()
    stats = st.extra_stats(__import__("pandas").DataFrame())
    assert stats["oom_backoffs"] == [{"from": 8, "to": 4}, {"from": 4, "to": 2}]
    assert stats["gen_batch_size_final"] == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_a_bad_jpeg_fails_that_clip_only(
    tmp_path: Path, stage_factory: Any, items_factory: Any, damage: str
) -> None:
    items = items_factory(tmp_path, n_clips=4, frames=3)
    st = stage_factory(tmp_path, gen_batch_size=4)
    ref = captions(st.process(items))
    bad = tmp_path / items[1]["frame_paths"][2]
    if damage == "garbage":
        bad.write_bytes(b"this is not a jpeg")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        bad.unlink()
    results = {r.clip_id: r for r in st.process(items)}
    failed = results[items[1].clip_id]
    assert failed.status == "failed_permanent"
    assert failed.reason == ("missing_frame" if damage == "missing" else "corrupt_frame")
    assert str(bad) in failed.message
    others = {cid: r.outputs["frame_captions"] for cid, r in results.items() if cid != items[1].clip_id}
    assert others == {cid: caps for cid, caps in ref.items() if cid != items[1].clip_id}


def test_cpu_path_provenance_and_visual_caption(
    tmp_path: Path, stage_factory: Any, items_factory: Any
) -> None:
    items = items_factory(tmp_path, n_clips=2, frames=3)
    st = stage_factory(tmp_path, device="cpu")
    results = st.process(items)
    for r in results:
        out = r.outputs
        assert r.status == "ok"
        assert len(out["frame_captions"]) == 3
        assert out["visual_caption"] == out["frame_captions"][1]  # middle_frame = 1
        assert out["caption_dtype"] == "float32"
        assert out["caption_model"] == str(st.cfg.model)
        assert out["caption_revision"].startswith("local:")
        assert len(out["caption_settings_hash"]) == 16
        versions = json.loads(out["caption_versions"])
        assert versions["torch"] and versions["transformers"]
    first = stage_factory(tmp_path, device="cpu", caption_frame="first").process(items)
    assert [r.outputs["visual_caption"] for r in first] == [r.outputs["frame_captions"][0] for r in results]
    other = stage_factory(tmp_path, device="cpu", num_beams=2).provenance
    assert other["caption_settings_hash"] != st.provenance["caption_settings_hash"]
    same = stage_factory(tmp_path, device="cpu", gen_batch_size=3).provenance
    assert same["caption_settings_hash"] == st.provenance["caption_settings_hash"]


def test_no_cuda_is_a_clear_abort(tiny_blip2: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(AbortRun, match="no CUDA device"):
        Captioner(CaptionConfig(model=str(tiny_blip2), device="cuda"))


def test_missing_model_is_a_clear_abort(tmp_path: Path) -> None:
    with pytest.raises(AbortRun, match="folder not found"):
        Captioner(CaptionConfig(model=str(tmp_path / "no-model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AbortRun, match="could not be loaded"):
        Captioner(CaptionConfig(model=str(tmp_path / "empty")))
    with pytest.raises(AbortRun, match="could not be loaded"):
        Captioner(CaptionConfig(model="nobody/no-such-model", local_files_only=True))


def test_identical_frames_are_captioned_once(tmp_path: Path, stage_factory: Any, items_factory: Any) -> None:
    import shutil

    items = items_factory(tmp_path, n_clips=2, frames=3)
    for k in (1, 2):  # a still-image video: every keyframe is the same picture
        shutil.copy(tmp_path / items[0]["frame_paths"][0], tmp_path / items[0]["frame_paths"][k])
    st = stage_factory(tmp_path)
    results = st.process(items)
    assert st.total_frames == 6 and st.unique_frames == 4
    caps = results[0].outputs["frame_captions"]
    assert caps[0] == caps[1] == caps[2]
    ref = captions(stage_factory(tmp_path, dedup_frames=False).process(items))
    assert captions(results) == ref


def test_clip_without_frames_fails(tmp_path: Path, stage_factory: Any, items_factory: Any) -> None:
    items = items_factory(tmp_path, n_clips=2, frames=1)
    items[0].data["frame_paths"] = []
    results = {r.clip_id: r for r in stage_factory(tmp_path).process(items)}
    assert results[items[0].clip_id].reason == "no_frames"
    assert results[items[1].clip_id].status == "ok"


def test_empty_caption_is_retried_with_other_decoding(
    tmp_path: Path, stage_factory: Any, items_factory: Any, mute_blip2: Any
) -> None:
    items = items_factory(tmp_path, n_clips=2, frames=2)
    rescued = stage_factory(tmp_path, model=mute_blip2(rescued=True)).process(items)
    assert all(r.status == "ok" for r in rescued)
    assert all(c.startswith("a") for r in rescued for c in r.outputs["frame_captions"])
    empty = stage_factory(tmp_path, model=mute_blip2(rescued=False)).process(items)
    assert [(r.status, r.reason) for r in empty] == [("failed_permanent", "empty_caption")] * 2
    assert items[0]["frame_paths"][0] in empty[0].message


def test_clean_caption() -> None:
    assert clean_caption("  a  dog\n runs\x03 ", cut=False) == "a dog runs"
    assert clean_caption("a dog runs across the fie", cut=True) == "a dog runs across the"
    assert clean_caption("a dog runs.", cut=True) == "a dog runs."
    assert clean_caption("dog", cut=True) == "dog"
    assert clean_caption("\ufffd\x1d ", cut=False) == ""


def test_pick_frame() -> None:
    assert pick_frame("middle", 5, 3) == 3
    assert pick_frame("middle", 5, None) == 2
    assert pick_frame("last", 5, 3) == 4
    assert pick_frame(7, 5, 3) == 4


def test_demo_hook_builds_the_models_where_the_demo_config_names_them(tmp_path: Path) -> None:
    """The demo's models are where manifests/demo.yaml names them (issue 25), built once."""
    import contextlib

    import yaml

    from pipeline.cli import load_context
    from standins.demo import PREPARE

    text = Path("manifests/demo.yaml").read_text().replace("runs/demo", str(tmp_path / "demo"))
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(text)
    ctx = load_context(manifest, None, ())
    with contextlib.ExitStack() as stack:
        assert PREPARE["caption"](stack, ctx) == []  # nothing to override: the file says it
        stamp = (tmp_path / "demo" / "models" / "blip2-tiny" / ".complete").stat().st_mtime_ns
        assert PREPARE["caption"](stack, ctx) == []
    assert (tmp_path / "demo" / "models" / "blip2-tiny" / ".complete").stat().st_mtime_ns == stamp
    cfg = ctx.config
    assert Path(cfg.caption.model) == tmp_path / "demo" / "models" / "blip2-tiny"  # type: ignore[attr-defined]
    Captioner(cfg.caption)  # type: ignore[attr-defined]  # loads with from_pretrained(path)
    # The demo scores with the tiny CLIP and CLAP (stages 3 and 4), built in the same folder.
    for key in ("clip", "clap"):
        assert (tmp_path / "demo" / "models" / f"{key}-tiny" / "config.json").is_file()
    assert yaml.safe_load(text)["scoring"]["clip_model"] == str(tmp_path / "demo" / "models" / "clip-tiny")


def test_checkpoint_without_image_token_settings_still_captions_the_image(
    tmp_path: Path, tiny_blip2: Path, stage_factory: Any, items_factory: Any
) -> None:
    """Early blip2-opt-2.7b revisions lack ``image_token_index`` and ``num_query_tokens``."""
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_blip2, legacy)
    config = json.loads((legacy / "config.json").read_text())
    config["image_token_index"] = None
    (legacy / "config.json").write_text(json.dumps(config))
    proc = json.loads((legacy / "processor_config.json").read_text())
    del proc["num_query_tokens"]
    (legacy / "processor_config.json").write_text(json.dumps(proc))
    items = items_factory(tmp_path / "run", n_clips=3, frames=1)
    got = captions(stage_factory(tmp_path / "run", model=legacy).process(items))
    assert got == captions(stage_factory(tmp_path / "run").process(items)) and len(got) == 3


def test_static_cache_option_gives_the_same_captions(
    tmp_path: Path, stage_factory: Any, items_factory: Any
) -> None:
    items = items_factory(tmp_path, n_clips=3, frames=1)  # 3 images, chunk 4: the last one is padded
    ref = captions(stage_factory(tmp_path, gen_batch_size=4).process(items))
    got = captions(stage_factory(tmp_path, gen_batch_size=4, static_cache=True).process(items))
    assert got == ref and len(got) == 3


def test_compile_without_static_cache_is_a_config_error() -> None:
    from pipeline.config import ConfigError, load_config
    from stages.config import RunConfig

    with pytest.raises(ConfigError, match="static_cache"):
        load_config(RunConfig, "manifests/demo.yaml", ["caption.compile=true"])
    assert load_config(
        RunConfig, "manifests/demo.yaml", ["caption.compile=true", "caption.static_cache=true"]
    )
