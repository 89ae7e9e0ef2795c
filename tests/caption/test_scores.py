"""The CLIP and CLAP scorers on the tiny random models (real classes, real processors): batching
gives the scores one-by-one gives, audio reaches CLAP at its own rate, stage 3 pairs keyframe i
with caption i, and a frame the scorer cannot read fails only its clip."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stages.scoring import ClapScorer, ClipScorer, ScoreError, ScorerSpec, cosine
from standins.scorers import write_stage2_media

TEXTS = [
    "a dog barks",
    "a man is speaking while a car passes by on a wet road",
    "birds",
    "a crowd cheers at a football match in a stadium at night",
    "water flows over rocks",
]


def media(tmp_path: Path, n: int, seconds: list[float] | None = None) -> tuple[list[Path], list[Path]]:
    frames, audio = [], []
    for i in range(n):
        sec = seconds[i] if seconds else 10.0
        write_stage2_media(tmp_path, f"f/{i}.jpg", f"a/{i}.flac", seed=i, seconds=sec)
        frames.append(tmp_path / f"f/{i}.jpg")
        audio.append(tmp_path / f"a/{i}.flac")
    return frames, audio


def test_clip_batched_equals_one_by_one(tmp_path: Path, tiny_clip: Path) -> None:
    frames, _ = media(tmp_path, 5)
    batched = ClipScorer(ScorerSpec(str(tiny_clip), batch_size=4))
    single = ClipScorer(ScorerSpec(str(tiny_clip), batch_size=1))
    bi, si = batched.image_embeds(frames), single.image_embeds(frames)
    bt, st = batched.text_embeds(TEXTS), single.text_embeds(TEXTS)
    for f in frames:
        np.testing.assert_allclose(bi[f], si[f], atol=2e-5)  # type: ignore[arg-type]
    for t in TEXTS:  # texts of different lengths share a padded batch
        np.testing.assert_allclose(bt[t], st[t], atol=2e-5)
    scores = np.array([[cosine(bi[f], bt[t]) for t in TEXTS] for f in frames])  # type: ignore[arg-type]
    assert np.unique(scores.round(4)).size == scores.size  # every pair scores differently


def test_clap_batched_equals_one_by_one(tmp_path: Path, tiny_clap: Path) -> None:
    # 10 s (CLAP's window), 12 s (cut to its middle 10 s), 4 s (repeat-padded by the extractor).
    _, audio = media(tmp_path, 3, seconds=[10.0, 12.0, 4.0])
    batched = ClapScorer(ScorerSpec(str(tiny_clap), batch_size=3))
    single = ClapScorer(ScorerSpec(str(tiny_clap), batch_size=1))
    ba, sa = batched.audio_embeds(audio), single.audio_embeds(audio)
    for a in audio:
        np.testing.assert_allclose(ba[a], sa[a], atol=2e-5)  # type: ignore[arg-type]
    bt, st = batched.text_embeds(TEXTS), single.text_embeds(TEXTS)
    for t in TEXTS:
        np.testing.assert_allclose(bt[t], st[t], atol=2e-5)
    # A longer clip is cut the same way every time (the extractor's own crop is random).
    again = ClapScorer(ScorerSpec(str(tiny_clap), batch_size=3)).audio_embeds(audio)
    np.testing.assert_array_equal(again[audio[1]], ba[audio[1]])  # type: ignore[arg-type]


def test_audio_reaches_clap_at_its_rate(tmp_path: Path, tiny_clap: Path) -> None:
    """16 kHz in, 48 kHz out, band-limited: a 1 kHz tone is still a 1 kHz tone and nothing leaks
    above the 8 kHz the source can hold (repeating samples would put images of it up there)."""
    import soundfile as sf

    rate = 16000
    t = np.arange(12 * rate) / rate
    sf.write(
        tmp_path / "tone.flac",
        (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32),
        rate,
        subtype="PCM_16",
    )
    scorer = ClapScorer(ScorerSpec(str(tiny_clap)))
    audio = scorer.read_audio(tmp_path / "tone.flac")
    assert scorer.rate == 48000 and len(audio) == 480000  # the middle 10 s at 48 kHz
    spectrum = np.abs(np.fft.rfft(audio))
    freqs = np.fft.rfftfreq(len(audio), 1 / 48000)
    assert abs(freqs[spectrum.argmax()] - 1000) < 1
    assert spectrum[freqs > 8500].max() < 1e-3 * spectrum.max()


def test_unreadable_inputs_are_errors_per_input(tmp_path: Path, tiny_clip: Path, tiny_clap: Path) -> None:
    frames, audio = media(tmp_path, 2)
    frames[0].write_bytes(b"\xff\xd8 not a jpeg")
    audio[0].write_bytes(b"fLaC garbage")
    got = ClipScorer(ScorerSpec(str(tiny_clip))).image_embeds([*frames, tmp_path / "gone.jpg"])
    assert isinstance(got[frames[0]], ScoreError) and got[frames[0]].reason == "score_unreadable_frame"
    assert isinstance(got[tmp_path / "gone.jpg"], ScoreError)
    assert isinstance(got[frames[1]], np.ndarray)
    heard = ClapScorer(ScorerSpec(str(tiny_clap))).audio_embeds(audio)
    assert isinstance(heard[audio[0]], ScoreError) and heard[audio[0]].reason == "score_unreadable_audio"
    assert str(audio[0]) in str(heard[audio[0]])
    assert isinstance(heard[audio[1]], np.ndarray)


def reference_clip_score(model_dir: Path, image: Path, text: str) -> float:
    """CLIP the way its model card does it: the processor on a PIL image and the text, then the
    model's features, cosine."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = CLIPProcessor.from_pretrained(model_dir)
    with Image.open(image) as im:
        enc = proc(images=im.convert("RGB"), text=[text], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=enc["pixel_values"])
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return float(torch.nn.functional.cosine_similarity(img, txt).item())


