"""Stage 3 throughput: the stage's own code path vs. the naive one-image-at-a-time loop.

Builds the ``Salesforce/blip2-opt-2.7b`` architecture (config written in code, no download) with
random weights, bf16 on the GPU; with no GPU, a mid-size variant (the real widths, 2 layers per
tower) in fp32 on the CPU. Writes distinct 224x224 JPEGs to disk and captions them:

- **stage**: ``CaptionStage.process`` on batches of items, exactly as the runner calls it (thread
  pool decoding ahead, uint8 transfer, chunks of ``gen_batch_size``, text cleaning);
- **naive**: per image, ``PIL.Image.open`` + ``Blip2Processor`` + ``generate`` with batch 1.

Both with exactly 20 new tokens (``min_new_tokens = max_new_tokens = 20``), greedy and beam 5.
Reports images/s, the speed-up and the GPU memory peak. Run on a GPU box (figures go to
BENCHMARKS.md with the card's name)::

    python tests/benchmarks/bench_caption.py --images 4096 --greedy-batches 256 512 1024 \\
        --beam-batches 64 128 --json-out bench_caption.json

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


def run_stage_path(
    model: Any,
    processor: Any,
    workdir: Path,
    rels: list[str],
    device: str,
    beams: int,
    gen_batch: int,
    args: Any,
) -> dict[str, Any]:
    from pipeline.stage import Item, RunContext
    from stages.caption.captioner import Captioner
    from stages.caption.stage import CaptionStage
    from stages.config import RunConfig

    settings = {
        "model": "random-weights-blip2-opt-2.7b-architecture",
        "device": device,
        "num_beams": beams,
        "max_new_tokens": 20,
        "min_new_tokens": 20,
        "gen_batch_size": gen_batch,
        "batch_size": gen_batch * args.chunks_per_call,
        "loader_workers": args.workers,
        "static_cache": args.static_cache,
        "compile": args.compile,
    }
    cfg = RunConfig.model_validate({"workdir": str(workdir), "caption": settings})
    stage = CaptionStage(RunContext(workdir, cfg))
    stage.start(Captioner(cfg.caption, model=model, processor=processor))
    items = [Item(f"bench{i:06d}", {"frame_paths": [rel], "middle_frame": 0}) for i, rel in enumerate(rels)]
    try:
        stage.process(items[:gen_batch])  # warm-up: allocator, kernels, compiled graphs
        peak_reset(device)
        t0 = time.perf_counter()
        ok = 0
        size = cfg.caption.batch_size
        for i in range(0, len(items), size):
            ok += sum(r.status == "ok" for r in stage.process(items[i : i + size]))
        sync(device)
        seconds = time.perf_counter() - t0
        final_batch = stage.captioner.gen_batch
    finally:
        stage.teardown()
    if ok != len(items):
        raise RuntimeError(f"only {ok} of {len(items)} images captioned")
    return {
        "path": "stage",
        "beams": beams,
        "gen_batch": gen_batch,
        "gen_batch_final": final_batch,
        "images": len(items),
        "seconds": round(seconds, 3),
        "img_per_s": round(len(items) / seconds, 2),
        "peak_gib": peak_gib(device),
    }


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
        "static_cache": args.static_cache,
        "compile": args.compile,
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
                res = run_stage_path(model, processor, workdir, rels, device, beams, size, args)
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
        "| decoding | path | images per generate() | images | img/s | vs naive | GPU peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        dec = "greedy" if r["beams"] == 1 else f"beam {r['beams']}"
        lines.append(
            f"| {dec} | {r['path']} | {r['gen_batch']} | {r['images']} | {r['img_per_s']} | "
            f"{r.get('speedup_vs_naive', 1.0)}x | {r['peak_gib'] if r['peak_gib'] is not None else '-'} |"
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
    p.add_argument("--static-cache", action="store_true", help="caption.static_cache=true.")
    p.add_argument("--compile", action="store_true", help="caption.compile=true (with --static-cache).")
    p.add_argument("--json-out", default=None, help="Also write the report as JSON here.")
    return p.parse_args(argv)


def test_bench_caption() -> None:
    """``make bench`` entry: the machine's defaults; the figures are printed, not asserted."""
    run(parse_args([]))


if __name__ == "__main__":
    run(parse_args())
