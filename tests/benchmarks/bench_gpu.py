"""``make bench-gpu``: every GPU benchmark in one command, one JSON with the card's name.

A lent GPU machine comes for minutes (the device tool: one H100 or H200, 15 minutes in all, its
start included, no internet, PyTorch and transformers but not our venv), so everything it should
measure runs from this one script, sized to finish in under 10 minutes on one H100:

1. ``bench_caption.py``: stage 3 on the full-size BLIP-2 (random weights), ``caption.decoder``
   generate vs fast side by side, greedy at 256 images per chunk and beam 5 at 64, and the naive
   loop (issue 19's targets: 700 img/s greedy, 150 beam 5 on an H200);
2. ``bench_scores.py --direct``: CLIP and CLAP batched vs one at a time, and stage 3 with and
   without the CLIP scorer (issue 18's bound: under 15 % slower).

Each part's report goes into ``--json-out`` as soon as it is done (a part that fails is recorded
with its error and the next one runs), with the card's name, the versions and the seconds taken.
Python packages the machine lacks (pydantic, soxr, soundfile...) are installed first from
``--wheels`` (``make gpu-wheels`` downloads them here, for the machine's Python 3.12), with no
index: nothing is fetched there. ``--smoke`` runs every part at toy sizes on any machine (how this
script is checked without a GPU).

    python tests/benchmarks/bench_gpu.py --wheels .gpu-wheels --json-out "$OUT/bench_gpu.json"
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

# module -> pip name, for what the benchmarks import beyond PyTorch and transformers.
NEEDED = {"pydantic": "pydantic", "yaml": "pyyaml", "soxr": "soxr", "soundfile": "soundfile"}

# (part, benchmark module, its arguments on a GPU, at toy sizes): under 10 minutes on one H100 by
# FACTS.md's H200 rates (generate ~424 img/s greedy, ~90 beam 5; the fast path compiles its step
# once per batch shape, a minute or two each).
PARTS: list[tuple[str, str, list[str], list[str]]] = [
    (
        "caption_generate_vs_fast",
        "bench_caption",
        ["--images", "2048", "--naive-images", "16", "--greedy-batches", "256", "--beam-batches", "64"],
        [
            "--images",
            "4",
            "--naive-images",
            "1",
            "--greedy-batches",
            "4",
            "--beam-batches",
            "2",
            "--layers",
            "mid",
        ],
    ),
    (
        "scores_direct",
        "bench_scores",
        ["--images", "1024", "--naive-images", "32", "--batch", "256", "--caption-batch", "256", "--direct"],
        ["--images", "4", "--naive-images", "2", "--batch", "4", "--vision-images", "2", "--no-direct"],
    ),
]


def ensure_packages(wheels: Path | None) -> list[str]:
    """Install what the benchmarks need and this Python lacks, from ``wheels`` only."""
    missing = []
    for module, dist in NEEDED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing and wheels is not None and wheels.is_dir():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(wheels),
            *missing,
        ]
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
    return missing


def card() -> dict[str, Any]:
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0)
        if gpu
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if gpu:
        props = torch.cuda.get_device_properties(0)
        out["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        out["multiprocessors"] = props.multi_processor_count
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-out", type=Path, default=Path("bench_gpu.json"))
    p.add_argument(
        "--wheels", type=Path, default=None, help="Folder of wheels to install what is missing from."
    )
    p.add_argument("--smoke", action="store_true", help="Toy sizes: check the script on any machine.")
    p.add_argument("--only", nargs="*", default=None, help="Run these parts only (names in the JSON).")
    args = p.parse_args(argv)
    installed = ensure_packages(args.wheels)
    report: dict[str, Any] = {
        "benchmark": "bench_gpu",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        **card(),
        "installed_from_wheels": installed,
        "smoke": args.smoke,
        "parts": {},
    }
    print(f"bench_gpu on {report['device']} (torch {report['torch']})", flush=True)
    for name, module, gpu_args, smoke_args in PARTS:
        if args.only is not None and name not in args.only:
            continue
        t0 = time.perf_counter()
        entry: dict[str, Any]
        try:
            bench = importlib.import_module(module)
            result = bench.run(bench.parse_args(smoke_args if args.smoke else gpu_args))
            entry = {"ok": True, "report": result}
        except Exception as exc:  # one failing part must not cost the others' figures
            entry = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-4000:],
            }
            print(f"{name} failed: {entry['error']}", file=sys.stderr, flush=True)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][name] = entry
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(
            f"{name}: {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']} s -> {args.json_out}",
            flush=True,
        )
    return 0 if all(e["ok"] for e in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