def test_stage3_scores_keyframe_i_with_caption_i(
    tmp_path: Path, stage_factory: Any, items_factory: Any, tiny_clip: Path
) -> None:
    items = items_factory(tmp_path, n_clips=3, frames=3)
    st = stage_factory(tmp_path, scoring={"batch_size": 4})
    results = st.process(items)
    assert all(r.status == "ok" for r in results)
    for item, r in zip(items, results, strict=True):
        scores, caps = r.outputs["visual_clip_score"], r.outputs["frame_captions"]
        assert len(scores) == len(caps) == 3
        for k in (0, 2):
            ref = reference_clip_score(tiny_clip, tmp_path / item["frame_paths"][k], caps[k])
            assert scores[k] == pytest.approx(ref, abs=1e-4)
        assert r.outputs["clip_model"].startswith(f"{tiny_clip}@local:")
    off = stage_factory(tmp_path, score=False).process(items[:1])[0]
    assert off.status == "ok" and "visual_clip_score" not in off.outputs


def test_stage3_scorer_is_its_layer_not_in_its_fingerprint(
    tmp_path: Path, tiny_blip2: Path, tiny_clip: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another CLIP model changes the score layer's settings only: the captions stay current."""
    from pipeline.io import folder_fingerprint
    from pipeline.stage import RunContext
    from stages.caption.stage import CaptionStage
    from stages.config import RunConfig

    def fp(caption: dict[str, Any] | None = None, **scoring: Any) -> tuple[dict[str, Any], Any]:
        data = {"workdir": str(tmp_path), "caption": {"model": str(tiny_blip2)} | (caption or {})}
        cfg = RunConfig.model_validate(data | {"scoring": scoring})
        st = CaptionStage(RunContext(tmp_path, cfg))
        return st.fingerprint_settings(), st.layer_settings()

    base, layer = fp()
    assert layer == {"clip": "openai/clip-vit-large-patch14@32bd64288804d66eefd0ccbe215aa642df71cc41"}
    assert fp(clip_revision="main") == (base, {"clip": "openai/clip-vit-large-patch14@main"})
    assert fp(clip_model=str(tiny_clip)) == (base, {"clip": folder_fingerprint(tiny_clip)})
    assert fp({"score": False}) == (base, None)
    assert fp(batch_size=3, device="cpu") == (base, layer)  # batching and devices change no score
    # A manifest written before the scoring: section: its keys are read in their new place, said.
    with caplog.at_level(logging.WARNING, logger="avcaps"):
        moved = RunConfig.model_validate({"caption": {"clip_model": "x", "clip_batch_size": 8}})
    assert (moved.scoring.clip_model, moved.scoring.batch_size) == ("x", 8)
    assert "caption.clip_model is now scoring.clip_model" in caplog.text
    # Two places that give one setting two values: refused, naming both.
    with pytest.raises(Exception, match=r"caption\.clip_model='x' and merge\.clip_model='y'"):
        RunConfig.model_validate({"caption": {"clip_model": "x"}, "merge": {"clip_model": "y"}})
    with pytest.raises(Exception, match=r"scoring\.clip_model='z' and caption\.clip_model='x'"):
        RunConfig.model_validate({"caption": {"clip_model": "x"}, "scoring": {"clip_model": "z"}})


def test_stage3_frame_the_scorer_cannot_read_leaves_its_clip_unscored(
    tmp_path: Path, stage_factory: Any, items_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyframe that BLIP-2 read but CLIP cannot (gone in between: a cleanup ran) leaves its
    clip's captions made and its scores not (the layer, for the next run), with the path in the
    message; the others score."""
    items = items_factory(tmp_path, n_clips=3, frames=2)
    st = stage_factory(tmp_path)
    victim = tmp_path / items[1]["frame_paths"][1]
    read = ClipScorer.read_image

    def flaky(path: Path) -> Any:
        if path == victim:
            victim.unlink(missing_ok=True)
        return read(path)

    monkeypatch.setattr(ClipScorer, "read_image", staticmethod(flaky))
    results = {r.clip_id: r for r in st.process(items)}
    bad = results[items[1].clip_id]
    assert bad.status == "ok" and not bad.layer and "score_missing_frame" in bad.message
    assert str(victim) in bad.message
    assert bad.outputs["frame_captions"] and "visual_clip_score" not in bad.outputs
    assert all(
        results[it.clip_id].status == "ok" and results[it.clip_id].layer for it in (items[0], items[2])
    )
