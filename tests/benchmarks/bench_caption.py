"""Stage 3 throughput: ``caption.decoder`` generate vs fast side by side, and the naive loop.

Builds the ``Salesforce/blip2-opt-2.7b`` architecture (config written in code, no download) with
random weights, bf16 on the GPU; with no GPU, a mid-size variant (the real widths, 2 layers per
tower) in fp32 on the CPU. Writes distinct 224x224 JPEGs to disk and captions them:

- **generate** / **fast**: ``CaptionStage.process`` on batches of items, exactly as the runner
  calls it (thread pool decoding ahead, uint8 transfer, chunks of ``gen_batch_size``, text
  cleaning), with ``caption.decoder`` = ``generate`` (transformers' ``generate``) or ``fast``
  (``stages/caption/fast.py``: static cache, the step compiled as a CUDA graph on CUDA, the next
  chunk's image half on a side stream); ``--fast-eager`` adds fast without compiling;
- **naive**: per image, ``PIL.Image.open`` + ``Blip2Processor`` + ``generate`` with batch 1.

All with exactly 20 new tokens (``min_new_tokens = max_new_tokens = 20``), greedy and beam 5.
Per row: images/s, the speed-up over naive, milliseconds per decode step (both decoders alike:
one chunk with 20 new tokens minus one with 1, over 19, fastest of a few runs), the GPU memory
peak of the stage run (``torch.cuda.max_memory_allocated``; none on CPU) and how many captions
equal generate's. Run on a GPU box (figures go to BENCHMARKS.md with the card's name)::

    python tests/benchmarks/bench_caption.py --images 4096 --greedy-batches 256 \\
        --beam-batches 64 --json-out bench_caption.json

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


def write_jpegs(folder: Path, n: int, size: int = 224) -> list[str]:
    import numpy as np
    from PIL import Image

    rels = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        rel = f"media/frames/bench{i:06d}/0.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / rel, quality=90)
        rels.append(rel)
    return rels


def build_model(layers: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import Blip2ForConditionalGeneration

    from standins.blip2 import blip2_opt_config, blip2_opt_processor

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration._from_config(blip2_opt_config(layers), dtype=dtype)
    return model.eval(), blip2_opt_processor()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def stage_settings(device: str, beams: int, gen_batch: int, path: str, args: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "model": "random-weights-blip2-opt-2.7b-architecture",
        "device": device,
        "num_beams": beams,
        "max_new_tokens": 20,
        "min_new_tokens": 20,
        "gen_batch_size": gen_batch,
        "batch_size": gen_batch * args.chunks_per_call,
        "loader_workers": args.workers,
    }
    if path == "generate":
        settings |= {"decoder": "generate", "static_cache": args.static_cache, "compile": args.compile}
    else:  # fast: compiled as a CUDA graph on CUDA (the default); fast-eager: not compiled
        settings |= {"decoder": "fast", "compile": False if path == "fast-eager" else None}
    return settings


def run_stage_path(
    model: Any,
    processor: Any,
    workdir: Path,
    rels: list[str],
    device: str,
    beams: int,
    gen_batch: int,
    path: str,
    args: Any,
) -> tuple[dict[str, Any], list[list[str]]]:
    from pipeline.stage import Item, RunContext
    from stages.caption.captioner import Captioner
    from stages.caption.stage import CaptionStage
    from stages.config import RunConfig

    settings = stage_settings(device, beams, gen_batch, path, args)
    cfg = RunConfig.model_validate({"workdir": str(workdir), "caption": settings})
    stage = CaptionStage(RunContext(workdir, cfg))
    stage.start(Captioner(cfg.caption, model=model, processor=processor))
    items = [Item(f"bench{i:06d}", {"frame_paths": [rel], "middle_frame": 0}) for i, rel in enumerate(rels)]
    captions: list[list[str]] = []
    try:
        # Warm-up: allocator, kernels, compiled graphs (two chunks: the fast path's overlap of
        # the next chunk's image half runs too).
        stage.process(items[: 2 * gen_batch])
        peak_reset(device)
        t0 = time.perf_counter()
        ok = 0
        size = cfg.caption.batch_size
        for i in range(0, len(items), size):
            results = stage.process(items[i : i + size])
            ok += sum(r.status == "ok" for r in results)
            captions.extend(r.outputs.get("frame_captions", []) for r in results)
        sync(device)
        seconds = time.perf_counter() - t0
        peak = peak_gib(device)
        final_batch = stage.captioner.gen_batch
        step_ms = decode_step_ms(stage.captioner, workdir, rels, device, beams, args.step_reps)
    finally:
        stage.teardown()
    if ok != len(items):
        raise RuntimeError(f"only {ok} of {len(items)} images captioned")
    row = {
        "path": path,
        "beams": beams,
        "gen_batch": gen_batch,
        "gen_batch_final": final_batch,
        "images": len(items),
        "seconds": round(seconds, 3),
        "img_per_s": round(len(items) / seconds, 2),
        "ms_per_decode_step": step_ms,
        "peak_gib": peak,
    }
    return row, captions


def decode_step_ms(cap: Any, workdir: Path, rels: list[str], device: str, beams: int, reps: int) -> float:
    """Time per decode step, the same way for both decoders: one chunk with 20 new tokens and
    with 1 (the first token comes from the prefill, so no step runs), (t20 - t1) / 19. The image
    half and the prefill cancel out. The fast decoder's compiled step for this shape is already
    recorded by the stage run (20 tokens go first: a 1-token run makes a new cache)."""
    from stages.caption.captioner import Decoding

    frames = [cap.load_frame(workdir / rel) for rel in rels[: cap.gen_batch]]

    def timed(tokens: int) -> float:
        decoding = Decoding(beams, tokens, 1.0, tokens)
        cap.generate(frames, decoding)  # warm-up for this length
        runs = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            cap.generate(frames, decoding)
            sync(device)
            runs.append(time.perf_counter() - t0)
        return min(runs)  # other work on the machine only ever adds time

    t20 = timed(20)
    return round(1000 * (t20 - timed(1)) / 19, 2)


def run_naive(
    model: Any, processor: Any, workdir: Path, rels: list[str], device: str, beams: int
) -> dict[str, Any]:
    import torch
    from PIL import Image

    def one(rel: str) -> str:
        with Image.open(workdir / rel) as im:
            enc = processor(images=im.convert("RGB"), text="", return_tensors="pt").to(device)
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(
                **enc, num_beams=beams, max_new_tokens=20, min_new_tokens=20, do_sample=False
            )
        return processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)[0]

    one(rels[0])
    peak_reset(device)
    t0 = time.perf_counter()
    for rel in rels:
        one(rel)
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "path": "naive",
        "beams": beams,
        "gen_batch": 1,
        "images": len(rels),
        "seconds": round(seconds, 3),
        "img_per_s": round(len(rels) / seconds, 2),
        "peak_gib": peak_gib(device),
    }


def machine(device: str) -> str:
    import os

    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    layers = args.layers or ("full" if gpu else "mid")
    n_images = args.images or (4096 if gpu else 16)
    n_naive = args.naive_images or (64 if gpu else 2)
    greedy = args.greedy_batches or ([256, 512] if gpu else [8])
    beam = args.beam_batches or ([64] if gpu else [4])
    paths = list(args.decoders) + (["fast-eager"] if args.fast_eager else [])
    if "generate" in paths:  # first: the reference the others' captions are compared with
        paths.remove("generate")
        paths.insert(0, "generate")
    args.step_reps = args.step_reps or (3 if gpu else 2)
    t_build = time.perf_counter()
    model, processor = build_model(layers, device)
    params = sum(p.numel() for p in model.parameters())
    report: dict[str, Any] = {
        "benchmark": "bench_caption",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "architecture": f"blip2-opt-2.7b ({layers}: {params / 1e9:.3f} B params, {model.dtype})",
        "build_s": round(time.perf_counter() - t_build, 1),
        "new_tokens": 20,
        "generate_static_cache": args.static_cache,
        "generate_compile": args.compile,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rels = write_jpegs(workdir, n_images)
        for beams, sizes in ((1, greedy), (5, beam)):
            naive = run_naive(model, processor, workdir, rels[:n_naive], device, beams)
            report["runs"].append(naive)
            print(json.dumps(naive), flush=True)
            for size in sizes:
                reference: list[list[str]] | None = None
                for path in paths:
                    res, caps = run_stage_path(
                        model, processor, workdir, rels, device, beams, size, path, args
                    )
                    if path == "generate":
                        reference = caps
                    if reference is not None:
                        same = sum(a == b for a, b in zip(caps, reference, strict=True))
                        res["same_captions_as_generate"] = f"{same}/{len(caps)}"
                    res["speedup_vs_naive"] = round(res["img_per_s"] / naive["img_per_s"], 1)
                    report["runs"].append(res)
                    print(json.dumps(res), flush=True)
    print(format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"bench_caption {report['date']} on {report['machine']}; {report['architecture']}; "
        f"torch {report['torch']}, transformers {report['transformers']}; 20 new tokens",
        "| decoding | path | images per chunk | images | img/s | vs naive | ms per decode step "
        "| GPU peak GiB | captions = generate's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    for r in report["runs"]:
        dec = "greedy" if r["beams"] == 1 else f"beam {r['beams']}"
        lines.append(
            f"| {dec} | {r['path']} | {r['gen_batch']} | {r['images']} | {r['img_per_s']} | "
            f"{r.get('speedup_vs_naive', 1.0)}x | {cell(r.get('ms_per_decode_step'))} | "
            f"{cell(r['peak_gib'])} | {cell(r.get('same_captions_as_generate'))} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=None, help="Images for the stage path (GPU 4096, CPU 16).")
    p.add_argument(
        "--naive-images", type=int, default=None, help="Images for the naive loop (GPU 64, CPU 2)."
    )
    p.add_argument(
        "--greedy-batches", type=int, nargs="*", default=None, help="gen_batch_size values, greedy."
    )
    p.add_argument("--beam-batches", type=int, nargs="*", default=None, help="gen_batch_size values, beam 5.")
    p.add_argument("--chunks-per-call", type=int, default=4, help="Items per process() = this x gen_batch.")
    p.add_argument("--workers", type=int, default=8, help="caption.loader_workers.")
    p.add_argument(
        "--layers", choices=["full", "mid"], default=None, help="Default: full on GPU, mid on CPU."
    )
    p.add_argument(
        "--decoders",
        nargs="+",
        choices=["generate", "fast"],
        default=["generate", "fast"],
        help="caption.decoder values to run side by side (default both).",
    )
    p.add_argument(
        "--fast-eager", action="store_true", help="Also run decoder=fast with compile=false (no CUDA graph)."
    )
    p.add_argument(
        "--step-reps",
        type=int,
        default=None,
        help="Timed repeats of the decode-step measure, fastest kept (GPU 3, CPU 2).",
    )
    p.add_argument("--static-cache", action="store_true", help="decoder=generate: caption.static_cache=true.")
    p.add_argument(
        "--compile", action="store_true", help="decoder=generate: caption.compile=true (with --static-cache)."
    )
    p.add_argument("--json-out", default=None, help="Also write the report as JSON here.")
    return p.parse_args(argv)


def test_bench_caption() -> None:
    """``make bench`` entry: the machine's defaults; the figures are printed, not asserted."""
    run(parse_args([]))


if __name__ == "__main__":
    run(parse_args())
