"""Scorer throughput (CLIP images/s, CLAP clips/s): the scorers' batched path vs. one at a time,
and what CLIP scoring adds to stage 3.

Builds the real architectures with random weights (configs in code, no download:
``standins.scorers.clip_large_config`` for ``openai/clip-vit-large-patch14``,
``clap_larger_general_config`` for ``laion/larger_clap_general``); random weights cost exactly
what trained ones cost. Writes keyframe JPEGs (384x216, as stage 2 writes them) and 10-s 16 kHz
FLACs, then measures, in the same run:

- **clip naive**: per keyframe, ``PIL.Image.open`` + ``CLIPProcessor`` on the image and its caption
  + the model, batch 1 (as a model card does it); **clip batched**: ``ClipScorer`` (images and
  texts in chunks of ``--batch``);
- **clap naive** / **clap batched**: the same for audio (read, soxr to 48 kHz, ``ClapProcessor``);
- **blip2 vision**: the full-size BLIP-2 ViT-g + Q-Former forward on the same images (the part of
  captioning a CLIP image forward resembles most: a ViT over the same 257 tokens), batched.

On a GPU box (``--direct``, the default there) it also runs stage 3 itself on the full-size
BLIP-2 with and without the CLIP scorer (``CaptionStage.process``, the same images) and reports
the slowdown. On a CPU, where a 3.7 B-parameter BLIP-2 cannot caption in useful time, it prints
the GPU estimate from the measured CPU ratio: CLIP time per image / BLIP-2 vision time per image
(both compute-bound ViTs over 257 tokens), times the BLIP-2 vision time and the stage's caption
time per image measured on an H200 (FACTS.md: 1.07 ms vision; 424 img/s greedy at batch 256,
90 img/s beam 5 at batch 64)::

    python tests/benchmarks/bench_scores.py --json-out bench_scores.json            # CPU
    python tests/benchmarks/bench_scores.py --images 2048 --naive-images 64 --batch 256 \\
        --caption-batch 256 --json-out bench_scores.json                               # GPU

``make bench`` runs it with the defaults for the machine it is on.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# H200, bf16, random weights of blip2-opt-2.7b (FACTS.md, "GPU stages").
H200_BLIP2_VISION_MS = 1.07  # ViT-g + Q-Former + projection forward, batch 256
H200_CAPTION_MS = {"greedy, batch 256": 1000 / 424, "beam 5, batch 64": 1000 / 90}
CAPTIONS = [
    "a man is speaking while a dog barks in the background",
    "a car engine revs and tires squeal on a wet road",
    "a woman sings on a stage with a guitar",
    "birds chirp in a green forest near a river",
    "a train passes by a station with people waiting on the platform",
    "children laugh and play in a park on a sunny day",
]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Any, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def build_scorers(device: str, batch: int) -> tuple[Any, Any]:
    import torch
    from transformers import (
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
    )

    from stages.scoring import ClapScorer, ClipScorer, ScorerSpec
    from standins.scorers import clap_larger_general_config, clip_large_config, word_level_tokenizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        clip_model = CLIPModel._from_config(clip_large_config(), dtype=dtype)
        clap_model = ClapModel._from_config(clap_larger_general_config(), dtype=dtype)
    clip_proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(),  # the class defaults are ViT-L/14's: 224 px, OpenAI mean/std
        tokenizer=word_level_tokenizer(49408, bos=49406, eos=49407, pad=1, unk=0),
    )
    clap_proc = ClapProcessor(
        feature_extractor=ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad"),
        tokenizer=word_level_tokenizer(50265, bos=0, eos=2, pad=1, unk=3),
    )
    spec = ScorerSpec("random-weights", device=device, batch_size=batch)
    return (
        ClipScorer(spec, model=clip_model, processor=clip_proc),
        ClapScorer(spec, model=clap_model, processor=clap_proc),
    )


def words(text: str) -> str:
    """The benchmark tokenizers know ``w<id>`` words: a caption of the same length in tokens."""
    return " ".join(f"w{100 + sum(map(ord, w)) * 37 % 40000}" for w in text.split())


def clip_naive(scorer: Any, frames: list[Path], texts: list[str], device: str) -> float:
    import torch
    from PIL import Image

    def one(frame: Path, text: str) -> None:
        with Image.open(frame) as im:
            enc = scorer.processor(images=im.convert("RGB"), text=[text], return_tensors="pt", padding=True)
        with torch.inference_mode():
            scorer.model.get_image_features(pixel_values=enc["pixel_values"].to(device, scorer.dtype))
            scorer.model.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            )

    one(frames[0], texts[0])  # warm-up
    return timed(lambda: [one(f, t) for f, t in zip(frames, texts, strict=True)], device)


def clip_batched(scorer: Any, frames: list[Path], texts: list[str], device: str) -> float:
    from stages.scoring import cosine

    def run() -> None:
        scorer._texts.clear()
        imgs, txts = scorer.image_embeds(frames), scorer.text_embeds(texts)
        [cosine(imgs[f], txts[t]) for f, t in zip(frames, texts, strict=True)]

    scorer.image_embeds(frames[:2])  # warm-up
    return timed(run, device)


def clap_naive(scorer: Any, audio: list[Path], texts: list[str], device: str) -> float:
    import torch

    def one(path: Path, text: str) -> None:
        wave = scorer.read_audio(path)
        feats = scorer.processor.feature_extractor(wave, sampling_rate=scorer.rate, return_tensors="pt")
        enc = scorer.processor.tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            scorer.model.get_audio_features(input_features=feats["input_features"].to(device, scorer.dtype))
            scorer.model.get_text_features(**enc.to(device))

    one(audio[0], texts[0])
    return timed(lambda: [one(a, t) for a, t in zip(audio, texts, strict=True)], device)


def clap_batched(scorer: Any, audio: list[Path], texts: list[str], device: str) -> float:
    from stages.scoring import cosine

    def run() -> None:
        scorer._texts.clear()
        embs, txts = scorer.audio_embeds(audio), scorer.text_embeds(texts)
        [cosine(embs[a], txts[t]) for a, t in zip(audio, texts, strict=True)]

    scorer.audio_embeds(audio[:2])
    return timed(run, device)


def blip2_vision(frames: list[Path], device: str, batch: int) -> tuple[float, int]:
    """The full-size BLIP-2 ViT-g + Q-Former forward, batched (no language model: on a CPU the
    2.7 B-parameter OPT is out of reach, and the vision side is what FACTS.md measured alone)."""
    import torch
    from PIL import Image
    from transformers import Blip2QFormerModel, Blip2VisionModel, BlipImageProcessor

    from standins.blip2 import blip2_opt_config

    cfg = blip2_opt_config("full")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        vision = Blip2VisionModel._from_config(cfg.vision_config, dtype=dtype).eval()
        qformer = Blip2QFormerModel._from_config(cfg.qformer_config, dtype=dtype).eval()
        query = torch.zeros(1, cfg.num_query_tokens, cfg.qformer_config.hidden_size, dtype=dtype)
    params = sum(p.numel() for p in [*vision.parameters(), *qformer.parameters()])
    proc = BlipImageProcessor(size={"height": 224, "width": 224})

    def run() -> None:
        for i in range(0, len(frames), batch):
            ims = []
            for f in frames[i : i + batch]:
                with Image.open(f) as im:
                    ims.append(im.convert("RGB"))
            pix = proc(images=ims, return_tensors="pt")["pixel_values"].to(device, dtype)
            with torch.inference_mode():
                img = vision(pixel_values=pix).last_hidden_state
                qformer(query_embeds=query.expand(len(ims), -1, -1), encoder_hidden_states=img)

    run_once = frames[:1]
    with torch.inference_mode(), Image.open(run_once[0]) as im:  # warm-up
        vision(
            pixel_values=proc(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"].to(
                device, dtype
            )
        )
    seconds = timed(run, device)
    return seconds, params


def caption_with_and_without_scores(
    frames: list[str], workdir: Path, device: str, clip: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Stage 3 itself (``CaptionStage.process``) on the full BLIP-2, greedy, 20 new tokens, with
    and without the CLIP scorer: the slowdown the issue bounds (GPU box)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from pipeline.stage import Item, RunContext
    from stages.caption.captioner import Captioner
    from stages.caption.stage import CaptionStage
    from stages.config import RunConfig
    from standins.blip2 import blip2_opt_config, blip2_opt_processor

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = Blip2ForConditionalGeneration._from_config(blip2_opt_config(args.layers), dtype=dtype).eval()
    settings = {
        "model": "random-weights-blip2-opt-2.7b-architecture",
        "device": device,
        "num_beams": 1,
        "max_new_tokens": 20,
        "min_new_tokens": 20,
        "gen_batch_size": args.caption_batch,
        "batch_size": args.caption_batch * 4,
        "loader_workers": 8,
    }
    cfg = RunConfig.model_validate({"workdir": str(workdir), "caption": settings})
    items = [Item(f"bench{i:06d}", {"frame_paths": [rel], "middle_frame": 0}) for i, rel in enumerate(frames)]
    out: dict[str, Any] = {"caption_layers": args.layers, "caption_batch": args.caption_batch}
    for name, scorer in (("caption_only", None), ("caption_and_clip", clip)):
        stage = CaptionStage(RunContext(workdir, cfg))
        stage.start(Captioner(cfg.caption, model=model, processor=blip2_opt_processor()), scorer)
        try:
            stage.process(items[: args.caption_batch])  # warm-up
            size = cfg.caption.batch_size

            def run(stage: CaptionStage = stage, size: int = size) -> None:
                for i in range(0, len(items), size):
                    assert all(r.status == "ok" for r in stage.process(items[i : i + size]))

            seconds = timed(run, device)
        finally:
            stage.teardown()
        out[f"{name}_img_per_s"] = round(len(items) / seconds, 2)
    out["measured_slowdown_pct"] = round(
        100 * (out["caption_only_img_per_s"] / out["caption_and_clip_img_per_s"] - 1), 1
    )
    return out


def machine(device: str) -> str:
    import os

    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from standins.scorers import write_stage2_media

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    n = args.images or (2048 if gpu else 8)
    n_naive = args.naive_images or (64 if gpu else 4)
    batch = args.batch or (256 if gpu else 8)
    n_vision = args.vision_images or (n if gpu else 4)
    direct = args.direct if args.direct is not None else gpu
    torch.set_num_threads(torch.get_num_threads())
    report: dict[str, Any] = {
        "benchmark": "bench_scores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "bfloat16" if gpu else "float32",
        "batch": batch,
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        frames, audio, rels = [], [], []
        for i in range(n):
            rel = f"media/frames/bench{i:06d}/0.jpg"
            write_stage2_media(workdir, rel, f"media/audio/bench{i:06d}.flac", seed=i, size=(384, 216))
            rels.append(rel)
            frames.append(workdir / rel)
            audio.append(workdir / f"media/audio/bench{i:06d}.flac")
        texts = [words(CAPTIONS[i % len(CAPTIONS)]) + f" w{i}" for i in range(n)]  # distinct texts
        t0 = time.perf_counter()
        clip, clap = build_scorers(device, batch)
        report["build_s"] = round(time.perf_counter() - t0, 1)
        report["clip_params_m"] = round(sum(p.numel() for p in clip.model.parameters()) / 1e6, 1)
        report["clap_params_m"] = round(sum(p.numel() for p in clap.model.parameters()) / 1e6, 1)

        s = clip_naive(clip, frames[:n_naive], texts[:n_naive], device)
        report["clip_naive_img_per_s"] = round(n_naive / s, 3)
        s = clip_batched(clip, frames, texts, device)
        report["clip_batched_img_per_s"] = round(n / s, 3)
        s = clap_naive(clap, audio[:n_naive], texts[:n_naive], device)
        report["clap_naive_clips_per_s"] = round(n_naive / s, 3)
        s = clap_batched(clap, audio, texts, device)
        report["clap_batched_clips_per_s"] = round(n / s, 3)
        report["clip_speedup"] = round(report["clip_batched_img_per_s"] / report["clip_naive_img_per_s"], 2)
        report["clap_speedup"] = round(
            report["clap_batched_clips_per_s"] / report["clap_naive_clips_per_s"], 2
        )
        del clap

        s, params = blip2_vision(frames[:n_vision], device, batch)
        report["blip2_vision_qformer_params_m"] = round(params / 1e6, 1)
        report["blip2_vision_img_per_s"] = round(n_vision / s, 3)
        ratio = report["blip2_vision_img_per_s"] / report["clip_batched_img_per_s"]
        report["clip_over_blip2_vision_time"] = round(ratio, 3)
        est_ms = ratio * H200_BLIP2_VISION_MS
        report["h200_clip_ms_per_img_estimate"] = round(est_ms, 3)
        report["h200_stage3_slowdown_pct_estimate"] = {
            k: round(100 * est_ms / v, 1) for k, v in H200_CAPTION_MS.items()
        }
        if direct:
            report.update(caption_with_and_without_scores(rels, workdir, device, clip, args))
    print(json.dumps(report, indent=2), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--images", type=int, default=None, help="Keyframes/clips for the batched paths (GPU 2048, CPU 8)."
    )
    p.add_argument(
        "--naive-images", type=int, default=None, help="For the one-at-a-time paths (GPU 64, CPU 4)."
    )
    p.add_argument("--batch", type=int, default=None, help="Scorer batch size (GPU 256, CPU 8).")
    p.add_argument(
        "--vision-images", type=int, default=None, help="Images for the BLIP-2 vision forward (CPU 4)."
    )
    p.add_argument(
        "--direct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Run stage 3 with and without scores (default: on a GPU).",
    )
    p.add_argument("--caption-batch", type=int, default=256, help="caption.gen_batch_size of --direct.")
    p.add_argument("--layers", choices=["full", "mid"], default="full", help="BLIP-2 size of --direct.")
    p.add_argument("--json-out", default=None, help="Also write the report as JSON here.")
    return p.parse_args(argv)


def test_bench_scores() -> None:
    """``make bench`` entry: the machine's defaults; the figures are printed, not asserted."""
    run(parse_args([]))


if __name__ == "__main__":
    run(parse_args())
